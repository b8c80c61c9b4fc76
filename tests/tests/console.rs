//! The web console, end to end: a real OpenID Provider (panva's `oidc-provider`, started on
//! loopback by `tests/console/provider.mjs`) and a real browser (Debian's chromium, headless,
//! driven by `playwright-core` through `tests/console/browser.mjs`) against a real agent.
//! One browser for the whole test (a fresh context per person), a few pages.
//!
//! Ann (`oidc-group:dba`) signs in through the provider's login and consent pages, sees a
//! gated workload's request, approves it (the workload proceeds), revokes the grant (its live
//! connection is cut), denies another, approves a statement a guardrail held; Eve (not
//! named) and Wendy (named, but the requester's unix account) are refused; unauthenticated
//! requests and forms without the right CSRF token or from another origin are refused. A
//! gated psql session is then opened in the console's replay view (its statements in order,
//! a hidden direction override shown escaped) and the audit page shows the log verified.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use jitgate_e2e::{
    Gate, WORKLOAD_USER,
    config::Body,
    free_port, rfc3339_ms,
    servers::{self, BANNER, Postgres},
};
use serde_json::{Value, json};

const CLIENT_ID: &str = "jitgate-console";
const CLIENT_SECRET: &str = "console-e2e-secret-7f3a91";

fn console_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console")
}

/// A node process, killed when dropped.
struct Node {
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(script: &str, args: &[&str]) -> (Node, ChildStdin, mpsc::Receiver<String>) {
    let mut child = Command::new("/usr/bin/node")
        .arg(console_dir().join(script))
        .args(args)
        .current_dir(console_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting node {script}: {e} (run `cargo xtask setup`)"));
    let stdin = child.stdin.take().expect("stdin");
    let stdout: ChildStdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Node { child }, stdin, rx)
}

struct Browser {
    _node: Node,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Browser {
    fn start() -> Self {
        let (node, stdin, lines) = node("browser.mjs", &[]);
        let first = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the browser driver starts");
        assert!(first.contains("ready"), "{first}");
        Self {
            _node: node,
            stdin,
            lines,
        }
    }

    #[track_caller]
    fn cmd(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").expect("browser driver stdin");
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer to {command}"));
        let answer: Value = serde_json::from_str(&line).expect("driver answers JSON");
        assert_eq!(answer["ok"], true, "{command} failed: {answer}");
        answer
    }

    fn goto(&mut self, url: &str) -> Value {
        self.cmd(json!({"op": "goto", "url": url}))
    }

    fn click(&mut self, selector: &str) -> Value {
        self.cmd(json!({"op": "click", "selector": selector}))
    }

    fn fill(&mut self, selector: &str, value: &str) {
        self.cmd(json!({"op": "fill", "selector": selector, "value": value}));
    }

    fn post(&mut self, url: &str, form: Value, headers: Value) -> Value {
        self.cmd(json!({"op": "post", "url": url, "form": form, "headers": headers}))
    }

    fn csrf(&mut self) -> String {
        self.cmd(json!({"op": "value", "selector": "input[name=csrf] >> nth=0"}))["value"]
            .as_str()
            .expect("a CSRF field")
            .to_owned()
    }

    /// Signs `login` in from a fresh context, through the provider's own pages.
    fn sign_in(&mut self, console: &str, login: &str) -> Value {
        self.cmd(json!({"op": "context"}));
        let page = self.goto(&format!("{console}/"));
        assert!(
            page["url"].as_str().unwrap().contains("/interaction/"),
            "an unauthenticated visit goes to the provider's sign-in: {page}"
        );
        self.fill("input[name=login]", login);
        self.fill("input[name=password]", "any");
        let consent = self.click("button[type=submit]");
        assert!(
            consent["url"].as_str().unwrap().contains("/interaction/"),
            "{consent}"
        );
        self.click("button[type=submit]")
    }

    /// Clicks Approve on request `id`'s card: the page it leads to.
    fn approve(&mut self, id: &str) -> Value {
        self.click(&format!("[data-request=\"{id}\"] button.approve"))
    }

    /// [`Self::approve`], which must succeed.
    fn approved(&mut self, id: &str) {
        let after = self.approve(id);
        assert!(
            after["text"]
                .as_str()
                .unwrap()
                .contains(&format!("Request {id} approved")),
            "{after}"
        );
    }

    /// From a page asking for a fresh sign-in: follows its link and signs `login` in again
    /// with `password` (`otp`: with a second factor, see provider.mjs).
    fn step_up(&mut self, login: &str, password: &str) -> Value {
        let prompt = self.click("a.step-up");
        assert!(
            prompt["url"].as_str().unwrap().contains("/interaction/"),
            "a step-up sign-in prompts again, even with a live session at the provider: {prompt}"
        );
        self.fill("input[name=login]", login);
        self.fill("input[name=password]", password);
        let mut page = self.click("button[type=submit]");
        if page["url"].as_str().unwrap().contains("/interaction/") {
            page = self.click("button[type=submit]");
        }
        page
    }
}

/// A provider, and an agent with its console signing in there; `resources` adds the
/// workloads, resources and policies.
struct Setup {
    gate: Gate,
    console: String,
    /// The provider, with its pipes kept open (it dies writing to a closed one).
    _idp: (Node, ChildStdin, mpsc::Receiver<String>),
    _secret_dir: tempfile::TempDir,
}

impl Setup {
    fn start(name: &str, resources: impl FnOnce(Body) -> Body) -> Self {
        assert!(
            console_dir()
                .join("node_modules/oidc-provider/package.json")
                .exists()
                && console_dir()
                    .join("node_modules/playwright-core/package.json")
                    .exists(),
            "oidc-provider and playwright-core are missing from tests/console: run `cargo xtask setup`"
        );
        let console_port = free_port();
        let idp_port = free_port();
        let console = format!("https://127.0.0.1:{console_port}");
        let issuer = format!("http://127.0.0.1:{idp_port}");
        let redirect = format!("{console}/auth/callback");
        let (idp, idp_in, idp_out) = node(
            "provider.mjs",
            &[&idp_port.to_string(), CLIENT_ID, CLIENT_SECRET, &redirect],
        );
        loop {
            let line = idp_out
                .recv_timeout(Duration::from_secs(30))
                .expect("the provider starts");
            if line.contains("ready") {
                break;
            }
        }
        let secret_dir = tempfile::tempdir().expect("tempdir");
        let secret = secret_dir.path().join("oidc-secret");
        std::fs::write(&secret, format!("{CLIENT_SECRET}\n")).expect("secret");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let body = resources(Body::new())
            .raw(&format!(
                "[console]\nsession_ttl = \"10m\"\n[console.oidc]\nissuer = \"{issuer}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\nredirect_url = \"{redirect}\"\nscopes = [\"openid\", \"email\", \"groups\"]\nunix_accounts = {{ \"wendy@example.com\" = \"{WORKLOAD_USER}\" }}\n",
                secret.display()
            ))
            .build();
        let gate = Gate::start(
            name,
            &format!("console_listen = \"127.0.0.1:{console_port}\""),
            &body,
        );
        Self {
            gate,
            console,
            _idp: (idp, idp_in, idp_out),
            _secret_dir: secret_dir,
        }
    }
}

/// The waiting request of the console page's first card.
fn wait_for_card(browser: &mut Browser, console: &str, id: &str) -> Value {
    for _ in 0..100 {
        let page = browser.goto(&format!("{console}/"));
        if page["text"].as_str().unwrap_or("").contains(id) {
            return page;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("request {id} never appeared in the console");
}

#[test]
fn sign_in_approve_deny_and_refusals() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let pg = Postgres::start_secured(false);
    let setup = Setup::start("console", |body| {
        body.workload("bot", &["root"])
            .resource("echo", &echo.addr.to_string())
            .policy(
                &["bot"],
                &["echo"],
                &["read"],
                "name = \"bot-reads\"\nmax_ttl = \"1h\"\napproval = \"manual\"\napprovers = [\"root\", \"oidc-group:dba\", \"oidc:wendy@example.com\"]",
            )
            .resource_with(
                "orders-db",
                &format!("127.0.0.1:{}", pg.port),
                &format!(
                    "protocol = \"postgres\"\ndatabases = [\"orders\"]\n{}",
                    pg.credentials_toml()
                ),
            )
            .policy(
                &["bot"],
                &["orders-db"],
                &["read", "write"],
                "name = \"bot-db\"\nmax_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"oidc-group:dba\"]",
            )
    });
    let (gate, console) = (&setup.gate, setup.console.clone());
    let mut browser = Browser::start();

    // Hostile, before anyone signs in: no session, no page, no action.
    browser.cmd(json!({"op": "context"}));
    let anon = browser.post(
        &format!("{console}/approve"),
        json!({"id": "req_x", "csrf": "x"}),
        json!({}),
    );
    assert_eq!(anon["status"], 403, "{anon}");
    let anon = browser.post(&format!("{console}/logout"), json!({}), json!({}));
    assert_eq!(anon["status"], 403, "{anon}");
    let forged = browser.goto(&format!("{console}/auth/callback?code=x&state=y"));
    assert_eq!(
        forged["status"], 403,
        "a callback that did not start here: {forged}"
    );

    // A gated workload asks and waits.
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    let target = echo.addr.to_string();
    // Once granted it holds a live connection until the gate cuts it.
    let script = format!(
        "jitgate request echo --reason 'nightly <b>export</b>' --ttl 20m --wait && {probe} hold {target}"
    );
    let mut first = gate.spawn("bot", &[], &["sh", "-c", &script]);
    let request = gate.pending_request();
    let id = request["id"].as_str().unwrap().to_owned();

    // Ann signs in through the provider and sees it, with who asked and why (escaped).
    let landing = browser.sign_in(&console, "ann");
    assert!(
        landing["url"].as_str().unwrap().starts_with(&console),
        "{landing}"
    );
    let page = wait_for_card(&mut browser, &console, &id);
    let text = page["text"].as_str().unwrap();
    assert!(text.contains("ann@example.com"), "{text}");
    assert!(
        text.contains("nightly <b>export</b>"),
        "the reason, as text: {text}"
    );
    assert!(
        text.contains("echo") && text.contains(WORKLOAD_USER),
        "{text}"
    );

    // A form with a wrong or missing CSRF token, or from another origin: refused.
    let csrf = browser.csrf();
    for (form, headers) in [
        (json!({"id": id, "csrf": "wrong"}), json!({})),
        (json!({"id": id}), json!({})),
        (
            json!({"id": id, "csrf": csrf}),
            json!({"origin": "https://evil.example"}),
        ),
        (
            json!({"id": id, "csrf": csrf}),
            json!({"sec-fetch-site": "cross-site"}),
        ),
    ] {
        let refused = browser.post(&format!("{console}/approve"), form, headers);
        assert_eq!(refused["status"], 403, "{refused}");
    }
    assert_eq!(
        gate.cli(&["approvals", "--json"]).json()[0]["id"],
        id.as_str(),
        "still pending after the refused forms"
    );

    // Ann approves it with a shorter TTL, from the page; the workload proceeds.
    browser.fill(&format!("[data-request=\"{id}\"] input[name=ttl]"), "5m");
    browser.approved(&id);
    first.expect_line(BANNER, Duration::from_secs(15));
    let grants = gate.cli(&["grants", "--json"]).json();
    let grant = &grants.as_array().unwrap()[0];
    assert_eq!(grant["approved_by"], "oidc ann@example.com");
    let ttl_ms = rfc3339_ms(&grant["expires_at"]) - rfc3339_ms(&grant["created_at"]);
    assert!(
        (299_000..=301_000).contains(&ttl_ms),
        "the shorter TTL: {grant}"
    );
    let audit = gate.cli(&["audit", "--json", "--limit", "50"]).stdout;
    assert!(audit.contains("oidc ann@example.com"), "{audit}");
    assert!(!audit.contains(CLIENT_SECRET));
    assert!(!gate.log().contains(CLIENT_SECRET), "the secret in the log");

    // The live grant is listed, and revoked from the console.
    let gid = grant["id"].as_str().unwrap().to_owned();
    let page = browser.goto(&format!("{console}/"));
    assert!(
        page["text"].as_str().unwrap().contains("Live grants (1)"),
        "{page}"
    );
    browser.fill(
        &format!("[data-grant=\"{gid}\"] input[name=reason]"),
        "done with it",
    );
    let revoked_at = std::time::Instant::now();
    let after = browser.click(&format!("[data-grant=\"{gid}\"] button"));
    assert!(
        after["text"]
            .as_str()
            .unwrap()
            .contains(&format!("Grant {gid} revoked")),
        "{after}"
    );
    // The live connection riding on it ends.
    first.expect_line("closed", Duration::from_secs(5));
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "the session ended {:?} after the revoke was sent",
        revoked_at.elapsed()
    );
    assert!(
        after["text"].as_str().unwrap().contains("Live grants (0)"),
        "{after}"
    );
    assert_eq!(gate.cli(&["grants", "--json"]).json(), json!([]));
    first.wait(Duration::from_secs(10));

    // Another request is denied with a reason.
    let mut second = gate.spawn(
        "bot",
        &[],
        &[
            "sh",
            "-c",
            &format!("jitgate request echo --reason again --wait && {probe} connect {target}"),
        ],
    );
    let id2 = gate.pending_request()["id"].as_str().unwrap().to_owned();
    wait_for_card(&mut browser, &console, &id2);
    browser.fill(
        &format!("[data-request=\"{id2}\"] input[name=reason]"),
        "not tonight",
    );
    let after = browser.click(&format!("[data-request=\"{id2}\"] button.deny"));
    assert!(
        after["text"].as_str().unwrap().contains("denied"),
        "{after}"
    );
    assert_ne!(second.wait(Duration::from_secs(10)), 0);
    let denied = gate.cli(&["audit", "--json", "--limit", "50"]).stdout;
    assert!(denied.contains("not tonight"), "{denied}");

    // A gated psql session, replayed in the console: its statements in order, with their
    // decision and rows, a hidden direction override shown escaped.
    let url = format!("postgres://mallory:ignored@127.0.0.1:{}/orders", pg.port);
    let ran = gate.run(
        "bot",
        &["--grant", "orders-db:read"],
        &[
            "psql",
            &url,
            "-X",
            "-At",
            "-c",
            "SELECT 1 AS first_statement",
            "-c",
            "SELECT name FROM users ORDER BY id",
            "-c",
            "SELECT 'left\u{202e}right' AS hostile_text",
        ],
    );
    assert_eq!(ran.code, 0, "{ran:?}");
    let sid = gate.wait_for(
        "the psql session's statements",
        Duration::from_secs(10),
        || {
            let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
            let id = sessions
                .as_array()?
                .iter()
                .find(|s| s["resource"] == "orders-db" && !s["ended_at"].is_null())?["id"]
                .as_str()?
                .to_owned();
            let detail = gate.cli(&["sessions", "show", &id, "--json"]).json();
            (detail["statements"].as_array()?.len() >= 3).then_some(id)
        },
    );
    let list = browser.goto(&format!("{console}/sessions"));
    assert_eq!(list["status"], 200, "{list}");
    assert!(list["text"].as_str().unwrap().contains(&sid), "{list}");
    let view = browser.click(&format!("a[href=\"/sessions/{sid}\"]"));
    let text = view["text"].as_str().unwrap();
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle} not in the replay view: {text}"))
    };
    assert!(
        at("SELECT 1 AS first_statement") < at("SELECT name FROM users ORDER BY id")
            && at("SELECT name FROM users ORDER BY id") < at("AS hostile_text"),
        "in order: {text}"
    );
    at("left\\u{202e}right");
    assert!(
        !text.contains('\u{202e}'),
        "the override reached the page: {text}"
    );
    at("allowed");
    at("3 rows");
    at("orders-db");
    // A statement held by a guardrail (DELETE without WHERE): its text on the card, Ann
    // approves it, it runs, and the session goes on.
    let mut held = gate.spawn(
        "bot",
        &["--grant", "orders-db:write"],
        &[
            "psql",
            &url,
            "-X",
            "-At",
            "-c",
            "DELETE FROM scratch",
            "-c",
            "SELECT 'after'",
        ],
    );
    let hid = gate.pending_request()["id"].as_str().unwrap().to_owned();
    let card = wait_for_card(&mut browser, &console, &hid);
    assert!(
        card["text"]
            .as_str()
            .unwrap()
            .contains("DELETE FROM scratch"),
        "{card}"
    );
    browser.approved(&hid);
    held.expect_line("DELETE", Duration::from_secs(10));
    held.expect_line("after", Duration::from_secs(10));
    assert_eq!(held.wait(Duration::from_secs(10)), 0);

    // The audit page: the log verifies, the gate is attached and healthy.
    let audit = browser.goto(&format!("{console}/audit"));
    assert_eq!(audit["status"], 200, "{audit}");
    let text = audit["text"].as_str().unwrap();
    assert!(text.contains("Audit log verified"), "{text}");
    assert!(
        text.contains("healthy") && !text.contains("UNHEALTHY"),
        "{text}"
    );
    assert!(
        text.contains("oidc ann@example.com"),
        "the decisions: {text}"
    );

    // Eve is signed in but named nowhere: she sees nothing and approves nothing.
    let mut third = gate.spawn(
        "bot",
        &[],
        &[
            "sh",
            "-c",
            &format!("jitgate request echo --reason third --wait && {probe} connect {target}"),
        ],
    );
    let id3 = gate.pending_request()["id"].as_str().unwrap().to_owned();
    let eve = browser.sign_in(&console, "eve");
    assert!(
        eve["text"].as_str().unwrap().contains("is none of these"),
        "{eve}"
    );
    assert!(!eve["text"].as_str().unwrap().contains(&id3), "{eve}");
    for path in [
        "/sessions".to_owned(),
        format!("/sessions/{sid}"),
        format!("/sessions/{sid}/recordings/1"),
        "/audit".to_owned(),
    ] {
        let refused = browser.goto(&format!("{console}{path}"));
        assert_eq!(refused["status"], 403, "{path}: {refused}");
        assert!(
            !refused["text"].as_str().unwrap().contains("SELECT"),
            "{refused}"
        );
    }
    let csrf = browser.csrf();
    let refused = browser.post(
        &format!("{console}/approve"),
        json!({"id": id3, "csrf": csrf}),
        json!({}),
    );
    assert_eq!(refused["status"], 403, "{refused}");
    assert!(
        refused["text"]
            .as_str()
            .unwrap()
            .contains("not an approver"),
        "{refused}"
    );

    // Wendy is an approver, but the request was filed by her own unix account.
    browser.sign_in(&console, "wendy");
    wait_for_card(&mut browser, &console, &id3);
    let csrf = browser.csrf();
    let refused = browser.post(
        &format!("{console}/approve"),
        json!({"id": id3, "csrf": csrf}),
        json!({}),
    );
    assert_eq!(refused["status"], 403, "{refused}");
    assert!(
        refused["text"].as_str().unwrap().contains("self-approval"),
        "{refused}"
    );
    assert_eq!(
        gate.cli(&["approvals", "--json"]).json()[0]["id"],
        id3.as_str()
    );

    // Signing out ends the session: the old page's forms no longer work.
    let out = browser.click("form[action=\"/logout\"] button");
    assert!(
        out["text"].as_str().unwrap().contains("signed out"),
        "{out}"
    );
    let stale = browser.post(
        &format!("{console}/deny"),
        json!({"id": id3, "csrf": csrf}),
        json!({}),
    );
    assert_eq!(stale["status"], 403, "{stale}");
    gate.cli(&["deny", &id3]).assert_ok();
    assert_ne!(third.wait(Duration::from_secs(10)), 0);
    browser.cmd(json!({"op": "close"}));
}

/// Step-up: a policy asks its approvers for a sign-in within the last 10 s with a second
/// factor. Root (an approver) cannot approve at the CLI; Ann signed in with a password is
/// sent to sign in again, and again when she does so without the second factor; with it she
/// approves and the workload proceeds. Ten seconds later her sign-in is too old for the next
/// request, while denying needs no step-up. A sign-in link asking for less than policy
/// allows is refused.
#[test]
fn step_up_needs_a_fresh_strong_sign_in() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let setup = Setup::start("console-stepup", |body| {
        body.workload("bot", &["root"])
            .resource("echo", &echo.addr.to_string())
            .policy(
                &["bot"],
                &["echo"],
                &["read"],
                "name = \"mfa-reads\"\nmax_ttl = \"1h\"\napproval = \"manual\"\napprovers = [\"root\", \"oidc-group:dba\"]\napproval_max_age = \"10s\"\napproval_acr = [\"urn:jitgate:mfa\"]",
            )
    });
    let (gate, console) = (&setup.gate, setup.console.as_str());
    let probe = gate.bins().probe.to_str().unwrap().to_owned();
    let target = echo.addr.to_string();
    let ask = |why: &str| {
        gate.spawn(
            "bot",
            &[],
            &[
                "sh",
                "-c",
                &format!("jitgate request echo --reason {why} --wait && {probe} connect {target}"),
            ],
        )
    };
    let mut first = ask("first");
    let id = gate.pending_request()["id"].as_str().unwrap().to_owned();

    // Root is an approver, but the CLI shows no sign-in.
    let cli = gate.cli(&["approve", &id]);
    assert_ne!(cli.code, 0, "{cli:?}");
    assert!(cli.stderr.contains("web console"), "{cli:?}");

    // Ann, signed in with a password: the card says what approving needs, and approving
    // sends her to sign in again.
    let mut browser = Browser::start();
    browser.sign_in(console, "ann");
    let page = wait_for_card(&mut browser, console, &id);
    assert!(
        page["text"]
            .as_str()
            .unwrap()
            .contains("a sign-in within the last 10s with urn:jitgate:mfa"),
        "{page}"
    );
    let again = browser.approve(&id);
    let text = again["text"].as_str().unwrap();
    assert!(
        text.contains("Sign in again") && text.contains("did not say when"),
        "{again}"
    );
    // Again, with a password only: fresh now, but not strong enough.
    browser.step_up("ann", "any");
    wait_for_card(&mut browser, console, &id);
    let again = browser.approve(&id);
    assert!(
        again["text"]
            .as_str()
            .unwrap()
            .contains("you signed in with `urn:jitgate:pwd`"),
        "{again}"
    );
    assert_eq!(
        gate.cli(&["approvals", "--json"]).json()[0]["id"],
        id.as_str(),
        "still pending"
    );
    // With the second factor: approved, and the workload proceeds.
    browser.step_up("ann", "otp");
    // She authenticated before this (whole seconds at the provider: 12 s on, at least 11).
    let signed = std::time::Instant::now();
    wait_for_card(&mut browser, console, &id);
    browser.approved(&id);
    first.expect_line(BANNER, Duration::from_secs(15));
    assert_eq!(first.wait(Duration::from_secs(10)), 0);
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    assert_eq!(grants[0]["approved_by"], "oidc ann@example.com", "{grants}");

    // Ten seconds on, that sign-in is too old for the next request; denying it is fine.
    let mut second = ask("second");
    let id2 = loop {
        let list = gate.cli(&["approvals", "--json"]).json();
        if let Some(q) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["id"] != id.as_str())
        {
            break q["id"].as_str().unwrap().to_owned();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(12).saturating_sub(signed.elapsed()));
    wait_for_card(&mut browser, console, &id2);
    let again = browser.approve(&id2);
    let text = again["text"].as_str().unwrap();
    assert!(
        text.contains("Sign in again") && text.contains(" s ago"),
        "{again}"
    );
    wait_for_card(&mut browser, console, &id2);
    let denied = browser.click(&format!("[data-request=\"{id2}\"] button.deny"));
    assert!(
        denied["text"].as_str().unwrap().contains("denied"),
        "{denied}"
    );
    assert_ne!(second.wait(Duration::from_secs(10)), 0);

    // Hostile sign-in links: an age below what policy may ask, a control character, a
    // value too long.
    let long = format!("acr={}", "x".repeat(300));
    for query in ["max_age=1", "max_age=x", "acr=a%0Ab", &long] {
        let refused = browser.goto(&format!("{console}/login?{query}"));
        assert_eq!(refused["status"], 400, "{query}: {refused}");
    }
    let audit = gate.cli(&["audit", "--json", "--limit", "50"]).stdout;
    assert!(audit.contains("oidc ann@example.com"), "{audit}");

    // A sign-in flood from one address: past its share of sign-ins under way (20) and its
    // rate (40 a minute) it gets 429s with Retry-After, and cuts off nobody: a sign-in under
    // way in the browser (another address) before the flood completes after it. Another
    // site's page (an image: not a navigation) cannot start sign-ins at all.
    browser.cmd(json!({"op": "context"}));
    let prompt = browser.goto(&format!("{console}/"));
    assert!(
        prompt["url"].as_str().unwrap().contains("/interaction/"),
        "{prompt}"
    );
    let flood = Command::new("curl")
        .args(["-sk", "--interface", "127.0.0.2", "-o", "/dev/null"])
        .args(["-w", "%{http_code}\\n"])
        .arg(format!("{console}/login?n=[1-50]"))
        .output()
        .expect("curl");
    let codes = String::from_utf8_lossy(&flood.stdout).into_owned();
    let started = codes.lines().filter(|c| *c == "303").count();
    let limited = codes.lines().filter(|c| *c == "429").count();
    assert_eq!((started, limited), (20, 30), "{codes}");
    let head = Command::new("curl")
        .args([
            "-sk",
            "--interface",
            "127.0.0.2",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .arg(format!("{console}/auth/callback?code=x&state=y"))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 429") && head.contains("retry-after:"),
        "a callback for no sign-in under way is counted too: {head}"
    );
    let image = Command::new("curl")
        .args([
            "-sk",
            "--interface",
            "127.0.0.3",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-H", "Sec-Fetch-Mode: no-cors"])
        .arg(format!("{console}/login"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&image.stdout), "403");
    browser.fill("input[name=login]", "ann");
    browser.fill("input[name=password]", "any");
    let mut back = browser.click("button[type=submit]");
    if back["url"].as_str().unwrap().contains("/interaction/") {
        back = browser.click("button[type=submit]");
    }
    assert!(back["url"].as_str().unwrap().starts_with(console), "{back}");
    assert!(
        back["text"].as_str().unwrap().contains("ann@example.com"),
        "{back}"
    );
    browser.cmd(json!({"op": "close"}));
}
