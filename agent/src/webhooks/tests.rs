//! Webhooks end to end inside the agent: the store's feed, the dispatcher, a real HTTP
//! receiver on loopback that checks signatures and answers as each test scripts it.

use std::{
    collections::VecDeque,
    convert::Infallible,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, SharedConfig},
    store::{MemoryStore, SharedStore, tests::request},
};

const KEY: &str = "whsec-test-0123456789abcdef";

/// What the receiver saw: one entry per call.
#[derive(Debug, Clone)]
struct Call {
    event: String,
    delivery: String,
    attempt: String,
    signature: Option<String>,
    body: serde_json::Value,
}

/// A receiver answering with `script` in turn (then 200).
async fn receiver(script: Vec<u16>) -> (u16, Arc<Mutex<Vec<Call>>>) {
    let script = Mutex::new(VecDeque::from(script));
    receiver_by(move |_| script.lock().unwrap().pop_front().unwrap_or(200)).await
}

/// A receiver answering each call with what `answer` says of its body.
async fn receiver_by(
    answer: impl Fn(&serde_json::Value) -> u16 + Send + Sync + 'static,
) -> (u16, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(answer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let script = script.clone();
                    async move {
                        let header = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let (event, delivery, attempt, signature) = (
                            header("jitgate-event").unwrap_or_default(),
                            header("jitgate-delivery").unwrap_or_default(),
                            header("jitgate-attempt").unwrap_or_default(),
                            header("jitgate-signature"),
                        );
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        // Verified independently of the agent's own `sign::verify`.
                        if let Some(sig) = &signature {
                            let (t, v1) = sig.split_once(",v1=").unwrap();
                            let t = t.strip_prefix("t=").unwrap();
                            use hmac::Mac as _;
                            let mut m =
                                <hmac::Hmac<sha2::Sha256>>::new_from_slice(KEY.as_bytes()).unwrap();
                            m.update(format!("{t}.").as_bytes());
                            m.update(&body);
                            let want = data_encoding::HEXLOWER.encode(&m.finalize().into_bytes());
                            assert_eq!(v1, want, "signature over the body as received");
                            let now = SystemTime::now()
                                .duration_since(UNIX_EPOCH)
                                .unwrap()
                                .as_secs();
                            assert!(now.abs_diff(t.parse().unwrap()) < 60, "fresh timestamp");
                        }
                        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let status = script(&body);
                        seen.lock().unwrap().push(Call {
                            event,
                            delivery,
                            attempt,
                            signature,
                            body,
                        });
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::from_u16(status).unwrap();
                        if status == 503 {
                            r.headers_mut().insert("retry-after", "1".parse().unwrap());
                        }
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, calls)
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn config(dir: &Path, webhooks: &str) -> SharedConfig {
    let text = format!(
        "[daemon]\nstate_dir = \"{}\"\n\n[[workload]]\nidentity = \"ci-bot\"\nlaunchers = [\"root\"]\n\n{webhooks}",
        dir.join("state").display()
    );
    SharedConfig::new(Config::from_toml(&dir.join("jitgate.toml"), &text).unwrap())
}

struct Setup {
    store: SharedStore,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn start(webhooks: impl FnOnce(&Path) -> String) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("key"), KEY);
    let config = config(dir.path(), &webhooks(dir.path()));
    let store: SharedStore = Arc::new(MemoryStore::default());
    let shutdown = CancellationToken::new();
    super::spawn(&store, config, shutdown.clone());
    Setup {
        store,
        shutdown,
        _dir: dir,
    }
}

async fn wait_for(calls: &Arc<Mutex<Vec<Call>>>, n: usize) -> Vec<Call> {
    for _ in 0..200 {
        let now = calls.lock().unwrap().clone();
        if now.len() >= n {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    calls.lock().unwrap().clone()
}

fn hook(port: u16, extra: &str) -> impl FnOnce(&Path) -> String {
    move |dir| {
        format!(
            "[[webhook]]\nname = \"approvers\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"{}\"\nconsole_url = \"https://gate.example.com\"\n{extra}\n",
            dir.join("key").display()
        )
    }
}

#[tokio::test]
async fn a_filed_request_is_posted_signed_with_the_record() {
    let (port, calls) = receiver(vec![]).await;
    let s = start(hook(port, ""));
    s.store
        .file_request(request("req_w1", Some("t_1"), None), "user bob".into())
        .await
        .unwrap();
    let calls = wait_for(&calls, 1).await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    let c = &calls[0];
    assert_eq!(c.event, "request.filed");
    assert_eq!(c.attempt, "1");
    assert!(c.signature.is_some(), "signed");
    assert_eq!(c.body["event"], "request.filed");
    assert_eq!(c.body["detail"]["request"], "req_w1");
    assert_eq!(c.body["actor"], "user bob");
    assert_eq!(
        c.body["id"],
        c.delivery.as_str(),
        "the delivery id is the record's hash"
    );
    assert_eq!(c.body["console_url"], "https://gate.example.com/#req_w1");
    // The log holds the same record.
    let log = s.store.audit_log(None, 10).await.unwrap();
    assert_eq!(log.last().unwrap().hash, c.delivery);
}

#[tokio::test]
async fn a_failing_receiver_gets_retries_and_a_refusing_one_does_not() {
    // 503 (with Retry-After: 1) twice, then 200: three attempts, same delivery id.
    let (port, calls) = receiver(vec![503, 503]).await;
    let s = start(hook(port, ""));
    s.store
        .file_request(request("req_r1", None, None), "user bob".into())
        .await
        .unwrap();
    let seen = wait_for(&calls, 3).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen.iter().map(|c| c.attempt.as_str()).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert!(seen.iter().all(|c| c.delivery == seen[0].delivery));
    drop(s);

    // 400: the receiver refuses the call itself; it is not sent again.
    let (port, calls) = receiver(vec![400]).await;
    let s = start(hook(port, ""));
    s.store
        .file_request(request("req_r2", None, None), "user bob".into())
        .await
        .unwrap();
    wait_for(&calls, 1).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_event_its_receiver_keeps_failing_does_not_hold_back_the_others() {
    // The receiver fails every call about req_poison (503, retry after 1 s): its retries
    // take seconds; the events filed after it arrive meanwhile.
    let (port, calls) = receiver_by(|body| {
        if body["detail"]["request"] == "req_poison" {
            503
        } else {
            200
        }
    })
    .await;
    let s = start(hook(port, "max_attempts = 10"));
    for id in ["req_poison", "req_a", "req_b", "req_c"] {
        s.store
            .file_request(request(id, None, None), "user bob".into())
            .await
            .unwrap();
    }
    let seen = wait_for(&calls, 4).await;
    let delivered: Vec<String> = seen
        .iter()
        .filter(|c| c.body["detail"]["request"] != "req_poison")
        .map(|c| {
            c.body["detail"]["request"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(delivered, ["req_a", "req_b", "req_c"], "{seen:?}");
    assert!(
        seen.iter()
            .filter(|c| c.body["detail"]["request"] == "req_poison")
            .count()
            < 3,
        "the others did not wait for the failing event's retries: {seen:?}"
    );
}

#[tokio::test]
async fn a_flood_from_one_workload_is_thinned_out() {
    let (port, calls) = receiver(vec![]).await;
    let s = start(hook(port, ""));
    for i in 0..40 {
        s.store
            .file_request(request(&format!("req_f{i}"), None, None), "user bob".into())
            .await
            .unwrap();
    }
    wait_for(&calls, super::flood::BURST as usize).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), super::flood::BURST as usize, "{seen:?}");
    // The log has all of them.
    let log = s.store.audit_log(None, 100).await.unwrap();
    assert_eq!(log.iter().filter(|e| e.kind == "request.filed").count(), 40);
}

#[tokio::test]
async fn only_chosen_events_are_sent() {
    let (port, calls) = receiver(vec![]).await;
    let s = start(hook(port, "events = [\"request.decided\"]"));
    s.store
        .file_request(request("req_e1", None, None), "user bob".into())
        .await
        .unwrap();
    s.store
        .deny_request(
            "req_e1".into(),
            crate::store::tests::actor(0, "root"),
            "user root".into(),
            Some("not now".into()),
        )
        .await
        .unwrap();
    wait_for(&calls, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = calls.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|c| c.event.as_str()).collect::<Vec<_>>(),
        ["request.denied"]
    );
    assert_eq!(seen[0].body["detail"]["reason"], "not now");
}

#[tokio::test]
async fn an_event_is_never_sent_unsigned_when_its_key_is_unsafe() {
    let (port, calls) = receiver(vec![]).await;
    let s = start(hook(port, "max_attempts = 2"));
    // After the config was accepted, the key file becomes readable by others.
    let key = s._dir.path().join("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    s.store
        .file_request(request("req_k1", None, None), "user bob".into())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        calls.lock().unwrap().is_empty(),
        "nothing sent without a safe key"
    );
}

#[tokio::test]
async fn a_slack_webhook_reads_its_url_from_a_private_file() {
    let (port, calls) = receiver(vec![]).await;
    let s = start(move |dir| {
        write_private(
            &dir.join("slack-url"),
            &format!("http://127.0.0.1:{port}/services/T0/B0/secret\n"),
        );
        format!(
            "[[webhook]]\nname = \"slack\"\nformat = \"slack\"\nurl_file = \"{}\"\n",
            dir.join("slack-url").display()
        )
    });
    s.store
        .file_request(request("req_s1", Some("t_9"), None), "user bob".into())
        .await
        .unwrap();
    let seen = wait_for(&calls, 1).await;
    assert_eq!(seen.len(), 1);
    let text = seen[0].body["text"].as_str().unwrap();
    assert!(
        text.contains("*ci-bot* asks for *read* on *orders-db*"),
        "{text}"
    );
    assert!(text.contains("jitgate approve req_s1"), "{text}");
    assert!(seen[0].signature.is_none(), "no key configured");
}

#[tokio::test]
async fn events_about_one_request_arrive_in_order_while_its_first_is_retried() {
    // The first two calls announcing req_o1 fail (503, retry after 1 s); its denial, made
    // meanwhile, must not reach the receiver before the announcement does.
    let failures = Mutex::new(0u32);
    let (port, calls) = receiver_by(move |body| {
        let mut failed = failures.lock().unwrap();
        if body["event"] == "request.filed" && body["detail"]["request"] == "req_o1" && *failed < 2
        {
            *failed += 1;
            503
        } else {
            200
        }
    })
    .await;
    let s = start(hook(port, "max_attempts = 5"));
    s.store
        .file_request(request("req_o1", None, None), "user bob".into())
        .await
        .unwrap();
    s.store
        .deny_request(
            "req_o1".into(),
            crate::store::tests::actor(0, "root"),
            "user root".into(),
            Some("no".into()),
        )
        .await
        .unwrap();
    s.store
        .file_request(request("req_o2", None, None), "user bob".into())
        .await
        .unwrap();
    let seen = wait_for(&calls, 5).await;
    let order: Vec<String> = seen
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c.event,
                c.body["detail"]["request"].as_str().unwrap_or("")
            )
        })
        .collect();
    let last_filed = order
        .iter()
        .rposition(|e| e == "request.filed req_o1")
        .expect("filed sent");
    let denied = order
        .iter()
        .position(|e| e == "request.denied req_o1")
        .expect("denial sent");
    assert!(
        last_filed < denied,
        "the denial overtook the filing: {order:?}"
    );
    // Another request's event did not wait for req_o1's retries.
    let other = order
        .iter()
        .position(|e| e == "request.filed req_o2")
        .expect("req_o2 sent");
    assert!(other < last_filed, "{order:?}");
}
