//! The gate across daemon crashes and restarts, egress modes, DNS changes, the audit chain,
//! and a real PostgreSQL client.

use std::{io::Write as _, net::Ipv4Addr, process::Command, time::Duration};

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

/// The gate's state directory moved onto a tmpfs of its own (so a test can fill it); the
/// daemon is restarted on it. Unmounted on drop (lazily: the daemon may still hold files).
struct SmallStateDisk {
    mount: std::path::PathBuf,
}

impl SmallStateDisk {
    fn under(gate: &mut Gate, size: &str) -> Self {
        gate.stop();
        let state = gate.dir.join("state");
        let saved = gate.dir.join("state.disk");
        std::fs::rename(&state, &saved).expect("moving the state dir aside");
        std::fs::create_dir(&state).expect("mount point");
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&state)
            .status()
            .expect("mount");
        assert!(mounted.success(), "mounting a tmpfs on {}", state.display());
        let disk = Self { mount: state };
        let copied = Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(&disk.mount)
            .status()
            .expect("cp");
        assert!(copied.success(), "copying the state onto the tmpfs");
        gate.launch();
        disk
    }

    /// Fills the disk to its last byte; returns the filler to remove.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let filler = self.mount.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        for chunk in [1 << 20, 4096, 1] {
            let zeros = vec![0_u8; chunk];
            while f.write_all(&zeros).is_ok() {}
        }
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallStateDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Hostile: the disk under the state store fills while a session runs. No statement may
/// run unrecorded for longer than the store's commit bound: the live session is cut with a
/// message saying why, a new connection of a workload already running is refused in its own
/// protocol, `jitgate status` names the failure; once space is back the gate reopens by
/// itself, the cut session's record is closed, and the audit chain is intact.
#[test]
fn a_full_state_disk_cuts_sessions_and_closes_the_gate_until_space_returns() {
    jitgate_e2e::root_or_skip!();
    let pg = servers::Postgres::start_secured(false);
    let keys = format!(
        "protocol = \"postgres\"\ndatabases = [\"orders\"]\n{}",
        pg.credentials_toml()
    );
    let body = jitgate_e2e::config::Body::new()
        .workload("bot", &["root"])
        .resource_with("orders-db", &format!("127.0.0.1:{}", pg.port), &keys)
        .auto(&["bot"], &["orders-db"], &["read"])
        .build();
    let mut gate = Gate::start("full-disk", "", &body);
    let disk = SmallStateDisk::under(&mut gate, "48m");
    let url = format!("postgres://bot@127.0.0.1:{}/orders", pg.port);

    // A: a session open and working before the disk fills.
    let mut a = gate.spawn_stdin(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &url, "-X", "-At", "-v", "VERBOSITY=verbose"],
    );
    let mut a_in = a.stdin.take().expect("stdin");
    a_in.write_all(b"SELECT 'before the fill';\n")
        .expect("write");
    a_in.flush().expect("flush");
    gate.wait_for("A's session open", Duration::from_secs(15), || {
        let s = gate.cli(&["sessions", "--json"]).json();
        (s.as_array().map_or(0, Vec::len) == 1).then_some(())
    });
    // B: a workload already running (its task and grant kept), which connects later.
    let late = format!("sleep 8; psql '{url}' -X -At -c \"SELECT 'late connection'\"");
    let mut b = gate.spawn("bot", &["--grant", "orders-db:read"], &["sh", "-c", &late]);
    std::thread::sleep(Duration::from_secs(1));

    let filler = disk.fill();
    a_in.write_all(b"SELECT 'while full';\n").expect("write");
    a_in.flush().expect("flush");
    std::thread::sleep(Duration::from_secs(3));
    // Whatever psql does after its connection is cut, nothing more is let through.
    let _ = a_in.write_all(b"SELECT 'after the cut';\n");
    drop(a_in);
    let a = a.wait_with_output().expect("psql A");
    let a_out = format!(
        "{}{}",
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&a.stderr)
    );
    assert!(a_out.contains("before the fill"), "{a_out}");
    assert!(!a_out.contains("after the cut"), "{a_out}");
    assert!(
        a_out.contains("stopped keeping records"),
        "the cut session was not told why: {a_out}"
    );

    let status = gate.cli(&["status", "--json"]).json();
    let failing = &status["store_writes"];
    assert!(
        failing["error"].as_str().is_some_and(|e| !e.is_empty()),
        "status does not show the failing store: {status}"
    );
    let text = gate.cli(&["status"]).stdout;
    assert!(text.contains("FAILING"), "{text}");

    b.wait(Duration::from_secs(30));
    let b_out = b.seen.join("\n");
    assert!(
        !b.seen.iter().any(|l| l.trim() == "late connection"),
        "{b_out}"
    );
    assert!(
        b_out.contains("cannot keep records"),
        "a new connection was not refused with the store's failure: {b_out}"
    );

    // Room again: the gate reopens by itself.
    std::fs::remove_file(&filler).expect("removing the filler");
    let psql = ["psql", url.as_str(), "-X", "-At", "-c", "SELECT 'reopened'"];
    let reopened = gate.wait_for("the gate to reopen", Duration::from_secs(20), || {
        let ran = gate.run("bot", &["--grant", "orders-db:read"], &psql);
        (ran.code == 0).then_some(ran)
    });
    assert_eq!(reopened.stdout.trim(), "reopened");
    assert!(
        gate.cli(&["status", "--json"]).json()["store_writes"].is_null(),
        "status still shows a failure"
    );
    // No session shows as open for ever; the cut one says why it ended.
    let open = gate.cli(&["sessions", "--json"]).json();
    assert_eq!(open.as_array().map_or(1, Vec::len), 0, "{open}");
    let all = gate.cli(&["sessions", "--all", "--json"]).json();
    assert!(
        all.as_array()
            .expect("sessions")
            .iter()
            .any(|s| s["outcome"] == "store_lost"),
        "{all}"
    );
    let verified = gate.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:#?}");
    drop(gate);
    drop(disk);
}
