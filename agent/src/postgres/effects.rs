//! What a function does besides returning a value, for sessions with `read` access.
//!
//! A read session runs in a read-only transaction, and PostgreSQL stops every SQL write in it,
//! inside functions too. It does not stop compiled code that acts on its own: large objects
//! (`lo_create`, `lo_put`, `lo_unlink` on servers before 16), WAL messages
//! (`pg_logical_emit_message`), advisory locks, signals to other backends, replication slots,
//! statistics resets. A list of such names would miss the next one, so the decision comes from
//! the catalog: a function that is volatile (`provolatile = 'v'`) and written in a language
//! that is not trusted (`internal`, `c`, `plpython3u`: code the server does not confine) may
//! act, and is refused on a read session. SQL and PL/pgSQL functions stay allowed, since the
//! read-only transaction governs what they run; what they call inside is checked when they
//! are created through the gate, not here.
//!
//! Built-ins that are volatile only because their result changes between calls (randomness,
//! clocks, sleeping, the session's own settings and sequence values) are listed in
//! [`INERT`], each checked against the server's source. The catalog's answers are cached per
//! resource and database for all sessions, for [`TTL`].

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Volatile built-ins that act on nothing beyond the calling session, as glob patterns.
/// Checked against PostgreSQL 15's list of volatile untrusted-language functions; what is not
/// here and not trusted code is refused on read sessions (runs of a query given as text, such
/// as `query_to_xml`, among them: the query could call anything).
pub const INERT: &[&str] = &[
    // Randomness and identifiers.
    "random",
    "random_normal",
    "setseed",
    "gen_random_uuid",
    "uuidv4",
    "uuidv7",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    // Clocks and waiting.
    "clock_timestamp",
    "timeofday",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    // The session's own state: settings (`set_config` has its own checks), its query, sequence
    // values already drawn, its statistics snapshot and counters, cursors it opened, large
    // objects opened for reading (`lowrite`, `lo_put`, `lo_truncate` and `lo_unlink` act).
    "set_config",
    "current_query",
    "currval",
    "lastval",
    "pg_stat_clear_snapshot",
    "pg_stat_get_xact_*",
    "pg_notification_queue_usage",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "lo_open",
    "lo_close",
    "lo_get",
    "loread",
    "lo_lseek",
    "lo_lseek64",
    "lo_tell",
    "lo_tell64",
    // Reads of server state that clients and psql's meta-commands use: sizes, partitions,
    // locks, versions, commit status, primary or standby.
    "pg_database_size",
    "pg_tablespace_size",
    "pg_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_total_relation_size",
    "pg_partition_tree",
    "pg_partition_ancestors",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_collation_actual_version",
    "pg_database_collation_actual_version",
    "pg_jit_available",
    "pg_sequence_last_value",
    "pg_stat_have_stats",
    "pg_xact_commit_timestamp",
    "pg_xact_commit_timestamp_origin",
    "pg_last_committed_xact",
    "pg_xact_status",
    "txid_status",
    "pg_is_in_recovery",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_is_wal_replay_paused",
    "pg_get_wal_replay_pause_state",
];

/// Whether `name` is one of [`INERT`].
pub fn inert(name: &str) -> bool {
    INERT
        .iter()
        .any(|pattern| crate::inspect::glob::glob(pattern, name))
}

/// How long a catalog answer is trusted: a function created or replaced outside the gate is
/// seen within this time.
pub const TTL: Duration = Duration::from_secs(300);

/// Most names cached per resource and database.
const MAX_NAMES: usize = 8192;

/// The query that classifies `names`: one row per name found, `t` when some function of that
/// name (in any schema, any signature, any ASCII case: statement analysis folds names) may act. Unqualified and over every overload, so that
/// neither the search path nor argument types can pick a different function than the one
/// judged.
pub fn lookup_sql(names: &[&str]) -> String {
    let list = names
        .iter()
        .map(|n| format!("E'{}'", n.replace('\\', "\\\\").replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "SELECT {fold}, bool_or(p.provolatile = 'v' AND NOT l.lanpltrusted)::text \
         FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
         WHERE {fold} IN ({list}) GROUP BY 1",
        fold = crate::postgres::catalog::FOLDED_PRONAME
    )
}

/// One database's answers: function name → (may act, when learnt).
type Answers = HashMap<String, (bool, Instant)>;

/// The catalog's answers, shared by every session of the agent.
#[derive(Default)]
pub struct Effects {
    /// (resource, database) → function name → (may act, when learnt).
    known: Mutex<HashMap<(String, String), Answers>>,
}

/// What is known about a statement's functions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// Functions that may act beyond the session.
    pub acting: BTreeSet<String>,
    /// Functions the cache cannot answer for.
    pub unknown: Vec<String>,
}

impl Effects {
    /// Sorts `functions` (as [`crate::postgres::sql::Statement::functions`] lists them) into
    /// acting ones and ones to look up. Schema-qualified entries are judged by their plain
    /// name, which the list also holds.
    pub fn known(&self, resource: &str, database: &str, functions: &BTreeSet<String>) -> Known {
        let mut out = Known::default();
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = known.get(&(resource.to_owned(), database.to_owned()));
        for name in functions.iter().filter(|f| !f.contains('.')) {
            if inert(name) {
                continue;
            }
            match cached.and_then(|c| c.get(name)) {
                Some((acts, at)) if at.elapsed() < TTL => {
                    if *acts {
                        out.acting.insert(name.clone());
                    }
                }
                _ => out.unknown.push(name.clone()),
            }
        }
        out
    }

    /// Records the catalog's answer for `asked`: names it did not return are no function at
    /// all (the server will say so), which cannot act.
    pub fn learn(
        &self,
        resource: &str,
        database: &str,
        asked: &[String],
        rows: &[(String, bool)],
    ) -> BTreeSet<String> {
        let now = Instant::now();
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = known
            .entry((resource.to_owned(), database.to_owned()))
            .or_default();
        if entry.len() + asked.len() > MAX_NAMES {
            entry.clear();
        }
        // Looked up, not scanned per name: a statement naming many functions must not cost
        // their count times the catalog's rows.
        let acts_by_name: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|(_, acts)| *acts)
            .map(|(n, _)| n.as_str())
            .collect();
        let mut acting = BTreeSet::new();
        for name in asked {
            let acts = acts_by_name.contains(name.as_str());
            if acts {
                acting.insert(name.clone());
            }
            // Remembered up to the bound (one statement can name more than it).
            if entry.len() < MAX_NAMES || entry.contains_key(name) {
                entry.insert(name.clone(), (acts, now));
            }
        }
        acting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn inert_builtins_need_no_lookup_and_the_rest_are_cached_per_database() {
        let effects = Effects::default();
        let fns = set(&["random", "lo_create", "pg_catalog.lo_create", "upper"]);
        let first = effects.known("db", "app", &fns);
        assert_eq!(
            first.unknown,
            vec!["lo_create".to_owned(), "upper".to_owned()]
        );
        let acting = effects.learn(
            "db",
            "app",
            &first.unknown,
            &[("lo_create".into(), true), ("upper".into(), false)],
        );
        assert_eq!(acting, set(&["lo_create"]));
        let again = effects.known("db", "app", &fns);
        assert!(again.unknown.is_empty());
        assert_eq!(again.acting, set(&["lo_create"]));
        // Another database of the same resource has its own functions.
        assert_eq!(effects.known("db", "other", &fns).unknown.len(), 2);
    }

    #[test]
    fn names_the_catalog_does_not_know_cannot_act() {
        let effects = Effects::default();
        let acting = effects.learn("db", "app", &["no_such_fn".into()], &[]);
        assert!(acting.is_empty());
        assert!(
            effects
                .known("db", "app", &set(&["no_such_fn"]))
                .unknown
                .is_empty()
        );
    }

    /// One statement naming more functions than are remembered: each is answered from the
    /// catalog's rows, and what is remembered stays within the bound.
    #[test]
    fn a_statement_naming_many_functions_is_answered_and_bounded() {
        let effects = Effects::default();
        let asked: Vec<String> = (0..MAX_NAMES + 5000).map(|i| format!("f{i}")).collect();
        let rows: Vec<(String, bool)> = asked
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i % 2 == 0))
            .collect();
        let acting = effects.learn("db", "app", &asked, &rows);
        assert_eq!(acting.len(), asked.len().div_ceil(2));
        assert!(acting.contains("f0") && !acting.contains("f1"));
        let known = effects.known.lock().unwrap();
        assert!(known.values().all(|e| e.len() <= MAX_NAMES));
    }

    #[test]
    fn the_lookup_quotes_names_as_literals() {
        let sql = lookup_sql(&["lo_create", "o'brien\\"]);
        assert!(sql.contains("E'lo_create',E'o''brien\\\\'"), "{sql}");
    }
}
