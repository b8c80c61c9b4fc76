//! What a SQL string will do, as the real PostgreSQL parser (libpg_query) sees it.
//!
//! The parse tree is walked generically (every node, however deeply nested), so a function
//! call is found wherever it sits: in an UPDATE's SET list, an aggregate, a CTE, a default
//! expression, a view body. Statements that run other statements are judged by what they will
//! run: `PREPARE` by its query, `EXPLAIN ANALYZE` by its statement, `DO` and function bodies
//! (SQL and PL/pgSQL) by every statement and expression inside them.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::config::Access;

/// One top-level statement, analysed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Statement {
    /// The statement's text (a slice of the query string). An analysis shared by statement
    /// shape carries its first instance's text: nothing that judges or masks reads it.
    pub text: String,
    /// Every kind of statement it runs (see [`crate::postgres::config::STATEMENT_KINDS`]).
    pub kinds: BTreeSet<&'static str>,
    /// The access level it needs.
    pub access: AccessNeed,
    /// Tables it touches, lowercased, as `table` and `schema.table` when qualified.
    pub tables: BTreeSet<String>,
    /// Functions it calls, lowercased, as `name` and `schema.name` when qualified.
    pub functions: BTreeSet<String>,
    /// An UPDATE or DELETE (anywhere in it) has no WHERE clause.
    pub write_without_where: bool,
    /// Things the default guardrails refuse, with a short description each.
    pub hazards: BTreeSet<Hazard>,
    /// What would lift the session out of read-only mode or change its role.
    pub escapes_read_only: Option<String>,
    /// `PREPARE name AS ...`: the name (the analysis above is the inner statement's).
    pub prepares: Option<String>,
    /// `EXECUTE name`: judged by what was prepared under `name`.
    pub executes: Option<String>,
    /// `DEALLOCATE name` (`None` inside: `DEALLOCATE ALL`).
    pub deallocates: Option<Option<String>>,
    /// `COPY` details, for masking its output.
    pub copy: Option<Copy>,
    /// A change of a setting that changes how statements are parsed (refused by the guard).
    pub sets_parsing: Option<String>,
    /// Column names referenced in anything that produces result rows (SELECT lists,
    /// RETURNING, at any depth), lowercased; `*` for a star. A result column the server cannot
    /// trace to a table column (an expression) is masked when one of these is masked.
    pub output_refs: BTreeSet<String>,
    /// Relation aliases (`FROM users u`), lowercased: a reference to one is a whole row.
    pub aliases: BTreeSet<String>,
    /// Results may carry a column under another name than its own, so names in the statement
    /// cannot say which column a computed value came from: an alias with a column list
    /// (`users AS u(i, n, e, d)`, `WITH c(x)`), rows made by `VALUES` or by a function in
    /// `FROM` (`LATERAL (VALUES (ssn)) s(v)`, `jsonb_each_text(to_jsonb(users))`). Computed
    /// values are then masked as whole rows of every relation the statement reads.
    pub renames: bool,
    /// Relations as written, case kept: `(schema, name)`.
    pub relations: BTreeSet<(Option<String>, String)>,
    /// What it does with a SQL cursor.
    pub cursor: Option<CursorUse>,
    /// A way to carry values out of the database other than result rows, which column masking
    /// cannot follow (`pg_notify` or `set_config` with a computed value, a `DO` block that can
    /// raise anything it reads).
    pub side_channel: Option<String>,
    /// Like `side_channel`, but the value is a bind parameter (`$1`): one the client sent,
    /// unless the statement is run by something that computes it (a SQL `PREPARE`d
    /// statement's `EXECUTE`, a function's caller). Only the top level of a plain query
    /// keeps it apart; everywhere else it becomes a `side_channel`.
    pub param_side_channel: Option<String>,
    /// Code in a body (PL/pgSQL, a SQL function) fetches from or closes a cursor by name.
    /// At run time the name may be one the session declared, out of the gate's sight: its
    /// rows come back as the function's values, masked by what the body reads rather than by
    /// what the cursor selects; or the cursor is closed for other code to open another query
    /// under its name, whose rows the gate would mask as the first one's. So such a body is a
    /// side channel under masking, and a stored one is read as returning anything.
    pub cursor_by_name: bool,
    /// Of [`Statement::cursor_by_name`]: the body closes a cursor by name. Other code may then
    /// open another query under the name of a cursor the session declared, and its rows
    /// would be masked as the declared query's: calling a stored function that does this is
    /// refused while masking applies.
    pub closes_cursors: bool,
    /// It may change `search_path`, after which unqualified names can resolve differently in
    /// the session than in the proxy's catalog lookups.
    pub sets_search_path: bool,
    /// `CREATE FUNCTION`/`PROCEDURE`: the name defined (its last part, folded as
    /// [`Statement::functions`] are). The catalog connection does not see it before the
    /// session commits, and may have cached the name before: the session keeps what the
    /// definition reads for masking what calls of it return.
    pub defines_function: Option<String>,
    /// Operators used, by name (`=`, `||`, `###`): one defined outside the gate calls a
    /// function the statement does not name, which can read any relation.
    pub operators: BTreeSet<String>,
    /// `DISCARD ALL`: the session's prepared statements (SQL and protocol-level) are gone.
    pub discards: bool,
    /// Running it may drop every portal and cursor of the transaction: `COMMIT`,
    /// `ROLLBACK`, `PREPARE TRANSACTION`, `DISCARD ALL` (and their spellings: `END`,
    /// `ABORT`). `ROLLBACK TO` drops those made since its savepoint: see `savepoint`.
    pub ends_portals: bool,
    /// `SAVEPOINT`, `RELEASE` or `ROLLBACK TO` a savepoint, by name.
    pub savepoint: Option<Savepoint>,
}

/// A statement on a savepoint (names as the parser folds them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Savepoint {
    Define(String),
    Release(String),
    RollbackTo(String),
}

/// Kinds from most to least consequential: a statement is counted under the first it has.
const KIND_PRIORITY: [&str; 22] = [
    "drop",
    "truncate",
    "alter",
    "create",
    "privilege",
    "delete",
    "update",
    "merge",
    "insert",
    "copy_from",
    "copy_to",
    "do",
    "call",
    "execute",
    "prepare",
    "lock",
    "listen",
    "explain",
    "set",
    "transaction",
    "select",
    "utility",
];

impl Statement {
    /// The one kind metrics count it under: what it does that matters most.
    pub fn primary_kind(&self) -> &'static str {
        KIND_PRIORITY
            .iter()
            .find(|k| self.kinds.contains(*k))
            .copied()
            .or_else(|| self.kinds.iter().find(|k| **k != "ddl").copied())
            .unwrap_or("other")
    }
}

/// What the result rows of a query string (or a prepared statement, or a cursor) may be
/// computed from: the union over its statements, for masking values the server cannot trace
/// to a table column.
#[derive(Clone, Debug, Default)]
pub struct ResultRefs {
    /// Column names referenced where they feed results; `*` for a star.
    pub names: BTreeSet<String>,
    /// Names that denote whole rows: relations (bare names) and their aliases.
    pub row_names: BTreeSet<String>,
    /// Relations as written.
    pub relations: BTreeSet<(Option<String>, String)>,
    /// Some statement renames columns (see [`Statement::renames`]).
    pub renamed: bool,
    /// Functions called, plain names: one created outside the gate can read any relation.
    pub functions: BTreeSet<String>,
    /// Operators used (see [`Statement::operators`]).
    pub operators: BTreeSet<String>,
    /// Rows come from something the proxy did not see defined (a cursor or prepared statement
    /// it does not know): every computed value is masked.
    pub opaque: bool,
}

impl ResultRefs {
    /// Results computed from what the proxy cannot see.
    pub fn opaque() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            opaque: true,
            ..Self::default()
        })
    }

    pub fn add(&mut self, s: &Statement) {
        self.names.extend(s.output_refs.iter().cloned());
        self.row_names
            .extend(s.tables.iter().filter(|t| !t.contains('.')).cloned());
        self.row_names.extend(s.aliases.iter().cloned());
        self.relations.extend(s.relations.iter().cloned());
        self.renamed |= s.renames;
        self.functions
            .extend(s.functions.iter().filter(|f| !f.contains('.')).cloned());
        self.operators.extend(s.operators.iter().cloned());
    }

    pub fn merge(&mut self, other: &Self) {
        self.names.extend(other.names.iter().cloned());
        self.row_names.extend(other.row_names.iter().cloned());
        self.relations.extend(other.relations.iter().cloned());
        self.renamed |= other.renamed;
        self.functions.extend(other.functions.iter().cloned());
        self.operators.extend(other.operators.iter().cloned());
        self.opaque |= other.opaque;
    }

    /// Whether some result may hold a whole row (`row_to_json(u)`, `SELECT u`) or a star
    /// expanded where the server loses track of columns (`... UNION SELECT * FROM users`).
    pub fn whole_rows(&self) -> bool {
        self.renamed
            || self
                .names
                .iter()
                .any(|n| n == "*" || self.row_names.contains(n))
    }
}

/// `DECLARE`, `FETCH`/`MOVE` and `CLOSE` of SQL cursors: a `FETCH` returns what its
/// `DECLARE` selected, so it is masked by that statement's references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CursorUse {
    /// `hold`: `WITH HOLD`, the cursor outlives its transaction's commit.
    Declare {
        name: String,
        hold: bool,
    },
    Fetch(String),
    /// `None`: `CLOSE ALL`.
    Close(Option<String>),
}

/// Newtype so `Default` gives `read`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct AccessNeed(pub Access);

/// Dangerous capabilities found in a statement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hazard {
    /// `COPY ... PROGRAM`: runs a shell command on the database host.
    CopyProgram,
    /// `COPY ... TO/FROM 'file'` or `LOAD`: server file access.
    ServerFile,
    /// A foreign-data connection (`dblink`, `postgres_fdw`).
    ForeignConnection,
    /// `EXECUTE` of a dynamic string in PL/pgSQL: cannot be checked before it runs.
    DynamicSql,
    /// A function body in a language the proxy cannot read.
    OpaqueBody(String),
}

impl Hazard {
    pub fn describe(&self) -> String {
        match self {
            Self::CopyProgram => "COPY ... PROGRAM runs a command on the database host".into(),
            Self::ServerFile => "reads or writes files on the database host".into(),
            Self::ForeignConnection => {
                "opens a connection to another server (dblink/postgres_fdw)".into()
            }
            Self::DynamicSql => {
                "runs dynamic SQL (EXECUTE of a string) that cannot be checked".into()
            }
            Self::OpaqueBody(lang) => {
                format!("defines a function in {lang}, whose body cannot be checked")
            }
        }
    }
}

/// Where a `COPY` goes and what it carries. Names are as the parser resolved them (quoted
/// identifiers keep their case).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Copy {
    pub from: bool,
    pub schema: Option<String>,
    /// The table, when it copies a table.
    pub table: Option<String>,
    /// Explicit column list.
    pub columns: Vec<String>,
    /// `COPY (query) TO`: the query text.
    pub query: Option<String>,
    /// `text`, `csv` or `binary`.
    pub format: String,
    pub delimiter: Option<u8>,
    pub null: Option<String>,
    pub quote: Option<u8>,
    /// CSV `ESCAPE` (defaults to the quote character).
    pub escape: Option<u8>,
    pub header: bool,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Parser settings that change how the same bytes lex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseMode {
    pub standard_conforming_strings: bool,
}

impl Default for ParseMode {
    fn default() -> Self {
        Self {
            standard_conforming_strings: true,
        }
    }
}

impl ParseMode {
    pub fn options(self) -> i32 {
        if self.standard_conforming_strings {
            0
        } else {
            pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS.bits()
        }
    }
}

/// Built-in functions that run a query given as text, or read a relation or cursor given by
/// name, and return what they read: the relations they read are not in the statement, so
/// masking cannot follow their values (`query_to_xml('select ssn from users', ...)`). Under
/// masking they are refused like other side channels.
const RUNS_WHAT_IT_IS_GIVEN: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "ts_stat",
    "ts_rewrite",
];

/// Whether a built-in function `name` (plain) reads rows or a query named by its arguments,
/// or carries a value around result rows (`pg_notify`, `set_config`): called behind an
/// operator, where the statement's own analysis cannot see it, its values cannot be
/// masked by what the statement reads.
pub fn reads_or_sends_around_results(name: &str) -> bool {
    RUNS_WHAT_IT_IS_GIVEN.contains(&name) || name == "pg_notify" || name == "set_config"
}

/// The key an operator used in a body (or a statement) goes by among function names in the
/// cursor check: no function name starts with a NUL.
pub fn operator_key(op: &str) -> String {
    format!("\0op:{op}")
}

/// The operator an [`operator_key`] stands for.
pub fn operator_of_key(key: &str) -> Option<&str> {
    key.strip_prefix("\0op:")
}

/// Functions whose first argument names a setting that `read` sessions may not change.
const READ_ONLY_SETTINGS: &[&str] = &[
    "default_transaction_read_only",
    "transaction_read_only",
    "role",
    "session_authorization",
];

/// The setting that changes how string literals lex. A change is refused (see
/// `Statement::sets_parsing`): messages pipelined behind it would be judged in the old mode
/// and run in the new one. (`backslash_quote` only decides whether the server rejects `\'`,
/// so it cannot make the two read a statement differently.)
const PARSING_SETTING: &str = "standard_conforming_strings";

/// One statement's own text in the string parsed with it (from its raw parse node's
/// location and length; the last statement's length is 0: it runs to the end), trimmed.
/// Each statement is analysed on its own text, never the whole string: what is looked up
/// in the text (a COPY's query) must be that statement's, and a string of many statements
/// must not be rescanned once per statement.
fn statement_text<'a>(sql: &'a str, raw: &Value) -> &'a str {
    let start = raw["stmt_location"].as_u64().unwrap_or(0) as usize;
    let len = raw["stmt_len"].as_u64().unwrap_or(0) as usize;
    if len == 0 {
        sql.get(start..).unwrap_or(sql)
    } else {
        sql.get(start..start + len).unwrap_or(sql)
    }
    .trim()
}

/// Analyses a query string (one or more statements).
pub fn analyze(sql: &str, mode: ParseMode) -> Result<Vec<Statement>, ParseError> {
    let parsed = pg_query::parse(sql, mode.options()).map_err(|e| ParseError(e.to_string()))?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| ParseError(e.to_string()))?;
    let stmts = tree["stmts"].as_array().cloned().unwrap_or_default();
    if stmts.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(stmts.len());
    for raw in &stmts {
        let text = statement_text(sql, raw).to_owned();
        let mut s = Statement {
            text: text.clone(),
            ..Statement::default()
        };
        let node = &raw["stmt"]["node"];
        top_level(node, &text, mode, &mut s)?;
        walk(node, &mut s)?;
        outputs(node, false, &mut s);
        // A parameter is the client's own value only in a plain query run with its Bind; in
        // PREPARE, CREATE FUNCTION (BEGIN ATOMIC) and the like, something else computes it.
        let plain = variant(node).is_some_and(|(name, _)| {
            matches!(
                name,
                "SelectStmt"
                    | "InsertStmt"
                    | "UpdateStmt"
                    | "DeleteStmt"
                    | "MergeStmt"
                    | "DeclareCursorStmt"
            )
        });
        if !plain && s.side_channel.is_none() {
            s.side_channel = s.param_side_channel.take();
        }
        out.push(s);
    }
    Ok(out)
}

fn raise(s: &mut Statement, access: Access) {
    if access > s.access.0 {
        s.access = AccessNeed(access);
    }
}

/// The single node variant of a `{"Variant": {...}}` object.
fn variant(node: &Value) -> Option<(&str, &Value)> {
    let obj = node.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    obj.iter().next().map(|(k, v)| (k.as_str(), v))
}

fn sval(node: &Value) -> Option<&str> {
    node["node"]["String"]["sval"].as_str()
}

fn names(list: &Value) -> String {
    list.as_array()
        .map(|items| items.iter().filter_map(sval).collect::<Vec<_>>().join("."))
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// A function named with a `.` inside a quoted part (`"get.email"(1)`): names are kept
/// joined by dots, so its own name would be taken for a schema and a name, and its body
/// never looked up. Masking cannot follow what it returns or does.
fn dotted_name(list: &Value, s: &mut Statement) {
    // The schema's part may hold one: the name's own part is still the last.
    let dotted = list
        .as_array()
        .and_then(|items| items.last())
        .and_then(sval)
        .is_some_and(|part| part.contains('.'));
    if dotted && s.side_channel.is_none() {
        s.side_channel = Some("a function whose name holds a '.' cannot be looked up".into());
    }
}

fn defelem<'a>(options: &'a Value, name: &str) -> Option<&'a Value> {
    options.as_array()?.iter().find_map(|o| {
        let d = &o["node"]["DefElem"];
        (d["defname"].as_str() == Some(name)).then_some(d)
    })
}

/// A boolean as PostgreSQL's `parse_bool` reads it: case-insensitive, and any unique
/// prefix of `true`, `false`, `yes`, `no`, `on` (two letters at least) and `off`, besides
/// `1` and `0`. `None`: the server rejects the value.
fn pg_bool(s: &str) -> Option<bool> {
    let lower = s.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| lower.len() >= min && word.starts_with(&lower);
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || lower == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || lower == "0" {
        Some(false)
    } else {
        None
    }
}

/// The boolean an `AConst` stands for; `None` when it is no constant or no boolean.
fn const_bool(arg: &Value) -> Option<bool> {
    let c = &arg["node"]["AConst"];
    if let Some(i) = c["val"]["Ival"]["ival"].as_i64() {
        return Some(i != 0);
    }
    if c["val"]["Ival"].is_object() {
        // proto3 omits zero values.
        return Some(false);
    }
    if c["val"]["Boolval"].is_object() {
        return Some(c["val"]["Boolval"]["boolval"].as_bool().unwrap_or(false));
    }
    c["val"]["Sval"]["sval"].as_str().and_then(pg_bool)
}

/// What a condition is whatever the row, where that can be decided from the text alone:
/// constants (`true`, `'t'`, `1::bool`), a constant or a column compared with itself
/// (`1 = 1`, `'a' = 'a'`, `id = id`), `IS [NOT] NULL` on a constant, `IS TRUE`, and
/// AND/OR/NOT of those. `None`: it depends on the row (or the gate cannot tell).
fn truth(node: &Value) -> Option<bool> {
    let (name, v) = variant(&node["node"])?;
    match name {
        "AConst" => {
            if v["isnull"].as_bool() == Some(true) {
                return Some(false);
            }
            const_bool(node)
        }
        "TypeCast" => truth(&v["arg"]),
        "BoolExpr" => {
            let args: Vec<Option<bool>> = v["args"]
                .as_array()
                .map(|a| a.iter().map(truth).collect())
                .unwrap_or_default();
            match v["boolop"].as_i64() {
                // AND
                Some(1) if args.contains(&Some(false)) => Some(false),
                Some(1) if args.iter().all(|a| *a == Some(true)) => Some(true),
                // OR
                Some(2) if args.contains(&Some(true)) => Some(true),
                Some(2) if args.iter().all(|a| *a == Some(false)) => Some(false),
                // NOT
                Some(3) => args.first().copied().flatten().map(|b| !b),
                _ => None,
            }
        }
        "AExpr" if v["kind"].as_i64() == Some(1) => {
            let op = v["name"]
                .as_array()
                .and_then(|n| n.last())
                .and_then(|n| n["node"]["String"]["sval"].as_str())?;
            let (l, r) = (&v["lexpr"]["node"], &v["rexpr"]["node"]);
            // Compared without their locations, which always differ.
            let same = (l["AConst"].is_object()
                && r["AConst"].is_object()
                && l["AConst"]["val"] == r["AConst"]["val"]
                && l["AConst"]["isnull"] == r["AConst"]["isnull"])
                || (l["ColumnRef"].is_object()
                    && l["ColumnRef"]["fields"] == r["ColumnRef"]["fields"]);
            let unequal_consts = l["AConst"].is_object()
                && r["AConst"].is_object()
                && l["AConst"]["val"] != r["AConst"]["val"];
            match op {
                "=" | "<=" | ">=" if same => Some(true),
                "<>" | "!=" | "<" | ">" if same => Some(false),
                "=" if unequal_consts => Some(false),
                "<>" | "!=" if unequal_consts => Some(true),
                _ => None,
            }
        }
        "NullTest" if v["arg"]["node"]["AConst"].is_object() => {
            let null = v["arg"]["node"]["AConst"]["isnull"].as_bool() == Some(true);
            match v["nulltesttype"].as_i64() {
                Some(1) => Some(null),
                Some(2) => Some(!null),
                _ => None,
            }
        }
        // x IS TRUE (1), IS NOT FALSE (4)
        "BooleanTest" => match (v["booltesttype"].as_i64(), truth(&v["arg"])) {
            (Some(1 | 4), Some(b)) => Some(b),
            (Some(2 | 3), Some(b)) => Some(!b),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a MERGE updates or deletes every row of its target: a `WHEN MATCHED` update or
/// delete (without its own condition) under a join condition that is always true, a
/// `WHEN NOT MATCHED BY SOURCE` one under a condition that is always false, or both kinds.
fn merge_touches_every_row(merge: &Value) -> bool {
    let join = truth(&merge["join_condition"]);
    // The match kinds (MATCHED 1, NOT MATCHED BY SOURCE 2) with an unconditional update
    // (CMD_UPDATE 3) or delete (CMD_DELETE 5).
    let kinds: Vec<i64> = merge["merge_when_clauses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| variant(&c["node"]).filter(|(n, _)| *n == "MergeWhenClause"))
        .filter(|(_, w)| {
            matches!(w["command_type"].as_i64(), Some(3 | 5))
                && (w["condition"].is_null() || truth(&w["condition"]) == Some(true))
        })
        .filter_map(|(_, w)| w["match_kind"].as_i64())
        .collect();
    let matched = kinds.contains(&1);
    let unmatched = kinds.contains(&2);
    // Every target row either matches or not: writing both kinds writes them all.
    (matched && join == Some(true)) || (unmatched && join == Some(false)) || (matched && unmatched)
}

/// Whether an `AConst` (or its absence) means "false/off" for sure.
fn const_is_off(arg: &Value) -> bool {
    const_bool(arg) == Some(false)
}

/// Whether an `AConst` means "true/on" for sure: what keeps a read-only setting on. Anything
/// else (off, a prefix of it, a value the gate cannot read) counts as leaving it.
fn const_is_on(arg: &Value) -> bool {
    const_bool(arg) == Some(true)
}

/// Kind and access from the top-level statement node (and its special cases).
fn top_level(
    node: &Value,
    text: &str,
    mode: ParseMode,
    s: &mut Statement,
) -> Result<(), ParseError> {
    let Some((name, v)) = variant(node) else {
        return Err(ParseError("unrecognized parse tree".into()));
    };
    let (kind, access): (&'static str, Access) = match name {
        "SelectStmt" => {
            if !v["into_clause"].is_null() {
                ("create", Access::Admin)
            } else if v["locking_clause"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
            {
                ("select", Access::Write)
            } else {
                ("select", Access::Read)
            }
        }
        "InsertStmt" => ("insert", Access::Write),
        "UpdateStmt" => ("update", Access::Write),
        "DeleteStmt" => ("delete", Access::Write),
        "MergeStmt" => ("merge", Access::Write),
        "CopyStmt" => {
            let from = v["is_from"].as_bool().unwrap_or(false);
            if v["is_program"].as_bool().unwrap_or(false) {
                s.hazards.insert(Hazard::CopyProgram);
            } else if v["filename"].as_str().is_some_and(|f| !f.is_empty()) {
                s.hazards.insert(Hazard::ServerFile);
            }
            let rel = &v["relation"];
            let table = rel["relname"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            let schema = rel["schemaname"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            let columns = v["attlist"]
                .as_array()
                .map(|a| a.iter().filter_map(sval).map(str::to_owned).collect())
                .unwrap_or_default();
            let opt = |name: &str| {
                defelem(&v["options"], name).map(|d| {
                    d["arg"]["node"]["String"]["sval"]
                        .as_str()
                        .or_else(|| {
                            d["arg"]["node"]["Boolean"]["boolval"]
                                .as_bool()
                                .map(|b| if b { "true" } else { "false" })
                        })
                        .unwrap_or(if d["arg"].is_null() { "true" } else { "" })
                        .to_owned()
                })
            };
            let byte = |s: Option<String>| s.and_then(|s| s.bytes().next());
            let query = if v["query"].is_null() {
                None
            } else {
                Some(copy_query(text, mode)?)
            };
            s.copy = Some(Copy {
                from,
                schema,
                table,
                columns,
                query,
                format: opt("format")
                    .unwrap_or_else(|| "text".into())
                    .to_ascii_lowercase(),
                delimiter: byte(opt("delimiter")),
                null: opt("null"),
                quote: byte(opt("quote")),
                escape: byte(opt("escape")),
                header: opt("header").is_some_and(|h| {
                    !matches!(h.to_ascii_lowercase().as_str(), "false" | "off" | "0")
                }),
            });
            if from {
                ("copy_from", Access::Write)
            } else {
                ("copy_to", Access::Read)
            }
        }
        "VariableSetStmt" => {
            let setting = v["name"].as_str().unwrap_or("").to_ascii_lowercase();
            let args = &v["args"];
            if setting == "search_path" {
                s.sets_search_path = true;
            }
            if setting == "role" || setting == "session_authorization" {
                s.escapes_read_only = Some(format!(
                    "SET {} changes the session's role",
                    setting.to_uppercase().replace('_', " ")
                ));
                ("privilege", Access::Admin)
            } else if setting == "default_transaction_read_only"
                || setting == "transaction_read_only"
            {
                let on = args
                    .as_array()
                    .and_then(|a| a.first())
                    .is_some_and(const_is_on)
                    && v["kind"].as_i64() == Some(1); // SET ... TO a value
                if !on {
                    s.escapes_read_only =
                        Some(format!("SET {setting} to off leaves read-only mode"));
                }
                ("set", Access::Read)
            } else {
                // A value equal to the session's mode changes nothing; so do DEFAULT, RESET
                // and FROM CURRENT, since no change was ever let through.
                if setting == PARSING_SETTING
                    && v["kind"].as_i64() == Some(1)
                    && args.as_array().and_then(|a| a.first()).and_then(const_bool)
                        != Some(mode.standard_conforming_strings)
                {
                    s.sets_parsing = Some(setting.clone());
                }
                if setting == "client_encoding" {
                    let value = args
                        .as_array()
                        .and_then(|a| a.first())
                        .and_then(|a| a["node"]["AConst"]["val"]["Sval"]["sval"].as_str())
                        .unwrap_or("")
                        .to_ascii_uppercase()
                        .replace(['-', '_'], "");
                    if !matches!(value.as_str(), "UTF8" | "UNICODE" | "SQLASCII") {
                        s.sets_parsing = Some("client_encoding".into());
                    }
                }
                ("set", Access::Read)
            }
        }
        "VariableShowStmt" => ("set", Access::Read),
        "DiscardStmt" => {
            // DiscardMode: 1 = ALL (PLANS, SEQUENCES and TEMP keep prepared statements).
            s.discards = v["target"].as_i64() == Some(1);
            s.ends_portals = s.discards;
            ("set", Access::Read)
        }
        "TransactionStmt" => {
            // Only these keep the transaction's portals; anything else (or a kind not known
            // here) may end them.
            // TransactionStmtKind: 1 BEGIN, 2 START, 5 SAVEPOINT, 6 RELEASE, 7 ROLLBACK TO.
            let name = || v["savepoint_name"].as_str().unwrap_or("").to_owned();
            s.savepoint = match v["kind"].as_i64() {
                Some(5) => Some(Savepoint::Define(name())),
                Some(6) => Some(Savepoint::Release(name())),
                Some(7) => Some(Savepoint::RollbackTo(name())),
                _ => None,
            };
            s.ends_portals = !matches!(v["kind"].as_i64(), Some(1 | 2 | 5 | 6 | 7));
            ("transaction", Access::Read)
        }
        "ExplainStmt" => {
            let analyze = defelem(&v["options"], "analyze")
                .is_some_and(|d| !const_is_off(&d["arg"]) || d["arg"].is_null());
            let inner = &v["query"]["node"];
            if analyze {
                top_level(inner, text, mode, s)?;
                // EXPLAIN ANALYZE DECLARE runs the query and makes no cursor.
                s.cursor = None;
            } else {
                let mut scratch = Statement::default();
                top_level(inner, text, mode, &mut scratch)?;
                s.hazards.extend(scratch.hazards);
                s.kinds.extend(scratch.kinds);
            }
            ("explain", Access::Read)
        }
        "PrepareStmt" => {
            // Names come folded by the parser (`m` and `M` are one, `"M"` another): compared
            // as they are.
            s.prepares = Some(v["name"].as_str().unwrap_or("").to_owned());
            top_level(&v["query"]["node"], text, mode, s)?;
            ("prepare", Access::Read)
        }
        "ExecuteStmt" => {
            s.executes = Some(v["name"].as_str().unwrap_or("").to_owned());
            ("execute", Access::Read)
        }
        "DeallocateStmt" => {
            s.deallocates = Some(
                v["name"]
                    .as_str()
                    .filter(|n| !n.is_empty() && !v["isall"].as_bool().unwrap_or(false))
                    .map(str::to_owned),
            );
            ("utility", Access::Read)
        }
        "DeclareCursorStmt" => {
            top_level(&v["query"]["node"], text, mode, s)?;
            s.cursor = Some(CursorUse::Declare {
                name: portal_name(v),
                hold: v["options"].as_i64().unwrap_or(0) & CURSOR_OPT_HOLD != 0,
            });
            ("select", Access::Read)
        }
        "FetchStmt" => {
            s.cursor = Some(CursorUse::Fetch(portal_name(v)));
            ("select", Access::Read)
        }
        "ClosePortalStmt" => {
            let name = portal_name(v);
            s.cursor = Some(CursorUse::Close((!name.is_empty()).then_some(name)));
            ("select", Access::Read)
        }
        "ListenStmt" | "UnlistenStmt" => ("listen", Access::Read),
        "NotifyStmt" => ("listen", Access::Write),
        "LockStmt" => ("lock", Access::Write),
        "CallStmt" => {
            // The procedure is a function call like any other (guardrails by function name,
            // what its OUT values are computed from, what its code does), but the tree holds
            // it as a bare FuncCall that `walk` does not see as a node.
            dotted_name(&v["funccall"]["funcname"], s);
            let name = names(&v["funccall"]["funcname"]);
            if let Some(last) = name.rsplit('.').next() {
                s.functions.insert(last.to_owned());
            }
            s.functions.insert(name);
            ("call", Access::Write)
        }
        "DoStmt" => {
            let lang = defelem(&v["args"], "language")
                .and_then(|d| d["arg"]["node"]["String"]["sval"].as_str())
                .unwrap_or("plpgsql")
                .to_ascii_lowercase();
            let body = defelem(&v["args"], "as")
                .and_then(|d| d["arg"]["node"]["String"]["sval"].as_str())
                .unwrap_or("");
            if lang == "plpgsql" {
                plpgsql_body(body, mode, s)?;
            } else {
                s.hazards.insert(Hazard::OpaqueBody(lang));
            }
            s.side_channel = Some("a DO block can raise or log any value it reads".into());
            ("do", Access::Read)
        }
        "CreateFunctionStmt" => {
            s.sets_parsing = function_sets_parsing(&v["options"]);
            let name = names(&v["funcname"]);
            s.defines_function = name.rsplit('.').next().map(str::to_owned);
            function_body(v, text, mode, s)?;
            ("create", Access::Admin)
        }
        "TruncateStmt" => ("truncate", Access::Admin),
        "LoadStmt" => {
            s.hazards.insert(Hazard::ServerFile);
            ("utility", Access::Admin)
        }
        "CreateExtensionStmt" => {
            let ext = v["extname"].as_str().unwrap_or("").to_ascii_lowercase();
            if ext == "dblink" || ext == "postgres_fdw" {
                s.hazards.insert(Hazard::ForeignConnection);
            }
            ("create", Access::Admin)
        }
        "CreateForeignServerStmt"
        | "CreateFdwStmt"
        | "CreateUserMappingStmt"
        | "AlterUserMappingStmt"
        | "ImportForeignSchemaStmt" => {
            s.hazards.insert(Hazard::ForeignConnection);
            ("create", Access::Admin)
        }
        "GrantStmt"
        | "GrantRoleStmt"
        | "CreateRoleStmt"
        | "AlterRoleStmt"
        | "AlterRoleSetStmt"
        | "DropRoleStmt"
        | "ReassignOwnedStmt"
        | "DropOwnedStmt"
        | "AlterDefaultPrivilegesStmt" => ("privilege", Access::Admin),
        n if n.starts_with("Drop") => ("drop", Access::Admin),
        "AlterFunctionStmt" => {
            s.sets_parsing = function_sets_parsing(&v["actions"]);
            ("alter", Access::Admin)
        }
        n if n.starts_with("Alter") || n.starts_with("Rename") => ("alter", Access::Admin),
        n if n.starts_with("Create")
            || n == "IndexStmt"
            || n == "ViewStmt"
            || n == "RuleStmt"
            || n == "DefineStmt"
            || n == "CompositeTypeStmt"
            || n == "CommentStmt"
            || n == "SecLabelStmt" =>
        {
            ("create", Access::Admin)
        }
        // Maintenance and anything unrecognized: admin (fail closed).
        _ => ("utility", Access::Admin),
    };
    s.kinds.insert(kind);
    if matches!(kind, "create" | "alter" | "drop" | "truncate") {
        s.kinds.insert("ddl");
    }
    raise(s, access);
    Ok(())
}

/// A cursor's name as the server keys it (the parser already folded unquoted case).
/// `DeclareCursorStmt.options`' bit for `WITH HOLD` (PostgreSQL's `CURSOR_OPT_HOLD`).
const CURSOR_OPT_HOLD: i64 = 0x0020;

fn portal_name(v: &Value) -> String {
    v["portalname"].as_str().unwrap_or_default().to_owned()
}

/// Collects what feeds result rows: column references inside any `target_list` or
/// `returning_list` (at any depth: subqueries, CTEs, set operations, function arguments), and
/// relation aliases and names anywhere.
fn outputs(node: &Value, in_output: bool, s: &mut Statement) {
    match node {
        Value::Array(items) => {
            for item in items {
                outputs(item, in_output, s);
            }
        }
        Value::Object(map) => {
            if in_output && let Some(fields) = map.get("ColumnRef").map(|c| &c["fields"]) {
                let last = fields.as_array().and_then(|f| f.last());
                let name = match last {
                    Some(f) if f["node"]["AStar"].is_object() => Some("*".to_owned()),
                    Some(f) => sval(f).map(str::to_ascii_lowercase),
                    None => None,
                };
                if let Some(name) = name {
                    s.output_refs.insert(name);
                }
            }
            if let Some(alias) = map.get("aliasname").and_then(Value::as_str) {
                s.aliases.insert(alias.to_ascii_lowercase());
                if map
                    .get("colnames")
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty())
                {
                    s.renames = true;
                }
            }
            if map
                .get("aliascolnames")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty())
                || map
                    .get("values_lists")
                    .and_then(Value::as_array)
                    .is_some_and(|v| !v.is_empty())
                || ["RangeFunction", "RangeTableFunc", "JsonTable"]
                    .iter()
                    .any(|k| map.contains_key(*k))
            {
                s.renames = true;
            }
            if let (Some(rel), true) = (
                map.get("relname").and_then(Value::as_str),
                map.contains_key("relpersistence"),
            ) && !rel.is_empty()
            {
                let schema = map
                    .get("schemaname")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
                s.relations.insert((schema, rel.to_owned()));
            }
            for (key, value) in map {
                let out = in_output
                    || matches!(
                        key.as_str(),
                        "target_list" | "returning_list" | "returning_clause"
                    );
                outputs(value, out, s);
            }
        }
        _ => {}
    }
}

/// Every node below `node`: functions, tables, nested DML, read-only escapes.
fn walk(node: &Value, s: &mut Statement) -> Result<(), ParseError> {
    match node {
        Value::Array(items) => {
            for item in items {
                walk(item, s)?;
            }
        }
        Value::Object(map) => {
            // A range variable: in a Node it is wrapped as {"RangeVar": ...}, but typed fields
            // (UPDATE's target, COPY's table, ...) hold it bare. Recognize it by its shape. A
            // CTE named like a table counts as touching the table: guardrails err on the side
            // of matching.
            if let (Some(rel), true) = (
                map.get("relname").and_then(Value::as_str),
                map.contains_key("relpersistence"),
            ) {
                let rel = rel.to_ascii_lowercase();
                let schema = map
                    .get("schemaname")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if !rel.is_empty() {
                    if !schema.is_empty() {
                        s.tables.insert(format!("{schema}.{rel}"));
                    }
                    s.tables.insert(rel);
                }
            }
            for (key, value) in map {
                match key.as_str() {
                    "ExplainStmt" => {
                        // Plain EXPLAIN plans without running: what it mentions counts, what it
                        // would need to run does not.
                        let analyze = defelem(&value["options"], "analyze")
                            .is_some_and(|d| d["arg"].is_null() || !const_is_off(&d["arg"]));
                        if !analyze {
                            let mut scratch = Statement::default();
                            walk(&value["query"], &mut scratch)?;
                            s.tables.extend(scratch.tables);
                            s.functions.extend(scratch.functions);
                            s.hazards.extend(scratch.hazards);
                            continue;
                        }
                    }
                    "AExpr" => {
                        if let Some(op) = value["name"]
                            .as_array()
                            .and_then(|n| n.last())
                            .and_then(sval)
                        {
                            s.operators.insert(op.to_owned());
                        }
                    }
                    "FuncCall" => {
                        dotted_name(&value["funcname"], s);
                        let name = names(&value["funcname"]);
                        if let Some(last) = name.rsplit('.').next() {
                            s.functions.insert(last.to_owned());
                        }
                        s.functions.insert(name.clone());
                        let last = name.rsplit('.').next().unwrap_or("");
                        if RUNS_WHAT_IT_IS_GIVEN.contains(&last) {
                            s.side_channel = Some(format!(
                                "{last}() reads rows named by a query text, relation or cursor, not by this statement"
                            ));
                        }
                        if last == "pg_notify" || last == "set_config" {
                            let args = value["args"].as_array().map_or(&[][..], Vec::as_slice);
                            if args.iter().any(|a| !is_const(a) && !is_param(a)) {
                                s.side_channel = Some(format!("{last}() with a computed value"));
                            } else if args.iter().any(is_param) {
                                s.param_side_channel = Some(format!("{last}() with a parameter"));
                            }
                        }
                        if last == "set_config" {
                            let first = value["args"].as_array().and_then(|a| a.first());
                            let setting = first
                                .and_then(|a| a["node"]["AConst"]["val"]["Sval"]["sval"].as_str())
                                .map(str::to_ascii_lowercase);
                            match setting {
                                Some(name) if READ_ONLY_SETTINGS.contains(&name.as_str()) => {
                                    s.escapes_read_only = Some(format!(
                                        "set_config('{name}', ...) changes read-only mode or role"
                                    ));
                                }
                                Some(name)
                                    if name == PARSING_SETTING || name == "client_encoding" =>
                                {
                                    s.sets_parsing = Some(name);
                                }
                                Some(name) if name == "search_path" => {
                                    s.sets_search_path = true;
                                }
                                Some(_) => {}
                                None => {
                                    s.sets_search_path = true;
                                    s.escapes_read_only =
                                        Some("set_config() with a computed setting name".into());
                                }
                            }
                        }
                        if last.starts_with("dblink") {
                            s.hazards.insert(Hazard::ForeignConnection);
                        }
                    }
                    "DefElem" => {
                        let name = value["defname"].as_str().unwrap_or("");
                        if (name == "transaction_read_only"
                            || name == "default_transaction_read_only")
                            && !const_is_on(&value["arg"])
                        {
                            s.escapes_read_only = Some("READ WRITE lifts read-only mode".into());
                        }
                    }
                    "InsertStmt" => {
                        s.kinds.insert("insert");
                        raise(s, Access::Write);
                    }
                    "UpdateStmt" | "DeleteStmt" => {
                        s.kinds.insert(if key == "UpdateStmt" {
                            "update"
                        } else {
                            "delete"
                        });
                        raise(s, Access::Write);
                        let condition = &value["where_clause"];
                        if condition.is_null() || truth(condition) == Some(true) {
                            s.write_without_where = true;
                        }
                    }
                    "MergeStmt" => {
                        s.kinds.insert("merge");
                        raise(s, Access::Write);
                        if merge_touches_every_row(value) {
                            s.write_without_where = true;
                        }
                    }
                    "SelectStmt" => {
                        if !value["into_clause"].is_null() {
                            s.kinds.insert("create");
                            raise(s, Access::Admin);
                        }
                        if value["locking_clause"]
                            .as_array()
                            .is_some_and(|l| !l.is_empty())
                        {
                            raise(s, Access::Write);
                        }
                    }
                    _ => {}
                }
                walk(value, s)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A literal (a cast one counts as computed, as before: a cast can look things up).
fn is_const(arg: &Value) -> bool {
    arg["node"]["AConst"].is_object()
}

/// A bind parameter, possibly cast (`$1`, `$1::text`).
fn is_param(arg: &Value) -> bool {
    let node = &arg["node"];
    node["ParamRef"].is_object() || node["TypeCast"]["arg"]["node"]["ParamRef"].is_object()
}

/// Folds an inner statement's findings into `s`.
fn absorb(s: &mut Statement, inner: Statement) {
    s.kinds.extend(inner.kinds);
    raise(s, inner.access.0);
    s.tables.extend(inner.tables);
    s.functions.extend(inner.functions);
    s.operators.extend(inner.operators);
    s.write_without_where |= inner.write_without_where;
    s.hazards.extend(inner.hazards);
    if s.escapes_read_only.is_none() {
        s.escapes_read_only = inner.escapes_read_only;
    }
    // Inside a body or a fragment, a parameter is whatever its caller computed.
    if s.side_channel.is_none() {
        s.side_channel = inner.side_channel.or(inner.param_side_channel);
    }
    s.sets_search_path |= inner.sets_search_path;
    match inner.cursor {
        Some(CursorUse::Fetch(_)) => cursor_by_name(s, "FETCH or MOVE", false),
        Some(CursorUse::Close(_)) => cursor_by_name(s, "CLOSE", true),
        _ => {}
    }
    s.cursor_by_name |= inner.cursor_by_name;
    s.closes_cursors |= inner.closes_cursors;
    // What a body returns, for masking what a call of it returns.
    s.output_refs.extend(inner.output_refs);
    s.aliases.extend(inner.aliases);
    s.relations.extend(inner.relations);
    s.renames |= inner.renames;
}

/// The query of `COPY (query) TO ...`, exactly as written: from the parenthesis that opens it
/// to the one that closes it, found with the real lexer (strings, comments and nested
/// parentheses cannot fool it).
fn copy_query(text: &str, mode: ParseMode) -> Result<String, ParseError> {
    let bad = || ParseError("cannot find the query of COPY (query)".into());
    let scanned = pg_query::scan(text).map_err(|e| ParseError(e.to_string()))?;
    let mut depth = 0usize;
    let mut open = None;
    for token in &scanned.tokens {
        let (start, end) = (token.start as usize, token.end as usize);
        match text.get(start..end) {
            Some("(") => {
                if depth == 0 {
                    open = Some(end);
                }
                depth += 1;
            }
            Some(")") => {
                depth = depth.checked_sub(1).ok_or_else(bad)?;
                if depth == 0 {
                    let inner = text.get(open.ok_or_else(bad)?..start).ok_or_else(bad)?;
                    // The slice must be one statement by itself, or it is not the query.
                    let check = pg_query::parse(inner, mode.options())
                        .map_err(|e| ParseError(e.to_string()))?;
                    if check.protobuf.stmts.len() != 1 {
                        return Err(bad());
                    }
                    return Ok(inner.trim().to_owned());
                }
            }
            _ => {}
        }
    }
    Err(bad())
}

/// Analyses SQL found inside a body, with PL/pgSQL parse modes (expressions, assignments).
fn analyze_fragment(
    sql: &str,
    parse_mode: i32,
    mode: ParseMode,
    s: &mut Statement,
) -> Result<(), ParseError> {
    let options = parse_mode | mode.options();
    let parsed = pg_query::parse(sql, options)
        .map_err(|e| ParseError(format!("in a function body: {e}")))?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| ParseError(e.to_string()))?;
    for raw in tree["stmts"].as_array().into_iter().flatten() {
        let mut inner = Statement::default();
        let node = &raw["stmt"]["node"];
        if parse_mode == 0 {
            top_level(node, statement_text(sql, raw), mode, &mut inner)?;
        }
        walk(node, &mut inner)?;
        outputs(node, false, &mut inner);
        absorb(s, inner);
    }
    Ok(())
}

/// Walks a PL/pgSQL function tree for every embedded query and dynamic EXECUTE.
fn plpgsql_tree(node: &Value, mode: ParseMode, s: &mut Statement) -> Result<(), ParseError> {
    match node {
        Value::Array(items) => items.iter().try_for_each(|i| plpgsql_tree(i, mode, s)),
        Value::Object(map) => {
            for (key, value) in map {
                match key.as_str() {
                    "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors" | "PLpgSQL_stmt_open"
                        if key != "PLpgSQL_stmt_open" || !value["dynquery"].is_null() =>
                    {
                        s.hazards.insert(Hazard::DynamicSql);
                    }
                    "PLpgSQL_stmt_close" => cursor_by_name(s, "CLOSE", true),
                    // MOVE returns nothing; FETCH ... INTO returns the cursor's row.
                    "PLpgSQL_stmt_fetch" if value["is_move"].as_bool() != Some(true) => {
                        cursor_by_name(s, "FETCH", false);
                    }
                    "PLpgSQL_expr" => {
                        if let Some(query) = value["query"].as_str() {
                            let parse_mode = value["parseMode"].as_i64().unwrap_or(0) as i32;
                            analyze_fragment(query, parse_mode, mode, s)?;
                        }
                        continue;
                    }
                    _ => {}
                }
                plpgsql_tree(value, mode, s)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A body's code uses a cursor by name (see [`Statement::cursor_by_name`]).
fn cursor_by_name(s: &mut Statement, what: &str, closes: bool) {
    s.cursor_by_name = true;
    s.closes_cursors |= closes;
    if s.side_channel.is_none() {
        s.side_channel = Some(format!(
            "a function body's {what} of a cursor by name can read or replace a cursor the session declared"
        ));
    }
}

/// PL/pgSQL is parsed with `standard_conforming_strings` on; under a server that has it off
/// the gate could read a body's strings otherwise than the server does, so it reads none.
fn plpgsql_mode(mode: ParseMode) -> Result<(), ParseError> {
    if mode.standard_conforming_strings {
        Ok(())
    } else {
        Err(ParseError(
            "PL/pgSQL is not checked while standard_conforming_strings is off; set it on for this database or role".into(),
        ))
    }
}

/// A dollar-quote tag (`jitgate`, `jitgatex`, ...) that `body` does not contain, so the body
/// can be wrapped in a function definition as it is. One pass over the body: the workload
/// writes it, and trying tags one by one, each a search of the whole body, costs time
/// growing faster than the body does (`$jitgate$ $jitgatex$ $jitgatexx$ ...`).
fn free_dollar_tag(body: &str) -> String {
    const STEM: &str = "$jitgate";
    let bytes = body.as_bytes();
    let longest = memchr::memmem::find_iter(bytes, STEM)
        .filter_map(|at| {
            let rest = &bytes[at + STEM.len()..];
            let xs = rest.iter().take_while(|b| **b == b'x').count();
            (rest.get(xs) == Some(&b'$')).then_some(xs)
        })
        .max();
    let xs = longest.map_or(0, |n| n + 1);
    format!("jitgate{}", "x".repeat(xs))
}

fn plpgsql_body(body: &str, mode: ParseMode, s: &mut Statement) -> Result<(), ParseError> {
    plpgsql_mode(mode)?;
    // Wrap the block in a function definition, with a dollar tag the body cannot contain.
    let tag = free_dollar_tag(body);
    let wrapped = format!(
        "CREATE FUNCTION jitgate_do() RETURNS void LANGUAGE plpgsql AS ${tag}${body}${tag}$"
    );
    let tree =
        super::libpg::plpgsql(&wrapped).map_err(|e| ParseError(format!("in a DO block: {e}")))?;
    plpgsql_tree(&tree, mode, s)
}

/// A PL/pgSQL body compiled without its signature: which return type it was written for
/// decides which RETURN forms compile; the first one that does is the body as the server
/// runs it.
fn plpgsql_any_signature(body: &str) -> Option<Value> {
    let tag = free_dollar_tag(body);
    ["void", "record", "SETOF record"].iter().find_map(|returns| {
        super::libpg::plpgsql(&format!(
            "CREATE FUNCTION jitgate_body() RETURNS {returns} LANGUAGE plpgsql AS ${tag}${body}${tag}$"
        ))
        .ok()
    })
}

/// What a function body stored in the catalog reads: its relations (as written) and the
/// functions it calls, or `None` when that cannot be told (another language, a body that
/// does not parse, SQL built at run time, rows fetched from a cursor by name).
pub fn body_reads(language: &str, body: &str, mode: ParseMode) -> Option<ResultRefs> {
    let mut s = Statement::default();
    match language {
        "sql" => analyze_fragment(body, 0, mode, &mut s).ok()?,
        super::catalog::SQL_DEFINITION => {
            for statement in analyze(body, mode).ok()? {
                absorb(&mut s, statement);
            }
        }
        "plpgsql" => {
            // Which return type the body was written for decides which RETURN forms
            // compile; the first one that does is the body as the server runs it.
            plpgsql_mode(mode).ok()?;
            let tree = plpgsql_any_signature(body)?;
            plpgsql_tree(&tree, mode, &mut s).ok()?;
        }
        _ => return None,
    }
    // SQL built at run time, a cursor used by name, or a function that reads what it is
    // given (`cursor_to_xml`, `query_to_xml`) or sends values around its result: what it
    // returns may come from anything.
    if s.hazards.contains(&Hazard::DynamicSql) || s.cursor_by_name || s.side_channel.is_some() {
        return None;
    }
    let mut refs = ResultRefs::default();
    refs.add(&s);
    Some(refs)
}

/// Whether a function body stored in the catalog closes a cursor by name (see
/// [`Statement::closes_cursors`]), and the functions it calls (which may). A body that
/// runs SQL built at run time closes one; one that does not parse is read from its tokens
/// (see [`scanned_body`]). Bodies in other languages are
/// not read: code the server runs as compiled or untrusted is the operator's, as it is for
/// [`body_reads`] (whose values such a body makes masked whole).
pub fn body_closes_cursors(
    language: &str,
    body: &str,
    mode: ParseMode,
) -> (bool, BTreeSet<String>) {
    let mut s = Statement::default();
    let parsed = match language {
        "sql" => analyze_fragment(body, 0, mode, &mut s).is_ok(),
        super::catalog::SQL_DEFINITION => match analyze(body, mode) {
            Ok(statements) => {
                statements.into_iter().for_each(|st| absorb(&mut s, st));
                true
            }
            Err(_) => return (true, BTreeSet::new()),
        },
        "plpgsql" => {
            plpgsql_mode(mode).is_ok()
                && plpgsql_any_signature(body)
                    .is_some_and(|tree| plpgsql_tree(&tree, mode, &mut s).is_ok())
        }
        // A body run in another string mode than it would be read in (see
        // `catalog::UNREADABLE`): anything.
        super::catalog::UNREADABLE => return (true, BTreeSet::new()),
        _ => return (false, BTreeSet::new()),
    };
    if !parsed {
        // Tokens are read with standard strings; a body the server reads otherwise is not
        // read at all.
        if !mode.standard_conforming_strings {
            return (true, BTreeSet::new());
        }
        return scanned_body(body).unwrap_or_else(|| (true, BTreeSet::new()));
    }
    let calls = s
        .functions
        .into_iter()
        .filter(|f| !f.contains('.'))
        .collect();
    // Operators it uses stand for the functions behind them.
    let mut calls: BTreeSet<String> = calls;
    calls.extend(s.operators.iter().map(|op| operator_key(op)));
    // SQL built at run time may close anything.
    (
        s.closes_cursors || s.hazards.contains(&Hazard::DynamicSql),
        calls,
    )
}

/// A `SET` of the string literal mode or the client encoding among a function's options
/// (`CREATE FUNCTION ... SET standard_conforming_strings = off`, `ALTER FUNCTION ... SET`):
/// the body would run in another mode than the gate reads it in, where its strings can hide
/// statements (see [`Statement::sets_parsing`]).
fn function_sets_parsing(options: &Value) -> Option<String> {
    options.as_array()?.iter().find_map(|o| {
        let d = &o["node"]["DefElem"];
        let set = &d["arg"]["node"]["VariableSetStmt"];
        let name = set["name"].as_str()?.to_ascii_lowercase();
        (d["defname"].as_str() == Some("set")
            && (name == PARSING_SETTING || name == "client_encoding"))
            .then_some(name)
    })
}

/// What a body that does not parse here closes and calls, from its tokens (strings and
/// comments are no words): a `CLOSE` or `EXECUTE` where a statement starts closes (a
/// column named `close` does not), and every name followed by a parenthesis is called, its
/// ASCII capitals folded as names in statements are (most are no function, which the catalog
/// then says). A `U&"..."` name called, which is not read here, counts as closing; `None`
/// when the body does not even lex.
fn scanned_body(body: &str) -> Option<(bool, BTreeSet<String>)> {
    use pg_query::protobuf::Token;
    let scanned = pg_query::scan(body).ok()?;
    let tokens: Vec<_> = scanned
        .tokens
        .iter()
        .filter(|t| t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32)
        .collect();
    let text = |i: usize| {
        tokens
            .get(i)
            .and_then(|t| body.get(t.start as usize..t.end as usize))
            .unwrap_or("")
    };
    let starts_statement = |i: usize| {
        i == 0 || {
            let before = text(i - 1);
            before == ";"
                || ["begin", "then", "else", "loop"]
                    .iter()
                    .any(|k| before.eq_ignore_ascii_case(k))
        }
    };
    let mut closes = false;
    let mut calls = BTreeSet::new();
    for (i, token) in tokens.iter().enumerate() {
        // A `U&"..."` name (with UESCAPE or not) is not decoded here: it may call anything.
        if token.token == Token::Uident as i32
            || ((token.token == Token::Close as i32 || token.token == Token::Execute as i32)
                && starts_statement(i))
        {
            closes = true;
        }
        if text(i + 1) != "(" {
            continue;
        }
        if token.token == Token::Ident as i32 || token.keyword_kind != 0 {
            let name = identifier(text(i));
            if !name.is_empty() {
                calls.insert(name);
            }
        }
    }
    Some((closes, calls))
}

/// An identifier token's name as the server keeps it: a quoted one unquoted (`""` is one
/// `"`), an unquoted one with its ASCII capitals folded (as [`Statement::functions`] holds
/// names), cut to the server's 63 bytes (NAMEDATALEN - 1) on a character boundary.
fn identifier(token: &str) -> String {
    let mut name = match token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => token.to_owned(),
    };
    name.make_ascii_lowercase();
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

fn function_body(
    v: &Value,
    text: &str,
    mode: ParseMode,
    s: &mut Statement,
) -> Result<(), ParseError> {
    let lang = defelem(&v["options"], "language")
        .and_then(|d| d["arg"]["node"]["String"]["sval"].as_str())
        .unwrap_or("sql")
        .to_ascii_lowercase();
    // SQL-standard bodies (BEGIN ATOMIC / RETURN expr) are already in the tree: `walk` sees them.
    if !v["sql_body"].is_null() {
        return Ok(());
    }
    let body: Vec<&str> = defelem(&v["options"], "as")
        .and_then(|d| d["arg"]["node"]["List"]["items"].as_array())
        .map(|items| items.iter().filter_map(sval).collect())
        .unwrap_or_default();
    match lang.as_str() {
        "sql" => {
            for b in body {
                analyze_fragment(b, 0, mode, s)?;
            }
            Ok(())
        }
        "plpgsql" => {
            plpgsql_mode(mode)?;
            // libpg_query compiles the body against the declared signature without the
            // catalog, so it rejects some the server accepts (a VARIADIC array parameter)
            // and some the server rejects with its own words (RETURN forms, OUT parameters).
            // The statements a body runs do not depend on the signature, so when the
            // declared one does not compile, the body alone is read as the catalog's bodies
            // are; the server then judges the definition itself. A body that compiles under
            // no signature is refused.
            let tree = match super::libpg::plpgsql(text) {
                Ok(tree) => tree,
                Err(declared) => body
                    .iter()
                    .try_fold(Value::Array(Vec::new()), |mut all, b| {
                        let tree = plpgsql_any_signature(b)
                            .ok_or_else(|| ParseError(format!("in a function body: {declared}")))?;
                        if let Value::Array(items) = &mut all {
                            items.push(tree);
                        }
                        Ok::<_, ParseError>(all)
                    })?,
            };
            plpgsql_tree(&tree, mode, s)
        }
        other => {
            s.hazards.insert(Hazard::OpaqueBody(other.to_owned()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = analyze(sql, ParseMode::default()).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.remove(0)
    }

    #[test]
    fn functions_that_read_what_they_are_given_are_side_channels() {
        for sql in [
            "SELECT query_to_xml('select ssn from users', true, true, '')",
            "SELECT pg_catalog.query_to_xml_and_xmlschema('select 1', true, true, '')",
            "SELECT table_to_xml('users', true, true, '')",
            "SELECT schema_to_xml('public', true, true, '')",
            "SELECT database_to_xml(true, true, '')",
            "SELECT cursor_to_xml('c', 10, true, true, '')",
            "SELECT * FROM ts_stat('select to_tsvector(email) from users')",
            "SELECT ts_rewrite('a & b'::tsquery, 'select t, s from aliases')",
            "SELECT x FROM (SELECT table_to_xml('users', true, true, '') AS x) s",
            "CREATE FUNCTION f() RETURNS xml LANGUAGE sql AS $$ SELECT table_to_xml('users', true, true, '') $$",
        ] {
            assert!(one(sql).side_channel.is_some(), "{sql} not caught");
        }
        assert!(
            one("SELECT xmlforest(email) FROM users")
                .side_channel
                .is_none()
        );
    }

    #[test]
    fn bind_parameters_are_the_clients_values_only_in_plain_queries() {
        // asyncpg's introspection, postgres.js's notify: values the client binds.
        for sql in [
            "SELECT set_config('jit', $1, false)",
            "select pg_notify($1, $2)",
            "SELECT pg_notify('chan', $1::text)",
            "DECLARE c CURSOR FOR SELECT set_config('jit', $1, false)",
        ] {
            let s = one(sql);
            assert!(s.side_channel.is_none(), "{sql}: {:?}", s.side_channel);
            assert!(s.param_side_channel.is_some(), "{sql}");
        }
        // Where something else computes the parameter, it is a side channel as before.
        for sql in [
            "PREPARE p(text) AS SELECT set_config('jit', $1, false)",
            "CREATE FUNCTION f(t text) RETURNS text LANGUAGE sql AS $$ SELECT set_config('x', $1, false) $$",
            "CREATE FUNCTION f(t text) RETURNS text LANGUAGE sql BEGIN ATOMIC SELECT set_config('x', $1, false); END",
            "CREATE FUNCTION f(t text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('c', $1); END $$",
            "DO $$ BEGIN PERFORM pg_notify('c', 'x'); END $$",
            "SELECT set_config('jit', $1 || ssn, false) FROM users",
            "SELECT set_config('jit', (SELECT ssn FROM users LIMIT 1), false)",
            "SELECT pg_notify('c', ssn) FROM users",
            "SELECT pg_notify('c', $1), pg_notify('c', email) FROM users",
        ] {
            let s = one(sql);
            assert!(s.side_channel.is_some(), "{sql} not caught");
        }
    }

    #[test]
    fn function_bodies_say_what_they_read() {
        let mode = ParseMode {
            standard_conforming_strings: true,
        };
        let r = body_reads("sql", "SELECT email FROM public.users WHERE id = $1", mode).unwrap();
        assert_eq!(
            r.relations.iter().cloned().collect::<Vec<_>>(),
            vec![(Some("public".to_owned()), "users".to_owned())]
        );
        assert!(r.names.contains("email") && r.functions.is_empty(), "{r:?}");
        let r = body_reads("sql", "SELECT count(*) FROM users", mode).unwrap();
        assert!(r.names.is_empty() && !r.whole_rows(), "{r:?}");
        let r = body_reads(
            "plpgsql",
            "BEGIN RETURN (SELECT upper(ssn) FROM people WHERE id = i); END",
            mode,
        )
        .unwrap();
        assert!(r.relations.contains(&(None, "people".to_owned())), "{r:?}");
        assert!(
            r.names.contains("ssn") && r.functions.contains("upper"),
            "{r:?}"
        );
        // Built at run time, another language, or unparseable: cannot be told.
        assert!(body_reads("plpgsql", "BEGIN EXECUTE 'SELECT 1'; END", mode).is_none());
        assert!(body_reads("c", "whatever", mode).is_none());
        assert!(body_reads("sql", "SELEC nope", mode).is_none());
    }

    /// A body that fetches from or closes a cursor by name can read a cursor the session
    /// declared (its rows returned as the function's values) or close it for other code to
    /// open another query under the name: a side channel when defined, a body that could
    /// return anything when stored. MOVE, OPEN and FOR over a cursor use none but the
    /// body's own (an OPEN of a name in use fails).
    #[test]
    fn bodies_that_fetch_from_or_close_cursors_by_name_are_side_channels() {
        let mode = ParseMode::default();
        let text = "(refcursor) RETURNS text";
        let cursor = "(refcursor) RETURNS refcursor";
        let caught = [
            (
                "plpgsql",
                text,
                "DECLARE k refcursor := $1; r record; BEGIN FETCH k INTO r; RETURN r.x; END",
            ),
            (
                "plpgsql",
                text,
                "DECLARE k refcursor := $1; r record; BEGIN FETCH LAST FROM k INTO r; RETURN r.x; END",
            ),
            (
                "plpgsql",
                cursor,
                "DECLARE k refcursor := $1; BEGIN CLOSE k; OPEN k FOR SELECT upper(ssn) FROM people; RETURN k; END",
            ),
            (
                "plpgsql",
                "() RETURNS int",
                "DECLARE k CURSOR FOR SELECT 1 AS x; r record; BEGIN IF true THEN FETCH k INTO r; END IF; RETURN r.x; END",
            ),
            ("sql", "() RETURNS void", "CLOSE c"),
            ("sql", "() RETURNS void", "SELECT 1; FETCH ALL FROM c"),
        ];
        for (language, signature, body) in caught {
            let s = one(&format!(
                "CREATE FUNCTION f{signature} LANGUAGE {language} AS $b${body}$b$"
            ));
            assert!(s.cursor_by_name, "{body}: {s:?}");
            assert!(
                s.side_channel
                    .as_deref()
                    .is_some_and(|w| w.contains("cursor by name")),
                "{body}: {:?}",
                s.side_channel
            );
            assert!(body_reads(language, body, mode).is_none(), "{body}");
        }
        let fine = [
            "DECLARE k refcursor := $1; BEGIN RETURN 1; END",
            "DECLARE c refcursor; BEGIN MOVE NEXT FROM c; RETURN 1; END",
            "DECLARE k CURSOR FOR SELECT 1 AS x; BEGIN FOR r IN k LOOP NULL; END LOOP; RETURN 1; END",
            "DECLARE k CURSOR FOR SELECT 1 AS x; BEGIN OPEN k; RETURN 1; END",
        ];
        for body in fine {
            let s = one(&format!(
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $b${body}$b$"
            ));
            assert!(
                !s.cursor_by_name && s.side_channel.is_none(),
                "{body}: {s:?}"
            );
            assert!(body_reads("plpgsql", body, mode).is_some(), "{body}");
        }
        // A DO block reads any value it likes anyway; the client's own FETCH and CLOSE are
        // the gate's to follow, not a body's.
        assert!(
            one("DO $$ DECLARE c refcursor := 'c'; BEGIN CLOSE c; END $$")
                .side_channel
                .is_some()
        );
        for sql in ["FETCH ALL FROM c", "CLOSE c", "MOVE NEXT FROM c"] {
            let s = one(sql);
            assert!(
                !s.cursor_by_name && s.side_channel.is_none(),
                "{sql}: {s:?}"
            );
        }
    }

    /// A function whose quoted name holds a dot cannot be told from a schema-qualified one.
    #[test]
    fn dotted_function_names_are_side_channels() {
        for sql in [
            "SELECT \"get.email\"(1)",
            "SELECT public.\"a.b\"(1)",
            "CALL \"p.q\"()",
        ] {
            assert!(one(sql).side_channel.is_some(), "{sql}");
        }
        assert!(one("SELECT public.upper('a')").side_channel.is_none());
        assert!(one("SELECT \"app.v1\".f(1)").side_channel.is_none());
    }

    /// Operators are listed wherever they are used, schema-qualified or not, in bodies too:
    /// one created outside the gate calls a function the statement does not name.
    #[test]
    fn operators_are_listed_wherever_used() {
        let s = one("SELECT a ### b FROM t WHERE c OPERATOR(public.@@@) 1 AND d LIKE 'x%'");
        for op in ["###", "@@@", "~~"] {
            assert!(s.operators.contains(op), "{op}: {:?}", s.operators);
        }
        let r = body_reads("sql", "SELECT ### $1", ParseMode::default()).unwrap();
        assert!(r.operators.contains("###"), "{r:?}");
        assert!(one("SELECT 1").operators.is_empty());
    }

    /// A function whose body would run in another string literal mode or encoding than the
    /// gate reads it in is refused, as the same change is at the top level.
    #[test]
    fn functions_cannot_set_the_parsing_mode() {
        for sql in [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET standard_conforming_strings = off AS 'SELECT 1'",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET STANDARD_CONFORMING_STRINGS TO on AS 'SELECT 1'",
            "CREATE PROCEDURE p() LANGUAGE sql SET client_encoding = 'SJIS' AS 'SELECT 1'",
            "ALTER FUNCTION f() SET standard_conforming_strings = off",
            "ALTER PROCEDURE p() SET standard_conforming_strings FROM CURRENT",
            "ALTER FUNCTION f() STABLE SET client_encoding TO 'BIG5'",
        ] {
            assert!(one(sql).sets_parsing.is_some(), "{sql}");
        }
        for sql in [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = public AS 'SELECT 1'",
            "ALTER FUNCTION f() SET work_mem = '64MB'",
            "ALTER FUNCTION f() RESET ALL",
        ] {
            assert!(one(sql).sets_parsing.is_none(), "{sql}");
        }
    }

    /// What a stored body closes and calls, for refusing calls of one that closes a cursor
    /// by name: read from the parsed body, or, when it does not parse here (a parameter used
    /// by name where a variable is needed), from its words.
    #[test]
    fn stored_bodies_say_whether_they_close_cursors_and_what_they_call() {
        let mode = ParseMode::default();
        let closes = |language, body| body_closes_cursors(language, body, mode);
        let (yes, calls) = closes(
            "plpgsql",
            "DECLARE k refcursor := $1; BEGIN CLOSE k; PERFORM helper(1); RETURN k; END",
        );
        assert!(yes && calls.contains("helper"), "{calls:?}");
        assert!(closes("sql", "SELECT 1; CLOSE c").0);
        assert!(closes("sql", "CLOSE ALL").0);
        // Fetching and opening close nothing (fetched values are masked whole, see
        // `body_reads`).
        for body in [
            "DECLARE k refcursor := $1; r record; BEGIN FETCH k INTO r; RETURN r.x; END",
            "DECLARE k CURSOR FOR SELECT 1; BEGIN OPEN k; RETURN 1; END",
            "BEGIN RETURN (SELECT close FROM prices LIMIT 1); END",
        ] {
            let (yes, calls) = closes("plpgsql", body);
            assert!(!yes, "{body}");
            assert!(calls.is_empty(), "{body}: {calls:?}");
        }
        let (yes, calls) = closes("plpgsql", "BEGIN PERFORM helper(1); RETURN 1; END");
        assert!(!yes && calls.contains("helper"));
        // Does not compile here (`c` is a parameter, a variable is needed): its words tell.
        let (yes, calls) = closes("plpgsql", "BEGIN CLOSE c; PERFORM \"Other\"(1); END");
        assert!(yes, "{calls:?}");
        assert!(calls.contains("other"), "{calls:?}");
        let (yes, calls) = closes("plpgsql", "BEGIN FETCH c INTO r; RETURN helper (r); END");
        assert!(!yes && calls.contains("helper"), "{calls:?}");
        // Not compiled here (`x` is no variable it declares): its tokens tell. A column, a
        // comment or a string saying close closes nothing; EXECUTE does; a comment between
        // a name and its parenthesis hides no call.
        let unparsed = "BEGIN x := (SELECT close FROM prices); -- close it\n RAISE NOTICE 'close'; x := helper/**/(1); END";
        let (yes, calls) = closes("plpgsql", unparsed);
        assert!(!yes && calls.contains("helper"), "{calls:?}");
        assert!(closes("plpgsql", "BEGIN x := 1; EXECUTE 'SELECT 1'; END").0);
        assert!(closes("plpgsql", "BEGIN x := 1; IF x THEN CLOSE c; END IF; END").0);
        assert!(closes("plpgsql", "BEGIN x := U&\"\\0072eopen\"(1); END").0);
        assert!(
            closes(
                "plpgsql",
                "BEGIN x := U&\"!0072eopen\" UESCAPE '!' (1); END"
            )
            .0
        );
        let (_, calls) = closes("plpgsql", "BEGIN x := \"a\"\"b\"(1); END");
        assert!(calls.contains("a\"b"), "{calls:?}");
        let long = "f".repeat(70);
        let (_, calls) =
            body_closes_cursors("plpgsql", &format!("BEGIN x := {long}(1); END"), mode);
        assert!(calls.contains(&"f".repeat(63)), "{calls:?}");
        // Under standard_conforming_strings off a body that does not compile is not read.
        let off = ParseMode {
            standard_conforming_strings: false,
        };
        assert!(body_closes_cursors("plpgsql", "BEGIN x := 1; END", off).0);
        // Operators a body uses stand for the functions behind them.
        let (_, calls) = closes("sql", "SELECT %%% $1");
        assert!(calls.contains(&operator_key("%%%")), "{calls:?}");
        assert_eq!(operator_of_key(&operator_key("%%%")), Some("%%%"));
        // SQL built at run time may close anything; a procedure called is followed.
        assert!(closes("plpgsql", "BEGIN EXECUTE 'CLOSE ' || quote_ident($1); END").0);
        let (yes, calls) = closes("plpgsql", "BEGIN CALL reopen_proc($1); RETURN 1; END");
        assert!(!yes && calls.contains("reopen_proc"), "{calls:?}");
        // What reads a cursor or query given to it returns what it read: anything.
        for body in [
            "SELECT cursor_to_xml($1, 10, false, false, '')",
            "SELECT query_to_xml('select email from users', true, true, '')",
        ] {
            assert!(body_reads("sql", body, mode).is_none(), "{body}");
        }
        // A SQL-standard body is read from its whole definition, as the server prints it.
        let definition = "CREATE OR REPLACE FUNCTION public.f(c refcursor)\n RETURNS text\n LANGUAGE sql\nRETURN reopen(c)\n";
        let (yes, calls) = closes(crate::postgres::catalog::SQL_DEFINITION, definition);
        assert!(!yes && calls.contains("reopen"), "{calls:?}");
        let definition = "CREATE OR REPLACE FUNCTION public.f(i integer)\n RETURNS text\n LANGUAGE sql\nBEGIN ATOMIC\n SELECT lower(users.email) AS lower\n    FROM users\n   WHERE (users.id = f.i);\nEND\n";
        let r = body_reads(crate::postgres::catalog::SQL_DEFINITION, definition, mode).unwrap();
        assert!(
            r.names.contains("email") && r.relations.contains(&(None, "users".to_owned())),
            "{r:?}"
        );
        // Other languages are not read.
        assert_eq!(
            closes("plpython3u", "plpy.execute('CLOSE c')"),
            (false, BTreeSet::new())
        );
    }

    #[test]
    fn each_statement_of_a_body_is_read_on_its_own_text() {
        let mode = ParseMode {
            standard_conforming_strings: true,
        };
        // The COPY's query is the COPY's own, not the first parenthesis of the body (which
        // here is no statement: the whole analysis failed, a false refusal).
        let body = "SELECT (1); COPY (SELECT email FROM users) TO STDOUT";
        assert!(body_reads("sql", body, mode).is_some_and(|r| r.names.contains("email")));
        one(&format!(
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $b${body}$b$"
        ));
        // Many COPYs in one body: each is looked up in its own text (before, each scanned
        // the whole body: time growing with the square of the body).
        let many = "COPY (SELECT 1) TO STDOUT; ".repeat(2000);
        assert!(body_reads("sql", &many, mode).is_some());
    }

    #[test]
    fn a_wrapped_body_gets_a_dollar_tag_it_does_not_contain() {
        assert_eq!(free_dollar_tag("BEGIN NULL; END"), "jitgate");
        assert_eq!(free_dollar_tag("$jitgate$ $jitgatex$"), "jitgatexx");
        assert_eq!(free_dollar_tag("$jitgatexx$ $jitgate"), "jitgatexxx");
        let pieces = ["$", "jitgate", "x", "xx", " ", "$jitgate", "$jitgatex$"];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..20_000 {
            let mut body = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let tag = free_dollar_tag(&body);
            assert!(
                !body.contains(&format!("${tag}$")),
                "{body:?} contains {tag}"
            );
        }
        // A body naming every tag up to a long one: one pass, the next tag.
        let hostile: String = (0..3000)
            .map(|n| format!("$jitgate{}$ ", "x".repeat(n)))
            .collect();
        assert_eq!(
            free_dollar_tag(&hostile),
            format!("jitgate{}", "x".repeat(3000))
        );
    }

    #[test]
    fn renaming_constructs_are_noticed() {
        for sql in [
            "SELECT upper(d) FROM users AS u(i, n, e, d)",
            "SELECT value FROM users, jsonb_each_text(to_jsonb(users)) WHERE key = 'ssn'",
            "SELECT v FROM users, LATERAL (VALUES (ssn || '')) s(v)",
            "SELECT column1 FROM users, LATERAL (VALUES (ssn)) s",
            "WITH c(x) AS (SELECT ssn FROM users) SELECT x FROM c",
            "SELECT * FROM json_to_record('{}') AS r(ssn text)",
            "SELECT * FROM XMLTABLE('/r' PASSING '<r/>' COLUMNS a text)",
            "SELECT x FROM (SELECT (SELECT v FROM (VALUES (ssn)) t(v)) x FROM users) s",
        ] {
            assert!(one(sql).renames, "{sql}");
        }
        for sql in [
            "SELECT upper(email) FROM users u",
            "SELECT count(*) FROM users WHERE email LIKE 'a%'",
            "SELECT x FROM (SELECT email AS x FROM users) s",
            "WITH c AS (SELECT email FROM users) SELECT email FROM c",
        ] {
            assert!(!one(sql).renames, "{sql}");
        }
    }

    #[test]
    fn result_feeding_references() {
        let refs = |sql: &str| one(sql).output_refs.into_iter().collect::<Vec<_>>();
        assert_eq!(
            refs("SELECT lower(email) FROM users WHERE ssn = 'x'"),
            ["email"]
        );
        assert_eq!(
            refs("SELECT x FROM (SELECT u.email || '' AS x FROM users u) s"),
            ["email", "x"]
        );
        assert_eq!(refs("SELECT 1 UNION ALL SELECT * FROM users"), ["*"]);
        assert_eq!(refs("SELECT row_to_json(u) FROM users u"), ["u"]);
        assert_eq!(refs("SELECT (u).card FROM users u"), ["u"]);
        assert_eq!(
            refs("UPDATE t SET a = b WHERE d = 2 RETURNING c"),
            ["b", "c"]
        );
        assert_eq!(refs("SELECT unnest(ARRAY(SELECT ssn FROM users))"), ["ssn"]);
        assert_eq!(
            refs("SELECT count(*) FROM users WHERE email LIKE 'a%'"),
            [] as [&str; 0]
        );
        let s = one(r#"SELECT 1 FROM "Users" u, public.orders"#);
        assert!(s.aliases.contains("u"));
        assert!(s.relations.contains(&(None, "Users".to_owned())));
        assert!(
            s.relations
                .contains(&(Some("public".into()), "orders".into()))
        );
        assert_eq!(
            one("DECLARE c CURSOR FOR SELECT email FROM users").cursor,
            Some(CursorUse::Declare {
                name: "c".into(),
                hold: false
            })
        );
        // Every spelling that holds, and options around it that do not.
        for text in [
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DECLARE c BINARY NO SCROLL CURSOR WITH HOLD FOR SELECT 1",
            "declare \"c\" insensitive scroll cursor with hold for select 1",
        ] {
            assert_eq!(
                one(text).cursor,
                Some(CursorUse::Declare {
                    name: "c".into(),
                    hold: true
                }),
                "{text}"
            );
        }
        for text in [
            "DECLARE c BINARY INSENSITIVE SCROLL CURSOR WITHOUT HOLD FOR SELECT 1",
            "DECLARE c NO SCROLL CURSOR FOR SELECT 1",
        ] {
            assert_eq!(
                one(text).cursor,
                Some(CursorUse::Declare {
                    name: "c".into(),
                    hold: false
                }),
                "{text}"
            );
        }
        assert_eq!(
            one("FETCH 10 FROM c").cursor,
            Some(CursorUse::Fetch("c".into()))
        );
        assert_eq!(one("CLOSE ALL").cursor, Some(CursorUse::Close(None)));
    }

    #[test]
    fn reads_writes_and_ddl() {
        let s = one("SELECT a FROM public.users u JOIN orders o ON o.uid = u.id");
        assert_eq!(s.access.0, Access::Read);
        assert!(s.kinds.contains("select"));
        assert!(
            s.tables.contains("public.users")
                && s.tables.contains("users")
                && s.tables.contains("orders")
        );
        assert_eq!(one("INSERT INTO t VALUES (1)").access.0, Access::Write);
        assert_eq!(one("select * from t for update").access.0, Access::Write);
        assert_eq!(one("DROP TABLE t").access.0, Access::Admin);
        assert!(one("DROP TABLE t").kinds.contains("ddl"));
        assert_eq!(one("TRUNCATE t").access.0, Access::Admin);
        assert_eq!(one("ALTER TABLE t ADD c int").access.0, Access::Admin);
        assert_eq!(one("select * into t2 from t").access.0, Access::Admin);
        assert_eq!(one("VACUUM t").access.0, Access::Admin);
        assert_eq!(one("BEGIN").access.0, Access::Read);
    }

    #[test]
    fn plpgsql_bodies_the_declared_signature_cannot_compile_are_still_read() {
        // libpg_query rejects a VARIADIC array parameter without the catalog; the server
        // does not. The body's statements are what counts, and they are found.
        let s = one(
            "CREATE FUNCTION vari(VARIADIC int[]) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN DELETE FROM audit_log; PERFORM pg_read_file('/etc/passwd'); END $$",
        );
        assert!(s.kinds.contains("delete"), "{:?}", s.kinds);
        assert!(s.write_without_where);
        assert!(s.tables.contains("audit_log"));
        // A RETURN form the declared signature forbids: the server rejects the definition
        // in its own words; the gate still reads the body.
        let s = one(
            "CREATE FUNCTION f(OUT a int) LANGUAGE plpgsql AS $$ BEGIN UPDATE t SET x = 1; RETURN a + 1; END $$",
        );
        assert!(s.kinds.contains("update"), "{:?}", s.kinds);
        // A body no signature compiles is refused.
        assert!(
            analyze(
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN Johnny Yuma; END $$",
                ParseMode::default()
            )
            .is_err()
        );
        // So is dynamic SQL hidden behind a signature that does not compile.
        let s = one(
            "CREATE FUNCTION g(VARIADIC text[]) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE $1[1]; END $$",
        );
        assert!(s.hazards.contains(&Hazard::DynamicSql));
    }

    #[test]
    fn nested_writes_and_missing_where_are_found() {
        let s = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
        assert_eq!(s.access.0, Access::Write);
        assert!(s.kinds.contains("delete"));
        assert!(s.write_without_where);
        assert!(s.tables.contains("t"));
        assert!(one("UPDATE t SET a = 1").write_without_where);
        assert!(!one("UPDATE t SET a = 1 WHERE id = 2").write_without_where);
        // Conditions that are always true are no WHERE; MERGE is a delete or update too.
        for sql in [
            "DELETE FROM t WHERE true",
            "DELETE FROM t WHERE 1 = 1",
            "DELETE FROM t WHERE 't'",
            "UPDATE t SET a = 1 WHERE 'yes'::bool",
            "DELETE FROM t WHERE id = id OR false",
            "DELETE FROM t WHERE NOT false",
            "DELETE FROM t WHERE 1 IS NOT NULL",
            "DELETE FROM t WHERE (true) IS TRUE",
            "UPDATE t SET a = 1 WHERE 'a' <> 'b' AND 2 >= 2",
            "DELETE FROM t WHERE id = 3 OR 1 = 1",
            "WITH x AS (DELETE FROM t WHERE true RETURNING 1) SELECT * FROM x",
            "MERGE INTO t USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
            "MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN UPDATE SET a = 1",
            "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE WHEN MATCHED THEN DELETE",
            "MERGE INTO t USING s ON false WHEN NOT MATCHED BY SOURCE THEN DELETE",
        ] {
            assert!(one(sql).write_without_where, "{sql} not caught");
        }
        for sql in [
            "DELETE FROM t WHERE id = 3",
            "DELETE FROM t WHERE false OR id = 3",
            "DELETE FROM t WHERE 1 = 2",
            "DELETE FROM t WHERE id IS NOT NULL",
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "MERGE INTO t USING s ON true WHEN MATCHED AND t.id = 3 THEN DELETE",
            "MERGE INTO t USING s ON true WHEN NOT MATCHED THEN INSERT VALUES (1)",
        ] {
            assert!(!one(sql).write_without_where, "{sql} caught");
        }
    }

    #[test]
    fn functions_are_found_wherever_they_sit() {
        for sql in [
            "UPDATE t SET a = pg_read_file('/etc/passwd') WHERE id = 1",
            "SELECT string_agg(pg_read_file('x'), ',') FROM t",
            "WITH x AS (SELECT pg_read_file('y')) SELECT * FROM x",
            "CREATE TABLE t (a text DEFAULT pg_read_file('z'))",
            "DO $$ BEGIN PERFORM pg_read_file('x'); END $$",
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $b$ SELECT pg_read_file('x') $b$",
            "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $b$ BEGIN RETURN pg_catalog.pg_read_file('x'); END $b$",
            "PREPARE p AS SELECT pg_read_file($1)",
            "EXPLAIN ANALYZE SELECT pg_read_file('x')",
            "SELECT * FROM pg_read_file('x') AS f",
        ] {
            let s = one(sql);
            assert!(
                s.functions.contains("pg_read_file"),
                "{sql}: {:?}",
                s.functions
            );
        }
    }

    #[test]
    fn nested_statements_are_judged_by_what_they_run() {
        let p = one("PREPARE p(int) AS DELETE FROM t WHERE id = $1");
        assert_eq!(
            (p.access.0, p.prepares.as_deref()),
            (Access::Write, Some("p"))
        );
        assert_eq!(one("EXPLAIN ANALYZE DELETE FROM t").access.0, Access::Write);
        assert_eq!(one("EXPLAIN DELETE FROM t").access.0, Access::Read);
        let d = one("DO $$ BEGIN DELETE FROM t; END $$");
        assert_eq!(d.access.0, Access::Write);
        assert!(d.write_without_where);
        let dynamic = one("DO $$ BEGIN EXECUTE 'DROP TABLE ' || 't'; END $$");
        assert!(dynamic.hazards.contains(&Hazard::DynamicSql));
        assert_eq!(one("EXECUTE p(1)").executes.as_deref(), Some("p"));
        let py = one("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS 'return 1'");
        assert!(
            py.hazards
                .contains(&Hazard::OpaqueBody("plpython3u".into()))
        );
    }

    #[test]
    fn read_only_escapes() {
        for sql in [
            "BEGIN READ WRITE",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "SET default_transaction_read_only = off",
            "SET transaction_read_only TO false",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SELECT set_config(name, 'off', false) FROM settings",
            "SET default_transaction_read_only TO DEFAULT",
        ] {
            assert!(one(sql).escapes_read_only.is_some(), "{sql} not caught");
        }
        for sql in [
            "BEGIN",
            "BEGIN READ ONLY",
            "SET search_path = x",
            "SET default_transaction_read_only = on",
        ] {
            assert!(one(sql).escapes_read_only.is_none(), "{sql} caught");
        }
    }

    #[test]
    fn hazards() {
        assert!(
            one("COPY t TO PROGRAM 'ls'")
                .hazards
                .contains(&Hazard::CopyProgram)
        );
        assert!(
            one("COPY t FROM '/etc/passwd'")
                .hazards
                .contains(&Hazard::ServerFile)
        );
        assert!(
            one("CREATE EXTENSION dblink")
                .hazards
                .contains(&Hazard::ForeignConnection)
        );
        assert!(
            one("SELECT dblink_connect('x')")
                .hazards
                .contains(&Hazard::ForeignConnection)
        );
        let c = one("COPY users (id, email) TO STDOUT");
        let copy = c.copy.unwrap();
        assert_eq!((copy.from, copy.table.as_deref()), (false, Some("users")));
        assert_eq!(copy.columns, vec!["id", "email"]);
        assert_eq!(c.access.0, Access::Read);
        let q = one("COPY (SELECT email FROM users) TO STDOUT WITH CSV HEADER")
            .copy
            .unwrap();
        assert_eq!(q.query.as_deref(), Some("SELECT email FROM users"));
        assert_eq!((q.format.as_str(), q.header), ("csv", true));
        let d = one("COPY t TO STDOUT (FORMAT csv, DELIMITER ';', NULL 'x')")
            .copy
            .unwrap();
        assert_eq!((d.delimiter, d.null.as_deref()), (Some(b';'), Some("x")));
        assert_eq!(one("COPY t FROM STDIN").access.0, Access::Write);
    }

    #[test]
    fn multi_statement_strings_split() {
        let v = analyze(
            "SELECT 1; DELETE FROM t WHERE a = 1; ",
            ParseMode::default(),
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].text, "DELETE FROM t WHERE a = 1");
        assert!(analyze("SELEC 1", ParseMode::default()).is_err());
        assert!(analyze("", ParseMode::default()).unwrap().is_empty());
    }

    #[test]
    fn plpgsql_is_not_read_with_nonstandard_strings() {
        let off = ParseMode {
            standard_conforming_strings: false,
        };
        let hidden = "DO $$BEGIN RAISE NOTICE 'a\\''; DELETE FROM t; --';\nEND$$";
        assert!(analyze(hidden, off).is_err());
        assert!(analyze(hidden, ParseMode::default()).is_ok());
    }

    #[test]
    fn prepared_names_keep_their_case_as_folded_by_the_parser() {
        assert_eq!(one("PREPARE m AS SELECT 1").prepares.as_deref(), Some("m"));
        assert_eq!(one("PREPARE M AS SELECT 1").prepares.as_deref(), Some("m"));
        assert_eq!(
            one("PREPARE \"M\" AS SELECT 1").prepares.as_deref(),
            Some("M")
        );
        assert_eq!(one("EXECUTE \"M\"").executes.as_deref(), Some("M"));
        assert_eq!(one("EXECUTE M").executes.as_deref(), Some("m"));
        assert_eq!(
            one("DEALLOCATE \"M\"").deallocates,
            Some(Some("M".to_owned()))
        );
    }

    #[test]
    fn booleans_read_as_postgresql_reads_them() {
        for on in ["on", "ON", "t", "tr", "true", "y", "ye", "yes", "1"] {
            assert_eq!(pg_bool(on), Some(true), "{on}");
        }
        for off in ["of", "off", "f", "fa", "fals", "FALSE", "n", "no", "0"] {
            assert_eq!(pg_bool(off), Some(false), "{off}");
        }
        for neither in ["o", "", "2", "onn", "offf", "truth"] {
            assert_eq!(pg_bool(neither), None, "{neither}");
        }
    }

    #[test]
    fn only_on_keeps_read_only_mode() {
        for sql in [
            "SET default_transaction_read_only = 'fa'",
            "SET default_transaction_read_only = of",
            "SET default_transaction_read_only = 'n'",
            "SET default_transaction_read_only = 0",
            "SET default_transaction_read_only TO DEFAULT",
            "RESET default_transaction_read_only",
            "SET transaction_read_only = 'nonsense'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "BEGIN READ WRITE",
        ] {
            assert!(one(sql).escapes_read_only.is_some(), "{sql}");
        }
        for sql in [
            "SET default_transaction_read_only = on",
            "SET default_transaction_read_only = 'tr'",
            "SET transaction_read_only = 1",
            "BEGIN READ ONLY",
        ] {
            assert!(one(sql).escapes_read_only.is_none(), "{sql}");
        }
    }

    #[test]
    fn parsing_settings_are_noticed() {
        for sql in [
            "SET standard_conforming_strings = off",
            "SET standard_conforming_strings = 'of'",
            "SET standard_conforming_strings = 'maybe'",
            "SELECT set_config('standard_conforming_strings', 'on', false)",
        ] {
            assert!(one(sql).sets_parsing.is_some(), "{sql}");
        }
        for sql in [
            "SET standard_conforming_strings = on",
            "SET standard_conforming_strings = 'tru'",
            "RESET standard_conforming_strings",
            "SET standard_conforming_strings TO DEFAULT",
            "SET backslash_quote = on",
        ] {
            assert!(one(sql).sets_parsing.is_none(), "{sql}");
        }
        assert!(one("SET client_encoding = 'SJIS'").sets_parsing.is_some());
        assert!(one("SET client_encoding = 'UTF8'").sets_parsing.is_none());
        // With standard_conforming_strings off, backslash escapes a quote.
        let off = ParseMode {
            standard_conforming_strings: false,
        };
        let v = analyze(r"SELECT 'a\'; DROP TABLE t; --'", off).unwrap();
        assert_eq!(v.len(), 1);
        let v = analyze(r"SELECT 'a\'; DROP TABLE t; --'", ParseMode::default()).unwrap();
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn statements_that_may_end_portals_are_known() {
        for sql in [
            "COMMIT",
            "end",
            "ROLLBACK",
            "abort",
            "PREPARE TRANSACTION 'x'",
            "COMMIT AND CHAIN",
            "DISCARD ALL",
        ] {
            assert!(one(sql).ends_portals, "{sql}");
        }
        for sql in [
            "BEGIN",
            "START TRANSACTION",
            "SAVEPOINT sp",
            "RELEASE SAVEPOINT sp",
            "SELECT 'commit'",
            "DISCARD PLANS",
        ] {
            assert!(!one(sql).ends_portals, "{sql}");
        }
        let sp = |sql: &str| one(sql).savepoint;
        assert_eq!(sp("SAVEPOINT Sp"), Some(Savepoint::Define("sp".into())));
        assert_eq!(sp("savepoint \"Sp\""), Some(Savepoint::Define("Sp".into())));
        assert_eq!(
            sp("RELEASE SAVEPOINT sp"),
            Some(Savepoint::Release("sp".into()))
        );
        assert_eq!(sp("release sp"), Some(Savepoint::Release("sp".into())));
        assert_eq!(
            sp("ROLLBACK TO SAVEPOINT sp"),
            Some(Savepoint::RollbackTo("sp".into()))
        );
        assert_eq!(
            sp("rollback to sp"),
            Some(Savepoint::RollbackTo("sp".into()))
        );
        assert!(!one("rollback to sp").ends_portals);
        assert_eq!(sp("COMMIT"), None);
    }

    #[test]
    fn discard_is_noticed_by_what_it_is_not_how_it_reads() {
        for sql in ["DISCARD ALL", "discard all", "  Discard All"] {
            assert!(one(sql).discards, "{sql}");
        }
        for sql in [
            "SELECT 'discard all'",
            "SHOW discard",
            "RESET ALL",
            "DISCARD PLANS",
            "DISCARD TEMP",
        ] {
            assert!(!one(sql).discards, "{sql}");
        }
    }
}
