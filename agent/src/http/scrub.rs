//! Scrubbing an injected secret out of upstream responses, streaming.
//!
//! Why: the workload must never learn the credential the gate injects, and some upstreams
//! echo request headers (debug endpoints, error pages, proxies). Every occurrence of the
//! exact secret bytes is overwritten with `*` of the same length, so `Content-Length` and
//! any framing stay valid without buffering the body.
//!
//! Chunk boundaries: a secret may straddle two body chunks, so the scrubber holds back the end
//! of each chunk that is a start of the secret (at most `secret.len() - 1` bytes) and
//! releases it with the next chunk or at the end. Memory is bounded by one chunk plus the
//! secret's length.

use bytes::{Bytes, BytesMut};

/// One response body's scrubbing state.
#[derive(Debug)]
pub struct Scrubber {
    secret: Vec<u8>,
    /// Bytes held back from the previous chunk: possibly the start of a match.
    tail: BytesMut,
}

impl Scrubber {
    /// `None` for an empty secret: nothing to scrub.
    pub fn new(secret: &[u8]) -> Option<Self> {
        (!secret.is_empty()).then(|| Self {
            secret: secret.to_vec(),
            tail: BytesMut::new(),
        })
    }

    /// Feeds one chunk; returns what can be released now (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.tail.extend_from_slice(chunk);
        mask_all(&mut self.tail, &self.secret);
        let keep = partial_match(&self.tail, &self.secret);
        let release = self.tail.len() - keep;
        self.tail.split_to(release).freeze()
    }

    /// The end of the body: releases what was held back (it cannot start a full match).
    pub fn finish(&mut self) -> Bytes {
        self.tail.split().freeze()
    }
}

/// The length of the longest end of `buf` that is a proper start of `secret`: the bytes that
/// could still become a match. Only those are held back, so a stream that does not end in
/// the secret's first bytes (interactive output) is released at once.
fn partial_match(buf: &[u8], secret: &[u8]) -> usize {
    let longest = (secret.len() - 1).min(buf.len());
    (1..=longest)
        .rev()
        .find(|&k| buf[buf.len() - k..] == secret[..k])
        .unwrap_or(0)
}

/// Overwrites every occurrence of `secret` in `buf` with `*`.
pub fn mask_all(buf: &mut [u8], secret: &[u8]) {
    if secret.is_empty() {
        return;
    }
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&buf[from..], secret) {
        let start = from + at;
        buf[start..start + secret.len()].fill(b'*');
        from = start + secret.len();
    }
}

/// Whether a header value contains the secret (then it is masked before the workload sees it).
pub fn contains(value: &[u8], secret: &[u8]) -> bool {
    !secret.is_empty() && memchr::memmem::find(value, secret).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(secret: &str, chunks: &[&str]) -> String {
        let mut s = Scrubber::new(secret.as_bytes()).unwrap();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&s.push(c.as_bytes()));
        }
        out.extend_from_slice(&s.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn scrubs_within_and_across_chunks_keeping_length() {
        assert_eq!(run("s3cr3t", &["a s3cr3t b"]), "a ****** b");
        assert_eq!(run("s3cr3t", &["a s3", "cr", "3t b"]), "a ****** b");
        assert_eq!(run("s3cr3t", &["s", "3", "c", "r", "3", "t"]), "******");
        assert_eq!(run("s3cr3t", &["s3cr3ts3cr3t"]), "************");
        assert_eq!(run("s3cr3t", &["s3cr3", "s3cr3t"]), "s3cr3******");
        assert_eq!(run("s3cr3t", &["no secret here", ""]), "no secret here");
        assert_eq!(
            run("s3cr3t", &["s3cr3"]),
            "s3cr3",
            "a prefix at the end is released"
        );
    }

    #[test]
    fn every_split_point_is_scrubbed() {
        let body = "xx token=Bearer abc.def-123 yy Bearer abc.def-123";
        let secret = "Bearer abc.def-123";
        for i in 0..body.len() {
            for j in i..body.len() {
                let out = run(secret, &[&body[..i], &body[i..j], &body[j..]]);
                assert!(!out.contains(secret), "split {i},{j}: {out}");
                assert_eq!(out.len(), body.len());
            }
        }
    }

    #[test]
    fn holds_back_only_what_could_start_the_secret() {
        let mut s = Scrubber::new(b"abcdef").unwrap();
        assert_eq!(
            s.push(b"0123456789").len(),
            10,
            "nothing here starts the secret"
        );
        assert_eq!(s.push(b"xxabcd").len(), 2, "`abcd` could");
        assert_eq!(&s.push(b"ef!")[..], b"******!");
        assert_eq!(s.push(b"aaaaaaaa").len(), 7);
        assert_eq!(s.finish().len(), 1);
    }
}
