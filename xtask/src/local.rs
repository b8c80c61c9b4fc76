//! What the demo and the benchmarks both set up on this machine: throwaway PostgreSQL servers,
//! background processes, and the cgroup2 tree.

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Starts a process that outlives the command that started it, logging to `log`.
pub fn detached(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    cmd.spawn().with_context(|| format!("starting {cmd:?}"))
}

/// Sends SIGTERM and waits (up to five seconds) for the process to go.
pub fn terminate(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..100 {
        // SAFETY: signal 0 only checks existence.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return;
        }
        sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_port(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Where the cgroup2 hierarchy is mounted (never assumed to be `/sys/fs/cgroup`).
pub fn cgroup_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
}

/// Kills everything in a cgroup subtree and removes it.
pub fn remove_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if fs::remove_dir(path).is_ok() {
            return;
        }
        sleep(Duration::from_millis(20));
    }
}

/// A throwaway PostgreSQL server run by the `postgres` user, data under `dir/data`, the
/// Unix socket in `dir`. Stopped (fast) when dropped.
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
}

impl Postgres {
    /// The newest PostgreSQL server installed from Debian's packages (`cargo xtask setup`).
    pub fn bin_dir() -> Result<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL is not installed (run `cargo xtask setup`)")?
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|v| v.1)
            .context("no PostgreSQL server under /usr/lib/postgresql")
    }

    fn as_postgres(args: &[&str]) -> Result<()> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .output()
            .context("runuser -u postgres")?;
        if !out.status.success() {
            bail!(
                "{args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Initialises and starts a server: SCRAM logins over TCP from `hba_cidr`, trust on the
    /// Unix socket (for setup), `listen` addresses, and `settings` (`-c` options).
    pub fn start(
        dir: &Path,
        port: u16,
        listen: &str,
        hba_cidr: &str,
        settings: &[&str],
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        let status = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir)
            .status()?;
        if !status.success() {
            bail!(
                "chown postgres {}: is the postgres user there? (`cargo xtask setup`)",
                dir.display()
            );
        }
        let bin = Self::bin_dir()?;
        let tool = |name: &str| bin.join(name).to_string_lossy().into_owned();
        let data = dir.join("data").to_string_lossy().into_owned();
        Self::as_postgres(&[
            &tool("initdb"),
            "-D",
            &data,
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
        ])?;
        fs::write(
            dir.join("data/pg_hba.conf"),
            format!("local all all trust\nhost all all {hba_cidr} scram-sha-256\n"),
        )?;
        let mut opts = format!(
            "-p {port} -k {} -c listen_addresses={listen} -c fsync=off",
            dir.display()
        );
        for s in settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let log = dir.join("postgres.log").to_string_lossy().into_owned();
        Self::as_postgres(&[
            &tool("pg_ctl"),
            "-D",
            &data,
            "-l",
            &log,
            "-o",
            &opts,
            "-w",
            "start",
        ])?;
        Ok(Self {
            dir: dir.to_owned(),
            port,
        })
    }

    /// Runs a psql script as the superuser over the Unix socket; stops at the first error.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child
                    .stdin
                    .take()
                    .map(|mut stdin| stdin.write_all(sql.as_bytes()))
                    .transpose()?;
                child.wait_with_output()
            })
            .context("psql")?;
        if !out.status.success() {
            bail!(
                "psql script failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Keeps the server running after this value is gone (the demo leaves it for exploring;
    /// `stop_in` ends it later).
    pub fn leave_running(self) {
        std::mem::forget(self);
    }

    /// Stops the server in `dir` if one runs there (also one left by an earlier run).
    pub fn stop_in(dir: &Path) {
        let data = dir.join("data");
        if data.join("postmaster.pid").exists()
            && let Ok(bin) = Self::bin_dir()
        {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-m", "fast", "-w", "stop"])
                .output();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        Self::stop_in(&self.dir);
    }
}
