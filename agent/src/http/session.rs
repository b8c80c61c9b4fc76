//! One HTTP session, from the client's first byte to how it ended:
//!
//! 1. TLS or plaintext, told by the first byte (a TLS handshake starts with 0x16); TLS is
//!    terminated with a certificate the host-local CA signs for the name the client asked for;
//! 2. the grant (found, or asked for and waited on); without one, every request is answered
//!    with a 403 naming the command to run;
//! 3. requests, over HTTP/1.1 (one at a time, as it orders them) or HTTP/2 (concurrent
//!    streams, chosen by ALPN or the plaintext preface; see [`super::serve`]): the `Host` checked, the path
//!    normalised, the rules applied (allow, deny, or hold for a human), the client's own
//!    credential headers replaced by the gate's, and the response scrubbed of that secret;
//!    each one recorded;
//! 4. the end: the client or upstream closes, or the grant ends, which cuts the connection
//!    (also in the middle of a streamed response).

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt as _;
use tokio_util::{either::Either, sync::CancellationToken};
use tracing::{debug, warn};

use super::{
    Http,
    config::{ClientTls, Flavor, HttpResource, UpstreamTls},
    exchange::Ctx,
    io::{ClientIo, Rewind},
    jsonmask::BodyMasker,
    limits::{HttpLimits, Reporter},
    refuse::{Refusal, Wording, refusal_response, request_hint},
    serve::{H2_PREFACE, Wire, serve as serve_wire},
    upstream::{Dial, Upstream},
};
use crate::{
    config::Target,
    model::SessionOutcome,
    protocol::{Conn, Outcome, Services, Session, refuse, statements::Statements},
};

/// How long a session cut while a request waited for approval may take to lapse it.
const LAPSE_GRACE: Duration = Duration::from_secs(2);

pub async fn serve(
    http: &Http,
    mut session: Session<'_>,
    settings: &HttpResource,
    mut client: Conn,
) -> Outcome {
    client.set_nodelay();
    // 1. TLS or plaintext.
    let mut first = [0u8; 1];
    let n = match tokio::time::timeout_at(session.startup_deadline, client.read(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return refuse(SessionOutcome::Error, format!("reading the request: {e}")),
        Err(_) => {
            return refuse(
                SessionOutcome::RefusedLimit,
                "no request within startup_timeout",
            );
        }
    };
    if n == 0 {
        return refuse(SessionOutcome::Closed, "closed before a request");
    }
    let tls = first[0] == 0x16;
    let mut head = first.to_vec();
    if !tls {
        // A plaintext HTTP/2 client (prior knowledge) starts with the preface; read while
        // what came can still be one (an HTTP/1.1 request line parts from it at once).
        while head.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&head) {
            let mut more = [0u8; 24];
            let want = H2_PREFACE.len() - head.len();
            match tokio::time::timeout_at(session.startup_deadline, client.read(&mut more[..want]))
                .await
            {
                Ok(Ok(0)) => return refuse(SessionOutcome::Closed, "closed before a request"),
                Ok(Ok(n)) => head.extend_from_slice(&more[..n]),
                Ok(Err(e)) => {
                    return refuse(SessionOutcome::Error, format!("reading the request: {e}"));
                }
                Err(_) => {
                    return refuse(
                        SessionOutcome::RefusedLimit,
                        "no request within startup_timeout",
                    );
                }
            }
        }
    }
    let plain_wire = if head == H2_PREFACE {
        Wire::Http2
    } else {
        Wire::Http1
    };
    let cutter = client.cutter();
    let rewound = Rewind::new(head, client);
    let (io, sni, wire): (ClientIo, Option<String>, Wire) = match (tls, settings.client_tls) {
        (true, ClientTls::Disable) => {
            return refuse(
                SessionOutcome::Error,
                "the client started TLS, but this resource takes plain http (client_tls = \"disable\")",
            );
        }
        (false, ClientTls::Require) => {
            let refusal = Refusal {
                status: 403,
                error: format!(
                    "{} takes https only (client_tls = \"require\")",
                    session.resource.name
                ),
                rule: None,
                hint: Some("use an https:// URL".into()),
            };
            answer_refusal(Either::Left(rewound), plain_wire, settings.flavor, &refusal).await;
            return refuse(SessionOutcome::Error, refusal.error);
        }
        // The handshake is part of the startup: a client that stalls in it is cut at the
        // same deadline as one that sends nothing.
        (true, _) => match tokio::time::timeout_at(
            session.startup_deadline,
            accept_tls(session.services, session.destination.ip(), rewound),
        )
        .await
        {
            Ok(Ok(ok)) => ok,
            Ok(Err(e)) => return refuse(SessionOutcome::Error, e),
            Err(_) => {
                return refuse(
                    SessionOutcome::RefusedLimit,
                    "the TLS handshake did not finish within startup_timeout",
                );
            }
        },
        (false, _) => (Either::Left(rewound), None, plain_wire),
    };
    session.record.session.destination = match &sni {
        Some(name) => format!("{name} ({}, {})", session.destination, wire.name()),
        None => format!("{} ({})", session.destination, wire.name()),
    };

    // 2. The grant.
    let grant = match session.acquire_grant().await {
        Ok(g) => g,
        Err(refused) => {
            let status = if refused.limit.is_some() { 429 } else { 403 };
            let refusal = Refusal {
                status,
                error: refused.outcome.1.clone(),
                rule: None,
                hint: Some(request_hint(
                    &session.resource.name,
                    session.resource.connect_access,
                )),
            };
            answer_refusal(io, wire, settings.flavor, &refusal).await;
            return refused.outcome;
        }
    };

    // 3. Requests.
    let upstream_tls = match settings.upstream_tls {
        UpstreamTls::Auto => tls,
        UpstreamTls::VerifyFull => true,
        UpstreamTls::Disable => false,
    };
    let dial = match dial(http, settings, &session, upstream_tls) {
        Ok(d) => d,
        Err(e) => return refuse(SessionOutcome::UpstreamFailed, e),
    };
    session.record.session.access = Some(grant.access);
    let mut end = session.open(&grant);
    debug!(identity = %session.who.identity, resource = %session.resource.name, grant = %grant.id, tls, wire = wire.name(), "serving http");
    let stop = CancellationToken::new();
    let masker = BodyMasker::new(
        &settings.masks,
        settings.mask_exempt_access,
        &session.who.identity,
        grant.access,
        session.services.mask_key,
    )
    .map(Arc::new);
    let limits = HttpLimits::new(
        session.services.config.get().grant_limits(
            &session.who.identity,
            &session.resource.name,
            grant.access,
        ),
        Reporter::new(
            session.services.store.clone(),
            session.record.session.id.clone(),
            session.who.identity.clone(),
            session.resource.name.clone(),
            grant.id.clone(),
        ),
    );
    // Declared before the connection, so dropped after it: the records of exchanges the
    // connection drops on its way out are in the last batch.
    let (statements, _flushed) = Statements::start(session.services.store.clone());
    let ctx = Arc::new(Ctx {
        services: session.services,
        session_id: session.record.session.id.clone(),
        who: session.who,
        uid: session.uid,
        resource: &session.resource.name,
        settings,
        grant,
        upstream: Upstream::new(
            dial,
            Some(super::upstream::ExtraSlots {
                limits: session.services.limits.clone(),
                identity: session.who.identity.clone(),
                max: session
                    .services
                    .config
                    .get()
                    .daemon
                    .limits
                    .max_extra_upstreams_per_identity,
            }),
        ),
        counters: session.record.counters.clone(),
        statements,
        seq: AtomicU32::new(0),
        holding: AtomicU32::new(0),
        upgraded: std::sync::Mutex::default(),
        tunnels: Arc::default(),
        masker,
        stop: stop.clone(),
        limits,
        masked_held: Arc::new(tokio::sync::Semaphore::new(
            super::exchange::MAX_MASKED_HELD,
        )),
    });
    let handler = ctx.clone();
    let mut conn = serve_wire(
        io,
        wire,
        move |req| {
            let ctx = handler.clone();
            async move { ctx.handle(req).await }
        },
        true,
    );
    let outcome = tokio::select! {
        r = conn.as_mut() => match r {
            Ok(()) => None,
            Err(e) if e.is_incomplete_message() || e.is_canceled() => None,
            Err(e) if e.is_timeout() => return (SessionOutcome::Closed, match wire {
                Wire::Http1 => "the client sent no request within 30s".into(),
                Wire::Http2 => "the client stopped answering HTTP/2 pings".into(),
            }),
            Err(e) => return (SessionOutcome::Error, format!("http: {e}")),
        },
        // Polled only when an end signal fires, not at every wake-up of the connection.
        why = crate::protocol::armed::Armed::new(end.ended()) => Some(why.outcome()),
    };
    let relays: Vec<_> = std::mem::take(
        &mut *ctx
            .upgraded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let outcome = match outcome {
        Some(outcome) => outcome,
        // The HTTP exchange is over; an upgraded stream may go on until it ends or the
        // session must.
        None if relays.is_empty() => return (SessionOutcome::Closed, String::new()),
        None => {
            let aborts: Vec<_> = relays.iter().map(|r| r.abort_handle()).collect();
            tokio::select! {
                () = async { for r in relays { let _ = r.await; } } => return (SessionOutcome::Closed, String::new()),
                why = end.ended() => {
                    if let Err(e) = cutter.arm_reset() {
                        warn!(error = %e, "could not arm reset on close");
                    }
                    for a in aborts {
                        a.abort();
                    }
                    return why.outcome();
                }
            }
        }
    };
    // 4. Cut. Over HTTP/1.1 a request waiting for approval (the only one in flight) lapses
    // its request and answers the client first, so approving it later runs nothing. Over
    // HTTP/2 other streams would flow meanwhile: the cut is immediate, and a held stream
    // lapses its request as it is dropped.
    stop.cancel();
    if wire == Wire::Http1
        && ctx.holding.load(Ordering::SeqCst) > 0
        && tokio::time::timeout(LAPSE_GRACE, conn.as_mut())
            .await
            .is_ok()
    {
        // The connection finished on its own: its socket is gone.
        for r in relays {
            r.abort();
        }
        return outcome;
    }
    if let Err(e) = cutter.arm_reset() {
        warn!(error = %e, "could not arm reset on close");
    }
    for r in relays {
        r.abort();
    }
    outcome
}

/// Terminates the client's TLS with a certificate for the name it asked for, offering HTTP/2
/// and HTTP/1.1 (the client's choice decides the wire).
async fn accept_tls(
    services: &Services,
    ip: IpAddr,
    io: Rewind<Conn>,
) -> Result<(ClientIo, Option<String>, Wire), String> {
    let Some(ca) = &services.ca else {
        return Err("the client started TLS, but the host-local CA is not available".into());
    };
    let config = ca
        .server_config(ip)
        .map_err(|e| format!("client TLS: {e}"))?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let accepted = tokio_rustls::TlsAcceptor::from(Arc::new(config))
        .accept(io)
        .await
        .map_err(|e| {
            format!(
                "client TLS handshake: {e} (a client that pins certificates or does not trust the host CA refuses the gate's certificate)"
            )
        })?;
    let sni = accepted.get_ref().1.server_name().map(str::to_owned);
    let wire = if accepted.get_ref().1.alpn_protocol() == Some(b"h2") {
        Wire::Http2
    } else {
        Wire::Http1
    };
    Ok((Either::Right(Box::new(accepted)), sni, wire))
}

/// Where and how the upstream is reached.
fn dial(
    http: &Http,
    settings: &HttpResource,
    session: &Session<'_>,
    tls: bool,
) -> Result<Dial, String> {
    let addr = session.upstream;
    if !tls {
        return Ok(Dial { addr, tls: None });
    }
    // Never the name the client sent (SNI): the workload does not choose what is verified.
    let name = settings
        .upstream_server_name
        .clone()
        .or_else(|| match &session.resource.target {
            Target::Host { name, .. } => Some(name.clone()),
            Target::Net { .. } => None,
        });
    let server_name = match name {
        Some(n) => {
            ServerName::try_from(n.clone()).map_err(|e| format!("upstream server name {n}: {e}"))?
        }
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let config = http.upstream_config(&settings.upstream_ca)?;
    Ok(Dial {
        addr,
        tls: Some((config, server_name)),
    })
}

/// Answers the client's request with a refusal, then closes: HTTP/1.1 after that answer,
/// HTTP/2 when the client leaves (each of its streams refused), within 10 s either way.
async fn answer_refusal(io: ClientIo, wire: Wire, flavor: Flavor, refusal: &Refusal) {
    let conn = serve_wire(
        io,
        wire,
        move |req| {
            let wording = Wording::for_request(flavor, req.method(), req.uri());
            let response = refusal_response(wording, refusal);
            async move { response }
        },
        false,
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
}
