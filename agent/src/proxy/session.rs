//! One redirected connection, from accept to close:
//!
//! ```text
//! accept -> attribute (kernel record: destination, cgroup, pid) -> resource
//!        -> the resource's protocol (grant? hold? upstream, relay or parse) -> record end
//! ```
//!
//! Every step that can fail refuses the connection: nothing reaches a protocol unless the
//! connection is attributed to a workload and routed to a configured resource, and no
//! protocol relays anything without a live grant.

use std::{net::SocketAddr, panic::AssertUnwindSafe, sync::Arc};

use futures_util::FutureExt as _;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};
use tracing::{Instrument as _, error, info_span};

use super::{ProxyContext, routes};
use crate::{
    ids,
    model::SessionOutcome,
    protocol::{Conn, Outcome, Session, limit_outcome, record::Record, refuse},
};

/// How long a refusal sent before the protocol starts may take to write.
const EARLY_REFUSAL_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// Handles one accepted connection to its end. Never panics on bad input; every exit is
/// recorded, a panic's too (the session ends, its record is closed and it leaves the live
/// registry; other sessions go on).
pub async fn handle(ctx: Arc<ProxyContext>, client: TcpStream) {
    let ends = match (client.peer_addr(), client.local_addr()) {
        (Ok(p), Ok(l)) => Some((p, l)),
        _ => None,
    };
    handle_conn(ctx, Conn::Tcp(client), ends).await;
}

/// [`handle`] for any client transport; `ends` are the connection's peer and local
/// addresses (`None`: it vanished on accept). Returns how the session ended, as recorded.
pub async fn handle_conn(
    ctx: Arc<ProxyContext>,
    client: Conn,
    ends: Option<(SocketAddr, SocketAddr)>,
) -> Outcome {
    let id = ids::new(ids::Kind::Session);
    let span = info_span!("session", session = %id);
    async move {
        let mut s = Record::new(id);
        let outcome = match AssertUnwindSafe(run(&ctx, client, ends, &mut s))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                error!("session task panicked; its connection is closed");
                (
                    SessionOutcome::Error,
                    "internal error in the host agent; the connection was closed".into(),
                )
            }
        };
        s.finish(&ctx.services, outcome.clone());
        outcome
    }
    .instrument(span)
    .await
}

/// Reads `/proc/PID/cmdline` as one line (best effort: the client may be gone already).
fn command_line(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            let text = String::from_utf8_lossy(&raw);
            let mut s: String = text
                .trim_end_matches('\0')
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(1024)
                .collect();
            s.truncate(s.trim_end().len());
            s
        })
        .unwrap_or_default()
}

async fn run(
    ctx: &ProxyContext,
    client: Conn,
    ends: Option<(SocketAddr, SocketAddr)>,
    s: &mut Record,
) -> Outcome {
    // The pre-grant phase is bounded from accept, whatever the protocol does first.
    let startup_deadline =
        tokio::time::Instant::now() + ctx.services.config.get().daemon.limits.startup_timeout;
    let Some((peer, local)) = ends else {
        return refuse(SessionOutcome::Error, "connection vanished on accept");
    };
    let origin = match ctx.attributor.origin(peer, local) {
        Ok(Some(r)) => r,
        Ok(None) => {
            s.session.destination = local.to_string();
            return refuse(
                SessionOutcome::RefusedUnattributed,
                format!("no gate record for {peer}: the connection did not come through the gate"),
            );
        }
        Err(e) => {
            return refuse(
                SessionOutcome::RefusedUnattributed,
                format!("reading the gate record failed: {e}"),
            );
        }
    };
    let original = origin.original;
    let destination = routes::normalize(original);
    s.session.destination = original.to_string();
    s.session.pid = origin.pid;
    s.session.uid = origin.uid;
    s.session.command = command_line(origin.pid);

    let Some(attribution) = ctx.attributor.workload(&origin) else {
        return refuse(
            SessionOutcome::RefusedUnattributed,
            format!(
                "process {} (cgroup id {}) is inside the gate but belongs to no configured workload",
                origin.pid, origin.cgroup_id
            ),
        );
    };
    s.session.identity = Some(attribution.identity.clone());
    s.session.task = attribution.task.clone();

    let Some(resource_name) = ctx.routes.resource_for(destination) else {
        return refuse(
            SessionOutcome::RefusedNoResource,
            format!("{original} is not a resource (any more)"),
        );
    };
    s.session.resource = Some(resource_name.clone());
    let config = ctx.services.config.get();
    let Some(resource) = config.resource(&resource_name).cloned() else {
        return refuse(
            SessionOutcome::RefusedNoResource,
            "resource removed from the config",
        );
    };
    let upstream = match resource
        .target
        .endpoint(destination, crate::destinations::local_addresses)
    {
        Ok(u) => u,
        Err(why) => return refuse(SessionOutcome::RefusedNoResource, why),
    };
    let Some(protocol) = ctx.protocols.get(resource.settings.protocol()) else {
        return refuse(
            SessionOutcome::Error,
            format!("protocol {} is not running", resource.settings.protocol()),
        );
    };
    // Attribution and routing read no byte of the client's; from here on it could hold the
    // connection, so it needs a pending slot first.
    let max_pending = config.daemon.limits.max_pending_per_identity;
    let slots = match ctx
        .services
        .limits
        .pending(&attribution.identity, max_pending)
    {
        Ok(slots) => slots,
        Err(e) => {
            if let Some(answer) = crate::protocol::find(resource.settings.protocol())
                .and_then(|p| p.early_refusal(&e))
            {
                let mut client = client;
                // Best effort, and never waiting on a client that does not read.
                let _ = tokio::time::timeout(EARLY_REFUSAL_WRITE, async {
                    client.write_all(&answer).await?;
                    client.shutdown().await
                })
                .await;
            }
            return limit_outcome(&attribution.identity, &e);
        }
    };
    drop(config);
    let session = Session {
        services: &ctx.services,
        who: &attribution,
        uid: origin.uid,
        resource: &resource,
        destination,
        upstream,
        record: s,
        slots,
        granted: None,
        startup_deadline,
    };
    protocol.serve(session, client).await
}
