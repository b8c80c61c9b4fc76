//! Sessions in flight: what `jitgate sessions` lists with live byte counts, and what a
//! reload ends when their resource is removed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio_util::sync::CancellationToken;

use super::relay;
use crate::model::Timestamp;

/// A session in flight, as `jitgate sessions` and reloads see it.
pub struct LiveSession {
    pub identity: String,
    pub resource: String,
    pub grant: String,
    pub started_at: Timestamp,
    pub counters: Arc<relay::Counters>,
    /// Cancelled when the session must end for a reason of the agent's (resource removed).
    pub cancel: CancellationToken,
}

/// Live sessions by id.
#[derive(Default, Clone)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, LiveSession>>>,
}

impl Registry {
    pub fn insert(&self, id: &str, session: LiveSession) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), session);
    }

    pub fn remove(&self, id: &str) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Live byte counts of an open session.
    pub fn counts(&self, id: &str) -> Option<(u64, u64)> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|s| s.counters.snapshot())
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every session on a resource that is no longer configured.
    pub fn end_resources_not_in(&self, names: &[String]) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for s in inner.values() {
            if !names.contains(&s.resource) {
                s.cancel.cancel();
                n += 1;
            }
        }
        n
    }
}
