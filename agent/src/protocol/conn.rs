//! The client's side of a session as protocols see it: a TCP connection from the proxy's
//! listener, or (in tests) an in-memory pipe, so that protocol logic runs without root,
//! without a kernel record and without a socket.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::TcpStream,
};

#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    /// One end of [`tokio::io::duplex`]: the test drives the other.
    Memory(DuplexStream),
}

impl Conn {
    /// Sends small writes at once (the proxy batches what it writes itself).
    pub fn set_nodelay(&self) {
        if let Self::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }

    /// Makes closing the connection reset it, so that a client cut off by the gate sees an
    /// error rather than a clean end of stream.
    pub fn arm_reset(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_zero_linger(),
            Self::Memory(_) => Ok(()),
        }
    }
}

/// Resets the client's connection when the gate cuts a session whose [`Conn`] has moved into
/// a protocol's stack (TLS, an HTTP server): see [`Conn::cutter`].
#[derive(Clone, Copy, Debug)]
pub struct Cutter(Option<std::os::fd::RawFd>);

impl Conn {
    /// A [`Cutter`] for this connection. It is only valid while the connection is open: use
    /// it before the stack that owns the connection is dropped, and never after that stack
    /// finished on its own (the descriptor may then name another socket).
    pub fn cutter(&self) -> Cutter {
        match self {
            Self::Tcp(s) => Cutter::of(s),
            Self::Memory(_) => Cutter(None),
        }
    }
}

impl Cutter {
    /// A cutter for `s`, under the same rule as [`Conn::cutter`].
    pub fn of(s: &TcpStream) -> Self {
        Self(Some(std::os::fd::AsRawFd::as_raw_fd(s)))
    }

    /// As [`Conn::arm_reset`].
    pub fn arm_reset(self) -> io::Result<()> {
        let Some(fd) = self.0 else { return Ok(()) };
        // SAFETY: the caller holds the stack that owns the connection (see `Conn::cutter`),
        // so the descriptor is open and is this connection's.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .map_err(io::Error::from)
    }
}

impl From<TcpStream> for Conn {
    fn from(s: TcpStream) -> Self {
        Self::Tcp(s)
    }
}

impl From<DuplexStream> for Conn {
    fn from(s: DuplexStream) -> Self {
        Self::Memory(s)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Memory(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Memory(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
