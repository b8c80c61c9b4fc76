//! PostgreSQL wire framing: reading whole messages with a size cap per message type, and
//! building the backend messages the proxy writes itself.
//!
//! Frames are read into one reusable buffer and handed out as `Bytes` without copying; a
//! frame over its type's cap ends the session (the cap protects the proxy's memory and the
//! parser, not the server, which has its own limits).

use std::io;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The first packet (startup, SSLRequest, CancelRequest): PostgreSQL's own limit.
pub const MAX_STARTUP: usize = 10_000;

/// Most a frame reader grows its buffer by before reading more.
const READ_CHUNK: usize = 64 * 1024;

/// Past this, a buffer that held one large message is given back once it is sent on (see
/// [`shrink_after`]), so a session is not left holding its largest message's size.
pub const KEEP_CAPACITY: usize = 1 << 20;

/// Clears a write buffer after it was sent, giving back its allocation when a large message
/// had grown it past [`KEEP_CAPACITY`].
pub fn shrink_after(out: &mut BytesMut) {
    if out.capacity() > KEEP_CAPACITY {
        *out = BytesMut::new();
    } else {
        out.clear();
    }
}

/// Largest message a client may send, by type. Statements and bind parameters get room;
/// control messages get none.
pub fn client_cap(tag: u8) -> usize {
    match tag {
        b'Q' | b'P' => 16 << 20,
        b'B' | b'd' => 256 << 20,
        b'F' => 1 << 20,
        b'E' | b'D' | b'C' => 64 << 10,
        b'f' | b'p' => 64 << 10,
        b'S' | b'H' | b'X' | b'c' => 4,
        _ => 64 << 10,
    }
}

/// Largest message a server may send, by type. A data row can legitimately hold up to 1 GiB
/// per field in PostgreSQL; the proxy holds one row at a time, so it caps rows lower.
pub fn server_cap(tag: u8) -> usize {
    match tag {
        b'D' | b'd' => 256 << 20,
        b'T' => 16 << 20,
        b'E' | b'N' | b'A' => 1 << 20,
        b'R' => 64 << 10,
        _ => 1 << 20,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("message type {tag:?} of {len} bytes exceeds the {cap}-byte limit")]
    TooLarge { tag: char, len: usize, cap: usize },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// One message: its type byte and its body (without the length word).
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// Appends the frame, re-encoded, to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.put_u8(self.tag);
        out.put_i32(4 + self.body.len() as i32);
        out.extend_from_slice(&self.body);
    }
}

/// Reads frames from a stream into a reusable buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    cap: fn(u8) -> usize,
    /// Overrides `cap` for statements (Query, Parse) from a client.
    statement_cap: Option<usize>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, cap: fn(u8) -> usize) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(8 * 1024),
            cap,
            statement_cap: None,
        }
    }

    /// Lets a client's Query and Parse messages be up to `cap` bytes (a resource's
    /// `max_statement_size`).
    #[must_use]
    pub fn with_statement_cap(mut self, cap: usize) -> Self {
        self.statement_cap = Some(cap);
        self
    }

    /// Bytes read but not yet framed (handed over with the stream when TLS starts).
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    /// Puts bytes already read from the stream in front of what comes next.
    #[must_use]
    pub fn with_buffer(mut self, data: BytesMut) -> Self {
        let mut buf = data;
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
        self
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether a complete frame is already buffered (so the caller can batch writes).
    pub fn has_frame(&self) -> bool {
        self.buf.len() >= 5 && {
            let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
            len >= 4 && self.buf.len() > len as usize
        }
    }

    /// The size cap of a `tag` message from this peer.
    fn cap_of(&self, tag: u8) -> usize {
        match (tag, self.statement_cap) {
            (b'Q' | b'P', Some(cap)) => cap,
            _ => (self.cap)(tag),
        }
    }

    /// Hands the body of the next message to `f` where it lies in the buffer, and drops it,
    /// when that message is complete, tagged `tag` and within its cap; `None` (nothing
    /// taken) otherwise, for [`FrameReader::next`] to deal with. Saves splitting off a frame
    /// (and a reference count) for each of a result's rows.
    pub fn take_buffered<T>(&mut self, tag: u8, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
        if self.buf.len() < 5 || self.buf[0] != tag {
            return None;
        }
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let body_len = usize::try_from(len).ok()?.checked_sub(4)?;
        if body_len > self.cap_of(tag) || self.buf.len() < 5 + body_len {
            return None;
        }
        let out = f(&self.buf[5..5 + body_len]);
        self.buf.advance(5 + body_len);
        Some(out)
    }

    async fn fill(&mut self, want: usize) -> Result<bool, WireError> {
        while self.buf.len() < want {
            // Grow as bytes arrive, not by what a header claims: a peer announcing a
            // 1 GiB message (within the cap) must send it before it costs that much memory.
            self.buf
                .reserve((want - self.buf.len().min(want)).min(READ_CHUNK));
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed mid-message",
                )
                .into());
            }
        }
        Ok(true)
    }

    /// The next typed message, or `None` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, WireError> {
        if !self.fill(5).await? {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(WireError::Malformed("length below 4"));
        }
        let body_len = len as usize - 4;
        let cap = self.cap_of(tag);
        if body_len > cap {
            return Err(WireError::TooLarge {
                tag: tag as char,
                len: body_len,
                cap,
            });
        }
        self.fill(5 + body_len).await?;
        self.buf.advance(5);
        let body = self.buf.split_to(body_len).freeze();
        if body_len > KEEP_CAPACITY {
            // The rest moves to a buffer of its own: the large allocation goes with the
            // frame once it is dropped, rather than staying the session's read buffer (a
            // workload can make the server send one 256 MiB row, then idle).
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok(Some(Frame { tag, body }))
    }

    /// The untyped first packet (startup family): its body after the length word.
    pub async fn startup(&mut self) -> Result<Option<Bytes>, WireError> {
        if !self.fill(4).await? {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        if len < 8 {
            return Err(WireError::Malformed("startup packet too short"));
        }
        if len as usize > MAX_STARTUP {
            return Err(WireError::TooLarge {
                tag: '0',
                len: len as usize,
                cap: MAX_STARTUP,
            });
        }
        self.fill(len as usize).await?;
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len as usize - 4).freeze()))
    }
}

/// Reads a NUL-terminated string from the front of `buf`.
pub fn take_cstr(buf: &mut Bytes) -> Result<String, WireError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::Malformed("unterminated string"))?;
    let s = String::from_utf8(buf[..end].to_vec())
        .map_err(|_| WireError::Malformed("string is not UTF-8"))?;
    buf.advance(end + 1);
    Ok(s)
}

pub fn take_i16(buf: &mut Bytes) -> Result<i16, WireError> {
    if buf.len() < 2 {
        return Err(WireError::Malformed("truncated int16"));
    }
    Ok(buf.get_i16())
}

pub fn take_i32(buf: &mut Bytes) -> Result<i32, WireError> {
    if buf.len() < 4 {
        return Err(WireError::Malformed("truncated int32"));
    }
    Ok(buf.get_i32())
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.put_u8(0);
}

/// Writes a backend message with `tag`, letting `f` fill the body.
pub fn message(out: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    f(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Severity of an error the proxy raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An error or notice the proxy sends as if it were the server.
#[derive(Clone, Debug)]
pub struct PgError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    /// 1-based character position in the statement text (psql shows LINE and a caret).
    pub position: Option<u32>,
}

impl PgError {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Fatal,
            ..Self::error(code, message)
        }
    }

    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    #[must_use]
    pub fn position(mut self, position: Option<u32>) -> Self {
        self.position = position;
        self
    }

    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Appends the ErrorResponse.
    pub fn write(&self, out: &mut BytesMut) {
        message(out, b'E', |b| {
            let sev = match self.severity {
                Severity::Error => "ERROR",
                Severity::Fatal => "FATAL",
            };
            b.put_u8(b'S');
            put_cstr(b, sev);
            b.put_u8(b'V');
            put_cstr(b, sev);
            b.put_u8(b'C');
            put_cstr(b, self.code);
            b.put_u8(b'M');
            put_cstr(b, &self.message);
            if let Some(d) = &self.detail {
                b.put_u8(b'D');
                put_cstr(b, d);
            }
            if let Some(h) = &self.hint {
                b.put_u8(b'H');
                put_cstr(b, h);
            }
            if let Some(p) = self.position {
                b.put_u8(b'P');
                put_cstr(b, &p.to_string());
            }
            b.put_u8(0);
        });
    }
}

/// Appends a NoticeResponse of the gate's own (severity NOTICE).
pub fn notice(out: &mut BytesMut, code: &str, text: &str, hint: &str) {
    message(out, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', code),
            (b'M', text),
            (b'H', hint),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn authentication_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, key: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

/// The fields of an ErrorResponse or NoticeResponse, in order.
pub fn parse_fields(mut body: Bytes) -> Result<Vec<(u8, String)>, WireError> {
    let mut fields = Vec::new();
    loop {
        if body.is_empty() {
            return Err(WireError::Malformed("unterminated field list"));
        }
        let code = body.get_u8();
        if code == 0 {
            return Ok(fields);
        }
        fields.push((code, take_cstr(&mut body)?));
    }
}

/// Writes an ErrorResponse or NoticeResponse from fields.
pub fn write_fields(out: &mut BytesMut, tag: u8, fields: &[(u8, String)]) {
    message(out, tag, |b| {
        for (code, value) in fields {
            b.put_u8(*code);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_caps_hold() {
        let mut out = BytesMut::new();
        PgError::error("42501", "no").hint("ask").write(&mut out);
        ready_for_query(&mut out, b'I');
        let mut r = FrameReader::new(&out[..], server_cap);
        let e = r.next().await.unwrap().unwrap();
        assert_eq!(e.tag, b'E');
        let fields = parse_fields(e.body).unwrap();
        assert!(fields.contains(&(b'C', "42501".into())));
        assert!(fields.contains(&(b'H', "ask".into())));
        let z = r.next().await.unwrap().unwrap();
        assert_eq!((z.tag, &z.body[..]), (b'Z', &b"I"[..]));
        assert!(r.next().await.unwrap().is_none());

        let mut big = BytesMut::new();
        message(&mut big, b'S', |b| b.put_slice(&[0; 8]));
        let mut r = FrameReader::new(&big[..], client_cap);
        assert!(matches!(r.next().await, Err(WireError::TooLarge { .. })));
    }

    /// One large row, then small ones: once the large frame is dropped the reader's buffer
    /// is small again (the session does not keep its largest message's size), and a write
    /// buffer grown past the bound is given back.
    #[tokio::test]
    async fn a_large_message_does_not_stay_the_buffers_size() {
        let mut data = BytesMut::new();
        message(&mut data, b'D', |b| b.put_slice(&vec![7; 8 << 20]));
        for _ in 0..3 {
            message(&mut data, b'D', |b| b.put_slice(b"small"));
        }
        // Arriving in pieces, as from a socket: the small rows are read after the large one
        // is gone, into whatever buffer the reader kept.
        let (mut tx, rx) = tokio::io::duplex(16 << 10);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            tx.write_all(&data).await
        });
        let mut r = FrameReader::new(rx, server_cap);
        let big = r.next().await.unwrap().unwrap();
        assert_eq!(big.body.len(), 8 << 20);
        drop(big);
        for _ in 0..3 {
            assert_eq!(&r.next().await.unwrap().unwrap().body[..], b"small");
            assert!(r.buf.capacity() <= KEEP_CAPACITY, "{}", r.buf.capacity());
        }
        // Its allocation is not the large one's (which could be taken back for 4 MiB).
        assert!(
            !r.buf.try_reclaim(4 << 20),
            "the reader still holds the large allocation"
        );
        writer.await.unwrap().unwrap();
        let mut out = BytesMut::with_capacity(4 << 20);
        out.put_slice(b"sent");
        shrink_after(&mut out);
        assert!(out.is_empty() && out.capacity() <= KEEP_CAPACITY);
        let mut small = BytesMut::with_capacity(64 << 10);
        small.put_slice(b"sent");
        shrink_after(&mut small);
        assert_eq!(small.capacity(), 64 << 10, "a small buffer is kept");
    }

    #[tokio::test]
    async fn truncated_input_is_an_error_not_a_hang() {
        let data: &[u8] = &[b'Q', 0, 0, 0, 10, b's'];
        let mut r = FrameReader::new(data, client_cap);
        assert!(matches!(r.next().await, Err(WireError::Io(_))));
    }

    /// What `take_buffered` hands over, then `next` for the rest, against `next` alone: the
    /// same messages, the same error, nothing taken twice or skipped.
    #[tokio::test]
    async fn taking_in_place_reads_what_next_reads() {
        #[derive(Debug, PartialEq)]
        enum Step {
            Frame(u8, Vec<u8>),
            End,
            Error(String),
        }
        /// Every message of `r`, DataRows taken in place first when `in_place`.
        async fn read_all(mut r: FrameReader<&[u8]>, in_place: bool) -> Vec<Step> {
            let mut steps = Vec::new();
            loop {
                if in_place && let Some(body) = r.take_buffered(b'D', <[u8]>::to_vec) {
                    steps.push(Step::Frame(b'D', body));
                    continue;
                }
                match r.next().await {
                    Ok(Some(f)) => steps.push(Step::Frame(f.tag, f.body.to_vec())),
                    Ok(None) => {
                        steps.push(Step::End);
                        return steps;
                    }
                    Err(e) => {
                        steps.push(Step::Error(e.to_string()));
                        return steps;
                    }
                }
            }
        }
        let frame = |tag: u8, body: &[u8]| {
            let mut b = BytesMut::new();
            message(&mut b, tag, |o| o.put_slice(body));
            b.to_vec()
        };
        let rows = [
            frame(b'D', b"\x00\x01\x00\x00\x00\x03abc"),
            frame(b'D', b""),
            frame(b'C', b"SELECT 2\0"),
            frame(b'D', &[7; 300]),
            frame(b'Z', b"I"),
        ]
        .concat();
        let endings: [Vec<u8>; 6] = [
            vec![],
            // A row cut short (the stream ends inside it).
            frame(b'D', &[1; 40])[..20].to_vec(),
            // A header cut short.
            vec![b'D', 0, 0],
            // A length below 4.
            vec![b'D', 0, 0, 0, 3, 9, 9, 9],
            // A negative length.
            vec![b'D', 0xff, 0xff, 0xff, 0xf0, 1, 2, 3, 4],
            // A row over the reader's cap for its tag (a client's Describe: 64 KiB).
            frame(b'D', &vec![5; (64 << 10) + 1]),
        ];
        for (i, ending) in endings.iter().enumerate() {
            let data = [rows.clone(), ending.clone()].concat();
            for cap in [server_cap as fn(u8) -> usize, client_cap] {
                let want = read_all(FrameReader::new(&data[..], cap), false).await;
                // All of it already buffered, as when a read brought several rows at once.
                let buffered =
                    FrameReader::new(&[][..], cap).with_buffer(BytesMut::from(&data[..]));
                assert_eq!(read_all(buffered, true).await, want, "ending {i}");
                assert!(want.len() >= 5, "ending {i}: {want:?}");
            }
        }
    }
}
