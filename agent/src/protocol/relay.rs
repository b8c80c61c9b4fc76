//! Byte relay between the workload and the upstream, counting each direction.
//!
//! Built on tokio's bidirectional copy (which propagates half-closes and applies
//! backpressure: a slow reader stalls the writer's reads instead of growing a buffer), with a
//! thin wrapper that counts what is read so the counts are right even when the relay is cut
//! off mid-flight by an expiring grant.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction buffer. Two per session: the bulk of an idle session's memory.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Bytes relayed so far.
#[derive(Debug, Default)]
pub struct Counters {
    /// Workload to upstream.
    pub up: AtomicU64,
    /// Upstream to workload.
    pub down: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// Counts bytes read from the wrapped stream.
struct Counted<'a, S> {
    inner: &'a mut S,
    counter: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = buf.filled().len() - before;
            this.counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Relays until both directions are closed (or an error). Cancel-safe as far as the counts
/// go: dropping the future leaves `counters` exact.
pub async fn relay<A, B>(client: &mut A, upstream: &mut B, counters: &Counters) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        counter: &counters.up,
    };
    let mut upstream = Counted {
        inner: upstream,
        counter: &counters.down,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUFFER_SIZE, BUFFER_SIZE)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    #[tokio::test]
    async fn relays_both_ways_and_counts() {
        let (mut workload, mut client_side) = duplex(64);
        let (mut upstream_side, mut server) = duplex(64);
        let counters = std::sync::Arc::new(Counters::default());
        let c = counters.clone();
        let relay = tokio::spawn(async move {
            relay(&mut client_side, &mut upstream_side, &c)
                .await
                .unwrap();
        });
        workload.write_all(b"hello upstream").await.unwrap();
        let mut buf = [0u8; 14];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello upstream");
        // More than the duplex capacity: backpressure, not loss.
        let big = vec![7u8; 10_000];
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        workload.shutdown().await.unwrap();
        workload.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        relay.await.unwrap();
        assert_eq!(got.len(), 10_000);
        assert_eq!(counters.snapshot(), (14, 10_000));
    }
}
