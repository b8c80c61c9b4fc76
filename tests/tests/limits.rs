//! One workload must not take service from others: floods of idle, slow, half-open and
//! connect-and-close connections without a grant, and too many sessions under one grant, are
//! refused by limits and timeouts with PostgreSQL errors, while another identity's psql still
//! works through the gate and the audit log stays small.

use std::time::{Duration, Instant};

use jitgate_e2e::{Gate, config::Body, servers::Postgres};
use serde_json::Value;

/// The hostile client, run as a gated workload: `MODE PORT [N]`, prints one JSON line.
const HOSTILE: &str = r#"
import json, resource, socket, struct, sys, threading, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, port = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 0
ADDR = ("127.0.0.1", port)

def startup():
    body = struct.pack("!i", 196608) + b"user\0mallory\0database\0orders\0\0"
    return struct.pack("!i", len(body) + 4) + body

def sqlstate(data):
    if data[:1] == b"N":
        data = data[1:]
    i = 0
    while i + 5 <= len(data):
        tag, ln = data[i:i+1], struct.unpack("!i", data[i+1:i+5])[0]
        if tag == b"E":
            for f in data[i+5:i+1+ln].split(b"\0"):
                if f[:1] == b"C":
                    return f[1:].decode()
        if tag == b"Z":
            return "ready"
        i += 1 + ln
    return "none" if not data else "partial"

def read(s, timeout, until_ready=False):
    s.settimeout(timeout)
    out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
            if until_ready and (b"Z\0\0\0\x05" in out or out[:1] == b"E"):
                break
    except OSError:
        pass
    return out

def tally(states):
    counts = {}
    for st in states:
        counts[st] = counts.get(st, 0) + 1
    return counts

if mode == "idle":
    socks, failed = [], 0
    for _ in range(n):
        s = socket.socket()
        try:
            s.connect(ADDR)
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    print(json.dumps({"opened": len(socks)}), flush=True)
    time.sleep(float(sys.argv[4]))
    states = []
    for s in socks:
        states.append(sqlstate(read(s, 0.01)))
    print(json.dumps({"connect_failed": failed, "states": tally(states)}), flush=True)
elif mode == "slow":
    result = {}
    def trickle():
        s = socket.create_connection(ADDR)
        t = time.time()
        for b in startup():
            try:
                s.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.3)
            s.setblocking(False)
            try:
                got = s.recv(65536)
            except BlockingIOError:
                got = None
            except OSError:
                got = b""
            s.setblocking(True)
            if got is not None:
                result["trickle"] = [sqlstate(got + read(s, 1)), round(time.time() - t, 1)]
                return
        result["trickle"] = [sqlstate(read(s, 10)), round(time.time() - t, 1)]
    def ssl():
        s = socket.create_connection(ADDR)
        t = time.time()
        s.sendall(struct.pack("!ii", 8, 80877103))
        result["ssl"] = [sqlstate(read(s, 10)), round(time.time() - t, 1)]
    threads = [threading.Thread(target=trickle), threading.Thread(target=ssl)]
    for th in threads: th.start()
    for th in threads: th.join()
    print(json.dumps(result), flush=True)
elif mode == "churn":
    failed = 0
    for _ in range(n):
        try:
            s = socket.create_connection(ADDR)
            s.close()
        except OSError:
            failed += 1
    print(json.dumps({"churned": n, "connect_failed": failed}), flush=True)
elif mode == "granted":
    socks, states = [], []
    for _ in range(n):
        s = socket.create_connection(ADDR)
        s.sendall(startup())
        states.append(sqlstate(read(s, 10, until_ready=True)))
        socks.append(s)
    print(json.dumps({"states": tally(states)}), flush=True)
"#;

fn body(pg: &Postgres) -> String {
    let secret = |role: &str| pg.secrets.join(format!("{role}.pw")).display().to_string();
    let keys = format!(
        r#"protocol = "postgres"
databases = ["orders"]
max_sessions_per_grant = 4
[resource.credentials.read]
user = "orders_ro"
password_file = "{ro}"
"#,
        ro = secret("orders_ro"),
    );
    Body::new()
        .workload("bot", &["root"])
        .workload("good", &["root"])
        .resource_with("orders-db", &format!("127.0.0.1:{}", pg.port), &keys)
        .policy(
            &["bot", "good"],
            &["orders-db"],
            &["read"],
            "max_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"root\"]",
        )
        .build()
}

fn json_line(text: &str) -> Value {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn a_flood_from_one_workload_leaves_service_to_others() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start(
        "limits-flood",
        "startup_timeout = \"2s\"\nmax_pending_per_identity = 32",
        &body(&pg),
    );
    let script = gate.dir.join("hostile.py");
    std::fs::write(&script, HOSTILE).expect("script");
    let script = script.display().to_string();
    let port = pg.port.to_string();
    let good_psql = || {
        let url = format!("postgres://x:y@127.0.0.1:{}/orders", pg.port);
        let started = Instant::now();
        let ran = gate.run(
            "good",
            &["--grant", "orders-db:read"],
            &["psql", &url, "-X", "-At", "-c", "select 'served'"],
        );
        (ran, started.elapsed())
    };

    // (a) Thousands of idle connections without a grant: all but the pending slots refused at
    // once with 53300, the pending ones cut at startup_timeout with 08P01...
    let mut idle = gate.spawn(
        "bot",
        &[],
        &["python3", &script, "idle", &port, "3000", "4"],
    );
    idle.expect_line("opened", Duration::from_secs(60));
    // ...while another identity's psql is served, promptly.
    let (ran, took) = good_psql();
    assert!(ran.stdout.contains("served"), "{ran:#?}");
    assert!(took < Duration::from_secs(10), "psql took {took:?}");
    let line = idle.expect_line("states", Duration::from_secs(60));
    let flood = json_line(&line);
    eprintln!("idle flood: {flood}");
    let states = &flood["states"];
    let refused = states["53300"].as_u64().unwrap_or(0);
    let timed_out = states["08P01"].as_u64().unwrap_or(0);
    assert!(refused >= 2900, "{flood}");
    assert!((1..=32).contains(&timed_out), "{flood}");
    assert_eq!(
        refused + timed_out,
        3000 - flood["connect_failed"].as_u64().unwrap_or(0),
        "every connection answered with one of the two: {flood}"
    );

    // A startup packet sent byte by byte, and an SSLRequest followed by silence: cut at the
    // startup timeout with 08P01, not held.
    let ran = gate.run("bot", &[], &["python3", &script, "slow", &port]);
    let slow = json_line(&ran.stdout);
    eprintln!("slow: {slow}");
    for variant in ["trickle", "ssl"] {
        assert_eq!(slow[variant][0], "08P01", "{variant}: {slow} {ran:#?}");
        let after = slow[variant][1].as_f64().unwrap_or(99.0);
        assert!((1.5..6.0).contains(&after), "{variant} cut after {after}s");
    }

    // (c) Connect and close without a grant, in a loop.
    let ran = gate.run("bot", &[], &["python3", &script, "churn", &port, "3000"]);
    assert_eq!(json_line(&ran.stdout)["churned"], 3000, "{ran:#?}");

    // (b) One grant cannot open more sessions than max_sessions_per_grant.
    let ran = gate.run(
        "bot",
        &["--grant", "orders-db:read"],
        &["python3", &script, "granted", &port, "7"],
    );
    let granted = json_line(&ran.stdout);
    eprintln!("granted: {granted}");
    assert_eq!(granted["states"]["ready"], 4, "{granted} {ran:#?}");
    assert_eq!(granted["states"]["53300"], 3, "{granted}");
    let (ran, _) = good_psql();
    assert!(ran.stdout.contains("served"), "{ran:#?}");

    // The audit log holds a bounded number of refusal rows for some 6000 refusals, and the
    // folded records account for them.
    std::thread::sleep(Duration::from_secs(6));
    let rows: u64 = gate
        .sqlite("select count(*) from audit where kind in ('session.refused', 'sessions.refused')")
        .trim()
        .parse()
        .expect("count");
    // Per identity, resource and outcome: ten in full and one folded record each 5 s window.
    assert!(rows <= 150, "{rows} refusal rows");
    let folded: u64 = gate
        .sqlite(
            "select coalesce(sum(json_extract(detail, '$.count')), 0) from audit where kind = 'sessions.refused'",
        )
        .trim()
        .parse()
        .expect("sum");
    eprintln!("audit: {rows} refusal rows, {folded} folded refusals");
    assert!(folded + rows >= 6000, "folded {folded}");
    assert!(
        gate.cli(&["status"]).code == 0,
        "the agent is still healthy: {}",
        gate.log()
    );
}
