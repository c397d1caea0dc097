//! The agent's crash-safe record buffer, on sled 0.34.
//!
//! Every record the agent produces (reading, gap, dead letter, loss, prediction) is appended
//! here and gets a durable position `(epoch, seq)`; the sync loop reads by sequence range and
//! deletes up to the sequence the control plane acknowledged.
//!
//! # On-disk layout
//!
//! One sled database in the buffer directory (`<state_dir>/buffer`), three trees:
//!
//! - `meta`: `b"format"` -> `u64` big-endian (currently 1, the tree layout; value formats
//!   are per value, below); `b"epoch"` -> `u64` BE;
//!   `b"acked_up_to"` -> `u64` BE, the highest sequence ever acknowledged (0 = none).
//! - `readings`: raw readings, the only evictable kind.
//! - `records`: every other kind (gaps, dead letters, loss records, predictions).
//! - `deliveries`: delivery notes of redeliverable upstream messages (MQTT QoS 1):
//!   `[session bytes][0][id: u16 BE][sha256 digest: 32 bytes]` -> `seq: u64 BE`, the sequence
//!   the message was stored under. The id alone is not unique: a broker with more than 65,535
//!   messages in flight for one client (Mosquitto 2.0.11 on session resume) reuses packet ids
//!   among them, hence the digest in the key.
//! - `delivery_order`: `seq: u64 BE` -> the `deliveries` key noted under that sequence. The
//!   notes form a FIFO of the last [`MAX_DELIVERY_NOTES`] stored deliveries; the oldest are
//!   dropped beyond it (about 100 bytes each before sled's overhead).
//!
//! In both record trees the key is the sequence number as 8 bytes big-endian, so sled's byte
//! order is sequence order and a range scan is a sequence scan. A sequence number lives in
//! exactly one of the two trees; a read merges them. The value is
//! `[format: u8 = 1][kind code: u8][appended_at: i64 BE unix ms][record as JSON]`, or for a
//! record stored with a delivery note ([`Buffer::append_delivered`])
//! `[format: u8 = 2][kind code][appended_at][key length: u32 BE][deliveries key][JSON]`: the
//! kind byte lets the buffer count without decoding; `appended_at` (the agent's clock when the
//! record was appended, not the record's source timestamp) gives the oldest-unacked age; the
//! key lets [`Buffer::open`] restore a note a crash cut off (below). Both formats are read;
//! an agent older than format 2 reads a format-2 value as a dead letter (see the last
//! guarantees), so do not downgrade an agent with unsynced MQTT records in its buffer.
//!
//! # Guarantees
//!
//! - Sequence numbers are strictly increasing within an epoch and never reused for a stored
//!   record, across restarts and crashes. On open the next sequence is one more than the
//!   highest of: any key in either tree and `acked_up_to`. This relies on sled recovering a
//!   prefix of its single log, and on the order of writes: `acked_up_to` is written before the
//!   acknowledged keys are removed, and a loss record (whose sequence is higher than every
//!   evicted one) is written before the evicted readings are removed.
//! - The epoch is written (and flushed) when the database is created, as
//!   `max(now in unix ms, BufferOptions::min_epoch, 1)`, so a buffer recreated from scratch
//!   (state directory wiped, disk replaced) never reuses an `(epoch, seq)` pair as long as the
//!   clock did not go back; a caller that knows the last epoch (e.g. from the control plane)
//!   passes it in `min_epoch` to remove even that assumption.
//! - Writes are batched: [`Buffer::append`] writes into sled's in-memory log buffers and a
//!   flusher calls [`Buffer::flush`] (sled `flush_async`: write + fsync) every
//!   `flush_interval_ms`. sled's own background flusher is disabled, so the flush interval is
//!   the one bound. Loss window:
//!   - clean shutdown: zero loss (the runtime flushes after the writer drained its channel);
//!   - power loss or kernel crash: at most the records appended during the last flush
//!     interval;
//!   - `kill -9` of the agent process alone: every record covered by a completed flush
//!     ([`BufferStats::durable_seq`]) survives; the records appended after the last completed
//!     flush (again at most one flush interval) are still in the process's memory and are
//!     lost with it. "Zero loss after kill -9" therefore holds for every record the buffer
//!     reported as flushed.
//!   - MQTT closes that window (and the power-loss one, when the broker survives it) for its
//!     messages: it acknowledges upstream only once [`Buffer::watch_durable`] covers the
//!     record (see [`crate::ack`]), so the broker redelivers whatever was not durable, and a
//!     redelivery of a message whose record did become durable (acknowledgement not sent
//!     before the crash) finds its delivery note and is acknowledged, not stored again.
//!     OPC UA subscriptions cannot redeliver, so for OPC UA readings the window above stands.
//! - Delivery notes ([`Buffer::append_delivered`]) are durable together with their record or
//!   not at all. The record and its note are separate sled inserts (two trees, not one
//!   atomic write), and a crash in the middle of a flush can cut sled's log between them; so
//!   the record's value carries the note's key (format 2), and on open every record with a
//!   sequence above the last durable note (`delivery_order`'s highest key) that carries a key
//!   gets its note written again (a crash can cut only that tail: notes are written under the
//!   buffer's lock right after their record, hence in sequence order and before any later
//!   acknowledgement or eviction removes a record; the scan is the one open already does to
//!   count). A note is never durable without its record (record first, prefix recovery).
//!   What stays: a redelivery of a message noted more than `max_delivery_notes` deliveries
//!   earlier, plus the extra notes kept while an MQTT source holds a deferred backlog
//!   ([`Buffer::set_delivery_notes_extra`]), is stored again (its note left the FIFO). When
//!   the extra shrinks, at most one note more than is added leaves per append.
//! - [`Buffer::request_flush`] makes the flusher flush before its next tick (the MQTT writer
//!   asks when acknowledgements wait, since brokers cap unacknowledged messages per client);
//!   the interval stays the upper bound.
//! - A failed flush (disk full, I/O error) is counted (`kip_agent_buffer_flush_failures`),
//!   turns `/healthz` red until a flush succeeds, and is retried at the next interval.
//! - A flushed record is never reordered or duplicated by a crash: keys are unique sequence
//!   numbers and recovery keeps a prefix of the log.
//! - Byte cap (`max_bytes`, counted as key + value bytes of stored records; sled's on-disk
//!   size is larger by its own overhead): when an append does not fit, the oldest raw
//!   readings are evicted, in chunks of at least `max_bytes / 64` so that loss records stay
//!   rare. Gaps, dead letters, loss records and predictions are never evicted. Each eviction
//!   is counted (metric `kip_agent_buffer_evicted_records`) and written as a
//!   [`Record::Loss`] naming the evicted sequence range. If nothing evictable is left, the
//!   incoming record is rejected with [`BufferError::Full`]: it still consumes a sequence
//!   number, is counted (`kip_agent_buffer_rejected_records`), and a loss record for it is
//!   written as soon as there is room again (kept in memory until then, so a crash while
//!   full loses that loss record; the counter already showed it).
//! - Records are deleted only by [`Buffer::ack`] (up to and including a sequence) or by
//!   eviction. A stored record that no longer decodes (e.g. written by a newer agent, then
//!   downgraded) is returned by [`Buffer::read_range`] as a dead letter instead of blocking
//!   the stream.
//! - sled allows one process per database: a second open fails with [`BufferError::Locked`].
//!   Within one process sled may hold the lock for a moment after the last handle is dropped
//!   (deferred reclamation of its file handle), so an in-process reopen retries on `Locked`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::source::Delivery;
use chrono::{DateTime, Utc};
use kip_shared::{
    DeadLetter, Loss, Record, RecordKind, Sequenced, record::DEAD_LETTER_PREFIX_BYTES,
};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u64 = 1;
/// Value format of a record without a delivery note.
const VALUE_FORMAT: u8 = 1;
/// Value format of a record stored with a delivery note: it carries the note's key.
const VALUE_FORMAT_DELIVERED: u8 = 2;
const VALUE_HEADER_LEN: usize = 10;
/// Length prefix of the delivery key in a [`VALUE_FORMAT_DELIVERED`] value.
const DELIVERY_KEY_LEN_BYTES: usize = 4;
const KEY_LEN: u64 = 8;
const META_FORMAT: &[u8] = b"format";
const META_EPOCH: &[u8] = b"epoch";
const META_ACKED: &[u8] = b"acked_up_to";
/// Evict at least `max_bytes / EVICT_CHUNK_DIVISOR` bytes at a time (one loss record each).
const EVICT_CHUNK_DIVISOR: u64 = 64;
/// Room kept for the loss record written by an eviction.
const LOSS_RECORD_RESERVE_BYTES: u64 = 512;

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "buffer {path} is in use by another process (sled allows one process at a time); \
         is the agent running?"
    )]
    Locked { path: PathBuf },
    #[error("buffer {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("buffer storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("buffer {path} has format {found}, this agent reads format {FORMAT_VERSION}")]
    Format { path: PathBuf, found: String },
    #[error("cannot encode record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "buffer full ({bytes} of {max_bytes} bytes, nothing evictable): {kind} record with \
         sequence {seq} rejected"
    )]
    Full {
        seq: u64,
        kind: RecordKind,
        bytes: u64,
        max_bytes: u64,
    },
    #[error("cannot acknowledge sequence {requested}: the highest sequence issued is {issued}")]
    AckBeyondEnd { requested: u64, issued: u64 },
}

/// How to open a [`Buffer`].
#[derive(Debug, Clone)]
pub struct BufferOptions {
    /// Byte cap on stored records (keys + values); see the module docs for the policy.
    pub max_bytes: u64,
    /// Lower bound for the epoch of a freshly created buffer (e.g. last epoch the control
    /// plane saw, plus one). Ignored when the buffer already exists.
    pub min_epoch: u64,
    /// sled page cache size; sled's default (1 GiB) is too much for a gateway.
    pub cache_capacity_bytes: u64,
    /// Stored deliveries remembered for redelivery detection ([`MAX_DELIVERY_NOTES`]).
    pub max_delivery_notes: usize,
}

impl BufferOptions {
    /// Options with the given cap and defaults otherwise.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            min_epoch: 0,
            cache_capacity_bytes: 32 * 1024 * 1024,
            max_delivery_notes: MAX_DELIVERY_NOTES,
        }
    }
}

/// Counts per record kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCounts {
    pub reading: u64,
    pub gap: u64,
    pub dead_letter: u64,
    pub loss: u64,
    pub prediction: u64,
    /// Added with the `model_drift` record kind; absent in counts written before it.
    #[serde(default)]
    pub model_drift: u64,
    /// Added with the `model_stats` record kind; absent in counts written before it.
    #[serde(default)]
    pub model_stats: u64,
}

impl KindCounts {
    fn slot(&mut self, kind: RecordKind) -> &mut u64 {
        match kind {
            RecordKind::Reading => &mut self.reading,
            RecordKind::Gap => &mut self.gap,
            RecordKind::DeadLetter => &mut self.dead_letter,
            RecordKind::Loss => &mut self.loss,
            RecordKind::Prediction => &mut self.prediction,
            RecordKind::ModelDrift => &mut self.model_drift,
            RecordKind::ModelStats => &mut self.model_stats,
        }
    }

    /// Count of one kind.
    pub fn get(&self, kind: RecordKind) -> u64 {
        let mut c = *self;
        *c.slot(kind)
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.reading
            + self.gap
            + self.dead_letter
            + self.loss
            + self.prediction
            + self.model_drift
            + self.model_stats
    }
}

/// Where a stored record sits and when it was appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordSummary {
    pub seq: u64,
    pub kind: RecordKind,
    /// The record's own (source) timestamp.
    pub ts: DateTime<Utc>,
    /// The agent's clock when the record was appended.
    pub appended_at: DateTime<Utc>,
}

/// A snapshot of the buffer's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BufferStats {
    pub epoch: u64,
    pub counts: KindCounts,
    /// Stored bytes (keys + values), the quantity capped by `max_bytes`.
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest: Option<RecordSummary>,
    pub newest: Option<RecordSummary>,
    /// Time since the oldest stored (hence unacknowledged) record was appended.
    pub oldest_unacked_age_ms: Option<u64>,
    /// The sequence the next append gets.
    pub next_seq: u64,
    pub acked_up_to: u64,
    /// Every sequence up to this one was covered by a completed flush (this process).
    pub durable_seq: u64,
    pub evicted_records_total: u64,
    pub rejected_records_total: u64,
}

/// Metrics owned by the buffer; [`Buffer::register_metrics`] exposes them.
#[derive(Debug, Clone, Default)]
struct BufferMetrics {
    evicted: Counter,
    rejected: Counter,
    loss_records: Counter,
    flush_failures: Counter,
    bytes: Gauge,
    records: Gauge,
    oldest_unacked_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

#[derive(Debug)]
struct PendingLoss {
    records: u64,
    first_seq: u64,
    last_seq: u64,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    acked_up_to: u64,
    durable_seq: u64,
    bytes: u64,
    counts: KindCounts,
    pending_loss: Option<PendingLoss>,
}

/// The crash-safe buffer; see the module docs. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Buffer {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    readings: sled::Tree,
    records: sled::Tree,
    deliveries: sled::Tree,
    delivery_order: sled::Tree,
    /// Entries in `delivery_order` (sled's `len` is a full scan).
    delivery_count: std::sync::atomic::AtomicUsize,
    max_delivery_notes: usize,
    /// Notes kept beyond `max_delivery_notes` while a broker holds a backlog for the agent
    /// ([`Buffer::set_delivery_notes_extra`]).
    extra_delivery_notes: std::sync::atomic::AtomicUsize,
    epoch: u64,
    max_bytes: u64,
    state: Mutex<State>,
    metrics: BufferMetrics,
    /// False after a failed flush, until one succeeds.
    flush_ok: AtomicBool,
    /// The durable sequence, published by every successful flush (the MQTT acknowledgements
    /// wait on it).
    durable: tokio::sync::watch::Sender<u64>,
    /// Asks [`Buffer::run_flusher`] to flush before its next tick.
    flush_requested: tokio::sync::Notify,
}

fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn key_seq(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, sled::Error> {
    Ok(tree.get(key)?.map(|v| key_seq(&v)))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Encodes a stored value; with `delivery_key` in [`VALUE_FORMAT_DELIVERED`], so that the
/// record and the key of its delivery note are one sled insert (see the module docs).
fn encode(
    record: &Record,
    appended_at_ms: i64,
    delivery_key: Option<&[u8]>,
) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(record)?;
    let key_bytes = delivery_key.map_or(0, |k| DELIVERY_KEY_LEN_BYTES + k.len());
    let mut v = Vec::with_capacity(VALUE_HEADER_LEN + key_bytes + json.len());
    v.push(if delivery_key.is_some() {
        VALUE_FORMAT_DELIVERED
    } else {
        VALUE_FORMAT
    });
    v.push(record.kind().code());
    v.extend_from_slice(&appended_at_ms.to_be_bytes());
    if let Some(k) = delivery_key {
        // A key is a client id (at most 65,535 bytes in MQTT) plus 35 bytes: fits a u32.
        v.extend_from_slice(&u32::try_from(k.len()).unwrap_or(u32::MAX).to_be_bytes());
        v.extend_from_slice(k);
    }
    v.extend_from_slice(&json);
    Ok(v)
}

/// The delivery key (format 2 only) and the JSON body of a stored value; `None` when the
/// format is unknown or the value is cut short.
fn value_parts(value: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    match *value.first()? {
        VALUE_FORMAT => Some((None, value.get(VALUE_HEADER_LEN..)?)),
        VALUE_FORMAT_DELIVERED => {
            let len_end = VALUE_HEADER_LEN + DELIVERY_KEY_LEN_BYTES;
            let len = u32::from_be_bytes(value.get(VALUE_HEADER_LEN..len_end)?.try_into().ok()?);
            let key_end = len_end.checked_add(usize::try_from(len).ok()?)?;
            Some((Some(value.get(len_end..key_end)?), value.get(key_end..)?))
        }
        _ => None,
    }
}

/// The kind byte of a stored value; unknown kinds count as dead letters (that is how they
/// are read back).
fn value_kind(value: &[u8]) -> RecordKind {
    value
        .get(1)
        .and_then(|c| RecordKind::from_code(*c))
        .unwrap_or(RecordKind::DeadLetter)
}

fn value_appended_at(value: &[u8]) -> DateTime<Utc> {
    let ms = value
        .get(2..VALUE_HEADER_LEN)
        .map(|b| key_seq(b) as i64)
        .unwrap_or(0);
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Decodes a stored value; one that does not decode becomes a dead letter so it cannot block
/// the stream.
fn decode(seq: u64, value: &[u8]) -> Record {
    let appended_at = value_appended_at(value);
    let parts = value_parts(value);
    let reason = match parts {
        None => format!(
            "stored value format {:?} unknown or value cut short",
            value.first()
        ),
        Some((_, json)) => match serde_json::from_slice::<Record>(json) {
            Ok(r) => return r,
            Err(e) => format!("stored record does not decode: {e}"),
        },
    };
    let body = parts.map_or_else(|| value.get(VALUE_HEADER_LEN..).unwrap_or(value), |p| p.1);
    Record::DeadLetter(DeadLetter {
        source: "buffer".into(),
        origin: format!("seq {seq}"),
        reason,
        payload_prefix: body[..body.len().min(DEAD_LETTER_PREFIX_BYTES)].to_vec(),
        ts: appended_at,
    })
}

/// How many stored deliveries are remembered for redelivery detection. A redelivery of a
/// message stored more deliveries ago than this is stored again (a duplicate, never a loss).
/// Covers what can be stored but unacknowledged at once: the writer's pending
/// acknowledgements (`queue_capacity_records`) plus rumqttc's request queue (65,536).
pub const MAX_DELIVERY_NOTES: usize = 1 << 18;

fn delivery_key(d: &Delivery) -> Vec<u8> {
    let mut k = Vec::with_capacity(d.session.len() + 35);
    k.extend_from_slice(d.session.as_bytes());
    k.push(0);
    k.extend_from_slice(&d.id.to_be_bytes());
    k.extend_from_slice(&d.digest);
    k
}

fn entry_bytes(value: &[u8]) -> u64 {
    KEY_LEN + value.len() as u64
}

impl Buffer {
    /// Opens (or creates) the buffer in directory `dir`.
    pub fn open(dir: &Path, opts: BufferOptions) -> Result<Self, BufferError> {
        let path = dir.to_owned();
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity_bytes)
            // The agent's flusher is the only one, so the loss window is flush_interval_ms.
            .flush_every_ms(None)
            .open()
            .map_err(|source| match &source {
                sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                    BufferError::Locked { path: path.clone() }
                }
                _ => BufferError::Open {
                    path: path.clone(),
                    source,
                },
            })?;
        let meta = db.open_tree("meta")?;
        let readings = db.open_tree("readings")?;
        let records = db.open_tree("records")?;
        let deliveries = db.open_tree("deliveries")?;
        let delivery_order = db.open_tree("delivery_order")?;

        let epoch = match read_u64(&meta, META_EPOCH)? {
            Some(e) => {
                let format = read_u64(&meta, META_FORMAT)?;
                if format != Some(FORMAT_VERSION) {
                    return Err(BufferError::Format {
                        path,
                        found: format.map_or_else(|| "none".into(), |f| f.to_string()),
                    });
                }
                e
            }
            None => {
                // Fresh buffer (or one that never got its epoch durable, hence holds nothing
                // durable either): a new epoch, made durable before any record.
                let epoch = u64::try_from(now_ms())
                    .unwrap_or(0)
                    .max(opts.min_epoch)
                    .max(1);
                meta.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
                meta.insert(META_EPOCH, &epoch.to_be_bytes())?;
                db.flush()?;
                epoch
            }
        };
        let acked_up_to = read_u64(&meta, META_ACKED)?.unwrap_or(0);

        let mut counts = KindCounts::default();
        let mut bytes = 0;
        let mut max_seq = acked_up_to;
        // Notes are written in sequence order right after their records, so only records
        // above the last durable note can have lost theirs in a crash.
        let last_noted = delivery_order.last()?.map_or(0, |(k, _)| key_seq(&k));
        let mut unnoted = Vec::new();
        for tree in [&readings, &records] {
            for item in tree.iter() {
                let (k, v) = item?;
                *counts.slot(value_kind(&v)) += 1;
                bytes += entry_bytes(&v);
                let seq = key_seq(&k);
                max_seq = max_seq.max(seq);
                if seq > last_noted
                    && let Some((Some(key), _)) = value_parts(&v)
                {
                    unnoted.push((seq, key.to_vec()));
                }
            }
        }
        unnoted.sort_unstable_by_key(|(seq, _)| *seq);
        let metrics = BufferMetrics::default();
        metrics.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        metrics
            .records
            .set(i64::try_from(counts.total()).unwrap_or(i64::MAX));
        let buffer = Self {
            path,
            db,
            meta,
            readings,
            records,
            deliveries,
            delivery_count: std::sync::atomic::AtomicUsize::new(delivery_order.len()),
            delivery_order,
            max_delivery_notes: opts.max_delivery_notes.max(1),
            extra_delivery_notes: std::sync::atomic::AtomicUsize::new(0),
            epoch,
            max_bytes: opts.max_bytes,
            state: Mutex::new(State {
                next_seq: max_seq + 1,
                acked_up_to,
                // Everything recovered from disk is durable.
                durable_seq: max_seq,
                bytes,
                counts,
                pending_loss: None,
            }),
            metrics,
            flush_ok: AtomicBool::new(true),
            durable: tokio::sync::watch::Sender::new(max_seq),
            flush_requested: tokio::sync::Notify::new(),
        };
        if let Some((first_seq, _)) = unnoted.first() {
            tracing::info!(
                notes = unnoted.len(),
                first_seq,
                "restoring delivery notes cut off by a crash"
            );
        }
        for (seq, key) in unnoted {
            buffer.note_delivery(seq, &key)?;
        }
        Ok(buffer)
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This buffer's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Registers the buffer's counters and gauges (`kip_agent_buffer_*` under a `kip_agent`
    /// prefixed registry).
    pub fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "buffer_evicted_records",
            "Raw readings evicted because the buffer was full",
            m.evicted.clone(),
        );
        registry.register(
            "buffer_rejected_records",
            "Records rejected because the buffer was full and nothing was evictable",
            m.rejected.clone(),
        );
        registry.register(
            "buffer_loss_records",
            "Loss records written by the buffer",
            m.loss_records.clone(),
        );
        registry.register(
            "buffer_flush_failures",
            "Flushes (write + fsync) that failed; the data stays in memory for the next one",
            m.flush_failures.clone(),
        );
        registry.register(
            "buffer_bytes",
            "Bytes of stored records (keys + values)",
            m.bytes.clone(),
        );
        registry.register(
            "buffer_records",
            "Records stored (unacknowledged)",
            m.records.clone(),
        );
        registry.register(
            "buffer_oldest_unacked_age_seconds",
            "Time since the oldest unacknowledged record was appended (0 when empty)",
            m.oldest_unacked_age_seconds.clone(),
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave sled inconsistent (sled is the truth
        // and counters are advisory), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tree_for(&self, kind: RecordKind) -> &sled::Tree {
        if kind == RecordKind::Reading {
            &self.readings
        } else {
            &self.records
        }
    }

    fn publish_gauges(&self, st: &State) {
        self.metrics
            .bytes
            .set(i64::try_from(st.bytes).unwrap_or(i64::MAX));
        self.metrics
            .records
            .set(i64::try_from(st.counts.total()).unwrap_or(i64::MAX));
    }

    /// Stores `record` under a fresh sequence number, evicting old readings when full.
    ///
    /// Returns the sequence number; on [`BufferError::Full`] the record was not stored (a
    /// loss record will describe it).
    pub fn append(&self, record: &Record) -> Result<u64, BufferError> {
        self.append_locked(&mut self.lock(), record, None)
    }

    /// [`Buffer::append`] under the held lock; `delivery_key` goes into the stored value.
    fn append_locked(
        &self,
        st: &mut State,
        record: &Record,
        delivery_key: Option<&[u8]>,
    ) -> Result<u64, BufferError> {
        let now = now_ms();
        self.write_pending_loss(st, now)?;
        let kind = record.kind();
        let value = encode(record, now, delivery_key)?;
        let size = entry_bytes(&value);
        if st.bytes + size > self.max_bytes {
            self.evict(st, size, now)?;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        if st.bytes + size > self.max_bytes {
            self.metrics.rejected.inc();
            let p = st.pending_loss.get_or_insert(PendingLoss {
                records: 0,
                first_seq: seq,
                last_seq: seq,
            });
            p.records += 1;
            p.last_seq = seq;
            return Err(BufferError::Full {
                seq,
                kind,
                bytes: st.bytes,
                max_bytes: self.max_bytes,
            });
        }
        self.insert(st, seq, kind, &value)?;
        Ok(seq)
    }

    /// Appends `record` like [`Buffer::append`], then notes `delivery` as stored under the
    /// returned sequence, so that a redelivery of the same message can be recognised
    /// ([`Buffer::delivered`]) after a disconnect or a crash.
    pub fn append_delivered(
        &self,
        record: &Record,
        delivery: &Delivery,
    ) -> Result<u64, BufferError> {
        let key = delivery_key(delivery);
        // The lock is held until the note is written, so notes reach sled's log in sequence
        // order and before any later ack or eviction: what `open` relies on to restore them.
        let mut st = self.lock();
        // The record carries the key: a record is never durable without what its note needs.
        let seq = self.append_locked(&mut st, record, Some(&key))?;
        self.note_delivery(seq, &key)?;
        Ok(seq)
    }

    /// Stores `record` with its delivery key but without writing the note: the state a crash
    /// leaves when it cuts sled's log between a record and its note.
    #[cfg(test)]
    fn append_delivered_torn(
        &self,
        record: &Record,
        delivery: &Delivery,
    ) -> Result<u64, BufferError> {
        self.append_locked(&mut self.lock(), record, Some(&delivery_key(delivery)))
    }

    /// Keeps `extra` notes beyond `max_delivery_notes` (the MQTT sources' deferred backlog:
    /// a stored message the broker sends again comes back behind it). When `extra` shrinks,
    /// the window shrinks by at most one note per new note, so no single append pays for it.
    pub fn set_delivery_notes_extra(&self, extra: usize) {
        self.extra_delivery_notes.store(extra, Ordering::Relaxed);
    }

    /// Writes the delivery note `key` -> `seq` (after its record), then drops the oldest
    /// notes beyond `max_delivery_notes` plus the extra ones (at most two per call).
    fn note_delivery(&self, seq: u64, key: &[u8]) -> Result<(), BufferError> {
        self.deliveries.insert(key, &seq.to_be_bytes())?;
        self.delivery_order.insert(seq_key(seq), key)?;
        let mut count = self.delivery_count.fetch_add(1, Ordering::Relaxed) + 1;
        let window = self
            .max_delivery_notes
            .saturating_add(self.extra_delivery_notes.load(Ordering::Relaxed));
        let mut budget = 2;
        while count > window && budget > 0 {
            budget -= 1;
            let Some((k, old_key)) = self.delivery_order.pop_min()? else {
                break;
            };
            count = self.delivery_count.fetch_sub(1, Ordering::Relaxed) - 1;
            // Only if no later delivery refreshed the note.
            let _ = self
                .deliveries
                .compare_and_swap(&old_key, Some(k), None as Option<&[u8]>)?;
        }
        Ok(())
    }

    /// The sequence under which the message `delivery` describes (same session, id and
    /// digest) was stored, if it is among the remembered deliveries.
    pub fn delivered(&self, delivery: &Delivery) -> Result<Option<u64>, BufferError> {
        Ok(self
            .deliveries
            .get(delivery_key(delivery))?
            .map(|v| key_seq(&v)))
    }

    /// How many delivery notes are kept (all sessions).
    pub fn delivery_notes(&self) -> usize {
        self.delivery_count.load(Ordering::Relaxed)
    }

    fn insert(
        &self,
        st: &mut State,
        seq: u64,
        kind: RecordKind,
        value: &[u8],
    ) -> Result<(), BufferError> {
        self.tree_for(kind).insert(seq_key(seq), value)?;
        st.bytes += entry_bytes(value);
        *st.counts.slot(kind) += 1;
        self.publish_gauges(st);
        Ok(())
    }

    /// Writes the loss record for rejected appends once it fits.
    fn write_pending_loss(&self, st: &mut State, now: i64) -> Result<(), BufferError> {
        let Some(p) = &st.pending_loss else {
            return Ok(());
        };
        let loss = Record::Loss(Loss {
            records: p.records,
            first_seq: p.first_seq,
            last_seq: p.last_seq,
            reason: format!(
                "buffer full (max_bytes = {}) with nothing evictable: records rejected",
                self.max_bytes
            ),
            ts: DateTime::from_timestamp_millis(now).unwrap_or_default(),
        });
        let value = encode(&loss, now, None)?;
        if st.bytes + entry_bytes(&value) > self.max_bytes {
            return Ok(());
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        self.insert(st, seq, RecordKind::Loss, &value)?;
        self.metrics.loss_records.inc();
        st.pending_loss = None;
        Ok(())
    }

    /// Evicts the oldest readings to make room for `incoming` bytes, then records the loss.
    fn evict(&self, st: &mut State, incoming: u64, now: i64) -> Result<(), BufferError> {
        let overflow = (st.bytes + incoming).saturating_sub(self.max_bytes);
        let want = (overflow + LOSS_RECORD_RESERVE_BYTES).max(self.max_bytes / EVICT_CHUNK_DIVISOR);
        let mut victims = Vec::new();
        let mut freed = 0;
        for item in self.readings.iter() {
            if freed >= want {
                break;
            }
            let (k, v) = item?;
            freed += entry_bytes(&v);
            victims.push((key_seq(&k), entry_bytes(&v)));
        }
        let (Some(&(first_seq, _)), Some(&(last_seq, _))) = (victims.first(), victims.last())
        else {
            return Ok(());
        };
        let n = victims.len() as u64;
        // The loss record goes first: its sequence is above every victim's, so it keeps the
        // recovered next sequence above them even if the process dies mid-way.
        let loss = Record::Loss(Loss {
            records: n,
            first_seq,
            last_seq,
            reason: format!(
                "buffer full (max_bytes = {}): evicted the oldest raw readings",
                self.max_bytes
            ),
            ts: DateTime::from_timestamp_millis(now).unwrap_or_default(),
        });
        let value = encode(&loss, now, None)?;
        let seq = st.next_seq;
        st.next_seq += 1;
        self.records.insert(seq_key(seq), value.as_slice())?;
        st.bytes += entry_bytes(&value);
        st.counts.loss += 1;
        let mut batch = sled::Batch::default();
        for (s, _) in &victims {
            batch.remove(&seq_key(*s));
        }
        self.readings.apply_batch(batch)?;
        st.bytes -= freed;
        st.counts.reading -= n;
        self.metrics.evicted.inc_by(n);
        self.metrics.loss_records.inc();
        self.publish_gauges(st);
        tracing::warn!(
            evicted = n,
            first_seq,
            last_seq,
            max_bytes = self.max_bytes,
            "buffer full: evicted oldest readings"
        );
        Ok(())
    }

    /// Up to `max_records` records with `seq >= from_seq`, in sequence order, stopping before
    /// `max_bytes` (stored size) would be exceeded, but always returning at least one record
    /// when there is one, so a large record cannot stall the reader.
    pub fn read_range(
        &self,
        from_seq: u64,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Vec<Sequenced>, BufferError> {
        let mut a = self.readings.range(seq_key(from_seq)..).peekable();
        let mut b = self.records.range(seq_key(from_seq)..).peekable();
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max_records {
            let next_a = a.peek().map(|r| r.as_ref().map(|(k, _)| key_seq(k)));
            let next_b = b.peek().map(|r| r.as_ref().map(|(k, _)| key_seq(k)));
            let from_a = match (next_a, next_b) {
                (None, None) => break,
                (Some(Err(_)), _) | (Some(Ok(_)), None) => true,
                (_, Some(Err(_))) | (None, Some(Ok(_))) => false,
                (Some(Ok(x)), Some(Ok(y))) => x < y,
            };
            let item = if from_a { a.next() } else { b.next() };
            let Some(item) = item else { break };
            let (k, v) = item?;
            let size = entry_bytes(&v);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            let seq = key_seq(&k);
            out.push(Sequenced {
                epoch: self.epoch,
                seq,
                record: decode(seq, &v),
            });
        }
        Ok(out)
    }

    /// The newest `n` records, in sequence order.
    pub fn read_newest(&self, n: usize) -> Result<Vec<Sequenced>, BufferError> {
        let mut entries = Vec::with_capacity(2 * n);
        for tree in [&self.readings, &self.records] {
            for item in tree.iter().rev().take(n) {
                entries.push(item?);
            }
        }
        entries.sort_by_key(|(k, _)| key_seq(k));
        let skip = entries.len().saturating_sub(n);
        Ok(entries
            .into_iter()
            .skip(skip)
            .map(|(k, v)| {
                let seq = key_seq(&k);
                Sequenced {
                    epoch: self.epoch,
                    seq,
                    record: decode(seq, &v),
                }
            })
            .collect())
    }

    /// Deletes every record with `seq <= up_to_seq`; returns how many were deleted.
    /// Acknowledging an already acknowledged sequence is a no-op.
    pub fn ack(&self, up_to_seq: u64) -> Result<u64, BufferError> {
        let mut st = self.lock();
        if up_to_seq >= st.next_seq {
            return Err(BufferError::AckBeyondEnd {
                requested: up_to_seq,
                issued: st.next_seq - 1,
            });
        }
        if up_to_seq <= st.acked_up_to {
            return Ok(0);
        }
        // Written before the removals so a recovered buffer never reissues these sequences.
        self.meta.insert(META_ACKED, &up_to_seq.to_be_bytes())?;
        st.acked_up_to = up_to_seq;
        let mut deleted = 0;
        for tree in [&self.readings, &self.records] {
            let mut batch = sled::Batch::default();
            for item in tree.range(..=seq_key(up_to_seq)) {
                let (k, v) = item?;
                st.bytes -= entry_bytes(&v);
                *st.counts.slot(value_kind(&v)) -= 1;
                deleted += 1;
                batch.remove(k);
            }
            tree.apply_batch(batch)?;
        }
        self.publish_gauges(&st);
        self.write_pending_loss(&mut st, now_ms())?;
        Ok(deleted)
    }

    /// Makes every record appended so far durable (sled `flush_async`: write + fsync).
    /// Returns the highest sequence now covered.
    pub async fn flush(&self) -> Result<u64, BufferError> {
        let upto = self.lock().next_seq - 1;
        let flushed = self.db.flush_async().await;
        self.note_flush(flushed.is_ok());
        flushed?;
        self.mark_durable(upto);
        Ok(upto)
    }

    /// Blocking variant of [`Buffer::flush`], for synchronous callers.
    pub fn flush_blocking(&self) -> Result<u64, BufferError> {
        let upto = self.lock().next_seq - 1;
        let flushed = self.db.flush();
        self.note_flush(flushed.is_ok());
        flushed?;
        self.mark_durable(upto);
        Ok(upto)
    }

    fn mark_durable(&self, upto: u64) {
        let durable = {
            let mut st = self.lock();
            st.durable_seq = st.durable_seq.max(upto);
            st.durable_seq
        };
        // Monotonic even when two flushes finish out of order.
        self.durable.send_if_modified(|d| {
            let changed = *d < durable;
            *d = (*d).max(durable);
            changed
        });
    }

    /// Watches the durable sequence: every sequence up to the watched value was covered by a
    /// completed flush. It only grows; a failed flush leaves it where it was.
    pub fn watch_durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Asks the flusher ([`Buffer::run_flusher`]) to flush now instead of at its next tick.
    /// Requests made while a flush runs coalesce into one more flush.
    pub fn request_flush(&self) {
        self.flush_requested.notify_one();
    }

    fn note_flush(&self, ok: bool) {
        if !ok {
            self.metrics.flush_failures.inc();
        }
        self.flush_ok.store(ok, Ordering::Relaxed);
    }

    /// False when the last flush failed (e.g. disk full): new records are not durable.
    pub fn last_flush_ok(&self) -> bool {
        self.flush_ok.load(Ordering::Relaxed)
    }

    fn summary(&self, entry: Option<(sled::IVec, sled::IVec)>) -> Option<RecordSummary> {
        let (k, v) = entry?;
        let seq = key_seq(&k);
        let record = decode(seq, &v);
        Some(RecordSummary {
            seq,
            kind: record.kind(),
            ts: record.ts(),
            appended_at: value_appended_at(&v),
        })
    }

    /// A snapshot of counts, bytes, oldest/newest records and counters.
    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let st = self.lock();
        let first = |t: &sled::Tree| t.first();
        let last = |t: &sled::Tree| t.last();
        let pick = |a: Option<(sled::IVec, sled::IVec)>,
                    b: Option<(sled::IVec, sled::IVec)>,
                    oldest: bool| match (a, b) {
            (Some(x), Some(y)) => {
                if (key_seq(&x.0) < key_seq(&y.0)) == oldest {
                    Some(x)
                } else {
                    Some(y)
                }
            }
            (x, None) => x,
            (None, y) => y,
        };
        let oldest = self.summary(pick(first(&self.readings)?, first(&self.records)?, true));
        let newest = self.summary(pick(last(&self.readings)?, last(&self.records)?, false));
        let oldest_unacked_age_ms = oldest
            .as_ref()
            .map(|o| u64::try_from((Utc::now() - o.appended_at).num_milliseconds()).unwrap_or(0));
        self.metrics
            .oldest_unacked_age_seconds
            .set(oldest_unacked_age_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        Ok(BufferStats {
            epoch: self.epoch,
            counts: st.counts,
            bytes: st.bytes,
            max_bytes: self.max_bytes,
            oldest,
            newest,
            oldest_unacked_age_ms,
            next_seq: st.next_seq,
            acked_up_to: st.acked_up_to,
            durable_seq: st.durable_seq,
            evicted_records_total: self.metrics.evicted.get(),
            rejected_records_total: self.metrics.rejected.get(),
        })
    }

    /// Flushes every `interval`, and whenever [`Buffer::request_flush`] asks, until `cancel`
    /// fires, then once more. Run it on the runtime's tracker; a failed flush is logged and
    /// retried at the next tick or request (sled keeps the data).
    pub async fn run_flusher(
        &self,
        interval: Duration,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.flush().await {
                        tracing::error!(error = %e, "buffer flush failed; retrying next interval");
                    }
                }
                () = self.flush_requested.notified() => {
                    if let Err(e) = self.flush().await {
                        tracing::error!(error = %e, "requested buffer flush failed");
                    }
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final buffer flush failed");
        }
    }
}

#[cfg(test)]
mod tests;
