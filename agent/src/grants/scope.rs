//! Where a grant may be used: its host scope.
//!
//! In a fleet (many hosts sharing one PostgreSQL store) a grant is seen by every host, but a
//! grant an agent asked for on one host is, by default, usable only there: least privilege.
//! A policy may widen that (`hosts = "fleet"`, or `hosts = ["db-runner-1", "ci-*"]`), and a
//! request may narrow what its policy allows, never widen it. The scope is resolved when the
//! request is filed (`requesting` becomes the filing host's `host_id`), stored with the grant,
//! and checked by every host before it lets the grant into its live set.
//!
//! Entries are `host_id`s or prefix patterns: a name followed by one `*` at its end, which
//! matches every `host_id` starting with that name (`ci-*` matches `ci-1` and `ci-runner`,
//! not `ci`). Only a trailing `*` is allowed so that "is this scope within that one" has an
//! exact, simple answer (prefix containment); anything else is refused at config time.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The host name of the embedded (single-host, SQLite) store: there is one host, and every
/// grant it issues is scoped to it unless its policy says `fleet`.
pub const LOCAL_HOST: &str = "local";

/// A resolved scope, as a grant carries it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostScope {
    /// Every host of the fleet.
    Fleet,
    /// These hosts (`host_id`s or `prefix*` patterns). Empty: no host (fails closed: a grant
    /// whose scope is unreadable or missing is usable nowhere).
    Hosts(Vec<String>),
}

impl Default for HostScope {
    /// Usable nowhere: what a grant record without a scope gets.
    fn default() -> Self {
        Self::Hosts(Vec::new())
    }
}

/// What a policy (`hosts = ...`) or a request (`--hosts ...`) says, before the requesting
/// host is known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostsSpec {
    /// The host the request is filed on (the default).
    #[default]
    Requesting,
    Fleet,
    List(Vec<String>),
}

/// Whether `entry` is a host id or a `prefix*` pattern; `Err` says what is wrong.
pub fn check_entry(entry: &str) -> Result<(), String> {
    if entry == "*" {
        return Err("`*` is not a host list entry: write hosts = \"fleet\" for every host".into());
    }
    if entry == "fleet" || entry == "requesting" {
        return Err(format!(
            "`{entry}` is a scope of its own, not a host: write hosts = \"{entry}\""
        ));
    }
    let name = entry.strip_suffix('*').unwrap_or(entry);
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{entry}` is not a host: a host_id (a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit), optionally ending in one `*` to match every host_id that starts with it"
        ))
    }
}

/// Whether host `host` matches `entry`.
fn entry_matches(entry: &str, host: &str) -> bool {
    match entry.strip_suffix('*') {
        Some(prefix) => host.starts_with(prefix),
        None => entry == host,
    }
}

/// Whether every host `inner` matches, `outer` matches too.
fn entry_within(inner: &str, outer: &str) -> bool {
    match (inner.strip_suffix('*'), outer.strip_suffix('*')) {
        (_, None) => inner == outer,
        (Some(i), Some(o)) => i.starts_with(o),
        (None, Some(o)) => inner.starts_with(o),
    }
}

/// The entry matching exactly the hosts both match, if any.
fn entry_meet(a: &str, b: &str) -> Option<String> {
    if entry_within(a, b) {
        Some(a.to_owned())
    } else if entry_within(b, a) {
        Some(b.to_owned())
    } else {
        // Two prefixes neither of which extends the other, or names that differ: nothing
        // in common.
        None
    }
}

impl HostScope {
    /// Whether a grant with this scope may be used on `host`.
    pub fn allows(&self, host: &str) -> bool {
        match self {
            Self::Fleet => true,
            Self::Hosts(entries) => entries.iter().any(|e| entry_matches(e, host)),
        }
    }

    /// Whether every host `other` allows, `self` allows too.
    pub fn contains(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Fleet, _) => true,
            (Self::Hosts(_), Self::Fleet) => false,
            (Self::Hosts(outer), Self::Hosts(inner)) => inner
                .iter()
                .all(|i| outer.iter().any(|o| entry_within(i, o))),
        }
    }

    /// The scope of exactly the hosts both allow.
    pub fn intersect(&self, other: &Self) -> Self {
        match (self, other) {
            (Self::Fleet, x) | (x, Self::Fleet) => x.clone(),
            (Self::Hosts(a), Self::Hosts(b)) => {
                let mut out: Vec<String> = Vec::new();
                for x in a {
                    for y in b {
                        if let Some(m) = entry_meet(x, y)
                            && !out.contains(&m)
                        {
                            out.push(m);
                        }
                    }
                }
                Self::Hosts(out)
            }
        }
    }

    /// Whether no host at all may use it.
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Hosts(e) if e.is_empty())
    }

    /// The store's text: `fleet`, or the entries joined by `,` (no entry holds one).
    pub fn to_text(&self) -> String {
        match self {
            Self::Fleet => "fleet".into(),
            Self::Hosts(entries) => entries.join(","),
        }
    }

    /// Reads [`Self::to_text`] back. An entry that is not a host or pattern makes the whole
    /// scope empty: a damaged record is usable nowhere.
    pub fn from_text(text: &str) -> Self {
        if text == "fleet" {
            return Self::Fleet;
        }
        let entries: Vec<String> = text
            .split(',')
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if entries.iter().all(|e| check_entry(e).is_ok()) {
            Self::Hosts(entries)
        } else {
            Self::default()
        }
    }
}

impl fmt::Display for HostScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fleet => f.write_str("fleet"),
            Self::Hosts(e) if e.is_empty() => f.write_str("no host"),
            Self::Hosts(e) => f.write_str(&e.join(", ")),
        }
    }
}

/// `"fleet"`, or the list of entries.
impl Serialize for HostScope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fleet => s.serialize_str("fleet"),
            Self::Hosts(e) => e.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for HostScope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Word(String),
            List(Vec<String>),
        }
        match Wire::deserialize(d)? {
            Wire::Word(w) if w == "fleet" => Ok(Self::Fleet),
            Wire::Word(w) => Err(serde::de::Error::custom(format!(
                "`{w}` is not a host scope (\"fleet\" or a list of hosts)"
            ))),
            Wire::List(e) => {
                for x in &e {
                    check_entry(x).map_err(serde::de::Error::custom)?;
                }
                Ok(Self::Hosts(e))
            }
        }
    }
}

impl HostsSpec {
    /// Reads `requesting`, `fleet`, or a comma-separated list of hosts (the CLI's
    /// `--hosts`).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "requesting" | "this" => Ok(Self::Requesting),
            "fleet" => Ok(Self::Fleet),
            list => {
                let entries: Vec<String> = list
                    .split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect();
                if entries.is_empty() {
                    return Err("name at least one host, or write `requesting` or `fleet`".into());
                }
                for e in &entries {
                    check_entry(e)?;
                }
                Ok(Self::List(entries))
            }
        }
    }

    /// The scope this says for a request filed on `requesting`.
    pub fn resolve(&self, requesting: &str) -> HostScope {
        match self {
            Self::Requesting => HostScope::Hosts(vec![requesting.to_owned()]),
            Self::Fleet => HostScope::Fleet,
            Self::List(e) => HostScope::Hosts(e.clone()),
        }
    }
}

impl fmt::Display for HostsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requesting => f.write_str("requesting"),
            Self::Fleet => f.write_str("fleet"),
            Self::List(e) => f.write_str(&e.join(",")),
        }
    }
}

impl Serialize for HostsSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostsSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(e: &[&str]) -> HostScope {
        HostScope::Hosts(e.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn matching_is_exact_or_by_prefix() {
        let s = hosts(&["db-runner-1", "ci-*"]);
        assert!(s.allows("db-runner-1"));
        assert!(!s.allows("db-runner-10"), "an exact name is not a prefix");
        assert!(!s.allows("db-runner"));
        assert!(s.allows("ci-7"));
        assert!(s.allows("ci-"));
        assert!(!s.allows("ci"));
        assert!(!s.allows("xci-7"));
        assert!(!s.allows(""));
        assert!(HostScope::Fleet.allows("anything"));
        assert!(!HostScope::default().allows("local"), "no scope: no host");
    }

    #[test]
    fn entries_are_checked() {
        for ok in ["db-runner-1", "ci-*", "a*", "h.example.com", "9x"] {
            assert!(check_entry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "",
            "*ci",
            "c*i",
            "ci-**",
            "Ci-1",
            "-x",
            "a,b",
            "fleet",
            "requesting",
            "a b",
        ] {
            assert!(check_entry(bad).is_err(), "{bad}");
        }
        assert!(check_entry(&"a".repeat(64)).is_err());
    }

    #[test]
    fn containment_never_lets_a_request_widen() {
        let policy = hosts(&["ci-*", "db-1"]);
        assert!(policy.contains(&hosts(&["ci-7"])));
        assert!(policy.contains(&hosts(&["ci-run*"])));
        assert!(policy.contains(&hosts(&["db-1", "ci-*"])));
        assert!(policy.contains(&hosts(&[])));
        assert!(
            !policy.contains(&hosts(&["c*"])),
            "a shorter prefix is wider"
        );
        assert!(
            !policy.contains(&hosts(&["db-1*"])),
            "a pattern is wider than a name"
        );
        assert!(!policy.contains(&hosts(&["db-2"])));
        assert!(!policy.contains(&HostScope::Fleet));
        assert!(HostScope::Fleet.contains(&HostScope::Fleet));
        assert!(HostScope::Fleet.contains(&policy));
    }

    #[test]
    fn intersection_keeps_what_both_allow() {
        let a = hosts(&["ci-*", "db-1"]);
        let b = hosts(&["ci-run*", "db-*", "web-1"]);
        assert_eq!(a.intersect(&b), hosts(&["ci-run*", "db-1"]));
        assert_eq!(a.intersect(&HostScope::Fleet), a);
        assert_eq!(HostScope::Fleet.intersect(&b), b);
        assert!(hosts(&["a"]).intersect(&hosts(&["b"])).is_empty());
        assert!(hosts(&["ab*"]).intersect(&hosts(&["ac*"])).is_empty());
        // Every host the intersection allows, both allow; and the other way round.
        for h in ["ci-1", "ci-runner", "db-1", "db-2", "web-1", "x"] {
            assert_eq!(a.intersect(&b).allows(h), a.allows(h) && b.allows(h), "{h}");
        }
    }

    #[test]
    fn text_round_trips_and_damage_fails_closed() {
        for s in [HostScope::Fleet, hosts(&["a", "ci-*"]), hosts(&["x"])] {
            assert_eq!(HostScope::from_text(&s.to_text()), s);
        }
        assert!(HostScope::from_text("").is_empty());
        assert!(HostScope::from_text("a,*").is_empty());
        assert!(HostScope::from_text("A").is_empty());
        assert_eq!(
            serde_json::to_string(&hosts(&["a", "b*"])).unwrap(),
            r#"["a","b*"]"#
        );
        assert_eq!(
            serde_json::to_string(&HostScope::Fleet).unwrap(),
            r#""fleet""#
        );
        assert_eq!(
            serde_json::from_str::<HostScope>(r#""fleet""#).unwrap(),
            HostScope::Fleet
        );
        assert!(serde_json::from_str::<HostScope>(r#""everywhere""#).is_err());
        assert!(serde_json::from_str::<HostScope>(r#"["*"]"#).is_err());
    }

    #[test]
    fn specs_resolve_from_the_requesting_host() {
        assert_eq!(
            HostsSpec::parse("requesting").unwrap().resolve("host-a"),
            hosts(&["host-a"])
        );
        assert_eq!(HostsSpec::default().resolve("host-a"), hosts(&["host-a"]));
        assert_eq!(
            HostsSpec::parse("fleet").unwrap().resolve("x"),
            HostScope::Fleet
        );
        assert_eq!(
            HostsSpec::parse(" a , ci-* ").unwrap().resolve("x"),
            hosts(&["a", "ci-*"])
        );
        assert!(HostsSpec::parse("").is_err());
        assert!(HostsSpec::parse("a,*").is_err());
    }
}
