//! `cargo xtask demo`: a narrated, scripted scenario on this machine. Starts a local web
//! server (the protected resource), a second one (somewhere else), a PostgreSQL server and a
//! host agent on the embedded store, and walks an AI agent's workload through refusal, a
//! request, approval, expiry on a live connection, revocation, a gated and masked PostgreSQL
//! session, kubectl against a Kubernetes API (stand-in) with its token injected, Secrets
//! masked and a delete held for approval, an approval in the web console (signed in through
//! an OpenID provider started for the demo, screenshots of each page), and the audit trail.
//! Leaves everything running for exploration; `cargo xtask demo --stop` cleans up.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    is_root,
    local::{Postgres, cgroup_mount, detached, remove_cgroup, terminate},
};

const DIR: &str = "/tmp/jitgate-demo";
const WEB_PORT: u16 = 18080;
const ELSEWHERE_PORT: u16 = 18081;
const PROXY_PORT: u16 = 15101;
const PG_PORT: u16 = 15432;
const KUBE_PORT: u16 = 16443;
/// The web console (HTTPS, a certificate from the host CA).
const CONSOLE_PORT: u16 = 18443;
/// The demo's OpenID provider (panva's oidc-provider, the one the console tests use).
const IDP_PORT: u16 = 18444;
const IDP_CLIENT: &str = "jitgate-demo";
/// Only for the provider on loopback the demo starts, never a real one.
const IDP_CLIENT_SECRET: &str = "demo-oidc-client-secret-8c1e";
/// The service account token the gate injects toward the cluster: root-only, never the agent's.
const KUBE_TOKEN: &str = "demo-cluster-token-6f2a";
/// The read-only role's password: only the host agent reads it (from a root-only file).
const PG_RO_PASSWORD: &str = "demo-ro-Secret-41d7";
const PIN_DIR: &str = "/sys/fs/bpf/jitgate-demo";
const GATE_CGROUP: &str = "jitgate-demo.slice";

fn dir() -> PathBuf {
    PathBuf::from(DIR)
}

fn bin(name: &str) -> PathBuf {
    dir().join("bin").join(name)
}

fn socket() -> PathBuf {
    dir().join("jitgate.sock")
}

fn config_text() -> String {
    format!(
        r#"# jitgate demo configuration (written by `cargo xtask demo`).
[daemon]
state_dir = "{DIR}/state"
socket = "{DIR}/jitgate.sock"
socket_mode = "0666"          # the demo's workloads run as `nobody` and talk to the daemon too
gate_cgroup = "{GATE_CGROUP}"
bpf_pin_dir = "{PIN_DIR}"
proxy_listen = "127.0.0.1:{PROXY_PORT}"
egress = "deny"
console_listen = "127.0.0.1:{CONSOLE_PORT}"

[console.oidc]
# The demo's own OpenID provider on loopback (tests/console/provider.mjs): `ann` signs in
# with any password. A real deployment names its company's provider here.
issuer = "http://127.0.0.1:{IDP_PORT}"
client_id = "{IDP_CLIENT}"
client_secret_file = "{DIR}/secrets/oidc-client"
redirect_url = "https://127.0.0.1:{CONSOLE_PORT}/auth/callback"
scopes = ["openid", "email", "groups"]

[[workload]]
identity = "demo-agent"
description = "an AI agent that reads the internal dashboard"
launchers = ["root"]

[[workload]]
identity = "demo-batch"
description = "a batch job with standing auto-approval for short grants"
launchers = ["root"]

[[resource]]
name = "web"
description = "the internal dashboard"
protocol = "tcp"
address = "127.0.0.1:{WEB_PORT}"
on_missing_grant = "reject"

[[resource]]
name = "orders-db"
description = "the customer database"
protocol = "postgres"
address = "127.0.0.1:{PG_PORT}"
databases = ["orders"]
[resource.credentials.read]
user = "orders_ro"
password_file = "{DIR}/secrets/orders_ro"
[[resource.mask]]
columns = ["*.email"]
strategy = "partial"
[[resource.mask]]
detectors = ["card", "ssn"]
strategy = "redact"

[[resource]]
name = "cluster"
description = "a Kubernetes API server (a stand-in: none can be installed here)"
protocol = "http"
flavor = "kubernetes"
address = "127.0.0.1:{KUBE_PORT}"
upstream_ca = "{DIR}/kube-ca.pem"
[resource.credentials.read]
secret_file = "{DIR}/secrets/cluster.token"
[resource.credentials.write]
secret_file = "{DIR}/secrets/cluster.token"
[[resource.rule]]
verbs = ["delete", "deletecollection"]
namespaces = ["prod"]
action = "approve"
[[resource.rule]]
verbs = ["exec", "attach", "portforward"]
action = "approve"

[[policy]]
name = "agent-operates-cluster"
identities = ["demo-agent"]
resources = ["cluster"]
access = ["read", "write"]
max_ttl = "10m"
approval = "auto"
approvers = ["root"]

[[policy]]
name = "agent-reads-orders"
identities = ["demo-agent"]
resources = ["orders-db"]
access = ["read"]
max_ttl = "10m"
approval = "auto"
approvers = ["root", "oidc:ann@example.com"]   # who may read its sessions in the console

[[policy]]
name = "agent-reads-web"
identities = ["demo-agent"]
resources = ["web"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["root", "oidc:ann@example.com"]

[[policy]]
name = "batch-short-grants"
identities = ["demo-batch"]
resources = ["web"]
access = ["read"]
max_ttl = "10m"
approval = "auto"
"#
    )
}

fn banner(title: &str) {
    println!("\n\x1b[1;36m━━ {title}\x1b[0m");
}

fn say(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

fn show_cmd(display: &str) {
    println!("\x1b[1m   $ {display}\x1b[0m");
}

fn indent(out: &[u8]) {
    for line in String::from_utf8_lossy(out).lines() {
        println!("     {line}");
    }
}

/// The `jitgate` command as the demo shows it (short) and runs it (full paths).
fn jitgate(args: &[&str]) -> Command {
    let mut c = Command::new(bin("jitgate"));
    c.arg("--socket").arg(socket()).args(args);
    c.env("PATH", format!("{DIR}/bin:/usr/local/bin:/usr/bin:/bin"));
    c
}

fn step(display: &str, mut cmd: Command) -> Result<(i32, String)> {
    show_cmd(display);
    let out = cmd.output().with_context(|| format!("running {display}"))?;
    indent(&out.stdout);
    indent(&out.stderr);
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn json(cmd: &mut Command) -> Result<serde_json::Value> {
    let out = cmd.output()?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "expected JSON from {cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn write_pid(name: &str, pid: u32) -> Result<()> {
    fs::write(dir().join(format!("{name}.pid")), pid.to_string())?;
    Ok(())
}

fn kill_pidfile(name: &str) {
    let path = dir().join(format!("{name}.pid"));
    if let Ok(text) = fs::read_to_string(&path) {
        if let Ok(pid) = text.trim().parse::<u32>() {
            terminate(pid);
        }
        let _ = fs::remove_file(path);
    }
}

/// Stops a running demo and removes every trace of it.
pub fn stop() -> Result<()> {
    if !is_root() {
        bail!("the demo runs as root; stop it with `sudo -E cargo xtask demo --stop`");
    }
    kill_pidfile("jitgated");
    kill_pidfile("web");
    kill_pidfile("elsewhere");
    kill_pidfile("kube-standin");
    kill_pidfile("oidc-provider");
    Postgres::stop_in(&dir().join("pg"));
    if bin("jitgate").exists() {
        let _ = Command::new(bin("jitgate"))
            .args(["gate", "detach", "--pin-dir", PIN_DIR])
            .output();
    } else if Path::new(PIN_DIR).exists() {
        eprintln!("xtask: {PIN_DIR} is left pinned and no jitgate binary is at hand to detach it");
    }
    if let Some(mount) = cgroup_mount() {
        remove_cgroup(&mount.join(GATE_CGROUP));
    }
    let _ = fs::remove_dir_all(DIR);
    println!("demo stopped: daemon and servers ended, gate detached, {DIR} removed");
    Ok(())
}

fn prepare(target: &Path) -> Result<()> {
    if dir().exists() || Path::new(PIN_DIR).exists() {
        println!("(stopping the previous demo first)");
        stop()?;
    }
    fs::create_dir_all(dir().join("bin"))?;
    fs::set_permissions(dir(), fs::Permissions::from_mode(0o755))?;
    for name in ["jitgated", "jitgate", "jitgate-kube-standin"] {
        let dst = bin(name);
        fs::copy(target.join(name), &dst).with_context(|| format!("copying {name}"))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o755))?;
    }
    fs::write(dir().join("server.py"), SERVER_PY)?;
    // kubectl (as `nobody`) keeps its discovery cache here.
    fs::create_dir_all(dir().join("kube-cache"))?;
    fs::set_permissions(dir().join("kube-cache"), fs::Permissions::from_mode(0o1777))?;
    fs::write(dir().join("jitgate.toml"), config_text())?;
    Ok(())
}

/// The demo's upstream: `/` is a small page, `/ticks` streams a line every half second (a
/// live connection that carries data only as it is produced, so a cut shows at once).
const SERVER_PY: &str = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path == "/ticks":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for n in range(1, 100000):
                self.wfile.write(f"{time.strftime('%H:%M:%S')} tick {n}\n".encode())
                self.wfile.flush()
                time.sleep(0.5)
            return
        body = f"<h1>{sys.argv[2]}</h1><p>revenue: 42 (confidential)</p>\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

fn start_servers() -> Result<()> {
    for port in [
        WEB_PORT,
        ELSEWHERE_PORT,
        PROXY_PORT,
        PG_PORT,
        KUBE_PORT,
        CONSOLE_PORT,
        IDP_PORT,
    ] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port {port} on 127.0.0.1 is taken; the demo needs it (stop whatever uses it: `ss -ltnp | grep {port}`)"
            );
        }
    }
    for (name, port, title) in [
        ("web", WEB_PORT, "Internal dashboard"),
        ("elsewhere", ELSEWHERE_PORT, "Some other service"),
    ] {
        let child = detached(
            Command::new("python3").args([&format!("{DIR}/server.py"), &port.to_string(), title]),
            &dir().join(format!("{name}.log")),
        )?;
        write_pid(name, child.id())?;
    }
    let child = detached(
        Command::new(bin("jitgate-kube-standin")).args([
            &format!("127.0.0.1:{KUBE_PORT}"),
            &format!("{DIR}/kube-ca.pem"),
        ]),
        &dir().join("kube-standin.log"),
    )?;
    write_pid("kube-standin", child.id())?;
    let console = console_dir();
    let child = detached(
        Command::new("node")
            .arg(console.join("provider.mjs"))
            .args([
                &IDP_PORT.to_string(),
                IDP_CLIENT,
                IDP_CLIENT_SECRET,
                &format!("https://127.0.0.1:{CONSOLE_PORT}/auth/callback"),
            ])
            .current_dir(&console),
        &dir().join("oidc-provider.log"),
    )?;
    write_pid("oidc-provider", child.id())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for port in [WEB_PORT, ELSEWHERE_PORT, KUBE_PORT, IDP_PORT] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("the demo web server on port {port} did not start (is the port taken?)");
            }
            sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

fn start_daemon() -> Result<()> {
    let child = detached(
        Command::new(bin("jitgated"))
            .arg("--config")
            .arg(dir().join("jitgate.toml")),
        &dir().join("jitgated.log"),
    )?;
    write_pid("jitgated", child.id())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !jitgate(&["status"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        if Instant::now() > deadline {
            let log = fs::read_to_string(dir().join("jitgated.log")).unwrap_or_default();
            bail!("jitgated did not start:\n{log}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A throwaway PostgreSQL server with SCRAM logins, a read-only role whose password only the
/// host agent can read, and a table of customers with personal data.
fn start_postgres() -> Result<()> {
    let pg = Postgres::start(&dir().join("pg"), PG_PORT, "127.0.0.1", "127.0.0.1/32", &[])?;
    let sql = format!(
        "CREATE DATABASE orders;
         \\c orders
         SET password_encryption = 'scram-sha-256';
         CREATE ROLE orders_ro LOGIN PASSWORD '{PG_RO_PASSWORD}';
         CREATE TABLE customers (id int PRIMARY KEY, name text, email text, card text, note text);
         INSERT INTO customers VALUES
           (1, 'Jane Doe', 'jane@example.com', '4111 1111 1111 1111', 'prefers email'),
           (2, 'John Roe', 'john@example.org', '5500 0000 0000 0004', 'SSN on file: 123-45-6789'),
           (3, 'Ann Poe', 'ann@example.net', 'none', 'vip');
         GRANT SELECT ON customers TO orders_ro;"
    );
    pg.psql("postgres", &sql)
        .context("setting up the demo database")?;
    pg.leave_running();
    let secrets = dir().join("secrets");
    fs::create_dir_all(&secrets)?;
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700))?;
    let secret = secrets.join("orders_ro");
    fs::write(&secret, format!("{PG_RO_PASSWORD}\n"))?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600))?;
    let oidc = secrets.join("oidc-client");
    fs::write(&oidc, format!("{IDP_CLIENT_SECRET}\n"))?;
    fs::set_permissions(&oidc, fs::Permissions::from_mode(0o600))?;
    let token = secrets.join("cluster.token");
    fs::write(&token, format!("{KUBE_TOKEN}\n"))?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The console's browser scripts and their npm packages (installed by `cargo xtask setup`).
fn console_dir() -> PathBuf {
    crate::root().join("tests/console")
}

/// `demo-agent` asks for `web` with `reason` and, once approved, fetches the page: started
/// in the background. Returns the running task and the request it filed.
fn agent_asks_for_web(reason: &str, web: &str) -> Result<(std::process::Child, serde_json::Value)> {
    let script =
        format!("jitgate request web --reason '{reason}' --ttl 5m --wait && curl -sS -m 5 {web}");
    show_cmd(&format!(
        "jitgate run --as demo-agent --user nobody -- sh -c \"{script}\"   # in the background"
    ));
    let agent = workload("demo-agent", &[], &["sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = json(&mut jitgate(&["approvals", "--json"]))?;
        if let Some(first) = pending.as_array().and_then(|a| a.first()) {
            return Ok((agent, first.clone()));
        }
        if Instant::now() > deadline {
            bail!("the agent's request did not show up");
        }
        sleep(Duration::from_millis(100));
    }
}

/// Waits for the agent started by [`agent_asks_for_web`] and shows what it printed.
fn show_resumed(agent: std::process::Child, what: &str) -> Result<()> {
    let out = agent.wait_with_output()?;
    say(what);
    indent(&out.stderr);
    indent(&out.stdout);
    Ok(())
}

fn workload(identity: &str, extra: &[&str], cmd: &[&str]) -> Command {
    let mut args = vec!["run", "--as", identity, "--user", "nobody"];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(cmd);
    jitgate(&args)
}

pub fn run(target: &Path) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and creates cgroups: run it as root (`sudo -E cargo xtask demo`)"
        );
    }
    let web = format!("http://127.0.0.1:{WEB_PORT}/");
    banner("jitgate demo: the gate an AI agent cannot walk around");
    say(&format!(
        "Setting up in {DIR}: an internal web service on 127.0.0.1:{WEB_PORT} (the protected\n\
         resource `web`), another service on 127.0.0.1:{ELSEWHERE_PORT}, and the host agent jitgated."
    ));
    prepare(target)?;
    start_servers()?;
    start_postgres()?;
    start_daemon()?;

    banner("1. The host agent is up; the gate is in the kernel");
    say(
        "Every socket of every process under the cgroup jitgate-demo.slice now passes\nthrough jitgate's eBPF programs. The agent runs as identity `demo-agent`.",
    );
    step("jitgate status", jitgate(&["status"]))?;

    banner("2. No standing access: the agent is refused");
    say("The agent runs an unmodified curl against the address it always used.");
    step(
        &format!("jitgate run --as demo-agent --user nobody -- curl -sS -m 5 {web}"),
        workload("demo-agent", &[], &["curl", "-sS", "-m", "5", &web]),
    )?;
    say(
        "The kernel steered the connection to the proxy, which found no grant and closed it\nwithout relaying a byte. It is on record:",
    );
    step("jitgate sessions --all", jitgate(&["sessions", "--all"]))?;

    banner("3. No way around it");
    say(
        "Other destinations are refused by the kernel (egress = \"deny\"), and other routes to\nthe resource (IPv6, 0.0.0.0) land on the same gate:",
    );
    let elsewhere = format!("http://127.0.0.1:{ELSEWHERE_PORT}/");
    step(
        &format!("jitgate run --as demo-agent --user nobody -- curl -sS -m 5 {elsewhere}"),
        workload("demo-agent", &[], &["curl", "-sS", "-m", "5", &elsewhere]),
    )?;
    let via_zero = format!("http://0.0.0.0:{WEB_PORT}/");
    step(
        &format!("jitgate run --as demo-agent --user nobody -- curl -sS -m 5 {via_zero}"),
        workload("demo-agent", &[], &["curl", "-sS", "-m", "5", &via_zero]),
    )?;

    banner("4. Just in time: the agent asks, a human approves");
    let (agent, request) = agent_asks_for_web("summarize the dashboard", &web)?;
    let id = request["id"].as_str().unwrap_or_default().to_owned();
    step("jitgate approvals", jitgate(&["approvals"]))?;
    say("A compromised agent would love to approve itself. It cannot:");
    step(
        &format!("jitgate run --as demo-agent --user nobody -- jitgate approve {id}"),
        workload("demo-agent", &[], &["jitgate", "approve", &id]),
    )?;
    say("A human approver (here root; self-approval is refused for everyone) decides:");
    step(&format!("jitgate approve {id}"), jitgate(&["approve", &id]))?;
    show_resumed(
        agent,
        "The agent's waiting command resumes; its curl now gets the page:",
    )?;

    banner("5. Expiry acts on the live connection");
    say(
        "`demo-batch` gets short grants automatically. It follows a live feed (a line every\nhalf second) on a 4-second grant: the connection is cut the moment the grant expires.",
    );
    let ticks = format!("{web}ticks");
    step(
        &format!(
            "jitgate run --as demo-batch --user nobody --grant web:read:4s -- curl -sSN {ticks}"
        ),
        workload(
            "demo-batch",
            &["--grant", "web:read:4s"],
            &["curl", "-sSN", &ticks],
        ),
    )?;

    banner("6. Revocation, too");
    say("The same feed on a 10-minute grant; an operator revokes the grant after 2 seconds.");
    let agent = workload(
        "demo-batch",
        &["--grant", "web:read:10m"],
        &["curl", "-sSN", &ticks],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    sleep(Duration::from_secs(2));
    let grants = json(&mut jitgate(&["grants", "--json"]))?;
    let live = grants
        .as_array()
        .and_then(|a| a.iter().find(|g| g["identity"] == "demo-batch"))
        .and_then(|g| g["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    step("jitgate grants", jitgate(&["grants"]))?;
    step(
        &format!("jitgate revoke {live} --reason 'incident drill'"),
        jitgate(&["revoke", &live, "--reason", "incident drill"]),
    )?;
    let out = agent.wait_with_output()?;
    say("The feed, as the agent saw it:");
    indent(&out.stdout);
    indent(&out.stderr);
    say("Grants bound to a task also end when its processes exit:");
    step("jitgate grants --all", jitgate(&["grants", "--all"]))?;

    banner("7. PostgreSQL: no password in the agent's hands, every statement judged");
    say(&format!(
        "`orders-db` is a PostgreSQL server on 127.0.0.1:{PG_PORT}. The agent uses plain psql with\n\
         a made-up user and password: the gate ignores them and logs in upstream with a\n\
         read-only role whose password only the host agent can read. Emails are partially\n\
         masked by a column rule; card numbers and SSNs by detectors, wherever they appear."
    ));
    let url = format!("postgres://agent:no-password-here@127.0.0.1:{PG_PORT}/orders");
    let psql = |sql: &str| {
        workload(
            "demo-agent",
            &["--grant", "orders-db:read:5m"],
            &["psql", &url, "-X", "-c", sql],
        )
    };
    let select = "SELECT name, email, card, note FROM customers ORDER BY id";
    step(
        &format!(
            "jitgate run --as demo-agent --user nobody --grant orders-db:read:5m -- psql {url} -c \"{select}\""
        ),
        psql(select),
    )?;
    say("A read grant cannot write, by any route; the error says what to ask for:");
    let delete = "DELETE FROM customers";
    step(
        &format!("jitgate run ... -- psql {url} -c \"{delete}\""),
        psql(delete),
    )?;
    say("Every statement is recorded with its decision:");
    let sessions = json(&mut jitgate(&["sessions", "--all", "--json"]))?;
    let last_pg = sessions
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter(|s| s["resource"] == "orders-db" && s["grant"].is_string())
                .max_by_key(|s| s["started_at"].as_str().unwrap_or_default().to_owned())
        })
        .and_then(|s| s["id"].as_str())
        .unwrap_or_default()
        .to_owned();
    step(
        &format!("jitgate sessions show {last_pg}"),
        jitgate(&["sessions", "show", &last_pg]),
    )?;

    banner("8. Kubernetes: kubectl as the agent uses it, the cluster's token never in its hands");
    say(&format!(
        "`cluster` is a Kubernetes API server on 127.0.0.1:{KUBE_PORT} (a stand-in that answers with\n\
         real API objects: no API server can be installed here). `jitgate run` hands the agent a\n\
         kubeconfig with the server URL and the host CA, and no credential: the gate injects a\n\
         service account token only it can read, reads every request as the API server does, masks\n\
         Secret values, and holds deletes in `prod` for a human."
    ));
    let kube = |grant: Option<&str>, args: &[&str]| {
        let mut cmd = vec!["kubectl", "--cache-dir", "/tmp/jitgate-demo/kube-cache"];
        cmd.extend_from_slice(args);
        let extra: Vec<&str> = grant.map_or_else(Vec::new, |g| vec!["--grant", g]);
        workload("demo-agent", &extra, &cmd)
    };
    step(
        "jitgate run --as demo-agent --user nobody -- kubectl get pods -n prod",
        kube(None, &["get", "pods", "-n", "prod"]),
    )?;
    step(
        "jitgate run --as demo-agent --user nobody --grant cluster:read:5m -- kubectl get pods -n prod",
        kube(Some("cluster:read:5m"), &["get", "pods", "-n", "prod"]),
    )?;
    say("The Secret's values as the agent sees them (the API server sent the real ones):");
    step(
        "jitgate run ... --grant cluster:read:5m -- kubectl get secret db -n prod -o yaml",
        kube(
            Some("cluster:read:5m"),
            &["get", "secret", "db", "-n", "prod", "-o", "yaml"],
        ),
    )?;
    say("A delete in prod, under a write grant, waits for a human:");
    show_cmd(
        "jitgate run ... --grant cluster:write:5m -- kubectl delete pod web-1 -n prod   # in the background",
    );
    let deleting = kube(
        Some("cluster:write:5m"),
        &["delete", "pod", "web-1", "-n", "prod", "--wait=false"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let pending = json(&mut jitgate(&["approvals", "--json"]))?;
        if let Some(first) = pending.as_array().and_then(|a| a.first()) {
            break first["id"].as_str().unwrap_or_default().to_owned();
        }
        if Instant::now() > deadline {
            bail!("the held delete did not show up");
        }
        sleep(Duration::from_millis(100));
    };
    step("jitgate approvals", jitgate(&["approvals"]))?;
    step(
        &format!("jitgate approve {held}"),
        jitgate(&["approve", &held]),
    )?;
    let out = deleting.wait_with_output()?;
    say("kubectl, released:");
    indent(&out.stdout);
    indent(&out.stderr);

    banner("9. Approvers decide where they are: the web console");
    say(&format!(
        "jitgated also serves a web console (https://127.0.0.1:{CONSOLE_PORT}/) with OpenID Connect\n\
         sign-in. Here the provider is a local one started for the demo; Ann (`oidc:ann@example.com`\n\
         in the policy) approves from a browser (headless Chromium, driven by a script that takes\n\
         a screenshot of each page)."
    ));
    let (agent, request) = agent_asks_for_web("weekly revenue report", &web)?;
    let id = request["id"].as_str().unwrap_or_default().to_owned();
    let shots = dir().join("screenshots");
    fs::create_dir_all(&shots)?;
    let console = format!("https://127.0.0.1:{CONSOLE_PORT}");
    let (code, _) = step(
        &format!(
            "node tests/console/tour.mjs {console} ann {} {id} {last_pg}",
            shots.display()
        ),
        {
            let mut c = Command::new("node");
            c.arg(console_dir().join("tour.mjs"))
                .args([&console, "ann", &shots.display().to_string(), &id, &last_pg])
                .current_dir(console_dir());
            c
        },
    )?;
    if code != 0 {
        bail!("the console act failed (the browser's output is above)");
    }
    show_resumed(
        agent,
        "The agent's waiting command resumes as soon as Ann approves:",
    )?;
    say("The record names the person who decided, as the provider vouched for them:");
    step(
        "jitgate audit --limit 7",
        jitgate(&["audit", "--limit", "7"]),
    )?;

    banner("10. Everything is on the record, tamper-evident");
    step(
        "jitgate audit --limit 12",
        jitgate(&["audit", "--limit", "12"]),
    )?;
    step("jitgate audit verify", jitgate(&["audit", "verify"]))?;

    banner("The daemon is still running: explore");
    say(&format!(
        "export JITGATE_SOCKET={sock}
PATH={DIR}/bin:$PATH
jitgate status
jitgate run --as demo-agent --user nobody -- sh        # a gated shell: try curl {web}
jitgate run --as demo-agent --user nobody --grant orders-db:read -- psql postgres://x@127.0.0.1:{PG_PORT}/orders
jitgate run --as demo-agent --user nobody --grant cluster:read -- kubectl get secrets -n prod -o yaml
jitgate approvals; jitgate approve ID; jitgate grants; jitgate revoke ID
jitgate sessions --all; jitgate audit
Console: https://127.0.0.1:{CONSOLE_PORT}/ (sign in as `ann`, any password; the certificate is
from the demo host CA, {DIR}/ca.pem: trust it or accept it once). Its pages: {DIR}/screenshots/

Config: {DIR}/jitgate.toml   Log: {DIR}/jitgated.log
Stop everything (daemon, servers, gate): cargo xtask demo --stop",
        sock = socket().display()
    ));
    Ok(())
}
