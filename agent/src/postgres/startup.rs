//! The client's side of connection start: SSLRequest and GSSENCRequest answered per config,
//! CancelRequest recognized, the StartupMessage read. No password is asked for: the kernel
//! already said who the workload is, and whatever password it would send is never used.

use std::{net::IpAddr, sync::Arc, time::Duration};

use tokio::time::{Instant, timeout_at};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};

use super::{
    stream::Stream,
    wire::{FrameReader, PgError, WireError, client_cap, message, take_cstr},
};
use crate::{inspect::tls::LocalCa, postgres::config::ClientTls, protocol::Conn};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
const PROTOCOL_3: i32 = 196_608;

/// What the client opened with.
pub enum Opening {
    /// A session: its startup parameters, and the connection ready for messages.
    Session {
        params: Vec<(String, String)>,
        reader: FrameReader<ReadHalf<Stream>>,
        writer: WriteHalf<Stream>,
        tls: bool,
    },
    /// A cancel for a running session's query.
    Cancel { key: (i32, i32) },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("{}", .0.message)]
    Refuse(PgError, Option<Stream>),
    #[error("TLS handshake with the workload failed: {0}")]
    Tls(String),
    #[error("the client closed the connection during startup")]
    Closed,
    /// The client did not finish its startup by the deadline (`[daemon] startup_timeout`).
    #[error("{}", .0.message)]
    Timeout(PgError, Option<Stream>),
}

/// When the startup must be over, and the configured timeout (for the error).
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

impl Deadline {
    fn expired(self, stream: Option<Stream>) -> StartupError {
        StartupError::Timeout(
            PgError::fatal(
                "08P01",
                format!(
                    "jitgate: the connection did not complete its startup within {}",
                    crate::model::human_duration(self.timeout)
                ),
            )
            .hint(
                "a client sends its startup packet right after connecting; the jitgate operator sets [daemon] startup_timeout",
            ),
            stream,
        )
    }
}

impl From<std::io::Error> for StartupError {
    fn from(e: std::io::Error) -> Self {
        Self::Wire(e.into())
    }
}

/// Reads the opening packets of a client connection.
pub async fn open(
    client: Conn,
    client_tls: ClientTls,
    ca: Option<&Arc<LocalCa>>,
    destination_ip: IpAddr,
    deadline: Deadline,
) -> Result<Opening, StartupError> {
    let mut stream = Stream::Plain(client);
    let mut tls = false;
    loop {
        let mut reader = FrameReader::new(stream, client_cap);
        // Every read and handshake of the startup is bounded by one deadline: a client that
        // connects and says nothing, or says it one byte at a time, holds its slot only so long.
        let read = match timeout_at(deadline.at, reader.startup()).await {
            Ok(read) => read?,
            Err(_) => return Err(deadline.expired(Some(reader.into_parts().0))),
        };
        let Some(mut body) = read else {
            return Err(StartupError::Closed);
        };
        let (inner, leftover) = reader.into_parts();
        stream = inner;
        if body.len() < 4 {
            return Err(WireError::Malformed("startup packet without a code").into());
        }
        let code = body.get_i32();
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                // Anything sent after the request and before our answer would be read as if
                // it had come over the encrypted channel (CVE-2021-23214): refuse it.
                if !leftover.is_empty() {
                    return Err(
                        WireError::Malformed("data after SSLRequest before the answer").into(),
                    );
                }
                if code == SSL_REQUEST && !tls && client_tls == ClientTls::Enable {
                    let Some(ca) = ca else {
                        return Err(StartupError::Tls("no local CA".into()));
                    };
                    stream.write_all(b"S").await?;
                    let config = ca
                        .server_config(destination_ip)
                        .map_err(|e| StartupError::Tls(format!("{e:#}")))?;
                    let Stream::Plain(plain) = stream else {
                        return Err(StartupError::Tls("TLS requested twice".into()));
                    };
                    let accepted = timeout_at(
                        deadline.at,
                        tokio_rustls::TlsAcceptor::from(config).accept(plain),
                    )
                    .await
                    // Mid-handshake, the client cannot read a PostgreSQL error: it is closed.
                    .map_err(|_| deadline.expired(None))?
                    .map_err(|e| StartupError::Tls(e.to_string()))?;
                    stream = Stream::TlsServer(Box::new(accepted));
                    tls = true;
                } else {
                    stream.write_all(b"N").await?;
                }
            }
            CANCEL_REQUEST => {
                if body.len() < 8 {
                    return Err(WireError::Malformed("short CancelRequest").into());
                }
                return Ok(Opening::Cancel {
                    key: (body.get_i32(), body.get_i32()),
                });
            }
            c if c >> 16 == 3 => {
                let mut params = Vec::new();
                let mut unknown_options = Vec::new();
                while !body.is_empty() && body[0] != 0 {
                    let name = take_cstr(&mut body)?;
                    let value = take_cstr(&mut body)?;
                    if name.starts_with("_pq_.") {
                        unknown_options.push(name);
                    } else if params
                        .iter()
                        .any(|(k, _): &(String, String)| k.eq_ignore_ascii_case(&name))
                    {
                        // The server would take the last value while we checked the first:
                        // one meaning per parameter, or none.
                        return Err(StartupError::Refuse(
                            PgError::fatal(
                                "08P01",
                                format!("startup parameter \"{name}\" appears more than once"),
                            ),
                            Some(stream),
                        ));
                    } else {
                        params.push((name, value));
                    }
                }
                let (read, mut writer) = tokio::io::split(stream);
                let mut reader = FrameReader::new(read, client_cap);
                if !leftover.is_empty() {
                    // Pipelined messages after the startup packet (libpq does not, but the
                    // protocol allows it): keep them.
                    reader = reader.with_buffer(leftover);
                }
                if c != PROTOCOL_3 || !unknown_options.is_empty() {
                    // Offer 3.0 and decline protocol extensions.
                    let mut out = BytesMut::new();
                    message(&mut out, b'v', |b| {
                        use bytes::BufMut as _;
                        b.put_i32(PROTOCOL_3);
                        b.put_i32(unknown_options.len() as i32);
                        for o in &unknown_options {
                            b.extend_from_slice(o.as_bytes());
                            b.put_u8(0);
                        }
                    });
                    writer.write_all(&out).await?;
                }
                return Ok(Opening::Session {
                    params,
                    reader,
                    writer,
                    tls,
                });
            }
            other => {
                return Err(StartupError::Refuse(
                    PgError::fatal(
                        "08P01",
                        format!("unsupported frontend protocol or request code {other}"),
                    ),
                    Some(stream),
                ));
            }
        }
    }
}
