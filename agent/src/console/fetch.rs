//! The console's few requests to the identity provider (discovery, keys, token exchange):
//! HTTP/1.1 with hyper, over rustls for `https://` (trusting the system's CAs and the
//! configured `ca_file`), plain only for a loopback provider. Bounded in time and size.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;

use crate::config::console::{is_loopback_authority, split_url};

/// The whole exchange (connect, TLS, request, answer) must fit in this.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read (a discovery document or key set is a few KiB).
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{0}` is not an https:// URL (plain http only on loopback)")]
    Url(String),
    #[error("{url}: {message}")]
    Io { url: String, message: String },
    #[error("{1}: HTTP {0}")]
    Status(StatusCode, String),
    #[error("{0}: no answer within {TIMEOUT:?}")]
    Timeout(String),
}

#[derive(Clone)]
pub struct Fetcher {
    tls: Arc<ClientConfig>,
}

impl Fetcher {
    /// Trusts the system's CAs and `ca_file`'s certificates.
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self {
            tls: crate::inspect::tls::system_client_config(ca_file)?,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        self.send(url, Method::GET, None, None).await
    }

    /// POSTs a form with an `Authorization` header.
    pub async fn post_form(
        &self,
        url: &str,
        authorization: &str,
        form: String,
    ) -> Result<Bytes, FetchError> {
        self.send(url, Method::POST, Some(authorization), Some(form))
            .await
    }

    async fn send(
        &self,
        url: &str,
        method: Method,
        authorization: Option<&str>,
        form: Option<String>,
    ) -> Result<Bytes, FetchError> {
        tokio::time::timeout(TIMEOUT, self.exchange(url, method, authorization, form))
            .await
            .map_err(|_| FetchError::Timeout(url.to_owned()))?
    }

    async fn exchange(
        &self,
        url: &str,
        method: Method,
        authorization: Option<&str>,
        form: Option<String>,
    ) -> Result<Bytes, FetchError> {
        let io = |message: String| FetchError::Io {
            url: url.to_owned(),
            message,
        };
        let (scheme, authority, path) =
            split_url(url).ok_or_else(|| FetchError::Url(url.to_owned()))?;
        let tls = match scheme {
            "https" => true,
            "http" if is_loopback_authority(authority) => false,
            _ => return Err(FetchError::Url(url.to_owned())),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                match p.parse::<u16>() {
                    Ok(p) => (h, p),
                    Err(_) => (authority, if tls { 443 } else { 80 }),
                }
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let path = if path.is_empty() { "/" } else { path };
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| io(e.to_string()))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("jitgated/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(auth) = authorization {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let body = match form {
            Some(form) => {
                request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                Full::new(Bytes::from(form))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(|e| io(e.to_string()))?;
        let response = if tls {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| io(e.to_string()))?;
            let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| io(format!("TLS: {e}")))?;
            round_trip(TokioIo::new(stream), request).await
        } else {
            round_trip(TokioIo::new(tcp), request).await
        }
        .map_err(io)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| io(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(FetchError::Status(status, url.to_owned()));
        }
        Ok(body)
    }
}

async fn round_trip<T>(
    io: T,
    request: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}
