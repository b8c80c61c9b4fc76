//! The behaviour every [`Store`] backend shares, as one suite run against each of them.

use std::time::Duration;

use super::{
    Decided, GrantApproval, GrantChange, MemoryStore, RequestKey, SqliteStore, Store, StoreError,
    audit::{DaemonStarted, Event},
};
use crate::{
    config::Access,
    grants::scope::HostScope,
    model::{
        Actor, Decision, Grant, Request, RequestStatus, Session, SessionOutcome, StatementRecord,
        Task, Timestamp,
    },
};

pub(crate) fn actor(uid: u32, user: &str) -> Actor {
    Actor {
        uid,
        user: user.into(),
        identity: None,
        task: None,
    }
}

pub(crate) fn request(id: &str, task: Option<&str>, statement: Option<&str>) -> Request {
    Request {
        id: id.into(),
        identity: "ci-bot".into(),
        resource: "orders-db".into(),
        access: Access::Read,
        ttl: Duration::from_secs(600),
        reason: "deploy".into(),
        task: task.map(str::to_owned),
        requested_by: actor(1000, "bob"),
        created_at: Timestamp::now(),
        status: RequestStatus::Pending,
        policy: "p".into(),
        decided_by: None,
        decided_at: None,
        decision_reason: None,
        approvals: Vec::new(),
        needs: None,
        grant: None,
        statement: statement.map(str::to_owned),
        session: statement.map(|_| "s-x".to_owned()),
        host: None,
        hosts: None,
    }
}

pub(crate) fn grant(id: &str, q: &Request) -> Grant {
    let now = Timestamp::now();
    Grant {
        id: id.into(),
        request: q.id.clone(),
        identity: q.identity.clone(),
        resource: q.resource.clone(),
        access: q.access,
        task: q.task.clone(),
        created_at: now,
        expires_at: now.plus(q.ttl),
        approved_by: "alice".into(),
        policy: q.policy.clone(),
        reason: q.reason.clone(),
        revoked_at: None,
        revoked_by: None,
        revoke_reason: None,
        hosts: HostScope::Hosts(vec!["host-a".into(), "ci-*".into()]),
    }
}

pub(crate) fn session(id: &str) -> Session {
    Session {
        id: id.into(),
        identity: Some("ci-bot".into()),
        task: None,
        pid: 42,
        uid: 1000,
        command: "psql".into(),
        resource: Some("orders-db".into()),
        grant: Some("grt_1".into()),
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

pub(crate) fn statement(session: &str, seq: u32) -> StatementRecord {
    StatementRecord {
        session: session.into(),
        seq,
        at: Timestamp::now(),
        text: format!("SELECT {seq}"),
        params: vec![Some("x".into()), None],
        decision: Decision::Allowed,
        rule: None,
        approved_by: None,
        held_ms: 0,
        duration_ms: Some(1.5),
        rows: Some(1),
        tag: Some("SELECT 1".into()),
        error: None,
        masked: 0,
    }
}

fn key(task: Option<&str>) -> RequestKey {
    RequestKey {
        identity: "ci-bot".into(),
        task: task.map(str::to_owned),
        resource: "orders-db".into(),
        access: Access::Read,
    }
}

fn done(d: Decided) -> Request {
    match d {
        Decided::Done(q) => *q,
        other => panic!("expected a decision, got {other:?}"),
    }
}

/// Requests: filing, finding the pending one by key, approving, denying, expiring.
pub(crate) async fn requests_and_decisions(store: &dyn Store) {
    let mut changes = store.grant_changes();
    let q = request("req_1", None, None);
    store
        .file_request(q.clone(), "user bob".into())
        .await
        .unwrap();
    assert_eq!(store.count_pending().await.unwrap(), 1);
    let found = store.pending_request(key(None)).await.unwrap().unwrap();
    assert_eq!(found.id, "req_1");
    assert!(
        store
            .pending_request(key(Some("tsk_1")))
            .await
            .unwrap()
            .is_none()
    );
    let held = request("req_held", None, Some("DROP TABLE t"));
    store.file_request(held, "user bob".into()).await.unwrap();
    assert_eq!(
        store.pending_request(key(None)).await.unwrap().unwrap().id,
        "req_1",
        "a held statement is not a request to join"
    );

    let g = grant("grt_1", &q);
    let approval = GrantApproval {
        grant: g.clone(),
        approver: actor(1001, "alice"),
        actor: "user alice".into(),
        ttl_secs: 600,
    };
    let approved = done(store.approve_request(approval.clone()).await.unwrap());
    assert_eq!(approved.status, RequestStatus::Approved);
    assert_eq!(approved.grant.as_deref(), Some("grt_1"));
    assert_eq!(approved.decided_by.unwrap().user, "alice");
    assert!(matches!(
        store.approve_request(approval).await.unwrap(),
        Decided::NotPending
    ));
    assert!(matches!(changes.try_recv(), Ok(GrantChange::Issued(g)) if g.id == "grt_1"));
    assert!(store.pending_request(key(None)).await.unwrap().is_none());

    let approved = done(
        store
            .approve_statement("req_held".into(), actor(1001, "alice"), "user alice".into())
            .await
            .unwrap(),
    );
    assert_eq!(approved.status, RequestStatus::Approved);

    store
        .file_request(request("req_2", None, None), "user bob".into())
        .await
        .unwrap();
    let denied = done(
        store
            .deny_request(
                "req_2".into(),
                actor(1001, "alice"),
                "user alice".into(),
                Some("no".into()),
            )
            .await
            .unwrap(),
    );
    assert_eq!(denied.status, RequestStatus::Denied);
    assert_eq!(denied.decision_reason.as_deref(), Some("no"));
    assert!(matches!(
        store
            .deny_request(
                "req_2".into(),
                actor(1001, "alice"),
                "user alice".into(),
                None
            )
            .await
            .unwrap(),
        Decided::NotPending
    ));

    store
        .file_request(request("req_3", None, None), "user bob".into())
        .await
        .unwrap();
    assert!(
        store
            .expire_request("req_3".into(), "timeout".into())
            .await
            .unwrap()
    );
    assert!(
        !store
            .expire_request("req_3".into(), "timeout".into())
            .await
            .unwrap()
    );
    let expired = store.request("req_3".into()).await.unwrap().unwrap();
    assert_eq!(expired.status, RequestStatus::Expired);
    assert_eq!(expired.decision_reason.as_deref(), Some("timeout"));

    // A task's pending requests lapse with it, and its requests can no longer be approved.
    let task = Task {
        id: "tsk_1".into(),
        identity: "ci-bot".into(),
        cgroup: "jitgate.slice/ci-bot/tsk_1".into(),
        launched_by: actor(1000, "bob"),
        run_as_uid: 1000,
        command: "make deploy".into(),
        reason: "deploy".into(),
        started_at: Timestamp::now(),
        ended_at: None,
    };
    store.start_task(task, "user bob".into()).await.unwrap();
    assert_eq!(store.running_tasks().await.unwrap().len(), 1);
    let qt = request("req_4", Some("tsk_1"), None);
    store
        .file_request(qt.clone(), "user bob".into())
        .await
        .unwrap();
    let mut newer = request("req_5", Some("tsk_1"), None);
    newer.created_at = Timestamp(qt.created_at.millis() + 1);
    store.file_request(newer, "user bob".into()).await.unwrap();
    assert_eq!(
        store
            .pending_request(key(Some("tsk_1")))
            .await
            .unwrap()
            .unwrap()
            .id,
        "req_5",
        "the newest pending request for the key"
    );
    assert!(store.end_task("tsk_1".into()).await.unwrap());
    assert!(!store.end_task("tsk_1".into()).await.unwrap());
    assert!(store.running_tasks().await.unwrap().is_empty());
    let approval = GrantApproval {
        grant: grant("grt_4", &qt),
        approver: actor(1001, "alice"),
        actor: "user alice".into(),
        ttl_secs: 600,
    };
    assert!(matches!(
        store.approve_request(approval).await.unwrap(),
        Decided::TaskEnded
    ));
    let mut lapsed = store.expire_task_requests("tsk_1".into()).await.unwrap();
    lapsed.sort();
    assert_eq!(lapsed, ["req_4", "req_5"]);
    assert_eq!(store.count_pending().await.unwrap(), 0);

    let all = store.requests(None, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(
        store
            .requests(Some(RequestStatus::Expired), 100)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(store.requests(None, 2).await.unwrap().len(), 2);
}

/// A grant's host scope and a request's asked scope are kept as written.
pub(crate) async fn grant_scopes_are_kept(store: &dyn Store) {
    let mut fleet = grant("grt_fleet", &request("req_fleet", None, None));
    fleet.hosts = HostScope::Fleet;
    let mut qf = request("req_fleet", None, None);
    qf.status = RequestStatus::Approved;
    qf.grant = Some(fleet.id.clone());
    qf.hosts = Some(HostScope::Fleet);
    store
        .file_approved(qf, fleet.clone(), "user bob".into())
        .await
        .unwrap();
    let read = store.grant("grt_fleet".into()).await.unwrap().unwrap();
    assert_eq!(read.hosts, HostScope::Fleet);
    let read = store.request("req_fleet".into()).await.unwrap().unwrap();
    assert_eq!(read.hosts, Some(HostScope::Fleet));
    store
        .revoke_grant("grt_fleet".into(), "user alice".into(), "done".into())
        .await
        .unwrap();
}

/// Grants: issued at filing, live until revoked, listed.
pub(crate) async fn grants_live_and_revoked(store: &dyn Store) {
    let mut changes = store.grant_changes();
    let q = request("req_a", None, None);
    let g = grant("grt_a", &q);
    let mut q = q;
    q.status = RequestStatus::Approved;
    q.grant = Some(g.id.clone());
    store
        .file_approved(q, g.clone(), "user bob".into())
        .await
        .unwrap();
    let live = store.live_grants(Timestamp::now()).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, "grt_a");
    assert_eq!(live[0].hosts, g.hosts, "the grant's scope is kept");
    assert!(store.live_grants(g.expires_at).await.unwrap().is_empty());
    store
        .revoke_grant("grt_a".into(), "user alice".into(), "done".into())
        .await
        .unwrap();
    assert!(
        store
            .live_grants(Timestamp::now())
            .await
            .unwrap()
            .is_empty()
    );
    let revoked = store.grant("grt_a".into()).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(revoked.revoked_by.as_deref(), Some("user alice"));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("done"));
    // A second ender (the task's end racing the operator) and a late expiry change nothing
    // and record nothing.
    store
        .revoke_grant("grt_a".into(), "jitgated".into(), "task ended".into())
        .await
        .unwrap();
    store.expire_grant("grt_a".into()).await.unwrap();
    let still = store.grant("grt_a".into()).await.unwrap().unwrap();
    assert_eq!(still.revoked_by.as_deref(), Some("user alice"));
    // A grant that runs out is recorded as expired.
    let q2 = request("req_b", None, None);
    let g2 = grant("grt_b", &q2);
    let mut q2 = q2;
    q2.status = RequestStatus::Approved;
    q2.grant = Some(g2.id.clone());
    store
        .file_approved(q2, g2, "user bob".into())
        .await
        .unwrap();
    store.expire_grant("grt_b".into()).await.unwrap();
    assert_eq!(store.grants(10).await.unwrap().len(), 2);
    assert!(store.grant("grt_none".into()).await.unwrap().is_none());
    assert!(matches!(changes.try_recv(), Ok(GrantChange::Issued(_))));
    assert!(matches!(changes.try_recv(), Ok(GrantChange::Revoked { grant }) if grant == "grt_a"));
    assert!(matches!(changes.try_recv(), Ok(GrantChange::Issued(_))));
    assert!(matches!(changes.try_recv(), Ok(GrantChange::Expired { grant }) if grant == "grt_b"));
    assert!(changes.try_recv().is_err());

    let kinds: Vec<String> = store
        .audit_log(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "request.filed",
            "grant.issued",
            "grant.revoked",
            "request.filed",
            "grant.issued",
            "grant.expired"
        ]
    );
    let issued = &store.audit_log(None, 100).await.unwrap()[1];
    assert_eq!(issued.actor, "policy p");
}

/// Approvals of a request that needs several: one per person, only while pending.
pub(crate) async fn several_approvals(store: &dyn Store) {
    use crate::model::Approval;
    let approval = |by: &str, uid| Approval {
        by: by.into(),
        uid,
        account: None,
        at: Timestamp::now(),
        covers: vec!["group:dba".into()],
        ttl_secs: Some(600),
    };
    let mut q = request("req_n", None, None);
    q.needs = Some(crate::model::Needs {
        approvals: 2,
        from: vec!["group:dba".into()],
        step_up: crate::config::StepUp {
            max_age_secs: Some(300),
            acr: vec!["urn:example:mfa".into()],
        },
    });
    store
        .file_request(q.clone(), "user bob".into())
        .await
        .unwrap();
    // What it was filed under is kept (a fleet's other hosts read it).
    assert_eq!(
        store.request("req_n".into()).await.unwrap().unwrap().needs,
        q.needs
    );
    let one = done(
        store
            .add_approval("req_n".into(), approval("user alice", 1001), 2)
            .await
            .unwrap(),
    );
    assert_eq!(one.status, RequestStatus::Pending);
    assert_eq!(one.approvals.len(), 1);
    assert!(matches!(
        store
            .add_approval("req_n".into(), approval("user alice", 1001), 2)
            .await,
        Err(StoreError::Invalid(m)) if m.contains("already approved")
    ));
    // The same account under another name and uid (another host of a fleet): one person.
    let mut elsewhere = approval("oidc alice@example.com", 2001);
    elsewhere.account = Some("alice".into());
    let mut here = approval("user alice2", 1001);
    here.account = Some("alice".into());
    assert!(elsewhere.same_person(&here));
    let two = done(
        store
            .add_approval("req_n".into(), approval("user carol", 1002), 2)
            .await
            .unwrap(),
    );
    assert_eq!(
        two.approvals
            .iter()
            .map(|a| a.by.as_str())
            .collect::<Vec<_>>(),
        ["user alice", "user carol"]
    );
    assert_eq!(two.approvals[1].covers, ["group:dba"]);
    // Read back as stored.
    assert_eq!(
        store
            .request("req_n".into())
            .await
            .unwrap()
            .unwrap()
            .approvals,
        two.approvals
    );
    // Decided: no more approvals.
    store
        .deny_request("req_n".into(), actor(0, "root"), "user root".into(), None)
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_approval("req_n".into(), approval("user dave", 1003), 2)
            .await
            .unwrap(),
        Decided::NotPending
    ));
    let log = store.audit_log(None, 100).await.unwrap();
    let approvals: Vec<_> = log
        .iter()
        .filter(|r| r.kind == "request.approval")
        .collect();
    assert_eq!(
        approvals.len(),
        2,
        "no record for the refused or late approvals"
    );
    assert_eq!(approvals[1].actor, "user carol");
    assert_eq!(approvals[1].detail["count"], 2);
    assert_eq!(approvals[1].detail["needed"], 2);
}

/// Sessions: opened, statements recorded in batches, ended; refused; orphans; pruning.
pub(crate) async fn session_bookkeeping(store: &dyn Store) {
    store.session_opened(session("s-1"));
    store.record_statements(vec![statement("s-1", 1), statement("s-1", 2)]);
    store.record_statements(vec![statement("s-1", 2)]);
    let mut ended = session("s-1");
    ended.ended_at = Some(Timestamp::now());
    ended.bytes_up = 10;
    ended.bytes_down = 20;
    ended.outcome = SessionOutcome::Closed;
    store.session_ended(ended);
    let mut refused = session("s-2");
    refused.outcome = SessionOutcome::RefusedNoGrant;
    refused.detail = "no grant".into();
    store.session_refused(refused);
    store.session_opened(session("s-3"));
    store.flush().await.unwrap();
    // The backlog counts what was handed over and not yet taken: nothing, after a flush.
    if let Some(writes) = store.writes() {
        assert_eq!(writes.backlog(), 0, "the backlog drifted");
        assert!(writes.check().is_ok());
    }

    assert_eq!(store.sessions(false, 10).await.unwrap().len(), 3);
    let open = store.sessions(true, 10).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].id, "s-3");

    let history = store.session_history("s-1".into()).await.unwrap().unwrap();
    assert_eq!(history.session.outcome, SessionOutcome::Closed);
    assert_eq!(
        (history.session.bytes_up, history.session.bytes_down),
        (10, 20)
    );
    assert_eq!(history.statements.len(), 2);
    assert_eq!(history.statements[1].params, [Some("x".to_owned()), None]);
    let kinds: Vec<&str> = history.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["session.start", "session.end"]);
    assert_eq!(history.events[0].actor, "workload ci-bot");
    assert!(
        store
            .session_history("s-none".into())
            .await
            .unwrap()
            .is_none()
    );

    assert_eq!(store.close_orphan_sessions().await.unwrap(), 1);
    let s3 = store.session_history("s-3".into()).await.unwrap().unwrap();
    assert_eq!(s3.session.outcome, SessionOutcome::Shutdown);
    assert_eq!(store.prune_sessions(Timestamp(0)).await.unwrap(), 0);
    let later = Timestamp::now().plus(Duration::from_secs(1));
    assert_eq!(store.prune_sessions(later).await.unwrap(), 2);
    // ses_2 was refused: it never ended (no `ended_at`), so it stays.
    assert_eq!(store.sessions(false, 10).await.unwrap().len(), 1);
    assert!(store.session_history("s-1".into()).await.unwrap().is_none());
}

/// The audit chain: appended in order, verified, tampering found.
pub(crate) async fn audit_chain(store: &dyn Store, tamper: &dyn Fn(i64)) {
    for pid in 1..=4 {
        store
            .append_audit(
                "jitgated".into(),
                Event::DaemonStarted(DaemonStarted { pid }),
            )
            .await
            .unwrap();
    }
    store.submit_audit(
        "root".into(),
        Event::DaemonStarted(DaemonStarted { pid: 5 }),
    );
    store.flush().await.unwrap();
    let log = store.audit_log(None, 100).await.unwrap();
    assert_eq!(log.len(), 5);
    assert_eq!(
        log.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(log[0].detail, serde_json::json!({"pid": 1}));
    assert_eq!(log[4].actor, "root");
    assert_eq!(log[1].prev_hash, log[0].hash);
    let newest = store.audit_log(None, 2).await.unwrap();
    assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    let future = Timestamp::now().plus(Duration::from_secs(60));
    assert!(store.audit_log(Some(future), 10).await.unwrap().is_empty());

    let report = store.verify_audit().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.records, 5);

    tamper(3);
    let report = store.verify_audit().await.unwrap();
    assert!(!report.ok);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("record 3") && p.contains("edited")),
        "{:?}",
        report.problems
    );
}

/// The next record on an audit feed, within 20 s (a record that never comes fails the test).
async fn next(
    feed: &mut tokio::sync::broadcast::Receiver<crate::model::AuditEvent>,
) -> crate::model::AuditEvent {
    tokio::time::timeout(Duration::from_secs(20), feed.recv())
        .await
        .expect("a committed record is published")
        .unwrap()
}

/// The audit feed: what was committed, in order, and nothing from an operation that failed.
pub(crate) async fn audit_feed(store: &dyn Store) {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut feed = store.audit_feed();
    let q = request("req_f1", None, None);
    store
        .file_request(q.clone(), "user bob".into())
        .await
        .unwrap();
    // Filing the same id again fails, and its record must not be published.
    assert!(store.file_request(q, "user bob".into()).await.is_err());
    store.session_opened(session("s-f1"));
    store.flush().await.unwrap();
    let filed = next(&mut feed).await;
    assert_eq!(filed.kind, "request.filed");
    assert_eq!(filed.actor, "user bob");
    assert_eq!(filed.detail["request"], "req_f1");
    assert_eq!(filed.detail["reason"], "deploy");
    let start = next(&mut feed).await;
    assert_eq!(start.kind, "session.start");
    assert_eq!(start.detail["session"], "s-f1");
    assert_eq!(
        start.seq,
        filed.seq + 1,
        "in chain order, no failed record between"
    );
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
    // A fire-and-forget write nobody waits for is committed and published all the same
    // (the lingering store thread wakes by itself).
    let mut ended = session("s-f1");
    ended.ended_at = Some(Timestamp::now());
    store.session_ended(ended);
    let end = next(&mut feed).await;
    assert_eq!(end.kind, "session.end");
    // The published records are the log's own.
    let log = store.audit_log(None, 100).await.unwrap();
    let last = log.iter().find(|r| r.seq == start.seq).unwrap();
    assert_eq!(last.hash, start.hash);
}

#[tokio::test]
async fn memory_store_behaves() {
    audit_feed(&MemoryStore::default()).await;
    several_approvals(&MemoryStore::default()).await;
    requests_and_decisions(&MemoryStore::default()).await;
    grants_live_and_revoked(&MemoryStore::default()).await;
    grant_scopes_are_kept(&MemoryStore::default()).await;
    session_bookkeeping(&MemoryStore::default()).await;
    let store = MemoryStore::default();
    audit_chain(&store, &|seq| {
        store.tamper_audit(|records| {
            if let Some(r) = records.iter_mut().find(|r| r.seq == seq) {
                r.detail = "{\"pid\":99}".into();
            }
        });
    })
    .await;
}

fn sqlite() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state")).unwrap();
    (store, dir)
}

#[tokio::test]
async fn sqlite_store_behaves() {
    let (store, _dir) = sqlite();
    audit_feed(&store).await;
    let (store, _dir) = sqlite();
    several_approvals(&store).await;
    let (store, _dir) = sqlite();
    requests_and_decisions(&store).await;
    let (store, _dir) = sqlite();
    grants_live_and_revoked(&store).await;
    let (store, _dir) = sqlite();
    grant_scopes_are_kept(&store).await;
    let (store, _dir) = sqlite();
    session_bookkeeping(&store).await;
    let (store, _dir) = sqlite();
    let path = store.path().to_owned();
    audit_chain(&store, &|seq| {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE audit SET detail = '{\"pid\":99}' WHERE seq = ?1",
            [seq],
        )
        .unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_store_reopens_with_its_state_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    {
        let store = SqliteStore::open(&state).unwrap();
        let q = request("req_1", None, None);
        store.file_request(q, "user bob".into()).await.unwrap();
        store.flush().await.unwrap();
    }
    let store = SqliteStore::open(&state).unwrap();
    assert_eq!(store.count_pending().await.unwrap(), 1);
    store
        .append_audit(
            "jitgated".into(),
            Event::DaemonStarted(DaemonStarted { pid: 1 }),
        )
        .await
        .unwrap();
    let report = store.verify_audit().await.unwrap();
    assert!(report.ok, "{:?}", report.problems);
    assert_eq!(report.records, 2);
}

mod postgres {
    //! The same suite against the shared store, on a real PostgreSQL, plus what only a
    //! shared store has: several hosts, their own chains, and changes pushed between them.

    use std::time::Duration;

    use super::*;
    use crate::store::{
        PostgresStore,
        postgres::{PostgresOptions, testdb::TestDb},
    };

    async fn open(pg: &TestDb, db: &str, host: &str) -> (PostgresStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = PostgresStore::open(&pg.options(db, host), &dir.path().join("state"))
            .await
            .unwrap();
        (store, dir)
    }

    /// `require_sync_standby`: with no synchronous standby streaming (the test server has
    /// none), no grant is issued, neither approved nor auto-approved, and the error names the
    /// setting; nothing of the refused decision is committed. Without it, the same works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn require_sync_standby_refuses_grants_without_a_synchronous_standby() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("syncstandby");
        let dir = tempfile::tempdir().unwrap();
        let mut options = pg.options(&db, "host-a");
        options.require_sync_standby = true;
        let store = PostgresStore::open(&options, &dir.path().join("state"))
            .await
            .unwrap();
        let q = request("req_1", None, None);
        store
            .file_request(q.clone(), "user bob".into())
            .await
            .unwrap();
        let approval = GrantApproval {
            grant: grant("grt_1", &q),
            approver: actor(1001, "alice"),
            actor: "user alice".into(),
            ttl_secs: 600,
        };
        let Err(e) = store.approve_request(approval.clone()).await else {
            panic!("a grant issued without a synchronous standby");
        };
        let e = e.to_string();
        assert!(
            e.contains("require_sync_standby") && e.contains("pg_stat_replication"),
            "{e}"
        );
        let auto = request("req_2", None, None);
        let Err(e) = store
            .file_approved(auto.clone(), grant("grt_2", &auto), "policy p".into())
            .await
        else {
            panic!("an auto-approved grant issued without a synchronous standby");
        };
        assert!(e.to_string().contains("require_sync_standby"), "{e}");
        assert!(store.grant("grt_1".into()).await.unwrap().is_none());
        assert!(store.grant("grt_2".into()).await.unwrap().is_none());
        assert_eq!(
            store.request("req_1".into()).await.unwrap().unwrap().status,
            RequestStatus::Pending,
            "the refused approval left the request pending"
        );
        drop(store);
        // The same store without the setting issues it.
        options.require_sync_standby = false;
        let dir = tempfile::tempdir().unwrap();
        let store = PostgresStore::open(&options, &dir.path().join("state"))
            .await
            .unwrap();
        assert!(matches!(
            store.approve_request(approval).await.unwrap(),
            Decided::Done(_)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_behaves() {
        let Some(pg) = TestDb::start() else { return };
        let (store, _d0) = open(&pg, &pg.database("feed"), "host-a").await;
        audit_feed(&store).await;
        let (store, _d5) = open(&pg, &pg.database("approvals"), "host-a").await;
        several_approvals(&store).await;
        let (store, _d1) = open(&pg, &pg.database("requests"), "host-a").await;
        requests_and_decisions(&store).await;
        let (store, _d2) = open(&pg, &pg.database("grants"), "host-a").await;
        grants_live_and_revoked(&store).await;
        let (store, _d6) = open(&pg, &pg.database("scopes"), "host-a").await;
        grant_scopes_are_kept(&store).await;
        let (store, _d3) = open(&pg, &pg.database("sessions"), "host-a").await;
        session_bookkeeping(&store).await;
        let db = pg.database("audit");
        let (store, _d4) = open(&pg, &db, "host-a").await;
        audit_chain(&store, &|seq| {
            pg.admin(
                &db,
                &format!(
                    "UPDATE audit SET detail = '{{\"pid\":99}}' WHERE host_id = 'host-a' AND seq = {seq}"
                ),
            );
        })
        .await;
    }

    /// Two hosts on one database: each keeps its own chain (verified apart: tampering with
    /// one host's rows is found on that host only), and a grant issued, a request decided
    /// and a grant revoked on one reach the other's `grant_changes()` within a second, also
    /// after the follower's connection was cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hosts_share_state_and_hear_each_other() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("fleet");
        // The hosts log in as their own role, so that logins can be refused below.
        pg.admin("postgres", "CREATE ROLE fleet LOGIN SUPERUSER");
        // Many agents starting at once migrate once, without tripping over each other.
        let mut opening = Vec::new();
        for host in ["host-a", "host-b", "host-c", "host-d"] {
            let mut options = pg.options(&db, host);
            options.url = options.url.replace("postgres@", "fleet@");
            opening.push(tokio::spawn(async move {
                let dir = tempfile::tempdir().unwrap();
                let store = PostgresStore::open(&options, &dir.path().join("state")).await;
                (store.map_err(|e| format!("{e:#}")), dir)
            }));
        }
        let mut stores = Vec::new();
        for o in opening {
            let (store, dir) = o.await.unwrap();
            stores.push((store.unwrap(), dir));
        }
        let (b, _db_dir) = stores.pop().unwrap();
        let b_host = "host-d";
        assert_eq!(b.host_id(), b_host);
        let (a, _da) = stores.remove(0);
        let mut heard = a.grant_changes();

        // Filed on A, approved on B: A hears the grant, then the decision.
        let mut q = request("req_f1", None, None);
        // What a request says of its host is not what is read back: the row's writer is.
        q.host = Some("host-z".into());
        a.file_request(q.clone(), "user bob".into()).await.unwrap();
        assert_eq!(b.count_pending().await.unwrap(), 1, "B sees A's request");
        let seen = b.request("req_f1".into()).await.unwrap().unwrap();
        assert_eq!(seen.host.as_deref(), Some("host-a"));
        let approval = GrantApproval {
            grant: grant("grt_f1", &q),
            approver: actor(1001, "alice"),
            actor: "user alice".into(),
            ttl_secs: 600,
        };
        assert!(matches!(
            b.approve_request(approval.clone()).await.unwrap(),
            Decided::Done(_)
        ));
        let within = Duration::from_secs(1);
        let got = tokio::time::timeout(within, heard.recv())
            .await
            .expect("in time")
            .unwrap();
        assert!(
            matches!(&got, GrantChange::Issued(g) if g.id == "grt_f1" && g.hosts == grant("grt_f1", &q).hosts),
            "{got:?}"
        );
        // A grant row without a scope (from before scopes, or written by a host not yet
        // upgraded) reads as scoped to the host its request was filed on, never the fleet.
        pg.admin(&db, "UPDATE grants SET hosts = NULL WHERE id = 'grt_f1'");
        assert_eq!(
            b.grant("grt_f1".into()).await.unwrap().unwrap().hosts,
            HostScope::Hosts(vec!["host-a".into()])
        );
        let got = tokio::time::timeout(within, heard.recv())
            .await
            .expect("in time")
            .unwrap();
        assert!(
            matches!(&got, GrantChange::Decided { request, status: RequestStatus::Approved } if request == "req_f1"),
            "{got:?}"
        );
        // Two hosts deciding the same request: one wins.
        assert!(matches!(
            a.approve_request(approval).await.unwrap(),
            Decided::NotPending
        ));

        // Revoked on B: A hears it.
        b.revoke_grant("grt_f1".into(), "user alice".into(), "done".into())
            .await
            .unwrap();
        let got = tokio::time::timeout(within, heard.recv())
            .await
            .expect("in time")
            .unwrap();
        assert!(
            matches!(&got, GrantChange::Revoked { grant } if grant == "grt_f1"),
            "{got:?}"
        );
        assert!(a.live_grants(Timestamp::now()).await.unwrap().is_empty());

        // A's own changes are not echoed back to it through the log.
        let q2 = request("req_f2", None, None);
        let mut q2a = q2.clone();
        q2a.status = RequestStatus::Approved;
        a.file_approved(q2a, grant("grt_f2", &q2), "user bob".into())
            .await
            .unwrap();
        let got = tokio::time::timeout(within, heard.recv())
            .await
            .expect("in time")
            .unwrap();
        assert!(matches!(&got, GrantChange::Issued(g) if g.id == "grt_f2"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(heard.try_recv().is_err(), "no echo of A's own change");

        // The followers' connections are cut and cannot come back for a while; a change made
        // meanwhile (by a host that still reaches the store) is still delivered once A's
        // follower is back: the catch-up read after reconnecting, not the notification it
        // missed. A host cut off itself issues and revokes nothing (its store is lost).
        pg.admin("postgres", "ALTER ROLE fleet NOLOGIN");
        pg.admin(
            &db,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jitgated listener'",
        );
        tokio::time::timeout(Duration::from_secs(3), async {
            while b.health().is_some_and(|h| h.check().is_ok()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("B sees its store lost");
        let refused = b
            .revoke_grant("grt_f2".into(), "user carol".into(), "cut".into())
            .await;
        assert!(
            // The login refused by the role is told as what it is (a permanent refusal,
            // retried at a slowing pace) rather than as an unreachable store.
            matches!(&refused, Err(StoreError::Unavailable(why))
                if why.contains("out of reach") || why.contains("refuses this host")),
            "B, cut off from the store, refuses to write: {refused:?}"
        );
        let (e, _de) = open(&pg, &db, "host-e").await;
        e.revoke_grant("grt_f2".into(), "user carol".into(), "cut".into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            heard.try_recv().is_err(),
            "nothing heard while A is cut off"
        );
        pg.admin("postgres", "ALTER ROLE fleet LOGIN");
        let got = tokio::time::timeout(Duration::from_secs(8), heard.recv())
            .await
            .expect("delivered after the follower reconnected")
            .unwrap();
        assert!(
            matches!(&got, GrantChange::Revoked { grant } if grant == "grt_f2"),
            "{got:?}"
        );

        // B is back too, once its follower has caught up (and A, whose follower may still be
        // shipping or renewing its lease).
        tokio::time::timeout(Duration::from_secs(10), async {
            while [&a, &b]
                .iter()
                .any(|s| s.health().is_some_and(|h| h.check().is_err()))
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("B reaches the store again");

        // One chain per host, each verified with its own key, apart.
        let ra = a.verify_audit().await.unwrap();
        let rb = b.verify_audit().await.unwrap();
        assert!(ra.ok && rb.ok, "{:?} {:?}", ra.problems, rb.problems);
        let a_kinds: Vec<String> = a
            .audit_log(None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(a_kinds, ["request.filed", "request.filed", "grant.issued"]);
        assert_eq!(
            b.audit_log(None, 100).await.unwrap().len(),
            3,
            "the revocation was E's"
        );
        pg.admin(
            &db,
            &format!(
                "UPDATE audit SET actor = 'user mallory' WHERE host_id = '{b_host}' AND seq = 1"
            ),
        );
        assert!(a.verify_audit().await.unwrap().ok, "A's chain is untouched");
        let rb = b.verify_audit().await.unwrap();
        assert!(
            rb.problems
                .iter()
                .any(|p| p.contains("record 1") && p.contains("edited")),
            "{:?}",
            rb.problems
        );
        // Cutting B's newest record off is found by B's head checkpoint.
        pg.admin(
            &db,
            &format!("DELETE FROM audit WHERE host_id = '{b_host}' AND seq = 3"),
        );
        let rb = b.verify_audit().await.unwrap();
        assert!(
            rb.problems
                .iter()
                .any(|p| p.contains("missing from the end")),
            "{:?}",
            rb.problems
        );

        // Tasks and orphaned sessions are the host's own.
        let task = Task {
            id: "tsk_a".into(),
            identity: "ci-bot".into(),
            cgroup: "jitgate.slice/ci-bot/tsk_a".into(),
            launched_by: actor(1000, "bob"),
            run_as_uid: 1000,
            command: "make".into(),
            reason: "r".into(),
            started_at: Timestamp::now(),
            ended_at: None,
        };
        a.start_task(task, "user bob".into()).await.unwrap();
        assert_eq!(a.running_tasks().await.unwrap().len(), 1);
        assert!(b.running_tasks().await.unwrap().is_empty());
        a.session_opened(session("s-a"));
        a.flush().await.unwrap();
        assert_eq!(
            b.close_orphan_sessions().await.unwrap(),
            0,
            "B does not close A's sessions"
        );
        assert_eq!(a.close_orphan_sessions().await.unwrap(), 1);
    }

    /// The store refuses a schema newer than it knows, and a url that carries a password.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_newer_schema_and_a_password_in_the_url() {
        let Some(pg) = TestDb::start() else { return };
        let db = pg.database("newer");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        drop(
            PostgresStore::open(&pg.options(&db, "h"), &state)
                .await
                .unwrap(),
        );
        pg.admin(&db, "UPDATE jitgate_schema SET version = version + 1");
        let e = PostgresStore::open(&pg.options(&db, "h"), &state)
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("newer than this jitgated knows"), "{e}");
        assert!(
            e.contains("permanent error") && e.contains("upgrade jitgated"),
            "a newer schema is no network error: {e}"
        );

        let mut options: PostgresOptions = pg.options(&db, "h");
        options.url = format!("postgresql://postgres:hunter2@127.0.0.1:{}/{db}", pg.port);
        let e = PostgresStore::open(&options, &state)
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("password_file"), "{e}");
        assert!(!e.contains("hunter2"), "the password is not echoed: {e}");
    }

    /// Verified TLS and a password from a file: the right CA and password connect; another
    /// CA, a name the certificate does not carry, a wrong password, or no TLS at all do not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_verify_full_and_a_password_file() {
        let Some(pg) = TestDb::start_tls() else {
            return;
        };
        let db = pg.database("tls");
        pg.admin(
            "postgres",
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE jg LOGIN SUPERUSER PASSWORD 'pw-Store-4d1c'",
        );
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let secret = dir.path().join("store.pw");
        std::fs::write(&secret, "pw-Store-4d1c\n").unwrap();
        let private = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let options = |host: &str, ca: &str, password: &std::path::Path| PostgresOptions {
            url: format!("postgresql://jg@{host}:{}/{db}", pg.port),
            password_file: Some(password.to_owned()),
            ca_file: (!ca.is_empty()).then(|| pg.tls_dir().join(ca)),
            pool_size: 1,
            host_id: "h".into(),
            lease: std::time::Duration::from_secs(30),
            spool_limit: 64 << 20,
            change_log_retention: crate::store::postgres::DEFAULT_CHANGE_LOG_RETENTION,
            require_sync_standby: false,
        };
        // A password file others can read is not used.
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = PostgresStore::open(&options("127.0.0.1", "ca.pem", &secret), &state)
            .await
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("chmod 600"), "{e}");
        private(&secret);
        let store = PostgresStore::open(&options("127.0.0.1", "ca.pem", &secret), &state)
            .await
            .unwrap();
        store
            .file_request(request("req_t", None, None), "user bob".into())
            .await
            .unwrap();
        assert_eq!(store.count_pending().await.unwrap(), 1);
        drop(store);
        // Several servers in the url (a primary and its standby): each is verified against
        // its own name. The first (a name its certificate lacks) fails, the second is taken.
        let both = options(
            &format!("localhost:{},127.0.0.1", pg.port),
            "ca.pem",
            &secret,
        );
        let store = PostgresStore::open(&both, &state).await.unwrap();
        assert_eq!(store.count_pending().await.unwrap(), 1);
        drop(store);

        let wrong = dir.path().join("wrong.pw");
        std::fs::write(&wrong, "guess\n").unwrap();
        private(&wrong);
        for (what, o, why) in [
            (
                "another CA",
                options("127.0.0.1", "other-ca.pem", &secret),
                "UnknownIssuer",
            ),
            (
                "a name the certificate lacks",
                options("localhost", "ca.pem", &secret),
                "not valid for name",
            ),
            (
                "a wrong password",
                options("127.0.0.1", "ca.pem", &wrong),
                "password authentication failed",
            ),
            ("no TLS", options("127.0.0.1", "", &secret), "no encryption"),
            (
                "no server whose certificate carries its name",
                options(
                    &format!("localhost:{},localhost", pg.port),
                    "ca.pem",
                    &secret,
                ),
                "not valid for name",
            ),
        ] {
            let e = PostgresStore::open(&o, &state).await.err();
            assert!(e.is_some(), "{what} was accepted");
            let e = format!("{:#}", e.unwrap());
            assert!(
                e.contains("connecting to the shared state store"),
                "{what}: {e}"
            );
            assert!(e.contains(why), "{what}: {e}");
            // A wrong password is no network error: said to be permanent, with what to do.
            assert_eq!(
                e.contains("permanent error") && e.contains("check [store] password_file"),
                what == "a wrong password",
                "{what}: {e}"
            );
            assert!(
                !e.contains("pw-Store"),
                "{what}: the password is not echoed: {e}"
            );
        }
    }
}
