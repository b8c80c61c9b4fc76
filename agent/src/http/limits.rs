//! `[policy.limits]` on HTTP: each request counts as a statement (`statements_per_second` per
//! grant, `identity_statements_per_second` per identity, in buckets shared with every other
//! protocol's statements), each response body as a result (`bytes_per_statement` per
//! response, `bytes_per_session` over the connection). Row limits do not apply to HTTP.
//!
//! A request over a rate is answered 429 with `Retry-After`, and the connection stays open; a
//! response announced larger than the per-request limit is refused before a byte of it is
//! sent; a streamed one is cut where it passes a limit (HTTP/1.1: the connection closes
//! mid-body; HTTP/2: the stream is reset). Once the session's byte budget is spent, each
//! further request is refused. Each limit reached is logged and audited once per session.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tracing::warn;

use super::{
    body::{BoxError, Out},
    refuse::Refusal,
};
use crate::{config::GrantLimits, protocol::rate::Rates, store::SharedStore};

/// Who a session's limits are reported for.
#[derive(Clone)]
pub struct Reporter {
    pub store: SharedStore,
    pub session: String,
    pub identity: String,
    pub resource: String,
    pub grant: String,
    /// Limits already reported in this session.
    reported: Arc<Mutex<Vec<&'static str>>>,
}

impl Reporter {
    pub fn new(
        store: SharedStore,
        session: String,
        identity: String,
        resource: String,
        grant: String,
    ) -> Self {
        Self {
            store,
            session,
            identity,
            resource,
            grant,
            reported: Arc::default(),
        }
    }

    /// Logs and audits `key` reached, once per session (a client retrying in a loop writes
    /// one record, not one per attempt).
    pub fn reached(&self, key: &'static str, value: u64) {
        {
            let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
            if reported.contains(&key) {
                return;
            }
            reported.push(key);
        }
        warn!(
            identity = %self.identity,
            resource = %self.resource,
            session = %self.session,
            limit = key,
            value,
            "blast-radius limit reached"
        );
        self.store.submit_audit(
            "jitgated".into(),
            crate::store::audit::Event::LimitReached(crate::store::audit::LimitReached {
                session: self.session.clone(),
                identity: self.identity.clone(),
                resource: self.resource.clone(),
                grant: self.grant.clone(),
                limit: key.to_owned(),
                value,
            }),
        );
    }
}

/// One session's limits and what it has used of them.
pub struct HttpLimits {
    limits: GrantLimits,
    /// Response body bytes sent to the client in this session.
    session_bytes: Arc<AtomicU64>,
    reporter: Reporter,
}

impl HttpLimits {
    pub fn new(limits: GrantLimits, reporter: Reporter) -> Self {
        Self {
            limits,
            session_bytes: Arc::default(),
            reporter,
        }
    }

    fn refusal(&self, status: u16, key: &'static str, limit: u64, error: String) -> Refusal {
        self.reporter.reached(key, limit);
        Refusal {
            status,
            error,
            rule: Some(format!("limit: {key}")),
            hint: Some(match status {
                429 => {
                    format!("slow down and retry; the connection stays open (policy.limits.{key})")
                }
                _ => format!("ask for less, or an operator may raise policy.limits.{key}"),
            }),
        }
    }

    /// Whether a request may go now: the session's byte budget is not spent, and neither the
    /// grant nor its identity is over its requests per second.
    pub fn admit(&self, rates: &Rates) -> Result<(), Refusal> {
        if let Some(limit) = self.limits.bytes_per_session
            && self.session_bytes.load(Ordering::Relaxed) >= limit
        {
            return Err(self.refusal(
                403,
                "bytes_per_session",
                limit,
                format!(
                    "this connection has received the {limit} response bytes its grant allows on {}",
                    self.reporter.resource
                ),
            ));
        }
        let r = &self.reporter;
        // Each bucket's key is built only when its limit is set (most grants set neither).
        for (key, limit, kind, id, whose) in [
            (
                "statements_per_second",
                self.limits.statements_per_second,
                "grant:",
                r.grant.as_str(),
                "this grant",
            ),
            (
                "identity_statements_per_second",
                self.limits.identity_statements_per_second,
                "identity:",
                r.identity.as_str(),
                "this identity",
            ),
        ] {
            if let Some(limit) = limit
                && !rates.take(&format!("{kind}{id}"), limit)
            {
                return Err(self.refusal(
                    429,
                    key,
                    u64::from(limit),
                    format!(
                        "request rate limit reached on {}: {whose} may send {limit} requests per second; this one was not sent",
                        r.resource
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A response whose announced length already passes the per-request limit is refused
    /// before any of it is sent.
    pub fn check_length(&self, length: Option<u64>) -> Result<(), Refusal> {
        match (self.limits.bytes_per_statement, length) {
            (Some(limit), Some(len)) if len > limit => Err(self.refusal(
                502,
                "bytes_per_statement",
                limit,
                format!(
                    "the response is {len} bytes; the grant allows {limit} per request on {}",
                    self.reporter.resource
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The body, counted against the byte limits and cut where it passes one.
    pub fn cap(&self, body: Out) -> Out {
        if self.limits.bytes_per_statement.is_none() && self.limits.bytes_per_session.is_none() {
            return body;
        }
        http_body_util::BodyExt::boxed_unsync(Capped {
            inner: body,
            sent: 0,
            per_request: self.limits.bytes_per_statement,
            session: self.session_bytes.clone(),
            per_session: self.limits.bytes_per_session,
            reporter: self.reporter.clone(),
        })
    }
}

/// A response body counted against the byte limits.
struct Capped {
    inner: Out,
    sent: u64,
    per_request: Option<u64>,
    session: Arc<AtomicU64>,
    per_session: Option<u64>,
    reporter: Reporter,
}

impl Body for Capped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            this.sent += n;
            let total = this.session.fetch_add(n, Ordering::Relaxed) + n;
            let passed = match (this.per_request, this.per_session) {
                (Some(l), _) if this.sent > l => Some(("bytes_per_statement", l)),
                (_, Some(l)) if total > l => Some(("bytes_per_session", l)),
                _ => None,
            };
            if let Some((key, limit)) = passed {
                this.reporter.reached(key, limit);
                return Poll::Ready(Some(Err(format!(
                    "the response passed policy.limits.{key} ({limit} bytes) and was cut"
                )
                .into())));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    fn limits(per_request: Option<u64>, per_session: Option<u64>) -> HttpLimits {
        HttpLimits::new(
            GrantLimits {
                bytes_per_statement: per_request,
                bytes_per_session: per_session,
                ..GrantLimits::default()
            },
            Reporter::new(
                Arc::new(crate::store::memory::MemoryStore::default()),
                "s-1".into(),
                "bot".into(),
                "api".into(),
                "g-1".into(),
            ),
        )
    }

    fn chunks(parts: &[&'static str]) -> Out {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    /// What came through before the body ended, and whether it ended in an error.
    async fn drain(mut body: Out) -> (String, Option<String>) {
        let mut out = String::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => out.push_str(&String::from_utf8_lossy(f.data_ref().unwrap())),
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn a_streamed_response_is_cut_where_it_passes_a_limit() {
        let l = limits(Some(10), None);
        let (got, err) = drain(l.cap(chunks(&["12345", "67890", "X"]))).await;
        assert_eq!(got, "1234567890");
        assert!(err.unwrap().contains("bytes_per_statement"));
        // Each response has its own count.
        let (got, err) = drain(l.cap(chunks(&["abc"]))).await;
        assert_eq!((got.as_str(), err), ("abc", None));
        assert!(l.check_length(Some(11)).is_err());
        assert!(l.check_length(Some(10)).is_ok());
    }

    #[tokio::test]
    async fn the_session_budget_spans_responses_then_refuses_requests() {
        let l = limits(None, Some(8));
        let rates = Rates::default();
        assert!(l.admit(&rates).is_ok());
        let (got, err) = drain(l.cap(chunks(&["12345"]))).await;
        assert_eq!((got.as_str(), err), ("12345", None));
        let (got, err) = drain(l.cap(chunks(&["678", "9"]))).await;
        assert_eq!(got, "678");
        assert!(err.unwrap().contains("bytes_per_session"));
        let refused = l.admit(&rates).unwrap_err();
        assert_eq!(refused.rule.as_deref(), Some("limit: bytes_per_session"));
    }
}
