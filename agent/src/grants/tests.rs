//! The grant engine over the in-memory store: filing, deciding, revoking, expiring.

use std::{path::Path, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{
    EngineError, GrantEngine, GrantState, RequestSpec,
    scope::{HostScope, HostsSpec},
};
use crate::{
    config::{Access, Config, SharedConfig},
    identity::{Attribution, Caller},
    model::RequestStatus,
    store::{MemoryStore, SharedStore, Store as _},
};

/// Launcher 4100, approver 4200, bystander 4300 (numeric principals match without passwd).
const CONFIG: &str = r#"
[daemon]
state_dir = "/tmp/jg-engine-test"
egress = "deny"

[[workload]]
identity = "ci-bot"
launchers = ["4100"]

[[resource]]
name = "orders-db"
protocol = "tcp"
address = "10.0.0.5:5432"

[[resource]]
name = "cache"
protocol = "tcp"
address = "10.0.0.6:6379"

[[policy]]
name = "dba-approves"
identities = ["ci-bot"]
resources = ["orders-db"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["4200"]

[[policy]]
name = "cache-auto"
identities = ["ci-bot"]
resources = ["cache"]
access = ["read"]
max_ttl = "10m"
approval = "auto"
"#;

struct Harness {
    store: Arc<MemoryStore>,
    engine: GrantEngine,
    shutdown: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn harness() -> Harness {
    let store = Arc::new(MemoryStore::default());
    let config = Config::from_toml(Path::new("test.toml"), CONFIG).unwrap();
    let shutdown = CancellationToken::new();
    let shared: SharedStore = store.clone();
    let engine = GrantEngine::start(shared, SharedConfig::new(config), shutdown.clone())
        .await
        .unwrap();
    Harness {
        store,
        engine,
        shutdown,
    }
}

fn user(uid: u32) -> Caller {
    Caller {
        uid,
        pid: 1,
        user: uid.to_string(),
        workload: None,
        gated_unattributed: false,
        person: None,
        token: None,
    }
}

fn workload(task: Option<&str>) -> Caller {
    Caller {
        uid: 1000,
        pid: 2,
        user: "ci".into(),
        workload: Some(Attribution {
            identity: "ci-bot".into(),
            task: task.map(str::to_owned),
        }),
        gated_unattributed: false,
        person: None,
        token: None,
    }
}

fn spec(resource: &str) -> RequestSpec {
    RequestSpec {
        resource: resource.into(),
        access: Some(Access::Read),
        ttl: None,
        reason: "deploy".into(),
        for_identity: None,
        task: None,
        hosts: None,
    }
}

/// Files `spec` as `caller` would through the control service (which decides who may; see
/// `control/service_tests.rs`): a workload for itself, anyone else for `for_identity`.
async fn file(
    engine: &GrantEngine,
    caller: &Caller,
    spec: RequestSpec,
) -> Result<crate::model::Request, EngineError> {
    let (identity, task) = match &caller.workload {
        Some(w) => (w.identity.clone(), w.task.clone()),
        None => (
            spec.for_identity.clone().unwrap_or_default(),
            spec.task.clone(),
        ),
    };
    engine
        .file(caller.actor(), &identity, task.as_deref(), spec)
        .await
}

async fn kinds(store: &MemoryStore) -> Vec<String> {
    store
        .audit_log(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

#[tokio::test]
async fn a_manual_request_is_joined_approved_and_used() {
    let h = harness().await;
    let q = file(&h.engine, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    assert_eq!(q.status, RequestStatus::Pending);
    let again = file(&h.engine, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    assert_eq!(again.id, q.id, "asking again joins the pending request");
    assert!(
        h.engine
            .find("ci-bot", None, "orders-db", Access::Read)
            .is_none()
    );

    // Who may approve is the control service's decision (control/service_tests.rs).
    let too_long = h
        .engine
        .approve(
            &user(4200),
            h.engine.pending(&q.id).await.unwrap(),
            Some(Duration::from_secs(7200)),
        )
        .await;
    assert!(matches!(too_long, Err(EngineError::Invalid(_))));

    let approved = h
        .engine
        .approve(&user(4200), h.engine.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    assert_eq!(approved.request.status, RequestStatus::Approved);
    let grant = approved.grant.unwrap();
    assert_eq!(approved.request.grant.as_deref(), Some(grant.id.as_str()));
    let handle = h
        .engine
        .find("ci-bot", None, "orders-db", Access::Read)
        .unwrap();
    assert_eq!(handle.id, grant.id);
    assert!(
        h.engine
            .find("ci-bot", None, "orders-db", Access::Write)
            .is_none()
    );
    assert_eq!(h.engine.live_count(), 1);

    let twice = h.engine.pending(&q.id).await;
    assert!(matches!(twice, Err(EngineError::Conflict(m)) if m.contains("already approved")));
    assert_eq!(
        kinds(&h.store).await,
        ["request.filed", "request.approved", "grant.issued"]
    );
}

#[tokio::test]
async fn an_auto_policy_issues_at_once_and_a_refusal_is_audited() {
    let h = harness().await;
    let q = file(&h.engine, &workload(None), spec("cache"))
        .await
        .unwrap();
    assert_eq!(q.status, RequestStatus::Approved);
    assert!(
        h.engine
            .find("ci-bot", None, "cache", Access::Read)
            .is_some()
    );
    let log = h.store.audit_log(None, 100).await.unwrap();
    assert_eq!(log[1].kind, "grant.issued");
    assert_eq!(log[1].actor, "policy cache-auto");

    let mut write = spec("cache");
    write.access = Some(Access::Write);
    let refused = file(&h.engine, &workload(None), write).await;
    assert!(matches!(refused, Err(EngineError::Refused(_))));
    assert_eq!(
        kinds(&h.store).await,
        ["request.filed", "grant.issued", "request.refused"]
    );
    assert_eq!(
        h.store.audit_log(None, 100).await.unwrap()[2].actor,
        "workload ci-bot (user ci)"
    );
}

#[tokio::test]
async fn deny_wakes_the_waiter_and_ends_the_request() {
    let h = harness().await;
    let q = file(&h.engine, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    let waiter = {
        let engine = h.engine.clone();
        let id = q.id.clone();
        tokio::spawn(async move { engine.wait(&id, Duration::from_secs(10)).await })
    };
    tokio::task::yield_now().await;
    let denied = h
        .engine
        .deny(
            &user(4200),
            h.engine.pending(&q.id).await.unwrap(),
            Some("not now".into()),
        )
        .await
        .unwrap();
    assert_eq!(denied.status, RequestStatus::Denied);
    let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.status, RequestStatus::Denied);
    let late = h.engine.pending(&q.id).await;
    assert!(matches!(late, Err(EngineError::Conflict(m)) if m.contains("already denied")));
}

#[tokio::test]
async fn revocation_and_expiry_end_sessions_riding_on_the_grant() {
    let h = harness().await;
    file(&h.engine, &workload(None), spec("cache"))
        .await
        .unwrap();
    let mut handle = h
        .engine
        .find("ci-bot", None, "cache", Access::Read)
        .unwrap();
    let revoked = h
        .engine
        .revoke(
            &user(0),
            h.engine.live_grant(&handle.id).await.unwrap(),
            Some("done".into()),
        )
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some());
    handle.state.changed().await.unwrap();
    assert_eq!(*handle.state.borrow(), GrantState::Revoked);
    assert_eq!(h.engine.live_count(), 0);
    let again = h.engine.live_grant(&handle.id).await;
    assert!(matches!(again, Err(EngineError::Conflict(m)) if m.contains("already revoked")));

    let mut short = spec("cache");
    short.ttl = Some(Duration::from_millis(300));
    file(&h.engine, &workload(None), short).await.unwrap();
    let mut handle = h
        .engine
        .find("ci-bot", None, "cache", Access::Read)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), handle.state.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*handle.state.borrow(), GrantState::Expired);
    let kinds = kinds(&h.store).await;
    assert!(kinds.contains(&"grant.revoked".to_owned()));
    assert_eq!(kinds.last().map(String::as_str), Some("grant.expired"));
}

#[tokio::test]
async fn live_grants_are_restored_and_a_task_end_lapses_its_requests() {
    let h = harness().await;
    file(&h.engine, &workload(None), spec("cache"))
        .await
        .unwrap();
    let q = file(&h.engine, &workload(Some("t-1")), spec("orders-db"))
        .await
        .unwrap();
    assert_eq!(q.task.as_deref(), Some("t-1"));

    let config = Config::from_toml(Path::new("test.toml"), CONFIG).unwrap();
    let shared: SharedStore = h.store.clone();
    let restarted = GrantEngine::start(shared, SharedConfig::new(config), h.shutdown.clone())
        .await
        .unwrap();
    assert_eq!(restarted.live_count(), 1);

    h.engine.task_ended("t-1").await.unwrap();
    let lapsed = h.engine.request(&q.id).await.unwrap().unwrap();
    assert_eq!(lapsed.status, RequestStatus::Expired);
    assert_eq!(lapsed.decision_reason.as_deref(), Some("task t-1 ended"));
    assert!(!h.engine.lapse(&q.id, "late").await.unwrap());
    assert!(h.engine.approvals().await.unwrap().is_empty());
}

/// In a fleet, hosts may run different policies for a while: a request filed where two
/// approvals were needed is not decided with one where the policy asks one.
#[tokio::test]
async fn a_request_keeps_the_approvals_it_was_filed_under() {
    let strict = CONFIG.replace(
        "approvers = [\"4200\"]",
        "approvers = [\"4200\", \"4201\"]\napprovals = 2",
    );
    let lax = CONFIG.replace("approvers = [\"4200\"]", "approvers = [\"4200\", \"4201\"]");
    let store = Arc::new(MemoryStore::default());
    let shared: SharedStore = store.clone();
    let shutdown = CancellationToken::new();
    let filing = GrantEngine::start(
        shared.clone(),
        SharedConfig::new(Config::from_toml(Path::new("a.toml"), &strict).unwrap()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let q = file(&filing, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    assert_eq!(q.needs.as_ref().map(|n| n.approvals), Some(2));
    // Another host (same store) whose policy asks one approval.
    let deciding = GrantEngine::start(
        shared,
        SharedConfig::new(Config::from_toml(Path::new("b.toml"), &lax).unwrap()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let first = deciding
        .approve(&user(4200), deciding.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    assert!(
        first.grant.is_none(),
        "one approval of the two it was filed under"
    );
    assert_eq!(first.request.status, RequestStatus::Pending);
    let second = deciding
        .approve(&user(4201), deciding.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    assert!(second.grant.is_some());
    // Filed where one approval is enough: nothing kept, one decides.
    let q = file(&deciding, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    assert!(q.needs.is_none());
    shutdown.cancel();
}

/// A held statement is the high-impact action a policy of several approvers protects: it
/// runs only with the last approval, not the first.
#[tokio::test]
async fn a_held_statement_waits_for_every_approval_its_policy_asks() {
    let text = CONFIG.replace(
        "approvers = [\"4200\"]",
        "approvers = [\"4200\", \"4201\"]\napprovals = 2",
    );
    let store = Arc::new(MemoryStore::default());
    let config = Config::from_toml(Path::new("test.toml"), &text).unwrap();
    let shutdown = CancellationToken::new();
    let shared: SharedStore = store.clone();
    let engine = GrantEngine::start(shared, SharedConfig::new(config), shutdown.clone())
        .await
        .unwrap();
    let held = engine
        .file_statement(
            &crate::identity::Attribution {
                identity: "ci-bot".into(),
                task: None,
            },
            1000,
            "orders-db",
            Access::Read,
            "ses_1",
            "DELETE FROM orders",
            "deletes",
            "a delete",
        )
        .await
        .unwrap();
    let first = engine
        .approve(&user(4200), engine.pending(&held.id).await.unwrap(), None)
        .await
        .unwrap();
    assert_eq!(first.request.status, RequestStatus::Pending, "one of two");
    assert_eq!(first.request.approvals.len(), 1);
    let again = engine
        .approve(&user(4200), engine.pending(&held.id).await.unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&again, EngineError::Conflict(m) if m.contains("already approved")),
        "{again:?}"
    );
    let second = engine
        .approve(&user(4201), engine.pending(&held.id).await.unwrap(), None)
        .await
        .unwrap();
    assert_eq!(second.request.status, RequestStatus::Approved);
    assert!(second.grant.is_none(), "a statement runs; no grant");
    let kinds = kinds(&store).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.as_str() == "request.approval")
            .count(),
        2
    );
    assert!(kinds.ends_with(&["statement.approved".into()]), "{kinds:?}");
    shutdown.cancel();
}

/// A policy that needs two approvers, one of them from a named principal: the first approval
/// is recorded and issues nothing; the same person again is refused; a second approver who
/// is not the named one still leaves it pending; the named one issues the grant, naming all.
#[tokio::test]
async fn several_approvers_from_different_people() {
    let text = CONFIG.replace(
        "approvers = [\"4200\"]",
        "approvers = [\"4200\", \"4201\", \"4202\"]\napprovals = 2\napprovals_from = [\"4202\"]",
    );
    let store = Arc::new(MemoryStore::default());
    let config = Config::from_toml(Path::new("test.toml"), &text).unwrap();
    let shutdown = CancellationToken::new();
    let shared: SharedStore = store.clone();
    let engine = GrantEngine::start(shared, SharedConfig::new(config), shutdown.clone())
        .await
        .unwrap();
    let q = file(&engine, &workload(None), spec("orders-db"))
        .await
        .unwrap();
    // The first approver agrees to ten minutes only; the others to the request's duration.
    let first = engine
        .approve(
            &user(4200),
            engine.pending(&q.id).await.unwrap(),
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert!(first.grant.is_none());
    assert_eq!(first.request.status, RequestStatus::Pending);
    assert_eq!(first.request.approvals.len(), 1);
    assert!(
        engine
            .find("ci-bot", None, "orders-db", Access::Read)
            .is_none()
    );
    // The same person twice counts once: refused.
    let again = engine
        .approve(&user(4200), engine.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&again, EngineError::Conflict(m) if m.contains("already approved")),
        "{again:?}"
    );
    // Two people, but not the one `approvals_from` names: still pending.
    let second = engine
        .approve(&user(4201), engine.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    assert!(second.grant.is_none(), "4202 has not approved");
    assert_eq!(second.request.approvals.len(), 2);
    let last = engine
        .approve(&user(4202), engine.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    let grant = last.grant.expect("the grant, with the last approval");
    assert_eq!(grant.approved_by, "4200, 4201, 4202");
    // Not the last approver's duration: the shortest any approver agreed to.
    let lasts = grant.expires_at.0 - grant.created_at.0;
    assert!(
        (599_000..=601_000).contains(&lasts),
        "the grant lasts {lasts} ms, not the first approver's ten minutes"
    );
    assert!(
        engine
            .find("ci-bot", None, "orders-db", Access::Read)
            .is_some()
    );
    let kinds = kinds(&store).await;
    assert_eq!(
        kinds
            .iter()
            .filter(|k| k.as_str() == "request.approval")
            .count(),
        3
    );
    assert!(
        kinds.ends_with(&["request.approved".into(), "grant.issued".into()]),
        "{kinds:?}"
    );
    shutdown.cancel();
}

// ---------------------------------------------------------------------------------------------
// Host scopes: two engines sharing one store are two hosts of a fleet.

/// A fleet host's config: `db` policies as `db_hosts` says (`""`: the default).
fn fleet_config(host: &str, db_hosts: &str) -> Config {
    let text = format!(
        r#"
[daemon]
state_dir = "/tmp/jg-engine-test"
egress = "deny"

[store]
backend = "postgres"
url = "postgresql://jg@db.test/jitgate"
sslmode = "disable"
host_id = "{host}"

[[workload]]
identity = "ci-bot"
launchers = ["4100"]

[[resource]]
name = "orders-db"
protocol = "tcp"
address = "10.0.0.5:5432"

[[resource]]
name = "cache"
protocol = "tcp"
address = "10.0.0.6:6379"

[[resource]]
name = "web"
protocol = "tcp"
address = "10.0.0.7:443"

[[policy]]
name = "dba-approves"
identities = ["ci-bot"]
resources = ["orders-db"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["4200"]
{db_hosts}

[[policy]]
name = "cache-fleet"
identities = ["ci-bot"]
resources = ["cache"]
access = ["read"]
max_ttl = "10m"
approval = "auto"
hosts = "fleet"

[[policy]]
name = "web-some"
identities = ["ci-bot"]
resources = ["web"]
access = ["read"]
max_ttl = "10m"
approval = "auto"
hosts = ["host-a", "ci-*"]
"#
    );
    Config::from_toml(Path::new("fleet.toml"), &text).unwrap()
}

async fn fleet_engine(
    store: &Arc<MemoryStore>,
    config: Config,
    shutdown: &CancellationToken,
) -> GrantEngine {
    let shared: SharedStore = store.clone();
    GrantEngine::start(shared, SharedConfig::new(config), shutdown.clone())
        .await
        .unwrap()
}

/// Hostile: the store stops keeping writes (a full disk). Live sessions end as unrecorded,
/// nothing new gets in while it fails, nor in the moment after it recovers before the live
/// set is reloaded; then the same grant is usable again (it was never revoked).
#[tokio::test]
async fn a_store_that_stops_keeping_writes_ends_sessions_until_it_keeps_them_again() {
    let h = harness().await;
    file(&h.engine, &workload(None), spec("cache"))
        .await
        .unwrap();
    let mut handle = h
        .engine
        .find("ci-bot", None, "cache", Access::Read)
        .unwrap();
    assert!(h.engine.store_available().is_ok());
    h.store.writes.failed("database or disk is full");
    let why = h
        .engine
        .store_available()
        .expect_err("closed while failing");
    assert!(why.contains("cannot keep records"), "{why}");
    assert!(why.contains("database or disk is full"), "{why}");
    tokio::time::timeout(Duration::from_secs(5), handle.state.changed())
        .await
        .expect("the session is told within a sweep")
        .unwrap();
    assert_eq!(*handle.state.borrow(), GrantState::Unrecorded);
    assert_eq!(h.engine.live_count(), 0);
    assert!(
        h.engine
            .find("ci-bot", None, "cache", Access::Read)
            .is_none()
    );
    let filed = file(&h.engine, &workload(Some("t-2")), spec("cache")).await;
    assert!(
        matches!(&filed, Err(EngineError::Store(e)) if e.to_string().contains("cannot keep records")),
        "{filed:?}"
    );
    // Recovered: refused until the live set is reloaded, then the grant is back.
    h.store.writes.kept();
    assert!(h.engine.store_available().is_err(), "not reloaded yet");
    assert!(
        eventually(|| h.engine.store_available().is_ok()).await,
        "reopens once reloaded"
    );
    let again = h
        .engine
        .find("ci-bot", None, "cache", Access::Read)
        .expect("the grant is live again");
    assert_eq!(again.id, handle.id);
    assert_eq!(*again.state.borrow(), GrantState::Active);
    // Hostile: a failure that clears before the engine looks (a lock held past the busy
    // timeout, a moment's ENOSPC) still cuts: records were lost.
    let mut again = again;
    h.store.writes.failed("database is locked");
    h.store.writes.kept();
    tokio::time::timeout(Duration::from_secs(5), again.state.changed())
        .await
        .expect("cut though the failure already cleared")
        .unwrap();
    assert_eq!(*again.state.borrow(), GrantState::Unrecorded);
    assert!(
        eventually(|| h.engine.store_available().is_ok()).await,
        "reopens"
    );
    let again = h
        .engine
        .find("ci-bot", None, "cache", Access::Read)
        .expect("the grant is live again");
    // A store far behind on its records: refused first, then live sessions cut too.
    let mut again = again;
    let behind = crate::store::health::BACKLOG_REFUSE + 1;
    h.store.writes.queued(behind);
    assert!(h.engine.store_available().is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*again.state.borrow(), GrantState::Active, "not cut yet");
    let more = crate::store::health::BACKLOG_CUT;
    h.store.writes.queued(more);
    tokio::time::timeout(Duration::from_secs(5), again.state.changed())
        .await
        .expect("cut within a sweep")
        .unwrap();
    assert_eq!(*again.state.borrow(), GrantState::Unrecorded);
    h.store.writes.done(behind + more);
    assert!(
        eventually(|| h.engine.store_available().is_ok()).await,
        "reopens once caught up"
    );
}

/// Waits (briefly) until `cond` holds: other hosts hear of grants through the store's
/// change feed, on their own task.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

fn scope(entries: &[&str]) -> HostScope {
    HostScope::Hosts(entries.iter().map(|e| (*e).to_owned()).collect())
}

#[tokio::test]
async fn a_grant_is_scoped_to_the_requesting_host_and_refused_elsewhere() {
    let store = Arc::new(MemoryStore::default());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let a = fleet_engine(&store, fleet_config("host-a", ""), &shutdown).await;
    let b = fleet_engine(&store, fleet_config("host-b", ""), &shutdown).await;

    // Filed on A, approved on B: the grant is A's, as A's request says.
    let q = file(&a, &workload(None), spec("orders-db")).await.unwrap();
    assert_eq!(q.host.as_deref(), Some("host-a"));
    assert_eq!(q.hosts, Some(scope(&["host-a"])));
    let approved = b
        .approve(&user(4200), b.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap();
    let grant = approved.grant.unwrap();
    assert_eq!(grant.hosts, scope(&["host-a"]));

    assert!(
        eventually(|| a.find("ci-bot", None, "orders-db", Access::Read).is_some()).await,
        "the requesting host uses it"
    );
    // B approved it and heard of it, yet never lets a session ride on it; a refusal there
    // names it.
    assert!(b.find("ci-bot", None, "orders-db", Access::Read).is_none());
    assert_eq!(b.live_count(), 0, "not in B's live set");
    let named = b
        .scoped_elsewhere("ci-bot", None, "orders-db", Access::Read)
        .unwrap();
    assert_eq!(named.id, grant.id);
    assert!(
        a.scoped_elsewhere("ci-bot", None, "orders-db", Access::Read)
            .is_none()
    );
    // Listed on both hosts with its scope.
    let listed = b.grants(false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].hosts, scope(&["host-a"]));

    // A host that starts later loads it as another host's, not as its own.
    let c = fleet_engine(&store, fleet_config("host-b", ""), &shutdown).await;
    assert!(c.find("ci-bot", None, "orders-db", Access::Read).is_none());
    assert!(
        c.scoped_elsewhere("ci-bot", None, "orders-db", Access::Read)
            .is_some()
    );

    // The audit record of the grant says where it may be used.
    let issued = store
        .audit_log(None, 100)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "grant.issued")
        .unwrap();
    assert_eq!(
        issued.detail["hosts"],
        serde_json::json!(["host-a"]),
        "{}",
        issued.detail
    );

    // B may revoke it (revocation works fleet-wide); A's sessions end.
    let live = b.live_grant(&grant.id).await.unwrap();
    let state = a
        .find("ci-bot", None, "orders-db", Access::Read)
        .unwrap()
        .state;
    b.revoke(&user(4200), live, None).await.unwrap();
    assert!(eventually(|| *state.borrow() == GrantState::Revoked).await);
    assert!(
        eventually(|| b
            .scoped_elsewhere("ci-bot", None, "orders-db", Access::Read)
            .is_none())
        .await
    );
}

#[tokio::test]
async fn fleet_and_listed_scopes_reach_the_hosts_they_name() {
    let store = Arc::new(MemoryStore::default());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let a = fleet_engine(&store, fleet_config("host-a", ""), &shutdown).await;
    let b = fleet_engine(&store, fleet_config("host-b", ""), &shutdown).await;
    let ci = fleet_engine(&store, fleet_config("ci-7", ""), &shutdown).await;

    let q = file(&a, &workload(None), spec("cache")).await.unwrap();
    assert_eq!(q.status, RequestStatus::Approved);
    assert!(eventually(|| b.find("ci-bot", None, "cache", Access::Read).is_some()).await);
    assert!(a.find("ci-bot", None, "cache", Access::Read).is_some());

    // hosts = ["host-a", "ci-*"], filed on B: usable on A and ci-7, not on B itself.
    let q = file(&b, &workload(None), spec("web")).await.unwrap();
    assert_eq!(q.hosts, Some(scope(&["host-a", "ci-*"])));
    assert!(eventually(|| a.find("ci-bot", None, "web", Access::Read).is_some()).await);
    assert!(eventually(|| ci.find("ci-bot", None, "web", Access::Read).is_some()).await);
    assert!(b.find("ci-bot", None, "web", Access::Read).is_none());
}

#[tokio::test]
async fn a_request_may_narrow_its_scope_never_widen_it() {
    let store = Arc::new(MemoryStore::default());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let a = fleet_engine(&store, fleet_config("host-a", ""), &shutdown).await;
    let ask = |resource: &str, hosts: &str| RequestSpec {
        hosts: Some(HostsSpec::parse(hosts).unwrap()),
        ..spec(resource)
    };

    // Wider than "requesting": refused, and the refusal is audited.
    for wider in ["fleet", "host-b", "host-a,host-b", "host-*"] {
        let Err(EngineError::Refused(why)) =
            file(&a, &workload(None), ask("orders-db", wider)).await
        else {
            panic!("{wider} was not refused");
        };
        assert!(why.contains("policy dba-approves"), "{why}");
        assert!(why.contains("host-a (this host)"), "{why}");
    }
    assert_eq!(kinds(&store).await, ["request.refused"; 4]);
    // Wider than a list: a shorter prefix, a name outside it.
    for wider in ["c*", "host-b", "fleet"] {
        assert!(
            matches!(
                file(&a, &workload(None), ask("web", wider)).await,
                Err(EngineError::Refused(_))
            ),
            "{wider}"
        );
    }
    // Narrower: granted as asked.
    let q = file(&a, &workload(None), ask("web", "ci-7")).await.unwrap();
    assert_eq!(q.hosts, Some(scope(&["ci-7"])));
    let g = store.grant(q.grant.unwrap()).await.unwrap().unwrap();
    assert_eq!(g.hosts, scope(&["ci-7"]));
    assert!(
        a.find("ci-bot", None, "web", Access::Read).is_none(),
        "narrowed away from A"
    );
    let q = file(&a, &workload(None), ask("cache", "requesting"))
        .await
        .unwrap();
    assert_eq!(q.hosts, Some(scope(&["host-a"])));

    // A task runs on one host: its grant stays there whatever the policy allows.
    let q = file(&a, &workload(Some("t-1")), spec("cache"))
        .await
        .unwrap();
    let g = store.grant(q.grant.unwrap()).await.unwrap().unwrap();
    assert_eq!(g.hosts, scope(&["host-a"]));
}

#[tokio::test]
async fn the_approving_hosts_policy_narrows_never_widens() {
    let store = Arc::new(MemoryStore::default());
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    // Mid-rollout: A's policy scopes db grants to the fleet, B's still to the requesting host.
    let a = fleet_engine(
        &store,
        fleet_config("host-a", "hosts = \"fleet\""),
        &shutdown,
    )
    .await;
    let b = fleet_engine(&store, fleet_config("host-b", ""), &shutdown).await;
    let q = file(&a, &workload(None), spec("orders-db")).await.unwrap();
    assert_eq!(q.hosts, Some(HostScope::Fleet));
    let g = b
        .approve(&user(4200), b.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap()
        .grant
        .unwrap();
    assert_eq!(
        g.hosts,
        scope(&["host-a"]),
        "B's policy, from A's viewpoint"
    );

    // The other way round: filed on B for B only, approved on A (whose policy says fleet):
    // still B only, and not usable on A.
    b.revoke(&user(4200), b.live_grant(&g.id).await.unwrap(), None)
        .await
        .unwrap();
    let q = file(&b, &workload(None), spec("orders-db")).await.unwrap();
    assert_eq!(q.hosts, Some(scope(&["host-b"])));
    let g = a
        .approve(&user(4200), a.pending(&q.id).await.unwrap(), None)
        .await
        .unwrap()
        .grant
        .unwrap();
    assert_eq!(g.hosts, scope(&["host-b"]));
    assert!(a.find("ci-bot", None, "orders-db", Access::Read).is_none());
    assert!(eventually(|| b.find("ci-bot", None, "orders-db", Access::Read).is_some()).await);
}

#[tokio::test]
async fn a_single_host_keeps_working_as_before() {
    let h = harness().await;
    assert_eq!(h.engine.host(), crate::grants::scope::LOCAL_HOST);
    let q = file(&h.engine, &workload(None), spec("cache"))
        .await
        .unwrap();
    let g = h.store.grant(q.grant.unwrap()).await.unwrap().unwrap();
    assert_eq!(g.hosts, scope(&["local"]));
    assert!(
        h.engine
            .find("ci-bot", None, "cache", Access::Read)
            .is_some()
    );
}
