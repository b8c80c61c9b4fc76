//! Test support shared by the middle layer of tests: a proxy whose attributor is a fake and
//! whose store is the in-memory one, so that whole sessions of any protocol run
//! over in-memory pipes in plain `cargo test`, without root.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::{Buf as _, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Access, Config, SharedConfig},
    gate::rules::{ResourceAddrs, compile},
    grants::{GrantEngine, RequestSpec},
    identity::{Attribution, Caller},
    protocol::{Conn, Outcome, Protocols, Services},
    proxy::{
        ProxyContext, Registry, Routes,
        attribute::{Attributor, Origin},
        session::handle_conn,
    },
    store::{MemoryStore, SharedStore},
};

/// Attributes every connection to one workload going to one destination, unless told the
/// connection did not come through the gate.
pub struct Fake {
    origin: Mutex<Option<Origin>>,
    workload: Option<Attribution>,
    /// Every connection gets the record (many connections of one workload).
    every: bool,
}

impl Attributor for Fake {
    fn origin(&self, _: SocketAddr, _: SocketAddr) -> std::io::Result<Option<Origin>> {
        let mut origin = self.origin.lock().unwrap_or_else(PoisonError::into_inner);
        // A record serves one connection, like the kernel's.
        Ok(if self.every { *origin } else { origin.take() })
    }

    fn workload(&self, _: &Origin) -> Option<Attribution> {
        self.workload.clone()
    }
}

pub struct Harness {
    pub ctx: Arc<ProxyContext>,
    pub engine: GrantEngine,
    pub upstream: SocketAddr,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

pub const ENDS: Option<(SocketAddr, SocketAddr)> = Some((
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000),
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001),
));

/// An upstream that echoes what it reads.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

impl Harness {
    /// One workload `bot`, one resource `svc` at `upstream` (`extra` are more resource keys,
    /// `protocol` its protocol), one policy granting `bot` read on `svc` without approval.
    pub async fn new(protocol: &str, extra: &str, workload: Option<&str>) -> Self {
        Self::with_upstream(echo_server().await, protocol, extra, workload).await
    }

    /// [`Harness::new`] with the resource at `upstream`.
    pub async fn with_upstream(
        upstream: SocketAddr,
        protocol: &str,
        extra: &str,
        workload: Option<&str>,
    ) -> Self {
        Self::with_origin(upstream, upstream, protocol, extra, workload).await
    }

    /// [`Harness::with_upstream`] with the workload having connected to `reached` (another
    /// address the gate routes to the resource).
    pub async fn with_origin(
        upstream: SocketAddr,
        reached: SocketAddr,
        protocol: &str,
        extra: &str,
        workload: Option<&str>,
    ) -> Self {
        Self::build(upstream, reached, protocol, extra, workload, "", false, "").await
    }

    /// [`Harness::with_upstream`] for `bot`, its policy given `policy` as more keys
    /// (`limits = { ... }`).
    pub async fn with_policy(
        upstream: SocketAddr,
        protocol: &str,
        extra: &str,
        policy: &str,
    ) -> Self {
        Self::build(
            upstream,
            upstream,
            protocol,
            extra,
            Some("bot"),
            "",
            false,
            policy,
        )
        .await
    }

    /// [`Harness::with_upstream`] for `bot`, with `daemon` as more `[daemon]` keys.
    pub async fn with_daemon(
        upstream: SocketAddr,
        protocol: &str,
        extra: &str,
        daemon: &str,
    ) -> Self {
        Self::build(
            upstream,
            upstream,
            protocol,
            extra,
            Some("bot"),
            daemon,
            false,
            "",
        )
        .await
    }

    /// `bot` connecting many times to `svc` at `upstream`, with `daemon` as more `[daemon]`
    /// keys (limits, timeouts).
    pub async fn many(upstream: SocketAddr, protocol: &str, extra: &str, daemon: &str) -> Self {
        Self::build(
            upstream,
            upstream,
            protocol,
            extra,
            Some("bot"),
            daemon,
            true,
            "",
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        upstream: SocketAddr,
        reached: SocketAddr,
        protocol: &str,
        extra: &str,
        workload: Option<&str>,
        daemon: &str,
        every: bool,
        policy: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let text = format!(
            r#"
[daemon]
state_dir = "{state}"
{daemon}

[[workload]]
identity = "bot"
launchers = ["root"]

[[resource]]
name = "svc"
protocol = "{protocol}"
address = "{upstream}"
{extra}

[[policy]]
identities = ["bot"]
resources = ["svc"]
access = ["read", "write"]
max_ttl = "1h"
approval = "auto"
approvers = ["root"]
{policy}
"#,
            state = state.display()
        );
        let config = Config::from_toml(&dir.path().join("jitgate.toml"), &text)
            .unwrap_or_else(|e| panic!("config: {e}"));
        let routes = Routes::default();
        let net = ipnet::IpNet::from(upstream.ip());
        routes.update(
            compile(
                &[ResourceAddrs {
                    index: 0,
                    nets: vec![net],
                    ports: upstream.port().to_string().parse().expect("port"),
                }],
                &[],
                &[],
                &[],
                &[],
            )
            .expect("trie"),
            vec!["svc".into()],
        );
        let buffers = crate::protocol::buffers::Buffers::new(
            config.daemon.limits.buffer_budget,
            config.daemon.limits.buffer_share,
        );
        let shared = SharedConfig::new(config);
        let store: SharedStore = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let engine = GrantEngine::start(store.clone(), shared.clone(), shutdown.clone())
            .await
            .expect("engine");
        let services = Arc::new(Services {
            config: shared,
            engine: engine.clone(),
            store,
            registry: Registry::default(),
            ca: None,
            mask_key: [3; 32],
            shutdown: shutdown.clone(),
            limits: crate::protocol::limits::Limits::default(),
            refusals: crate::refusals::ProxyRefusals::default(),
            rates: crate::protocol::rate::Rates::default(),
            buffers,
            holds: crate::protocol::hold::Holds::default(),
        });
        let ctx = Arc::new(ProxyContext {
            attributor: Arc::new(Fake {
                origin: Mutex::new(Some(Origin {
                    original: reached,
                    pid: std::process::id(),
                    uid: 65534,
                    cgroup_id: 7,
                })),
                workload: workload.map(|identity| Attribution {
                    identity: identity.into(),
                    task: None,
                }),
                every,
            }),
            routes,
            protocols: Protocols::start(&services),
            services,
        });
        Self {
            ctx,
            engine,
            upstream,
            shutdown,
            _dir: dir,
        }
    }

    /// Grants `bot` read on `svc` as root would with `jitgate request --for bot`.
    pub async fn grant(&self) -> String {
        self.grant_access(Access::Read).await
    }

    /// Grants `bot` `access` on `svc` as root would with `jitgate request --for bot`.
    pub async fn grant_access(&self, access: Access) -> String {
        let spec = RequestSpec {
            resource: "svc".into(),
            access: Some(access),
            ttl: Some(Duration::from_secs(600)),
            reason: "test".into(),
            for_identity: Some("bot".into()),
            task: None,
            hosts: None,
        };
        self.engine
            .file(root().actor(), "bot", None, spec)
            .await
            .expect("request");
        self.engine
            .find("bot", None, "svc", access)
            .expect("an auto-approved grant")
            .id
    }

    /// Revokes grant `id` as root would.
    pub async fn revoke(&self, id: &str) {
        let grant = self.engine.live_grant(id).await.expect("a live grant");
        self.engine
            .revoke(&root(), grant, Some("test".into()))
            .await
            .expect("revoke");
    }

    /// The one ended session of the harness, with its records (what was handed to the store
    /// is written first).
    pub async fn only_session(&self) -> crate::store::SessionHistory {
        let store = &self.ctx.services.store;
        store.flush().await.expect("flush");
        let sessions = store.sessions(false, 10).await.expect("sessions");
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        store
            .session_history(sessions[0].id.clone())
            .await
            .expect("history")
            .expect("the session")
    }

    /// Starts a session; returns the workload's end of the pipe and the session's task.
    pub fn connect(&self) -> (DuplexStream, JoinHandle<Outcome>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(handle_conn(self.ctx.clone(), Conn::Memory(server), ENDS));
        (client, task)
    }
}

pub async fn outcome(task: JoinHandle<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the session ends")
        .expect("the session task does not panic")
}

/// Reads to the end: what the workload got before the connection closed.
pub async fn drain(mut client: DuplexStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await;
    got
}

/// Root, as the control socket would identify it.
pub fn root() -> Caller {
    Caller {
        uid: 0,
        pid: 1,
        user: "root".into(),
        workload: None,
        gated_unattributed: false,
        person: None,
        token: None,
    }
}

/// A PostgreSQL startup packet.
pub fn startup(params: &[(&str, &str)]) -> BytesMut {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut out)
        .expect("startup message");
    out
}

/// The fields of the first ErrorResponse in `bytes`: (severity, code, message, hint).
pub fn error_fields(bytes: &[u8]) -> Vec<(u8, String)> {
    let mut buf = bytes::Bytes::copy_from_slice(bytes);
    while buf.len() >= 5 {
        let tag = buf.get_u8();
        let len = buf.get_i32() as usize - 4;
        let body = buf.split_to(len.min(buf.len()));
        if tag == b'E' {
            return crate::postgres::wire::parse_fields(body).expect("error fields");
        }
    }
    panic!("no ErrorResponse in {bytes:?}");
}

pub fn field(fields: &[(u8, String)], code: u8) -> &str {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("", |(_, v)| v.as_str())
}

/// A scripted PostgreSQL server: trust login, then every simple query is logged and answered
/// with one text row holding `row`, a Parse of a text naming `fail_parse` or a poison fails
/// with a syntax error and a Bind naming `fail_bind` with 42P03 (the rest up to Sync
/// skipped), `begin` opens a transaction ReadyForQuery reports until `commit` or
/// `rollback`, and a CancelRequest logged as
/// `cancel request` (a statement the gate poisoned gets the syntax error a
/// real server gives; in unit tests, `select pg_sleep(5)` sends a notice at 100 ms and its
/// answer five seconds later, `select * from endless_rows` streams rows until the connection
/// closes (then logs `endless_rows: the connection closed`), and a catalog lookup of `slow_lookup_fn` takes half a second and finds it
/// reads only).
pub struct FakePostgres {
    pub addr: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakePostgres {
    pub async fn start(row: &'static str) -> Self {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    // Startup: length, code, parameters.
                    let Ok(len) = s.read_i32().await else { return };
                    let mut rest = vec![0u8; len as usize - 4];
                    if s.read_exact(&mut rest).await.is_err() {
                        return;
                    }
                    if rest.get(..4) == Some(&80_877_102i32.to_be_bytes()[..]) {
                        log.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push("cancel request".into());
                        return;
                    }
                    // Parameters after the protocol code, logged as `startup name=value`.
                    let fields: Vec<&[u8]> = rest
                        .get(4..)
                        .unwrap_or_default()
                        .split(|b| *b == 0)
                        .collect();
                    for pair in fields.chunks(2) {
                        if let [k, v] = pair
                            && !k.is_empty()
                        {
                            log.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!(
                                    "startup {}={}",
                                    String::from_utf8_lossy(k),
                                    String::from_utf8_lossy(v)
                                ));
                        }
                    }
                    let mut out = BytesMut::new();
                    frame(&mut out, b'R', &0i32.to_be_bytes());
                    for (k, v) in [
                        ("server_version", "15.0"),
                        ("standard_conforming_strings", "on"),
                        ("client_encoding", "UTF8"),
                        ("server_encoding", "UTF8"),
                    ] {
                        frame(
                            &mut out,
                            b'S',
                            &[k.as_bytes(), b"\0", v.as_bytes(), b"\0"].concat(),
                        );
                    }
                    frame(
                        &mut out,
                        b'K',
                        &[1i32.to_be_bytes(), 2i32.to_be_bytes()].concat(),
                    );
                    frame(&mut out, b'Z', b"I");
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                    // After an extended-protocol error, messages up to Sync are skipped.
                    let mut skipping = false;
                    // Inside BEGIN ... COMMIT/ROLLBACK (ReadyForQuery says T).
                    let mut in_tx = false;
                    loop {
                        let Ok(tag) = s.read_u8().await else { return };
                        let Ok(len) = s.read_i32().await else { return };
                        let mut body = vec![0u8; len as usize - 4];
                        if s.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if skipping && tag != b'S' {
                            continue;
                        }
                        skipping = false;
                        if tag == b'B' && memchr::memmem::find(&body, b"fail_bind").is_some() {
                            let mut out = BytesMut::new();
                            frame(
                                &mut out,
                                b'E',
                                b"SERROR\0C42P03\0Mcursor already exists\0\0",
                            );
                            skipping = true;
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if tag == b'P'
                            && (memchr::memmem::find(&body, b"fail_parse").is_some()
                                || memchr::memmem::find(&body, b"jitgate_refused_").is_some())
                        {
                            // As the server words it: a poison's nonce is in the message.
                            let text = body
                                .split(|b| *b == 0)
                                .nth(1)
                                .map(String::from_utf8_lossy)
                                .unwrap_or_default();
                            let said = format!("Msyntax error at or near \"{text}\"\0");
                            let mut out = BytesMut::new();
                            frame(
                                &mut out,
                                b'E',
                                &[&b"SERROR\0C42601\0"[..], said.as_bytes(), b"\0"].concat(),
                            );
                            skipping = true;
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let out = match tag {
                            b'X' => return,
                            b'Q' => {
                                let text = String::from_utf8_lossy(&body)
                                    .trim_end_matches('\0')
                                    .to_owned();
                                {
                                    let mut seen =
                                        log.lock().unwrap_or_else(PoisonError::into_inner);
                                    // Bounded: the fuzz target runs millions of statements.
                                    if seen.len() >= 10_000 {
                                        seen.clear();
                                    }
                                    seen.push(text.clone());
                                }
                                if cfg!(test)
                                    && text.contains("FROM pg_catalog.pg_proc p JOIN")
                                    && text.contains("'slow_lookup_fn'")
                                {
                                    // A function lookup that takes half a second, and
                                    // finds a function that only reads.
                                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                                    let mut out = BytesMut::new();
                                    frame(&mut out, b'T', &text_columns(&["proname", "bool_or"]));
                                    frame(
                                        &mut out,
                                        b'D',
                                        &text_values(&["slow_lookup_fn", "false"]),
                                    );
                                    frame(&mut out, b'C', b"SELECT 1\0");
                                    frame(&mut out, b'Z', b"I");
                                    if s.write_all(&out).await.is_err() {
                                        return;
                                    }
                                    continue;
                                }
                                if cfg!(test) && text == "select * from endless_rows" {
                                    // Rows until the connection closes, then a note of it.
                                    let mut rows = BytesMut::new();
                                    frame(&mut rows, b'T', &text_columns(&["v"]));
                                    let row = "r".repeat(1000);
                                    for _ in 0..64 {
                                        frame(&mut rows, b'D', &text_values(&[&row]));
                                    }
                                    while s.write_all(&rows).await.is_ok() {
                                        rows.clear();
                                        for _ in 0..64 {
                                            frame(&mut rows, b'D', &text_values(&[&row]));
                                        }
                                    }
                                    log.lock()
                                        .unwrap_or_else(PoisonError::into_inner)
                                        .push("endless_rows: the connection closed".into());
                                    return;
                                }
                                if cfg!(test) && text == "select pg_sleep(5)" {
                                    // A notice at 100 ms, then nothing until the answer.
                                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                                    let mut notice = BytesMut::new();
                                    frame(&mut notice, b'N', b"SNOTICE\0C00000\0Msleeping\0\0");
                                    if s.write_all(&notice).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                                }
                                let mut out = BytesMut::new();
                                if text.contains("jitgate_refused_") {
                                    // As the server words it: the nonce is in the message.
                                    let said = format!("Msyntax error at or near \"{text}\"\0");
                                    let fields =
                                        [&b"SERROR\0"[..], b"C42601\0", said.as_bytes(), b"\0"]
                                            .concat();
                                    frame(&mut out, b'E', &fields);
                                } else {
                                    frame(&mut out, b'T', &one_text_column());
                                    frame(&mut out, b'D', &one_value(row));
                                    frame(&mut out, b'C', b"SELECT 1\0");
                                }
                                match text.to_ascii_lowercase().as_str() {
                                    "begin" => in_tx = true,
                                    "commit" | "rollback" => in_tx = false,
                                    _ => {}
                                }
                                frame(&mut out, b'Z', if in_tx { b"T" } else { b"I" });
                                out
                            }
                            // The extended protocol, in its simplest shape: every statement
                            // has no parameters and returns the one row.
                            other => extended_reply(other, &body, row, in_tx),
                        };
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, seen }
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// RowDescription of text columns computed by the server (table oid 0).
fn text_columns(names: &[&str]) -> Vec<u8> {
    let mut desc = (names.len() as i16).to_be_bytes().to_vec();
    for name in names {
        desc.extend_from_slice(name.as_bytes());
        desc.push(0);
        desc.extend_from_slice(&0i32.to_be_bytes());
        desc.extend_from_slice(&0i16.to_be_bytes());
        desc.extend_from_slice(&25i32.to_be_bytes());
        desc.extend_from_slice(&(-1i16).to_be_bytes());
        desc.extend_from_slice(&(-1i32).to_be_bytes());
        desc.extend_from_slice(&0i16.to_be_bytes());
    }
    desc
}

/// DataRow of text values.
fn text_values(values: &[&str]) -> Vec<u8> {
    let mut data = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        data.extend_from_slice(&(v.len() as i32).to_be_bytes());
        data.extend_from_slice(v.as_bytes());
    }
    data
}

/// RowDescription of the one text column `v` every statement returns.
fn one_text_column() -> Vec<u8> {
    text_columns(&["v"])
}

fn one_value(row: &str) -> Vec<u8> {
    text_values(&[row])
}

/// The fake server's answer to an extended-protocol message (nothing for the others).
fn extended_reply(tag: u8, body: &[u8], row: &str, in_tx: bool) -> BytesMut {
    let mut out = BytesMut::new();
    match tag {
        b'P' => frame(&mut out, b'1', b""),
        b'B' => frame(&mut out, b'2', b""),
        b'D' => {
            if body.first() == Some(&b'S') {
                frame(&mut out, b't', &0i16.to_be_bytes());
            }
            frame(&mut out, b'T', &one_text_column());
        }
        b'E' => {
            frame(&mut out, b'D', &one_value(row));
            frame(&mut out, b'C', b"SELECT 1\0");
        }
        b'C' => frame(&mut out, b'3', b""),
        b'S' => frame(&mut out, b'Z', if in_tx { b"T" } else { b"I" }),
        _ => {}
    }
    out
}
