//! The client's side of a session on the wire: HTTP/1.1, or HTTP/2 when the client chose it
//! (ALPN `h2` in the TLS handshake, or the HTTP/2 preface in plaintext). Either way each
//! request goes to the same per-request handler ([`super::exchange`]).
//!
//! HTTP/2 streams run concurrently, but on the session's own task rather than as spawned
//! tasks: hyper hands each stream to [`Streams`], whose futures this module polls beside the
//! connection. A stream may therefore borrow the session (its services, identity and
//! settings) and can never outlive it: when the session is cut, its streams go with it.

use std::{future::Future, pin::Pin, time::Duration};

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::mpsc;

use super::{body::Out, io::ClientIo};

/// How long a client may take to send a request's headers (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Streams one HTTP/2 client may have open at once; each may hold an upstream connection.
/// RFC 9113 recommends no fewer than 100, and clients assume 100 until the server's SETTINGS
/// arrive (fewer, and their first burst is refused).
pub const MAX_STREAMS: u32 = 100;

/// The largest header block an HTTP/2 client may send (HTTP/1.1 has hyper's own bound).
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// How long an HTTP/2 connection may go without a stream before the gate closes it.
const IDLE: Duration = Duration::from_secs(30);

/// How often an HTTP/2 client is pinged, and how long its answer may take.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The HTTP/2 connection preface (RFC 9113 section 3.4) a plaintext client with prior
/// knowledge starts with.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which HTTP the client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Http1,
    Http2,
}

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::Http1 => "HTTP/1.1",
            Wire::Http2 => "HTTP/2",
        }
    }
}

/// A client connection being served, until the client or the connection ends.
pub type Serving<'a> = Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send + 'a>>;

type Stream<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// hyper's executor for HTTP/2 streams: hands them to the connection's own poll loop.
#[derive(Clone)]
struct Streams<'a> {
    tx: mpsc::UnboundedSender<Stream<'a>>,
}

impl<'a, F> hyper::rt::Executor<F> for Streams<'a>
where
    F: Future<Output = ()> + Send + 'a,
{
    fn execute(&self, fut: F) {
        // The receiver lives as long as the connection that calls this.
        let _ = self.tx.send(Box::pin(fut));
    }
}

/// Serves the connection, each request answered by `handle`. Without `keep_alive` an
/// HTTP/1.1 connection closes after its first answer; an HTTP/2 one is served until the
/// client ends it (closing it under a just-answered stream can lose the answer), so the
/// caller bounds it in time.
pub fn serve<'a, H, F>(io: ClientIo, wire: Wire, handle: H, keep_alive: bool) -> Serving<'a>
where
    H: Fn(Request<Incoming>) -> F + Send + 'a,
    F: Future<Output = Response<Out>> + Send + 'a,
{
    let service = service_fn(move |req| {
        let answered = handle(req);
        async move { Ok::<_, std::convert::Infallible>(answered.await) }
    });
    match wire {
        Wire::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            Box::pin(conn)
        }
        Wire::Http2 => {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let conn = hyper::server::conn::http2::Builder::new(Streams { tx })
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(MAX_HEADER_LIST)
                // WebSocket over HTTP/2 (RFC 8441), turned into an HTTP/1.1 upgrade upstream.
                .enable_connect_protocol()
                // A client that vanished without closing (its host gone) is noticed.
                .keep_alive_interval(Some(KEEPALIVE))
                .keep_alive_timeout(KEEPALIVE)
                .serve_connection(TokioIo::new(io), service);
            Box::pin(async move {
                let mut conn = std::pin::pin!(conn);
                let mut streams = FuturesUnordered::<Stream<'a>>::new();
                // An idle connection (no stream for IDLE) is closed with a GOAWAY, as an idle
                // HTTP/1.1 one is: it would hold a session slot until the grant ends.
                let idle = tokio::time::sleep(IDLE);
                let mut idle = std::pin::pin!(idle);
                let mut shut = false;
                let result = loop {
                    tokio::select! {
                        r = conn.as_mut() => break r,
                        Some(stream) = rx.recv() => streams.push(stream),
                        Some(()) = streams.next(), if !streams.is_empty() => {
                            if streams.is_empty() {
                                idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
                            }
                        }
                        () = idle.as_mut(), if streams.is_empty() && !shut => {
                            // A stream hyper has just accepted is not idleness.
                            if let Ok(stream) = rx.try_recv() {
                                streams.push(stream);
                                continue;
                            }
                            shut = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                };
                // The client is gone: its streams go with it (one waiting for approval lapses
                // its request as it is dropped).
                drop(streams);
                result
            })
        }
    }
}
