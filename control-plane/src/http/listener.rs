//! The admin API's connection handling: the accept loop that axum's `serve` would run, plus
//! what it lacks against slow or greedy clients.
//!
//! Invariants:
//! - A client must send a complete request header within `server.header_read_timeout_ms`
//!   (slowloris); a connection on which no byte moves either way for
//!   `server.idle_timeout_ms` is closed, whatever state it is in. The idle timeout is longer
//!   than the request timeout (checked at load), so a request the server is still working on
//!   is answered 504 before its connection could be called idle.
//! - One client address holds at most `server.max_connections_per_ip` connections; further
//!   ones are closed as soon as they are accepted, before any byte is read.
//! - Request heads that hyper would refuse with a bare status (431 for large headers, 414
//!   for long URIs) are refused earlier, by [`head_limits`], with the JSON error body, as long
//!   as they fit hyper's buffer ([`MAX_BUF_BYTES`]); only heads larger than that still get
//!   hyper's empty answer.
//! - Shutdown: when the token is cancelled the loop stops accepting and every connection is
//!   shut down gracefully (in-flight requests finish); connection tasks run on the caller's
//!   [`TaskTracker`].

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{ConnectInfo, Request},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;

/// Connection limits of the admin listener (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// `server.header_read_timeout_ms`.
    pub header_read_timeout: Duration,
    /// `server.idle_timeout_ms`.
    pub idle_timeout: Duration,
    /// `server.max_connections_per_ip`.
    pub max_connections_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections_per_ip: 256,
        }
    }
}

/// hyper's read buffer per connection: a request head larger than this gets hyper's bare
/// 431. Everything below is checked by [`head_limits`].
pub const MAX_BUF_BYTES: usize = 256 * 1024;
/// Longest request target (path and query) answered normally; longer ones get a JSON 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest sum of header names and values; larger gets a JSON 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most headers in one request; more gets a JSON 431.
pub const MAX_HEADERS: usize = 100;
/// What hyper itself parses, above [`MAX_HEADERS`] so the JSON answer comes first.
const HYPER_MAX_HEADERS: usize = 1024;

/// Answers over-long targets (414) and oversized header sets (431) with the JSON error body.
pub async fn head_limits(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return json_error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("request target longer than {MAX_URI_BYTES} bytes"),
        );
    }
    let headers = req.headers();
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || size > MAX_HEADER_BYTES {
        return json_error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("at most {MAX_HEADERS} headers of {MAX_HEADER_BYTES} bytes in total"),
        );
    }
    next.run(req).await
}

fn json_error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

/// Open connections per client address.
#[derive(Debug, Default)]
struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counters only; a panicking holder cannot leave them half-updated.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = self.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ip,
            owner: self.clone(),
        })
    }
}

/// One connection's place in [`PerIp`]; released on drop.
#[derive(Debug)]
struct IpSlot {
    ip: IpAddr,
    owner: Arc<PerIp>,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.owner.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// An I/O stream that records when a byte last moved (ms since `epoch`).
struct Tracked<T> {
    inner: T,
    epoch: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Tracked<T> {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` with `limits` until `token` is cancelled (see the module
/// invariants). The accept loop and every connection run on `tracker`.
pub fn spawn_serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnLimits,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    let per_ip = Arc::new(PerIp::default());
    let conns = tracker.clone();
    tracker.spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = token.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "admin listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = per_ip.try_acquire(peer.ip(), limits.max_connections_per_ip) else {
                tracing::debug!(%peer, "admin listener: per-address connection cap reached");
                drop(tcp);
                continue;
            };
            // Small JSON answers must leave at once: without TCP_NODELAY, Nagle's algorithm
            // can hold a response segment until the client's delayed ACK (up to 40 ms).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            conns.spawn(serve_connection(
                tcp,
                peer,
                router.clone(),
                limits,
                token.clone(),
                slot,
            ));
        }
    });
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    token: CancellationToken,
    slot: IpSlot,
) {
    let _slot = slot;
    let last = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let io = TokioIo::new(Tracked {
        inner: tcp,
        epoch,
        last: last.clone(),
    });
    let svc = router.map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF_BYTES)
        .max_headers(HYPER_MAX_HEADERS);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(svc));
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let idle_for = Duration::from_millis(
            u64::try_from(epoch.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .saturating_sub(last.load(Ordering::Relaxed)),
        );
        let Some(left) = limits
            .idle_timeout
            .checked_sub(idle_for)
            .filter(|d| !d.is_zero())
        else {
            tracing::debug!(%peer, "admin listener: closing idle connection");
            break;
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                }
                break;
            }
            () = token.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(left) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_per_address_cap_counts_and_releases() {
        let p = Arc::new(PerIp::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = p.try_acquire(ip, 2).unwrap();
        let _b = p.try_acquire(ip, 2).unwrap();
        assert!(p.try_acquire(ip, 2).is_none());
        assert!(p.try_acquire([10, 0, 0, 2].into(), 2).is_some());
        drop(a);
        assert!(p.try_acquire(ip, 2).is_some());
    }
}
