//! The control protocol: one JSON object per line each way over the Unix socket. A
//! connection may carry several calls in turn. Who is calling is never part of a call: the
//! server learns it from the kernel (`SO_PEERCRED` and the caller's cgroup).

use serde::{Deserialize, Serialize};

use crate::{config::Access, model::Timestamp, tasks::RunSpec};

/// Largest call or reply line accepted.
pub const MAX_LINE: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    Status,
    Request {
        resource: String,
        access: Option<Access>,
        ttl_secs: Option<u64>,
        #[serde(default)]
        reason: String,
        for_identity: Option<String>,
        /// Where the grant may be used (`--hosts`): within what policy allows.
        #[serde(default)]
        hosts: Option<crate::grants::scope::HostsSpec>,
    },
    /// Waits for a request's decision (at most `timeout_secs`).
    Wait {
        request: String,
        timeout_secs: u64,
    },
    Approvals,
    Approve {
        request: String,
        ttl_secs: Option<u64>,
    },
    Deny {
        request: String,
        reason: Option<String>,
    },
    Grants {
        all: bool,
    },
    Revoke {
        grant: String,
        reason: Option<String>,
    },
    Sessions {
        all: bool,
        limit: usize,
    },
    /// One session with its statements and audit events.
    SessionShow {
        id: String,
        /// The first statement shown (its sequence number); a long session is shown a page
        /// at a time (see [`SessionDetail::more_from`]).
        #[serde(default)]
        from: u32,
    },
    Audit {
        since: Option<Timestamp>,
        limit: usize,
    },
    AuditVerify,
    /// Every host's chain in a shared store (`audit verify --fleet`).
    AuditVerifyFleet,
    Run(RunSpec),
    Reload,
    /// Removes the gate from the kernel and stops the host agent.
    Detach,
    /// Issues an API token of the console (its secret comes back once).
    TokenIssue(super::tokens::TokenSpec),
    TokenList,
    TokenRevoke {
        id: String,
    },
}

/// Why a call failed; the CLI maps each to an exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Bad arguments.
    Invalid,
    /// No such request, grant or identity.
    NotFound,
    /// The caller may not do this.
    Forbidden,
    /// Policy refuses it.
    Refused,
    /// The thing is not in a state that allows it (already decided, already revoked).
    Conflict,
    /// Something broke on the daemon's side.
    Internal,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl Reply {
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::to_value(data) {
            Ok(v) => Self {
                ok: true,
                data: Some(v),
                error: None,
            },
            Err(e) => Self::err(ErrorCode::Internal, format!("encoding the reply: {e}")),
        }
    }

    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(ApiError {
                code,
                message: message.into(),
            }),
        }
    }
}

/// What `jitgate sessions show` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionDetail {
    pub session: crate::model::Session,
    pub statements: Vec<crate::model::StatementRecord>,
    pub events: Vec<crate::model::AuditEvent>,
    /// Sequence numbers of the requests whose exec stream was recorded and can be replayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recordings: Vec<u32>,
    /// Where the next page of statements starts, when this one was cut (replies stay far
    /// under the control socket's limit however much a session recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more_from: Option<u32>,
    /// Stored batches of statement records the store could not read (damaged): missing
    /// from `statements`, and said so.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreadable: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One entry of a session's timeline: a statement (or HTTP request) it ran, or an audit
/// event about it.
pub enum TimelineItem<'a> {
    Statement(&'a crate::model::StatementRecord),
    Event(&'a crate::model::AuditEvent),
}

impl SessionDetail {
    /// Statements and events in time order, as every front end replays them: the session's
    /// own start and end are the header, not entries. The sort is stable, so statements of
    /// the same millisecond stay in their sequence.
    pub fn timeline(&self) -> Vec<(crate::model::Timestamp, TimelineItem<'_>)> {
        let mut items: Vec<_> = self
            .statements
            .iter()
            .map(|st| (st.at, TimelineItem::Statement(st)))
            .chain(
                self.events
                    .iter()
                    .filter(|e| {
                        !matches!(
                            e.kind.as_str(),
                            "session.start" | "session.end" | "session.refused"
                        )
                    })
                    .map(|e| (e.at, TimelineItem::Event(e))),
            )
            .collect();
        items.sort_by_key(|(t, _)| *t);
        items
    }
}

/// What `jitgate status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub started_at: Timestamp,
    pub config: String,
    pub gate_cgroup: String,
    pub pin_dir: String,
    pub attached: Vec<String>,
    /// What the health check finds wrong (the same answer as `/healthz` and the watchdog):
    /// empty when healthy.
    #[serde(default)]
    pub problems: Vec<String>,
    pub egress: String,
    pub proxy_listen: Vec<String>,
    pub destination_prefixes: usize,
    pub kernel_counters: std::collections::BTreeMap<String, u64>,
    pub live_grants: usize,
    pub pending_requests: usize,
    pub open_sessions: usize,
    pub resources: Vec<String>,
    pub identities: Vec<String>,
    /// Who asked, as the daemon sees them.
    pub caller: String,
    /// A shared store's state (fleet mode); absent for the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
    /// Set while the store does not keep writes (the gate is closed meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_writes: Option<crate::store::health::WriteFailure>,
    /// Bytes of records handed to the embedded store and not yet written.
    #[serde(default)]
    pub store_backlog: u64,
}

/// Where a shared state store stands, as `jitgate status` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StoreStatus {
    /// `connecting` (not reached since start), `up`, `lost`.
    pub state: crate::store::health::StoreState,
    pub since: Timestamp,
    /// Whether new grants may be issued and new sessions opened now (the store confirmed
    /// and this host's live grants checked against it since it was last reached).
    pub available: bool,
    /// Milliseconds since this host last confirmed its grants with the store.
    pub confirmed_ms_ago: Option<u64>,
    pub lease_secs: u64,
    pub error: Option<String>,
    /// `error` is permanent (a wrong password, a schema newer than this agent): retried every
    /// 30 s, an operator must act.
    #[serde(default)]
    pub permanent: bool,
    pub url: String,
    /// The local spool: records made while the store was out of reach, waiting to be
    /// shipped (absent from older agents' answers).
    #[serde(default)]
    pub spool: crate::store::health::SpoolStats,
    /// How the primary last reached keeps acknowledged decisions through a failover
    /// (absent until it is reached, and from older agents' answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<crate::store::health::Durability>,
}
