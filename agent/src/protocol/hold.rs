//! Approval holds for actions inside a session (a SQL statement today; an HTTP request or an
//! SSH command tomorrow): file a request an approver sees, wait for the decision, and lapse
//! the request when the wait ends undecided, so that approving it later runs nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Services;
use crate::{config::Access, identity::Attribution, model::RequestStatus};

/// What is held, as the approver sees it.
pub struct Hold<'a> {
    /// The action's full text, secrets masked (what is approved is all that runs).
    pub text: &'a str,
    /// The rule that asked for approval.
    pub rule: &'a str,
    /// Why, in words.
    pub reason: &'a str,
    /// How long to wait for a decision.
    pub timeout: Duration,
}

/// How a hold ended.
#[derive(Debug)]
pub enum HoldOutcome {
    /// Approved, by this person.
    Approved { by: String },
    /// Denied, or not decided within the timeout (the request then lapsed).
    NotApproved {
        status: RequestStatus,
        by: Option<String>,
    },
    /// No request could be filed (no approver for it, or the store failed).
    NotFiled(String),
    /// Waiting for the decision failed.
    Failed(String),
    /// The session ended while the action waited; the request lapsed.
    SessionEnded,
}

/// A hold's outcome and how long it waited (the time a human took, not the gate's cost).
#[derive(Debug)]
pub struct Held {
    pub outcome: HoldOutcome,
    pub waited: Duration,
}

/// Most holds of one identity in progress at once, over every session and protocol: from
/// filing until the request is decided or has lapsed, however the wait ended (a client that
/// resets an HTTP/2 stream leaves its filing and lapse running; counted until they are
/// done). Each is a request approvers see and two store writes.
pub const MAX_HOLDS_PER_IDENTITY: usize = 32;

/// Holds in progress, by identity.
#[derive(Default, Clone)]
pub struct Holds(Arc<Mutex<HashMap<String, usize>>>);

/// One hold in progress; shared by the work it leaves behind (filing, lapsing), and given
/// back when the last of it is done.
#[derive(Clone)]
struct Ticket {
    /// Held for its drop: the last clone gives the place back.
    _held: Arc<TicketInner>,
}

struct TicketInner {
    holds: Holds,
    identity: String,
}

impl Holds {
    fn admit(&self, identity: &str) -> Result<Ticket, String> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(identity.to_owned()).or_default();
        if *n >= MAX_HOLDS_PER_IDENTITY {
            return Err(format!(
                "{MAX_HOLDS_PER_IDENTITY} actions of {identity} already wait for approval (or for their requests to lapse); wait for their decisions, then retry"
            ));
        }
        *n += 1;
        Ok(Ticket {
            _held: Arc::new(TicketInner {
                holds: self.clone(),
                identity: identity.to_owned(),
            }),
        })
    }

    /// Holds of `identity` in progress.
    pub fn in_progress(&self, identity: &str) -> usize {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(identity)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        let mut open = self.holds.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// Files a request for `what`, waits for its decision, lapses it when undecided.
#[allow(clippy::too_many_arguments)]
pub async fn hold(
    services: &Services,
    who: &Attribution,
    uid: u32,
    resource: &str,
    access: Access,
    session: &str,
    what: Hold<'_>,
    stop: &CancellationToken,
) -> Held {
    let ticket = match services.holds.admit(&who.identity) {
        Ok(t) => t,
        Err(e) => {
            return Held {
                outcome: HoldOutcome::NotFiled(e),
                waited: Duration::ZERO,
            };
        }
    };
    // Filed from a task of its own: a wait dropped while the store writes the request
    // still lapses it once written (see [`Filing`]).
    let mut filing = Filing {
        engine: services.engine.clone(),
        ticket: ticket.clone(),
        handle: Some(tokio::spawn({
            let engine = services.engine.clone();
            let who = who.clone();
            let (resource, session) = (resource.to_owned(), session.to_owned());
            let (text, rule, reason) = (
                what.text.to_owned(),
                what.rule.to_owned(),
                what.reason.to_owned(),
            );
            async move {
                engine
                    .file_statement(
                        &who, uid, &resource, access, &session, &text, &rule, &reason,
                    )
                    .await
                    .map_err(|e| e.to_string())
            }
        })),
    };
    let filed = match filing.handle.as_mut() {
        Some(h) => h
            .await
            .unwrap_or_else(|e| Err(format!("filing the request: {e}"))),
        None => Err("filing the request: no task".into()),
    };
    filing.handle = None;
    let request = match filed {
        Ok(r) => r,
        Err(e) => {
            return Held {
                outcome: HoldOutcome::NotFiled(e),
                waited: Duration::ZERO,
            };
        }
    };
    info!(request = %request.id, rule = what.rule, "held for approval");
    let started = Instant::now();
    // Dropped while it waits (an HTTP/2 client resets the stream), the request lapses, so an
    // approver cannot approve what nothing will run.
    let mut guard = LapseOnDrop {
        engine: Some(services.engine.clone()),
        request: request.id.clone(),
        ticket: ticket.clone(),
    };
    let waited = tokio::select! {
        r = services.engine.wait(&request.id, what.timeout) => r,
        () = stop.cancelled() => {
            guard.engine = None;
            lapse(services, &request.id, "the session ended while its statement waited").await;
            return Held { outcome: HoldOutcome::SessionEnded, waited: started.elapsed() };
        }
    };
    guard.engine = None;
    let waited = match waited {
        Ok(q) if q.status == RequestStatus::Pending => {
            lapse(services, &request.id, "approval_timeout passed").await;
            // A decision that landed just before wins.
            match services.engine.request(&request.id).await {
                Ok(Some(now)) => Ok(now),
                _ => Ok(q),
            }
        }
        other => other,
    };
    let outcome = match waited {
        Ok(q) if q.status == RequestStatus::Approved => HoldOutcome::Approved {
            by: q.decided_by.map(|a| a.user).unwrap_or_default(),
        },
        Ok(q) => HoldOutcome::NotApproved {
            status: q.status,
            by: q.decided_by.map(|a| a.user),
        },
        Err(e) => HoldOutcome::Failed(e.to_string()),
    };
    Held {
        outcome,
        waited: started.elapsed(),
    }
}

/// See [`crate::grants::GrantEngine::lapse`]; a failure is logged (the request then stays
/// pending, and approving it runs nothing).
async fn lapse(services: &Services, request: &str, why: &str) {
    if let Err(e) = services.engine.lapse(request, why).await {
        warn!(request, error = %e, "cannot mark an undecided request expired");
    }
}

/// Lapses a filed request when the wait for it is dropped half way.
struct LapseOnDrop {
    /// `None` once the wait has ended and its own code decided the request's fate.
    engine: Option<crate::grants::GrantEngine>,
    request: String,
    /// Held until the lapse is written.
    ticket: Ticket,
}

impl Drop for LapseOnDrop {
    fn drop(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        let request = std::mem::take(&mut self.request);
        let ticket = self.ticket.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ticket = ticket;
                if let Err(e) = engine
                    .lapse(&request, "the client went away while it waited")
                    .await
                {
                    warn!(request, error = %e, "cannot mark an undecided request expired");
                }
            });
        }
    }
}

/// The task filing a request, while the wait for it has not taken its result: dropped then,
/// it lapses the request once the task has written it.
struct Filing {
    engine: crate::grants::GrantEngine,
    /// Held until the request is written and lapsed.
    ticket: Ticket,
    handle: Option<tokio::task::JoinHandle<Result<crate::model::Request, String>>>,
}

impl Drop for Filing {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let engine = self.engine.clone();
        let ticket = self.ticket.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ticket = ticket;
                if let Ok(Ok(request)) = handle.await
                    && let Err(e) = engine
                        .lapse(&request.id, "the client went away while it waited")
                        .await
                {
                    warn!(request = %request.id, error = %e, "cannot mark an undecided request expired");
                }
            });
        }
    }
}
