//! How many connections one workload may hold at once, so that it cannot take the proxy, the
//! agent's descriptors or a database's connection slots from the others.
//!
//! Three counts, each a slot taken when a connection enters a phase and given back when the
//! slot is dropped (however the session ends, a panic included):
//!
//! * pending, per identity: between attribution and the grant decision (`[daemon]
//!   max_pending_per_identity`). A flood of idle connections without a grant stops here,
//!   refused at once instead of held until its startup timeout;
//! * sessions, per identity and per grant: granted sessions (`max_sessions_per_identity`,
//!   `max_sessions_per_grant`, the latter per resource too);
//! * every attributed connection, agent-wide: kept below the process's descriptor limit (each session
//!   holds two descriptors), so that a flood spread over many identities still leaves the
//!   agent descriptors for its store, control socket and other workloads' next connections.
//!   A session that holds more upstream descriptors (an HTTP session's further connections
//!   and tunnels) takes a slot of this count for each ([`Limits::extra`]);
//! * extra upstream uses, per identity: an HTTP session's requests in flight and tunnels
//!   open beyond its first (`max_extra_upstreams_per_identity`, [`Limits::share`]), so
//!   that one workload's HTTP/2 connections, each multiplexing many, cannot take the
//!   agent-wide count from the others.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

/// Descriptors kept for everything that is not a proxied connection (store, control
/// socket, gate maps, metrics, logs).
const RESERVED_FDS: u64 = 256;

/// Which limit a connection ran into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pending,
    SessionsPerIdentity,
    SessionsPerGrant,
    ExtraPerIdentity,
    Agent,
}

impl Kind {
    /// The `limit` label of its metric.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::SessionsPerIdentity => "sessions_per_identity",
            Self::SessionsPerGrant => "sessions_per_grant",
            Self::ExtraPerIdentity => "extra_upstreams_per_identity",
            Self::Agent => "agent",
        }
    }

    /// The configuration key that raises it.
    pub const fn key(self) -> &'static str {
        match self {
            Self::Pending => "[daemon] max_pending_per_identity",
            Self::SessionsPerIdentity => "[daemon] max_sessions_per_identity",
            Self::SessionsPerGrant => {
                "[daemon] max_sessions_per_grant (or the resource's max_sessions_per_grant)"
            }
            Self::ExtraPerIdentity => "[daemon] max_extra_upstreams_per_identity",
            Self::Agent => "the host agent's descriptor limit (LimitNOFILE)",
        }
    }
}

/// A connection refused by a limit: what was full, and how to get past it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exceeded {
    pub kind: Kind,
    pub limit: usize,
    /// Whose count is full (an identity, a grant, or the agent).
    pub scope: String,
}

impl Exceeded {
    /// What the workload (or its operator) can do about it.
    pub fn hint(&self) -> String {
        let wait = match self.kind {
            Kind::Pending => "finish or close connections still starting up",
            Kind::SessionsPerIdentity | Kind::SessionsPerGrant => "close an open session",
            Kind::ExtraPerIdentity => {
                "send fewer requests at once, or close streams (exec, watch, port-forward) no longer needed"
            }
            Kind::Agent => "try again later",
        };
        format!(
            "{wait}, or ask the jitgate operator to raise {}",
            self.kind.key()
        )
    }
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Pending => write!(
                f,
                "too many connections: {} already has {} connections waiting for a grant decision (limit {})",
                self.scope, self.limit, self.limit
            ),
            Kind::SessionsPerIdentity => write!(
                f,
                "too many connections: {} already has {} open sessions (limit {})",
                self.scope, self.limit, self.limit
            ),
            Kind::SessionsPerGrant => write!(
                f,
                "too many connections: grant {} already carries {} open sessions (limit {})",
                self.scope, self.limit, self.limit
            ),
            Kind::ExtraPerIdentity => write!(
                f,
                "too many upstream requests: {} already holds {} beyond its sessions' first (requests in flight and streams open; limit {})",
                self.scope, self.limit, self.limit
            ),
            Kind::Agent => write!(
                f,
                "too many connections: the host agent holds {} proxied connections, the most its descriptor limit allows",
                self.limit
            ),
        }
    }
}

/// The live counts. One per agent, shared by every session.
#[derive(Clone)]
pub struct Limits {
    counts: Arc<Mutex<Counts>>,
    /// Most proxied connections the agent holds at once.
    agent_max: usize,
}

#[derive(Default)]
struct Counts {
    agent: usize,
    pending: HashMap<String, usize>,
    identity: HashMap<String, usize>,
    grant: HashMap<String, usize>,
    /// Extra upstream uses by identity (see [`Limits::share`]).
    shares: HashMap<String, usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_agent_max(agent_max_from_rlimit())
    }
}

/// Half of what the descriptor limit leaves after the reserve: a session holds the client's
/// and the upstream's descriptor.
fn agent_max_from_rlimit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    let usable = soft.saturating_sub(RESERVED_FDS).max(64) / 2;
    usize::try_from(usable).unwrap_or(usize::MAX)
}

/// Raises the soft descriptor limit to the hard one (the soft default, 1024, would make the
/// agent-wide cap a few hundred connections). Returns the soft limit in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

impl Limits {
    /// Limits with an agent-wide cap of `agent_max` connections (tests; the agent derives
    /// it from its descriptor limit).
    pub fn with_agent_max(agent_max: usize) -> Self {
        Self {
            counts: Arc::default(),
            agent_max,
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection of `identity` enters the pre-grant phase: it takes an agent-wide slot
    /// and a pending one, both held until the grant decision (or the connection's end).
    pub fn pending(&self, identity: &str, max_pending: usize) -> Result<Pending, Exceeded> {
        let mut c = self.counts();
        if c.agent >= self.agent_max {
            return Err(Exceeded {
                kind: Kind::Agent,
                limit: self.agent_max,
                scope: "the host agent".into(),
            });
        }
        let pending = c.pending.get(identity).copied().unwrap_or(0);
        if pending >= max_pending {
            return Err(Exceeded {
                kind: Kind::Pending,
                limit: max_pending,
                scope: identity.to_owned(),
            });
        }
        c.agent += 1;
        c.pending.insert(identity.to_owned(), pending + 1);
        Ok(Pending {
            limits: self.clone(),
            identity: identity.to_owned(),
            pending: true,
        })
    }

    /// Connections agent-wide, and of `identity` those pending and those granted (tests).
    pub fn in_use(&self, identity: &str) -> (usize, usize, usize) {
        let c = self.counts();
        (
            c.agent,
            c.pending.get(identity).copied().unwrap_or(0),
            c.identity.get(identity).copied().unwrap_or(0),
        )
    }

    /// Open sessions riding on `grant`.
    pub fn on_grant(&self, grant: &str) -> usize {
        self.counts().grant.get(grant).copied().unwrap_or(0)
    }
}

fn decrement(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Limits {
    /// An agent-wide slot for a descriptor a session holds beyond its first upstream
    /// connection (an HTTP session's further upstream connections and its tunnels: an
    /// HTTP/2 client multiplexes many on its one connection), held until dropped.
    pub fn extra(&self) -> Result<Extra, Exceeded> {
        let mut c = self.counts();
        if c.agent >= self.agent_max {
            return Err(Exceeded {
                kind: Kind::Agent,
                limit: self.agent_max,
                scope: "the host agent".into(),
            });
        }
        c.agent += 1;
        Ok(Extra {
            limits: self.clone(),
        })
    }

    /// A place among the upstream uses `identity`'s sessions hold beyond each session's
    /// first (a request in flight, a tunnel open), at most `max` over all its sessions,
    /// held until dropped. Idle connections kept for reuse are not uses: they are bounded
    /// per session, and counting them would let an identity's idle pools refuse its own
    /// next request.
    pub fn share(&self, identity: &str, max: usize) -> Result<Share, Exceeded> {
        let mut c = self.counts();
        let held = c.shares.get(identity).copied().unwrap_or(0);
        if held >= max {
            return Err(Exceeded {
                kind: Kind::ExtraPerIdentity,
                limit: max,
                scope: identity.to_owned(),
            });
        }
        c.shares.insert(identity.to_owned(), held + 1);
        Ok(Share {
            limits: self.clone(),
            identity: identity.to_owned(),
        })
    }

    /// Extra upstream uses `identity` holds (tests).
    pub fn shares_in_use(&self, identity: &str) -> usize {
        self.counts().shares.get(identity).copied().unwrap_or(0)
    }
}

/// See [`Limits::extra`].
pub struct Extra {
    limits: Limits,
}

impl Drop for Extra {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.agent = c.agent.saturating_sub(1);
    }
}

/// See [`Limits::share`].
pub struct Share {
    limits: Limits,
    identity: String,
}

impl Drop for Share {
    fn drop(&mut self) {
        decrement(&mut self.limits.counts().shares, &self.identity);
    }
}

/// A connection's slots: its agent-wide one for its whole life, its pending one until the
/// grant decision, its session ones once granted.
pub struct Pending {
    limits: Limits,
    identity: String,
    /// Still before the grant decision.
    pending: bool,
}

impl Pending {
    /// The grant is decided: the pending slot is given back and, within the identity's and
    /// the grant's limits, session slots are taken. On refusal the connection keeps only its
    /// agent-wide slot until it is closed.
    pub fn grant(
        &mut self,
        grant: &str,
        per_identity: usize,
        per_grant: usize,
    ) -> Result<Granted, Exceeded> {
        let mut c = self.limits.counts();
        if self.pending {
            decrement(&mut c.pending, &self.identity);
            self.pending = false;
        }
        let on_identity = c.identity.get(&self.identity).copied().unwrap_or(0);
        if on_identity >= per_identity {
            return Err(Exceeded {
                kind: Kind::SessionsPerIdentity,
                limit: per_identity,
                scope: self.identity.clone(),
            });
        }
        let on_grant = c.grant.get(grant).copied().unwrap_or(0);
        if on_grant >= per_grant {
            return Err(Exceeded {
                kind: Kind::SessionsPerGrant,
                limit: per_grant,
                scope: grant.to_owned(),
            });
        }
        c.identity.insert(self.identity.clone(), on_identity + 1);
        c.grant.insert(grant.to_owned(), on_grant + 1);
        Ok(Granted {
            limits: self.limits.clone(),
            identity: self.identity.clone(),
            grant: grant.to_owned(),
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        if self.pending {
            decrement(&mut c.pending, &self.identity);
        }
        c.agent = c.agent.saturating_sub(1);
    }
}

/// A granted session's slots, given back on drop.
pub struct Granted {
    limits: Limits,
    identity: String,
    grant: String,
}

impl Drop for Granted {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        decrement(&mut c.identity, &self.identity);
        decrement(&mut c.grant, &self.grant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_descriptors_count_against_the_agent_cap_and_are_given_back() {
        let limits = Limits::with_agent_max(3);
        let session = limits.pending("a", 8).expect("slot");
        let extras: Vec<_> = (0..2).map(|_| limits.extra().expect("extra")).collect();
        assert_eq!(limits.in_use("a").0, 3);
        let full = limits.extra().err().expect("the agent is full");
        assert_eq!(full.kind, Kind::Agent);
        assert!(
            limits.pending("b", 8).is_err(),
            "extras leave no room for sessions"
        );
        drop(extras);
        assert_eq!(limits.in_use("a").0, 1);
        drop(session);
        assert_eq!(limits.in_use("a").0, 0);
    }

    /// One identity's extra uses stop at its own count; another's are its own.
    #[test]
    fn extra_uses_are_capped_per_identity() {
        let limits = Limits::with_agent_max(100);
        let a: Vec<_> = (0..3)
            .map(|_| limits.share("a", 3).expect("share"))
            .collect();
        let full = limits.share("a", 3).err().expect("a's uses are full");
        assert_eq!(full.kind, Kind::ExtraPerIdentity);
        assert!(full.to_string().contains("a already holds 3"), "{full}");
        assert!(full.hint().contains("max_extra_upstreams_per_identity"));
        let b = limits.share("b", 3).expect("b has its own");
        drop(a);
        assert_eq!(limits.shares_in_use("a"), 0);
        assert!(limits.share("a", 3).is_ok(), "given back");
        drop(b);
        assert_eq!(limits.shares_in_use("b"), 0);
    }

    #[test]
    fn pending_slots_are_per_identity_and_given_back() {
        let limits = Limits::with_agent_max(1000);
        let a: Vec<_> = (0..3)
            .map(|_| limits.pending("a", 3).expect("slot"))
            .collect();
        let full = limits.pending("a", 3).err().expect("a is full");
        assert_eq!(full.kind, Kind::Pending);
        assert!(full.to_string().contains("limit 3"), "{full}");
        assert!(full.hint().contains("max_pending_per_identity"));
        // Another identity is not affected.
        let _b = limits.pending("b", 3).expect("b has its own slots");
        drop(a);
        assert_eq!(limits.in_use("a"), (1, 0, 0));
        let _a = limits.pending("a", 3).expect("given back");
    }

    #[test]
    fn session_slots_per_grant_and_identity() {
        let limits = Limits::with_agent_max(1000);
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut p = limits.pending("a", 10).expect("pending");
            held.push((p.grant("g1", 3, 2).expect("session"), p));
        }
        let mut p = limits.pending("a", 10).expect("pending");
        let e = p.grant("g1", 3, 2).err().expect("grant g1 is full");
        assert_eq!(e.kind, Kind::SessionsPerGrant);
        // The identity limit counts across grants.
        let s3 = p.grant("g2", 3, 2).expect("another grant");
        let mut q = limits.pending("a", 10).expect("pending");
        let e = q.grant("g3", 3, 2).err().expect("identity a is full");
        assert_eq!(e.kind, Kind::SessionsPerIdentity);
        assert_eq!(limits.on_grant("g1"), 2);
        drop(held);
        drop(s3);
        drop(p);
        drop(q);
        assert_eq!(limits.in_use("a"), (0, 0, 0));
        assert_eq!(limits.on_grant("g1"), 0);
    }

    #[test]
    fn the_agent_wide_cap_holds_over_identities() {
        let limits = Limits::with_agent_max(4);
        let held: Vec<_> = (0..4)
            .map(|i| limits.pending(&format!("id{i}"), 10).expect("slot"))
            .collect();
        let e = limits.pending("other", 10).err().expect("agent full");
        assert_eq!(e.kind, Kind::Agent);
        drop(held);
        assert!(limits.pending("other", 10).is_ok());
    }

    #[test]
    fn the_agent_cap_stays_below_the_descriptor_limit() {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
        assert_eq!(rc, 0);
        let max = agent_max_from_rlimit() as u64;
        assert!(max * 2 + RESERVED_FDS <= lim.rlim_cur.max(64 * 2 + RESERVED_FDS));
    }
}
