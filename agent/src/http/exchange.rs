//! One request/response exchange of an HTTP session: the `Host` checked, the path
//! normalised, the rules applied (allow, deny, or hold for a human), the client's credential
//! headers replaced by the gate's, the response masked and scrubbed, an upgrade relayed, and
//! the request recorded. [`super::session`] owns the connection; this owns what happens to
//! each request on it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    body::{
        self, BoxError, ClientBody, Counted, Direction, LineMasker, Out, Rewritten, SharedTap, Tap,
        Tapped,
    },
    cast,
    config::{Flavor, HttpResource},
    jsonmask::BodyMasker,
    kube::{self, KubeRequest},
    limits::HttpLimits,
    normalize::normalize,
    policy::{self, Decision},
    refuse::{Refusal, Wording, refusal_response, request_hint as request_hint_for},
    scrub::{self, Scrubber},
    upgrade,
    upstream::Upstream,
};
use crate::{
    grants::GrantHandle,
    identity::Attribution,
    model::{self, StatementRecord, Timestamp},
    protocol::{
        Services,
        hold::{self, Hold, HoldOutcome},
        relay::Counters,
        statements::Statements,
    },
};

/// Requests of one connection that may wait for approval at once.
const MAX_HOLDS: u32 = 8;

/// Headers some frameworks take the real method from. (The header lists are `HeaderName`s:
/// a lookup or removal by `&str` parses the name again on every request.)
static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Headers some servers and frameworks route by (instead of the judged request line and Host).
static ROUTING_HEADERS: [HeaderName; 8] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("forwarded"),
];

/// Request headers whose values are never recorded (credentials of any scheme, sessions).
static RECORD_REDACTED: [HeaderName; 7] = [
    HeaderName::from_static("authorization"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("cookie"),
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("x-auth-token"),
    HeaderName::from_static("x-csrf-token"),
    HeaderName::from_static("x-xsrf-token"),
];

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus the
/// proxy-only ones a workload could use to talk to something behind the upstream.
static HOP_BY_HOP: [HeaderName; 9] = [
    HeaderName::from_static("connection"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("proxy-authenticate"),
    HeaderName::from_static("proxy-authorization"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];

/// What every request of the session shares.
pub(super) struct Ctx<'a> {
    pub(super) services: &'a Services,
    pub(super) session_id: String,
    pub(super) who: &'a Attribution,
    pub(super) uid: u32,
    pub(super) resource: &'a str,
    pub(super) settings: &'a HttpResource,
    pub(super) grant: GrantHandle,
    pub(super) upstream: Upstream,
    pub(super) counters: Arc<Counters>,
    /// The session's finished request records, handed to the store in batches.
    pub(super) statements: Arc<Statements>,
    pub(super) seq: AtomicU32,
    /// Requests waiting for approval (the session's cut lets them lapse first).
    pub(super) holding: AtomicU32,
    /// The response masks for this identity and grant (`None`: nothing masked).
    pub(super) masker: Option<Arc<BodyMasker>>,
    /// Relays of upgraded connections (WebSocket, SPDY), at most [`MAX_TUNNELS`] running:
    /// they outlive the HTTP exchange and
    /// end with the session.
    pub(super) upgraded: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Tunnels open or opening, under [`MAX_TUNNELS`].
    pub(super) tunnels: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) stop: CancellationToken,
    /// The grant's `[policy.limits]` and what the session has used of them.
    pub(super) limits: HttpLimits,
    /// Whole response bodies held for masking at once (see [`MAX_MASKED_HELD`]).
    pub(super) masked_held: Arc<tokio::sync::Semaphore>,
}

/// Response bodies one connection may hold whole for masking at once, each up to
/// [`kube::MAX_MASKED_BODY`].
pub(super) const MAX_MASKED_HELD: usize = 2;

/// Tunnels (upgraded streams) one session may hold open at once: kubectl opens one per
/// exec, attach or port-forward; an HTTP/2 client could otherwise open one per stream.
pub(super) const MAX_TUNNELS: usize = 16;

/// A session's place for one tunnel, given back on drop (see [`Ctx::tunnels`]).
struct TunnelPlace(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for TunnelPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that writes its request's record once sent to its end, or dropped (the
/// client gone, the session cut): with the sizes of both bodies and, where the resource keeps
/// them (`record_bodies`), their first bytes, through the resource's detectors.
struct Recorded {
    inner: Out,
    /// `None` once written.
    record: Option<StatementRecord>,
    statements: Arc<Statements>,
    request: SharedTap,
    response: Tap,
    masker: Option<Arc<BodyMasker>>,
    complete: bool,
    /// The body's length, when known from the start.
    expected: Option<u64>,
}

impl Recorded {
    fn write(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        let shown = |what: &str, tap: &Tap| {
            let mut line = format!("[{what} body, {} B]", tap.total);
            if !tap.head.is_empty() {
                let text = String::from_utf8_lossy(&tap.head);
                let text = match &self.masker {
                    Some(m) => m.mask_text(&text).0,
                    None => text.into_owned(),
                };
                line.push(' ');
                line.push_str(&text);
                if tap.total > tap.head.len() as u64 {
                    line.push_str(" ...");
                }
            }
            Some(line)
        };
        {
            let request = self
                .request
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.params.push(shown("request", &request));
        }
        r.params.push(shown("response", &self.response));
        if !self.complete {
            let cut = format!(" (cut after {} B)", self.response.total);
            r.tag = Some(r.tag.take().unwrap_or_default() + &cut);
        }
        self.statements.push(r);
    }
}

impl hyper::body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.response.see(data);
                }
            }
            std::task::Poll::Ready(None) => {
                this.complete = true;
                this.write();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // A server stops polling a body of known length once it has sent that many bytes;
        // a body nobody polled (HEAD, 204, 304) is complete if it was empty.
        if hyper::body::Body::is_end_stream(&self.inner)
            || self.expected.is_some_and(|n| self.response.total >= n)
        {
            self.complete = true;
        }
        self.write();
    }
}

/// One request waiting for approval, counted in [`Ctx::holding`] while it lives.
struct Holding<'c>(&'c AtomicU32);

impl<'c> Holding<'c> {
    fn new(count: &'c AtomicU32) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request's record while its exchange runs (see [`Ctx::handle`]).
struct Unfinished<'c, 'a> {
    ctx: &'c Ctx<'a>,
    started: Instant,
    held: Duration,
    /// `None` once written.
    record: Option<StatementRecord>,
}

impl Unfinished<'_, '_> {
    fn verdict(&mut self, v: Verdict) {
        self.held = v.held;
        if let Some(r) = self.record.as_mut() {
            r.decision = v.decision;
            r.rule = v.rule;
            r.approved_by = v.approved_by;
            r.held_ms = u64::try_from(v.held.as_millis()).unwrap_or(u64::MAX);
        }
    }

    fn note(&mut self, more: &str) {
        if let Some(r) = self.record.as_mut() {
            r.text.push_str(more);
        }
    }

    /// The record, complete but for the bodies: it is written when the response body has
    /// been sent (or dropped), by [`Recorded`].
    fn finish(
        &mut self,
        status: u16,
        error: Option<String>,
        masked: u64,
    ) -> Option<StatementRecord> {
        let mut r = self.record.take()?;
        r.tag = Some(status.to_string());
        r.error = error;
        r.masked = masked;
        r.duration_ms = Some(
            self.started
                .elapsed()
                .saturating_sub(self.held)
                .as_secs_f64()
                * 1e3,
        );
        Some(r)
    }
}

impl Drop for Unfinished<'_, '_> {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.tag = Some("reset".into());
            r.error = Some(match r.decision {
                model::Decision::Allowed | model::Decision::Approved => {
                    "the client reset the request before its answer; the upstream may have run it"
                }
                _ => "the client reset the request before it was decided",
            }
            .into());
            r.duration_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
            self.ctx.record(r);
        }
    }
}

/// How a request was decided, for its record.
struct Verdict {
    decision: model::Decision,
    rule: Option<String>,
    approved_by: Option<String>,
    held: Duration,
}

impl Verdict {
    fn allowed(rule: Option<String>) -> Self {
        Self {
            decision: model::Decision::Allowed,
            rule,
            approved_by: None,
            held: Duration::ZERO,
        }
    }
}

impl Ctx<'_> {
    pub(super) async fn handle(&self, req: Request<Incoming>) -> Response<Out> {
        let mut req = req.map(ClientBody::Streaming);
        let started = Instant::now();
        upgrade::from_extended_connect(&mut req);
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let text = format!("{method} {}", self.shown_target(&target));
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        // Written however the exchange ends: dropped half way (an HTTP/2 stream reset, the
        // client gone), it still records the request, which may have reached the upstream.
        let mut record = Unfinished {
            ctx: self,
            started,
            held: Duration::ZERO,
            record: Some(StatementRecord {
                session: self.session_id.clone(),
                seq,
                at: Timestamp::now(),
                text: text.clone(),
                params: self.headers_for_record(req.headers()),
                decision: model::Decision::Refused,
                rule: None,
                approved_by: None,
                held_ms: 0,
                duration_ms: None,
                rows: None,
                tag: None,
                error: None,
                masked: 0,
            }),
        };
        let request_tap = Tap::shared(self.settings.record_bodies);
        let wording = Wording::for_request(self.settings.flavor, &method, req.uri());
        let (response, error, masked) = match self.judge(&mut req, &method).await {
            Err((refusal, verdict)) => {
                record.verdict(verdict);
                info!(identity = %self.who.identity, resource = self.resource, session = %self.session_id, request = %text, status = refusal.status, error = %refusal.error, "http request refused");
                let error = Some(format!("{}: {}", refusal.status, refusal.error));
                (refusal_response(wording, &refusal), error, 0)
            }
            Ok((path, kube, verdict)) => {
                record.verdict(verdict);
                match self
                    .forward(req, &path, kube.as_ref(), seq, request_tap.clone())
                    .await
                {
                    Ok((response, masked, recorded)) => {
                        if let Some(p) = recorded {
                            record.note(&format!(" [recorded: {}]", p.display()));
                        }
                        (response, None, masked)
                    }
                    Err(refusal) => {
                        let error = Some(format!("{}: {}", refusal.status, refusal.error));
                        (refusal_response(wording, &refusal), error, 0)
                    }
                }
            }
        };
        let finished = record.finish(response.status().as_u16(), error, masked);
        let (parts, body) = response.into_parts();
        let expected = hyper::body::Body::size_hint(&body).exact();
        let body = Recorded {
            expected,
            inner: body,
            record: finished,
            statements: self.statements.clone(),
            request: request_tap,
            response: Tap::default_keeping(self.settings.record_bodies),
            masker: self.masker.clone(),
            complete: false,
        };
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// The request's headers as recorded: `name: value`, credentials and cookies redacted,
    /// other values through the resource's detectors when it masks.
    fn headers_for_record(&self, headers: &HeaderMap) -> Vec<Option<String>> {
        headers
            .iter()
            .map(|(name, value)| {
                let secret = RECORD_REDACTED.contains(name)
                    || self
                        .settings
                        .credentials
                        .values()
                        .any(|c| c.header == *name);
                // One string per header, the value masked straight into it.
                let mut line = String::with_capacity(name.as_str().len() + 2 + value.len());
                line.push_str(name.as_str());
                line.push_str(": ");
                if secret {
                    line.push_str("[redacted]");
                } else {
                    let text = String::from_utf8_lossy(value.as_bytes());
                    match &self.masker {
                        Some(m) => {
                            m.mask_text_into(&text, &mut line);
                        }
                        None => line.push_str(&text),
                    }
                }
                Some(line)
            })
            .collect()
    }

    fn record(&self, record: StatementRecord) {
        self.statements.push(record);
    }

    /// Host, path and rules: `Ok` with the normalised path to forward, or the refusal.
    async fn judge(
        &self,
        req: &mut Request<ClientBody>,
        method: &Method,
    ) -> Result<(String, Option<KubeRequest>, Verdict), (Refusal, Verdict)> {
        let refused = |r: Refusal| {
            let rule = r.rule.clone();
            (
                r,
                Verdict {
                    decision: model::Decision::Denied,
                    ..Verdict::allowed(rule)
                },
            )
        };
        // The grant is checked on every request: a request pipelined behind one that waited
        // runs only while the grant is live.
        if self.stop.is_cancelled()
            || *self.grant.state.borrow() != crate::grants::GrantState::Active
        {
            return Err(refused(Refusal {
                status: 403,
                error: format!("the grant on {} has ended", self.resource),
                rule: None,
                hint: Some(request_hint_for(self.resource, self.grant.access)),
            }));
        }
        self.limits.admit(&self.services.rates).map_err(refused)?;
        if method == Method::CONNECT {
            return Err(refused(Refusal {
                status: 501,
                error: "CONNECT is not supported through the gate (except WebSocket over HTTP/2)"
                    .into(),
                rule: None,
                hint: None,
            }));
        }
        if let Some(Err(token)) = upgrade::requested(req.headers()) {
            return Err(refused(Refusal {
                status: 501,
                error: format!(
                    "the `{token}` upgrade is not supported through the gate (WebSocket and SPDY/3.1 are)"
                ),
                rule: None,
                hint: None,
            }));
        }
        // A method the upstream reads elsewhere than the request line would dodge the level
        // check and every method rule (`GET` + `X-HTTP-Method-Override: DELETE`).
        if let Some(name) = METHOD_OVERRIDES
            .iter()
            .find(|h| req.headers().contains_key(*h))
        {
            return Err(refused(Refusal::malformed(format!(
                "the `{name}` header is not allowed through the gate: send the method itself"
            ))));
        }
        if req.uri().query().is_some_and(|q| {
            q.split('&').any(|kv| {
                kv.split('=')
                    .next()
                    .is_some_and(|k| policy::decode_query_part(k).eq_ignore_ascii_case(b"_method"))
            })
        }) {
            return Err(refused(Refusal::malformed(
                "a `_method` query parameter is not allowed through the gate: send the method itself",
            )));
        }
        let host = self.check_host(req).map_err(refused)?;
        let path =
            normalize(req.uri().path()).map_err(|e| refused(Refusal::malformed(e.to_string())))?;
        let forwarded = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let kube = match self.settings.flavor {
            Flavor::Http => None,
            Flavor::Kubernetes => {
                // The gate is the only identity the API server sees: a workload naming
                // another (Impersonate-User, -Group, -Uid, -Extra-*) is refused outright.
                if req
                    .headers()
                    .keys()
                    .any(|k| k.as_str().starts_with("impersonate-"))
                {
                    return Err(refused(Refusal {
                        status: 403,
                        error: "impersonation (Impersonate-* headers, kubectl --as) is not allowed through the gate".into(),
                        rule: None,
                        hint: None,
                    }));
                }
                Some(
                    kube::parse(method.as_str(), path.as_str(), req.uri().query()).ok_or_else(
                        || refused(Refusal::malformed("not a Kubernetes API request path")),
                    )?,
                )
            }
        };
        // How the request is named to approvers and in refusals.
        if let Some(Ok(_)) = upgrade::requested(req.headers()) {
            // An upgraded stream carries anything (GraphQL mutations, JSON-RPC writes), and the
            // gate does not judge its frames: it needs write. Nor does it mask them, so where
            // masks or Secrets apply only Kubernetes' own streams (exec, attach, port-forward)
            // may upgrade.
            if self.grant.access < crate::config::Access::Write {
                return Err(refused(Refusal::needs_level(
                    self.resource,
                    "a protocol upgrade",
                    crate::config::Access::Write,
                )));
            }
            let kube_stream = kube
                .as_ref()
                .is_some_and(|k| matches!(k.verb.as_str(), "exec" | "attach" | "portforward"));
            let masked =
                self.masker.is_some() || kube.as_ref().is_some_and(KubeRequest::touches_secrets);
            if masked && !kube_stream {
                return Err(refused(Refusal {
                    status: 403,
                    error: "an upgraded stream cannot be masked, and masks apply here".into(),
                    rule: None,
                    hint: Some(
                        "ask over plain HTTP (for Kubernetes watches, without WebSocket)".into(),
                    ),
                }));
            }
        }
        // How the request is named in refusals and held requests' reasons: shown through the
        // detectors like its record's text. Built only for a refusal or a hold (most requests
        // are allowed).
        let what = || {
            kube.as_ref().map_or_else(
                || format!("{method} {}", self.shown_target(path.as_str())),
                |k| self.shown_target(&k.describe()),
            )
        };
        let parts = policy::RequestParts {
            host: host.as_deref(),
            query: req.uri().query(),
            headers: Some(req.headers()),
        };
        match policy::decide_kube(
            &self.settings.rules,
            self.grant.access,
            method.as_str(),
            &path,
            kube.as_ref(),
            &parts,
        ) {
            Decision::Allow { rule } => Ok((forwarded, kube, Verdict::allowed(rule))),
            Decision::NeedsLevel { needed } => Err(refused(Refusal::needs_level(
                self.resource,
                &kube
                    .as_ref()
                    .map_or_else(|| method.to_string(), |k| k.verb.clone()),
                needed,
            ))),
            Decision::Deny { rule } => Err(refused(Refusal::denied(&rule, &what()))),
            Decision::Approve { rule } => {
                // Each hold is a request approvers see: an HTTP/2 client may not flood them.
                if self.holding.load(Ordering::SeqCst) >= MAX_HOLDS {
                    return Err(refused(Refusal {
                        status: 429,
                        error: format!(
                            "{MAX_HOLDS} requests on this connection already wait for approval"
                        ),
                        rule: Some(rule),
                        hint: Some("wait for their decisions, then retry".into()),
                    }));
                }
                // Counted from here however the wait ends (a reset stream drops it half way),
                // the body's reading included: a client cannot park more than MAX_HOLDS
                // bodies on one connection.
                let holding = Holding::new(&self.holding);
                // The approver sees the body, and approves exactly it: read whole first.
                let body = read_held_body(req, &self.services.buffers, &self.who.identity)
                    .await
                    .map_err(refused)?;
                let text = self.held_text(method, &forwarded, req.headers(), &body, kube.as_ref());
                let verdict = self.hold(&text, &rule, &what()).await;
                drop(holding);
                verdict.map(|v| (forwarded, kube, v))
            }
        }
    }

    /// Holds a request for a human; `Ok` once approved.
    async fn hold(
        &self,
        text: &str,
        rule: &str,
        what: &str,
    ) -> Result<Verdict, (Refusal, Verdict)> {
        let held = hold::hold(
            self.services,
            self.who,
            self.uid,
            self.resource,
            self.grant.access,
            &self.session_id,
            Hold {
                text,
                rule,
                reason: &format!("{rule} holds {what} for approval"),
                timeout: self.settings.approval_timeout,
            },
            &self.stop,
        )
        .await;
        let not = |why: String, decision| {
            (
                Refusal::not_approved(rule, what, &why),
                Verdict {
                    decision,
                    rule: Some(rule.to_owned()),
                    approved_by: None,
                    held: held.waited,
                },
            )
        };
        match held.outcome {
            HoldOutcome::Approved { by } => Ok(Verdict {
                decision: model::Decision::Approved,
                rule: Some(rule.to_owned()),
                approved_by: Some(by),
                held: held.waited,
            }),
            HoldOutcome::NotApproved { status, by } => Err(not(
                match by {
                    Some(by) => format!("request {status} by {by}"),
                    None => format!(
                        "nobody approved it within {}",
                        model::human_duration(self.settings.approval_timeout)
                    ),
                },
                model::Decision::Refused,
            )),
            HoldOutcome::NotFiled(e) => Err(not(e, model::Decision::Denied)),
            HoldOutcome::Failed(e) => Err(not(e, model::Decision::Refused)),
            HoldOutcome::SessionEnded => Err(not(
                "the session ended while it waited".into(),
                model::Decision::Refused,
            )),
        }
    }

    /// What approvers are shown of a held request: the request line, its content type and
    /// size, and its body (the first [`HELD_BODY_SHOWN`] bytes) as the resource would mask it
    /// in a response: Secret values of a Kubernetes Secret, then the detectors.
    fn held_text(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: &Bytes,
        kube: Option<&KubeRequest>,
    ) -> String {
        let mut text = format!("{method} {}", self.shown_target(target));
        if body.is_empty() {
            return text;
        }
        let media = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type");
        let digest = {
            use sha2::Digest as _;
            data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(body))
        };
        text.push_str(&format!(
            "\n[body: {} bytes, {media}, sha256 {}]\n",
            body.len(),
            &digest[..16]
        ));
        let shown: Vec<u8> = if kube.is_some_and(KubeRequest::touches_secrets) {
            // A Secret's values are never shown, whatever shape the body has: an object has
            // its data masked; a JSON Patch (an array of operations) shows only each
            // operation and path; anything else is not shown.
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(_)) => match kube::mask_body(body) {
                    Ok((masked, _)) => masked,
                    Err(_) => {
                        text.push_str("(a Secret body the gate cannot mask: not shown)");
                        return text;
                    }
                },
                Ok(serde_json::Value::Array(ops)) => {
                    text.push_str("(a JSON Patch of a Secret; values not shown)");
                    for op in ops.iter().take(64) {
                        let field = |k: &str| op.get(k).and_then(|v| v.as_str()).unwrap_or("?");
                        text.push_str(&format!("\n  {} {}", field("op"), field("path")));
                    }
                    return text;
                }
                _ => {
                    text.push_str("(a Secret body that is not a JSON object: not shown)");
                    return text;
                }
            }
        } else {
            body.to_vec()
        };
        let cut = shown.len() > HELD_BODY_SHOWN;
        let head = &shown[..shown.len().min(HELD_BODY_SHOWN)];
        match std::str::from_utf8(head).or_else(|e| {
            // A cut may fall inside a character.
            if cut && e.error_len().is_none() {
                std::str::from_utf8(&head[..e.valid_up_to()])
            } else {
                Err(e)
            }
        }) {
            Ok(t) => {
                let t = match &self.masker {
                    Some(m) => m.mask_text(t).0,
                    None => t.to_owned(),
                };
                text.push_str(&t);
                if cut {
                    text.push_str(&format!(
                        "\n[... {} more bytes not shown]",
                        shown.len() - head.len()
                    ));
                }
            }
            Err(_) => text.push_str("(binary: not shown)"),
        }
        text
    }

    /// A request's path and query as people see it (records, logs, approvers, webhooks):
    /// through the resource's detectors, since a workload may put an address, a card
    /// number or a token in a URL as easily as in a body. Only what is shown: the upstream
    /// gets the target as it was.
    fn shown_target(&self, target: &str) -> String {
        match &self.masker {
            // Decoded first, or `boss%40example.com` would pass the e-mail detector.
            Some(m) => {
                m.mask_text(&super::normalize::decoded_for_display(target))
                    .0
            }
            None => target.to_owned(),
        }
    }

    /// The `Host` the request names must be one of the resource's (when it has names), so a
    /// workload cannot reach another virtual host behind the same address. `Ok` with the host
    /// (lower case, without the port) when the request names one.
    fn check_host<B>(&self, req: &Request<B>) -> Result<Option<String>, Refusal> {
        // Servers differ on which of several Host values they take: one only.
        if req.headers().get_all(header::HOST).iter().count() > 1 {
            return Err(Refusal::malformed(
                "the request has more than one Host header",
            ));
        }
        let header = req
            .headers()
            .get(header::HOST)
            .map(|v| {
                v.to_str()
                    .map_err(|_| Refusal::malformed("the Host header is not ASCII"))
            })
            .transpose()?;
        let authority = req.uri().authority().map(|a| a.as_str());
        let host = match (authority, header) {
            (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
                return Err(Refusal::malformed(
                    "the request target and the Host header name different hosts",
                ));
            }
            (Some(a), _) => Some(a),
            (None, h) => h,
        };
        let name = host.map(|h| host_without_port(h).to_ascii_lowercase());
        if self.settings.hosts.is_empty() {
            return Ok(name);
        }
        let Some(name) = name else {
            return Err(Refusal::malformed("the request has no Host header"));
        };
        if self.settings.hosts.contains(&name) {
            Ok(Some(name))
        } else {
            Err(Refusal {
                status: 403,
                error: format!("host {name} is not served by {}", self.resource),
                rule: None,
                hint: Some(format!(
                    "this resource serves {}",
                    self.settings.hosts.join(", ")
                )),
            })
        }
    }

    /// Sends the request upstream with the gate's credential and returns the scrubbed
    /// response.
    async fn forward(
        &self,
        req: Request<ClientBody>,
        path: &str,
        kube: Option<&KubeRequest>,
        seq: u32,
        request_tap: SharedTap,
    ) -> Result<(Response<Out>, u64, Option<std::path::PathBuf>), Refusal> {
        let mut recorded = None;
        let mut req = req;
        let upgrade = upgrade::requested(req.headers()).and_then(Result::ok);
        let client_upgraded = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let extended_connect = req.extensions().get::<upgrade::ExtendedConnect>().is_some();
        let (mut parts, incoming) = req.into_parts();
        let head = parts.method == Method::HEAD;
        // The upstream speaks HTTP/1.1 whatever the client spoke: an HTTP/2 request's
        // authority (checked against the resource's hosts) becomes its Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
        if parts.version == hyper::Version::HTTP_2 {
            // HTTP/2 splits cookies into several fields; HTTP/1.1 wants one (RFC 9113
            // section 8.2.3), and servers differ on which of several they read.
            join_cookies(&mut parts.headers);
        }
        parts.version = hyper::Version::HTTP_11;
        parts.uri = path.parse().map_err(|_| {
            Refusal::malformed("the request target is not valid after normalisation")
        })?;
        strip_hop_by_hop(&mut parts.headers);
        // Headers some servers route by instead of the request line and Host that were judged.
        remove_listed(&mut parts.headers, &ROUTING_HEADERS);
        // Every header a credential of this resource rides in is the gate's, whatever the
        // client put there.
        for cred in self.settings.credentials.values() {
            parts.headers.remove(&cred.header);
        }
        let secret = match self.settings.credentials.get(&self.grant.access) {
            None => None,
            Some(cred) => {
                let loaded = cred.load().map_err(|e| {
                    warn!(resource = self.resource, error = %e, "credential unreadable");
                    Refusal {
                        status: 503,
                        error: format!("the gate cannot read the credential for {}", self.resource),
                        rule: None,
                        hint: Some("an operator must fix the resource's secret_file".into()),
                    }
                })?;
                cred.apply(&mut parts.headers, &loaded);
                Some(loaded.secret)
            }
        };
        if let Some(token) = &upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, token.clone());
            if secret.is_some() {
                // A compressed WebSocket stream could carry the credential past the scrubber.
                parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            }
        }
        let secrets = kube.is_some_and(KubeRequest::touches_secrets);
        if secret.is_some() || secrets || self.masker.is_some() {
            // Byte ranges would hand out a scrubbed or masked value piece by piece, each
            // piece too short to recognise.
            parts.headers.remove(header::RANGE);
            parts.headers.remove(header::IF_RANGE);
            // Compressed responses could carry the secret past the scrubber, or Secret
            // values past the masker.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if secrets && !accepts_only_json(&parts.headers) {
            // Protobuf (kubectl's default for some calls) cannot be masked: ask for JSON.
            parts
                .headers
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        }
        // A tunnel outlives its exchange: at most MAX_TUNNELS per session (an HTTP/2 client
        // multiplexes them over its one connection), a place taken here, before anything
        // is awaited, so that streams opened at once cannot all see room. Its upstream
        // descriptor stays counted against the agent's with the connection it upgrades.
        let tunnel = match &upgrade {
            None => None,
            Some(_) => {
                let open = self.tunnels.fetch_add(1, Ordering::SeqCst);
                let place = TunnelPlace(self.tunnels.clone());
                if open >= MAX_TUNNELS {
                    drop(place);
                    return Err(Refusal {
                        status: 429,
                        error: format!(
                            "this connection already holds {open} open streams (exec, attach, port-forward, WebSocket), the most one connection may"
                        ),
                        rule: None,
                        hint: Some("close a stream first, or open another connection".into()),
                    });
                }
                self.upgraded
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .retain(|r| !r.is_finished());
                Some(place)
            }
        };
        // An exec or attach stream is recorded from its first byte, or not opened at all: its
        // recording is started before the request goes upstream, so one that cannot be
        // (the state directory unwritable, the disk full) never reaches the cluster.
        let mut recording = match kube
            .filter(|k| upgrade.is_some() && matches!(k.verb.as_str(), "exec" | "attach"))
        {
            Some(k) => Some(self.start_recording(seq, &k.describe()).map_err(|e| Refusal {
                status: 503,
                error: format!(
                    "the {} stream cannot be recorded, so it is not opened: {e}",
                    k.verb
                ),
                rule: None,
                hint: Some(
                    "the agent's state directory (recordings/) must be writable; see the agent's log"
                        .into(),
                ),
            })?),
            None => None,
        };
        // Removed unless its stream opens (the upstream may fail or refuse the upgrade).
        let mut unused_recording = RemoveOnDrop(recording.as_ref().map(|(_, p)| p.clone()));
        let request = Request::from_parts(
            parts,
            Tapped::new(
                Counted::new(incoming, self.counters.clone(), Direction::Up),
                request_tap,
            ),
        );
        let response = self.upstream.send(request).await.map_err(|e| match e {
            super::upstream::SendError::Full(e) => Refusal {
                status: if e.kind == crate::protocol::limits::Kind::Agent {
                    503
                } else {
                    429
                },
                error: e.to_string(),
                rule: None,
                hint: Some(e.hint()),
            },
            super::upstream::SendError::Upstream(e) => Refusal {
                status: 502,
                error: e,
                rule: None,
                hint: None,
            },
        })?;
        let mut response = response;
        if extended_connect && response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream did not switch: a 2xx passed on would open a tunnel that nothing
            // relays; anything else is an answer the client can read.
            if response.status().is_success() {
                return Err(Refusal {
                    status: 502,
                    error: format!(
                        "the upstream answered the WebSocket handshake with {} instead of switching protocols",
                        response.status()
                    ),
                    rule: None,
                    hint: None,
                });
            }
        }
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(client_upgraded), Some(token)) = (client_upgraded, upgrade)
        {
            let upstream_upgraded = hyper::upgrade::on(&mut response);
            let hold = response
                .extensions_mut()
                .remove::<super::upstream::TunnelHold>();
            let (mut parts, _) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if extended_connect {
                // RFC 8441: a 200 opens the stream; HTTP/2 has no upgrade headers, and the
                // accept key answered the gate's own Sec-WebSocket-Key.
                parts.status = StatusCode::OK;
                parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
                parts.headers.remove(header::CONTENT_LENGTH);
            } else {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, token);
            }
            if let Some(secret) = secret.as_deref() {
                scrub_headers(&mut parts.headers, secret);
            }
            let counters = self.counters.clone();
            let scrubber = secret.as_deref().and_then(Scrubber::new);
            let session = self.session_id.clone();
            let recording = recording.take();
            unused_recording.0 = None;
            if let Some((_, path)) = &recording {
                recorded = Some(path.clone());
            }
            let recording = recording.map(|(cast, _)| cast);
            let relay = tokio::spawn(async move {
                let _tunnel = (tunnel, hold);
                let (client, upstream) = tokio::join!(client_upgraded, upstream_upgraded);
                match (client, upstream) {
                    (Ok(c), Ok(u)) => {
                        if let Err(e) = upgrade::relay(c, u, counters, scrubber, recording).await {
                            debug!(session = %session, error = %e, "upgraded stream ended");
                        }
                    }
                    (c, u) => {
                        debug!(session = %session, client = ?c.err(), upstream = ?u.err(), "upgrade did not complete")
                    }
                }
            });
            self.upgraded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(relay);
            return Ok((
                Response::from_parts(parts, body::full(bytes::Bytes::new())),
                0,
                recorded,
            ));
        }
        drop(unused_recording);
        let (mut parts, incoming) = response.into_parts();
        // A transfer coding other than chunked (`Transfer-Encoding: gzip, chunked`) reaches
        // here still applied: hyper removes only the chunking.
        let transfer_coded = parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|c| {
                let c = c.trim_ascii();
                !c.is_empty()
                    && !c.eq_ignore_ascii_case(b"chunked")
                    && !c.eq_ignore_ascii_case(b"identity")
            });
        if transfer_coded {
            // Forwarded without its Transfer-Encoding (hop-by-hop), the body would reach the
            // client still coded, and past the scrubber and masks.
            return Err(Refusal {
                status: 502,
                error: "the upstream used a transfer coding other than chunked, which the gate does not decode".into(),
                rule: None,
                hint: None,
            });
        }
        strip_hop_by_hop(&mut parts.headers);
        let compressed = parts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if parts.status == StatusCode::PARTIAL_CONTENT
            && (secret.is_some() || secrets || self.masker.is_some())
        {
            return Err(Refusal {
                status: 502,
                error: "the upstream answered with a byte range, which the gate cannot check"
                    .into(),
                rule: None,
                hint: None,
            });
        }
        self.limits.check_length(
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .filter(|_| !head),
        )?;
        // The reason phrase is written as the upstream sent it: drop it (hyper writes the
        // standard one).
        parts.extensions.remove::<hyper::ext::ReasonPhrase>();
        if compressed && (secret.is_some() || secrets || self.masker.is_some()) {
            return Err(Refusal {
                status: 502,
                error: "the upstream sent a compressed body, which the gate cannot check".into(),
                rule: None,
                hint: None,
            });
        }
        let counted = Counted::new(incoming, self.counters.clone(), Direction::Down);
        let mut masked = 0;
        let mut body: Out = counted.map_err(BoxError::from).boxed_unsync();
        let secrets_of = kube.filter(|k| k.touches_secrets());
        if secrets_of.is_some() || self.masker.is_some() {
            let (b, n) = self
                .mask_response(&mut parts, body, secrets_of, head)
                .await?;
            body = b;
            masked = n;
        }
        if let Some(scrubber) = secret.as_deref().and_then(Scrubber::new) {
            scrub_headers(&mut parts.headers, secret.as_deref().unwrap_or_default());
            body = Rewritten::new(body, scrubber).boxed_unsync();
        }
        let body = self.limits.cap(body);
        Ok((Response::from_parts(parts, body), masked, None))
    }

    /// Masks a response body: Secret values of a Kubernetes `secrets` request, the resource's
    /// JSON paths and detectors. JSON and text are held (up to [`kube::MAX_MASKED_BODY`]) and
    /// masked whole; line-framed streams (watch, server-sent events, NDJSON) line by line;
    /// anything else is refused unless the resource lets it pass. Fail closed throughout.
    async fn mask_response(
        &self,
        parts: &mut hyper::http::response::Parts,
        mut body: Out,
        secrets_of: Option<&KubeRequest>,
        head: bool,
    ) -> Result<(Out, u64), Refusal> {
        let refusal = |error: String| Refusal {
            status: 502,
            error,
            rule: None,
            hint: None,
        };
        let media = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        // No body to mask (a HEAD answer keeps its Content-Length, and has no body).
        let empty = head
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
            || parts
                .headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v == "0");
        if empty {
            return Ok((body, 0));
        }
        let json = media == "application/json" || media.ends_with("+json");
        let lines = media == "text/event-stream"
            || media == "application/x-ndjson"
            || media == "application/jsonl"
            || secrets_of.is_some_and(|k| k.verb == "watch");
        let text = media.starts_with("text/");
        if secrets_of.is_some() && !json {
            return Err(Refusal {
                hint: Some("ask for JSON (kubectl does by default)".into()),
                ..refusal("the API server answered a Secrets request in a format other than JSON, which the gate cannot mask".into())
            });
        }
        if !(json || lines || text) {
            return match self.settings.uninspectable {
                super::config::Uninspectable::Pass => Ok((body, 0)),
                super::config::Uninspectable::Refuse => Err(Refusal {
                    hint: Some("the resource's masks cannot read this content type; an operator may set uninspectable = \"pass\"".into()),
                    ..refusal(format!("the upstream answered with `{media}`, which the gate cannot inspect for masked values"))
                }),
            };
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        let secrets = secrets_of.is_some();
        let masker = self.masker.clone();
        let mask_json = move |bytes: &[u8]| -> Result<(Vec<u8>, u64), String> {
            let mut value: serde_json::Value = serde_json::from_slice(bytes)
                .map_err(|e| format!("a response the gate must mask is not JSON ({e})"))?;
            let mut n = 0;
            if secrets {
                n += kube::mask_secret_fields(&mut value);
            }
            if let Some(m) = &masker {
                n += m.mask_json(&mut value);
            }
            serde_json::to_vec(&value)
                .map(|v| (v, n))
                .map_err(|e| e.to_string())
        };
        if lines {
            let masker = self.masker.clone();
            let per_line: super::body::LineMask = Box::new(move |line: &[u8]| {
                if json || secrets || line.first().is_some_and(|b| *b == b'{' || *b == b'[') {
                    if let Ok((out, _)) = mask_json(line) {
                        return Ok(out);
                    }
                    if json || secrets {
                        return Err("a streamed line is not JSON the gate can mask".into());
                    }
                }
                let text = String::from_utf8_lossy(line);
                Ok(masker.as_ref().map_or_else(
                    || text.as_bytes().to_vec(),
                    |m| m.mask_text(&text).0.into_bytes(),
                ))
            });
            let held = self.services.buffers.reservation(&self.who.identity);
            let masked =
                Rewritten::new(body, LineMasker::new(kube::MAX_MASKED_BODY, per_line, held));
            return Ok((masked.boxed_unsync(), 0));
        }
        // A whole body is held from its first byte until the client has read the masked
        // copy: only a few per connection at once (an HTTP/2 client that reads nothing could
        // otherwise pin one per stream).
        let permit = self
            .masked_held
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| refusal(format!("masking: {e}")))?;
        let mut held = self.services.buffers.reservation(&self.who.identity);
        let bytes = collect_bounded(&mut body, kube::MAX_MASKED_BODY, &mut held)
            .await
            .map_err(|e| refusal(format!("reading a response to mask it: {e}")))?;
        let (out, n) = if json {
            // The parsed tree is many times the text (see `parsed_size`): reserved before it
            // is built, or a workload could make the gate hold far more than its share.
            held.cover(2 * bytes.len() + super::jsonmask::parsed_size(&bytes))
                .map_err(buffers_full)?;
            mask_json(&bytes).map_err(refusal)?
        } else {
            let text = String::from_utf8_lossy(&bytes);
            let (out, n) = self
                .masker
                .as_ref()
                .map_or_else(|| (text.to_string(), 0), |m| m.mask_text(&text));
            (out.into_bytes(), n)
        };
        drop(bytes);
        Ok((
            body::Permitted::new(body::Pieces::new(out), (permit, held)).boxed_unsync(),
            n,
        ))
    }

    /// Starts the asciicast recording of an exec or attach stream under `state_dir/recordings`.
    fn start_recording(
        &self,
        seq: u32,
        title: &str,
    ) -> Result<(cast::SharedCast, std::path::PathBuf), String> {
        let dir = self
            .services
            .config
            .get()
            .daemon
            .state_dir
            .join("recordings");
        match cast::Cast::create(&dir, &format!("{}-{seq}", self.session_id), title) {
            Ok(c) => {
                let path = c.path.clone();
                Ok((Arc::new(std::sync::Mutex::new(c)), path))
            }
            Err(e) => {
                warn!(session = %self.session_id, error = %e, "cannot record the exec stream: refused");
                Err(e.to_string())
            }
        }
    }
}

/// A file removed when dropped, unless disarmed (its path taken out).
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Most bytes a request held for approval may carry: it is read whole (and held in memory)
/// before it is filed. Kubernetes objects stay below 1.5 MiB (etcd's limit).
pub(super) const MAX_HELD_BODY: usize = 2 * 1024 * 1024;

/// How long a client has to send the body of a request held for approval.
const HELD_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a held request's body approvers are shown.
const HELD_BODY_SHOWN: usize = 8 * 1024;

/// Reads a held request's body whole (so it is shown to the approver, and exactly it is sent
/// on approval), replacing the streaming body with what was read.
async fn read_held_body(
    req: &mut Request<ClientBody>,
    buffers: &crate::protocol::buffers::Buffers,
    identity: &str,
) -> Result<Bytes, Refusal> {
    // A compressed body would be shown as binary and decoded upstream: the approver must be
    // able to read what they approve.
    if let Some(coding) = req
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .find(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(Refusal {
            status: 415,
            error: format!(
                "a request held for approval must not be compressed (Content-Encoding: {}): the approver could not read it",
                String::from_utf8_lossy(coding.as_bytes())
            ),
            rule: None,
            hint: Some("send the body uncompressed".into()),
        });
    }
    let body = std::mem::replace(req.body_mut(), ClientBody::Read(None, None));
    let ClientBody::Streaming(mut incoming) = body else {
        *req.body_mut() = body;
        return Ok(req.body().read().cloned().unwrap_or_default());
    };
    if hyper::body::Body::size_hint(&incoming)
        .exact()
        .is_some_and(|n| n > MAX_HELD_BODY as u64)
    {
        return Err(held_too_large());
    }
    let mut held = buffers.reservation(identity);
    let read = async {
        let mut out = bytes::BytesMut::new();
        while let Some(frame) = incoming.frame().await {
            let frame =
                frame.map_err(|e| Refusal::malformed(format!("reading the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > MAX_HELD_BODY {
                    return Err(held_too_large());
                }
                held.cover(out.len() + data.len()).map_err(buffers_full)?;
                out.extend_from_slice(&data);
            }
        }
        Ok(out.freeze())
    };
    let data = tokio::time::timeout(HELD_BODY_TIMEOUT, read)
        .await
        .map_err(|_| Refusal {
            status: 408,
            error: format!(
                "the request body did not arrive within {}",
                model::human_duration(HELD_BODY_TIMEOUT)
            ),
            rule: None,
            hint: None,
        })??;
    *req.body_mut() = ClientBody::Read(Some(data.clone()), Some(held));
    Ok(data)
}

/// The buffer budget (agent-wide, or this identity's share) is spent.
fn buffers_full(e: crate::protocol::buffers::BuffersFull) -> Refusal {
    Refusal {
        // The agent full: a 503 (others' bodies, gone shortly). This workload's share
        // spent: a 429 (its own doing).
        status: match e {
            crate::protocol::buffers::BuffersFull::Agent(_) => 503,
            crate::protocol::buffers::BuffersFull::Identity(_) => 429,
        },
        error: e.to_string(),
        rule: None,
        hint: Some(
            match e {
                crate::protocol::buffers::BuffersFull::Agent(_) => {
                    "retry in a moment; an operator may raise [daemon] buffer_budget"
                }
                crate::protocol::buffers::BuffersFull::Identity(_) => {
                    "let this workload's other transfers finish, then retry; an operator may raise [daemon] buffer_share"
                }
            }
            .into(),
        ),
    }
}

fn held_too_large() -> Refusal {
    Refusal {
        status: 413,
        error: format!(
            "a request held for approval may carry at most {} KiB (it is read whole, shown to the approver, and exactly it is sent)",
            MAX_HELD_BODY / 1024
        ),
        rule: None,
        hint: Some(
            "send a smaller body, or ask for a grant under which the request is not held".into(),
        ),
    }
}

/// A whole body, refused past `cap` bytes or past the agent's buffer budget (`held` grows
/// with it).
async fn collect_bounded(
    body: &mut Out,
    cap: usize,
    held: &mut crate::protocol::buffers::Reservation,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > cap {
                return Err(format!("larger than the {cap} bytes the gate masks"));
            }
            // The masked copy is about as large again while both exist.
            held.cover(2 * (out.len() + data.len()))
                .map_err(|e| e.to_string())?;
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Whether every media range the client accepts is JSON (then a Secrets response comes back
/// in a form the gate masks, kubectl's Table included).
fn accepts_only_json(headers: &HeaderMap) -> bool {
    let mut any = false;
    for value in headers.get_all(header::ACCEPT) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for range in text.split(',') {
            any = true;
            let media = range.split(';').next().unwrap_or("").trim();
            if !media.eq_ignore_ascii_case("application/json") {
                return false;
            }
        }
    }
    any
}

/// Several `Cookie` fields as the one HTTP/1.1 expects, joined with `; `.
fn join_cookies(headers: &mut HeaderMap) {
    let cookies: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if cookies.len() < 2 {
        return;
    }
    let joined = cookies.join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// `host:port`, `[v6]:port`, `host` or `[v6]` without the port.
fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        // The Host that was judged is not a client's to take away (`Connection: host` would
        // send the upstream a request for its default virtual host).
        .filter(|n| *n != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
    remove_listed(headers, &HOP_BY_HOP);
}

/// Removes the headers of `names` a message has. Most have none: one pass over the few
/// headers it carries then costs less than a hash lookup per listed name.
fn remove_listed(headers: &mut HeaderMap, names: &[HeaderName]) {
    if !headers.keys().any(|k| names.contains(k)) {
        return;
    }
    for name in names {
        headers.remove(name);
    }
}

/// Overwrites the secret wherever a response header carries it.
fn scrub_headers(headers: &mut HeaderMap, secret: &[u8]) {
    for value in headers.values_mut() {
        if scrub::contains(value.as_bytes(), secret) {
            let mut bytes = value.as_bytes().to_vec();
            scrub::mask_all(&mut bytes, secret);
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                *value = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_dropped_in_every_spelling() {
        assert_eq!(host_without_port("api.internal:8443"), "api.internal");
        assert_eq!(host_without_port("api.internal"), "api.internal");
        assert_eq!(host_without_port("[::1]:443"), "::1");
        assert_eq!(host_without_port("[::1]"), "::1");
        assert_eq!(host_without_port("127.0.0.1:80"), "127.0.0.1");
    }

    #[test]
    fn every_listed_header_goes_alone_in_any_case_with_all_its_values() {
        for list in [&HOP_BY_HOP[..], &ROUTING_HEADERS[..]] {
            for name in list {
                let spelled = name.as_str().to_ascii_uppercase();
                let mut h = HeaderMap::new();
                h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
                let parsed = HeaderName::from_bytes(spelled.as_bytes()).expect("a header name");
                h.append(parsed.clone(), HeaderValue::from_static("1"));
                h.append(parsed, HeaderValue::from_static("2"));
                remove_listed(&mut h, list);
                assert!(!h.contains_key(name), "{spelled} was kept");
                assert_eq!(h.len(), 1, "{spelled}: only Accept is left");
            }
        }
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("x-forwarded", HeaderValue::from_static("1"));
        remove_listed(&mut h, &ROUTING_HEADERS);
        assert_eq!(h.len(), 2, "headers not listed stay");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("host"));
        h.insert("host", HeaderValue::from_static("svc"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h["host"], "svc",
            "Connection cannot name the judged Host away"
        );
    }

    #[test]
    fn http2_cookie_fields_become_one() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2"]
        );
    }

    #[test]
    fn response_headers_lose_the_secret() {
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("Bearer tok-1"));
        h.insert("x-other", HeaderValue::from_static("fine"));
        scrub_headers(&mut h, b"tok-1");
        assert_eq!(h["x-echo"], "Bearer *****");
        assert_eq!(h["x-other"], "fine");
    }
}
