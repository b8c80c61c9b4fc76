//! Protocol upgrades: WebSocket (browsers, API clients, `kubectl exec`, `attach` and
//! `port-forward` since 1.30) and SPDY/3.1 (older kubectl). The upgrade request is judged like
//! any other (a held `exec` waits for its approver before the upgrade happens); once the
//! upstream answers 101, the two upgraded connections are relayed byte for byte, counted, and
//! scrubbed of the injected credential on the way back, until either side closes or the
//! session ends.
//!
//! Over HTTP/2 a WebSocket is an extended CONNECT (RFC 8441: `:method CONNECT`,
//! `:protocol websocket`), answered 200. The gate offers it (SETTINGS_ENABLE_CONNECT_PROTOCOL)
//! and turns it into the HTTP/1.1 upgrade its upstream speaks ([`from_extended_connect`]):
//! from there it is judged, forwarded and relayed exactly as an HTTP/1.1 WebSocket, and only
//! the answer to the client is shaped back ([`ExtendedConnect`]).
//!
//! Why not parse WebSocket frames: the gate needs no message-level policy there yet, and the
//! scrubber works on the raw stream because server frames are not masked and compression is
//! not negotiated while a credential is in play (`Sec-WebSocket-Extensions` is removed).

use std::io;

use hyper::{
    HeaderMap,
    header::{self, HeaderValue},
    upgrade::Upgraded,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{
    cast::{self, Frames, SharedCast},
    scrub::Scrubber,
};
use crate::protocol::relay::Counters;

/// Marks a request that came as an HTTP/2 extended CONNECT for a WebSocket: its answer is a
/// 200 without upgrade headers, not a 101.
#[derive(Clone, Copy, Debug)]
pub struct ExtendedConnect;

/// An HTTP/2 WebSocket (`CONNECT` with `:protocol websocket`) rewritten as the HTTP/1.1
/// upgrade request the upstream understands (`GET`, `Upgrade: websocket`, a fresh
/// `Sec-WebSocket-Key`, which RFC 8441 drops), so that it is judged as one: the same method,
/// level and rules. `true` if the request was one. Any other `:protocol` is left a CONNECT
/// (refused).
pub fn from_extended_connect<B>(req: &mut hyper::Request<B>) -> bool {
    let is_websocket = req.method() == hyper::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !is_websocket {
        return false;
    }
    *req.method_mut() = hyper::Method::GET;
    let headers = req.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let mut nonce = [0u8; 16];
    // Without randomness the key is fixed: it only proves the upstream speaks WebSocket.
    let _ = getrandom::fill(&mut nonce);
    if let Ok(key) = HeaderValue::from_str(&data_encoding::BASE64.encode(&nonce)) {
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
    req.extensions_mut().insert(ExtendedConnect);
    true
}

/// The upgrade a request asks for, when it is one the gate relays (`websocket`, `SPDY/3.1`);
/// `Err` names what was asked for otherwise.
pub fn requested(headers: &HeaderMap) -> Option<Result<HeaderValue, String>> {
    let upgrade = headers.get(header::UPGRADE)?;
    let token = upgrade.to_str().unwrap_or("").trim();
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_says_upgrade {
        // Not an upgrade request (RFC 9110 7.8): the header is dropped as hop-by-hop.
        return None;
    }
    if token.eq_ignore_ascii_case("websocket") || token.eq_ignore_ascii_case("SPDY/3.1") {
        Some(Ok(upgrade.clone()))
    } else {
        Some(Err(token.to_owned()))
    }
}

/// Relays two upgraded connections until both directions end; the workload's bytes are
/// counted up, the upstream's counted and scrubbed down.
pub async fn relay(
    client: Upgraded,
    upstream: Upgraded,
    counters: std::sync::Arc<Counters>,
    scrubber: Option<Scrubber>,
    recording: Option<SharedCast>,
) -> io::Result<()> {
    let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
    let (mut upstream_read, mut upstream_write) = tokio::io::split(TokioIo::new(upstream));
    let up = pump(
        &mut client_read,
        &mut upstream_write,
        &counters.up,
        None,
        recording.clone().map(|c| (c, true)),
    );
    let down = pump(
        &mut upstream_read,
        &mut client_write,
        &counters.down,
        scrubber,
        recording.map(|c| (c, false)),
    );
    // The first to fail ends both (a recording that ended closes the stream both ways).
    tokio::try_join!(up, down).map(|_| ())
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &std::sync::atomic::AtomicU64,
    mut scrubber: Option<Scrubber>,
    recording: Option<(SharedCast, bool)>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut frames = Frames::default();
    let mut forward = |bytes: &[u8]| -> io::Result<()> {
        // What is recorded is what the other side receives (scrubbed); nothing passes that
        // cannot be.
        if let Some((cast, from_client)) = &recording {
            cast::record(cast, *from_client, frames.push(bytes)).map_err(io::Error::other)?;
        }
        Ok(())
    };
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            if let Some(s) = scrubber.as_mut() {
                let tail = s.finish();
                forward(&tail)?;
                to.write_all(&tail).await?;
            }
            to.flush().await?;
            return to.shutdown().await;
        }
        counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        match scrubber.as_mut() {
            None => {
                forward(&buf[..n])?;
                to.write_all(&buf[..n]).await?;
            }
            Some(s) => {
                let out = s.push(&buf[..n]);
                forward(&out)?;
                to.write_all(&out).await?;
            }
        }
        to.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_websocket_and_spdy_upgrades_with_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(
            requested(&h).is_none(),
            "no Connection: upgrade, no upgrade"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(matches!(requested(&h), Some(Ok(_))));
        h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        assert!(matches!(requested(&h), Some(Ok(_))));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(requested(&h), Some(Err("h2c".into())));
    }
}
