//! Harness for jitgate's end-to-end tests: each test gets its own host agent (own gate
//! cgroup, bpffs pin directory, proxy port, control socket and state), real upstream servers,
//! and runs real clients as gated workloads through `jitgate run`.
//!
//! The tests need root (they load BPF programs and create cgroups). Without it they skip
//! with a loud message, except under `CI=true`, where a missing privilege fails the run.

pub mod config;
pub mod http_fixture;
pub mod kube_fixture;
pub mod scrape;
pub mod servers;

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The unprivileged user gated workloads run as.
pub const WORKLOAD_USER: &str = "nobody";
/// A second person, for approvals that root itself filed.
pub const APPROVER_USER: &str = "jitgate-e2e-approver";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The first line of every end-to-end test: returns from the test (after saying so loudly)
/// when it cannot run here, and fails it under `CI=true` (see [`privileged`]). The test's
/// name comes from the function it stands in, so it is never spelled twice.
#[macro_export]
macro_rules! root_or_skip {
    () => {{
        if !$crate::privileged($crate::test_name!()) {
            return;
        }
    }};
}

/// The name of the function this stands in (the test's name, for messages).
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        let name = ::std::any::type_name_of_val(&here);
        let name = name.strip_suffix("::here").unwrap_or(name);
        name.rsplit("::").next().unwrap_or(name)
    }};
}

/// Returns false (after saying so loudly) when the tests cannot run here.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{test}: end-to-end tests need root (BPF, cgroups) and CI=true: failing instead of skipping"
    );
    eprintln!(
        "\n*** SKIPPED {test}: end-to-end tests need root (they load BPF programs and create cgroups). Run `sudo cargo xtask test`. ***\n"
    );
    false
}

fn target_dir() -> PathBuf {
    // .../target/debug/deps/<test binary>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_owned()
}

/// A binary of the build under test (`JITGATE_BIN_DIR`, or this test binary's target dir).
pub fn find_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("JITGATE_BIN_DIR").map_or_else(target_dir, PathBuf::from);
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p jitgate`, or run `cargo xtask test`)",
        path.display()
    );
    path
}

/// Binaries copied where the unprivileged workload user can run them (the build tree may sit
/// under a home directory it cannot enter).
pub struct Bins {
    pub dir: PathBuf,
    pub jitgated: PathBuf,
    pub jitgate: PathBuf,
    pub probe: PathBuf,
    pub pgclient: PathBuf,
}

fn bins() -> &'static Bins {
    static BINS: std::sync::OnceLock<Bins> = std::sync::OnceLock::new();
    BINS.get_or_init(|| {
        // Earlier test processes' directories (their process is gone): a static has no
        // destructor, so each run clears what the ones before it left.
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let pid = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("jitgate-e2e-bin-"))
                    .and_then(|p| p.parse::<u32>().ok());
                if let Some(pid) = pid
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = PathBuf::from(format!("/tmp/jitgate-e2e-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bin dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // Somewhere every user can execute them from (the build tree may be private). A hard
        // link costs no space; a copy where the file systems differ.
        let copy = |src: PathBuf, name: &str| {
            let dst = dir.join(name);
            let _ = std::fs::remove_file(&dst);
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst)
                    .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
            }
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            dst
        };
        Bins {
            jitgated: copy(find_bin("jitgated"), "jitgated"),
            jitgate: copy(find_bin("jitgate"), "jitgate"),
            probe: copy(find_bin("jitgate-probe"), "jitgate-probe"),
            pgclient: copy(find_bin("jitgate-pgclient"), "jitgate-pgclient"),
            dir,
        }
    })
}

/// The config most tests start from: a `bot` identity that root launches, one tcp resource
/// `echo` at `address`, and a policy that auto-approves read grants on it.
pub fn echo_body(address: &str) -> String {
    config::Body::new()
        .workload("bot", &["root"])
        .resource("echo", address)
        .auto(&["bot"], &["echo"], &["read"])
        .build()
}

/// Makes sure a system user exists (creating it if needed) and returns its uid.
pub fn ensure_user(name: &str) -> u32 {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let uid = |name: &str| {
        Command::new("id")
            .args(["-u", name])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(u) = uid(name) {
        return u;
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .status()
        .expect("useradd");
    assert!(status.success(), "could not create user {name}");
    uid(name).expect("uid of the new user")
}

/// Makes sure the approver test user exists.
pub fn ensure_approver_user() {
    ensure_user(APPROVER_USER);
}

/// A free TCP port on loopback.
/// A port free now, and not handed out before by this process (the kernel can return the
/// same one to two binds in a row once the first is closed: a test that asked for a console
/// port and then a proxy port got one port twice).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut given = GIVEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// This host's first non-loopback IPv4 address, if any.
pub fn host_ipv4() -> Option<IpAddr> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse().ok())
}

/// Output of a command, decoded.
#[derive(Debug)]
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }
}

/// One host agent under test.
pub struct Gate {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub gate_cgroup: String,
    pub proxy_port: u16,
    /// The `[daemon]` lines every config of this gate starts with.
    daemon_head: String,
    daemon: Option<Child>,
    /// A command `jitgated` runs under (e.g. `setpriv` with a capability set).
    wrapper: Vec<String>,
}

impl Gate {
    /// Starts a host agent. `daemon_extra` lines go under `[daemon]`; `body` holds the
    /// workloads, resources and policies.
    pub fn start(test: &str, daemon_extra: &str, body: &str) -> Self {
        Self::start_wrapped(test, daemon_extra, body, Vec::new())
    }

    /// [`Gate::start`] with `jitgated` run under `wrapper`. The gate cgroup is created first,
    /// as systemd creates `jitgate.slice` before the service starts.
    pub fn start_wrapped(test: &str, daemon_extra: &str, body: &str, wrapper: Vec<String>) -> Self {
        Self::start_custom(test, daemon_extra, body, wrapper, None)
    }

    /// [`Gate::start_wrapped`] with the proxy on `proxy_port` (default: a free port).
    pub fn start_custom(
        test: &str,
        daemon_extra: &str,
        body: &str,
        wrapper: Vec<String>,
        proxy_port: Option<u16>,
    ) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("jge2e-{}-{n}", std::process::id());
        let dir = PathBuf::from(format!("/tmp/{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let proxy_port = proxy_port.unwrap_or_else(free_port);
        let socket = dir.join("jitgate.sock");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let gate_cgroup = format!("{name}.slice");
        let config = dir.join("jitgate.toml");
        let daemon_head = format!(
            r#"# test: {test}
[daemon]
state_dir = "{state}"
socket = "{socket}"
socket_mode = "0666"
gate_cgroup = "{gate_cgroup}"
bpf_pin_dir = "{pin}"
proxy_listen = "127.0.0.1:{proxy_port}"
"#,
            state = dir.join("state").display(),
            socket = socket.display(),
            pin = pin_dir.display(),
        );
        let text = format!("{daemon_head}{daemon_extra}\n\n{body}\n");
        std::fs::write(&config, text).expect("config");
        let mut gate = Self {
            name,
            dir,
            config,
            socket,
            pin_dir,
            gate_cgroup,
            proxy_port,
            daemon_head,
            daemon: None,
            wrapper,
        };
        if !gate.wrapper.is_empty() {
            std::fs::create_dir_all(gate.cgroup_root()).expect("creating the gate cgroup");
        }
        gate.launch();
        gate
    }

    /// Starts (or restarts) the daemon process and waits until it answers.
    pub fn launch(&mut self) {
        self.launch_env(&[]);
    }

    /// [`Gate::launch`] with extra environment (e.g. what systemd sets: `NOTIFY_SOCKET`).
    pub fn launch_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("jitgated.log"))
            .expect("log");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bins().jitgated);
                c
            }
            None => Command::new(&bins().jitgated),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .env("JITGATE_LOG", "info,jitgate=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning jitgated");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.daemon.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "jitgated exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            if self.cli(&["status", "--json"]).code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "jitgated did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("jitgated.log")).unwrap_or_default()
    }

    /// `kill -9` the daemon (no chance to clean anything up).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the daemon a signal (SIGHUP to reload, say).
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.daemon_pid() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    pub fn bins(&self) -> &'static Bins {
        bins()
    }

    fn cli_command(&self) -> Command {
        let mut c = Command::new(&bins().jitgate);
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// Runs `jitgate ARGS` as root.
    pub fn cli(&self, args: &[&str]) -> Ran {
        Ran::from(
            self.cli_command()
                .args(args)
                .output()
                .expect("running jitgate"),
        )
    }

    /// Runs `jitgate ARGS` as another unix user.
    pub fn cli_as(&self, user: &str, args: &[&str]) -> Ran {
        let out = Command::new("runuser")
            .args(["-u", user, "--"])
            .arg(&bins().jitgate)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("runuser");
        Ran::from(out)
    }

    fn run_command(&self, identity: &str, run_args: &[&str], cmd: &[&str]) -> Command {
        let mut c = self.cli_command();
        c.args(["run", "--as", identity, "--user", WORKLOAD_USER])
            .args(run_args)
            .arg("--")
            .args(cmd)
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", bins().dir.display()),
            )
            .env("JITGATE_SOCKET", &self.socket);
        c
    }

    /// Runs `CMD` as a gated workload of `identity` and waits for it.
    pub fn run(&self, identity: &str, run_args: &[&str], cmd: &[&str]) -> Ran {
        Ran::from(
            self.run_command(identity, run_args, cmd)
                .output()
                .expect("running jitgate run"),
        )
    }

    /// Starts `CMD` as a gated workload without waiting.
    pub fn spawn(&self, identity: &str, run_args: &[&str], cmd: &[&str]) -> Workload {
        let child = self
            .run_command(identity, run_args, cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning jitgate run");
        Workload::new(child)
    }

    /// Rewrites the config file body (the `[daemon]` part stays as started, plus
    /// `daemon_extra`).
    pub fn rewrite_config(&self, daemon_extra: &str, body: &str) {
        std::fs::write(
            &self.config,
            format!("{}{daemon_extra}\n\n{body}\n", self.daemon_head),
        )
        .expect("config");
    }

    /// Starts `CMD` as a gated workload with a pipe to its stdin.
    pub fn spawn_stdin(&self, identity: &str, run_args: &[&str], cmd: &[&str]) -> Child {
        self.run_command(identity, run_args, cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning jitgate run")
    }

    /// A workload holding a connection open to `target` (an echo server), launched with
    /// `--grant GRANT`; returns once the connection is through.
    pub fn hold(&self, identity: &str, grant: &str, target: &str) -> Workload {
        let probe = bins().probe.to_str().expect("utf-8 path");
        let mut held = self.spawn(identity, &["--grant", grant], &[probe, "hold", target]);
        held.expect_line(
            &format!("connected {}", servers::BANNER),
            Duration::from_secs(10),
        );
        held
    }

    /// Runs the probe as a gated workload (`jitgate-probe ARGS`).
    pub fn probe(&self, identity: &str, args: &[&str]) -> Ran {
        let mut cmd = vec![bins().probe.to_str().expect("utf-8 path")];
        cmd.extend_from_slice(args);
        self.run(identity, &[], &cmd)
    }

    /// Polls `f` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first pending request, once one appears.
    pub fn pending_request(&self) -> Value {
        self.wait_for("a pending request", Duration::from_secs(10), || {
            let list = self.cli(&["approvals", "--json"]).json();
            list.as_array().and_then(|a| a.first().cloned())
        })
    }

    /// Runs `sqlite3` on the daemon's state store (which the daemon keeps writing), waiting out its
    /// write lock rather than failing on it, and returns stdout; a failure fails the test, so that
    /// an empty dump can never pass for a clean one.
    pub fn sqlite(&self, sql: &str) -> String {
        let out = Command::new("sqlite3")
            .args(["-cmd", ".timeout 30000"])
            .arg(self.dir.join("state/jitgate.db"))
            .arg(sql)
            .output()
            .expect("running sqlite3");
        assert!(
            out.status.success(),
            "sqlite3 {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every statement or request recorded, of every session, as `jitgate sessions show
    /// --json` gives them (the store keeps them in batches no SQL query reads), in the
    /// order they were recorded.
    pub fn recorded_statements(&self) -> Vec<serde_json::Value> {
        let sessions = self.cli(&["sessions", "--all", "--json"]).json();
        let mut all: Vec<serde_json::Value> = sessions
            .as_array()
            .expect("a list of sessions")
            .iter()
            .filter_map(|s| s["id"].as_str())
            .flat_map(|id| {
                let detail = self.cli(&["sessions", "show", id, "--json"]).json();
                detail["statements"].as_array().cloned().unwrap_or_default()
            })
            .collect();
        all.sort_by_key(|s| (s["at"].to_string(), s["seq"].as_u64()));
        all
    }

    pub fn cgroup_root(&self) -> PathBuf {
        jitgate::gate::cgroup::cgroup2_mount()
            .expect("cgroup2 mount")
            .join(&self.gate_cgroup)
    }
}

fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop();
        let _ = self
            .cli_command()
            .args(["gate", "detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
        remove_cgroup_tree(&self.cgroup_root());
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test state kept in {}", self.dir.display());
        }
    }
}

/// A running `jitgate run` whose output is read line by line.
pub struct Workload {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Workload {
    fn new(mut child: Child) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`, returning it.
    pub fn expect_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {timeout:?}; saw: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the process to end.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Collect remaining output.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "workload still running after {timeout:?}; saw: {:#?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Milliseconds since the epoch, as the probe prints them.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Parses an RFC 3339 timestamp from the CLI's JSON into epoch milliseconds.
pub fn rfc3339_ms(v: &Value) -> i64 {
    let s = v.as_str().expect("timestamp string");
    // 2026-11-23T01:11:36.123Z
    let out = Command::new("date")
        .args(["-u", "-d", s, "+%s%3N"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("epoch ms")
}

/// A socket address string.
pub fn addr(a: SocketAddr) -> String {
    a.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_test_is_named_after_its_function() {
        assert_eq!(crate::test_name!(), "a_test_is_named_after_its_function");
    }
}
