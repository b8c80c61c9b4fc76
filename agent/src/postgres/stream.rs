//! A connection that may have switched to TLS, on either hop.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::protocol::{Conn, conn::Cutter};

#[derive(Debug)]
pub enum Stream {
    /// Plaintext: a connection upstream, or the workload's (in tests, an in-memory pipe).
    Plain(Conn),
    /// The proxy as TLS client (upstream).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The proxy as TLS server (toward the workload).
    TlsServer(Box<tokio_rustls::server::TlsStream<Conn>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }

    /// Resets the connection under the stream when the gate cuts it (see [`Conn::cutter`]).
    pub fn cutter(&self) -> Cutter {
        match self {
            Self::Plain(c) => c.cutter(),
            Self::TlsClient(s) => Cutter::of(s.get_ref().0),
            Self::TlsServer(s) => s.get_ref().0.cutter(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::TlsServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::TlsServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::TlsServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::TlsClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::TlsServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
