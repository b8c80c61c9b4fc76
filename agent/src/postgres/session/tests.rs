//! PostgreSQL sessions over in-memory pipes (see [`crate::testing`]): refusals in the
//! client's own protocol, and whole sessions against a scripted upstream.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt as _;

use crate::{
    model::SessionOutcome,
    testing::{FakePostgres as FakeServer, Harness, drain, error_fields, field, outcome, startup},
};

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

fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads backend messages up to and including the next ReadyForQuery (or the end).
async fn until_ready(client: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<(u8, Bytes)> {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    loop {
        let read = async {
            let tag = client.read_u8().await?;
            let len = client.read_i32().await?;
            let mut body = vec![0u8; len as usize - 4];
            client.read_exact(&mut body).await?;
            std::io::Result::Ok((tag, Bytes::from(body)))
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
            Ok(Ok((tag, body))) => {
                got.push((tag, body));
                if tag == b'Z' {
                    return got;
                }
            }
            _ => return got,
        }
    }
}

/// The first column of every DataRow.
fn values(messages: &[(u8, Bytes)]) -> Vec<String> {
    messages
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| {
            let len = i32::from_be_bytes([b[2], b[3], b[4], b[5]]) as usize;
            String::from_utf8_lossy(&b[6..6 + len]).into_owned()
        })
        .collect()
}

/// The fields of the first ErrorResponse among `messages` (none: no error).
fn error_of(messages: &[(u8, Bytes)]) -> Vec<(u8, String)> {
    messages
        .iter()
        .find(|(t, _)| *t == b'E')
        .map(|(_, b)| crate::postgres::wire::parse_fields(b.clone()).expect("error fields"))
        .unwrap_or_default()
}

fn error_code(messages: &[(u8, Bytes)]) -> Option<String> {
    let fields = error_of(messages);
    (!fields.is_empty()).then(|| field(&fields, b'C').to_owned())
}

fn query(text: &str) -> BytesMut {
    let mut out = BytesMut::new();
    message(&mut out, b'Q', &[text.as_bytes(), b"\0"].concat());
    out
}

/// Grants `bot` read, connects as the workload with `params` (user and database first), and
/// reads the server's hello up to ReadyForQuery.
async fn logged_in(
    h: &Harness,
    params: &[(&str, &str)],
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
    Vec<(u8, Bytes)>,
) {
    h.grant().await;
    connected(h, params).await
}

/// [`logged_in`] under a grant the caller made.
async fn connected(
    h: &Harness,
    params: &[(&str, &str)],
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
    Vec<(u8, Bytes)>,
) {
    let (mut client, task) = h.connect();
    let mut all = vec![("user", "agent"), ("database", "app")];
    all.extend_from_slice(params);
    client.write_all(&startup(&all)).await.expect("startup");
    let hello = until_ready(&mut client).await;
    (client, task, hello)
}

const MASKED: &str = r#"databases = ["app"]
credentials.read = { user = "ro" }
mask = [{ detectors = ["email", "ssn"], strategy = "redact" }]"#;

#[tokio::test]
async fn a_whole_session_masks_judges_and_ends_with_its_grant() {
    let server = FakeServer::start("jane@example.com 123-45-6789").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    let grant = h.grant().await;
    let (mut client, task, hello) = connected(&h, &[]).await;
    assert_eq!(hello.first().map(|(t, _)| *t), Some(b'R'), "{hello:?}");
    let key = hello
        .iter()
        .find(|(t, _)| *t == b'K')
        .map(|(_, b)| b.clone())
        .expect("a cancel key");
    assert_ne!(
        &key[..],
        &[0, 0, 0, 1, 0, 0, 0, 2][..],
        "the server's own cancel key never reaches the workload"
    );

    // Detected values are masked on the way back, whatever the statement called them.
    client
        .write_all(&query("select 1 as v"))
        .await
        .expect("query");
    let reply = until_ready(&mut client).await;
    let got = values(&reply);
    assert_eq!(got.len(), 1, "{reply:?}");
    assert!(!got[0].contains("jane@example.com"), "{got:?}");
    assert!(!got[0].contains("123-45-6789"), "{got:?}");

    // A write under a read grant never reaches the server, alone or pipelined behind a
    // harmless statement; the client gets the gate's error, and the session goes on.
    for hostile in [
        "drop table users",
        "select 1; drop table users",
        "/* x */ DELETE FROM users",
        "with x as (delete from users returning *) select * from x",
    ] {
        client.write_all(&query(hostile)).await.expect("query");
        let reply = until_ready(&mut client).await;
        assert!(error_code(&reply).is_some(), "{hostile}: {reply:?}");
        assert!(values(&reply).is_empty(), "{hostile}: {reply:?}");
    }
    let seen = server.seen();
    assert!(
        !seen
            .iter()
            .any(|q| q.to_ascii_lowercase().contains("users")),
        "the server saw a refused statement: {seen:?}"
    );
    client
        .write_all(&query("select 2 as v"))
        .await
        .expect("query");
    assert_eq!(values(&until_ready(&mut client).await).len(), 1);

    // The grant ends: the live session ends with 57P01, in PostgreSQL's terms.
    h.revoke(&grant).await;
    let last = until_ready(&mut client).await;
    assert_eq!(error_code(&last).as_deref(), Some("57P01"), "{last:?}");
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    let _ = drain(client).await;
}

#[tokio::test]
async fn client_encodings_as_drivers_spell_them() {
    let server = FakeServer::start("x").await;
    // asyncpg quotes it; others use dashes, underscores or lower case.
    for spelled in ["'utf-8'", "utf8", "UTF-8", "unicode", "'UTF8'", "u_t_f_8"] {
        let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
        let (client, task, hello) = logged_in(&h, &[("client_encoding", spelled)]).await;
        assert_eq!(
            hello.last().map(|(t, _)| *t),
            Some(b'Z'),
            "{spelled}: {hello:?}"
        );
        drop(client);
        let _ = outcome(task).await;
    }
    // An encoding whose bytes the gate would misread is refused, in PostgreSQL's terms.
    for spelled in ["LATIN1", "'sjis'", "EUC_JP", "utf-16"] {
        let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
        let (_, task, hello) = logged_in(&h, &[("client_encoding", spelled)]).await;
        assert_eq!(error_code(&hello).as_deref(), Some("0A000"), "{spelled}");
        let _ = outcome(task).await;
    }
}

#[tokio::test]
async fn startup_options_are_forwarded_or_refused_never_dropped() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    h.grant().await;
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[
            ("user", "agent"),
            ("database", "app"),
            ("statement_timeout", "9"),
            (
                "options",
                "-c statement_timeout=300 --intervalstyle=iso_8601",
            ),
        ]))
        .await
        .expect("startup");
    let hello = until_ready(&mut client).await;
    assert_eq!(hello.last().map(|(t, _)| *t), Some(b'Z'), "{hello:?}");
    drop(client);
    let _ = outcome(task).await;
    let seen = server.seen();
    assert!(
        seen.contains(&"startup statement_timeout=300".to_owned()),
        "{seen:?}"
    );
    assert!(
        !seen.contains(&"startup statement_timeout=9".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"startup intervalstyle=iso_8601".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"startup default_transaction_read_only=on".to_owned()),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("startup options")),
        "{seen:?}"
    );

    // A setting that would escape the grant, smuggled or not, ends the connection with
    // a clear error before anything reaches the server.
    for hostile in [
        "-c default_transaction_read_only=off",
        "-c statement_timeout=1 -c role=postgres",
        "--session-authorization=postgres",
        "-d 5",
    ] {
        let server = FakeServer::start("x").await;
        let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
        let (_, task, hello) = logged_in(&h, &[("options", hostile)]).await;
        let fields = error_of(&hello);
        assert_eq!(field(&fields, b'C'), "0A000", "{hostile}");
        assert!(
            field(&fields, b'H').contains("statement_timeout"),
            "{hostile}"
        );
        let _ = outcome(task).await;
        assert!(server.seen().is_empty(), "{hostile}: {:?}", server.seen());
    }
}

#[tokio::test]
async fn bulk_statements_fit_and_the_cap_is_the_operators() {
    // A 20 MiB statement (psql inserting a 10 MiB bytea literal, psycopg2 interpolating a big
    // parameter) goes through with the default cap.
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    let big = format!("select '{}' as v", "a".repeat(20 << 20));
    client.write_all(&query(&big)).await.expect("query");
    let reply = until_ready(&mut client).await;
    assert_eq!(values(&reply), ["x"], "{:?}", error_code(&reply));
    assert_eq!(server.seen().last().map(String::len), Some(big.len()));
    drop(client);
    let _ = outcome(task).await;

    // Past the resource's max_statement_size: FATAL 54000 naming the setting.
    let keys = format!("{MASKED}\nmax_statement_size = \"1MiB\"");
    let h = Harness::with_upstream(server.addr, "postgres", &keys, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    client
        .write_all(&query(&format!("select '{}'", "a".repeat(1000 << 10))))
        .await
        .expect("just under the cap");
    assert_eq!(values(&until_ready(&mut client).await), ["x"]);
    let _ = client
        .write_all(&query(&format!("select '{}'", "b".repeat(2 << 20))))
        .await;
    let fields = error_fields(&drain(client).await);
    assert_eq!(field(&fields, b'C'), "54000");
    assert!(field(&fields, b'H').contains("max_statement_size"));
    assert_eq!(outcome(task).await.0, SessionOutcome::Error);
    assert!(!server.seen().iter().any(|q| q.contains("bbbb")));
}

#[tokio::test]
async fn syntax_errors_carry_the_servers_position() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    for (text, position) in [
        ("select 1 frm t", "14"),
        ("select 1;\nselect * form t", "20"),
        ("SELEC 'é'", "1"),
    ] {
        client.write_all(&query(text)).await.expect("query");
        let reply = until_ready(&mut client).await;
        assert_eq!(error_code(&reply).as_deref(), Some("42601"), "{text}");
        assert_eq!(field(&error_of(&reply), b'P'), position, "{text}");
    }
    // Nothing unparsed reached the server, and the session goes on.
    assert!(
        !server
            .seen()
            .iter()
            .any(|q| q.contains("frm") || q.contains("SELEC"))
    );
    client
        .write_all(&query("select 1 as v"))
        .await
        .expect("query");
    assert_eq!(values(&until_ready(&mut client).await), ["x"]);
    drop(client);
    let _ = outcome(task).await;
}

/// The ErrorResponse in what a refused client read, after the one-byte SSL answer if any.
fn refusal_of(got: &[u8]) -> Vec<(u8, String)> {
    let start = usize::from(matches!(got.first(), Some(b'N' | b'S')));
    error_fields(&got[start..])
}

#[tokio::test]
async fn every_pre_grant_phase_times_out_with_a_postgres_error() {
    const DAEMON: &str = r#"startup_timeout = "300ms""#;
    // What hostile clients do instead of a startup packet.
    let ssl_request = {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut b);
        b
    };
    let whole = startup(&[("user", "agent"), ("database", "app")]);
    for variant in ["idle", "byte by byte", "SSLRequest then silence"] {
        let h = Harness::many(
            "127.0.0.1:1".parse().expect("addr"),
            "postgres",
            PG_KEYS,
            DAEMON,
        )
        .await;
        let (mut client, task) = h.connect();
        let started = std::time::Instant::now();
        let trickle = async {
            match variant {
                "byte by byte" => {
                    for b in whole.iter() {
                        if client.write_all(&[*b]).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
                "SSLRequest then silence" => {
                    client.write_all(&ssl_request).await.expect("ssl request");
                }
                _ => {}
            }
        };
        // The trickle takes longer than the timeout; the session must end regardless.
        let (_, (how, detail)) = tokio::join!(
            tokio::time::timeout(std::time::Duration::from_secs(2), trickle),
            outcome(task)
        );
        assert_eq!(how, SessionOutcome::RefusedLimit, "{variant}: {detail}");
        assert!(detail.contains("startup within"), "{variant}: {detail}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{variant}: ended after {:?}",
            started.elapsed()
        );
        let fields = refusal_of(&drain(client).await);
        assert_eq!(field(&fields, b'C'), "08P01", "{variant}");
        assert!(
            field(&fields, b'H').contains("startup_timeout"),
            "{variant}"
        );
        assert_eq!(h.ctx.services.limits.in_use("bot"), (0, 0, 0), "{variant}");
    }
}

#[tokio::test]
async fn pending_connections_are_limited_per_identity() {
    const DAEMON: &str = "max_pending_per_identity = 3\nstartup_timeout = \"30s\"";
    let h = Harness::many(
        "127.0.0.1:1".parse().expect("addr"),
        "postgres",
        PG_KEYS,
        DAEMON,
    )
    .await;
    // Three idle connections without a grant hold the identity's pending slots...
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(h.connect());
    }
    for _ in 0..100 {
        if h.ctx.services.limits.in_use("bot").1 == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.ctx.services.limits.in_use("bot").1, 3);
    // ...so the fourth is refused at once, in PostgreSQL's words, before it sends anything.
    let (client, task) = h.connect();
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::RefusedLimit, "{detail}");
    let fields = error_fields(&drain(client).await);
    assert_eq!(field(&fields, b'C'), "53300");
    assert!(field(&fields, b'M').contains("limit 3"), "{fields:?}");
    assert!(
        field(&fields, b'H').contains("max_pending_per_identity"),
        "{fields:?}"
    );
    // One idle connection leaves: its slot is free again for the next one.
    let (gone, gone_task) = idle.pop().expect("idle");
    drop(gone);
    let _ = outcome(gone_task).await;
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[("user", "agent"), ("database", "app")]))
        .await
        .expect("startup");
    assert_eq!(outcome(task).await.0, SessionOutcome::RefusedNoGrant);
    drop(client);
    drop(idle);
}

#[tokio::test]
async fn sessions_per_grant_are_limited_with_53300() {
    let server = FakeServer::start("x").await;
    let keys = format!("{MASKED}\nmax_sessions_per_grant = 2");
    let h = Harness::many(server.addr, "postgres", &keys, "").await;
    h.grant().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let (mut client, task) = h.connect();
        client
            .write_all(&startup(&[("user", "agent"), ("database", "app")]))
            .await
            .expect("startup");
        until_ready(&mut client).await;
        open.push((client, task));
    }
    // The third session under the same grant is refused; the server never saw it.
    let (mut client, task) = h.connect();
    client
        .write_all(&startup(&[("user", "agent"), ("database", "app")]))
        .await
        .expect("startup");
    let fields = error_fields(&drain(client).await);
    assert_eq!(field(&fields, b'C'), "53300");
    assert!(
        field(&fields, b'M').contains("open sessions (limit 2)"),
        "{fields:?}"
    );
    assert!(
        field(&fields, b'H').contains("max_sessions_per_grant"),
        "{fields:?}"
    );
    assert_eq!(outcome(task).await.0, SessionOutcome::RefusedLimit);
    // A session that ends gives its slot back.
    let (gone, gone_task) = open.pop().expect("open");
    drop(gone);
    let _ = outcome(gone_task).await;
    let (mut client, _task) = h.connect();
    client
        .write_all(&startup(&[("user", "agent"), ("database", "app")]))
        .await
        .expect("startup");
    let hello = until_ready(&mut client).await;
    assert!(error_code(&hello).is_none(), "logged in again");
}

/// Found by the session fuzz target: a server that answers the gate's catalog lookups in
/// another shape (here one column where four are asked for) made the session panic. It
/// fails the lookup instead: the statement is judged without it, fail closed, and nothing
/// masked passes.
#[tokio::test]
async fn a_catalog_answer_of_another_shape_fails_the_lookup_not_the_session() {
    const COLUMN_RULE: &str = r#"databases = ["app"]
credentials.read = { user = "ro" }
mask = [{ columns = ["*.v"], detectors = ["email", "card"], strategy = "redact" }]"#;
    let server = FakeServer::start("jane@example.com 4111 1111 1111 1111").await;
    let h = Harness::with_upstream(server.addr, "postgres", COLUMN_RULE, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    client
        .write_all(&query("SELECT v FROM t"))
        .await
        .expect("query");
    let reply = until_ready(&mut client).await;
    for v in values(&reply) {
        assert!(
            !v.contains("jane@example.com") && !v.contains("4111"),
            "{reply:?}"
        );
    }
    client.write_all(&query("SELECT 1")).await.expect("query");
    let reply = until_ready(&mut client).await;
    assert!(
        reply.iter().any(|(t, _)| *t == b'Z'),
        "the session goes on: {reply:?}"
    );
    drop(client);
    outcome(task).await;
}

#[tokio::test]
async fn a_client_that_terminates_mid_statement_ends_the_session_without_waiting_for_it() {
    // The client sends Terminate while its statement runs and keeps its socket open: the
    // session delivers what the server still sends for a moment, then ends; it does not wait
    // for the statement (a wait on the client side's end that fired once and was polled
    // again never fired again, and the session lived until the server spoke).
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    client
        .write_all(&query("select pg_sleep(5)"))
        .await
        .expect("query");
    let mut bye = BytesMut::new();
    message(&mut bye, b'X', b"");
    client.write_all(&bye).await.expect("terminate");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
    assert!(
        ended.is_ok(),
        "the session waited for the statement after the client terminated"
    );
    // The statement reached the server, and what it sent after the Terminate (its notice)
    // was delivered: the path under test ran.
    assert!(
        server.seen().iter().any(|q| q == "select pg_sleep(5)"),
        "{:?}",
        server.seen()
    );
    let got = drain(client).await;
    assert!(
        got.windows(9).any(|w| w == b"Msleeping"),
        "the notice sent after the Terminate was not delivered: {got:?}"
    );
}

#[tokio::test]
async fn a_statement_whose_grant_ends_while_it_is_judged_is_not_sent() {
    // A read session's statement calling a function waits for the catalog (what the
    // function does); the grant is revoked meanwhile. Neither the statement nor its refusal
    // may reach the server after the grant's end.
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let grant = h.grant().await;
    let (mut client, task, _) = connected(&h, &[]).await;
    client
        .write_all(&query("select slow_lookup_fn()"))
        .await
        .expect("query");
    // The lookup is under way (the fake catalog answers after half a second).
    for _ in 0..100 {
        if server
            .seen()
            .iter()
            .any(|q| q.contains("pg_catalog.pg_proc"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    h.revoke(&grant).await;
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    // Ended by the client side's check after the lookup, not by the cut a second later.
    assert!(!detail.contains("cut"), "{detail}");
    // Whatever the session wrote has reached the fake server's log by now.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let sent: Vec<String> = server
        .seen()
        .into_iter()
        .filter(|q| !q.starts_with("startup ") && !q.contains("pg_catalog."))
        .collect();
    assert!(
        sent.is_empty(),
        "sent to the server after the grant ended: {sent:?}"
    );
    let _ = drain(client).await;
}

/// Logs in, sends `first`, then floods long statements without reading (the writer stays
/// blocked once the pipes are full, the socket buffers to the server included); returns
/// once the server has seen `first` and the buffers had time to fill, with the workload's
/// unread end, the session's task and the flood's.
async fn flooding(
    h: &Harness,
    server: &FakeServer,
    first: &str,
) -> (
    tokio::io::ReadHalf<tokio::io::DuplexStream>,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
    tokio::task::JoinHandle<()>,
) {
    let (client, task, _) = connected(h, &[]).await;
    let (unread, mut client) = tokio::io::split(client);
    client.write_all(&query(first)).await.expect("query");
    // Long ones: a few records fill megabytes.
    let flood = tokio::spawn(async move {
        let one = query(&format!("select 1 -- {}", "x".repeat(256 << 10)));
        while client.write_all(&one).await.is_ok() {}
    });
    let saw = || server.seen().iter().any(|l| l == first);
    for _ in 0..100 {
        if saw() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(saw(), "the server never saw {first}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    (unread, task, flood)
}

/// A workload that leaves a large result unread and floods statements without reading (its
/// socket full both ways, both of the gate's pumps blocked writing) still loses the session
/// when its grant ends, and the upstream connection goes with it.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_when_its_grant_ends() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    let grant = h.grant().await;
    let (_unread, task, flood) = flooding(&h, &server, "select * from endless_rows").await;
    let saw = |what: &str| server.seen().iter().any(|l| l == what);
    assert!(
        !task.is_finished(),
        "the session is open while the grant stands"
    );
    assert!(!saw("endless_rows: the connection closed"));

    h.revoke(&grant).await;
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    assert!(detail.contains("connection was cut"), "{detail}");
    for _ in 0..100 {
        if saw("endless_rows: the connection closed") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        saw("endless_rows: the connection closed"),
        "the upstream connection outlived the session"
    );
    assert!(saw("cancel request"), "the statement was not cancelled");
    flood.abort();
}

/// The server side is free but the client side is stuck: the server runs a long statement
/// and reads nothing while the workload floods it. The workload gets 57P01, the session is
/// cut when the client side does not follow, and the record keeps the server side's why.
#[tokio::test]
async fn a_client_side_stuck_writing_to_a_busy_server_is_cut() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", MASKED, Some("bot")).await;
    let grant = h.grant().await;
    let (mut unread, task, flood) = flooding(&h, &server, "select pg_sleep(5)").await;
    h.revoke(&grant).await;
    let last = until_ready(&mut unread).await;
    assert_eq!(error_code(&last).as_deref(), Some("57P01"), "{last:?}");
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    assert!(
        detail.contains(" was revoked"),
        "the server side's why: {detail}"
    );
    assert!(detail.contains("connection was cut"), "{detail}");
    flood.abort();
}

/// Writes `batch` and reads the answers up to the next ReadyForQuery.
async fn sent(client: &mut tokio::io::DuplexStream, batch: &[u8]) -> Vec<(u8, Bytes)> {
    client.write_all(batch).await.expect("batch");
    until_ready(client).await
}

/// Parse of `name` for `text`.
fn parse(out: &mut BytesMut, name: &str, text: &str) {
    let body = [
        name.as_bytes(),
        b"\0",
        text.as_bytes(),
        b"\0",
        &0i16.to_be_bytes(),
    ]
    .concat();
    message(out, b'P', &body);
}

fn close_statement(out: &mut BytesMut, name: &str) {
    message(out, b'C', &[b"S", name.as_bytes(), b"\0"].concat());
}

/// Bind of statement `name` to the unnamed portal (no parameters, text results), Execute
/// of it, Sync.
fn bind_execute_sync(out: &mut BytesMut, name: &str) {
    let bind = [b"\0", name.as_bytes(), b"\0", &[0, 0, 0, 0, 0, 0][..]].concat();
    message(out, b'B', &bind);
    message(out, b'E', &[0, 0, 0, 0, 0]);
    message(out, b'S', b"");
}

/// A Close the server skipped after the Parse of the same name failed in that batch: the
/// server holds nothing under the name, so the name is free again, here as there.
#[tokio::test]
async fn a_name_whose_parse_failed_is_free_again_after_its_skipped_close() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    let mut batch = BytesMut::new();
    parse(&mut batch, "s1", "select fail_parse");
    close_statement(&mut batch, "s1");
    message(&mut batch, b'S', b"");
    let reply = sent(&mut client, &batch).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42601"), "{reply:?}");

    let mut again = BytesMut::new();
    parse(&mut again, "s1", "select 1");
    bind_execute_sync(&mut again, "s1");
    let reply = sent(&mut client, &again).await;
    assert_eq!(error_code(&reply), None, "{reply:?}");
    assert_eq!(values(&reply), ["x"], "{reply:?}");

    // The converse: a Close skipped after another statement's Parse failed leaves s1 on
    // the server, so the gate keeps the name taken (a Parse of it fails, as there).
    let mut batch = BytesMut::new();
    parse(&mut batch, "s2", "select fail_parse");
    close_statement(&mut batch, "s1");
    message(&mut batch, b'S', b"");
    let reply = sent(&mut client, &batch).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42601"), "{reply:?}");
    let mut again = BytesMut::new();
    parse(&mut again, "s1", "select 2");
    message(&mut again, b'S', b"");
    let reply = sent(&mut client, &again).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42P05"), "{reply:?}");
    drop(client);
    let _ = outcome(task).await;
}

/// The same across pipelined batches: s1's Parse fails in one batch, and its Close is
/// skipped in the next (sent before the first was answered, after another error). The
/// server never made s1, so the name is free.
#[tokio::test]
async fn a_name_whose_parse_failed_in_an_earlier_batch_is_free_after_its_skipped_close() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    let mut batches = BytesMut::new();
    parse(&mut batches, "s1", "select fail_parse");
    message(&mut batches, b'S', b"");
    parse(&mut batches, "s2", "select fail_parse");
    close_statement(&mut batches, "s1");
    message(&mut batches, b'S', b"");
    let first = sent(&mut client, &batches).await;
    assert_eq!(error_code(&first).as_deref(), Some("42601"), "{first:?}");
    let second = until_ready(&mut client).await;
    assert_eq!(error_code(&second).as_deref(), Some("42601"), "{second:?}");

    let mut again = BytesMut::new();
    parse(&mut again, "s1", "select 1");
    bind_execute_sync(&mut again, "s1");
    let reply = sent(&mut client, &again).await;
    assert_eq!(error_code(&reply), None, "{reply:?}");
    assert_eq!(values(&reply), ["x"], "{reply:?}");
    drop(client);
    let _ = outcome(task).await;
}

/// A simple Query inside an extended batch that failed is skipped to the Sync, with no
/// ReadyForQuery of its own: the gate counts its cycle done, or it would think name changes
/// answered long ago still in flight (and refuse pipelined Binds of statements parsed
/// since, 26000), and keep the Query's record open to the session's end.
#[tokio::test]
async fn a_query_skipped_inside_a_failed_batch_ends_its_cycle() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    let mut batch = BytesMut::new();
    parse(&mut batch, "", "select fail_parse");
    batch.extend_from_slice(&query("select 'skipped'"));
    message(&mut batch, b'S', b"");
    let reply = sent(&mut client, &batch).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42601"), "{reply:?}");

    let mut made = BytesMut::new();
    parse(&mut made, "s1", "select 1");
    message(&mut made, b'S', b"");
    assert_eq!(error_code(&sent(&mut client, &made).await), None);
    let mut close = BytesMut::new();
    close_statement(&mut close, "s1");
    message(&mut close, b'S', b"");
    assert_eq!(error_code(&sent(&mut client, &close).await), None);
    // The Close was answered: a statement parsed now is not contested, and its Bind in
    // the next cycle of the same write runs.
    let mut pipelined = BytesMut::new();
    parse(&mut pipelined, "s2", "select 2");
    message(&mut pipelined, b'S', b"");
    bind_execute_sync(&mut pipelined, "s2");
    let first = sent(&mut client, &pipelined).await;
    assert_eq!(error_code(&first), None, "{first:?}");
    let second = until_ready(&mut client).await;
    assert_eq!(error_code(&second), None, "{second:?}");
    assert_eq!(values(&second), ["x"], "{second:?}");
    drop(client);
    let _ = outcome(task).await;
    let history = h.only_session().await;
    let skipped = history
        .statements
        .iter()
        .find(|s| s.text.contains("'skipped'"))
        .expect("the skipped query's record");
    assert!(
        skipped
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not run")),
        "{:?}",
        skipped.error
    );
}

/// Reads one backend message.
async fn one_message(client: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Bytes) {
    use tokio::io::AsyncReadExt as _;
    let read = async {
        let tag = client.read_u8().await?;
        let len = client.read_i32().await?;
        let mut body = vec![0u8; len as usize - 4];
        client.read_exact(&mut body).await?;
        std::io::Result::Ok((tag, Bytes::from(body)))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("a message in time")
        .expect("a message")
}

/// The server flushes an extended-protocol error at once and skips everything up to Sync,
/// including what the client sends after reading the error: a Close sent then closed
/// nothing (the name stays taken, as on the server), and a Parse sent then made nothing
/// (the name is free again after its Close).
#[tokio::test]
async fn messages_sent_after_an_error_came_back_are_skipped_up_to_sync() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    let mut batch = BytesMut::new();
    parse(&mut batch, "s1", "select 1");
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    assert_eq!(error_code(&until_ready(&mut client).await), None);

    // The error comes back (Flush), then Close s1, Parse s3, Close s3, Sync.
    let mut failing = BytesMut::new();
    parse(&mut failing, "s2", "select fail_parse");
    message(&mut failing, b'H', b"");
    client.write_all(&failing).await.expect("batch");
    let (tag, _) = one_message(&mut client).await;
    assert_eq!(tag, b'E');
    let mut rest = BytesMut::new();
    close_statement(&mut rest, "s1");
    parse(&mut rest, "s3", "select 3");
    close_statement(&mut rest, "s3");
    message(&mut rest, b'S', b"");
    let reply = sent(&mut client, &rest).await;
    assert_eq!(reply.last().map(|(t, _)| *t), Some(b'Z'), "{reply:?}");

    // s1 is still on the server: the gate refuses a Parse of it as the server would (the
    // fake server tracks no names; the 42P05 is the gate's).
    let mut again = BytesMut::new();
    parse(&mut again, "s1", "select 2");
    message(&mut again, b'S', b"");
    let reply = sent(&mut client, &again).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42P05"), "{reply:?}");
    // s3 never was: it can be parsed and run.
    let mut fresh = BytesMut::new();
    parse(&mut fresh, "s3", "select 3");
    bind_execute_sync(&mut fresh, "s3");
    let reply = sent(&mut client, &fresh).await;
    assert_eq!(error_code(&reply), None, "{reply:?}");
    assert_eq!(values(&reply), ["x"], "{reply:?}");
    drop(client);
    let _ = outcome(task).await;
}

/// A Bind the server refuses (42P03: the portal exists) or skips leaves the portal as the
/// server has it: its next Execute is judged and recorded by the statement it runs.
#[tokio::test]
async fn a_refused_bind_leaves_the_portal_to_the_statement_the_server_runs() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    client.write_all(&query("begin")).await.expect("begin");
    let reply = until_ready(&mut client).await;
    assert_eq!(reply.last(), Some(&(b'Z', Bytes::from_static(b"T"))));
    let mut batch = BytesMut::new();
    parse(&mut batch, "sa", "select 'runs' as first");
    parse(&mut batch, "fail_bind", "select 'never bound' as other");
    message(
        &mut batch,
        b'B',
        &[b"p1\0sa\0", &[0, 0, 0, 0, 0, 0][..]].concat(),
    );
    message(&mut batch, b'E', &[b"p1\0", &[0, 0, 0, 1][..]].concat());
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    assert_eq!(error_code(&until_ready(&mut client).await), None);
    client
        .write_all(&query("savepoint s"))
        .await
        .expect("savepoint");
    until_ready(&mut client).await;
    // p1 again, to the other statement: refused by the server; then, pipelined behind the
    // failure, another Bind of p1 the server skips.
    let mut batch = BytesMut::new();
    message(
        &mut batch,
        b'B',
        &[b"p1\0fail_bind\0", &[0, 0, 0, 0, 0, 0][..]].concat(),
    );
    message(
        &mut batch,
        b'B',
        &[b"p1\0fail_bind\0", &[0, 0, 0, 0, 0, 0][..]].concat(),
    );
    message(&mut batch, b'S', b"");
    let reply = sent(&mut client, &batch).await;
    assert_eq!(error_code(&reply).as_deref(), Some("42P03"), "{reply:?}");
    // The transaction carries on past the failure, p1 (bound before the savepoint) with it.
    client
        .write_all(&query("rollback to s"))
        .await
        .expect("rollback to");
    until_ready(&mut client).await;
    let mut batch = BytesMut::new();
    message(&mut batch, b'E', &[b"p1\0", &[0, 0, 0, 0][..]].concat());
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    assert_eq!(error_code(&until_ready(&mut client).await), None);
    drop(client);
    let _ = outcome(task).await;
    let history = h.only_session().await;
    let texts: Vec<&str> = history.statements.iter().map(|s| s.text.as_str()).collect();
    let last = texts.last().copied().unwrap_or_default();
    assert!(last.contains("'runs'"), "{texts:?}");
}

/// An Execute pipelined behind a batch that binds its portal again, before the server has
/// answered that Bind: the server may still run the portal before (a named portal's Bind
/// fails), so the gate refuses the Execute rather than judge it by either statement.
#[tokio::test]
async fn an_execute_of_a_portal_rebound_in_an_unanswered_batch_is_refused() {
    let server = FakeServer::start("x").await;
    let h = Harness::with_upstream(server.addr, "postgres", PG_KEYS, Some("bot")).await;
    let (mut client, task, _) = logged_in(&h, &[]).await;
    client.write_all(&query("begin")).await.expect("begin");
    until_ready(&mut client).await;
    let mut batch = BytesMut::new();
    parse(&mut batch, "sa", "select 'runs' as first");
    parse(&mut batch, "fail_bind", "select 'never bound' as other");
    message(
        &mut batch,
        b'B',
        &[b"p1\0sa\0", &[0, 0, 0, 0, 0, 0][..]].concat(),
    );
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    assert_eq!(error_code(&until_ready(&mut client).await), None);
    // Both batches at once: the Execute is judged before the Bind's answer.
    let mut batch = BytesMut::new();
    message(
        &mut batch,
        b'B',
        &[b"p1\0fail_bind\0", &[0, 0, 0, 0, 0, 0][..]].concat(),
    );
    message(&mut batch, b'S', b"");
    message(&mut batch, b'E', &[b"p1\0", &[0, 0, 0, 0][..]].concat());
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    let first = until_ready(&mut client).await;
    assert_eq!(error_code(&first).as_deref(), Some("42P03"), "{first:?}");
    let second = until_ready(&mut client).await;
    assert_eq!(error_code(&second).as_deref(), Some("55000"), "{second:?}");
    assert!(values(&second).is_empty(), "{second:?}");
    // Once answered, the portal is known again and runs.
    let mut batch = BytesMut::new();
    message(&mut batch, b'E', &[b"p1\0", &[0, 0, 0, 0][..]].concat());
    message(&mut batch, b'S', b"");
    client.write_all(&batch).await.expect("batch");
    let third = until_ready(&mut client).await;
    assert_eq!(error_code(&third), None, "{third:?}");
    drop(client);
    let _ = outcome(task).await;
}
