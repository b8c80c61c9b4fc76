//! Keys of a `protocol = "http"` resource, validated into [`HttpResource`]:
//!
//! ```toml
//! [[resource]]
//! name = "api"
//! protocol = "http"
//! address = "api.internal:443"
//! client_tls = "auto"            # auto | require | disable
//! upstream_tls = "auto"          # auto (as the client) | verify-full | disable
//! upstream_ca = "/etc/ssl/certs/ca-certificates.crt"
//! upstream_server_name = "api.internal"
//! hosts = ["api.internal"]       # Host header values accepted
//! approval_timeout = "5m"
//! record_bodies = "4KiB"         # of each request and response body, in its record (0: none)
//! [resource.credentials.read]
//! header = "authorization"       # default
//! scheme = "bearer"              # bearer | basic | none
//! secret_file = "/etc/jitgate/api-read.token"
//! [[resource.rule]]
//! methods = ["DELETE"]
//! paths = ["/items/**"]
//! hosts = ["api.internal"]       # host globs (optional)
//! query = { force = "true" }     # parameter = value glob (optional; all must hold)
//! headers = { "x-dry-run" = "*" } # header = value glob (optional; all must hold)
//! action = "approve"             # allow | deny | approve
//! ```

use std::{collections::BTreeMap, path::PathBuf, str::FromStr as _, sync::Arc, time::Duration};

use hyper::header::HeaderName;
use serde::Deserialize;
use toml::Spanned;

use super::{
    inject::{Credential, Scheme},
    policy::{Action, Glob, KubeMatch, RequestMatch, Rule, Wild},
};
use crate::{
    config::{Access, ResourceConfig, Target},
    inspect::rules::MaskRule,
};

type S<T> = Spanned<T>;

/// The system's trust store: the default `upstream_ca` (Debian's `ca-certificates`).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Whether the gate terminates the client's TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTls {
    /// TLS when the client starts with a TLS handshake (`https://`), plaintext otherwise.
    Auto,
    /// Only TLS: a plaintext request is refused (the credential never rides a cleartext hop
    /// the workload chose).
    Require,
    /// Only plaintext `http://`.
    Disable,
}

/// How the gate talks to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// As the client did: verified TLS after a TLS client, plaintext after a plaintext one.
    Auto,
    /// Always verified TLS.
    VerifyFull,
    /// Always plaintext.
    Disable,
}

/// What the upstream is: any HTTP API, or a Kubernetes API server (requests read as
/// verbs on resources, Secret values masked, refusals as `Status` objects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Http,
    Kubernetes,
}

/// Everything specific to an HTTP resource.
#[derive(Debug)]
pub struct HttpResource {
    pub flavor: Flavor,
    pub client_tls: ClientTls,
    pub upstream_tls: UpstreamTls,
    /// The trust anchors for the upstream's certificate.
    pub upstream_ca: PathBuf,
    /// The name checked in the upstream's certificate (default: the host of `address`, or for
    /// an address given as an IP, the name the client asked for).
    pub upstream_server_name: Option<String>,
    /// Accepted `Host` values, lower-case, without port (empty: not checked; only for
    /// resources given by IP without `hosts`).
    pub hosts: Vec<String>,
    /// The credential injected per access level (absent: none injected at that level).
    pub credentials: BTreeMap<Access, Arc<Credential>>,
    pub rules: Vec<Rule>,
    /// How long a request held for approval waits.
    pub approval_timeout: Duration,
    /// Response masking: JSON paths (in [`MaskRule::columns`]) and detectors.
    pub masks: Vec<MaskRule>,
    /// Grants at or above this level see clear values (`None`: nobody).
    pub mask_exempt_access: Option<Access>,
    /// What happens to a response the masks cannot inspect (binary, compressed).
    pub uninspectable: Uninspectable,
    /// How much of each request and response body is kept in the request's record (0:
    /// none; sizes are recorded either way).
    pub record_bodies: usize,
}

/// The most of a body a record may keep.
pub const MAX_RECORD_BODIES: usize = 64 * 1024;

/// A response body masking cannot read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uninspectable {
    /// 502 to the client (fail closed; the default).
    Refuse,
    /// Passed unmasked (for resources that also serve files the rules are not about).
    Pass,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    #[serde(default)]
    paths: Vec<S<String>>,
    #[serde(default)]
    detectors: Vec<S<String>>,
    strategy: S<String>,
    #[serde(default)]
    exempt_identities: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    header: Option<S<String>>,
    scheme: Option<S<String>>,
    secret_file: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    methods: Vec<S<String>>,
    #[serde(default)]
    paths: Vec<S<String>>,
    #[serde(default)]
    levels: Vec<S<String>>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    action: S<String>,
}

/// The http keys of a `[[resource]]`, all optional in the raw shape.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    flavor: Option<S<String>>,
    client_tls: Option<S<String>>,
    upstream_tls: Option<S<String>>,
    upstream_ca: Option<S<String>>,
    upstream_server_name: Option<S<String>>,
    hosts: Option<Vec<S<String>>>,
    credentials: Option<S<BTreeMap<String, RawCredential>>>,
    rule: Option<Vec<S<RawRule>>>,
    approval_timeout: Option<S<String>>,
    mask: Option<Vec<S<RawMask>>>,
    mask_exempt_access: Option<S<String>>,
    uninspectable: Option<S<String>>,
    record_bodies: Option<S<String>>,
}

/// The keys a `[[resource]]` may have for `protocol = "http"`.
pub const KEYS: &[&str] = &[
    "flavor",
    "client_tls",
    "upstream_tls",
    "upstream_ca",
    "upstream_server_name",
    "hosts",
    "credentials",
    "rule",
    "approval_timeout",
    "mask",
    "mask_exempt_access",
    "uninspectable",
    "record_bodies",
];

/// The verbs a Kubernetes rule may name: RBAC's, plus the subresources the gate treats as
/// verbs of their own.
pub const KUBE_VERBS: &[&str] = &[
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "exec",
    "attach",
    "portforward",
    "proxy",
    "*",
];

/// A method token as RFC 9110 allows (rules name methods exactly; upper-cased).
fn valid_method(m: &str) -> bool {
    !m.is_empty()
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A host name or IP literal as a `Host` header carries it (no port).
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// Validates an http resource's keys (errors go to `cx`, with file, line and key).
pub fn configure(cx: &mut ResourceConfig<'_, '_>) -> HttpResource {
    let raw: RawHttp = cx.settings();
    let resource = cx.name().to_owned();
    let whole = cx.whole();
    let target = cx.target().clone();
    if let Target::Net { ports, .. } | Target::Host { ports, .. } = &target
        && ports.lo != ports.hi
    {
        let span = cx.address_span();
        cx.fail(span, "resource.address: an http resource has one port");
    }

    let flavor = cx.choice(
        "flavor",
        raw.flavor.as_ref(),
        &[("http", Flavor::Http), ("kubernetes", Flavor::Kubernetes)],
        Flavor::Http,
    );
    let client_tls = cx.choice(
        "client_tls",
        raw.client_tls.as_ref(),
        &[
            ("auto", ClientTls::Auto),
            ("require", ClientTls::Require),
            ("disable", ClientTls::Disable),
        ],
        ClientTls::Auto,
    );
    // `require` (encrypt without verifying) is not offered: the gate sends credentials there.
    let upstream_tls = if raw
        .upstream_tls
        .as_ref()
        .is_some_and(|v| v.get_ref() == "require")
    {
        let span = raw
            .upstream_tls
            .as_ref()
            .map_or(whole.clone(), Spanned::span);
        cx.fail(
            span,
            "resource.upstream_tls: an http resource verifies the upstream it sends credentials to; use verify-full (with upstream_ca) or disable",
        );
        UpstreamTls::VerifyFull
    } else {
        cx.choice(
            "upstream_tls",
            raw.upstream_tls.as_ref(),
            &[
                ("auto", UpstreamTls::Auto),
                ("verify-full", UpstreamTls::VerifyFull),
                ("disable", UpstreamTls::Disable),
            ],
            UpstreamTls::Auto,
        )
    };
    let upstream_ca = match &raw.upstream_ca {
        Some(v) => {
            let path = PathBuf::from(v.get_ref());
            if !path.is_file() {
                cx.fail(
                    v.span(),
                    format!("resource.upstream_ca: `{}` does not exist", path.display()),
                );
            }
            path
        }
        None => PathBuf::from(SYSTEM_CA_BUNDLE),
    };
    let upstream_server_name = raw.upstream_server_name.as_ref().map(|v| {
        if !valid_host(v.get_ref()) {
            cx.fail(
                v.span(),
                format!(
                    "resource.upstream_server_name: `{}` is not a host name",
                    v.get_ref()
                ),
            );
        }
        v.get_ref().to_ascii_lowercase()
    });

    let mut hosts: Vec<String> = Vec::new();
    match &raw.hosts {
        Some(list) => {
            for h in list {
                if valid_host(h.get_ref()) {
                    hosts.push(h.get_ref().to_ascii_lowercase());
                } else {
                    cx.fail(
                        h.span(),
                        format!(
                            "resource.hosts: `{}` is not a host name (give it without scheme or port)",
                            h.get_ref()
                        ),
                    );
                }
            }
            if list.is_empty() {
                cx.fail(
                    whole.clone(),
                    format!("resource `{resource}`: hosts is empty; give the names clients use, or leave it out"),
                );
            }
        }
        None => {
            if let Target::Host { name, .. } = &target {
                hosts.push(name.to_ascii_lowercase());
                if let Some(n) = &upstream_server_name
                    && !hosts.contains(n)
                {
                    hosts.push(n.clone());
                }
            }
        }
    }

    let mut credentials = BTreeMap::new();
    if let Some(table) = &raw.credentials {
        for (level, cred) in table.get_ref() {
            let access = match Access::from_str(level) {
                Ok(a) => a,
                Err(e) => {
                    cx.fail(table.span(), format!("resource.credentials.{level}: {e}"));
                    continue;
                }
            };
            let header = match &cred.header {
                None => HeaderName::from_static("authorization"),
                Some(h) => match HeaderName::from_str(&h.get_ref().to_ascii_lowercase()) {
                    Ok(name) => name,
                    Err(_) => {
                        cx.fail(
                            h.span(),
                            format!(
                                "resource.credentials.{level}.header: `{}` is not a header name",
                                h.get_ref()
                            ),
                        );
                        continue;
                    }
                },
            };
            if header == hyper::header::HOST || header == hyper::header::CONTENT_LENGTH {
                cx.fail(
                    cred.header.as_ref().map_or(table.span(), Spanned::span),
                    format!(
                        "resource.credentials.{level}.header: `{header}` cannot carry a credential"
                    ),
                );
            }
            let scheme = match &cred.scheme {
                None => Scheme::Bearer,
                Some(s) => Scheme::parse(s.get_ref()).unwrap_or_else(|| {
                    cx.fail(
                        s.span(),
                        format!(
                            "resource.credentials.{level}.scheme: `{}` is not bearer, basic or none",
                            s.get_ref()
                        ),
                    );
                    Scheme::Bearer
                }),
            };
            let file = PathBuf::from(cred.secret_file.get_ref());
            let credential = Credential::new(header, scheme, file);
            if let Err(e) = credential.load() {
                cx.fail(
                    cred.secret_file.span(),
                    format!("resource.credentials.{level}.secret_file: {e}"),
                );
            }
            credentials.insert(access, Arc::new(credential));
        }
    }

    // The credential goes where the workload connected: with one, the resource must name one
    // server (an address range would let the workload pick a listener of its own).
    if !credentials.is_empty()
        && let Target::Net { net, .. } = &target
        && net.prefix_len() != net.max_prefix_len()
    {
        let span = cx.address_span();
        cx.fail(
            span,
            format!("resource `{resource}`: an http resource with credentials names one server; give one address, not the range {net}"),
        );
    }
    let mut rules = Vec::new();
    for (i, rule) in raw.rule.unwrap_or_default().into_iter().enumerate() {
        let span = rule.span();
        let rule = rule.into_inner();
        let mut levels = Vec::new();
        for l in &rule.levels {
            match Access::from_str(l.get_ref()) {
                Ok(a) => levels.push(a),
                Err(e) => cx.fail(l.span(), format!("resource.rule.levels: {e}")),
            }
        }
        let kube = KubeMatch {
            verbs: rule.verbs.iter().map(|v| v.to_ascii_lowercase()).collect(),
            resources: rule
                .resources
                .iter()
                .map(|v| v.to_ascii_lowercase())
                .collect(),
            namespaces: rule.namespaces.clone(),
            names: rule.names.clone(),
            groups: rule.groups.clone(),
        };
        if !kube.is_empty() && flavor != Flavor::Kubernetes {
            cx.fail(
                span.clone(),
                "resource.rule: verbs, resources, namespaces, names and groups need flavor = \"kubernetes\"",
            );
        }
        if let Some(v) = kube
            .verbs
            .iter()
            .find(|v| !KUBE_VERBS.contains(&v.as_str()))
        {
            cx.fail(
                span.clone(),
                format!(
                    "resource.rule.verbs: `{v}` is not a Kubernetes verb (use {})",
                    KUBE_VERBS.join(", ")
                ),
            );
        }
        let action = Action::parse(rule.action.get_ref()).unwrap_or_else(|| {
            cx.fail(
                rule.action.span(),
                format!(
                    "resource.rule.action: `{}` is not allow, deny or approve",
                    rule.action.get_ref()
                ),
            );
            Action::Deny
        });
        let mut methods = Vec::new();
        for m in &rule.methods {
            if valid_method(m.get_ref()) {
                methods.push(m.get_ref().to_ascii_uppercase());
            } else {
                cx.fail(
                    m.span(),
                    format!("resource.rule.methods: `{}` is not a method", m.get_ref()),
                );
            }
        }
        let mut paths = Vec::new();
        for p in &rule.paths {
            match Glob::new(p.get_ref()) {
                Ok(g) => paths.push(g),
                Err(e) => cx.fail(p.span(), format!("resource.rule.paths: {e}")),
            }
        }
        let mut request = RequestMatch {
            hosts: rule
                .hosts
                .iter()
                .map(|h| Wild::new(&h.to_ascii_lowercase()))
                .collect(),
            query: rule
                .query
                .iter()
                .map(|(k, v)| (k.clone(), Wild::new(v)))
                .collect(),
            headers: Vec::new(),
        };
        for (name, value) in &rule.headers {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => request.headers.push((h, Wild::new(value))),
                Err(_) => cx.fail(
                    span.clone(),
                    format!("resource.rule.headers: `{name}` is not a header name"),
                ),
            }
        }
        rules.push(Rule {
            index: i + 1,
            methods,
            paths,
            levels,
            kube,
            request,
            action,
        });
    }
    let default_timeout = cx.daemon().hold_timeout;
    let approval_timeout = cx.duration(
        "approval_timeout",
        raw.approval_timeout.as_ref(),
        default_timeout,
    );
    let mut masks = Vec::new();
    for rule in raw.mask.unwrap_or_default() {
        let span = rule.span();
        let rule = rule.into_inner();
        let (strategy, detectors) = cx.mask_parts(&rule.strategy, &rule.detectors);
        let mut paths = Vec::new();
        for p in &rule.paths {
            match super::jsonmask::JsonPath::parse(p.get_ref()) {
                Ok(_) => paths.push(p.get_ref().clone()),
                Err(e) => cx.fail(p.span(), format!("resource.mask.paths: {e}")),
            }
        }
        if paths.is_empty() && detectors.is_empty() {
            cx.fail(
                span,
                "resource.mask: give paths (JSON paths) or detectors, or both",
            );
        }
        masks.push(MaskRule {
            columns: paths,
            detectors,
            strategy,
            exempt_identities: rule.exempt_identities,
        });
    }
    let mask_exempt_access = raw.mask_exempt_access.as_ref().and_then(|v| {
        Access::from_str(v.get_ref())
            .map_err(|e| cx.fail(v.span(), format!("resource.mask_exempt_access: {e}")))
            .ok()
    });
    let uninspectable = cx.choice(
        "uninspectable",
        raw.uninspectable.as_ref(),
        &[
            ("refuse", Uninspectable::Refuse),
            ("pass", Uninspectable::Pass),
        ],
        Uninspectable::Refuse,
    );
    let record_bodies = match raw.record_bodies.as_ref() {
        None => 0,
        Some(v) => match crate::config::limits::parse_size(v.get_ref()) {
            Ok(n) if n <= MAX_RECORD_BODIES => n,
            Ok(_) => {
                cx.fail(
                    v.span(),
                    format!("resource.record_bodies: at most {MAX_RECORD_BODIES} bytes (64KiB)"),
                );
                0
            }
            Err(e) => {
                cx.fail(v.span(), format!("resource.record_bodies: {e}"));
                0
            }
        },
    };
    HttpResource {
        record_bodies,
        masks,
        mask_exempt_access,
        uninspectable,
        flavor,
        client_tls,
        upstream_tls,
        upstream_ca,
        upstream_server_name,
        hosts,
        credentials,
        rules,
        approval_timeout,
    }
}
