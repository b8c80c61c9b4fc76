//! Every kind of audit record, with its facts, in one enum.
//!
//! The chain's HMAC covers the kind string and the detail JSON byte for byte, and tests and
//! auditors read both, so they are frozen: a kind's name and its detail's keys and value types
//! never change. The detail is serialised through a `serde_json::Value`, whose object keys are
//! sorted, exactly as the `json!` literals it replaced were. Fields are declared in the order
//! those literals listed them, so the text stays the same should `serde_json`'s
//! `preserve_order` ever be switched on.

use std::path::PathBuf;

use serde::Serialize;

use crate::{
    config::Access,
    grants::scope::HostScope,
    model::{Grant, Request, Session, SessionOutcome, Timestamp},
};

/// One audit record's kind and facts.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// `request.refused`: no policy allows what was asked.
    RequestRefused(RequestRefused),
    /// `request.filed`.
    RequestFiled(RequestFiled),
    /// `statement.held`: a guardrail holds a statement for approval (filed as a request).
    StatementHeld(StatementHeld),
    /// `request.approved`.
    RequestApproved(RequestApproved),
    /// `request.approval`: one approval of a request that needs several (the last one is
    /// `request.approved`).
    RequestApproval(RequestApproval),
    /// `statement.approved`.
    StatementApproved(RequestRef),
    /// `request.denied`.
    RequestDenied(RequestDenied),
    /// `request.expired`: no decision in time, its task or session ended.
    RequestExpired(RequestExpired),
    /// `grant.issued`.
    GrantIssued(GrantIssued),
    /// `grant.revoked`.
    GrantRevoked(GrantRevoked),
    /// `grant.expired`.
    GrantExpired(GrantExpired),
    /// `task.started`.
    TaskStarted(TaskStarted),
    /// `task.ended`.
    TaskEnded(TaskRef),
    /// `session.start`.
    SessionStart(SessionStart),
    /// `session.refused`.
    SessionRefused(SessionRefused),
    /// `session.end`.
    SessionEnd(SessionEnd),
    /// `connect.refused`: the kernel refused a connection (folded over a window).
    ConnectRefused(KernelRefusal),
    /// `socket.refused`: the kernel refused a socket type.
    SocketRefused(KernelRefusal),
    /// `bind.refused`: the kernel refused a bind.
    BindRefused(KernelRefusal),
    /// `sessions.refused`: the proxy refused more connections with the same key within a
    /// window than it records as `session.refused` (folded, like kernel refusals).
    SessionsRefused(ProxyRefusal),
    /// `config.reloaded`.
    ConfigReloaded(ConfigReloaded),
    /// `gate.detached`.
    GateDetached(GateDetached),
    /// `daemon.started`.
    DaemonStarted(DaemonStarted),
    /// `daemon.stopped`.
    DaemonStopped(DaemonStopped),
    /// `limit.reached`: a session passed one of its grant's blast-radius limits (once per
    /// session and limit).
    LimitReached(LimitReached),
    /// `token.issued`: an API token of the console (never its secret).
    TokenIssued(TokenIssued),
    /// `token.revoked`.
    TokenRevoked(TokenRef),
    /// `api.call`: one call of the console's HTTP API with a token (state changes also
    /// have their own records, whose actor names the token).
    ApiCall(ApiCall),
    /// `spool.lost` (fleet mode): this host reached the shared store with a local spool other
    /// than the one the store knew as its current, which had not been retired: whatever
    /// that spool held after `shipped_through` was never shipped and is lost.
    SpoolLost(SpoolLost),
    /// `spool.retired` (fleet mode): an operator retired this host's spool on purpose, every
    /// record in it shipped (`jitgated --retire-spool`); a new spool follows it silently.
    SpoolRetired(SpoolRetired),
}

impl Event {
    /// The record's `kind` column.
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::RequestRefused(_) => "request.refused",
            Self::RequestFiled(_) => "request.filed",
            Self::StatementHeld(_) => "statement.held",
            Self::RequestApproved(_) => "request.approved",
            Self::RequestApproval(_) => "request.approval",
            Self::StatementApproved(_) => "statement.approved",
            Self::RequestDenied(_) => "request.denied",
            Self::RequestExpired(_) => "request.expired",
            Self::GrantIssued(_) => "grant.issued",
            Self::GrantRevoked(_) => "grant.revoked",
            Self::GrantExpired(_) => "grant.expired",
            Self::TaskStarted(_) => "task.started",
            Self::TaskEnded(_) => "task.ended",
            Self::SessionStart(_) => "session.start",
            Self::SessionRefused(_) => "session.refused",
            Self::SessionEnd(_) => "session.end",
            Self::ConnectRefused(_) => "connect.refused",
            Self::SocketRefused(_) => "socket.refused",
            Self::BindRefused(_) => "bind.refused",
            Self::SessionsRefused(_) => "sessions.refused",
            Self::ConfigReloaded(_) => "config.reloaded",
            Self::GateDetached(_) => "gate.detached",
            Self::DaemonStarted(_) => "daemon.started",
            Self::DaemonStopped(_) => "daemon.stopped",
            Self::LimitReached(_) => "limit.reached",
            Self::TokenIssued(_) => "token.issued",
            Self::TokenRevoked(_) => "token.revoked",
            Self::ApiCall(_) => "api.call",
            Self::SpoolLost(_) => "spool.lost",
            Self::SpoolRetired(_) => "spool.retired",
        }
    }

    /// The record's `detail` column: the JSON text the chain hashes.
    pub fn detail(&self) -> serde_json::Result<String> {
        Ok(serde_json::to_value(self)?.to_string())
    }

    /// `request.filed` for an ordinary request, `statement.held` for a held statement.
    pub fn filed(q: &Request) -> Self {
        if q.statement.is_some() {
            Self::StatementHeld(StatementHeld {
                request: q.id.clone(),
                session: q.session.clone(),
                resource: q.resource.clone(),
                rule: q.policy.clone(),
                statement: q.statement.clone(),
            })
        } else {
            Self::RequestFiled(RequestFiled {
                request: q.id.clone(),
                identity: q.identity.clone(),
                resource: q.resource.clone(),
                access: q.access,
                ttl_secs: q.ttl.as_secs(),
                task: q.task.clone(),
                reason: q.reason.clone(),
                policy: q.policy.clone(),
                host: q.host.clone(),
                hosts: q.hosts.clone(),
            })
        }
    }

    pub fn grant_issued(g: &Grant) -> Self {
        Self::GrantIssued(GrantIssued {
            grant: g.id.clone(),
            request: g.request.clone(),
            identity: g.identity.clone(),
            resource: g.resource.clone(),
            access: g.access,
            task: g.task.clone(),
            expires_at: g.expires_at,
            approved_by: g.approved_by.clone(),
            hosts: g.hosts.clone(),
        })
    }

    pub fn session_start(s: &Session) -> Self {
        Self::SessionStart(SessionStart {
            session: s.id.clone(),
            identity: s.identity.clone(),
            task: s.task.clone(),
            resource: s.resource.clone(),
            grant: s.grant.clone(),
            destination: s.destination.clone(),
            pid: s.pid,
            uid: s.uid,
            command: s.command.clone(),
        })
    }

    pub fn session_refused(s: &Session) -> Self {
        Self::SessionRefused(SessionRefused {
            session: s.id.clone(),
            identity: s.identity.clone(),
            task: s.task.clone(),
            resource: s.resource.clone(),
            destination: s.destination.clone(),
            pid: s.pid,
            uid: s.uid,
            command: s.command.clone(),
            outcome: s.outcome,
            reason: s.detail.clone(),
        })
    }

    pub fn session_end(s: &Session) -> Self {
        Self::SessionEnd(SessionEnd {
            session: s.id.clone(),
            outcome: s.outcome,
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            grant: s.grant.clone(),
            detail: s.detail.clone(),
        })
    }
}

/// The actor of a session's records: the workload it was attributed to.
pub fn session_actor(s: &Session) -> String {
    format!("workload {}", s.identity.as_deref().unwrap_or("?"))
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestRefused {
    pub identity: String,
    pub resource: String,
    pub access: Access,
    pub ttl_secs: u64,
    pub task: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestFiled {
    pub request: String,
    pub identity: String,
    pub resource: String,
    pub access: Access,
    pub ttl_secs: u64,
    pub task: Option<String>,
    pub reason: String,
    pub policy: String,
    /// The host it was filed on and the scope it asks for (absent in records from before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostScope>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LimitReached {
    pub session: String,
    pub identity: String,
    pub resource: String,
    pub grant: String,
    /// The `policy.limits` key.
    pub limit: String,
    /// Its value.
    pub value: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatementHeld {
    pub request: String,
    pub session: Option<String>,
    pub resource: String,
    /// `guardrail NAME` (the request's policy).
    pub rule: String,
    pub statement: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestApproved {
    pub request: String,
    pub grant: String,
    pub ttl_secs: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestApproval {
    pub request: String,
    /// Distinct approvals so far, this one included.
    pub count: u32,
    /// How many the policy needs.
    pub needed: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestRef {
    pub request: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RequestDenied {
    pub request: String,
    pub reason: Option<String>,
}

/// Why a pending request lapsed: its task ended (`task`), or anything else (`why`).
#[derive(Clone, Debug, Serialize)]
pub struct RequestExpired {
    pub request: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrantIssued {
    pub grant: String,
    pub request: String,
    pub identity: String,
    pub resource: String,
    pub access: Access,
    pub task: Option<String>,
    pub expires_at: Timestamp,
    pub approved_by: String,
    /// Where the grant may be used (`"fleet"` or the hosts).
    pub hosts: HostScope,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrantRevoked {
    pub grant: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct GrantExpired {
    pub grant: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskStarted {
    pub task: String,
    pub identity: String,
    pub run_as_uid: u32,
    pub command: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskRef {
    pub task: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionStart {
    pub session: String,
    pub identity: Option<String>,
    pub task: Option<String>,
    pub resource: Option<String>,
    pub grant: Option<String>,
    pub destination: String,
    pub pid: u32,
    pub uid: u32,
    pub command: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionRefused {
    pub session: String,
    pub identity: Option<String>,
    pub task: Option<String>,
    pub resource: Option<String>,
    pub destination: String,
    pub pid: u32,
    pub uid: u32,
    pub command: String,
    pub outcome: SessionOutcome,
    /// The session's detail: why it was refused.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionEnd {
    pub session: String,
    pub outcome: SessionOutcome,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub grant: Option<String>,
    pub detail: String,
}

/// Kernel refusals with the same key, folded over a window.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRefusal {
    pub identity: Option<String>,
    pub task: Option<String>,
    pub pids: Vec<u32>,
    pub uid: u32,
    pub destination: Option<String>,
    pub socket_type: u8,
    pub protocol: u16,
    pub reason: String,
    pub count: u64,
}

/// Proxy refusals with the same key, folded over a window.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyRefusal {
    pub identity: Option<String>,
    pub task: Option<String>,
    pub uid: u32,
    pub pids: Vec<u32>,
    pub resource: Option<String>,
    pub destination: String,
    pub outcome: SessionOutcome,
    /// The last refusal's reason.
    pub reason: String,
    /// Refusals in the window beyond those recorded as `session.refused`.
    pub count: u64,
}

/// What a reload changed; also the answer `jitgate reload` prints.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigReloaded {
    pub config: String,
    pub resources: Vec<String>,
    pub sessions_ended: usize,
    pub grants_revoked: Vec<String>,
    pub restart_required_for: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GateDetached {
    pub pin_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct DaemonStarted {
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct DaemonStopped {}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::model::{Actor, RequestStatus};

    fn request(statement: Option<&str>) -> Request {
        Request {
            id: "req_1".into(),
            identity: "ci-bot".into(),
            resource: "orders-db".into(),
            access: Access::Write,
            ttl: Duration::from_secs(900),
            reason: "deploy".into(),
            task: None,
            requested_by: Actor {
                uid: 1000,
                user: "alice".into(),
                identity: None,
                task: None,
            },
            created_at: Timestamp(1),
            status: RequestStatus::Pending,
            policy: "guardrail no-drop".into(),
            decided_by: None,
            decided_at: None,
            decision_reason: None,
            approvals: Vec::new(),
            needs: None,
            grant: None,
            statement: statement.map(str::to_owned),
            session: statement.map(|_| "ses_1".to_owned()),
            host: None,
            hosts: None,
        }
    }

    fn session() -> Session {
        Session {
            id: "ses_1".into(),
            identity: Some("ci-bot".into()),
            task: None,
            pid: 42,
            uid: 1000,
            command: "psql".into(),
            resource: Some("orders-db".into()),
            grant: Some("grt_1".into()),
            destination: "10.0.0.5:5432".into(),
            started_at: Timestamp(1),
            ended_at: Some(Timestamp(2)),
            bytes_up: 3,
            bytes_down: 4,
            outcome: SessionOutcome::GrantRevoked,
            detail: "revoked".into(),
            database: None,
            access: None,
        }
    }

    /// Each event's detail text equals what the `json!` literal it replaced produced.
    #[test]
    fn details_are_byte_for_byte_the_old_ones() {
        let q = request(None);
        let cases: Vec<(Event, &str, serde_json::Value)> = vec![
            (
                Event::filed(&q),
                "request.filed",
                json!({
                    "request": q.id, "identity": q.identity, "resource": q.resource, "access": q.access,
                    "ttl_secs": q.ttl.as_secs(), "task": q.task, "reason": q.reason, "policy": q.policy,
                }),
            ),
            {
                let q = request(Some("DROP TABLE t"));
                (
                    Event::filed(&q),
                    "statement.held",
                    json!({
                        "request": q.id, "session": q.session, "resource": q.resource,
                        "rule": q.policy, "statement": q.statement,
                    }),
                )
            },
            (
                Event::RequestExpired(RequestExpired {
                    request: "r".into(),
                    task: Some("t".into()),
                    why: None,
                }),
                "request.expired",
                json!({"request": "r", "task": "t"}),
            ),
            (
                Event::RequestExpired(RequestExpired {
                    request: "r".into(),
                    task: None,
                    why: Some("w".into()),
                }),
                "request.expired",
                json!({"request": "r", "why": "w"}),
            ),
            (
                Event::RequestDenied(RequestDenied {
                    request: "r".into(),
                    reason: None,
                }),
                "request.denied",
                json!({"request": "r", "reason": None::<String>}),
            ),
            {
                let s = session();
                (
                    Event::session_start(&s),
                    "session.start",
                    json!({
                        "session": s.id, "identity": s.identity, "task": s.task, "resource": s.resource,
                        "grant": s.grant, "destination": s.destination, "pid": s.pid, "uid": s.uid,
                        "command": s.command,
                    }),
                )
            },
            {
                let s = session();
                (
                    Event::session_refused(&s),
                    "session.refused",
                    json!({
                        "session": s.id, "identity": s.identity, "task": s.task,
                        "resource": s.resource, "destination": s.destination, "pid": s.pid,
                        "uid": s.uid, "command": s.command, "outcome": s.outcome,
                        "reason": s.detail,
                    }),
                )
            },
            {
                let s = session();
                (
                    Event::session_end(&s),
                    "session.end",
                    json!({
                        "session": s.id, "outcome": s.outcome, "bytes_up": s.bytes_up,
                        "bytes_down": s.bytes_down, "grant": s.grant, "detail": s.detail,
                    }),
                )
            },
            (
                Event::GateDetached(GateDetached {
                    pin_dir: "/sys/fs/bpf/jitgate".into(),
                }),
                "gate.detached",
                json!({"pin_dir": PathBuf::from("/sys/fs/bpf/jitgate")}),
            ),
            (
                Event::DaemonStopped(DaemonStopped {}),
                "daemon.stopped",
                json!({}),
            ),
        ];
        let g = Grant {
            id: "grt_1".into(),
            request: "req_1".into(),
            identity: "ci-bot".into(),
            resource: "cache".into(),
            access: Access::Read,
            task: Some("t-1".into()),
            created_at: Timestamp(1_795_000_000_000),
            expires_at: Timestamp(1_795_000_600_123),
            approved_by: "alice".into(),
            policy: "p".into(),
            reason: "r".into(),
            revoked_at: None,
            revoked_by: None,
            revoke_reason: None,
            hosts: HostScope::Fleet,
        };
        let identity = Some("bot".to_owned());
        let task: Option<String> = None;
        let refusal = KernelRefusal {
            identity: identity.clone(),
            task: task.clone(),
            pids: vec![7, 8],
            uid: 1000,
            destination: Some("10.0.0.9:443".into()),
            socket_type: 1,
            protocol: 6,
            reason: "egress denied (tcp)".into(),
            count: 10,
        };
        let restart: Vec<&'static str> = vec!["socket"];
        let cases = cases.into_iter().chain([
            (
                Event::grant_issued(&g),
                "grant.issued",
                json!({
                    "grant": g.id, "request": g.request, "identity": g.identity, "resource": g.resource,
                    "access": g.access, "task": g.task, "expires_at": g.expires_at, "approved_by": g.approved_by,
                    "hosts": "fleet",
                }),
            ),
            (
                Event::RequestRefused(RequestRefused {
                    identity: "ci-bot".into(),
                    resource: "cache".into(),
                    access: Access::Admin,
                    ttl_secs: 60,
                    task: None,
                    reason: "no".into(),
                }),
                "request.refused",
                json!({
                    "identity": "ci-bot", "resource": "cache", "access": Access::Admin,
                    "ttl_secs": 60u64, "task": None::<&str>, "reason": "no",
                }),
            ),
            (
                Event::RequestApproved(RequestApproved {
                    request: "r".into(),
                    grant: "g".into(),
                    ttl_secs: 900,
                }),
                "request.approved",
                json!({"request": "r", "grant": "g", "ttl_secs": 900u64}),
            ),
            (
                Event::StatementApproved(RequestRef {
                    request: "r".into(),
                }),
                "statement.approved",
                json!({"request": "r"}),
            ),
            (
                Event::GrantRevoked(GrantRevoked {
                    grant: "g".into(),
                    reason: "why".into(),
                }),
                "grant.revoked",
                json!({"grant": "g", "reason": "why"}),
            ),
            (
                Event::GrantExpired(GrantExpired { grant: "g".into() }),
                "grant.expired",
                json!({"grant": "g"}),
            ),
            (
                Event::TaskStarted(TaskStarted {
                    task: "t".into(),
                    identity: "i".into(),
                    run_as_uid: 1000,
                    command: "make".into(),
                    reason: "r".into(),
                }),
                "task.started",
                json!({"task": "t", "identity": "i", "run_as_uid": 1000u32, "command": "make", "reason": "r"}),
            ),
            (
                Event::TaskEnded(TaskRef { task: "t".into() }),
                "task.ended",
                json!({"task": "t"}),
            ),
            (
                Event::ConnectRefused(refusal.clone()),
                "connect.refused",
                json!({
                    "identity": identity.as_ref(),
                    "task": task.as_ref(),
                    "pids": vec![7u32, 8],
                    "uid": 1000u32,
                    "destination": Some("10.0.0.9:443".to_owned()),
                    "socket_type": 1u8,
                    "protocol": 6u16,
                    "reason": "egress denied (tcp)",
                    "count": 10u64,
                }),
            ),
            (
                Event::ConfigReloaded(ConfigReloaded {
                    config: "/etc/jitgate/jitgate.toml".into(),
                    resources: vec!["cache".into()],
                    sessions_ended: 2,
                    grants_revoked: vec!["g".into()],
                    restart_required_for: restart.iter().map(|k| (*k).to_owned()).collect(),
                }),
                "config.reloaded",
                json!({
                    "config": "/etc/jitgate/jitgate.toml",
                    "resources": vec!["cache".to_owned()],
                    "sessions_ended": 2usize,
                    "grants_revoked": vec!["g".to_owned()],
                    "restart_required_for": restart,
                }),
            ),
            (
                Event::DaemonStarted(DaemonStarted { pid: 77 }),
                "daemon.started",
                json!({"pid": 77u32}),
            ),
        ]);
        assert_eq!(
            Event::SocketRefused(refusal.clone()).kind(),
            "socket.refused"
        );
        assert_eq!(Event::BindRefused(refusal).kind(), "bind.refused");
        for (event, kind, old) in cases {
            assert_eq!(event.kind(), kind);
            assert_eq!(
                event.detail().unwrap(),
                serde_json::to_string(&old).unwrap()
            );
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenIssued {
    pub token: String,
    pub name: String,
    pub user: String,
    pub read_only: bool,
    pub expires_at: Timestamp,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenRef {
    pub token: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApiCall {
    pub token: String,
    pub method: String,
    /// The path without its query.
    pub path: String,
    pub status: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpoolLost {
    /// The spool the store knew as this host's current one.
    pub spool: String,
    /// The last of its records the store has (0: none); any after it are lost.
    pub shipped_through: i64,
    /// The spool this host has now.
    pub replaced_by: String,
    /// When the lost spool was registered (ms since the epoch).
    pub registered_at: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpoolRetired {
    pub spool: String,
    /// The last of its records the store has (every record it ever held).
    pub shipped_through: i64,
}
