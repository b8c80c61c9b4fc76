//! Recording of Kubernetes `exec` and `attach` streams as asciicast v2 (one JSON header line,
//! then `[seconds, "o" | "i", text]` events), replayable with `jitgate sessions replay` or any
//! asciicast player.
//!
//! The streams are WebSocket connections speaking the `v4`/`v5.channel.k8s.io` subprotocols:
//! every binary message starts with a channel byte (0 stdin, 1 stdout, 2 stderr, 3 the
//! command's exit status, 4 terminal resize). The recorder reads the frames as they pass
//! (client frames are masked, server frames not), without changing a byte of the stream.
//! Frames larger than [`MAX_RECORDED_FRAME`] are noted, not stored, so memory stays bounded.

use std::{
    fs,
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use serde_json::json;

/// Largest frame payload the recorder keeps.
pub const MAX_RECORDED_FRAME: usize = 1 << 20;

/// Largest recording of one stream. Past it (or once a write fails: the disk full) the
/// recording ends with a note and the stream is closed: what passes must be recorded, and a
/// workload streaming output without end must not fill the state directory's disk (where
/// the statement records live too).
pub const MAX_RECORDING: u64 = 256 << 20;

/// Incremental WebSocket frame reader for one direction.
#[derive(Default)]
pub struct Frames {
    buf: Vec<u8>,
    /// Bytes of an oversized frame still to skip.
    skip: usize,
}

/// One complete frame: its opcode and (unmasked) payload, or how many bytes were skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Data { opcode: u8, payload: Vec<u8> },
    Skipped(usize),
}

impl Frames {
    /// Feeds bytes; returns the frames they complete.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        if self.skip > 0 {
            let n = self.skip.min(bytes.len());
            self.skip -= n;
            bytes = &bytes[n..];
        }
        self.buf.extend_from_slice(bytes);
        // Frames are read from `pos` on and what they took is dropped once, at the end:
        // dropping each frame as it is read moved the rest of the buffer every time (a
        // read of many small frames cost its size times their count).
        let mut pos = 0;
        loop {
            let b = &self.buf[pos..];
            if b.len() < 2 {
                break;
            }
            let opcode = b[0] & 0x0f;
            let masked = b[1] & 0x80 != 0;
            let (len, mut at) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&b[2..10]);
                    (
                        usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                        10,
                    )
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            let mask = if masked {
                if b.len() < at + 4 {
                    break;
                }
                let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
                at += 4;
                Some(m)
            } else {
                None
            };
            if len > MAX_RECORDED_FRAME {
                out.push(Frame::Skipped(len));
                let have = b.len() - at;
                if have >= len {
                    // The whole frame is here: the frames after it are read as usual.
                    pos += at + len;
                    continue;
                }
                self.skip = len - have;
                self.buf.clear();
                pos = 0;
                break;
            }
            if b.len() < at + len {
                break;
            }
            let mut payload = b[at..at + len].to_vec();
            if let Some(m) = mask {
                for (i, byte) in payload.iter_mut().enumerate() {
                    *byte ^= m[i % 4];
                }
            }
            pos += at + len;
            out.push(Frame::Data { opcode, payload });
        }
        self.buf.drain(..pos);
        out
    }
}

/// An asciicast v2 recording being written.
pub struct Cast {
    out: BufWriter<fs::File>,
    started: Instant,
    pub path: PathBuf,
    /// Bytes written so far, against `limit`.
    written: u64,
    limit: u64,
    /// Why the recording ended early, once it has: the stream is closed then.
    ended: Option<String>,
}

/// Shared by the two directions of one stream.
pub type SharedCast = Arc<Mutex<Cast>>;

impl Cast {
    /// Creates `dir/NAME.cast` (0600) with its header.
    pub fn create(dir: &Path, name: &str, title: &str) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(format!("{name}.cast"));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut out = BufWriter::new(file);
        let header = json!({
            "version": 2,
            "width": 120,
            "height": 40,
            "timestamp": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            "title": title,
        });
        writeln!(out, "{header}")?;
        out.flush()?;
        Ok(Self {
            out,
            started: Instant::now(),
            path,
            written: 0,
            limit: MAX_RECORDING,
            ended: None,
        })
    }

    /// A recording ending at `limit` bytes instead of [`MAX_RECORDING`].
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// Why the recording ended early, if it has (the stream must then be closed).
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    fn event(&mut self, kind: &str, data: &[u8]) {
        if self.ended.is_some() {
            return;
        }
        let t = self.started.elapsed().as_secs_f64();
        let line =
            json!([(t * 1e6).round() / 1e6, kind, String::from_utf8_lossy(data)]).to_string();
        if self.written + line.len() as u64 + 1 > self.limit {
            self.end(format!(
                "the recording reached its {} MiB limit",
                self.limit >> 20
            ));
            return;
        }
        self.written += line.len() as u64 + 1;
        if let Err(e) = writeln!(self.out, "{line}") {
            self.ended = Some(format!("writing the recording failed: {e}"));
        }
    }

    /// Ends the recording early with a last event saying why (if it can still be written).
    fn end(&mut self, why: String) {
        let t = self.started.elapsed().as_secs_f64();
        let note = format!("\r\n[recording ended: {why}; the stream was closed]\r\n");
        let _ = writeln!(self.out, "{}", json!([(t * 1e6).round() / 1e6, "o", note]));
        let _ = self.out.flush();
        self.ended = Some(why);
    }

    /// Records the frames of one direction (`from_client`: stdin; else stdout, stderr,
    /// status).
    pub fn frames(&mut self, from_client: bool, frames: Vec<Frame>) {
        for frame in frames {
            match frame {
                Frame::Data {
                    opcode: 1 | 2,
                    payload,
                } if !payload.is_empty() => {
                    let (channel, data) = (payload[0], &payload[1..]);
                    match (from_client, channel) {
                        (true, 0) => self.event("i", data),
                        (false, 1 | 2) => self.event("o", data),
                        (false, 3) => {
                            self.event(
                                "o",
                                format!("\r\n[exit status: {}]\r\n", String::from_utf8_lossy(data))
                                    .as_bytes(),
                            );
                        }
                        _ => {}
                    }
                }
                Frame::Skipped(n) => self.event(
                    "o",
                    format!("\r\n[a {n}-byte frame was not recorded]\r\n").as_bytes(),
                ),
                Frame::Data { .. } => {}
            }
        }
    }

    pub fn flush(&mut self) {
        if let Err(e) = self.out.flush()
            && self.ended.is_none()
        {
            self.ended = Some(format!("writing the recording failed: {e}"));
        }
    }
}

/// Records through a shared cast (poisoned locks are recovered: a recording is best kept).
/// `Err` with why once the recording has ended early: the stream must be closed, since what
/// passed from then on would not be recorded.
pub fn record(cast: &SharedCast, from_client: bool, frames: Vec<Frame>) -> Result<(), String> {
    let mut c = cast.lock().unwrap_or_else(PoisonError::into_inner);
    if !frames.is_empty() {
        c.frames(from_client, frames);
        c.flush();
    }
    match c.ended() {
        Some(why) => Err(why.to_owned()),
        None => Ok(()),
    }
}

/// Replays a recording's output to `out`, waiting between events (divided by `speed`; 0: no
/// waiting).
pub fn replay(path: &Path, speed: f64, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap_or(""))
        .with_context(|| format!("{} is not an asciicast recording", path.display()))?;
    anyhow::ensure!(
        header["version"] == 2,
        "{} is not asciicast v2",
        path.display()
    );
    let mut last = 0.0;
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line)?;
        let (t, kind, data) = (
            event[0].as_f64().unwrap_or(last),
            event[1].as_str().unwrap_or(""),
            event[2].as_str().unwrap_or(""),
        );
        if speed > 0.0 && t > last {
            std::thread::sleep(std::time::Duration::from_secs_f64((t - last) / speed));
        }
        last = t;
        if kind == "o" {
            out.write_all(data.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x82, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn frames_are_read_across_any_split_and_unmasked() {
        let mut bytes = client_frame(b"\x00ls -l\n");
        bytes.extend_from_slice(&[0x82, 4, 1, b'o', b'k', b'\n']);
        for split in 0..bytes.len() {
            let mut f = Frames::default();
            let mut got = f.push(&bytes[..split]);
            got.extend(f.push(&bytes[split..]));
            assert_eq!(
                got,
                vec![
                    Frame::Data {
                        opcode: 2,
                        payload: b"\x00ls -l\n".to_vec()
                    },
                    Frame::Data {
                        opcode: 2,
                        payload: b"\x01ok\n".to_vec()
                    },
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn oversized_frames_are_skipped_not_buffered() {
        let mut f = Frames::default();
        let mut head = vec![0x82, 127];
        head.extend_from_slice(&((MAX_RECORDED_FRAME as u64) * 4).to_be_bytes());
        assert_eq!(f.push(&head), vec![Frame::Skipped(MAX_RECORDED_FRAME * 4)]);
        assert!(f.push(&vec![0u8; MAX_RECORDED_FRAME * 4 - 1]).is_empty());
        assert_eq!(
            f.push(&[0, 0x82, 2, 1, b'x']),
            vec![Frame::Data {
                opcode: 2,
                payload: b"\x01x".to_vec()
            }]
        );
    }

    #[test]
    fn an_oversized_frame_read_whole_leaves_the_frames_after_it() {
        let big = MAX_RECORDED_FRAME + 1;
        let mut bytes = vec![0x82, 127];
        bytes.extend_from_slice(&(big as u64).to_be_bytes());
        bytes.extend(std::iter::repeat_n(0u8, big));
        bytes.extend_from_slice(&client_frame(b"\x00rm -rf /\n"));
        let mut f = Frames::default();
        assert_eq!(
            f.push(&bytes),
            vec![
                Frame::Skipped(big),
                Frame::Data {
                    opcode: 2,
                    payload: b"\x00rm -rf /\n".to_vec()
                }
            ]
        );
        // Many small frames in one read: every one, and nothing left over.
        let many: Vec<u8> = (0..10_000).flat_map(|_| client_frame(b"\x00x")).collect();
        let frames = f.push(&many);
        assert_eq!(frames.len(), 10_000);
        assert!(f.buf.is_empty());
    }

    #[test]
    fn a_recording_replays_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let mut cast = Cast::create(dir.path(), "s-1-0", "exec").unwrap();
        cast.frames(
            true,
            vec![Frame::Data {
                opcode: 2,
                payload: b"\x00whoami\n".to_vec(),
            }],
        );
        cast.frames(
            false,
            vec![Frame::Data {
                opcode: 2,
                payload: b"\x01root\n".to_vec(),
            }],
        );
        cast.flush();
        let mut out = Vec::new();
        replay(&cast.path, 0.0, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "root\n");
        let text = std::fs::read_to_string(&cast.path).unwrap();
        assert!(text.contains("\"i\",\"whoami\\n\""), "{text}");
    }

    /// Output without end: the recording stops at its limit with a note saying so, and from
    /// then on every chunk is refused (the relay closes the stream), in both directions.
    #[test]
    fn a_recording_at_its_limit_ends_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let cast = Cast::create(dir.path(), "s-1-1", "exec")
            .unwrap()
            .with_limit(64 * 1024);
        let path = cast.path.clone();
        let shared: SharedCast = Arc::new(Mutex::new(cast));
        let out = |text: &str| {
            let mut payload = vec![1u8];
            payload.extend_from_slice(text.as_bytes());
            vec![Frame::Data { opcode: 2, payload }]
        };
        let mut ok = 0;
        let why = loop {
            match record(&shared, false, out(&"y".repeat(1000))) {
                Ok(()) => ok += 1,
                Err(why) => break why,
            }
            assert!(ok < 1000, "never ended");
        };
        assert!(why.contains("limit"), "{why}");
        assert!((60..66).contains(&ok), "{ok}");
        // Stdin after that is refused too, and nothing more is written.
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(record(&shared, true, client_frames(b"\x00rm -rf /\n")).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines().last().unwrap().contains("recording ended"),
            "{text:.200}"
        );
        assert!(size < 64 * 1024 + 512, "{size}");
    }

    fn client_frames(payload: &[u8]) -> Vec<Frame> {
        vec![Frame::Data {
            opcode: 2,
            payload: payload.to_vec(),
        }]
    }
}
