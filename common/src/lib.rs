//! Types shared by jitgate's kernel programs (`jitgate-ebpf`) and the host agent (`jitgate`).
//!
//! Everything here crosses the user/kernel boundary through BPF maps, so every struct is
//! `#[repr(C)]`, has explicit padding, and keeps one byte-order convention:
//!
//! * **Addresses** are `[u32; 4]` words holding the 16 bytes of an IPv6 address in network order,
//!   exactly as the kernel exposes `user_ip6`. IPv4 addresses are stored IPv4-mapped
//!   (`::ffff:a.b.c.d`), so one trie and one code path serve both families.
//! * **Ports** are in host byte order. The kernel programs convert at the edge, where
//!   `bpf_sock_addr.user_port` and `bpf_sock_ops.remote_port` are in network order.
#![no_std]

/// Names of the BPF maps and programs, shared so that the loader and the object agree.
///
/// Map names stay under 16 bytes: the kernel truncates longer ones.
pub mod names {
    /// [`crate::GateConfig`] in a one-entry array.
    pub const MAP_CONFIG: &str = "JG_CONFIG";
    /// Destination rules: LPM trie from [`crate::DestAddr`] to [`crate::DestRules`].
    pub const MAP_DEST: &str = "JG_DEST";
    /// Per-socket [`crate::Redirect`] (socket-local storage).
    pub const MAP_SOCK: &str = "JG_SOCK";
    /// [`crate::ConnKey`] to [`crate::Redirect`], read by the proxy on accept.
    pub const MAP_CONNS: &str = "JG_CONNS";
    /// Per-CPU counters indexed by [`crate::stats`].
    pub const MAP_STATS: &str = "JG_STATS";
    /// uid -> 1 for users gated wherever they run (`[[workload]] uid = ...`).
    pub const MAP_UIDS: &str = "JG_UIDS";
    /// cgroup id -> 1 for the roots of gated subtrees (the gate root, service cgroups).
    pub const MAP_SUBTREES: &str = "JG_SUBTREES";
    /// Ring buffer of [`crate::RefusalEvent`]s, for the audit log.
    pub const MAP_EVENTS: &str = "JG_EVENTS";

    /// Every map the host agent pins so that state survives a restart and is shared by
    /// both program instances.
    pub const PINNED_MAPS: [&str; 8] = [
        MAP_CONFIG,
        MAP_DEST,
        MAP_SOCK,
        MAP_CONNS,
        MAP_STATS,
        MAP_UIDS,
        MAP_SUBTREES,
        MAP_EVENTS,
    ];

    /// The load-time global that says which instance a loaded object is (see
    /// [`crate::mode`]).
    pub const GLOBAL_MODE: &str = "JG_MODE";

    /// The programs, in the order the agent attaches them (the connect hooks last, once
    /// everything they rely on is in place). Each is also the name of its pinned link.
    pub const PROGRAMS: [&str; 10] = [
        "jg_sock_create",
        "jg_bind4",
        "jg_bind6",
        "jg_sendmsg4",
        "jg_sendmsg6",
        "jg_getpeername4",
        "jg_getpeername6",
        "jg_sock_ops",
        "jg_connect4",
        "jg_connect6",
    ];
}

/// Which sockets an instance of the programs acts on. The same object is loaded once per
/// mode; the agent sets [`names::GLOBAL_MODE`] at load time.
pub mod mode {
    /// Attached to the gate root and service cgroups: everything below is gated.
    pub const SUBTREE: u8 = 0;
    /// Attached to the cgroup2 root: only tasks whose uid is in [`super::names::MAP_UIDS`]
    /// are gated, and tasks inside a gated subtree are left to the subtree instance.
    pub const UID: u8 = 1;
}

/// Deepest cgroup nesting the uid instance looks through for a gated subtree.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Largest number of uids gated wherever they run.
pub const MAX_GATED_UIDS: u32 = 1024;

/// Largest number of gated subtrees (the gate root plus service cgroups).
pub const MAX_SUBTREES: u32 = 1024;

/// Size of the refusal-event ring buffer, in bytes.
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Largest number of port rules one destination prefix can carry (see [`DestRules`]).
pub const MAX_PORT_RULES: usize = 32;

/// Largest number of prefixes in the destination trie.
pub const MAX_DEST_PREFIXES: u32 = 16_384;

/// Largest number of connections waiting for the proxy to pick up their [`Redirect`].
pub const MAX_PENDING_CONNS: u32 = 65_536;

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// What gated workloads may reach besides resources.
pub mod egress {
    /// Anything that is not a resource, an allowlist entry or a resolver is refused.
    pub const DENY: u8 = 0;
    /// Anything that is not a resource passes.
    pub const ALLOW: u8 = 1;
}

/// Bits of [`GateConfig::flags`].
pub mod config_flags {
    /// Set once the agent has filled every map. Until then the programs refuse all
    /// connects and datagrams from gated workloads: the gate starts closed.
    pub const READY: u8 = 1;
}

/// Gate-wide settings, entry 0 of [`names::MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateConfig {
    /// The proxy's IPv4 listener, network byte order (as `bpf_sock_addr.user_ip4`).
    pub proxy_ip4: u32,
    /// The proxy's IPv6 listener, as [`DestAddr::addr`]. Native IPv6 destinations are
    /// redirected here; IPv4-mapped ones go to the IPv4-mapped form of `proxy_ip4`.
    pub proxy_ip6: [u32; 4],
    /// The proxy's port (both listeners), host byte order.
    pub proxy_port: u16,
    /// [`egress::DENY`] or [`egress::ALLOW`].
    pub egress: u8,
    /// [`config_flags`] bits.
    pub flags: u8,
    /// Bumped by the agent on every rule update; shows up in kernel logs.
    pub generation: u32,
}

/// Key of the destination trie: an address as described in the crate docs. The trie
/// key also carries a prefix length, counted over these 128 bits (IPv4 prefixes add 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestAddr {
    /// IPv6 (or IPv4-mapped) address, network byte order words.
    pub addr: [u32; 4],
}

/// What a matching [`PortRule`] does with a connection or datagram.
pub mod action {
    /// A protected resource: TCP connects are redirected to the proxy; UDP is refused.
    pub const RESOURCE: u8 = 1;
    /// An allowlist entry: TCP connects pass untouched.
    pub const ALLOW: u8 = 2;
    /// A DNS resolver: TCP and UDP pass untouched.
    pub const RESOLVER: u8 = 3;
    /// One of the agent's own listeners (the web console and its API, metrics): refused to
    /// gated workloads whatever `egress` says (TCP and UDP), so a workload never reaches the
    /// approvers' front end, even holding someone's API token, unless it is configured as a
    /// resource (then it goes through the gate as that workload).
    pub const DENY: u8 = 4;
}

/// One port range on a destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// First port of the range, host byte order.
    pub port_lo: u16,
    /// Last port of the range (inclusive), host byte order.
    pub port_hi: u16,
    /// One of [`action`].
    pub action: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
    /// For [`action::RESOURCE`]: the resource's index in the agent's resource table, so
    /// that kernel logs and counters can name it. The proxy re-derives the resource from
    /// the original destination and never trusts this alone.
    pub resource: u32,
}

/// Value of the destination trie: every rule that applies to addresses under the prefix.
///
/// The agent compiles the trie so that the entry for a prefix also carries the rules of
/// every shorter prefix that contains it (a longest-prefix lookup then sees all rules that
/// apply), with resource rules first: a resource always wins over an allowlist entry, so an
/// allowlist can never open a path around the gate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestRules {
    /// Number of valid entries at the start of `rules`.
    pub len: u32,
    /// Rules in priority order; the first one whose port range matches decides.
    pub rules: [PortRule; MAX_PORT_RULES],
}

impl Default for DestRules {
    fn default() -> Self {
        Self {
            len: 0,
            rules: [PortRule::default(); MAX_PORT_RULES],
        }
    }
}

/// Where a redirected socket really wanted to go, and who asked.
///
/// Written by `connect4`/`connect6` into the socket's local storage, copied by `sock_ops`
/// (once the socket has its local port) into [`names::MAP_CONNS`] under the connection's
/// [`ConnKey`], read there by the proxy on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    /// The destination the workload asked for, as [`DestAddr::addr`] (IPv4-mapped when the
    /// socket is `AF_INET` or the workload used a v4-mapped address).
    pub orig_addr: [u32; 4],
    /// The destination port the workload asked for, host byte order.
    pub orig_port: u16,
    /// The socket's family, [`AF_INET`] or [`AF_INET6`]: `getpeername` answers in it.
    pub family: u16,
    /// The resource index from the matching [`PortRule`].
    pub resource: u32,
    /// cgroup v2 id of the connecting task (the inode number of its cgroup directory):
    /// the kernel's word for which workload this is.
    pub cgroup_id: u64,
    /// Cookie of the socket's network namespace, part of the [`ConnKey`].
    pub netns_cookie: u64,
    /// Thread-group id (the process id) of the connecting task, in the initial pid namespace.
    pub tgid: u32,
    /// Real uid of the connecting task.
    pub uid: u32,
    /// Real gid of the connecting task.
    pub gid: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Identifies one redirected TCP connection as both ends of the loopback hop see it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Cookie of the network namespace the connection lives in.
    pub netns_cookie: u64,
    /// The workload's end (its local address), as [`DestAddr::addr`].
    pub client_addr: [u32; 4],
    /// The proxy's end (the listener address), as [`DestAddr::addr`].
    pub proxy_addr: [u32; 4],
    /// The workload's local port, host byte order.
    pub client_port: u16,
    /// The proxy's port, host byte order.
    pub proxy_port: u16,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Indexes of the per-CPU counters in [`names::MAP_STATS`].
pub mod stats {
    /// TCP connects redirected to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// TCP connects refused because egress is `deny` and nothing allowed the destination.
    pub const TCP_DENIED: u32 = 1;
    /// UDP connects or datagrams refused.
    pub const UDP_DENIED: u32 = 2;
    /// Socket creations refused (raw sockets, unusual protocols).
    pub const SOCK_DENIED: u32 = 3;
    /// Binds of the proxy's port refused.
    pub const BIND_DENIED: u32 = 4;
    /// Connects refused because the gate was not configured yet.
    pub const NOT_READY: u32 = 5;
    /// Redirected connects whose record could not be stored (socket storage full).
    pub const RECORD_FAILED: u32 = 6;
    /// Direct connects to the proxy listener, which the proxy would refuse anyway.
    pub const PROXY_DIRECT: u32 = 7;
    /// Refusal events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

/// A refusal decided in the kernel, reported to the agent for the audit log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalEvent {
    /// cgroup v2 id of the refused task.
    pub cgroup_id: u64,
    /// The destination (connect, datagram) or local address (bind), as [`DestAddr::addr`];
    /// zero for socket creation.
    pub addr: [u32; 4],
    /// Thread-group id of the refused task.
    pub tgid: u32,
    /// Real uid of the refused task.
    pub uid: u32,
    /// Destination (or bound) port, host byte order; zero for socket creation.
    pub port: u16,
    /// Why: one of the refusal counters in [`stats`].
    pub reason: u8,
    /// Socket type (`SOCK_STREAM` = 1, `SOCK_DGRAM` = 2, `SOCK_RAW` = 3, ...).
    pub sock_type: u8,
    /// Socket protocol (`IPPROTO_TCP` = 6, `IPPROTO_UDP` = 17, ...).
    pub protocol: u16,
    /// Socket family ([`AF_INET`] or [`AF_INET6`]).
    pub family: u16,
}

/// Builds the IPv4-mapped form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// True when `addr` is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod pod {
    // All of these are `#[repr(C)]`, `Copy`, contain only integers and arrays of integers,
    // and have their padding spelled out as fields, so every bit pattern is valid.
    // SAFETY: see above.
    unsafe impl aya::Pod for super::GateConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::DestAddr {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::DestRules {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::Redirect {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RefusalEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GateConfig>(), 4 + 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<PortRule>(), 12);
        assert_eq!(size_of::<DestRules>(), 4 + 12 * MAX_PORT_RULES);
        assert_eq!(size_of::<Redirect>(), 56);
        assert_eq!(size_of::<ConnKey>(), 48);
        assert_eq!(size_of::<RefusalEvent>(), 40);
    }

    #[test]
    fn v4_mapping_round_trips() {
        let ip = u32::from_ne_bytes([10, 0, 0, 5]);
        let mapped = v4_mapped(ip);
        assert!(is_v4_mapped(&mapped));
        assert_eq!(mapped[3], ip);
        let mut bytes = [0u8; 16];
        for (i, w) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 5]
        );
        assert!(!is_v4_mapped(&[0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]));
    }
}
