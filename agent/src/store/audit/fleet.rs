//! Verifying every host's audit chain in a shared store from any one host
//! (`jitgate audit verify --fleet`), with public keys instead of the hosts' HMAC keys.
//!
//! What a verifier trusts, and why:
//! - **Pins** (`state_dir/audit-fleet-pins.json`, kept on the verifying host, outside the
//!   database): each host's public key as first seen (trust on first use, like SSH's
//!   `known_hosts`; this host's own key is pinned from its own signing key, never from the
//!   store), and the highest record it verified there (seq and hash). A key in the store
//!   that differs from the pin is a failure; so is a chain that now ends below, or differs
//!   at, the pinned record (rolled back, truncated, rewritten); so is a pinned host gone.
//! - **The host's registration** (`audit_hosts`): its key and the first record it signed,
//!   signed with that key. Every record from there on must carry a valid signature, and the
//!   chain must reach at least that record.
//! - **The chain**: sequence numbers without gaps, each record linking to the one before.
//!
//! Records before `signed_from` (sealed before this jitgated signed records) are counted as
//! unsigned, not as tampered: only their own host's `audit verify` (the HMAC) covers them. A
//! host with no registration and no signed record is reported `unsigned`, not failed.
//!
//! Pure: the caller streams each host's records in; reading and writing the pins file are
//! the only I/O.

use std::{collections::BTreeMap, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use serde::{Deserialize, Serialize};

use super::{GENESIS, Sealed, sign};

/// The pins file in the verifying host's state dir.
pub const PINS_FILE: &str = "audit-fleet-pins.json";

/// A host's registration as stored (`audit_hosts`).
#[derive(Clone, Debug)]
pub struct Registration {
    pub public_key: String,
    pub signed_from: i64,
    pub sig: String,
}

/// What the verifying host remembers of another host's chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub public_key: String,
    /// The highest record verified (0: none yet) and its hash.
    pub seq: i64,
    pub hash: String,
    /// When the key was first pinned (unix ms).
    pub pinned_at: i64,
    /// The first record the host signed, as its registration said when pinned: records from
    /// there on must stay signed, even if the registration is later rewritten.
    #[serde(default)]
    pub signed_from: Option<i64>,
}

/// Every pin, by host.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Pins {
    pub hosts: BTreeMap<String, Pin>,
}

impl Pins {
    /// Reads the pins (none yet: empty). A damaged file is an error, never "no pins": that
    /// would re-trust whatever the store now says.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!(
                    "{} is damaged ({e}); restore it from backup, or remove it to trust every host's current key again",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the pins atomically, root only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    }
}

/// How one host's chain fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Every signed record verifies; the chain is whole and not behind its pin.
    Ok,
    /// Something is wrong: see `problems`.
    Failed,
    /// The host signs nothing (it runs a jitgated from before signatures): not checkable here.
    Unsigned,
    /// The chain verifies, but the host lost records before they reached it (a `spool.lost`
    /// record): see `problems`.
    Lost,
}

/// One host's line of `jitgate audit verify --fleet`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    pub status: HostStatus,
    pub records: u64,
    /// Records before the host began signing (checked by its own `audit verify` only).
    pub unsigned: u64,
    /// The first sequence number found wrong, if any.
    pub first_bad_seq: Option<i64>,
    /// The start of the public key the records were checked with.
    pub key: Option<String>,
    pub problems: Vec<String>,
}

/// What `jitgate audit verify --fleet` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetReport {
    /// Every host verified. A host that signs nothing cannot be verified from here (it has not
    /// written since it was upgraded, or someone stripped its signatures and registration),
    /// so it fails the whole check too: a downgrade must never read as a pass.
    pub ok: bool,
    /// The host that verified (whose pins were used).
    pub verifier: String,
    pub hosts: Vec<HostReport>,
}

/// Walks one host's chain, record by record in sequence order.
pub struct HostVerifier {
    host: String,
    /// The key records are checked with: the pinned one when there is a pin.
    key: Option<String>,
    signed_from: Option<i64>,
    pin: Option<Pin>,
    problems: Vec<String>,
    /// `spool.lost` records: what they say was lost.
    lost: Vec<String>,
    first_bad: Option<i64>,
    expected_seq: i64,
    prev_hash: String,
    records: u64,
    unsigned: u64,
    /// Records carrying a signature while there is no key to check it with.
    orphan_signed: u64,
    /// A fresh pin to keep, if the chain verifies.
    new_pin: Option<Pin>,
}

impl HostVerifier {
    /// `registration` is the host's row in the store, `pin` what this verifier remembers of
    /// it; `own_key` is set when `host` is the verifying host (its key is known first-hand).
    pub fn new(
        host: &str,
        registration: Option<&Registration>,
        pin: Option<&Pin>,
        own_key: Option<&str>,
        now_ms: i64,
    ) -> Self {
        let mut v = Self {
            host: host.to_owned(),
            key: None,
            signed_from: None,
            pin: pin.cloned(),
            problems: Vec::new(),
            lost: Vec::new(),
            first_bad: None,
            expected_seq: 1,
            prev_hash: GENESIS.to_owned(),
            records: 0,
            unsigned: 0,
            orphan_signed: 0,
            new_pin: None,
        };
        let trusted = own_key.or(pin.map(|p| p.public_key.as_str()));
        match (registration, trusted) {
            (Some(reg), Some(trusted)) if reg.public_key != trusted => {
                let since = pin.map_or_else(
                    || "this host's own signing key".to_owned(),
                    |p| format!("pinned here at {}", crate::model::Timestamp(p.pinned_at)),
                );
                v.problem(
                    None,
                    format!(
                        "ITS PUBLIC KEY CHANGED: the store now has {}, this host trusts {} ({since}). Someone with write access to the database may have replaced it; if {host} was really re-keyed (its state_dir lost), confirm the new key on {host} itself and remove \"{host}\" from {PINS_FILE} in this host's state_dir",
                        sign::fingerprint(&reg.public_key),
                        sign::fingerprint(trusted),
                    ),
                );
                v.key = Some(trusted.to_owned());
                v.signed_from = pin.and_then(|p| p.signed_from);
            }
            (Some(reg), _)
                if !sign::verify_registration(&reg.public_key, host, reg.signed_from, &reg.sig) =>
            {
                v.problem(
                    None,
                    format!(
                        "its key registration in the store (key {}) is not signed by that key: someone with write access to the database wrote it",
                        sign::fingerprint(&reg.public_key)
                    ),
                );
                v.key = trusted.map(str::to_owned);
                v.signed_from = pin.and_then(|p| p.signed_from);
            }
            (Some(reg), _) => {
                v.key = Some(reg.public_key.clone());
                // A pin remembers an earlier start: a rewritten registration cannot move it.
                v.signed_from = Some(
                    pin.and_then(|p| p.signed_from)
                        .map_or(reg.signed_from, |f| f.min(reg.signed_from)),
                );
            }
            (None, Some(trusted)) => {
                if pin.is_some() {
                    v.problem(
                        None,
                        format!(
                            "its key registration is gone from the store (this host pinned key {}): someone with write access to the database removed it",
                            sign::fingerprint(trusted)
                        ),
                    );
                }
                v.key = Some(trusted.to_owned());
                v.signed_from = pin.and_then(|p| p.signed_from);
            }
            (None, None) => {}
        }
        if let Some(key) = &v.key
            && pin.is_none()
        {
            v.new_pin = Some(Pin {
                public_key: key.clone(),
                seq: 0,
                hash: String::new(),
                pinned_at: now_ms,
                signed_from: v.signed_from,
            });
        }
        v
    }

    fn problem(&mut self, seq: Option<i64>, what: String) {
        if let Some(seq) = seq {
            self.first_bad = Some(self.first_bad.map_or(seq, |b| b.min(seq)));
        }
        self.problems.push(what);
    }

    /// Checks the next record and its signature (`None`: it has none).
    pub fn check(&mut self, r: &Sealed, sig: Option<&str>) {
        self.records += 1;
        if r.kind == super::SPOOL_LOST {
            self.lost.push(super::spool_lost_note(r.seq, &r.detail));
        }
        if r.seq != self.expected_seq {
            if r.seq > self.expected_seq {
                self.problem(
                    Some(self.expected_seq),
                    format!(
                        "records {}..{} are missing (deleted)",
                        self.expected_seq,
                        r.seq - 1
                    ),
                );
            } else {
                self.problem(Some(r.seq), format!("record {} is out of order", r.seq));
            }
        }
        if r.prev_hash != self.prev_hash {
            self.problem(
                Some(r.seq),
                format!(
                    "record {} does not link to the record before it (a record was deleted, inserted or reordered)",
                    r.seq
                ),
            );
        }
        // From `signed_from` on, every record must carry a valid signature. Before it, a
        // record is the host's from before it signed (only its own HMAC covers it), or was
        // signed with an earlier key of a re-keyed host: a signature there that verifies
        // counts, one that does not is not held against it.
        let must_sign = self.signed_from.is_some_and(|from| r.seq >= from);
        match (self.key.clone(), sig) {
            (Some(key), Some(sig)) if must_sign => {
                if !sign::verify_record(&key, &self.host, r, sig) {
                    self.problem(
                        Some(r.seq),
                        format!(
                            "record {} ({}) does not match its signature by key {}: it was edited or forged",
                            r.seq,
                            r.kind,
                            sign::fingerprint(&key)
                        ),
                    );
                }
            }
            (Some(_), None) if must_sign => self.problem(
                Some(r.seq),
                format!(
                    "record {} ({}) has no signature, though the host signs every record from {} on: its signature was stripped",
                    r.seq,
                    r.kind,
                    self.signed_from.unwrap_or(1)
                ),
            ),
            (Some(key), Some(sig)) if sign::verify_record(&key, &self.host, r, sig) => {}
            (None, Some(_)) => self.orphan_signed += 1,
            _ => self.unsigned += 1,
        }
        if let Some(pin) = &self.pin
            && pin.seq == r.seq
            && pin.hash != r.hash
        {
            self.problem(
                Some(r.seq),
                format!(
                    "record {} differs from the one this host verified before: the chain was rewritten",
                    r.seq
                ),
            );
        }
        self.prev_hash.clone_from(&r.hash);
        self.expected_seq = r.seq + 1;
    }

    /// The host's report, and the pin to keep for it (`None`: leave the old one as it is).
    pub fn finish(mut self) -> (HostReport, Option<Pin>) {
        let last = self.expected_seq - 1;
        if let Some(pin) = self.pin.clone()
            && pin.seq > last
        {
            self.problem(
                Some(last + 1),
                format!(
                    "records {}..{} are missing from the end (this host verified up to record {} before): the chain was truncated or rolled back",
                    last + 1,
                    pin.seq,
                    pin.seq
                ),
            );
        }
        if let Some(from) = self.signed_from
            && from > last
        {
            self.problem(
                Some(last + 1),
                format!(
                    "records {}..{from} are missing from the end (the host's signed registration says it sealed record {from}): the chain was truncated",
                    last + 1
                ),
            );
        }
        if self.orphan_signed > 0 {
            self.problem(
                None,
                format!(
                    "{} records carry signatures but the host's key is not in the store: its registration was removed",
                    self.orphan_signed
                ),
            );
        }
        let status = if !self.problems.is_empty() {
            HostStatus::Failed
        } else if !self.lost.is_empty() {
            HostStatus::Lost
        } else if self.key.is_none() {
            HostStatus::Unsigned
        } else {
            HostStatus::Ok
        };
        // A chain that verifies is pinned, records lost before it or not.
        let pin = matches!(status, HostStatus::Ok | HostStatus::Lost)
            .then(|| {
                let base = self.pin.clone().or(self.new_pin.clone())?;
                let advanced = last > base.seq;
                (advanced || self.pin.is_none()).then(|| Pin {
                    seq: last.max(base.seq),
                    hash: if advanced {
                        self.prev_hash.clone()
                    } else {
                        base.hash.clone()
                    },
                    ..base
                })
            })
            .flatten();
        (
            HostReport {
                host: self.host,
                status,
                records: self.records,
                unsigned: self.unsigned,
                first_bad_seq: self.first_bad,
                key: self.key.as_deref().map(sign::fingerprint),
                problems: self.problems.into_iter().chain(self.lost).collect(),
            },
            pin,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::Timestamp,
        store::audit::{AuditKey, Event, GrantExpired, seal, sign::AuditSigner},
    };

    struct Host {
        key: AuditKey,
        signer: AuditSigner,
        records: Vec<(Sealed, Option<String>)>,
        registration: Option<Registration>,
    }

    impl Host {
        fn new(seed: u8) -> Self {
            Self {
                key: AuditKey::new([seed; 32]),
                signer: AuditSigner::from_seed(&[seed; 32]).unwrap(),
                records: Vec::new(),
                registration: None,
            }
        }

        fn append(&mut self, n: usize, signed: bool) {
            for _ in 0..n {
                let head = self.records.last().map(|(r, _)| (r.seq, r.hash.clone()));
                let r = seal(
                    &self.key,
                    head.as_ref(),
                    Timestamp(1_000 + self.records.len() as i64),
                    "jitgated",
                    &Event::GrantExpired(GrantExpired { grant: "g".into() }),
                )
                .unwrap();
                let sig = signed.then(|| self.signer.sign_record("a", &r));
                if signed && self.registration.is_none() {
                    self.registration = Some(Registration {
                        public_key: self.signer.public_key_hex(),
                        signed_from: r.seq,
                        sig: self.signer.sign_registration("a", r.seq),
                    });
                }
                self.records.push((r, sig));
            }
        }

        fn verify(&self, pin: Option<&Pin>) -> (HostReport, Option<Pin>) {
            let mut v = HostVerifier::new("a", self.registration.as_ref(), pin, None, 1);
            for (r, s) in &self.records {
                v.check(r, s.as_deref());
            }
            v.finish()
        }
    }

    fn failed_at(report: &HostReport, seq: i64, words: &str) {
        assert_eq!(report.status, HostStatus::Failed, "{report:?}");
        assert_eq!(report.first_bad_seq, Some(seq), "{report:?}");
        assert!(
            report.problems.iter().any(|p| p.contains(words)),
            "{report:?}"
        );
    }

    #[test]
    fn a_signed_chain_verifies_and_is_pinned() {
        let mut h = Host::new(1);
        h.append(2, false);
        h.append(3, true);
        let (report, pin) = h.verify(None);
        assert_eq!(report.status, HostStatus::Ok, "{report:?}");
        assert_eq!((report.records, report.unsigned), (5, 2));
        let pin = pin.unwrap();
        assert_eq!(pin.seq, 5);
        assert_eq!(pin.public_key, h.signer.public_key_hex());
        // Again with the pin: still ok, nothing new to pin.
        let (report, again) = h.verify(Some(&pin));
        assert_eq!(report.status, HostStatus::Ok, "{report:?}");
        assert_eq!(again, None);
    }

    #[test]
    fn a_host_that_never_signed_is_unsigned_not_failed() {
        let mut h = Host::new(1);
        h.append(3, false);
        let (report, pin) = h.verify(None);
        assert_eq!(report.status, HostStatus::Unsigned, "{report:?}");
        assert!(pin.is_none());
    }

    #[test]
    fn edits_deletions_truncation_and_stripping_are_found_without_a_pin() {
        let mut h = Host::new(1);
        h.append(1, false);
        h.append(5, true);
        let good = h.records.clone();

        h.records[2].0.detail = "{\"grant\":\"x\"}".into();
        failed_at(&h.verify(None).0, 3, "does not match its signature");

        h.records = good.clone();
        h.records.remove(3);
        failed_at(&h.verify(None).0, 4, "4..4 are missing");

        h.records = good.clone();
        h.records[4].1 = None;
        failed_at(&h.verify(None).0, 5, "signature was stripped");

        // Everything signed cut off: the registration says record 2 was sealed.
        h.records = good[..1].to_vec();
        failed_at(&h.verify(None).0, 2, "2..2 are missing from the end");

        // Reordered: swap two records (renumbered to look contiguous).
        h.records = good.clone();
        let (mut x, mut y) = (h.records[2].clone(), h.records[3].clone());
        std::mem::swap(&mut x.0.seq, &mut y.0.seq);
        h.records[2] = y;
        h.records[3] = x;
        failed_at(&h.verify(None).0, 3, "does not link");

        // A forged record inserted, signed with another key.
        h.records = good.clone();
        let mut forged = good[3].clone();
        forged.0.actor = "mallory".into();
        forged.1 = Some(Host::new(9).signer.sign_record("a", &forged.0));
        h.records[3] = forged;
        failed_at(&h.verify(None).0, 4, "edited or forged");
    }

    #[test]
    fn truncation_and_rollback_are_found_against_the_pin() {
        let mut h = Host::new(1);
        h.append(4, true);
        let (_, pin) = h.verify(None);
        let pin = pin.unwrap();
        let good = h.records.clone();
        h.records.truncate(2);
        failed_at(&h.verify(Some(&pin)).0, 3, "3..4 are missing from the end");
        // A pin names its record: a rewritten record at that place is caught.
        h.records = good;
        let mut p = pin.clone();
        p.hash = "ff".into();
        failed_at(&h.verify(Some(&p)).0, 4, "chain was rewritten");
    }

    #[test]
    fn a_replaced_or_removed_key_is_a_loud_failure() {
        let mut h = Host::new(1);
        h.append(3, true);
        let (_, pin) = h.verify(None);
        let pin = pin.unwrap();
        // The attacker registers their own key (signed by it) and re-signs nothing.
        let mallory = AuditSigner::from_seed(&[9; 32]).unwrap();
        h.registration = Some(Registration {
            public_key: mallory.public_key_hex(),
            signed_from: 1,
            sig: mallory.sign_registration("a", 1),
        });
        let (report, new_pin) = h.verify(Some(&pin));
        assert_eq!(report.status, HostStatus::Failed);
        assert!(
            report.problems[0].contains("PUBLIC KEY CHANGED"),
            "{report:?}"
        );
        assert!(new_pin.is_none(), "a failed host's pin is kept as it was");
        // Even re-signing every record with the new key does not help.
        for (r, s) in &mut h.records {
            *s = Some(mallory.sign_record("a", r));
        }
        assert_eq!(h.verify(Some(&pin)).0.status, HostStatus::Failed);
        // The registration deleted: with a pin, a failure; without, signed records without a
        // key are still one.
        h.registration = None;
        let (report, _) = h.verify(Some(&pin));
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("gone from the store")),
            "{report:?}"
        );
        assert_eq!(h.verify(None).0.status, HostStatus::Failed);
        // A registration not signed by its own key.
        h.registration = Some(Registration {
            public_key: mallory.public_key_hex(),
            signed_from: 5,
            sig: mallory.sign_registration("a", 1),
        });
        assert_eq!(h.verify(None).0.status, HostStatus::Failed);
    }

    /// Hostile: the registration deleted, the host re-registered later (a higher
    /// `signed_from`), an old record edited with its signature left: the pin remembers.
    #[test]
    fn a_rewritten_registration_cannot_unsign_old_records_for_a_pinned_verifier() {
        let mut h = Host::new(1);
        h.append(4, true);
        let pin = h.verify(None).1.unwrap();
        assert_eq!(pin.signed_from, Some(1));
        h.registration = Some(Registration {
            public_key: h.signer.public_key_hex(),
            signed_from: 4,
            sig: h.signer.sign_registration("a", 4),
        });
        h.records[1].0.actor = "mallory".into();
        failed_at(&h.verify(Some(&pin)).0, 2, "edited or forged");
        h.records[1].1 = None;
        failed_at(&h.verify(Some(&pin)).0, 2, "stripped");
    }

    #[test]
    fn pins_survive_a_round_trip_and_a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PINS_FILE);
        assert!(Pins::load(&path).unwrap().hosts.is_empty());
        let mut pins = Pins::default();
        pins.hosts.insert(
            "a".into(),
            Pin {
                public_key: "ab".into(),
                seq: 3,
                hash: "cd".into(),
                pinned_at: 1,
                signed_from: Some(2),
            },
        );
        pins.save(&path).unwrap();
        assert_eq!(Pins::load(&path).unwrap().hosts, pins.hosts);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "{").unwrap();
        assert!(Pins::load(&path).is_err());
    }
}
