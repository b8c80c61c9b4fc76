//! Pruning the change log (`changes`), which every host appends to and reads, and which would
//! otherwise grow forever.
//!
//! Every agent runs the pruner on a timer, but a round only does work under a fleet-wide
//! advisory lock taken with `pg_try_advisory_xact_lock`: while one host prunes, the others'
//! attempts find the lock taken and go back to sleep, so a thousand hosts never delete at
//! once. A round deletes in bounded batches, each its own short transaction, so writers (who
//! append at the other end under the change-log lock) and readers are never held up long.
//!
//! Only a *prefix* of the log is ever cut: a batch looks at the oldest rows by `seq` and
//! deletes those before the first one still within the retention. The highest `seq` cut is
//! recorded in `changes_pruned.through` in the same transaction. A follower that last read
//! change `n < through` has therefore missed changes that are gone, and reloads its live
//! state whole instead of catching up row by row (see `changes.rs`); one at or past it has
//! missed nothing. Cutting by prefix (not every old row) means a row a little older than a
//! newer row before it waits for it: `at` is each writer's transaction start, and writers
//! commit in `seq` order, not in `at` order.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connect::Connector;
use crate::store::{Result, StoreError};

/// The advisory lock whose holder prunes ("jgprune" in ASCII).
pub const PRUNE_LOCK: i64 = 0x006a_6770_7275_6e65;

/// Rows looked at (and at most deleted) per transaction.
pub const BATCH: i64 = 1000;

/// How often an agent tries to prune: a small share of the retention, between 5 seconds and
/// 10 minutes (with the default 7 days, every 10 minutes; a thousand hosts then try under
/// twice a second in all, and all but one find the lock taken or nothing to do).
pub fn period(retention: Duration) -> Duration {
    (retention / 720).clamp(Duration::from_secs(5), Duration::from_secs(600))
}

/// How far the log has been cut: every change at or below it may be gone (0: never cut).
/// A missing mark is an error ([`queries::NO_PRUNE_MARK`]): read as 0, it would let a host
/// behind a cut read on as if nothing were gone.
pub async fn pruned_through(client: &impl GenericClient) -> Result<i64> {
    client
        .query_opt("SELECT through FROM changes_pruned WHERE id = 1", &[])
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
        .ok_or_else(|| StoreError::Invalid(super::queries::NO_PRUNE_MARK.into()))
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// This host held the lock: `rows` deleted in `batches` transactions that deleted any.
    Pruned { rows: u64, batches: u64 },
    /// Another host held the lock (it is pruning): nothing done.
    Busy,
}

/// One round: deletes changes logged more than `retention` ago from the front of the log, at
/// most `batch` per transaction, until the front is within the retention or the log empty.
pub async fn prune(client: &mut Client, retention: Duration, batch: i64) -> Result<Round> {
    let secs = retention.as_secs_f64();
    let (mut rows, mut batches) = (0u64, 0u64);
    loop {
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
            .await?
            .try_get(0)?;
        if !locked {
            // Taken between two batches of this round, or held all along by another host.
            return Ok(if batches == 0 {
                Round::Busy
            } else {
                Round::Pruned { rows, batches }
            });
        }
        let front = tx
            .query(
                "SELECT seq, at < now() - make_interval(secs => $1) FROM changes ORDER BY seq LIMIT $2",
                &[&secs, &batch],
            )
            .await?;
        let mut through = None;
        let mut kept_one = false;
        for row in &front {
            let old: bool = row.try_get(1)?;
            if !old {
                kept_one = true;
                break;
            }
            through = Some(row.try_get::<_, i64>(0)?);
        }
        let Some(through) = through else {
            tx.commit().await?;
            return Ok(Round::Pruned { rows, batches });
        };
        let deleted = tx
            .execute("DELETE FROM changes WHERE seq <= $1", &[&through])
            .await?;
        tx.execute(
            "UPDATE changes_pruned SET through = GREATEST(through, $1) WHERE id = 1",
            &[&through],
        )
        .await?;
        tx.commit().await?;
        rows += deleted;
        batches += 1;
        debug!(through, deleted, "pruned a batch of the change log");
        if kept_one || front.len() < usize::try_from(batch).unwrap_or(usize::MAX) {
            return Ok(Round::Pruned { rows, batches });
        }
    }
}

/// A random share (0 to 1) of a wait, so that hosts started together do not try together.
fn jitter(d: Duration) -> Duration {
    let mut raw = [0u8; 4];
    if getrandom::fill(&mut raw).is_err() {
        return d / 2;
    }
    d.mul_f64(f64::from(u32::from_be_bytes(raw)) / f64::from(u32::MAX))
}

/// Prunes on a timer until `stop`: each round on a connection of its own, closed after it
/// (a thousand hosts should not each hold one more connection open for this).
pub async fn run(connector: Connector, retention: Duration, stop: CancellationToken) {
    let period = period(retention);
    let mut wait = jitter(period);
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        wait = period / 2 + jitter(period);
        let round = async {
            let mut client = connector.connect(None).await?;
            prune(&mut client, retention, BATCH).await
        };
        match tokio::time::timeout(period, round).await {
            Ok(Ok(Round::Pruned { rows, batches })) if rows > 0 => {
                crate::ops::metrics::change_log_pruned(rows);
                info!(
                    rows,
                    batches,
                    retention = ?retention,
                    "pruned the shared store's change log"
                );
            }
            Ok(Ok(_)) => {}
            // The follower reports an unreachable store; this is only housekeeping.
            Ok(Err(e)) => debug!(error = %e, "pruning the change log failed; trying again later"),
            Err(_) => warn!(
                within = ?period,
                "pruning the change log did not finish in time; trying again later"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    //! On a real PostgreSQL: only what is past the retention goes, from the front, in
    //! batches, by one host at a time.

    use super::{super::testdb::TestDb, *};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pruning_cuts_only_rows_past_the_retention_in_batches_under_the_lock() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("prune");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        // Opened for its migrations.
        let store = super::super::PostgresStore::open(&options, &dir.path().join("state"))
            .await
            .unwrap();
        let connector = Connector::new(&options).unwrap();
        let mut client = connector.connect(None).await.unwrap();
        // 25 changes 9 days old, then 1 just inside the retention (a writer's transaction
        // that began earlier than a later one's), then 3 older ones again (past the kept
        // row: they wait for it, the log is cut by prefix only), then 5 of now.
        let mut sql = String::new();
        for n in 0..25 {
            sql += &format!(
                "INSERT INTO changes (host_id, kind, subject, at) VALUES ('b', 'revoked', 'old{n}', now() - interval '9 days');"
            );
        }
        sql += "INSERT INTO changes (host_id, kind, subject, at) VALUES ('b', 'revoked', 'edge', now() - interval '6 days 23 hours');";
        for n in 0..3 {
            sql += &format!(
                "INSERT INTO changes (host_id, kind, subject, at) VALUES ('b', 'revoked', 'late{n}', now() - interval '8 days');"
            );
        }
        for n in 0..5 {
            sql += &format!(
                "INSERT INTO changes (host_id, kind, subject) VALUES ('b', 'revoked', 'new{n}');"
            );
        }
        pg.admin(&db, &sql);
        let seq_of = |subject: &str| -> i64 {
            pg.admin(
                &db,
                &format!("SELECT seq FROM changes WHERE subject = '{subject}'"),
            )
            .trim()
            .parse()
            .unwrap_or_else(|e| {
                panic!(
                    "{subject}: {e}: {}",
                    pg.admin(&db, "SELECT seq, subject, at FROM changes")
                )
            })
        };
        let edge = seq_of("edge");
        let late2 = seq_of("late2");
        assert_eq!(pruned_through(&client).await.unwrap(), 0, "never cut yet");

        // Hostile: another host holds the lock (it is pruning): this one does nothing.
        let other = connector.connect(None).await.unwrap();
        other
            .execute("SELECT pg_advisory_lock($1)", &[&PRUNE_LOCK])
            .await
            .unwrap();
        assert_eq!(prune(&mut client, 7 * DAY, 10).await.unwrap(), Round::Busy);
        let count = |pg: &TestDb| -> i64 {
            pg.admin(&db, "SELECT count(*) FROM changes")
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(count(&pg), 34);
        other
            .execute("SELECT pg_advisory_unlock($1)", &[&PRUNE_LOCK])
            .await
            .unwrap();

        // Batches of 10: 25 old rows take three transactions; the row inside the retention
        // stops the cut, and the older rows after it stay.
        assert_eq!(
            prune(&mut client, 7 * DAY, 10).await.unwrap(),
            Round::Pruned {
                rows: 25,
                batches: 3
            }
        );
        assert_eq!(count(&pg), 9);
        assert_eq!(
            pruned_through(&client).await.unwrap(),
            edge - 1,
            "the mark names the last row cut"
        );
        let oldest_kept: i64 = pg
            .admin(&db, "SELECT min(seq) FROM changes")
            .trim()
            .parse()
            .unwrap();
        assert_eq!(oldest_kept, edge, "nothing newer than the retention went");
        // Again: nothing more to do (the front is within the retention).
        assert_eq!(
            prune(&mut client, 7 * DAY, 10).await.unwrap(),
            Round::Pruned {
                rows: 0,
                batches: 0
            }
        );
        // A shorter retention (6 days) lets the edge go, and the older rows behind it; the
        // rows of now stay.
        assert_eq!(
            prune(&mut client, 6 * DAY, 10).await.unwrap(),
            Round::Pruned {
                rows: 4,
                batches: 1
            }
        );
        assert_eq!(count(&pg), 5);
        assert_eq!(pruned_through(&client).await.unwrap(), late2);
        assert_eq!(period(7 * DAY), Duration::from_secs(600));
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(5));
        drop(store);
    }
}
