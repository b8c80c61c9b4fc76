//! The bench's world: a throwaway PostgreSQL with pgbench's tables and a table of people,
//! pgbouncer in session mode in front of it, and a host agent whose one PostgreSQL resource is
//! switched (by reload, between runs) between full policy and a plain TCP relay. Everything
//! lives under [`DIR`] and is torn down on drop, also when a stage fails.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::local::{Postgres, cgroup_mount, detached, remove_cgroup, terminate, wait_port};

pub const DIR: &str = "/tmp/jitgate-bench";
const GATE_CGROUP: &str = "jitgate-bench.slice";
const PIN_DIR: &str = "/sys/fs/bpf/jitgate-bench";
pub const PG_PORT: u16 = 25432;
pub const BOUNCER_PORT: u16 = 26432;
const PROXY_PORT: u16 = 25001;
/// Ports of the TCP resource `bench-sink` (the connect-cost and idle-connection stages serve
/// their own upstream on one of these).
pub const CONNECT_SINK_PORT: u16 = 25997;
pub const IDLE_SINK_PORT: u16 = 25998;
pub const DB: &str = "bench";
pub const RO_USER: &str = "bench_ro";
pub const RW_USER: &str = "bench_rw";
/// Known to the direct and pgbouncer variants only; gated clients send a wrong one.
pub const PASSWORD: &str = "bench-Secret-7f3a";
pub const WRONG_PASSWORD: &str = "not-the-password";

/// What the gate does with the PostgreSQL resource `bench-db`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// Wire protocol parsed, every statement judged by guardrails, results masked, session
    /// recorded: everything a production resource has switched on.
    Full,
    /// Bytes relayed under a grant, nothing parsed: the cost of the redirect and the relay.
    Relay,
}

pub struct Env {
    pub bin_dir: PathBuf,
    /// Descriptors each process may open (see [`raise_fd_limit`]).
    pub fd_limit: u64,
    pg: Option<Postgres>,
    bouncer: Option<Child>,
    daemon: Option<Child>,
    mode: GateMode,
}

fn dir() -> PathBuf {
    PathBuf::from(DIR)
}

fn config(mode: GateMode) -> String {
    let db = match mode {
        GateMode::Full => format!(
            r#"[[resource]]
name = "bench-db"
protocol = "postgres"
address = "127.0.0.1:{PG_PORT}"
databases = ["{DB}"]
[resource.credentials.read]
user = "{RO_USER}"
password_file = "{DIR}/secrets/ro"
[resource.credentials.write]
user = "{RW_USER}"
password_file = "{DIR}/secrets/rw"
[[resource.mask]]
columns = ["*.email"]
strategy = "partial"
exempt_identities = ["bench-clear"]
[[resource.mask]]
detectors = ["email", "card", "ssn", "phone", "iban", "aws_key", "jwt", "private_key", "bearer"]
strategy = "redact"
exempt_identities = ["bench-clear"]
[[resource.guardrail]]
name = "people-changes"
kinds = ["update", "delete"]
tables = ["people"]
action = "approve"
[[resource.guardrail]]
name = "no-sleeping"
functions = ["pg_sleep"]
action = "deny"
"#
        ),
        GateMode::Relay => format!(
            r#"[[resource]]
name = "bench-db"
protocol = "tcp"
address = "127.0.0.1:{PG_PORT}"
"#
        ),
    };
    let http = super::http::resources();
    format!(
        r#"# Written by `cargo xtask bench` ({mode:?} mode).
[daemon]
state_dir = "{DIR}/state"
ca_cert = "{DIR}/ca.pem"
socket = "{DIR}/jitgate.sock"
gate_cgroup = "{GATE_CGROUP}"
bpf_pin_dir = "{PIN_DIR}"
proxy_listen = "127.0.0.1:{PROXY_PORT}"
egress = "deny"
# The bench measures the data path with many clients on one grant and many idle
# connections: the per-identity and per-grant connection limits are lifted.
max_pending_per_identity = 100000
max_sessions_per_identity = 100000
max_sessions_per_grant = 100000

[[workload]]
identity = "bench"
launchers = ["root"]

[[workload]]
identity = "bench-clear"
description = "sees clear values: the same path as `bench` without masking"
launchers = ["root"]

{db}
{http}
[[resource]]
name = "bench-sink"
protocol = "tcp"
address = "127.0.0.1/32:{CONNECT_SINK_PORT}-{IDLE_SINK_PORT}"

[[policy]]
identities = ["bench", "bench-clear"]
resources = ["*"]
access = ["read", "write"]
max_ttl = "4h"
approval = "auto"
"#
    )
}

/// Clears what an interrupted run may have left.
fn clean_leftovers(bin_dir: &Path) {
    if let Ok(pid) = fs::read_to_string(dir().join("jitgated.pid"))
        && let Ok(pid) = pid.trim().parse()
    {
        terminate(pid);
    }
    if let Ok(pid) = fs::read_to_string(dir().join("pgbouncer/pgbouncer.pid"))
        && let Ok(pid) = pid.trim().parse()
    {
        terminate(pid);
    }
    if let Ok(pid) = fs::read_to_string(dir().join("http/nginx.pid"))
        && let Ok(pid) = pid.trim().parse()
    {
        terminate(pid);
    }
    Postgres::stop_in(&dir().join("pg"));
    if Path::new(PIN_DIR).exists() {
        let _ = Command::new(bin_dir.join("jitgate"))
            .args(["gate", "detach", "--pin-dir", PIN_DIR])
            .output();
    }
    if let Some(mount) = cgroup_mount() {
        remove_cgroup(&mount.join(GATE_CGROUP));
    }
    let _ = fs::remove_dir_all(DIR);
}

/// Raises the descriptor limit that every process the bench starts inherits: ten thousand
/// proxied connections take two descriptors each in the agent. Without CAP_SYS_RESOURCE (some
/// containers) only the soft limit can rise, to the hard one. Returns the limit in force.
pub fn raise_fd_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    let want: libc::rlim_t = 1 << 17;
    if lim.rlim_max < want {
        let more = libc::rlimit {
            rlim_cur: want,
            rlim_max: want,
        };
        // SAFETY: plain setrlimit with a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &more) } == 0 {
            return Ok(want);
        }
    }
    lim.rlim_cur = lim.rlim_max.min(want);
    // SAFETY: as above; the soft limit may always rise to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok(lim.rlim_cur)
}

impl Env {
    pub fn start(bin_dir: &Path, scale: u32, people: u32) -> Result<Self> {
        for name in ["jitgated", "jitgate", "jitgate-bench"] {
            if !bin_dir.join(name).exists() {
                bail!(
                    "{} is missing: build first (`cargo build --release --bins`)",
                    bin_dir.join(name).display()
                );
            }
        }
        let fd_limit = raise_fd_limit()?;
        clean_leftovers(bin_dir);
        fs::create_dir_all(dir().join("logs"))?;
        fs::set_permissions(dir(), fs::Permissions::from_mode(0o755))?;
        let mut env = Self {
            bin_dir: bin_dir.to_owned(),
            fd_limit,
            pg: None,
            bouncer: None,
            daemon: None,
            mode: GateMode::Full,
        };
        env.start_postgres(scale, people)?;
        env.start_bouncer()?;
        super::http::prepare(&env)?;
        env.start_daemon()?;
        Ok(env)
    }

    fn start_postgres(&mut self, scale: u32, people: u32) -> Result<()> {
        println!("   PostgreSQL on 127.0.0.1:{PG_PORT}, pgbench scale {scale}, {people} people");
        let pg = Postgres::start(
            &dir().join("pg"),
            PG_PORT,
            "127.0.0.1",
            "127.0.0.1/32",
            &["max_connections=200", "shared_buffers=256MB"],
        )?;
        pg.psql(
            "postgres",
            &format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE {RO_USER} LOGIN PASSWORD '{PASSWORD}';
                 CREATE ROLE {RW_USER} LOGIN PASSWORD '{PASSWORD}';
                 CREATE DATABASE {DB};"
            ),
        )?;
        let out = Command::new("pgbench")
            .args(["-i", "-q", "-s", &scale.to_string(), "-h"])
            .arg(&pg.dir)
            .args(["-p", &PG_PORT.to_string(), "-U", "postgres", DB])
            .output()
            .context("pgbench -i")?;
        if !out.status.success() {
            bail!(
                "pgbench -i failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A result worth masking: ids, names, emails (a column rule), card numbers and notes
        // with SSNs (detectors), about 120 bytes a row.
        pg.psql(
            DB,
            &format!(
                "CREATE TABLE people (id int PRIMARY KEY, name text, email text, card text, note text);
                 INSERT INTO people
                   SELECT i, 'Customer Number ' || i, 'customer.' || i || '@example.com',
                          (ARRAY['4111 1111 1111 1111', '5500 0000 0000 0004', 'none on file'])[i % 3 + 1],
                          CASE WHEN i % 10 = 0 THEN 'called on 2026-11-' || (i % 28 + 1) || ', SSN on file: 123-45-6789'
                               ELSE 'prefers email; account opened in ' || (2000 + i % 26) || ' by referral' END
                   FROM generate_series(1, {people}) AS i;
                 GRANT SELECT ON ALL TABLES IN SCHEMA public TO {RO_USER};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {RW_USER};
                 VACUUM ANALYZE;"
            ),
        )?;
        let secrets = dir().join("secrets");
        fs::create_dir_all(&secrets)?;
        fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700))?;
        for name in ["ro", "rw"] {
            let file = secrets.join(name);
            fs::write(&file, format!("{PASSWORD}\n"))?;
            fs::set_permissions(&file, fs::Permissions::from_mode(0o600))?;
        }
        self.pg = Some(pg);
        Ok(())
    }

    /// pgbouncer in session mode (the pooler users already run in front of PostgreSQL), with
    /// a pool large enough that no client ever waits for a server connection.
    fn start_bouncer(&mut self) -> Result<()> {
        let bdir = dir().join("pgbouncer");
        fs::create_dir_all(&bdir)?;
        fs::write(
            bdir.join("userlist.txt"),
            format!("\"{RO_USER}\" \"{PASSWORD}\"\n\"{RW_USER}\" \"{PASSWORD}\"\n"),
        )?;
        fs::write(
            bdir.join("pgbouncer.ini"),
            format!(
                "[databases]
{DB} = host=127.0.0.1 port={PG_PORT} dbname={DB}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {BOUNCER_PORT}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {b}/userlist.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 64
log_connections = 0
log_disconnections = 0
logfile = {b}/pgbouncer.log
pidfile = {b}/pgbouncer.pid
",
                b = bdir.display()
            ),
        )?;
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&bdir)
            .status()?;
        if !status.success() {
            bail!("chown postgres {}", bdir.display());
        }
        // pgbouncer refuses to run as root; setpriv execs it as postgres (same pid).
        let child = detached(
            Command::new("setpriv")
                .args([
                    "--reuid=postgres",
                    "--regid=postgres",
                    "--clear-groups",
                    "pgbouncer",
                ])
                .arg(bdir.join("pgbouncer.ini")),
            &bdir.join("stdout.log"),
        )
        .context("starting pgbouncer (is it installed? `cargo xtask setup`)")?;
        self.bouncer = Some(child);
        wait_port(
            &format!("127.0.0.1:{BOUNCER_PORT}"),
            Duration::from_secs(10),
        )
        .context("pgbouncer did not start; see /tmp/jitgate-bench/pgbouncer/")?;
        Ok(())
    }

    fn start_daemon(&mut self) -> Result<()> {
        fs::write(dir().join("jitgate.toml"), config(GateMode::Full))?;
        let child = detached(
            Command::new(self.bin_dir.join("jitgated"))
                .arg("--config")
                .arg(dir().join("jitgate.toml"))
                .env("RUST_LOG", "warn"),
            &dir().join("jitgated.log"),
        )?;
        fs::write(dir().join("jitgated.pid"), child.id().to_string())?;
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .cli(&["status"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                bail!(
                    "jitgated did not start:\n{}",
                    fs::read_to_string(dir().join("jitgated.log")).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `postgres (PostgreSQL) 15.x` of the server the bench runs.
    pub fn postgres_version() -> String {
        Postgres::bin_dir()
            .ok()
            .and_then(|b| {
                Command::new(b.join("postgres"))
                    .arg("--version")
                    .output()
                    .ok()
            })
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "PostgreSQL (unknown version)".into())
    }

    /// The host agent's process id.
    pub fn daemon_pid(&self) -> Result<u32> {
        Ok(self.daemon.as_ref().context("no daemon")?.id())
    }

    /// pgbouncer's process id (setpriv execs it: the child's own).
    pub fn bouncer_pid(&self) -> Option<u32> {
        self.bouncer.as_ref().map(Child::id)
    }

    /// The host agent's resident set, in KiB.
    pub fn daemon_rss_kib(&self) -> Result<u64> {
        let pid = self.daemon.as_ref().context("no daemon")?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("VmRSS of jitgated")
    }

    pub fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin_dir.join("jitgate"));
        c.arg("--socket").arg(dir().join("jitgate.sock")).args(args);
        c
    }

    /// Switches `bench-db` between full policy and relay (a reload; sessions are not live
    /// between runs).
    pub fn set_mode(&mut self, mode: GateMode) -> Result<()> {
        if mode == self.mode {
            return Ok(());
        }
        fs::write(dir().join("jitgate.toml"), config(mode))?;
        let out = self.cli(&["reload"]).output()?;
        if !out.status.success() {
            bail!(
                "jitgate reload failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.mode = mode;
        Ok(())
    }

    /// `cmd` run as a gated workload of `identity` holding a task grant.
    pub fn gated(&self, identity: &str, grant: &str, cmd: &mut Command) -> Command {
        let mut c = self.cli(&[
            "run",
            "--as",
            identity,
            "--allow-root",
            "--grant",
            grant,
            "--",
        ]);
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(d) = cmd.get_current_dir() {
            c.current_dir(d);
        }
        c
    }

    pub fn helper(&self) -> Command {
        let mut c = Command::new(self.bin_dir.join("jitgate-bench"));
        c.stdin(Stdio::null());
        c
    }

    pub fn log_dir() -> PathBuf {
        dir().join("logs")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            terminate(d.id());
            let _ = d.wait();
        }
        if let Some(mut b) = self.bouncer.take() {
            terminate(b.id());
            let _ = b.wait();
        }
        self.pg.take();
        let _ = Command::new(self.bin_dir.join("jitgate"))
            .args(["gate", "detach", "--pin-dir", PIN_DIR])
            .output();
        if let Some(mount) = cgroup_mount() {
            remove_cgroup(&mount.join(GATE_CGROUP));
        }
    }
}

/// CPU time a process has used, ns, from `/proc/<pid>/stat`: every thread it has had, dead
/// ones included (per-thread counters lose a thread's time when it exits, and the agent's
/// blocking-pool threads come and go), and with `reaped` the children it has waited for.
/// Clock ticks: 10 ms, against the hundreds of ms a proxy spends in a run.
pub fn process_cpu_ns(pid: u32, reaped: bool) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces and parentheses): state, then fields 4
    // on; utime, stime, cutime and cstime are fields 14 to 17.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<i64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let [utime, stime, cutime, cstime] = fields[..] else {
        return None;
    };
    let mut ticks = utime + stime;
    if reaped {
        ticks += cutime + cstime;
    }
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(u64::try_from(ticks.max(0)).ok()? * 1_000_000_000 / u64::try_from(per_sec).ok()?)
}
