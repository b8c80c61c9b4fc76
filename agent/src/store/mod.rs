//! The embedded state store: SQLite (WAL, `synchronous = FULL`) owned by one thread.
//!
//! Every database operation is a closure sent to that thread. The thread runs whatever is
//! queued in one transaction (one fsync for many operations), each closure in its own
//! savepoint so one failure does not undo the others, and only answers the callers once the
//! transaction is durable: an approval that was acknowledged survives `kill -9`.
//!
//! Fire-and-forget writes (statement records, session bookkeeping) linger up to
//! [`LINGER`] for company before they commit, so that busy sessions share one fsync instead
//! of paying one each; a waiting caller ends the lingering at once, and sees every write
//! queued before it.

pub mod audit;
pub mod queries;
mod schema;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;
use tracing::{error, warn};

/// Errors from the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One queued operation. `run` executes inside a savepoint; `finish` is called after the
/// enclosing transaction committed (or failed to).
trait Job: Send {
    /// Whether a caller waits for this job's commit.
    fn awaited(&self) -> bool;
    fn run(&mut self, db: &Connection) -> bool;
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
    F: FnOnce(&Connection) -> Result<T> + Send,
{
    fn awaited(&self) -> bool {
        self.reply.is_some()
    }

    fn run(&mut self, db: &Connection) -> bool {
        let f = self.f.take().expect("a job runs once");
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

/// Handle on the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Box<dyn Job>>,
    path: PathBuf,
}

/// At most this many queued operations share one transaction.
const MAX_BATCH: usize = 512;

/// How long a transaction of fire-and-forget writes only waits for more before committing.
const LINGER: Duration = Duration::from_millis(100);

impl Store {
    /// Opens (creating and migrating) the database in `state_dir`, and the audit key beside it.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        create_private_dir(state_dir)?;
        let path = state_dir.join("jitgate.db");
        let mut conn = Connection::open(&path)
            .with_context(|| format!("opening state store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        schema::migrate(&mut conn).context("migrating the state store")?;
        let key = audit::load_or_create_key(state_dir)?;
        let head_path = state_dir.join(audit::HEAD_FILE);
        let (tx, rx) = mpsc::channel::<Box<dyn Job>>();
        thread::Builder::new()
            .name("jitgate-store".into())
            .spawn(move || {
                audit::install_key(key);
                run(conn, &rx, &head_path);
            })
            .context("starting the store thread")?;
        Ok(Self { tx, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store thread and returns its result once committed.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
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
        F: FnOnce(&Connection) -> Result<()> + Send + 'static,
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

    /// Waits until everything queued before this call is committed.
    pub async fn flush(&self) -> Result<()> {
        self.call(|_| Ok(())).await
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};

    use anyhow::Context as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state_dir {}", dir.display()))?;
    }
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", dir.display()))?;
    }
    Ok(())
}

fn run(mut conn: Connection, rx: &mpsc::Receiver<Box<dyn Job>>, head_path: &Path) {
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
        let committed = run_batch(&mut conn, &mut jobs);
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

fn run_batch(conn: &mut Connection, jobs: &mut [Box<dyn Job>]) -> std::result::Result<(), String> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    for job in jobs.iter_mut() {
        let sp = tx.savepoint().map_err(|e| e.to_string())?;
        if job.run(&sp) {
            sp.commit().map_err(|e| e.to_string())?;
        } else {
            // Dropping a savepoint rolls it back.
            drop(sp);
        }
    }
    tx.commit().map_err(|e| e.to_string())
}
