//! The store thread: owns the connection, runs queued operations in batched transactions.
//!
//! The thread runs whatever is queued in one transaction (one fsync for many operations),
//! each operation in its own savepoint so one failure does not undo the others, and only
//! answers the callers once the transaction is durable. Fire-and-forget writes linger up to
//! [`LINGER`] for company before they commit, so that busy sessions share one fsync instead
//! of paying one each; a waiting caller ends the lingering at once, and sees every write
//! queued before it. After each commit the audit head checkpoint is rewritten, and the audit
//! records the transaction made are published on the store's audit feed.
//!
//! Lingering never costs the data path a wake-up per write: while the thread lingers it
//! sleeps (parked with a deadline) instead of blocking on the channel, so a fire-and-forget
//! send finds no waiter to wake; only a caller that waits for its answer unparks it.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{broadcast, oneshot};
use tracing::{error, warn};

use super::audit;
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

/// What a queued operation runs against: the open transaction, and the audit key to seal
/// the records it appends.
pub struct Db<'a> {
    pub conn: &'a Connection,
    key: &'a AuditKey,
    /// The records this operation appended, published once its transaction commits.
    appended: &'a RefCell<Vec<Sealed>>,
}

impl Db<'_> {
    /// Walks the audit chain against the head checkpoint at `head_path`.
    pub fn verify_audit(&self, head_path: &Path) -> Result<crate::store::VerifyReport> {
        audit::verify(self.conn, self.key, head_path)
    }

    /// Appends one audit record in this transaction.
    pub fn append(&self, actor: &str, event: &Event) -> Result<i64> {
        let sealed = audit::append(self.conn, self.key, actor, event)?;
        let seq = sealed.seq;
        self.appended.borrow_mut().push(sealed);
        Ok(seq)
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
    /// The store thread, unparked by callers that wait (see the module doc).
    thread: thread::Thread,
}

impl Writer {
    /// Starts the thread that owns `conn`, sealing audit records with `key`, keeping the head
    /// checkpoint at `head_path` and publishing committed audit records on `feed`.
    pub fn spawn(
        conn: Connection,
        key: AuditKey,
        head_path: PathBuf,
        feed: broadcast::Sender<AuditEvent>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let handle = thread::Builder::new()
            .name("jitgate-store".into())
            .spawn(move || run(conn, &key, &rx, &head_path, &feed))?;
        Ok(Self {
            tx,
            thread: handle.thread().clone(),
        })
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
        // Ends a linger in progress (a blocked `recv` is woken by the send itself).
        self.thread.unpark();
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

fn run(
    mut conn: Connection,
    key: &AuditKey,
    rx: &mpsc::Receiver<Box<dyn Job>>,
    head_path: &Path,
    feed: &broadcast::Sender<AuditEvent>,
) {
    let mut last_head = None;
    while let Ok(first) = rx.recv() {
        let jobs = gather(rx, first);
        let (jobs, committed) = run_batch(&mut conn, key, jobs);
        if let Err(e) = &committed {
            error!(error = %e, "state store transaction failed");
        }
        let mut published = Vec::new();
        for (job, appended) in jobs {
            if committed.is_ok() {
                published.extend(appended);
            }
            job.finish(committed.clone());
        }
        if committed.is_ok() {
            // Converting costs a JSON parse per record: only for someone listening.
            if feed.receiver_count() > 0 {
                for sealed in &published {
                    let _ = feed.send(sealed.to_event());
                }
            }
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

/// The jobs of one transaction: `first`, and what else is queued. A waited-for job ends the
/// gathering at once; otherwise it lingers up to [`LINGER`] for company, parked rather than
/// blocked on the channel so that fire-and-forget senders wake nobody.
fn gather(rx: &mpsc::Receiver<Box<dyn Job>>, first: Box<dyn Job>) -> Vec<Box<dyn Job>> {
    let linger_until = Instant::now() + LINGER;
    let mut waited_for = first.awaited();
    let mut jobs = vec![first];
    loop {
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    waited_for |= job.awaited();
                    jobs.push(job);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                // The store is closing: commit what there is.
                Err(mpsc::TryRecvError::Disconnected) => return jobs,
            }
        }
        let now = Instant::now();
        if waited_for || jobs.len() >= MAX_BATCH || now >= linger_until {
            return jobs;
        }
        thread::park_timeout(linger_until - now);
    }
}

/// A job and the audit records it appended.
type Ran = (Box<dyn Job>, Vec<Sealed>);

fn run_batch(
    conn: &mut Connection,
    key: &AuditKey,
    jobs: Vec<Box<dyn Job>>,
) -> (Vec<Ran>, std::result::Result<(), String>) {
    let mut ran: Vec<Ran> = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    let committed = (|| {
        let mut tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| e.to_string())?;
        for mut job in jobs.by_ref() {
            let appended = RefCell::new(Vec::new());
            let sp = tx.savepoint().map_err(|e| e.to_string());
            let sp = match sp {
                Ok(sp) => sp,
                Err(e) => {
                    ran.push((job, Vec::new()));
                    return Err(e);
                }
            };
            let ok = job.run(&Db {
                conn: &sp,
                key,
                appended: &appended,
            });
            let kept = if ok {
                sp.commit().map_err(|e| e.to_string())
            } else {
                // Dropping a savepoint rolls it back, and what it appended with it.
                drop(sp);
                Ok(())
            };
            let appended = if ok {
                appended.into_inner()
            } else {
                Vec::new()
            };
            ran.push((job, appended));
            kept?;
        }
        tx.commit().map_err(|e| e.to_string())
    })();
    // Jobs never run (the transaction failed before them) are answered with the failure.
    ran.extend(jobs.map(|job| (job, Vec::new())));
    (ran, committed)
}
