//! Counting what one client does per minute, so that floods get 429s instead of work: failed
//! API authentications and sign-in starts per client network, calls per API token. Fixed
//! windows, a bounded map (a flood of keys evicts the oldest windows, never grows memory).

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Keys tracked at most per throttle.
pub const MAX_TRACKED: usize = 4096;

/// What [`Throttle::take`] says of a refused event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Until the window ends.
    pub left: Duration,
    /// The window's first refusal.
    pub first: bool,
}

/// At most `limit` events per key per `window`.
pub struct Throttle<K> {
    limit: u32,
    window: Duration,
    counts: Mutex<HashMap<K, (Instant, u32)>>,
}

/// The client network an address stands for: an IPv4 address, an IPv6 /64 (one host easily
/// owns a whole /64), an IPv4-mapped IPv6 address as its IPv4 address.
pub fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// How long `key` must wait, if it reached the limit in this window.
    pub fn blocked(&self, key: &K) -> Option<Duration> {
        let map = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, count) = map.get(key)?;
        let left = self.window.checked_sub(start.elapsed())?;
        (*count >= self.limit).then_some(left)
    }

    /// Counts one event of `key`.
    pub fn count(&self, key: K) {
        self.bump(key);
    }

    /// Counts one event of `key`, and refuses it past the limit: how long to wait, and
    /// whether this is the window's first refusal (to log a flood once, not per event).
    pub fn take(&self, key: K) -> Result<(), Refused> {
        let (start, n) = self.bump(key);
        if n <= self.limit {
            return Ok(());
        }
        Err(Refused {
            left: self.window.saturating_sub(start.elapsed()),
            first: n == self.limit + 1,
        })
    }

    /// Counts one event of `key` under one lock: its window's start and count now.
    fn bump(&self, key: K) -> (Instant, u32) {
        let mut map = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_TRACKED && !map.contains_key(&key) {
            map.retain(|_, (start, _)| start.elapsed() < self.window);
            if map.len() >= MAX_TRACKED {
                // Still full of live windows: drop the oldest, never grow without bound.
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        let entry = map.entry(key).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        *entry
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.counts.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_network_limits_stay_bounded() {
        let t = Throttle::new(10, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..9 {
            t.count(network(a));
        }
        assert_eq!(t.blocked(&network(a)), None, "below the limit");
        t.count(network(a));
        assert!(t.blocked(&network(a)).is_some(), "at the limit");
        assert!(t.take(network(a)).is_err());
        assert_eq!(
            t.blocked(&network(b)),
            None,
            "another address is not blocked"
        );
        // One IPv6 /64 is one client; another /64 is another; a mapped address is its v4.
        let v6 = |s: &str| network(s.parse::<IpAddr>().unwrap());
        for i in 0..10 {
            t.count(v6(&format!("2001:db8::{i:x}")));
        }
        assert!(t.blocked(&v6("2001:db8::ffff:1")).is_some());
        assert_eq!(t.blocked(&v6("2001:db8:0:1::1")), None);
        assert!(t.blocked(&v6("::ffff:192.0.2.1")).is_some());
        // A flood of addresses never grows the map past its bound.
        for i in 0..(MAX_TRACKED as u32 + 100) {
            t.count(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(t.tracked() <= MAX_TRACKED);
    }

    #[test]
    fn a_window_ends() {
        let t = Throttle::new(2, Duration::from_millis(50));
        assert!(t.take("k").is_ok());
        assert!(t.take("k").is_ok());
        assert!(t.take("k").is_err_and(|r| r.first));
        assert!(t.take("k").is_err_and(|r| !r.first), "said once");
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.take("k").is_ok(), "a new window");
    }
}
