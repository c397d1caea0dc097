//! Models domain: the model registry (versions, artifacts, stages), the MLflow mirror and the
//! rollout of model versions to devices.
//!
//! Invariants:
//! - Every query filters by the `org_id` checked by [`Principal::org_scope`].
//! - A device is only ever offered, and can only download, the model desired for it
//!   ([`desired_for`]); its identity comes from its client certificate, which the agent API
//!   checked before calling [`artifact_for_device`].
//! - MLflow (when configured) is told after kip committed; its failures are logged and counted
//!   and never fail the kip request (kip's registry is the source of truth).
//!
//! - Every artifact is signed at upload with the model signing key ([`signing`]); agents
//!   receive the trusted public keys with each sync ack ([`trusted_signing_keys`]) and refuse
//!   a model whose signature does not verify.
//!
//! Canary and shadow rollouts with automatic halt live in [`rollouts`]; the comparison
//! report and the evaluator that calls [`auto_halt`] are the `ml` domain's (it reads the
//! predictions, ground truth and drift).
//!
//! Interface for other domains: [`desired_for`] and [`desired_shadow_for`] (the models for a
//! sync ack), [`model_rollout`], [`active_rollouts`], [`auto_halt`], [`mark_evaluated`],
//! [`trusted_signing_keys`] (the keys for a sync ack), [`record_running`] (what a device
//! reports running) and [`artifact_for_device`] (the agent's download).

pub mod mlflow;
mod registry;
mod rollouts;
pub mod signing;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRef, Query, State, rejection::QueryRejection},
    http::StatusCode,
    routing::{get, post, put},
};
use chrono::{DateTime, Utc};
use kip_api::{AiModel, ModelStage, RegisterModel};
use sqlx::PgPool;
use uuid::Uuid;

use self::mlflow::MlflowSync;
pub use self::registry::{
    GroupRollout, MAX_ARTIFACT_BYTES, ModelVersion, admin_artifact_path, agent_download_path,
    artifact_for_device, desired_for, desired_shadow_for, group_rollouts, model_versions,
    record_running, roll_back, rollout_status, set_desired_model, set_desired_model_for_group,
};
pub(crate) use self::registry::{
    clean_model_error, desired_of_device, model_for_device, shadow_of_device, upsert_model_status,
};
pub use self::rollouts::{
    Crossing, active_rollouts, auto_halt, mark_evaluated, rollout as model_rollout,
    rollouts as model_rollouts,
};
use crate::http::{
    ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, ListParams, Principal, get_row,
    list_limit, list_rows, parse_name, pg_json, pg_text,
};

/// The MLflow mirror as held in the application state; `None` unless `[mlflow] tracking_uri`
/// is set.
pub type Mlflow = Option<Arc<MlflowSync>>;

/// The model signing key set as held in the application state; `None` when `pki.ca_dir` is
/// not set (then there is no agent listener either).
pub type Signing = Option<Arc<signing::ModelSigning>>;

/// The model signing public keys agents must trust (PEM), for the sync ack's desired state.
pub fn trusted_signing_keys(signing: &Signing) -> Option<String> {
    signing.as_ref().map(|s| s.trusted_pem())
}

/// The model routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
    Mlflow: FromRef<S>,
    Signing: FromRef<S>,
{
    Router::new()
        .route("/model-signing", get(signing_status))
        .route("/mlflow/status", get(mlflow_status))
        .route(
            "/organisations/{org_id}/models",
            get(list_models).post(register_model),
        )
        .route("/organisations/{org_id}/models/{model_id}", get(get_model))
        .route(
            "/organisations/{org_id}/models/{model_id}/artifact",
            get(registry::download_artifact)
                .put(registry::upload_artifact)
                .layer(DefaultBodyLimit::max(MAX_ARTIFACT_BYTES)),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}/stage",
            post(registry::set_stage),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/desired-model",
            put(registry::put_desired_model),
        )
        .route(
            "/organisations/{org_id}/model-status",
            get(registry::list_device_model_status),
        )
        .route(
            "/organisations/{org_id}/model-rollouts",
            get(rollouts::list).post(rollouts::start),
        )
        .route(
            "/organisations/{org_id}/model-rollouts/{rollout_id}",
            get(rollouts::get),
        )
        .route(
            "/organisations/{org_id}/model-rollouts/{rollout_id}/percent",
            post(rollouts::set_percent),
        )
        .route(
            "/organisations/{org_id}/model-rollouts/{rollout_id}/promote",
            post(rollouts::promote),
        )
        .route(
            "/organisations/{org_id}/model-rollouts/{rollout_id}/halt",
            post(rollouts::halt),
        )
}

/// Columns of an [`ModelRow`], for `RETURNING` and `SELECT`.
const MODEL_COLUMNS: &str =
    "id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at";

/// `ai_models` row; the API shape is [`AiModel`].
#[derive(sqlx::FromRow)]
struct ModelRow {
    id: Uuid,
    org_id: Uuid,
    name: String,
    version: String,
    kind: String,
    stage: String,
    artifact_sha256: Option<String>,
    uri: Option<String>,
    metrics: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    created_at: DateTime<Utc>,
}

impl From<ModelRow> for AiModel {
    fn from(r: ModelRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            name: r.name,
            version: r.version,
            kind: r.kind,
            stage: r.stage,
            artifact_sha256: r.artifact_sha256,
            uri: r.uri,
            metrics: r.metrics.0,
            created_at: r.created_at,
        }
    }
}

/// Largest magnitude of a number in a model's metrics. PostgreSQL keeps jsonb numbers as
/// exact decimals; one near `f64::MAX` comes back as a 309-digit literal that serde_json reads
/// as infinity ("number out of range"), which made every later listing of the model fail.
const MAX_METRIC_MAGNITUDE: f64 = 1e300;

/// Refuses numbers in `metrics` that could not be read back (see [`MAX_METRIC_MAGNITUDE`]).
fn check_metric_numbers(metrics: &serde_json::Value) -> ApiResult<()> {
    let mut stack = vec![metrics];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::Number(n)
                if n.as_f64().is_none_or(|x| x.abs() > MAX_METRIC_MAGNITUDE) =>
            {
                return Err(ApiError::validation(
                    "metrics",
                    "numbers must lie between -1e300 and 1e300",
                ));
            }
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => stack.extend(o.values()),
            _ => {}
        }
    }
    Ok(())
}

/// Largest metrics document of a model, as compact JSON.
const MAX_METRICS_BYTES: usize = 64 * 1024;

async fn register_model(
    State(pool): State<PgPool>,
    State(mlflow): State<Mlflow>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<RegisterModel>,
) -> ApiResult<(StatusCode, Json<AiModel>)> {
    let org_id = p.org_scope(org_id)?;
    let name = parse_name("name", &body.name)?;
    if body.version.is_empty()
        || body.version.len() > 64
        || !body
            .version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
    {
        return Err(ApiError::validation(
            "version",
            "must be 1 to 64 characters of letters, digits, '-', '_', '.', '+'",
        ));
    }
    if let Some(h) = &body.artifact_sha256
        && (h.len() != 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    {
        return Err(ApiError::validation(
            "artifact_sha256",
            "must be 64 lowercase hex characters",
        ));
    }
    if let Some(u) = &body.uri {
        pg_text("uri", u, 2048)?;
        if u.is_empty() {
            return Err(ApiError::validation("uri", "must be 1 to 2048 characters"));
        }
    }
    let metrics = serde_json::Value::Object(body.metrics.clone());
    pg_json("metrics", &metrics, MAX_METRICS_BYTES)?;
    check_metric_numbers(&metrics)?;
    let model: AiModel = sqlx::query_as::<_, ModelRow>(
        "INSERT INTO ai_models (id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics) \
         SELECT $1, o.id, $3, $4, $5, $6, $7, $8, $9 FROM organisations o WHERE o.id = $2 \
         RETURNING id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(name.as_str())
    .bind(&body.version)
    .bind(body.kind.as_str())
    .bind(body.stage.unwrap_or(ModelStage::None).as_str())
    .bind(&body.artifact_sha256)
    .bind(&body.uri)
    .bind(sqlx::types::Json(&body.metrics))
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?
    .into();
    tracing::info!(%org_id, model_id = %model.id, name = %model.name, version = %model.version, "model registered");
    if let Some(ml) = &mlflow {
        ml.model_registered(&model).await;
    }
    Ok((StatusCode::CREATED, Json(model)))
}

async fn list_models(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Json<Vec<AiModel>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_limit(q)?;
    list_rows::<ModelRow, _>(
        &pool,
        "SELECT id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at \
         FROM ai_models WHERE org_id = $1 ORDER BY name, created_at LIMIT $2",
        Some(org_id),
        limit,
    )
    .await
}

async fn get_model(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<AiModel>> {
    let org_id = p.org_scope(org_id)?;
    get_row::<ModelRow, _>(
        &pool,
        "SELECT id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at \
         FROM ai_models WHERE org_id = $1 AND id = $2",
        org_id,
        model_id,
        "model",
    )
    .await
}

/// `GET /v1/model-signing` (platform-admin): the model signing keys and how many artifacts
/// each signs (what `kipctl ca finish-signing-key-rotation` checks).
async fn signing_status(
    State(pool): State<PgPool>,
    State(signing): State<Signing>,
    p: Principal,
) -> ApiResult<Json<kip_api::ModelSigningStatus>> {
    p.require_platform()?;
    let sg = signing.ok_or(ApiError::NotFound(
        "model signing key (pki.ca_dir is not set)",
    ))?;
    Ok(Json(signing::status(&pool, &sg).await?))
}

/// `GET /v1/mlflow/status`: whether MLflow is reachable as the alias poller last found it
/// (`models:read`; the same for every organisation: one tracking server per installation).
async fn mlflow_status(State(mlflow): State<Mlflow>, _p: Principal) -> Json<kip_api::MlflowStatus> {
    Json(
        mlflow
            .as_ref()
            .map_or_else(mlflow::status_not_configured, |m| m.status()),
    )
}
