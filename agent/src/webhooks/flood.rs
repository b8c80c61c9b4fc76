//! A workload can make events as fast as it can send statements: a guardrail holds a
//! statement, the hold times out, the workload sends it again, and every round files a
//! `statement.held` request. Each would page the approvers' channel, burying the
//! notifications that matter and, on a Slack channel, getting the webhook rate-limited.
//! So each webhook sends at most [`BURST`] events of one kind caused by one identity at
//! once, then one per [`REFILL`]; the rest are not sent, counted
//! (`jitgate_webhook_deliveries_total{outcome="suppressed"}`) and logged. The audit log, the
//! console and `jitgate approvals` still have every one of them.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::model::AuditEvent;

/// Events of one kind from one identity sent back to back.
pub const BURST: u32 = 10;
/// Then one more per this long.
pub const REFILL: Duration = Duration::from_secs(6);
/// Sources tracked per webhook; past it, those whose budget is whole again are forgotten.
const TRACKED: usize = 4096;

/// One source's budget: a token bucket with whole tokens.
#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When `tokens` was last brought up to date (refills count from here).
    since: Instant,
    /// Events not sent since the last one that was.
    suppressed: u64,
}

/// What the limiter says of one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it; `suppressed` events of its source were held back before it.
    Send { suppressed: u64 },
    /// Do not send it (the first of a run: `first`, to log once).
    Suppress { first: bool },
}

/// The per-webhook limiter.
#[derive(Debug, Default)]
pub struct Flood {
    buckets: HashMap<(String, String), Bucket>,
}

/// Whom and what an event is about: the workload identity it names (else its actor) and the
/// resource. The resource is part of it so that a workload cannot spend its budget on
/// harmless refusals somewhere and then probe the resource that matters unannounced.
fn source(record: &AuditEvent) -> String {
    let field = |k: &str| record.detail.get(k).and_then(|v| v.as_str());
    let who = field("identity").unwrap_or(&record.actor);
    match field("resource") {
        Some(resource) => format!("{who}\u{0}{resource}"),
        None => who.to_owned(),
    }
}

/// Events about the gate itself (detached, reattached, tampering found) are rare and
/// always sent.
fn never_thinned(kind: &str) -> bool {
    kind.starts_with("gate.") || kind.starts_with("audit.")
}

impl Flood {
    pub fn judge(&mut self, record: &AuditEvent, now: Instant) -> Verdict {
        if never_thinned(&record.kind) {
            return Verdict::Send { suppressed: 0 };
        }
        if self.buckets.len() >= TRACKED {
            self.buckets
                .retain(|_, b| b.suppressed > 0 || refilled(b.tokens, b.since, now).0 < BURST);
        }
        let b = self
            .buckets
            .entry((record.kind.clone(), source(record)))
            .or_insert(Bucket {
                tokens: BURST,
                since: now,
                suppressed: 0,
            });
        (b.tokens, b.since) = refilled(b.tokens, b.since, now);
        if b.tokens == 0 {
            b.suppressed += 1;
            return Verdict::Suppress {
                first: b.suppressed == 1,
            };
        }
        b.tokens -= 1;
        Verdict::Send {
            suppressed: std::mem::take(&mut b.suppressed),
        }
    }
}

/// The bucket brought up to `now`: whole refills added, their time consumed (a partial one
/// keeps counting).
fn refilled(tokens: u32, since: Instant, now: Instant) -> (u32, Instant) {
    if tokens >= BURST {
        return (BURST, now);
    }
    let elapsed = now.saturating_duration_since(since);
    let whole = (elapsed.as_millis() / REFILL.as_millis()) as u32;
    if whole == 0 {
        return (tokens, since);
    }
    let tokens = tokens.saturating_add(whole).min(BURST);
    let since = if tokens == BURST {
        now
    } else {
        since + REFILL * whole
    };
    (tokens, since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    fn event(kind: &str, identity: &str) -> AuditEvent {
        AuditEvent {
            seq: 1,
            at: Timestamp::now(),
            kind: kind.into(),
            actor: format!("workload {identity}"),
            detail: serde_json::json!({ "identity": identity }),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn a_burst_passes_then_one_per_refill_and_the_held_back_are_counted() {
        let mut f = Flood::default();
        let t0 = Instant::now();
        let held = event("statement.held", "ci-bot");
        for _ in 0..BURST {
            assert_eq!(f.judge(&held, t0), Verdict::Send { suppressed: 0 });
        }
        assert_eq!(f.judge(&held, t0), Verdict::Suppress { first: true });
        for _ in 0..99 {
            assert_eq!(f.judge(&held, t0), Verdict::Suppress { first: false });
        }
        // Another resource of the same identity has its own budget: a workload cannot use
        // up its notifications somewhere harmless and then act unannounced elsewhere.
        let mut elsewhere = event("statement.held", "ci-bot");
        elsewhere.detail["resource"] = "prod-db".into();
        assert_eq!(f.judge(&elsewhere, t0), Verdict::Send { suppressed: 0 });
        // Events about the gate itself are never thinned.
        for _ in 0..(BURST * 2) {
            assert_eq!(
                f.judge(&event("gate.detached", "ci-bot"), t0),
                Verdict::Send { suppressed: 0 }
            );
        }
        // Another identity, and another kind of the same identity, have their own budgets.
        assert_eq!(
            f.judge(&event("statement.held", "etl"), t0),
            Verdict::Send { suppressed: 0 }
        );
        assert_eq!(
            f.judge(&event("request.filed", "ci-bot"), t0),
            Verdict::Send { suppressed: 0 }
        );
        // Just short of a refill: still held back.
        let t1 = t0 + REFILL - Duration::from_millis(1);
        assert_eq!(f.judge(&held, t1), Verdict::Suppress { first: false });
        // One refill: one event, which reports the 101 held back before it.
        let t2 = t0 + REFILL;
        assert_eq!(f.judge(&held, t2), Verdict::Send { suppressed: 101 });
        assert_eq!(f.judge(&held, t2), Verdict::Suppress { first: true });
        // Quiet for long enough: the whole burst again, never more.
        let t3 = t2 + REFILL * (BURST * 3);
        for _ in 0..BURST {
            assert!(matches!(f.judge(&held, t3), Verdict::Send { .. }));
        }
        assert!(matches!(f.judge(&held, t3), Verdict::Suppress { .. }));
    }

    #[test]
    fn sources_whose_budget_is_whole_again_are_forgotten() {
        let mut f = Flood::default();
        let t0 = Instant::now();
        for i in 0..(TRACKED * 3) {
            f.judge(&event("request.filed", &format!("id-{i}")), t0);
        }
        // Every source spent one token, so none is whole: all are kept until they are.
        assert!(f.buckets.len() >= TRACKED);
        let later = t0 + REFILL;
        f.judge(&event("request.filed", "late"), later);
        assert!(f.buckets.len() <= 2, "{}", f.buckets.len());
    }
}
