//! The rows of the console API's tokens (`api_tokens`, migration 6): kept apart from the
//! other queries, since nothing else reads them.

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use crate::{
    model::{ApiToken, Timestamp},
    store::Result,
};

const COLUMNS: &str =
    "id, name, user_name, read_only, issued_by, created_at, expires_at, revoked_at, hash";

fn token_of(r: &Row<'_>) -> rusqlite::Result<ApiToken> {
    Ok(ApiToken {
        id: r.get(0)?,
        name: r.get(1)?,
        user: r.get(2)?,
        read_only: r.get(3)?,
        issued_by: r.get(4)?,
        created_at: Timestamp(r.get(5)?),
        expires_at: Timestamp(r.get(6)?),
        revoked_at: r.get::<_, Option<i64>>(7)?.map(Timestamp),
        hash: r.get(8)?,
    })
}

pub fn insert(db: &Connection, t: &ApiToken) -> Result<()> {
    db.execute(
        &format!("INSERT INTO api_tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            t.id,
            t.name,
            t.user,
            t.read_only,
            t.issued_by,
            t.created_at.millis(),
            t.expires_at.millis(),
            t.revoked_at.map(Timestamp::millis),
            t.hash,
        ],
    )?;
    Ok(())
}

pub fn get(db: &Connection, id: &str) -> Result<Option<ApiToken>> {
    Ok(db
        .query_row(
            &format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"),
            [id],
            token_of,
        )
        .optional()?)
}

pub fn list(db: &Connection, user: Option<&str>, limit: usize) -> Result<Vec<ApiToken>> {
    let mut stmt = db.prepare(&format!(
        "SELECT {COLUMNS} FROM api_tokens WHERE ?1 IS NULL OR user_name = ?1 \
         ORDER BY created_at DESC, id DESC LIMIT ?2"
    ))?;
    let rows = stmt.query_map(
        params![user, i64::try_from(limit).unwrap_or(i64::MAX)],
        token_of,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub fn revoke(db: &Connection, id: &str, at: Timestamp) -> Result<bool> {
    let changed = db.execute(
        "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, at.millis()],
    )?;
    Ok(changed == 1)
}
