//! The PostgreSQL gate: a protocol-aware proxy that injects credentials, enforces each
//! statement, masks results and records sessions.
//!
//! * [`startup`]: the client's opening (TLS, cancel, startup packet).
//! * [`upstream`]: the proxy's own login to the server with the grant level's credentials.
//! * [`session`]: the two pumps (client to server, server to client) and their shared state.
//! * [`sql`]: what a statement does (libpg_query); [`shape`]: reusing that for the same
//!   statement with other values; [`guard`]: whether it may.
//! * [`rows`]: masking (detectors and strategies from [`crate::inspect`]) applied to rows,
//!   COPY data and error fields.
//! * [`catalog`]: table and column names for masking rules.
//! * [`wire`], [`stream`], [`cancel`]: framing, transports, cancel keys (certificates and
//!   upstream TLS come from [`crate::inspect::tls`]).
pub mod cancel;
pub mod catalog;
pub mod config;
pub mod effects;
pub mod guard;
pub mod libpg;
pub mod message;
pub mod options;
pub mod rows;
pub mod session;
pub mod shape;
pub mod sql;
pub mod startup;
pub mod stream;
pub mod upstream;
pub mod wire;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use self::{
    cancel::CancelKeys,
    sql::{ParseMode, ResultRefs, Statement},
};
use crate::{
    config::ResourceConfig,
    inspect::tls::UpstreamTlsConfigs,
    protocol::{Conn, Outcome, Protocol, Services, Session},
};

/// Analyses kept (by text), so repeated statements (prepared, pooled, pgbench) parse once.
const ANALYSIS_CACHE: usize = 4096;

/// The PostgreSQL protocol, and what every PostgreSQL session shares for the agent's
/// lifetime (kept across reloads: live sessions' cancel keys must outlive a reload).
pub struct Postgres {
    pub tls: Arc<UpstreamTlsConfigs>,
    pub cancel: CancelKeys,
    /// Analyses by text, one map per value of `standard_conforming_strings` (so that a
    /// lookup borrows the text instead of copying it into a key).
    cache: Mutex<[HashMap<String, Analyzed>; 2]>,
    /// Analyses by statement shape (literals taken out), for those that cannot depend on a
    /// literal's value (see [`shape`]); keyed like `cache`.
    shapes: Mutex<[HashMap<String, Arc<Analysis>>; 2]>,
    /// Which functions may act beyond a read session, as the catalogs said.
    pub effects: effects::Effects,
}

type Analyzed = Result<Arc<Analysis>, Unparsed>;

/// Why a statement text could not be analysed.
#[derive(Clone, Debug)]
pub struct Unparsed {
    pub message: String,
    /// Where the text stops parsing (1-based characters), when that is the reason.
    pub position: Option<u32>,
}

/// What a query string does, shared (not copied) by every statement with the same text or
/// shape, in any session.
#[derive(Debug)]
pub struct Analysis {
    pub statements: Vec<Statement>,
    /// What its result rows may be computed from, when that is known from the text alone (no
    /// `EXECUTE` of a prepared statement, no cursor): sessions take it as is.
    pub refs: Option<Arc<ResultRefs>>,
    /// Each statement's [`Statement::primary_kind`], which metrics count per execution.
    pub primary_kinds: Vec<&'static str>,
}

impl Analysis {
    fn new(statements: Vec<Statement>) -> Self {
        let standalone = statements
            .iter()
            .all(|s| s.executes.is_none() && s.cursor.is_none());
        let refs = standalone.then(|| {
            let mut refs = ResultRefs::default();
            for s in &statements {
                refs.add(s);
            }
            Arc::new(refs)
        });
        let primary_kinds = statements.iter().map(Statement::primary_kind).collect();
        Self {
            statements,
            refs,
            primary_kinds,
        }
    }
}

impl std::ops::Deref for Analysis {
    type Target = [Statement];

    fn deref(&self) -> &[Statement] {
        &self.statements
    }
}

impl Protocol for Postgres {
    const NAME: &'static str = "postgres";
    const KEYS: &'static [&'static str] = config::KEYS;
    type Settings = config::PostgresResource;

    fn configure(cx: &mut ResourceConfig<'_, '_>) -> Option<config::PostgresResource> {
        Some(config::configure(cx))
    }

    fn start(_: &Services) -> Self {
        Self::new()
    }

    fn early_refusal(limit: &crate::protocol::limits::Exceeded) -> Option<Vec<u8>> {
        // Sent before the startup packet is read: libpq reads it after sending its own
        // (or as the answer to its SSLRequest) and shows it like the server's "too many
        // clients".
        let mut out = bytes::BytesMut::new();
        session::limit_error(limit).write(&mut out);
        Some(out.to_vec())
    }

    fn serve<'a>(
        &'a self,
        session: Session<'a>,
        settings: &'a config::PostgresResource,
        client: Conn,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        session::serve(self, session, settings, client)
    }
}

impl Default for Postgres {
    fn default() -> Self {
        Self::new()
    }
}

impl Postgres {
    pub fn new() -> Self {
        Self {
            tls: Arc::new(UpstreamTlsConfigs::default()),
            cancel: CancelKeys::default(),
            cache: Mutex::default(),
            shapes: Mutex::default(),
            effects: effects::Effects::default(),
        }
    }

    /// Analyses `text` (cached). An analysis served by shape is its shape's first
    /// instance's: every field but [`Statement::text`] reads the same for all instances.
    pub fn analyze(&self, text: &str, mode: ParseMode) -> Analyzed {
        let scs = usize::from(mode.standard_conforming_strings);
        if let Some(hit) = self.cache.lock().unwrap_or_else(PoisonError::into_inner)[scs].get(text)
        {
            return hit.clone();
        }
        let shape_key = shape::shape(text);
        if let Some(key) = &shape_key
            && let Some(template) =
                self.shapes.lock().unwrap_or_else(PoisonError::into_inner)[scs].get(key)
        {
            return Ok(template.clone());
        }
        let result = sql::analyze(text, mode)
            .map(|a| Arc::new(Analysis::new(a)))
            .map_err(|e| Unparsed {
                message: e.0,
                position: libpg::error_position(text, mode.options()),
            });
        if let (Some(key), Ok(analysis)) = (shape_key, &result)
            && shape::reusable(analysis)
            && analysis.first().map(|s| s.text.as_str()) == Some(&shape::statement_text(text))
        {
            let shapes = &mut self.shapes.lock().unwrap_or_else(PoisonError::into_inner)[scs];
            if shapes.len() >= ANALYSIS_CACHE {
                shapes.clear();
            }
            shapes.insert(key, analysis.clone());
            // One entry per shape: the text cache would only fill with its instances.
            return result;
        }
        if text.len() <= 16 * 1024 {
            let cache = &mut self.cache.lock().unwrap_or_else(PoisonError::into_inner)[scs];
            if cache.len() >= ANALYSIS_CACHE {
                cache.clear();
            }
            cache.insert(text.to_owned(), result.clone());
        }
        result
    }
}
