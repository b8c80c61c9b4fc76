//! The shared state store for fleet mode: PostgreSQL, one database for many hosts.
//!
//! Enforcement stays on each host; requests, approvals, grants, session records and the audit
//! log are shared here. The semantics are the SQLite store's: every answered method is one
//! transaction, answered once committed, with its audit records in the same transaction;
//! fire-and-forget writes are batched ([`writer`]). Each host writes under its `host_id`: its
//! audit records form a hash chain of their own, sealed with the host's own key and checked
//! against a head checkpoint kept in its state dir; its tasks and open sessions are its own.
//!
//! Changes other hosts must act on (a grant issued, revoked or expired; a request decided)
//! are also written to a change log in the same transaction and announced with `NOTIFY`;
//! [`changes`] follows the log and passes them to [`Store::grant_changes`].
//!
//! This module and its children are the only place that speaks this store's SQL.

mod audit;
mod changes;
mod connect;
mod fleet;
mod prune;
mod queries;
mod schema;
pub mod spool;
pub mod spools;
mod tls;
mod tokens;
mod writer;

#[cfg(test)]
pub(crate) mod testdb;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures_util::future::BoxFuture;
use tokio::sync::broadcast;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::error;

pub use self::connect::{DEFAULT_CHANGE_LOG_RETENTION, PostgresOptions};
use self::{
    connect::Connector,
    spool::{AuditRecord, Record, Spool},
    writer::{Db, Op, Writer},
};
use super::{
    Decided, GrantApproval, GrantChange, RequestKey, Result, SessionHistory, Store, StoreError,
    StoreFuture, VerifyReport,
    audit::{
        AuditKey, Event, GrantExpired, GrantRevoked, RequestApproval, RequestApproved,
        RequestDenied, RequestExpired, RequestRef, TaskRef, TaskStarted, session_actor,
    },
    health::{StoreHealth, StoreState, WriteHealth},
};
use crate::model::{
    Actor, ApiToken, Approval, AuditEvent, Grant, Request, RequestStatus, Session, StatementRecord,
    Task, Timestamp,
};

/// The file in the state dir that holds this host's chain's last link in the shared store
/// (apart from the SQLite store's, so switching backends never mixes checkpoints).
pub const HEAD_FILE: &str = "audit-postgres.head";

/// Grant changes a slow subscriber may fall behind by before it is told it lagged.
const CHANGES: usize = 1024;

/// Audit records a slow feed subscriber may fall behind by before it is told it lagged.
const FEED: usize = 4096;

/// The shared store: a writer task, a few read connections, a change-log follower.
pub struct PostgresStore {
    writer: Writer,
    /// The writer's backlog (write failures are the spool's and the health's business).
    writes: WriteHealth,
    pool: Pool,
    host: String,
    key: AuditKey,
    head_path: PathBuf,
    changes: broadcast::Sender<GrantChange>,
    feed: broadcast::Sender<AuditEvent>,
    health: StoreHealth,
    stop: CancellationToken,
    /// `[store] require_sync_standby`.
    require_sync_standby: bool,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Builds an [`Op`] from a closure (naming the bound lets the closure's lifetimes be
/// inferred).
fn op<T, F>(f: F) -> Op<T>
where
    F: for<'a> FnOnce(&'a Db<'a>) -> BoxFuture<'a, Result<T>> + Send + 'static,
{
    Box::new(f)
}

impl PostgresStore {
    /// Starts the store without waiting for the server: a follower task reaches it (retrying
    /// with backoff), migrates the schema and follows other hosts' changes; until it has,
    /// every call fails with [`StoreError::Unavailable`] (the agent starts with the gate
    /// closed). Fails only on what no retry can mend: the options, the state dir, the key.
    pub fn start(options: &PostgresOptions, state_dir: &Path) -> anyhow::Result<Self> {
        super::sqlite::create_private_dir(state_dir)?;
        let connector = Connector::new(options)?;
        // Fleet mode signs its records too, for `audit verify --fleet` (store/audit/sign.rs).
        let key = AuditKey::load_or_create(state_dir)?
            .with_signer(super::audit::sign::AuditSigner::load_or_create(state_dir)?);
        let head_path = state_dir.join(HEAD_FILE);
        let host = options.host_id.clone();
        let feed = broadcast::channel(FEED).0;
        let health = StoreHealth::new(options.url.clone(), options.lease);
        let spool_key = super::audit::secret_key(state_dir, spool::KEY_FILE)?;
        let spool = Arc::new(Spool::open(state_dir, spool_key, options.spool_limit));
        let started_at = Timestamp::now();
        let writes = WriteHealth::default();
        let writer = Writer::spawn(
            writer::Setup {
                connector: connector.clone(),
                host: host.clone(),
                key: key.clone(),
                head_path: head_path.clone(),
                feed: feed.clone(),
                health: health.clone(),
                spool,
                started_at,
            },
            writes.clone(),
        );
        let (changes, _) = broadcast::channel(CHANGES);
        let stop = CancellationToken::new();
        tokio::spawn(prune::run(
            connector.clone(),
            options.change_log_retention,
            stop.clone(),
        ));
        tokio::spawn(changes::follow(changes::Follower {
            connector: connector.clone(),
            host: host.clone(),
            out: changes.clone(),
            health: health.clone(),
            stop: stop.clone(),
            started_at,
        }));
        Ok(Self {
            writer,
            writes,
            pool: Pool::new(connector, health.clone(), options.pool_size.max(1)),
            host,
            key,
            head_path,
            changes,
            feed,
            health,
            stop,
            require_sync_standby: options.require_sync_standby,
        })
    }

    /// [`PostgresStore::start`], then waits for the first attempt to reach the store: fails
    /// if it did not (for tools and tests that need the store now, not eventually).
    pub async fn open(options: &PostgresOptions, state_dir: &Path) -> anyhow::Result<Self> {
        let store = Self::start(options, state_dir)?;
        let mut health = store.health.subscribe();
        let reached = health
            .wait_for(|h| h.state == StoreState::Up || h.error.is_some())
            .await
            .map(|h| h.error.clone())
            .map_err(|_| anyhow::anyhow!("the shared state store's follower stopped"))?;
        if let Some(e) = reached {
            anyhow::bail!(
                "connecting to the shared state store at {} (check [store] url, password_file and ca_file, and that the server is up): {e}",
                options.url
            );
        }
        // Reached: wait for the first read of the change log, which opens the store.
        health
            .wait_for(|h| h.confirmed.is_some() || h.state != StoreState::Up)
            .await
            .map_err(|_| anyhow::anyhow!("the shared state store's follower stopped"))?;
        store.health.check()?;
        Ok(store)
    }

    /// Retires this host's local spool on purpose (`jitgated --retire-spool`, with the agent
    /// stopped): the spool must be intact and empty (every record shipped, as the store
    /// confirms) and the store's current spool for this host; the store records it retired
    /// (`spool.retired` in the host's chain) and the spool's files are removed, so the next
    /// start's new spool follows it without a `spool.lost` alarm. Returns what was done.
    pub async fn retire_spool(
        options: &PostgresOptions,
        state_dir: &Path,
    ) -> anyhow::Result<String> {
        let path = state_dir.join(spool::FILE);
        if !path.exists() {
            anyhow::bail!("no local spool at {}: nothing to retire", path.display());
        }
        if !state_dir.join(spool::KEY_FILE).exists() {
            anyhow::bail!(
                "{} is missing: the spool cannot be checked, so it cannot be retired (when jitgated next reaches the store with a new spool, this one is recorded as lost)",
                state_dir.join(spool::KEY_FILE).display()
            );
        }
        let spool_key = super::audit::secret_key(state_dir, spool::KEY_FILE)?;
        let local = Spool::open(state_dir, spool_key, options.spool_limit);
        if let Some(problem) = local.problem() {
            anyhow::bail!("{problem}; a damaged spool cannot be retired");
        }
        let waiting = local.stats().records;
        if waiting > 0 {
            anyhow::bail!(
                "the local spool {} holds {waiting} records not shipped yet: start jitgated with the shared store reachable so they are shipped (`jitgate status` shows the spool empty), stop it, then retire",
                path.display()
            );
        }
        let id = local.id();
        let shipped = local.shipped_through()?;
        drop(local);
        let key = AuditKey::load_or_create(state_dir)?
            .with_signer(super::audit::sign::AuditSigner::load_or_create(state_dir)?);
        let mut client = Connector::new(options)?.connect(None).await?;
        let tx = client.transaction().await?;
        let sealed = spools::retire(&tx, &options.host_id, &key, &id, shipped).await?;
        tx.commit().await?;
        if let Err(e) = audit::write_head(
            &state_dir.join(HEAD_FILE),
            &(sealed.seq, sealed.hash.clone()),
        ) {
            tracing::warn!(error = %e, "could not write the audit head checkpoint");
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = state_dir.join(format!("{}{suffix}", spool::FILE));
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!(
                    "spool {id} is retired in the shared store, but {} could not be removed: {e}; remove it before starting jitgated",
                    file.display()
                ),
            }
        }
        Ok(format!(
            "retired spool {id} of host {} (every record shipped, through {shipped}; recorded as spool.retired, audit record {}); removed {}: jitgated starts a new spool",
            options.host_id,
            sealed.seq,
            path.display()
        ))
    }

    /// This host's name in the shared store.
    pub fn host_id(&self) -> &str {
        &self.host
    }

    /// Runs `f` in the writer's transaction, if the store is there: while it is out of
    /// reach (or not yet reached), at once [`StoreError::Unavailable`], which names it.
    async fn call<T: Send + 'static>(&self, f: Op<T>) -> Result<T> {
        self.health.check()?;
        self.writer.call(f).await
    }

    /// Queues a fire-and-forget record. The writer writes it with its next batch, or, while
    /// the store is out of reach (or records kept meanwhile still wait), keeps it in the local
    /// spool and ships it in order once the store is back.
    fn submit(&self, record: Record) {
        self.writer.submit(record);
    }

    /// A record of `event` by `actor`, made now (one that cannot be encoded is logged: it
    /// could not be written either).
    fn audit_record(actor: &str, event: &Event) -> Option<AuditRecord> {
        match AuditRecord::now(actor, event) {
            Ok(r) => Some(r),
            Err(e) => {
                error!(error = %e, kind = event.kind(), "record not kept: cannot encode it");
                None
            }
        }
    }

    /// Tells local subscribers of a committed change (none listening is fine).
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
        self.call(op(move |db| {
            Box::pin(async move {
                db.lock_changes().await?;
                if !queries::decide_request(db.tx, &id, status, Some(&by), reason.as_deref(), None)
                    .await?
                {
                    return Ok(Decided::NotPending);
                }
                db.append(&actor, &event).await?;
                db.changed("decided", &id).await?;
                Ok(queries::get_request(db.tx, &id)
                    .await?
                    .map_or(Decided::NotPending, |q| Decided::Done(Box::new(q))))
            })
        }))
        .await
    }
}

/// With `[store] require_sync_standby`, in the transaction that would issue a grant: refuses
/// it unless a synchronous standby is streaming now (a grant committed without one is lost if
/// the store fails over). `pg_stat_replication` shows other sessions' rows in full only to
/// roles with `pg_monitor` (or superusers); without it no standby is seen and every grant is
/// refused, which the error says.
async fn require_sync_standby(db: &Db<'_>) -> Result<()> {
    let streaming: i64 = db
        .tx
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')",
            &[],
        )
        .await?
        .try_get(0)?;
    if streaming == 0 {
        return Err(StoreError::Unavailable(
            "no new grant: [store] require_sync_standby is set and the shared state store has no synchronous standby streaming now (pg_stat_replication shows none in sync_state sync or quorum), so a failover could lose the grant. Bring a synchronous standby back (see \"Fleet deployment\" in the README), or unset require_sync_standby; the agent's database role needs pg_monitor to see the standbys".into(),
        ));
    }
    Ok(())
}

/// Marks a pending request expired with its audit record and change, in the caller's
/// transaction (which holds the change-log lock).
async fn expire_request(db: &Db<'_>, id: &str, why: &str, event: &Event) -> Result<()> {
    queries::decide_request(db.tx, id, RequestStatus::Expired, None, Some(why), None).await?;
    db.append("jitgated", event).await?;
    db.changed("decided", id).await?;
    Ok(())
}

/// Read connections for what needs no queued write before it (requests, grants, tasks: all
/// written by answered calls, committed before they answered). Reopened when lost.
struct Pool {
    connector: Connector,
    health: StoreHealth,
    slots: Vec<tokio::sync::Mutex<Option<Client>>>,
    next: AtomicUsize,
}

impl Pool {
    fn new(connector: Connector, health: StoreHealth, size: usize) -> Self {
        Self {
            connector,
            health,
            slots: (0..size).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: for<'a> FnOnce(&'a Client) -> BoxFuture<'a, Result<T>>,
    {
        self.health.check()?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.connector.connect(None).await?);
        }
        let Some(client) = slot.as_ref() else {
            return Err(StoreError::Closed);
        };
        f(client).await
    }
}

impl Store for PostgresStore {
    fn file_request(&self, request: Request, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                queries::insert_request(db.tx, db.host, &request).await?;
                db.append(&actor, &Event::filed(&request)).await?;
                Ok(())
            })
        })))
    }

    fn file_approved(&self, request: Request, grant: Grant, actor: String) -> StoreFuture<'_, ()> {
        let strict = self.require_sync_standby;
        Box::pin(async move {
            let g = grant.clone();
            self.call(op(move |db| {
                Box::pin(async move {
                    if strict {
                        require_sync_standby(db).await?;
                    }
                    db.lock_changes().await?;
                    queries::insert_request(db.tx, db.host, &request).await?;
                    queries::insert_grant(db.tx, db.host, &g).await?;
                    db.append(&actor, &Event::filed(&request)).await?;
                    db.append(&format!("policy {}", g.policy), &Event::grant_issued(&g))
                        .await?;
                    db.changed("issued", &g.id).await?;
                    Ok(())
                })
            }))
            .await?;
            self.changed(GrantChange::Issued(Box::new(grant)));
            Ok(())
        })
    }

    fn request(&self, id: String) -> StoreFuture<'_, Option<Request>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::get_request(c, &id).await })),
        )
    }

    fn pending_request(&self, key: RequestKey) -> StoreFuture<'_, Option<Request>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::pending_request(c, &key).await })),
        )
    }

    fn requests(
        &self,
        status: Option<RequestStatus>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Request>> {
        Box::pin(
            self.pool.read(move |c| {
                Box::pin(async move { queries::list_requests(c, status, limit).await })
            }),
        )
    }

    fn count_pending(&self) -> StoreFuture<'_, usize> {
        Box::pin(
            self.pool
                .read(|c| Box::pin(async move { queries::count_pending_requests(c).await })),
        )
    }

    fn approve_request(&self, approval: GrantApproval) -> StoreFuture<'_, Decided> {
        let strict = self.require_sync_standby;
        Box::pin(async move {
            let grant = approval.grant.clone();
            let decided = self
                .call(op(move |db| {
                    Box::pin(async move {
                        if strict {
                            require_sync_standby(db).await?;
                        }
                        let GrantApproval {
                            grant: g,
                            approver,
                            actor,
                            ttl_secs,
                        } = approval;
                        db.lock_changes().await?;
                        if let Some(task) = &g.task
                            && queries::task_ended(db.tx, task).await?
                        {
                            return Ok(Decided::TaskEnded);
                        }
                        if !queries::decide_request(
                            db.tx,
                            &g.request,
                            RequestStatus::Approved,
                            Some(&approver),
                            None,
                            Some(&g.id),
                        )
                        .await?
                        {
                            return Ok(Decided::NotPending);
                        }
                        queries::insert_grant(db.tx, db.host, &g).await?;
                        db.append(
                            &actor,
                            &Event::RequestApproved(RequestApproved {
                                request: g.request.clone(),
                                grant: g.id.clone(),
                                ttl_secs,
                            }),
                        )
                        .await?;
                        db.append(&actor, &Event::grant_issued(&g)).await?;
                        // Issued before decided: a follower activates the grant before it
                        // wakes whoever waits on the request.
                        db.changed("issued", &g.id).await?;
                        db.changed("decided", &g.request).await?;
                        Ok(queries::get_request(db.tx, &g.request)
                            .await?
                            .map_or(Decided::NotPending, |q| Decided::Done(Box::new(q))))
                    })
                }))
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
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                // Serialised with every decision, fleet-wide: two approvals on two hosts
                // cannot both miss each other.
                db.lock_changes().await?;
                let Some(mut q) = queries::get_request(db.tx, &id).await? else {
                    return Ok(Decided::NotPending);
                };
                let ended = match &q.task {
                    Some(task) => queries::task_ended(db.tx, task).await?,
                    None => false,
                };
                if let Some(past) = super::admit_approval(&q, &approval, needed, ended)? {
                    return Ok(past);
                }
                let by = approval.by.clone();
                q.approvals.push(approval);
                if !queries::set_approvals(db.tx, &id, &q.approvals).await? {
                    return Ok(Decided::NotPending);
                }
                db.append(
                    &by,
                    &Event::RequestApproval(RequestApproval {
                        request: id,
                        count: u32::try_from(q.approvals.len()).unwrap_or(u32::MAX),
                        needed,
                    }),
                )
                .await?;
                Ok(Decided::Done(Box::new(q)))
            })
        })))
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
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                db.lock_changes().await?;
                match queries::get_request(db.tx, &id).await? {
                    Some(q) if q.status == RequestStatus::Pending => {
                        let event = Event::RequestExpired(RequestExpired {
                            request: id.clone(),
                            task: None,
                            why: Some(why.clone()),
                        });
                        expire_request(db, &id, &why, &event).await?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
        })))
    }

    fn expire_task_requests(&self, task: String) -> StoreFuture<'_, Vec<String>> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                db.lock_changes().await?;
                let pending = queries::pending_for_task(db.tx, &task).await?;
                let why = format!("task {task} ended");
                for id in &pending {
                    let event = Event::RequestExpired(RequestExpired {
                        request: id.clone(),
                        task: Some(task.clone()),
                        why: None,
                    });
                    expire_request(db, id, &why, &event).await?;
                }
                Ok(pending)
            })
        })))
    }

    fn live_grants(&self, now: Timestamp) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::live_grants(c, now).await })),
        )
    }

    fn grant(&self, id: String) -> StoreFuture<'_, Option<Grant>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::get_grant(c, &id).await })),
        )
    }

    fn grants(&self, limit: usize) -> StoreFuture<'_, Vec<Grant>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::list_grants(c, limit).await })),
        )
    }

    fn revoke_grant(&self, id: String, actor: String, reason: String) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let grant = id.clone();
            let revoked = self
                .call(op(move |db| {
                    Box::pin(async move {
                        db.lock_changes().await?;
                        // A second ender (say, a task's end racing the operator, here or on
                        // another host) changes nothing and records nothing.
                        if !queries::revoke_grant(db.tx, &id, &actor, &reason).await? {
                            return Ok(false);
                        }
                        let event = Event::GrantRevoked(GrantRevoked {
                            grant: id.clone(),
                            reason,
                        });
                        db.append(&actor, &event).await?;
                        db.changed("revoked", &id).await?;
                        Ok(true)
                    })
                }))
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
                .call(op(move |db| {
                    Box::pin(async move {
                        db.lock_changes().await?;
                        // A revoked grant does not expire as well.
                        if queries::get_grant(db.tx, &id)
                            .await?
                            .is_some_and(|g| g.revoked_at.is_some())
                        {
                            return Ok(false);
                        }
                        db.append(
                            "jitgated",
                            &Event::GrantExpired(GrantExpired { grant: id.clone() }),
                        )
                        .await?;
                        db.changed("expired", &id).await?;
                        Ok(true)
                    })
                }))
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

    /// This host's records (each host publishes its own chain's).
    fn audit_feed(&self) -> broadcast::Receiver<AuditEvent> {
        self.feed.subscribe()
    }

    fn start_task(&self, task: Task, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                queries::insert_task(db.tx, db.host, &task).await?;
                db.append(
                    &actor,
                    &Event::TaskStarted(TaskStarted {
                        task: task.id.clone(),
                        identity: task.identity.clone(),
                        run_as_uid: task.run_as_uid,
                        command: task.command.clone(),
                        reason: task.reason.clone(),
                    }),
                )
                .await?;
                Ok(())
            })
        })))
    }

    fn end_task(&self, id: String) -> StoreFuture<'_, bool> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                let ended = queries::end_task(db.tx, &id).await?;
                if ended {
                    db.append("jitgated", &Event::TaskEnded(TaskRef { task: id }))
                        .await?;
                }
                Ok(ended)
            })
        })))
    }

    fn running_tasks(&self) -> StoreFuture<'_, Vec<Task>> {
        let host = self.host.clone();
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { queries::running_tasks(c, &host).await })),
        )
    }

    fn session_opened(&self, session: Session) {
        if let Some(audit) =
            Self::audit_record(&session_actor(&session), &Event::session_start(&session))
        {
            self.submit(Record::SessionStart { session, audit });
        }
    }

    fn session_refused(&self, session: Session) {
        if let Some(audit) =
            Self::audit_record(&session_actor(&session), &Event::session_refused(&session))
        {
            self.submit(Record::SessionRefused { session, audit });
        }
    }

    fn session_ended(&self, session: Session) {
        if let Some(audit) =
            Self::audit_record(&session_actor(&session), &Event::session_end(&session))
        {
            self.submit(Record::SessionEnd { session, audit });
        }
    }

    fn record_statements(&self, batch: Vec<StatementRecord>) {
        self.submit(Record::Statements { batch });
    }

    fn sessions(&self, open_only: bool, limit: usize) -> StoreFuture<'_, Vec<Session>> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move { queries::list_sessions(db.tx, open_only, limit).await })
        })))
    }

    fn session_history(&self, id: String) -> StoreFuture<'_, Option<SessionHistory>> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                let Some(session) = queries::get_session(db.tx, &id).await? else {
                    return Ok(None);
                };
                Ok(Some(SessionHistory {
                    session,
                    statements: queries::session_statements(db.tx, &id).await?,
                    events: audit::for_session(db.tx, &id).await?,
                    unreadable: 0,
                }))
            })
        })))
    }

    fn close_orphan_sessions(&self) -> StoreFuture<'_, usize> {
        Box::pin(self.call(op(|db| {
            Box::pin(async move { queries::close_orphan_sessions(db.tx, db.host).await })
        })))
    }

    fn prune_sessions(&self, cutoff: Timestamp) -> StoreFuture<'_, usize> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move { queries::prune_sessions(db.tx, cutoff).await })
        })))
    }

    fn append_audit(&self, actor: String, event: Event) -> StoreFuture<'_, ()> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                db.append(&actor, &event).await?;
                Ok(())
            })
        })))
    }

    fn submit_audit(&self, actor: String, event: Event) {
        if let Some(audit) = Self::audit_record(&actor, &event) {
            self.submit(Record::Audit { audit });
        }
    }

    fn audit_log(
        &self,
        since: Option<Timestamp>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<AuditEvent>> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move { audit::list(db.tx, db.host, since, limit).await })
        })))
    }

    fn verify_audit(&self) -> StoreFuture<'_, VerifyReport> {
        let key = self.key.clone();
        let head_path = self.head_path.clone();
        Box::pin(self.call(op(move |db| {
            Box::pin(async move { audit::verify(db.tx, db.host, &key, &head_path).await })
        })))
    }

    fn insert_api_token(&self, token: ApiToken, actor: String) -> StoreFuture<'_, ()> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                tokens::insert(db.tx, &token).await?;
                db.append(&actor, &super::token_issued(&token)).await?;
                Ok(())
            })
        })))
    }

    fn api_token(&self, id: String) -> StoreFuture<'_, Option<ApiToken>> {
        Box::pin(
            self.pool
                .read(move |c| Box::pin(async move { tokens::get(c, &id).await })),
        )
    }

    fn api_tokens(&self, user: Option<String>, limit: usize) -> StoreFuture<'_, Vec<ApiToken>> {
        Box::pin(
            self.pool.read(move |c| {
                Box::pin(async move { tokens::list(c, user.as_deref(), limit).await })
            }),
        )
    }

    fn revoke_api_token(&self, id: String, actor: String) -> StoreFuture<'_, bool> {
        Box::pin(self.call(op(move |db| {
            Box::pin(async move {
                let revoked = tokens::revoke(db.tx, &id, Timestamp::now()).await?;
                if revoked {
                    db.append(
                        &actor,
                        &Event::TokenRevoked(super::audit::TokenRef { token: id }),
                    )
                    .await?;
                }
                Ok(revoked)
            })
        })))
    }

    /// Waits until every record queued before it is written or, with the store out of
    /// reach, kept in the spool (so a clean shutdown during an outage loses nothing); fails
    /// when the store could not be written.
    fn verify_audit_fleet(&self) -> StoreFuture<'_, super::audit::fleet::FleetReport> {
        // Fleet verification (store/postgres/fleet.rs): on a read connection, not the writer.
        let own_key = self.key.signer().map(|s| s.public_key_hex());
        let pins = self
            .head_path
            .with_file_name(super::audit::fleet::PINS_FILE);
        Box::pin(async move {
            // A connection of its own, not a pooled one: the snapshot transaction it opens
            // must never be left behind for another reader if this call is cancelled.
            self.health.check()?;
            let mut client = self.pool.connector.connect(None).await?;
            fleet::verify(&mut client, &self.host, own_key.as_deref(), &pins).await
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.writer.call(op(|_| Box::pin(async { Ok(()) }))))
    }

    fn health(&self) -> Option<StoreHealth> {
        Some(self.health.clone())
    }

    fn writes(&self) -> Option<WriteHealth> {
        Some(self.writes.clone())
    }
}
