//! The two pumps' shared half: the session's fixed parts, statement analysis and judgement,
//! COPY plans, approval holds, and cancelling the statement in flight.

use std::collections::BTreeSet;

/// Most functions whose bodies call others followed from one statement's calls (see
/// [`Pump::closing_functions`]); built-ins and names that are no function do not count, up
/// to [`MAX_NAMES_LOOKED_UP`] in all.
const MAX_CALLS_FOLLOWED: usize = 256;
const MAX_NAMES_LOOKED_UP: usize = 4096;

use super::*;

pub(super) struct Pump<'a> {
    pub(super) ctx: &'a Services,
    pub(super) shared: &'a Postgres,
    pub(super) pg: &'a PostgresResource,
    pub(super) who: &'a Attribution,
    pub(super) uid: u32,
    pub(super) resource: &'a str,
    pub(super) session: String,
    pub(super) access: Access,
    /// The grant's id, for its statement rate.
    pub(super) grant: String,
    /// The grant's blast-radius limits (see [`super::budget`]).
    pub(super) limits: crate::config::GrantLimits,
    pub(super) masker: Option<Masker>,
    pub(super) recorder: Masker,
    pub(super) catalog: tokio::sync::Mutex<Catalog>,
    /// Where this session's server is, for a CancelRequest of our own.
    pub(super) login: Arc<Login>,
    /// The server's (process id, secret) for this session.
    pub(super) server_key: (i32, i32),
    pub(super) state: Mutex<State>,
    pub(super) stop: CancellationToken,
    pub(super) counters: Arc<Counters>,
    /// Signalled when a finished statement record starts waiting for the store.
    pub(super) records_due: tokio::sync::Notify,
}

/// The error a held statement gets when it was not approved.
pub(super) fn held_error(
    rule: &str,
    status: RequestStatus,
    by: Option<&str>,
    waited: Duration,
) -> PgError {
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

/// Which of `called` close a cursor by name themselves or through a function they reach
/// by calls, given each looked-up function's (closes, calls).
fn reaching_closers(
    called: &BTreeSet<&str>,
    calls_of: &std::collections::BTreeMap<String, Arc<(bool, BTreeSet<String>)>>,
) -> BTreeSet<String> {
    let mut closing = BTreeSet::new();
    for &root in called {
        let mut stack = vec![root];
        let mut visited = BTreeSet::from([root]);
        while let Some(name) = stack.pop() {
            let Some(facts) = calls_of.get(name) else {
                continue;
            };
            if facts.0 {
                closing.insert(root.to_owned());
                break;
            }
            stack.extend(
                facts
                    .1
                    .iter()
                    .map(String::as_str)
                    .filter(|c| visited.insert(c)),
            );
        }
    }
    closing
}

impl Pump<'_> {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn analyze(&self, text: &str) -> Result<Arc<Analysis>, Unparsed> {
        let mode = self.lock().parse_mode;
        self.shared.analyze(text, mode)
    }

    /// Refuses a statement that would prepare more named statements than the session may
    /// hold (`MAX_PREPARED`, `MAX_PREPARED_BYTES`): a Parse under `parse`'s name, or SQL
    /// `PREPARE`s in `analysis`.
    fn over_prepared(
        &self,
        text: &str,
        parse: Option<&str>,
        analysis: &Analysis,
    ) -> Option<Verdict> {
        let mut adding = 0;
        let mut bytes = 0;
        if parse.is_some_and(|name| !name.is_empty()) {
            adding += 1;
            bytes += prepared_footprint(text.len()) + text.len().min(MAX_RECORDED_TEXT);
        }
        for s in analysis.iter().filter(|s| s.prepares.is_some()) {
            adding += 1;
            bytes += prepared_footprint(s.text.len());
        }
        if adding == 0 {
            return None;
        }
        let (held, held_bytes) = self.lock().over_prepared(adding, bytes)?;
        if held + adding > MAX_PREPARED {
            self.limit_reached("prepared_statements", MAX_PREPARED as u64);
        } else {
            self.limit_reached("prepared_statement_bytes", MAX_PREPARED_BYTES as u64);
        }
        Some(Verdict::Deny {
            rule: "limit: prepared statements".into(),
            error: PgError::error(
                "54000",
                format!(
                    "jitgate: this session holds {held} prepared statements ({}); a session may hold at most {MAX_PREPARED} taking {} together: this one was not prepared",
                    crate::model::human_bytes(held_bytes as u64),
                    crate::model::human_bytes(MAX_PREPARED_BYTES as u64),
                ),
            )
            .hint("DEALLOCATE (or Close) prepared statements no longer used; the session stays open"),
        })
    }

    /// The refusal of a statement the grant's limits do not allow now: the session's result
    /// budget is spent, or (when `runs`) the grant or its identity is over its statements
    /// per second. A Parse takes from the rate for its statement's first run; each later
    /// run (a portal's first Execute) takes again.
    pub(super) fn over_limits(&self, runs: bool) -> Option<Verdict> {
        let limits = &self.limits;
        let spent = self.lock().budget.spent(limits);
        if let Some(passed) = spent {
            self.limit_reached(passed.key, passed.limit);
            return Some(Verdict::Deny {
                rule: format!("limit: {}", passed.key),
                error: passed.error(self.resource),
            });
        }
        if !runs {
            return None;
        }
        let rates = &self.ctx.rates;
        // Each bucket's key is built only when its limit is set (most grants set neither,
        // and this runs for every statement).
        let over = [
            (
                "statements_per_second",
                limits.statements_per_second,
                "grant:",
                self.grant.as_str(),
                "this grant",
            ),
            (
                "identity_statements_per_second",
                limits.identity_statements_per_second,
                "identity:",
                self.who.identity.as_str(),
                "this identity",
            ),
        ]
        .into_iter()
        .find_map(|(key, limit, kind, id, whose)| {
            let limit = limit?;
            (!rates.take(&format!("{kind}{id}"), limit)).then_some((key, limit, whose))
        })?;
        let (key, limit, whose) = over;
        self.limit_reached(key, u64::from(limit));
        Some(Verdict::Deny {
            rule: format!("limit: {key}"),
            error: PgError::error(
                "53400",
                format!(
                    "jitgate: statement rate limit reached on {}: {whose} may run {limit} statements per second; this one was not run",
                    self.resource
                ),
            )
            .hint(format!(
                "slow down and retry; the session stays open (policy.limits.{key})"
            )),
        })
    }

    /// Logs and audits a limit reached, once per session and limit (a client retrying in a
    /// loop writes one record, not one per attempt).
    pub(super) fn limit_reached(&self, key: &'static str, limit: u64) {
        if !self.lock().budget.first_time(key) {
            return;
        }
        warn!(
            identity = %self.who.identity,
            resource = %self.resource,
            session = %self.session,
            limit = key,
            value = limit,
            "blast-radius limit reached"
        );
        self.ctx.store.submit_audit(
            "jitgated".into(),
            crate::store::audit::Event::LimitReached(crate::store::audit::LimitReached {
                session: self.session.clone(),
                identity: self.who.identity.clone(),
                resource: self.resource.to_owned(),
                grant: self.grant.clone(),
                limit: key.to_owned(),
                value: limit,
            }),
        );
    }

    /// The functions of `analysis` that may act beyond a read-only transaction, for a read
    /// session (empty for others): from the shared cache, else from the catalog. A catalog
    /// that cannot answer refuses the statement.
    pub(super) async fn acting_functions(
        &self,
        analysis: &[Statement],
    ) -> Result<BTreeSet<String>, PgError> {
        if self.access != Access::Read {
            return Ok(BTreeSet::new());
        }
        let functions: BTreeSet<String> = analysis
            .iter()
            .flat_map(|s| s.functions.iter().cloned())
            .collect();
        if functions.is_empty() {
            return Ok(BTreeSet::new());
        }
        let database = self
            .login
            .params
            .iter()
            .find_map(|(k, v)| (k == "database").then_some(v.as_str()))
            .unwrap_or_default();
        let effects = &self.shared.effects;
        let mut known = effects.known(self.resource, database, &functions);
        if !known.unknown.is_empty() {
            let rows = self
                .catalog
                .lock()
                .await
                .function_effects(&known.unknown)
                .await
                .map_err(|_| {
                    PgError::error(
                        "25006",
                        format!(
                            "jitgate: cannot look up what {}() do on a read session (the catalog lookup failed), so the statement was not run",
                            known.unknown.join("(), ")
                        ),
                    )
                    .hint("try again; if it persists, the jitgate operator should check the agent's log")
                })?;
            known
                .acting
                .extend(effects.learn(self.resource, database, &known.unknown, &rows));
        }
        Ok(known.acting)
    }

    /// The functions of `analysis` whose stored bodies, or the bodies of functions they call,
    /// close a cursor by name (see [`crate::postgres::sql::body_closes_cursors`]), for a
    /// session under masking (empty for others). A catalog that cannot answer, or a chain of
    /// calls too long to follow, refuses the statement.
    pub(super) async fn closing_functions(
        &self,
        analysis: &[Statement],
    ) -> Result<BTreeSet<String>, PgError> {
        if !self.masker.as_ref().is_some_and(Masker::has_column_rules) {
            return Ok(BTreeSet::new());
        }
        // Functions called, and operators used (each a name whose calls are the functions
        // behind it, when not built in).
        let called: BTreeSet<&str> = analysis
            .iter()
            .flat_map(|s| s.functions.iter().chain(&s.operators))
            .map(String::as_str)
            .filter(|f| !f.contains('.') || f.chars().all(|c| !c.is_alphanumeric()))
            .collect();
        if called.is_empty() {
            return Ok(BTreeSet::new());
        }
        let operators: BTreeSet<String> = analysis
            .iter()
            .flat_map(|s| s.operators.iter().cloned())
            .collect();
        let failed = |why: &str| {
            PgError::error(
                "58000",
                format!(
                    "jitgate: cannot tell whether {}() close cursors ({why}), which masking needs to know; the statement was not run",
                    called.iter().copied().collect::<Vec<_>>().join("(), ")
                ),
            )
            .hint("try again; if it persists, the jitgate operator should check the agent's log")
        };
        let mode = self.lock().parse_mode;
        let mut catalog = self.catalog.lock().await;
        // Each called function's bodies, then the bodies of what they call, level by level
        // (one lookup per level for the names not cached), each name once; then each called
        // function closes if a function it reaches does.
        let mut calls_of: std::collections::BTreeMap<String, Arc<(bool, BTreeSet<String>)>> =
            std::collections::BTreeMap::new();
        let mut seen: BTreeSet<String> = called.iter().map(|f| (*f).to_owned()).collect();
        // Operators (the statement's, and those bodies use, keyed apart from functions)
        // stand for the functions behind them; one behind which a built-in reads what it is
        // given or sends a value around results counts as closing (it cannot be followed).
        let roots: BTreeSet<String> = called
            .iter()
            .map(|f| {
                if operators.contains(*f) {
                    crate::postgres::sql::operator_key(f)
                } else {
                    (*f).to_owned()
                }
            })
            .collect();
        let mut level: Vec<String> = roots.iter().cloned().collect();
        while !level.is_empty() {
            let callers = calls_of.values().filter(|f| !f.1.is_empty()).count();
            if callers > MAX_CALLS_FOLLOWED || seen.len() > MAX_NAMES_LOOKED_UP {
                return Err(failed("too many functions call one another"));
            }
            // One lookup per level for the functions' bodies and one for the operators'
            // functions not cached yet; each name below then reads the caches.
            let (ops, names): (Vec<&str>, Vec<&str>) = level
                .iter()
                .map(String::as_str)
                .partition(|n| crate::postgres::sql::operator_of_key(n).is_some());
            catalog
                .prefetch_bodies(&names)
                .await
                .map_err(|_| failed("the catalog lookup failed"))?;
            let ops: BTreeSet<String> = ops
                .iter()
                .filter_map(|k| crate::postgres::sql::operator_of_key(k))
                .map(str::to_owned)
                .collect();
            if !ops.is_empty() {
                catalog
                    .operator_functions(&ops)
                    .await
                    .map_err(|_| failed("the catalog lookup failed"))?;
            }
            let mut next = Vec::new();
            for name in level {
                if let Some(op) = crate::postgres::sql::operator_of_key(&name) {
                    let behind = catalog
                        .operator_functions(&BTreeSet::from([op.to_owned()]))
                        .await
                        .map_err(|_| failed("the catalog lookup failed"))?;
                    let dangerous = behind
                        .iter()
                        .any(|f| crate::postgres::sql::reads_or_sends_around_results(f));
                    next.extend(behind.iter().filter(|f| seen.insert((*f).clone())).cloned());
                    calls_of.insert(name, Arc::new((dangerous, behind)));
                    continue;
                }
                let read = |language: &str, body: &str| {
                    crate::postgres::sql::body_closes_cursors(language, body, mode)
                };
                let facts = catalog
                    .function_closes(&name, read)
                    .await
                    .map_err(|_| failed("the catalog lookup failed"))?;
                next.extend(
                    facts
                        .1
                        .iter()
                        .filter(|c| seen.insert((*c).clone()))
                        .cloned(),
                );
                calls_of.insert(name, facts);
            }
            level = next;
        }
        // Operators are judged by their own names (see guard.rs).
        let roots: BTreeSet<&str> = roots.iter().map(String::as_str).collect();
        let closing = reaching_closers(&roots, &calls_of)
            .into_iter()
            .map(|k| match crate::postgres::sql::operator_of_key(&k) {
                Some(op) => op.to_owned(),
                None => k,
            })
            .collect();
        Ok(closing)
    }

    pub(super) fn judge(
        &self,
        analysis: &[Statement],
        acting: &BTreeSet<String>,
        closing: &BTreeSet<String>,
    ) -> Verdict {
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
            acting,
            closing,
        };
        guard::judge(&ctx, analysis)
    }

    /// A statement's text with sensitive values redacted, whole.
    pub(super) fn redacted_text(&self, text: &str) -> String {
        match self.recorder.scan(text, &mut |_| {}) {
            crate::inspect::mask::Outcome::Replace(s) => s.into_owned(),
            _ => text.to_owned(),
        }
    }

    /// Plans the masking of each `COPY ... TO` in a query string, in order, looking names up
    /// when needed. A COPY whose columns cannot be known is refused (fail closed).
    pub(super) async fn copy_plans(
        &self,
        analysis: &[Statement],
    ) -> Result<VecDeque<CopyPlan>, PgError> {
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
    pub(super) async fn hold(
        &self,
        text: &str,
        rule: &str,
        reason: &str,
        rec: u32,
    ) -> Result<String, PgError> {
        let what = Hold {
            text,
            rule,
            reason,
            timeout: self.pg.approval_timeout,
        };
        let held = hold::hold(
            self.ctx,
            self.who,
            self.uid,
            self.resource,
            self.access,
            &self.session,
            what,
            &self.stop,
        )
        .await;
        let held_ms = held.waited.as_millis() as u64;
        match held.outcome {
            HoldOutcome::NotFiled(e) => Err(PgError::error(
                "42501",
                format!(
                    "jitgate: statement held by guardrail \"{rule}\" but cannot be approved: {e}"
                ),
            )),
            HoldOutcome::SessionEnded => Err(PgError::fatal(
                "57P01",
                "jitgate: session ended while a statement waited for approval",
            )),
            HoldOutcome::Approved { by } => {
                self.update_record(rec, |r| {
                    r.held_ms = held_ms;
                    r.decision = Decision::Approved;
                    r.approved_by = Some(by.clone());
                });
                Ok(by)
            }
            HoldOutcome::NotApproved { status, by } => {
                self.update_record(rec, |r| r.held_ms = held_ms);
                Err(held_error(
                    rule,
                    status,
                    by.as_deref(),
                    self.pg.approval_timeout,
                ))
            }
            HoldOutcome::Failed(e) => {
                self.update_record(rec, |r| r.held_ms = held_ms);
                Err(PgError::error(
                    "42501",
                    format!("jitgate: approval failed: {e}"),
                ))
            }
        }
    }

    /// Judges a statement string; returns the poison error when refused.
    /// `runs`: whether it takes from the statement rate (a Query and a Parse do; see
    /// [`Pump::over_limits`]).
    /// `parse` names the statement a Parse prepares (empty: the unnamed one).
    pub(super) async fn decide(
        &self,
        text: &str,
        rec_kind: &str,
        runs: bool,
        parse: Option<&str>,
    ) -> (Result<Arc<Analysis>, PgError>, u32) {
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
                return (Err(unparsed_error(&e)), rec);
            }
        };
        if analysis.iter().any(|s| s.sets_search_path) {
            self.lock().search_path_changed = true;
        }
        // Definitions change what the catalog lookups cached (before the statement is
        // judged: a refused one only costs lookups again).
        if self.masker.is_some()
            && analysis.iter().any(|s| {
                s.defines_function.is_some()
                    || ["create", "alter", "drop"]
                        .iter()
                        .any(|k| s.kinds.contains(k))
            })
        {
            let mut catalog = self.catalog.lock().await;
            for s in analysis.iter() {
                let defined = s.defines_function.as_deref().map(|name| {
                    let refs = if s
                        .hazards
                        .iter()
                        .any(|h| matches!(h, crate::postgres::sql::Hazard::OpaqueBody(_)))
                    {
                        crate::postgres::sql::ResultRefs::opaque()
                    } else {
                        let mut refs = crate::postgres::sql::ResultRefs::default();
                        refs.add(s);
                        Arc::new(refs)
                    };
                    (name, refs)
                });
                catalog.functions_changed(defined.as_ref().map(|(n, r)| (*n, &**r)));
            }
        }
        let verdict = match self
            .over_limits(runs)
            .or_else(|| self.over_prepared(text, parse, &analysis))
        {
            Some(denied) => denied,
            None => match self.acting_functions(&analysis).await {
                Ok(acting) => match self.closing_functions(&analysis).await {
                    Ok(closing) => self.judge(&analysis, &acting, &closing),
                    Err(error) => Verdict::Deny {
                        rule: "masking: function lookup failed".into(),
                        error,
                    },
                },
                Err(error) => Verdict::Deny {
                    rule: "read-only session: function lookup failed".into(),
                    error,
                },
            },
        };
        match verdict {
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

    /// Cancels the statement the server is running for this session, if any, before the
    /// session is ended under it: closing the connection alone lets it run on (a long UPDATE
    /// would still commit after its grant ended).
    ///
    /// One CancelRequest ends the statement running; statements a client pipelined behind it
    /// may still be read by the server from its socket buffer after the connection closes.
    /// Returns whether a cancel went out.
    pub(super) async fn cancel_in_flight(&self) -> bool {
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
}

/// The answer to a statement the gate cannot analyse. A syntax error gets exactly what the
/// server would have said (PostgreSQL's own parser found it: same message, SQLSTATE and
/// position, so psql prints the same LINE and caret); anything else says it was the gate.
/// Either way the statement was not sent.
fn unparsed_error(e: &Unparsed) -> PgError {
    match (e.position, e.message.strip_prefix("Invalid statement: ")) {
        (Some(position), Some(message)) => {
            PgError::error("42601", message).position(Some(position))
        }
        _ => PgError::error(
            "42601",
            format!(
                "jitgate: the statement could not be analysed, so it was not sent: {}",
                e.message
            ),
        )
        .position(e.position)
        .hint("jitgate checks every statement with PostgreSQL's own parser before it runs"),
    }
}

#[cfg(test)]
mod closers_tests {
    use super::*;

    /// A closer reached through a diamond, a longer path and a cycle marks every caller;
    /// functions that reach none stay unmarked.
    #[test]
    fn every_caller_that_reaches_a_closer_is_marked() {
        let facts = |closes: bool, calls: &[&str]| {
            Arc::new((closes, calls.iter().map(|c| (*c).to_owned()).collect()))
        };
        let calls_of: std::collections::BTreeMap<String, _> = [
            ("a", facts(false, &["c"])),
            ("b", facts(false, &["d"])),
            ("d", facts(false, &["c", "b"])),
            ("c", facts(true, &[])),
            ("e", facts(false, &["f", "e"])),
            ("f", facts(false, &[])),
            ("upper", facts(false, &[])),
        ]
        .into_iter()
        .map(|(n, f)| (n.to_owned(), f))
        .collect();
        let called: BTreeSet<&str> = ["a", "b", "e", "upper", "nosuch"].into();
        let closing = reaching_closers(&called, &calls_of);
        assert_eq!(closing, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        let called: BTreeSet<&str> = ["c"].into();
        assert_eq!(reaching_closers(&called, &calls_of).len(), 1);
    }
}
