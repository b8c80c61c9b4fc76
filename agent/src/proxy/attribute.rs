//! Who made a redirected connection, and where it was going.
//!
//! In the agent this is the kernel's record (read and deleted in one syscall from the
//! connection table) plus the cgroup-to-workload map; tests put a fake in its place, so the
//! proxy's logic runs without BPF.

use std::net::SocketAddr;

use crate::{
    gate::{ConnTable, rules::from_words},
    identity::{Attribution, Workloads},
};

/// What the gate recorded about a connection at `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The destination the workload asked for, before the rewrite to the proxy.
    pub original: SocketAddr,
    /// The connecting process (thread group id) and its uid.
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
}

/// Attributes accepted connections.
pub trait Attributor: Send + Sync {
    /// The gate's record of the connection from `peer` to the proxy's `local` address,
    /// consumed (a record serves one connection). `Ok(None)`: the connection did not come
    /// through the gate.
    fn origin(&self, peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<Origin>>;

    /// The workload the connecting process belongs to, if any.
    fn workload(&self, origin: &Origin) -> Option<Attribution>;
}

/// The agent's attributor: the kernel's connection table and the configured workloads.
pub struct Kernel {
    pub conns: ConnTable,
    pub workloads: Workloads,
}

impl Attributor for Kernel {
    fn origin(&self, peer: SocketAddr, local: SocketAddr) -> std::io::Result<Option<Origin>> {
        Ok(self.conns.take(peer, local)?.map(|r| Origin {
            original: SocketAddr::new(from_words(r.orig_addr), r.orig_port),
            pid: r.tgid,
            uid: r.uid,
            cgroup_id: r.cgroup_id,
        }))
    }

    fn workload(&self, origin: &Origin) -> Option<Attribution> {
        self.workloads.attribute(origin.cgroup_id, origin.uid)
    }
}
