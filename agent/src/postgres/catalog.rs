//! Names the masking rules need and the data stream does not carry: which table a
//! RowDescription's table oid is, which columns a `COPY table TO` emits, what a
//! `COPY (query) TO` returns. Looked up on a side connection of the session (same login, so
//! the same visibility), opened on first need, and cached for the session.

use std::{collections::HashMap, sync::Arc};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt as _;

use super::{
    rows::{Column, parse_row_description},
    upstream::{Login, Upstream},
    wire::{Frame, take_i16},
};

pub struct Catalog {
    login: Arc<Login>,
    conn: Option<Upstream>,
    columns: HashMap<(u32, i16), ColumnName>,
    relations: HashMap<(Option<String>, String), Option<Arc<Relation>>>,
    /// By relation oid: for a view or materialized view, the table columns it reads; `None`
    /// for anything else.
    views: HashMap<u32, Option<Arc<Vec<ColumnName>>>>,
    /// By plain name: (language, body) of every function of that name outside `pg_catalog`,
    /// `information_schema` and extensions.
    bodies: HashMap<String, Arc<Vec<(String, String)>>>,
    /// By plain name: whether one of its bodies closes a cursor by name, and what they call
    /// (see [`super::sql::body_closes_cursors`]), kept beside `bodies` so that a body is
    /// parsed once per session, not per statement that calls it.
    closes: HashMap<String, Arc<(bool, std::collections::BTreeSet<String>)>>,
    /// By plain name: what functions this session defined through the gate read (see
    /// [`super::sql::Statement::defines_function`]), each definition's refs merged.
    defined_here: HashMap<String, Arc<super::sql::ResultRefs>>,
    /// By operator name: the functions behind those of the name that are not built in (see
    /// [`Catalog::operator_functions`]).
    operators: HashMap<String, Vec<String>>,
}

/// (schema, table, column).
pub type ColumnName = Arc<(String, String, String)>;

/// A table (or view) and its columns.
#[derive(Debug)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
}

/// The side connection could not answer: masking decisions that need it fail closed.
#[derive(Debug, thiserror::Error)]
#[error("the catalog lookup connection failed")]
pub struct CatalogError;

/// A lookup that takes longer fails (closed).
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most relations cached per session.
const MAX_CACHED: usize = 4096;

/// A function's name with ASCII capitals folded, as [`super::sql::Statement::functions`]
/// holds names (a quoted `"ReOpen"` is listed as `reopen`): lookups by name match every
/// function the name may mean, whatever its case.
pub const FOLDED_PRONAME: &str =
    "pg_catalog.translate(p.proname, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')";

/// A function's language, or [`UNREADABLE`] for one that sets the string literal mode or the
/// encoding it runs in (created outside the gate, which refuses that): its body runs in
/// another mode than the gate would read it in.
const LANGUAGE_AS_READ: &str = "CASE WHEN pg_catalog.array_to_string(p.proconfig, ',') \
     OPERATOR(pg_catalog.~*) 'standard_conforming_strings|client_encoding' THEN '?' \
     WHEN l.lanname = 'sql' AND p.prosrc = '' THEN 'sql-definition' ELSE l.lanname END";

/// A function's body: its source, or for a SQL-standard body (`BEGIN ATOMIC ... END`,
/// `RETURN expr`: PostgreSQL 14 keeps it parsed, with an empty source) the whole definition
/// as the server prints it ([`SQL_DEFINITION`]).
const BODY_AS_READ: &str = "CASE WHEN l.lanname = 'sql' AND p.prosrc = '' \
     THEN pg_catalog.pg_get_functiondef(p.oid) ELSE p.prosrc END";

/// The language [`LANGUAGE_AS_READ`] gives a SQL-standard body, read as its whole
/// `CREATE FUNCTION` statement.
pub const SQL_DEFINITION: &str = "sql-definition";

/// The language [`LANGUAGE_AS_READ`] gives a body the gate cannot read as the server runs it.
pub const UNREADABLE: &str = "?";

/// Names as a list of literals for `IN (...)`.
fn literal_list(names: &[impl AsRef<str>]) -> String {
    names
        .iter()
        .map(|n| quote_literal(n.as_ref()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Quotes an identifier the way `quote_ident` does.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An escape-string literal: it means the same whatever `standard_conforming_strings` says.
fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

impl Catalog {
    pub fn new(login: Arc<Login>) -> Self {
        Self {
            login,
            conn: None,
            columns: HashMap::new(),
            relations: HashMap::new(),
            views: HashMap::new(),
            bodies: HashMap::new(),
            closes: HashMap::new(),
            defined_here: HashMap::new(),
            operators: HashMap::new(),
        }
    }

    async fn conn(&mut self) -> Option<&mut Upstream> {
        if self.conn.is_none() {
            match self.login.connect().await {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "catalog lookup connection failed");
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    /// Runs `sql` (simple protocol), returning text rows.
    /// Runs one simple query; any failure (connection, timeout, server error, a row it cannot
    /// read) is an error, and a broken connection is dropped so the next lookup reconnects.
    /// Runs one catalog query whose rows have `columns` values each. A row of another width
    /// fails the lookup (whatever answers is not the catalog the query was written for), so
    /// callers may read every row's `columns` values without checking.
    async fn query(
        &mut self,
        sql: &str,
        columns: usize,
    ) -> Result<Vec<Vec<Option<String>>>, CatalogError> {
        let conn = self.conn().await.ok_or(CatalogError)?;
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|_| CatalogError)?;
        let exchange = async {
            conn.writer.write_all(&buf).await.ok()?;
            let mut rows = Vec::new();
            let mut failed = false;
            loop {
                let frame = conn.reader.next().await.ok()??;
                match frame.tag {
                    b'D' => match data_row(&frame) {
                        Some(r) if r.len() == columns => rows.push(r),
                        _ => failed = true,
                    },
                    b'E' => failed = true,
                    b'Z' => break,
                    _ => {}
                }
            }
            Some((rows, failed))
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, exchange).await {
            Ok(Some((rows, false))) => Ok(rows),
            Ok(Some((_, true))) => Err(CatalogError),
            _ => {
                self.conn = None;
                Err(CatalogError)
            }
        }
    }

    /// The (language, body) of every function named `name` that is not built in: outside
    /// `pg_catalog` and `information_schema`, and not a member of an extension (code a
    /// superuser installed, trusted like the built-ins). Empty for built-ins.
    pub async fn function_bodies(
        &mut self,
        name: &str,
    ) -> Result<Arc<Vec<(String, String)>>, CatalogError> {
        if let Some(hit) = self.bodies.get(name) {
            return Ok(hit.clone());
        }
        let rows = self
            .query(
                &format!(
                    "SELECT {LANGUAGE_AS_READ}, {BODY_AS_READ} FROM pg_catalog.pg_proc p \
                 JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE {FOLDED_PRONAME} = {} AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                   WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid \
                   AND d.deptype = 'e')",
                    quote_literal(name)
                ),
                2,
            )
            .await?;
        let bodies = Arc::new(
            rows.into_iter()
                .filter_map(|r| match &r[..] {
                    [Some(lang), Some(src)] => Some((lang.clone(), src.clone())),
                    // A body the catalog will not show is not known.
                    [Some(lang), None] => Some((lang.clone(), String::new())),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        );
        if self.bodies.len() >= MAX_CACHED {
            self.bodies.clear();
        }
        self.bodies.insert(name.to_owned(), bodies.clone());
        Ok(bodies)
    }

    /// The session defined, replaced, altered or dropped something through the gate (a
    /// function among them, perhaps): what was cached about functions may be stale. A
    /// function it defined (`defined`, with what its body reads) is remembered for the rest
    /// of the session beside what the catalog says, which does not show it before the
    /// session commits (a rolled-back definition stays remembered: more masking, not less).
    pub fn functions_changed(&mut self, defined: Option<(&str, &super::sql::ResultRefs)>) {
        self.bodies.clear();
        self.closes.clear();
        self.operators.clear();
        if let Some((name, refs)) = defined {
            let mut all = super::sql::ResultRefs::default();
            if let Some(before) = self.defined_here.get(name) {
                all.merge(before);
            }
            all.merge(refs);
            if self.defined_here.len() >= MAX_CACHED {
                self.defined_here.clear();
            }
            self.defined_here.insert(name.to_owned(), Arc::new(all));
        }
    }

    /// The functions behind the operators named `names` that are not built in (outside
    /// `pg_catalog` and `information_schema`, and no extension's), by plain name folded as
    /// [`super::sql::Statement::functions`] holds names: such an operator calls a function
    /// the statement does not name, to be followed as if it did (most wrap a built-in, which
    /// has no body to follow).
    pub async fn operator_functions(
        &mut self,
        names: &std::collections::BTreeSet<String>,
    ) -> Result<std::collections::BTreeSet<String>, CatalogError> {
        let mut behind = std::collections::BTreeSet::new();
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| match self.operators.get(*n) {
                Some(functions) => {
                    behind.extend(functions.iter().cloned());
                    false
                }
                None => true,
            })
            .collect();
        if !missing.is_empty() {
            let list = literal_list(&missing);
            let rows = self
                .query(
                    &format!(
                        "SELECT DISTINCT o.oprname, {FOLDED_PRONAME} FROM pg_catalog.pg_operator o \
                     JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode \
                     JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace \
                     WHERE o.oprname IN ({list}) AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                     AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                       WHERE d.classid = 'pg_catalog.pg_operator'::regclass AND d.objid = o.oid \
                       AND d.deptype = 'e')"
                    ),
                    2,
                )
                .await?;
            let mut found: HashMap<&str, Vec<String>> =
                missing.iter().map(|n| (n.as_str(), Vec::new())).collect();
            for row in &rows {
                if let [Some(op), Some(function)] = &row[..]
                    && let Some(functions) = found.get_mut(op.as_str())
                {
                    functions.push(function.clone());
                }
            }
            // The answer is taken before the cache may be cleared to make room.
            behind.extend(found.values().flatten().cloned());
            if self.operators.len() + found.len() > MAX_CACHED {
                self.operators.clear();
            }
            for (name, functions) in found {
                self.operators.insert(name.to_owned(), functions);
            }
        }
        Ok(behind)
    }

    /// What the session's own definitions of functions named `name` read, if it made any.
    pub fn defined_here(&self, name: &str) -> Option<Arc<super::sql::ResultRefs>> {
        self.defined_here.get(name).cloned()
    }

    /// Whether the bodies of the functions named `name` close a cursor by name, and what they
    /// call: from the cache, else read from the bodies (looked up if need be) with `read`.
    pub async fn function_closes(
        &mut self,
        name: &str,
        read: impl Fn(&str, &str) -> (bool, std::collections::BTreeSet<String>),
    ) -> Result<Arc<(bool, std::collections::BTreeSet<String>)>, CatalogError> {
        if let Some(hit) = self.closes.get(name) {
            return Ok(hit.clone());
        }
        let bodies = self.function_bodies(name).await?;
        let mut all = (false, std::collections::BTreeSet::new());
        for (language, body) in bodies.iter() {
            let (closes, calls) = read(language, body);
            all.0 |= closes;
            all.1.extend(calls);
        }
        let all = Arc::new(all);
        if self.closes.len() >= MAX_CACHED {
            self.closes.clear();
        }
        self.closes.insert(name.to_owned(), all.clone());
        Ok(all)
    }

    /// Looks up the bodies of every one of `names` not cached yet, in one query (a statement
    /// names several functions, built-ins mostly, whose answer is that there is none).
    pub async fn prefetch_bodies(&mut self, names: &[&str]) -> Result<(), CatalogError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.bodies.contains_key(*n))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list = literal_list(&missing);
        let rows = self
            .query(
                &format!(
                    "SELECT {FOLDED_PRONAME}, {LANGUAGE_AS_READ}, {BODY_AS_READ} FROM pg_catalog.pg_proc p \
                 JOIN pg_catalog.pg_language l ON l.oid = p.prolang \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE {FOLDED_PRONAME} IN ({list}) AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                   WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid \
                   AND d.deptype = 'e')"
                ),
                3,
            )
            .await?;
        let mut found: HashMap<&str, Vec<(String, String)>> =
            missing.iter().map(|n| (*n, Vec::new())).collect();
        for row in rows {
            if let [Some(name), Some(lang), src] = &row[..]
                && let Some(bodies) = found.get_mut(name.as_str())
            {
                // A body the catalog will not show is not known.
                bodies.push((lang.clone(), src.clone().unwrap_or_default()));
            }
        }
        if self.bodies.len() + found.len() > MAX_CACHED {
            self.bodies.clear();
        }
        for (name, bodies) in found {
            self.bodies.insert(name.to_owned(), Arc::new(bodies));
        }
        Ok(())
    }

    /// For each of `names` that names a function, whether some function of that name may act
    /// beyond a read-only transaction (see [`super::effects`]).
    pub async fn function_effects(
        &mut self,
        names: &[String],
    ) -> Result<Vec<(String, bool)>, CatalogError> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let rows = self.query(&super::effects::lookup_sql(&names), 2).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match &r[..] {
                [Some(name), Some(acts)] => Some((name.clone(), acts == "true")),
                _ => None,
            })
            .collect())
    }

    /// The real (schema, table, column) of each table column of a result, by table oid and
    /// column number: the output name may be an alias. Columns missing from the answer (a
    /// failed lookup, a dropped column) are left out; callers treat them as unknown.
    pub async fn origins(&mut self, cols: &[Column]) -> HashMap<(u32, i16), ColumnName> {
        let unknown: Vec<(u32, i16)> = cols
            .iter()
            .filter(|c| c.table_oid != 0 && c.attnum != 0)
            .map(|c| (c.table_oid, c.attnum))
            .filter(|k| !self.columns.contains_key(k))
            .collect();
        if !unknown.is_empty() {
            let list = unknown
                .iter()
                .map(|(oid, n)| format!("({oid}::oid,{n}::int2)"))
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!(
                "SELECT a.attrelid::text, a.attnum::text, n.nspname, c.relname, a.attname \
                 FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE (a.attrelid, a.attnum) IN ({list})"
            );
            if let Ok(rows) = self.query(&sql, 5).await {
                for r in rows {
                    if let [
                        Some(oid),
                        Some(num),
                        Some(schema),
                        Some(table),
                        Some(column),
                    ] = &r[..]
                        && let (Ok(oid), Ok(num)) = (oid.parse(), num.parse())
                    {
                        self.columns.insert(
                            (oid, num),
                            Arc::new((schema.clone(), table.clone(), column.clone())),
                        );
                    }
                }
            }
        }
        cols.iter()
            .filter_map(|c| {
                let k = (c.table_oid, c.attnum);
                self.columns.get(&k).map(|n| (k, n.clone()))
            })
            .collect()
    }

    /// For each of `oids` that is a view or materialized view, every column of every table it
    /// reads, through other views too, as the catalog's dependencies record them. Every
    /// column, not only those the dependencies name: PostgreSQL drops a whole-row use
    /// (`to_jsonb(u)`) from them when a column of the same table is named too. A view's
    /// columns can carry any of those under any name, so masking treats them as computed
    /// from all of them.
    pub async fn view_sources(
        &mut self,
        oids: &[u32],
    ) -> Result<HashMap<u32, Arc<Vec<ColumnName>>>, CatalogError> {
        let unknown: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| *o != 0 && !self.views.contains_key(o))
            .collect();
        if !unknown.is_empty() {
            let list = unknown
                .iter()
                .map(|o| format!("{o}::oid"))
                .collect::<Vec<_>>()
                .join(",");
            let rows = self
                .query(&format!(
                    "WITH RECURSIVE v(root, relid) AS ( \
                       SELECT c.oid, c.oid FROM pg_catalog.pg_class c \
                        WHERE c.oid IN ({list}) AND c.relkind IN ('v', 'm') \
                       UNION \
                       SELECT v.root, d.refobjid FROM v \
                         JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.relid \
                         JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass \
                          AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                        WHERE d.refobjid <> v.relid) \
                     SELECT v.root::text, n.nspname, c.relname, a.attname FROM v \
                       JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.relid \
                       JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass \
                        AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass \
                       JOIN pg_catalog.pg_class c ON c.oid = d.refobjid \
                       JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 \
                        AND NOT a.attisdropped \
                     UNION ALL SELECT c.oid::text, NULL, NULL, NULL FROM pg_catalog.pg_class c \
                      WHERE c.oid IN ({list}) AND c.relkind IN ('v', 'm')"
                ), 4)
                .await?;
            let mut found: HashMap<u32, Vec<ColumnName>> = HashMap::new();
            for r in rows {
                let Some(Ok(root)) = r.first().and_then(Option::as_ref).map(|o| o.parse()) else {
                    continue;
                };
                let sources = found.entry(root).or_default();
                if let [_, Some(schema), Some(table), Some(column)] = &r[..] {
                    sources.push(Arc::new((schema.clone(), table.clone(), column.clone())));
                }
            }
            if self.views.len() >= MAX_CACHED {
                self.views.clear();
            }
            for oid in unknown {
                let entry = found.remove(&oid).map(Arc::new);
                self.views.insert(oid, entry);
            }
        }
        Ok(oids
            .iter()
            .filter_map(|o| {
                self.views
                    .get(o)
                    .and_then(Clone::clone)
                    .map(|sources| (*o, sources))
            })
            .collect())
    }

    /// A relation's schema, name and columns, as `name` (schema-qualified or found on the
    /// search path) resolves; `Ok(None)` when no relation has that name (a CTE, a typo).
    pub async fn relation(
        &mut self,
        schema: Option<&str>,
        name: &str,
    ) -> Result<Option<Arc<Relation>>, CatalogError> {
        let key = (schema.map(str::to_owned), name.to_owned());
        if let Some(hit) = self.relations.get(&key) {
            return Ok(hit.clone());
        }
        let qualified = match schema {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(name)),
            None => quote_ident(name),
        };
        let rows = self
            .query(&format!(
                "SELECT n.nspname, c.relname, a.attname, c.oid::text FROM pg_catalog.pg_attribute a \
                 JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.attrelid = to_regclass({})::oid AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                quote_literal(&qualified)
            ), 4)
            .await?;
        let found = rows.first().and_then(|r| match &r[..] {
            [Some(schema), Some(table), _, Some(oid)] => Some(Arc::new(Relation {
                oid: oid.parse().ok()?,
                schema: schema.clone(),
                table: table.clone(),
                columns: rows
                    .iter()
                    .filter_map(|r| r.get(2).cloned().flatten())
                    .collect(),
            })),
            _ => None,
        });
        if self.relations.len() >= MAX_CACHED {
            self.relations.clear();
        }
        self.relations.insert(key, found.clone());
        Ok(found)
    }

    pub async fn describe(&mut self, query: &str) -> Option<Vec<Column>> {
        let conn = self.conn().await?;
        let mut buf = BytesMut::new();
        frontend::parse("", query, std::iter::empty(), &mut buf).ok()?;
        frontend::describe(b'S', "", &mut buf).ok()?;
        frontend::sync(&mut buf);
        let exchange = async {
            conn.writer.write_all(&buf).await.ok()?;
            let mut cols = None;
            loop {
                let frame = conn.reader.next().await.ok()??;
                match frame.tag {
                    b'T' => cols = parse_row_description(&frame.body).ok(),
                    b'n' => cols = Some(Vec::new()),
                    b'Z' => break,
                    _ => {}
                }
            }
            Some(cols)
        };
        match tokio::time::timeout(LOOKUP_TIMEOUT, exchange).await {
            Ok(Some(cols)) => cols,
            _ => {
                self.conn = None;
                None
            }
        }
    }
}

fn data_row(frame: &Frame) -> Option<Vec<Option<String>>> {
    use bytes::Buf as _;
    let mut b = frame.body.clone();
    let n = take_i16(&mut b).ok()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return None;
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return None;
            }
            out.push(Some(String::from_utf8_lossy(&b.split_to(len)).into_owned()));
        }
    }
    Some(out)
}
