//! Rows in and out of the shared store. Plain functions over a client or transaction, so that
//! one store method composes several in one transaction (the same shape as the SQLite
//! store's `queries.rs`, in PostgreSQL's dialect; rows carry the `host_id` that wrote them).

use std::{str::FromStr as _, time::Duration};

use tokio_postgres::{GenericClient, Row};

use crate::{
    config::Access,
    grants::scope::HostScope,
    model::{
        Actor, Decision, Grant, Request, RequestStatus, Session, SessionOutcome, StatementRecord,
        Task, Timestamp,
    },
    store::{RequestKey, Result, StoreError},
};

fn bad(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Invalid(format!("the shared store holds a bad {what}: {e}"))
}

fn access_of(s: &str) -> Result<Access> {
    Access::from_str(s).map_err(|e| bad("access level", e))
}

fn actor_of(s: &str) -> Result<Actor> {
    serde_json::from_str(s).map_err(|e| bad("actor", e))
}

fn json(actor: &Actor) -> Result<String> {
    Ok(serde_json::to_string(actor)?)
}

fn unsigned(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Requests

const REQUEST_COLUMNS: &str = "id, identity, resource, access, ttl_secs, reason, task_id, requested_by, created_at, status, policy, decided_by, decided_at, decision_reason, grant_id, statement, session_id, approvals, needs, hosts";

/// [`REQUEST_COLUMNS`] as read, with the host that wrote the row: the request's host is
/// where it was filed, whatever the request says of itself.
const REQUEST_SELECT: &str = "id, identity, resource, access, ttl_secs, reason, task_id, requested_by, created_at, status, policy, decided_by, decided_at, decision_reason, grant_id, statement, session_id, approvals, needs, hosts, host_id";

fn request_of(r: &Row) -> Result<Request> {
    let decided_by: Option<String> = r.try_get(11)?;
    Ok(Request {
        id: r.try_get(0)?,
        identity: r.try_get(1)?,
        resource: r.try_get(2)?,
        access: access_of(r.try_get(3)?)?,
        ttl: Duration::from_secs(unsigned(r.try_get(4)?)),
        reason: r.try_get(5)?,
        task: r.try_get(6)?,
        requested_by: actor_of(r.try_get(7)?)?,
        created_at: Timestamp(r.try_get(8)?),
        status: RequestStatus::parse(r.try_get(9)?).unwrap_or(RequestStatus::Expired),
        policy: r.try_get(10)?,
        decided_by: decided_by.as_deref().map(actor_of).transpose()?,
        decided_at: r.try_get::<_, Option<i64>>(12)?.map(Timestamp),
        decision_reason: r.try_get(13)?,
        grant: r.try_get(14)?,
        statement: r.try_get(15)?,
        session: r.try_get(16)?,
        approvals: match r.try_get::<_, Option<String>>(17)? {
            None => Vec::new(),
            Some(text) => serde_json::from_str(&text).map_err(|e| bad("approvals", e))?,
        },
        needs: match r.try_get::<_, Option<String>>(18)? {
            None => None,
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| bad("needs", e))?),
        },
        hosts: r
            .try_get::<_, Option<String>>(19)?
            .map(|t| HostScope::from_text(&t)),
        host: Some(r.try_get(20)?),
    })
}

/// Replaces a pending request's approvals; `false` if it is no longer pending.
pub async fn set_approvals(
    db: &impl GenericClient,
    id: &str,
    approvals: &[crate::model::Approval],
) -> Result<bool> {
    let text = serde_json::to_string(approvals)?;
    let changed = db
        .execute(
            "UPDATE requests SET approvals = $2 WHERE id = $1 AND status = 'pending'",
            &[&id, &text],
        )
        .await?;
    Ok(changed == 1)
}

pub async fn insert_request(db: &impl GenericClient, host: &str, q: &Request) -> Result<()> {
    db.execute(
        &format!("INSERT INTO requests (host_id, {REQUEST_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)"),
        &[
            &host,
            &q.id,
            &q.identity,
            &q.resource,
            &q.access.as_str(),
            &signed(q.ttl.as_secs()),
            &q.reason,
            &q.task,
            &json(&q.requested_by)?,
            &q.created_at.millis(),
            &q.status.as_str(),
            &q.policy,
            &q.decided_by.as_ref().map(json).transpose()?,
            &q.decided_at.map(Timestamp::millis),
            &q.decision_reason,
            &q.grant,
            &q.statement,
            &q.session,
            &(!q.approvals.is_empty())
                .then(|| serde_json::to_string(&q.approvals))
                .transpose()?,
            &q.needs.as_ref().map(serde_json::to_string).transpose()?,
            &q.hosts.as_ref().map(HostScope::to_text),
        ],
    )
    .await?;
    Ok(())
}

pub async fn get_request(db: &impl GenericClient, id: &str) -> Result<Option<Request>> {
    db.query_opt(
        &format!("SELECT {REQUEST_SELECT} FROM requests WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(request_of)
    .transpose()
}

/// Requests with `status`, newest first (all statuses when `None`).
pub async fn list_requests(
    db: &impl GenericClient,
    status: Option<RequestStatus>,
    limit: usize,
) -> Result<Vec<Request>> {
    db.query(
        &format!(
            "SELECT {REQUEST_SELECT} FROM requests WHERE ($1::text IS NULL OR status = $1) ORDER BY created_at DESC, id DESC LIMIT $2"
        ),
        &[&status.map(RequestStatus::as_str), &(limit as i64)],
    )
    .await?
    .iter()
    .map(request_of)
    .collect()
}

/// The newest pending request for `key` that is not a held statement (through the partial
/// index `requests_pending`).
pub async fn pending_request(db: &impl GenericClient, key: &RequestKey) -> Result<Option<Request>> {
    db.query_opt(
        &format!(
            "SELECT {REQUEST_SELECT} FROM requests
             WHERE status = 'pending' AND identity = $1 AND resource = $2 AND access = $3
               AND task_id IS NOT DISTINCT FROM $4 AND statement IS NULL
             ORDER BY created_at DESC LIMIT 1"
        ),
        &[
            &key.identity,
            &key.resource,
            &key.access.as_str(),
            &key.task,
        ],
    )
    .await?
    .as_ref()
    .map(request_of)
    .transpose()
}

pub async fn pending_for_task(db: &impl GenericClient, task: &str) -> Result<Vec<String>> {
    Ok(db
        .query(
            "SELECT id FROM requests WHERE status = 'pending' AND task_id = $1 ORDER BY created_at DESC",
            &[&task],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?)
}

pub async fn count_pending_requests(db: &impl GenericClient) -> Result<usize> {
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM requests WHERE status = 'pending'",
            &[],
        )
        .await?
        .try_get(0)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Records a decision. Only a pending request changes (the row lock makes two hosts deciding
/// at once see one winner); returns whether it did.
pub async fn decide_request(
    db: &impl GenericClient,
    id: &str,
    status: RequestStatus,
    by: Option<&Actor>,
    reason: Option<&str>,
    grant: Option<&str>,
) -> Result<bool> {
    let changed = db
        .execute(
            "UPDATE requests SET status = $2, decided_by = $3, decided_at = $4, decision_reason = $5, grant_id = $6
             WHERE id = $1 AND status = 'pending'",
            &[
                &id,
                &status.as_str(),
                &by.map(json).transpose()?,
                &Timestamp::now().millis(),
                &reason,
                &grant,
            ],
        )
        .await?;
    Ok(changed == 1)
}

// ---------------------------------------------------------------------------------------------
// Grants

const GRANT_COLUMNS: &str = "id, request_id, identity, resource, access, task_id, created_at, expires_at, approved_by, policy, reason, revoked_at, revoked_by, revoke_reason, hosts";

/// [`GRANT_COLUMNS`] as read. A grant without a scope (issued before scopes, or by a host
/// not yet upgraded) is scoped to the host its request was filed on: the least a grant was
/// ever meant for, never the fleet.
/// Qualified by the table's name, so that a query joining `grants` to other tables (the change
/// log's read, [`CHANGES_AFTER`]) selects the same columns in the same order ([`grant_at`]).
macro_rules! grant_select {
    () => {
        "grants.id, grants.request_id, grants.identity, grants.resource, grants.access, \
         grants.task_id, grants.created_at, grants.expires_at, grants.approved_by, \
         grants.policy, grants.reason, grants.revoked_at, grants.revoked_by, \
         grants.revoke_reason, \
         COALESCE(grants.hosts, (SELECT q.host_id FROM requests q WHERE q.id = grants.request_id), grants.host_id)"
    };
}
const GRANT_SELECT: &str = grant_select!();

fn grant_of(r: &Row) -> Result<Grant> {
    grant_at(r, 0)
}

/// A grant read from [`GRANT_SELECT`]'s columns starting at column `at`.
fn grant_at(r: &Row, at: usize) -> Result<Grant> {
    Ok(Grant {
        id: r.try_get(at)?,
        request: r.try_get(at + 1)?,
        identity: r.try_get(at + 2)?,
        resource: r.try_get(at + 3)?,
        access: access_of(r.try_get(at + 4)?)?,
        task: r.try_get(at + 5)?,
        created_at: Timestamp(r.try_get(at + 6)?),
        expires_at: Timestamp(r.try_get(at + 7)?),
        approved_by: r.try_get(at + 8)?,
        policy: r.try_get(at + 9)?,
        reason: r.try_get(at + 10)?,
        revoked_at: r.try_get::<_, Option<i64>>(at + 11)?.map(Timestamp),
        revoked_by: r.try_get(at + 12)?,
        revoke_reason: r.try_get(at + 13)?,
        hosts: HostScope::from_text(r.try_get(at + 14)?),
    })
}

/// One entry of the change log as a follower reads it, with what acting on it needs: the
/// grant an `issued` names, the status of the request a `decided` names.
#[derive(Debug)]
pub struct LoggedChange {
    pub seq: i64,
    pub host: String,
    pub kind: String,
    pub subject: String,
    pub grant: Option<Grant>,
    pub status: Option<RequestStatus>,
}

/// A page of the change log and how far the log has been pruned, read in one snapshot.
#[derive(Debug)]
pub struct LogPage {
    /// Changes up to this number are gone (pruned); 0 when none are.
    pub through: i64,
    pub changes: Vec<LoggedChange>,
}

/// The change log after `$1`, oldest first, at most `$2` entries, each with its grant or
/// request status joined in, and the prune mark, in one statement (one snapshot): one query
/// per read for each host. Reading each subject apart made every change cost a fleet of N
/// hosts N queries more, all at once (every host wakes on the same notification). Prepared
/// once per follower connection ([`changes_after`]), so it is planned once.
pub const CHANGES_AFTER: &str = concat!(
    "SELECT (SELECT through FROM changes_pruned WHERE id = 1), x.*
       FROM (SELECT 1) AS one
       LEFT JOIN LATERAL (
         SELECT c.seq, c.host_id, c.kind, c.subject, r.status, ",
    grant_select!(),
    "
           FROM changes c
           LEFT JOIN grants ON c.kind = 'issued' AND grants.id = c.subject
           LEFT JOIN requests r ON c.kind = 'decided' AND r.id = c.subject
          WHERE c.seq > $1
          ORDER BY c.seq
          LIMIT $2
       ) AS x ON true
      ORDER BY x.seq"
);

/// What a missing prune mark means and what to do: without it a host cannot tell whether
/// changes it never read were pruned, so it reads nothing (fail closed).
pub const NO_PRUNE_MARK: &str = "the shared store's change log has no prune mark (table changes_pruned, row id 1): the schema was damaged or partly restored, and no host can tell whether changes it never read are gone. Restore it: INSERT INTO changes_pruned (id, through) SELECT 1, COALESCE(MIN(seq) - 1, 0) FROM changes";

/// Runs [`CHANGES_AFTER`] (`statement`, prepared from it on this connection).
pub async fn changes_after(
    db: &impl GenericClient,
    statement: &tokio_postgres::Statement,
    after: i64,
    limit: i64,
) -> Result<LogPage> {
    let rows = db.query(statement, &[&after, &limit]).await?;
    let Some(through) = rows
        .first()
        .map(|r| r.try_get::<_, Option<i64>>(0))
        .transpose()?
        .flatten()
    else {
        return Err(StoreError::Invalid(NO_PRUNE_MARK.into()));
    };
    let mut changes = Vec::with_capacity(rows.len());
    for r in &rows {
        // The outer row of an empty read has no change.
        let Some(seq) = r.try_get::<_, Option<i64>>(1)? else {
            continue;
        };
        let grant = match r.try_get::<_, Option<String>>(6)? {
            Some(_) => Some(grant_at(r, 6)?),
            None => None,
        };
        changes.push(LoggedChange {
            seq,
            host: r.try_get(2)?,
            kind: r.try_get(3)?,
            subject: r.try_get(4)?,
            grant,
            // As `request_of` reads a status it does not know: over, so waiters look again.
            status: r
                .try_get::<_, Option<&str>>(5)?
                .map(|s| RequestStatus::parse(s).unwrap_or(RequestStatus::Expired)),
        });
    }
    Ok(LogPage { through, changes })
}

pub async fn insert_grant(db: &impl GenericClient, host: &str, g: &Grant) -> Result<()> {
    db.execute(
        &format!("INSERT INTO grants (host_id, {GRANT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"),
        &[
            &host,
            &g.id,
            &g.request,
            &g.identity,
            &g.resource,
            &g.access.as_str(),
            &g.task,
            &g.created_at.millis(),
            &g.expires_at.millis(),
            &g.approved_by,
            &g.policy,
            &g.reason,
            &g.revoked_at.map(Timestamp::millis),
            &g.revoked_by,
            &g.revoke_reason,
            &g.hosts.to_text(),
        ],
    )
    .await?;
    Ok(())
}

pub async fn get_grant(db: &impl GenericClient, id: &str) -> Result<Option<Grant>> {
    db.query_opt(
        &format!("SELECT {GRANT_SELECT} FROM grants WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(grant_of)
    .transpose()
}

pub async fn live_grants(db: &impl GenericClient, now: Timestamp) -> Result<Vec<Grant>> {
    db.query(
        &format!("SELECT {GRANT_SELECT} FROM grants WHERE revoked_at IS NULL AND expires_at > $1 ORDER BY created_at, id"),
        &[&now.millis()],
    )
    .await?
    .iter()
    .map(grant_of)
    .collect()
}

pub async fn list_grants(db: &impl GenericClient, limit: usize) -> Result<Vec<Grant>> {
    db.query(
        &format!("SELECT {GRANT_SELECT} FROM grants ORDER BY created_at DESC, id DESC LIMIT $1"),
        &[&(limit as i64)],
    )
    .await?
    .iter()
    .map(grant_of)
    .collect()
}

/// Marks a live grant revoked. Returns whether it was live.
pub async fn revoke_grant(
    db: &impl GenericClient,
    id: &str,
    by: &str,
    reason: &str,
) -> Result<bool> {
    let changed = db
        .execute(
            "UPDATE grants SET revoked_at = $2, revoked_by = $3, revoke_reason = $4
             WHERE id = $1 AND revoked_at IS NULL AND expires_at > $2",
            &[&id, &Timestamp::now().millis(), &by, &reason],
        )
        .await?;
    Ok(changed == 1)
}

// ---------------------------------------------------------------------------------------------
// Tasks

const TASK_COLUMNS: &str =
    "id, identity, cgroup, launched_by, run_as_uid, command, reason, started_at, ended_at";

fn task_of(r: &Row) -> Result<Task> {
    Ok(Task {
        id: r.try_get(0)?,
        identity: r.try_get(1)?,
        cgroup: r.try_get(2)?,
        launched_by: actor_of(r.try_get(3)?)?,
        run_as_uid: u32::try_from(r.try_get::<_, i64>(4)?).map_err(|e| bad("uid", e))?,
        command: r.try_get(5)?,
        reason: r.try_get(6)?,
        started_at: Timestamp(r.try_get(7)?),
        ended_at: r.try_get::<_, Option<i64>>(8)?.map(Timestamp),
    })
}

pub async fn insert_task(db: &impl GenericClient, host: &str, t: &Task) -> Result<()> {
    db.execute(
        &format!("INSERT INTO tasks (host_id, {TASK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"),
        &[
            &host,
            &t.id,
            &t.identity,
            &t.cgroup,
            &json(&t.launched_by)?,
            &i64::from(t.run_as_uid),
            &t.command,
            &t.reason,
            &t.started_at.millis(),
            &t.ended_at.map(Timestamp::millis),
        ],
    )
    .await?;
    Ok(())
}

pub async fn end_task(db: &impl GenericClient, id: &str) -> Result<bool> {
    let changed = db
        .execute(
            "UPDATE tasks SET ended_at = $2 WHERE id = $1 AND ended_at IS NULL",
            &[&id, &Timestamp::now().millis()],
        )
        .await?;
    Ok(changed == 1)
}

/// Whether `task` is recorded as ended (an unknown task is not).
pub async fn task_ended(db: &impl GenericClient, task: &str) -> Result<bool> {
    let row = db
        .query_opt("SELECT ended_at FROM tasks WHERE id = $1", &[&task])
        .await?;
    Ok(match row {
        Some(r) => r.try_get::<_, Option<i64>>(0)?.is_some(),
        None => false,
    })
}

/// This host's running tasks (a task's process tree lives on the host that started it).
pub async fn running_tasks(db: &impl GenericClient, host: &str) -> Result<Vec<Task>> {
    db.query(
        &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE ended_at IS NULL AND host_id = $1 ORDER BY started_at, id"),
        &[&host],
    )
    .await?
    .iter()
    .map(task_of)
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Sessions

const SESSION_COLUMNS: &str = "id, identity, task_id, pid, uid, command, resource, grant_id, destination, started_at, ended_at, bytes_up, bytes_down, outcome, detail, database, access";

fn session_of(r: &Row) -> Result<Session> {
    Ok(Session {
        id: r.try_get(0)?,
        identity: r.try_get(1)?,
        task: r.try_get(2)?,
        pid: u32::try_from(r.try_get::<_, i64>(3)?).unwrap_or(0),
        uid: u32::try_from(r.try_get::<_, i64>(4)?).unwrap_or(u32::MAX),
        command: r.try_get(5)?,
        resource: r.try_get(6)?,
        grant: r.try_get(7)?,
        destination: r.try_get(8)?,
        started_at: Timestamp(r.try_get(9)?),
        ended_at: r.try_get::<_, Option<i64>>(10)?.map(Timestamp),
        bytes_up: unsigned(r.try_get(11)?),
        bytes_down: unsigned(r.try_get(12)?),
        outcome: SessionOutcome::parse(r.try_get(13)?).unwrap_or(SessionOutcome::Error),
        detail: r.try_get(14)?,
        database: r.try_get(15)?,
        access: r
            .try_get::<_, Option<&str>>(16)?
            .map(access_of)
            .transpose()?,
    })
}

pub async fn insert_session(db: &impl GenericClient, host: &str, s: &Session) -> Result<()> {
    db.execute(
        &format!("INSERT INTO sessions (host_id, {SESSION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"),
        &[
            &host,
            &s.id,
            &s.identity,
            &s.task,
            &i64::from(s.pid),
            &i64::from(s.uid),
            &s.command,
            &s.resource,
            &s.grant,
            &s.destination,
            &s.started_at.millis(),
            &s.ended_at.map(Timestamp::millis),
            &signed(s.bytes_up),
            &signed(s.bytes_down),
            &s.outcome.as_str(),
            &s.detail,
            &s.database,
            &s.access.map(Access::as_str),
        ],
    )
    .await?;
    Ok(())
}

pub async fn end_session(db: &impl GenericClient, s: &Session) -> Result<()> {
    db.execute(
        "UPDATE sessions SET ended_at = $2, bytes_up = $3, bytes_down = $4, outcome = $5, detail = $6 WHERE id = $1",
        &[
            &s.id,
            &s.ended_at.unwrap_or_else(Timestamp::now).millis(),
            &signed(s.bytes_up),
            &signed(s.bytes_down),
            &s.outcome.as_str(),
            &s.detail,
        ],
    )
    .await?;
    Ok(())
}

/// Sessions newest first; `open_only` keeps those still relaying.
pub async fn list_sessions(
    db: &impl GenericClient,
    open_only: bool,
    limit: usize,
) -> Result<Vec<Session>> {
    db.query(
        &format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE (NOT $1 OR outcome = 'open') ORDER BY started_at DESC, id DESC LIMIT $2"
        ),
        &[&open_only, &(limit as i64)],
    )
    .await?
    .iter()
    .map(session_of)
    .collect()
}

pub async fn get_session(db: &impl GenericClient, id: &str) -> Result<Option<Session>> {
    db.query_opt(
        &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(session_of)
    .transpose()
}

/// This host's sessions a crash left open are over (another host's open sessions are its
/// own business: they may well be relaying).
/// Closes this host's sessions still marked open that began before `before` (left open by a
/// previous run: this run's own sessions all began later).
pub async fn close_sessions_before(
    db: &impl GenericClient,
    host: &str,
    before: Timestamp,
) -> Result<usize> {
    let n = db
        .execute(
            "UPDATE sessions SET outcome = 'shutdown', ended_at = COALESCE(ended_at, $2), detail = 'the host agent stopped while the session was open'
             WHERE outcome = 'open' AND host_id = $1 AND started_at < $3",
            &[&host, &Timestamp::now().millis(), &before.millis()],
        )
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

pub async fn close_orphan_sessions(db: &impl GenericClient, host: &str) -> Result<usize> {
    let n = db
        .execute(
            "UPDATE sessions SET outcome = 'shutdown', ended_at = COALESCE(ended_at, $2), detail = 'the host agent stopped while the session was open'
             WHERE outcome = 'open' AND host_id = $1",
            &[&host, &Timestamp::now().millis()],
        )
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

// ---------------------------------------------------------------------------------------------
// Statements

pub async fn insert_statements(db: &impl GenericClient, records: &[StatementRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let insert = db
        .prepare(
            "INSERT INTO statements (session_id, seq, at, text, params, decision, rule, approved_by, held_ms, duration_ms, rows, tag, error, masked)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (session_id, seq) DO UPDATE SET at = EXCLUDED.at, text = EXCLUDED.text, params = EXCLUDED.params,
               decision = EXCLUDED.decision, rule = EXCLUDED.rule, approved_by = EXCLUDED.approved_by, held_ms = EXCLUDED.held_ms,
               duration_ms = EXCLUDED.duration_ms, rows = EXCLUDED.rows, tag = EXCLUDED.tag, error = EXCLUDED.error, masked = EXCLUDED.masked",
        )
        .await?;
    for s in records {
        let params = if s.params.is_empty() {
            "[]".to_owned()
        } else {
            serde_json::to_string(&s.params)?
        };
        db.execute(
            &insert,
            &[
                &s.session,
                &i64::from(s.seq),
                &s.at.millis(),
                &s.text,
                &params,
                &s.decision.as_str(),
                &s.rule,
                &s.approved_by,
                &signed(s.held_ms),
                &s.duration_ms,
                &s.rows.map(signed),
                &s.tag,
                &s.error,
                &signed(s.masked),
            ],
        )
        .await?;
    }
    Ok(())
}

pub async fn session_statements(
    db: &impl GenericClient,
    session: &str,
) -> Result<Vec<StatementRecord>> {
    db.query(
        "SELECT session_id, seq, at, text, params, decision, rule, approved_by, held_ms, duration_ms, rows, tag, error, masked
         FROM statements WHERE session_id = $1 ORDER BY seq",
        &[&session],
    )
    .await?
    .iter()
    .map(|r| {
        let params: &str = r.try_get(4)?;
        Ok(StatementRecord {
            session: r.try_get(0)?,
            seq: u32::try_from(r.try_get::<_, i64>(1)?).map_err(|e| bad("statement seq", e))?,
            at: Timestamp(r.try_get(2)?),
            text: r.try_get(3)?,
            params: serde_json::from_str(params).unwrap_or_default(),
            decision: Decision::parse(r.try_get(5)?),
            rule: r.try_get(6)?,
            approved_by: r.try_get(7)?,
            held_ms: unsigned(r.try_get(8)?),
            duration_ms: r.try_get(9)?,
            rows: r.try_get::<_, Option<i64>>(10)?.map(unsigned),
            tag: r.try_get(11)?,
            error: r.try_get(12)?,
            masked: unsigned(r.try_get(13)?),
        })
    })
    .collect()
}

/// Deletes sessions (and their statements) that ended before `cutoff`. The audit log is kept.
pub async fn prune_sessions(db: &impl GenericClient, cutoff: Timestamp) -> Result<usize> {
    db.execute(
        "DELETE FROM statements WHERE session_id IN (SELECT id FROM sessions WHERE ended_at IS NOT NULL AND ended_at < $1)",
        &[&cutoff.millis()],
    )
    .await?;
    let n = db
        .execute(
            "DELETE FROM sessions WHERE ended_at IS NOT NULL AND ended_at < $1",
            &[&cutoff.millis()],
        )
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}
