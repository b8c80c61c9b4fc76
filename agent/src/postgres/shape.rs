//! Statement shapes: a query string with its literal values taken out, so that the analysis
//! of `SELECT abalance FROM accounts WHERE aid = 42` serves `... WHERE aid = 7` too without
//! running the parser again. The parser is the costliest step of the data path, and clients
//! (pgbench, ORMs, agents) send the same few shapes with different values all day.
//!
//! Safety rests on two rules:
//! * A shape is computed only from text whose tokens this lexer knows for certain to agree with
//!   PostgreSQL's: anything unusual (comments, backslashes, dollar signs, non-ASCII, prefixed
//!   or Unicode strings, literals glued to words) makes the text shapeless, and it is parsed
//!   as usual. Only whole decimal integers and plain single-quoted strings are taken out.
//! * A shape's analysis is reused only for statements whose analysis cannot depend on a
//!   literal's value: one plain SELECT/INSERT/UPDATE/DELETE calling no function, with no
//!   hazard, setting, cursor, COPY or prepared statement (see [`reusable`]). Anything else is
//!   parsed every time.

use super::sql::Statement;

/// Stands for a string literal in a shape (a byte no shapeable text contains).
const STRING: char = '\u{1}';
/// Stands for an integer literal.
const NUMBER: char = '\u{2}';

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

/// The shape of `sql`, or `None` when the text has anything this lexer does not handle
/// exactly as PostgreSQL does.
pub fn shape(sql: &str) -> Option<String> {
    let b = sql.as_bytes();
    // Non-ASCII (identifiers may hold any letter), escapes, dollar quotes and parameters, our
    // own placeholders and other control bytes, anywhere (strings included): no shape.
    let plain = |c: &u8| {
        c.is_ascii()
            && (!c.is_ascii_control() || matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
            && !matches!(c, b'\\' | b'$')
    };
    if b.len() > 4096 || !b.iter().all(plain) {
        return None;
    }
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => return None,
            b'/' if b.get(i + 1) == Some(&b'*') => return None,
            b'\'' => {
                // A prefix glued to the quote (E'', B'', X'', N'', U&'', typename'...') changes
                // how the literal reads: no shape.
                if i > 0 && (is_word(b[i - 1]) || b[i - 1] == b'&' || b[i - 1] == b'\'') {
                    return None;
                }
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'\'') if b.get(j + 1) == Some(&b'\'') => j += 2,
                        Some(b'\'') => break,
                        Some(_) => j += 1,
                    }
                }
                // A string glued to what follows (`'a'b`, `'a''`...) is left to the parser.
                if b.get(j + 1).is_some_and(|&n| is_word(n) || n == b'\'') {
                    return None;
                }
                out.push(STRING);
                i = j + 1;
            }
            b'"' => {
                // A quoted identifier is kept as written (it may hold quotes and digits).
                let mut j = i + 1;
                loop {
                    match b.get(j) {
                        None => return None,
                        Some(b'"') if b.get(j + 1) == Some(&b'"') => j += 2,
                        Some(b'"') => break,
                        Some(_) => j += 1,
                    }
                }
                out.push_str(&sql[i..=j]);
                i = j + 1;
            }
            b'0'..=b'9' if i == 0 || !(is_word(b[i - 1]) || b[i - 1] == b'.') => {
                let mut j = i;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                // Only a whole integer: `1.5`, `1e3`, `0x1f`, `1_000` stay as written.
                if b.get(j).is_some_and(|&n| is_word(n) || n == b'.') {
                    out.push_str(&sql[i..j]);
                } else {
                    out.push(NUMBER);
                }
                i = j;
            }
            _ if is_word(c) => {
                let mut j = i;
                while j < b.len() && is_word(b[j]) {
                    j += 1;
                }
                out.push_str(&sql[i..j]);
                i = j;
            }
            _ => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Whether an analysis may serve every text of its shape: its result cannot depend on a
/// literal's value.
pub fn reusable(analysis: &[Statement]) -> bool {
    let [s] = analysis else {
        return false;
    };
    !s.kinds.is_empty()
        && s.kinds
            .iter()
            .all(|k| matches!(*k, "select" | "insert" | "update" | "delete"))
        && s.functions.is_empty()
        && s.hazards.is_empty()
        && s.escapes_read_only.is_none()
        && s.prepares.is_none()
        && s.executes.is_none()
        && s.deallocates.is_none()
        && s.copy.is_none()
        && s.sets_parsing.is_none()
        && s.cursor.is_none()
        && s.side_channel.is_none()
        && !s.sets_search_path
}

/// The text of a single-statement string as the analysis records it: trimmed, without the
/// terminating semicolon.
pub fn statement_text(sql: &str) -> String {
    let t = sql.trim();
    t.strip_suffix(';').map_or(t, str::trim_end).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::sql::{ParseMode, analyze};

    const MODE: ParseMode = ParseMode {
        standard_conforming_strings: true,
    };

    #[test]
    fn literals_come_out_and_structure_stays() {
        let a = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 42;").unwrap();
        let b = shape("SELECT abalance FROM pgbench_accounts WHERE aid = 9001;").unwrap();
        assert_eq!(a, b);
        assert_eq!(
            shape("UPDATE t SET n = 'it''s' WHERE id = 1").unwrap(),
            shape("UPDATE t SET n = 'x' WHERE id = 22").unwrap()
        );
        // Structure, names and operators stay.
        assert_ne!(
            shape("SELECT a FROM t1").unwrap(),
            shape("SELECT a FROM t2").unwrap()
        );
        assert_ne!(
            shape("SELECT * FROM t WHERE a = 1").unwrap(),
            shape("SELECT * FROM t WHERE a = '1'").unwrap()
        );
        assert_ne!(
            shape("SELECT \"x1\" FROM t").unwrap(),
            shape("SELECT \"x2\" FROM t").unwrap()
        );
        assert_eq!(
            shape("SELECT 1.5, 1e3, x1, 0x1f").unwrap(),
            "SELECT 1.5, 1e3, x1, 0x1f"
        );
    }

    #[test]
    fn anything_unusual_has_no_shape() {
        for sql in [
            "SELECT 1 -- comment",
            "SELECT /* c */ 1",
            "SELECT E'\\x41'",
            "SELECT 'a\\'",
            "SELECT $1",
            "SELECT $$body$$",
            "SELECT U&'d\\0061t'",
            "SELECT U&'x' UESCAPE '!'",
            "SELECT B'101'",
            "SELECT X'1f'",
            "SELECT N'x'",
            "SELECT date'2020-01-01'",
            "SELECT 'a''",
            "SELECT 'a'b",
            "SELECT 'é'",
            "SELECT \u{1}",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
        ] {
            assert_eq!(shape(sql), None, "{sql}");
        }
    }

    fn reusable_sql(sql: &str) -> bool {
        reusable(&analyze(sql, MODE).unwrap())
    }

    #[test]
    fn only_value_independent_analyses_are_reused() {
        assert!(reusable_sql("SELECT abalance FROM a WHERE aid = 1"));
        assert!(reusable_sql(
            "UPDATE a SET abalance = abalance + -5 WHERE aid = 3;"
        ));
        assert!(reusable_sql(
            "INSERT INTO h (tid, delta, mtime) VALUES (1, 2, CURRENT_TIMESTAMP)"
        ));
        assert!(reusable_sql("DELETE FROM a WHERE aid = 3"));
        for sql in [
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT set_config('search_path', 'x', false)",
            "SET default_transaction_read_only = 0",
            "SET transaction_read_only = 'off'",
            "BEGIN",
            "SELECT 1; SELECT 2",
            "COPY a TO STDOUT",
            "PREPARE p AS SELECT 1",
            "EXECUTE p",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "DECLARE c CURSOR FOR SELECT 1",
        ] {
            assert!(!reusable_sql(sql), "{sql}");
        }
    }

    #[test]
    fn a_shapes_analysis_reads_like_a_fresh_analysis_of_any_instance_but_for_its_text() {
        for (template, other) in [
            (
                "SELECT abalance FROM a WHERE aid = 1;",
                "SELECT abalance FROM a WHERE aid = 77;",
            ),
            (
                "  UPDATE a SET n = 'x' WHERE id = 1",
                "  UPDATE a SET n = 'longer value' WHERE id = 123456",
            ),
        ] {
            assert_eq!(shape(template), shape(other));
            let t = analyze(template, MODE).unwrap();
            assert!(reusable(&t));
            let mut fresh = analyze(other, MODE).unwrap();
            assert_ne!(fresh[0].text, t[0].text);
            fresh[0].text.clone_from(&t[0].text);
            assert_eq!(format!("{fresh:?}"), format!("{t:?}"));
        }
    }
}
