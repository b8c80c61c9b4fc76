//! Every way around the gate we know of, tried from inside a gated workload without a grant:
//! none may reach the upstream. Then, with a grant, the same routes work through the proxy and
//! the workload sees the address it asked for.

use jitgate_e2e::{
    Gate, echo_body, host_ipv4,
    servers::{self, BANNER},
};

#[test]
fn no_route_around_the_gate() {
    jitgate_e2e::root_or_skip!();
    // Dual-stack upstream, so every address family really could reach it.
    let echo = servers::echo_server("[::]:0");
    let port = echo.addr.port();
    let gate = Gate::start("bypass", "", &echo_body(&format!("127.0.0.1:{port}")));
    let p = port.to_string();

    let mut routes = vec![
        ("connect", format!("127.0.0.1:{p}")),
        ("connect", format!("127.0.0.2:{p}")),
        ("connect", format!("0.0.0.0:{p}")),
        ("connect", format!("[::1]:{p}")),
        ("connect", format!("[::]:{p}")),
        ("connect", format!("[::ffff:127.0.0.1]:{p}")),
        ("connect", format!("[::ffff:0.0.0.0]:{p}")),
        ("iouring", format!("127.0.0.1:{p}")),
        ("iouring", format!("[::1]:{p}")),
        ("tfo", format!("127.0.0.1:{p}")),
        ("tfo", format!("[::ffff:127.0.0.1]:{p}")),
    ];
    if let Some(ip) = host_ipv4() {
        routes.push(("connect", format!("{ip}:{p}")));
    }
    for (how, target) in &routes {
        let ran = gate.probe("bot", &[how, target]);
        assert!(
            !ran.stdout.contains(BANNER),
            "{how} {target} reached the upstream without a grant: {ran:#?}"
        );
        assert_ne!(ran.code, 0, "{how} {target}: {ran:#?}");
    }
    // The same from Python, as an agent would write it.
    let python = |host: &str| {
        format!(
            "import socket\ns = socket.create_connection(('{host}', {p}), timeout=3)\nprint(s.getpeername()[:2], s.recv(100))"
        )
    };
    for host in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        let ran = gate.run("bot", &[], &["python3", "-c", &python(host)]);
        assert!(
            !ran.stdout.contains(BANNER),
            "python reached {host} without a grant: {ran:#?}"
        );
    }
    // Each of those either was refused by the kernel or landed on the proxy, which refused it
    // for lack of a grant; the latter are on record.
    let refused = gate
        .cli(&["sessions", "--all", "--limit", "1000", "--json"])
        .json();
    assert!(
        refused
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["outcome"] == "refused_no_grant"),
        "{refused}"
    );
    // Every route above (and the three Python ones) landed on the proxy.
    assert_eq!(
        refused.as_array().unwrap().len(),
        routes.len() + 3,
        "{refused}"
    );

    // UDP anywhere but a resolver, raw sockets, and the proxy's port are refused outright.
    for args in [
        vec!["udp".to_owned(), "127.0.0.1:9".to_owned()],
        vec!["udp".to_owned(), format!("127.0.0.1:{p}")],
        vec!["udp".to_owned(), "[::1]:9".to_owned()],
        vec!["bind".to_owned(), format!("127.0.0.1:{}", gate.proxy_port)],
        vec!["bind".to_owned(), format!("[::]:{}", gate.proxy_port)],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ran = gate.probe("bot", &args);
        assert!(
            ran.stdout.starts_with("err 1 ") || ran.stdout.starts_with("err 13 "),
            "{args:?} was not refused: {ran:#?}"
        );
    }
    // Raw sockets: refused by the gate even for a root workload that has CAP_NET_RAW.
    let probe = gate.bins().probe.to_str().unwrap();
    let raw = gate.cli(&["run", "--as", "bot", "--allow-root", "--", probe, "raw"]);
    assert!(
        raw.stdout.starts_with("err 1 "),
        "root workload opened a raw socket: {raw:#?}"
    );
    let raw = gate.probe("bot", &["raw"]);
    assert!(raw.stdout.starts_with("err 1 "), "{raw:#?}");

    // Other TCP destinations are refused under egress = "deny".
    let other = servers::echo_server("127.0.0.1:0");
    let ran = gate.probe("bot", &["connect", &other.addr.to_string()]);
    assert!(ran.stdout.starts_with("err 1 "), "{ran:#?}");

    let status = gate.cli(&["status", "--json"]).json();
    let counters = &status["kernel_counters"];
    for key in [
        "redirected",
        "tcp_denied",
        "udp_denied",
        "socket_denied",
        "bind_denied",
    ] {
        assert!(
            counters[key].as_u64().unwrap() > 0,
            "{key} not counted: {counters}"
        );
    }

    // With a grant the same routes reach the upstream through the proxy, and getpeername
    // shows the address the workload asked for.
    gate.cli(&["request", "echo", "--for", "bot"]).assert_ok();
    for (how, target, peer) in [
        (
            "connect",
            format!("127.0.0.1:{p}"),
            format!("127.0.0.1:{p}"),
        ),
        ("connect", format!("[::1]:{p}"), format!("[::1]:{p}")),
        (
            "connect",
            format!("[::ffff:127.0.0.1]:{p}"),
            format!("[::ffff:127.0.0.1]:{p}"),
        ),
        (
            "iouring",
            format!("127.0.0.1:{p}"),
            format!("127.0.0.1:{p}"),
        ),
        ("tfo", format!("127.0.0.1:{p}"), format!("127.0.0.1:{p}")),
    ] {
        let ran = gate.probe("bot", &[how, &target]);
        assert!(
            ran.stdout.contains(BANNER),
            "{how} {target} with a grant: {ran:#?}"
        );
        assert!(
            ran.stdout.contains(&format!("peer={peer}")),
            "{how} {target}: {ran:#?}"
        );
    }
    let ran = gate.run("bot", &[], &["python3", "-c", &python("::1")]);
    assert!(ran.stdout.contains(BANNER), "{ran:#?}");
    assert!(ran.stdout.contains(&format!("('::1', {p})")), "{ran:#?}");
}

#[test]
fn only_launchers_launch_and_root_needs_consent() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let gate = Gate::start(
        "launch",
        "",
        &echo_body(&format!("127.0.0.1:{}", echo.addr.port())),
    );
    // Root as the workload user is refused without --allow-root, with the reason.
    let out = std::process::Command::new(&gate.bins().jitgate)
        .arg("--socket")
        .arg(&gate.socket)
        .args(["run", "--as", "bot", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("root can move itself out of its cgroup")
    );
    // An unknown identity is named.
    let out = gate.run("ghost", &[], &["true"]);
    assert_eq!(out.code, 5, "{out:#?}");
    // A user who is not a launcher cannot launch.
    let out = std::process::Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&gate.bins().jitgate)
        .arg("--socket")
        .arg(&gate.socket)
        .args(["run", "--as", "bot", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not launch bot"));
    // A workload cannot launch another task (which would let it pick another identity).
    let nested = gate.run("bot", &[], &["jitgate", "run", "--as", "bot", "--", "true"]);
    assert_eq!(nested.code, 3, "{nested:#?}");
}
