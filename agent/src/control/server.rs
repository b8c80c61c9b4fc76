//! The control socket: accepts CLI connections, identifies each caller from the kernel, and
//! dispatches calls to the daemon's parts.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{
    api::{Call, ErrorCode, MAX_LINE, Reply},
    peer,
};
use crate::{
    config::Principal,
    daemon::Daemon,
    grants::{EngineError, RequestSpec},
    identity::{Caller, principal_matches},
    model::Timestamp,
};

/// Longest a `Wait` call may block.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Binds the control socket, refusing to steal it from a running daemon.
pub fn bind(path: &Path, mode: u32, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another jitgated is listening on {}; stop it first (or give this one its own [daemon] socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    if let Some(group) = group {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => nix::unistd::chown(path, None, Some(g.gid))
                .with_context(|| format!("giving {} to group {group}", path.display()))?,
            _ => warn!(
                group,
                "socket_group does not exist; the socket stays root's group"
            ),
        }
    }
    Ok(listener)
}

pub fn serve(listener: UnixListener, daemon: Arc<Daemon>, tracker: TaskTracker) {
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = daemon.shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let daemon = daemon.clone();
                        inner.spawn(async move { connection(stream, daemon).await });
                    }
                    Err(e) => {
                        warn!(error = %e, "control accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    });
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>) {
    let caller = match peer::identify(&stream, &daemon.workloads) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot identify a control caller; closing");
            return;
        }
    };
    let span = info_span!("control", user = %caller.user, pid = caller.pid, workload = ?caller.workload.as_ref().map(|w| &w.identity));
    async move {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let mut line = String::new();
        loop {
            line.clear();
            let mut limited = (&mut lines).take(MAX_LINE as u64 + 1);
            let n = tokio::select! {
                r = limited.read_line(&mut line) => match r {
                    Ok(n) => n,
                    Err(_) => break,
                },
                () = daemon.shutdown.cancelled() => break,
            };
            if n == 0 {
                break;
            }
            let too_large = line.len() > MAX_LINE;
            let reply = if too_large {
                Reply::err(ErrorCode::Invalid, "call too large")
            } else {
                match serde_json::from_str::<Call>(&line) {
                    Ok(call) => dispatch(&daemon, &caller, call).await,
                    Err(e) => Reply::err(ErrorCode::Invalid, format!("malformed call: {e}")),
                }
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            out.push(b'\n');
            if write.write_all(&out).await.is_err() || too_large {
                break;
            }
        }
    }
    .instrument(span)
    .await;
}

fn engine_err(e: EngineError) -> Reply {
    let code = match &e {
        EngineError::NotFound(_) => ErrorCode::NotFound,
        EngineError::Forbidden(_) => ErrorCode::Forbidden,
        EngineError::Refused(_) => ErrorCode::Refused,
        EngineError::Conflict(_) => ErrorCode::Conflict,
        EngineError::Invalid(_) => ErrorCode::Invalid,
        EngineError::Store(_) => ErrorCode::Internal,
    };
    Reply::err(code, e.to_string())
}

fn reply<T: serde::Serialize>(r: Result<T, EngineError>) -> Reply {
    match r {
        Ok(v) => Reply::ok(v),
        Err(e) => engine_err(e),
    }
}

/// Other people's records (the audit log, every session's statements) are for operators:
/// root, members of `socket_group` and the approvers of any policy. The socket may be open
/// to every local user (so that workloads can `jitgate request`); that must not make every
/// user a reader of what workloads did.
fn operators_only(daemon: &Daemon, caller: &Caller, what: &str) -> Option<Reply> {
    if caller.is_workload() {
        return Some(Reply::err(
            ErrorCode::Forbidden,
            format!("a gated workload cannot {what}"),
        ));
    }
    own_or_operators(daemon, caller, what)
}

/// Where a workload may read its own records (the caller filters them): a workload passes,
/// anyone else must be an operator (see [`operators_only`]).
fn own_or_operators(daemon: &Daemon, caller: &Caller, what: &str) -> Option<Reply> {
    (!caller.is_workload() && !is_operator(daemon, caller)).then(|| {
        Reply::err(
            ErrorCode::Forbidden,
            format!(
                "only root, members of the socket's group and approvers can {what}; {} is none of these",
                caller.user
            ),
        )
    })
}

/// Root, a member of `socket_group`, or an approver of any policy.
fn is_operator(daemon: &Daemon, caller: &Caller) -> bool {
    if caller.is_root() {
        return true;
    }
    let config = daemon.config.get();
    let mut operators: Vec<Principal> = config
        .policies
        .iter()
        .flat_map(|p| p.approvers.iter().cloned())
        .collect();
    if let Some(group) = &config.daemon.socket_group {
        operators.push(Principal::Group(group.clone()));
    }
    principal_matches(&operators, caller.uid)
}

fn root_only(caller: &Caller, what: &str) -> Option<Reply> {
    (!caller.is_root()).then(|| {
        Reply::err(
            ErrorCode::Forbidden,
            format!("only root (outside the gate) can {what}"),
        )
    })
}

async fn dispatch(daemon: &Daemon, caller: &Caller, call: Call) -> Reply {
    debug!(?call, "call");
    match call {
        Call::Status => Reply::ok(daemon.status(caller).await),
        Call::Request {
            resource,
            access,
            ttl_secs,
            reason,
            for_identity,
        } => reply(
            daemon
                .engine
                .file(
                    caller,
                    RequestSpec {
                        resource,
                        access,
                        ttl: ttl_secs.map(Duration::from_secs),
                        reason,
                        for_identity,
                        task: None,
                    },
                )
                .await,
        ),
        Call::Wait {
            request,
            timeout_secs,
        } => {
            let timeout = Duration::from_secs(timeout_secs).min(MAX_WAIT);
            match daemon.engine.request(&request).await {
                Ok(Some(q))
                    if caller.is_workload()
                        && caller.workload.as_ref().map(|w| &w.identity) != Some(&q.identity) =>
                {
                    Reply::err(
                        ErrorCode::Forbidden,
                        "a workload can only wait on its own requests",
                    )
                }
                Ok(_) => {
                    // A held statement's text is for operators and its own workload.
                    let reader = caller.is_workload() || is_operator(daemon, caller);
                    reply(daemon.engine.wait(&request, timeout).await.map(|mut q| {
                        if !reader {
                            q.statement = None;
                        }
                        q
                    }))
                }
                Err(e) => engine_err(e),
            }
        }
        Call::Approvals => {
            if let Some(r) = own_or_operators(daemon, caller, "list requests waiting for approval")
            {
                return r;
            }
            reply(daemon.engine.approvals(caller).await)
        }
        Call::Approve { request, ttl_secs } => reply(
            daemon
                .engine
                .approve(caller, &request, ttl_secs.map(Duration::from_secs))
                .await,
        ),
        Call::Deny { request, reason } => reply(daemon.engine.deny(caller, &request, reason).await),
        Call::Grants { all } => reply(daemon.engine.grants(caller, all).await),
        Call::Revoke { grant, reason } => reply(daemon.engine.revoke(caller, &grant, reason).await),
        Call::Sessions { all, limit } => {
            // A workload sees its own sessions (filtered below); anyone else must be an operator.
            if let Some(r) = own_or_operators(daemon, caller, "list sessions") {
                return r;
            }
            let limit = limit.clamp(1, 10_000);
            match daemon.store.sessions(!all, limit).await {
                Ok(mut sessions) => {
                    if caller.is_workload() {
                        let own = caller.workload.as_ref().map(|w| w.identity.clone());
                        sessions.retain(|s| s.identity == own);
                    }
                    for s in &mut sessions {
                        if let Some((up, down)) = daemon.registry.counts(&s.id) {
                            s.bytes_up = up;
                            s.bytes_down = down;
                        }
                    }
                    Reply::ok(sessions)
                }
                Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
            }
        }
        Call::SessionShow { id } => {
            let found = daemon.store.session_history(id.clone()).await.map(|h| {
                h.map(|h| super::api::SessionDetail {
                    session: h.session,
                    statements: h.statements,
                    events: h.events,
                })
            });
            match found {
                Ok(Some(mut detail)) => {
                    if let Some(r) = own_or_operators(daemon, caller, "read a session") {
                        return r;
                    }
                    if caller.is_workload()
                        && caller.workload.as_ref().map(|w| &w.identity)
                            != detail.session.identity.as_ref()
                    {
                        return Reply::err(
                            ErrorCode::Forbidden,
                            "a workload can only see its own sessions",
                        );
                    }
                    if let Some((up, down)) = daemon.registry.counts(&id) {
                        detail.session.bytes_up = up;
                        detail.session.bytes_down = down;
                    }
                    Reply::ok(detail)
                }
                Ok(None) => Reply::err(ErrorCode::NotFound, format!("no session {id}")),
                Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
            }
        }
        Call::Audit { since, limit } => {
            if let Some(r) = operators_only(daemon, caller, "read the audit log") {
                return r;
            }
            let limit = limit.clamp(1, 100_000);
            match daemon.store.audit_log(since, limit).await {
                Ok(events) => Reply::ok(events),
                Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
            }
        }
        Call::AuditVerify => {
            if let Some(r) = operators_only(daemon, caller, "verify the audit log") {
                return r;
            }
            match daemon.store.verify_audit().await {
                Ok(report) => Reply::ok(report),
                Err(e) => Reply::err(ErrorCode::Internal, e.to_string()),
            }
        }
        Call::Run(spec) => reply(daemon.tasks.run(caller, spec).await),
        Call::Reload => {
            if let Some(r) = root_only(caller, "reload the configuration") {
                return r;
            }
            match daemon.reload().await {
                Ok(summary) => Reply::ok(summary),
                Err(e) => Reply::err(ErrorCode::Invalid, format!("{e:#}")),
            }
        }
        Call::Detach => {
            if let Some(r) = root_only(caller, "detach the gate") {
                return r;
            }
            match daemon.detach() {
                Ok(removed) => {
                    info!(by = %caller.user, "gate detached on request; shutting down");
                    Reply::ok(serde_json::json!({
                        "removed": removed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                        "at": Timestamp::now(),
                    }))
                }
                Err(e) => Reply::err(ErrorCode::Internal, format!("{e:#}")),
            }
        }
    }
}
