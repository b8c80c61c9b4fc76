//! The audit log's rows: sealed by [`crate::store::audit`], stored and read here.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension as _, params};

use crate::{
    model::{AuditEvent, Timestamp},
    store::{
        Result,
        audit::{self, AuditKey, Event, Head, Sealed, Verifier, VerifyReport},
    },
};

/// Appends one record; call inside the transaction that makes the change it records.
pub fn append(db: &Connection, key: &AuditKey, actor: &str, event: &Event) -> Result<Sealed> {
    let head = head(db)?;
    let r = audit::seal(key, head.as_ref(), Timestamp::now(), actor, event)?;
    db.execute(
        "INSERT INTO audit (seq, at, kind, actor, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![r.seq, r.at, r.kind, r.actor, r.detail, r.prev_hash, r.hash],
    )?;
    Ok(r)
}

/// The last record's sequence number and hash.
pub fn head(db: &Connection) -> Result<Option<Head>> {
    Ok(db
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

pub fn write_head(path: &Path, head: &Head) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{} {}\n", head.0, head.1))?;
    std::fs::rename(tmp, path)
}

fn read_head(path: &Path) -> Option<Head> {
    let text = std::fs::read_to_string(path).ok()?;
    let (seq, hash) = text.trim().split_once(' ')?;
    Some((seq.parse().ok()?, hash.to_owned()))
}

const COLUMNS: &str = "seq, at, kind, actor, detail, prev_hash, hash";

fn sealed_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sealed> {
    Ok(Sealed {
        seq: r.get(0)?,
        at: r.get(1)?,
        kind: r.get(2)?,
        actor: r.get(3)?,
        detail: r.get(4)?,
        prev_hash: r.get(5)?,
        hash: r.get(6)?,
    })
}

/// Records at or after `since`, oldest first: the newest `limit`.
pub fn list(db: &Connection, since: Option<Timestamp>, limit: usize) -> Result<Vec<AuditEvent>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {COLUMNS} FROM audit WHERE at >= ?1 ORDER BY seq DESC LIMIT ?2"
    ))?;
    let mut events = stmt
        .query_map(
            params![since.map_or(0, Timestamp::millis), limit as i64],
            sealed_of,
        )?
        .map(|r| r.map(|s| s.to_event()))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    events.reverse();
    Ok(events)
}

/// Records that mention `session` (start, end, refusals, held statements).
pub fn for_session(db: &Connection, session: &str) -> Result<Vec<AuditEvent>> {
    let pattern = format!("%{}%", audit::session_pattern(session));
    let mut stmt = db.prepare(&format!(
        "SELECT {COLUMNS} FROM audit WHERE detail LIKE ?1 ORDER BY seq"
    ))?;
    let events = stmt
        .query_map([pattern], sealed_of)?
        .map(|r| r.map(|s| s.to_event()))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(events)
}

/// Walks the whole chain against the head checkpoint at `head_path`.
pub fn verify(db: &Connection, key: &AuditKey, head_path: &Path) -> Result<VerifyReport> {
    let mut stmt = db.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq ASC"))?;
    let mut rows = stmt.query([])?;
    let mut verifier = Verifier::new(key, read_head(head_path));
    while let Some(row) = rows.next()? {
        verifier.check(&sealed_of(row)?);
    }
    Ok(verifier.finish())
}
