//! Workloads gated by config (a service cgroup, a uid), configuration reloads, and kernel
//! refusals in the audit log.

use std::{process::Command, time::Duration};

use jitgate_e2e::{
    Gate, Ran,
    config::Body,
    ensure_user,
    servers::{self, BANNER},
};

/// Runs the probe as `user` from a shell first placed in `cgroup` (absolute path), or
/// wherever the test runs when `None`.
fn probe_in(gate: &Gate, cgroup: Option<&std::path::Path>, user: &str, args: &[&str]) -> Ran {
    let probe = gate.bins().probe.display().to_string();
    let enter = cgroup.map_or_else(String::new, |cg| {
        format!("echo $$ > {}/cgroup.procs && ", cg.display())
    });
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{enter}exec runuser -u {user} -- {probe} {}",
            args.join(" ")
        ))
        .output()
        .expect("sh");
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn uid_workloads_are_gated_wherever_they_run() {
    jitgate_e2e::root_or_skip!();
    let user = "jitgate-e2e-uidbot";
    let uid = ensure_user(user);
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let body = Body::new()
        .uid_workload("uidbot", uid)
        .resource("echo", &echo.addr.to_string())
        .auto(&["uidbot"], &["*"], &["read"])
        .build();
    let gate = Gate::start("uid", "", &body);
    let target = echo.addr.to_string();

    // The user is gated from anywhere on the host, with no `jitgate run`.
    let ran = probe_in(&gate, None, user, &["connect", &target]);
    assert!(
        !ran.stdout.contains(BANNER),
        "uid workload reached the resource: {ran:#?}"
    );
    let ran = probe_in(&gate, None, user, &["connect", &other.addr.to_string()]);
    assert!(
        ran.stdout.starts_with("err 1 "),
        "uid workload escaped egress deny: {ran:#?}"
    );
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    assert_eq!(sessions[0]["identity"], "uidbot", "{sessions}");

    // Other users are not gated at all.
    let ran = probe_in(&gate, None, "nobody", &["connect", &other.addr.to_string()]);
    assert!(
        ran.stdout.contains(BANNER),
        "an ungated user was gated: {ran:#?}"
    );

    // The uid workload is a workload for the control API too.
    let out = Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(&gate.bins().jitgate)
        .arg("--socket")
        .arg(&gate.socket)
        .args(["request", "echo", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let request: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(request["identity"], "uidbot");
    assert_eq!(request["status"], "approved");
    let ran = probe_in(&gate, None, user, &["connect", &target]);
    assert!(
        ran.stdout.contains(BANNER),
        "granted uid workload refused: {ran:#?}"
    );
    assert!(ran.stdout.contains(&format!("peer={target}")), "{ran:#?}");
}

#[test]
fn service_cgroups_are_gated_in_place() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let svc = format!("jge2e-svc-{}.slice/agent.service", std::process::id());
    let body = Body::new()
        .cgroup_workload("svc-agent", &svc)
        .resource("echo", &echo.addr.to_string())
        .auto(&["svc-agent"], &["*"], &["read"])
        .build();
    let gate = Gate::start("service", "", &body);
    let cgroup = gate.cgroup_root().parent().unwrap().join(&svc);
    assert!(cgroup.is_dir(), "the daemon prepares the service cgroup");
    let target = echo.addr.to_string();

    let ran = probe_in(&gate, Some(&cgroup), "nobody", &["connect", &target]);
    assert!(!ran.stdout.contains(BANNER), "{ran:#?}");
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    assert_eq!(sessions[0]["identity"], "svc-agent", "{sessions}");
    assert_eq!(sessions[0]["outcome"], "refused_no_grant");

    gate.cli(&["request", "echo", "--for", "svc-agent"])
        .assert_ok();
    let ran = probe_in(&gate, Some(&cgroup), "nobody", &["connect", &target]);
    assert!(ran.stdout.contains(BANNER), "{ran:#?}");

    // A restart under systemd: the stopped service's cgroup is removed, and a new one (a new
    // cgroup id, none of the programs) made when it starts. The gate follows it.
    std::fs::remove_dir(&cgroup).unwrap();
    match std::fs::create_dir(&cgroup) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {} // the agent was first
        other => other.unwrap(),
    }
    let other = servers::echo_server("127.0.0.1:0");
    gate.wait_for(
        "the new service cgroup to be gated",
        std::time::Duration::from_secs(5),
        || {
            let ran = probe_in(
                &gate,
                Some(&cgroup),
                "nobody",
                &["connect", &other.addr.to_string()],
            );
            ran.stdout.starts_with("err 1 ").then_some(())
        },
    );
    let ran = probe_in(&gate, Some(&cgroup), "nobody", &["connect", &target]);
    assert!(ran.stdout.contains(BANNER), "{ran:#?}");
    drop(gate);
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir(cgroup.parent().unwrap());
}

#[test]
fn reload_applies_changes_and_keeps_running_on_a_bad_file() {
    jitgate_e2e::root_or_skip!();
    let a = servers::echo_server("127.0.0.1:0");
    let b = servers::echo_server("127.0.0.1:0");
    let with = |name: &str, addr: &str| {
        Body::new()
            .workload("bot", &["root"])
            .resource(name, addr)
            .auto(&["bot"], &["*"], &["read"])
            .build()
    };
    let gate = Gate::start("reload", "", &with("a", &a.addr.to_string()));

    // A live session on resource a.
    let mut held = gate.hold("bot", "a", &a.addr.to_string());

    // Swap a for b: the session on a ends, a becomes ordinary egress (denied), b is gated.
    gate.rewrite_config("", &with("b", &b.addr.to_string()));
    let reloaded = gate.cli(&["reload", "--json"]);
    reloaded.assert_ok();
    assert_eq!(reloaded.json()["sessions_ended"], 1);
    held.expect_line("closed", Duration::from_secs(5));
    let ran = gate.probe("bot", &["connect", &a.addr.to_string()]);
    assert!(ran.stdout.starts_with("err 1 "), "{ran:#?}");
    let ran = gate.probe("bot", &["connect", &b.addr.to_string()]);
    assert!(
        !ran.stdout.contains(BANNER) && !ran.stdout.starts_with("err 1 "),
        "{ran:#?}"
    );

    // A broken file is refused with its line; the running configuration stays.
    std::fs::write(&gate.config, "[daemon]\negress = \"sometimes\"\n").unwrap();
    let bad = gate.cli(&["reload"]);
    assert_eq!(bad.code, 1, "{bad:#?}");
    assert!(bad.stderr.contains("jitgate.toml:2"), "{bad:#?}");
    let status = gate.cli(&["status", "--json"]).json();
    assert_eq!(status["resources"], serde_json::json!(["b"]));

    // SIGHUP reloads too.
    gate.rewrite_config("", &with("a", &a.addr.to_string()));
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(gate.daemon_pid().unwrap() as i32, libc::SIGHUP) };
    gate.wait_for("SIGHUP reload", Duration::from_secs(10), || {
        let status = gate.cli(&["status", "--json"]).json();
        (status["resources"] == serde_json::json!(["a"])).then_some(())
    });
    let ran = gate.probe("bot", &["connect", &b.addr.to_string()]);
    assert!(ran.stdout.starts_with("err 1 "), "{ran:#?}");
}

#[test]
fn a_reload_that_removes_the_policy_ends_its_grants_and_sessions() {
    jitgate_e2e::root_or_skip!();
    let a = servers::echo_server("127.0.0.1:0");
    let base = Body::new()
        .workload("bot", &["root"])
        .resource("a", &a.addr.to_string());
    let with_policy = base.clone().auto(&["bot"], &["*"], &["read"]);
    let gate = Gate::start("reload-policy", "", &with_policy.build());
    let mut held = gate.hold("bot", "a", &a.addr.to_string());
    let grant = gate.cli(&["grants", "--json"]).json()[0]["id"].clone();

    // Same workload and resource, no policy: the grant ends, and the session riding on it.
    gate.rewrite_config("", &base.build());
    let reloaded = gate.cli(&["reload", "--json"]);
    reloaded.assert_ok();
    assert_eq!(
        reloaded.json()["grants_revoked"],
        serde_json::json!([grant]),
        "{reloaded:#?}"
    );
    held.expect_line("closed", Duration::from_secs(5));
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    assert_eq!(grants[0]["revoked_by"], "jitgated", "{grants}");
    assert!(
        grants[0]["revoke_reason"]
            .as_str()
            .is_some_and(|r| r.contains("no policy allows it")),
        "{grants}"
    );
    let again = gate.cli(&["request", "a", "--for", "bot"]);
    assert_eq!(again.code, 4, "{again:#?}");
}

#[test]
fn kernel_refusals_reach_the_audit_log() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let other = servers::echo_server("127.0.0.1:0");
    let body = Body::new()
        .workload("bot", &["root"])
        .resource("echo", &echo.addr.to_string())
        .auto(&["bot"], &["*"], &["read"])
        .build();
    let gate = Gate::start("refusal-audit", "", &body);
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    // Ten refused connects to the same place fold into one record with a count.
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do {probe} connect {}; done; {probe} udp 127.0.0.1:9",
        other.addr
    );
    gate.run("bot", &[], &["sh", "-c", &script]);
    let events = gate.wait_for("refusal records", Duration::from_secs(20), || {
        let audit = gate.cli(&["audit", "--json"]).json();
        let refused: Vec<serde_json::Value> = audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "connect.refused")
            .cloned()
            .collect();
        (refused.len() >= 2).then_some(refused)
    });
    let tcp = events
        .iter()
        .find(|e| e["detail"]["destination"] == other.addr.to_string())
        .expect("the TCP refusal");
    assert_eq!(tcp["detail"]["identity"], "bot");
    assert_eq!(tcp["detail"]["count"], 10);
    assert_eq!(tcp["detail"]["reason"], "egress denied (tcp)");
    assert!(
        events
            .iter()
            .any(|e| e["detail"]["reason"] == "egress denied (udp)")
    );
}
