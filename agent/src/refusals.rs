//! Turns the kernel's refusal events into audit records.
//!
//! A workload that hammers a forbidden destination must not flood the audit log: events are
//! folded per (workload cgroup, uid, reason, destination) over a short window and written as
//! one record with a count and the processes involved.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use jitgate_common::{RefusalEvent, stats};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    gate::{decode_event, rules::from_words},
    identity::{Attribution, Workloads},
    store::{
        SharedStore,
        audit::{Event, KernelRefusal},
    },
};

/// Events with the same key within this window become one audit record.
const WINDOW: Duration = Duration::from_secs(5);

/// Most distinct keys held per window; beyond this, events are only counted.
const MAX_KEYS: usize = 4096;

/// Distinct process ids listed per folded record.
const MAX_PIDS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    cgroup_id: u64,
    uid: u32,
    reason: u8,
    addr: [u32; 4],
    port: u16,
    sock_type: u8,
    protocol: u16,
}

fn reason_name(reason: u8) -> &'static str {
    match u32::from(reason) {
        stats::TCP_DENIED => "egress denied (tcp)",
        stats::UDP_DENIED => "egress denied (udp)",
        stats::SOCK_DENIED => "socket type not allowed",
        stats::BIND_DENIED => "bind of the proxy port",
        stats::NOT_READY => "gate not configured yet",
        stats::RECORD_FAILED => "redirect record could not be stored",
        stats::PROXY_DIRECT => "direct connection to the proxy",
        _ => "refused",
    }
}

fn event(reason: u8, refusal: KernelRefusal) -> Event {
    match u32::from(reason) {
        stats::SOCK_DENIED => Event::SocketRefused(refusal),
        stats::BIND_DENIED => Event::BindRefused(refusal),
        _ => Event::ConnectRefused(refusal),
    }
}

/// What a window has seen for one key.
struct Folded {
    attribution: Option<Attribution>,
    count: u64,
    pids: Vec<u32>,
}

fn flush(pending: &mut HashMap<Key, Folded>, store: &SharedStore) {
    for (key, folded) in pending.drain() {
        let Folded {
            attribution,
            count,
            pids,
        } = folded;
        let destination = (key.port != 0 || key.addr != [0; 4])
            .then(|| SocketAddr::new(from_words(key.addr), key.port).to_string());
        let reason = reason_name(key.reason);
        info!(
            identity = attribution.as_ref().map_or("?", |a| a.identity.as_str()),
            ?pids,
            destination = destination.as_deref().unwrap_or("-"),
            reason,
            count,
            "refused in the kernel"
        );
        let actor = format!(
            "workload {}",
            attribution.as_ref().map_or("?", |a| a.identity.as_str())
        );
        let refusal = KernelRefusal {
            identity: attribution.as_ref().map(|a| a.identity.clone()),
            task: attribution.as_ref().and_then(|a| a.task.clone()),
            pids,
            uid: key.uid,
            destination,
            socket_type: key.sock_type,
            protocol: key.protocol,
            reason: reason.to_owned(),
            count,
        };
        store.submit_audit(actor, event(key.reason, refusal));
    }
}

/// Reads refusal events until shutdown.
pub fn spawn(
    events: RingBuf<MapData>,
    workloads: Workloads,
    store: SharedStore,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        // SAFETY: the ring buffer owns its descriptor, which stays open and unchanged for as
        // long as the AsyncFd owns the ring buffer.
        let mut fd =
            match unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
            {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "cannot read kernel refusal events; they are only counted");
                    return;
                }
            };
        let mut pending: HashMap<Key, Folded> = HashMap::new();
        let mut lost = 0u64;
        let mut window_start = Instant::now();
        let mut tick = tokio::time::interval(WINDOW);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if window_start.elapsed() >= WINDOW {
                        flush(&mut pending, &store);
                        if lost > 0 {
                            warn!(lost, "refusal events folded away: too many distinct refusals");
                            lost = 0;
                        }
                        window_start = Instant::now();
                    }
                }
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { break };
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        let Some(e): Option<RefusalEvent> = decode_event(&item) else { continue };
                        let key = Key {
                            cgroup_id: e.cgroup_id,
                            uid: e.uid,
                            reason: e.reason,
                            addr: e.addr,
                            port: e.port,
                            sock_type: e.sock_type,
                            protocol: e.protocol,
                        };
                        if let Some(folded) = pending.get_mut(&key) {
                            folded.count += 1;
                            if folded.pids.len() < MAX_PIDS && !folded.pids.contains(&e.tgid) {
                                folded.pids.push(e.tgid);
                            }
                        } else if pending.len() < MAX_KEYS {
                            // Attribute now, while the task's cgroup is certain to be known.
                            let attribution = workloads.attribute(key.cgroup_id, key.uid);
                            pending.insert(key, Folded { attribution, count: 1, pids: vec![e.tgid] });
                        } else {
                            lost += 1;
                        }
                    }
                    guard.clear_ready();
                }
            }
        }
        flush(&mut pending, &store);
    });
}
