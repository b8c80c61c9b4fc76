//! Webhooks: approvers hear of what needs them where they are (Slack, a pager, a script),
//! not only by polling `jitgate approvals` on the agent's host.
//!
//! The source is the store's audit feed ([`crate::store::Store::audit_feed`]): an event is
//! sent only once it is committed to the audit log, exactly as the log holds it, so a
//! notification can never announce what did not happen. Each `[[webhook]]` has its own task
//! and a bounded queue: a slow or dead receiver delays only its own events, never the data
//! path or the other webhooks. Delivery is at least once while the agent runs (the record's
//! hash is the delivery id, the same on every retry, for receivers to drop duplicates),
//! retried with backoff ([`deliver::backoff`]) on network errors, 5xx, 408, 425 and 429. Up to
//! [`IN_FLIGHT`] events of one webhook are under way at once, so one event its receiver keeps
//! failing (minutes of backoff) does not hold back the ones behind it. Events about one
//! subject (one request, grant or session) are still sent in order, one after the other: a
//! receiver never hears of a request's approval before it hears it was filed, however the
//! first delivery is retried ([`Subjects`]). Events about different subjects may arrive out
//! of order (each carries its audit `seq` and time). What
//! is still queued when the agent stops, or dropped because a queue was full, is counted
//! (`jitgate_webhook_deliveries_total{outcome="dropped"}`) and logged: the audit log stays
//! the complete record.
//!
//! A flood of one event from one source (a workload re-sending a held statement) is thinned
//! out per webhook ([`flood`]).
//!
//! Every call is signed ([`sign`]) when the webhook has a `secret_file`; the key and a
//! `url_file` URL are re-read at each attempt, so rotating them needs no reload. A reload
//! that changes a webhook starts its task afresh.

pub mod deliver;
pub mod flood;
pub mod payload;
pub mod sign;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use hyper::body::Bytes;
use rustls::ClientConfig;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::deliver::Verdict;
use crate::{
    config::{Endpoint, SharedConfig, Webhook, WebhookTarget},
    model::AuditEvent,
    ops::metrics,
    store::SharedStore,
};

/// Events one webhook may have waiting; beyond, new ones are dropped (and counted).
const QUEUE: usize = 1024;

/// Events of one webhook being delivered (or waiting to retry) at once.
pub const IN_FLIGHT: usize = 4;

/// Starts the dispatcher: from the store's audit feed to each webhook's queue.
pub fn spawn(store: &SharedStore, config: SharedConfig, shutdown: CancellationToken) {
    let feed = store.audit_feed();
    tokio::spawn(dispatch(feed, config, shutdown));
}

/// One webhook's task, as started for its current definition.
struct Worker {
    spec: Webhook,
    queue: mpsc::Sender<AuditEvent>,
    flood: flood::Flood,
}

async fn dispatch(
    mut feed: broadcast::Receiver<AuditEvent>,
    config: SharedConfig,
    shutdown: CancellationToken,
) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    let mut workers: HashMap<String, Worker> = HashMap::new();
    loop {
        let record = tokio::select! {
            () = shutdown.cancelled() => break,
            r = feed.recv() => r,
        };
        let record = match record {
            Ok(r) => r,
            Err(broadcast::error::RecvError::Lagged(lost)) => {
                warn!(
                    lost,
                    "webhooks fell behind the audit log; those events are not sent (the log has them)"
                );
                for w in workers.keys() {
                    metrics::webhook_delivery(w, "dropped", lost);
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
        let current = config.get();
        sync_workers(&mut workers, &current.webhooks, &host, &shutdown);
        for w in workers.values_mut() {
            if !w.spec.events.contains(&record.kind.as_str()) {
                continue;
            }
            match w.flood.judge(&record, std::time::Instant::now()) {
                flood::Verdict::Send { suppressed: 0 } => {}
                flood::Verdict::Send { suppressed } => {
                    info!(webhook = %w.spec.name, event = %record.kind, actor = %record.actor, suppressed,
                          "webhook: sending again after holding back a flood of this event (the audit log has them)");
                }
                flood::Verdict::Suppress { first } => {
                    if first {
                        warn!(webhook = %w.spec.name, event = %record.kind, actor = %record.actor,
                              burst = flood::BURST, every = ?flood::REFILL,
                              "webhook: a flood of this event from one source; holding back all but one per interval (the audit log has them)");
                    }
                    metrics::webhook_delivery(&w.spec.name, "suppressed", 1);
                    continue;
                }
            }
            if w.queue.try_send(record.clone()).is_err() {
                warn!(webhook = %w.spec.name, event = %record.kind, seq = record.seq,
                      "webhook queue full (its receiver is slow or down); event dropped");
                metrics::webhook_delivery(&w.spec.name, "dropped", 1);
            }
        }
    }
    debug!("webhook dispatcher stopped");
}

/// Starts a task for each new or changed webhook and lets removed ones finish their queue.
fn sync_workers(
    workers: &mut HashMap<String, Worker>,
    wanted: &[Webhook],
    host: &str,
    shutdown: &CancellationToken,
) {
    workers.retain(|name, w| wanted.iter().any(|x| &x.name == name && *x == w.spec));
    for spec in wanted {
        if workers.contains_key(&spec.name) {
            continue;
        }
        let (queue, rx) = mpsc::channel(QUEUE);
        info!(webhook = %spec.name, events = ?spec.events, "webhook started");
        tokio::spawn(run_worker(
            spec.clone(),
            host.to_owned(),
            rx,
            shutdown.clone(),
        ));
        workers.insert(
            spec.name.clone(),
            Worker {
                spec: spec.clone(),
                queue,
                flood: flood::Flood::default(),
            },
        );
    }
}

async fn run_worker(
    spec: Webhook,
    host: String,
    mut rx: mpsc::Receiver<AuditEvent>,
    shutdown: CancellationToken,
) {
    let tls = crate::inspect::tls::system_client_config(spec.ca_file.as_deref());
    if let Err(e) = &tls {
        error!(webhook = %spec.name, error = %format!("{e:#}"), "webhook TLS setup failed; its events fail until the CA file is fixed and the config reloaded");
    }
    let (spec_ref, host_ref, tls_ref, stop) = (&spec, host.as_str(), &tls, &shutdown);
    let send = |record: AuditEvent| async move {
        let outcome = match tls_ref {
            Ok(tls) => deliver(spec_ref, tls, host_ref, &record, stop).await,
            Err(_) => "failed",
        };
        (outcome, record)
    };
    let mut running = FuturesUnordered::new();
    let mut order = Subjects::default();
    let mut open = true;
    while open || !running.is_empty() || !order.is_empty() {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some((outcome, record)) = running.next(), if !running.is_empty() => {
                metrics::webhook_delivery(&spec.name, outcome, 1);
                order.done(&record);
            }
            r = rx.recv(), if open && order.has_room() => match r {
                Some(record) => order.queue(record),
                // Removed or changed by a reload: finish what is under way.
                None => open = false,
            },
        }
        while running.len() < IN_FLIGHT {
            let Some(record) = order.next_ready() else {
                break;
            };
            running.push(send(record));
        }
    }
    if !open {
        return;
    }
    // Stopping: deliveries under way end at their next wait ("dropped").
    while let Some((outcome, _)) = running.next().await {
        metrics::webhook_delivery(&spec.name, outcome, 1);
    }
    let waiting = order.len() as u64;
    if waiting > 0 {
        metrics::webhook_delivery(&spec.name, "dropped", waiting);
    }
    // Stopping: what is still queued is not sent.
    rx.close();
    let mut left = 0u64;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    if left > 0 {
        warn!(webhook = %spec.name, events = left, "agent stopping: queued webhook events not sent (the audit log has them)");
        metrics::webhook_delivery(&spec.name, "dropped", left);
    }
}

/// Keeps the events of one subject in order while up to [`IN_FLIGHT`] events of different
/// subjects are under way: an event waits while an earlier one naming any of the same
/// request, grant or session is being delivered or waiting itself. Events naming none (gate,
/// configuration) never wait for others.
#[derive(Default)]
struct Subjects {
    /// In arrival order.
    waiting: std::collections::VecDeque<AuditEvent>,
    /// Subjects with a delivery under way, and how many.
    busy: HashMap<String, usize>,
}

impl Subjects {
    /// Ids an event is about: `request:ID`, `grant:ID`, `session:ID`. A session's events are
    /// about the session alone (they name their grant too, but ordering them behind the
    /// grant would let a workload opening many short sessions on one grant make the webhook
    /// deliver one event at a time).
    fn of(record: &AuditEvent) -> impl Iterator<Item = String> + '_ {
        let keys: &'static [&'static str] = if record.kind.starts_with("session.") {
            &["session"]
        } else {
            &["request", "grant"]
        };
        keys.iter().filter_map(|key| {
            record
                .detail
                .get(*key)
                .and_then(serde_json::Value::as_str)
                .map(|id| format!("{key}:{id}"))
        })
    }

    /// Events waiting here for an earlier one about the same subject do not stop the intake
    /// (one subject in backoff must not hold back the others); the bound is the webhook's
    /// queue size, so at most twice [`QUEUE`] events are held per webhook in all.
    fn has_room(&self) -> bool {
        self.waiting.len() < QUEUE
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    fn len(&self) -> usize {
        self.waiting.len()
    }

    fn queue(&mut self, record: AuditEvent) {
        self.waiting.push_back(record);
    }

    /// The first waiting event none of whose subjects is busy or named by an event waiting
    /// before it; marked busy.
    fn next_ready(&mut self) -> Option<AuditEvent> {
        let mut ahead: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut found = None;
        for (i, record) in self.waiting.iter().enumerate() {
            let subjects: Vec<String> = Self::of(record).collect();
            if subjects
                .iter()
                .all(|s| !self.busy.contains_key(s) && !ahead.contains(s))
            {
                found = Some(i);
                break;
            }
            ahead.extend(subjects);
        }
        let record = self.waiting.remove(found?)?;
        for subject in Self::of(&record) {
            *self.busy.entry(subject).or_default() += 1;
        }
        Some(record)
    }

    /// A delivery ended (however): its subjects are free for the next event.
    fn done(&mut self, record: &AuditEvent) {
        for subject in Self::of(record) {
            if let Some(n) = self.busy.get_mut(&subject) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&subject);
                }
            }
        }
    }
}

/// Sends one event, with retries: how it ended.
async fn deliver(
    spec: &Webhook,
    tls: &Arc<ClientConfig>,
    host: &str,
    record: &AuditEvent,
    shutdown: &CancellationToken,
) -> &'static str {
    let body = Bytes::from(payload::body(
        spec.format,
        record,
        &payload::Context {
            host,
            console_url: spec.console_url.as_deref(),
        },
    ));
    let mut failures = 0u32;
    loop {
        let attempt = failures + 1;
        let (retry_after, why) = match prepare(spec, record, &body, attempt) {
            Err(why) => (None, why),
            Ok((endpoint, headers)) => {
                match deliver::post(&endpoint, tls, &headers, body.clone(), spec.timeout).await {
                    Ok((status, retry_after)) => match Verdict::of(status, retry_after) {
                        Verdict::Delivered => {
                            debug!(webhook = %spec.name, event = %record.kind, seq = record.seq, attempt, "webhook delivered");
                            return "delivered";
                        }
                        Verdict::Rejected => {
                            error!(webhook = %spec.name, event = %record.kind, seq = record.seq, %status,
                                   receiver = %endpoint.origin(), "webhook receiver refused the event; not retried");
                            return "rejected";
                        }
                        Verdict::Retry(after) => {
                            (after, format!("{} answered {status}", endpoint.origin()))
                        }
                    },
                    Err(e) => (None, e.to_string()),
                }
            }
        };
        failures += 1;
        if failures >= spec.max_attempts {
            error!(webhook = %spec.name, event = %record.kind, seq = record.seq, attempts = failures,
                   error = %why, "webhook delivery failed; giving up on this event (the audit log has it)");
            return "failed";
        }
        let wait = deliver::backoff(failures, retry_after);
        warn!(webhook = %spec.name, event = %record.kind, seq = record.seq, attempt, error = %why,
              retry_in = ?wait, "webhook delivery failed; will retry");
        tokio::select! {
            () = shutdown.cancelled() => return "dropped",
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The headers one attempt adds.
type Headers = Vec<(&'static str, String)>;

/// Where to send this attempt and its headers (the URL file and key are read afresh, so a
/// rotation is picked up by the next attempt).
fn prepare(
    spec: &Webhook,
    record: &AuditEvent,
    body: &[u8],
    attempt: u32,
) -> Result<(Endpoint, Headers), String> {
    let endpoint = match &spec.target {
        WebhookTarget::Url(e) => e.clone(),
        WebhookTarget::UrlFile(path) => {
            let url = crate::secret_file::read(path).map_err(|e| e.to_string())?;
            // Never log the URL itself: it is the credential.
            Endpoint::parse(url.trim())
                .map_err(|_| format!("`{}` does not hold a webhook URL", path.display()))?
        }
    };
    let mut headers = vec![
        ("jitgate-event", record.kind.clone()),
        ("jitgate-delivery", record.hash.clone()),
        ("jitgate-attempt", attempt.to_string()),
    ];
    if let Some(path) = &spec.secret_file {
        // Fail closed: an event is never sent unsigned because its key went missing.
        let key = crate::secret_file::read(path).map_err(|e| format!("signing key: {e}"))?;
        // A key cut short by a rotation would sign calls anyone could forge.
        if key.len() < 16 {
            return Err(format!(
                "signing key: `{}` holds fewer than 16 bytes now",
                path.display()
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        headers.push((sign::HEADER, sign::signature(key.as_bytes(), now, body)));
    }
    Ok((endpoint, headers))
}
