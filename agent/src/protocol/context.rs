//! What a protocol's session is given: the agent's [`Services`], and a [`Session`] that says
//! who connected where and offers grants, recording and the session's end.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    Outcome,
    limits::{self, Limits},
    live::Registry,
    record::Record,
    refuse,
};
use crate::{
    config::{OnMissingGrant, Resource, SharedConfig},
    grants::{EngineError, GrantEngine, GrantHandle, GrantState},
    identity::Attribution,
    inspect::tls::LocalCa,
    model::{RequestStatus, SessionOutcome},
    store::SharedStore,
};

/// How long an approved connection waits for its grant to be applied here (see
/// [`Session::hold_connection`]): a shared store delivers the two by different channels.
const GRANT_ARRIVAL: Duration = Duration::from_secs(3);

/// The agent's services every session may use, shared by all of them.
pub struct Services {
    pub config: SharedConfig,
    pub engine: GrantEngine,
    pub store: SharedStore,
    /// Live sessions, as `jitgate sessions` and reloads see them.
    pub registry: Registry,
    /// Signs certificates for client-side TLS (the host-local CA).
    pub ca: Option<Arc<LocalCa>>,
    /// Key of the `hash` masking strategy's pseudonyms, one per host.
    pub mask_key: [u8; 32],
    /// Cancelled when the host agent shuts down: sessions end with a clear outcome.
    pub shutdown: CancellationToken,
    /// Concurrent connections per identity, per grant and agent-wide.
    pub limits: Limits,
    /// Refused connections, folded before they reach the audit log.
    pub refusals: crate::refusals::ProxyRefusals,
    /// Statements (or requests) per second, per grant and per identity, over all sessions of
    /// every protocol (`[policy.limits]`).
    pub rates: crate::protocol::rate::Rates,
    /// Memory held on workloads' behalf (bodies read whole), agent-wide.
    pub buffers: crate::protocol::buffers::Buffers,
    /// Approval holds in progress, per identity.
    pub holds: crate::protocol::hold::Holds,
}

/// One session as its protocol sees it: attributed, routed, not yet granted.
pub struct Session<'a> {
    pub services: &'a Services,
    pub who: &'a Attribution,
    /// The client's uid (for requests filed on its behalf).
    pub uid: u32,
    pub resource: &'a Resource,
    /// Where the client was going (normalised): the address its TLS expects, for one.
    pub destination: SocketAddr,
    /// Where the gate connects: the resource's endpoint for that destination (see
    /// [`crate::config::Target::endpoint`]), never another local service the workload picked.
    pub upstream: SocketAddr,
    /// The session record being built up; the proxy writes it when the session ends.
    pub record: &'a mut Record,
    /// The connection's slots (see [`limits`]): pending until the grant decision.
    pub slots: limits::Pending,
    /// The granted session's slots, once [`Session::acquire_grant`] took them.
    pub granted: Option<limits::Granted>,
    /// When the pre-grant phase (the protocol's startup) must be over: `[daemon]
    /// startup_timeout` after accept.
    pub startup_deadline: tokio::time::Instant,
}

/// Why [`Session::acquire_grant`] refused, for the client's own protocol.
pub struct Refused {
    /// What the session record says.
    pub outcome: Outcome,
    /// Set when a concurrency limit refused: the client's error says so (PostgreSQL:
    /// SQLSTATE 53300) with its hint.
    pub limit: Option<limits::Exceeded>,
}

impl From<Outcome> for Refused {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            limit: None,
        }
    }
}

/// The outcome a limit refusal of `identity` records (and counts).
pub fn limit_outcome(identity: &str, e: &limits::Exceeded) -> Outcome {
    crate::ops::metrics::limit_refusal(e.kind.label(), identity);
    refuse(SessionOutcome::RefusedLimit, format!("{e}; {}", e.hint()))
}

impl Session<'_> {
    /// The live grant this connection may ride on: found, or (for `on_missing_grant =
    /// "request"`) asked for and waited on, within the identity's and the grant's session
    /// limits. `Err` is the refusal to record.
    pub async fn acquire_grant(&mut self) -> Result<GrantHandle, Refused> {
        let grant = self.find_grant().await?;
        let limits = &self.services.config.get().daemon.limits;
        match self.slots.grant(
            &grant.id,
            limits.max_sessions_per_identity,
            self.resource.max_sessions_per_grant,
        ) {
            Ok(granted) => {
                self.granted = Some(granted);
                Ok(grant)
            }
            Err(e) => Err(Refused {
                outcome: limit_outcome(&self.who.identity, &e),
                limit: Some(e),
            }),
        }
    }

    async fn find_grant(&mut self) -> Result<GrantHandle, Outcome> {
        let (services, who, resource) = (self.services, self.who, self.resource);
        // Fleet mode, store out of reach: no grant can be confirmed nor the session
        // recorded, so the gate stays closed (live sessions run on until store_lease).
        if let Err(why) = services.engine.store_available() {
            return Err(refuse(SessionOutcome::RefusedStoreDown, why));
        }
        if let Some(g) = services.engine.find(
            &who.identity,
            who.task.as_deref(),
            &resource.name,
            resource.connect_access,
        ) {
            return Ok(g);
        }
        // A grant for another host is never usable here; a refusal names it, so the
        // workload (and whoever reads the log) knows why and what to ask for. (With
        // `on_missing_grant = "request"` a request is filed here instead, as for no grant.)
        if resource.on_missing_grant == OnMissingGrant::Reject
            && let Some(g) = services.engine.scoped_elsewhere(
                &who.identity,
                who.task.as_deref(),
                &resource.name,
                resource.connect_access,
            )
        {
            let host = services.engine.host();
            return Err(refuse(
                SessionOutcome::RefusedNoGrant,
                format!(
                    "grant {} ({} access to {} for {}) is scoped to hosts {}, and this host is {host}: it is not usable here; ask for a grant on this host with `jitgate request {} --access {}`, or have the operator widen its policy ({}) with hosts = [...] or \"fleet\"",
                    g.id,
                    g.access,
                    g.resource,
                    g.identity,
                    g.hosts,
                    resource.name,
                    resource.connect_access,
                    g.policy,
                ),
            ));
        }
        match resource.on_missing_grant {
            OnMissingGrant::Reject => Err(refuse(
                SessionOutcome::RefusedNoGrant,
                format!(
                    "no grant: {} has no live {} grant on {}; ask with `jitgate request {} --access {}`",
                    who.identity,
                    resource.connect_access,
                    resource.name,
                    resource.name,
                    resource.connect_access
                ),
            )),
            OnMissingGrant::Request => {
                let started = Instant::now();
                let decided = self.hold_connection().await;
                self.record.held = started.elapsed();
                decided
            }
        }
    }

    /// Files (or joins) a request for this connection and waits for its decision.
    async fn hold_connection(&self) -> Result<GrantHandle, Outcome> {
        let (services, who, resource) = (self.services, self.who, self.resource);
        let (access, timeout) = (resource.connect_access, resource.hold_timeout);
        let request = match services
            .engine
            .file_for_connection(who, self.uid, &resource.name)
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
        info!(request = %request.id, identity = %who.identity, resource = %resource.name, "holding connection for approval");
        let decided = if request.status == RequestStatus::Pending {
            tokio::select! {
                r = services.engine.wait(&request.id, timeout) => r.map_err(|e| refuse(SessionOutcome::Error, e.to_string()))?,
                () = services.shutdown.cancelled() => return Err(refuse(SessionOutcome::Shutdown, "the host agent is shutting down")),
            }
        } else {
            request
        };
        match decided.status {
            RequestStatus::Approved => {
                // The store may have failed while the connection was held.
                if let Err(why) = services.engine.store_available() {
                    return Err(refuse(SessionOutcome::RefusedStoreDown, why));
                }
                // With a shared store the approval (a notification) can be heard a moment
                // before the grant it issued is applied here (read from the change log):
                // wait for it that long before refusing.
                let deadline = Instant::now() + GRANT_ARRIVAL;
                loop {
                    if let Some(grant) = services.engine.find(
                        &who.identity,
                        who.task.as_deref(),
                        &resource.name,
                        access,
                    ) {
                        break Ok(grant);
                    }
                    if Instant::now() >= deadline || services.shutdown.is_cancelled() {
                        break Err(refuse(
                            SessionOutcome::RefusedNoGrant,
                            "the approved grant is no longer live",
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
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

    /// The session is granted and its protocol is up: record it as open (so `jitgate
    /// sessions` shows it), register it as live, and return the signal of its end.
    pub fn open(&mut self, grant: &GrantHandle) -> SessionEnd {
        self.record.session.grant = Some(grant.id.clone());
        self.record
            .open(&self.services.store, self.resource.settings.protocol());
        let removed = self.record.register(
            &self.services.registry,
            self.who,
            &self.resource.name,
            grant,
        );
        SessionEnd {
            grant: grant.id.clone(),
            state: grant.state.clone(),
            removed,
            shutdown: self.services.shutdown.clone(),
            draining: false,
        }
    }
}

/// Why a session must end for a reason of the agent's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    GrantExpired(String),
    GrantRevoked(String),
    /// The host lost its shared store and could not confirm the grant within `store_lease`.
    StoreLost(String),
    /// The store stopped keeping writes: the session ends rather than run unrecorded.
    Unrecorded(String),
    /// The resource left the configuration (reload).
    ResourceRemoved,
    /// The host agent is shutting down (protocols with an idle point may drain first).
    Shutdown,
}

impl End {
    /// The recorded outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::GrantRevoked(id) => {
                refuse(SessionOutcome::GrantRevoked, format!("grant {id} revoked"))
            }
            Self::GrantExpired(id) => {
                refuse(SessionOutcome::GrantExpired, format!("grant {id} expired"))
            }
            Self::StoreLost(id) => refuse(SessionOutcome::StoreLost, store_lost(id)),
            Self::Unrecorded(id) => refuse(SessionOutcome::StoreLost, unrecorded(id)),
            Self::ResourceRemoved => refuse(
                SessionOutcome::ResourceRemoved,
                "the resource left the configuration",
            ),
            Self::Shutdown => refuse(SessionOutcome::Shutdown, "the host agent is shutting down"),
        }
    }
}

/// Why a session on grant `id` was cut when the shared store stayed out of reach.
pub fn store_lost(id: &str) -> String {
    format!(
        "the host lost its shared state store and could not confirm grant {id} within store_lease"
    )
}

/// Why a session on grant `id` was cut when the store stopped keeping writes.
pub fn unrecorded(id: &str) -> String {
    format!(
        "the state store on this host stopped keeping records in time (a full disk, a failing database, or records piling up faster than its disk writes them), so this session on grant {id} was ended rather than run unrecorded; `jitgate status` shows why, and the grant is usable again once the store keeps up"
    )
}

/// [`SessionEnd::ended_owned`]: a wait on the session's end that owns what it waits on.
pub type EndWait = std::pin::Pin<Box<dyn std::future::Future<Output = End> + Send + 'static>>;

/// The one signal of a live session's end: its grant ends (expiry, revocation), its
/// resource is removed, or the agent shuts down. Clones watch the same session (one per
/// direction of a protocol's pumps).
#[derive(Clone)]
pub struct SessionEnd {
    grant: String,
    state: tokio::sync::watch::Receiver<GrantState>,
    removed: CancellationToken,
    shutdown: CancellationToken,
    /// Set once the protocol drains on shutdown: then only a grant's or resource's end is
    /// news.
    draining: bool,
}

impl SessionEnd {
    /// The reason to end now, if there is one (checked between two messages).
    pub fn now(&self) -> Option<End> {
        match *self.state.borrow() {
            GrantState::Active => {}
            GrantState::Revoked => return Some(End::GrantRevoked(self.grant.clone())),
            GrantState::Expired => return Some(End::GrantExpired(self.grant.clone())),
            GrantState::Unconfirmed => return Some(End::StoreLost(self.grant.clone())),
            GrantState::Unrecorded => return Some(End::Unrecorded(self.grant.clone())),
        }
        if self.removed.is_cancelled() {
            return Some(End::ResourceRemoved);
        }
        (self.shutdown.is_cancelled() && !self.draining).then_some(End::Shutdown)
    }

    /// Resolves when the session must end, with why.
    pub async fn ended(&mut self) -> End {
        let draining = self.draining;
        // In this order when several are due: a grant's end says most about why.
        tokio::select! {
            biased;
            changed = self.state.wait_for(|s| *s != GrantState::Active) => match changed.as_deref() {
                Ok(GrantState::Revoked) => End::GrantRevoked(self.grant.clone()),
                Ok(GrantState::Unconfirmed) => End::StoreLost(self.grant.clone()),
                Ok(GrantState::Unrecorded) => End::Unrecorded(self.grant.clone()),
                _ => End::GrantExpired(self.grant.clone()),
            },
            () = self.removed.cancelled() => End::ResourceRemoved,
            () = self.shutdown.cancelled(), if !draining => End::Shutdown,
        }
    }

    /// [`Self::ended`] as a future that owns what it waits on, so that a pump can arm it
    /// once and keep it across wake-ups: built anew per message, it registered and removed a
    /// waiter on each end signal every time (a lock each, on the data path).
    pub fn ended_owned(&self) -> EndWait {
        let mut end = self.clone();
        Box::pin(async move { end.ended().await })
    }

    /// Resolves `grace` after the session had to end (after the drain timeout more for a
    /// shutdown, which the protocol may drain first: `drain` reads it when the shutdown
    /// begins, as the pump and the daemon do, so a reload in between is seen alike), for a
    /// protocol whose pumps end the session in its own terms (PostgreSQL's 57P01): a pump
    /// blocked writing to a peer that stopped reading never sees the end, so the session
    /// races its pumps against this and cuts them when it fires. The grant's end must reach
    /// the live connection whatever the workload does.
    pub async fn overdue(
        mut self,
        drain: impl FnOnce() -> std::time::Duration,
        grace: std::time::Duration,
    ) -> End {
        let why = self.ended().await;
        let why = if why == End::Shutdown {
            self.draining();
            let drain = drain();
            tokio::select! {
                why = self.ended() => why,
                () = tokio::time::sleep(drain) => End::Shutdown,
            }
        } else {
            why
        };
        tokio::time::sleep(grace).await;
        why
    }

    /// The protocol has begun draining after [`End::Shutdown`] (it ends the session at its
    /// next idle point or deadline): from now on only a grant's or resource's end is news.
    pub fn draining(&mut self) {
        self.draining = true;
    }
}
