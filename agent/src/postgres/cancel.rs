//! CancelRequest support. Each session gets a proxy-issued key (BackendKeyData); a cancel
//! arriving with it is forwarded to the server with the server's real key. The table is
//! bounded, and a cancel only works from the workload that owns the session.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Mutex, PoisonError},
};

/// Most sessions with a cancel key at once. Beyond this, new sessions get no working key
/// (their cancels are ignored) rather than evicting live ones.
pub const MAX_KEYS: usize = 65_536;

/// What a proxy-issued key stands for.
#[derive(Clone, Debug)]
pub struct Entry {
    pub resource: String,
    pub identity: String,
    pub upstream: SocketAddr,
    pub server_name: String,
    /// The server's own (process id, secret).
    pub key: (i32, i32),
}

#[derive(Default)]
pub struct CancelKeys {
    inner: Mutex<HashMap<(i32, i32), Entry>>,
}

fn random_key() -> (i32, i32) {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Without randomness, keys become guessable: issue one that never matches.
        return (0, 0);
    }
    (
        i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff,
        i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    )
}

impl CancelKeys {
    /// Registers a session and returns the key to give its client.
    pub fn issue(&self, entry: Entry) -> (i32, i32) {
        let mut map = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= MAX_KEYS {
            return random_key();
        }
        loop {
            let key = random_key();
            if key == (0, 0) {
                return key;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(key) {
                e.insert(entry);
                return key;
            }
        }
    }

    pub fn remove(&self, key: (i32, i32)) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
    }

    /// The session behind `key`, if `identity` owns it.
    pub fn lookup(&self, key: (i32, i32), identity: &str) -> Option<Entry> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .filter(|e| e.identity == identity)
            .cloned()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_belong_to_their_identity() {
        let keys = CancelKeys::default();
        let entry = Entry {
            resource: "db".into(),
            identity: "bot".into(),
            upstream: "127.0.0.1:5432".parse().unwrap(),
            server_name: "127.0.0.1".into(),
            key: (42, 7),
        };
        let k = keys.issue(entry);
        assert_eq!(keys.lookup(k, "bot").unwrap().key, (42, 7));
        assert!(keys.lookup(k, "other").is_none());
        keys.remove(k);
        assert!(keys.lookup(k, "bot").is_none());
        assert!(keys.is_empty());
    }
}
