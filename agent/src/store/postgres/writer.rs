//! The writer task: one connection that runs queued operations in batched transactions,
//! as the SQLite store's writer thread does.
//!
//! Whatever is queued runs in one transaction, each operation in its own savepoint so one
//! failure does not undo the others, and callers are answered only once the transaction has
//! committed (PostgreSQL's commit is durable with its default `synchronous_commit`).
//! Fire-and-forget writes linger up to [`LINGER`] for company; a waiting caller ends the
//! lingering at once and sees every write queued before it. A lost connection fails the
//! batch it was running (its callers get the error: nothing is granted on a write that was
//! not confirmed) and is reopened for the next.

use std::{
    path::PathBuf,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tokio_postgres::{Client, Transaction};
use tracing::{error, warn};

use super::{audit, connect::Connector};
use crate::{
    model::AuditEvent,
    store::{
        Result, StoreError,
        audit::{AuditKey, Event, Sealed},
    },
};

/// At most this many queued operations share one transaction.
const MAX_BATCH: usize = 512;

/// How long a transaction of fire-and-forget writes only waits for more before committing.
const LINGER: Duration = Duration::from_millis(100);

/// The fleet-wide lock every transaction that records a [change](Db::changed) takes before it
/// touches a request or grant: `changes.seq` then commits in order.
const CHANGES_LOCK: i64 = 0x6a67_6368_616e_6765;

/// What a queued operation runs against: the open transaction, this host's name and the
/// audit key that seals its records.
pub struct Db<'a> {
    pub tx: &'a Transaction<'a>,
    pub host: &'a str,
    key: &'a AuditKey,
    /// The records this operation appended, published once its transaction commits.
    appended: &'a Mutex<Vec<Sealed>>,
}

impl Db<'_> {
    /// Appends one audit record to this host's chain in this transaction.
    pub async fn append(&self, actor: &str, event: &Event) -> Result<i64> {
        audit::lock_chain(self.tx, self.host).await?;
        let sealed = audit::append(self.tx, self.host, self.key, actor, event).await?;
        let seq = sealed.seq;
        self.appended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sealed);
        Ok(seq)
    }

    /// Takes the change-log lock. Call first in an operation that will record a change.
    pub async fn lock_changes(&self) -> Result<()> {
        self.tx
            .execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGES_LOCK])
            .await?;
        Ok(())
    }

    /// Records a change other hosts must learn (`issued`, `revoked`, `expired`, `decided`),
    /// and wakes their listeners when this transaction commits.
    pub async fn changed(&self, kind: &str, subject: &str) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO changes (host_id, kind, subject) VALUES ($1, $2, $3)",
                &[&self.host, &kind, &subject],
            )
            .await?;
        self.tx
            .execute("SELECT pg_notify('jitgate_changes', '')", &[])
            .await?;
        Ok(())
    }
}

/// An operation: given the transaction, a future that does the work.
pub type Op<T> = Box<dyn for<'a> FnOnce(&'a Db<'a>) -> BoxFuture<'a, Result<T>> + Send>;

trait Job: Send {
    fn awaited(&self) -> bool;
    fn run<'a>(&'a mut self, db: &'a Db<'a>) -> BoxFuture<'a, bool>;
    fn finish(self: Box<Self>, committed: std::result::Result<(), String>);
}

struct Call<T> {
    f: Option<Op<T>>,
    result: Option<Result<T>>,
    reply: Option<oneshot::Sender<Result<T>>>,
}

impl<T: Send + 'static> Job for Call<T> {
    fn awaited(&self) -> bool {
        self.reply.is_some()
    }

    fn run<'a>(&'a mut self, db: &'a Db<'a>) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(f) = self.f.take() else {
                return false;
            };
            let result = f(db).await;
            let ok = result.is_ok();
            if let Err(e) = &result
                && self.reply.is_none()
            {
                warn!(error = %e, "background store write failed");
            }
            self.result = Some(result);
            ok
        })
    }

    fn finish(self: Box<Self>, committed: std::result::Result<(), String>) {
        let Some(reply) = self.reply else { return };
        let result = match (committed, self.result) {
            (Ok(()), Some(r)) => r,
            (Err(e), Some(Ok(_))) => Err(StoreError::Commit(e)),
            (_, Some(Err(e))) => Err(e),
            (Err(e), None) => Err(StoreError::Commit(e)),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        let _ = reply.send(result);
    }
}

/// Handle on the writer task.
pub struct Writer {
    tx: mpsc::UnboundedSender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the task that owns `client` (reopened through `connector` when lost), writing
    /// as `host` with `key`, keeping the head checkpoint at `head_path` and publishing
    /// committed audit records on `feed`.
    pub fn spawn(
        client: Option<Client>,
        connector: Connector,
        host: String,
        key: AuditKey,
        head_path: PathBuf,
        feed: broadcast::Sender<AuditEvent>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Box<dyn Job>>();
        tokio::spawn(run(
            State {
                client,
                connector,
                host,
                key,
                head_path,
                feed,
            },
            rx,
        ));
        Self { tx }
    }

    /// Runs `f` in the writer's transaction; returns its result once committed.
    pub async fn call<T: Send + 'static>(&self, f: Op<T>) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job = Call {
            f: Some(f),
            result: None,
            reply: Some(reply),
        };
        self.tx
            .send(Box::new(job))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues `f` without waiting (session bookkeeping on the data path).
    pub fn submit(&self, f: Op<()>) {
        let job = Call {
            f: Some(f),
            result: None,
            reply: None,
        };
        if self.tx.send(Box::new(job)).is_err() {
            warn!("state store is shut down; dropping a background write");
        }
    }
}

struct State {
    client: Option<Client>,
    connector: Connector,
    host: String,
    key: AuditKey,
    head_path: PathBuf,
    feed: broadcast::Sender<AuditEvent>,
}

async fn run(mut state: State, mut rx: mpsc::UnboundedReceiver<Box<dyn Job>>) {
    let mut last_head = None;
    while let Some(first) = rx.recv().await {
        let linger_until = Instant::now() + LINGER;
        let mut waited_for = first.awaited();
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            let next = if waited_for {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(linger_until, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(job) = next else { break };
            waited_for |= job.awaited();
            jobs.push(job);
        }
        let mut published = Vec::new();
        let committed = run_batch(&mut state, &mut jobs, &mut published).await;
        if let Err(e) = &committed {
            error!(error = %e, "shared state store transaction failed");
        }
        for job in jobs {
            job.finish(committed.clone());
        }
        if committed.is_ok() && state.feed.receiver_count() > 0 {
            for sealed in &published {
                let _ = state.feed.send(sealed.to_event());
            }
        }
        if committed.is_ok()
            && !published.is_empty()
            && let Some(client) = &state.client
        {
            match audit::head(client, &state.host).await {
                Ok(head) if head != last_head => {
                    if let Some(h) = &head
                        && let Err(e) = audit::write_head(&state.head_path, h)
                    {
                        warn!(error = %e, "could not write the audit head checkpoint");
                    }
                    last_head = head;
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not read the audit head"),
            }
        }
    }
}

async fn run_batch(
    state: &mut State,
    jobs: &mut [Box<dyn Job>],
    published: &mut Vec<Sealed>,
) -> std::result::Result<(), String> {
    if state.client.as_ref().is_none_or(Client::is_closed) {
        state.client = None;
        let client = state
            .connector
            .connect(None)
            .await
            .map_err(|e| format!("reconnecting to the shared store: {e}"))?;
        state.client = Some(client);
    }
    let Some(client) = state.client.as_mut() else {
        return Err("no connection to the shared store".into());
    };
    let result = batch(client, &state.host, &state.key, jobs, published).await;
    if result.is_err() && client.is_closed() {
        state.client = None;
    }
    result
}

async fn batch(
    client: &mut Client,
    host: &str,
    key: &AuditKey,
    jobs: &mut [Box<dyn Job>],
    published: &mut Vec<Sealed>,
) -> std::result::Result<(), String> {
    let mut tx = client.transaction().await.map_err(|e| e.to_string())?;
    for job in jobs.iter_mut() {
        let sp = tx.savepoint("job").await.map_err(|e| e.to_string())?;
        let appended = Mutex::new(Vec::new());
        let ok = {
            let db = Db {
                tx: &sp,
                host,
                key,
                appended: &appended,
            };
            job.run(&db).await
        };
        if ok {
            sp.commit().await.map_err(|e| e.to_string())?;
            // Published only if the whole transaction commits (the caller checks).
            published.extend(
                appended
                    .into_inner()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        } else {
            sp.rollback().await.map_err(|e| e.to_string())?;
        }
    }
    tx.commit().await.map_err(|e| e.to_string())
}
