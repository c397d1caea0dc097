//! Idempotent ingest of agent sync batches.
//!
//! Invariants:
//! - The device and organisation come from the caller's authenticated identity (the client
//!   certificate on the agent listener), never from the request body: a batch has no device
//!   field at all, so one organisation's device cannot write into another's data.
//! - One transaction per batch: either every record of the batch is stored (or was already
//!   stored) and the ack moves, or nothing changes and the agent retries.
//! - Each record is stored under its key `(device_id, epoch, seq)` with `ON CONFLICT DO
//!   NOTHING`, so a replayed batch (after a lost ack, a crash, a retry) counts once.
//! - The device row is locked (`FOR UPDATE`) for the transaction, so two concurrent batches of
//!   one device serialise and the acknowledged high-water mark only grows.
//! - Decompression is bounded: a gzip body that inflates beyond the limit is refused (413)
//!   before it is parsed.

use std::io::Read as _;

use chrono::{DateTime, Utc};
use kip_shared::{
    Record, Sequenced,
    sync::{BatchError, SyncAck, SyncBatch},
};
use sqlx::PgPool;
use uuid::Uuid;

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
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_decoded_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("batch body is not valid gzip: {0}")]
    Gzip(String),
    #[error("batch inflates to more than {0} bytes")]
    TooLarge(usize),
    #[error("batch is not valid JSON for protocol version {version}: {message}")]
    Json { version: u32, message: String },
    #[error("invalid batch: {0}")]
    Batch(#[from] BatchError),
    #[error("record {index}: {message}")]
    Record { index: usize, message: String },
    #[error("device is not registered in its organisation")]
    UnknownDevice,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The blocking decoder task panicked or was cancelled.
    #[error("batch decoder failed: {0}")]
    Decoder(String),
}

impl IngestError {
    /// Short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Gzip(_) => "gzip",
            Self::TooLarge(_) => "too_large",
            Self::Json { .. } => "json",
            Self::Batch(_) => "batch",
            Self::Record { .. } => "record",
            Self::UnknownDevice => "unknown_device",
            Self::Db(_) => "database",
            Self::Decoder(_) => "internal",
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::TooLarge(limit_bytes) => ApiError::PayloadTooLarge { limit_bytes },
            IngestError::Gzip(_) | IngestError::Json { .. } => ApiError::BadRequest(e.to_string()),
            IngestError::Batch(_) | IngestError::Record { .. } => {
                ApiError::validation("batch", e.to_string())
            }
            IngestError::UnknownDevice => ApiError::Forbidden("device is not registered"),
            IngestError::Db(db) => ApiError::from(db),
            IngestError::Decoder(_) => ApiError::internal(e),
        }
    }
}

/// Decodes a request body (gzip when `gzip`), bounded by `limits`.
pub fn decode(body: &[u8], gzip: bool, limits: IngestLimits) -> Result<SyncBatch, IngestError> {
    let json: std::borrow::Cow<'_, [u8]> = if gzip {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(body)
            .take(limits.max_decoded_bytes as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| IngestError::Gzip(e.to_string()))?;
        out.into()
    } else {
        body.into()
    };
    if json.len() > limits.max_decoded_bytes {
        return Err(IngestError::TooLarge(limits.max_decoded_bytes));
    }
    let batch: SyncBatch = serde_json::from_slice(&json).map_err(|e| IngestError::Json {
        version: kip_shared::PROTOCOL_VERSION,
        message: e.to_string(),
    })?;
    batch.check(limits.max_records)?;
    for (index, r) in batch.records.iter().enumerate() {
        check_record(r).map_err(|message| IngestError::Record { index, message })?;
    }
    Ok(batch)
}

fn check_text(field: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{field} is longer than {max} bytes"));
    }
    Ok(())
}

fn check_record(r: &Sequenced) -> Result<(), String> {
    match &r.record {
        Record::Reading(x) => {
            check_text("machine", &x.machine, 128)?;
            check_text("metric", &x.metric, 256)?;
            if x.metric.is_empty() {
                return Err("metric must not be empty".into());
            }
            if !x.value.is_finite() {
                return Err(format!("value of {} is not finite", x.metric));
            }
        }
        Record::Prediction(p) => {
            check_text("machine", &p.machine, 128)?;
            check_text("model_version", &p.model_version, 128)?;
            if !p.rul_cycles.is_finite() {
                return Err("rul_cycles is not finite".into());
            }
        }
        Record::Gap(_) | Record::DeadLetter(_) | Record::Loss(_) => {}
    }
    Ok(())
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
    let epoch = batch.epoch as i64;
    let mut readings = Columns::default();
    let mut preds = Columns::default();
    let mut pred_version: Vec<String> = Vec::new();
    let mut pred_anomaly: Vec<Option<f64>> = Vec::new();
    let (mut ev_seq, mut ev_kind, mut ev_ts, mut ev_body) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
            }
            other => {
                let (kind, ts) = match other {
                    Record::Gap(g) => ("gap", g.to),
                    Record::DeadLetter(d) => ("dead_letter", d.ts),
                    Record::Loss(l) => ("loss", l.ts),
                    Record::Reading(_) | Record::Prediction(_) => continue,
                };
                ev_seq.push(seq);
                ev_kind.push(kind.to_owned());
                ev_ts.push(ts);
                ev_body.push(serde_json::to_value(other).unwrap_or_default());
            }
        }
    }

    let mut tx = pool.begin().await?;
    let found: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM devices WHERE org_id = $1 AND id = $2 FOR UPDATE")
            .bind(id.org_id)
            .bind(id.device_id)
            .fetch_optional(&mut *tx)
            .await?;
    if found.is_none() {
        return Err(IngestError::UnknownDevice);
    }
    let mut inserted = 0u64;
    if !readings.seq.is_empty() {
        inserted += sqlx::query(
            "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value, quality) \
             SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::timestamptz[], \
                                              $8::float8[], $9::int2[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(id.org_id)
        .bind(id.device_id)
        .bind(epoch)
        .bind(&readings.seq)
        .bind(&readings.machine)
        .bind(&readings.metric)
        .bind(&readings.ts)
        .bind(&readings.value)
        .bind(&readings.quality)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    if !preds.seq.is_empty() {
        inserted += sqlx::query(
            "INSERT INTO predictions (org_id, device_id, epoch, seq, machine, ts, rul_cycles, model_version, anomaly_score) \
             SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::timestamptz[], $7::float8[], \
                                              $8::text[], $9::float8[]) \
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
    let acked: i64 = sqlx::query_scalar(
        "INSERT INTO device_sync_state (device_id, org_id, epoch, acked_seq, agent_version, running_model) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (device_id, epoch) DO UPDATE SET \
           acked_seq = GREATEST(device_sync_state.acked_seq, EXCLUDED.acked_seq), \
           agent_version = EXCLUDED.agent_version, running_model = EXCLUDED.running_model, \
           updated_at = now() \
         RETURNING acked_seq",
    )
    .bind(id.device_id)
    .bind(id.org_id)
    .bind(epoch)
    .bind(batch.last_seq as i64)
    .bind(&batch.agent_version)
    .bind(&batch.running_model)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE devices SET last_seen_at = now() WHERE org_id = $1 AND id = $2")
        .bind(id.org_id)
        .bind(id.device_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let total = batch.records.len() as u64;
    Ok(SyncAck {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        epoch: batch.epoch,
        acked_seq: acked as u64,
        inserted,
        duplicates: total.saturating_sub(inserted),
        desired: Default::default(),
    })
}
