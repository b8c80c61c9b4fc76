//! Memory the gate holds whole on a workload's behalf: a response body read whole to be
//! masked, a request body read whole to be shown to an approver. Each is bounded per body
//! and per connection, but a workload opens many connections; this budget bounds them all
//! together, agent-wide (`[daemon] buffer_budget`), so that no workload, however many
//! connections it opens, can take the agent's memory (and with it every other workload's
//! gate). A body that would pass the budget is refused at once (never waited for: a wait
//! could hold memory while waiting for memory), with an error that says so.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is counted in KiB (a semaphore's permits are a `u32` per acquisition).
const UNIT: usize = 1024;

/// Default `buffer_budget`.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// The agent-wide budget, and each identity's share of it. Cheap to share (`Arc` inside).
///
/// The share exists because the agent-wide bound alone lets one workload (one grant, many
/// connections) take the whole budget, and with it every other workload's masked responses
/// and held requests: a denial of service across identities. With a share, one identity can
/// take at most that part (by default half: two busy identities can still fill the budget;
/// lower `buffer_share` where many workloads share an agent). Both are read at start.
#[derive(Clone, Debug)]
pub struct Buffers {
    sem: Arc<Semaphore>,
    bytes: usize,
    share: usize,
    /// One semaphore per identity that ever held a body. Identities are named in the
    /// configuration, so the map stays as small as the workload list.
    shares: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl Default for Buffers {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET, DEFAULT_BUDGET / 2)
    }
}

/// The budget is spent: the body cannot be held now.
#[derive(Debug, thiserror::Error)]
pub enum BuffersFull {
    #[error(
        "the gate already holds {} MiB of bodies read whole (its buffer_budget); try again shortly",
        .0 >> 20
    )]
    Agent(usize),
    #[error(
        "this workload already holds {} MiB of bodies read whole on its connections (its buffer_share); let some finish, then retry",
        .0 >> 20
    )]
    Identity(usize),
}

impl Buffers {
    /// `bytes` agent-wide, at most `share` of them for any one identity.
    pub fn new(bytes: usize, share: usize) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(units)),
            bytes,
            share: share.min(bytes),
            shares: Arc::default(),
        }
    }

    /// An empty reservation on behalf of `identity`, grown with [`Reservation::cover`] as a
    /// body is read.
    pub fn reservation(&self, identity: &str) -> Reservation {
        let share = {
            let mut shares = self.shares.lock().unwrap_or_else(PoisonError::into_inner);
            match shares.get(identity) {
                Some(s) => s.clone(),
                None => {
                    let units = (self.share / UNIT).clamp(1, Semaphore::MAX_PERMITS);
                    let s = Arc::new(Semaphore::new(units));
                    shares.insert(identity.to_owned(), s.clone());
                    s
                }
            }
        };
        Reservation {
            budget: self.clone(),
            share,
            permits: None,
            units: 0,
        }
    }

    /// Bytes not held now, agent-wide.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }
}

/// Part of the budget (and of its identity's share), held until dropped (when the body has
/// been handed on).
#[derive(Debug)]
pub struct Reservation {
    budget: Buffers,
    share: Arc<Semaphore>,
    /// The agent-wide permit and the identity's, always grown together.
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    units: usize,
}

impl Reservation {
    /// Grows the reservation to cover `bytes` in all. A failed growth takes nothing (the
    /// reservation keeps what it had).
    pub fn cover(&mut self, bytes: usize) -> Result<(), BuffersFull> {
        let want = bytes.div_ceil(UNIT);
        if want <= self.units {
            return Ok(());
        }
        let more = u32::try_from(want - self.units)
            .map_err(|_| BuffersFull::Identity(self.budget.share))?;
        let all = self
            .budget
            .sem
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| BuffersFull::Agent(self.budget.bytes))?;
        // Dropping `all` on failure gives the agent-wide part back.
        let mine = self
            .share
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| BuffersFull::Identity(self.budget.share))?;
        match &mut self.permits {
            Some((a, m)) => {
                a.merge(all);
                m.merge(mine);
            }
            None => self.permits = Some((all, mine)),
        }
        self.units = want;
        Ok(())
    }

    /// Gives back what is held beyond `bytes`: a stream masked line by line holds its
    /// current line, not the largest it has seen.
    pub fn shrink_to(&mut self, bytes: usize) {
        let want = bytes.div_ceil(UNIT);
        if want >= self.units {
            return;
        }
        let extra = self.units - want;
        if want == 0 {
            self.permits = None;
        } else if let Some((all, mine)) = &mut self.permits {
            drop(all.split(extra));
            drop(mine.split(extra));
        }
        self.units = want;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_budget_and_give_it_back() {
        let buffers = Buffers::new(64 * 1024, 64 * 1024);
        let mut a = buffers.reservation("a");
        a.cover(10).unwrap();
        a.cover(40 * 1024).unwrap();
        assert_eq!(buffers.available(), 24 * 1024);
        let mut b = buffers.reservation("b");
        b.cover(20 * 1024).unwrap();
        let e = b.cover(30 * 1024).unwrap_err();
        assert!(e.to_string().contains("buffer_budget"), "{e}");
        // The failed growth took nothing; b keeps what it had.
        assert_eq!(buffers.available(), 4 * 1024);
        drop(a);
        b.cover(30 * 1024).unwrap();
        drop(b);
        assert_eq!(buffers.available(), 64 * 1024);
    }

    #[test]
    fn a_shrunk_reservation_gives_back_the_rest() {
        let buffers = Buffers::new(64 * 1024, 32 * 1024);
        let mut r = buffers.reservation("a");
        r.cover(30 * 1024).unwrap();
        r.shrink_to(2 * 1024);
        assert_eq!(buffers.available(), 62 * 1024);
        // The identity's share was given back too: it can grow again to its whole share.
        r.cover(32 * 1024).unwrap();
        r.shrink_to(0);
        assert_eq!(buffers.available(), 64 * 1024);
        r.cover(1024).unwrap();
        drop(r);
        assert_eq!(buffers.available(), 64 * 1024);
    }

    #[test]
    fn one_identity_cannot_take_what_another_needs() {
        let buffers = Buffers::new(64 * 1024, 32 * 1024);
        // A hostile workload opens many connections, each reading a body whole.
        let mut hog: Vec<Reservation> = Vec::new();
        for _ in 0..8 {
            let mut r = buffers.reservation("hog");
            if r.cover(8 * 1024).is_ok() {
                hog.push(r);
            }
        }
        assert_eq!(hog.len(), 4, "the hog stops at its share");
        let e = buffers.reservation("hog").cover(1024).unwrap_err();
        assert!(matches!(e, BuffersFull::Identity(_)), "{e}");
        assert!(e.to_string().contains("buffer_share"), "{e}");
        // Another workload still gets its own share.
        let mut other = buffers.reservation("other");
        other.cover(32 * 1024).unwrap();
        // Now the agent is full: a third identity is refused by the agent-wide budget.
        let e = buffers.reservation("third").cover(1024).unwrap_err();
        assert!(matches!(e, BuffersFull::Agent(_)), "{e}");
        // A failed growth took nothing from either.
        drop(other);
        buffers.reservation("third").cover(32 * 1024).unwrap();
        drop(hog);
        assert_eq!(buffers.available(), 64 * 1024);
    }
}
