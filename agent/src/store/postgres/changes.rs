//! Following other hosts' changes: `LISTEN jitgate_changes` on a connection of its own, and
//! on every wake-up (and every few seconds regardless) a read of the change log past the
//! last row seen. The same read runs after every reconnect, so a change committed while the
//! connection was down is still delivered: a notification is only a hint to look, the log
//! is what is read.

use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{connect::Connector, queries};
use crate::{
    model::RequestStatus,
    store::{GrantChange, Result},
};

/// How often the log is read even without a notification (a lost `NOTIFY` costs this much).
const POLL: Duration = Duration::from_secs(5);

/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Rows read per query while catching up.
const PAGE: i64 = 500;

/// The newest change in the log: a listener starting now follows what comes after.
pub async fn newest(client: &Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM changes", &[])
        .await?
        .try_get(0)?)
}

/// Follows the change log after `last_seen`, passing other hosts' changes to `out`, until
/// `stop` is cancelled.
pub async fn follow(
    connector: Connector,
    host: String,
    mut last_seen: i64,
    out: broadcast::Sender<GrantChange>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        let (wake_tx, mut wake) = mpsc::channel(1);
        let client = tokio::select! {
            c = connector.connect(Some(wake_tx)) => c,
            () = stop.cancelled() => return,
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "cannot reach the shared store to follow other hosts' changes");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if let Err(e) = client.batch_execute("LISTEN jitgate_changes").await {
            warn!(error = %e, retry_in = ?backoff, "LISTEN on the shared store failed");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = Duration::from_millis(100);
        if connected_before {
            info!(
                after = last_seen,
                "following the shared store again; catching up"
            );
        }
        connected_before = true;
        loop {
            if let Err(e) = catch_up(&client, &host, &mut last_seen, &out).await {
                warn!(error = %e, "reading the shared store's change log failed; reconnecting");
                break;
            }
            tokio::select! {
                woken = wake.recv() => if woken.is_none() {
                    // The connection's driver ended: the connection is gone.
                    break;
                },
                () = tokio::time::sleep(POLL) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Reads every change after `last_seen` and passes on those made by other hosts.
async fn catch_up(
    client: &Client,
    host: &str,
    last_seen: &mut i64,
    out: &broadcast::Sender<GrantChange>,
) -> Result<()> {
    loop {
        let rows = client
            .query(
                "SELECT seq, host_id, kind, subject FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&*last_seen, &PAGE],
            )
            .await?;
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            let origin: &str = row.try_get(1)?;
            let kind: &str = row.try_get(2)?;
            let subject: String = row.try_get(3)?;
            // This host's own changes were passed on when they committed.
            if origin != host
                && let Some(change) = change_of(client, kind, subject).await?
            {
                debug!(seq, origin, kind, "change from another host");
                let _ = out.send(change);
            }
            *last_seen = seq;
        }
        if rows.len() < PAGE as usize {
            return Ok(());
        }
    }
}

async fn change_of(client: &Client, kind: &str, subject: String) -> Result<Option<GrantChange>> {
    Ok(match kind {
        "issued" => queries::get_grant(client, &subject)
            .await?
            .map(|g| GrantChange::Issued(Box::new(g))),
        "revoked" => Some(GrantChange::Revoked { grant: subject }),
        "expired" => Some(GrantChange::Expired { grant: subject }),
        "decided" => queries::get_request(client, &subject)
            .await?
            .filter(|q| q.status != RequestStatus::Pending)
            .map(|q| GrantChange::Decided {
                request: q.id,
                status: q.status,
            }),
        other => {
            warn!(
                kind = other,
                "unknown change in the shared store's log (a newer jitgated?)"
            );
            None
        }
    })
}
