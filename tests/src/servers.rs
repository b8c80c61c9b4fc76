//! Upstream servers the tests protect: a greeting echo server, a tiny HTTP server and a DNS
//! server whose answer the test can change.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

/// What the echo server says first on every connection: seeing it means the workload
/// reached the upstream.
pub const BANNER: &str = "HELLO-FROM-UPSTREAM";

/// Stops the server thread when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(listener: TcpListener, handler: fn(TcpStream)) -> Server {
    let addr = listener.local_addr().expect("local addr");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if flag.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(s) = stream {
                std::thread::spawn(move || handler(s));
            }
        }
    });
    Server { addr, stop }
}

fn echo(mut s: TcpStream) {
    if s.write_all(format!("{BANNER}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Greets, then echoes. Listens on `bind` (use `[::]:0` for dual-stack).
pub fn echo_server(bind: &str) -> Server {
    // On Linux `[::]` is dual-stack unless net.ipv6.bindv6only says otherwise.
    serve(TcpListener::bind(bind).expect("binding echo server"), echo)
}

fn http(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{BANNER} over http\n");
    let _ = s.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// Answers every request with 200 and a body containing [`BANNER`].
pub fn http_server() -> Server {
    serve(
        TcpListener::bind("127.0.0.1:0").expect("binding http server"),
        http,
    )
}

/// A DNS server answering A queries for one name with an address the test can change, TTL
/// one second; every other query gets an empty answer.
pub struct Dns {
    pub addr: SocketAddr,
    answer: Arc<Mutex<(Ipv4Addr, Option<Ipv6Addr>)>>,
    stop: Arc<AtomicBool>,
}

impl Dns {
    /// Answers A queries for `name` with `answer`, AAAA queries with nothing.
    pub fn start(name: &str, answer: Ipv4Addr) -> Self {
        Self::start_dual(name, answer, None)
    }

    /// Answers A queries for `name` with `answer`, and AAAA queries with `answer6` if given.
    pub fn start_dual(name: &str, answer: Ipv4Addr, answer6: Option<Ipv6Addr>) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("dns bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let answer = Arc::new(Mutex::new((answer, answer6)));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, qname) = (answer.clone(), stop.clone(), encode_name(name));
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let (v4, v6) = *a.lock().expect("answer");
                if let Some(reply) = respond(&buf[..n], &qname, v4, v6) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Self { addr, answer, stop }
    }

    pub fn set(&self, ip: Ipv4Addr) {
        self.answer.lock().expect("answer").0 = ip;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend(label.to_ascii_lowercase().bytes());
    }
    out.push(0);
    out
}

fn respond(query: &[u8], name: &[u8], ip: Ipv4Addr, ip6: Option<Ipv6Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Question: name, type, class.
    let mut i = 12;
    while i < query.len() && query[i] != 0 {
        i += usize::from(query[i]) + 1;
    }
    let qend = i + 5;
    if qend > query.len() {
        return None;
    }
    let qname: Vec<u8> = query[12..=i].iter().map(u8::to_ascii_lowercase).collect();
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    let rdata: Option<Vec<u8>> = match qtype {
        _ if qname != name => None,
        1 => Some(ip.octets().to_vec()),
        28 => ip6.map(|v6| v6.octets().to_vec()),
        _ => None,
    };
    let answer = rdata.is_some();
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&query[0..2]); // id
    out.extend_from_slice(&[0x81, 0x80]); // response, recursion desired+available, NOERROR
    out.extend_from_slice(&[0, 1]); // qdcount
    out.extend_from_slice(&[0, u8::from(answer)]); // ancount
    out.extend_from_slice(&[0, 0, 0, 0]); // nscount, arcount
    out.extend_from_slice(&query[12..qend]);
    if let Some(rdata) = rdata {
        out.extend_from_slice(&[0xc0, 0x0c]); // pointer to the question name
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&[0, 1]); // IN
        out.extend_from_slice(&1u32.to_be_bytes()); // TTL 1s
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}

/// A throwaway PostgreSQL server, stopped on drop. `start` trusts every login;
/// `start_secured` demands SCRAM (md5 for one role), can require TLS, and creates the roles and
/// data the PostgreSQL gate tests use.
pub struct Postgres {
    pub port: u16,
    dir: std::path::PathBuf,
    /// Password files (mode 0600), by role.
    pub secrets: std::path::PathBuf,
    /// The CA that signed the server certificate (with TLS).
    pub ca: Option<std::path::PathBuf>,
    /// The server's options, to start it again after [`Postgres::stop`].
    opts: String,
}

/// Passwords of the roles `start_secured` creates.
pub const PG_ROLES: &[(&str, &str)] = &[
    ("orders_ro", "ro-Secret-7c1e"),
    ("orders_rw", "rw-Secret-9a2f"),
    ("orders_admin", "admin-Secret-3b8d"),
    ("orders_md5", "md5-Secret-5d0a"),
];

fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest PostgreSQL server installed from Debian's packages.
fn pg_bin() -> std::path::PathBuf {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (run `cargo xtask setup`)")
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
        .expect("no PostgreSQL server under /usr/lib/postgresql")
        .1
}

impl Postgres {
    pub fn start() -> Self {
        Self::launch(false, false)
    }

    /// SCRAM logins, roles and data; with `tls`, the server also offers TLS with a
    /// certificate for `127.0.0.1` and `db.test` signed by [`Self::ca`].
    pub fn start_secured(tls: bool) -> Self {
        let pg = Self::launch(true, tls);
        let roles = PG_ROLES
            .iter()
            .map(|(r, pw)| {
                let enc = if *r == "orders_md5" {
                    "md5"
                } else {
                    "scram-sha-256"
                };
                format!("SET password_encryption = '{enc}'; CREATE ROLE {r} LOGIN PASSWORD '{pw}';")
            })
            .collect::<String>();
        pg.admin("postgres", "CREATE DATABASE orders");
        pg.admin("postgres", &roles);
        pg.admin(
            "orders",
            "CREATE TABLE users (id int PRIMARY KEY, name text, email text, card text, ssn text, note text);
             INSERT INTO users VALUES
               (1, 'Jane', 'jane@example.com', '4111 1111 1111 1111', '123-45-6789', 'vip'),
               (2, 'John', 'john@example.org', '5500 0000 0000 0004', '234-56-7890', 'call +1 415 555 0100'),
               (3, 'Ann', 'ann@example.net', 'none', 'none', 'AKIAIOSFODNN7EXAMPLE');
             CREATE TABLE scratch (id int, v text);
             CREATE SEQUENCE ticket;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO orders_ro, orders_md5;
             GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO orders_rw;
             GRANT USAGE ON SEQUENCE ticket TO orders_ro, orders_rw;
             GRANT ALL ON SCHEMA public TO orders_admin;
             ALTER TABLE users OWNER TO orders_admin; ALTER TABLE scratch OWNER TO orders_admin;",
        );
        pg
    }

    /// The `[resource.credentials.*]` tables of a gate resource for this server's `orders`
    /// roles (read, write, admin), with their password files.
    pub fn credentials_toml(&self) -> String {
        ["read", "write", "admin"]
            .iter()
            .zip(["orders_ro", "orders_rw", "orders_admin"])
            .map(|(level, role)| {
                format!(
                    "[resource.credentials.{level}]\nuser = \"{role}\"\npassword_file = \"{}\"\n",
                    self.secrets.join(format!("{role}.pw")).display()
                )
            })
            .collect()
    }

    /// The server's Unix socket directory.
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Runs SQL as the superuser over the local socket (not through any gate).
    pub fn admin(&self, db: &str, sql: &str) -> String {
        run_ok(
            std::process::Command::new("psql")
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
                ]),
        )
    }

    fn launch(secured: bool, tls: bool) -> Self {
        use std::process::Command;
        let port = crate::free_port();
        let dir =
            std::path::PathBuf::from(format!("/tmp/jitgate-e2e-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pg dir");
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(chown.success());
        let as_postgres = |args: &[&str]| {
            let out = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .args(args)
                .output()
                .expect("runuser postgres");
            assert!(
                out.status.success(),
                "{args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.join("data");
        let data_s = data.to_str().expect("utf-8");
        let bin = pg_bin();
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
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).expect("secrets dir");
        std::fs::set_permissions(
            &secrets,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        for (role, pw) in PG_ROLES {
            let path = secrets.join(format!("{role}.pw"));
            std::fs::write(&path, format!("{pw}\n")).expect("secret");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod");
        }
        let mut ca = None;
        let mut conf = String::new();
        if secured {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhost all orders_md5 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 scram-sha-256\n",
            )
            .expect("hba");
        }
        if tls {
            let tls_dir = dir.join("tls");
            std::fs::create_dir_all(&tls_dir).expect("tls dir");
            let t = |name: &str| tls_dir.join(name).to_string_lossy().into_owned();
            run_ok(std::process::Command::new("openssl").args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=jitgate test CA",
                "-keyout",
                &t("ca.key"),
                "-out",
                &t("ca.pem"),
            ]));
            run_ok(std::process::Command::new("openssl").args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=db.test",
                "-keyout",
                &t("server.key"),
                "-out",
                &t("server.csr"),
            ]));
            std::fs::write(
                tls_dir.join("san.ext"),
                "subjectAltName=DNS:db.test,IP:127.0.0.1\n",
            )
            .expect("ext");
            run_ok(std::process::Command::new("openssl").args([
                "x509",
                "-req",
                "-in",
                &t("server.csr"),
                "-CA",
                &t("ca.pem"),
                "-CAkey",
                &t("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &t("san.ext"),
                "-out",
                &t("server.pem"),
            ]));
            run_ok(
                std::process::Command::new("chown")
                    .arg("-R")
                    .arg("postgres:postgres")
                    .arg(&tls_dir),
            );
            std::fs::set_permissions(
                tls_dir.join("server.key"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("chmod");
            conf = format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                t("server.pem"),
                t("server.key")
            );
            ca = Some(tls_dir.join("ca.pem"));
        }
        let opts = format!("{opts}{conf}");
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
        Self {
            port,
            dir,
            secrets,
            ca,
            opts,
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(args)
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server as a crash would look to its clients: connections cut, nothing
    /// answering on the port (`immediate` mode).
    pub fn stop(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data.
    pub fn start_again(&self) {
        let log = self.dir.join("postgres.log");
        self.pg_ctl(&[
            "-o",
            &self.opts,
            "-l",
            log.to_str().expect("utf-8"),
            "-w",
            "start",
        ]);
    }
}

impl Postgres {
    /// A streaming replica of this server (`pg_basebackup -R`), started on a port of its own
    /// and caught up; then made this server's synchronous standby
    /// (`synchronous_standby_names = '*'`, set after the copy, so the replica does not
    /// inherit it: promoted, it has no standby to wait for). Waits until the primary reports
    /// it as `sync`.
    pub fn synchronous_standby(&self) -> Self {
        use std::process::Command;
        let port = crate::free_port();
        let dir =
            std::path::PathBuf::from(format!("/tmp/jitgate-e2e-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("standby dir");
        run_ok(Command::new("chown").arg("postgres:postgres").arg(&dir));
        let data = dir.join("data");
        let as_postgres = |tool: &str, args: &[&std::ffi::OsStr]| {
            run_ok(
                Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(pg_bin().join(tool))
                    .args(args),
            )
        };
        as_postgres(
            "pg_basebackup",
            &[
                "-h".as_ref(),
                self.dir.as_os_str(),
                "-p".as_ref(),
                self.port.to_string().as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "-N".as_ref(),
            ],
        );
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.display()
        );
        let standby = Self {
            port,
            dir,
            secrets: self.secrets.clone(),
            ca: None,
            opts,
        };
        standby.start_again();
        self.admin(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        self.admin("postgres", "SELECT pg_reload_conf()");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let state = self.admin(
                "postgres",
                "SELECT string_agg(sync_state, ',') FROM pg_stat_replication",
            );
            if state.trim() == "sync" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the standby did not become synchronous: {state:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        standby
    }

    /// Promotes this standby to a primary (`pg_ctl promote`), waiting until it accepts
    /// writes.
    pub fn promote(&self) {
        self.pg_ctl(&["-w", "promote"]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin().join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP forwarder to `upstream` that a test can cut (every connection through it closed,
/// new ones closed at once) and mend: one host's network path to a shared server failing
/// while other hosts still reach it. Stops forwarding when dropped.
pub struct Cable {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Cable {
    pub fn new(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind cable");
        let addr = listener.local_addr().expect("local addr");
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, l, s) = (cut.clone(), live.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = stream else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let mut held = l.lock().expect("cable lock");
                for s in [&client, &server] {
                    if let Ok(s) = s.try_clone() {
                        held.push(s);
                    }
                }
                drop(held);
                let pipe = |mut from: TcpStream, mut to: TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    pipe(client, s2);
                    pipe(server, c2);
                }
            }
        });
        Self {
            addr,
            cut,
            live,
            stop,
        }
    }

    /// Closes every connection through the cable and refuses new ones until [`Cable::mend`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.live.lock().expect("cable lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cut();
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}
