//! The control service: one typed method per control call, each taking the authenticated
//! [`Caller`]. Front ends (the Unix socket in [`super::server`]; a web console and webhooks
//! later) only establish who calls, decode the call and encode the answer: what a call does
//! and who may make it are decided here, the latter in [`super::authz`].
//!
//! The service reaches the rest of the agent through what it is given at construction: the
//! grant engine, the state store, the live configuration, and three narrow handles
//! ([`TaskLauncher`], [`SessionCounts`], [`Host`]) that the daemon implements, so that
//! nothing here depends on how the agent is put together.

use std::{path::PathBuf, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{
    api::{SessionDetail, StatusReport},
    authz,
    recording::{self, Recording, RecordingError},
};
use crate::{
    config::SharedConfig,
    grants::{Approved, EngineError, GrantEngine, RequestSpec},
    identity::Caller,
    model::{AuditEvent, Grant, Request, Session, Timestamp},
    store::{SharedStore, StoreError, audit},
    tasks::{RunSpec, Started, Tasks},
};

/// Longest a `wait` call may block.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Why a control call failed. Each variant's text is the message the caller sees; [`Self::code`]
/// is how front ends classify it (the CLI maps it to an exit code).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// No such request, grant, session or identity.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Policy refuses it.
    #[error("{0}")]
    Refused(String),
    /// The thing is not in a state that allows it (already decided, already revoked).
    #[error("{0}")]
    Conflict(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration file was not taken (the running one stays).
    #[error("{0:#}")]
    ReloadRejected(anyhow::Error),
    /// Detaching the gate failed.
    #[error("{0:#}")]
    Detach(anyhow::Error),
    /// Something on the daemon's side could not be read (a recording).
    #[error("{0}")]
    Internal(String),
    /// Policy asks the approver for a fresher or stronger sign-in to the web console than
    /// theirs (step-up): the console sends them to sign in again with what `step_up` says.
    #[error("{message}")]
    SignInAgain {
        message: String,
        step_up: crate::config::StepUp,
    },
}

impl ControlError {
    pub fn code(&self) -> super::api::ErrorCode {
        use super::api::ErrorCode;
        match self {
            Self::Invalid(_) | Self::ReloadRejected(_) => ErrorCode::Invalid,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Forbidden(_) | Self::SignInAgain { .. } => ErrorCode::Forbidden,
            Self::Refused(_) => ErrorCode::Refused,
            Self::Conflict(_) => ErrorCode::Conflict,
            Self::Store(_) | Self::Detach(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<EngineError> for ControlError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::NotFound(m) => Self::NotFound(m),
            EngineError::Refused(m) => Self::Refused(m),
            EngineError::Conflict(m) => Self::Conflict(m),
            EngineError::Invalid(m) => Self::Invalid(m),
            EngineError::Store(e) => Self::Store(e),
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// What a reload did (`jitgate reload`, and the `config.reloaded` audit record).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadSummary {
    /// The file read.
    pub config: String,
    /// Grants ended because the new configuration no longer allows them.
    pub grants_revoked: Vec<String>,
    /// Resources configured now.
    pub resources: Vec<String>,
    /// Keys the file changed that only change on restart (their running values stay).
    pub restart_required_for: Vec<String>,
    /// Sessions ended because their resource was removed.
    pub sessions_ended: usize,
}

/// What `jitgate gate detach` gets back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Detached {
    pub at: Timestamp,
    /// Pinned objects removed.
    pub removed: Vec<String>,
}

/// Starts `jitgate run` tasks (the daemon's [`Tasks`]).
pub trait TaskLauncher: Send + Sync {
    /// Starts the task; the caller is already authorized.
    fn launch<'a>(
        &'a self,
        caller: &'a Caller,
        spec: RunSpec,
    ) -> BoxFuture<'a, Result<Started, EngineError>>;
}

impl TaskLauncher for Tasks {
    fn launch<'a>(
        &'a self,
        caller: &'a Caller,
        spec: RunSpec,
    ) -> BoxFuture<'a, Result<Started, EngineError>> {
        Box::pin(self.run(caller, spec))
    }
}

/// Live byte counts of open sessions (the proxy's registry).
pub trait SessionCounts: Send + Sync {
    /// Bytes (up, down) relayed so far by open session `id`; `None` once it ended.
    fn bytes(&self, id: &str) -> Option<(u64, u64)>;
}

/// The running agent as a whole: its state, reloading its configuration, removing the gate.
pub trait Host: Send + Sync {
    /// What `jitgate status` reports, for `caller`.
    fn status<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, StatusReport>;
    /// Re-reads the configuration file; an invalid file changes nothing.
    fn reload(&self) -> BoxFuture<'_, anyhow::Result<ReloadSummary>>;
    /// Removes the gate from the kernel, then stops the agent; returns what was removed.
    fn detach(&self) -> anyhow::Result<Vec<PathBuf>>;
}

/// What the service is built from.
pub struct Parts {
    pub config: SharedConfig,
    pub engine: GrantEngine,
    pub store: SharedStore,
    pub tasks: Arc<dyn TaskLauncher>,
    pub sessions: Arc<dyn SessionCounts>,
    pub host: Arc<dyn Host>,
}

/// The control API, whatever carries it. Cheap to clone.
#[derive(Clone)]
pub struct ControlService {
    inner: Arc<Parts>,
}

impl ControlService {
    pub fn new(parts: Parts) -> Self {
        Self {
            inner: Arc::new(parts),
        }
    }

    fn config(&self) -> Arc<crate::config::Config> {
        self.inner.config.get()
    }

    /// The state store, for the API tokens' calls ([`super::tokens`]).
    pub(super) fn store(&self) -> &SharedStore {
        &self.inner.store
    }

    /// The agent's state. Anyone local may ask (see [`authz::may_read_status`]).
    pub async fn status(&self, caller: &Caller) -> Result<StatusReport> {
        authz::may_read_status(&self.config(), caller)?;
        Ok(self.inner.host.status(caller).await)
    }

    /// Files a request for access (see [`authz::requester`] for whom).
    pub async fn request(&self, caller: &Caller, spec: RequestSpec) -> Result<Request> {
        let (identity, task) = authz::requester(&self.config(), caller, &spec)?;
        Ok(self
            .inner
            .engine
            .file(caller.actor(), &identity, task.as_deref(), spec)
            .await?)
    }

    /// Waits (at most `timeout`, capped at [`MAX_WAIT`]) for request `id`'s decision.
    pub async fn wait(&self, caller: &Caller, id: &str, timeout: Duration) -> Result<Request> {
        let timeout = timeout.min(MAX_WAIT);
        if let Some(request) = self.inner.engine.request(id).await? {
            authz::may_wait(caller, &request)?;
        }
        let reader = authz::reads_held_statements(&self.config(), caller);
        let mut request = self.inner.engine.wait(id, timeout).await?;
        if !reader {
            request.statement = None;
        }
        Ok(request)
    }

    /// Requests waiting for a decision, oldest first.
    pub async fn approvals(&self, caller: &Caller) -> Result<Vec<Request>> {
        let scope =
            authz::own_or_operators(&self.config(), caller, "list requests waiting for approval")?;
        let mut pending = self.inner.engine.approvals().await?;
        pending.retain(|q| scope.covers(Some(&q.identity)));
        Ok(pending)
    }

    /// Running `jitgate run` tasks (for their command lines beside their requests): for
    /// operators.
    pub async fn running_tasks(&self, caller: &Caller) -> Result<Vec<crate::model::Task>> {
        authz::operators_only(&self.config(), caller, "list running tasks")?;
        Ok(self.inner.store.running_tasks().await?)
    }

    pub async fn approve(
        &self,
        caller: &Caller,
        id: &str,
        ttl: Option<Duration>,
    ) -> Result<Approved> {
        let request = self.inner.engine.pending(id).await?;
        let config = self.config();
        authz::may_decide(&config, caller, &request)?;
        let now = u64::try_from(Timestamp::now().millis() / 1000).unwrap_or(0);
        authz::step_up_met(&config, caller, &request, now)?;
        Ok(self.inner.engine.approve(caller, request, ttl).await?)
    }

    pub async fn deny(&self, caller: &Caller, id: &str, reason: Option<String>) -> Result<Request> {
        let request = self.inner.engine.pending(id).await?;
        authz::may_deny(&self.config(), caller, &request)?;
        Ok(self.inner.engine.deny(caller, request, reason).await?)
    }

    /// Live grants, or all recent ones with `all`.
    pub async fn grants(&self, caller: &Caller, all: bool) -> Result<Vec<Grant>> {
        let scope = authz::grants_scope(&self.config(), caller)?;
        let mut grants = self.inner.engine.grants(all).await?;
        grants.retain(|g| scope.covers(Some(&g.identity)));
        Ok(grants)
    }

    pub async fn revoke(&self, caller: &Caller, id: &str, reason: Option<String>) -> Result<Grant> {
        let grant = self.inner.engine.live_grant(id).await?;
        authz::may_revoke(&self.config(), caller, &grant)?;
        Ok(self.inner.engine.revoke(caller, grant, reason).await?)
    }

    /// Recent sessions (open ones only unless `all`), newest first, at most `limit`.
    pub async fn sessions(&self, caller: &Caller, all: bool, limit: usize) -> Result<Vec<Session>> {
        let config = self.config();
        let scope = authz::sessions_scope(&config, caller)?;
        let limit = limit.clamp(1, 10_000);
        let mut sessions = self.inner.store.sessions(!all, limit).await?;
        sessions.retain(|s| authz::sees_session(&config, caller, &scope, s));
        for s in &mut sessions {
            self.live_bytes(s);
        }
        Ok(sessions)
    }

    /// One session with its statements from `from` on (a page of at most
    /// [`SESSION_PAGE_BYTES`] of them: a workload can record far more than one reply may
    /// carry, and its session must still be shown) and its audit events.
    pub async fn session(&self, caller: &Caller, id: &str, from: u32) -> Result<SessionDetail> {
        let found = self
            .inner
            .store
            .session_history(id.to_owned())
            .await?
            .map(|h| {
                let (statements, more_from) = page_of(h.statements, from);
                SessionDetail {
                    session: h.session,
                    statements,
                    events: h.events,
                    recordings: Vec::new(),
                    more_from,
                    unreadable: h.unreadable,
                }
            });
        let Some(mut detail) = found else {
            return Err(ControlError::NotFound(format!("no session {id}")));
        };
        let config = self.config();
        authz::may_read_session(&config, caller, &detail.session)?;
        self.live_bytes(&mut detail.session);
        // Only requests the HTTP gate noted as recorded can have a file; whether it is there
        // is asked of the file system, by the name the gate gives it.
        detail.recordings = detail
            .statements
            .iter()
            .filter(|st| st.text.contains(" [recorded: "))
            .filter(|st| {
                recording::path(&config.daemon.state_dir, &detail.session.id, st.seq)
                    .is_some_and(|p| p.is_file())
            })
            .map(|st| st.seq)
            .collect();
        Ok(detail)
    }

    /// The recorded exec stream of request `seq` of session `id`, bounded (see
    /// [`recording::read`]): for whoever may read the session.
    pub async fn recording(&self, caller: &Caller, id: &str, seq: u32) -> Result<Recording> {
        let Some(history) = self.inner.store.session_history(id.to_owned()).await? else {
            return Err(ControlError::NotFound(format!("no session {id}")));
        };
        let config = self.config();
        authz::may_read_session(&config, caller, &history.session)?;
        let state_dir = config.daemon.state_dir.clone();
        let session = history.session.id;
        tokio::task::spawn_blocking(move || recording::read(&state_dir, &session, seq))
            .await
            .map_err(|e| ControlError::Internal(format!("reading the recording: {e}")))?
            .map_err(|e| match e {
                RecordingError::Missing { .. } => ControlError::NotFound(e.to_string()),
                RecordingError::Unreadable { .. } => ControlError::Internal(e.to_string()),
            })
    }

    /// An open session's byte counts are the proxy's, not yet the store's.
    fn live_bytes(&self, session: &mut Session) {
        if let Some((up, down)) = self.inner.sessions.bytes(&session.id) {
            session.bytes_up = up;
            session.bytes_down = down;
        }
    }

    /// Audit records since `since`, newest first, at most `limit`.
    pub async fn audit(
        &self,
        caller: &Caller,
        since: Option<Timestamp>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>> {
        authz::operators_only(&self.config(), caller, "read the audit log")?;
        let limit = limit.clamp(1, 100_000);
        Ok(self.inner.store.audit_log(since, limit).await?)
    }

    /// Checks the audit log's hash chain against the head kept beside it.
    pub async fn audit_verify(&self, caller: &Caller) -> Result<audit::VerifyReport> {
        authz::operators_only(&self.config(), caller, "verify the audit log")?;
        Ok(self.inner.store.verify_audit().await?)
    }

    /// Checks every host's chain in the shared store with the hosts' public keys (fleet
    /// mode; any other store says it has no fleet).
    pub async fn audit_verify_fleet(&self, caller: &Caller) -> Result<audit::fleet::FleetReport> {
        authz::operators_only(&self.config(), caller, "verify the fleet's audit logs")?;
        Ok(self.inner.store.verify_audit_fleet().await?)
    }

    /// Starts a `jitgate run` task for `caller` (see [`authz::may_launch`]).
    pub async fn run(&self, caller: &Caller, spec: RunSpec) -> Result<Started> {
        authz::may_launch(&self.config(), caller, &spec)?;
        Ok(self.inner.tasks.launch(caller, spec).await?)
    }

    pub async fn reload(&self, caller: &Caller) -> Result<ReloadSummary> {
        authz::root_only(caller, "reload the configuration")?;
        self.inner
            .host
            .reload()
            .await
            .map_err(ControlError::ReloadRejected)
    }

    /// Removes the gate from the kernel and stops the agent.
    pub fn detach(&self, caller: &Caller) -> Result<Detached> {
        authz::root_only(caller, "detach the gate")?;
        let removed = self.inner.host.detach().map_err(ControlError::Detach)?;
        info!(by = %caller.user, "gate detached on request; shutting down");
        Ok(Detached {
            at: Timestamp::now(),
            removed: removed.iter().map(|p| p.display().to_string()).collect(),
        })
    }
}

/// Most bytes of statements (texts and parameters) one page of a session carries: as JSON
/// a control character takes six, so a page stays under the control socket's 64 MiB reply
/// however its text is made.
pub const SESSION_PAGE_BYTES: usize = 8 << 20;

/// The statements from sequence number `from` on, up to [`SESSION_PAGE_BYTES`] of them (at
/// least one), and where the next page starts when they were cut.
fn page_of(
    statements: Vec<crate::model::StatementRecord>,
    from: u32,
) -> (Vec<crate::model::StatementRecord>, Option<u32>) {
    let mut page = Vec::new();
    let mut bytes = 0;
    for st in statements.into_iter().filter(|st| st.seq >= from) {
        let size = 256
            + st.text.len()
            + st.params.iter().flatten().map(String::len).sum::<usize>()
            + st.error.as_ref().map_or(0, String::len);
        if !page.is_empty() && bytes + size > SESSION_PAGE_BYTES {
            return (page, Some(st.seq));
        }
        bytes += size;
        page.push(st);
    }
    (page, None)
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
