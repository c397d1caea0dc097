//! The recent readings and predictions of one device, for the console's chart.
//!
//! Invariants: every query is keyed by the caller's organisation and device and bounded (at
//! most `max_series` series of `points` readings each, `points` predictions), and each reads
//! the newest rows through an index (`sensor_data_org_device_metric_ts`,
//! `predictions_org_device_machine_ts`), so a chart costs the same however long the device's
//! history is.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

/// One reading of a series.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SeriesPoint {
    pub machine: String,
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
}

/// One prediction of a machine.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PredictionPoint {
    pub machine: String,
    pub model_version: String,
    pub ts: DateTime<Utc>,
    pub rul_cycles: f64,
    pub anomaly_score: Option<f64>,
}

/// The newest `points` readings of each of the device's first `max_series` series (by
/// machine, metric), newest first within a series. The series are found by a skip scan of
/// the index (one index probe per series) instead of a DISTINCT over all readings.
pub async fn recent_readings(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    max_series: i64,
    points: i64,
) -> Result<Vec<SeriesPoint>, sqlx::Error> {
    sqlx::query_as(
        "WITH RECURSIVE s AS ( \
             (SELECT machine, metric FROM sensor_data WHERE org_id = $1 AND device_id = $2 \
              ORDER BY machine, metric LIMIT 1) \
             UNION ALL \
             SELECT n.machine, n.metric FROM s CROSS JOIN LATERAL ( \
                 SELECT machine, metric FROM sensor_data \
                 WHERE org_id = $1 AND device_id = $2 AND (machine, metric) > (s.machine, s.metric) \
                 ORDER BY machine, metric LIMIT 1) n) \
         SELECT s.machine, s.metric, r.ts, r.value FROM (SELECT * FROM s LIMIT $3) s \
         CROSS JOIN LATERAL (SELECT ts, value FROM sensor_data x \
             WHERE x.org_id = $1 AND x.device_id = $2 AND x.machine = s.machine \
               AND x.metric = s.metric ORDER BY x.ts DESC LIMIT $4) r \
         ORDER BY s.machine, s.metric, r.ts DESC",
    )
    .bind(org_id)
    .bind(device_id)
    .bind(max_series)
    .bind(points)
    .fetch_all(pool)
    .await
}

/// The newest `points` predictions of the device (all machines), newest first.
pub async fn recent_predictions(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    points: i64,
) -> Result<Vec<PredictionPoint>, sqlx::Error> {
    sqlx::query_as(
        "SELECT machine, model_version, ts, rul_cycles, anomaly_score FROM predictions \
         WHERE org_id = $1 AND device_id = $2 ORDER BY ts DESC LIMIT $3",
    )
    .bind(org_id)
    .bind(device_id)
    .bind(points)
    .fetch_all(pool)
    .await
}
