//! Scrubbing an injected secret out of upstream responses, streaming.
//!
//! Why: the workload must never learn the credential the gate injects, and some upstreams
//! echo request headers (debug endpoints, error pages, proxies). Every occurrence of the
//! exact secret bytes is overwritten with `*` of the same length, so `Content-Length` and
//! any framing stay valid without buffering the body.
//!
//! Chunk boundaries: a secret may straddle two body chunks, so the scrubber holds back the
//! last `secret.len() - 1` bytes of each chunk (they could be the start of a match) and
//! releases them with the next chunk or at the end. Memory is bounded by one chunk plus the
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
        let keep = (self.secret.len() - 1).min(self.tail.len());
        let release = self.tail.len() - keep;
        self.tail.split_to(release).freeze()
    }

    /// The end of the body: releases what was held back (it cannot start a full match).
    pub fn finish(&mut self) -> Bytes {
        self.tail.split().freeze()
    }
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
    fn holds_back_at_most_secret_len_minus_one() {
        let mut s = Scrubber::new(b"abcdef").unwrap();
        assert_eq!(s.push(b"0123456789").len(), 5);
        assert_eq!(s.finish().len(), 5);
    }
}
