//! Releases domain: agent release artifacts (the tarball of `scripts/package-agent.sh`),
//! their staged rollout to an organisation's devices, and the update state devices report.
//!
//! Invariants:
//! - Every query filters by the `org_id` checked by [`Principal::org_scope`]; a device is
//!   only offered, and can only download, the release its organisation's open rollout selects
//!   for it (`release_of_device!`, [`artifact_for_device`]).
//! - Releases are immutable: the first upload of a version fixes its bytes; the same bytes
//!   again are a 200, other bytes a 409.
//! - Every release is signed at upload with the model signing key
//!   ([`crate::models::signing`], no second scheme) under the name
//!   [`kip_shared::sync::RELEASE_SIGNING_NAME`], which no model name can take: a model
//!   signature never verifies as a release. Agents refuse an unsigned release.
//! - Selection is deterministic: a device's bucket is
//!   `release_bucket(release id, device id)` (SQL, migration 0130: two bytes of an md5, mod 100), selected when below the
//!   rollout's percentage, so the set never changes while a rollout runs and grows (never
//!   shrinks) when the same release is rolled out again at a higher percentage.
//! - Paused: devices that already reported this release keep getting it (to finish a trial);
//!   no other device is offered it. Aborted: no device is offered it; devices that installed
//!   it keep running it (there is no automatic downgrade; roll out the older release).
//! - At most one open (active or paused) rollout per organisation (a partial unique index).

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, FromRef, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
    routing::{get, post, put},
};
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use kip_api::{AgentRelease, DeviceUpdateStatus, ReleaseRollout, StartReleaseRollout};
use kip_shared::sync::{MODEL_ERROR_MAX_BYTES, RELEASE_SIGNING_NAME};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    http::{ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, Principal, pg_json},
    models::Signing,
};

/// Largest release tarball accepted: what an agent downloads at most
/// (`kip_agent::model_trust::MAX_MODEL_BYTES`; releases are verified by the same code).
pub const MAX_RELEASE_BYTES: usize = 64 * 1024 * 1024;
/// Size of one stored chunk; the last one may be shorter.
const CHUNK_BYTES: usize = 1024 * 1024;

/// Path on the agent listener from which a device downloads the release desired for it.
pub fn agent_download_path(release_id: Uuid) -> String {
    format!("/v1/agent/releases/{release_id}/artifact")
}

/// The release routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    std::sync::Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
    Signing: FromRef<S>,
{
    Router::new()
        .route("/organisations/{org_id}/releases", get(list_releases))
        .route(
            "/organisations/{org_id}/releases/{version}",
            put(upload_release).layer(DefaultBodyLimit::max(MAX_RELEASE_BYTES)),
        )
        .route(
            "/organisations/{org_id}/release-rollouts",
            get(list_rollouts).post(start_rollout),
        )
        .route(
            "/organisations/{org_id}/release-rollouts/{rollout_id}",
            get(rollout_status),
        )
        .route(
            "/organisations/{org_id}/release-rollouts/{rollout_id}/pause",
            post(pause_rollout),
        )
        .route(
            "/organisations/{org_id}/release-rollouts/{rollout_id}/resume",
            post(resume_rollout),
        )
        .route(
            "/organisations/{org_id}/release-rollouts/{rollout_id}/abort",
            post(abort_rollout),
        )
}

fn check_version(v: &str) -> ApiResult<()> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(
            "version",
            "must be 1 to 64 characters of letters, digits, '-', '_', '.', '+', starting with a letter or digit",
        ))
    }
}

#[derive(sqlx::FromRow)]
struct ReleaseRow {
    id: Uuid,
    org_id: Uuid,
    version: String,
    sha256: String,
    size_bytes: i64,
    signature: Option<String>,
    uploaded_at: DateTime<Utc>,
}

impl From<ReleaseRow> for AgentRelease {
    fn from(r: ReleaseRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            version: r.version,
            sha256: r.sha256,
            size_bytes: r.size_bytes,
            signature: r.signature,
            uploaded_at: r.uploaded_at,
        }
    }
}

/// `PUT /v1/organisations/{org_id}/releases/{version}`: stores the raw body (the release
/// tarball) as release `version`, signed. Streamed into 1 MiB chunk rows in one transaction.
async fn upload_release(
    State(pool): State<PgPool>,
    State(signing): State<Signing>,
    p: Principal,
    ApiPath((org_id, version)): ApiPath<(Uuid, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<AgentRelease>)> {
    let org_id = p.org_scope(org_id)?;
    check_version(&version)?;
    let too_large = || ApiError::PayloadTooLarge {
        limit_bytes: MAX_RELEASE_BYTES,
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_RELEASE_BYTES as u64)
    {
        return Err(too_large());
    }
    let signing = signing.ok_or(ApiError::NotFound(
        "release signing key (pki.ca_dir is not set)",
    ))?;
    let mut tx = pool.begin().await?;
    // Serialises uploads per organisation (and refuses an unknown one) before reading bytes.
    let org: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM organisations WHERE id = $1 FOR UPDATE")
            .bind(org_id)
            .fetch_optional(&mut *tx)
            .await?;
    org.ok_or(ApiError::NotFound("organisation"))?;
    let existing: Option<ReleaseRow> = sqlx::query_as(
        "SELECT id, org_id, version, sha256, size_bytes, signature, uploaded_at \
         FROM agent_releases WHERE org_id = $1 AND version = $2",
    )
    .bind(org_id)
    .bind(&version)
    .fetch_optional(&mut *tx)
    .await?;
    let id = existing.as_ref().map_or_else(Uuid::new_v4, |r| r.id);
    let mut hash = Sha256::new();
    let mut size = 0usize;
    let mut pending: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
    let mut idx = 0i32;
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let frame: Bytes =
            frame.map_err(|e| ApiError::BadRequest(format!("cannot read the body: {e}")))?;
        size += frame.len();
        if size > MAX_RELEASE_BYTES {
            return Err(too_large());
        }
        hash.update(&frame);
        if existing.is_some() {
            continue;
        }
        let mut rest = &frame[..];
        while !rest.is_empty() {
            let take = (CHUNK_BYTES - pending.len()).min(rest.len());
            pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if pending.len() == CHUNK_BYTES {
                store_chunk(&mut tx, org_id, id, idx, &pending).await?;
                idx += 1;
                pending.clear();
            }
        }
    }
    if size == 0 {
        return Err(ApiError::validation("release", "must not be empty"));
    }
    let sha = hex::encode(hash.finalize());
    if let Some(r) = existing {
        if r.sha256 != sha {
            return Err(ApiError::Conflict(format!(
                "release {version} exists with sha256 {}; releases are immutable, upload another version",
                r.sha256
            )));
        }
        return Ok((StatusCode::OK, Json(r.into())));
    }
    if !pending.is_empty() {
        store_chunk(&mut tx, org_id, id, idx, &pending).await?;
    }
    // Signed here, over the sha256 just computed from the body.
    let signature = signing
        .sign(org_id, RELEASE_SIGNING_NAME, &version, &sha)
        .map_err(|e| ApiError::validation("version", e.to_string()))?
        .to_string();
    let row: ReleaseRow = sqlx::query_as(
        "INSERT INTO agent_releases (id, org_id, version, sha256, size_bytes, signature) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, org_id, version, sha256, size_bytes, signature, uploaded_at",
    )
    .bind(id)
    .bind(org_id)
    .bind(&version)
    .bind(&sha)
    .bind(i64::try_from(size).map_err(ApiError::internal)?)
    .bind(&signature)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%org_id, release_id = %id, %version, sha256 = %sha, size_bytes = size, "agent release stored");
    Ok((StatusCode::CREATED, Json(row.into())))
}

async fn store_chunk(
    tx: &mut sqlx::PgConnection,
    org_id: Uuid,
    release_id: Uuid,
    idx: i32,
    bytes: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agent_release_chunks (org_id, release_id, idx, bytes) VALUES ($1, $2, $3, $4)",
    )
    .bind(org_id)
    .bind(release_id)
    .bind(idx)
    .bind(bytes)
    .execute(tx)
    .await?;
    Ok(())
}

/// `GET /v1/organisations/{org_id}/releases`: every release, newest first.
async fn list_releases(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<AgentRelease>>> {
    let org_id = p.org_scope(org_id)?;
    let rows: Vec<ReleaseRow> = sqlx::query_as(
        "SELECT id, org_id, version, sha256, size_bytes, signature, uploaded_at \
         FROM agent_releases WHERE org_id = $1 ORDER BY uploaded_at DESC, version LIMIT 1000",
    )
    .bind(org_id)
    .fetch_all(&pool)
    .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: Uuid,
    org_id: Uuid,
    release_id: Uuid,
    version: String,
    selector: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    percent: i32,
    state: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<RolloutRow> for ReleaseRollout {
    fn from(r: RolloutRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            release_id: r.release_id,
            version: r.version,
            selector: r.selector.0,
            percent: u8::try_from(r.percent).unwrap_or(100),
            state: r.state,
            created_at: r.created_at,
            updated_at: r.updated_at,
            devices: Vec::new(),
        }
    }
}

const ROLLOUT_SELECT: &str = "\
    SELECT r.id, r.org_id, r.release_id, a.version, r.selector, r.percent, r.state, \
           r.created_at, r.updated_at \
    FROM release_rollouts r JOIN agent_releases a ON a.org_id = r.org_id AND a.id = r.release_id \
    WHERE r.org_id = $1 AND ($2::uuid IS NULL OR r.id = $2) \
    ORDER BY r.created_at DESC LIMIT 1000";

/// `POST /v1/organisations/{org_id}/release-rollouts`: offers a release to a share of a
/// device group. 409 while another rollout is open.
async fn start_rollout(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<StartReleaseRollout>,
) -> ApiResult<(StatusCode, Json<ReleaseRollout>)> {
    let org_id = p.org_scope(org_id)?;
    check_version(&body.version)?;
    if !(1..=100).contains(&body.percent) {
        return Err(ApiError::validation("percent", "must be 1 to 100"));
    }
    let selector = serde_json::Value::Object(body.selector.clone());
    pg_json("selector", &selector, 4096)?;
    let release: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM agent_releases WHERE org_id = $1 AND version = $2")
            .bind(org_id)
            .bind(&body.version)
            .fetch_optional(&pool)
            .await?;
    let release = release.ok_or_else(|| {
        ApiError::validation("version", "no such release (kipctl release upload first)")
    })?;
    let id = Uuid::new_v4();
    let inserted = sqlx::query(
        "INSERT INTO release_rollouts (id, org_id, release_id, selector, percent, state) \
         VALUES ($1, $2, $3, $4, $5, 'active')",
    )
    .bind(id)
    .bind(org_id)
    .bind(release)
    .bind(sqlx::types::Json(&selector))
    .bind(i32::from(body.percent))
    .execute(&pool)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(ApiError::Conflict(
                "another release rollout is active or paused in this organisation; abort it first"
                    .into(),
            ));
        }
        r => {
            r?;
        }
    }
    tracing::info!(%org_id, rollout_id = %id, version = %body.version, percent = body.percent, "agent release rollout started");
    let mut r = rollouts(&pool, org_id, Some(id)).await?;
    r.pop()
        .map(|r| (StatusCode::CREATED, Json(r)))
        .ok_or(ApiError::NotFound("rollout"))
}

async fn rollouts(
    pool: &PgPool,
    org_id: Uuid,
    id: Option<Uuid>,
) -> Result<Vec<ReleaseRollout>, sqlx::Error> {
    let rows: Vec<RolloutRow> = sqlx::query_as(ROLLOUT_SELECT)
        .bind(org_id)
        .bind(id)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// `GET /v1/organisations/{org_id}/release-rollouts`: every rollout, newest first.
async fn list_rollouts(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<ReleaseRollout>>> {
    let org_id = p.org_scope(org_id)?;
    Ok(Json(rollouts(&pool, org_id, None).await?))
}

#[derive(sqlx::FromRow)]
struct DeviceRow {
    device_id: Uuid,
    device_name: String,
    state: Option<String>,
    reason: Option<String>,
    agent_version: Option<String>,
    updated_at: Option<DateTime<Utc>>,
}

/// `GET /v1/organisations/{org_id}/release-rollouts/{rollout_id}`: the rollout with the
/// update state of every device it selects.
async fn rollout_status(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ReleaseRollout>> {
    let org_id = p.org_scope(org_id)?;
    let mut r = rollouts(&pool, org_id, Some(rollout_id))
        .await?
        .pop()
        .ok_or(ApiError::NotFound("rollout"))?;
    let rows: Vec<DeviceRow> = sqlx::query_as(
        "SELECT d.id AS device_id, d.name AS device_name, \
                CASE WHEN s.version = a.version THEN s.state END AS state, \
                CASE WHEN s.version = a.version THEN s.reason END AS reason, \
                v.agent_version, s.updated_at \
         FROM release_rollouts r \
         JOIN agent_releases a ON a.org_id = r.org_id AND a.id = r.release_id \
         JOIN devices d ON d.org_id = r.org_id \
         LEFT JOIN device_update_status s ON s.org_id = d.org_id AND s.device_id = d.id \
         LEFT JOIN LATERAL (SELECT agent_version FROM device_sync_state ss \
             WHERE ss.org_id = d.org_id AND ss.device_id = d.id \
             ORDER BY ss.updated_at DESC LIMIT 1) v ON true \
         WHERE r.org_id = $1 AND r.id = $2 \
           AND d.labels @> r.selector AND release_bucket(r.release_id, d.id) < r.percent \
         ORDER BY d.name LIMIT 10000",
    )
    .bind(org_id)
    .bind(rollout_id)
    .fetch_all(&pool)
    .await?;
    r.devices = rows
        .into_iter()
        .map(|d| DeviceUpdateStatus {
            device_id: d.device_id,
            device_name: d.device_name,
            state: d.state.unwrap_or_else(|| "pending".into()),
            reason: d.reason,
            agent_version: d.agent_version,
            updated_at: d.updated_at,
        })
        .collect();
    Ok(Json(r))
}

/// `POST /v1/organisations/{org_id}/release-rollouts/{rollout_id}/pause`.
async fn pause_rollout(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ReleaseRollout>> {
    let org_id = p.org_scope(org_id)?;
    change_rollout(
        &pool,
        org_id,
        rollout_id,
        "pause",
        &["active", "paused"],
        "paused",
    )
    .await
}

/// `POST /v1/organisations/{org_id}/release-rollouts/{rollout_id}/resume`.
async fn resume_rollout(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ReleaseRollout>> {
    let org_id = p.org_scope(org_id)?;
    change_rollout(
        &pool,
        org_id,
        rollout_id,
        "resume",
        &["active", "paused"],
        "active",
    )
    .await
}

/// `POST /v1/organisations/{org_id}/release-rollouts/{rollout_id}/abort` (idempotent).
async fn abort_rollout(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ReleaseRollout>> {
    let org_id = p.org_scope(org_id)?;
    let from = &["active", "paused", "aborted"];
    change_rollout(&pool, org_id, rollout_id, "abort", from, "aborted").await
}

/// Moves a rollout of `org_id` (already checked) from one of `from` to `to`; 409 otherwise.
async fn change_rollout(
    pool: &PgPool,
    org_id: Uuid,
    rollout_id: Uuid,
    action: &str,
    from: &[&str],
    to: &str,
) -> ApiResult<Json<ReleaseRollout>> {
    let current: Option<String> =
        sqlx::query_scalar("SELECT state FROM release_rollouts WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(rollout_id)
            .fetch_optional(pool)
            .await?;
    let current = current.ok_or(ApiError::NotFound("rollout"))?;
    if !from.contains(&current.as_str()) {
        return Err(ApiError::Conflict(format!(
            "the rollout is {current}; it cannot {action}"
        )));
    }
    sqlx::query(
        "UPDATE release_rollouts SET state = $3, updated_at = now() WHERE org_id = $1 AND id = $2",
    )
    .bind(org_id)
    .bind(rollout_id)
    .bind(to)
    .execute(pool)
    .await?;
    tracing::info!(%org_id, %rollout_id, from = %current, to, "agent release rollout changed");
    rollouts(pool, org_id, Some(rollout_id))
        .await?
        .pop()
        .map(Json)
        .ok_or(ApiError::NotFound("rollout"))
}

/// The release desired for device `d` (a row of `devices` in scope), as the body of a
/// LATERAL subquery yielding `id`, `version`, `sha256`, `signature`: from the organisation's
/// open rollout when it selects the device (paused: only if the device already reported this
/// release).
macro_rules! release_of_device {
    () => {
        "SELECT a.id, a.version, a.sha256, a.signature \
         FROM release_rollouts r \
         JOIN agent_releases a ON a.org_id = r.org_id AND a.id = r.release_id \
         LEFT JOIN device_update_status s ON s.org_id = d.org_id AND s.device_id = d.id \
         WHERE r.org_id = d.org_id \
           AND d.labels @> r.selector AND release_bucket(r.release_id, d.id) < r.percent \
           AND (r.state = 'active' OR (r.state = 'paused' AND s.version = a.version)) \
         LIMIT 1"
    };
}
pub(crate) use release_of_device;

/// The release desired for device `$2` of organisation `$1` ([`release_of_device`]).
async fn desired_release_row(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<(Uuid, String, String, Option<String>)>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT w.id, w.version, w.sha256, w.signature FROM devices d CROSS JOIN LATERAL (",
        release_of_device!(),
        ") w WHERE d.org_id = $1 AND d.id = $2"
    ))
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(pool)
    .await
}

/// The upsert of a device's `device_update_status` row from SQL placeholders (device, org,
/// state, version, reason), written only when the state placeholder is not NULL and skipped
/// when nothing changed; a row of another organisation is never touched. The sync endpoint
/// runs it with the device's other reports in one statement ([`crate::agent_api`]), with the
/// values of [`parse_reported`].
macro_rules! upsert_update_status {
    ($device:literal, $org:literal, $state:literal, $version:literal, $reason:literal) => {
        concat!(
            "INSERT INTO device_update_status (device_id, org_id, state, version, reason) SELECT ",
            $device, ", ", $org, ", ", $state, ", ", $version, ", ", $reason,
            " WHERE ", $state, "::text IS NOT NULL \
             ON CONFLICT (device_id) DO UPDATE SET state = EXCLUDED.state, version = EXCLUDED.version, \
               reason = EXCLUDED.reason, updated_at = now() \
             WHERE device_update_status.org_id = EXCLUDED.org_id \
               AND (device_update_status.state, device_update_status.version, \
                    device_update_status.reason) IS DISTINCT FROM \
                   (EXCLUDED.state, EXCLUDED.version, EXCLUDED.reason)"
        )
    };
}
pub(crate) use upsert_update_status;

/// A `kip-update-status` header of a sync (`<state> <version>[ <reason>]`) as it is stored;
/// `None` for a malformed value (logged and ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReportedUpdate<'a> {
    pub state: &'a str,
    pub version: &'a str,
    pub reason: Option<String>,
}

/// Parses the `kip-update-status` header; a malformed value is ignored (logged).
pub(crate) fn parse_reported(device_id: Uuid, h: &str) -> Option<ReportedUpdate<'_>> {
    let mut parts = h.splitn(3, ' ');
    let (Some(state), Some(version)) = (parts.next(), parts.next()) else {
        tracing::warn!(%device_id, header = %h, "malformed kip-update-status header ignored");
        return None;
    };
    const STATES: &[&str] = &[
        "downloading",
        "trial",
        "confirmed",
        "refused",
        "rolled_back",
    ];
    if !STATES.contains(&state) || check_version(version).is_err() {
        tracing::warn!(%device_id, header = %h, "malformed kip-update-status header ignored");
        return None;
    }
    let reason: Option<String> = parts.next().map(|r| {
        r.chars()
            .filter(|c| *c != '\0')
            .take(MODEL_ERROR_MAX_BYTES)
            .collect()
    });
    Some(ReportedUpdate {
        state,
        version,
        reason,
    })
}

/// The answer of `GET /v1/agent/releases/{release_id}/artifact` for the device named by its
/// client certificate: the tarball of the release desired for it, and only that one (404
/// otherwise). Streamed one chunk row at a time.
pub async fn artifact_for_device(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    release_id: Uuid,
) -> ApiResult<Response> {
    let desired = desired_release_row(pool, org_id, device_id).await?;
    let Some((id, _, sha, _)) = desired.filter(|d| d.0 == release_id) else {
        tracing::warn!(%org_id, %device_id, %release_id, "device asked for a release not desired for it");
        return Err(ApiError::NotFound("release"));
    };
    let size: i64 =
        sqlx::query_scalar("SELECT size_bytes FROM agent_releases WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(id)
            .fetch_one(pool)
            .await?;
    let resp = crate::http::chunked_download(
        pool,
        "SELECT bytes FROM agent_release_chunks WHERE org_id = $1 AND release_id = $2 AND idx = $3",
        "release",
        org_id,
        id,
        "application/gzip",
        size,
        &sha,
    );
    tracing::info!(%org_id, %device_id, release_id = %id, "agent release sent to device");
    Ok(resp)
}
