//! The audit log's rows in the shared store: one hash chain per host, sealed and verified by
//! the pure code in [`crate::store::audit`] with the host's own key.

use std::path::Path;

use tokio_postgres::{GenericClient, Row};

use crate::{
    model::{AuditEvent, Timestamp},
    store::{
        Result,
        audit::{self, AuditKey, Event, Head, Sealed, Verifier, VerifyReport},
    },
};

const COLUMNS: &str = "seq, at, kind, actor, detail, prev_hash, hash";

/// Serialises appends to one host's chain (two agents wrongly sharing a `host_id` wait for
/// each other here, and the primary key refuses a forked link).
pub async fn lock_chain(db: &impl GenericClient, host: &str) -> Result<()> {
    db.execute(
        "SELECT pg_advisory_xact_lock(hashtext('jitgate.audit'), hashtext($1))",
        &[&host],
    )
    .await?;
    Ok(())
}

/// Appends one record to `host`'s chain; call inside the transaction that makes the change
/// it records, after [`lock_chain`].
pub async fn append(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    actor: &str,
    event: &Event,
) -> Result<Sealed> {
    let head = head(db, host).await?;
    let r = audit::seal(key, head.as_ref(), Timestamp::now(), actor, event)?;
    db.execute(
        "INSERT INTO audit (host_id, seq, at, kind, actor, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&host, &r.seq, &r.at, &r.kind, &r.actor, &r.detail, &r.prev_hash, &r.hash],
    )
    .await?;
    Ok(r)
}

/// Appends a record made earlier (spooled while the store was out of reach), with the time
/// it was made, to `host`'s chain; like [`append`], after [`lock_chain`].
pub async fn append_parts(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    record: &super::spool::AuditRecord,
) -> Result<Sealed> {
    let head = head(db, host).await?;
    let r = audit::seal_parts(
        key,
        head.as_ref(),
        record.at,
        &record.actor,
        &record.kind,
        record.detail.clone(),
    );
    db.execute(
        "INSERT INTO audit (host_id, seq, at, kind, actor, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[&host, &r.seq, &r.at, &r.kind, &r.actor, &r.detail, &r.prev_hash, &r.hash],
    )
    .await?;
    Ok(r)
}

/// The last link of `host`'s chain.
pub async fn head(db: &impl GenericClient, host: &str) -> Result<Option<Head>> {
    Ok(db
        .query_opt(
            "SELECT seq, hash FROM audit WHERE host_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&host],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

fn sealed_of(r: &Row) -> Result<Sealed> {
    Ok(Sealed {
        seq: r.try_get(0)?,
        at: r.try_get(1)?,
        kind: r.try_get(2)?,
        actor: r.try_get(3)?,
        detail: r.try_get(4)?,
        prev_hash: r.try_get(5)?,
        hash: r.try_get(6)?,
    })
}

/// `host`'s records at or after `since`, oldest first: the newest `limit`.
pub async fn list(
    db: &impl GenericClient,
    host: &str,
    since: Option<Timestamp>,
    limit: usize,
) -> Result<Vec<AuditEvent>> {
    let mut events = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM audit WHERE host_id = $1 AND at >= $2 ORDER BY seq DESC LIMIT $3"
            ),
            &[&host, &since.map_or(0, Timestamp::millis), &(limit as i64)],
        )
        .await?
        .iter()
        .map(|r| sealed_of(r).map(|s| s.to_event()))
        .collect::<Result<Vec<_>>>()?;
    events.reverse();
    Ok(events)
}

/// Records (of any host) that mention `session`: a session id is unique fleet-wide.
pub async fn for_session(db: &impl GenericClient, session: &str) -> Result<Vec<AuditEvent>> {
    let pattern = format!("%{}%", audit::session_pattern(session));
    db.query(
        &format!("SELECT {COLUMNS} FROM audit WHERE detail LIKE $1 ORDER BY at, host_id, seq"),
        &[&pattern],
    )
    .await?
    .iter()
    .map(|r| sealed_of(r).map(|s| s.to_event()))
    .collect()
}

/// Walks `host`'s whole chain against the head checkpoint at `head_path` (kept on this host,
/// outside the database: whoever can cut rows off the shared log cannot rewrite it).
pub async fn verify(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    head_path: &Path,
) -> Result<VerifyReport> {
    let rows = db
        .query(
            &format!("SELECT {COLUMNS} FROM audit WHERE host_id = $1 ORDER BY seq ASC"),
            &[&host],
        )
        .await?;
    let mut verifier = Verifier::new(key, read_head(head_path));
    for row in &rows {
        verifier.check(&sealed_of(row)?);
    }
    Ok(verifier.finish())
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
