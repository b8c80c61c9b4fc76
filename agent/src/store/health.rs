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

/// The local spool of a shared store (records made while it was out of reach, waiting to be
/// shipped), as `jitgate status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpoolStats {
    /// Records waiting to be shipped.
    pub records: u64,
    /// Their size in bytes (what `spool_limit` bounds).
    pub bytes: u64,
    /// `spool_limit`.
    pub limit: u64,
    /// Records not kept since the agent started (the spool full past its reserve, or
    /// damaged).
    pub dropped: u64,
    /// Set when the spool failed its integrity check: why, and what to do.
    pub problem: Option<String>,
}

impl SpoolStats {
    /// Whether new sessions must be refused because of the spool itself: it holds
    /// `spool_limit` or more (the reserve above it is for sessions already live), or it is
    /// damaged.
    pub fn blocks_new_sessions(&self) -> bool {
        self.problem.is_some() || (self.limit > 0 && self.bytes >= self.limit)
    }
}

/// How the server this host writes to keeps an acknowledged decision through a failover
/// (fleet mode), read on each connection the store's follower makes (`jitgate status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Durability {
    /// The primary this host reached (`address:port` as the server sees it).
    pub server: String,
    /// `synchronous_commit` on this host's sessions: the agent raises `off` and `local` to
    /// `on`, so a decision is acknowledged only once flushed (and, with a synchronous
    /// standby, once the standby has it).
    pub synchronous_commit: String,
    /// The primary's `synchronous_standby_names` (empty: no synchronous standby).
    pub synchronous_standby_names: String,
}

impl Durability {
    /// Whether a decision acknowledged to an approver is also on a standby when it is
    /// acknowledged, so it survives the primary's loss and a standby's promotion.
    /// `remote_write` counts: the standby has received it, and only a crash of both
    /// servers' operating systems at once loses it (PostgreSQL's own account).
    pub fn survives_failover(&self) -> bool {
        !self.synchronous_standby_names.trim().is_empty()
            && matches!(
                self.synchronous_commit.as_str(),
                "on" | "remote_apply" | "remote_write"
            )
    }

    /// One line for `jitgate status` and the log.
    pub fn describe(&self) -> String {
        if self.survives_failover() {
            format!(
                "primary {}, synchronous_commit {}, synchronous standby {:?}: an acknowledged decision survives a failover",
                self.server, self.synchronous_commit, self.synchronous_standby_names
            )
        } else {
            let why = if self.synchronous_standby_names.trim().is_empty() {
                "NO synchronous standby (synchronous_standby_names is empty)"
            } else {
                "commits do NOT wait for the synchronous standby"
            };
            format!(
                "primary {}, synchronous_commit {}, {why}: decisions committed since a standby last caught up are lost if the store fails over to it; see \"Fleet deployment\" in the README",
                self.server, self.synchronous_commit
            )
        }
    }
}

/// How the refusal of a new session because the local spool is full begins (the proxies
/// give such clients a hint of their own).
pub const SPOOL_FULL: &str = "the local spool is full";

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
    /// The last error is one no retry mends until an operator acts (a wrong password, a
    /// schema newer than this agent): retried slowly, shown as such.
    pub permanent: bool,
    /// How long a confirmation holds.
    pub lease: Duration,
    /// Where the store is (its url, no password), for errors.
    pub url: String,
    /// The local spool.
    pub spool: SpoolStats,
    /// How the primary reached last keeps acknowledged decisions (absent until reached).
    pub durability: Option<Durability>,
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
    ///
    /// And the local spool is empty: records kept while the store was out of reach are
    /// shipped first (this host's chain stays in the order records were made), and a spool
    /// that failed its integrity check keeps the gate closed until an operator has looked.
    pub fn available(&self, now: Instant) -> bool {
        self.state == StoreState::Up
            && self.confirmed_epoch == self.epoch
            && !self.lease_lapsed(now)
            && self.spool.records == 0
            && self.spool.problem.is_none()
    }

    /// The error callers get while the store is not available.
    pub fn unavailable(&self) -> StoreError {
        if let Some(problem) = &self.spool.problem {
            return StoreError::Unavailable(format!(
                "{problem}; until then no grant can be issued or used on this host"
            ));
        }
        if self.spool.blocks_new_sessions() {
            return StoreError::Unavailable(format!(
                "{SPOOL_FULL} ({} of spool_limit {}; {} records kept while the shared state store at {} was out of reach): no new session until they are shipped; raise [store] spool_limit, or bring the store back",
                crate::model::human_bytes(self.spool.bytes),
                crate::model::human_bytes(self.spool.limit),
                self.spool.records,
                self.url,
            ));
        }
        if self.state == StoreState::Up && self.spool.records > 0 {
            return StoreError::Unavailable(format!(
                "the shared state store at {} is back; this host is still shipping the {} records it kept in its local spool meanwhile (retry in a moment)",
                self.url, self.spool.records,
            ));
        }
        let what = match self.state {
            _ if self.permanent => "refuses this host",
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
            permanent: false,
            lease,
            url,
            spool: SpoolStats::default(),
            durability: None,
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
            h.permanent = false;
        });
    }

    /// The change log no longer holds every change this host had not read (pruned past it,
    /// or cut in a failover): a new epoch begins, as after a reconnection, so the grant
    /// engine reloads its live grants (and waiting requests) whole before new grants ride on
    /// them or the lease counts as renewed.
    pub fn resync(&self) {
        self.tx.send_modify(|h| h.epoch += 1);
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

    /// The local spool changed.
    pub fn spool(&self, stats: SpoolStats) {
        self.tx.send_if_modified(|h| {
            if h.spool == stats {
                false
            } else {
                h.spool = stats;
                true
            }
        });
    }

    /// A new connection reached the primary described by `durability`.
    pub fn durability(&self, durability: Durability) {
        self.tx.send_if_modified(|h| {
            if h.durability.as_ref() == Some(&durability) {
                false
            } else {
                h.durability = Some(durability);
                true
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
            h.permanent = false;
        });
    }

    /// The store answered but refused this host in a way no quick retry mends (`error` says
    /// what the operator must do).
    pub fn refused(&self, error: String) {
        self.lost(format!("permanent error: {error}"));
        self.tx.send_modify(|h| h.permanent = true);
    }
}

/// Why the store is not keeping what the agent writes (the embedded store: a full disk, an
/// I/O error, a database made read-only or damaged), as `jitgate status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WriteFailure {
    /// When writes began to fail.
    pub since: Timestamp,
    /// The last failure.
    pub error: String,
    /// Failures since `since`: writes not kept, and commits made with the state
    /// directory's filesystem nearly full.
    pub failed: u64,
}

/// Whether the store keeps what it is given. A session whose statements cannot be recorded
/// must not run on: while writes fail, the grant engine ends live sessions and refuses new
/// ones and new grants ([`WriteHealth::check`]), and the store probes until a real write
/// succeeds again ([`WriteHealth::kept`]). Ordinary successes do not clear a failure: a
/// small write can fit where a statement record does not, and the gate would flap.
///
/// It also counts the backlog: bytes of records handed to the store and not yet written. A
/// disk slower than the sessions' records would otherwise hold them in memory without bound:
/// past [`BACKLOG_REFUSE`] new sessions are refused until it catches up, past
/// [`BACKLOG_CUT`] live sessions are cut too (their records could not be kept in time).
#[derive(Clone, Debug)]
pub struct WriteHealth {
    tx: std::sync::Arc<watch::Sender<Option<WriteFailure>>>,
    backlog: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Failures ever reported: a failure that cleared before anyone looked is still seen
    /// by a reader that compares counts ([`WriteHealth::failures`]).
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Bytes of records waiting for the store past which new sessions are refused.
pub const BACKLOG_REFUSE: usize = 64 << 20;

/// Bytes of records waiting for the store past which live sessions are cut.
pub const BACKLOG_CUT: usize = 256 << 20;

impl Default for WriteHealth {
    fn default() -> Self {
        Self {
            tx: std::sync::Arc::new(watch::channel(None).0),
            backlog: std::sync::Arc::default(),
            failures: std::sync::Arc::default(),
        }
    }
}

impl WriteHealth {
    /// `bytes` of records were handed to the store.
    pub fn queued(&self, bytes: usize) {
        self.backlog
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// `bytes` of records handed to the store were written (or failed).
    pub fn done(&self, bytes: usize) {
        self.backlog
            .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes of records handed to the store and not yet written.
    pub fn backlog(&self) -> usize {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `Some` with why, when live sessions must end: writes fail, or the backlog is past
    /// [`BACKLOG_CUT`].
    pub fn cuts_sessions(&self) -> Option<String> {
        if let Some(f) = self.get() {
            return Some(f.error);
        }
        let backlog = self.backlog();
        (backlog > BACKLOG_CUT).then(|| behind(backlog))
    }

    /// `None` while writes are kept.
    pub fn get(&self) -> Option<WriteFailure> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<WriteFailure>> {
        self.tx.subscribe()
    }

    /// Failures reported since the store opened.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A write failed (or a transaction could not be committed).
    pub fn failed(&self, error: &str) {
        crate::ops::metrics::store_write_failed();
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.tx.send_modify(|f| match f {
            Some(f) => {
                f.failed += 1;
                error.clone_into(&mut f.error);
            }
            None => {
                *f = Some(WriteFailure {
                    since: Timestamp::now(),
                    error: error.to_owned(),
                    failed: 1,
                });
            }
        });
    }

    /// A probe write was committed: writes are kept again.
    pub fn kept(&self) {
        self.tx.send_if_modified(|f| f.take().is_some());
    }

    /// `Ok` while writes are kept and the backlog is under [`BACKLOG_REFUSE`], else the
    /// error new sessions and grants are refused with.
    pub fn check(&self) -> Result<(), StoreError> {
        if let Some(f) = &*self.tx.borrow() {
            return Err(StoreError::Unavailable(f.refusal()));
        }
        let backlog = self.backlog();
        if backlog > BACKLOG_REFUSE {
            return Err(StoreError::Unavailable(format!(
                "{}: no new session until it catches up (retry in a moment; `jitgate status` shows the store)",
                behind(backlog)
            )));
        }
        Ok(())
    }
}

/// About what one audit record holds while queued (its event's fields, the seal).
pub const AUDIT_BYTES: usize = 1024;

/// About what a session's row and its audit record hold while queued (the backlog).
pub fn session_bytes(s: &crate::model::Session) -> usize {
    AUDIT_BYTES + s.command.len() + s.detail.len() + s.destination.len()
}

/// About what a statement's row holds while queued (the backlog).
pub fn statement_bytes(s: &crate::model::StatementRecord) -> usize {
    256 + s.text.len()
        + s.params
            .iter()
            .map(|p| p.as_ref().map_or(8, String::len))
            .sum::<usize>()
        + s.error.as_ref().map_or(0, String::len)
}

fn behind(backlog: usize) -> String {
    format!(
        "the state store on this host is {} of records behind (its disk is slower than the sessions' records)",
        crate::model::human_bytes(backlog as u64)
    )
}

impl WriteFailure {
    /// What a refused or ended session is told: what is wrong and who must act.
    pub fn refusal(&self) -> String {
        format!(
            "the state store on this host cannot keep records since {} ({}; {} failures): no session may run unrecorded, so no grant can be used until it can; the operator must free disk space or mend the store (`jitgate status` shows it), and the gate reopens by itself",
            self.since, self.error, self.failed
        )
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

    #[test]
    fn records_in_the_spool_keep_the_host_closed_until_shipped_and_a_full_one_says_so() {
        let h = StoreHealth::new("postgresql://jg@db/j".into(), LEASE);
        h.connected();
        let t0 = Instant::now();
        h.confirmed(t0);
        assert!(h.get().available(t0));
        let spool = SpoolStats {
            records: 3,
            bytes: 100,
            limit: 1000,
            ..SpoolStats::default()
        };
        h.spool(spool.clone());
        assert!(!h.get().available(t0), "records wait to be shipped");
        let e = h.check().expect_err("shipping").to_string();
        assert!(e.contains("still shipping the 3 records"), "{e}");
        h.lost("gone".into());
        h.spool(SpoolStats {
            bytes: 1000,
            ..spool.clone()
        });
        let e = h.check().expect_err("full").to_string();
        assert!(
            e.starts_with(SPOOL_FULL) && e.contains("spool_limit"),
            "{e}"
        );
        h.spool(SpoolStats {
            problem: Some("the local spool /s failed its integrity check: x".into()),
            ..spool
        });
        let e = h.check().expect_err("damaged").to_string();
        assert!(e.contains("integrity check"), "{e}");
        h.connected();
        h.confirmed(Instant::now());
        assert!(h.check().is_err(), "a damaged spool keeps the host closed");
        h.spool(SpoolStats::default());
        assert!(h.check().is_ok(), "shipped: open");
    }

    #[test]
    fn only_a_synchronous_standby_with_a_waiting_commit_survives_a_failover() {
        let d = |commit: &str, names: &str| Durability {
            server: "10.0.0.5:5432".into(),
            synchronous_commit: commit.into(),
            synchronous_standby_names: names.into(),
        };
        for commit in ["on", "remote_apply", "remote_write"] {
            assert!(d(commit, "ANY 1 (s1, s2)").survives_failover(), "{commit}");
        }
        // Hostile: what reads as durable but is not.
        for (commit, names) in [("on", ""), ("on", "  "), ("local", "s1"), ("off", "*")] {
            let d = d(commit, names);
            assert!(!d.survives_failover(), "{commit} {names:?}");
            assert!(
                d.describe().contains("are lost if the store fails over"),
                "{d:?}"
            );
        }
        assert!(d("on", "*").describe().contains("survives a failover"));
    }

    #[test]
    fn a_permanent_error_says_so_until_the_store_is_reached() {
        let h = StoreHealth::new("postgresql://jg@db/j".into(), LEASE);
        h.refused(
            "password authentication failed for user \"jg\": check [store] password_file".into(),
        );
        let now = h.get();
        assert!(now.permanent);
        let e = h.check().expect_err("refused").to_string();
        assert!(
            e.contains("refuses this host") && e.contains("password_file"),
            "{e}"
        );
        h.lost("connection refused".into());
        assert!(
            !h.get().permanent,
            "a network error after it is not permanent"
        );
        h.refused("x".into());
        h.connected();
        assert!(!h.get().permanent);
    }
}
