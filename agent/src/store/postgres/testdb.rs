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
        Self::launch(false)
    }

    /// [`Self::start`] with TLS (a certificate for `127.0.0.1` only, signed by the CA in
    /// `ca.pem` of [`Self::tls_dir`]) and SCRAM logins over it: plain TCP is refused.
    pub fn start_tls() -> Option<Self> {
        Self::launch(true)
    }

    /// Where the TLS test files are: `ca.pem`, and `other-ca.pem`, a CA that signed nothing.
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("tls")
    }

    fn launch(tls: bool) -> Option<Self> {
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
        let opts = if tls {
            write_tls(&dir.join("tls"));
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n",
            )
            .expect("hba");
            let t = |name: &str| dir.join("tls").join(name).to_string_lossy().into_owned();
            format!(
                "{opts} -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                t("server.pem"),
                t("server.key")
            )
        } else {
            opts
        };
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
            lease: std::time::Duration::from_secs(30),
            spool_limit: 64 << 20,
            change_log_retention: crate::store::postgres::DEFAULT_CHANGE_LOG_RETENTION,
            require_sync_standby: false,
        }
    }
}

/// A CA, a server certificate for `127.0.0.1` it signed (owned by `postgres`, key 0600), and
/// an unrelated CA.
fn write_tls(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).expect("tls dir");
    let ca = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-signed");
        (Issuer::new(params, key), cert.pem())
    };
    let (issuer, ca_pem) = ca("store test CA");
    let (_, other_pem) = ca("another CA");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("signed");
    std::fs::write(dir.join("ca.pem"), ca_pem).expect("ca");
    std::fs::write(dir.join("other-ca.pem"), other_pem).expect("ca");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("key");
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .expect("chown");
    assert!(chown.success());
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
