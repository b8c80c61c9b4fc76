//! Requests, approvals, policy, expiry and revocation, seen from real clients in gated
//! workloads.

use std::time::Duration;

use jitgate_e2e::{
    APPROVER_USER, Gate,
    config::Body,
    ensure_approver_user, now_ms, rfc3339_ms,
    servers::{self, BANNER},
};

fn body(web: &str, echo: &str) -> String {
    Body::new()
        .workload("bot", &["root", APPROVER_USER])
        .workload("auto-bot", &["root"])
        .resource("web", web)
        .resource("echo", echo)
        .policy(
            &["bot"],
            &["web", "echo"],
            &["read"],
            &format!(
                "name = \"bot-reads\"\nmax_ttl = \"1h\"\napproval = \"manual\"\napprovers = [\"root\", \"{APPROVER_USER}\"]"
            ),
        )
        .policy(
            &["auto-bot"],
            &["web", "echo"],
            &["read", "write"],
            "name = \"auto-bot\"\nmax_ttl = \"10m\"\napproval = \"auto\"",
        )
        .build()
}

fn curl(gate: &Gate, identity: &str, url: &str) -> jitgate_e2e::Ran {
    gate.run(identity, &[], &["curl", "-sS", "-m", "5", url])
}

#[test]
fn refused_without_grant_then_works_after_approval() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "approval",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let url = format!("http://{}/", web.addr);

    // No grant: curl gets nothing from the upstream.
    let refused = curl(&gate, "bot", &url);
    assert_ne!(
        refused.code, 0,
        "curl must fail without a grant: {refused:#?}"
    );
    assert!(!refused.stdout.contains(BANNER));
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let s = &sessions[0];
    assert_eq!(s["outcome"], "refused_no_grant");
    assert_eq!(s["identity"], "bot");
    assert_eq!(s["resource"], "web");
    assert!(s["command"].as_str().unwrap().starts_with("curl"), "{s}");
    assert!(
        s["detail"]
            .as_str()
            .unwrap()
            .contains("jitgate request web"),
        "{s}"
    );
    assert_eq!(s["bytes_up"], 0);
    assert_eq!(s["bytes_down"], 0);

    // The workload asks and waits; an approver approves; then curl works, in that task.
    let script = format!(
        "jitgate request web --reason 'read the dashboard' --ttl 5m --wait && curl -sS -m 5 {url}"
    );
    let mut workload = gate.spawn("bot", &[], &["sh", "-c", &script]);
    let request = gate.pending_request();
    assert_eq!(request["identity"], "bot");
    assert_eq!(request["resource"], "web");
    assert_eq!(request["reason"], "read the dashboard");
    assert_eq!(request["ttl_secs"], 300);
    let id = request["id"].as_str().unwrap();
    let approved = gate.cli(&["approve", id, "--json"]);
    approved.assert_ok();
    assert_eq!(approved.json()["grant"]["approved_by"], "root");
    workload.expect_line(BANNER, Duration::from_secs(10));
    assert_eq!(workload.wait(Duration::from_secs(10)), 0);

    // The successful session is recorded with its bytes and command line.
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let ok = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["outcome"] == "closed")
        .expect("a relayed session");
    assert_eq!(ok["grant"], approved.json()["grant"]["id"]);
    assert!(ok["bytes_up"].as_u64().unwrap() > 0);
    assert!(ok["bytes_down"].as_u64().unwrap() > 0);
    assert!(ok["task"].as_str().unwrap().starts_with("t-"));
}

#[test]
fn auto_policy_grants_at_launch() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "auto",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let url = format!("http://{}/", web.addr);
    let ran = gate.run(
        "auto-bot",
        &["--grant", "web:read:2m"],
        &["curl", "-sS", "-m", "5", &url],
    );
    ran.assert_ok();
    assert!(ran.stdout.contains(BANNER), "{ran:#?}");
    assert!(ran.stderr.contains("approved"), "{ran:#?}");
    let audit = gate.cli(&["audit", "--json"]).json();
    let kinds: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in [
        "task.started",
        "request.filed",
        "grant.issued",
        "session.start",
        "session.end",
    ] {
        assert!(kinds.contains(&kind), "audit lacks {kind}: {kinds:?}");
    }
}

#[test]
fn requests_no_policy_allows_are_refused_with_a_reason() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "refusal",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );

    let write = gate.run(
        "bot",
        &[],
        &["jitgate", "request", "web", "--access", "write"],
    );
    assert_eq!(write.code, 4, "{write:#?}");
    assert!(
        write
            .stderr
            .contains("no policy lets bot have write access to web"),
        "{write:#?}"
    );
    let long = gate.run(
        "auto-bot",
        &[],
        &["jitgate", "request", "web", "--ttl", "2h"],
    );
    assert_eq!(long.code, 4, "{long:#?}");
    assert!(long.stderr.contains("--ttl 10m or less"), "{long:#?}");
    let unknown = gate.run("bot", &[], &["jitgate", "request", "payroll"]);
    assert_eq!(unknown.code, 4, "{unknown:#?}");
    assert!(
        unknown.stderr.contains("not a configured resource"),
        "{unknown:#?}"
    );
    // Refusals are audited.
    let audit = gate.cli(&["audit", "--json"]).json();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "request.refused")
            .count()
            >= 3
    );
}

/// Runs the probe's `hold` in a workload and returns when it reports the cut (in epoch ms).
fn held_connection_cut_at(workload: &mut jitgate_e2e::Workload) -> i64 {
    let line = workload.expect_line("closed", Duration::from_secs(30));
    line.split_whitespace()
        .nth(2)
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected probe output {line}"))
}

#[test]
fn expiry_closes_a_live_connection_within_a_second() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "expiry",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let mut workload = gate.hold("auto-bot", "echo:read:3s", &echo.addr.to_string());
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    let expires = rfc3339_ms(&grants[0]["expires_at"]);
    let cut = held_connection_cut_at(&mut workload);
    assert!(cut >= expires - 50, "cut {}ms before expiry", expires - cut);
    assert!(
        cut - expires <= 1000,
        "cut {}ms after expiry",
        cut - expires
    );
    gate.wait_for("the session end record", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        (sessions[0]["outcome"] == "grant_expired").then_some(())
    });
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    assert_eq!(grants[0]["revoked_at"], serde_json::Value::Null);
    // A new connection from the same task is refused now.
    let again = gate.probe("auto-bot", &["connect", &echo.addr.to_string()]);
    assert!(!again.stdout.contains(BANNER), "{again:#?}");
}

#[test]
fn revoke_closes_a_live_connection_within_a_second() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "revoke",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let mut workload = gate.hold("auto-bot", "echo:read:5m", &echo.addr.to_string());
    let grants = gate.cli(&["grants", "--json"]).json();
    let id = grants[0]["id"].as_str().unwrap().to_owned();
    let before = now_ms();
    let revoked = gate.cli(&["revoke", &id, "--reason", "incident 42", "--json"]);
    revoked.assert_ok();
    assert_eq!(revoked.json()["revoke_reason"], "incident 42");
    let cut = held_connection_cut_at(&mut workload);
    assert!(
        cut - before <= 1000,
        "cut {}ms after the revoke call",
        cut - before
    );
    gate.wait_for("the session end record", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        (sessions[0]["outcome"] == "grant_revoked").then_some(())
    });
    // Revoking twice is a conflict, not a success.
    assert_eq!(gate.cli(&["revoke", &id]).code, 6);
}

#[test]
fn workloads_cannot_approve_and_nobody_approves_their_own_request() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "self-approval",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );

    // A workload files a request and tries to approve it itself.
    let script = "id=$(jitgate request web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])') && jitgate approve $id";
    let ran = gate.run("bot", &[], &["sh", "-c", script]);
    assert_eq!(ran.code, 3, "{ran:#?}");
    assert!(
        ran.stderr.contains("a gated workload cannot approve"),
        "{ran:#?}"
    );
    // ... or to revoke someone else's grant, or read the audit log.
    let audit = gate.run("bot", &[], &["jitgate", "audit"]);
    assert_eq!(audit.code, 3, "{audit:#?}");
    // Nor can a local user who is no operator, though the socket lets everyone in; an
    // approver can.
    for call in [&["audit"][..], &["sessions", "--all"], &["approvals"]] {
        let ran = gate.cli_as("nobody", call);
        assert_eq!(ran.code, 3, "{ran:#?}");
        assert!(ran.stderr.contains("only root"), "{ran:#?}");
        gate.cli_as(APPROVER_USER, call).assert_ok();
    }

    // An operator files a request for the workload and may not approve it either.
    let filed = gate.cli_as(
        APPROVER_USER,
        &["request", "echo", "--for", "bot", "--json"],
    );
    filed.assert_ok();
    let id = filed.json()["id"].as_str().unwrap().to_owned();
    let self_approve = gate.cli_as(APPROVER_USER, &["approve", &id]);
    assert_eq!(self_approve.code, 3, "{self_approve:#?}");
    assert!(
        self_approve.stderr.contains("self-approval is refused"),
        "{self_approve:#?}"
    );
    // Someone else can; approving twice is a conflict.
    gate.cli(&["approve", &id]).assert_ok();
    assert_eq!(gate.cli(&["approve", &id]).code, 6);
}

/// Hostile: a workload holding control connections open is stopped at its cap (each past
/// it gets one refusal line and is closed), its own CLI calls fail while it holds them, and
/// the operators' CLI goes on working meanwhile.
#[test]
fn a_workload_cannot_exhaust_the_control_socket() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "control-flood",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let script = r#"
import os, socket, subprocess, time
path = os.environ["JITGATE_SOCKET"]
held, refused = [], 0
for _ in range(80):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
for s in held:
    s.setblocking(False)
pending, deadline = list(held), time.time() + 10
while time.time() < deadline and refused < 16:
    time.sleep(0.2)
    for s in list(pending):
        try:
            if b"too many control connections" in s.recv(4096):
                refused += 1
                pending.remove(s)
        except BlockingIOError:
            pass
time.sleep(0.5)
own = subprocess.run(["jitgate", "status"], capture_output=True, text=True)
print("flood", refused, own.returncode, "too many control connections" in own.stderr, flush=True)
time.sleep(4)
"#;
    let mut flood = gate.spawn("bot", &[], &["python3", "-c", script]);
    let line = flood.expect_line("flood ", Duration::from_secs(120));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], "16", "80 opened, 64 admitted: {line}");
    assert_ne!(fields[2], "0", "{line}");
    assert_eq!(fields[3], "True", "{line}");
    // Meanwhile, outside the gate.
    gate.cli(&["status"]).assert_ok();
    flood.wait(Duration::from_secs(30));
    // Closed, the places are given back.
    gate.run("bot", &[], &["jitgate", "status"]);
}

#[test]
fn task_bound_grants_end_with_the_task_and_stay_in_it() {
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "task-bound",
        "",
        &body(&web.addr.to_string(), &echo.addr.to_string()),
    );
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    let target = echo.addr.to_string();

    // Task A holds a task-bound grant and uses it, then lingers.
    let script = format!("{probe} connect {target}; echo ready; sleep 4");
    let mut a = gate.spawn("auto-bot", &["--grant", "echo"], &["sh", "-c", &script]);
    a.expect_line(BANNER, Duration::from_secs(10));
    a.expect_line("ready", Duration::from_secs(10));
    let grants = gate.cli(&["grants", "--json"]).json();
    let grant = grants[0].clone();
    assert!(grant["task"].as_str().unwrap().starts_with("t-"));

    // Task B, same identity, cannot ride on A's grant.
    let b = gate.probe("auto-bot", &["connect", &target]);
    assert!(
        !b.stdout.contains(BANNER),
        "another task used a task-bound grant: {b:#?}"
    );

    // When A's process tree exits, its grant is revoked and its cgroup removed.
    assert_eq!(a.wait(Duration::from_secs(15)), 0);
    let id = grant["id"].as_str().unwrap().to_owned();
    gate.wait_for(
        "the task-bound grant to be revoked",
        Duration::from_secs(5),
        || {
            let all = gate.cli(&["grants", "--all", "--json"]).json();
            let g = all
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["id"] == id.as_str())?
                .clone();
            (g["revoked_at"] != serde_json::Value::Null).then_some(g)
        },
    );
    let task = grant["task"].as_str().unwrap();
    let task_dir = gate.cgroup_root().join("auto-bot").join(task);
    gate.wait_for("the task cgroup to go", Duration::from_secs(5), || {
        (!task_dir.exists()).then_some(())
    });
}

#[test]
fn held_connection_waits_for_a_decision() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let body = Body::new()
        .workload("bot", &["root"])
        .resource_with(
            "echo",
            &echo.addr.to_string(),
            "on_missing_grant = \"request\"\nhold_timeout = \"30s\"",
        )
        .policy(
            &["bot"],
            &["echo"],
            &["read"],
            "approval = \"manual\"\napprovers = [\"root\"]",
        )
        .build();
    let gate = Gate::start("hold", "", &body);
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    let target = echo.addr.to_string();
    let script = format!("{probe} connect {target}; {probe} connect {target}");

    // First connection: held, then approved -> it goes through. The second rides the grant.
    let mut w = gate.spawn("bot", &[], &["sh", "-c", &script]);
    let request = gate.pending_request();
    assert_eq!(request["reason"], "connection held until a decision");
    gate.cli(&["approve", request["id"].as_str().unwrap()])
        .assert_ok();
    w.expect_line(BANNER, Duration::from_secs(10));
    w.expect_line(BANNER, Duration::from_secs(10));
    assert_eq!(w.wait(Duration::from_secs(10)), 0);

    // Denied: the held connection is refused with nothing relayed.
    let mut w = gate.spawn("bot", &[], &[&probe, "connect", &target]);
    let request = gate.pending_request();
    gate.cli(&[
        "deny",
        request["id"].as_str().unwrap(),
        "--reason",
        "not today",
    ])
    .assert_ok();
    assert_ne!(w.wait(Duration::from_secs(10)), 0);
    assert!(!w.seen.iter().any(|l| l.contains(BANNER)), "{:?}", w.seen);
    gate.wait_for("the refused session", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        (sessions[0]["outcome"] == "refused_denied").then_some(())
    });
}

/// Approvers hear of requests where they are: each chosen audit event is POSTed, signed, to
/// an HTTPS receiver verified against its own CA, with what the workload wrote carried
/// intact (never as markup or broken JSON), and events not chosen are not sent.
#[test]
fn approvers_hear_of_requests_by_signed_webhook() {
    use jitgate_e2e::http_fixture::HttpFixture;
    use std::os::unix::fs::PermissionsExt as _;
    jitgate_e2e::root_or_skip!();
    let web = servers::http_server();
    let echo = servers::echo_server("127.0.0.1:0");
    let receiver = HttpFixture::tls();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("webhook.key");
    let key = "whsec-e2e-9f8e7d6c5b4a39281706";
    std::fs::write(&key_path, format!("{key}\n")).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Body::new()
        .raw(&body(&web.addr.to_string(), &echo.addr.to_string()))
        .raw(&format!(
            "[[webhook]]\nname = \"approvers\"\nurl = \"https://127.0.0.1:{}/hooks/jitgate\"\nsecret_file = \"{}\"\nca_file = \"{}\"\nevents = [\"request.filed\", \"request.decided\", \"grant.revoked\"]\n",
            receiver.addr.port(),
            key_path.display(),
            receiver.ca.as_ref().unwrap().display()
        ))
        .build();
    let gate = Gate::start("webhook", "", &config);
    let hooks = || {
        receiver
            .received()
            .into_iter()
            .filter(|r| r.target == "/hooks/jitgate" && !r.body.is_empty())
            .collect::<Vec<_>>()
    };
    let event_of =
        |r: &jitgate_e2e::http_fixture::Received| r.header("jitgate-event")[0].to_owned();

    // A hostile reason: markup, a mention, quotes and a line break.
    let reason = "dash\"}<!channel> <https://evil.example|ok>\nnext";
    // The task stays alive (a request of an ended task lapses).
    let _workload = gate.spawn(
        "bot",
        &[],
        &[
            "sh",
            "-c",
            "jitgate request web --reason \"$1\" && sleep 120",
            "sh",
            reason,
        ],
    );
    let id = gate.pending_request()["id"].as_str().unwrap().to_owned();
    gate.wait_for("the request.filed webhook", Duration::from_secs(15), || {
        (!hooks().is_empty()).then_some(())
    });
    let approved = gate.cli(&["approve", &id, "--json"]);
    approved.assert_ok();
    let grant = approved.json()["grant"]["id"].as_str().unwrap().to_owned();
    gate.cli(&["revoke", &grant, "--reason", "done"])
        .assert_ok();
    gate.wait_for("three webhooks", Duration::from_secs(15), || {
        (hooks().len() >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let seen = hooks();
    assert_eq!(
        seen.iter().map(event_of).collect::<Vec<_>>(),
        ["request.filed", "request.approved", "grant.revoked"],
        "only the chosen events, in order (no session or grant.issued records)"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for r in &seen {
        assert_eq!(r.method, "POST");
        let sig = r.header("jitgate-signature")[0];
        jitgate::webhooks::sign::verify(key.as_bytes(), sig, &r.body, now, 300)
            .unwrap_or_else(|e| panic!("{}: {e}", event_of(r)));
        // Signed with another key, the same call does not verify.
        assert!(
            jitgate::webhooks::sign::verify(b"not-the-key-0123456", sig, &r.body, now, 300)
                .is_err()
        );
    }
    let filed: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(filed["detail"]["request"], id.as_str());
    assert_eq!(filed["detail"]["identity"], "bot");
    assert_eq!(filed["detail"]["reason"], reason, "carried intact");
    assert_eq!(
        seen[0].header("jitgate-delivery")[0],
        filed["id"].as_str().unwrap()
    );
    // The record sent is the audit log's own.
    let audit = gate.cli(&["audit", "--json"]).json();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["hash"] == filed["id"] && a["kind"] == "request.filed"),
        "{audit}"
    );
    let approved: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(approved["actor"], "user root");
    let revoked: serde_json::Value = serde_json::from_slice(&seen[2].body).unwrap();
    assert_eq!(revoked["detail"]["grant"], grant.as_str());
    assert_eq!(revoked["detail"]["reason"], "done");
}

/// A policy that needs two approvers: the first approval leaves the workload waiting (and
/// refused), the same person cannot count twice, the second issues the grant naming both.
#[test]
fn a_policy_can_require_two_different_approvers() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let web = servers::http_server();
    let config = Body::new()
        .workload("pair-bot", &["root"])
        .resource("web", &web.addr.to_string())
        .policy(
            &["pair-bot"],
            &["web"],
            &["read"],
            &format!(
                "name = \"two-keys\"\nmax_ttl = \"1h\"\napproval = \"manual\"\napprovers = [\"root\", \"{APPROVER_USER}\"]\napprovals = 2"
            ),
        )
        .build();
    let gate = Gate::start("two-approvers", "", &config);
    let url = format!("http://{}/", web.addr);
    let script =
        format!("jitgate request web --reason 'drop the cache' --wait && curl -sS -m 5 {url}");
    let mut workload = gate.spawn("pair-bot", &[], &["sh", "-c", &script]);
    let id = gate.pending_request()["id"].as_str().unwrap().to_owned();

    let first = gate.cli(&["approve", &id]);
    first.assert_ok();
    assert!(first.stdout.contains("approval 1 recorded"), "{first:#?}");
    let again = gate.cli(&["approve", &id]);
    assert_eq!(again.code, 6, "{again:#?}");
    assert!(again.stderr.contains("already approved"), "{again:#?}");
    // Still pending, and nothing reaches the resource meanwhile.
    let pending = gate.cli(&["approvals", "--json"]).json();
    assert_eq!(pending[0]["id"], id.as_str());
    assert_eq!(pending[0]["approvals"][0]["by"], "user root");
    let refused = gate.run("pair-bot", &[], &["curl", "-sS", "-m", "3", &url]);
    assert_ne!(refused.code, 0, "{refused:#?}");

    let second = gate.cli_as(APPROVER_USER, &["approve", &id, "--json"]);
    second.assert_ok();
    let grant = &second.json()["grant"];
    assert_eq!(grant["approved_by"], format!("root, {APPROVER_USER}"));
    workload.expect_line(BANNER, Duration::from_secs(10));
    assert_eq!(workload.wait(Duration::from_secs(10)), 0);
    let audit = gate.cli(&["audit", "--json"]).json();
    let kinds: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "request.approval").count(),
        2,
        "{kinds:?}"
    );
}
