//! Following other hosts' changes: `LISTEN jitgate_changes` on a connection of its own, and
//! on every wake-up (and every few seconds regardless) a read of the change log past the
//! last row seen. The same read runs after every reconnect, so a change committed while the
//! connection was down is still delivered: a notification is only a hint to look, the log
//! is what is read.
//!
//! The log is pruned ([`super::prune`]): a host whose place in it is gone (away longer than
//! `change_log_retention`, or a log cut back in a failover past what this host remembers)
//! cannot catch up row by row. It notices (`changes_pruned.through` past its last read
//! change, read in the same statement as the rows), and reloads instead: a new epoch of
//! [`StoreHealth`], on which the grant engine makes its live grants and waiting requests what
//! their tables say, as at start, before new grants ride on them.
//!
//! The follower is also what reaches the store in the first place (and migrates it), and what
//! tells the rest of the agent whether the store is there: see [`crate::store::health`].

use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{connect::Connector, prune, queries, schema};
use crate::{
    model::{RequestStatus, Timestamp},
    store::{GrantChange, Result, StoreError, health::StoreHealth},
};

/// How often the log is read even without a notification (a lost `NOTIFY` costs this much).
const POLL: Duration = Duration::from_secs(5);

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Rows read per query while catching up.
const PAGE: i64 = 500;

/// The newest change in the log: a listener starting now follows what comes after.
pub async fn newest(client: &Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM changes", &[])
        .await?
        .try_get(0)?)
}

/// What the follower needs: where the store is, who this host is, where changes go, and
/// where it reports the store's health.
pub struct Follower {
    pub connector: Connector,
    pub host: String,
    pub out: broadcast::Sender<GrantChange>,
    pub health: StoreHealth,
    pub stop: CancellationToken,
    /// When this store was started: sessions of this host begun before then were left open
    /// by a previous run, and are closed once the store is first reached.
    pub started_at: Timestamp,
}

/// Reaches the store (retrying with backoff for as long as it takes), migrates its schema on
/// the first connection, then follows the change log, passing other hosts' changes to
/// `out`, until `stop` is cancelled. Every completed read of the log renews the lease
/// ([`StoreHealth::confirmed`]); a lost connection is reported at once
/// ([`StoreHealth::lost`]) and the catch-up read after reconnecting delivers what was
/// missed before the lease is renewed.
pub async fn follow(f: Follower) {
    let lease = f.health.get().lease;
    // Often enough that a live connection renews the lease well before it lapses.
    let poll = (lease / 3).clamp(Duration::from_millis(100), POLL);
    // A read that does not answer (a half-open connection) counts as a lost store.
    let read_deadline = (lease / 2).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut last_seen: Option<i64> = None;
    let mut recent = Recent::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        let (wake_tx, mut wake) = mpsc::channel(1);
        let attempt = async {
            let (mut client, durability) = f
                .connector
                .connect_primary(Some(wake_tx))
                .await
                .map_err(|e| failure(&e, ""))?;
            if last_seen.is_none() {
                schema::migrate(&mut client)
                    .await
                    .map_err(|e| failure(&e, "migrating the schema: "))?;
                let newest = newest(&client).await.map_err(|e| failure(&e, ""))?;
                // A log cut past its newest row (every change pruned) starts after the cut.
                let through = prune::pruned_through(&client)
                    .await
                    .map_err(|e| failure(&e, ""))?;
                let closed = queries::close_sessions_before(&client, &f.host, f.started_at)
                    .await
                    .map_err(|e| failure(&e, ""))?;
                if closed > 0 {
                    info!(
                        sessions = closed,
                        "closed sessions left open by a previous run"
                    );
                }
                last_seen = Some(newest.max(through));
            } else if let Some(seen) = last_seen {
                // The store may have gone back in time (a standby promoted without the last
                // changes, a restore): numbers this host already read may be given to new
                // changes, which reading on from `seen` would skip. Go on from the newest
                // change still as read (re-reading is harmless).
                let resume = recent
                    .resume(&client, seen)
                    .await
                    .map_err(|e| failure(&e, "checking the change log: "))?;
                if resume != seen {
                    warn!(
                        read_up_to = seen,
                        resume_after = resume,
                        "the shared store's change log is not the one this host read (a failover that lost changes, or a restore): reading it again from the last change both agree on"
                    );
                    last_seen = Some(resume);
                }
            }
            client
                .batch_execute("LISTEN jitgate_changes")
                .await
                .map_err(|e| failure(&StoreError::from(e), "LISTEN: "))?;
            let read = prepare_read(&client)
                .await
                .map_err(|e| failure(&e, "preparing the change log's read: "))?;
            Ok::<_, Failure>((client, durability, read))
        };
        let client = tokio::select! {
            c = attempt => c,
            () = f.stop.cancelled() => return,
        };
        let (client, read) = match client {
            Ok((c, durability, read)) => {
                if durability.survives_failover() {
                    info!(store = %durability.describe(), "shared state store durability");
                } else {
                    warn!(store = %durability.describe(), "shared state store durability: decisions can be lost on a failover");
                }
                f.health.durability(durability);
                (c, read)
            }
            Err(Failure::Permanent(e)) => {
                // Slower than a lost connection (each try may count against the account,
                // and only an operator can mend it), but not at once 30 s: a refusal that
                // was brief (a role locked for a moment) should not keep the gate closed.
                let wait = backoff.max(Duration::from_secs(1)).min(PERMANENT_RETRY);
                error!(error = %e, retry_in = ?wait, "the shared state store refuses this host: a permanent error, an operator must act; the gate stays closed to new grants");
                f.health.refused(e);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = f.stop.cancelled() => return,
                }
                backoff = (wait * 2).min(PERMANENT_RETRY);
                continue;
            }
            Err(Failure::Transient(e)) => {
                warn!(error = %e, retry_in = ?backoff, "cannot reach the shared state store; the gate stays closed to new grants until it is back");
                f.health.lost(format!("connecting: {e}"));
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = f.stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut seen = last_seen.unwrap_or(0);
        info!(after = seen, "shared state store reached; catching up");
        f.health.connected();
        let reader = Reader {
            client: &client,
            read,
        };
        let why = loop {
            let began = Instant::now();
            match tokio::time::timeout(
                read_deadline,
                read_log(&reader, &f.host, &mut seen, &mut recent, &f.out, &f.health),
            )
            .await
            {
                Ok(Ok(())) => f.health.confirmed(began),
                Ok(Err(e)) => break format!("reading the change log: {}", chain(&e)),
                Err(_) => {
                    break format!("reading the change log: no answer within {read_deadline:?}");
                }
            }
            tokio::select! {
                woken = wake.recv() => if woken.is_none() {
                    // The connection's driver ended: the connection is gone.
                    break "the connection was closed".to_owned();
                },
                () = tokio::time::sleep(poll) => {}
                () = f.stop.cancelled() => return,
            }
        };
        last_seen = Some(seen);
        warn!(error = %why, "lost the shared state store; no new grants until it is back, live grants end after store_lease");
        f.health.lost(why);
    }
}

/// How long the follower waits before trying again after a permanent error (an operator may
/// mend it, say a password file, without restarting the agent: the file is read again on
/// every attempt).
const PERMANENT_RETRY: Duration = Duration::from_secs(30);

/// Why an attempt to reach the store failed.
#[derive(Debug)]
enum Failure {
    /// Worth retrying soon: the network, the server down or starting.
    Transient(String),
    /// No retry mends it until an operator acts; the text says what to do.
    Permanent(String),
}

/// Sorts an error from reaching the store into [`Failure`]s, `what` prefixed.
fn failure(e: &StoreError, what: &str) -> Failure {
    match permanent(e) {
        Some(advice) => Failure::Permanent(format!("{what}{advice}")),
        None => Failure::Transient(format!("{what}{}", chain(e))),
    }
}

/// The operator's next step, when `e` is one no retry can mend: a wrong password, a user
/// the server does not let in, a missing database, a schema newer than this agent.
pub fn permanent(e: &StoreError) -> Option<String> {
    use tokio_postgres::error::SqlState;
    match e {
        // Only migrate says this: the database is ahead of this agent.
        StoreError::Invalid(why) => Some(why.clone()),
        // The password file cannot be used (removed, made readable to others).
        StoreError::Unavailable(why) if why.starts_with("[store] password_file") => {
            Some(why.clone())
        }
        StoreError::Backend(b) => {
            let db = b
                .downcast_ref::<tokio_postgres::Error>()
                .and_then(tokio_postgres::Error::as_db_error)?;
            let todo = match db.code() {
                c if *c == SqlState::INVALID_PASSWORD => {
                    "check [store] password_file (it is read again on every attempt)"
                }
                c if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                    "let this host in (the server's pg_hba.conf, the role's LOGIN) or fix the user in [store] url"
                }
                c if *c == SqlState::INVALID_CATALOG_NAME => {
                    "create the database, or fix its name in [store] url"
                }
                _ => return None,
            };
            Some(format!("{}: {todo}", db.message()))
        }
        _ => None,
    }
}

/// An error with its causes, as one line (tokio-postgres puts the useful part in a source).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let s = cause.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = cause.source();
    }
    out
}

/// Reads the log on from `last_seen` ([`catch_up`]); where this host's place in it is gone,
/// goes on from the log's end and starts a new epoch, on which the grant engine reloads
/// what the skipped changes would have told it (see the module's doc).
pub(super) async fn read_log(
    reader: &Reader<'_>,
    host: &str,
    last_seen: &mut i64,
    recent: &mut Recent,
    out: &broadcast::Sender<GrantChange>,
    health: &StoreHealth,
) -> Result<()> {
    loop {
        match catch_up(reader, host, last_seen, recent, out).await? {
            Caught::All => return Ok(()),
            Caught::Gap { through } => {
                // Read before the engine reloads (it does so once it sees the new epoch):
                // a change committed in between is then both reloaded and read, which is
                // harmless; none is missed.
                let next = newest(reader.client).await?.max(through);
                warn!(
                    read_up_to = *last_seen,
                    pruned_through = through,
                    resume_after = next,
                    "changes this host had not read are gone from the shared store's change log (it was away longer than change_log_retention, or the log was cut back in a failover or restore): reloading live grants and waiting requests from the store, as at start"
                );
                crate::ops::metrics::change_log_resync();
                recent.clear();
                *last_seen = next;
                health.resync();
            }
        }
    }
}

/// A follower's connection with its read of the log prepared: planned once per connection,
/// not once per read (a thousand hosts read on every change and every few seconds).
pub(super) struct Reader<'a> {
    client: &'a Client,
    read: tokio_postgres::Statement,
}

impl<'a> Reader<'a> {
    #[cfg(test)]
    pub(super) async fn new(client: &'a Client) -> Result<Self> {
        Ok(Self {
            client,
            read: prepare_read(client).await?,
        })
    }
}

/// Prepares [`queries::CHANGES_AFTER`] on `client`: part of making a follower's connection.
async fn prepare_read(client: &Client) -> Result<tokio_postgres::Statement> {
    Ok(client.prepare(queries::CHANGES_AFTER).await?)
}

/// How a read of the log ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Caught {
    /// Every change after the last one read was read.
    All,
    /// The log has been cut through `through`, past the last change read: some changes this
    /// host never read are gone. Nothing from this read was passed on.
    Gap { through: i64 },
}

/// Reads every change after `last_seen` and passes on those made by other hosts, unless the
/// log no longer holds them all ([`Caught::Gap`]).
async fn catch_up(
    reader: &Reader<'_>,
    host: &str,
    last_seen: &mut i64,
    recent: &mut Recent,
    out: &broadcast::Sender<GrantChange>,
) -> Result<Caught> {
    loop {
        // The cut and the rows in one statement (one snapshot): a cut at or below
        // `last_seen` then means no row after it was gone when they were read.
        let log = queries::changes_after(reader.client, &reader.read, *last_seen, PAGE).await?;
        if log.through > *last_seen {
            return Ok(Caught::Gap {
                through: log.through,
            });
        }
        let read = log.changes.len();
        for row in log.changes {
            let seen = Seen {
                seq: row.seq,
                host: row.host,
                kind: row.kind,
                subject: row.subject,
            };
            // This host's own changes were passed on when they committed.
            if seen.host != host
                && let Some(change) = change_of(&seen, row.grant, row.status)
            {
                debug!(seq = seen.seq, origin = %seen.host, kind = %seen.kind, "change from another host");
                let _ = out.send(change);
            }
            *last_seen = seen.seq;
            recent.push(seen);
        }
        if read < PAGE as usize {
            return Ok(Caught::All);
        }
    }
}

/// One change as this host read it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    seq: i64,
    host: String,
    kind: String,
    subject: String,
}

/// The last changes read, to tell on reconnecting whether the store's log is still the one
/// read (see [`Recent::resume`]).
#[derive(Default)]
pub(super) struct Recent(std::collections::VecDeque<Seen>);

/// Changes remembered (a failover loses at most what replication had not sent, far less).
const RECENT: usize = 1024;

impl Recent {
    /// Forgets what was read: after a reload, the log before it is not what this host's
    /// state was made from.
    fn clear(&mut self) {
        self.0.clear();
    }

    fn push(&mut self, seen: Seen) {
        if self.0.len() == RECENT {
            self.0.pop_front();
        }
        self.0.push_back(seen);
    }

    /// Where to read on from after reconnecting, having read up to `seen`: `seen` when the
    /// store still holds the last change read as read; else the newest remembered change it
    /// still holds as read; else before the oldest remembered (or `seen`, when nothing was
    /// read on this connection's predecessors: the log had nothing to compare). Remembered
    /// changes the log has since been pruned of are not compared: their absence is no sign
    /// of a log gone back (and a resume point below the cut is then a [`Caught::Gap`]).
    async fn resume(&self, client: &Client, seen: i64) -> Result<i64> {
        let (Some(first), Some(last)) = (self.0.front(), self.0.back()) else {
            return Ok(seen);
        };
        let rows = client
            .query(
                "SELECT seq, host_id, kind, subject FROM changes WHERE seq BETWEEN $1 AND $2",
                &[&first.seq, &last.seq],
            )
            .await?;
        let mut now = Vec::with_capacity(rows.len());
        for row in &rows {
            now.push(Seen {
                seq: row.try_get(0)?,
                host: row.try_get(1)?,
                kind: row.try_get(2)?,
                subject: row.try_get(3)?,
            });
        }
        // After the rows: a cut made in between only widens what is not compared.
        let through = prune::pruned_through(client).await?;
        Ok(self.resume_from(&now, seen, through))
    }

    /// [`Self::resume`] given the store's rows over the remembered range and how far the
    /// log has been pruned.
    fn resume_from(&self, now: &[Seen], seen: i64, through: i64) -> i64 {
        let Some(oldest) = self.0.iter().find(|s| s.seq > through) else {
            return seen;
        };
        self.0
            .iter()
            .filter(|s| s.seq > through)
            .rev()
            .find(|s| now.contains(s))
            .map_or(oldest.seq - 1, |s| s.seq)
            .min(seen)
    }
}

/// What a logged change means to this host (with the grant and request status read with it).
fn change_of(
    seen: &Seen,
    grant: Option<crate::model::Grant>,
    status: Option<RequestStatus>,
) -> Option<GrantChange> {
    let subject = || seen.subject.clone();
    match seen.kind.as_str() {
        "issued" => grant.map(|g| GrantChange::Issued(Box::new(g))),
        "revoked" => Some(GrantChange::Revoked { grant: subject() }),
        "expired" => Some(GrantChange::Expired { grant: subject() }),
        "decided" => status
            .filter(|s| *s != RequestStatus::Pending)
            .map(|status| GrantChange::Decided {
                request: subject(),
                status,
            }),
        other => {
            warn!(
                kind = other,
                "unknown change in the shared store's log (a newer jitgated?)"
            );
            None
        }
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    fn seen(seq: i64, subject: &str) -> Seen {
        Seen {
            seq,
            host: "b".into(),
            kind: "revoked".into(),
            subject: subject.into(),
        }
    }

    /// Hostile store history: a promoted standby without the last changes hands their
    /// numbers to new ones; reading on from the last number read would skip them.
    #[test]
    fn a_log_that_went_back_is_read_again_from_where_it_agrees() {
        let mut r = Recent::default();
        for n in 1..=5 {
            r.push(seen(n, &format!("g{n}")));
        }
        let same: Vec<Seen> = (1..=5).map(|n| seen(n, &format!("g{n}"))).collect();
        assert_eq!(
            r.resume_from(&same, 5, 0),
            5,
            "the same log: on from the last read"
        );
        // 4 and 5 lost; 4 reused by another change.
        let lost = vec![seen(1, "g1"), seen(2, "g2"), seen(3, "g3"), seen(4, "x9")];
        assert_eq!(r.resume_from(&lost, 5, 0), 3);
        // Nothing remembered is there any more: from before the oldest remembered.
        assert_eq!(r.resume_from(&[seen(1, "y1")], 5, 0), 0);
        // Bounded memory.
        for n in 6..(RECENT as i64 + 100) {
            r.push(seen(n, "z"));
        }
        assert_eq!(r.0.len(), RECENT);
        assert_eq!(Recent::default().resume_from(&[], 7, 0), 7);
    }

    /// Remembered changes pruned away are not a log gone back: no re-read, no warning.
    #[test]
    fn pruned_changes_are_not_taken_for_a_log_gone_back() {
        let mut r = Recent::default();
        for n in 1..=5 {
            r.push(seen(n, &format!("g{n}")));
        }
        let kept = vec![seen(4, "g4"), seen(5, "g5")];
        assert_eq!(r.resume_from(&kept, 5, 3), 5, "1..3 pruned: on from 5");
        assert_eq!(r.resume_from(&[], 5, 5), 5, "all pruned: on from 5");
        // Pruned through 3 and 4..5 lost in a failover: on from the cut (4 is read again).
        assert_eq!(r.resume_from(&[seen(4, "x9")], 5, 3), 3);
        r.clear();
        assert_eq!(r.resume_from(&[], 5, 0), 5);
    }
}

#[cfg(test)]
mod gap_tests {
    //! On a real PostgreSQL: a follower whose place in the log was pruned away reloads (a
    //! new epoch) instead of reading on as if nothing was missed.

    use super::{super::testdb::TestDb, *};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_behind_the_pruned_log_starts_a_reload() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("gap");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::PostgresStore::open(&options, &dir.path().join("state"))
            .await
            .unwrap();
        let client = Connector::new(&options)
            .unwrap()
            .connect(None)
            .await
            .unwrap();
        let reader = Reader::new(&client).await.unwrap();
        let (out, mut rx) = broadcast::channel(64);
        let health = StoreHealth::new("test".into(), Duration::from_secs(30));
        let mut recent = Recent::default();
        // Host b revokes g1, g2, g3; this follower read g1 only.
        pg.admin(
            &db,
            "INSERT INTO changes (host_id, kind, subject) VALUES ('b', 'revoked', 'g1'), ('b', 'revoked', 'g2'), ('b', 'revoked', 'g3')",
        );
        let first: i64 = pg
            .admin(&db, "SELECT min(seq) FROM changes")
            .trim()
            .parse()
            .unwrap();
        let mut seen = first - 1;
        assert_eq!(
            catch_up(&reader, "host-a", &mut seen, &mut recent, &out)
                .await
                .unwrap(),
            Caught::All
        );
        assert_eq!(seen, first + 2);
        for want in ["g1", "g2", "g3"] {
            assert!(matches!(rx.try_recv(), Ok(GrantChange::Revoked { grant }) if grant == want));
        }
        // Rewind to "read g1 only"; the log is then pruned past g2 (g2's change is gone).
        let mut seen = first;
        pg.admin(
            &db,
            &format!(
                "DELETE FROM changes WHERE seq <= {0}; UPDATE changes_pruned SET through = {0}",
                first + 1
            ),
        );
        let epoch = health.get().epoch;
        assert_eq!(
            catch_up(&reader, "host-a", &mut seen, &mut recent, &out)
                .await
                .unwrap(),
            Caught::Gap { through: first + 1 },
            "a host behind the cut is told so"
        );
        assert!(
            rx.try_recv().is_err(),
            "nothing passed on from a gapped read"
        );
        read_log(&reader, "host-a", &mut seen, &mut recent, &out, &health)
            .await
            .unwrap();
        assert_eq!(
            health.get().epoch,
            epoch + 1,
            "a new epoch: the engine reloads"
        );
        assert_eq!(seen, first + 2, "on from the log's end");
        assert!(recent.0.is_empty());
        // At or past the cut: read on as usual, no reload.
        pg.admin(
            &db,
            "INSERT INTO changes (host_id, kind, subject) VALUES ('b', 'revoked', 'g4')",
        );
        read_log(&reader, "host-a", &mut seen, &mut recent, &out, &health)
            .await
            .unwrap();
        assert_eq!(health.get().epoch, epoch + 1);
        assert!(matches!(rx.try_recv(), Ok(GrantChange::Revoked { grant }) if grant == "g4"));
        // Everything pruned (an empty log) with the follower at the cut: no reload either.
        pg.admin(
            &db,
            &format!("DELETE FROM changes; UPDATE changes_pruned SET through = {seen}"),
        );
        read_log(&reader, "host-a", &mut seen, &mut recent, &out, &health)
            .await
            .unwrap();
        assert_eq!(health.get().epoch, epoch + 1);
        // Hostile store: the prune mark deleted (a damaged or partial restore). Read as 0 it
        // would hide any gap; the read fails instead (the store counts as lost: fail closed),
        // naming the fix.
        pg.admin(
            &db,
            "DELETE FROM changes_pruned; INSERT INTO changes (host_id, kind, subject) VALUES ('b', 'revoked', 'g5')",
        );
        let err = read_log(&reader, "host-a", &mut seen, &mut recent, &out, &health)
            .await
            .expect_err("no prune mark, no read");
        assert!(
            err.to_string().contains("INSERT INTO changes_pruned"),
            "{err}"
        );
        assert!(rx.try_recv().is_err(), "nothing passed on");
        assert!(super::super::prune::pruned_through(&client).await.is_err());
        drop(store);
    }
}
