//! Prediction query API: the latest prediction per machine and the prediction history of an
//! organisation (`GET /v1/organisations/{org_id}/predictions[/latest]`).
//!
//! Invariants:
//! - Every query filters by the `org_id` checked against the caller's key; a `device_id` of
//!   another organisation simply matches nothing.
//! - History pages by keyset on `(ts, device_id, epoch, seq)` (the same cursor helper as the
//!   sensor-data API), so pages stay consistent while agents keep syncing.
//! - "The" prediction of a machine is its champion's: `latest` reads `role = 'champion'` only;
//!   history returns shadow predictions too (tagged), or one role with `role=`.
//! - Queries run in a read-only transaction with the sensor-data statement timeout
//!   ([`super::SENSOR_QUERY_TIMEOUT_MS`]): a slow query answers 504, never holds a connection.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
};
use chrono::{DateTime, Utc};
use kip_api::{PredictionPage, PredictionRecord};
use serde::Deserialize;
use uuid::Uuid;

use super::query::{bounded_tx, query_error};
use crate::http::{ApiError, ApiPath, ApiResult, Principal, pg_text};
use crate::http::{decode_record_cursor, encode_record_cursor};

/// Longest `machine` filter accepted.
const MAX_MACHINE_BYTES: usize = 1024;

/// Query string of `GET .../predictions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub device_id: Option<Uuid>,
    pub machine: Option<String>,
    /// Inclusive start (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Exclusive end (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    #[serde(default = "default_limit")]
    pub limit: i64,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only `champion` or only `shadow` predictions; default both.
    pub role: Option<String>,
}

/// Query string of `GET .../predictions/latest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatestQuery {
    pub device_id: Option<Uuid>,
    #[serde(default = "default_limit")]
    pub limit: i64,
}

fn default_limit() -> i64 {
    1000
}

fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::BadRequest(format!("invalid query string: {}", e.body_text()))
}

fn check_limit(limit: i64) -> ApiResult<()> {
    if (1..=10_000).contains(&limit) {
        Ok(())
    } else {
        Err(ApiError::validation("limit", "must be between 1 and 10000"))
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    device_id: Uuid,
    epoch: i64,
    seq: i64,
    machine: String,
    model_version: String,
    ts: DateTime<Utc>,
    rul_cycles: f64,
    anomaly_score: Option<f64>,
    role: String,
    model: Option<String>,
}

impl From<Row> for PredictionRecord {
    fn from(r: Row) -> Self {
        Self {
            device_id: r.device_id,
            machine: r.machine,
            model_version: r.model_version,
            ts: r.ts,
            rul_cycles: r.rul_cycles,
            anomaly_score: r.anomaly_score,
            role: r.role,
            model: r.model,
        }
    }
}

/// `GET /v1/organisations/{org_id}/predictions`: history, oldest first.
pub async fn history(
    State(pool): State<sqlx::PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<PredictionPage>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) = q.map_err(bad_query)?;
    check_limit(q.limit)?;
    if let Some(m) = &q.machine {
        pg_text("machine", m, MAX_MACHINE_BYTES)?;
    }
    if let Some(r) = &q.role
        && r != "champion"
        && r != "shadow"
    {
        return Err(ApiError::validation("role", "must be champion or shadow"));
    }
    if let (Some(f), Some(t)) = (q.from, q.to)
        && f >= t
    {
        return Err(ApiError::validation("from", "must be before `to`"));
    }
    let (cts, cdev, cep, cseq) = match decode_record_cursor(q.cursor.as_deref(), "prediction")? {
        Some((ts, dev, epoch, seq)) => (Some(ts), dev, epoch, seq),
        None => (None, Uuid::nil(), 0, 0),
    };
    let mut tx = bounded_tx(&pool).await.map_err(query_error)?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT device_id, epoch, seq, machine, model_version, ts, rul_cycles, anomaly_score, \
                role, model \
         FROM predictions WHERE org_id = $1 AND ($11::text IS NULL OR role = $11) \
           AND ($2::uuid IS NULL OR device_id = $2) AND ($3::text IS NULL OR machine = $3) \
           AND ($4::timestamptz IS NULL OR ts >= $4) AND ($5::timestamptz IS NULL OR ts < $5) \
           AND ($6::timestamptz IS NULL OR (ts, device_id, epoch, seq) > ($6, $7, $8, $9)) \
         ORDER BY ts, device_id, epoch, seq LIMIT $10",
    )
    .bind(org_id)
    .bind(q.device_id)
    .bind(&q.machine)
    .bind(q.from)
    .bind(q.to)
    .bind(cts)
    .bind(cdev)
    .bind(cep)
    .bind(cseq)
    .bind(q.limit)
    .bind(&q.role)
    .fetch_all(&mut *tx)
    .await
    .map_err(query_error)?;
    let next_cursor = (rows.len() as i64 == q.limit)
        .then(|| rows.last())
        .flatten()
        .map(|r| encode_record_cursor(r.ts, r.device_id, r.epoch, r.seq));
    Ok(Json(PredictionPage {
        predictions: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// `GET /v1/organisations/{org_id}/predictions/latest`: the newest prediction of every
/// (device, machine), ordered by device and machine.
pub async fn latest(
    State(pool): State<sqlx::PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<LatestQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<PredictionRecord>>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) = q.map_err(bad_query)?;
    check_limit(q.limit)?;
    let mut tx = bounded_tx(&pool).await.map_err(query_error)?;
    // DISTINCT ON walks predictions_org_device_machine_ts backwards per (device, machine).
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (device_id, machine) \
                device_id, epoch, seq, machine, model_version, ts, rul_cycles, anomaly_score, \
                role, model \
         FROM predictions WHERE org_id = $1 AND ($2::uuid IS NULL OR device_id = $2) \
           AND role = 'champion' \
         ORDER BY device_id, machine, ts DESC, epoch DESC, seq DESC LIMIT $3",
    )
    .bind(org_id)
    .bind(q.device_id)
    .bind(q.limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(query_error)?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}
