//! Keys of a `protocol = "postgres"` resource: upstream connection and credentials, client TLS,
//! masking rules and guardrails, validated into [`PostgresResource`].

use std::{collections::BTreeMap, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use crate::config::{Access, ResourceConfig, Target, parse_size};

type S<T> = Spanned<T>;
use crate::inspect::rules::MaskRule;

/// How the proxy talks to the real server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plaintext.
    Disable,
    /// TLS, certificate not verified (like libpq's `sslmode=require`).
    Require,
    /// TLS, certificate verified against `upstream_ca` and the server name.
    VerifyFull,
}

/// Whether the proxy answers a client's SSLRequest with TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTls {
    /// Answer `N`: plaintext on this loopback hop (libpq's default `prefer` falls back).
    Disable,
    /// Terminate TLS with a certificate for the destination, signed by the host-local CA.
    Enable,
}

/// One login the proxy uses upstream for grants of one access level.
#[derive(Clone, Debug)]
pub struct Credential {
    pub user: String,
    /// Read when a session starts (so rotations need no reload); `None` for trust auth.
    pub password_file: Option<PathBuf>,
}

/// What a guardrail does with a matching statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardAction {
    Deny,
    Approve,
    Allow,
}

/// A rule over statements.
#[derive(Clone, Debug)]
pub struct Guardrail {
    pub name: String,
    /// Statement kinds (`select`, `insert`, `update`, `delete`, `ddl`, `copy_from`, ...).
    pub kinds: Vec<String>,
    /// Table globs; the rule matches when any table touched matches.
    pub tables: Vec<String>,
    /// Function globs; the rule matches when any function called matches.
    pub functions: Vec<String>,
    /// Only UPDATE/DELETE without a WHERE clause.
    pub without_where: bool,
    /// Only for these identities (empty: everyone).
    pub identities: Vec<String>,
    pub action: GuardAction,
}

/// Statement kinds a guardrail may name.
pub const STATEMENT_KINDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "copy_from",
    "copy_to",
    "ddl",
    "create",
    "alter",
    "drop",
    "truncate",
    "privilege",
    "set",
    "transaction",
    "utility",
    "call",
    "do",
    "prepare",
    "execute",
    "explain",
    "lock",
    "listen",
];

/// Everything specific to a PostgreSQL resource.
#[derive(Clone, Debug)]
pub struct PostgresResource {
    /// Databases clients may open (empty: any).
    pub databases: Vec<String>,
    pub upstream_tls: UpstreamTls,
    pub upstream_ca: Option<PathBuf>,
    /// The name verified in the server certificate (default: the host of `address`).
    pub upstream_server_name: Option<String>,
    pub client_tls: ClientTls,
    pub credentials: BTreeMap<Access, Credential>,
    pub masks: Vec<MaskRule>,
    /// Grants at or above this level see clear values (`None`: nobody).
    pub mask_exempt_access: Option<Access>,
    pub guardrails: Vec<Guardrail>,
    /// Apply the built-in guardrails after the configured ones.
    pub default_guardrails: bool,
    /// How long a statement held for approval waits.
    pub approval_timeout: Duration,
    /// Largest Query or Parse message a client may send (the text of one round of
    /// statements): the gate holds and parses it whole.
    pub max_statement_size: usize,
}

impl PostgresResource {
    /// A resource with these masks and guardrails and every other setting at its default
    /// (built for the recorder's masker and for tests, not read from a config).
    pub fn with_rules(masks: Vec<MaskRule>, guardrails: Vec<Guardrail>) -> Self {
        Self {
            databases: vec![],
            upstream_tls: UpstreamTls::Disable,
            upstream_ca: None,
            upstream_server_name: None,
            client_tls: ClientTls::Disable,
            credentials: BTreeMap::new(),
            masks,
            mask_exempt_access: None,
            guardrails,
            default_guardrails: true,
            approval_timeout: Duration::from_secs(60),
            max_statement_size: DEFAULT_MAX_STATEMENT_SIZE,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: S<String>,
    password_file: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMask {
    #[serde(default)]
    columns: Vec<String>,
    #[serde(default)]
    detectors: Vec<S<String>>,
    strategy: S<String>,
    #[serde(default)]
    exempt_identities: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuardrail {
    name: Option<String>,
    #[serde(default)]
    kinds: Vec<S<String>>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    #[serde(default)]
    without_where: bool,
    #[serde(default)]
    identities: Vec<String>,
    action: S<String>,
}

/// The keys a `[[resource]]` may have for `protocol = "postgres"`.
pub const KEYS: &[&str] = &[
    "databases",
    "upstream_tls",
    "upstream_ca",
    "upstream_server_name",
    "client_tls",
    "credentials",
    "mask",
    "mask_exempt_access",
    "guardrail",
    "default_guardrails",
    "approval_timeout",
    "max_statement_size",
];

/// Default of `max_statement_size`: room for bulk INSERTs and 100 MiB literals.
pub const DEFAULT_MAX_STATEMENT_SIZE: usize = 256 << 20;

/// The server's own limit on a message (PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
pub const SERVER_MESSAGE_LIMIT: usize = (1 << 30) - 1;

/// The postgres keys of a `[[resource]]`, all optional in the raw shape.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    databases: Option<Vec<String>>,
    upstream_tls: Option<S<String>>,
    upstream_ca: Option<S<String>>,
    upstream_server_name: Option<String>,
    client_tls: Option<S<String>>,
    credentials: Option<S<BTreeMap<String, RawCredential>>>,
    mask: Option<Vec<S<RawMask>>>,
    mask_exempt_access: Option<S<String>>,
    guardrail: Option<Vec<S<RawGuardrail>>>,
    default_guardrails: Option<bool>,
    approval_timeout: Option<S<String>>,
    max_statement_size: Option<S<String>>,
}

/// Validates a postgres resource's keys (errors go to `cx`, with file, line and key).
pub fn configure(cx: &mut ResourceConfig<'_, '_>) -> PostgresResource {
    if let Target::Net { ports, .. } = cx.target()
        && ports.lo != ports.hi
    {
        let span = cx.address_span();
        cx.fail(span, "resource.address: a postgres resource has one port");
    }
    let raw: RawPostgres = cx.settings();
    let resource = &cx.name().to_owned();
    let whole = cx.whole();
    let default_approval_timeout = cx.daemon().hold_timeout;
    {
        let this = cx;
        let upstream_tls = match raw
            .upstream_tls
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("disable", _)) => UpstreamTls::Disable,
            Some(("require", _)) => UpstreamTls::Require,
            Some(("verify-full", _)) => UpstreamTls::VerifyFull,
            Some((other, span)) => {
                this.fail(
                    span,
                    format!(
                        "resource.upstream_tls: `{other}` is not disable, require or verify-full"
                    ),
                );
                UpstreamTls::Disable
            }
        };
        let upstream_ca = raw.upstream_ca.as_ref().map(|v| PathBuf::from(v.get_ref()));
        if upstream_tls == UpstreamTls::VerifyFull {
            match (&raw.upstream_ca, &upstream_ca) {
                (Some(span), Some(path)) if !path.is_file() => this.fail(
                    span.span(),
                    format!("resource.upstream_ca: `{}` does not exist", path.display()),
                ),
                (None, _) => this.fail(
                    whole.clone(),
                    format!("resource `{resource}`: upstream_tls = \"verify-full\" needs upstream_ca (the CA file that signed the server's certificate)"),
                ),
                _ => {}
            }
        }
        let client_tls = match raw
            .client_tls
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v.span()))
        {
            None | Some(("disable", _)) => ClientTls::Disable,
            Some(("enable", _)) => ClientTls::Enable,
            Some((other, span)) => {
                this.fail(
                    span,
                    format!("resource.client_tls: `{other}` is not disable or enable"),
                );
                ClientTls::Disable
            }
        };

        let mut credentials = BTreeMap::new();
        match &raw.credentials {
            None => this.fail(
                whole.clone(),
                format!("resource `{resource}`: a postgres resource needs [resource.credentials.read] (and .write/.admin for those levels)"),
            ),
            Some(table) => {
                for (level, cred) in table.get_ref() {
                    let access = match Access::from_str(level) {
                        Ok(a) => a,
                        Err(e) => {
                            this.fail(table.span(), format!("resource.credentials.{level}: {e}"));
                            continue;
                        }
                    };
                    if let Some(file) = &cred.password_file
                        && let Err(e) = crate::secret_file::check_path(std::path::Path::new(file.get_ref())) {
                            this.fail(
                                file.span(),
                                format!("resource.credentials.{level}.password_file: {e}"),
                            );
                        }
                    if cred.user.get_ref().is_empty() || cred.user.get_ref().contains('\0') {
                        this.fail(cred.user.span(), format!("resource.credentials.{level}.user: empty"));
                    }
                    credentials.insert(
                        access,
                        Credential {
                            user: cred.user.get_ref().clone(),
                            password_file: cred.password_file.as_ref().map(|f| PathBuf::from(f.get_ref())),
                        },
                    );
                }
            }
        }

        let mut masks = Vec::new();
        for rule in raw.mask.unwrap_or_default() {
            let span = rule.span();
            let rule = rule.into_inner();
            let (strategy, detectors) = this.mask_parts(&rule.strategy, &rule.detectors);
            if rule.columns.is_empty() && detectors.is_empty() {
                this.fail(
                    span,
                    "resource.mask: give columns (globs) or detectors, or both",
                );
            }
            masks.push(MaskRule {
                columns: rule
                    .columns
                    .iter()
                    .map(|c| c.to_ascii_lowercase())
                    .collect(),
                detectors,
                strategy,
                exempt_identities: rule.exempt_identities,
            });
        }
        let mask_exempt_access = raw.mask_exempt_access.as_ref().and_then(|v| {
            Access::from_str(v.get_ref())
                .map_err(|e| this.fail(v.span(), format!("resource.mask_exempt_access: {e}")))
                .ok()
        });

        let mut guardrails = Vec::new();
        for (i, g) in raw.guardrail.unwrap_or_default().into_iter().enumerate() {
            let span = g.span();
            let g = g.into_inner();
            let action = match g.action.get_ref().as_str() {
                "deny" => GuardAction::Deny,
                "approve" => GuardAction::Approve,
                "allow" => GuardAction::Allow,
                other => {
                    this.fail(
                        g.action.span(),
                        format!(
                            "resource.guardrail.action: `{other}` is not deny, approve or allow"
                        ),
                    );
                    GuardAction::Deny
                }
            };
            for k in &g.kinds {
                if !STATEMENT_KINDS.contains(&k.get_ref().as_str()) {
                    this.fail(
                        k.span(),
                        format!(
                            "resource.guardrail.kinds: `{}` is not a statement kind (use {})",
                            k.get_ref(),
                            STATEMENT_KINDS.join(", ")
                        ),
                    );
                }
            }
            if g.kinds.is_empty()
                && g.tables.is_empty()
                && g.functions.is_empty()
                && !g.without_where
            {
                this.fail(span, "resource.guardrail: give kinds, tables, functions or without_where to match on");
            }
            guardrails.push(Guardrail {
                name: g
                    .name
                    .unwrap_or_else(|| format!("{resource} guardrail #{}", i + 1)),
                kinds: g.kinds.into_iter().map(Spanned::into_inner).collect(),
                tables: g.tables.iter().map(|t| t.to_ascii_lowercase()).collect(),
                functions: g.functions.iter().map(|f| f.to_ascii_lowercase()).collect(),
                without_where: g.without_where,
                identities: g.identities,
                action,
            });
        }
        let approval_timeout = this.duration(
            "resource.approval_timeout",
            raw.approval_timeout.as_ref(),
            default_approval_timeout,
        );
        let max_statement_size = match raw.max_statement_size.as_ref() {
            None => DEFAULT_MAX_STATEMENT_SIZE,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if (1024..=SERVER_MESSAGE_LIMIT).contains(&n) => n,
                Ok(_) => {
                    this.fail(
                        v.span(),
                        "resource.max_statement_size: give 1KiB to 1GiB (the server's own limit)",
                    );
                    DEFAULT_MAX_STATEMENT_SIZE
                }
                Err(e) => {
                    this.fail(v.span(), format!("resource.max_statement_size: {e}"));
                    DEFAULT_MAX_STATEMENT_SIZE
                }
            },
        };
        PostgresResource {
            databases: raw.databases.unwrap_or_default(),
            upstream_tls,
            upstream_ca,
            upstream_server_name: raw.upstream_server_name,
            client_tls,
            credentials,
            masks,
            mask_exempt_access,
            guardrails,
            default_guardrails: raw.default_guardrails.unwrap_or(true),
            approval_timeout,
            max_statement_size,
        }
    }
}
