//! An in-memory [`Store`] for tests: the same semantics as the SQLite store (each method one
//! all-or-nothing transaction, decisions only on pending requests, the same hash-chained audit
//! records), without a disk. Fire-and-forget writes are applied before the call returns.

use std::sync::{Mutex, PoisonError};

use tokio::sync::broadcast;
use tracing::warn;

use super::{
    Decided, GrantApproval, GrantChange, RequestKey, Result, SessionHistory, Store, StoreError,
    StoreFuture, VerifyReport,
    audit::{
        self, AuditKey, Event, GrantExpired, GrantRevoked, Head, RequestApproval, RequestApproved,
        RequestDenied, RequestExpired, RequestRef, Sealed, TaskRef, TaskStarted, Verifier,
        session_actor,
    },
    health::WriteHealth,
};
use crate::model::{
    Actor, ApiToken, Approval, AuditEvent, Grant, Request, RequestStatus, Session, SessionOutcome,
    StatementRecord, Task, Timestamp,
};

#[derive(Clone, Default)]
struct State {
    /// In filing order.
    requests: Vec<Request>,
    grants: Vec<Grant>,
    tasks: Vec<Task>,
    sessions: Vec<Session>,
    statements: Vec<StatementRecord>,
    audit: Vec<Sealed>,
    api_tokens: Vec<ApiToken>,
}

impl State {
    fn append(&mut self, key: &AuditKey, actor: &str, event: &Event) -> Result<()> {
        let head = self.audit.last().map(|r| (r.seq, r.hash.clone()));
        let sealed = audit::seal(key, head.as_ref(), Timestamp::now(), actor, event)?;
        self.audit.push(sealed);
        Ok(())
    }

    fn request_mut(&mut self, id: &str) -> Option<&mut Request> {
        self.requests.iter_mut().find(|q| q.id == id)
    }

    fn insert_request(&mut self, q: Request) -> Result<()> {
        if self.requests.iter().any(|r| r.id == q.id) {
            return Err(StoreError::Invalid(format!("request {} exists", q.id)));
        }
        self.requests.push(q);
        Ok(())
    }

    fn insert_grant(&mut self, g: Grant) -> Result<()> {
        if self.grants.iter().any(|x| x.id == g.id) {
            return Err(StoreError::Invalid(format!("grant {} exists", g.id)));
        }
        self.grants.push(g);
        Ok(())
    }

    fn insert_session(&mut self, s: Session) -> Result<()> {
        if self.sessions.iter().any(|x| x.id == s.id) {
            return Err(StoreError::Invalid(format!("session {} exists", s.id)));
        }
        self.sessions.push(s);
        Ok(())
    }

    /// Records a decision; only a pending request changes. Returns whether it did.
    fn decide(
        &mut self,
        id: &str,
        status: RequestStatus,
        by: Option<&Actor>,
        reason: Option<&str>,
        grant: Option<&str>,
    ) -> bool {
        match self.request_mut(id) {
            Some(q) if q.status == RequestStatus::Pending => {
                q.status = status;
                q.decided_by = by.cloned();
                q.decided_at = Some(Timestamp::now());
                q.decision_reason = reason.map(str::to_owned);
                q.grant = grant.map(str::to_owned);
                true
            }
            _ => false,
        }
    }

    fn request(&self, id: &str) -> Option<Request> {
        self.requests.iter().find(|q| q.id == id).cloned()
    }

    /// Pending requests, newest first.
    fn pending(&self) -> impl Iterator<Item = &Request> {
        let mut pending: Vec<&Request> = self
            .requests
            .iter()
            .rev()
            .filter(|q| q.status == RequestStatus::Pending)
            .collect();
        pending.sort_by_key(|q| std::cmp::Reverse(q.created_at));
        pending.into_iter()
    }

    fn expire(&mut self, key: &AuditKey, id: &str, why: &str, event: &Event) -> Result<()> {
        self.decide(id, RequestStatus::Expired, None, Some(why), None);
        self.append(key, "jitgated", event)
    }

    fn decided(&mut self, key: &AuditKey, id: &str, actor: &str, event: &Event) -> Result<Decided> {
        self.append(key, actor, event)?;
        Ok(self
            .request(id)
            .map_or(Decided::NotPending, |q| Decided::Done(Box::new(q))))
    }
}

/// The in-memory store. Its audit chain has a head checkpoint kept apart from the records, as
/// the SQLite store's `audit.head` file is, so cutting records off the end is found too.
pub struct MemoryStore {
    key: AuditKey,
    state: Mutex<State>,
    /// The head after the last commit.
    checkpoint: Mutex<Option<Head>>,
    changes: broadcast::Sender<GrantChange>,
    feed: broadcast::Sender<AuditEvent>,
    /// Never failed by the store itself; tests fail it to see the engine close the gate.
    pub writes: WriteHealth,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(AuditKey::new([0x6a; 32]))
    }
}

impl MemoryStore {
    pub fn new(key: AuditKey) -> Self {
        Self {
            key,
            state: Mutex::default(),
            checkpoint: Mutex::default(),
            changes: broadcast::channel(1024).0,
            feed: broadcast::channel(1024).0,
            writes: WriteHealth::default(),
        }
    }

    /// Runs `f` as one transaction: on error, nothing it did stays.
    fn transact<T>(&self, f: impl FnOnce(&mut State, &AuditKey) -> Result<T>) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut work = state.clone();
        let out = f(&mut work, &self.key)?;
        let before = state.audit.len();
        *state = work;
        for sealed in state.audit.iter().skip(before) {
            let _ = self.feed.send(sealed.to_event());
        }
        *self
            .checkpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            state.audit.last().map(|r| (r.seq, r.hash.clone()));
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Fire-and-forget: applied now; a failure is logged, as the SQLite store does.
    fn submit(&self, f: impl FnOnce(&mut State, &AuditKey) -> Result<()>) {
        if let Err(e) = self.transact(f) {
            warn!(error = %e, "background store write failed");
        }
    }

    fn changed(&self, change: GrantChange) {
        let _ = self.changes.send(change);
    }

    /// Edits the stored audit records behind the chain's back (for tamper-detection tests).
    pub fn tamper_audit(&self, f: impl FnOnce(&mut Vec<Sealed>)) {
        f(&mut self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .audit);
    }
}

fn ready<'a, T: Send + 'a>(result: Result<T>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

impl Store for MemoryStore {
    fn file_request(&self, request: Request, actor: String) -> StoreFuture<'_, ()> {
        ready(self.transact(|st, key| {
            let event = Event::filed(&request);
            st.insert_request(request)?;
            st.append(key, &actor, &event)
        }))
    }

    fn file_approved(&self, request: Request, grant: Grant, actor: String) -> StoreFuture<'_, ()> {
        let result = self.transact(|st, key| {
            let filed = Event::filed(&request);
            st.insert_request(request)?;
            st.insert_grant(grant.clone())?;
            st.append(key, &actor, &filed)?;
            st.append(
                key,
                &format!("policy {}", grant.policy),
                &Event::grant_issued(&grant),
            )
        });
        if result.is_ok() {
            self.changed(GrantChange::Issued(Box::new(grant)));
        }
        ready(result)
    }

    fn request(&self, id: String) -> StoreFuture<'_, Option<Request>> {
        ready(Ok(self.read(|st| st.request(&id))))
    }

    fn pending_request(&self, key: RequestKey) -> StoreFuture<'_, Option<Request>> {
        ready(Ok(self.read(|st| {
            st.pending()
                .find(|q| {
                    q.identity == key.identity
                        && q.resource == key.resource
                        && q.task == key.task
                        && q.access == key.access
                        && q.statement.is_none()
                })
                .cloned()
        })))
    }

    fn requests(
        &self,
        status: Option<RequestStatus>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Request>> {
        ready(Ok(self.read(|st| {
            let mut all: Vec<Request> = st
                .requests
                .iter()
                .rev()
                .filter(|q| status.is_none_or(|s| q.status == s))
                .cloned()
                .collect();
            all.sort_by_key(|q| std::cmp::Reverse(q.created_at));
            all.truncate(limit);
            all
        })))
    }

    fn count_pending(&self) -> StoreFuture<'_, usize> {
        ready(Ok(self.read(|st| st.pending().count())))
    }

    fn approve_request(&self, approval: GrantApproval) -> StoreFuture<'_, Decided> {
        let grant = approval.grant.clone();
        let result = self.transact(|st, key| {
            let GrantApproval {
                grant: g,
                approver,
                actor,
                ttl_secs,
            } = approval;
            if let Some(task) = &g.task
                && st
                    .tasks
                    .iter()
                    .any(|t| &t.id == task && t.ended_at.is_some())
            {
                return Ok(Decided::TaskEnded);
            }
            if !st.decide(
                &g.request,
                RequestStatus::Approved,
                Some(&approver),
                None,
                Some(&g.id),
            ) {
                return Ok(Decided::NotPending);
            }
            st.insert_grant(g.clone())?;
            st.append(
                key,
                &actor,
                &Event::RequestApproved(RequestApproved {
                    request: g.request.clone(),
                    grant: g.id.clone(),
                    ttl_secs,
                }),
            )?;
            st.decided(key, &g.request, &actor, &Event::grant_issued(&g))
        });
        if let Ok(Decided::Done(_)) = &result {
            self.changed(GrantChange::Issued(Box::new(grant)));
        }
        ready(result)
    }

    fn add_approval(
        &self,
        id: String,
        approval: Approval,
        needed: u32,
    ) -> StoreFuture<'_, Decided> {
        ready(self.transact(|st, key| {
            let Some(q) = st.requests.iter().find(|q| q.id == id) else {
                return Ok(Decided::NotPending);
            };
            let ended = q
                .task
                .as_ref()
                .is_some_and(|t| st.tasks.iter().any(|x| &x.id == t && x.ended_at.is_some()));
            if let Some(past) = super::admit_approval(q, &approval, needed, ended)? {
                return Ok(past);
            }
            let by = approval.by.clone();
            let Some(stored) = st.request_mut(&id) else {
                return Ok(Decided::NotPending);
            };
            stored.approvals.push(approval);
            let now = stored.clone();
            st.append(
                key,
                &by,
                &Event::RequestApproval(RequestApproval {
                    request: id.clone(),
                    count: u32::try_from(now.approvals.len()).unwrap_or(u32::MAX),
                    needed,
                }),
            )?;
            Ok(Decided::Done(Box::new(now)))
        }))
    }

    fn approve_statement(
        &self,
        id: String,
        approver: Actor,
        actor: String,
    ) -> StoreFuture<'_, Decided> {
        ready(self.transact(|st, key| {
            if !st.decide(&id, RequestStatus::Approved, Some(&approver), None, None) {
                return Ok(Decided::NotPending);
            }
            let event = Event::StatementApproved(RequestRef {
                request: id.clone(),
            });
            st.decided(key, &id, &actor, &event)
        }))
    }

    fn deny_request(
        &self,
        id: String,
        by: Actor,
        actor: String,
        reason: Option<String>,
    ) -> StoreFuture<'_, Decided> {
        ready(self.transact(|st, key| {
            if !st.decide(
                &id,
                RequestStatus::Denied,
                Some(&by),
                reason.as_deref(),
                None,
            ) {
                return Ok(Decided::NotPending);
            }
            let event = Event::RequestDenied(RequestDenied {
                request: id.clone(),
                reason,
            });
            st.decided(key, &id, &actor, &event)
        }))
    }

    fn expire_request(&self, id: String, why: String) -> StoreFuture<'_, bool> {
        ready(self.transact(|st, key| {
            if st
                .request(&id)
                .is_none_or(|q| q.status != RequestStatus::Pending)
            {
                return Ok(false);
            }
            let event = Event::RequestExpired(RequestExpired {
                request: id.clone(),
                task: None,
                why: Some(why.clone()),
            });
            st.expire(key, &id, &why, &event)?;
            Ok(true)
        }))
    }

    fn expire_task_requests(&self, task: String) -> StoreFuture<'_, Vec<String>> {
        ready(self.transact(|st, key| {
            let pending: Vec<String> = st
                .pending()
                .filter(|q| q.task.as_deref() == Some(task.as_str()))
                .map(|q| q.id.clone())
                .collect();
            let why = format!("task {task} ended");
            for id in &pending {
                let event = Event::RequestExpired(RequestExpired {
                    request: id.clone(),
                    task: Some(task.clone()),
                    why: None,
                });
                st.expire(key, id, &why, &event)?;
            }
            Ok(pending)
        }))
    }

    fn live_grants(&self, now: Timestamp) -> StoreFuture<'_, Vec<Grant>> {
        ready(Ok(self.read(|st| {
            let mut live: Vec<Grant> = st
                .grants
                .iter()
                .filter(|g| g.revoked_at.is_none() && g.expires_at > now)
                .cloned()
                .collect();
            live.sort_by_key(|g| g.created_at);
            live
        })))
    }

    fn grant(&self, id: String) -> StoreFuture<'_, Option<Grant>> {
        ready(Ok(
            self.read(|st| st.grants.iter().find(|g| g.id == id).cloned())
        ))
    }

    fn grants(&self, limit: usize) -> StoreFuture<'_, Vec<Grant>> {
        ready(Ok(self.read(|st| {
            let mut all: Vec<Grant> = st.grants.iter().rev().cloned().collect();
            all.sort_by_key(|g| std::cmp::Reverse(g.created_at));
            all.truncate(limit);
            all
        })))
    }

    fn revoke_grant(&self, id: String, actor: String, reason: String) -> StoreFuture<'_, ()> {
        let result = self.transact(|st, key| {
            let now = Timestamp::now();
            let Some(g) = st
                .grants
                .iter_mut()
                .find(|g| g.id == id && g.revoked_at.is_none() && g.expires_at > now)
            else {
                return Ok(false);
            };
            g.revoked_at = Some(now);
            g.revoked_by = Some(actor.clone());
            g.revoke_reason = Some(reason.clone());
            let event = Event::GrantRevoked(GrantRevoked {
                grant: id.clone(),
                reason,
            });
            st.append(key, &actor, &event).map(|()| true)
        });
        if let Ok(true) = result {
            self.changed(GrantChange::Revoked { grant: id });
        }
        ready(result.map(drop))
    }

    fn expire_grant(&self, id: String) -> StoreFuture<'_, ()> {
        let result = self.transact(|st, key| {
            if st
                .grants
                .iter()
                .any(|g| g.id == id && g.revoked_at.is_some())
            {
                return Ok(false);
            }
            st.append(
                key,
                "jitgated",
                &Event::GrantExpired(GrantExpired { grant: id.clone() }),
            )
            .map(|()| true)
        });
        if let Ok(true) = result {
            self.changed(GrantChange::Expired { grant: id });
        }
        ready(result.map(drop))
    }

    fn audit_feed(&self) -> broadcast::Receiver<AuditEvent> {
        self.feed.subscribe()
    }

    fn writes(&self) -> Option<WriteHealth> {
        Some(self.writes.clone())
    }

    fn grant_changes(&self) -> broadcast::Receiver<GrantChange> {
        self.changes.subscribe()
    }

    fn start_task(&self, task: Task, actor: String) -> StoreFuture<'_, ()> {
        ready(self.transact(|st, key| {
            if st.tasks.iter().any(|t| t.id == task.id) {
                return Err(StoreError::Invalid(format!("task {} exists", task.id)));
            }
            let event = Event::TaskStarted(TaskStarted {
                task: task.id.clone(),
                identity: task.identity.clone(),
                run_as_uid: task.run_as_uid,
                command: task.command.clone(),
                reason: task.reason.clone(),
            });
            st.tasks.push(task);
            st.append(key, &actor, &event)
        }))
    }

    fn end_task(&self, id: String) -> StoreFuture<'_, bool> {
        ready(self.transact(|st, key| {
            let Some(t) = st
                .tasks
                .iter_mut()
                .find(|t| t.id == id && t.ended_at.is_none())
            else {
                return Ok(false);
            };
            t.ended_at = Some(Timestamp::now());
            st.append(key, "jitgated", &Event::TaskEnded(TaskRef { task: id }))?;
            Ok(true)
        }))
    }

    fn running_tasks(&self) -> StoreFuture<'_, Vec<Task>> {
        ready(Ok(self.read(|st| {
            let mut running: Vec<Task> = st
                .tasks
                .iter()
                .filter(|t| t.ended_at.is_none())
                .cloned()
                .collect();
            running.sort_by_key(|t| t.started_at);
            running
        })))
    }

    fn session_opened(&self, session: Session) {
        self.submit(|st, key| {
            let event = Event::session_start(&session);
            let actor = session_actor(&session);
            st.insert_session(session)?;
            st.append(key, &actor, &event)
        });
    }

    fn session_refused(&self, session: Session) {
        self.submit(|st, key| {
            let event = Event::session_refused(&session);
            let actor = session_actor(&session);
            st.insert_session(session)?;
            st.append(key, &actor, &event)
        });
    }

    fn session_ended(&self, session: Session) {
        self.submit(|st, key| {
            if let Some(s) = st.sessions.iter_mut().find(|s| s.id == session.id) {
                s.ended_at = Some(session.ended_at.unwrap_or_else(Timestamp::now));
                s.bytes_up = session.bytes_up;
                s.bytes_down = session.bytes_down;
                s.outcome = session.outcome;
                s.detail.clone_from(&session.detail);
            }
            st.append(key, &session_actor(&session), &Event::session_end(&session))
        });
    }

    fn record_statements(&self, batch: Vec<StatementRecord>) {
        self.submit(|st, _| {
            for r in batch {
                // INSERT OR REPLACE on (session, seq).
                st.statements
                    .retain(|x| !(x.session == r.session && x.seq == r.seq));
                st.statements.push(r);
            }
            Ok(())
        });
    }

    fn sessions(&self, open_only: bool, limit: usize) -> StoreFuture<'_, Vec<Session>> {
        ready(Ok(self.read(|st| {
            let mut all: Vec<Session> = st
                .sessions
                .iter()
                .rev()
                .filter(|s| !open_only || s.outcome == SessionOutcome::Open)
                .cloned()
                .collect();
            all.sort_by_key(|s| std::cmp::Reverse(s.started_at));
            all.truncate(limit);
            all
        })))
    }

    fn session_history(&self, id: String) -> StoreFuture<'_, Option<SessionHistory>> {
        ready(Ok(self.read(|st| {
            let session = st.sessions.iter().find(|s| s.id == id)?.clone();
            let mut statements: Vec<StatementRecord> = st
                .statements
                .iter()
                .filter(|r| r.session == id)
                .cloned()
                .collect();
            statements.sort_by_key(|r| r.seq);
            let events = st
                .audit
                .iter()
                .filter(|r| r.mentions_session(&id))
                .map(Sealed::to_event)
                .collect();
            Some(SessionHistory {
                session,
                statements,
                events,
                unreadable: 0,
            })
        })))
    }

    fn close_orphan_sessions(&self) -> StoreFuture<'_, usize> {
        ready(self.transact(|st, _| {
            let now = Timestamp::now();
            let mut n = 0;
            for s in st
                .sessions
                .iter_mut()
                .filter(|s| s.outcome == SessionOutcome::Open)
            {
                s.outcome = SessionOutcome::Shutdown;
                s.ended_at = Some(s.ended_at.unwrap_or(now));
                s.detail = "the host agent stopped while the session was open".into();
                n += 1;
            }
            Ok(n)
        }))
    }

    fn prune_sessions(&self, cutoff: Timestamp) -> StoreFuture<'_, usize> {
        ready(self.transact(|st, _| {
            let old = |s: &Session| s.ended_at.is_some_and(|e| e < cutoff);
            let gone: Vec<String> = st
                .sessions
                .iter()
                .filter(|s| old(s))
                .map(|s| s.id.clone())
                .collect();
            st.statements.retain(|r| !gone.contains(&r.session));
            st.sessions.retain(|s| !old(s));
            Ok(gone.len())
        }))
    }

    fn append_audit(&self, actor: String, event: Event) -> StoreFuture<'_, ()> {
        ready(self.transact(|st, key| st.append(key, &actor, &event)))
    }

    fn submit_audit(&self, actor: String, event: Event) {
        self.submit(|st, key| st.append(key, &actor, &event));
    }

    fn audit_log(
        &self,
        since: Option<Timestamp>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<AuditEvent>> {
        let since = since.map_or(0, Timestamp::millis);
        ready(Ok(self.read(|st| {
            let mut newest: Vec<AuditEvent> = st
                .audit
                .iter()
                .rev()
                .filter(|r| r.at >= since)
                .take(limit)
                .map(Sealed::to_event)
                .collect();
            newest.reverse();
            newest
        })))
    }

    fn verify_audit(&self) -> StoreFuture<'_, VerifyReport> {
        let checkpoint = self
            .checkpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        ready(Ok(self.read(|st| {
            let mut records = st.audit.clone();
            records.sort_by_key(|r| r.seq);
            let mut verifier = Verifier::new(&self.key, checkpoint);
            records.iter().for_each(|r| verifier.check(r));
            verifier.finish()
        })))
    }

    fn insert_api_token(&self, token: ApiToken, actor: String) -> StoreFuture<'_, ()> {
        ready(self.transact(|st, key| {
            if st.api_tokens.iter().any(|t| t.id == token.id) {
                return Err(StoreError::Invalid(format!("token {} exists", token.id)));
            }
            let event = super::token_issued(&token);
            st.api_tokens.push(token);
            st.append(key, &actor, &event)
        }))
    }

    fn api_token(&self, id: String) -> StoreFuture<'_, Option<ApiToken>> {
        ready(Ok(self.read(|st| {
            st.api_tokens.iter().find(|t| t.id == id).cloned()
        })))
    }

    fn api_tokens(&self, user: Option<String>, limit: usize) -> StoreFuture<'_, Vec<ApiToken>> {
        ready(Ok(self.read(|st| {
            super::list_tokens(st.api_tokens.clone(), user.as_deref(), limit)
        })))
    }

    fn revoke_api_token(&self, id: String, actor: String) -> StoreFuture<'_, bool> {
        ready(self.transact(|st, key| {
            let Some(t) = st
                .api_tokens
                .iter_mut()
                .find(|t| t.id == id && t.revoked_at.is_none())
            else {
                return Ok(false);
            };
            t.revoked_at = Some(Timestamp::now());
            st.append(
                key,
                &actor,
                &Event::TokenRevoked(audit::TokenRef { token: id }),
            )?;
            Ok(true)
        }))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }
}
