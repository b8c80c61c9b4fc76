//! Whether a shared store can be relied on right now, and for how long what this host last
//! confirmed with it still holds (the lease).
//!
//! A shared store (fleet mode) can be out of reach while the agent runs. Enforcement stays
//! local, but a host cut off from the store cannot learn of a revocation made elsewhere, so
//! what it holds is trusted only for `store_lease` after it last confirmed it: a completed
//! read of the change log. The store's follower reports here ([`StoreHealth::confirmed`],
//! [`StoreHealth::lost`]); the grant engine and the proxy read it ([`Health`]). The embedded
//! store has no such state: it is always there.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::StoreError;
use crate::model::Timestamp;

/// Where the connection to a shared store stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    /// Not reached yet since the agent started: no grants, the gate closed.
    Connecting,
    /// Reached, migrated and followed.
    Up,
    /// Reached before, out of reach now.
    Lost,
}

impl StoreState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Lost => "lost",
        }
    }
}

/// A snapshot of a shared store's health.
#[derive(Clone, Debug)]
pub struct Health {
    pub state: StoreState,
    /// When `state` began.
    pub since: Timestamp,
    /// The last time this host completed a read of the store's change log: everything
    /// decided elsewhere up to then has been heard.
    pub confirmed: Option<Instant>,
    /// Bumped on every (re)connection: a reader that acted on an older epoch has to look
    /// again (the grant engine reloads its live grants) before it counts the lease renewed.
    pub epoch: u64,
    /// The epoch of the last confirmation: until the change log has been read on the
    /// current connection, what was missed while cut off may not have been heard yet.
    pub confirmed_epoch: u64,
    /// Why the store is out of reach (the last error).
    pub error: Option<String>,
    /// How long a confirmation holds.
    pub lease: Duration,
    /// Where the store is (its url, no password), for errors.
    pub url: String,
}

impl Health {
    /// Whether what was last confirmed is older than the lease (or nothing ever was).
    pub fn lease_lapsed(&self, now: Instant) -> bool {
        self.confirmed
            .is_none_or(|at| now.saturating_duration_since(at) > self.lease)
    }

    /// Whether new grants may be issued and new sessions opened: the store is up and was
    /// confirmed within the lease (an unanswered read on a half-open connection counts as
    /// lost once the lease runs out, even before the connection is known to be gone).
    pub fn available(&self, now: Instant) -> bool {
        self.state == StoreState::Up
            && self.confirmed_epoch == self.epoch
            && !self.lease_lapsed(now)
    }

    /// The error callers get while the store is not available.
    pub fn unavailable(&self) -> StoreError {
        let what = match self.state {
            StoreState::Connecting => "has not been reached since the agent started",
            StoreState::Lost => "is out of reach",
            StoreState::Up => "has not answered within store_lease",
        };
        let why = self
            .error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        StoreError::Unavailable(format!(
            "the shared state store at {} {what} since {}{why}: no grant can be issued or \
             used until it is back; `jitgate status` shows the store, and the agent keeps retrying",
            self.url, self.since,
        ))
    }
}

/// The writing side: held by the store, cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreHealth {
    tx: watch::Sender<Health>,
}

impl StoreHealth {
    /// A store not reached yet.
    pub fn new(url: String, lease: Duration) -> Self {
        let (tx, _) = watch::channel(Health {
            state: StoreState::Connecting,
            since: Timestamp::now(),
            confirmed: None,
            epoch: 0,
            confirmed_epoch: 0,
            error: None,
            lease,
            url,
        });
        Self { tx }
    }

    pub fn subscribe(&self) -> watch::Receiver<Health> {
        self.tx.subscribe()
    }

    pub fn get(&self) -> Health {
        self.tx.borrow().clone()
    }

    /// `Ok` when the store may be used now, else the error that says why not.
    pub fn check(&self) -> Result<(), StoreError> {
        let h = self.tx.borrow();
        if h.available(Instant::now()) {
            Ok(())
        } else {
            Err(h.unavailable())
        }
    }

    /// A new connection is up: a new epoch begins (not yet confirmed on it).
    pub fn connected(&self) {
        self.tx.send_modify(|h| {
            h.epoch += 1;
            if h.state != StoreState::Up {
                h.state = StoreState::Up;
                h.since = Timestamp::now();
            }
            h.error = None;
        });
    }

    /// The change log was read to its end at `at` (taken before the read began: what was
    /// committed before then has been heard).
    pub fn confirmed(&self, at: Instant) {
        self.tx.send_modify(|h| {
            if h.state == StoreState::Up {
                h.confirmed = Some(h.confirmed.map_or(at, |c| c.max(at)));
                h.confirmed_epoch = h.epoch;
            }
        });
    }

    /// The store went out of reach (or could not be reached again).
    pub fn lost(&self, error: String) {
        self.tx.send_modify(|h| {
            if h.state == StoreState::Up {
                h.state = StoreState::Lost;
                h.since = Timestamp::now();
            }
            h.error = Some(error);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(3);

    #[test]
    fn a_store_never_reached_is_unavailable_and_names_itself() {
        let h = StoreHealth::new("postgresql://jg@db/j".into(), LEASE);
        h.lost("connection refused".into());
        let now = h.get();
        assert_eq!(now.state, StoreState::Connecting);
        assert!(now.lease_lapsed(Instant::now()));
        let e = h.check().expect_err("closed").to_string();
        assert!(e.contains("postgresql://jg@db/j"), "{e}");
        assert!(e.contains("has not been reached"), "{e}");
        assert!(e.contains("connection refused"), "{e}");
    }

    #[test]
    fn connected_is_not_confirmed_until_the_log_is_read() {
        let h = StoreHealth::new("u".into(), LEASE);
        h.connected();
        assert!(h.check().is_err(), "up but nothing confirmed yet");
        let t0 = Instant::now();
        h.confirmed(t0);
        assert!(h.check().is_ok());
        let now = h.get();
        assert_eq!((now.state, now.epoch), (StoreState::Up, 1));
        assert!(!now.lease_lapsed(t0 + LEASE));
        assert!(now.lease_lapsed(t0 + LEASE + Duration::from_millis(1)));
    }

    #[test]
    fn lost_keeps_the_lease_running_from_the_last_confirmation() {
        let h = StoreHealth::new("u".into(), LEASE);
        h.connected();
        let t0 = Instant::now();
        h.confirmed(t0);
        h.lost("server closed the connection".into());
        let now = h.get();
        assert_eq!(now.state, StoreState::Lost);
        // No new grants while lost, though the lease still runs for live ones.
        assert!(!now.available(t0));
        assert!(!now.lease_lapsed(t0 + Duration::from_secs(1)));
        assert!(now.lease_lapsed(t0 + LEASE * 2));
        // A confirmation that arrives late (a read begun before the loss) changes nothing.
        h.confirmed(t0 + Duration::from_secs(2));
        assert_eq!(h.get().confirmed, Some(t0));
        let e = h.check().expect_err("lost").to_string();
        assert!(e.contains("is out of reach"), "{e}");
    }

    #[test]
    fn a_reconnection_starts_a_new_epoch_and_an_older_confirmation_never_wins() {
        let h = StoreHealth::new("u".into(), LEASE);
        h.connected();
        let t0 = Instant::now();
        h.confirmed(t0 + Duration::from_secs(1));
        h.confirmed(t0);
        assert_eq!(h.get().confirmed, Some(t0 + Duration::from_secs(1)));
        h.lost("gone".into());
        h.connected();
        let now = h.get();
        assert_eq!(
            (now.state, now.epoch, now.error.clone()),
            (StoreState::Up, 2, None)
        );
        // Hostile: back within the lease, but nothing is let in before the change log has
        // been read on the new connection (a revocation made meanwhile is heard first).
        assert!(!now.lease_lapsed(t0));
        assert!(!now.available(t0), "available before the catch-up read");
        h.confirmed(t0 + Duration::from_secs(2));
        assert!(h.get().available(t0 + Duration::from_secs(2)));
    }
}
