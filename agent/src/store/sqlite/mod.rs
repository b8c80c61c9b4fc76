//! The embedded state store: SQLite (WAL, `synchronous = FULL`) owned by one thread.
//!
//! Every method is a closure sent to that thread ([`writer`]), which batches whatever is
//! queued into one transaction and answers only once it is durable: an approval that was
//! acknowledged survives `kill -9`. Fire-and-forget writes (statement records, session
//! bookkeeping) linger for company, so busy sessions share one fsync.
//!
//! This module and its children are the only place that speaks SQL: `schema.rs` the
//! migrations, `queries.rs` the rows, `audit.rs` the audit log's rows.

mod audit;
mod chunks;
mod queries;
mod schema;
mod tokens;
mod writer;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rusqlite::Connection;
use tokio::sync::broadcast;

use self::writer::{Db, Lost, Mend, Recovery, Writer};

use super::{
    Decided, GrantApproval, GrantChange, RequestKey, Result, SessionHistory, Store, StoreError,
    StoreFuture, VerifyReport,
    audit::{
        AuditKey, Event, GrantExpired, GrantRevoked, RequestApproval, RequestApproved,
        RequestDenied, RequestExpired, RequestRef, TaskRef, TaskStarted, session_actor,
    },
    health::{AUDIT_BYTES, WriteHealth, session_bytes, statement_bytes},
};
use crate::model::{
    Actor, ApiToken, Approval, AuditEvent, Grant, Request, RequestStatus, Session, SessionOutcome,
    StatementRecord, Task, Timestamp,
};

/// The file beside the database that holds the audit chain's last link, rewritten after each
/// commit: cutting records off the end of the log cannot rewrite it too.
pub const HEAD_FILE: &str = "audit.head";

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(Box::new(e))
    }
}

/// The embedded store: a handle on the writer thread.
pub struct SqliteStore {
    writer: Writer,
    /// Whether the disk keeps what the writer thread commits.
    writes: WriteHealth,
    /// Sessions opened and not yet ended, by what the store was told (not by what it kept).
    opened: Opened,
    /// Session records not kept, to write once the store keeps writes again.
    lost: LostSessions,
    path: PathBuf,
    head_path: PathBuf,
    changes: broadcast::Sender<GrantChange>,
    feed: broadcast::Sender<AuditEvent>,
}

/// Ids of the sessions the store was told of as opened and not yet as ended.
type Opened = Arc<Mutex<HashSet<String>>>;

/// Session records whose write was not kept (the store failing), by session id, written
/// again once the store keeps writes ([`mend_sessions`]). At most [`MAX_LOST`].
type LostSessions = Arc<Mutex<HashMap<String, LostSession>>>;

/// A session whose latest record was not kept.
#[derive(Clone)]
struct LostSession {
    /// As the store was last told of it (opened, refused, or ended).
    session: Session,
    /// It was recorded as refused (a row and a `session.refused` record, no end).
    refused: bool,
}

/// Sessions remembered for mending; more are only counted (the store failed for long while
/// many sessions came and went; their gap stays in the log).
const MAX_LOST: usize = 65_536;

impl SqliteStore {
    /// Queues a session's row with its `session.start` (or, `refused`, `session.refused`)
    /// record, remembered for mending if not kept.
    fn insert_session(&self, session: Session, refused: bool) {
        let lost = self.lost(&session, refused);
        self.writer.submit_or(
            session_bytes(&session),
            move |db| {
                queries::insert_session(db.conn, &session)?;
                let event = if refused {
                    Event::session_refused(&session)
                } else {
                    Event::session_start(&session)
                };
                db.append(&session_actor(&session), &event)?;
                Ok(())
            },
            Some(lost),
        );
    }

    /// Remembers `session`'s record as not kept: the latest word about it wins (an end
    /// after an opening).
    fn lost(&self, session: &Session, refused: bool) -> Lost {
        let lost = self.lost.clone();
        let session = session.clone();
        Box::new(move || {
            let mut lost = lost.lock().unwrap_or_else(PoisonError::into_inner);
            if lost.len() < MAX_LOST || lost.contains_key(&session.id) {
                lost.insert(session.id.clone(), LostSession { session, refused });
            } else {
                tracing::warn!(session = %session.id, "a session's record was not kept and is past what is remembered for mending");
            }
        })
    }
}

/// Once writes are kept again: writes what the store was told of sessions and did not
/// keep (their row, their end, their audit records), so that no session is missing or shows
/// as open for ever. A session whose opening was lost and that has ended since is left to
/// its end's write (which writes the whole record when it finds no row). Idempotent: a row
/// that exists is not written again, an end only onto an open row; if this write is not
/// kept either, what it took is put back.
fn mend_sessions(opened: &Opened, lost: &LostSessions) -> (Mend, Lost) {
    let taken: Vec<LostSession> = lost
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain()
        .map(|(_, l)| l)
        .collect();
    let open = opened
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let back = {
        let lost = lost.clone();
        let taken = taken.clone();
        Box::new(move || {
            let mut lost = lost.lock().unwrap_or_else(PoisonError::into_inner);
            for l in taken {
                lost.entry(l.session.id.clone()).or_insert(l);
            }
        }) as Lost
    };
    let mend = Box::new(move |db: &Db<'_>| {
        let now = Timestamp::now();
        let mut mended = 0_usize;
        for l in &taken {
            let s = l.session.clone();
            match queries::get_session(db.conn, &s.id)? {
                // An opening lost, of a session that has ended since: its end (kept, or lost
                // and then remembered in its place) writes the whole record.
                None if !l.refused && s.ended_at.is_none() && !open.contains(&s.id) => continue,
                None => {
                    queries::insert_session(db.conn, &s)?;
                    if l.refused {
                        db.append(&session_actor(&s), &Event::session_refused(&s))?;
                    } else {
                        db.append(&session_actor(&s), &Event::session_start(&s))?;
                        if s.ended_at.is_some() {
                            db.append(&session_actor(&s), &Event::session_end(&s))?;
                        }
                    }
                }
                Some(row) if row.outcome == SessionOutcome::Open && s.ended_at.is_some() => {
                    queries::end_session(
                        db.conn,
                        &s.id,
                        s.ended_at.unwrap_or(now),
                        s.bytes_up,
                        s.bytes_down,
                        s.outcome,
                        &s.detail,
                    )?;
                    db.append(&session_actor(&s), &Event::session_end(&s))?;
                }
                Some(_) => continue,
            }
            mended += 1;
        }
        if mended > 0 {
            tracing::warn!(
                sessions = mended,
                "wrote the session records the state store did not keep while it failed"
            );
        }
        Ok(())
    }) as Mend;
    (mend, back)
}

/// Grant changes a slow subscriber may fall behind by before it is told it lagged.
const CHANGES: usize = 1024;

/// Audit records a slow feed subscriber may fall behind by before it is told it lagged.
const FEED: usize = 4096;

impl SqliteStore {
    /// Opens (creating and migrating) the database in `state_dir`, and the audit key beside it.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        create_private_dir(state_dir)?;
        let path = state_dir.join("jitgate.db");
        let mut conn = Connection::open(&path)
            .with_context(|| format!("opening state store {}", path.display()))?;
        // Private whatever the umask (SQLite gives its -wal and -shm files the same mode).
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn).context("migrating the state store")?;
        let key = AuditKey::load_or_create(state_dir)?;
        let head_path = state_dir.join(HEAD_FILE);
        let feed = broadcast::channel(FEED).0;
        let writes = WriteHealth::default();
        let opened = Opened::default();
        let lost = LostSessions::default();
        let mend: Recovery = {
            let (opened, lost) = (opened.clone(), lost.clone());
            Arc::new(move || mend_sessions(&opened, &lost))
        };
        let writer = Writer::spawn(
            conn,
            key,
            head_path.clone(),
            feed.clone(),
            writes.clone(),
            mend,
        )
        .context("starting the store thread")?;
        Ok(Self {
            writer,
            writes,
            opened,
            lost,
            path,
            head_path,
            changes: broadcast::channel(CHANGES).0,
            feed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
    {
        self.writer.call(f).await
    }

    fn submit<F>(&self, bytes: usize, f: F)
    where
        F: FnOnce(&Db<'_>) -> Result<()> + Send + 'static,
    {
        self.writer.submit(bytes, f);
    }

    /// Tells subscribers of a committed change (none listening is fine).
    fn changed(&self, change: GrantChange) {
        let _ = self.changes.send(change);
    }

    /// Records a decision on a pending request with its audit record, and reads it back.
    async fn decide(
        &self,
        id: String,
        status: RequestStatus,
        by: Actor,
        reason: Option<String>,
        actor: String,
        event: Event,
    ) -> Result<Decided> {
        self.call(move |db| {
            if !queries::decide_request(db.conn, &id, status, Some(&by), reason.as_deref(), None)? {
                return Ok(Decided::NotPending);
            }
            db.append(&actor, &event)?;
            Ok(queries::get_request(db.conn, &id)?
                .map_or(Decided::NotPending, |q| Decided::Done(Box::new(q))))
        })
        .await
    }
}

/// Marks a pending request expired with its audit record, in the caller's transaction.
fn expire_request(db: &Db<'_>, id: &str, why: &str, event: &Event) -> Result<()> {
    queries::decide_request(db.conn, id, RequestStatus::Expired, None, Some(why), None)?;
    db.append("jitgated", event)?;
    Ok(())
}

impl Store for SqliteStore {
    fn file_request(&self, request: Request, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |db| {
            queries::insert_request(db.conn, &request)?;
            db.append(&actor, &Event::filed(&request))?;
            Ok(())
        }))
    }

    fn file_approved(&self, request: Request, grant: Grant, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let g = grant.clone();
            self.call(move |db| {
                queries::insert_request(db.conn, &request)?;
                queries::insert_grant(db.conn, &g)?;
                db.append(&actor, &Event::filed(&request))?;
                db.append(&format!("policy {}", g.policy), &Event::grant_issued(&g))?;
                Ok(())
            })
            .await?;
            self.changed(GrantChange::Issued(Box::new(grant)));
            Ok(())
        })
    }

    fn request(&self, id: String) -> StoreFuture<'_, Option<Request>> {
        Box::pin(self.call(move |db| queries::get_request(db.conn, &id)))
    }

    fn pending_request(&self, key: RequestKey) -> StoreFuture<'_, Option<Request>> {
        Box::pin(self.call(move |db| queries::pending_request(db.conn, &key)))
    }

    fn requests(
        &self,
        status: Option<RequestStatus>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Request>> {
        Box::pin(self.call(move |db| queries::list_requests(db.conn, status, limit)))
    }

    fn count_pending(&self) -> StoreFuture<'_, usize> {
        Box::pin(self.call(|db| queries::count_pending_requests(db.conn)))
    }

    fn approve_request(&self, approval: GrantApproval) -> StoreFuture<'_, Decided> {
        Box::pin(async move {
            let grant = approval.grant.clone();
            let decided = self
                .call(move |db| {
                    let GrantApproval {
                        grant: g,
                        approver,
                        actor,
                        ttl_secs,
                    } = approval;
                    if let Some(task) = &g.task
                        && queries::task_ended(db.conn, task)?
                    {
                        return Ok(Decided::TaskEnded);
                    }
                    if !queries::decide_request(
                        db.conn,
                        &g.request,
                        RequestStatus::Approved,
                        Some(&approver),
                        None,
                        Some(&g.id),
                    )? {
                        return Ok(Decided::NotPending);
                    }
                    queries::insert_grant(db.conn, &g)?;
                    db.append(
                        &actor,
                        &Event::RequestApproved(RequestApproved {
                            request: g.request.clone(),
                            grant: g.id.clone(),
                            ttl_secs,
                        }),
                    )?;
                    db.append(&actor, &Event::grant_issued(&g))?;
                    Ok(queries::get_request(db.conn, &g.request)?
                        .map_or(Decided::NotPending, |q| Decided::Done(Box::new(q))))
                })
                .await?;
            if matches!(decided, Decided::Done(_)) {
                self.changed(GrantChange::Issued(Box::new(grant)));
            }
            Ok(decided)
        })
    }

    fn add_approval(
        &self,
        id: String,
        approval: Approval,
        needed: u32,
    ) -> StoreFuture<'_, Decided> {
        Box::pin(self.call(move |db| {
            let Some(mut q) = queries::get_request(db.conn, &id)? else {
                return Ok(Decided::NotPending);
            };
            let ended = match &q.task {
                Some(task) => queries::task_ended(db.conn, task)?,
                None => false,
            };
            if let Some(past) = super::admit_approval(&q, &approval, needed, ended)? {
                return Ok(past);
            }
            let by = approval.by.clone();
            q.approvals.push(approval);
            if !queries::set_approvals(db.conn, &id, &q.approvals)? {
                return Ok(Decided::NotPending);
            }
            db.append(
                &by,
                &Event::RequestApproval(RequestApproval {
                    request: id,
                    count: u32::try_from(q.approvals.len()).unwrap_or(u32::MAX),
                    needed,
                }),
            )?;
            Ok(Decided::Done(Box::new(q)))
        }))
    }

    fn approve_statement(
        &self,
        id: String,
        approver: Actor,
        actor: String,
    ) -> StoreFuture<'_, Decided> {
        let event = Event::StatementApproved(RequestRef {
            request: id.clone(),
        });
        Box::pin(self.decide(id, RequestStatus::Approved, approver, None, actor, event))
    }

    fn deny_request(
        &self,
        id: String,
        by: Actor,
        actor: String,
        reason: Option<String>,
    ) -> StoreFuture<'_, Decided> {
        let event = Event::RequestDenied(RequestDenied {
            request: id.clone(),
            reason: reason.clone(),
        });
        Box::pin(self.decide(id, RequestStatus::Denied, by, reason, actor, event))
    }

    fn expire_request(&self, id: String, why: String) -> StoreFuture<'_, bool> {
        Box::pin(
            self.call(move |db| match queries::get_request(db.conn, &id)? {
                Some(q) if q.status == RequestStatus::Pending => {
                    let event = Event::RequestExpired(RequestExpired {
                        request: id.clone(),
                        task: None,
                        why: Some(why.clone()),
                    });
                    expire_request(db, &id, &why, &event)?;
                    Ok(true)
                }
                _ => Ok(false),
            }),
        )
    }

    fn expire_task_requests(&self, task: String) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.call(move |db| {
            let pending = queries::pending_for_task(db.conn, &task)?;
            let why = format!("task {task} ended");
            for id in &pending {
                let event = Event::RequestExpired(RequestExpired {
                    request: id.clone(),
                    task: Some(task.clone()),
                    why: None,
                });
                expire_request(db, id, &why, &event)?;
            }
            Ok(pending)
        }))
    }

    fn live_grants(&self, now: Timestamp) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.call(move |db| queries::live_grants(db.conn, now)))
    }

    fn grant(&self, id: String) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(self.call(move |db| queries::get_grant(db.conn, &id)))
    }

    fn grants(&self, limit: usize) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(self.call(move |db| queries::list_grants(db.conn, limit)))
    }

    fn revoke_grant(&self, id: String, actor: String, reason: String) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let grant = id.clone();
            let revoked = self
                .call(move |db| {
                    if !queries::revoke_grant(db.conn, &id, &actor, &reason)? {
                        return Ok(false);
                    }
                    db.append(
                        &actor,
                        &Event::GrantRevoked(GrantRevoked { grant: id, reason }),
                    )?;
                    Ok(true)
                })
                .await?;
            if revoked {
                self.changed(GrantChange::Revoked { grant });
            }
            Ok(())
        })
    }

    fn expire_grant(&self, id: String) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let grant = id.clone();
            let recorded = self
                .call(move |db| {
                    if queries::get_grant(db.conn, &id)?.is_some_and(|g| g.revoked_at.is_some()) {
                        return Ok(false);
                    }
                    db.append("jitgated", &Event::GrantExpired(GrantExpired { grant: id }))?;
                    Ok(true)
                })
                .await?;
            if recorded {
                self.changed(GrantChange::Expired { grant });
            }
            Ok(())
        })
    }

    fn grant_changes(&self) -> broadcast::Receiver<GrantChange> {
        self.changes.subscribe()
    }

    fn audit_feed(&self) -> broadcast::Receiver<AuditEvent> {
        self.feed.subscribe()
    }

    fn writes(&self) -> Option<WriteHealth> {
        Some(self.writes.clone())
    }

    fn start_task(&self, task: Task, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |db| {
            queries::insert_task(db.conn, &task)?;
            db.append(
                &actor,
                &Event::TaskStarted(TaskStarted {
                    task: task.id.clone(),
                    identity: task.identity.clone(),
                    run_as_uid: task.run_as_uid,
                    command: task.command.clone(),
                    reason: task.reason.clone(),
                }),
            )?;
            Ok(())
        }))
    }

    fn end_task(&self, id: String) -> StoreFuture<'_, bool> {
        Box::pin(self.call(move |db| {
            let ended = queries::end_task(db.conn, &id)?;
            if ended {
                db.append("jitgated", &Event::TaskEnded(TaskRef { task: id }))?;
            }
            Ok(ended)
        }))
    }

    fn running_tasks(&self) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(self.call(|db| queries::running_tasks(db.conn)))
    }

    fn session_opened(&self, session: Session) {
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(session.id.clone());
        self.insert_session(session, false);
    }

    fn session_refused(&self, session: Session) {
        self.insert_session(session, true);
    }

    fn session_ended(&self, session: Session) {
        self.opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&session.id);
        let mut session = session;
        session.ended_at.get_or_insert_with(Timestamp::now);
        let lost = self.lost(&session, false);
        let forget = self.lost.clone();
        self.writer.submit_or(
            session_bytes(&session),
            move |db| {
                let s = &session;
                let ended = queries::end_session(
                    db.conn,
                    &s.id,
                    s.ended_at.unwrap_or_else(Timestamp::now),
                    s.bytes_up,
                    s.bytes_down,
                    s.outcome,
                    &s.detail,
                )?;
                if ended == 0 {
                    // Its opening was not kept (the store failed meanwhile): the whole
                    // record is written here, and nothing is left to mend.
                    queries::insert_session(db.conn, s)?;
                    db.append(&session_actor(s), &Event::session_start(s))?;
                }
                db.append(&session_actor(s), &Event::session_end(s))?;
                forget
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&s.id);
                Ok(())
            },
            Some(lost),
        );
    }

    fn record_statements(&self, batch: Vec<StatementRecord>) {
        let bytes = batch.iter().map(statement_bytes).sum();
        self.submit(bytes, move |db| queries::insert_statements(db.conn, &batch));
    }

    fn sessions(&self, open_only: bool, limit: usize) -> StoreFuture<'_, Vec<Session>> {
        Box::pin(self.call(move |db| queries::list_sessions(db.conn, open_only, limit)))
    }

    fn session_history(&self, id: String) -> StoreFuture<'_, Option<SessionHistory>> {
        Box::pin(self.call(move |db| {
            let Some(session) = queries::get_session(db.conn, &id)? else {
                return Ok(None);
            };
            let (statements, unreadable) = queries::session_statements(db.conn, &id)?;
            Ok(Some(SessionHistory {
                session,
                statements,
                events: audit::for_session(db.conn, &id)?,
                unreadable,
            }))
        }))
    }

    fn close_orphan_sessions(&self) -> StoreFuture<'_, usize> {
        Box::pin(self.call(|db| queries::close_orphan_sessions(db.conn)))
    }

    fn prune_sessions(&self, cutoff: Timestamp) -> StoreFuture<'_, usize> {
        Box::pin(self.call(move |db| queries::prune_sessions(db.conn, cutoff)))
    }

    fn append_audit(&self, actor: String, event: Event) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |db| db.append(&actor, &event).map(drop)))
    }

    fn submit_audit(&self, actor: String, event: Event) {
        self.submit(AUDIT_BYTES, move |db| db.append(&actor, &event).map(drop));
    }

    fn audit_log(
        &self,
        since: Option<Timestamp>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<AuditEvent>> {
        Box::pin(self.call(move |db| audit::list(db.conn, since, limit)))
    }

    fn verify_audit(&self) -> StoreFuture<'_, VerifyReport> {
        let head_path = self.head_path.clone();
        Box::pin(self.call(move |db| db.verify_audit(&head_path)))
    }

    fn insert_api_token(&self, token: ApiToken, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(move |db| {
            tokens::insert(db.conn, &token)?;
            db.append(&actor, &super::token_issued(&token))?;
            Ok(())
        }))
    }

    fn api_token(&self, id: String) -> StoreFuture<'_, Option<ApiToken>> {
        Box::pin(self.call(move |db| tokens::get(db.conn, &id)))
    }

    fn api_tokens(&self, user: Option<String>, limit: usize) -> StoreFuture<'_, Vec<ApiToken>> {
        Box::pin(self.call(move |db| tokens::list(db.conn, user.as_deref(), limit)))
    }

    fn revoke_api_token(&self, id: String, actor: String) -> StoreFuture<'_, bool> {
        Box::pin(self.call(move |db| {
            let revoked = tokens::revoke(db.conn, &id, Timestamp::now())?;
            if revoked {
                db.append(
                    &actor,
                    &Event::TokenRevoked(super::audit::TokenRef { token: id }),
                )?;
            }
            Ok(revoked)
        }))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.call(|_| Ok(())))
    }
}

/// Creates `dir` (0700) if it is missing, and checks it is the agent's alone.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;

    use anyhow::Context as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state_dir {}", dir.display()))?;
    }
    check_private_dir(dir, nix::unistd::geteuid().as_raw())
}

/// The state dir holds every session's statements, the audit log and its key: it must be
/// the agent's alone, whoever started it (the packaged unit makes it 0700; a daemon started
/// by hand must not run on one others can read or replace).
fn check_private_dir(dir: &Path, owner: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;

    let meta = std::fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("reading state_dir {}: {e}", dir.display()))?;
    let shown = dir.display();
    if meta.uid() != owner {
        anyhow::bail!(
            "state_dir {shown} belongs to uid {}, who could read or replace the agent's records; run `chown {owner} {shown}`",
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "state_dir {shown} is open to other users (mode {mode:04o}); it holds every session's statements and the audit key: run `chmod 700 {shown}`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod private_dir_tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn the_state_dir_is_the_agents_alone() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fresh = tmp.path().join("state");
        let store = SqliteStore::open(&fresh).expect("a fresh state dir");
        drop(store);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        assert_eq!(mode(&fresh.join("jitgate.db")), 0o600);

        for open in [0o755, 0o750, 0o705, 0o777] {
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(open)).expect("chmod");
            let Err(e) = SqliteStore::open(&fresh) else {
                panic!("{open:o} was not refused")
            };
            let e = e.to_string();
            assert!(e.contains("chmod 700"), "{open:o}: {e}");
        }
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let someone = nix::unistd::geteuid().as_raw() + 1;
        let e = check_private_dir(&fresh, someone)
            .expect_err("refused")
            .to_string();
        assert!(e.contains("chown"), "{e}");
    }
}

#[cfg(test)]
mod write_failure_tests {
    use std::time::{Duration, Instant};

    use super::*;

    async fn until(mut cond: impl FnMut() -> bool, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cond()
    }

    /// Hostile: the disk fills while sessions write. SQLite's `max_page_count` caps the
    /// database at its current size, so every write that needs a page more fails with
    /// SQLITE_FULL, as on a full disk. The failed background write closes the store; the
    /// store's own successes (a write that fits) do not reopen it; a probe does, once the
    /// room is back.
    #[tokio::test]
    async fn a_full_database_is_reported_until_a_probe_write_is_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&tmp.path().join("state")).expect("open");
        let writes = store.writes().expect("the embedded store reports writes");
        assert!(writes.check().is_ok());
        // Two sessions recorded as open while there is room.
        let (ended, live) = (
            crate::store::tests::session("s-ended"),
            crate::store::tests::session("s-live"),
        );
        store.session_opened(ended.clone());
        store.session_opened(live.clone());
        store.flush().await.expect("kept");
        let pages: i64 = store
            .call(|db| Ok(db.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?))
            .await
            .expect("page_count");
        store
            .call(move |db| {
                db.conn.pragma_update(None, "max_page_count", pages)?;
                Ok(())
            })
            .await
            .expect("cap");
        store.submit(1 << 20, |db| {
            db.conn.execute(
                "INSERT INTO store_probe (pad) VALUES (zeroblob(1000000))",
                [],
            )?;
            Ok(())
        });
        // One session ends in the same batch: its end is lost with it.
        let mut end = ended.clone();
        end.ended_at = Some(Timestamp::now());
        end.outcome = SessionOutcome::Closed;
        store.session_ended(end);
        // Queued behind it in the same batch: must not be committed on its own after
        // SQLite rolled the transaction back (its caller is told the batch failed).
        store.submit(1 << 20, |db| {
            db.conn
                .execute("INSERT INTO store_probe (pad) VALUES (x'01')", [])?;
            Ok(())
        });
        // The failure rolled the batch back: a flush queued with it is told.
        let flushed = store.flush().await;
        let failure = writes
            .get()
            .expect("the failed background write is reported");
        assert!(failure.error.contains("full"), "{failure:?}");
        if let Err(e) = flushed {
            assert!(e.to_string().contains("full"), "{e}");
        }
        let refusal = writes.check().expect_err("closed").to_string();
        assert!(refusal.contains("cannot keep records"), "{refusal}");
        // A write that fits succeeds, and probes keep failing: still closed.
        store.flush().await.expect("a write that fits");
        tokio::time::sleep(PROBE_WAIT).await;
        assert!(writes.get().is_some(), "reopened without room");
        // An awaited write that does not fit is reported too (and its caller told).
        let e = store
            .call(|db| {
                db.conn.execute(
                    "INSERT INTO store_probe (pad) VALUES (zeroblob(1000000))",
                    [],
                )?;
                Ok(())
            })
            .await
            .expect_err("full");
        assert!(e.to_string().contains("full"), "{e}");
        assert!(writes.get().expect("failing").failed >= 2);
        let stray: i64 = store
            .call(|db| {
                Ok(db
                    .conn
                    .query_row("SELECT count(*) FROM store_probe", [], |r| r.get(0))?)
            })
            .await
            .expect("count");
        assert_eq!(
            stray, 0,
            "a write of the rolled-back batch was committed alone"
        );
        // Room again: the next probe reopens the store, and leaves nothing behind.
        store
            .call(|db| {
                db.conn
                    .pragma_update(None, "max_page_count", 1_000_000_000_i64)?;
                Ok(())
            })
            .await
            .expect("uncap");
        assert!(
            until(|| writes.get().is_none(), PROBE_WAIT * 2).await,
            "a probe reopens the store"
        );
        let left: i64 = store
            .call(|db| {
                Ok(db
                    .conn
                    .query_row("SELECT count(*) FROM store_probe", [], |r| r.get(0))?)
            })
            .await
            .expect("count");
        assert_eq!(left, 0);
        // The session whose end was lost has it written now (as it was, with its audit
        // record); the one still open stays open.
        let open = store.sessions(true, 10).await.expect("sessions");
        let ids: Vec<&str> = open.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["s-live"]);
        let history = store
            .session_history("s-ended".into())
            .await
            .expect("history")
            .expect("the session");
        assert_eq!(history.session.outcome, SessionOutcome::Closed);
        assert!(history.session.ended_at.is_some());
        assert!(
            history.events.iter().any(|e| e.kind == "session.end"),
            "{:?}",
            history.events
        );
    }

    /// A store that falls behind (here: its thread held up by a slow write) refuses new
    /// sessions past BACKLOG_REFUSE and cuts live ones past BACKLOG_CUT, by the bytes handed
    /// to it and not yet written; it reopens once it has caught up.
    #[tokio::test]
    async fn a_store_behind_on_its_records_closes_the_gate_until_it_catches_up() {
        use crate::store::health::{BACKLOG_CUT, BACKLOG_REFUSE};
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&tmp.path().join("state")).expect("open");
        let writes = store.writes().expect("writes");
        store.submit(0, |_| {
            std::thread::sleep(Duration::from_millis(500));
            Ok(())
        });
        let mb = 1 << 20;
        for _ in 0..=(BACKLOG_REFUSE / mb) {
            store.submit(mb, |_| Ok(()));
        }
        let refusal = writes
            .check()
            .expect_err("refused while behind")
            .to_string();
        assert!(refusal.contains("behind"), "{refusal}");
        assert!(writes.cuts_sessions().is_none(), "not yet past BACKLOG_CUT");
        for _ in 0..=((BACKLOG_CUT - BACKLOG_REFUSE) / mb) {
            store.submit(mb, |_| Ok(()));
        }
        assert!(writes.cuts_sessions().is_some(), "past BACKLOG_CUT");
        store.flush().await.expect("caught up");
        assert_eq!(writes.backlog(), 0);
        assert!(writes.check().is_ok());
        assert!(writes.cuts_sessions().is_none());
    }

    /// An end whose opening was not kept (no row) writes the whole record, start and end,
    /// once; nothing is left for the mend to write a second time.
    #[tokio::test]
    async fn an_end_without_its_opening_writes_the_whole_record_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&tmp.path().join("state")).expect("open");
        let mut s = crate::store::tests::session("s-orphan");
        s.ended_at = Some(Timestamp::now());
        s.outcome = SessionOutcome::Closed;
        s.bytes_up = 7;
        store.session_ended(s);
        store.flush().await.expect("kept");
        let history = store
            .session_history("s-orphan".into())
            .await
            .expect("history")
            .expect("the row was written");
        assert_eq!(history.session.outcome, SessionOutcome::Closed);
        assert_eq!(history.session.bytes_up, 7);
        let kinds: Vec<&str> = history.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["session.start", "session.end"]);
        assert!(store.lost.lock().expect("lost").is_empty());
    }

    /// Longer than one probe interval.
    const PROBE_WAIT: Duration = Duration::from_millis(1500);
}
