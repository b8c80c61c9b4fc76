//! The one TOML file that configures the host agent, validated before anything uses it.
//!
//! Parsing happens in two steps: serde reads the raw shape (with spans, and refusing unknown
//! keys), then [`Config::from_toml`] checks meaning (names exist, addresses parse, policies
//! make sense) and reports each problem with the key and the line it sits on.

pub mod address;
pub mod console;
pub mod limits;
pub mod webhooks;

pub use limits::{GrantLimits, parse_size};
pub use webhooks::{Endpoint, Webhook, WebhookFormat, WebhookTarget};

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

pub use self::address::{NetPorts, PortRange, Target};
pub use crate::grants::scope::HostsSpec;

/// Where the daemon and the CLI look for the config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/jitgate/jitgate.toml";
/// Where the control socket lives unless the config says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/jitgate/jitgate.sock";

/// A validation or parse error that names the file, line, key and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Access levels, ordered: a higher level includes the lower ones.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Read,
    Write,
    Admin,
}

impl Access {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Access {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown access level `{other}` (use read, write or admin)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    Deny,
    Allow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissingGrant {
    /// Close the connection at once.
    Reject,
    /// File a request and hold the connection until it is decided.
    Request,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    Auto,
    Manual,
}

/// Verbosity of the kernel programs' own log (aya-log). `off` compiles the log statements
/// out at load time, so they cost nothing on the connect path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLog {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl KernelLog {
    /// The value of aya-log's `AYA_LOG_LEVEL` global.
    pub const fn level(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
            Self::Trace => 5,
        }
    }
}

/// How many threads carry the proxy's sessions (`worker_threads`).
///
/// One thread means a single-threaded runtime: no work stealing and no wake-ups across
/// threads, which on a small host costs a sixth less CPU per proxied statement than two
/// workers (measured; see BENCHMARKS.md). The gate shares its host with the workloads it
/// gates, so `auto` takes half the CPUs the agent may use, at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerThreads {
    Auto,
    Fixed(usize),
}

impl WorkerThreads {
    /// The most `worker_threads` may name.
    pub const MAX: usize = 1024;

    /// The thread count for this host: `auto` looks at the CPUs this process may run on
    /// (affinity and cgroup quota included).
    pub fn resolve(self) -> usize {
        match self {
            Self::Fixed(n) => n,
            Self::Auto => std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1),
        }
    }
}

/// A unix user or group named in `launchers` or `approvers`, or (approvers only) a person
/// signed in to the web console: `oidc:EMAIL` names one identity, `oidc-group:NAME` a group
/// the identity provider puts in the ID token (see [`console::OidcConfig::groups_claim`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Principal {
    User(String),
    Group(String),
    Oidc(String),
    OidcGroup(String),
}

impl Principal {
    /// Whether this names a person of the web console rather than a unix user or group.
    pub fn is_oidc(&self) -> bool {
        matches!(self, Self::Oidc(_) | Self::OidcGroup(_))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(u) => f.write_str(u),
            Self::Group(g) => write!(f, "group:{g}"),
            Self::Oidc(who) => write!(f, "oidc:{who}"),
            Self::OidcGroup(g) => write!(f, "oidc-group:{g}"),
        }
    }
}

impl FromStr for Principal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let valid = |name: &str| {
            !name.is_empty()
                && name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        // What an identity provider puts in a claim: printable, no spaces, bounded.
        let valid_claim = |value: &str| {
            !value.is_empty()
                && value.len() <= 254
                && value.chars().all(|c| {
                    c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
                })
        };
        if let Some(who) = s.strip_prefix("oidc:") {
            return if valid_claim(who) {
                Ok(Self::Oidc(who.to_owned()))
            } else {
                Err(format!(
                    "`{s}`: `oidc:` must be followed by the identity the provider signs in (like oidc:alice@example.com)"
                ))
            };
        }
        if let Some(group) = s.strip_prefix("oidc-group:") {
            return if valid_claim(group) {
                Ok(Self::OidcGroup(group.to_owned()))
            } else {
                Err(format!(
                    "`{s}`: `oidc-group:` must be followed by a group name from the ID token's groups claim"
                ))
            };
        }
        match s.strip_prefix("group:") {
            Some(group) if valid(group) => Ok(Self::Group(group.to_owned())),
            None if valid(s) => Ok(Self::User(s.to_owned())),
            _ => Err(format!(
                "`{s}` is not a unix user name, `group:NAME`, `oidc:IDENTITY` or `oidc-group:NAME`"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was read from (for messages and reloads).
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub workloads: Vec<Workload>,
    pub resources: Vec<Resource>,
    pub policies: Vec<Policy>,
    /// Where notifications of audit events go (`[[webhook]]`).
    pub webhooks: Vec<Webhook>,
    /// The web console (`[console]`, served on `daemon.console_listen`); `None`: off.
    pub console: Option<console::ConsoleConfig>,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<String>,
    pub proxy_listen: SocketAddr,
    pub proxy_listen6: Option<SocketAddr>,
    pub gate_cgroup: String,
    pub bpf_pin_dir: PathBuf,
    pub egress: Egress,
    pub allow: Vec<NetPorts>,
    pub resolvers: Vec<SocketAddr>,
    pub hold_timeout: Duration,
    pub default_ttl: Duration,
    pub dns_min_ttl: Duration,
    pub dns_max_ttl: Duration,
    pub kernel_log: KernelLog,
    /// Where the host-local CA's certificate is published for workloads to trust.
    pub ca_cert: PathBuf,
    /// How long session records (and PostgreSQL statement records) are kept.
    pub session_retention: Duration,
    /// Where `/metrics` and `/healthz` are served; `None`: not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the web console is served (HTTPS); `None`: not at all. Needs `[console.oidc]`.
    pub console_listen: Option<SocketAddr>,
    /// On shutdown, how long sessions get to finish what is in flight before they are ended.
    pub drain_timeout: Duration,
    /// Threads of the async runtime; read at start only.
    pub worker_threads: WorkerThreads,
    /// Concurrency limits and the pre-grant timeout that keep one workload from taking the
    /// proxy (or a database's connection slots) from the others.
    pub limits: Limits,
    /// Where requests, grants, sessions and the audit log are kept (`[store]`).
    pub store: StoreConfig,
}

/// The state store backend: the embedded SQLite database in `state_dir` (the default), or a
/// PostgreSQL database shared by a fleet of hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreConfig {
    #[default]
    Sqlite,
    Postgres(crate::store::postgres::PostgresOptions),
}

impl StoreConfig {
    /// This host's name in grant scopes: the fleet's `host_id`, or
    /// [`crate::grants::scope::LOCAL_HOST`] for the embedded store (the only host).
    pub fn host_id(&self) -> &str {
        match self {
            Self::Sqlite => crate::grants::scope::LOCAL_HOST,
            Self::Postgres(o) => &o.host_id,
        }
    }
}

/// Where `host_id` comes from when `[store]` does not set it.
const MACHINE_ID: &str = "/etc/machine-id";

/// Read connections a PostgreSQL store keeps unless `pool_size` says otherwise.
const DEFAULT_POOL_SIZE: usize = 4;

/// How long a host cut off from a shared store trusts the grants it last confirmed, unless
/// `store_lease` says otherwise.
const DEFAULT_STORE_LEASE: Duration = Duration::from_secs(30);

/// How many bytes of records a host keeps in its local spool while its shared store is out
/// of reach, unless `spool_limit` says otherwise.
const DEFAULT_SPOOL_LIMIT: u64 = 64 << 20;

/// See [`DaemonConfig::limits`]. Defaults are sized so that one identity at its limits holds a
/// small share of the agent's descriptors and of a stock PostgreSQL's 100 connection slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From accept to the grant decision's start (PostgreSQL: SSL/GSS negotiation, the TLS
    /// handshake and the startup packet): a client that has not said what it wants by then is
    /// cut. Waiting for an approver is bounded by `hold_timeout` instead.
    pub startup_timeout: Duration,
    /// Connections of one identity between accept and its grant decision.
    pub max_pending_per_identity: usize,
    /// Granted sessions of one identity, over all its grants.
    pub max_sessions_per_identity: usize,
    /// Granted sessions riding on one grant (a resource may set its own).
    pub max_sessions_per_grant: usize,
    /// Upstream descriptors one identity's sessions hold beyond each session's first (an
    /// HTTP session's further connections, one per concurrent request, and its tunnels:
    /// exec, attach, port-forward, WebSocket), so that one identity cannot take the
    /// agent-wide count of descriptors from the others.
    pub max_extra_upstreams_per_identity: usize,
    /// Bytes of bodies the gate may hold whole at once, agent-wide (responses read to be
    /// masked, held requests read to be shown): see [`crate::protocol::buffers`].
    pub buffer_budget: usize,
    /// The most of `buffer_budget` one identity may hold (default half): one workload's
    /// connections cannot take what the others need.
    pub buffer_share: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            startup_timeout: Duration::from_secs(10),
            max_pending_per_identity: 32,
            max_sessions_per_identity: 64,
            max_sessions_per_grant: 16,
            max_extra_upstreams_per_identity: 128,
            buffer_budget: crate::protocol::buffers::DEFAULT_BUDGET,
            buffer_share: crate::protocol::buffers::DEFAULT_BUDGET / 2,
        }
    }
}

/// Most approvals a policy may ask for.
pub const MAX_APPROVALS: u32 = 10;

/// Bounds of `approval_max_age`: below the shortest, nobody could click "approve" after
/// signing in; past the longest, it asks for nothing a sign-in does not already give.
pub const MIN_APPROVAL_MAX_AGE: Duration = Duration::from_secs(10);
pub const MAX_APPROVAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Most `approval_acr` values a policy may list, and the longest one.
const MAX_ACR_VALUES: usize = 10;
const MAX_ACR_LEN: usize = 200;

/// What approving under a policy asks of how the approver signed in (step-up): approvals are
/// then made only by people of the web console whose sign-in at the identity provider is
/// recent enough and (with `acr`) of an accepted strength, such as with a second factor. A
/// unix user at the CLI or an API token proves neither, so neither can approve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepUp {
    /// The approver signed in at the provider at most this long ago (OIDC `auth_time`; the
    /// console asks the provider with `max_age`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_secs: Option<u64>,
    /// The sign-in's authentication context class (OIDC `acr`) is one of these; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acr: Vec<String>,
}

impl StepUp {
    /// Whether it asks for anything.
    pub fn is_required(&self) -> bool {
        self.max_age_secs.is_some() || !self.acr.is_empty()
    }

    /// The stricter of two: the shorter age, and only the context classes both accept (when
    /// both name some, and none are common, nothing can meet it: said so at approval time).
    #[must_use]
    pub fn and(&self, other: &Self) -> Self {
        let max_age_secs = match (self.max_age_secs, other.max_age_secs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let acr = if self.acr.is_empty() {
            other.acr.clone()
        } else if other.acr.is_empty() {
            self.acr.clone()
        } else {
            let common: Vec<String> = self
                .acr
                .iter()
                .filter(|a| other.acr.contains(a))
                .cloned()
                .collect();
            if common.is_empty() {
                // Nothing in common: a value no sign-in carries, so the requirement stays
                // and cannot be met rather than vanish.
                vec![UNSATISFIABLE_ACR.to_owned()]
            } else {
                common
            }
        };
        Self { max_age_secs, acr }
    }
}

/// "a sign-in within the last 5m with urn:example:mfa": what approving asks, as people read it.
impl fmt::Display for StepUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sign-in")?;
        if let Some(age) = self.max_age_secs {
            write!(
                f,
                " within the last {}",
                humantime::format_duration(Duration::from_secs(age))
            )?;
        }
        if !self.acr.is_empty() {
            write!(f, " with {}", self.acr.join(" or "))?;
        }
        Ok(())
    }
}

/// Stands for "no context class both policies accept" (contains a space, which an `acr`
/// value from a provider never does: see [`valid_acr`]).
pub const UNSATISFIABLE_ACR: &str = "(none common)";

/// An `acr` value as policy may name it: printable ASCII without spaces (they separate
/// `acr_values` in the sign-in request), bounded.
pub fn valid_acr(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_ACR_LEN && v.bytes().all(|b| b.is_ascii_graphic())
}

/// Highest value a concurrency limit may be set to (beyond it the descriptor limit rules).
pub const MAX_LIMIT: i64 = 100_000;

#[derive(Clone, Debug)]
pub struct Workload {
    pub identity: String,
    pub launchers: Vec<Principal>,
    /// A service cgroup (relative to the cgroup2 mount) gated in place.
    pub cgroup: Option<String>,
    /// A unix uid gated wherever its processes run.
    pub uid: Option<u32>,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct Resource {
    pub name: String,
    /// The protocol and its validated settings (`protocol = "..."` and its keys).
    pub settings: crate::protocol::Settings,
    pub target: Target,
    pub on_missing_grant: OnMissingGrant,
    pub hold_timeout: Duration,
    pub connect_access: Access,
    pub request_access: Access,
    pub request_ttl: Duration,
    /// Granted sessions riding on one grant for this resource (defaults to the daemon's).
    pub max_sessions_per_grant: usize,
    pub description: String,
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub name: String,
    /// Identity names, or `*`.
    pub identities: Vec<String>,
    /// Resource names, or `*`.
    pub resources: Vec<String>,
    pub access: Vec<Access>,
    pub max_ttl: Duration,
    pub approval: Approval,
    pub approvers: Vec<Principal>,
    /// Approvals from different people a request needs (`approvals`, default 1).
    pub approvals: u32,
    /// Principals of whom at least one must be among those approvals (`approvals_from`:
    /// e.g. one DBA and one from security).
    pub approvals_from: Vec<Principal>,
    /// What approving asks of the approver's sign-in (`approval_max_age`, `approval_acr`).
    pub step_up: StepUp,
    /// How much a grant under this policy may take ([`GrantLimits`]).
    pub limits: GrantLimits,
    /// Where a grant under this policy may be used (`hosts`; default: the host the request
    /// was filed on). See [`crate::grants::scope`].
    pub hosts: HostsSpec,
}

impl Policy {
    pub fn covers(&self, identity: &str, resource: &str, access: Access) -> bool {
        let any_or = |list: &[String], name: &str| list.iter().any(|x| x == "*" || x == name);
        any_or(&self.identities, identity)
            && any_or(&self.resources, resource)
            && self.access.contains(&access)
    }
}

impl Config {
    pub fn workload(&self, identity: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.identity == identity)
    }

    pub fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// The limits of a grant: the strictest of every policy that covers it.
    pub fn grant_limits(&self, identity: &str, resource: &str, access: Access) -> GrantLimits {
        self.policies
            .iter()
            .filter(|p| p.covers(identity, resource, access))
            .fold(GrantLimits::default(), |acc, p| acc.strictest(p.limits))
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid =
            |span: Option<std::ops::Range<usize>>, message: String| ConfigError::Invalid {
                path: path.to_owned(),
                line: span.map_or(1, |s| line_of(text, s.start)),
                message,
            };
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| invalid(e.span(), e.message().trim_end().to_owned()))?;
        let mut v = Validator {
            text,
            path,
            errors: Vec::new(),
            sqlite_store: false,
        };
        let config = v.config(path, raw);
        match v.errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(config),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------
// Raw shape, as serde reads it.

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    workload: Vec<S<RawWorkload>>,
    /// Read again from the text, with spans, by [`Validator::resources`]: which keys a
    /// resource may have depends on its protocol.
    #[serde(default, rename = "resource")]
    _resources: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    policy: Vec<S<RawPolicy>>,
    #[serde(default)]
    webhook: Vec<S<webhooks::RawWebhook>>,
    console: Option<S<console::RawConsole>>,
    store: Option<S<RawStore>>,
}

/// `[store]`: where the agent keeps its state (see [`StoreConfig`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<S<String>>,
    url: Option<S<String>>,
    password_file: Option<S<String>>,
    sslmode: Option<S<String>>,
    ca_file: Option<S<String>>,
    pool_size: Option<S<i64>>,
    host_id: Option<S<String>>,
    store_lease: Option<S<String>>,
    spool_limit: Option<S<String>>,
    change_log_retention: Option<S<String>>,
    require_sync_standby: Option<S<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_dir: Option<S<String>>,
    socket: Option<S<String>>,
    socket_mode: Option<S<String>>,
    socket_group: Option<S<String>>,
    proxy_listen: Option<S<String>>,
    proxy_listen6: Option<S<String>>,
    gate_cgroup: Option<S<String>>,
    bpf_pin_dir: Option<S<String>>,
    egress: Option<Egress>,
    #[serde(default)]
    allow: Vec<S<String>>,
    resolvers: Option<Vec<S<String>>>,
    hold_timeout: Option<S<String>>,
    default_ttl: Option<S<String>>,
    dns_min_ttl: Option<S<String>>,
    dns_max_ttl: Option<S<String>>,
    kernel_log: Option<KernelLog>,
    ca_cert: Option<S<String>>,
    session_retention: Option<S<String>>,
    metrics_listen: Option<S<String>>,
    console_listen: Option<S<String>>,
    drain_timeout: Option<S<String>>,
    worker_threads: Option<S<toml::Value>>,
    startup_timeout: Option<S<String>>,
    max_pending_per_identity: Option<S<i64>>,
    max_sessions_per_identity: Option<S<i64>>,
    max_sessions_per_grant: Option<S<i64>>,
    max_extra_upstreams_per_identity: Option<S<i64>>,
    buffer_budget: Option<S<String>>,
    buffer_share: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    identity: S<String>,
    #[serde(default)]
    launchers: Vec<S<String>>,
    cgroup: Option<S<String>>,
    uid: Option<S<i64>>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResource {
    name: S<String>,
    /// Read from the table before this is deserialized (it picks the keys that belong
    /// here); kept so that serde checks its type.
    #[expect(dead_code, reason = "read from the table by split_resource")]
    protocol: Option<S<String>>,
    address: S<String>,
    on_missing_grant: Option<OnMissingGrant>,
    hold_timeout: Option<S<String>>,
    connect_access: Option<S<String>>,
    request_access: Option<S<String>>,
    request_ttl: Option<S<String>>,
    max_sessions_per_grant: Option<S<i64>>,
    #[serde(default)]
    description: String,
}

/// The keys of [`RawResource`]: every other key of a `[[resource]]` belongs to its protocol.
const RESOURCE_KEYS: &[&str] = &[
    "name",
    "protocol",
    "address",
    "on_missing_grant",
    "hold_timeout",
    "connect_access",
    "request_access",
    "request_ttl",
    "max_sessions_per_grant",
    "description",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<S<String>>,
    identities: S<Vec<String>>,
    resources: S<Vec<String>>,
    access: S<Vec<String>>,
    max_ttl: Option<S<String>>,
    approval: Approval,
    #[serde(default)]
    approvers: Vec<S<String>>,
    approvals: Option<S<i64>>,
    #[serde(default)]
    approvals_from: Vec<S<String>>,
    approval_max_age: Option<S<String>>,
    approval_acr: Option<S<Vec<String>>>,
    limits: Option<S<limits::RawLimits>>,
    /// `"requesting"` (the default), `"fleet"`, or a list of hosts.
    hosts: Option<S<RawHosts>>,
}

/// A policy's `hosts`: one word or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawHosts {
    Word(String),
    List(Vec<String>),
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
    errors: Vec<ConfigError>,
    /// The store is the embedded one (set before policies are read): host lists mean
    /// nothing on a single host.
    sqlite_store: bool,
}

/// Names of identities and resources end up in cgroup paths and CLI arguments: keep them
/// boring.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Validator<'_> {
    fn fail(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.errors.push(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_of(self.text, span.start),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&S<String>>, default: Duration) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            _ => {
                self.fail(
                    value.span(),
                    format!(
                        "{key}: `{}` is not a duration (write e.g. `90s`, `15m`, `1h`)",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A concurrency limit: a whole number from 1 to [`MAX_LIMIT`].
    fn limit(&mut self, key: &str, value: Option<&S<i64>>, default: usize) -> usize {
        let Some(value) = value else { return default };
        match usize::try_from(*value.get_ref()) {
            Ok(n) if (1..=MAX_LIMIT).contains(value.get_ref()) => n,
            _ => {
                self.fail(
                    value.span(),
                    format!(
                        "{key}: `{}` is not a limit (a whole number from 1 to {MAX_LIMIT})",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn access(&mut self, key: &str, value: Option<&S<String>>, default: Access) -> Access {
        let Some(value) = value else { return default };
        Access::from_str(value.get_ref()).unwrap_or_else(|e| {
            self.fail(value.span(), format!("{key}: {e}"));
            default
        })
    }

    fn principals(&mut self, key: &str, values: &[S<String>]) -> Vec<Principal> {
        values
            .iter()
            .filter_map(|v| match Principal::from_str(v.get_ref()) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.fail(v.span(), format!("{key}: {e}"));
                    None
                }
            })
            .collect()
    }

    fn cgroup_path(&mut self, key: &str, value: &S<String>) -> String {
        let path = value.get_ref().trim_matches('/').to_owned();
        if path.is_empty()
            || path
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            self.fail(
                value.span(),
                format!(
                    "{key}: `{}` must be a cgroup path relative to the cgroup2 mount, like `jitgate.slice`",
                    value.get_ref()
                ),
            );
        }
        path
    }

    fn config(&mut self, path: &Path, raw: RawConfig) -> Config {
        let mut daemon = self.daemon(raw.daemon);
        daemon.store = self.store(raw.store);
        self.sqlite_store = daemon.store == StoreConfig::Sqlite;
        let workloads = self.workloads(&daemon, raw.workload);
        let resources = self.resources(&daemon);
        let policies = self.policies(&workloads, &resources, raw.policy);
        let webhooks = self.webhooks(raw.webhook);
        let console = self.console(&daemon, raw.console);
        Config {
            path: path.to_owned(),
            daemon,
            workloads,
            resources,
            policies,
            webhooks,
            console,
        }
    }

    fn daemon(&mut self, raw: RawDaemon) -> DaemonConfig {
        let string = |v: &Option<S<String>>, default: &str| {
            v.as_ref()
                .map_or_else(|| default.to_owned(), |s| s.get_ref().clone())
        };
        let socket_mode = match &raw.socket_mode {
            None => 0o660,
            Some(mode) => match u32::from_str_radix(mode.get_ref().trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => m,
                _ => {
                    self.fail(
                        mode.span(),
                        format!(
                            "socket_mode: `{}` is not an octal file mode like \"0660\"",
                            mode.get_ref()
                        ),
                    );
                    0o660
                }
            },
        };
        let listen = |v: &mut Self, key: &str, value: &S<String>| match address::parse_listen(
            value.get_ref(),
        ) {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                v.fail(
                        value.span(),
                        format!(
                            "{key}: the proxy must listen on a loopback address (127.0.0.1 or ::1): gated connections are steered to it on this host"
                        ),
                    );
                None
            }
            Err(e) => {
                v.fail(value.span(), format!("{key}: {e}"));
                None
            }
        };
        let default_listen: SocketAddr = "127.0.0.1:15001".parse().expect("literal");
        let proxy_listen = raw
            .proxy_listen
            .as_ref()
            .and_then(|v| listen(self, "proxy_listen", v))
            .unwrap_or(default_listen);
        if !proxy_listen.is_ipv4()
            && let Some(v) = &raw.proxy_listen
        {
            self.fail(
                v.span(),
                "proxy_listen: must be an IPv4 loopback address; use proxy_listen6 for IPv6",
            );
        }
        let proxy_listen6 = match &raw.proxy_listen6 {
            None => Some(SocketAddr::new(
                address::LOCALHOST6.into(),
                proxy_listen.port(),
            )),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => match listen(self, "proxy_listen6", v) {
                Some(addr) if addr.is_ipv6() && addr.port() == proxy_listen.port() => Some(addr),
                Some(_) => {
                    self.fail(
                        v.span(),
                        "proxy_listen6: must be an IPv6 loopback address with the same port as proxy_listen, or \"off\"",
                    );
                    None
                }
                None => None,
            },
        };
        let gate_cgroup = match &raw.gate_cgroup {
            Some(v) => self.cgroup_path("gate_cgroup", v),
            None => "jitgate.slice".to_owned(),
        };
        let allow = raw
            .allow
            .iter()
            .filter_map(|v| match NetPorts::from_str(v.get_ref()) {
                Ok(np) => Some(np),
                Err(e) => {
                    self.fail(v.span(), format!("allow: {e}"));
                    None
                }
            })
            .collect();
        let resolvers = match &raw.resolvers {
            Some(list) => list
                .iter()
                .filter_map(|v| match address::parse_resolver(v.get_ref()) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        self.fail(v.span(), format!("resolvers: {e}"));
                        None
                    }
                })
                .collect(),
            None => address::system_resolvers(
                &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
            ),
        };
        let socket_group = raw.socket_group.as_ref().map(|g| g.get_ref().clone());
        let hold_timeout = self.duration(
            "hold_timeout",
            raw.hold_timeout.as_ref(),
            Duration::from_secs(300),
        );
        let default_ttl = self.duration(
            "default_ttl",
            raw.default_ttl.as_ref(),
            Duration::from_secs(15 * 60),
        );
        let dns_min_ttl = self.duration(
            "dns_min_ttl",
            raw.dns_min_ttl.as_ref(),
            Duration::from_secs(5),
        );
        let dns_max_ttl = self.duration(
            "dns_max_ttl",
            raw.dns_max_ttl.as_ref(),
            Duration::from_secs(300),
        );
        let socket_path: PathBuf = string(&raw.socket, DEFAULT_SOCKET).into();
        let ca_cert = raw.ca_cert.as_ref().map_or_else(
            || {
                socket_path
                    .parent()
                    .unwrap_or(Path::new("/run/jitgate"))
                    .join("ca.pem")
            },
            |v| PathBuf::from(v.get_ref()),
        );
        let session_retention = self.duration(
            "session_retention",
            raw.session_retention.as_ref(),
            Duration::from_secs(30 * 24 * 3600),
        );
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => match address::parse_listen(v.get_ref()) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    self.fail(
                        v.span(),
                        format!("metrics_listen: {e} (or \"off\" for no endpoint)"),
                    );
                    None
                }
            },
        };
        if let Some(addr) = metrics_listen
            && (addr == proxy_listen || Some(addr) == proxy_listen6)
            && let Some(v) = &raw.metrics_listen
        {
            self.fail(
                v.span(),
                "metrics_listen: must differ from the proxy's address",
            );
        }
        let console_listen = match &raw.console_listen {
            None => None,
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => match address::parse_listen(v.get_ref()) {
                Ok(addr)
                    if addr == proxy_listen
                        || Some(addr) == proxy_listen6
                        || Some(addr) == metrics_listen =>
                {
                    self.fail(v.span(), "console_listen: must differ from the proxy's and the metrics endpoint's addresses");
                    None
                }
                Ok(addr) => Some(addr),
                Err(e) => {
                    self.fail(
                        v.span(),
                        format!("console_listen: {e} (or \"off\" for no console)"),
                    );
                    None
                }
            },
        };
        let drain_timeout = self.duration(
            "drain_timeout",
            raw.drain_timeout.as_ref(),
            Duration::from_secs(10),
        );
        let worker_threads = match &raw.worker_threads {
            None => WorkerThreads::Auto,
            Some(v) => match v.get_ref() {
                toml::Value::String(w) if w == "auto" => WorkerThreads::Auto,
                toml::Value::Integer(n) if (1..=WorkerThreads::MAX as i64).contains(n) => {
                    WorkerThreads::Fixed(*n as usize)
                }
                _ => {
                    self.fail(
                        v.span(),
                        format!(
                            "worker_threads: a thread count from 1 to {} or \"auto\"",
                            WorkerThreads::MAX
                        ),
                    );
                    WorkerThreads::Auto
                }
            },
        };
        let defaults = Limits::default();
        let buffer_budget = match &raw.buffer_budget {
            None => defaults.buffer_budget,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if n >= 4 << 20 => n,
                Ok(_) => {
                    self.fail(
                        v.span(),
                        "buffer_budget: at least 4MiB (one masked response may need that much)",
                    );
                    defaults.buffer_budget
                }
                Err(e) => {
                    self.fail(v.span(), format!("buffer_budget: {e}"));
                    defaults.buffer_budget
                }
            },
        };
        let limits = Limits {
            startup_timeout: self.duration(
                "startup_timeout",
                raw.startup_timeout.as_ref(),
                defaults.startup_timeout,
            ),
            max_pending_per_identity: self.limit(
                "max_pending_per_identity",
                raw.max_pending_per_identity.as_ref(),
                defaults.max_pending_per_identity,
            ),
            max_sessions_per_identity: self.limit(
                "max_sessions_per_identity",
                raw.max_sessions_per_identity.as_ref(),
                defaults.max_sessions_per_identity,
            ),
            max_sessions_per_grant: self.limit(
                "max_sessions_per_grant",
                raw.max_sessions_per_grant.as_ref(),
                defaults.max_sessions_per_grant,
            ),
            max_extra_upstreams_per_identity: self.limit(
                "max_extra_upstreams_per_identity",
                raw.max_extra_upstreams_per_identity.as_ref(),
                defaults.max_extra_upstreams_per_identity,
            ),
            buffer_budget,
            buffer_share: match &raw.buffer_share {
                None => buffer_budget / 2,
                Some(v) => match parse_size(v.get_ref()) {
                    Ok(n) if (1 << 20..=buffer_budget).contains(&n) => n,
                    Ok(_) => {
                        self.fail(
                            v.span(),
                            format!(
                                "buffer_share: from 1MiB up to buffer_budget ({} MiB)",
                                buffer_budget >> 20
                            ),
                        );
                        buffer_budget / 2
                    }
                    Err(e) => {
                        self.fail(v.span(), format!("buffer_share: {e}"));
                        buffer_budget / 2
                    }
                },
            },
        };
        DaemonConfig {
            metrics_listen,
            console_listen,
            drain_timeout,
            worker_threads,
            limits,
            state_dir: string(&raw.state_dir, "/var/lib/jitgate").into(),
            socket: string(&raw.socket, DEFAULT_SOCKET).into(),
            socket_mode,
            socket_group,
            proxy_listen,
            proxy_listen6,
            gate_cgroup,
            bpf_pin_dir: string(&raw.bpf_pin_dir, "/sys/fs/bpf/jitgate").into(),
            egress: raw.egress.unwrap_or(Egress::Deny),
            allow,
            resolvers,
            hold_timeout,
            default_ttl,
            dns_min_ttl,
            dns_max_ttl,
            kernel_log: raw.kernel_log.unwrap_or(KernelLog::Off),
            ca_cert,
            session_retention,
            store: StoreConfig::Sqlite,
        }
    }

    fn store(&mut self, raw: Option<S<RawStore>>) -> StoreConfig {
        let Some(raw) = raw else {
            return StoreConfig::Sqlite;
        };
        let table = raw.span();
        let raw = raw.into_inner();
        let backend = raw
            .backend
            .as_ref()
            .map_or("sqlite", |b| b.get_ref().as_str());
        match backend {
            "sqlite" => {
                let postgres_only = [
                    ("url", raw.url.as_ref().map(Spanned::span)),
                    (
                        "password_file",
                        raw.password_file.as_ref().map(Spanned::span),
                    ),
                    ("sslmode", raw.sslmode.as_ref().map(Spanned::span)),
                    ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
                    ("pool_size", raw.pool_size.as_ref().map(Spanned::span)),
                    ("host_id", raw.host_id.as_ref().map(Spanned::span)),
                    ("store_lease", raw.store_lease.as_ref().map(Spanned::span)),
                    ("spool_limit", raw.spool_limit.as_ref().map(Spanned::span)),
                    (
                        "change_log_retention",
                        raw.change_log_retention.as_ref().map(Spanned::span),
                    ),
                    (
                        "require_sync_standby",
                        raw.require_sync_standby.as_ref().map(Spanned::span),
                    ),
                ];
                for (key, span) in postgres_only {
                    if let Some(span) = span {
                        self.fail(
                            span,
                            format!("store.{key}: only a `backend = \"postgres\"` store has it; set the backend or remove the key"),
                        );
                    }
                }
                StoreConfig::Sqlite
            }
            "postgres" => self.postgres_store(table, raw),
            other => {
                let span = raw.backend.as_ref().map_or(table, Spanned::span);
                self.fail(
                    span,
                    format!("store.backend: `{other}` is not a store backend (write \"sqlite\" or \"postgres\")"),
                );
                StoreConfig::Sqlite
            }
        }
    }

    fn absolute_file(&mut self, key: &str, value: Option<&S<String>>) -> Option<PathBuf> {
        let value = value?;
        let path = PathBuf::from(value.get_ref());
        if path.is_absolute() {
            Some(path)
        } else {
            self.fail(
                value.span(),
                format!("{key}: `{}` must be an absolute path", value.get_ref()),
            );
            None
        }
    }

    fn postgres_store(&mut self, table: std::ops::Range<usize>, raw: RawStore) -> StoreConfig {
        let url = match &raw.url {
            None => {
                self.fail(
                    table.clone(),
                    "store.url: a postgres store needs url = \"postgresql://USER@HOST:PORT/DBNAME\"",
                );
                String::new()
            }
            Some(v) => {
                let text = v.get_ref();
                match text.parse::<tokio_postgres::Config>() {
                    Err(e) => self.fail(v.span(), format!("store.url: not a PostgreSQL url: {e}")),
                    Ok(_) if !(text.starts_with("postgresql://") || text.starts_with("postgres://")) => self.fail(
                        v.span(),
                        "store.url: write it as postgresql://USER@HOST:PORT/DBNAME",
                    ),
                    Ok(c) if c.get_password().is_some() => self.fail(
                        v.span(),
                        "store.url: the url carries a password, which would sit in a world-readable config; put it in a file (mode 0600) named by password_file",
                    ),
                    Ok(c) if c.get_user().is_none() => self.fail(
                        v.span(),
                        "store.url: name the database user (postgresql://USER@HOST/DBNAME)",
                    ),
                    // The agent always asks for read-write (the primary, whichever of the
                    // url's servers that is now); a url asking for a standby, or for any
                    // server, would have it write to (or trust) one that is not the primary.
                    Ok(c) if text.contains("target_session_attrs")
                        && c.get_target_session_attrs()
                            != tokio_postgres::config::TargetSessionAttrs::ReadWrite =>
                    {
                        self.fail(
                            v.span(),
                            "store.url: target_session_attrs must be read-write (the agent only ever writes to the primary, and asks for read-write by itself): remove it from the url or write target_session_attrs=read-write",
                        );
                    }
                    Ok(_) => {}
                }
                text.clone()
            }
        };
        let password_file = self.absolute_file("store.password_file", raw.password_file.as_ref());
        let ca_file = self.absolute_file("store.ca_file", raw.ca_file.as_ref());
        let sslmode = raw
            .sslmode
            .as_ref()
            .map_or("verify-full", |m| m.get_ref().as_str());
        let ca_file = match sslmode {
            "verify-full" => {
                if ca_file.is_none() && raw.ca_file.is_none() {
                    self.fail(
                        raw.sslmode.as_ref().map_or(table.clone(), Spanned::span),
                        "store.ca_file: sslmode = \"verify-full\" (the default) verifies the server against a CA: set ca_file to its PEM file, or write sslmode = \"disable\" for a store on a trusted network",
                    );
                }
                ca_file
            }
            "disable" => {
                if let Some(v) = &raw.ca_file {
                    self.fail(
                        v.span(),
                        "store.ca_file: sslmode = \"disable\" does not use TLS; remove ca_file or write sslmode = \"verify-full\"",
                    );
                }
                None
            }
            other => {
                let span = raw.sslmode.as_ref().map_or(table.clone(), Spanned::span);
                self.fail(
                    span,
                    format!("store.sslmode: `{other}` is not supported (write \"verify-full\" or \"disable\"; weaker TLS modes would let anyone on the path hand this host grants)"),
                );
                None
            }
        };
        let pool_size = match &raw.pool_size {
            None => DEFAULT_POOL_SIZE,
            Some(v) => match usize::try_from(*v.get_ref()) {
                Ok(n) if (1..=64).contains(&n) => n,
                _ => {
                    self.fail(
                        v.span(),
                        format!("store.pool_size: `{}` is not a pool size (a whole number from 1 to 64)", v.get_ref()),
                    );
                    DEFAULT_POOL_SIZE
                }
            },
        };
        let host_id = match &raw.host_id {
            Some(v) => {
                if !valid_name(v.get_ref()) {
                    self.fail(
                        v.span(),
                        format!("store.host_id: `{}` must be 1-63 characters of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit", v.get_ref()),
                    );
                }
                v.get_ref().clone()
            }
            None => {
                let id = std::fs::read_to_string(MACHINE_ID)
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default();
                if !valid_name(&id) {
                    self.fail(
                        table,
                        format!("store.host_id: not set, and {MACHINE_ID} holds no usable id; set host_id to a name unique in the fleet"),
                    );
                }
                id
            }
        };
        let lease = self.duration(
            "store.store_lease",
            raw.store_lease.as_ref(),
            DEFAULT_STORE_LEASE,
        );
        let spool_limit = match &raw.spool_limit {
            None => DEFAULT_SPOOL_LIMIT,
            Some(v) => match parse_size(v.get_ref()) {
                Ok(n) if (4 << 10..=16 << 30).contains(&n) => n as u64,
                Ok(_) => {
                    self.fail(
                        v.span(),
                        format!(
                            "store.spool_limit: `{}` is out of range (4KiB to 16GiB)",
                            v.get_ref()
                        ),
                    );
                    DEFAULT_SPOOL_LIMIT
                }
                Err(e) => {
                    self.fail(v.span(), format!("store.spool_limit: {e}"));
                    DEFAULT_SPOOL_LIMIT
                }
            },
        };
        let change_log_retention = self.change_log_retention(raw.change_log_retention.as_ref());
        StoreConfig::Postgres(crate::store::postgres::PostgresOptions {
            url,
            password_file,
            ca_file,
            pool_size,
            host_id,
            lease,
            spool_limit,
            change_log_retention,
            require_sync_standby: raw
                .require_sync_standby
                .as_ref()
                .is_some_and(|v| *v.get_ref()),
        })
    }

    /// `store.change_log_retention`: from an hour (a host away longer than the retention
    /// reloads everything; shorter would make every brief outage a full reload) to a year
    /// (the log is one small row per change, but it is read by every host that catches up).
    fn change_log_retention(&mut self, value: Option<&S<String>>) -> Duration {
        const MIN: Duration = Duration::from_secs(3600);
        const MAX: Duration = Duration::from_secs(366 * 24 * 3600);
        let default = crate::store::postgres::DEFAULT_CHANGE_LOG_RETENTION;
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if (MIN..=MAX).contains(&d) => d,
            Ok(_) => {
                self.fail(
                    value.span(),
                    format!(
                        "store.change_log_retention: `{}` is out of range (1h to 366d): how long the fleet keeps its change log; a host away longer reloads its grants",
                        value.get_ref()
                    ),
                );
                default
            }
            Err(e) => {
                self.fail(
                    value.span(),
                    format!(
                        "store.change_log_retention: `{}` is not a duration (write e.g. `7d`, `36h`): {e}",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn workloads(&mut self, daemon: &DaemonConfig, raw: Vec<S<RawWorkload>>) -> Vec<Workload> {
        let mut seen = HashSet::new();
        let mut uids = HashSet::new();
        let mut out = Vec::new();
        for entry in raw {
            let span = entry.span();
            let w = entry.into_inner();
            let identity = w.identity.get_ref().clone();
            if !valid_name(&identity) {
                self.fail(
                    w.identity.span(),
                    format!(
                        "workload.identity: `{identity}` must be 1-63 characters of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit"
                    ),
                );
            } else if !seen.insert(identity.clone()) {
                self.fail(
                    w.identity.span(),
                    format!("workload.identity: `{identity}` is defined twice"),
                );
            }
            let launchers = self.principals("workload.launchers", &w.launchers);
            if let Some(web) = launchers.iter().find(|p| p.is_oidc()) {
                self.fail(
                    span.clone(),
                    format!("workload.launchers: `{web}` names a web console person; launchers are unix users and groups (tasks start on this host)"),
                );
            }
            let cgroup = w
                .cgroup
                .as_ref()
                .map(|c| self.cgroup_path("workload.cgroup", c));
            if let Some(cg) = &cgroup {
                let root = &daemon.gate_cgroup;
                if cg == root
                    || cg.starts_with(&format!("{root}/"))
                    || root.starts_with(&format!("{cg}/"))
                {
                    self.fail(
                        span.clone(),
                        format!(
                            "workload.cgroup: `{cg}` overlaps the gate root `{root}`; a service cgroup must sit outside it"
                        ),
                    );
                }
            }
            let uid = match &w.uid {
                None => None,
                Some(v) => match u32::try_from(*v.get_ref()) {
                    Ok(0) => {
                        self.fail(
                            v.span(),
                            "workload.uid: root (0) cannot be gated by uid: root can leave any restriction; run the agent as an ordinary user",
                        );
                        None
                    }
                    Ok(uid) if !uids.insert(uid) => {
                        self.fail(
                            v.span(),
                            format!("workload.uid: {uid} belongs to two workloads"),
                        );
                        None
                    }
                    Ok(uid) => Some(uid),
                    Err(_) => {
                        self.fail(
                            v.span(),
                            format!("workload.uid: {} is not a uid", v.get_ref()),
                        );
                        None
                    }
                },
            };
            if uid.is_some() && cgroup.is_some() {
                self.fail(
                    span.clone(),
                    format!("workload `{identity}`: give either cgroup or uid, not both"),
                );
            }
            out.push(Workload {
                identity,
                launchers,
                cgroup,
                uid,
                description: w.description,
            });
        }
        out
    }

    fn resources(&mut self, daemon: &DaemonConfig) -> Vec<Resource> {
        let tables = match resource_tables(self.text) {
            Ok(t) => t,
            Err((span, message)) => {
                self.fail(span, message);
                return Vec::new();
            }
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for entry in tables {
            let whole = entry.span();
            let Some((r, own, protocol)) = self.split_resource(entry) else {
                continue;
            };
            let name = r.name.get_ref().clone();
            if !valid_name(&name) {
                self.fail(
                    r.name.span(),
                    format!(
                        "resource.name: `{name}` must be 1-63 characters of a-z, 0-9, `.`, `_`, `-`"
                    ),
                );
            } else if !seen.insert(name.clone()) {
                self.fail(
                    r.name.span(),
                    format!("resource.name: `{name}` is defined twice"),
                );
            }
            let target = match Target::from_str(r.address.get_ref()) {
                Ok(t) => t,
                Err(e) => {
                    self.fail(r.address.span(), format!("resource.address: {e}"));
                    continue;
                }
            };
            if let Target::Net { net, ports } = &target {
                let proxy_port = daemon.proxy_listen.port();
                let hits_proxy = ports.contains(proxy_port)
                    && (net.contains(&daemon.proxy_listen.ip())
                        || daemon.proxy_listen6.is_some_and(|a| net.contains(&a.ip())));
                if hits_proxy {
                    self.fail(
                        r.address.span(),
                        format!(
                            "resource.address: `{target}` includes the proxy listener {}",
                            daemon.proxy_listen
                        ),
                    );
                }
            }
            let connect_access = self.access(
                "resource.connect_access",
                r.connect_access.as_ref(),
                Access::Read,
            );
            let request_access = self.access(
                "resource.request_access",
                r.request_access.as_ref(),
                connect_access,
            );
            if request_access < connect_access {
                let span = r
                    .request_access
                    .as_ref()
                    .map(Spanned::span)
                    .unwrap_or_default();
                self.fail(
                    span,
                    format!(
                        "resource.request_access: `{request_access}` is below connect_access `{connect_access}`, so a granted request could never connect"
                    ),
                );
            }
            let mut cx = ResourceConfig {
                v: self,
                name: &name,
                whole: whole.clone(),
                address: r.address.span(),
                target: &target,
                daemon,
                own,
            };
            let Some(settings) = protocol.configure(&mut cx) else {
                continue;
            };
            out.push(Resource {
                name,
                settings,
                target,
                on_missing_grant: r.on_missing_grant.unwrap_or(OnMissingGrant::Reject),
                hold_timeout: self.duration(
                    "resource.hold_timeout",
                    r.hold_timeout.as_ref(),
                    daemon.hold_timeout,
                ),
                connect_access,
                request_access,
                request_ttl: self.duration(
                    "resource.request_ttl",
                    r.request_ttl.as_ref(),
                    daemon.default_ttl,
                ),
                max_sessions_per_grant: self.limit(
                    "resource.max_sessions_per_grant",
                    r.max_sessions_per_grant.as_ref(),
                    daemon.limits.max_sessions_per_grant,
                ),
                description: r.description,
            });
        }
        out
    }

    /// Splits a `[[resource]]` table into the common keys (deserialized, spans kept) and its
    /// protocol's own keys, which that protocol validates. A key of another protocol is
    /// named as such; any other unknown key is the common part's serde error.
    fn split_resource<'t>(
        &mut self,
        entry: Spanned<DeTable<'t>>,
    ) -> Option<(
        RawResource,
        Option<Spanned<DeTable<'t>>>,
        &'static dyn crate::protocol::Registered,
    )> {
        let whole = entry.span();
        let table = entry.into_inner();
        let text_of = |key: &str| {
            table.iter().find_map(|(k, v)| match v.get_ref() {
                DeValue::String(s) if k.get_ref() == key => Some((s.to_string(), v.span())),
                _ => None,
            })
        };
        let name = text_of("name").map_or_else(|| "?".to_owned(), |(n, _)| n);
        let protocol = match text_of("protocol") {
            None => crate::protocol::tcp_registration(),
            Some((p, span)) => crate::protocol::find(&p).unwrap_or_else(|| {
                self.fail(
                    span,
                    format!(
                        "resource.protocol: `{p}` is not supported (use {})",
                        crate::protocol::names_for_humans()
                    ),
                );
                crate::protocol::tcp_registration()
            }),
        };
        let mut common = DeTable::new();
        let mut own = DeTable::new();
        for (key, value) in table {
            let k = key.get_ref().as_ref();
            if RESOURCE_KEYS.contains(&k) {
                common.insert(key, value);
            } else if protocol.keys().contains(&k) {
                own.insert(key, value);
            } else if let Some(owners) = crate::protocol::owners_of(k) {
                self.fail(
                    whole.clone(),
                    format!("resource `{name}`: `{k}` only applies to protocol = {owners}"),
                );
            } else {
                // Left for serde to name, with the keys it expects.
                common.insert(key, value);
            }
        }
        let raw = match RawResource::deserialize(toml::de::Deserializer::from(Spanned::new(
            whole.clone(),
            common,
        ))) {
            Ok(r) => r,
            Err(e) => {
                self.fail(
                    e.span().unwrap_or_else(|| whole.clone()),
                    e.message().trim_end().to_owned(),
                );
                return None;
            }
        };
        let own = (!own.is_empty()).then(|| Spanned::new(whole, own));
        Some((raw, own, protocol))
    }

    fn policies(
        &mut self,
        workloads: &[Workload],
        resources: &[Resource],
        raw: Vec<S<RawPolicy>>,
    ) -> Vec<Policy> {
        let mut out = Vec::new();
        for (index, entry) in raw.into_iter().enumerate() {
            let span = entry.span();
            let p = entry.into_inner();
            let name = p
                .name
                .as_ref()
                .map_or_else(|| format!("policy-{}", index + 1), |n| n.get_ref().clone());
            for identity in p.identities.get_ref() {
                if identity != "*" && !workloads.iter().any(|w| &w.identity == identity) {
                    self.fail(
                        p.identities.span(),
                        format!("policy.identities: `{identity}` is not a [[workload]] identity"),
                    );
                }
            }
            for resource in p.resources.get_ref() {
                if resource != "*" && !resources.iter().any(|r| &r.name == resource) {
                    self.fail(
                        p.resources.span(),
                        format!("policy.resources: `{resource}` is not a [[resource]] name"),
                    );
                }
            }
            let mut access = Vec::new();
            for a in p.access.get_ref() {
                match Access::from_str(a) {
                    Ok(a) => access.push(a),
                    Err(e) => self.fail(p.access.span(), format!("policy.access: {e}")),
                }
            }
            if access.is_empty() {
                self.fail(
                    p.access.span(),
                    "policy.access: list at least one access level",
                );
            }
            let approvers = self.principals("policy.approvers", &p.approvers);
            if p.approval == Approval::Manual && approvers.is_empty() {
                self.fail(
                    span.clone(),
                    format!(
                        "policy `{name}`: approval = \"manual\" needs approvers (unix users or \"group:NAME\")"
                    ),
                );
            }
            let approvals_from = self.principals("policy.approvals_from", &p.approvals_from);
            for (raw, principal) in p.approvals_from.iter().zip(&approvals_from) {
                if !approvers.contains(principal) {
                    self.fail(
                        raw.span(),
                        format!("policy.approvals_from: `{principal}` is not one of the policy's approvers"),
                    );
                }
            }
            let approvals = match &p.approvals {
                None => 1,
                Some(n) => match u32::try_from(*n.get_ref()) {
                    Ok(n @ 1..=MAX_APPROVALS) => n,
                    _ => {
                        self.fail(
                            n.span(),
                            format!("policy.approvals: from 1 to {MAX_APPROVALS}"),
                        );
                        1
                    }
                },
            };
            if (approvals > 1 || !approvals_from.is_empty()) && p.approval != Approval::Manual {
                self.fail(
                    span.clone(),
                    format!(
                        "policy `{name}`: approvals and approvals_from need approval = \"manual\""
                    ),
                );
            }
            // Named users only: the count can be checked now (a group may grow).
            if approvers.iter().all(|a| matches!(a, Principal::User(_)))
                && !approvers.is_empty()
                && approvals as usize > approvers.len()
            {
                self.fail(
                    span.clone(),
                    format!(
                        "policy `{name}`: approvals = {approvals} can never be met by its {} approvers",
                        approvers.len()
                    ),
                );
            }
            let max_ttl = self.duration(
                "policy.max_ttl",
                p.max_ttl.as_ref(),
                Duration::from_secs(3600),
            );
            let step_up = self.step_up(&name, &span, &p, &approvers);
            let limits = match p.limits {
                None => GrantLimits::default(),
                Some(raw) => {
                    let span = raw.span();
                    raw.into_inner().validate().unwrap_or_else(|errors| {
                        for e in errors {
                            self.fail(span.clone(), e);
                        }
                        GrantLimits::default()
                    })
                }
            };
            let hosts = match p.hosts {
                None => HostsSpec::Requesting,
                Some(raw) => {
                    let span = raw.span();
                    match raw.into_inner() {
                        RawHosts::Word(w) if w == "requesting" => HostsSpec::Requesting,
                        RawHosts::Word(w) if w == "fleet" => HostsSpec::Fleet,
                        RawHosts::Word(w) => {
                            self.fail(
                                span,
                                format!("policy.hosts: `{w}` is not a scope: write \"requesting\" (the default: the host the request is filed on), \"fleet\", or a list of host_ids such as [\"db-runner-1\", \"ci-*\"]"),
                            );
                            HostsSpec::Requesting
                        }
                        RawHosts::List(list) => {
                            if list.is_empty() {
                                self.fail(
                                    span.clone(),
                                    "policy.hosts: an empty list lets no host use a grant; name hosts, or write \"requesting\" or \"fleet\"",
                                );
                            }
                            for e in &list {
                                if let Err(e) = crate::grants::scope::check_entry(e) {
                                    self.fail(span.clone(), format!("policy.hosts: {e}"));
                                }
                            }
                            if self.sqlite_store {
                                self.fail(
                                    span,
                                    "policy.hosts: a list of hosts needs a fleet ([store] backend = \"postgres\"); with the embedded store this is the only host: remove hosts or write \"requesting\"",
                                );
                            }
                            HostsSpec::List(list)
                        }
                    }
                }
            };
            out.push(Policy {
                hosts,
                name,
                identities: p.identities.into_inner(),
                resources: p.resources.into_inner(),
                access,
                max_ttl,
                approval: p.approval,
                approvers,
                approvals: approvals.max(u32::try_from(approvals_from.len()).unwrap_or(u32::MAX)),
                approvals_from,
                step_up,
                limits,
            });
        }
        out
    }

    /// `approval_max_age` and `approval_acr`: only people of the web console can meet them,
    /// so the policy must name some (`oidc:`, `oidc-group:`) and be decided by hand.
    fn step_up(
        &mut self,
        name: &str,
        span: &std::ops::Range<usize>,
        p: &RawPolicy,
        approvers: &[Principal],
    ) -> StepUp {
        let mut step_up = StepUp::default();
        if let Some(v) = &p.approval_max_age {
            match humantime::parse_duration(v.get_ref()) {
                Ok(d) if (MIN_APPROVAL_MAX_AGE..=MAX_APPROVAL_MAX_AGE).contains(&d) => {
                    step_up.max_age_secs = Some(d.as_secs());
                }
                _ => self.fail(
                    v.span(),
                    format!(
                        "policy.approval_max_age: `{}` must be a duration from {} to {} (like `5m`)",
                        v.get_ref(),
                        humantime::format_duration(MIN_APPROVAL_MAX_AGE),
                        humantime::format_duration(MAX_APPROVAL_MAX_AGE)
                    ),
                ),
            }
        }
        if let Some(v) = &p.approval_acr {
            let values = v.get_ref();
            if values.is_empty() || values.len() > MAX_ACR_VALUES {
                self.fail(
                    v.span(),
                    format!("policy.approval_acr: list from 1 to {MAX_ACR_VALUES} values the identity provider puts in `acr` (like \"urn:example:mfa\")"),
                );
            }
            for a in values {
                if valid_acr(a) {
                    if !step_up.acr.contains(a) {
                        step_up.acr.push(a.clone());
                    }
                } else {
                    self.fail(
                        v.span(),
                        format!("policy.approval_acr: `{a}` is not an acr value (printable, no spaces, at most {MAX_ACR_LEN} characters)"),
                    );
                }
            }
        }
        if step_up.is_required() {
            if p.approval != Approval::Manual {
                self.fail(
                    span.clone(),
                    format!("policy `{name}`: approval_max_age and approval_acr need approval = \"manual\""),
                );
            } else if !approvers.iter().any(Principal::is_oidc) {
                self.fail(
                    span.clone(),
                    format!("policy `{name}`: approval_max_age and approval_acr are met only by people signed in to the web console; name some among its approvers (\"oidc:EMAIL\" or \"oidc-group:NAME\")"),
                );
            }
        }
        step_up
    }
}

/// The `[[resource]]` tables of the document, with their spans.
fn resource_tables(
    text: &str,
) -> Result<Vec<Spanned<DeTable<'_>>>, (std::ops::Range<usize>, String)> {
    let root = DeTable::parse(text).map_err(|e| {
        (
            e.span().unwrap_or_default(),
            e.message().trim_end().to_owned(),
        )
    })?;
    let Some((_, resources)) = root
        .into_inner()
        .into_iter()
        .find(|(k, _)| k.get_ref() == "resource")
    else {
        return Ok(Vec::new());
    };
    let span = resources.span();
    let DeValue::Array(items) = resources.into_inner() else {
        return Err((span, "resource: expected [[resource]] tables".into()));
    };
    items
        .into_iter()
        .map(|item| {
            let span = item.span();
            match item.into_inner() {
                DeValue::Table(t) => Ok(Spanned::new(span, t)),
                _ => Err((span, "resource: expected [[resource]] tables".into())),
            }
        })
        .collect()
}

/// One `[[resource]]` as its protocol validates it: the protocol's own keys, the common
/// settings already validated, and the validator's error reporting (file, line and key).
pub struct ResourceConfig<'v, 't> {
    v: &'v mut Validator<'t>,
    name: &'v str,
    whole: std::ops::Range<usize>,
    address: std::ops::Range<usize>,
    target: &'v Target,
    daemon: &'v DaemonConfig,
    own: Option<Spanned<DeTable<'t>>>,
}

impl<'v> ResourceConfig<'v, '_> {
    /// The resource's name.
    pub fn name(&self) -> &'v str {
        self.name
    }

    /// The whole `[[resource]]` table's span (for errors about a missing key).
    pub fn whole(&self) -> std::ops::Range<usize> {
        self.whole.clone()
    }

    /// The span of `address`.
    pub fn address_span(&self) -> std::ops::Range<usize> {
        self.address.clone()
    }

    pub fn target(&self) -> &'v Target {
        self.target
    }

    pub fn daemon(&self) -> &'v DaemonConfig {
        self.daemon
    }

    /// Reports a problem at `span`.
    pub fn fail(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        self.v.fail(span, message);
    }

    /// A positive duration (`30s`, `5m`), or `default` when not given.
    pub fn duration(
        &mut self,
        key: &str,
        value: Option<&S<String>>,
        default: Duration,
    ) -> Duration {
        self.v.duration(key, value, default)
    }

    /// One of a key's words (`client_tls = "auto"`): the value `choices` gives it, `default`
    /// when the key is absent; another word is reported (naming the words there are) and
    /// gives `default`.
    pub fn choice<T: Copy>(
        &mut self,
        key: &str,
        value: Option<&S<String>>,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(v) = value else { return default };
        if let Some((_, t)) = choices.iter().find(|(w, _)| *w == v.get_ref()) {
            return *t;
        }
        let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
        let listed = match words.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => words.join(""),
        };
        self.fail(
            v.span(),
            format!("resource.{key}: `{}` is not {listed}", v.get_ref()),
        );
        default
    }

    /// A `[[resource.mask]]` rule's strategy and detectors, whatever names it by (columns for
    /// PostgreSQL, JSON paths for HTTP); unknown ones are reported.
    pub fn mask_parts(
        &mut self,
        strategy: &S<String>,
        detectors: &[S<String>],
    ) -> (
        crate::inspect::rules::Strategy,
        Vec<crate::inspect::rules::Detector>,
    ) {
        use crate::inspect::rules::{Detector, Strategy};
        let strategy = Strategy::from_str(strategy.get_ref()).unwrap_or_else(|e| {
            self.fail(strategy.span(), format!("resource.mask.strategy: {e}"));
            Strategy::Redact
        });
        let mut found = Vec::new();
        for d in detectors {
            match Detector::from_str(d.get_ref()) {
                Ok(d) => found.push(d),
                Err(e) => self.fail(d.span(), format!("resource.mask.detectors: {e}")),
            }
        }
        (strategy, found)
    }

    /// The protocol's keys in its own raw shape (spans kept); its default when it has none
    /// or they do not fit the shape (that error is reported).
    pub fn settings<T: serde::de::DeserializeOwned + Default>(&mut self) -> T {
        let Some(own) = self.own.take() else {
            return T::default();
        };
        let whole = own.span();
        T::deserialize(toml::de::Deserializer::from(own)).unwrap_or_else(|e| {
            self.v
                .fail(e.span().unwrap_or(whole), e.message().trim_end().to_owned());
            T::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[daemon]
state_dir = "/tmp/jg"
egress = "deny"
allow = ["127.0.0.53/32:53"]
resolvers = ["127.0.0.53"]

[[workload]]
identity = "ci-bot"
launchers = ["root", "alice"]

[[resource]]
name = "orders-db"
protocol = "tcp"
address = "10.0.0.5:5432"
on_missing_grant = "reject"

[[policy]]
identities = ["ci-bot"]
resources = ["orders-db"]
access = ["read"]
max_ttl = "1h"
approval = "manual"
approvers = ["alice", "group:dba"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), text)
    }

    #[test]
    fn sample_parses() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.daemon.proxy_listen, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.daemon.proxy_listen6, Some("[::1]:15001".parse().unwrap()));
        assert_eq!(c.daemon.gate_cgroup, "jitgate.slice");
        assert_eq!(c.daemon.socket_mode, 0o660);
        assert_eq!(c.resources[0].target.to_string(), "10.0.0.5:5432");
        assert_eq!(c.policies[0].name, "policy-1");
        assert_eq!(
            c.policies[0].approvers,
            vec![
                Principal::User("alice".into()),
                Principal::Group("dba".into())
            ]
        );
        assert!(c.policies[0].covers("ci-bot", "orders-db", Access::Read));
        assert!(!c.policies[0].covers("ci-bot", "orders-db", Access::Write));
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = error_of(&SAMPLE.replace("10.0.0.5:5432", "10.0.0.5"));
        assert!(e.starts_with("test.toml:15: resource.address:"), "{e}");
        let e = error_of(&SAMPLE.replace("\"orders-db\"]", "\"nope\"]"));
        assert!(
            e.starts_with("test.toml:20: policy.resources: `nope`"),
            "{e}"
        );
        let e = error_of(&SAMPLE.replace("max_ttl = \"1h\"", "max_ttl = \"forever\""));
        assert!(e.starts_with("test.toml:22: policy.max_ttl:"), "{e}");
        let e = error_of(&SAMPLE.replace("egress = \"deny\"", "egres = \"deny\""));
        assert!(
            e.contains("test.toml:4:") && e.contains("unknown field `egres`"),
            "{e}"
        );
        let e = error_of(&SAMPLE.replace("approvers = [\"alice\", \"group:dba\"]", ""));
        assert!(e.contains("needs approvers"), "{e}");
        let e = error_of(&SAMPLE.replace("[daemon]", "[daemon]\nproxy_listen = \"0.0.0.0:15001\""));
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn several_approvals_are_checked_against_the_approvers() {
        let c = parse(&SAMPLE.replace(
            "approvers = [\"alice\", \"group:dba\"]",
            "approvers = [\"alice\", \"group:dba\"]\napprovals = 2\napprovals_from = [\"group:dba\"]",
        ))
        .unwrap();
        assert_eq!(c.policies[0].approvals, 2);
        assert_eq!(
            c.policies[0].approvals_from,
            [Principal::Group("dba".into())]
        );
        for (keys, want) in [
            (
                "approvers = [\"alice\", \"bob\"]\napprovals = 3",
                "can never be met by its 2 approvers",
            ),
            (
                "approvers = [\"alice\"]\napprovals_from = [\"bob\"]",
                "`bob` is not one of the policy's approvers",
            ),
            (
                "approvers = [\"alice\"]\napprovals = 0",
                "policy.approvals: from 1 to 10",
            ),
        ] {
            let e =
                parse(&SAMPLE.replace("approvers = [\"alice\", \"group:dba\"]", keys)).unwrap_err();
            assert!(e.to_string().contains(want), "{keys}: {e}");
        }
        let e = parse(&SAMPLE.replace(
            "approval = \"manual\"\napprovers = [\"alice\", \"group:dba\"]",
            "approval = \"auto\"\napprovals = 2",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("need approval = \"manual\""), "{e}");
    }

    #[test]
    fn step_up_keys_are_checked() {
        let approvers = "approvers = [\"alice\", \"group:dba\"]";
        let c = parse(&SAMPLE.replace(
            approvers,
            "approvers = [\"alice\", \"oidc-group:dba\"]\napproval_max_age = \"5m\"\napproval_acr = [\"urn:example:mfa\", \"urn:example:mfa\"]",
        ))
        .unwrap();
        assert_eq!(
            c.policies[0].step_up,
            StepUp {
                max_age_secs: Some(300),
                acr: vec!["urn:example:mfa".into()],
            }
        );
        assert!(!parse(SAMPLE).unwrap().policies[0].step_up.is_required());
        for (keys, want) in [
            (
                "approvers = [\"alice\", \"group:dba\"]\napproval_max_age = \"5m\"",
                "name some among its approvers",
            ),
            (
                "approvers = [\"oidc:a@example.com\"]\napproval_max_age = \"5s\"",
                "from 10s to 1day",
            ),
            (
                "approvers = [\"oidc:a@example.com\"]\napproval_max_age = \"2days\"",
                "from 10s to 1day",
            ),
            (
                "approvers = [\"oidc:a@example.com\"]\napproval_max_age = \"soon\"",
                "policy.approval_max_age",
            ),
            (
                "approvers = [\"oidc:a@example.com\"]\napproval_acr = [\"mfa otp\"]",
                "is not an acr value",
            ),
            (
                "approvers = [\"oidc:a@example.com\"]\napproval_acr = []",
                "list from 1 to 10",
            ),
        ] {
            let e = parse(&SAMPLE.replace(approvers, keys)).unwrap_err();
            assert!(e.to_string().contains(want), "{keys}: {e}");
        }
        let e = parse(&SAMPLE.replace(
            "approval = \"manual\"\napprovers = [\"alice\", \"group:dba\"]",
            "approval = \"auto\"\napprovers = [\"oidc:a@example.com\"]\napproval_acr = [\"mfa\"]",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("need approval = \"manual\""), "{e}");
    }

    #[test]
    fn policy_hosts_default_to_the_requesting_host() {
        use crate::grants::scope::HostsSpec;
        assert_eq!(
            parse(SAMPLE).unwrap().policies[0].hosts,
            HostsSpec::Requesting
        );
        assert_eq!(parse(SAMPLE).unwrap().daemon.store.host_id(), "local");
        let with = |hosts: &str| {
            SAMPLE.replace(
                "max_ttl = \"1h\"",
                &format!("max_ttl = \"1h\"\nhosts = {hosts}"),
            )
        };
        let fleet = "\n[store]\nbackend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"host-a\"\n";
        assert_eq!(
            parse(&with("\"fleet\"")).unwrap().policies[0].hosts,
            HostsSpec::Fleet
        );
        assert_eq!(
            parse(&with("\"requesting\"")).unwrap().policies[0].hosts,
            HostsSpec::Requesting
        );
        let c = parse(&(with("[\"db-runner-1\", \"ci-*\"]") + fleet)).unwrap();
        assert_eq!(
            c.policies[0].hosts,
            HostsSpec::List(vec!["db-runner-1".into(), "ci-*".into()])
        );
        assert_eq!(c.daemon.store.host_id(), "host-a");
        for (hosts, want) in [
            (
                "\"everywhere\"",
                "test.toml:23: policy.hosts: `everywhere` is not a scope",
            ),
            ("[]", "an empty list lets no host use a grant"),
            ("[\"*\"]", "write hosts = \"fleet\""),
            ("[\"c*i\"]", "`c*i` is not a host"),
            ("[\"Web-1\"]", "`Web-1` is not a host"),
            ("[\"fleet\"]", "a scope of its own"),
        ] {
            let e = error_of(&(with(hosts) + fleet));
            assert!(e.contains(want), "{hosts}: {e}");
        }
        // One host (the embedded store): a host list means nothing, and says so.
        let e = error_of(&with("[\"db-runner-1\"]"));
        assert!(e.contains("a list of hosts needs a fleet"), "{e}");
    }

    #[test]
    fn the_store_is_sqlite_unless_a_valid_postgres_table_says_otherwise() {
        assert_eq!(parse(SAMPLE).unwrap().daemon.store, StoreConfig::Sqlite);
        // SAMPLE is 25 lines; `[store]` starts on line 26.
        let with = |store: &str| format!("{SAMPLE}\n[store]\n{store}");
        let c = parse(&with(
            "backend = \"postgres\"\nurl = \"postgresql://jg@db.test:5432/jitgate\"\npassword_file = \"/etc/jitgate/pw\"\nca_file = \"/etc/jitgate/ca.pem\"\nhost_id = \"web-1\"\npool_size = 2",
        ))
        .unwrap();
        let StoreConfig::Postgres(o) = c.daemon.store else {
            panic!("not postgres")
        };
        assert_eq!(o.host_id, "web-1");
        assert_eq!(o.pool_size, 2);
        assert_eq!(o.ca_file.as_deref(), Some(Path::new("/etc/jitgate/ca.pem")));
        assert_eq!(
            o.lease,
            Duration::from_secs(30),
            "store_lease defaults to 30 s"
        );
        assert_eq!(o.spool_limit, 64 << 20, "spool_limit defaults to 64 MiB");
        let leased = parse(&with(
            "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nstore_lease = \"3s\"",
        ))
        .unwrap();
        let StoreConfig::Postgres(o) = leased.daemon.store else {
            panic!("not postgres")
        };
        assert_eq!(o.lease, Duration::from_secs(3));
        let spooled = parse(&with(
            "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nspool_limit = \"1MiB\"",
        ))
        .unwrap();
        let StoreConfig::Postgres(o) = spooled.daemon.store else {
            panic!("not postgres")
        };
        assert_eq!(o.spool_limit, 1 << 20);
        assert_eq!(
            o.change_log_retention,
            Duration::from_secs(7 * 24 * 3600),
            "change_log_retention defaults to 7 days"
        );
        let kept = parse(&with(
            "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nchange_log_retention = \"36h\"",
        ))
        .unwrap();
        let StoreConfig::Postgres(o) = kept.daemon.store else {
            panic!("not postgres")
        };
        assert_eq!(o.change_log_retention, Duration::from_secs(36 * 3600));
        assert!(!o.require_sync_standby, "off unless set");
        let strict = parse(&with(
            "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nrequire_sync_standby = true",
        ))
        .unwrap();
        let StoreConfig::Postgres(o) = strict.daemon.store else {
            panic!("not postgres")
        };
        assert!(o.require_sync_standby);
        let e = parse(&with("require_sync_standby = true"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.require_sync_standby: only a `backend = \"postgres\"`"),
            "{e}"
        );
        for (bad, want) in [
            ("\"10m\"", "out of range (1h to 366d)"),
            ("\"400d\"", "out of range (1h to 366d)"),
            ("\"0s\"", "out of range"),
            ("\"soon\"", "is not a duration"),
        ] {
            let e = parse(&with(&format!(
                "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nchange_log_retention = {bad}"
            )))
            .unwrap_err()
            .to_string();
            assert!(e.contains("store.change_log_retention"), "{bad}: {e}");
            assert!(e.contains(want), "{bad}: {e}");
        }
        let e = parse(&with("change_log_retention = \"7d\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("store.change_log_retention: only a `backend = \"postgres\"` store"),
            "{e}"
        );
        // A primary and its standby (libpq's form), each verified against its own name.
        for url in [
            "postgresql://jg@db1.test:5432,db2.test:5433/jitgate",
            "postgresql://jg@db1.test,db2.test/jitgate?target_session_attrs=read-write",
        ] {
            let c = parse(&with(&format!(
                "backend = \"postgres\"\nurl = \"{url}\"\nca_file = \"/etc/jitgate/ca.pem\"\nhost_id = \"h\""
            )))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
            let StoreConfig::Postgres(o) = c.daemon.store else {
                panic!("not postgres")
            };
            assert_eq!(o.url, url);
        }
        // Hostile: a url that would let the agent write to (or trust) a standby.
        for (attrs, needle) in [
            ("any", "target_session_attrs must be read-write"),
            ("read-only", "target_session_attrs must be read-write"),
            ("standby", "not a PostgreSQL url"),
        ] {
            let e = parse(&with(&format!(
                "backend = \"postgres\"\nurl = \"postgresql://jg@db1,db2/j?target_session_attrs={attrs}\"\nsslmode = \"disable\"\nhost_id = \"h\""
            )))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(needle) && e.contains("store.url"),
                "{attrs}: {e}"
            );
        }
        for bad in ["\"1KiB\"", "\"lots\""] {
            let e = parse(&with(&format!(
                "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhost_id = \"h\"\nspool_limit = {bad}"
            )))
            .unwrap_err();
            assert!(e.to_string().contains("store.spool_limit"), "{bad}: {e}");
        }
        let pg = "backend = \"postgres\"\nhost_id = \"h\"\n";
        for (store, line, needle) in [
            ("backend = \"mysql\"", 27, "store.backend: `mysql`"),
            (
                "url = \"postgresql://a@b/c\"",
                27,
                "only a `backend = \"postgres\"`",
            ),
            (
                "backend = \"postgres\"\nsslmode = \"disable\"",
                26,
                "store.url: a postgres store needs url",
            ),
            (
                &format!("{pg}url = \"postgresql://jg:secret@db/j\"\nsslmode = \"disable\""),
                29,
                "carries a password",
            ),
            (
                &format!("{pg}url = \"postgresql://jg@db/j\""),
                26,
                "store.ca_file: sslmode",
            ),
            (
                &format!("{pg}url = \"postgresql://jg@db/j\"\nsslmode = \"prefer\""),
                30,
                "store.sslmode: `prefer`",
            ),
            (
                &format!(
                    "{pg}url = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nca_file = \"/x.pem\""
                ),
                31,
                "does not use TLS",
            ),
            (
                &format!("{pg}url = \"postgresql://jg@db/j\"\nca_file = \"ca.pem\""),
                30,
                "must be an absolute path",
            ),
            (
                &format!(
                    "{pg}url = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\npool_size = 0"
                ),
                31,
                "store.pool_size: `0`",
            ),
            (
                &format!(
                    "{pg}url = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nstore_lease = \"0s\""
                ),
                31,
                "store.store_lease: `0s` is not a duration",
            ),
            (
                "store_lease = \"30s\"",
                27,
                "only a `backend = \"postgres\"`",
            ),
            (
                "backend = \"postgres\"\nhost_id = \"Bad Host\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"",
                28,
                "store.host_id: `Bad Host`",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgresql://jg@db/j\"\nsslmode = \"disable\"\nhots_id = \"x\"",
                30,
                "unknown field `hots_id`",
            ),
        ] {
            let e = error_of(&with(store));
            assert!(
                e.starts_with(&format!("test.toml:{line}:")) && e.contains(needle),
                "{store}: {e}"
            );
        }
    }

    #[test]
    fn limits_have_defaults_overrides_and_checked_values() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.daemon.limits, Limits::default());
        assert_eq!(c.resources[0].max_sessions_per_grant, 16);
        let c = parse(&SAMPLE.replace(
            "egress = \"deny\"",
            "egress = \"deny\"\nstartup_timeout = \"3s\"\nmax_pending_per_identity = 4\nmax_sessions_per_identity = 9\nmax_sessions_per_grant = 5\nmax_extra_upstreams_per_identity = 7\nbuffer_budget = \"64MiB\"",
        ))
        .unwrap();
        assert_eq!(
            c.daemon.limits,
            Limits {
                startup_timeout: Duration::from_secs(3),
                max_pending_per_identity: 4,
                max_sessions_per_identity: 9,
                max_sessions_per_grant: 5,
                max_extra_upstreams_per_identity: 7,
                buffer_budget: 64 << 20,
                buffer_share: 32 << 20,
            }
        );
        let c2 = parse(&SAMPLE.replace(
            "egress = \"deny\"",
            "egress = \"deny\"\nbuffer_budget = \"64MiB\"\nbuffer_share = \"8MiB\"",
        ))
        .unwrap();
        assert_eq!(c2.daemon.limits.buffer_share, 8 << 20);
        for bad in ["\"65MiB\"", "\"512KiB\"", "\"lots\""] {
            let e = parse(&SAMPLE.replace(
                "egress = \"deny\"",
                &format!("egress = \"deny\"\nbuffer_budget = \"64MiB\"\nbuffer_share = {bad}"),
            ))
            .unwrap_err();
            assert!(e.to_string().contains("buffer_share"), "{bad}: {e}");
        }
        let e = parse(&SAMPLE.replace(
            "egress = \"deny\"",
            "egress = \"deny\"\nbuffer_budget = \"1MiB\"",
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("buffer_budget: at least 4MiB"),
            "{e}"
        );
        // A resource inherits the daemon's per-grant limit unless it sets its own.
        assert_eq!(c.resources[0].max_sessions_per_grant, 5);
        let c = parse(&SAMPLE.replace(
            "on_missing_grant = \"reject\"",
            "on_missing_grant = \"reject\"\nmax_sessions_per_grant = 2",
        ))
        .unwrap();
        assert_eq!(c.resources[0].max_sessions_per_grant, 2);
        for bad in ["0", "-1", "1000000"] {
            let e = error_of(&SAMPLE.replace(
                "egress = \"deny\"",
                &format!("egress = \"deny\"\nmax_sessions_per_grant = {bad}"),
            ));
            assert!(
                e.starts_with("test.toml:5: max_sessions_per_grant:") && e.contains("limit"),
                "{e}"
            );
        }
        let e = error_of(&SAMPLE.replace(
            "on_missing_grant = \"reject\"",
            "on_missing_grant = \"reject\"\nmax_sessions_per_grant = 0",
        ));
        assert!(
            e.starts_with("test.toml:17: resource.max_sessions_per_grant:"),
            "{e}"
        );
        let e = error_of(&SAMPLE.replace(
            "egress = \"deny\"",
            "egress = \"deny\"\nstartup_timeout = \"soon\"",
        ));
        assert!(e.starts_with("test.toml:5: startup_timeout:"), "{e}");
    }

    #[test]
    fn protocol_keys_belong_to_their_protocol() {
        // A key of another protocol is named as such, on the resource's first line.
        let e = error_of(&SAMPLE.replace(
            "on_missing_grant = \"reject\"",
            "on_missing_grant = \"reject\"\ndatabases = [\"app\"]",
        ));
        assert!(
            e.starts_with("test.toml:12: resource `orders-db`: `databases` only applies to protocol = \"postgres\""),
            "{e}"
        );
        // A key two protocols share names both.
        let e = error_of(&SAMPLE.replace(
            "on_missing_grant = \"reject\"",
            "on_missing_grant = \"reject\"\nupstream_ca = \"/x\"",
        ));
        assert!(
            e.starts_with("test.toml:12: resource `orders-db`: `upstream_ca` only applies to protocol = \"postgres\" or \"http\""),
            "{e}"
        );
        // An unknown protocol lists the registered ones.
        let e = error_of(&SAMPLE.replace("protocol = \"tcp\"", "protocol = \"smtp\""));
        assert!(
            e.starts_with(
                "test.toml:14: resource.protocol: `smtp` is not supported (use \"tcp\", \"postgres\" or \"http\")"
            ),
            "{e}"
        );
        // A key nobody owns is serde's unknown field, at its own line.
        let e = error_of(&SAMPLE.replace(
            "on_missing_grant = \"reject\"",
            "on_missing_grant = \"reject\"\nfrobnicate = 1",
        ));
        assert!(
            e.starts_with("test.toml:17:") && e.contains("unknown field `frobnicate`"),
            "{e}"
        );
        // A postgres resource carries typed postgres settings; a tcp one, tcp settings.
        let pg_text = SAMPLE.replace(
            "protocol = \"tcp\"",
            "protocol = \"postgres\"\ndatabases = [\"app\"]\ncredentials.read = { user = \"ro\" }",
        );
        let c = parse(&pg_text).unwrap();
        let settings = &c.resources[0].settings;
        assert_eq!(settings.protocol(), "postgres");
        let pg = settings
            .get::<crate::postgres::config::PostgresResource>()
            .expect("postgres settings");
        assert_eq!(pg.databases, vec!["app".to_owned()]);
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.resources[0].settings.protocol(), "tcp");
        assert!(
            c.resources[0]
                .settings
                .get::<crate::postgres::config::PostgresResource>()
                .is_none()
        );
        // Errors inside a protocol's keys still name their line.
        let e = error_of(&pg_text.replace("user = \"ro\"", "user = 7"));
        assert!(e.starts_with("test.toml:16:"), "{e}");
        let e = error_of(&SAMPLE.replace(
            "protocol = \"tcp\"",
            "protocol = \"postgres\"\nupstream_tls = \"maybe\"\ncredentials.read = { user = \"ro\" }",
        ));
        assert!(
            e.starts_with("test.toml:15: resource.upstream_tls: `maybe`"),
            "{e}"
        );
    }

    #[test]
    fn worker_threads_auto_or_a_count() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.daemon.worker_threads, WorkerThreads::Auto);
        assert!(WorkerThreads::Auto.resolve() >= 1);
        let with =
            |v: &str| SAMPLE.replace("[daemon]\n", &format!("[daemon]\nworker_threads = {v}\n"));
        let c = parse(&with("3")).unwrap();
        assert_eq!(c.daemon.worker_threads, WorkerThreads::Fixed(3));
        assert_eq!(c.daemon.worker_threads.resolve(), 3);
        let c = parse(&with("\"auto\"")).unwrap();
        assert_eq!(c.daemon.worker_threads, WorkerThreads::Auto);
        for bad in ["0", "-2", "\"many\"", "1.5", "100000"] {
            let e = error_of(&with(bad));
            assert!(
                e.starts_with("test.toml:3: worker_threads: a thread count"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn metrics_endpoint_is_off_unless_set_and_never_the_proxy() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.daemon.metrics_listen, None);
        assert_eq!(c.daemon.drain_timeout, Duration::from_secs(10));
        let on = SAMPLE.replace(
            "[daemon]\n",
            "[daemon]\nmetrics_listen = \"127.0.0.1:9187\"\ndrain_timeout = \"3s\"\n",
        );
        let c = parse(&on).unwrap();
        assert_eq!(
            c.daemon.metrics_listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
        assert_eq!(c.daemon.drain_timeout, Duration::from_secs(3));
        let clash = SAMPLE.replace(
            "[daemon]\n",
            "[daemon]\nmetrics_listen = \"127.0.0.1:15001\"\n",
        );
        assert!(error_of(&clash).contains("metrics_listen: must differ"));
        let bad = SAMPLE.replace("[daemon]\n", "[daemon]\nmetrics_listen = \"9187\"\n");
        assert!(error_of(&bad).contains("metrics_listen: `9187` is not IP:PORT"));
    }

    #[test]
    fn resource_may_not_cover_the_proxy() {
        let e = error_of(&SAMPLE.replace("10.0.0.5:5432", "127.0.0.0/8:15000-15002"));
        assert!(e.contains("includes the proxy listener"), "{e}");
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_name("ci-bot"));
        assert!(valid_name("orders.db_1"));
        assert!(!valid_name("Orders"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }
}

/// The running config, swapped whole on reload. Readers take a cheap snapshot and never see a
/// half-applied change.
#[derive(Clone)]
pub struct SharedConfig(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Config>>>);

impl SharedConfig {
    pub fn new(config: Config) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(config),
        )))
    }

    pub fn get(&self) -> std::sync::Arc<Config> {
        self.0.read().expect("config lock").clone()
    }

    pub fn set(&self, config: Config) {
        *self.0.write().expect("config lock") = std::sync::Arc::new(config);
    }
}
