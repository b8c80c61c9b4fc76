//! Who may do what through the control API: every authorization decision of the control
//! service, in one place, so that each front end (the Unix socket today, a web console and
//! webhooks later) enforces the same rules. Pure functions of the configuration, the
//! authenticated [`Caller`] and the record concerned; the service calls them after reading
//! the record and before asking the engine to act, so a missing or already decided record
//! is reported as such before any refusal.
//!
//! The roles:
//! * **root**: uid 0 outside the gate;
//! * **operators**: root, members of `socket_group` and the approvers of any policy: they
//!   read other people's records (the audit log, every session's statements);
//! * **approvers** of the policy covering a request decide it (never their own);
//! * **launchers** of an identity start its tasks and request or revoke for it;
//! * **workloads** (callers inside the gate) act for their own identity only; a process
//!   inside the gate that maps to no identity gets no rights;
//! * **people of the web console** (signed in with OpenID Connect) hold exactly the rights
//!   policy gives their `oidc:` and `oidc-group:` names: an approver named so decides and
//!   revokes like a unix approver; anyone else signed in may see nothing at all;
//! * **API tokens** (the console's HTTP API): the unix user who holds the token, with that
//!   user's rights now, minus every change when the token is read-only. Tokens are issued
//!   at the control socket only, by a unix user for themselves (root also for another user;
//!   never for root).

use super::service::ControlError;
use crate::{
    config::{Access, Config, Principal, UNSATISFIABLE_ACR},
    grants::{RequestSpec, policy},
    identity::Caller,
    model::{ApiToken, Grant, Request, Session},
    tasks::RunSpec,
};

/// Which records a caller may see in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Every,
    /// Only those of this identity (`None`: a process inside the gate with no identity).
    Own(Option<String>),
}

impl Scope {
    /// Whether a record of `identity` is in scope.
    pub fn covers(&self, identity: Option<&str>) -> bool {
        match self {
            Self::Every => true,
            Self::Own(own) => own.as_deref() == identity,
        }
    }
}

fn own_identity(caller: &Caller) -> Option<String> {
    caller.workload.as_ref().map(|w| w.identity.clone())
}

/// Root, a member of `socket_group`, or an approver of any policy.
pub fn is_operator(config: &Config, caller: &Caller) -> bool {
    if caller.is_root() {
        return true;
    }
    let mut operators: Vec<Principal> = config
        .policies
        .iter()
        .flat_map(|p| p.approvers.iter().cloned())
        .collect();
    if let Some(group) = &config.daemon.socket_group {
        operators.push(Principal::Group(group.clone()));
    }
    caller.is_named(&operators)
}

/// Other people's records (the audit log, every session's statements) are for operators.
/// The socket may be open to every local user (so that workloads can `jitgate request`);
/// that must not make every user a reader of what workloads did.
pub fn operators_only(config: &Config, caller: &Caller, what: &str) -> Result<(), ControlError> {
    if caller.is_workload() {
        return Err(ControlError::Forbidden(format!(
            "a gated workload cannot {what}"
        )));
    }
    own_or_operators(config, caller, what).map(drop)
}

/// Where a workload may read its own records: a workload gets its own, an operator every
/// record, anyone else nothing (see [`operators_only`]).
pub fn own_or_operators(
    config: &Config,
    caller: &Caller,
    what: &str,
) -> Result<Scope, ControlError> {
    if caller.is_workload() {
        return Ok(Scope::Own(own_identity(caller)));
    }
    if is_operator(config, caller) {
        return Ok(Scope::Every);
    }
    Err(ControlError::Forbidden(format!(
        "only root, members of the socket's group and approvers can {what}; {} is none of these",
        caller.user
    )))
}

pub fn root_only(caller: &Caller, what: &str) -> Result<(), ControlError> {
    if caller.is_root() {
        Ok(())
    } else {
        Err(ControlError::Forbidden(format!(
            "only root (outside the gate) can {what}"
        )))
    }
}

/// Whom a request is for, and from which task: a workload asks for itself; anyone else
/// names the identity, and must be root or one of its launchers.
pub fn requester(
    config: &Config,
    caller: &Caller,
    spec: &RequestSpec,
) -> Result<(String, Option<String>), ControlError> {
    if caller.gated_unattributed {
        return Err(ControlError::Forbidden(
            "this process runs inside the gate but belongs to no configured workload".into(),
        ));
    }
    may_change(caller, "request access")?;
    if let Some(w) = &caller.workload {
        if let Some(other) = spec.for_identity.as_deref().filter(|i| *i != w.identity) {
            return Err(ControlError::Forbidden(format!(
                "a workload can only request access for itself ({}), not for {other}",
                w.identity
            )));
        }
        return Ok((w.identity.clone(), w.task.clone()));
    }
    let Some(identity) = spec.for_identity.clone() else {
        return Err(ControlError::Invalid(
            "outside a workload, say which identity the access is for: --for IDENTITY".into(),
        ));
    };
    let Some(workload) = config.workload(&identity) else {
        return Err(ControlError::NotFound(format!(
            "`{identity}` is not a configured workload identity"
        )));
    };
    if !caller.is_root() && !caller.is_named(&workload.launchers) {
        return Err(ControlError::Forbidden(format!(
            "{} may not request access for {identity}: only root and its launchers may",
            caller.user
        )));
    }
    Ok((identity, spec.task.clone()))
}

/// Waiting on a request: a workload only on its own identity's.
pub fn may_wait(caller: &Caller, request: &Request) -> Result<(), ControlError> {
    if caller.is_workload() && own_identity(caller).as_ref() != Some(&request.identity) {
        return Err(ControlError::Forbidden(
            "a workload can only wait on its own requests".into(),
        ));
    }
    Ok(())
}

/// A held statement's text is for operators and its own workload.
pub fn reads_held_statements(config: &Config, caller: &Caller) -> bool {
    caller.is_workload() || is_operator(config, caller)
}

/// A change (approve, deny, revoke, request, launch) needs a caller who may write: a
/// read-only API token may not.
pub fn may_change(caller: &Caller, what: &str) -> Result<(), ControlError> {
    match &caller.token {
        Some(t) if t.read_only => Err(ControlError::Forbidden(format!(
            "API token {} is read-only: it cannot {what}; issue one without --read-only",
            t.id
        ))),
        _ => Ok(()),
    }
}

/// Deciding a request (approving it, or denying it as an approver): an approver of the
/// policy that covers it, outside the gate, who did not file it.
pub fn may_decide(config: &Config, caller: &Caller, request: &Request) -> Result<(), ControlError> {
    may_change(caller, "approve or deny requests")?;
    if caller.is_workload() {
        return Err(ControlError::Forbidden(
            "a gated workload cannot approve or deny requests".into(),
        ));
    }
    if caller.filed(&request.requested_by) {
        return Err(ControlError::Forbidden(format!(
            "{} filed request {} (as {}); self-approval is refused: another approver must decide it",
            caller.user, request.id, request.requested_by
        )));
    }
    let approvers =
        policy::approvers_for(config, &request.identity, &request.resource, request.access);
    if !caller.is_named(&approvers) {
        let list = approvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ControlError::Forbidden(format!(
            "{} is not an approver for {} {} access to {} (approvers: {})",
            caller.user,
            request.identity,
            request.access,
            request.resource,
            if list.is_empty() { "none" } else { &list }
        )));
    }
    Ok(())
}

/// Approving under a policy that asks for a recent or strong sign-in (`approval_max_age`,
/// `approval_acr`, from this host's policies and from those the request was filed under):
/// only a person of the web console whose sign-in shows it. A unix user at the CLI and an
/// API token cannot show either, so cannot approve such a request; denying needs no step-up
/// (it only ever closes). `now`: seconds since the epoch.
///
/// The age is measured without leeway, as the distance between `auth_time` and now either
/// way (a provider clock running behind or ahead shortens the window, never lengthens it):
/// keep the provider's and the agents' clocks in sync (NTP).
pub fn step_up_met(
    config: &Config,
    caller: &Caller,
    request: &Request,
    now: u64,
) -> Result<(), ControlError> {
    let mut need =
        policy::step_up_needed(config, &request.identity, &request.resource, request.access);
    if let Some(n) = &request.needs {
        need = need.and(&n.step_up);
    }
    if !need.is_required() {
        return Ok(());
    }
    let what = need.to_string();
    if need.acr.iter().any(|a| a == UNSATISFIABLE_ACR) {
        return Err(ControlError::Refused(format!(
            "request {}: the policies that cover it (here or where it was filed) accept no common sign-in method (approval_acr), so no sign-in can approve it: deny it, make the policies' approval_acr share a value, and file it again",
            request.id
        )));
    }
    let Some(person) = &caller.person else {
        return Err(ControlError::Forbidden(format!(
            "approving request {} needs a person signed in to the web console ({what}); {} cannot show that: approve it in the console",
            request.id, caller.user
        )));
    };
    // A provider clock ahead of ours counts against the window as one behind does: the
    // distance either way, so skew never lengthens it.
    let fresh = need
        .max_age_secs
        .is_none_or(|age| person.auth_time.is_some_and(|t| now.abs_diff(t) <= age));
    let strong = need.acr.is_empty()
        || person
            .acr
            .as_ref()
            .is_some_and(|a| need.acr.iter().any(|n| n == a));
    if fresh && strong {
        return Ok(());
    }
    let why = match (fresh, person.auth_time, &person.acr) {
        (false, None, _) => "your sign-in did not say when you authenticated".to_owned(),
        (false, Some(t), _) => format!("you authenticated {} s ago", now.saturating_sub(t)),
        (true, _, Some(acr)) => format!("you signed in with `{acr}`"),
        (true, _, None) => "your sign-in did not say how you authenticated".to_owned(),
    };
    Err(ControlError::SignInAgain {
        message: format!(
            "approving request {} needs {what}; {why}: sign in again, then approve",
            request.id
        ),
        step_up: need,
    })
}

/// Denying a request: its approvers (see [`may_decide`]), and whoever filed it (same user,
/// same workload, and from inside a task the same task: a sibling task of the same identity
/// does not withdraw another's request), withdrawing it.
pub fn may_deny(config: &Config, caller: &Caller, request: &Request) -> Result<(), ControlError> {
    may_change(caller, "deny requests")?;
    let by = &request.requested_by;
    let own = caller.uid == by.uid
        && caller.workload.as_ref().map(|w| &w.identity) == by.identity.as_ref()
        && caller.workload.as_ref().and_then(|w| w.task.as_ref()) == by.task.as_ref();
    if own {
        return Ok(());
    }
    may_decide(config, caller, request)
}

/// Listing grants: a workload sees its own identity's, a local user every grant, a person of
/// the web console every grant when policy names them an approver (whoever can sign in at the
/// provider is not thereby entitled to see what this host's workloads may reach).
pub fn grants_scope(config: &Config, caller: &Caller) -> Result<Scope, ControlError> {
    if caller.is_workload() {
        Ok(Scope::Own(own_identity(caller)))
    } else if caller.person.is_some() {
        own_or_operators(config, caller, "list grants")
    } else {
        Ok(Scope::Every)
    }
}

/// Revoking a grant: a workload its own (and, for a task's grant, only from that task);
/// outside the gate root, the approvers of the policy covering it and its identity's
/// launchers.
pub fn may_revoke(config: &Config, caller: &Caller, grant: &Grant) -> Result<(), ControlError> {
    may_change(caller, "revoke grants")?;
    if caller.gated_unattributed {
        return Err(ControlError::Forbidden(
            "this process may not revoke grants".into(),
        ));
    }
    if let Some(w) = &caller.workload {
        let own = w.identity == grant.identity
            && grant
                .task
                .as_ref()
                .is_none_or(|t| Some(t) == w.task.as_ref());
        if !own {
            return Err(ControlError::Forbidden(
                "a workload may only revoke its own grants".into(),
            ));
        }
    } else if !caller.is_root() {
        let approvers =
            policy::approvers_for(config, &grant.identity, &grant.resource, grant.access);
        let launchers = config
            .workload(&grant.identity)
            .map(|w| w.launchers.clone())
            .unwrap_or_default();
        if !caller.is_named(&approvers) && !caller.is_named(&launchers) {
            return Err(ControlError::Forbidden(format!(
                "{} may not revoke grant {}: only root, its approvers and the identity's launchers may",
                caller.user, grant.id
            )));
        }
    }
    Ok(())
}

/// Listing sessions: operators (every session a person of the console may see is then
/// filtered by [`sees_session`]), and a workload its own.
pub fn sessions_scope(config: &Config, caller: &Caller) -> Result<Scope, ControlError> {
    own_or_operators(config, caller, "list sessions")
}

/// Whether `caller`, already in `scope` (see [`sessions_scope`]), sees `session`. A person of
/// the web console sees a session only when policy names them an approver of what it rode on
/// (its identity, resource and access; any access level when the session never reached a
/// grant): an approver of one team's database does not thereby read every statement another
/// team ran. A session that names no identity or resource (refused before it was attributed)
/// is for local operators only.
pub fn sees_session(config: &Config, caller: &Caller, scope: &Scope, session: &Session) -> bool {
    if !scope.covers(session.identity.as_deref()) {
        return false;
    }
    if caller.person.is_none() {
        return true;
    }
    let (Some(identity), Some(resource)) = (&session.identity, &session.resource) else {
        return false;
    };
    let levels = match session.access {
        Some(access) => vec![access],
        None => vec![Access::Read, Access::Write, Access::Admin],
    };
    levels
        .into_iter()
        .any(|access| caller.is_named(&policy::approvers_for(config, identity, resource, access)))
}

/// Reading one session with its statements (and its recorded exec streams): operators, a
/// person of the console as [`sees_session`] says, and a workload its own.
pub fn may_read_session(
    config: &Config,
    caller: &Caller,
    session: &Session,
) -> Result<(), ControlError> {
    let scope = own_or_operators(config, caller, "read a session")?;
    if !sees_session(config, caller, &scope, session) {
        return Err(ControlError::Forbidden(if caller.is_workload() {
            "a workload can only see its own sessions".into()
        } else {
            format!(
                "{} is not an approver of what session {} used, so cannot read it",
                caller.user, session.id
            )
        }));
    }
    Ok(())
}

/// The host's status: anyone local may ask (`jitgate status`); a person of the web console
/// only when policy names them an approver somewhere, like the rest of what the console shows.
pub fn may_read_status(config: &Config, caller: &Caller) -> Result<(), ControlError> {
    if caller.person.is_some() {
        own_or_operators(config, caller, "see the host's status")?;
    }
    Ok(())
}

/// Launching a task: one of the identity's launchers (root included only when listed),
/// outside the gate, as themselves (only root runs it as someone else), and never as root
/// without saying so.
pub fn may_launch(config: &Config, caller: &Caller, spec: &RunSpec) -> Result<(), ControlError> {
    if caller.is_workload() {
        return Err(ControlError::Forbidden(
            "a gated workload cannot launch tasks".into(),
        ));
    }
    if caller.token.is_some() {
        return Err(ControlError::Forbidden(
            "an API token cannot launch tasks".into(),
        ));
    }
    let Some(workload) = config.workload(&spec.identity) else {
        let known: Vec<&str> = config
            .workloads
            .iter()
            .map(|w| w.identity.as_str())
            .collect();
        return Err(ControlError::NotFound(format!(
            "`{}` is not a configured workload identity (known: {})",
            spec.identity,
            if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            }
        )));
    };
    if caller.person.is_some() || !caller.is_named(&workload.launchers) {
        return Err(ControlError::Forbidden(format!(
            "{} may not launch {}: add the user (or a group of theirs) to its launchers",
            caller.user, spec.identity
        )));
    }
    if caller.uid != 0 && spec.run_as_uid != caller.uid {
        return Err(ControlError::Forbidden(
            "only root can run a workload as another user".into(),
        ));
    }
    if spec.run_as_uid == 0 && !spec.allow_root {
        return Err(ControlError::Forbidden(
            "refusing to run a workload as root: root can move itself out of its cgroup and so walk around the gate. Run it as an ordinary user (--user USER), or pass --allow-root if you accept that".into(),
        ));
    }
    Ok(())
}

/// Only a unix user at the control socket manages tokens: not a workload (its identity's
/// rights must not leave the gate), not a person of the console, not a token (a leaked
/// token must not mint fresh ones).
fn token_manager(caller: &Caller, what: &str) -> Result<(), ControlError> {
    if caller.is_workload() || caller.person.is_some() || caller.token.is_some() {
        return Err(ControlError::Forbidden(format!(
            "only a unix user outside the gate, at the control socket (`jitgate token`), can {what}"
        )));
    }
    Ok(())
}

/// Issuing an API token: a unix user for themselves; root also for another user (a service
/// account of a script, which cannot run `jitgate` itself). Never a token acting as root:
/// root's rights are not to travel as a bearer secret; issue it for a named user who is an
/// approver. Returns the user the token acts as.
pub fn may_issue_token(caller: &Caller, for_user: Option<&str>) -> Result<String, ControlError> {
    token_manager(caller, "issue API tokens")?;
    let user = match for_user {
        Some(u) if u != caller.user => {
            if !caller.is_root() {
                return Err(ControlError::Forbidden(format!(
                    "{} may issue tokens for themselves only; only root issues them for another user",
                    caller.user
                )));
            }
            u.to_owned()
        }
        _ => caller.user.clone(),
    };
    match crate::identity::uid_of(&user) {
        None => Err(ControlError::NotFound(format!(
            "no unix user {user} on this host"
        ))),
        Some(0) => Err(ControlError::Forbidden(
            "no API token acts as root: issue it for (or as) the named user who approves, with --user USER".into(),
        )),
        Some(_) => Ok(user),
    }
}

/// Whose tokens a caller lists: root every token (`None`), a user their own.
pub fn tokens_scope(caller: &Caller) -> Result<Option<String>, ControlError> {
    token_manager(caller, "list API tokens")?;
    Ok((!caller.is_root()).then(|| caller.user.clone()))
}

/// Revoking a token: root, and the user it acts as.
pub fn may_manage_token(caller: &Caller, token: &ApiToken) -> Result<(), ControlError> {
    token_manager(caller, "revoke API tokens")?;
    if caller.is_root() || caller.user == token.user {
        Ok(())
    } else {
        Err(ControlError::Forbidden(format!(
            "API token {} acts as {}: only they and root may revoke it",
            token.id, token.user
        )))
    }
}
