//! The transparent proxy every redirected connection lands on: one listener per address
//! family, one tokio task per connection (see [`session`]).

pub mod attribute;
pub mod routes;
pub mod session;
#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use self::routes::Routes;
// Live sessions are the protocols' business; the daemon and the control service find them here.
pub use crate::protocol::live::{LiveSession, Registry};
use crate::protocol::{Protocols, Services};

/// Everything the accept path needs, shared by all sessions.
pub struct ProxyContext {
    /// Who made a connection, and where it was going.
    pub attributor: Arc<dyn attribute::Attributor>,
    /// Destination to resource.
    pub routes: Routes,
    /// The services protocols use.
    pub services: Arc<Services>,
    /// Every protocol, started.
    pub protocols: Protocols,
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
                    () = ctx.services.shutdown.cancelled() => break,
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
