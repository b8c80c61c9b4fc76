//! How much a session has returned against its grant's limits ([`GrantLimits`]): rows and bytes
//! per statement and per session. A statement that passes a limit is cut: the client gets
//! SQLSTATE 54000 in place of the rest of its results, the gate cancels it on the server,
//! and everything the server still sends for that cycle is dropped up to its ReadyForQuery,
//! so that client and server agree again and the session stays usable. Once the session's
//! own budget is spent, each further statement is refused the same way before it runs.

use crate::{config::GrantLimits, postgres::wire::PgError};

#[derive(Debug, Default)]
pub(in crate::postgres) struct Budget {
    statement_rows: u64,
    statement_bytes: u64,
    session_rows: u64,
    session_bytes: u64,
    /// Frames are dropped until the ReadyForQuery that ends the cut statement's cycle.
    pub(in crate::postgres) skipping: bool,
    /// GrantLimits already reported (logged and audited) in this session.
    reported: Vec<&'static str>,
}

/// Which limit was passed, for the error, the log and the audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::postgres) struct Passed {
    pub key: &'static str,
    pub limit: u64,
}

impl Budget {
    /// Whether `key` is reported for the first time in this session (and now is).
    pub(in crate::postgres) fn first_time(&mut self, key: &'static str) -> bool {
        if self.reported.contains(&key) {
            return false;
        }
        self.reported.push(key);
        true
    }

    /// A result begins: the statement counters start again.
    pub(in crate::postgres) fn start_statement(&mut self) {
        self.statement_rows = 0;
        self.statement_bytes = 0;
    }

    /// Each limit with what it allows and what has been used; the session's last.
    fn usage(&self, limits: &GrantLimits) -> [(&'static str, Option<u64>, u64); 4] {
        [
            (
                "rows_per_statement",
                limits.rows_per_statement,
                self.statement_rows,
            ),
            (
                "bytes_per_statement",
                limits.bytes_per_statement,
                self.statement_bytes,
            ),
            (
                "rows_per_session",
                limits.rows_per_session,
                self.session_rows,
            ),
            (
                "bytes_per_session",
                limits.bytes_per_session,
                self.session_bytes,
            ),
        ]
    }

    /// Counts one row of `bytes`; the limit it passes, if any.
    pub(in crate::postgres) fn count(
        &mut self,
        limits: &GrantLimits,
        bytes: u64,
    ) -> Option<Passed> {
        self.statement_rows += 1;
        self.statement_bytes += bytes;
        self.session_rows += 1;
        self.session_bytes += bytes;
        self.usage(limits)
            .into_iter()
            .find_map(|(key, limit, used)| {
                limit
                    .filter(|l| used > *l)
                    .map(|limit| Passed { key, limit })
            })
    }

    /// The session limit already spent, if any: further statements are refused.
    pub(in crate::postgres) fn spent(&self, limits: &GrantLimits) -> Option<Passed> {
        self.usage(limits)
            .into_iter()
            .skip(2)
            .find_map(|(key, limit, used)| {
                limit
                    .filter(|l| used >= *l)
                    .map(|limit| Passed { key, limit })
            })
    }
}

impl Passed {
    /// The client's error: what was passed, and what to do.
    pub(in crate::postgres) fn error(&self, resource: &str) -> PgError {
        let what = match self.key {
            "rows_per_statement" => format!("a statement may return at most {} rows", self.limit),
            "bytes_per_statement" => {
                format!("a statement may return at most {} bytes", self.limit)
            }
            "rows_per_session" => {
                format!("this session has returned its limit of {} rows", self.limit)
            }
            _ => format!(
                "this session has returned its limit of {} bytes",
                self.limit
            ),
        };
        let hint = if self.key.ends_with("_session") {
            "open a new session for more, or ask the jitgate operator to raise the policy's limits."
                .to_owned()
        } else {
            "narrow the statement (WHERE, LIMIT) or fetch in pages, or ask the jitgate operator to raise the policy's limits.".to_owned()
        };
        PgError::error(
            "54000",
            format!(
                "jitgate: result limit reached on {resource}: {what}; the rest of the result was not sent"
            ),
        )
        .hint(format!("{hint} (policy.limits.{})", self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_limits_reset_and_session_limits_add_up() {
        let limits = GrantLimits {
            rows_per_statement: Some(3),
            bytes_per_session: Some(100),
            ..GrantLimits::default()
        };
        let mut b = Budget::default();
        for _ in 0..3 {
            assert_eq!(b.count(&limits, 10), None);
        }
        assert_eq!(
            b.count(&limits, 10).map(|p| p.key),
            Some("rows_per_statement")
        );
        b.start_statement();
        assert_eq!(b.count(&limits, 10), None);
        assert_eq!(b.spent(&limits), None);
        // 50 bytes so far; 60 more pass the session's 100.
        assert_eq!(
            b.count(&limits, 60).map(|p| p.key),
            Some("bytes_per_session")
        );
        assert_eq!(b.spent(&limits).map(|p| p.key), Some("bytes_per_session"));
        let e = b.spent(&limits).unwrap().error("db");
        assert_eq!(e.code, "54000");
    }
}
