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
//! ```

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
        _ => {
            eprintln!("usage: see the module documentation of tests/src/bin/jitgate-bench.rs");
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
fn mask_engine(n: usize) -> Result<Value> {
    use jitgate::{
        config::Access,
        inspect::{
            mask::Masker,
            rules::{Detector, MaskRule, Strategy},
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
    let all = [
        "email",
        "card",
        "ssn",
        "phone",
        "iban",
        "aws_key",
        "jwt",
        "private_key",
        "bearer",
    ];
    let detectors: Vec<Detector> = all
        .iter()
        .map(|d| d.parse().map_err(|e| anyhow::anyhow!("{d}: {e:?}")))
        .collect::<Result<_>>()?;
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
