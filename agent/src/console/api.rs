//! The console's HTTP API for scripts: JSON under `/api/v1/`, authenticated by a bearer token
//! (`jitgate token issue`) and nothing else. A third front end of the control service: every
//! call is the same [`ControlService`] method the CLI's call is, with the token's unix user
//! as the caller ([`ControlService::authenticate_token`]), so authorization is
//! [`crate::control::authz`]'s, never decided here.
//!
//! Only `Authorization: Bearer` is read: cookies are ignored (so no request a browser makes
//! on its own carries a credential: nothing to forge across sites), a token in a URL is
//! refused (URLs end up in logs and histories). Failed authentications are counted per
//! client network and, past a few a minute, answered 429 unless the token presented is valid
//! (so a guesser sharing an address cannot lock out the valid tokens used from it).
//! Every authenticated call is audited (`api.call`, naming the user and the token id); state
//! changes also have their own records, whose actor names the token.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, header::HeaderValue};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::throttle::{Throttle, network};
use crate::{
    control::{
        service::{ControlError, ControlService},
        tokens::{self, TokenError},
    },
    identity::Caller,
    store::StoreError,
};

/// Where the API lives.
pub const PREFIX: &str = "/api/";
/// Largest JSON body accepted.
const MAX_BODY: usize = 16 * 1024;
/// Failed authentications one client network may make per window before it gets 429s.
pub const MAX_FAILURES: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(60);
/// Calls one account's tokens may make per window, all together (the 429 beyond it names the
/// wait): a script gone wild, a stolen token or a user issuing many cannot flood the control
/// service or the audit log.
pub const MAX_CALLS_PER_ACCOUNT: u32 = 600;
/// What `WWW-Authenticate` says.
const REALM: &str = "Bearer realm=\"jitgate\"";

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"error": {"code", "message"}}` with `status`.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

fn unauthorized(message: &str, invalid_token: bool) -> Response<Full<Bytes>> {
    let mut r = error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let challenge = if invalid_token {
        format!("{REALM}, error=\"invalid_token\"")
    } else {
        REALM.to_owned()
    };
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

fn control_error(e: &ControlError) -> Response<Full<Bytes>> {
    let (status, code) = match e {
        ControlError::Invalid(_) | ControlError::ReloadRejected(_) => {
            (StatusCode::BAD_REQUEST, "invalid")
        }
        ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        ControlError::Forbidden(_) | ControlError::SignInAgain { .. } => {
            (StatusCode::FORBIDDEN, "forbidden")
        }
        ControlError::Refused(_) => (StatusCode::FORBIDDEN, "refused"),
        ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        ControlError::Store(StoreError::Unavailable(_)) => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        ControlError::Store(_) | ControlError::Detach(_) | ControlError::Internal(_) => {
            // The detail (database errors among them) is for the agent's log, not clients.
            tracing::error!(error = %e, "console API: internal error");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the agent could not complete this; its log (journalctl -u jitgated) says why",
            );
        }
    };
    error(status, code, &e.to_string())
}

fn answer<T: serde::Serialize>(result: Result<T, ControlError>) -> Response<Full<Bytes>> {
    match result.map(serde_json::to_value) {
        Ok(Ok(v)) => json_response(StatusCode::OK, &v),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("encoding the answer: {e}"),
        ),
        Err(e) => control_error(&e),
    }
}

/// Whether a query string carries what looks like a credential.
fn token_in_query(query: &str) -> bool {
    names_a_token(query)
        || super::parse_form(query)
            .keys()
            .any(|k| matches!(k.as_str(), "access_token" | "token" | "bearer" | "api_key"))
}

/// Whether URL text holds a token's secret, however it is percent-encoded (`jgt%5F...`, or
/// encoded twice): such a URL is refused and never logged.
fn names_a_token(text: &str) -> bool {
    let mut text = text.to_ascii_lowercase();
    for _ in 0..3 {
        if text.contains(tokens::PREFIX) {
            return true;
        }
        let decoded = percent_decoded(&text).to_ascii_lowercase();
        if decoded == text {
            return false;
        }
        text = decoded;
    }
    text.contains(tokens::PREFIX)
}

/// `%XX` decoded where it is valid, everything else kept (lossy: for checking, not use).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The bearer secret, or why there is none.
fn bearer(req: &Request<Incoming>) -> Result<&str, &'static str> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        let message = if req.headers().contains_key(header::AUTHORIZATION) {
            "send one Authorization header, not several"
        } else if req.headers().contains_key(header::COOKIE) {
            "the API takes no cookies (a console sign-in is not an API credential): send `Authorization: Bearer <token>` with a token from `jitgate token issue`"
        } else {
            "this API needs `Authorization: Bearer <token>` (a token from `jitgate token issue`)"
        };
        return Err(message);
    };
    let value = value.to_str().unwrap_or("");
    match value.split_once(' ') {
        Some((scheme, secret)) if scheme.eq_ignore_ascii_case("bearer") => Ok(secret.trim()),
        _ => Err("only the Bearer scheme is accepted: `Authorization: Bearer <token>`"),
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    /// `10m`, `1h`: shorter than asked (within policy).
    ttl: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: Option<String>,
}

/// Reads a JSON body (none is `T::default()`).
async fn body<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let json_typed = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim() == "application/json")
        });
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid",
                "the body is larger than 16 KiB",
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if !json_typed {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "invalid", &format!("body: {e}")))
}

fn flag(query: &HashMap<String, String>, key: &str) -> bool {
    query
        .get(key)
        .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
}

/// What the API counts: failed authentications per client network, calls per account.
pub struct Limits {
    pub failures: Throttle<IpAddr>,
    pub calls: Throttle<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            failures: Throttle::new(MAX_FAILURES, WINDOW),
            calls: Throttle::new(MAX_CALLS_PER_ACCOUNT, WINDOW),
        }
    }
}

/// `Retry-After` for a 429 (whole seconds, at least one).
pub fn retry_after(mut r: Response<Full<Bytes>>, left: Duration) -> Response<Full<Bytes>> {
    if let Ok(v) = HeaderValue::from_str(&left.as_secs().max(1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Serves one API call.
pub async fn handle(
    service: &ControlService,
    limits: &Limits,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Full<Bytes>> {
    let throttle = &limits.failures;
    let peer_net = network(peer);
    // A blocked address still gets its valid tokens honoured (a guess at a 256-bit secret
    // is hopeless anyway; the throttle keeps failures cheap and quiet): otherwise anyone
    // sharing the address, a NAT or the console's own host would lock every script out.
    let blocked = throttle.blocked(&peer_net);
    let too_many = |left: Duration| {
        retry_after(
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                &format!(
                    "too many failed authentications from this address; try again in {} s",
                    left.as_secs().max(1)
                ),
            ),
            left,
        )
    };
    let query = req.uri().query().unwrap_or("").to_owned();
    let in_path = names_a_token(req.uri().path());
    if in_path || token_in_query(&query) {
        // Neither path nor query is logged: they hold the secret. Logged up to the failure
        // limit, not past it (a flood would fill the log); answered the same either way, so
        // whoever leaked a token learns to revoke it.
        if blocked.is_none() {
            throttle.count(peer_net);
            warn!(%peer, "console API: a credential in the URL (refused)");
        }
        return error(
            StatusCode::BAD_REQUEST,
            "invalid",
            "tokens are accepted only in the Authorization header, never in the URL; a token sent in a URL may be in logs and histories now: revoke it (`jitgate token revoke ID`) and issue another",
        );
    }
    let secret = match bearer(&req) {
        Ok(s) => s.to_owned(),
        Err(_) if blocked.is_some() => return too_many(blocked.unwrap_or_default()),
        Err(message) => return unauthorized(message, false),
    };
    let caller = match service.authenticate_token(&secret).await {
        Ok(c) => c,
        Err(TokenError::Unavailable) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &TokenError::Unavailable.to_string(),
            );
        }
        Err(_) if blocked.is_some() => {
            // Each failure up to the limit was logged; the rest of the window's are not (a
            // flood would fill the log).
            tracing::debug!(%peer, "console API: too many failed authentications (throttled)");
            return too_many(blocked.unwrap_or_default());
        }
        Err(e) => {
            throttle.count(peer_net);
            // Only the id, which the secret names in clear; never the secret.
            warn!(%peer, token = ?tokens::id_of(&secret), error = %e, "console API: token refused");
            return unauthorized(&e.to_string(), true);
        }
    };
    drop(secret);
    if let Some(token) = &caller.token
        && let Err(refused) = limits.calls.take(token.account.clone())
    {
        // Neither audited nor logged call by call (that is what a flood would fill): once
        // per window.
        if refused.first {
            warn!(%peer, token = %token.id, user = %token.account, "console API: account over its call rate (throttled for the rest of the minute)");
        }
        let left = refused.left;
        return retry_after(
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                &format!(
                    "the tokens of {} made more than {MAX_CALLS_PER_ACCOUNT} calls this minute; try again in {} s",
                    token.account,
                    left.as_secs().max(1)
                ),
            ),
            left,
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = route(service, &caller, req, &path, &super::parse_form(&query)).await;
    let status = response.status();
    info!(user = %caller.unix_name(), token = ?caller.token.as_ref().map(|t| &t.id), %method, path, status = status.as_u16(), "console API call");
    service.record_api_call(&caller, method.as_str(), &path, status.as_u16());
    response
}

async fn route(
    service: &ControlService,
    caller: &Caller,
    req: Request<Incoming>,
    path: &str,
    query: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    let Some(rest) = path.strip_prefix("/api/v1/") else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such API: the API lives under /api/v1/",
        );
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    match (&method, parts.as_slice()) {
        (&Method::GET, ["whoami"]) => json_response(
            StatusCode::OK,
            &json!({
                "user": caller.unix_name(),
                "token": caller.token.as_ref().map(|t| &t.id),
                "read_only": caller.token.as_ref().is_some_and(|t| t.read_only),
            }),
        ),
        (&Method::GET, ["requests"]) => answer(service.approvals(caller).await),
        (&Method::POST, ["requests", id, "approve"]) => {
            let id = (*id).to_owned();
            let b: ApproveBody = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let ttl = match b.ttl.as_deref().map(humantime::parse_duration) {
                None => None,
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        &format!("ttl: {e} (like \"10m\")"),
                    );
                }
            };
            answer(service.approve(caller, &id, ttl).await)
        }
        (&Method::POST, ["requests", id, "deny"]) => {
            let id = (*id).to_owned();
            match body::<ReasonBody>(req).await {
                Ok(b) => answer(service.deny(caller, &id, b.reason).await),
                Err(r) => r,
            }
        }
        (&Method::GET, ["grants"]) => answer(service.grants(caller, flag(query, "all")).await),
        (&Method::POST, ["grants", id, "revoke"]) => {
            let id = (*id).to_owned();
            match body::<ReasonBody>(req).await {
                Ok(b) => answer(service.revoke(caller, &id, b.reason).await),
                Err(r) => r,
            }
        }
        (&Method::GET, ["sessions"]) => {
            let limit = super::bounded_limit(query, 100, 10_000);
            answer(service.sessions(caller, flag(query, "all"), limit).await)
        }
        (&Method::GET, ["sessions", id]) if !id.is_empty() => {
            let from = query.get("from").and_then(|f| f.parse().ok()).unwrap_or(0);
            answer(service.session(caller, id, from).await)
        }
        (&Method::GET, ["audit", "verify"]) => answer(service.audit_verify(caller).await),
        (&Method::GET, ["status"]) => answer(service.status(caller).await),
        (
            _,
            ["whoami" | "requests" | "grants" | "sessions" | "status"]
            | ["requests" | "grants", _, _]
            | ["sessions", _]
            | ["audit", "verify"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid",
            &format!("{method} is not served at {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such API endpoint"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_recognised() {
        assert!(token_in_query("access_token=abc"));
        assert!(token_in_query("x=1&token=abc"));
        assert!(token_in_query("q=jgt_0123_abc"));
        assert!(token_in_query("q=JGT_0123"));
        assert!(!token_in_query("all=1&limit=5"));
        assert!(!token_in_query(""));
    }
}
