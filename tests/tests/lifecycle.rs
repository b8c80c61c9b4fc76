//! The gate across daemon crashes and restarts, egress modes, DNS changes, the audit chain,
//! and a real PostgreSQL client.

use std::{net::Ipv4Addr, process::Command, time::Duration};

use jitgate_e2e::{
    Gate, echo_body,
    servers::{self, BANNER},
};

#[test]
fn kill_9_keeps_the_gate_closed_and_restart_restores_grants() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let mut gate = Gate::start("kill9", "", &echo_body(&target));
    let granted = gate.cli(&["request", "echo", "--for", "bot", "--ttl", "30m", "--json"]);
    granted.assert_ok();
    let grant = granted.json()["grant"].clone();
    assert!(
        gate.probe("bot", &["connect", &target])
            .stdout
            .contains(BANNER)
    );

    gate.kill9();
    // Programs stay attached: the resource is unreachable (no proxy), elsewhere still denied.
    // The refused connect comes from a known port, for the check after the restart.
    let port = jitgate_e2e::free_port();
    let local = format!("127.0.0.1:{port}");
    // Its cgroup stays, as a long-lived workload's would.
    let cut = gate_probe_direct(&gate, "stale-check", &["from", &local, &target]);
    assert!(
        cut.contains("err 111"),
        "resource reachable with the daemon down: {cut}"
    );
    let elsewhere = gate_probe_direct(&gate, "crash-check", &["connect", &other.addr.to_string()]);
    let _ = std::fs::remove_dir(gate.cgroup_root().join("bot/crash-check"));
    assert!(
        elsewhere.contains("err 1 "),
        "egress opened with the daemon down: {elsewhere}"
    );
    let pinned = std::fs::read_dir(gate.pin_dir.join("links/root"))
        .unwrap()
        .count();
    assert_eq!(pinned, 10, "every program stays pinned");

    // Restart: the new daemon adopts the pinned gate; the grant is still there and works.
    gate.launch();
    let grants = gate.cli(&["grants", "--json"]).json();
    assert_eq!(grants[0]["id"], grant, "{grants}");
    assert!(
        gate.probe("bot", &["connect", &target])
            .stdout
            .contains(BANNER)
    );
    assert!(
        gate.log().contains("adopted"),
        "restart did not adopt the pinned gate"
    );
    // A process outside the gate that takes the refused connect's port and calls the proxy
    // itself is nobody: the record of that connect went with its socket.
    let proxy = format!("127.0.0.1:{}", gate.proxy_port);
    let out = Command::new(&gate.bins().probe)
        .args(["from", &local, &proxy])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.contains(BANNER) && out.starts_with("err "),
        "a stale connection record let an outsider through: {out}"
    );
    let _ = std::fs::remove_dir(gate.cgroup_root().join("bot/stale-check"));
}

/// Runs the probe in cgroup `bot/<task>` of the gate directly (the daemon is down, so
/// `jitgate run` cannot create a task): what any process already inside the gate
/// experiences. The cgroup is left for the caller to remove.
fn gate_probe_direct(gate: &Gate, task: &str, args: &[&str]) -> String {
    let cg = gate.cgroup_root().join("bot").join(task);
    std::fs::create_dir_all(&cg).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec runuser -u nobody -- {} {}",
            cg.display(),
            gate.bins().probe.display(),
            args.join(" ")
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn egress_deny_refuses_and_allow_passes_but_never_a_resource() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let allowed = servers::echo_server("127.0.0.1:0");
    let daemon = format!(
        "egress = \"deny\"\nallow = [\"127.0.0.1/32:{}\"]",
        allowed.addr.port()
    );
    let deny = Gate::start("egress-deny", &daemon, &echo_body(&echo.addr.to_string()));
    let ran = deny.probe("bot", &["connect", &other.addr.to_string()]);
    assert!(ran.stdout.starts_with("err 1 "), "deny passed: {ran:#?}");
    let ran = deny.probe("bot", &["connect", &allowed.addr.to_string()]);
    assert!(
        ran.stdout.contains(BANNER),
        "allowlist entry refused: {ran:#?}"
    );
    drop(deny);

    let allow = Gate::start(
        "egress-allow",
        "egress = \"allow\"",
        &echo_body(&echo.addr.to_string()),
    );
    let ran = allow.probe("bot", &["connect", &other.addr.to_string()]);
    assert!(ran.stdout.contains(BANNER), "allow refused: {ran:#?}");
    // An allowed egress never includes the resource itself.
    let ran = allow.probe("bot", &["connect", &echo.addr.to_string()]);
    assert!(
        !ran.stdout.contains(BANNER),
        "resource reachable without grant: {ran:#?}"
    );
    let ran = allow.probe("bot", &["udp", &format!("127.0.0.1:{}", echo.addr.port())]);
    assert!(
        ran.stdout.starts_with("err 1 "),
        "UDP to a resource passed: {ran:#?}"
    );
}

#[test]
fn a_changed_dns_answer_never_opens_a_path() {
    jitgate_e2e::root_or_skip!();
    let name = "db.jitgate.test";
    let v6: std::net::Ipv6Addr = "fd99::1".parse().unwrap();
    let dns = servers::Dns::start_dual(name, Ipv4Addr::new(10, 99, 0, 1), Some(v6));
    let daemon = format!(
        "resolvers = [\"{}\"]\ndns_min_ttl = \"1s\"\ndns_max_ttl = \"5m\"",
        dns.addr
    );
    let gate = Gate::start("dns", &daemon, &echo_body(&format!("{name}:5432")));
    // The first answer is a resource address: redirected to the proxy (refused: no grant).
    let ran = gate.probe("bot", &["connect", "10.99.0.1:5432"]);
    assert!(
        !ran.stdout.contains("err 1 "),
        "10.99.0.1 not gated: {ran:#?}"
    );
    // A dual-stack name: its IPv6 address is gated too, not plain egress.
    let ran = gate.probe("bot", &["connect", "[fd99::1]:5432"]);
    assert!(
        !ran.stdout.contains("err 1 "),
        "fd99::1 not gated: {ran:#?}"
    );
    // An address the name does not resolve to is plain egress (denied).
    let ran = gate.probe("bot", &["connect", "10.99.0.2:5432"]);
    assert!(ran.stdout.starts_with("err 1 "), "{ran:#?}");

    dns.set(Ipv4Addr::new(10, 99, 0, 2));
    gate.wait_for(
        "the new answer to reach the gate",
        Duration::from_secs(15),
        || {
            let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
            let before = sessions.as_array().unwrap().len();
            let ran = gate.probe("bot", &["connect", "10.99.0.2:5432"]);
            let after = gate.cli(&["sessions", "--all", "--json"]).json();
            (!ran.stdout.starts_with("err 1 ") && after.as_array().unwrap().len() > before)
                .then_some(())
        },
    );
    // The old address stays a resource address (clients may have cached it).
    let ran = gate.probe("bot", &["connect", "10.99.0.1:5432"]);
    assert!(
        !ran.stdout.starts_with("err 1 "),
        "old address dropped from the gate: {ran:#?}"
    );
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    assert!(
        sessions
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["destination"] == "10.99.0.2:5432" && s["resource"] == "echo")
    );
}

#[test]
fn audit_verify_catches_a_tampered_row() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start("audit", "", &echo_body(&echo.addr.to_string()));
    gate.cli(&["request", "echo", "--for", "bot"]).assert_ok();
    gate.probe("bot", &["connect", &echo.addr.to_string()]);
    let intact = gate.cli(&["audit", "verify"]);
    assert_eq!(intact.code, 0, "{intact:#?}");
    assert!(intact.stdout.contains("intact"));

    let sql = |q: &str| gate.sqlite(q);
    sql("UPDATE audit SET actor = 'user mallory' WHERE kind = 'grant.issued'");
    let tampered = gate.cli(&["audit", "verify", "--json"]);
    assert_eq!(tampered.code, 9, "{tampered:#?}");
    let problems = tampered.json()["problems"].to_string();
    assert!(problems.contains("edited"), "{problems}");

    sql("UPDATE audit SET actor = 'policy policy-1' WHERE kind = 'grant.issued'");
    assert_eq!(
        gate.cli(&["audit", "verify"]).code,
        0,
        "restoring the row restores the chain"
    );
    sql("DELETE FROM audit WHERE seq = 2");
    let deleted = gate.cli(&["audit", "verify"]);
    assert_eq!(deleted.code, 9);
    assert!(deleted.stdout.contains("missing"), "{deleted:#?}");
}

#[test]
fn psql_reaches_postgres_only_with_a_grant() {
    jitgate_e2e::root_or_skip!();
    let pg = servers::Postgres::start();
    let gate = Gate::start("psql", "", &echo_body(&format!("127.0.0.1:{}", pg.port)));
    let port = pg.port.to_string();
    let psql = [
        "psql",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-AtXc",
        "select 'through the gate: ' || 6 * 7",
    ];
    let refused = gate.run("bot", &[], &psql);
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(!refused.stdout.contains("through the gate"));
    let ok = gate.run("bot", &["--grant", "echo:read:5m"], &psql);
    ok.assert_ok();
    assert_eq!(ok.stdout.trim(), "through the gate: 42");
}
