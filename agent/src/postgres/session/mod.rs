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
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::{Buf as _, BufMut as _, BytesMut};
use tokio::{
    io::{AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Analysis, Postgres, Unparsed,
    cancel::Entry,
    catalog::Catalog,
    config::PostgresResource,
    guard::{self, Verdict},
    message::{Backend, Frontend},
    options,
    rows::{self, CopyFormat, CopyMasker, Masked, Origin, Plan},
    sql::{CursorUse, ParseMode, ResultRefs, Savepoint, Statement},
    startup::{self, Opening, StartupError},
    stream::Stream,
    upstream::{self, Login, Target, UpstreamError},
    wire::{self, Frame, FrameReader, PgError, WireError, take_cstr, take_i16, take_i32},
};
use crate::{
    config::{Access, Resource},
    identity::Attribution,
    inspect::{mask::Masker, rules::Strategy},
    model::{Decision, RequestStatus, SessionOutcome, StatementRecord, Timestamp, human_duration},
    ops::metrics,
    protocol::{
        Conn, End, Outcome, Services, Session, SessionEnd,
        armed::{Armed, News},
        context::EndWait,
        hold::{self, Hold, HoldOutcome},
        refuse,
        relay::Counters,
    },
};

/// How long the pumps have, once the session must end, to end it in PostgreSQL's terms
/// before the connection is cut (see [`SessionEnd::overdue`]). They take milliseconds unless
/// a peer stopped reading; cancelling the statement in flight takes up to half a second.
const CUT_GRACE: Duration = Duration::from_secs(1);

mod budget;
mod client;
mod pump;
mod record;
mod server;
mod state;
#[cfg(test)]
mod tests;

use self::{client::*, pump::*, record::*, state::*};

/// Longest statement text kept in a record.
const MAX_RECORDED_TEXT: usize = 64 * 1024;

/// Most bytes of statement records (texts and parameters) a session holds in flight. The
/// server answers each Execute as it runs it, so only a batch the server skips (after an
/// error, up to a Sync the client has not sent) piles records up: a hundred thousand
/// skipped inserts take a few tens of MiB; one large statement executed over and over
/// without a Sync is ended here rather than holding a copy per Execute.
const MAX_RECORDS_IN_FLIGHT: usize = 256 << 20;

/// Most prepared statements (protocol-level and SQL `PREPARE`, named) a session may hold,
/// and their bytes (each statement's text and what is derived from it). The gate must know
/// every statement it lets a portal run (its judgement and masking plan), so it cannot forget
/// one as it forgets cursors: past either bound a new one is refused (54000) until the
/// client deallocates some. Rails keeps up to 1,000, pgx and JDBC a few hundred.
const MAX_PREPARED: usize = 10_000;
const MAX_PREPARED_BYTES: usize = 64 << 20;

/// Most SQL cursors tracked per session (a client declaring more loses nothing: a `FETCH`
/// from a forgotten cursor masks every computed value).
const MAX_CURSORS: usize = 1024;

/// Savepoints tracked per transaction (past it the oldest is forgotten: a `ROLLBACK TO` it
/// forgets every portal and cursor).
const MAX_SAVEPOINTS: usize = 1024;

/// Most masking plans cached per session (see `State::plans`).
const MAX_PLANS: usize = 256;

fn fatal_to(err: &PgError) -> BytesMut {
    let mut out = BytesMut::new();
    err.write(&mut out);
    out
}

/// A concurrency limit or the startup timeout, as PostgreSQL says "too many connections".
pub(crate) fn limit_error(limit: &crate::protocol::limits::Exceeded) -> PgError {
    PgError::fatal("53300", format!("jitgate: {limit}")).hint(limit.hint())
}

async fn refuse_client<W: AsyncWrite + Unpin>(writer: &mut W, err: PgError) {
    let out = fatal_to(&err);
    let _ = writer.write_all(&out).await;
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

/// Serves one PostgreSQL connection; returns how it ended.
pub(crate) async fn serve(
    shared: &Postgres,
    mut session: Session<'_>,
    pg: &PostgresResource,
    client: Conn,
) -> Outcome {
    let ctx = session.services;
    let (who, resource, uid, destination, upstream) = (
        session.who,
        session.resource,
        session.uid,
        session.destination,
        session.upstream,
    );
    client.set_nodelay();
    // Valid while the session's stream over `client` lives (see `Conn::cutter`).
    let client_cutter = client.cutter();
    let deadline = startup::Deadline {
        at: session.startup_deadline,
        timeout: ctx.config.get().daemon.limits.startup_timeout,
    };
    let opening = match startup::open(
        client,
        pg.client_tls,
        ctx.ca.as_ref(),
        destination.ip(),
        deadline,
    )
    .await
    {
        Ok(o) => o,
        Err(StartupError::Refuse(err, stream)) => {
            if let Some(mut stream) = stream {
                refuse_client(&mut stream, err.clone()).await;
            }
            return refuse(SessionOutcome::Error, err.message);
        }
        Err(StartupError::Timeout(err, stream)) => {
            if let Some(mut stream) = stream {
                // A client that reads nothing does not hold the session open either.
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    refuse_client(&mut stream, err.clone()),
                )
                .await;
            }
            crate::ops::metrics::limit_refusal("startup_timeout", &who.identity);
            return refuse(SessionOutcome::RefusedLimit, err.message);
        }
        Err(e) => return refuse(SessionOutcome::Error, format!("startup: {e}")),
    };
    let (params, reader, mut writer, tls) = match opening {
        Opening::Cancel { key } => return cancel(shared, pg, who, resource, key).await,
        Opening::Session {
            params,
            reader,
            writer,
            tls,
        } => (
            params,
            reader.with_statement_cap(pg.max_statement_size),
            writer,
            tls,
        ),
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
    session.record.session.database = Some(database.clone());
    if param("replication").is_some_and(|r| !matches!(r.as_str(), "false" | "off" | "0")) {
        let err = PgError::fatal(
            "0A000",
            "jitgate: replication connections are not supported through the gate",
        );
        refuse_client(&mut writer, err.clone()).await;
        return refuse(SessionOutcome::Error, err.message);
    }
    if let Some(enc) = param("client_encoding") {
        // Read as the server reads encoding names (clean_encoding_name: letters and digits
        // only), so asyncpg's 'utf-8', quotes included, is UTF8 here as there.
        let norm: String = enc
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect();
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
    // Settings in `options` are forwarded one by one, or the connection is refused: never
    // dropped silently.
    let from_options = match param("options").map(|o| options::parse(&o)).transpose() {
        Ok(settings) => settings.unwrap_or_default(),
        Err(e) => {
            let err = PgError::fatal("0A000", format!("jitgate: {e}")).hint(format!(
                "options may set {} (as -c name=value)",
                options::allowed_list()
            ));
            refuse_client(&mut writer, err.clone()).await;
            return refuse(SessionOutcome::Error, err.message);
        }
    };
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

    let grant = match session.acquire_grant().await {
        Ok(g) => g,
        Err(refused) => {
            let outcome = refused.outcome;
            let err = match (&refused.limit, outcome.0) {
                (Some(limit), _) => limit_error(limit),
                (None, SessionOutcome::Shutdown) => {
                    PgError::fatal("57P01", "jitgate: the host agent is shutting down")
                }
                // 57P03 cannot_connect_now: the client may retry, and should, later.
                (None, SessionOutcome::RefusedStoreDown) => {
                    PgError::fatal("57P03", format!("jitgate: {}", outcome.1)).hint(
                        if outcome.1.contains(crate::store::health::SPOOL_FULL) {
                            "new sessions open again once the spooled records are shipped to the shared state store; `jitgate status` on this host shows the spool"
                        } else {
                            "retry once the shared state store is back; `jitgate status` on this host shows it"
                        },
                    )
                }
                (None, _) => PgError::fatal(
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
    session.record.session.grant = Some(grant.id.clone());
    session.record.session.access = Some(grant.access);
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
        if options::PASSTHROUGH.contains(&k.to_ascii_lowercase().as_str()) {
            upstream_params.push((k.clone(), v.clone()));
        }
    }
    for (name, value) in from_options {
        upstream_params.retain(|(k, _)| !k.eq_ignore_ascii_case(&name));
        upstream_params.push((name, value));
    }
    if grant.access == Access::Read {
        upstream_params.push(("default_transaction_read_only".into(), "on".into()));
    }
    let server_name = pg
        .upstream_server_name
        .clone()
        .unwrap_or_else(|| match &resource.target {
            crate::config::Target::Host { name, .. } => name.clone(),
            crate::config::Target::Net { .. } => upstream.ip().to_string(),
        });
    let login = Arc::new(Login {
        addr: upstream,
        pg: pg.clone(),
        server_name,
        tls: shared.tls.clone(),
        credential,
        params: upstream_params,
        one_server: resource
            .target
            .names_one_server(upstream.ip(), crate::destinations::local_addresses),
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

    let proxy_key = shared.cancel.issue(Entry {
        resource: resource.name.clone(),
        identity: who.identity.clone(),
        upstream,
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
        table: &shared.cancel,
        key: proxy_key,
    };
    wire::backend_key_data(&mut hello, proxy_key.0, proxy_key.1);
    wire::ready_for_query(&mut hello, up.status);
    if writer.write_all(&hello).await.is_err() || writer.flush().await.is_err() {
        return refuse(SessionOutcome::Closed, "the client left during login");
    }
    let end = session.open(&grant);
    info!(
        identity = %who.identity,
        resource = %resource.name,
        database = %database,
        access = %grant.access,
        tls,
        "postgres session started"
    );

    let masker = Masker::new(
        &pg.masks,
        pg.mask_exempt_access,
        &who.identity,
        grant.access,
        ctx.mask_key,
    );
    let state = Mutex::new(State {
        parse_mode: ParseMode {
            standard_conforming_strings: scs,
        },
        ..State::default()
    });
    let pump = Pump {
        ctx,
        shared,
        pg,
        who,
        uid,
        resource: &resource.name,
        session: session.record.session.id.clone(),
        access: grant.access,
        grant: grant.id.clone(),
        limits: ctx
            .config
            .get()
            .grant_limits(&who.identity, &resource.name, grant.access),
        masker,
        recorder: Masker::recorder(ctx.mask_key),
        catalog: tokio::sync::Mutex::new(Catalog::new(login.clone())),
        login,
        server_key: up.key,
        state,
        stop: CancellationToken::new(),
        counters: session.record.counters.clone(),
        records_due: tokio::sync::Notify::new(),
    };
    let (inject_tx, inject_rx) = mpsc::channel(4);
    // The server side waits on the session's end; the client side reads whether that wait
    // has news before each message (see `client_to_server`).
    let ended = Armed::new(end.ended_owned());
    let news = ended.news();
    // The server side's outcome once it has one: it says best why the session ended, even
    // when the client side is what kept the session from closing.
    let server_said = std::sync::OnceLock::<Outcome>::new();
    let up_cutter = up.cutter;
    let pumps = async {
        tokio::join!(
            pump.client_to_server(reader, up.writer, inject_tx, (&end, news)),
            async {
                let said = pump
                    .server_to_client(up.reader, writer, inject_rx, (end.clone(), ended))
                    .await;
                if let Some(o) = &said {
                    let _ = server_said.set(o.clone());
                }
                said
            },
        )
    };
    // The pumps end the session in PostgreSQL's terms (57P01), but a pump blocked writing to
    // a peer that stopped reading (a workload that leaves a large result unread, a server
    // busy with a statement while the workload floods it) or still judging a statement never
    // gets there: past the grace the session is cut. Armed: polled only when an end signal
    // or its timer fires.
    let overdue = Armed::new(
        end.clone()
            .overdue(|| ctx.config.get().daemon.drain_timeout, CUT_GRACE),
    );
    let ends = {
        let mut pumps = std::pin::pin!(pumps);
        let ends = tokio::select! {
            biased;
            (c2s, s2c) = &mut pumps => Ok((c2s, s2c)),
            why = overdue => Err(why),
        };
        if ends.is_err() {
            // Reset, not close, both connections while the pumps still own them: nothing
            // queued in the kernel is delivered after the cut (masked rows to the workload,
            // statements judged before the end to the server).
            for (side, cutter) in [("client", client_cutter), ("server", up_cutter)] {
                if let Err(e) = cutter.arm_reset() {
                    warn!(error = %e, side, "could not arm reset on close");
                }
            }
        }
        ends
    };
    let (c2s, s2c) = match ends {
        Ok(ends) => ends,
        Err(why) => {
            let (how, detail) = server_said.into_inner().unwrap_or_else(|| why.outcome());
            warn!(
                identity = %who.identity,
                resource = %resource.name,
                session = %pump.session,
                outcome = ?how,
                "the session did not close within {CUT_GRACE:?} of its end ({detail}): connection cut"
            );
            // The server notices a reset connection only when it next reads or writes:
            // cancel the statement in flight.
            pump.cancel_in_flight().await;
            (
                None,
                Some((
                    how,
                    format!(
                        "{detail}; the session did not close within {}s (a peer not reading, or a statement still being judged), so the connection was cut",
                        CUT_GRACE.as_secs()
                    ),
                )),
            )
        }
    };
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
    shared: &Postgres,
    pg: &PostgresResource,
    who: &Attribution,
    resource: &Resource,
    key: (i32, i32),
) -> Outcome {
    // A cancel goes where its session went: same identity, same resource.
    let Some(entry) = shared
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
        tls: &shared.tls,
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
