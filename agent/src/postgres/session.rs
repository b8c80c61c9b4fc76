//! One PostgreSQL session through the gate.
//!
//! ```text
//! client startup (TLS?, cancel?) -> database allowed? -> grant (or hold) -> upstream login
//!   with the grant level's credentials -> AuthenticationOk + server parameters + proxy key
//!   -> two pumps sharing one state:
//!      client -> server: every Query/Parse analysed and judged; refused ones are replaced by
//!                        a statement the server rejects ("poison"), so client and server end
//!                        in the same transaction state, and the server's error is swapped
//!                        for jitgate's; held ones wait for an approver
//!      server -> client: rows, COPY data and error details masked; every statement recorded
//!   -> grant expires / revoked: FATAL 57P01 between two messages, then close
//! ```

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::{Buf as _, BufMut as _, BytesMut};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Analysis,
    cancel::Entry,
    catalog::{Catalog, Login},
    guard::{self, Verdict},
    mask::Masker,
    rows::{self, CopyFormat, CopyMasker, Masked, Origin, Plan},
    sql::{CursorUse, ParseMode, ResultRefs, Statement},
    startup::{self, Opening, StartupError},
    stream::Stream,
    upstream::{self, Target, UpstreamError},
    wire::{self, Frame, FrameReader, PgError, WireError, take_cstr, take_i16, take_i32},
};
use crate::{
    config::{
        Access, Resource,
        postgres::{PostgresResource, Strategy},
    },
    grants::{GrantHandle, GrantState},
    identity::Attribution,
    model::{Decision, RequestStatus, SessionOutcome, StatementRecord, Timestamp, human_duration},
    ops::metrics,
    proxy::{
        ProxyContext,
        session::{Outcome, Record, acquire_grant, refuse},
    },
};

/// Longest statement text kept in a record.
const MAX_RECORDED_TEXT: usize = 64 * 1024;

/// Most SQL cursors tracked per session (a client declaring more loses nothing: a `FETCH`
/// from a forgotten cursor masks every computed value).
const MAX_CURSORS: usize = 1024;

/// Most masking plans cached per session (see `State::plans`).
const MAX_PLANS: usize = 256;

/// Startup parameters passed through to the server (lowercase). Everything else the client
/// sends is dropped: the proxy decides the role, the read-only mode and the options.
const PASSTHROUGH: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "geqo",
];

fn fatal_to(err: &PgError) -> BytesMut {
    let mut out = BytesMut::new();
    err.write(&mut out);
    out
}

async fn refuse_client<W: AsyncWrite + Unpin>(writer: &mut W, err: PgError) {
    let out = fatal_to(&err);
    let _ = writer.write_all(&out).await;
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Serves one PostgreSQL connection; returns how it ended.
pub(crate) async fn serve(
    ctx: &ProxyContext,
    client: TcpStream,
    s: &mut Record,
    who: &Attribution,
    resource: &Resource,
    uid: u32,
    destination: SocketAddr,
) -> Outcome {
    let Some(pg) = resource.postgres.as_ref() else {
        return refuse(
            SessionOutcome::Error,
            "postgres resource without postgres settings",
        );
    };
    let _ = client.set_nodelay(true);
    let opening =
        match startup::open(client, pg.client_tls, ctx.pg.ca.as_ref(), destination.ip()).await {
            Ok(o) => o,
            Err(StartupError::Refuse(err, stream)) => {
                if let Some(mut stream) = stream {
                    refuse_client(&mut stream, err.clone()).await;
                }
                return refuse(SessionOutcome::Error, err.message);
            }
            Err(e) => return refuse(SessionOutcome::Error, format!("startup: {e}")),
        };
    let (params, reader, mut writer, tls) = match opening {
        Opening::Cancel { key } => return cancel(ctx, pg, who, resource, key).await,
        Opening::Session {
            params,
            reader,
            writer,
            tls,
        } => (params, reader, writer, tls),
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let database = param("database")
        .filter(|d| !d.is_empty())
        .or_else(|| param("user"))
        .unwrap_or_else(|| "postgres".into());
    s.session.database = Some(database.clone());
    if param("replication").is_some_and(|r| !matches!(r.as_str(), "false" | "off" | "0")) {
        let err = PgError::fatal(
            "0A000",
            "jitgate: replication connections are not supported through the gate",
        );
        refuse_client(&mut writer, err.clone()).await;
        return refuse(SessionOutcome::Error, err.message);
    }
    if let Some(enc) = param("client_encoding") {
        let norm = enc.to_ascii_uppercase().replace(['-', '_'], "");
        if !matches!(norm.as_str(), "UTF8" | "UNICODE" | "SQLASCII") {
            let err = PgError::fatal(
                "0A000",
                format!(
                    "jitgate: client_encoding {enc} is not supported on a gated connection; use UTF8"
                ),
            );
            refuse_client(&mut writer, err.clone()).await;
            return refuse(SessionOutcome::Error, err.message);
        }
    }
    if !pg.databases.is_empty() && !pg.databases.contains(&database) {
        let err = PgError::fatal(
            "3D000",
            format!(
                "jitgate: database \"{database}\" is not available through resource {}",
                resource.name
            ),
        )
        .hint(format!("databases available: {}", pg.databases.join(", ")));
        refuse_client(&mut writer, err.clone()).await;
        return refuse(SessionOutcome::RefusedNoResource, err.message);
    }

    let grant = match acquire_grant(ctx, who, uid, resource, &mut s.held).await {
        Ok(g) => g,
        Err(outcome) => {
            let err = match outcome.0 {
                SessionOutcome::Shutdown => {
                    PgError::fatal("57P01", "jitgate: the host agent is shutting down")
                }
                _ => PgError::fatal(
                    "28000",
                    format!(
                        "jitgate: {} has no {} grant for {}",
                        who.identity, resource.connect_access, resource.name
                    ),
                )
                .detail(outcome.1.clone())
                .hint(format!(
                    "jitgate request {} --access {}",
                    resource.name, resource.connect_access
                )),
            };
            refuse_client(&mut writer, err).await;
            return outcome;
        }
    };
    s.session.grant = Some(grant.id.clone());
    s.session.access = Some(grant.access);
    let Some(credential) = pg.credentials.get(&grant.access).cloned() else {
        let err = PgError::fatal(
            "08004",
            format!(
                "jitgate: resource {} has no credentials for {} access",
                resource.name, grant.access
            ),
        )
        .hint(format!(
            "the operator adds [resource.credentials.{}] to the jitgate configuration",
            grant.access
        ));
        refuse_client(&mut writer, err.clone()).await;
        return refuse(SessionOutcome::UpstreamFailed, err.message);
    };

    // Startup parameters for the server: the real database, a safe subset of the client's,
    // and read-only mode for read grants.
    let mut upstream_params: Vec<(String, String)> = vec![("database".into(), database.clone())];
    for (k, v) in &params {
        if PASSTHROUGH.contains(&k.to_ascii_lowercase().as_str()) {
            upstream_params.push((k.clone(), v.clone()));
        }
    }
    if grant.access == Access::Read {
        upstream_params.push(("default_transaction_read_only".into(), "on".into()));
    }
    let server_name = pg
        .upstream_server_name
        .clone()
        .unwrap_or_else(|| match &resource.target {
            crate::config::Target::Host { name, .. } => name.clone(),
            crate::config::Target::Net { .. } => destination.ip().to_string(),
        });
    let login = Arc::new(Login {
        addr: destination,
        pg: pg.clone(),
        server_name,
        tls: ctx.pg.tls.clone(),
        credential,
        params: upstream_params,
        one_server: resource
            .target
            .names_one_server(destination.ip(), crate::destinations::local_addresses),
    });
    let up = match login.connect().await {
        Ok(u) => u,
        Err(e) => {
            let err = match &e {
                UpstreamError::Rejected { .. }
                | UpstreamError::Secret { .. }
                | UpstreamError::Unsupported(_)
                | UpstreamError::PasswordExposure(_) => PgError::fatal(
                    "08004",
                    format!(
                        "jitgate: {} refused jitgate's login for {} access",
                        resource.name, grant.access
                    ),
                )
                // The cause names the upstream role and where its secret lives: for the
                // operator's log, not for the workload.
                .hint("the jitgate operator finds the cause in the host agent's log"),
                UpstreamError::Tls { .. } => PgError::fatal(
                    "08006",
                    format!("jitgate: cannot reach {} over TLS", resource.name),
                )
                .hint("the jitgate operator finds the cause in the host agent's log"),
                _ => PgError::fatal("08006", format!("jitgate: cannot reach {}", resource.name))
                    .hint("the database may be down; try again, or ask the jitgate operator"),
            };
            warn!(
                identity = %who.identity,
                resource = %resource.name,
                access = %grant.access,
                error = %e,
                "postgres upstream login failed"
            );
            refuse_client(&mut writer, err).await;
            return refuse(SessionOutcome::UpstreamFailed, e.to_string());
        }
    };

    let proxy_key = ctx.pg.cancel.issue(Entry {
        resource: resource.name.clone(),
        identity: who.identity.clone(),
        upstream: destination,
        server_name: login.server_name.clone(),
        key: up.key,
    });
    let mut hello = BytesMut::new();
    wire::authentication_ok(&mut hello);
    let mut scs = true;
    for (k, v) in &up.parameters {
        if k == "standard_conforming_strings" {
            scs = v != "off";
        }
        if k == "session_authorization" {
            // The upstream role is the gate's, not the workload's business.
            continue;
        }
        wire::parameter_status(&mut hello, k, v);
    }
    // The key leaves the table with the session, however it ends (a panic included): the
    // table is bounded, and a leaked key would take a slot for good.
    let _key = IssuedKey {
        table: &ctx.pg.cancel,
        key: proxy_key,
    };
    wire::backend_key_data(&mut hello, proxy_key.0, proxy_key.1);
    wire::ready_for_query(&mut hello, up.status);
    if writer.write_all(&hello).await.is_err() || writer.flush().await.is_err() {
        return refuse(SessionOutcome::Closed, "the client left during login");
    }
    s.open(ctx, "postgres");
    let cancel_token = s.register(ctx, who, &resource.name, &grant);
    info!(
        identity = %who.identity,
        resource = %resource.name,
        database = %database,
        access = %grant.access,
        tls,
        "postgres session started"
    );

    let masker = Masker::new(pg, &who.identity, grant.access, ctx.pg.mask_key);
    let shared = Mutex::new(State {
        parse_mode: ParseMode {
            standard_conforming_strings: scs,
        },
        ..State::default()
    });
    let pump = Pump {
        ctx,
        pg,
        who,
        uid,
        resource: &resource.name,
        session: s.session.id.clone(),
        access: grant.access,
        masker,
        recorder: Masker::recorder(ctx.pg.mask_key),
        catalog: tokio::sync::Mutex::new(Catalog::new(login.clone())),
        login,
        server_key: up.key,
        state: shared,
        stop: CancellationToken::new(),
        counters: s.counters.clone(),
        records_due: tokio::sync::Notify::new(),
    };
    let (inject_tx, inject_rx) = mpsc::channel(4);
    let (c2s, s2c) = tokio::join!(
        pump.client_to_server(reader, up.writer, inject_tx, &grant, &cancel_token),
        pump.server_to_client(up.reader, writer, inject_rx, grant.clone(), &cancel_token),
    );
    pump.flush_records();
    // The server side knows best why the session ended (grant, shutdown); else the client's.
    match (s2c, c2s) {
        (Some(o), _) | (None, Some(o)) => o,
        (None, None) => (SessionOutcome::Closed, String::new()),
    }
}

/// A proxy-issued cancel key, withdrawn from the table on drop.
struct IssuedKey<'a> {
    table: &'a super::cancel::CancelKeys,
    key: (i32, i32),
}

impl Drop for IssuedKey<'_> {
    fn drop(&mut self) {
        self.table.remove(self.key);
    }
}

/// A CancelRequest: forwarded with the server's real key, if this workload owns the session.
async fn cancel(
    ctx: &ProxyContext,
    pg: &PostgresResource,
    who: &Attribution,
    resource: &Resource,
    key: (i32, i32),
) -> Outcome {
    // A cancel goes where its session went: same identity, same resource.
    let Some(entry) = ctx
        .pg
        .cancel
        .lookup(key, &who.identity)
        .filter(|e| e.resource == resource.name)
    else {
        return refuse(
            SessionOutcome::Closed,
            "cancel request with an unknown key (ignored)",
        );
    };
    let target = Target {
        addr: entry.upstream,
        pg,
        server_name: &entry.server_name,
        tls: &ctx.pg.tls,
        // A CancelRequest carries no password.
        one_server: false,
    };
    match upstream::cancel(&target, entry.key).await {
        Ok(()) => {
            info!(identity = %who.identity, resource = %resource.name, "cancel request forwarded");
            (SessionOutcome::Closed, "cancel request forwarded".into())
        }
        Err(e) => refuse(
            SessionOutcome::UpstreamFailed,
            format!("forwarding a cancel request: {e}"),
        ),
    }
}

/// The statement or portal a Describe answer belongs to: the object itself, not its name, so
/// a pipelined batch that re-uses a name (the unnamed statement, the unnamed portal) cannot
/// mix up which result is masked how.
#[derive(Clone)]
enum DescribeTarget {
    Statement(Stmt),
    Portal(Portal),
}

impl std::fmt::Debug for DescribeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Statement(_) => "statement",
            Self::Portal(_) => "portal",
        })
    }
}

type Stmt = Arc<Mutex<StmtInfo>>;
type Portal = Arc<PortalInfo>;

/// What the client is owed, in order, for what was forwarded.
#[derive(Debug)]
enum Expect {
    Query {
        rec: u32,
        /// What its results may be computed from.
        refs: Arc<ResultRefs>,
        /// How each `COPY ... TO` in it is masked, in order; what is left when the query
        /// ends (a COPY the server refused before starting) goes with it.
        copies: VecDeque<CopyPlan>,
    },
    /// A Parse of this statement name (`None`: one that must not touch the name's entry).
    Parse(Option<String>),
    Bind,
    Describe {
        target: Option<DescribeTarget>,
        internal: bool,
    },
    Execute {
        portal: Portal,
        rec: u32,
    },
    Close,
    Sync,
}

/// A refused statement replaced by one the server rejects; its error is swapped for `error`.
struct Poison {
    nonce: String,
    error: PgError,
    cycle: u64,
}

/// A `COPY ... TO`'s format, masking plan and NULL text.
type CopyPlan = (CopyFormat, Plan, Option<String>);

#[derive(Default)]
struct StmtInfo {
    plan: Option<Arc<Plan>>,
    refs: Arc<ResultRefs>,
    copy: Option<CopyPlan>,
    rec_decision: Option<(Decision, Option<String>, Option<String>, u64)>,
    /// `text` as records show it (detectors applied, truncated): computed once at Parse, not
    /// on every Execute.
    recorded: String,
}

struct PortalInfo {
    statement: Option<Stmt>,
    formats: Vec<i16>,
    params: Vec<Option<String>>,
    /// Set by a Describe of the portal (its RowDescription carries the real formats), or
    /// on first use from its statement's plan and its result formats.
    plan: Mutex<Option<Arc<Plan>>>,
}

impl PortalInfo {
    /// How its rows are masked: its own description, else its statement's with its formats.
    fn plan(&self) -> Option<Arc<Plan>> {
        let mut own = self.plan.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = &*own {
            return Some(p.clone());
        }
        let stmt = self.statement.as_ref()?;
        let s = stmt.lock().unwrap_or_else(PoisonError::into_inner);
        let plan = Arc::new(s.plan.as_ref()?.with_formats(&self.formats));
        *own = Some(plan.clone());
        Some(plan)
    }
}

impl std::fmt::Debug for PortalInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("portal")
    }
}

/// A statement being recorded.
struct InFlight {
    record: StatementRecord,
    started: Instant,
}

#[derive(Default)]
struct State {
    expect: VecDeque<Expect>,
    poisons: Vec<Poison>,
    cycles_sent: u64,
    cycles_done: u64,
    statements: HashMap<String, Stmt>,
    portals: HashMap<String, Portal>,
    sql_prepared: HashMap<String, Statement>,
    parse_mode: ParseMode,
    /// The simple-protocol result in progress.
    current: Option<Arc<Plan>>,
    /// Plans by RowDescription, for results whose columns all come straight from tables
    /// (their plan depends on nothing else): a statement run again is not planned again.
    plans: HashMap<bytes::Bytes, Arc<Plan>>,
    /// SQL cursors by name: what their `FETCH`es return is computed from.
    cursors: HashMap<String, Arc<ResultRefs>>,
    copy: Option<CopyMasker>,
    records: HashMap<u32, InFlight>,
    next_seq: u32,
    finished: Vec<StatementRecord>,
    /// The session may have changed `search_path`: the catalog connection, which keeps the
    /// startup one, can no longer resolve unqualified names the way the session does.
    search_path_changed: bool,
}

/// Protocol-level (`statements`) and SQL (`sql_prepared`) prepared statements share one
/// namespace on the server: these keep the two maps in step with it.
impl State {
    fn has_prepared(&self, name: &str) -> bool {
        self.statements.contains_key(name) || self.sql_prepared.contains_key(name)
    }

    /// `DEALLOCATE name` or Close: either kind goes.
    fn forget_prepared(&mut self, name: &str) {
        self.statements.remove(name);
        self.sql_prepared.remove(name);
    }

    /// `DEALLOCATE ALL` or `DISCARD ALL`: every named one goes, the unnamed one stays.
    fn forget_all_prepared(&mut self) {
        self.sql_prepared.clear();
        self.statements.retain(|name, _| name.is_empty());
    }
}

struct Pump<'a> {
    ctx: &'a ProxyContext,
    pg: &'a PostgresResource,
    who: &'a Attribution,
    uid: u32,
    resource: &'a str,
    session: String,
    access: Access,
    masker: Option<Masker>,
    recorder: Masker,
    catalog: tokio::sync::Mutex<Catalog>,
    /// Where this session's server is, for a CancelRequest of our own.
    login: Arc<Login>,
    /// The server's (process id, secret) for this session.
    server_key: (i32, i32),
    state: Mutex<State>,
    stop: CancellationToken,
    counters: Arc<crate::proxy::relay::Counters>,
    /// Signalled when a finished statement record starts waiting for the store.
    records_due: tokio::sync::Notify,
}

/// A finished statement record is handed to the store within this long, busy or idle
/// session alike (or sooner, in a batch of [`RECORD_BATCH`]); the store's group commit
/// (`LINGER` in `store`) adds at most 100 ms.
const RECORD_FLUSH: Duration = Duration::from_millis(500);

/// Finished records sent to the store together (the batch's room is taken at its first
/// record, not grown record by record).
const RECORD_BATCH: usize = 64;

fn nonce() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("jitgate_refused_{}", hex::encode(b))
}

/// What the server answers to a Parse or PREPARE of a name in use.
fn name_in_use_error(name: &str) -> PgError {
    PgError::error(
        "42P05",
        format!("prepared statement \"{name}\" already exists"),
    )
    .hint("DEALLOCATE or Close it first")
}

/// The error a held statement gets when it was not approved.
fn held_error(rule: &str, status: RequestStatus, by: Option<&str>, waited: Duration) -> PgError {
    match status {
        RequestStatus::Denied => PgError::error(
            "42501",
            format!(
                "jitgate: statement denied by {} (guardrail \"{rule}\")",
                by.unwrap_or("an approver")
            ),
        ),
        _ => PgError::error(
            "57014",
            format!(
                "jitgate: statement held by guardrail \"{rule}\" was not approved within {}",
                human_duration(waited)
            ),
        )
        .hint("ask an approver to run `jitgate approvals` and approve it, then run the statement again"),
    }
}

impl Pump<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn analyze(&self, text: &str) -> Result<Arc<Analysis>, String> {
        let mode = self.lock().parse_mode;
        self.ctx.pg.analyze(text, mode)
    }

    fn judge(&self, analysis: &[Statement]) -> Verdict {
        let st = self.lock();
        if let Some(name) = analysis
            .iter()
            .filter_map(|s| s.prepares.as_deref())
            .find(|name| st.has_prepared(name))
        {
            return Verdict::Deny {
                rule: "prepared statement name in use".into(),
                error: name_in_use_error(name),
            };
        }
        let ctx = guard::Context {
            identity: &self.who.identity,
            resource: self.resource,
            access: self.access,
            pg: self.pg,
            prepared: &st.sql_prepared,
            masked: self.masker.as_ref().is_some_and(Masker::has_column_rules),
        };
        guard::judge(&ctx, analysis)
    }

    /// A statement's text with sensitive values redacted, whole.
    fn redacted_text(&self, text: &str) -> String {
        match self.recorder.scan(text, &mut |_| {}) {
            super::mask::Outcome::Replace(s) => s.into_owned(),
            _ => text.to_owned(),
        }
    }

    /// A statement's text as it is recorded: sensitive values redacted, long texts cut.
    fn recorded_text(&self, text: &str) -> String {
        let mut recorded = self.redacted_text(text);
        if recorded.len() > MAX_RECORDED_TEXT {
            let mut cut = MAX_RECORDED_TEXT;
            while !recorded.is_char_boundary(cut) {
                cut -= 1;
            }
            recorded.truncate(cut);
            recorded.push_str(" …");
        }
        recorded
    }

    fn new_record(&self, text: &str, decision: Decision, rule: Option<String>) -> u32 {
        self.new_record_recorded(self.recorded_text(text), decision, rule)
    }

    /// [`Pump::new_record`] for a text already passed through [`Pump::recorded_text`].
    fn new_record_recorded(
        &self,
        recorded: String,
        decision: Decision,
        rule: Option<String>,
    ) -> u32 {
        let mut st = self.lock();
        st.next_seq += 1;
        let seq = st.next_seq;
        st.records.insert(
            seq,
            InFlight {
                record: StatementRecord {
                    session: self.session.clone(),
                    seq,
                    at: Timestamp::now(),
                    text: recorded,
                    params: Vec::new(),
                    decision,
                    rule,
                    approved_by: None,
                    held_ms: 0,
                    duration_ms: None,
                    rows: None,
                    tag: None,
                    error: None,
                    masked: 0,
                },
                started: Instant::now(),
            },
        );
        seq
    }

    fn update_record(&self, seq: u32, f: impl FnOnce(&mut StatementRecord)) {
        if let Some(r) = self.lock().records.get_mut(&seq) {
            f(&mut r.record);
        }
    }

    fn finish_record(&self, seq: u32) {
        let mut st = self.lock();
        if let Some(mut r) = st.records.remove(&seq) {
            r.record.duration_ms =
                Some(r.started.elapsed().as_secs_f64() * 1000.0 - r.record.held_ms as f64);
            if st.finished.capacity() == 0 {
                st.finished.reserve_exact(RECORD_BATCH);
            }
            st.finished.push(r.record);
            if st.finished.len() == 1 {
                self.records_due.notify_one();
            }
        }
        if st.finished.len() >= RECORD_BATCH {
            let batch = std::mem::take(&mut st.finished);
            drop(st);
            self.submit(batch);
        }
    }

    fn submit(&self, batch: Vec<StatementRecord>) {
        if batch.is_empty() {
            return;
        }
        self.ctx.store.record_statements(batch);
    }

    /// Sends the finished records to the store (those in flight stay).
    fn flush_finished(&self) {
        let batch = std::mem::take(&mut self.lock().finished);
        self.submit(batch);
    }

    fn flush_records(&self) {
        let mut st = self.lock();
        let mut batch = std::mem::take(&mut st.finished);
        batch.extend(st.records.drain().map(|(_, r)| r.record));
        drop(st);
        self.submit(batch);
    }

    /// Plans the masking of each `COPY ... TO` in a query string, in order, looking names up
    /// when needed. A COPY whose columns cannot be known is refused (fail closed).
    async fn copy_plans(&self, analysis: &[Statement]) -> Result<VecDeque<CopyPlan>, PgError> {
        let mut plans = VecDeque::new();
        let Some(masker) = &self.masker else {
            return Ok(plans);
        };
        for s in analysis {
            let Some(copy) = s.copy.as_ref().filter(|c| !c.from) else {
                continue;
            };
            let format = match copy.format.as_str() {
                "csv" => {
                    let quote = copy.quote.unwrap_or(b'"');
                    if copy.escape.is_some_and(|e| e != quote) {
                        return Err(PgError::error(
                            "0A000",
                            "jitgate: COPY with an ESCAPE other than its QUOTE cannot be masked; it was not run",
                        )
                        .hint("drop the ESCAPE option"));
                    }
                    CopyFormat::Csv {
                        delimiter: copy.delimiter.unwrap_or(b','),
                        quote,
                        header: copy.header,
                    }
                }
                "binary" if masker.has_detectors() => {
                    return Err(PgError::error(
                        "0A000",
                        "jitgate: binary COPY output cannot be scanned for sensitive values; it was not run",
                    )
                    .hint("use COPY ... TO STDOUT with FORMAT text or csv"));
                }
                "binary" => CopyFormat::Binary,
                _ => CopyFormat::Text {
                    delimiter: copy.delimiter.unwrap_or(b'\t'),
                    header: copy.header,
                },
            };
            let plan = if !masker.has_column_rules() {
                Plan::default()
            } else if (copy.query.is_some() || copy.schema.is_none())
                && self.lock().search_path_changed
            {
                return Err(PgError::error(
                    "42501",
                    "jitgate: this session changed search_path, so jitgate cannot tell which table this COPY reads in order to mask it; it was not run",
                )
                .hint("schema-qualify the table (COPY schema.table TO STDOUT), or reconnect"));
            } else if let Some(query) = &copy.query {
                let cols = self.catalog.lock().await.describe(query).await;
                let Some(cols) = cols else {
                    return Err(PgError::error(
                        "42501",
                        "jitgate: cannot tell which columns this COPY returns, so it cannot be masked; it was not run",
                    ));
                };
                let mut refs = ResultRefs::default();
                refs.add(s);
                self.plan_for(None, &cols, &refs)
                    .await
                    .map(Arc::unwrap_or_clone)
                    .unwrap_or_default()
            } else if let Some(table) = &copy.table {
                let found = self
                    .catalog
                    .lock()
                    .await
                    .relation(copy.schema.as_deref(), table)
                    .await;
                let Ok(Some(rel)) = found else {
                    return Err(PgError::error(
                        "42501",
                        format!(
                            "jitgate: cannot read the columns of {table} to mask this COPY; it was not run"
                        ),
                    ));
                };
                let names = if copy.columns.is_empty() {
                    rel.columns.clone()
                } else {
                    copy.columns.clone()
                };
                Plan::for_names(&names, &rel.schema, &rel.table, masker)
            } else {
                Plan::default()
            };
            plans.push_back((format, plan, copy.null.clone()));
        }
        Ok(plans)
    }

    /// Holds a statement for approval. `Ok(by)` when approved.
    async fn hold(
        &self,
        text: &str,
        rule: &str,
        reason: &str,
        rec: u32,
    ) -> Result<String, PgError> {
        let filed = self
            .ctx
            .engine
            .file_statement(
                self.who,
                self.uid,
                self.resource,
                self.access,
                &self.session,
                text,
                rule,
                reason,
            )
            .await;
        let request = match filed {
            Ok(r) => r,
            Err(e) => {
                return Err(PgError::error(
                    "42501",
                    format!(
                        "jitgate: statement held by guardrail \"{rule}\" but cannot be approved: {e}"
                    ),
                ));
            }
        };
        info!(request = %request.id, rule, "statement held for approval");
        let started = Instant::now();
        let waited = tokio::select! {
            r = self.ctx.engine.wait(&request.id, self.pg.approval_timeout) => r,
            () = self.stop.cancelled() => {
                self.lapse(&request.id, "the session ended while its statement waited").await;
                return Err(PgError::fatal("57P01", "jitgate: session ended while a statement waited for approval"));
            }
        };
        let waited = match waited {
            Ok(q) if q.status == RequestStatus::Pending => {
                self.lapse(&request.id, "approval_timeout passed").await;
                // A decision that landed just before wins.
                match self.ctx.engine.request(&request.id).await {
                    Ok(Some(now)) => Ok(now),
                    _ => Ok(q),
                }
            }
            other => other,
        };
        let held = started.elapsed();
        self.update_record(rec, |r| r.held_ms = held.as_millis() as u64);
        match waited {
            Ok(q) if q.status == RequestStatus::Approved => {
                let by = q.decided_by.map(|a| a.user).unwrap_or_default();
                self.update_record(rec, |r| {
                    r.decision = Decision::Approved;
                    r.approved_by = Some(by.clone());
                });
                Ok(by)
            }
            Ok(q) => {
                let by = q.decided_by.as_ref().map(|a| a.user.clone());
                Err(held_error(
                    rule,
                    q.status,
                    by.as_deref(),
                    self.pg.approval_timeout,
                ))
            }
            Err(e) => Err(PgError::error(
                "42501",
                format!("jitgate: approval failed: {e}"),
            )),
        }
    }

    /// Judges a statement string; returns the poison error when refused.
    async fn decide(&self, text: &str, rec_kind: &str) -> (Result<Arc<Analysis>, PgError>, u32) {
        let started = Instant::now();
        let counted = |analysis: &Analysis, decision: Decision| {
            for kind in &analysis.primary_kinds {
                metrics::statement(kind, decision);
            }
        };
        let analysis = match self.analyze(text) {
            Ok(a) => a,
            Err(e) => {
                let rec = self.new_record(text, Decision::Denied, Some("unparseable".into()));
                metrics::statement("unparseable", Decision::Denied);
                metrics::statement_check(started.elapsed());
                let err = PgError::error(
                    "42601",
                    format!("jitgate: the statement could not be parsed, so it was not sent: {e}"),
                )
                .hint(
                    "jitgate checks every statement with PostgreSQL's own parser; fix the syntax",
                );
                return (Err(err), rec);
            }
        };
        if analysis.iter().any(|s| s.sets_search_path) {
            self.lock().search_path_changed = true;
        }
        match self.judge(&analysis) {
            Verdict::Allow => {
                let rec = self.new_record(text, Decision::Allowed, None);
                metrics::statement_check(started.elapsed());
                counted(&analysis, Decision::Allowed);
                (Ok(analysis), rec)
            }
            Verdict::Deny { rule, error } => {
                info!(rule = %rule, kind = rec_kind, "statement refused");
                let rec = self.new_record(text, Decision::Denied, Some(rule));
                metrics::statement_check(started.elapsed());
                counted(&analysis, Decision::Denied);
                (Err(error), rec)
            }
            Verdict::Approve { rule, reason } => {
                let rec = self.new_record(text, Decision::Allowed, Some(rule.clone()));
                metrics::statement_check(started.elapsed());
                // Approvers see the whole statement with detected secrets masked (never cut:
                // what they approve is all that runs).
                match self
                    .hold(&self.redacted_text(text), &rule, &reason, rec)
                    .await
                {
                    Ok(_) => {
                        counted(&analysis, Decision::Approved);
                        (Ok(analysis), rec)
                    }
                    Err(e) => {
                        counted(&analysis, Decision::Refused);
                        self.update_record(rec, |r| r.decision = Decision::Refused);
                        (Err(e), rec)
                    }
                }
            }
        }
    }

    fn remember_sql_prepared(&self, analysis: &[Statement]) {
        let mut st = self.lock();
        for s in analysis {
            if let Some(name) = &s.prepares {
                st.sql_prepared.insert(name.clone(), s.clone());
            }
            match &s.deallocates {
                Some(Some(name)) => st.forget_prepared(name),
                Some(None) => st.forget_all_prepared(),
                None => {}
            }
            if s.discards {
                st.forget_all_prepared();
            }
        }
    }

    /// See [`crate::grants::GrantEngine::lapse`]; a failure is logged (the request then stays
    /// pending, and approving it runs nothing).
    async fn lapse(&self, request: &str, why: &str) {
        if let Err(e) = self.ctx.engine.lapse(request, why).await {
            warn!(request, error = %e, "cannot mark an undecided request expired");
        }
    }

    /// Cancels the statement the server is running for this session, if any, before the
    /// session is ended under it: closing the connection alone lets it run on (a long UPDATE
    /// would still commit after its grant ended).
    ///
    /// One CancelRequest ends the statement running; statements a client pipelined behind it
    /// may still be read by the server from its socket buffer after the connection closes.
    /// Returns whether a cancel went out.
    async fn cancel_in_flight(&self) -> bool {
        if self.lock().expect.is_empty() {
            return false;
        }
        let sent = tokio::time::timeout(
            Duration::from_millis(500),
            upstream::cancel(&self.login.target(), self.server_key),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                info!("the statement in flight was cancelled");
                true
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot cancel the statement in flight");
                false
            }
            // The request went out unless connecting took all that time.
            Err(_) => {
                debug!("no answer to the cancel request in time");
                false
            }
        }
    }

    /// Client to server. Returns the outcome when the client ends the session.
    async fn client_to_server(
        &self,
        mut client: FrameReader<ReadHalf<Stream>>,
        mut server: WriteHalf<Stream>,
        inject: mpsc::Sender<PgError>,
        grant: &GrantHandle,
        cancel: &CancellationToken,
    ) -> Option<Outcome> {
        let mut out = BytesMut::with_capacity(8 * 1024);
        let outcome = loop {
            // The server side watches the grant, the resource and the agent's shutdown, tells
            // the client why the session ends, and stops this side. Nothing here waits on
            // them: one wake-up source fewer per message.
            let frame = tokio::select! {
                biased;
                () = self.stop.cancelled() => break None,
                f = client.next() => f,
            };
            // Checked per message, not only when woken: a message that arrives with the
            // grant's end is never forwarded.
            if *grant.state.borrow() != GrantState::Active || cancel.is_cancelled() {
                break None;
            }
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => {
                    let mut bye = BytesMut::new();
                    postgres_protocol::message::frontend::terminate(&mut bye);
                    let _ = server.write_all(&bye).await;
                    break Some((SessionOutcome::Closed, "the client disconnected".to_owned()));
                }
                Err(WireError::TooLarge { tag, len, cap }) => {
                    let err = PgError::fatal(
                        "54000",
                        format!(
                            "jitgate: a {tag:?} message of {len} bytes exceeds the {cap}-byte limit"
                        ),
                    );
                    let _ = inject.send(err.clone()).await;
                    break Some((SessionOutcome::Error, err.message));
                }
                Err(e) => {
                    let err = PgError::fatal(
                        "08P01",
                        format!("jitgate: protocol violation from the client: {e}"),
                    );
                    let _ = inject.send(err.clone()).await;
                    break Some((SessionOutcome::Error, err.message));
                }
            };
            self.counters.up.fetch_add(
                frame.body.len() as u64 + 5,
                std::sync::atomic::Ordering::Relaxed,
            );
            match self.on_client(frame, &mut out).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = server.write_all(&out).await;
                    break Some((SessionOutcome::Closed, String::new()));
                }
                Err(err) => {
                    let _ = inject.send(err.clone()).await;
                    break Some((SessionOutcome::Error, err.message));
                }
            }
            if !client.has_frame() && !out.is_empty() {
                if server.write_all(&out).await.is_err() || server.flush().await.is_err() {
                    break None;
                }
                out.clear();
            }
        };
        self.stop.cancel();
        outcome
    }

    /// Handles one client message. `Ok(false)` when the client terminated.
    async fn on_client(&self, frame: Frame, out: &mut BytesMut) -> Result<bool, PgError> {
        let malformed = |e: WireError| {
            PgError::fatal("08P01", format!("jitgate: malformed client message: {e}"))
        };
        match frame.tag {
            b'Q' => {
                let mut body = frame.body.clone();
                let text = take_cstr(&mut body).map_err(malformed)?;
                let (verdict, rec) = self.decide(&text, "query").await;
                match verdict {
                    Ok(analysis) => {
                        let copies = match self.copy_plans(&analysis).await {
                            Ok(p) => p,
                            Err(err) => {
                                self.update_record(rec, |r| {
                                    r.decision = Decision::Denied;
                                    r.rule = Some("unmaskable COPY".into());
                                });
                                self.poison_query(err, rec, out);
                                return Ok(true);
                            }
                        };
                        let refs = self.result_refs(&analysis);
                        self.remember_sql_prepared(&analysis);
                        let mut st = self.lock();
                        st.expect.push_back(Expect::Query { rec, refs, copies });
                        st.cycles_sent += 1;
                        drop(st);
                        frame.write(out);
                    }
                    Err(err) => self.poison_query(err, rec, out),
                }
            }
            b'P' => {
                let mut body = frame.body.clone();
                let name = take_cstr(&mut body).map_err(malformed)?;
                let text = take_cstr(&mut body).map_err(malformed)?;
                // A name in use: the server keeps the statement it has and fails this Parse;
                // so does the gate, which judges and masks by the statement it has.
                if !name.is_empty() && self.lock().has_prepared(&name) {
                    self.poison(None, name_in_use_error(&name), out);
                    return Ok(true);
                }
                let (verdict, rec) = self.decide(&text, "parse").await;
                // The record for a prepared statement is per Execute; keep this decision's.
                let removed = self.lock().records.remove(&rec);
                let (decision, recorded) = match removed {
                    Some(r) => (
                        Some((
                            r.record.decision,
                            r.record.rule,
                            r.record.approved_by,
                            r.record.held_ms,
                        )),
                        r.record.text,
                    ),
                    None => (None, self.recorded_text(&text)),
                };
                match verdict {
                    Ok(analysis) => {
                        let copy = match self.copy_plans(&analysis).await {
                            Ok(mut p) => p.pop_front(),
                            Err(err) => {
                                self.poison_parse(&name, err, out);
                                return Ok(true);
                            }
                        };
                        let refs = self.result_refs(&analysis);
                        self.remember_sql_prepared(&analysis);
                        let stmt: Stmt = Arc::new(Mutex::new(StmtInfo {
                            plan: None,
                            refs,
                            copy,
                            rec_decision: decision,
                            recorded,
                        }));
                        let mut st = self.lock();
                        st.statements.insert(name.clone(), stmt.clone());
                        st.expect.push_back(Expect::Parse(Some(name.clone())));
                        frame.write(out);
                        if self.masker.is_some() {
                            // Learn the result shape now: clients may Execute without Describe.
                            st.expect.push_back(Expect::Describe {
                                target: Some(DescribeTarget::Statement(stmt)),
                                internal: true,
                            });
                            drop(st);
                            postgres_protocol::message::frontend::describe(b'S', &name, out)
                                .map_err(|e| PgError::fatal("08P01", e.to_string()))?;
                        }
                    }
                    Err(err) => {
                        // Record the refusal as its own entry.
                        let rec = self.new_record(
                            &text,
                            Decision::Denied,
                            decision.as_ref().and_then(|d| d.1.clone()),
                        );
                        if let Some((d, _, _, held)) = decision {
                            self.update_record(rec, |r| {
                                r.decision = if d == Decision::Allowed {
                                    Decision::Denied
                                } else {
                                    d
                                };
                                r.held_ms = held;
                                r.error = Some(format!("{}: {}", err.code, err.message));
                            });
                        }
                        self.finish_record(rec);
                        self.poison_parse(&name, err, out);
                    }
                }
            }
            b'B' => {
                let mut body = frame.body.clone();
                let portal = take_cstr(&mut body).map_err(malformed)?;
                let statement = take_cstr(&mut body).map_err(malformed)?;
                let nformats = take_i16(&mut body).map_err(malformed)?;
                let mut pformats = Vec::with_capacity(nformats.max(0) as usize);
                for _ in 0..nformats {
                    pformats.push(take_i16(&mut body).map_err(malformed)?);
                }
                let nparams = take_i16(&mut body).map_err(malformed)?;
                let mut params = Vec::with_capacity(nparams.max(0) as usize);
                for i in 0..nparams.max(0) as usize {
                    let len = take_i32(&mut body).map_err(malformed)?;
                    if len < 0 {
                        params.push(None);
                        continue;
                    }
                    if body.len() < len as usize {
                        return Err(malformed(WireError::Malformed(
                            "bind parameter past the end",
                        )));
                    }
                    let raw = body.split_to(len as usize);
                    let binary = match pformats.len() {
                        0 => false,
                        1 => pformats[0] == 1,
                        _ => pformats.get(i) == Some(&1),
                    };
                    // Binary text-like parameters (drivers send text that way too) are
                    // recorded as text; other binary values by size.
                    let printable = std::str::from_utf8(&raw)
                        .ok()
                        .filter(|s| s.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
                    params.push(Some(if binary && printable.is_none() {
                        format!("<{} bytes, binary>", raw.len())
                    } else {
                        let text = String::from_utf8_lossy(&raw).into_owned();
                        match self.recorder.scan(&text, &mut |_| {}) {
                            super::mask::Outcome::Replace(s) => s.into_owned(),
                            super::mask::Outcome::Null => "****".into(),
                            super::mask::Outcome::Keep => text,
                        }
                    }));
                }
                let nres = take_i16(&mut body).map_err(malformed)?;
                let mut formats = Vec::with_capacity(nres.max(0) as usize);
                for _ in 0..nres {
                    formats.push(take_i16(&mut body).map_err(malformed)?);
                }
                let mut st = self.lock();
                let info = Arc::new(PortalInfo {
                    statement: st.statements.get(&statement).cloned(),
                    formats,
                    params,
                    plan: Mutex::new(None),
                });
                st.portals.insert(portal, info);
                st.expect.push_back(Expect::Bind);
                frame.write(out);
            }
            b'D' => {
                let (kind, name) = target_of(&frame.body).map_err(malformed)?;
                let mut st = self.lock();
                let target = if kind == b'S' {
                    st.statements
                        .get(&name)
                        .cloned()
                        .map(DescribeTarget::Statement)
                } else {
                    st.portals.get(&name).cloned().map(DescribeTarget::Portal)
                };
                st.expect.push_back(Expect::Describe {
                    target,
                    internal: false,
                });
                drop(st);
                frame.write(out);
            }
            b'E' => {
                let mut body = frame.body.clone();
                let portal = take_cstr(&mut body).map_err(malformed)?;
                let info = self
                    .lock()
                    .portals
                    .get(&portal)
                    .cloned()
                    .unwrap_or_else(|| {
                        // Unknown to us: the server will refuse it too; track it all the same.
                        Arc::new(PortalInfo {
                            statement: None,
                            formats: Vec::new(),
                            params: Vec::new(),
                            plan: Mutex::new(None),
                        })
                    });
                let (recorded, decision) = match &info.statement {
                    Some(stmt) => {
                        let s = stmt.lock().unwrap_or_else(PoisonError::into_inner);
                        (s.recorded.clone(), s.rec_decision.clone())
                    }
                    None => (String::new(), None),
                };
                let params = info.params.clone();
                let rec = self.new_record_recorded(recorded, Decision::Allowed, None);
                self.update_record(rec, |r| {
                    r.params = params;
                    if let Some((d, rule, by, held)) = decision {
                        r.decision = d;
                        r.rule = rule;
                        r.approved_by = by;
                        r.held_ms = held;
                    }
                });
                // A COPY TO run through Execute masks with its statement's plan.
                self.lock()
                    .expect
                    .push_back(Expect::Execute { portal: info, rec });
                frame.write(out);
            }
            b'C' => {
                let (kind, name) = target_of(&frame.body).map_err(malformed)?;
                let mut st = self.lock();
                if kind == b'S' {
                    st.forget_prepared(&name);
                } else {
                    st.portals.remove(&name);
                }
                st.expect.push_back(Expect::Close);
                frame.write(out);
            }
            b'S' => {
                let mut st = self.lock();
                st.expect.push_back(Expect::Sync);
                st.cycles_sent += 1;
                frame.write(out);
            }
            b'H' | b'd' | b'c' | b'f' => frame.write(out),
            b'X' => {
                frame.write(out);
                return Ok(false);
            }
            b'F' => {
                let rec = self.new_record(
                    "<fastpath function call>",
                    Decision::Denied,
                    Some("fastpath".into()),
                );
                let err = PgError::error(
                    "0A000",
                    "jitgate: the fastpath FunctionCall message is not allowed through the gate",
                )
                .hint("call the function with SELECT, where it can be checked");
                self.poison_query(err, rec, out);
            }
            other => {
                return Err(PgError::fatal(
                    "08P01",
                    format!(
                        "jitgate: unexpected message type {:?} from the client",
                        other as char
                    ),
                ));
            }
        }
        Ok(true)
    }

    /// Replaces a refused simple query with one the server rejects.
    fn poison_query(&self, error: PgError, rec: u32, out: &mut BytesMut) {
        let nonce = nonce();
        self.update_record(rec, |r| {
            if r.decision == Decision::Allowed {
                r.decision = Decision::Denied;
            }
            r.error = Some(format!("{}: {}", error.code, error.message));
        });
        let mut st = self.lock();
        let cycle = st.cycles_sent;
        st.poisons.push(Poison {
            nonce: nonce.clone(),
            error,
            cycle,
        });
        st.expect.push_back(Expect::Query {
            rec,
            refs: Arc::default(),
            copies: VecDeque::new(),
        });
        st.cycles_sent += 1;
        drop(st);
        let _ = postgres_protocol::message::frontend::query(&nonce, out);
    }

    /// Replaces a refused Parse with one the server rejects; the rest of the batch is skipped
    /// by the server up to Sync, as for any failed Parse.
    fn poison_parse(&self, name: &str, error: PgError, out: &mut BytesMut) {
        self.poison(Some(name), error, out);
    }

    /// [`Pump::poison_parse`]; with `None` the Parse is unnamed, and the named statements
    /// stay as they are on both sides (the server drops its unnamed statement first, so the
    /// gate does too).
    fn poison(&self, name: Option<&str>, error: PgError, out: &mut BytesMut) {
        let nonce = nonce();
        let mut st = self.lock();
        let cycle = st.cycles_sent;
        st.poisons.push(Poison {
            nonce: nonce.clone(),
            error,
            cycle,
        });
        st.statements.remove(name.unwrap_or(""));
        st.expect.push_back(Expect::Parse(name.map(str::to_owned)));
        drop(st);
        // A nonce that is no statement: the server fails this Parse.
        let _ = postgres_protocol::message::frontend::parse(
            name.unwrap_or(""),
            &nonce,
            std::iter::empty(),
            out,
        );
    }

    /// Server to client. Returns the outcome when the server side ends the session.
    async fn server_to_client(
        &self,
        mut server: FrameReader<ReadHalf<Stream>>,
        mut client: WriteHalf<Stream>,
        mut inject: mpsc::Receiver<PgError>,
        grant: GrantHandle,
        cancel: &CancellationToken,
    ) -> Option<Outcome> {
        let mut out = BytesMut::with_capacity(16 * 1024);
        let mut state_rx = grant.state.clone();
        let mut stats = Masked::default();
        let mut masked_total = 0u64;
        // Set when the agent shuts down with work in flight: the session ends at the first
        // idle point (every reply delivered), or at the deadline, whichever comes first.
        let mut draining: Option<tokio::time::Instant> = None;
        // Armed when a finished record waits, so that an idle session's last statements
        // reach the store too.
        let flush_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(flush_timer);
        let mut flush_armed = false;
        let outcome = loop {
            if draining.is_some()
                && !server.has_frame()
                && out.is_empty()
                && self.lock().expect.is_empty()
            {
                let err = PgError::fatal(
                    "57P01",
                    "terminating connection: the jitgate host agent is shutting down",
                )
                .hint(
                    "the statements already sent have completed; reconnect once jitgated is back",
                );
                err.write(&mut out);
                let _ = client.write_all(&out).await;
                break Some((SessionOutcome::Shutdown, err.message));
            }
            // A frame already buffered, with nothing else to attend to, is taken without
            // arming every branch below (most of a result's messages arrive this way).
            let quiet = server.has_frame()
                && draining.is_none()
                && inject.is_empty()
                && !self.stop.is_cancelled()
                && !cancel.is_cancelled()
                && !self.ctx.shutdown.is_cancelled()
                && *state_rx.borrow() == GrantState::Active;
            let frame = if quiet {
                server.next().await
            } else {
                tokio::select! {
                    biased;
                    changed = async { state_rx.wait_for(|s| *s != GrantState::Active).await.map(|r| *r).ok() } => {
                        let revoked = changed == Some(GrantState::Revoked);
                        let (outcome, why) = if revoked {
                            (SessionOutcome::GrantRevoked, format!("grant {} was revoked", grant.id))
                        } else {
                            (SessionOutcome::GrantExpired, format!("grant {} expired", grant.id))
                        };
                        let _ = self.cancel_in_flight().await;
                        let err = PgError::fatal("57P01", format!("terminating connection: jitgate {why}"))
                            .hint(format!("jitgate request {} --access {}", self.resource, self.access));
                        err.write(&mut out);
                        let _ = client.write_all(&out).await;
                        let _ = client.flush().await;
                        break Some((outcome, why));
                    }
                    () = cancel.cancelled() => {
                        let _ = self.cancel_in_flight().await;
                        let err = PgError::fatal("57P01", format!("terminating connection: resource {} left the jitgate configuration", self.resource));
                        err.write(&mut out);
                        let _ = client.write_all(&out).await;
                        break Some((SessionOutcome::ResourceRemoved, err.message));
                    }
                    () = self.ctx.shutdown.cancelled(), if draining.is_none() => {
                        draining = Some(tokio::time::Instant::now() + self.ctx.config.get().daemon.drain_timeout);
                        continue;
                    }
                    () = async { tokio::time::sleep_until(draining.unwrap_or_else(tokio::time::Instant::now)).await }, if draining.is_some() => {
                        let hint = if self.cancel_in_flight().await {
                            "a statement was still running when the drain timeout passed; it was cancelled"
                        } else {
                            "a statement was still running when the drain timeout passed; it may not have completed"
                        };
                        let err = PgError::fatal("57P01", "terminating connection: the jitgate host agent is shutting down")
                            .hint(hint);
                        err.write(&mut out);
                        let _ = client.write_all(&out).await;
                        break Some((SessionOutcome::Shutdown, err.message));
                    }
                    Some(err) = inject.recv() => {
                        err.write(&mut out);
                        let _ = client.write_all(&out).await;
                        break None;
                    }
                    () = self.stop.cancelled() => {
                        // The client side ended: deliver what the server still sends (its reply to
                        // Terminate is to close).
                        match tokio::time::timeout(Duration::from_millis(200), server.next()).await {
                            Ok(Ok(Some(f))) => Ok(Some(f)),
                            _ => break None,
                        }
                    }
                    () = self.records_due.notified(), if !flush_armed => {
                        flush_armed = true;
                        flush_timer.as_mut().reset(tokio::time::Instant::now() + RECORD_FLUSH);
                        continue;
                    }
                    () = &mut flush_timer, if flush_armed => {
                        flush_armed = false;
                        self.flush_finished();
                        continue;
                    }
                    f = server.next() => f,
                }
            };
            let frame = match frame {
                Ok(Some(f)) => f,
                Ok(None) => {
                    break Some((
                        SessionOutcome::Closed,
                        "the server closed the connection".into(),
                    ));
                }
                Err(e) => {
                    let err = PgError::fatal(
                        "08P01",
                        format!("jitgate: protocol error from the server: {e}"),
                    );
                    err.write(&mut out);
                    let _ = client.write_all(&out).await;
                    break Some((SessionOutcome::Error, err.message));
                }
            };
            if let Err(err) = self.on_server(frame, &mut out, &mut stats).await {
                err.write(&mut out);
                let _ = client.write_all(&out).await;
                let _ = client.flush().await;
                break Some((SessionOutcome::Error, err.message));
            }
            if !server.has_frame() && !out.is_empty() || out.len() > 64 * 1024 {
                if stats.values > 0 {
                    // Published per flush, not per row: counters stay current without a
                    // recorder call on every masked value.
                    masked_total += stats.values;
                    metrics::masked(&stats.by_detector, stats.by_column_rule);
                    stats = Masked::default();
                }
                self.counters
                    .down
                    .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if client.write_all(&out).await.is_err() || client.flush().await.is_err() {
                    break Some((SessionOutcome::Closed, "the client went away".into()));
                }
                out.clear();
            }
        };
        let _ = client.flush().await;
        let _ = client.shutdown().await;
        self.stop.cancel();
        masked_total += stats.values;
        metrics::masked(&stats.by_detector, stats.by_column_rule);
        if masked_total > 0 {
            debug!(masked = masked_total, "values masked in this session");
        }
        outcome
    }

    /// How a result's columns are masked. Table columns go by their real names (looked up
    /// by table oid and column number); computed ones by what the statement fed them from.
    ///
    /// `description` (the RowDescription's body) keys the session's plan cache (see
    /// [`Pump::cached_plan`]); plans that depend on the statement (computed columns) or on a
    /// failed lookup are not cached.
    async fn plan_for(
        &self,
        description: Option<&bytes::Bytes>,
        cols: &[rows::Column],
        refs: &ResultRefs,
    ) -> Option<Arc<Plan>> {
        let masker = self.masker.as_ref()?;
        let derived = |c: &rows::Column| c.table_oid == 0 || c.attnum == 0;
        let remember = |plan: Plan| {
            let plan = Arc::new(plan);
            if let Some(key) = description {
                let mut st = self.lock();
                if st.plans.len() >= MAX_PLANS {
                    st.plans.clear();
                }
                st.plans.insert(key.clone(), plan.clone());
            }
            plan
        };
        if !masker.has_column_rules() {
            return Some(remember(Plan::new(
                cols,
                masker,
                &|_| Origin::Derived,
                None,
            )));
        }
        let taint = if cols.iter().any(derived) {
            self.derived_rule(masker, refs).await
        } else {
            None
        };
        let origins = self.catalog.lock().await.origins(cols).await;
        let plan = Plan::new(
            cols,
            masker,
            &|c| {
                if derived(c) {
                    return Origin::Derived;
                }
                origins
                    .get(&(c.table_oid, c.attnum))
                    .map_or(Origin::Unknown, |n| {
                        Origin::Column(n.0.clone(), n.1.clone(), n.2.clone())
                    })
            },
            taint,
        );
        let cacheable = cols
            .iter()
            .all(|c| !derived(c) && origins.contains_key(&(c.table_oid, c.attnum)));
        Some(if cacheable {
            remember(plan)
        } else {
            Arc::new(plan)
        })
    }

    /// The plan cached for a RowDescription body: the same bytes were parsed (and found
    /// well-formed) when it was made, so a hit needs no parsing.
    fn cached_plan(&self, description: &bytes::Bytes) -> Option<Arc<Plan>> {
        self.lock().plans.get(description).cloned()
    }

    /// The rule for computed values: the strictest of the masked columns the statement feeds
    /// results from, directly or as whole rows (which column went into which value is not
    /// known). Fails closed when the source is unknown or the catalog cannot answer.
    async fn derived_rule(&self, masker: &Masker, refs: &ResultRefs) -> Option<Strategy> {
        if refs.opaque {
            return Some(Strategy::Redact);
        }
        let mut rule = refs
            .names
            .iter()
            .filter(|n| *n != "*")
            .filter_map(|n| masker.column_strategy_by_name(n))
            .max_by_key(|s| s.strictness());
        if !refs.whole_rows() {
            return rule;
        }
        let search_path_changed = self.lock().search_path_changed;
        let mut catalog = self.catalog.lock().await;
        for (schema, name) in &refs.relations {
            if schema.is_none() && search_path_changed {
                // Which relation the name means now is the session's secret.
                return Some(Strategy::Null);
            }
            match catalog.relation(schema.as_deref(), name).await {
                Err(_) => return Some(Strategy::Null),
                Ok(None) => {}
                Ok(Some(rel)) => {
                    rule = rel
                        .columns
                        .iter()
                        .filter_map(|c| masker.column_strategy(&rel.schema, &rel.table, c))
                        .chain(rule)
                        .max_by_key(|s| s.strictness());
                }
            }
        }
        rule
    }

    /// What a query string's results may be computed from, following `EXECUTE` to its
    /// prepared statement and `FETCH` to its cursor's `DECLARE`, and tracking cursors.
    fn result_refs(&self, analysis: &Analysis) -> Arc<ResultRefs> {
        if let Some(refs) = &analysis.refs {
            return refs.clone();
        }
        let mut refs = ResultRefs::default();
        let mut st = self.lock();
        for s in analysis.iter() {
            refs.add(s);
            if let Some(name) = &s.executes {
                match st.sql_prepared.get(name) {
                    Some(p) => refs.add(p),
                    None => refs.opaque = true,
                }
            }
            match &s.cursor {
                Some(CursorUse::Declare(name)) => {
                    let mut own = ResultRefs::default();
                    own.add(s);
                    if st.cursors.len() >= MAX_CURSORS {
                        st.cursors.clear();
                    }
                    st.cursors.insert(name.clone(), Arc::new(own));
                }
                Some(CursorUse::Fetch(name)) => match st.cursors.get(name) {
                    Some(c) => refs.merge(c),
                    None => refs.opaque = true,
                },
                Some(CursorUse::Close(Some(name))) => {
                    st.cursors.remove(name);
                }
                Some(CursorUse::Close(None)) => st.cursors.clear(),
                None => {}
            }
        }
        Arc::new(refs)
    }

    fn with_record(&self, rec: u32, f: impl FnOnce(&mut StatementRecord)) {
        self.update_record(rec, f);
    }

    /// Handles one server message, writing what the client gets to `out`.
    async fn on_server(
        &self,
        frame: Frame,
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Result<(), PgError> {
        let desync = |what: &str| {
            PgError::fatal(
                "08P01",
                format!(
                    "jitgate: lost track of the protocol ({what}); ending the session rather than guessing"
                ),
            )
        };
        match frame.tag {
            b'1' | b'2' | b'3' => {
                let want = match frame.tag {
                    b'1' => "ParseComplete",
                    b'2' => "BindComplete",
                    _ => "CloseComplete",
                };
                let front = self.lock().expect.pop_front();
                match (frame.tag, front) {
                    (b'1', Some(Expect::Parse(_)))
                    | (b'2', Some(Expect::Bind))
                    | (b'3', Some(Expect::Close)) => {}
                    _ => return Err(desync(want)),
                }
                frame.write(out);
            }
            b't' => {
                let internal = matches!(
                    self.lock().expect.front(),
                    Some(Expect::Describe { internal: true, .. })
                );
                if !internal {
                    frame.write(out);
                }
            }
            b'T' | b'n' => {
                let (front, refs) = {
                    let mut st = self.lock();
                    if matches!(st.expect.front(), Some(Expect::Describe { .. })) {
                        let front = st.expect.pop_front();
                        let refs = match &front {
                            Some(Expect::Describe {
                                target: Some(DescribeTarget::Statement(s)),
                                ..
                            }) => s
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .refs
                                .clone(),
                            Some(Expect::Describe {
                                target: Some(DescribeTarget::Portal(p)),
                                ..
                            }) => p.statement.as_ref().map_or_else(ResultRefs::opaque, |s| {
                                s.lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .refs
                                    .clone()
                            }),
                            _ => ResultRefs::opaque(),
                        };
                        (front, refs)
                    } else {
                        let refs = match st.expect.front() {
                            Some(Expect::Query { refs, .. }) => refs.clone(),
                            _ => ResultRefs::opaque(),
                        };
                        (None, refs)
                    }
                };
                let plan = if frame.tag == b'T' && self.masker.is_some() {
                    match self.cached_plan(&frame.body) {
                        Some(plan) => Some(plan),
                        None => {
                            let cols = rows::parse_row_description(&frame.body)
                                .map_err(|e| desync(&e.to_string()))?;
                            self.plan_for(Some(&frame.body), &cols, &refs).await
                        }
                    }
                } else {
                    None
                };
                match front {
                    Some(Expect::Describe { target, internal }) => {
                        let plan = plan.or_else(|| Some(Arc::new(Plan::default())));
                        match target {
                            Some(DescribeTarget::Statement(s)) => {
                                s.lock().unwrap_or_else(PoisonError::into_inner).plan = plan;
                            }
                            Some(DescribeTarget::Portal(p)) => {
                                *p.plan.lock().unwrap_or_else(PoisonError::into_inner) = plan;
                            }
                            // Described something unknown: the server answers with an error.
                            None => {}
                        }
                        if !internal {
                            frame.write(out);
                        }
                    }
                    _ => {
                        // A simple query's (or an Execute's) result header.
                        self.lock().current = plan;
                        frame.write(out);
                    }
                }
            }
            b'D' => {
                let Some(masker) = &self.masker else {
                    frame.write(out);
                    return Ok(());
                };
                let plan = {
                    let st = self.lock();
                    match st.expect.front() {
                        Some(Expect::Execute { portal, .. }) => portal.plan(),
                        _ => st.current.clone(),
                    }
                };
                let Some(plan) = plan else {
                    return Err(PgError::fatal(
                        "XX000",
                        "jitgate: a result arrived whose columns are unknown, so it cannot be masked; ending the session",
                    ));
                };
                let before = stats.values;
                rows::mask_data_row(&frame.body, &plan, masker, stats, out)
                    .map_err(|e| desync(&e.to_string()))?;
                let masked = stats.values - before;
                self.count_row_masked(masked);
            }
            b'C' | b'I' | b's' => {
                let tag = if frame.tag == b'C' {
                    let mut b = frame.body.clone();
                    take_cstr(&mut b).ok()
                } else {
                    None
                };
                let mut st = self.lock();
                match st.expect.front() {
                    Some(Expect::Execute { rec, .. }) => {
                        let rec = *rec;
                        st.expect.pop_front();
                        drop(st);
                        self.with_record(rec, |r| {
                            if let Some(t) = &tag {
                                r.rows = t.rsplit(' ').next().and_then(|n| n.parse().ok());
                            }
                            r.tag = tag.clone();
                        });
                        self.finish_record(rec);
                    }
                    Some(Expect::Query { rec, .. }) => {
                        let rec = *rec;
                        st.current = None;
                        drop(st);
                        self.with_record(rec, |r| {
                            if let Some(t) = &tag {
                                let n: Option<u64> =
                                    t.rsplit(' ').next().and_then(|n| n.parse().ok());
                                r.rows = Some(r.rows.unwrap_or(0) + n.unwrap_or(0));
                                r.tag = Some(match &r.tag {
                                    Some(prev) => format!("{prev}; {t}"),
                                    None => t.clone(),
                                });
                            }
                        });
                    }
                    _ => return Err(desync("CommandComplete")),
                }
                frame.write(out);
            }
            b'E' => {
                let mut fields =
                    wire::parse_fields(frame.body.clone()).map_err(|e| desync(&e.to_string()))?;
                let message = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                let poison = {
                    let mut st = self.lock();
                    st.poisons
                        .iter()
                        .position(|p| message.contains(&p.nonce))
                        .map(|i| st.poisons.remove(i))
                };
                // The server skips the rest of an extended batch up to Sync.
                let rec = {
                    let mut st = self.lock();
                    let mut rec = None;
                    match st.expect.front() {
                        Some(Expect::Query { rec: r, .. }) => rec = Some(*r),
                        _ => {
                            while let Some(e) = st.expect.front() {
                                if matches!(e, Expect::Sync) {
                                    break;
                                }
                                match st.expect.pop_front() {
                                    Some(Expect::Execute { rec: r, .. }) => rec = Some(r),
                                    // The failed Parse, and those the server skipped after
                                    // it, never made a statement: the name is free again.
                                    Some(Expect::Parse(Some(name))) => {
                                        st.statements.remove(&name);
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                    st.copy = None;
                    rec
                };
                let code = fields
                    .iter()
                    .find(|(c, _)| *c == b'C')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                match poison {
                    Some(p) => p.error.write(out),
                    None => {
                        if let Some(masker) = &self.masker {
                            rows::mask_fields(&mut fields, masker, stats);
                        }
                        if let Some(rec) = rec {
                            let msg = fields
                                .iter()
                                .find(|(c, _)| *c == b'M')
                                .map(|(_, m)| m.clone())
                                .unwrap_or_default();
                            self.with_record(rec, |r| r.error = Some(format!("{code}: {msg}")));
                        }
                        wire::write_fields(out, b'E', &fields);
                    }
                }
                if let Some(rec) = rec {
                    let extended =
                        !matches!(self.lock().expect.front(), Some(Expect::Query { .. }));
                    if extended {
                        self.finish_record(rec);
                    }
                }
            }
            b'Z' => {
                let status = frame.body.first().copied().unwrap_or(b'I');
                let finished: Vec<u32> = {
                    let mut st = self.lock();
                    let mut recs = Vec::new();
                    loop {
                        match st.expect.pop_front() {
                            Some(Expect::Sync) => break,
                            Some(Expect::Query { rec, .. }) => {
                                recs.push(rec);
                                break;
                            }
                            Some(Expect::Execute { rec, .. }) => recs.push(rec),
                            Some(_) => {}
                            None => break,
                        }
                    }
                    st.cycles_done += 1;
                    let done = st.cycles_done;
                    st.poisons.retain(|p| p.cycle >= done);
                    st.current = None;
                    st.copy = None;
                    let _ = status;
                    recs
                };
                for rec in finished {
                    self.finish_record(rec);
                }
                frame.write(out);
            }
            b'N' => {
                if let Some(masker) = &self.masker {
                    let mut fields = wire::parse_fields(frame.body.clone())
                        .map_err(|e| desync(&e.to_string()))?;
                    if rows::mask_fields(&mut fields, masker, stats) {
                        wire::write_fields(out, b'N', &fields);
                        return Ok(());
                    }
                }
                frame.write(out);
            }
            b'A' => {
                // LISTEN/NOTIFY payloads can carry anything: detectors apply.
                if let Some(masker) = &self.masker {
                    let mut b = frame.body.clone();
                    let pid = take_i32(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let channel = take_cstr(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let payload = take_cstr(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let masked = match masker.scan(&payload, &mut |_| {}) {
                        super::mask::Outcome::Keep => payload,
                        super::mask::Outcome::Null => "****".into(),
                        super::mask::Outcome::Replace(s) => s.into_owned(),
                    };
                    wire::message(out, b'A', |o| {
                        o.put_i32(pid);
                        o.extend_from_slice(channel.as_bytes());
                        o.put_u8(0);
                        o.extend_from_slice(masked.as_bytes());
                        o.put_u8(0);
                    });
                } else {
                    frame.write(out);
                }
            }
            b'S' => {
                let mut b = frame.body.clone();
                if let (Ok(name), Ok(value)) = (take_cstr(&mut b), take_cstr(&mut b))
                    && name == "standard_conforming_strings"
                {
                    self.lock().parse_mode.standard_conforming_strings = value != "off";
                }
                frame.write(out);
            }
            b'H' => {
                // CopyOutResponse: the masking plan decided when the COPY was judged.
                let plan = match self.lock().expect.front_mut() {
                    Some(Expect::Query { copies, .. }) => copies.pop_front(),
                    Some(Expect::Execute { portal, .. }) => {
                        portal.statement.as_ref().and_then(|s| {
                            s.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .copy
                                .clone()
                        })
                    }
                    _ => None,
                };
                match (&self.masker, plan) {
                    (Some(_), Some((format, plan, null))) => {
                        self.lock().copy = Some(CopyMasker::new(format, plan, null));
                    }
                    (Some(_), None) => {
                        return Err(PgError::fatal(
                            "XX000",
                            "jitgate: a COPY started whose columns are unknown, so it cannot be masked; ending the session",
                        ));
                    }
                    (None, _) => {}
                }
                frame.write(out);
            }
            b'd' => {
                let Some(masker) = &self.masker else {
                    frame.write(out);
                    return Ok(());
                };
                let mut copy = self.lock().copy.take();
                match copy.as_mut() {
                    Some(c) => {
                        c.feed(&frame.body, masker, stats, out)
                            .map_err(|e| desync(&e.to_string()))?;
                    }
                    None => frame.write(out),
                }
                self.lock().copy = copy;
            }
            b'c' => {
                if let Some(masker) = &self.masker
                    && let Some(mut c) = self.lock().copy.take()
                {
                    c.finish(masker, stats, out)
                        .map_err(|e| desync(&e.to_string()))?;
                }
                frame.write(out);
            }
            b'G' | b'W' => frame.write(out),
            b'K' | b'R' | b'v' => return Err(desync("authentication message mid-session")),
            other => {
                return Err(PgError::fatal(
                    "08P01",
                    format!(
                        "jitgate: unknown message type {:?} from the server",
                        other as char
                    ),
                ));
            }
        }
        Ok(())
    }

    fn count_row_masked(&self, masked: u64) {
        if masked == 0 {
            return;
        }
        let mut st = self.lock();
        let rec = match st.expect.front() {
            Some(Expect::Execute { rec, .. } | Expect::Query { rec, .. }) => Some(*rec),
            _ => None,
        };
        if let Some(rec) = rec
            && let Some(r) = st.records.get_mut(&rec)
        {
            r.record.masked += masked;
        }
    }
}

/// The target of a Describe or Close: `S` (statement) or `P` (portal), and its name.
fn target_of(body: &bytes::Bytes) -> Result<(u8, String), WireError> {
    let mut body = body.clone();
    if body.is_empty() {
        return Err(WireError::Malformed("Describe or Close without a target"));
    }
    let kind = body.get_u8();
    Ok((kind, take_cstr(&mut body)?))
}

impl Masker {
    /// The masker used on recordings: every detector, redacting.
    pub fn recorder(key: [u8; 32]) -> Self {
        use crate::config::postgres::{Detector, MaskRule, Strategy};
        let pg = PostgresResource::with_rules(
            vec![MaskRule {
                columns: vec![],
                detectors: Detector::ALL.to_vec(),
                strategy: Strategy::Redact,
                exempt_identities: vec![],
            }],
            vec![],
        );
        Self::new(&pg, "", Access::Read, key).expect("a rule with detectors")
    }
}
