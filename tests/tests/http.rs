//! `protocol = "http"` resources with curl as the gated workload, against a real HTTP/1.1
//! server (hyper, with and without TLS): refusals without a grant, the credential injected
//! and never visible to the workload, path-normalisation and Host attacks refused, approvals
//! holding a request, expiry cutting a streamed response, every request recorded.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use jitgate_e2e::{Gate, Ran, config::Body, http_fixture::HttpFixture, now_ms, rfc3339_ms};

const READ_TOKEN: &str = "READ-TOKEN-5d1e0c";
const WRITE_TOKEN: &str = "WRITE-TOKEN-9a7c33";

/// Root-owned 0600 secret files for the read and write credentials.
fn secrets(dir: &Path) -> (String, String) {
    let write = |name: &str, value: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{value}\n")).expect("secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path.display().to_string()
    };
    (
        write("read.token", READ_TOKEN),
        write("write.token", WRITE_TOKEN),
    )
}

/// The `api` resource's keys: credentials per level and the given rules.
fn api_keys(upstream: &HttpFixture, dir: &Path, extra: &str) -> String {
    let (read, write) = secrets(dir);
    let ca = upstream
        .ca
        .as_ref()
        .map(|ca| format!("upstream_ca = \"{}\"\n", ca.display()))
        .unwrap_or_default();
    format!(
        "protocol = \"http\"\n{ca}hosts = [\"127.0.0.1\", \"api.test\"]\napproval_timeout = \"20s\"\n{extra}\n\
         [resource.credentials.read]\nsecret_file = \"{read}\"\n\
         [resource.credentials.write]\nsecret_file = \"{write}\"\n\
         [[resource.rule]]\npaths = [\"/admin/**\"]\naction = \"deny\"\n\
         [[resource.rule]]\nmethods = [\"DELETE\"]\npaths = [\"/items/**\"]\naction = \"approve\"\n"
    )
}

fn gate_for(test: &str, upstream: &HttpFixture, dir: &Path) -> Gate {
    let body = Body::new()
        .workload("bot", &["root"])
        .resource_with(
            "api",
            &upstream.addr.to_string(),
            &api_keys(upstream, dir, ""),
        )
        .policy(
            &["bot"],
            &["api"],
            &["read", "write"],
            "max_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"root\"]",
        )
        .build();
    Gate::start(test, "", &body)
}

/// `curl` as the gated workload: the body, then the status code on the last line.
fn curl(gate: &Gate, grant: Option<&str>, args: &[&str]) -> (u16, String, Ran) {
    let grant_args: Vec<&str> = grant.map_or_else(Vec::new, |g| vec!["--grant", g]);
    let mut cmd = vec!["curl", "-sS", "--path-as-is", "-w", "\n%{http_code}"];
    cmd.extend_from_slice(args);
    let ran = gate.run("bot", &grant_args, &cmd);
    let (body, code) = ran
        .stdout
        .rsplit_once('\n')
        .unwrap_or(("", ran.stdout.as_str()));
    let code = code.trim().parse().unwrap_or(0);
    (code, body.to_owned(), ran)
}

#[test]
fn https_requests_are_judged_injected_and_scrubbed() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-tls", &upstream, dir.path());
    let base = format!("https://{}", upstream.addr);

    // No grant: a 403 the client can read, naming the command to run.
    let (code, body, ran) = curl(&gate, None, &[&format!("{base}/echo")]);
    assert_eq!(code, 403, "{ran:#?}");
    let refusal: serde_json::Value = serde_json::from_str(&body).expect("JSON refusal");
    assert_eq!(refusal["hint"], "jitgate request api", "{refusal}");
    assert!(
        upstream.received().is_empty(),
        "refused requests reached the upstream"
    );

    // Granted: curl verifies the gate's certificate through the trust bundle `jitgate run`
    // set (no -k), and the upstream gets the gate's credential, not the workload's.
    let (code, body, ran) = curl(
        &gate,
        Some("api:read"),
        &[
            "-H",
            "Authorization: Bearer the-workloads-own",
            &format!("{base}/echo"),
        ],
    );
    assert_eq!(code, 200, "{ran:#?}");
    let got = upstream.received();
    let last = got.last().expect("the upstream saw the request");
    assert_eq!(
        last.header("authorization"),
        [format!("Bearer {READ_TOKEN}")]
    );
    assert_eq!(last.header("accept-encoding"), ["identity"]);
    // The echo of the injected header is scrubbed before the workload sees it.
    assert!(
        !body.contains(READ_TOKEN),
        "the workload saw the credential: {body}"
    );
    assert!(body.contains(&"*".repeat(READ_TOKEN.len())), "{body}");
    assert!(!body.contains("the-workloads-own"), "{body}");

    // An upstream that echoes the credential in a header and across body chunks.
    let (code, out, ran) = curl(&gate, Some("api:read"), &["-i", &format!("{base}/leak")]);
    assert_eq!(code, 200, "{ran:#?}");
    assert!(
        !out.contains(READ_TOKEN),
        "the workload saw the credential: {out}"
    );
    assert!(
        out.to_ascii_lowercase()
            .contains("x-echo-auth: bearer ****"),
        "{out}"
    );

    // The workload cannot read the secret file either.
    let cat = gate.run(
        "bot",
        &["--grant", "api:read"],
        &["cat", &dir.path().join("read.token").display().to_string()],
    );
    assert!(!cat.stdout.contains(READ_TOKEN), "{cat:#?}");

    // Spellings of /admin: every one meets the deny rule; ambiguous encodings are malformed.
    for path in [
        "/admin/users",
        "/public/../admin/users",
        "//admin/users",
        "/%61dmin/users",
        "/./admin/users",
        "/admin",
        "/items/../admin/x",
    ] {
        let (code, body, ran) = curl(&gate, Some("api:read"), &[&format!("{base}{path}")]);
        assert_eq!(code, 403, "{path}: {ran:#?}");
        assert!(body.contains("rule 1"), "{path}: {body}");
    }
    for path in [
        "/%2e%2e/admin",
        "/a/%2Fadmin",
        "/a%5c..%5cadmin",
        "/../admin",
    ] {
        let (code, _, ran) = curl(&gate, Some("api:read"), &[&format!("{base}{path}")]);
        assert_eq!(code, 400, "{path}: {ran:#?}");
    }
    assert!(
        upstream
            .received()
            .iter()
            .all(|r| !r.target.contains("admin")),
        "an /admin spelling reached the upstream: {:#?}",
        upstream.received()
    );
    // What was checked is what was forwarded: the normalised path.
    let (code, _, ran) = curl(
        &gate,
        Some("api:read"),
        &[&format!("{base}/a/./b//c/../d?q=1")],
    );
    assert_eq!(code, 200, "{ran:#?}");
    assert_eq!(upstream.received().last().unwrap().target, "/a/b/d?q=1");

    // A method smuggled past the request line, for frameworks that honour it: refused.
    for args in [
        vec!["-H", "X-HTTP-Method-Override: DELETE"],
        vec!["-H", "x-http-method: DELETE"],
        vec!["-H", "X-Method-Override: PUT"],
    ] {
        let mut a: Vec<&str> = args.clone();
        let url = format!("{base}/items/1");
        a.push(&url);
        let (code, body, _) = curl(&gate, Some("api:read"), &a);
        assert_eq!(code, 400, "{args:?}: {body}");
    }
    let (code, _, _) = curl(
        &gate,
        Some("api:read"),
        &[&format!("{base}/items/1?x=1&_METHOD=delete")],
    );
    assert_eq!(code, 400);

    let (code, _, _) = curl(
        &gate,
        Some("api:read"),
        &[&format!("{base}/items/1?%5Fmethod=DELETE")],
    );
    assert_eq!(code, 400, "an encoded _method is still a method override");

    // Byte ranges would hand the credential out in pieces too short to scrub; routing headers
    // would send the upstream elsewhere than what was judged.
    let (code, out, ran) = curl(
        &gate,
        Some("api:read"),
        &[
            "-H",
            "Range: bytes=0-7",
            "-H",
            "X-Original-URL: /admin/users",
            "-H",
            "X-Forwarded-Host: internal-admin.test",
            &format!("{base}/leak"),
        ],
    );
    assert_eq!(code, 200, "the whole body, scrubbed: {ran:#?}");
    assert!(!out.contains(READ_TOKEN), "{out}");
    let last = upstream.received().last().cloned().expect("received");
    assert!(
        last.header("range").is_empty()
            && last.header("x-original-url").is_empty()
            && last.header("x-forwarded-host").is_empty(),
        "{last:#?}"
    );

    // Methods beyond the grant's level, other virtual hosts, upgrades: refused.
    let (code, body, _) = curl(
        &gate,
        Some("api:read"),
        &["-X", "DELETE", &format!("{base}/items/1")],
    );
    assert_eq!(code, 403);
    assert!(
        body.contains("jitgate request api --access write"),
        "{body}"
    );
    let (code, body, _) = curl(
        &gate,
        Some("api:read"),
        &["-H", "Host: internal-admin.test", &format!("{base}/echo")],
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not served"), "{body}");
    let (code, _, _) = curl(
        &gate,
        Some("api:read"),
        &[
            "--http1.1",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: h2c",
            &format!("{base}/echo"),
        ],
    );
    assert_eq!(code, 501, "only WebSocket and SPDY upgrades are relayed");

    // Under a write grant, the write credential.
    let (code, _, ran) = curl(
        &gate,
        Some("api:write"),
        &["-X", "POST", "-d", "x=1", &format!("{base}/items")],
    );
    assert_eq!(code, 200, "{ran:#?}");
    let last = upstream.received().last().cloned().unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(
        last.header("authorization"),
        [format!("Bearer {WRITE_TOKEN}")]
    );

    // Every request is recorded with its decision and status.
    let rows = gate.wait_for("the last request's record", Duration::from_secs(10), || {
        let rows: String = gate
            .recorded_statements()
            .iter()
            .map(|s| {
                let field = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                format!(
                    "{}|{}|{}|{}\n",
                    field("text"),
                    field("decision"),
                    field("rule"),
                    field("tag")
                )
            })
            .collect();
        rows.contains("POST /items|").then_some(rows)
    });
    assert!(rows.contains("GET /echo|allowed||200"), "{rows}");
    assert!(
        rows.contains("GET //admin/users|denied|rule 1|403"),
        "{rows}"
    );
    assert!(rows.contains("POST /items|allowed||200"), "{rows}");
    assert!(
        !rows.contains(READ_TOKEN) && !rows.contains(WRITE_TOKEN),
        "{rows}"
    );
    // ... and shown by `jitgate sessions show`.
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let echo = sessions
        .as_array()
        .and_then(|a| {
            a.iter().find(|s| {
                s["grant"].is_string() && s["command"].as_str().is_some_and(|c| c.contains("/echo"))
            })
        })
        .and_then(|s| s["id"].as_str())
        .expect("the /echo session")
        .to_owned();
    let shown = gate.cli(&["sessions", "show", &echo]);
    shown.assert_ok();
    assert!(
        shown.stdout.contains("GET /echo") && shown.stdout.contains("read access"),
        "{shown:#?}"
    );
}

#[test]
fn a_held_delete_waits_for_a_human() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::plain();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-approve", &upstream, dir.path());
    let url = format!("http://{}/items/7", upstream.addr);

    let mut held = gate.spawn(
        "bot",
        &["--grant", "api:write"],
        &[
            "curl",
            "-sS",
            "-X",
            "DELETE",
            "-w",
            "\n%{http_code}\n",
            &url,
        ],
    );
    let request = gate.pending_request();
    assert!(
        request["statement"]
            .as_str()
            .unwrap_or_default()
            .contains("DELETE /items/7")
            || request.to_string().contains("DELETE /items/7"),
        "{request}"
    );
    assert!(
        upstream.received().iter().all(|r| r.method != "DELETE"),
        "the DELETE ran before anyone approved it"
    );
    gate.cli(&["approve", request["id"].as_str().unwrap()])
        .assert_ok();
    held.expect_line("ok DELETE /items/7", Duration::from_secs(10));
    held.expect_line("200", Duration::from_secs(5));
    assert_eq!(held.wait(Duration::from_secs(5)), 0);

    // Denied: the client gets a 403 naming the rule; the upstream sees nothing.
    let mut held = gate.spawn(
        "bot",
        &["--grant", "api:write"],
        &[
            "curl",
            "-sS",
            "-X",
            "DELETE",
            "-w",
            "\n%{http_code}\n",
            &format!("http://{}/items/8", upstream.addr),
        ],
    );
    let request = gate.pending_request();
    gate.cli(&[
        "deny",
        request["id"].as_str().unwrap(),
        "--reason",
        "not today",
    ])
    .assert_ok();
    held.expect_line("403", Duration::from_secs(10));
    assert!(
        upstream.received().iter().all(|r| r.target != "/items/8"),
        "a denied DELETE reached the upstream"
    );
}

#[test]
fn expiry_cuts_a_streamed_response_within_a_second() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::plain();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-expiry", &upstream, dir.path());
    let mut streaming = gate.spawn(
        "bot",
        &["--grant", "api:read:3s"],
        &["curl", "-sSN", &format!("http://{}/stream", upstream.addr)],
    );
    streaming.expect_line("tick 3", Duration::from_secs(10));
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    let expires = rfc3339_ms(&grants[0]["expires_at"]);
    let code = streaming.wait(Duration::from_secs(10));
    let ended = now_ms();
    assert_ne!(code, 0, "curl saw a clean end of a cut stream");
    assert!(
        ended - expires <= 1000,
        "the stream ran {}ms past expiry",
        ended - expires
    );
    gate.wait_for("the session end record", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        (sessions[0]["outcome"] == "grant_expired").then_some(())
    });
}

#[test]
fn unmodified_clients_trust_the_gate_and_never_see_the_credential() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-clients", &upstream, dir.path());
    let url = format!("https://{}/leak", upstream.addr);
    let python = |lib: &str| {
        format!(
            "import {lib}; r = {lib}.get('{url}', headers={{'Authorization': 'Bearer mine'}}); print(r.status_code); print(r.headers.get('x-echo-auth')); print(r.text)"
        )
    };
    let node = format!(
        "fetch('{url}').then(async r => {{ console.log(r.status); console.log(r.headers.get('x-echo-auth')); console.log(await r.text()); }}).catch(e => {{ console.error(e.cause || e); process.exit(3); }})"
    );
    let requests = python("requests");
    let httpx = python("httpx");
    for (client, cmd) in [
        ("python requests", vec!["/usr/bin/python3", "-c", &requests]),
        ("python httpx", vec!["/usr/bin/python3", "-c", &httpx]),
        ("node fetch", vec!["node", "-e", &node]),
    ] {
        let ran = gate.run("bot", &["--grant", "api:read"], &cmd);
        assert_eq!(ran.code, 0, "{client}: {ran:#?}");
        assert!(ran.stdout.starts_with("200\n"), "{client}: {ran:#?}");
        assert!(
            !ran.stdout.contains(READ_TOKEN),
            "{client} saw the credential: {ran:#?}"
        );
        assert!(ran.stdout.contains("Bearer *****"), "{client}: {ran:#?}");
        let last = upstream.received().last().cloned().expect("received");
        assert_eq!(
            last.header("authorization"),
            [format!("Bearer {READ_TOKEN}")],
            "{client}"
        );
    }
}

#[test]
fn smuggled_and_pipelined_requests_are_each_judged() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::plain();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-smuggle", &upstream, dir.path());
    // Raw bytes, as a hostile workload writes them: pipelined requests in one write, a body
    // framed two ways (Content-Length and chunked) hiding a request for /admin, and a
    // second Authorization spelled in upper case.
    let script = format!(
        r#"
import socket, sys
def send(raw):
    s = socket.create_connection(('127.0.0.1', {port}))
    s.sendall(raw)
    s.settimeout(5)
    out = b''
    try:
        while True:
            b = s.recv(65536)
            if not b: break
            out += b
    except socket.timeout:
        pass
    s.close()
    return out.decode('latin-1')
h = b'Host: 127.0.0.1\r\n'
print('PIPELINED', send(b'GET /echo HTTP/1.1\r\n' + h + b'\r\nGET /admin/x HTTP/1.1\r\n' + h + b'\r\nGET /ok HTTP/1.1\r\n' + h + b'Connection: close\r\n\r\n').count('HTTP/1.1'))
print(send(b'POST /echo HTTP/1.1\r\n' + h + b'Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/smuggled HTTP/1.1\r\n' + h + b'\r\n'))
print(send(b'GET /echo HTTP/1.1\r\n' + h + b'AUTHORIZATION: Bearer one\r\nauthorization: Bearer two\r\nConnection: close\r\n\r\n'))
"#,
        port = upstream.addr.port()
    );
    let ran = gate.run(
        "bot",
        &["--grant", "api:write"],
        &["/usr/bin/python3", "-c", &script],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(
        ran.stdout.contains("PIPELINED 3"),
        "three answers: {ran:#?}"
    );
    let got = upstream.received();
    assert!(
        got.iter().all(|r| !r.target.contains("admin")),
        "a pipelined or smuggled /admin request reached the upstream: {got:#?}"
    );
    assert!(got.iter().any(|r| r.target == "/ok"), "{got:#?}");
    for r in got.iter().filter(|r| r.target == "/echo") {
        assert_eq!(
            r.header("authorization"),
            [format!("Bearer {WRITE_TOKEN}")],
            "{r:#?}"
        );
    }
    assert!(!ran.stdout.contains(WRITE_TOKEN), "{ran:#?}");
    assert!(
        !ran.stdout.contains("Bearer one") && !ran.stdout.contains("Bearer two"),
        "{ran:#?}"
    );

    // Plaintext HTTP/2 (prior knowledge) is served as HTTP/2 and judged the same way.
    // (An encoded dot segment is ambiguous, and refused as malformed.)
    for (path, want) in [
        ("/echo", 200),
        ("/admin/x", 403),
        ("/x/%2e%2e/admin/x", 400),
    ] {
        let ran = gate.run(
            "bot",
            &["--grant", "api:write"],
            &[
                "curl",
                "-sS",
                "--path-as-is",
                "--http2-prior-knowledge",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                &format!("http://{}{path}", upstream.addr),
            ],
        );
        assert_eq!(ran.stdout, format!("2 {want}"), "{path}: {ran:#?}");
    }
    assert!(
        upstream
            .received()
            .iter()
            .all(|r| !r.target.contains("admin")),
        "an /admin request over HTTP/2 reached the upstream"
    );
}

#[test]
fn http2_streams_are_multiplexed_each_judged_and_cut_with_the_grant() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_for("http-h2", &upstream, dir.path());
    let base = format!("https://{}", upstream.addr);

    // Node's own HTTP/2 client: a stream that never ends (a watch) stays open while the
    // requests beside it on the same connection are each judged, then the grant's expiry
    // cuts the whole connection.
    let script = format!(
        r#"
const http2 = require('http2');
const s = http2.connect('{base}');
s.on('error', e => {{ console.log('session error ' + e.code); }});
function get(path) {{
  return new Promise(res => {{
    const r = s.request({{ ':path': path, authorization: 'Bearer mine' }});
    let status = 0, body = '';
    r.setEncoding('utf8');
    r.on('response', h => status = h[':status']);
    r.on('data', d => body += d);
    r.on('end', () => res([status, body]));
    r.on('error', e => res([0, String(e)]));
  }});
}}
const watch = s.request({{ ':path': '/stream' }});
watch.setEncoding('utf8');
let started = false;
watch.on('data', async d => {{
  if (started) return;
  started = true;
  for (const p of ['/echo', '/admin/x', '/x/%2e%2e/admin/y', '/items']) {{
    const [st, body] = await get(p);
    console.log(p + ' ' + st + ' ' + JSON.stringify(body));
  }}
  console.log('done');
}});
watch.on('close', () => {{ console.log('watch closed'); process.exit(watch.rstCode ? 4 : 0); }});
"#
    );
    let mut node = gate.spawn("bot", &["--grant", "api:read:6s"], &["node", "-e", &script]);
    node.expect_line("done", Duration::from_secs(15));
    let out = node.seen.join("\n");
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    let expires = rfc3339_ms(&grants[0]["expires_at"]);
    assert!(out.contains("/echo 200"), "{out}");
    assert!(
        !out.contains(READ_TOKEN),
        "the workload saw the credential: {out}"
    );
    assert!(out.contains(&"*".repeat(READ_TOKEN.len())), "{out}");
    assert!(!out.contains("the-workloads-own"), "{out}");
    assert!(out.contains("/admin/x 403"), "{out}");
    assert!(out.contains("/x/%2e%2e/admin/y 400"), "{out}");
    assert!(out.contains("/items 200"), "{out}");
    node.wait(Duration::from_secs(10));
    let ended = now_ms();
    assert!(
        ended - expires <= 1000,
        "the HTTP/2 connection ran {}ms past expiry",
        ended - expires
    );
    gate.wait_for(
        "the session's record, over HTTP/2",
        Duration::from_secs(10),
        || {
            let wires = gate.sqlite("SELECT destination FROM sessions");
            wires.contains("HTTP/2").then_some(())
        },
    );
    assert!(
        upstream
            .received()
            .iter()
            .all(|r| !r.target.contains("admin")),
        "an /admin request over HTTP/2 reached the upstream"
    );

    // A flood of streams on one connection (120 at once, half of them denied; the gate takes
    // 100 at a time): every one answered, each as its rule says.
    let flood = format!(
        r#"
const http2 = require('http2');
const s = http2.connect('{base}');
const counts = {{}};
const all = [];
for (let i = 0; i < 120; i++) {{
  all.push(new Promise(res => {{
    const r = s.request({{ ':path': (i % 2 ? '/admin/flood' : '/echo') + '?n=' + i }});
    r.on('response', h => {{ counts[h[':status']] = (counts[h[':status']] || 0) + 1; }});
    r.on('data', () => {{}});
    r.on('end', res);
    r.on('error', e => {{ counts[e.code] = (counts[e.code] || 0) + 1; res(); }});
  }}));
}}
Promise.all(all).then(() => {{ console.log(JSON.stringify(counts)); s.close(); }});
"#
    );
    let ran = gate.run("bot", &["--grant", "api:read"], &["node", "-e", &flood]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(ran.stdout.trim(), r#"{"200":60,"403":60}"#, "{ran:#?}");
}

/// A WebSocket upstream (Python `websockets`, as a separate process): its first message is the
/// Authorization it received, then it echoes.
struct WsServer {
    child: std::process::Child,
    port: u16,
}

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ws_server() -> WsServer {
    use std::io::BufRead as _;
    let script = r#"
import asyncio, websockets
async def handler(ws, path):
    await ws.send("auth=" + ws.request_headers.get("Authorization", ""))
    async for m in ws:
        await ws.send("echo:" + m)
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 websockets server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("port");
    let port = line.trim().parse().expect("a port");
    WsServer { child, port }
}

#[test]
fn websocket_upgrades_are_judged_relayed_scrubbed_and_cut() {
    jitgate_e2e::root_or_skip!();
    let server = ws_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let (read, _) = secrets(dir.path());
    let keys = format!(
        "protocol = \"http\"\n[resource.credentials.read]\nsecret_file = \"{read}\"\n\
         [resource.credentials.write]\nsecret_file = \"{read}\"\n\
         [[resource.rule]]\npaths = [\"/admin/**\"]\naction = \"deny\"\n"
    );
    let body = Body::new()
        .workload("bot", &["root"])
        .resource_with("ws", &format!("127.0.0.1:{}", server.port), &keys)
        .auto(&["bot"], &["ws"], &["read", "write"])
        .build();
    let gate = Gate::start("http-ws", "", &body);
    let client = |path: &str| {
        format!(
            r#"
import asyncio, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:{port}{path}", extra_headers={{"Authorization": "Bearer mine"}}) as ws:
        print(await ws.recv(), flush=True)
        for i in range(100):
            await ws.send("hello %d" % i)
            print(await ws.recv(), flush=True)
            await asyncio.sleep(0.05)
asyncio.run(main())
"#,
            port = server.port
        )
    };
    // An upgraded stream may carry writes: a read grant never upgrades.
    let ran = gate.run(
        "bot",
        &["--grant", "ws:read"],
        &["/usr/bin/python3", "-c", &client("/ws")],
    );
    assert_ne!(ran.code, 0, "{ran:#?}");
    assert!(ran.stderr.contains("403"), "{ran:#?}");
    // The upgrade request is judged: a denied path never upgrades.
    let ran = gate.run(
        "bot",
        &["--grant", "ws:write"],
        &["/usr/bin/python3", "-c", &client("/admin/ws")],
    );
    assert_ne!(ran.code, 0, "{ran:#?}");
    assert!(ran.stderr.contains("403"), "{ran:#?}");

    // Relayed both ways, the echoed credential scrubbed from the stream, cut on revoke.
    let mut ws = gate.spawn(
        "bot",
        &["--grant", "ws:write"],
        &["/usr/bin/python3", "-c", &client("/ws")],
    );
    let first = ws.expect_line("auth=", Duration::from_secs(10));
    assert_eq!(
        first,
        format!("auth=Bearer {}", "*".repeat(READ_TOKEN.len()))
    );
    ws.expect_line("echo:hello 3", Duration::from_secs(10));
    let grants = gate.cli(&["grants", "--json"]).json();
    let id = grants[0]["id"].as_str().expect("grant id").to_owned();
    gate.cli(&["revoke", &id]).assert_ok();
    assert_ne!(
        ws.wait(Duration::from_secs(5)),
        0,
        "the stream outlived its grant"
    );
    assert!(
        !ws.seen.iter().any(|l| l.contains("echo:hello 60")),
        "the stream ran on after the revoke: {:?}",
        ws.seen
    );
    gate.wait_for("the session end record", Duration::from_secs(5), || {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        sessions
            .as_array()?
            .iter()
            .any(|s| s["outcome"] == "grant_revoked")
            .then_some(())
    });
}

#[test]
fn a_client_stalled_in_the_tls_handshake_is_cut_at_the_startup_deadline() {
    jitgate_e2e::root_or_skip!();
    let upstream = HttpFixture::tls();
    let dir = tempfile::tempdir().expect("tempdir");
    let body = Body::new()
        .workload("bot", &["root"])
        .resource_with(
            "api",
            &upstream.addr.to_string(),
            &api_keys(&upstream, dir.path(), ""),
        )
        .auto(&["bot"], &["api"], &["read"])
        .build();
    let gate = Gate::start("http-stall", "startup_timeout = \"1s\"", &body);
    // The first byte of a TLS record, then nothing: the gate must not wait for ever.
    let script = format!(
        "import socket, time\ns = socket.create_connection(('127.0.0.1', {}))\ns.sendall(b'\\x16\\x03\\x01')\ntime.sleep(4)\n",
        upstream.addr.port()
    );
    let ran = gate.run(
        "bot",
        &["--grant", "api:read"],
        &["/usr/bin/python3", "-c", &script],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let cut = sessions
        .as_array()
        .and_then(|a| a.iter().find(|s| s["outcome"] == "refused_limit"))
        .unwrap_or_else(|| panic!("no session cut at the deadline: {sessions}"));
    assert!(
        cut["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("TLS handshake"),
        "{cut}"
    );
}
