//! The masking engine on whatever a server (or a workload, through what it stored) puts in
//! results: a RowDescription and a DataRow in text and binary formats, COPY TO STDOUT in
//! text, CSV and binary split at any boundary, and error fields with the statement that
//! caused them. The first byte picks the rules, the origin of the columns and the COPY
//! format. Nothing may panic, and no redacted column may pass: a table column under a
//! `redact` rule comes out as `****` or NULL, whatever its type and format.
#![no_main]

use bytes::{Bytes, BytesMut};
use jitgate::{
    config::Access,
    inspect::{
        mask::Masker,
        rules::{Detector, MaskRule, Strategy},
    },
    postgres::rows::{
        CopyFormat, CopyMasker, Masked, Origin, Plan, mask_data_row, mask_fields,
        parse_row_description,
    },
};
use libfuzzer_sys::fuzz_target;

fn masker(sel: u8) -> Masker {
    let strategy = [
        Strategy::Redact,
        Strategy::Partial,
        Strategy::Hash,
        Strategy::Null,
    ][usize::from(sel & 3)];
    let mut rules = vec![MaskRule {
        columns: vec!["users.email".into(), "*.ssn".into(), "*card*".into()],
        detectors: Vec::new(),
        strategy,
        exempt_identities: Vec::new(),
    }];
    if sel & 4 != 0 {
        rules.push(MaskRule {
            columns: Vec::new(),
            detectors: Detector::ALL.to_vec(),
            strategy: Strategy::Redact,
            exempt_identities: Vec::new(),
        });
    }
    Masker::new(&rules, None, "bot", Access::Read, [7; 32]).expect("rules that apply")
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let masker = masker(sel);
    let (desc, row) = match rest.split_first() {
        Some((&n, tail)) if usize::from(n) <= tail.len() => tail.split_at(usize::from(n)),
        _ => (&[][..], rest),
    };
    let origin = |c: &jitgate::postgres::rows::Column| match (sel >> 3) & 3 {
        0 => Origin::Column("public".into(), "users".into(), c.name.clone()),
        1 => Origin::Derived,
        _ => Origin::Unknown,
    };
    let plan = match parse_row_description(&Bytes::copy_from_slice(desc)) {
        Ok(cols) => Plan::new(
            &cols,
            &masker,
            &origin,
            (sel & 32 != 0).then_some(Strategy::Redact),
        ),
        Err(_) => Plan::for_names(
            &["email".into(), "card".into(), "note".into()],
            "public",
            "users",
            &masker,
        ),
    };
    let mut stats = Masked::default();
    let mut out = BytesMut::new();
    let row_bytes = Bytes::copy_from_slice(row);
    if mask_data_row(&row_bytes, &plan, &masker, &mut stats, &mut out).is_ok()
        && sel & 3 == 0
        && (sel >> 3) & 3 == 0
        && let Ok(cols) = parse_row_description(&Bytes::copy_from_slice(desc))
    {
        // Every column traced to a redacted table column must come out redacted.
        let values = data_row_values(&out);
        for (i, c) in cols.iter().enumerate() {
            if masker.column_strategy("public", "users", &c.name) == Some(Strategy::Redact)
                && let Some(Some(v)) = values.get(i)
            {
                assert_eq!(&v[..], b"****", "column {} passed as {v:?}", c.name);
            }
        }
    }
    let binary = plan.with_formats(&[1]);
    let _ = mask_data_row(
        &row_bytes,
        &binary,
        &masker,
        &mut Masked::default(),
        &mut out,
    );

    // COPY, fed in two pieces split where the data says.
    let format = match (sel >> 6) & 3 {
        0 => CopyFormat::Text {
            delimiter: b'\t',
            header: false,
        },
        1 => CopyFormat::Csv {
            delimiter: b',',
            quote: b'"',
            header: true,
        },
        _ => CopyFormat::Binary,
    };
    let copy_plan = Plan::for_names(
        &["email".into(), "card".into(), "note".into()],
        "public",
        "users",
        &masker,
    );
    let mut copy = CopyMasker::new(format, copy_plan, None);
    let cut = row.first().map_or(0, |b| usize::from(*b) % (row.len() + 1));
    let (a, b) = row.split_at(cut);
    let mut stats = Masked::default();
    let mut out = BytesMut::new();
    if copy.feed(a, &masker, &mut stats, &mut out).is_ok()
        && copy.feed(b, &masker, &mut stats, &mut out).is_ok()
    {
        let _ = copy.finish(&masker, &mut stats, &mut out);
    }

    // An error the server raised about the statement the client wrote.
    let text = String::from_utf8_lossy(row).into_owned();
    let mid = (0..=text.len() / 2)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let (written, message) = text.split_at(mid);
    let written = written.to_owned();
    let mut fields = vec![
        (b'S', "ERROR".to_owned()),
        (b'C', "22P02".to_owned()),
        (b'M', message.to_owned()),
        (b'D', message.to_owned()),
        (b'H', written.clone()),
    ];
    mask_fields(&mut fields, &masker, &written, &mut Masked::default());
    let _ = masker.scan(&text, &mut |_| {});
});

/// The values of the DataRow message in `out` (tag, length, count, then length-prefixed
/// values; -1 is NULL).
fn data_row_values(out: &[u8]) -> Vec<Option<Vec<u8>>> {
    let mut values = Vec::new();
    let Some(body) = out.get(5..) else {
        return values;
    };
    let Some(count) = body.get(..2).map(|b| i16::from_be_bytes([b[0], b[1]])) else {
        return values;
    };
    let mut at = 2;
    for _ in 0..count.max(0) {
        let Some(len) = body
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        at += 4;
        if len < 0 {
            values.push(None);
            continue;
        }
        let Some(v) = body.get(at..at + len as usize) else {
            break;
        };
        values.push(Some(v.to_vec()));
        at += len as usize;
    }
    values
}
