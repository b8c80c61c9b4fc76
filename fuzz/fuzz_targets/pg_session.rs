//! Whole PostgreSQL sessions: after a valid startup, whatever a workload sends (simple and
//! extended protocol, COPY, cancels, pipelined and malformed messages) goes through the real
//! session (`jitgate::testing`: the proxy, grants and recording of the daemon, over an
//! in-memory pipe) to a scripted server that answers every query with one row holding an
//! email and a card number, under column masking and detectors. The session must end when
//! the workload closes, must not panic, and no row value may reach the workload unmasked.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use jitgate::testing::{FakePostgres, Harness, startup};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const KEYS: &str = r#"databases = ["app"]
credentials.read = { user = "ro" }
[[resource.mask]]
columns = ["*.v"]
detectors = ["email", "card"]
strategy = "redact"
"#;

const ROW: &str = "jane@example.com 4111 1111 1111 1111";

struct World {
    runtime: tokio::runtime::Runtime,
    harness: Harness,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let harness = runtime.block_on(async {
        let server = FakePostgres::start(ROW).await;
        let harness = Harness::many(server.addr, "postgres", KEYS, "").await;
        harness.grant().await;
        harness
    });
    World { runtime, harness }
});

fuzz_target!(|data: &[u8]| {
    let world = &*WORLD;
    world.runtime.block_on(async {
        let (mut client, task) = world.harness.connect();
        let mut input = startup(&[("user", "agent"), ("database", "app")]).to_vec();
        input.extend_from_slice(data);
        let (mut read, mut write) = tokio::io::split(&mut client);
        let send = async {
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        };
        let mut got = Vec::new();
        let receive = read.read_to_end(&mut got);
        let (_, received) =
            tokio::join!(send, tokio::time::timeout(Duration::from_secs(15), receive));
        assert!(
            received.is_ok(),
            "the session did not end after the workload closed"
        );
        drop(client);
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("the session task failed: {e}"),
            Err(_) => panic!("the session task did not end"),
        }
        for needle in [&b"jane@example.com"[..], b"4111 1111 1111 1111"] {
            assert!(
                !got.windows(needle.len()).any(|w| w == needle),
                "a masked value reached the workload"
            );
        }
    });
});
