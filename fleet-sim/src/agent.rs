//! One simulated agent: its own mTLS connection to the agent listener (TCP + rustls handshake
//! with its client certificate, then HTTP/1.1 keep-alive, as `kip-agent`'s client keeps one
//! connection), sync batches of synthetic readings and heartbeats at the configured rates.
//!
//! Invariants:
//! - A batch is resent unchanged (same epoch and sequence numbers) until it is acknowledged,
//!   as a real agent does, so the control plane sees replays and never a gap; the counters
//!   add a batch's readings only once, when its ack covers it.
//! - A request is never abandoned on shutdown: cancellation is only looked at between
//!   requests, so every batch the control plane stored is also counted (except one whose
//!   answer timed out, which is counted as an error of kind `timeout`).
//! - A `503` or `429` with `Retry-After` (a control plane shedding load, issue #17) holds this
//!   agent's next request (sync or heartbeat) back for that long, capped at
//!   `retry_after_cap` (the agent's `sync.backoff_max_ms` default, 60 s), as `kip-agent`
//!   does; a `503` with code `overloaded` counts as error kind `shed_503`, any other `503` as
//!   `status_503`.
//! - At most `max_in_flight` requests of the whole fleet are outstanding (one semaphore).
//!   An agent waiting for that budget stops when the run ends ([`permit`]): with 10,000
//!   agents against a saturated control plane thousands wait there, and each used to send one
//!   more request after the end, so the run's end waited for all of them (minutes).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kip_shared::{
    Reading, Record, Sequenced,
    health::HealthReport,
    sync::{SyncAck, SyncBatch, TRUST_BUNDLE_HEADER},
};
use rand::Rng as _;
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    enroll::AgentIdentity,
    stats::{Kind, Stats},
};

/// What every agent does, from the command line.
#[derive(Debug, Clone)]
pub struct Plan {
    pub agent_addr: SocketAddr,
    pub server_name: ServerName<'static>,
    pub sync_interval: Duration,
    pub heartbeat_interval: Duration,
    pub readings_min: u32,
    pub readings_max: u32,
    pub series: u32,
    pub request_timeout: Duration,
    /// Close the connection after every request (every request pays a handshake).
    pub new_connection_per_request: bool,
    /// The epoch of this run: new sequence numbers every run, so a second run stores new rows.
    pub epoch: u64,
    /// Longest wait a `Retry-After` imposes; `None`: `Retry-After` is ignored (the old
    /// generator, as a reference).
    pub retry_after_cap: Option<Duration>,
}

pub struct Agent {
    id: AgentIdentity,
    plan: Arc<Plan>,
    stats: Arc<Stats>,
    in_flight: Arc<Semaphore>,
    tracker: TaskTracker,
    conn: Option<SendRequest<Full<Bytes>>>,
    next_seq: u64,
    /// The batch sent and not acknowledged yet (resent as is).
    pending: Option<(SyncBatch, u64)>,
    /// No request before this (the control plane's `Retry-After`).
    not_before: Option<tokio::time::Instant>,
}

/// A permit of the fleet's in-flight budget, or `None` once `cancel` fired (checked first).
async fn permit(
    in_flight: &Arc<Semaphore>,
    cancel: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        p = in_flight.clone().acquire_owned() => p.ok(),
    }
}

/// Why a request failed, by kind (the summary counts them).
struct Failure(&'static str);

impl Agent {
    pub fn new(
        id: AgentIdentity,
        plan: Arc<Plan>,
        stats: Arc<Stats>,
        in_flight: Arc<Semaphore>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            id,
            plan,
            stats,
            in_flight,
            tracker,
            conn: None,
            next_seq: 1,
            pending: None,
            not_before: None,
        }
    }

    /// Runs until `cancel`; the first sync and heartbeat come at random offsets within their
    /// intervals, so a fleet's requests are spread as independent gateways' would be.
    pub async fn run(mut self, cancel: CancellationToken) {
        let start = tokio::time::Instant::now();
        let (mut next_sync, mut next_hb) = {
            let mut rng = rand::rng();
            (
                start + self.plan.sync_interval.mul_f64(rng.random::<f64>()),
                start + self.plan.heartbeat_interval.mul_f64(rng.random::<f64>()),
            )
        };
        loop {
            let sync_due = next_sync <= next_hb;
            let at = if sync_due { next_sync } else { next_hb };
            let at = self.not_before.take().map_or(at, |nb| nb.max(at));
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(at) => {}
            }
            let Some(_permit) = permit(&self.in_flight, &cancel).await else {
                break;
            };
            let now = tokio::time::Instant::now();
            if sync_due {
                self.sync().await;
                // Late ticks are not caught up in a burst: a slow control plane sees the
                // same per-agent rate, not a growing backlog of ticks.
                next_sync = (next_sync + self.plan.sync_interval).max(now);
            } else {
                self.heartbeat().await;
                next_hb = (next_hb + self.plan.heartbeat_interval).max(now);
            }
            if self.plan.new_connection_per_request {
                self.conn = None;
            }
        }
    }

    fn health(&self) -> HealthReport {
        HealthReport {
            reported_at: Some(chrono::Utc::now()),
            agent_version: agent_version(),
            buffer_max_bytes: 64 << 20,
            ..Default::default()
        }
    }

    fn next_batch(&mut self) -> (SyncBatch, u64) {
        let n = {
            let mut rng = rand::rng();
            rng.random_range(self.plan.readings_min..=self.plan.readings_max)
        };
        let first = self.next_seq;
        let ts = chrono::Utc::now();
        let records: Vec<Sequenced> = (0..u64::from(n))
            .map(|i| Sequenced {
                epoch: self.plan.epoch,
                seq: first + i,
                record: Record::Reading(Reading {
                    source: "plc1".into(),
                    machine: "line1".into(),
                    metric: format!("m{}", (first + i) % u64::from(self.plan.series.max(1))),
                    ts,
                    value: (first + i) as f64,
                    quality: Default::default(),
                }),
            })
            .collect();
        let last = first + u64::from(n) - 1;
        self.next_seq = last + 1;
        let batch = SyncBatch {
            protocol_version: kip_shared::PROTOCOL_VERSION,
            agent_version: agent_version(),
            epoch: self.plan.epoch,
            first_seq: first,
            last_seq: last,
            records,
            running_model: None,
            health: Some(self.health()),
        };
        (batch, u64::from(n))
    }

    async fn sync(&mut self) {
        let (batch, n) = match self.pending.take() {
            Some(p) => p,
            None => self.next_batch(),
        };
        let t0 = Instant::now();
        match self.post(&batch).await {
            Ok(ack) if ack.acked_seq >= batch.last_seq && ack.epoch == batch.epoch => {
                self.stats.latency(Kind::Sync, t0.elapsed());
                self.stats
                    .syncs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .readings_acked
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .inserted
                    .fetch_add(ack.inserted, std::sync::atomic::Ordering::Relaxed);
                self.stats
                    .duplicates
                    .fetch_add(ack.duplicates, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(_) => {
                self.stats.error("ack_short");
                self.pending = Some((batch, n));
            }
            Err(Failure(kind)) => {
                self.stats.error(kind);
                self.pending = Some((batch, n));
            }
        }
    }

    async fn heartbeat(&mut self) {
        let acked = self
            .pending
            .as_ref()
            .map_or(self.next_seq, |(b, _)| b.first_seq)
            - 1;
        let batch = SyncBatch {
            protocol_version: kip_shared::PROTOCOL_VERSION,
            agent_version: agent_version(),
            epoch: self.plan.epoch,
            first_seq: acked,
            last_seq: acked,
            records: Vec::new(),
            running_model: None,
            health: Some(self.health()),
        };
        let t0 = Instant::now();
        match self.post(&batch).await {
            Ok(_) => {
                self.stats.latency(Kind::Heartbeat, t0.elapsed());
                self.stats
                    .heartbeats
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(Failure(kind)) => self.stats.error(kind),
        }
    }

    /// Posts `batch` (gzip JSON, as the agent sends it) on this agent's connection, opening
    /// one first when there is none.
    async fn post(&mut self, batch: &SyncBatch) -> Result<SyncAck, Failure> {
        let body = gzip_json(batch).map_err(|_| Failure("encode"))?;
        let timeout = self.plan.request_timeout;
        match tokio::time::timeout(timeout, self.exchange(body)).await {
            Ok(Err(f))
                if f.0.starts_with("status_") || f.0 == "shed_503" || f.0 == "ack_undecodable" =>
            {
                // A complete HTTP answer leaves the connection usable, as for the agent's
                // client (reqwest keeps it): a refusal must not turn into a handshake storm.
                Err(f)
            }
            Ok(r) => {
                if r.is_err() {
                    // After a transport failure the connection's state is unknown.
                    self.conn = None;
                }
                r
            }
            Err(_) => {
                self.conn = None;
                Err(Failure("timeout"))
            }
        }
    }

    async fn exchange(&mut self, body: Vec<u8>) -> Result<SyncAck, Failure> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(Failure("connect"));
        };
        conn.ready()
            .await
            .map_err(|_| Failure("connection_closed"))?;
        let req = http::Request::post("/v1/agent/sync")
            .header(http::header::HOST, self.plan.agent_addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_ENCODING, "gzip")
            .header(TRUST_BUNDLE_HEADER, &self.id.bundle_sha256)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| Failure("encode"))?;
        let resp = conn.send_request(req).await.map_err(|_| Failure("http"))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|_| Failure("http"))?
            .to_bytes();
        if let (429 | 503, Some(wait), Some(cap)) =
            (status.as_u16(), retry_after, self.plan.retry_after_cap)
        {
            self.not_before = Some(tokio::time::Instant::now() + wait.min(cap));
            self.stats
                .retry_after_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        match status.as_u16() {
            200 => serde_json::from_slice(&bytes).map_err(|_| Failure("ack_undecodable")),
            429 => Err(Failure("status_429")),
            503 if error_code(&bytes).as_deref()
                == Some(kip_shared::sync::error_code::OVERLOADED) =>
            {
                Err(Failure("shed_503"))
            }
            503 => Err(Failure("status_503")),
            504 => Err(Failure("status_504")),
            s if s >= 500 => Err(Failure("status_5xx")),
            _ => Err(Failure("status_4xx")),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let tcp = TcpStream::connect(self.plan.agent_addr)
            .await
            .map_err(|_| Failure("connect"))?;
        // The agent's requests are small; do not let Nagle hold them back.
        tcp.set_nodelay(true).map_err(|_| Failure("connect"))?;
        let t0 = Instant::now();
        let tls = TlsConnector::from(self.id.tls.clone())
            .connect(self.plan.server_name.clone(), tcp)
            .await
            .map_err(|_| Failure("tls_handshake"))?;
        self.stats.latency(Kind::Handshake, t0.elapsed());
        self.stats
            .handshakes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|_| Failure("http"))?;
        // The connection task ends when the sender is dropped or the server closes it.
        self.tracker.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
        Ok(sender)
    }
}

/// The `error.code` of a JSON error body.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["code"].as_str().map(ToOwned::to_owned)
}

fn agent_version() -> String {
    format!("kip-fleet-sim {}", env!("CARGO_PKG_VERSION"))
}

/// The agent's encoding: JSON, gzip at the fast level.
fn gzip_json(batch: &SyncBatch) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let json = serde_json::to_vec(batch).map_err(std::io::Error::other)?;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&json)?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_waiting_for_the_in_flight_budget_stops_when_the_run_ends() {
        let budget = Arc::new(Semaphore::new(0));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let waiting = tracker.spawn({
            let (budget, cancel) = (budget.clone(), cancel.clone());
            async move { permit(&budget, &cancel).await.is_none() }
        });
        cancel.cancel();
        assert!(waiting.await.unwrap(), "no permit after the end");
        // Cancelled with a permit free: still none (the end wins).
        budget.add_permits(1);
        assert!(permit(&budget, &cancel).await.is_none());
    }
}
