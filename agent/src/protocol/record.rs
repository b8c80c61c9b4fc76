//! The record of one session, built up as the connection progresses and written to the
//! store when it opens and when it ends (a refused one is written once, as refused).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{
    Outcome, Services,
    live::{LiveSession, Registry},
    relay,
};
use crate::{
    grants::GrantHandle,
    identity::Attribution,
    model::{Session, SessionOutcome, Timestamp},
    store::SharedStore,
};

/// The session record being built up as the connection progresses.
pub struct Record {
    pub session: Session,
    inserted: bool,
    accepted: Instant,
    /// Time spent waiting for a human to approve the connection (not the gate's own cost).
    pub held: Duration,
    pub counters: Arc<relay::Counters>,
}

impl Record {
    /// Registers the session as live (for `jitgate sessions` and reloads); the token is
    /// cancelled when the agent must end it.
    pub(crate) fn register(
        &self,
        registry: &Registry,
        attribution: &Attribution,
        resource: &str,
        grant: &GrantHandle,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        registry.insert(
            &self.session.id,
            LiveSession {
                identity: attribution.identity.clone(),
                resource: resource.to_owned(),
                grant: grant.id.clone(),
                started_at: self.session.started_at,
                counters: self.counters.clone(),
                cancel: cancel.clone(),
            },
        );
        cancel
    }

    pub fn new(id: String) -> Self {
        Self {
            session: Session {
                id,
                identity: None,
                task: None,
                pid: 0,
                uid: 0,
                command: String::new(),
                resource: None,
                grant: None,
                destination: String::new(),
                started_at: Timestamp::now(),
                ended_at: None,
                bytes_up: 0,
                bytes_down: 0,
                outcome: SessionOutcome::Open,
                detail: String::new(),
                database: None,
                access: None,
            },
            inserted: false,
            accepted: Instant::now(),
            held: Duration::ZERO,
            counters: Arc::default(),
        }
    }

    /// Writes the open session (once relaying starts) so `jitgate sessions` shows it.
    pub(crate) fn open(&mut self, store: &SharedStore, protocol: &'static str) {
        crate::ops::metrics::session_setup(
            protocol,
            self.accepted.elapsed().saturating_sub(self.held),
        );
        store.session_opened(self.session.clone());
        self.inserted = true;
    }

    /// Closes the record with how the session ended: leaves the live registry, counts it,
    /// and writes the end (or, for a session that never opened, the refusal) to the store.
    pub fn finish(mut self, services: &Services, (outcome, detail): Outcome) {
        let (up, down) = self.counters.snapshot();
        let s = &mut self.session;
        s.ended_at = Some(Timestamp::now());
        s.bytes_up = up;
        s.bytes_down = down;
        s.outcome = outcome;
        s.detail = detail;
        services.registry.remove(&s.id);
        crate::ops::metrics::session_ended(
            s.resource.as_deref(),
            s.identity.as_deref(),
            outcome,
            (up, down),
        );
        let refused = !self.inserted;
        match outcome {
            SessionOutcome::Closed => debug!(outcome = %outcome, up, down, "session ended"),
            _ => info!(
                outcome = %outcome,
                identity = s.identity.as_deref().unwrap_or("-"),
                resource = s.resource.as_deref().unwrap_or("-"),
                detail = %s.detail,
                "session ended"
            ),
        }
        if refused {
            services
                .refusals
                .record(&services.store, &services.shutdown, self.session);
        } else {
            services.store.session_ended(self.session);
        }
    }
}
