//! `flavor = "kubernetes"` http resources with the real kubectl as the gated workload, against
//! an API server stand-in (tests/src/kube_fixture.rs): refused without a grant, reading pods
//! under a read grant with the gate's token, Secret values masked in get, list, tables and
//! watch, impersonation refused, a delete in prod held until a human approves it.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use jitgate_e2e::{
    Gate, Ran, config::Body, http_fixture::HttpFixture, kube_fixture::SECRET_PASSWORD_B64,
};

const TOKEN: &str = "kube-sa-token-77c1";

fn gate(test: &str, upstream: &HttpFixture, dir: &std::path::Path) -> Gate {
    let secret = dir.join("sa.token");
    std::fs::write(&secret, TOKEN).expect("token");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let keys = format!(
        "protocol = \"http\"\nflavor = \"kubernetes\"\nupstream_ca = \"{ca}\"\n\
         [resource.credentials.read]\nsecret_file = \"{s}\"\n\
         [resource.credentials.write]\nsecret_file = \"{s}\"\n\
         [[resource.rule]]\nverbs = [\"delete\", \"deletecollection\"]\nnamespaces = [\"prod\"]\naction = \"approve\"\n\
         [[resource.rule]]\nverbs = [\"exec\", \"attach\"]\naction = \"approve\"\n",
        ca = upstream.ca.as_ref().expect("tls fixture").display(),
        s = secret.display()
    );
    let body = Body::new()
        .workload("agent", &["root"])
        .resource_with("cluster", &upstream.addr.to_string(), &keys)
        .policy(
            &["agent"],
            &["cluster"],
            &["read", "write"],
            "max_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"root\"]",
        )
        .build();
    Gate::start(test, "", &body)
}

/// kubectl as the gated workload, with only what `jitgate run` gives it (KUBECONFIG, trust).
fn kubectl(gate: &Gate, grant: Option<&str>, args: &[&str]) -> Ran {
    let grant_args: Vec<&str> = grant.map_or_else(Vec::new, |g| vec!["--grant", g]);
    let mut cmd = vec!["kubectl", "--cache-dir", "/tmp/jitgate-e2e-kube-cache"];
    cmd.extend_from_slice(args);
    gate.run("agent", &grant_args, &cmd)
}

/// `kubectl exec web-2 -n dev -- echo WORD` under a write grant, not waited for.
fn kubectl_exec(gate: &Gate, word: &str) -> jitgate_e2e::Workload {
    gate.spawn(
        "agent",
        &["--grant", "cluster:write"],
        &[
            "kubectl",
            "--cache-dir",
            "/tmp/jitgate-e2e-kube-cache",
            "exec",
            "web-2",
            "-n",
            "dev",
            "--",
            "echo",
            word,
        ],
    )
}

#[test]
fn kubectl_through_the_gate() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::kube();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate("kube", &upstream, dir.path());

    // Without a grant kubectl prints the refusal as the API server's own error.
    let ran = kubectl(&gate, None, &["get", "pods"]);
    assert_ne!(ran.code, 0, "{ran:#?}");
    assert!(
        ran.stderr.contains("Error from server (Forbidden)")
            && ran.stderr.contains("jitgate request cluster"),
        "{ran:#?}"
    );

    // Read grant: pods listed; the API server saw the gate's token and nothing else.
    let ran = kubectl(&gate, Some("cluster:read"), &["get", "pods", "-n", "prod"]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(
        ran.stdout.contains("web-1") && ran.stdout.contains("web-2"),
        "{ran:#?}"
    );
    let pods = upstream
        .received()
        .into_iter()
        .find(|r| r.target.starts_with("/api/v1/namespaces/prod/pods"))
        .expect("the pod list reached the API server");
    assert_eq!(pods.header("authorization"), [format!("Bearer {TOKEN}")]);
    // kubectl (Go's HTTP client) takes HTTP/2 when the gate offers it.
    // (Session records are written as sessions end, by the store's writer.)
    gate.wait_for(
        "a kubectl session over HTTP/2",
        Duration::from_secs(10),
        || {
            let wires = gate.sqlite("SELECT destination FROM sessions WHERE grant_id IS NOT NULL");
            wires.contains("HTTP/2").then_some(())
        },
    );

    // Secret values masked: as an object, as a list, as a table, in a watch.
    for args in [
        vec!["get", "secret", "db", "-n", "prod", "-o", "json"],
        vec!["get", "secrets", "-n", "prod", "-o", "json"],
        vec!["get", "secrets", "-n", "prod", "-o", "yaml"],
        vec!["get", "secrets", "-n", "prod", "--show-labels"],
    ] {
        let ran = kubectl(&gate, Some("cluster:read"), &args);
        assert_eq!(ran.code, 0, "{args:?}: {ran:#?}");
        assert!(
            !ran.stdout.contains(SECRET_PASSWORD_B64),
            "{args:?} leaked: {ran:#?}"
        );
        assert!(ran.stdout.contains("db"), "{args:?}: {ran:#?}");
    }
    let ran = kubectl(
        &gate,
        Some("cluster:read"),
        &[
            "get",
            "secret",
            "db",
            "-n",
            "prod",
            "-o",
            "jsonpath={.data.password}",
        ],
    );
    assert_eq!(ran.stdout, "KioqKg==", "{ran:#?}");
    let mut watch = gate.spawn(
        "agent",
        &["--grant", "cluster:read"],
        &[
            "kubectl",
            "--cache-dir",
            "/tmp/jitgate-e2e-kube-cache",
            "get",
            "secrets",
            "-n",
            "prod",
            "--watch",
            "-o",
            "jsonpath={.data.password}{\"\\n\"}",
        ],
    );
    let line = watch.expect_line("KioqKg==", Duration::from_secs(15));
    assert!(!line.contains(SECRET_PASSWORD_B64));
    watch.expect_line("KioqKg==", Duration::from_secs(5));
    assert!(
        !watch.seen.iter().any(|l| l.contains(SECRET_PASSWORD_B64)),
        "{:?}",
        watch.seen
    );
    drop(watch);

    // Impersonation is refused; so is a write under a read grant.
    let ran = kubectl(
        &gate,
        Some("cluster:read"),
        &["--as", "system:admin", "get", "pods"],
    );
    assert_ne!(ran.code, 0);
    assert!(ran.stderr.contains("impersonation"), "{ran:#?}");
    let ran = kubectl(
        &gate,
        Some("cluster:read"),
        &["delete", "pod", "web-1", "-n", "dev", "--wait=false"],
    );
    assert_ne!(ran.code, 0);
    assert!(ran.stderr.contains("--access write"), "{ran:#?}");
    assert!(upstream.received().iter().all(|r| r.method != "DELETE"));

    // A delete in prod waits for a human; approved, it runs.
    let mut held = gate.spawn(
        "agent",
        &["--grant", "cluster:write"],
        &[
            "kubectl",
            "--cache-dir",
            "/tmp/jitgate-e2e-kube-cache",
            "delete",
            "pod",
            "web-1",
            "-n",
            "prod",
            "--wait=false",
        ],
    );
    let request = gate.pending_request();
    assert!(request.to_string().contains("pods/web-1"), "{request}");
    assert!(
        upstream.received().iter().all(|r| r.method != "DELETE"),
        "deleted before approval"
    );
    gate.cli(&["approve", request["id"].as_str().unwrap()])
        .assert_ok();
    held.expect_line("deleted", Duration::from_secs(15));
    assert!(
        upstream
            .received()
            .iter()
            .any(|r| r.method == "DELETE" && r.target.contains("/prod/pods/web-1"))
    );

    // exec: never under a read grant; under write, only once a human approves it (kubectl
    // speaks WebSocket, v5.channel.k8s.io, through the gate).
    let ran = kubectl(
        &gate,
        Some("cluster:read"),
        &["exec", "web-2", "-n", "dev", "--", "echo", "hi"],
    );
    assert_ne!(ran.code, 0);
    assert!(ran.stderr.contains("--access write"), "{ran:#?}");
    let mut exec = kubectl_exec(&gate, "hi");
    let request = gate.pending_request();
    assert!(request.to_string().contains("exec"), "{request}");
    assert!(
        upstream
            .received()
            .iter()
            .all(|r| !r.target.contains("/exec")),
        "exec reached the API server before approval"
    );
    gate.cli(&["approve", request["id"].as_str().unwrap()])
        .assert_ok();
    exec.expect_line("ran: echo hi", Duration::from_secs(15));
    assert_eq!(exec.wait(Duration::from_secs(10)), 0, "{:?}", exec.seen);

    // The exec stream is recorded and replays.
    let recorded = gate.wait_for("the exec record", Duration::from_secs(10), || {
        let line = gate
            .recorded_statements()
            .iter()
            .filter(|s| s["decision"] == "approved")
            .filter_map(|s| s["text"].as_str())
            .find(|t| t.contains("/exec"))?
            .to_owned();
        let file = line
            .split("[recorded: ")
            .nth(1)?
            .trim_end_matches(']')
            .to_owned();
        Some(file)
    });
    let replay = gate.cli(&["sessions", "replay", &recorded, "--speed", "0"]);
    replay.assert_ok();
    assert!(replay.stdout.contains("ran: echo hi"), "{replay:#?}");
    assert!(
        replay.stdout.contains("Success"),
        "the exit status is recorded: {replay:#?}"
    );

    // Hostile: with nowhere to record it (the recordings directory replaced by a file), an
    // exec is refused with 503 before it reaches the cluster.
    let recordings = std::path::Path::new(&recorded)
        .parent()
        .expect("recordings directory")
        .to_owned();
    let aside = recordings.with_extension("aside");
    std::fs::rename(&recordings, &aside).expect("moving the recordings aside");
    std::fs::write(&recordings, b"not a directory").expect("a file in its place");
    let execs_before = upstream
        .received()
        .iter()
        .filter(|r| r.target.contains("/exec"))
        .count();
    let mut exec = kubectl_exec(&gate, "unrecorded");
    // kubectl tries WebSocket, then (refused) SPDY: each is its own request, held and
    // approved, and each is refused the same way.
    for _ in 0..2 {
        let request = gate.pending_request();
        gate.cli(&["approve", request["id"].as_str().unwrap()])
            .assert_ok();
    }
    assert_ne!(exec.wait(Duration::from_secs(20)), 0, "{:?}", exec.seen);
    assert!(
        exec.seen.iter().any(|l| l.contains("cannot be recorded")),
        "{:?}",
        exec.seen
    );
    assert!(
        !exec.seen.iter().any(|l| l.contains("ran: echo unrecorded")),
        "{:?}",
        exec.seen
    );
    assert_eq!(
        upstream
            .received()
            .iter()
            .filter(|r| r.target.contains("/exec"))
            .count(),
        execs_before,
        "an unrecordable exec reached the cluster"
    );
    std::fs::remove_file(&recordings).expect("removing the file");
    std::fs::rename(&aside, &recordings).expect("restoring the recordings");
    assert!(
        upstream
            .received()
            .iter()
            .any(|r| r.method == "DELETE" && r.target.contains("/prod/pods/web-1"))
    );
}

#[test]
fn a_live_watch_ends_with_its_grant_within_a_second() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::kube();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate("kube-expiry", &upstream, dir.path());
    let mut watch = gate.spawn(
        "agent",
        &["--grant", "cluster:read:4s"],
        &[
            "kubectl",
            "--cache-dir",
            "/tmp/jitgate-e2e-kube-cache",
            "get",
            "secrets",
            "-n",
            "prod",
            "--watch",
            "-o",
            "jsonpath={.data.password}{\"\\n\"}",
        ],
    );
    watch.expect_line("KioqKg==", Duration::from_secs(15));
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    let expires = jitgate_e2e::rfc3339_ms(&grants[0]["expires_at"]);
    // kubectl ends a watch the server closed without an error: the proof the gate cut it is
    // the time (the stand-in streams for a minute) and the session's outcome.
    watch.wait(Duration::from_secs(15));
    let ended = jitgate_e2e::now_ms();
    assert!(
        ended - expires <= 1000,
        "the watch ran {}ms past expiry",
        ended - expires
    );
    assert!(!watch.seen.iter().any(|l| l.contains(SECRET_PASSWORD_B64)));
    gate.wait_for("the session end record", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        sessions
            .as_array()?
            .iter()
            .any(|s| s["outcome"] == "grant_expired")
            .then_some(())
    });
}
