//! A throwaway PostgreSQL server for the store's tests, stopped on drop.
//!
//! The server runs as the `postgres` user (it refuses root) from the Debian binaries under
//! `/usr/lib/postgresql/*/bin`. Without them (or without root to switch users), the tests
//! that need it are skipped with a loud message, except in CI (`CI=true`), where that is a
//! failure: a suite that silently ran nothing would prove nothing. (The e2e harness has its
//! own launcher in `tests/src/servers.rs`; the agent's unit tests cannot depend on that
//! crate.)

use std::{path::PathBuf, process::Command};

use super::PostgresOptions;

pub struct TestDb {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn as_postgres(args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TestDb {
    /// Starts a server, or says why not: `None` outside CI when PostgreSQL is missing.
    pub fn start() -> Option<Self> {
        let root = nix::unistd::geteuid().is_root();
        let bin = pg_bin();
        let (Some(bin), true) = (bin, root) else {
            let why = "PostgreSQL 15 server binaries (/usr/lib/postgresql/*/bin) and root (to run it as `postgres`) are needed";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{why}; CI must run the PostgreSQL store tests (cargo xtask setup installs it)"
            );
            eprintln!("\n!!! SKIPPED: the PostgreSQL store tests did not run: {why}.\n");
            return None;
        };
        let port = free_port();
        let dir = PathBuf::from(format!(
            "/tmp/jitgate-store-pg-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        let data = dir.join("data");
        let data_s = data.to_str().expect("utf-8");
        let tool = |name: &str| bin.join(name).to_string_lossy().into_owned();
        as_postgres(&[
            &tool("initdb"),
            "-D",
            data_s,
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        let log = dir.join("postgres.log");
        as_postgres(&[
            &tool("pg_ctl"),
            "-D",
            data_s,
            "-o",
            &opts,
            "-l",
            log.to_str().expect("utf-8"),
            "-w",
            "start",
        ]);
        Some(Self { port, dir, bin })
    }

    /// Runs SQL as the superuser over the server's socket.
    pub fn admin(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A fresh, empty database.
    pub fn database(&self, name: &str) -> String {
        self.admin("postgres", &format!("CREATE DATABASE {name}"));
        name.to_owned()
    }

    /// Options for host `host` on database `db`.
    pub fn options(&self, db: &str, host: &str) -> PostgresOptions {
        PostgresOptions {
            url: format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port),
            password_file: None,
            ca_file: None,
            pool_size: 2,
            host_id: host.to_owned(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
