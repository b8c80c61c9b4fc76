//! Applies masking to what the server sends: data rows (text and binary), COPY output (text,
//! CSV, binary) and the text fields of errors and notices. Row by row, in constant memory.

use std::borrow::Cow;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use super::wire::{WireError, message, take_cstr, take_i16, take_i32};
use crate::inspect::{
    mask::{Masker, Outcome, Sink, Written},
    rules::{Detector, Strategy},
};

/// One column of a RowDescription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The output name: an alias when the query gave one, so never used to pick a rule for a
    /// table column (that goes by `table_oid` and `attnum`).
    pub name: String,
    /// The table the server traced the column to; 0 for an expression.
    pub table_oid: u32,
    /// The column's number in that table; 0 for a whole-row value.
    pub attnum: i16,
    pub type_oid: u32,
    pub format: i16,
}

pub fn parse_row_description(body: &Bytes) -> Result<Vec<Column>, WireError> {
    let mut b = body.clone();
    let n = take_i16(&mut b)?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = take_cstr(&mut b)?;
        let table_oid = take_i32(&mut b)? as u32;
        let attnum = take_i16(&mut b)?;
        let type_oid = take_i32(&mut b)? as u32;
        let _typlen = take_i16(&mut b)?;
        let _typmod = take_i32(&mut b)?;
        let format = take_i16(&mut b)?;
        cols.push(Column {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    Ok(cols)
}

/// Types whose binary format is their text (jsonb after a version byte).
fn text_like(oid: u32) -> bool {
    matches!(
        oid,
        18 | 19 | 25 | 114 | 142 | 705 | 1042 | 1043 | 2275 | 3802
    )
}

const INT8: u32 = 20;
const BYTEA: u32 = 17;
const JSON: u32 = 114;
const JSONB: u32 = 3802;

/// What to do with each column of a result.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    cols: Vec<ColPlan>,
}

#[derive(Clone, Debug)]
struct ColPlan {
    rule: Option<Strategy>,
    type_oid: u32,
    binary: bool,
}

/// Where a result column's values come from, as far as choosing its column rule goes.
#[derive(Clone, Debug)]
pub enum Origin {
    /// A table column by its real name (`schema`, `table`, `column`), whatever alias it has.
    Column(String, String, String),
    /// An expression or a whole row: the server cannot say which columns went into it.
    Derived,
    /// A table column whose name could not be looked up.
    Unknown,
}

impl Plan {
    /// `origin` says where each column comes from; `derived` is the rule for values computed
    /// from masked columns (`lower(email)`, `row_to_json(u)`, a UNION), decided from the
    /// statement's text, since the server does not trace them.
    pub fn new(
        cols: &[Column],
        masker: &Masker,
        origin: &dyn Fn(&Column) -> Origin,
        derived: Option<Strategy>,
    ) -> Self {
        Self {
            cols: cols
                .iter()
                .map(|c| {
                    let rule = match origin(c) {
                        Origin::Column(schema, table, column) => {
                            masker.column_strategy(&schema, &table, &column)
                        }
                        Origin::Derived => masker.column_strategy_by_name(&c.name).or(derived),
                        // Fail closed: an unidentified table column is withheld.
                        Origin::Unknown => masker.has_column_rules().then_some(Strategy::Redact),
                    };
                    ColPlan {
                        rule,
                        type_oid: c.type_oid,
                        binary: c.format == 1,
                    }
                })
                .collect(),
        }
    }

    /// A plan for named columns without types (COPY): every value is text.
    pub fn for_names(names: &[String], schema: &str, table: &str, masker: &Masker) -> Self {
        Self {
            cols: names
                .iter()
                .map(|n| ColPlan {
                    rule: masker.column_strategy(schema, table, n),
                    type_oid: 25,
                    binary: false,
                })
                .collect(),
        }
    }

    /// The same plan with the result formats a Bind asked for.
    #[must_use]
    pub fn with_formats(&self, formats: &[i16]) -> Self {
        let mut p = self.clone();
        for (i, c) in p.cols.iter_mut().enumerate() {
            let f = match formats.len() {
                0 => 0,
                1 => formats[0],
                _ => formats.get(i).copied().unwrap_or(0),
            };
            c.binary = f == 1;
        }
        p
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    fn rule(&self, i: usize) -> Option<Strategy> {
        self.cols.get(i).and_then(|c| c.rule)
    }
}

/// Counts of what was masked, for the record and metrics.
#[derive(Clone, Debug, Default)]
pub struct Masked {
    pub values: u64,
    pub by_detector: [u64; 9],
    pub by_column_rule: u64,
    /// Typed values (integers, dates...) withheld as NULL because `****` cannot be one:
    /// the client is told once per statement (a NOTICE), not left with a silent NULL.
    pub withheld: u64,
}

impl Masked {
    fn hit(&mut self, d: Detector) {
        let i = Detector::ALL.iter().position(|x| *x == d).unwrap_or(0);
        self.by_detector[i] += 1;
    }
}

/// Masks one value into `out` (the DataRow being built): the value as sent (its length
/// word and bytes), NULL, or its masked text written once, where it will be sent.
fn mask_value(plan: &ColPlan, raw: &[u8], masker: &Masker, stats: &mut Masked, out: &mut BytesMut) {
    let at = out.len();
    // The length word, filled in once the masked text is written.
    out.put_i32(0);
    if plan.binary && plan.type_oid == JSONB {
        out.put_u8(1);
    }
    match mask_typed(plan, raw, masker, stats, out) {
        Written::Replaced => {
            let len = (out.len() - at - 4) as i32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        Written::Keep => {
            out.truncate(at);
            out.put_i32(raw.len() as i32);
            out.extend_from_slice(raw);
        }
        Written::Null => {
            out.truncate(at);
            out.put_i32(-1);
        }
    }
}

/// [`mask_cell`], with a masked text in a typed column withheld instead (what it wrote to
/// `out` is then the caller's to drop): `****` in an integer or date column would break the
/// client's decoding of the whole result.
fn mask_typed(
    plan: &ColPlan,
    raw: &[u8],
    masker: &Masker,
    stats: &mut Masked,
    out: &mut impl Sink,
) -> Written {
    if matches!(plan.type_oid, JSON | JSONB) {
        return mask_json(plan, raw, masker, stats, out);
    }
    match mask_cell(plan, raw, masker, stats, out) {
        Written::Replaced if !text_like(plan.type_oid) => {
            stats.withheld += 1;
            Written::Null
        }
        written => written,
    }
}

/// [`mask_cell`] for a json or jsonb value, which drivers parse: what is sent stays JSON.
/// A column rule's mask is sent as a JSON string (`"****"`, `"j***@example.com"`); a
/// detector's mask that leaves the document malformed (a card number that was a JSON
/// number: `{"card": ****}`) withholds the value instead, as for other typed columns.
fn mask_json(
    plan: &ColPlan,
    raw: &[u8],
    masker: &Masker,
    stats: &mut Masked,
    out: &mut impl Sink,
) -> Written {
    let mut text = String::new();
    match mask_cell(plan, raw, masker, stats, &mut text) {
        Written::Replaced if plan.rule.is_some() => {
            out.put_str(&serde_json::Value::String(text).to_string());
            Written::Replaced
        }
        Written::Replaced if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() => {
            out.put_str(&text);
            Written::Replaced
        }
        Written::Replaced => {
            stats.withheld += 1;
            Written::Null
        }
        written => written,
    }
}

/// What masking makes of one value; a masked text is written to `out` (after anything
/// already there, such as a binary jsonb's version byte).
fn mask_cell(
    plan: &ColPlan,
    raw: &[u8],
    masker: &Masker,
    stats: &mut Masked,
    out: &mut impl Sink,
) -> Written {
    if let Some(rule) = plan.rule {
        stats.values += 1;
        stats.by_column_rule += 1;
        if plan.binary && !text_like(plan.type_oid) {
            // A typed binary value cannot carry "****": the value is withheld.
            stats.withheld += 1;
            return Written::Null;
        }
        return masker.apply_column_into(rule, &text_of(plan, raw), out);
    }
    if !masker.has_detectors() {
        return Written::Keep;
    }
    if plan.binary && !text_like(plan.type_oid) {
        // A card number can hide in a bigint.
        if plan.type_oid == INT8 && raw.len() == 8 && masker.detects(Detector::Card) {
            let n = raw
                .try_into()
                .map(i64::from_be_bytes)
                .unwrap_or_default()
                .to_string();
            let mut hit = false;
            if !matches!(masker.scan(&n, &mut |_| hit = true), Outcome::Keep) {
                stats.values += 1;
                stats.withheld += 1;
                stats.hit(Detector::Card);
                return Written::Null;
            }
        }
        // Text inside a binary value (array elements, record fields, tsvector lexemes, bytea)
        // sits in it as plain bytes between length words: scanned as text, a hit withholds
        // the whole value, which cannot carry "****".
        return withhold_on_hit(&lossy_text(raw), masker, stats);
    }
    if plan.type_oid == BYTEA
        && let Some(hex) = raw.strip_prefix(b"\\x")
    {
        // `\x6a61...`: detectors look at the bytes, not at their hex digits.
        return match decode_hex(hex) {
            Some(bytes) => withhold_on_hit(&lossy_text(&bytes), masker, stats),
            None => Written::Keep,
        };
    }
    let bytes = text_bytes(plan, raw);
    let candidates = masker.candidates(bytes);
    if candidates == 0 {
        return Written::Keep;
    }
    let mut hit = false;
    let written = masker.scan_into(
        &utf8(bytes),
        candidates,
        &mut |d| {
            hit = true;
            stats.hit(d);
        },
        out,
    );
    stats.values += u64::from(hit);
    written
}

/// Whether a detector finds something in a binary value of unknown type: the text inside it,
/// or, for 8 bytes, the integer they spell (a card number kept in a bigint). Counts a hit as
/// a withheld value.
fn binary_hit(raw: &[u8], masker: &Masker, stats: &mut Masked) -> bool {
    if let Ok(bytes) = <[u8; 8]>::try_from(raw)
        && masker.detects(Detector::Card)
        && !matches!(
            masker.scan(&i64::from_be_bytes(bytes).to_string(), &mut |_| {}),
            Outcome::Keep
        )
    {
        stats.values += 1;
        stats.withheld += 1;
        stats.hit(Detector::Card);
        return true;
    }
    withhold_on_hit(&lossy_text(raw), masker, stats) == Written::Null
}

/// Withholds a value whose text (`text`) a detector finds something in.
fn withhold_on_hit(text: &str, masker: &Masker, stats: &mut Masked) -> Written {
    let mut hits = Vec::new();
    if matches!(masker.scan(text, &mut |d| hits.push(d)), Outcome::Keep) {
        return Written::Keep;
    }
    stats.values += 1;
    stats.withheld += 1;
    for d in hits {
        stats.hit(d);
    }
    Written::Null
}

/// The printable text in arbitrary bytes: control bytes (length words, separators) become
/// spaces, so that text split by them is not joined to its neighbours.
fn lossy_text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn decode_hex(hex: &[u8]) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn text_of<'a>(plan: &ColPlan, raw: &'a [u8]) -> Cow<'a, str> {
    utf8(text_bytes(plan, raw))
}

/// The text in a value's bytes: binary jsonb carries a version byte first.
fn text_bytes<'a>(plan: &ColPlan, raw: &'a [u8]) -> &'a [u8] {
    if plan.binary && plan.type_oid == JSONB && !raw.is_empty() {
        &raw[1..]
    } else {
        raw
    }
}

fn utf8(raw: &[u8]) -> Cow<'_, str> {
    // Valid UTF-8 (all but broken input) is borrowed after the fast check; the lossy
    // conversion only runs for the rest.
    std::str::from_utf8(raw).map_or_else(|_| String::from_utf8_lossy(raw), Cow::Borrowed)
}

/// Writes the (masked) DataRow to `out`.
pub fn mask_data_row(
    body: &[u8],
    plan: &Plan,
    masker: &Masker,
    stats: &mut Masked,
    out: &mut BytesMut,
) -> Result<(), WireError> {
    // Values are sliced out of the frame, never reference-counted pieces of it.
    let mut b: &[u8] = body;
    if b.len() < 2 {
        return Err(WireError::Malformed("truncated int16"));
    }
    let n = b.get_i16();
    // Without a plan (no column rules), detectors still scan every text value.
    let fallback = plan.is_empty().then_some(ColPlan {
        rule: None,
        type_oid: 25,
        binary: false,
    });
    if !plan.is_empty() && plan.len() != n.max(0) as usize {
        return Err(WireError::Malformed(
            "data row with another column count than its row description",
        ));
    }
    message(out, b'D', |o| {
        o.put_i16(n);
        for i in 0..n.max(0) as usize {
            if b.len() < 4 {
                // Leave the malformed rest for the caller to see: write what we have.
                break;
            }
            let len = b.get_i32();
            if len < 0 {
                o.put_i32(-1);
                continue;
            }
            let len = len as usize;
            if b.len() < len {
                break;
            }
            let (raw, rest) = b.split_at(len);
            b = rest;
            let Some(col) = plan.cols.get(i).or(fallback.as_ref()) else {
                // More values than the RowDescription announced: nothing can say which
                // rule applies, so nothing of it passes.
                o.put_i32(-1);
                continue;
            };
            mask_value(col, raw, masker, stats, o);
        }
    });
    if !b.is_empty() {
        return Err(WireError::Malformed("data row longer than its columns"));
    }
    Ok(())
}

/// Masks the text fields of an ErrorResponse or NoticeResponse (which can echo row values).
///
/// Detectors scan every text field. When column rules apply, the server's echoes of values are
/// withheld as well, since they can carry a masked column (`invalid input syntax for type
/// integer: "<email>"`, `relation "<ssn>" does not exist` from `ssn::regclass`, `Key
/// (ssn)=(...) already exists`, a row in `Failing row contains`, a `RAISE` of anything):
/// DETAIL, CONTEXT and internal query are dropped, every quoted part of the message and hint
/// that the client did not itself write in `written` (its statement) is redacted, and messages
/// raised by user code are replaced.
pub fn mask_fields(
    fields: &mut Vec<(u8, String)>,
    masker: &Masker,
    written: &str,
    stats: &mut Masked,
) -> bool {
    let mut changed = false;
    if masker.has_column_rules() {
        let before = fields.len();
        fields.retain(|(code, _)| !matches!(code, b'D' | b'W' | b'q'));
        changed |= fields.len() != before;
        let user_raised = fields.iter().any(|(code, v)| {
            *code == b'C' && (v == "P0001" || v == "P0004" || v == "00000" || v.starts_with("01"))
        });
        for (code, value) in fields.iter_mut() {
            if !matches!(code, b'M' | b'H') {
                continue;
            }
            if user_raised && *code == b'M' {
                *value =
                    "(message withheld by jitgate: column masking applies to this session)".into();
                stats.values += 1;
                changed = true;
            } else if let Some(redacted) = redact_quoted(value, written) {
                *value = redacted;
                stats.values += 1;
                changed = true;
            }
        }
    }
    for (code, value) in fields.iter_mut() {
        if !matches!(code, b'M' | b'D' | b'H' | b'W' | b'q' | b'p') {
            continue;
        }
        let mut hits = Vec::new();
        let replaced = match masker.scan(value, &mut |d| hits.push(d)) {
            Outcome::Keep => None,
            Outcome::Null => Some("****".to_owned()),
            Outcome::Replace(s) => Some(s.into_owned()),
        };
        if let Some(r) = replaced {
            stats.values += 1;
            for d in hits {
                stats.hit(d);
            }
            *value = r;
            changed = true;
        }
    }
    changed
}

/// `text` with every double-quoted part (PostgreSQL quotes values and names that way) that
/// does not occur in `written` replaced by `****`; `None` when nothing changes. An unclosed
/// quote runs to the end.
///
/// Each part costs a search of `written`, and a workload can make the server quote hundreds
/// of thousands of parts in one message (`repeat('"x"', ...)` cast to a number): past
/// [`QUOTED_SEARCH_BUDGET`] bytes searched, the parts left are redacted unsearched, which
/// can only hide more.
fn redact_quoted(text: &str, written: &str) -> Option<String> {
    let hay = written.to_ascii_lowercase();
    let mut budget = QUOTED_SEARCH_BUDGET;
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut changed = false;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        let (quoted, tail, closed) = match after.find('"') {
            Some(close) => (&after[..close], &after[close + 1..], true),
            None => (after, "", false),
        };
        let written_there = !quoted.is_empty() && budget >= hay.len() && {
            budget -= hay.len();
            written_as_word(&hay, quoted)
        };
        if !quoted.is_empty() && !written_there {
            out.push_str("****");
            changed = true;
        } else {
            out.push_str(quoted);
        }
        if closed {
            out.push('"');
        }
        rest = tail;
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// Bytes of the statement [`redact_quoted`] searches for one message's quoted parts, at
/// most (a few milliseconds): an error quotes a handful.
const QUOTED_SEARCH_BUDGET: usize = 4 << 20;

/// Whether `part` occurs in `hay` (the statement, ASCII-lowercased: PostgreSQL folds
/// unquoted names) as a whole word: not inside a longer name, so that a short value is not
/// taken for something the client wrote because its letters occur somewhere in the
/// statement.
fn written_as_word(hay: &str, part: &str) -> bool {
    let needle = part.to_ascii_lowercase();
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    hay.match_indices(&needle).any(|(at, _)| {
        !word(hay[..at].chars().next_back()) && !word(hay[at + needle.len()..].chars().next())
    })
}

/// How a COPY stream is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        header: bool,
    },
    Csv {
        delimiter: u8,
        quote: u8,
        header: bool,
    },
    Binary,
}

/// Masks COPY ... TO STDOUT output, whatever the message boundaries.
pub struct CopyMasker {
    format: CopyFormat,
    plan: Plan,
    null_text: String,
    carry: BytesMut,
    header_pending: bool,
    binary_header_done: bool,
}

/// Longest row the COPY masker buffers while waiting for its end.
const MAX_COPY_ROW: usize = 256 << 20;

impl CopyMasker {
    pub fn new(format: CopyFormat, plan: Plan, null_text: Option<String>) -> Self {
        let header_pending = matches!(
            format,
            CopyFormat::Csv { header: true, .. } | CopyFormat::Text { header: true, .. }
        );
        Self {
            null_text: null_text.unwrap_or_else(|| match format {
                CopyFormat::Csv { .. } => String::new(),
                _ => "\\N".into(),
            }),
            format,
            plan,
            carry: BytesMut::new(),
            header_pending,
            binary_header_done: false,
        }
    }

    /// Feeds one CopyData payload; writes zero or more masked CopyData messages.
    pub fn feed(
        &mut self,
        data: &[u8],
        masker: &Masker,
        stats: &mut Masked,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        self.carry.extend_from_slice(data);
        if self.carry.len() > MAX_COPY_ROW {
            return Err(WireError::Malformed("COPY row over the size limit"));
        }
        match self.format {
            CopyFormat::Binary => self.feed_binary(masker, stats, out),
            _ => {
                while let Some(end) = self.row_end() {
                    let row = self.carry.split_to(end + 1);
                    let masked = if std::mem::take(&mut self.header_pending) {
                        row.to_vec()
                    } else {
                        self.mask_line(&row[..row.len() - 1], masker, stats)?
                    };
                    message(out, b'd', |o| {
                        o.extend_from_slice(&masked);
                        if masked.last() != Some(&b'\n') {
                            o.put_u8(b'\n');
                        }
                    });
                }
                Ok(())
            }
        }
    }

    /// Flushes a final row without a newline (at CopyDone). The server ends every row, so a
    /// leftover is a truncated row (or binary tuple): it is refused, not passed.
    pub fn finish(
        &mut self,
        masker: &Masker,
        stats: &mut Masked,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        if self.carry.is_empty() {
            return Ok(());
        }
        if matches!(self.format, CopyFormat::Binary) {
            return Err(WireError::Malformed("COPY ended inside a binary tuple"));
        }
        let rest = self.carry.split();
        let masked = self.mask_line(&rest, masker, stats)?;
        message(out, b'd', |o| o.extend_from_slice(&masked));
        Ok(())
    }

    fn row_end(&self) -> Option<usize> {
        match self.format {
            CopyFormat::Csv { quote, .. } => {
                let mut in_quotes = false;
                for (i, &b) in self.carry.iter().enumerate() {
                    if b == quote {
                        in_quotes = !in_quotes;
                    } else if b == b'\n' && !in_quotes {
                        return Some(i);
                    }
                }
                None
            }
            _ => self.carry.iter().position(|&b| b == b'\n'),
        }
    }

    fn mask_line(
        &self,
        line: &[u8],
        masker: &Masker,
        stats: &mut Masked,
    ) -> Result<Vec<u8>, WireError> {
        let (fields, delimiter) = match self.format {
            CopyFormat::Text { delimiter, .. } => (split_text(line, delimiter), delimiter),
            CopyFormat::Csv {
                delimiter, quote, ..
            } => (split_csv(line, delimiter, quote), delimiter),
            CopyFormat::Binary => return Ok(line.to_vec()),
        };
        if !self.plan.is_empty() && fields.len() != self.plan.len() {
            // A field boundary we misread would shift every rule onto the wrong column.
            return Err(WireError::Malformed(
                "COPY row with another field count than the columns it copies",
            ));
        }
        let mut out = Vec::with_capacity(line.len() + 8);
        for (i, field) in fields.iter().enumerate() {
            if i > 0 {
                out.push(delimiter);
            }
            let plan = self.plan.cols.get(i).cloned().unwrap_or(ColPlan {
                rule: None,
                type_oid: 25,
                binary: false,
            });
            let (value, raw) = match self.format {
                CopyFormat::Text { .. } => {
                    if field == self.null_text.as_bytes() {
                        (None, field.clone())
                    } else {
                        (Some(unescape_text(field)), field.clone())
                    }
                }
                CopyFormat::Csv { quote, .. } => {
                    if field.is_empty() && self.null_text.is_empty() {
                        (None, field.clone())
                    } else {
                        (Some(unquote_csv(field, quote)), field.clone())
                    }
                }
                CopyFormat::Binary => unreachable!(),
            };
            let Some(value) = value else {
                out.extend_from_slice(&raw);
                continue;
            };
            let mut t = String::new();
            match mask_typed(&plan, value.as_bytes(), masker, stats, &mut t) {
                Written::Keep => out.extend_from_slice(&raw),
                Written::Null => out.extend_from_slice(self.null_text.as_bytes()),
                Written::Replaced => match self.format {
                    CopyFormat::Text { delimiter, .. } => {
                        out.extend_from_slice(&escape_text(&t, delimiter))
                    }
                    CopyFormat::Csv { quote, .. } => out.extend_from_slice(&quote_csv(&t, quote)),
                    CopyFormat::Binary => unreachable!(),
                },
            }
        }
        Ok(out)
    }

    fn feed_binary(
        &mut self,
        masker: &Masker,
        stats: &mut Masked,
        out: &mut BytesMut,
    ) -> Result<(), WireError> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        if !self.binary_header_done {
            if self.carry.len() < SIGNATURE.len() + 8 {
                return Ok(());
            }
            let ext = u32::from_be_bytes([
                self.carry[15],
                self.carry[16],
                self.carry[17],
                self.carry[18],
            ]) as usize;
            let header_len = SIGNATURE.len() + 8 + ext;
            if self.carry.len() < header_len {
                return Ok(());
            }
            let header = self.carry.split_to(header_len);
            message(out, b'd', |o| o.extend_from_slice(&header));
            self.binary_header_done = true;
        }
        loop {
            if self.carry.len() < 2 {
                return Ok(());
            }
            let n = i16::from_be_bytes([self.carry[0], self.carry[1]]);
            if n < 0 {
                let trailer = self.carry.split();
                message(out, b'd', |o| o.extend_from_slice(&trailer));
                return Ok(());
            }
            // Is the whole tuple here?
            let mut at = 2;
            for _ in 0..n {
                if self.carry.len() < at + 4 {
                    return Ok(());
                }
                let len = i32::from_be_bytes([
                    self.carry[at],
                    self.carry[at + 1],
                    self.carry[at + 2],
                    self.carry[at + 3],
                ]);
                at += 4 + len.max(0) as usize;
                if self.carry.len() < at {
                    return Ok(());
                }
            }
            let mut tuple = self.carry.split_to(at).freeze();
            tuple.advance(2);
            message(out, b'd', |o| {
                o.put_i16(n);
                for i in 0..n as usize {
                    let len = tuple.get_i32();
                    if len < 0 {
                        o.put_i32(-1);
                        continue;
                    }
                    let raw = tuple.split_to(len as usize);
                    // Binary COPY carries no types: a column rule withholds the value, and so
                    // does a detector's hit on the text inside it (or on an 8-byte integer
                    // read as a number), since a binary value cannot carry "****".
                    if self.plan.rule(i).is_some() {
                        stats.values += 1;
                        stats.by_column_rule += 1;
                        o.put_i32(-1);
                    } else if masker.has_detectors() && binary_hit(&raw, masker, stats) {
                        o.put_i32(-1);
                    } else {
                        o.put_i32(len);
                        o.extend_from_slice(&raw);
                    }
                }
            });
        }
    }
}

/// Splits a text-format COPY row at unescaped delimiters (`\\<delimiter>` is data).
fn split_text(line: &[u8], delimiter: u8) -> Vec<Vec<u8>> {
    let mut fields = Vec::new();
    let mut current = Vec::new();
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if b == b'\\' && i + 1 < line.len() {
            current.extend_from_slice(&line[i..i + 2]);
            i += 2;
            continue;
        }
        if b == delimiter {
            fields.push(std::mem::take(&mut current));
        } else {
            current.push(b);
        }
        i += 1;
    }
    fields.push(current);
    fields
}

fn unescape_text(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 1 < field.len() {
            let c = field[i + 1];
            i += 2;
            match c {
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut v = u32::from(c - b'0');
                    let mut k = 0;
                    while k < 2 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                        v = v * 8 + u32::from(field[i] - b'0');
                        i += 1;
                        k += 1;
                    }
                    out.push(v as u8);
                }
                b'x' => {
                    let mut v = 0u32;
                    let mut k = 0;
                    while k < 2 && i < field.len() && field[i].is_ascii_hexdigit() {
                        v = v * 16 + (field[i] as char).to_digit(16).unwrap_or(0);
                        i += 1;
                        k += 1;
                    }
                    out.push(v as u8);
                }
                other => out.push(other),
            }
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn escape_text(value: &str, delimiter: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' if delimiter == b'\t' => out.extend_from_slice(b"\\t"),
            d if d == delimiter => {
                out.push(b'\\');
                out.push(d);
            }
            other => out.push(other),
        }
    }
    out
}

fn split_csv(line: &[u8], delimiter: u8, quote: u8) -> Vec<Vec<u8>> {
    let mut fields = Vec::new();
    let mut current = Vec::new();
    let mut in_quotes = false;
    for &b in line {
        if b == quote {
            in_quotes = !in_quotes;
            current.push(b);
        } else if b == delimiter && !in_quotes {
            fields.push(std::mem::take(&mut current));
        } else {
            current.push(b);
        }
    }
    fields.push(current);
    fields
}

fn unquote_csv(field: &[u8], quote: u8) -> String {
    if field.first() == Some(&quote) && field.len() >= 2 && field.last() == Some(&quote) {
        let inner = &field[1..field.len() - 1];
        let mut out = Vec::with_capacity(inner.len());
        let mut i = 0;
        while i < inner.len() {
            if inner[i] == quote && i + 1 < inner.len() && inner[i + 1] == quote {
                out.push(quote);
                i += 2;
            } else {
                out.push(inner[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    } else {
        String::from_utf8_lossy(field).into_owned()
    }
}

fn quote_csv(value: &str, quote: u8) -> Vec<u8> {
    let mut out = vec![quote];
    for &b in value.as_bytes() {
        if b == quote {
            out.push(quote);
        }
        out.push(b);
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Access, inspect::rules::MaskRule, postgres::wire::FrameReader};

    fn masker() -> Masker {
        let rules = [
            MaskRule {
                columns: vec!["*.email".into()],
                detectors: vec![],
                strategy: Strategy::Partial,
                exempt_identities: vec![],
            },
            MaskRule {
                columns: vec![],
                detectors: vec![Detector::Card, Detector::Ssn],
                strategy: Strategy::Redact,
                exempt_identities: vec![],
            },
        ];
        Masker::new(&rules, None, "bot", Access::Read, [1; 32]).unwrap()
    }

    fn row(values: &[Option<&[u8]>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
        b.freeze()
    }

    async fn decode(out: &BytesMut) -> Vec<Option<String>> {
        let mut r = FrameReader::new(&out[..], super::super::wire::server_cap);
        let f = r.next().await.unwrap().unwrap();
        let mut b = f.body;
        let n = b.get_i16();
        (0..n)
            .map(|_| {
                let len = b.get_i32();
                (len >= 0).then(|| String::from_utf8_lossy(&b.split_to(len as usize)).into_owned())
            })
            .collect()
    }

    fn cols() -> Vec<Column> {
        vec![
            Column {
                name: "email".into(),
                table_oid: 1,
                attnum: 1,
                type_oid: 25,
                format: 0,
            },
            Column {
                name: "note".into(),
                table_oid: 1,
                attnum: 1,
                type_oid: 25,
                format: 0,
            },
            Column {
                name: "id".into(),
                table_oid: 1,
                attnum: 1,
                type_oid: 20,
                format: 0,
            },
        ]
    }

    /// Every column is `public.users.<its output name>`.
    fn users(c: &Column) -> Origin {
        Origin::Column("public".into(), "users".into(), c.name.clone())
    }

    #[test]
    fn rules_follow_the_real_column_and_derived_values() {
        let m = masker();
        let col = |name: &str, table_oid: u32, attnum: i16| Column {
            name: name.into(),
            table_oid,
            attnum,
            type_oid: 25,
            format: 0,
        };
        let cols = [
            // `SELECT email AS contact`: the rule follows the real column.
            col("contact", 1, 3),
            // `SELECT lower(email)`: derived, masked by the statement's references.
            col("lower", 0, 0),
            // `SELECT 'x' AS email`: derived, but named like a masked column.
            col("email", 0, 0),
            // A column the catalog could not name: withheld.
            col("mystery", 2, 1),
            col("note", 1, 6),
        ];
        let origin = |c: &Column| match (c.table_oid, c.attnum) {
            (0, _) => Origin::Derived,
            (1, 3) => Origin::Column("public".into(), "users".into(), "email".into()),
            (1, _) => Origin::Column("public".into(), "users".into(), c.name.clone()),
            _ => Origin::Unknown,
        };
        let plan = Plan::new(&cols, &m, &origin, Some(Strategy::Redact));
        let rules: Vec<_> = (0..cols.len()).map(|i| plan.rule(i)).collect();
        assert_eq!(
            rules,
            [
                Some(Strategy::Partial),
                Some(Strategy::Redact),
                Some(Strategy::Partial),
                Some(Strategy::Redact),
                None
            ]
        );
        // With no masked references, a derived column passes.
        let plan = Plan::new(&cols, &m, &origin, None);
        assert_eq!(plan.rule(1), None);
    }

    #[tokio::test]
    async fn text_rows() {
        let m = masker();
        let plan = Plan::new(&cols(), &m, &users, None);
        let mut stats = Masked::default();
        let mut out = BytesMut::new();
        let body = row(&[
            Some(b"jane@example.com"),
            Some(b"card 4111 1111 1111 1111"),
            None,
        ]);
        mask_data_row(&body, &plan, &m, &mut stats, &mut out).unwrap();
        assert_eq!(
            decode(&out).await,
            vec![
                Some("j***@example.com".into()),
                Some("card ****".into()),
                None
            ]
        );
        assert_eq!(stats.values, 2);
    }

    #[tokio::test]
    async fn text_inside_binary_structures_and_bytea_is_scanned() {
        let m = masker();
        let col = |name: &str, type_oid: u32, format: i16| Column {
            name: name.into(),
            table_oid: 0,
            attnum: 0,
            type_oid,
            format,
        };
        // text[] and a record in binary, bytea in binary and in text (hex).
        let cols = [
            col("array_agg", 1009, 1),
            col("row", 2249, 1),
            col("convert_to", 17, 1),
            col("convert_to", 17, 0),
            col("harmless", 1009, 1),
        ];
        let plan = Plan::new(&cols, &m, &|_| Origin::Derived, None);
        let mut array = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 25, 0, 0, 0, 1, 0, 0, 0, 1];
        array.extend_from_slice(&19i32.to_be_bytes());
        array.extend_from_slice(b"4111 1111 1111 1111");
        let mut record = vec![0, 0, 0, 1, 0, 0, 0, 25];
        record.extend_from_slice(&11i32.to_be_bytes());
        record.extend_from_slice(b"123-45-6789");
        let hex: String = b"4111 1111 1111 1111"
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let hex = format!("\\x{hex}");
        let mut plain = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 25, 0, 0, 0, 1, 0, 0, 0, 1];
        plain.extend_from_slice(&5i32.to_be_bytes());
        plain.extend_from_slice(b"hello");
        let body = row(&[
            Some(&array),
            Some(&record),
            Some(b"4111 1111 1111 1111"),
            Some(hex.as_bytes()),
            Some(&plain),
        ]);
        let mut stats = Masked::default();
        let mut out = BytesMut::new();
        mask_data_row(&body, &plan, &m, &mut stats, &mut out).unwrap();
        let got = decode(&out).await;
        assert_eq!(got[..4], [None, None, None, None], "{got:?}");
        assert!(got[4].as_deref().is_some_and(|v| v.contains("hello")));
        assert_eq!(stats.withheld, 4);
    }

    #[test]
    fn masked_json_stays_json() {
        let m = masker();
        /// Type, format, a users.email column (else derived), value, what is sent, withheld.
        type Case = (u32, i16, bool, &'static [u8], Option<&'static [u8]>, u64);
        let cases: [Case; 7] = [
            // A detector's mask inside a JSON string; binary jsonb keeps its version byte.
            (
                JSONB,
                1,
                false,
                b"\x01{\"card\": \"4111 1111 1111 1111\"}",
                Some(b"\x01{\"card\": \"****\"}"),
                0,
            ),
            (
                JSONB,
                1,
                false,
                b"\x01{\"n\": 1}",
                Some(b"\x01{\"n\": 1}"),
                0,
            ),
            // A card number that is a JSON number cannot be masked in place: withheld.
            (
                JSONB,
                1,
                false,
                b"\x01{\"card\": 4111111111111111}",
                None,
                1,
            ),
            (JSON, 0, false, b"{\"card\": 4111111111111111}", None, 1),
            (JSON, 0, false, b"[\"123-45-6789\"]", Some(b"[\"****\"]"), 0),
            // A column rule's mask is sent as a JSON string.
            (
                JSON,
                0,
                true,
                b"\"jane@example.com\"",
                Some(br#""\"***\"""#),
                0,
            ),
            (JSONB, 1, true, b"\x01{\"a\": 1}", Some(b"\x01\"{***}\""), 0),
        ];
        for (type_oid, format, column, value, sent, withheld) in cases {
            let cols = [Column {
                name: if column { "email" } else { "doc" }.into(),
                table_oid: u32::from(column),
                attnum: if column { 3 } else { 0 },
                type_oid,
                format,
            }];
            let origin = |c: &Column| {
                if c.table_oid == 1 {
                    users(c)
                } else {
                    Origin::Derived
                }
            };
            let plan = Plan::new(&cols, &m, &origin, None).with_formats(&[format]);
            let mut stats = Masked::default();
            let mut out = BytesMut::new();
            mask_data_row(&row(&[Some(value)]), &plan, &m, &mut stats, &mut out).unwrap();
            let mut want = BytesMut::new();
            message(&mut want, b'D', |o| {
                o.put_i16(1);
                match sent {
                    Some(sent) => {
                        o.put_i32(sent.len() as i32);
                        o.extend_from_slice(sent);
                    }
                    None => o.put_i32(-1),
                }
            });
            assert_eq!(out, want, "{:?}", String::from_utf8_lossy(value));
            assert_eq!(
                stats.withheld,
                withheld,
                "{:?}",
                String::from_utf8_lossy(value)
            );
            if let Some(sent) = sent {
                let text = &sent[usize::from(format == 1)..];
                assert!(
                    serde_json::from_slice::<serde_json::Value>(text).is_ok(),
                    "{:?}",
                    String::from_utf8_lossy(text)
                );
            }
        }
    }

    #[tokio::test]
    async fn binary_rows() {
        let m = masker();
        let plan = Plan::new(&cols(), &m, &users, None).with_formats(&[1]);
        let mut stats = Masked::default();
        let mut out = BytesMut::new();
        let card = 4111111111111111i64.to_be_bytes();
        let body = row(&[
            Some(b"jane@example.com"),
            Some(b"ssn 123-45-6789"),
            Some(&card),
        ]);
        mask_data_row(&body, &plan, &m, &mut stats, &mut out).unwrap();
        assert_eq!(
            decode(&out).await,
            vec![
                Some("j***@example.com".into()),
                Some("ssn ****".into()),
                None
            ]
        );
    }

    #[test]
    fn copy_text_and_csv() {
        let m = masker();
        let plan = Plan::for_names(&["email".into(), "note".into()], "public", "users", &m);
        let mut stats = Masked::default();
        let mut out = BytesMut::new();
        let mut copy = CopyMasker::new(
            CopyFormat::Text {
                delimiter: b'\t',
                header: false,
            },
            plan.clone(),
            None,
        );
        // A row split across two messages, then a NULL.
        copy.feed(b"jane@example.com\tss", &m, &mut stats, &mut out)
            .unwrap();
        assert!(out.is_empty());
        copy.feed(b"n 123-45-6789\n\\N\tx\n", &m, &mut stats, &mut out)
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("j***@example.com\tssn ****\n"), "{text:?}");
        assert!(text.contains("\\N\tx\n"), "{text:?}");

        let mut out = BytesMut::new();
        let mut csv = CopyMasker::new(
            CopyFormat::Csv {
                delimiter: b',',
                quote: b'"',
                header: true,
            },
            plan,
            None,
        );
        csv.feed(
            b"email,note\n\"jane@example.com\",\"a,\"\"b\"\" 4111111111111111\"\n",
            &m,
            &mut stats,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("email,note\n"), "{text:?}");
        assert!(
            text.contains("\"j***@example.com\",\"a,\"\"b\"\" ****\"\n"),
            "{text:?}"
        );
    }

    #[test]
    fn copy_text_escaped_delimiters_and_field_counts() {
        let m = masker();
        let plan = Plan::for_names(&["note".into(), "email".into()], "public", "users", &m);
        let mut stats = Masked::default();
        let mut out = BytesMut::new();
        let format = CopyFormat::Text {
            delimiter: b'\t',
            header: false,
        };
        let mut copy = CopyMasker::new(format, plan.clone(), None);
        // `a\tb` is one field holding a tab: the email is still the second field.
        copy.feed(b"a\\tb\\\\\tjane@example.com\n", &m, &mut stats, &mut out)
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("a\\tb\\\\\tj***@example.com\n"), "{text:?}");
        // A row with a field too many cannot be mapped to the columns: refused.
        let mut copy = CopyMasker::new(format, plan, None);
        assert!(
            copy.feed(
                b"a\tb\tjane@example.com\n",
                &m,
                &mut stats,
                &mut BytesMut::new()
            )
            .is_err()
        );
    }

    #[tokio::test]
    async fn masked_typed_text_values_become_null() {
        let m = masker();
        let col = |name: &str, type_oid: u32| Column {
            name: name.into(),
            table_oid: 1,
            attnum: 1,
            type_oid,
            format: 0,
        };
        // An integer column under a rule, and a bigint holding a card number.
        let cols = [col("email", 23), col("id", 20)];
        let plan = Plan::new(&cols, &m, &users, None);
        let mut out = BytesMut::new();
        let body = row(&[Some(b"42"), Some(b"4111111111111111")]);
        let mut stats = Masked::default();
        mask_data_row(&body, &plan, &m, &mut stats, &mut out).unwrap();
        assert_eq!(decode(&out).await, vec![None, None]);
        assert_eq!(
            stats.withheld, 2,
            "both are counted for the statement's NOTICE"
        );
        // A bigint that is no card stays, and counts nothing.
        let mut out = BytesMut::new();
        let mut stats = Masked::default();
        let ids = Plan::new(&[col("id", 20)], &m, &users, None);
        mask_data_row(
            &row(&[Some(b"4111111111111112")]),
            &ids,
            &m,
            &mut stats,
            &mut out,
        )
        .unwrap();
        assert_eq!(stats.withheld, 0);
        // A row with another column count than its description is refused.
        let body = row(&[Some(b"42")]);
        assert!(mask_data_row(&body, &plan, &m, &mut Masked::default(), &mut out).is_err());
    }

    #[test]
    fn server_messages_withhold_echoed_values_under_column_rules() {
        let m = masker();
        let mut fields = vec![
            (b'S', "ERROR".to_owned()),
            (b'C', "22P02".to_owned()),
            (
                b'M',
                "invalid input syntax for type integer: \"jane@example.com\"".to_owned(),
            ),
            (
                b'D',
                "Key (email)=(jane@example.com) already exists.".to_owned(),
            ),
        ];
        assert!(mask_fields(&mut fields, &m, "", &mut Masked::default()));
        assert_eq!(
            fields,
            vec![
                (b'S', "ERROR".to_owned()),
                (b'C', "22P02".to_owned()),
                (
                    b'M',
                    "invalid input syntax for type integer: \"****\"".to_owned()
                ),
            ]
        );
        let mut raised = vec![
            (b'C', "P0001".to_owned()),
            (b'M', "secret salary 120000".to_owned()),
        ];
        mask_fields(&mut raised, &m, "", &mut Masked::default());
        assert!(raised[1].1.contains("withheld"), "{raised:?}");
    }

    #[test]
    fn quoted_parts_the_client_did_not_write_are_redacted() {
        let m = masker();
        let sql = "SELECT ssn::regclass, nosuchcol FROM users";
        for (message, want) in [
            (
                "relation \"123-45-6789\" does not exist",
                "relation \"****\" does not exist",
            ),
            (
                "column \"nosuchcol\" does not exist",
                "column \"nosuchcol\" does not exist",
            ),
            (
                "unrecognized configuration parameter \"jane@example.com\"",
                "unrecognized configuration parameter \"****\"",
            ),
            (
                "role \"a\" and \"users\" and \"b",
                "role \"****\" and \"users\" and \"****",
            ),
        ] {
            let mut fields = vec![(b'C', "42P01".to_owned()), (b'M', message.to_owned())];
            mask_fields(&mut fields, &m, sql, &mut Masked::default());
            assert_eq!(fields[1].1, want);
        }
    }

    /// A workload can make the server quote a part per input character: the search is
    /// bounded, and what is past the bound is redacted, never passed.
    #[test]
    fn many_quoted_parts_cost_a_bounded_search_and_pass_nothing_unchecked() {
        let written = format!("SELECT 'abc' {}", "x".repeat(60_000));
        let text = "\"abc\" \"x\" ".repeat(100_000);
        let out = redact_quoted(&text, &written).unwrap();
        let parts: Vec<&str> = out.split('"').skip(1).step_by(2).collect();
        assert_eq!(parts.len(), 200_000);
        // Before the bound, the statement decides ("abc" is written, "x" is not a word
        // of it); after it, everything is redacted.
        assert_eq!(&parts[..4], ["abc", "****", "abc", "****"]);
        assert!(parts.iter().all(|p| *p == "abc" || *p == "****"));
        assert_eq!(parts.last(), Some(&"****"));
        let searched = parts.iter().filter(|p| **p == "abc").count() * 2;
        assert!(searched * written.len() <= QUOTED_SEARCH_BUDGET + 2 * written.len());
    }

    #[test]
    fn error_fields() {
        let m = masker();
        let mut fields = vec![
            (b'M', "duplicate key value".to_owned()),
            (
                b'D',
                "Key (card)=(4111111111111111) already exists.".to_owned(),
            ),
        ];
        let mut stats = Masked::default();
        assert!(mask_fields(&mut fields, &m, "", &mut stats));
        // Column rules are configured: the detail, which echoes the row, is withheld.
        assert_eq!(fields, vec![(b'M', "duplicate key value".to_owned())]);
    }
}
