//! The host agent: starts every part in an order that never leaves the gate open, serves
//! until SIGTERM/SIGINT (or `jitgate gate detach`), reloads on SIGHUP.
//!
//! Start-up order:
//! 1. config validated, state store opened (and migrated), single-instance lock taken;
//! 2. proxy listeners bound, so redirected connections have somewhere to land;
//! 3. resource names resolved, kernel programs loaded and swapped into the pinned links
//!    (adopting a previous agent's gate without a gap);
//! 4. grants restored from the store, tasks resumed, control socket opened.
//!
//! Stopping leaves the programs attached: gated workloads are refused, not let through.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures_util::future::BoxFuture;
use jitgate_common::stats;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    config::{Config, DaemonConfig, Egress, SharedConfig, StoreConfig},
    control::{
        api::{StatusReport, StoreStatus},
        server,
        service::{self, ControlService, Host, ReloadSummary, SessionCounts},
    },
    destinations::Destinations,
    gate::{self, Gate, GateSettings},
    grants::GrantEngine,
    identity::{Caller, Workloads},
    model::Timestamp,
    ops,
    protocol::{Protocols, Services},
    proxy::{self, ProxyContext, Registry, Routes, attribute::Kernel},
    store::{
        PostgresStore, SharedStore, SqliteStore, Store as _, StoreError,
        audit::{self, ConfigReloaded, DaemonStarted, DaemonStopped, Event, GateDetached},
    },
    tasks::Tasks,
};

/// How long start-up waits for a shared store before it goes on with the gate closed.
const STORE_WAIT: Duration = Duration::from_secs(5);

/// After `drain_timeout`, how long shutdown still waits for sessions to record how they ended.
const RECORD_GRACE: Duration = Duration::from_secs(5);

/// The running agent as reload, status, detach and the health checks see it. The control
/// service and the operations endpoint reach it only through the narrow traits it
/// implements ([`Host`], [`ops::Vitals`]), never its fields.
pub struct Daemon {
    config: SharedConfig,
    store: SharedStore,
    engine: GrantEngine,
    workloads: Workloads,
    gate: Arc<Mutex<Gate>>,
    destinations: Arc<Destinations>,
    registry: Registry,
    started_at: Timestamp,
    shutdown: CancellationToken,
    listen: Vec<SocketAddr>,
}

fn gate_settings(config: &Config) -> GateSettings {
    GateSettings {
        pin_dir: config.daemon.bpf_pin_dir.clone(),
        gate_cgroup: config.daemon.gate_cgroup.clone(),
        service_cgroups: config
            .workloads
            .iter()
            .filter_map(|w| w.cgroup.clone())
            .collect(),
        gated_uids: config.workloads.iter().filter_map(|w| w.uid).collect(),
        kernel_log: config.daemon.kernel_log,
        proxy_v4: config.daemon.proxy_listen,
        proxy_v6: config.daemon.proxy_listen6,
        egress: config.daemon.egress,
    }
}

/// Sets `new` to `running` and says whether they differed.
fn keep_running<T: Clone + PartialEq>(running: &T, new: &mut T) -> bool {
    let changed = running != new;
    *new = running.clone();
    changed
}

/// The keys a reload cannot change (they name things the running agent holds open, or were
/// read once at start-up): keeps their running values in `new` and returns the keys that
/// the file changed, as reported in `restart_required_for`. The one list of them (besides the
/// `[console]` table, compared whole in `reload_inner`).
fn keep_restart_only(running: &DaemonConfig, new: &mut DaemonConfig) -> Vec<&'static str> {
    let (a, b) = (running, new);
    let keys = [
        ("state_dir", keep_running(&a.state_dir, &mut b.state_dir)),
        ("socket", keep_running(&a.socket, &mut b.socket)),
        (
            "proxy_listen",
            // Both, always: `|` does not stop at the first change.
            keep_running(&a.proxy_listen, &mut b.proxy_listen)
                | keep_running(&a.proxy_listen6, &mut b.proxy_listen6),
        ),
        (
            "gate_cgroup",
            keep_running(&a.gate_cgroup, &mut b.gate_cgroup),
        ),
        (
            "bpf_pin_dir",
            keep_running(&a.bpf_pin_dir, &mut b.bpf_pin_dir),
        ),
        ("kernel_log", keep_running(&a.kernel_log, &mut b.kernel_log)),
        (
            "metrics_listen",
            keep_running(&a.metrics_listen, &mut b.metrics_listen),
        ),
        (
            "worker_threads",
            keep_running(&a.worker_threads, &mut b.worker_threads),
        ),
        (
            "console_listen",
            keep_running(&a.console_listen, &mut b.console_listen),
        ),
        ("store", keep_running(&a.store, &mut b.store)),
    ];
    keys.into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
}

/// Takes an exclusive lock on `state_dir` so two agents never share state (and so that
/// `jitgated --retire-spool` never runs beside an agent, however far it got in starting).
pub fn lock_state_dir(state_dir: &Path) -> anyhow::Result<File> {
    crate::store::sqlite::create_private_dir(state_dir)?;
    let path = state_dir.join("jitgated.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another jitgated already uses state_dir {}; stop it first",
            state_dir.display()
        );
    }
    Ok(file)
}

impl Daemon {
    /// Re-reads the config file. An invalid file changes nothing.
    pub async fn reload(&self) -> anyhow::Result<ReloadSummary> {
        ops::notify::reloading();
        let result = self.reload_inner().await;
        ops::notify::ready(match &result {
            Ok(_) => "serving; configuration reloaded",
            Err(_) => "serving; the last reload was rejected (see the log)",
        });
        result
    }

    async fn reload_inner(&self) -> anyhow::Result<ReloadSummary> {
        let old = self.config.get();
        let mut new = Config::load(&old.path)?;
        let mut restart = keep_restart_only(&old.daemon, &mut new.daemon);
        // The console holds its listener, secret and sessions from start-up.
        if keep_running(&old.console, &mut new.console) {
            restart.push("console");
        }
        if !restart.is_empty() {
            warn!(keys = ?restart, "these settings only change on restart; keeping the running values");
        }
        // Check the new rules compile before switching anything.
        self.destinations.compile(&new)?;
        let services: Vec<String> = new
            .workloads
            .iter()
            .filter_map(|w| w.cgroup.clone())
            .collect();
        let uids: Vec<u32> = new.workloads.iter().filter_map(|w| w.uid).collect();
        let egress = new.daemon.egress;
        let resources: Vec<String> = new.resources.iter().map(|r| r.name.clone()).collect();
        self.config.set(new);
        if let Err(e) = crate::http::kubeconfig::publish(&self.config.get()) {
            warn!(error = %e, "cannot publish the kubeconfig for gated workloads");
        }
        self.workloads.reconfigure(&self.config.get());
        // The stricter side first: a move to `deny` is published before the new rules, a
        // move to `allow` only once the new resources' addresses are in the kernel (resolving
        // them can take seconds, during which they would otherwise be plain egress).
        {
            let mut gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            gate.sync_targets(&services, &uids)?;
            if egress == Egress::Deny {
                gate.update_settings(egress)?;
            }
        }
        self.destinations.resolve_all().await;
        self.destinations.install(&self.config.get())?;
        if egress == Egress::Allow {
            self.gate
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update_settings(egress)?;
        }
        let ended = self.registry.end_resources_not_in(&resources);
        let revoked = self.engine.end_unauthorized().await?;
        let summary = ReloadSummary {
            config: self.config.get().path.display().to_string(),
            resources,
            sessions_ended: ended,
            grants_revoked: revoked,
            restart_required_for: restart.into_iter().map(str::to_owned).collect(),
        };
        let reloaded = ConfigReloaded {
            config: summary.config.clone(),
            resources: summary.resources.clone(),
            sessions_ended: summary.sessions_ended,
            grants_revoked: summary.grants_revoked.clone(),
            restart_required_for: summary.restart_required_for.clone(),
        };
        self.store
            .append_audit("jitgated".into(), Event::ConfigReloaded(reloaded))
            .await?;
        info!(
            sessions_ended = ended,
            grants_revoked = summary.grants_revoked.len(),
            "configuration reloaded"
        );
        Ok(summary)
    }

    /// Removes the gate from the kernel, then stops the agent.
    pub fn detach(&self) -> anyhow::Result<Vec<PathBuf>> {
        let pin_dir = self.config.get().daemon.bpf_pin_dir.clone();
        // Held links would stay attached (and be pinned again) after their pins go.
        self.gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release();
        let removed = gate::detach(&pin_dir)?;
        self.store
            .submit_audit("root".into(), Event::GateDetached(GateDetached { pin_dir }));
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            shutdown.cancel();
        });
        Ok(removed)
    }

    pub async fn status(&self, caller: &Caller) -> StatusReport {
        let config = self.config.get();
        let (attached, prefixes, counters) = {
            let gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            (
                gate.attached_targets(),
                gate.installed().len(),
                gate.counters().unwrap_or_default(),
            )
        };
        let health = ops::health::check_all(self).await;
        let pending = health.pending_requests.unwrap_or(0);
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at: self.started_at,
            config: config.path.display().to_string(),
            gate_cgroup: config.daemon.gate_cgroup.clone(),
            pin_dir: config.daemon.bpf_pin_dir.display().to_string(),
            attached,
            problems: health
                .checks
                .iter()
                .filter_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.name)))
                .collect(),
            egress: match config.daemon.egress {
                Egress::Deny => "deny".into(),
                Egress::Allow => "allow".into(),
            },
            proxy_listen: self.listen.iter().map(ToString::to_string).collect(),
            destination_prefixes: prefixes,
            kernel_counters: ops::metrics::kernel_status(&counters),
            live_grants: self.engine.live_count(),
            pending_requests: pending,
            open_sessions: self.registry.len(),
            resources: config.resources.iter().map(|r| r.name.clone()).collect(),
            identities: config
                .workloads
                .iter()
                .map(|w| w.identity.clone())
                .collect(),
            caller: caller.actor().to_string(),
            store_writes: self.store.writes().and_then(|w| w.get()),
            store_backlog: self.store.writes().map_or(0, |w| w.backlog() as u64),
            store: self.store.health().map(|h| {
                let h = h.get();
                let now = std::time::Instant::now();
                StoreStatus {
                    state: h.state,
                    since: h.since,
                    // The engine's word: the store confirmed *and* the live grants
                    // reloaded on this connection.
                    available: h.available(now) && self.engine.store_available().is_ok(),
                    confirmed_ms_ago: h.confirmed.map(|at| {
                        u64::try_from(now.saturating_duration_since(at).as_millis())
                            .unwrap_or(u64::MAX)
                    }),
                    lease_secs: h.lease.as_secs(),
                    error: h.error,
                    permanent: h.permanent,
                    url: h.url,
                    spool: h.spool,
                    durability: h.durability,
                }
            }),
        }
    }
}

impl Host for Daemon {
    fn status<'a>(&'a self, caller: &'a Caller) -> BoxFuture<'a, StatusReport> {
        Box::pin(Daemon::status(self, caller))
    }

    fn reload(&self) -> BoxFuture<'_, anyhow::Result<ReloadSummary>> {
        Box::pin(Daemon::reload(self))
    }

    fn detach(&self) -> anyhow::Result<Vec<PathBuf>> {
        Daemon::detach(self)
    }
}

impl ops::Vitals for Daemon {
    fn gate_pinned(&self) -> Result<(), String> {
        self.gate.lock().map_or_else(
            |_| Err("the gate's state is poisoned by a panic".to_owned()),
            |g| g.check_pinned(),
        )
    }

    fn pending_requests(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        self.store.count_pending()
    }

    fn store_writes(&self) -> Result<(), String> {
        self.store
            .writes()
            .map_or(Ok(()), |w| w.check().map_err(|e| e.to_string()))
    }

    fn kernel_counters(&self) -> Option<[u64; stats::COUNT as usize]> {
        self.gate.lock().ok().and_then(|g| g.counters().ok())
    }

    fn grants_active(&self) -> usize {
        self.engine.live_count()
    }

    fn sessions_open(&self) -> usize {
        self.registry.len()
    }
}

impl SessionCounts for Registry {
    fn bytes(&self, id: &str) -> Option<(u64, u64)> {
        self.counts(id)
    }
}

/// Keeps the programs on the gated cgroups when they are removed or made anew (a service
/// restarted by systemd gets a fresh cgroup): checked every 100 ms, since between the new
/// cgroup and the next check a service could run ungated. Gating a service by moving it
/// under the gate root (`Slice=jitgate.slice`) or by `uid` has no such window.
///
/// The same tick puts back any pin removed behind the agent's back: the agent holds its links
/// open, so the gate stays closed meanwhile, but a crash before the pin is back would open it.
fn spawn_target_watch(gate: Arc<Mutex<Gate>>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Said once per distinct failure, not ten times a second.
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let mut held = gate.lock().unwrap_or_else(PoisonError::into_inner);
            match held.repin() {
                Ok(restored) if restored.is_empty() => {}
                Ok(restored) => warn!(
                    pins = ?restored,
                    "pins were removed behind the agent's back; pinned again"
                ),
                Err(e) => error!(error = %format!("{e:#}"), "cannot pin the gate again"),
            }
            match held.reattach_moved() {
                Ok(false) => failing = None,
                Ok(true) => {
                    failing = None;
                    warn!(
                        "a gated cgroup was removed or made anew; the programs are attached again"
                    );
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    if failing.as_ref() != Some(&e) {
                        error!(error = %e, "cannot attach to a gated cgroup again");
                        failing = Some(e);
                    }
                }
            }
        }
    });
}

/// Deletes session records older than `session_retention`, hourly. The audit log is kept.
fn spawn_retention(store: SharedStore, config: SharedConfig, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let retention = config.get().daemon.session_retention;
            let cutoff = Timestamp(Timestamp::now().millis() - retention.as_millis() as i64);
            match store.prune_sessions(cutoff).await {
                Ok(0) => {}
                Ok(n) => info!(sessions = n, "pruned session records past retention"),
                Err(e) => warn!(error = %e, "pruning session records failed"),
            }
        }
    });
}

/// Runs the host agent until it is told to stop.
pub async fn run(config: Config, worker_threads: usize) -> anyhow::Result<()> {
    info!(worker_threads, "host agent starting");
    // What the machine lacks is said first, in one sentence, before anything else can fail
    // for the same reason with a less useful message.
    crate::gate::preflight::check()?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // The proxy's agent-wide connection cap is derived from the soft limit: raise it first.
    match crate::protocol::limits::raise_fd_limit() {
        Ok(fds) => info!(fds, "descriptor limit"),
        Err(e) => warn!(error = %e, "cannot read or raise the descriptor limit"),
    }

    let _lock = lock_state_dir(&config.daemon.state_dir)?;
    let store: SharedStore = match &config.daemon.store {
        StoreConfig::Sqlite => Arc::new(SqliteStore::open(&config.daemon.state_dir)?),
        StoreConfig::Postgres(options) => {
            // Never fails for want of the server: the agent then starts with the gate closed
            // and no grants, and opens once the store is reached (see `store::health`).
            let store = PostgresStore::start(options, &config.daemon.state_dir)?;
            info!(host_id = %store.host_id(), "state store: shared PostgreSQL");
            let reached = tokio::time::timeout(STORE_WAIT, async {
                let Some(health) = store.health() else { return };
                let mut seen = health.subscribe();
                let _ = seen
                    .wait_for(|h| h.available(std::time::Instant::now()))
                    .await;
            })
            .await;
            if reached.is_err() {
                let why = store.health().map(|h| h.get().error).unwrap_or_default();
                warn!(
                    error = why.as_deref().unwrap_or("no answer"),
                    "the shared state store is out of reach: starting with the gate closed and no grants; retrying"
                );
            }
            Arc::new(store)
        }
    };
    match store.close_orphan_sessions().await {
        Ok(0) => {}
        Ok(orphans) => info!(
            sessions = orphans,
            "closed sessions left open by a previous run"
        ),
        // The shared store closes them itself once it is reached.
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => return Err(e.into()),
    }

    // The operations endpoint binds first: a port clash is a start-up error, not a surprise
    // found later by a probe. The recorder goes in before anything can count.
    let ops_endpoint = match config.daemon.metrics_listen {
        Some(addr) => Some((ops::http::bind(addr).await?, ops::metrics::install()?)),
        None => None,
    };
    let console_listener = match &config.console {
        Some(console) => Some(crate::console::bind(console).await?),
        None => None,
    };

    let proxy_ports: std::collections::BTreeSet<u16> = std::iter::once(config.daemon.proxy_listen)
        .chain(config.daemon.proxy_listen6)
        .map(|a| a.port())
        .collect();
    gate::ports::reserve(&proxy_ports)?;
    let listeners = proxy::bind(config.daemon.proxy_listen, config.daemon.proxy_listen6)
        .await
        .map_err(|e| {
            let why = e.downcast_ref::<std::io::Error>().and_then(|io| {
                gate::ports::explain_bind_failure(config.daemon.proxy_listen.port(), io)
            });
            match why {
                Some(why) => e.context(why),
                None => e,
            }
        })?;
    let listen: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();

    let shared = SharedConfig::new(config.clone());
    // Subscribed before anything else is recorded, so no event of this run is missed.
    crate::webhooks::spawn(&store, shared.clone(), shutdown.clone());
    let routes = Routes::default();
    let destinations = Arc::new(Destinations::new(shared.clone(), routes.clone())?);
    destinations.resolve_all().await;
    let trie = destinations.compile(&config)?;
    let settings = gate_settings(&config);
    let (mut gate, conns) = tokio::task::spawn_blocking(move || Gate::open(settings, trie))
        .await
        .context("gate start-up task")??;
    gate.spawn_kernel_logger()?;
    let mount = gate.cgroup_mount().to_owned();
    let gate = Arc::new(Mutex::new(gate));
    destinations.attach(gate.clone());
    destinations.install(&config)?;
    destinations.clone().spawn(shutdown.clone());

    let workloads = Workloads::new(&mount, &config);
    if let Some(events) = gate
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take_events()
    {
        crate::refusals::spawn(events, workloads.clone(), store.clone(), shutdown.clone());
    }
    let engine = GrantEngine::start(store.clone(), shared.clone(), shutdown.clone()).await?;
    let tasks = Tasks::start(
        store.clone(),
        engine.clone(),
        workloads.clone(),
        shared.clone(),
        mount,
        shutdown.clone(),
    )
    .await?;
    let registry = Registry::default();
    let ca = crate::inspect::tls::LocalCa::load_or_create(
        &config.daemon.state_dir.join("tls"),
        &config.daemon.ca_cert,
    )
    .context("preparing the host-local CA")?;
    let ca = Arc::new(ca);
    if let Err(e) = crate::http::kubeconfig::publish(&config) {
        warn!(error = %e, "cannot publish the kubeconfig for gated workloads");
    }
    let mask_key = audit::secret_key(&config.daemon.state_dir, "mask.key")?;
    spawn_retention(store.clone(), shared.clone(), shutdown.clone());
    spawn_target_watch(gate.clone(), shutdown.clone());

    let services = Arc::new(Services {
        config: shared.clone(),
        engine: engine.clone(),
        store: store.clone(),
        registry: registry.clone(),
        ca: Some(ca.clone()),
        mask_key,
        shutdown: shutdown.clone(),
        limits: crate::protocol::limits::Limits::default(),
        refusals: crate::refusals::ProxyRefusals::default(),
        rates: crate::protocol::rate::Rates::default(),
        buffers: crate::protocol::buffers::Buffers::new(
            config.daemon.limits.buffer_budget,
            config.daemon.limits.buffer_share,
        ),
        holds: crate::protocol::hold::Holds::default(),
    });
    let proxy_ctx = Arc::new(ProxyContext {
        attributor: Arc::new(Kernel {
            conns,
            workloads: workloads.clone(),
        }),
        routes,
        protocols: Protocols::start(&services),
        services,
    });
    proxy::serve(listeners, proxy_ctx, tracker.clone());

    let control = server::bind(
        &config.daemon.socket,
        config.daemon.socket_mode,
        config.daemon.socket_group.as_deref(),
    )?;
    let daemon = Arc::new(Daemon {
        config: shared.clone(),
        store: store.clone(),
        engine: engine.clone(),
        workloads: workloads.clone(),
        gate,
        destinations,
        registry: registry.clone(),
        started_at: Timestamp::now(),
        shutdown: shutdown.clone(),
        listen,
    });
    let service = ControlService::new(service::Parts {
        config: shared,
        engine,
        store: store.clone(),
        tasks: Arc::new(tasks),
        sessions: Arc::new(registry),
        host: daemon.clone(),
    });
    if let (Some(listener), Some(console)) = (console_listener, &config.console) {
        let console = crate::console::Console::new(console, service.clone(), ca)
            .context("starting the web console")?;
        crate::console::serve(listener, Arc::new(console), shutdown.clone(), &tracker);
    }
    server::serve(
        control,
        service,
        workloads,
        shutdown.clone(),
        tracker.clone(),
    );
    let started = Event::DaemonStarted(DaemonStarted {
        pid: std::process::id(),
    });
    match store.append_audit("jitgated".into(), started).await {
        Ok(()) => {}
        Err(StoreError::Unavailable(why)) => {
            warn!(error = %why, "daemon.started not recorded: the shared state store is out of reach");
        }
        Err(e) => return Err(e.into()),
    }
    if let Some((listener, handle)) = ops_endpoint {
        ops::http::serve(listener, daemon.clone(), handle, shutdown.clone(), &tracker);
    }
    ops::notify::spawn_watchdog(daemon.clone(), shutdown.clone());
    info!(
        socket = %config.daemon.socket.display(),
        proxy = ?daemon.listen,
        "jitgated ready"
    );
    ops::notify::ready("serving: the gate is attached and the proxy listens");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                if let Err(e) = daemon.reload().await {
                    error!(error = %format!("{e:#}"), "reload rejected; the running configuration stays");
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
    ops::notify::stopping();
    let drain = daemon.config.get().daemon.drain_timeout;
    info!(
        sessions = daemon.registry.len(),
        drain_timeout = ?drain,
        "no new connections; sessions finish what is in flight, then end with a protocol error"
    );
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(drain + RECORD_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("some sessions did not finish recording before the drain timeout");
    }
    let _ = store
        .append_audit("jitgated".into(), Event::DaemonStopped(DaemonStopped {}))
        .await;
    store.flush().await.ok();
    let _ = std::fs::remove_file(&config.daemon.socket);
    info!("stopped; the gate stays closed while jitgated is down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(daemon: &str) -> Config {
        Config::from_toml(Path::new("t.toml"), &format!("[daemon]\n{daemon}\n"))
            .expect("test config")
    }

    #[test]
    fn reload_keeps_every_restart_only_key() {
        let running = config("");
        let mut new = config(
            r#"
socket = "/tmp/other.sock"
proxy_listen6 = "off"
metrics_listen = "127.0.0.1:9187"
worker_threads = 3
hold_timeout = "7s"
"#,
        );
        let keys = keep_restart_only(&running.daemon, &mut new.daemon);
        assert_eq!(
            keys,
            ["socket", "proxy_listen", "metrics_listen", "worker_threads"]
        );
        assert_eq!(new.daemon.socket, running.daemon.socket);
        assert_eq!(new.daemon.proxy_listen6, running.daemon.proxy_listen6);
        assert_eq!(new.daemon.metrics_listen, running.daemon.metrics_listen);
        assert_eq!(new.daemon.worker_threads, running.daemon.worker_threads);
        // What a reload may change, it changes.
        assert_eq!(new.daemon.hold_timeout, Duration::from_secs(7));
        assert!(keep_restart_only(&running.daemon, &mut running.daemon.clone()).is_empty());
    }

    #[test]
    fn the_console_table_is_compared_whole() {
        let with = |client: &str| {
            Config::from_toml(
                Path::new("t.toml"),
                &format!(
                    "[daemon]\nconsole_listen = \"127.0.0.1:8443\"\n[console.oidc]\nissuer = \"https://id.example.com\"\nclient_id = \"{client}\"\nclient_secret_file = \"/s\"\nredirect_url = \"https://g.example.com/auth/callback\"\n"
                ),
            )
            .expect("test config")
        };
        let (running, mut new) = (with("a"), with("b"));
        assert!(keep_running(&running.console, &mut new.console));
        assert_eq!(new.console, running.console);
        assert!(!keep_running(&running.console, &mut with("a").console));
    }
}
