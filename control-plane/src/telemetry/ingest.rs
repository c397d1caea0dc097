//! Idempotent ingest of agent sync batches.
//!
//! Invariants:
//! - The device and organisation come from the caller's authenticated identity (the client
//!   certificate on the agent listener), never from the request body: a batch has no device
//!   field at all, so one organisation's device cannot write into another's data.
//! - One transaction per batch: either every record of the batch is stored (or was already
//!   stored) and the ack moves, or nothing changes and the agent retries.
//! - Each record is stored under its key `(device_id, epoch, seq, ts)` (ts: the record's own
//!   timestamp, the partition column) with `ON CONFLICT DO NOTHING`, so a replayed batch
//!   (after a lost ack, a crash, a retry) counts once. Readings go through a binary COPY into
//!   a staging table and one insert-select that also maintains the rollups
//!   ([`super::storage`]).
//! - Concurrent batches of one device (an agent pipelining its backlog, up to
//!   `ingest.max_in_flight_syncs_per_device` per replica) overlap: the transaction starts with
//!   a `FOR KEY SHARE` lock on the device row, which other batches of the device share and
//!   which still makes a concurrent device deletion wait (and the backfill's `FOR UPDATE`).
//!   Only the final [`ACK`] statement serialises them: it updates the device row (a
//!   `FOR NO KEY UPDATE` lock held to `COMMIT`) and moves `acked_seq` with `GREATEST`, so the
//!   acknowledged high-water mark only grows, whatever order concurrent batches commit in.
//! - Lock order, so concurrent batches of one device wait for each other instead of
//!   deadlocking: device row (key share), then `sensor_data` keys in `seq` order, then the
//!   1-minute rollup rows and the 1-hour rollup rows each in key order ([`super::storage`]),
//!   then the device row (update) and its `device_sync_state` row. Should PostgreSQL still
//!   abort one (deadlock `40P01`, serialization failure `40001`), the batch is answered 503
//!   `sync_conflict` with `Retry-After` ([`IngestError::Conflict`], counted as reason
//!   `conflict`), never a 500: nothing was stored and the agent resends it.
//! - A replay concurrent with its original (a resend after a timeout while the first is still
//!   running) waits on the original's uncommitted keys and then skips them: stored once.
//! - A heartbeat (a batch without records) stores nothing but the ack and the last-seen time:
//!   one statement ([`ACK`], which locks the device row by updating it) and no transaction
//!   around it, one round trip instead of four (`BEGIN`, lock, ack, `COMMIT`).
//! - Decoding is [`kip_shared::batch::decode_batch`]'s (one decoder, property-tested there):
//!   decompression is bounded (a gzip body that inflates beyond the limit is refused, 413,
//!   before it is parsed), and a batch that decodes is storable (no NUL, bounded strings,
//!   finite numbers, years 1 to 9999), so a bad record is a 422 naming it, never a failed
//!   transaction.

use chrono::{DateTime, Utc};
use kip_shared::{
    Record,
    batch::{BodyEncoding, DecodeError, DecodeLimits, decode_batch},
    sync::{SyncAck, SyncBatch},
};
use sqlx::PgPool;
use uuid::Uuid;

use super::storage;
use crate::http::ApiError;

/// The authenticated device a request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub org_id: Uuid,
    pub device_id: Uuid,
}

/// Limits applied to every batch.
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    pub max_records: usize,
    /// Limit on the JSON after decompression.
    pub max_decoded_bytes: usize,
    /// Syncs of one device admitted at once on a listener
    /// (`ingest.max_in_flight_syncs_per_device`, [`crate::agent_api::SyncGate`]).
    pub max_in_flight_syncs_per_device: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_decoded_bytes: 16 * 1024 * 1024,
            max_in_flight_syncs_per_device: 4,
        }
    }
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body does not decode into a storable batch (gzip, size, JSON, structure, a record).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("device is not registered in its organisation")]
    UnknownDevice,
    /// Concurrent syncs of the device met in PostgreSQL (deadlock `40P01` or serialization
    /// failure `40001`): rolled back, to be resent.
    #[error(
        "a concurrent sync of this device conflicted in the database ({0}); nothing was \
         stored: resend the batch"
    )]
    Conflict(&'static str),
    #[error("database: {0}")]
    Db(sqlx::Error),
    /// The blocking decoder task panicked or was cancelled.
    #[error("batch decoder failed: {0}")]
    Decoder(String),
}

impl IngestError {
    /// Short, stable label for metrics (the decoder's [`DecodeError::reason`] for bad bodies:
    /// `gzip`, `too_large`, `json`, `batch`, `record`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Decode(d) => d.reason(),
            Self::UnknownDevice => "unknown_device",
            Self::Conflict(_) => "conflict",
            Self::Db(_) => "database",
            Self::Decoder(_) => "internal",
        }
    }
}

impl From<sqlx::Error> for IngestError {
    /// A deadlock or serialization failure is [`IngestError::Conflict`] (retryable), any other
    /// database error [`IngestError::Db`].
    fn from(e: sqlx::Error) -> Self {
        match conflict_code(&e) {
            Some(what) => Self::Conflict(what),
            None => Self::Db(e),
        }
    }
}

/// `Some(name)` when `e` is PostgreSQL aborting a transaction for a concurrent one: a
/// deadlock (`40P01`) or a serialization failure (`40001`).
pub fn conflict_code(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    match db.code().as_deref() {
        Some("40P01") => Some("deadlock detected"),
        Some("40001") => Some("serialization failure"),
        _ => None,
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        use axum::http::StatusCode;
        use kip_shared::sync::{BatchError, error_code as code};
        let coded = |status, code: &'static str, e: &IngestError| ApiError::Coded {
            status,
            code,
            message: e.to_string(),
        };
        match &e {
            IngestError::Decode(DecodeError::TooLarge(limit_bytes)) => ApiError::PayloadTooLarge {
                limit_bytes: *limit_bytes,
            },
            IngestError::Decode(DecodeError::Gzip(_)) => {
                coded(StatusCode::BAD_REQUEST, code::BODY_UNDECODABLE, &e)
            }
            IngestError::Decode(DecodeError::Json { .. }) => {
                coded(StatusCode::BAD_REQUEST, code::BATCH_UNDECODABLE, &e)
            }
            IngestError::Decode(DecodeError::Batch(BatchError::Version { .. })) => coded(
                StatusCode::BAD_REQUEST,
                code::PROTOCOL_VERSION_UNSUPPORTED,
                &e,
            ),
            IngestError::Decode(DecodeError::Batch(BatchError::TooMany { .. })) => coded(
                StatusCode::UNPROCESSABLE_ENTITY,
                code::BATCH_TOO_MANY_RECORDS,
                &e,
            ),
            IngestError::Decode(
                DecodeError::Batch(_) | DecodeError::Field(_) | DecodeError::Health(_),
            ) => coded(StatusCode::UNPROCESSABLE_ENTITY, code::BATCH_INVALID, &e),
            IngestError::Decode(DecodeError::Record { .. }) => {
                coded(StatusCode::UNPROCESSABLE_ENTITY, code::RECORD_INVALID, &e)
            }
            IngestError::UnknownDevice => ApiError::Forbidden("device is not registered"),
            IngestError::Conflict(_) => ApiError::RetryLater {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: code::SYNC_CONFLICT,
                message: e.to_string(),
                retry_after_s: 1,
            },
            IngestError::Db(_) | IngestError::Decoder(_) => match e {
                IngestError::Db(db) => ApiError::from(db),
                other => ApiError::internal(other),
            },
        }
    }
}

/// Decodes a request body (gzip when `gzip`), bounded by `limits`.
pub fn decode(body: &[u8], gzip: bool, limits: IngestLimits) -> Result<SyncBatch, IngestError> {
    let encoding = if gzip {
        BodyEncoding::Gzip
    } else {
        BodyEncoding::Identity
    };
    let limits = DecodeLimits {
        max_records: limits.max_records,
        max_decoded_bytes: limits.max_decoded_bytes,
    };
    Ok(decode_batch(body, encoding, limits)?)
}

#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    machine: Vec<String>,
    metric: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    value: Vec<f64>,
    quality: Vec<i16>,
}

/// Stores a checked batch for `id` and returns the ack.
pub async fn store(
    pool: &PgPool,
    id: DeviceIdentity,
    batch: &SyncBatch,
) -> Result<SyncAck, IngestError> {
    if batch.records.is_empty() {
        return store_heartbeat(pool, id, batch).await;
    }
    let epoch = batch.epoch as i64;
    let mut readings = Columns::default();
    let mut preds = Columns::default();
    let mut pred_version: Vec<String> = Vec::new();
    let mut pred_anomaly: Vec<Option<f64>> = Vec::new();
    let mut pred_model: Vec<Option<String>> = Vec::new();
    let mut pred_role: Vec<&'static str> = Vec::new();
    let mut stats = crate::ml::compare::StatsColumns::default();
    let (mut ev_seq, mut ev_kind, mut ev_ts, mut ev_body) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut drift = crate::ml::monitoring::DriftColumns::default();
    for r in &batch.records {
        let seq = r.seq as i64;
        match &r.record {
            Record::Reading(x) => {
                readings.seq.push(seq);
                readings.machine.push(x.machine.clone());
                readings.metric.push(x.metric.clone());
                readings.ts.push(x.ts);
                readings.value.push(x.value);
                readings.quality.push(x.quality.code());
            }
            Record::Prediction(p) => {
                preds.seq.push(seq);
                preds.machine.push(p.machine.clone());
                preds.ts.push(p.ts);
                preds.value.push(p.rul_cycles);
                pred_version.push(p.model_version.clone());
                pred_anomaly.push(p.anomaly_score);
                pred_model.push(p.model.clone());
                pred_role.push(p.role.unwrap_or(kip_shared::ModelRole::Champion).as_str());
            }
            Record::ModelDrift(d) => drift.push(seq, d),
            Record::ModelStats(x) => stats.push(seq, x),
            other => {
                let (kind, ts) = match other {
                    Record::Gap(g) => ("gap", g.to),
                    Record::DeadLetter(d) => ("dead_letter", d.ts),
                    Record::Loss(l) => ("loss", l.ts),
                    Record::Reading(_)
                    | Record::Prediction(_)
                    | Record::ModelDrift(_)
                    | Record::ModelStats(_) => {
                        continue;
                    }
                };
                ev_seq.push(seq);
                ev_kind.push(kind.to_owned());
                ev_ts.push(ts);
                ev_body.push(serde_json::to_value(other).unwrap_or_default());
            }
        }
    }

    let mut tx = pool.begin().await?;
    // Key share: other batches of this device go on beside this one; a deletion of the device
    // waits (see the module docs, lock order).
    let found: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM devices WHERE org_id = $1 AND id = $2 FOR KEY SHARE")
            .bind(id.org_id)
            .bind(id.device_id)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        return Err(IngestError::UnknownDevice);
    }
    let mut inserted = 0u64;
    if !readings.seq.is_empty() {
        // Small batches: one insert-select from arrays. Large ones: COPY BINARY into the
        // session's staging table, then one insert-select. Either skips keys already stored
        // and rolls up exactly what it inserted (storage::insert_readings).
        let cols = storage::ReadingColumns {
            seq: readings.seq,
            machine: readings.machine,
            metric: readings.metric,
            ts: readings.ts,
            value: readings.value,
            quality: readings.quality,
        };
        inserted +=
            storage::insert_readings(&mut tx, id.org_id, id.device_id, epoch, &cols).await?;
    }
    if !preds.seq.is_empty() {
        inserted += sqlx::query(
            "INSERT INTO predictions (org_id, device_id, epoch, seq, machine, ts, rul_cycles, model_version, \
                                      anomaly_score, model, role) \
             SELECT $1, $2, $3, u.* FROM UNNEST($4::bigint[], $5::text[], $6::timestamptz[], $7::float8[], \
                                                $8::text[], $9::float8[], $10::text[], $11::text[]) AS u(seq) \
              WHERE NOT EXISTS (SELECT 1 FROM predictions_legacy l \
                                 WHERE l.device_id = $2 AND l.epoch = $3 AND l.seq = u.seq) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.org_id)
        .bind(id.device_id)
        .bind(epoch)
        .bind(&preds.seq)
        .bind(&preds.machine)
        .bind(&preds.ts)
        .bind(&preds.value)
        .bind(&pred_version)
        .bind(&pred_anomaly)
        .bind(&pred_model)
        .bind(&pred_role)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    if !ev_seq.is_empty() {
        inserted += sqlx::query(
            "INSERT INTO agent_events (org_id, device_id, epoch, seq, kind, ts, body) \
             SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::timestamptz[], $7::jsonb[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.org_id)
        .bind(id.device_id)
        .bind(epoch)
        .bind(&ev_seq)
        .bind(&ev_kind)
        .bind(&ev_ts)
        .bind(&ev_body)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    inserted += drift
        .insert(&mut tx, id.org_id, id.device_id, epoch)
        .await?;
    inserted += stats
        .insert(&mut tx, id.org_id, id.device_id, epoch)
        .await?;
    let acked: Option<i64> = ack_query(id, batch).fetch_optional(&mut *tx).await?;
    let acked = acked.ok_or(IngestError::UnknownDevice)?;
    tx.commit().await?;
    Ok(ack(batch, acked, inserted))
}

/// The ack and the device's last-seen time in one statement; no row when the device is not
/// (or no longer) in the organisation. Updating the device row locks it until the end of the
/// transaction (or of the statement, for a heartbeat): concurrent batches of one device
/// serialise here, at the end, for the ack alone; `GREATEST` keeps `acked_seq` from moving
/// back when a batch of lower sequences commits after one of higher sequences.
const ACK: &str = "\
    WITH seen AS (UPDATE devices SET last_seen_at = now() WHERE org_id = $2 AND id = $1 RETURNING id) \
    INSERT INTO device_sync_state (device_id, org_id, epoch, acked_seq, agent_version, running_model) \
    SELECT $1, $2, $3, $4, $5, $6 FROM seen \
    ON CONFLICT (device_id, epoch) DO UPDATE SET \
      acked_seq = GREATEST(device_sync_state.acked_seq, EXCLUDED.acked_seq), \
      agent_version = EXCLUDED.agent_version, running_model = EXCLUDED.running_model, \
      updated_at = now() \
    RETURNING acked_seq";

fn ack_query<'a>(
    id: DeviceIdentity,
    batch: &'a SyncBatch,
) -> sqlx::query::QueryScalar<'a, sqlx::Postgres, i64, sqlx::postgres::PgArguments> {
    sqlx::query_scalar(ACK)
        .bind(id.device_id)
        .bind(id.org_id)
        .bind(batch.epoch as i64)
        .bind(batch.last_seq as i64)
        .bind(&batch.agent_version)
        .bind(&batch.running_model)
}

/// A heartbeat: the ack in one statement, no transaction ([`ACK`]).
async fn store_heartbeat(
    pool: &PgPool,
    id: DeviceIdentity,
    batch: &SyncBatch,
) -> Result<SyncAck, IngestError> {
    let acked = ack_query(id, batch)
        .fetch_optional(pool)
        .await?
        .ok_or(IngestError::UnknownDevice)?;
    Ok(ack(batch, acked, 0))
}

fn ack(batch: &SyncBatch, acked: i64, inserted: u64) -> SyncAck {
    let total = batch.records.len() as u64;
    SyncAck {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        epoch: batch.epoch,
        acked_seq: acked as u64,
        inserted,
        duplicates: total.saturating_sub(inserted),
        desired: Default::default(),
        server_time: None,
    }
}
