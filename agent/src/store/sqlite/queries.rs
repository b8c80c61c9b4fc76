//! Rows in and out of the state store. Plain functions over a connection, so that one store
//! method composes several in one transaction.

use std::{str::FromStr as _, time::Duration};

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::{
    config::Access,
    grants::scope::HostScope,
    model::{Actor, Grant, Request, RequestStatus, Session, SessionOutcome, Task, Timestamp},
    store::{RequestKey, Result},
};

fn access_of(s: &str) -> rusqlite::Result<Access> {
    Access::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn actor_of(s: &str) -> rusqlite::Result<Actor> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Plain records (no maps with non-string keys) always serialize.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("a plain record serializes")
}

// ---------------------------------------------------------------------------------------------
// Requests

const REQUEST_COLUMNS: &str = "id, identity, resource, access, ttl_secs, reason, task_id, requested_by, created_at, status, policy, decided_by, decided_at, decision_reason, grant_id, statement, session_id, approvals, needs, host, hosts";

fn request_of(r: &Row<'_>) -> rusqlite::Result<Request> {
    let decided_by: Option<String> = r.get(11)?;
    Ok(Request {
        id: r.get(0)?,
        identity: r.get(1)?,
        resource: r.get(2)?,
        access: access_of(&r.get::<_, String>(3)?)?,
        ttl: Duration::from_secs(r.get::<_, i64>(4)?.max(0) as u64),
        reason: r.get(5)?,
        task: r.get(6)?,
        requested_by: actor_of(&r.get::<_, String>(7)?)?,
        created_at: Timestamp(r.get(8)?),
        status: RequestStatus::parse(&r.get::<_, String>(9)?).unwrap_or(RequestStatus::Expired),
        policy: r.get(10)?,
        decided_by: decided_by.as_deref().map(actor_of).transpose()?,
        decided_at: r.get::<_, Option<i64>>(12)?.map(Timestamp),
        decision_reason: r.get(13)?,
        grant: r.get(14)?,
        statement: r.get(15)?,
        session: r.get(16)?,
        approvals: match r.get::<_, Option<String>>(17)? {
            None => Vec::new(),
            Some(text) => serde_json::from_str(&text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    17,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
        },
        needs: match r.get::<_, Option<String>>(18)? {
            None => None,
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    18,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?),
        },
        host: r.get(19)?,
        hosts: r
            .get::<_, Option<String>>(20)?
            .map(|t| HostScope::from_text(&t)),
    })
}

pub fn insert_request(db: &Connection, q: &Request) -> Result<()> {
    db.execute(
        &format!("INSERT INTO requests ({REQUEST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)"),
        params![
            q.id,
            q.identity,
            q.resource,
            q.access.as_str(),
            q.ttl.as_secs() as i64,
            q.reason,
            q.task,
            json(&q.requested_by),
            q.created_at.millis(),
            q.status.as_str(),
            q.policy,
            q.decided_by.as_ref().map(json::<Actor>),
            q.decided_at.map(Timestamp::millis),
            q.decision_reason,
            q.grant,
            q.statement,
            q.session,
            (!q.approvals.is_empty()).then(|| json(&q.approvals)),
            q.needs.as_ref().map(json::<crate::model::Needs>),
            q.host,
            q.hosts.as_ref().map(HostScope::to_text),
        ],
    )?;
    Ok(())
}

/// Replaces a pending request's approvals; `false` if it is no longer pending.
pub fn set_approvals(
    db: &Connection,
    id: &str,
    approvals: &[crate::model::Approval],
) -> Result<bool> {
    let changed = db.execute(
        "UPDATE requests SET approvals = ?2 WHERE id = ?1 AND status = 'pending'",
        params![id, json(&approvals)],
    )?;
    Ok(changed == 1)
}

pub fn get_request(db: &Connection, id: &str) -> Result<Option<Request>> {
    Ok(db
        .query_row(
            &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?1"),
            [id],
            request_of,
        )
        .optional()?)
}

/// Requests with `status`, newest first (all statuses when `None`).
pub fn list_requests(
    db: &Connection,
    status: Option<RequestStatus>,
    limit: usize,
) -> Result<Vec<Request>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE (?1 IS NULL OR status = ?1) ORDER BY created_at DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(
        params![status.map(RequestStatus::as_str), limit as i64],
        request_of,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The newest pending request for `key` that is not a held statement. The partial index
/// `requests_pending` narrows the search to pending rows.
pub fn pending_request(db: &Connection, key: &RequestKey) -> Result<Option<Request>> {
    Ok(db
        .query_row(
            &pending_request_sql(),
            params![key.identity, key.resource, key.access.as_str(), key.task],
            request_of,
        )
        .optional()?)
}

fn pending_request_sql() -> String {
    format!(
        "SELECT {REQUEST_COLUMNS} FROM requests
         WHERE status = 'pending' AND identity = ?1 AND resource = ?2 AND access = ?3
           AND task_id IS ?4 AND statement IS NULL
         ORDER BY created_at DESC LIMIT 1"
    )
}

/// The ids of pending requests bound to `task`.
pub fn pending_for_task(db: &Connection, task: &str) -> Result<Vec<String>> {
    let mut stmt = db.prepare(
        "SELECT id FROM requests WHERE status = 'pending' AND task_id = ?1 ORDER BY created_at DESC",
    )?;
    let rows = stmt.query_map([task], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// How many requests wait for a decision (the partial index makes this cheap).
pub fn count_pending_requests(db: &Connection) -> Result<usize> {
    let n: i64 = db.query_row(
        "SELECT count(*) FROM requests WHERE status = 'pending'",
        [],
        |r| r.get(0),
    )?;
    Ok(n as usize)
}

/// Records a decision. Only a pending request changes; returns whether it did.
pub fn decide_request(
    db: &Connection,
    id: &str,
    status: RequestStatus,
    by: Option<&Actor>,
    reason: Option<&str>,
    grant: Option<&str>,
) -> Result<bool> {
    let changed = db.execute(
        "UPDATE requests SET status = ?2, decided_by = ?3, decided_at = ?4, decision_reason = ?5, grant_id = ?6
         WHERE id = ?1 AND status = 'pending'",
        params![
            id,
            status.as_str(),
            by.map(json),
            Timestamp::now().millis(),
            reason,
            grant
        ],
    )?;
    Ok(changed == 1)
}

// ---------------------------------------------------------------------------------------------
// Grants

const GRANT_COLUMNS: &str = "id, request_id, identity, resource, access, task_id, created_at, expires_at, approved_by, policy, reason, revoked_at, revoked_by, revoke_reason, hosts";

/// [`GRANT_COLUMNS`] as read: a grant from before scopes were kept was issued on this host,
/// the only one.
const GRANT_SELECT: &str = "id, request_id, identity, resource, access, task_id, created_at, expires_at, approved_by, policy, reason, revoked_at, revoked_by, revoke_reason, COALESCE(hosts, 'local')";

fn grant_of(r: &Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        id: r.get(0)?,
        request: r.get(1)?,
        identity: r.get(2)?,
        resource: r.get(3)?,
        access: access_of(&r.get::<_, String>(4)?)?,
        task: r.get(5)?,
        created_at: Timestamp(r.get(6)?),
        expires_at: Timestamp(r.get(7)?),
        approved_by: r.get(8)?,
        policy: r.get(9)?,
        reason: r.get(10)?,
        revoked_at: r.get::<_, Option<i64>>(11)?.map(Timestamp),
        revoked_by: r.get(12)?,
        revoke_reason: r.get(13)?,
        hosts: HostScope::from_text(&r.get::<_, String>(14)?),
    })
}

pub fn insert_grant(db: &Connection, g: &Grant) -> Result<()> {
    db.execute(
        &format!("INSERT INTO grants ({GRANT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
        params![
            g.id,
            g.request,
            g.identity,
            g.resource,
            g.access.as_str(),
            g.task,
            g.created_at.millis(),
            g.expires_at.millis(),
            g.approved_by,
            g.policy,
            g.reason,
            g.revoked_at.map(Timestamp::millis),
            g.revoked_by,
            g.revoke_reason,
            g.hosts.to_text(),
        ],
    )?;
    Ok(())
}

pub fn get_grant(db: &Connection, id: &str) -> Result<Option<Grant>> {
    Ok(db
        .query_row(
            &format!("SELECT {GRANT_SELECT} FROM grants WHERE id = ?1"),
            [id],
            grant_of,
        )
        .optional()?)
}

/// Grants not revoked and not yet expired at `now`.
pub fn live_grants(db: &Connection, now: Timestamp) -> Result<Vec<Grant>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {GRANT_SELECT} FROM grants WHERE revoked_at IS NULL AND expires_at > ?1 ORDER BY created_at"
    ))?;
    let rows = stmt.query_map([now.millis()], grant_of)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// All grants, newest first.
pub fn list_grants(db: &Connection, limit: usize) -> Result<Vec<Grant>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {GRANT_SELECT} FROM grants ORDER BY created_at DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit as i64], grant_of)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Marks a live grant revoked. Returns whether it was live.
pub fn revoke_grant(db: &Connection, id: &str, by: &str, reason: &str) -> Result<bool> {
    let changed = db.execute(
        "UPDATE grants SET revoked_at = ?2, revoked_by = ?3, revoke_reason = ?4
         WHERE id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
        params![id, Timestamp::now().millis(), by, reason],
    )?;
    Ok(changed == 1)
}

// ---------------------------------------------------------------------------------------------
// Tasks

const TASK_COLUMNS: &str =
    "id, identity, cgroup, launched_by, run_as_uid, command, reason, started_at, ended_at";

fn task_of(r: &Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: r.get(0)?,
        identity: r.get(1)?,
        cgroup: r.get(2)?,
        launched_by: actor_of(&r.get::<_, String>(3)?)?,
        run_as_uid: r.get(4)?,
        command: r.get(5)?,
        reason: r.get(6)?,
        started_at: Timestamp(r.get(7)?),
        ended_at: r.get::<_, Option<i64>>(8)?.map(Timestamp),
    })
}

pub fn insert_task(db: &Connection, t: &Task) -> Result<()> {
    db.execute(
        &format!("INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            t.id,
            t.identity,
            t.cgroup,
            json(&t.launched_by),
            t.run_as_uid,
            t.command,
            t.reason,
            t.started_at.millis(),
            t.ended_at.map(Timestamp::millis),
        ],
    )?;
    Ok(())
}

pub fn end_task(db: &Connection, id: &str) -> Result<bool> {
    let changed = db.execute(
        "UPDATE tasks SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
        params![id, Timestamp::now().millis()],
    )?;
    Ok(changed == 1)
}

/// Whether `task` is recorded as ended (an unknown task is not).
pub fn task_ended(db: &Connection, task: &str) -> Result<bool> {
    let ended: Option<Option<i64>> = db
        .query_row("SELECT ended_at FROM tasks WHERE id = ?1", [task], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(matches!(ended, Some(Some(_))))
}

pub fn running_tasks(db: &Connection) -> Result<Vec<Task>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE ended_at IS NULL ORDER BY started_at"
    ))?;
    let rows = stmt.query_map([], task_of)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

// ---------------------------------------------------------------------------------------------
// Sessions

const SESSION_COLUMNS: &str = "id, identity, task_id, pid, uid, command, resource, grant_id, destination, started_at, ended_at, bytes_up, bytes_down, outcome, detail, database, access";

fn session_of(r: &Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get(0)?,
        identity: r.get(1)?,
        task: r.get(2)?,
        pid: r.get(3)?,
        uid: r.get(4)?,
        command: r.get(5)?,
        resource: r.get(6)?,
        grant: r.get(7)?,
        destination: r.get(8)?,
        started_at: Timestamp(r.get(9)?),
        ended_at: r.get::<_, Option<i64>>(10)?.map(Timestamp),
        bytes_up: r.get::<_, i64>(11)?.max(0) as u64,
        bytes_down: r.get::<_, i64>(12)?.max(0) as u64,
        outcome: SessionOutcome::parse(&r.get::<_, String>(13)?).unwrap_or(SessionOutcome::Error),
        detail: r.get(14)?,
        database: r.get(15)?,
        access: r
            .get::<_, Option<String>>(16)?
            .map(|a| access_of(&a))
            .transpose()?,
    })
}

pub fn insert_session(db: &Connection, s: &Session) -> Result<()> {
    db.execute(
        &format!("INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"),
        params![
            s.id,
            s.identity,
            s.task,
            s.pid,
            s.uid,
            s.command,
            s.resource,
            s.grant,
            s.destination,
            s.started_at.millis(),
            s.ended_at.map(Timestamp::millis),
            s.bytes_up as i64,
            s.bytes_down as i64,
            s.outcome.as_str(),
            s.detail,
            s.database,
            s.access.map(Access::as_str),
        ],
    )?;
    Ok(())
}

pub fn end_session(
    db: &Connection,
    id: &str,
    ended_at: Timestamp,
    bytes_up: u64,
    bytes_down: u64,
    outcome: SessionOutcome,
    detail: &str,
) -> Result<usize> {
    Ok(db.execute(
        "UPDATE sessions SET ended_at = ?2, bytes_up = ?3, bytes_down = ?4, outcome = ?5, detail = ?6 WHERE id = ?1",
        params![
            id,
            ended_at.millis(),
            bytes_up as i64,
            bytes_down as i64,
            outcome.as_str(),
            detail
        ],
    )?)
}

/// Sessions newest first; `open_only` keeps those still relaying.
pub fn list_sessions(db: &Connection, open_only: bool, limit: usize) -> Result<Vec<Session>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE (?1 = 0 OR outcome = 'open') ORDER BY started_at DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![i64::from(open_only), limit as i64], session_of)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn get_session(db: &Connection, id: &str) -> Result<Option<Session>> {
    Ok(db
        .query_row(
            &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"),
            [id],
            session_of,
        )
        .optional()?)
}

/// Sessions a crash left marked open are over: mark them so on start.
pub fn close_orphan_sessions(db: &Connection) -> Result<usize> {
    Ok(db.execute(
        "UPDATE sessions SET outcome = 'shutdown', ended_at = COALESCE(ended_at, ?1), detail = 'the host agent stopped while the session was open'
         WHERE outcome = 'open'",
        [Timestamp::now().millis()],
    )?)
}

// ---------------------------------------------------------------------------------------------
// Statements

pub fn insert_statements(db: &Connection, records: &[crate::model::StatementRecord]) -> Result<()> {
    // Every statement of every session lands here: a session's batch goes in as one row
    // (see `chunks`), the compiled INSERT looked up once per batch.
    let mut insert =
        db.prepare_cached("INSERT INTO statement_chunks (session_id, records) VALUES (?1, ?2)")?;
    // Batches are one session's; a mixed one is stored a run of a session at a time.
    for run in records.chunk_by(|a, b| a.session == b.session) {
        let blob = super::chunks::encode(run)?;
        insert.execute(params![run[0].session, blob])?;
    }
    Ok(())
}

/// A session's statements in order: rows from before `statement_chunks`, then batches in
/// the order stored; a statement recorded again replaces what was recorded before. A batch
/// that cannot be read (damaged) is logged and counted (the second value), and the rest
/// returned: an operator still sees what can be shown, and is told what cannot.
pub fn session_statements(
    db: &Connection,
    session: &str,
) -> Result<(Vec<crate::model::StatementRecord>, u32)> {
    let mut by_seq = std::collections::BTreeMap::new();
    let mut stmt = db.prepare(
        "SELECT session_id, seq, at, text, params, decision, rule, approved_by, held_ms, duration_ms, rows, tag, error, masked
         FROM statements WHERE session_id = ?1",
    )?;
    let rows = stmt.query_map([session], |r| {
        let params: String = r.get(4)?;
        Ok(crate::model::StatementRecord {
            session: r.get(0)?,
            seq: r.get(1)?,
            at: Timestamp(r.get(2)?),
            text: r.get(3)?,
            params: serde_json::from_str(&params).unwrap_or_default(),
            decision: crate::model::Decision::parse(&r.get::<_, String>(5)?),
            rule: r.get(6)?,
            approved_by: r.get(7)?,
            held_ms: r.get::<_, i64>(8)?.max(0) as u64,
            duration_ms: r.get(9)?,
            rows: r.get::<_, Option<i64>>(10)?.map(|v| v.max(0) as u64),
            tag: r.get(11)?,
            error: r.get(12)?,
            masked: r.get::<_, i64>(13)?.max(0) as u64,
        })
    })?;
    for row in rows {
        let row = row?;
        by_seq.insert(row.seq, row);
    }
    let mut chunks = db.prepare_cached(
        "SELECT id, records FROM statement_chunks WHERE session_id = ?1 ORDER BY id",
    )?;
    let mut blobs = chunks.query([session])?;
    let mut unreadable = 0;
    while let Some(row) = blobs.next()? {
        let id: i64 = row.get(0)?;
        let decoded = match row.get_ref(1)?.as_blob() {
            Ok(blob) => super::chunks::decode(session, blob),
            Err(e) => Err(crate::store::StoreError::Invalid(format!(
                "a batch of statement records is not a blob: {e}"
            ))),
        };
        match decoded {
            Ok(records) => {
                for record in records {
                    by_seq.insert(record.seq, record);
                }
            }
            Err(e) => {
                tracing::error!(session, batch = id, error = %e, "unreadable statement records");
                unreadable += 1;
            }
        }
    }
    Ok((by_seq.into_values().collect(), unreadable))
}

/// Deletes sessions (and their statements) that ended before `cutoff`. The audit log is kept.
pub fn prune_sessions(db: &Connection, cutoff: Timestamp) -> Result<usize> {
    db.execute(
        "DELETE FROM statements WHERE session_id IN (SELECT id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?1)",
        [cutoff.millis()],
    )?;
    db.execute(
        "DELETE FROM statement_chunks WHERE session_id IN (SELECT id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?1)",
        [cutoff.millis()],
    )?;
    Ok(db.execute(
        "DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < ?1",
        [cutoff.millis()],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Joining a pending request reads pending rows through the partial index, not the table.
    #[test]
    fn the_pending_request_is_found_by_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", pending_request_sql()))
            .unwrap()
            .query_map(params!["a", "b", "read", None::<String>], |r| r.get(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("requests_pending")),
            "{plan:?}"
        );
    }

    fn statement(session: &str, seq: u32, text: &str) -> crate::model::StatementRecord {
        crate::model::StatementRecord {
            session: session.into(),
            seq,
            at: Timestamp(1_000 + i64::from(seq)),
            text: text.into(),
            params: vec![Some("p".into()), None],
            decision: crate::model::Decision::Allowed,
            rule: Some("read".into()),
            approved_by: None,
            held_ms: 0,
            duration_ms: Some(0.5),
            rows: Some(1),
            tag: Some("SELECT 1".into()),
            error: None,
            masked: 0,
        }
    }

    /// Statements recorded before the batches' table (rows of `statements`, as an upgraded
    /// store holds them) read with those recorded since, in order, a statement recorded
    /// again replaced; batches of several sessions kept apart; pruning takes both.
    #[test]
    fn statements_of_both_layouts_read_together_and_prune_together() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO statements (session_id, seq, at, text, params, decision, held_ms, masked)
             VALUES ('s-1', 1, 1001, 'before upgrade 1', '[\"p\"]', 'allowed', 0, 0),
                    ('s-1', 3, 1003, 'before upgrade 3', '[]', 'denied', 0, 0)",
            [],
        )
        .unwrap();
        insert_statements(
            &conn,
            &[
                statement("s-1", 2, "after 2"),
                statement("s-1", 3, "after 3"),
                statement("s-2", 1, "other session"),
                statement("s-1", 4, "after 4"),
            ],
        )
        .unwrap();
        insert_statements(&conn, &[statement("s-1", 4, "after 4, again")]).unwrap();
        let (got, unreadable) = session_statements(&conn, "s-1").unwrap();
        assert_eq!(unreadable, 0);
        let texts: Vec<_> = got.iter().map(|s| (s.seq, s.text.as_str())).collect();
        assert_eq!(
            texts,
            [
                (1, "before upgrade 1"),
                (2, "after 2"),
                (3, "after 3"),
                (4, "after 4, again")
            ]
        );
        assert!(got.iter().all(|s| s.session == "s-1"));
        assert_eq!(got[0].params, [Some("p".to_owned())]);
        let (other, _) = session_statements(&conn, "s-2").unwrap();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].text, "other session");

        for (id, ended) in [("s-1", Some(10)), ("s-2", None::<i64>)] {
            conn.execute(
                "INSERT INTO sessions (id, identity, pid, uid, command, resource, destination, started_at, ended_at, outcome)
                 VALUES (?1, 'bot', 1, 0, 'psql', 'db', '127.0.0.1:5432', 1, ?2, 'closed')",
                params![id, ended],
            )
            .unwrap();
        }
        prune_sessions(&conn, Timestamp(100)).unwrap();
        assert!(session_statements(&conn, "s-1").unwrap().0.is_empty());
        assert_eq!(session_statements(&conn, "s-2").unwrap().0.len(), 1);
    }

    /// A damaged batch is counted and the others read; the same statement twice in one
    /// batch keeps the later record.
    #[test]
    fn a_damaged_batch_is_counted_and_the_rest_read() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        insert_statements(
            &conn,
            &[
                statement("s-1", 1, "one"),
                statement("s-1", 1, "one, again"),
            ],
        )
        .unwrap();
        insert_statements(&conn, &[statement("s-1", 2, "two")]).unwrap();
        insert_statements(&conn, &[statement("s-1", 3, "three")]).unwrap();
        conn.execute(
            "UPDATE statement_chunks SET records = x'01ffffffff' WHERE id = 2",
            [],
        )
        .unwrap();
        let (got, unreadable) = session_statements(&conn, "s-1").unwrap();
        assert_eq!(unreadable, 1);
        let texts: Vec<_> = got.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["one, again", "three"]);
    }
}
