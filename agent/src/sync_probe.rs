//! Reachability probes while a loop backs off: the sync endpoints (TLS handshake) and OPC UA
//! servers (TCP connect, [`tcp_connect`]).
//!
//! The sync backoff grows toward `sync.backoff_max_ms` (60 s by default) while the control
//! plane cannot be reached, so without probes the first batch after an outage could wait up to
//! a whole backoff. While it waits, the loop probes every endpoint every
//! `sync.probe_interval_ms` (with jitter) with a TCP connect plus TLS handshake, each bounded by
//! the same interval, and ends the wait when an endpoint it saw unreachable during this wait
//! completes a handshake: the network (or the replica) is back.
//!
//! Invariants:
//! - Only a *transition* ends a wait early (unreachable, then reachable). An endpoint that
//!   answers the first probe of a wait failed for another reason (a 5xx, a refused batch, a
//!   slow database behind it); it is not probed again during that wait and the full backoff
//!   applies, so a reachable but failing control plane is not hammered at the probe rate.
//! - A probe sends no HTTP request and no data: it completes the handshake and closes.
//! - At most one probe per endpoint is in flight; probes stop when the wait ends.

use std::{sync::Arc, time::Duration};

use kip_certs::rustls;
use tokio::time::Instant;

/// How a backoff wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The whole backoff passed.
    Elapsed,
    /// Endpoint `i` was unreachable during the wait and is reachable again.
    Reachable(usize),
}

/// `true` when a TCP connection and a TLS handshake with `endpoint` (an `https://` base URL)
/// complete within `timeout`.
pub(crate) async fn handshake(
    endpoint: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> bool {
    let Ok(url) = reqwest::Url::parse(endpoint) else {
        return false;
    };
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    // An IPv6 literal comes bracketed in URLs; the server name and the socket want it bare.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.clone()) else {
        return false;
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let mut tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        // Closing politely; its failure says nothing about reachability.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        Ok::<_, std::io::Error>(())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(())))
}

/// `true` when a TCP connection to `host:port` opens within `timeout` (closed at once).
pub(crate) async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// Waits `pause`, probing `endpoints` every `interval` (jittered to 50-100 %); see the module
/// docs for when it returns early.
pub(crate) async fn wait(
    pause: Duration,
    endpoints: &[String],
    tls: Arc<rustls::ClientConfig>,
    interval: Duration,
) -> WaitEnd {
    wait_with(pause, endpoints.len(), interval, |i, timeout| {
        let tls = tls.clone();
        let endpoint = endpoints.get(i).cloned().unwrap_or_default();
        async move { handshake(&endpoint, tls, timeout).await }
    })
    .await
}

/// [`wait`] for `n` targets probed by `probe(i, timeout)`.
pub(crate) async fn wait_with<F, Fut>(
    pause: Duration,
    n: usize,
    interval: Duration,
    probe: F,
) -> WaitEnd
where
    F: Fn(usize, Duration) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + pause;
    // Per target: seen unreachable during this wait; still worth probing.
    let mut seen_down = vec![false; n];
    let mut probing = vec![true; n];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return WaitEnd::Elapsed;
        }
        if !probing.contains(&true) {
            tokio::time::sleep_until(deadline).await;
            return WaitEnd::Elapsed;
        }
        let timeout = interval.min(deadline - now);
        let probes = probing.iter().enumerate().map(|(i, &p)| {
            let probe = p.then(|| probe(i, timeout));
            async move {
                match probe {
                    Some(f) => f.await,
                    None => false,
                }
            }
        });
        let reachable = futures_util::future::join_all(probes).await;
        for (i, up) in reachable.into_iter().enumerate() {
            if !probing[i] {
                continue;
            }
            match (up, seen_down[i]) {
                (true, true) => return WaitEnd::Reachable(i),
                (true, false) => probing[i] = false,
                (false, _) => seen_down[i] = true,
            }
        }
        let pace = interval.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        tokio::time::sleep_until((Instant::now() + pace).min(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn client_config() -> Arc<rustls::ClientConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    #[tokio::test]
    async fn an_endpoint_that_stays_unreachable_waits_the_whole_pause() {
        // A port nobody listens on: every probe fails, so the wait is the backoff.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let started = Instant::now();
        let end = wait(
            Duration::from_millis(300),
            &[format!("https://127.0.0.1:{port}")],
            client_config(),
            Duration::from_millis(20),
        )
        .await;
        assert_eq!(end, WaitEnd::Elapsed);
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_malformed_endpoint_is_never_reachable() {
        assert!(!handshake("not a url", client_config(), Duration::from_millis(50)).await);
    }
}
