//! Schema migrations for the shared store, applied in order and recorded in
//! `jitgate_schema`.
//!
//! Many agents may start at once against one database: each migrates inside one transaction
//! that first takes a transaction-scoped advisory lock, so exactly one of them applies a
//! migration and the others, once the lock is theirs, find it done. Never edit a migration
//! that has shipped: append a new one.

use tokio_postgres::Client;

use crate::store::{Result, StoreError};

/// The advisory lock key the migrations serialise on (any fixed number; "jitgate" in ASCII).
const MIGRATION_LOCK: i64 = 0x006a_6974_6761_7465;

const MIGRATIONS: &[&str] = &[
    // 1: requests, grants, tasks, sessions, statements, the per-host audit chains and the
    // change log other hosts follow.
    r#"
    CREATE TABLE requests (
        id              TEXT PRIMARY KEY,
        host_id         TEXT NOT NULL,
        identity        TEXT NOT NULL,
        resource        TEXT NOT NULL,
        access          TEXT NOT NULL,
        ttl_secs        BIGINT NOT NULL,
        reason          TEXT NOT NULL,
        task_id         TEXT,
        requested_by    TEXT NOT NULL,   -- JSON Actor
        created_at      BIGINT NOT NULL,
        status          TEXT NOT NULL,
        policy          TEXT NOT NULL,
        decided_by      TEXT,            -- JSON Actor
        decided_at      BIGINT,
        decision_reason TEXT,
        grant_id        TEXT,
        statement       TEXT,
        session_id      TEXT
    );
    CREATE INDEX requests_pending ON requests (identity, resource, access)
        WHERE status = 'pending';
    CREATE INDEX requests_created ON requests (created_at);

    CREATE TABLE grants (
        id            TEXT PRIMARY KEY,
        host_id       TEXT NOT NULL,
        request_id    TEXT NOT NULL,
        identity      TEXT NOT NULL,
        resource      TEXT NOT NULL,
        access        TEXT NOT NULL,
        task_id       TEXT,
        created_at    BIGINT NOT NULL,
        expires_at    BIGINT NOT NULL,
        approved_by   TEXT NOT NULL,
        policy        TEXT NOT NULL,
        reason        TEXT NOT NULL,
        revoked_at    BIGINT,
        revoked_by    TEXT,
        revoke_reason TEXT
    );
    CREATE INDEX grants_live ON grants (expires_at) WHERE revoked_at IS NULL;

    CREATE TABLE tasks (
        id          TEXT PRIMARY KEY,
        host_id     TEXT NOT NULL,
        identity    TEXT NOT NULL,
        cgroup      TEXT NOT NULL,
        launched_by TEXT NOT NULL,       -- JSON Actor
        run_as_uid  BIGINT NOT NULL,
        command     TEXT NOT NULL,
        reason      TEXT NOT NULL,
        started_at  BIGINT NOT NULL,
        ended_at    BIGINT
    );

    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        host_id     TEXT NOT NULL,
        identity    TEXT,
        task_id     TEXT,
        pid         BIGINT NOT NULL,
        uid         BIGINT NOT NULL,
        command     TEXT NOT NULL,
        resource    TEXT,
        grant_id    TEXT,
        destination TEXT NOT NULL,
        started_at  BIGINT NOT NULL,
        ended_at    BIGINT,
        bytes_up    BIGINT NOT NULL DEFAULT 0,
        bytes_down  BIGINT NOT NULL DEFAULT 0,
        outcome     TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT '',
        database    TEXT,
        access      TEXT
    );
    CREATE INDEX sessions_started ON sessions (started_at);
    CREATE INDEX sessions_open ON sessions (host_id) WHERE outcome = 'open';

    CREATE TABLE statements (
        session_id  TEXT NOT NULL,
        seq         BIGINT NOT NULL,
        at          BIGINT NOT NULL,
        text        TEXT NOT NULL,
        params      TEXT NOT NULL DEFAULT '[]',   -- JSON array, masked
        decision    TEXT NOT NULL,
        rule        TEXT,
        approved_by TEXT,
        held_ms     BIGINT NOT NULL DEFAULT 0,
        duration_ms DOUBLE PRECISION,
        rows        BIGINT,
        tag         TEXT,
        error       TEXT,
        masked      BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (session_id, seq)
    );

    -- One hash chain per host: (host_id, seq) is the link's place.
    CREATE TABLE audit (
        host_id   TEXT NOT NULL,
        seq       BIGINT NOT NULL,
        at        BIGINT NOT NULL,
        kind      TEXT NOT NULL,
        actor     TEXT NOT NULL,
        detail    TEXT NOT NULL,   -- JSON, hashed as stored
        prev_hash TEXT NOT NULL,
        hash      TEXT NOT NULL,
        PRIMARY KEY (host_id, seq)
    );
    CREATE INDEX audit_at ON audit (at);

    -- What other hosts must learn: grant issued/revoked/expired, request decided. Written in
    -- the transaction that makes the change, under a fleet-wide advisory lock, so that `seq`
    -- commits in order and a reader that saw seq N has seen everything before it.
    CREATE TABLE changes (
        seq     BIGSERIAL PRIMARY KEY,
        host_id TEXT NOT NULL,
        kind    TEXT NOT NULL,    -- issued | revoked | expired | decided
        subject TEXT NOT NULL     -- the grant or request id
    );
    "#,
    // 2: approvals of requests that need several (JSON array of model::Approval).
    r#"
    ALTER TABLE requests ADD COLUMN approvals TEXT;
    "#,
    // 3: the approvals a request was filed under (JSON model::Needs), when more than one.
    r#"
    ALTER TABLE requests ADD COLUMN needs TEXT;
    "#,
    // 4: bearer tokens of the console's HTTP API (a SHA-256 of the secret, never the secret),
    // fleet-wide.
    r#"
    CREATE TABLE api_tokens (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        user_name   TEXT NOT NULL,
        read_only   BOOLEAN NOT NULL,
        issued_by   TEXT NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL,
        revoked_at  BIGINT,
        hash        TEXT NOT NULL
    );
    CREATE INDEX api_tokens_user ON api_tokens (user_name, created_at);
    "#,
    // 5: per host and local spool, the last spooled record shipped: written in the
    // transaction that ships, so a host that crashes before clearing its spool skips what
    // is already here (shipping is exactly once).
    r#"
    CREATE TABLE spool_shipped (
        host_id  TEXT NOT NULL,
        spool_id TEXT NOT NULL,
        seq      BIGINT NOT NULL,
        PRIMARY KEY (host_id, spool_id)
    );
    "#,
    // 6 (fleet audit verification): each record's Ed25519 signature by its host (NULL for
    // records sealed before hosts signed), and each host's public key with the first record
    // it signed, signed with that key (store/audit/sign.rs).
    r#"
    ALTER TABLE audit ADD COLUMN sig TEXT;
    CREATE TABLE audit_hosts (
        host_id       TEXT PRIMARY KEY,
        public_key    TEXT NOT NULL,   -- hex Ed25519
        signed_from   BIGINT NOT NULL, -- the first seq signed with this key
        sig           TEXT NOT NULL,   -- hex, over (host_id, public_key, signed_from)
        registered_at BIGINT NOT NULL
    );
    "#,
    // 7: each fire-and-forget audit record's id (spool.rs `AuditRecord::id`), unique per host,
    // so a record stored by a batch whose answer was lost is not chained again when shipped.
    r#"
    ALTER TABLE audit ADD COLUMN record_id TEXT;
    CREATE UNIQUE INDEX audit_record_id ON audit (host_id, record_id) WHERE record_id IS NOT NULL;
    "#,
    // 8 (host scopes, grants/scope.rs): where a grant may be used (`fleet` or host entries
    // joined by `,`), and the scope a request was filed for. Nullable so that hosts not yet
    // upgraded keep writing; a grant without one reads as scoped to its request's host.
    r#"
    ALTER TABLE grants ADD COLUMN hosts TEXT;
    ALTER TABLE requests ADD COLUMN hosts TEXT;
    "#,
    // 9 (change-log pruning, prune.rs): when each change was logged, by the server's clock
    // (hosts not yet upgraded leave it to the default; rows logged before this migration read
    // as logged now), and how far the log has been cut from the front: every change at or
    // below `through` may be gone, so a host that read less than that must reload whole.
    r#"
    ALTER TABLE changes ADD COLUMN at TIMESTAMPTZ NOT NULL DEFAULT now();
    CREATE TABLE changes_pruned (
        id      INT PRIMARY KEY CHECK (id = 1),
        through BIGINT NOT NULL
    );
    INSERT INTO changes_pruned (id, through) VALUES (1, 0);
    "#,
    // 10 (spool identity, spools.rs): each host's current local spool, registered when the
    // host first reaches the store with it; `retired_at` set when an operator retired it
    // with every record shipped. A host that comes back with another spool while its
    // current one was not retired has lost what that spool held past its shipped mark.
    r#"
    CREATE TABLE host_spools (
        host_id       TEXT PRIMARY KEY,
        spool_id      TEXT NOT NULL,
        registered_at BIGINT NOT NULL,
        retired_at    BIGINT
    );
    CREATE INDEX host_spools_spool ON host_spools (spool_id);
    "#,
];

/// Applies the migrations this agent knows that the database lacks. Safe when many agents
/// call it at once.
pub async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS jitgate_schema (version INT NOT NULL)")
        .await?;
    let version: i32 = tx
        .query_opt("SELECT version FROM jitgate_schema", &[])
        .await?
        .map_or(0, |r| r.get(0));
    if version > LATEST {
        // Dropping the transaction rolls it back (and releases the lock).
        return Err(StoreError::Invalid(format!(
            "the shared state store has schema version {version}, newer than this jitgated knows ({LATEST}); upgrade jitgated on this host"
        )));
    }
    for sql in MIGRATIONS.iter().skip(version.max(0) as usize) {
        tx.batch_execute(sql).await?;
    }
    if version == 0 {
        tx.execute(
            "INSERT INTO jitgate_schema (version) VALUES ($1)",
            &[&LATEST],
        )
        .await?;
    } else if version < LATEST {
        tx.execute("UPDATE jitgate_schema SET version = $1", &[&LATEST])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The version this agent migrates to.
pub const LATEST: i32 = MIGRATIONS.len() as i32;
