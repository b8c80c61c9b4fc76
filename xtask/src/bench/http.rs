//! The HTTP stage: small JSON GETs over keep-alive HTTPS at 1, 8 and 32 concurrent clients,
//! four ways to the same origin (nginx serving one response on two ports):
//!
//! * direct: the client to the origin;
//! * nginx: the client to nginx as a TLS-terminating reverse proxy (keep-alive to the origin,
//!   verified TLS, its own Authorization header): what users would otherwise run;
//! * jitgate full policy: a gated workload to `bench-api` (TLS intercepted with the host CA,
//!   rules, the credential injected and scrubbed, the email masked by JSON path and detectors,
//!   every request recorded);
//! * jitgate tcp relay: a gated workload to `bench-api-relay` (TLS end to end, bytes relayed).
//!
//! The load comes from `jitgate-bench http` (one thread, keep-alive connections, every
//! request's latency); it counts masked answers, and the stage checks that masking happened
//! exactly where it should.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    Sizes,
    env::{DIR, Env, process_cpu_ns},
    stages::{json_line, output, rotated, samples},
    stats::{Samples, Table, fmt},
};
use crate::local::{detached, terminate, wait_port};

/// The origin, as `bench-api` (full policy) reaches it.
pub const ORIGIN_PORT: u16 = 27443;
/// The same origin, as `bench-api-relay` (tcp) reaches it.
pub const ORIGIN_RELAY_PORT: u16 = 27444;
/// nginx as a reverse proxy in front of the origin.
pub const NGINX_PROXY_PORT: u16 = 27445;

/// What the origin answers: one small JSON object with a value the gate masks.
const ORIGIN_BODY: &str = r#"{"id":7,"name":"Jane Doe","email":"jane@example.com","role":"reader","note":"nothing sensitive here"}"#;

fn dir() -> PathBuf {
    PathBuf::from(DIR).join("http")
}

/// The host CA's certificate as the bench daemon publishes it.
pub fn host_ca() -> PathBuf {
    PathBuf::from(DIR).join("ca.pem")
}

/// The two HTTP resources in the bench daemon's configuration.
pub fn resources() -> String {
    let d = dir();
    let d = d.display();
    format!(
        r#"[[resource]]
name = "bench-api"
protocol = "http"
address = "127.0.0.1:{ORIGIN_PORT}"
upstream_tls = "verify-full"
upstream_ca = "{d}/ca.pem"
upstream_server_name = "origin.bench"
[resource.credentials.read]
secret_file = "{DIR}/secrets/api-token"
[[resource.rule]]
paths = ["/admin/**"]
action = "deny"
[[resource.rule]]
methods = ["DELETE"]
action = "approve"
[[resource.mask]]
paths = ["$..email"]
strategy = "partial"
[[resource.mask]]
detectors = ["email", "card", "ssn", "phone", "iban", "aws_key", "jwt", "private_key", "bearer"]
strategy = "redact"

[[resource]]
name = "bench-api-relay"
protocol = "tcp"
address = "127.0.0.1:{ORIGIN_RELAY_PORT}"
"#
    )
}

/// Certificates for the origin and the credential file, before the daemon reads its config.
pub fn prepare(env: &Env) -> Result<()> {
    output(
        env.helper().args(["certs", &dir().display().to_string()]),
        "the origin's certificates",
    )?;
    let secrets = PathBuf::from(DIR).join("secrets");
    fs::create_dir_all(&secrets)?;
    fs::set_permissions(&secrets, fs::Permissions::from_mode(0o700))?;
    let token = secrets.join("api-token");
    fs::write(&token, "bench-api-token\n")?;
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// One nginx instance, stopped when the stage ends, however it ends.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        terminate(self.0.id());
        let _ = self.0.wait();
    }
}

impl Nginx {
    /// CPU time the instance has used, ns: the master (with the workers it has reaped) and
    /// each live worker.
    fn cpu_ns(&self) -> Option<u64> {
        let master = self.0.id();
        let mut total = process_cpu_ns(master, true)?;
        for worker in children(master) {
            total += process_cpu_ns(worker, false).unwrap_or(0);
        }
        Some(total)
    }
}

/// The origin and, in an instance of its own so that its CPU time can be read apart, nginx
/// as the reverse proxy users would otherwise run. Both as Debian ships nginx
/// (`worker_processes auto`), with access logs off.
fn start_nginx() -> Result<(Nginx, Nginx)> {
    let d = dir();
    for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        fs::create_dir_all(d.join("tmp").join(t))?;
    }
    let dd = d.display();
    let origin = format!(
        r#"    server {{
        listen 127.0.0.1:{ORIGIN_PORT} ssl;
        listen 127.0.0.1:{ORIGIN_RELAY_PORT} ssl;
        location / {{
            default_type application/json;
            return 200 '{ORIGIN_BODY}';
        }}
    }}"#
    );
    let proxy = format!(
        r#"    upstream origin {{
        server 127.0.0.1:{ORIGIN_PORT};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{NGINX_PROXY_PORT} ssl;
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-api-token";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {dd}/ca.pem;
            proxy_ssl_name origin.bench;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}"#
    );
    let start = |name: &str, servers: &str, ports: &[u16]| -> Result<Nginx> {
        let conf = d.join(format!("nginx-{name}.conf"));
        fs::write(
            &conf,
            format!(
                r#"# Written by `cargo xtask bench`.
daemon off;
user root;
worker_processes auto;
pid {dd}/nginx-{name}.pid;
error_log {dd}/nginx-{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dd}/tmp/body;
    proxy_temp_path {dd}/tmp/proxy;
    fastcgi_temp_path {dd}/tmp/fastcgi;
    uwsgi_temp_path {dd}/tmp/uwsgi;
    scgi_temp_path {dd}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    ssl_certificate {dd}/cert.pem;
    ssl_certificate_key {dd}/key.pem;
{servers}
}}
"#
            ),
        )?;
        let child = detached(
            Command::new("nginx").arg("-c").arg(&conf),
            &d.join(format!("nginx-{name}.log")),
        )
        .context("starting nginx (is it installed? `cargo xtask setup`)")?;
        let nginx = Nginx(child);
        for port in ports {
            wait_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).with_context(
                || {
                    format!(
                        "nginx ({name}) did not listen on {port}:\n{}",
                        fs::read_to_string(d.join(format!("nginx-{name}-error.log")))
                            .unwrap_or_default()
                    )
                },
            )?;
        }
        Ok(nginx)
    };
    let origin = start("origin", &origin, &[ORIGIN_PORT, ORIGIN_RELAY_PORT])?;
    let proxy = start("proxy", &proxy, &[NGINX_PROXY_PORT])?;
    Ok((origin, proxy))
}

/// The processes `pid` started (nginx's workers), from `/proc/<pid>/task/*/children`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVariant {
    Direct,
    Nginx,
    Full,
    Relay,
}

impl HttpVariant {
    const ALL: [Self; 4] = [Self::Direct, Self::Nginx, Self::Full, Self::Relay];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Nginx => "nginx (TLS reverse proxy)",
            Self::Full => "jitgate full policy (TLS intercepted)",
            Self::Relay => "jitgate tcp relay",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Direct | Self::Full => ORIGIN_PORT,
            Self::Nginx => NGINX_PROXY_PORT,
            Self::Relay => ORIGIN_RELAY_PORT,
        }
    }
}

/// One variant at one client count, over all rounds.
pub struct HttpCell {
    pub clients: u32,
    pub variant: HttpVariant,
    pub requests: u64,
    pub secs: f64,
    /// Per-request latency, µs.
    pub latency: Samples,
    pub masked: u64,
    /// CPU time the proxy in the path (nginx's reverse proxy, or the host agent) spent over
    /// the variant's runs, ns; none for direct.
    pub proxy_cpu_ns: Option<u64>,
}

impl HttpCell {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs.max(f64::MIN_POSITIVE)
    }

    /// The proxy's CPU time per request, µs: the steadier measure of its cost, since the
    /// load, the origin and the proxy share the machine's cores.
    fn cpu_per_request_us(&self) -> Option<f64> {
        self.proxy_cpu_ns
            .map(|ns| ns as f64 / 1e3 / self.requests.max(1) as f64)
    }
}

pub fn stage(env: &mut Env, sizes: &Sizes) -> Result<Vec<HttpCell>> {
    println!(
        "-- http: small JSON GETs over keep-alive HTTPS, {:?} clients x 4 variants x {} round(s) of {} s",
        sizes.clients, sizes.rounds, sizes.secs
    );
    let (_origin, proxy) = start_nginx()?;
    let agent = env.daemon_pid()?;
    let origin_ca = dir().join("ca.pem").display().to_string();
    let host_ca = host_ca().display().to_string();
    let mut cells = Vec::new();
    for (n, &clients) in sizes.clients.iter().enumerate() {
        let first = cells.len();
        for variant in HttpVariant::ALL {
            cells.push(HttpCell {
                clients,
                variant,
                requests: 0,
                secs: 0.0,
                latency: Samples::default(),
                masked: 0,
                proxy_cpu_ns: None,
            });
        }
        for round in 0..sizes.rounds {
            for variant in rotated(&HttpVariant::ALL, n + round) {
                let mut helper = env.helper();
                helper.args([
                    "http",
                    &format!("https://127.0.0.1:{}/v1/people/7", variant.port()),
                    &clients.to_string(),
                    &sizes.secs.to_string(),
                    &origin_ca,
                    &host_ca,
                ]);
                let mut cmd = match variant {
                    HttpVariant::Direct | HttpVariant::Nginx => helper,
                    HttpVariant::Full => env.gated("bench", "bench-api:read:4h", &mut helper),
                    HttpVariant::Relay => {
                        env.gated("bench", "bench-api-relay:read:4h", &mut helper)
                    }
                };
                // The proxy in the path: its CPU time over the run (the gate's includes
                // starting the task's grant and session, a few ms in a run of seconds).
                let proxy_cpu = || match variant {
                    HttpVariant::Direct => Some(None),
                    HttpVariant::Nginx => proxy.cpu_ns().map(Some),
                    HttpVariant::Full | HttpVariant::Relay => {
                        process_cpu_ns(agent, false).map(Some)
                    }
                };
                let unreadable =
                    || format!("{}: the proxy's CPU time is unreadable", variant.label());
                let cpu_before = proxy_cpu().with_context(unreadable)?;
                let out = json_line(&output(&mut cmd, variant.label())?, variant.label())?;
                let cpu_after = proxy_cpu().with_context(unreadable)?;
                let cell = cells[first..]
                    .iter_mut()
                    .find(|c| c.variant == variant)
                    .context("cell")?;
                cell.requests += out["requests"].as_u64().unwrap_or(0);
                cell.secs += out["secs"].as_f64().unwrap_or(0.0);
                cell.masked += out["masked"].as_u64().unwrap_or(0);
                cell.latency.extend(samples(&out, "samples_us", 1.0)?);
                if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
                    if after <= before {
                        bail!(
                            "{} at {clients} clients: no CPU time counted for the proxy",
                            variant.label()
                        );
                    }
                    *cell.proxy_cpu_ns.get_or_insert(0) += after - before;
                }
            }
        }
        // The bench checks itself: every answer through the full policy masked, none other.
        for c in &cells[first..] {
            let should = c.variant == HttpVariant::Full;
            if c.requests == 0 {
                bail!(
                    "{} at {clients} clients: no request completed",
                    c.variant.label()
                );
            }
            if should && c.masked != c.requests || !should && c.masked != 0 {
                bail!(
                    "{} at {clients} clients: {} of {} answers masked",
                    c.variant.label(),
                    c.masked,
                    c.requests
                );
            }
        }
        let line: Vec<String> = cells[first..]
            .iter()
            .map(|c| format!("{} {} req/s", c.variant.label(), fmt(c.rps())))
            .collect();
        println!("   c={clients}: {}", line.join(", "));
    }
    Ok(cells)
}

pub fn table(cells: &[HttpCell]) -> Table {
    let mut t = Table::new(
        "HTTP: small JSON GETs over keep-alive HTTPS (origin: nginx)",
        &[
            "clients",
            "variant",
            "requests/s",
            "vs direct",
            "p50 µs",
            "p99 µs",
            "added p50 µs",
            "added p99 µs",
            "proxy CPU µs per request",
        ],
    );
    let mut clients: Vec<u32> = cells.iter().map(|c| c.clients).collect();
    clients.sort_unstable();
    clients.dedup();
    for c in clients {
        let Some(direct) = cell(cells, c, HttpVariant::Direct) else {
            continue;
        };
        for v in HttpVariant::ALL {
            let Some(cell) = cell(cells, c, v) else {
                continue;
            };
            t.row(vec![
                c.to_string(),
                v.label().to_owned(),
                fmt(cell.rps()),
                format!("{:.2}", cell.rps() / direct.rps()),
                fmt(cell.latency.percentile(50.0)),
                fmt(cell.latency.percentile(99.0)),
                fmt(cell.latency.percentile(50.0) - direct.latency.percentile(50.0)),
                fmt(cell.latency.percentile(99.0) - direct.latency.percentile(99.0)),
                cell.cpu_per_request_us()
                    .map_or_else(|| "-".to_owned(), fmt),
            ]);
        }
    }
    t
}

fn cell(cells: &[HttpCell], clients: u32, v: HttpVariant) -> Option<&HttpCell> {
    cells
        .iter()
        .find(|c| c.clients == clients && c.variant == v)
}

/// The issue's target: the gate with full policy at least as fast as nginx, every client
/// count.
pub fn target(cells: &[HttpCell], t: &mut Table) {
    let mut clients: Vec<u32> = cells.iter().map(|c| c.clients).collect();
    clients.sort_unstable();
    clients.dedup();
    let mut parts = Vec::new();
    let mut ok = !clients.is_empty();
    for c in clients {
        if let (Some(f), Some(n)) = (
            cell(cells, c, HttpVariant::Full),
            cell(cells, c, HttpVariant::Nginx),
        ) {
            let r = f.rps() / n.rps();
            ok &= r >= 1.0;
            parts.push(format!("c={c}: {r:.2}x"));
        }
    }
    t.row(vec![
        "HTTP: full policy >= nginx reverse proxy requests/s, every client count".into(),
        parts.join(", "),
        if ok { "met" } else { "MISSED" }.to_owned(),
    ]);
    // What decides the above on a machine the load, the origin and the proxy share: the
    // proxy's own CPU per request.
    let mut parts = Vec::new();
    let mut ok = true;
    for c in cells.iter().filter(|c| c.variant == HttpVariant::Full) {
        if let (Some(f), Some(n)) = (
            c.cpu_per_request_us(),
            cell(cells, c.clients, HttpVariant::Nginx).and_then(HttpCell::cpu_per_request_us),
        ) {
            ok &= f <= n;
            parts.push(format!("c={}: {} vs {} µs", c.clients, fmt(f), fmt(n)));
        }
    }
    // Written whatever was measured, so that a figure gone missing shows (as n/a, MISSED).
    t.row(vec![
        "HTTP: agent CPU per request with full policy <= nginx's as a reverse proxy".into(),
        if parts.is_empty() {
            "n/a".to_owned()
        } else {
            parts.join(", ")
        },
        if ok && !parts.is_empty() {
            "met"
        } else {
            "MISSED"
        }
        .to_owned(),
    ]);
}
