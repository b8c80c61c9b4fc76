//! Short, random, copy-pastable identifiers: a one-letter kind, a dash, ten base32 letters
//! (50 bits), e.g. `g-k2n4q7xw3a` for a grant.

/// Kinds of identifier, one prefix each.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Request,
    Grant,
    Task,
    Session,
}

const ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// A new identifier of `kind`.
pub fn new(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Request => 'r',
        Kind::Grant => 'g',
        Kind::Task => 't',
        Kind::Session => 's',
    };
    let mut bytes = [0u8; 10];
    // getrandom only fails without an entropy source at all; fall back to time and a
    // counter, which still gives unique ids within this process.
    if getrandom::fill(&mut bytes).is_err() {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = crate::model::Timestamp::now().millis() as u64
            ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40);
        bytes[..8].copy_from_slice(&n.to_le_bytes());
    }
    let mut out = String::with_capacity(12);
    out.push(prefix);
    out.push('-');
    for b in bytes {
        out.push(ALPHABET[usize::from(b) % 32] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_distinct() {
        let a = new(Kind::Grant);
        let b = new(Kind::Grant);
        assert!(a.starts_with("g-") && a.len() == 12, "{a}");
        assert_ne!(a, b);
        assert!(new(Kind::Session).starts_with("s-"));
    }
}
