//! Who is signed in to the console, and the sign-ins under way. Both live in memory only: a
//! session cookie is an opaque random token (256 bits) that means nothing outside this
//! process, so a restart signs everyone out and a stolen database holds none. Each session
//! carries its own CSRF token, which every form repeats and every POST must match.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::oidc::{Pending, random_token};
use crate::identity::Person;

/// Most sessions kept; past this, sign-ins are refused until some expire.
const MAX_SESSIONS: usize = 10_000;
/// Most sign-ins under way; past this, new ones are refused until some finish or time out
/// (never the oldest forgotten: a flood must not cut off a person at their provider's MFA).
pub const MAX_PENDING: usize = 10_000;
/// Most sign-ins under way from one client network (see [`super::throttle::network`]).
pub const MAX_PENDING_PER_NETWORK: usize = 20;
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
    /// By `state`: the sign-in, and the client network that started it.
    pending: Mutex<HashMap<String, (Pending, IpAddr)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("too many people are signed in to the console; try again later")]
    Full,
    #[error("no randomness: {0}")]
    Random(String),
    #[error(
        "too many sign-ins are under way from your network; finish one, or try again in a few minutes"
    )]
    BusyNetwork,
    #[error("too many sign-ins are under way; try again in a few minutes")]
    BusyEverywhere,
}

impl Sessions {
    /// Remembers a sign-in under way, under its `state`, started from `network`: refused
    /// past [`MAX_PENDING_PER_NETWORK`] for that network or [`MAX_PENDING`] in all.
    pub fn begin(
        &self,
        state: String,
        pending: Pending,
        network: IpAddr,
    ) -> Result<(), SessionError> {
        let mut map = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (p, _)| p.created.elapsed() < LOGIN_TIMEOUT);
        if map.values().filter(|(_, n)| *n == network).count() >= MAX_PENDING_PER_NETWORK {
            return Err(SessionError::BusyNetwork);
        }
        if map.len() >= MAX_PENDING {
            return Err(SessionError::BusyEverywhere);
        }
        map.insert(state, (pending, network));
        Ok(())
    }

    /// Whether a sign-in is under way for `state` (its callback is not throttled).
    pub fn is_pending(&self, state: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(state)
            .is_some_and(|(p, _)| p.created.elapsed() < LOGIN_TIMEOUT)
    }

    /// Takes the sign-in under way for `state` (once: a replayed callback finds nothing).
    pub fn take_pending(&self, state: &str) -> Option<Pending> {
        let mut map = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(state)
            .map(|(p, _)| p)
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
        let here: IpAddr = "192.0.2.1".parse().unwrap();
        sessions.begin("s1".into(), pending, here).unwrap();
        assert!(sessions.is_pending("s1"));
        assert!(sessions.take_pending("other").is_none());
        assert!(sessions.take_pending("s1").is_some());
        assert!(sessions.take_pending("s1").is_none(), "replayed callback");
        assert!(!sessions.is_pending("s1"));
    }

    /// Hostile: a flood of sign-ins from one network stops at its own cap, and one from
    /// many networks at the total, without cutting off a sign-in already under way.
    #[test]
    fn a_flood_of_sign_ins_forgets_nobody() {
        let sessions = Sessions::default();
        let pending = || Pending {
            nonce: "n".into(),
            verifier: "v".into(),
            created: Instant::now(),
            step_up: None,
        };
        let person: IpAddr = "198.51.100.7".parse().unwrap();
        sessions.begin("mine".into(), pending(), person).unwrap();
        let flood: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..MAX_PENDING_PER_NETWORK {
            sessions.begin(format!("f{i}"), pending(), flood).unwrap();
        }
        assert!(matches!(
            sessions.begin("one-more".into(), pending(), flood),
            Err(SessionError::BusyNetwork)
        ));
        let mut n = 0u32;
        let full = loop {
            let from = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n / 10));
            match sessions.begin(format!("g{n}"), pending(), from) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(full, SessionError::BusyEverywhere), "{full}");
        assert!(sessions.take_pending("mine").is_some(), "still there");
    }
}
