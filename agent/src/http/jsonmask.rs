//! Masking of HTTP response bodies: JSON by path (`$.items[*].email`, `$..password`) plus the
//! content detectors over every string value; text bodies by the detectors; anything else
//! refused unless the resource lets it pass.
//!
//! Path syntax (a JSONPath subset): `$` the root; `.name` or `['name']` a member; `[*]` or
//! `.*` every element or member; `[N]` one element; `..name` / `..*` at any depth below.
//! Names match exactly (JSON keys are case-sensitive).

use serde_json::Value;

use crate::inspect::{
    mask::{Masker, Outcome, Written},
    rules::Strategy,
};

/// About how many bytes parsing `bytes` into a [`Value`] takes, the text's own bytes
/// included, so a body is reserved against the buffer budget for what masking it really
/// costs. The tree is far larger than its text: a member costs a B-tree node (~640 bytes) per
/// object, 32 bytes per element or member and a vector per array, so `[1,1,1,...]` takes about
/// 16 times its length and `[{"a":1},...]` about 80; reserving a flat multiple would let a
/// workload whose grant is masked take many times its share. Measured against serde_json's
/// allocations within about 1.3x over (never under) for Kubernetes lists, arrays of numbers,
/// strings and small objects. One pass, no allocation; strings are skipped with their escapes
/// so their commas and braces do not count.
pub fn parsed_size(bytes: &[u8]) -> usize {
    let mut size = bytes.len() + 64;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &c) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        let next_closes = |close: u8| {
            bytes[i + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == close)
        };
        size += match c {
            b'"' => {
                in_string = true;
                0
            }
            b'{' if !next_closes(b'}') => 640,
            b'[' if !next_closes(b']') => 128,
            b',' | b':' => 32,
            _ => 0,
        };
    }
    size
}

/// One step of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Name(String),
    Index(usize),
    Any,
    /// `..`: zero or more levels, then the next step.
    Descend,
}

/// A parsed JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<Step>,
}

/// One level of a concrete location in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Name(String),
    Index(usize),
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "`{text}` is not a JSON path ({why}); write e.g. $.items[*].email or $..password"
            )
        };
        let rest = text
            .strip_prefix('$')
            .ok_or_else(|| bad("it must start with $"))?;
        let b = rest.as_bytes();
        let mut steps = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'.' if b.get(i + 1) == Some(&b'.') => {
                    steps.push(Step::Descend);
                    i += 2;
                    let (step, n) = name_or_star(&rest[i..])
                        .ok_or_else(|| bad("a name or * must follow .."))?;
                    steps.push(step);
                    i += n;
                }
                b'.' => {
                    i += 1;
                    let (step, n) =
                        name_or_star(&rest[i..]).ok_or_else(|| bad("a name or * must follow ."))?;
                    steps.push(step);
                    i += n;
                }
                b'[' => {
                    let close = rest[i..].find(']').ok_or_else(|| bad("unclosed ["))? + i;
                    let inner = rest[i + 1..close].trim();
                    let step = if inner == "*" {
                        Step::Any
                    } else if let Ok(n) = inner.parse::<usize>() {
                        Step::Index(n)
                    } else if let Some(name) = inner
                        .strip_prefix('\'')
                        .and_then(|s| s.strip_suffix('\''))
                        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))
                    {
                        Step::Name(name.to_owned())
                    } else {
                        return Err(bad("brackets hold *, a number or a quoted name"));
                    };
                    steps.push(step);
                    i = close + 1;
                }
                _ => return Err(bad("expected . or [")),
            }
        }
        if steps.is_empty() {
            return Err(bad("it names no value below $"));
        }
        if steps.len() >= States::BITS as usize {
            return Err(bad(
                "it has more than 63 steps (each name, index, wildcard and `..` is one)",
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the location `at` (from the root) matches.
    pub fn matches(&self, at: &[Key]) -> bool {
        let end = at.iter().fold(self.start(), |states, key| {
            self.next(
                states,
                match key {
                    Key::Name(n) => KeyRef::Name(n),
                    Key::Index(i) => KeyRef::Index(*i),
                },
            )
        });
        self.accepts(end)
    }

    /// The states before any key: the root, and what `..` reaches from it without a key.
    fn start(&self) -> States {
        self.closure(1)
    }

    /// `states` with what each `..` among them reaches without a key (the step after it).
    /// In step order, so that a run of `..` is followed to its end.
    fn closure(&self, mut states: States) -> States {
        for (i, step) in self.steps.iter().enumerate() {
            if states & (1 << i) != 0 && *step == Step::Descend {
                states |= 1 << (i + 1);
            }
        }
        states
    }

    /// The states after one more key below a node in `states`. One pass over the steps,
    /// however many `..` the path has and however deep the document: a location matched by
    /// trying every way `..` could split it costs the depth to the power of their count, at
    /// every node, and the document is the workload's.
    fn next(&self, states: States, key: KeyRef<'_>) -> States {
        if states == 0 {
            return 0;
        }
        let mut out = 0;
        for (i, step) in self.steps.iter().enumerate() {
            if states & (1 << i) == 0 {
                continue;
            }
            let advance = match (step, key) {
                (Step::Descend, _) => {
                    out |= 1 << i;
                    false
                }
                (Step::Any, _) => true,
                (Step::Name(n), KeyRef::Name(k)) => n == k,
                (Step::Index(n), KeyRef::Index(k)) => *n == k,
                _ => false,
            };
            if advance {
                out |= 1 << (i + 1);
            }
        }
        self.closure(out)
    }

    /// Whether every step has been matched.
    fn accepts(&self, states: States) -> bool {
        states & (1 << self.steps.len()) != 0
    }
}

/// Where matching a path stands at a node: bit `i` set when the location so far can match
/// the path's first `i` steps (a path has fewer steps than bits, checked at parsing).
type States = u64;

/// A [`Key`] borrowed from the document being walked (no copy of each member's name).
#[derive(Clone, Copy)]
enum KeyRef<'a> {
    Name(&'a str),
    Index(usize),
}

fn name_or_star(s: &str) -> Option<(Step, usize)> {
    if s.starts_with('*') {
        return Some((Step::Any, 1));
    }
    let n = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'$'))
        .count();
    (n > 0).then(|| (Step::Name(s[..n].to_owned()), n))
}

/// Each path's [`States`] at one node (few paths: kept inline).
type PathStates = smallvec::SmallVec<[States; 4]>;

/// The masking rules of one session: paths with their strategies, and the detectors.
pub struct BodyMasker {
    pub paths: Vec<(JsonPath, Strategy)>,
    pub masker: Masker,
}

impl BodyMasker {
    /// The rules that apply to `identity` under `access` (`MaskRule::columns` hold the JSON
    /// paths of an http resource); `None` when nothing is masked for this session.
    pub fn new(
        rules: &[crate::inspect::rules::MaskRule],
        exempt_access: Option<crate::config::Access>,
        identity: &str,
        access: crate::config::Access,
        key: [u8; 32],
    ) -> Option<Self> {
        let masker = Masker::new(rules, exempt_access, identity, access, key)?;
        let paths = rules
            .iter()
            .filter(|r| !r.exempt_identities.iter().any(|i| i == identity))
            .flat_map(|r| {
                r.columns
                    .iter()
                    .filter_map(|p| JsonPath::parse(p).ok())
                    .map(move |p| (p, r.strategy))
            })
            .collect();
        Some(Self { paths, masker })
    }

    /// Masks a JSON document in place; returns how many values were masked.
    pub fn mask_json(&self, value: &mut Value) -> u64 {
        let states: PathStates = self.paths.iter().map(|(p, _)| p.start()).collect();
        self.walk(value, &states, true)
    }

    /// `states` holds, for each path, where matching it stands at `value`.
    fn walk(&self, value: &mut Value, states: &PathStates, root: bool) -> u64 {
        if !root
            && let Some((_, strategy)) = self
                .paths
                .iter()
                .zip(states)
                .find(|((p, _), s)| p.accepts(**s))
                .map(|(p, _)| p)
        {
            // A whole subtree named by a rule: every value in it is masked.
            return self.mask_all(value, *strategy);
        }
        let below = |key: KeyRef<'_>| -> PathStates {
            self.paths
                .iter()
                .zip(states)
                .map(|((p, _), s)| p.next(*s, key))
                .collect()
        };
        match value {
            Value::Object(map) => {
                let mut n = 0;
                for (k, v) in map.iter_mut() {
                    n += self.walk(v, &below(KeyRef::Name(k)), false);
                }
                n
            }
            Value::Array(items) => {
                let mut n = 0;
                for (i, v) in items.iter_mut().enumerate() {
                    n += self.walk(v, &below(KeyRef::Index(i)), false);
                }
                n
            }
            Value::String(s) => match self.masker.scan(s, &mut |_| {}) {
                Outcome::Keep => 0,
                Outcome::Replace(r) => {
                    *s = r.into_owned();
                    1
                }
                Outcome::Null => {
                    *value = Value::Null;
                    1
                }
            },
            _ => 0,
        }
    }

    fn mask_all(&self, value: &mut Value, strategy: Strategy) -> u64 {
        match value {
            Value::Object(map) => map.values_mut().map(|v| self.mask_all(v, strategy)).sum(),
            Value::Array(items) => items.iter_mut().map(|v| self.mask_all(v, strategy)).sum(),
            Value::Null => 0,
            other => {
                let text = match &*other {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                };
                *other = match self.masker.apply_column(strategy, &text) {
                    Outcome::Keep => return 0,
                    Outcome::Replace(r) => Value::String(r.into_owned()),
                    Outcome::Null => Value::Null,
                };
                1
            }
        }
    }

    /// Masks a text body with the detectors.
    pub fn mask_text(&self, text: &str) -> (String, u64) {
        match self.masker.scan(text, &mut |_| {}) {
            Outcome::Keep => (text.to_owned(), 0),
            Outcome::Replace(r) => (r.into_owned(), 1),
            Outcome::Null => (String::new(), 1),
        }
    }

    /// [`BodyMasker::mask_text`] appended to `out`, with no string of its own (a request's
    /// record masks each of its headers).
    pub fn mask_text_into(&self, text: &str, out: &mut String) -> u64 {
        let m = &self.masker;
        match m.scan_into(text, m.candidates(text.as_bytes()), &mut |_| {}, out) {
            Written::Keep => {
                out.push_str(text);
                0
            }
            Written::Replaced | Written::Null => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parsed_size_counts_the_tree_not_the_strings() {
        // Structure inside strings is text, not tree.
        let plain = br#"{"a":"x"}"#;
        let tricky = br#"{"a":"{[,:\"{[,:"}"#;
        assert_eq!(
            parsed_size(tricky) - tricky.len(),
            parsed_size(plain) - plain.len()
        );
        // Empty containers allocate nothing.
        assert_eq!(parsed_size(b"[ ]"), 3 + 64);
        assert_eq!(parsed_size(b"{ }"), 3 + 64);
        // Dense small objects are reserved at many times their text (serde_json takes ~80x).
        let dense = format!("[{}]", vec![r#"{"a":1}"#; 1000].join(","));
        assert!(
            parsed_size(dense.as_bytes()) > 80 * dense.len(),
            "{}",
            dense.len()
        );
        // Ordinary text-heavy JSON stays near its length.
        let texty = format!(r#"{{"note":"{}"}}"#, "lorem ipsum ".repeat(1000));
        assert!(parsed_size(texty.as_bytes()) < 2 * texty.len());
    }
    use crate::{
        config::Access,
        inspect::rules::{Detector, MaskRule},
    };

    fn p(s: &str) -> JsonPath {
        JsonPath::parse(s).unwrap()
    }
    fn at(keys: &[&str]) -> Vec<Key> {
        keys.iter()
            .map(|k| match k.parse::<usize>() {
                Ok(n) => Key::Index(n),
                Err(_) => Key::Name((*k).to_owned()),
            })
            .collect()
    }

    #[test]
    fn paths_parse_and_match() {
        assert!(p("$.items[*].email").matches(&at(&["items", "3", "email"])));
        assert!(!p("$.items[*].email").matches(&at(&["items", "3", "name"])));
        assert!(p("$..password").matches(&at(&["a", "b", "password"])));
        assert!(p("$..password").matches(&at(&["password"])));
        assert!(p("$['user']['ssn']").matches(&at(&["user", "ssn"])));
        assert!(p("$.users[0].*").matches(&at(&["users", "0", "x"])));
        assert!(!p("$.users[0].*").matches(&at(&["users", "1", "x"])));
        for bad in ["items", "$", "$.", "$[", "$[x]", "$..", "$.a b"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
    }

    /// The definition: `..` skips any number of levels, every other step takes one.
    fn spec(steps: &[Step], at: &[Key]) -> bool {
        match steps.split_first() {
            None => at.is_empty(),
            Some((Step::Descend, rest)) => (0..=at.len()).any(|skip| spec(rest, &at[skip..])),
            Some((step, rest)) => at.split_first().is_some_and(|(key, tail)| {
                (match (step, key) {
                    (Step::Any, _) => true,
                    (Step::Name(n), Key::Name(k)) => n == k,
                    (Step::Index(n), Key::Index(k)) => n == k,
                    _ => false,
                }) && spec(rest, tail)
            }),
        }
    }

    #[test]
    fn paths_match_as_defined_in_one_pass() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut matched, mut missed) = (0, 0);
        for _ in 0..50_000 {
            let steps: Vec<Step> = (0..1 + next(6))
                .map(|_| match next(6) {
                    0 => Step::Name("a".into()),
                    1 => Step::Name("b".into()),
                    2 => Step::Index(0),
                    3 => Step::Any,
                    _ => Step::Descend,
                })
                .collect();
            let path = JsonPath {
                text: String::new(),
                steps,
            };
            let keys: Vec<Key> = (0..next(7))
                .map(|_| match next(4) {
                    0 => Key::Name("a".into()),
                    1 => Key::Name("b".into()),
                    2 => Key::Index(0),
                    _ => Key::Index(1),
                })
                .collect();
            let want = spec(&path.steps, &keys);
            assert_eq!(path.matches(&keys), want, "{:?} at {keys:?}", path.steps);
            if want { matched += 1 } else { missed += 1 }
        }
        assert!(matched > 5_000 && missed > 5_000, "{matched} / {missed}");
        // Many `..` over a deep document: one pass per level.
        let deep = p("$..a..a..a..a..a..a..a..a..b");
        let mut doc = json!({"b": "plain secret", "c": "kept"});
        for _ in 0..120 {
            doc = json!({ "a": doc });
        }
        let m = BodyMasker {
            paths: vec![(deep, Strategy::Redact)],
            masker: Masker::new(
                &[MaskRule {
                    columns: vec![],
                    detectors: vec![crate::inspect::rules::Detector::Email],
                    strategy: Strategy::Redact,
                    exempt_identities: vec![],
                }],
                None,
                "bot",
                crate::config::Access::Read,
                [0; 32],
            )
            .unwrap(),
        };
        assert_eq!(m.mask_json(&mut doc), 1);
        let text = doc.to_string();
        assert!(
            !text.contains("plain secret") && text.contains("kept"),
            "{text:.80}"
        );
        assert!(JsonPath::parse(&format!("${}", ".a".repeat(64))).is_err());
        assert!(JsonPath::parse(&format!("${}", ".a".repeat(63))).is_ok());
    }

    #[test]
    fn text_masked_into_a_buffer_is_the_text_masked() {
        let rule = |detectors, strategy| MaskRule {
            columns: vec![],
            detectors,
            strategy,
            exempt_identities: vec![],
        };
        let rules = [
            rule(vec![Detector::Email], Strategy::Partial),
            rule(vec![Detector::Card], Strategy::Redact),
            rule(vec![Detector::Ssn], Strategy::Null),
        ];
        let m = BodyMasker::new(&rules, None, "bot", Access::Read, [1; 32]).unwrap();
        for text in [
            "",
            "plain text",
            "jane@example.com",
            "card 4111 1111 1111 1111 and bob@example.org",
            "ssn 123-45-6789",
        ] {
            let (masked, n) = m.mask_text(text);
            let mut out = String::from("name: ");
            let n_into = m.mask_text_into(text, &mut out);
            assert_eq!((out, n_into), (format!("name: {masked}"), n), "{text}");
        }
    }

    #[test]
    fn documents_are_masked_by_path_and_detector() {
        let rule = MaskRule {
            columns: vec![],
            detectors: vec![Detector::Card],
            strategy: Strategy::Redact,
            exempt_identities: vec![],
        };
        let by_path = |path: &str, strategy| MaskRule {
            columns: vec![path.to_owned()],
            detectors: vec![],
            strategy,
            exempt_identities: vec![],
        };
        let rules = [
            by_path("$.items[*].email", Strategy::Partial),
            by_path("$..password", Strategy::Redact),
            rule,
        ];
        let m = BodyMasker::new(&rules, None, "bot", Access::Read, [1; 32]).unwrap();
        assert!(
            BodyMasker::new(&rules, Some(Access::Write), "bot", Access::Write, [1; 32]).is_none()
        );
        let mut doc = json!({
            "items": [
                {"email": "jane@example.com", "note": "card 4111 1111 1111 1111"},
                {"email": "john@example.org", "nested": {"password": {"old": "a", "new": 12345}}}
            ],
            "password": "top"
        });
        let n = m.mask_json(&mut doc);
        let text = doc.to_string();
        assert!(
            !text.contains("jane@example.com") && !text.contains("4111 1111 1111 1111"),
            "{text}"
        );
        assert!(
            !text.contains("12345") && !text.contains("\"top\""),
            "{text}"
        );
        assert!(text.contains("example.com"), "partial keeps a hint: {text}");
        assert_eq!(n, 6, "{text}");
    }
}
