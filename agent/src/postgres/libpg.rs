//! libpg_query (PostgreSQL's parser) where the `pg_query` crate does not reach.
//!
//! * [`plpgsql`]: PL/pgSQL function bodies as libpg_query parses them, as JSON.
//! * [`error_position`]: where a statement stops parsing, for the ErrorResponse's position
//!   field (psql prints the LINE and the caret from it).
//!
//! libpg_query (18.x) writes some datums of trigger functions (the `TG_*` variables, of
//! the "promise" kind) as `{}}`: one closing brace too many, so its output for every
//! `RETURNS trigger` function is not JSON, and the `pg_query` crate can only report that.
//! This calls the same C function, then drops each closing brace that would close an array
//! (which valid JSON never has) outside of string literals, and parses the rest. Nothing
//! else is touched: a query text inside the tree reads exactly as libpg_query wrote it.

use std::ffi::{CStr, CString, c_char, c_int};

use serde_json::Value;

/// libpg_query's `PgQueryError`.
#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

/// libpg_query's `PgQueryParseResult`.
#[repr(C)]
struct ParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

/// libpg_query's `PgQueryPlpgsqlParseResult`.
#[repr(C)]
struct PlpgsqlParseResult {
    plpgsql_funcs: *mut c_char,
    error: *mut PgQueryError,
}

unsafe extern "C" {
    // Both are in the static library the `pg_query` crate links.
    fn pg_query_parse_plpgsql(input: *const c_char) -> PlpgsqlParseResult;
    fn pg_query_free_plpgsql_parse_result(result: PlpgsqlParseResult);
    fn pg_query_parse_opts(input: *const c_char, parser_options: c_int) -> ParseResult;
    fn pg_query_free_parse_result(result: ParseResult);
}

/// The 1-based character position at which `text` fails to parse with `parser_options`
/// (as the server reports it), if it fails there.
pub fn error_position(text: &str, parser_options: i32) -> Option<u32> {
    let input = CString::new(text).ok()?;
    // SAFETY: `input` is a valid C string for the call; the error, when present, is read
    // before the result is freed.
    unsafe {
        let result = pg_query_parse_opts(input.as_ptr(), parser_options);
        let position = if result.error.is_null() {
            None
        } else {
            u32::try_from((*result.error).cursorpos)
                .ok()
                .filter(|p| *p > 0)
        };
        pg_query_free_parse_result(result);
        position
    }
}

/// Parses `CREATE FUNCTION ... LANGUAGE plpgsql` text into libpg_query's JSON tree.
pub fn plpgsql(text: &str) -> Result<Value, String> {
    let input = CString::new(text).map_err(|_| "a NUL byte in the function text".to_owned())?;
    // SAFETY: `input` is a valid C string for the call; the result's pointers are either
    // null or C strings owned by the result until it is freed below, and are copied out
    // before that.
    let raw = unsafe {
        let result = pg_query_parse_plpgsql(input.as_ptr());
        let out = if !result.error.is_null() {
            let message = (*result.error).message;
            Err(if message.is_null() {
                "PL/pgSQL parse error".to_owned()
            } else {
                CStr::from_ptr(message).to_string_lossy().into_owned()
            })
        } else if result.plpgsql_funcs.is_null() {
            Err("no PL/pgSQL parse tree".to_owned())
        } else {
            Ok(CStr::from_ptr(result.plpgsql_funcs)
                .to_string_lossy()
                .into_owned())
        };
        pg_query_free_plpgsql_parse_result(result);
        out
    }?;
    serde_json::from_str(&repair(&raw)).map_err(|e| format!("unreadable parse tree: {e}"))
}

/// Drops closing braces that would close an array, outside string literals. On valid JSON
/// this is the identity.
fn repair(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut stack: Vec<u8> = Vec::new();
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            out.push(c);
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => stack.push(b'{'),
            '[' => stack.push(b'['),
            '}' => {
                if stack.last() != Some(&b'{') {
                    continue;
                }
                stack.pop();
            }
            ']' => {
                stack.pop();
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_functions_parse() {
        let tree = plpgsql(
            "create function t_c() returns trigger as $$ begin return new; end $$ language plpgsql",
        )
        .expect("a trigger function parses");
        assert!(tree.to_string().contains("PLpgSQL_stmt_return"), "{tree}");
        let tree = plpgsql(
            "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN \
             INSERT INTO log SELECT TG_OP, now(); IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; \
             RETURN NEW; END $f$",
        )
        .expect("a trigger function with TG_ variables parses");
        assert!(tree.to_string().contains("INSERT INTO log"), "{tree}");
    }

    #[test]
    fn repair_leaves_valid_json_and_strings_alone() {
        for valid in [
            r#"{"a":{}}"#,
            r#"[{"a":[1,{}]},{}]"#,
            r#"{"q":"select ',{}}' from \"x,{}}]\""}"#,
            r#"["\\",{}]"#,
        ] {
            assert_eq!(repair(valid), valid);
            assert!(serde_json::from_str::<Value>(valid).is_ok(), "{valid}");
        }
        assert_eq!(repair(r#"[{"a":1},{}},{}}]"#), r#"[{"a":1},{},{}]"#);
    }

    #[test]
    fn query_text_inside_a_body_is_what_the_server_runs() {
        // A body whose query text carries the very pattern the repair removes elsewhere.
        let tree = plpgsql(
            "create function f() returns trigger language plpgsql as $$ begin \
             perform ',{}}'; return new; end $$",
        )
        .expect("parses");
        assert!(tree.to_string().contains(r#"',{}}'"#), "{tree}");
    }

    #[test]
    fn error_positions_are_the_servers() {
        assert_eq!(error_position("SELEC 1", 0), Some(1));
        // `frm` is read as an alias; `t` is where it stops.
        assert_eq!(error_position("select 1 frm t", 0), Some(14));
        assert_eq!(error_position("select 1;\nselect * form t", 0), Some(20));
        // Characters, not bytes, as the server counts.
        assert_eq!(error_position("select 'é' frm t", 0), Some(16));
        assert_eq!(error_position("select 1", 0), None);
    }

    #[test]
    fn errors_are_reported() {
        assert!(
            plpgsql("create function f() returns int language plpgsql as $$ begin retur 1; end $$")
                .is_err()
        );
    }
}
