//! One POST to a webhook receiver, and the retry policy around it. A delivery runs on the
//! webhook's own task, never on the data path: however slow or dead a receiver is, sessions
//! do not wait for it.

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode, body::Bytes, client::conn::http1};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;

use crate::config::Endpoint;

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("resolving {0}: {1}")]
    Resolve(String, String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("TLS with {0}: {1}")]
    Tls(String, String),
    #[error("HTTP with {0}: {1}")]
    Http(String, String),
    #[error("no answer from {0} within {1:?}")]
    Timeout(String, Duration),
}

/// What an answered attempt means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: delivered.
    Delivered,
    /// Worth another attempt (5xx, 408, 425, 429), after at least this long if the
    /// receiver said so (`Retry-After` in seconds).
    Retry(Option<Duration>),
    /// The receiver refused the call itself (other 4xx, 3xx): retrying sends the same.
    Rejected,
}

impl Verdict {
    pub fn of(status: StatusCode, retry_after: Option<Duration>) -> Self {
        match status.as_u16() {
            200..=299 => Self::Delivered,
            408 | 425 | 429 | 500..=599 => Self::Retry(retry_after),
            _ => Self::Rejected,
        }
    }
}

/// The wait before attempt `n + 1` (after `n` failures): 1 s doubling to at most 5 minutes,
/// with up to a fifth of jitter so that many agents do not retry in step; never shorter
/// than what the receiver asked for (capped at 5 minutes too).
pub fn backoff(failures: u32, asked: Option<Duration>) -> Duration {
    const CAP: Duration = Duration::from_secs(300);
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(CAP);
    let mut b = [0u8; 2];
    // Without randomness the jitter is 0: retries still back off.
    let _ = getrandom::fill(&mut b);
    let jitter = base.mul_f64(f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) * 0.2);
    (base + jitter).max(asked.unwrap_or_default().min(CAP))
}

/// POSTs `body` with `headers` to `to`, within `timeout`: the status and `Retry-After`.
pub async fn post(
    to: &Endpoint,
    tls: &Arc<ClientConfig>,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(StatusCode, Option<Duration>), AttemptError> {
    let origin = to.origin();
    tokio::time::timeout(timeout, attempt(to, tls, headers, body))
        .await
        .map_err(|_| AttemptError::Timeout(origin, timeout))?
}

async fn attempt(
    to: &Endpoint,
    tls: &Arc<ClientConfig>,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<(StatusCode, Option<Duration>), AttemptError> {
    let origin = to.origin();
    let addrs: Vec<_> = tokio::net::lookup_host((to.host.as_str(), to.port))
        .await
        .map_err(|e| AttemptError::Resolve(origin.clone(), e.to_string()))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    let stream = stream.ok_or_else(|| AttemptError::Connect(origin.clone(), last))?;
    let _ = stream.set_nodelay(true);
    let request =
        build(to, headers, body).map_err(|e| AttemptError::Http(origin.clone(), e.to_string()))?;
    if to.https {
        let name = ServerName::try_from(to.host.clone())
            .map_err(|e| AttemptError::Tls(origin.clone(), e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| AttemptError::Tls(origin.clone(), e.to_string()))?;
        exchange(TokioIo::new(tls), request, &origin).await
    } else {
        exchange(TokioIo::new(stream), request, &origin).await
    }
}

fn build(
    to: &Endpoint,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let host = if (to.https && to.port == 443) || (!to.https && to.port == 80) {
        to.host.clone()
    } else if to.host.contains(':') {
        format!("[{}]:{}", to.host, to.port)
    } else {
        format!("{}:{}", to.host, to.port)
    };
    let mut b = Request::post(to.path.as_str())
        .header("host", host)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .header(
            "user-agent",
            concat!("jitgated/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        b = b.header(*name, value);
    }
    b.body(Full::new(body))
}

async fn exchange<T>(
    io: TokioIo<T>,
    request: Request<Full<Bytes>>,
    origin: &str,
) -> Result<(StatusCode, Option<Duration>), AttemptError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| AttemptError::Http(origin.to_owned(), e.to_string());
    let (mut sender, conn) = http1::handshake(io).await.map_err(http)?;
    let driver = tokio::spawn(conn);
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // Read (a bounded part of) the answer so the exchange ends cleanly; its content is
    // not used.
    let mut body = response.into_body();
    let mut read = 0usize;
    while read < 64 * 1024 {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => break,
        }
    }
    driver.abort();
    Ok((status, retry_after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decide_retries() {
        assert_eq!(Verdict::of(StatusCode::OK, None), Verdict::Delivered);
        assert_eq!(
            Verdict::of(StatusCode::NO_CONTENT, None),
            Verdict::Delivered
        );
        assert_eq!(
            Verdict::of(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(Duration::from_secs(3))
            ),
            Verdict::Retry(Some(Duration::from_secs(3)))
        );
        assert_eq!(
            Verdict::of(StatusCode::TOO_MANY_REQUESTS, None),
            Verdict::Retry(None)
        );
        for refused in [400, 401, 403, 404, 410, 301] {
            assert_eq!(
                Verdict::of(StatusCode::from_u16(refused).unwrap(), None),
                Verdict::Rejected,
                "{refused}"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        for (failures, lo) in [(1u32, 1u64), (2, 2), (3, 4), (6, 32), (20, 300)] {
            let d = backoff(failures, None);
            assert!(d >= Duration::from_secs(lo), "{failures}: {d:?}");
            assert!(
                d <= Duration::from_secs(lo).mul_f64(1.2),
                "{failures}: {d:?}"
            );
        }
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(300)
        );
        assert!(backoff(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
    }
}
