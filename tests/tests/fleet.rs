//! Fleet mode: two host agents on one machine, each its own host (gate cgroup, proxy port,
//! pin directory, state dir, `host_id`), sharing one PostgreSQL database as their store. A
//! request filed on one is decided on the other, and what the other decides (approval,
//! revocation) is enforced where the workload runs.

use std::time::Duration;

use jitgate_e2e::{
    APPROVER_USER, Gate, config::Body, ensure_approver_user, now_ms, servers, servers::BANNER,
};

/// The fleet's shared database, and the config body of its host `host_id`.
fn fleet_body(pg: &servers::Postgres, host_id: &str, echo: &str) -> String {
    let body = Body::new()
        .workload("bot", &["root", APPROVER_USER])
        .resource_with(
            "echo",
            echo,
            "on_missing_grant = \"request\"\nhold_timeout = \"30s\"",
        )
        .policy(
            &["bot"],
            &["echo"],
            &["read"],
            &format!("approval = \"manual\"\napprovers = [\"root\", \"{APPROVER_USER}\"]"),
        )
        .build();
    format!(
        "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"{host_id}\"\n",
        pg.port
    )
}

fn fleet(test: &str, echo: &str) -> (servers::Postgres, Gate, Gate) {
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    let a = Gate::start(&format!("{test}-a"), "", &fleet_body(&pg, "host-a", echo));
    let b = Gate::start(&format!("{test}-b"), "", &fleet_body(&pg, "host-b", echo));
    (pg, a, b)
}

/// The time in `ok closed <unix ms> <why>`, the probe's report of a cut connection.
fn cut_at(line: &str) -> i64 {
    line.split_whitespace()
        .nth(2)
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("unexpected probe output {line}"))
}

#[test]
fn approved_on_one_host_used_on_another_and_revoked_from_there() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let (_pg, a, b) = fleet("fleet", &target);
    assert_ne!(a.proxy_port, b.proxy_port);
    let probe = a.bins().probe.to_str().unwrap().to_owned();

    // A workload on A connects without a grant: its connection is held and a request filed,
    // which B's approvers see and decide.
    let mut w = a.spawn("bot", &[], &[&probe, "hold", &target]);
    let request = b.pending_request();
    let id = request["id"].as_str().unwrap().to_owned();
    assert_eq!(request["identity"], "bot");
    let approved = b.cli(&["approve", &id, "--json"]);
    approved.assert_ok();
    let grant = approved.json()["grant"]["id"].as_str().unwrap().to_owned();
    // The held connection on A goes through on B's approval.
    w.expect_line(&format!("connected {BANNER}"), Duration::from_secs(5));
    a.wait_for("the grant live on A", Duration::from_secs(2), || {
        let live = a.cli(&["grants", "--json"]).json();
        live.as_array()
            .is_some_and(|l| l.iter().any(|g| g["id"] == grant.as_str()))
            .then_some(())
    });

    // Revoked on B: A's live session is cut within a second.
    let before = now_ms();
    b.cli(&["revoke", &grant, "--reason", "incident 7"])
        .assert_ok();
    let cut = cut_at(&w.expect_line("closed", Duration::from_secs(10)));
    assert!(
        cut - before <= 1000,
        "cut {}ms after the revoke on B",
        cut - before
    );
    a.wait_for("A's session record", Duration::from_secs(5), || {
        let sessions = a.cli(&["sessions", "--all", "--json"]).json();
        sessions
            .as_array()
            .and_then(|s| s.iter().find(|s| s["grant"] == grant.as_str()).cloned())
            .filter(|s| s["outcome"] == "grant_revoked")
    });
    // And a new connection on A is held again, not let through.
    let again = a.probe("bot", &["connect", &target]);
    assert!(!again.stdout.contains(BANNER), "{again:#?}");
}

/// Hostile: someone who filed a request on one host cannot approve it from another (the
/// fleet shares requests, not a way around self-approval), and each host's audit chain is
/// its own: a row edited in the shared database is found by that host's `audit verify`.
#[test]
fn no_self_approval_across_hosts_and_a_tampered_row_is_found() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let echo = servers::echo_server("127.0.0.1:0");
    let (pg, a, b) = fleet("fleet-hostile", &echo.addr.to_string());

    let filed = a.cli_as(
        APPROVER_USER,
        &["request", "echo", "--for", "bot", "--json"],
    );
    filed.assert_ok();
    let id = filed.json()["id"].as_str().unwrap().to_owned();
    let self_approve = b.cli_as(APPROVER_USER, &["approve", &id]);
    assert_eq!(self_approve.code, 3, "{self_approve:#?}");
    assert!(
        self_approve.stderr.contains("self-approval is refused"),
        "{self_approve:#?}"
    );
    // Another approver on B can; approving it again on A is a conflict.
    b.cli(&["approve", &id]).assert_ok();
    assert_eq!(a.cli(&["approve", &id]).code, 6);

    for gate in [&a, &b] {
        let intact = gate.cli(&["audit", "verify"]);
        assert_eq!(intact.code, 0, "{intact:#?}");
    }
    pg.admin(
        "fleet",
        "UPDATE audit SET actor = 'user mallory' WHERE host_id = 'host-b' AND kind = 'grant.issued'",
    );
    let tampered = b.cli(&["audit", "verify", "--json"]);
    assert_eq!(tampered.code, 9, "{tampered:#?}");
    let problems = tampered.json()["problems"].to_string();
    assert!(problems.contains("edited"), "{problems}");
    let untouched = a.cli(&["audit", "verify"]);
    assert_eq!(untouched.code, 0, "A's chain is its own: {untouched:#?}");
}
