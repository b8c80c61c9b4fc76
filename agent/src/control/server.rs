//! The control socket, the CLI's front end to the control service: reads one JSON call per
//! line, identifies the caller from the kernel ([`super::peer`]), hands the typed call to
//! [`ControlService`] and writes its answer back as one JSON line. What a call does and who
//! may make it are the service's business, not this file's.

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, info_span, warn};

use super::{
    api::{Call, ErrorCode, MAX_LINE, Reply},
    peer,
    service::{ControlError, ControlService},
};
use crate::{
    grants::RequestSpec,
    identity::{Caller, Workloads},
};

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

/// Most control connections open at once per pool (callers inside the gate, workloads, in
/// one; everyone else in the other, so that a workload holding connections open cannot lock
/// the operators out), and per uid within a pool. Each holds a task and up to a call's
/// buffer ([`MAX_LINE`]).
const MAX_CONNECTIONS: usize = 256;
const MAX_PER_UID: usize = 64;

/// A connection that sends no call for this long is closed (the CLI sends its calls one
/// after another and closes; a call that waits, such as an approval, is not idle).
const IDLE: Duration = Duration::from_secs(120);

/// How long a reply may take to be read: the CLI reads at once.
const REPLY_WRITE: Duration = Duration::from_secs(30);

/// Refused connections answered at once (each waits up to a second for its call); past
/// this a refused connection is closed without an answer.
const MAX_REFUSING: usize = 64;

/// Who holds control connections now, by pool and uid.
#[derive(Default)]
struct Admission {
    open: Mutex<HashMap<(bool, u32), usize>>,
    refusing: std::sync::atomic::AtomicUsize,
}

/// One admitted connection; given back when dropped.
struct Admitted {
    admission: Arc<Admission>,
    key: (bool, u32),
}

impl Admission {
    /// Admits a connection of `caller`, or says why not.
    fn admit(self: &Arc<Self>, caller: &Caller) -> Result<Admitted, String> {
        let gated = caller.workload.is_some() || caller.gated_unattributed;
        let key = (gated, caller.uid);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let pool: usize = open
            .iter()
            .filter(|((g, _), _)| *g == gated)
            .map(|(_, n)| n)
            .sum();
        let mine = open.get(&key).copied().unwrap_or(0);
        if mine >= MAX_PER_UID || pool >= MAX_CONNECTIONS {
            return Err(format!(
                "too many control connections open ({} from uid {}, {pool} from {}; at most {MAX_PER_UID} and {MAX_CONNECTIONS}): close the idle ones and retry",
                mine,
                caller.uid,
                if gated {
                    "workloads"
                } else {
                    "callers outside the gate"
                }
            ));
        }
        *open.entry(key).or_default() += 1;
        Ok(Admitted {
            admission: self.clone(),
            key,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serves control connections until `shutdown`. `workloads` tells callers inside the gate
/// apart (see [`peer::identify`]).
pub fn serve(
    listener: UnixListener,
    service: ControlService,
    workloads: Workloads,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let inner = tracker.clone();
    let admission = Arc::new(Admission::default());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (service, workloads, shutdown, admission) =
                            (service.clone(), workloads.clone(), shutdown.clone(), admission.clone());
                        inner.spawn(async move {
                            connection(stream, &service, &workloads, &shutdown, &admission).await;
                        });
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

async fn connection(
    stream: UnixStream,
    service: &ControlService,
    workloads: &Workloads,
    shutdown: &CancellationToken,
    admission: &Arc<Admission>,
) {
    let caller = match peer::identify(&stream, workloads) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot identify a control caller; closing");
            return;
        }
    };
    let _admitted = match admission.admit(&caller) {
        Ok(a) => a,
        Err(why) => {
            warn!(
                uid = caller.uid,
                pid = caller.pid,
                "control connection refused: {why}"
            );
            use std::sync::atomic::Ordering;
            if admission.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
                admission.refusing.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            let mut out = serde_json::to_vec(&Reply::err(ErrorCode::Refused, why))
                .unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            out.push(b'\n');
            // The refusal answers the first call (a client that has sent one reads its
            // answer, rather than finding the connection closed under its write), or is
            // sent after a second if none comes. What is read is thrown away, 4 KiB at most
            // (a CLI call is far shorter).
            let (mut read, mut write) = stream.into_split();
            let mut first = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(1), read.read(&mut first)).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), write.write_all(&out)).await;
            admission.refusing.fetch_sub(1, Ordering::SeqCst);
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
                r = tokio::time::timeout(IDLE, limited.read_line(&mut line)) => match r {
                    Ok(Ok(n)) => n,
                    Ok(Err(_)) => break,
                    Err(_) => {
                        debug!("idle control connection closed");
                        break;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            if n == 0 {
                break;
            }
            let too_large = line.len() > MAX_LINE;
            let reply = if too_large {
                Reply::err(ErrorCode::Invalid, "call too large")
            } else {
                match serde_json::from_str::<Call>(&line) {
                    Ok(call) => dispatch(service, &caller, call).await,
                    Err(e) => Reply::err(ErrorCode::Invalid, format!("malformed call: {e}")),
                }
            };
            let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            out.push(b'\n');
            // A caller that stops reading its reply (a large one fills the socket) does not
            // keep its admission slot, nor the agent's shutdown waiting, for longer.
            let written = tokio::select! {
                r = tokio::time::timeout(REPLY_WRITE, write.write_all(&out)) => matches!(r, Ok(Ok(()))),
                () = shutdown.cancelled() => false,
            };
            if !written || too_large {
                if !written {
                    debug!("control caller did not read its reply; connection closed");
                }
                break;
            }
        }
    }
    .instrument(span)
    .await;
}

fn reply<T: serde::Serialize>(result: Result<T, ControlError>) -> Reply {
    match result {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::err(e.code(), e.to_string()),
    }
}

/// One call, decoded, to the service's method for it.
async fn dispatch(service: &ControlService, caller: &Caller, call: Call) -> Reply {
    debug!(?call, "call");
    match call {
        Call::Status => reply(service.status(caller).await),
        Call::Request {
            resource,
            access,
            ttl_secs,
            reason,
            for_identity,
            hosts,
        } => reply(
            service
                .request(
                    caller,
                    RequestSpec {
                        resource,
                        access,
                        ttl: ttl_secs.map(Duration::from_secs),
                        reason,
                        for_identity,
                        task: None,
                        hosts,
                    },
                )
                .await,
        ),
        Call::Wait {
            request,
            timeout_secs,
        } => reply(
            service
                .wait(caller, &request, Duration::from_secs(timeout_secs))
                .await,
        ),
        Call::Approvals => reply(service.approvals(caller).await),
        Call::Approve { request, ttl_secs } => reply(
            service
                .approve(caller, &request, ttl_secs.map(Duration::from_secs))
                .await,
        ),
        Call::Deny { request, reason } => reply(service.deny(caller, &request, reason).await),
        Call::Grants { all } => reply(service.grants(caller, all).await),
        Call::Revoke { grant, reason } => reply(service.revoke(caller, &grant, reason).await),
        Call::Sessions { all, limit } => reply(service.sessions(caller, all, limit).await),
        Call::SessionShow { id, from } => reply(service.session(caller, &id, from).await),
        Call::Audit { since, limit } => reply(service.audit(caller, since, limit).await),
        Call::AuditVerify => reply(service.audit_verify(caller).await),
        Call::AuditVerifyFleet => reply(service.audit_verify_fleet(caller).await),
        Call::Run(spec) => reply(service.run(caller, spec).await),
        Call::Reload => reply(service.reload(caller).await),
        Call::Detach => reply(service.detach(caller)),
        Call::TokenIssue(spec) => reply(service.token_issue(caller, spec).await),
        Call::TokenList => reply(service.token_list(caller).await),
        Call::TokenRevoke { id } => reply(service.token_revoke(caller, &id).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{grants::EngineError, store::StoreError};

    fn caller(uid: u32, gated: bool) -> Caller {
        Caller {
            uid,
            pid: 1,
            user: format!("u{uid}"),
            workload: None,
            gated_unattributed: gated,
            person: None,
            token: None,
        }
    }

    /// A workload holding control connections open is stopped at its cap, and never takes
    /// the operators' room; a connection closed gives its place back.
    #[test]
    fn connections_are_admitted_per_uid_and_pool() {
        let admission = Arc::new(Admission::default());
        let mut held: Vec<Admitted> = (0..MAX_PER_UID)
            .map(|_| admission.admit(&caller(1000, true)).unwrap())
            .collect();
        let why = admission.admit(&caller(1000, true)).err().unwrap();
        assert!(why.contains("uid 1000"), "{why}");
        // Other uids of the pool, up to the pool's cap.
        for uid in 1001.. {
            match admission.admit(&caller(uid, true)) {
                Ok(a) => held.push(a),
                Err(why) => {
                    assert!(why.contains("workloads"), "{why}");
                    break;
                }
            }
        }
        assert_eq!(held.len(), MAX_CONNECTIONS);
        // The operators' pool is untouched.
        let root = admission.admit(&caller(0, false)).unwrap();
        drop(root);
        held.pop();
        assert!(admission.admit(&caller(4242, true)).is_ok());
        drop(held);
        assert!(
            admission.open.lock().unwrap().is_empty(),
            "places given back"
        );
    }

    fn line(result: Result<(), ControlError>) -> String {
        serde_json::to_string(&reply(result)).expect("encoding")
    }

    /// What the CLI reads back: the code it maps to an exit status, and the message as is.
    #[test]
    fn errors_keep_their_codes_and_texts() {
        assert_eq!(line(Ok(())), r#"{"ok":true,"data":null}"#);
        assert_eq!(
            line(Err(ControlError::Forbidden("no".into()))),
            r#"{"ok":false,"error":{"code":"forbidden","message":"no"}}"#
        );
        let cases = [
            (
                ControlError::from(EngineError::Invalid("a".into())),
                "invalid",
                "a",
            ),
            (EngineError::NotFound("b".into()).into(), "not_found", "b"),
            (EngineError::Refused("c".into()).into(), "refused", "c"),
            (EngineError::Conflict("d".into()).into(), "conflict", "d"),
            (
                EngineError::Store(StoreError::Invalid("e".into())).into(),
                "internal",
                &StoreError::Invalid("e".into()).to_string(),
            ),
            (
                ControlError::ReloadRejected(anyhow::anyhow!("bad key").context("t.toml")),
                "invalid",
                "t.toml: bad key",
            ),
            (
                ControlError::Detach(anyhow::anyhow!("busy").context("removing")),
                "internal",
                "removing: busy",
            ),
        ];
        for (error, code, message) in cases {
            let reply: serde_json::Value =
                serde_json::from_str(&line(Err(error))).expect("decoding");
            assert_eq!(reply["error"]["code"], code);
            assert_eq!(reply["error"]["message"], message);
        }
    }
}
