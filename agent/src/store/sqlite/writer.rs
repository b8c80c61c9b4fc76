//! The store thread: owns the connection, runs queued operations in batched transactions.
//!
//! The thread runs whatever is queued in one transaction (one fsync for many operations),
//! each operation in its own savepoint so one failure does not undo the others, and only
//! answers the callers once the transaction is durable. Fire-and-forget writes linger up to
//! [`LINGER`] for company before they commit, so that busy sessions share one fsync instead
//! of paying one each; a waiting caller ends the lingering at once, and sees every write
//! queued before it. After each commit the audit head checkpoint is rewritten.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;
use tracing::{error, warn};

use super::audit;
use crate::store::{
    Result, StoreError,
    audit::{AuditKey, Event},
};

/// At most this many queued operations share one transaction.
const MAX_BATCH: usize = 512;

/// How long a transaction of fire-and-forget writes only waits for more before committing.
const LINGER: Duration = Duration::from_millis(100);

/// What a queued operation runs against: the open transaction, and the audit key to seal
/// the records it appends.
pub struct Db<'a> {
    pub conn: &'a Connection,
    key: &'a AuditKey,
}

impl Db<'_> {
    /// Walks the audit chain against the head checkpoint at `head_path`.
    pub fn verify_audit(&self, head_path: &Path) -> Result<crate::store::VerifyReport> {
        audit::verify(self.conn, self.key, head_path)
    }

    /// Appends one audit record in this transaction.
    pub fn append(&self, actor: &str, event: &Event) -> Result<i64> {
        audit::append(self.conn, self.key, actor, event)
    }
}

/// One queued operation. `run` executes inside a savepoint; `finish` is called after the
/// enclosing transaction committed (or failed to).
trait Job: Send {
    /// Whether a caller waits for this job's commit.
    fn awaited(&self) -> bool;
    fn run(&mut self, db: &Db<'_>) -> bool;
    fn finish(self: Box<Self>, committed: std::result::Result<(), String>);
}

struct Call<T, F> {
    f: Option<F>,
    result: Option<Result<T>>,
    reply: Option<oneshot::Sender<Result<T>>>,
}

impl<T, F> Job for Call<T, F>
where
    T: Send,
    F: FnOnce(&Db<'_>) -> Result<T> + Send,
{
    fn awaited(&self) -> bool {
        self.reply.is_some()
    }

    fn run(&mut self, db: &Db<'_>) -> bool {
        let Some(f) = self.f.take() else {
            return false;
        };
        let result = f(db);
        let ok = result.is_ok();
        if let Err(e) = &result
            && self.reply.is_none()
        {
            warn!(error = %e, "background store write failed");
        }
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: std::result::Result<(), String>) {
        let Some(reply) = self.reply else { return };
        let result = match (committed, self.result) {
            (Ok(()), Some(r)) => r,
            (Err(e), Some(Ok(_))) => Err(StoreError::Commit(e)),
            (_, Some(Err(e))) => Err(e),
            (_, None) => Err(StoreError::Closed),
        };
        let _ = reply.send(result);
    }
}

/// Handle on the store thread.
pub struct Writer {
    tx: mpsc::Sender<Box<dyn Job>>,
}

impl Writer {
    /// Starts the thread that owns `conn`, sealing audit records with `key` and keeping the
    /// head checkpoint at `head_path`.
    pub fn spawn(conn: Connection, key: AuditKey, head_path: PathBuf) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        thread::Builder::new()
            .name("jitgate-store".into())
            .spawn(move || run(conn, &key, &rx, &head_path))?;
        Ok(Self { tx })
    }

    /// Runs `f` on the store thread and returns its result once committed.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db<'_>) -> Result<T> + Send + 'static,
    {
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
    pub fn submit<F>(&self, f: F)
    where
        F: FnOnce(&Db<'_>) -> Result<()> + Send + 'static,
    {
        let job: Call<(), F> = Call {
            f: Some(f),
            result: None,
            reply: None,
        };
        if self.tx.send(Box::new(job)).is_err() {
            warn!("state store is shut down; dropping a background write");
        }
    }
}

fn run(mut conn: Connection, key: &AuditKey, rx: &mpsc::Receiver<Box<dyn Job>>, head_path: &Path) {
    let mut last_head = None;
    while let Ok(first) = rx.recv() {
        let linger_until = Instant::now() + LINGER;
        let mut waited_for = first.awaited();
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            let next = if waited_for {
                rx.try_recv().ok()
            } else {
                rx.recv_timeout(linger_until.saturating_duration_since(Instant::now()))
                    .ok()
            };
            let Some(job) = next else { break };
            waited_for |= job.awaited();
            jobs.push(job);
        }
        let committed = run_batch(&mut conn, key, &mut jobs);
        if let Err(e) = &committed {
            error!(error = %e, "state store transaction failed");
        }
        for job in jobs {
            job.finish(committed.clone());
        }
        if committed.is_ok() {
            match audit::head(&conn) {
                Ok(head) if head != last_head => {
                    if let Some(h) = &head
                        && let Err(e) = audit::write_head(head_path, h)
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

fn run_batch(
    conn: &mut Connection,
    key: &AuditKey,
    jobs: &mut [Box<dyn Job>],
) -> std::result::Result<(), String> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    for job in jobs.iter_mut() {
        let sp = tx.savepoint().map_err(|e| e.to_string())?;
        if job.run(&Db { conn: &sp, key }) {
            sp.commit().map_err(|e| e.to_string())?;
        } else {
            // Dropping a savepoint rolls it back.
            drop(sp);
        }
    }
    tx.commit().map_err(|e| e.to_string())
}
