//! The Kubernetes API server's stand-in behind a `flavor = "kubernetes"` resource: no API
//! server can be installed on these machines, so this answers kubectl's discovery and the
//! calls the tests make with real API objects (the shapes the API server sends): `/version`,
//! `/api`, `/apis`, `/api/v1` discovery; pods and secrets in any namespace, as objects, lists or
//! `Table`s (what `kubectl get` asks for); `?watch=true` streams of events; DELETE.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::{Request, Response, body::Frame};
use serde_json::{Value, json};

use crate::http_fixture::{Out, Received, full};

/// The Secret every namespace holds: `db`, with a password the gate must mask.
pub const SECRET_PASSWORD_B64: &str = "aHVudGVyMi1zM2NyM3Q=";

fn pod(ns: &str, name: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "resourceVersion": "7", "creationTimestamp": "2026-12-01T00:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
        "status": {"phase": "Running"}
    })
}

fn secret(ns: &str) -> Value {
    json!({
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": "db", "namespace": ns, "resourceVersion": "9", "creationTimestamp": "2026-12-01T00:00:00Z",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{{\"data\":{{\"password\":\"{SECRET_PASSWORD_B64}\"}}}}")}},
        "type": "Opaque",
        "data": {"password": SECRET_PASSWORD_B64}
    })
}

fn table(kind_columns: &[&str], rows: Vec<(Vec<Value>, Value)>) -> Value {
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": "10"},
        "columnDefinitions": kind_columns.iter().map(|c| json!({"name": c, "type": "string", "format": if *c == "Name" {"name"} else {""}, "description": "", "priority": 0})).collect::<Vec<_>>(),
        "rows": rows.into_iter().map(|(cells, object)| json!({"cells": cells, "object": object})).collect::<Vec<_>>(),
    })
}

fn json_response(status: u16, v: &Value) -> Response<Out> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(v.to_string()))
        .unwrap_or_else(|_| Response::new(full("fixture error")))
}

fn not_found(what: &str) -> Response<Out> {
    json_response(
        404,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

pub(crate) async fn handle(
    mut req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Out>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Received {
            method: method.clone(),
            target: target.clone(),
            headers,
            body: Vec::new(),
        });
    if req.uri().path().ends_with("/exec") && req.headers().contains_key("upgrade") {
        return Ok(exec(&mut req));
    }
    let accept = req
        .headers()
        .get("accept")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let wants_table = accept.contains("as=Table");
    let path = req.uri().path().to_owned();
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    let _ = req.into_body().collect().await;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (method.as_str(), parts.as_slice()) {
        ("GET", ["version"]) => json_response(
            200,
            &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64"}),
        ),
        ("GET", ["api"]) => json_response(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}]}),
        ),
        ("GET", ["apis"]) => json_response(
            200,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
        ),
        ("GET", ["api", "v1"]) => json_response(
            200,
            &json!({
                "kind": "APIResourceList", "groupVersion": "v1",
                "resources": [
                    {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"], "shortNames": ["po"]},
                    {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions", "verbs": ["create", "get"]},
                    {"name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret", "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
                    {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]}
                ]
            }),
        ),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => {
            let pods = vec![pod(ns, "web-1"), pod(ns, "web-2")];
            if wants_table {
                json_response(200, &table(&["Name", "Status"], pods.iter().map(|p| (vec![p["metadata"]["name"].clone(), json!("Running")], json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": p["metadata"].clone()}))).collect()))
            } else {
                json_response(
                    200,
                    &json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": pods}),
                )
            }
        }
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => {
            json_response(200, &pod(ns, name))
        }
        ("DELETE", ["api", "v1", "namespaces", ns, "pods", name]) => {
            json_response(200, &pod(ns, name))
        }
        ("GET", ["api", "v1", "namespaces", ns, "secrets"]) if watch => {
            let ns = ns.to_string();
            let events = futures_util::stream::unfold(0u32, move |n| {
                let ns = ns.clone();
                async move {
                    if n >= 300 {
                        return None;
                    }
                    if n > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let kind = if n == 0 { "ADDED" } else { "MODIFIED" };
                    let line = format!("{}\n", json!({"type": kind, "object": secret(&ns)}));
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), n + 1))
                }
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(events).boxed())
                .unwrap_or_else(|_| Response::new(full("fixture error")))
        }
        ("GET", ["api", "v1", "namespaces", ns, "secrets"]) => {
            let mut s = secret(ns);
            if wants_table {
                json_response(
                    200,
                    &table(
                        &["Name", "Type", "Data"],
                        vec![(
                            vec![json!("db"), json!("Opaque"), json!(1)],
                            json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": s["metadata"].clone()}),
                        )],
                    ),
                )
            } else {
                // List items carry no kind of their own, as the API server sends them.
                if let Some(o) = s.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                json_response(
                    200,
                    &json!({"kind": "SecretList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"}, "items": [s]}),
                )
            }
        }
        ("GET", ["api", "v1", "namespaces", ns, "secrets", "db"]) => {
            json_response(200, &secret(ns))
        }
        _ => not_found(&path),
    };
    Ok(response)
}

/// `kubectl exec` over WebSocket (`v5.channel.k8s.io`, kubectl's default since 1.30): the
/// server side of the handshake, then the command "run" (its words echoed on stdout, channel
/// 1), a Success status on the error channel (3), and a close frame.
pub(crate) fn exec(req: &mut Request<hyper::body::Incoming>) -> Response<Out> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let protocols = req
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let protocol = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| protocols.split(',').any(|x| x.trim() == *p));
    let (Some(protocol), false) = (protocol, key.is_empty()) else {
        return not_found("an exec WebSocket");
    };
    let words: Vec<String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("command="))
        .map(|w| w.replace("%20", " "))
        .collect();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        let Ok(upgraded) = on.await else { return };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let out = format!("ran: {}\n", words.join(" "));
        let status = br#"{"metadata":{},"status":"Success"}"#;
        let _ = io
            .write_all(&frame(2, &[&[1], out.as_bytes()].concat()))
            .await;
        let _ = io.write_all(&frame(2, &[&[3], &status[..]].concat())).await;
        let _ = io.write_all(&frame(8, &[0x03, 0xe8])).await;
        let _ = io.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let accept = data_encoding::BASE64.encode(&sha1(
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    ));
    Response::builder()
        .status(101)
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-accept", accept)
        .header("sec-websocket-protocol", protocol)
        .body(full(""))
        .unwrap_or_else(|_| Response::new(full("fixture error")))
}

/// One unmasked server frame (FIN set).
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// SHA-1 (FIPS 180-4), for the WebSocket handshake's accept key only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    let bits = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha1_matches_the_rfc_6455_example() {
        // RFC 6455 section 1.3: the accept key for "dGhlIHNhbXBsZSBub25jZQ==".
        let digest = super::sha1(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        assert_eq!(
            data_encoding::BASE64.encode(&digest),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
