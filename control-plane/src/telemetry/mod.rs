//! Telemetry domain: idempotent ingest of agent sync batches into PostgreSQL and the sensor
//! data and prediction query APIs.
//!
//! Interface for other domains: [`store`] (decode, check, store and count one sync body for
//! an authenticated device; called by `agent_api::sync`) and [`count_refused`] (a body refused
//! before decoding). Everything about the `sensor_data`, `predictions`, `agent_events` and
//! `device_sync_state` tables, their rollups and retention stays inside this module
//! ([`storage`] owns the layout and its maintenance).

pub mod copy;
pub mod ingest;
/// Latest readings and predictions (tools of grounded answers).
pub mod latest;
mod metrics;
mod predictions;
mod query;
/// A device's recent readings and predictions (the console's chart).
pub mod recent;
mod retention;
pub mod storage;
pub use query::{SENSOR_QUERY_TIMEOUT_MS, bounded_tx};

use axum::{Router, body::Bytes, extract::FromRef, routing::get};
use kip_shared::sync::SyncAck;
use sqlx::PgPool;
use std::sync::Arc;

pub use self::{
    ingest::{DeviceIdentity, IngestError, IngestLimits},
    metrics::{IngestMetrics, ReasonLabels, ResultLabels},
    query::{BucketPoint, Points, RawPoint, SensorPage, SensorQuery},
};
use crate::http::{HttpLimits, KeyCache};

/// The telemetry routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
{
    Router::new()
        .route(
            "/organisations/{org_id}/devices/{device_id}/sensor-data",
            get(query::query),
        )
        .route(
            "/organisations/{org_id}/telemetry/retention",
            get(retention::get)
                .put(retention::put)
                .delete(retention::delete),
        )
        .route(
            "/organisations/{org_id}/predictions",
            get(predictions::history),
        )
        .route(
            "/organisations/{org_id}/predictions/latest",
            get(predictions::latest),
        )
}

/// A sync batch as stored.
#[derive(Debug)]
pub struct Stored {
    /// The acknowledgement; `desired` is left default for the caller to fill.
    pub ack: SyncAck,
    /// `name@version` the agent reported running, if any.
    pub running_model: Option<String>,
    /// The agent's health report, if the batch carried one (checked by the decoder).
    pub health: Option<kip_shared::health::HealthReport>,
    /// The batch was a heartbeat (no records, only a report).
    pub heartbeat: bool,
}

/// Counts a sync body refused before it was decoded (unreadable body, unsupported encoding).
pub fn count_refused(metrics: &IngestMetrics, reason: &'static str) {
    metrics
        .rejected
        .get_or_create(&ReasonLabels { reason })
        .inc();
    metrics
        .batches
        .get_or_create(&ResultLabels { result: "rejected" })
        .inc();
}

/// Decodes `body` (gzip when `gzip`) within `limits`, stores the batch for `id` and counts
/// the outcome in `metrics`. Decoding runs on a blocking thread: inflating and parsing up to
/// `max_decoded_bytes` is CPU work.
pub async fn store(
    pool: &PgPool,
    limits: IngestLimits,
    metrics: &IngestMetrics,
    id: DeviceIdentity,
    body: Bytes,
    gzip: bool,
) -> Result<Stored, IngestError> {
    let decoded = tokio::task::spawn_blocking(move || ingest::decode(&body, gzip, limits))
        .await
        .map_err(|e| IngestError::Decoder(e.to_string()));
    let outcome = match decoded {
        Ok(Ok(batch)) => ingest::store(pool, id, &batch).await.map(|ack| Stored {
            ack,
            heartbeat: batch.records.is_empty(),
            running_model: batch.running_model,
            health: batch.health,
        }),
        Ok(Err(e)) | Err(e) => Err(e),
    };
    match &outcome {
        Ok(s) => {
            metrics
                .batches
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            metrics.records.inc_by(s.ack.inserted);
            metrics.duplicates.inc_by(s.ack.duplicates);
            tracing::debug!(
                org_id = %id.org_id, device_id = %id.device_id, epoch = s.ack.epoch,
                acked_seq = s.ack.acked_seq, inserted = s.ack.inserted,
                duplicates = s.ack.duplicates, "sync batch stored"
            );
        }
        Err(e) => {
            // A conflict is ours too (retryable): `rejected{reason="conflict"}`, `error`.
            let result = if matches!(
                e,
                IngestError::Db(_) | IngestError::Decoder(_) | IngestError::Conflict(_)
            ) {
                "error"
            } else {
                "rejected"
            };
            metrics
                .rejected
                .get_or_create(&ReasonLabels { reason: e.reason() })
                .inc();
            metrics
                .batches
                .get_or_create(&ResultLabels { result })
                .inc();
            tracing::warn!(
                org_id = %id.org_id, device_id = %id.device_id, error = %e,
                "sync batch not stored"
            );
        }
    }
    outcome
}
