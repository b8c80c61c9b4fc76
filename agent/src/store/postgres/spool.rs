//! The local spool: records this host makes while the shared store is out of reach (session
//! records, statement records, this host's audit records) are kept here, in a small SQLite
//! file in the state dir, and shipped to the store in order once it is back.
//!
//! Why a file and not memory: a security user wants nothing lost, and an agent restarted (or
//! crashed) during an outage must still ship what its sessions did. SQLite gives atomic,
//! durable appends (`synchronous = FULL`): a crash mid-write leaves the last whole
//! transaction, never half a record.
//!
//! Why a MAC chain: the spool sits on the host, outside the database, and its records become
//! audit records when shipped. Each row carries an HMAC (a key of its own in the state dir,
//! `spool.key`) over the spool's id, its sequence number, the previous row's MAC and its body;
//! the spool's head (last sequence number and MAC) and its base (the last shipped row's) are
//! kept beside them. A row edited, inserted, reordered or deleted, or a file truncated or
//! otherwise damaged, fails the check: the spool is then never shipped (fail closed) and the
//! store counts as unavailable until an operator has looked (see the README).
//!
//! Shipping is exactly once: the store keeps, per host and spool id, the last sequence number
//! shipped, updated in the transaction that writes the records ([`super::writer`]); rows at or
//! below it are skipped, so a crash between that commit and the local delete ships nothing
//! twice.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use hmac::{Hmac, Mac as _};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::{Session, StatementRecord, Timestamp};

/// The spool's file in the state dir.
pub const FILE: &str = "spool.sqlite";

/// The spool's own MAC key in the state dir (apart from the audit key: the spool is a
/// transport, the audit chain the record).
pub const KEY_FILE: &str = "spool.key";

/// What the MAC of "no row before" is.
const GENESIS: &str = "genesis";

/// One audit record as made, waiting to be chained: sealed into this host's chain when it is
/// written to the store, with the time it was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at: i64,
    pub actor: String,
    pub kind: String,
    pub detail: String,
    /// 128 random bits naming this record, stored with it (unique per host): a record written
    /// by a batch whose commit's answer was lost, then spooled and shipped again, is refused
    /// as already stored instead of being chained twice. `None` in records spooled before
    /// records had ids (and if the system had no randomness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl AuditRecord {
    /// `event` by `actor`, made now.
    pub fn now(actor: &str, event: &crate::store::audit::Event) -> serde_json::Result<Self> {
        let mut raw = [0u8; 16];
        let id = getrandom::fill(&mut raw)
            .ok()
            .map(|()| data_encoding::HEXLOWER.encode(&raw));
        Ok(Self {
            at: Timestamp::now().millis(),
            actor: actor.to_owned(),
            kind: event.kind().to_owned(),
            detail: event.detail()?,
            id,
        })
    }
}

/// A fire-and-forget record: what the writer writes at once when it can, and spools when it
/// cannot.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    SessionStart {
        session: Session,
        audit: AuditRecord,
    },
    SessionRefused {
        session: Session,
        audit: AuditRecord,
    },
    SessionEnd {
        session: Session,
        audit: AuditRecord,
    },
    Statements {
        batch: Vec<StatementRecord>,
    },
    Audit {
        audit: AuditRecord,
    },
}

impl Record {
    /// About what it holds in memory while queued (the writer's backlog, see
    /// [`crate::store::health::WriteHealth`]).
    pub fn approx_bytes(&self) -> usize {
        use crate::store::health::{AUDIT_BYTES, session_bytes, statement_bytes};
        match self {
            Self::SessionStart { session: s, .. }
            | Self::SessionRefused { session: s, .. }
            | Self::SessionEnd { session: s, .. } => session_bytes(s),
            Self::Statements { batch } => batch.iter().map(statement_bytes).sum(),
            Self::Audit { .. } => AUDIT_BYTES,
        }
    }

    /// Whether it may use the reserve above `spool_limit`: only what sessions already live
    /// did (their statements and their end). Refusals and other audit records can be
    /// provoked at will from a gated workload; were they let into the reserve, a flood of
    /// them would leave no room for a live session's statements.
    pub const fn uses_reserve(&self) -> bool {
        matches!(self, Self::Statements { .. } | Self::SessionEnd { .. })
    }

    /// Its name in logs.
    pub const fn what(&self) -> &'static str {
        match self {
            Self::SessionStart { .. } => "session.start",
            Self::SessionRefused { .. } => "session.refused",
            Self::SessionEnd { .. } => "session.end",
            Self::Statements { .. } => "statements",
            Self::Audit { .. } => "audit",
        }
    }
}

/// Why the spool could not take or give records.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool holds its limit: the record was not kept.
    #[error(
        "the local spool {path} is full ({used} of spool_limit {limit} bytes): the record was not kept"
    )]
    Full { path: String, used: u64, limit: u64 },
    /// The spool failed its integrity check (or its file is damaged): nothing is shipped from
    /// it.
    #[error(
        "the local spool {path} failed its integrity check: {why}; nothing in it is shipped. Keep the file for investigation, move it aside (with the agent stopped) and start jitgated again"
    )]
    Corrupt { path: String, why: String },
    #[error("the local spool {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the local spool: {0}")]
    Json(#[from] serde_json::Error),
}

pub use crate::store::health::SpoolStats;

/// The spool (one per agent; only the store's writer task appends and ships).
pub struct Spool {
    path: PathBuf,
    key: [u8; 32],
    inner: Mutex<Inner>,
}

struct Inner {
    conn: Option<Connection>,
    id: String,
    head_seq: i64,
    head_mac: String,
    stats: SpoolStats,
}

fn mac(key: &[u8; 32], spool: &str, seq: i64, prev: &str, body: &str) -> String {
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length")
    };
    for field in [
        spool.as_bytes(),
        &seq.to_be_bytes(),
        prev.as_bytes(),
        body.as_bytes(),
    ] {
        m.update(&(field.len() as u64).to_be_bytes());
        m.update(field);
    }
    hex::encode(m.finalize().into_bytes())
}

/// The MAC over the spool's ends: without the key neither end can be moved (records cut off
/// the front or the end with the base or head rewritten to match).
fn ends_mac(
    key: &[u8; 32],
    spool: &str,
    base_seq: i64,
    base_mac: &str,
    head_seq: i64,
    head_mac: &str,
) -> String {
    mac(
        key,
        spool,
        -1,
        &format!("{base_seq}:{base_mac}"),
        &format!("{head_seq}:{head_mac}"),
    )
}

/// The size a row counts for against the limit.
fn row_bytes(body: &str, mac: &str) -> u64 {
    (body.len() + mac.len() + 16) as u64
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS meta (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        spool_id TEXT NOT NULL,
        base_seq INTEGER NOT NULL,
        base_mac TEXT NOT NULL,
        head_seq INTEGER NOT NULL,
        head_mac TEXT NOT NULL,
        ends_mac TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS records (
        seq  INTEGER PRIMARY KEY,
        body TEXT NOT NULL,
        mac  TEXT NOT NULL
    );
";

impl Spool {
    /// Opens (or creates) the spool at `state_dir/spool.sqlite` with `key`, bounded by
    /// `limit` bytes, and checks it whole. A spool that fails the check opens anyway, marked
    /// damaged (see [`SpoolStats::problem`]): the agent starts with its gate closed rather
    /// than not at all, and the file is left as found.
    pub fn open(state_dir: &Path, key: [u8; 32], limit: u64) -> Self {
        let path = state_dir.join(FILE);
        let mut inner = Inner {
            conn: None,
            id: String::new(),
            head_seq: 0,
            head_mac: GENESIS.to_owned(),
            stats: SpoolStats {
                limit,
                ..SpoolStats::default()
            },
        };
        match Self::load(&path, &key, &mut inner) {
            Ok(()) => {}
            Err(e) => {
                let why = match e {
                    SpoolError::Corrupt { why, .. } => why,
                    other => other.to_string(),
                };
                let problem = SpoolError::Corrupt {
                    path: path.display().to_string(),
                    why,
                }
                .to_string();
                tracing::error!(error = %problem, "local spool damaged: the gate stays closed");
                inner.stats.problem = Some(problem);
            }
        }
        Self {
            path,
            key,
            inner: Mutex::new(inner),
        }
    }

    fn sql(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn load(path: &Path, key: &[u8; 32], inner: &mut Inner) -> Result<(), SpoolError> {
        let corrupt = |why: String| SpoolError::Corrupt {
            path: path.display().to_string(),
            why,
        };
        let sql = |e: rusqlite::Error| corrupt(format!("unreadable: {e}"));
        let conn = Connection::open(path).map_err(sql)?;
        // Only root (or the agent's user) may read what sessions did.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let ok: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql)?;
        if ok != "ok" {
            return Err(corrupt(format!("damaged file: {ok}")));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let meta = conn
            .query_row(
                "SELECT spool_id, base_seq, base_mac, head_seq, head_mac, ends_mac FROM meta WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(sql)?;
        let (id, base_seq, base_mac, head_seq, head_mac) = match meta {
            Some((id, base_seq, base_mac, head_seq, head_mac, ends)) => {
                if ends != ends_mac(key, &id, base_seq, &base_mac, head_seq, &head_mac) {
                    return Err(corrupt(
                        "its ends (base and head) do not match their MAC: records were cut off the front or the end".into(),
                    ));
                }
                (id, base_seq, base_mac, head_seq, head_mac)
            }
            None => {
                let rows: i64 = conn
                    .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
                    .map_err(sql)?;
                if rows > 0 {
                    return Err(corrupt(format!(
                        "{rows} records but no head (the head row was deleted)"
                    )));
                }
                let mut raw = [0u8; 16];
                getrandom::fill(&mut raw).map_err(|e| corrupt(format!("no randomness: {e}")))?;
                let id = hex::encode(raw);
                conn.execute(
                    "INSERT INTO meta (id, spool_id, base_seq, base_mac, head_seq, head_mac, ends_mac) VALUES (1, ?1, 0, ?2, 0, ?2, ?3)",
                    params![id, GENESIS, ends_mac(key, &id, 0, GENESIS, 0, GENESIS)],
                )
                .map_err(sql)?;
                (id, 0, GENESIS.to_owned(), 0, GENESIS.to_owned())
            }
        };
        // Walk the whole spool: every row links to the one before, from the base to the head.
        let (mut seq, mut prev, mut bytes, mut records) = (base_seq, base_mac, 0u64, 0u64);
        {
            let mut stmt = conn
                .prepare("SELECT seq, body, mac FROM records ORDER BY seq")
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            while let Some(row) = rows.next().map_err(sql)? {
                let (s, body, m): (i64, String, String) = (
                    row.get(0).map_err(sql)?,
                    row.get(1).map_err(sql)?,
                    row.get(2).map_err(sql)?,
                );
                check_row(key, &id, seq, &prev, s, &body, &m).map_err(corrupt)?;
                serde_json::from_str::<Record>(&body)
                    .map_err(|e| corrupt(format!("record {s} does not parse: {e}")))?;
                seq = s;
                prev = m;
                bytes += row_bytes(&body, &prev);
                records += 1;
            }
        }
        if seq != head_seq || prev != head_mac {
            return Err(corrupt(format!(
                "the records end at {seq} but the head says {head_seq} (records were cut off the end, or the head edited)"
            )));
        }
        inner.conn = Some(conn);
        inner.id = id;
        inner.head_seq = head_seq;
        inner.head_mac = head_mac;
        inner.stats.records = records;
        inner.stats.bytes = bytes;
        Ok(())
    }

    /// Where the spool is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This spool's id (a new one for every new spool file: the store counts shipped records
    /// per spool, so a fresh file never looks already shipped).
    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn stats(&self) -> SpoolStats {
        self.lock().stats.clone()
    }

    /// Whether records wait to be shipped.
    pub fn pending(&self) -> bool {
        self.lock().stats.records > 0
    }

    /// Why the spool cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        self.lock().stats.problem.clone()
    }

    /// Marks the spool unusable (`why` says what to do): nothing more is kept in it or
    /// shipped from it, and the gate stays closed, as for a damaged spool.
    pub fn refuse(&self, why: String) {
        tracing::error!(error = %why, "local spool refused: the gate stays closed");
        self.lock().stats.problem = Some(why);
    }

    /// The last record this spool ever took (its head; 0: none).
    pub fn head_seq(&self) -> i64 {
        self.lock().head_seq
    }

    /// The last record shipped from this spool (its base): with none waiting, every record
    /// it ever held.
    pub fn shipped_through(&self) -> Result<i64, SpoolError> {
        let inner = self.lock();
        let Some(conn) = inner.conn.as_ref() else {
            return Err(SpoolError::Corrupt {
                path: self.path.display().to_string(),
                why: "not open".into(),
            });
        };
        conn.query_row("SELECT base_seq FROM meta WHERE id = 1", [], |r| r.get(0))
            .map_err(|e| self.sql(e))
    }

    /// Counts a record that could not be kept at all.
    pub fn dropped(&self, n: u64) {
        self.lock().stats.dropped += n;
    }

    /// Appends `records` in one transaction. Up to `limit` is taken, and for what live
    /// sessions did ([`Record::uses_reserve`]) a reserve of a quarter more (new sessions are
    /// refused from `limit` on); a record past that is refused with [`SpoolError::Full`], and
    /// so is every record after it in `records` (order is kept: nothing after a gap).
    /// Returns how many were kept.
    pub fn append(&self, records: &[Record]) -> Result<usize, SpoolError> {
        let mut inner = self.lock();
        if let Some(problem) = &inner.stats.problem {
            return Err(SpoolError::Corrupt {
                path: self.path.display().to_string(),
                why: problem.clone(),
            });
        }
        let hard = inner.stats.limit.saturating_add(inner.stats.limit / 4);
        let Inner {
            conn,
            id,
            head_seq,
            head_mac,
            stats,
        } = &mut *inner;
        let Some(conn) = conn.as_mut() else {
            return Err(SpoolError::Corrupt {
                path: self.path.display().to_string(),
                why: "not open".into(),
            });
        };
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let (mut seq, mut prev, mut bytes) = (*head_seq, head_mac.clone(), stats.bytes);
        let mut kept = 0;
        let mut full = None;
        for record in records {
            let body = serde_json::to_string(record)?;
            let m = mac(&self.key, id, seq + 1, &prev, &body);
            let size = row_bytes(&body, &m);
            let bound = if record.uses_reserve() {
                hard
            } else {
                stats.limit
            };
            if bytes.saturating_add(size) > bound {
                full = Some(SpoolError::Full {
                    path: self.path.display().to_string(),
                    used: bytes,
                    limit: stats.limit,
                });
                break;
            }
            seq += 1;
            tx.execute(
                "INSERT INTO records (seq, body, mac) VALUES (?1, ?2, ?3)",
                params![seq, body, m],
            )
            .map_err(|e| self.sql(e))?;
            prev = m;
            bytes += size;
            kept += 1;
        }
        if kept > 0 {
            let (base_seq, base_mac): (i64, String) = tx
                .query_row(
                    "SELECT base_seq, base_mac FROM meta WHERE id = 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(|e| self.sql(e))?;
            tx.execute(
                "UPDATE meta SET head_seq = ?1, head_mac = ?2, ends_mac = ?3 WHERE id = 1",
                params![
                    seq,
                    prev,
                    ends_mac(&self.key, id, base_seq, &base_mac, seq, &prev)
                ],
            )
            .map_err(|e| self.sql(e))?;
            tx.commit().map_err(|e| self.sql(e))?;
            *head_seq = seq;
            *head_mac = prev;
            stats.bytes = bytes;
            stats.records += kept as u64;
        }
        match full {
            Some(e) => Err(e),
            None => Ok(kept),
        }
    }

    /// The oldest `max` records waiting, checked against the chain from the base again (the
    /// file may have been changed since it was opened). A failed check marks the spool
    /// damaged and fails.
    pub fn peek(&self, max: usize) -> Result<Vec<(i64, Record)>, SpoolError> {
        let mut inner = self.lock();
        if let Some(problem) = &inner.stats.problem {
            return Err(SpoolError::Corrupt {
                path: self.path.display().to_string(),
                why: problem.clone(),
            });
        }
        let result = self.read_checked(&inner, max);
        if let Err(e @ SpoolError::Corrupt { .. }) = &result {
            tracing::error!(error = %e, "local spool damaged: nothing in it is shipped, the gate stays closed");
            inner.stats.problem = Some(e.to_string());
        }
        result
    }

    fn read_checked(&self, inner: &Inner, max: usize) -> Result<Vec<(i64, Record)>, SpoolError> {
        let corrupt = |why: String| SpoolError::Corrupt {
            path: self.path.display().to_string(),
            why,
        };
        let Some(conn) = inner.conn.as_ref() else {
            return Err(corrupt("not open".into()));
        };
        let (base_seq, base_mac, head_seq, head_mac, ends): (i64, String, i64, String, String) =
            conn.query_row(
                "SELECT base_seq, base_mac, head_seq, head_mac, ends_mac FROM meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .map_err(|e| corrupt(format!("unreadable head: {e}")))?;
        // The base is read from the file each time (it moves as records are shipped), so it
        // must match its MAC, and the head the one this process wrote.
        if ends
            != ends_mac(
                &self.key, &inner.id, base_seq, &base_mac, head_seq, &head_mac,
            )
            || head_seq != inner.head_seq
            || head_mac != inner.head_mac
        {
            return Err(corrupt(
                "its ends (base and head) were changed behind the agent: records were cut off the front or the end".into(),
            ));
        }
        let mut stmt = conn
            .prepare("SELECT seq, body, mac FROM records ORDER BY seq LIMIT ?1")
            .map_err(|e| corrupt(format!("unreadable: {e}")))?;
        let mut rows = stmt
            .query(params![i64::try_from(max).unwrap_or(i64::MAX)])
            .map_err(|e| corrupt(format!("unreadable: {e}")))?;
        let (mut seq, mut prev) = (base_seq, base_mac);
        let mut out = Vec::new();
        while let Some(row) = rows
            .next()
            .map_err(|e| corrupt(format!("unreadable: {e}")))?
        {
            let (s, body, m): (i64, String, String) = (
                row.get(0).map_err(|e| corrupt(e.to_string()))?,
                row.get(1).map_err(|e| corrupt(e.to_string()))?,
                row.get(2).map_err(|e| corrupt(e.to_string()))?,
            );
            check_row(&self.key, &inner.id, seq, &prev, s, &body, &m).map_err(corrupt)?;
            let record = serde_json::from_str::<Record>(&body)
                .map_err(|e| corrupt(format!("record {s} does not parse: {e}")))?;
            out.push((s, record));
            seq = s;
            prev = m;
        }
        if out.len() < max && seq != inner.head_seq {
            return Err(corrupt(format!(
                "the records end at {seq} but the head says {} (records were cut off the end)",
                inner.head_seq
            )));
        }
        Ok(out)
    }

    /// The records up to `upto` are in the store: removes them, the last one becoming the
    /// base the next links to.
    pub fn shipped(&self, upto: i64) -> Result<(), SpoolError> {
        let mut inner = self.lock();
        let Inner {
            conn,
            stats,
            id,
            head_seq,
            head_mac,
        } = &mut *inner;
        let Some(conn) = conn.as_mut() else {
            return Ok(());
        };
        let tx = conn.transaction().map_err(|e| self.sql(e))?;
        let last: Option<String> = tx
            .query_row(
                "SELECT mac FROM records WHERE seq = ?1",
                params![upto],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let Some(last) = last else {
            return Ok(());
        };
        let (n, bytes): (i64, i64) = tx
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(length(body) + length(mac) + 16), 0) FROM records WHERE seq <= ?1",
                params![upto],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.sql(e))?;
        tx.execute("DELETE FROM records WHERE seq <= ?1", params![upto])
            .map_err(|e| self.sql(e))?;
        tx.execute(
            "UPDATE meta SET base_seq = ?1, base_mac = ?2, ends_mac = ?3 WHERE id = 1",
            params![
                upto,
                last,
                ends_mac(&self.key, id, upto, &last, *head_seq, head_mac)
            ],
        )
        .map_err(|e| self.sql(e))?;
        tx.commit().map_err(|e| self.sql(e))?;
        stats.records = stats.records.saturating_sub(n as u64);
        stats.bytes = stats.bytes.saturating_sub(bytes as u64);
        Ok(())
    }
}

/// Checks that row `seq` with `body` and `mac` follows row `prev_seq` (whose MAC is `prev`).
fn check_row(
    key: &[u8; 32],
    spool: &str,
    prev_seq: i64,
    prev: &str,
    seq: i64,
    body: &str,
    m: &str,
) -> Result<(), String> {
    if seq != prev_seq + 1 {
        return Err(if seq > prev_seq + 1 {
            format!("records {}..{} are missing", prev_seq + 1, seq - 1)
        } else {
            format!("record {seq} is out of order")
        });
    }
    if mac(key, spool, seq, prev, body) != m {
        return Err(format!(
            "record {seq} does not match its MAC (edited, inserted or reordered)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn audit(n: usize) -> Record {
        Record::Audit {
            audit: AuditRecord {
                at: 1,
                actor: "jitgated".into(),
                kind: "gate.detached".into(),
                detail: format!("{{\"n\":{n}}}"),
                id: Some(format!("id-{n}")),
            },
        }
    }

    /// A (small, empty) statement batch: a record that may use the reserve.
    fn statements(_n: usize) -> Record {
        Record::Statements { batch: Vec::new() }
    }

    fn n_of(r: &Record) -> String {
        match r {
            Record::Audit { audit } => audit.detail.clone(),
            other => other.what().to_owned(),
        }
    }

    #[test]
    fn records_survive_a_reopen_and_ship_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), KEY, 1 << 20);
        let id = s.id();
        assert_eq!(s.append(&[audit(1), audit(2)]).unwrap(), 2);
        assert_eq!(s.append(&[audit(3)]).unwrap(), 1);
        drop(s);
        let s = Spool::open(dir.path(), KEY, 1 << 20);
        assert_eq!(s.id(), id, "the same spool");
        assert_eq!(s.stats().records, 3);
        assert!(s.stats().problem.is_none());
        let got = s.peek(2).unwrap();
        assert_eq!(
            got.iter()
                .map(|(seq, r)| (*seq, n_of(r)))
                .collect::<Vec<_>>(),
            [(1, "{\"n\":1}".to_owned()), (2, "{\"n\":2}".to_owned())]
        );
        s.shipped(2).unwrap();
        assert_eq!(s.stats().records, 1);
        // The base moved: what is left still checks, across a reopen too.
        drop(s);
        let s = Spool::open(dir.path(), KEY, 1 << 20);
        let rest = s.peek(10).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].0, 3);
        s.shipped(3).unwrap();
        assert_eq!(
            s.stats(),
            SpoolStats {
                limit: 1 << 20,
                ..SpoolStats::default()
            }
        );
        s.append(&[audit(4)]).unwrap();
        assert_eq!(s.peek(10).unwrap()[0].0, 4, "numbering goes on");
    }

    #[test]
    fn full_spool_refuses_in_order_and_blocks_new_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let one = row_bytes(&serde_json::to_string(&audit(1)).unwrap(), &"0".repeat(64));
        let s = Spool::open(dir.path(), KEY, one * 4);
        assert_eq!(s.append(&[audit(1), audit(2), audit(3)]).unwrap(), 3);
        assert!(!s.stats().blocks_new_sessions());
        assert_eq!(s.append(&[audit(4)]).unwrap(), 1);
        assert!(s.stats().blocks_new_sessions(), "at the limit");
        // Hostile: audit records (refusals a workload can provoke at will) get no reserve.
        assert!(s.append(&[audit(5)]).is_err());
        // What live sessions did does: one more, then nothing, and nothing after a refusal.
        let e = s
            .append(&[statements(5), statements(6), statements(7)])
            .unwrap_err();
        assert!(matches!(e, SpoolError::Full { .. }), "{e}");
        assert!(e.to_string().contains("spool_limit"), "{e}");
        assert_eq!(s.stats().records, 5);
        assert_eq!(
            s.peek(10).unwrap().last().map(|(_, r)| n_of(r)),
            Some("statements".to_owned())
        );
    }

    fn tamper(dir: &Path, sql: &str) {
        let c = Connection::open(dir.join(FILE)).unwrap();
        c.execute_batch(sql).unwrap();
    }

    fn damaged(dir: &Path) -> String {
        let s = Spool::open(dir, KEY, 1 << 20);
        let problem = s.stats().problem.expect("damage found");
        assert!(s.stats().blocks_new_sessions());
        assert!(s.peek(10).is_err(), "a damaged spool never ships");
        assert!(s.append(&[audit(9)]).is_err());
        problem
    }

    fn filled(dir: &Path) {
        let s = Spool::open(dir, KEY, 1 << 20);
        s.append(&[audit(1), audit(2), audit(3)]).unwrap();
    }

    #[test]
    fn hostile_edits_insertions_deletions_and_truncation_are_found() {
        for (what, sql) in [
            (
                "edited",
                "UPDATE records SET body = replace(body, 'gate.detached', 'gate.attached') WHERE seq = 2",
            ),
            ("deleted", "DELETE FROM records WHERE seq = 2"),
            ("cut off the end", "DELETE FROM records WHERE seq = 3"),
            (
                "inserted",
                "INSERT INTO records (seq, body, mac) VALUES (4, '{\"record\":\"audit\"}', 'ab')",
            ),
            ("head gone", "DELETE FROM meta"),
            (
                "cut off the end, head moved back",
                "DELETE FROM records WHERE seq = 3; UPDATE meta SET head_seq = 2, head_mac = (SELECT mac FROM records WHERE seq = 2)",
            ),
            (
                "cut off the front, base moved up",
                "UPDATE meta SET base_seq = 1, base_mac = (SELECT mac FROM records WHERE seq = 1); DELETE FROM records WHERE seq = 1",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            filled(dir.path());
            tamper(dir.path(), sql);
            let problem = damaged(dir.path());
            assert!(problem.contains("integrity check"), "{what}: {problem}");
        }
        // A MAC made with another key (someone without the spool key forging a record).
        let dir = tempfile::tempdir().unwrap();
        filled(dir.path());
        let s = Spool::open(dir.path(), [8; 32], 1 << 20);
        assert!(s.stats().problem.is_some(), "wrong key");
        // The file truncated mid-way (a crash cannot do this: SQLite's journal; an attacker or
        // a broken disk can).
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), KEY, 1 << 20);
            let big: Vec<Record> = (0..200).map(audit).collect();
            s.append(&big).unwrap();
        }
        let c = Connection::open(dir.path().join(FILE)).unwrap();
        c.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
        drop(c);
        let file = dir.path().join(FILE);
        let len = std::fs::metadata(&file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        damaged(dir.path());
        // Garbage instead of a database.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"not a spool at all, just bytes").unwrap();
        damaged(dir.path());
    }

    #[test]
    fn tampering_after_open_is_found_before_shipping() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), KEY, 1 << 20);
        s.append(&[audit(1), audit(2)]).unwrap();
        tamper(
            dir.path(),
            "UPDATE records SET body = replace(body, 'jitgated', 'mallory') WHERE seq = 1",
        );
        let e = s.peek(10).unwrap_err();
        assert!(matches!(e, SpoolError::Corrupt { .. }), "{e}");
        assert!(s.stats().problem.is_some());
        assert!(s.peek(10).is_err(), "stays damaged");
    }
}
