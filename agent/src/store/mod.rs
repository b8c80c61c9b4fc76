//! The state store: what the agent keeps (requests, grants, tasks, sessions, statement
//! records, the audit log), behind one domain-level trait, [`Store`].
//!
//! Every method that answers is one transaction, and answers only once that transaction is
//! durable: an approval that was acknowledged survives `kill -9`. Each change is written with
//! its audit record in the same transaction. The fire-and-forget methods (session
//! bookkeeping, statement records, kernel refusals) return at once: the backend batches them
//! (the SQLite store lingers up to 100 ms for company, so busy sessions share one fsync), and
//! a later answered call sees every write queued before it.
//!
//! Backends: [`sqlite::SqliteStore`] (the embedded default: one writer thread, group commit),
//! [`postgres::PostgresStore`] (fleet mode: many hosts sharing one PostgreSQL database) and
//! [`memory::MemoryStore`] (for tests). A new backend implements [`Store`] and passes the
//! behavioural suite in `store/tests.rs`; the audit chain it keeps is sealed and verified by
//! the pure code in [`audit`].

pub mod audit;
pub mod health;
pub mod memory;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod token_tests;

use std::{future::Future, pin::Pin, sync::Arc};

use tokio::sync::broadcast;

use crate::{
    config::Access,
    model::{
        Actor, ApiToken, Approval, AuditEvent, Grant, Request, RequestStatus, Session,
        StatementRecord, Task, Timestamp,
    },
};

pub use self::{
    audit::VerifyReport, memory::MemoryStore, postgres::PostgresStore, sqlite::SqliteStore,
};

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (SQL error, connection lost, ...).
    #[error("state store: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("state store: {0}")]
    Json(#[from] serde_json::Error),
    #[error("state store: {0}")]
    Io(#[from] std::io::Error),
    #[error("state store is shut down")]
    Closed,
    #[error("state store commit failed: {0}")]
    Commit(String),
    #[error("{0}")]
    Invalid(String),
    /// A shared store is out of reach (fleet mode): nothing can be issued or recorded as
    /// answered until it is back. The message names the store and what to do.
    #[error("{0}")]
    Unavailable(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The future a store method returns: boxed, so that [`Store`] can be used as `dyn Store`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// How callers hold the store. Cheap to clone.
pub type SharedStore = Arc<dyn Store>;

/// What identifies a pending request: asking again for the same thing joins it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestKey {
    pub identity: String,
    pub task: Option<String>,
    pub resource: String,
    pub access: Access,
}

/// How a decision on a pending request went.
#[derive(Clone, Debug)]
pub enum Decided {
    /// Recorded; the request as it now stands.
    Done(Box<Request>),
    /// The request is not (or no longer) pending: someone decided it meanwhile.
    NotPending,
    /// The request is for a task that has ended: nothing was recorded.
    TaskEnded,
}

/// Whether `approval` may be added to request `q` (as stored, `task_ended` for its task):
/// `Ok(None)` to add it, `Ok(Some(..))` when the request is past deciding, `Err` when this
/// person already approved it. One rule for every backend.
pub(crate) fn admit_approval(
    q: &Request,
    approval: &Approval,
    needed: u32,
    task_ended: bool,
) -> Result<Option<Decided>> {
    if q.status != RequestStatus::Pending {
        return Ok(Some(Decided::NotPending));
    }
    if task_ended {
        return Ok(Some(Decided::TaskEnded));
    }
    if q.approvals.iter().any(|a| a.same_person(approval)) {
        return Err(StoreError::Invalid(format!(
            "{} already approved request {}; it needs approvals from {needed} different people",
            approval.by, q.id
        )));
    }
    Ok(None)
}

/// The `token.issued` record of `t`: one for every backend (never the secret or its hash).
pub(crate) fn token_issued(t: &ApiToken) -> audit::Event {
    audit::Event::TokenIssued(audit::TokenIssued {
        token: t.id.clone(),
        name: t.name.clone(),
        user: t.user.clone(),
        read_only: t.read_only,
        expires_at: t.expires_at,
    })
}

/// Newest first, at most `limit`, of `user`'s when given: how every backend lists tokens.
pub(crate) fn list_tokens(
    mut tokens: Vec<ApiToken>,
    user: Option<&str>,
    limit: usize,
) -> Vec<ApiToken> {
    tokens.retain(|t| user.is_none_or(|u| t.user == u));
    tokens.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    tokens.truncate(limit);
    tokens
}

/// An approval that issues a grant.
#[derive(Clone, Debug)]
pub struct GrantApproval {
    /// The grant to issue (its `request` names the request approved).
    pub grant: Grant,
    pub approver: Actor,
    /// The approver as the audit log names them.
    pub actor: String,
    /// The ttl approved, as the audit record states it.
    pub ttl_secs: u64,
}

/// A change to the set of grants, as [`Store::grant_changes`] reports it.
#[derive(Clone, Debug)]
pub enum GrantChange {
    Issued(Box<Grant>),
    Revoked {
        grant: String,
    },
    Expired {
        grant: String,
    },
    /// A request was decided (approved, denied, expired) on another host: whoever waits on
    /// it here looks again. A store reports only other hosts' decisions this way; its own
    /// callers already know theirs.
    Decided {
        request: String,
        status: RequestStatus,
    },
}

/// A session with everything recorded about it.
#[derive(Clone, Debug)]
pub struct SessionHistory {
    pub session: Session,
    pub statements: Vec<StatementRecord>,
    /// The audit records that name the session.
    pub events: Vec<AuditEvent>,
    /// Stored batches of statement records that could not be read (damaged): the rest is
    /// shown, and this says how many are missing from it.
    pub unreadable: u32,
}

/// The agent's durable state, named by what the domain does with it.
///
/// `actor` arguments are the audit log's `actor` column (`user alice`, `workload ci-bot
/// (user ci)`, `jitgated`); the audit records themselves are built from the arguments by
/// [`audit::Event`]'s constructors, so every backend writes the same records.
pub trait Store: Send + Sync + 'static {
    // -- Requests -----------------------------------------------------------------------------

    /// Files a request with its `request.filed` record (`statement.held` for a held
    /// statement).
    fn file_request(&self, request: Request, actor: String) -> StoreFuture<'_, ()>;

    /// Files a request a policy approved at once, with the grant it issued (`request.filed`
    /// by `actor`, `grant.issued` by `policy NAME`).
    fn file_approved(&self, request: Request, grant: Grant, actor: String) -> StoreFuture<'_, ()>;

    fn request(&self, id: String) -> StoreFuture<'_, Option<Request>>;

    /// The newest pending request for `key` (not a held statement), found by index.
    fn pending_request(&self, key: RequestKey) -> StoreFuture<'_, Option<Request>>;

    /// Requests with `status` (all when `None`), newest first, at most `limit`.
    fn requests(
        &self,
        status: Option<RequestStatus>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Request>>;

    fn count_pending(&self) -> StoreFuture<'_, usize>;

    /// Approves a pending request and issues its grant (`request.approved`, `grant.issued`).
    /// A request for a task that has ended is not approved.
    fn approve_request(&self, approval: GrantApproval) -> StoreFuture<'_, Decided>;

    /// Approves a held statement (`statement.approved`).
    /// Records one person's approval of a pending request that needs several, with its
    /// `request.approval` record (`needed` is the policy's count, for the record). The
    /// request as it now stands, its approvals included. Fails with
    /// [`StoreError::Invalid`] if this person (`approval.by`) already approved it.
    fn add_approval(&self, id: String, approval: Approval, needed: u32)
    -> StoreFuture<'_, Decided>;

    fn approve_statement(
        &self,
        id: String,
        approver: Actor,
        actor: String,
    ) -> StoreFuture<'_, Decided>;

    /// Denies (or withdraws) a pending request (`request.denied`).
    fn deny_request(
        &self,
        id: String,
        by: Actor,
        actor: String,
        reason: Option<String>,
    ) -> StoreFuture<'_, Decided>;

    /// Marks a request that is still pending as expired (`request.expired` with `why`).
    /// Returns whether it was pending.
    fn expire_request(&self, id: String, why: String) -> StoreFuture<'_, bool>;

    /// Expires every pending request bound to `task` (`request.expired` with the task).
    /// Returns their ids.
    fn expire_task_requests(&self, task: String) -> StoreFuture<'_, Vec<String>>;

    // -- Grants -------------------------------------------------------------------------------

    /// Grants neither revoked nor expired at `now`, oldest first (restored at start-up).
    fn live_grants(&self, now: Timestamp) -> StoreFuture<'_, Vec<Grant>>;

    fn grant(&self, id: String) -> StoreFuture<'_, Option<Grant>>;

    /// Grants newest first, at most `limit`.
    fn grants(&self, limit: usize) -> StoreFuture<'_, Vec<Grant>>;

    /// Revokes a grant that is still live, with its `grant.revoked` record by `actor`. A
    /// grant no longer live (revoked, or past its expiry) is left as it is and nothing is
    /// recorded: two enders racing (an operator's revoke and its task's end) leave one record.
    fn revoke_grant(&self, id: String, actor: String, reason: String) -> StoreFuture<'_, ()>;

    /// Records that a grant ran out (`grant.expired`); nothing for a grant already revoked.
    fn expire_grant(&self, id: String) -> StoreFuture<'_, ()>;

    /// Grant changes as this store commits them. The engine's in-memory mirror does not need
    /// it on a single host; a shared backend pushes other hosts' changes through it.
    fn grant_changes(&self) -> broadcast::Receiver<GrantChange>;

    /// Every audit record this store commits from now on, in order, once committed (a
    /// record from a rolled-back operation never appears). For notifications and live
    /// views; the log itself stays the record. A subscriber that falls behind by more than
    /// the backend's buffer is told it lagged (`RecvError::Lagged`) and loses the oldest.
    fn audit_feed(&self) -> broadcast::Receiver<AuditEvent>;

    // -- Tasks --------------------------------------------------------------------------------

    /// Records a started task (`task.started` by `actor`).
    fn start_task(&self, task: Task, actor: String) -> StoreFuture<'_, ()>;

    /// Marks a task ended (`task.ended`); returns whether it was running.
    fn end_task(&self, id: String) -> StoreFuture<'_, bool>;

    fn running_tasks(&self) -> StoreFuture<'_, Vec<Task>>;

    // -- Sessions (fire-and-forget: the data path never waits for the disk) ------------------

    /// A session started relaying (`session.start`).
    fn session_opened(&self, session: Session);

    /// A session was refused before it relayed (`session.refused`).
    fn session_refused(&self, session: Session);

    /// A relaying session ended (`session.end`).
    fn session_ended(&self, session: Session);

    /// Statement records of a session, in batches (no audit record each).
    fn record_statements(&self, batch: Vec<StatementRecord>);

    /// Sessions newest first; `open_only` keeps those still relaying.
    fn sessions(&self, open_only: bool, limit: usize) -> StoreFuture<'_, Vec<Session>>;

    /// One session, its statements and the audit records naming it, read together.
    fn session_history(&self, id: String) -> StoreFuture<'_, Option<SessionHistory>>;

    /// Sessions a crash left open are over: marks them so (at start-up).
    fn close_orphan_sessions(&self) -> StoreFuture<'_, usize>;

    /// Deletes sessions (and their statements) that ended before `cutoff`. The audit log is
    /// kept. Returns how many sessions went.
    fn prune_sessions(&self, cutoff: Timestamp) -> StoreFuture<'_, usize>;

    // -- Audit --------------------------------------------------------------------------------

    /// Appends a record that goes with no other change.
    fn append_audit(&self, actor: String, event: audit::Event) -> StoreFuture<'_, ()>;

    /// Appends a record without waiting for it (kernel refusals, a detach on its way out).
    fn submit_audit(&self, actor: String, event: audit::Event);

    /// Records at or after `since`, oldest first: the newest `limit`.
    fn audit_log(&self, since: Option<Timestamp>, limit: usize)
    -> StoreFuture<'_, Vec<AuditEvent>>;

    /// Walks the whole chain and its head checkpoint.
    fn verify_audit(&self) -> StoreFuture<'_, VerifyReport>;

    /// Walks every host's chain in a shared store with the hosts' public keys and this
    /// host's pins (`jitgate audit verify --fleet`). Only a shared store has a fleet.
    fn verify_audit_fleet(&self) -> StoreFuture<'_, audit::fleet::FleetReport> {
        Box::pin(async {
            Err(StoreError::Invalid(
                "`audit verify --fleet` checks the hosts sharing a PostgreSQL store ([store] backend = \"postgres\"); this host keeps its own log: use `jitgate audit verify`".into(),
            ))
        })
    }

    /// Waits until everything queued before this call is durable.
    fn flush(&self) -> StoreFuture<'_, ()>;

    // -- API tokens of the console's HTTP API (see `control::tokens`) -----------------------

    /// Stores a new token (its hash only) with its `token.issued` record by `actor`.
    fn insert_api_token(&self, token: ApiToken, actor: String) -> StoreFuture<'_, ()>;

    /// One token by id, revoked and expired ones included.
    fn api_token(&self, id: String) -> StoreFuture<'_, Option<ApiToken>>;

    /// Tokens newest first, at most `limit`; only those acting as `user` when given.
    fn api_tokens(&self, user: Option<String>, limit: usize) -> StoreFuture<'_, Vec<ApiToken>>;

    /// Revokes a token that is not yet revoked, with its `token.revoked` record by `actor`.
    /// Returns whether it was (nothing is recorded for one already revoked).
    fn revoke_api_token(&self, id: String, actor: String) -> StoreFuture<'_, bool>;

    /// A shared store's health (reached or not, and the lease on what this host last
    /// confirmed with it). `None` for a store that is always there (the embedded one).
    fn health(&self) -> Option<health::StoreHealth> {
        None
    }

    /// Whether the store keeps what it is given (the embedded store reports a full disk or
    /// a failing database here). `None` for a store that reports no such state.
    fn writes(&self) -> Option<health::WriteHealth> {
        None
    }
}
