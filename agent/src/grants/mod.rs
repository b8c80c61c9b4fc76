//! Requests, decisions and grants: the only place that creates or ends access.
//!
//! Durable state lives in the store and every change is written (with its audit record) in
//! one transaction before anyone is told about it. Live grants are mirrored in memory for the
//! proxy's per-connection lookup, each with a `watch` channel that sessions riding on the
//! grant listen to: expiry and revocation flip it, and those sessions close within the
//! sweeper's tick.

pub mod policy;
pub mod scope;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Access, SharedConfig},
    grants::scope::{HostScope, HostsSpec},
    identity::{self, Attribution, Caller},
    ids,
    model::{Actor, Approval, Grant, Needs, Request, RequestStatus, Timestamp, human_duration},
    ops::metrics,
    store::{
        Decided, GrantApproval, GrantChange, RequestKey, SharedStore, StoreError,
        audit::{Event, RequestRefused},
        health::{StoreHealth, WriteHealth},
    },
};

/// How often expiry is checked. Sessions on an expired grant close within this.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Errors the control API turns into clear answers (and the CLI into exit codes).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The state of a live grant, as sessions see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantState {
    Active,
    Expired,
    Revoked,
    /// The host lost its shared store and could not confirm the grant within `store_lease`.
    Unconfirmed,
    /// The store stopped keeping writes (a full disk, a failing database): the grant's
    /// sessions end rather than run unrecorded. The grant itself stands, and is live again
    /// once the store keeps writes.
    Unrecorded,
}

/// What the proxy holds while a session rides on a grant.
#[derive(Clone, Debug)]
pub struct GrantHandle {
    pub id: String,
    pub access: Access,
    pub expires_at: Timestamp,
    pub state: watch::Receiver<GrantState>,
}

struct LiveGrant {
    grant: Grant,
    state: watch::Sender<GrantState>,
}

/// What recording one approval of several came to.
enum Recorded {
    /// The policy asks for one approval: this one decides (nothing recorded apart).
    Enough,
    /// Recorded; more are needed (the request as it is now).
    More(Request),
    /// Recorded, and it was the last needed: decide now, for the shortest `ttl` agreed.
    Last { now: Request, ttl: Duration },
}

/// What the policies here ask of a request's approvals, kept on it when it needs more than
/// one, or a fresh or stronger sign-in (see [`Request::needs`]).
fn needs_of(
    config: &crate::config::Config,
    identity: &str,
    resource: &str,
    access: Access,
) -> Option<Needs> {
    let (approvals, from) = policy::approvals_needed(config, identity, resource, access);
    let step_up = policy::step_up_needed(config, identity, resource, access);
    (approvals > 1 || !from.is_empty() || step_up.is_required()).then(|| Needs {
        approvals,
        from: from.iter().map(ToString::to_string).collect(),
        step_up,
    })
}

/// Everyone who approved, as a grant's `approved_by` names them.
fn approvers_of(request: &Request) -> String {
    request
        .approvals
        .iter()
        .map(|a| a.by.strip_prefix("user ").unwrap_or(&a.by).to_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The outcome of an approval: the request as decided, and the grant it issued (none for a
/// held statement, which simply runs).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Approved {
    pub request: Request,
    pub grant: Option<Grant>,
}

/// What someone asks for.
#[derive(Clone, Debug, Default)]
pub struct RequestSpec {
    pub resource: String,
    pub access: Option<Access>,
    pub ttl: Option<Duration>,
    pub reason: String,
    /// The identity to request for (operators only; workloads always request for themselves).
    pub for_identity: Option<String>,
    /// Bind the grant to this task (set by `jitgate run`).
    pub task: Option<String>,
    /// Where the grant may be used (`--hosts`); `None`: what the policy says. A request may
    /// narrow its policy's scope, never widen it.
    pub hosts: Option<HostsSpec>,
}

#[derive(Clone)]
pub struct GrantEngine {
    inner: Arc<Inner>,
}

struct Inner {
    store: SharedStore,
    /// A shared store's health; `None` for the embedded store (always there).
    health: Option<StoreHealth>,
    /// Whether the store keeps writes (the embedded store; see [`GrantEngine::check_writes`]).
    writes: Option<WriteHealth>,
    /// Set while the live set is emptied because writes failed, until it is reloaded.
    unrecorded: AtomicBool,
    /// The store's failure count last seen (see [`GrantEngine::check_writes`]).
    writes_seen: AtomicU64,
    /// What the live set was last checked against: the store's connection epoch it was
    /// reloaded on, and the confirmation it holds by (see [`GrantEngine::check_store`]).
    lease: Mutex<Lease>,
    config: SharedConfig,
    live: RwLock<HashMap<String, LiveGrant>>,
    /// Live grants of the fleet scoped to other hosts: listed, revocable and named in
    /// refusals here, never usable here (no state channel, never read by [`GrantEngine::find`]).
    elsewhere: RwLock<HashMap<String, Grant>>,
    /// This host's `host_id` (see [`crate::config::StoreConfig::host_id`]): fixed for the
    /// agent's lifetime, like the store.
    host: String,
    waiters: Mutex<HashMap<String, watch::Sender<RequestStatus>>>,
}

/// The engine's view of the lease on its live grants.
#[derive(Default)]
struct Lease {
    /// The store connection the live set was last made to match.
    epoch: u64,
    /// The confirmation the live grants hold by: renewed only on an epoch they were checked
    /// on, so a reconnection renews nothing until the live set was reloaded.
    confirmed: Option<std::time::Instant>,
}

fn actor_label(actor: &Actor) -> String {
    match &actor.identity {
        Some(identity) => format!("workload {identity} (user {})", actor.user),
        // A person of the web console: `oidc alice@example.com`.
        None if actor.uid == crate::identity::WEB_UID => actor.user.clone(),
        None => format!("user {}", actor.user),
    }
}

impl GrantEngine {
    /// Loads live grants from the store and starts the expiry sweeper.
    pub async fn start(
        store: SharedStore,
        config: SharedConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, EngineError> {
        // Subscribed before the live grants are read: a change made on another host in
        // between is then heard (and applying it twice is harmless).
        let changes = store.grant_changes();
        let now = Timestamp::now();
        let health = store.health();
        let seen = health.as_ref().map(StoreHealth::get);
        let grants = match store.live_grants(now).await {
            Ok(grants) => grants,
            // A shared store not reached yet: start with no grants (the gate closed); they
            // are loaded once it is reached.
            Err(StoreError::Unavailable(why)) => {
                warn!(error = %why, "starting with no grants: the shared state store is not reached yet");
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
        let lease = match &seen {
            Some(h) if h.available(std::time::Instant::now()) => Lease {
                epoch: h.epoch,
                confirmed: h.confirmed,
            },
            _ => Lease::default(),
        };
        let host = config.get().daemon.store.host_id().to_owned();
        let (here, there): (Vec<Grant>, Vec<Grant>) =
            grants.into_iter().partition(|g| g.hosts.allows(&host));
        let live = here
            .into_iter()
            .map(|g| {
                let (state, _) = watch::channel(GrantState::Active);
                (g.id.clone(), LiveGrant { grant: g, state })
            })
            .collect::<HashMap<_, _>>();
        let elsewhere = there
            .into_iter()
            .map(|g| (g.id.clone(), g))
            .collect::<HashMap<_, _>>();
        info!(
            grants = live.len(),
            elsewhere = elsewhere.len(),
            "restored live grants"
        );
        let engine = Self {
            inner: Arc::new(Inner {
                writes_seen: AtomicU64::new(store.writes().map_or(0, |w| w.failures())),
                writes: store.writes(),
                unrecorded: AtomicBool::new(false),
                store,
                health,
                lease: Mutex::new(lease),
                config,
                live: RwLock::new(live),
                elsewhere: RwLock::new(elsewhere),
                host,
                waiters: Mutex::new(HashMap::new()),
            }),
        };
        tokio::spawn(engine.clone().follow(changes, shutdown.clone()));
        let sweeper = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        sweeper.check_store().await;
                        sweeper.expire_due().await;
                    }
                    () = shutdown.cancelled() => break,
                }
            }
        });
        Ok(engine)
    }

    fn config(&self) -> Arc<crate::config::Config> {
        self.inner.config.get()
    }

    /// Applies grant changes the store reports from elsewhere (another host sharing it): a
    /// grant issued there becomes usable here, one revoked or expired there ends the
    /// sessions riding on it here, a request decided there wakes whoever waits on it here.
    /// This host's own changes come through too and change nothing. A subscriber that fell
    /// behind reloads the live grants from the store rather than guess.
    async fn follow(
        self,
        mut changes: tokio::sync::broadcast::Receiver<GrantChange>,
        shutdown: CancellationToken,
    ) {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                () = shutdown.cancelled() => return,
            };
            match change {
                Ok(change) => self.apply(change),
                Err(RecvError::Lagged(missed)) => {
                    warn!(
                        missed,
                        "fell behind the store's grant changes; reloading live grants"
                    );
                    if let Err(e) = self.resync().await {
                        warn!(error = %e, "reloading live grants failed");
                    }
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    fn apply(&self, change: GrantChange) {
        match change {
            GrantChange::Issued(grant) => {
                if grant.expires_at <= Timestamp::now() || grant.revoked_at.is_some() {
                    return;
                }
                if !grant.hosts.allows(&self.inner.host) {
                    // Another host's grant: known here, never usable here.
                    self.inner
                        .elsewhere
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(grant.id.clone())
                        .or_insert(*grant);
                    return;
                }
                let mut live = self
                    .inner
                    .live
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if !live.contains_key(&grant.id) {
                    info!(grant = %grant.id, identity = %grant.identity, resource = %grant.resource, "grant issued elsewhere is live here");
                    let (state, _) = watch::channel(GrantState::Active);
                    live.insert(
                        grant.id.clone(),
                        LiveGrant {
                            grant: *grant,
                            state,
                        },
                    );
                }
            }
            GrantChange::Revoked { grant } => self.drop_live(&grant, GrantState::Revoked),
            GrantChange::Expired { grant } => self.drop_live(&grant, GrantState::Expired),
            GrantChange::Decided { request, status } => self.notify(&request, status),
        }
    }

    /// Ends a live grant here without writing anything (the store already recorded it).
    fn drop_live(&self, id: &str, state: GrantState) {
        self.inner
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(l) = self
            .inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
        {
            info!(grant = %id, ?state, "grant ended elsewhere; ending its sessions here");
            l.state.send_replace(state);
        }
    }

    /// The store connection (epoch) this host's live grants were last reloaded on.
    fn synced_epoch(&self) -> u64 {
        self.inner
            .lease
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
    }

    /// With a shared store: after every (re)connection, makes the live set what the store
    /// says (revocations made elsewhere meanwhile apply) before the lease counts as renewed;
    /// once the lease on what this host last confirmed has lapsed, ends every live grant
    /// here (its sessions close as unconfirmed). Runs on the sweeper's tick.
    async fn check_store(&self) {
        self.check_writes().await;
        let Some(health) = &self.inner.health else {
            return;
        };
        let h = health.get();
        let now = std::time::Instant::now();
        let synced = self.synced_epoch();
        if h.epoch != synced && h.available(now) {
            match self.resync().await {
                Ok(()) => {
                    info!(
                        epoch = h.epoch,
                        grants = self.live_count(),
                        "live grants checked against the shared state store"
                    );
                    *self
                        .inner
                        .lease
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Lease {
                        epoch: h.epoch,
                        confirmed: h.confirmed,
                    };
                }
                Err(e) => {
                    warn!(error = %e, "reloading live grants from the shared state store failed; retrying")
                }
            }
        } else if h.epoch == synced {
            self.inner
                .lease
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .confirmed = h.confirmed;
        }
        let lapsed = lease_lapsed(
            self.inner
                .lease
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .confirmed,
            now,
            h.lease,
        );
        if lapsed {
            let ended = self.end_all_live(GrantState::Unconfirmed);
            if ended > 0 {
                warn!(grants = ended, lease = ?h.lease, "shared state store out of reach past store_lease: ending the sessions on grants this host cannot confirm");
            }
        }
    }

    /// Empties the live set, telling each grant's sessions to end as `why` (the grants
    /// themselves stand, and come back with a reload). Returns how many there were.
    fn end_all_live(&self, why: GrantState) -> usize {
        let ended: Vec<LiveGrant> = self
            .inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in &ended {
            l.state.send_replace(why);
        }
        ended.len()
    }

    /// While the store does not keep writes, ends the sessions of every live grant (what
    /// they do could not be recorded) and keeps the live set empty; once it keeps writes
    /// again, reloads the live set from it. Runs on the sweeper's tick, so a session ends
    /// within [`SWEEP_INTERVAL`] of the failure being seen.
    async fn check_writes(&self) {
        let Some(writes) = &self.inner.writes else {
            return;
        };
        // A failure counts even if it cleared before this tick: records were lost.
        let failures = writes.failures();
        let missed = self.inner.writes_seen.swap(failures, Ordering::SeqCst) != failures;
        let cut = writes
            .cuts_sessions()
            .or_else(|| missed.then(|| "a write was not kept".to_owned()));
        if let Some(why) = cut {
            self.inner.unrecorded.store(true, Ordering::SeqCst);
            let ended = self.end_all_live(GrantState::Unrecorded);
            if ended > 0 {
                warn!(grants = ended, error = %why, "the state store does not keep records in time: ending the sessions of every live grant");
            }
        } else if self.inner.unrecorded.load(Ordering::SeqCst) {
            match self.resync().await {
                Ok(()) => {
                    self.inner.unrecorded.store(false, Ordering::SeqCst);
                    info!(
                        grants = self.live_count(),
                        "the state store keeps writes again: live grants reloaded"
                    );
                }
                Err(e) => {
                    warn!(error = %e, "reloading live grants after the store recovered failed; retrying");
                }
            }
        }
    }

    /// `Err` with why, when new sessions and grants must be refused because the store cannot
    /// keep their records, or (fleet mode) the shared store is out of reach (nor can a grant
    /// be confirmed).
    pub fn store_available(&self) -> Result<(), String> {
        if let Some(writes) = &self.inner.writes {
            writes.check().map_err(|e| e.to_string())?;
            if self.inner.unrecorded.load(Ordering::SeqCst) {
                return Err("the state store on this host keeps writes again after a failure; this host is reloading its grants (retry in a moment)".to_owned());
            }
        }
        let Some(health) = &self.inner.health else {
            return Ok(());
        };
        health.check().map_err(|e| e.to_string())?;
        let h = health.get();
        let synced = self.synced_epoch();
        if synced != h.epoch {
            // Reconnected, live grants not yet reloaded: a grant revoked meanwhile may still
            // be in the live set, so nothing new rides on it yet.
            return Err(format!(
                "the shared state store at {} is back; this host is still checking its grants against it (retry in a moment)",
                h.url
            ));
        }
        Ok(())
    }

    /// Makes the live set what the store says it is.
    async fn resync(&self) -> Result<(), EngineError> {
        let stored = self.inner.store.live_grants(Timestamp::now()).await?;
        let keep: std::collections::HashSet<&str> = stored.iter().map(|g| g.id.as_str()).collect();
        let gone: Vec<String> = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.drop_live(&id, GrantState::Revoked);
        }
        self.inner
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| keep.contains(id.as_str()));
        for g in stored {
            self.apply(GrantChange::Issued(Box::new(g)));
        }
        // Requests waited on here that were decided elsewhere while this host could not
        // hear of it (cut off, or its place in the change log pruned away): wake the waiters,
        // as the decision's change would have.
        let waited: Vec<String> = self
            .inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for id in waited {
            if let Some(q) = self.inner.store.request(id.clone()).await?
                && q.status != RequestStatus::Pending
            {
                self.notify(&id, q.status);
            }
        }
        Ok(())
    }

    /// The best live grant covering `identity` (from `task`) on `resource` at `access`: the one
    /// that lasts longest. Task-bound grants only count for their own task.
    pub fn find(
        &self,
        identity: &str,
        task: Option<&str>,
        resource: &str,
        access: Access,
    ) -> Option<GrantHandle> {
        let now = Timestamp::now();
        let live = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        live.values()
            .filter(|l| {
                let g = &l.grant;
                g.identity == identity
                    && g.resource == resource
                    && g.access >= access
                    && g.expires_at > now
                    && g.task.as_deref().is_none_or(|t| Some(t) == task)
                    && g.hosts.allows(&self.inner.host)
                    && *l.state.borrow() == GrantState::Active
            })
            .max_by_key(|l| l.grant.expires_at)
            .map(|l| GrantHandle {
                id: l.grant.id.clone(),
                access: l.grant.access,
                expires_at: l.grant.expires_at,
                state: l.state.subscribe(),
            })
    }

    /// A live grant that would cover `identity` (from `task`) on `resource` at `access` but is
    /// scoped to other hosts: what a refusal here names (the grant is never usable here).
    pub fn scoped_elsewhere(
        &self,
        identity: &str,
        task: Option<&str>,
        resource: &str,
        access: Access,
    ) -> Option<Grant> {
        let now = Timestamp::now();
        self.inner
            .elsewhere
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|g| {
                g.identity == identity
                    && g.resource == resource
                    && g.access >= access
                    && g.expires_at > now
                    && g.task.as_deref().is_none_or(|t| Some(t) == task)
            })
            .max_by_key(|g| g.expires_at)
            .cloned()
    }

    /// This host's name in grant scopes.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// Files a request by `actor` for `identity` (from `task`). Who may ask for whom is the
    /// control service's decision (`control::authz`), made before this is called.
    pub async fn file(
        &self,
        actor: Actor,
        identity: &str,
        task: Option<&str>,
        spec: RequestSpec,
    ) -> Result<Request, EngineError> {
        let config = self.config();
        self.file_for(&config, actor, identity, task, spec).await
    }

    /// Files a request for a held connection: the workload asks by connecting.
    pub async fn file_for_connection(
        &self,
        workload: &Attribution,
        uid: u32,
        resource: &str,
    ) -> Result<Request, EngineError> {
        let config = self.config();
        let Some(r) = config.resource(resource) else {
            return Err(EngineError::NotFound(format!(
                "`{resource}` is not configured"
            )));
        };
        let spec = RequestSpec {
            resource: resource.to_owned(),
            access: Some(r.request_access),
            ttl: Some(r.request_ttl),
            reason: "connection held until a decision".into(),
            for_identity: None,
            task: None,
            hosts: None,
        };
        let actor = Actor {
            uid,
            user: identity::user_name(uid),
            identity: Some(workload.identity.clone()),
            task: workload.task.clone(),
        };
        self.file_for(
            &config,
            actor,
            &workload.identity,
            workload.task.as_deref(),
            spec,
        )
        .await
    }

    async fn file_for(
        &self,
        config: &crate::config::Config,
        actor: Actor,
        identity: &str,
        task: Option<&str>,
        spec: RequestSpec,
    ) -> Result<Request, EngineError> {
        // A store that does not keep writes takes no request (nor issues a grant) that could
        // not be recorded whole, even where this one write would fit.
        if let Some(writes) = &self.inner.writes {
            writes.check()?;
        }
        let access = spec.access.unwrap_or_default();
        let resource = spec.resource.clone();
        let cap = policy::max_ttl(config, identity, &resource, access);
        let ttl = spec.ttl.unwrap_or_else(|| {
            cap.map_or(config.daemon.default_ttl, |c| {
                c.min(config.daemon.default_ttl)
            })
        });
        let verdict = policy::evaluate(config, identity, &resource, access, ttl);
        let label = actor_label(&actor);
        let refuse = |reason: String| {
            let event = Event::RequestRefused(RequestRefused {
                identity: identity.to_owned(),
                resource: resource.clone(),
                access,
                ttl_secs: ttl.as_secs(),
                task: task.map(str::to_owned),
                reason: reason.clone(),
            });
            let store = self.inner.store.clone();
            let label = label.clone();
            async move {
                store.append_audit(label, event).await?;
                Err::<Request, _>(EngineError::Refused(reason))
            }
        };
        let policy_name = match &verdict {
            policy::Verdict::Refused { reason } => return refuse(reason.clone()).await,
            policy::Verdict::Auto { policy } | policy::Verdict::Manual { policy, .. } => {
                policy.clone()
            }
        };
        let hosts = match self.scope_of_request(
            config,
            &policy_name,
            identity,
            &resource,
            access,
            task,
            spec.hosts.as_ref(),
        ) {
            Ok(hosts) => hosts,
            Err(reason) => return refuse(reason).await,
        };

        // One pending request per (identity, task, resource, access): asking again (or
        // connecting again while held) joins the request already waiting.
        let existing = self
            .inner
            .store
            .pending_request(RequestKey {
                identity: identity.to_owned(),
                task: task.map(str::to_owned),
                resource: resource.clone(),
                access,
            })
            .await?;
        if let Some(q) = existing {
            return Ok(q);
        }

        let now = Timestamp::now();
        let mut request = Request {
            id: ids::new(ids::Kind::Request),
            identity: identity.to_owned(),
            resource: resource.clone(),
            access,
            ttl,
            reason: spec.reason.clone(),
            task: task.map(str::to_owned),
            requested_by: actor.clone(),
            created_at: now,
            status: RequestStatus::Pending,
            policy: policy_name.clone(),
            decided_by: None,
            decided_at: None,
            decision_reason: None,
            approvals: Vec::new(),
            grant: None,
            statement: None,
            session: None,
            needs: needs_of(config, identity, &resource, access),
            host: Some(self.inner.host.clone()),
            hosts: Some(hosts.clone()),
        };
        if matches!(verdict, policy::Verdict::Auto { .. }) {
            let grant =
                self.new_grant(&request, ttl, format!("auto (policy {policy_name})"), hosts);
            request.status = RequestStatus::Approved;
            request.decided_at = Some(now);
            request.decision_reason = Some(format!("auto-approved by policy {policy_name}"));
            request.grant = Some(grant.id.clone());
            self.inner
                .store
                .file_approved(request.clone(), grant.clone(), label)
                .await?;
            info!(request = %request.id, grant = %grant.id, identity, resource = %resource, %access, "auto-approved");
            self.activate(grant);
        } else {
            self.file_pending(&request, label).await?;
            info!(request = %request.id, identity, resource = %resource, %access, "request pending approval");
        }
        Ok(request)
    }

    /// Stores a pending request with its audit entry, then lets waiters wait on it.
    async fn file_pending(&self, request: &Request, label: String) -> Result<(), EngineError> {
        self.inner
            .store
            .file_request(request.clone(), label)
            .await?;
        let (tx, _) = watch::channel(RequestStatus::Pending);
        self.inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request.id.clone(), tx);
        Ok(())
    }

    /// Where a grant for this request may be used, as filed here: the scope of `policy`
    /// (the one the request is filed under) from this host, narrowed by what the request
    /// asks (`asked`, which may not widen it), and by the task for a task-bound grant (a task
    /// runs on one host). `Err` says why the request is refused.
    #[expect(clippy::too_many_arguments, reason = "the facts of a request")]
    fn scope_of_request(
        &self,
        config: &crate::config::Config,
        policy: &str,
        identity: &str,
        resource: &str,
        access: Access,
        task: Option<&str>,
        asked: Option<&HostsSpec>,
    ) -> Result<HostScope, String> {
        let host = self.inner.host.as_str();
        let spec = policy::hosts_of(config, policy, identity, resource, access);
        let allowed = spec.resolve(host);
        let mut scope = match asked {
            None => allowed.clone(),
            Some(asked) => {
                let asked = asked.resolve(host);
                if !allowed.contains(&asked) {
                    return Err(format!(
                        "policy {policy} lets grants of {identity} on {resource} be used on {} (hosts = \"{spec}\"), not on {asked}; ask for those hosts or fewer (--hosts requesting for this host, {host})",
                        describe(&allowed, host),
                    ));
                }
                asked
            }
        };
        if task.is_some() {
            scope = scope.intersect(&HostScope::Hosts(vec![host.to_owned()]));
        }
        if scope.is_empty() {
            return Err(format!(
                "a grant to {identity} on {resource} under policy {policy} would be usable on no host: the policy scopes it to {}{}, which leaves out this host ({host}); ask from one of those hosts, or have the operator add {host} to the policy's hosts",
                describe(&allowed, host),
                if task.is_some() {
                    " and a task-bound grant is usable only on its task's host"
                } else {
                    ""
                },
            ));
        }
        Ok(scope)
    }

    fn new_grant(
        &self,
        request: &Request,
        ttl: Duration,
        approved_by: String,
        hosts: HostScope,
    ) -> Grant {
        let now = Timestamp::now();
        Grant {
            id: ids::new(ids::Kind::Grant),
            request: request.id.clone(),
            identity: request.identity.clone(),
            resource: request.resource.clone(),
            access: request.access,
            task: request.task.clone(),
            created_at: now,
            expires_at: now.plus(ttl),
            approved_by,
            policy: request.policy.clone(),
            reason: request.reason.clone(),
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            hosts,
        }
    }

    fn activate(&self, grant: Grant) {
        if !grant.hosts.allows(&self.inner.host) {
            // Approved here for another host: known here, usable only there.
            self.inner
                .elsewhere
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(grant.id.clone(), grant);
            return;
        }
        // The store's change feed may have put it in first: keep that entry, whose state
        // channel sessions may already hold.
        self.inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(grant.id.clone())
            .or_insert_with(|| LiveGrant {
                grant,
                state: watch::channel(GrantState::Active).0,
            });
    }

    /// Files a request to run one statement a guardrail holds for approval. The session waits
    /// on it with [`Self::wait`].
    #[expect(clippy::too_many_arguments, reason = "the facts of a held statement")]
    pub async fn file_statement(
        &self,
        workload: &Attribution,
        uid: u32,
        resource: &str,
        access: Access,
        session: &str,
        statement: &str,
        rule: &str,
        reason: &str,
    ) -> Result<Request, EngineError> {
        let config = self.config();
        if policy::approvers_for(&config, &workload.identity, resource, access).is_empty() {
            return Err(EngineError::Refused(format!(
                "guardrail \"{rule}\" holds this statement for approval, but no policy names approvers for {} on {resource}",
                workload.identity
            )));
        }
        let actor = Actor {
            uid,
            user: identity::user_name(uid),
            identity: Some(workload.identity.clone()),
            task: workload.task.clone(),
        };
        let request = Request {
            id: ids::new(ids::Kind::Request),
            identity: workload.identity.clone(),
            resource: resource.to_owned(),
            access,
            ttl: Duration::ZERO,
            reason: reason.to_owned(),
            task: workload.task.clone(),
            requested_by: actor.clone(),
            created_at: Timestamp::now(),
            status: RequestStatus::Pending,
            policy: format!("guardrail {rule}"),
            decided_by: None,
            decided_at: None,
            decision_reason: None,
            approvals: Vec::new(),
            grant: None,
            statement: Some(statement.to_owned()),
            session: Some(session.to_owned()),
            needs: needs_of(&config, &workload.identity, resource, access),
            host: Some(self.inner.host.clone()),
            hosts: None,
        };
        self.file_pending(&request, actor_label(&actor)).await?;
        info!(request = %request.id, identity = %workload.identity, resource, rule, "statement held for approval");
        Ok(request)
    }

    async fn approve_statement(
        &self,
        caller: &Caller,
        request: Request,
    ) -> Result<Approved, EngineError> {
        if let Recorded::More(now) = self.record_approval(caller, &request, request.ttl).await? {
            return Ok(Approved {
                request: now,
                grant: None,
            });
        }
        let by = caller.actor();
        let label = actor_label(&by);
        let id = request.id.clone();
        let decided = match self
            .inner
            .store
            .approve_statement(id.clone(), by, label)
            .await?
        {
            Decided::Done(q) => *q,
            Decided::NotPending | Decided::TaskEnded => return Err(decided_meanwhile(&id)),
        };
        info!(request = %id, approver = %caller.user, "statement approved");
        metrics::approval_decided("statement", "approved", request.created_at);
        self.notify(&id, RequestStatus::Approved);
        Ok(Approved {
            request: decided,
            grant: None,
        })
    }

    /// One approval where the policy asks for several (`approvals`, `approvals_from`): it is
    /// recorded, and the caller decides only with the last. A grant request and a held
    /// statement go through the same rule: the statement is the high-impact action the
    /// policy protects.
    async fn record_approval(
        &self,
        caller: &Caller,
        request: &Request,
        ttl: Duration,
    ) -> Result<Recorded, EngineError> {
        let id = request.id.as_str();
        let config = self.config();
        let (here, from_here) = policy::approvals_needed(
            &config,
            &request.identity,
            &request.resource,
            request.access,
        );
        // What the request was filed under counts too (another host's policy, or this
        // host's before a reload): the stricter of both.
        let mut named: Vec<String> = from_here.iter().map(ToString::to_string).collect();
        let mut needed = here;
        if let Some(n) = &request.needs {
            needed = needed.max(n.approvals);
            for p in &n.from {
                if !named.contains(p) {
                    named.push(p.clone());
                }
            }
        }
        needed = needed.max(u32::try_from(named.len()).unwrap_or(u32::MAX));
        if needed <= 1 && named.is_empty() {
            return Ok(Recorded::Enough);
        }
        let approval = Approval {
            by: actor_label(&caller.actor()),
            // A person of the console counts as their unix account too (if they have
            // one): approving once on each side is still one person.
            uid: caller
                .person
                .as_ref()
                .map_or(caller.uid, |p| p.unix_uid.unwrap_or(identity::WEB_UID)),
            account: match &caller.person {
                Some(p) => p.unix_account.clone(),
                None => Some(caller.unix_name().to_owned()),
            },
            at: Timestamp::now(),
            covers: named
                .iter()
                .filter(|p| {
                    p.parse::<crate::config::Principal>()
                        .is_ok_and(|p| caller.is_named(std::slice::from_ref(&p)))
                })
                .cloned()
                .collect(),
            ttl_secs: Some(ttl.as_secs()),
        };
        let now = match self
            .inner
            .store
            .add_approval(id.to_owned(), approval, needed)
            .await
        {
            Ok(Decided::Done(q)) => *q,
            Ok(Decided::NotPending) => return Err(decided_meanwhile(id)),
            Ok(Decided::TaskEnded) => {
                return Err(EngineError::Conflict(format!(
                    "request {id} was for task {}, which has ended",
                    request.task.clone().unwrap_or_default()
                )));
            }
            Err(StoreError::Invalid(why)) => return Err(EngineError::Conflict(why)),
            Err(e) => return Err(e.into()),
        };
        let covers: Vec<Vec<String>> = now.approvals.iter().map(|a| a.covers.clone()).collect();
        if now.approvals.len() < needed as usize
            || !policy::each_covered_by_a_different_approval(&named, &covers)
        {
            info!(request = %id, approver = %caller.user, approvals = now.approvals.len(), needed, "approval recorded; more needed");
            return Ok(Recorded::More(now));
        }
        // Each approver agreed to a duration: the grant gets the shortest of them.
        // An approval recorded without one (an older agent) agreed to the request's.
        let ttl = now
            .approvals
            .iter()
            .map(|a| a.ttl_secs.map_or(request.ttl, Duration::from_secs))
            .fold(ttl, Duration::min);
        Ok(Recorded::Last { now, ttl })
    }

    /// Where the grant approving `request` may be used: what it was filed for (its host's
    /// policy, narrowed by the request), narrowed again by this host's policy seen from the
    /// requesting host (hosts may run different policies during a rollout; the stricter
    /// wins), and to the requesting host for a task-bound grant.
    fn scope_of_approval(
        &self,
        config: &crate::config::Config,
        request: &Request,
    ) -> Result<HostScope, EngineError> {
        // A request without a host is from before hosts were kept: the embedded store's
        // (the only host) or this host's view of it.
        let requesting = request.host.as_deref().unwrap_or(&self.inner.host);
        let here = policy::hosts_of(
            config,
            &request.policy,
            &request.identity,
            &request.resource,
            request.access,
        )
        .resolve(requesting);
        let mut scope = match &request.hosts {
            Some(filed) => filed.intersect(&here),
            None => here,
        };
        if request.task.is_some() {
            scope = scope.intersect(&HostScope::Hosts(vec![requesting.to_owned()]));
        }
        if scope.is_empty() {
            return Err(EngineError::Invalid(format!(
                "request {} was filed on {requesting} for use on {}, and this host's policy allows none of those hosts; approve it on a host whose policy {} allows them, or deny it",
                request.id,
                request
                    .hosts
                    .as_ref()
                    .map_or_else(|| requesting.to_owned(), ToString::to_string),
                request.policy
            )));
        }
        Ok(scope)
    }

    /// Request `id` if it still waits for a decision; else why not.
    pub async fn pending(&self, id: &str) -> Result<Request, EngineError> {
        let request = self
            .inner
            .store
            .request(id.to_owned())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no request {id}")))?;
        if request.status != RequestStatus::Pending {
            let by = request
                .decided_by
                .as_ref()
                .map_or_else(String::new, |a| format!(" by {a}"));
            return Err(EngineError::Conflict(format!(
                "request {id} is already {}{by}",
                request.status
            )));
        }
        Ok(request)
    }

    /// Approves a pending request (as read by [`Self::pending`]), optionally with a shorter
    /// (or, within policy, longer) ttl. That `caller` may approve it is the control service's
    /// decision, made before this is called.
    pub async fn approve(
        &self,
        caller: &Caller,
        request: Request,
        ttl: Option<Duration>,
    ) -> Result<Approved, EngineError> {
        // Nothing is issued that could not be recorded whole (see `file_for`).
        if let Some(writes) = &self.inner.writes {
            writes.check()?;
        }
        let id = request.id.clone();
        let id = id.as_str();
        if request.statement.is_some() {
            return self.approve_statement(caller, request).await;
        }
        let config = self.config();
        let mut ttl = ttl.unwrap_or(request.ttl);
        let cap = policy::max_ttl(
            &config,
            &request.identity,
            &request.resource,
            request.access,
        )
        .unwrap_or_default();
        if ttl > cap {
            return Err(EngineError::Invalid(format!(
                "a ttl of {} is longer than policy allows here ({}); approve with --ttl {} or less",
                human_duration(ttl),
                human_duration(cap),
                human_duration(cap)
            )));
        }
        // A policy may ask for several approvers: record this one, and issue the grant only
        // with the last.
        let mut approved_by = caller.user.clone();
        match self.record_approval(caller, &request, ttl).await? {
            Recorded::Enough => {}
            Recorded::More(now) => {
                return Ok(Approved {
                    request: now,
                    grant: None,
                });
            }
            Recorded::Last { now, ttl: agreed } => {
                approved_by = approvers_of(&now);
                ttl = agreed;
            }
        }
        let hosts = self.scope_of_approval(&config, &request)?;
        let approver = caller.actor();
        let grant = self.new_grant(&request, ttl, approved_by, hosts);
        let approval = GrantApproval {
            grant: grant.clone(),
            actor: actor_label(&approver),
            approver,
            ttl_secs: ttl.as_secs(),
        };
        let decided = match self.inner.store.approve_request(approval).await? {
            Decided::Done(q) => *q,
            Decided::NotPending => return Err(decided_meanwhile(id)),
            Decided::TaskEnded => {
                return Err(EngineError::Conflict(format!(
                    "request {id} was for task {}, which has ended",
                    request.task.unwrap_or_default()
                )));
            }
        };
        info!(request = %id, grant = %grant.id, approver = %caller.user, "approved");
        metrics::approval_decided("grant", "approved", request.created_at);
        self.activate(grant.clone());
        self.notify(id, RequestStatus::Approved);
        let request = decided;
        Ok(Approved {
            request,
            grant: Some(grant),
        })
    }

    /// Denies a pending request (as read by [`Self::pending`]). Who may (its approvers, and
    /// the requester withdrawing their own) is the control service's decision.
    pub async fn deny(
        &self,
        caller: &Caller,
        request: Request,
        reason: Option<String>,
    ) -> Result<Request, EngineError> {
        let id = request.id.clone();
        let id = id.as_str();
        let by = caller.actor();
        let label = actor_label(&by);
        let decided = match self
            .inner
            .store
            .deny_request(id.to_owned(), by, label, reason)
            .await?
        {
            Decided::Done(q) => *q,
            Decided::NotPending | Decided::TaskEnded => return Err(decided_meanwhile(id)),
        };
        info!(request = %id, by = %caller.user, "denied");
        let kind = if request.statement.is_some() {
            "statement"
        } else {
            "grant"
        };
        metrics::approval_decided(kind, "denied", request.created_at);
        self.notify(id, RequestStatus::Denied);
        Ok(decided)
    }

    /// The live grant `id`; else why it cannot be revoked.
    pub async fn live_grant(&self, id: &str) -> Result<Grant, EngineError> {
        let grant = {
            let live = self
                .inner
                .live
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            live.get(id).map(|l| l.grant.clone())
        };
        if let Some(grant) = grant {
            return Ok(grant);
        }
        // Scoped to other hosts: revocable from anywhere in the fleet.
        let there = self
            .inner
            .elsewhere
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned();
        if let Some(grant) = there
            && grant.expires_at > Timestamp::now()
        {
            return Ok(grant);
        }
        let stored = self.inner.store.grant(id.to_owned()).await?;
        Err(match stored {
            Some(g) => EngineError::Conflict(format!(
                "grant {id} is already {}",
                g.status(Timestamp::now())
            )),
            None => EngineError::NotFound(format!("no grant {id}")),
        })
    }

    /// Revokes a live grant (as read by [`Self::live_grant`]): every session riding on it
    /// closes. That `caller` may is the control service's decision.
    pub async fn revoke(
        &self,
        caller: &Caller,
        grant: Grant,
        reason: Option<String>,
    ) -> Result<Grant, EngineError> {
        let id = grant.id.clone();
        let id = id.as_str();
        let reason = reason.unwrap_or_else(|| "revoked".into());
        self.end_grant(
            id,
            &actor_label(&caller.actor()),
            &reason,
            GrantState::Revoked,
        )
        .await?;
        info!(grant = %id, by = %caller.user, "revoked");
        Ok(self
            .inner
            .store
            .grant(id.to_owned())
            .await?
            .unwrap_or(grant))
    }

    /// Ends a live grant (revocation or expiry): durable first, then sessions are told.
    async fn end_grant(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        state: GrantState,
    ) -> Result<(), EngineError> {
        let store = &self.inner.store;
        match state {
            GrantState::Revoked => {
                store
                    .revoke_grant(id.to_owned(), by.to_owned(), reason.to_owned())
                    .await?;
            }
            _ => store.expire_grant(id.to_owned()).await?,
        }
        self.inner
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(l) = self
            .inner
            .live
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
        {
            l.state.send_replace(state);
        }
        Ok(())
    }

    async fn expire_due(&self) {
        let now = Timestamp::now();
        // Another host's grants are expired (and recorded) by that host; here they are only
        // forgotten.
        self.inner
            .elsewhere
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, g| g.expires_at > now);
        let due: Vec<String> = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|l| l.grant.expires_at <= now)
            .map(|l| l.grant.id.clone())
            .collect();
        for id in due {
            match self
                .end_grant(&id, "jitgated", "expired", GrantState::Expired)
                .await
            {
                Ok(()) => info!(grant = %id, "expired"),
                Err(e) => {
                    // Cut the sessions anyway: the grant's time is up whatever the store says.
                    warn!(grant = %id, error = %e, "could not record expiry; ending sessions regardless");
                    if let Some(l) = self
                        .inner
                        .live
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&id)
                    {
                        l.state.send_replace(GrantState::Expired);
                    }
                }
            }
        }
    }

    /// After a reload: ends every live grant that the configuration no longer allows (its
    /// identity, resource or every policy covering it removed), and with it every session
    /// riding on it. Returns the grants ended.
    pub async fn end_unauthorized(&self) -> Result<Vec<String>, EngineError> {
        let config = self.config();
        let allowed = |g: &Grant| {
            config.workloads.iter().any(|w| w.identity == g.identity)
                && config.resource(&g.resource).is_some()
                && policy::max_ttl(&config, &g.identity, &g.resource, g.access).is_some()
        };
        let orphaned: Vec<String> = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|l| !allowed(&l.grant))
            .map(|l| l.grant.id.clone())
            .collect();
        for id in &orphaned {
            self.end_grant(
                id,
                "jitgated",
                "no policy allows it since the last configuration reload",
                GrantState::Revoked,
            )
            .await?;
            info!(grant = %id, "revoked: the reloaded configuration no longer allows it");
        }
        Ok(orphaned)
    }

    /// A task's process tree is gone: its grants end and its pending requests lapse.
    pub async fn task_ended(&self, task: &str) -> Result<(), EngineError> {
        let bound: Vec<String> = self
            .inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|l| l.grant.task.as_deref() == Some(task))
            .map(|l| l.grant.id.clone())
            .collect();
        for id in bound {
            self.end_grant(
                &id,
                "jitgated",
                &format!("task {task} ended"),
                GrantState::Revoked,
            )
            .await?;
            info!(grant = %id, task, "revoked: task ended");
        }
        let lapsed = self
            .inner
            .store
            .expire_task_requests(task.to_owned())
            .await?;
        for id in lapsed {
            self.notify(&id, RequestStatus::Expired);
        }
        Ok(())
    }

    /// Marks a request that is still pending as expired: no one decided it in time, or the
    /// session whose statement it holds ended. A later `jitgate approve` then says so instead
    /// of approving what no longer waits. Returns whether it was still pending.
    pub async fn lapse(&self, id: &str, why: &str) -> Result<bool, EngineError> {
        let lapsed = self
            .inner
            .store
            .expire_request(id.to_owned(), why.to_owned())
            .await?;
        if lapsed {
            self.notify(id, RequestStatus::Expired);
        }
        Ok(lapsed)
    }

    fn notify(&self, id: &str, status: RequestStatus) {
        if let Some(tx) = self
            .inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
        {
            tx.send_replace(status);
        }
    }

    /// Waits until request `id` is decided or `timeout` passes; returns it as it then stands.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Request, EngineError> {
        let rx = {
            let mut waiters = self
                .inner
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            waiters
                .entry(id.to_owned())
                .or_insert_with(|| watch::channel(RequestStatus::Pending).0)
                .subscribe()
        };
        let current = self
            .inner
            .store
            .request(id.to_owned())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no request {id}")))?;
        if current.status != RequestStatus::Pending {
            self.inner
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
            return Ok(current);
        }
        let mut rx = rx;
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s != RequestStatus::Pending)).await;
        self.inner
            .store
            .request(id.to_owned())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no request {id}")))
    }

    pub async fn request(&self, id: &str) -> Result<Option<Request>, EngineError> {
        Ok(self.inner.store.request(id.to_owned()).await?)
    }

    /// Pending requests, oldest first (the control service filters what a caller may see).
    pub async fn approvals(&self) -> Result<Vec<Request>, EngineError> {
        let mut pending = self
            .inner
            .store
            .requests(Some(RequestStatus::Pending), 1000)
            .await?;
        pending.reverse();
        Ok(pending)
    }

    /// Live grants, or all recent ones with `all` (the control service filters what a
    /// caller may see).
    pub async fn grants(&self, all: bool) -> Result<Vec<Grant>, EngineError> {
        let grants = if all {
            self.inner.store.grants(1000).await?
        } else {
            let mut live: Vec<Grant> = self
                .inner
                .live
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .map(|l| l.grant.clone())
                .collect();
            let now = Timestamp::now();
            live.extend(
                self.inner
                    .elsewhere
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .filter(|g| g.expires_at > now)
                    .cloned(),
            );
            live.sort_by_key(|g| g.created_at);
            live
        };
        Ok(grants)
    }

    pub fn live_count(&self) -> usize {
        self.inner
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A scope for people, with this host named as such: `host-a (this host)`, `fleet`.
pub fn describe(scope: &HostScope, this_host: &str) -> String {
    match scope {
        HostScope::Hosts(e) if e.len() == 1 && e[0] == this_host => {
            format!("{this_host} (this host)")
        }
        other => other.to_string(),
    }
}

/// Whether a lease confirmed at `confirmed` (never: `None`) has run out at `now`.
fn lease_lapsed(
    confirmed: Option<std::time::Instant>,
    now: std::time::Instant,
    lease: Duration,
) -> bool {
    confirmed.is_none_or(|at| now.saturating_duration_since(at) > lease)
}

fn decided_meanwhile(id: &str) -> EngineError {
    EngineError::Conflict(format!("request {id} was decided meanwhile"))
}

#[cfg(test)]
mod tests;
