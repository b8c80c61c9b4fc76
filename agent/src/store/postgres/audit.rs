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
    insert(db, host, key, r, None).await
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
    insert(db, host, key, r, record.id.as_deref()).await
}

/// Writes a sealed record, signed with the host's public key too (store/audit/sign.rs) so
/// other hosts can verify it (`audit verify --fleet`), whether made now or shipped from the
/// spool. `record_id`: a fire-and-forget record's id, which the store refuses twice (a unique
/// violation, which shipping takes as "stored already").
async fn insert(
    db: &impl GenericClient,
    host: &str,
    key: &AuditKey,
    r: Sealed,
    record_id: Option<&str>,
) -> Result<Sealed> {
    let sig = key.signer().map(|s| {
        if let Err(e) = s.note_signed(r.seq) {
            tracing::error!(error = %e, "cannot remember this host's first signed audit record (state_dir/audit-sign.from): a stripped registration could then claim a later start");
        }
        s.sign_record(host, &r)
    });
    db.execute(
        "INSERT INTO audit (host_id, seq, at, kind, actor, detail, prev_hash, hash, sig, record_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[&host, &r.seq, &r.at, &r.kind, &r.actor, &r.detail, &r.prev_hash, &r.hash, &sig, &record_id],
    )
    .await?;
    if let Some(signer) = key.signer() {
        register(db, host, signer, r.seq).await?;
    }
    Ok(r)
}

/// Publishes this host's public key, signing from `seq` on, unless that key is already
/// published (one indexed read per record). A missing or different row (first signed record,
/// this host re-keyed, or someone removed or replaced it) is written again; `signed_from` is
/// then the first of this host's records that its key signed, so a removed registration
/// cannot come back with a later start that leaves older signed records unchecked.
async fn register(
    db: &impl GenericClient,
    host: &str,
    signer: &audit::sign::AuditSigner,
    seq: i64,
) -> Result<()> {
    let key = signer.public_key_hex();
    let published: Option<String> = db
        .query_opt(
            "SELECT public_key FROM audit_hosts WHERE host_id = $1",
            &[&host],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    if published.as_deref() == Some(key.as_str()) {
        return Ok(());
    }
    // What the host remembers signing first bounds the start from below, whatever the
    // store's rows say now (their signatures may have been stripped).
    let mut signed_from = signer.first_signed().map_or(seq, |first| first.min(seq));
    for row in db
        .query(
            &format!("SELECT {COLUMNS}, sig FROM audit WHERE host_id = $1 AND sig IS NOT NULL AND seq < $2 ORDER BY seq"),
            &[&host, &seq],
        )
        .await?
    {
        let sig: String = row.try_get(7)?;
        let record = sealed_of(&row)?;
        if audit::sign::verify_record(&key, host, &record, &sig) {
            signed_from = signed_from.min(record.seq);
            break;
        }
    }
    db.execute(
        "INSERT INTO audit_hosts (host_id, public_key, signed_from, sig, registered_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (host_id) DO UPDATE SET public_key = EXCLUDED.public_key, signed_from = EXCLUDED.signed_from,
             sig = EXCLUDED.sig, registered_at = EXCLUDED.registered_at",
        &[&host, &key, &signed_from, &signer.sign_registration(host, signed_from), &Timestamp::now().millis()],
    )
    .await?;
    if let Some(old) = published {
        tracing::warn!(host, old = %audit::sign::fingerprint(&old), new = %audit::sign::fingerprint(&key), "the shared store had another audit signing key for this host; published this host's own (other hosts' `audit verify --fleet` will report the change)");
    } else {
        tracing::info!(host, signed_from, key = %audit::sign::fingerprint(&key), "published this host's audit signing key");
    }
    Ok(())
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
