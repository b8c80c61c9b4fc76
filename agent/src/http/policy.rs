//! Per-request policy for `http` resources: which access level a request needs, and what the
//! resource's `[[resource.rule]]` list decides for it.
//!
//! Rules are matched in order against the method and the *normalised* path
//! ([`super::normalize`]); the first match wins. Without a matching rule the request is
//! decided by access level alone: read = `GET`, `HEAD`, `OPTIONS`; write = every other method.

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

/// Glob matching by dynamic programming over (pattern token, text position): exact for any
/// mix of `*` and `**` (a greedy backtracking matcher can miss a match there, and a missed
/// match on a deny rule lets a request through), O(pattern x path), no recursion.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
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
    pub action: Action,
}

impl Rule {
    fn matches(
        &self,
        method: &str,
        path: &NormalPath,
        granted: Access,
        kube: Option<&KubeRequest>,
    ) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (self.paths.is_empty() || self.paths.iter().any(|g| self.path_matches(g, path)))
            && (self.levels.is_empty() || self.levels.contains(&granted))
            && self.kube.matches(kube)
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
        let folded = path.as_str().to_ascii_lowercase();
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
    decide_kube(rules, granted, method, path, None)
}

/// [`decide`], with the request as the Kubernetes API server reads it.
pub fn decide_kube(
    rules: &[Rule],
    granted: Access,
    method: &str,
    path: &NormalPath,
    kube: Option<&KubeRequest>,
) -> Decision {
    let needed = level_needed(method, kube);
    if needed > granted {
        return Decision::NeedsLevel { needed };
    }
    match rules
        .iter()
        .find(|r| r.matches(method, path, granted, kube))
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

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                index: 1,
                methods: vec![],
                paths: vec![g("/admin*"), g("/admin/**")],
                levels: vec![],
                kube: KubeMatch::default(),
                action: Action::Deny,
            },
            Rule {
                index: 2,
                methods: vec!["DELETE".into()],
                paths: vec![g("/items/**")],
                levels: vec![],
                kube: KubeMatch::default(),
                action: Action::Approve,
            },
            Rule {
                index: 3,
                methods: vec!["GET".into()],
                paths: vec![g("/public/**")],
                levels: vec![],
                kube: KubeMatch::default(),
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
                action: Action::Approve,
            },
        ];
        let d = |access, method: &str, target: &str| {
            let (path, query) = target
                .split_once('?')
                .map_or((target, None), |(p, q)| (p, Some(q)));
            let k = kube::parse(method, path, query).unwrap();
            decide_kube(&rules, access, method, &np(path), Some(&k))
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
            action: Action::Allow,
        });
        let k = kube::parse("GET", "/api/v1/namespaces/d/pods/web/proxy/x", None).unwrap();
        assert_eq!(
            decide_kube(
                &allowing,
                Access::Write,
                "GET",
                &np("/api/v1/namespaces/d/pods/web/proxy/x"),
                Some(&k)
            ),
            Decision::Allow {
                rule: Some("rule 4".into())
            }
        );
    }
}
