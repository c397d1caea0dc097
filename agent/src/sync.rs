//! Sync: ships the buffer to the control plane's agent listener, effectively once.
//!
//! The loop (one task on the runtime's tracker) reads the records after the last acknowledged
//! sequence ([`Buffer::read_range`]), posts them as one gzip JSON [`SyncBatch`] over mTLS to
//! `POST {endpoint}/v1/agent/sync`, and on the [`SyncAck`] deletes them ([`Buffer::ack`]).
//!
//! # Guarantees
//!
//! - **At least once** on the agent side: records are deleted only after the control plane
//!   acknowledged them; a lost ack, a crash of either side or a cut network resends the same
//!   `(epoch, seq)` records. **At most once** on the control-plane side: records are keyed by
//!   `(device, epoch, seq)` and stored with `ON CONFLICT DO NOTHING` in one transaction per
//!   batch. Together: every buffered record lands exactly once.
//! - Loss window: only the buffer's (see [`crate::buffer`]): records appended after the last
//!   completed flush may be lost by a power cut or `kill -9` of the agent. Sync itself adds no
//!   window: an acked record was committed by PostgreSQL first.
//! - Identity: the client is rebuilt when the identity's `watch` channel publishes a renewed
//!   certificate or a new trust bundle, between batches, so neither interrupts sync.
//! - CA rollover: every batch reports the fingerprint of the trust bundle in use
//!   (`kip-trust-bundle-sha256`); a bundle or a renewal hint in the ack's desired state is
//!   passed to the renewer ([`crate::identity::IdentityHints`]), which stores and publishes.
//! - Backlog drain: after a full batch the next one is sent at once; the loop sleeps
//!   `interval_ms` only when caught up. Buffer reads, gzip and acks run on the blocking pool,
//!   so the buffer writer keeps ingesting while a backlog drains.
//! - Pipelined drain (issue #17): while the batches are full, no poison record is being
//!   isolated and the last attempt did not fail, up to `sync.max_in_flight_batches` requests
//!   are in flight at once, each batch starting after the previous one, and the batch after
//!   the last one in flight is read and encoded ahead; the control plane stores them
//!   concurrently. Invariants:
//!   - the buffer is acknowledged strictly in sequence order: the answers are taken oldest
//!     first, and a batch's ack (deletion, counters, desired state) is applied only after
//!     every earlier batch's was;
//!   - any answer of the oldest batch other than an ack covering it (failure, throttling,
//!     refusal, a 413) discards every later batch in flight (their requests are aborted,
//!     their answers dropped, even acks: those rows may already be stored, which is harmless
//!     since the resend is keyed by `(epoch, seq)`) and the read-ahead, and the loop acts on
//!     the failure as with a single batch, resuming from the first unacknowledged sequence;
//!   - splitting (poison records), backoff and `Retry-After`, shrinking and growing the batch
//!     size, heartbeats and desired state work as with one batch in flight: a split or a
//!     failure sends one batch at a time until a batch is acknowledged again; each ack's
//!     desired state is applied in order.
//!   - Compatibility: a control plane before issue #17 admits one sync per device and answers
//!     a second concurrent one 429 (a new one answers 429 `sync_in_flight` beyond its
//!     `ingest.max_in_flight_syncs_per_device`). A 429 for a batch sent while `k` earlier
//!     ones were in flight lowers the agent's limit to `k` (at least 1; gauge
//!     `kip_agent_sync_max_in_flight_batches`) and the batch is resent at once, without a
//!     backoff; the configured limit is tried again after 10 minutes (the control plane may
//!     have been upgraded).
//! - Failures (connect error, timeout, 5xx, 408, 429, 401/403/404, a bad answer): the records
//!   stay buffered, the next endpoint is tried after exponential backoff with equal jitter
//!   ([`kip_shared::backoff::Backoff`], `backoff_min_ms`..`backoff_max_ms`); a working endpoint is kept. Timeouts and 413 also
//!   halve the batch size; fast, full batches double it again up to the configured caps.
//! - Load shedding (issue #17): a `503` or `429` with `Retry-After` (delta seconds) is a
//!   control plane asking the fleet to come back later; the loop waits at least that long
//!   (capped at `backoff_max_ms`, so a wrong header cannot park the agent), without the probe
//!   shortcut below (the endpoint is reachable, just busy), and counts it in
//!   `kip_agent_sync_retry_after_waits_total`. The records stay buffered and the same batch
//!   is sent again: nothing is lost. A saturated control plane's refusal is code `overloaded`
//!   (reason `overloaded` in `kip_agent_sync_failures_total`).
//! - Reconnect: while backing off, the endpoints are probed (TLS handshake every
//!   `probe_interval_ms`, [`crate::sync_probe`]); an endpoint seen unreachable and then
//!   reachable ends the wait at once and becomes the endpoint of the next attempt, so the first
//!   batch after an outage does not wait for a backoff grown toward its cap.
//!
//! # Poison batches
//!
//! The control plane's refusal carries a machine-readable `error.code`
//! ([`kip_shared::sync::error_code`]); the loop acts on the code alone, never on the message.
//! A code that blames one record (`record_invalid`, `batch_undecodable`) means the control
//! plane will never accept the batch as it is. Looping on it would stop the stream for good,
//! so the loop splits: it halves the batch until the refused part is one record, then moves
//! that record aside: it appends a [`DeadLetter`] (source `sync`, origin `epoch E seq S kind
//! K`, the server's status, code and message as reason, the record's whole JSON as payload,
//! not a prefix), acknowledges the refused record locally (deleting it), counts it in
//! `kip_agent_sync_dead_letters` and logs an error. The stream then continues; the dead
//! letter itself syncs like any record, so the refusal is visible in the control plane
//! (`agent_events`).
//!
//! Everything else is systemic and treated as a failure (backoff, nothing dropped): a
//! protocol version the control plane does not accept, a structural or encoding refusal, a
//! 413 for a single record, a missing or unknown code, and a refused dead letter written by
//! this module (the control plane refuses even minimal records). `batch_too_many_records`
//! and a 413 for several records shrink the batch instead.
//!
//! # Health, heartbeat and clock offset
//!
//! With a [`crate::health::HealthCollector`] ([`Syncer::with_health`]) every batch carries the
//! agent's health report, and an agent with nothing to send still contacts the control plane
//! every `sync.heartbeat_interval_s`: a heartbeat is an empty batch (`first_seq = last_seq =`
//! the last acknowledged sequence) with only the report; its ack brings desired state and
//! trust bundles like any other. Each ack carries the control plane's `server_time`; the
//! offset is `server_time - midpoint(sent, received)` (error at most half the round trip) and
//! goes into the next report (`kip_agent_clock_offset_seconds`).
//!
//! Compatibility: `SyncBatch` refuses unknown fields, so reports are attached only after an
//! ack showed `server_time` (a control plane that knows them). Before the first ack the
//! heartbeat is tried; a control plane that refuses it (400/422) gets neither heartbeats nor
//! reports until one of its acks carries `server_time`. Nothing is dead-lettered for it.
//!
//! Models from the desired state (champion and shadow): a model that cannot be installed is
//! remembered by its artifact (`sha256:signature`) so that every ack does not fetch it again.
//! A verdict on the artifact itself (unsigned, bad signature, wrong digest, too large, does
//! not load) stands until the desired state names another artifact or none. A failure of the
//! moment (the download failed, or was answered 404 because the desired state moved on between
//! the ack and the download; no signing keys yet) is retried after the sync backoff
//! (`backoff_min_ms`..`backoff_max_ms`, growing with each consecutive failure), and at once
//! when the desired state stops naming the model and names it again. Before, every failure
//! stood: a shadow whose download raced the end of a rollout was never installed when a later
//! rollout (e.g. the MLflow `challenger` alias) named the same artifact again.

use kip_shared::backoff::Backoff;
use std::{
    collections::VecDeque,
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use kip_certs::rustls;
use kip_shared::{
    DeadLetter, Record, Sequenced,
    sync::{SyncAck, SyncBatch, error_code},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::{
    sync::CancellationToken,
    task::{AbortOnDropHandle, TaskTracker},
};

use crate::{
    buffer::{Buffer, BufferError},
    config::SyncConfig,
};

/// Takes a health report (on a blocking thread: it reads the buffer and the file system).
type HealthSource = Box<dyn FnOnce() -> Option<kip_shared::health::HealthReport> + Send>;

/// Source name of the dead letters this module writes.
pub const DEAD_LETTER_SOURCE: &str = "sync";
/// Smallest adaptive byte budget of a batch.
const MIN_BATCH_BYTES: u64 = 4096;
/// First batch size in records (grows to the configured cap while batches are fast and full).
const INITIAL_BATCH_RECORDS: usize = 256;
/// After a control plane refused concurrent batches (429), the configured
/// `sync.max_in_flight_batches` is tried again this long after (see the module docs).
const IN_FLIGHT_REPROBE: Duration = Duration::from_secs(600);

/// Why the sync loop could not even build its client or read its buffer.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("cannot encode the batch: {0}")]
    Encode(#[from] std::io::Error),
    #[error("blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Metrics of the sync loop (`kip_agent_sync_*`).
#[derive(Debug, Clone, Default)]
struct SyncMetrics {
    batches: Family<ResultLabels, Counter>,
    records: Counter,
    failures: Family<ReasonLabels, Counter>,
    dead_letters: Counter,
    backlog_records: Gauge,
    backlog_age_seconds: Gauge<f64, AtomicU64>,
    last_ack_unix_seconds: Gauge,
    batch_records: Gauge,
    online: Gauge,
    heartbeats: Family<ResultLabels, Counter>,
    clock_offset_seconds: Gauge<f64, AtomicU64>,
    probe_recoveries: Counter,
    retry_after_waits: Counter,
    max_in_flight_batches: Gauge,
    in_flight_fallbacks: Counter,
}

impl SyncMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "sync_batches",
            "Sync batches by result (acked, failed, refused)",
            m.batches.clone(),
        );
        registry.register(
            "sync_records",
            "Records acknowledged by the control plane (rate() gives records/s)",
            m.records.clone(),
        );
        registry.register(
            "sync_failures",
            "Failed sync attempts by reason",
            m.failures.clone(),
        );
        registry.register(
            "sync_dead_letters",
            "Records the control plane refused for good, moved aside as dead letters",
            m.dead_letters.clone(),
        );
        registry.register(
            "sync_backlog_records",
            "Records buffered and not yet acknowledged",
            m.backlog_records.clone(),
        );
        registry.register(
            "sync_backlog_age_seconds",
            "Age of the oldest unacknowledged record",
            m.backlog_age_seconds.clone(),
        );
        registry.register(
            "sync_last_ack_unix_seconds",
            "Time of the last acknowledged batch (0 = none since start)",
            m.last_ack_unix_seconds.clone(),
        );
        registry.register(
            "sync_batch_records",
            "Current adaptive batch size in records",
            m.batch_records.clone(),
        );
        registry.register(
            "sync_online",
            "1 when the last sync attempt succeeded",
            m.online.clone(),
        );
        registry.register(
            "sync_heartbeats",
            "Idle heartbeats (empty syncs with the health report) by result (acked, failed, refused)",
            m.heartbeats.clone(),
        );
        registry.register(
            "clock_offset_seconds",
            "Control-plane clock minus agent clock, from the last acknowledged sync (positive: the control plane is ahead)",
            m.clock_offset_seconds.clone(),
        );
        registry.register(
            "sync_retry_after_waits",
            "Sync attempts refused with 503 or 429 and Retry-After, after which the loop waited at least that long (capped at sync.backoff_max_ms)",
            m.retry_after_waits.clone(),
        );
        registry.register(
            "sync_max_in_flight_batches",
            "Batches the drain keeps in flight at once now (sync.max_in_flight_batches, lower after a control plane refused concurrent syncs with 429)",
            m.max_in_flight_batches.clone(),
        );
        registry.register(
            "sync_in_flight_fallbacks",
            "Times a 429 for a concurrent batch lowered the batches kept in flight",
            m.in_flight_fallbacks.clone(),
        );
        registry.register(
            "sync_probe_recoveries",
            "Backoff waits ended early because a probe reached an endpoint that had been unreachable",
            m.probe_recoveries.clone(),
        );
        m
    }
}

/// The sync state shown by `/v1/status` and `kip-agent status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SyncReport {
    /// The last attempt reached the control plane and was acknowledged.
    pub online: bool,
    pub endpoint: String,
    pub last_ack_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
    pub batch_records: u64,
    pub records_acked: u64,
    pub dead_letters: u64,
}

/// Live state shared between the loop and the status surface.
#[derive(Debug, Default)]
pub struct SyncStatus {
    online: AtomicBool,
    last_ack_ms: AtomicI64,
    failures: AtomicU64,
    batch_records: AtomicU64,
    records_acked: AtomicU64,
    dead_letters: AtomicU64,
    endpoint: Mutex<String>,
    last_error: Mutex<Option<String>>,
}

impl SyncStatus {
    /// A snapshot for reports.
    pub fn report(&self) -> SyncReport {
        let ms = self.last_ack_ms.load(Ordering::Relaxed);
        SyncReport {
            online: self.online.load(Ordering::Relaxed),
            endpoint: self.endpoint.lock().map(|e| e.clone()).unwrap_or_default(),
            last_ack_at: (ms > 0)
                .then(|| DateTime::from_timestamp_millis(ms))
                .flatten(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            batch_records: self.batch_records.load(Ordering::Relaxed),
            records_acked: self.records_acked.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
        }
    }

    fn set_endpoint(&self, e: &str) {
        if let Ok(mut g) = self.endpoint.lock() {
            e.clone_into(&mut g);
        }
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
}

/// What one batch attempt came to.
#[derive(Debug)]
enum Outcome {
    Acked(Box<SyncAck>),
    /// Worth retrying later: network, timeout, 5xx, 408, 429, auth, a bad answer.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// 503 or 429 with `Retry-After`: the control plane asks to come back after `retry_after`.
    Throttled {
        reason: &'static str,
        message: String,
        retry_after: Duration,
    },
    /// 413: the batch is too large for the control plane.
    TooLarge {
        message: String,
    },
    /// 400/422: the control plane will not take this batch as it is; `code` (the JSON
    /// body's `error.code`) tells whether one record is to blame.
    Refused {
        status: u16,
        code: Option<String>,
        message: String,
    },
}

/// The sync loop; see the module docs.
#[derive(Debug)]
pub struct Syncer {
    buffer: Arc<Buffer>,
    cfg: SyncConfig,
    tls: watch::Receiver<Arc<rustls::ClientConfig>>,
    metrics: SyncMetrics,
    status: Arc<SyncStatus>,
    client: reqwest::Client,
    endpoint: usize,
    batch_records: usize,
    batch_bytes: u64,
    /// Set while isolating a poison record: the largest batch to send, and the last
    /// sequence of the refused batch (the split ends once the loop is past it).
    split: Option<(usize, u64)>,
    failures: u32,
    /// The next sequence to send (one past the last acknowledged one).
    next_seq: u64,
    /// Local inference, for model rollout from the desired state; `None` when off.
    inference: Option<Arc<crate::edge_inference::Inference>>,
    /// The last failed attempt at the desired model (see the module docs, "Models from the
    /// desired state"); the last good model keeps serving meanwhile.
    model_failed: Option<FailedAttempt>,
    /// Why the last desired model was refused; reported in the `kip-model-error` header.
    model_error: Option<String>,
    /// Like `model_failed`, for the desired shadow model.
    shadow_failed: Option<FailedAttempt>,
    /// Remote configuration: offers from the desired state, reports in the request headers.
    remote: Option<crate::remote_config::Link>,
    /// Self-update (only under the launcher): desired releases, trial confirmation, reports.
    update: Option<Arc<crate::self_update::SelfUpdate>>,
    /// Trusted model signing keys and the device's organisation (see [`crate::model_trust`]).
    model_trust: crate::model_trust::ModelTrust,
    /// Bundle fingerprint and hint channel of the identity; `None`: no CA rollover via sync.
    identity_hints: Option<crate::identity::IdentityHints>,
    /// Health reports and heartbeats; `None`: neither.
    health: Option<Arc<crate::health::HealthCollector>>,
    /// Whether the control plane takes health reports: `None` until an ack (or a refused
    /// heartbeat) tells (see the module docs, "Compatibility").
    health_accepted: Option<bool>,
    /// Control-plane clock minus ours, from the last ack with `server_time`.
    clock_offset_ms: Option<i64>,
    /// When the control plane last acknowledged anything (batch or heartbeat).
    last_contact: Option<Instant>,
    /// The next batch, read and encoded while the current one is in flight.
    read_ahead: Option<ReadAhead>,
    /// The last failure carried a `Retry-After`: its wait is not cut short by the probe.
    server_asked_wait: bool,
    /// The deletion of the last acknowledged batch, running while the next one is in flight;
    /// joined before the loop looks at the buffer again.
    pending_ack: Option<tokio::task::JoinHandle<Result<u64, BufferError>>>,
    /// Batches sent and not yet answered, oldest first (see the module docs, "Pipelined
    /// drain"); each starts after the previous one ends.
    in_flight: VecDeque<InFlight>,
    /// How many batches may be in flight at once now: `sync.max_in_flight_batches`, lower
    /// after a 429 for a concurrent batch.
    in_flight_cap: usize,
    /// When `in_flight_cap` was lowered (it is restored after [`IN_FLIGHT_REPROBE`]).
    in_flight_lowered_at: Option<Instant>,
    /// The requests in flight run here (their handles abort them when dropped).
    requests: TaskTracker,
}

/// A batch whose request is in flight.
#[derive(Debug)]
struct InFlight {
    records: Vec<Sequenced>,
    /// The record limit it was read with (`records.len() >= limit`: a full batch).
    limit: usize,
    started: Instant,
    sent: DateTime<Utc>,
    /// The trust-bundle fingerprint it reported.
    reported_bundle: Option<String>,
    /// Requests in flight when it was sent, itself included.
    concurrent: usize,
    answer: AbortOnDropHandle<Answer>,
}

impl InFlight {
    fn full(&self) -> bool {
        self.records.len() >= self.limit
    }

    fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }
}

/// The control plane's answer to one request.
#[derive(Debug)]
struct Answer {
    outcome: Outcome,
    /// The HTTP status, when there was an answer.
    status: Option<u16>,
    received: DateTime<Utc>,
}

/// Reading and encoding a batch on the blocking pool: its records and request body.
type BatchTask = tokio::task::JoinHandle<Result<(Vec<Sequenced>, Vec<u8>), SyncError>>;

/// A batch read from the buffer and encoded on the blocking pool while the previous batch
/// was in flight (see the module docs, "Backlog drain").
#[derive(Debug)]
struct ReadAhead {
    /// First sequence it was read from.
    from: u64,
    /// The record limit it was read with.
    limit: usize,
    task: BatchTask,
}

/// A desired model (champion or shadow) that could not be installed.
#[derive(Debug)]
struct FailedAttempt {
    /// `sha256:signature` of the artifact the desired state named.
    artifact: String,
    /// `None`: the artifact itself was refused, not tried again while the desired state keeps
    /// naming it. `Some(t)`: a failure of the moment, tried again from `t`.
    retry_at: Option<Instant>,
    /// Consecutive failures of the moment for this artifact (the backoff grows with them).
    failures: u32,
}

impl FailedAttempt {
    /// The attempt at `artifact` that just failed, after `previous`; `lasting`: a verdict on
    /// the artifact ([`crate::model_trust::Refusal::is_lasting`], or it does not load).
    fn after(previous: Option<&Self>, artifact: String, lasting: bool, backoff: &Backoff) -> Self {
        let failures = previous
            .filter(|p| p.artifact == artifact)
            .map_or(1, |p| p.failures.saturating_add(1));
        let retry_at =
            (!lasting).then(|| Instant::now() + backoff.delay_for(failures, rand::random::<f64>()));
        Self {
            artifact,
            retry_at,
            failures,
        }
    }

    /// Whether `artifact` is not to be tried now.
    fn holds_back(&self, artifact: &str, now: Instant) -> bool {
        self.artifact == artifact && self.retry_at.is_none_or(|t| now < t)
    }

    /// When the failure is retried, for the log (`None`: not while the artifact is desired).
    fn retry_in_ms(&self) -> Option<u64> {
        self.retry_at.map(|t| {
            u64::try_from(t.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(u64::MAX)
        })
    }
}

/// Why a desired model was not installed: the message, and whether it is a verdict on the
/// artifact itself.
type InstallFailure = (String, bool);

fn build_client(
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<reqwest::Client, SyncError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured((**tls).clone())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .map_err(SyncError::Client)
}

impl Syncer {
    /// Prepares the loop over `buffer`, presenting the client configuration published on
    /// `tls` (the identity's watch channel), and registers its metrics.
    pub fn new(
        buffer: Arc<Buffer>,
        cfg: SyncConfig,
        mut tls: watch::Receiver<Arc<rustls::ClientConfig>>,
        registry: &mut Registry,
    ) -> Result<Self, SyncError> {
        let client = build_client(&tls.borrow_and_update(), cfg.request_timeout)?;
        let next_seq = buffer.stats()?.acked_up_to + 1;
        let status = Arc::new(SyncStatus::default());
        if let Some(e) = cfg.endpoints.first() {
            status.set_endpoint(e);
        }
        let batch_records = INITIAL_BATCH_RECORDS.min(cfg.batch_max_records);
        let batch_bytes = cfg.batch_max_bytes;
        let in_flight_cap = cfg.max_in_flight_batches.max(1);
        let metrics = SyncMetrics::register(registry);
        metrics
            .max_in_flight_batches
            .set(i64::try_from(in_flight_cap).unwrap_or(i64::MAX));
        Ok(Self {
            buffer,
            cfg,
            tls,
            metrics,
            status,
            client,
            endpoint: 0,
            batch_records,
            batch_bytes,
            split: None,
            failures: 0,
            next_seq,
            inference: None,
            model_failed: None,
            model_error: None,
            shadow_failed: None,
            remote: None,
            update: crate::self_update::handle(),
            model_trust: crate::model_trust::ModelTrust::new(registry),
            identity_hints: None,
            health: None,
            health_accepted: None,
            clock_offset_ms: None,
            last_contact: None,
            read_ahead: None,
            server_asked_wait: false,
            pending_ack: None,
            in_flight: VecDeque::new(),
            in_flight_cap,
            in_flight_lowered_at: None,
            requests: TaskTracker::new(),
        })
    }

    /// Sends the agent's health with every batch and as an idle heartbeat.
    pub fn with_health(mut self, health: Arc<crate::health::HealthCollector>) -> Self {
        self.health = Some(health);
        self
    }

    /// How to take the report to attach, if one is due (see the module docs,
    /// "Compatibility"); called on a blocking thread, only once there is something to send.
    fn health_source(&self, for_heartbeat: bool) -> Option<HealthSource> {
        let h = self.health.clone()?;
        let wanted = if for_heartbeat {
            self.health_accepted != Some(false)
        } else {
            self.health_accepted == Some(true)
        };
        if !wanted {
            return None;
        }
        let offset = self.clock_offset_ms;
        let dead = self.status.dead_letters.load(Ordering::Relaxed);
        Some(Box::new(move || h.report(offset, dead)))
    }

    /// Learns from an ack whether the control plane takes reports, and the clock offset.
    fn observe_ack(&mut self, ack: &SyncAck, sent: DateTime<Utc>, received: DateTime<Utc>) {
        self.last_contact = Some(Instant::now());
        self.health_accepted = Some(ack.server_time.is_some());
        if let Some(t) = ack.server_time {
            let offset = kip_shared::health::clock_offset_ms(sent, received, t);
            self.clock_offset_ms = Some(offset);
            self.metrics
                .clock_offset_seconds
                .set(offset as f64 / 1000.0);
        }
    }

    /// Acts on the desired state of an ack: CA-rollover hints, model signing keys, the model.
    async fn apply_desired(&mut self, ack: &SyncAck, reported_bundle: Option<String>) {
        if let (Some(h), Some(reported)) = (&self.identity_hints, reported_bundle) {
            if let Some(pem) = ack.desired.trust_bundle_pem.clone() {
                h.offer(crate::identity::IdentityHint::TrustBundle {
                    pem,
                    sha256: ack.desired.trust_bundle_sha256.clone(),
                    reported_sha256: reported,
                });
            }
            if ack.desired.renew_certificate {
                h.offer(crate::identity::IdentityHint::RenewSoon {
                    serial: ack.desired.renew_serial.clone(),
                });
            }
        }
        self.model_trust
            .update_keys(ack.desired.model_signing_keys_pem.as_deref());
        match ack.desired.model.clone() {
            Some(m) => self.apply_desired_model(m).await,
            // Named again later, the model is tried at once.
            None => self.model_failed = None,
        }
        match ack.desired.shadow_model.clone() {
            Some(m) => self.apply_desired_shadow(m).await,
            None => {
                self.shadow_failed = None;
                if let Some(inf) = &self.inference {
                    inf.remove_shadow();
                }
            }
        }
        if let (Some(link), Some(v)) = (&self.remote, &ack.desired.config_version) {
            link.offer(v, ack.desired.config_toml.as_deref());
        }
        if let Some(u) = self.update.clone() {
            // An ack is the control plane reached; with every source up the version on
            // trial (if any) has proved itself.
            let down = self
                .health
                .as_ref()
                .map(|h| h.sources_down())
                .unwrap_or_default();
            u.on_ack(
                (!down.is_empty()).then(|| format!("sources not connected: {}", down.join(", "))),
            );
            if let Some(r) = ack.desired.agent_release.clone()
                && u.wants(&r)
            {
                self.apply_desired_release(u, r).await;
            }
        }
    }

    /// Downloads and verifies (signature, then sha256) the desired agent release, installs it
    /// beside the running version and asks for a restart ([`crate::self_update`]). A refused
    /// release is reported and this version keeps running.
    async fn apply_desired_release(
        &mut self,
        u: Arc<crate::self_update::SelfUpdate>,
        r: kip_shared::sync::DesiredRelease,
    ) {
        let Some(base) = self.cfg.endpoints.get(self.endpoint).cloned() else {
            return;
        };
        u.downloading(&r);
        let signed = crate::self_update::SelfUpdate::as_signed_artifact(&r);
        let url = format!("{base}{}", r.download_path);
        let bytes = match self
            .model_trust
            .fetch_verified(&self.client, &url, &signed)
            .await
        {
            Ok((bytes, _sha)) => bytes,
            Err(refused) => {
                u.refused(&r, &refused.to_string());
                return;
            }
        };
        let (u2, r2) = (u.clone(), r.clone());
        let installed = tokio::task::spawn_blocking(move || u2.install(&r2, &bytes))
            .await
            .map_err(|e| e.to_string())
            .and_then(|res| res.map_err(|e| e.to_string()));
        if let Err(e) = installed {
            u.refused(&r, &e);
        }
    }

    /// An empty sync with the health report, when nothing was sent for
    /// `sync.heartbeat_interval_s`. Returns the pause before the next step.
    async fn heartbeat(&mut self) -> Result<Duration, SyncError> {
        let Some(source) = self.health_source(true) else {
            return Ok(self.cfg.interval);
        };
        let Some(report) = tokio::task::spawn_blocking(source).await? else {
            return Ok(self.cfg.interval);
        };
        let acked = self.next_seq.saturating_sub(1);
        let batch = SyncBatch {
            protocol_version: kip_shared::PROTOCOL_VERSION,
            agent_version: format!("kip-agent {}", crate::self_update::agent_version()),
            epoch: self.buffer.epoch(),
            first_seq: acked,
            last_seq: acked,
            records: Vec::new(),
            running_model: self.inference.as_ref().and_then(|i| i.running_model()),
            health: Some(report),
        };
        let body = tokio::task::spawn_blocking(move || gzip_json(&batch)).await??;
        let reported_bundle = self.identity_hints.as_ref().map(|h| h.bundle_sha256());
        let sent = Utc::now();
        let outcome = self.send(body, reported_bundle.as_deref()).await;
        let received = Utc::now();
        self.join_ack().await?;
        // Counts the previous batch's deletion (this one's is still to come).
        self.refresh_backlog().await;
        let result = |r: &'static str| ResultLabels { result: r };
        match outcome {
            Outcome::Acked(ack) => {
                self.metrics
                    .heartbeats
                    .get_or_create(&result("acked"))
                    .inc();
                self.observe_ack(&ack, sent, received);
                self.failures = 0;
                self.metrics.online.set(1);
                self.status.online.store(true, Ordering::Relaxed);
                self.status.failures.store(0, Ordering::Relaxed);
                self.status.set_error(None);
                tracing::debug!(clock_offset_ms = ?self.clock_offset_ms, "heartbeat acknowledged");
                self.apply_desired(&ack, reported_bundle).await;
                Ok(self.cfg.interval)
            }
            Outcome::Refused {
                status,
                code: _,
                message,
            } => {
                // A control plane that predates heartbeats refuses empty batches.
                self.metrics
                    .heartbeats
                    .get_or_create(&result("refused"))
                    .inc();
                self.health_accepted = Some(false);
                tracing::warn!(status, %message,
                    "the control plane refused a heartbeat: no heartbeats or health reports until it acknowledges with server_time");
                Ok(self.cfg.interval)
            }
            Outcome::TooLarge { message } => {
                self.metrics
                    .heartbeats
                    .get_or_create(&result("failed"))
                    .inc();
                Ok(self.failure("too_large", message))
            }
            Outcome::Failed { reason, message } => {
                self.metrics
                    .heartbeats
                    .get_or_create(&result("failed"))
                    .inc();
                Ok(self.failure(reason, message))
            }
            Outcome::Throttled {
                reason,
                message,
                retry_after,
            } => {
                self.metrics
                    .heartbeats
                    .get_or_create(&result("failed"))
                    .inc();
                Ok(self.failure_after(reason, message, Some(retry_after)))
            }
        }
    }

    /// Reports the trust bundle in use and passes CA-rollover hints from the desired state
    /// (new bundle, early renewal) to the renewer.
    pub fn with_identity_hints(mut self, hints: crate::identity::IdentityHints) -> Self {
        self.model_trust.set_org(hints.org_id());
        self.identity_hints = Some(hints);
        self
    }

    /// The organisation of the device certificate, against which model signatures are
    /// checked (set by [`Syncer::with_identity_hints`] too). Without it no model is loaded.
    pub fn with_device_org(mut self, org_id: uuid::Uuid) -> Self {
        self.model_trust.set_org(org_id);
        self
    }

    /// Passes remote configurations from the desired state to `link` and reports its state.
    pub fn with_remote_config(mut self, link: crate::remote_config::Link) -> Self {
        self.remote = Some(link);
        self
    }

    /// Lets the desired state roll models out to `inference`.
    pub fn with_inference(
        mut self,
        inference: Option<Arc<crate::edge_inference::Inference>>,
    ) -> Self {
        self.inference = inference;
        self
    }

    /// Downloads, verifies (signature, then sha256) and hot-swaps the model named by the
    /// desired state when it is not the one serving. Never fails the sync loop: a refused
    /// model is logged, counted, reported on the next sync, and the previous model keeps
    /// serving; a failure of the moment is retried after a backoff (module docs).
    async fn apply_desired_model(&mut self, m: kip_shared::sync::DesiredModel) {
        let Some(inf) = self.inference.clone() else {
            return;
        };
        let want = format!("{}@{}", m.name, m.version);
        let attempt = format!("{}:{}", m.sha256, m.signature.as_deref().unwrap_or("-"));
        if inf.running_model().as_deref() == Some(want.as_str())
            || self
                .model_failed
                .as_ref()
                .is_some_and(|f| f.holds_back(&attempt, Instant::now()))
        {
            return;
        }
        let Some(base) = self.cfg.endpoints.get(self.endpoint).cloned() else {
            return;
        };
        let url = format!("{base}{}", m.download_path);
        let result: Result<(), InstallFailure> = match self
            .model_trust
            .fetch_verified(&self.client, &url, &m)
            .await
        {
            Err(refused) => Err((refused.to_string(), refused.is_lasting())),
            Ok((bytes, sha)) => tokio::task::spawn_blocking(move || {
                inf.install(&bytes, Some(&sha)).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| (e, true)),
        };
        match result {
            Ok(()) => {
                self.model_failed = None;
                self.model_error = None;
                tracing::info!(model = %want, "desired model installed");
            }
            Err((e, lasting)) => {
                let failed = FailedAttempt::after(
                    self.model_failed.as_ref(),
                    attempt,
                    lasting,
                    &Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max),
                );
                match failed.retry_in_ms() {
                    None => tracing::error!(model = %want, error = %e,
                        "desired model refused; the previous model keeps serving"),
                    Some(retry_in_ms) => tracing::warn!(model = %want, error = %e, retry_in_ms,
                        "desired model not installed yet; the previous model keeps serving"),
                }
                self.model_error = Some(crate::model_trust::header_value(&format!("{want}: {e}")));
                self.model_failed = Some(failed);
            }
        }
    }

    /// Downloads, verifies and loads the shadow model named by the desired state (a canary or
    /// shadow rollout) when it is not the one running beside the champion. Like
    /// [`Self::apply_desired_model`], a refusal is logged and not retried for the same
    /// artifact, a failure of the moment is retried after a backoff; the champion is never
    /// affected.
    async fn apply_desired_shadow(&mut self, m: kip_shared::sync::DesiredModel) {
        let Some(inf) = self.inference.clone() else {
            return;
        };
        let want = format!("{}@{}", m.name, m.version);
        let attempt = format!("{}:{}", m.sha256, m.signature.as_deref().unwrap_or("-"));
        if inf
            .shadow_model()
            .is_some_and(|(running, sha)| running == want && sha.eq_ignore_ascii_case(&m.sha256))
            || self
                .shadow_failed
                .as_ref()
                .is_some_and(|f| f.holds_back(&attempt, Instant::now()))
        {
            return;
        }
        let Some(base) = self.cfg.endpoints.get(self.endpoint).cloned() else {
            return;
        };
        let url = format!("{base}{}", m.download_path);
        let result: Result<(), InstallFailure> = match self
            .model_trust
            .fetch_verified(&self.client, &url, &m)
            .await
        {
            Err(refused) => Err((refused.to_string(), refused.is_lasting())),
            Ok((bytes, sha)) => tokio::task::spawn_blocking(move || {
                inf.install_shadow(&bytes, Some(&sha))
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|e| (e, true)),
        };
        match result {
            Ok(()) => {
                self.shadow_failed = None;
                tracing::info!(model = %want, "desired shadow model installed");
            }
            Err((e, lasting)) => {
                let failed = FailedAttempt::after(
                    self.shadow_failed.as_ref(),
                    attempt,
                    lasting,
                    &Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max),
                );
                match failed.retry_in_ms() {
                    None => {
                        tracing::error!(model = %want, error = %e, "desired shadow model refused");
                    }
                    Some(retry_in_ms) => tracing::warn!(model = %want, error = %e, retry_in_ms,
                        "desired shadow model not installed yet"),
                }
                self.shadow_failed = Some(failed);
            }
        }
    }

    /// The shared status, for the local HTTP surface.
    pub fn status(&self) -> Arc<SyncStatus> {
        self.status.clone()
    }

    /// Runs until `cancel` fires. Never gives up: every failure is retried with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        if self.cfg.endpoints.is_empty() {
            tracing::warn!("sync.endpoints is empty: records stay in the buffer");
            return;
        }
        tracing::info!(endpoints = ?self.cfg.endpoints, from_seq = self.next_seq, "sync started");
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Cancelling mid-batch is safe: unacked records are simply sent again next run.
            let step = tokio::select! {
                () = cancel.cancelled() => break,
                r = self.step() => r,
            };
            let pause = match step {
                Ok(Some(pause)) => pause,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "sync step failed");
                    self.failure("local", e.to_string())
                }
            };
            // A wait the control plane asked for is not cut short: the endpoint is reachable
            // (it answered), so a probe would end the wait at once.
            let asked = std::mem::take(&mut self.server_asked_wait);
            let probe = self
                .cfg
                .probe_interval
                .filter(|p| self.failures > 0 && pause > *p && !asked);
            let Some(interval) = probe else {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            };
            let tls = self.tls.borrow().clone();
            let end = tokio::select! {
                () = cancel.cancelled() => break,
                end = crate::sync_probe::wait(pause, &self.cfg.endpoints, tls, interval) => end,
            };
            if let crate::sync_probe::WaitEnd::Reachable(i) = end {
                self.endpoint = i;
                if let Some(e) = self.cfg.endpoints.get(i) {
                    self.status.set_endpoint(e);
                    tracing::info!(endpoint = %e, "sync endpoint reachable again; retrying now");
                }
                self.metrics.probe_recoveries.inc();
            }
        }
        tracing::info!("sync stopped");
    }

    /// Waits for the deletion of the last acknowledged batch (see `pending_ack`).
    async fn join_ack(&mut self) -> Result<(), SyncError> {
        if let Some(ack) = self.pending_ack.take() {
            ack.await??;
        }
        Ok(())
    }

    /// Reads and encodes up to `limit` records from `from` on the blocking pool.
    fn read_batch(&self, from: u64, limit: usize) -> BatchTask {
        let health = self.health_source(false);
        let buffer = self.buffer.clone();
        let bytes = self.batch_bytes;
        let running = self.inference.as_ref().and_then(|i| i.running_model());
        tokio::task::spawn_blocking(move || {
            read_and_encode(&buffer, from, limit, bytes, running, health)
        })
    }

    /// The batch from `from` with at most `limit` records: the one read ahead when it starts
    /// there and is no larger (fewer records than the limit are always a valid batch), else
    /// read now. Returns the records, the request body and the limit it was read with.
    async fn take_batch(
        &mut self,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<Sequenced>, Vec<u8>, usize), SyncError> {
        let split = self.split.is_some();
        let ahead = self.read_ahead.take().and_then(|r| {
            if r.from == from && r.limit <= limit && !split {
                Some(r)
            } else {
                r.task.abort();
                None
            }
        });
        Ok(match ahead {
            Some(r) => {
                let (records, body) = r.task.await??;
                (records, body, r.limit)
            }
            None => {
                let (records, body) = self.read_batch(from, limit).await??;
                (records, body, limit)
            }
        })
    }

    /// Whether more than one batch may be in flight: draining, not isolating a refused record,
    /// and the last attempt did not fail.
    fn pipelining(&self) -> bool {
        self.split.is_none() && self.failures == 0
    }

    /// Where the next pipelined batch starts: after the newest batch in flight, when that one
    /// was full (a shorter batch means the backlog ends there).
    fn after_the_last_full_batch(&self) -> Option<u64> {
        self.in_flight
            .back()
            .filter(|b| b.full())
            .map(|b| b.last_seq() + 1)
    }

    /// Sends the batches after the last one in flight while they are full, up to
    /// `in_flight_cap`, then reads and encodes the one after them ahead.
    async fn fill_pipeline(&mut self, limit: usize) -> Result<(), SyncError> {
        while self.pipelining() && self.in_flight.len() < self.in_flight_cap {
            let Some(from) = self.after_the_last_full_batch() else {
                return Ok(());
            };
            let (records, body, used) = self.take_batch(from, limit).await?;
            if records.is_empty() {
                return Ok(());
            }
            self.launch(records, body, used);
        }
        if self.pipelining()
            && self.read_ahead.is_none()
            && let Some(from) = self.after_the_last_full_batch()
        {
            self.read_ahead = Some(ReadAhead {
                from,
                limit,
                task: self.read_batch(from, limit),
            });
        }
        Ok(())
    }

    /// Sends a batch read with `limit`: its request runs on `requests` while the loop goes on.
    fn launch(&mut self, records: Vec<Sequenced>, body: Vec<u8>, limit: usize) {
        let reported_bundle = self.identity_hints.as_ref().map(|h| h.bundle_sha256());
        let request = self.request(body, reported_bundle.as_deref());
        let started = Instant::now();
        let sent = Utc::now();
        let task = self.requests.spawn(async move {
            let (outcome, status) = match request {
                Ok((req, base)) => exchange(req, &base).await,
                Err(outcome) => (outcome, None),
            };
            Answer {
                outcome,
                status,
                received: Utc::now(),
            }
        });
        self.in_flight.push_back(InFlight {
            records,
            limit,
            started,
            sent,
            reported_bundle,
            concurrent: self.in_flight.len() + 1,
            answer: AbortOnDropHandle::new(task),
        });
    }

    /// Drops every batch still in flight (their requests are aborted, their answers never
    /// applied) and the read-ahead: the loop resumes from the first unacknowledged sequence.
    fn discard_in_flight(&mut self) {
        if !self.in_flight.is_empty() {
            tracing::debug!(
                discarded = self.in_flight.len(),
                from_seq = self.next_seq,
                "later batches in flight discarded; resending from the first unacknowledged record"
            );
        }
        self.in_flight.clear();
        if let Some(r) = self.read_ahead.take() {
            r.task.abort();
        }
    }

    fn set_in_flight_cap(&mut self, cap: usize) {
        self.in_flight_cap = cap.max(1);
        self.metrics
            .max_in_flight_batches
            .set(i64::try_from(self.in_flight_cap).unwrap_or(i64::MAX));
    }

    /// One batch answered: read and send (keeping up to `in_flight_cap` batches in flight while
    /// draining), then act on the answer of the oldest one. `None` means "go on at once" (a
    /// full batch was acked, batches are still in flight or a split is in progress), otherwise
    /// how long to wait.
    pub async fn step(&mut self) -> Result<Option<Duration>, SyncError> {
        let r = self.step_inner().await;
        if r.is_err() {
            // A batch whose answer was taken but not applied must not be skipped by applying
            // a later one's: everything in flight goes, the loop resumes from `next_seq`.
            self.discard_in_flight();
        }
        r
    }

    async fn step_inner(&mut self) -> Result<Option<Duration>, SyncError> {
        if self.tls.has_changed().unwrap_or(false) {
            let cfg = self.tls.borrow_and_update().clone();
            self.client = build_client(&cfg, self.cfg.request_timeout)?;
            tracing::info!("sync client rebuilt with the renewed certificate or trust bundle");
        }
        if self.split.is_some_and(|(_, until)| self.next_seq > until) {
            self.split = None;
        }
        if self
            .in_flight_lowered_at
            .is_some_and(|t| t.elapsed() >= IN_FLIGHT_REPROBE)
        {
            self.in_flight_lowered_at = None;
            self.set_in_flight_cap(self.cfg.max_in_flight_batches);
        }
        let limit = self
            .split
            .map_or(self.batch_records, |(l, _)| l)
            .min(self.batch_records)
            .max(1);
        if self.in_flight.is_empty() {
            let (records, body, used) = self.take_batch(self.next_seq, limit).await?;
            if records.is_empty() {
                self.join_ack().await?;
                self.refresh_backlog().await;
                let heartbeat_due = self
                    .last_contact
                    .is_none_or(|t| t.elapsed() >= self.cfg.heartbeat_interval);
                if self.health.is_some() && heartbeat_due {
                    return self.heartbeat().await.map(Some);
                }
                self.status.online.store(true, Ordering::Relaxed);
                return Ok(Some(self.cfg.interval));
            }
            self.launch(records, body, used);
        }
        self.fill_pipeline(limit).await?;
        let Some(head) = self.in_flight.pop_front() else {
            return Ok(Some(self.cfg.interval));
        };
        let InFlight {
            records,
            limit,
            started,
            sent,
            reported_bundle,
            concurrent,
            answer,
        } = head;
        let Answer {
            outcome,
            status,
            received,
        } = answer.await.unwrap_or_else(|e| Answer {
            outcome: Outcome::Failed {
                reason: "local",
                message: format!("request task failed: {e}"),
            },
            status: None,
            received: Utc::now(),
        });
        self.join_ack().await?;
        // Counts the previous batch's deletion (this one's is still to come).
        self.refresh_backlog().await;
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            return Ok(None);
        };
        let (first_seq, last_seq, n) = (first.seq, last.seq, records.len());
        let full = n >= limit;
        let covered = matches!(&outcome,
            Outcome::Acked(ack) if ack.epoch == self.buffer.epoch() && ack.acked_seq >= last_seq);
        if !covered {
            // Acks are applied in sequence order: nothing after this batch may be.
            self.discard_in_flight();
        }
        if status == Some(429) && concurrent > 1 {
            // Sent beside `concurrent - 1` earlier batches: the control plane admits fewer
            // syncs of this device at once (one, before issue #17). Nothing was stored.
            let cap = concurrent - 1;
            if cap < self.in_flight_cap {
                self.set_in_flight_cap(cap);
                self.in_flight_lowered_at = Some(Instant::now());
                self.metrics.in_flight_fallbacks.inc();
                tracing::warn!(
                    max_in_flight_batches = cap,
                    configured = self.cfg.max_in_flight_batches,
                    "the control plane refused a concurrent batch (429); sending fewer at once"
                );
            }
            return Ok(None);
        }
        match outcome {
            Outcome::Acked(ack) if covered => {
                self.observe_ack(&ack, sent, received);
                // Deleted while the next batch is in flight (joined after its answer).
                let buffer = self.buffer.clone();
                self.pending_ack = Some(tokio::task::spawn_blocking(move || buffer.ack(last_seq)));
                self.next_seq = last_seq + 1;
                self.failures = 0;
                self.metrics
                    .batches
                    .get_or_create(&ResultLabels { result: "acked" })
                    .inc();
                self.metrics.records.inc_by(n as u64);
                let now = Utc::now();
                self.metrics
                    .last_ack_unix_seconds
                    .set(now.timestamp());
                self.metrics.online.set(1);
                self.status.online.store(true, Ordering::Relaxed);
                self.status
                    .last_ack_ms
                    .store(now.timestamp_millis(), Ordering::Relaxed);
                self.status.failures.store(0, Ordering::Relaxed);
                self.status
                    .records_acked
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.status.set_error(None);
                tracing::debug!(first_seq, last_seq, records = n, inserted = ack.inserted,
                    duplicates = ack.duplicates, in_flight = self.in_flight.len(),
                    "batch acknowledged");
                self.apply_desired(&ack, reported_bundle).await;
                if self.split.is_some() {
                    // The refused record is further on: keep halving from here.
                    return Ok(None);
                }
                // Grow while batches are full and well inside the timeout.
                if full && started.elapsed() < self.cfg.request_timeout / 4 {
                    self.batch_records = (self.batch_records * 2).min(self.cfg.batch_max_records);
                    self.batch_bytes = (self.batch_bytes * 2).min(self.cfg.batch_max_bytes);
                }
                self.metrics.batch_records.set(self.batch_records as i64);
                self.status
                    .batch_records
                    .store(self.batch_records as u64, Ordering::Relaxed);
                Ok(if full || !self.in_flight.is_empty() {
                    None
                } else {
                    Some(self.cfg.interval)
                })
            }
            Outcome::Acked(ack) => Ok(Some(self.failure(
                "bad_ack",
                format!(
                    "ack for epoch {} up to {} does not cover the batch (epoch {}, {first_seq}..={last_seq})",
                    ack.epoch,
                    ack.acked_seq,
                    self.buffer.epoch()
                ),
            ))),
            Outcome::Failed { reason, message } => {
                if reason == "timeout" {
                    self.shrink();
                }
                Ok(Some(self.failure(reason, message)))
            }
            // Not a reason to shrink: the control plane did not even read the batch.
            Outcome::Throttled {
                reason,
                message,
                retry_after,
            } => Ok(Some(self.failure_after(reason, message, Some(retry_after)))),
            Outcome::TooLarge { message } if n > 1 => {
                self.shrink();
                self.metrics
                    .failures
                    .get_or_create(&ReasonLabels {
                        reason: "too_large",
                    })
                    .inc();
                tracing::warn!(records = n, batch_records = self.batch_records, %message,
                    "batch too large for the control plane; shrinking");
                Ok(None)
            }
            Outcome::TooLarge { message } => Ok(Some(self.failure(
                "refused_systemic",
                format!("control plane refused (413) a single record as too large: {message}"),
            ))),
            Outcome::Refused {
                code: Some(code),
                message,
                ..
            } if code == error_code::BATCH_TOO_MANY_RECORDS && n > 1 => {
                self.shrink();
                tracing::warn!(records = n, batch_records = self.batch_records, %message,
                    "batch has more records than the control plane takes; shrinking");
                Ok(None)
            }
            Outcome::Refused {
                status,
                code,
                message,
            } => self.refused(records, status, code, message).await,
        }
    }

    /// A batch the control plane will never accept: split it, or move its one record aside.
    async fn refused(
        &mut self,
        records: Vec<Sequenced>,
        status: u16,
        code: Option<String>,
        message: String,
    ) -> Result<Option<Duration>, SyncError> {
        self.metrics
            .batches
            .get_or_create(&ResultLabels { result: "refused" })
            .inc();
        // By the machine-readable code only: any code that does not blame one record
        // (protocol version, structure, encoding, an unknown or missing code) keeps every
        // record and backs off.
        let systemic = !error_code::blames_a_record(code.as_deref())
            || (records.len() == 1
                && matches!(&records[0].record,
                    Record::DeadLetter(d) if d.source == DEAD_LETTER_SOURCE));
        if systemic {
            return Ok(Some(self.failure(
                "refused_systemic",
                format!(
                    "control plane refused ({status} {}) a batch it should accept: {message}",
                    code.as_deref().unwrap_or("no error code")
                ),
            )));
        }
        if records.len() > 1 {
            let half = records.len() / 2;
            tracing::warn!(status, code, %message, records = records.len(), next = half,
                "control plane refused a batch; splitting it to isolate the bad record");
            let until = records.last().map_or(0, |r| r.seq);
            self.split = Some((half.max(1), until));
            return Ok(None);
        }
        let Some(bad) = records.into_iter().next() else {
            return Ok(None);
        };
        let json = serde_json::to_vec(&bad.record).unwrap_or_default();
        let letter = Record::DeadLetter(DeadLetter {
            source: DEAD_LETTER_SOURCE.into(),
            origin: format!(
                "epoch {} seq {} kind {}",
                bad.epoch,
                bad.seq,
                bad.record.kind()
            ),
            reason: format!(
                "control plane refused the record ({status} {}): {message}",
                code.as_deref().unwrap_or_default()
            ),
            // The whole record, not a prefix: it is the only copy once acknowledged below.
            payload_prefix: json,
            ts: Utc::now(),
        });
        let buffer = self.buffer.clone();
        let seq = bad.seq;
        // Dead letter first, then the ack: a crash in between re-isolates the record and
        // writes a second dead letter, never loses the first.
        let letter_seq = tokio::task::spawn_blocking(move || -> Result<u64, BufferError> {
            let s = buffer.append(&letter)?;
            buffer.ack(seq)?;
            Ok(s)
        })
        .await??;
        self.next_seq = seq + 1;
        // Any other bad record in the rest triggers a split of its own.
        self.split = None;
        self.metrics.dead_letters.inc();
        self.status.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::error!(epoch = bad.epoch, seq, kind = %bad.record.kind(), status, %message,
            dead_letter_seq = letter_seq,
            "control plane refused a record for good; moved it aside as a dead letter");
        Ok(None)
    }

    fn shrink(&mut self) {
        self.batch_records = (self.batch_records / 2).max(1);
        self.batch_bytes = (self.batch_bytes / 2).max(MIN_BATCH_BYTES);
        self.metrics.batch_records.set(self.batch_records as i64);
        self.status
            .batch_records
            .store(self.batch_records as u64, Ordering::Relaxed);
    }

    /// Records a failure, switches to the next endpoint and returns the backoff.
    fn failure(&mut self, reason: &'static str, message: String) -> Duration {
        self.failure_after(reason, message, None)
    }

    /// [`Self::failure`]; with `retry_after` (the control plane's `Retry-After`) the wait is
    /// at least that long, capped at `backoff_max`.
    fn failure_after(
        &mut self,
        reason: &'static str,
        message: String,
        retry_after: Option<Duration>,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.metrics
            .batches
            .get_or_create(&ResultLabels { result: "failed" })
            .inc();
        self.metrics
            .failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.metrics.online.set(0);
        self.status.online.store(false, Ordering::Relaxed);
        self.status
            .failures
            .store(u64::from(self.failures), Ordering::Relaxed);
        let failed = self
            .cfg
            .endpoints
            .get(self.endpoint)
            .cloned()
            .unwrap_or_default();
        self.status.set_error(Some(format!("{failed}: {message}")));
        if !self.cfg.endpoints.is_empty() {
            self.endpoint = (self.endpoint + 1) % self.cfg.endpoints.len();
        }
        if let Some(e) = self.cfg.endpoints.get(self.endpoint) {
            self.status.set_endpoint(e);
        }
        let mut delay = Backoff::new(self.cfg.backoff_min, self.cfg.backoff_max)
            .delay_for(self.failures, rand::random::<f64>());
        if let Some(asked) = retry_after {
            delay = delay.max(asked.min(self.cfg.backoff_max));
            self.server_asked_wait = true;
            self.metrics.retry_after_waits.inc();
        }
        tracing::warn!(endpoint = %failed, reason, %message, failures = self.failures,
            retry_in_ms = delay.as_millis() as u64, "sync failed; records stay buffered");
        delay
    }

    async fn refresh_backlog(&self) {
        let buffer = self.buffer.clone();
        if let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || buffer.stats()).await {
            self.metrics
                .backlog_records
                .set(i64::try_from(stats.counts.total()).unwrap_or(i64::MAX));
            self.metrics.backlog_age_seconds.set(
                stats
                    .oldest_unacked_age_ms
                    .map_or(0.0, |ms| ms as f64 / 1000.0),
            );
        }
    }

    /// One batch's request and answer (the heartbeat's; batches go through [`Self::launch`]).
    async fn send(&self, body: Vec<u8>, bundle_sha256: Option<&str>) -> Outcome {
        match self.request(body, bundle_sha256) {
            Ok((req, base)) => exchange(req, &base).await.0,
            Err(outcome) => outcome,
        }
    }

    /// The request of a sync with `body` to the current endpoint (and the endpoint), with the
    /// report headers as they are now.
    fn request(
        &self,
        body: Vec<u8>,
        bundle_sha256: Option<&str>,
    ) -> Result<(reqwest::RequestBuilder, String), Outcome> {
        let Some(base) = self.cfg.endpoints.get(self.endpoint) else {
            return Err(Outcome::Failed {
                reason: "config",
                message: "no endpoint".into(),
            });
        };
        let mut req = self
            .client
            .post(format!("{base}/v1/agent/sync"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::CONTENT_ENCODING, "gzip");
        if let Some(sha) = bundle_sha256 {
            req = req.header(kip_shared::sync::TRUST_BUNDLE_HEADER, sha);
        }
        if let Some(e) = &self.model_error {
            req = req.header(kip_shared::sync::MODEL_ERROR_HEADER, e);
        }
        if let Some(h) = self.update.as_ref().and_then(|u| u.header()) {
            req = req.header(kip_shared::sync::UPDATE_STATUS_HEADER, h);
        }
        if let Some(link) = &self.remote {
            let (applied, error) = link.headers();
            if let Some(v) = applied {
                req = req.header(kip_shared::sync::CONFIG_VERSION_HEADER, v);
            }
            if let Some(e) = error {
                req = req.header(kip_shared::sync::CONFIG_ERROR_HEADER, e);
            }
        }
        Ok((req.body(body), base.clone()))
    }
}

/// Sends `req` (to the endpoint `base`) and reads the answer: the outcome and the HTTP status.
async fn exchange(req: reqwest::RequestBuilder, base: &str) -> (Outcome, Option<u16>) {
    let mut status = None;
    let outcome = answer_of(req, base, &mut status).await;
    (outcome, status)
}

/// [`exchange`]'s outcome; sets `status_seen` once the answer's status is known.
async fn answer_of(
    req: reqwest::RequestBuilder,
    base: &str,
    status_seen: &mut Option<u16>,
) -> Outcome {
    let resp = req.send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) if crate::identity::is_unknown_ca(&e) => {
            return Outcome::Failed {
                reason: "unknown_ca",
                message: crate::identity::IdentityError::UnknownCa {
                    url: base.to_owned(),
                }
                .to_string(),
            };
        }
        Err(e) => {
            let reason = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "network"
            };
            return Outcome::Failed {
                reason,
                message: format!("{e:#}"),
            };
        }
    };
    let status = resp.status().as_u16();
    *status_seen = Some(status);
    let headers = resp.headers().clone();
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => {
            return Outcome::Failed {
                reason: if e.is_timeout() { "timeout" } else { "network" },
                message: format!("reading the answer: {e:#}"),
            };
        }
    };
    if status == 200 {
        return match serde_json::from_slice::<SyncAck>(&bytes) {
            Ok(ack) => Outcome::Acked(Box::new(ack)),
            Err(e) => Outcome::Failed {
                reason: "bad_answer",
                message: format!("answer is not a SyncAck: {e}"),
            },
        };
    }
    let retry_after = matches!(status, 429 | 503)
        .then(|| retry_after(&headers))
        .flatten();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = v["error"]["code"].as_str().map(ToOwned::to_owned);
    let message = v["error"]["message"]
        .as_str()
        .map(ToOwned::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(500).collect());
    if let Some(retry_after) = retry_after {
        return Outcome::Throttled {
            reason: match (status, code.as_deref()) {
                (503, Some(error_code::OVERLOADED)) => "overloaded",
                (503, _) => "server",
                _ => "throttled",
            },
            message: format!(
                "{status}: {message} (Retry-After {} s)",
                retry_after.as_secs()
            ),
            retry_after,
        };
    }
    match status {
        413 => Outcome::TooLarge { message },
        400 | 422 => Outcome::Refused {
            status,
            code,
            message,
        },
        408 | 429 => Outcome::Failed {
            reason: "throttled",
            message: format!("{status}: {message}"),
        },
        401 | 403 | 404 => Outcome::Failed {
            reason: "auth",
            message: format!("{status}: {message}"),
        },
        s if s >= 500 => Outcome::Failed {
            reason: "server",
            message: format!("{status}: {message}"),
        },
        _ => Outcome::Failed {
            reason: "http",
            message: format!("{status}: {message}"),
        },
    }
}

/// The `Retry-After` of an answer, when it is delta seconds (what kip's control plane
/// sends); an HTTP date or garbage is ignored (the plain backoff applies).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Reads up to `max_records` records from `from_seq` and encodes them as a gzip JSON batch.
fn read_and_encode(
    buffer: &Buffer,
    from_seq: u64,
    max_records: usize,
    max_bytes: u64,
    running_model: Option<String>,
    health: Option<HealthSource>,
) -> Result<(Vec<Sequenced>, Vec<u8>), SyncError> {
    let records = buffer.read_range(from_seq, max_records, max_bytes)?;
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok((records, Vec::new()));
    };
    let batch = SyncBatch {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        agent_version: format!("kip-agent {}", crate::self_update::agent_version()),
        epoch: buffer.epoch(),
        first_seq: first.seq,
        last_seq: last.seq,
        records,
        running_model,
        health: health.and_then(|h| h()),
    };
    let body = gzip_json(&batch)?;
    Ok((batch.records, body))
}

/// A batch as gzip JSON (the request body).
fn gzip_json(batch: &SyncBatch) -> Result<Vec<u8>, SyncError> {
    let json = serde_json::to_vec(batch).map_err(std::io::Error::other)?;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&json)?;
    Ok(gz.finish()?)
}

#[cfg(test)]
#[path = "sync_tests.rs"]
mod tests;
