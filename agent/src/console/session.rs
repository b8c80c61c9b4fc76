//! Who is signed in to the console, and the sign-ins under way. Both live in memory only: a
//! session cookie is an opaque random token (256 bits) that means nothing outside this
//! process, so a restart signs everyone out and a stolen database holds none. Each session
//! carries its own CSRF token, which every form repeats and every POST must match.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::oidc::{Pending, random_token};
use crate::identity::Person;

/// Most sessions kept; past this, sign-ins are refused until some expire.
const MAX_SESSIONS: usize = 10_000;
/// Most sign-ins under way; past this, the oldest is forgotten.
const MAX_PENDING: usize = 1_000;
/// How long a person has to get through the provider's pages.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);

/// Compares secrets in time that does not depend on where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone, Debug)]
pub struct Session {
    pub person: Person,
    pub csrf: String,
    pub expires: Instant,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    pending: Mutex<HashMap<String, Pending>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("too many people are signed in to the console; try again later")]
    Full,
    #[error("no randomness: {0}")]
    Random(String),
}

impl Sessions {
    /// Remembers a sign-in under way, under its `state`.
    pub fn begin(&self, state: String, pending: Pending) {
        let mut map = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, p| p.created.elapsed() < LOGIN_TIMEOUT);
        if map.len() >= MAX_PENDING
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, p)| p.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(state, pending);
    }

    /// Takes the sign-in under way for `state` (once: a replayed callback finds nothing).
    pub fn take_pending(&self, state: &str) -> Option<Pending> {
        let mut map = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(state)
            .filter(|p| p.created.elapsed() < LOGIN_TIMEOUT)
    }

    /// Signs `person` in for `ttl`; returns the cookie's token.
    pub fn start(&self, person: Person, ttl: Duration) -> Result<String, SessionError> {
        let token = random_token(32).map_err(|e| SessionError::Random(e.to_string()))?;
        let csrf = random_token(32).map_err(|e| SessionError::Random(e.to_string()))?;
        let mut map = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            return Err(SessionError::Full);
        }
        map.insert(
            token.clone(),
            Session {
                person,
                csrf,
                expires: now + ttl,
            },
        );
        Ok(token)
    }

    /// The live session a cookie names.
    pub fn get(&self, token: &str) -> Option<Session> {
        let mut map = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(token) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn end(&self, token: &str) {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(token);
    }
}

impl Session {
    /// Whether a form's CSRF token is this session's.
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| same(p.as_bytes(), self.csrf.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person() -> Person {
        Person {
            id: "ann@example.com".into(),
            groups: vec![],
            unix_uid: None,
            unix_account: None,
            ..Default::default()
        }
    }

    #[test]
    fn csrf_must_be_the_sessions_own() {
        let sessions = Sessions::default();
        let a = sessions.start(person(), Duration::from_secs(60)).unwrap();
        let b = sessions.start(person(), Duration::from_secs(60)).unwrap();
        let (a, b) = (sessions.get(&a).unwrap(), sessions.get(&b).unwrap());
        assert!(a.csrf_ok(Some(&a.csrf)));
        assert!(!a.csrf_ok(None));
        assert!(!a.csrf_ok(Some("")));
        assert!(!a.csrf_ok(Some(&b.csrf)), "another session's token");
        assert!(!a.csrf_ok(Some(&a.csrf[..a.csrf.len() - 1])), "a prefix");
        assert!(!a.csrf_ok(Some(&format!("{}x", a.csrf))), "an extension");
        assert!(a.csrf.len() >= 43, "256 bits");
    }

    #[test]
    fn sessions_expire_end_and_are_unguessable() {
        let sessions = Sessions::default();
        let t = sessions.start(person(), Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(sessions.get(&t).is_none());
        let t = sessions.start(person(), Duration::from_secs(60)).unwrap();
        assert!(sessions.get(&t).is_some());
        assert!(sessions.get(&t[1..]).is_none());
        sessions.end(&t);
        assert!(sessions.get(&t).is_none());
    }

    #[test]
    fn a_sign_in_state_is_taken_once() {
        let sessions = Sessions::default();
        let pending = Pending {
            nonce: "n".into(),
            verifier: "v".into(),
            created: Instant::now(),
            step_up: None,
        };
        sessions.begin("s1".into(), pending);
        assert!(sessions.take_pending("other").is_none());
        assert!(sessions.take_pending("s1").is_some());
        assert!(sessions.take_pending("s1").is_none(), "replayed callback");
    }
}
