//! The session's connections to the upstream: HTTP/1.1 (plaintext or verified TLS to the
//! resource's own endpoint), pooled per session. A request takes an idle connection or opens
//! one; the connection goes back to the pool when the response body has been read to its end,
//! so a long response (a Kubernetes watch, an event stream) never blocks the requests an
//! HTTP/2 client multiplexes beside it. Connections never outlive the session, and no two
//! sessions share one: what a connection carries was judged under one grant.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use super::body::{ClientBody, Counted, Tapped};
use crate::protocol::limits::{Exceeded, Extra, Limits, Share};

/// How long connecting (TCP and TLS) to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections kept per session; more are closed as their responses end.
const MAX_IDLE: usize = 8;

/// Requests of one session in flight upstream at once (each on its own connection); more
/// wait for one to end. An HTTP/2 client could otherwise open a connection per stream.
pub const MAX_IN_FLIGHT: usize = 16;

/// Why a request could not be sent upstream.
#[derive(Debug)]
pub enum SendError {
    /// The identity holds all the extra upstream connections it may (429), or the agent
    /// all its descriptors allow (503).
    Full(Exceeded),
    /// The upstream could not be reached or answered badly (502).
    Upstream(String),
}

/// A request in flight upstream or a tunnel open (see [`Upstream::take_use`]).
pub struct Use {
    uses: Arc<AtomicUsize>,
    _share: Option<Share>,
}

impl Drop for Use {
    fn drop(&mut self) {
        self.uses.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One upstream descriptor counted (see [`Upstream::hold`]).
pub struct Held {
    open: Arc<AtomicUsize>,
    _extra: Option<Extra>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a request's body is on its way up: the client's, counted and seen by the request's
/// record.
pub type UpBody = Tapped<Counted<ClientBody>>;

/// How to reach the upstream.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Verified TLS: the client config (trust anchors, ALPN `http/1.1`) and the name checked.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

/// An upstream connection: its sender, and its count against the agent's descriptors (held
/// by the sender, the task driving it and, once upgraded, the tunnel relaying it: the
/// descriptor is counted as long as any of them lives).
struct Conn {
    sender: SendRequest<Sent>,
    held: Arc<Held>,
}

type Idle = Mutex<Vec<Conn>>;

/// On a response that switched protocols: the connection's count and the request's use, for
/// the tunnel to keep (the connection leaves the pool and its driver).
#[derive(Clone)]
pub struct TunnelHold(pub Arc<Held>, pub Arc<Use>);

/// Where a session's descriptors and uses beyond its first are counted: the agent-wide
/// count of descriptors ([`Limits::extra`]), the identity's own of uses ([`Limits::share`]).
pub struct ExtraSlots {
    pub limits: Limits,
    pub identity: String,
    /// `[daemon] max_extra_upstreams_per_identity` as the session started.
    pub max: usize,
}

/// The session's upstream connections (see the module documentation).
pub struct Upstream {
    dial: Dial,
    /// The agent-wide connection count: each upstream connection or tunnel beyond the
    /// session's first takes a slot of it (see [`Upstream::hold`]).
    fds: Option<ExtraSlots>,
    /// Upstream connections and tunnels open now.
    open: Arc<AtomicUsize>,
    /// Requests in flight and tunnels open now.
    uses: Arc<AtomicUsize>,
    idle: Arc<Idle>,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The tasks driving each connection, aborted with the session.
    drivers: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for d in self
            .drivers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            d.abort();
        }
    }
}

impl Upstream {
    /// `fds`: the limits further connections and tunnels count against (`None` in tests of
    /// the exchange alone).
    pub fn new(dial: Dial, fds: Option<ExtraSlots>) -> Self {
        Self {
            dial,
            fds,
            open: Arc::default(),
            uses: Arc::default(),
            idle: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            drivers: Mutex::default(),
        }
    }

    /// Sends one request on an idle connection, or a new one when none is usable.
    pub async fn send(&self, request: Request<UpBody>) -> Result<Response<Returning>, SendError> {
        let permit = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| SendError::Upstream(format!("upstream: {e}")))?;
        let use_ = Arc::new(self.take_use().map_err(SendError::Full)?);
        let mut conn = loop {
            let taken = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match taken {
                Some(mut c) if !c.sender.is_closed() => {
                    if c.sender.ready().await.is_ok() {
                        break c;
                    }
                }
                Some(_) => {}
                None => break self.connect().await?,
            }
        };
        let uploaded = Arc::new(AtomicBool::new(false));
        let request = request.map(|body| Sent {
            inner: body,
            done: uploaded.clone(),
        });
        let mut response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| SendError::Upstream(format!("upstream {}: {e}", self.dial.addr)))?;
        // An upgraded connection belongs to its relay from now on, with its count.
        let back = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            response
                .extensions_mut()
                .insert(TunnelHold(conn.held.clone(), use_.clone()));
            None
        } else {
            Some((conn, Arc::downgrade(&self.idle)))
        };
        Ok(response.map(|body| Returning {
            inner: body,
            back,
            uploaded,
            _permit: permit,
            _use: use_,
        }))
    }

    /// Counts one more request in flight or tunnel open of this session until the returned
    /// guard drops. The session's first is its own; each further one takes a place among
    /// its identity's (see [`Limits::share`]).
    fn take_use(&self) -> Result<Use, Exceeded> {
        let before = self.uses.fetch_add(1, Ordering::SeqCst);
        let share = match &self.fds {
            Some(slots) if before >= 1 => match slots.limits.share(&slots.identity, slots.max) {
                Ok(share) => Some(share),
                Err(e) => {
                    self.uses.fetch_sub(1, Ordering::SeqCst);
                    crate::ops::metrics::limit_refusal(e.kind.label(), &slots.identity);
                    return Err(e);
                }
            },
            _ => None,
        };
        Ok(Use {
            uses: self.uses.clone(),
            _share: share,
        })
    }

    /// Counts one more upstream descriptor of this session (a connection, or a tunnel that
    /// outlives its connection's driver) until the returned guard drops. The session's
    /// first is covered by its own slot; each further one takes an agent-wide slot, so the
    /// agent's descriptors stay within its limit however many an HTTP/2 client multiplexes.
    pub fn hold(&self) -> Result<Held, Exceeded> {
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        let extra = match &self.fds {
            Some(slots) if before >= 1 => match slots.limits.extra() {
                Ok(extra) => Some(extra),
                Err(e) => {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            },
            _ => None,
        };
        Ok(Held {
            open: self.open.clone(),
            _extra: extra,
        })
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let held = Arc::new(self.hold().map_err(SendError::Full)?);
        let addr = self.dial.addr;
        let connecting = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            match &self.dial.tls {
                None => Ok(Either::Left(tcp)),
                Some((config, name)) => TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map(|s| Either::Right(Box::new(s)))
                    .map_err(|e| format!("TLS to {addr} (verifying {}): {e}", name.to_str())),
            }
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                SendError::Upstream(format!(
                    "connecting to {addr}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(SendError::Upstream)?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Upstream(format!("HTTP handshake with {addr}: {e}")))?;
        let driving = held.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
            drop(driving);
        });
        {
            let mut drivers = self.drivers.lock().unwrap_or_else(PoisonError::into_inner);
            drivers.retain(|d| !d.is_finished());
            drivers.push(driver);
        }
        sender
            .ready()
            .await
            .map_err(|e| SendError::Upstream(format!("upstream {addr}: {e}")))?;
        Ok(Conn { sender, held })
    }
}

/// A response body that hands its connection back to the session's pool once read to the
/// end. Dropped before that, the connection is dropped with it (HTTP/1.1 cannot skip the
/// rest of a response).
pub struct Returning {
    inner: Incoming,
    back: Option<(Conn, Weak<Idle>)>,
    /// The request's body has been sent to its end (a connection still uploading is not
    /// idle: the next request would wait behind the upload).
    uploaded: Arc<AtomicBool>,
    /// The request's place among [`MAX_IN_FLIGHT`], given back with the body.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The request's use, given back with the body (a tunnel keeps its own).
    _use: Arc<Use>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((conn, pool)) = self.back.take()
            && self.uploaded.load(Ordering::Acquire)
            && let Some(pool) = pool.upgrade()
        {
            let mut idle = pool.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < MAX_IDLE && !conn.sender.is_closed() {
                idle.push(conn);
            }
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Only a body already at its end (HEAD, 204, 304, an empty one nobody polled) leaves
        // the connection reusable.
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

/// A request body on its way up that says when it has been sent to its end.
pub struct Sent {
    inner: UpBody,
    done: Arc<AtomicBool>,
}

impl Body for Sent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.done.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.done.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
