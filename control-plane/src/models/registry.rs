//! Model registry internals: artifact upload/download, champion/challenger aliases, rollout of
//! a model version to devices, and the devices' reported model status.
//!
//! Artifacts are stored in PostgreSQL (`model_artifact_chunks`, 1 MiB per row, with the
//! digest, size and signature in `model_artifacts`), not in a file store:
//! - the artifact and its registry row commit in one transaction, so a registered hash never
//!   points at a missing or half-written file, and a replica never sees a row whose file lives
//!   on another replica's disk;
//! - tenant isolation is the same composite foreign key as every other table
//!   (`(org_id, model_id)`), and organisation deletion cascades to artifacts;
//! - backups and restores of the database carry the models with them.
//!
//! Memory per transfer is bounded by one chunk ([`CHUNK_BYTES`]), not by the artifact:
//! uploads are streamed from the request body into chunk rows (hashing as they go) inside the
//! upload's transaction, downloads stream one chunk row at a time into the response. Uploads
//! are capped at [`MAX_ARTIFACT_BYTES`]; large models (LLMs) are registered by `uri` and never
//! uploaded. An upload holds one database connection for its duration (the transaction).
//!
//! Invariants:
//! - Artifacts are immutable: the sha256 is fixed by registration or by the first upload, and
//!   an upload with other bytes is refused (422), so a version always means the same bytes.
//! - At most one `champion` and one `challenger` per (organisation, model name): moving an
//!   alias demotes the previous holder to `none` in the same transaction, under row locks on
//!   every version of that name (partial unique indexes back this up).
//! - A device is only ever offered, and can only download, the model desired for it
//!   ([`desired_for`]); its identity comes from its client certificate.
//! - MLflow (when configured) is told after kip committed; its failures are logged and counted
//!   and never fail the kip request (kip's registry is the source of truth).

use axum::{
    Json,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use kip_api::{AiModel, ArtifactInfo, DeviceModelStatus, ModelStage, SetDesiredModel, SetStage};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::{MODEL_COLUMNS, Mlflow, ModelRow, Signing};
use crate::http::{ApiError, ApiJson, ApiPath, ApiResult, Principal};

/// Largest artifact accepted by `PUT .../artifact`.
pub const MAX_ARTIFACT_BYTES: usize = 64 * 1024 * 1024;
/// Size of one stored chunk (`model_artifact_chunks.bytes`); the last one may be shorter.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Path on the agent listener from which a device downloads a model desired for it.
pub fn agent_download_path(model_id: Uuid) -> String {
    format!("/v1/agent/models/{model_id}/artifact")
}

/// Path on the admin API of a model's artifact (also the `source` given to MLflow).
pub fn admin_artifact_path(org_id: Uuid, model_id: Uuid) -> String {
    format!("/v1/organisations/{org_id}/models/{model_id}/artifact")
}

// ---------- artifacts ----------

/// `PUT /v1/organisations/{org_id}/models/{model_id}/artifact`: stores the raw body as the
/// model's artifact. Idempotent for the same bytes; other bytes than registered are a 422.
pub async fn upload_artifact(
    State(pool): State<PgPool>,
    State(signing): State<Signing>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<ArtifactInfo>)> {
    let org_id = p.org_scope(org_id)?;
    let too_large = || ApiError::PayloadTooLarge {
        limit_bytes: MAX_ARTIFACT_BYTES,
    };
    // Refuse an announced oversize body before reading any of it.
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_ARTIFACT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut tx = pool.begin().await?;
    // Locked before the body is read: uploads of one model are serialised (no two streams
    // write the same chunk rows), and an unknown model is a 404 before any byte is stored.
    let (name, version, registered): (String, String, Option<String>) = sqlx::query_as(
        "SELECT name, version, artifact_sha256 FROM ai_models WHERE org_id = $1 AND id = $2 \
         FOR UPDATE",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApiError::NotFound("model"))?;
    let stored: Option<(String, i64, DateTime<Utc>, Option<String>)> = sqlx::query_as(
        "SELECT sha256, size_bytes, uploaded_at, signature FROM model_artifacts \
         WHERE org_id = $1 AND model_id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(&mut *tx)
    .await?;
    // Stream the body: hash every frame; store it in chunk rows unless the artifact exists
    // (then the bytes are only hashed, to compare). Dropping `tx` on any error rolls the
    // chunks back.
    let mut hash = Sha256::new();
    let mut size = 0usize;
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
    let mut idx = 0i32;
    let mut frames = body.into_data_stream();
    loop {
        let frame = frames
            .next()
            .await
            .transpose()
            .map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        let last = frame.is_none();
        let frame: Bytes = frame.unwrap_or_default();
        size += frame.len();
        if size > MAX_ARTIFACT_BYTES {
            return Err(too_large());
        }
        hash.update(&frame);
        if stored.is_some() {
            if last {
                break;
            }
            continue;
        }
        let mut rest = &frame[..];
        while !rest.is_empty() {
            let take = (CHUNK_BYTES - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.len() == CHUNK_BYTES {
                store_chunk(&mut tx, org_id, model_id, idx, &pending).await?;
                idx += 1;
                pending.clear();
            }
        }
        if last {
            if !pending.is_empty() {
                store_chunk(&mut tx, org_id, model_id, idx, &pending).await?;
            }
            break;
        }
    }
    drop(pending);
    if size == 0 {
        return Err(ApiError::validation("artifact", "must not be empty"));
    }
    let sha = hex::encode(hash.finalize());
    // Signed here, by the only path that saw the bytes: the signature covers the sha256 just
    // computed from the body, never a hash taken from the database.
    let signature = match &signing {
        Some(sg) => Some(
            sg.sign(org_id, &name, &version, &sha)
                .map_err(|e| ApiError::validation("model", e.to_string()))?
                .to_string(),
        ),
        None => None,
    };
    if let Some(want) = &registered
        && *want != sha
    {
        return Err(ApiError::validation(
            "artifact",
            format!("sha256 {sha} does not match the registered artifact_sha256 {want}"),
        ));
    }
    let size = i64::try_from(size).map_err(ApiError::internal)?;
    let (status, info) = match stored {
        // Same bytes again (the hash is fixed once stored). An artifact whose signature is
        // missing or does not verify (stored before signing existed, written around the API,
        // or signed by a retired key) is signed now: the caller just proved it holds exactly
        // these bytes.
        Some((stored, size_bytes, uploaded_at, existing)) => {
            if stored != sha {
                return Err(ApiError::validation(
                    "artifact",
                    format!("sha256 {sha} does not match the stored artifact {stored}"),
                ));
            }
            let valid = match (&signing, &existing) {
                (Some(sg), Some(e)) => sg.verifies(org_id, &name, &version, &sha, e),
                _ => existing.is_some(),
            };
            let signature = match (existing, signature) {
                (Some(e), _) if valid => Some(e),
                (_, Some(new)) => {
                    sqlx::query(
                        "UPDATE model_artifacts SET signature = $3, signed_at = now() \
                         WHERE org_id = $1 AND model_id = $2",
                    )
                    .bind(org_id)
                    .bind(model_id)
                    .bind(&new)
                    .execute(&mut *tx)
                    .await?;
                    tracing::info!(%org_id, %model_id, "unsigned model artifact signed on re-upload");
                    Some(new)
                }
                (e, None) => e,
            };
            (
                StatusCode::OK,
                ArtifactInfo {
                    model_id,
                    sha256: stored,
                    size_bytes,
                    uploaded_at,
                    signature,
                },
            )
        }
        None => {
            let uploaded_at: DateTime<Utc> = sqlx::query_scalar(
                "INSERT INTO model_artifacts (model_id, org_id, sha256, size_bytes, \
                 signature, signed_at) \
                 VALUES ($1, $2, $3, $4, $5, CASE WHEN $5::text IS NULL THEN NULL ELSE now() END) \
                 RETURNING uploaded_at",
            )
            .bind(model_id)
            .bind(org_id)
            .bind(&sha)
            .bind(size)
            .bind(&signature)
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE ai_models SET artifact_sha256 = $3 WHERE org_id = $1 AND id = $2 \
                 AND artifact_sha256 IS NULL",
            )
            .bind(org_id)
            .bind(model_id)
            .bind(&sha)
            .execute(&mut *tx)
            .await?;
            (
                StatusCode::CREATED,
                ArtifactInfo {
                    model_id,
                    sha256: sha,
                    size_bytes: size,
                    uploaded_at,
                    signature,
                },
            )
        }
    };
    tx.commit().await?;
    tracing::info!(%org_id, %model_id, sha256 = %info.sha256, size_bytes = info.size_bytes, "model artifact stored");
    Ok((status, Json(info)))
}

async fn store_chunk(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    model_id: Uuid,
    idx: i32,
    bytes: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO model_artifact_chunks (org_id, model_id, idx, bytes) VALUES ($1, $2, $3, $4)",
    )
    .bind(org_id)
    .bind(model_id)
    .bind(idx)
    .bind(bytes)
    .execute(tx)
    .await?;
    Ok(())
}

/// The artifact of `model_id` as a streamed response ([`crate::http::chunked_download`]: one
/// chunk row at a time), with its sha256 as the ETag.
async fn artifact_response(pool: &PgPool, org_id: Uuid, model_id: Uuid) -> ApiResult<Response> {
    let (sha, size): (String, i64) = sqlx::query_as(
        "SELECT sha256, size_bytes FROM model_artifacts WHERE org_id = $1 AND model_id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(pool)
    .await?
    .ok_or(ApiError::NotFound("model artifact"))?;
    let mut resp = crate::http::chunked_download(
        pool,
        "SELECT bytes FROM model_artifact_chunks WHERE org_id = $1 AND model_id = $2 AND idx = $3",
        "model artifact",
        org_id,
        model_id,
        "application/octet-stream",
        size,
        &sha,
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// `GET /v1/organisations/{org_id}/models/{model_id}/artifact`: the artifact bytes, with the
/// sha256 in `x-kip-sha256` and the ETag.
pub async fn download_artifact(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Response> {
    let org_id = p.org_scope(org_id)?;
    artifact_response(&pool, org_id, model_id).await
}

/// The answer of `GET /v1/agent/models/{model_id}/artifact` on the agent listener for the
/// device `(org_id, device_id)` named by its client certificate: the artifact of the model
/// desired for it, and only that one (404 otherwise, so a device cannot probe other models or
/// other organisations).
pub async fn artifact_for_device(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    model_id: Uuid,
) -> ApiResult<Response> {
    let desired = desired_model_id_for(pool, org_id, device_id).await?;
    if desired != Some(model_id)
        && shadow_model_id_for(pool, org_id, device_id).await? != Some(model_id)
    {
        tracing::warn!(%org_id, %device_id, %model_id, "device asked for a model not desired for it");
        return Err(ApiError::NotFound("model artifact"));
    }
    let resp = artifact_response(pool, org_id, model_id).await?;
    tracing::info!(%org_id, %device_id, %model_id, "model artifact sent to device");
    Ok(resp)
}

// ---------- stage / alias ----------

/// `POST /v1/organisations/{org_id}/models/{model_id}/stage`: moves the model to `stage`.
/// Moving `champion` or `challenger` demotes the previous holder to `none` atomically.
pub async fn set_stage(
    State(pool): State<PgPool>,
    State(mlflow): State<Mlflow>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<SetStage>,
) -> ApiResult<Json<AiModel>> {
    let org_id = p.org_scope(org_id)?;
    let mut tx = pool.begin().await?;
    let (name, previous): (String, String) =
        sqlx::query_as("SELECT name, stage FROM ai_models WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(model_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::NotFound("model"))?;
    // Lock every version of this name so two concurrent promotions serialize here.
    sqlx::query("SELECT id FROM ai_models WHERE org_id = $1 AND name = $2 ORDER BY id FOR UPDATE")
        .bind(org_id)
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    let mut demoted: Vec<AiModel> = Vec::new();
    if matches!(body.stage, ModelStage::Champion | ModelStage::Challenger) {
        let rows: Vec<ModelRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE ai_models SET stage = 'none' \
             WHERE org_id = $1 AND name = $2 AND stage = $3 AND id <> $4 RETURNING {MODEL_COLUMNS}"
        )))
        .bind(org_id)
        .bind(&name)
        .bind(body.stage.as_str())
        .bind(model_id)
        .fetch_all(&mut *tx)
        .await?;
        demoted = rows.into_iter().map(Into::into).collect();
    }
    let model: AiModel = sqlx::query_as::<_, ModelRow>(sqlx::AssertSqlSafe(format!(
        "UPDATE ai_models SET stage = $3 WHERE org_id = $1 AND id = $2 RETURNING {MODEL_COLUMNS}"
    )))
    .bind(org_id)
    .bind(model_id)
    .bind(body.stage.as_str())
    .fetch_one(&mut *tx)
    .await?
    .into();
    tx.commit().await?;
    tracing::info!(
        %org_id, %model_id, name = %model.name, version = %model.version,
        from = %previous, to = %model.stage, demoted = demoted.len(), "model stage changed"
    );
    if let Some(ml) = &mlflow {
        ml.stage_changed(&model, &previous, &demoted).await;
    }
    Ok(Json(model))
}

// ---------- rollout ----------

/// `device_model_status` joined with the rollout; the API shape is [`DeviceModelStatus`].
#[derive(sqlx::FromRow)]
struct StatusRow {
    device_id: Uuid,
    device_name: String,
    desired_model_id: Option<Uuid>,
    desired_model: Option<String>,
    running_model: Option<String>,
    last_error: Option<String>,
    updated_at: Option<DateTime<Utc>>,
    in_sync: bool,
}

impl From<StatusRow> for DeviceModelStatus {
    fn from(r: StatusRow) -> Self {
        Self {
            device_id: r.device_id,
            device_name: r.device_name,
            desired_model_id: r.desired_model_id,
            desired_model: r.desired_model,
            running_model: r.running_model,
            last_error: r.last_error,
            updated_at: r.updated_at,
            in_sync: r.in_sync,
        }
    }
}

/// The desired model of device `d` (a row of `devices` in scope), as the body of a LATERAL
/// subquery yielding `model_id`: the device's own row first, then an active canary or shadow
/// rollout that selects it (`rollouts::SELECTS_DEVICE`: canary serves the candidate, shadow
/// keeps the baseline), then the most recently updated label selector contained in its labels.
macro_rules! desired_of_device {
    () => {
        "SELECT c.model_id FROM ( \
             SELECT dm.model_id, 0 AS prio, dm.updated_at FROM desired_models dm \
              WHERE dm.org_id = d.org_id AND dm.device_id = d.id \
             UNION ALL \
             SELECT CASE WHEN r.mode = 'canary' THEN r.model_id ELSE r.baseline_model_id END, \
                    1, r.updated_at FROM model_rollouts r \
              WHERE r.org_id = d.org_id AND r.state = 'active' AND d.labels @> r.selector \
                AND release_bucket(r.model_id, d.id) < r.percent \
             UNION ALL \
             SELECT dm.model_id, 2, dm.updated_at FROM desired_models dm \
              WHERE dm.org_id = d.org_id AND dm.selector IS NOT NULL AND d.labels @> dm.selector \
         ) c ORDER BY c.prio, c.updated_at DESC LIMIT 1"
    };
}

/// The desired model of device `$2` of organisation `$1`.
const DESIRED_FOR_DEVICE: &str = concat!(
    "SELECT w.model_id FROM devices d CROSS JOIN LATERAL (",
    desired_of_device!(),
    ") w WHERE d.org_id = $1 AND d.id = $2"
);

pub(crate) use desired_of_device;

/// The shadow model of device `d` (a row of `devices` in scope), as the body of a LATERAL
/// subquery yielding `model_id`: from an active rollout that selects it, unless the device
/// has its own row (a pinned device runs no rollout).
macro_rules! shadow_of_device {
    () => {
        "SELECT CASE WHEN r.mode = 'canary' THEN r.baseline_model_id ELSE r.model_id END AS model_id \
         FROM model_rollouts r \
         WHERE r.org_id = d.org_id AND r.state = 'active' AND d.labels @> r.selector \
           AND release_bucket(r.model_id, d.id) < r.percent \
           AND NOT EXISTS (SELECT 1 FROM desired_models dm WHERE dm.org_id = d.org_id AND dm.device_id = d.id) \
         ORDER BY r.updated_at DESC LIMIT 1"
    };
}
pub(crate) use shadow_of_device;

/// What a device needs to fetch the model whose id is the SQL expression `$id` (in the scope
/// of a `devices` row `d`), as the body of a LATERAL subquery: `id`, `name`, `version`,
/// `sha256`, `signature`; no row without an artifact.
macro_rules! model_for_device {
    ($id:literal) => {
        concat!(
            "SELECT m.id, m.name, m.version, a.sha256, a.signature FROM ai_models m \
             JOIN model_artifacts a ON a.model_id = m.id AND a.org_id = m.org_id \
             WHERE m.org_id = d.org_id AND m.id = ",
            $id
        )
    };
}
pub(crate) use model_for_device;

/// The shadow model of device `$2` of organisation `$1`.
const SHADOW_FOR_DEVICE: &str = concat!(
    "SELECT w.model_id FROM devices d CROSS JOIN LATERAL (",
    shadow_of_device!(),
    ") w WHERE d.org_id = $1 AND d.id = $2"
);

async fn desired_model_id_for(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(DESIRED_FOR_DEVICE)
        .bind(org_id)
        .bind(device_id)
        .fetch_optional(pool)
        .await
}

async fn shadow_model_id_for(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(SHADOW_FOR_DEVICE)
        .bind(org_id)
        .bind(device_id)
        .fetch_optional(pool)
        .await
}

/// The model the control plane wants `device_id` to run, for `SyncAck.desired.model`;
/// `None` when nothing is rolled out to it (or its artifact is missing).
pub async fn desired_for(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<kip_shared::sync::DesiredModel>, sqlx::Error> {
    let Some(model_id) = desired_model_id_for(pool, org_id, device_id).await? else {
        return Ok(None);
    };
    desired_model(pool, org_id, model_id).await
}

/// The model `device_id` should run beside its champion (a canary or shadow rollout), for
/// `SyncAck.desired.shadow_model`.
pub async fn desired_shadow_for(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<kip_shared::sync::DesiredModel>, sqlx::Error> {
    let Some(model_id) = shadow_model_id_for(pool, org_id, device_id).await? else {
        return Ok(None);
    };
    desired_model(pool, org_id, model_id).await
}

async fn desired_model(
    pool: &PgPool,
    org_id: Uuid,
    model_id: Uuid,
) -> Result<Option<kip_shared::sync::DesiredModel>, sqlx::Error> {
    let row: Option<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT m.name, m.version, a.sha256, a.signature FROM ai_models m \
         JOIN model_artifacts a ON a.model_id = m.id AND a.org_id = m.org_id \
         WHERE m.org_id = $1 AND m.id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(name, version, sha256, signature)| kip_shared::sync::DesiredModel {
            name,
            version,
            sha256,
            download_path: agent_download_path(model_id),
            signature,
        },
    ))
}

/// The upsert of a device's `device_model_status` row from SQL placeholders (device, org,
/// running model, last error); a row of another organisation is never touched, and an
/// unchanged row is not rewritten (`updated_at` is when the report last changed).
macro_rules! upsert_model_status {
    ($device:literal, $org:literal, $running:literal, $error:literal) => {
        concat!(
            "INSERT INTO device_model_status (device_id, org_id, running_model, last_error) VALUES (",
            $device, ", ", $org, ", ", $running, ", ", $error,
            ") ON CONFLICT (device_id) DO UPDATE SET running_model = EXCLUDED.running_model, \
             last_error = EXCLUDED.last_error, updated_at = now() \
             WHERE device_model_status.org_id = EXCLUDED.org_id \
               AND (device_model_status.running_model, device_model_status.last_error) \
                   IS DISTINCT FROM (EXCLUDED.running_model, EXCLUDED.last_error)"
        )
    };
}
pub(crate) use upsert_model_status;

/// A device's model error as stored: bounded and free of NUL (device-supplied text).
pub(crate) fn clean_model_error(e: &str) -> String {
    e.chars()
        .filter(|c| *c != '\0')
        .take(kip_shared::sync::MODEL_ERROR_MAX_BYTES)
        .collect()
}

/// Records what a device reports running (`name@version`) and its last model error (the
/// sync endpoint writes the same row with the device's other reports in one statement,
/// [`crate::agent_api`]).
pub async fn record_running(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    running_model: Option<&str>,
    last_error: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(upsert_model_status!("$2", "$1", "$3", "$4"))
        .bind(org_id)
        .bind(device_id)
        .bind(running_model)
        .bind(last_error.map(clean_model_error))
        .execute(pool)
        .await?;
    Ok(())
}

/// `PUT /v1/organisations/{org_id}/devices/{device_id}/desired-model`: rolls a model version
/// (which must have an uploaded artifact) out to one device, or stops it (`model_id: null`).
pub async fn put_desired_model(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<SetDesiredModel>,
) -> ApiResult<Json<DeviceModelStatus>> {
    let org_id = p.org_scope(org_id)?;
    Ok(Json(
        set_desired_model(&pool, org_id, device_id, body.model_id).await?,
    ))
}

/// Rolls `model_id` (which must have an uploaded artifact) out to one device, or halts the
/// device's own rollout (`None`: its device row is removed, so a group rollout that matches
/// its labels applies again, else nothing). The API's `PUT .../desired-model` and the
/// console's actions both come here; the caller checked the organisation and the role.
pub async fn set_desired_model(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    model_id: Option<Uuid>,
) -> ApiResult<DeviceModelStatus> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM devices WHERE org_id = $1 AND id = $2)")
            .bind(org_id)
            .bind(device_id)
            .fetch_one(pool)
            .await?;
    if !exists {
        return Err(ApiError::NotFound("device"));
    }
    match model_id {
        Some(model_id) => {
            check_rollable(pool, org_id, model_id).await?;
            sqlx::query(
                "INSERT INTO desired_models (id, org_id, device_id, model_id) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (org_id, device_id) WHERE device_id IS NOT NULL \
                 DO UPDATE SET model_id = EXCLUDED.model_id, updated_at = now()",
            )
            .bind(Uuid::new_v4())
            .bind(org_id)
            .bind(device_id)
            .bind(model_id)
            .execute(pool)
            .await?;
            tracing::info!(%org_id, %device_id, %model_id, "model rolled out to device");
        }
        None => {
            sqlx::query("DELETE FROM desired_models WHERE org_id = $1 AND device_id = $2")
                .bind(org_id)
                .bind(device_id)
                .execute(pool)
                .await?;
            tracing::info!(%org_id, %device_id, "model rollout to device removed");
        }
    }
    let mut status = statuses(pool, org_id, Some(device_id), 1).await?;
    status.pop().ok_or(ApiError::NotFound("device"))
}

/// Checks that `model_id` is a model of `org_id` with an uploaded artifact (what a device
/// needs to download it).
pub(super) async fn check_rollable(pool: &PgPool, org_id: Uuid, model_id: Uuid) -> ApiResult<()> {
    let has_artifact: Option<bool> = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM model_artifacts a WHERE a.model_id = m.id) \
         FROM ai_models m WHERE m.org_id = $1 AND m.id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(pool)
    .await?;
    match has_artifact {
        None => Err(ApiError::validation("model_id", "no such model")),
        Some(false) => Err(ApiError::validation(
            "model_id",
            "the model has no uploaded artifact (PUT .../artifact first)",
        )),
        Some(true) => Ok(()),
    }
}

/// Rolls `model_id` out to a device group: every device whose labels contain `selector` (a
/// non-empty object of label values); `None` halts the group's rollout. A device's own row
/// still wins over any group. The caller checked the organisation and the role.
pub async fn set_desired_model_for_group(
    pool: &PgPool,
    org_id: Uuid,
    selector: &serde_json::Map<String, serde_json::Value>,
    model_id: Option<Uuid>,
) -> ApiResult<u64> {
    if selector.is_empty() {
        return Err(ApiError::validation(
            "selector",
            "must name at least one label",
        ));
    }
    let selector = serde_json::Value::Object(selector.clone());
    match model_id {
        Some(model_id) => {
            check_rollable(pool, org_id, model_id).await?;
            sqlx::query(
                "INSERT INTO desired_models (id, org_id, selector, model_id) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (org_id, selector) WHERE selector IS NOT NULL \
                 DO UPDATE SET model_id = EXCLUDED.model_id, updated_at = now()",
            )
            .bind(Uuid::new_v4())
            .bind(org_id)
            .bind(&selector)
            .bind(model_id)
            .execute(pool)
            .await?;
            tracing::info!(%org_id, %selector, %model_id, "model rolled out to device group");
        }
        None => {
            sqlx::query("DELETE FROM desired_models WHERE org_id = $1 AND selector = $2")
                .bind(org_id)
                .bind(&selector)
                .execute(pool)
                .await?;
            tracing::info!(%org_id, %selector, "model rollout to device group removed");
        }
    }
    let matched: i64 =
        sqlx::query_scalar("SELECT count(*) FROM devices WHERE org_id = $1 AND labels @> $2")
            .bind(org_id)
            .bind(&selector)
            .fetch_one(pool)
            .await?;
    Ok(u64::try_from(matched).unwrap_or(0))
}

/// Rolls one device back to the previous version of the model desired for it: the newest
/// version of the same model name registered before it that has an artifact. Refused (409)
/// when nothing is rolled out to the device or there is no earlier version.
pub async fn roll_back(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> ApiResult<DeviceModelStatus> {
    let current = statuses(pool, org_id, Some(device_id), 1)
        .await?
        .pop()
        .ok_or(ApiError::NotFound("device"))?;
    let Some(current_id) = current.desired_model_id else {
        return Err(ApiError::Conflict(
            "nothing is rolled out to this device, so there is nothing to roll back".into(),
        ));
    };
    let previous: Option<Uuid> = sqlx::query_scalar(
        "SELECT p.id FROM ai_models c \
         JOIN ai_models p ON p.org_id = c.org_id AND p.name = c.name \
              AND (p.created_at, p.id) < (c.created_at, c.id) \
         WHERE c.org_id = $1 AND c.id = $2 \
           AND EXISTS (SELECT 1 FROM model_artifacts a WHERE a.org_id = p.org_id AND a.model_id = p.id) \
         ORDER BY p.created_at DESC, p.id DESC LIMIT 1",
    )
    .bind(org_id)
    .bind(current_id)
    .fetch_optional(pool)
    .await?;
    let Some(previous) = previous else {
        return Err(ApiError::Conflict(format!(
            "{} has no earlier version with an uploaded artifact to roll back to",
            current
                .desired_model
                .as_deref()
                .unwrap_or("the desired model")
        )));
    };
    set_desired_model(pool, org_id, device_id, Some(previous)).await
}

/// Desired vs running model of every device of `org_id` (for the console; the caller
/// checked the organisation against its principal).
pub async fn rollout_status(pool: &PgPool, org_id: Uuid) -> ApiResult<Vec<DeviceModelStatus>> {
    statuses(pool, org_id, None, 1000).await
}

/// Desired vs running model of the devices of `$1` (one device with `$2`), at most `$3`.
const STATUSES: &str = concat!(
    "SELECT d.id AS device_id, d.name AS device_name, m.id AS desired_model_id, \
            m.name || '@' || m.version AS desired_model, s.running_model, s.last_error, \
            s.updated_at, \
            coalesce(m.name || '@' || m.version = s.running_model, false) AS in_sync \
     FROM devices d \
     LEFT JOIN LATERAL (",
    desired_of_device!(),
    ") w ON true \
     LEFT JOIN ai_models m ON m.org_id = d.org_id AND m.id = w.model_id \
     LEFT JOIN device_model_status s ON s.org_id = d.org_id AND s.device_id = d.id \
     WHERE d.org_id = $1 AND ($2::uuid IS NULL OR d.id = $2) \
     ORDER BY d.name LIMIT $3"
);

async fn statuses(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Option<Uuid>,
    limit: i64,
) -> ApiResult<Vec<DeviceModelStatus>> {
    let rows: Vec<StatusRow> = sqlx::query_as(STATUSES)
        .bind(org_id)
        .bind(device_id)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// `GET /v1/organisations/{org_id}/model-status`: desired and running model of every device.
pub async fn list_device_model_status(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<DeviceModelStatus>>> {
    let org_id = p.org_scope(org_id)?;
    Ok(Json(statuses(&pool, org_id, None, 1000).await?))
}

/// One model version as the console lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelVersion {
    pub id: Uuid,
    pub name: String,
    pub version: String,
    pub stage: String,
    /// An artifact is uploaded, so the version can be rolled out.
    pub has_artifact: bool,
    pub created_at: DateTime<Utc>,
}

/// The newest `limit` model versions of `org_id` (the caller checked the organisation).
pub async fn model_versions(
    pool: &PgPool,
    org_id: Uuid,
    limit: i64,
) -> Result<Vec<ModelVersion>, sqlx::Error> {
    sqlx::query_as(
        "SELECT m.id, m.name, m.version, m.stage, \
                EXISTS (SELECT 1 FROM model_artifacts a WHERE a.org_id = m.org_id AND a.model_id = m.id) \
                    AS has_artifact, m.created_at \
         FROM ai_models m WHERE m.org_id = $1 ORDER BY m.name, m.created_at DESC, m.id DESC LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A rollout to a device group (a label selector).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GroupRollout {
    pub selector: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    /// `name@version`.
    pub model: String,
    pub devices: i64,
    pub updated_at: DateTime<Utc>,
}

/// The group rollouts of `org_id` with how many devices each selector matches.
pub async fn group_rollouts(pool: &PgPool, org_id: Uuid) -> Result<Vec<GroupRollout>, sqlx::Error> {
    sqlx::query_as(
        "SELECT dm.selector, m.name || '@' || m.version AS model, \
                (SELECT count(*) FROM devices d WHERE d.org_id = dm.org_id AND d.labels @> dm.selector) \
                    AS devices, dm.updated_at \
         FROM desired_models dm JOIN ai_models m ON m.org_id = dm.org_id AND m.id = dm.model_id \
         WHERE dm.org_id = $1 AND dm.selector IS NOT NULL ORDER BY dm.updated_at DESC LIMIT 200",
    )
    .bind(org_id)
    .fetch_all(pool)
    .await
}
