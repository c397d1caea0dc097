//! Machine-learning data domain: feature-set documents, maintenance events (the ground truth
//! that turns readings into labelled examples), what each model version was trained on
//! (`training_data`) and how well it performs (`model_performance`).
//!
//! Invariants:
//! - Every query filters by the `org_id` checked by [`Principal::org_scope`]; rows referring
//!   to a device or model check it belongs to that organisation in the same statement (404
//!   otherwise), and composite foreign keys back this up in the schema.
//! - A feature-set document is stored only after it passed
//!   [`kip_shared::feature_set::FeatureSet::new`] (the interpreter training and agents use), in
//!   its canonical JSON; a stored id never changes meaning: storing other content under an
//!   existing id is a 409, storing the same content again is idempotent.
//! - Maintenance event listings page by keyset on `(ts, id)` with the crate's one cursor helper
//!   ([`crate::http::encode_cursor`]).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Query, State, rejection::QueryRejection},
    http::StatusCode,
    routing::get,
};
use chrono::{DateTime, Utc};
use kip_api::{
    FeatureSetInfo, MaintenanceEvent, MaintenanceEventPage, ModelPerformance,
    RecordMaintenanceEvent, RecordPerformance, RecordTrainingData, TrainingData,
};
use kip_shared::feature_set::{FeatureSet, FeatureSetDoc};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::http::{
    ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, ListParams, Principal, list_limit,
    pg_json, pg_text,
};
use crate::http::{decode_cursor, encode_cursor};

pub mod compare;
pub mod monitoring;

/// The ML data routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
{
    Router::new()
        .route(
            "/organisations/{org_id}/feature-sets",
            get(list_feature_sets).post(store_feature_set),
        )
        .route(
            "/organisations/{org_id}/feature-sets/{feature_set_id}",
            get(get_feature_set),
        )
        .route(
            "/organisations/{org_id}/maintenance-events",
            get(list_maintenance).post(record_maintenance),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}/training-data",
            get(get_training_data).put(put_training_data),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}/performance",
            get(list_performance).post(record_performance),
        )
        .route(
            "/organisations/{org_id}/model-monitoring",
            get(monitoring::list),
        )
        .route(
            "/organisations/{org_id}/model-rollouts/{rollout_id}/report",
            get(compare::get_report),
        )
}

/// Largest feature-set document, as compact JSON.
const MAX_FEATURE_SET_BYTES: usize = 256 * 1024;
/// Longest machine name, note, evaluation set name.
const MAX_MACHINE_BYTES: usize = 256;
const MAX_NOTE_BYTES: usize = 4096;
/// Largest `source` / `split` / `metrics` document.
const MAX_DOC_BYTES: usize = 64 * 1024;

// ---------- feature sets ----------

#[derive(sqlx::FromRow)]
struct FeatureSetRow {
    feature_set_id: String,
    sha256: String,
    document: sqlx::types::Json<serde_json::Value>,
    created_at: DateTime<Utc>,
}

impl From<FeatureSetRow> for FeatureSetInfo {
    fn from(r: FeatureSetRow) -> Self {
        Self {
            id: r.feature_set_id,
            sha256: r.sha256,
            document: r.document.0,
            created_at: r.created_at,
        }
    }
}

/// `POST .../feature-sets`: the body is a feature-set document.
async fn store_feature_set(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(doc): ApiJson<FeatureSetDoc>,
) -> ApiResult<(StatusCode, Json<FeatureSetInfo>)> {
    let org_id = p.org_scope(org_id)?;
    let set = FeatureSet::new(doc).map_err(|e| ApiError::validation("document", e.to_string()))?;
    // Canonical form: what the interpreter would ship inside a model.
    let canonical = set.to_json();
    let document: serde_json::Value =
        serde_json::from_str(&canonical).map_err(ApiError::internal)?;
    pg_json("document", &document, MAX_FEATURE_SET_BYTES)?;
    let sha = hex::encode(Sha256::digest(canonical.as_bytes()));
    let inserted: Option<FeatureSetRow> = sqlx::query_as(
        "INSERT INTO feature_sets (org_id, feature_set_id, document, sha256) \
         SELECT o.id, $2, $3, $4 FROM organisations o WHERE o.id = $1 \
         ON CONFLICT (org_id, feature_set_id) DO NOTHING \
         RETURNING feature_set_id, sha256, document, created_at",
    )
    .bind(org_id)
    .bind(set.id())
    .bind(sqlx::types::Json(&document))
    .bind(&sha)
    .fetch_optional(&pool)
    .await?;
    if let Some(row) = inserted {
        tracing::info!(%org_id, feature_set = %row.feature_set_id, "feature set stored");
        return Ok((StatusCode::CREATED, Json(row.into())));
    }
    let existing = fetch_feature_set(&pool, org_id, set.id())
        .await?
        .ok_or(ApiError::NotFound("organisation"))?;
    if existing.sha256 != sha {
        return Err(ApiError::Conflict(format!(
            "feature set {} exists with other content; a changed definition needs a new id",
            set.id()
        )));
    }
    Ok((StatusCode::OK, Json(existing.into())))
}

async fn fetch_feature_set(
    pool: &PgPool,
    org_id: Uuid,
    id: &str,
) -> ApiResult<Option<FeatureSetRow>> {
    Ok(sqlx::query_as(
        "SELECT feature_set_id, sha256, document, created_at FROM feature_sets \
         WHERE org_id = $1 AND feature_set_id = $2",
    )
    .bind(org_id)
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

async fn get_feature_set(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, id)): ApiPath<(Uuid, String)>,
) -> ApiResult<Json<FeatureSetInfo>> {
    let org_id = p.org_scope(org_id)?;
    pg_text("feature_set_id", &id, MAX_MACHINE_BYTES)?;
    fetch_feature_set(&pool, org_id, &id)
        .await?
        .map(|r| Json(r.into()))
        .ok_or(ApiError::NotFound("feature set"))
}

async fn list_feature_sets(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Json<Vec<FeatureSetInfo>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_limit(q)?;
    crate::http::list_rows::<FeatureSetRow, _>(
        &pool,
        "SELECT feature_set_id, sha256, document, created_at FROM feature_sets \
         WHERE org_id = $1 ORDER BY feature_set_id LIMIT $2",
        Some(org_id),
        limit,
    )
    .await
}

// ---------- maintenance events ----------

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    org_id: Uuid,
    device_id: Uuid,
    machine: String,
    kind: String,
    ts: DateTime<Utc>,
    note: String,
    created_at: DateTime<Utc>,
}

impl From<EventRow> for MaintenanceEvent {
    fn from(r: EventRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            device_id: r.device_id,
            machine: r.machine,
            kind: r.kind,
            ts: r.ts,
            note: r.note,
            created_at: r.created_at,
        }
    }
}

/// `POST .../maintenance-events`
async fn record_maintenance(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<RecordMaintenanceEvent>,
) -> ApiResult<(StatusCode, Json<MaintenanceEvent>)> {
    let org_id = p.org_scope(org_id)?;
    pg_text("machine", &body.machine, MAX_MACHINE_BYTES)?;
    if body.machine.is_empty() {
        return Err(ApiError::validation("machine", "must not be empty"));
    }
    pg_text("note", &body.note, MAX_NOTE_BYTES)?;
    let row: EventRow = sqlx::query_as(
        "INSERT INTO maintenance_events (id, org_id, device_id, machine, kind, ts, note) \
         SELECT $1, d.org_id, d.id, $4, $5, $6, $7 FROM devices d \
         WHERE d.org_id = $2 AND d.id = $3 \
         RETURNING id, org_id, device_id, machine, kind, ts, note, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(body.device_id)
    .bind(&body.machine)
    .bind(body.kind.as_str())
    .bind(body.ts)
    .bind(&body.note)
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("device"))?;
    tracing::info!(%org_id, device_id = %row.device_id, machine = %row.machine, kind = %row.kind, "maintenance event recorded");
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// Query string of `GET .../maintenance-events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    device_id: Option<Uuid>,
    machine: Option<String>,
    #[serde(default = "default_event_limit")]
    limit: i64,
    cursor: Option<String>,
}

fn default_event_limit() -> i64 {
    100
}

/// `GET .../maintenance-events`: oldest first, keyset pages on `(ts, id)`.
async fn list_maintenance(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> ApiResult<Json<MaintenanceEventPage>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    if let Some(m) = &q.machine {
        pg_text("machine", m, MAX_MACHINE_BYTES)?;
    }
    let (cts, cid) = match q.cursor.as_deref().map(decode_cursor).transpose()? {
        Some((ts, id, _)) => (
            Some(ts),
            id.parse::<Uuid>()
                .map_err(|_| ApiError::validation("cursor", "is not a maintenance-event cursor"))?,
        ),
        None => (None, Uuid::nil()),
    };
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, org_id, device_id, machine, kind, ts, note, created_at \
         FROM maintenance_events WHERE org_id = $1 \
           AND ($2::uuid IS NULL OR device_id = $2) AND ($3::text IS NULL OR machine = $3) \
           AND ($4::timestamptz IS NULL OR (ts, id) > ($4, $5)) \
         ORDER BY ts, id LIMIT $6",
    )
    .bind(org_id)
    .bind(q.device_id)
    .bind(&q.machine)
    .bind(cts)
    .bind(cid)
    .bind(q.limit)
    .fetch_all(&pool)
    .await?;
    let next_cursor = (rows.len() as i64 == q.limit)
        .then(|| rows.last())
        .flatten()
        .map(|r| encode_cursor(r.ts, &r.id.to_string(), ""));
    Ok(Json(MaintenanceEventPage {
        events: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

// ---------- training data ----------

#[derive(sqlx::FromRow)]
struct TrainingRow {
    model_id: Uuid,
    feature_set_id: Option<String>,
    source: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    split: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    seed: i64,
    examples: i64,
    created_at: DateTime<Utc>,
}

impl From<TrainingRow> for TrainingData {
    fn from(r: TrainingRow) -> Self {
        Self {
            model_id: r.model_id,
            feature_set_id: r.feature_set_id,
            source: r.source.0,
            split: r.split.0,
            seed: r.seed,
            examples: r.examples,
            created_at: r.created_at,
        }
    }
}

/// `PUT .../models/{model_id}/training-data`: records (or replaces) what the version was
/// trained on.
async fn put_training_data(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<RecordTrainingData>,
) -> ApiResult<Json<TrainingData>> {
    let org_id = p.org_scope(org_id)?;
    pg_json(
        "source",
        &serde_json::Value::Object(body.source.clone()),
        MAX_DOC_BYTES,
    )?;
    pg_json(
        "split",
        &serde_json::Value::Object(body.split.clone()),
        MAX_DOC_BYTES,
    )?;
    if let Some(f) = &body.feature_set_id {
        pg_text("feature_set_id", f, MAX_MACHINE_BYTES)?;
        if fetch_feature_set(&pool, org_id, f).await?.is_none() {
            return Err(ApiError::validation(
                "feature_set_id",
                format!("no feature set {f} in this organisation (POST .../feature-sets first)"),
            ));
        }
    }
    if body.examples < 0 {
        return Err(ApiError::validation("examples", "must not be negative"));
    }
    let row: TrainingRow = sqlx::query_as(
        "INSERT INTO training_data (model_id, org_id, feature_set_id, source, split, seed, examples) \
         SELECT m.id, m.org_id, $3, $4, $5, $6, $7 FROM ai_models m WHERE m.org_id = $1 AND m.id = $2 \
         ON CONFLICT (model_id) DO UPDATE SET feature_set_id = EXCLUDED.feature_set_id, \
           source = EXCLUDED.source, split = EXCLUDED.split, seed = EXCLUDED.seed, \
           examples = EXCLUDED.examples, created_at = now() \
         RETURNING model_id, feature_set_id, source, split, seed, examples, created_at",
    )
    .bind(org_id)
    .bind(model_id)
    .bind(&body.feature_set_id)
    .bind(sqlx::types::Json(&body.source))
    .bind(sqlx::types::Json(&body.split))
    .bind(body.seed)
    .bind(body.examples)
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("model"))?;
    if let Some(f) = &body.feature_set_id {
        sqlx::query("UPDATE ai_models SET feature_set_id = $3 WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(model_id)
            .bind(f)
            .execute(&pool)
            .await?;
    }
    Ok(Json(row.into()))
}

async fn get_training_data(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<TrainingData>> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query_as::<_, TrainingRow>(
        "SELECT model_id, feature_set_id, source, split, seed, examples, created_at \
         FROM training_data WHERE org_id = $1 AND model_id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(&pool)
    .await?
    .map(|r| Json(r.into()))
    .ok_or(ApiError::NotFound("training data of this model"))
}

// ---------- model performance ----------

#[derive(sqlx::FromRow)]
struct PerformanceRow {
    model_id: Uuid,
    evaluation_set: String,
    source: String,
    rmse: Option<f64>,
    phm08_score: Option<f64>,
    examples: i64,
    metrics: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    measured_at: DateTime<Utc>,
}

impl From<PerformanceRow> for ModelPerformance {
    fn from(r: PerformanceRow) -> Self {
        Self {
            model_id: r.model_id,
            evaluation_set: r.evaluation_set,
            source: r.source,
            rmse: r.rmse,
            phm08_score: r.phm08_score,
            examples: r.examples,
            metrics: r.metrics.0,
            measured_at: r.measured_at,
        }
    }
}

/// `POST .../models/{model_id}/performance`: records (or replaces) one figure set.
async fn record_performance(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<RecordPerformance>,
) -> ApiResult<(StatusCode, Json<ModelPerformance>)> {
    let org_id = p.org_scope(org_id)?;
    pg_text("evaluation_set", &body.evaluation_set, MAX_MACHINE_BYTES)?;
    if body.evaluation_set.is_empty() {
        return Err(ApiError::validation("evaluation_set", "must not be empty"));
    }
    for (field, v) in [("rmse", body.rmse), ("phm08_score", body.phm08_score)] {
        if v.is_some_and(|x| !(0.0..=1e300).contains(&x)) {
            return Err(ApiError::validation(
                field,
                "must be a finite, non-negative number",
            ));
        }
    }
    if body.examples < 0 {
        return Err(ApiError::validation("examples", "must not be negative"));
    }
    let metrics = serde_json::Value::Object(body.metrics.clone());
    pg_json("metrics", &metrics, MAX_DOC_BYTES)?;
    let row: PerformanceRow = sqlx::query_as(
        "INSERT INTO model_performance \
           (org_id, model_id, evaluation_set, source, rmse, phm08_score, examples, metrics) \
         SELECT m.org_id, m.id, $3, $4, $5, $6, $7, $8 FROM ai_models m \
         WHERE m.org_id = $1 AND m.id = $2 \
         ON CONFLICT (model_id, evaluation_set, source) DO UPDATE SET rmse = EXCLUDED.rmse, \
           phm08_score = EXCLUDED.phm08_score, examples = EXCLUDED.examples, \
           metrics = EXCLUDED.metrics, measured_at = now() \
         RETURNING model_id, evaluation_set, source, rmse, phm08_score, examples, metrics, measured_at",
    )
    .bind(org_id)
    .bind(model_id)
    .bind(&body.evaluation_set)
    .bind(body.source.as_str())
    .bind(body.rmse)
    .bind(body.phm08_score)
    .bind(body.examples)
    .bind(sqlx::types::Json(&body.metrics))
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("model"))?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

async fn list_performance(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Vec<ModelPerformance>>> {
    let org_id = p.org_scope(org_id)?;
    let rows: Vec<PerformanceRow> = sqlx::query_as(
        "SELECT model_id, evaluation_set, source, rmse, phm08_score, examples, metrics, measured_at \
         FROM model_performance WHERE org_id = $1 AND model_id = $2 \
         ORDER BY evaluation_set, source",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_all(&pool)
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}
