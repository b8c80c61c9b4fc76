//! The host agent as a service: the metrics and health endpoint, the systemd notify protocol
//! (readiness, watchdog, reload, stop), and configuration checks.

use std::{
    net::TcpStream,
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use jitgate_e2e::{
    Gate, echo_body, free_port,
    scrape::{get, scrape},
    servers::{self, BANNER},
};

#[test]
fn metrics_and_health_endpoint_report_what_happened() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let elsewhere = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let port = free_port();
    let mut gate = Gate::start(
        "metrics",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &echo_body(&target),
    );

    // Refused without a grant; a kernel refusal elsewhere; then a granted session.
    let refused = gate.probe("bot", &["connect", &target]);
    assert!(!refused.stdout.contains(BANNER), "{}", refused.stdout);
    let denied = gate.probe("bot", &["connect", &elsewhere.addr.to_string()]);
    assert!(denied.stdout.contains("err 1 "), "{}", denied.stdout);
    gate.cli(&["request", "echo", "--for", "bot", "--ttl", "10m"])
        .assert_ok();
    assert!(
        gate.probe("bot", &["connect", &target])
            .stdout
            .contains(BANNER)
    );

    let closed = r#"jitgate_connections_total{identity="bot",outcome="closed",resource="echo"}"#;
    let m = gate.wait_for("the session's metrics", Duration::from_secs(10), || {
        let m = scrape(&gate, port);
        m.contains_key(closed).then_some(m)
    });
    assert_eq!(m[closed], 1.0, "{m:#?}");
    assert_eq!(
        m[r#"jitgate_connections_total{identity="bot",outcome="refused_no_grant",resource="echo"}"#],
        1.0,
        "{m:#?}"
    );
    assert!(
        m[r#"jitgate_kernel_refusals_total{reason="tcp_egress"}"#] >= 1.0,
        "{m:#?}"
    );
    assert!(m["jitgate_kernel_redirects_total"] >= 2.0, "{m:#?}");
    assert_eq!(m["jitgate_grants_active"], 1.0, "{m:#?}");
    assert_eq!(m["jitgate_requests_pending"], 0.0, "{m:#?}");
    assert_eq!(m["jitgate_sessions_open"], 0.0, "{m:#?}");
    assert_eq!(m["jitgate_healthy"], 1.0, "{m:#?}");
    assert_eq!(
        m[&format!(
            "jitgate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
    let setups = r#"jitgate_session_setup_seconds_count{protocol="tcp"}"#;
    assert_eq!(m[setups], 1.0, "{m:#?}");
    assert!(
        m.contains_key(r#"jitgate_session_setup_seconds_bucket{le="+Inf",protocol="tcp"}"#),
        "setup latency is a histogram: {m:#?}"
    );

    let (status, health) = get(port, "/healthz");
    assert_eq!(status, 200, "{health}");
    assert!(health.contains(r#""ok":true"#), "{health}");
    assert_eq!(get(port, "/nothing").0, 404);

    // A link pin removed behind the agent's back: the gate would open when the agent stops,
    // so the agent reports itself unhealthy.
    let pinned = gate.pin_dir.join("links/root/jg_connect4");
    std::fs::remove_file(&pinned).expect("removing a pinned link");
    let (status, health) = get(port, "/healthz");
    assert_eq!(status, 503, "{health}");
    assert!(health.contains("jg_connect4"), "{health}");
    assert_eq!(scrape(&gate, port)["jitgate_healthy"], 0.0);

    // A restart re-pins what was lost.
    gate.stop();
    gate.launch();
    let (status, health) = get(port, "/healthz");
    assert_eq!(status, 200, "{health}\n{}", gate.log());
    assert!(pinned.exists());
}

/// Reads notify messages until one has the line `want` (or the timeout passes).
fn expect_notify(sock: &UnixDatagram, want: &str, timeout: Duration) -> String {
    expect_notify_line(sock, want, timeout, |l| l == want)
}

/// Reads notify messages until one has a line `wanted` accepts (`what` names it on failure).
fn expect_notify_line(
    sock: &UnixDatagram,
    what: &str,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(&wanted) {
                return msg;
            }
            seen.push(msg);
        }
    }
    panic!("no {what} from jitgated within {timeout:?}; got {seen:?}");
}

#[test]
fn systemd_notify_ready_watchdog_reload_and_stop() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let mut gate = Gate::start("notify", "", &echo_body(&target));
    gate.stop();

    let path = gate.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("binding the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    gate.launch_env(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    // READY=1 only once the gate is attached and the proxy listens.
    let ready = expect_notify(&sock, "READY=1", Duration::from_secs(10));
    assert!(ready.contains("STATUS="), "{ready}");
    assert!(gate.pin_dir.join("links/root/jg_connect4").exists());
    assert!(TcpStream::connect(("127.0.0.1", gate.proxy_port)).is_ok());
    expect_notify(&sock, "WATCHDOG=1", Duration::from_secs(5));

    gate.signal(libc::SIGHUP);
    expect_notify(&sock, "RELOADING=1", Duration::from_secs(5));
    let after = expect_notify(&sock, "READY=1", Duration::from_secs(5));
    assert!(after.contains("reloaded"), "{after}");

    // An invalid config: rejected, the running one stays, and systemd hears READY again.
    let good = std::fs::read_to_string(&gate.config).unwrap();
    std::fs::write(&gate.config, format!("{good}\n[[resource]]\nname = 3\n")).unwrap();
    gate.signal(libc::SIGHUP);
    let rejected = expect_notify(&sock, "READY=1", Duration::from_secs(5));
    assert!(rejected.contains("rejected"), "{rejected}");
    std::fs::write(&gate.config, good).unwrap();

    // Unhealthy: the pins hidden under a tmpfs, where nothing can be pinned again (a pin
    // merely removed is put back at once). The watchdog pings stop and STATUS says why.
    let links = gate.pin_dir.join("links/root");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&links)
        .status()
        .unwrap();
    assert!(mounted.success());
    let status = expect_notify_line(&sock, "STATUS=...unhealthy", Duration::from_secs(5), |l| {
        l.starts_with("STATUS=") && l.contains("unhealthy")
    });
    assert!(status.contains("jg_connect4"), "{status}");
    let shown = gate.cli(&["status"]);
    assert!(
        shown.stdout.contains("UNHEALTHY") && shown.stdout.contains("jg_connect4"),
        "{}",
        shown.stdout
    );
    let quiet_from = Instant::now();
    let mut buf = [0u8; 4096];
    while quiet_from.elapsed() < Duration::from_millis(1500) {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]);
            assert!(
                !msg.lines().any(|l| l == "WATCHDOG=1"),
                "watchdog pinged while unhealthy"
            );
        }
    }

    let _ = Command::new("umount").arg(&links).status();
    gate.signal(libc::SIGTERM);
    expect_notify(&sock, "STOPPING=1", Duration::from_secs(5));
    gate.stop();
    // Restart without systemd to leave things re-pinned for the harness's cleanup.
    gate.launch();
}

#[test]
fn check_config_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[daemon]\nmetrics_listen = \"127.0.0.1:9187\"\n".to_owned() + &echo_body("127.0.0.1:5432"),
    )
    .unwrap();
    let jitgated = jitgate_e2e::find_bin("jitgated");
    let ok = Command::new(&jitgated)
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid (1 workloads, 1 resources"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[daemon]\nmetrics_listen = \"everywhere\"\n").unwrap();
    let out = Command::new(&jitgated)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2: metrics_listen"), "{err}");
}

/// The capabilities the shipped unit grants (`CapabilityBoundingSet=`), as setpriv names them.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/systemd/jitgated.service"
    ))
    .expect("the unit file");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet in the unit");
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .expect("CAP_ names")
                .to_ascii_lowercase()
        })
        .collect()
}

#[test]
fn the_units_capabilities_are_enough() {
    jitgate_e2e::root_or_skip!();
    let caps = unit_capabilities();
    assert!(caps.contains(&"bpf".to_owned()), "{caps:?}");
    let bounding = format!(
        "--bounding-set=-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let wrapper = vec![
        "setpriv".to_owned(),
        bounding,
        "--inh-caps=-all".to_owned(),
        "--".to_owned(),
    ];
    let echo = servers::echo_server("127.0.0.1:0");
    let elsewhere = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let mut gate = Gate::start_wrapped(
        "caps",
        "socket_group = \"root\"",
        &echo_body(&target),
        wrapper,
    );
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        gate.daemon_pid().expect("running")
    ))
    .unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        bnd.count_ones() as usize,
        caps.len(),
        "jitgated runs with more than the unit's capabilities: {status}"
    );

    // Everything the agent does for a workload, with only those capabilities: task cgroups,
    // caller identification, grants, the redirect, kernel refusals, revocation, reload.
    let denied = gate.probe("bot", &["connect", &elsewhere.addr.to_string()]);
    assert!(denied.stdout.contains("err 1 "), "{}", denied.stdout);
    // A task asks for its own grant (the agent must tell which workload is calling) and uses it.
    let probe = gate.bins().probe.display().to_string();
    let own = gate.run(
        "bot",
        &[],
        &[
            "sh",
            "-c",
            &format!("jitgate request echo >/dev/null && {probe} connect {target}"),
        ],
    );
    assert!(own.stdout.contains(BANNER), "{own:#?}\n{}", gate.log());
    gate.cli(&["request", "echo", "--for", "bot", "--ttl", "10m"])
        .assert_ok();
    gate.cli(&["reload"]).assert_ok();
    gate.stop();
    gate.launch();
    assert!(
        gate.probe("bot", &["connect", &target])
            .stdout
            .contains(BANNER),
        "after a restart with the same capabilities: {}",
        gate.log()
    );
}

#[test]
fn a_user_outside_the_socket_group_is_told_to_join_it() {
    jitgate_e2e::root_or_skip!();
    use std::os::unix::fs::PermissionsExt as _;
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start("sockperm", "", &echo_body(&echo.addr.to_string()));
    std::fs::set_permissions(&gate.socket, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    let refused = gate.cli_as("nobody", &["status"]);
    assert_eq!(refused.code, 3, "{refused:#?}");
    assert!(
        refused.stderr.contains("not permitted") && refused.stderr.contains("socket_group"),
        "{}",
        refused.stderr
    );
    // A daemon that is down is still said to be down.
    let absent = Command::new(&gate.bins().jitgate)
        .args(["--socket", "/nonexistent/jitgate.sock", "status"])
        .output()
        .expect("jitgate");
    assert_eq!(absent.status.code(), Some(8));
}
