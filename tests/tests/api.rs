//! The console's HTTP API, end to end, with curl as the client: tokens issued and revoked with
//! the CLI, a gated workload's request approved over the API (the workload proceeds), and
//! the hostile variants (no token, a token in the URL or a cookie, a tampered, read-only,
//! revoked or expired token, the requester's own token, brute force). A gated workload cannot
//! reach the console at all. No browser and no sign-in: the API takes no part of OpenID
//! Connect, so the configured provider is never contacted.

use std::{os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use jitgate_e2e::{
    APPROVER_USER, Gate, config::Body, ensure_approver_user, free_port, rfc3339_ms, servers,
    servers::BANNER,
};
use serde_json::{Value, json};

/// What curl got: status, headers (lower-case names) and body.
struct Got {
    status: u16,
    headers: String,
    body: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `curl -k` (the console's certificate is the host CA's): `args` then the URL.
fn curl(args: &[&str], url: &str) -> Got {
    let out = Command::new("curl")
        .args(["-sk", "-D", "-", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer from {url}: {text} {:?}", out.stderr));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Got {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn get(url: &str, token: &str) -> Got {
    curl(&["-H", &bearer(token)], url)
}

fn post(url: &str, token: &str, body: &Value) -> Got {
    curl(
        &[
            "-X",
            "POST",
            "-H",
            &bearer(token),
            "-H",
            "Content-Type: application/json",
            "--data",
            &body.to_string(),
        ],
        url,
    )
}

#[test]
fn tokens_and_the_http_api() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let console_port = free_port();
    let console = format!("https://127.0.0.1:{console_port}");
    let api = format!("{console}/api/v1");
    let echo = servers::echo_server("127.0.0.1:0");
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("oidc-secret");
    std::fs::write(&secret, "unused-client-secret\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let body = Body::new()
        .workload("bot", &["root", APPROVER_USER])
        .resource("echo", &echo.addr.to_string())
        .policy(
            &["bot"],
            &["echo"],
            &["read"],
            &format!(
                "name = \"bot-reads\"\nmax_ttl = \"1h\"\napproval = \"manual\"\napprovers = [\"{APPROVER_USER}\"]"
            ),
        )
        .raw(&format!(
            "[console.oidc]\nissuer = \"http://127.0.0.1:{}\"\nclient_id = \"c\"\nclient_secret_file = \"{}\"\nredirect_url = \"{console}/auth/callback\"\n",
            free_port(),
            secret.display()
        ))
        .build();
    // Egress open: the console and metrics are still out of a gated workload's reach.
    let metrics_port = free_port();
    let gate = Gate::start(
        "api",
        &format!(
            "console_listen = \"127.0.0.1:{console_port}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\negress = \"allow\""
        ),
        &body,
    );

    // Tokens: the approver issues their own; the secret is shown once, recognisable.
    let issued = gate
        .cli_as(
            APPROVER_USER,
            &["token", "issue", "--name", "ci", "--ttl", "1h", "--json"],
        )
        .json();
    let token = issued["secret"].as_str().unwrap().to_owned();
    let token_id = issued["token"]["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("jgt_") && token.len() == 60, "{issued}");
    assert!(issued["token"].get("hash").is_none(), "{issued}");
    let read_only = gate
        .cli_as(APPROVER_USER, &["token", "issue", "--read-only", "--json"])
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    // Root may issue for another user, never a token acting as root; nobody beyond 90 days.
    let for_approver = gate.cli(&["token", "issue", "--user", APPROVER_USER, "--json"]);
    assert_eq!(for_approver.code, 0, "{for_approver:?}");
    let root_token = gate.cli(&["token", "issue"]);
    assert_eq!(root_token.code, 3, "{root_token:?}");
    let too_long = gate.cli_as(APPROVER_USER, &["token", "issue", "--ttl", "200d"]);
    assert_eq!(too_long.code, 1, "{too_long:?}");
    let listed = gate
        .cli_as(APPROVER_USER, &["token", "list", "--json"])
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert!(!listed.to_string().contains(&token), "no secret in lists");

    // Who the token is.
    let me = get(&format!("{api}/whoami"), &token);
    assert_eq!(me.status, 200, "{}", me.body);
    assert_eq!(me.json()["user"], APPROVER_USER);
    assert_eq!(me.json()["token"], token_id.as_str());

    // No credential, or one the API does not take: 401 with a challenge; never a cookie.
    let none = curl(&[], &format!("{api}/requests"));
    assert_eq!(none.status, 401, "{}", none.body);
    assert!(
        none.headers.contains("www-authenticate: bearer"),
        "{}",
        none.headers
    );
    assert!(none.json()["error"]["message"].is_string());
    let cookie = curl(
        &["-H", &format!("Cookie: __Host-jitgate-session={token}")],
        &format!("{api}/requests"),
    );
    assert_eq!(cookie.status, 401, "{}", cookie.body);
    assert!(cookie.body.contains("no cookies"), "{}", cookie.body);
    let basic = curl(&["-u", "a:b"], &format!("{api}/requests"));
    assert_eq!(basic.status, 401, "{}", basic.body);
    let in_url = curl(&[], &format!("{api}/requests?access_token={token}"));
    assert_eq!(in_url.status, 400, "{}", in_url.body);
    assert!(
        in_url.body.contains("Authorization header"),
        "{}",
        in_url.body
    );
    let in_path = curl(&[], &format!("{api}/sessions/{token}"));
    assert_eq!(in_path.status, 400, "{}", in_path.body);
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let bad = get(&format!("{api}/requests"), &tampered);
    assert_eq!(bad.status, 401, "{}", bad.body);
    assert!(bad.headers.contains("invalid_token"), "{}", bad.headers);

    // A gated workload asks; the API lists it and approves it; the workload proceeds.
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    let target = echo.addr.to_string();
    // It stays (holding its task's grant) until the test touches `done`.
    let done = gate.dir.join("done");
    let mut first = gate.spawn(
        "bot",
        &[],
        &[
            "sh",
            "-c",
            &format!(
                "jitgate request echo --reason nightly --wait && {probe} connect {target} && while [ ! -e {} ]; do sleep 0.1; done",
                done.display()
            ),
        ],
    );
    let id = gate.pending_request()["id"].as_str().unwrap().to_owned();
    let pending = get(&format!("{api}/requests"), &token);
    assert_eq!(pending.status, 200, "{}", pending.body);
    assert_eq!(pending.json()[0]["id"], id.as_str());
    let ro = post(
        &format!("{api}/requests/{id}/approve"),
        &read_only,
        &json!({}),
    );
    assert_eq!(ro.status, 403, "a read-only token approving: {}", ro.body);
    assert!(ro.body.contains("read-only"), "{}", ro.body);
    let bad_ttl = post(
        &format!("{api}/requests/{id}/approve"),
        &token,
        &json!({"ttl": "soon"}),
    );
    assert_eq!(bad_ttl.status, 400, "{}", bad_ttl.body);
    let approved = post(
        &format!("{api}/requests/{id}/approve"),
        &token,
        &json!({"ttl": "5m"}),
    );
    assert_eq!(approved.status, 200, "{}", approved.body);
    let grant = approved.json()["grant"].clone();
    assert_eq!(
        grant["approved_by"],
        format!("{APPROVER_USER} (token {token_id})").as_str()
    );
    let ttl_ms = rfc3339_ms(&grant["expires_at"]) - rfc3339_ms(&grant["created_at"]);
    assert!((299_000..=301_000).contains(&ttl_ms), "{grant}");
    first.expect_line(BANNER, Duration::from_secs(15));
    let again = post(&format!("{api}/requests/{id}/approve"), &token, &json!({}));
    assert_eq!(again.status, 409, "already decided: {}", again.body);
    let missing = post(&format!("{api}/requests/r-nope/deny"), &token, &json!({}));
    assert_eq!(missing.status, 404, "{}", missing.body);

    // Grants listed and revoked; sessions, one session, the audit log's check, status.
    let grants = get(&format!("{api}/grants"), &token);
    assert_eq!(grants.status, 200, "{}", grants.body);
    let gid = grant["id"].as_str().unwrap();
    assert_eq!(grants.json()[0]["id"], gid);
    let revoked = post(
        &format!("{api}/grants/{gid}/revoke"),
        &token,
        &json!({"reason": "done"}),
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    assert_eq!(gate.cli(&["grants", "--json"]).json(), json!([]));
    std::fs::write(&done, "").expect("done");
    assert_eq!(first.wait(Duration::from_secs(10)), 0);
    let sessions = get(&format!("{api}/sessions?all=1"), &token);
    assert_eq!(sessions.status, 200, "{}", sessions.body);
    let sid = sessions.json()[0]["id"].as_str().unwrap().to_owned();
    let one = get(&format!("{api}/sessions/{sid}"), &token);
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["session"]["id"], sid.as_str());
    let verify = get(&format!("{api}/audit/verify"), &token);
    assert_eq!(verify.status, 200, "{}", verify.body);
    assert_eq!(verify.json()["ok"], true);
    assert_eq!(get(&format!("{api}/status"), &read_only).status, 200);
    assert_eq!(get(&format!("{api}/nothing"), &token).status, 404);
    let wrong_method = curl(
        &["-X", "DELETE", "-H", &bearer(&token)],
        &format!("{api}/grants"),
    );
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.body);

    // The token holder's own request: self-approval is refused over the API too.
    let own = gate.cli_as(
        APPROVER_USER,
        &["request", "echo", "--for", "bot", "--json"],
    );
    let own_id = own.json()["id"].as_str().unwrap().to_owned();
    let selfish = post(
        &format!("{api}/requests/{own_id}/approve"),
        &token,
        &json!({}),
    );
    assert_eq!(selfish.status, 403, "{}", selfish.body);
    assert!(selfish.body.contains("self-approval"), "{}", selfish.body);
    // Denying (withdrawing) it is theirs to do.
    let withdrawn = post(
        &format!("{api}/requests/{own_id}/deny"),
        &token,
        &json!({"reason": "not needed"}),
    );
    assert_eq!(withdrawn.status, 200, "{}", withdrawn.body);

    // A gated workload cannot reach the console (or the agent's metrics) at all, whatever
    // egress allows and at whichever local address: the kernel refuses the connect.
    for addr in [
        format!("127.0.0.1:{console_port}"),
        format!("127.0.0.2:{console_port}"),
        format!("[::1]:{console_port}"),
        format!("127.0.0.1:{metrics_port}"),
    ] {
        let reach = gate.probe("bot", &["connect", &addr]);
        assert!(reach.stdout.starts_with("err 1 "), "{addr}: {reach:#?}");
    }
    // While egress is indeed open for everything else.
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let elsewhere_addr = elsewhere.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        use std::io::Write as _;
        if let Ok((mut conn, _)) = elsewhere.accept() {
            let _ = conn.write_all(b"hello\n");
        }
    });
    let open = gate.probe("bot", &["connect", &elsewhere_addr]);
    assert!(open.stdout.starts_with("ok"), "{open:#?}");

    // Revocation is immediate; an expired token is refused.
    let revoke = gate.cli_as(APPROVER_USER, &["token", "revoke", &token_id]);
    assert_eq!(revoke.code, 0, "{revoke:?}");
    let gone = get(&format!("{api}/requests"), &token);
    assert_eq!(gone.status, 401, "{}", gone.body);
    assert!(gone.body.contains("revoked"), "{}", gone.body);
    let short = gate
        .cli_as(APPROVER_USER, &["token", "issue", "--ttl", "1s", "--json"])
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    let expired = get(&format!("{api}/requests"), &short);
    assert_eq!(expired.status, 401, "{}", expired.body);
    assert!(expired.body.contains("expired"), "{}", expired.body);

    // The audit log names the person and the token for every action, never the secret.
    let audit = gate.cli(&["audit", "--json", "--limit", "500"]).stdout;
    for needle in [
        "\"token.issued\"",
        "\"token.revoked\"",
        "\"api.call\"",
        &format!("user {APPROVER_USER} (token {token_id})"),
    ] {
        assert!(audit.contains(needle), "{needle} not in {audit}");
    }
    for secret in [&token, &read_only, &short] {
        let random = &secret["jgt_0123456789ab_".len()..];
        assert!(!audit.contains(random), "a secret in the audit log");
        assert!(!gate.log().contains(random), "a secret in the daemon's log");
    }

    // Brute force: past a few failures a minute the address gets 429 for anything but a valid
    // token (a guesser behind the same address locks nobody out).
    let good = gate
        .cli_as(APPROVER_USER, &["token", "issue", "--json"])
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut throttled = false;
    for _ in 0..12 {
        let guess = get(&format!("{api}/requests"), &tampered);
        if guess.status == 429 {
            assert!(guess.headers.contains("retry-after:"), "{}", guess.headers);
            throttled = true;
            break;
        }
        assert_eq!(guess.status, 401, "{}", guess.body);
    }
    assert!(throttled, "guessing was never throttled");
    assert_eq!(get(&format!("{api}/requests"), &tampered).status, 429);
    assert_eq!(get(&format!("{api}/requests"), &good).status, 200);
    // A flood of calls with one valid token: past its rate the token gets 429 with
    // Retry-After for the rest of the minute (and the flood is not audited call by call);
    // another token is unaffected.
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
            "-H",
            &bearer(&good),
        ])
        .arg(format!("{api}/whoami?n=[1-640]"))
        .output()
        .expect("curl");
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = codes.lines().filter(|c| *c == "200").count();
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert_eq!(ok + limited, 640, "{codes}");
    // The same user's earlier calls count too.
    assert!(
        (500..=600).contains(&ok),
        "{ok} calls served before the limit"
    );
    let flood = get(&format!("{api}/whoami"), &good);
    assert_eq!(flood.status, 429, "{}", flood.body);
    assert!(flood.headers.contains("retry-after:"), "{}", flood.headers);
    assert!(flood.body.contains("calls this minute"), "{}", flood.body);
    // The limit is the account's: another token of the same user does not add to it.
    let other = gate
        .cli_as(APPROVER_USER, &["token", "issue", "--json"])
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(get(&format!("{api}/whoami"), &other).status, 429);
    let good_id = format!("tok_{}", good.split('_').nth(1).unwrap());
    let calls = gate.cli(&["audit", "--json", "--limit", "5000"]).json();
    let audited = calls
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "api.call" && e["actor"].to_string().contains(&good_id))
        .count();
    assert!(
        (500..=601).contains(&audited),
        "{audited} api.call records for the flooding token: the refused part was audited"
    );
    // A token hidden in the path by percent-encoding is still refused (and never logged).
    let encoded = good.replacen("jgt_", "jgt%5F", 1);
    let hidden = get(&format!("{api}/sessions/{encoded}"), &good);
    assert_eq!(hidden.status, 400, "{}", hidden.body);
    let audit_ok = gate.cli(&["audit", "verify"]);
    assert_eq!(audit_ok.code, 0, "{audit_ok:?}");
}
