//! Who may make each control call: an operator (root), a workload, an approver, a launcher, a
//! stranger and an unattributed process inside the gate, against the real grant engine over
//! a store in a temporary directory. No root needed: callers are made up, not identified.

use std::{
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    config::{Access, Config},
    identity::Attribution,
    model::{RequestStatus, SessionOutcome},
    store::MemoryStore,
};

const WORKLOAD: u32 = 4100;
const APPROVER: u32 = 4200;
const STRANGER: u32 = 4300;
const LAUNCHER: u32 = 4400;

fn caller(uid: u32, workload: Option<&str>) -> Caller {
    Caller {
        uid,
        pid: 1,
        user: uid.to_string(),
        workload: workload.map(|identity| Attribution {
            identity: identity.to_owned(),
            task: None,
        }),
        gated_unattributed: false,
        person: None,
        token: None,
    }
}

fn operator() -> Caller {
    caller(0, None)
}
fn workload() -> Caller {
    caller(WORKLOAD, Some("ci-bot"))
}
fn other_workload() -> Caller {
    caller(WORKLOAD, Some("other"))
}
fn approver() -> Caller {
    caller(APPROVER, None)
}
fn launcher() -> Caller {
    caller(LAUNCHER, None)
}
fn stranger() -> Caller {
    caller(STRANGER, None)
}
fn unattributed() -> Caller {
    Caller {
        gated_unattributed: true,
        person: None,
        token: None,
        ..caller(STRANGER, None)
    }
}

/// The store under test: the in-memory one (the SQLite store passes the same suite in
/// `store/tests.rs`).
fn open_store(_dir: &Path) -> SharedStore {
    Arc::new(MemoryStore::default())
}

fn config(state_dir: &Path) -> Config {
    Config::from_toml(
        Path::new("t.toml"),
        &format!(
            r#"
[daemon]
state_dir = "{}"
[[workload]]
identity = "ci-bot"
launchers = ["{LAUNCHER}", "daemon"]
[[workload]]
identity = "other"
launchers = ["0"]
[[resource]]
name = "db"
address = "10.0.0.5:5432"
[[policy]]
name = "db-read"
identities = ["ci-bot", "other"]
resources = ["db"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["{APPROVER}", "oidc:ann@example.com", "oidc-group:dba", "daemon"]
"#,
            state_dir.display()
        ),
    )
    .expect("test config")
}

/// Counts launches; the task itself is not started (that needs cgroups).
#[derive(Default)]
struct FakeLauncher(AtomicUsize);

impl TaskLauncher for FakeLauncher {
    fn launch<'a>(
        &'a self,
        _: &'a Caller,
        _: RunSpec,
    ) -> BoxFuture<'a, Result<Started, EngineError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(EngineError::Invalid("launched".into())) })
    }
}

/// Session `ses_live` is open with 7 bytes up and 9 down.
struct FakeCounts;

impl SessionCounts for FakeCounts {
    fn bytes(&self, id: &str) -> Option<(u64, u64)> {
        (id == "ses_live").then_some((7, 9))
    }
}

struct FakeHost;

impl Host for FakeHost {
    fn status<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, StatusReport> {
        Box::pin(async move {
            StatusReport {
                version: String::new(),
                pid: 0,
                started_at: Timestamp(0),
                config: String::new(),
                gate_cgroup: String::new(),
                pin_dir: String::new(),
                attached: Vec::new(),
                problems: Vec::new(),
                egress: String::new(),
                proxy_listen: Vec::new(),
                destination_prefixes: 0,
                kernel_counters: std::collections::BTreeMap::new(),
                live_grants: 0,
                pending_requests: 0,
                open_sessions: 0,
                resources: Vec::new(),
                identities: Vec::new(),
                caller: caller.actor().to_string(),
                store: None,
                store_writes: None,
                store_backlog: 0,
            }
        })
    }

    fn reload(&self) -> BoxFuture<'_, anyhow::Result<ReloadSummary>> {
        Box::pin(async {
            Ok(ReloadSummary {
                config: "t.toml".into(),
                grants_revoked: Vec::new(),
                resources: Vec::new(),
                restart_required_for: Vec::new(),
                sessions_ended: 0,
            })
        })
    }

    fn detach(&self) -> anyhow::Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
}

struct Fixture {
    service: ControlService,
    config: SharedConfig,
    engine: GrantEngine,
    store: SharedStore,
    launches: Arc<FakeLauncher>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SharedConfig::new(config(dir.path()));
    let store = open_store(dir.path());
    let shutdown = CancellationToken::new();
    let engine = GrantEngine::start(store.clone(), config.clone(), shutdown.clone())
        .await
        .expect("grant engine");
    let launches = Arc::new(FakeLauncher::default());
    let service = ControlService::new(Parts {
        config: config.clone(),
        engine: engine.clone(),
        store: store.clone(),
        tasks: launches.clone(),
        sessions: Arc::new(FakeCounts),
        host: Arc::new(FakeHost),
    });
    Fixture {
        service,
        config,
        engine,
        store,
        launches,
        shutdown,
        _dir: dir,
    }
}

fn ask(identity: Option<&str>) -> RequestSpec {
    RequestSpec {
        resource: "db".into(),
        access: Some(Access::Read),
        ttl: None,
        reason: "test".into(),
        for_identity: identity.map(str::to_owned),
        task: None,
        hosts: None,
    }
}

fn forbidden<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Err(ControlError::Forbidden(message)) => message,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

impl Fixture {
    /// A pending request for `identity`, filed by root.
    async fn pending(&self, identity: &str) -> Request {
        let q = self
            .service
            .request(&operator(), ask(Some(identity)))
            .await
            .expect("filing");
        assert_eq!(q.status, RequestStatus::Pending);
        q
    }

    /// A live grant for `identity`, approved by the approver.
    async fn grant(&self, identity: &str) -> Grant {
        let q = self.pending(identity).await;
        self.service
            .approve(&approver(), &q.id, None)
            .await
            .expect("approving")
            .grant
            .expect("a grant")
    }
}

#[tokio::test]
async fn status_is_for_everyone() {
    let f = fixture().await;
    for c in [
        operator(),
        workload(),
        approver(),
        stranger(),
        unattributed(),
    ] {
        let report = f.service.status(&c).await.unwrap();
        assert_eq!(report.caller, c.actor().to_string());
    }
}

#[tokio::test]
async fn request_for_whom() {
    let f = fixture().await;
    let q = f.service.request(&workload(), ask(None)).await.unwrap();
    assert_eq!(q.identity, "ci-bot");
    assert_eq!(q.requested_by.uid, WORKLOAD);
    let again = f
        .service
        .request(&workload(), ask(Some("ci-bot")))
        .await
        .unwrap();
    assert_eq!(again.id, q.id, "asking again joins the pending request");
    forbidden(f.service.request(&workload(), ask(Some("other"))).await);
    forbidden(f.service.request(&unattributed(), ask(None)).await);

    assert!(
        f.service
            .request(&operator(), ask(Some("ci-bot")))
            .await
            .is_ok()
    );
    assert!(matches!(
        f.service.request(&operator(), ask(None)).await,
        Err(ControlError::Invalid(_))
    ));
    assert!(matches!(
        f.service.request(&stranger(), ask(Some("nobody"))).await,
        Err(ControlError::NotFound(_))
    ));
    assert!(
        f.service
            .request(&launcher(), ask(Some("ci-bot")))
            .await
            .is_ok()
    );
    forbidden(f.service.request(&launcher(), ask(Some("other"))).await);
    let m = forbidden(f.service.request(&approver(), ask(Some("ci-bot"))).await);
    assert!(m.contains("only root and its launchers may"), "{m}");
    forbidden(f.service.request(&stranger(), ask(Some("ci-bot"))).await);
}

#[tokio::test]
async fn approve_is_for_the_policy_approvers() {
    let f = fixture().await;
    let q = f.pending("ci-bot").await;
    for c in [
        operator(),
        workload(),
        launcher(),
        stranger(),
        unattributed(),
    ] {
        forbidden(f.service.approve(&c, &q.id, None).await);
    }
    let approved = f.service.approve(&approver(), &q.id, None).await.unwrap();
    assert_eq!(approved.request.status, RequestStatus::Approved);
    assert!(approved.grant.is_some());
    // Decided or missing is said before any refusal.
    assert!(matches!(
        f.service.approve(&stranger(), &q.id, None).await,
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        f.service.approve(&stranger(), "req_missing", None).await,
        Err(ControlError::NotFound(_))
    ));
}

#[tokio::test]
async fn no_self_approval() {
    let f = fixture().await;
    // The approver's uid, running as the workload, files a request...
    let inside = caller(APPROVER, Some("ci-bot"));
    let q = f.service.request(&inside, ask(None)).await.unwrap();
    // ...which the same uid outside the gate may not approve.
    let m = forbidden(f.service.approve(&approver(), &q.id, None).await);
    assert!(m.contains("self-approval is refused"), "{m}");
}

#[tokio::test]
async fn no_self_approval_from_another_host() {
    let f = fixture().await;
    // The approver, on another host of the fleet under another uid, files a request...
    let mut elsewhere = caller(4242, Some("ci-bot"));
    elsewhere.user = approver().user;
    let q = f.service.request(&elsewhere, ask(None)).await.unwrap();
    // ...which they may not approve here either, under their uid here.
    let m = forbidden(f.service.approve(&approver(), &q.id, None).await);
    assert!(m.contains("self-approval is refused"), "{m}");
}

#[tokio::test]
async fn deny_is_for_approvers_and_the_requester() {
    let f = fixture().await;
    let own = f.service.request(&workload(), ask(None)).await.unwrap();
    forbidden(f.service.deny(&other_workload(), &own.id, None).await);
    forbidden(f.service.deny(&stranger(), &own.id, None).await);
    let withdrawn = f.service.deny(&workload(), &own.id, None).await.unwrap();
    assert_eq!(withdrawn.status, RequestStatus::Denied);

    // Tasks of one identity and uid: a sibling does not withdraw another's request, nor
    // does the identity outside any task; the task itself does.
    let in_task = |task: &str| Caller {
        workload: Some(Attribution {
            identity: "ci-bot".into(),
            task: Some(task.into()),
        }),
        ..workload()
    };
    let a = f.service.request(&in_task("t-a"), ask(None)).await.unwrap();
    forbidden(f.service.deny(&in_task("t-b"), &a.id, None).await);
    forbidden(f.service.deny(&workload(), &a.id, None).await);
    assert!(f.service.deny(&in_task("t-a"), &a.id, None).await.is_ok());

    let q = f.pending("ci-bot").await;
    for c in [workload(), launcher(), stranger(), unattributed()] {
        forbidden(f.service.deny(&c, &q.id, Some("no".into())).await);
    }
    // Root filed it: root withdraws it.
    assert!(f.service.deny(&operator(), &q.id, None).await.is_ok());
    let q = f.pending("other").await;
    let denied = f.service.deny(&approver(), &q.id, None).await.unwrap();
    assert_eq!(denied.status, RequestStatus::Denied);
}

#[tokio::test]
async fn grants_are_listed_to_all_but_workloads_see_their_own() {
    let f = fixture().await;
    let mine = f.grant("ci-bot").await;
    let theirs = f.grant("other").await;
    let ids = |grants: Vec<Grant>| grants.into_iter().map(|g| g.id).collect::<Vec<_>>();
    for c in [operator(), approver(), stranger()] {
        let seen = ids(f.service.grants(&c, false).await.unwrap());
        assert!(seen.contains(&mine.id) && seen.contains(&theirs.id));
    }
    assert_eq!(
        ids(f.service.grants(&workload(), true).await.unwrap()),
        [mine.id]
    );
    assert!(
        f.service
            .grants(&unattributed(), false)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn revoke_is_for_root_approvers_launchers_and_the_workload_itself() {
    let f = fixture().await;
    let g = f.grant("ci-bot").await;
    for c in [other_workload(), stranger(), unattributed()] {
        forbidden(f.service.revoke(&c, &g.id, None).await);
    }
    for c in [operator(), approver(), launcher(), workload()] {
        let g = f.grant("ci-bot").await;
        let revoked = f.service.revoke(&c, &g.id, None).await.unwrap();
        assert!(revoked.revoked_at.is_some());
    }
    // The identity's launchers only: the launcher of ci-bot may not revoke other's.
    let g = f.grant("other").await;
    forbidden(f.service.revoke(&launcher(), &g.id, None).await);
    f.service.revoke(&operator(), &g.id, None).await.unwrap();
    assert!(matches!(
        f.service.revoke(&stranger(), &g.id, None).await,
        Err(ControlError::Conflict(_))
    ));
}

#[tokio::test]
async fn approvals_are_for_operators_and_their_own_workload() {
    let f = fixture().await;
    let mine = f.pending("ci-bot").await;
    let theirs = f.pending("other").await;
    for c in [operator(), approver()] {
        assert_eq!(f.service.approvals(&c).await.unwrap().len(), 2);
    }
    let own = f.service.approvals(&workload()).await.unwrap();
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].id, mine.id);
    assert_ne!(own[0].id, theirs.id);
    assert!(
        f.service
            .approvals(&unattributed())
            .await
            .unwrap()
            .is_empty()
    );
    for c in [stranger(), launcher()] {
        forbidden(f.service.approvals(&c).await);
    }
}

#[tokio::test]
async fn waiting_and_held_statements() {
    let f = fixture().await;
    let held = f
        .engine
        .file_statement(
            &Attribution {
                identity: "ci-bot".into(),
                task: None,
            },
            WORKLOAD,
            "db",
            Access::Read,
            "ses_1",
            "DELETE FROM orders",
            "deletes",
            "a delete",
        )
        .await
        .unwrap();
    let wait = |c: Caller| {
        let (service, id) = (f.service.clone(), held.id.clone());
        async move { service.wait(&c, &id, Duration::ZERO).await }
    };
    forbidden(wait(other_workload()).await);
    forbidden(wait(unattributed()).await);
    for c in [workload(), operator(), approver()] {
        let q = wait(c).await.unwrap();
        assert_eq!(q.statement.as_deref(), Some("DELETE FROM orders"));
    }
    for c in [stranger(), launcher()] {
        assert_eq!(wait(c).await.unwrap().statement, None);
    }
    assert!(matches!(
        f.service
            .wait(&stranger(), "req_missing", Duration::ZERO)
            .await,
        Err(ControlError::NotFound(_))
    ));
}

fn session(id: &str, identity: Option<&str>) -> Session {
    Session {
        id: id.into(),
        identity: identity.map(str::to_owned),
        task: None,
        pid: 1,
        uid: WORKLOAD,
        command: String::new(),
        resource: Some("db".into()),
        grant: None,
        destination: "10.0.0.5:5432".into(),
        started_at: Timestamp::now(),
        ended_at: None,
        bytes_up: 0,
        bytes_down: 0,
        outcome: SessionOutcome::Open,
        detail: String::new(),
        database: None,
        access: None,
    }
}

#[tokio::test]
async fn sessions_are_for_operators_and_their_own_workload() {
    let f = fixture().await;
    let records = [
        session("ses_live", Some("ci-bot")),
        session("ses_other", Some("other")),
        session("ses_nobody", None),
    ];
    for s in records {
        f.store.session_opened(s);
    }
    f.store.flush().await.unwrap();
    let ids = |sessions: Vec<Session>| {
        let mut ids: Vec<String> = sessions.into_iter().map(|s| s.id).collect();
        ids.sort();
        ids
    };
    for c in [operator(), approver()] {
        assert_eq!(f.service.sessions(&c, true, 100).await.unwrap().len(), 3);
    }
    assert_eq!(
        ids(f.service.sessions(&workload(), true, 100).await.unwrap()),
        ["ses_live"]
    );
    // As before the service existed: a process inside the gate with no identity sees the
    // sessions recorded without one.
    assert_eq!(
        ids(f
            .service
            .sessions(&unattributed(), true, 100)
            .await
            .unwrap()),
        ["ses_nobody"]
    );
    for c in [stranger(), launcher()] {
        forbidden(f.service.sessions(&c, true, 100).await);
    }

    let detail = f.service.session(&workload(), "ses_live", 0).await.unwrap();
    assert_eq!((detail.session.bytes_up, detail.session.bytes_down), (7, 9));
    assert!(f.service.session(&operator(), "ses_other", 0).await.is_ok());
    assert!(
        f.service
            .session(&approver(), "ses_nobody", 0)
            .await
            .is_ok()
    );
    let m = forbidden(f.service.session(&workload(), "ses_other", 0).await);
    assert_eq!(m, "a workload can only see its own sessions");
    forbidden(f.service.session(&stranger(), "ses_live", 0).await);
    assert!(matches!(
        f.service.session(&stranger(), "ses_missing", 0).await,
        Err(ControlError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_audit_log_is_for_operators() {
    let f = fixture().await;
    for c in [operator(), approver()] {
        f.service.audit(&c, None, 10).await.unwrap();
        assert!(f.service.audit_verify(&c).await.unwrap().ok);
    }
    let m = forbidden(f.service.audit(&workload(), None, 10).await);
    assert_eq!(m, "a gated workload cannot read the audit log");
    let m = forbidden(f.service.audit_verify(&workload()).await);
    assert_eq!(m, "a gated workload cannot verify the audit log");
    for c in [stranger(), launcher()] {
        let m = forbidden(f.service.audit(&c, None, 10).await);
        assert!(
            m.starts_with(
                "only root, members of the socket's group and approvers can read the audit log"
            ),
            "{m}"
        );
        forbidden(f.service.audit_verify(&c).await);
    }
}

/// `audit verify --fleet` on a host without a shared store: a clear error, not an empty
/// "ok" (and still operators only).
#[tokio::test]
async fn fleet_verification_needs_a_shared_store() {
    let f = fixture().await;
    let e = f.service.audit_verify_fleet(&operator()).await.unwrap_err();
    assert!(
        e.to_string().contains("backend = \"postgres\"")
            && e.to_string().contains("use `jitgate audit verify`"),
        "{e}"
    );
    forbidden(f.service.audit_verify_fleet(&workload()).await);
    forbidden(f.service.audit_verify_fleet(&stranger()).await);
}

fn run_spec(identity: &str, run_as_uid: u32, allow_root: bool) -> RunSpec {
    RunSpec {
        identity: identity.into(),
        run_as_uid,
        allow_root,
        grants: Vec::new(),
        reason: String::new(),
        command: vec!["true".into()],
    }
}

#[tokio::test]
async fn tasks_are_for_launchers() {
    let f = fixture().await;
    let launched = || f.launches.0.load(Ordering::SeqCst);
    forbidden(
        f.service
            .run(
                &caller(LAUNCHER, Some("ci-bot")),
                run_spec("ci-bot", LAUNCHER, false),
            )
            .await,
    );
    forbidden(
        f.service
            .run(&stranger(), run_spec("ci-bot", STRANGER, false))
            .await,
    );
    forbidden(
        f.service
            .run(&approver(), run_spec("ci-bot", APPROVER, false))
            .await,
    );
    // Root is no launcher of ci-bot.
    forbidden(
        f.service
            .run(&operator(), run_spec("ci-bot", LAUNCHER, false))
            .await,
    );
    forbidden(
        f.service
            .run(&launcher(), run_spec("ci-bot", STRANGER, false))
            .await,
    );
    assert!(matches!(
        f.service
            .run(&launcher(), run_spec("nobody", LAUNCHER, false))
            .await,
        Err(ControlError::NotFound(_))
    ));
    // Root launches "other", as root only when it says so.
    forbidden(
        f.service
            .run(&operator(), run_spec("other", 0, false))
            .await,
    );
    assert_eq!(launched(), 0);
    let _ = f.service.run(&operator(), run_spec("other", 0, true)).await;
    let _ = f
        .service
        .run(&operator(), run_spec("other", STRANGER, false))
        .await;
    let _ = f
        .service
        .run(&launcher(), run_spec("ci-bot", LAUNCHER, false))
        .await;
    assert_eq!(launched(), 3);
}

#[tokio::test]
async fn reload_and_detach_are_for_root() {
    let f = fixture().await;
    f.service.reload(&operator()).await.unwrap();
    f.service.detach(&operator()).unwrap();
    for c in [
        approver(),
        stranger(),
        caller(0, Some("ci-bot")),
        unattributed(),
    ] {
        let m = forbidden(f.service.reload(&c).await);
        assert_eq!(
            m,
            "only root (outside the gate) can reload the configuration"
        );
        forbidden(f.service.detach(&c));
    }
}

/// The reload summary's JSON (the reply and the `config.reloaded` audit record) is what the
/// agent wrote before it was typed.
#[test]
fn reload_summary_json_is_unchanged() {
    let summary = ReloadSummary {
        config: "/etc/jitgate/jitgate.toml".into(),
        grants_revoked: vec!["grt_1".into()],
        resources: vec!["db".into()],
        restart_required_for: vec!["socket".into()],
        sessions_ended: 2,
    };
    let before = serde_json::json!({
        "config": "/etc/jitgate/jitgate.toml",
        "resources": ["db"],
        "sessions_ended": 2,
        "grants_revoked": ["grt_1"],
        "restart_required_for": ["socket"],
    });
    let after = serde_json::to_value(&summary).unwrap();
    assert_eq!(after, before);
    assert_eq!(after.to_string(), before.to_string());
}

fn person(id: &str, groups: &[&str], unix_uid: Option<u32>) -> Caller {
    Caller::web(crate::identity::Person {
        id: id.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        unix_uid,
        unix_account: unix_uid.map(crate::identity::user_name),
        ..Default::default()
    })
}

#[tokio::test]
async fn web_people_decide_only_when_policy_names_them() {
    let f = fixture().await;
    // Named by identity: approves, and the records say who, as the provider signed them in.
    let q = f.pending("ci-bot").await;
    let ann = person("ann@example.com", &[], None);
    assert_eq!(f.service.approvals(&ann).await.unwrap().len(), 1);
    let approved = f.service.approve(&ann, &q.id, None).await.unwrap();
    let decided_by = approved.request.decided_by.unwrap();
    assert_eq!(decided_by.user, "oidc ann@example.com");
    assert_eq!(decided_by.uid, crate::identity::WEB_UID);
    assert_eq!(approved.grant.unwrap().approved_by, "oidc ann@example.com");
    // Named by group: denies.
    let q = f.pending("ci-bot").await;
    let dba = person("bob@example.com", &["dba"], None);
    let denied = f
        .service
        .deny(&dba, &q.id, Some("not now".into()))
        .await
        .unwrap();
    assert_eq!(denied.status, RequestStatus::Denied);

    // Not named: nothing at all, not even a listing. Hostile look-alikes: a person whose
    // identity is a unix approver's name, or who claims a unix group's name.
    let g = f.grant("ci-bot").await;
    let q = f.pending("ci-bot").await;
    for c in [
        person("eve@example.com", &["devs"], None),
        person(&APPROVER.to_string(), &[], None),
        person("root", &["root", "group:dba", "oidc-group:dba"], Some(0)),
        person("ANN@example.com", &[], None),
    ] {
        forbidden(f.service.approve(&c, &q.id, None).await);
        forbidden(f.service.deny(&c, &q.id, None).await);
        forbidden(f.service.revoke(&c, &g.id, None).await);
        forbidden(f.service.approvals(&c).await);
        forbidden(f.service.grants(&c, false).await);
        forbidden(f.service.audit(&c, None, 10).await);
        forbidden(f.service.reload(&c).await);
    }
    // A named approver may revoke and list, but never launch or file for a workload.
    assert!(
        f.service
            .grants(&ann, false)
            .await
            .unwrap()
            .iter()
            .any(|x| x.id == g.id)
    );
    assert!(f.service.revoke(&ann, &g.id, None).await.is_ok());
    forbidden(f.service.request(&ann, ask(Some("ci-bot"))).await);
    forbidden(
        f.service
            .run(&ann, run_spec("ci-bot", crate::identity::WEB_UID, false))
            .await,
    );
}

#[tokio::test]
async fn web_people_cannot_approve_what_their_unix_account_filed() {
    let f = fixture().await;
    // LAUNCHER files for ci-bot; ann's unix account here is LAUNCHER.
    let q = f
        .service
        .request(&launcher(), ask(Some("ci-bot")))
        .await
        .unwrap();
    let ann_here = person("ann@example.com", &[], Some(LAUNCHER));
    let m = forbidden(f.service.approve(&ann_here, &q.id, None).await);
    assert!(m.contains("self-approval is refused"), "{m}");
    forbidden(f.service.deny(&ann_here, &q.id, None).await);
    // Another named person may.
    let dba = person("bob@example.com", &["dba"], None);
    assert!(f.service.approve(&dba, &q.id, None).await.is_ok());
}

#[tokio::test]
async fn web_people_without_a_mapping_cannot_approve_what_their_namesake_filed() {
    let f = fixture().await;
    let q = f
        .service
        .request(&launcher(), ask(Some("ci-bot")))
        .await
        .unwrap();
    // No unix_accounts entry, but the address's local part is the filer's name (any case).
    let filer = launcher().user;
    for id in [
        format!("{filer}@example.com"),
        format!("{}@corp.example", filer.to_uppercase()),
        format!("{filer}+approvals@example.com"),
    ] {
        let unmapped = person(&id, &["dba"], None);
        let m = forbidden(f.service.approve(&unmapped, &q.id, None).await);
        assert!(m.contains("self-approval is refused"), "{id}: {m}");
    }
    // Someone else of the same group still may.
    let other = person(&format!("not-{filer}@example.com"), &["dba"], None);
    assert!(f.service.approve(&other, &q.id, None).await.is_ok());
}

fn recorded(session: &str, seq: u32, text: &str) -> crate::model::StatementRecord {
    crate::model::StatementRecord {
        session: session.into(),
        seq,
        at: Timestamp::now(),
        text: text.into(),
        params: vec![],
        decision: crate::model::Decision::Allowed,
        rule: None,
        approved_by: None,
        held_ms: 0,
        duration_ms: None,
        rows: None,
        tag: None,
        error: None,
        masked: 0,
    }
}

#[tokio::test]
async fn web_people_see_the_sessions_of_what_they_approve() {
    let f = fixture().await;
    // The one policy: ci-bot and other, read access to db; ann and group dba approve it.
    let with = |id: &str, identity: Option<&str>, resource: &str, access: Option<Access>| Session {
        resource: Some(resource.into()),
        access,
        ..session(id, identity)
    };
    for s in [
        with("ses_read", Some("ci-bot"), "db", Some(Access::Read)),
        with("ses_write", Some("ci-bot"), "db", Some(Access::Write)),
        with("ses_elsewhere", Some("ci-bot"), "cache", Some(Access::Read)),
        with("ses_unknown_level", Some("other"), "db", None),
        session("ses_nobody", None),
    ] {
        f.store.session_opened(s);
    }
    f.store.record_statements(vec![
        recorded("ses_read", 1, "GET /api/v1/pods [recorded: /etc/shadow]"),
        recorded("ses_read", 2, "POST /api/v1/namespaces/x/pods/p/exec"),
        recorded(
            "ses_read",
            3,
            "POST /api/v1/namespaces/x/pods/p/exec [recorded: x]",
        ),
    ]);
    f.store.flush().await.unwrap();
    let ids = |sessions: Vec<Session>| {
        let mut ids: Vec<String> = sessions.into_iter().map(|s| s.id).collect();
        ids.sort();
        ids
    };
    let ann = person("ann@example.com", &[], None);
    let dba = person("bob@example.com", &["dba"], None);
    for c in [&ann, &dba] {
        assert_eq!(
            ids(f.service.sessions(c, true, 100).await.unwrap()),
            ["ses_read", "ses_unknown_level"]
        );
        assert!(f.service.session(c, "ses_read", 0).await.is_ok());
        for other in ["ses_write", "ses_elsewhere", "ses_nobody"] {
            let m = forbidden(f.service.session(c, other, 0).await);
            assert!(m.contains("not an approver"), "{m}");
        }
        assert!(f.service.status(c).await.is_ok());
    }
    // Local operators still see every session.
    for c in [operator(), approver()] {
        assert_eq!(f.service.sessions(&c, true, 100).await.unwrap().len(), 5);
    }
    // Signed in but named nowhere (and look-alikes): no session, no status.
    for c in [
        person("eve@example.com", &["devs"], None),
        person(&APPROVER.to_string(), &[], None),
        person("ANN@example.com", &[], None),
    ] {
        forbidden(f.service.sessions(&c, true, 100).await);
        forbidden(f.service.session(&c, "ses_read", 0).await);
        forbidden(f.service.status(&c).await);
        forbidden(f.service.recording(&c, "ses_read", 3).await);
    }

    // Recordings: found by session and sequence, never by the text a workload wrote.
    let dir = f._dir.path().join("recordings");
    std::fs::create_dir_all(&dir).unwrap();
    let cast = "{\"version\":2,\"title\":\"exec sh\"}\n[0.5,\"o\",\"hello\\r\\n\"]\n";
    for name in ["ses_read-3.cast", "ses_read-2.cast", "ses_write-1.cast"] {
        std::fs::write(dir.join(name), cast).unwrap();
    }
    let detail = f.service.session(&ann, "ses_read", 0).await.unwrap();
    assert_eq!(
        detail.recordings,
        [3],
        "seq 1 names another file, seq 2 was not recorded"
    );
    let r = f.service.recording(&ann, "ses_read", 3).await.unwrap();
    assert_eq!(r.events[0].data, "hello\r\n");
    assert!(matches!(
        f.service.recording(&ann, "ses_read", 1).await,
        Err(ControlError::NotFound(_))
    ));
    forbidden(f.service.recording(&ann, "ses_write", 1).await);
    assert!(matches!(
        f.service.recording(&ann, "../../etc/passwd", 1).await,
        Err(ControlError::NotFound(_))
    ));
    assert!(
        f.service
            .recording(&operator(), "ses_write", 1)
            .await
            .is_ok()
    );
    forbidden(f.service.recording(&other_workload(), "ses_read", 3).await);
}

// -- API tokens of the console's HTTP API ---------------------------------------------------

/// A unix user of this machine by name (tokens resolve their user by name at each use).
fn unix(name: &str) -> Caller {
    let uid = crate::identity::uid_of(name).expect("a user every Debian system has");
    Caller {
        user: name.into(),
        ..caller(uid, None)
    }
}

fn issue(read_only: bool) -> super::super::tokens::TokenSpec {
    super::super::tokens::TokenSpec {
        name: Some("ci".into()),
        read_only,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_token_acts_as_its_user_within_its_limits() {
    use super::super::tokens::TokenError;
    let f = fixture().await;
    let daemon = unix("daemon");
    let issued = f.service.token_issue(&daemon, issue(false)).await.unwrap();
    assert_eq!(issued.token.user, "daemon");
    assert!(issued.secret.starts_with("jgt_"));
    assert!(issued.token.expires_at > Timestamp::now().plus(Duration::from_secs(29 * 86_400)));
    let by_token = f.service.authenticate_token(&issued.secret).await.unwrap();
    assert_eq!(by_token.uid, daemon.uid);
    assert!(!by_token.is_root());

    // It approves as its user would, and the records name the person and the token.
    let q = f.pending("ci-bot").await;
    let approved = f.service.approve(&by_token, &q.id, None).await.unwrap();
    let grant = approved.grant.expect("a grant");
    let label = format!("daemon (token {})", issued.token.id);
    assert_eq!(grant.approved_by, label);
    let log = f.store.audit_log(None, 1000).await.unwrap();
    assert!(
        log.iter()
            .any(|e| e.kind == "request.approved" && e.actor == format!("user {label}")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|e| e.kind == "token.issued" && e.detail["token"] == issued.token.id.as_str())
    );
    let text = serde_json::to_string(&log).unwrap();
    assert!(
        !text.contains(&issued.secret),
        "the secret is never recorded"
    );
    assert!(!text.contains(&issued.token.hash), "nor its hash");

    // Its user's own request: self-approval is refused through a token too.
    let own = f
        .service
        .request(&daemon, ask(Some("ci-bot")))
        .await
        .unwrap();
    let m = forbidden(f.service.approve(&by_token, &own.id, None).await);
    assert!(m.contains("self-approval"), "{m}");

    // A read-only token reads but changes nothing.
    let ro = f.service.token_issue(&daemon, issue(true)).await.unwrap();
    let ro = f.service.authenticate_token(&ro.secret).await.unwrap();
    assert_eq!(f.service.approvals(&ro).await.unwrap().len(), 1);
    let other = f.pending("other").await;
    let m = forbidden(f.service.approve(&ro, &other.id, None).await);
    assert!(m.contains("read-only"), "{m}");
    forbidden(f.service.deny(&ro, &other.id, None).await);
    forbidden(f.service.revoke(&ro, &grant.id, None).await);
    assert!(f.service.grants(&ro, false).await.is_ok());

    // Rights are the user's as policy gives them now: dropped from the approvers, refused.
    let mut changed = (*f.config.get()).clone();
    for p in &mut changed.policies {
        p.approvers
            .retain(|a| !matches!(a, crate::config::Principal::User(u) if u == "daemon"));
    }
    f.config.set(changed);
    let m = forbidden(f.service.approve(&by_token, &other.id, None).await);
    assert!(m.contains("not an approver"), "{m}");

    // Tampered, unknown and misshapen secrets are all just invalid.
    let mut tampered = issued.secret.clone();
    tampered.replace_range(tampered.len() - 5..tampered.len() - 4, "Q");
    let tampered = if tampered == issued.secret {
        issued.secret.clone() + "x"
    } else {
        tampered
    };
    for bad in [
        tampered.as_str(),
        "jgt_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "",
        "Bearer",
    ] {
        assert_eq!(
            f.service.authenticate_token(bad).await.unwrap_err(),
            TokenError::Invalid,
            "{bad}"
        );
    }

    // Revocation is immediate.
    f.service
        .token_revoke(&daemon, &issued.token.id)
        .await
        .unwrap();
    assert_eq!(
        f.service
            .authenticate_token(&issued.secret)
            .await
            .unwrap_err(),
        TokenError::Revoked(issued.token.id.clone())
    );

    // Expired: refused, and said so only to the holder of the right secret.
    let secret = "jgt_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let mut old = issued.token.clone();
    old.id = "tok_0123456789ab".into();
    old.hash = super::super::tokens::hash(secret);
    old.revoked_at = None;
    old.expires_at = Timestamp(Timestamp::now().millis() - 1);
    f.store
        .insert_api_token(old, "user daemon".into())
        .await
        .unwrap();
    assert_eq!(
        f.service.authenticate_token(secret).await.unwrap_err(),
        TokenError::Expired("tok_0123456789ab".into())
    );
    let wrong = "jgt_0123456789ab_BAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_eq!(
        f.service.authenticate_token(wrong).await.unwrap_err(),
        TokenError::Invalid
    );
}

#[tokio::test]
async fn who_may_issue_list_and_revoke_tokens() {
    let f = fixture().await;
    let (daemon, bin) = (unix("daemon"), unix("bin"));
    // Not from inside the gate, not by a person of the console, not with a token.
    forbidden(f.service.token_issue(&workload(), issue(false)).await);
    forbidden(
        f.service
            .token_issue(&person("ann@example.com", &[], None), issue(false))
            .await,
    );
    let t = f.service.token_issue(&daemon, issue(false)).await.unwrap();
    let by_token = f.service.authenticate_token(&t.secret).await.unwrap();
    forbidden(f.service.token_issue(&by_token, issue(false)).await);
    forbidden(f.service.token_list(&by_token).await);
    forbidden(f.service.token_revoke(&by_token, &t.token.id).await);

    // For someone else: root only; for root: nobody.
    let for_bin = super::super::tokens::TokenSpec {
        user: Some("bin".into()),
        ..issue(false)
    };
    forbidden(f.service.token_issue(&daemon, for_bin.clone()).await);
    let root = Caller {
        user: "root".into(),
        ..operator()
    };
    let bins = f.service.token_issue(&root, for_bin).await.unwrap();
    assert_eq!(bins.token.user, "bin");
    assert_eq!(bins.token.issued_by, "user root");
    let m = forbidden(f.service.token_issue(&root, issue(false)).await);
    assert!(m.contains("root"), "{m}");
    let ghost = super::super::tokens::TokenSpec {
        user: Some("no-such-user-here".into()),
        ..issue(false)
    };
    assert!(matches!(
        f.service.token_issue(&root, ghost).await,
        Err(ControlError::NotFound(_))
    ));

    // Expiry is mandatory and bounded.
    for ttl in [0, 91 * 86_400] {
        let spec = super::super::tokens::TokenSpec {
            ttl_secs: Some(ttl),
            ..issue(false)
        };
        assert!(matches!(
            f.service.token_issue(&daemon, spec).await,
            Err(ControlError::Invalid(_))
        ));
    }

    // Each sees their own; root every one.
    let mine = f.service.token_list(&daemon).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(f.service.token_list(&bin).await.unwrap().len(), 1);
    assert_eq!(f.service.token_list(&root).await.unwrap().len(), 2);

    // Only the user and root revoke; twice is a conflict.
    forbidden(f.service.token_revoke(&bin, &t.token.id).await);
    f.service.token_revoke(&bin, &bins.token.id).await.unwrap();
    f.service.token_revoke(&root, &t.token.id).await.unwrap();
    assert!(matches!(
        f.service.token_revoke(&daemon, &t.token.id).await,
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        f.service.token_revoke(&daemon, "tok_nope").await,
        Err(ControlError::NotFound(_))
    ));
}

/// A person signed in at `auth_time` (seconds ago) with `acr`.
fn signed_in(id: &str, ago: Option<u64>, acr: Option<&str>) -> Caller {
    let now = u64::try_from(Timestamp::now().millis() / 1000).unwrap();
    Caller::web(crate::identity::Person {
        id: id.into(),
        auth_time: ago.map(|a| now - a),
        acr: acr.map(str::to_owned),
        ..Default::default()
    })
}

/// A policy that asks for a recent, strong sign-in: approvals only from people of the
/// console whose sign-in shows both, never the CLI or a token; denying needs neither; what
/// the request was filed under holds after the host's policy is relaxed.
#[tokio::test]
async fn step_up_approvals_need_a_fresh_strong_sign_in() {
    let f = fixture().await;
    let mut strict = (*f.config.get()).clone();
    strict.policies[0].step_up = crate::config::StepUp {
        max_age_secs: Some(300),
        acr: vec!["urn:example:mfa".into()],
    };
    f.config.set(strict);
    let q = f.pending("ci-bot").await;
    assert_eq!(
        q.needs.as_ref().map(|n| n.step_up.max_age_secs),
        Some(Some(300)),
        "kept on the request"
    );
    let sign_in_again = |r: Result<crate::grants::Approved>| match r {
        Err(ControlError::SignInAgain { message, step_up }) => {
            assert_eq!(step_up.max_age_secs, Some(300));
            assert_eq!(step_up.acr, ["urn:example:mfa"]);
            message
        }
        other => panic!("expected SignInAgain, got {other:?}"),
    };
    // The unix approver at the CLI, and a token of theirs: cannot show a sign-in.
    let m = forbidden(f.service.approve(&approver(), &q.id, None).await);
    assert!(m.contains("web console"), "{m}");
    let mut token = approver();
    token.token = Some(crate::identity::TokenUse {
        id: "tok_1".into(),
        read_only: false,
        account: "approver".into(),
    });
    forbidden(f.service.approve(&token, &q.id, None).await);
    // Signed in without saying when, long ago, or without the second factor.
    let m = sign_in_again(
        f.service
            .approve(
                &signed_in("ann@example.com", None, Some("urn:example:mfa")),
                &q.id,
                None,
            )
            .await,
    );
    assert!(m.contains("did not say when"), "{m}");
    let m = sign_in_again(
        f.service
            .approve(
                &signed_in("ann@example.com", Some(301), Some("urn:example:mfa")),
                &q.id,
                None,
            )
            .await,
    );
    assert!(
        m.contains("301 s ago") && m.contains("within the last 5m"),
        "{m}"
    );
    let m = sign_in_again(
        f.service
            .approve(
                &signed_in("ann@example.com", Some(5), Some("urn:example:pwd")),
                &q.id,
                None,
            )
            .await,
    );
    assert!(
        m.contains("urn:example:pwd") && m.contains("urn:example:mfa"),
        "{m}"
    );
    sign_in_again(
        f.service
            .approve(&signed_in("ann@example.com", Some(5), None), &q.id, None)
            .await,
    );
    // An auth_time far in the future is no proof of a recent sign-in.
    let now = u64::try_from(Timestamp::now().millis() / 1000).unwrap();
    let mut ahead = signed_in("ann@example.com", None, Some("urn:example:mfa"));
    ahead.person.as_mut().unwrap().auth_time = Some(now + 3600);
    sign_in_again(f.service.approve(&ahead, &q.id, None).await);
    // Not an approver at all: refused as such, whatever the sign-in.
    forbidden(
        f.service
            .approve(
                &signed_in("eve@example.com", Some(1), Some("urn:example:mfa")),
                &q.id,
                None,
            )
            .await,
    );
    // Still pending after all that.
    assert_eq!(
        f.engine.pending(&q.id).await.unwrap().status,
        RequestStatus::Pending
    );

    // The host's policy relaxed (a reload, or another host's laxer policy): the request
    // still needs what it was filed under.
    let mut lax = (*f.config.get()).clone();
    lax.policies[0].step_up = crate::config::StepUp::default();
    f.config.set(lax);
    forbidden(f.service.approve(&approver(), &q.id, None).await);
    // A fresh, strong sign-in approves.
    let ok = f
        .service
        .approve(
            &signed_in("ann@example.com", Some(5), Some("urn:example:mfa")),
            &q.id,
            None,
        )
        .await
        .expect("approved");
    assert_eq!(ok.request.status, RequestStatus::Approved);
    // Denying needs no step-up.
    let mut strict = (*f.config.get()).clone();
    strict.policies[0].step_up.max_age_secs = Some(60);
    f.config.set(strict);
    let q = f.pending("ci-bot").await;
    assert_eq!(
        f.service
            .deny(&approver(), &q.id, None)
            .await
            .unwrap()
            .status,
        RequestStatus::Denied
    );
}

/// Two policies cover a request: the shorter age and the common `acr`; none in common can
/// never be met, and says so.
#[test]
fn step_ups_combine_to_the_stricter() {
    use crate::config::{StepUp, UNSATISFIABLE_ACR};
    let a = StepUp {
        max_age_secs: Some(600),
        acr: vec!["mfa".into(), "hwk".into()],
    };
    let b = StepUp {
        max_age_secs: Some(60),
        acr: vec!["hwk".into()],
    };
    assert_eq!(
        a.and(&b),
        StepUp {
            max_age_secs: Some(60),
            acr: vec!["hwk".into()]
        }
    );
    assert_eq!(a.and(&StepUp::default()), a);
    assert_eq!(StepUp::default().and(&b), b);
    let c = StepUp {
        max_age_secs: None,
        acr: vec!["pwd".into()],
    };
    assert_eq!(a.and(&c).acr, [UNSATISFIABLE_ACR]);
    assert!(!crate::config::valid_acr(UNSATISFIABLE_ACR));
}

/// A session that recorded more than one reply may carry is shown a page at a time: each
/// page under the bound (and never empty), the next starting where it stopped, every
/// statement on exactly one page.
#[test]
fn a_long_session_is_shown_in_pages() {
    let big = "x".repeat(60 * 1024);
    let statements: Vec<_> = (1..=1000)
        .map(|seq| recorded("ses_big", seq, &big))
        .collect();
    let mut from = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (page, more) = page_of(statements.clone(), from);
        pages += 1;
        assert!(!page.is_empty());
        let bytes: usize = page.iter().map(|s| s.text.len() + 256).sum();
        assert!(bytes <= SESSION_PAGE_BYTES, "{bytes}");
        seen.extend(page.iter().map(|s| s.seq));
        match more {
            Some(next) => {
                assert_eq!(next, page.last().unwrap().seq + 1);
                from = next;
            }
            None => break,
        }
    }
    assert_eq!(seen, (1..=1000).collect::<Vec<_>>());
    assert!(pages >= 4, "{pages}");
    // One statement larger than a page still shows, alone.
    let huge = vec![recorded("ses_big", 1, &"y".repeat(SESSION_PAGE_BYTES + 1))];
    assert_eq!(page_of(huge, 0).0.len(), 1);
}
