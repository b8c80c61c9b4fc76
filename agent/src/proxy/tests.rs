//! The proxy and its protocols driven over in-memory pipes, with a fake attributor and a
//! store in a temporary directory: no root, no BPF, no socket to the workload. The kernel
//! side of the same paths is covered end to end in `tests/`.

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

use super::{
    ProxyContext, Routes,
    attribute::{Attributor, Origin},
    session::handle_conn,
};
use crate::{
    config::{Access, Config, SharedConfig},
    gate::rules::{ResourceAddrs, compile},
    grants::{GrantEngine, RequestSpec},
    identity::{Attribution, Caller},
    model::SessionOutcome,
    protocol::{Conn, Outcome, Protocols, Services},
    store::Store,
};

/// Attributes every connection to one workload going to one destination, unless told the
/// connection did not come through the gate.
struct Fake {
    origin: Mutex<Option<Origin>>,
    workload: Option<Attribution>,
}

impl Attributor for Fake {
    fn origin(&self, _: SocketAddr, _: SocketAddr) -> std::io::Result<Option<Origin>> {
        // A record serves one connection, like the kernel's.
        Ok(self
            .origin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take())
    }

    fn workload(&self, _: &Origin) -> Option<Attribution> {
        self.workload.clone()
    }
}

struct Harness {
    ctx: Arc<ProxyContext>,
    engine: GrantEngine,
    upstream: SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

const ENDS: Option<(SocketAddr, SocketAddr)> = Some((
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000),
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001),
));

/// An upstream that echoes what it reads.
async fn echo_server() -> SocketAddr {
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
    async fn new(protocol: &str, extra: &str, workload: Option<&str>) -> Self {
        let upstream = echo_server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let text = format!(
            r#"
[daemon]
state_dir = "{state}"

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
            )
            .expect("trie"),
            vec!["svc".into()],
        );
        let shared = SharedConfig::new(config);
        let store = Store::open(&state).expect("store");
        let shutdown = CancellationToken::new();
        let engine = GrantEngine::start(store.clone(), shared.clone(), shutdown.clone())
            .await
            .expect("engine");
        let services = Arc::new(Services {
            config: shared,
            engine: engine.clone(),
            store,
            registry: super::Registry::default(),
            ca: None,
            mask_key: [3; 32],
            shutdown: shutdown.clone(),
        });
        let ctx = Arc::new(ProxyContext {
            attributor: Arc::new(Fake {
                origin: Mutex::new(Some(Origin {
                    original: upstream,
                    pid: std::process::id(),
                    uid: 65534,
                    cgroup_id: 7,
                })),
                workload: workload.map(|identity| Attribution {
                    identity: identity.into(),
                    task: None,
                }),
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
    async fn grant(&self) -> String {
        let root = Caller {
            uid: 0,
            pid: 1,
            user: "root".into(),
            workload: None,
            gated_unattributed: false,
        };
        let spec = RequestSpec {
            resource: "svc".into(),
            access: Some(Access::Read),
            ttl: Some(Duration::from_secs(600)),
            reason: "test".into(),
            for_identity: Some("bot".into()),
            task: None,
        };
        self.engine.file(&root, spec).await.expect("request");
        self.engine
            .find("bot", None, "svc", Access::Read)
            .expect("an auto-approved grant")
            .id
    }

    /// Starts a session; returns the workload's end of the pipe and the session's task.
    fn connect(&self) -> (DuplexStream, JoinHandle<Outcome>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(handle_conn(self.ctx.clone(), Conn::Memory(server), ENDS));
        (client, task)
    }
}

async fn outcome(task: JoinHandle<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the session ends")
        .expect("the session task does not panic")
}

/// Reads to the end: what the workload got before the connection closed.
async fn drain(mut client: DuplexStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got)).await;
    got
}

#[tokio::test]
async fn tcp_relays_only_under_a_grant_and_ends_with_it() {
    let h = Harness::new("tcp", "", Some("bot")).await;
    let grant = h.grant().await;
    let (mut client, task) = h.connect();
    client.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echoed, b"ping");
    assert_eq!(h.ctx.services.registry.len(), 1, "the session is live");

    let root = Caller {
        uid: 0,
        pid: 1,
        user: "root".into(),
        workload: None,
        gated_unattributed: false,
    };
    h.engine
        .revoke(&root, &grant, Some("test".into()))
        .await
        .expect("revoke");
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    assert_eq!(detail, format!("grant {grant} revoked"));
    assert!(
        h.ctx.services.registry.is_empty(),
        "the session left the registry"
    );
    // The workload's side is closed: nothing more arrives.
    assert!(drain(client).await.is_empty());
}

#[tokio::test]
async fn tcp_without_a_grant_is_refused_before_any_upstream_byte() {
    let h = Harness::new("tcp", "", Some("bot")).await;
    let (mut client, task) = h.connect();
    // A hostile workload pipelines its payload before the gate has decided anything.
    let _ = client.write_all(b"DELETE EVERYTHING\n").await;
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::RefusedNoGrant);
    assert!(
        detail.contains("jitgate request svc --access read"),
        "the refusal says what to do next: {detail}"
    );
    assert!(drain(client).await.is_empty(), "nothing was relayed back");
    let _ = h.upstream;
}

#[tokio::test]
async fn unattributed_and_unknown_workloads_are_refused() {
    // No gate record: the connection did not come through the gate.
    let h = Harness::new("tcp", "", Some("bot")).await;
    h.grant().await;
    let (mut client, first) = h.connect();
    client.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    client.read_exact(&mut one).await.expect("echo");
    drop(client);
    assert_eq!(outcome(first).await.0, SessionOutcome::Closed);
    // The record was consumed by the first connection: a second one reusing it is refused.
    let (_c, second) = h.connect();
    let (how, detail) = outcome(second).await;
    assert_eq!(how, SessionOutcome::RefusedUnattributed, "{detail}");

    // A process inside the gate that belongs to no workload gets nothing.
    let h = Harness::new("tcp", "", None).await;
    let (_c, task) = h.connect();
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::RefusedUnattributed);
    assert!(
        detail.contains("belongs to no configured workload"),
        "{detail}"
    );
}

#[tokio::test]
async fn held_connection_is_granted_by_policy_then_relayed() {
    let h = Harness::new("tcp", "on_missing_grant = \"request\"", Some("bot")).await;
    let (mut client, task) = h.connect();
    client.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echoed, b"hello");
    drop(client);
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::Closed, "{detail}");
}

#[tokio::test]
async fn shutdown_and_resource_removal_end_live_sessions() {
    let h = Harness::new("tcp", "", Some("bot")).await;
    h.grant().await;
    let (mut client, task) = h.connect();
    client.write_all(b"x").await.expect("write");
    let mut one = [0u8; 1];
    client.read_exact(&mut one).await.expect("echo");
    assert_eq!(h.ctx.services.registry.end_resources_not_in(&[]), 1);
    let (how, _) = outcome(task).await;
    assert_eq!(how, SessionOutcome::ResourceRemoved);

    let h = Harness::new("tcp", "", Some("bot")).await;
    h.grant().await;
    let (mut client, task) = h.connect();
    client.write_all(b"x").await.expect("write");
    client.read_exact(&mut one).await.expect("echo");
    h.shutdown.cancel();
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::Shutdown, "{detail}");
}

/// A PostgreSQL startup packet.
fn startup(params: &[(&str, &str)]) -> BytesMut {
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut out)
        .expect("startup message");
    out
}

/// The fields of the first ErrorResponse in `bytes`: (severity, code, message, hint).
fn error_fields(bytes: &[u8]) -> Vec<(u8, String)> {
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

fn field(fields: &[(u8, String)], code: u8) -> &str {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("", |(_, v)| v.as_str())
}

const PG_KEYS: &str = r#"databases = ["app"]
credentials.read = { user = "ro" }"#;

#[tokio::test]
async fn postgres_refusals_speak_postgres() {
    // A database the resource does not offer: 3D000 naming the ones it does.
    let h = Harness::new("postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[("user", "agent"), ("database", "secrets")]))
        .await
        .expect("startup");
    let got = drain(client).await;
    let fields = error_fields(&got);
    assert_eq!(field(&fields, b'S'), "FATAL");
    assert_eq!(field(&fields, b'C'), "3D000");
    assert!(field(&fields, b'M').contains("\"secrets\" is not available"));
    assert_eq!(field(&fields, b'H'), "databases available: app");
    assert_eq!(outcome(task).await.0, SessionOutcome::RefusedNoResource);

    // No grant: 28000 with the command that asks for one.
    let h = Harness::new("postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[("user", "agent"), ("database", "app")]))
        .await
        .expect("startup");
    let got = drain(client).await;
    let fields = error_fields(&got);
    assert_eq!(field(&fields, b'C'), "28000");
    assert_eq!(field(&fields, b'H'), "jitgate request svc --access read");
    assert_eq!(outcome(task).await.0, SessionOutcome::RefusedNoGrant);

    // Replication connections are refused whatever the grant.
    let h = Harness::new("postgres", PG_KEYS, Some("bot")).await;
    h.grant().await;
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[
            ("user", "agent"),
            ("database", "app"),
            ("replication", "database"),
        ]))
        .await
        .expect("startup");
    let fields = error_fields(&drain(client).await);
    assert_eq!(field(&fields, b'C'), "0A000");
    assert_eq!(outcome(task).await.0, SessionOutcome::Error);
}

#[tokio::test]
async fn postgres_garbage_before_startup_is_refused() {
    for hostile in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0, 0, 0, 4][..],
        &[0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0][..],
    ] {
        let h2 = Harness::new("postgres", PG_KEYS, Some("bot")).await;
        h2.grant().await;
        let (mut client, task) = h2.connect();
        let _ = client.write_all(hostile).await;
        let _ = client.shutdown().await;
        let (how, detail) = outcome(task).await;
        assert_eq!(how, SessionOutcome::Error, "{hostile:?}: {detail}");
        assert!(h2.ctx.services.registry.is_empty());
    }
}
