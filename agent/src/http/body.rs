//! Bodies as they cross the gate: streamed frame by frame (memory bounded by one frame),
//! counted for the session record, and on the way back scrubbed of the injected secret.

use std::{
    error::Error as StdError,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

use super::scrub::Scrubber;
use crate::protocol::buffers::Reservation;
use crate::protocol::relay::Counters;

/// Any error a body can end with.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What the gate answers a client with: the upstream's body, or its own (refusals).
pub type Out = UnsyncBoxBody<Bytes, BoxError>;

/// The gate's own small body (refusals, errors).
pub fn full(data: impl Into<Bytes>) -> Out {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Which way a body flows (which counter it adds to).
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// Workload to upstream.
    Up,
    /// Upstream to workload.
    Down,
}

/// A body whose data bytes are added to the session's counters as they pass.
pub struct Counted<B> {
    inner: B,
    counters: Arc<Counters>,
    direction: Direction,
}

impl<B> Counted<B> {
    pub fn new(inner: B, counters: Arc<Counters>, direction: Direction) -> Self {
        Self {
            inner,
            counters,
            direction,
        }
    }

    fn count(&self, n: usize) {
        let counter = match self.direction {
            Direction::Up => &self.counters.up,
            Direction::Down => &self.counters.down,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.count(data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streaming rewrite of a body's bytes, chunk by chunk, in bounded memory: what each chunk
/// releases now, and what is left at the end. `Err` ends the body (fail closed).
pub trait Rewrite: Send {
    fn push(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError>;
    fn finish(&mut self) -> Result<Bytes, BoxError>;
    /// Whether the output is exactly as long as the input (the inner size hint, and a
    /// `Content-Length`, then stay true).
    fn keeps_length(&self) -> bool {
        false
    }
}

/// The injected secret overwritten with `*` of the same length.
impl Rewrite for Scrubber {
    fn push(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError> {
        Ok(Scrubber::push(self, chunk))
    }

    fn finish(&mut self) -> Result<Bytes, BoxError> {
        Ok(Scrubber::finish(self))
    }

    fn keeps_length(&self) -> bool {
        true
    }
}

/// How one line of a line-framed stream is masked (`Err`: the stream ends, fail closed).
pub type LineMask = Box<dyn FnMut(&[u8]) -> Result<Vec<u8>, String> + Send>;

/// A line-framed stream (a Kubernetes watch, server-sent events, NDJSON) masked line by line
/// as each completes, so long-lived streams flow without being buffered whole. A line longer
/// than `max_line` ends the stream with an error.
///
/// The line being gathered, and what masking it takes, are held against the buffer budget
/// like a body read whole (a watch line can be a 64 MiB object, and a workload can open many
/// watches); past its share or the agent's budget the stream ends with an error. Between
/// lines only the unfinished rest stays reserved.
pub struct LineMasker {
    line: bytes::BytesMut,
    /// How much of `line` is known to hold no newline: a long line arriving in small
    /// chunks is searched once, not once per chunk (which costs time growing with the
    /// square of the line, and the upstream chooses the chunks).
    scanned: usize,
    mask: LineMask,
    max_line: usize,
    held: Reservation,
}

impl LineMasker {
    pub fn new(max_line: usize, mask: LineMask, held: Reservation) -> Self {
        Self {
            line: bytes::BytesMut::new(),
            scanned: 0,
            mask,
            max_line,
            held,
        }
    }

    /// Masks every complete line in the buffer (at the end, the unterminated rest too).
    fn complete_lines(&mut self, at_end: bool) -> Result<Bytes, BoxError> {
        let mut out = Vec::new();
        loop {
            let end = match memchr::memchr(b'\n', &self.line[self.scanned..]) {
                Some(i) => self.scanned + i + 1,
                None if at_end && !self.line.is_empty() => self.line.len(),
                None => {
                    self.scanned = self.line.len();
                    break;
                }
            };
            self.scanned = 0;
            let line = self.line.split_to(end);
            let (body, newline) = match line.strip_suffix(b"\n") {
                Some(b) => (b, true),
                None => (&line[..], false),
            };
            if body.iter().all(u8::is_ascii_whitespace) {
                out.extend_from_slice(&line);
                continue;
            }
            // The rest still gathered, this line, its parsed tree, its masked copy and what
            // is already masked for this chunk.
            self.held.cover(
                self.line.len()
                    + line.len()
                    + super::jsonmask::parsed_size(body)
                    + body.len()
                    + out.len(),
            )?;
            out.extend_from_slice(&(self.mask)(body)?);
            if newline {
                out.push(b'\n');
            }
        }
        if self.line.len() > self.max_line {
            return Err(format!(
                "a line longer than the {} bytes the gate masks",
                self.max_line
            )
            .into());
        }
        self.held.shrink_to(self.line.len() + out.len());
        Ok(out.into())
    }
}

impl Rewrite for LineMasker {
    fn push(&mut self, chunk: &[u8]) -> Result<Bytes, BoxError> {
        self.held.cover(self.line.len() + chunk.len())?;
        self.line.extend_from_slice(chunk);
        self.complete_lines(false)
    }

    fn finish(&mut self) -> Result<Bytes, BoxError> {
        self.complete_lines(true)
    }
}

/// A body passed through a [`Rewrite`]. Trailers are dropped: they cannot be rewritten in
/// order with the data, and a secret or masked value must not ride in them.
pub struct Rewritten<B, R> {
    inner: B,
    rewrite: R,
    done: bool,
}

impl<B, R> Rewritten<B, R> {
    pub fn new(inner: B, rewrite: R) -> Self {
        Self {
            inner,
            rewrite,
            done: false,
        }
    }
}

impl<B, R> Body for Rewritten<B, R>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    R: Rewrite + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            let released = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => Err(e.into()),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.rewrite.push(&data),
                    Err(_trailers) => continue,
                },
                Poll::Ready(None) => {
                    this.done = true;
                    return match this.rewrite.finish() {
                        Ok(out) if out.is_empty() => Poll::Ready(None),
                        Ok(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
            };
            match released {
                Ok(out) if out.is_empty() => {}
                Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrite.keeps_length() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// A body that keeps a permit (a semaphore's, a buffer reservation, both) until it has been
/// read to its end (or dropped): what it holds in memory counts against a budget until the
/// client has taken it.
pub struct Permitted<B> {
    inner: B,
    permit: Option<Box<dyn Send>>,
}

impl<B> Permitted<B> {
    pub fn new(inner: B, permit: impl Send + 'static) -> Self {
        Self {
            inner,
            permit: Some(Box::new(permit)),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Permitted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's request body on its way upstream: streamed as the client sends it, or read
/// whole beforehand. A request held for approval is read whole before it is filed, so that
/// the approver is shown its body and exactly those bytes, no others, go upstream once
/// approved (a client cannot swap the body after the decision).
pub enum ClientBody {
    Streaming(hyper::body::Incoming),
    /// The whole body (`None` once handed on), and its share of the agent's buffer budget,
    /// given back with it.
    Read(Option<Bytes>, Option<Reservation>),
}

impl ClientBody {
    /// The whole body, if it was read.
    pub fn read(&self) -> Option<&Bytes> {
        match self {
            Self::Read(b, _) => b.as_ref(),
            Self::Streaming(_) => None,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Streaming(incoming) => Pin::new(incoming).poll_frame(cx),
            Self::Read(data, held) => {
                *held = None;
                Poll::Ready(
                    data.take()
                        .filter(|d| !d.is_empty())
                        .map(|d| Ok(Frame::data(d))),
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streaming(incoming) => incoming.is_end_stream(),
            Self::Read(data, _) => data.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Streaming(incoming) => incoming.size_hint(),
            Self::Read(data, _) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// A body the gate built whole (a masked response), handed out in pieces of at most 64 KiB, so
/// that a client's flow control paces it: HTTP/2 asks for each piece only when the client
/// has window for it, instead of queueing all of it at once.
pub struct Pieces {
    rest: Bytes,
}

impl Pieces {
    const PIECE: usize = 64 * 1024;

    pub fn new(data: impl Into<Bytes>) -> Self {
        Self { rest: data.into() }
    }
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.rest.len().min(Self::PIECE);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// What passed through a body: its size, and its first bytes (up to what the record keeps).
#[derive(Debug, Default)]
pub struct Tap {
    pub total: u64,
    pub head: Vec<u8>,
    keep: usize,
}

impl Tap {
    pub fn shared(keep: usize) -> SharedTap {
        Arc::new(std::sync::Mutex::new(Self::default_keeping(keep)))
    }

    pub fn default_keeping(keep: usize) -> Self {
        Tap {
            keep,
            ..Tap::default()
        }
    }

    pub fn see(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let room = self.keep.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..room.min(data.len())]);
    }
}

pub type SharedTap = Arc<std::sync::Mutex<Tap>>;

/// A body whose data is seen by a [`Tap`] as it passes.
pub struct Tapped<B> {
    inner: B,
    tap: SharedTap,
}

impl<B> Tapped<B> {
    pub fn new(inner: B, tap: SharedTap) -> Self {
        Self { inner, tap }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tapped<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.tap
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .see(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A body of fixed chunks, one frame each.
    struct Chunks(VecDeque<&'static str>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .pop_front()
                    .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))),
            )
        }
    }

    #[tokio::test]
    async fn scrubbed_and_counted_body_streams_every_byte_but_the_secret() {
        let counters = Arc::new(Counters::default());
        let body = Counted::new(
            Rewritten::new(
                Chunks(["a tok", "en-1 b ", "token-1"].into()),
                Scrubber::new(b"token-1").unwrap(),
            ),
            counters.clone(),
            Direction::Down,
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"a ******* b *******");
        assert_eq!(counters.snapshot(), (0, out.len() as u64));
    }

    #[tokio::test]
    async fn lines_are_masked_as_they_complete_whatever_the_chunking() {
        let body = Rewritten::new(
            Chunks(["{\"a\":1}\n{\"b", "\":2}\n\n", "tail"].into()),
            LineMasker::new(
                1024,
                Box::new(|line: &[u8]| Ok(line.to_ascii_uppercase())),
                unbounded(),
            ),
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"{\"A\":1}\n{\"B\":2}\n\nTAIL");
        let too_long = Rewritten::new(
            Chunks([&*"x".repeat(64).leak()].into()),
            LineMasker::new(16, Box::new(|l: &[u8]| Ok(l.to_vec())), unbounded()),
        );
        assert!(too_long.collect().await.is_err());
    }

    #[test]
    fn lines_split_at_every_size_mask_the_same() {
        let input = b"{\"a\":1}\n\n  \n{\"long\":\"abcdefghijklmnopqrstuvwxyz\"}\n{\"b\":2}\ntail";
        let whole = {
            let mut m = LineMasker::new(
                1024,
                Box::new(|l: &[u8]| Ok(l.to_ascii_uppercase())),
                unbounded(),
            );
            let mut out = m.push(input).unwrap().to_vec();
            out.extend_from_slice(&m.finish().unwrap());
            out
        };
        assert_eq!(
            whole,
            b"{\"A\":1}\n\n  \n{\"LONG\":\"ABCDEFGHIJKLMNOPQRSTUVWXYZ\"}\n{\"B\":2}\nTAIL"
        );
        for size in 1..input.len() {
            let mut m = LineMasker::new(
                1024,
                Box::new(|l: &[u8]| Ok(l.to_ascii_uppercase())),
                unbounded(),
            );
            let mut out = Vec::new();
            for chunk in input.chunks(size) {
                out.extend_from_slice(&m.push(chunk).unwrap());
            }
            out.extend_from_slice(&m.finish().unwrap());
            assert_eq!(out, whole, "chunks of {size}");
        }
    }

    fn unbounded() -> Reservation {
        crate::protocol::buffers::Buffers::default().reservation("w")
    }

    #[tokio::test]
    async fn streamed_lines_are_held_against_the_identitys_share() {
        use crate::protocol::buffers::Buffers;
        let buffers = Buffers::new(8 << 20, 1 << 20);
        // A watch whose objects are small flows, and holds only the line it is gathering.
        let small: &'static str = "{\"a\":[1,2,3]}\n".repeat(1000).leak();
        let masker = LineMasker::new(
            64 << 20,
            Box::new(|l: &[u8]| Ok(l.to_vec())),
            buffers.reservation("w"),
        );
        let mut body = Rewritten::new(Chunks([small, "{\"b\":"].into()), masker);
        while let Some(frame) = body.frame().await {
            frame.expect("small lines flow");
        }
        drop(body);
        assert_eq!(buffers.available(), 8 << 20, "everything given back");
        // One line of a few hundred KiB of small objects parses to far more than its text:
        // past the identity's 1 MiB share the stream ends, while the agent has room.
        let dense: &'static str = format!("[{}]\n", vec!["{\"a\":1}"; 4_000].join(",")).leak();
        assert!(dense.len() < 1 << 20);
        let masker = LineMasker::new(
            64 << 20,
            Box::new(|l: &[u8]| Ok(l.to_vec())),
            buffers.reservation("w"),
        );
        let e = Rewritten::new(Chunks([dense].into()), masker)
            .collect()
            .await
            .expect_err("the dense line is refused");
        assert!(e.to_string().contains("buffer_share"), "{e}");
        // Another identity's masking is untouched, and nothing stays held.
        assert_eq!(buffers.available(), 8 << 20);
        // A line gathered in many chunks is held as it grows: one that never ends stops at
        // the share, not at the 64 MiB line limit.
        let chunk: &'static str = "x".repeat(64 << 10).leak();
        let endless = Rewritten::new(
            Chunks(std::iter::repeat_n(chunk, 64).collect()),
            LineMasker::new(
                64 << 20,
                Box::new(|l: &[u8]| Ok(l.to_vec())),
                buffers.reservation("w"),
            ),
        );
        let e = endless.collect().await.expect_err("refused");
        assert!(e.to_string().contains("buffer_share"), "{e}");
    }
}
