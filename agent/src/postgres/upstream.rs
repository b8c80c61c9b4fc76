//! The proxy's own connection to the real server: TLS per the resource, then a login with the
//! credentials for the session's access level (SCRAM-SHA-256, md5, cleartext or trust). The
//! password is read from its file for this connection only and never logged or echoed.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::BytesMut;
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::frontend,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf},
    net::TcpStream,
};

use super::{
    stream::Stream,
    wire::{Frame, FrameReader, WireError, parse_fields, server_cap, take_cstr, take_i32},
};
use crate::{
    inspect::tls::UpstreamTlsConfigs,
    postgres::config::{Credential, PostgresResource, UpstreamTls},
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("TLS with {addr} failed: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("the server rejected the login of {user}: {message}")]
    Rejected {
        user: String,
        message: String,
        code: String,
    },
    #[error("cannot read the password file {path}: {reason}")]
    Secret { path: String, reason: String },
    #[error("the server asked for an authentication method jitgate does not support ({0})")]
    Unsupported(&'static str),
    #[error("protocol error from the server: {0}")]
    Protocol(String),
    #[error(
        "the server asked for a {0} password, but the workload chose this server (an address or port range, or another address of a local resource) and its certificate is not verified: such servers get no password (set upstream_tls = \"verify-full\", or name one server)"
    )]
    PasswordExposure(&'static str),
}

impl From<WireError> for UpstreamError {
    fn from(e: WireError) -> Self {
        Self::Protocol(e.to_string())
    }
}

impl From<std::io::Error> for UpstreamError {
    fn from(e: std::io::Error) -> Self {
        Self::Protocol(e.to_string())
    }
}

/// How to reach and log in.
pub struct Target<'a> {
    pub addr: SocketAddr,
    pub pg: &'a PostgresResource,
    /// The name to verify in the server certificate (verify-full).
    pub server_name: &'a str,
    pub tls: &'a UpstreamTlsConfigs,
    /// Whether the resource names one server (a host name or one address, one port), so the
    /// workload cannot choose which server answers; see [`Target::may_see_password`].
    pub one_server: bool,
}

impl Target<'_> {
    /// Whether the login may answer a password challenge at all. Not when the workload picked
    /// the server (out of an address or port range, or a local resource's other addresses)
    /// and its certificate is not verified: that server could be anyone's, and could read a
    /// cleartext password or relay an md5 or SCRAM exchange (without channel binding) to
    /// the real server.
    pub fn may_see_password(&self) -> bool {
        self.one_server || self.pg.upstream_tls == UpstreamTls::VerifyFull
    }
}

/// A logged-in upstream connection, ready for queries.
pub struct Upstream {
    pub reader: FrameReader<ReadHalf<Stream>>,
    pub writer: WriteHalf<Stream>,
    /// Resets the connection when the session is cut (valid while `reader` and `writer` live).
    pub cutter: crate::protocol::conn::Cutter,
    /// ParameterStatus values the server sent at login.
    pub parameters: Vec<(String, String)>,
    /// The server's cancel key (process id, secret).
    pub key: (i32, i32),
    /// Transaction status from the first ReadyForQuery.
    pub status: u8,
}

fn read_secret(path: &Path) -> Result<String, UpstreamError> {
    let text = std::fs::read_to_string(path).map_err(|e| UpstreamError::Secret {
        path: path.display().to_string(),
        reason: e.kind().to_string(),
    })?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Opens the transport (TCP, and TLS when configured).
pub async fn transport(t: &Target<'_>) -> Result<Stream, UpstreamError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t.addr))
        .await
        .map_err(|_| UpstreamError::Unreachable {
            addr: t.addr,
            reason: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        })?
        .map_err(|e| UpstreamError::Unreachable {
            addr: t.addr,
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    if t.pg.upstream_tls == UpstreamTls::Disable {
        return Ok(Stream::Plain(crate::protocol::Conn::Tcp(tcp)));
    }
    let mut tcp = tcp;
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        return Err(UpstreamError::Tls {
            addr: t.addr,
            reason: "the server does not accept TLS (upstream_tls asks for it)".into(),
        });
    }
    let verify = t.pg.upstream_tls == UpstreamTls::VerifyFull;
    let config = t
        .tls
        .get(if verify {
            t.pg.upstream_ca.as_deref()
        } else {
            None
        })
        .map_err(|e| UpstreamError::Tls {
            addr: t.addr,
            reason: format!("{e:#}"),
        })?;
    let name = ServerName::try_from(t.server_name.to_owned()).map_err(|e| UpstreamError::Tls {
        addr: t.addr,
        reason: format!("`{}` is not a valid server name: {e}", t.server_name),
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await
        .map_err(|e| UpstreamError::Tls {
            addr: t.addr,
            reason: e.to_string(),
        })?;
    Ok(Stream::TlsClient(Box::new(tls)))
}

/// Connects and logs in as `cred`, with `params` in the startup packet.
pub async fn connect(
    t: &Target<'_>,
    cred: &Credential,
    params: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let stream = transport(t).await?;
    tokio::time::timeout(
        LOGIN_TIMEOUT,
        login(stream, cred, params, t.may_see_password()),
    )
    .await
    .map_err(|_| UpstreamError::Unreachable {
        addr: t.addr,
        reason: format!("login did not finish within {}s", LOGIN_TIMEOUT.as_secs()),
    })?
}

async fn send(writer: &mut WriteHalf<Stream>, buf: &mut BytesMut) -> Result<(), UpstreamError> {
    writer.write_all(buf).await?;
    writer.flush().await?;
    buf.clear();
    Ok(())
}

fn rejection(frame: &Frame, user: &str) -> UpstreamError {
    let fields = parse_fields(frame.body.clone()).unwrap_or_default();
    let get = |c: u8| {
        fields
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    UpstreamError::Rejected {
        user: user.to_owned(),
        message: get(b'M'),
        code: get(b'C'),
    }
}

async fn next(reader: &mut FrameReader<ReadHalf<Stream>>) -> Result<Frame, UpstreamError> {
    reader.next().await?.ok_or_else(|| {
        UpstreamError::Protocol("the server closed the connection during login".into())
    })
}

async fn login(
    stream: Stream,
    cred: &Credential,
    params: &[(String, String)],
    may_see_password: bool,
) -> Result<Upstream, UpstreamError> {
    let cutter = stream.cutter();
    let (read, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read, server_cap);
    let mut buf = BytesMut::new();
    let mut startup: Vec<(&str, &str)> = vec![("user", cred.user.as_str())];
    startup.extend(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    frontend::startup_message(startup, &mut buf)?;
    send(&mut writer, &mut buf).await?;

    let password = || match &cred.password_file {
        Some(path) => read_secret(path),
        None => Err(UpstreamError::Secret {
            path: "(none)".into(),
            reason: "the server asked for a password and the credential has no password_file"
                .into(),
        }),
    };
    let exposed = |method: &'static str| {
        if may_see_password {
            Ok(())
        } else {
            Err(UpstreamError::PasswordExposure(method))
        }
    };
    let mut scram: Option<sasl::ScramSha256> = None;
    let mut server_proven = false;
    loop {
        let frame = next(&mut reader).await?;
        match frame.tag {
            b'R' => {
                let mut body = frame.body.clone();
                match take_i32(&mut body)? {
                    // After a SCRAM exchange, the server must have proven it knows the
                    // password's verifier before it may say "ok": else it is not the server.
                    0 if scram.is_some() && !server_proven => {
                        return Err(UpstreamError::Protocol(
                            "the server ended SCRAM without proving itself".into(),
                        ));
                    }
                    0 => break,
                    3 => {
                        exposed("cleartext")?;
                        let pw = password()?;
                        frontend::password_message(pw.as_bytes(), &mut buf)?;
                        send(&mut writer, &mut buf).await?;
                    }
                    5 => {
                        if body.len() < 4 {
                            return Err(UpstreamError::Protocol("short md5 salt".into()));
                        }
                        let salt = [body[0], body[1], body[2], body[3]];
                        exposed("md5")?;
                        let pw = password()?;
                        let hashed = md5_hash(cred.user.as_bytes(), pw.as_bytes(), salt);
                        frontend::password_message(hashed.as_bytes(), &mut buf)?;
                        send(&mut writer, &mut buf).await?;
                    }
                    10 => {
                        let mut mechanisms = Vec::new();
                        while !body.is_empty() && body[0] != 0 {
                            mechanisms.push(take_cstr(&mut body)?);
                        }
                        if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                            return Err(UpstreamError::Unsupported("SASL without SCRAM-SHA-256"));
                        }
                        exposed("SCRAM")?;
                        let pw = password()?;
                        // No channel binding ("n"): the TLS hop is authenticated by
                        // certificate verification when upstream_tls = verify-full.
                        let s = sasl::ScramSha256::new(
                            pw.as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        );
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            s.message(),
                            &mut buf,
                        )?;
                        send(&mut writer, &mut buf).await?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL continue without a start".into())
                        })?;
                        s.update(&body)
                            .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                        frontend::sasl_response(s.message(), &mut buf)?;
                        send(&mut writer, &mut buf).await?;
                    }
                    12 => {
                        let s = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL final without a start".into())
                        })?;
                        s.finish(&body).map_err(|e| {
                            UpstreamError::Protocol(format!("SCRAM server proof: {e}"))
                        })?;
                        server_proven = true;
                    }
                    2 => return Err(UpstreamError::Unsupported("Kerberos V5")),
                    7 | 8 => return Err(UpstreamError::Unsupported("GSSAPI")),
                    9 => return Err(UpstreamError::Unsupported("SSPI")),
                    _ => return Err(UpstreamError::Unsupported("unknown")),
                }
            }
            b'E' => return Err(rejection(&frame, &cred.user)),
            b'v' => {} // NegotiateProtocolVersion: we asked for nothing beyond 3.0
            b'N' => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during authentication",
                    other as char
                )));
            }
        }
    }
    let mut parameters = Vec::new();
    let mut key = (0, 0);
    loop {
        let frame = next(&mut reader).await?;
        match frame.tag {
            b'S' => {
                let mut body = frame.body.clone();
                let name = take_cstr(&mut body)?;
                let value = take_cstr(&mut body)?;
                parameters.push((name, value));
            }
            b'K' => {
                let mut body = frame.body.clone();
                key = (take_i32(&mut body)?, take_i32(&mut body)?);
            }
            b'Z' => {
                let status = frame.body.first().copied().unwrap_or(b'I');
                return Ok(Upstream {
                    reader,
                    writer,
                    cutter,
                    parameters,
                    key,
                    status,
                });
            }
            b'E' => return Err(rejection(&frame, &cred.user)),
            b'N' => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} after authentication",
                    other as char
                )));
            }
        }
    }
}

/// Sends a CancelRequest for `key` to the server (over TLS when the resource uses it).
pub async fn cancel(t: &Target<'_>, key: (i32, i32)) -> Result<(), UpstreamError> {
    let mut stream = transport(t).await?;
    let mut buf = BytesMut::new();
    frontend::cancel_request(key.0, key.1, &mut buf);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    // The server closes without answering.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}

/// How a session logs in upstream, kept (owned) for the side connection of [`super::catalog`]
/// and for cancelling the statement in flight.
pub struct Login {
    pub addr: SocketAddr,
    pub pg: PostgresResource,
    pub server_name: String,
    pub tls: Arc<UpstreamTlsConfigs>,
    pub credential: Credential,
    pub params: Vec<(String, String)>,
    /// See [`Target::one_server`].
    pub one_server: bool,
}

impl Login {
    /// Where this login goes, for [`connect`] and [`cancel`].
    pub fn target(&self) -> Target<'_> {
        Target {
            addr: self.addr,
            pg: &self.pg,
            server_name: &self.server_name,
            tls: &self.tls,
            one_server: self.one_server,
        }
    }

    pub async fn connect(&self) -> Result<Upstream, UpstreamError> {
        connect(&self.target(), &self.credential, &self.params).await
    }
}
