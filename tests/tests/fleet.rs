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
    fleet_body_via(pg.port, host_id, echo, "")
}

/// [`fleet_body`] for a host that reaches the database on `port` (a [`servers::Cable`] to
/// it, say), with `store_extra` added to its `[store]` table.
fn fleet_body_via(port: u16, host_id: &str, echo: &str, store_extra: &str) -> String {
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
        "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{port}/fleet\"\nsslmode = \"disable\"\nhost_id = \"{host_id}\"\n{store_extra}\n"
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

/// The store's state in `jitgate status --json`.
fn store_state(gate: &Gate) -> serde_json::Value {
    gate.cli(&["status", "--json"]).json()["store"].clone()
}

/// Lease used by the failure tests: short, to keep their wall time small.
const LEASE: &str = "store_lease = \"3s\"";

/// One host (A) loses its path to the shared store while the other (B) keeps it.
///
/// Hostile first: a grant revoked on B while A is cut off must end A's live session as soon
/// as A is back (the catch-up read on reconnecting applies it before any lease renewal),
/// not merely when the lease runs out. Then, cut off for good: no new grant, no new session
/// (a clear error naming the store), the live session runs to `store_lease` and ends;
/// mended: new grants work again.
#[test]
fn a_host_cut_off_from_the_store_fails_closed_and_recovers() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    let cable = servers::Cable::new(format!("127.0.0.1:{}", pg.port).parse().unwrap());
    let b = Gate::start("fleet-cut-b", "", &fleet_body(&pg, "host-b", &target));
    let a = Gate::start(
        "fleet-cut-a",
        "",
        &fleet_body_via(cable.addr.port(), "host-a", &target, LEASE),
    );
    let probe = a.bins().probe.to_str().unwrap().to_owned();
    let open = |gate: &Gate| {
        gate.wait_for("the store open", Duration::from_secs(10), || {
            (store_state(gate)["available"] == true).then_some(())
        })
    };
    open(&a);
    let granted = |w: &mut jitgate_e2e::Workload| {
        let id = b.pending_request()["id"].as_str().unwrap().to_owned();
        let approved = b.cli(&["approve", &id, "--json"]);
        approved.assert_ok();
        w.expect_line(&format!("connected {BANNER}"), Duration::from_secs(5));
        approved.json()["grant"]["id"].as_str().unwrap().to_owned()
    };

    // 1. Revoked elsewhere while cut off: applied on reconnecting.
    let mut w1 = a.spawn("bot", &[], &[&probe, "hold", &target]);
    let g1 = granted(&mut w1);
    cable.cut();
    let cut_at_ms = now_ms();
    b.cli(&["revoke", &g1, "--reason", "incident 9"])
        .assert_ok();
    std::thread::sleep(Duration::from_millis(300));
    cable.mend();
    let closed = cut_at(&w1.expect_line("closed", Duration::from_secs(10)));
    assert!(
        closed - cut_at_ms < 1800,
        "the revocation made while A was cut off applied {}ms after the cut (store_lease is 3 s: it must apply on reconnecting, not at the lease)",
        closed - cut_at_ms
    );

    // 2. Cut off for good: the live session runs to the lease, nothing new is let in.
    open(&a);
    let mut w2 = a.spawn("bot", &[], &[&probe, "hold", &target]);
    let _g2 = granted(&mut w2);
    cable.cut();
    let lost_at = now_ms();
    a.wait_for("A sees the store lost", Duration::from_secs(3), || {
        (store_state(&a)["state"] == "lost").then_some(())
    });
    let status = a.cli(&["status"]);
    assert!(
        status
            .stdout
            .contains("gate closed to new grants and sessions"),
        "{status:#?}"
    );
    let asked = a.cli(&["request", "echo", "--for", "bot"]);
    assert_ne!(asked.code, 0, "{asked:#?}");
    assert!(
        asked.stderr.contains("shared state store") && asked.stderr.contains("out of reach"),
        "{asked:#?}"
    );
    // A new workload cannot even start: its task cannot be recorded.
    let again = a.probe("bot", &["connect", &target]);
    assert!(
        !again.stdout.contains(BANNER) && again.stderr.contains("shared state store"),
        "a new workload while the store is lost: {again:#?}"
    );
    let closed = cut_at(&w2.expect_line("closed", Duration::from_secs(10)));
    let after = closed - lost_at;
    assert!(
        (1500..=4500).contains(&after),
        "the live session ended {after}ms after the store was lost (store_lease 3 s)"
    );
    // The session's end is logged as it is cut; the line may land just after the workload
    // saw its connection close.
    a.wait_for(
        "the session's end as store_lost in the log",
        Duration::from_secs(5),
        || a.log().contains("store_lost").then_some(()),
    );

    // 3. Mended: catch-up, the lease renewed, and new grants work again.
    cable.mend();
    open(&a);
    let mut w3 = a.spawn("bot", &[], &[&probe, "hold", &target]);
    granted(&mut w3);
}

/// Started while the store is down: the agent comes up with the gate closed and no grants
/// (a clear error naming the store), and opens by itself once PostgreSQL starts.
#[test]
fn an_agent_started_without_its_store_opens_when_the_store_starts() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    pg.stop();
    let a = Gate::start(
        "fleet-down-a",
        "",
        &fleet_body_via(pg.port, "host-a", &target, LEASE),
    );
    let store = store_state(&a);
    assert_eq!(store["state"], "connecting", "{store}");
    assert_eq!(store["available"], false, "{store}");
    let asked = a.cli(&["request", "echo", "--for", "bot"]);
    assert_ne!(asked.code, 0, "{asked:#?}");
    assert!(
        asked
            .stderr
            .contains("has not been reached since the agent started"),
        "{asked:#?}"
    );
    // `jitgate run` is refused before the workload starts (its task cannot be recorded).
    let refused = a.probe("bot", &["connect", &target]);
    assert!(
        !refused.stdout.contains(BANNER) && refused.stderr.contains("has not been reached"),
        "{refused:#?}"
    );

    pg.start_again();
    a.wait_for("the store reached", Duration::from_secs(10), || {
        (store_state(&a)["available"] == true).then_some(())
    });
    let b = Gate::start("fleet-down-b", "", &fleet_body(&pg, "host-b", &target));
    let probe = a.bins().probe.to_str().unwrap().to_owned();
    let mut w = a.spawn("bot", &[], &[&probe, "hold", &target]);
    let id = b.pending_request()["id"].as_str().unwrap().to_owned();
    b.cli(&["approve", &id]).assert_ok();
    w.expect_line(&format!("connected {BANNER}"), Duration::from_secs(5));
}

/// An interactive `psql` in a gated workload (`bot`, a read grant on `orders-db`): statements
/// go in one at a time, and each one's output is waited for.
struct Psql {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Psql {
    fn start(gate: &Gate, pg: &servers::Postgres) -> Self {
        Self::start_with(gate, pg, &["--grant", "orders-db:read"])
    }

    /// [`Psql::start`] with `jitgate run` arguments of the caller's choice (none: the
    /// connection is held until a request is approved).
    fn start_with(gate: &Gate, pg: &servers::Postgres, run_args: &[&str]) -> Self {
        let url = format!("postgres://bot@127.0.0.1:{}/orders", pg.port);
        let mut child = gate.spawn_stdin(
            "bot",
            run_args,
            &["psql", &url, "-X", "-At", "-v", "VERBOSITY=verbose"],
        );
        let stdin = child.stdin.take().expect("stdin");
        let (tx, lines) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            stdin,
            lines,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        use std::io::Write as _;
        self.stdin
            .write_all(format!("{text}\n").as_bytes())
            .expect("psql stdin");
        self.stdin.flush().expect("psql stdin");
    }

    fn expect(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    self.seen.push(line.clone());
                    return line;
                }
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("psql printed no {needle:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// Runs `SELECT 'tag'` and waits for its answer.
    fn select(&mut self, tag: &str) {
        self.send(&format!("SELECT '{tag}';"));
        self.expect(tag);
    }

    fn quit(mut self) {
        self.send("\\q");
        let _ = self.child.wait();
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One agent, host A, on a PostgreSQL server that is both the fleet's store (reached through
/// `cable`) and the gated resource `orders-db` (reached directly): cutting the cable cuts the
/// store only, the workload's session runs on.
fn spool_fleet(test: &str, store_extra: &str) -> (servers::Postgres, servers::Cable, Gate) {
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    pg.admin("postgres", "CREATE DATABASE orders");
    let cable = servers::Cable::new(format!("127.0.0.1:{}", pg.port).parse().unwrap());
    let body = Body::new()
        .workload("bot", &["root"])
        .resource_with(
            "orders-db",
            &format!("127.0.0.1:{}", pg.port),
            "protocol = \"postgres\"\ndatabases = [\"orders\"]\n[resource.credentials.read]\nuser = \"postgres\"\n",
        )
        .auto(&["bot"], &["orders-db"], &["read"])
        .build();
    let a = Gate::start(
        test,
        "",
        &format!(
            "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"host-a\"\nstore_lease = \"20s\"\n{store_extra}\n",
            cable.addr.port()
        ),
    );
    open(&a);
    (pg, cable, a)
}

fn open(gate: &Gate) {
    gate.wait_for("the store open", Duration::from_secs(15), || {
        (store_state(gate)["available"] == true).then_some(())
    });
}

/// The spool as `jitgate status --json` shows it, once the agent sees the store lost.
fn lost(gate: &Gate) {
    gate.wait_for("the store lost", Duration::from_secs(5), || {
        (store_state(gate)["state"] == "lost").then_some(())
    });
}

/// Waits until the spool holds records and has stopped growing (what the session did is in
/// it, on disk); returns its status.
fn spool_settled(gate: &Gate) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    gate.wait_for("the spool settled", Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = store_state(gate)["spool"].clone();
        let settled = now["records"].as_u64().unwrap_or(0) > 0 && now == last;
        last = now.clone();
        settled.then_some(now)
    })
}

/// Statements of host A's sessions on the shared store whose text contains `tag`.
fn stored(pg: &servers::Postgres, tag: &str) -> usize {
    pg.admin(
        "fleet",
        &format!(
            "SELECT count(*) FROM statements s JOIN sessions n ON n.id = s.session_id \
             WHERE n.host_id = 'host-a' AND s.text LIKE '%{tag}%'"
        ),
    )
    .trim()
    .parse()
    .expect("a count")
}

/// Store cut while a psql session runs: its statements go on being recorded into the local
/// spool; store back: the spool is shipped (before the host opens to anything new), every
/// statement is on the shared store exactly once, each session record once, and the host's
/// audit chain verifies.
#[test]
fn records_made_while_the_store_is_cut_are_spooled_and_shipped_once() {
    jitgate_e2e::root_or_skip!();
    let (pg, cable, a) = spool_fleet("fleet-spool", "");
    let mut psql = Psql::start(&a, &pg);
    psql.select("pre-1");
    psql.select("pre-2");
    cable.cut();
    lost(&a);
    for i in 1..=5 {
        psql.select(&format!("cut-{i}"));
    }
    let spool = spool_settled(&a);
    assert_eq!(spool["problem"], serde_json::Value::Null, "{spool}");
    assert_eq!(spool["dropped"], 0, "{spool}");
    assert_eq!(
        stored(&pg, "cut-"),
        0,
        "nothing reached the store while cut"
    );
    let status = a.cli(&["status"]);
    assert!(status.stdout.contains("spool "), "{status:#?}");

    cable.mend();
    open(&a);
    assert_eq!(store_state(&a)["spool"]["records"], 0);
    psql.select("post-1");
    psql.quit();
    a.wait_for(
        "the session ended on the store",
        Duration::from_secs(10),
        || {
            let outcome = pg.admin(
                "fleet",
                "SELECT outcome FROM sessions WHERE host_id = 'host-a' AND resource = 'orders-db'",
            );
            let outcome = outcome.trim();
            (!outcome.is_empty() && outcome != "open").then_some(())
        },
    );
    for (tag, n) in [("pre-", 2), ("cut-", 5), ("post-", 1)] {
        assert_eq!(stored(&pg, tag), n, "statements {tag}*");
    }
    let session = pg.admin(
        "fleet",
        "SELECT id FROM sessions WHERE host_id = 'host-a' AND resource = 'orders-db'",
    );
    let session = session.trim();
    for kind in ["session.start", "session.end"] {
        let n = pg.admin(
            "fleet",
            &format!(
                "SELECT count(*) FROM audit WHERE host_id = 'host-a' AND kind = '{kind}' AND detail LIKE '%{session}%'"
            ),
        );
        assert_eq!(n.trim(), "1", "{kind} of {session}");
    }
    let verified = a.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:#?}");
}

/// Hostile: the agent crashes while its spool holds records; started again (the store still
/// cut) it still holds them and ships them once the store is back, exactly once. Then the
/// spool is tampered with while the agent is down: the agent starts with its gate closed,
/// reports the damage, and never ships a record from it.
#[test]
fn a_spool_survives_a_crash_and_a_tampered_one_is_never_shipped() {
    jitgate_e2e::root_or_skip!();
    let (pg, cable, mut a) = spool_fleet("fleet-spool-crash", "");
    let mut psql = Psql::start(&a, &pg);
    psql.select("pre-1");
    cable.cut();
    lost(&a);
    for i in 1..=3 {
        psql.select(&format!("crash-{i}"));
    }
    let spool = spool_settled(&a);
    a.kill9();
    drop(psql);
    a.launch();
    let after = store_state(&a);
    assert_eq!(after["spool"]["records"], spool["records"], "{after}");
    assert_eq!(after["available"], false, "{after}");
    cable.mend();
    open(&a);
    assert_eq!(stored(&pg, "crash-"), 3);
    assert_eq!(stored(&pg, "pre-"), 1);
    let verified = a.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:#?}");

    // Tampered while the agent is down.
    let mut psql = Psql::start(&a, &pg);
    psql.select("pre-2");
    cable.cut();
    lost(&a);
    psql.select("tamper-1");
    psql.select("tamper-2");
    spool_settled(&a);
    a.kill9();
    drop(psql);
    let spool = a.dir.join("state/spool.sqlite");
    let edited = std::process::Command::new("sqlite3")
        .arg(&spool)
        .arg("UPDATE records SET body = replace(body, 'tamper-2', 'forged-2')")
        .output()
        .expect("sqlite3");
    assert!(edited.status.success(), "{edited:?}");
    a.launch();
    cable.mend();
    std::thread::sleep(Duration::from_secs(2));
    let store = store_state(&a);
    assert_eq!(
        store["available"], false,
        "a damaged spool keeps the gate closed: {store}"
    );
    let problem = store["spool"]["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("integrity check") && problem.contains("spool.sqlite"),
        "{store}"
    );
    assert_eq!(stored(&pg, "forged-"), 0, "a forged record was shipped");
    assert_eq!(
        stored(&pg, "tamper-"),
        0,
        "a record of a damaged spool was shipped"
    );
    let asked = a.cli(&["request", "orders-db", "--for", "bot"]);
    assert!(
        asked.code != 0 && asked.stderr.contains("integrity check"),
        "{asked:#?}"
    );
    assert!(a.cli(&["status"]).stdout.contains("DAMAGED"));
}

/// Hostile: a cut-off host whose spool fills up refuses new sessions with an error naming the
/// full spool (PostgreSQL: 57P03 with a hint), and what it did keep is shipped whole.
#[test]
fn a_full_spool_refuses_new_sessions_and_loses_nothing_it_took() {
    jitgate_e2e::root_or_skip!();
    let (pg, cable, a) = spool_fleet("fleet-spool-full", "spool_limit = \"4KiB\"");
    let mut psql = Psql::start(&a, &pg);
    psql.select("warm");
    cable.cut();
    lost(&a);
    let pad = "x".repeat(200);
    let mut n = 0;
    loop {
        n += 1;
        assert!(n < 40, "the spool never filled");
        psql.select(&format!("full-{n}-{pad}"));
        let spool = spool_settled(&a);
        if spool["bytes"].as_u64() >= spool["limit"].as_u64() {
            break;
        }
    }
    // A new connection from the running workload: refused, naming the spool.
    psql.send("\\connect orders");
    let refused = psql.expect("local spool is full");
    assert!(
        refused.contains("57P03") || refused.contains("FATAL"),
        "{refused}"
    );
    psql.expect("HINT");
    // The refusal's own records get no room past the limit (refusals can be provoked at
    // will, the reserve is for what live sessions did): not kept, and counted.
    a.wait_for("the refusal counted", Duration::from_secs(5), || {
        (store_state(&a)["spool"]["dropped"].as_u64() >= Some(1)).then_some(())
    });
    cable.mend();
    open(&a);
    assert_eq!(stored(&pg, "full-"), n, "every statement the spool took");
    let verified = a.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:#?}");
}

/// `audit verify --fleet` from host B over host A's records (and its own).
fn fleet_verify(b: &Gate) -> (i32, serde_json::Value) {
    let out = b.cli(&["audit", "verify", "--fleet", "--json"]);
    (out.code, out.json())
}

/// The report line of `host` in a `--fleet` report.
fn host_report(report: &serde_json::Value, host: &str) -> serde_json::Value {
    report["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["host"] == host).cloned())
        .unwrap_or_else(|| panic!("{host} missing from {report}"))
}

/// Hostile: someone with write access to the shared database, but without host A's keys,
/// edits, deletes, truncates, or swaps A's public key. Host B's `audit verify --fleet`
/// (A's HMAC key is not on B) names host A and the record each time; B's own chain stays ok.
#[test]
fn fleet_verify_from_another_host_finds_tampering() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let echo = servers::echo_server("127.0.0.1:0");
    let (pg, a, b) = fleet("fleet-verify", &echo.addr.to_string());

    // Records on both chains: filed and denied on A, filed on A and approved on B, revoked on A.
    let filed = |gate: &Gate| {
        let out = gate.cli(&["request", "echo", "--for", "bot", "--json"]);
        out.assert_ok();
        out.json()["id"].as_str().unwrap().to_owned()
    };
    let r1 = filed(&a);
    a.cli(&["deny", &r1]).assert_ok();
    let r2 = filed(&a);
    // Root filed it: another approver decides (self-approval is refused across hosts too).
    let approved = b.cli_as(APPROVER_USER, &["approve", &r2, "--json"]);
    approved.assert_ok();
    let grant = approved.json()["grant"]["id"].as_str().unwrap().to_owned();
    // Revoked on A once A has heard of it (before, A answers that it is not live there).
    a.wait_for("the grant live on A", Duration::from_secs(5), || {
        let live = a.cli(&["grants", "--json"]).json();
        live.as_array()
            .is_some_and(|l| l.iter().any(|g| g["id"] == grant.as_str()))
            .then_some(())
    });
    a.cli(&["revoke", &grant]).assert_ok();
    a.cli(&["grants", "--all"]).assert_ok(); // a read: the writer has committed
    let top: i64 = pg
        .admin(
            "fleet",
            "SELECT max(seq) FROM audit WHERE host_id = 'host-a'",
        )
        .trim()
        .parse()
        .unwrap();
    assert!(top >= 4, "host A has {top} records");

    let (code, report) = fleet_verify(&b);
    assert_eq!(code, 0, "{report}");
    for host in ["host-a", "host-b"] {
        assert_eq!(host_report(&report, host)["status"], "ok", "{report}");
    }
    // A's own verify sees no difference either.
    assert_eq!(a.cli(&["audit", "verify"]).code, 0);

    pg.admin(
        "fleet",
        "CREATE TABLE a_backup AS SELECT * FROM audit WHERE host_id = 'host-a';
         CREATE TABLE hosts_backup AS SELECT * FROM audit_hosts;",
    );
    let restore = || {
        pg.admin(
            "fleet",
            "DELETE FROM audit WHERE host_id = 'host-a';
             INSERT INTO audit SELECT * FROM a_backup;
             DELETE FROM audit_hosts;
             INSERT INTO audit_hosts SELECT * FROM hosts_backup;",
        );
        let (code, report) = fleet_verify(&b);
        assert_eq!(code, 0, "restored: {report}");
    };
    let failed_at = |what: &str, seq: i64, words: &str| {
        let (code, report) = fleet_verify(&b);
        assert_eq!(code, 9, "{what}: {report}");
        let host = host_report(&report, "host-a");
        assert_eq!(host["status"], "failed", "{what}: {report}");
        assert_eq!(host["first_bad_seq"], seq, "{what}: {report}");
        assert!(
            host["problems"].to_string().contains(words),
            "{what}: {report}"
        );
        assert_eq!(host_report(&report, "host-b")["status"], "ok", "{what}");
    };

    // 1. A field edited.
    pg.admin(
        "fleet",
        "UPDATE audit SET actor = 'user mallory' WHERE host_id = 'host-a' AND seq = 2",
    );
    failed_at("edited", 2, "does not match its signature");
    restore();

    // 2. One record deleted.
    pg.admin(
        "fleet",
        "DELETE FROM audit WHERE host_id = 'host-a' AND seq = 3",
    );
    failed_at("deleted", 3, "3..3 are missing (deleted)");
    restore();

    // 3. The tail cut off (below what B verified before).
    pg.admin(
        "fleet",
        &format!(
            "DELETE FROM audit WHERE host_id = 'host-a' AND seq >= {}",
            top - 1
        ),
    );
    failed_at(
        "truncated",
        top - 1,
        "missing from the end (this host verified up to",
    );
    restore();

    // 4. A's public key replaced with another valid one (B's, with its registration
    //    signature), nothing re-signed.
    pg.admin(
        "fleet",
        "UPDATE audit_hosts SET (public_key, signed_from, sig) =
            (SELECT public_key, signed_from, sig FROM audit_hosts WHERE host_id = 'host-b')
         WHERE host_id = 'host-a'",
    );
    let (code, report) = fleet_verify(&b);
    assert_eq!(code, 9, "{report}");
    let host = host_report(&report, "host-a");
    assert_eq!(host["status"], "failed", "{report}");
    assert!(
        host["problems"].to_string().contains("PUBLIC KEY CHANGED"),
        "{report}"
    );
    let text = b.cli(&["audit", "verify", "--fleet"]);
    assert_eq!(text.code, 9);
    assert!(
        text.stdout.contains("host-a: FAILED") && text.stdout.contains("audit-fleet-pins.json"),
        "{text:#?}"
    );
    restore();
}

/// The store's durability as `jitgate status --json` shows it, once it names `port`'s server.
fn durability_on(gate: &Gate, port: u16) -> serde_json::Value {
    gate.wait_for("the store's durability", Duration::from_secs(15), || {
        let d = store_state(gate)["durability"].clone();
        (d["server"] == format!("127.0.0.1:{port}")).then_some(d)
    })
}

/// Failover: the fleet's store is a primary with a synchronous standby, and each agent's
/// url names both, the standby first (hostile: an agent that took the first server that
/// answers would write to a standby; it must pass it over). A decision is acknowledged, the
/// primary is killed at once (`immediate`: a crash to its clients), and while no primary
/// exists the hosts stay closed (a standby is not a store) and a live session's statements
/// go to the spool. The standby is promoted: both hosts find it by themselves, the decision
/// acknowledged just before the crash is there and usable, a revocation on one host still
/// cuts the other's live session within a second, the spool is shipped once, and every
/// chain verifies (each host's, and the fleet's from the other host).
#[test]
fn failover_to_a_promoted_standby_loses_no_acknowledged_decision() {
    jitgate_e2e::root_or_skip!();
    ensure_approver_user();
    let started = std::time::Instant::now();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let primary = servers::Postgres::start();
    primary.admin("postgres", "CREATE DATABASE fleet");
    primary.admin("postgres", "CREATE DATABASE orders");
    let standby = primary.synchronous_standby();
    // The gated database is on the standby's server: it stays up through the failover, so
    // a session on it lives on while its records cannot reach the store.
    let body = Body::new()
        .workload("bot", &["root", APPROVER_USER])
        .resource_with(
            "echo",
            &target,
            "on_missing_grant = \"request\"\nhold_timeout = \"30s\"",
        )
        .resource_with(
            "orders-db",
            &format!("127.0.0.1:{}", standby.port),
            "protocol = \"postgres\"\ndatabases = [\"orders\"]\non_missing_grant = \"request\"\nhold_timeout = \"30s\"\n[resource.credentials.read]\nuser = \"postgres\"\n",
        )
        .policy(
            &["bot"],
            &["echo", "orders-db"],
            &["read"],
            &format!("approval = \"manual\"\napprovers = [\"root\", \"{APPROVER_USER}\"]"),
        )
        .build();
    // No target_session_attrs: the agent asks for read-write by itself.
    let config = |host: &str| {
        format!(
            "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"{host}\"\nstore_lease = \"20s\"\n",
            standby.port, primary.port
        )
    };
    let a = Gate::start("fleet-failover-a", "", &config("host-a"));
    let b = Gate::start("fleet-failover-b", "", &config("host-b"));
    open(&a);
    open(&b);
    for gate in [&a, &b] {
        let d = durability_on(gate, primary.port);
        assert_eq!(d["synchronous_commit"], "on", "{d}");
        assert_eq!(d["synchronous_standby_names"], "*", "{d}");
    }
    let status = a.cli(&["status"]);
    assert!(
        status
            .stdout
            .contains("an acknowledged decision survives a failover"),
        "{status:#?}"
    );

    // Before: a live echo session and a live psql session on A, approved on B.
    let probe = a.bins().probe.to_str().unwrap().to_owned();
    let approve = |id: &str| {
        let approved = b.cli(&["approve", id, "--json"]);
        approved.assert_ok();
        approved.json()["grant"]["id"].as_str().unwrap().to_owned()
    };
    let mut held = a.spawn("bot", &[], &[&probe, "hold", &target]);
    let echo_grant = approve(b.pending_request()["id"].as_str().unwrap());
    held.expect_line(&format!("connected {BANNER}"), Duration::from_secs(5));
    let mut psql = Psql::start_with(&a, &standby, &[]);
    approve(b.pending_request()["id"].as_str().unwrap());
    psql.select("before-1");
    // The decision the crash must not lose: acknowledged, then the primary dies at once.
    let filed = a.cli(&["request", "echo", "--for", "bot", "--json"]);
    filed.assert_ok();
    let last = filed.json()["id"].as_str().unwrap().to_owned();
    let approved = b.cli_as(APPROVER_USER, &["approve", &last, "--json"]);
    approved.assert_ok();
    let last_grant = approved.json()["grant"]["id"].as_str().unwrap().to_owned();
    primary.stop();

    // No primary: the hosts are closed (the standby answers, and is not taken), the live
    // sessions go on within store_lease, and their records are spooled.
    lost(&a);
    for i in 1..=3 {
        psql.select(&format!("outage-{i}"));
    }
    let spool = spool_settled(&a);
    assert_eq!(spool["problem"], serde_json::Value::Null, "{spool}");
    std::thread::sleep(Duration::from_millis(1500));
    for gate in [&a, &b] {
        let store = store_state(gate);
        assert_eq!(
            store["available"], false,
            "a standby taken as the store: {store}"
        );
        assert_eq!(store["state"], "lost", "{store}");
    }
    let asked = a.cli(&["request", "echo", "--for", "bot"]);
    assert_ne!(asked.code, 0, "a request with no primary: {asked:#?}");

    // Promoted: both hosts find the new primary, catch up and ship their spools.
    let promoted_at = std::time::Instant::now();
    standby.promote();
    open(&a);
    open(&b);
    let reconnect = promoted_at.elapsed();
    let d = durability_on(&a, standby.port);
    assert_eq!(d["synchronous_standby_names"], "", "{d}");
    let status = a.cli(&["status"]);
    assert!(
        status.stdout.contains("NO synchronous standby"),
        "the new primary has no standby yet, and status says so: {status:#?}"
    );
    assert!(
        a.log().contains("decisions can be lost on a failover"),
        "{}",
        a.log()
    );
    assert_eq!(store_state(&a)["spool"]["records"], 0);

    // The decision acknowledged just before the crash survived, and is usable.
    let kept = standby.admin(
        "fleet",
        &format!("SELECT count(*) FROM grants WHERE id = '{last_grant}' AND revoked_at IS NULL"),
    );
    assert_eq!(kept.trim(), "1", "grant {last_grant} lost in the failover");
    let grants = a.cli(&["grants", "--json"]).json();
    for g in [&echo_grant, &last_grant] {
        assert!(
            grants
                .as_array()
                .is_some_and(|l| l.iter().any(|x| x["id"] == g.as_str())),
            "grant {g} not live on A after the failover: {grants}"
        );
    }
    let through = a.probe("bot", &["connect", &target]);
    assert!(
        through.stdout.contains(BANNER),
        "a new connection on the surviving grant: {through:#?}"
    );
    psql.select("after-1");

    // A revocation on B after the failover cuts A's live session within a second.
    let before = now_ms();
    b.cli(&["revoke", &echo_grant, "--reason", "after failover"])
        .assert_ok();
    let cut = cut_at(&held.expect_line("closed", Duration::from_secs(10)));
    assert!(
        cut - before <= 1000,
        "cut {}ms after the revoke on B",
        cut - before
    );

    // Shipped once; every chain verifies on the new primary.
    psql.quit();
    a.cli(&["grants", "--all"]).assert_ok();
    let stored_on = |tag: &str| -> usize {
        standby
            .admin(
                "fleet",
                &format!(
                    "SELECT count(*) FROM statements s JOIN sessions n ON n.id = s.session_id \
                     WHERE n.host_id = 'host-a' AND s.text LIKE '%{tag}%'"
                ),
            )
            .trim()
            .parse()
            .expect("a count")
    };
    a.wait_for(
        "the statements on the store",
        Duration::from_secs(10),
        || (stored_on("after-") == 1).then_some(()),
    );
    for (tag, n) in [("before-", 1), ("outage-", 3), ("after-", 1)] {
        assert_eq!(stored_on(tag), n, "statements {tag}*");
    }
    for gate in [&a, &b] {
        let verified = gate.cli(&["audit", "verify"]);
        assert_eq!(verified.code, 0, "{verified:#?}");
    }
    let (code, report) = fleet_verify(&b);
    assert_eq!(code, 0, "{report}");
    for host in ["host-a", "host-b"] {
        assert_eq!(host_report(&report, host)["status"], "ok", "{report}");
    }
    eprintln!(
        "failover: reconnected {reconnect:?} after the promotion; test {:?}",
        started.elapsed()
    );
}

/// Two hosts sharing one PostgreSQL server as their store (`fleet`) and as the gated
/// resource `orders-db` (`orders`, `hosts = "fleet"` in its policy), plus the tcp resource
/// `echo` whose policy leaves `hosts` at its default (the requesting host). Both refuse a
/// connection without a grant.
fn scoped_fleet(test: &str, echo: &str) -> (servers::Postgres, Gate, Gate) {
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    pg.admin("postgres", "CREATE DATABASE orders");
    let body = |host: &str| {
        let body = Body::new()
            .workload("bot", &["root"])
            .resource_with(
                "orders-db",
                &format!("127.0.0.1:{}", pg.port),
                "protocol = \"postgres\"\ndatabases = [\"orders\"]\n[resource.credentials.read]\nuser = \"postgres\"\n",
            )
            .resource("echo", echo)
            .policy(
                &["bot"],
                &["orders-db"],
                &["read"],
                "name = \"orders-anywhere\"\nmax_ttl = \"1h\"\napproval = \"auto\"\nhosts = \"fleet\"",
            )
            .policy(
                &["bot"],
                &["echo"],
                &["read"],
                "name = \"echo-here\"\nmax_ttl = \"1h\"\napproval = \"auto\"",
            )
            .build();
        format!(
            "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"{host}\"\n",
            pg.port
        )
    };
    let a = Gate::start(&format!("{test}-a"), "", &body("host-a"));
    let b = Gate::start(&format!("{test}-b"), "", &body("host-b"));
    (pg, a, b)
}

/// `SELECT 'tag'` through the gate as workload `bot` on `gate`: psql's output and errors.
fn psql_select(gate: &Gate, pg: &servers::Postgres, tag: &str) -> jitgate_e2e::Ran {
    let url = format!("postgres://bot:made-up@127.0.0.1:{}/orders", pg.port);
    gate.run(
        "bot",
        &[],
        &["psql", &url, "-X", "-At", "-c", &format!("SELECT '{tag}'")],
    )
}

/// Files `args` on `gate` for `bot` as root; the grant it issued (auto policies).
fn granted(gate: &Gate, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["request"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--for", "bot", "--json"]);
    let out = gate.cli(&all);
    out.assert_ok();
    let request = out.json();
    assert_eq!(request["status"], "approved", "{request}");
    let id = request["grant"].as_str().unwrap().to_owned();
    let grants = gate.cli(&["grants", "--json"]).json();
    grants
        .as_array()
        .and_then(|g| g.iter().find(|g| g["id"] == id.as_str()).cloned())
        .unwrap_or_else(|| panic!("grant {id} not listed: {grants}"))
}

/// Waits until `gate` lists grant `id` (it learns of other hosts' grants by the store's
/// change feed).
fn listed(gate: &Gate, id: &str) {
    gate.wait_for("the grant listed", Duration::from_secs(5), || {
        gate.cli(&["grants", "--json"])
            .json()
            .as_array()
            .is_some_and(|l| l.iter().any(|g| g["id"] == id))
            .then_some(())
    });
}

/// Host scopes, hostile side first: a grant filed on A under a policy with the default scope
/// (the requesting host) works on A; on B, a workload of the same identity is refused, and
/// the refusal names the grant, its scope and what to do. A PostgreSQL grant narrowed to A by
/// the request (`--hosts requesting`, within its `fleet` policy) is refused on B with an
/// ErrorResponse (28000) naming them too; a request asking wider than policy (`--hosts fleet`
/// for `echo`) is refused. A grant under the `fleet` policy works on both hosts.
#[test]
fn a_grant_scoped_to_one_host_is_refused_on_another_and_a_fleet_grant_works_on_both() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let (pg, a, b) = scoped_fleet("fleet-scope", &target);

    // echo: default scope, filed on A.
    let grant = granted(&a, &["echo"]);
    assert_eq!(grant["hosts"], serde_json::json!(["host-a"]), "{grant}");
    let id = grant["id"].as_str().unwrap().to_owned();
    let on_a = a.probe("bot", &["connect", &target]);
    assert!(on_a.stdout.contains(BANNER), "usable on A: {on_a:#?}");
    listed(&b, &id);
    let shown = b.cli(&["grants"]);
    assert!(
        shown.stdout.contains(&id) && shown.stdout.contains("host-a"),
        "B lists A's grant with its scope: {shown:#?}"
    );
    let on_b = b.probe("bot", &["connect", &target]);
    assert!(!on_b.stdout.contains(BANNER), "not usable on B: {on_b:#?}");
    let refusal = b.wait_for("B's refusal recorded", Duration::from_secs(5), || {
        b.cli(&["sessions", "--all", "--json"])
            .json()
            .as_array()
            .and_then(|s| s.iter().find(|s| s["resource"] == "echo").cloned())
    });
    assert_eq!(refusal["outcome"], "refused_no_grant", "{refusal}");
    let why = refusal["detail"].as_str().unwrap_or_default();
    assert!(
        why.contains(&id)
            && why.contains("scoped to hosts host-a")
            && why.contains("this host is host-b")
            && why.contains("jitgate request echo --access read"),
        "{refusal}"
    );
    // The grant's audit record says where it may be used.
    let issued = a.cli(&["audit", "--json"]).json();
    let record = issued
        .as_array()
        .and_then(|r| r.iter().find(|r| r["kind"] == "grant.issued").cloned())
        .expect("grant.issued");
    assert_eq!(
        record["detail"]["hosts"],
        serde_json::json!(["host-a"]),
        "{record}"
    );

    // A request may narrow, never widen: `echo` asked for the fleet is refused.
    let wider = a.cli(&["request", "echo", "--for", "bot", "--hosts", "fleet"]);
    assert_ne!(wider.code, 0, "{wider:#?}");
    assert!(
        wider.stderr.contains("policy echo-here") && wider.stderr.contains("not on fleet"),
        "{wider:#?}"
    );

    // orders-db narrowed to A: works on A, an ErrorResponse on B naming grant and scope.
    let narrow = granted(&a, &["orders-db", "--hosts", "requesting"]);
    assert_eq!(narrow["hosts"], serde_json::json!(["host-a"]), "{narrow}");
    let narrow_id = narrow["id"].as_str().unwrap().to_owned();
    let ok = psql_select(&a, &pg, "scoped-to-a");
    assert!(ok.stdout.contains("scoped-to-a"), "{ok:#?}");
    listed(&b, &narrow_id);
    let refused = psql_select(&b, &pg, "scoped-to-a");
    assert!(!refused.stdout.contains("scoped-to-a"), "{refused:#?}");
    assert!(
        refused.stderr.contains("28000")
            || refused.stderr.contains("has no read grant for orders-db"),
        "{refused:#?}"
    );
    assert!(
        refused.stderr.contains(&narrow_id) && refused.stderr.contains("scoped to hosts host-a"),
        "the error names the grant and its scope: {refused:#?}"
    );
    assert!(
        refused
            .stderr
            .contains("HINT:  jitgate request orders-db --access read"),
        "{refused:#?}"
    );
    a.cli(&["revoke", &narrow_id]).assert_ok();

    // orders-db under its fleet policy: one grant, usable on both hosts.
    let fleet = granted(&a, &["orders-db"]);
    assert_eq!(fleet["hosts"], "fleet", "{fleet}");
    let fleet_id = fleet["id"].as_str().unwrap().to_owned();
    let on_a = psql_select(&a, &pg, "fleet-on-a");
    assert!(on_a.stdout.contains("fleet-on-a"), "{on_a:#?}");
    listed(&b, &fleet_id);
    let on_b = psql_select(&b, &pg, "fleet-on-b");
    assert!(on_b.stdout.contains("fleet-on-b"), "{on_b:#?}");
}

/// A fleet of two whose grants are usable on every host (an automatic `fleet` policy), with
/// a change log kept for an hour (the shortest retention; the pruner then runs every 5 s) and
/// a lease long enough that a paused host does not lapse.
fn pruned_fleet(test: &str, echo: &str) -> (servers::Postgres, Gate, Gate) {
    let pg = servers::Postgres::start();
    pg.admin("postgres", "CREATE DATABASE fleet");
    let body = |host: &str| {
        let body = Body::new()
            .workload("bot", &["root"])
            .resource("echo", echo)
            .policy(
                &["bot"],
                &["echo"],
                &["read"],
                "name = \"echo-fleet\"\nmax_ttl = \"1h\"\napproval = \"auto\"\nhosts = \"fleet\"",
            )
            .build();
        format!(
            "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"{host}\"\nchange_log_retention = \"1h\"\nstore_lease = \"120s\"\n",
            pg.port
        )
    };
    let a = Gate::start(&format!("{test}-a"), "", &body("host-a"));
    let b = Gate::start(&format!("{test}-b"), "", &body("host-b"));
    (pg, a, b)
}

/// The change log is pruned past a host that was away (its agent paused, its connections
/// still open): the revocation and the new grant made meanwhile are gone from the log. Back,
/// the host must not read on as if nothing happened: it notices its place is gone, reloads
/// its live grants as at start (logged), so the revoked grant's live session is cut and the
/// new grant is usable there.
#[test]
fn a_host_behind_the_pruned_change_log_reloads_its_grants() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let (pg, a, b) = pruned_fleet("fleet-prune", &target);
    let g1 = granted(&a, &["echo"])["id"].as_str().unwrap().to_owned();
    listed(&b, &g1);
    // Riding on g1 (no grant of the task's own).
    let probe = b.bins().probe.to_str().unwrap().to_owned();
    let mut w = b.spawn("bot", &[], &[&probe, "hold", &target]);
    w.expect_line(&format!("connected {BANNER}"), Duration::from_secs(10));

    // B paused (SIGSTOP: its follower reads nothing); meanwhile A revokes g1 and issues g2,
    // and the log is pruned past both (their rows made older than the retention).
    b.signal(libc::SIGSTOP);
    let resumed = scopeguard(&b);
    a.cli(&["revoke", &g1, "--reason", "incident 12"])
        .assert_ok();
    let g2 = granted(&a, &["echo"])["id"].as_str().unwrap().to_owned();
    pg.admin(
        "fleet",
        "UPDATE changes SET at = now() - interval '2 hours'",
    );
    a.wait_for("the log pruned by A", Duration::from_secs(30), || {
        (pg.admin("fleet", "SELECT count(*) FROM changes").trim() == "0").then_some(())
    });
    let through: i64 = pg
        .admin("fleet", "SELECT through FROM changes_pruned")
        .trim()
        .parse()
        .unwrap();
    assert!(through > 0, "the cut is recorded");
    drop(resumed);

    // Back: g1's session on B is cut as revoked, g2 works on B.
    w.expect_line("closed", Duration::from_secs(15));
    b.wait_for("the reload in B's log", Duration::from_secs(5), || {
        b.log()
            .contains("reloading live grants and waiting requests from the store")
            .then_some(())
    });
    b.wait_for("B's session record", Duration::from_secs(5), || {
        b.cli(&["sessions", "--all", "--json"])
            .json()
            .as_array()
            .and_then(|s| s.iter().find(|s| s["grant"] == g1.as_str()).cloned())
            .filter(|s| s["outcome"] == "grant_revoked")
    });
    listed(&b, &g2);
    let live = b.cli(&["grants", "--json"]).json();
    assert!(
        live.as_array()
            .is_some_and(|l| l.iter().all(|g| g["id"] != g1.as_str())),
        "the revoked grant is gone on B: {live}"
    );
    let on_b = b.probe("bot", &["connect", &target]);
    assert!(on_b.stdout.contains(BANNER), "g2 usable on B: {on_b:#?}");
}

/// Continues a paused agent when dropped (a failed assertion must not leave it stopped).
fn scopeguard(gate: &Gate) -> impl Drop + '_ {
    struct Resume<'a>(&'a Gate);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0.signal(libc::SIGCONT);
        }
    }
    Resume(gate)
}

/// Removes `gate`'s spool files (the agent stopped).
fn remove_spool(gate: &Gate) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(gate.dir.join(format!("state/spool.sqlite{suffix}")));
    }
}

/// Hostile: the spool file deleted while the agent is stopped with records in it (kept during
/// an outage). Back, the host records the loss: `audit verify` exits 10 naming the lost spool
/// and what to do, `audit verify --fleet` shows the host as RECORDS LOST, the log says so.
/// Then the clean way: stopped, `jitgated --retire-spool` (refused while the agent runs),
/// started with a new spool: no second alarm.
#[test]
fn a_deleted_spool_is_reported_lost_and_a_retired_one_is_not() {
    jitgate_e2e::root_or_skip!();
    let (pg, cable, mut a) = spool_fleet("fleet-spool-lost", "");
    let mut psql = Psql::start(&a, &pg);
    psql.select("pre-1");
    cable.cut();
    lost(&a);
    psql.select("gone-1");
    psql.select("gone-2");
    spool_settled(&a);
    a.stop();
    drop(psql);
    remove_spool(&a);
    cable.mend();
    a.launch();
    open(&a);
    a.wait_for("the loss in the log", Duration::from_secs(5), || {
        a.log().contains("SPOOLED RECORDS LOST").then_some(())
    });
    assert_eq!(stored(&pg, "gone-"), 0, "the deleted records never arrive");
    let verified = a.cli(&["audit", "verify"]);
    assert_eq!(verified.code, 10, "{verified:#?}");
    assert!(
        verified.stdout.contains("RECORDS LOST on this host")
            && verified.stdout.contains("is LOST")
            && verified.stdout.contains("jitgated --retire-spool"),
        "{verified:#?}"
    );
    let report = a.cli(&["audit", "verify", "--json"]).json();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert_eq!(report["lost"].as_array().map(Vec::len), Some(1), "{report}");
    let fleet = a.cli(&["audit", "verify", "--fleet"]);
    assert_eq!(fleet.code, 10, "{fleet:#?}");
    assert!(fleet.stdout.contains("host-a: RECORDS LOST"), "{fleet:#?}");

    // On purpose: refused while the agent runs, done once it is stopped.
    let retire = |gate: &Gate| {
        std::process::Command::new(&gate.bins().jitgated)
            .arg("--config")
            .arg(&gate.config)
            .arg("--retire-spool")
            .output()
            .expect("jitgated --retire-spool")
    };
    let running = retire(&a);
    assert!(!running.status.success(), "{running:?}");
    assert!(
        String::from_utf8_lossy(&running.stderr).contains("jitgated is running"),
        "{running:?}"
    );
    a.stop();
    let retired = retire(&a);
    assert!(retired.status.success(), "{retired:?}");
    assert!(
        String::from_utf8_lossy(&retired.stdout).contains("retired spool"),
        "{retired:?}"
    );
    assert!(!a.dir.join("state/spool.sqlite").exists());
    a.launch();
    open(&a);
    let losses = pg.admin(
        "fleet",
        "SELECT count(*) FROM audit WHERE host_id = 'host-a' AND kind = 'spool.lost'",
    );
    assert_eq!(
        losses.trim(),
        "1",
        "a retired spool's successor is no alarm"
    );
    let retirements = pg.admin(
        "fleet",
        "SELECT count(*) FROM audit WHERE host_id = 'host-a' AND kind = 'spool.retired'",
    );
    assert_eq!(retirements.trim(), "1");
}

/// `require_sync_standby = true`: with a synchronous standby streaming, grants are issued as
/// usual; with it gone, a new grant is refused at once with an error naming the setting
/// (rather than hanging on a commit that waits for a standby, or committing one a failover
/// could lose).
#[test]
fn require_sync_standby_refuses_grants_while_no_synchronous_standby_streams() {
    jitgate_e2e::root_or_skip!();
    let echo = servers::echo_server("127.0.0.1:0");
    let target = echo.addr.to_string();
    let primary = servers::Postgres::start();
    primary.admin("postgres", "CREATE DATABASE fleet");
    let standby = primary.synchronous_standby();
    let body = Body::new()
        .workload("bot", &["root"])
        .resource("echo", &target)
        .policy(
            &["bot"],
            &["echo"],
            &["read"],
            "name = \"echo-auto\"\nmax_ttl = \"1h\"\napproval = \"auto\"",
        )
        .build();
    let a = Gate::start(
        "fleet-sync-required",
        "",
        &format!(
            "{body}\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://postgres@127.0.0.1:{}/fleet\"\nsslmode = \"disable\"\nhost_id = \"host-a\"\nrequire_sync_standby = true\n",
            primary.port
        ),
    );
    open(&a);
    let streaming = || {
        primary
            .admin(
                "postgres",
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .trim()
            .to_owned()
    };
    assert_eq!(streaming(), "1");
    let first = granted(&a, &["echo"])["id"].as_str().unwrap().to_owned();
    a.cli(&["revoke", &first]).assert_ok();
    standby.stop();
    a.wait_for("the standby gone", Duration::from_secs(10), || {
        (streaming() == "0").then_some(())
    });
    let refused = a.cli(&["request", "echo", "--for", "bot"]);
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(
        refused.stderr.contains("require_sync_standby")
            && refused.stderr.contains("no synchronous standby"),
        "{refused:#?}"
    );
}
