//! The measuring side of `cargo xtask bench`: small clients that time one thing each and print
//! one JSON line with raw samples, so that the orchestrator (xtask) computes every figure the
//! same way for every variant. Run inside a gated workload for the gated variants
//! (`jitgate run --as bench -- jitgate-bench ...`) and outside it for the direct ones.
//!
//! ```text
//! jitgate-bench setup URL N             connect + first result, N times:  {"samples_us": [..]}
//! jitgate-bench connect ADDR N          connect(2) alone, N times:        {"samples_ns": [..]}
//! jitgate-bench query URL SQL           one streamed result: {"rows", "bytes", "secs", "masked"}
//! jitgate-bench echo PORT              an echo server on 127.0.0.1:PORT, until killed
//! jitgate-bench idle ADDR N             N concurrent connections to ADDR (an echo server):
//!                                       prints {"connected","healthy"}, waits for a line on
//!                                       stdin, checks every connection again, prints
//!                                       {"healthy"}
//! jitgate-bench mask ROWS               the masking engine alone, one core, median of three
//!                                       windows: {"engine": [..]}
//! jitgate-bench jsonmask ITEMS          the JSON response masker alone, one core, median of
//!                                       three windows: {"bytes", "secs", "masked"}
//! jitgate-bench certs DIR               a CA and a server certificate for 127.0.0.1 and
//!                                       origin.bench: DIR/{ca,cert,key}.pem
//! jitgate-bench http URL CONNS SECS CA..  CONNS keep-alive HTTP/1.1 clients GETting URL for
//!                                       SECS seconds, trusting the CA files:
//!                                       {"requests", "secs", "samples_us", "masked"}
//! jitgate-bench fleet URL PASSWORD_FILE ADMIN_URL POSTMASTER_PID HOSTS SECS RATE ROUNDS DIR
//!                                       a simulated fleet of HOSTS hosts on one shared store
//!                                       (see fleet.rs): server cost at rest and under load,
//!                                       decisions timed across hosts
//! ```

mod fleet;

use std::{
    io::{self, BufRead as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{StreamExt as _, pin_mut};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Semaphore,
};
use tokio_postgres::{NoTls, SimpleQueryMessage};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["setup", url, n] => parse(n).and_then(|n| runtime()?.block_on(setup(url, n))),
        ["connect", addr, n] => parse(n).and_then(|n| connect_cost(addr, n)),
        ["query", url, sql] => runtime().and_then(|rt| rt.block_on(query(url, sql))),
        ["echo", port] => parse(port).and_then(|port| runtime()?.block_on(echo(port))),
        ["idle", addr, n] => parse(n).and_then(|n| runtime()?.block_on(idle(addr, n))),
        ["mask", rows] => parse(rows).and_then(mask_engine),
        ["jsonmask", items] => parse(items).and_then(json_mask_engine),
        ["certs", dir] => certs(std::path::Path::new(dir)),
        ["http", url, conns, secs, cas @ ..] => parse(conns).and_then(|conns| {
            let secs: f64 = parse(secs)?;
            runtime()?.block_on(http_load(url, conns, secs, cas))
        }),
        ["fleet", rest @ ..] => fleet::plan(rest).and_then(|p| fleet::run(&p)),
        _ => {
            eprintln!("usage: see the module documentation of tests/src/bin/jitgate-bench/main.rs");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jitgate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| anyhow::anyhow!("{s:?}: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Connection setup as an application sees it: from `connect()` to the first query result
/// (TCP, the gate's redirect and grant lookup, startup, authentication, the query).
async fn setup(url: &str, n: usize) -> Result<Value> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .context("connecting")?;
        let driver = tokio::spawn(conn);
        let rows = client.simple_query("SELECT 1").await.context("SELECT 1")?;
        samples.push(start.elapsed().as_micros() as u64);
        if !rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(_))) {
            bail!("SELECT 1 returned no row");
        }
        drop(client);
        let _ = driver.await;
    }
    Ok(json!({ "samples_us": samples }))
}

/// The time of `connect(2)` alone, for a plain destination or one the gate redirects.
fn connect_cost(addr: &str, n: usize) -> Result<Value> {
    let target: SocketAddrV4 = parse(addr)?;
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(target.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("socket()");
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let start = Instant::now();
        // SAFETY: sin is a valid sockaddr_in of the size given.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sin).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let took = start.elapsed();
        if rc != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("connect({target})"));
        }
        samples.push(took.as_nanos() as u64);
        // Close with a reset: no TIME_WAIT piling up over thousands of samples.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid socket and option buffer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::from_ref(&linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
    Ok(json!({ "samples_ns": samples }))
}

/// Streams one result, counting rows, value bytes and values that came back masked.
async fn query(url: &str, sql: &str) -> Result<Value> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting")?;
    let driver = tokio::spawn(conn);
    let start = Instant::now();
    let stream = client
        .simple_query_raw(sql)
        .await
        .context("running the query")?;
    pin_mut!(stream);
    let (mut rows, mut bytes, mut masked) = (0u64, 0u64, 0u64);
    while let Some(msg) = stream.next().await {
        if let SimpleQueryMessage::Row(row) = msg.context("reading the result")? {
            rows += 1;
            for i in 0..row.len() {
                if let Some(v) = row.get(i) {
                    bytes += v.len() as u64;
                    masked += u64::from(v.contains("***"));
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(client);
    let _ = driver.await;
    Ok(json!({ "rows": rows, "bytes": bytes, "secs": secs, "masked": masked }))
}

/// Echoes whatever each connection sends, until killed. A process of its own, so that the
/// client and the server side of ten thousand connections do not share one descriptor table.
async fn echo(port: u16) -> Result<Value> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("binding the echo server on port {port}"))?;
    println!("listening");
    io::stdout().flush()?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn ping(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 5];
    let round = async {
        conn.write_all(b"ping\n").await?;
        conn.read_exact(&mut buf).await?;
        io::Result::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), round).await,
        Ok(Ok(()))
    ) && &buf == b"ping\n"
}

/// Holds `n` idle connections through the gate, so that the orchestrator can read the host
/// agent's resident set, then checks that every one of them still works.
async fn idle(addr: &str, n: usize) -> Result<Value> {
    let target: SocketAddr = parse(addr)?;
    // Bounded concurrency: the listen backlog, not the bench, should never be the limit.
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = Vec::with_capacity(n);
    for _ in 0..n {
        let gate = gate.clone();
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let mut conn =
                tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target))
                    .await
                    .ok()?
                    .ok()?;
            ping(&mut conn).await.then_some(conn)
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for task in opening {
        if let Ok(Some(conn)) = task.await {
            conns.push(conn);
        }
    }
    let opened = json!({ "connected": n, "healthy": conns.len() });
    println!("{opened}");
    io::stdout().flush()?;
    let mut line = String::new();
    tokio::task::spawn_blocking(move || io::stdin().lock().read_line(&mut line)).await??;
    let mut healthy = 0;
    for conn in &mut conns {
        healthy += usize::from(ping(conn).await);
    }
    Ok(json!({ "healthy": healthy }))
}

/// A DataRow body of `values` (text format).
fn data_row(values: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        b.put_i32(v.len() as i32);
        b.extend_from_slice(v.as_bytes());
    }
    b.freeze()
}

/// The masking engine on one core, without any I/O: the rows a `SELECT * FROM people` returns
/// (an id, a name, an email under a column rule, a card number and a free-text note for the
/// detectors), masked frame by frame as the session does it.
/// Every detector the gate has (what the benches mask with).
fn all_detectors() -> Result<Vec<jitgate::inspect::rules::Detector>> {
    [
        "email",
        "card",
        "ssn",
        "phone",
        "iban",
        "aws_key",
        "jwt",
        "private_key",
        "bearer",
    ]
    .iter()
    .map(|d| d.parse().map_err(|e| anyhow::anyhow!("{d}: {e:?}")))
    .collect()
}

fn mask_engine(n: usize) -> Result<Value> {
    use jitgate::{
        config::Access,
        inspect::{
            mask::Masker,
            rules::{MaskRule, Strategy},
        },
        postgres::rows::{self, Column, Masked, Origin, Plan},
    };
    let rows: Vec<Bytes> = (0..n)
        .map(|i| {
            let id = i.to_string();
            let name = format!("Customer Number {i}");
            let email = format!("customer.{i}@example.com");
            let card = ["4111 1111 1111 1111", "5500 0000 0000 0004", "none on file"][i % 3];
            let note = if i % 10 == 0 {
                format!(
                    "called on 2026-11-{:02}, SSN on file: 123-45-6789",
                    i % 28 + 1
                )
            } else {
                format!(
                    "prefers email; account opened in {} by referral",
                    2000 + i % 26
                )
            };
            data_row(&[&id, &name, &email, card, &note])
        })
        .collect();
    let input: usize = rows.iter().map(|r| r.len() + 5).sum();
    let detectors = all_detectors()?;
    let cols: Vec<Column> = [
        ("id", 23),
        ("name", 25),
        ("email", 25),
        ("card", 25),
        ("note", 25),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, type_oid))| Column {
        name: (*name).to_owned(),
        table_oid: 16384,
        attnum: i as i16 + 1,
        type_oid: *type_oid,
        format: 0,
    })
    .collect();
    let mut results = Vec::new();
    for (label, columns) in [
        ("column rule + 9 detectors", vec!["*.email".to_owned()]),
        ("9 detectors", vec![]),
    ] {
        let mut masks = vec![MaskRule {
            columns: vec![],
            detectors: detectors.clone(),
            strategy: Strategy::Redact,
            exempt_identities: vec![],
        }];
        if !columns.is_empty() {
            masks.insert(
                0,
                MaskRule {
                    columns,
                    detectors: vec![],
                    strategy: Strategy::Partial,
                    exempt_identities: vec![],
                },
            );
        }
        let masker = Masker::new(&masks, None, "bench", Access::Read, [7; 32])
            .context("the rules must make a masker")?;
        let plan = Plan::new(
            &cols,
            &masker,
            &|c| Origin::Column("public".into(), "people".into(), c.name.clone()),
            None,
        );
        let mut out = BytesMut::with_capacity(64 * 1024);
        // Three windows of at least a full pass and half a second each; the median window
        // is reported, so that one burst of a neighbour's load does not decide the figure.
        let mut windows = Vec::new();
        for _ in 0..3 {
            let mut stats = Masked::default();
            let (mut passes, mut bytes_out) = (0u64, 0usize);
            let start = Instant::now();
            while passes == 0 || start.elapsed() < Duration::from_millis(500) {
                for row in &rows {
                    rows::mask_data_row(row, &plan, &masker, &mut stats, &mut out)
                        .context("masking a row")?;
                    if out.len() > 32 * 1024 {
                        bytes_out += out.len();
                        out.clear();
                    }
                }
                passes += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            bytes_out += out.len();
            out.clear();
            windows.push((passes, secs, bytes_out, stats.values));
        }
        windows.sort_by(|a, b| (b.0 as f64 / b.1).total_cmp(&(a.0 as f64 / a.1)));
        let (passes, secs, bytes_out, masked) = windows[1];
        results.push(json!({
            "label": label,
            "rows": passes * n as u64,
            "bytes": passes * input as u64,
            "bytes_out": bytes_out,
            "secs": secs,
            "masked": masked,
        }));
    }
    Ok(json!({ "engine": results }))
}

/// What the bench's HTTP origin answers (the gate masks the email under full policy).
const ORIGIN_EMAIL: &str = "jane@example.com";

/// A CA and a server certificate it signed for `127.0.0.1` and `origin.bench`.
fn certs(dir: &std::path::Path) -> Result<Value> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "jitgate bench origin CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["origin.bench".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::V4(
            Ipv4Addr::LOCALHOST,
        )));
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(json!({ "dir": dir.display().to_string() }))
}

/// Keep-alive GETs of `url` from `conns` connections for `secs`: every request's latency,
/// and how many answers came back with the origin's email masked (the bench checks that
/// masking happened exactly where it should).
async fn http_load(url: &str, conns: usize, secs: f64, cas: &[&str]) -> Result<Value> {
    use http_body_util::{BodyExt as _, Empty};
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

    let uri: hyper::Uri = parse(url)?;
    let host = uri.host().context("the URL has no host")?.to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .context("host must be an IP")?;
    let tls = if https {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            for cert in
                CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {ca}"))?
            {
                roots.add(cert?)?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Some((
            tokio_rustls::TlsConnector::from(Arc::new(config)),
            ServerName::try_from(host.clone())?,
        ))
    } else {
        None
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let tls = tls.clone();
        let path = path.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.context("connecting")?;
            tcp.set_nodelay(true)?;
            let io: Box<dyn Io> = match tls {
                Some((connector, name)) => Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .context("TLS handshake")?,
                ),
                None => Box::new(tcp),
            };
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .context("HTTP handshake")?;
            tokio::spawn(conn);
            let mut samples = Vec::new();
            let mut masked = 0u64;
            while Instant::now() < deadline {
                let request = hyper::Request::get(path.as_str())
                    .header("host", host.as_str())
                    .header("authorization", "Bearer the-workloads-own")
                    .body(Empty::<Bytes>::new())?;
                let start = Instant::now();
                sender.ready().await.context("connection lost")?;
                let response = sender.send_request(request).await.context("request")?;
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                samples.push(start.elapsed().as_micros() as u64);
                if status != 200 {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
                if !body
                    .windows(ORIGIN_EMAIL.len())
                    .any(|w| w == ORIGIN_EMAIL.as_bytes())
                {
                    masked += 1;
                }
            }
            Ok::<_, anyhow::Error>((samples, masked))
        }));
    }
    let mut samples = Vec::new();
    let mut masked = 0;
    for t in tasks {
        let (s, m) = t.await??;
        samples.extend(s);
        masked += m;
    }
    Ok(json!({
        "requests": samples.len(),
        "secs": started.elapsed().as_secs_f64(),
        "samples_us": samples,
        "masked": masked,
    }))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The JSON response masker alone on one core: a list response of `items` objects (parsed,
/// masked by a JSON path and the nine detectors, written back: what an `http` resource with
/// masks does to each JSON response), in three windows of at least half a second; the median
/// window is reported.
fn json_mask_engine(items: usize) -> Result<Value> {
    use jitgate::{
        config::Access,
        http::jsonmask::BodyMasker,
        inspect::rules::{MaskRule, Strategy},
    };
    const CARDS: [&str; 3] = ["4111 1111 1111 1111", "5500 0000 0000 0004", "none on file"];
    let doc = serde_json::to_vec(&json!({
        "kind": "List",
        "items": (0..items).map(|i| json!({
            "id": i,
            "name": format!("Customer Number {i}"),
            "email": format!("customer.{i}@example.com"),
            "card": CARDS[i % 3],
            "note": format!("prefers email; account opened in {} by referral", 2000 + i % 26),
        })).collect::<Vec<_>>(),
    }))?;
    let detectors = all_detectors()?;
    let masks = vec![
        MaskRule {
            columns: vec!["$.items[*].email".to_owned()],
            detectors: vec![],
            strategy: Strategy::Partial,
            exempt_identities: vec![],
        },
        MaskRule {
            columns: vec![],
            detectors,
            strategy: Strategy::Redact,
            exempt_identities: vec![],
        },
    ];
    let masker = BodyMasker::new(&masks, None, "bench", Access::Read, [7; 32])
        .context("the masks must make a masker")?;
    let mut windows = Vec::new();
    let mut masked = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let mut passes = 0u64;
        while passes == 0 || start.elapsed() < Duration::from_millis(500) {
            let mut value: serde_json::Value = serde_json::from_slice(&doc)?;
            masked = masker.mask_json(&mut value);
            std::hint::black_box(serde_json::to_vec(&value)?);
            passes += 1;
        }
        windows.push((doc.len() as f64 * passes as f64) / start.elapsed().as_secs_f64());
    }
    windows.sort_by(f64::total_cmp);
    if masked == 0 {
        bail!("nothing was masked");
    }
    // Bytes per second of the median window, as one second's worth.
    Ok(json!({ "bytes": windows[1] as u64, "secs": 1.0, "masked": masked }))
}
