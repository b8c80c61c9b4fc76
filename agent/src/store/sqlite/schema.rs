//! Schema migrations, applied in order and recorded in `PRAGMA user_version`.
//!
//! Never edit a migration that has shipped: append a new one.

use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: requests, grants, tasks, sessions, audit.
    r#"
    CREATE TABLE requests (
        id              TEXT PRIMARY KEY,
        identity        TEXT NOT NULL,
        resource        TEXT NOT NULL,
        access          TEXT NOT NULL,
        ttl_secs        INTEGER NOT NULL,
        reason          TEXT NOT NULL,
        task_id         TEXT,
        requested_by    TEXT NOT NULL,   -- JSON Actor
        created_at      INTEGER NOT NULL,
        status          TEXT NOT NULL,
        policy          TEXT NOT NULL,
        decided_by      TEXT,            -- JSON Actor
        decided_at      INTEGER,
        decision_reason TEXT,
        grant_id        TEXT
    );
    CREATE INDEX requests_pending ON requests (status) WHERE status = 'pending';

    CREATE TABLE grants (
        id            TEXT PRIMARY KEY,
        request_id    TEXT NOT NULL,
        identity      TEXT NOT NULL,
        resource      TEXT NOT NULL,
        access        TEXT NOT NULL,
        task_id       TEXT,
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        approved_by   TEXT NOT NULL,
        policy        TEXT NOT NULL,
        reason        TEXT NOT NULL,
        revoked_at    INTEGER,
        revoked_by    TEXT,
        revoke_reason TEXT
    );
    CREATE INDEX grants_live ON grants (expires_at) WHERE revoked_at IS NULL;

    CREATE TABLE tasks (
        id          TEXT PRIMARY KEY,
        identity    TEXT NOT NULL,
        cgroup      TEXT NOT NULL,
        launched_by TEXT NOT NULL,       -- JSON Actor
        run_as_uid  INTEGER NOT NULL,
        command     TEXT NOT NULL,
        reason      TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        ended_at    INTEGER
    );

    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        identity    TEXT,
        task_id     TEXT,
        pid         INTEGER NOT NULL,
        uid         INTEGER NOT NULL,
        command     TEXT NOT NULL,
        resource    TEXT,
        grant_id    TEXT,
        destination TEXT NOT NULL,
        started_at  INTEGER NOT NULL,
        ended_at    INTEGER,
        bytes_up    INTEGER NOT NULL DEFAULT 0,
        bytes_down  INTEGER NOT NULL DEFAULT 0,
        outcome     TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_started ON sessions (started_at);

    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        kind      TEXT NOT NULL,
        actor     TEXT NOT NULL,
        detail    TEXT NOT NULL,   -- JSON, hashed as stored
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL
    );
    "#,
    // 2: statement-level recording and statement approvals (PostgreSQL gate).
    r#"
    ALTER TABLE requests ADD COLUMN statement TEXT;
    ALTER TABLE requests ADD COLUMN session_id TEXT;
    ALTER TABLE sessions ADD COLUMN database TEXT;
    ALTER TABLE sessions ADD COLUMN access TEXT;
    CREATE TABLE statements (
        session_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        at          INTEGER NOT NULL,
        text        TEXT NOT NULL,
        params      TEXT NOT NULL DEFAULT '[]',   -- JSON array, masked
        decision    TEXT NOT NULL,
        rule        TEXT,
        approved_by TEXT,
        held_ms     INTEGER NOT NULL DEFAULT 0,
        duration_ms REAL,
        rows        INTEGER,
        tag         TEXT,
        error       TEXT,
        masked      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, seq)
    );
    CREATE INDEX statements_at ON statements (at);
    "#,
    // 3: no query reads statements by time (retention goes by session), and every recorded
    // statement paid for this index's B-tree insert.
    r#"
    DROP INDEX statements_at;
    "#,
    // 4: approvals of requests that need several (JSON array of model::Approval).
    r#"
    ALTER TABLE requests ADD COLUMN approvals TEXT;
    "#,
    // 5: the approvals a request was filed under (JSON model::Needs), when more than one.
    r#"
    ALTER TABLE requests ADD COLUMN needs TEXT;
    "#,
    // 6: bearer tokens of the console's HTTP API (a SHA-256 of the secret, never the secret).
    r#"
    CREATE TABLE api_tokens (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        user_name   TEXT NOT NULL,
        read_only   INTEGER NOT NULL,
        issued_by   TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        revoked_at  INTEGER,
        hash        TEXT NOT NULL
    );
    CREATE INDEX api_tokens_user ON api_tokens (user_name, created_at);
    "#,
    // 7: host scopes (grants/scope.rs): where a grant may be used, and the host a request was
    // filed on with the scope it asked for. A grant from before has none: it was issued
    // here, the only host, and reads as such.
    r#"
    ALTER TABLE grants ADD COLUMN hosts TEXT;
    ALTER TABLE requests ADD COLUMN host TEXT;
    ALTER TABLE requests ADD COLUMN hosts TEXT;
    "#,
    // 8: a scratch row the store thread writes and deletes to learn whether the disk keeps
    // writes again after they failed (see writer.rs, `probe`).
    r#"
    CREATE TABLE store_probe (pad BLOB NOT NULL);
    "#,
    // 9: statement records a session's batch to a row (chunks.rs): the bytes SQLite writes
    // per record are most of its cost. Rows already in `statements` are read with these.
    r#"
    CREATE TABLE statement_chunks (
        id          INTEGER PRIMARY KEY,        -- the order stored: a later record wins
        session_id  TEXT NOT NULL,
        records     BLOB NOT NULL               -- chunks.rs
    );
    CREATE INDEX statement_chunks_session ON statement_chunks (session_id);
    "#,
];

pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the state store has schema version {version}, newer than this jitgated knows ({}); upgrade jitgated",
            MIGRATIONS.len()
        )));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(migrate(&mut conn).is_err());
    }
}
