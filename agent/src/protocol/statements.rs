//! A session's finished statement (or request) records on their way to the store, in
//! batches: each hand-over wakes the store's thread, and the SQLite store keeps a batch of
//! one session's records as one row (see `store::sqlite::chunks`), so handing them over one
//! at a time costs several times more per record on a busy session.
//!
//! The bound on how late a record reaches the store is the one PostgreSQL sessions keep
//! too (their `RECORD_FLUSH` and `RECORD_BATCH` are these): every [`BATCH`] records, or
//! within [`FLUSH`] of the first record of a batch, or when the session ends; the store's
//! group commit adds at most its linger.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::Notify, task::JoinHandle};

use crate::{model::StatementRecord, store::SharedStore};

/// A finished record is handed to the store within this long, busy session or idle.
pub const FLUSH: Duration = Duration::from_millis(500);

/// Records handed to the store together (the batch's room is taken at its first record).
pub const BATCH: usize = 64;

#[derive(Default)]
struct Pending {
    records: Vec<StatementRecord>,
    /// Set when the session ended: later records (an exchange that outlived its session)
    /// go to the store at once, since no flush would come for them.
    closed: bool,
}

/// One session's record batcher. Shared by the session's exchanges; [`Statements::start`]
/// starts its timer and returns the guard that flushes the rest when the session ends.
pub struct Statements {
    store: SharedStore,
    pending: Mutex<Pending>,
    /// Signalled when a batch gets its first record: the timer starts counting then.
    due: Notify,
}

impl Statements {
    /// A batcher for one session, its timer running on the current runtime until the
    /// returned guard is dropped (which hands every record left to the store).
    pub fn start(store: SharedStore) -> (Arc<Self>, Flushed) {
        let this = Arc::new(Self {
            store,
            pending: Mutex::default(),
            due: Notify::new(),
        });
        let timer = tokio::spawn({
            let this = this.clone();
            async move {
                loop {
                    this.due.notified().await;
                    tokio::time::sleep(FLUSH).await;
                    this.flush();
                }
            }
        });
        let guard = Flushed {
            statements: this.clone(),
            timer,
        };
        (this, guard)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a finished record; a full batch goes to the store now.
    pub fn push(&self, record: StatementRecord) {
        let mut pending = self.lock();
        if pending.closed {
            drop(pending);
            self.store.record_statements(vec![record]);
            return;
        }
        if pending.records.capacity() == 0 {
            pending.records.reserve_exact(BATCH);
        }
        pending.records.push(record);
        if pending.records.len() == 1 {
            self.due.notify_one();
        }
        if pending.records.len() >= BATCH {
            let batch = std::mem::take(&mut pending.records);
            drop(pending);
            self.store.record_statements(batch);
        }
    }

    /// Hands the records waiting to the store.
    pub fn flush(&self) {
        let batch = std::mem::take(&mut self.lock().records);
        self.hand_over(batch);
    }

    fn close(&self) {
        let batch = {
            let mut pending = self.lock();
            pending.closed = true;
            std::mem::take(&mut pending.records)
        };
        self.hand_over(batch);
    }

    fn hand_over(&self, batch: Vec<StatementRecord>) {
        if !batch.is_empty() {
            self.store.record_statements(fitted(batch));
        }
    }
}

/// A batch handed over before it filled, without the room it did not use: the store counts
/// what it queues by the records' sizes, and a quiet session's batch of one would otherwise
/// hold the room of [`BATCH`] while it waits behind a slow disk.
pub fn fitted(mut batch: Vec<StatementRecord>) -> Vec<StatementRecord> {
    if batch.len() < batch.capacity() / 2 {
        batch.shrink_to_fit();
    }
    batch
}

/// Ends a session's batching: stops the timer and hands every record left to the store;
/// records pushed later go to the store one by one.
pub struct Flushed {
    statements: Arc<Statements>,
    timer: JoinHandle<()>,
}

impl Drop for Flushed {
    fn drop(&mut self) {
        self.timer.abort();
        self.statements.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{memory::MemoryStore, tests::statement as record};

    async fn stored(store: &SharedStore, session: &str) -> Vec<u32> {
        store.flush().await.expect("flush");
        let history = store
            .session_history(session.into())
            .await
            .expect("history");
        history
            .map(|h| h.statements.iter().map(|s| s.seq).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_batch_handed_over_early_gives_back_its_room() {
        let mut batch = Vec::with_capacity(BATCH);
        batch.push(record("s1", 0));
        assert!(fitted(batch).capacity() < BATCH / 2);
        let full: Vec<_> = (0..BATCH as u32).map(|seq| record("s1", seq)).collect();
        assert_eq!(fitted(full).len(), BATCH);
    }

    #[tokio::test]
    async fn records_reach_the_store_by_batch_by_time_and_at_the_end() {
        let store: SharedStore = Arc::new(MemoryStore::default());
        store.session_opened(crate::protocol::record::Record::new("s1".into()).session);
        let (statements, guard) = Statements::start(store.clone());

        // One record waits for the timer, then goes (not much later: a loaded machine may
        // run the timer late).
        let pushed = std::time::Instant::now();
        statements.push(record("s1", 0));
        assert!(stored(&store, "s1").await.is_empty(), "held for its batch");
        while !stored(&store, "s1").await.contains(&0) {
            assert!(
                pushed.elapsed() < FLUSH * 10,
                "the timer never handed the record over"
            );
            tokio::time::sleep(FLUSH / 10).await;
        }

        // A full batch goes at once.
        for seq in 1..=BATCH as u32 {
            statements.push(record("s1", seq));
        }
        assert_eq!(stored(&store, "s1").await.len(), BATCH + 1);

        // The end hands over what is left, and a record after it goes on its own.
        statements.push(record("s1", 101));
        drop(guard);
        assert!(stored(&store, "s1").await.contains(&101));
        statements.push(record("s1", 102));
        assert!(stored(&store, "s1").await.contains(&102));
        assert_eq!(stored(&store, "s1").await.len(), BATCH + 3);
    }
}
