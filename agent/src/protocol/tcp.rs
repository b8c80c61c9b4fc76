//! `protocol = "tcp"`: a byte relay under a live grant, cut when the grant ends.

use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{Conn, Outcome, Protocol, Services, Session, refuse, relay};
use crate::{config::ResourceConfig, model::SessionOutcome};

/// How long an upstream connect may take before the session is refused.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The plain TCP relay. It has no settings and no state of its own.
pub struct Tcp;

/// A `tcp` resource has no keys beyond the common ones.
#[derive(Debug)]
pub struct TcpSettings;

impl Protocol for Tcp {
    const NAME: &'static str = "tcp";
    const KEYS: &'static [&'static str] = &[];
    type Settings = TcpSettings;

    fn configure(_: &mut ResourceConfig<'_, '_>) -> Option<TcpSettings> {
        Some(TcpSettings)
    }

    fn start(_: &Services) -> Self {
        Self
    }

    async fn serve<'a>(
        &'a self,
        mut session: Session<'a>,
        _: &'a TcpSettings,
        mut client: Conn,
    ) -> Outcome {
        let grant = match session.acquire_grant().await {
            Ok(g) => g,
            Err(refused) => return refused.outcome,
        };
        session.record.session.grant = Some(grant.id.clone());
        let destination = session.upstream;
        let mut upstream =
            match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(destination))
                .await
            {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    return refuse(
                        SessionOutcome::UpstreamFailed,
                        format!("connecting to {destination}: {e}"),
                    );
                }
                Err(_) => {
                    return refuse(
                        SessionOutcome::UpstreamFailed,
                        format!(
                            "connecting to {destination}: no answer within {}s",
                            UPSTREAM_CONNECT_TIMEOUT.as_secs()
                        ),
                    );
                }
            };
        client.set_nodelay();
        let _ = upstream.set_nodelay(true);

        let mut end = session.open(&grant);
        debug!(identity = %session.who.identity, resource = %session.resource.name, grant = %grant.id, "relaying");
        // Relays until either side closes or the session must end. Cuts on the agent's side
        // reset the workload's connection, so the client sees an error rather than a clean
        // end of stream.
        let counters = session.record.counters.clone();
        let outcome = tokio::select! {
            r = relay::relay(&mut client, &mut upstream, &counters) => match r {
                Ok(()) => return (SessionOutcome::Closed, String::new()),
                Err(e) => return (SessionOutcome::Error, e.to_string()),
            },
            // Polled only when an end signal fires, not at every wake-up of the relay.
            why = super::armed::Armed::new(end.ended()) => why.outcome(),
        };
        if let Err(e) = client.arm_reset() {
            warn!(error = %e, "could not arm reset on close");
        }
        drop(client);
        drop(upstream);
        outcome
    }
}
