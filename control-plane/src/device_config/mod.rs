//! Remote agent configuration: versions set per device or per group (label selector), the
//! desired version of each device for the sync ack, and what devices report.
//!
//! Invariants:
//! - A document is stored only after the agent's own validation accepted it
//!   (`kip_agent_config::remote::validate_for_device`, the code the agent runs), for a group
//!   once per device it currently targets; a bad one is a 422 naming the field and is never
//!   sent to a device.
//! - Versions only grow (per organisation, assigned under a lock on the organisation row);
//!   every change is a new row, so the history is complete.
//! - Resolution as for models: the newest device row wins over any group; otherwise the newest
//!   selector row contained in the device's labels.
//! - Every query filters by the `org_id` that [`Principal::org_scope`] checked; device reports
//!   come from the device's client certificate only.
//!
//! Interface for other domains: the SQL of the desired version of a device
//! (`desired_of_device!`, read by the sync ack in [`crate::agent_api`] in one statement with
//! the rest of the desired state) and of the row a device reports (`upsert_config_status!`,
//! written from the sync request headers), with [`clean_reported`].

use axum::{
    Json, Router,
    extract::{FromRef, State},
    http::StatusCode,
    routing::{get, put},
};
use chrono::{DateTime, Utc};
use kip_api::{
    ConfigVersion, DeviceConfigStatus, GroupConfigResult, SetDeviceConfig, SetGroupConfig,
};
use sqlx::PgPool;
use uuid::Uuid;

use std::sync::Arc;

use crate::http::{
    ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, Principal, pg_json, pg_text,
};

/// Largest selector, as compact JSON.
const MAX_SELECTOR_BYTES: usize = 16 * 1024;
/// Most devices a group configuration is validated for (and may target) in one request.
const MAX_GROUP_DEVICES: i64 = 10_000;

/// The configuration routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
{
    Router::new()
        .route(
            "/organisations/{org_id}/devices/{device_id}/config",
            get(get_device_config).put(put_device_config),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/config/history",
            get(device_history),
        )
        .route(
            "/organisations/{org_id}/group-config",
            put(put_group_config),
        )
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    version: i64,
    device_id: Option<Uuid>,
    selector: Option<sqlx::types::Json<serde_json::Map<String, serde_json::Value>>>,
    toml: String,
    created_at: DateTime<Utc>,
}

impl From<VersionRow> for ConfigVersion {
    fn from(r: VersionRow) -> Self {
        Self {
            version: r.version,
            device_id: r.device_id,
            selector: r.selector.map(|s| s.0),
            toml: r.toml,
            created_at: r.created_at,
        }
    }
}

/// Whether configuration row `c` targets device `d` (a row of `devices` of the same
/// organisation): its own row or a group whose selector its labels contain.
macro_rules! targets_device {
    () => {
        "(c.device_id = d.id OR (c.selector IS NOT NULL AND d.labels @> c.selector))"
    };
}
pub(crate) use targets_device;

/// The desired configuration of device `d` (a row of `devices` in scope), as the body of a
/// LATERAL subquery yielding `version` and `toml`: the newest device row, else the newest
/// group row.
macro_rules! desired_of_device {
    () => {
        concat!(
            "SELECT c.version, c.toml FROM device_configs c WHERE c.org_id = d.org_id AND ",
            $crate::device_config::targets_device!(),
            " ORDER BY (c.device_id IS NOT NULL) DESC, c.version DESC LIMIT 1"
        )
    };
}
pub(crate) use desired_of_device;

/// Rows that target the device `$2` of organisation `$1` (its own and its groups').
macro_rules! targeting {
    ($order:literal) => {
        concat!(
            "SELECT c.version, c.device_id, c.selector, c.toml, c.created_at \
             FROM device_configs c JOIN devices d ON d.org_id = c.org_id AND d.id = $2 \
             WHERE c.org_id = $1 AND ",
            targets_device!(),
            " ",
            $order
        )
    };
}

async fn desired_row(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<VersionRow>, sqlx::Error> {
    sqlx::query_as(targeting!(
        "ORDER BY (c.device_id IS NOT NULL) DESC, c.version DESC LIMIT 1"
    ))
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(pool)
    .await
}

/// The upsert of a device's `device_config_status` row from SQL placeholders (device, org,
/// applied version, last error), skipped when nothing changed; a row of another
/// organisation is never touched. The sync endpoint runs it with the device's other reports
/// in one statement ([`crate::agent_api`]); values go through [`clean_reported`] first.
macro_rules! upsert_config_status {
    ($device:literal, $org:literal, $applied:literal, $error:literal) => {
        concat!(
            "INSERT INTO device_config_status (device_id, org_id, applied_version, last_error) VALUES (",
            $device, ", ", $org, ", ", $applied, ", ", $error,
            ") ON CONFLICT (device_id) DO UPDATE SET applied_version = EXCLUDED.applied_version, \
             last_error = EXCLUDED.last_error, updated_at = now() \
             WHERE device_config_status.org_id = EXCLUDED.org_id \
               AND (device_config_status.applied_version IS DISTINCT FROM EXCLUDED.applied_version \
                 OR device_config_status.last_error IS DISTINCT FROM EXCLUDED.last_error)"
        )
    };
}
pub(crate) use upsert_config_status;

/// A configuration version or error reported in the sync headers, as stored: bounded and
/// free of NUL (device-supplied text).
pub(crate) fn clean_reported(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '\0')
        .take(kip_shared::sync::MODEL_ERROR_MAX_BYTES)
        .collect()
}

fn check_document(toml: &str, device: &str) -> ApiResult<()> {
    // Bounded and storable (no NUL) before it is parsed.
    pg_text("toml", toml, kip_agent_config::remote::MAX_REMOTE_BYTES)?;
    kip_agent_config::remote::validate_for_device(toml, device).map_err(|e| match e {
        kip_agent_config::config::ConfigError::Invalid { field, message } => {
            ApiError::validation(format!("toml: {field}"), message)
        }
        other => ApiError::validation("toml", other.to_string()),
    })
}

/// Inserts a new version under a lock on the organisation row (versions only grow).
async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    org_id: Uuid,
    device_id: Option<Uuid>,
    selector: Option<&serde_json::Map<String, serde_json::Value>>,
    toml: &str,
) -> ApiResult<ConfigVersion> {
    sqlx::query("SELECT 1 FROM organisations WHERE id = $1 FOR UPDATE")
        .bind(org_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("organisation"))?;
    let row: VersionRow = sqlx::query_as(
        "INSERT INTO device_configs (id, org_id, version, device_id, selector, toml) \
         SELECT $1, $2, coalesce(max(version), 0) + 1, $3, $4, $5 FROM device_configs WHERE org_id = $2 \
         RETURNING version, device_id, selector, toml, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(device_id)
    .bind(selector.map(sqlx::types::Json))
    .bind(toml)
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.into())
}

async fn device_name(pool: &PgPool, org_id: Uuid, device_id: Uuid) -> ApiResult<String> {
    sqlx::query_scalar("SELECT name FROM devices WHERE org_id = $1 AND id = $2")
        .bind(org_id)
        .bind(device_id)
        .fetch_optional(pool)
        .await?
        .ok_or(ApiError::NotFound("device"))
}

/// `PUT /v1/organisations/{org_id}/devices/{device_id}/config`: a new version for one device.
async fn put_device_config(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<SetDeviceConfig>,
) -> ApiResult<(StatusCode, Json<ConfigVersion>)> {
    let org_id = p.org_scope(org_id)?;
    let name = device_name(&pool, org_id, device_id).await?;
    check_document(&body.toml, &name)?;
    let mut tx = pool.begin().await?;
    let v = insert_version(&mut tx, org_id, Some(device_id), None, &body.toml).await?;
    tx.commit().await?;
    tracing::info!(%org_id, %device_id, version = v.version, "device configuration set");
    Ok((StatusCode::CREATED, Json(v)))
}

/// `PUT /v1/organisations/{org_id}/group-config`: a new version for every device whose labels
/// contain the selector, validated for each of them first.
async fn put_group_config(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<SetGroupConfig>,
) -> ApiResult<(StatusCode, Json<GroupConfigResult>)> {
    let org_id = p.org_scope(org_id)?;
    if body.selector.is_empty() || body.selector.values().any(|v| !v.is_string()) {
        return Err(ApiError::validation(
            "selector",
            "must hold at least one label whose value is a string",
        ));
    }
    pg_json(
        "selector",
        &serde_json::Value::Object(body.selector.clone()),
        MAX_SELECTOR_BYTES,
    )?;
    let devices: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, name FROM devices WHERE org_id = $1 AND labels @> $2 ORDER BY name LIMIT $3",
    )
    .bind(org_id)
    .bind(sqlx::types::Json(&body.selector))
    .bind(MAX_GROUP_DEVICES + 1)
    .fetch_all(&pool)
    .await?;
    if devices.len() as i64 > MAX_GROUP_DEVICES {
        return Err(ApiError::validation(
            "selector",
            format!("matches more than {MAX_GROUP_DEVICES} devices; narrow it"),
        ));
    }
    // The device name is part of the agent's validation (e.g. default client ids).
    let placeholder = [(Uuid::nil(), "group".to_owned())];
    let check: &[(Uuid, String)] = if devices.is_empty() {
        &placeholder
    } else {
        &devices
    };
    for (_, name) in check {
        check_document(&body.toml, name).map_err(|e| match e {
            ApiError::Validation { field, message } => ApiError::Validation {
                field,
                message: format!("{message} (for device {name})"),
            },
            other => other,
        })?;
    }
    let mut tx = pool.begin().await?;
    let v = insert_version(&mut tx, org_id, None, Some(&body.selector), &body.toml).await?;
    tx.commit().await?;
    tracing::info!(%org_id, version = v.version, devices = devices.len(), "group configuration set");
    Ok((
        StatusCode::CREATED,
        Json(GroupConfigResult {
            config: v,
            devices: devices.into_iter().map(|(id, _)| id).collect(),
        }),
    ))
}

/// `GET /v1/organisations/{org_id}/devices/{device_id}/config`: desired and reported.
async fn get_device_config(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<DeviceConfigStatus>> {
    let org_id = p.org_scope(org_id)?;
    let device_name = device_name(&pool, org_id, device_id).await?;
    let desired: Option<ConfigVersion> =
        desired_row(&pool, org_id, device_id).await?.map(Into::into);
    let reported: Option<(Option<String>, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT applied_version, last_error, updated_at FROM device_config_status \
         WHERE org_id = $1 AND device_id = $2",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(&pool)
    .await?;
    let (applied_version, last_error, updated_at) = match reported {
        Some((a, e, u)) => (a, e, Some(u)),
        None => (None, None, None),
    };
    let in_sync =
        applied_version.as_deref() == desired.as_ref().map(|d| d.version.to_string()).as_deref();
    Ok(Json(DeviceConfigStatus {
        device_id,
        device_name,
        desired,
        applied_version,
        last_error,
        updated_at,
        in_sync,
    }))
}

/// `GET /v1/organisations/{org_id}/devices/{device_id}/config/history`: every version that
/// targeted the device (its own and its groups'), newest first.
async fn device_history(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Vec<ConfigVersion>>> {
    let org_id = p.org_scope(org_id)?;
    device_name(&pool, org_id, device_id).await?;
    let rows: Vec<VersionRow> = sqlx::query_as(targeting!("ORDER BY c.version DESC LIMIT 1000"))
        .bind(org_id)
        .bind(device_id)
        .fetch_all(&pool)
        .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}
