//! Reading back a recorded Kubernetes `exec`/`attach` stream (an asciicast v2 file written by
//! [`crate::http::cast`]) for the web console's replay view, bounded in bytes and events so
//! that a long or hostile stream cannot exhaust the daemon or the reader's browser.
//!
//! The file is found from the session and the request's sequence number, the way the HTTP
//! gate names it (`state_dir/recordings/SESSION-SEQ.cast`), never from text in the record: a
//! request's recorded text is its URL, which the workload chose.

use std::{
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Most bytes of a recording read; the rest is reported as cut.
pub const MAX_BYTES: u64 = 4 << 20;
/// Most events kept.
pub const MAX_EVENTS: usize = 20_000;

/// One event of a recording.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CastEvent {
    /// Seconds since the stream started.
    pub at: f64,
    /// Typed by the client (stdin); else the command's output.
    pub input: bool,
    pub data: String,
}

/// A recording, as far as it was read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recording {
    pub session: String,
    pub seq: u32,
    pub title: String,
    /// When the stream started (seconds since the epoch), as the header says.
    pub started: Option<i64>,
    pub events: Vec<CastEvent>,
    /// Part of the file was not read (past [`MAX_BYTES`] or [`MAX_EVENTS`]).
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("request {seq} of session {session} has no recording")]
    Missing { session: String, seq: u32 },
    #[error("reading the recording {}: {message}", path.display())]
    Unreadable { path: PathBuf, message: String },
}

/// Where the HTTP gate writes request `seq` of `session`'s exec stream; `None` for a session
/// id that is not one of ours (only letters, digits, `_` and `-` make a file name here).
pub fn path(state_dir: &Path, session: &str, seq: u32) -> Option<PathBuf> {
    let ours = !session.is_empty()
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ours.then(|| {
        state_dir
            .join("recordings")
            .join(format!("{session}-{seq}.cast"))
    })
}

/// Reads request `seq` of `session`'s recording under `state_dir` (blocking: call it off the
/// runtime's threads).
pub fn read(state_dir: &Path, session: &str, seq: u32) -> Result<Recording, RecordingError> {
    let missing = || RecordingError::Missing {
        session: session.to_owned(),
        seq,
    };
    let path = path(state_dir, session, seq).ok_or_else(missing)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => missing(),
            _ => RecordingError::Unreadable {
                path: path.clone(),
                message: e.to_string(),
            },
        })?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RecordingError::Unreadable {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let cut = bytes.len() as u64 > MAX_BYTES;
    bytes.truncate(MAX_BYTES as usize);
    let text = String::from_utf8_lossy(&bytes);
    parse(session, seq, &text, cut).map_err(|message| RecordingError::Unreadable { path, message })
}

/// Parses asciicast v2 text. With `cut`, the text stops mid-file: its last line may be partial
/// and is dropped.
pub fn parse(session: &str, seq: u32, text: &str, cut: bool) -> Result<Recording, String> {
    let mut lines = text.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap_or(""))
        .map_err(|_| "not an asciicast recording (no JSON header line)".to_owned())?;
    if header["version"] != 2 {
        return Err("not an asciicast v2 recording".into());
    }
    let mut recording = Recording {
        session: session.to_owned(),
        seq,
        title: header["title"].as_str().unwrap_or("").to_owned(),
        started: header["timestamp"].as_i64(),
        events: Vec::new(),
        truncated: cut,
    };
    let mut lines = lines.peekable();
    while let Some(line) = lines.next() {
        if cut && lines.peek().is_none() {
            break;
        }
        if recording.events.len() >= MAX_EVENTS {
            recording.truncated = true;
            break;
        }
        // A line that is not an event (a torn write) is skipped, not fatal: the rest still
        // shows what happened.
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(at), Some(kind), Some(data)) =
            (event[0].as_f64(), event[1].as_str(), event[2].as_str())
        else {
            continue;
        };
        if kind != "o" && kind != "i" {
            continue;
        }
        recording.events.push(CastEvent {
            at,
            input: kind == "i",
            data: data.to_owned(),
        });
    }
    Ok(recording)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAST: &str = r#"{"version":2,"width":120,"height":40,"timestamp":1795000000,"title":"exec ls"}
[0.1,"i","ls\r"]
[0.25,"o","a.txt\r\nb.txt\r\n"]
[0.3,"r","80x24"]
not json
[0.5,"o","\r\n[exit status: 0]\r\n"]
"#;

    #[test]
    fn events_in_order_with_their_time_and_direction() {
        let r = parse("ses_1", 3, CAST, false).unwrap();
        assert_eq!(r.title, "exec ls");
        assert_eq!(r.started, Some(1_795_000_000));
        assert!(!r.truncated);
        let got: Vec<(f64, bool, &str)> = r
            .events
            .iter()
            .map(|e| (e.at, e.input, e.data.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0.1, true, "ls\r"),
                (0.25, false, "a.txt\r\nb.txt\r\n"),
                (0.5, false, "\r\n[exit status: 0]\r\n")
            ]
        );
    }

    #[test]
    fn not_a_recording_and_cut_files() {
        assert!(parse("s", 1, "", false).is_err());
        assert!(parse("s", 1, "{\"version\":1}\n", false).is_err());
        assert!(parse("s", 1, "[0.1,\"o\",\"x\"]\n", false).is_err());
        let cut = &CAST[..CAST.len() - 10];
        let r = parse("s", 1, cut, true).unwrap();
        assert!(r.truncated);
        assert_eq!(r.events.len(), 2, "the torn last line is dropped");
    }

    #[test]
    fn the_file_is_named_by_session_and_sequence_never_by_text() {
        let dir = Path::new("/var/lib/jitgate");
        assert_eq!(
            path(dir, "ses_01JABC-x", 4).unwrap(),
            Path::new("/var/lib/jitgate/recordings/ses_01JABC-x-4.cast")
        );
        for hostile in [
            "",
            "../../etc/shadow",
            "a/b",
            "ses\0",
            "ses 1",
            "..",
            "ses.cast",
        ] {
            assert!(path(dir, hostile, 1).is_none(), "{hostile:?}");
        }
    }

    #[test]
    fn reading_is_bounded_and_refuses_links() {
        let dir = tempfile::tempdir().unwrap();
        let recordings = dir.path().join("recordings");
        std::fs::create_dir_all(&recordings).unwrap();
        std::fs::write(recordings.join("ses_a-1.cast"), CAST).unwrap();
        assert_eq!(read(dir.path(), "ses_a", 1).unwrap().events.len(), 3);
        assert!(matches!(
            read(dir.path(), "ses_a", 2),
            Err(RecordingError::Missing { .. })
        ));
        std::os::unix::fs::symlink("/etc/passwd", recordings.join("ses_b-1.cast")).unwrap();
        assert!(matches!(
            read(dir.path(), "ses_b", 1),
            Err(RecordingError::Unreadable { .. })
        ));
        // A huge stream: read up to the bound, reported as cut.
        let mut big = String::from("{\"version\":2}\n");
        let line = format!("[1.0,\"o\",\"{}\"]\n", "x".repeat(1000));
        while (big.len() as u64) < MAX_BYTES + 10_000 {
            big.push_str(&line);
        }
        std::fs::write(recordings.join("ses_c-1.cast"), &big).unwrap();
        let r = read(dir.path(), "ses_c", 1).unwrap();
        assert!(r.truncated);
        assert!(
            r.events.len() < 4200 && r.events.len() > 4000,
            "{}",
            r.events.len()
        );
    }
}
