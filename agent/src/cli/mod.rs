//! The `jitgate` command: asks the host agent for access, approves, revokes, inspects, and
//! launches gated workloads.
//!
//! Exit codes (also in the README):
//! 0 done · 1 error · 2 usage · 3 not permitted · 4 refused or denied · 5 not found ·
//! 6 conflict (already decided, already revoked) · 7 still pending · 8 daemon unreachable ·
//! 9 audit log tampered with.

pub mod daemon;
mod docs;
mod fleet_audit;
mod output;
mod run;
mod token;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    config::{Access, Config, DEFAULT_CONFIG_PATH, DEFAULT_SOCKET, HostsSpec},
    control::{
        api::{Call, ErrorCode, StatusReport},
        client::{Client, ClientError},
    },
    model::{AuditEvent, Grant, Request, RequestStatus, Session, Timestamp, human_duration},
    store::audit::VerifyReport,
};

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_FORBIDDEN: u8 = 3;
pub const EXIT_REFUSED: u8 = 4;
pub const EXIT_NOT_FOUND: u8 = 5;
pub const EXIT_CONFLICT: u8 = 6;
pub const EXIT_PENDING: u8 = 7;
pub const EXIT_UNREACHABLE: u8 = 8;
pub const EXIT_TAMPERED: u8 = 9;
/// `audit verify`: the chain is intact, but the host lost records before they reached it.
pub const EXIT_LOST: u8 = 10;

/// jitgate: just-in-time, kernel-enforced access for AI agents and other workloads.
#[derive(Parser)]
#[command(name = "jitgate", version, propagate_version = true)]
pub struct Cli {
    /// Control socket of the host agent [default: $JITGATE_SOCKET, then the config's socket]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Configuration file (to find the socket and the BPF pin directory)
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ask for access to a resource (from a workload: for itself; otherwise --for IDENTITY).
    Request {
        resource: String,
        #[arg(long, value_parser = parse_access)]
        access: Option<Access>,
        /// How long the grant should last (e.g. 15m, 1h) [default: the daemon's default_ttl]
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        #[arg(long, default_value = "")]
        reason: String,
        /// The workload identity the access is for (operators only).
        #[arg(long = "for", value_name = "IDENTITY")]
        for_identity: Option<String>,
        /// Where the grant may be used in a fleet: `requesting` (this host), `fleet`, or
        /// host_ids separated by commas (`ci-*` matches every host_id starting with `ci-`).
        /// Within what policy allows [default: what the policy says]
        #[arg(long, value_name = "HOSTS", value_parser = parse_hosts)]
        hosts: Option<HostsSpec>,
        /// Wait for the decision (exit 0 approved, 4 denied, 7 still pending).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long.
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        wait_timeout: Duration,
        #[arg(long)]
        json: bool,
    },
    /// List requests waiting for a decision.
    Approvals {
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending request.
    Approve {
        id: String,
        /// Grant for this long instead of what was asked (within policy).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Deny a pending request (or withdraw your own).
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List live grants (all recent ones with --all).
    Grants {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a grant: every connection riding on it is closed at once.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List sessions (open ones; all recent ones with --all).
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsAction>,
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show the audit log, or verify its hash chain.
    Audit {
        #[command(subcommand)]
        action: Option<AuditAction>,
        /// Events since a time (RFC 3339) or for the last duration (e.g. 1h).
        #[arg(long, value_parser = parse_since)]
        since: Option<Timestamp>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show the host agent's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command as a gated workload.
    Run(run::RunArgs),
    /// Bearer tokens of the console's HTTP API (for scripts).
    Token {
        #[command(subcommand)]
        action: token::TokenAction,
    },
    /// Make the host agent re-read its configuration (like SIGHUP).
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Manage the kernel gate itself.
    Gate {
        #[command(subcommand)]
        action: GateAction,
    },
    /// Print a completion script for a shell (e.g. `jitgate completions bash`).
    Completions { shell: clap_complete::Shell },
    /// Write man pages and completions of both binaries under DIR (used by packaging).
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

#[derive(Subcommand)]
enum SessionsAction {
    /// One session as a timeline: every statement, its decision and result (`--json`: all of
    /// it).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        /// Start at this statement (its `#` number): a long session is shown a page at a
        /// time, each ending with the command for the next.
        #[arg(long, default_value_t = 0)]
        from: u32,
    },
    /// Plays a recorded Kubernetes exec or attach stream (the `[recorded: FILE]` of a
    /// request in `sessions show`; an asciicast v2 file, readable by root) with its timing.
    Replay {
        file: PathBuf,
        /// Playback speed (2 = twice as fast); 0 prints everything at once.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
}

#[derive(Subcommand)]
enum AuditAction {
    /// Check the hash chain: exit 0 intact, 9 tampered, 10 intact but records were lost
    /// before they reached it (fleet mode: a `spool.lost` record).
    Verify {
        #[arg(long)]
        json: bool,
        /// Every host's chain in the shared store (fleet mode), checked with the hosts'
        /// public keys as pinned on this host: exit 9 if any host's chain fails, 10 if a host
        /// lost spooled records (and none failed).
        #[arg(long)]
        fleet: bool,
    },
}

#[derive(Subcommand)]
enum GateAction {
    /// Remove the gate from the kernel and stop the host agent. Gated workloads are then no
    /// longer steered or refused: this opens the gate. Root only.
    Detach {
        /// Pin directory to clear when the daemon is not running [default: from the config]
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Remove the pins even though a live jitgated holds the pin directory without
        /// answering on its socket (a hung agent; a running one pins them again)
        #[arg(long)]
        force: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration like 15m or 1h: {e}"))
}

fn parse_hosts(s: &str) -> Result<HostsSpec, String> {
    HostsSpec::parse(s)
}

fn parse_access(s: &str) -> Result<Access, String> {
    s.parse()
}

fn parse_since(s: &str) -> Result<Timestamp, String> {
    Timestamp::parse_since(s)
}

impl Cli {
    fn config(&self) -> Option<Config> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| DEFAULT_CONFIG_PATH.into());
        Config::load(&path).ok()
    }

    fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        if let Some(s) = std::env::var_os("JITGATE_SOCKET").filter(|s| !s.is_empty()) {
            return s.into();
        }
        self.config()
            .map_or_else(|| DEFAULT_SOCKET.into(), |c| c.daemon.socket)
    }

    fn client(&self) -> Result<Client, ClientError> {
        Client::connect(&self.socket())
    }
}

/// Prints an error the way every command does, and picks the exit code.
fn fail(e: &ClientError) -> ExitCode {
    eprintln!("jitgate: {e}");
    ExitCode::from(match e {
        ClientError::Connect { .. } => EXIT_UNREACHABLE,
        ClientError::NotPermitted { .. } => EXIT_FORBIDDEN,
        ClientError::Api(api) => match api.code {
            ErrorCode::Forbidden => EXIT_FORBIDDEN,
            ErrorCode::Refused => EXIT_REFUSED,
            ErrorCode::NotFound => EXIT_NOT_FOUND,
            ErrorCode::Conflict => EXIT_CONFLICT,
            ErrorCode::Invalid | ErrorCode::Internal => EXIT_ERROR,
        },
        _ => EXIT_ERROR,
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(&cli) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

/// `text` on one line (runs of white space as one space), cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    let out = output::shown(&out).into_owned();
    match out.char_indices().nth(max) {
        Some((cut, _)) => format!("{} …", &out[..cut]),
        None => out,
    }
}

fn request_rows(requests: &[Request]) -> Vec<Vec<String>> {
    requests
        .iter()
        .map(|q| {
            vec![
                q.id.clone(),
                q.identity.clone(),
                q.resource.clone(),
                q.access.to_string(),
                human_duration(q.ttl),
                q.task.clone().unwrap_or_else(|| "-".into()),
                q.requested_by.user.clone(),
                output::relative(q.created_at),
                q.reason.clone(),
            ]
        })
        .collect()
}

fn grant_rows(grants: &[Grant]) -> Vec<Vec<String>> {
    let now = Timestamp::now();
    grants
        .iter()
        .map(|g| {
            vec![
                g.id.clone(),
                g.identity.clone(),
                g.resource.clone(),
                g.access.to_string(),
                g.task.clone().unwrap_or_else(|| "-".into()),
                g.status(now).to_string(),
                output::relative(g.expires_at),
                g.approved_by.clone(),
                g.hosts.to_string(),
            ]
        })
        .collect()
}

/// What happened to a request, for people, and the exit code it means.
pub(crate) fn describe_request(q: &Request) -> (String, u8) {
    match q.status {
        RequestStatus::Approved => (
            format!(
                "request {} approved: {} has {} access to {} (grant {}{})",
                q.id,
                q.identity,
                q.access,
                q.resource,
                q.grant.as_deref().unwrap_or("?"),
                q.hosts
                    .as_ref()
                    .map(|h| format!(", usable on {h}"))
                    .unwrap_or_default()
            ),
            0,
        ),
        RequestStatus::Pending => (
            format!(
                "request {} is waiting for approval: an approver runs `jitgate approve {}`",
                q.id, q.id
            ),
            EXIT_PENDING,
        ),
        RequestStatus::Denied => (
            format!(
                "request {} denied{}{}",
                q.id,
                q.decided_by
                    .as_ref()
                    .map(|a| format!(" by {}", a.user))
                    .unwrap_or_default(),
                q.decision_reason
                    .as_ref()
                    .map(|r| format!(": {}", output::shown(r)))
                    .unwrap_or_default()
            ),
            EXIT_REFUSED,
        ),
        RequestStatus::Expired => (
            format!(
                "request {} lapsed{}",
                q.id,
                q.decision_reason
                    .as_ref()
                    .map(|r| format!(": {}", output::shown(r)))
                    .unwrap_or_default()
            ),
            EXIT_REFUSED,
        ),
    }
}

fn execute(cli: &Cli) -> Result<ExitCode, ClientError> {
    match &cli.command {
        Command::Request {
            resource,
            access,
            ttl,
            reason,
            for_identity,
            hosts,
            wait,
            wait_timeout,
            json,
        } => {
            let mut client = cli.client()?;
            let mut request: Request = client.call_as(&Call::Request {
                resource: resource.clone(),
                access: *access,
                ttl_secs: ttl.map(|t| t.as_secs()),
                reason: reason.clone(),
                for_identity: for_identity.clone(),
                hosts: hosts.clone(),
            })?;
            if *wait && request.status == RequestStatus::Pending {
                eprintln!(
                    "jitgate: request {} is waiting for approval (an approver runs `jitgate approve {}`)...",
                    request.id, request.id
                );
                request = client.call_as(&Call::Wait {
                    request: request.id.clone(),
                    timeout_secs: wait_timeout.as_secs(),
                })?;
            }
            let (text, code) = describe_request(&request);
            if *json {
                output::json(&request);
            } else {
                println!("{text}");
            }
            // Without --wait, filing a request that now waits is success.
            let code = if !*wait && code == EXIT_PENDING {
                0
            } else {
                code
            };
            Ok(ExitCode::from(code))
        }
        Command::Approvals { json } => {
            let pending: Vec<Request> = cli.client()?.call_as(&Call::Approvals)?;
            if *json {
                output::json(&pending);
            } else if pending.is_empty() {
                println!("no requests waiting for approval");
            } else {
                output::table(
                    &[
                        "id",
                        "identity",
                        "resource",
                        "access",
                        "ttl",
                        "task",
                        "requested by",
                        "filed",
                        "reason",
                    ],
                    &request_rows(&pending),
                );
                // A held statement is what the approver decides on: shown, on one line each.
                let held: Vec<&Request> =
                    pending.iter().filter(|q| q.statement.is_some()).collect();
                if !held.is_empty() {
                    println!("\nheld statements (secrets masked; `--json` for the full text):");
                    for q in held {
                        let text = q.statement.as_deref().unwrap_or_default();
                        println!("  {}  {}", q.id, one_line(text, 200));
                    }
                }
                // Requests whose policy needs several approvers: who has approved so far.
                for q in pending.iter().filter(|q| !q.approvals.is_empty()) {
                    let by: Vec<&str> = q.approvals.iter().map(|a| a.by.as_str()).collect();
                    println!(
                        "\n{} has {} approval(s) so far ({}); its policy needs more",
                        q.id,
                        by.len(),
                        by.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve { id, ttl, json } => {
            let approved: crate::grants::Approved = cli.client()?.call_as(&Call::Approve {
                request: id.clone(),
                ttl_secs: ttl.map(|t| t.as_secs()),
            })?;
            if *json {
                output::json(&approved);
            } else if let Some(grant) = &approved.grant {
                println!(
                    "approved {id}: grant {} gives {} {} access to {} until {} ({})",
                    grant.id,
                    grant.identity,
                    grant.access,
                    grant.resource,
                    output::when(grant.expires_at),
                    output::relative(grant.expires_at)
                );
            } else if approved.request.status == RequestStatus::Pending {
                let by: Vec<&str> = approved
                    .request
                    .approvals
                    .iter()
                    .map(|a| a.by.as_str())
                    .collect();
                println!(
                    "approval {} recorded for {id} (so far: {}); its policy needs more approvers before {}",
                    by.len(),
                    by.join(", "),
                    if approved.request.statement.is_some() {
                        "the held statement runs"
                    } else {
                        "the grant is issued"
                    }
                );
            } else {
                println!(
                    "approved {id}: the held statement of {} on {} runs now",
                    approved.request.identity, approved.request.resource
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Deny { id, reason, json } => {
            let request: Request = cli.client()?.call_as(&Call::Deny {
                request: id.clone(),
                reason: reason.clone(),
            })?;
            if *json {
                output::json(&request);
            } else {
                println!("denied {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Grants { all, json } => {
            let grants: Vec<Grant> = cli.client()?.call_as(&Call::Grants { all: *all })?;
            if *json {
                output::json(&grants);
            } else if grants.is_empty() {
                println!("no {}grants", if *all { "" } else { "live " });
            } else {
                output::table(
                    &[
                        "id",
                        "identity",
                        "resource",
                        "access",
                        "task",
                        "status",
                        "expires",
                        "approved by",
                        "hosts",
                    ],
                    &grant_rows(&grants),
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { id, reason, json } => {
            let grant: Grant = cli.client()?.call_as(&Call::Revoke {
                grant: id.clone(),
                reason: reason.clone(),
            })?;
            if *json {
                output::json(&grant);
            } else {
                println!(
                    "revoked {id}: {} no longer has {} access to {}; its connections are closed",
                    grant.identity, grant.access, grant.resource
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions {
            action: Some(SessionsAction::Show { id, json, from }),
            ..
        } => {
            let detail: crate::control::api::SessionDetail =
                cli.client()?.call_as(&Call::SessionShow {
                    id: id.clone(),
                    from: *from,
                })?;
            if *json {
                output::json(&detail);
            } else {
                output::timeline(&detail);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions {
            action: Some(SessionsAction::Replay { file, speed }),
            ..
        } => {
            if let Err(e) = crate::http::cast::replay(file, *speed, &mut std::io::stdout().lock()) {
                eprintln!("jitgate: {e:#}");
                return Ok(ExitCode::from(EXIT_ERROR));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions {
            action: None,
            all,
            limit,
            json,
        } => {
            let sessions: Vec<Session> = cli.client()?.call_as(&Call::Sessions {
                all: *all,
                limit: *limit,
            })?;
            if *json {
                output::json(&sessions);
            } else if sessions.is_empty() {
                println!("no {}sessions", if *all { "" } else { "open " });
            } else {
                let rows: Vec<Vec<String>> = sessions
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.clone(),
                            s.identity.clone().unwrap_or_else(|| "?".into()),
                            s.resource.clone().unwrap_or_else(|| "-".into()),
                            s.destination.clone(),
                            output::when(s.started_at),
                            s.outcome.to_string(),
                            output::bytes(s.bytes_up),
                            output::bytes(s.bytes_down),
                            format!("{} {}", s.pid, s.command),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "id",
                        "identity",
                        "resource",
                        "destination",
                        "started",
                        "state",
                        "up",
                        "down",
                        "client",
                    ],
                    &rows,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            action: Some(AuditAction::Verify { json, fleet: true }),
            ..
        } => fleet_audit::verify(cli.client()?, *json),
        Command::Audit {
            action: Some(AuditAction::Verify { json, fleet: false }),
            ..
        } => {
            let report: VerifyReport = cli.client()?.call_as(&Call::AuditVerify)?;
            if *json {
                output::json(&report);
            } else if report.ok {
                println!(
                    "audit log intact: {} records, hash chain verified",
                    report.records
                );
            } else {
                if !report.problems.is_empty() {
                    println!(
                        "AUDIT LOG TAMPERED WITH ({} records checked):",
                        report.records
                    );
                    for p in &report.problems {
                        println!("  - {p}");
                    }
                }
                if !report.lost.is_empty() {
                    println!(
                        "RECORDS LOST on this host (the hash chain{} of {} records):",
                        if report.problems.is_empty() {
                            " is intact"
                        } else {
                            ""
                        },
                        report.records
                    );
                    for p in &report.lost {
                        println!("  - {p}");
                    }
                }
            }
            Ok(ExitCode::from(if !report.problems.is_empty() {
                EXIT_TAMPERED
            } else if !report.lost.is_empty() {
                EXIT_LOST
            } else {
                0
            }))
        }
        Command::Audit {
            action: None,
            since,
            limit,
            json,
        } => {
            let events: Vec<AuditEvent> = cli.client()?.call_as(&Call::Audit {
                since: *since,
                limit: *limit,
            })?;
            if *json {
                output::json(&events);
            } else {
                let rows: Vec<Vec<String>> = events
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            output::when(e.at),
                            e.kind.clone(),
                            e.actor.clone(),
                            e.detail.to_string(),
                        ]
                    })
                    .collect();
                output::table(&["seq", "at", "event", "actor", "detail"], &rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let status: StatusReport = cli.client()?.call_as(&Call::Status)?;
            if *json {
                output::json(&status);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => run::run(cli, args),
        Command::Token { action } => token::run(cli, action),
        Command::Completions { shell } => {
            docs::print_completions(*shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateDocs { dir } => match docs::generate(dir) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("jitgate: writing docs under {}: {e}", dir.display());
                Ok(ExitCode::from(EXIT_ERROR))
            }
        },
        Command::Reload { json } => {
            let summary = cli.client()?.call(&Call::Reload)?;
            if *json {
                output::json(&summary);
            } else {
                println!("configuration reloaded");
                if let Some(keys) = summary["restart_required_for"]
                    .as_array()
                    .filter(|k| !k.is_empty())
                {
                    println!(
                        "note: {} only change on restart; the running values stay",
                        keys.iter()
                            .filter_map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gate {
            action: GateAction::Detach { pin_dir, force },
        } => detach(cli, pin_dir.clone(), *force),
    }
}

fn print_status(s: &StatusReport) {
    println!(
        "jitgated {} (pid {}), up since {}",
        s.version,
        s.pid,
        output::when(s.started_at)
    );
    println!("  config         {}", s.config);
    println!(
        "  gate cgroup    {} (attached: {})",
        s.gate_cgroup,
        s.attached.join(", ")
    );
    if s.problems.is_empty() {
        println!("  health         ok");
    } else {
        for problem in &s.problems {
            println!("  health         UNHEALTHY: {}", output::shown(problem));
        }
    }
    println!("  pin dir        {}", s.pin_dir);
    println!("  proxy          {}", s.proxy_listen.join(", "));
    println!("  egress         {}", s.egress);
    println!("  identities     {}", s.identities.join(", "));
    println!("  resources      {}", s.resources.join(", "));
    println!(
        "  rules          {} destination prefixes in the kernel",
        s.destination_prefixes
    );
    println!(
        "  grants         {} live, {} requests pending, {} sessions open",
        s.live_grants, s.pending_requests, s.open_sessions
    );
    let counters: Vec<String> = s
        .kernel_counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("  kernel         {}", counters.join(" "));
    if s.store_backlog > 1 << 20 {
        println!(
            "  store backlog  {} of records not yet written (new sessions are refused past {}, live ones cut past {})",
            crate::model::human_bytes(s.store_backlog),
            crate::model::human_bytes(crate::store::health::BACKLOG_REFUSE as u64),
            crate::model::human_bytes(crate::store::health::BACKLOG_CUT as u64),
        );
    }
    if let Some(f) = &s.store_writes {
        println!(
            "  store writes   FAILING since {} ({} failures; last: {}): gate closed to every session until the store keeps writes again; free disk space in state_dir or mend the database",
            f.since, f.failed, f.error
        );
    }
    if let Some(store) = &s.store {
        let confirmed = store
            .confirmed_ms_ago
            .map_or_else(|| "never".to_owned(), |ms| format!("{ms} ms ago"));
        println!(
            "  store          {} {}{} since {} ({}; confirmed {confirmed}, store_lease {}s){}",
            store.url,
            store.state.as_str(),
            if store.permanent {
                " (PERMANENT error, retried every 30 s: act on it)"
            } else {
                ""
            },
            store.since,
            if store.available {
                "open"
            } else {
                "gate closed to new grants and sessions"
            },
            store.lease_secs,
            store
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        let spool = &store.spool;
        println!(
            "  spool          {} records, {} of spool_limit {}{}{}",
            spool.records,
            crate::model::human_bytes(spool.bytes),
            crate::model::human_bytes(spool.limit),
            if spool.dropped > 0 {
                format!(
                    ", {} records NOT kept (spool full or damaged)",
                    spool.dropped
                )
            } else {
                String::new()
            },
            spool
                .problem
                .as_deref()
                .map(|p| format!("; DAMAGED: {p}"))
                .unwrap_or_default()
        );
        if let Some(d) = &store.durability {
            println!("  durability     {}", d.describe());
        }
    }
    println!("  you are        {}", s.caller);
}

fn detach(cli: &Cli, pin_dir: Option<PathBuf>, force: bool) -> Result<ExitCode, ClientError> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("jitgate: only root can detach the gate");
        return Ok(ExitCode::from(EXIT_FORBIDDEN));
    }
    match cli.client() {
        Ok(mut client) => {
            let result = client.call(&Call::Detach)?;
            println!(
                "gate detached; jitgated is stopping. Removed: {}",
                result["removed"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Connect { .. }) => {
            let pin_dir = pin_dir
                .or_else(|| cli.config().map(|c| c.daemon.bpf_pin_dir))
                .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/jitgate"));
            if let Some(holder) = crate::gate::pinlock::holder(&pin_dir) {
                let holder = output::shown(&holder.to_string()).into_owned();
                if !force {
                    eprintln!(
                        "jitgate: {holder} holds {} but did not answer on {}; stop it (systemctl stop jitgated), or pass --socket for its socket. --force removes the pins under it",
                        pin_dir.display(),
                        cli.socket().display()
                    );
                    return Ok(ExitCode::from(EXIT_CONFLICT));
                }
                eprintln!(
                    "jitgate: warning: {holder} still holds {}; while it runs it keeps the programs attached and pins them again",
                    pin_dir.display()
                );
            }
            match crate::gate::detach(&pin_dir) {
                Ok(removed) if removed.is_empty() => {
                    println!("nothing pinned under {}", pin_dir.display());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(removed) => {
                    println!(
                        "jitgated is not running; removed the pinned gate: {}",
                        removed
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("jitgate: detaching {}: {e:#}", pin_dir.display());
                    Ok(ExitCode::from(EXIT_ERROR))
                }
            }
        }
        Err(e) => Err(e),
    }
}
