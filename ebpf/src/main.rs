//! jitgate's kernel programs.
//!
//! Attached to the gate root cgroup (and to service cgroups gated by config), they decide the
//! fate of every socket a gated workload uses:
//!
//! * `connect4`/`connect6`: TCP to a resource is rewritten to the proxy listener and the
//!   original destination recorded; TCP elsewhere passes or is refused per the egress policy;
//!   UDP `connect()` only reaches resolvers (or anything but resources in `allow` mode).
//! * `sock_ops` (`TCP_CONNECT_CB`): once the redirected socket has its local port, its record is
//!   published under the connection's 4-tuple for the proxy to find on accept.
//! * `sendmsg4`/`sendmsg6`: the same UDP rule for unconnected datagrams.
//! * `getpeername4`/`getpeername6`: the workload sees the address it asked for.
//! * `sock_create`: only TCP and UDP sockets; raw sockets, ICMP, SCTP, MPTCP are refused.
//! * `bind4`/`bind6`: nobody in the gate binds the proxy's port.
//!
//! Every program fails closed: until the agent has marked the configuration ready, and whenever
//! a record cannot be stored, the operation is refused.
#![no_std]
#![no_main]

mod decide;

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{
        BPF_ANY, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock,
    },
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use jitgate_common::{
    AF_INET, AF_INET6, ConnKey, DestAddr, DestRules, EVENTS_BYTES, GateConfig, MAX_CGROUP_DEPTH,
    MAX_DEST_PREFIXES, MAX_GATED_UIDS, MAX_PENDING_CONNS, MAX_SUBTREES, Redirect, RefusalEvent,
    config_flags, mode, stats, v4_mapped,
};

use crate::decide::{Verdict, decide};

#[btf_map]
static JG_CONFIG: Array<GateConfig, 1> = Array::new();

#[btf_map]
static JG_DEST: LpmTrie<DestAddr, DestRules, { MAX_DEST_PREFIXES as usize }> = LpmTrie::new();

#[btf_map]
static JG_SOCK: SkStorage<Redirect> = SkStorage::new();

#[btf_map]
static JG_CONNS: LruHashMap<ConnKey, Redirect, { MAX_PENDING_CONNS as usize }> = LruHashMap::new();

#[btf_map]
static JG_STATS: PerCpuArray<u64, { stats::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static JG_UIDS: HashMap<u32, u8, { MAX_GATED_UIDS as usize }> = HashMap::new();

#[btf_map]
static JG_SUBTREES: HashMap<u64, u8, { MAX_SUBTREES as usize }> = HashMap::new();

#[btf_map]
static JG_EVENTS: RingBuf<RefusalEvent, { EVENTS_BYTES as usize }> = RingBuf::new();

/// Which instance this is ([`mode`]); set by the agent at load time, so the verifier prunes
/// the other branch.
#[unsafe(no_mangle)]
static JG_MODE: Global<u8> = Global::new(mode::SUBTREE);

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// Return value of a cgroup socket hook that lets the operation proceed.
const PROCEED: i32 = 1;
/// Return value that makes the syscall fail with `EPERM`.
const REFUSE: i32 = 0;

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = JG_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Whether this instance acts on the current task. The subtree instance acts on everything
/// it is attached under. The uid instance (attached to the cgroup2 root) acts only on gated
/// uids, and leaves tasks inside a gated subtree to the subtree instance.
#[inline(always)]
fn in_scope() -> bool {
    if JG_MODE.load() == mode::SUBTREE {
        return true;
    }
    let uid = bpf_get_current_uid_gid() as u32;
    if JG_UIDS.get_ptr(uid).is_none() {
        return false;
    }
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper with an integer argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if JG_SUBTREES.get_ptr(id).is_some() {
            return false;
        }
        level += 1;
    }
    true
}

/// Reports a refusal to the agent (best effort: a full ring buffer loses the event, which
/// is counted).
#[inline(always)]
fn report(reason: u8, addr: [u32; 4], port: u16, sock_type: u32, protocol: u32, family: u32) {
    let (tgid, uid_gid) = (bpf_get_current_pid_tgid(), bpf_get_current_uid_gid());
    let event = RefusalEvent {
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        addr,
        tgid: (tgid >> 32) as u32,
        uid: uid_gid as u32,
        port,
        reason,
        sock_type: sock_type as u8,
        protocol: protocol as u16,
        family: family as u16,
    };
    if JG_EVENTS.output(&event, 0).is_err() {
        count(stats::EVENTS_LOST);
    }
}

/// Counts and reports a refused socket-address operation.
#[inline(always)]
fn refuse_addr(ctx: &SockAddrContext, reason: u32, addr: [u32; 4], port: u16) -> i32 {
    count(reason);
    // SAFETY: context field reads.
    let (sock_type, protocol, family) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.type_, sa.protocol, sa.family)
    };
    report(reason as u8, addr, port, sock_type, protocol, family);
    REFUSE
}

/// The gate configuration, or `None` while the agent has not finished filling the maps.
#[inline(always)]
fn ready_config() -> Option<&'static GateConfig> {
    let cfg = JG_CONFIG.get(0)?;
    if cfg.flags & config_flags::READY == 0 {
        return None;
    }
    Some(cfg)
}

#[inline(always)]
fn map_ptr<T>(map: &T) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}

/// Reads `user_ip6` word by word: the verifier only accepts 4-byte accesses on every kernel we
/// support, and the compiler would otherwise be free to merge them.
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reading plain context fields.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(words: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: writing plain context fields, one 4-byte store each (see `read_ip6`).
    unsafe {
        core::ptr::write_volatile(&mut words[0], value[0]);
        core::ptr::write_volatile(&mut words[1], value[1]);
        core::ptr::write_volatile(&mut words[2], value[2]);
        core::ptr::write_volatile(&mut words[3], value[3]);
    }
}

/// `user_port` holds a network-order port in its first two bytes.
#[inline(always)]
fn port_from_ctx(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn port_to_ctx(port: u16) -> u32 {
    u32::from(port.to_be())
}

/// The socket behind a `sock_addr` context.
#[inline(always)]
fn sock_of(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: `sk` is always set for the sock_addr attach points we use.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// Shared body of `connect4` and `connect6`. `dst` is the destination as the workload gave
/// it (IPv4 already mapped), `family` the socket's family.
#[inline(always)]
fn on_connect(ctx: &SockAddrContext, dst: [u32; 4], port: u16, family: u16) -> Connect {
    let Some(cfg) = ready_config() else {
        refuse_addr(ctx, stats::NOT_READY, dst, port);
        return Connect::Refuse;
    };
    // SAFETY: context field read.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    let is_stream = sock_type == SOCK_STREAM;

    match decide(&JG_DEST, cfg, dst, port, is_stream) {
        Verdict::Pass => {
            forget(ctx);
            Connect::Proceed
        }
        Verdict::AlreadyRedirected => {
            // Another instance of these programs (a nested gate) already steered this socket to
            // the proxy; its record stands.
            if has_record(ctx) {
                Connect::Proceed
            } else {
                refuse_addr(ctx, stats::PROXY_DIRECT, dst, port);
                Connect::Refuse
            }
        }
        Verdict::Refuse => {
            forget(ctx);
            let reason = if is_stream {
                stats::TCP_DENIED
            } else {
                stats::UDP_DENIED
            };
            refuse_addr(ctx, reason, dst, port);
            debug!(ctx, "refused connect to port {}", port);
            Connect::Refuse
        }
        Verdict::Redirect { resource } => {
            let (tgid, uid_gid) = (bpf_get_current_pid_tgid(), bpf_get_current_uid_gid());
            let record = Redirect {
                orig_addr: dst,
                orig_port: port,
                family,
                resource,
                // SAFETY: helpers without pointer arguments, or taking the program context.
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                tgid: (tgid >> 32) as u32,
                uid: uid_gid as u32,
                gid: (uid_gid >> 32) as u32,
                _pad: 0,
            };
            // SAFETY: the map pointer is our socket-storage map and `sk` comes from the context.
            let slot = unsafe {
                bpf_sk_storage_get(
                    map_ptr(&JG_SOCK),
                    sock_of(ctx).cast(),
                    core::ptr::null_mut(),
                    BPF_SK_STORAGE_GET_F_CREATE.into(),
                )
            }
            .cast::<Redirect>();
            if slot.is_null() {
                refuse_addr(ctx, stats::RECORD_FAILED, dst, port);
                return Connect::Refuse;
            }
            // SAFETY: non-null pointer to this socket's storage, sized for `Redirect`.
            unsafe { *slot = record };
            count(stats::REDIRECTED);
            debug!(ctx, "redirect resource {} port {} to proxy", resource, port);
            Connect::Redirect(cfg)
        }
    }
}

enum Connect {
    Proceed,
    Refuse,
    Redirect(&'static GateConfig),
}

#[inline(always)]
fn has_record(ctx: &SockAddrContext) -> bool {
    // SAFETY: lookup without create on our socket-storage map.
    let slot = unsafe {
        bpf_sk_storage_get(
            map_ptr(&JG_SOCK),
            sock_of(ctx).cast(),
            core::ptr::null_mut(),
            0,
        )
    };
    !slot.is_null()
}

/// Drops a stale record when a socket is re-connected (after `connect(AF_UNSPEC)`) somewhere
/// that is not a resource, so `getpeername` stops rewriting.
#[inline(always)]
fn forget(ctx: &SockAddrContext) {
    // SAFETY: delete on our socket-storage map; a missing entry is not an error we act on.
    let _ = unsafe { bpf_sk_storage_delete(map_ptr(&JG_SOCK), sock_of(ctx).cast()) };
}

#[cgroup_sock_addr(connect4)]
pub fn jg_connect4(ctx: SockAddrContext) -> i32 {
    if !in_scope() {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = v4_mapped(sa.user_ip4);
    let port = port_from_ctx(sa.user_port);
    match on_connect(&ctx, dst, port, AF_INET) {
        Connect::Proceed => PROCEED,
        Connect::Refuse => REFUSE,
        Connect::Redirect(cfg) => {
            sa.user_ip4 = cfg.proxy_ip4;
            sa.user_port = port_to_ctx(cfg.proxy_port);
            PROCEED
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn jg_connect6(ctx: SockAddrContext) -> i32 {
    if !in_scope() {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = read_ip6(&sa.user_ip6);
    let port = port_from_ctx(sa.user_port);
    match on_connect(&ctx, dst, port, AF_INET6) {
        Connect::Proceed => PROCEED,
        Connect::Refuse => REFUSE,
        Connect::Redirect(cfg) => {
            // A v4-mapped destination stays on the IPv4 path (the socket may be dual-stack
            // only); a native IPv6 one goes to the IPv6 listener.
            let proxy = if jitgate_common::is_v4_mapped(&dst) {
                v4_mapped(cfg.proxy_ip4)
            } else {
                cfg.proxy_ip6
            };
            write_ip6(&mut sa.user_ip6, proxy);
            sa.user_port = port_to_ctx(cfg.proxy_port);
            PROCEED
        }
    }
}

/// Unconnected UDP datagrams: the same decision as a UDP `connect()`, without redirects.
#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, dst: [u32; 4], port: u16) -> i32 {
    if !in_scope() {
        return PROCEED;
    }
    let Some(cfg) = ready_config() else {
        return refuse_addr(ctx, stats::NOT_READY, dst, port);
    };
    match decide(&JG_DEST, cfg, dst, port, false) {
        Verdict::Pass => PROCEED,
        _ => refuse_addr(ctx, stats::UDP_DENIED, dst, port),
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn jg_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    on_sendmsg(&ctx, v4_mapped(ip), port_from_ctx(port))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn jg_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ip, port) = unsafe {
        (
            read_ip6(&(*ctx.sock_addr).user_ip6),
            (*ctx.sock_addr).user_port,
        )
    };
    on_sendmsg(&ctx, ip, port_from_ctx(port))
}

/// The redirect record of the socket behind `ctx`, if it was redirected.
#[inline(always)]
fn record_of(ctx: &SockAddrContext) -> Option<&'static Redirect> {
    // SAFETY: lookup without create on our socket-storage map.
    let slot = unsafe {
        bpf_sk_storage_get(
            map_ptr(&JG_SOCK),
            sock_of(ctx).cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<Redirect>();
    // SAFETY: non-null storage pointers stay valid for the program's run.
    unsafe { slot.as_ref() }
}

#[cgroup_sock_addr(getpeername4)]
pub fn jg_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(record) = record_of(&ctx) {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = record.orig_addr[3];
        sa.user_port = port_to_ctx(record.orig_port);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn jg_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(record) = record_of(&ctx) {
        // SAFETY: the context pointer is valid for the program's run.
        let sa = unsafe { &mut *ctx.sock_addr };
        write_ip6(&mut sa.user_ip6, record.orig_addr);
        sa.user_port = port_to_ctx(record.orig_port);
    }
    PROCEED
}

#[inline(always)]
fn on_bind(ctx: &SockAddrContext, addr: [u32; 4], port: u16) -> i32 {
    if !in_scope() {
        return PROCEED;
    }
    let Some(cfg) = ready_config() else {
        return refuse_addr(ctx, stats::NOT_READY, addr, port);
    };
    if port != 0 && port == cfg.proxy_port {
        return refuse_addr(ctx, stats::BIND_DENIED, addr, port);
    }
    PROCEED
}

#[cgroup_sock_addr(bind4)]
pub fn jg_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    on_bind(&ctx, v4_mapped(ip), port_from_ctx(port))
}

#[cgroup_sock_addr(bind6)]
pub fn jg_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (ip, port) = unsafe {
        (
            read_ip6(&(*ctx.sock_addr).user_ip6),
            (*ctx.sock_addr).user_port,
        )
    };
    on_bind(&ctx, ip, port_from_ctx(port))
}

/// Runs for `AF_INET`/`AF_INET6` socket creation only (the kernel calls this hook from
/// `inet_create`/`inet6_create`), after the protocol has been resolved.
#[cgroup_sock(sock_create)]
pub fn jg_sock_create(ctx: SockContext) -> i32 {
    if !in_scope() {
        return PROCEED;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { &*ctx.sock };
    let family = sk.family;
    let allowed = (family == u32::from(AF_INET) || family == u32::from(AF_INET6))
        && matches!(
            (sk.type_, sk.protocol),
            (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP)
        );
    if allowed {
        PROCEED
    } else {
        count(stats::SOCK_DENIED);
        report(
            stats::SOCK_DENIED as u8,
            [0; 4],
            0,
            sk.type_,
            sk.protocol,
            family,
        );
        REFUSE
    }
}

/// Publishes a redirected socket's record under its 4-tuple once the local port is known,
/// and withdraws it when the socket closes: a record outliving its socket (a connect the proxy
/// never accepted) would let whoever binds that client port next pass for the workload.
#[sock_ops]
pub fn jg_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && !closing {
        return 1;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: lookup without create on our socket-storage map, `sk` checked non-null.
    let slot =
        unsafe { bpf_sk_storage_get(map_ptr(&JG_SOCK), sk.cast(), core::ptr::null_mut(), 0) }
            .cast::<Redirect>();
    // SAFETY: non-null storage pointers stay valid for the program's run.
    let Some(record) = (unsafe { slot.as_ref() }) else {
        return 1;
    };
    let (client_addr, proxy_addr) = if ctx.family() == u32::from(AF_INET) {
        (v4_mapped(ctx.local_ip4()), v4_mapped(ctx.remote_ip4()))
    } else {
        // SAFETY: context field reads, word by word.
        unsafe {
            (
                read_ip6(&(*ctx.ops).local_ip6),
                read_ip6(&(*ctx.ops).remote_ip6),
            )
        }
    };
    let key = ConnKey {
        netns_cookie: record.netns_cookie,
        client_addr,
        proxy_addr,
        client_port: ctx.local_port() as u16,
        proxy_port: remote_port(ctx.remote_port()),
        _pad: 0,
    };
    if closing {
        // Usually gone already: the proxy takes the record when it accepts.
        let _ = JG_CONNS.remove(&key);
        return 1;
    }
    let _ = JG_CONNS.insert(&key, record, BPF_ANY.into());
    // State changes of this socket from now on, for the removal above. Failure leaves the
    // record to the LRU and to the agent's start-up sweep.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    1
}

/// `bpf_sock_ops.remote_port` is the network-order 16-bit port, shifted into the upper half of
/// the word on little-endian machines.
#[inline(always)]
fn remote_port(word: u32) -> u16 {
    if cfg!(target_endian = "little") {
        u16::from_be((word >> 16) as u16)
    } else {
        u16::from_be(word as u16)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
