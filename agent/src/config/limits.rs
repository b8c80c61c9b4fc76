//! Blast-radius limits: how much one grant (or one identity) may take, however legitimately
//! it was granted. A compromised agent with a read grant could otherwise pull a whole table
//! at full speed. Set per policy (`[policy.limits]`); where several policies cover a grant,
//! the strictest value of each limit applies. Protocol-neutral: a statement is a request for
//! protocols without statements.

use serde::Deserialize;

/// The limits of one grant. `None`: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantLimits {
    /// Result rows one statement may return.
    pub rows_per_statement: Option<u64>,
    /// Result bytes (as sent to the client) one statement may return.
    pub bytes_per_statement: Option<u64>,
    /// Result rows one session (connection) may return in all.
    pub rows_per_session: Option<u64>,
    /// Result bytes one session may return in all.
    pub bytes_per_session: Option<u64>,
    /// Statements per second, over all sessions of one grant.
    pub statements_per_second: Option<u32>,
    /// Statements per second, over all sessions of one identity (all its grants).
    pub identity_statements_per_second: Option<u32>,
}

impl GrantLimits {
    /// The strictest of two sets of limits, limit by limit.
    #[must_use]
    pub fn strictest(self, other: Self) -> Self {
        fn min<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        Self {
            rows_per_statement: min(self.rows_per_statement, other.rows_per_statement),
            bytes_per_statement: min(self.bytes_per_statement, other.bytes_per_statement),
            rows_per_session: min(self.rows_per_session, other.rows_per_session),
            bytes_per_session: min(self.bytes_per_session, other.bytes_per_session),
            statements_per_second: min(self.statements_per_second, other.statements_per_second),
            identity_statements_per_second: min(
                self.identity_statements_per_second,
                other.identity_statements_per_second,
            ),
        }
    }

    /// Whether any result limit is set (the data path counts only then).
    pub fn limits_results(&self) -> bool {
        self.rows_per_statement.is_some()
            || self.bytes_per_statement.is_some()
            || self.rows_per_session.is_some()
            || self.bytes_per_session.is_some()
    }
}

/// `[policy.limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    rows_per_statement: Option<u64>,
    bytes_per_statement: Option<String>,
    rows_per_session: Option<u64>,
    bytes_per_session: Option<String>,
    statements_per_second: Option<u32>,
    identity_statements_per_second: Option<u32>,
}

impl RawLimits {
    /// The limits, or what is wrong with them (one message per problem).
    pub(super) fn validate(self) -> Result<GrantLimits, Vec<String>> {
        let mut errors = Vec::new();
        let mut size = |key: &str, v: Option<String>| {
            v.and_then(|v| match parse_size(&v) {
                Ok(0) => {
                    errors.push(format!("policy.limits.{key}: must be more than 0"));
                    None
                }
                Ok(n) => Some(n as u64),
                Err(e) => {
                    errors.push(format!("policy.limits.{key}: {e}"));
                    None
                }
            })
        };
        let bytes_per_statement = size("bytes_per_statement", self.bytes_per_statement);
        let bytes_per_session = size("bytes_per_session", self.bytes_per_session);
        for (key, v) in [
            ("rows_per_statement", self.rows_per_statement),
            ("rows_per_session", self.rows_per_session),
            (
                "statements_per_second",
                self.statements_per_second.map(u64::from),
            ),
            (
                "identity_statements_per_second",
                self.identity_statements_per_second.map(u64::from),
            ),
        ] {
            if v == Some(0) {
                errors.push(format!(
                    "policy.limits.{key}: must be more than 0 (leave it out for no limit)"
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(GrantLimits {
            rows_per_statement: self.rows_per_statement,
            bytes_per_statement,
            rows_per_session: self.rows_per_session,
            bytes_per_session,
            statements_per_second: self.statements_per_second,
            identity_statements_per_second: self.identity_statements_per_second,
        })
    }
}

/// `64MiB`, `512 KiB`, `1GiB`, `1048576`: a size in bytes.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (use e.g. 64MiB)"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "kB" | "KB" => 1 << 10,
        "MiB" | "MB" => 1 << 20,
        "GiB" | "GB" => 1 << 30,
        other => return Err(format!("unknown unit `{other}` (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn the_strictest_of_each_limit_applies() {
        let a = GrantLimits {
            rows_per_statement: Some(10),
            statements_per_second: Some(5),
            ..GrantLimits::default()
        };
        let b = GrantLimits {
            rows_per_statement: Some(100),
            bytes_per_session: Some(1 << 20),
            statements_per_second: None,
            ..GrantLimits::default()
        };
        let both = a.strictest(b);
        assert_eq!(both.rows_per_statement, Some(10));
        assert_eq!(both.bytes_per_session, Some(1 << 20));
        assert_eq!(both.statements_per_second, Some(5));
        assert!(both.limits_results());
        assert!(!GrantLimits::default().limits_results());
    }

    #[test]
    fn zero_and_bad_sizes_are_named() {
        let raw = RawLimits {
            rows_per_statement: Some(0),
            bytes_per_session: Some("lots".into()),
            ..RawLimits::default()
        };
        let errors = raw.validate().unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("bytes_per_session"));
        assert!(errors[1].contains("rows_per_statement"));
    }
}
