//! The kernel half of the gate, seen from userspace: loading the programs, adopting what a
//! previous agent pinned, keeping the maps in step with the config, and detaching.
//!
//! Pinned layout under `bpf_pin_dir`:
//!
//! ```text
//! maps-v1/JG_*                                  state shared across restarts and instances
//! links/root/<program>                           links on the gate root cgroup
//! links/svc-<cgroup path with / as +>/<program>  links on gated service cgroups
//! links/uid-root/<program>                       links on the cgroup2 root (uid workloads)
//! links/former-<cgroup id>/<program>             a previous gate root that still holds processes
//! ```
//!
//! One agent holds a pin directory at a time ([`pinlock`]). When `gate_cgroup` changes, the
//! old root's links are kept (as `former-<id>`) for as long as processes remain there, so a
//! restart with a new root never lets the old one's workloads out.
//!
//! The object is loaded as up to two instances that share every map: the subtree instance
//! (gate root and service cgroups: everything below is gated) and, when `[[workload]] uid`
//! entries exist, the uid instance on the cgroup2 root (only those uids, wherever they run).
//!
//! While it runs, the agent also holds every link and pinned map open and puts back at once any
//! pin removed behind its back: removing a pin neither detaches a program nor leaves a gate
//! that would open if the agent then died.
//!
//! Links are pinned, so the programs stay attached when the agent stops or crashes: redirected
//! connects then find no proxy and fail (`ECONNREFUSED`), everything else keeps its verdict. On
//! start the agent loads fresh programs against the pinned maps and swaps them into the pinned
//! links with `BPF_LINK_UPDATE`, which replaces a program atomically: at no point does a gated
//! workload run without one.

pub mod bpf_sys;
pub mod cgroup;
pub mod pinlock;
pub mod ports;
pub mod preflight;
pub mod rules;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, SockOps, links::FdLink},
};
use jitgate_common::{
    ConnKey, DestAddr, DestRules, GateConfig, Redirect, RefusalEvent, config_flags, egress, mode,
    names, stats,
};
use tracing::{debug, info, warn};

use self::rules::{TrieKey, addr_words};
use crate::config::{Egress, KernelLog};

/// The compiled kernel object, embedded at build time by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/jitgate-ebpf"));

/// Version of the pinned map layout. Bump it whenever a shared struct or map definition in
/// `jitgate-common` changes: a new layout gets fresh maps beside the old ones, and the link
/// swap moves every gated workload to it at once.
const MAP_LAYOUT: &str = "maps-v1";

/// What the kernel side needs from the config.
#[derive(Clone, Debug)]
pub struct GateSettings {
    pub pin_dir: PathBuf,
    pub gate_cgroup: String,
    /// Service cgroups gated in place (relative to the cgroup2 mount).
    pub service_cgroups: Vec<String>,
    /// Uids gated wherever they run.
    pub gated_uids: Vec<u32>,
    pub kernel_log: KernelLog,
    pub proxy_v4: SocketAddr,
    pub proxy_v6: Option<SocketAddr>,
    pub egress: Egress,
}

impl GateSettings {
    fn gate_config(&self, generation: u32) -> GateConfig {
        let proxy_ip4 = match self.proxy_v4.ip() {
            IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
            IpAddr::V6(_) => u32::from_ne_bytes([127, 0, 0, 1]),
        };
        // Without an IPv6 listener, native IPv6 destinations go to the v4-mapped listener:
        // dual-stack sockets reach it, IPv6-only sockets fail, which is closed.
        let proxy_ip6 = self
            .proxy_v6
            .map_or(jitgate_common::v4_mapped(proxy_ip4), |a| addr_words(a.ip()));
        GateConfig {
            proxy_ip4,
            proxy_ip6,
            proxy_port: self.proxy_v4.port(),
            egress: match self.egress {
                Egress::Deny => egress::DENY,
                Egress::Allow => egress::ALLOW,
            },
            flags: config_flags::READY,
            generation,
        }
    }
}

/// Handle on the loaded programs and pinned maps.
pub struct Gate {
    subtree: Ebpf,
    uid: Option<Ebpf>,
    settings: GateSettings,
    cgroup_mount: PathBuf,
    maps_dir: PathBuf,
    dest: LpmTrie<MapData, DestAddr, DestRules>,
    config: Array<MapData, GateConfig>,
    stats: PerCpuArray<MapData, u64>,
    uids: HashMap<MapData, u32, u8>,
    subtrees: HashMap<MapData, u64, u8>,
    events: Option<RingBuf<MapData>>,
    installed: BTreeMap<TrieKey, DestRules>,
    generation: u32,
    attached: BTreeSet<String>,
    /// The gated subtrees (gate root, service cgroups) with the cgroup id each was attached
    /// at: a different id at that path is a new cgroup without our programs.
    subtree_ids: Vec<(PathBuf, u64)>,
    /// Every link and shared map this agent pinned or adopted, by pin path, open for the
    /// agent's lifetime: a program stays attached while its link is open, so removing the pin
    /// detaches nothing, and [`Gate::repin`] puts the pin back.
    held: BTreeMap<PathBuf, Held>,
    /// This agent's claim on the pin directory, for its lifetime.
    _pin_lock: pinlock::PinLock,
}

/// A pinned object this agent keeps open, and its kernel id (to tell it from whatever else
/// might be put at its path).
struct Held {
    fd: OwnedFd,
    id: u32,
}

impl Held {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        let id = bpf_sys::object_id(fd.as_fd())?;
        Ok(Self { fd, id })
    }

    /// Whether `path` pins this very object.
    fn pinned_at(&self, path: &Path) -> bool {
        bpf_sys::obj_get(path)
            .and_then(|fd| bpf_sys::object_id(fd.as_fd()))
            .is_ok_and(|id| id == self.id)
    }
}

/// Where a set of links goes, and which instance's programs they run.
struct Target {
    mode: u8,
    dir: PathBuf,
    cgroup: PathBuf,
}

/// Where redirected connections' records wait for the proxy. Cheap to share.
pub struct ConnTable {
    fd: OwnedFd,
    netns_cookie: u64,
}

impl ConnTable {
    /// Takes (reads and deletes) the record of the connection the proxy accepted from
    /// `client` on `proxy`. `None` when the connection was not redirected by the gate.
    pub fn take(&self, client: SocketAddr, proxy: SocketAddr) -> io::Result<Option<Redirect>> {
        let key = ConnKey {
            netns_cookie: self.netns_cookie,
            client_addr: addr_words(client.ip()),
            proxy_addr: addr_words(proxy.ip()),
            client_port: client.port(),
            proxy_port: proxy.port(),
            _pad: 0,
        };
        let mut value = Redirect::default();
        Ok(bpf_sys::map_lookup_and_delete(self.fd.as_fd(), &key, &mut value)?.then_some(value))
    }
}

fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The pin directory of links attached to one cgroup. bpffs refuses names with dots, so a
/// service cgroup path is reduced to safe characters and disambiguated by a hash.
fn target_dir(pin_dir: &Path, service: Option<&str>) -> PathBuf {
    match service {
        None => pin_dir.join("links/root"),
        Some(path) => {
            let safe: String = path
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(200)
                .collect();
            // FNV-1a: stable across builds, unlike the std hasher.
            let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            pin_dir.join(format!("links/svc-{safe}-{:08x}", hash as u32))
        }
    }
}

fn expected_map_sizes(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        names::MAP_CONFIG => s(4, size_of::<GateConfig>()),
        names::MAP_DEST => s(4 + size_of::<DestAddr>(), size_of::<DestRules>()),
        names::MAP_SOCK => s(4, size_of::<Redirect>()),
        names::MAP_CONNS => s(size_of::<ConnKey>(), size_of::<Redirect>()),
        names::MAP_STATS => s(4, 8),
        names::MAP_UIDS => s(4, 1),
        names::MAP_SUBTREES => s(8, 1),
        names::MAP_EVENTS => s(0, 0),
        _ => None,
    }
}

/// Loads one instance of the object against the pinned maps and runs the verifier on every
/// program.
fn load_instance(maps_dir: &Path, log_level: u8, instance: u8) -> anyhow::Result<Ebpf> {
    let map_paths: Vec<(&str, PathBuf)> = names::PINNED_MAPS
        .iter()
        .map(|name| (*name, maps_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    loader.override_global("AYA_LOG_LEVEL", &log_level, false);
    loader.override_global(names::GLOBAL_MODE, &instance, true);
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).context("loading the kernel programs")?;
    for name in names::PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the kernel object has no program {name}"))?;
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SockOps(p) => p.load(),
            other => bail!("program {name} has unexpected type {:?}", other.prog_type()),
        };
        loaded.with_context(|| format!("loading program {name} (verifier)"))?;
    }
    Ok(ebpf)
}

/// Refuses to start on maps pinned by an incompatible build, which the programs would
/// misread.
fn check_pinned_maps(maps_dir: &Path) -> anyhow::Result<()> {
    for name in names::PINNED_MAPS {
        let path = maps_dir.join(name);
        let Ok(fd) = bpf_sys::obj_get(&path) else {
            continue;
        };
        let info = bpf_sys::map_info(fd.as_fd())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let expected = expected_map_sizes(name).expect("every pinned map has sizes");
        if (info.key_size, info.value_size) != expected {
            bail!(
                "pinned map {} has key/value sizes {}/{} but this jitgated expects {}/{}: it was pinned by an incompatible build; stop every jitgated, run `jitgate gate detach`, then start again",
                path.display(),
                info.key_size,
                info.value_size,
                expected.0,
                expected.1
            );
        }
    }
    Ok(())
}

impl Gate {
    /// Loads the programs against the pinned maps (creating them on first start), installs
    /// `trie` and the gate config, then attaches or adopts every link. Returns the gate and
    /// the proxy's view of pending connections.
    pub fn open(
        settings: GateSettings,
        trie: BTreeMap<TrieKey, DestRules>,
    ) -> anyhow::Result<(Self, ConnTable)> {
        let cgroup_mount = preflight::check()?;
        if OBJECT.is_empty() {
            bail!("this jitgated was built with AYA_BUILD_SKIP=1 and carries no kernel programs");
        }
        preflight::ensure_bpffs(&settings.pin_dir)?;
        let maps_dir = settings.pin_dir.join(MAP_LAYOUT);
        std::fs::create_dir_all(&maps_dir)
            .with_context(|| format!("creating {}", maps_dir.display()))?;
        // Before anything pinned is read or changed.
        let pin_lock = pinlock::acquire(&settings.pin_dir)?;
        check_pinned_maps(&maps_dir)?;

        let own_cgroup = cgroup::cgroup_of_pid(std::process::id()).unwrap_or_default();
        if own_cgroup == settings.gate_cgroup
            || own_cgroup.starts_with(&format!("{}/", settings.gate_cgroup))
        {
            bail!(
                "jitgated runs inside the gate root cgroup {}; it must run outside it, or its own upstream connections would be gated",
                settings.gate_cgroup
            );
        }

        let mut ebpf = load_instance(&maps_dir, settings.kernel_log.level(), mode::SUBTREE)?;

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("the kernel object has no map {name}"))
        };
        let dest: LpmTrie<MapData, DestAddr, DestRules> =
            LpmTrie::try_from(take(&mut ebpf, names::MAP_DEST)?)?;
        let config: Array<MapData, GateConfig> =
            Array::try_from(take(&mut ebpf, names::MAP_CONFIG)?)?;
        let stats_map: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(take(&mut ebpf, names::MAP_STATS)?)?;
        let uids: HashMap<MapData, u32, u8> = HashMap::try_from(take(&mut ebpf, names::MAP_UIDS)?)?;
        let subtrees: HashMap<MapData, u64, u8> =
            HashMap::try_from(take(&mut ebpf, names::MAP_SUBTREES)?)?;
        let events: RingBuf<MapData> = RingBuf::try_from(take(&mut ebpf, names::MAP_EVENTS)?)?;
        let conns_fd = bpf_sys::obj_get(&maps_dir.join(names::MAP_CONNS))
            .context("opening the pinned connection table")?;
        // Records left by connects no proxy accepted (the agent was down, or a kernel program
        // older than the one that drops a record with its socket): whoever binds such a
        // record's client port later would pass for its workload. Connections queued on the
        // new listener meanwhile lose theirs too, and are refused: closed, not opened.
        let stale = bpf_sys::map_clear::<ConnKey>(
            conns_fd.as_fd(),
            2 * jitgate_common::MAX_PENDING_CONNS as usize,
        )
        .context("emptying the pinned connection table")?;
        if stale > 0 {
            info!(records = stale, "dropped connection records no proxy took");
        }
        let conns = ConnTable {
            fd: conns_fd,
            netns_cookie: netns_cookie().context("reading the network namespace cookie")?,
        };

        // What a previous agent left in the trie, so the first update removes stale entries.
        let mut installed = BTreeMap::new();
        for entry in dest.iter() {
            let (key, value) = entry.context("reading the pinned destination trie")?;
            installed.insert(
                TrieKey {
                    prefix_len: key.prefix_len(),
                    addr: key.data().addr,
                },
                value,
            );
        }
        let previous = config.get(&0, 0).unwrap_or_default();
        let adopted = previous.flags & config_flags::READY != 0;

        let mut gate = Self {
            subtree: ebpf,
            uid: None,
            settings,
            cgroup_mount,
            maps_dir,
            dest,
            config,
            stats: stats_map,
            uids,
            subtrees,
            events: Some(events),
            installed,
            generation: previous.generation,
            attached: BTreeSet::new(),
            subtree_ids: Vec::new(),
            held: BTreeMap::new(),
            _pin_lock: pin_lock,
        };
        gate.keep_former_root()?;
        for name in names::PINNED_MAPS {
            let path = gate.maps_dir.join(name);
            let held = bpf_sys::obj_get(&path)
                .and_then(Held::new)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            gate.held.insert(path, held);
        }
        gate.apply(trie)?;
        let (services, gated_uids) = (
            gate.settings.service_cgroups.clone(),
            gate.settings.gated_uids.clone(),
        );
        gate.sync_targets(&services, &gated_uids)?;
        info!(
            adopted,
            pin_dir = %gate.settings.pin_dir.display(),
            gate_cgroup = %gate.settings.gate_cgroup,
            "gate attached"
        );
        Ok((gate, conns))
    }

    /// Starts forwarding the kernel programs' aya-log records to `tracing` (only when
    /// `kernel_log` is not `off`). Call from within a tokio runtime.
    pub fn spawn_kernel_logger(&mut self) -> anyhow::Result<()> {
        if self.settings.kernel_log == KernelLog::Off {
            return Ok(());
        }
        let logger = aya_log::EbpfLogger::init(&mut self.subtree).context("starting aya-log")?;
        // SAFETY: the logger owns its ring-buffer descriptor, which stays open and unchanged
        // until the AsyncFd (and with it the logger) is dropped.
        let mut logger = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("polling the aya-log ring buffer: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = logger.readable_mut().await else {
                    break;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// The kernel's refusal events, for the audit (taken once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    pub fn settings(&self) -> &GateSettings {
        &self.settings
    }

    pub fn gate_root(&self) -> PathBuf {
        self.cgroup_mount.join(&self.settings.gate_cgroup)
    }

    pub fn cgroup_mount(&self) -> &Path {
        &self.cgroup_mount
    }

    /// Installs a new destination trie: new and changed prefixes first, stale ones last, so
    /// that every lookup during the update sees either the old or the new rules for its
    /// prefix, never a gap. Then publishes the gate config.
    pub fn apply(&mut self, trie: BTreeMap<TrieKey, DestRules>) -> anyhow::Result<()> {
        for (key, value) in &trie {
            if self.installed.get(key) != Some(value) {
                self.dest
                    .insert(
                        &Key::new(key.prefix_len, DestAddr { addr: key.addr }),
                        value,
                        0,
                    )
                    .context("updating the destination trie")?;
            }
        }
        for key in self.installed.keys() {
            if !trie.contains_key(key) {
                match self
                    .dest
                    .remove(&Key::new(key.prefix_len, DestAddr { addr: key.addr }))
                {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).context("pruning the destination trie"),
                }
            }
        }
        let prefixes = trie.len();
        self.installed = trie;
        self.generation = self.generation.wrapping_add(1);
        let cfg = self.settings.gate_config(self.generation);
        self.config
            .set(0, cfg, 0)
            .context("publishing the gate config")?;
        debug!(
            prefixes,
            generation = self.generation,
            "destination rules installed"
        );
        Ok(())
    }

    /// The trie as last installed.
    pub fn installed(&self) -> &BTreeMap<TrieKey, DestRules> {
        &self.installed
    }

    /// Changes egress or the proxy addresses (on reload) and republishes the config.
    pub fn update_settings(&mut self, egress: Egress) -> anyhow::Result<()> {
        self.settings.egress = egress;
        let trie = self.installed.clone();
        self.apply(trie)
    }

    /// Attaches (or adopts) the programs on the gate root, on `services` and (for `uids`) on
    /// the cgroup2 root, and detaches them from what is no longer configured.
    pub fn sync_targets(&mut self, services: &[String], uids: &[u32]) -> anyhow::Result<()> {
        let root = self.gate_root();
        cgroup::ensure_dir(&root)?;
        let mut targets = vec![Target {
            mode: mode::SUBTREE,
            dir: target_dir(&self.settings.pin_dir, None),
            cgroup: root,
        }];
        for svc in services {
            let path = self.cgroup_mount.join(svc);
            if !path.is_dir() {
                warn!(cgroup = %svc, "service cgroup does not exist yet; creating it so the gate is in place before the service starts");
                cgroup::ensure_dir(&path)?;
            }
            targets.push(Target {
                mode: mode::SUBTREE,
                dir: target_dir(&self.settings.pin_dir, Some(svc)),
                cgroup: path,
            });
        }

        targets.extend(self.former_roots());

        // The uid instance must know which subtrees are already gated (it leaves those to
        // the subtree instance), and which uids it gates.
        let attached_ids = targets
            .iter()
            .map(|t| Ok((t.cgroup.clone(), cgroup::cgroup_id(&t.cgroup)?)))
            .collect::<io::Result<Vec<(PathBuf, u64)>>>()
            .context("reading gated cgroup ids")?;
        let subtree_ids: BTreeSet<u64> = attached_ids.iter().map(|(_, id)| *id).collect();
        let uid_set: BTreeSet<u32> = uids.iter().copied().collect();
        sync_set(&mut self.uids, &uid_set).context("updating gated uids")?;
        if !uids.is_empty() {
            if self.uid.is_none() {
                self.uid = Some(load_instance(
                    &self.maps_dir,
                    self.settings.kernel_log.level(),
                    mode::UID,
                )?);
            }
            targets.push(Target {
                mode: mode::UID,
                dir: self.settings.pin_dir.join("links/uid-root"),
                cgroup: self.cgroup_mount.clone(),
            });
        }

        let mut keep = BTreeSet::new();
        // The subtree set is published after the subtree links are in place (below): the uid
        // instance leaves those subtrees alone, so they must already be gated.
        for target in &targets {
            std::fs::create_dir_all(&target.dir)
                .with_context(|| format!("creating {}", target.dir.display()))?;
            self.attach_all(target)?;
            keep.insert(
                target
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        sync_set(&mut self.subtrees, &subtree_ids).context("updating gated subtrees")?;
        // Unpin links of cgroups that left the config.
        let links_dir = self.settings.pin_dir.join("links");
        if let Ok(entries) = std::fs::read_dir(&links_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name) {
                    info!(target = %name, "detaching from a cgroup no longer gated");
                    let dir = entry.path();
                    self.held.retain(|path, _| !path.starts_with(&dir));
                    remove_pins(&dir)?;
                }
            }
        }
        self.settings.service_cgroups = services.to_vec();
        self.settings.gated_uids = uids.to_vec();
        self.attached = keep;
        self.subtree_ids = attached_ids;
        Ok(())
    }

    /// When the pinned root links belong to another cgroup than the configured gate root (the
    /// root was renamed in the config), keeps them as a former root if that cgroup still
    /// holds processes: those were gated and stay gated. [`Gate::former_roots`] lets them go
    /// once the cgroup is empty or gone.
    fn keep_former_root(&mut self) -> anyhow::Result<()> {
        let root_links = target_dir(&self.settings.pin_dir, None);
        let Some(old_id) = names::PROGRAMS.iter().find_map(|name| {
            let link = bpf_sys::obj_get(&root_links.join(name)).ok()?;
            bpf_sys::link_info(link.as_fd()).ok().map(|i| i.cgroup_id)
        }) else {
            return Ok(());
        };
        let root = self.gate_root();
        if cgroup::cgroup_id(&root).is_ok_and(|id| id == old_id) {
            return Ok(());
        }
        let Some(old) = cgroup::find_by_id(&self.cgroup_mount, old_id) else {
            return Ok(());
        };
        if !cgroup::is_populated(&old).unwrap_or(true) {
            return Ok(());
        }
        let former = self.settings.pin_dir.join(format!("links/former-{old_id}"));
        warn!(
            old_root = %old.display(),
            gate_cgroup = %self.settings.gate_cgroup,
            "the gate root changed while the old one still holds processes; they stay gated until it is empty"
        );
        std::fs::rename(&root_links, &former).with_context(|| {
            format!(
                "keeping the old gate root's links at {} (jitgate gate detach removes everything)",
                former.display()
            )
        })
    }

    /// Former gate roots ([`Gate::keep_former_root`]) that still hold processes.
    fn former_roots(&self) -> Vec<Target> {
        let Ok(entries) = std::fs::read_dir(self.settings.pin_dir.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let id: u64 = entry
                    .file_name()
                    .to_str()?
                    .strip_prefix("former-")?
                    .parse()
                    .ok()?;
                let cgroup = cgroup::find_by_id(&self.cgroup_mount, id)?;
                cgroup::is_populated(&cgroup)
                    .unwrap_or(true)
                    .then(|| Target {
                        mode: mode::SUBTREE,
                        dir: entry.path(),
                        cgroup,
                    })
            })
            .collect()
    }

    /// Attaches again where a gated cgroup was removed or made anew since it was attached:
    /// systemd removes a service's cgroup when the service stops and makes a fresh one, with
    /// none of our programs, when it starts. A removed one is made again at this check, so that
    /// the service usually starts inside a gated cgroup. Returns whether anything changed.
    pub fn reattach_moved(&mut self) -> anyhow::Result<bool> {
        let intact = self
            .subtree_ids
            .iter()
            .all(|(path, id)| cgroup::cgroup_id(path).is_ok_and(|now| now == *id));
        if intact {
            return Ok(false);
        }
        let services = self.settings.service_cgroups.clone();
        let uids = self.settings.gated_uids.clone();
        self.sync_targets(&services, &uids)?;
        Ok(true)
    }

    fn instance(&self, mode: u8) -> &Ebpf {
        match (mode, &self.uid) {
            (mode::UID, Some(uid)) => uid,
            _ => &self.subtree,
        }
    }

    fn attach_all(&mut self, target: &Target) -> anyhow::Result<()> {
        let cgroup_id = cgroup::cgroup_id(&target.cgroup)
            .with_context(|| format!("reading cgroup {}", target.cgroup.display()))?;
        for name in names::PROGRAMS {
            let link_path = target.dir.join(name);
            if link_path.exists() {
                match bpf_sys::obj_get(&link_path) {
                    Ok(link) => {
                        let info = bpf_sys::link_info(link.as_fd())?;
                        if info.cgroup_id == cgroup_id {
                            let program = self
                                .instance(target.mode)
                                .program(name)
                                .expect("checked at load");
                            bpf_sys::link_update(link.as_fd(), program.fd()?.as_fd())
                                .with_context(|| {
                                    format!("swapping program {name} into {}", link_path.display())
                                })?;
                            debug!(program = name, link = info.id, "adopted pinned link");
                            self.held.insert(link_path, Held::new(link)?);
                            continue;
                        }
                        warn!(
                            program = name,
                            "pinned link belongs to a cgroup that no longer exists; attaching afresh"
                        );
                        // Attach the new link before dropping the stale one.
                        let fresh = self.attach_link(target.mode, name, &target.cgroup)?;
                        std::fs::remove_file(&link_path)?;
                        self.pin_and_hold(fresh, link_path)?;
                        continue;
                    }
                    Err(e) => {
                        warn!(program = name, error = %e, "unreadable pinned link; replacing it");
                        let _ = std::fs::remove_file(&link_path);
                    }
                }
            }
            let fresh = self.attach_link(target.mode, name, &target.cgroup)?;
            self.pin_and_hold(fresh, link_path)?;
            debug!(program = name, cgroup = %target.cgroup.display(), "attached");
        }
        Ok(())
    }

    /// Pins a new link and keeps a descriptor of it (aya's own closes with the `FdLink`).
    fn pin_and_hold(&mut self, link: FdLink, path: PathBuf) -> anyhow::Result<()> {
        let id = link
            .info()
            .map_err(|e| anyhow!("reading link info for {}: {e}", path.display()))?
            .id();
        let pinned = link
            .pin(&path)
            .map_err(|e| anyhow!("pinning link {}: {e}", path.display()))?;
        // Opened through the pin while aya's descriptor still keeps the link alive, and
        // checked to be the same link.
        let held = bpf_sys::obj_get(&path)
            .and_then(Held::new)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        if held.id != id {
            bail!(
                "{} changed while it was being pinned (link {} instead of {id})",
                path.display(),
                held.id
            );
        }
        drop(pinned);
        self.held.insert(path, held);
        Ok(())
    }

    /// Puts back every pin of a held link or map that was removed (or renamed away) since the
    /// last call, and returns the paths restored. Between the removal and this call the
    /// programs stay attached, since this agent holds them open; the pins only matter if the
    /// agent dies, so callers run this often.
    pub fn repin(&mut self) -> anyhow::Result<Vec<PathBuf>> {
        let mut restored = Vec::new();
        for (path, held) in &self.held {
            if held.pinned_at(path) {
                continue;
            }
            // Something else put in its place (another object, an empty directory) goes.
            if let Ok(meta) = path.symlink_metadata() {
                let removed = if meta.is_dir() {
                    std::fs::remove_dir(path)
                } else {
                    std::fs::remove_file(path)
                };
                removed.with_context(|| format!("removing what replaced {}", path.display()))?;
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            bpf_sys::obj_pin(held.fd.as_fd(), path)
                .with_context(|| format!("pinning {} again", path.display()))?;
            restored.push(path.clone());
        }
        Ok(restored)
    }

    /// Lets go of every held link and map, so that removing their pins detaches the
    /// programs. Only for `jitgate gate detach`, which then removes the pins.
    pub fn release(&mut self) {
        self.held.clear();
    }

    fn attach_link(&mut self, mode: u8, name: &str, cgroup_path: &Path) -> anyhow::Result<FdLink> {
        let cgroup = File::open(cgroup_path)
            .with_context(|| format!("opening cgroup {}", cgroup_path.display()))?;
        let ebpf = match (mode, self.uid.as_mut()) {
            (mode::UID, Some(uid)) => uid,
            _ => &mut self.subtree,
        };
        let program = ebpf.program_mut(name).expect("checked at load");
        let mode = CgroupAttachMode::Single;
        let context = || format!("attaching {name} to {}", cgroup_path.display());
        let link: FdLink = match program {
            Program::CgroupSockAddr(p) => {
                let p: &mut CgroupSockAddr = p;
                let id = p.attach(&cgroup, mode).with_context(context)?;
                p.take_link(id)?.try_into()?
            }
            Program::CgroupSock(p) => {
                let p: &mut CgroupSock = p;
                let id = p.attach(&cgroup, mode).with_context(context)?;
                p.take_link(id)?.try_into()?
            }
            Program::SockOps(p) => {
                let p: &mut SockOps = p;
                let id = p.attach(&cgroup, mode).with_context(context)?;
                p.take_link(id)?.try_into()?
            }
            _ => bail!("program {name} has an unexpected type"),
        };
        Ok(link)
    }

    /// Sums the per-CPU kernel counters, indexed by [`jitgate_common::stats`].
    pub fn counters(&self) -> anyhow::Result<[u64; stats::COUNT as usize]> {
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.stats.get(&(i as u32), 0)?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Names of the cgroups the programs are attached to.
    pub fn attached_targets(&self) -> Vec<String> {
        self.attached.iter().cloned().collect()
    }

    /// Checks that every link and map this agent holds is still pinned where it was: a pin
    /// missing is a gate that opens if the agent stops before [`Gate::repin`] puts it back.
    pub fn check_pinned(&self) -> Result<(), String> {
        let root = target_dir(&self.settings.pin_dir, None);
        let mut missing: Vec<String> = names::PROGRAMS
            .iter()
            .map(|name| root.join(name))
            .filter(|path| !self.held.contains_key(path))
            .map(|path| path.display().to_string())
            .collect();
        missing.extend(
            self.held
                .iter()
                .filter(|(path, held)| !held.pinned_at(path))
                .map(|(path, _)| path.display().to_string()),
        );
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("pins missing: {}", missing.join(", ")))
        }
    }
}

/// Makes a BPF hash map used as a set hold exactly `wanted`: additions first, removals last.
fn sync_set<K: aya::Pod + Ord + Copy>(
    map: &mut HashMap<MapData, K, u8>,
    wanted: &BTreeSet<K>,
) -> anyhow::Result<()> {
    for key in wanted {
        map.insert(key, 1, 0)?;
    }
    let present = map.keys().collect::<Result<Vec<K>, _>>()?;
    for key in present {
        if !wanted.contains(&key) {
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Decodes one refusal event from the ring buffer.
pub fn decode_event(bytes: &[u8]) -> Option<RefusalEvent> {
    (bytes.len() >= std::mem::size_of::<RefusalEvent>()).then(|| {
        // SAFETY: the buffer holds at least one RefusalEvent written by the kernel program;
        // read_unaligned copes with any alignment.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RefusalEvent>()) }
    })
}

fn remove_pins(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        std::fs::remove_file(entry.path())
            .with_context(|| format!("unpinning {}", entry.path().display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Removes every pinned link and map under `pin_dir`: the programs detach as soon as no
/// process holds them, and gated workloads are no longer steered or refused. This is the only
/// way the gate opens.
pub fn detach(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    let links = pin_dir.join("links");
    if let Ok(entries) = std::fs::read_dir(&links) {
        for target in entries.flatten() {
            remove_pins(&target.path())?;
            removed.push(target.path());
        }
        std::fs::remove_dir(&links).ok();
    }
    for entry in std::fs::read_dir(pin_dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            remove_pins(&path)?;
            removed.push(path);
        }
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    Ok(removed)
}
