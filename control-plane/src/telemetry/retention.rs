//! Raw-data retention per organisation (`GET`/`PUT`/`DELETE .../telemetry/retention`).
//!
//! Invariants:
//! - The setting is stored in `telemetry_retention`, keyed by the organisation checked against
//!   the caller's key; another organisation can neither read nor change it.
//! - It never deletes rows itself: the query API hides raw readings older than it at once, and
//!   [`super::storage::maintain`] drops whole partitions once every organisation's retention
//!   allows it (partitions are shared). Rollups are kept.

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::{ApiError, ApiJson, ApiPath, ApiResult, Principal};

/// Longest retention accepted (100 years).
pub const MAX_RAW_RETENTION_DAYS: i32 = 36_500;

/// Body of `PUT` and answer of `GET`/`PUT`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Days raw readings stay readable (and stored, once every organisation allows the drop);
    /// `null` in an answer: kept without limit.
    pub raw_retention_days: Option<i32>,
}

/// `GET /v1/organisations/{org_id}/telemetry/retention`
pub async fn get(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Retention>> {
    let org_id = p.org_scope(org_id)?;
    let days: Option<i32> =
        sqlx::query_scalar("SELECT raw_retention_days FROM telemetry_retention WHERE org_id = $1")
            .bind(org_id)
            .fetch_optional(&pool)
            .await?;
    Ok(Json(Retention {
        raw_retention_days: days,
    }))
}

/// `PUT /v1/organisations/{org_id}/telemetry/retention`
pub async fn put(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<Retention>,
) -> ApiResult<Json<Retention>> {
    let org_id = p.org_scope(org_id)?;
    let Some(days) = body.raw_retention_days else {
        return Err(ApiError::validation(
            "raw_retention_days",
            "is required (DELETE removes the retention)",
        ));
    };
    if !(1..=MAX_RAW_RETENTION_DAYS).contains(&days) {
        return Err(ApiError::validation(
            "raw_retention_days",
            format!("must be between 1 and {MAX_RAW_RETENTION_DAYS}"),
        ));
    }
    sqlx::query(
        "INSERT INTO telemetry_retention (org_id, raw_retention_days) VALUES ($1, $2) \
         ON CONFLICT (org_id) DO UPDATE SET raw_retention_days = EXCLUDED.raw_retention_days, \
                                            updated_at = now()",
    )
    .bind(org_id)
    .bind(days)
    .execute(&pool)
    .await?;
    Ok(Json(Retention {
        raw_retention_days: Some(days),
    }))
}

/// `DELETE /v1/organisations/{org_id}/telemetry/retention`: keep raw readings without limit.
pub async fn delete(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query("DELETE FROM telemetry_retention WHERE org_id = $1")
        .bind(org_id)
        .execute(&pool)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
