//! A real HTTP/1.1 upstream for the `http` protocol's tests (hyper, keep-alive, chunked
//! bodies, optional TLS with a certificate for `127.0.0.1` and `api.test` signed by its own
//! CA). It remembers what it received, so a test can assert on what the upstream saw (the
//! injected credential, the normalised path) as well as on what the workload saw.
//!
//! Endpoints:
//! * `/echo`: the request as JSON (method, target, headers);
//! * `/leak`: the `Authorization` it received, in a header, in the body and split across
//!   two chunks (an upstream that echoes credentials);
//! * `/stream`: `tick N` every 100 ms for a minute, chunked (a long poll or watch);
//! * anything else: `ok METHOD TARGET`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The request body (empty where the fixture does not keep it).
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The running fixture; stops with its runtime when dropped.
pub struct HttpFixture {
    pub addr: SocketAddr,
    /// The CA that signed its certificate (with TLS).
    pub ca: Option<PathBuf>,
    received: Arc<Mutex<Vec<Received>>>,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl HttpFixture {
    /// Plain HTTP on 127.0.0.1.
    pub fn plain() -> Self {
        Self::start(false)
    }

    /// HTTPS on 127.0.0.1 (certificate for `127.0.0.1` and `api.test`).
    pub fn tls() -> Self {
        Self::start(true)
    }

    /// A Kubernetes API server's stand-in over HTTPS (see [`crate::kube_fixture`]): real API
    /// objects for discovery, pods and secrets, tables, watch, delete.
    pub fn kube() -> Self {
        Self::start_as(true, true)
    }

    /// [`Self::kube`] on a given address (the demo's), its CA also copied to `ca_out`.
    pub fn kube_at(listen: &str, ca_out: &Path) -> Self {
        let fixture = Self::start_on(listen, true, true);
        if let Some(ca) = &fixture.ca {
            std::fs::copy(ca, ca_out).expect("copying the CA");
        }
        fixture
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn start(tls: bool) -> Self {
        Self::start_as(tls, false)
    }

    fn start_as(tls: bool, kube: bool) -> Self {
        Self::start_on("127.0.0.1:0", tls, kube)
    }

    fn start_on(listen: &str, tls: bool, kube: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (acceptor, ca) = if tls {
            let (acceptor, ca) = tls_acceptor(dir.path());
            (Some(acceptor), Some(ca))
        } else {
            (None, None)
        };
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = received.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let seen = seen.clone();
                        async move {
                            if kube {
                                crate::kube_fixture::handle(req, seen).await
                            } else {
                                handle(req, seen).await
                            }
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(tcp), service)
                                .with_upgrades()
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(tls), service)
                                    .with_upgrades()
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            ca,
            received,
            _runtime: runtime,
            _dir: dir,
        }
    }
}

pub(crate) type Out = BoxBody<Bytes, Infallible>;

pub(crate) fn full(s: impl Into<Bytes>) -> Out {
    Full::new(s.into()).boxed()
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    seen: Arc<Mutex<Vec<Received>>>,
) -> Result<Response<Out>, Infallible> {
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let method = req.method().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    // Recorded at once (a test may look while the body still streams), its body once read.
    let index = {
        let mut seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        seen.push(Received {
            method: method.clone(),
            target: target.clone(),
            headers: headers.clone(),
            body: Vec::new(),
        });
        seen.len() - 1
    };
    // Read the request body (kept, and so that keep-alive continues).
    if let Ok(body) = req.into_body().collect().await
        && let Some(r) = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(index)
    {
        r.body = body.to_bytes().to_vec();
    }
    let response = match path.as_str() {
        "/echo" => {
            let h: Vec<_> = headers.iter().map(|(n, v)| json!([n, v])).collect();
            Response::builder()
                .header("content-type", "application/json")
                .body(full(
                    json!({"method": method, "target": target, "headers": h}).to_string(),
                ))
        }
        "/leak" => {
            let (a, b) = auth.split_at(auth.len() / 2);
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from(format!("you sent: {a}")))),
                Ok(Frame::data(Bytes::from(format!("{b}\n")))),
            ];
            Response::builder()
                .header("x-echo-auth", auth.as_str())
                .body(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        "/stream" => {
            let ticks = futures_util::stream::unfold(0u32, |n| async move {
                if n >= 600 {
                    return None;
                }
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("tick {n}\n")))),
                    n + 1,
                ))
            });
            Response::builder().body(StreamBody::new(ticks).boxed())
        }
        _ => Response::builder().body(full(format!("ok {method} {target}\n"))),
    };
    Ok(response.unwrap_or_else(|_| Response::new(full("fixture error"))))
}

/// A CA and a server certificate it signed for `127.0.0.1` and `api.test`; the acceptor and
/// the CA file's path.
fn tls_acceptor(dir: &Path) -> (tokio_rustls::TlsAcceptor, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "jitgate http fixture CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["api.test".to_owned()]).expect("params");
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("cert");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca_cert.pem()).expect("ca file");
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], key_der)
    .expect("server config");
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca_path)
}
