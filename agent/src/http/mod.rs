//! `protocol = "http"`: HTTP/1.1 and HTTP/2 resources (REST services, model and SaaS APIs) gated per
//! request, with the promises PostgreSQL keeps: no standing access, credentials the workload
//! never holds, every request judged and recorded.
//!
//! * [`config`]: the resource's keys, validated;
//! * [`session`]: one connection: TLS (terminated with the host CA), the grant, and the cut
//!   when the grant ends;
//! * [`serve`]: the client's wire, HTTP/1.1 or HTTP/2 (streams polled on the session's task);
//! * [`exchange`]: each request on it: judged, held, forwarded with the gate's credential, its
//!   response masked and scrubbed, an upgrade relayed, the request recorded;
//! * [`normalize`]: the canonical request path rules are matched against (and that is
//!   forwarded upstream), refusing ambiguous encodings;
//! * [`policy`]: access level per method and the first-match `[[resource.rule]]` list;
//! * [`inject`]: per-level credentials from root-owned 0600 files, re-read on change;
//! * [`scrub`]: overwriting the injected secret in upstream headers and streamed bodies;
//! * [`refuse`]: refusals as 400/403 JSON responses (or Kubernetes `Status`) naming the rule
//!   and the command to run;
//! * [`upstream`], [`body`], [`io`]: the session's pool of upstream HTTP/1.1 connections,
//!   bodies streamed and counted, and the client's stream.
//!
//! * [`kube`], [`kubeconfig`]: the Kubernetes flavor; [`upgrade`]: WebSocket and SPDY relays;
//!   [`cast`]: exec and attach streams recorded as asciicast v2.
//!
//! * [`jsonmask`]: response masking by JSON path and detectors; [`limits`]: the grant's
//!   `[policy.limits]` on requests per second and response bytes.

pub mod body;
pub mod cast;
pub mod config;
pub mod exchange;
pub mod inject;
pub mod io;
pub mod jsonmask;
pub mod kube;
pub mod kubeconfig;
pub mod limits;
pub mod normalize;
pub mod policy;
pub mod refuse;
pub mod scrub;
pub mod serve;
pub mod session;
pub mod upgrade;
pub mod upstream;

#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rustls::ClientConfig;

use crate::{
    config::ResourceConfig,
    inspect::tls::UpstreamTlsConfigs,
    protocol::{Conn, Outcome, Protocol, Services, Session},
};

/// The http protocol's agent-lifetime state: upstream TLS configs per trust-anchor file.
#[derive(Default)]
pub struct Http {
    tls: UpstreamTlsConfigs,
    /// The verified configs with ALPN `http/1.1` (this hop speaks HTTP/1.1).
    alpn: Mutex<HashMap<PathBuf, Arc<ClientConfig>>>,
}

impl Http {
    /// The client config that verifies upstreams against `ca`.
    fn upstream_config(&self, ca: &Path) -> Result<Arc<ClientConfig>, String> {
        let mut cache = self.alpn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cache.get(ca) {
            return Ok(c.clone());
        }
        let base = self.tls.get(Some(ca)).map_err(|e| format!("{e:#}"))?;
        let mut config = (*base).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        cache.insert(ca.to_owned(), config.clone());
        Ok(config)
    }
}

impl Protocol for Http {
    const NAME: &'static str = "http";
    const KEYS: &'static [&'static str] = config::KEYS;
    type Settings = config::HttpResource;

    fn configure(cx: &mut ResourceConfig<'_, '_>) -> Option<config::HttpResource> {
        Some(config::configure(cx))
    }

    fn start(_: &Services) -> Self {
        Self::default()
    }

    fn serve<'a>(
        &'a self,
        session: Session<'a>,
        settings: &'a config::HttpResource,
        client: Conn,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        session::serve(self, session, settings, client)
    }
}
