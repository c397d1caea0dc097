//! The agent's crash-safe record buffer: append-only segment logs owned by kip.
//!
//! Every record the agent produces (reading, gap, dead letter, loss, prediction) is appended
//! here and gets a durable position `(epoch, seq)`; the sync loop reads by sequence range and
//! deletes up to the sequence the control plane acknowledged.
//!
//! # On-disk layout
//!
//! In the buffer directory (`<state_dir>/buffer`):
//!
//! - `meta`: `format 2`, `epoch N`, `acked_up_to N` (the highest sequence ever acknowledged,
//!   0 = none), `evicted_up_to N` (the highest evicted reading), one per line; replaced
//!   atomically (temporary file, fsync, rename, fsync of the directory).
//! - `readings/<first seq>.log`: raw readings, the only evictable kind.
//! - `records/<first seq>.log`: every other kind (gaps, dead letters, loss records,
//!   predictions, model statistics).
//! - `notes.log`: delivery notes of redeliverable upstream messages (MQTT QoS 1); see
//!   [`notes`]. The notes form a FIFO of the last [`MAX_DELIVERY_NOTES`] stored deliveries
//!   (20 bytes each on disk, 40 to 65 in memory: at most 17 MB at the default).
//! - `lock`: held (`flock`) by the process that has the buffer open.
//!
//! Each log is a series of segment files of `segment_bytes` (`max_bytes / 16`, between
//! 1 KiB and 8 MiB), framed and checksummed ([`segments`]). A sequence number lives in
//! exactly one of the two logs; a read merges them. The frame's value is
//! `[format: u8 = 1][kind code: u8][appended_at: i64 BE unix ms][record as JSON]`, or for a
//! record stored with a delivery note ([`Buffer::append_delivered`])
//! `[format: u8 = 2][kind code][appended_at][key length: u32 BE][delivery key][JSON]`; the
//! delivery key is `[session bytes][0][id: u16 BE][sha256 digest: 32 bytes]` (the id alone is
//! not unique: a broker with more than 65,535 messages in flight for one client reuses packet
//! ids among them, hence the digest). The kind byte lets the buffer count without decoding;
//! `appended_at` (the agent's clock at append, not the record's source timestamp) gives the
//! oldest-unacked age; the key lets [`Buffer::open`] restore a note a crash cut off.
//!
//! An agent that finds a sled 0.34 buffer (format 1, what agents before this layout wrote)
//! copies it into this layout on open and removes the sled files ([`legacy`]).
//!
//! # Disk footprint
//!
//! Deletion (acknowledgement, eviction) is a prefix of each log, so a segment is unlinked once
//! all its records are deleted and the mark saying so is durable: at the next flush after an
//! acknowledgement, at once after an eviction. On disk therefore (at every flush): the live records (at most
//! `max_bytes` plus [`LOSS_RECORD_RESERVE_BYTES`], counted as frame bytes), plus in each of
//! the two logs the deleted head of its oldest segment (less than one segment plus one
//! record), plus `notes.log` (at most 1.25 x `max_delivery_notes` x 20 bytes, 6.6 MB at the
//! default), plus `meta` and `lock`. Bound: `max_bytes + 2 x segment_bytes + notes`; for the
//! default 512 MiB cap that is 16 MiB of segments over the cap, for 20 MiB it is 2.5 MiB.
//!
//! # Guarantees
//!
//! - Sequence numbers are strictly increasing within an epoch and never reused for a stored
//!   record, across restarts and crashes. On open the next sequence is one more than the
//!   highest of: any frame in either log, `acked_up_to` and `evicted_up_to`. Segments are
//!   unlinked only after the mark that deletes them is durable in `meta`, and a loss record
//!   (whose sequence is above every evicted one) is made durable before its eviction mark is.
//! - The epoch is written (and synced) when the buffer is created, as
//!   `max(now in unix ms, BufferOptions::min_epoch, 1)`, so a buffer recreated from scratch
//!   (state directory wiped, disk replaced) never reuses an `(epoch, seq)` pair as long as the
//!   clock did not go back; a caller that knows the last epoch (e.g. from the control plane)
//!   passes it in `min_epoch` to remove even that assumption.
//! - Writes are batched: [`Buffer::append`] adds a frame to an in-memory chunk (written to the
//!   segment file at 64 KiB, and before every read) and a flusher calls [`Buffer::flush`]
//!   (write + `fdatasync` of the segments written since the last flush, and of the directory
//!   when a segment was created) every `flush_interval_ms`. Loss window:
//!   - clean shutdown: zero loss (the runtime flushes after the writer drained its channel);
//!   - power loss or kernel crash: at most the records appended during the last flush
//!     interval;
//!   - `kill -9` of the agent process alone: every record covered by a completed flush
//!     ([`BufferStats::durable_seq`]) survives; records appended after it may still be in the
//!     process's memory and are lost with it (at most one flush interval, and one 64 KiB
//!     chunk). "Zero loss after kill -9" therefore holds for every record the buffer reported
//!     as flushed.
//!   - MQTT closes that window (and the power-loss one, when the broker survives it) for its
//!     messages: it acknowledges upstream only once [`Buffer::watch_durable`] covers the
//!     record (see [`crate::ack`]), so the broker redelivers whatever was not durable, and a
//!     redelivery of a message whose record did become durable (acknowledgement not sent
//!     before the crash) finds its delivery note and is acknowledged, not stored again.
//!     OPC UA subscriptions cannot redeliver, so for OPC UA readings the window above stands.
//! - Recovery: on open each segment is scanned and cut at its first torn or corrupt frame
//!   (length past the end, checksum mismatch); every frame a completed flush covered lies
//!   before it. Recovered segments are synced, so everything recovered counts as durable.
//! - Delivery notes ([`Buffer::append_delivered`]) are durable together with their record or
//!   not at all: a note goes to `notes.log` only after a flush made its record durable, and
//!   the record's value carries the note's key (format 2), so on open every record with a
//!   sequence above the last durable note that carries a key gets its note back. What stays:
//!   a redelivery of a message noted more than `max_delivery_notes` deliveries earlier, plus
//!   the extra notes the MQTT sources pin ([`Buffer::set_delivery_notes_extra`]), is stored
//!   again (its note left the FIFO). When
//!   the extra shrinks, at most one note more than is added leaves per append.
//! - [`Buffer::request_flush`] makes the flusher flush before its next tick (the MQTT writer
//!   asks when acknowledgements wait, since brokers cap unacknowledged messages per client);
//!   the interval stays the upper bound.
//! - A failed flush (disk full, I/O error) is counted (`kip_agent_buffer_flush_failures`),
//!   turns `/healthz` red until a flush succeeds, and is retried at the next interval. Frames
//!   the file refused stay in memory up to 4 MiB; past that appends fail with
//!   [`BufferError::Io`] (the record is not stored and gets no sequence).
//! - A flushed record is never reordered or duplicated by a crash: sequences in a log only
//!   increase and recovery keeps a prefix of each segment.
//! - Byte cap (`max_bytes`, counted as frame bytes: 16 bytes of header plus the value): when
//!   an append does not fit, the oldest raw readings are evicted, in chunks of at least
//!   `max_bytes / 64` so that loss records stay rare. Gaps, dead letters, loss records and
//!   predictions are never evicted. Each eviction is counted (metric
//!   `kip_agent_buffer_evicted_records`) and written as a [`Record::Loss`] naming the evicted
//!   sequence range. If nothing evictable is left, the incoming record is rejected with
//!   [`BufferError::Full`]: it still consumes a sequence number, is counted
//!   (`kip_agent_buffer_rejected_records`), and a loss record for it is written as soon as
//!   there is room again (kept in memory until then, so a crash while full loses that loss
//!   record; the counter already showed it).
//! - Records are deleted only by [`Buffer::ack`] (up to and including a sequence) or by
//!   eviction. A stored record that no longer decodes (e.g. written by a newer agent, then
//!   downgraded) is returned by [`Buffer::read_range`] as a dead letter instead of blocking
//!   the stream.
//! - One process per buffer: a second open fails with [`BufferError::Locked`] (`flock` on
//!   `lock`, released when the buffer is dropped).
//! - Memory: a sparse index per segment (one entry per 64 KiB), the delivery notes, and
//!   unwritten frames (64 KiB per log); reads go to the files.

mod legacy;
mod notes;
mod segments;
/// The sled buffer as it was (format 1): fixtures for the upgrade test, the reference of the
/// `buffer_footprint` bench.
#[cfg(any(test, feature = "bench-reference"))]
#[doc(hidden)]
pub mod sled_v1;

use std::{
    fs::File,
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

use notes::Notes;
pub use segments::value_kind;
use segments::{FRAME_HEADER_LEN, Frame, Log};

const FORMAT_VERSION: u64 = 2;
/// Value format of a record without a delivery note.
const VALUE_FORMAT: u8 = 1;
/// Value format of a record stored with a delivery note: it carries the note's key.
const VALUE_FORMAT_DELIVERED: u8 = 2;
const VALUE_HEADER_LEN: usize = 10;
/// Length prefix of the delivery key in a [`VALUE_FORMAT_DELIVERED`] value.
const DELIVERY_KEY_LEN_BYTES: usize = 4;
/// Evict at least `max_bytes / EVICT_CHUNK_DIVISOR` bytes at a time (one loss record each).
const EVICT_CHUNK_DIVISOR: u64 = 64;
/// Room kept for the loss record written by an eviction.
const LOSS_RECORD_RESERVE_BYTES: u64 = 512;
const META_FILE: &str = "meta";
const LOCK_FILE: &str = "lock";
const READINGS_DIR: &str = "readings";
const RECORDS_DIR: &str = "records";
const NOTES_FILE: &str = "notes.log";
/// Segment size bounds; between them a segment is `max_bytes / SEGMENTS_PER_CAP`.
const SEGMENT_MIN_BYTES: u64 = 1024;
const SEGMENT_MAX_BYTES: u64 = 8 * 1024 * 1024;
const SEGMENTS_PER_CAP: u64 = 16;

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error(
        "buffer {path} is in use by another process (one process at a time); is the agent \
         running?"
    )]
    Locked { path: PathBuf },
    #[error("buffer {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    /// Reading a sled buffer being upgraded.
    #[error("buffer storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("buffer I/O error: {0}")]
    Io(#[from] std::io::Error),
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
    /// Byte cap on stored records (frame bytes); see the module docs for the policy.
    pub max_bytes: u64,
    /// Lower bound for the epoch of a freshly created buffer (e.g. last epoch the control
    /// plane saw, plus one). Ignored when the buffer already exists.
    pub min_epoch: u64,
    /// sled page cache size, used only to read a sled buffer being upgraded ([`legacy`]).
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
            cache_capacity_bytes: 8 * 1024 * 1024,
            max_delivery_notes: MAX_DELIVERY_NOTES,
        }
    }

    /// Size of one segment file for this cap.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / SEGMENTS_PER_CAP).clamp(SEGMENT_MIN_BYTES, SEGMENT_MAX_BYTES)
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

fn key_seq(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = key.len().min(8);
    b[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(b)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Encodes a stored value; with `delivery_key` in [`VALUE_FORMAT_DELIVERED`], so that the
/// record carries the key of its delivery note (see the module docs).
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
    FRAME_HEADER_LEN + value.len() as u64
}

/// What `meta` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    epoch: u64,
    acked_up_to: u64,
    evicted_up_to: u64,
}

impl Meta {
    fn read(dir: &Path) -> Result<Option<Self>, BufferError> {
        let text = match std::fs::read_to_string(dir.join(META_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let bad = |found: String| BufferError::Format {
            path: dir.to_owned(),
            found,
        };
        let mut fields = std::collections::HashMap::new();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(' ') else {
                return Err(bad(format!("unreadable meta line {line:?}")));
            };
            let v: u64 = v
                .parse()
                .map_err(|_| bad(format!("unreadable meta line {line:?}")))?;
            fields.insert(k.to_owned(), v);
        }
        match fields.get("format") {
            Some(&FORMAT_VERSION) => {}
            other => return Err(bad(other.map_or_else(|| "none".into(), u64::to_string))),
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| bad(format!("meta without {k}")))
        };
        Ok(Some(Self {
            epoch: get("epoch")?,
            acked_up_to: get("acked_up_to")?,
            evicted_up_to: get("evicted_up_to")?,
        }))
    }

    /// Replaces `meta` atomically and durably.
    fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = dir.join("meta.tmp");
        let mut f = File::create(&tmp)?;
        write!(
            f,
            "format {FORMAT_VERSION}\nepoch {}\nacked_up_to {}\nevicted_up_to {}\n",
            self.epoch, self.acked_up_to, self.evicted_up_to
        )?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(META_FILE))?;
        segments::sync_dir(dir)
    }
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    acked_up_to: u64,
    durable_seq: u64,
    /// Highest evicted reading (in memory; `meta` has `persisted.evicted_up_to`).
    evicted_up_to: u64,
    /// Eviction mark whose loss records a completed sync covered: the most `meta` may say.
    evicted_durable: u64,
    /// What `meta` says.
    persisted: Meta,
    pending_loss: Option<PendingLoss>,
    readings: Log,
    records: Log,
    notes: Notes,
}

impl State {
    fn bytes(&self) -> u64 {
        self.readings.live().bytes + self.records.live().bytes
    }

    fn counts(&self) -> KindCounts {
        let mut a = self.readings.live();
        a.add_agg(&self.records.live());
        a.counts
    }

    fn log_for(&mut self, kind: RecordKind) -> &mut Log {
        if kind == RecordKind::Reading {
            &mut self.readings
        } else {
            &mut self.records
        }
    }
}

/// The crash-safe buffer; see the module docs. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Buffer {
    path: PathBuf,
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
    /// Held (`flock`) while open.
    _lock: File,
    /// Notes kept beyond `max_delivery_notes` while a broker holds a backlog for the agent
    /// ([`Buffer::set_delivery_notes_extra`]).
    extra_delivery_notes: std::sync::atomic::AtomicUsize,
    /// What `meta` on disk says; its lock serialises the writers (a flush writes it off the
    /// state lock, so that reads and acknowledgements never wait for its fsync).
    meta_disk: std::sync::Arc<Mutex<Meta>>,
}

/// Replaces `meta` with the marks of `want` merged into what is on disk (marks only grow, so
/// two flushes finishing out of order cannot move it back); returns what is on disk now.
fn write_meta(cell: &Mutex<Meta>, dir: &Path, want: Meta) -> std::io::Result<Meta> {
    let mut disk = cell
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let merged = Meta {
        epoch: disk.epoch,
        acked_up_to: disk.acked_up_to.max(want.acked_up_to),
        evicted_up_to: disk.evicted_up_to.max(want.evicted_up_to),
    };
    if merged != *disk {
        merged.write(dir)?;
        *disk = merged;
    }
    Ok(merged)
}

/// What a flush syncs, taken under the lock.
struct FlushPrep {
    upto: u64,
    evicted: u64,
    readings: (Vec<std::sync::Arc<File>>, Option<PathBuf>),
    records: (Vec<std::sync::Arc<File>>, Option<PathBuf>),
    /// The marks to make durable after the data (the eviction mark only now: its loss
    /// records are in this sync).
    meta: Meta,
    dir: PathBuf,
    meta_disk: std::sync::Arc<Mutex<Meta>>,
}

impl FlushPrep {
    /// The blocking part of a flush: `fdatasync` of the segments and directories, then
    /// `meta`. Runs without the state lock.
    fn sync(&self) -> std::io::Result<Meta> {
        segments::sync_all(&self.readings.0, self.readings.1.as_deref())?;
        segments::sync_all(&self.records.0, self.records.1.as_deref())?;
        write_meta(&self.meta_disk, &self.dir, self.meta)
    }
}

impl Buffer {
    /// Opens (or creates) the buffer in directory `dir`; a sled buffer found there is
    /// upgraded first ([`legacy`]).
    pub fn open(dir: &Path, opts: BufferOptions) -> Result<Self, BufferError> {
        let path = dir.to_owned();
        std::fs::create_dir_all(dir)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(BufferError::Locked { path }),
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let segment_bytes = opts.segment_bytes();
        let max_notes = opts.max_delivery_notes.max(1);
        let mut meta = Meta::read(dir)?;
        if legacy::has_sled_files(dir) {
            if meta.is_none() {
                meta = legacy::migrate(dir, opts.cache_capacity_bytes, segment_bytes, max_notes)?;
                if let Some(m) = &meta {
                    // The commit point of the upgrade.
                    m.write(dir)?;
                }
            }
            legacy::remove_sled_files(dir)?;
        }
        let meta = match meta {
            Some(m) => m,
            None => {
                // Fresh buffer (or one that never got its epoch durable, hence holds nothing
                // durable either): a new epoch, made durable before any record.
                for sub in [READINGS_DIR, RECORDS_DIR] {
                    match std::fs::remove_dir_all(dir.join(sub)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(e.into());
                        }
                        _ => {}
                    }
                }
                let _ = std::fs::remove_file(dir.join(NOTES_FILE));
                let m = Meta {
                    epoch: u64::try_from(now_ms())
                        .unwrap_or(0)
                        .max(opts.min_epoch)
                        .max(1),
                    acked_up_to: 0,
                    evicted_up_to: 0,
                };
                m.write(dir)?;
                m
            }
        };

        let notes = Notes::open(&dir.join(NOTES_FILE), max_notes)?;
        // Notes are written after their records are durable, in sequence order, so only
        // records above the last durable note can lack theirs.
        let last_noted = notes.last_seq();
        let mut unnoted = Vec::new();
        let mut collect = |seq: u64, v: &[u8]| {
            if seq > last_noted
                && let Some((Some(key), _)) = value_parts(v)
            {
                unnoted.push((seq, key.to_vec()));
            }
        };
        let (readings, r) = Log::open(
            &dir.join(READINGS_DIR),
            segment_bytes,
            meta.acked_up_to.max(meta.evicted_up_to),
            &mut collect,
        )?;
        let (records, c) = Log::open(
            &dir.join(RECORDS_DIR),
            segment_bytes,
            meta.acked_up_to,
            &mut collect,
        )?;
        unnoted.sort_unstable_by_key(|(seq, _)| *seq);
        let max_seq = r
            .max_seq
            .max(c.max_seq)
            .max(meta.acked_up_to)
            .max(meta.evicted_up_to);
        let metrics = BufferMetrics::default();
        let mut st = State {
            next_seq: max_seq + 1,
            acked_up_to: meta.acked_up_to,
            // Everything recovered from disk is durable (the logs synced what they kept).
            durable_seq: max_seq,
            evicted_up_to: meta.evicted_up_to,
            evicted_durable: meta.evicted_up_to,
            persisted: meta,
            pending_loss: None,
            readings,
            records,
            notes,
        };
        if let Some((first_seq, _)) = unnoted.first() {
            tracing::info!(
                notes = unnoted.len(),
                first_seq,
                "restoring delivery notes cut off by a crash"
            );
        }
        for (seq, key) in unnoted {
            st.notes.note(seq, &key, 0);
        }
        st.notes.write_pending(max_seq)?;
        let buffer = Self {
            path,
            epoch: meta.epoch,
            max_bytes: opts.max_bytes,
            state: Mutex::new(st),
            metrics,
            flush_ok: AtomicBool::new(true),
            durable: tokio::sync::watch::Sender::new(max_seq),
            flush_requested: tokio::sync::Notify::new(),
            _lock: lock,
            extra_delivery_notes: std::sync::atomic::AtomicUsize::new(0),
            meta_disk: std::sync::Arc::new(Mutex::new(meta)),
        };
        buffer.publish_gauges(&buffer.lock());
        Ok(buffer)
    }

    /// The directory of the buffer.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This buffer's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes of the buffer's files on disk (segments, notes, meta): what `max_bytes` plus the
    /// stated overhead bounds (module docs).
    pub fn disk_bytes(&self) -> u64 {
        let st = self.lock();
        st.readings.disk_bytes() + st.records.disk_bytes() + st.notes.disk_bytes() + 128
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
            "Flushes (write + fdatasync) that failed; the data stays in memory for the next one",
            m.flush_failures.clone(),
        );
        registry.register(
            "buffer_bytes",
            "Bytes of stored records (frames: 16-byte header + value)",
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
        // A panic while holding the lock leaves at worst unwritten frames or an advanced
        // in-memory mark; the files stay consistent, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish_gauges(&self, st: &State) {
        self.metrics
            .bytes
            .set(i64::try_from(st.bytes()).unwrap_or(i64::MAX));
        self.metrics
            .records
            .set(i64::try_from(st.counts().total()).unwrap_or(i64::MAX));
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
        if st.bytes() + size > self.max_bytes {
            self.evict(st, size, now)?;
        }
        if st.bytes() + size > self.max_bytes {
            let seq = st.next_seq;
            st.next_seq += 1;
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
                bytes: st.bytes(),
                max_bytes: self.max_bytes,
            });
        }
        let seq = st.next_seq;
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
        // The lock is held until the note is taken, so notes are in sequence order: what
        // `open` relies on to restore them.
        let mut st = self.lock();
        // The record carries the key: a record is never durable without what its note needs.
        let seq = self.append_locked(&mut st, record, Some(&key))?;
        let extra = self.extra_delivery_notes.load(Ordering::Relaxed);
        st.notes.note(seq, &key, extra);
        Ok(seq)
    }

    /// Keeps `extra` notes beyond `max_delivery_notes` (what the MQTT sources pin: how far
    /// back a copy the broker sends again can reach, see [`crate::mqtt`]). When `extra` shrinks,
    /// the window shrinks by at most one note per new note, so no single append pays for it.
    pub fn set_delivery_notes_extra(&self, extra: usize) {
        self.extra_delivery_notes.store(extra, Ordering::Relaxed);
    }

    /// Stores `record` with its delivery key but without taking the note: the state a crash
    /// leaves when it comes between a durable record and its note.
    #[cfg(test)]
    fn append_delivered_torn(
        &self,
        record: &Record,
        delivery: &Delivery,
    ) -> Result<u64, BufferError> {
        self.append_locked(&mut self.lock(), record, Some(&delivery_key(delivery)))
    }

    /// Stores a raw value under `seq` in the records log (tests of undecodable values).
    #[cfg(test)]
    fn insert_raw(&self, seq: u64, value: &[u8]) {
        let mut st = self.lock();
        self.insert(&mut st, seq, RecordKind::Gap, value).unwrap();
    }

    /// The sequence under which the message `delivery` describes (same session, id and
    /// digest) was stored, if it is among the remembered deliveries.
    pub fn delivered(&self, delivery: &Delivery) -> Result<Option<u64>, BufferError> {
        Ok(self.lock().notes.get(&delivery_key(delivery)))
    }

    /// How many delivery notes are kept (all sessions).
    pub fn delivery_notes(&self) -> usize {
        self.lock().notes.len()
    }

    fn insert(
        &self,
        st: &mut State,
        seq: u64,
        kind: RecordKind,
        value: &[u8],
    ) -> Result<(), BufferError> {
        st.log_for(kind).append(seq, value)?;
        st.next_seq = st.next_seq.max(seq + 1);
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
        if st.bytes() + entry_bytes(&value) > self.max_bytes {
            return Ok(());
        }
        let seq = st.next_seq;
        self.insert(st, seq, RecordKind::Loss, &value)?;
        self.metrics.loss_records.inc();
        st.pending_loss = None;
        Ok(())
    }

    /// Evicts the oldest readings to make room for `incoming` bytes, then records the loss.
    fn evict(&self, st: &mut State, incoming: u64, now: i64) -> Result<(), BufferError> {
        let overflow = (st.bytes() + incoming).saturating_sub(self.max_bytes);
        let want = (overflow + LOSS_RECORD_RESERVE_BYTES).max(self.max_bytes / EVICT_CHUNK_DIVISOR);
        let Some(v) = st.readings.oldest_span(want)? else {
            return Ok(());
        };
        // The loss record goes first: its sequence is above every victim's, so it keeps the
        // recovered next sequence above them even if the process dies mid-way.
        let loss = Record::Loss(Loss {
            records: v.records,
            first_seq: v.first_seq,
            last_seq: v.last_seq,
            reason: format!(
                "buffer full (max_bytes = {}): evicted the oldest raw readings",
                self.max_bytes
            ),
            ts: DateTime::from_timestamp_millis(now).unwrap_or_default(),
        });
        let value = encode(&loss, now, None)?;
        let seq = st.next_seq;
        st.records.append(seq, &value)?;
        st.next_seq += 1;
        st.evicted_up_to = st.evicted_up_to.max(v.last_seq);
        let died = st
            .readings
            .advance_dead(st.evicted_up_to.max(st.acked_up_to))?;
        self.metrics.evicted.inc_by(died.counts.reading);
        self.metrics.loss_records.inc();
        if st.readings.has_doomed() {
            // Whole segments died: make the loss record durable, then the mark, then unlink
            // them, so the disk is back within its bound now rather than at the next flush.
            let (files, dir) = st.records.sync_handles()?;
            if let Err(e) = segments::sync_all(&files, dir.as_deref()) {
                st.records.sync_failed(files, dir);
                return Err(e.into());
            }
            st.evicted_durable = st.evicted_up_to;
            self.persist(st)?;
        }
        self.publish_gauges(st);
        tracing::warn!(
            evicted = v.records,
            first_seq = v.first_seq,
            last_seq = v.last_seq,
            max_bytes = self.max_bytes,
            "buffer full: evicted oldest readings"
        );
        Ok(())
    }

    /// Writes `meta` (acknowledged position, the durable eviction mark) when it changed, then
    /// unlinks the segments it deletes.
    fn persist(&self, st: &mut State) -> Result<(), BufferError> {
        let want = Meta {
            epoch: self.epoch,
            acked_up_to: st.acked_up_to,
            evicted_up_to: st.evicted_durable.max(st.persisted.evicted_up_to),
        };
        st.persisted = write_meta(&self.meta_disk, &self.path, want)?;
        self.reclaim(st)
    }

    /// Unlinks the segments the marks on disk delete.
    fn reclaim(&self, st: &mut State) -> Result<(), BufferError> {
        let p = st.persisted;
        st.readings.reclaim(p.acked_up_to.max(p.evicted_up_to))?;
        st.records.reclaim(p.acked_up_to)?;
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
        let (a, b) = {
            let mut st = self.lock();
            let a = st.readings.read(from_seq, max_records, max_bytes)?;
            let b = st.records.read(from_seq, max_records, max_bytes)?;
            (a, b)
        };
        let mut a = a.into_iter().peekable();
        let mut b = b.into_iter().peekable();
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max_records {
            let from_a = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(x), Some(y)) => x.seq < y.seq,
            };
            let Some(f) = (if from_a { a.next() } else { b.next() }) else {
                break;
            };
            let size = entry_bytes(&f.value);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push(self.sequenced(f));
        }
        Ok(out)
    }

    fn sequenced(&self, f: Frame) -> Sequenced {
        Sequenced {
            epoch: self.epoch,
            seq: f.seq,
            record: decode(f.seq, &f.value),
        }
    }

    /// The newest `n` records, in sequence order.
    pub fn read_newest(&self, n: usize) -> Result<Vec<Sequenced>, BufferError> {
        let mut entries = {
            let mut st = self.lock();
            let mut e = st.readings.newest(n)?;
            e.extend(st.records.newest(n)?);
            e
        };
        entries.sort_by_key(|f| f.seq);
        let skip = entries.len().saturating_sub(n);
        Ok(entries
            .into_iter()
            .skip(skip)
            .map(|f| self.sequenced(f))
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
        st.acked_up_to = up_to_seq;
        let readings_mark = up_to_seq.max(st.evicted_up_to);
        let mut died = st.readings.advance_dead(readings_mark)?;
        died.add_agg(&st.records.advance_dead(up_to_seq)?);
        // The next flush writes `meta` and only then unlinks the segments this emptied, so a
        // recovered buffer never reissues these sequences; until then a crash brings the
        // acknowledged records back (sent again, deduplicated by `(epoch, seq)` upstream), as
        // before. Not here: an fsync per acknowledgement slowed the drain under I/O load.
        self.publish_gauges(&st);
        self.write_pending_loss(&mut st, now_ms())?;
        Ok(died.counts.total())
    }

    /// Takes what a flush must sync, under the lock.
    fn prepare_flush(&self) -> Result<FlushPrep, BufferError> {
        let mut st = self.lock();
        let readings = st.readings.sync_handles()?;
        let records = match st.records.sync_handles() {
            Ok(r) => r,
            Err(e) => {
                st.readings.sync_failed(readings.0, readings.1);
                return Err(e.into());
            }
        };
        Ok(FlushPrep {
            upto: st.next_seq - 1,
            evicted: st.evicted_up_to,
            readings,
            records,
            meta: Meta {
                epoch: self.epoch,
                acked_up_to: st.acked_up_to,
                evicted_up_to: st.evicted_up_to,
            },
            dir: self.path.clone(),
            meta_disk: self.meta_disk.clone(),
        })
    }

    /// Publishes a completed (or failed) sync: notes of the now durable records go to their
    /// file, doomed segments are reclaimed.
    fn finish_flush(
        &self,
        prep: FlushPrep,
        synced: std::io::Result<Meta>,
    ) -> Result<u64, BufferError> {
        let mut st = self.lock();
        let on_disk = match synced {
            Ok(m) => m,
            Err(e) => {
                st.readings.sync_failed(prep.readings.0, prep.readings.1);
                st.records.sync_failed(prep.records.0, prep.records.1);
                drop(st);
                self.note_flush(false);
                return Err(e.into());
            }
        };
        st.evicted_durable = st.evicted_durable.max(prep.evicted);
        st.persisted = Meta {
            epoch: self.epoch,
            acked_up_to: st.persisted.acked_up_to.max(on_disk.acked_up_to),
            evicted_up_to: st.persisted.evicted_up_to.max(on_disk.evicted_up_to),
        };
        let res = st.notes.write_pending(prep.upto).map_err(BufferError::from);
        // Acknowledgements since the last flush are in `meta` now: unlink what they emptied.
        let res = res.and_then(|()| self.reclaim(&mut st));
        st.durable_seq = st.durable_seq.max(prep.upto);
        let durable = st.durable_seq;
        drop(st);
        // The records are durable even if a note or an unlink failed.
        self.publish_durable(durable);
        self.note_flush(res.is_ok());
        res.map(|()| prep.upto)
    }

    /// Makes every record appended so far durable (write + `fdatasync`, on a blocking thread).
    /// Returns the highest sequence now covered.
    pub async fn flush(&self) -> Result<u64, BufferError> {
        let prep = match self.prepare_flush() {
            Ok(p) => p,
            Err(e) => {
                self.note_flush(false);
                return Err(e);
            }
        };
        let joined = tokio::task::spawn_blocking(move || {
            let synced = prep.sync();
            (prep, synced)
        })
        .await;
        let (prep, synced) = match joined {
            Ok(j) => j,
            Err(e) => {
                // The sync thread panicked: nothing is known durable; the next flush retries.
                self.note_flush(false);
                return Err(BufferError::Io(std::io::Error::other(e)));
            }
        };
        self.finish_flush(prep, synced)
    }

    /// Blocking variant of [`Buffer::flush`], for synchronous callers.
    pub fn flush_blocking(&self) -> Result<u64, BufferError> {
        let prep = match self.prepare_flush() {
            Ok(p) => p,
            Err(e) => {
                self.note_flush(false);
                return Err(e);
            }
        };
        let synced = prep.sync();
        self.finish_flush(prep, synced)
    }

    fn publish_durable(&self, durable: u64) {
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

    fn summary(&self, f: Option<Frame>) -> Option<RecordSummary> {
        let f = f?;
        let record = decode(f.seq, &f.value);
        Some(RecordSummary {
            seq: f.seq,
            kind: record.kind(),
            ts: record.ts(),
            appended_at: value_appended_at(&f.value),
        })
    }

    /// A snapshot of counts, bytes, oldest/newest records and counters.
    pub fn stats(&self) -> Result<BufferStats, BufferError> {
        let mut st = self.lock();
        let pick = |a: Option<Frame>, b: Option<Frame>, oldest: bool| match (a, b) {
            (Some(x), Some(y)) => {
                if (x.seq < y.seq) == oldest {
                    Some(x)
                } else {
                    Some(y)
                }
            }
            (x, None) => x,
            (None, y) => y,
        };
        let oldest = pick(st.readings.first()?, st.records.first()?, true);
        let newest = pick(st.readings.last()?, st.records.last()?, false);
        let oldest = self.summary(oldest);
        let newest = self.summary(newest);
        let oldest_unacked_age_ms = oldest
            .as_ref()
            .map(|o| u64::try_from((Utc::now() - o.appended_at).num_milliseconds()).unwrap_or(0));
        self.metrics
            .oldest_unacked_age_seconds
            .set(oldest_unacked_age_ms.map_or(0.0, |ms| ms as f64 / 1000.0));
        Ok(BufferStats {
            epoch: self.epoch,
            counts: st.counts(),
            bytes: st.bytes(),
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
    /// retried at the next tick or request (the frames stay in memory).
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

impl Drop for Buffer {
    /// Writes and syncs what is pending and the marks, like a last flush (a clean close loses
    /// nothing); errors are logged, the next open recovers from the files.
    fn drop(&mut self) {
        if let Err(e) = self.flush_blocking() {
            tracing::error!(error = %e, "buffer flush at close failed");
            return;
        }
        let mut st = self.lock();
        st.evicted_durable = st.evicted_up_to;
        if let Err(e) = self.persist(&mut st) {
            tracing::error!(error = %e, "buffer marks at close not written");
        }
    }
}

#[cfg(test)]
mod tests;
