//! What a session tracks of the protocol: what the client is owed in order (`Expect`),
//! prepared statements and portals, cursors, poisons, masking plans and records in flight.

use super::*;

/// The statement or portal a Describe answer belongs to: the object itself, not its name, so
/// a pipelined batch that re-uses a name (the unnamed statement, the unnamed portal) cannot
/// mix up which result is masked how.
#[derive(Clone)]
pub(super) enum DescribeTarget {
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

pub(super) type Stmt = Arc<Mutex<StmtInfo>>;
pub(super) type Portal = Arc<PortalInfo>;

/// What the client is owed, in order, for what was forwarded.
#[derive(Debug)]
pub(super) enum Expect {
    Query {
        rec: u32,
        /// What its results may be computed from.
        refs: Arc<ResultRefs>,
        /// How each `COPY ... TO` in it is masked, in order; what is left when the query
        /// ends (a COPY the server refused before starting) goes with it.
        copies: VecDeque<CopyPlan>,
        /// Its COPY FROM window, if it may start one (see [`CopyIn`]).
        copy_in: Option<u64>,
        /// What its statements do to the prepared statements, in order, applied as the
        /// server completes each (see [`SqlEffect`]), and the name-space sequence it was
        /// sent at.
        effects: VecDeque<SqlEffect>,
        names_seq: u64,
        /// Its `CLOSE`s, in order, applied as the server completes each (see
        /// [`State::cursor_closed`]).
        closes: VecDeque<CursorClose>,
    },
    /// A Parse of this statement name (`None`: one that must not touch the name's entry),
    /// and the statement it made here (matched by identity: a later Parse of the name may
    /// have replaced it in the gate's table meanwhile).
    Parse(Option<String>, Option<Stmt>),
    /// A Bind of portal `portal` (the gate's `bind` count at it), and what the gate held
    /// under that name before: put back if the server fails or skips it.
    Bind {
        portal: String,
        bind: u64,
        previous: Option<Portal>,
    },
    Describe {
        target: Option<DescribeTarget>,
        internal: bool,
    },
    Execute {
        portal: Portal,
        /// What its rows are masked by, where not its portal's plan: a `FETCH` described
        /// anew as it runs (see [`StmtInfo::fetches`]).
        masked_as: Option<Portal>,
        /// Its portal's first Execute: the portal counts as run from it (see
        /// [`State::execute_skipped`]).
        first_run: bool,
        rec: u32,
        /// Its COPY FROM window, if it may start one (see [`CopyIn`]).
        copy_in: Option<u64>,
        /// The name-space sequence it was sent at, when its statement has a [`SqlEffect`].
        names_seq: u64,
        /// Its statement's `CLOSE`, at its portal's first Execute.
        closes: VecDeque<CursorClose>,
    },
    /// A Close; of a statement: what the gate dropped when it sent it.
    Close(Option<Closing>),
    /// A Sync. One the client sent inside a COPY FROM window is ignored by the server when
    /// that COPY did start (no ReadyForQuery answers it).
    Sync { copy_in: Option<u64> },
}

/// COPY FROM STDIN and the Syncs sent during it. The server ignores Sync in copy-in mode
/// (drivers such as tokio-postgres send Bind, Execute, Sync, then the data, CopyDone, Sync:
/// three Syncs, two ReadyForQuery), but only if the COPY started, which only the server's
/// CopyInResponse tells. So the client side opens a window at each statement that may copy
/// in and tags the Syncs sent until its CopyDone or CopyFail; the server side marks the
/// window started at CopyInResponse and then passes over its Syncs.
///
/// Only Syncs sent before the window's first CopyData are tagged: that is where drivers put
/// them, and a Sync sent after data could meet a server that already left copy mode on a
/// bad row.
#[derive(Default)]
pub(super) struct CopyIn {
    /// The client's open window (from the Execute or Query to its CopyDone or CopyFail),
    /// while no CopyData was sent in it.
    open: Option<u64>,
    next: u64,
    /// Windows whose COPY the server started; their tagged Syncs are ignored.
    started: Vec<u64>,
}

impl CopyIn {
    /// Opens a window for a statement that may copy in.
    pub(super) fn open(&mut self) -> u64 {
        self.next += 1;
        self.open = Some(self.next);
        self.next
    }

    /// The window a Sync sent now belongs to.
    pub(super) fn tag(&self) -> Option<u64> {
        self.open
    }

    /// The client sent copy data, or ended the copy: later Syncs are not tagged.
    pub(super) fn close(&mut self) {
        self.open = None;
    }

    /// The server started the COPY of `window`.
    pub(super) fn started(&mut self, window: u64) {
        self.started.push(window);
    }

    /// Whether the server ignored this Sync (one of a started window's). A Sync the server
    /// answers comes after every Sync of the windows started so far: they are forgotten.
    pub(super) fn ignored(&mut self, sync: Option<u64>) -> bool {
        if sync.is_some_and(|w| self.started.contains(&w)) {
            return true;
        }
        self.started.clear();
        false
    }
}

/// A `COPY ... TO`'s format, masking plan and NULL text.
pub(super) type CopyPlan = (CopyFormat, Plan, Option<String>);

/// A prepared statement's judgement, copied into the record of every execution.
#[derive(Clone, Debug)]
pub(super) struct Judged {
    pub(super) decision: Decision,
    /// The guardrail that decided, if any.
    pub(super) rule: Option<String>,
    pub(super) approved_by: Option<String>,
    pub(super) held_ms: u64,
}

impl Judged {
    /// The judgement a finished Parse's record carries.
    pub(super) fn of(record: StatementRecord) -> (Self, String) {
        (
            Self {
                decision: record.decision,
                rule: record.rule,
                approved_by: record.approved_by,
                held_ms: record.held_ms,
            },
            record.text,
        )
    }

    /// Copies the judgement into an execution's record.
    pub(super) fn apply(self, r: &mut StatementRecord) {
        r.decision = self.decision;
        r.rule = self.rule;
        r.approved_by = self.approved_by;
        r.held_ms = self.held_ms;
    }
}

#[derive(Default)]
pub(super) struct StmtInfo {
    pub(super) plan: Option<Arc<Plan>>,
    pub(super) refs: Arc<ResultRefs>,
    pub(super) copy: Option<CopyPlan>,
    /// How the Parse was judged (a held one: who approved it, after how long), for the
    /// records of its executions.
    pub(super) judged: Option<Judged>,
    /// It runs a COPY FROM, which may start copy-in mode.
    pub(super) copies_in: bool,
    /// `text` as records show it (detectors applied, truncated): computed once at Parse, not
    /// on every Execute.
    pub(super) recorded: String,
    /// Its Parse took from the statement rate for one run, not yet used by an Execute.
    pub(super) prepaid: bool,
    /// What running it does to the prepared statements (a Parse of `PREPARE` or
    /// `DEALLOCATE`), applied when the server completes a run (as of the run's sending:
    /// see [`Expect::Execute`]).
    pub(super) effect: Option<SqlEffect>,
    /// Parsed while a change to the prepared statements' names (a Close, a `PREPARE`,
    /// `DEALLOCATE` or `DISCARD ALL`) was still unanswered: until its own ParseComplete, the
    /// server may hold another statement under its name (and refuse this Parse, 42P05), so
    /// a Bind of it in a later cycle is refused rather than judged and masked as this one.
    pub(super) contested: bool,
    /// The server answered its Parse.
    pub(super) confirmed: bool,
    /// The cycle its Parse was sent in.
    pub(super) cycle: u64,
    /// The name-space sequence its Parse was sent at (see [`State::names_sent`]).
    pub(super) seq: u64,
    /// What it counts in [`State::prepared_bytes`].
    pub(super) bytes: usize,
    /// What running it does to the portals and cursors, applied at each Execute.
    pub(super) portal_effects: Vec<PortalEffect>,
    /// The cursors its `FETCH` reads: what they hold when it runs may not be what they held
    /// at its Parse (declared again since), so each Execute's rows are described anew and
    /// masked by the cursors' queries as they are then.
    pub(super) fetches: Vec<String>,
    /// The SQL-prepared statements its `EXECUTE` runs, likewise.
    pub(super) executes: Vec<String>,
    /// The record its text was first written in, whole. A run after it refers to that
    /// record rather than copying a long text again: an Execute of a few bytes would
    /// otherwise make the store keep up to `MAX_RECORDED_TEXT` each time.
    pub(super) recorded_in: Option<u32>,
}

/// What a statement does to the server's prepared statements. Applied only when the server
/// completes it (its CommandComplete): one that fails, is skipped after an error, or is
/// prepared and never run changes nothing there, and so nothing here (else a `PREPARE` the
/// server refused, or a `DEALLOCATE` it never ran, would have the gate judge and mask a
/// name by a statement other than the one the server runs).
#[derive(Clone, Debug)]
pub(super) enum SqlEffect {
    Prepare(String, Box<Statement>),
    Deallocate(String),
    /// `DEALLOCATE ALL` (false) or `DISCARD ALL` (true).
    All(bool),
}

impl SqlEffect {
    /// The CommandComplete tag the server answers it with.
    pub(super) const fn tag(&self) -> &'static str {
        match self {
            Self::Prepare(..) => "PREPARE",
            Self::Deallocate(_) => "DEALLOCATE",
            Self::All(false) => "DEALLOCATE ALL",
            Self::All(true) => "DISCARD ALL",
        }
    }

    /// The effects of `analysis`'s statements, in order.
    pub(super) fn of(analysis: &[Statement]) -> VecDeque<Self> {
        let mut out = VecDeque::new();
        for s in analysis {
            if let Some(name) = &s.prepares {
                out.push_back(Self::Prepare(name.clone(), Box::new(s.clone())));
            }
            match &s.deallocates {
                Some(Some(name)) => out.push_back(Self::Deallocate(name.clone())),
                Some(None) => out.push_back(Self::All(false)),
                None => {}
            }
            if s.discards {
                out.push_back(Self::All(true));
            }
        }
        out
    }
}

impl std::fmt::Debug for StmtInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("statement")
    }
}

/// Texts up to this long are recorded whole with every run.
const RECORDED_WHOLE: usize = 512;

impl StmtInfo {
    /// The cursors its FETCH and the prepared statements its EXECUTE read, if any.
    pub(super) fn reads(&self) -> Option<(Vec<String>, Vec<String>)> {
        (!self.fetches.is_empty() || !self.executes.is_empty())
            .then(|| (self.fetches.clone(), self.executes.clone()))
    }

    /// Its text as a run's record shows it: whole the first time (and when short), then a
    /// reference to the record that holds it.
    pub(super) fn recorded_for_run(&self) -> String {
        match self.recorded_in {
            Some(seq) if self.recorded.len() > RECORDED_WHOLE => {
                let mut head = self.recorded.as_str();
                let mut cut = 120.min(head.len());
                while !head.is_char_boundary(cut) {
                    cut -= 1;
                }
                head = &head[..cut];
                format!(
                    "{head}… <prepared statement of {} bytes, whole in #{seq}>",
                    self.recorded.len()
                )
            }
            _ => self.recorded.clone(),
        }
    }
}

pub(super) struct PortalInfo {
    pub(super) statement: Option<Stmt>,
    pub(super) formats: Vec<i16>,
    pub(super) params: Vec<Option<String>>,
    /// Set by a Describe of the portal (its RowDescription carries the real formats), or
    /// on first use from its statement's plan and its result formats.
    pub(super) plan: Mutex<Option<Arc<Plan>>>,
    /// Whether an Execute has run it (the first takes from the statement rate).
    pub(super) executed: std::sync::atomic::AtomicBool,
    /// The cycle its Bind was sent in, and which Bind of the session it was (see
    /// [`State::portal_cycles`]).
    pub(super) cycle: u64,
    pub(super) bind: u64,
    /// Its recorded parameters' bytes, counted in [`State::portal_bytes`].
    pub(super) bytes: usize,
    /// Its Bind replaced a portal the gate held under the name: until the server answers it
    /// (`confirmed`, at BindComplete), the server may still hold the one before (a named
    /// portal's Bind fails, 42P03), so an Execute from a later batch is refused.
    pub(super) replaced: bool,
    pub(super) confirmed: std::sync::atomic::AtomicBool,
    /// [`State::names_stamp`] when it was bound: the server describes a `FETCH` or SQL
    /// `EXECUTE` portal by its cursor or prepared statement as they were then, but looks the
    /// name up again as it runs it.
    pub(super) stamp: u64,
}

impl PortalInfo {
    /// How its rows are masked: its own description, else its statement's with its formats.
    pub(super) fn plan(&self) -> Option<Arc<Plan>> {
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
pub(super) struct InFlight {
    pub(super) record: StatementRecord,
    pub(super) started: Instant,
    /// Its text's and parameters' bytes, counted in [`State::records_bytes`].
    pub(super) bytes: usize,
}

/// The session's maps: looked up several times per message with keys the session chose
/// (statement and portal names, nonces), so hashed with foldhash (seeded per map) rather
/// than SipHash; the keys are bounded per session (`MAX_PREPARED`), and a client could only
/// slow its own session by colliding them.
pub(super) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub(super) struct State {
    pub(super) expect: VecDeque<Expect>,
    /// Poisons pending, by nonce: an error is matched by the nonces it quotes, looked up
    /// (comparing each error with every poison pending cost time growing with their
    /// product, and a pipeline can hold many of both).
    /// A poison is a refused statement replaced by one the server rejects (a nonce); the
    /// server's error for it is swapped for the refusal's.
    pub(super) poisons: Map<String, PgError>,
    /// The pending poisons' nonces in the order sent (so by cycle), for retiring those of
    /// finished cycles.
    pub(super) poison_order: VecDeque<(u64, String)>,
    pub(super) cycles_sent: u64,
    pub(super) cycles_done: u64,
    pub(super) statements: Map<String, Stmt>,
    pub(super) portals: Map<String, Portal>,
    /// Portals by the cycle (Sync or Query) their Bind was sent in, oldest first: once the
    /// server is idle (ReadyForQuery `I`: no transaction), those of the cycles it has
    /// finished are gone on its side, and go here too (else a session binding portals of
    /// new names without end grows without end).
    pub(super) portal_cycles: VecDeque<(u64, u64, String)>,
    /// Binds seen, numbering them.
    pub(super) binds: u64,
    /// The bytes of the portals' recorded parameters (see [`State::held_bytes`]).
    pub(super) portal_bytes: usize,
    pub(super) sql_prepared: HashMap<String, Statement>,
    /// Statement names whose Close was sent and not yet answered.
    pub(super) closing: Map<String, usize>,
    /// The bytes of `closing`'s names in flight (see [`State::held_bytes`]).
    pub(super) closing_bytes: usize,
    /// Changes to the statement names sent (Parses, Closes, statements with a
    /// [`SqlEffect`]), numbering them: an effect applies only to what was sent before it.
    pub(super) names_sent: u64,
    /// The cycle of the last name change sent that the server may not have answered (see
    /// [`StmtInfo::contested`]).
    pub(super) names_changed_in: Option<u64>,
    /// Statement names the server still holds though the gate dropped them (a Close it
    /// skipped after an error): the gate does not know what they run, so it refuses to bind
    /// them, and a Parse of the name fails on the server (42P05) as here.
    pub(super) phantoms: std::collections::HashSet<String, foldhash::fast::RandomState>,
    /// An extended-protocol error arrived and the server skips what follows up to Sync:
    /// messages the client sends meanwhile are skipped too (see [`Skipping`]).
    pub(super) skipping: Option<Skipping>,
    /// Portals bound before this cycle went with the last idle ReadyForQuery (see
    /// [`State::forget_portals_before`]): none of them is put back.
    pub(super) portals_forgotten_before: u64,
    /// What the prepared statements of both kinds hold (see [`prepared_footprint`]), bounded
    /// by `MAX_PREPARED_BYTES`.
    pub(super) prepared_bytes: usize,
    pub(super) parse_mode: ParseMode,
    /// The simple-protocol result in progress.
    pub(super) current: Option<Arc<Plan>>,
    /// Plans by RowDescription, for results whose columns all come straight from tables
    /// (their plan depends on nothing else): a statement run again is not planned again.
    pub(super) plans: Map<bytes::Bytes, Arc<Plan>>,
    /// SQL cursors by name.
    pub(super) cursors: Map<String, Cursor>,
    /// Counts changes to the names FETCH and EXECUTE portals read (see
    /// [`PortalInfo::stamp`]): to a cursor, portal or prepared statement one of them reads,
    /// or to all of them.
    pub(super) names_stamp: u64,
    /// The names FETCH and EXECUTE portals bound in unfinished cycles read, with the cycle:
    /// a change to another name (a driver's statements and portals) stales none of them.
    pub(super) reading_targets: Map<String, u64>,
    /// Names of protocol portals bound in this transaction to a FETCH or EXECUTE: a SQL
    /// `FETCH` of one reads rows stored from what its cursor or statement was, described as
    /// they are now, so it is refused. Kept to the transaction's end (forgetting the portal
    /// earlier, as a Close the server skips does, must not let the FETCH through).
    pub(super) reading_portals: Map<String, u64>,
    /// [`State::reading_portals`] reached its bound, in this cycle.
    pub(super) reading_portals_full: Option<u64>,
    /// Cursors the gate dropped (closed, rolled back, ended), by name, with what they read:
    /// the server may still hold one (a CLOSE it skipped after an error), so a DECLARE of
    /// the name, which the server then refuses, is masked by both. One goes when the server
    /// is known to have dropped it too: a CLOSE of it (or CLOSE ALL) completed, or, not
    /// `WITH HOLD`, its transaction over (see [`State::cursor_closed`],
    /// [`State::forget_cursors_before`]). Else a session declaring cursors of new
    /// names without end (Django's `iterator()`) would reach the bound below.
    pub(super) cursors_gone: Map<String, Gone>,
    /// More cursors were dropped than [`super::MAX_CURSORS`] (at this name sequence): a
    /// DECLARE of a name not known is masked as if it read anything, until a CLOSE ALL sent
    /// after it completes.
    pub(super) cursors_gone_lost: Option<u64>,
    /// An ErrorResponse came in the cycles the next ReadyForQuery ends: the first of them.
    pub(super) failed_from: Option<u64>,
    /// The transaction's savepoints, oldest first, each with the [`State::binds`] count when
    /// it was made: a `ROLLBACK TO` drops the portals and cursors made since.
    pub(super) savepoints: Vec<(String, u64)>,
    pub(super) copy: Option<CopyMasker>,
    /// Statements in flight by sequence number: a handful at most, looked up for every
    /// masked row, so ordered (no hashing; drained in statement order).
    pub(super) records: std::collections::BTreeMap<u32, InFlight>,
    /// The bytes of `records`, held under [`super::MAX_RECORDS_IN_FLIGHT`].
    pub(super) records_bytes: usize,
    pub(super) next_seq: u32,
    pub(super) finished: Vec<StatementRecord>,
    /// The session may have changed `search_path`: the catalog connection, which keeps the
    /// startup one, can no longer resolve unqualified names the way the session does.
    pub(super) search_path_changed: bool,
    pub(super) copy_in: CopyIn,
    /// Rows and bytes returned against the grant's limits.
    pub(super) budget: super::budget::Budget,
}

/// What a Close of a statement name dropped when the gate sent it, for when the server
/// answers it or skips it.
#[derive(Debug)]
pub(super) struct Closing {
    pub(super) name: String,
    /// The gate held a SQL-`PREPARE`d statement or a phantom under the name.
    other: bool,
    /// The protocol-level statement the gate held under the name: whether the server
    /// holds it too is known when the Close is answered or skipped (its Parse confirmed).
    statement: Option<Stmt>,
    /// The Close's own place among name changes.
    seq: u64,
}

/// Names a cursor's masking may follow before it is masked as reading anything: a name
/// declared and closed over and over would otherwise gather every query's names.
const MAX_CURSOR_REFS: usize = 4096;

/// What either cursor reads (a name declared again, or dropped here and maybe not there),
/// bounded by [`MAX_CURSOR_REFS`].
fn union(a: &Arc<ResultRefs>, b: &Arc<ResultRefs>) -> Arc<ResultRefs> {
    let size =
        |r: &ResultRefs| r.names.len() + r.row_names.len() + r.relations.len() + r.functions.len();
    if a.opaque || b.opaque || size(a) + size(b) > MAX_CURSOR_REFS {
        return ResultRefs::opaque();
    }
    let mut both = ResultRefs::default();
    both.merge(a);
    both.merge(b);
    Arc::new(both)
}

/// A SQL cursor the gate believes the server holds.
#[derive(Clone, Debug)]
pub(super) struct Cursor {
    /// The [`State::binds`] count when declared: a `ROLLBACK TO` drops those made since.
    pub(super) made: u64,
    /// What its `FETCH`es return is computed from.
    pub(super) refs: Arc<ResultRefs>,
    /// `WITH HOLD` (this declaration or one it may still be, see [`State::cursors_gone`]):
    /// a commit does not end it.
    pub(super) hold: bool,
    /// The cycle it was declared in: not `hold`, it is over once the server is idle after
    /// that cycle.
    pub(super) cycle: u64,
}

/// A cursor the gate dropped that the server may still hold (see [`State::cursors_gone`]).
#[derive(Debug)]
pub(super) struct Gone {
    pub(super) refs: Arc<ResultRefs>,
    /// The name sequence it was dropped at: a CLOSE sent at or after it that the server
    /// completes ends it there.
    seq: u64,
    /// The cycle it was dropped in: not `hold`, it is over once the server is idle after
    /// that cycle.
    cycle: u64,
    hold: bool,
}

/// A SQL `CLOSE` sent to run (`name` `None`: `CLOSE ALL`) at name sequence `seq`: once the
/// server completes it, the cursors the gate dropped up to it are gone there too.
#[derive(Clone, Debug)]
pub(super) struct CursorClose {
    name: Option<String>,
    seq: u64,
}

impl CursorClose {
    /// The CommandComplete tag the server answers it with.
    pub(super) const fn tag(&self) -> &'static str {
        match self.name {
            Some(_) => "CLOSE CURSOR",
            None => "CLOSE CURSOR ALL",
        }
    }
}

/// What running a statement does to the server's portals and cursors (see
/// [`State::apply_portal_effect`]).
#[derive(Clone, Debug)]
pub(super) enum PortalEffect {
    /// `DECLARE name`: a cursor, with what its rows are computed from and whether `WITH
    /// HOLD`; a portal of the name is gone on the server (or the DECLARE fails).
    Declare(String, Arc<ResultRefs>, bool),
    /// SQL `CLOSE name`: the cursor, or a protocol-level portal of the name.
    Close(String),
    /// `CLOSE ALL`.
    CloseAll,
    /// The transaction's portals and cursors may end: `COMMIT`, `ROLLBACK`, `PREPARE
    /// TRANSACTION`, `DISCARD ALL`. `WITH HOLD` cursors survive a commit, not a rollback:
    /// all are dropped here, the held ones remembered as the server may still hold them
    /// (their `FETCH`es are masked as of cursors the gate does not know: believing one the
    /// server dropped would let a function that opens a cursor of its name unseen be
    /// masked as it).
    EndAll,
    /// `SAVEPOINT`, `RELEASE`, `ROLLBACK TO`.
    Savepoint(Savepoint),
}

impl PortalEffect {
    /// What `s` does to the transaction's portals beside its cursor (see
    /// [`Statement::ends_portals`], [`Statement::savepoint`]).
    pub(super) fn of_transaction(s: &Statement) -> Option<Self> {
        if s.ends_portals {
            Some(Self::EndAll)
        } else {
            s.savepoint.clone().map(Self::Savepoint)
        }
    }
}

/// The rest of a failed extended-protocol batch, which the server skips up to its Sync.
#[derive(Debug, Default)]
pub(super) struct Skipping {
    /// The error's SQLSTATE, for the records of Executes that never ran.
    pub(super) code: String,
}

/// Protocol-level (`statements`) and SQL (`sql_prepared`) prepared statements share one
/// namespace on the server: these keep the two maps in step with it.
impl State {
    pub(super) fn has_prepared(&self, name: &str) -> bool {
        self.statements.contains_key(name)
            || self.sql_prepared.contains_key(name)
            || self.phantoms.contains(name)
    }

    /// The next name-space sequence (a Parse: ordered against changes, not one itself).
    pub(super) fn next_seq(&mut self) -> u64 {
        self.names_sent += 1;
        self.names_sent
    }

    /// A name change (a Close, a statement with a [`SqlEffect`]) is being sent in the
    /// current cycle: returns its sequence.
    pub(super) fn name_change(&mut self) -> u64 {
        self.names_changed_in = Some(self.cycles_sent);
        self.next_seq()
    }

    /// Whether a name change sent may still be unanswered (its cycle not yet done).
    pub(super) fn names_in_flux(&self) -> bool {
        self.names_changed_in
            .is_some_and(|cycle| cycle >= self.cycles_done)
    }

    /// A Close of statement `name` was sent: the gate drops it now (the next Parse of the
    /// name is the client's new statement), and remembers the Close until answered. Returns
    /// what its [`Expect::Close`] carries.
    pub(super) fn closing(&mut self, name: &str) -> Closing {
        let other = self.sql_prepared.contains_key(name) || self.phantoms.contains(name);
        let statement = self.statements.get(name).cloned();
        self.forget_prepared(name);
        let seq = self.name_change();
        *self.closing.entry(name.to_owned()).or_default() += 1;
        self.closing_bytes += name.len();
        Closing {
            name: name.to_owned(),
            other,
            statement,
            seq,
        }
    }

    /// The server skipped a Close after an error earlier in its batch: it still holds what
    /// the gate dropped, which the gate no longer knows (a phantom: whatever is parsed under
    /// the name since fails on the server), unless that was a statement the server never
    /// made. Everything sent before the Close has been answered or skipped by now, so a
    /// statement whose Parse was not confirmed failed or was skipped, in this batch or an
    /// earlier one.
    pub(super) fn close_skipped(&mut self, close: Closing) {
        let held = close.other
            || close
                .statement
                .as_ref()
                .is_some_and(|s| s.lock().unwrap_or_else(PoisonError::into_inner).confirmed);
        let name = self.close_answered(close);
        if held {
            self.phantoms.insert(name);
        }
    }

    /// A Close is no longer in flight: its count and bytes go; returns its name.
    fn close_answered(&mut self, close: Closing) -> String {
        let name = close.name;
        if let Some(n) = self.closing.get_mut(&name) {
            *n -= 1;
            if *n == 0 {
                self.closing.remove(&name);
            }
        }
        self.closing_bytes = self.closing_bytes.saturating_sub(name.len());
        name
    }

    /// The server closed the statement of a Close sent at `close.seq`.
    pub(super) fn closed(&mut self, close: Closing) {
        let seq = close.seq;
        let name = self.close_answered(close);
        // Gone on the server, whichever kind it was; a statement parsed since stays.
        self.phantoms.remove(&name);
        if let Some(old) = self.sql_prepared.remove(&name) {
            self.prepared_bytes -= prepared_footprint(old.text.len());
        }
        if self
            .statements
            .get(&name)
            .is_some_and(|s| stmt_seq(s) < seq)
        {
            self.remove_statement(&name);
        }
    }

    /// Applies what a statement the server completed did to the prepared statements. `seq`:
    /// when it was sent; statements parsed after it are not touched (the server parsed them
    /// after it ran).
    pub(super) fn apply_sql_effect(&mut self, effect: SqlEffect, seq: u64) {
        match &effect {
            SqlEffect::Prepare(name, _) | SqlEffect::Deallocate(name) => self.touch(name),
            SqlEffect::All(_) => self.names_stamp += 1,
        }
        let before =
            |st: &Self, name: &str| st.statements.get(name).is_some_and(|s| stmt_seq(s) < seq);
        // A Close sent after a PREPARE and skipped finds the name held either way (the
        // PREPAREd statement is kept here).
        let effect_dropped = match &effect {
            SqlEffect::Prepare(..) => None,
            SqlEffect::Deallocate(name) => Some(Some(name.clone())),
            SqlEffect::All(_) => Some(None),
        };
        match effect {
            SqlEffect::Prepare(name, statement) => {
                // The server took the name: whatever the gate held under it from before is
                // stale (a statement parsed since fails on the server, 42P05).
                if before(self, &name) {
                    self.remove_statement(&name);
                }
                self.phantoms.remove(&name);
                self.insert_sql_prepared(name, *statement);
            }
            SqlEffect::Deallocate(name) => {
                if before(self, &name) {
                    self.remove_statement(&name);
                }
                if let Some(old) = self.sql_prepared.remove(&name) {
                    self.prepared_bytes -= prepared_footprint(old.text.len());
                }
                self.phantoms.remove(&name);
            }
            SqlEffect::All(_) => {
                self.sql_prepared.clear();
                let earlier: Vec<String> = self
                    .statements
                    .iter()
                    .filter(|(name, s)| !name.is_empty() && stmt_seq(s) < seq)
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in earlier {
                    self.remove_statement(&name);
                }
                self.prepared_bytes = self.statements.values().map(stmt_bytes).sum();
                self.phantoms.clear();
            }
        }
        if let Some(name) = effect_dropped {
            self.closes_after(name.as_deref(), seq);
        }
    }

    /// Closes of `name` (`None`: of any name) sent after a `DEALLOCATE` the server has now
    /// completed (sent at `seq`) and not yet answered: if the server skips them, it holds
    /// nothing the DEALLOCATE took (only a statement parsed after it).
    fn closes_after(&mut self, name: Option<&str>, seq: u64) {
        for e in &mut self.expect {
            let Expect::Close(Some(close)) = e else {
                continue;
            };
            if close.seq < seq || name.is_some_and(|n| n != close.name) {
                continue;
            }
            close.other = false;
            if close.statement.as_ref().is_some_and(|s| stmt_seq(s) < seq) {
                close.statement = None;
            }
        }
    }

    /// `DEALLOCATE name` or Close: either kind goes.
    pub(super) fn forget_prepared(&mut self, name: &str) {
        if let Some(old) = self.statements.remove(name) {
            self.prepared_bytes -= stmt_bytes(&old);
        }
        if let Some(old) = self.sql_prepared.remove(name) {
            self.prepared_bytes -= prepared_footprint(old.text.len());
        }
    }

    /// Forgets a protocol-level statement (refused, or failed on the server).
    pub(super) fn remove_statement(&mut self, name: &str) {
        if let Some(old) = self.statements.remove(name) {
            self.prepared_bytes -= stmt_bytes(&old);
        }
    }

    /// A Parse's statement under `name` (the unnamed one replaces its predecessor).
    pub(super) fn insert_statement(&mut self, name: String, stmt: Stmt) {
        self.prepared_bytes += stmt_bytes(&stmt);
        if let Some(old) = self.statements.insert(name, stmt) {
            self.prepared_bytes -= stmt_bytes(&old);
        }
    }

    /// A SQL `PREPARE`'s statement under `name`.
    pub(super) fn insert_sql_prepared(&mut self, name: String, statement: Statement) {
        self.prepared_bytes += prepared_footprint(statement.text.len());
        if let Some(old) = self.sql_prepared.insert(name, statement) {
            self.prepared_bytes -= prepared_footprint(old.text.len());
        }
    }

    /// Whether `adding` more named statements of `bytes` more would pass the session's
    /// bounds; `Some` with how many and how much it holds then.
    pub(super) fn over_prepared(&self, adding: usize, bytes: usize) -> Option<(usize, usize)> {
        let held = self.statements.len() + self.sql_prepared.len() + self.phantoms.len();
        (held + adding > super::MAX_PREPARED
            || self.prepared_bytes + bytes > super::MAX_PREPARED_BYTES)
            .then_some((held, self.prepared_bytes))
    }

    /// Binds a portal under `name` (replacing one of that name).
    pub(super) fn insert_portal(&mut self, name: String, portal: Portal) {
        self.portal_bytes += portal.bytes;
        if let Some(old) = self.portals.insert(name.clone(), portal.clone()) {
            self.portal_bytes -= old.bytes;
        }
        self.note_portal(&portal, name);
    }

    /// Binds the server failed or skipped, in the order sent (see [`Expect::Bind`]): each
    /// name gets back what it held before, latest first, where it still holds that Bind's
    /// portal. The name is forgotten instead where the server may no longer hold the one
    /// before: a failed Bind of the unnamed portal (the server drops the old one once the
    /// statement and parameters are checked), or one bound before the last idle
    /// ReadyForQuery (dropped with its transaction). A portal the gate does not hold runs
    /// with no statement known here: unrecorded text, and a result with no plan ends the
    /// session; never judged or masked by another statement.
    pub(super) fn binds_undone(&mut self, undone: Vec<(String, u64, Option<Portal>, bool)>) {
        for (name, bind, previous, failed) in undone.into_iter().rev() {
            if self.portals.get(&name).is_none_or(|p| p.bind != bind) {
                continue;
            }
            match previous {
                Some(previous)
                    if !(failed && name.is_empty())
                        && previous.cycle >= self.portals_forgotten_before =>
                {
                    self.insert_portal(name, previous)
                }
                _ => self.remove_portal(&name),
            }
        }
    }

    /// BindComplete: the server holds the portal this Bind made.
    pub(super) fn bind_confirmed(&self, name: &str, bind: u64) {
        if let Some(p) = self.portals.get(name).filter(|p| p.bind == bind) {
            p.confirmed
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// An Execute the server skipped: if it was its portal's first, the portal has not run
    /// (its next Execute is judged against the grant's limits as a first run).
    pub(super) fn execute_skipped(portal: &Portal, first_run: bool) {
        if first_run {
            portal
                .executed
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// What a statement sent to run does to the server's portals and cursors (one
    /// namespace there), mirrored here as it is sent: the server runs statements in that
    /// order. Where the statement fails instead, the gate has forgotten a portal the server
    /// keeps: an Execute of it is masked as a portal the gate does not know (every computed
    /// column whole), never as another statement.
    ///
    /// A `CLOSE` is returned: the caller applies it when the server completes it (see
    /// [`State::cursor_closed`]).
    pub(super) fn apply_portal_effect(&mut self, effect: PortalEffect) -> Option<CursorClose> {
        match &effect {
            PortalEffect::Declare(name, ..) | PortalEffect::Close(name) => self.touch(name),
            PortalEffect::Savepoint(Savepoint::Define(_) | Savepoint::Release(_)) => {}
            _ => self.names_stamp += 1,
        }
        match effect {
            PortalEffect::Declare(name, refs, hold) => {
                if self.cursors.len() >= super::MAX_CURSORS {
                    self.bury_cursors(|_, _| true);
                }
                self.remove_portal(&name);
                self.binds += 1;
                // A cursor of the name is there already, or may be (dropped here, maybe
                // not there): the server refuses this DECLARE (42P03), unless it dropped the
                // old one in a way not seen here. Masked as either, and held as long as
                // either may be.
                let old = self
                    .cursors
                    .get(&name)
                    .map(|old| (old.refs.clone(), old.hold))
                    .or_else(|| self.cursors_gone.remove(&name).map(|g| (g.refs, g.hold)));
                let (refs, hold) = match old {
                    Some((old, old_hold)) => (union(&old, &refs), hold || old_hold),
                    None if self.cursors_gone_lost.is_some() => (ResultRefs::opaque(), true),
                    None => (refs, hold),
                };
                let (made, cycle) = (self.binds, self.cycles_sent);
                self.cursors.insert(
                    name,
                    Cursor {
                        made,
                        refs,
                        hold,
                        cycle,
                    },
                );
            }
            PortalEffect::Close(name) => {
                let seq = self.next_seq();
                self.bury_cursors_at(seq, |n, _| *n == name);
                self.remove_portal(&name);
                return Some(CursorClose {
                    name: Some(name),
                    seq,
                });
            }
            PortalEffect::CloseAll => {
                let seq = self.next_seq();
                self.bury_cursors_at(seq, |_, _| true);
                self.forget_all_portals();
                return Some(CursorClose { name: None, seq });
            }
            PortalEffect::EndAll => {
                self.bury_cursors(|_, _| true);
                self.forget_all_portals();
                self.savepoints.clear();
            }
            PortalEffect::Savepoint(Savepoint::Define(name)) => {
                // Past the bound the oldest goes: a ROLLBACK TO it then forgets everything.
                if self.savepoints.len() >= super::MAX_SAVEPOINTS {
                    self.savepoints.remove(0);
                }
                // The server may not make it (an aborted transaction, a batch that failed
                // before it): a ROLLBACK TO the name then goes to an older one of the same
                // name, so its mark is the oldest's (dropping more here only forgets).
                let mark = self
                    .savepoints
                    .iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, m)| *m)
                    .min()
                    .unwrap_or(self.binds);
                self.savepoints.push((name, mark));
            }
            PortalEffect::Savepoint(Savepoint::Release(name)) => {
                if let Some(at) = self.savepoints.iter().rposition(|(n, _)| *n == name) {
                    self.savepoints.truncate(at);
                }
            }
            PortalEffect::Savepoint(Savepoint::RollbackTo(name)) => {
                let mark = match self.savepoints.iter().rposition(|(n, _)| *n == name) {
                    Some(at) => {
                        self.savepoints.truncate(at + 1);
                        self.savepoints[at].1
                    }
                    // Not known here (the server refuses it, or the bound dropped it):
                    // whatever it drops, the gate forgets.
                    None => 0,
                };
                self.bury_cursors(|_, c| c.made > mark);
                let since: Vec<String> = self
                    .portals
                    .iter()
                    .filter(|(_, p)| p.bind > mark)
                    .map(|(n, _)| n.clone())
                    .collect();
                for name in since {
                    self.remove_portal(&name);
                }
            }
        }
        None
    }

    /// Drops the cursors `which` picks (by name and cursor), keeping what they read (see
    /// [`State::cursors_gone`]).
    pub(super) fn bury_cursors(&mut self, which: impl Fn(&String, &Cursor) -> bool) {
        let seq = self.next_seq();
        self.bury_cursors_at(seq, which);
    }

    /// [`State::bury_cursors`], at name sequence `seq`.
    fn bury_cursors_at(&mut self, seq: u64, which: impl Fn(&String, &Cursor) -> bool) {
        let names: Vec<String> = self
            .cursors
            .iter()
            .filter(|(n, c)| which(n, c))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(cursor) = self.cursors.remove(&name) else {
                continue;
            };
            if self.cursors_gone.len() >= super::MAX_CURSORS
                && !self.cursors_gone.contains_key(&name)
            {
                self.cursors_gone.clear();
                self.cursors_gone_lost = Some(seq);
            }
            let (refs, hold) = match self.cursors_gone.remove(&name) {
                Some(before) => (
                    union(&before.refs, &cursor.refs),
                    before.hold || cursor.hold,
                ),
                None => (cursor.refs, cursor.hold),
            };
            let cycle = self.cycles_sent;
            self.cursors_gone.insert(
                name,
                Gone {
                    refs,
                    seq,
                    cycle,
                    hold,
                },
            );
        }
    }

    /// The server completed `close`: what the gate dropped up to it is gone there too.
    /// Dropped after it (the CLOSE still ahead of a DECLARE and CLOSE of the name sent
    /// since), it stays.
    pub(super) fn cursor_closed(&mut self, close: CursorClose) {
        match &close.name {
            Some(name) => {
                if self
                    .cursors_gone
                    .get(name)
                    .is_some_and(|g| g.seq <= close.seq)
                {
                    self.cursors_gone.remove(name);
                }
            }
            None => {
                self.cursors_gone.retain(|_, g| g.seq > close.seq);
                if self.cursors_gone_lost.is_some_and(|at| at <= close.seq) {
                    self.cursors_gone_lost = None;
                }
            }
        }
    }

    /// The server is idle after cycle `done - 1`: the cursors not `WITH HOLD` declared or
    /// dropped in finished cycles went with their transactions.
    pub(super) fn forget_cursors_before(&mut self, done: u64) {
        self.cursors_gone.retain(|_, g| g.hold || g.cycle >= done);
        self.cursors.retain(|_, c| c.hold || c.cycle >= done);
    }

    /// What a `FETCH` of cursor `name` sent now reads, where the gate knows. Not a cursor
    /// declared in an earlier cycle the server has not finished: the gate learns only at
    /// that cycle's end whether the cursor outlives it (not `WITH HOLD`, or the cycle
    /// failing, it does not, and a function may open one of the name unseen). A FETCH in
    /// the DECLARE's own cycle runs only if the DECLARE did. Nor one declared in the cycles
    /// an error came in, until their ReadyForQuery tells whether the server rolled them
    /// back (the client may hold the Sync back: Queries the error skipped count as done
    /// before that).
    pub(super) fn cursor_refs(&self, name: &str) -> Option<&Arc<ResultRefs>> {
        self.cursors
            .get(name)
            .filter(|c| {
                (c.cycle >= self.cycles_sent || c.cycle < self.cycles_done)
                    && self.failed_from.is_none_or(|from| c.cycle < from)
            })
            .map(|c| &c.refs)
    }

    /// The server is idle after cycles `cycles` that failed: their implicit transaction
    /// was rolled back, and cursors declared in them (`WITH HOLD` too: a held cursor is kept
    /// only by a commit) are gone, or were never made (skipped, or refused: a cursor of the
    /// name was there, and still may be). Dropped, remembered as dropped.
    pub(super) fn bury_cursors_declared_in(&mut self, cycles: std::ops::Range<u64>) {
        self.bury_cursors(|_, c| cycles.contains(&c.cycle));
    }

    /// A portal the gate does not hold is run (one it forgot while the server kept it): it
    /// may declare a cursor of any name over any query, where the server holds none of the
    /// name whatever the gate believes. Every cursor the gate knows, or remembers dropped,
    /// is masked as reading anything from here, and so is a DECLARE of a name it does not
    /// know (the server refuses it where the portal took the name), until a CLOSE of the
    /// name (or CLOSE ALL) sent after this completes.
    pub(super) fn cursors_unknown(&mut self) {
        let seq = self.next_seq();
        self.names_stamp += 1;
        for c in self.cursors.values_mut() {
            c.refs = ResultRefs::opaque();
            c.hold = true;
        }
        for g in self.cursors_gone.values_mut() {
            g.refs = ResultRefs::opaque();
            g.hold = true;
            g.seq = seq;
        }
        self.cursors_gone_lost = Some(seq);
    }

    /// Portal `name` is bound to a FETCH or EXECUTE (see [`State::reading_portals`]). Past
    /// the bound every name counts as one until the transaction ends.
    pub(super) fn note_reading_portal(&mut self, name: &str) {
        if self.reading_portals.len() < super::MAX_CURSORS {
            self.reading_portals
                .insert(name.to_owned(), self.cycles_sent);
        } else {
            self.reading_portals_full = Some(self.cycles_sent);
        }
    }

    /// A FETCH or EXECUTE portal reading `targets` is bound (see [`State::reading_targets`]).
    pub(super) fn note_reading_targets(&mut self, targets: impl IntoIterator<Item = String>) {
        for name in targets {
            if self.reading_targets.len() >= super::MAX_CURSORS {
                // Past the bound every change counts.
                self.reading_targets.insert(String::new(), self.cycles_sent);
                break;
            }
            self.reading_targets.insert(name, self.cycles_sent);
        }
    }

    /// Cursor, portal or statement `name` changes: portals reading it are stale.
    pub(super) fn touch(&mut self, name: &str) {
        if !self.reading_targets.is_empty()
            && (self.reading_targets.contains_key(name)
                || self.reading_targets.len() >= super::MAX_CURSORS)
        {
            self.names_stamp += 1;
        }
    }

    /// Drops cursor `name`, if the gate holds one (see [`State::bury_cursors`]).
    pub(super) fn bury_cursor(&mut self, name: &str) {
        if self.cursors.contains_key(name) {
            self.bury_cursors(|n, _| n == name);
        }
    }

    /// Whether a SQL `FETCH` of `name` may read a portal bound to a FETCH or EXECUTE.
    pub(super) fn is_reading_portal(&self, name: &str) -> bool {
        self.reading_portals.contains_key(name)
            || (self.reading_portals_full.is_some() && !self.cursors.contains_key(name))
    }

    /// The server is idle after cycle `done - 1`: the portals noted in finished cycles went
    /// with their transactions (a later cycle's, pipelined, may be in a new one).
    pub(super) fn forget_reading_portals_before(&mut self, done: u64) {
        self.reading_portals.retain(|_, cycle| *cycle >= done);
        self.reading_targets.retain(|_, cycle| *cycle >= done);
        if self.reading_portals_full.is_some_and(|cycle| cycle < done) {
            self.reading_portals_full = None;
        }
    }

    /// A `PREPARE`, `DEALLOCATE` or `DISCARD ALL` that may change SQL-prepared statement
    /// `name` is sent and not yet completed: what an `EXECUTE` of it runs is not known yet.
    pub(super) fn sql_name_pending(&self, name: &str) -> bool {
        let touches = |effect: &SqlEffect| match effect {
            SqlEffect::Prepare(n, _) | SqlEffect::Deallocate(n) => n == name,
            SqlEffect::All(_) => true,
        };
        self.expect.iter().any(|e| match e {
            Expect::Query { effects, .. } => effects.iter().any(touches),
            Expect::Execute {
                portal, names_seq, ..
            } if *names_seq != 0 => portal.statement.as_ref().is_some_and(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .effect
                    .as_ref()
                    .is_some_and(touches)
            }),
            _ => false,
        })
    }

    /// Forgets every portal (`CLOSE ALL`).
    pub(super) fn forget_all_portals(&mut self) {
        self.portals.clear();
        self.portal_cycles.clear();
        self.portal_bytes = 0;
    }

    /// Forgets a portal (closed, or dropped by the server).
    pub(super) fn remove_portal(&mut self, name: &str) {
        if let Some(old) = self.portals.remove(name) {
            self.portal_bytes -= old.bytes;
        }
    }

    /// What the session holds on the workload's behalf awaiting the server: records in
    /// flight and the portals' recorded parameters (bounded by `MAX_RECORDS_IN_FLIGHT`).
    pub(super) fn held_bytes(&self) -> usize {
        self.records_bytes + self.portal_bytes + self.closing_bytes
    }

    /// Notes a portal bound in `cycle`. Inside a long transaction nothing is forgotten, so
    /// the entries of names bound again since (the unnamed portal, at every Bind) are
    /// dropped once they outnumber the portals: the queue stays within twice their count.
    fn note_portal(&mut self, portal: &PortalInfo, name: String) {
        self.portal_cycles
            .push_back((portal.cycle, portal.bind, name));
        if self.portal_cycles.len() > 2 * self.portals.len() + 64 {
            let portals = &self.portals;
            self.portal_cycles
                .retain(|(_, b, n)| portals.get(n).is_some_and(|p| p.bind == *b));
        }
    }

    /// Forgets the portals bound before cycle `done` (the server, idle, has dropped them),
    /// those bound again since excepted.
    pub(super) fn forget_portals_before(&mut self, done: u64) {
        self.portals_forgotten_before = done;
        while let Some((cycle, _, _)) = self.portal_cycles.front() {
            if *cycle >= done {
                break;
            }
            let Some((_, bind, name)) = self.portal_cycles.pop_front() else {
                break;
            };
            if self.portals.get(&name).is_some_and(|p| p.bind == bind) {
                self.remove_portal(&name);
            }
        }
    }
}

/// What a prepared statement of `text_len` bytes of text is counted as holding: its text
/// (or its recorded form) and what the analysis derives from it (tables, functions, output
/// references), plus the entry itself.
pub(super) const fn prepared_footprint(text_len: usize) -> usize {
    2 * text_len + 512
}

fn stmt_bytes(stmt: &Stmt) -> usize {
    stmt.lock().unwrap_or_else(PoisonError::into_inner).bytes
}

pub(super) fn stmt_seq(stmt: &Stmt) -> u64 {
    stmt.lock().unwrap_or_else(PoisonError::into_inner).seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(text_len: usize) -> Stmt {
        Arc::new(Mutex::new(StmtInfo {
            bytes: prepared_footprint(text_len),
            ..StmtInfo::default()
        }))
    }

    fn sql(text: &str) -> Statement {
        Statement {
            text: text.into(),
            ..Statement::default()
        }
    }

    /// A skipped Close leaves a phantom for what the server still holds: a SQL-`PREPARE`d
    /// statement under the name, or a statement the server made (its Parse confirmed), but
    /// not a statement whose Parse failed or was skipped (the server never made it).
    #[test]
    fn a_skipped_close_leaves_a_phantom_for_what_the_server_holds() {
        let parsed = |st: &mut State, name: &str, confirmed: bool| {
            let made = stmt(10);
            {
                let mut m = made.lock().unwrap();
                m.seq = st.next_seq();
                m.confirmed = confirmed;
            }
            st.insert_statement(name.into(), made);
        };
        // Its Parse failed or was skipped: the name is free.
        let mut st = State::default();
        parsed(&mut st, "s1", false);
        let close = st.closing("s1");
        st.close_skipped(close);
        assert!(!st.has_prepared("s1"));
        assert!(st.closing.is_empty() && st.closing_bytes == 0);
        // A statement the server made (another Parse failed): still held there.
        let mut st = State::default();
        parsed(&mut st, "s1", true);
        let close = st.closing("s1");
        st.close_skipped(close);
        assert!(st.has_prepared("s1"), "the server still holds s1");
        // A SQL-PREPAREd statement as well as one whose Parse failed: the PREPAREd one is
        // still on the server.
        let mut st = State::default();
        st.insert_sql_prepared("s1".into(), sql("select ssn from users"));
        parsed(&mut st, "s1", false);
        let close = st.closing("s1");
        st.close_skipped(close);
        assert!(
            st.has_prepared("s1"),
            "the PREPAREd statement is still there"
        );
        // Answered: gone, whatever it was.
        let mut st = State::default();
        st.insert_sql_prepared("s1".into(), sql("select 1"));
        parsed(&mut st, "s1", true);
        let close = st.closing("s1");
        st.closed(close);
        assert!(!st.has_prepared("s1"));
    }

    /// Binds the server failed or skipped give each portal name back what it held (latest
    /// first), never a portal judged by another statement than the one the server runs.
    /// A Close sent after a `DEALLOCATE` or `PREPARE` of its name that the server then
    /// completed, and skipped: the name is as the change left it (nothing held after the
    /// DEALLOCATE though the statement's Parse was confirmed; the PREPAREd statement held
    /// though the gate held nothing when the Close was sent).
    #[test]
    fn a_skipped_close_after_a_completed_name_change_sees_the_change() {
        let skipped = |st: &mut State| {
            let Some(Expect::Close(Some(close))) = st.expect.pop_front() else {
                panic!("a close");
            };
            st.close_skipped(close);
        };
        let mut st = State::default();
        let made = stmt(10);
        {
            let mut m = made.lock().unwrap();
            m.seq = st.next_seq();
            m.confirmed = true;
        }
        st.insert_statement("s1".into(), made);
        let dealloc = st.name_change();
        let close = st.closing("s1");
        st.expect.push_back(Expect::Close(Some(close)));
        st.apply_sql_effect(SqlEffect::Deallocate("s1".into()), dealloc);
        skipped(&mut st);
        assert!(!st.has_prepared("s1"), "the DEALLOCATE took it");

        let mut st = State::default();
        let prepare = st.name_change();
        let close = st.closing("s2");
        st.expect.push_back(Expect::Close(Some(close)));
        st.apply_sql_effect(
            SqlEffect::Prepare("s2".into(), Box::new(sql("select 1"))),
            prepare,
        );
        skipped(&mut st);
        assert!(st.has_prepared("s2"), "the PREPAREd statement stays");
    }

    /// Portals and cursors as the server keeps them across savepoints: a ROLLBACK TO drops
    /// those made since its savepoint (and not before), RELEASE keeps them, a savepoint the
    /// gate does not know drops everything, COMMIT ends them all.
    #[test]
    fn savepoints_drop_what_was_made_since() {
        let mut st = State::default();
        let bind = |st: &mut State, name: &str| {
            st.binds += 1;
            let p = Arc::new(PortalInfo {
                statement: None,
                formats: Vec::new(),
                params: Vec::new(),
                plan: Mutex::new(None),
                executed: std::sync::atomic::AtomicBool::new(false),
                replaced: false,
                confirmed: std::sync::atomic::AtomicBool::new(true),
                cycle: 0,
                bind: st.binds,
                bytes: 0,
                stamp: 0,
            });
            st.insert_portal(name.into(), p);
        };
        let declare = |st: &mut State, name: &str| {
            st.apply_portal_effect(PortalEffect::Declare(name.into(), Arc::default(), false));
        };
        let sp = |st: &mut State, s: Savepoint| {
            st.apply_portal_effect(PortalEffect::Savepoint(s));
        };
        let held = |st: &State| {
            let mut names: Vec<String> = st
                .portals
                .keys()
                .chain(st.cursors.keys())
                .cloned()
                .collect();
            names.sort();
            names.join(",")
        };
        bind(&mut st, "p0");
        declare(&mut st, "c0");
        sp(&mut st, Savepoint::Define("a".into()));
        bind(&mut st, "p1");
        sp(&mut st, Savepoint::Define("b".into()));
        declare(&mut st, "c1");
        sp(&mut st, Savepoint::Release("b".into()));
        assert_eq!(held(&st), "c0,c1,p0,p1");
        sp(&mut st, Savepoint::RollbackTo("a".into()));
        assert_eq!(held(&st), "c0,p0", "made since a: dropped");
        // a stays after its ROLLBACK TO: again.
        bind(&mut st, "p2");
        sp(&mut st, Savepoint::RollbackTo("a".into()));
        assert_eq!(held(&st), "c0,p0");
        // A savepoint not known here: everything goes.
        sp(&mut st, Savepoint::RollbackTo("zz".into()));
        assert_eq!(held(&st), "");
        // A second savepoint of a name the server may refuse (an aborted transaction): a
        // ROLLBACK TO the name drops what was made since the first.
        sp(&mut st, Savepoint::Define("n".into()));
        bind(&mut st, "p4");
        sp(&mut st, Savepoint::Define("n".into()));
        sp(&mut st, Savepoint::RollbackTo("n".into()));
        assert_eq!(held(&st), "", "p4 was made after the first n");
        bind(&mut st, "p3");
        sp(&mut st, Savepoint::Define("a".into()));
        st.apply_portal_effect(PortalEffect::EndAll);
        assert_eq!(held(&st), "");
        assert!(st.savepoints.is_empty());
    }

    /// Cursors the gate dropped are remembered only while the server may still hold them:
    /// a session declaring and closing cursors of new names without end (Django's
    /// `iterator()`, one `WITH HOLD` cursor each) keeps masking each by its own query, while
    /// a CLOSE the server did not complete, or a held cursor past its transaction, still
    /// masks a DECLARE of the name by both.
    #[test]
    fn dropped_cursors_are_forgotten_once_the_server_dropped_them() {
        let reads = |column: &str| {
            let mut r = ResultRefs::default();
            r.names.insert(column.into());
            Arc::new(r)
        };
        let declare = |st: &mut State, name: &str, column: &str, hold: bool| {
            assert!(
                st.apply_portal_effect(PortalEffect::Declare(name.into(), reads(column), hold))
                    .is_none()
            );
        };
        let close = |st: &mut State, name: &str| {
            st.apply_portal_effect(PortalEffect::Close(name.into()))
                .expect("a CLOSE to answer")
        };
        let live = |st: &State| {
            let mut names: Vec<String> = st.cursors.keys().cloned().collect();
            names.sort();
            names
        };
        let masked_by = |st: &State, name: &str| {
            let c = &st.cursors[name];
            let mut names: Vec<&str> = c.refs.names.iter().map(String::as_str).collect();
            if c.refs.opaque {
                names.push("<anything>");
            }
            names.join(",")
        };

        // Django: far more cursors than the bound, each closed and answered.
        let mut st = State::default();
        for i in 0..3 * super::super::MAX_CURSORS {
            let name = format!("_django_curs_{i}");
            declare(&mut st, &name, "total", true);
            assert_eq!(masked_by(&st, &name), "total", "cursor {i}");
            let c = close(&mut st, &name);
            assert_eq!(c.tag(), "CLOSE CURSOR");
            st.cursor_closed(c);
        }
        assert!(st.cursors_gone.is_empty());
        assert!(st.cursors_gone_lost.is_none());

        // A CLOSE never answered (skipped after an error): the name stays taken.
        let mut st = State::default();
        declare(&mut st, "c", "email", true);
        let _skipped = close(&mut st, "c");
        declare(&mut st, "c", "total", false);
        assert_eq!(masked_by(&st, "c"), "email,total");
        assert!(st.cursors["c"].hold, "held as long as the old one may be");

        // Pipelined: CLOSE c, DECLARE c, CLOSE c, the second unanswered. The first CLOSE's
        // answer ends the first cursor only; the second may still be there.
        let mut st = State::default();
        declare(&mut st, "c", "email", true);
        let first = close(&mut st, "c");
        declare(&mut st, "c", "phone", true);
        let _second = close(&mut st, "c");
        st.cursor_closed(first);
        declare(&mut st, "c", "total", false);
        assert_eq!(masked_by(&st, "c"), "email,phone,total");

        // A CLOSE sent after a cursor was dropped some other way (a COMMIT that did not end a
        // held one the gate thought was not) ends it when answered.
        let mut st = State::default();
        declare(&mut st, "c", "email", false);
        st.apply_portal_effect(PortalEffect::Savepoint(Savepoint::RollbackTo("x".into())));
        assert!(st.cursors_gone.contains_key("c"));
        let c = close(&mut st, "c");
        st.cursor_closed(c);
        assert!(st.cursors_gone.is_empty());

        // COMMIT drops them all; those not held are over once the server is idle after the
        // cycle that dropped them, and not before; held ones stay remembered (the server
        // keeps them past a commit) until their CLOSE completes.
        let mut st = State::default();
        declare(&mut st, "held", "email", true);
        declare(&mut st, "plain", "phone", false);
        st.cycles_sent = 4;
        st.apply_portal_effect(PortalEffect::EndAll);
        assert!(st.cursors.is_empty());
        st.forget_cursors_before(4);
        assert!(st.cursors_gone.contains_key("plain"), "its cycle not done");
        st.forget_cursors_before(5);
        assert_eq!(st.cursors_gone.keys().collect::<Vec<_>>(), ["held"]);
        let c = close(&mut st, "held");
        st.cursor_closed(c);
        assert!(st.cursors_gone.is_empty());
        // Cursors not held, declared in finished cycles, went with their (implicit)
        // transactions once the server is idle; held ones and later cycles' stay.
        declare(&mut st, "plain", "phone", false);
        declare(&mut st, "held", "email", true);
        st.cycles_sent = 5;
        declare(&mut st, "later", "phone", false);
        st.forget_cursors_before(5);
        assert_eq!(live(&st), ["held", "later"]);

        // A string that failed with the server idle after it rolled back what it declared,
        // held or not: those cursors are dropped (remembered: a refused DECLARE may have
        // been the failure, the old cursor still there).
        let mut st = State {
            cycles_sent: 2,
            ..State::default()
        };
        declare(&mut st, "before", "phone", true);
        st.cycles_sent = 3;
        declare(&mut st, "held", "email", true);
        st.cycles_sent = 4;
        declare(&mut st, "later", "email", true);
        st.bury_cursors_declared_in(3..4);
        assert_eq!(live(&st), ["before", "later"]);
        assert!(st.cursors_gone["held"].hold);

        // A FETCH sent in a later cycle than its cursor's DECLARE, before the server
        // finished that cycle, does not trust the DECLARE (it may not outlive its cycle);
        // in the same cycle, or once that cycle is done, it does.
        let mut st = State {
            cycles_sent: 7,
            cycles_done: 7,
            ..State::default()
        };
        declare(&mut st, "c", "phone", false);
        assert!(st.cursor_refs("c").is_some(), "the same cycle");
        st.cycles_sent = 8;
        assert!(st.cursor_refs("c").is_none(), "its cycle unanswered");
        st.cycles_done = 8;
        assert!(st.cursor_refs("c").is_some(), "its cycle done");
        // An error in its cycle, the ReadyForQuery not in yet (skipped Queries counted).
        st.failed_from = Some(7);
        assert!(st.cursor_refs("c").is_none(), "its cycle failed");
        st.failed_from = Some(8);
        assert!(st.cursor_refs("c").is_some(), "a later cycle failed");

        // A portal the gate does not hold is run: it may have declared any name over
        // anything, where the server held none. Known, dropped and new names are masked as
        // reading anything until a CLOSE ALL sent after it completes.
        let mut st = State::default();
        declare(&mut st, "known", "phone", false);
        declare(&mut st, "dropped", "phone", true);
        let early_close = close(&mut st, "dropped");
        st.cursors_unknown();
        assert_eq!(masked_by(&st, "known"), "<anything>");
        st.cursor_closed(early_close);
        declare(&mut st, "dropped", "phone", false);
        assert_eq!(
            masked_by(&st, "dropped"),
            "<anything>",
            "closed before the run"
        );
        declare(&mut st, "fresh", "phone", false);
        assert_eq!(masked_by(&st, "fresh"), "<anything>");
        st.forget_cursors_before(u64::MAX);
        let all = st.apply_portal_effect(PortalEffect::CloseAll).unwrap();
        st.cursor_closed(all);
        declare(&mut st, "fresh", "phone", false);
        assert_eq!(masked_by(&st, "fresh"), "phone");

        // Past the bound of dropped cursors never answered, a DECLARE of an unknown name is
        // masked as reading anything, until a CLOSE ALL sent after is answered.
        let mut st = State::default();
        for i in 0..=super::super::MAX_CURSORS {
            let name = format!("c{i}");
            declare(&mut st, &name, "email", true);
            let _skipped = close(&mut st, &name);
        }
        assert!(st.cursors_gone_lost.is_some());
        declare(&mut st, "new", "total", false);
        assert_eq!(masked_by(&st, "new"), "<anything>");
        let all = st
            .apply_portal_effect(PortalEffect::CloseAll)
            .expect("a CLOSE ALL to answer");
        assert_eq!(all.tag(), "CLOSE CURSOR ALL");
        declare(&mut st, "late", "phone", true);
        let _skipped = close(&mut st, "late");
        st.cursor_closed(all);
        assert!(st.cursors_gone_lost.is_none());
        assert_eq!(
            st.cursors_gone.keys().collect::<Vec<_>>(),
            ["late"],
            "dropped after the CLOSE ALL: kept"
        );
        declare(&mut st, "new", "total", false);
        assert_eq!(masked_by(&st, "new"), "total");
    }

    #[test]
    fn undone_binds_give_portals_back() {
        let portal = |bind: u64, text: &str| -> Portal {
            let made = stmt(10);
            made.lock().unwrap().recorded = text.into();
            Arc::new(PortalInfo {
                statement: Some(made),
                formats: Vec::new(),
                params: Vec::new(),
                plan: Mutex::new(None),
                executed: std::sync::atomic::AtomicBool::new(true),
                replaced: false,
                confirmed: std::sync::atomic::AtomicBool::new(true),
                cycle: 0,
                bind,
                bytes: 0,
                stamp: 0,
            })
        };
        let text = |st: &State, name: &str| {
            st.portals.get(name).map(|p| {
                p.statement
                    .as_ref()
                    .unwrap()
                    .lock()
                    .unwrap()
                    .recorded
                    .clone()
            })
        };
        // p1 ran A; Binds of p1 to B then C, both skipped: A again, whatever the order.
        let mut st = State::default();
        let a = portal(1, "A");
        st.insert_portal("p1".into(), a.clone());
        st.insert_portal("p1".into(), portal(2, "B"));
        st.insert_portal("p1".into(), portal(3, "C"));
        st.binds_undone(vec![
            ("p1".into(), 2, Some(a.clone()), false),
            ("p1".into(), 3, Some(portal(2, "B")), false),
        ]);
        assert_eq!(text(&st, "p1").as_deref(), Some("A"));
        // The Bind to B failed itself (42P03: p1 exists): A stays on the server, and here.
        let mut st = State::default();
        st.insert_portal("p1".into(), a.clone());
        st.insert_portal("p1".into(), portal(2, "B"));
        st.binds_undone(vec![("p1".into(), 2, Some(a.clone()), true)]);
        assert_eq!(text(&st, "p1").as_deref(), Some("A"));
        // A failed Bind of the unnamed portal may have dropped the one before: forgotten.
        let mut st = State::default();
        st.insert_portal(String::new(), a.clone());
        st.insert_portal(String::new(), portal(2, "B"));
        st.binds_undone(vec![(String::new(), 2, Some(a.clone()), true)]);
        assert!(!st.portals.contains_key(""));
        // Skipped, it did not: the one before is back.
        st.insert_portal(String::new(), portal(3, "C"));
        st.binds_undone(vec![(String::new(), 3, Some(a.clone()), false)]);
        assert_eq!(text(&st, "").as_deref(), Some("A"));
        // A portal bound since by an answered Bind stays; a new name goes.
        st.insert_portal("p2".into(), portal(4, "D"));
        st.insert_portal("p1".into(), portal(5, "E"));
        st.binds_undone(vec![
            ("p1".into(), 3, Some(a.clone()), false),
            ("p2".into(), 4, None, false),
        ]);
        assert_eq!(text(&st, "p1").as_deref(), Some("E"));
        assert!(!st.portals.contains_key("p2"));
        assert_eq!(st.portal_bytes, 0);
        // A skipped first Execute leaves its portal unrun.
        State::execute_skipped(&a, true);
        assert!(!a.executed.load(std::sync::atomic::Ordering::Relaxed));
    }

    /// A long statement's text is recorded whole once; later runs point at that record.
    #[test]
    fn a_long_statement_is_recorded_whole_once() {
        let long = format!("SELECT 'é{}'", "x".repeat(2000));
        let mut s = StmtInfo {
            recorded: long.clone(),
            ..StmtInfo::default()
        };
        assert_eq!(s.recorded_for_run(), long, "the first run has it whole");
        s.recorded_in = Some(7);
        let again = s.recorded_for_run();
        assert!(again.len() < 200, "{again}");
        assert!(again.starts_with("SELECT 'é"), "{again}");
        assert!(again.contains("whole in #7"), "{again}");
        assert!(again.contains(&format!("{} bytes", long.len())), "{again}");
        let short = StmtInfo {
            recorded: "SELECT 1".into(),
            recorded_in: Some(3),
            ..StmtInfo::default()
        };
        assert_eq!(
            short.recorded_for_run(),
            "SELECT 1",
            "short texts stay whole"
        );
    }

    /// The bytes counted for prepared statements follow every way one comes and goes:
    /// replaced (the unnamed one at each Parse), closed, deallocated, all at once.
    #[test]
    fn prepared_bytes_follow_every_statement_in_and_out() {
        let mut st = State::default();
        let recount = |st: &State| -> usize {
            st.statements.values().map(stmt_bytes).sum::<usize>()
                + st.sql_prepared
                    .values()
                    .map(|s| prepared_footprint(s.text.len()))
                    .sum::<usize>()
        };
        for i in 0..50 {
            st.insert_statement(String::new(), stmt(i));
            st.insert_statement(format!("s{i}"), stmt(100 + i));
            st.insert_sql_prepared(format!("p{i}"), sql(&"x".repeat(i)));
            assert_eq!(st.prepared_bytes, recount(&st));
        }
        st.insert_sql_prepared("p3".into(), sql("replaced"));
        st.forget_prepared("s7");
        st.forget_prepared("p9");
        st.forget_prepared("nothing");
        assert_eq!(st.prepared_bytes, recount(&st));
        assert_eq!(st.over_prepared(1, 0), None);
        assert!(st.over_prepared(super::super::MAX_PREPARED, 0).is_some());
        assert!(
            st.over_prepared(1, super::super::MAX_PREPARED_BYTES)
                .is_some()
        );
        st.apply_sql_effect(SqlEffect::All(false), u64::MAX);
        assert_eq!(st.statements.len(), 1, "the unnamed statement stays");
        assert_eq!(st.prepared_bytes, recount(&st));
        assert_eq!(st.prepared_bytes, prepared_footprint(49));
    }

    fn bind(st: &mut State, name: &str) {
        st.binds += 1;
        let portal = Arc::new(PortalInfo {
            statement: None,
            formats: Vec::new(),
            params: Vec::new(),
            plan: Mutex::new(None),
            executed: std::sync::atomic::AtomicBool::new(false),
            replaced: false,
            confirmed: std::sync::atomic::AtomicBool::new(true),
            cycle: st.cycles_sent,
            bind: st.binds,
            bytes: 100,
            stamp: 0,
        });
        st.insert_portal(name.to_owned(), portal);
    }

    /// The server drops its portals when idle; so does the gate, those of finished cycles
    /// only (a pipeline's later Binds stay), a name bound again in a later cycle kept.
    #[test]
    fn portals_go_with_the_cycles_that_bound_them() {
        let mut st = State::default();
        for i in 0..10_000 {
            bind(&mut st, &format!("p{i}"));
            st.cycles_sent += 1;
        }
        bind(&mut st, "again");
        st.cycles_sent += 1;
        bind(&mut st, "again");
        bind(&mut st, "later");
        // The server answered the first 10,001 cycles and is idle.
        st.forget_portals_before(10_001);
        let mut left: Vec<&str> = st.portals.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["again", "later"]);
        assert_eq!(st.portal_cycles.len(), 2);
        st.forget_portals_before(10_002);
        assert!(st.portals.is_empty() && st.portal_cycles.is_empty());
        // Inside a transaction (never idle), and within one cycle (a pipeline before its
        // Sync), the unnamed portal bound over and over keeps one entry, not one per Bind.
        for _ in 0..100_000 {
            bind(&mut st, "");
        }
        assert_eq!(st.portals.len(), 1);
        assert!(
            st.portal_cycles.len() <= 2 + 64,
            "{}",
            st.portal_cycles.len()
        );
        assert_eq!(st.portal_bytes, 100, "the portals' bytes follow them");
    }
}
