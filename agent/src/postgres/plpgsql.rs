//! PL/pgSQL function bodies as libpg_query parses them, as JSON.
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
}

/// Parses `CREATE FUNCTION ... LANGUAGE plpgsql` text into libpg_query's JSON tree.
pub fn parse(text: &str) -> Result<Value, String> {
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
        let tree = parse(
            "create function t_c() returns trigger as $$ begin return new; end $$ language plpgsql",
        )
        .expect("a trigger function parses");
        assert!(tree.to_string().contains("PLpgSQL_stmt_return"), "{tree}");
        let tree = parse(
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
        let tree = parse(
            "create function f() returns trigger language plpgsql as $$ begin \
             perform ',{}}'; return new; end $$",
        )
        .expect("parses");
        assert!(tree.to_string().contains(r#"',{}}'"#), "{tree}");
    }

    #[test]
    fn errors_are_reported() {
        assert!(
            parse("create function f() returns int language plpgsql as $$ begin retur 1; end $$")
                .is_err()
        );
    }
}
