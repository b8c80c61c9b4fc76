//! `jitgate-bench fleet`: a simulated fleet on one shared PostgreSQL store, the measuring half
//! of `cargo xtask bench fleet`.
//!
//! Every simulated host is the agent's own store code ([`PostgresStore`]: its writer with the
//! 100 ms batching, its change-log follower with LISTEN/NOTIFY and the periodic read that
//! renews the lease, its local spool), each with its own `host_id`, state dir and connections,
//! all in this one process so that times taken on two hosts share one clock. The rest of an
//! agent (proxy, grant engine) reaches the store only through these calls, so what the server
//! sees is what a fleet of agents would make it do.
//!
//! Phases, each measured on the server itself (CPU of the postmaster and every backend from
//! `/proc`, WAL from `pg_current_wal_lsn`, transactions from `pg_stat_database`):
//!
//! 1. start: every host reaches the store (SCRAM login, the migration check under the
//!    advisory lock, the first read of the change log), a few dozen at a time;
//! 2. idle: nothing happens; what a host costs the server by being there;
//! 3. decisions at rest: a request filed on host A is approved on host B; timed from B's call
//!    to A's store handing the grant to the agent (what a waiting connection waits for), then
//!    the same for a revocation;
//! 4. load: every host opens sessions and records statements at a steady rate (the fleet's
//!    rate spread over its hosts) while the
//!    decisions of phase 3 go on; every statement submitted must be stored in the end.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use jitgate::{
    config::Access,
    grants::scope::HostScope,
    ids,
    model::{
        Actor, Decision, Grant, Request, RequestStatus, Session, SessionOutcome, StatementRecord,
        Timestamp,
    },
    store::{
        Decided, GrantApproval, GrantChange, Store,
        postgres::{PostgresOptions, PostgresStore},
    },
};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_postgres::{Client, NoTls};

/// Hosts reaching the store at once while the fleet starts (a fleet restarted together
/// reaches it about like this: each agent retries with backoff).
const START_AT_ONCE: usize = 32;

/// Statements per simulated session: an agent's connection runs a few, then closes.
const STATEMENTS_PER_SESSION: u32 = 10;

/// The agent's defaults for what the simulation does not vary.
const POOL_SIZE: usize = 4;
const LEASE: Duration = Duration::from_secs(30);
const SPOOL_LIMIT: u64 = 64 << 20;

/// How long a host may take to see a decision before the run counts as failed.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

/// What to simulate, and where.
pub struct Plan {
    /// The store URL every host uses (`[store] url`).
    pub url: String,
    pub password_file: PathBuf,
    /// A superuser connection to the same database, for the server's own figures.
    pub admin_url: String,
    /// The server's postmaster: its CPU and its backends' is the store's cost.
    pub postmaster: u32,
    pub hosts: usize,
    /// Seconds of the idle and of the load window each.
    pub secs: f64,
    /// Statements the whole fleet records per second during the load window, spread evenly
    /// over the hosts (fixed across fleet sizes, so the cost per statement compares).
    pub rate: f64,
    /// Decisions timed at rest, and again under load.
    pub rounds: usize,
    /// Each host's state dir goes under here.
    pub dir: PathBuf,
}

/// Parses `URL PASSWORD_FILE ADMIN_URL POSTMASTER_PID HOSTS SECS RATE ROUNDS DIR`.
pub fn plan(args: &[&str]) -> Result<Plan> {
    let [
        url,
        password_file,
        admin_url,
        pm,
        hosts,
        secs,
        rate,
        rounds,
        dir,
    ] = args
    else {
        bail!("fleet takes URL PASSWORD_FILE ADMIN_URL POSTMASTER_PID HOSTS SECS RATE ROUNDS DIR");
    };
    let num = |what: &str, s: &str| -> Result<f64> {
        s.parse()
            .with_context(|| format!("{what}: not a number: {s}"))
    };
    Ok(Plan {
        url: (*url).to_owned(),
        password_file: PathBuf::from(password_file),
        admin_url: (*admin_url).to_owned(),
        postmaster: pm.parse().context("POSTMASTER_PID")?,
        hosts: hosts.parse().context("HOSTS")?,
        secs: num("SECS", secs)?,
        rate: num("RATE", rate)?,
        rounds: rounds.parse().context("ROUNDS")?,
        dir: PathBuf::from(dir),
    })
}

pub fn run(plan: &Plan) -> Result<Value> {
    if plan.hosts < 2 {
        bail!("a fleet needs two hosts at least (a decision crosses from one to another)");
    }
    // Every core: a real fleet brings a machine per host, so the simulation must not be what
    // limits the figures (its own CPU is reported, to show when it came close).
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, usize::from))
        .enable_all()
        .build()?
        .block_on(simulate(plan))
}

async fn simulate(plan: &Plan) -> Result<Value> {
    let (admin, conn) = tokio_postgres::connect(&plan.admin_url, NoTls)
        .await
        .context("connecting as the superuser")?;
    tokio::spawn(conn);
    let server = Server {
        admin,
        postmaster: plan.postmaster,
    };

    // 1. start
    let began = Instant::now();
    let stores: Vec<Arc<PostgresStore>> = stream::iter(0..plan.hosts)
        .map(|i| open_host(plan, i))
        .buffered(START_AT_ONCE)
        .try_collect()
        .await?;
    let start_secs = began.elapsed().as_secs_f64();
    let connections_idle = server.connections().await?;
    let private_kib = server.private_kib();

    // 2. idle
    let before = server.sample().await?;
    tokio::time::sleep(Duration::from_secs_f64(plan.secs)).await;
    let idle = server.sample().await?.since(&before);

    // 3. decisions at rest
    let before = server.sample().await?;
    let mut at_rest = Decisions::default();
    for round in 0..plan.rounds {
        at_rest.push(decide_across(&stores, round).await?);
    }
    let decisions = server.sample().await?.since(&before);

    // 4. load, with decisions going on
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let before = server.sample().await?;
    let load_began = Instant::now();
    let loads: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(record_steadily(
                s.clone(),
                i,
                plan.hosts,
                plan.rate / plan.hosts as f64,
                counts.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let window = Duration::from_secs_f64(plan.secs);
    let mut under_load = Decisions::default();
    let gap = window / (plan.rounds.max(1) as u32 + 1);
    for round in 0..plan.rounds {
        tokio::time::sleep(gap).await;
        under_load.push(decide_across(&stores, plan.rounds + round).await?);
    }
    tokio::time::sleep_until((load_began + window).into()).await;
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.await.context("a host's load task")?;
    }
    // Every record written before the window closes: the cost of the load is all in it.
    for s in &stores {
        s.flush().await.context("flushing a host's records")?;
    }
    let load = server.sample().await?.since(&before);
    let connections_load = server.connections().await?;
    let submitted = counts.statements.load(Ordering::Relaxed);
    let stored = server.count_statements().await?;
    if stored != submitted {
        bail!("{submitted} statements recorded by the hosts, {stored} in the store");
    }
    drop(stores);
    Ok(json!({
        "hosts": plan.hosts,
        "statements_per_session": STATEMENTS_PER_SESSION,
        "start_secs": start_secs,
        "connections_idle": connections_idle,
        "connections_load": connections_load,
        "server_private_kib": private_kib,
        "idle": idle.json(),
        "decisions": decisions.json(),
        "load": load.json(),
        "statements": submitted,
        "sessions": counts.sessions.load(Ordering::Relaxed),
        "at_rest": at_rest.json(),
        "under_load": under_load.json(),
    }))
}

/// Host `i`, reaching the store the way an agent does at start.
async fn open_host(plan: &Plan, i: usize) -> Result<Arc<PostgresStore>> {
    let options = PostgresOptions {
        url: plan.url.clone(),
        password_file: Some(plan.password_file.clone()),
        ca_file: None,
        pool_size: POOL_SIZE,
        host_id: host_id(i),
        lease: LEASE,
        spool_limit: SPOOL_LIMIT,
        change_log_retention: jitgate::store::postgres::DEFAULT_CHANGE_LOG_RETENTION,
        require_sync_standby: false,
    };
    let state = plan.dir.join(host_id(i));
    PostgresStore::open(&options, &state)
        .await
        .map(Arc::new)
        .with_context(|| format!("starting simulated host {}", host_id(i)))
}

fn host_id(i: usize) -> String {
    format!("sim-{i:04}")
}

#[derive(Default)]
struct Counts {
    statements: AtomicU64,
    sessions: AtomicU64,
}

/// One host's traffic: sessions of [`STATEMENTS_PER_SESSION`] statements, `rate` statements
/// a second, each recorded as the agent records it (one fire-and-forget call per statement;
/// the store's writer batches them). Hosts start out of step, as real ones are.
async fn record_steadily(
    store: Arc<PostgresStore>,
    i: usize,
    hosts: usize,
    rate: f64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    if rate <= 0.0 {
        return;
    }
    let gap = Duration::from_secs_f64(1.0 / rate);
    tokio::time::sleep(gap.mul_f64(i as f64 / hosts as f64)).await;
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        let mut s = session(&store);
        store.session_opened(s.clone());
        counts.sessions.fetch_add(1, Ordering::Relaxed);
        for seq in 0..STATEMENTS_PER_SESSION {
            tick.tick().await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            store.record_statements(vec![statement(&s.id, seq)]);
            counts.statements.fetch_add(1, Ordering::Relaxed);
        }
        s.ended_at = Some(Timestamp::now());
        s.outcome = SessionOutcome::Closed;
        s.bytes_up = 4096;
        s.bytes_down = 65_536;
        store.session_ended(s);
    }
}

/// One decision crossing hosts, timed in milliseconds.
struct Decision3 {
    /// Host B's approve call, until committed.
    approve_call: f64,
    /// From B's call to A's store handing the grant and the decision on.
    approve_seen: f64,
    /// From B's revoke call to A's store reporting the grant revoked.
    revoke_seen: f64,
}

#[derive(Default)]
struct Decisions {
    approve_call: Vec<f64>,
    approve_seen: Vec<f64>,
    revoke_seen: Vec<f64>,
}

impl Decisions {
    fn push(&mut self, d: Decision3) {
        self.approve_call.push(d.approve_call);
        self.approve_seen.push(d.approve_seen);
        self.revoke_seen.push(d.revoke_seen);
    }

    fn json(&self) -> Value {
        json!({
            "approve_call_ms": self.approve_call,
            "approve_seen_ms": self.approve_seen,
            "revoke_seen_ms": self.revoke_seen,
        })
    }
}

/// A request filed on one host, approved on another half the fleet away, then revoked there.
async fn decide_across(stores: &[Arc<PostgresStore>], round: usize) -> Result<Decision3> {
    let n = stores.len();
    let a = &stores[(round * 7) % n];
    let mut b_at = (round * 7 + n / 2) % n;
    if b_at == (round * 7) % n {
        b_at = (b_at + 1) % n;
    }
    let b = &stores[b_at];
    let mut changes = a.grant_changes();
    let q = request(a.host_id());
    a.file_request(q.clone(), "user bench".into())
        .await
        .context("filing a request")?;
    let g = grant(&q, a.host_id());
    let t0 = Instant::now();
    let decided = b
        .approve_request(GrantApproval {
            grant: g.clone(),
            approver: actor(),
            actor: "user bench".into(),
            ttl_secs: q.ttl.as_secs(),
        })
        .await
        .context("approving on another host")?;
    if !matches!(decided, Decided::Done(_)) {
        bail!("approving {}: {decided:?}", q.id);
    }
    let approve_call = ms(t0.elapsed());
    // The grant made usable on A, then the request's decision that wakes whoever waits on it
    // there (the agent's grant engine looks again and finds the grant).
    seen(
        &mut changes,
        |c| matches!(c, GrantChange::Issued(x) if x.id == g.id),
    )
    .await
    .with_context(|| format!("{} waiting for grant {}", a.host_id(), g.id))?;
    seen(
        &mut changes,
        |c| matches!(c, GrantChange::Decided { request, .. } if *request == q.id),
    )
    .await
    .with_context(|| format!("{} waiting for the decision on {}", a.host_id(), q.id))?;
    let approve_seen = ms(t0.elapsed());
    let t1 = Instant::now();
    b.revoke_grant(g.id.clone(), "user bench".into(), "bench".into())
        .await
        .context("revoking on another host")?;
    seen(
        &mut changes,
        |c| matches!(c, GrantChange::Revoked { grant } if *grant == g.id),
    )
    .await
    .with_context(|| format!("{} waiting for the revocation of {}", a.host_id(), g.id))?;
    Ok(Decision3 {
        approve_call,
        approve_seen,
        revoke_seen: ms(t1.elapsed()),
    })
}

/// Waits until the host's store reports a change `wanted` matches.
async fn seen(
    changes: &mut broadcast::Receiver<GrantChange>,
    wanted: impl Fn(&GrantChange) -> bool,
) -> Result<()> {
    tokio::time::timeout(SEEN_WITHIN, async {
        loop {
            match changes.recv().await {
                Ok(c) if wanted(&c) => return Ok(()),
                Ok(_) => {}
                Err(e) => bail!("the store's changes: {e}"),
            }
        }
    })
    .await
    .with_context(|| format!("not seen within {SEEN_WITHIN:?}"))?
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn actor() -> Actor {
    Actor {
        uid: 1000,
        user: "bench".into(),
        identity: None,
        task: None,
    }
}

fn request(host: &str) -> Request {
    Request {
        id: ids::new(ids::Kind::Request),
        identity: "bench-agent".into(),
        resource: "orders-db".into(),
        access: Access::Read,
        ttl: Duration::from_secs(600),
        reason: "fleet bench".into(),
        task: None,
        requested_by: actor(),
        created_at: Timestamp::now(),
        status: RequestStatus::Pending,
        policy: "bench".into(),
        decided_by: None,
        decided_at: None,
        decision_reason: None,
        approvals: Vec::new(),
        needs: None,
        grant: None,
        statement: None,
        session: None,
        host: Some(host.to_owned()),
        hosts: None,
    }
}

fn grant(q: &Request, host: &str) -> Grant {
    let now = Timestamp::now();
    Grant {
        id: ids::new(ids::Kind::Grant),
        request: q.id.clone(),
        identity: q.identity.clone(),
        resource: q.resource.clone(),
        access: q.access,
        task: None,
        created_at: now,
        expires_at: now.plus(q.ttl),
        approved_by: "bench".into(),
        policy: q.policy.clone(),
        reason: q.reason.clone(),
        revoked_at: None,
        revoked_by: None,
        revoke_reason: None,
        hosts: HostScope::Hosts(vec![host.to_owned()]),
    }
}

fn session(store: &PostgresStore) -> Session {
    Session {
        id: ids::new(ids::Kind::Session),
        identity: Some("bench-agent".into()),
        task: None,
        pid: 4242,
        uid: 1000,
        command: format!("psql on {}", store.host_id()),
        resource: Some("orders-db".into()),
        grant: None,
        destination: "10.0.0.5:5432".into(),
        started_at: Timestamp::now(),
        ended_at: None,
        bytes_up: 0,
        bytes_down: 0,
        outcome: SessionOutcome::Open,
        detail: String::new(),
        database: Some("orders".into()),
        access: Some(Access::Read),
    }
}

/// About what an agent records for a short statement from an ORM.
fn statement(session: &str, seq: u32) -> StatementRecord {
    StatementRecord {
        session: session.into(),
        seq,
        at: Timestamp::now(),
        text: "SELECT id, status, total FROM orders WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 20".into(),
        params: vec![Some(format!("{}", 10_000 + seq))],
        decision: Decision::Allowed,
        rule: None,
        approved_by: None,
        held_ms: 0,
        duration_ms: Some(0.4),
        rows: Some(20),
        tag: Some("SELECT 20".into()),
        error: None,
        masked: 0,
    }
}

/// The store's server, seen from its superuser and from `/proc`.
struct Server {
    admin: Client,
    postmaster: u32,
}

/// The server's counters at one moment.
struct Sample {
    at: Instant,
    /// CPU seconds of the postmaster, its live backends and those it has reaped.
    server_cpu: f64,
    /// CPU seconds of this process (the simulated hosts).
    hosts_cpu: f64,
    /// Transactions committed and rolled back (pg_stat_database; backends report them within
    /// about a second of going idle, so short windows are approximate).
    xacts: i64,
    wal_bytes: i64,
}

/// What happened between two samples.
struct Delta {
    secs: f64,
    server_cpu: f64,
    hosts_cpu: f64,
    xacts: i64,
    wal_bytes: i64,
}

impl Sample {
    fn since(&self, before: &Sample) -> Delta {
        Delta {
            secs: self.at.duration_since(before.at).as_secs_f64(),
            server_cpu: self.server_cpu - before.server_cpu,
            hosts_cpu: self.hosts_cpu - before.hosts_cpu,
            xacts: self.xacts - before.xacts,
            wal_bytes: self.wal_bytes - before.wal_bytes,
        }
    }
}

impl Delta {
    fn json(&self) -> Value {
        json!({
            "secs": self.secs,
            "server_cpu_secs": self.server_cpu,
            "hosts_cpu_secs": self.hosts_cpu,
            "xacts": self.xacts,
            "wal_bytes": self.wal_bytes,
        })
    }
}

impl Server {
    async fn sample(&self) -> Result<Sample> {
        let row = self
            .admin
            .query_one(
                "SELECT (SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database)::bigint,
                        pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
                &[],
            )
            .await?;
        Ok(Sample {
            at: Instant::now(),
            server_cpu: cpu_secs(self.postmaster)?,
            hosts_cpu: own_cpu_secs(),
            xacts: row.try_get(0)?,
            wal_bytes: row.try_get(1)?,
        })
    }

    /// Client connections, other than this one.
    async fn connections(&self) -> Result<i64> {
        Ok(self
            .admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .try_get(0)?)
    }

    async fn count_statements(&self) -> Result<u64> {
        let n: i64 = self
            .admin
            .query_one("SELECT count(*) FROM statements", &[])
            .await?
            .try_get(0)?;
        Ok(n as u64)
    }

    /// Memory the backends hold privately (what each added connection costs; shared buffers
    /// are counted once, apart).
    fn private_kib(&self) -> u64 {
        children(self.postmaster)
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum()
    }
}

/// `(ppid, cutime + cstime)` from `/proc/<pid>/stat`: the parent, and the CPU (clock ticks)
/// of children it has reaped.
fn stat(pid: &str) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); ppid is field 4, cutime and cstime fields 16 and 17.
    let num = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some((num(4)? as u32, num(16)? + num(17)?))
}

/// Nanoseconds `pid` has run, from the scheduler (`/proc/<pid>/schedstat`). Not utime +
/// stime: those are whole clock ticks per process, and a thousand backends that each run a
/// few milliseconds in a window would all round down to nothing.
fn ran_ns(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pids() -> Vec<String> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .collect()
        })
        .unwrap_or_default()
}

fn children(postmaster: u32) -> Vec<String> {
    pids()
        .into_iter()
        .filter(|p| stat(p).is_some_and(|(ppid, _)| ppid == postmaster))
        .collect()
}

/// CPU seconds of the server: the postmaster and its live children, precisely, and the
/// children it has reaped (in clock ticks: the postmaster's own accounting of them).
fn cpu_secs(postmaster: u32) -> Result<f64> {
    let pm = postmaster.to_string();
    let (Some((_, reaped)), Some(own)) = (stat(&pm), ran_ns(&pm)) else {
        bail!("the store's server (pid {postmaster}) is gone");
    };
    let live: u64 = children(postmaster).iter().filter_map(|p| ran_ns(p)).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((own + live) as f64 / 1e9 + reaped as f64 / hz)
}

fn own_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data, valid all zero; getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
