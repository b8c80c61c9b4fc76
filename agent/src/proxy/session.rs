//! One redirected connection, from accept to close:
//!
//! ```text
//! accept -> attribute (kernel record: destination, cgroup, pid) -> resource
//!        -> grant? --no--> reject | file request and hold until decided
//!        -> connect upstream -> relay <-> (grant expires / revoked / shutdown) -> record end
//! ```
//!
//! Every step that can fail refuses the connection: nothing is relayed unless a live grant
//! covers this identity, task, resource and access level.

use std::{
    net::SocketAddr,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use super::{LiveSession, ProxyContext, relay, routes};
use crate::{
    config::{OnMissingGrant, Protocol, Resource},
    gate::rules::from_words,
    grants::{EngineError, GrantHandle, GrantState},
    identity::Attribution,
    ids,
    model::{RequestStatus, Session, SessionOutcome, Timestamp},
};

/// How long an upstream connect may take before the session is refused.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one accepted connection to its end. Never panics on bad input; every exit is
/// recorded, a panic's too (the session ends, its record is closed and it leaves the live
/// registry; other sessions go on).
pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream) {
    let id = ids::new(ids::Kind::Session);
    let span = info_span!("session", session = %id);
    async move {
        let mut s = Record::new(id);
        let outcome = match AssertUnwindSafe(run(&ctx, client, &mut s))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                error!("session task panicked; its connection is closed");
                (
                    SessionOutcome::Error,
                    "internal error in the host agent; the connection was closed".into(),
                )
            }
        };
        s.finish(&ctx, outcome);
    }
    .instrument(span)
    .await;
}

/// The session record being built up as the connection progresses.
pub(crate) struct Record {
    pub(crate) session: Session,
    inserted: bool,
    accepted: Instant,
    /// Time spent waiting for a human to approve the connection (not the gate's own cost).
    pub(crate) held: Duration,
    pub(crate) counters: Arc<relay::Counters>,
}

impl Record {
    /// Registers the session as live (for `jitgate sessions` and reloads); the token is
    /// cancelled when the agent must end it.
    pub(crate) fn register(
        &self,
        ctx: &ProxyContext,
        attribution: &Attribution,
        resource: &str,
        grant: &GrantHandle,
    ) -> CancellationToken {
        let cancel = CancellationToken::new();
        ctx.registry.insert(
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

    fn new(id: String) -> Self {
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
    pub(crate) fn open(&mut self, ctx: &ProxyContext, protocol: &'static str) {
        crate::ops::metrics::session_setup(
            protocol,
            self.accepted.elapsed().saturating_sub(self.held),
        );
        ctx.store.session_opened(self.session.clone());
        self.inserted = true;
    }

    fn finish(mut self, ctx: &ProxyContext, (outcome, detail): (SessionOutcome, String)) {
        let (up, down) = self.counters.snapshot();
        let s = &mut self.session;
        s.ended_at = Some(Timestamp::now());
        s.bytes_up = up;
        s.bytes_down = down;
        s.outcome = outcome;
        s.detail = detail;
        ctx.registry.remove(&s.id);
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
            ctx.store.session_refused(self.session);
        } else {
            ctx.store.session_ended(self.session);
        }
    }
}

/// Reads `/proc/PID/cmdline` as one line (best effort: the client may be gone already).
fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            let text = String::from_utf8_lossy(&raw);
            let mut s: String = text
                .trim_end_matches('\0')
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(1024)
                .collect();
            s.truncate(s.trim_end().len());
            s
        })
        .unwrap_or_default()
}

pub(crate) type Outcome = (SessionOutcome, String);

pub(crate) fn refuse(outcome: SessionOutcome, detail: impl Into<String>) -> Outcome {
    (outcome, detail.into())
}

async fn run(ctx: &ProxyContext, client: TcpStream, s: &mut Record) -> Outcome {
    let (peer, local) = match (client.peer_addr(), client.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        _ => return refuse(SessionOutcome::Error, "connection vanished on accept"),
    };
    let record = match ctx.conns.take(peer, local) {
        Ok(Some(r)) => r,
        Ok(None) => {
            s.session.destination = local.to_string();
            return refuse(
                SessionOutcome::RefusedUnattributed,
                format!("no gate record for {peer}: the connection did not come through the gate"),
            );
        }
        Err(e) => {
            return refuse(
                SessionOutcome::RefusedUnattributed,
                format!("reading the gate record failed: {e}"),
            );
        }
    };
    let original = SocketAddr::new(from_words(record.orig_addr), record.orig_port);
    let destination = routes::normalize(original);
    s.session.destination = original.to_string();
    s.session.pid = record.tgid;
    s.session.uid = record.uid;
    s.session.command = command_line(record.tgid);

    let Some(attribution) = ctx.workloads.attribute(record.cgroup_id, record.uid) else {
        return refuse(
            SessionOutcome::RefusedUnattributed,
            format!(
                "process {} (cgroup id {}) is inside the gate but belongs to no configured workload",
                record.tgid, record.cgroup_id
            ),
        );
    };
    s.session.identity = Some(attribution.identity.clone());
    s.session.task = attribution.task.clone();

    let Some(resource_name) = ctx.routes.resource_for(destination) else {
        return refuse(
            SessionOutcome::RefusedNoResource,
            format!("{original} is not a resource (any more)"),
        );
    };
    s.session.resource = Some(resource_name.clone());
    let config = ctx.config.get();
    let Some(resource) = config.resource(&resource_name).cloned() else {
        return refuse(
            SessionOutcome::RefusedNoResource,
            "resource removed from the config",
        );
    };

    if resource.protocol == Protocol::Postgres {
        return crate::postgres::session::serve(
            ctx,
            client,
            s,
            &attribution,
            &resource,
            record.uid,
            destination,
        )
        .await;
    }
    let grant = match acquire_grant(ctx, &attribution, record.uid, &resource, &mut s.held).await {
        Ok(g) => g,
        Err(outcome) => return outcome,
    };
    s.session.grant = Some(grant.id.clone());

    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(destination)).await
        {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                return refuse(
                    SessionOutcome::UpstreamFailed,
                    format!("connecting to {destination}: {e}"),
                );
            }
            Err(_) => {
                return refuse(
                    SessionOutcome::UpstreamFailed,
                    format!(
                        "connecting to {destination}: no answer within {}s",
                        UPSTREAM_CONNECT_TIMEOUT.as_secs()
                    ),
                );
            }
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    s.open(ctx, "tcp");
    let cancel = s.register(ctx, &attribution, &resource.name, &grant);
    debug!(identity = %attribution.identity, resource = %resource.name, grant = %grant.id, "relaying");
    relay_until_done(ctx, client, upstream, grant, &cancel, &s.counters).await
}

/// The live grant this connection may ride on: found, or (for `on_missing_grant = "request"`)
/// asked for and waited on. `Err` is the refusal to record.
pub(crate) async fn acquire_grant(
    ctx: &ProxyContext,
    attribution: &Attribution,
    uid: u32,
    resource: &Resource,
    held: &mut Duration,
) -> Result<GrantHandle, Outcome> {
    if let Some(g) = ctx.engine.find(
        &attribution.identity,
        attribution.task.as_deref(),
        &resource.name,
        resource.connect_access,
    ) {
        return Ok(g);
    }
    match resource.on_missing_grant {
        OnMissingGrant::Reject => Err(refuse(
            SessionOutcome::RefusedNoGrant,
            format!(
                "no grant: {} has no live {} grant on {}; ask with `jitgate request {} --access {}`",
                attribution.identity,
                resource.connect_access,
                resource.name,
                resource.name,
                resource.connect_access
            ),
        )),
        OnMissingGrant::Request => {
            let started = Instant::now();
            let decided = hold(
                ctx,
                attribution,
                uid,
                &resource.name,
                resource.connect_access,
                resource.hold_timeout,
            )
            .await;
            *held = started.elapsed();
            decided
        }
    }
}

/// Files (or joins) a request for this connection and waits for its decision.
async fn hold(
    ctx: &ProxyContext,
    attribution: &Attribution,
    uid: u32,
    resource: &str,
    access: crate::config::Access,
    timeout: Duration,
) -> Result<GrantHandle, Outcome> {
    let request = match ctx
        .engine
        .file_for_connection(attribution, uid, resource)
        .await
    {
        Ok(r) => r,
        Err(EngineError::Refused(reason)) => {
            return Err(refuse(
                SessionOutcome::RefusedNoGrant,
                format!("request refused: {reason}"),
            ));
        }
        Err(e) => {
            return Err(refuse(
                SessionOutcome::Error,
                format!("filing a request: {e}"),
            ));
        }
    };
    info!(request = %request.id, identity = %attribution.identity, resource, "holding connection for approval");
    let decided = if request.status == RequestStatus::Pending {
        tokio::select! {
            r = ctx.engine.wait(&request.id, timeout) => r.map_err(|e| refuse(SessionOutcome::Error, e.to_string()))?,
            () = ctx.shutdown.cancelled() => return Err(refuse(SessionOutcome::Shutdown, "the host agent is shutting down")),
        }
    } else {
        request
    };
    match decided.status {
        RequestStatus::Approved => ctx
            .engine
            .find(
                &attribution.identity,
                attribution.task.as_deref(),
                resource,
                access,
            )
            .ok_or_else(|| {
                refuse(
                    SessionOutcome::RefusedNoGrant,
                    "the approved grant is no longer live",
                )
            }),
        RequestStatus::Denied => Err(refuse(
            SessionOutcome::RefusedDenied,
            format!(
                "request {} denied{}",
                decided.id,
                decided
                    .decision_reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        )),
        RequestStatus::Pending => Err(refuse(
            SessionOutcome::RefusedTimeout,
            format!(
                "request {} still pending after {}; approve it with `jitgate approve {}`",
                decided.id,
                crate::model::human_duration(timeout),
                decided.id
            ),
        )),
        RequestStatus::Expired => Err(refuse(
            SessionOutcome::RefusedTimeout,
            format!("request {} lapsed", decided.id),
        )),
    }
}

/// Relays until either side closes, the grant ends, the resource goes away or the agent
/// shuts down. Cuts on the agent's side reset the workload's connection, so the client sees
/// an error rather than a clean end of stream.
async fn relay_until_done(
    ctx: &ProxyContext,
    mut client: TcpStream,
    mut upstream: TcpStream,
    grant: GrantHandle,
    cancel: &CancellationToken,
    counters: &relay::Counters,
) -> Outcome {
    let mut state = grant.state.clone();
    let outcome = tokio::select! {
        r = relay::relay(&mut client, &mut upstream, counters) => match r {
            Ok(()) => return (SessionOutcome::Closed, String::new()),
            Err(e) => return (SessionOutcome::Error, e.to_string()),
        },
        changed = state.wait_for(|s| *s != GrantState::Active) => match changed.as_deref() {
            Ok(GrantState::Revoked) => refuse(SessionOutcome::GrantRevoked, format!("grant {} revoked", grant.id)),
            _ => refuse(SessionOutcome::GrantExpired, format!("grant {} expired", grant.id)),
        },
        () = cancel.cancelled() => refuse(SessionOutcome::ResourceRemoved, "the resource left the configuration"),
        () = ctx.shutdown.cancelled() => refuse(SessionOutcome::Shutdown, "the host agent is shutting down"),
    };
    if let Err(e) = client.set_zero_linger() {
        warn!(error = %e, "could not arm reset on close");
    }
    drop(client);
    drop(upstream);
    outcome
}
