//! Per-request policy for `http` resources: which access level a request needs, and what the
//! resource's `[[resource.rule]]` list decides for it.
//!
//! Rules are matched in order against the method and the *normalised* path
//! ([`super::normalize`]); the first match wins. Without a matching rule the request is
//! decided by access level alone: read = `GET`, `HEAD`, `OPTIONS`; write = every other method.

use hyper::{HeaderMap, header::HeaderName};

use crate::config::Access;

use super::{kube::KubeRequest, normalize::NormalPath};

/// What a rule does with a request it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Hold the request until a human approves it (`jitgate approve`).
    Approve,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "allow" => Self::Allow,
            "deny" => Self::Deny,
            "approve" => Self::Approve,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Approve => "approve",
        }
    }
}

/// A path glob: `*` matches any run of characters inside one segment (never `/`), `**`
/// matches any run including `/`. A pattern ending in `/**` also matches its bare prefix
/// (`/admin/**` matches `/admin`), so one rule covers a subtree and its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("a path pattern must start with '/' (got {0:?})")]
    NotAbsolute(String),
    #[error("'***' is not a valid path pattern ({0:?})")]
    TripleStar(String),
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, GlobError> {
        if !pattern.starts_with('/') {
            return Err(GlobError::NotAbsolute(pattern.to_owned()));
        }
        if pattern.contains("***") {
            return Err(GlobError::TripleStar(pattern.to_owned()));
        }
        Ok(Self(pattern.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, path: &NormalPath) -> bool {
        let path = path.as_str().as_bytes();
        let pat = self.0.as_bytes();
        if glob_match(pat, path) {
            return true;
        }
        match pat.strip_suffix(b"/**") {
            Some(prefix) => prefix == path || (prefix.is_empty() && path == b"/"),
            None => false,
        }
    }
}

/// Glob matching: [`glob_match_dp`] decides, after a check of the pattern's literal ends that
/// settles most (pattern, path) pairs without allocating. Every rule's globs are tried on
/// every request, and most do not match.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let first = pat.iter().position(|&b| b == b'*');
    let Some(first) = first else {
        return pat == text;
    };
    // Whatever the stars match, a match starts with the text before the first star and ends
    // with the text after the last, and those two do not overlap in the path.
    let last = pat.iter().rposition(|&b| b == b'*').unwrap_or(first);
    let (head, tail) = (&pat[..first], &pat[last + 1..]);
    if head.len() + tail.len() > text.len() || !text.starts_with(head) || !text.ends_with(tail) {
        return false;
    }
    glob_match_dp(pat, text)
}

/// Glob matching by dynamic programming over (pattern token, text position): exact for any
/// mix of `*` and `**` (a greedy backtracking matcher can miss a match there, and a missed
/// match on a deny rule lets a request through), O(pattern x path), no recursion.
fn glob_match_dp(pat: &[u8], text: &[u8]) -> bool {
    // dp[j]: the pattern consumed so far matches text[..j].
    let mut dp = vec![false; text.len() + 1];
    dp[0] = true;
    let mut next = vec![false; text.len() + 1];
    let mut p = 0;
    while p < pat.len() {
        let deep = pat[p] == b'*' && pat.get(p + 1) == Some(&b'*');
        if pat[p] == b'*' {
            next[0] = dp[0];
            for j in 1..=text.len() {
                next[j] = dp[j] || (next[j - 1] && (deep || text[j - 1] != b'/'));
            }
            p += if deep { 2 } else { 1 };
        } else {
            next[0] = false;
            for j in 1..=text.len() {
                next[j] = dp[j - 1] && text[j - 1] == pat[p];
            }
            p += 1;
        }
        std::mem::swap(&mut dp, &mut next);
    }
    dp[text.len()]
}

/// What a rule says about Kubernetes requests (`flavor = "kubernetes"`); every list empty:
/// the rule does not look at them. Patterns are globs (`*` within a `/`-separated part), with
/// RBAC's meaning for resources: `pods` is not `pods/exec`, `pods/*` is every pod subresource.
#[derive(Debug, Clone, Default)]
pub struct KubeMatch {
    pub verbs: Vec<String>,
    /// `pods`, `pods/exec`, `deployments`.
    pub resources: Vec<String>,
    pub namespaces: Vec<String>,
    pub names: Vec<String>,
    /// API groups (`""` the core group, `apps`).
    pub groups: Vec<String>,
}

impl KubeMatch {
    pub fn is_empty(&self) -> bool {
        self.verbs.is_empty()
            && self.resources.is_empty()
            && self.namespaces.is_empty()
            && self.names.is_empty()
            && self.groups.is_empty()
    }

    fn matches(&self, r: Option<&KubeRequest>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(r) = r else { return false };
        let any = |pats: &[String], v: &str| {
            pats.is_empty() || pats.iter().any(|p| glob_match(p.as_bytes(), v.as_bytes()))
        };
        let scoped = !(self.resources.is_empty()
            && self.namespaces.is_empty()
            && self.names.is_empty()
            && self.groups.is_empty());
        (!scoped || r.resource_request)
            && any(&self.verbs, &r.verb)
            && any(&self.resources, &r.resource_path())
            && any(&self.namespaces, &r.namespace)
            && any(&self.names, &r.name)
            && (self.groups.is_empty() || self.groups.contains(&r.group))
    }
}

/// A value pattern: `*` matches any run of characters (`/` and `.` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wild {
    /// The pattern as [`glob_match`] reads it (each `*` a deep star).
    deep: Vec<u8>,
    folded: Vec<u8>,
}

impl Wild {
    pub fn new(pattern: &str) -> Self {
        let deep = pattern.replace('*', "**").into_bytes();
        let folded = deep.to_ascii_lowercase();
        Self { deep, folded }
    }

    fn matches(&self, text: &[u8], fold: bool) -> bool {
        if fold {
            glob_match(&self.folded, &text.to_ascii_lowercase())
        } else {
            glob_match(&self.deep, text)
        }
    }
}

/// What a rule says about the request beyond its method and path: the host it names, its
/// query parameters and its headers. Every condition given must hold.
///
/// A request can be ambiguous (a parameter given twice, a key in another case, no Host), and
/// servers read such requests differently. So the action decides how a condition meets one,
/// and no spelling widens what a rule allows or escapes what it denies:
///
/// * `deny` and `approve` match loosely: keys and values ignore ASCII case, a parameter or
///   header given several times matches when any occurrence does (for headers, also any
///   comma-separated element), `;` separates query parameters too, and a request without a
///   host meets a host condition;
/// * `allow` matches exactly, and every occurrence must match.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// Host globs (lower case), matched against the host without its port.
    pub hosts: Vec<Wild>,
    /// Query parameter (percent-decoded key) and its value pattern.
    pub query: Vec<(String, Wild)>,
    /// Header and its value pattern.
    pub headers: Vec<(HeaderName, Wild)>,
}

/// The parts of a request a [`RequestMatch`] looks at.
#[derive(Clone, Copy, Default)]
pub struct RequestParts<'a> {
    /// Lower case, without the port; `None` when the request names no host.
    pub host: Option<&'a str>,
    /// The raw query (after `?`).
    pub query: Option<&'a str>,
    pub headers: Option<&'a HeaderMap>,
}

impl RequestMatch {
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.query.is_empty() && self.headers.is_empty()
    }

    fn matches(&self, r: &RequestParts<'_>, loose: bool) -> bool {
        if self.is_empty() {
            return true;
        }
        let hosts = self.hosts.is_empty()
            || match r.host {
                None => loose,
                Some(h) => self.hosts.iter().any(|w| w.matches(h.as_bytes(), true)),
            };
        hosts && self.query_matches(r.query, loose) && self.headers_match(r.headers, loose)
    }

    fn query_matches(&self, query: Option<&str>, loose: bool) -> bool {
        if self.query.is_empty() {
            return true;
        }
        let params = query.map(|q| query_params(q, loose)).unwrap_or_default();
        self.query.iter().all(|(key, value)| {
            let mut seen = params.iter().filter(|(k, _)| {
                if loose {
                    k.eq_ignore_ascii_case(key.as_bytes())
                } else {
                    k == key.as_bytes()
                }
            });
            if loose {
                seen.any(|(_, v)| value.matches(v, true))
            } else {
                let all: Vec<_> = seen.collect();
                !all.is_empty() && all.iter().all(|(_, v)| value.matches(v, false))
            }
        })
    }

    fn headers_match(&self, headers: Option<&HeaderMap>, loose: bool) -> bool {
        self.headers.iter().all(|(name, value)| {
            let Some(headers) = headers else {
                return false;
            };
            let mut values = headers.get_all(name).iter().map(|v| v.as_bytes());
            if loose {
                values.any(|v| {
                    value.matches(v, true)
                        || v.split(|b| *b == b',')
                            .any(|part| value.matches(part.trim_ascii(), true))
                })
            } else {
                let all: Vec<&[u8]> = values.collect();
                !all.is_empty() && all.iter().all(|v| value.matches(v, false))
            }
        })
    }
}

/// A query's parameters, keys and values percent-decoded (`+` as a space). With `loose`,
/// the parameters of both readings servers have: `&` alone separating them, and `;` as well
/// (`a=1;b=2` is one parameter to most servers and two to some).
pub fn query_params(query: &str, loose: bool) -> Vec<(Vec<u8>, Vec<u8>)> {
    let read = |semicolons: bool| {
        query
            .split(move |c| c == '&' || (semicolons && c == ';'))
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (decode_query_part(k), decode_query_part(v))
            })
    };
    let mut params: Vec<_> = read(false).collect();
    if loose && query.contains(';') {
        params.extend(read(true));
    }
    params
}

/// Percent-decoding of one query key or value, `+` as a space; a `%` not followed by two hex
/// digits stays as it is.
pub fn decode_query_part(part: &str) -> Vec<u8> {
    let hex = |c: u8| char::from(c).to_digit(16);
    let b = part.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 3;
            }
            (c, _, _) => {
                out.push(if c == b'+' { b' ' } else { c });
                i += 1;
            }
        }
    }
    out
}

/// One `[[resource.rule]]`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its 1-based position, named in refusals and recordings (`rule 2`).
    pub index: usize,
    /// Upper-case methods; empty = any method.
    pub methods: Vec<String>,
    /// Empty = any path.
    pub paths: Vec<Glob>,
    /// The grant levels the rule applies to; empty = every level.
    pub levels: Vec<Access>,
    pub kube: KubeMatch,
    /// Host, query and header conditions.
    pub request: RequestMatch,
    pub action: Action,
}

impl Rule {
    fn matches(
        &self,
        method: &str,
        path: &NormalPath,
        granted: Access,
        kube: Option<&KubeRequest>,
        parts: &RequestParts<'_>,
    ) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (self.paths.is_empty() || self.paths.iter().any(|g| self.path_matches(g, path)))
            && (self.levels.is_empty() || self.levels.contains(&granted))
            && self.kube.matches(kube)
            && self.request.matches(parts, self.action != Action::Allow)
    }

    /// A `deny` or `approve` rule also matches the path's other spellings that some servers
    /// route to the same handler: any letter case (ASP.NET, IIS, Express by default) and
    /// without a trailing slash. An `allow` rule matches exactly, so no spelling widens it.
    fn path_matches(&self, glob: &Glob, path: &NormalPath) -> bool {
        if glob.matches(path) {
            return true;
        }
        if self.action == Action::Allow {
            return false;
        }
        // Most paths and patterns are lower case without a trailing slash: folding and
        // trimming would change nothing, and the exact match above was the answer.
        let plain = |s: &str| !s.bytes().any(|b| b.is_ascii_uppercase());
        let p = path.as_str();
        if plain(p) && plain(glob.as_str()) && !(p.len() > 1 && p.ends_with('/')) {
            return false;
        }
        let folded = p.to_ascii_lowercase();
        let trimmed = match folded.strip_suffix('/') {
            Some(t) if !t.is_empty() => t.to_owned(),
            _ => folded.clone(),
        };
        let pattern = Glob(glob.as_str().to_ascii_lowercase());
        [folded, trimmed]
            .into_iter()
            .any(|p| pattern.matches(&NormalPath::from_normalised(p)))
    }

    pub fn label(&self) -> String {
        format!("rule {}", self.index)
    }
}

/// The access level a method needs by default.
pub fn level_for(method: &str) -> Access {
    match method {
        "GET" | "HEAD" | "OPTIONS" => Access::Read,
        _ => Access::Write,
    }
}

/// The access level a request needs: for Kubernetes by verb (read: `get`, `list`, `watch`;
/// `exec` over a WebSocket GET still needs write), otherwise by method.
pub fn level_needed(method: &str, kube: Option<&KubeRequest>) -> Access {
    match kube {
        Some(r) if r.resource_request => {
            if r.reads() {
                Access::Read
            } else {
                Access::Write
            }
        }
        _ => level_for(method),
    }
}

/// The rule named when a Kubernetes `proxy` request meets no rule.
pub const PROXY_DEFAULT: &str =
    "the default for proxy (allow it with a rule naming verbs = [\"proxy\"])";

/// What the policy decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: Option<String>,
    },
    Deny {
        rule: String,
    },
    /// The grant's level is below what the method needs.
    NeedsLevel {
        needed: Access,
    },
    Approve {
        rule: String,
    },
}

/// Decides one request: the access level check first (a rule cannot lift a request above
/// the grant), then the first matching rule.
pub fn decide(rules: &[Rule], granted: Access, method: &str, path: &NormalPath) -> Decision {
    decide_kube(rules, granted, method, path, None, &RequestParts::default())
}

/// [`decide`], with the request as the Kubernetes API server reads it.
pub fn decide_kube(
    rules: &[Rule],
    granted: Access,
    method: &str,
    path: &NormalPath,
    kube: Option<&KubeRequest>,
    parts: &RequestParts<'_>,
) -> Decision {
    let needed = level_needed(method, kube);
    if needed > granted {
        return Decision::NeedsLevel { needed };
    }
    match rules
        .iter()
        .find(|r| r.matches(method, path, granted, kube, parts))
    {
        // `proxy` reaches past the API server to any pod, service or node endpoint (the API
        // server itself included, where Secrets would come back unmasked): only an explicit
        // rule allows it.
        None if kube.is_some_and(|k| k.verb == "proxy") => Decision::Deny {
            rule: PROXY_DEFAULT.to_owned(),
        },
        None => Decision::Allow { rule: None },
        Some(r) => match r.action {
            Action::Allow => Decision::Allow {
                rule: Some(r.label()),
            },
            Action::Deny => Decision::Deny { rule: r.label() },
            Action::Approve => Decision::Approve { rule: r.label() },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::normalize::normalize;

    fn g(p: &str) -> Glob {
        Glob::new(p).unwrap()
    }
    fn np(p: &str) -> NormalPath {
        normalize(p).unwrap()
    }

    /// The literal-ends shortcut never changes an answer: compared with the matcher alone on
    /// random patterns and paths over a small alphabet (so that matches are common).
    #[test]
    fn glob_shortcut_agrees_with_the_matcher() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"ab/*";
        let (mut matched, mut tried) = (0, 0);
        for _ in 0..200_000 {
            let plen = (next() % 8) as usize;
            let tlen = (next() % 10) as usize;
            let pat: Vec<u8> = (0..plen).map(|_| alphabet[(next() % 4) as usize]).collect();
            let text: Vec<u8> = (0..tlen).map(|_| alphabet[(next() % 3) as usize]).collect();
            let want = glob_match_dp(&pat, &text);
            assert_eq!(
                glob_match(&pat, &text),
                want,
                "pattern {:?}, text {:?}",
                String::from_utf8_lossy(&pat),
                String::from_utf8_lossy(&text)
            );
            tried += 1;
            matched += usize::from(want);
        }
        assert!(
            matched > tried / 50,
            "too few matches to mean anything: {matched}"
        );
    }

    #[test]
    fn glob_semantics() {
        assert!(g("/admin*").matches(&np("/admin")));
        assert!(g("/admin*").matches(&np("/administrator")));
        assert!(!g("/admin*").matches(&np("/admin/users")));
        assert!(g("/admin/**").matches(&np("/admin")));
        assert!(g("/admin/**").matches(&np("/admin/a/b")));
        assert!(!g("/admin/**").matches(&np("/administrator")));
        assert!(g("/api/*/pods").matches(&np("/api/v1/pods")));
        assert!(!g("/api/*/pods").matches(&np("/api/v1/x/pods")));
        assert!(g("/**").matches(&np("/")));
        assert!(g("/**").matches(&np("/x/y")));
        assert!(g("/a/**/z").matches(&np("/a/b/c/z")));
        // A `*` after a `**`: a greedy matcher gives up here; the deep star must absorb more.
        assert!(g("/**/b*").matches(&np("/x/b/y/b1")));
        assert!(!g("/**/b*").matches(&np("/x/b/y/c")));
        assert!(!g("/a").matches(&np("/a/")));
        assert!(Glob::new("admin").is_err());
        assert!(Glob::new("/a/***").is_err());
    }

    #[test]
    fn glob_does_not_blow_up_on_hostile_input() {
        let path = np(&format!("/{}", "a".repeat(10_000)));
        assert!(!g("/*a*a*a*a*a*a*a*a*b").matches(&path));
        assert!(!g("/**a**a**a**a**a**b").matches(&path));
    }

    fn only(action: Action, request: RequestMatch) -> Vec<Rule> {
        vec![Rule {
            index: 1,
            methods: vec![],
            paths: vec![],
            levels: vec![],
            kube: KubeMatch::default(),
            request,
            action,
        }]
    }

    /// Which rule (if any) decided a DELETE of `/x` with these parts.
    fn hit(rules: &[Rule], parts: RequestParts<'_>) -> Option<String> {
        match decide_kube(rules, Access::Write, "DELETE", &np("/x"), None, &parts) {
            Decision::Allow { rule } => rule,
            Decision::Deny { rule } | Decision::Approve { rule } => Some(rule),
            Decision::NeedsLevel { .. } => None,
        }
    }

    #[test]
    fn query_conditions_are_loose_for_deny_and_exact_for_allow() {
        let m = RequestMatch {
            query: vec![("force".into(), Wild::new("true"))],
            ..RequestMatch::default()
        };
        let q = |query| RequestParts {
            query: Some(query),
            ..RequestParts::default()
        };
        let deny = only(Action::Deny, m.clone());
        for query in [
            "force=true",
            "force=TRUE",
            "FORCE=true",
            "a=1&force=false&force=true",
            "force=false;force=true",
            "%66orce=tru%65",
            "force=true;x=1",
        ] {
            assert_eq!(hit(&deny, q(query)), Some("rule 1".into()), "{query}");
        }
        for query in ["force=false", "forced=true", "force", "x=force%3Dtrue"] {
            assert_eq!(hit(&deny, q(query)), None, "{query}");
        }
        assert_eq!(hit(&deny, RequestParts::default()), None);
        let allow = only(Action::Allow, m);
        assert_eq!(hit(&allow, q("force=true")), Some("rule 1".into()));
        for query in [
            "force=TRUE",
            "FORCE=true",
            "force=true&force=false",
            "force=false;force=true",
        ] {
            assert_eq!(hit(&allow, q(query)), None, "{query}");
        }
    }

    #[test]
    fn header_and_host_conditions_are_loose_for_deny_and_exact_for_allow() {
        let mut headers = HeaderMap::new();
        headers.append("x-mode", "safe".parse().unwrap());
        headers.append("x-mode", "Dangerous, other".parse().unwrap());
        let with = |h| RequestParts {
            headers: Some(h),
            host: Some("admin.api.internal"),
            ..RequestParts::default()
        };
        let m = RequestMatch {
            headers: vec![(HeaderName::from_static("x-mode"), Wild::new("dangerous"))],
            ..RequestMatch::default()
        };
        assert_eq!(
            hit(&only(Action::Approve, m.clone()), with(&headers)),
            Some("rule 1".into())
        );
        assert_eq!(hit(&only(Action::Allow, m), with(&headers)), None);
        let safe = RequestMatch {
            headers: vec![(HeaderName::from_static("x-mode"), Wild::new("s*"))],
            ..RequestMatch::default()
        };
        assert_eq!(
            hit(&only(Action::Allow, safe.clone()), with(&headers)),
            None,
            "every value must match"
        );
        let mut one = HeaderMap::new();
        one.insert("x-mode", "safe".parse().unwrap());
        assert_eq!(
            hit(&only(Action::Allow, safe), with(&one)),
            Some("rule 1".into())
        );

        let hosts = RequestMatch {
            hosts: vec![Wild::new("*.api.internal")],
            ..RequestMatch::default()
        };
        assert_eq!(
            hit(&only(Action::Deny, hosts.clone()), with(&one)),
            Some("rule 1".into())
        );
        let other = RequestParts {
            host: Some("api.internal"),
            ..RequestParts::default()
        };
        assert_eq!(hit(&only(Action::Deny, hosts.clone()), other), None);
        // No host at all: a deny rule on hosts still applies, an allow rule does not.
        assert_eq!(
            hit(&only(Action::Deny, hosts.clone()), RequestParts::default()),
            Some("rule 1".into())
        );
        assert_eq!(
            hit(&only(Action::Allow, hosts), RequestParts::default()),
            None
        );
    }

    #[test]
    fn value_patterns_cross_slashes_and_dots() {
        assert!(Wild::new("*").matches(b"a/b.c", false));
        assert!(Wild::new("application/*").matches(b"application/json; charset=utf-8", false));
        assert!(!Wild::new("application/*").matches(b"APPLICATION/json", false));
        assert!(Wild::new("application/*").matches(b"APPLICATION/json", true));
        assert!(!Wild::new("true").matches(b"true1", false));
    }

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                index: 1,
                methods: vec![],
                paths: vec![g("/admin*"), g("/admin/**")],
                levels: vec![],
                kube: KubeMatch::default(),
                request: RequestMatch::default(),
                action: Action::Deny,
            },
            Rule {
                index: 2,
                methods: vec!["DELETE".into()],
                paths: vec![g("/items/**")],
                levels: vec![],
                kube: KubeMatch::default(),
                request: RequestMatch::default(),
                action: Action::Approve,
            },
            Rule {
                index: 3,
                methods: vec!["GET".into()],
                paths: vec![g("/public/**")],
                levels: vec![],
                kube: KubeMatch::default(),
                request: RequestMatch::default(),
                action: Action::Allow,
            },
        ]
    }

    #[test]
    fn first_match_wins_and_levels_apply() {
        let r = rules();
        assert_eq!(
            decide(&r, Access::Read, "GET", &np("/public/x")),
            Decision::Allow {
                rule: Some("rule 3".into())
            }
        );
        assert_eq!(
            decide(&r, Access::Read, "GET", &np("/other")),
            Decision::Allow { rule: None }
        );
        assert_eq!(
            decide(&r, Access::Read, "DELETE", &np("/items/1")),
            Decision::NeedsLevel {
                needed: Access::Write
            }
        );
        assert_eq!(
            decide(&r, Access::Write, "DELETE", &np("/items/1")),
            Decision::Approve {
                rule: "rule 2".into()
            }
        );
        assert_eq!(
            decide(&r, Access::Admin, "delete", &np("/items/1")),
            Decision::Approve {
                rule: "rule 2".into()
            },
            "rule methods match case-insensitively, so a lower-case method cannot dodge a rule"
        );
        assert_eq!(
            decide(&r, Access::Write, "POST", &np("/x")),
            Decision::Allow { rule: None }
        );
    }

    #[test]
    fn deny_and_approve_rules_catch_other_cases_and_a_trailing_slash_allow_rules_do_not() {
        let r = rules();
        for raw in ["/ADMIN/users", "/Admin", "/aDmIn/x/", "/Admin/"] {
            assert_eq!(
                decide(&r, Access::Admin, "GET", &np(raw)),
                Decision::Deny {
                    rule: "rule 1".into()
                },
                "{raw}"
            );
        }
        assert_eq!(
            decide(&r, Access::Write, "DELETE", &np("/ITEMS/1/")),
            Decision::Approve {
                rule: "rule 2".into()
            }
        );
        assert_eq!(
            decide(&r, Access::Read, "GET", &np("/PUBLIC/x")),
            Decision::Allow { rule: None },
            "an allow rule does not widen to other spellings"
        );
        assert!(normalize("/admin;x=1/users").is_err());
        assert!(normalize("/public/..;/admin").is_err());
    }

    #[test]
    fn other_spellings_are_caught_whichever_side_carries_them() {
        // The pattern exact (no `**`), so only trimming the path's slash matches it; and a
        // pattern written in capitals against a path in lower case.
        let r = vec![Rule {
            index: 1,
            methods: vec![],
            paths: vec![g("/reports/export"), g("/Billing/**")],
            levels: vec![],
            kube: KubeMatch::default(),
            request: RequestMatch::default(),
            action: Action::Deny,
        }];
        for raw in ["/reports/export/", "/billing/x", "/billing", "/BILLING/X/"] {
            assert_eq!(
                decide(&r, Access::Admin, "GET", &np(raw)),
                Decision::Deny {
                    rule: "rule 1".into()
                },
                "{raw}"
            );
        }
        for raw in ["/reports/exports", "/reports/", "/", "/bill"] {
            assert_eq!(
                decide(&r, Access::Admin, "GET", &np(raw)),
                Decision::Allow { rule: None },
                "{raw}"
            );
        }
    }

    #[test]
    fn normalisation_attacks_hit_the_deny_rule() {
        let r = rules();
        for raw in [
            "/public/../admin",
            "//admin",
            "/%61dmin",
            "/public/./../admin/x",
            "/ADMIN/../admin",
        ] {
            let p = np(raw);
            assert_eq!(
                decide(&r, Access::Admin, "GET", &p),
                Decision::Deny {
                    rule: "rule 1".into()
                },
                "{raw} -> {p}"
            );
        }
        // The encoded-dot variant never reaches the rules: it is malformed (400).
        assert!(normalize("/public/%2e%2e/admin").is_err());
    }

    #[test]
    fn kubernetes_rules_in_the_api_servers_terms() {
        use crate::http::kube;
        let rules = vec![
            Rule {
                index: 1,
                methods: vec![],
                paths: vec![],
                levels: vec![Access::Read],
                kube: KubeMatch {
                    resources: vec!["secrets".into()],
                    ..KubeMatch::default()
                },
                request: RequestMatch::default(),
                action: Action::Deny,
            },
            Rule {
                index: 2,
                methods: vec![],
                paths: vec![],
                levels: vec![],
                kube: KubeMatch {
                    verbs: vec!["delete".into(), "deletecollection".into()],
                    namespaces: vec!["prod".into()],
                    ..KubeMatch::default()
                },
                request: RequestMatch::default(),
                action: Action::Approve,
            },
            Rule {
                index: 3,
                methods: vec![],
                paths: vec![],
                levels: vec![],
                kube: KubeMatch {
                    verbs: vec!["exec".into(), "attach".into()],
                    ..KubeMatch::default()
                },
                request: RequestMatch::default(),
                action: Action::Approve,
            },
        ];
        let d = |access, method: &str, target: &str| {
            let (path, query) = target
                .split_once('?')
                .map_or((target, None), |(p, q)| (p, Some(q)));
            let k = kube::parse(method, path, query).unwrap();
            decide_kube(
                &rules,
                access,
                method,
                &np(path),
                Some(&k),
                &RequestParts::default(),
            )
        };
        assert_eq!(
            d(Access::Read, "GET", "/api/v1/namespaces/x/pods"),
            Decision::Allow { rule: None }
        );
        assert_eq!(
            d(Access::Read, "GET", "/api/v1/namespaces/x/secrets"),
            Decision::Deny {
                rule: "rule 1".into()
            }
        );
        assert_eq!(
            d(Access::Read, "GET", "/api/v1/watch/namespaces/x/secrets"),
            Decision::Deny {
                rule: "rule 1".into()
            }
        );
        assert_eq!(
            d(Access::Write, "GET", "/api/v1/namespaces/x/secrets"),
            Decision::Allow { rule: None },
            "rule 1 is for read grants"
        );
        assert_eq!(
            d(Access::Write, "DELETE", "/api/v1/namespaces/prod/pods/web"),
            Decision::Approve {
                rule: "rule 2".into()
            }
        );
        assert_eq!(
            d(Access::Write, "DELETE", "/api/v1/namespaces/prod/pods"),
            Decision::Approve {
                rule: "rule 2".into()
            }
        );
        assert_eq!(
            d(Access::Write, "DELETE", "/api/v1/namespaces/dev/pods/web"),
            Decision::Allow { rule: None }
        );
        assert_eq!(
            d(
                Access::Read,
                "GET",
                "/api/v1/namespaces/x/pods/web/exec?command=sh"
            ),
            Decision::NeedsLevel {
                needed: Access::Write
            },
            "a WebSocket exec is a GET but not a read"
        );
        assert_eq!(
            d(Access::Write, "POST", "/api/v1/namespaces/x/pods/web/exec"),
            Decision::Approve {
                rule: "rule 3".into()
            }
        );
        assert_eq!(
            d(
                Access::Admin,
                "GET",
                "/api/v1/namespaces/default/services/https:kubernetes:443/proxy/api/v1/secrets"
            ),
            Decision::Deny {
                rule: PROXY_DEFAULT.into()
            },
            "proxy is refused unless a rule allows it"
        );
        let mut allowing = rules.clone();
        allowing.push(Rule {
            index: 4,
            methods: vec![],
            paths: vec![],
            levels: vec![],
            kube: KubeMatch {
                verbs: vec!["proxy".into()],
                ..KubeMatch::default()
            },
            request: RequestMatch::default(),
            action: Action::Allow,
        });
        let k = kube::parse("GET", "/api/v1/namespaces/d/pods/web/proxy/x", None).unwrap();
        assert_eq!(
            decide_kube(
                &allowing,
                Access::Write,
                "GET",
                &np("/api/v1/namespaces/d/pods/web/proxy/x"),
                Some(&k),
                &RequestParts::default(),
            ),
            Decision::Allow {
                rule: Some("rule 4".into())
            }
        );
    }
}
