//! The proxy and the tcp protocol driven over in-memory pipes, with a fake attributor and the
//! in-memory store: no root, no BPF, no socket to the workload. The kernel
//! side of the same paths is covered end to end in `tests/`.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    model::SessionOutcome,
    testing::{Harness, drain, outcome},
};

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

    h.revoke(&grant).await;
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

#[tokio::test]
async fn a_local_resource_is_reached_at_its_own_endpoint_only() {
    // The resource is the echo server at 127.0.0.1:P; a rogue service listens at 127.0.0.2:P.
    let real = crate::testing::echo_server().await;
    let rogue_addr = std::net::SocketAddr::new("127.0.0.2".parse().expect("ip"), real.port());
    let rogue = tokio::net::TcpListener::bind(rogue_addr)
        .await
        .expect("bind the rogue");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rogue.accept().await {
            let _ = s.write_all(b"ROGUE").await;
        }
    });
    for reached in [rogue_addr, "127.0.0.3:0".parse().expect("addr")] {
        let reached = std::net::SocketAddr::new(reached.ip(), real.port());
        let h = Harness::with_origin(real, reached, "tcp", "", Some("bot")).await;
        h.grant().await;
        let (mut client, task) = h.connect();
        client.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("an answer")
            .expect("read");
        assert_eq!(
            &got, b"ping",
            "reached at {reached}: the real endpoint answered"
        );
        drop(client);
        let _ = outcome(task).await;
    }
}

/// Opens a tcp session and checks it relays.
async fn relaying(
    h: &Harness,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
) {
    let (mut client, task) = h.connect();
    client.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    (client, task)
}

#[tokio::test]
async fn tcp_sessions_are_limited_per_grant_and_per_identity() {
    for (resource, daemon, key) in [
        ("max_sessions_per_grant = 2", "", "max_sessions_per_grant"),
        ("", "max_sessions_per_grant = 2", "max_sessions_per_grant"),
        (
            "",
            "max_sessions_per_identity = 2",
            "max_sessions_per_identity",
        ),
    ] {
        let h = Harness::many(crate::testing::echo_server().await, "tcp", resource, daemon).await;
        h.grant().await;
        let mut open = vec![relaying(&h).await, relaying(&h).await];
        let (client, task) = h.connect();
        let (how, detail) = outcome(task).await;
        assert_eq!(how, SessionOutcome::RefusedLimit, "{key}: {detail}");
        assert!(detail.contains(key), "{key}: {detail}");
        assert!(drain(client).await.is_empty());
        assert_eq!(h.ctx.services.registry.len(), 2);
        // A session that ends gives its slots back.
        let (gone, task) = open.pop().expect("open");
        drop(gone);
        let _ = outcome(task).await;
        open.push(relaying(&h).await);
        drop(open);
    }
}

#[tokio::test]
async fn refused_connect_and_close_floods_are_folded_in_the_audit() {
    let h = Harness::many(crate::testing::echo_server().await, "tcp", "", "").await;
    for _ in 0..500 {
        let (client, task) = h.connect();
        drop(client);
        assert_eq!(outcome(task).await.0, SessionOutcome::RefusedNoGrant);
    }
    let store = &h.ctx.services.store;
    h.ctx.services.refusals.flush(store);
    store.flush().await.expect("flush");
    let log = store.audit_log(None, 10_000).await.expect("audit");
    let kinds: Vec<&str> = log.iter().map(|r| r.kind.as_str()).collect();
    assert!(
        log.len() as u64 <= crate::refusals::FULL_PER_WINDOW + 1,
        "{kinds:?}"
    );
    let folded: u64 = log
        .iter()
        .filter(|r| r.kind == "sessions.refused")
        .map(|r| r.detail["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(folded, 500 - crate::refusals::FULL_PER_WINDOW, "{kinds:?}");
}
