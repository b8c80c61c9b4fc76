//! Turns the kernel's refusal events, and the proxy's refused connections, into audit records.
//!
//! A workload that hammers a forbidden destination, or connects and closes without a grant,
//! must not flood the audit log: refusals are folded per key over a short window and written
//! as one record with a count and the processes involved.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
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
    model::{Session, SessionOutcome},
    store::{
        SharedStore,
        audit::{Event, KernelRefusal, ProxyRefusal},
    },
};

/// Events with the same key within this window become one audit record.
const WINDOW: Duration = Duration::from_secs(5);

/// Most distinct keys held per window; beyond this, events are only counted.
const MAX_KEYS: usize = 4096;

/// Distinct process ids listed per folded record.
const MAX_PIDS: usize = 8;

/// Proxy refusals per key and window written in full before the rest are only counted.
pub const FULL_PER_WINDOW: u64 = 10;

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

/// Refusals of the proxy (no grant, a limit, a startup timeout, no attribution), folded like
/// the kernel's: per (identity, uid, resource, destination, outcome) and window, the first
/// [`FULL_PER_WINDOW`] are written in full (`session.refused`, with their session records,
/// so an occasional refusal is on record as before) and the rest as one `sessions.refused`
/// record with their count, at the window's end. A connect-and-close flood thus writes a
/// bounded number of rows, whatever its rate.
#[derive(Clone)]
pub struct ProxyRefusals {
    inner: Arc<Mutex<ProxyWindow>>,
    window: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ProxyKey {
    identity: Option<String>,
    uid: u32,
    resource: Option<String>,
    destination: String,
    outcome: &'static str,
}

struct ProxyFolded {
    /// Refusals written in full this window.
    full: u64,
    /// Refusals beyond those.
    count: u64,
    pids: Vec<u32>,
    task: Option<String>,
    outcome: SessionOutcome,
    reason: String,
}

#[derive(Default)]
struct ProxyWindow {
    pending: HashMap<ProxyKey, ProxyFolded>,
    /// A task flushes the window at its end.
    flush_due: bool,
    lost: u64,
}

impl Default for ProxyRefusals {
    fn default() -> Self {
        Self::new(WINDOW)
    }
}

impl ProxyRefusals {
    pub fn new(window: Duration) -> Self {
        Self {
            inner: Arc::default(),
            window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyWindow> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a session refused before it relayed.
    pub fn record(&self, store: &SharedStore, shutdown: &CancellationToken, session: Session) {
        let key = ProxyKey {
            identity: session.identity.clone(),
            uid: session.uid,
            resource: session.resource.clone(),
            destination: session.destination.clone(),
            outcome: session.outcome.as_str(),
        };
        let mut w = self.lock();
        if let Some(folded) = w.pending.get_mut(&key) {
            if folded.full < FULL_PER_WINDOW {
                folded.full += 1;
                drop(w);
                store.session_refused(session);
                return;
            }
            folded.count += 1;
            if folded.pids.len() < MAX_PIDS && !folded.pids.contains(&session.pid) {
                folded.pids.push(session.pid);
            }
            folded.reason.clone_from(&session.detail);
            if !w.flush_due {
                w.flush_due = true;
                drop(w);
                self.schedule_flush(store, shutdown);
            }
            return;
        }
        if w.pending.len() >= MAX_KEYS {
            w.lost += 1;
            return;
        }
        w.pending.insert(
            key,
            ProxyFolded {
                full: 1,
                count: 0,
                pids: vec![session.pid],
                task: session.task.clone(),
                outcome: session.outcome,
                reason: session.detail.clone(),
            },
        );
        let schedule = !w.flush_due;
        w.flush_due = true;
        drop(w);
        store.session_refused(session);
        if schedule {
            self.schedule_flush(store, shutdown);
        }
    }

    /// Ends the window after [`Self::window`] (or at once on shutdown).
    fn schedule_flush(&self, store: &SharedStore, shutdown: &CancellationToken) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.flush(store);
            return;
        };
        let (this, store, shutdown, window) =
            (self.clone(), store.clone(), shutdown.clone(), self.window);
        runtime.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = shutdown.cancelled() => {}
            }
            this.flush(&store);
        });
    }

    /// Writes what the window folded and starts a new one.
    pub fn flush(&self, store: &SharedStore) {
        let (pending, lost) = {
            let mut w = self.lock();
            w.flush_due = false;
            (std::mem::take(&mut w.pending), std::mem::take(&mut w.lost))
        };
        if lost > 0 {
            warn!(
                lost,
                "proxy refusals folded away: too many distinct refusals"
            );
        }
        for (key, folded) in pending {
            if folded.count == 0 {
                continue;
            }
            info!(
                identity = key.identity.as_deref().unwrap_or("?"),
                resource = key.resource.as_deref().unwrap_or("-"),
                outcome = key.outcome,
                count = folded.count,
                "refused by the proxy"
            );
            let actor = format!("workload {}", key.identity.as_deref().unwrap_or("?"));
            store.submit_audit(
                actor,
                Event::SessionsRefused(ProxyRefusal {
                    identity: key.identity,
                    task: folded.task,
                    uid: key.uid,
                    pids: folded.pids,
                    resource: key.resource,
                    destination: key.destination,
                    outcome: folded.outcome,
                    reason: folded.reason,
                    count: folded.count,
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::Timestamp, store::MemoryStore};

    fn refused(identity: &str, pid: u32, outcome: SessionOutcome) -> Session {
        Session {
            id: crate::ids::new(crate::ids::Kind::Session),
            identity: Some(identity.into()),
            task: None,
            pid,
            uid: 65534,
            command: String::new(),
            resource: Some("db".into()),
            grant: None,
            destination: "10.0.0.1:5432".into(),
            started_at: Timestamp::now(),
            ended_at: Some(Timestamp::now()),
            bytes_up: 0,
            bytes_down: 0,
            outcome,
            detail: format!("refused {pid}"),
            database: None,
            access: None,
        }
    }

    #[tokio::test]
    async fn a_flood_of_refusals_writes_a_bounded_number_of_rows() {
        let store: SharedStore = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let folder = ProxyRefusals::new(Duration::from_secs(3600));
        const N: u32 = 20_000;
        for pid in 0..N {
            folder.record(
                &store,
                &shutdown,
                refused("bot", pid, SessionOutcome::RefusedNoGrant),
            );
            if pid % 2 == 0 {
                folder.record(
                    &store,
                    &shutdown,
                    refused("bot", pid, SessionOutcome::RefusedLimit),
                );
            }
        }
        // Another identity's refusal is its own record, not folded into the flood's.
        folder.record(
            &store,
            &shutdown,
            refused("other", 1, SessionOutcome::RefusedNoGrant),
        );
        folder.flush(&store);
        store.flush().await.expect("flush");
        let log = store.audit_log(None, 100_000).await.expect("audit");
        let kinds: Vec<&str> = log.iter().map(|r| r.kind.as_str()).collect();
        let full = 2 * FULL_PER_WINDOW + 1;
        assert_eq!(
            kinds.iter().filter(|k| **k == "session.refused").count() as u64,
            full,
            "the first refusals of each key in full: {kinds:?}"
        );
        let counts: u64 = log
            .iter()
            .filter(|r| r.kind == "sessions.refused")
            .map(|r| r.detail["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(log.len() as u64, full + 2, "{kinds:?}");
        assert_eq!(
            counts,
            u64::from(N) - FULL_PER_WINDOW + u64::from(N / 2) - FULL_PER_WINDOW
        );
        let sessions = store.sessions(false, 100_000).await.expect("sessions");
        assert_eq!(
            sessions.len() as u64,
            full,
            "session rows only for those in full"
        );
    }

    #[tokio::test]
    async fn the_window_is_flushed_by_itself() {
        let store: SharedStore = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let folder = ProxyRefusals::new(Duration::from_millis(200));
        for pid in 0..100 {
            folder.record(
                &store,
                &shutdown,
                refused("bot", pid, SessionOutcome::RefusedNoGrant),
            );
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        store.flush().await.expect("flush");
        let log = store.audit_log(None, 1000).await.expect("audit");
        assert_eq!(log.len() as u64, FULL_PER_WINDOW + 1);
        let last = log.last().expect("records");
        assert_eq!(last.kind, "sessions.refused");
        assert_eq!(last.detail["count"], 100 - FULL_PER_WINDOW);
        // The next window starts with a full record again.
        folder.record(
            &store,
            &shutdown,
            refused("bot", 7, SessionOutcome::RefusedNoGrant),
        );
        store.flush().await.expect("flush");
        let log = store.audit_log(None, 1000).await.expect("audit");
        assert_eq!(log.len() as u64, FULL_PER_WINDOW + 2);
    }
}
