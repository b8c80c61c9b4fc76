//! The per-statement decision: access level, read-only mode, then guardrails (the resource's
//! own, in order, then the built-in ones). The first guardrail that matches decides.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::config::{GuardAction, Guardrail, PostgresResource};
use super::{
    sql::{Hazard, Statement},
    wire::PgError,
};
use crate::{config::Access, inspect::glob::glob};

/// What happens to a query string.
#[derive(Clone, Debug)]
pub enum Verdict {
    Allow,
    /// Refused; the error goes to the client, the rule to the record.
    Deny {
        rule: String,
        error: PgError,
    },
    /// Held until an approver decides.
    Approve {
        rule: String,
        reason: String,
    },
}

/// Who is asking, with what grant, on which resource.
pub struct Context<'a> {
    pub identity: &'a str,
    pub resource: &'a str,
    pub access: Access,
    pub pg: &'a PostgresResource,
    /// Statements prepared with SQL `PREPARE` in this session, by name.
    pub prepared: &'a HashMap<String, Statement>,
    /// Column masking applies to this session: statements that can carry values out some
    /// other way than result rows are refused.
    pub masked: bool,
    /// Functions of the statement that may act beyond a read-only transaction, per the
    /// catalog ([`super::effects`]); only looked up for read sessions.
    pub acting: &'a BTreeSet<String>,
    /// Functions of the statement whose stored code closes a cursor by name, per the
    /// catalog ([`crate::postgres::sql::body_closes_cursors`]); only looked up under masking.
    pub closing: &'a BTreeSet<String>,
}

/// Functions that read or write the database host's files.
const FILE_FUNCTIONS: &[&str] = &[
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_*",
    "pg_stat_file",
    "pg_file_*",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
];

/// Relations and functions that show other sessions' statements. Every session of a grant's
/// access level logs in as the same upstream role, for which PostgreSQL shows the full text
/// (literals included) of every other such session, whoever's it is.
const OTHER_SESSIONS_ACTIVITY: &[&str] = &[
    "pg_stat_activity",
    "pg_stat_get_activity",
    "pg_stat_get_backend_activity",
    "pg_stat_statements",
    "pg_stat_statements_info",
    "pg_stat_statements_reset",
];

/// Functions that signal a backend, which may be another identity's (same upstream role).
/// A session cancels its own statement with the protocol's CancelRequest (psql's Ctrl-C),
/// which the gate maps to that session's server alone.
const SIGNAL_FUNCTIONS: &[&str] = &["pg_cancel_backend", "pg_terminate_backend"];

/// The last part of a possibly schema-qualified name.
fn plain(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The built-in guardrails, applied after the configured ones.
fn builtin(s: &Statement) -> Option<(&'static str, GuardAction, String)> {
    if let Some(name) = s
        .tables
        .iter()
        .chain(&s.functions)
        .map(|n| plain(n))
        .find(|n| OTHER_SESSIONS_ACTIVITY.contains(n))
    {
        return Some((
            "builtin: other-sessions",
            GuardAction::Deny,
            format!(
                "{name} shows other sessions' statements, other identities' among them (every gated session of an access level shares one upstream role)"
            ),
        ));
    }
    if let Some(name) = s
        .functions
        .iter()
        .map(|n| plain(n))
        .find(|n| SIGNAL_FUNCTIONS.contains(n))
    {
        return Some((
            "builtin: other-sessions",
            GuardAction::Deny,
            format!(
                "{name}() can signal another identity's session (every gated session of an access level shares one upstream role); cancel your own statement with the client's cancel (psql: Ctrl-C)"
            ),
        ));
    }
    if s.hazards.contains(&Hazard::CopyProgram) {
        return Some((
            "builtin: copy-program",
            GuardAction::Deny,
            Hazard::CopyProgram.describe(),
        ));
    }
    let file_function = s.functions.iter().find(|f| {
        FILE_FUNCTIONS
            .iter()
            .any(|g| glob(g, f.rsplit('.').next().unwrap_or(f)))
    });
    if s.hazards.contains(&Hazard::ServerFile) || file_function.is_some() {
        let what = file_function.map_or_else(
            || Hazard::ServerFile.describe(),
            |f| format!("{f}() {}", Hazard::ServerFile.describe()),
        );
        return Some(("builtin: server-files", GuardAction::Deny, what));
    }
    if s.hazards.contains(&Hazard::ForeignConnection) {
        return Some((
            "builtin: foreign-connections",
            GuardAction::Deny,
            Hazard::ForeignConnection.describe(),
        ));
    }
    if s.hazards.contains(&Hazard::DynamicSql) {
        return Some((
            "builtin: dynamic-sql",
            GuardAction::Deny,
            Hazard::DynamicSql.describe(),
        ));
    }
    if let Some(h) = s
        .hazards
        .iter()
        .find(|h| matches!(h, Hazard::OpaqueBody(_)))
    {
        return Some((
            "builtin: opaque-function-body",
            GuardAction::Approve,
            h.describe(),
        ));
    }
    if s.write_without_where {
        return Some((
            "builtin: write-without-where",
            GuardAction::Approve,
            "UPDATE, DELETE or MERGE without a condition that can exclude a row (none, or one always true) touches every row".into(),
        ));
    }
    None
}

fn matches(rule: &Guardrail, identity: &str, s: &Statement) -> bool {
    if !rule.identities.is_empty() && !rule.identities.iter().any(|i| i == identity) {
        return false;
    }
    if !rule.kinds.is_empty() && !rule.kinds.iter().any(|k| s.kinds.contains(k.as_str())) {
        return false;
    }
    if !rule.tables.is_empty()
        && !s
            .tables
            .iter()
            .any(|t| rule.tables.iter().any(|g| glob(g, t)))
    {
        return false;
    }
    if !rule.functions.is_empty()
        && !s
            .functions
            .iter()
            .any(|f| rule.functions.iter().any(|g| glob(g, f)))
    {
        return false;
    }
    if rule.without_where && !s.write_without_where {
        return false;
    }
    true
}

fn describe(rule: &Guardrail) -> String {
    let mut parts = Vec::new();
    if !rule.kinds.is_empty() {
        parts.push(format!("kinds {}", rule.kinds.join(", ")));
    }
    if !rule.tables.is_empty() {
        parts.push(format!("tables {}", rule.tables.join(", ")));
    }
    if !rule.functions.is_empty() {
        parts.push(format!("functions {}", rule.functions.join(", ")));
    }
    if rule.without_where {
        parts.push("without WHERE".into());
    }
    parts.join("; ")
}

/// Judges one statement (already resolved through `EXECUTE`).
fn judge_one(ctx: &Context<'_>, s: &Statement) -> Verdict {
    if let Some(name) = &s.executes {
        return match ctx.prepared.get(name) {
            Some(prepared) => judge_one(ctx, prepared),
            None => Verdict::Deny {
                rule: "unknown prepared statement".into(),
                error: PgError::error(
                    "26000",
                    format!(
                        "prepared statement \"{name}\" does not exist (jitgate checks what EXECUTE runs, and has not seen it prepared)"
                    ),
                ),
            },
        };
    }
    match s.sets_parsing.as_deref() {
        None => {}
        Some("client_encoding") => {
            return Verdict::Deny {
                rule: "client encoding".into(),
                error: PgError::error(
                    "0A000",
                    "jitgate: only the UTF8 and SQL_ASCII client encodings are supported on a gated connection",
                )
                .hint("convert on the client side; other encodings can hide statements from the gate"),
            };
        }
        Some(setting) => {
            return Verdict::Deny {
                rule: "string literal mode".into(),
                error: PgError::error(
                    "0A000",
                    format!("jitgate: {setting} cannot be changed on a gated connection"),
                )
                .hint(
                    "write escapes as E'...' strings instead; statements sent behind such a change would be checked in one mode and run in the other",
                ),
            };
        }
    }
    if s.access.0 > ctx.access {
        let need = s.access.0;
        return Verdict::Deny {
            rule: format!("access: {need} needed"),
            error: PgError::error(
                "42501",
                format!(
                    "jitgate: this statement needs {need} access to {}; the session's grant is {}",
                    ctx.resource, ctx.access
                ),
            )
            .detail(format!(
                "statement kinds: {}",
                s.kinds.iter().copied().collect::<Vec<_>>().join(", ")
            ))
            .hint(format!("jitgate request {} --access {need}", ctx.resource)),
        };
    }
    if ctx.access == Access::Read
        && let Some(why) = &s.escapes_read_only
    {
        return Verdict::Deny {
            rule: "read-only session".into(),
            error: PgError::error(
                "25006",
                format!(
                    "jitgate: {why}; this session has read access to {}",
                    ctx.resource
                ),
            )
            .hint(format!("jitgate request {} --access write", ctx.resource)),
        };
    }
    if ctx.masked
        && let Some(why) = &s.side_channel
    {
        return Verdict::Deny {
            rule: "masking side channel".into(),
            error: PgError::error(
                "42501",
                format!(
                    "jitgate: {why}, which column masking cannot follow; not run while masking applies to {}",
                    ctx.resource
                ),
            )
            .hint("select the values instead, so that masking applies; or ask the jitgate operator for a grant exempt from masking"),
        };
    }
    if ctx.masked
        && let Some(function) = s
            .functions
            .iter()
            .chain(&s.operators)
            .find(|f| ctx.closing.contains(*f))
    {
        return Verdict::Deny {
            rule: "masking side channel".into(),
            error: PgError::error(
                "42501",
                format!(
                    "jitgate: {function}() may close a cursor by name (its code, or code it calls, runs CLOSE or SQL built at run time, or cannot be read): it could close one this session declared for other code to open another query under its name, whose rows masking would not follow; not run while masking applies to {}",
                    ctx.resource
                ),
            )
            .hint("call it from a session exempt from masking (ask the jitgate operator); the gate cannot tell which cursors a function closes, so any CLOSE by name counts"),
        };
    }
    if ctx.access == Access::Read
        && let Some(function) = s.functions.iter().find(|f| ctx.acting.contains(*f))
    {
        return Verdict::Deny {
            rule: "read-only session: acting function".into(),
            error: PgError::error(
                "25006",
                format!(
                    "jitgate: {function}() is volatile code the server does not confine, which can act beyond a read-only transaction; this session has read access to {}",
                    ctx.resource
                ),
            )
            .hint(format!("jitgate request {} --access write", ctx.resource)),
        };
    }
    let configured = ctx
        .pg
        .guardrails
        .iter()
        .find(|rule| matches(rule, ctx.identity, s))
        .map(|rule| (rule.name.clone(), rule.action, describe(rule)));
    let builtin = || {
        ctx.pg
            .default_guardrails
            .then(|| builtin(s).map(|(n, a, why)| (n.to_owned(), a, why)))
            .flatten()
    };
    // A configured `allow` releases what the built-ins would hold, never what they deny
    // (turning those off takes `default_guardrails = false`, a visible decision).
    let decided = match configured {
        Some((_, GuardAction::Allow, _)) => {
            builtin().filter(|(_, action, _)| *action == GuardAction::Deny)
        }
        Some(c) => Some(c),
        None => builtin(),
    };
    match decided {
        None | Some((_, GuardAction::Allow, _)) => Verdict::Allow,
        Some((rule, GuardAction::Deny, why)) => Verdict::Deny {
            error: PgError::error(
                "42501",
                format!("jitgate: statement refused by guardrail \"{rule}\": {why}"),
            )
            .hint("this guardrail refuses the statement whatever the grant; ask the resource's owners to change the jitgate configuration if it must run"),
            rule,
        },
        Some((rule, GuardAction::Approve, why)) => Verdict::Approve { rule, reason: why },
    }
}

/// Judges a whole query string: any refusal refuses all of it (nothing runs), else any hold
/// holds all of it.
pub fn judge(ctx: &Context<'_>, statements: &[Statement]) -> Verdict {
    let mut hold = None;
    // An EXECUTE is judged as the statement it runs, which the string cannot change: each
    // name once (`EXECUTE p;` a hundred thousand times must not judge a large `p` as often).
    let mut executed = HashSet::new();
    for s in statements {
        if let Some(name) = &s.executes
            && !executed.insert(name.as_str())
        {
            continue;
        }
        match judge_one(ctx, s) {
            Verdict::Allow => {}
            deny @ Verdict::Deny { .. } => return deny,
            approve @ Verdict::Approve { .. } => {
                hold.get_or_insert(approve);
            }
        }
    }
    hold.unwrap_or(Verdict::Allow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::sql::{ParseMode, analyze};

    fn pg(guardrails: Vec<Guardrail>) -> PostgresResource {
        PostgresResource::with_rules(vec![], guardrails)
    }

    fn verdict(access: Access, pg: &PostgresResource, sql: &str) -> Verdict {
        let prepared = HashMap::new();
        let ctx = Context {
            identity: "bot",
            resource: "db",
            access,
            pg,
            prepared: &prepared,
            masked: false,
            acting: &BTreeSet::new(),
            closing: &BTreeSet::new(),
        };
        judge(&ctx, &analyze(sql, ParseMode::default()).unwrap())
    }

    fn code(v: &Verdict) -> Option<&'static str> {
        match v {
            Verdict::Deny { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// Each prepared statement an EXECUTE names is judged once per string; what it runs
    /// decides, however often and in whatever order it is named.
    #[test]
    fn an_execute_is_judged_as_what_it_runs_each_name_once() {
        let pg = pg(vec![]);
        let mode = ParseMode::default();
        let mut prepared = HashMap::new();
        prepared.insert("r".to_owned(), analyze("SELECT 1", mode).unwrap().remove(0));
        prepared.insert(
            "w".to_owned(),
            analyze("DELETE FROM users WHERE id = 1", mode)
                .unwrap()
                .remove(0),
        );
        let (acting, closing) = (BTreeSet::new(), BTreeSet::new());
        let ctx = |access| Context {
            identity: "bot",
            resource: "db",
            access,
            pg: &pg,
            prepared: &prepared,
            masked: false,
            acting: &acting,
            closing: &closing,
        };
        let judged = |access, sql: &str| judge(&ctx(access), &analyze(sql, mode).unwrap());
        let many_r = "EXECUTE r; ".repeat(1000);
        assert!(matches!(judged(Access::Read, &many_r), Verdict::Allow));
        for sql in [
            format!("{many_r}EXECUTE w"),
            format!("EXECUTE w; {many_r}"),
            format!("{many_r}EXECUTE w; EXECUTE w"),
            format!("{many_r}EXECUTE nosuch"),
        ] {
            assert!(
                matches!(judged(Access::Read, &sql), Verdict::Deny { .. }),
                "{sql:.60}"
            );
        }
        assert!(matches!(
            judged(Access::Write, &format!("{many_r}EXECUTE w")),
            Verdict::Allow
        ));
    }

    #[test]
    fn other_sessions_are_neither_seen_nor_signalled_under_any_grant() {
        let p = pg(vec![]);
        for access in [Access::Read, Access::Write, Access::Admin] {
            for sql in [
                "SELECT query FROM pg_stat_activity",
                "SELECT * FROM pg_catalog.pg_stat_activity a JOIN users u ON true",
                "SELECT (pg_stat_get_activity(NULL)).query",
                "SELECT pg_stat_get_backend_activity(1)",
                "SELECT query FROM pg_stat_statements",
                "SELECT pg_terminate_backend(4242)",
                "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_locks",
            ] {
                assert_eq!(
                    code(&verdict(access, &p, sql)),
                    Some("42501"),
                    "{access}: {sql}"
                );
            }
        }
        assert!(matches!(
            verdict(Access::Read, &p, "SELECT pg_backend_pid()"),
            Verdict::Allow
        ));
    }

    #[test]
    fn acting_functions_are_refused_on_read_sessions_only() {
        let p = pg(vec![]);
        let prepared = HashMap::new();
        let acting: BTreeSet<String> = ["lo_create".to_owned()].into();
        let judged = |access, sql: &str| {
            let ctx = Context {
                identity: "bot",
                resource: "db",
                access,
                pg: &p,
                prepared: &prepared,
                masked: false,
                acting: &acting,
                closing: &BTreeSet::new(),
            };
            judge(&ctx, &analyze(sql, ParseMode::default()).unwrap())
        };
        for sql in [
            "SELECT lo_create(0)",
            "SELECT pg_catalog.lo_create(0)",
            "SELECT 1 WHERE lo_create(0) > 0",
        ] {
            assert_eq!(code(&judged(Access::Read, sql)), Some("25006"), "{sql}");
            assert!(
                matches!(judged(Access::Write, sql), Verdict::Allow),
                "{sql}"
            );
        }
        assert!(matches!(
            judged(Access::Read, "SELECT upper('a')"),
            Verdict::Allow
        ));
    }

    /// A function whose stored code closes a cursor by name is refused under masking only,
    /// at any access level and wherever the statement calls it.
    #[test]
    fn functions_that_close_cursors_are_refused_under_masking_only() {
        let p = pg(vec![]);
        let prepared = HashMap::new();
        let closing: BTreeSet<String> = ["reopen".to_owned()].into();
        let judged = |access, masked, sql: &str| {
            let ctx = Context {
                identity: "bot",
                resource: "db",
                access,
                pg: &p,
                prepared: &prepared,
                masked,
                acting: &BTreeSet::new(),
                closing: &closing,
            };
            judge(&ctx, &analyze(sql, ParseMode::default()).unwrap())
        };
        for sql in [
            "SELECT reopen('c')",
            "SELECT public.reopen('c')",
            "SELECT 1 WHERE reopen('c') IS NOT NULL",
            "SELECT 1; SELECT upper(reopen('c'))",
        ] {
            for access in [Access::Read, Access::Admin] {
                let v = judged(access, true, sql);
                assert_eq!(code(&v), Some("42501"), "{sql}");
                if let Verdict::Deny { error, .. } = &v {
                    assert!(
                        error.message.contains("reopen() may close a cursor"),
                        "{error:?}"
                    );
                }
                assert!(
                    matches!(judged(access, false, sql), Verdict::Allow),
                    "{sql}"
                );
            }
        }
        // A procedure is called as a function is.
        for sql in ["CALL reopen('c')", "CALL public.\"ReOpen\"('c')"] {
            assert_eq!(
                code(&judged(Access::Write, true, sql)),
                Some("42501"),
                "{sql}"
            );
            assert!(
                matches!(judged(Access::Write, false, sql), Verdict::Allow),
                "{sql}"
            );
        }
        assert!(matches!(
            judged(Access::Read, true, "SELECT upper('a')"),
            Verdict::Allow
        ));
    }

    #[test]
    fn access_levels_mean_something() {
        let p = pg(vec![]);
        assert!(matches!(
            verdict(Access::Read, &p, "SELECT 1"),
            Verdict::Allow
        ));
        let v = verdict(Access::Read, &p, "INSERT INTO t VALUES (1)");
        assert_eq!(code(&v), Some("42501"));
        if let Verdict::Deny { error, .. } = &v {
            assert_eq!(
                error.hint.as_deref(),
                Some("jitgate request db --access write")
            );
        }
        assert!(matches!(
            verdict(Access::Write, &p, "INSERT INTO t VALUES (1)"),
            Verdict::Allow
        ));
        assert_eq!(
            code(&verdict(Access::Write, &p, "DROP TABLE t")),
            Some("42501")
        );
        assert!(matches!(
            verdict(Access::Admin, &p, "DROP TABLE t"),
            Verdict::Allow
        ));
        assert_eq!(
            code(&verdict(Access::Read, &p, "BEGIN READ WRITE")),
            Some("25006")
        );
        assert_eq!(
            code(&verdict(Access::Read, &p, "SET ROLE postgres")),
            Some("42501")
        );
        assert!(matches!(
            verdict(Access::Write, &p, "BEGIN READ WRITE"),
            Verdict::Allow
        ));
        // One refused statement refuses the whole string.
        assert_eq!(
            code(&verdict(
                Access::Read,
                &p,
                "SELECT 1; DELETE FROM t WHERE a=1"
            )),
            Some("42501")
        );
    }

    #[test]
    fn default_guardrails() {
        let p = pg(vec![]);
        for sql in [
            "COPY t TO PROGRAM 'cat /etc/passwd'",
            "SELECT pg_read_file('/etc/passwd')",
            "UPDATE t SET a = pg_read_file('x') WHERE id = 1",
            "SELECT lo_import('/etc/passwd')",
            "SELECT lo_export(1, '/tmp/x')",
            "SELECT dblink_connect('host=evil')",
            "COPY t FROM '/etc/passwd'",
        ] {
            assert_eq!(
                code(&verdict(Access::Admin, &p, sql)),
                Some("42501"),
                "{sql}"
            );
        }
        assert!(matches!(
            verdict(Access::Write, &p, "DELETE FROM t"),
            Verdict::Approve { .. }
        ));
        assert!(matches!(
            verdict(Access::Write, &p, "UPDATE t SET a = 1"),
            Verdict::Approve { .. }
        ));
        assert!(matches!(
            verdict(Access::Write, &p, "DELETE FROM t WHERE id = 1"),
            Verdict::Allow
        ));
        let mut off = pg(vec![]);
        off.default_guardrails = false;
        assert!(matches!(
            verdict(Access::Write, &off, "DELETE FROM t"),
            Verdict::Allow
        ));
    }

    #[test]
    fn configured_guardrails_come_first() {
        let rule = |action, tables: &[&str]| Guardrail {
            name: "payroll".into(),
            kinds: vec![],
            tables: tables.iter().map(|s| s.to_string()).collect(),
            functions: vec![],
            without_where: false,
            identities: vec![],
            action,
        };
        let p = pg(vec![rule(GuardAction::Deny, &["payroll*"])]);
        assert_eq!(
            code(&verdict(Access::Read, &p, "SELECT * FROM payroll_2026")),
            Some("42501")
        );
        assert!(matches!(
            verdict(Access::Read, &p, "SELECT * FROM orders"),
            Verdict::Allow
        ));
        let p = pg(vec![rule(GuardAction::Allow, &["scratch"])]);
        assert!(matches!(
            verdict(Access::Write, &p, "DELETE FROM scratch"),
            Verdict::Allow
        ));
        // ... but an allow never lifts a built-in deny.
        assert_eq!(
            code(&verdict(
                Access::Write,
                &p,
                "SELECT pg_read_file('/etc/passwd') FROM scratch"
            )),
            Some("42501")
        );
        let mut other = rule(GuardAction::Deny, &["orders"]);
        other.identities = vec!["someone-else".into()];
        let p = pg(vec![other]);
        assert!(matches!(
            verdict(Access::Read, &p, "SELECT * FROM orders"),
            Verdict::Allow
        ));
    }
}
