//! The startup `options` parameter (PGOPTIONS, JDBC `options=`, tokio-postgres `options`):
//! command-line switches for the server backend, of which clients use `-c name=value` and
//! `--name=value`. The gate forwards the settings it forwards as startup parameters anyway
//! (each as its own parameter, so the server sees exactly what the gate judged) and refuses
//! the rest with a clear error: a switch dropped silently would leave the client believing a
//! `statement_timeout` was set.

/// Startup parameters passed through to the server (lowercase). Everything else the client
/// sends is dropped: the proxy decides the role, the read-only mode and the options.
pub const PASSTHROUGH: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "extra_float_digits",
    "intervalstyle",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "geqo",
];

/// Whether `options` may set `name`: what is passed through as a startup parameter, less
/// `client_encoding`, which the gate checks where it is a parameter of its own.
pub fn allowed(name: &str) -> bool {
    name != "client_encoding" && PASSTHROUGH.contains(&name)
}

/// The settings `options` may set, for messages.
pub fn allowed_list() -> String {
    PASSTHROUGH
        .iter()
        .copied()
        .filter(|n| allowed(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an `options` value is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("the startup option `{0}` is not allowed through the gate")]
    Setting(String),
    #[error("the startup option `{0}` is not a setting (use -c name=value)")]
    Switch(String),
}

/// The settings in `options`, as (name, value) with names lowercased and dashes read as
/// underscores (as the server reads them).
pub fn parse(options: &str) -> Result<Vec<(String, String)>, OptionsError> {
    let words = split(options);
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        let setting = if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("-c") {
            if rest.is_empty() {
                i += 1;
                match words.get(i) {
                    Some(next) => next.clone(),
                    None => return Err(OptionsError::Switch(word.clone())),
                }
            } else {
                rest.to_owned()
            }
        } else {
            return Err(OptionsError::Switch(word.clone()));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(OptionsError::Switch(setting));
        };
        let name = name.to_ascii_lowercase().replace('-', "_");
        if !allowed(&name) {
            return Err(OptionsError::Setting(format!("{name}={value}")));
        }
        out.push((name, value.to_owned()));
        i += 1;
    }
    Ok(out)
}

/// Splits on unescaped white space; a backslash keeps the next character (as the server's
/// `pg_split_opts` does).
fn split(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Vec<(String, String)> {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn settings_clients_send() {
        assert_eq!(
            ok("-c statement_timeout=300"),
            [("statement_timeout".into(), "300".into())]
        );
        assert_eq!(
            ok("-cstatement_timeout=5s --lock-timeout=1s  -c IntervalStyle=iso_8601"),
            [
                ("statement_timeout".into(), "5s".into()),
                ("lock_timeout".into(), "1s".into()),
                ("intervalstyle".into(), "iso_8601".into()),
            ]
        );
        assert_eq!(
            ok(r"-c search_path=a,\ b"),
            [("search_path".into(), "a, b".into())]
        );
        assert_eq!(ok(""), []);
        assert_eq!(ok("   "), []);
    }

    #[test]
    fn hostile_options_are_refused_not_dropped() {
        for bad in [
            "-c default_transaction_read_only=off",
            "--default-transaction-read-only=off",
            "-c role=postgres",
            "-c session_authorization=postgres",
            "-c client_encoding=LATIN1",
            "-c transaction_read_only=off",
            "-c statement_timeout=1 -c role=postgres",
            r"-c statement_timeout=1\ -c\ role=postgres -c role=x",
        ] {
            assert!(
                matches!(parse(bad), Err(OptionsError::Setting(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        for bad in [
            "-d 5",
            "-c",
            "-B 100",
            "statement_timeout=1",
            "-c statement_timeout",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_escaped_space_cannot_smuggle_a_second_switch() {
        // The server reads this as one setting whose value holds the rest.
        assert_eq!(
            ok(r"-c application_name=a\ -c\ role=postgres"),
            [("application_name".into(), "a -c role=postgres".into())]
        );
    }
}
