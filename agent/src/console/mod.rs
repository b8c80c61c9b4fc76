//! The web console: a front end of the control service, like the Unix socket. It serves HTTPS
//! on `daemon.console_listen`, signs people in with OpenID Connect ([`oidc`]), keeps their
//! sessions ([`session`]) and renders pages ([`pages`]). It only establishes who calls
//! (a [`Caller::web`] person), decodes forms and encodes pages: what a person may see and do
//! is decided by the control service and [`crate::control::authz`], as for every caller.
//!
//! Defences, each in one place here: every state-changing request is a POST that needs a
//! live session and its CSRF token (and, when the browser says where it comes from, our own
//! origin); session and sign-in cookies are `__Host-`, `Secure`, `HttpOnly`, `SameSite=Lax`;
//! every answer carries a CSP without any script, `frame-ancestors 'none'`, `nosniff`,
//! `Referrer-Policy: same-origin` and `no-store`. No token, code or secret ever goes into a page, URL we make,
//! or log line.

pub mod api;
pub mod audit;
pub mod fetch;
pub mod oidc;
pub mod pages;
pub mod replay;
pub mod session;
pub mod throttle;

use std::{
    collections::HashMap, convert::Infallible, net::IpAddr, path::Path, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, header::HeaderValue,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    config::{
        MAX_APPROVAL_MAX_AGE, MIN_APPROVAL_MAX_AGE, StepUp,
        console::{ConsoleConfig, ConsoleTls, split_url},
        valid_acr,
    },
    control::service::{ControlError, ControlService},
    identity::{Caller, Person},
    inspect::tls::LocalCa,
};

use self::{oidc::Provider, session::Sessions, throttle::Throttle};

const SESSION_COOKIE: &str = "__Host-jitgate-session";
const LOGIN_COOKIE: &str = "__Host-jitgate-login";
/// Largest form accepted.
const MAX_FORM: usize = 16 * 1024;
const MAX_CONNECTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Where the certificate comes from.
enum Tls {
    Fixed(Arc<ServerConfig>),
    HostCa(Arc<LocalCa>),
}

/// The console, ready to serve.
pub struct Console {
    service: ControlService,
    provider: Provider,
    sessions: Sessions,
    session_ttl: Duration,
    /// `https://host[:port]`, from the redirect URL: the only origin forms may come from.
    origin: String,
    tls: Tls,
    /// Failed API authentications per client network, calls per user ([`api`]).
    api_limits: api::Limits,
    /// Sign-in starts (and callbacks answering no sign-in under way) per client network, so
    /// that a flood gets 429s rather than provider round trips and sign-ins under way.
    sign_ins: Throttle<IpAddr>,
}

/// Sign-in starts (and callbacks answering no sign-in under way) one client network may make
/// per minute; a person returning from their provider is not counted.
pub const SIGN_IN_STEPS_PER_MINUTE: u32 = 40;

/// Reads the client secret, refusing a file others could read or replace
/// ([`crate::secret_file`]).
fn read_secret(path: &Path) -> anyhow::Result<String> {
    let secret = crate::secret_file::read(path)
        .map_err(|e| anyhow::anyhow!("console.oidc.client_secret_file: {e}"))?
        .trim()
        .to_owned();
    if secret.is_empty() {
        anyhow::bail!("console.oidc.client_secret_file {}: empty", path.display());
    }
    Ok(secret)
}

fn tls_from_files(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("console.tls_cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("console.tls_key {}: {e}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| anyhow::anyhow!("console TLS certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Console {
    /// Prepares the console from its configuration: reads the secret and the certificate now,
    /// so that a mistake stops the agent's start rather than a later sign-in.
    pub fn new(
        config: &ConsoleConfig,
        service: ControlService,
        ca: Arc<LocalCa>,
    ) -> anyhow::Result<Self> {
        let secret = read_secret(&config.oidc.client_secret_file)?;
        let fetcher = fetch::Fetcher::new(config.oidc.ca_file.as_deref())?;
        let tls = match &config.tls {
            ConsoleTls::Files { cert, key } => Tls::Fixed(tls_from_files(cert, key)?),
            ConsoleTls::HostCa => Tls::HostCa(ca),
        };
        let origin = match split_url(&config.oidc.redirect_url) {
            Some((scheme, authority, _)) => format!("{scheme}://{authority}"),
            None => anyhow::bail!("console.oidc.redirect_url: not a URL"),
        };
        Ok(Self {
            service,
            provider: Provider::new(config.oidc.clone(), secret, fetcher),
            sessions: Sessions::default(),
            session_ttl: config.session_ttl,
            origin,
            tls,
            api_limits: api::Limits::default(),
            sign_ins: Throttle::new(SIGN_IN_STEPS_PER_MINUTE, Duration::from_secs(60)),
        })
    }
}

pub async fn bind(config: &ConsoleConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding console_listen {}", config.listen))
}

/// Serves until shutdown.
pub fn serve(
    listener: TcpListener,
    console: Arc<Console>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    crate::ops::http::accept_loop(
        listener,
        "web console",
        MAX_CONNECTIONS,
        shutdown.clone(),
        tracker,
        move |stream, peer| {
            let (console, shutdown) = (console.clone(), shutdown.clone());
            async move {
                let config = match &console.tls {
                    Tls::Fixed(c) => Ok(c.clone()),
                    Tls::HostCa(ca) => stream
                        .local_addr()
                        .map_err(anyhow::Error::from)
                        .and_then(|local| ca.server_config(local.ip())),
                };
                let config = match config {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "console: no certificate");
                        return;
                    }
                };
                let tls = match tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    TlsAcceptor::from(config).accept(stream),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "console: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let service = service_fn(move |req| {
                    let console = console.clone();
                    async move { Ok::<_, Infallible>(console.respond(req, peer.ip()).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { debug!(%peer, error = %e, "console connection"); },
                    () = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            }
        },
    );
}

/// Decodes `application/x-www-form-urlencoded` (a query string or a form body).
pub fn parse_form(s: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> Option<String> {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = bytes.get(i + 1..i + 3)?;
                    out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    }
    let mut map = HashMap::new();
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if let (Some(k), Some(v)) = (decode(k), decode(v)) {
            // The first value wins: a repeated field cannot override what was checked.
            map.entry(k).or_insert(v);
        }
    }
    map
}

/// `limit` from a query: `default` when absent or not a number, never above `max`.
/// The step-up a `/login` link asks for (see [`login_url`]): `max_age` in seconds within
/// policy's bounds, `acr` values separated by spaces.
fn step_up_of(query: &HashMap<String, String>) -> Result<Option<StepUp>, String> {
    let max_age_secs = match query.get("max_age") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(secs)
                if (MIN_APPROVAL_MAX_AGE.as_secs()..=MAX_APPROVAL_MAX_AGE.as_secs())
                    .contains(&secs) =>
            {
                Some(secs)
            }
            _ => return Err(format!("max_age `{v}` is not a number of seconds in range")),
        },
    };
    let acr: Vec<String> = query
        .get("acr")
        .map(|v| {
            v.split(' ')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if acr.len() > 10 || acr.iter().any(|a| !valid_acr(a)) {
        return Err("acr names too many or unusable values".into());
    }
    let step_up = StepUp { max_age_secs, acr };
    Ok(step_up.is_required().then_some(step_up))
}

/// The console's sign-in link for a step-up (read back by [`step_up_of`]).
fn login_url(step_up: &StepUp) -> String {
    let mut params = Vec::new();
    if let Some(age) = step_up.max_age_secs {
        params.push(format!("max_age={age}"));
    }
    if !step_up.acr.is_empty() {
        params.push(format!("acr={}", oidc::url_encode(&step_up.acr.join(" "))));
    }
    format!("/login?{}", params.join("&"))
}

fn bounded_limit(query: &HashMap<String, String>, default: usize, max: usize) -> usize {
    query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(default)
        .clamp(1, max)
}

fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, max_age: Duration) -> String {
    format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        max_age.as_secs()
    )
}

fn page(status: StatusCode, html: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(html)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn with_cookie(mut r: Response<Full<Bytes>>, cookie: &str) -> Response<Full<Bytes>> {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The headers every answer carries.
fn harden(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let h = r.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        // Not `no-referrer`: with it browsers send `Origin: null` on our own forms. Our URLs hold
        // nothing secret, and no other origin learns them.
        ("referrer-policy", "same-origin"),
        ("cache-control", "no-store"),
        ("strict-transport-security", "max-age=31536000"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

fn status_of(e: &ControlError) -> StatusCode {
    match e {
        ControlError::Invalid(_) | ControlError::ReloadRejected(_) => StatusCode::BAD_REQUEST,
        ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::Forbidden(_)
        | ControlError::Refused(_)
        | ControlError::SignInAgain { .. } => StatusCode::FORBIDDEN,
        ControlError::Conflict(_) => StatusCode::CONFLICT,
        ControlError::Store(_) | ControlError::Detach(_) | ControlError::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl Console {
    async fn respond(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let r = match (req.method(), path.as_str()) {
            // Scripts' API: bearer tokens only, never the browser session (see `api`).
            (_, p) if p.starts_with(api::PREFIX) => {
                api::handle(&self.service, &self.api_limits, req, peer).await
            }
            (&Method::GET, "/static/console.css") => {
                let mut r = Response::new(Full::new(Bytes::from_static(pages::CSS.as_bytes())));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/css; charset=utf-8"),
                );
                r
            }
            // A sign-in starts with the page load of a person, not with an image or a
            // script of another site's page (each would count against this network).
            (&Method::GET, "/login")
                if req
                    .headers()
                    .get("sec-fetch-mode")
                    .is_some_and(|m| m != "navigate") =>
            {
                page(
                    StatusCode::FORBIDDEN,
                    pages::signed_out(
                        "A sign-in starts from a page you open, not from another page's content.",
                    ),
                )
            }
            // Counted: each sign-in start, and each callback that answers none under way (a
            // person coming back from their provider is never throttled).
            (&Method::GET, "/login" | crate::config::console::CALLBACK_PATH)
                if !self.returning(&req)
                    && let Err(refused) = self.sign_ins.take(throttle::network(peer)) =>
            {
                if refused.first {
                    warn!(%peer, "console: too many sign-ins from this network (refused for the rest of the minute)");
                }
                let page = page(
                    StatusCode::TOO_MANY_REQUESTS,
                    pages::signed_out(&format!(
                        "Too many sign-ins from your network; try again in {} s.",
                        refused.left.as_secs().max(1)
                    )),
                );
                api::retry_after(page, refused.left)
            }
            (&Method::GET, "/login") => self.login(&req, peer).await,
            (&Method::GET, crate::config::console::CALLBACK_PATH) => self.callback(&req).await,
            (&Method::GET, "/") => self.overview(&req).await,
            (&Method::GET, "/sessions") => self.sessions_page(&req).await,
            (&Method::GET, "/audit") => self.audit_page(&req).await,
            (&Method::GET, p) if p.starts_with("/sessions/") => self.session_page(&req, p).await,
            (&Method::POST, "/approve" | "/deny" | "/revoke" | "/logout") => {
                self.post(req, &path).await
            }
            (&Method::GET | &Method::HEAD, _) => page(
                StatusCode::NOT_FOUND,
                pages::problem(None, "Not found", "There is no such page."),
            ),
            _ => page(
                StatusCode::METHOD_NOT_ALLOWED,
                pages::problem(None, "Not allowed", "That method is not served here."),
            ),
        };
        harden(r)
    }

    /// Whether this is the callback of a sign-in under way in this browser (its state in
    /// the query and in its cookie).
    fn returning(&self, req: &Request<Incoming>) -> bool {
        if req.uri().path() != crate::config::console::CALLBACK_PATH {
            return false;
        }
        let query = parse_form(req.uri().query().unwrap_or(""));
        let state = query.get("state").map(String::as_str).unwrap_or("");
        !state.is_empty()
            && cookie(req, LOGIN_COOKIE)
                .is_some_and(|c| session::same(c.as_bytes(), state.as_bytes()))
            && self.sessions.is_pending(state)
    }

    fn session(&self, req: &Request<Incoming>) -> Option<(String, session::Session)> {
        let token = cookie(req, SESSION_COOKIE)?;
        self.sessions.get(token).map(|s| (token.to_owned(), s))
    }

    /// `/login`, or `/login?max_age=SECS&acr=A+B` for a step-up sign-in (from the page an
    /// approval that needs one answers with). Anyone may ask for a stricter sign-in than
    /// needed; what an approval needs is checked when it is made.
    async fn login(&self, req: &Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let query = parse_form(req.uri().query().unwrap_or(""));
        let step_up = match step_up_of(&query) {
            Ok(s) => s,
            Err(why) => {
                return page(
                    StatusCode::BAD_REQUEST,
                    pages::signed_out(&format!("This sign-in link is not valid: {why}.")),
                );
            }
        };
        match self.provider.begin(step_up).await {
            Ok((url, state, pending)) => {
                if let Err(e) = self
                    .sessions
                    .begin(state.clone(), pending, throttle::network(peer))
                {
                    warn!(%peer, error = %e, "console: sign-in refused");
                    return page(
                        StatusCode::TOO_MANY_REQUESTS,
                        pages::signed_out(&format!("Signing in is not possible right now: {e}.")),
                    );
                }
                with_cookie(
                    redirect(&url),
                    &set_cookie(LOGIN_COOKIE, &state, session::LOGIN_TIMEOUT),
                )
            }
            Err(e) => {
                warn!(error = %e, "console: cannot start a sign-in");
                page(
                    StatusCode::BAD_GATEWAY,
                    pages::signed_out(&format!("Signing in is not possible right now: {e}")),
                )
            }
        }
    }

    async fn callback(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let query = parse_form(req.uri().query().unwrap_or(""));
        let failed = |status, message: &str| {
            with_cookie(
                page(status, pages::signed_out(message)),
                &set_cookie(LOGIN_COOKIE, "", Duration::ZERO),
            )
        };
        let state = query.get("state").map(String::as_str).unwrap_or("");
        // The sign-in must have started in this browser: its cookie holds the same state.
        let ours = cookie(req, LOGIN_COOKIE)
            .is_some_and(|c| !state.is_empty() && session::same(c.as_bytes(), state.as_bytes()));
        if !ours {
            warn!("console: sign-in callback without its state cookie (refused)");
            return failed(
                StatusCode::FORBIDDEN,
                "This sign-in did not start in this browser, or took too long. Sign in again.",
            );
        }
        let Some(pending) = self.sessions.take_pending(state) else {
            return failed(
                StatusCode::FORBIDDEN,
                "This sign-in has expired or was already used. Sign in again.",
            );
        };
        if let Some(error) = query.get("error") {
            info!(error = %error, "console: the identity provider refused the sign-in");
            return failed(
                StatusCode::FORBIDDEN,
                &format!("The identity provider did not sign you in ({error})."),
            );
        }
        // RFC 9207: a provider that names itself in the answer must be ours (mix-up attacks).
        if query
            .get("iss")
            .is_some_and(|iss| iss.trim_end_matches('/') != self.provider.issuer())
        {
            warn!("console: sign-in answer from another issuer (refused)");
            return failed(
                StatusCode::FORBIDDEN,
                "The sign-in answer came from another identity provider.",
            );
        }
        let Some(code) = query.get("code") else {
            return failed(
                StatusCode::BAD_REQUEST,
                "The identity provider sent no code.",
            );
        };
        let identity = match self.provider.finish(code, &pending).await {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "console: sign-in refused");
                return failed(StatusCode::FORBIDDEN, &format!("Sign-in refused: {e}"));
            }
        };
        let unix_account = self.provider.unix_accounts().get(&identity.id).cloned();
        let unix_uid = unix_account.as_deref().and_then(crate::identity::uid_of);
        let person = Person {
            id: identity.id,
            groups: identity.groups,
            unix_uid,
            unix_account,
            auth_time: identity.auth_time,
            acr: identity.acr,
        };
        info!(person = %person.id, subject = %identity.subject, groups = ?person.groups, auth_time = ?person.auth_time, acr = ?person.acr, step_up = pending.step_up.is_some(), "console: signed in");
        match self.sessions.start(person, self.session_ttl) {
            Ok(token) => with_cookie(
                with_cookie(
                    redirect("/"),
                    &set_cookie(SESSION_COOKIE, &token, self.session_ttl),
                ),
                &set_cookie(LOGIN_COOKIE, "", Duration::ZERO),
            ),
            Err(e) => failed(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        }
    }

    async fn overview(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let Some((_, s)) = self.session(req) else {
            return redirect("/login");
        };
        let caller = Caller::web(s.person.clone());
        let who = Some((&s.person, s.csrf.as_str()));
        let (pending, grants) = match (
            self.service.approvals(&caller).await,
            self.service.grants(&caller, false).await,
        ) {
            (Ok(p), Ok(g)) => (p, g),
            (Err(e), _) | (_, Err(e)) => {
                return page(
                    status_of(&e),
                    pages::problem(who, "Not allowed", &e.to_string()),
                );
            }
        };
        let tasks = self
            .service
            .running_tasks(&caller)
            .await
            .unwrap_or_default();
        let query = parse_form(req.uri().query().unwrap_or(""));
        let notice = match (query.get("done").map(String::as_str), query.get("id")) {
            (Some("approve"), Some(id)) => Some(format!("Request {id} approved.")),
            (Some("deny"), Some(id)) => Some(format!("Request {id} denied.")),
            (Some("revoke"), Some(id)) => Some(format!("Grant {id} revoked.")),
            _ => None,
        };
        page(
            StatusCode::OK,
            pages::overview(
                &s.person,
                &s.csrf,
                notice.as_deref(),
                &pending,
                &tasks,
                &grants,
            ),
        )
    }

    /// `/sessions?limit=N&open=1`: sessions, newest first, bounded.
    async fn sessions_page(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let Some((_, s)) = self.session(req) else {
            return redirect("/login");
        };
        let caller = Caller::web(s.person.clone());
        let query = parse_form(req.uri().query().unwrap_or(""));
        let limit = bounded_limit(&query, replay::DEFAULT_LIMIT, replay::MAX_LIMIT);
        let open_only = query.get("open").is_some_and(|v| v == "1");
        match self.service.sessions(&caller, !open_only, limit).await {
            Ok(sessions) => page(
                StatusCode::OK,
                replay::list(&s.person, &s.csrf, &sessions, open_only, limit),
            ),
            Err(e) => self.refused(&s, &e),
        }
    }

    /// `/sessions/ID` (the replay view) and `/sessions/ID/recordings/SEQ` (an exec stream).
    async fn session_page(&self, req: &Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
        let Some((_, s)) = self.session(req) else {
            return redirect("/login");
        };
        let caller = Caller::web(s.person.clone());
        let rest = path.trim_start_matches("/sessions/");
        let not_found = || {
            page(
                StatusCode::NOT_FOUND,
                pages::problem(
                    Some((&s.person, s.csrf.as_str())),
                    "Not found",
                    "There is no such page.",
                ),
            )
        };
        match rest.split('/').collect::<Vec<_>>()[..] {
            [id] if !id.is_empty() => match self
                .service
                .session(
                    &caller,
                    id,
                    parse_form(req.uri().query().unwrap_or(""))
                        .get("from")
                        .and_then(|f| f.parse().ok())
                        .unwrap_or(0),
                )
                .await
            {
                Ok(detail) => page(StatusCode::OK, replay::replay(&s.person, &s.csrf, &detail)),
                Err(e) => self.refused(&s, &e),
            },
            [id, "recordings", seq] if !id.is_empty() => {
                let Ok(seq) = seq.parse::<u32>() else {
                    return not_found();
                };
                match self.service.recording(&caller, id, seq).await {
                    Ok(r) => page(StatusCode::OK, replay::recording(&s.person, &s.csrf, &r)),
                    Err(e) => self.refused(&s, &e),
                }
            }
            _ => not_found(),
        }
    }

    /// `/audit?limit=N`: the host's status, the audit log's verification, its newest records.
    async fn audit_page(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let Some((_, s)) = self.session(req) else {
            return redirect("/login");
        };
        let caller = Caller::web(s.person.clone());
        let query = parse_form(req.uri().query().unwrap_or(""));
        let limit = bounded_limit(&query, audit::DEFAULT_LIMIT, audit::MAX_LIMIT);
        let (status, verify, events) = tokio::join!(
            self.service.status(&caller),
            self.service.audit_verify(&caller),
            self.service.audit(&caller, None, limit),
        );
        match (status, verify, events) {
            (Ok(status), Ok(verify), Ok(events)) => page(
                StatusCode::OK,
                audit::page(&s.person, &s.csrf, &status, &verify, &events, limit),
            ),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => self.refused(&s, &e),
        }
    }

    /// A refused or failed read, as a page.
    fn refused(&self, s: &session::Session, e: &ControlError) -> Response<Full<Bytes>> {
        if matches!(e, ControlError::Forbidden(_)) {
            info!(person = %s.person.id, error = %e, "console: read refused");
        }
        page(
            status_of(e),
            pages::problem(
                Some((&s.person, s.csrf.as_str())),
                "Not allowed",
                &e.to_string(),
            ),
        )
    }

    /// Whether the browser says the form came from elsewhere (`Origin`, `Sec-Fetch-Site`).
    fn cross_site(&self, req: &Request<Incoming>) -> bool {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let foreign_origin = header("origin").is_some_and(|o| o != self.origin);
        let foreign_fetch =
            header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none");
        foreign_origin || foreign_fetch
    }

    async fn post(&self, req: Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
        let Some((token, s)) = self.session(&req) else {
            return page(
                StatusCode::FORBIDDEN,
                pages::signed_out("You are not signed in (or your session ended)."),
            );
        };
        let who = Some((&s.person, s.csrf.as_str()));
        if self.cross_site(&req) {
            let seen = |name| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            warn!(person = %s.person.id, path, origin = %seen("origin"), sec_fetch_site = %seen("sec-fetch-site"), "console: cross-site form refused");
            return page(
                StatusCode::FORBIDDEN,
                pages::problem(who, "Refused", "This form did not come from the console."),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    pages::problem(who, "Refused", "The form is too large."),
                );
            }
        };
        let form = parse_form(std::str::from_utf8(&body).unwrap_or(""));
        if !s.csrf_ok(form.get("csrf").map(String::as_str)) {
            warn!(person = %s.person.id, path, "console: form without its CSRF token refused");
            return page(
                StatusCode::FORBIDDEN,
                pages::problem(
                    who,
                    "Refused",
                    "This form is stale or did not come from the console: reload the page and try again.",
                ),
            );
        }
        if path == "/logout" {
            self.sessions.end(&token);
            info!(person = %s.person.id, "console: signed out");
            return with_cookie(
                page(StatusCode::OK, pages::signed_out("You are signed out.")),
                &set_cookie(SESSION_COOKIE, "", Duration::ZERO),
            );
        }
        let caller = Caller::web(s.person.clone());
        let id = form.get("id").map(String::as_str).unwrap_or("");
        let text = |key: &str| {
            form.get(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let done = match path {
            "/approve" => {
                let ttl = match text("ttl").map(|t| humantime::parse_duration(&t)) {
                    None => None,
                    Some(Ok(d)) => Some(d),
                    Some(Err(e)) => {
                        return page(
                            StatusCode::BAD_REQUEST,
                            pages::problem(who, "Not approved", &format!("TTL: {e} (like 10m)")),
                        );
                    }
                };
                self.service.approve(&caller, id, ttl).await.map(drop)
            }
            "/deny" => self
                .service
                .deny(&caller, id, text("reason"))
                .await
                .map(drop),
            _ => self
                .service
                .revoke(&caller, id, text("reason"))
                .await
                .map(drop),
        };
        let action = path.trim_start_matches('/');
        match done {
            Ok(()) => {
                info!(person = %s.person.id, action, id, "console: done");
                redirect(&format!("/?done={action}&id={}", oidc::url_encode(id)))
            }
            Err(ControlError::SignInAgain { message, step_up }) => {
                info!(person = %s.person.id, action, id, why = %message, "console: a fresh sign-in is needed");
                page(
                    StatusCode::FORBIDDEN,
                    pages::sign_in_again(&s.person, &s.csrf, &message, &login_url(&step_up)),
                )
            }
            Err(e) => {
                info!(person = %s.person.id, action, id, error = %e, "console: refused");
                page(
                    status_of(&e),
                    pages::problem(who, "Refused", &e.to_string()),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_and_the_first_value_wins() {
        let f = parse_form("id=r-1&csrf=a%2Bb&reason=not+now%21&id=r-2&csrf=evil");
        assert_eq!(
            f["id"], "r-1",
            "a repeated field cannot replace a checked one"
        );
        assert_eq!(f["csrf"], "a+b");
        assert_eq!(f["reason"], "not now!");
        // Broken escapes and invalid UTF-8 drop the field rather than guess.
        let f = parse_form("a=%zz&b=%ff&c=%4&d=ok");
        assert!(!f.contains_key("a") && !f.contains_key("b") && !f.contains_key("c"));
        assert_eq!(f["d"], "ok");
    }

    #[test]
    fn every_answer_is_hardened() {
        let r = harden(redirect("/login"));
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
        assert!(!csp.contains("script-src"), "no script at all");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
        let cookie = set_cookie(SESSION_COOKIE, "t", Duration::from_secs(60));
        assert!(cookie.starts_with("__Host-"));
        for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(cookie.contains(attr), "{cookie}");
        }
        assert!(!cookie.contains("Domain"));
    }
}
