//! Statement records stored a batch to a row, in a compact binary encoding.
//!
//! Every statement of every session is recorded, so the store thread's cost per record is on
//! the data path's budget (it shares the host's cores with the proxy). SQLite's cost follows
//! the bytes it writes (pages into the WAL), not the rows: a row per statement with its
//! `(session_id, seq)` key written twice (table and index), its text columns and JSON
//! parameters took about 1.7 µs a record; a session's batch of up to 64 records as one row,
//! encoded with postcard (varints, no field names, the session id once), about 0.3 µs. Records
//! from before this table stay in `statements` and are read with these.
//!
//! The blob is a format version byte, then the postcard encoding of the records. A blob this
//! build cannot read is an error (never records silently dropped; the reader counts it and
//! says so). A new format comes with a schema version: an older jitgated then refuses the
//! store rather than meet blobs it cannot read.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::{
    model::{Decision, StatementRecord, Timestamp},
    store::{Result, StoreError},
};

/// The blob's first byte: the encoding of what follows.
const FORMAT: u8 = 1;

/// One record without its session (the row names it), borrowed to encode, owned to decode.
#[derive(Serialize, Deserialize)]
struct Packed<'a> {
    seq: u32,
    at: i64,
    #[serde(borrow)]
    text: Cow<'a, str>,
    params: Cow<'a, [Option<String>]>,
    /// [`decision_code`]: fixed here, whatever the enum's order becomes.
    decision: u8,
    rule: Option<Cow<'a, str>>,
    approved_by: Option<Cow<'a, str>>,
    held_ms: u64,
    duration_ms: Option<f64>,
    rows: Option<u64>,
    tag: Option<Cow<'a, str>>,
    error: Option<Cow<'a, str>>,
    masked: u64,
}

fn decision_code(d: Decision) -> u8 {
    match d {
        Decision::Allowed => 0,
        Decision::Approved => 1,
        Decision::Denied => 2,
        Decision::Refused => 3,
    }
}

fn decision_of(code: u8) -> Result<Decision> {
    Ok(match code {
        0 => Decision::Allowed,
        1 => Decision::Approved,
        2 => Decision::Denied,
        3 => Decision::Refused,
        other => return Err(corrupt(format!("unknown decision code {other}"))),
    })
}

fn corrupt(why: String) -> StoreError {
    StoreError::Invalid(format!(
        "state store: a stored batch of statement records cannot be read ({why}); the store file may be damaged or written by a newer jitgated"
    ))
}

/// The blob of `records` (one session's; the caller groups them).
pub fn encode(records: &[StatementRecord]) -> Result<Vec<u8>> {
    let packed: Vec<Packed<'_>> = records
        .iter()
        .map(|r| Packed {
            seq: r.seq,
            at: r.at.millis(),
            text: Cow::Borrowed(&r.text),
            params: Cow::Borrowed(&r.params),
            decision: decision_code(r.decision),
            rule: r.rule.as_deref().map(Cow::Borrowed),
            approved_by: r.approved_by.as_deref().map(Cow::Borrowed),
            held_ms: r.held_ms,
            duration_ms: r.duration_ms,
            rows: r.rows,
            tag: r.tag.as_deref().map(Cow::Borrowed),
            error: r.error.as_deref().map(Cow::Borrowed),
            masked: r.masked,
        })
        .collect();
    // Room for the usual record (a statement's text and a few numbers) at once.
    let room = 1 + records.iter().map(|r| r.text.len() + 48).sum::<usize>();
    let mut blob = Vec::with_capacity(room);
    blob.push(FORMAT);
    postcard::to_io(&packed, &mut blob)
        .map_err(|e| StoreError::Invalid(format!("encoding statement records: {e}")))?;
    Ok(blob)
}

/// The records of a blob [`encode`] wrote for `session`.
pub fn decode(session: &str, blob: &[u8]) -> Result<Vec<StatementRecord>> {
    let Some((&format, body)) = blob.split_first() else {
        return Err(corrupt("empty".into()));
    };
    if format != FORMAT {
        return Err(corrupt(format!("format {format}")));
    }
    let (packed, rest): (Vec<Packed<'_>>, &[u8]) =
        postcard::take_from_bytes(body).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes after the records", rest.len())));
    }
    packed
        .into_iter()
        .map(|p| {
            Ok(StatementRecord {
                session: session.to_owned(),
                seq: p.seq,
                at: Timestamp(p.at),
                text: p.text.into_owned(),
                params: p.params.into_owned(),
                decision: decision_of(p.decision)?,
                rule: p.rule.map(Cow::into_owned),
                approved_by: p.approved_by.map(Cow::into_owned),
                held_ms: p.held_ms,
                duration_ms: p.duration_ms,
                rows: p.rows,
                tag: p.tag.map(Cow::into_owned),
                error: p.error.map(Cow::into_owned),
                masked: p.masked,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u32) -> StatementRecord {
        StatementRecord {
            session: "s-1".into(),
            seq,
            at: Timestamp(1_796_600_000_123),
            text: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
            params: vec![Some("12345".into())],
            decision: Decision::Allowed,
            rule: Some("read".into()),
            approved_by: None,
            held_ms: 0,
            duration_ms: Some(0.051_234_567),
            rows: Some(1),
            tag: Some("SELECT 1".into()),
            error: None,
            masked: 0,
        }
    }

    #[test]
    fn records_round_trip_exactly_every_field_set_or_not() {
        let mut full = record(7);
        full.text = "select 'é ✓ \u{0}'; -- \"quoted\"".into();
        full.params = vec![None, Some(String::new()), Some("x".repeat(5000))];
        full.decision = Decision::Approved;
        full.approved_by = Some("user carol".into());
        full.held_ms = u64::MAX;
        full.duration_ms = Some(f64::MIN_POSITIVE);
        full.rows = Some(u64::MAX);
        full.error = Some("42P01: relation \"x\" does not exist".into());
        full.masked = 3;
        full.at = Timestamp(i64::MIN);
        let mut bare = record(u32::MAX);
        bare.params = Vec::new();
        bare.rule = None;
        bare.duration_ms = None;
        bare.rows = None;
        bare.tag = None;
        bare.at = Timestamp(-1);
        for d in [
            Decision::Allowed,
            Decision::Approved,
            Decision::Denied,
            Decision::Refused,
        ] {
            let mut r = record(1);
            r.decision = d;
            let back = decode("s-1", &encode(&[r.clone()]).unwrap()).unwrap();
            assert_eq!(back, [r], "{d:?}");
        }
        let records = vec![full, bare, record(3)];
        let back = decode("s-1", &encode(&records).unwrap()).unwrap();
        assert_eq!(back, records);
        assert_eq!(back[0].at.millis(), i64::MIN);
        assert_eq!(back[1].at.millis(), -1);
        assert_eq!(
            back[0].duration_ms.map(f64::to_bits),
            Some(f64::MIN_POSITIVE.to_bits())
        );
        assert!(decode("s-1", &encode(&[]).unwrap()).unwrap().is_empty());
    }

    #[test]
    fn a_batch_takes_a_fraction_of_its_json() {
        let records: Vec<_> = (1..=64).map(record).collect();
        let blob = encode(&records).unwrap();
        let json = serde_json::to_vec(&records).unwrap();
        assert!(
            blob.len() * 5 < json.len() * 2,
            "{} bytes against {} as JSON",
            blob.len(),
            json.len()
        );
    }

    /// A damaged or foreign blob is an error, never a panic, never records made up.
    #[test]
    fn damaged_blobs_are_errors() {
        let blob = encode(&[record(1), record(2)]).unwrap();
        assert!(decode("s", &[]).is_err());
        assert!(decode("s", &[2]).is_err());
        let mut newer = blob.clone();
        newer[0] = 2;
        assert!(decode("s", &newer).is_err());
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(decode("s", &trailing).is_err());
        for cut in 1..blob.len() {
            assert!(decode("s", &blob[..cut]).is_err(), "cut at {cut}");
        }
        // Every single-byte change either fails or decodes to well-formed records.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = blob.clone();
            let at = 1 + (state as usize) % (b.len() - 1);
            b[at] = (state >> 32) as u8;
            let _ = decode("s", &b);
        }
        // A length that claims more than the blob holds does not allocate it.
        let mut huge = vec![FORMAT];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode("s", &huge).is_err());
    }
}
