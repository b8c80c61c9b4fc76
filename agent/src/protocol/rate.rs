//! Statements (or requests) per second, per grant and per identity: a token bucket per key,
//! shared by every session of the agent, so that opening more connections buys no more.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Instant,
};

/// Buckets by key (`grant:ID`, `identity:NAME`).
#[derive(Default)]
pub struct Rates {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Most buckets kept; past it, full (idle) ones are dropped first.
const MAX_BUCKETS: usize = 65_536;

impl Rates {
    /// Takes one token from `key`'s bucket, which holds up to `per_second` tokens (a burst of
    /// one second) and refills at `per_second`. `false`: none left, the statement waits or is
    /// refused.
    pub fn take(&self, key: &str, per_second: u32) -> bool {
        self.take_at(key, per_second, Instant::now())
    }

    fn take_at(&self, key: &str, per_second: u32, now: Instant) -> bool {
        let rate = f64::from(per_second.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < rate);
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let rates = Rates::default();
        let t0 = Instant::now();
        let taken = (0..10).filter(|_| rates.take_at("grant:g", 5, t0)).count();
        assert_eq!(taken, 5);
        // Other keys have their own bucket.
        assert!(rates.take_at("identity:bot", 5, t0));
        // 400 ms later two more tokens have come in.
        let t1 = t0 + Duration::from_millis(400);
        let taken = (0..10).filter(|_| rates.take_at("grant:g", 5, t1)).count();
        assert_eq!(taken, 2);
        // Idle for long, the bucket holds no more than one second's worth.
        let t2 = t1 + Duration::from_secs(60);
        let taken = (0..10).filter(|_| rates.take_at("grant:g", 5, t2)).count();
        assert_eq!(taken, 5);
    }
}
