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
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tokio_postgres::{Client, Transaction};
use tracing::{error, info, warn};

use super::{
    audit,
    connect::Connector,
    queries,
    spool::{AuditRecord, Record, Spool},
};
use crate::{
    model::{AuditEvent, Timestamp},
    store::{
        Result, StoreError,
        audit::{AuditKey, Event, Head, Sealed},
        health::{StoreHealth, StoreState, WriteHealth},
    },
};

/// How often the writer looks whether spooled records can be shipped (the store back and
/// caught up) when nothing else wakes it.
const SHIP_POLL: Duration = Duration::from_millis(200);

/// Spooled records shipped per transaction.
const SHIP_CHUNK: usize = 256;

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
        Ok(self.published_on_commit(sealed))
    }

    /// Appends a record made earlier (spooled, or queued) with the time it was made.
    pub async fn append_record(&self, record: &AuditRecord) -> Result<i64> {
        audit::lock_chain(self.tx, self.host).await?;
        let sealed = audit::append_parts(self.tx, self.host, self.key, record).await?;
        Ok(self.published_on_commit(sealed))
    }

    /// Keeps an appended record to go out on the audit feed once the transaction commits.
    fn published_on_commit(&self, sealed: Sealed) -> i64 {
        let seq = sealed.seq;
        self.appended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sealed);
        seq
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

/// Writes one fire-and-forget record (at once, or shipped from the spool).
pub async fn apply(db: &Db<'_>, record: &Record) -> Result<()> {
    match record {
        Record::SessionStart { session, audit } | Record::SessionRefused { session, audit } => {
            queries::insert_session(db.tx, db.host, session).await?;
            db.append_record(audit).await?;
        }
        Record::SessionEnd { session, audit } => {
            queries::end_session(db.tx, session).await?;
            db.append_record(audit).await?;
        }
        Record::Statements { batch } => queries::insert_statements(db.tx, batch).await?,
        Record::Audit { audit } => {
            db.append_record(audit).await?;
        }
    }
    Ok(())
}

/// What the writer's queue carries: an answered call, or a record (kept in the spool when
/// it cannot be written).
enum Item {
    Call(Box<dyn Job>),
    /// Boxed: records are large, calls small, and both share the queue.
    Put(Box<Record>),
}

impl Item {
    fn awaited(&self) -> bool {
        match self {
            Self::Call(job) => job.awaited(),
            Self::Put(_) => false,
        }
    }
}

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
    tx: mpsc::UnboundedSender<Item>,
    /// Counts the records queued and not yet taken by the writer (its backlog).
    writes: WriteHealth,
}

/// Where the writer writes, as whom, and what it reports to.
pub struct Setup {
    pub connector: Connector,
    pub host: String,
    pub key: AuditKey,
    /// This host's audit head checkpoint.
    pub head_path: PathBuf,
    /// Committed audit records are published here.
    pub feed: broadcast::Sender<AuditEvent>,
    pub health: StoreHealth,
    pub spool: Arc<Spool>,
    /// When this run began: sessions of this host begun before then and still open once a
    /// spool is shipped were left open by a run that ended without recording their end.
    pub started_at: Timestamp,
}

impl Writer {
    /// Starts the task that writes through `setup.connector` (reopened when lost), counting
    /// its backlog on `writes`.
    pub fn spawn(setup: Setup, writes: WriteHealth) -> Self {
        let (tx, rx) = mpsc::unbounded_channel::<Item>();
        let counted = writes.clone();
        setup.health.spool(setup.spool.stats());
        tokio::spawn(run(
            State {
                client: None,
                setup,
                last_head: None,
                registered: false,
            },
            rx,
            counted,
        ));
        Self { tx, writes }
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
            .send(Item::Call(Box::new(job)))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a record without waiting (session bookkeeping on the data path): written with
    /// the next batch, or kept in the spool while the store is out of reach.
    pub fn submit(&self, record: Record) {
        let bytes = record.approx_bytes();
        self.writes.queued(bytes);
        if self.tx.send(Item::Put(Box::new(record))).is_err() {
            self.writes.done(bytes);
            self.writes
                .failed("the shared state store's writer has stopped");
            warn!("state store is shut down; dropping a background write");
        }
    }
}

struct State {
    client: Option<Client>,
    setup: Setup,
    last_head: Option<Head>,
    /// This run's spool has been registered with the store as this host's current one
    /// ([`super::spools`]).
    registered: bool,
}

async fn run(mut state: State, mut rx: mpsc::UnboundedReceiver<Item>, writes: WriteHealth) {
    // However the task ends (a panic included), nothing queued after is written: the gate
    // closes rather than let sessions run unrecorded.
    struct Stopped(WriteHealth);
    impl Drop for Stopped {
        fn drop(&mut self) {
            self.0.failed("the shared state store's writer has stopped");
        }
    }
    let _stopped = Stopped(writes.clone());
    let mut health = state.setup.health.subscribe();
    loop {
        register_if_due(&mut state).await;
        let first = if state.setup.spool.pending() && state.setup.spool.problem().is_none() {
            tokio::select! {
                item = rx.recv() => item,
                () = tokio::time::sleep(SHIP_POLL) => {
                    ship_if_due(&mut state).await;
                    continue;
                }
            }
        } else if !state.registered && state.setup.spool.problem().is_none() {
            // Woken when the store is reached, to register the spool before anything else.
            tokio::select! {
                item = rx.recv() => item,
                changed = health.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    continue;
                }
                () = tokio::time::sleep(SHIP_POLL) => continue,
            }
        } else {
            rx.recv().await
        };
        let Some(first) = first else { break };
        let linger_until = Instant::now() + LINGER;
        let mut waited_for = first.awaited();
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            let next = if waited_for {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(linger_until, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(item) = next else { break };
            waited_for |= item.awaited();
            items.push(item);
        }
        // Taken off the queue: from here a batch is bounded (MAX_BATCH), and what the store
        // cannot take goes to the spool, bounded by spool_limit.
        for item in &items {
            if let Item::Put(record) = item {
                writes.done(record.approx_bytes());
            }
        }
        ship_if_due(&mut state).await;
        // Records wait in the spool while the store is out of reach, and behind records
        // already there (this host's chain is written in the order records were made).
        let up = state.setup.health.get().state == StoreState::Up;
        let damaged = state.setup.spool.problem().is_some();
        if !up || (state.setup.spool.pending() && !damaged) {
            let (puts, calls): (Vec<Item>, Vec<Item>) =
                items.into_iter().partition(|i| matches!(i, Item::Put(_)));
            keep(&state, puts).await;
            items = calls;
            if items.is_empty() {
                continue;
            }
        }
        let mut published = Vec::new();
        let committed = run_batch(&mut state, &mut items, &mut published).await;
        if let Err(e) = &committed {
            error!(error = %e, "shared state store transaction failed");
        }
        let mut unwritten = Vec::new();
        for item in items {
            match item {
                Item::Call(job) => job.finish(committed.clone()),
                // Not committed: kept in the spool, to be shipped in order.
                Item::Put(record) if committed.is_err() => unwritten.push(Item::Put(record)),
                Item::Put(_) => {}
            }
        }
        keep(&state, unwritten).await;
        if committed.is_ok() {
            after_commit(&mut state, &published).await;
        }
    }
}

/// Keeps `puts` in the spool, in order; what even the spool cannot take is dropped and
/// logged (it is full past its reserve, or damaged).
async fn keep(state: &State, puts: Vec<Item>) {
    let records: Vec<Record> = puts
        .into_iter()
        .filter_map(|i| match i {
            Item::Put(r) => Some(*r),
            Item::Call(_) => None,
        })
        .collect();
    if records.is_empty() {
        return;
    }
    let spool = state.setup.spool.clone();
    let n = records.len() as u64;
    let before = spool.stats().records;
    let result = tokio::task::spawn_blocking(move || spool.append(&records)).await;
    let kept = state.setup.spool.stats().records.saturating_sub(before);
    match result {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            // `append` keeps a prefix (order kept): what it did not take is lost, loudly.
            let lost = n.saturating_sub(kept);
            state.setup.spool.dropped(lost);
            crate::ops::metrics::spool_dropped(lost);
            error!(error = %e, records = lost, "record not kept: the shared state store is out of reach and the local spool cannot take it");
        }
        Err(e) => {
            let lost = n.saturating_sub(kept);
            state.setup.spool.dropped(lost);
            crate::ops::metrics::spool_dropped(lost);
            error!(error = %e, records = lost, "record not kept: the spool task failed");
        }
    }
    if kept > 0 {
        crate::ops::metrics::spool_kept(kept);
    }
    state.setup.health.spool(state.setup.spool.stats());
}

/// Publishes a committed transaction's audit records and moves the head checkpoint.
async fn after_commit(state: &mut State, published: &[Sealed]) {
    let setup = &state.setup;
    if setup.feed.receiver_count() > 0 {
        for sealed in published {
            let _ = setup.feed.send(sealed.to_event());
        }
    }
    if published.is_empty() {
        return;
    }
    let Some(client) = &state.client else { return };
    match audit::head(client, &setup.host).await {
        Ok(head) if head != state.last_head => {
            if let Some(h) = &head
                && let Err(e) = audit::write_head(&setup.head_path, h)
            {
                warn!(error = %e, "could not write the audit head checkpoint");
            }
            state.last_head = head;
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not read the audit head"),
    }
}

/// Registers this run's spool as the host's current one, once per run, as soon as the store
/// is reached and its change log read (before anything is shipped from the spool).
async fn register_if_due(state: &mut State) {
    let spool = &state.setup.spool;
    if state.registered || spool.problem().is_some() {
        return;
    }
    let h = state.setup.health.get();
    if h.state != StoreState::Up || h.confirmed_epoch != h.epoch || h.confirmed.is_none() {
        return;
    }
    let spool_id = spool.id();
    let head = spool.head_seq();
    if let Err(e) = connect(state).await {
        warn!(error = %e, "registering the local spool with the shared store failed; retrying");
        return;
    }
    let Some(client) = state.client.as_mut() else {
        return;
    };
    let mut published = Vec::new();
    let registered = async {
        let tx = client.transaction().await?;
        let r = super::spools::register(
            &tx,
            &state.setup.host,
            &state.setup.key,
            &spool_id,
            head,
            &mut published,
        )
        .await?;
        tx.commit().await?;
        Ok::<_, StoreError>(r)
    }
    .await;
    match registered {
        Ok(r) => {
            super::spools::report(&state.setup.host, &spool_id, &r);
            let refused = match &r {
                super::spools::Registered::Foreign { owner } => Some(format!(
                    "the local spool {} is host {owner}'s (its file was copied here, spool id {spool_id}): nothing in it is shipped as this host's. Move it aside (with the agent stopped) and start jitgated again",
                    state.setup.spool.path().display()
                )),
                super::spools::Registered::RolledBack {
                    head,
                    shipped_through,
                } => Some(format!(
                    "the local spool {} is an older copy of itself (its last record is {head}; the shared store has records through {shipped_through} from it): records spooled after the copy are lost (recorded as spool.lost) and nothing in it is shipped. Move it aside (with the agent stopped) and start jitgated again",
                    state.setup.spool.path().display()
                )),
                _ => None,
            };
            if let Some(why) = refused {
                state.setup.spool.refuse(why);
                state.setup.health.spool(state.setup.spool.stats());
            }
            state.registered = true;
            after_commit(state, &published).await;
        }
        Err(e) => {
            if client.is_closed() {
                state.client = None;
            }
            warn!(error = %e, "registering the local spool with the shared store failed; retrying");
        }
    }
}

/// Ships the spool if it holds records and the store is back and caught up (the change
/// log read on this connection: revocations made meanwhile are heard before anything new).
async fn ship_if_due(state: &mut State) {
    let spool = &state.setup.spool;
    // Never before the spool is known to be this host's (a foreign spool is refused then).
    if !state.registered || !spool.pending() || spool.problem().is_some() {
        return;
    }
    let h = state.setup.health.get();
    if h.state != StoreState::Up || h.confirmed_epoch != h.epoch || h.confirmed.is_none() {
        return;
    }
    match ship(state).await {
        Ok(0) => {}
        Ok(n) => info!(
            records = n,
            "shipped the local spool to the shared state store"
        ),
        Err(e) => warn!(error = %e, "shipping the local spool failed; retrying"),
    }
    state.setup.health.spool(state.setup.spool.stats());
}

async fn ship(state: &mut State) -> std::result::Result<usize, String> {
    connect(state).await?;
    let spool_id = state.setup.spool.id();
    let mut total = 0;
    loop {
        let spool = state.setup.spool.clone();
        let chunk = tokio::task::spawn_blocking(move || spool.peek(SHIP_CHUNK))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(&(upto, _)) = chunk.last() else {
            break;
        };
        let Some(client) = state.client.as_mut() else {
            return Err("no connection to the shared store".into());
        };
        let mut published = Vec::new();
        let setup = &state.setup;
        let shipped = ship_chunk(
            client,
            &setup.host,
            &setup.key,
            &spool_id,
            &chunk,
            &mut published,
        )
        .await;
        if let Err(e) = shipped {
            if client.is_closed() {
                state.client = None;
            }
            return Err(e);
        }
        let spool = state.setup.spool.clone();
        tokio::task::spawn_blocking(move || spool.shipped(upto))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        crate::ops::metrics::spool_shipped(chunk.len() as u64);
        after_commit(state, &published).await;
        state.setup.health.spool(state.setup.spool.stats());
        total += chunk.len();
    }
    // A previous run's sessions whose end was never recorded (it crashed): closed now
    // that their start has been shipped.
    if total > 0
        && let Some(client) = &state.client
    {
        queries::close_sessions_before(client, &state.setup.host, state.setup.started_at)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(total)
}

/// Writes one chunk of spooled records in one transaction, with the spool's shipped mark:
/// rows at or below the mark (shipped by a run that crashed before removing them) are
/// skipped. Returns once committed.
async fn ship_chunk(
    client: &mut Client,
    host: &str,
    key: &AuditKey,
    spool_id: &str,
    chunk: &[(i64, Record)],
    published: &mut Vec<Sealed>,
) -> std::result::Result<(), String> {
    let e = |e: tokio_postgres::Error| super::changes::chain(&e);
    let mut tx = client.transaction().await.map_err(e)?;
    let shipped: i64 = tx
        .query_opt(
            "SELECT seq FROM spool_shipped WHERE host_id = $1 AND spool_id = $2 FOR UPDATE",
            &[&host, &spool_id],
        )
        .await
        .map_err(e)?
        .map_or(0, |r| r.get(0));
    // The store is the spool's outside anchor: what comes next must follow what it already
    // has, or records were cut off the spool's front.
    if let Some((first, _)) = chunk.iter().find(|(seq, _)| *seq > shipped)
        && *first != shipped + 1
    {
        return Err(format!(
            "the local spool's records {}..{} are missing (the store has up to {shipped}): records were removed from the spool; nothing more is shipped from it",
            shipped + 1,
            first - 1
        ));
    }
    let mut last = shipped;
    for (seq, record) in chunk {
        if *seq <= shipped {
            continue;
        }
        let sp = tx.savepoint("spooled").await.map_err(e)?;
        let appended = Mutex::new(Vec::new());
        let result = {
            let db = Db {
                tx: &sp,
                host,
                key,
                appended: &appended,
            };
            apply(&db, record).await
        };
        match result {
            Ok(()) => {
                sp.commit().await.map_err(e)?;
                published.extend(
                    appended
                        .into_inner()
                        .unwrap_or_else(PoisonError::into_inner),
                );
            }
            Err(err) => {
                sp.rollback().await.map_err(e)?;
                if !already_stored(&err) {
                    // Refused for a reason that may pass (a timeout, a lock, a full disk) or
                    // may not: neither shipped nor dropped. The chunk is rolled back and
                    // retried; meanwhile the spool stays pending and the host closed, and
                    // the error is reported (nothing is lost silently).
                    return Err(format!(
                        "the shared state store refused spooled record {seq} ({}): {err}",
                        record.what()
                    ));
                }
                // Written already, by a batch whose commit's answer was lost with its
                // connection before it was spooled: shipping it again would record it twice.
                warn!(
                    spool_seq = seq,
                    record = record.what(),
                    "a spooled record is in the shared state store already; skipped"
                );
            }
        }
        last = *seq;
    }
    tx.execute(
        "INSERT INTO spool_shipped (host_id, spool_id, seq) VALUES ($1, $2, $3) \
         ON CONFLICT (host_id, spool_id) DO UPDATE SET seq = EXCLUDED.seq",
        &[&host, &spool_id, &last],
    )
    .await
    .map_err(e)?;
    tx.commit().await.map_err(e)
}

/// Whether the store refused a record because it holds it already (a unique key).
fn already_stored(err: &crate::store::StoreError) -> bool {
    matches!(err, crate::store::StoreError::Backend(inner)
        if inner
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION))
}

/// Opens the writer's connection if it has none.
async fn connect(state: &mut State) -> std::result::Result<(), String> {
    if state.client.as_ref().is_none_or(Client::is_closed) {
        state.client = None;
        let client = state
            .setup
            .connector
            .connect(None)
            .await
            .map_err(|e| format!("reconnecting to the shared store: {e}"))?;
        state.client = Some(client);
    }
    Ok(())
}

async fn run_batch(
    state: &mut State,
    items: &mut [Item],
    published: &mut Vec<Sealed>,
) -> std::result::Result<(), String> {
    connect(state).await?;
    let Some(client) = state.client.as_mut() else {
        return Err("no connection to the shared store".into());
    };
    let result = batch(
        client,
        &state.setup.host,
        &state.setup.key,
        items,
        published,
    )
    .await;
    if result.is_err() && client.is_closed() {
        state.client = None;
    }
    result
}

async fn batch(
    client: &mut Client,
    host: &str,
    key: &AuditKey,
    items: &mut [Item],
    published: &mut Vec<Sealed>,
) -> std::result::Result<(), String> {
    let mut tx = client.transaction().await.map_err(|e| e.to_string())?;
    // An operation alone needs no savepoint: rolling the transaction back does what rolling
    // back to one would. Most batches of a fleet's hosts are one record (a host records a
    // few statements a second, the writer lingers 100 ms), and a savepoint costs two round
    // trips and a subtransaction.
    if let [item] = items {
        let appended = Mutex::new(Vec::new());
        let db = Db {
            tx: &tx,
            host,
            key,
            appended: &appended,
        };
        if !run_item(&db, item).await {
            return tx.rollback().await.map_err(|e| e.to_string());
        }
        published.extend(
            appended
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        );
        return tx.commit().await.map_err(|e| e.to_string());
    }
    for item in items.iter_mut() {
        let sp = tx.savepoint("job").await.map_err(|e| e.to_string())?;
        let appended = Mutex::new(Vec::new());
        let ok = {
            let db = Db {
                tx: &sp,
                host,
                key,
                appended: &appended,
            };
            run_item(&db, item).await
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

/// Runs one queued operation; false when it failed (its writes are to be rolled back).
async fn run_item(db: &Db<'_>, item: &mut Item) -> bool {
    match item {
        Item::Call(job) => job.run(db).await,
        Item::Put(record) => match apply(db, record).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, record = record.what(), "background store write failed");
                false
            }
        },
    }
}

#[cfg(test)]
mod tests {
    //! On a real PostgreSQL: shipping the same spooled audit record again (a lost commit
    //! answer, a lost shipped mark) never chains it twice.

    use super::{super::testdb::TestDb, *};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_audit_record_shipped_twice_is_stored_once() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("shiptwice");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        // Opened for its migrations.
        let store = super::super::PostgresStore::open(&options, &dir.path().join("state"))
            .await
            .unwrap();
        let key = AuditKey::load_or_create(dir.path()).unwrap();
        let mut client = Connector::new(&options)
            .unwrap()
            .connect(None)
            .await
            .unwrap();
        let event = Event::GrantExpired(crate::store::audit::GrantExpired {
            grant: "grt_1".into(),
        });
        let record = AuditRecord::now("jitgated", &event).unwrap();
        assert_eq!(record.id.as_ref().map(String::len), Some(32), "128 bits");
        let chunk = vec![(1, Record::Audit { audit: record })];
        let mut published = Vec::new();
        ship_chunk(
            &mut client,
            "host-a",
            &key,
            "spool-1",
            &chunk,
            &mut published,
        )
        .await
        .unwrap();
        assert_eq!(published.len(), 1);
        // The same record again, under another spool (its shipped mark lost with the file,
        // or a batch that stored it before its commit's answer was lost).
        let mut again = Vec::new();
        ship_chunk(&mut client, "host-a", &key, "spool-2", &chunk, &mut again)
            .await
            .unwrap();
        assert!(again.is_empty(), "not chained again: {again:?}");
        let count = pg.admin(
            &db,
            "SELECT count(*) FROM audit WHERE host_id = 'host-a' AND kind = 'grant.expired'",
        );
        assert_eq!(count.trim(), "1");
        // A different record (another id) is stored.
        let other = AuditRecord::now("jitgated", &event).unwrap();
        let chunk = vec![(2, Record::Audit { audit: other })];
        ship_chunk(&mut client, "host-a", &key, "spool-2", &chunk, &mut again)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        drop(store);
    }
}
