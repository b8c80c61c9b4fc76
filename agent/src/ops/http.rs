//! The operations endpoint (`metrics_listen`): `GET /metrics` in Prometheus text format and
//! `GET /healthz` for probes. Off unless configured; read-only; nothing here changes state.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{Vitals, health, metrics};

/// Scrapers and probes are few; more concurrent connections than this wait their turn.
const MAX_CONNECTIONS: usize = 32;
/// How often recorded histogram samples are folded into their buckets. Without it they
/// accumulate between scrapes, and without scrapes without bound.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics_listen {addr}"))
}

/// Serves until shutdown.
pub fn serve(
    listener: TcpListener,
    agent: Arc<dyn Vitals>,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let handle = Arc::new(handle);
    let upkeep = (handle.clone(), shutdown.clone());
    tracker.spawn(async move {
        let (handle, shutdown) = upkeep;
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => handle.run_upkeep(),
                () = shutdown.cancelled() => break,
            }
        }
    });
    accept_loop(
        listener,
        "metrics and health endpoint",
        MAX_CONNECTIONS,
        shutdown.clone(),
        tracker,
        move |stream, peer| {
            let (agent, handle, shutdown) = (agent.clone(), handle.clone(), shutdown.clone());
            async move {
                let service = service_fn(move |req| {
                    let (agent, handle) = (agent.clone(), handle.clone());
                    async move { Ok::<_, Infallible>(respond(&req, agent.as_ref(), &handle).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        debug!(peer = %peer, error = %e, "metrics endpoint connection ended");
                    },
                    () = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            }
        },
    );
}

/// The accept loop of the agent's small HTTP servers (this endpoint, the web console):
/// until shutdown, each connection to `serve` on its own task, at most `max` at once (more
/// wait their turn in the listen queue). A failed accept (out of descriptors) pauses briefly
/// instead of spinning.
pub fn accept_loop<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    max: usize,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    tracker.spawn(async move {
        info!(address = ?listener.local_addr().ok(), "{what} listening");
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "{what}: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let connection = serve(stream, peer);
            tokio::spawn(async move {
                connection.await;
                drop(permit);
            });
        }
    });
}

async fn respond(
    req: &Request<Incoming>,
    agent: &dyn Vitals,
    handle: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let report = health::check_all(agent).await;
            metrics::publish(&metrics::Snapshot {
                grants_active: agent.grants_active(),
                requests_pending: report.pending_requests.unwrap_or(0),
                sessions_open: agent.sessions_open(),
                kernel: agent.kernel_counters(),
            });
            let mut body = handle.render();
            // Health as a metric too, so one scrape tells both.
            body.push_str("# HELP jitgate_healthy 1 when every health check passes.\n");
            body.push_str("# TYPE jitgate_healthy gauge\n");
            body.push_str(if report.ok {
                "jitgate_healthy 1\n"
            } else {
                "jitgate_healthy 0\n"
            });
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
        }
        "/healthz" => {
            let report = health::check_all(agent).await;
            let status = if report.ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut body = serde_json::to_string(&report).unwrap_or_else(|_| "{}".into());
            body.push('\n');
            reply(status, "application/json", body)
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found: this endpoint serves /metrics and /healthz\n",
        ),
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body.to_owned())
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
