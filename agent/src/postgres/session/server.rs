//! Server to client: results masked by plan, errors and notices withheld or masked, the
//! expectation queue kept in step, and the session ended when its grant ends.

use super::*;

/// Buffered frames taken between two looks at the session's end signals (see
/// `server_to_client`).
const QUIET_RUN: u32 = 32;

/// Output held before it is written to the client, even while more of a result is buffered.
const FLUSH_AT: usize = 64 * 1024;

/// A row that passed a result limit, for [`Pump::cut_result`].
type Cut = (super::budget::Passed, Option<u32>);

/// How the rows of the current result are masked: its plan, and the key of its statement's
/// record (for the masked count), when it has one.
type RowPlan = (Arc<Plan>, Option<u32>);

/// The plan and record of the result whose rows arrive now.
fn row_plan(st: &State) -> Result<RowPlan, PgError> {
    let (plan, rec) = match st.expect.front() {
        Some(Expect::Execute {
            portal,
            masked_as,
            rec,
            ..
        }) => (masked_as.as_ref().unwrap_or(portal).plan(), Some(*rec)),
        Some(Expect::Query { rec, .. }) => (st.current.clone(), Some(*rec)),
        _ => (st.current.clone(), None),
    };
    let Some(plan) = plan else {
        return Err(PgError::fatal(
            "XX000",
            "jitgate: a result arrived whose columns are unknown, so it cannot be masked; ending the session",
        ));
    };
    Ok((plan, rec))
}

/// Adds `masked` values to the record of the statement whose rows `plan` masked.
fn count_masked(st: &mut State, plan: Option<&RowPlan>, masked: u64) {
    if masked > 0
        && let Some((_, Some(rec))) = plan
        && let Some(r) = st.records.get_mut(rec)
    {
        r.record.masked += masked;
    }
}

impl Pump<'_> {
    /// Server to client. Returns the outcome when the server side ends the session.
    pub(super) async fn server_to_client(
        &self,
        mut server: FrameReader<ReadHalf<Stream>>,
        mut client: WriteHalf<Stream>,
        mut inject: mpsc::Receiver<PgError>,
        (mut end, mut ended): (SessionEnd, Armed<EndWait>),
    ) -> Option<Outcome> {
        let mut out = BytesMut::with_capacity(16 * 1024);
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
        // The waits on the session's end and the client side's end are armed once, kept
        // across wake-ups and polled only when they fire (see [`Armed`]): built anew per
        // wake-up, each registered and removed a waiter under a lock per message. A finished
        // record's wait is re-armed after it fires.
        let mut stopped = Armed::new(self.stop.cancelled());
        let mut client_gone = false;
        let due = self.records_due.notified();
        tokio::pin!(due);
        let mut quiet_run = 0u32;
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
            // arming every branch below (most of a result's messages arrive this way). The
            // end signals take locks to read, so a run of buffered frames looks at them every
            // QUIET_RUN frames: a grant's end waits for at most that many frames already in
            // memory.
            let quiet = server.has_frame() && draining.is_none() && inject.is_empty() && {
                quiet_run += 1;
                quiet_run < QUIET_RUN || {
                    quiet_run = 0;
                    !self.stop.is_cancelled() && end.now().is_none()
                }
            };
            if !quiet {
                quiet_run = 0;
            }
            // Buffered DataRows, the bulk of a result, are masked where they lie in the read
            // buffer (no frame split off, no reference count per row), as many at a time as
            // the run may still take before its next look at the end signals.
            let in_place = if quiet {
                self.rows_in_place(&mut server, QUIET_RUN - quiet_run, &mut out, &mut stats)
                    .map(|(taken, result)| {
                        quiet_run += taken - 1;
                        result
                    })
            } else {
                None
            };
            let handled = if let Some(result) = in_place {
                match result {
                    Ok(Some(cut)) => {
                        self.cut_result(cut, &mut out).await;
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            } else {
                let frame = if quiet {
                    server.next().await
                } else {
                    tokio::select! {
                        biased;
                        why = &mut ended => {
                            let (outcome, why) = match why {
                                End::GrantRevoked(id) => (SessionOutcome::GrantRevoked, format!("grant {id} was revoked")),
                                End::GrantExpired(id) => (SessionOutcome::GrantExpired, format!("grant {id} expired")),
                                End::StoreLost(id) => (SessionOutcome::StoreLost, crate::protocol::context::store_lost(&id)),
                                End::Unrecorded(id) => (SessionOutcome::StoreLost, crate::protocol::context::unrecorded(&id)),
                                End::ResourceRemoved => {
                                    let _ = self.cancel_in_flight().await;
                                    let err = PgError::fatal("57P01", format!("terminating connection: resource {} left the jitgate configuration", self.resource));
                                    err.write(&mut out);
                                    let _ = client.write_all(&out).await;
                                    break Some((SessionOutcome::ResourceRemoved, err.message));
                                }
                                End::Shutdown => {
                                    // Drain: the session ends at its next idle point or the deadline.
                                    end.draining();
                                    ended = Armed::new(end.ended_owned());
                                    draining = Some(tokio::time::Instant::now() + self.ctx.config.get().daemon.drain_timeout);
                                    continue;
                                }
                            };
                            let _ = self.cancel_in_flight().await;
                            // A grant that ended is asked for again; one that stands (the
                            // store failed) is usable again once the store is back.
                            let hint = match outcome {
                                SessionOutcome::StoreLost => "the grant still stands: reconnect once the host agent's store is back (`jitgate status` shows it)".to_owned(),
                                _ => format!("jitgate request {} --access {}", self.resource, self.access),
                            };
                            let err = PgError::fatal("57P01", format!("terminating connection: jitgate: {why}"))
                                .hint(hint);
                            err.write(&mut out);
                            let _ = client.write_all(&out).await;
                            let _ = client.flush().await;
                            break Some((outcome, why));
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
                        // The client side ended: deliver what the server still sends (its reply to
                        // Terminate is to close), each frame within 200 ms. The wait on the client
                        // side's end fires once; from then on `client_gone` stands for it.
                        () = async {
                            if !client_gone {
                                (&mut stopped).await;
                            }
                        } => {
                            client_gone = true;
                            match tokio::time::timeout(Duration::from_millis(200), server.next()).await {
                                Ok(Ok(Some(f))) => Ok(Some(f)),
                                _ => break None,
                            }
                        }
                        () = &mut due, if !flush_armed => {
                            due.set(self.records_due.notified());
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
                self.on_server(frame, &mut out, &mut stats).await
            };
            if let Err(err) = handled {
                err.write(&mut out);
                let _ = client.write_all(&out).await;
                let _ = client.flush().await;
                break Some((SessionOutcome::Error, err.message));
            }
            if !server.has_frame() && !out.is_empty() || out.len() > FLUSH_AT {
                if stats.values > 0 {
                    // Published per flush, not per row: counters stay current without a
                    // recorder call on every masked value.
                    masked_total += stats.values;
                    metrics::masked(&stats.by_detector, stats.by_column_rule);
                    // A statement's withheld count spans flushes: it is told at its end.
                    stats = Masked {
                        withheld: stats.withheld,
                        ..Masked::default()
                    };
                }
                self.counters
                    .down
                    .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if client.write_all(&out).await.is_err() || client.flush().await.is_err() {
                    break Some((SessionOutcome::Closed, "the client went away".into()));
                }
                wire::shrink_after(&mut out);
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
    pub(super) async fn plan_for(
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
                // A copy: the description is a slice of the read buffer, and a key that
                // shares it would keep the whole buffer (possibly once grown to a 256 MiB
                // row) alive as long as the plan is cached.
                st.plans
                    .insert(bytes::Bytes::copy_from_slice(key), plan.clone());
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
        let mut taint = if cols.iter().any(derived) {
            self.derived_rule(masker, refs).await
        } else {
            None
        };
        let (origins, views) = {
            let mut catalog = self.catalog.lock().await;
            let origins = catalog.origins(cols).await;
            let oids: Vec<u32> = cols
                .iter()
                .filter(|c| !derived(c))
                .map(|c| c.table_oid)
                .collect::<std::collections::BTreeSet<u32>>()
                .into_iter()
                .collect();
            (origins, catalog.view_sources(&oids).await)
        };
        // A view's column may carry any masked column it reads under any name: such columns
        // count as computed, with the strictest rule of what the view reads. Unanswered, every
        // table column counts as unknown (masked).
        let tainted_views: std::collections::HashSet<u32> = match &views {
            Ok(views) => views
                .iter()
                .filter_map(|(oid, sources)| {
                    let rule = sources
                        .iter()
                        .filter_map(|n| masker.column_strategy(&n.0, &n.1, &n.2))
                        .max_by_key(|s| s.strictness())?;
                    taint = Some(match taint {
                        Some(t) if t.strictness() >= rule.strictness() => t,
                        _ => rule,
                    });
                    Some(*oid)
                })
                .collect(),
            Err(_) => std::collections::HashSet::new(),
        };
        let lookup_failed = views.is_err();
        let plan = Plan::new(
            cols,
            masker,
            &|c| {
                if derived(c) || tainted_views.contains(&c.table_oid) {
                    return Origin::Derived;
                }
                if lookup_failed {
                    return Origin::Unknown;
                }
                origins
                    .get(&(c.table_oid, c.attnum))
                    .map_or(Origin::Unknown, |n| {
                        Origin::Column(n.0.clone(), n.1.clone(), n.2.clone())
                    })
            },
            taint,
        );
        let cacheable = !lookup_failed
            && cols
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
    pub(super) fn cached_plan(&self, description: &bytes::Bytes) -> Option<Arc<Plan>> {
        self.lock().plans.get(description).cloned()
    }

    /// The rule for computed values: the strictest of the masked columns the statement feeds
    /// results from, directly, as whole rows (which column went into which value is not
    /// known), or through a view it reads. Fails closed when the source is unknown or the
    /// catalog cannot answer.
    pub(super) async fn derived_rule(
        &self,
        masker: &Masker,
        refs: &ResultRefs,
    ) -> Option<Strategy> {
        if refs.opaque {
            return Some(Strategy::Redact);
        }
        let mut rule = None;
        let (search_path_changed, mode) = {
            let st = self.lock();
            (st.search_path_changed, st.parse_mode)
        };
        let mut catalog = self.catalog.lock().await;
        // Functions created outside the gate return what their bodies compute: each body's
        // references count like the statement's own. A body that cannot be read (another
        // language, SQL built at run time) could return anything.
        let mut all = vec![Arc::new(refs.clone())];
        // An operator created outside the gate calls a function the statement does not
        // name, and `row.f` calls `f(row)` (attribute notation): both are followed as calls
        // (a column name that names no function finds no body).
        // A built-in behind an operator that reads what it is given (`ts_rewrite`) returns
        // what the statement does not read.
        let around = |functions: &std::collections::BTreeSet<String>| {
            functions
                .iter()
                .any(|f| crate::postgres::sql::reads_or_sends_around_results(f))
        };
        let mut pending: Vec<String> = match catalog.operator_functions(&refs.operators).await {
            Ok(functions) if around(&functions) => return Some(Strategy::Redact),
            Ok(functions) => functions.into_iter().collect(),
            Err(_) => return Some(Strategy::Null),
        };
        pending.extend(refs.functions.iter().cloned());
        pending.extend(refs.names.iter().filter(|n| *n != "*").cloned());
        let first: Vec<&str> = pending.iter().map(String::as_str).collect();
        if catalog.prefetch_bodies(&first).await.is_err() {
            return Some(Strategy::Null);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut followed = 0usize;
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let own = catalog.defined_here(&name);
            let bodies = match catalog.function_bodies(&name).await {
                Ok(b) => b,
                Err(_) => return Some(Strategy::Null),
            };
            if own.is_none() && bodies.is_empty() {
                continue;
            }
            followed += 1;
            if followed > 64 {
                return Some(Strategy::Redact);
            }
            let mut read = Vec::new();
            if let Some(own) = own {
                if own.opaque {
                    return Some(Strategy::Redact);
                }
                read.push(own);
            }
            for (language, body) in bodies.iter() {
                match crate::postgres::sql::body_reads(language, body, mode) {
                    Some(body) => read.push(Arc::new(body)),
                    None => return Some(Strategy::Redact),
                }
            }
            for body in read {
                pending.extend(body.functions.iter().cloned());
                match catalog.operator_functions(&body.operators).await {
                    Ok(functions) if around(&functions) => return Some(Strategy::Redact),
                    Ok(functions) => pending.extend(functions),
                    Err(_) => return Some(Strategy::Null),
                }
                all.push(body);
            }
        }
        for refs in &all {
            rule = refs
                .names
                .iter()
                .filter(|n| *n != "*")
                .filter_map(|n| masker.column_strategy_by_name(n))
                .chain(rule)
                .max_by_key(|s| s.strictness());
        }
        let mut relations: Vec<((Option<String>, String), bool)> = Vec::new();
        for refs in &all {
            let whole_rows = refs.whole_rows();
            relations.extend(refs.relations.iter().map(|r| (r.clone(), whole_rows)));
        }
        for ((schema, name), whole_rows) in &relations {
            let whole_rows = *whole_rows;
            if schema.is_none() && search_path_changed {
                // Which relation the name means now is the session's secret.
                return Some(Strategy::Null);
            }
            let rel = match catalog.relation(schema.as_deref(), name).await {
                Err(_) => return Some(Strategy::Null),
                Ok(None) => continue,
                Ok(Some(rel)) => rel,
            };
            if whole_rows {
                rule = rel
                    .columns
                    .iter()
                    .filter_map(|c| masker.column_strategy(&rel.schema, &rel.table, c))
                    .chain(rule)
                    .max_by_key(|s| s.strictness());
            }
            // A view's columns carry what it reads under names of its own.
            match catalog.view_sources(&[rel.oid]).await {
                Err(_) => return Some(Strategy::Null),
                Ok(views) => {
                    rule = views
                        .values()
                        .flat_map(|sources| sources.iter())
                        .filter_map(|n| masker.column_strategy(&n.0, &n.1, &n.2))
                        .chain(rule)
                        .max_by_key(|s| s.strictness());
                }
            }
        }
        rule
    }

    /// What a query string's results may be computed from, following `EXECUTE` to its
    /// prepared statement and `FETCH` to its cursor's `DECLARE`. `run`: the string is sent
    /// to run now (a simple Query), so what it does to the portals and cursors is applied
    /// as it goes (a later `FETCH` in the string sees an earlier `DECLARE`); else (a Parse,
    /// which runs nothing) it is returned, for the statement's Executes to apply. Run, its
    /// `CLOSE`s are returned in order, for when the server completes each.
    pub(super) fn result_refs(
        &self,
        analysis: &Analysis,
        run: bool,
    ) -> (Arc<ResultRefs>, Vec<PortalEffect>, VecDeque<CursorClose>) {
        let mut effects = Vec::new();
        let mut closes = VecDeque::new();
        if let Some(refs) = &analysis.refs {
            // No cursor in it; it may still end or mark the transaction's portals.
            if analysis
                .iter()
                .any(|s| s.ends_portals || s.savepoint.is_some())
            {
                let mut st = self.lock();
                for effect in analysis.iter().filter_map(PortalEffect::of_transaction) {
                    if run {
                        closes.extend(st.apply_portal_effect(effect));
                    } else {
                        effects.push(effect);
                    }
                }
            }
            return (refs.clone(), effects, closes);
        }
        let mut refs = ResultRefs::default();
        let mut st = self.lock();
        // What an EXECUTE or FETCH brings in, each prepared statement or cursor once: the
        // same `EXECUTE p;` many times over must not copy a large `p`'s names as often.
        // (Cursors by identity, as a name can be declared again within the string; those
        // merged are held until the end, so that no address is reused by a later one.)
        let mut merged: std::collections::HashSet<usize> = std::collections::HashSet::new();
        let mut held = Vec::new();
        for s in analysis.iter() {
            refs.add(s);
            if let Some(name) = &s.executes {
                match st.sql_prepared.get(name) {
                    Some(p) => {
                        if merged.insert(std::ptr::from_ref(p) as usize) {
                            refs.add(p);
                        }
                    }
                    None => refs.opaque = true,
                }
            }
            let effect = match &s.cursor {
                Some(CursorUse::Declare { name, hold }) => {
                    let mut own = ResultRefs::default();
                    own.add(s);
                    Some(PortalEffect::Declare(name.clone(), Arc::new(own), *hold))
                }
                Some(CursorUse::Fetch(name)) => {
                    match st.cursor_refs(name) {
                        Some(c) => {
                            if merged.insert(Arc::as_ptr(c) as usize) {
                                refs.merge(c);
                                held.push(c.clone());
                            }
                        }
                        None => refs.opaque = true,
                    }
                    None
                }
                Some(CursorUse::Close(Some(name))) => Some(PortalEffect::Close(name.clone())),
                Some(CursorUse::Close(None)) => Some(PortalEffect::CloseAll),
                None => None,
            };
            for effect in effect.into_iter().chain(PortalEffect::of_transaction(s)) {
                if run {
                    closes.extend(st.apply_portal_effect(effect));
                } else {
                    effects.push(effect);
                }
            }
        }
        (Arc::new(refs), effects, closes)
    }

    /// Handles one server message, writing what the client gets to `out`. After a statement
    /// was cut by a result limit, what the server still sends for that cycle is handled (the
    /// expectations stay in step) but not sent, up to the ReadyForQuery that ends it.
    pub(super) async fn on_server(
        &self,
        frame: Frame,
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Result<(), PgError> {
        if frame.tag == b'D' {
            return self.data_row(frame, out, stats).await;
        }
        let skipping = {
            let mut st = self.lock();
            if st.budget.skipping && frame.tag == b'Z' {
                st.budget.skipping = false;
            }
            st.budget.skipping
        };
        if skipping {
            let mut dropped = BytesMut::new();
            return self.handle_server(frame, &mut dropped, stats).await;
        }
        self.handle_server(frame, out, stats).await
    }

    /// Counts one result row (or COPY line) of `bytes` against the grant's limits. `true`:
    /// a limit was passed now; the client has its error in `out`, the statement is being
    /// cancelled, and the row must not be sent.
    async fn over_budget(&self, bytes: u64, out: &mut BytesMut) -> bool {
        if !self.limits.limits_results() {
            return false;
        }
        let counted = {
            let mut st = self.lock();
            if st.budget.skipping {
                // Already cut: dropped, not counted, not cancelled again.
                return true;
            }
            self.count_result(&mut st, bytes)
        };
        match counted {
            None => false,
            Some(cut) => {
                self.cut_result(cut, out).await;
                true
            }
        }
    }

    /// Counts `bytes` of result against the limits under the session's lock; a limit
    /// passed now starts skipping the rest and is returned, with the statement's record, for
    /// [`Pump::cut_result`].
    fn count_result(
        &self,
        st: &mut State,
        bytes: u64,
    ) -> Option<(super::budget::Passed, Option<u32>)> {
        let passed = st.budget.count(&self.limits, bytes)?;
        st.budget.skipping = true;
        st.copy = None;
        let rec = match st.expect.front() {
            Some(Expect::Query { rec, .. } | Expect::Execute { rec, .. }) => Some(*rec),
            _ => None,
        };
        Some((passed, rec))
    }

    /// A result limit passed: the client gets the error, the record says why, and the
    /// statement is cancelled (the server stops producing what would be dropped anyway).
    async fn cut_result(
        &self,
        (passed, rec): (super::budget::Passed, Option<u32>),
        out: &mut BytesMut,
    ) {
        let error = passed.error(self.resource);
        if let Some(rec) = rec {
            self.with_record(rec, |r| {
                r.error = Some(format!("{}: {}", error.code, error.message));
            });
        }
        error.write(out);
        self.limit_reached(passed.key, passed.limit);
        let _ = self.cancel_in_flight().await;
    }

    /// One result row that arrived as its own frame (see [`Pump::row`]).
    async fn data_row(
        &self,
        frame: Frame,
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Result<(), PgError> {
        if let Some(cut) = self.row(&frame.body, out, stats)? {
            self.cut_result(cut, out).await;
        }
        Ok(())
    }

    /// One result row (`body`: a DataRow's body) that arrived as its own frame, masked by
    /// the result's plan into `out` (see [`Pump::row_locked`]). `Some` when the row passed a
    /// result limit: it was not written, and the caller cuts the statement
    /// ([`Pump::cut_result`]).
    fn row(
        &self,
        body: &[u8],
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Result<Option<Cut>, PgError> {
        let mut guard = self.lock();
        let before = stats.values;
        let mut plan = None;
        let result = self.row_locked(&mut guard, &mut plan, body, out, stats);
        count_masked(&mut guard, plan.as_ref(), stats.values - before);
        result
    }

    /// The DataRows already buffered whole in `server`, up to `most` of them (and while
    /// what they brought in and what they wrote are each under [`FLUSH_AT`]), each masked
    /// where it lies in the read buffer: the hot path of a large result. The session's
    /// state is locked once for the run (when its first row is taken), and the result's plan
    /// and statement record are looked up at its first row (a run of DataRows belongs to one
    /// result: the messages that change which result is current are not DataRows, so they
    /// end the run). An error the client's side raises meanwhile is sent after the run, as
    /// after any buffered frame. `None` when no row was buffered; else how many were taken
    /// and, as for [`Pump::row`], whether the last one asks for a cut.
    fn rows_in_place<R: tokio::io::AsyncRead + Unpin>(
        &self,
        server: &mut FrameReader<R>,
        most: u32,
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Option<(u32, Result<Option<Cut>, PgError>)> {
        let mut guard = None;
        let before = stats.values;
        let mut plan = None;
        let (mut taken, mut read) = (0, 0);
        let mut result = Ok(None);
        while taken < most && read <= FLUSH_AT && out.len() <= FLUSH_AT {
            let Some(row) = server.take_buffered(b'D', |body| {
                read += body.len();
                let st = guard.get_or_insert_with(|| self.lock());
                self.row_locked(st, &mut plan, body, out, stats)
            }) else {
                break;
            };
            taken += 1;
            if !matches!(row, Ok(None)) {
                result = row;
                break;
            }
        }
        let mut st = guard?;
        count_masked(&mut st, plan.as_ref(), stats.values - before);
        Some((taken, result))
    }

    /// One result row under the session's lock: the skip flag of a cut result, the
    /// grant's result limits, then the row masked by `plan` (the result's plan and
    /// statement record, looked up here when `None`) into `out`.
    fn row_locked(
        &self,
        st: &mut State,
        plan: &mut Option<RowPlan>,
        body: &[u8],
        out: &mut BytesMut,
        stats: &mut Masked,
    ) -> Result<Option<Cut>, PgError> {
        if st.budget.skipping {
            // A limit cut this statement: its remaining rows are dropped.
            return Ok(None);
        }
        if self.limits.limits_results()
            && let Some(cut) = self.count_result(st, body.len() as u64 + 5)
        {
            return Ok(Some(cut));
        }
        let Some(masker) = &self.masker else {
            out.put_u8(b'D');
            out.put_i32(body.len() as i32 + 4);
            out.extend_from_slice(body);
            return Ok(None);
        };
        let (plan, _) = match plan {
            Some(plan) => plan,
            None => plan.insert(row_plan(st)?),
        };
        rows::mask_data_row(body, plan, masker, stats, out).map_err(|e| {
            PgError::fatal(
                "08P01",
                format!(
                    "jitgate: lost track of the protocol ({e}); ending the session rather than guessing"
                ),
            )
        })?;
        Ok(None)
    }

    async fn handle_server(
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
        match Backend::of(frame.tag) {
            Backend::ParseComplete | Backend::BindComplete | Backend::CloseComplete => {
                let want = match frame.tag {
                    b'1' => "ParseComplete",
                    b'2' => "BindComplete",
                    _ => "CloseComplete",
                };
                let mut st = self.lock();
                match (frame.tag, st.expect.pop_front()) {
                    (b'1', Some(Expect::Parse(_, stmt))) => {
                        if let Some(stmt) = stmt {
                            stmt.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .confirmed = true;
                        }
                    }
                    (b'3', Some(Expect::Close(close))) => {
                        if let Some(close) = close {
                            st.closed(close);
                        }
                    }
                    (b'2', Some(Expect::Bind { portal, bind, .. })) => {
                        st.bind_confirmed(&portal, bind);
                    }
                    _ => return Err(desync(want)),
                }
                drop(st);
                frame.write(out);
            }
            Backend::ParameterDescription => {
                let internal = matches!(
                    self.lock().expect.front(),
                    Some(Expect::Describe { internal: true, .. })
                );
                if !internal {
                    frame.write(out);
                }
            }
            Backend::RowDescription | Backend::NoData => {
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
            // Taken by `on_server` before it gets here.
            Backend::DataRow => return self.data_row(frame, out, stats).await,
            Backend::CommandComplete | Backend::EmptyQueryResponse | Backend::PortalSuspended => {
                self.lock().budget.start_statement();
                let tag = if frame.tag == b'C' {
                    let mut b = frame.body.clone();
                    take_cstr(&mut b).ok()
                } else {
                    None
                };
                let mut st = self.lock();
                match st.expect.front_mut() {
                    Some(Expect::Execute {
                        rec,
                        portal,
                        names_seq,
                        closes,
                        ..
                    }) => {
                        let (rec, names_seq) = (*rec, *names_seq);
                        let close = closes
                            .pop_front()
                            .filter(|c| tag.as_deref() == Some(c.tag()));
                        // A statement that prepares or deallocates: done now on the server.
                        let effect = portal.statement.as_ref().and_then(|stmt| {
                            stmt.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .effect
                                .clone()
                        });
                        st.expect.pop_front();
                        if let Some(effect) = effect
                            && tag.as_deref() == Some(effect.tag())
                        {
                            st.apply_sql_effect(effect, names_seq);
                        }
                        if let Some(close) = close {
                            st.cursor_closed(close);
                        }
                        drop(st);
                        self.with_record(rec, |r| {
                            if let Some(t) = &tag {
                                r.rows = t.rsplit(' ').next().and_then(|n| n.parse().ok());
                            }
                            r.tag = tag.clone();
                        });
                        self.finish_record(rec);
                    }
                    Some(Expect::Query {
                        rec,
                        effects,
                        names_seq,
                        closes,
                        ..
                    }) => {
                        let (rec, names_seq) = (*rec, *names_seq);
                        // The statements complete in order; those with no effect answer
                        // with other tags (and CLOSE's tags are no SqlEffect's).
                        let effect = effects
                            .front()
                            .is_some_and(|e| tag.as_deref() == Some(e.tag()))
                            .then(|| effects.pop_front())
                            .flatten();
                        let close = closes
                            .front()
                            .is_some_and(|c| tag.as_deref() == Some(c.tag()))
                            .then(|| closes.pop_front())
                            .flatten();
                        st.current = None;
                        if let Some(effect) = effect {
                            st.apply_sql_effect(effect, names_seq);
                        }
                        if let Some(close) = close {
                            st.cursor_closed(close);
                        }
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
                if stats.withheld > 0 {
                    wire::notice(
                        out,
                        "01000",
                        &format!(
                            "jitgate: {} value(s) of a typed column matched a masking rule and were returned as NULL",
                            stats.withheld
                        ),
                        "a masked value cannot be a number or a date, nor JSON the mask would leave malformed; select the column as text (e.g. col::text) to see its masked form",
                    );
                    stats.withheld = 0;
                }
                frame.write(out);
            }
            Backend::ErrorResponse => {
                stats.withheld = 0;
                {
                    let mut st = self.lock();
                    st.budget.start_statement();
                    // The cycle in progress (before this error's skipped Queries count as
                    // done).
                    if st.failed_from.is_none() {
                        st.failed_from = Some(st.cycles_done);
                    }
                }
                let mut fields =
                    wire::parse_fields(frame.body.clone()).map_err(|e| desync(&e.to_string()))?;
                let message = fields
                    .iter()
                    .find(|(c, _)| *c == b'M')
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                // The poison this error answers, by the nonce it quotes (the server's syntax
                // error names it; a nonce is random, so none a workload writes matches).
                let poison = {
                    let mut st = self.lock();
                    if st.poisons.is_empty() {
                        None
                    } else {
                        memchr::memmem::find_iter(message.as_bytes(), NONCE_PREFIX).find_map(|at| {
                            let nonce = message.get(at..at + NONCE_PREFIX.len() + 16)?;
                            st.poisons.remove(nonce)
                        })
                    }
                };
                let answers_poison = poison.is_some();
                // The server skips the rest of an extended batch up to Sync. The first
                // Execute in it is the one that failed (or whose Bind did); those after it
                // never ran, and are finished as such.
                let mut skipped = Vec::new();
                let raw_code = fields
                    .iter()
                    .find(|(c, _)| *c == b'C')
                    .map(|(_, m)| m.as_str())
                    == Some("42P05");
                // What the client is told: a poison's own code, not the nonce's syntax error.
                let code = match &poison {
                    Some(error) => error.code.to_owned(),
                    None => fields
                        .iter()
                        .find(|(c, _)| *c == b'C')
                        .map(|(_, m)| m.clone())
                        .unwrap_or_default(),
                };
                let rec = {
                    let mut st = self.lock();
                    let mut rec = None;
                    // Closes the server skipped: it still holds those statements.
                    let mut skipped_closes = Vec::new();
                    // Binds failed or skipped: their portals' names get back what they held.
                    let mut undone_binds = Vec::new();
                    // Only the message that failed can have failed with 42P05.
                    let mut first = true;
                    let extended = !matches!(st.expect.front(), Some(Expect::Query { .. }));
                    match st.expect.front() {
                        Some(Expect::Query { rec: r, .. }) => rec = Some(*r),
                        _ => {
                            while let Some(e) = st.expect.front() {
                                if matches!(e, Expect::Sync { .. }) {
                                    break;
                                }
                                let was_first = std::mem::take(&mut first);
                                match st.expect.pop_front() {
                                    // After a poison's error, none of them ran.
                                    Some(Expect::Execute {
                                        rec: r,
                                        portal,
                                        first_run,
                                        ..
                                    }) => {
                                        if !was_first || answers_poison {
                                            State::execute_skipped(&portal, first_run);
                                        }
                                        if rec.is_none() && !answers_poison {
                                            rec = Some(r);
                                        } else {
                                            skipped.push(r);
                                        }
                                    }
                                    Some(Expect::Bind {
                                        portal,
                                        bind,
                                        previous,
                                    }) => undone_binds.push((
                                        portal,
                                        bind,
                                        previous,
                                        was_first && !answers_poison,
                                    )),
                                    // The failed Parse, and those the server skipped after
                                    // it, never made a statement: the name is free again.
                                    Some(Expect::Parse(Some(name), made)) => {
                                        // Only the statement this Parse made: a later Parse
                                        // of the name may have replaced it here.
                                        let ours = match (&made, st.statements.get(&name)) {
                                            (Some(made), Some(held)) => Arc::ptr_eq(made, held),
                                            _ => false,
                                        };
                                        if ours {
                                            st.remove_statement(&name);
                                        }
                                        // 42P05: the server holds a statement of that name
                                        // that the gate does not know.
                                        if was_first && raw_code && !answers_poison {
                                            st.phantoms.insert(name);
                                        }
                                    }
                                    Some(Expect::Close(Some(close))) => skipped_closes.push(close),
                                    // A simple Query sent inside the batch: skipped, with
                                    // no ReadyForQuery of its own; its cycle is done.
                                    Some(Expect::Query { rec: r, .. }) => {
                                        st.cycles_done += 1;
                                        skipped.push(r);
                                    }
                                    _ => {}
                                }
                            }
                        }
                    }
                    st.binds_undone(undone_binds);
                    for close in skipped_closes {
                        st.close_skipped(close);
                    }
                    // What the client sends before its Sync is skipped too: see the
                    // ReadyForQuery below.
                    if extended {
                        st.skipping = Some(state::Skipping { code: code.clone() });
                    }
                    st.copy = None;
                    rec
                };
                match poison {
                    Some(error) => error.write(out),
                    None => {
                        if let Some(masker) = &self.masker {
                            let mut written = String::new();
                            if let Some(rec) = rec {
                                self.with_record(rec, |r| written.clone_from(&r.text));
                            }
                            rows::mask_fields(&mut fields, masker, &written, stats);
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
                for rec in skipped {
                    // A refusal's own reason stays.
                    self.with_record(rec, |r| {
                        r.error.get_or_insert_with(|| {
                            format!("not run: an earlier message of its batch failed ({code})")
                        });
                    });
                    self.finish_record(rec);
                }
            }
            Backend::ReadyForQuery => {
                stats.withheld = 0;
                let status = frame.body.first().copied().unwrap_or(b'I');
                let (finished, not_run, code) = {
                    let mut st = self.lock();
                    let mut recs = Vec::new();
                    // After an extended-protocol error the server skipped everything up to
                    // this Sync, including what the client sent after the error came back:
                    // those Parses made nothing, those Closes closed nothing, those
                    // statements never ran.
                    let skipping = st.skipping.take();
                    let skipped = skipping.is_some();
                    let failed_from = st.failed_from.take();
                    let code = skipping.map(|s| s.code).unwrap_or_default();
                    let mut not_run = Vec::new();
                    let mut closes = Vec::new();
                    let mut undone_binds = Vec::new();
                    loop {
                        match (st.expect.pop_front(), skipped) {
                            // A Sync the server ignored in copy-in mode got no answer: it
                            // is done, and this answer is for a later one.
                            (Some(Expect::Sync { copy_in }), _) if st.copy_in.ignored(copy_in) => {
                                st.cycles_done += 1;
                            }
                            (Some(Expect::Sync { .. }), _) | (None, _) => break,
                            // Skipped with no ReadyForQuery of its own: its cycle is done.
                            (Some(Expect::Query { rec, .. }), true) => {
                                st.cycles_done += 1;
                                not_run.push(rec);
                            }
                            (
                                Some(Expect::Execute {
                                    rec,
                                    portal,
                                    first_run,
                                    ..
                                }),
                                true,
                            ) => {
                                State::execute_skipped(&portal, first_run);
                                not_run.push(rec);
                            }
                            (
                                Some(Expect::Bind {
                                    portal,
                                    bind,
                                    previous,
                                }),
                                true,
                            ) => undone_binds.push((portal, bind, previous, false)),
                            (Some(Expect::Parse(Some(name), Some(made))), true) => {
                                if st
                                    .statements
                                    .get(&name)
                                    .is_some_and(|held| Arc::ptr_eq(held, &made))
                                {
                                    st.remove_statement(&name);
                                }
                            }
                            (Some(Expect::Close(Some(close))), true) => closes.push(close),
                            (Some(Expect::Query { rec, .. }), false) => {
                                recs.push(rec);
                                break;
                            }
                            (Some(Expect::Execute { rec, .. }), false) => recs.push(rec),
                            (Some(_), _) => {}
                        }
                    }
                    st.binds_undone(undone_binds);
                    for close in closes {
                        st.close_skipped(close);
                    }
                    st.cycles_done += 1;
                    let done = st.cycles_done;
                    while st
                        .poison_order
                        .front()
                        .is_some_and(|(cycle, _)| *cycle < done)
                    {
                        if let Some((_, nonce)) = st.poison_order.pop_front() {
                            st.poisons.remove(&nonce);
                        }
                    }
                    if status == b'I' {
                        st.forget_portals_before(done);
                        st.savepoints.clear();
                        st.forget_reading_portals_before(done);
                        st.forget_cursors_before(done);
                        if let Some(first) = failed_from {
                            st.bury_cursors_declared_in(first..done);
                        }
                    }
                    st.current = None;
                    st.copy = None;
                    let _ = status;
                    (recs, not_run, code)
                };
                for rec in finished {
                    self.finish_record(rec);
                }
                for rec in not_run {
                    // A refusal's own reason stays.
                    self.with_record(rec, |r| {
                        r.error.get_or_insert_with(|| {
                            format!("not run: an earlier message of its batch failed ({code})")
                        });
                    });
                    self.finish_record(rec);
                }
                frame.write(out);
            }
            Backend::NoticeResponse => {
                if let Some(masker) = &self.masker {
                    let mut fields = wire::parse_fields(frame.body.clone())
                        .map_err(|e| desync(&e.to_string()))?;
                    if rows::mask_fields(&mut fields, masker, "", stats) {
                        wire::write_fields(out, b'N', &fields);
                        return Ok(());
                    }
                }
                frame.write(out);
            }
            Backend::NotificationResponse => {
                // LISTEN/NOTIFY payloads can carry anything: detectors apply.
                if let Some(masker) = &self.masker {
                    let mut b = frame.body.clone();
                    let pid = take_i32(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let channel = take_cstr(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let payload = take_cstr(&mut b).map_err(|e| desync(&e.to_string()))?;
                    let masked = match masker.scan(&payload, &mut |_| {}) {
                        crate::inspect::mask::Outcome::Keep => payload,
                        crate::inspect::mask::Outcome::Null => "****".into(),
                        crate::inspect::mask::Outcome::Replace(s) => s.into_owned(),
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
            Backend::ParameterStatus => {
                let mut b = frame.body.clone();
                if let (Ok(name), Ok(value)) = (take_cstr(&mut b), take_cstr(&mut b))
                    && name == "standard_conforming_strings"
                {
                    self.lock().parse_mode.standard_conforming_strings = value != "off";
                }
                frame.write(out);
            }
            Backend::CopyOutResponse => {
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
            Backend::CopyData => {
                if self.over_budget(frame.body.len() as u64 + 5, out).await {
                    return Ok(());
                }
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
            Backend::CopyDone => {
                if let Some(masker) = &self.masker
                    && let Some(mut c) = self.lock().copy.take()
                {
                    c.finish(masker, stats, out)
                        .map_err(|e| desync(&e.to_string()))?;
                }
                frame.write(out);
            }
            Backend::CopyInResponse => {
                // The COPY started: the Syncs its client sent in its window are ignored.
                let mut st = self.lock();
                if let Some(
                    Expect::Execute {
                        copy_in: Some(w), ..
                    }
                    | Expect::Query {
                        copy_in: Some(w), ..
                    },
                ) = st.expect.front()
                {
                    let w = *w;
                    st.copy_in.started(w);
                }
                drop(st);
                frame.write(out);
            }
            Backend::CopyBothResponse => frame.write(out),
            Backend::BackendKeyData
            | Backend::Authentication
            | Backend::NegotiateProtocolVersion => {
                return Err(desync("authentication message mid-session"));
            }
            Backend::FunctionCallResponse | Backend::Other(_) => {
                return Err(PgError::fatal(
                    "08P01",
                    format!(
                        "jitgate: unknown message type {:?} from the server",
                        frame.tag as char
                    ),
                ));
            }
        }
        Ok(())
    }
}
