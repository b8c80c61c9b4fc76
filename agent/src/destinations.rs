//! Keeps the kernel's destination rules (and the proxy's routes) in step with the config,
//! with what resource host names resolve to, and with this host's own addresses.
//!
//! Names are re-resolved as their TTL runs out, A and AAAA alike. An address once seen stays
//! a resource address for `dns_max_ttl` after the last answer that held it, since workloads
//! may have cached it (while a name, or one of its families, cannot be resolved, every address
//! seen of it stays): a changed
//! answer only ever adds addresses to the gate before it removes any, so it never opens a
//! path around it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use hickory_resolver::{
    TokioResolver,
    config::{LookupIpStrategy, NameServerConfig, NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
};
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, SharedConfig, Target},
    gate::{
        Gate,
        rules::{self, ResourceAddrs},
    },
    proxy::Routes,
};

/// How often the host's own addresses are re-read.
const LOCAL_ADDR_INTERVAL: Duration = Duration::from_secs(30);

struct Resolved {
    /// Address -> when it was last in an answer.
    addrs: BTreeMap<IpAddr, Instant>,
    next_refresh: Instant,
}

pub struct Destinations {
    config: SharedConfig,
    gate: OnceLock<Arc<Mutex<Gate>>>,
    routes: Routes,
    resolver: TokioResolver,
    resolved: Mutex<HashMap<String, Resolved>>,
    local: Mutex<Vec<IpAddr>>,
}

fn build_resolver(config: &Config) -> anyhow::Result<TokioResolver> {
    let mut builder = if config.daemon.resolvers.is_empty() {
        TokioResolver::builder_tokio().context("reading the system resolver configuration")?
    } else {
        let mut servers = Vec::new();
        for addr in &config.daemon.resolvers {
            servers.push(NameServerConfig::new(*addr, Protocol::Udp));
            servers.push(NameServerConfig::new(*addr, Protocol::Tcp));
        }
        let group = NameServerConfigGroup::from(servers);
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], group),
            TokioConnectionProvider::default(),
        )
    };
    // Both families, always: the resolver's default asks for AAAA only when there is no A,
    // which would leave a dual-stack resource's IPv6 addresses ungated.
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(builder.build())
}

/// This host's interface addresses.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address)
                .filter_map(|sa| {
                    if let Some(v4) = sa.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

impl Destinations {
    /// Call [`Self::resolve_all`] and [`Self::compile`] for the gate's first rules, then
    /// [`Self::attach`] the opened gate.
    pub fn new(config: SharedConfig, routes: Routes) -> anyhow::Result<Self> {
        let resolver = build_resolver(&config.get())?;
        Ok(Self {
            config,
            gate: OnceLock::new(),
            routes,
            resolver,
            resolved: Mutex::new(HashMap::new()),
            local: Mutex::new(local_addresses()),
        })
    }

    /// The rules for `config` with what is known now (no DNS traffic).
    pub fn compile(
        &self,
        config: &Config,
    ) -> anyhow::Result<BTreeMap<rules::TrieKey, jitgate_common::DestRules>> {
        let now = Instant::now();
        let grace = config.daemon.dns_max_ttl;
        let resolved = self.resolved.lock().expect("resolved lock");
        let resources: Vec<ResourceAddrs> = config
            .resources
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let nets = match &r.target {
                    Target::Net { net, .. } => vec![*net],
                    Target::Host { name, .. } => resolved
                        .get(name)
                        .map(|res| {
                            res.addrs
                                .iter()
                                .filter(|(_, seen)| now.duration_since(**seen) <= grace)
                                .map(|(a, _)| IpNet::from(*a))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                ResourceAddrs {
                    index: index as u32,
                    nets,
                    ports: r.target.ports(),
                }
            })
            .collect();
        let local = self.local.lock().expect("local lock").clone();
        Ok(rules::compile(
            &resources,
            &config.daemon.allow,
            &config.daemon.resolvers,
            &local,
            &[config.daemon.console_listen, config.daemon.metrics_listen]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
        )?)
    }

    /// Hands over the opened gate: from now on rule changes reach the kernel.
    pub fn attach(&self, gate: Arc<Mutex<Gate>>) {
        let _ = self.gate.set(gate);
    }

    /// Resolves every resource host name now (start-up, reload).
    pub async fn resolve_all(&self) {
        let config = self.config.get();
        for r in &config.resources {
            if let Target::Host { name, .. } = &r.target {
                self.resolve(&config, name).await;
            }
        }
    }

    /// Resolves names due for it (all of them with `force`), then installs the rules.
    pub async fn refresh(&self, force: bool) -> anyhow::Result<()> {
        let config = self.config.get();
        let hosts: Vec<String> = config
            .resources
            .iter()
            .filter_map(|r| match &r.target {
                Target::Host { name, .. } => Some(name.clone()),
                Target::Net { .. } => None,
            })
            .collect();
        let now = Instant::now();
        for name in hosts {
            let due = force
                || self
                    .resolved
                    .lock()
                    .expect("resolved lock")
                    .get(&name)
                    .is_none_or(|r| r.next_refresh <= now);
            if due {
                self.resolve(&config, &name).await;
            }
        }
        self.install(&config)
    }

    async fn resolve(&self, config: &Config, name: &str) {
        let (min, max) = (config.daemon.dns_min_ttl, config.daemon.dns_max_ttl);
        let fqdn = if name.ends_with('.') || !name.contains('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        };
        let result = self.resolver.lookup_ip(fqdn.as_str()).await;
        let now = Instant::now();
        let mut resolved = self.resolved.lock().expect("resolved lock");
        let entry = resolved.entry(name.to_owned()).or_insert_with(|| Resolved {
            addrs: BTreeMap::new(),
            next_refresh: now,
        });
        match result {
            Ok(lookup) => {
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(now)
                    .clamp(min, max);
                let mut added = Vec::new();
                let (mut v4, mut v6) = (false, false);
                for addr in lookup.iter() {
                    v4 |= addr.is_ipv4();
                    v6 |= addr.is_ipv6();
                    if entry.addrs.insert(addr, now).is_none() {
                        added.push(addr);
                    }
                }
                // An answer without one family may be that family's lookup failing: its
                // addresses stay gated as through any failed lookup.
                for (addr, seen) in &mut entry.addrs {
                    if (addr.is_ipv4() && !v4) || (addr.is_ipv6() && !v6) {
                        *seen = now;
                    }
                }
                entry.next_refresh = now + ttl;
                if !added.is_empty() {
                    info!(name, ?added, "resource name resolves to new addresses");
                }
                debug!(name, ttl_secs = ttl.as_secs(), "resolved");
            }
            Err(e) => {
                entry.next_refresh = now + min;
                // No answer says nothing about which addresses are still the resource's: they
                // stay gated (aging out only follows an answer without them).
                for seen in entry.addrs.values_mut() {
                    *seen = now;
                }
                warn!(name, error = %e, "cannot resolve resource name; keeping the addresses seen before");
            }
        }
    }

    /// Compiles and installs the rules for `config` into the kernel and the proxy's routes.
    pub fn install(&self, config: &Config) -> anyhow::Result<()> {
        let trie = self.compile(config)?;
        let names = config.resources.iter().map(|r| r.name.clone()).collect();
        if let Some(gate) = self.gate.get() {
            let mut gate = gate
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if gate.installed() != &trie {
                gate.apply(trie.clone())?;
            }
        }
        self.routes.update(trie, names);
        Ok(())
    }

    /// Re-resolves names as they come due, and re-reads local addresses, until shutdown.
    pub fn spawn(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut last_local = Instant::now();
            loop {
                let next = {
                    let resolved = self.resolved.lock().expect("resolved lock");
                    resolved
                        .values()
                        .map(|r| r.next_refresh)
                        .min()
                        .unwrap_or_else(|| Instant::now() + LOCAL_ADDR_INTERVAL)
                        .min(last_local + LOCAL_ADDR_INTERVAL)
                };
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(next.into()) => {}
                }
                if last_local.elapsed() >= LOCAL_ADDR_INTERVAL {
                    last_local = Instant::now();
                    let fresh = local_addresses();
                    let mut local = self.local.lock().expect("local lock");
                    if *local != fresh {
                        info!(addresses = ?fresh, "host addresses changed");
                        *local = fresh;
                    }
                }
                if let Err(e) = self.refresh(false).await {
                    warn!(error = %e, "updating destination rules failed; the previous rules stay");
                }
            }
        });
    }
}
