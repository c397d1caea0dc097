//! The latest state of an organisation's machines for grounded answers: the newest reading of
//! each series (device, machine, metric) with the earliest reading of the hour before it (the
//! trend), and the newest prediction of each machine.
//!
//! Invariants: every query is keyed by the caller's organisation and bounded (series seen in
//! the last 30 days, at most `limit` rows), so a tool call costs the same however much history
//! the organisation has.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// The newest reading of one series and where it came from an hour earlier.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LatestReading {
    pub device: String,
    pub machine: String,
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
    /// The earliest reading within the hour before `ts` (None: no older reading).
    pub earlier_ts: Option<DateTime<Utc>>,
    pub earlier_value: Option<f64>,
}

/// The newest prediction of one machine.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LatestPrediction {
    /// `device_id:epoch:seq`, the prediction's key.
    pub prediction_id: String,
    pub device: String,
    pub machine: String,
    pub model_version: String,
    pub ts: DateTime<Utc>,
    pub rul_cycles: f64,
    pub anomaly_score: Option<f64>,
}

/// Newest reading per series of `org` (series seen in the last 30 days), at most `limit`.
pub async fn latest_readings(
    pool: &PgPool,
    org: Uuid,
    limit: i64,
) -> Result<Vec<LatestReading>, sqlx::Error> {
    sqlx::query_as(
        "SELECT l.device, l.machine, l.metric, l.ts, l.value, e.ts AS earlier_ts, \
                e.value AS earlier_value \
         FROM (SELECT DISTINCT ON (s.device_id, s.machine, s.metric) \
                      d.name AS device, s.device_id, s.machine, s.metric, s.ts, s.value \
               FROM sensor_data s JOIN devices d ON d.org_id = s.org_id AND d.id = s.device_id \
               WHERE s.org_id = $1 AND s.ts > now() - interval '30 days' \
               ORDER BY s.device_id, s.machine, s.metric, s.ts DESC) l \
         LEFT JOIN LATERAL (SELECT p.ts, p.value FROM sensor_data p \
               WHERE p.org_id = $1 AND p.device_id = l.device_id AND p.machine = l.machine \
                 AND p.metric = l.metric AND p.ts >= l.ts - interval '1 hour' AND p.ts < l.ts \
               ORDER BY p.ts LIMIT 1) e ON true \
         ORDER BY l.ts DESC LIMIT $2",
    )
    .bind(org)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Newest prediction per machine of `org`, at most `limit`.
pub async fn latest_predictions(
    pool: &PgPool,
    org: Uuid,
    limit: i64,
) -> Result<Vec<LatestPrediction>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM (SELECT DISTINCT ON (p.device_id, p.machine) \
                p.device_id::text || ':' || p.epoch || ':' || p.seq AS prediction_id, \
                d.name AS device, p.machine, p.model_version, p.ts, p.rul_cycles, p.anomaly_score \
         FROM predictions p JOIN devices d ON d.org_id = p.org_id AND d.id = p.device_id \
         WHERE p.org_id = $1 AND p.ts > now() - interval '30 days' \
         ORDER BY p.device_id, p.machine, p.ts DESC) x ORDER BY ts DESC LIMIT $2",
    )
    .bind(org)
    .bind(limit)
    .fetch_all(pool)
    .await
}
