//! `[console]` and `[console.oidc]`: the web console (served on `daemon.console_listen`).
//!
//! The console is off unless `console_listen` is set, and it never runs open: with a listen
//! address but no `[console.oidc]` the file is refused, so nobody can end up with a console
//! that approves access for whoever reaches its port.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{DaemonConfig, S, Validator};

/// Where the redirect URL must point: the console serves the provider's answer there.
pub const CALLBACK_PATH: &str = "/auth/callback";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    pub listen: SocketAddr,
    pub tls: ConsoleTls,
    /// How long a sign-in lasts before the person signs in again.
    pub session_ttl: Duration,
    pub oidc: OidcConfig,
}

/// The console's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleTls {
    /// PEM files (certificate chain, private key), read at start.
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate minted by the host-local CA (browsers must be told to trust it).
    HostCa,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfig {
    /// The provider's issuer URL, exactly as its discovery document and ID tokens say it.
    pub issuer: String,
    pub client_id: String,
    /// A file holding the client secret (owned by root, not readable by group or others).
    pub client_secret_file: PathBuf,
    /// This console's callback, registered with the provider; its path is [`CALLBACK_PATH`].
    pub redirect_url: String,
    /// Scopes asked for; always includes `openid`.
    pub scopes: Vec<String>,
    /// The claim whose value `oidc:VALUE` approvers name (default `email`; with `email`, the
    /// token must also say `email_verified: true`).
    pub identity_claim: String,
    /// The claim listing the person's groups, which `oidc-group:NAME` approvers name.
    pub groups_claim: String,
    /// Unix accounts of people on this host (`"alice@example.com" = "alice"`): a request filed
    /// by that account is theirs, so they cannot approve it in the console either.
    pub unix_accounts: BTreeMap<String, String>,
    /// CA certificates (PEM) to trust for the provider's HTTPS, instead of the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsole {
    tls_cert: Option<S<String>>,
    tls_key: Option<S<String>>,
    session_ttl: Option<S<String>>,
    oidc: Option<S<RawOidc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOidc {
    issuer: S<String>,
    client_id: S<String>,
    client_secret_file: S<String>,
    redirect_url: S<String>,
    scopes: Option<Vec<String>>,
    identity_claim: Option<String>,
    groups_claim: Option<String>,
    #[serde(default)]
    unix_accounts: BTreeMap<String, String>,
    ca_file: Option<String>,
}

/// Splits `scheme://authority/path` (no query, no fragment, no user info).
pub fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let bad = |s: &str| {
        s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"?#@\\".contains(&b))
    };
    if authority.is_empty() || bad(authority) || bad(path) {
        return None;
    }
    Some((scheme, authority, path))
}

/// Whether an URL's host is this machine's loopback (plain HTTP is tolerated there only).
pub fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Validator<'_> {
    pub(super) fn console(
        &mut self,
        daemon: &DaemonConfig,
        raw: Option<S<RawConsole>>,
    ) -> Option<ConsoleConfig> {
        let listen = daemon.console_listen?;
        let Some(raw) = raw else {
            self.fail(
                0..0,
                "daemon.console_listen is set but there is no [console.oidc]: the console only runs with OpenID Connect sign-in (add [console.oidc], or remove console_listen)",
            );
            return None;
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let tls = match (&raw.tls_cert, &raw.tls_key) {
            (Some(cert), Some(key)) => ConsoleTls::Files {
                cert: cert.get_ref().into(),
                key: key.get_ref().into(),
            },
            (None, None) => ConsoleTls::HostCa,
            _ => {
                self.fail(
                    span.clone(),
                    "console: set both tls_cert and tls_key, or neither (a certificate from the host CA)",
                );
                ConsoleTls::HostCa
            }
        };
        let session_ttl = self.duration(
            "console.session_ttl",
            raw.session_ttl.as_ref(),
            Duration::from_secs(8 * 3600),
        );
        let Some(oidc) = raw.oidc else {
            self.fail(
                span,
                "console: [console.oidc] is missing: the console only runs with OpenID Connect sign-in",
            );
            return None;
        };
        let oidc_span = oidc.span();
        let oidc = oidc.into_inner();
        let issuer = oidc.issuer.get_ref().trim_end_matches('/').to_owned();
        match split_url(&issuer) {
            Some(("https", _, _)) => {}
            Some(("http", authority, _)) if is_loopback_authority(authority) => {}
            _ => self.fail(
                oidc.issuer.span(),
                format!("console.oidc.issuer: `{issuer}` must be an https:// URL (plain http only on loopback)"),
            ),
        }
        let redirect_url = oidc.redirect_url.get_ref().clone();
        match split_url(&redirect_url) {
            Some(("https", _, CALLBACK_PATH)) => {}
            _ => self.fail(
                oidc.redirect_url.span(),
                format!(
                    "console.oidc.redirect_url: `{redirect_url}` must be https://HOST[:PORT]{CALLBACK_PATH}, the address browsers reach this console at"
                ),
            ),
        }
        if oidc.client_id.get_ref().is_empty() {
            self.fail(oidc.client_id.span(), "console.oidc.client_id: empty");
        }
        let secret = oidc.client_secret_file.get_ref();
        if !secret.starts_with('/') {
            self.fail(
                oidc.client_secret_file.span(),
                "console.oidc.client_secret_file: must be an absolute path",
            );
        }
        let mut scopes = oidc
            .scopes
            .unwrap_or_else(|| vec!["openid".into(), "email".into(), "profile".into()]);
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        if scopes.iter().any(|s| {
            s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        }) {
            self.fail(
                oidc_span.clone(),
                "console.oidc.scopes: scope names are printable words without spaces",
            );
        }
        let claim = |v: Option<String>, default: &str| v.unwrap_or_else(|| default.to_owned());
        let identity_claim = claim(oidc.identity_claim, "email");
        let groups_claim = claim(oidc.groups_claim, "groups");
        if identity_claim.is_empty() || groups_claim.is_empty() {
            self.fail(
                oidc_span.clone(),
                "console.oidc: identity_claim and groups_claim must not be empty",
            );
        }
        for (person, account) in &oidc.unix_accounts {
            if !matches!(
                <crate::config::Principal as std::str::FromStr>::from_str(account),
                Ok(crate::config::Principal::User(_))
            ) || person.is_empty()
            {
                self.fail(
                    oidc_span.clone(),
                    format!("console.oidc.unix_accounts: `{person}` = `{account}` must map an identity to a unix user name"),
                );
            }
        }
        Some(ConsoleConfig {
            listen,
            tls,
            session_ttl,
            oidc: OidcConfig {
                issuer,
                client_id: oidc.client_id.get_ref().clone(),
                client_secret_file: secret.into(),
                redirect_url,
                scopes,
                identity_claim,
                groups_claim,
                unix_accounts: oidc.unix_accounts,
                ca_file: oidc.ca_file.map(PathBuf::from),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, Principal};
    use std::str::FromStr;

    const BASE: &str = r#"
[daemon]
console_listen = "127.0.0.1:8443"
[console.oidc]
issuer = "https://id.example.com/"
client_id = "jitgate"
client_secret_file = "/etc/jitgate/oidc-secret"
redirect_url = "https://gate.example.com:8443/auth/callback"
groups_claim = "roles"
"#;

    fn error_of(text: &str) -> String {
        Config::from_toml(Path::new("t.toml"), text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn console_is_off_unless_listened_and_never_open() {
        let c = Config::from_toml(Path::new("t.toml"), "").unwrap();
        assert!(c.console.is_none());
        let open = error_of("[daemon]\nconsole_listen = \"127.0.0.1:8443\"\n");
        assert!(open.contains("no [console.oidc]"), "{open}");
        let c = Config::from_toml(Path::new("t.toml"), BASE).unwrap();
        let console = c.console.unwrap();
        assert_eq!(console.oidc.issuer, "https://id.example.com");
        assert_eq!(console.oidc.groups_claim, "roles");
        assert_eq!(console.oidc.identity_claim, "email");
        assert_eq!(console.tls, super::ConsoleTls::HostCa);
        assert_eq!(console.oidc.scopes, ["openid", "email", "profile"]);
    }

    #[test]
    fn refuses_plain_http_and_odd_redirects() {
        let e = error_of(&BASE.replace("https://id.example.com/", "http://id.example.com"));
        assert!(e.contains("must be an https:// URL"), "{e}");
        assert!(
            Config::from_toml(
                Path::new("t.toml"),
                &BASE.replace("https://id.example.com/", "http://127.0.0.1:9000")
            )
            .is_ok()
        );
        let e = error_of(&BASE.replace("/auth/callback", "/elsewhere"));
        assert!(e.contains("redirect_url"), "{e}");
        let e = error_of(&BASE.replace("https://gate", "http://gate"));
        assert!(e.contains("redirect_url"), "{e}");
        let e = error_of(&BASE.replace("groups_claim = \"roles\"", "tls_key = \"/k\""));
        assert!(!e.is_empty());
    }

    #[test]
    fn oidc_principals_parse_and_never_launch() {
        assert_eq!(
            Principal::from_str("oidc:alice@example.com"),
            Ok(Principal::Oidc("alice@example.com".into()))
        );
        assert_eq!(
            Principal::from_str("oidc-group:dba"),
            Ok(Principal::OidcGroup("dba".into()))
        );
        assert!(Principal::from_str("oidc:").is_err());
        assert!(Principal::from_str("oidc:two words").is_err());
        let e = error_of(
            "[[workload]]\nidentity = \"bot\"\nlaunchers = [\"oidc:alice@example.com\"]\n",
        );
        assert!(e.contains("launchers are unix users"), "{e}");
    }
}
