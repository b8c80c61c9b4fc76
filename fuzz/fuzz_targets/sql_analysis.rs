//! The statement analysis every Query and Parse goes through: libpg_query's parse, the walk
//! over the tree (kinds, tables, functions, hazards, result sources), PL/pgSQL and SQL
//! function bodies (what they read, close and call), DO blocks, the literal-free shape cache key, and error positions. Any
//! text a workload can send: errors are fine, panics and hangs are not.
#![no_main]

use jitgate::postgres::{
    libpg, shape,
    sql::{self, ParseMode},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for scs in [true, false] {
        let mode = ParseMode {
            standard_conforming_strings: scs,
        };
        let _ = sql::analyze(text, mode);
        let _ = sql::body_reads("plpgsql", text, mode);
        let _ = sql::body_reads("sql", text, mode);
        // Stored bodies as the cursor check reads them: parsed, or (when they do not
        // compile here) from their tokens; SQL-standard bodies from their definition.
        for language in ["plpgsql", "sql", jitgate::postgres::catalog::SQL_DEFINITION] {
            let _ = sql::body_closes_cursors(language, text, mode);
        }
        let _ = sql::body_reads(jitgate::postgres::catalog::SQL_DEFINITION, text, mode);
    }
    let _ = shape::shape(text);
    let _ = shape::statement_text(text);
    let _ = libpg::error_position(text, 0);
});
