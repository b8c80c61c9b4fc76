//! `jitgate audit verify --fleet` against the shared store: every host's chain, checked with
//! the hosts' public keys ([`crate::store::audit::fleet`]) and this host's pins.
//!
//! The registrations and all records are read in one read-only, repeatable-read
//! transaction, so a host appending meanwhile is seen consistently (never a registration
//! without its first record, or the reverse). Records are streamed, host by host; memory
//! stays one host's verifier, whatever the log's size.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Mutex, PoisonError},
};

use futures_util::{StreamExt as _, pin_mut};
use tokio_postgres::{Client, IsolationLevel, Transaction};
use tracing::warn;

use crate::{
    model::Timestamp,
    store::{
        Result, StoreError,
        audit::{
            Sealed,
            fleet::{FleetReport, HostStatus, HostVerifier, Pin, Pins, Registration},
        },
    },
};

/// Serialises updates of the pins file between verifications running at once.
static PINS_LOCK: Mutex<()> = Mutex::new(());

/// Verifies every host's chain; `me` is this host, `own_key` its public key (hex).
pub async fn verify(
    client: &mut Client,
    me: &str,
    own_key: Option<&str>,
    pins_path: &Path,
) -> Result<FleetReport> {
    let pins = Pins::load(pins_path)?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let (report, new_pins) = walk(&tx, me, own_key, &pins).await?;
    // Read only: nothing to commit.
    drop(tx);
    if !new_pins.is_empty() {
        save_pins(pins_path, new_pins)?;
    }
    Ok(report)
}

async fn walk(
    client: &Transaction<'_>,
    me: &str,
    own_key: Option<&str>,
    pins: &Pins,
) -> Result<(FleetReport, BTreeMap<String, Pin>)> {
    let registrations: BTreeMap<String, Registration> = client
        .query(
            "SELECT host_id, public_key, signed_from, sig FROM audit_hosts",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<_, String>(0)?,
                Registration {
                    public_key: r.try_get(1)?,
                    signed_from: r.try_get(2)?,
                    sig: r.try_get(3)?,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let now = Timestamp::now().millis();
    let start = |host: &str| {
        HostVerifier::new(
            host,
            registrations.get(host),
            pins.hosts.get(host),
            (host == me).then_some(own_key).flatten(),
            now,
        )
    };
    let mut hosts = Vec::new();
    let mut new_pins = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut finish = |host: String, v: HostVerifier, seen: &mut BTreeSet<String>| {
        let (report, pin) = v.finish();
        if let Some(pin) = pin {
            new_pins.insert(host.clone(), pin);
        }
        seen.insert(host);
        hosts.push(report);
    };

    let rows = client
        .query_raw(
            "SELECT host_id, seq, at, kind, actor, detail, prev_hash, hash, sig FROM audit ORDER BY host_id, seq",
            std::iter::empty::<&str>(),
        )
        .await?;
    pin_mut!(rows);
    let mut current: Option<(String, HostVerifier)> = None;
    while let Some(row) = rows.next().await {
        let row = row?;
        let host: String = row.try_get(0)?;
        let record = Sealed {
            seq: row.try_get(1)?,
            at: row.try_get(2)?,
            kind: row.try_get(3)?,
            actor: row.try_get(4)?,
            detail: row.try_get(5)?,
            prev_hash: row.try_get(6)?,
            hash: row.try_get(7)?,
        };
        let sig: Option<String> = row.try_get(8)?;
        if current.as_ref().is_none_or(|(h, _)| *h != host) {
            if let Some((h, v)) = current.take() {
                finish(h, v, &mut seen);
            }
            let v = start(&host);
            current = Some((host, v));
        }
        if let Some((_, v)) = current.as_mut() {
            v.check(&record, sig.as_deref());
        }
    }
    if let Some((h, v)) = current.take() {
        finish(h, v, &mut seen);
    }
    // Hosts registered or pinned that have no records left at all.
    let silent: BTreeSet<String> = registrations
        .keys()
        .chain(pins.hosts.keys())
        .filter(|h| !seen.contains(*h))
        .cloned()
        .collect();
    for host in silent {
        let v = start(&host);
        finish(host, v, &mut seen);
    }
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let ok = hosts.iter().all(|h| h.status == HostStatus::Ok);
    if !ok {
        let failed: Vec<&str> = hosts
            .iter()
            .filter(|h| h.status != HostStatus::Ok)
            .map(|h| h.host.as_str())
            .collect();
        warn!(hosts = ?failed, "fleet audit verification failed");
    }
    Ok((
        FleetReport {
            ok,
            verifier: me.to_owned(),
            hosts,
        },
        new_pins,
    ))
}

/// Merges fresh pins into the file: a host's key is pinned once; its verified height only
/// grows (two verifications racing cannot move it back).
fn save_pins(path: &Path, fresh: BTreeMap<String, Pin>) -> Result<()> {
    let _guard = PINS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let mut pins = Pins::load(path)?;
    for (host, pin) in fresh {
        match pins.hosts.get_mut(&host) {
            None => {
                pins.hosts.insert(host, pin);
            }
            Some(old) if old.public_key == pin.public_key => {
                if pin.seq > old.seq {
                    old.seq = pin.seq;
                    old.hash = pin.hash;
                }
                if old.signed_from.is_none() {
                    old.signed_from = pin.signed_from;
                }
            }
            Some(_) => {}
        }
    }
    pins.save(path).map_err(|e| {
        StoreError::Invalid(format!(
            "saving the fleet audit pins to {}: {e}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    //! On a real PostgreSQL: two hosts, verification from the other one, and what a host
    //! that sealed records before it signed them looks like.

    use super::super::{PostgresStore, testdb::TestDb};
    use crate::store::{
        Store as _,
        audit::{Event, GrantExpired, fleet::HostStatus},
    };

    fn event(n: usize) -> Event {
        Event::GrantExpired(GrantExpired {
            grant: format!("grt_{n}"),
        })
    }

    fn status(report: &super::FleetReport, host: &str) -> HostStatus {
        report
            .hosts
            .iter()
            .find(|h| h.host == host)
            .unwrap_or_else(|| panic!("{host} missing from {report:?}"))
            .status
    }

    /// Hosts A and B on `db`, A with three records; their state directories.
    async fn two_hosts_a_wrote_three(
        pg: &TestDb,
        db: &str,
    ) -> (
        PostgresStore,
        PostgresStore,
        tempfile::TempDir,
        tempfile::TempDir,
    ) {
        let (da, dbb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = PostgresStore::open(&pg.options(db, "host-a"), &da.path().join("state"))
            .await
            .unwrap();
        let b = PostgresStore::open(&pg.options(db, "host-b"), &dbb.path().join("state"))
            .await
            .unwrap();
        for n in 0..3 {
            a.append_audit("jitgated".into(), event(n)).await.unwrap();
        }
        (a, b, da, dbb)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_hosts_chains_verify_and_unsigned_records_are_not_tampering() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("fleetverify");
        let (a, b, da, _db) = two_hosts_a_wrote_three(&pg, &db).await;
        // Host A as a jitgated from before signatures left it: nothing signed, no key (and
        // no memory of having signed). It cannot be verified from B: the check does not pass.
        pg.admin(&db, "UPDATE audit SET sig = NULL; DELETE FROM audit_hosts");
        std::fs::remove_file(da.path().join("state/audit-sign.from")).unwrap();
        b.append_audit("jitgated".into(), event(9)).await.unwrap();
        let report = b.verify_audit_fleet().await.unwrap();
        assert!(
            !report.ok,
            "an unverifiable host never reads as a pass: {report:?}"
        );
        assert_eq!(status(&report, "host-a"), HostStatus::Unsigned);
        assert_eq!(status(&report, "host-b"), HostStatus::Ok);

        // A upgraded: it signs from its next record on; the older ones stay unsigned, not
        // tampered.
        a.append_audit("jitgated".into(), event(3)).await.unwrap();
        a.append_audit("jitgated".into(), event(4)).await.unwrap();
        let report = b.verify_audit_fleet().await.unwrap();
        assert!(report.ok, "{report:?}");
        let host_a = report.hosts.iter().find(|h| h.host == "host-a").unwrap();
        assert_eq!(host_a.status, HostStatus::Ok, "{report:?}");
        assert_eq!((host_a.records, host_a.unsigned), (5, 3));
        // A verifies itself the same way (its key known first-hand).
        assert!(a.verify_audit_fleet().await.unwrap().ok);

        // Hostile: a signed record stripped of its signature and edited.
        pg.admin(
            &db,
            "UPDATE audit SET sig = NULL, actor = 'mallory' WHERE host_id = 'host-a' AND seq = 4",
        );
        let report = b.verify_audit_fleet().await.unwrap();
        assert!(!report.ok);
        let host_a = report.hosts.iter().find(|h| h.host == "host-a").unwrap();
        assert_eq!(host_a.first_bad_seq, Some(4), "{report:?}");
        assert!(host_a.problems[0].contains("stripped"), "{report:?}");
        // The host's own HMAC check agrees.
        assert!(!a.verify_audit().await.unwrap().ok);
    }

    /// Hostile: a database writer strips every signature of a host and deletes its
    /// registration, hoping the host re-registers with a later start that passes the
    /// stripped records off as from before it signed. The host remembers its first signed
    /// record, so the downgrade is caught by a verifier that never saw the host before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stripped_signatures_cannot_pass_as_older_than_signing() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("fleetdowngrade");
        let (a, b, _da, _db) = two_hosts_a_wrote_three(&pg, &db).await;
        pg.admin(
            &db,
            "UPDATE audit SET sig = NULL, actor = 'mallory' WHERE host_id = 'host-a'; DELETE FROM audit_hosts WHERE host_id = 'host-a'",
        );
        // Before A writes again: unverifiable, which fails the check.
        let report = b.verify_audit_fleet().await.unwrap();
        assert!(!report.ok, "{report:?}");
        // A writes again and re-registers: with its remembered start, the stripped records
        // are caught.
        a.append_audit("jitgated".into(), event(3)).await.unwrap();
        let report = b.verify_audit_fleet().await.unwrap();
        assert!(!report.ok, "{report:?}");
        assert_eq!(status(&report, "host-a"), HostStatus::Failed, "{report:?}");
        let host_a = report.hosts.iter().find(|h| h.host == "host-a").unwrap();
        assert_eq!(host_a.first_bad_seq, Some(1), "{report:?}");
    }
}
