//! The append-only audit log's hash chain, independent of where the records are kept.
//!
//! Each record's hash is an HMAC-SHA256, keyed with `audit.key` in the state directory (root
//! only), over its own fields and the previous record's hash. Editing a record breaks its hash;
//! deleting one breaks the next record's link and leaves a gap in the sequence; recomputing
//! the chain needs the key. Cutting records off the end is caught by a head checkpoint the
//! backend keeps outside the log (the SQLite store's `audit.head` file).
//!
//! Everything here is pure: a backend hands in the key, the last link and the records, so the
//! same code seals and verifies the SQLite log, the in-memory one, and any other.

mod event;
pub mod fleet;
pub mod sign;

use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path, sync::Arc};

use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub use self::event::*;
use crate::model::{AuditEvent, Timestamp};

const KEY_FILE: &str = "audit.key";

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The secret the chain's HMACs are keyed with. Passed to whoever seals or verifies records,
/// never kept in a global, so two stores (or a test beside the agent) cannot mix keys.
///
/// Fleet mode also signs each record with the host's Ed25519 key ([`sign::AuditSigner`]), so
/// other hosts can check the chain (`audit verify --fleet`); the signer travels with the HMAC
/// key so every path that seals a record has it without new plumbing.
#[derive(Clone)]
pub struct AuditKey {
    mac: [u8; 32],
    signer: Option<Arc<sign::AuditSigner>>,
}

impl AuditKey {
    pub const fn new(bytes: [u8; 32]) -> Self {
        Self {
            mac: bytes,
            signer: None,
        }
    }

    /// The same key, with records also signed by `signer`.
    pub fn with_signer(self, signer: sign::AuditSigner) -> Self {
        Self {
            signer: Some(Arc::new(signer)),
            ..self
        }
    }

    /// The host's signing key, when records are signed (fleet mode).
    pub fn signer(&self) -> Option<&sign::AuditSigner> {
        self.signer.as_deref()
    }

    /// Reads the audit key from `state_dir`, creating a random one (mode 0600) on first start.
    pub fn load_or_create(state_dir: &Path) -> anyhow::Result<Self> {
        secret_key(state_dir, KEY_FILE).map(Self::new)
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

/// Reads a 32-byte secret from `state_dir/name`, creating a random one (mode 0600) on first
/// start.
pub fn secret_key(state_dir: &Path, name: &str) -> anyhow::Result<[u8; 32]> {
    use anyhow::Context as _;
    let path = state_dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            Ok(key)
        }
        Ok(_) => anyhow::bail!(
            "{} is damaged (expected 32 bytes); restore it from backup (the audit chain and masking pseudonyms depend on it)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(&key)?;
            file.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The end of the chain: the last record's sequence number and hash.
pub type Head = (i64, String);

/// One record as stored: the fields the HMAC covers, the detail exactly as hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    pub actor: String,
    /// The detail JSON text, byte for byte as hashed.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

impl Sealed {
    /// The record as the control API shows it (detail parsed; kept as text if it is not JSON).
    pub fn to_event(&self) -> AuditEvent {
        AuditEvent {
            seq: self.seq,
            at: Timestamp(self.at),
            kind: self.kind.clone(),
            actor: self.actor.clone(),
            detail: serde_json::from_str(&self.detail)
                .unwrap_or_else(|_| serde_json::Value::String(self.detail.clone())),
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
        }
    }

    /// Whether the record's detail names `session` (start, end, refusals, held statements).
    pub fn mentions_session(&self, session: &str) -> bool {
        self.detail.contains(&session_pattern(session))
    }
}

/// The text a record's detail contains when it names `session`. The SQLite backend searches
/// with it under `LIKE`, so the characters `LIKE` treats specially are dropped.
pub fn session_pattern(session: &str) -> String {
    format!("\"session\":\"{}\"", session.replace(['%', '_'], ""))
}

fn mac(
    key: &AuditKey,
    prev_hash: &str,
    seq: i64,
    at: i64,
    kind: &str,
    actor: &str,
    detail: &str,
) -> String {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(&key.mac) else {
        unreachable!("HMAC takes a key of any length")
    };
    for field in [
        prev_hash.as_bytes(),
        &seq.to_be_bytes(),
        &at.to_be_bytes(),
        kind.as_bytes(),
        actor.as_bytes(),
        detail.as_bytes(),
    ] {
        // Length-prefix every field so no two records hash the same bytes.
        m.update(&(field.len() as u64).to_be_bytes());
        m.update(field);
    }
    hex::encode(m.finalize().into_bytes())
}

/// Seals `event` by `actor` as the record after `head` (the first one when `None`), at `at`.
pub fn seal(
    key: &AuditKey,
    head: Option<&Head>,
    at: Timestamp,
    actor: &str,
    event: &Event,
) -> serde_json::Result<Sealed> {
    let (prev_seq, prev_hash) = head.map_or((0, GENESIS), |(s, h)| (*s, h.as_str()));
    let seq = prev_seq + 1;
    let kind = event.kind();
    let detail = event.detail()?;
    let hash = mac(key, prev_hash, seq, at.millis(), kind, actor, &detail);
    Ok(Sealed {
        seq,
        at: at.millis(),
        kind: kind.to_owned(),
        actor: actor.to_owned(),
        detail,
        prev_hash: prev_hash.to_owned(),
        hash,
    })
}

/// Seals a record already reduced to its `kind` and `detail` (one made while the shared
/// store was out of reach and spooled): the record after `head`, made at `at` (ms).
pub fn seal_parts(
    key: &AuditKey,
    head: Option<&Head>,
    at: i64,
    actor: &str,
    kind: &str,
    detail: String,
) -> Sealed {
    let (prev_seq, prev_hash) = head.map_or((0, GENESIS), |(s, h)| (*s, h.as_str()));
    let seq = prev_seq + 1;
    let hash = mac(key, prev_hash, seq, at, kind, actor, &detail);
    Sealed {
        seq,
        at,
        kind: kind.to_owned(),
        actor: actor.to_owned(),
        detail,
        prev_hash: prev_hash.to_owned(),
        hash,
    }
}

/// What `jitgate audit verify` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    pub records: u64,
    /// No tampering found and no records lost.
    pub ok: bool,
    /// Signs of tampering.
    pub problems: Vec<String>,
    /// Records this host made but lost before they reached the log (fleet mode: a local
    /// spool replaced before it was shipped, `spool.lost`), each with what to do. The chain
    /// itself may be intact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<String>,
}

/// The kind of the record a host writes when it finds its unshipped spool gone.
pub const SPOOL_LOST: &str = "spool.lost";

/// What `audit verify` says of a `spool.lost` record `seq` with `detail` (its JSON).
pub fn spool_lost_note(seq: i64, detail: &str) -> String {
    let d: serde_json::Value = serde_json::from_str(detail).unwrap_or_default();
    let text = |k: &str| {
        d.get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_owned()
    };
    let shipped = d
        .get("shipped_through")
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0);
    format!(
        "record {seq} (spool.lost): the host came back to the shared store with a new local spool ({}) while its spool {} had not been retired: whatever that spool held after its record {shipped} (the last the store has) was never shipped and is LOST. Find out why the spool went (its file deleted or replaced, its key deleted); if the old spool.sqlite was kept, keep it for investigation; account for what the host did meanwhile from its other logs. To replace a spool on purpose, retire it first: `jitgated --retire-spool` (README, \"Fleet deployment\")",
        text("replaced_by"),
        text("spool"),
    )
}

/// Walks a chain record by record, in sequence order. Every problem is reported, not just the
/// first.
pub struct Verifier<'k> {
    key: &'k AuditKey,
    checkpoint: Option<Head>,
    /// The stored hash of the record the checkpoint names, once seen.
    at_checkpoint: Option<String>,
    problems: Vec<String>,
    lost: Vec<String>,
    expected_seq: i64,
    prev_hash: String,
    records: u64,
}

impl<'k> Verifier<'k> {
    /// `checkpoint` is the head the backend recorded outside the log, if any.
    pub fn new(key: &'k AuditKey, checkpoint: Option<Head>) -> Self {
        Self {
            key,
            checkpoint,
            at_checkpoint: None,
            problems: Vec::new(),
            lost: Vec::new(),
            expected_seq: 1,
            prev_hash: GENESIS.to_owned(),
            records: 0,
        }
    }

    pub fn check(&mut self, record: &Sealed) {
        self.records += 1;
        if record.kind == SPOOL_LOST {
            self.lost.push(spool_lost_note(record.seq, &record.detail));
        }
        if record.seq != self.expected_seq {
            self.problems.push(if record.seq > self.expected_seq {
                format!(
                    "records {}..{} are missing (deleted)",
                    self.expected_seq,
                    record.seq - 1
                )
            } else {
                format!("record {} is out of order", record.seq)
            });
        }
        if record.prev_hash != self.prev_hash {
            self.problems.push(format!(
                "record {} does not link to the record before it (a record was deleted, inserted or reordered)",
                record.seq
            ));
        }
        let recomputed = mac(
            self.key,
            &record.prev_hash,
            record.seq,
            record.at,
            &record.kind,
            &record.actor,
            &record.detail,
        );
        if recomputed != record.hash {
            self.problems.push(format!(
                "record {} ({}) does not match its hash: it was edited",
                record.seq, record.kind
            ));
        }
        if self
            .checkpoint
            .as_ref()
            .is_some_and(|(s, _)| *s == record.seq)
        {
            self.at_checkpoint = Some(record.hash.clone());
        }
        self.prev_hash.clone_from(&record.hash);
        self.expected_seq = record.seq + 1;
    }

    pub fn finish(mut self) -> VerifyReport {
        if let Some((head_seq, head_hash)) = &self.checkpoint {
            let last = self.expected_seq - 1;
            if *head_seq > last {
                self.problems.push(format!(
                    "records {}..{head_seq} are missing from the end (the head checkpoint says {head_seq} records were written)",
                    last + 1
                ));
            } else if self.at_checkpoint.as_ref().is_some_and(|h| h != head_hash) {
                self.problems.push(format!(
                    "record {head_seq} differs from the head checkpoint: the chain was rewritten"
                ));
            }
        }
        VerifyReport {
            records: self.records,
            ok: self.problems.is_empty() && self.lost.is_empty(),
            problems: self.problems,
            lost: self.lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(key: &AuditKey, n: usize) -> Vec<Sealed> {
        let mut out: Vec<Sealed> = Vec::new();
        for i in 0..n {
            let head = out.last().map(|r| (r.seq, r.hash.clone()));
            out.push(
                seal(
                    key,
                    head.as_ref(),
                    Timestamp(1_000 + i as i64),
                    "jitgated",
                    &Event::GrantExpired(GrantExpired {
                        grant: format!("g{i}"),
                    }),
                )
                .unwrap(),
            );
        }
        out
    }

    fn verify(key: &AuditKey, records: &[Sealed], checkpoint: Option<Head>) -> VerifyReport {
        let mut v = Verifier::new(key, checkpoint);
        records.iter().for_each(|r| v.check(r));
        v.finish()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let key = AuditKey::new([7; 32]);
        let records = chain(&key, 5);
        let head = records.last().map(|r| (r.seq, r.hash.clone()));
        let report = verify(&key, &records, head);
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.records, 5);
    }

    #[test]
    fn edits_deletions_and_truncation_are_found() {
        let key = AuditKey::new([7; 32]);
        let mut records = chain(&key, 6);
        let head = records.last().map(|r| (r.seq, r.hash.clone()));
        records[1].detail = "{\"n\":99}".into();
        let report = verify(&key, &records, head.clone());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("record 2") && p.contains("edited"))
        );
        records.remove(3);
        let report = verify(&key, &records, head.clone());
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("4..4 are missing"))
        );
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("record 5 does not link"))
        );
        records.pop();
        let report = verify(&key, &records, head);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("6..6 are missing from the end"))
        );
    }

    #[test]
    fn another_key_fails_and_a_rewritten_head_is_found() {
        let key = AuditKey::new([7; 32]);
        let records = chain(&key, 3);
        assert!(!verify(&AuditKey::new([8; 32]), &records, None).ok);
        let report = verify(&key, &records, Some((2, "ff".into())));
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("record 2 differs from the head checkpoint"))
        );
    }

    #[test]
    fn the_hash_is_stable() {
        // The HMAC input layout is part of the on-disk format: old logs must keep verifying.
        let key = AuditKey::new([1; 32]);
        let r = seal(
            &key,
            None,
            Timestamp(1_795_000_000_123),
            "jitgated",
            &Event::DaemonStopped(DaemonStopped {}),
        )
        .unwrap();
        assert_eq!(r.detail, "{}");
        assert_eq!(r.prev_hash, GENESIS);
        // Computed independently (Python's hmac over the same length-prefixed fields).
        assert_eq!(
            r.hash,
            "df2540b2598a1fce887d2b17c0d68001bef6ff865ffa77314d08d50960f8c55a"
        );
    }
}
