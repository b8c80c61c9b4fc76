//! Running the host agent as a service: metrics and the health endpoint, systemd
//! readiness and watchdog, and where logs go.

pub mod health;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;

use futures_util::future::BoxFuture;
use jitgate_common::stats;

use crate::store::StoreError;

/// What the operations side reads from the running agent (the daemon implements it), so
/// that probes, the watchdog and scrapes need nothing else of it.
pub trait Vitals: Send + Sync {
    /// Whether the gate's links are still pinned; else what is wrong.
    fn gate_pinned(&self) -> Result<(), String>;
    /// Requests waiting for a decision: one store round trip, which also shows the store
    /// answers.
    fn pending_requests(&self) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// Whether the store keeps what it is given; else why not (a store that answers reads
    /// can still fail every write: a full disk).
    fn store_writes(&self) -> Result<(), String> {
        Ok(())
    }
    /// The kernel's per-CPU counters, summed; `None` when they cannot be read.
    fn kernel_counters(&self) -> Option<[u64; stats::COUNT as usize]>;
    fn grants_active(&self) -> usize;
    fn sessions_open(&self) -> usize;
}
