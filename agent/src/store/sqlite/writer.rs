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
//! A write the disk does not keep (full, an I/O error, a database made read-only or damaged)
//! (or a state directory about to fill: less than [`MIN_FREE`] left before a commit)
//! is reported on the store's [`WriteHealth`]: the grant engine then ends live sessions and
//! refuses new ones, since what they do could not be recorded. From then on the thread
//! probes every [`PROBE_EVERY`] with a write of its own ([`probe`]) and reports the store
//! healthy only once one is committed.
//!
//! Lingering never costs the data path a wake-up per write: while the thread lingers it
//! sleeps (parked with a deadline) instead of blocking on the channel, so a fire-and-forget
//! send finds no waiter to wake; only a caller that waits for its answer unparks it.

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
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
        health::WriteHealth,
    },
};

/// At most this many queued operations share one transaction.
const MAX_BATCH: usize = 512;

/// How long a transaction of fire-and-forget writes only waits for more before committing.
const LINGER: Duration = Duration::from_millis(100);

/// How often a store whose writes failed is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The probe's write: enough pages that it needs the room a statement record does.
const PROBE_BYTES: i64 = 256 * 1024;

/// Free space the state directory's filesystem must keep: below it the store counts as
/// failing before a write has failed (records are about to be lost), and a probe does not
/// reopen it (a write that just fits would reopen the gate for the next record to fail).
const MIN_FREE: u64 = 8 * 1024 * 1024;

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

/// Why a job failed: `Some` with the error when the storage failed it (see
/// [`storage_failure`]), `None` for a failure of the job's own (a conflict, bad input).
type Failed = Option<String>;

/// Whether `e` says the storage cannot keep writes (rather than that this write was wrong):
/// the disk is full, I/O failed, the database is read-only, locked past the busy timeout,
/// damaged, or gone.
fn storage_failure(e: &StoreError) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        StoreError::Io(_) | StoreError::Commit(_) => true,
        StoreError::Backend(b) => b
            .downcast_ref::<rusqlite::Error>()
            .and_then(rusqlite::Error::sqlite_error_code)
            .is_some_and(|c| {
                matches!(
                    c,
                    C::DiskFull
                        | C::SystemIoFailure
                        | C::ReadOnly
                        | C::DatabaseCorrupt
                        | C::NotADatabase
                        | C::CannotOpen
                        | C::DatabaseBusy
                        | C::DatabaseLocked
                        | C::FileLockingProtocolFailed
                        | C::OutOfMemory
                        | C::PermissionDenied
                        | C::NoLargeFileSupport
                )
            }),
        _ => false,
    }
}

/// One queued operation. `run` executes inside a savepoint; `finish` is called after the
/// enclosing transaction committed (or failed to).
trait Job: Send {
    /// Whether a caller waits for this job's commit.
    fn awaited(&self) -> bool;
    /// The bytes of records it counts in the store's backlog (fire-and-forget writes).
    fn bytes(&self) -> usize;
    fn run(&mut self, db: &Db<'_>) -> std::result::Result<(), Failed>;
    fn finish(self: Box<Self>, committed: std::result::Result<(), String>);
}

struct Call<T, F> {
    f: Option<F>,
    /// See [`Job::bytes`].
    bytes: usize,
    /// Called when the job's write was not kept (it failed, or its transaction did).
    on_lost: Option<Lost>,
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

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn run(&mut self, db: &Db<'_>) -> std::result::Result<(), Failed> {
        let Some(f) = self.f.take() else {
            return Err(None);
        };
        // A panic in an operation must not take the store thread (and every later write)
        // with it: it fails this operation, as a storage failure (the gate closes).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(db)))
            .unwrap_or_else(|_| {
                Err(StoreError::Io(std::io::Error::other(
                    "a store operation panicked (a bug: see the agent's log)",
                )))
            });
        let failed = match &result {
            Ok(_) => Ok(()),
            Err(e) => {
                if self.reply.is_none() {
                    warn!(error = %e, "background store write failed");
                }
                Err(storage_failure(e).then(|| e.to_string()))
            }
        };
        self.result = Some(result);
        failed
    }

    fn finish(mut self: Box<Self>, committed: std::result::Result<(), String>) {
        if (committed.is_err() || !matches!(self.result, Some(Ok(_))))
            && let Some(lost) = self.on_lost.take()
        {
            lost();
        }
        let Some(reply) = self.reply else { return };
        let result = match (committed, self.result) {
            (Ok(()), Some(r)) => r,
            (Err(e), Some(Ok(_)) | None) => Err(StoreError::Commit(e)),
            (_, Some(Err(e))) => Err(e),
            (Ok(()), None) => Err(StoreError::Closed),
        };
        let _ = reply.send(result);
    }
}

/// Handle on the store thread.
pub struct Writer {
    tx: mpsc::Sender<Box<dyn Job>>,
    /// Counts the backlog of fire-and-forget writes.
    writes: WriteHealth,
    /// The store thread, unparked by callers that wait (see the module doc).
    thread: thread::Thread,
}

impl Writer {
    /// Starts the thread that owns `conn`, sealing audit records with `key`, keeping the head
    /// checkpoint at `head_path` and publishing committed audit records on `feed`.
    /// Write failures are reported on `writes`; `on_recovery` runs once they are kept again.
    pub fn spawn(
        conn: Connection,
        key: AuditKey,
        head_path: PathBuf,
        feed: broadcast::Sender<AuditEvent>,
        writes: WriteHealth,
        on_recovery: Recovery,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        let counted = writes.clone();
        let handle = thread::Builder::new()
            .name("jitgate-store".into())
            .spawn(move || {
                // However the thread ends, nothing is written any more: the gate closes.
                let _stopped = Stopped(writes.clone());
                run(
                    conn,
                    &key,
                    &rx,
                    &Sink {
                        head_path: &head_path,
                        feed: &feed,
                        writes: &writes,
                        on_recovery,
                    },
                );
            })?;
        Ok(Self {
            tx,
            writes: counted,
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
            bytes: 0,
            on_lost: None,
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

    /// Queues `f` without waiting (session bookkeeping on the data path), counting `bytes`
    /// (about what it writes) in the backlog until it is written.
    pub fn submit<F>(&self, bytes: usize, f: F)
    where
        F: FnOnce(&Db<'_>) -> Result<()> + Send + 'static,
    {
        self.submit_or(bytes, f, None);
    }

    /// [`Writer::submit`], calling `on_lost` if the write is not kept.
    pub fn submit_or<F>(&self, bytes: usize, f: F, on_lost: Option<Lost>)
    where
        F: FnOnce(&Db<'_>) -> Result<()> + Send + 'static,
    {
        let job: Call<(), F> = Call {
            f: Some(f),
            bytes,
            on_lost,
            result: None,
            reply: None,
        };
        self.writes.queued(bytes);
        if let Err(mpsc::SendError(job)) = self.tx.send(Box::new(job)) {
            self.writes.done(bytes);
            self.writes.failed("the state store's thread has stopped");
            job.finish(Err("the state store's thread has stopped".into()));
            warn!("state store is shut down; dropping a background write");
        }
    }
}

/// Marks the store failing when the store thread ends (at shutdown, or a panic outside an
/// operation): no write queued after it would be kept.
struct Stopped(WriteHealth);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.failed("the state store's thread has stopped");
    }
}

/// Where the thread reports what it committed, and what it could not.
struct Sink<'a> {
    /// The audit head checkpoint.
    head_path: &'a Path,
    /// Committed audit records, for live subscribers.
    feed: &'a broadcast::Sender<AuditEvent>,
    writes: &'a WriteHealth,
    /// Run (as a write of its own) once writes are kept again after failing.
    on_recovery: Recovery,
}

/// What to do when a fire-and-forget write is not kept.
pub type Lost = Box<dyn FnOnce() + Send>;

/// What the store mends once its writes are kept again (records lost meanwhile whose
/// absence would mislead: sessions that ended while their end could not be written).
/// Called once writes are kept again: the write that mends, and what to do if that write is
/// not kept either (the store fails again at once).
pub type Recovery = Arc<dyn Fn() -> (Mend, Lost) + Send + Sync>;

/// A write run on the store thread.
pub type Mend = Box<dyn FnOnce(&Db<'_>) -> Result<()> + Send>;

fn run(mut conn: Connection, key: &AuditKey, rx: &mpsc::Receiver<Box<dyn Job>>, sink: &Sink<'_>) {
    let writes = sink.writes;
    let mut last_head = None;
    let mut probed = Instant::now();
    let mut was_failing = false;
    loop {
        // A probe waits a full interval after a failure begins: it is seen as such (and its
        // sessions cut) before writes can count as kept again.
        let failing = writes.get().is_some();
        if failing && !was_failing {
            probed = Instant::now();
        }
        was_failing = failing;
        // While writes fail, wake at least every PROBE_EVERY to probe.
        let first = if writes.get().is_some() {
            match rx.recv_timeout(PROBE_EVERY) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(mpsc::RecvError) => break,
            }
        };
        let mut recovered = false;
        if writes.get().is_some() && probed.elapsed() >= PROBE_EVERY {
            probed = Instant::now();
            match probe(&mut conn, sink.head_path) {
                Ok(()) => {
                    warn!("the state store keeps writes again: the gate reopens");
                    writes.kept();
                    recovered = true;
                }
                Err(e) => tracing::debug!(error = %e, "state store probe failed"),
            }
        }
        let mut jobs = first.map(|first| gather(rx, first)).unwrap_or_default();
        if recovered {
            // After what was gathered: what is mended is only what was lost before.
            let (mend, lost) = (sink.on_recovery)();
            jobs.push(Box::new(Call {
                f: Some(mend),
                bytes: 0,
                on_lost: Some(lost),
                result: None,
                reply: None::<oneshot::Sender<Result<()>>>,
            }));
        }
        if !jobs.is_empty() {
            commit(&mut conn, key, jobs, sink, &mut last_head);
        }
    }
}

/// Runs `jobs` in one transaction, answers their callers, publishes the audit records they
/// appended and moves the head checkpoint on (`last_head`: the head last written).
fn commit(
    conn: &mut Connection,
    key: &AuditKey,
    jobs: Vec<Box<dyn Job>>,
    sink: &Sink<'_>,
    last_head: &mut Option<crate::store::audit::Head>,
) {
    let Sink {
        head_path,
        feed,
        writes,
        ..
    } = *sink;
    if let Err(e) = room(head_path) {
        // Committed all the same (it may fit); the gate closes meanwhile.
        writes.failed(&e);
    }
    let (jobs, committed) = run_batch(conn, key, jobs, writes);
    if let Err(e) = &committed {
        error!(error = %e, "state store transaction failed");
        writes.failed(e);
    }
    let mut published = Vec::new();
    for (job, appended) in jobs {
        if committed.is_ok() {
            published.extend(appended);
        }
        let bytes = job.bytes();
        job.finish(committed.clone());
        writes.done(bytes);
    }
    if committed.is_err() {
        return;
    }
    // Converting costs a JSON parse per record: only for someone listening.
    if feed.receiver_count() > 0 {
        for sealed in &published {
            let _ = feed.send(sealed.to_event());
        }
    }
    match audit::head(conn) {
        Ok(head) if head != *last_head => {
            if let Some(h) = &head
                && let Err(e) = audit::write_head(head_path, h)
            {
                // Retried after the next commit (last_head is not moved on).
                warn!(error = %e, "could not write the audit head checkpoint");
                writes.failed(&format!("writing the audit head checkpoint: {e}"));
            } else {
                *last_head = head;
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the audit head"),
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

/// `Err` when the filesystem of the state directory (where `head_path` lives) has less than
/// [`MIN_FREE`] left: the gate closes before a record has to be lost. A filesystem that
/// cannot say counts as having room (the writes themselves still report failures).
fn room(head_path: &Path) -> std::result::Result<(), String> {
    room_for(head_path, MIN_FREE)
}

/// `Err` when the state directory's filesystem has less than `min` free.
fn room_for(head_path: &Path, min: u64) -> std::result::Result<(), String> {
    let dir = head_path.parent().unwrap_or(head_path);
    let fs = match nix::sys::statvfs::statvfs(dir) {
        Ok(fs) => fs,
        Err(e) => {
            tracing::debug!(error = %e, dir = %dir.display(), "statvfs of the state directory failed");
            return Ok(());
        }
    };
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let free = u64::from(fs.blocks_available()).saturating_mul(u64::from(fs.fragment_size()));
    if free < min {
        return Err(format!(
            "only {} free on the filesystem of the state directory {} (at least {} is kept free for records)",
            crate::model::human_bytes(free),
            dir.display(),
            crate::model::human_bytes(min)
        ));
    }
    Ok(())
}

/// Whether the storage keeps writes again: the state directory has room, and a write of
/// [`PROBE_BYTES`] is committed (then deleted).
fn probe(conn: &mut Connection, head_path: &Path) -> std::result::Result<(), String> {
    // Twice the room a commit needs: free space hovering at the bound must not reopen and
    // close the gate over and over.
    room_for(head_path, 2 * MIN_FREE)?;
    // The files beside the database too (the audit head checkpoint is rewritten there).
    let dir = head_path.parent().unwrap_or(head_path);
    let file = dir.join(".write-probe");
    let written = (|| {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&file)?;
        f.write_all(&[0_u8; 64 * 1024])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&file);
    written.map_err(|e| format!("writing {}: {e}", file.display()))?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    // A row an earlier probe could not delete goes first.
    tx.execute("DELETE FROM store_probe", [])
        .map_err(|e| e.to_string())?;
    tx.execute(
        "INSERT INTO store_probe (pad) VALUES (zeroblob(?1))",
        [PROBE_BYTES],
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    conn.execute("DELETE FROM store_probe", [])
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn run_batch(
    conn: &mut Connection,
    key: &AuditKey,
    jobs: Vec<Box<dyn Job>>,
    writes: &WriteHealth,
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
            let outcome = job.run(&Db {
                conn: &sp,
                key,
                appended: &appended,
            });
            if let Err(Some(e)) = &outcome {
                writes.failed(e);
            }
            // SQLite rolls the whole transaction back on some errors (a full disk, I/O,
            // busy, out of memory). The jobs after this one must not run: their savepoints
            // would each begin and commit a transaction of their own, while their callers
            // are told the batch failed.
            if outcome.is_err() && sp.is_autocommit() {
                drop(sp);
                let why = match outcome {
                    Err(Some(e)) => e,
                    _ => "a failed write".to_owned(),
                };
                ran.push((job, Vec::new()));
                return Err(format!("the transaction was rolled back: {why}"));
            }
            let ok = outcome.is_ok();
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
