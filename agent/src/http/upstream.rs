//! The session's connection to the upstream: one HTTP/1.1 connection (plaintext or verified
//! TLS to the resource's own endpoint), opened at the first request and again whenever the
//! upstream closed the previous one between requests.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

use super::body::Counted;

/// How long connecting (TCP and TLS) to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request's body is on its way up: the client's, counted.
pub type UpBody = Counted<Incoming>;

/// How to reach the upstream.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Verified TLS: the client config (trust anchors, ALPN `http/1.1`) and the name checked.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

/// The session's upstream connection (see the module documentation).
pub struct Upstream {
    dial: Dial,
    sender: Option<SendRequest<UpBody>>,
    driver: Option<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The connection ends with the session that owns it.
        if let Some(d) = self.driver.take() {
            d.abort();
        }
    }
}

impl Upstream {
    pub fn new(dial: Dial) -> Self {
        Self {
            dial,
            sender: None,
            driver: None,
        }
    }

    /// Sends one request, (re)connecting first when there is no usable connection.
    pub async fn send(&mut self, request: Request<UpBody>) -> Result<Response<Incoming>, String> {
        let usable = match self.sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            self.connect().await?;
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| "no upstream connection".to_owned())?;
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("upstream {}: {e}", self.dial.addr))
    }

    async fn connect(&mut self) -> Result<(), String> {
        if let Some(d) = self.driver.take() {
            d.abort();
        }
        self.sender = None;
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
                format!(
                    "connecting to {addr}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )
            })??;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
        self.driver = Some(tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        }));
        sender
            .ready()
            .await
            .map_err(|e| format!("upstream {addr}: {e}"))?;
        self.sender = Some(sender);
        Ok(())
    }
}
