//! What the host agent counts, under which names, and the Prometheus recorder behind it.
//!
//! Event metrics are recorded where the event happens, through the helpers below (one place
//! names each metric, so a typo cannot split a series). State metrics (active grants, pending
//! approvals, open sessions, the kernel's counters) are read when scraped: they are facts the
//! agent already keeps, and copying them on every change would put work on the data path.
//!
//! With no `metrics_listen` no recorder is installed and every helper is a no-op call.

use std::time::Duration;

use jitgate_common::stats;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::{
    inspect::rules::Detector,
    model::{Decision, SessionOutcome, Timestamp},
};

pub const CONNECTIONS: &str = "jitgate_connections_total";
pub const LIMIT_REFUSALS: &str = "jitgate_limit_refusals_total";
pub const SESSION_BYTES: &str = "jitgate_session_bytes_total";
pub const SESSIONS_OPEN: &str = "jitgate_sessions_open";
pub const SESSION_SETUP: &str = "jitgate_session_setup_seconds";
pub const STATEMENTS: &str = "jitgate_statements_total";
pub const STATEMENT_CHECK: &str = "jitgate_statement_check_seconds";
pub const MASKED: &str = "jitgate_masked_values_total";
pub const GRANTS_ACTIVE: &str = "jitgate_grants_active";
pub const REQUESTS_PENDING: &str = "jitgate_requests_pending";
pub const APPROVAL_WAIT: &str = "jitgate_approval_wait_seconds";
pub const KERNEL_REDIRECTS: &str = "jitgate_kernel_redirects_total";
pub const KERNEL_REFUSALS: &str = "jitgate_kernel_refusals_total";
pub const KERNEL_EVENTS_LOST: &str = "jitgate_kernel_events_lost_total";
pub const WEBHOOK_DELIVERIES: &str = "jitgate_webhook_deliveries_total";
pub const SPOOL_RECORDS: &str = "jitgate_store_spool_records_total";
pub const CHANGE_LOG_PRUNED: &str = "jitgate_store_change_log_pruned_total";
pub const STORE_WRITE_FAILURES: &str = "jitgate_store_write_failures_total";
pub const CHANGE_LOG_RESYNCS: &str = "jitgate_store_change_log_resyncs_total";
pub const SPOOLS_LOST: &str = "jitgate_store_spools_lost_total";
pub const BUILD_INFO: &str = "jitgate_build_info";
pub const STARTED: &str = "jitgate_start_time_seconds";

/// How one of the kernel's counters is exported as a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelMetric {
    /// [`KERNEL_REDIRECTS`].
    Redirects,
    /// [`KERNEL_REFUSALS`] with this `reason` label.
    Refusals(&'static str),
    /// [`KERNEL_EVENTS_LOST`].
    EventsLost,
}

/// One of the kernel's per-CPU counters and the names it goes by outside the agent.
#[derive(Clone, Copy, Debug)]
pub struct KernelCounter {
    /// Its index in the kernel's stats map ([`stats`]).
    pub index: u32,
    /// Its key in `jitgate status` (`kernel_counters`).
    pub status: &'static str,
    /// Its metric.
    pub metric: KernelMetric,
}

/// Every kernel counter, by index, with its status key and its metric. The two names differ
/// for the refusals (`tcp_denied` in status is `reason="tcp_egress"` in metrics); both are
/// published interfaces, so both stay, and this is the one table that says which is which.
pub const KERNEL_COUNTERS: [KernelCounter; stats::COUNT as usize] = {
    use KernelMetric::{EventsLost, Redirects, Refusals};
    const fn c(index: u32, status: &'static str, metric: KernelMetric) -> KernelCounter {
        KernelCounter {
            index,
            status,
            metric,
        }
    }
    [
        c(stats::REDIRECTED, "redirected", Redirects),
        c(stats::TCP_DENIED, "tcp_denied", Refusals("tcp_egress")),
        c(stats::UDP_DENIED, "udp_denied", Refusals("udp_egress")),
        c(stats::SOCK_DENIED, "socket_denied", Refusals("socket_type")),
        c(
            stats::BIND_DENIED,
            "bind_denied",
            Refusals("bind_proxy_port"),
        ),
        c(stats::NOT_READY, "not_ready", Refusals("not_ready")),
        c(
            stats::RECORD_FAILED,
            "record_failed",
            Refusals("record_failed"),
        ),
        c(
            stats::PROXY_DIRECT,
            "proxy_direct",
            Refusals("proxy_direct"),
        ),
        c(stats::EVENTS_LOST, "events_lost", EventsLost),
    ]
};

/// The kernel's counters as `jitgate status` reports them (`kernel_counters`).
pub fn kernel_status(
    values: &[u64; stats::COUNT as usize],
) -> std::collections::BTreeMap<String, u64> {
    KERNEL_COUNTERS
        .iter()
        .map(|c| (c.status.to_owned(), values[c.index as usize]))
        .collect()
}

/// Statement checks take microseconds; session setup includes an upstream login
/// (milliseconds); approvals wait for a human (minutes).
const FAST_BUCKETS: [f64; 12] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
    0.25,
];
const SETUP_BUCKETS: [f64; 11] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];
const WAIT_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0,
];

/// Installs the process-wide recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STATEMENT_CHECK.into()), &FAST_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SESSION_SETUP.into()), &SETUP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(APPROVAL_WAIT.into()), &WAIT_BUCKETS)?
        .install_recorder()?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(STARTED).set(Timestamp::now().millis() as f64 / 1000.0);
    Ok(handle)
}

fn describe() {
    describe_counter!(
        CONNECTIONS,
        "Gated connections that ended, by resource, identity and outcome (refusals included)."
    );
    describe_counter!(
        LIMIT_REFUSALS,
        "Connections refused by a concurrency limit or cut by startup_timeout, by limit and identity."
    );
    describe_counter!(
        SESSION_BYTES,
        Unit::Bytes,
        "Bytes relayed by ended sessions, by resource and direction (up: to the resource)."
    );
    describe_gauge!(SESSIONS_OPEN, "Sessions being relayed now.");
    describe_histogram!(
        SESSION_SETUP,
        Unit::Seconds,
        "From accepting a redirected connection to relaying it (grant lookup, upstream connect and login; approval waits excluded)."
    );
    describe_counter!(
        STATEMENTS,
        "PostgreSQL statements judged, by kind and decision (a prepared statement counts once, when parsed)."
    );
    describe_histogram!(
        STATEMENT_CHECK,
        Unit::Seconds,
        "Time the gate spends judging one statement string: parse, policy, record (approval waits excluded)."
    );
    describe_counter!(
        MASKED,
        "Values masked in results, by detector (column_rule: a masking rule on a named column)."
    );
    describe_gauge!(GRANTS_ACTIVE, "Grants active now.");
    describe_gauge!(REQUESTS_PENDING, "Requests waiting for a human decision.");
    describe_histogram!(
        APPROVAL_WAIT,
        Unit::Seconds,
        "From a request being filed to a human deciding it, by kind (grant, statement) and decision."
    );
    describe_counter!(
        KERNEL_REDIRECTS,
        "Connections the kernel programs steered to the proxy."
    );
    describe_counter!(
        KERNEL_REFUSALS,
        "Socket operations the kernel programs refused, by reason."
    );
    describe_counter!(
        KERNEL_EVENTS_LOST,
        "Refusal events the kernel could not queue for the audit log (the refusal itself still happened)."
    );
    describe_counter!(
        WEBHOOK_DELIVERIES,
        "Webhook events by webhook and outcome: delivered, rejected (a 4xx), failed (every attempt failed), dropped (the queue was full or fell behind the audit log)."
    );
    describe_counter!(
        SPOOL_RECORDS,
        "Fleet mode: records kept in the local spool while the shared store was out of reach, shipped to it since, and dropped (the spool full past its reserve, or damaged), by outcome."
    );
    describe_counter!(
        STORE_WRITE_FAILURES,
        "Writes (records, changes, transactions) the state store did not keep because the storage failed (a full disk, I/O errors); while any fail, the gate is closed."
    );
    describe_counter!(
        CHANGE_LOG_PRUNED,
        "Fleet mode: rows of the shared store's change log this host deleted as older than change_log_retention."
    );
    describe_counter!(
        CHANGE_LOG_RESYNCS,
        "Fleet mode: full reloads of live grants and waiting requests because the change log no longer held every change this host had not read (pruned past it, or cut in a failover or restore)."
    );
    describe_counter!(
        SPOOLS_LOST,
        "Fleet mode: times this host reached the shared store with a local spool other than the one the store knew as its current, which was not retired: records spooled after the last one shipped from it are lost (recorded as spool.lost in this host's audit chain)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which jitgated runs."
    );
    describe_gauge!(
        STARTED,
        Unit::Seconds,
        "When this jitgated started (unix time)."
    );
}

/// A session ended (or was refused before relaying).
pub fn session_ended(
    resource: Option<&str>,
    identity: Option<&str>,
    outcome: SessionOutcome,
    bytes: (u64, u64),
) {
    let resource = resource.unwrap_or("").to_owned();
    counter!(
        CONNECTIONS,
        "resource" => resource.clone(),
        "identity" => identity.unwrap_or("").to_owned(),
        "outcome" => outcome.as_str(),
    )
    .increment(1);
    if bytes.0 > 0 {
        counter!(SESSION_BYTES, "resource" => resource.clone(), "direction" => "up")
            .increment(bytes.0);
    }
    if bytes.1 > 0 {
        counter!(SESSION_BYTES, "resource" => resource, "direction" => "down").increment(bytes.1);
    }
}

/// Records kept in the local spool (fleet mode, store out of reach).
pub fn spool_kept(records: u64) {
    counter!(SPOOL_RECORDS, "outcome" => "kept").increment(records);
}

/// Spooled records written to the shared store.
pub fn spool_shipped(records: u64) {
    counter!(SPOOL_RECORDS, "outcome" => "shipped").increment(records);
}

/// Records neither written nor spooled.
pub fn spool_dropped(records: u64) {
    counter!(SPOOL_RECORDS, "outcome" => "dropped").increment(records);
}

/// A write the state store's storage did not keep.
pub fn store_write_failed() {
    counter!(STORE_WRITE_FAILURES).increment(1);
}

/// Change-log rows deleted by this host's pruner.
pub fn change_log_pruned(rows: u64) {
    counter!(CHANGE_LOG_PRUNED).increment(rows);
}

/// A full reload because the change log lost changes this host had not read.
pub fn change_log_resync() {
    counter!(CHANGE_LOG_RESYNCS).increment(1);
}

/// A replaced spool found whose unshipped records are lost.
pub fn spool_lost() {
    counter!(SPOOLS_LOST).increment(1);
}

/// How a webhook event ended (`delivered`, `rejected`, `failed`, `dropped`).
pub fn webhook_delivery(webhook: &str, outcome: &'static str, events: u64) {
    counter!(WEBHOOK_DELIVERIES, "webhook" => webhook.to_owned(), "outcome" => outcome)
        .increment(events);
}

/// A connection refused by a limit (`pending`, `sessions_per_identity`, `sessions_per_grant`,
/// `extra_upstreams_per_identity`, `agent`, `startup_timeout`).
pub fn limit_refusal(limit: &'static str, identity: &str) {
    counter!(LIMIT_REFUSALS, "limit" => limit, "identity" => identity.to_owned()).increment(1);
}

pub fn session_setup(protocol: &'static str, took: Duration) {
    metrics::histogram!(SESSION_SETUP, "protocol" => protocol).record(took.as_secs_f64());
}

/// One statement judged. `kind` is the statement's first kind (`select`, `ddl`, ...), or
/// `unparseable`.
pub fn statement(kind: &'static str, decision: Decision) {
    counter!(STATEMENTS, "kind" => kind, "decision" => decision.as_str()).increment(1);
}

pub fn statement_check(took: Duration) {
    metrics::histogram!(STATEMENT_CHECK).record(took.as_secs_f64());
}

/// Adds a result's masked values: per detector, and those masked by column rules.
pub fn masked(by_detector: &[u64; Detector::ALL.len()], by_column_rule: u64) {
    for (d, n) in Detector::ALL.iter().zip(by_detector) {
        if *n > 0 {
            counter!(MASKED, "detector" => d.as_str()).increment(*n);
        }
    }
    if by_column_rule > 0 {
        counter!(MASKED, "detector" => "column_rule").increment(by_column_rule);
    }
}

/// A human decided a request filed at `filed`.
pub fn approval_decided(kind: &'static str, decision: &'static str, filed: Timestamp) {
    let waited = (Timestamp::now().millis() - filed.millis()).max(0) as f64 / 1000.0;
    metrics::histogram!(APPROVAL_WAIT, "kind" => kind, "decision" => decision).record(waited);
}

/// State read at scrape time.
pub struct Snapshot {
    pub grants_active: usize,
    pub requests_pending: usize,
    pub sessions_open: usize,
    /// The kernel's per-CPU counters, summed; `None` when the map could not be read.
    pub kernel: Option<[u64; stats::COUNT as usize]>,
}

/// Publishes a snapshot's values into the recorder just before rendering.
pub fn publish(s: &Snapshot) {
    gauge!(GRANTS_ACTIVE).set(s.grants_active as f64);
    gauge!(REQUESTS_PENDING).set(s.requests_pending as f64);
    gauge!(SESSIONS_OPEN).set(s.sessions_open as f64);
    if let Some(k) = &s.kernel {
        for c in &KERNEL_COUNTERS {
            let value = k[c.index as usize];
            match c.metric {
                KernelMetric::Redirects => counter!(KERNEL_REDIRECTS).absolute(value),
                KernelMetric::Refusals(reason) => {
                    counter!(KERNEL_REFUSALS, "reason" => reason).absolute(value);
                }
                KernelMetric::EventsLost => counter!(KERNEL_EVENTS_LOST).absolute(value),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_once_in_index_order() {
        for (i, c) in KERNEL_COUNTERS.iter().enumerate() {
            assert_eq!(c.index as usize, i, "{}", c.status);
        }
    }

    /// The published names: `jitgate status` keys and the metrics' `reason` labels.
    #[test]
    fn kernel_counter_names_stay() {
        let status: Vec<&str> = KERNEL_COUNTERS.iter().map(|c| c.status).collect();
        assert_eq!(
            status,
            [
                "redirected",
                "tcp_denied",
                "udp_denied",
                "socket_denied",
                "bind_denied",
                "not_ready",
                "record_failed",
                "proxy_direct",
                "events_lost"
            ]
        );
        let reasons: Vec<(u32, &str)> = KERNEL_COUNTERS
            .iter()
            .filter_map(|c| match c.metric {
                KernelMetric::Refusals(r) => Some((c.index, r)),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [
                (stats::TCP_DENIED, "tcp_egress"),
                (stats::UDP_DENIED, "udp_egress"),
                (stats::SOCK_DENIED, "socket_type"),
                (stats::BIND_DENIED, "bind_proxy_port"),
                (stats::NOT_READY, "not_ready"),
                (stats::RECORD_FAILED, "record_failed"),
                (stats::PROXY_DIRECT, "proxy_direct"),
            ]
        );
        assert_eq!(
            KERNEL_COUNTERS[stats::REDIRECTED as usize].metric,
            KernelMetric::Redirects
        );
        assert_eq!(
            KERNEL_COUNTERS[stats::EVENTS_LOST as usize].metric,
            KernelMetric::EventsLost
        );
    }
}
