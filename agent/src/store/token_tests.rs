//! API tokens in every backend (kept apart from `tests.rs`: nothing else touches them).

use std::time::Duration;

use super::{MemoryStore, SqliteStore, Store};
use crate::model::{ApiToken, Timestamp};

fn token(id: &str, user: &str, at: i64) -> ApiToken {
    ApiToken {
        id: id.into(),
        name: "ci".into(),
        user: user.into(),
        read_only: true,
        issued_by: "user root".into(),
        created_at: Timestamp(at),
        expires_at: Timestamp(at).plus(Duration::from_secs(3600)),
        revoked_at: None,
        hash: format!("hash-of-{id}"),
    }
}

pub(crate) async fn api_tokens(store: &dyn Store) {
    let now = Timestamp::now().millis();
    store
        .insert_api_token(token("tok_a", "alice", now), "user alice".into())
        .await
        .unwrap();
    store
        .insert_api_token(token("tok_b", "bob", now + 1), "user root".into())
        .await
        .unwrap();
    store
        .insert_api_token(token("tok_c", "alice", now + 2), "user alice".into())
        .await
        .unwrap();
    // The same id twice is refused (the primary key).
    assert!(
        store
            .insert_api_token(token("tok_a", "alice", now), "user alice".into())
            .await
            .is_err()
    );
    let a = store.api_token("tok_a".into()).await.unwrap().unwrap();
    assert_eq!(a.hash, "hash-of-tok_a", "the hash comes back for checking");
    assert!(a.read_only && a.user == "alice" && a.issued_by == "user root");
    assert_eq!(a.expires_at, Timestamp(now).plus(Duration::from_secs(3600)));
    assert!(store.api_token("tok_x".into()).await.unwrap().is_none());

    let ids = |v: Vec<ApiToken>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.api_tokens(None, 10).await.unwrap()),
        ["tok_c", "tok_b", "tok_a"]
    );
    assert_eq!(
        ids(store.api_tokens(Some("alice".into()), 10).await.unwrap()),
        ["tok_c", "tok_a"]
    );
    assert_eq!(ids(store.api_tokens(None, 1).await.unwrap()), ["tok_c"]);

    assert!(
        store
            .revoke_api_token("tok_a".into(), "user alice".into())
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_token("tok_a".into(), "user alice".into())
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_api_token("tok_x".into(), "user alice".into())
            .await
            .unwrap()
    );
    let a = store.api_token("tok_a".into()).await.unwrap().unwrap();
    assert!(a.revoked_at.is_some() && !a.live(Timestamp::now()));

    let log = store.audit_log(None, 100).await.unwrap();
    let kinds: Vec<&str> = log.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "token.issued",
            "token.issued",
            "token.issued",
            "token.revoked"
        ],
        "one record each, none for a refused insert or a second revocation"
    );
    assert_eq!(log[3].detail["token"], "tok_a");
    assert!(!serde_json::to_string(&log).unwrap().contains("hash-of-"));
    assert!(store.verify_audit().await.unwrap().ok);
}

#[tokio::test]
async fn memory_store_keeps_tokens() {
    api_tokens(&MemoryStore::default()).await;
}

#[tokio::test]
async fn sqlite_store_keeps_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    api_tokens(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_tokens() {
    use super::{PostgresStore, postgres::testdb::TestDb};
    let Some(pg) = TestDb::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = PostgresStore::open(
        &pg.options(&pg.database("tokens"), "host-a"),
        &dir.path().join("state"),
    )
    .await
    .unwrap();
    api_tokens(&store).await;
}
