//! The transparent proxy every redirected connection lands on: one listener per address
//! family, one tokio task per connection (see [`session`]).

pub mod relay;
pub mod routes;
pub mod session;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    config::SharedConfig, gate::ConnTable, grants::GrantEngine, identity::Workloads,
    model::Timestamp, store::SharedStore,
};

pub use self::routes::Routes;

/// Everything a session needs, shared by all of them.
pub struct ProxyContext {
    pub conns: ConnTable,
    pub config: SharedConfig,
    pub engine: GrantEngine,
    pub workloads: Workloads,
    pub store: SharedStore,
    pub routes: Routes,
    pub registry: Registry,
    /// Shared by PostgreSQL sessions: CA, upstream TLS configs, cancel keys, caches.
    pub pg: Arc<crate::postgres::PgContext>,
    /// Cancelled when the host agent shuts down: sessions end with a clear outcome.
    pub shutdown: CancellationToken,
}

/// A session in flight, as `jitgate sessions` and reloads see it.
pub struct LiveSession {
    pub identity: String,
    pub resource: String,
    pub grant: String,
    pub started_at: Timestamp,
    pub counters: Arc<relay::Counters>,
    /// Cancelled when the session must end for a reason of the agent's (resource removed).
    pub cancel: CancellationToken,
}

/// Live sessions by id.
#[derive(Default, Clone)]
pub struct Registry {
    inner: Arc<Mutex<HashMap<String, LiveSession>>>,
}

impl Registry {
    pub fn insert(&self, id: &str, session: LiveSession) {
        self.inner
            .lock()
            .expect("registry lock")
            .insert(id.to_owned(), session);
    }

    pub fn remove(&self, id: &str) {
        self.inner.lock().expect("registry lock").remove(id);
    }

    /// Live byte counts of an open session.
    pub fn counts(&self, id: &str) -> Option<(u64, u64)> {
        self.inner
            .lock()
            .expect("registry lock")
            .get(id)
            .map(|s| s.counters.snapshot())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends every session on a resource that is no longer configured.
    pub fn end_resources_not_in(&self, names: &[String]) -> usize {
        let inner = self.inner.lock().expect("registry lock");
        let mut n = 0;
        for s in inner.values() {
            if !names.contains(&s.resource) {
                s.cancel.cancel();
                n += 1;
            }
        }
        n
    }
}

/// Binds the proxy listeners. Done before the gate attaches, so that a restarted agent is
/// ready to accept the moment its programs take over.
pub async fn bind(v4: SocketAddr, v6: Option<SocketAddr>) -> anyhow::Result<Vec<TcpListener>> {
    use anyhow::Context as _;
    let mut listeners =
        vec![bind_one(v4).with_context(|| format!("binding the proxy listener {v4}"))?];
    if let Some(v6) = v6 {
        match bind_one(v6) {
            Ok(l) => listeners.push(l),
            Err(e) => warn!(
                address = %v6, error = %e,
                "no IPv6 proxy listener: native IPv6 connections to resources will be refused"
            ),
        }
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() {
        // Keep the IPv6 listener to IPv6: v4-mapped connections go to the IPv4 listener.
        socket2_v6only(&socket)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

fn socket2_v6only(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: valid socket and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Accepts on every listener until shutdown, one task per connection, all tracked so that
/// shutdown can wait for sessions to record how they ended.
pub fn serve(listeners: Vec<TcpListener>, ctx: Arc<ProxyContext>, tracker: TaskTracker) {
    for listener in listeners {
        let ctx = ctx.clone();
        let sessions = tracker.clone();
        tracker.spawn(async move {
            let local = listener.local_addr().ok();
            info!(address = ?local, "proxy listening");
            loop {
                tokio::select! {
                    () = ctx.shutdown.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let ctx = ctx.clone();
                            sessions.spawn(session::handle(ctx, stream));
                        }
                        Err(e) => {
                            // Out of descriptors or memory: back off rather than spin.
                            error!(error = %e, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    },
                }
            }
        });
    }
}
