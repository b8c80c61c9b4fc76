//! OpenID Connect sign-in for the console: the authorization code flow with PKCE (S256),
//! `state` and `nonce`, against a provider found by discovery, and full validation of the ID
//! token it returns.
//!
//! Why `jsonwebtoken` (9.x) and a thin flow of our own rather than the `openidconnect` crate:
//! the flow the console needs is four requests (discovery, JWKS, authorize redirect, token
//! exchange) that fit in this file and read top to bottom; `openidconnect` brings `oauth2`,
//! `reqwest` and a second TLS and HTTP stack into a daemon that already carries hyper and
//! rustls, plus a type-state API much larger than the one flow used. `jsonwebtoken` is the
//! widely used, maintained JWS verifier; its 9.x line signs and verifies with `ring`, the
//! crypto provider rustls already uses here, so it adds no new cryptography. What it does not
//! check (the algorithm allowlist, `nonce`, `iat`, `azp`, the identity claims, key selection
//! and rotation) is done here, each in one place below.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use data_encoding::BASE64URL_NOPAD;
use futures_util::future::BoxFuture;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::fetch::{FetchError, Fetcher};
use crate::config::{
    StepUp,
    console::{OidcConfig, is_loopback_authority, split_url},
};

/// Signature algorithms an ID token may use. Asymmetric only: `none` is never accepted, and
/// neither is HMAC (with a public key taken for a shared secret, anyone could sign).
pub const ALLOWED_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Clock skew tolerated between this host and the provider.
pub const LEEWAY_SECS: u64 = 60;
/// An ID token fresh from the token endpoint was issued moments ago; one issued longer ago
/// than this is refused (a replayed token).
pub const MAX_TOKEN_AGE_SECS: u64 = 600;
/// The provider's keys are fetched again for an unknown `kid` (key rotation) at most this
/// often, so that tokens with made-up key ids cannot make the console hammer the provider.
pub const JWKS_REFETCH_EVERY: Duration = Duration::from_secs(30);
/// Groups kept from a token (a bound on what a hostile or misconfigured provider can make us
/// store per session).
const MAX_GROUPS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the ID token is malformed: {0}")]
    Malformed(String),
    #[error(
        "the ID token is signed with `{0}`, which is not accepted (allowed: RS*, PS*, ES256, ES384, EdDSA)"
    )]
    Algorithm(String),
    #[error("the ID token names signing key `{0}`, which the provider does not publish")]
    UnknownKey(String),
    #[error("the ID token's signature does not verify")]
    Signature,
    #[error("the ID token has expired")]
    Expired,
    #[error("the ID token was issued by `{0}`, not the configured issuer")]
    Issuer(String),
    #[error("the ID token is not for this console (audience or authorized party)")]
    Audience,
    #[error("the ID token's nonce does not match this sign-in")]
    Nonce,
    #[error("the ID token's issue time is missing, in the future or too old")]
    IssuedAt,
    #[error("the ID token lacks claim `{0}` (or it is not verified)")]
    MissingClaim(String),
    /// A sign-in that asked for a recent authentication (`max_age`) got a token that does
    /// not show one (OIDC Core 3.1.2.1 makes `auth_time` mandatory then).
    #[error(
        "the identity provider did not show a sign-in within the last {0} s (`auth_time` missing or too old)"
    )]
    AuthTime(u64),
}

/// What a validated ID token tells about the person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    /// The configured identity claim's value.
    pub id: String,
    pub groups: Vec<String>,
    /// When the person authenticated at the provider (`auth_time`), if said.
    pub auth_time: Option<u64>,
    /// How (`acr`), if said.
    pub acr: Option<String>,
}

/// What the token must match.
pub struct Expected<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub nonce: &'a str,
    pub identity_claim: &'a str,
    pub groups_claim: &'a str,
    /// Set when the sign-in asked the provider for an authentication at most this many
    /// seconds old (`max_age`): the token must then show one (`auth_time`).
    pub max_age: Option<u64>,
    /// Seconds since the epoch.
    pub now: u64,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn alg_name(alg: &str) -> Result<Algorithm, TokenError> {
    let parsed: Result<Algorithm, _> = alg.parse();
    match parsed {
        Ok(a) if ALLOWED_ALGS.contains(&a) => Ok(a),
        _ => Err(TokenError::Algorithm(alg.to_owned())),
    }
}

/// The key `kid` names (or, without a `kid`, the only key fit for `alg`).
fn select_key<'k>(
    keys: &'k JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'k Jwk, TokenError> {
    let fits = |k: &&Jwk| {
        k.common
            .key_algorithm
            .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"))
            && !matches!(
                k.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            )
    };
    match kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(fits)
            .find(|k| k.common.key_id.as_deref() == Some(kid))
            .ok_or_else(|| TokenError::UnknownKey(kid.to_owned())),
        None => {
            let mut candidates = keys.keys.iter().filter(fits).filter(|k| {
                DecodingKey::from_jwk(k).is_ok()
                    && matches!(
                        (&k.algorithm, alg),
                        (
                            jsonwebtoken::jwk::AlgorithmParameters::RSA(_),
                            Algorithm::RS256
                                | Algorithm::RS384
                                | Algorithm::RS512
                                | Algorithm::PS256
                                | Algorithm::PS384
                                | Algorithm::PS512
                        ) | (
                            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_),
                            Algorithm::ES256 | Algorithm::ES384
                        ) | (
                            jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_),
                            Algorithm::EdDSA
                        )
                    )
            });
            match (candidates.next(), candidates.next()) {
                (Some(k), None) => Ok(k),
                _ => Err(TokenError::UnknownKey("(none named)".into())),
            }
        }
    }
}

/// Validates an ID token against `keys` and `expected`: signature (with an allowed algorithm
/// and the key the header names), `iss`, `aud`, `azp`, `exp`, `nbf`, `iat`, `nonce`, and the
/// identity and groups claims.
pub fn verify_id_token(
    token: &str,
    keys: &JwkSet,
    expected: &Expected<'_>,
) -> Result<Identity, TokenError> {
    // The header is read by hand first: jsonwebtoken's own header type has no `none`, and a
    // token saying `none` must be refused as such, not as "malformed".
    let header_b64 = token.split('.').next().unwrap_or_default();
    let header: serde_json::Value = BASE64URL_NOPAD
        .decode(header_b64.as_bytes())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| TokenError::Malformed("unreadable header".into()))?;
    let alg = alg_name(
        header
            .get("alg")
            .and_then(|a| a.as_str())
            .unwrap_or("(missing)"),
    )?;
    if token.split('.').count() != 3 {
        return Err(TokenError::Malformed(
            "not a signed JWT (three parts)".into(),
        ));
    }
    let kid = header.get("kid").and_then(|k| k.as_str());
    let jwk = select_key(keys, kid, alg)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| TokenError::Malformed(format!("key: {e}")))?;

    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_issuer(&[expected.issuer]);
    validation.set_audience(&[expected.client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &key,
        &validation,
    )
    .map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => TokenError::Signature,
            K::ExpiredSignature | K::ImmatureSignature => TokenError::Expired,
            K::InvalidIssuer => TokenError::Issuer("(another issuer)".into()),
            K::InvalidAudience => TokenError::Audience,
            K::InvalidAlgorithm => TokenError::Algorithm(format!("{alg:?} with this key")),
            K::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            other => TokenError::Malformed(format!("{other:?}")),
        }
    })?;
    let claims = data.claims;
    let issuer = claims
        .get("iss")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if issuer != expected.issuer {
        return Err(TokenError::Issuer(issuer.to_owned()));
    }
    // `azp`: required when the token is for several audiences, and then it must be us.
    let audiences = match claims.get("aud") {
        Some(serde_json::Value::Array(a)) => a.len(),
        _ => 1,
    };
    match claims.get("azp").map(|v| v.as_str()) {
        Some(Some(azp)) if azp == expected.client_id => {}
        None if audiences == 1 => {}
        _ => return Err(TokenError::Audience),
    }
    let iat = claims
        .get("iat")
        .and_then(serde_json::Value::as_u64)
        .ok_or(TokenError::IssuedAt)?;
    if iat > expected.now + LEEWAY_SECS || iat + MAX_TOKEN_AGE_SECS + LEEWAY_SECS < expected.now {
        return Err(TokenError::IssuedAt);
    }
    let nonce = claims
        .get("nonce")
        .and_then(|v| v.as_str())
        .ok_or(TokenError::Nonce)?;
    if !super::session::same(nonce.as_bytes(), expected.nonce.as_bytes()) {
        return Err(TokenError::Nonce);
    }
    let subject = claims
        .get("sub")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let id = claims
        .get(expected.identity_claim)
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| TokenError::MissingClaim(expected.identity_claim.to_owned()))?;
    // An e-mail address names a person only once the provider has checked it.
    if expected.identity_claim == "email"
        && claims
            .get("email_verified")
            .and_then(serde_json::Value::as_bool)
            != Some(true)
    {
        return Err(TokenError::MissingClaim("email_verified".into()));
    }
    let groups = match claims.get(expected.groups_claim) {
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .take(MAX_GROUPS)
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let auth_time = claims.get("auth_time").and_then(serde_json::Value::as_u64);
    if let Some(max_age) = expected.max_age {
        let fresh = auth_time.is_some_and(|t| {
            t <= expected.now + LEEWAY_SECS && expected.now <= t + max_age + LEEWAY_SECS
        });
        if !fresh {
            return Err(TokenError::AuthTime(max_age));
        }
    }
    // Bounded and printable, or not kept (it is shown on pages and compared with policy).
    let acr = claims
        .get("acr")
        .and_then(|v| v.as_str())
        .filter(|a| crate::config::valid_acr(a))
        .map(str::to_owned);
    Ok(Identity {
        subject,
        id: id.to_owned(),
        groups,
        auth_time,
        acr,
    })
}

/// The provider's keys, fetched again when a token names one not seen yet (rotation), at
/// most every [`JWKS_REFETCH_EVERY`].
pub struct KeyCache {
    state: Mutex<KeyState>,
    refetch_every: Duration,
}

struct KeyState {
    keys: Arc<JwkSet>,
    fetched_at: Option<Instant>,
}

/// Fetches the key set (the provider's `jwks_uri`, or a test's hand-made keys).
pub type FetchKeys<'a> = &'a (dyn Fn() -> BoxFuture<'static, Result<JwkSet, String>> + Send + Sync);

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            state: Mutex::new(KeyState {
                keys: Arc::new(JwkSet { keys: Vec::new() }),
                fetched_at: None,
            }),
            refetch_every: JWKS_REFETCH_EVERY,
        }
    }
}

/// Why an ID token was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the identity provider could not be reached or answered oddly: {0}")]
    Provider(String),
}

impl KeyCache {
    /// A cache that fetches again for an unknown key at most every `every`.
    pub fn with_refetch_every(every: Duration) -> Self {
        Self {
            refetch_every: every,
            ..Self::default()
        }
    }

    /// Validates `token`, fetching keys first if none are known, and again (rate-limited)
    /// when the token names a key that is not among them.
    pub async fn verify(
        &self,
        token: &str,
        expected: &Expected<'_>,
        fetch: FetchKeys<'_>,
    ) -> Result<Identity, SignInError> {
        let mut state = self.state.lock().await;
        if state.fetched_at.is_none() {
            state.keys = Arc::new(fetch().await.map_err(SignInError::Provider)?);
            state.fetched_at = Some(Instant::now());
        }
        match verify_id_token(token, &state.keys, expected) {
            Err(TokenError::UnknownKey(kid)) => {
                let recent = state
                    .fetched_at
                    .is_some_and(|at| at.elapsed() < self.refetch_every);
                if recent {
                    warn!(kid = %kid, "ID token names an unknown key; the provider's keys were fetched moments ago, not again");
                    return Err(TokenError::UnknownKey(kid).into());
                }
                info!(kid = %kid, "ID token names an unknown key: fetching the provider's keys again (rotation)");
                state.keys = Arc::new(fetch().await.map_err(SignInError::Provider)?);
                state.fetched_at = Some(Instant::now());
                Ok(verify_id_token(token, &state.keys, expected)?)
            }
            other => Ok(other?),
        }
    }
}

/// The parts of the provider's discovery document the flow uses.
#[derive(Clone, Debug, Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

/// A sign-in under way: what the browser's return must match. Kept server-side only.
#[derive(Clone)]
pub struct Pending {
    pub nonce: String,
    pub verifier: String,
    pub created: Instant,
    /// A step-up sign-in: what it asked the provider for.
    pub step_up: Option<StepUp>,
}

/// What a step-up sign-in (one that must show a fresh and, with `acr`, strong enough
/// authentication; see `approval_max_age` and `approval_acr` in policy) adds to the
/// authorization request: `prompt=login`, `max_age` and `acr_values`.
fn step_up_query(step_up: &StepUp) -> String {
    let mut q = String::from("&prompt=login");
    if let Some(age) = step_up.max_age_secs {
        q.push_str(&format!("&max_age={age}"));
    }
    if !step_up.acr.is_empty() {
        q.push_str(&format!(
            "&acr_values={}",
            url_encode(&step_up.acr.join(" "))
        ));
    }
    q
}

/// A random URL-safe string of `bytes` random bytes.
pub fn random_token(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)?;
    Ok(BASE64URL_NOPAD.encode(&buf))
}

/// `application/x-www-form-urlencoded` / URL query escaping.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The provider, as configured and discovered.
pub struct Provider {
    config: OidcConfig,
    secret: String,
    fetcher: Fetcher,
    metadata: Mutex<Discovery>,
    keys: KeyCache,
}

/// The discovery document once fetched, or the last failure to fetch it: sign-ins during
/// [`DISCOVERY_RETRY`] after a failure get that answer without asking the provider again.
#[derive(Default)]
struct Discovery {
    found: Option<Arc<Metadata>>,
    failed: Option<(Instant, String)>,
}

/// How long a failed discovery stands before the provider is asked again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

impl Provider {
    pub fn new(config: OidcConfig, secret: String, fetcher: Fetcher) -> Self {
        Self {
            config,
            secret,
            fetcher,
            metadata: Mutex::new(Discovery::default()),
            keys: KeyCache::default(),
        }
    }

    /// The discovery document, fetched on first use (the provider may start after us) and
    /// checked: its issuer must be the configured one, its endpoints HTTPS (or loopback).
    async fn metadata(&self) -> Result<Arc<Metadata>, SignInError> {
        let mut cached = self.metadata.lock().await;
        if let Some(m) = cached.found.as_ref() {
            return Ok(m.clone());
        }
        if let Some((at, why)) = &cached.failed
            && at.elapsed() < DISCOVERY_RETRY
        {
            return Err(SignInError::Provider(why.clone()));
        }
        let found = self.discover().await;
        match &found {
            Ok(m) => cached.found = Some(m.clone()),
            Err(SignInError::Provider(why)) => cached.failed = Some((Instant::now(), why.clone())),
            Err(SignInError::Token(_)) => {}
        }
        found
    }

    async fn discover(&self) -> Result<Arc<Metadata>, SignInError> {
        let url = format!("{}/.well-known/openid-configuration", self.config.issuer);
        let body = self
            .fetcher
            .get(&url)
            .await
            .map_err(|e| SignInError::Provider(e.to_string()))?;
        let m: Metadata = serde_json::from_slice(&body)
            .map_err(|e| SignInError::Provider(format!("discovery document {url}: {e}")))?;
        if m.issuer.trim_end_matches('/') != self.config.issuer {
            return Err(SignInError::Provider(format!(
                "the discovery document names issuer `{}`, not the configured `{}`",
                m.issuer, self.config.issuer
            )));
        }
        for endpoint in [&m.authorization_endpoint, &m.token_endpoint, &m.jwks_uri] {
            match split_url(endpoint) {
                Some(("https", _, _)) => {}
                Some(("http", authority, _)) if is_loopback_authority(authority) => {}
                _ => {
                    return Err(SignInError::Provider(format!(
                        "the discovery document's endpoint `{endpoint}` is not HTTPS"
                    )));
                }
            }
        }
        Ok(Arc::new(m))
    }

    /// Starts a sign-in: where to send the browser, `state` (to keep in its cookie) and what
    /// to keep server-side until it comes back.
    pub async fn begin(
        &self,
        step_up: Option<StepUp>,
    ) -> Result<(String, String, Pending), SignInError> {
        let m = self.metadata().await?;
        let random =
            |n| random_token(n).map_err(|e| SignInError::Provider(format!("no randomness: {e}")));
        let state = random(32)?;
        let nonce = random(32)?;
        let verifier = random(32)?;
        let challenge = BASE64URL_NOPAD.encode(&Sha256::digest(verifier.as_bytes()));
        let sep = if m.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={state}&nonce={nonce}&code_challenge={challenge}&code_challenge_method=S256{}",
            m.authorization_endpoint,
            url_encode(&self.config.client_id),
            url_encode(&self.config.redirect_url),
            url_encode(&self.config.scopes.join(" ")),
            step_up.as_ref().map(step_up_query).unwrap_or_default(),
        );
        Ok((
            url,
            state,
            Pending {
                nonce,
                verifier,
                created: Instant::now(),
                step_up,
            },
        ))
    }

    /// Finishes a sign-in: exchanges `code` (with the PKCE verifier and the client secret)
    /// and validates the ID token against `pending`'s nonce.
    pub async fn finish(&self, code: &str, pending: &Pending) -> Result<Identity, SignInError> {
        let m = self.metadata().await?;
        let form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}",
            url_encode(code),
            url_encode(&self.config.redirect_url),
            url_encode(&pending.verifier),
        );
        let basic = data_encoding::BASE64.encode(
            format!(
                "{}:{}",
                url_encode(&self.config.client_id),
                url_encode(&self.secret)
            )
            .as_bytes(),
        );
        let body = self
            .fetcher
            .post_form(&m.token_endpoint, &format!("Basic {basic}"), form)
            .await
            .map_err(|e| match e {
                // The provider's answer may quote what it refused; never the secret.
                FetchError::Status(status, _) => {
                    SignInError::Provider(format!("the token endpoint answered {status}"))
                }
                other => SignInError::Provider(other.to_string()),
            })?;
        #[derive(Deserialize)]
        struct TokenResponse {
            id_token: Option<String>,
        }
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| SignInError::Provider(format!("token endpoint answer: {e}")))?;
        let Some(id_token) = answer.id_token else {
            return Err(SignInError::Provider(
                "the token endpoint returned no id_token".into(),
            ));
        };
        let expected = Expected {
            issuer: &m.issuer,
            client_id: &self.config.client_id,
            nonce: &pending.nonce,
            identity_claim: &self.config.identity_claim,
            groups_claim: &self.config.groups_claim,
            max_age: pending.step_up.as_ref().and_then(|s| s.max_age_secs),
            now: now_secs(),
        };
        let (jwks_uri, fetcher) = (m.jwks_uri.clone(), self.fetcher.clone());
        let fetch = move || -> BoxFuture<'static, Result<JwkSet, String>> {
            let (uri, fetcher) = (jwks_uri.clone(), fetcher.clone());
            Box::pin(async move {
                let body = fetcher.get(&uri).await.map_err(|e| e.to_string())?;
                serde_json::from_slice(&body).map_err(|e| format!("key set {uri}: {e}"))
            })
        };
        self.keys.verify(&id_token, &expected, &fetch).await
    }

    /// The configured issuer (for the callback's `iss` parameter, RFC 9207).
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The unix uids of people's accounts here, by identity (see `unix_accounts`).
    pub fn unix_accounts(&self) -> HashMap<String, String> {
        self.config.unix_accounts.clone().into_iter().collect()
    }
}

#[cfg(test)]
#[path = "oidc_tests.rs"]
mod tests;
