//! The `http` protocol driven over in-memory pipes (the workload's side) against a real
//! hyper upstream on loopback: no root, no BPF. The kernel path, TLS and real clients are
//! covered end to end in `tests/tests/http.rs`.

use std::{
    convert::Infallible, net::SocketAddr, os::unix::fs::PermissionsExt as _, time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::{
    model::SessionOutcome,
    testing::{Harness, outcome},
};

const TOKEN: &str = "tok-in-memory-41";

/// An upstream that answers `target|authorization it received`, and closes the connection
/// after `/close`.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let accepted = accepted.clone();
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let accepted = accepted.clone();
                    async move {
                        let auth = req
                            .headers()
                            .get_all("authorization")
                            .iter()
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .collect::<Vec<_>>()
                            .join(",");
                        let target = req.uri().to_string();
                        if target == "/ws" && req.headers().contains_key("upgrade") {
                            // A WebSocket echo: first what the handshake carried, then every
                            // byte back.
                            let key = req.headers().contains_key("sec-websocket-key");
                            let on = hyper::upgrade::on(req);
                            tokio::spawn(async move {
                                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                                let Ok(up) = on.await else { return };
                                let mut io = TokioIo::new(up);
                                let hello = format!("auth={auth};key={key}\n");
                                if io.write_all(hello.as_bytes()).await.is_err() {
                                    return;
                                }
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            let response = Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .header("sec-websocket-accept", "accepted-by-upstream")
                                .body(Full::new(Bytes::new()).boxed())
                                .expect("101");
                            return Ok::<_, Infallible>(response);
                        }
                        // What reached the upstream of a body, as its hash and length.
                        let sent = if target.starts_with("/held/echo") {
                            let b = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            use sha2::Digest as _;
                            format!(
                                "sha256 {} len {}",
                                data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&b)),
                                b.len()
                            )
                        } else {
                            String::new()
                        };
                        let (body, media) = match target.as_str() {
                        t if t.starts_with("/held/echo") => (sent, "text/plain"),
                        "/json" => (
                            r#"{"items":[{"email":"jane@example.com","card":"4111 1111 1111 1111","id":7}],"password":"hunter2"}"#.to_owned(),
                            "application/json",
                        ),
                        "/events" => (
                            "data: {\"email\":\"jane@example.com\"}\n\ndata: card 4111 1111 1111 1111\n\n".to_owned(),
                            "text/event-stream",
                        ),
                        "/bin" => ("\u{0}\u{1}4111 1111 1111 1111".to_owned(), "application/octet-stream"),
                        "/conns" => (
                            accepted.load(std::sync::atomic::Ordering::SeqCst).to_string(),
                            "text/plain",
                        ),
                        "/slow" => {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            ("slow".to_owned(), "text/plain")
                        }
                        "/hang" => {
                            // One chunk, then nothing, ever: a watch that stays open.
                            let body = http_body_util::StreamBody::new(
                                futures_util::stream::once(async {
                                    Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"first\n")))
                                })
                                .chain(futures_util::stream::pending()),
                            );
                            return Ok::<_, Infallible>(Response::new(BodyExt::boxed(body)));
                        }
                        _ => (format!("{target}|{auth}"), "text/plain"),
                    };
                        let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
                        response.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static(media),
                        );
                        if target == "/te" {
                            // A transfer coding hyper does not remove (it undoes only chunked).
                            response.headers_mut().insert(
                                "transfer-encoding",
                                hyper::header::HeaderValue::from_static("gzip, chunked"),
                            );
                        }
                        if target == "/close" {
                            response.headers_mut().insert(
                                "connection",
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn harness(extra: &str) -> (Harness, tempfile::TempDir) {
    harness_with(extra, "").await
}

/// [`harness`] with more `[daemon]` keys.
async fn harness_daemon(extra: &str, daemon: &str) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (
        Harness::with_daemon(upstream().await, "http", extra, daemon).await,
        dir,
    )
}

/// [`harness`] with more keys for `bot`'s policy.
async fn harness_with(extra: &str, policy: &str) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("token");
    std::fs::write(&secret, TOKEN).expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let keys = format!(
        "{extra}\n[resource.credentials.read]\nsecret_file = \"{}\"\n[[resource.rule]]\npaths = [\"/admin/**\"]\naction = \"deny\"\n",
        secret.display()
    );
    (
        Harness::with_policy(upstream().await, "http", &keys, policy).await,
        dir,
    )
}

async fn client(
    h: &Harness,
) -> (
    SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
) {
    let (pipe, task) = h.connect();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(pipe))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    (sender, task)
}

async fn get(
    sender: &mut SendRequest<Empty<Bytes>>,
    path: &str,
    auth: Option<&str>,
) -> (u16, String) {
    let mut req = Request::get(path).header("host", "svc");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    sender.ready().await.expect("ready");
    answer(sender.send_request(req.body(Empty::new()).expect("request"))).await
}

/// The status and body of a response, within 10 s.
async fn answer(
    response: impl std::future::Future<Output = hyper::Result<Response<hyper::body::Incoming>>>,
) -> (u16, String) {
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer in time")
        .expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn without_a_grant_the_client_reads_a_403_naming_the_command() {
    let (h, _dir) = harness("").await;
    let (mut sender, task) = client(&h).await;
    let (status, body) = get(&mut sender, "/x", None).await;
    assert_eq!(status, 403);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["hint"], "jitgate request svc", "{v}");
    let (how, _) = outcome(task).await;
    assert_eq!(how, SessionOutcome::RefusedNoGrant);
}

#[tokio::test]
async fn granted_requests_carry_the_gates_credential_across_upstream_reconnects_until_revoked() {
    let (h, _dir) = harness("").await;
    let grant = h.grant().await;
    let (mut sender, task) = client(&h).await;
    let (status, body) = get(&mut sender, "/x", Some("Bearer mine")).await;
    assert_eq!(status, 200);
    // The upstream's echo of the credential is scrubbed; the workload's own is gone.
    assert_eq!(body, format!("/x|Bearer {}", "*".repeat(TOKEN.len())));
    let (status, _) = get(&mut sender, "/admin/x", None).await;
    assert_eq!(status, 403, "the same connection keeps being judged");
    // The upstream closes after /close: the next request opens a new upstream connection.
    let (status, _) = get(&mut sender, "/close", None).await;
    assert_eq!(status, 200);
    let (status, body) = get(&mut sender, "/after", None).await;
    assert_eq!(
        (status, body.starts_with("/after|Bearer ")),
        (200, true),
        "{body}"
    );

    let (status, body) = get(&mut sender, "/te", None).await;
    assert_eq!(
        status, 502,
        "a body still transfer-coded is refused: {body}"
    );
    assert!(body.contains("transfer coding"), "{body}");

    h.revoke(&grant).await;
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    let records = h
        .ctx
        .services
        .store
        .sessions(false, 10)
        .await
        .expect("sessions");
    assert_eq!(records.len(), 1);
    let history = h
        .ctx
        .services
        .store
        .session_history(records[0].id.clone())
        .await
        .expect("history")
        .expect("the session");
    let first = &history.statements[0];
    assert_eq!(first.text, "GET /x");
    let headers: Vec<String> = first.params.iter().flatten().cloned().collect();
    assert!(
        headers.contains(&"authorization: [redacted]".to_owned()),
        "{headers:?}"
    );
    assert!(headers.contains(&"host: svc".to_owned()), "{headers:?}");
    assert!(
        !headers.iter().any(|h| h.contains("mine")),
        "the workload's own credential is not recorded: {headers:?}"
    );
}

#[tokio::test]
async fn responses_are_masked_by_json_path_and_detector_and_uninspectable_ones_refused() {
    let masks = "[[resource.mask]]\npaths = [\"$.items[*].email\"]\nstrategy = \"partial\"\n\
                 [[resource.mask]]\npaths = [\"$..password\"]\ndetectors = [\"card\", \"email\"]\nstrategy = \"redact\"\n";
    let (h, _dir) = harness(masks).await;
    h.grant().await;
    let (mut sender, _task) = client(&h).await;
    let (status, body) = get(&mut sender, "/json", None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("still JSON");
    assert_eq!(v["items"][0]["id"], 7, "{v}");
    assert_ne!(v["items"][0]["email"], "jane@example.com", "{v}");
    assert!(
        v["items"][0]["email"]
            .as_str()
            .unwrap()
            .ends_with("example.com"),
        "partial: {v}"
    );
    assert_eq!(v["items"][0]["card"], "****", "{v}");
    assert_eq!(v["password"], "****", "{v}");
    let (status, body) = get(&mut sender, "/events", None).await;
    assert_eq!(status, 200);
    assert!(
        !body.contains("jane@example.com") && !body.contains("4111 1111"),
        "{body}"
    );
    assert!(
        body.starts_with("data: "),
        "events keep their framing: {body}"
    );
    let head = Request::head("/json")
        .header("host", "svc")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(head).await.expect("HEAD");
    assert_eq!(response.status(), 200, "a HEAD answer has nothing to mask");
    let (status, body) = get(&mut sender, "/bin", None).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("cannot inspect"), "{body}");
    // The plain text echo is scanned too.
    let (status, body) = get(&mut sender, "/jane@example.com", None).await;
    assert_eq!(status, 200);
    assert!(!body.contains("jane@example.com"), "{body}");
}

#[tokio::test]
async fn query_and_header_conditions_hold_under_every_spelling() {
    let rules = "[[resource.rule]]\nquery = { force = \"true\" }\naction = \"deny\"\n\
                 [[resource.rule]]\nheaders = { \"x-mode\" = \"danger*\" }\naction = \"deny\"\n";
    let (h, _dir) = harness(rules).await;
    h.grant().await;
    let (mut sender, _task) = client(&h).await;
    for target in [
        "/x?force=true",
        "/x?FORCE=TRUE",
        "/x?a=1&force=no&force=true",
        "/x?%66orce=true",
        "/x?force=no;force=true",
    ] {
        let (status, body) = get(&mut sender, target, None).await;
        assert_eq!(status, 403, "{target}: {body}");
        assert!(body.contains("rule 1"), "{target}: {body}");
    }
    let (status, body) = get(&mut sender, "/x?force=no", None).await;
    assert_eq!(status, 200, "{body}");
    let req = Request::get("/x")
        .header("host", "svc")
        .header("x-mode", "safe, DANGEROUS")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(req).await.expect("response");
    assert_eq!(
        response.status(),
        403,
        "a comma-separated element matches a deny rule"
    );
}

#[tokio::test]
async fn policy_limits_hold_requests_per_second_and_response_bytes() {
    // Bytes: a response announced larger than bytes_per_statement is refused.
    let (h, _dir) = harness_with("", "limits = { bytes_per_statement = \"40\" }").await;
    h.grant().await;
    let (mut sender, _task) = client(&h).await;
    let (status, body) = get(&mut sender, "/x", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&mut sender, "/json", None).await;
    assert_eq!(status, 502, "a response over bytes_per_statement: {body}");
    assert!(body.contains("limit: bytes_per_statement"), "{body}");

    // Rate: one request per second; the next one at once is refused, with Retry-After.
    let (h, _dir) = harness_with("", "limits = { statements_per_second = 1 }").await;
    h.grant().await;
    let (mut sender, _task) = client(&h).await;
    let (status, _) = get(&mut sender, "/x", None).await;
    assert_eq!(status, 200);
    let req = Request::get("/z")
        .header("host", "svc")
        .body(Empty::new())
        .expect("request");
    sender.ready().await.expect("ready");
    let response = sender.send_request(req).await.expect("response");
    assert_eq!(response.status(), 429, "a second request within the second");
    assert_eq!(response.headers()["retry-after"], "1");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("limit: statements_per_second"), "{body}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = get(&mut sender, "/x", None).await;
    assert_eq!(
        status, 200,
        "the connection stays open and the rate refills"
    );
}

#[tokio::test]
async fn records_carry_body_sizes_and_the_first_bytes_kept() {
    let (h, _dir) = harness("record_bodies = \"8\"").await;
    let grant = h.grant().await;
    let (pipe, task) = h.connect();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(pipe))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/x")
        .header("host", "svc")
        .body(Full::new(Bytes::from_static(b"hello world")))
        .expect("request");
    let (status, body) = answer(sender.send_request(req)).await;
    assert_eq!(status, 200, "{body}");
    h.revoke(&grant).await;
    outcome(task).await;
    let history = h.only_session().await;
    let params: Vec<String> = history.statements[0]
        .params
        .iter()
        .flatten()
        .cloned()
        .collect();
    assert!(
        params.contains(&"[request body, 11 B] hello wo ...".to_owned()),
        "{params:?}"
    );
    assert!(
        params.contains(&format!("[response body, {} B] /x|Beare ...", body.len())),
        "{params:?}"
    );
    assert_eq!(history.statements[0].tag.as_deref(), Some("200"));
}

#[tokio::test]
async fn upstream_connections_are_reused_between_requests() {
    let (h, _dir) = harness("").await;
    h.grant().await;
    let (mut sender, _task) = client(&h).await;
    for _ in 0..5 {
        let (status, _) = get(&mut sender, "/x", None).await;
        assert_eq!(status, 200);
    }
    let (_, body) = get(&mut sender, "/conns", None).await;
    assert_eq!(body, "1", "one upstream connection for sequential requests");
}

/// An HTTP/2 client with prior knowledge over the in-memory pipe.
/// An HTTP/2 client on a new session (requests with bodies of type `B`), and the session.
async fn h2_client<B>(
    h: &Harness,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<crate::protocol::Outcome>,
)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (pipe, task) = h.connect();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(pipe))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    (sender, task)
}

/// An RFC 8441 WebSocket request (extended CONNECT) for `uri`.
fn websocket_over_h2(uri: &str) -> Request<Empty<Bytes>> {
    let mut req = Request::builder()
        .method("CONNECT")
        .uri(uri)
        .header("sec-websocket-version", "13")
        .header("authorization", "Bearer mine")
        .body(Empty::<Bytes>::new())
        .expect("request");
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    req
}

/// Hostile: an HTTP/2 client multiplexes tunnels over its one connection, each holding an
/// upstream descriptor after its exchange ended. A session holds at most MAX_TUNNELS (429
/// past that, room again once one closes), and each upstream descriptor beyond the
/// session's first holds an agent-wide slot until it closes.
#[tokio::test]
async fn tunnels_are_bounded_per_session_and_counted_against_the_agent() {
    use tokio::io::AsyncBufReadExt as _;
    let (h, _dir) = harness("").await;
    h.grant_access(crate::config::Access::Write).await;
    let (sender, _task) = h2_client::<Empty<Bytes>>(&h).await;
    let limits = &h.ctx.services.limits;
    let base = limits.in_use("bot").0;
    let open_one = || async {
        let mut res = sender
            .clone()
            .send_request(websocket_over_h2("http://svc/ws"))
            .await
            .expect("response");
        if res.status() != 200 {
            return Err(res.status().as_u16());
        }
        let up = hyper::upgrade::on(&mut res)
            .await
            .expect("the stream opens");
        let mut io = tokio::io::BufReader::new(TokioIo::new(up));
        let mut hello = String::new();
        io.read_line(&mut hello).await.expect("hello");
        Ok(io)
    };
    // Opened all at once, none waiting for another: still at most MAX_TUNNELS.
    let at_once: Vec<_> =
        futures_util::future::join_all((0..super::exchange::MAX_TUNNELS + 4).map(|_| open_one()))
            .await;
    let opened = at_once.iter().filter(|r| r.is_ok()).count();
    assert_eq!(opened, super::exchange::MAX_TUNNELS, "opened at once");
    assert!(
        at_once.iter().all(|r| matches!(r, Ok(_) | Err(429))),
        "refused with 429"
    );
    drop(at_once);
    let mut back_at_once = limits.in_use("bot").0;
    for _ in 0..100 {
        if back_at_once <= base + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        back_at_once = limits.in_use("bot").0;
    }
    assert!(back_at_once <= base + 1, "{base} then {back_at_once}");
    let mut open = Vec::new();
    for _ in 0..super::exchange::MAX_TUNNELS {
        let mut opened = None;
        for _ in 0..100 {
            if let Ok(io) = open_one().await {
                opened = Some(io);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        open.push(opened.expect("within the bound"));
    }
    let held = limits.in_use("bot").0;
    assert!(
        held >= base + super::exchange::MAX_TUNNELS - 1,
        "tunnels hold agent-wide slots: {base} then {held}"
    );
    let (status, body) = answer(
        sender
            .clone()
            .send_request(websocket_over_h2("http://svc/ws")),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("open streams"), "{body}");
    // One closes: room for another, once its relay has ended.
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(io) = open_one().await {
            again = Some(io);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed tunnel gave its place back");
    drop(again);
    drop(open);
    let mut back = limits.in_use("bot").0;
    for _ in 0..100 {
        if back <= base + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        back = limits.in_use("bot").0;
    }
    assert!(back <= base + 1, "slots given back: {base} then {back}");
}

/// Hostile: one identity opens sessions side by side, each with requests in flight and
/// tunnels open. Beyond each session's first they share the identity's own count
/// (`max_extra_upstreams_per_identity`), refused 429 past it whichever session asks, so the
/// agent-wide count stays for others; a tunnel closed gives its place to any session, and
/// idle connections kept for reuse take none.
#[tokio::test]
async fn extra_upstreams_are_capped_per_identity_across_its_sessions() {
    use tokio::io::AsyncBufReadExt as _;
    let h = Harness::many(
        upstream().await,
        "http",
        "",
        "max_extra_upstreams_per_identity = 3",
    )
    .await;
    h.grant_access(crate::config::Access::Write).await;
    let (first, _a) = h2_client::<Empty<Bytes>>(&h).await;
    let (second, _b) = h2_client::<Empty<Bytes>>(&h).await;
    let open_on = |sender: &hyper::client::conn::http2::SendRequest<Empty<Bytes>>| {
        let mut sender = sender.clone();
        async move {
            let mut res = sender
                .send_request(websocket_over_h2("http://svc/ws"))
                .await
                .expect("response");
            if res.status() != 200 {
                let status = res.status().as_u16();
                let body = res.into_body().collect().await.expect("body").to_bytes();
                return Err((status, String::from_utf8_lossy(&body).into_owned()));
            }
            let up = hyper::upgrade::on(&mut res)
                .await
                .expect("the stream opens");
            let mut io = tokio::io::BufReader::new(TokioIo::new(up));
            let mut hello = String::new();
            io.read_line(&mut hello).await.expect("hello");
            Ok(io)
        }
    };
    let limits = &h.ctx.services.limits;
    // Requests in flight count as tunnels do: five at once, one past the count.
    let at_once =
        futures_util::future::join_all((0..5).map(|_| h2_get(&first, "http://svc/slow"))).await;
    let statuses: Vec<u16> = at_once.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{at_once:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        1,
        "{at_once:?}"
    );
    // Their connections wait idle for reuse: not counted, nothing refused for them.
    assert_eq!(limits.shares_in_use("bot"), 0);
    // The first session: its own use and the identity's three.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open_on(&first).await.expect("within the identity's count"));
    }
    let Err((status, body)) = open_on(&first).await else {
        panic!("the identity is full")
    };
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("max_extra_upstreams_per_identity"),
        "the refusal names the key: {body}"
    );
    assert_eq!(limits.shares_in_use("bot"), 3);
    // The second session has its own first descriptor, and nothing beyond it.
    let own = open_on(&second).await.expect("the session's own first");
    let Err((status, _)) = open_on(&second).await else {
        panic!("the identity's count is shared")
    };
    assert_eq!(status, 429);
    // One of the first session's tunnels closes: the second session may have its place.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(io) = open_on(&second).await {
            again = Some(io);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed tunnel gave its place back");
    drop((again, own, held));
    for _ in 0..100 {
        if limits.shares_in_use("bot") == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limits.shares_in_use("bot"), 0, "given back");
}

/// RFC 8441: a WebSocket over HTTP/2 is judged as the HTTP/1.1 upgrade it becomes upstream
/// (write needed), relayed with the credential injected and scrubbed, answered 200 without
/// upgrade headers, and cut with the grant.
#[tokio::test]
async fn websocket_over_http2_is_judged_relayed_and_cut_with_the_grant() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let connect = websocket_over_h2;
    // Read access does not open a stream the gate cannot judge.
    {
        let (h, _dir) = harness("").await;
        h.grant_access(crate::config::Access::Read).await;
        let (sender, _task) = h2_client::<Empty<Bytes>>(&h).await;
        let (status, body) = answer(sender.clone().send_request(connect("http://svc/ws"))).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("write"), "{body}");
    }
    let (h, _dir) = harness("").await;
    let grant = h.grant_access(crate::config::Access::Write).await;
    let (sender, _task) = h2_client::<Empty<Bytes>>(&h).await;
    // Another extended CONNECT protocol is refused.
    let mut other = connect("http://svc/ws");
    other
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("connect-udp"));
    let (status, _) = answer(sender.clone().send_request(other)).await;
    assert_eq!(status, 501);
    // An upstream that answers the handshake with a plain 200 does not get a dead tunnel
    // opened to the client: 502.
    let (status, body) = answer(sender.clone().send_request(connect("http://svc/plain"))).await;
    assert_eq!(status, 502, "{body}");

    let mut res = sender
        .clone()
        .send_request(connect("http://svc/ws"))
        .await
        .expect("response");
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("sec-websocket-accept").is_none());
    assert!(res.headers().get("upgrade").is_none());
    let up = hyper::upgrade::on(&mut res)
        .await
        .expect("the stream opens");
    let mut io = tokio::io::BufReader::new(TokioIo::new(up));
    let mut hello = String::new();
    io.read_line(&mut hello).await.expect("hello");
    assert!(
        hello.contains("key=true"),
        "a key was made for the upstream: {hello}"
    );
    assert!(
        !hello.contains(TOKEN),
        "the credential is scrubbed: {hello}"
    );
    assert!(
        !hello.contains("mine"),
        "the workload's own header is gone: {hello}"
    );
    io.get_mut().write_all(b"ping\n").await.expect("write");
    let mut echo = String::new();
    io.read_line(&mut echo).await.expect("echo");
    assert_eq!(echo, "ping\n");
    // Revoked: the stream ends within a second.
    h.revoke(&grant).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(1), io.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the stream outlived its grant");
}

async fn h2_get(
    sender: &hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    uri: &str,
) -> (u16, String) {
    let req = Request::get(uri)
        .header("authorization", "Bearer mine")
        .body(Empty::new())
        .expect("request");
    answer(sender.clone().send_request(req)).await
}

#[tokio::test]
async fn http2_without_a_grant_every_stream_is_refused() {
    let (h, _dir) = harness("").await;
    let (sender, task) = h2_client(&h).await;
    let (status, body) = h2_get(&sender, "http://svc/x").await;
    assert_eq!(status, 403, "no grant yet: {body}");
    assert!(body.contains("jitgate request svc"), "{body}");
    let (status, _) = h2_get(&sender, "http://svc/y").await;
    assert_eq!(status, 403, "every stream is refused");
    drop(sender);
    let (how, _) = outcome(task).await;
    assert_eq!(how, SessionOutcome::RefusedNoGrant);
}

#[tokio::test]
async fn http2_streams_run_side_by_side_each_judged_and_all_cut_with_the_grant() {
    let (h, _dir) = harness("hosts = [\"svc\"]").await;
    let grant = h.grant().await;
    let (sender, task) = h2_client(&h).await;
    // A response that never ends holds one upstream connection...
    let hanging = sender.clone().send_request(
        Request::get("http://svc/hang")
            .body(Empty::new())
            .expect("request"),
    );
    let hanging = tokio::time::timeout(Duration::from_secs(10), hanging)
        .await
        .expect("headers in time")
        .expect("response");
    assert_eq!(hanging.status(), 200);
    let mut hanging = hanging.into_body();
    let first = hanging.frame().await.expect("a frame").expect("data");
    assert_eq!(first.into_data().expect("data"), "first\n");
    // ...while the streams beside it are served, each judged on its own.
    let (status, body) = h2_get(&sender, "http://svc/x").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, format!("/x|Bearer {}", "*".repeat(TOKEN.len())));
    let answers = futures_util::future::join_all((0..8).map(|i| {
        h2_get(
            &sender,
            if i % 2 == 0 {
                "http://svc/y"
            } else {
                "http://svc/admin/z"
            },
        )
    }))
    .await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, if i % 2 == 0 { 200 } else { 403 }, "{body}");
    }
    let (status, body) = h2_get(&sender, "http://svc/a/../admin/z").await;
    assert_eq!(
        status, 403,
        "dot segments are normalised on HTTP/2 too: {body}"
    );
    let (status, body) = h2_get(&sender, "http://other/x").await;
    assert_eq!(status, 403, "the authority is the Host: {body}");

    h.revoke(&grant).await;
    let (how, detail) = outcome(task).await;
    assert_eq!(how, SessionOutcome::GrantRevoked, "{detail}");
    let next = tokio::time::timeout(Duration::from_secs(5), hanging.frame())
        .await
        .expect("the open stream ends with the session");
    assert!(
        !matches!(next, Some(Ok(ref f)) if f.is_data()),
        "nothing more flows after the cut: {next:?}"
    );
    // The open stream's record says where it was cut.
    let history = h.only_session().await;
    let hang = history
        .statements
        .iter()
        .find(|s| s.text == "GET /hang")
        .expect("the watch's record");
    assert_eq!(hang.tag.as_deref(), Some("200 (cut after 6 B)"), "{hang:?}");
}

#[tokio::test]
async fn an_http2_stream_reset_in_flight_is_still_recorded() {
    let (h, _dir) = harness("").await;
    let grant = h.grant().await;
    let (sender, task) = h2_client(&h).await;
    let slow = sender.clone().send_request(
        Request::get("http://svc/slow")
            .body(Empty::new())
            .expect("request"),
    );
    // The client gives up (resets the stream) while the upstream works on it.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), slow)
            .await
            .is_err()
    );
    let (status, _) = h2_get(&sender, "http://svc/x").await;
    assert_eq!(status, 200);
    h.revoke(&grant).await;
    outcome(task).await;
    let history = h.only_session().await;
    let slow = history
        .statements
        .iter()
        .find(|s| s.text == "GET /slow")
        .expect("the reset request has its record");
    assert_eq!(slow.tag.as_deref(), Some("reset"), "{slow:?}");
    assert!(
        slow.error
            .as_deref()
            .is_some_and(|e| e.contains("may have run it")),
        "{slow:?}"
    );
}

#[tokio::test]
async fn an_http2_stream_reset_while_held_lapses_its_request() {
    let (h, _dir) =
        harness("[[resource.rule]]\npaths = [\"/held/**\"]\naction = \"approve\"\n").await;
    h.grant().await;
    let (sender, _task) = h2_client(&h).await;
    let held = sender.clone().send_request(
        Request::get("http://svc/held/x")
            .body(Empty::new())
            .expect("request"),
    );
    let store = h.ctx.services.store.clone();
    let waiting = async {
        loop {
            if store.count_pending().await.expect("count") == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = held => {
            let body = r.expect("response").into_body().collect().await.expect("body").to_bytes();
            panic!("answered before anyone approved: {}", String::from_utf8_lossy(&body));
        }
        () = waiting => {}
    }
    // The response future was dropped: the client reset the stream.
    let (status, _) = h2_get(&sender, "http://svc/x").await;
    assert_eq!(status, 200, "the connection lives on");
    tokio::time::timeout(Duration::from_secs(5), async {
        while store.count_pending().await.expect("count") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the abandoned request lapses");
}

/// Hostile: holds are bounded per identity over every session (each session within its own
/// cap), and a wait dropped half way (a reset HTTP/2 stream) keeps its place until its
/// request has lapsed: a client cannot cycle holds faster than they are written and lapsed,
/// nor flood the approvers.
#[tokio::test]
async fn holds_are_bounded_per_identity_until_their_requests_lapse() {
    use crate::protocol::hold::{Hold, HoldOutcome, MAX_HOLDS_PER_IDENTITY, hold};
    let (h, _dir) =
        harness("[[resource.rule]]\npaths = [\"/held/**\"]\naction = \"approve\"\n").await;
    h.grant().await;
    let services = h.ctx.services.clone();
    let who = crate::identity::Attribution {
        identity: "bot".into(),
        task: None,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let held_one = |i: usize| {
        let (services, who, stop) = (services.clone(), who.clone(), stop.clone());
        tokio::spawn(async move {
            hold(
                &services,
                &who,
                65534,
                "svc",
                crate::config::Access::Read,
                &format!("s-{i}"),
                Hold {
                    text: &format!("GET /held/{i}"),
                    rule: "rule 1",
                    reason: "held",
                    timeout: Duration::from_secs(60),
                },
                &stop,
            )
            .await
        })
    };
    let waits: Vec<_> = (0..MAX_HOLDS_PER_IDENTITY).map(held_one).collect();
    assert_eq!(
        pending(&h, MAX_HOLDS_PER_IDENTITY).await.len(),
        MAX_HOLDS_PER_IDENTITY
    );
    let over = held_one(99).await.expect("join");
    match over.outcome {
        HoldOutcome::NotFiled(why) => assert!(why.contains("already wait"), "{why}"),
        other => panic!("not refused: {other:?}"),
    }
    // Dropped half way (the client went away): the places come back only as the requests
    // lapse, and then all of them.
    for w in &waits {
        w.abort();
    }
    let holds = services.holds.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        while holds.in_progress("bot") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the places are given back");
    assert_eq!(services.store.count_pending().await.expect("count"), 0);
}

/// POSTs `body` to `uri` on an HTTP/2 connection.
async fn h2_post(
    sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let req = Request::post(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.clone().send_request(req);
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("an answer in time")
        .expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The pending requests, once there are `n`.
async fn pending(h: &Harness, n: usize) -> Vec<crate::model::Request> {
    let store = h.ctx.services.store.clone();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let q = store
                .requests(Some(crate::model::RequestStatus::Pending), 100)
                .await
                .expect("requests");
            if q.len() >= n {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the requests are filed")
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest as _;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(b))
}

#[tokio::test]
async fn a_held_request_shows_its_body_masked_and_sends_exactly_it() {
    let keys = "[[resource.rule]]\npaths = [\"/held/**\"]\naction = \"approve\"\n\
                [[resource.mask]]\npaths = [\"$..password\"]\ndetectors = [\"email\"]\nstrategy = \"redact\"\n";
    let (h, _dir) = harness(keys).await;
    h.grant_access(crate::config::Access::Write).await;
    let sender: hyper::client::conn::http2::SendRequest<Full<Bytes>> = h2_client(&h).await.0;
    let body = br#"{"to":"jane@example.com","amount":100,"note":"quarterly payout"}"#.to_vec();
    let want = format!("sha256 {} len {}", sha256_hex(&body), body.len());
    let posted = tokio::spawn({
        let sender = sender.clone();
        let body = body.clone();
        async move {
            h2_post(
                &sender,
                "http://svc/held/echo?cc=boss@example.com&bcc=eve%40example.com",
                body,
            )
            .await
        }
    });
    let q = pending(&h, 1).await.remove(0);
    let shown = q.statement.clone().expect("the held request's text");
    assert!(
        shown.starts_with("POST /held/echo?cc=")
            && shown.contains("\n[body: 64 bytes, application/json, sha256 "),
        "{shown}"
    );
    assert!(
        !shown.contains("boss@example.com") && !shown.contains("eve"),
        "the URL goes through the detectors too, percent-encoded or not: {shown}"
    );
    assert!(
        shown.contains("quarterly payout") && shown.contains("\"amount\":100"),
        "{shown}"
    );
    assert!(
        !shown.contains("jane@example.com"),
        "the detectors apply: {shown}"
    );
    h.engine
        .approve(&crate::testing::root(), q, None)
        .await
        .expect("approve");
    let (status, answer) = posted.await.expect("task");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer, want,
        "the upstream got exactly the body the approver saw"
    );
    assert_eq!(
        h.ctx.services.buffers.available(),
        crate::protocol::buffers::DEFAULT_BUDGET,
        "the body's share of the budget is given back once sent"
    );
    // The request's record shows the URL masked as well.
    drop(sender);
    let store = h.ctx.services.store.clone();
    let recorded = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            for s in store.sessions(false, 10).await.expect("sessions") {
                let history = store.session_history(s.id).await.expect("history");
                if let Some(r) = history.and_then(|h| h.statements.into_iter().next()) {
                    return r.text;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the request is recorded");
    assert!(
        recorded.starts_with("POST /held/echo?cc=") && !recorded.contains("boss@example.com"),
        "{recorded}"
    );
}

#[tokio::test]
async fn a_held_secret_change_never_shows_its_values_and_compressed_bodies_are_not_held() {
    let keys = "flavor = \"kubernetes\"\n[[resource.rule]]\nverbs = [\"patch\", \"create\"]\nresources = [\"secrets\"]\naction = \"approve\"\n";
    let (h, _dir) = harness(keys).await;
    h.grant_access(crate::config::Access::Write).await;
    let sender: hyper::client::conn::http2::SendRequest<Full<Bytes>> = h2_client(&h).await.0;
    let send = |method: &'static str, uri: &'static str, body: &'static [u8], gzip: bool| {
        let sender = sender.clone();
        tokio::spawn(async move {
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json-patch+json");
            if gzip {
                req = req.header("content-encoding", "gzip");
            }
            let req = req
                .body(Full::new(Bytes::from_static(body)))
                .expect("request");
            let _ = sender.clone().send_request(req).await;
        })
    };
    // A JSON Patch (an array), an object with data, and a bare string: no value shown.
    let _a = send(
        "PATCH",
        "http://svc/api/v1/namespaces/prod/secrets/db",
        br#"[{"op":"replace","path":"/data/password","value":"c2VjcmV0LXZhbHVl"}]"#,
        false,
    );
    let _b = send(
        "POST",
        "http://svc/api/v1/namespaces/prod/secrets",
        br#"{"kind":"Secret","metadata":{"name":"x"},"data":{"token":"c2VjcmV0LXZhbHVl"},"stringData":{"pw":"plain-secret-value"}}"#,
        false,
    );
    let _c = send(
        "PATCH",
        "http://svc/api/v1/namespaces/prod/secrets/db",
        br#""c2VjcmV0LXZhbHVl""#,
        false,
    );
    let held = pending(&h, 3).await;
    for q in &held {
        let shown = q.statement.clone().unwrap_or_default();
        assert!(
            !shown.contains("c2VjcmV0LXZhbHVl") && !shown.contains("plain-secret-value"),
            "{shown}"
        );
    }
    assert!(
        held.iter().any(|q| q
            .statement
            .as_deref()
            .is_some_and(|t| t.contains("replace /data/password"))),
        "the patch's operations are shown: {held:?}"
    );
    // A compressed body is refused, not held.
    let (status, body) = {
        let req = Request::patch("http://svc/api/v1/namespaces/prod/secrets/db")
            .header("content-type", "application/json-patch+json")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"\x1f\x8b\x08\x00")))
            .expect("request");
        answer(sender.clone().send_request(req)).await
    };
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("must not be compressed"), "{body}");
    assert_eq!(
        h.ctx.services.store.count_pending().await.expect("count"),
        3
    );
}

#[tokio::test]
async fn held_bodies_are_bounded_per_request_and_agent_wide() {
    let (h, _dir) = harness_daemon(
        "[[resource.rule]]\npaths = [\"/held/**\"]\naction = \"approve\"\n",
        "buffer_budget = \"4MiB\"\nbuffer_share = \"4MiB\"",
    )
    .await;
    h.grant_access(crate::config::Access::Write).await;
    let sender: hyper::client::conn::http2::SendRequest<Full<Bytes>> = h2_client(&h).await.0;
    // Past the per-request cap: refused at once, nothing filed.
    let (status, body) = h2_post(
        &sender,
        "http://svc/held/echo",
        vec![b'a'; super::exchange::MAX_HELD_BODY + 1],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("at most 2048 KiB"), "{body}");
    assert_eq!(
        h.ctx.services.store.count_pending().await.expect("count"),
        0
    );
    // Two bodies of 1.9 MiB wait; a third would pass the agent's 4 MiB: 503, at once.
    let big = vec![b'b'; 1900 * 1024];
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let sender = sender.clone();
            let big = big.clone();
            tokio::spawn(async move { h2_post(&sender, "http://svc/held/echo", big).await })
        })
        .collect();
    let filed = pending(&h, 2).await;
    let (status, body) = h2_post(&sender, "http://svc/held/echo", big.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("buffer_budget"), "{body}");
    assert_eq!(
        h.ctx.services.store.count_pending().await.expect("count"),
        2
    );
    // Once one is decided and sent, its share is back and another fits.
    h.engine
        .approve(&crate::testing::root(), filed[0].clone(), None)
        .await
        .expect("approve");
    let done = futures_util::future::select_all(waiting)
        .await
        .0
        .expect("task");
    assert_eq!(done.0, 200, "{}", done.1);
    let again = tokio::spawn({
        let sender = sender.clone();
        async move { h2_post(&sender, "http://svc/held/echo", big).await }
    });
    pending(&h, 2).await;
    again.abort();
}

#[tokio::test]
async fn one_workload_cannot_hold_more_than_its_share_of_the_buffer_budget() {
    let (h, _dir) = harness_daemon(
        "[[resource.rule]]\npaths = [\"/held/**\"]\naction = \"approve\"\n",
        "buffer_budget = \"8MiB\"\nbuffer_share = \"2MiB\"",
    )
    .await;
    h.grant_access(crate::config::Access::Write).await;
    let sender: hyper::client::conn::http2::SendRequest<Full<Bytes>> = h2_client(&h).await.0;
    // One 1.9 MiB body waits; a second from the same workload would pass its 2 MiB share
    // (while the agent has 6 MiB left): 429 at once, naming the share, nothing filed.
    let big = vec![b'b'; 1900 * 1024];
    let waiting = tokio::spawn({
        let sender = sender.clone();
        let big = big.clone();
        async move { h2_post(&sender, "http://svc/held/echo", big).await }
    });
    pending(&h, 1).await;
    let (status, body) = h2_post(&sender, "http://svc/held/echo", big).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("buffer_share"), "{body}");
    assert_eq!(
        h.ctx.services.store.count_pending().await.expect("count"),
        1
    );
    assert!(
        h.ctx.services.buffers.available() >= 6 << 20,
        "the agent-wide budget was not what refused it"
    );
    waiting.abort();
}

#[test]
fn config_refuses_unverified_upstreams_and_loose_secret_files() {
    use crate::config::Config;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("token");
    std::fs::write(&secret, "t").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = |keys: &str| {
        format!(
            "[daemon]\nstate_dir = \"{}\"\n[[resource]]\nname = \"api\"\nprotocol = \"http\"\naddress = \"api.internal:443\"\n{keys}\n",
            dir.path().join("state").display()
        )
    };
    let path = dir.path().join("jitgate.toml");
    let e = Config::from_toml(&path, &text("upstream_tls = \"require\"")).expect_err("require");
    assert!(e.to_string().contains("verifies the upstream"), "{e}");
    let e = Config::from_toml(
        &path,
        &text(&format!(
            "[resource.credentials.read]\nsecret_file = \"{}\"",
            secret.display()
        )),
    )
    .expect_err("0644 secret");
    assert!(e.to_string().contains("readable by others"), "{e}");
    let e = Config::from_toml(
        &path,
        &text("[[resource.rule]]\npaths = [\"admin\"]\naction = \"deny\""),
    )
    .expect_err("relative glob");
    assert!(e.to_string().contains("must start with '/'"), "{e}");
    let e = Config::from_toml(
        &path,
        &text("[[resource.rule]]\nmethods = [\"GET /\"]\naction = \"nope\""),
    )
    .expect_err("bad rule");
    assert!(
        e.to_string().contains("not a method")
            || e.to_string().contains("not allow, deny or approve"),
        "{e}"
    );
    let e = Config::from_toml(&path, &text("flavor = \"grpc\"")).expect_err("flavor");
    assert!(
        e.to_string()
            .contains("resource.flavor: `grpc` is not http or kubernetes"),
        "{e}"
    );
    let e = Config::from_toml(
        &path,
        &text("[[resource.mask]]\npaths = [\"$.a\"]\nstrategy = \"scramble\""),
    )
    .expect_err("bad strategy");
    assert!(e.to_string().contains("unknown strategy `scramble`"), "{e}");
    let e = Config::from_toml(
        &path,
        &text("[[resource.mask]]\npaths = [\"items\"]\nstrategy = \"redact\""),
    )
    .expect_err("bad path");
    assert!(e.to_string().contains("not a JSON path"), "{e}");
    // A host-named resource checks Host against its name by default.
    let config = Config::from_toml(&path, &text("")).expect("valid");
    let settings = config.resources[0]
        .settings
        .get::<super::config::HttpResource>()
        .expect("http settings");
    assert_eq!(settings.hosts, ["api.internal"]);
}
