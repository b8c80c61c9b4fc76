//! The PostgreSQL gate: a protocol-aware proxy that injects credentials, enforces each
//! statement, masks results and records sessions.
//!
//! * [`startup`]: the client's opening (TLS, cancel, startup packet).
//! * [`upstream`]: the proxy's own login to the server with the grant level's credentials.
//! * [`session`]: the two pumps (client to server, server to client) and their shared state.
//! * [`sql`]: what a statement does (libpg_query); [`shape`]: reusing that for the same
//!   statement with other values; [`guard`]: whether it may.
//! * [`mask`], [`rows`]: detectors, strategies, and their application to rows and COPY.
//! * [`catalog`]: table and column names for masking rules.
//! * [`wire`], [`stream`], [`tls`], [`cancel`]: framing, transports, certificates, cancel keys.
pub mod cancel;
pub mod catalog;
pub mod guard;
pub mod mask;
pub mod rows;
pub mod session;
pub mod shape;
pub mod sql;
pub mod startup;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod wire;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use self::{
    cancel::CancelKeys,
    sql::{ParseMode, Statement},
    tls::{LocalCa, UpstreamTlsConfigs},
};

/// Analyses kept (by text), so repeated statements (prepared, pooled, pgbench) parse once.
const ANALYSIS_CACHE: usize = 4096;

/// What every PostgreSQL session shares.
pub struct PgContext {
    /// Signs certificates for client-side TLS.
    pub ca: Option<Arc<LocalCa>>,
    pub tls: Arc<UpstreamTlsConfigs>,
    pub cancel: CancelKeys,
    /// Key of the `hash` masking strategy's pseudonyms.
    pub mask_key: [u8; 32],
    cache: Mutex<HashMap<AnalysisKey, Analysis>>,
    /// Analyses by statement shape (literals taken out), for those that cannot depend on a
    /// literal's value (see [`shape`]).
    shapes: Mutex<HashMap<AnalysisKey, Arc<Vec<Statement>>>>,
}

/// Statement text and its `standard_conforming_strings`.
type AnalysisKey = (String, bool);
type Analysis = Result<Vec<Statement>, String>;

impl PgContext {
    pub fn new(ca: Option<Arc<LocalCa>>, mask_key: [u8; 32]) -> Self {
        Self {
            ca,
            tls: Arc::new(UpstreamTlsConfigs::default()),
            cancel: CancelKeys::default(),
            mask_key,
            cache: Mutex::new(HashMap::new()),
            shapes: Mutex::new(HashMap::new()),
        }
    }

    /// Analyses `text` (cached).
    pub fn analyze(&self, text: &str, mode: ParseMode) -> Result<Vec<Statement>, String> {
        let key = (text.to_owned(), mode.standard_conforming_strings);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return hit.clone();
        }
        let shape_key = shape::shape(text).map(|s| (s, mode.standard_conforming_strings));
        if let Some(key) = &shape_key {
            let template = self
                .shapes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(key)
                .cloned();
            if let Some(template) = template {
                return Ok(shape::instantiate(&template, text));
            }
        }
        let result = sql::analyze(text, mode).map_err(|e| e.0);
        if let (Some(key), Ok(analysis)) = (shape_key, &result)
            && shape::reusable(analysis)
            && analysis.first().map(|s| s.text.as_str()) == Some(&shape::statement_text(text))
        {
            let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
            if shapes.len() >= ANALYSIS_CACHE {
                shapes.clear();
            }
            shapes.insert(key, Arc::new(analysis.clone()));
            // One entry per shape: the text cache would only fill with its instances.
            return result;
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= ANALYSIS_CACHE {
            cache.clear();
        }
        if text.len() <= 16 * 1024 {
            cache.insert(key, result.clone());
        }
        result
    }
}
