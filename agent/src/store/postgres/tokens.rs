//! The rows of the console API's tokens (`api_tokens`, migration 4): kept apart from the
//! other queries, since nothing else reads them. Tokens are fleet-wide: one issued on any
//! host of a shared store works at every host's console, as the same unix user name.

use tokio_postgres::{GenericClient, Row};

use crate::{
    model::{ApiToken, Timestamp},
    store::Result,
};

const COLUMNS: &str =
    "id, name, user_name, read_only, issued_by, created_at, expires_at, revoked_at, hash";

fn token_of(r: &Row) -> Result<ApiToken> {
    Ok(ApiToken {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        user: r.try_get(2)?,
        read_only: r.try_get(3)?,
        issued_by: r.try_get(4)?,
        created_at: Timestamp(r.try_get(5)?),
        expires_at: Timestamp(r.try_get(6)?),
        revoked_at: r.try_get::<_, Option<i64>>(7)?.map(Timestamp),
        hash: r.try_get(8)?,
    })
}

pub async fn insert(db: &impl GenericClient, t: &ApiToken) -> Result<()> {
    db.execute(
        &format!("INSERT INTO api_tokens ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"),
        &[
            &t.id,
            &t.name,
            &t.user,
            &t.read_only,
            &t.issued_by,
            &t.created_at.millis(),
            &t.expires_at.millis(),
            &t.revoked_at.map(Timestamp::millis),
            &t.hash,
        ],
    )
    .await?;
    Ok(())
}

pub async fn get(db: &impl GenericClient, id: &str) -> Result<Option<ApiToken>> {
    db.query_opt(
        &format!("SELECT {COLUMNS} FROM api_tokens WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(token_of)
    .transpose()
}

pub async fn list(
    db: &impl GenericClient,
    user: Option<&str>,
    limit: usize,
) -> Result<Vec<ApiToken>> {
    db.query(
        &format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE $1::TEXT IS NULL OR user_name = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2"
        ),
        &[&user, &i64::try_from(limit).unwrap_or(i64::MAX)],
    )
    .await?
    .iter()
    .map(token_of)
    .collect()
}

pub async fn revoke(db: &impl GenericClient, id: &str, at: Timestamp) -> Result<bool> {
    let changed = db
        .execute(
            "UPDATE api_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&id, &at.millis()],
        )
        .await?;
    Ok(changed == 1)
}
