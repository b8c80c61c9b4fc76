//! Memory the gate holds whole on a workload's behalf: a response body read whole to be
//! masked, a request body read whole to be shown to an approver. Each is bounded per body
//! and per connection, but a workload opens many connections; this budget bounds them all
//! together, agent-wide (`[daemon] buffer_budget`), so that no workload, however many
//! connections it opens, can take the agent's memory (and with it every other workload's
//! gate). A body that would pass the budget is refused at once (never waited for: a wait
//! could hold memory while waiting for memory), with an error that says so.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is counted in KiB (a semaphore's permits are a `u32` per acquisition).
const UNIT: usize = 1024;

/// Default `buffer_budget`.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// The agent-wide budget. Cheap to share (`Arc` inside).
#[derive(Clone, Debug)]
pub struct Buffers {
    sem: Arc<Semaphore>,
    bytes: usize,
}

impl Default for Buffers {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET)
    }
}

/// The budget is spent: the body cannot be held now.
#[derive(Debug, thiserror::Error)]
#[error(
    "the gate already holds {} MiB of bodies read whole (its buffer_budget); try again shortly",
    .0 >> 20
)]
pub struct BuffersFull(pub usize);

impl Buffers {
    pub fn new(bytes: usize) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(units)),
            bytes,
        }
    }

    /// An empty reservation, grown with [`Reservation::cover`] as a body is read.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            permit: None,
            units: 0,
        }
    }

    /// Bytes not held now.
    pub fn available(&self) -> usize {
        self.sem.available_permits() * UNIT
    }
}

/// Part of the budget, held until dropped (when the body has been handed on).
#[derive(Debug)]
pub struct Reservation {
    budget: Buffers,
    permit: Option<OwnedSemaphorePermit>,
    units: usize,
}

impl Reservation {
    /// Grows the reservation to cover `bytes` in all.
    pub fn cover(&mut self, bytes: usize) -> Result<(), BuffersFull> {
        let want = bytes.div_ceil(UNIT);
        if want <= self.units {
            return Ok(());
        }
        let more = u32::try_from(want - self.units).map_err(|_| BuffersFull(self.budget.bytes))?;
        let permit = self
            .budget
            .sem
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| BuffersFull(self.budget.bytes))?;
        match &mut self.permit {
            Some(p) => p.merge(permit),
            None => self.permit = Some(permit),
        }
        self.units = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_budget_and_give_it_back() {
        let buffers = Buffers::new(64 * 1024);
        let mut a = buffers.reservation();
        a.cover(10).unwrap();
        a.cover(40 * 1024).unwrap();
        assert_eq!(buffers.available(), 24 * 1024);
        let mut b = buffers.reservation();
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
}
