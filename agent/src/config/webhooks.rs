//! `[[webhook]]`: where the agent tells people and scripts what happened (a request filed, a
//! statement held, a grant revoked, ...), so that an approver hears of a held statement while
//! it can still be approved. What is sent is an audit record; how it is sent is in
//! [`crate::webhooks`].

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{S, Validator, valid_name};

/// One webhook, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    pub name: String,
    /// Where to POST.
    pub target: WebhookTarget,
    pub format: WebhookFormat,
    /// The audit kinds sent (aliases expanded).
    pub events: Vec<&'static str>,
    /// The HMAC-SHA256 key the body is signed with (a root-only file); required for `json`.
    pub secret_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for the receiver, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// The console's base URL, for links to the page of the request an event names.
    pub console_url: Option<String>,
    /// For one attempt, from connecting to the response's status.
    pub timeout: Duration,
    /// Attempts per event (the first and the retries) before it is given up.
    pub max_attempts: u32,
}

/// Where a webhook's URL comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookTarget {
    /// Written in the configuration.
    Url(Endpoint),
    /// Read from a root-only file at each delivery (a Slack incoming-webhook URL is itself
    /// the credential: keep it out of a world-readable config file).
    UrlFile(PathBuf),
}

/// The body's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The audit record as JSON, signed (see the README for verifying it).
    Json,
    /// A Slack incoming-webhook message (`text`, mrkdwn), also signed when a secret is set.
    Slack,
}

/// A parsed `http(s)://host[:port]/path` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub path: String,
}

impl Endpoint {
    /// Parses a webhook URL: `https://` anywhere, `http://` only to this host (a plaintext
    /// body would carry what it describes across the network unprotected).
    /// Errors never quote the URL: a Slack webhook's path is its credential.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("the URL must start with https://".into()),
        };
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.as_str().contains('@') {
            return Err(
                "credentials in the URL are not sent; use secret_file to sign instead".into(),
            );
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        if !https && !is_local(host) {
            return Err(format!(
                "plain http:// to {host}: only allowed to this host (127.0.0.1, ::1, localhost); use https://"
            ));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            https,
            host: host.to_owned(),
            port,
            path: if path.is_empty() { "/".into() } else { path },
        })
    }

    /// The URL without its path, for logs: a Slack URL's path is its secret.
    pub fn origin(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

fn is_local(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every audit kind a webhook may ask for.
pub const KINDS: &[&str] = &[
    "request.refused",
    "request.filed",
    "statement.held",
    "request.approved",
    "request.approval",
    "statement.approved",
    "request.denied",
    "request.expired",
    "grant.issued",
    "grant.revoked",
    "grant.expired",
    "task.started",
    "task.ended",
    "session.start",
    "session.refused",
    "session.end",
    "connect.refused",
    "socket.refused",
    "bind.refused",
    "sessions.refused",
    "config.reloaded",
    "gate.detached",
    "daemon.started",
    "daemon.stopped",
    "limit.reached",
    "token.issued",
    "token.revoked",
    "api.call",
    "spool.lost",
    "spool.retired",
];

/// Names that stand for several kinds.
const ALIASES: &[(&str, &[&str])] = &[
    (
        "request.decided",
        &["request.approved", "request.denied", "statement.approved"],
    ),
    ("*", KINDS),
];

/// Sent when a webhook names no events: what an approver needs to hear of.
const DEFAULT_EVENTS: &[&str] = &[
    "request.filed",
    "request.decided",
    "request.expired",
    "statement.held",
    "grant.revoked",
    "session.refused",
];

/// Expands event names to audit kinds, or says which name is unknown.
pub fn expand_events<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<&'static str>, String> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in names {
        let kinds: &[&'static str] = if let Some(k) = KINDS.iter().find(|k| **k == name) {
            std::slice::from_ref(k)
        } else if let Some((_, kinds)) = ALIASES.iter().find(|(a, _)| *a == name) {
            kinds
        } else {
            return Err(format!(
                "`{name}` is not an event; use one of: request.decided, *, {}",
                KINDS.join(", ")
            ));
        };
        for k in kinds {
            if !out.contains(k) {
                out.push(k);
            }
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    name: S<String>,
    url: Option<S<String>>,
    url_file: Option<S<String>>,
    format: Option<WebhookFormat>,
    events: Option<S<Vec<String>>>,
    secret_file: Option<S<String>>,
    ca_file: Option<S<String>>,
    console_url: Option<S<String>>,
    timeout: Option<S<String>>,
    max_attempts: Option<S<i64>>,
}

/// Most attempts a webhook may ask for (with backoff capped at 5 minutes, about an hour).
pub const MAX_ATTEMPTS: i64 = 20;

impl Validator<'_> {
    pub(super) fn webhooks(&mut self, raw: Vec<S<RawWebhook>>) -> Vec<Webhook> {
        let mut out: Vec<Webhook> = Vec::new();
        for entry in raw {
            let span = entry.span();
            let w = entry.into_inner();
            let name = w.name.get_ref().clone();
            if !valid_name(&name) {
                self.fail(
                    w.name.span(),
                    format!(
                        "webhook.name: `{name}` must be lowercase letters, digits, `.`, `_`, `-`"
                    ),
                );
            }
            if out.iter().any(|o| o.name == name) {
                self.fail(
                    w.name.span(),
                    format!("webhook.name: `{name}` is used twice"),
                );
            }
            let target = match (&w.url, &w.url_file) {
                (Some(url), None) => match Endpoint::parse(url.get_ref()) {
                    Ok(e) => Some(WebhookTarget::Url(e)),
                    Err(e) => {
                        self.fail(url.span(), format!("webhook.url: {e}"));
                        None
                    }
                },
                (None, Some(file)) => {
                    let path = PathBuf::from(file.get_ref());
                    match crate::secret_file::read(&path) {
                        Ok(url) => match Endpoint::parse(url.trim()) {
                            Ok(_) => Some(WebhookTarget::UrlFile(path)),
                            Err(e) => {
                                // `parse` never quotes the URL (the file's content is a secret).
                                self.fail(
                                    file.span(),
                                    format!("webhook.url_file: `{}`: {e}", path.display()),
                                );
                                None
                            }
                        },
                        Err(e) => {
                            self.fail(file.span(), format!("webhook.url_file: {e}"));
                            None
                        }
                    }
                }
                _ => {
                    self.fail(
                        span.clone(),
                        format!("webhook `{name}`: give exactly one of url and url_file"),
                    );
                    None
                }
            };
            let format = w.format.unwrap_or(WebhookFormat::Json);
            let events = match &w.events {
                None => expand_events(DEFAULT_EVENTS.iter().copied()).unwrap_or_default(),
                Some(list) => match expand_events(list.get_ref().iter().map(String::as_str)) {
                    Ok(kinds) if !kinds.is_empty() => kinds,
                    Ok(_) => {
                        self.fail(
                            list.span(),
                            "webhook.events: empty (leave it out for the default set)",
                        );
                        Vec::new()
                    }
                    Err(e) => {
                        self.fail(list.span(), format!("webhook.events: {e}"));
                        Vec::new()
                    }
                },
            };
            let secret_file = w.secret_file.as_ref().and_then(|f| {
                let path = PathBuf::from(f.get_ref());
                match crate::secret_file::read(&path) {
                    Ok(key) if key.len() >= 16 => Some(path),
                    Ok(_) => {
                        self.fail(f.span(), format!("webhook.secret_file: `{}` holds fewer than 16 bytes; write a long random key (e.g. `openssl rand -hex 32`)", path.display()));
                        None
                    }
                    Err(e) => {
                        self.fail(f.span(), format!("webhook.secret_file: {e}"));
                        None
                    }
                }
            });
            if format == WebhookFormat::Json && w.secret_file.is_none() {
                self.fail(
                    span.clone(),
                    format!("webhook `{name}`: a json webhook needs secret_file (its receiver must be able to tell the agent's calls from anyone's)"),
                );
            }
            let ca_file = w.ca_file.as_ref().and_then(|f| {
                let path = PathBuf::from(f.get_ref());
                if Path::new(&path).is_file() {
                    Some(path)
                } else {
                    self.fail(
                        f.span(),
                        format!("webhook.ca_file: `{}` is not a file", path.display()),
                    );
                    None
                }
            });
            let console_url = w.console_url.as_ref().and_then(|u| {
                let url = u.get_ref().trim_end_matches('/').to_owned();
                match Endpoint::parse(&url) {
                    Ok(e) if e.https || url.starts_with("http://") => Some(url),
                    Ok(_) => None,
                    Err(e) => {
                        self.fail(u.span(), format!("webhook.console_url: {e}"));
                        None
                    }
                }
            });
            let timeout = self.duration(
                "webhook.timeout",
                w.timeout.as_ref(),
                Duration::from_secs(10),
            );
            let max_attempts = match &w.max_attempts {
                None => 8,
                Some(n) if (1..=MAX_ATTEMPTS).contains(n.get_ref()) => {
                    u32::try_from(*n.get_ref()).unwrap_or(8)
                }
                Some(n) => {
                    self.fail(
                        n.span(),
                        format!(
                            "webhook.max_attempts: `{}` must be from 1 to {MAX_ATTEMPTS}",
                            n.get_ref()
                        ),
                    );
                    8
                }
            };
            if let Some(target) = target {
                out.push(Webhook {
                    name,
                    target,
                    format,
                    events,
                    secret_file,
                    ca_file,
                    console_url,
                    timeout,
                    max_attempts,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_local_http() {
        let e = Endpoint::parse("https://hooks.slack.com/services/T0/B0/XyZ").unwrap();
        assert!(e.https);
        assert_eq!((e.host.as_str(), e.port), ("hooks.slack.com", 443));
        assert_eq!(e.path, "/services/T0/B0/XyZ");
        assert_eq!(e.origin(), "https://hooks.slack.com:443");
        let local = Endpoint::parse("http://127.0.0.1:8099/hook?x=1").unwrap();
        assert_eq!((local.port, local.path.as_str()), (8099, "/hook?x=1"));
        assert!(Endpoint::parse("http://[::1]:9/").is_ok());
        assert!(Endpoint::parse("http://localhost/").is_ok());
        for bad in [
            "http://hooks.example.com/x",
            "http://10.0.0.1/x",
            "ftp://127.0.0.1/",
            "https://user:pw@example.com/",
            "example.com/path",
            "https:///nohost",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn events_expand_and_unknown_names_are_refused() {
        assert_eq!(
            expand_events(["request.decided", "request.denied"]).unwrap(),
            vec!["request.approved", "request.denied", "statement.approved"]
        );
        assert_eq!(expand_events(["*"]).unwrap().len(), KINDS.len());
        let e = expand_events(["request.filled"]).unwrap_err();
        assert!(e.contains("`request.filled` is not an event"), "{e}");
    }

    fn parse(dir: &Path, webhook: &str) -> Result<super::super::Config, String> {
        let text = format!("[daemon]\nstate_dir = \"/tmp/x\"\n\n[[webhook]]\n{webhook}\n");
        super::super::Config::from_toml(&dir.join("j.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn webhooks_are_validated_with_the_fix_named() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = key.display();
        let ok = parse(
            dir.path(),
            &format!("name = \"a\"\nurl = \"https://x.example/h\"\nsecret_file = \"{k}\""),
        )
        .unwrap();
        let w = &ok.webhooks[0];
        assert_eq!(w.format, WebhookFormat::Json);
        assert!(w.events.contains(&"statement.held") && w.events.contains(&"request.denied"));
        assert_eq!((w.timeout, w.max_attempts), (Duration::from_secs(10), 8));
        for (body, want) in [
            (
                "name = \"a\"\nurl = \"https://x.example/h\"",
                "needs secret_file",
            ),
            (
                "name = \"a\"\nformat = \"slack\"",
                "give exactly one of url and url_file",
            ),
            (
                "name = \"a\"\nformat = \"slack\"\nurl = \"http://hooks.example/x\"",
                "only allowed to this host",
            ),
            (
                "name = \"a\"\nformat = \"slack\"\nurl = \"https://h.example/x\"\nevents = [\"grant.revoke\"]",
                "`grant.revoke` is not an event",
            ),
            (
                "name = \"a\"\nformat = \"slack\"\nurl = \"https://h.example/x\"\nmax_attempts = 0",
                "from 1 to 20",
            ),
        ] {
            let e = parse(dir.path(), body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        // A key others can read is refused, with the fix.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = parse(
            dir.path(),
            &format!("name = \"a\"\nurl = \"https://x.example/h\"\nsecret_file = \"{k}\""),
        )
        .unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        // A URL file's content is never quoted in an error.
        let url = dir.path().join("url");
        std::fs::write(&url, "http://hooks.example/services/SECRET123").unwrap();
        std::fs::set_permissions(&url, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = parse(
            dir.path(),
            &format!(
                "name = \"a\"\nformat = \"slack\"\nurl_file = \"{}\"",
                url.display()
            ),
        )
        .unwrap_err();
        assert!(
            !e.contains("SECRET123") && e.contains("only allowed to this host"),
            "{e}"
        );
    }

    #[test]
    fn every_audit_kind_can_be_chosen() {
        // The kinds are the strings `Event::kind` returns: read them from its source so a new
        // kind cannot be left out of the list.
        let source = include_str!("../store/audit/event.rs");
        let body = &source[source.find("pub const fn kind").unwrap()..];
        let body = &body[..body.find("\n    }\n").unwrap()];
        let kinds: Vec<&str> = body
            .split("=> \"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
            .collect();
        assert!(kinds.len() > 20, "{kinds:?}");
        let mut sorted = kinds.clone();
        sorted.sort_unstable();
        let mut ours = KINDS.to_vec();
        ours.sort_unstable();
        assert_eq!(sorted, ours);
    }
}
