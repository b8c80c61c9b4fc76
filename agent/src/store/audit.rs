//! The append-only audit log, hash-chained so that `jitgate audit verify` finds an edited,
//! deleted or reordered record.
//!
//! Each record's hash is an HMAC-SHA256, keyed with `audit.key` in the state directory (root
//! only), over its own fields and the previous record's hash. Editing a record breaks its hash;
//! deleting one breaks the next record's link and leaves a gap in the sequence; recomputing
//! the chain needs the key. Cutting records off the end is caught by the head checkpoint
//! (`audit.head`) the store rewrites after each commit.

use std::{cell::RefCell, io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use hmac::{Hmac, Mac as _};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{Result, StoreError};
use crate::model::{AuditEvent, Timestamp};

pub const HEAD_FILE: &str = "audit.head";
const KEY_FILE: &str = "audit.key";
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

thread_local! {
    static KEY: RefCell<Option<[u8; 32]>> = const { RefCell::new(None) };
}

/// Reads the audit key, creating a random one (mode 0600) on first start.
pub fn load_or_create_key(state_dir: &Path) -> anyhow::Result<[u8; 32]> {
    secret_key(state_dir, KEY_FILE)
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

/// Makes `key` the audit key of the current (store) thread.
pub fn install_key(key: [u8; 32]) {
    KEY.with(|k| *k.borrow_mut() = Some(key));
}

fn mac(
    prev_hash: &str,
    seq: i64,
    at: i64,
    kind: &str,
    actor: &str,
    detail: &str,
) -> Result<String> {
    KEY.with(|k| {
        let key = k
            .borrow()
            .ok_or_else(|| StoreError::Invalid("audit key not loaded on this thread".into()))?;
        let mut m = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
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
        Ok(hex::encode(m.finalize().into_bytes()))
    })
}

/// Appends one event; call inside the transaction that makes the change it records.
pub fn append(db: &Connection, kind: &str, actor: &str, detail: &serde_json::Value) -> Result<i64> {
    let (prev_seq, prev_hash) = head(db)?.unwrap_or((0, GENESIS.to_owned()));
    let seq = prev_seq + 1;
    let at = Timestamp::now().millis();
    let detail = serde_json::to_string(detail)?;
    let hash = mac(&prev_hash, seq, at, kind, actor, &detail)?;
    db.execute(
        "INSERT INTO audit (seq, at, kind, actor, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![seq, at, kind, actor, detail, prev_hash, hash],
    )?;
    Ok(seq)
}

/// The last record's sequence number and hash.
pub fn head(db: &Connection) -> Result<Option<(i64, String)>> {
    Ok(db
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub fn write_head(path: &Path, head: &(i64, String)) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", head.0, head.1))?;
    std::fs::rename(tmp, path)
}

fn read_head(path: &Path) -> Option<(i64, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (seq, hash) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, hash.to_owned()))
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<(AuditEvent, String)> {
    let detail: String = r.get(4)?;
    Ok((
        AuditEvent {
            seq: r.get(0)?,
            at: Timestamp(r.get(1)?),
            kind: r.get(2)?,
            actor: r.get(3)?,
            detail: serde_json::from_str(&detail)
                .unwrap_or(serde_json::Value::String(detail.clone())),
            prev_hash: r.get(5)?,
            hash: r.get(6)?,
        },
        detail,
    ))
}

/// Events at or after `since`, oldest first, at most `limit`.
pub fn list(db: &Connection, since: Option<Timestamp>, limit: usize) -> Result<Vec<AuditEvent>> {
    let mut stmt = db.prepare(
        "SELECT seq, at, kind, actor, detail, prev_hash, hash FROM audit WHERE at >= ?1
         ORDER BY seq DESC LIMIT ?2",
    )?;
    let mut events = stmt
        .query_map(
            params![since.map_or(0, Timestamp::millis), limit as i64],
            row_to_event,
        )?
        .map(|r| r.map(|(e, _)| e))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    events.reverse();
    Ok(events)
}

/// Events that mention `session` (start, end, refusals, held statements).
pub fn for_session(db: &Connection, session: &str) -> Result<Vec<AuditEvent>> {
    let pattern = format!("%\"session\":\"{}\"%", session.replace(['%', '_'], ""));
    let mut stmt = db.prepare(
        "SELECT seq, at, kind, actor, detail, prev_hash, hash FROM audit WHERE detail LIKE ?1 ORDER BY seq",
    )?;
    let events = stmt
        .query_map([pattern], row_to_event)?
        .map(|r| r.map(|(e, _)| e))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(events)
}

/// What `jitgate audit verify` reports.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    pub records: u64,
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Walks the whole chain. Every problem is reported, not just the first.
pub fn verify(db: &Connection, head_path: &Path) -> Result<VerifyReport> {
    let mut stmt = db.prepare(
        "SELECT seq, at, kind, actor, detail, prev_hash, hash FROM audit ORDER BY seq ASC",
    )?;
    let mut rows = stmt.query([])?;
    let mut problems = Vec::new();
    let mut expected_seq = 1i64;
    let mut prev_hash = GENESIS.to_owned();
    let mut records = 0u64;
    while let Some(row) = rows.next()? {
        let (event, detail) = row_to_event(row)?;
        records += 1;
        if event.seq != expected_seq {
            problems.push(if event.seq > expected_seq {
                format!(
                    "records {expected_seq}..{} are missing (deleted)",
                    event.seq - 1
                )
            } else {
                format!("record {} is out of order", event.seq)
            });
        }
        if event.prev_hash != prev_hash {
            problems.push(format!(
                "record {} does not link to the record before it (a record was deleted, inserted or reordered)",
                event.seq
            ));
        }
        let recomputed = mac(
            &event.prev_hash,
            event.seq,
            event.at.millis(),
            &event.kind,
            &event.actor,
            &detail,
        )?;
        if recomputed != event.hash {
            problems.push(format!(
                "record {} ({}) does not match its hash: it was edited",
                event.seq, event.kind
            ));
        }
        prev_hash = event.hash;
        expected_seq = event.seq + 1;
    }
    if let Some((head_seq, head_hash)) = read_head(head_path) {
        let last = expected_seq - 1;
        if head_seq > last {
            problems.push(format!(
                "records {}..{head_seq} are missing from the end (the head checkpoint says {head_seq} records were written)",
                last + 1
            ));
        } else if let Some(hash) = db
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [head_seq], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            && hash != head_hash
        {
            problems.push(format!(
                "record {head_seq} differs from the head checkpoint: the chain was rewritten"
            ));
        }
    }
    Ok(VerifyReport {
        records,
        ok: problems.is_empty(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn db() -> (Connection, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        install_key(load_or_create_key(dir.path()).unwrap());
        (conn, dir)
    }

    fn sync_head(conn: &Connection, dir: &Path) {
        write_head(&dir.join(HEAD_FILE), &head(conn).unwrap().unwrap()).unwrap();
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let (conn, dir) = db();
        for i in 0..5 {
            append(&conn, "grant.issued", "user alice", &json!({"n": i})).unwrap();
        }
        sync_head(&conn, dir.path());
        let report = verify(&conn, &dir.path().join(HEAD_FILE)).unwrap();
        assert!(report.ok, "{:?}", report.problems);
        assert_eq!(report.records, 5);
    }

    #[test]
    fn edits_deletions_and_truncation_are_found() {
        let (conn, dir) = db();
        for i in 0..6 {
            append(&conn, "session.end", "jitgated", &json!({"n": i})).unwrap();
        }
        sync_head(&conn, dir.path());
        let head_path = dir.path().join(HEAD_FILE);

        conn.execute("UPDATE audit SET detail = '{\"n\":99}' WHERE seq = 2", [])
            .unwrap();
        let report = verify(&conn, &head_path).unwrap();
        assert!(!report.ok);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("record 2") && p.contains("edited"))
        );

        conn.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
        let report = verify(&conn, &head_path).unwrap();
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

        conn.execute("DELETE FROM audit WHERE seq = 6", []).unwrap();
        let report = verify(&conn, &head_path).unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("6..6 are missing from the end"))
        );
    }

    #[test]
    fn a_rehashed_chain_without_the_key_fails() {
        let (conn, dir) = db();
        append(&conn, "a", "x", &json!({})).unwrap();
        sync_head(&conn, dir.path());
        // A forger recomputes with plain SHA-256 (no key): still caught.
        conn.execute(
            "UPDATE audit SET actor = 'y', hash = 'ff' WHERE seq = 1",
            [],
        )
        .unwrap();
        let report = verify(&conn, &dir.path().join(HEAD_FILE)).unwrap();
        assert!(!report.ok);
    }
}
