//! The records jitgate keeps (requests, grants, tasks, sessions, audit events), shared by the
//! store, the control API and the CLI's `--json` output.

use std::{
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{config::Access, grants::scope::HostScope};

/// A point in time with millisecond precision; RFC 3339 (UTC) on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// Time left until `self`, zero if past.
    pub fn remaining(self) -> Duration {
        let now = Self::now().0;
        Duration::from_millis(u64::try_from(self.0.saturating_sub(now)).unwrap_or(0))
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_millis(self.0 as u64)
        } else {
            UNIX_EPOCH
        }
    }

    /// Parses RFC 3339 (`2026-11-23T10:00:00Z`) or a duration back from now (`1h`, `30m`).
    pub fn parse_since(s: &str) -> Result<Self, String> {
        if let Ok(d) = humantime::parse_duration(s) {
            return Ok(Self(Self::now().0.saturating_sub(d.as_millis() as i64)));
        }
        humantime::parse_rfc3339_weak(s)
            .map(Self::from)
            .map_err(|_| {
                format!("`{s}` is neither a time (2026-11-23T10:00:00Z) nor a duration (1h)")
            })
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_millis(self.to_system_time())
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Self::from)
            .map_err(serde::de::Error::custom)
    }
}

/// Serde helper: durations as whole seconds.
pub mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// Formats a duration for people: `59m 12s`, `2h 5m`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h {m}m"),
    }
}

/// Formats a byte count for people: `12 B`, `2.0 KiB`, `5.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Who asked or decided, as the kernel told us (never as they claimed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    /// The unix user name, or the uid as text when it has none.
    pub user: String,
    /// The workload identity when the caller runs inside the gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The task when the caller runs inside a `jitgate run` task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.identity, &self.task) {
            (Some(id), Some(task)) => write!(f, "workload {id} (task {task}, user {})", self.user),
            (Some(id), None) => write!(f, "workload {id} (user {})", self.user),
            _ => f.write_str(&self.user),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Pending,
    Approved,
    Denied,
    /// Nobody decided before it timed out or its task ended.
    Expired,
}

impl RequestStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "denied" => Self::Denied,
            "expired" => Self::Expired,
            _ => return None,
        })
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request for access, waiting for (or past) a decision.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub identity: String,
    pub resource: String,
    pub access: Access,
    #[serde(with = "secs", rename = "ttl_secs")]
    pub ttl: Duration,
    pub reason: String,
    /// Set when the grant is to be bound to one task.
    pub task: Option<String>,
    pub requested_by: Actor,
    pub created_at: Timestamp,
    pub status: RequestStatus,
    /// The policy that allowed it to be filed (and says who may approve).
    pub policy: String,
    pub decided_by: Option<Actor>,
    pub decided_at: Option<Timestamp>,
    pub decision_reason: Option<String>,
    pub grant: Option<String>,
    /// Set for a statement held by a guardrail: approving it lets the statement run (no grant
    /// is issued).
    #[serde(default)]
    pub statement: Option<String>,
    /// The session the held statement belongs to.
    #[serde(default)]
    pub session: Option<String>,
    /// Approvals recorded so far, for a request its policy says needs several
    /// (`approvals`, `approvals_from`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// The approvals the filing host's policies asked for when it was filed. In a fleet,
    /// hosts may run different policies for a while (a rollout): whoever approves needs at
    /// least this and at least what their own host asks, so a host with a laxer policy cannot
    /// decide with fewer approvals than the request was filed under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs: Option<Needs>,
    /// The host the request was filed on (a shared store reads it from the row's
    /// `host_id`, not from what the row says of itself). `None` in records written before
    /// hosts were kept (the embedded store's only host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Where the grant may be used, as resolved when the request was filed (the filing
    /// host's policy, narrowed by the request). An approver's host may narrow it further,
    /// never widen it. `None` for held statements and records from before scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostScope>,
}

/// See [`Request::needs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// Approvals from different people.
    pub approvals: u32,
    /// Principals each of whom must be among them (`approvals_from`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// What each approver's sign-in must show (`approval_max_age`, `approval_acr`).
    #[serde(default, skip_serializing_if = "is_no_step_up")]
    pub step_up: crate::config::StepUp,
}

fn is_no_step_up(s: &crate::config::StepUp) -> bool {
    !s.is_required()
}

impl Approval {
    /// Whether two approvals are the same person's: the same name, or the same unix account
    /// by uid or by name (a person approving once at the console and once with the CLI, or
    /// on two hosts).
    pub fn same_person(&self, other: &Self) -> bool {
        self.by == other.by
            || (self.uid != u32::MAX && self.uid == other.uid)
            || (self.account.is_some() && self.account == other.account)
    }
}

/// One person's approval of a request that needs several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approver as the audit log names them (`user alice`, `oidc alice@example.com`).
    pub by: String,
    /// Their unix uid (a console person's own unix account, if configured); `u32::MAX`:
    /// none.
    pub uid: u32,
    /// Their unix account's name (a console person's, if configured): the same person on
    /// every host of a fleet, whose uids may differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub at: Timestamp,
    /// The policy's `approvals_from` principals this approver counted for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub covers: Vec<String>,
    /// How long this approver agreed the grant may last (their `--ttl`, or the request's):
    /// the grant gets the shortest any approver gave, never one an approver did not agree
    /// to. `None` in records written before approvers' TTLs were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    Active,
    Expired,
    Revoked,
}

impl fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        })
    }
}

/// Time-boxed access for one identity to one resource.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub request: String,
    pub identity: String,
    pub resource: String,
    pub access: Access,
    /// Bound to this task: usable only from it, revoked when it ends.
    pub task: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// `auto (policy X)` or the approver.
    pub approved_by: String,
    pub policy: String,
    pub reason: String,
    pub revoked_at: Option<Timestamp>,
    pub revoked_by: Option<String>,
    pub revoke_reason: Option<String>,
    /// The hosts that may use it (see [`crate::grants::scope`]); a record without one is
    /// usable nowhere.
    #[serde(default)]
    pub hosts: HostScope,
}

impl Grant {
    pub fn status(&self, now: Timestamp) -> GrantStatus {
        if self.revoked_at.is_some() {
            GrantStatus::Revoked
        } else if self.expires_at <= now {
            GrantStatus::Expired
        } else {
            GrantStatus::Active
        }
    }
}

/// A `jitgate run` invocation: one task cgroup and the process tree in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub identity: String,
    pub cgroup: String,
    pub launched_by: Actor,
    pub run_as_uid: u32,
    pub command: String,
    pub reason: String,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

/// How a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    /// Still relaying.
    Open,
    /// Either side closed normally.
    Closed,
    /// Refused before a byte was relayed: no grant.
    RefusedNoGrant,
    /// Refused: the request filed for it was denied.
    RefusedDenied,
    /// Refused: nobody decided within `hold_timeout`.
    RefusedTimeout,
    /// Refused: the connection could not be attributed (no record, unknown workload).
    RefusedUnattributed,
    /// Refused: no resource matches the original destination any more.
    RefusedNoResource,
    /// Refused: a concurrency limit (per identity or per grant) or the startup timeout.
    RefusedLimit,
    /// Cut because the grant expired.
    GrantExpired,
    /// Cut because the grant was revoked.
    GrantRevoked,
    /// Cut because its resource left the configuration (reload).
    ResourceRemoved,
    /// Refused: the shared state store (fleet mode) is out of reach, so no grant can be
    /// confirmed nor the session recorded.
    RefusedStoreDown,
    /// Cut because the host lost the shared state store and could not confirm the grant
    /// within `store_lease`.
    StoreLost,
    /// The upstream could not be reached.
    UpstreamFailed,
    /// An I/O error on either side.
    Error,
    /// The host agent shut down.
    Shutdown,
}

impl SessionOutcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::RefusedNoGrant => "refused_no_grant",
            Self::RefusedDenied => "refused_denied",
            Self::RefusedTimeout => "refused_timeout",
            Self::RefusedUnattributed => "refused_unattributed",
            Self::RefusedNoResource => "refused_no_resource",
            Self::RefusedLimit => "refused_limit",
            Self::GrantExpired => "grant_expired",
            Self::GrantRevoked => "grant_revoked",
            Self::ResourceRemoved => "resource_removed",
            Self::RefusedStoreDown => "refused_store_down",
            Self::StoreLost => "store_lost",
            Self::UpstreamFailed => "upstream_failed",
            Self::Error => "error",
            Self::Shutdown => "shutdown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Open,
            Self::Closed,
            Self::RefusedNoGrant,
            Self::RefusedDenied,
            Self::RefusedTimeout,
            Self::RefusedUnattributed,
            Self::RefusedNoResource,
            Self::RefusedLimit,
            Self::GrantExpired,
            Self::GrantRevoked,
            Self::ResourceRemoved,
            Self::RefusedStoreDown,
            Self::StoreLost,
            Self::UpstreamFailed,
            Self::Error,
            Self::Shutdown,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl fmt::Display for SessionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One proxied (or refused) connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub identity: Option<String>,
    pub task: Option<String>,
    pub pid: u32,
    pub uid: u32,
    pub command: String,
    pub resource: Option<String>,
    pub grant: Option<String>,
    /// The address the workload asked for.
    pub destination: String,
    pub started_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: SessionOutcome,
    pub detail: String,
    /// PostgreSQL sessions: the database opened.
    #[serde(default)]
    pub database: Option<String>,
    /// The access level of the grant the session rides on.
    #[serde(default)]
    pub access: Option<Access>,
}

/// How a recorded statement was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Denied,
    Approved,
    /// Held for approval and refused (denied, or nobody decided in time).
    Refused,
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Approved => "approved",
            Self::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "allowed" => Self::Allowed,
            "approved" => Self::Approved,
            "refused" => Self::Refused,
            _ => Self::Denied,
        }
    }
}

/// One statement of a PostgreSQL session, as recorded (secrets and masked values masked).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatementRecord {
    pub session: String,
    pub seq: u32,
    pub at: Timestamp,
    pub text: String,
    pub params: Vec<Option<String>>,
    pub decision: Decision,
    /// The rule that decided (access, read-only, a guardrail's name).
    pub rule: Option<String>,
    pub approved_by: Option<String>,
    /// How long the statement waited for approval.
    pub held_ms: u64,
    pub duration_ms: Option<f64>,
    /// Rows returned or affected.
    pub rows: Option<u64>,
    /// The command tag (`SELECT 3`, `UPDATE 1`).
    pub tag: Option<String>,
    /// `SQLSTATE: message` when it failed.
    pub error: Option<String>,
    /// Values masked in its results.
    pub masked: u64,
}

/// One entry of the hash-chained audit log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub at: Timestamp,
    /// `request.filed`, `grant.issued`, `session.end`, ...
    pub kind: String,
    /// Who caused it (`user alice`, `workload ci-bot`, `jitgated`).
    pub actor: String,
    /// The event's facts.
    pub detail: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_as_rfc3339() {
        let t = Timestamp(1_795_000_000_123);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-18T11:06:40.123Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn since_accepts_durations_and_times() {
        let an_hour_ago = Timestamp::parse_since("1h").unwrap();
        let delta = Timestamp::now().0 - an_hour_ago.0;
        assert!((3_599_000..=3_601_000).contains(&delta));
        assert_eq!(
            Timestamp::parse_since("2026-11-18T11:06:40Z").unwrap(),
            Timestamp(1_795_000_000_000)
        );
        assert!(Timestamp::parse_since("yesterday-ish").is_err());
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(900)), "15m");
        assert_eq!(human_duration(Duration::from_secs(3552)), "59m 12s");
        assert_eq!(human_duration(Duration::from_secs(7500)), "2h 5m");
    }

    #[test]
    fn outcomes_round_trip() {
        for o in ["open", "refused_no_grant", "grant_revoked", "shutdown"] {
            assert_eq!(SessionOutcome::parse(o).unwrap().as_str(), o);
        }
    }
}

/// A bearer token of the console's HTTP API (`jitgate token issue`). It acts as the unix
/// user `user` with that user's rights as policy gives them at each use. Only a hash of its
/// secret is kept ([`Self::hash`]), never the secret.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiToken {
    /// `tok_` and ten base32 letters: what lists, logs and audit records name.
    pub id: String,
    /// A label its issuer chose (`ci-approver`), for lists.
    pub name: String,
    /// The unix user it acts as (resolved to a uid on the host where it is used).
    pub user: String,
    /// Refused any change (approve, deny, revoke): reads only.
    pub read_only: bool,
    /// Who issued it, as the audit log names them (`user root` issuing for another user).
    pub issued_by: String,
    pub created_at: Timestamp,
    /// Mandatory: no token lives for ever.
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// SHA-256 of the whole secret, hex. Never sent to a client.
    #[serde(skip)]
    pub hash: String,
}

impl ApiToken {
    /// Neither revoked nor expired at `now`.
    pub fn live(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}
