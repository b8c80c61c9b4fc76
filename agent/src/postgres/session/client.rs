//! Client to server: every message judged before it is forwarded; refused statements are
//! replaced by ones the server rejects ("poison").

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// What every poison's nonce starts with; 16 hex digits follow.
pub(super) const NONCE_PREFIX: &str = "jitgate_refused_";

pub(super) fn nonce() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("{NONCE_PREFIX}{}", hex::encode(b))
}

/// Ends the session when it holds more than [`MAX_RECORDS_IN_FLIGHT`] on the workload's
/// behalf awaiting the server (records and portals' parameters): only messages the server
/// skips (after an error, up to a Sync the client does not send) pile them up.
fn in_flight_bound(st: &State) -> Result<(), PgError> {
    if st.held_bytes() <= MAX_RECORDS_IN_FLIGHT {
        return Ok(());
    }
    Err(PgError::fatal(
        "54000",
        format!(
            "jitgate: more than {} MiB of statements in flight on this session without an answer from the server",
            MAX_RECORDS_IN_FLIGHT >> 20
        ),
    )
    .hint("send Sync between batches of extended-protocol messages; the session was ended"))
}

/// A Bind refused: the portal it named and what its Executes' records carry.
struct BindRefused {
    portal: String,
    formats: Vec<i16>,
    params: Vec<Option<String>>,
    bytes: usize,
}

/// Longest statement or portal name the server tells apart: it compares names on their
/// first `NAMEDATALEN - 1` bytes, and the gate on the whole name, so two names alike in
/// those bytes would be one statement there and two here.
const MAX_NAME: usize = 63;

/// Refuses (ending the session) a statement or portal name the server would cut.
fn name_fits(name: &str) -> Result<(), PgError> {
    if name.len() > MAX_NAME {
        return Err(PgError::fatal(
            "42622",
            format!(
                "jitgate: a statement or portal name of {} bytes; PostgreSQL tells names apart by their first {MAX_NAME} bytes only, so the gate refuses longer ones",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// What the server answers to a Parse or PREPARE of a name in use, word for word.
pub(super) fn name_in_use_error(name: &str) -> PgError {
    PgError::error(
        "42P05",
        format!("prepared statement \"{name}\" already exists"),
    )
}

/// The session may no longer send to the server: its grant ended (expired, revoked, not
/// confirmed or not recorded by the store) or its resource left the configuration (a shutdown
/// drains instead). Reading the end signals takes locks (one of them the agent's, shared by
/// every session), so they are read only when the server side's wait on them may have news:
/// any of them fired, or it is not armed yet. A signal counts as fired once its sender has
/// woken its waiters (a revocation acknowledged to the operator has): a message racing the
/// change itself may pass, as it could had it arrived a moment earlier.
fn grant_gone(end: &SessionEnd, news: &News) -> bool {
    !news.quiet()
        && matches!(
            end.now(),
            Some(
                End::GrantExpired(_)
                    | End::GrantRevoked(_)
                    | End::StoreLost(_)
                    | End::Unrecorded(_)
                    | End::ResourceRemoved
            )
        )
}

impl Pump<'_> {
    /// Client to server. Returns the outcome when the client ends the session.
    pub(super) async fn client_to_server(
        &self,
        mut client: FrameReader<ReadHalf<Stream>>,
        mut server: WriteHalf<Stream>,
        inject: mpsc::Sender<PgError>,
        (end, news): (&SessionEnd, News),
    ) -> Option<Outcome> {
        let mut out = BytesMut::with_capacity(8 * 1024);
        // Armed once and polled only when it fires (see [`Armed`]): a wait built per message
        // registered and removed a waiter each time.
        let mut stopped = Armed::new(self.stop.cancelled());
        let outcome = loop {
            // The server side watches the grant, the resource and the agent's shutdown, tells
            // the client why the session ends, and stops this side. Nothing here waits on
            // them: one wake-up source fewer per message.
            let frame = tokio::select! {
                biased;
                () = &mut stopped => break None,
                f = client.next() => f,
            };
            // Checked per message, not only when woken: a message that arrives with the
            // grant's end is never forwarded.
            if grant_gone(end, &news) {
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
                    let mut err = PgError::fatal(
                        "54000",
                        format!(
                            "jitgate: a {tag:?} message of {len} bytes exceeds the {cap}-byte limit"
                        ),
                    );
                    if matches!(tag, 'Q' | 'P') {
                        err = err.hint(format!(
                            "the jitgate operator can raise max_statement_size for resource {}, up to 1GiB",
                            self.resource
                        ));
                    }
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
                    if !grant_gone(end, &news) {
                        let _ = server.write_all(&out).await;
                    }
                    break Some((SessionOutcome::Closed, String::new()));
                }
                Err(err) => {
                    let _ = inject.send(err.clone()).await;
                    break Some((SessionOutcome::Error, err.message));
                }
            }
            if !client.has_frame() && !out.is_empty() {
                // Handling a message may have waited (a catalog lookup, an approval): what it
                // produced is not sent if the grant ended meanwhile.
                if grant_gone(end, &news) {
                    break None;
                }
                if server.write_all(&out).await.is_err() || server.flush().await.is_err() {
                    break None;
                }
                wire::shrink_after(&mut out);
            }
        };
        self.stop.cancel();
        outcome
    }

    /// Handles one client message. `Ok(false)` when the client terminated.
    pub(super) async fn on_client(
        &self,
        frame: Frame,
        out: &mut BytesMut,
    ) -> Result<bool, PgError> {
        let malformed = |e: WireError| {
            PgError::fatal("08P01", format!("jitgate: malformed client message: {e}"))
        };
        match Frontend::of(frame.tag) {
            Frontend::Query => {
                let mut body = frame.body.clone();
                let text = take_cstr(&mut body).map_err(malformed)?;
                let (verdict, rec) = self.decide(&text, "query", true, None).await;
                in_flight_bound(&self.lock())?;
                let verdict = verdict.and_then(|analysis| match self.names_in_doubt(&analysis) {
                    Some(error) => {
                        self.update_record(rec, |r| {
                            r.decision = Decision::Denied;
                            r.rule = Some("name not settled".into());
                        });
                        Err(error)
                    }
                    None => Ok(analysis),
                });
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
                        let (refs, _, closes) = self.result_refs(&analysis, true);
                        let effects = SqlEffect::of(&analysis);
                        let mut st = self.lock();
                        let copy_in = copies_in(&analysis).then(|| st.copy_in.open());
                        let names_seq = if effects.is_empty() {
                            0
                        } else {
                            st.name_change()
                        };
                        st.expect.push_back(Expect::Query {
                            rec,
                            refs,
                            copies,
                            copy_in,
                            names_seq,
                            effects,
                            closes,
                        });
                        st.cycles_sent += 1;
                        drop(st);
                        frame.write(out);
                    }
                    Err(err) => self.poison_query(err, rec, out),
                }
            }
            Frontend::Parse => {
                let mut body = frame.body.clone();
                let name = take_cstr(&mut body).map_err(malformed)?;
                name_fits(&name)?;
                let text = take_cstr(&mut body).map_err(malformed)?;
                // A name in use: the server keeps the statement it has and fails this Parse;
                // so does the gate, which judges and masks by the statement it has.
                if !name.is_empty() && self.lock().has_prepared(&name) {
                    self.poison(None, name_in_use_error(&name), out);
                    return Ok(true);
                }
                let (verdict, rec) = self.decide(&text, "parse", true, Some(&name)).await;
                // The record for a prepared statement is per Execute; keep this decision's.
                let removed = Self::take_record(&mut self.lock(), rec);
                let (judged, recorded) = match removed {
                    Some(r) => {
                        let (judged, text) = Judged::of(r.record);
                        (Some(judged), text)
                    }
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
                        let (refs, portal_effects, _) = self.result_refs(&analysis, false);
                        let effect = SqlEffect::of(&analysis).pop_front();
                        let (contested, cycle, seq) = {
                            let mut st = self.lock();
                            // The unnamed statement cannot meet 42P05: each Parse of it
                            // replaces the last.
                            let contested = !name.is_empty() && st.names_in_flux();
                            let seq = st.next_seq();
                            (contested, st.cycles_sent, seq)
                        };
                        let stmt: Stmt = Arc::new(Mutex::new(StmtInfo {
                            plan: None,
                            refs,
                            copy,
                            judged,
                            // The unnamed statement is one at a time (each Parse of it
                            // replaces it), bounded by the statement size: not counted.
                            bytes: if name.is_empty() {
                                0
                            } else {
                                prepared_footprint(text.len()) + recorded.len()
                            },
                            recorded,
                            copies_in: copies_in(&analysis),
                            prepaid: true,
                            recorded_in: None,
                            portal_effects,
                            fetches: analysis
                                .iter()
                                .filter_map(|s| match &s.cursor {
                                    Some(CursorUse::Fetch(name)) => Some(name.clone()),
                                    _ => None,
                                })
                                .collect(),
                            executes: analysis.iter().filter_map(|s| s.executes.clone()).collect(),
                            effect,
                            contested,
                            confirmed: false,
                            cycle,
                            seq,
                        }));
                        let mut st = self.lock();
                        if !name.is_empty() {
                            // What an EXECUTE of the name reads changes.
                            st.touch(&name);
                        }
                        st.insert_statement(name.clone(), stmt.clone());
                        st.expect
                            .push_back(Expect::Parse(Some(name.clone()), Some(stmt.clone())));
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
                            judged.as_ref().and_then(|j| j.rule.clone()),
                        );
                        if let Some(j) = judged {
                            self.update_record(rec, |r| {
                                r.decision = if j.decision == Decision::Allowed {
                                    Decision::Denied
                                } else {
                                    j.decision
                                };
                                r.held_ms = j.held_ms;
                                r.error = Some(format!("{}: {}", err.code, err.message));
                            });
                        }
                        self.finish_record(rec);
                        self.poison_parse(&name, err, out);
                    }
                }
            }
            Frontend::Bind => {
                let mut body = frame.body.clone();
                let portal = take_cstr(&mut body).map_err(malformed)?;
                let statement = take_cstr(&mut body).map_err(malformed)?;
                name_fits(&portal)?;
                name_fits(&statement)?;
                let nformats = take_i16(&mut body).map_err(malformed)?;
                let mut pformats = Vec::with_capacity(nformats.max(0) as usize);
                for _ in 0..nformats {
                    pformats.push(take_i16(&mut body).map_err(malformed)?);
                }
                let nparams = take_i16(&mut body).map_err(malformed)?;
                let mut params = Vec::with_capacity((nparams.max(0) as usize).min(64));
                // Recorded with every execution of the portal: bounded like a statement's
                // text (every entry counts, placeholders and NULLs too), or a large Bind
                // executed many times is copied that many times. Past the bound, one note
                // says how many more were not recorded.
                let mut room = MAX_RECORDED_TEXT;
                let mut unrecorded = 0usize;
                for i in 0..nparams.max(0) as usize {
                    let len = take_i32(&mut body).map_err(malformed)?;
                    let raw = if len < 0 {
                        None
                    } else if body.len() < len as usize {
                        return Err(malformed(WireError::Malformed(
                            "bind parameter past the end",
                        )));
                    } else {
                        Some(body.split_to(len as usize))
                    };
                    if room == 0 {
                        unrecorded += 1;
                        continue;
                    }
                    let Some(raw) = raw else {
                        room = room.saturating_sub(8);
                        params.push(None);
                        continue;
                    };
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
                    let mut recorded = if binary && printable.is_none() {
                        format!("<{} bytes, binary>", raw.len())
                    } else {
                        let text = String::from_utf8_lossy(&raw).into_owned();
                        match self.recorder.scan(&text, &mut |_| {}) {
                            crate::inspect::mask::Outcome::Replace(s) => s.into_owned(),
                            crate::inspect::mask::Outcome::Null => "****".into(),
                            crate::inspect::mask::Outcome::Keep => text,
                        }
                    };
                    record::cut_recorded(&mut recorded, room);
                    room = room.saturating_sub(recorded.len().max(8));
                    params.push(Some(recorded));
                }
                if unrecorded > 0 {
                    params.push(Some(format!(
                        "<{unrecorded} more, not recorded: past the recorded size>"
                    )));
                }
                let nres = take_i16(&mut body).map_err(malformed)?;
                let mut formats = Vec::with_capacity(nres.max(0) as usize);
                for _ in 0..nres {
                    formats.push(take_i16(&mut body).map_err(malformed)?);
                }
                let params_bytes = params.iter().flatten().map(String::len).sum();
                // The statement it binds, as the gate holds it. One the gate does not hold
                // is refused here, as the server refuses one it does not hold: the two can
                // disagree only where the gate forgot a statement the server kept (a Close or
                // DEALLOCATE the server skipped after an error), and a run of it would be
                // recorded without its text.
                let held = {
                    let st = self.lock();
                    match st.statements.get(&statement) {
                        Some(stmt) => Ok((stmt.clone(), st.cycles_sent)),
                        None => Err(st.sql_prepared.get(&statement).cloned()),
                    }
                };
                let stmt = match held {
                    Ok((stmt, cycle_now)) => {
                        let contested = {
                            let s = stmt.lock().unwrap_or_else(PoisonError::into_inner);
                            s.contested && !s.confirmed && s.cycle < cycle_now
                        };
                        if contested {
                            // Its Parse may yet fail (42P05) while the server binds another
                            // statement of the name: not judged nor masked as this one.
                            let error = PgError::error(
                                "26000",
                                format!("prepared statement \"{statement}\" is not confirmed yet"),
                            )
                            .hint("jitgate: its Parse was sent while the statement names were changing (a Close, PREPARE or DEALLOCATE unanswered) and is not answered yet; bind it once the Parse has completed (after its Sync)");
                            let refused = BindRefused {
                                portal,
                                formats,
                                params,
                                bytes: params_bytes,
                            };
                            self.refuse_bind(refused, &statement, "not confirmed yet", error, out)?;
                            return Ok(true);
                        }
                        stmt
                    }
                    // Prepared with SQL PREPARE, bound with the protocol: the same namespace
                    // on the server.
                    Err(Some(_)) if self.lock().sql_name_pending(&statement) => {
                        let error = PgError::error(
                            "26000",
                            format!("prepared statement \"{statement}\" is being changed by a statement not yet answered"),
                        )
                        .hint("jitgate: a PREPARE, DEALLOCATE or DISCARD ALL of it was sent and has not completed; bind it once that statement has completed");
                        let refused = BindRefused {
                            portal,
                            formats,
                            params,
                            bytes: params_bytes,
                        };
                        self.refuse_bind(refused, &statement, "being changed", error, out)?;
                        return Ok(true);
                    }
                    Err(Some(prepared)) => {
                        let mut refs = ResultRefs::default();
                        refs.add(&prepared);
                        let stmt: Stmt = Arc::new(Mutex::new(StmtInfo {
                            refs: Arc::new(refs),
                            recorded: self.recorded_text(&prepared.text),
                            copies_in: prepared.kinds.contains("copy_from"),
                            ..StmtInfo::default()
                        }));
                        if self.masker.is_some() {
                            // Its result shape, learnt before its rows arrive (as at a Parse).
                            self.lock().expect.push_back(Expect::Describe {
                                target: Some(DescribeTarget::Statement(stmt.clone())),
                                internal: true,
                            });
                            postgres_protocol::message::frontend::describe(b'S', &statement, out)
                                .map_err(|e| PgError::fatal("08P01", e.to_string()))?;
                        }
                        stmt
                    }
                    Err(None) => {
                        let error = PgError::error(
                            "26000",
                            format!("prepared statement \"{statement}\" does not exist"),
                        )
                        .hint("jitgate holds no statement of this name (it was closed or deallocated as far as the gate saw, or never prepared): prepare it again");
                        let refused = BindRefused {
                            portal,
                            formats,
                            params,
                            bytes: params_bytes,
                        };
                        self.refuse_bind(
                            refused,
                            &statement,
                            "which the gate does not hold",
                            error,
                            out,
                        )?;
                        return Ok(true);
                    }
                };
                let mut st = self.lock();
                let cycle = st.cycles_sent;
                st.binds += 1;
                let bind = st.binds;
                let previous = st.portals.get(&portal).cloned();
                let info = Arc::new(PortalInfo {
                    statement: Some(stmt),
                    formats,
                    params,
                    plan: Mutex::new(None),
                    executed: AtomicBool::new(false),
                    cycle,
                    bind,
                    bytes: params_bytes,
                    replaced: previous.is_some(),
                    confirmed: AtomicBool::new(false),
                    stamp: {
                        // A named portal bound again changes what a FETCH of it reads.
                        if !portal.is_empty() {
                            st.touch(&portal);
                        }
                        st.names_stamp
                    },
                });
                let targets = info
                    .statement
                    .as_ref()
                    .and_then(|s| s.lock().unwrap_or_else(PoisonError::into_inner).reads());
                if let Some((fetches, executes)) = targets {
                    st.note_reading_targets(fetches.into_iter().chain(executes));
                    if !portal.is_empty() {
                        st.note_reading_portal(&portal);
                    }
                }
                st.insert_portal(portal.clone(), info);
                // Portals and SQL cursors share the server's namespace: a cursor of this name
                // is gone if this Bind succeeds (and the Bind fails while it is there: what
                // it read is kept, see `State::cursors_gone`).
                if !portal.is_empty() {
                    st.bury_cursor(&portal);
                }
                in_flight_bound(&st)?;
                st.expect.push_back(Expect::Bind {
                    portal,
                    bind,
                    previous,
                });
                frame.write(out);
            }
            Frontend::Describe => {
                let (kind, name) = target_of(&frame.body).map_err(malformed)?;
                name_fits(&name)?;
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
            Frontend::Execute => {
                let mut body = frame.body.clone();
                let portal = take_cstr(&mut body).map_err(malformed)?;
                name_fits(&portal)?;
                let known = self.lock().portals.get(&portal).cloned();
                let (info, unbound) = match known {
                    Some(info) => (info, false),
                    None => (self.unbound_portal(&portal), true),
                };
                // Bound in an earlier batch the server has not answered: it may still run
                // the portal before (a named portal's Bind fails, 42P03, also where the
                // gate no longer holds that one: a CLOSE or DECLARE of the name parsed and
                // never run), so which statement this Execute runs is not known yet.
                // Refused, not guessed.
                // A FETCH or EXECUTE portal runs what its cursor or prepared statement is
                // when it runs, described as they were when it was bound.
                let reads = if unbound {
                    None
                } else {
                    info.statement
                        .as_ref()
                        .and_then(|s| s.lock().unwrap_or_else(PoisonError::into_inner).reads())
                };
                let may_contest = (info.replaced || !portal.is_empty())
                    && !info.confirmed.load(Ordering::Acquire);
                let (contested, stale) = if may_contest || reads.is_some() {
                    let st = self.lock();
                    let contested = may_contest && info.cycle < st.cycles_sent;
                    let stale = reads.as_ref().is_some_and(|(fetches, executes)| {
                        info.stamp != st.names_stamp
                            || executes.iter().any(|n| st.sql_name_pending(n))
                            || fetches.iter().any(|n| st.is_reading_portal(n))
                    });
                    (contested, stale)
                } else {
                    (false, false)
                };
                if contested {
                    let error = PgError::error(
                        "55000",
                        format!("jitgate: portal \"{portal}\" was bound in an earlier batch the server has not answered yet"),
                    )
                    .hint("wait for that batch's answer (its ReadyForQuery) before executing the portal: until then the gate cannot tell which statement it runs");
                    self.refuse_execute(
                        &portal,
                        "bound and not confirmed yet",
                        "portal not confirmed",
                        error,
                        out,
                    );
                    return Ok(true);
                }
                if stale {
                    let error = PgError::error(
                        "55000",
                        format!("jitgate: what portal \"{portal}\" reads (a cursor, portal or prepared statement) changed since it was bound, is being changed, or is itself a FETCH or EXECUTE"),
                    )
                    .hint("bind the portal again once the statements before it have completed: the server would run the new one while describing the old");
                    self.refuse_execute(
                        &portal,
                        "its cursor or prepared statement changed since its Bind",
                        "portal stale",
                        error,
                        out,
                    );
                    return Ok(true);
                }
                // A portal runs its statement once (Executes after the first continue it, or
                // find it done): its first Execute is when the statement runs. The first run
                // of a statement was paid for at its Parse; every later one takes from the
                // grant's limits as a simple Query does.
                let first_run = !info.executed.load(Ordering::Relaxed);
                let (recorded, judged, may_copy_in, prepaid, portal_effects) = match &info.statement
                {
                    Some(stmt) => {
                        let mut s = stmt.lock().unwrap_or_else(PoisonError::into_inner);
                        let prepaid = first_run && std::mem::take(&mut s.prepaid);
                        let effects = if s.portal_effects.is_empty() {
                            Vec::new()
                        } else {
                            s.portal_effects.clone()
                        };
                        (
                            s.recorded_for_run(),
                            s.judged.clone(),
                            s.copies_in,
                            prepaid,
                            effects,
                        )
                    }
                    None => (String::new(), None, false, false, Vec::new()),
                };
                let params = info.params.clone();
                let params_bytes: usize = params.iter().flatten().map(String::len).sum();
                let rec = self.new_record_recorded(recorded, Decision::Allowed, None);
                if let Some(stmt) = &info.statement {
                    stmt.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .recorded_in
                        .get_or_insert(rec);
                }
                {
                    // Its parameters, judgement and their bytes under one hold of the state
                    // (every Execute comes here).
                    let mut st = self.lock();
                    if let Some(r) = st.records.get_mut(&rec) {
                        r.record.params = params;
                        if let Some(judged) = judged {
                            judged.apply(&mut r.record);
                        }
                        r.bytes += params_bytes;
                        st.records_bytes += params_bytes;
                    }
                    in_flight_bound(&st)?;
                }
                // Refused, the Execute is replaced by a Parse the server rejects, under a name
                // of its own (the client's statements stay as they are), and the server skips
                // to Sync; the portal stays unrun (a later Execute of it is judged again).
                let refused = if first_run {
                    self.over_limits(!prepaid)
                } else {
                    None
                };
                if let Some(Verdict::Deny { rule, error }) = refused {
                    info!(rule = %rule, kind = "execute", "statement refused");
                    self.update_record(rec, |r| {
                        r.decision = Decision::Denied;
                        r.rule = Some(rule);
                        r.error = Some(format!("{}: {}", error.code, error.message));
                    });
                    self.finish_record(rec);
                    self.poison(Some(&nonce()), error, out);
                    return Ok(true);
                }
                info.executed.store(true, Ordering::Relaxed);
                // A COPY TO run through Execute masks with its statement's plan.
                let has_effect = info.statement.as_ref().is_some_and(|stmt| {
                    stmt.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .effect
                        .is_some()
                });
                let mut st = self.lock();
                // A second Execute of a completed utility portal runs nothing (55000). One
                // sent while the first is unanswered may be the run (the server skipped the
                // first): what it does is applied again (only ever more is dropped or
                // remembered).
                let mut closes = VecDeque::new();
                let may_run = first_run
                    || (!portal_effects.is_empty()
                        && st.expect.iter().any(|e| {
                            matches!(e, Expect::Execute { portal: p, first_run: true, .. }
                                if Arc::ptr_eq(p, &info))
                        }));
                if may_run {
                    for effect in portal_effects {
                        // Run again, a DECLARE may be what the server runs, or fail there
                        // after a CLOSE of the name the first run was followed by (the
                        // server then holds no such cursor, which a function could open
                        // unseen): masked as reading anything.
                        let effect = match effect {
                            PortalEffect::Declare(name, _, _) if !first_run => {
                                PortalEffect::Declare(name, ResultRefs::opaque(), true)
                            }
                            effect => effect,
                        };
                        closes.extend(st.apply_portal_effect(effect));
                    }
                }
                // A SQL cursor run with Execute declares nothing (its query is a SELECT or
                // VALUES); a portal the gate forgot may.
                if unbound && !st.cursors.contains_key(&portal) {
                    st.cursors_unknown();
                }
                let mut masked_as = None;
                if self.masker.is_some() {
                    // Its result shape, learnt first where the gate's may be stale: a portal
                    // it does not hold (its rows carry no description), or a FETCH, masked
                    // by what its cursors hold as it runs.
                    let target = if unbound {
                        Some(info.clone())
                    } else if let Some((fetches, executes)) = reads {
                        let mut refs = ResultRefs::default();
                        for name in &fetches {
                            match st.cursor_refs(name) {
                                Some(c) => refs.merge(c),
                                None => refs.opaque = true,
                            }
                        }
                        for name in &executes {
                            match st.sql_prepared.get(name) {
                                Some(p) => refs.add(p),
                                None => refs.opaque = true,
                            }
                        }
                        let view = Self::portal_view(Arc::new(refs));
                        masked_as = Some(view.clone());
                        Some(view)
                    } else {
                        None
                    };
                    if let Some(target) = target {
                        st.expect.push_back(Expect::Describe {
                            target: Some(DescribeTarget::Portal(target)),
                            internal: true,
                        });
                        postgres_protocol::message::frontend::describe(b'P', &portal, out)
                            .map_err(|e| PgError::fatal("08P01", e.to_string()))?;
                    }
                }
                let copy_in = may_copy_in.then(|| st.copy_in.open());
                let names_seq = if has_effect { st.name_change() } else { 0 };
                st.expect.push_back(Expect::Execute {
                    portal: info,
                    masked_as,
                    first_run,
                    rec,
                    copy_in,
                    names_seq,
                    closes,
                });
                frame.write(out);
            }
            Frontend::Close => {
                let (kind, name) = target_of(&frame.body).map_err(malformed)?;
                name_fits(&name)?;
                let mut st = self.lock();
                // What a FETCH or EXECUTE of the name reads changes.
                st.touch(&name);
                let closes = if kind == b'S' {
                    Some(st.closing(&name))
                } else {
                    st.remove_portal(&name);
                    st.bury_cursor(&name);
                    None
                };
                st.expect.push_back(Expect::Close(closes));
                in_flight_bound(&st)?;
                frame.write(out);
            }
            Frontend::Sync => {
                let mut st = self.lock();
                let copy_in = st.copy_in.tag();
                st.expect.push_back(Expect::Sync { copy_in });
                st.cycles_sent += 1;
                frame.write(out);
            }
            Frontend::CopyData | Frontend::CopyDone | Frontend::CopyFail => {
                self.lock().copy_in.close();
                frame.write(out);
            }
            Frontend::Flush => frame.write(out),
            Frontend::Terminate => {
                frame.write(out);
                return Ok(false);
            }
            Frontend::FunctionCall => {
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
            Frontend::Other(other) => {
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

    /// What an Execute of a portal the client did not bind with the protocol runs: a SQL
    /// cursor (`DECLARE`, or one a function opened), or nothing (the server refuses the
    /// Execute). Never another portal's statement: its rows are masked by their own
    /// description, which the gate asks for first, with every computed column masked
    /// whole. Not by the cursor's query as the gate parsed it: a DECLARE parsed or failed
    /// and never run would let a workload name the query the rows are masked by.
    fn unbound_portal(&self, name: &str) -> Portal {
        let statement: Stmt = Arc::new(Mutex::new(StmtInfo {
            refs: ResultRefs::opaque(),
            recorded: format!("<Execute of portal \"{name}\": a SQL cursor, or not bound>"),
            ..StmtInfo::default()
        }));
        Self::portal_of(statement)
    }

    /// A portal that only masks one Execute's rows by `refs`, with the plan its Describe
    /// brings.
    fn portal_view(refs: Arc<ResultRefs>) -> Portal {
        Self::portal_of(Arc::new(Mutex::new(StmtInfo {
            refs,
            ..StmtInfo::default()
        })))
    }

    fn portal_of(statement: Stmt) -> Portal {
        Arc::new(PortalInfo {
            statement: Some(statement),
            formats: Vec::new(),
            params: Vec::new(),
            plan: Mutex::new(None),
            executed: AtomicBool::new(false),
            cycle: u64::MAX,
            bind: 0,
            bytes: 0,
            replaced: false,
            confirmed: AtomicBool::new(false),
            stamp: 0,
        })
    }

    /// Refuses an Execute of `portal` (`why` in its record, `rule` deciding).
    fn refuse_execute(
        &self,
        portal: &str,
        why: &str,
        rule: &str,
        error: PgError,
        out: &mut BytesMut,
    ) {
        let rec = self.new_record_recorded(
            format!("<Execute of portal \"{portal}\", {why}: refused>"),
            Decision::Denied,
            Some(rule.into()),
        );
        self.update_record(rec, |r| {
            r.error = Some(format!("{}: {}", error.code, error.message));
        });
        self.finish_record(rec);
        self.poison(Some(&nonce()), error, out);
    }

    /// A simple query that reads a name whose meaning is not settled: an `EXECUTE` of a
    /// prepared statement a statement not yet answered changes (the gate would judge and
    /// mask it as the one before), or a SQL `FETCH` of a protocol portal that runs a FETCH
    /// or EXECUTE itself (described by what those names were when it was bound).
    fn names_in_doubt(&self, analysis: &Analysis) -> Option<PgError> {
        if analysis
            .iter()
            .all(|s| s.executes.is_none() && !matches!(s.cursor, Some(CursorUse::Fetch(_))))
        {
            return None;
        }
        let st = self.lock();
        for s in analysis.iter() {
            if let Some(name) = &s.executes
                && st.sql_name_pending(name)
            {
                return Some(
                    PgError::error(
                        "26000",
                        format!("prepared statement \"{name}\" is being changed by a statement not yet answered"),
                    )
                    .hint("jitgate: a PREPARE, DEALLOCATE or DISCARD ALL of it was sent and has not completed; run EXECUTE once that statement has completed"),
                );
            }
            if let Some(CursorUse::Fetch(name)) = &s.cursor
                && st.is_reading_portal(name)
            {
                return Some(
                    PgError::error(
                        "0A000",
                        format!("jitgate: portal \"{name}\" runs a FETCH or EXECUTE of its own: fetch it with Execute"),
                    )
                    .hint("the gate masks its rows by what they are read from, which only an Execute of it tells"),
                );
            }
        }
        None
    }

    /// Replaces a refused simple query with one the server rejects.
    pub(super) fn poison_query(&self, error: PgError, rec: u32, out: &mut BytesMut) {
        let nonce = nonce();
        self.update_record(rec, |r| {
            if r.decision == Decision::Allowed {
                r.decision = Decision::Denied;
            }
            r.error = Some(format!("{}: {}", error.code, error.message));
        });
        let mut st = self.lock();
        let cycle = st.cycles_sent;
        st.poison_order.push_back((cycle, nonce.clone()));
        st.poisons.insert(nonce.clone(), error);
        st.expect.push_back(Expect::Query {
            rec,
            refs: Arc::default(),
            copies: VecDeque::new(),
            copy_in: None,
            effects: VecDeque::new(),
            names_seq: 0,
            closes: VecDeque::new(),
        });
        st.cycles_sent += 1;
        drop(st);
        let _ = postgres_protocol::message::frontend::query(&nonce, out);
    }

    /// Refuses a Bind: replaced by a Parse the server rejects (the rest of the batch is
    /// skipped), and the portal it named noted as refused, so that its Executes (skipped by
    /// the server) are recorded as of it, not of an older portal of the name.
    fn refuse_bind(
        &self,
        refused: BindRefused,
        statement: &str,
        why: &str,
        error: PgError,
        out: &mut BytesMut,
    ) -> Result<(), PgError> {
        let stmt: Stmt = Arc::new(Mutex::new(StmtInfo {
            recorded: format!("<Bind of statement \"{statement}\", {why}: refused>"),
            ..StmtInfo::default()
        }));
        self.poison(Some(&nonce()), error, out);
        let mut st = self.lock();
        let cycle = st.cycles_sent;
        st.binds += 1;
        let bind = st.binds;
        st.insert_portal(
            refused.portal,
            Arc::new(PortalInfo {
                statement: Some(stmt),
                formats: refused.formats,
                params: refused.params,
                plan: Mutex::new(None),
                executed: AtomicBool::new(false),
                cycle,
                bind,
                bytes: refused.bytes,
                replaced: false,
                confirmed: AtomicBool::new(false),
                stamp: 0,
            }),
        );
        in_flight_bound(&st)
    }

    /// Replaces a refused Parse with one the server rejects; the rest of the batch is skipped
    /// by the server up to Sync, as for any failed Parse.
    pub(super) fn poison_parse(&self, name: &str, error: PgError, out: &mut BytesMut) {
        self.poison(Some(name), error, out);
    }

    /// [`Pump::poison_parse`]; with `None` the Parse is unnamed, and the named statements
    /// stay as they are on both sides (the server drops its unnamed statement first, so the
    /// gate does too).
    pub(super) fn poison(&self, name: Option<&str>, error: PgError, out: &mut BytesMut) {
        let nonce = nonce();
        let mut st = self.lock();
        let cycle = st.cycles_sent;
        st.poison_order.push_back((cycle, nonce.clone()));
        st.poisons.insert(nonce.clone(), error);
        st.remove_statement(name.unwrap_or(""));
        st.expect
            .push_back(Expect::Parse(name.map(str::to_owned), None));
        drop(st);
        // A nonce that is no statement: the server fails this Parse.
        let _ = postgres_protocol::message::frontend::parse(
            name.unwrap_or(""),
            &nonce,
            std::iter::empty(),
            out,
        );
    }
}

/// Whether a statement may put the server in copy-in mode (a COPY FROM; one from a file
/// never does, which only means its window is never started).
fn copies_in(analysis: &[Statement]) -> bool {
    analysis.iter().any(|s| s.kinds.contains("copy_from"))
}

/// The target of a Describe or Close: `S` (statement) or `P` (portal), and its name.
pub(super) fn target_of(body: &bytes::Bytes) -> Result<(u8, String), WireError> {
    let mut body = body.clone();
    if body.is_empty() {
        return Err(WireError::Malformed("Describe or Close without a target"));
    }
    let kind = body.get_u8();
    Ok((kind, take_cstr(&mut body)?))
}
