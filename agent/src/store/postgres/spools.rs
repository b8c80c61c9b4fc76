//! Each host's current local spool, as the shared store knows it (`host_spools`).
//!
//! The spool ([`super::spool`]) keeps records made while the store is out of reach; the store
//! keeps, per host and spool, the last record shipped (`spool_shipped`). What neither knew
//! was whether the spool a host comes back with is the one it had: a spool file deleted (or
//! replaced) while the agent was stopped or the store out of reach made the agent start a
//! fresh one, and whatever the old one held past its shipped mark was gone without a trace.
//!
//! So the writer registers its spool the first time it reaches the store in each run
//! ([`register`]). The same spool, or a first one ever: nothing to say. Another spool, with
//! the registered one retired on purpose (every record shipped, `jitgated --retire-spool`):
//! the new one follows it. Another spool with the registered one *not* retired: its records
//! after the shipped mark are lost, and that is said loudly: a `spool.lost` record in the
//! host's chain (which `audit verify` and `audit verify --fleet` report), an error in the
//! log, a metric. A spool registered to (or shipped by) another host is refused outright:
//! shipping it would put that host's records in this host's chain.

use tokio_postgres::GenericClient;
use tracing::{error, info, warn};

use super::audit;
use crate::{
    model::Timestamp,
    store::{
        Result, StoreError,
        audit::{AuditKey, Event, Sealed, SpoolLost, SpoolRetired},
    },
};

/// What registering this host's spool found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The spool the store already knew as this host's current one.
    Same,
    /// The first spool the store sees from this host (first start, or first since the store
    /// kept track).
    First,
    /// A new spool after one retired on purpose.
    AfterRetired { old: String },
    /// A new spool after one that was not retired: `spool.lost` recorded.
    Lost { old: String, shipped_through: i64 },
    /// The spool is another host's (its file copied here): nothing in it may be shipped as
    /// this host's. The spool this host had, if not retired, is recorded lost.
    Foreign { owner: String },
    /// The spool is an older copy of this host's current spool (a backup or snapshot put
    /// back): the store has records from it past the copy's last one, so what was spooled
    /// after the copy was taken is lost, and the copy's next records would take numbers the
    /// store counts as shipped (and skip). `spool.lost` recorded; nothing is shipped from it.
    RolledBack { head: i64, shipped_through: i64 },
}

/// The last record of `spool` the store has from `host` (0: none).
pub async fn shipped_through(db: &impl GenericClient, host: &str, spool: &str) -> Result<i64> {
    Ok(db
        .query_opt(
            "SELECT seq FROM spool_shipped WHERE host_id = $1 AND spool_id = $2",
            &[&host, &spool],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(0))
}

/// Registers `spool` as `host`'s current spool, in the caller's transaction; appends a
/// `spool.lost` record (sealed with `key`) when it replaces one that was not retired. The
/// sealed records appended are pushed to `appended` (published once committed).
pub async fn register(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    spool: &str,
    head: i64,
    appended: &mut Vec<Sealed>,
) -> Result<Registered> {
    // The chain's lock first: the same order as every other writer of this host's chain.
    audit::lock_chain(db, host).await?;
    let owner: Option<String> = db
        .query_opt(
            "SELECT host_id FROM host_spools WHERE spool_id = $1 AND host_id <> $2 \
             UNION SELECT host_id FROM spool_shipped WHERE spool_id = $1 AND host_id <> $2 LIMIT 1",
            &[&spool, &host],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    let current = db
        .query_opt(
            "SELECT spool_id, registered_at, retired_at FROM host_spools WHERE host_id = $1 FOR UPDATE",
            &[&host],
        )
        .await?;
    let now = Timestamp::now().millis();
    let Some(row) = current else {
        if let Some(owner) = owner {
            return Ok(Registered::Foreign { owner });
        }
        db.execute(
            "INSERT INTO host_spools (host_id, spool_id, registered_at) VALUES ($1, $2, $3)",
            &[&host, &spool, &now],
        )
        .await?;
        return Ok(Registered::First);
    };
    let old: String = row.try_get(0)?;
    let registered_at: i64 = row.try_get(1)?;
    let retired_at: Option<i64> = row.try_get(2)?;
    if old == spool && owner.is_none() {
        // Every record a spool takes gets the next number and none is renumbered, so the
        // spool's head is at least what the store has from it; below, the file went back.
        let shipped = shipped_through(db, host, spool).await?;
        if head < shipped {
            let event = Event::SpoolLost(SpoolLost {
                spool: old.clone(),
                shipped_through: shipped,
                replaced_by: format!("{spool} (an older copy of it, whose last record is {head})"),
                registered_at,
            });
            appended.push(audit::append(db, host, key, "jitgated", &event).await?);
            // Accounted for: moving the copy aside starts a new spool without a second record.
            db.execute(
                "UPDATE host_spools SET retired_at = COALESCE(retired_at, $2) WHERE host_id = $1",
                &[&host, &now],
            )
            .await?;
            return Ok(Registered::RolledBack {
                head,
                shipped_through: shipped,
            });
        }
        if retired_at.is_some() {
            // Retired, yet still here: the operator retired it and kept (or restored) the
            // file. It is the current spool again; nothing was lost.
            warn!(
                spool,
                "this host's spool was retired but is in use again; it is this host's current spool once more"
            );
            db.execute(
                "UPDATE host_spools SET retired_at = NULL WHERE host_id = $1",
                &[&host],
            )
            .await?;
        }
        return Ok(Registered::Same);
    }
    let mut lost = None;
    if retired_at.is_none() && old != spool {
        let shipped = shipped_through(db, host, &old).await?;
        let event = Event::SpoolLost(SpoolLost {
            spool: old.clone(),
            shipped_through: shipped,
            replaced_by: spool.to_owned(),
            registered_at,
        });
        appended.push(audit::append(db, host, key, "jitgated", &event).await?);
        lost = Some(shipped);
    }
    if let Some(owner) = owner {
        // Not registered as this host's: the spool this host had is accounted for (recorded
        // lost above, or retired), so moving the foreign file aside does not record it twice.
        db.execute(
            "UPDATE host_spools SET retired_at = COALESCE(retired_at, $2) WHERE host_id = $1",
            &[&host, &now],
        )
        .await?;
        return Ok(Registered::Foreign { owner });
    }
    db.execute(
        "UPDATE host_spools SET spool_id = $2, registered_at = $3, retired_at = NULL WHERE host_id = $1",
        &[&host, &spool, &now],
    )
    .await?;
    Ok(match lost {
        Some(shipped_through) => Registered::Lost {
            old,
            shipped_through,
        },
        None => Registered::AfterRetired { old },
    })
}

/// Logs and counts what [`register`] found.
pub fn report(host: &str, spool: &str, registered: &Registered) {
    match registered {
        Registered::Same => {}
        Registered::First => info!(
            host,
            spool, "registered this host's local spool with the shared store"
        ),
        Registered::AfterRetired { old } => {
            info!(host, spool, retired = %old, "registered this host's new local spool (the one before was retired)");
        }
        Registered::Lost {
            old,
            shipped_through,
        } => {
            crate::ops::metrics::spool_lost();
            error!(
                host,
                spool,
                lost_spool = %old,
                shipped_through,
                "SPOOLED RECORDS LOST: this host came back to the shared store with a new local spool while its spool {old} was not retired; whatever that spool held after its record {shipped_through} was never shipped. Recorded as spool.lost in this host's audit chain (`jitgate audit verify` reports it); see \"Fleet deployment\" in the README"
            );
        }
        Registered::RolledBack {
            head,
            shipped_through,
        } => {
            crate::ops::metrics::spool_lost();
            error!(
                host,
                spool,
                head,
                shipped_through,
                "SPOOLED RECORDS LOST: the local spool is an older copy of itself (its last record is {head}, the shared store already has records through {shipped_through} from it): what was spooled after the copy was taken is gone. Recorded as spool.lost; nothing in this copy is shipped and the gate stays closed: move it aside with the agent stopped"
            );
        }
        Registered::Foreign { owner } => {
            crate::ops::metrics::spool_lost();
            error!(
                host,
                spool,
                owner = %owner,
                "the local spool belongs to host {owner} (its file was copied here): nothing in it is shipped, the gate stays closed; move it aside with the agent stopped (this host's own spool, if it had one, is recorded as spool.lost)"
            );
        }
    }
}

/// Why a spool cannot be retired.
fn refuse(why: String) -> StoreError {
    StoreError::Invalid(why)
}

/// Retires `spool` (every record shipped through `shipped_through`) as `host`'s current
/// spool, on purpose, with a `spool.retired` record: a new spool may then follow it without
/// an alarm. Refused when the store knows another spool as the host's current one, or has
/// not got every record the spool held.
pub async fn retire(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    spool: &str,
    shipped_through_local: i64,
) -> Result<Sealed> {
    audit::lock_chain(db, host).await?;
    let current: Option<String> = db
        .query_opt(
            "SELECT spool_id FROM host_spools WHERE host_id = $1 FOR UPDATE",
            &[&host],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if let Some(current) = &current
        && current != spool
    {
        return Err(refuse(format!(
            "the shared store knows spool {current} as host {host}'s current spool, not this one ({spool}): start jitgated with the store reachable once (it registers its spool), stop it, then retire"
        )));
    }
    let shipped = shipped_through(db, host, spool).await?;
    if shipped != shipped_through_local {
        return Err(refuse(format!(
            "the shared store has spool {spool}'s records up to {shipped}, but the spool shipped up to {shipped_through_local}: start jitgated with the store reachable so it ships, stop it, then retire"
        )));
    }
    let now = Timestamp::now().millis();
    db.execute(
        "INSERT INTO host_spools (host_id, spool_id, registered_at, retired_at) VALUES ($1, $2, $3, $3) \
         ON CONFLICT (host_id) DO UPDATE SET retired_at = EXCLUDED.retired_at",
        &[&host, &spool, &now],
    )
    .await?;
    let event = Event::SpoolRetired(SpoolRetired {
        spool: spool.to_owned(),
        shipped_through: shipped,
    });
    audit::append(db, host, key, "jitgated --retire-spool", &event).await
}

#[cfg(test)]
mod tests {
    //! On a real PostgreSQL, through the whole store: a spool replaced without being retired
    //! is recorded lost (and `audit verify` says so), the clean cases are not, and a spool
    //! copied from another host is refused.

    use std::{path::Path, time::Duration};

    use super::super::{PostgresOptions, PostgresStore, spool, testdb::TestDb};
    use crate::store::{Store, audit::fleet::HostStatus};

    fn spool_id(state: &Path) -> String {
        rusqlite::Connection::open(state.join(spool::FILE))
            .unwrap()
            .query_row("SELECT spool_id FROM meta", [], |r| r.get(0))
            .unwrap()
    }

    fn registered(pg: &TestDb, db: &str, host: &str) -> String {
        pg.admin(
            db,
            &format!("SELECT spool_id || '|' || COALESCE(retired_at::text, '') FROM host_spools WHERE host_id = '{host}'"),
        )
        .trim()
        .to_owned()
    }

    /// Opens the store and waits until its writer has registered the spool in `state`.
    async fn open(pg: &TestDb, db: &str, options: &PostgresOptions, state: &Path) -> PostgresStore {
        // Started, not opened: a store with records to ship is not available until shipped.
        let store = PostgresStore::start(options, state).unwrap();
        let mut health = store.health.subscribe();
        health.wait_for(|h| h.confirmed.is_some()).await.unwrap();
        let id = spool_id(state);
        for _ in 0..600 {
            if registered(pg, db, &options.host_id) == format!("{id}|") {
                return store;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "spool {id} not registered: {}",
            registered(pg, db, &options.host_id)
        );
    }

    fn kinds(pg: &TestDb, db: &str, host: &str, kind: &str) -> Vec<String> {
        pg.admin(
            db,
            &format!(
                "SELECT detail FROM audit WHERE host_id = '{host}' AND kind = '{kind}' ORDER BY seq"
            ),
        )
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// Records kept in the spool as if the store had been out of reach (never shipped).
    fn spool_unshipped(state: &Path, n: usize) {
        let key = crate::store::audit::secret_key(state, spool::KEY_FILE).unwrap();
        let s = spool::Spool::open(state, key, 1 << 20);
        assert!(s.problem().is_none());
        let records: Vec<spool::Record> = (0..n)
            .map(|i| spool::Record::Audit {
                audit: spool::AuditRecord {
                    at: 1,
                    actor: "jitgated".into(),
                    kind: "gate.detached".into(),
                    detail: format!("{{\"n\":{i}}}"),
                    id: Some(format!("unshipped-{i}")),
                },
            })
            .collect();
        s.append(&records).unwrap();
    }

    /// Moves everything written to the spool into its main file. A dropped store's writer
    /// ends at its next turn, still holding the spool open until then, and SQLite keeps
    /// what WAL mode wrote beside the main file until its last connection closes: a copy of
    /// the main file alone, taken meanwhile, may hold no spool id at all (it then opens as
    /// a new spool, not as the copied one).
    fn checkpointed(state: &Path) {
        let busy: i64 = rusqlite::Connection::open(state.join(spool::FILE))
            .unwrap()
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 0, "the spool's WAL was moved into its main file");
    }

    fn remove_spool(state: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(state.join(format!("{}{suffix}", spool::FILE)));
        }
    }

    /// Hostile: an older copy of the spool put back (a snapshot or backup restored, or the
    /// file swapped by whoever can write the state dir). Its next records would take numbers
    /// the store counts as shipped and be skipped without a trace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_copy_of_the_spool_put_back_is_recorded_lost_and_never_shipped() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("spoolrollback");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = open(&pg, &db, &options, &state).await;
        let id = spool_id(&state);
        drop(store);
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("{}{suffix}", spool::FILE);
            let _ = std::fs::copy(state.join(&name), copy.join(&name));
        }
        // Three records spooled and, at the next start, shipped: the store has 1..3.
        spool_unshipped(&state, 3);
        let store = open(&pg, &db, &options, &state).await;
        for _ in 0..200 {
            if kinds(&pg, &db, "host-a", "gate.detached").len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(kinds(&pg, &db, "host-a", "gate.detached").len(), 3);
        assert!(kinds(&pg, &db, "host-a", "spool.lost").is_empty());
        drop(store);
        // The copy (same id, valid MACs, head 0) put back.
        remove_spool(&state);
        for suffix in ["", "-wal", "-shm"] {
            let name = format!("{}{suffix}", spool::FILE);
            let _ = std::fs::copy(copy.join(&name), state.join(&name));
        }
        assert_eq!(spool_id(&state), id);
        let store = PostgresStore::start(&options, &state).unwrap();
        let mut lost = Vec::new();
        for _ in 0..200 {
            lost = kinds(&pg, &db, "host-a", "spool.lost");
            if !lost.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("older copy"), "{}", lost[0]);
        assert!(lost[0].contains("\"shipped_through\":3"), "{}", lost[0]);
        let problem = store.health.get().spool.problem.clone();
        assert!(
            problem.as_deref().is_some_and(|p| p.contains("older copy")),
            "the copy is refused: {problem:?}"
        );
        // Closed until an operator acts: calls fail, naming why.
        let refused = store.verify_audit().await.expect_err("the store is closed");
        assert!(refused.to_string().contains("older copy"), "{refused}");
        drop(store);
        // Moved aside: a new spool follows without a second record.
        remove_spool(&state);
        let store = open(&pg, &db, &options, &state).await;
        assert_ne!(spool_id(&state), id);
        assert_eq!(kinds(&pg, &db, "host-a", "spool.lost").len(), 1);
        drop(store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spool_deleted_with_unshipped_records_is_recorded_lost() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("spoollost");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // First start ever: registered, nothing said.
        let store = open(&pg, &db, &options, &state).await;
        let first = spool_id(&state);
        let report = store.verify_audit().await.unwrap();
        assert!(report.ok && report.lost.is_empty(), "{report:?}");
        drop(store);
        // A restart with the same spool: nothing said either.
        let store = open(&pg, &db, &options, &state).await;
        assert_eq!(spool_id(&state), first);
        drop(store);
        assert!(kinds(&pg, &db, "host-a", "spool.lost").is_empty());

        // Hostile: records spooled during an outage, then the spool file deleted while the
        // agent is stopped.
        spool_unshipped(&state, 3);
        remove_spool(&state);
        let store = open(&pg, &db, &options, &state).await;
        let second = spool_id(&state);
        assert_ne!(second, first, "a fresh spool");
        let lost = kinds(&pg, &db, "host-a", "spool.lost");
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(
            lost[0].contains(&format!("\"spool\":\"{first}\"")),
            "{}",
            lost[0]
        );
        assert!(
            lost[0].contains(&format!("\"replaced_by\":\"{second}\"")),
            "{}",
            lost[0]
        );
        assert!(lost[0].contains("\"shipped_through\":0"), "{}", lost[0]);
        for _ in 0..3 {
            assert!(
                kinds(&pg, &db, "host-a", "gate.detached").is_empty(),
                "the lost records never arrive"
            );
        }
        let report = store.verify_audit().await.unwrap();
        assert!(!report.ok, "{report:?}");
        assert!(
            report.problems.is_empty(),
            "the chain is intact: {report:?}"
        );
        assert_eq!(report.lost.len(), 1);
        assert!(report.lost[0].contains(&first), "{}", report.lost[0]);
        assert!(
            report.lost[0].contains("--retire-spool"),
            "{}",
            report.lost[0]
        );
        let fleet = store.verify_audit_fleet().await.unwrap();
        assert!(!fleet.ok);
        let me = fleet.hosts.iter().find(|h| h.host == "host-a").unwrap();
        assert_eq!(me.status, HostStatus::Lost, "{me:?}");
        drop(store);
        // Said once: the next start with the new spool adds nothing.
        let store = open(&pg, &db, &options, &state).await;
        assert_eq!(kinds(&pg, &db, "host-a", "spool.lost").len(), 1);
        drop(store);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retired_spool_is_followed_silently_and_only_an_empty_one_retires() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("spoolretire");
        let options = pg.options(&db, "host-a");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = open(&pg, &db, &options, &state).await;
        let first = spool_id(&state);
        drop(store);
        // Records waiting: not retired (they would be lost), the file kept.
        spool_unshipped(&state, 2);
        let e = PostgresStore::retire_spool(&options, &state)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 records not shipped yet"), "{e}");
        assert!(state.join(spool::FILE).exists());
        // Started with the store reachable, they ship; stopped, the spool retires.
        let store = open(&pg, &db, &options, &state).await;
        for _ in 0..600 {
            if kinds(&pg, &db, "host-a", "gate.detached").len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.flush().await.unwrap();
        drop(store);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = PostgresStore::retire_spool(&options, &state).await.unwrap();
        assert!(done.contains(&first), "{done}");
        assert!(
            !state.join(spool::FILE).exists(),
            "the spool file is removed"
        );
        assert!(registered(&pg, &db, "host-a").starts_with(&format!("{first}|1")));
        assert_eq!(kinds(&pg, &db, "host-a", "spool.retired").len(), 1);
        let store = open(&pg, &db, &options, &state).await;
        assert_ne!(spool_id(&state), first);
        assert!(kinds(&pg, &db, "host-a", "spool.lost").is_empty());
        let report = store.verify_audit().await.unwrap();
        assert!(report.ok, "{report:?}");
        drop(store);
        // No spool, or not the store's current one: refused.
        remove_spool(&state);
        let e = PostgresStore::retire_spool(&options, &state)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to retire"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_hosts_spool_is_refused_and_a_lost_key_ends_as_a_recorded_loss() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("spoolforeign");
        let dir = tempfile::tempdir().unwrap();
        let (state_a, state_b) = (dir.path().join("a"), dir.path().join("b"));
        let (options_a, options_b) = (pg.options(&db, "host-a"), pg.options(&db, "host-b"));
        drop(open(&pg, &db, &options_a, &state_a).await);
        let spool_a = spool_id(&state_a);
        drop(open(&pg, &db, &options_b, &state_b).await);
        spool_unshipped(&state_b, 2);
        let spool_b = spool_id(&state_b);

        // Hostile: host b's spool file, with its key, copied over host a's.
        checkpointed(&state_b);
        remove_spool(&state_a);
        std::fs::copy(state_b.join(spool::FILE), state_a.join(spool::FILE)).unwrap();
        std::fs::copy(state_b.join(spool::KEY_FILE), state_a.join(spool::KEY_FILE)).unwrap();
        let store = PostgresStore::start(&options_a, &state_a).unwrap();
        let mut reached = store.health.subscribe();
        reached.wait_for(|h| h.confirmed.is_some()).await.unwrap();
        let health = Store::health(&store).unwrap();
        // Up to 30 s: the check runs on the store's own thread, which a loaded machine (the
        // lib tests run beside each other) can keep waiting for seconds.
        let mut problem = None;
        for _ in 0..600 {
            problem = health.get().spool.problem;
            if problem.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let problem = problem.expect("the foreign spool is refused");
        assert!(problem.contains("host-b"), "{problem}");
        assert!(health.check().is_err(), "the gate stays closed");
        assert!(
            kinds(&pg, &db, "host-a", "gate.detached").is_empty(),
            "host b's records are not shipped as host a's"
        );
        let lost = kinds(&pg, &db, "host-a", "spool.lost");
        assert_eq!(lost.len(), 1, "host a's own spool is gone: {lost:?}");
        assert!(lost[0].contains(&spool_a), "{}", lost[0]);
        assert!(registered(&pg, &db, "host-b").starts_with(&spool_b));
        drop(store);
        // Moved aside: a new spool follows without a second alarm.
        remove_spool(&state_a);
        drop(open(&pg, &db, &options_a, &state_a).await);
        assert_eq!(kinds(&pg, &db, "host-a", "spool.lost").len(), 1);

        // Hostile: host b's spool key deleted while b is stopped with records in its spool:
        // the spool no longer checks (gate closed, nothing shipped); moved aside, its loss is
        // recorded.
        std::fs::remove_file(state_b.join(spool::KEY_FILE)).unwrap();
        let store = PostgresStore::start(&options_b, &state_b).unwrap();
        let problem = Store::health(&store).unwrap().get().spool.problem;
        assert!(
            problem
                .as_deref()
                .is_some_and(|p| p.contains("integrity check")),
            "{problem:?}"
        );
        drop(store);
        assert!(kinds(&pg, &db, "host-b", "spool.lost").is_empty());
        remove_spool(&state_b);
        let store = open(&pg, &db, &options_b, &state_b).await;
        let lost = kinds(&pg, &db, "host-b", "spool.lost");
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains(&spool_b), "{}", lost[0]);
        assert!(!store.verify_audit().await.unwrap().ok);
        drop(store);
    }
}
