//! Masking: content detectors and the strategies that replace what they find.
//!
//! Column rules mask a whole value by the column's name; detectors find sensitive substrings
//! in any text (emails, Luhn-valid card numbers, US SSNs, phone numbers, IBANs, AWS access
//! keys, JWTs, PEM private keys, bearer tokens). One pass over a value's bytes ([`possible`])
//! rules out every detector that cannot match it (no `@`: no email; fewer than 13 digits: no
//! card...), so the common case (nothing sensitive) runs no regex at all. Emails, card
//! numbers and SSNs, the kinds most often in results, have matchers written to their patterns
//! (each tested against its regex); the regexes of the other detectors left run only then. A
//! masked value is written to a [`Sink`]: on the data path, the DataRow being built.

use std::{borrow::Cow, sync::LazyLock};

use hmac::{Hmac, Mac as _};
use memchr::{memchr_iter, memchr2_iter, memmem};
use regex::{Regex, RegexSet};
use sha2::Sha256;
use smallvec::SmallVec;

use super::{
    glob::glob,
    rules::{Detector, MaskRule, Strategy},
};
use crate::config::Access;

/// Detectors in the order their matches win when they overlap (most specific first).
const ORDER: [Detector; 9] = [
    Detector::PrivateKey,
    Detector::Jwt,
    Detector::Bearer,
    Detector::AwsKey,
    Detector::Email,
    Detector::Iban,
    Detector::Card,
    Detector::Ssn,
    Detector::Phone,
];

fn pattern(d: Detector) -> &'static str {
    match d {
        Detector::PrivateKey => {
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?s:.*?)(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\z)"
        }
        Detector::Jwt => r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}",
        Detector::Bearer => r"(?i)\bbearer[ \t]+[A-Za-z0-9._~+/-]{8,}=*",
        Detector::AwsKey => r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b",
        Detector::Email => r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
        Detector::Iban => r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
        Detector::Card => r"\b(?:[0-9][ -]?){12,18}[0-9]\b",
        Detector::Ssn => r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b",
        Detector::Phone => {
            r"(?:\+[0-9]{1,3}[ .-]?(?:\(?[0-9]{1,4}\)?[ .-]?){2,4}[0-9]{2,4}|\(?\b[0-9]{3}\)?[ .-][0-9]{3}[ .-][0-9]{4}\b)"
        }
    }
}

struct Compiled {
    set: RegexSet,
    each: Vec<(Detector, Regex)>,
}

static COMPILED: LazyLock<Compiled> = LazyLock::new(|| Compiled {
    set: RegexSet::new(ORDER.map(pattern)).expect("detector patterns compile"),
    each: ORDER
        .iter()
        .map(|d| {
            (
                *d,
                Regex::new(pattern(*d)).expect("detector pattern compiles"),
            )
        })
        .collect(),
});

const fn bit(d: Detector) -> u16 {
    1 << d as u16
}

/// Byte classes for [`possible`], as counters packed in a `u64`, one byte each: adding a
/// byte's entry counts it in every class it belongs to, one load and one add per byte.
const DIGIT: u32 = 0;
const UPPER: u32 = 8;
const AT: u32 = 16;
const DASH: u32 = 24;
const HIGH: u32 = 32;
/// `b` or `B`, the start of `bearer` in any case.
const B: u32 = 40;
/// `J`, as in the `eyJ` that starts a JWT's header and payload.
const J: u32 = 48;
/// `a` or `A`, the third letter of `bearer` (most values with a `b` have no `a`).
const A: u32 = 56;

static CLASS: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        // A byte's broad class, then the letters counted on their own.
        t[i] = match b {
            b'0'..=b'9' => 1 << DIGIT,
            b'A'..=b'Z' => 1 << UPPER,
            b'@' => 1 << AT,
            b'-' => 1 << DASH,
            0x80.. => 1 << HIGH,
            _ => 0,
        } | match b {
            b'b' | b'B' => 1 << B,
            b'J' => 1 << J,
            b'a' | b'A' => 1 << A,
            _ => 0,
        };
        i += 1;
    }
    t
};

/// How many bytes of each class `bytes` holds, indexed by class shift / 8. (Sixteen bytes at
/// a time with SSE2 was slower: values are short, and eight classes cost more to reduce from
/// vector lanes than the table's one load and one add per byte.)
fn census(bytes: &[u8]) -> [usize; 8] {
    let mut counts = [0usize; 8];
    // A byte-wide counter holds 255 at most: sum chunks of that size, then spill.
    for chunk in bytes.chunks(255) {
        let mut acc = 0u64;
        for &b in chunk {
            acc += CLASS[usize::from(b)];
        }
        for (i, c) in counts.iter_mut().enumerate() {
            *c += ((acc >> (i * 8)) & 0xff) as usize;
        }
    }
    counts
}

/// Whether `AB12` (two capitals, then two digits) occurs: how an IBAN starts.
fn iban_start(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| {
        w[0].is_ascii_uppercase()
            && w[1].is_ascii_uppercase()
            && w[2].is_ascii_digit()
            && w[3].is_ascii_digit()
    })
}

/// Whether an AWS access key prefix (`AKIA`, `ASIA`, ...) occurs.
fn aws_prefix(bytes: &[u8]) -> bool {
    const PREFIXES: [&[u8; 4]; 8] = [
        b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"ANPA", b"ANVA", b"AIPA",
    ];
    memchr_iter(b'A', bytes).any(|i| {
        bytes
            .get(i..i + 4)
            .is_some_and(|w| PREFIXES.iter().any(|p| w == p.as_slice()))
    })
}

/// Whether `bearer` occurs in any ASCII case.
fn has_bearer(bytes: &[u8]) -> bool {
    memchr2_iter(b'b', b'B', bytes).any(|i| {
        bytes
            .get(i..i + 6)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"bearer"))
    })
}

/// The detectors that could confirm a match somewhere in `value`, from necessary conditions
/// of their patterns and of [`confirm`]: one branch-free pass counts the bytes of each class
/// ([`census`]), and only the conditions those counts leave open look further. Never leaves
/// out a detector that would match (the tests compare against running every regex).
fn possible(bytes: &[u8]) -> u16 {
    let counts = census(bytes);
    let count = |class: u32| counts[class as usize / 8];
    let (digits, upper) = (count(DIGIT), count(UPPER));
    let len = bytes.len();
    let mut set = 0;
    // `-----BEGIN PRIVATE KEY-----` at the least (15 capitals, 10 dashes).
    if len >= 27
        && count(DASH) >= 10
        && upper >= 15
        && memmem::find(bytes, b"-----BEGIN ").is_some()
    {
        set |= bit(Detector::PrivateKey);
    }
    // Two `eyJ` segments and a signature: 20 bytes at the least.
    if len >= 20 && count(J) >= 2 && memmem::find(bytes, b"eyJ").is_some() {
        set |= bit(Detector::Jwt);
    }
    // `bearer` in any case (a `b` and an `a` at the least), a blank and 8 token bytes; the
    // regex folds case by Unicode rules, so any non-ASCII text keeps it in.
    if len >= 15 && (count(HIGH) > 0 || (count(B) > 0 && count(A) > 0 && has_bearer(bytes))) {
        set |= bit(Detector::Bearer);
    }
    // A prefix (AKIA, ASIA, ...) and 16 more capitals or digits (SQL keywords alone supply
    // the capitals, so a statement's text needs the prefix check).
    if len >= 20 && upper >= 4 && upper + digits >= 20 && aws_prefix(bytes) {
        set |= bit(Detector::AwsKey);
    }
    if count(AT) > 0 {
        set |= bit(Detector::Email);
    }
    // Country code, check digits, and at least 15 capitals and digits in all.
    if upper >= 2 && digits >= 2 && upper + digits >= 15 && iban_start(bytes) {
        set |= bit(Detector::Iban);
    }
    if digits >= 13 {
        set |= bit(Detector::Card);
    }
    if digits >= 9 {
        set |= bit(Detector::Phone);
        if count(DASH) > 0 {
            set |= bit(Detector::Ssn);
        }
    }
    set
}

/// Whether the ASCII digits of `m` (other bytes skipped) are 13 to 19 that pass the Luhn
/// check: one pass from the last digit, every second one doubled (by table).
fn luhn_card(m: &str) -> bool {
    const DOUBLED: [u32; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
    let (mut n, mut sum) = (0usize, 0u32);
    for b in m.bytes().rev() {
        if b.is_ascii_digit() {
            let v = usize::from(b - b'0');
            sum += if n % 2 == 1 { DOUBLED[v] } else { v as u32 };
            n += 1;
        }
    }
    (13..=19).contains(&n) && sum.is_multiple_of(10)
}

fn iban_valid(s: &str) -> bool {
    let compact: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem = 0u32;
    for &b in rearranged {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Where the `@` is when `bytes` is one email, whole, as the detector's pattern reads it
/// (its match from the first byte runs to the last): local-part characters, `@`, labels of
/// `[A-Za-z0-9-]` joined by single dots, the last of two or more letters. A column's
/// partial mask keeps what follows the `@` only then: a value with anything else beside an
/// email is masked as any other text, so nothing but the email's domain passes in clear.
/// (A test checks it against the regex.)
fn whole_email(bytes: &[u8]) -> Option<usize> {
    let at = memchr::memchr(b'@', bytes)?;
    let local = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let label = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-';
    if at == 0 || !bytes[..at].iter().all(local) {
        return None;
    }
    let mut labels = bytes[at + 1..].split(|b| *b == b'.');
    let last = labels.next_back()?;
    let mut before = 0;
    for l in labels {
        if l.is_empty() || !l.iter().all(label) {
            return None;
        }
        before += 1;
    }
    (before > 0 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)).then_some(at)
}

/// A partial mask for an email, whole: its first character, `***@`, and its domain
/// (`j***@example.com`). `false`, with nothing written, when `value` is not one email.
fn partial_email_into(value: &str, out: &mut impl Sink) -> bool {
    let Some(at) = whole_email(value.as_bytes()) else {
        return false;
    };
    out.put_str(&value[..1]);
    out.put_str("***@");
    out.put_str(&value[at + 1..]);
    true
}

/// The next match of the email pattern at or after `from`, as the regex finds it (leftmost
/// first, then the longest the pattern's greedy parts prefer), without running it: emails are
/// in many results, and the regex's forward and reverse passes cost more than the rest of
/// such a row's masking. A test compares it with the regex.
///
/// A match is the run of local-part characters before an `@` (no `@` is one, so each `@`
/// has its own run), then labels of `[A-Za-z0-9-]` joined by single dots, up to the letters
/// that start the last label after a dot with two or more of them.
fn email_at(value: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = value.as_bytes();
    let local =
        |b: &&u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-');
    let label = |b: &&u8| b.is_ascii_alphanumeric() || **b == b'-';
    memchr_iter(b'@', bytes.get(from..)?)
        .map(|i| from + i)
        .find_map(|at| {
            let start = at - bytes[from..at].iter().rev().take_while(local).count();
            if start == at {
                return None;
            }
            let mut end = None;
            let mut p = at + 1;
            let mut first = true;
            loop {
                let n = bytes[p..].iter().take_while(label).count();
                if n == 0 {
                    break;
                }
                if !first {
                    // A label after a dot: its leading letters can end the match.
                    let letters = bytes[p..p + n]
                        .iter()
                        .take_while(|b| b.is_ascii_alphabetic())
                        .count();
                    if letters >= 2 {
                        end = Some(p + letters);
                    }
                }
                first = false;
                p += n;
                if bytes.get(p) != Some(&b'.') {
                    break;
                }
                p += 1;
            }
            end.map(|end| (start, end))
        })
}

/// The next match of the card pattern (`\b(?:[0-9][ -]?){12,18}[0-9]\b`) at or after
/// `from`, as the regex finds it (leftmost first, the most digits preferred), without
/// running it: cards are in many results, and the regex's forward and reverse passes cost
/// more than the rest of a row's masking. A test compares it with the regex.
///
/// A match starts at a digit with no word character before it and follows one chain of
/// digits, each next to the one before or one blank or dash away; it ends after the 19th,
/// 18th, ... 13th digit of the chain, the first of those with no word character after it.
fn card_at(value: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = value.as_bytes();
    let mut s = from;
    while s < bytes.len() {
        s += bytes[s..].iter().position(u8::is_ascii_digit)?;
        if !word_before(value, s) {
            // Along the chain's digits, up to the 19 a match holds at the most, the last end
            // from the 13th digit on with no word character after it.
            let mut end = None;
            let mut p = s;
            for n in 1..=19 {
                if n >= 13 && !word_at(value, p + 1) {
                    end = Some(p + 1);
                }
                p = match bytes.get(p + 1) {
                    Some(b) if b.is_ascii_digit() => p + 1,
                    Some(b' ' | b'-') if bytes.get(p + 2).is_some_and(u8::is_ascii_digit) => p + 2,
                    _ => break,
                };
            }
            if let Some(end) = end {
                return Some((s, end));
            }
        }
        s += 1;
    }
    None
}

/// The next match of the SSN pattern (`\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b`) at or after `from`,
/// as the regex finds it, without running it: a dash and nine digits are common in notes and
/// dates, and the regex's forward and reverse passes cost more than the rest of such a row's
/// masking. A match has one length, so the leftmost is the first dash that sits fourth in a
/// match. A test compares it with the regex.
fn ssn_at(value: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = value.as_bytes();
    let digits = |at: usize, n: usize| {
        bytes
            .get(at..at + n)
            .is_some_and(|d| d.iter().all(u8::is_ascii_digit))
    };
    let dashes = memchr_iter(b'-', bytes.get(from + 3..)?);
    // The first dash at `from + 3 + i`: the match would start at `from + i`.
    dashes.map(|i| from + i).find_map(|s| {
        (digits(s, 3)
            && digits(s + 4, 2)
            && bytes.get(s + 6) == Some(&b'-')
            && digits(s + 7, 4)
            && !word_before(value, s)
            && !word_at(value, s + 11))
        .then_some((s, s + 11))
    })
}

/// Whether the character ending at byte `at` of `value` is a word character (`\w` as the
/// regex crate's Unicode `\b` sees it); `false` at the start.
fn word_before(value: &str, at: usize) -> bool {
    match value.as_bytes()[..at].last() {
        Some(b) if b.is_ascii() => b.is_ascii_alphanumeric() || *b == b'_',
        _ => value[..at].chars().next_back().is_some_and(is_word),
    }
}

/// Whether the character starting at byte `at` of `value` is a word character; `false` at
/// the end.
fn word_at(value: &str, at: usize) -> bool {
    match value.as_bytes().get(at) {
        Some(b) if b.is_ascii() => b.is_ascii_alphanumeric() || *b == b'_',
        _ => value[at..].chars().next().is_some_and(is_word),
    }
}

/// `\w` as the regex crate's Unicode mode defines it (ASCII answered without its tables).
fn is_word(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        regex_syntax::is_word_character(c)
    }
}

/// The digits a match of `d` holds at the least, for the detectors built on digits.
fn min_digits(d: Detector) -> Option<usize> {
    match d {
        Detector::Card => Some(13),
        Detector::Ssn | Detector::Phone => Some(9),
        _ => None,
    }
}

/// How many ASCII digits `s` holds.
fn digit_count(s: &str) -> usize {
    tally(s.len());
    s.bytes().filter(u8::is_ascii_digit).count()
}

#[cfg(test)]
thread_local! {
    /// The steps [`Masker::find`]'s own bookkeeping took on this thread (searches, cursor
    /// steps, digits counted): what the hostile-value tests hold to the value's length.
    static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts `n` steps of bookkeeping in tests; nothing otherwise.
#[inline(always)]
fn tally(n: usize) {
    #[cfg(test)]
    WORK.with(|w| w.set(w.get() + n));
    #[cfg(not(test))]
    let _ = n;
}

/// Whether `value` holds at least `need` digits outside the `found` spans; the bytes left
/// outside them are counted first, which is often answer enough (a card number that is the
/// whole value leaves nothing for a phone number). `digits` is the value's digit count,
/// counted here the first time a detector asks.
fn digits_outside(value: &str, found: &[Found], need: usize, digits: &mut Option<usize>) -> bool {
    let covered: usize = found.iter().map(|(start, end, _, _)| end - start).sum();
    if value.len() - covered < need {
        return false;
    }
    let total = *digits.get_or_insert_with(|| digit_count(value));
    total
        - found
            .iter()
            .map(|(start, end, _, _)| digit_count(&value[*start..*end]))
            .sum::<usize>()
        >= need
}

/// Extra checks a regex cannot express.
fn confirm(d: Detector, m: &str) -> bool {
    match d {
        Detector::Card => luhn_card(m),
        Detector::Ssn => {
            let (area, rest) = m.split_at(3);
            area != "000"
                && area != "666"
                && !area.starts_with('9')
                && &rest[1..3] != "00"
                && &rest[4..] != "0000"
        }
        Detector::Iban => iban_valid(m),
        Detector::Phone => digit_count(m) >= 9,
        _ => true,
    }
}

/// A detector's match: byte span, detector, and the strategy that masks it.
type Found = (usize, usize, Detector, Strategy);

/// What masking does to one value.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    Keep,
    Replace(Cow<'a, str>),
    Null,
}

/// What masking did to one value written to a [`Sink`]: the masked text is in the sink only
/// when `Replaced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Keep,
    Replaced,
    Null,
}

impl Written {
    fn outcome(self, out: String) -> Outcome<'static> {
        match self {
            Self::Keep => Outcome::Keep,
            Self::Null => Outcome::Null,
            Self::Replaced => Outcome::Replace(Cow::Owned(out)),
        }
    }
}

/// Where masked text goes: a `String`, or the PostgreSQL message being built (so a masked
/// value is written once, where it will be sent, with no string of its own per value).
pub trait Sink {
    fn put_str(&mut self, s: &str);

    fn put_char(&mut self, c: char) {
        self.put_str(c.encode_utf8(&mut [0; 4]));
    }
}

impl Sink for String {
    fn put_str(&mut self, s: &str) {
        self.push_str(s);
    }
}

impl Sink for bytes::BytesMut {
    fn put_str(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
}

/// The matches in one value: few, so kept inline (no allocation per masked value).
type Matches = SmallVec<[Found; 4]>;

/// Per-session masking state: the rules that apply to this identity and grant, and the key
/// for stable pseudonyms.
#[derive(Clone)]
pub struct Masker {
    columns: Vec<(Vec<String>, Strategy)>,
    /// Each detector's strategy (by `Detector as usize`), `None` where it is off.
    strategies: [Option<Strategy>; 9],
    /// The detectors on, as a bit set (see [`bit`]).
    enabled: u16,
    key: [u8; 32],
}

impl Masker {
    /// The masker used on recordings and on what approvers see: every detector, redacting,
    /// whatever the resource's own rules.
    pub fn recorder(key: [u8; 32]) -> Self {
        let rule = MaskRule {
            columns: vec![],
            detectors: Detector::ALL.to_vec(),
            strategy: Strategy::Redact,
            exempt_identities: vec![],
        };
        Self::new(&[rule], None, "", Access::Read, key).expect("a rule with detectors")
    }

    /// The `rules` that apply to `identity` holding `access` (grants at or above
    /// `exempt_access` see clear values); `None` when nothing is masked (the data path then
    /// skips parsing values altogether).
    pub fn new(
        rules: &[MaskRule],
        exempt_access: Option<Access>,
        identity: &str,
        access: Access,
        key: [u8; 32],
    ) -> Option<Self> {
        if exempt_access.is_some_and(|level| access >= level) {
            return None;
        }
        let applies = |r: &&MaskRule| !r.exempt_identities.iter().any(|i| i == identity);
        let mut columns = Vec::new();
        let mut strategies = [None; 9];
        for rule in rules.iter().filter(applies) {
            if !rule.columns.is_empty() {
                columns.push((rule.columns.clone(), rule.strategy));
            }
            // The first rule to name a detector decides its strategy.
            for d in &rule.detectors {
                strategies[*d as usize].get_or_insert(rule.strategy);
            }
        }
        let enabled = Detector::ALL
            .iter()
            .filter(|d| strategies[**d as usize].is_some())
            .fold(0, |set, d| set | bit(*d));
        if columns.is_empty() && enabled == 0 {
            return None;
        }
        Some(Self {
            columns,
            strategies,
            enabled,
            key,
        })
    }

    pub fn has_column_rules(&self) -> bool {
        !self.columns.is_empty()
    }

    pub fn has_detectors(&self) -> bool {
        self.enabled != 0
    }

    pub fn detects(&self, d: Detector) -> bool {
        self.enabled & bit(d) != 0
    }

    /// The column rule for `table.column` (table may be empty when unknown).
    pub fn column_strategy(&self, schema: &str, table: &str, column: &str) -> Option<Strategy> {
        // `schema.table.column` in one buffer; the shorter names are its tails.
        let mut long = String::with_capacity(schema.len() + table.len() + column.len() + 2);
        long.push_str(schema);
        long.push('.');
        let at_table = long.len();
        long.push_str(table);
        long.push('.');
        let at_column = long.len();
        long.push_str(column);
        long.make_ascii_lowercase();
        let (long, short, column) = (&long[..], &long[at_table..], &long[at_column..]);
        self.columns.iter().find_map(|(globs, strategy)| {
            globs
                .iter()
                .any(|g| glob(g, short) || glob(g, long) || glob(g, column))
                .then_some(*strategy)
        })
    }

    /// The column rule for a value with no table: any rule whose column part matches.
    pub fn column_strategy_by_name(&self, column: &str) -> Option<Strategy> {
        let column = column.to_ascii_lowercase();
        self.columns.iter().find_map(|(globs, strategy)| {
            globs
                .iter()
                .any(|g| glob(g.rsplit('.').next().unwrap_or(g), &column))
                .then_some(*strategy)
        })
    }

    /// Writes a stable keyed pseudonym for `value`: `h:` and 12 hex digits.
    fn pseudonym_into(&self, value: &str, out: &mut impl Sink) {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        m.update(value.as_bytes());
        let digest = m.finalize().into_bytes();
        let mut hex = [0u8; 12];
        hex::encode_to_slice(&digest[..6], &mut hex).expect("12 hex digits for 6 bytes");
        out.put_str("h:");
        out.put_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
    }

    /// Masks a whole value under a column rule.
    pub fn apply_column<'a>(&self, strategy: Strategy, value: &'a str) -> Outcome<'a> {
        if strategy == Strategy::Redact {
            return Outcome::Replace(Cow::Borrowed("****"));
        }
        let mut out = String::new();
        self.apply_column_into(strategy, value, &mut out)
            .outcome(out)
    }

    /// [`Masker::apply_column`], the masked value written to `out` (nothing is written
    /// unless [`Written::Replaced`]).
    pub fn apply_column_into(
        &self,
        strategy: Strategy,
        value: &str,
        out: &mut impl Sink,
    ) -> Written {
        match strategy {
            Strategy::Null => return Written::Null,
            Strategy::Redact => out.put_str("****"),
            Strategy::Hash => self.pseudonym_into(value, out),
            Strategy::Partial => {
                if !partial_email_into(value, out) {
                    partial_generic_into(value, out);
                }
            }
        }
        Written::Replaced
    }

    /// Runs the detectors over `value`.
    pub fn scan<'a>(&self, value: &'a str, hits: &mut impl FnMut(Detector)) -> Outcome<'a> {
        let mut out = String::new();
        self.scan_into(value, self.candidates(value.as_bytes()), hits, &mut out)
            .outcome(out)
    }

    /// The detectors that could find something in `raw` (a value's bytes, before any UTF-8
    /// conversion); 0, the common case, means there is nothing to scan. Sound on invalid
    /// UTF-8 as well: a lossy conversion keeps every ASCII byte, and every detector's
    /// necessary conditions are about ASCII bytes (or any non-ASCII byte at all).
    pub fn candidates(&self, raw: &[u8]) -> u16 {
        if self.enabled == 0 {
            return 0;
        }
        possible(raw) & self.enabled
    }

    /// [`Masker::scan`] with only the detectors in `candidates` (from
    /// [`Masker::candidates`]) run, the masked value written to `out` (nothing is written
    /// unless [`Written::Replaced`]): the data path writes it straight into the row it
    /// builds.
    pub fn scan_into(
        &self,
        value: &str,
        candidates: u16,
        hits: &mut impl FnMut(Detector),
        out: &mut impl Sink,
    ) -> Written {
        let found = self.find(value, candidates);
        if found.is_empty() {
            return Written::Keep;
        }
        for (_, _, d, _) in &found {
            hits(*d);
        }
        if found.iter().any(|(_, _, _, s)| *s == Strategy::Null) {
            return Written::Null;
        }
        let mut at = 0;
        for (start, end, d, strategy) in found {
            out.put_str(&value[at..start]);
            let piece = &value[start..end];
            match strategy {
                Strategy::Redact => out.put_str("****"),
                Strategy::Hash => self.pseudonym_into(piece, out),
                Strategy::Partial => partial_into(d, piece, out),
                Strategy::Null => unreachable!("handled above"),
            }
            at = end;
        }
        out.put_str(&value[at..]);
        Written::Replaced
    }

    /// The confirmed, non-overlapping matches of the detectors in `candidates`, found in
    /// priority order (a match overlapping one found before it is dropped), sorted by start.
    ///
    /// Linear in the value's length however many matches it holds: a workload chooses what
    /// its queries return and what its statements say (both are masked), and a value of back
    /// to back card numbers must not cost the agent time quadratic in its size. Each
    /// detector's matches come in order, so the earlier spans one could overlap are found by
    /// a cursor that only moves forward, and the digits left after a match are kept as a
    /// running count rather than counted again.
    fn find(&self, value: &str, candidates: u16) -> Matches {
        let mut found = Matches::new();
        if candidates == 0 {
            return found;
        }
        // Several candidates searched by their regexes: one pass of the set finds which
        // match at all. (Emails, cards and SSNs have matchers of their own, cheaper than the
        // set.)
        let by_regex =
            candidates & !(bit(Detector::Email) | bit(Detector::Card) | bit(Detector::Ssn));
        let matched = (by_regex.count_ones() >= 3).then(|| COMPILED.set.matches(value));
        if matched.as_ref().is_some_and(|m| !m.matched_any()) {
            return found;
        }
        let mut digits = None;
        for (i, (d, re)) in COMPILED.each.iter().enumerate() {
            if candidates & bit(*d) == 0 || matched.as_ref().is_some_and(|m| !m.matched(i)) {
                continue;
            }
            let Some(strategy) = self.strategies[*d as usize] else {
                continue;
            };
            let need = min_digits(*d);
            // A confirmed card, SSN or phone number holds that many digits, none of them in
            // a match already found (overlaps lose): when fewer are left, the search is moot.
            if let Some(need) = need
                && !found.is_empty()
                && !digits_outside(value, &found, need, &mut digits)
            {
                continue;
            }
            // The earlier detectors' spans, sorted by start and (not overlapping) by end:
            // `prior` is the first that ends after the current match's start.
            let earlier = found.len();
            let mut prior = 0;
            // The digits at or after `at`, once counted.
            let mut digits_left: Option<usize> = None;
            // `find_iter`, with its last, fruitless search left out: none after a match
            // that ends the value, or when too few digits are left for one.
            let mut at = 0;
            while at < value.len() {
                let next = match d {
                    Detector::Email => email_at(value, at),
                    Detector::Card => card_at(value, at),
                    Detector::Ssn => ssn_at(value, at),
                    _ => re.find_at(value, at).map(|m| (m.start(), m.end())),
                };
                let Some((start, end)) = next else {
                    break;
                };
                if start == end {
                    // No detector matches nothing; were one to, this loop must still end.
                    break;
                }
                let searched_from = at;
                at = end;
                tally(1);
                while prior < earlier && found[prior].1 <= start {
                    tally(1);
                    prior += 1;
                }
                let overlaps = prior < earlier && found[prior].0 < end;
                if !overlaps && confirm(*d, &value[start..end]) {
                    found.push((start, end, *d, strategy));
                }
                if let Some(need) = need {
                    if value.len() - at < need {
                        break;
                    }
                    let left = match digits_left {
                        Some(left) => left - digit_count(&value[searched_from..at]),
                        None => digit_count(&value[at..]),
                    };
                    if left < need {
                        break;
                    }
                    digits_left = Some(left);
                }
            }
            if found.len() > earlier {
                found.sort_unstable_by_key(|(start, _, _, _)| *start);
            }
        }
        found
    }
}

/// Keeps the first and last character: `j***n` (`**` for one or two).
fn partial_generic_into(value: &str, out: &mut impl Sink) {
    let mut chars = value.chars();
    match (chars.next(), chars.next_back(), chars.next()) {
        (None, _, _) => {}
        (Some(first), Some(last), Some(_)) => {
            out.put_char(first);
            out.put_str("***");
            out.put_char(last);
        }
        _ => out.put_str("**"),
    }
}

/// A detector-aware partial mask that keeps a useful hint.
fn partial_into(d: Detector, m: &str, out: &mut impl Sink) {
    let mut keep_last_digits = |keep: usize| {
        let hide = digit_count(m).saturating_sub(keep);
        let mut seen = 0;
        for c in m.chars() {
            if c.is_ascii_digit() {
                seen += 1;
                out.put_char(if seen > hide { c } else { '*' });
            } else {
                out.put_char(c);
            }
        }
    };
    match d {
        Detector::Card => keep_last_digits(4),
        Detector::Phone => keep_last_digits(2),
        Detector::Email => {
            if !partial_email_into(m, out) {
                out.put_str("****");
            }
        }
        Detector::Ssn => {
            out.put_str("***-**-");
            out.put_str(&m[m.len() - 4..]);
        }
        Detector::Iban => {
            let compact: String = m.chars().filter(|c| *c != ' ').collect();
            out.put_str(&compact[..2]);
            for _ in 0..compact.len() - 6 {
                out.put_str("*");
            }
            out.put_str(&compact[compact.len() - 4..]);
        }
        Detector::AwsKey => {
            out.put_str(&m[..4]);
            out.put_str("****************");
        }
        Detector::Jwt => out.put_str("eyJ****"),
        Detector::Bearer => out.put_str("Bearer ****"),
        Detector::PrivateKey => {
            out.put_str("-----BEGIN PRIVATE KEY-----****-----END PRIVATE KEY-----")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(rules: Vec<MaskRule>) -> Masker {
        Masker::new(&rules, Some(Access::Admin), "bot", Access::Read, [7; 32]).unwrap()
    }

    fn detect(strategy: Strategy) -> Masker {
        masker(vec![MaskRule {
            columns: vec![],
            detectors: Detector::ALL.to_vec(),
            strategy,
            exempt_identities: vec![],
        }])
    }

    fn scanned(m: &Masker, v: &str) -> String {
        match m.scan(v, &mut |_| {}) {
            Outcome::Keep => v.to_owned(),
            Outcome::Replace(s) => s.into_owned(),
            Outcome::Null => "NULL".into(),
        }
    }

    /// A reproducible stream of pseudo-random numbers for generated test inputs.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// The matches as the patterns define them: every detector's regex over the whole value,
    /// confirmed, overlaps with an earlier (higher priority) match dropped. No prefilter, no
    /// regex set, no shortcut.
    fn every_regex(m: &Masker, v: &str) -> Vec<Found> {
        let mut found: Vec<Found> = Vec::new();
        for (d, re) in &COMPILED.each {
            let Some(strategy) = &m.strategies[*d as usize] else {
                continue;
            };
            for hit in re.find_iter(v) {
                if confirm(*d, hit.as_str())
                    && !found
                        .iter()
                        .any(|(s, e, _, _)| hit.start() < *e && *s < hit.end())
                {
                    found.push((hit.start(), hit.end(), *d, *strategy));
                }
            }
        }
        found.sort_unstable_by_key(|(start, _, _, _)| *start);
        found
    }

    /// What every regex finds, shortcuts or not: the prefilter, the regex set and the digit
    /// count may only skip work.
    fn agrees_with_every_regex(m: &Masker, v: &str) {
        assert_eq!(
            m.find(v, m.candidates(v.as_bytes())).to_vec(),
            every_regex(m, v),
            "{v:?}"
        );
    }

    /// A workload chooses the values masked (what its queries return, what its statements
    /// say): back to back matches of every kind, and the near misses that make matchers look
    /// ahead, must cost work in proportion to the value, not to its square. Counted in steps
    /// of `find`'s bookkeeping (no clock): four times the value, about four times the work.
    #[test]
    fn hostile_values_cost_work_linear_in_their_length() {
        let m = detect(Strategy::Redact);
        let shapes = [
            "4111111111111111 ",
            "4111 1111 1111 1111,",
            "123-45-6789 ",
            "a@b.cc ",
            "a@b.cc.1.",
            "(555) 123-4567 ",
            "+1 415 555 0100;",
            "GB82WEST12345698765432 ",
            "AKIAIOSFODNN7EXAMPLE ",
            "Bearer abcdefghij ",
            "eyJabcd.eyJabcd.abcd ",
            "4111111111111111 123-45-6789 a@b.cc (555) 123-4567 GB82WEST12345698765432 ",
            "1-",
            "1 ",
            "@",
            "\u{e9}4111111111111111\u{e9}",
        ];
        for unit in shapes {
            let work = |n: usize| {
                let v = unit.repeat(n);
                WORK.with(|w| w.set(0));
                let found = m.find(&v, m.candidates(v.as_bytes()));
                (WORK.with(|w| w.get()), found.len())
            };
            let (small, found_small) = work(500);
            let (large, found_large) = work(2000);
            assert!(
                large <= small * 9 / 2,
                "{unit:?}: 500 copies took {small} steps, 2000 took {large}"
            );
            assert_eq!(found_large, found_small * 4, "{unit:?}");
            // And the matches are the patterns' own.
            agrees_with_every_regex(&m, &unit.repeat(300));
        }
    }

    #[test]
    fn the_prefilter_never_hides_a_match() {
        let m = detect(Strategy::Partial);
        let fixed = [
            "jane.doe@example.com",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111 and 078-05-1120",
            "+1 415 555 0100",
            "(415) 555-0100",
            "DE89 3704 0044 0532 0130 00",
            "GB82WEST12345698765432",
            "iban: GB82 WEST 1234 5698 7654 32.",
            "ref XDE89370400440532013000",
            "AKIAIOSFODNN7EXAMPLE",
            "ASIAY34FZKBOKMUTVV7A",
            "SELECT * FROM KEYS WHERE ID = 'AROA1234567890ABCDEF'",
            "UPDATE T SET K = 'AIPAAIPA1234567890AB' WHERE ID = 1234567",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
            "Authorization: Bearer abcdefgh12345678",
            "BEARER\tabcdefgh12345678==",
            "bEaReR abcdefghijkl",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----",
            "-----BEGIN RSA PRIVATE KEY-----",
            "ſtraße bearer abcdefghijk",
            "",
            "42",
            "plain text without anything",
        ];
        for v in fixed {
            agrees_with_every_regex(&m, v);
        }
        // SQL keywords supply the capitals an AWS key needs: the prefix rules it out.
        let sql = b"SELECT abalance FROM pgbench_accounts WHERE aid = 123456;";
        assert_eq!(possible(sql) & bit(Detector::AwsKey), 0);
        // Random strings over an alphabet rich in what detectors look for.
        let alphabet: Vec<char> = "0123456789 -.+@()AKIASeyJbearBEAR_=/\tGDxzſ\u{212a}é"
            .chars()
            .collect();
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (next() % 48) as usize;
            let v: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            agrees_with_every_regex(&m, &v);
        }
        // And pieces of real matches glued to noise.
        for a in fixed {
            for b in fixed {
                agrees_with_every_regex(&m, &format!("{a} x{b}"));
            }
        }
        // Candidates come from the raw bytes, the scan runs on their lossy conversion.
        for _ in 0..5_000 {
            let mut raw = Vec::new();
            for _ in 0..next() % 48 {
                match next() % 8 {
                    0 => raw.push([0xff, 0xc3, 0xe2, 0x80][(next() % 4) as usize]),
                    _ => raw.extend(
                        alphabet[(next() % alphabet.len() as u64) as usize]
                            .to_string()
                            .bytes(),
                    ),
                }
            }
            let v = String::from_utf8_lossy(&raw);
            assert_eq!(
                m.find(&v, m.candidates(&raw)).to_vec(),
                every_regex(&m, &v),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_census_counts_every_byte() {
        let mut next = xorshift(0x1234_5678_9abc_def1);
        for _ in 0..2_000 {
            // Lengths across the 255-byte spill.
            let len = (next() % 1100) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let naive = |class: u32| {
                bytes
                    .iter()
                    .filter(|b| CLASS[usize::from(**b)] >> class & 1 == 1)
                    .count()
            };
            let counts = census(&bytes);
            for class in [DIGIT, UPPER, AT, DASH, HIGH, B, J, A] {
                assert_eq!(
                    counts[class as usize / 8],
                    naive(class),
                    "class {class}, {len} bytes"
                );
            }
        }
        // All one class, at the most a chunk's lane can count; and every byte value once.
        assert_eq!(census(&[b'7'; 1020])[0], 1020);
        let every: Vec<u8> = (0..=255).collect();
        assert_eq!(census(&every), [10, 26, 1, 1, 128, 2, 1, 2]);
    }

    /// Asserts that `matcher` finds what `d`'s regex finds from every start a search can
    /// resume at (the masking loop resumes after each match), and that `whole`, if given,
    /// says whether the regex's first match is the whole string, on `fixed` and on 30,000
    /// random strings of up to `most` of `pieces`. Returns how many of the random strings hold a match, for the
    /// caller to check that both answers were tried.
    fn agrees_with_its_regex(
        d: Detector,
        matcher: fn(&str, usize) -> Option<(usize, usize)>,
        whole: Option<fn(&str) -> bool>,
        fixed: &[&str],
        pieces: &[&str],
        most: u64,
        seed: u64,
    ) -> usize {
        let re = &COMPILED
            .each
            .iter()
            .find(|(x, _)| *x == d)
            .expect("the detector's regex")
            .1;
        let check = |v: &str| {
            if let Some(whole) = whole {
                let first = re.find(v).map(|m| (m.start(), m.end()));
                assert_eq!(whole(v), first == Some((0, v.len())), "{d:?} in {v:?}");
            }
            for from in (0..=v.len()).filter(|i| v.is_char_boundary(*i)) {
                assert_eq!(
                    matcher(v, from),
                    re.find_at(v, from).map(|m| (m.start(), m.end())),
                    "{d:?} in {v:?} from {from}"
                );
            }
        };
        for v in fixed {
            check(v);
        }
        let mut next = xorshift(seed);
        let mut matched = 0;
        for _ in 0..30_000 {
            let v: String = (0..next() % (most + 1))
                .map(|_| pieces[(next() % pieces.len() as u64) as usize])
                .collect();
            check(&v);
            matched += usize::from(re.is_match(&v));
        }
        matched
    }

    /// A string's characters, each as a piece for [`agrees_with_its_regex`].
    fn chars(s: &str) -> Vec<&str> {
        s.char_indices()
            .map(|(i, c)| &s[i..i + c.len_utf8()])
            .collect()
    }

    #[test]
    fn the_card_matcher_agrees_with_the_card_regex() {
        // Digit-heavy random text, with the characters at the edges of `\b` and of a
        // chain: separators doubled or trailing, letters, `_`, a combining mark, a digit
        // that is not ASCII, and characters beyond ASCII that are not word characters.
        let matched = agrees_with_its_regex(
            Detector::Card,
            card_at,
            None,
            &[
                "4111 1111 1111 1111",
                "4111-1111-1111-1111.",
                "x4111111111111111",
                "4111111111111111x",
                "_4111111111111111",
                "é4111111111111111",
                "4111111111111111\u{300}",
                "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2",
                "1234567890123456789012",
                "12  34567890123456789",
                "4111 1111 1111 1111 -",
                "٣4111111111111111",
                "€4111111111111111€",
                "\u{a0}4111 1111 1111 1111\u{a0}",
            ],
            &chars("0123456789012345678901234567890123456789  --a_é\u{300}٣.,€\u{a0}"),
            40,
            0x2545_f491_4f6c_dd1d,
        );
        assert!((1_000..29_000).contains(&matched), "{matched} matched");
    }

    #[test]
    fn the_ssn_matcher_agrees_with_the_ssn_regex() {
        // The pattern and its pieces (groups of digits, dashes) in every arrangement, and the same characters at the edges of `\b` as for cards.
        let matched = agrees_with_its_regex(
            Detector::Ssn,
            ssn_at,
            None,
            &[
                "078-05-1120",
                "SSN on file: 078-05-1120.",
                "x078-05-1120",
                "078-05-1120x",
                "1078-05-1120",
                "078-05-11201",
                "078-05-1120-05-1120",
                "--078-05-1120--",
                "078--05-1120",
                "078-05-112",
                "_078-05-1120",
                "é078-05-1120",
                "078-05-1120\u{300}",
                "٣078-05-1120",
                "€078-05-1120€",
                "2026-11-05 078-05-1120",
            ],
            &[
                "078-05-1120",
                "078-",
                "05-",
                "1120",
                "-",
                "1",
                "12",
                "a",
                "_",
                "é",
                "\u{300}",
                "٣",
                ".",
                " ",
                "€",
                "\u{a0}",
            ],
            12,
            0x6a09_e667_f3bc_c908,
        );
        assert!((100..29_000).contains(&matched), "{matched} matched");
    }

    #[test]
    fn the_email_matchers_agree_with_the_email_regex() {
        let matched = agrees_with_its_regex(
            Detector::Email,
            email_at,
            Some(|v| whole_email(v.as_bytes()).is_some()),
            &[
                "jane.doe@example.com",
                "x a@b.co",
                "a@b.c1",
                "a@b.co1",
                "a@b.com-x.org-",
                "a@b..co",
                "a@.co",
                "@b.co",
                " @b.co",
                "a@b-c.d-e.fg",
                "a@@b.co",
                "a@b@c.de",
                "a@b.co.1",
                "a@b.co.x",
                "a@b.c.de.f",
                "é@b.co",
                "mail jane@example.com, then joe@example.org.",
            ],
            &[
                "ab", "c", "Z", "1", ".", ".", "-", "_", "%", "+", "@", "@ab", " ", "é", ".co",
                "x9", ".c", "a.b",
            ],
            9,
            0x2545_f491_4f6c_dd1d,
        );
        assert!((500..29_500).contains(&matched), "{matched} matched");
    }

    #[test]
    fn the_card_check_is_luhn() {
        // As the check is usually written: the digits from the right, every second one
        // doubled and the digits of the product added.
        let luhn = |m: &str| {
            let digits: Vec<u32> = m
                .bytes()
                .filter(u8::is_ascii_digit)
                .map(|b| u32::from(b - b'0'))
                .collect();
            let sum: u32 = digits
                .iter()
                .rev()
                .enumerate()
                .map(|(i, v)| {
                    if i % 2 == 1 {
                        v * 2 / 10 + v * 2 % 10
                    } else {
                        *v
                    }
                })
                .sum();
            (13..=19).contains(&digits.len()) && sum.is_multiple_of(10)
        };
        for (card, valid) in [
            ("4111 1111 1111 1111", true),
            ("4111 1111 1111 1112", false),
            ("5500-0000-0000-0004", true),
            ("378282246310005", true),
            ("4222222222222", true),
            ("422222222222", false),
            ("4111111111111111000", false),
            ("41111111111111110000", false),
        ] {
            assert_eq!(luhn_card(card), valid, "{card}");
        }
        let mut next = xorshift(0x3c6e_f372_fe94_f82b);
        let mut valid = 0;
        for _ in 0..20_000 {
            let m: String = (0..10 + next() % 14)
                .map(|_| char::from(b"0123456789 -"[(next() % 12) as usize]))
                .collect();
            assert_eq!(luhn_card(&m), luhn(&m), "{m:?}");
            valid += usize::from(luhn(&m));
        }
        assert!((200..19_000).contains(&valid), "{valid} valid");
    }

    #[test]
    fn every_detector_finds_its_kind() {
        let m = detect(Strategy::Redact);
        let samples = [
            ("mail jane.doe@example.com now", "mail **** now"),
            ("card 4111 1111 1111 1111", "card ****"),
            ("card 4111111111111111.", "card ****."),
            ("ssn 123-45-6789", "ssn ****"),
            ("call +1 415 555 0100", "call ****"),
            ("call (415) 555-0100", "call ****"),
            ("iban DE89 3704 0044 0532 0130 00", "iban ****"),
            ("key AKIAIOSFODNN7EXAMPLE", "key ****"),
            (
                "t eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
                "t ****",
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----",
                "****",
            ),
            (
                "Authorization: Bearer abcdefghij123456",
                "Authorization: ****",
            ),
        ];
        for (input, want) in samples {
            assert_eq!(scanned(&m, input), want, "{input}");
        }
    }

    #[test]
    fn look_alikes_are_left_alone() {
        let m = detect(Strategy::Redact);
        for v in [
            "order 4111111111111112",           // fails Luhn
            "ssn 000-12-3456",                  // invalid area
            "iban DE00 3704 0044 0532 0130 00", // bad checksum
            "plain text, nothing here",
            "id 12345",
            "2026-11-23",
        ] {
            assert_eq!(scanned(&m, v), v, "{v}");
        }
    }

    #[test]
    fn strategies() {
        assert_eq!(
            scanned(&detect(Strategy::Partial), "jane.doe@example.com"),
            "j***@example.com"
        );
        assert_eq!(
            scanned(&detect(Strategy::Partial), "4111 1111 1111 1111"),
            "**** **** **** 1111"
        );
        assert_eq!(
            scanned(&detect(Strategy::Partial), "123-45-6789"),
            "***-**-6789"
        );
        assert_eq!(
            scanned(&detect(Strategy::Null), "x jane@example.com"),
            "NULL"
        );
        let h = detect(Strategy::Hash);
        let a = scanned(&h, "jane@example.com");
        assert!(a.starts_with("h:") && a.len() == 14, "{a}");
        assert_eq!(a, scanned(&h, "jane@example.com"), "stable");
        assert_ne!(a, scanned(&h, "john@example.com"));
        assert!(a[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{a}");
        // Every detector's partial mask keeps its hint.
        let p = detect(Strategy::Partial);
        for (value, masked) in [
            ("call +1 415 555 0100", "call +* *** *** **00"),
            ("DE89 3704 0044 0532 0130 00", "DE****************3000"),
            ("AKIAIOSFODNN7EXAMPLE", "AKIA****************"),
            (
                "t eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
                "t eyJ****",
            ),
            (
                "Authorization: bearer abcdefgh12345678",
                "Authorization: Bearer ****",
            ),
        ] {
            assert_eq!(scanned(&p, value), masked);
        }
        // A column's partial mask keeps the first and last character.
        for (value, masked) in [
            ("", ""),
            ("a", "**"),
            ("ab", "**"),
            ("abc", "a***c"),
            ("élan✓", "é***✓"),
            ("jane@example.com", "j***@example.com"),
            // Only an email, whole, keeps its domain: nothing beside it passes in clear.
            ("a.b+c@mail.example.org", "a***@mail.example.org"),
            ("@x a@b.co", "@***o"),
            ("é@x jane@example.com", "é***m"),
            ("x@y card 4111 1111 1111 1111", "x***1"),
            ("Jane <jane@example.com>", "J***>"),
            ("jane@example.com1", "j***1"),
            ("a@b", "a***b"),
        ] {
            assert_eq!(
                p.apply_column(Strategy::Partial, value),
                Outcome::Replace(Cow::Owned(masked.into())),
                "{value:?}"
            );
        }
        // The data path's sink (the message being built) receives the same text.
        for strategy in [Strategy::Partial, Strategy::Hash, Strategy::Redact] {
            let value = "mail jane@example.com or 4111 1111 1111 1111";
            let (mut text, mut frame) = (String::new(), bytes::BytesMut::new());
            let m = detect(strategy);
            let c = m.candidates(value.as_bytes());
            assert_eq!(
                m.scan_into(value, c, &mut |_| {}, &mut text),
                Written::Replaced
            );
            m.scan_into(value, c, &mut |_| {}, &mut frame);
            assert_eq!(frame, text.as_bytes(), "{strategy:?}");
            let (mut text, mut frame) = (String::new(), bytes::BytesMut::new());
            m.apply_column_into(strategy, "jane@example.com", &mut text);
            m.apply_column_into(strategy, "jane@example.com", &mut frame);
            assert_eq!(frame, text.as_bytes(), "{strategy:?}");
        }
    }

    #[test]
    fn the_first_rule_to_name_a_detector_decides_its_strategy() {
        let rule = |detectors: Vec<Detector>, strategy| MaskRule {
            columns: vec![],
            detectors,
            strategy,
            exempt_identities: vec![],
        };
        let m = masker(vec![
            rule(vec![Detector::Email], Strategy::Null),
            rule(vec![Detector::Email, Detector::Card], Strategy::Partial),
        ]);
        assert_eq!(scanned(&m, "x jane@example.com"), "NULL");
        assert_eq!(
            scanned(&m, "card 4111 1111 1111 1111"),
            "card **** **** **** 1111"
        );
        let m = masker(vec![
            rule(vec![Detector::Email], Strategy::Partial),
            rule(vec![Detector::Email], Strategy::Null),
        ]);
        assert_eq!(scanned(&m, "x jane@example.com"), "x j***@example.com");
        assert!(!m.detects(Detector::Card));
    }

    #[test]
    fn column_rules_and_exemptions() {
        let m = masker(vec![MaskRule {
            columns: vec!["*.email".into(), "*password*".into()],
            detectors: vec![],
            strategy: Strategy::Partial,
            exempt_identities: vec![],
        }]);
        assert_eq!(
            m.column_strategy("public", "users", "email"),
            Some(Strategy::Partial)
        );
        assert_eq!(m.column_strategy("", "", "EMAIL"), Some(Strategy::Partial));
        assert_eq!(
            m.column_strategy("public", "users", "password_hash"),
            Some(Strategy::Partial)
        );
        assert_eq!(m.column_strategy("public", "users", "name"), None);
        assert_eq!(
            m.apply_column(Strategy::Partial, "jane@example.com"),
            Outcome::Replace(Cow::Owned("j***@example.com".into()))
        );
        assert_eq!(
            m.apply_column(Strategy::Partial, "hunter2"),
            Outcome::Replace(Cow::Owned("h***2".into()))
        );
        let rules = [MaskRule {
            columns: vec!["*".into()],
            detectors: vec![],
            strategy: Strategy::Redact,
            exempt_identities: vec!["auditor".into()],
        }];
        let exempt = Some(Access::Admin);
        assert!(
            Masker::new(&rules, exempt, "bot", Access::Admin, [0; 32]).is_none(),
            "admin grants see clear values"
        );
        assert!(
            Masker::new(&rules, exempt, "auditor", Access::Read, [0; 32]).is_none(),
            "exempt identity"
        );
        assert!(Masker::new(&rules, exempt, "bot", Access::Read, [0; 32]).is_some());
    }
}
