//! The measurements. Each stage interleaves its variants round by round and keeps raw
//! samples; [`Results`] turns them into tables and into the verdict on each target.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Sizes,
    env::{
        CONNECT_SINK_PORT, DB, Env, GateMode, IDLE_SINK_PORT, PASSWORD, PG_PORT, RO_USER, RW_USER,
        WRONG_PASSWORD, process_cpu_ns,
    },
    http::{self, HttpCell},
    stats::{Samples, Table, fmt},
};

/// Where a client's connections go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Straight to PostgreSQL: the physical limit.
    Direct,
    /// Through pgbouncer in session mode.
    Bouncer,
    /// A gated workload through jitgate with full policy.
    Full,
    /// A gated workload through jitgate relaying bytes (`protocol = "tcp"`).
    Relay,
}

impl Variant {
    const ALL: [Self; 4] = [Self::Direct, Self::Bouncer, Self::Full, Self::Relay];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Bouncer => "pgbouncer (session)",
            Self::Full => "jitgate full policy",
            Self::Relay => "jitgate tcp relay",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Bouncer => super::env::BOUNCER_PORT,
            _ => PG_PORT,
        }
    }

    /// The full-policy gate injects the real password; everything else needs it.
    fn password(self) -> &'static str {
        match self {
            Self::Full => WRONG_PASSWORD,
            _ => PASSWORD,
        }
    }

    fn url(self, user: &str) -> String {
        format!(
            "postgres://{user}:{}@127.0.0.1:{}/{DB}",
            self.password(),
            self.port()
        )
    }

    /// The command as this variant runs it: gated (with a task grant) or not.
    fn command(
        self,
        env: &mut Env,
        identity: &str,
        grant: &str,
        mut cmd: Command,
    ) -> Result<Command> {
        let mode = match self {
            Self::Direct | Self::Bouncer => return Ok(cmd),
            Self::Full => GateMode::Full,
            Self::Relay => GateMode::Relay,
        };
        env.set_mode(mode)?;
        Ok(env.gated(identity, grant, &mut cmd))
    }
}

/// `variants` rotated by `n`: who goes first changes every round.
pub(super) fn rotated<T: Copy>(variants: &[T], n: usize) -> Vec<T> {
    let mut v = variants.to_vec();
    if !v.is_empty() {
        let k = n % v.len();
        v.rotate_left(k);
    }
    v
}

pub(super) fn output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) fn json_line(text: &str, what: &str) -> Result<Value> {
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("{what}: no JSON result in {text:?}"))
}

pub(super) fn samples(v: &Value, key: &str, scale: f64) -> Result<Vec<f64>> {
    v[key]
        .as_array()
        .with_context(|| format!("no {key} in {v}"))?
        .iter()
        .map(|x| x.as_f64().map(|x| x * scale).context("a number"))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Script {
    SelectOnly,
    TpcB,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Simple,
    Prepared,
}

impl Proto {
    fn flag(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::Prepared => "prepared",
        }
    }
}

impl Script {
    fn label(self) -> &'static str {
        match self {
            Self::SelectOnly => "pgbench -S (select-only)",
            Self::TpcB => "pgbench TPC-B-like (default script)",
        }
    }
}

/// One variant in one pgbench cell, over all rounds.
struct PgCell {
    script: Script,
    proto: Proto,
    clients: u32,
    variant: Variant,
    tps: Vec<f64>,
    /// Per-transaction latency, ms.
    latency: Samples,
    /// The proxy's CPU time per transaction, µs, one per run (the agent's whole process:
    /// its runtime and its store thread; pgbouncer's process), none for direct.
    cpu_us: Vec<f64>,
}

impl PgCell {
    fn tps(&self) -> f64 {
        self.tps.iter().sum::<f64>() / self.tps.len().max(1) as f64
    }

    fn cpu_us(&self) -> Option<f64> {
        (!self.cpu_us.is_empty())
            .then(|| self.cpu_us.iter().sum::<f64>() / self.cpu_us.len() as f64)
    }
}

struct Throughput {
    label: &'static str,
    rows: u64,
    bytes: u64,
    secs: f64,
    masked: u64,
}

struct Idle {
    connections: usize,
    /// The count asked for, and the descriptor limit when that was more than the host allows.
    wanted: usize,
    fd_limit: u64,
    healthy_open: u64,
    healthy_after: u64,
    rss_before_kib: u64,
    rss_kib: u64,
}

pub struct Results {
    pg: PgResults,
    setup: Vec<(Variant, Samples)>,
    masking: Vec<Throughput>,
    engine: Vec<Throughput>,
    /// Plain and redirected `connect()`, µs.
    connect: Vec<(&'static str, Samples)>,
    idle: Idle,
    http: Vec<HttpCell>,
    /// The JSON response masker alone, one core.
    json_engine: Throughput,
}

pub fn run_all(env: &mut Env, sizes: &Sizes) -> Result<Results> {
    let pg = pgbench_matrix(env, sizes)?;
    let setup = connection_setup(env, sizes)?;
    let masking = masking(env, sizes)?;
    let engine = engine(env, sizes)?;
    let connect = connect_cost(env, sizes)?;
    let idle = idle(env, sizes)?;
    let http = http::stage(env, sizes)?;
    let json_engine = json_engine(env, sizes)?;
    Ok(Results {
        pg,
        setup,
        masking,
        engine,
        connect,
        idle,
        http,
        json_engine,
    })
}

/// `cargo xtask bench http`: the HTTP stage and the JSON masker alone, with the HTTP target,
/// for working on the HTTP path without the hour the whole run takes.
pub fn run_http(env: &mut Env, sizes: &Sizes) -> Result<Vec<Table>> {
    let cells = http::stage(env, sizes)?;
    let json = json_engine(env, sizes)?;
    let mut targets = Table::new("Targets", &["target", "measured", "verdict"]);
    http::target(&cells, &mut targets);
    Ok(vec![http::table(&cells), json_table(&json), targets])
}

/// `cargo xtask bench pg`: the pgbench matrix alone (direct, pgbouncer, full policy, relay),
/// with its targets, for work on the PostgreSQL data path.
pub fn run_pg(env: &mut Env, sizes: &Sizes) -> Result<Vec<Table>> {
    let pg = pgbench_matrix(env, sizes)?;
    let mut targets = Table::new("Targets", &["target", "measured", "verdict"]);
    pg.targets(&mut targets);
    let mut tables = pg.tables();
    tables.push(targets);
    Ok(tables)
}

/// `cargo xtask bench idle`: the idle-connection stage alone (about a minute), for work on
/// the memory a connection holds.
pub fn run_idle(env: &mut Env, sizes: &Sizes) -> Result<Vec<Table>> {
    let idle = idle(env, sizes)?;
    Ok(vec![idle.table()])
}

/// `cargo xtask bench mask`: the masking stages alone (end to end and the engine), with
/// their targets, for work on the masked result path.
pub fn run_mask(env: &mut Env, sizes: &Sizes) -> Result<Vec<Table>> {
    let masking = masking(env, sizes)?;
    let engine = engine(env, sizes)?;
    let mut targets = Table::new("Targets", &["target", "measured", "verdict"]);
    engine_target(&engine, &mut targets);
    masking_target(&masking, &mut targets);
    Ok(vec![
        masking_table(&masking),
        engine_table(&engine),
        targets,
    ])
}

fn masking_table(masking: &[Throughput]) -> Table {
    let mut t = Table::new(
        "Masking, end to end: SELECT of every row of `people` (ids, names, emails, cards, notes)",
        &["variant", "rows", "MB", "rows/s", "MB/s", "values masked"],
    );
    // Sizes in MB (10^6 bytes) of the result as the server sends it.
    let server_bytes_per_row = masking
        .first()
        .map_or(0.0, |d| d.bytes as f64 / d.rows.max(1) as f64);
    for m in masking {
        let mb = m.rows as f64 * server_bytes_per_row / 1e6;
        t.row(vec![
            m.label.to_owned(),
            m.rows.to_string(),
            fmt(mb),
            fmt(m.rows as f64 / m.secs),
            fmt(mb / m.secs),
            m.masked.to_string(),
        ]);
    }
    t
}

fn engine_table(engine: &[Throughput]) -> Table {
    let mut t = Table::new(
        "Masking engine alone, one core (DataRow in, masked DataRow out; median of three windows)",
        &["rules", "rows", "rows/s", "MB/s", "values masked"],
    );
    for e in engine {
        t.row(vec![
            e.label.to_owned(),
            e.rows.to_string(),
            fmt(e.rows as f64 / e.secs),
            fmt(e.bytes as f64 / 1e6 / e.secs),
            e.masked.to_string(),
        ]);
    }
    t
}

fn engine_target(engine: &[Throughput], t: &mut Table) {
    let mbs = engine
        .first()
        .map_or(0.0, |e| e.bytes as f64 / 1e6 / e.secs);
    t.row(vec![
        "masking >= 200 MB/s on one core".into(),
        format!("{} MB/s (column rule + 9 detectors)", fmt(mbs)),
        verdict(mbs >= 200.0),
    ]);
}

/// Masked results end to end against the plain relay's, both in rows per second of the same
/// result (the rows are the same; the masked ones are a little shorter on the wire).
fn masking_target(masking: &[Throughput], t: &mut Table) {
    let rate = |label: &str| {
        masking
            .iter()
            .find(|m| m.label == label)
            .map(|m| m.rows as f64 / m.secs)
    };
    let (text, ok) = match (
        rate("jitgate full policy, masked"),
        rate("jitgate tcp relay"),
    ) {
        (Some(m), Some(r)) if r > 0.0 => (format!("{:.2} of the relay", m / r), m / r >= 0.8),
        _ => ("n/a".to_owned(), false),
    };
    t.row(vec![
        "masked results end to end >= 0.8 of the tcp relay's throughput".into(),
        text,
        verdict(ok),
    ]);
}

fn verdict(ok: bool) -> String {
    if ok { "met" } else { "MISSED" }.to_owned()
}

/// The verdict on a target measured in `parts`: none when the run did not measure it (a
/// `bench pg --clients` run without the cells it needs).
fn measured_verdict(ok: bool, parts: &[String]) -> String {
    if parts.is_empty() {
        "not measured".to_owned()
    } else {
        verdict(ok)
    }
}

impl Idle {
    fn per_conn_kib(&self) -> f64 {
        self.rss_kib.saturating_sub(self.rss_before_kib) as f64 / self.connections.max(1) as f64
    }

    fn table(&self) -> Table {
        let mut t = Table::new(
            "Scale: idle gated connections (tcp relay to an echo server)",
            &[
                "connections",
                "healthy when opened",
                "healthy after idling",
                "agent RSS before MiB",
                "agent RSS with all open MiB",
                "KiB per connection",
                "RSS / connections KiB",
            ],
        );
        t.row(vec![
            self.connections.to_string(),
            self.healthy_open.to_string(),
            self.healthy_after.to_string(),
            fmt(self.rss_before_kib as f64 / 1024.0),
            fmt(self.rss_kib as f64 / 1024.0),
            fmt(self.per_conn_kib()),
            fmt(self.rss_kib as f64 / self.connections.max(1) as f64),
        ]);
        t
    }
}

fn json_table(json: &Throughput) -> Table {
    let mut t = Table::new(
        "JSON response masking alone, one core (a list of objects parsed, masked, written; median of three windows)",
        &[
            "rules",
            "objects per document",
            "MB/s",
            "values masked per document",
        ],
    );
    t.row(vec![
        json.label.to_owned(),
        json.rows.to_string(),
        fmt(json.bytes as f64 / 1e6 / json.secs),
        json.masked.to_string(),
    ]);
    t
}

/// One pgbench run: its tps and every transaction's latency (ms).
fn pgbench(
    env: &mut Env,
    variant: Variant,
    (script, proto, clients): (Script, Proto, u32),
    secs: u32,
    tag: &str,
) -> Result<(f64, Vec<f64>, Option<f64>)> {
    let logs = Env::log_dir();
    let mut cmd = Command::new("pgbench");
    cmd.args(["-n", "-T", &secs.to_string(), "-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string(), "-M", proto.flag()])
        .args(["--log", &format!("--log-prefix={tag}")]);
    if script == Script::SelectOnly {
        cmd.arg("-S");
    }
    cmd.args(["-h", "127.0.0.1", "-p", &variant.port().to_string()])
        .args(["-U", RW_USER, DB])
        .env("PGPASSWORD", variant.password())
        .current_dir(&logs);
    let mut cmd = variant.command(env, "bench", "bench-db:write:4h", cmd)?;
    let what = format!("pgbench ({}, {tag})", variant.label());
    // The proxy in the path, whose CPU time the run is charged with.
    let proxy = match variant {
        Variant::Direct => None,
        Variant::Bouncer => env.bouncer_pid(),
        Variant::Full | Variant::Relay => Some(env.daemon_pid()?),
    };
    let cpu_before = proxy.and_then(|p| process_cpu_ns(p, false));
    let text = output(&mut cmd, &what)?;
    let cpu_after = proxy.and_then(|p| process_cpu_ns(p, false));
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let tps = field("tps = ").with_context(|| format!("{what}: no tps in {text}"))?;
    if field("number of failed transactions:").is_some_and(|f| f > 0.0) {
        bail!("{what}: transactions failed:\n{text}");
    }
    let mut latency = Vec::new();
    for entry in fs::read_dir(&logs)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{tag}.")) {
            continue;
        }
        let log = fs::read_to_string(entry.path())?;
        // client_id transaction_no time(us) script_no time_epoch time_us ...
        latency.extend(
            log.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                .map(|us| us / 1000.0),
        );
        fs::remove_file(entry.path())?;
    }
    if latency.is_empty() {
        bail!("{what}: pgbench wrote no transaction log");
    }
    let done = field("number of transactions actually processed:").unwrap_or(0.0);
    let cpu = match (cpu_before, cpu_after) {
        (Some(a), Some(b)) if done > 0.0 => Some(b.saturating_sub(a) as f64 / 1000.0 / done),
        _ => None,
    };
    Ok((tps, latency, cpu))
}

fn pgbench_matrix(env: &mut Env, sizes: &Sizes) -> Result<PgResults> {
    println!(
        "-- pgbench: 2 scripts x 2 protocols x {:?} clients x 4 variants x {} round(s) of {} s",
        sizes.clients, sizes.rounds, sizes.secs
    );
    let mut cells = Vec::new();
    let mut n = 0;
    for script in [Script::SelectOnly, Script::TpcB] {
        for proto in [Proto::Simple, Proto::Prepared] {
            for &clients in &sizes.clients {
                let first = cells.len();
                for variant in Variant::ALL {
                    cells.push(PgCell {
                        script,
                        proto,
                        clients,
                        variant,
                        tps: Vec::new(),
                        latency: Samples::default(),
                        cpu_us: Vec::new(),
                    });
                }
                for round in 0..sizes.rounds {
                    for (i, variant) in rotated(&Variant::ALL, n + round).into_iter().enumerate() {
                        let tag = format!("run{n}-{round}-{i}");
                        let (tps, lat, cpu) =
                            pgbench(env, variant, (script, proto, clients), sizes.secs, &tag)?;
                        let cell = cells[first..]
                            .iter_mut()
                            .find(|c| c.variant == variant)
                            .context("cell")?;
                        cell.tps.push(tps);
                        cell.latency.extend(lat);
                        cell.cpu_us.extend(cpu);
                    }
                }
                n += 1;
                let line: Vec<String> = cells[first..]
                    .iter()
                    .map(|c| format!("{} {} tps", c.variant.label(), fmt(c.tps())))
                    .collect();
                println!(
                    "   {} {} c={clients}: {}",
                    if script == Script::SelectOnly {
                        "-S"
                    } else {
                        "tpcb"
                    },
                    proto.flag(),
                    line.join(", ")
                );
            }
        }
    }
    Ok(PgResults { cells })
}

fn connection_setup(env: &mut Env, sizes: &Sizes) -> Result<Vec<(Variant, Samples)>> {
    println!("-- connection setup: {} per variant", sizes.setups);
    let blocks = sizes.rounds * 2;
    let per_block = sizes.setups.div_ceil(blocks);
    let mut results: Vec<(Variant, Samples)> = Variant::ALL
        .iter()
        .map(|v| (*v, Samples::default()))
        .collect();
    for block in 0..blocks {
        for variant in rotated(&Variant::ALL, block) {
            let mut helper = env.helper();
            helper.args(["setup", &variant.url(RO_USER), &per_block.to_string()]);
            let mut cmd = variant.command(env, "bench", "bench-db:read:4h", helper)?;
            let out = json_line(&output(&mut cmd, "connection setup")?, "connection setup")?;
            let s = results
                .iter_mut()
                .find(|r| r.0 == variant)
                .context("variant")?;
            s.1.extend(samples(&out, "samples_us", 1e-3)?);
        }
    }
    Ok(results)
}

fn masking(env: &mut Env, sizes: &Sizes) -> Result<Vec<Throughput>> {
    println!("-- masking, end to end: {} rows", sizes.people);
    let sql = "SELECT id, name, email, card, note FROM people";
    // (label, variant, identity): `bench-clear` takes the full-policy path without masking.
    let variants: [(&'static str, Variant, &str); 4] = [
        ("direct", Variant::Direct, "bench"),
        ("jitgate tcp relay", Variant::Relay, "bench"),
        (
            "jitgate full policy, masking exempt",
            Variant::Full,
            "bench-clear",
        ),
        ("jitgate full policy, masked", Variant::Full, "bench"),
    ];
    let mut results: Vec<Throughput> = variants
        .iter()
        .map(|(label, ..)| Throughput {
            label,
            rows: 0,
            bytes: 0,
            secs: 0.0,
            masked: 0,
        })
        .collect();
    // One query takes a fifth of a second: many, interleaved, so that one slow moment of
    // the machine does not decide a variant's figure.
    let queries = masking_queries(sizes);
    for round in 0..queries {
        for (label, variant, identity) in rotated(&variants, round) {
            let mut helper = env.helper();
            helper.args(["query", &variant.url(RO_USER), sql]);
            let mut cmd = variant.command(env, identity, "bench-db:read:4h", helper)?;
            let out = json_line(&output(&mut cmd, label)?, label)?;
            let r = results
                .iter_mut()
                .find(|r| r.label == label)
                .context("variant")?;
            r.rows += out["rows"].as_u64().unwrap_or(0);
            r.bytes += out["bytes"].as_u64().unwrap_or(0);
            r.secs += out["secs"].as_f64().unwrap_or(0.0);
            r.masked += out["masked"].as_u64().unwrap_or(0);
        }
    }
    // The bench checks itself: masking must have happened exactly where it should.
    for r in &results {
        let masks = r.label.ends_with("masked");
        let expected = u64::from(sizes.people) * queries as u64;
        if r.rows != expected {
            bail!(
                "{}: {} rows instead of {expected} ({queries} queries of {})",
                r.label,
                r.rows,
                sizes.people
            );
        }
        if masks != (r.masked > 0) {
            bail!("{}: {} values came back masked", r.label, r.masked);
        }
    }
    Ok(results)
}

/// Queries per variant in the end-to-end masking stage.
fn masking_queries(sizes: &Sizes) -> usize {
    sizes.rounds.max(2) * 5
}

fn engine(env: &Env, sizes: &Sizes) -> Result<Vec<Throughput>> {
    println!("-- masking engine, one core");
    let rows = sizes.people.max(1000);
    let out = json_line(
        &output(
            env.helper().args(["mask", &rows.to_string()]),
            "masking engine",
        )?,
        "masking engine",
    )?;
    out["engine"]
        .as_array()
        .context("engine results")?
        .iter()
        .map(|e| {
            Ok(Throughput {
                label: match e["label"].as_str() {
                    Some(l) if l.starts_with("column") => "column rule + 9 detectors",
                    _ => "9 detectors",
                },
                rows: e["rows"].as_u64().context("rows")?,
                bytes: e["bytes"].as_u64().context("bytes")?,
                secs: e["secs"].as_f64().context("secs")?,
                masked: e["masked"].as_u64().context("masked")?,
            })
        })
        .collect()
}

fn json_engine(env: &Env, sizes: &Sizes) -> Result<Throughput> {
    println!("-- JSON masking engine, one core");
    let items = (sizes.people / 10).max(500);
    let out = json_line(
        &output(
            env.helper().args(["jsonmask", &items.to_string()]),
            "JSON masking engine",
        )?,
        "JSON masking engine",
    )?;
    Ok(Throughput {
        label: "JSON path + 9 detectors",
        rows: u64::from(items),
        bytes: out["bytes"].as_u64().context("bytes")?,
        secs: out["secs"].as_f64().context("secs")?,
        masked: out["masked"].as_u64().context("masked")?,
    })
}

/// The same destination (an echo server) from outside the gate and from a gated workload.
fn connect_cost(env: &mut Env, sizes: &Sizes) -> Result<Vec<(&'static str, Samples)>> {
    println!(
        "-- connect(): {} plain and {} redirected",
        sizes.connects, sizes.connects
    );
    let blocks = sizes.rounds * 2;
    let per_block = sizes.connects.div_ceil(blocks).to_string();
    let _echo = echo_server(env, CONNECT_SINK_PORT)?;
    let addr = format!("127.0.0.1:{CONNECT_SINK_PORT}");
    let mut plain = Samples::default();
    let mut redirected = Samples::default();
    for block in 0..blocks {
        for redirect in rotated(&[false, true], block) {
            let mut helper = env.helper();
            helper.args(["connect", &addr, &per_block]);
            if redirect {
                let mut cmd = env.gated("bench", "bench-sink:read:4h", &mut helper);
                let out = json_line(&output(&mut cmd, "redirected connect")?, "connect")?;
                redirected.extend(samples(&out, "samples_ns", 1e-3)?);
            } else {
                let out = json_line(&output(&mut helper, "plain connect")?, "connect")?;
                plain.extend(samples(&out, "samples_ns", 1e-3)?);
            }
        }
    }
    Ok(vec![
        ("plain (not gated)", plain),
        ("redirected by the gate", redirected),
    ])
}

/// Kills the echo server when the stage ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An echo server on `port`, outside the gate (the upstream of `bench-sink`).
fn echo_server(env: &Env, port: u16) -> Result<Reaped> {
    let mut echo = Reaped(
        env.helper()
            .args(["echo", &port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the echo server")?,
    );
    let mut ready = String::new();
    BufReader::new(echo.0.stdout.take().context("stdout")?).read_line(&mut ready)?;
    if ready.trim() != "listening" {
        bail!("the echo server on port {port} did not start");
    }
    Ok(echo)
}

fn idle(env: &mut Env, sizes: &Sizes) -> Result<Idle> {
    // Each proxied connection holds two descriptors in the agent (the workload's and the
    // upstream's), and the agent keeps 256 for everything else (its `RESERVED_FDS`): past
    // that it refuses new connections, so a host whose hard limit cannot be raised caps the
    // count.
    let connections = sizes
        .idle
        .min(usize::try_from(env.fd_limit.saturating_sub(256) / 2).unwrap_or(usize::MAX));
    if connections < sizes.idle {
        println!(
            "   (RLIMIT_NOFILE is {} and cannot be raised here: {connections} connections, not {})",
            env.fd_limit, sizes.idle
        );
    }
    println!("-- {connections} idle gated connections");
    let echo = echo_server(env, IDLE_SINK_PORT)?;
    // Let the sessions of earlier stages finish and the allocator settle.
    sleep(Duration::from_secs(2));
    let rss_before_kib = env.daemon_rss_kib()?;
    let mut helper = env.helper();
    let addr = format!("127.0.0.1:{IDLE_SINK_PORT}");
    helper.args(["idle", &addr, &connections.to_string()]);
    let mut child = env
        .gated("bench", "bench-sink:read:4h", &mut helper)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the idle-connection client")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    let opened: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("idle client said {line:?}"))?;
    // Idle for a moment, then read the agent's memory with every connection open.
    sleep(Duration::from_secs(2));
    let rss_kib = env.daemon_rss_kib()?;
    child.stdin.take().context("stdin")?.write_all(b"check\n")?;
    line.clear();
    stdout.read_line(&mut line)?;
    let after: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("idle client said {line:?}"))?;
    let status = child.wait()?;
    if !status.success() {
        bail!("the idle-connection client failed ({status})");
    }
    drop(echo);
    Ok(Idle {
        connections,
        wanted: sizes.idle,
        fd_limit: env.fd_limit,
        healthy_open: opened["healthy"].as_u64().unwrap_or(0),
        healthy_after: after["healthy"].as_u64().unwrap_or(0),
        rss_before_kib,
        rss_kib,
    })
}

/// The pgbench matrix: every script, protocol, client count and variant.
pub struct PgResults {
    cells: Vec<PgCell>,
}

impl PgResults {
    fn cell(&self, script: Script, proto: Proto, clients: u32, v: Variant) -> Option<&PgCell> {
        self.cells.iter().find(|c| {
            c.script == script && c.proto == proto && c.clients == clients && c.variant == v
        })
    }

    fn clients(&self) -> Vec<u32> {
        let mut clients: Vec<u32> = self.cells.iter().map(|c| c.clients).collect();
        clients.sort_unstable();
        clients.dedup();
        clients
    }

    pub fn tables(&self) -> Vec<Table> {
        let mut tables = Vec::new();
        for script in [Script::SelectOnly, Script::TpcB] {
            for proto in [Proto::Simple, Proto::Prepared] {
                let mut t = Table::new(
                    &format!("{}, {} protocol", script.label(), proto.flag()),
                    &[
                        "clients",
                        "variant",
                        "tps",
                        "vs direct",
                        "mean latency ms",
                        "p99 latency ms",
                        "proxy CPU µs per transaction",
                    ],
                );
                for c in self.clients() {
                    let direct = self
                        .cell(script, proto, c, Variant::Direct)
                        .map_or(f64::NAN, PgCell::tps);
                    for v in Variant::ALL {
                        let Some(cell) = self.cell(script, proto, c, v) else {
                            continue;
                        };
                        t.row(vec![
                            c.to_string(),
                            v.label().to_owned(),
                            fmt(cell.tps()),
                            format!("{:.2}", cell.tps() / direct),
                            fmt(cell.latency.mean()),
                            fmt(cell.latency.percentile(99.0)),
                            cell.cpu_us().map_or_else(|| "-".to_owned(), fmt),
                        ]);
                    }
                }
                tables.push(t);
            }
        }
        tables
    }

    /// Rows 1-3 of the targets: throughput against pgbouncer and direct, added p99.
    pub fn targets(&self, t: &mut Table) {
        let clients = self.clients();
        // 1. At least pgbouncer's throughput, every client count (every script and protocol).
        let mut worst = Vec::new();
        let mut all_ok = true;
        for &c in &clients {
            let mut min = f64::INFINITY;
            for script in [Script::SelectOnly, Script::TpcB] {
                for proto in [Proto::Simple, Proto::Prepared] {
                    if let (Some(f), Some(b)) = (
                        self.cell(script, proto, c, Variant::Full),
                        self.cell(script, proto, c, Variant::Bouncer),
                    ) {
                        min = min.min(f.tps() / b.tps());
                    }
                }
            }
            all_ok &= min >= 1.0;
            worst.push(format!("c={c}: {min:.2}x"));
        }
        t.row(vec![
            "full policy >= pgbouncer session mode tps, every client count".into(),
            format!("worst cell per client count: {}", worst.join(", ")),
            verdict(all_ok),
        ]);
        // 1b. The agent's CPU per -S transaction with full policy, against pgbouncer's.
        let mut parts = Vec::new();
        let mut ok = true;
        for proto in [Proto::Simple, Proto::Prepared] {
            for &c in &clients {
                let cpu = |v| {
                    self.cell(Script::SelectOnly, proto, c, v)
                        .and_then(PgCell::cpu_us)
                };
                if let (Some(f), Some(b)) = (cpu(Variant::Full), cpu(Variant::Bouncer)) {
                    ok &= f <= b;
                    parts.push(format!("{} c={c}: {} vs {}", proto.flag(), fmt(f), fmt(b)));
                }
            }
        }
        t.row(vec![
            "agent CPU per -S transaction with full policy <= pgbouncer's (µs)".into(),
            parts.join(", "),
            measured_verdict(ok, &parts),
        ]);
        // 2. 0.80 of direct at 8 clients, -S.
        let mut parts = Vec::new();
        let mut ok = true;
        for proto in [Proto::Simple, Proto::Prepared] {
            if let (Some(f), Some(d)) = (
                self.cell(Script::SelectOnly, proto, 8, Variant::Full),
                self.cell(Script::SelectOnly, proto, 8, Variant::Direct),
            ) {
                let r = f.tps() / d.tps();
                ok &= r >= 0.80;
                parts.push(format!("{}: {r:.2}", proto.flag()));
            }
        }
        t.row(vec![
            "full policy >= 0.80 of direct tps, -S, 8 clients".into(),
            parts.join(", "),
            measured_verdict(ok, &parts),
        ]);
        // 3. Added p99 per statement at one client (-S: one statement per transaction).
        let mut parts = Vec::new();
        let mut ok = true;
        for proto in [Proto::Simple, Proto::Prepared] {
            if let (Some(f), Some(d)) = (
                self.cell(Script::SelectOnly, proto, 1, Variant::Full),
                self.cell(Script::SelectOnly, proto, 1, Variant::Direct),
            ) {
                let added_us = (f.latency.percentile(99.0) - d.latency.percentile(99.0)) * 1000.0;
                ok &= added_us < 100.0;
                parts.push(format!("{}: {} µs", proto.flag(), fmt(added_us)));
            }
        }
        t.row(vec![
            "< 100 µs added p99 latency per statement, 1 client (-S)".into(),
            parts.join(", "),
            measured_verdict(ok, &parts),
        ]);
    }
}

impl Results {
    pub fn tables(&self) -> Vec<Table> {
        let mut tables = self.pg.tables();
        let mut t = Table::new(
            "Connection setup: connect() to the first result of SELECT 1 (SCRAM login)",
            &["variant", "connections", "p50 ms", "p99 ms", "mean ms"],
        );
        for (v, s) in &self.setup {
            t.row(vec![
                v.label().to_owned(),
                s.len().to_string(),
                fmt(s.percentile(50.0)),
                fmt(s.percentile(99.0)),
                fmt(s.mean()),
            ]);
        }
        tables.push(t);
        tables.push(masking_table(&self.masking));
        tables.push(engine_table(&self.engine));
        tables.push(http::table(&self.http));
        tables.push(json_table(&self.json_engine));
        let mut t = Table::new(
            "Kernel cost: the connect() system call alone",
            &["connect()", "samples", "p50 µs", "mean µs", "p99 µs"],
        );
        for (label, s) in &self.connect {
            t.row(vec![
                (*label).to_owned(),
                s.len().to_string(),
                fmt(s.percentile(50.0)),
                fmt(s.mean()),
                fmt(s.percentile(99.0)),
            ]);
        }
        tables.push(t);
        tables.push(self.idle.table());
        tables
    }

    /// Where we stand against each target the issue set.
    pub fn targets(&self) -> Table {
        let mut t = Table::new("Targets", &["target", "measured", "verdict"]);
        self.pg.targets(&mut t);
        // 4. Masking: the engine on one core, and masked results end to end.
        engine_target(&self.engine, &mut t);
        masking_target(&self.masking, &mut t);
        // Connection setup (connect to the first result, SCRAM), p50 against direct's.
        let p50 = |v: Variant| {
            self.setup
                .iter()
                .find(|s| s.0 == v)
                .map(|s| s.1.percentile(50.0))
        };
        let (text, ok) = match (p50(Variant::Full), p50(Variant::Direct)) {
            (Some(f), Some(d)) if d > 0.0 => (
                format!(
                    "{} ms vs {} ms direct ({:+.1}%)",
                    fmt(f),
                    fmt(d),
                    (f / d - 1.0) * 100.0
                ),
                f <= d * 1.1,
            ),
            _ => ("n/a".to_owned(), false),
        };
        t.row(vec![
            "connection setup p50 with full policy within 10% of direct".into(),
            text,
            verdict(ok),
        ]);
        // 5. Memory per idle connection.
        let per = self.idle.per_conn_kib();
        let healthy = self.idle.healthy_after == self.idle.connections as u64
            && self.idle.healthy_open == self.idle.connections as u64;
        let capped = if self.idle.connections < self.idle.wanted {
            format!(
                " (capped: RLIMIT_NOFILE {} allows no more: two descriptors each, 256 kept by the agent)",
                self.idle.fd_limit
            )
        } else {
            String::new()
        };
        t.row(vec![
            format!(
                "< 64 KiB per idle connection at {} connections, all healthy",
                self.idle.wanted
            ),
            format!(
                "{} KiB at {} connections{capped}, {}/{} healthy",
                fmt(per),
                self.idle.connections,
                self.idle.healthy_after,
                self.idle.connections
            ),
            verdict(per < 64.0 && healthy),
        ]);
        // 6. Redirected connect within 5 µs of a plain one.
        let p50 = |i: usize| {
            self.connect
                .get(i)
                .map_or(f64::NAN, |c| c.1.percentile(50.0))
        };
        let added = p50(1) - p50(0);
        t.row(vec![
            "redirected connect() within 5 µs of a plain one (p50)".into(),
            format!("{}{} µs", if added >= 0.0 { "+" } else { "" }, fmt(added)),
            verdict(added < 5.0),
        ]);
        http::target(&self.http, &mut t);
        t
    }
}
