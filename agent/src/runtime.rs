//! The agent runtime: sources -> bounded channel -> buffer writer -> buffer, plus the
//! local HTTP surface (`/metrics`, `/healthz`, `/v1/status`, `/v1/buffer`).
//!
//! Invariants:
//! - One shutdown path: a [`CancellationToken`] stops the sources and the HTTP server; every
//!   task runs on one [`TaskTracker`]. The writer stops only when every source has dropped
//!   its sender, so it drains the channel completely, then flushes: a clean shutdown loses
//!   nothing that a source handed over.
//! - Every source ([`crate::source::Source`]) writes [`Envelope`]s into one channel bounded
//!   by `buffer.queue_capacity_records`: a slow disk slows the sources down (the MQTT source
//!   stages, then defers messages to the broker, but keeps polling its connection) instead of
//!   growing memory.
//! - Acknowledgements wait in the writer until the buffer's durable sequence covers their
//!   records, then are fired without waiting (`try_ack`); the writer asks for an early flush
//!   once `buffer.ack_flush_threshold_records` wait or the oldest waited 5 ms. At most
//!   `queue_capacity_records` acknowledgements wait; beyond that (flushes failing) the writer
//!   stops taking envelopes. A record the buffer rejects as full is acknowledged like an
//!   evicted reading (its loss record says so); one a storage error kept out is not, and the
//!   broker redelivers it on the next connection. A redelivery that matches a delivery note
//!   ([`crate::buffer::Buffer::delivered`]) is not stored again; its acknowledgement fires
//!   once the earlier record is durable. After the channel closed the writer flushes, fires
//!   what became durable and drops the rest (not durable: the broker keeps them).
//! - The HTTP surface is read-only and meant for loopback; it never takes the buffer's lock
//!   for longer than a stats snapshot.
//!
//! When `[sync]` lists endpoints and the device is enrolled (`<state_dir>/identity`), the
//! certificate renewer and the [`crate::sync`] loop run on the same tracker.
//!
//! With `[live_query]`, readings also update the [`crate::live`] latest-value map on their way
//! to the buffer, and the live-query responder runs on the same tracker and token.
//!
//! [`start`] runs named steps (open the buffer, inference, sync, live query, HTTP, sources,
//! spawn); a new source kind is one more entry in [`build_sources`].

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use kip_shared::{Record, Sequenced};
use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    ack::PendingAcks,
    buffer::{Buffer, BufferError, BufferOptions, BufferStats},
    config::Config,
    edge_inference::{Inference, InferenceFeed},
    identity::{Identity, IdentityError, RenewalPolicy, Renewer},
    live::{LiveMetrics, LiveResponder, LiveValues},
    metrics::{self, IngestMetrics},
    mqtt::MqttSource,
    source::{AckHandle, Delivery, Envelope, Source},
    sync::{SyncError, SyncReport, SyncStatus, Syncer},
};

/// How long shutdown waits for the tasks before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often [`RunningAgent::wait`] checks that the buffer's last handle is gone, and a
/// locked buffer is tried again at start.
const BUFFER_CLOSE_POLL: Duration = Duration::from_millis(5);
/// How long a start waits for a locked buffer to be released (see
/// [`open_buffer_when_released`]).
const BUFFER_RELEASE: Duration = Duration::from_secs(5);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(transparent)]
    BufferRecovery(#[from] crate::buffer_recovery::RecoveryError),
    #[error("device identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("sync: {0}")]
    Sync(#[from] SyncError),
    #[error("OPC UA endpoint {endpoint}: {message}")]
    OpcUa { endpoint: String, message: String },
    #[error(transparent)]
    Inference(#[from] crate::edge_inference::StartError),
    #[error("live_query: {0}")]
    LiveQuery(String),
    #[error("cannot listen on {addr} (http.listen_addr): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by the HTTP handlers.
#[derive(Debug)]
struct Surface {
    device: String,
    started: Instant,
    registry: Registry,
    buffer: Arc<Buffer>,
    metrics: IngestMetrics,
    /// (name, kind) of every source, in config order.
    sources: Vec<(String, &'static str)>,
    writer_alive: AtomicBool,
    /// `None` when `[inference]` is off.
    inference: Option<Arc<Inference>>,
    /// The sync loop's state; `None` when sync is not configured or the agent not enrolled.
    sync: Option<Arc<SyncStatus>>,
    /// Quarantined buffer directories found at start-up (see [`crate::buffer_recovery`]).
    quarantined_buffers: Vec<String>,
    /// OPC UA sources keep their connection state in their own metrics.
    opcua: crate::opcua::OpcUaMetrics,
    /// The identity and its `kip_agent_certificate_expiry_seconds` gauge, set at each scrape;
    /// `None` when the agent is not enrolled (no gauge, rather than a misleading 0).
    cert_expiry: Option<(crate::identity::IdentityHandle, Gauge)>,
    /// When each source last delivered a value (stamped by the writer, read by health).
    source_clock: Arc<crate::health::SourceClock>,
}

/// One source's state in [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub name: String,
    pub kind: String,
    pub connected: bool,
    pub readings: u64,
    pub dead_letters: u64,
    pub reconnects: u64,
}

/// What `/v1/status` answers and `kip-agent status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub device: String,
    pub version: String,
    pub uptime_s: u64,
    pub healthy: bool,
    pub sources: Vec<SourceStatus>,
    pub buffer: BufferStats,
    pub records_dropped: u64,
    /// Sync to the control plane; `None` when not configured or not enrolled.
    #[serde(default)]
    pub sync: Option<SyncReport>,
    /// Buffers that could not be opened and were moved aside (paths), oldest first.
    #[serde(default)]
    pub quarantined_buffers: Vec<String>,
}

/// What `/v1/buffer` answers and `kip-agent buffer inspect` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferReport {
    pub stats: BufferStats,
    pub oldest: Vec<Sequenced>,
    pub newest: Vec<Sequenced>,
}

impl BufferReport {
    /// Reads the report straight from a buffer.
    pub fn from_buffer(buffer: &Buffer, n: usize) -> Result<Self, BufferError> {
        Ok(Self {
            stats: buffer.stats()?,
            oldest: buffer.read_range(0, n, u64::MAX)?,
            newest: buffer.read_newest(n)?,
        })
    }
}

impl Surface {
    fn healthy(&self) -> bool {
        self.writer_alive.load(Ordering::Relaxed) && self.buffer.last_flush_ok()
    }

    fn status(&self) -> Result<StatusReport, BufferError> {
        let stats: BufferStats = self.buffer.stats()?;
        let sources = self
            .sources
            .iter()
            .map(|(name, kind)| {
                let l = IngestMetrics::source(name);
                SourceStatus {
                    name: name.clone(),
                    kind: (*kind).into(),
                    connected: if *kind == crate::source::SourceKind::OpcUa.as_str() {
                        self.opcua.is_connected(name)
                    } else {
                        self.metrics.connected.get_or_create(&l).get() == 1
                    },
                    readings: self.metrics.readings_per_source.get_or_create(&l).get(),
                    dead_letters: self.metrics.dead_letters.get_or_create(&l).get(),
                    reconnects: self.metrics.reconnects.get_or_create(&l).get(),
                }
            })
            .collect();
        Ok(StatusReport {
            device: self.device.clone(),
            version: crate::self_update::agent_version().into(),
            uptime_s: self.started.elapsed().as_secs(),
            healthy: self.healthy(),
            sources,
            buffer: stats,
            records_dropped: self.metrics.records_dropped.get(),
            sync: self.sync.as_ref().map(|s| s.report()),
            quarantined_buffers: self.quarantined_buffers.clone(),
        })
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "status request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, "buffer unavailable\n").into_response()
}

async fn metrics_handler(State(s): State<Arc<Surface>>) -> Response {
    // Refreshes the time-dependent gauges (oldest unacked age) before encoding.
    if let Err(e) = s.buffer.stats() {
        tracing::warn!(error = %e, "buffer stats failed");
    }
    if let Some((id, gauge)) = &s.cert_expiry {
        gauge.set(id.seconds_to_expiry(std::time::SystemTime::now()));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics::render(&s.registry),
    )
        .into_response()
}

async fn healthz(State(s): State<Arc<Surface>>) -> Response {
    if s.healthy() && s.buffer.stats().is_ok() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "buffer writer not running\n",
        )
            .into_response()
    }
}

async fn status(State(s): State<Arc<Surface>>) -> Response {
    match s.status() {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Debug, Deserialize)]
struct InspectQuery {
    #[serde(default = "default_inspect_records")]
    records: usize,
}

fn default_inspect_records() -> usize {
    5
}

async fn buffer_report(State(s): State<Arc<Surface>>, Query(q): Query<InspectQuery>) -> Response {
    match BufferReport::from_buffer(&s.buffer, q.records.min(1000)) {
        Ok(r) => Json(r).into_response(),
        Err(e) => internal(e),
    }
}

/// Latest prediction per machine (`{machine: Prediction}`); 404 when inference is off.
async fn latest_predictions(State(s): State<Arc<Surface>>) -> Response {
    match &s.inference {
        Some(i) => Json(i.latest()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "inference is disabled ([inference] enabled = false)\n",
        )
            .into_response(),
    }
}

fn router(surface: Arc<Surface>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/v1/status", get(status))
        .route("/v1/buffer", get(buffer_report))
        .route("/predictions/latest", get(latest_predictions))
        .with_state(surface)
}

/// How long the oldest MQTT message may wait for a flush nobody asked for yet before the
/// writer asks for one (see [`crate::ack`]).
const ACK_FLUSH_MAX_DELAY: Duration = Duration::from_millis(5);
/// How soon a busy acknowledgement (rumqttc's request queue full) is retried.
const ACK_RETRY_DELAY: Duration = Duration::from_millis(5);

/// How the writer handles acknowledgements.
#[derive(Debug, Clone, Copy)]
struct AckPolicy {
    /// Ask for an early flush once this many acknowledgements wait for one.
    flush_threshold: usize,
    /// The writer stops taking envelopes while this many acknowledgements wait (flushes
    /// failing): the backpressure then reaches the sources (MQTT defers, the broker keeps the
    /// messages).
    max_pending: usize,
}

/// What the writer did with one envelope's record.
enum Stored {
    /// Appended (or rejected as full, which is acknowledged like an eviction) under this
    /// sequence: acknowledge once it is durable.
    At(u64),
    /// A redelivery of a message already stored under this sequence: acknowledge once it is
    /// durable, store nothing.
    Redelivery(u64),
    /// Not stored (storage error): do not acknowledge, the upstream redelivers it.
    No,
}

/// Appends one envelope's record, unless it is a recognised redelivery.
fn store(
    buffer: &Buffer,
    record: &Record,
    delivery: Option<&Delivery>,
    stored_before: bool,
    metrics: &IngestMetrics,
    feed: Option<&InferenceFeed>,
    live: Option<&LiveValues>,
) -> Stored {
    if let Some(d) = delivery.filter(|d| d.redelivered) {
        match buffer.delivered(d) {
            Ok(Some(seq)) => {
                metrics.mqtt_redeliveries_skipped.inc();
                return Stored::Redelivery(seq);
            }
            // The source knows the earlier copy is durable (its acknowledgement fired and was
            // lost); its note left the window meanwhile. Acknowledged behind the last record
            // pushed, which is durable no earlier.
            Ok(None) | Err(_) if stored_before => {
                metrics.mqtt_redeliveries_skipped.inc();
                metrics.mqtt_redeliveries_owed.inc();
                tracing::debug!(
                    id = d.id,
                    "redelivery of a stored message without its note: not stored again"
                );
                return Stored::Redelivery(0);
            }
            Ok(None) => {
                metrics.mqtt_redeliveries_stored.inc();
                let value = match record {
                    Record::Reading(r) => r.value,
                    _ => f64::NAN,
                };
                tracing::debug!(
                    id = d.id,
                    value,
                    "redelivery without a delivery note: stored"
                );
            }
            // Stored again rather than risk a loss.
            Err(e) => {
                tracing::warn!(error = %e, "delivery note unreadable; storing the redelivery")
            }
        }
    }
    if let Record::Reading(r) = record {
        if let Some(f) = feed {
            f.offer(r);
        }
        if let Some(l) = live {
            l.observe(r);
        }
    }
    let appended = match delivery {
        Some(d) => {
            buffer.set_delivery_notes_extra(
                usize::try_from(metrics.mqtt_delivery_notes_pinned.get()).unwrap_or(0),
            );
            buffer.append_delivered(record, d)
        }
        None => buffer.append(record),
    };
    match appended {
        Ok(seq) => {
            metrics.records_buffered.inc();
            Stored::At(seq)
        }
        // Rejected like any record when the buffer is full of unevictable records; its loss
        // record names the sequence. Acknowledged (after the next flush) like an evicted
        // reading: holding it would stall the broker session instead.
        Err(e @ BufferError::Full { seq, .. }) => {
            metrics.records_dropped.inc();
            tracing::warn!(error = %e, "record dropped");
            Stored::At(seq)
        }
        // Storage error: not stored, so not acknowledged; the broker redelivers it on the next
        // connection.
        Err(e) => {
            metrics.records_dropped.inc();
            tracing::error!(error = %e, "buffer write failed; record dropped");
            Stored::No
        }
    }
}

/// Fires the acknowledgements `durable` covers; returns when to retry a busy one.
fn release(
    pending: &mut PendingAcks<AckHandle>,
    durable: u64,
    metrics: &IngestMetrics,
) -> Option<Instant> {
    let now = Instant::now();
    let r = pending.release(durable, now);
    metrics.mqtt_acks_sent.inc_by(r.sent);
    if r.failed > 0 {
        metrics.mqtt_acks_failed.inc_by(r.failed);
        tracing::warn!(
            failed = r.failed,
            "mqtt acknowledgements not sent (connection lost or source stopped); the broker \
             redelivers those messages"
        );
    }
    r.busy.then(|| now + ACK_RETRY_DELAY)
}

/// Moves envelopes from the sources' channel into the buffer until every source dropped its
/// sender, then flushes. Acknowledgements fire once the buffer's durable sequence covers
/// their records.
async fn write_records(
    buffer: Arc<Buffer>,
    mut rx: mpsc::Receiver<Envelope>,
    policy: AckPolicy,
    metrics: IngestMetrics,
    surface: Arc<Surface>,
    feed: Option<InferenceFeed>,
    live: Option<Arc<LiveValues>>,
) {
    let mut pending: PendingAcks<AckHandle> = PendingAcks::default();
    let mut durable = buffer.watch_durable();
    let mut durable_open = true;
    let mut retry_at: Option<Instant> = None;
    loop {
        let wake = [pending.flush_deadline(ACK_FLUSH_MAX_DELAY), retry_at]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            r = rx.recv(), if pending.len() < policy.max_pending => {
                let Some(Envelope { record, ack, delivery, stored_before }) = r else { break };
                if let Record::Reading(reading) = &record {
                    surface.source_clock.observe(&reading.source);
                }
                let stored = store(&buffer, &record, delivery.as_ref(), stored_before, &metrics, feed.as_ref(), live.as_deref());
                match (ack, stored) {
                    (Some(token), Stored::At(seq)) => pending.push(seq, token, Instant::now()),
                    (Some(token), Stored::Redelivery(seq)) => {
                        pending.push(seq, token, Instant::now());
                        // Its record may be durable long since: no flush will announce it.
                        retry_at = release(&mut pending, *durable.borrow(), &metrics);
                    }
                    (Some(_), Stored::No) => {
                        metrics.mqtt_acks_failed.inc();
                    }
                    (None, _) => {}
                }
                if pending.take_flush_request(policy.flush_threshold, ACK_FLUSH_MAX_DELAY, Instant::now()) {
                    buffer.request_flush();
                }
            }
            changed = durable.changed(), if durable_open => match changed {
                Ok(()) => {
                    let d = *durable.borrow_and_update();
                    retry_at = release(&mut pending, d, &metrics);
                }
                Err(_) => durable_open = false,
            },
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                if pending.take_flush_request(policy.flush_threshold, ACK_FLUSH_MAX_DELAY, Instant::now()) {
                    buffer.request_flush();
                }
                if retry_at.is_some() {
                    let d = *durable.borrow();
                    retry_at = release(&mut pending, d, &metrics);
                }
            }
        }
    }
    match buffer.flush().await {
        Ok(seq) => tracing::info!(durable_seq = seq, "buffer flushed at shutdown"),
        Err(e) => tracing::error!(error = %e, "final buffer flush failed"),
    }
    // The MQTT sources keep their connections polled until these are fired or dropped.
    let deadline = Instant::now() + crate::ack::BUSY_GIVE_UP;
    let d = *durable.borrow();
    while release(&mut pending, d, &metrics).is_some() && Instant::now() < deadline {
        tokio::time::sleep(ACK_RETRY_DELAY).await;
    }
    let left = pending.abandon();
    if left > 0 {
        // Not durable (the final flush failed): the broker keeps them.
        metrics.mqtt_acks_failed.inc_by(left);
        tracing::warn!(
            messages = left,
            "mqtt messages left unacknowledged at shutdown"
        );
    }
    surface.writer_alive.store(false, Ordering::Relaxed);
}

/// A started agent; [`RunningAgent::wait`] returns after shutdown.
#[derive(Debug)]
pub struct RunningAgent {
    /// Where the HTTP surface listens (useful with port 0).
    pub http_addr: SocketAddr,
    pub buffer: Arc<Buffer>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    surface: Arc<Surface>,
}

impl RunningAgent {
    /// The buffer's last flush failed (disk full, I/O error): `/healthz` is red, and the
    /// supervisor ([`crate::remote_config::supervise`]) reopens the buffer.
    pub fn storage_failing(&self) -> bool {
        !self.buffer.last_flush_ok()
    }

    /// Why this agent does not yet prove its configuration works, `None` once every source
    /// is connected and (when sync runs) the control plane acknowledged a batch since start.
    /// Used to confirm or roll back a remote configuration ([`crate::remote_config`]).
    pub fn unconfirmed(&self) -> Option<String> {
        let report = match self.surface.status() {
            Ok(r) => r,
            Err(e) => return Some(format!("buffer unavailable: {e}")),
        };
        let down: Vec<&str> = report
            .sources
            .iter()
            .filter(|s| !s.connected)
            .map(|s| s.name.as_str())
            .collect();
        if !down.is_empty() {
            return Some(format!("sources not connected: {}", down.join(", ")));
        }
        match &report.sync {
            Some(s) if s.last_ack_at.is_none() => Some(format!(
                "control plane not reached ({})",
                s.last_error
                    .as_deref()
                    .unwrap_or("no batch acknowledged yet")
            )),
            _ => None,
        }
    }

    /// Waits until every task ended after `cancel` (bounded by a grace period), makes sure
    /// the buffer is flushed, then until the buffer is closed (its last handle dropped).
    ///
    /// The last step is what lets the next pipeline of the same process open the buffer
    /// ([`crate::remote_config::supervise`] restarts it for every configuration change):
    /// the buffer allows one open instance (`flock`), and blocking work the sync loop started
    /// (a batch read ahead, the deletion of an acknowledged batch) holds a handle after its
    /// task ended.
    /// Under load that outlived the task by milliseconds, and the restart failed with "in use
    /// by another process", which rolled back a good configuration.
    pub async fn wait(self) {
        let Self {
            buffer,
            tracker,
            cancel,
            surface,
            http_addr: _,
        } = self;
        cancel.cancelled().await;
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "tasks did not stop in time; flushing what the buffer has"
            );
        }
        if let Err(e) = buffer.flush().await {
            tracing::error!(error = %e, "buffer flush at shutdown failed");
        }
        drop(surface);
        let handle = Arc::downgrade(&buffer);
        drop(buffer);
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while handle.strong_count() > 0 {
            if Instant::now() >= deadline {
                tracing::error!(
                    grace_s = SHUTDOWN_GRACE.as_secs(),
                    handles = handle.strong_count(),
                    "buffer still open after shutdown; reopening it in this process fails until it closes"
                );
                break;
            }
            tokio::time::sleep(BUFFER_CLOSE_POLL).await;
        }
    }
}

/// Opens the buffer, binds the HTTP port and starts every task. Stops when `cancel` fires.
///
/// The steps, in order: [`open_buffer`], metrics, [`start_inference`], [`prepare_sync`],
/// [`prepare_live_query`], [`bind_http`], [`build_sources`], then everything is spawned on
/// one tracker ([`spawn_tasks`]). A step that fails stops the start-up before any task runs.
pub async fn start(cfg: Config, cancel: CancellationToken) -> Result<RunningAgent, RuntimeError> {
    start_with_remote(cfg, cancel, None).await
}

/// [`start`], with the sync loop passing remote configurations to `remote` and reporting
/// its state ([`crate::remote_config`]).
pub async fn start_with_remote(
    cfg: Config,
    cancel: CancellationToken,
    remote: Option<crate::remote_config::Link>,
) -> Result<RunningAgent, RuntimeError> {
    let buffer = open_buffer_when_released(&cfg).await?;
    let mut registry = metrics::new_registry();
    let metrics = IngestMetrics::register(&mut registry);
    buffer.register_metrics(&mut registry);
    let quarantined_buffers = register_quarantined(&cfg, &mut registry);
    let inference = start_inference(&cfg, &mut registry)?;
    let mut sync = prepare_sync(&cfg, &buffer, inference.as_ref(), &mut registry)?;
    if let Some(link) = remote {
        sync.syncer = sync.syncer.map(|s| s.with_remote_config(link));
    }
    let live = prepare_live_query(&cfg, inference.as_ref(), &mut registry)?;
    let (listener, http_addr) = bind_http(&cfg).await?;
    let (sources, opcua) = build_sources(&cfg, &metrics, &mut registry)?;
    let source_names: Vec<(String, &'static str)> = sources
        .iter()
        .map(|s| (s.name().to_owned(), s.kind().as_str()))
        .collect();
    let source_clock = Arc::new(crate::health::SourceClock::default());
    let syncer = sync.syncer.map(|s| {
        s.with_health(Arc::new(crate::health::HealthCollector {
            buffer: buffer.clone(),
            buffer_max_bytes: cfg.buffer.max_bytes,
            metrics: metrics.clone(),
            sources: source_names.clone(),
            clock: source_clock.clone(),
            identity: sync.cert_expiry.as_ref().map(|(h, _)| h.clone()),
            inference: inference.as_ref().map(|(i, _)| i.clone()),
            state_dir: cfg.state_dir.clone(),
            started: Instant::now(),
        }))
    });
    let surface = Arc::new(Surface {
        device: cfg.device.to_string(),
        started: Instant::now(),
        registry,
        buffer: buffer.clone(),
        metrics: metrics.clone(),
        sources: source_names,
        writer_alive: AtomicBool::new(true),
        inference: inference.as_ref().map(|(i, _)| i.clone()),
        sync: syncer.as_ref().map(Syncer::status),
        cert_expiry: sync.cert_expiry,
        quarantined_buffers,
        source_clock,
        opcua,
    });
    let surface_for_confirm = surface.clone();
    let tracker = TaskTracker::new();
    spawn_tasks(
        &cfg,
        &tracker,
        &cancel,
        Tasks {
            buffer: buffer.clone(),
            metrics,
            surface,
            inference,
            syncer,
            renewer: sync.renewer,
            live,
            sources,
            listener,
        },
    );
    let surface = surface_for_confirm;
    tracing::info!(%http_addr, device = %cfg.device, "agent running");
    Ok(RunningAgent {
        http_addr,
        buffer,
        tracker,
        cancel,
        surface,
    })
}

/// [`open_buffer`], retrying for up to [`BUFFER_RELEASE`] while the buffer is locked: a
/// pipeline restarted in the same process ([`crate::remote_config`]) may find the previous
/// one's storage still letting go of its lock for a moment after the last handle dropped. A
/// buffer held by another agent process still fails, with the same error, once the time is
/// up.
async fn open_buffer_when_released(cfg: &Config) -> Result<Arc<Buffer>, RuntimeError> {
    let deadline = Instant::now() + BUFFER_RELEASE;
    loop {
        match open_buffer(cfg) {
            Err(RuntimeError::BufferRecovery(crate::buffer_recovery::RecoveryError::Buffer(
                BufferError::Locked { .. },
            ))) if Instant::now() < deadline => {
                tokio::time::sleep(BUFFER_CLOSE_POLL).await;
            }
            other => return other,
        }
    }
}

/// Creates the state directory and opens the buffer in it.
fn open_buffer(cfg: &Config) -> Result<Arc<Buffer>, RuntimeError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| RuntimeError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let mut opts = BufferOptions::with_max_bytes(cfg.buffer.max_bytes);
    opts.cache_capacity_bytes = cfg.buffer.cache_capacity_bytes;
    opts.max_delivery_notes = cfg.buffer.max_delivery_notes;
    let floor = cfg
        .identity_dir()
        .join(crate::buffer_recovery::EPOCH_FLOOR_FILE);
    let opened = crate::buffer_recovery::open(&cfg.buffer_dir(), &floor, opts)?;
    let buffer = Arc::new(opened.buffer);
    tracing::info!(
        path = %buffer.path().display(),
        epoch = buffer.epoch(),
        "buffer open"
    );
    Ok(buffer)
}

/// Reports the quarantined buffers in the state directory: a gauge
/// (`kip_agent_buffer_quarantined_dirs`), an error line each start, the list for the status.
fn register_quarantined(cfg: &Config, registry: &mut Registry) -> Vec<String> {
    let found: Vec<String> = crate::buffer_recovery::quarantined_buffers(&cfg.state_dir)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let gauge = Gauge::<i64>::default();
    gauge.set(i64::try_from(found.len()).unwrap_or(i64::MAX));
    registry.register(
        "buffer_quarantined_dirs",
        "Buffer directories that could not be opened and were moved aside (remove them once inspected)",
        gauge,
    );
    if !found.is_empty() {
        tracing::error!(quarantined = ?found,
            "quarantined buffers are present: their records were not synced");
    }
    found
}

/// Loads the model (when `[inference]` is on); returns it with its queue capacity.
fn start_inference(
    cfg: &Config,
    registry: &mut Registry,
) -> Result<Option<(Arc<Inference>, usize)>, RuntimeError> {
    Ok(match &cfg.inference {
        Some(ic) => Some((Inference::start(ic, registry)?, ic.queue_capacity_readings)),
        None => None,
    })
}

/// The sync loop and certificate renewer, when sync is configured and the device enrolled.
#[derive(Default)]
struct SyncParts {
    syncer: Option<Syncer>,
    renewer: Option<Renewer>,
    cert_expiry: Option<(crate::identity::IdentityHandle, Gauge)>,
}

/// Sync needs the enrolled identity; without one the agent still buffers everything.
fn prepare_sync(
    cfg: &Config,
    buffer: &Arc<Buffer>,
    inference: Option<&(Arc<Inference>, usize)>,
    registry: &mut Registry,
) -> Result<SyncParts, RuntimeError> {
    let Some(first) = cfg.sync.endpoints.first() else {
        return Ok(SyncParts::default());
    };
    let Some(id) = Identity::load(&cfg.identity_dir())? else {
        tracing::error!(
            dir = %cfg.identity_dir().display(),
            "sync is configured but the device is not enrolled: records stay buffered"
        );
        return Ok(SyncParts::default());
    };
    let (renewer, handle) = Renewer::new(
        id,
        cfg.identity_dir(),
        first.clone(),
        RenewalPolicy::default(),
    )?;
    let gauge = Gauge::default();
    registry.register(
        "certificate_expiry_seconds",
        "Seconds until the device certificate expires (negative once expired); renewal starts at 2/3 of its lifetime",
        gauge.clone(),
    );
    let syncer = Syncer::new(
        buffer.clone(),
        cfg.sync.clone(),
        handle.client_config.clone(),
        registry,
    )?
    .with_inference(inference.map(|(i, _)| i.clone()))
    .with_identity_hints(handle.hints.clone());
    Ok(SyncParts {
        syncer: Some(syncer),
        renewer: Some(renewer),
        cert_expiry: Some((handle, gauge)),
    })
}

/// The live-query responder and the latest-value map it answers from (`[live_query]`).
fn prepare_live_query(
    cfg: &Config,
    inference: Option<&(Arc<Inference>, usize)>,
    registry: &mut Registry,
) -> Result<Option<(LiveResponder, Arc<LiveValues>)>, RuntimeError> {
    let Some(lq) = &cfg.live_query else {
        return Ok(None);
    };
    let org_id = live_org(lq.org_id, cfg)?;
    let m = LiveMetrics::register(registry);
    let values = Arc::new(LiveValues::new(
        lq.max_tracked_values,
        m.values_dropped.clone(),
    ));
    let responder = LiveResponder::new(
        lq.clone(),
        org_id,
        cfg.device.as_str(),
        values.clone(),
        inference.map(|(i, _)| i.clone()),
        m,
    );
    Ok(Some((responder, values)))
}

/// Binds the local HTTP surface (`http.listen_addr`).
async fn bind_http(cfg: &Config) -> Result<(tokio::net::TcpListener, SocketAddr), RuntimeError> {
    let listen = |source| RuntimeError::Listen {
        addr: cfg.http_listen_addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(cfg.http_listen_addr)
        .await
        .map_err(listen)?;
    let addr = listener.local_addr().map_err(listen)?;
    Ok((listener, addr))
}

/// Every configured source, in config order (MQTT brokers, then OPC UA endpoints). A new
/// source kind adds its loop here and nothing else in the runtime.
fn build_sources(
    cfg: &Config,
    metrics: &IngestMetrics,
    registry: &mut Registry,
) -> Result<(Vec<Box<dyn Source>>, crate::opcua::OpcUaMetrics), RuntimeError> {
    let mut sources: Vec<Box<dyn Source>> = Vec::new();
    for b in &cfg.mqtt {
        sources.push(Box::new(MqttSource::new(b.clone(), metrics.clone())));
    }
    use crate::opcua::OwnCertificate as _;
    let opcua_metrics = crate::opcua::OpcUaMetrics::register(registry);
    for ep in &cfg.opcua {
        if ep.security_policy != crate::opcua::OpcUaSecurityPolicy::None {
            // Created once; the operator adds this certificate to the PLC's trust list.
            let cert = ep
                .ensure_own_certificate()
                .map_err(|message| RuntimeError::OpcUa {
                    endpoint: ep.name.clone(),
                    message,
                })?;
            tracing::info!(source = %ep.name, cert = %cert.display(), "OPC UA client certificate");
        }
        sources.push(Box::new(crate::opcua::OpcUaSource::with_metrics(
            ep.clone(),
            opcua_metrics.clone(),
        )));
    }
    Ok((sources, opcua_metrics))
}

/// What [`spawn_tasks`] starts.
struct Tasks {
    buffer: Arc<Buffer>,
    metrics: IngestMetrics,
    surface: Arc<Surface>,
    inference: Option<(Arc<Inference>, usize)>,
    syncer: Option<Syncer>,
    renewer: Option<Renewer>,
    live: Option<(LiveResponder, Arc<LiveValues>)>,
    sources: Vec<Box<dyn Source>>,
    listener: tokio::net::TcpListener,
}

/// Spawns every task on `tracker`: inference, renewer, sync, live-query responder, the
/// sources (one bounded channel of envelopes), the buffer writer, the flusher, and the HTTP
/// surface.
fn spawn_tasks(cfg: &Config, tracker: &TaskTracker, cancel: &CancellationToken, t: Tasks) {
    // Inference runs beside the writer and ends when the writer drops the feed.
    let feed = t.inference.map(|(inf, capacity)| {
        let (itx, irx) = mpsc::channel(capacity);
        let dropped = inf.metrics.dropped_readings.clone();
        tracker.spawn(inf.run(t.buffer.clone(), irx, Some(cfg.predictor_state_file())));
        InferenceFeed { tx: itx, dropped }
    });
    if let Some(r) = t.renewer {
        tracker.spawn(r.run(cancel.clone()));
    }
    if let Some(s) = t.syncer {
        tracker.spawn(s.run(cancel.clone()));
    }
    let live_values = t.live.map(|(responder, values)| {
        tracker.spawn(responder.run(cancel.clone()));
        values
    });
    let (tx, rx) = mpsc::channel(cfg.buffer.queue_capacity_records);
    for source in t.sources {
        tracing::info!(
            source = source.name(),
            kind = source.kind().as_str(),
            "starting source"
        );
        tracker.spawn(source.run(tx.clone(), cancel.clone()));
    }
    // The writer ends when the last sender is gone: drop ours now.
    drop(tx);
    // Cancelled when the writer returns (or unwinds): the flusher's stop signal.
    let writer_done = CancellationToken::new();
    let writer_guard = writer_done.clone().drop_guard();
    let writer = write_records(
        t.buffer.clone(),
        rx,
        AckPolicy {
            flush_threshold: cfg.buffer.ack_flush_threshold_records,
            max_pending: cfg
                .buffer
                .queue_capacity_records
                .max(cfg.buffer.ack_flush_threshold_records),
        },
        t.metrics,
        t.surface.clone(),
        feed,
        live_values,
    );
    tracker.spawn(async move {
        let _flusher_stop = writer_guard;
        writer.await;
    });
    {
        // The flusher outlives `cancel` until the writer is done: at shutdown the MQTT sources
        // wait (up to `mqtt::SHUTDOWN_ACK_WAIT`) for the acknowledgements of what the writer
        // still takes from the channel, and those fire only once a flush covers them. A
        // flusher that stopped at `cancel` left every such stop waiting the full 5 s (and the
        // acknowledgements unsent: the broker redelivered those messages).
        let buffer = t.buffer.clone();
        let stop = writer_done;
        let interval = cfg.buffer.flush_interval;
        tracker.spawn(async move { buffer.run_flusher(interval, stop).await });
    }
    let cancel = cancel.clone();
    let app = router(t.surface);
    let listener = t.listener;
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "http server failed");
        }
    });
}

/// The organisation of `[live_query]`: the configured one, else the enrolled identity's; both
/// must agree when both exist.
fn live_org(configured: Option<uuid::Uuid>, cfg: &Config) -> Result<uuid::Uuid, RuntimeError> {
    let enrolled = Identity::load(&cfg.identity_dir())?.map(|i| i.org_id());
    match (configured, enrolled) {
        (Some(c), Some(e)) if c != e => Err(RuntimeError::LiveQuery(format!(
            "org_id {c} differs from the enrolled identity's organisation {e}"
        ))),
        (Some(c), _) => Ok(c),
        (None, Some(e)) => Ok(e),
        (None, None) => Err(RuntimeError::LiveQuery(format!(
            "the device is not enrolled ({} has no identity): enroll it or set live_query.org_id",
            cfg.identity_dir().display()
        ))),
    }
}

/// Minimal HTTP/1.1 GET against the agent's own loopback surface (no TLS, no redirects), so
/// the CLI needs no HTTP client stack. Returns status code and body.
pub async fn local_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
        Ok((code, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 5 s"))?
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn surface(dir: &std::path::Path) -> Arc<Surface> {
        let buffer = Arc::new(Buffer::open(dir, BufferOptions::with_max_bytes(1 << 20)).unwrap());
        let mut registry = metrics::new_registry();
        let metrics = IngestMetrics::register(&mut registry);
        buffer.register_metrics(&mut registry);
        Arc::new(Surface {
            device: "gw".into(),
            started: Instant::now(),
            registry,
            buffer,
            metrics,
            sources: vec![("b1".into(), "mqtt")],
            writer_alive: AtomicBool::new(true),
            inference: None,
            sync: None,
            cert_expiry: None,
            quarantined_buffers: Vec::new(),
            source_clock: Default::default(),
            opcua: crate::opcua::OpcUaMetrics::default(),
        })
    }

    async fn get(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (code, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn every_reading_the_writer_stores_updates_the_live_values() {
        let dir = tempfile::tempdir().unwrap();
        let s = surface(dir.path());
        let live = Arc::new(LiveValues::new(
            10,
            prometheus_client::metrics::counter::Counter::default(),
        ));
        let (tx, rx) = mpsc::channel(4);
        let writer = write_records(
            s.buffer.clone(),
            rx,
            AckPolicy {
                flush_threshold: 10,
                max_pending: 10,
            },
            s.metrics.clone(),
            s.clone(),
            None,
            Some(live.clone()),
        );
        let now = chrono::Utc::now();
        // One reading from an OPC UA endpoint, one from an MQTT broker: same path.
        for (source, metric, value) in [
            ("plc1", "spindle_speed", 1500.0),
            ("b1", "temperature", 21.5),
        ] {
            tx.send(Envelope::plain(Record::Reading(kip_shared::Reading {
                source: source.into(),
                machine: "press-1".into(),
                metric: metric.into(),
                ts: now,
                value,
                quality: kip_shared::Quality::Good,
            })))
            .await
            .unwrap();
        }
        drop(tx);
        writer.await;
        let req = kip_shared::live::LiveRequest {
            v: kip_shared::live::LIVE_PROTOCOL_VERSION,
            request_id: uuid::Uuid::nil(),
            org_id: uuid::Uuid::nil(),
            device: "gw".into(),
            reply_to: "r".into(),
            sent_at: now,
            machines: vec![],
            metrics: vec![],
        };
        let got: Vec<(String, f64)> = live
            .snapshot(&req)
            .into_iter()
            .map(|v| (v.source, v.value))
            .collect();
        assert_eq!(got, vec![("plc1".into(), 1500.0), ("b1".into(), 21.5)]);
    }

    /// Counts how often it was fired.
    #[derive(Debug, Clone, Default)]
    struct CountingAck(Arc<std::sync::atomic::AtomicU64>);

    impl crate::ack::Acknowledge for CountingAck {
        fn try_ack(&self) -> crate::ack::AckOutcome {
            self.0.fetch_add(1, Ordering::Relaxed);
            crate::ack::AckOutcome::Sent
        }
    }

    #[tokio::test]
    async fn a_redelivery_matching_a_delivery_note_is_acknowledged_without_storing_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = surface(dir.path());
        let (tx, rx) = mpsc::channel(8);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let flusher = {
            let (b, c) = (s.buffer.clone(), cancel.clone());
            tracker.spawn(async move { b.run_flusher(Duration::from_millis(10), c).await })
        };
        let writer = tracker.spawn(write_records(
            s.buffer.clone(),
            rx,
            AckPolicy {
                flush_threshold: 1,
                max_pending: 10,
            },
            s.metrics.clone(),
            s.clone(),
            None,
            None,
        ));
        let acks = CountingAck::default();
        let reading = |v: f64| {
            Record::Reading(kip_shared::Reading {
                source: "b1".into(),
                machine: "m".into(),
                metric: "x".into(),
                ts: chrono::Utc::now(),
                value: v,
                quality: kip_shared::Quality::Good,
            })
        };
        let delivery = |payload: &str, redelivered: bool| Delivery {
            session: "c1".into(),
            id: 7,
            digest: crate::mqtt::message_digest("t", payload.as_bytes()),
            redelivered,
        };
        let send = |payload: &'static str, redelivered: bool| {
            let (tx, acks) = (tx.clone(), acks.clone());
            async move {
                tx.send(Envelope {
                    record: reading(payload.parse().unwrap()),
                    ack: Some(AckHandle::new(acks)),
                    delivery: Some(delivery(payload, redelivered)),
                    stored_before: false,
                })
                .await
                .unwrap();
            }
        };
        // Stored, then its redelivery (DUP): acknowledged twice, stored once.
        send("1", false).await;
        send("1", true).await;
        // Same packet id, other content, DUP set, never stored: stored.
        send("2", true).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks.0.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "acknowledgements missing");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(tx);
        writer.await.unwrap();
        cancel.cancel();
        flusher.await.unwrap();
        let values: Vec<f64> = s
            .buffer
            .read_range(0, 10, u64::MAX)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.record {
                Record::Reading(r) => Some(r.value),
                _ => None,
            })
            .collect();
        assert_eq!(values, vec![1.0, 2.0]);
        assert_eq!(s.metrics.mqtt_redeliveries_skipped.get(), 1);
        assert_eq!(s.metrics.mqtt_redeliveries_stored.get(), 1);
    }

    #[tokio::test]
    async fn healthz_fails_once_the_writer_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = surface(dir.path());
        assert_eq!(get(router(s.clone()), "/healthz").await.0, StatusCode::OK);
        s.writer_alive.store(false, Ordering::Relaxed);
        assert_eq!(
            get(router(s.clone()), "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (_, body) = get(router(s), "/v1/status").await;
        let report: StatusReport = serde_json::from_str(&body).unwrap();
        assert!(!report.healthy);
        assert_eq!(report.sources[0].name, "b1");
    }

    #[tokio::test]
    async fn metrics_show_the_oldest_unacked_age_of_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let s = surface(dir.path());
        s.buffer
            .append(&Record::Gap(kip_shared::Gap {
                source: "b1".into(),
                from: chrono::Utc::now(),
                to: chrono::Utc::now(),
                reason: "test".into(),
            }))
            .unwrap();
        let (code, body) = get(router(s), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("kip_agent_buffer_records 1"), "{body}");
        assert!(
            body.contains("kip_agent_buffer_oldest_unacked_age_seconds"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
