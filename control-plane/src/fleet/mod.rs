//! Fleet domain: organisations, API keys and devices (`/v1/me`, `/v1/organisations/...`).
//!
//! Invariants:
//! - Every query on tenant data filters by `org_id` taken from the path *after*
//!   [`Principal::org_scope`] checked it, so a key never touches another organisation's rows.
//! - Request bodies are parsed with `deny_unknown_fields`: a misspelt field is a 400 naming
//!   it, never silently ignored.
//! - Revoking a key or deleting an organisation drops the affected entries from the
//!   [`KeyCache`] before answering.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, Query, State, rejection::QueryRejection},
    http::StatusCode,
    routing::get,
};
use chrono::{DateTime, Utc};
use kip_api::{
    ApiKeyInfo, AuditEntry, AuditPage, CreateApiKey, CreateOrganisation, CreatedApiKey, Device, Me,
    Organisation, RegisterDevice, UpdateOrganisation,
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    http::{
        ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, ListParams, Principal, Role,
        Scope, get_row, list_limit, list_rows, parse_name, pg_json, pg_text,
    },
    keys,
};

/// The fleet routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
{
    Router::new()
        .route("/me", get(me))
        .route("/organisations", get(list_orgs).post(create_org))
        .route(
            "/organisations/{org_id}",
            get(get_org).patch(update_org).delete(delete_org),
        )
        .route(
            "/organisations/{org_id}/api-keys",
            get(list_keys).post(create_key),
        )
        .route(
            "/organisations/{org_id}/api-keys/{key_id}",
            axum::routing::delete(revoke_key),
        )
        .route(
            "/organisations/{org_id}/devices",
            get(list_devices).post(register_device),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}",
            get(get_device).delete(delete_device),
        )
        .route("/organisations/{org_id}/audit", get(list_audit))
}

type ListQuery = Result<Query<ListParams>, QueryRejection>;

// ---------- who am I ----------

async fn me(p: Principal) -> Json<Me> {
    let (scope, org_id) = match p.scope {
        Scope::Platform => ("platform", None),
        Scope::Org(o) => ("org", Some(o)),
    };
    Json(Me {
        key_id: p.key_id,
        scope: scope.into(),
        org_id,
        role: p.role.as_str().into(),
    })
}

// ---------- organisations ----------

fn check_display_name(s: &str) -> ApiResult<()> {
    // 200 characters are at most 800 bytes of UTF-8.
    pg_text("display_name", s, 800)?;
    if s.trim().is_empty() || s.chars().count() > 200 {
        return Err(ApiError::validation(
            "display_name",
            "must be 1 to 200 characters",
        ));
    }
    Ok(())
}

async fn create_org(
    State(pool): State<PgPool>,
    p: Principal,
    ApiJson(body): ApiJson<CreateOrganisation>,
) -> ApiResult<(StatusCode, Json<Organisation>)> {
    p.require_platform()?;
    let name = parse_name("name", &body.name)?;
    let display = body.display_name.unwrap_or_else(|| name.to_string());
    check_display_name(&display)?;
    let org: Organisation = sqlx::query_as::<_, OrgRow>(
        "INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $3) \
         RETURNING id, name, display_name, created_at, updated_at",
    )
    .bind(Uuid::new_v4())
    .bind(name.as_str())
    .bind(&display)
    .fetch_one(&pool)
    .await?
    .into();
    tracing::info!(org_id = %org.id, name = %org.name, "organisation created");
    Ok((StatusCode::CREATED, Json(org)))
}

async fn list_orgs(
    State(pool): State<PgPool>,
    p: Principal,
    q: ListQuery,
) -> ApiResult<Json<Vec<Organisation>>> {
    let limit = list_limit(q)?;
    // A tenant key sees exactly its own organisation.
    let own = match p.scope {
        Scope::Platform => None,
        Scope::Org(o) => Some(o),
    };
    list_rows::<OrgRow, _>(
        &pool,
        "SELECT id, name, display_name, created_at, updated_at FROM organisations \
         WHERE ($1::uuid IS NULL OR id = $1) ORDER BY name LIMIT $2",
        own,
        limit,
    )
    .await
}

async fn get_org(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Organisation>> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query_as::<_, OrgRow>(
        "SELECT id, name, display_name, created_at, updated_at FROM organisations WHERE id = $1",
    )
    .bind(org_id)
    .fetch_optional(&pool)
    .await?
    .map(|r| Json(r.into()))
    .ok_or(ApiError::NotFound("organisation"))
}

async fn update_org(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateOrganisation>,
) -> ApiResult<Json<Organisation>> {
    let org_id = p.org_scope(org_id)?;
    check_display_name(&body.display_name)?;
    sqlx::query_as::<_, OrgRow>(
        "UPDATE organisations SET display_name = $2, updated_at = now() WHERE id = $1 \
         RETURNING id, name, display_name, created_at, updated_at",
    )
    .bind(org_id)
    .bind(&body.display_name)
    .fetch_optional(&pool)
    .await?
    .map(|r| Json(r.into()))
    .ok_or(ApiError::NotFound("organisation"))
}

async fn delete_org(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    p.require_platform()?;
    let res = sqlx::query("DELETE FROM organisations WHERE id = $1")
        .bind(org_id)
        .execute(&pool)
        .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::NotFound("organisation"));
    }
    keys.forget_org(org_id);
    tracing::info!(%org_id, "organisation deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---------- API keys ----------

async fn create_key(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let org_id = p.org_scope(org_id)?;
    let name = parse_name("name", &body.name)?;
    // An organisation key never has more power than org-admin (the role check already
    // refused this call to every role below org-admin, so no key can mint a stronger one).
    let role = match body.role.as_deref() {
        None => Role::OrgAdmin,
        Some(r) => Role::parse(r)
            .filter(|r| *r != Role::PlatformAdmin)
            .ok_or_else(|| {
                ApiError::validation("role", "must be one of org-admin, operator, llm, read-only")
            })?,
    };
    let new = keys::generate();
    let info: ApiKeyInfo = sqlx::query_as::<_, KeyRow>(
        "INSERT INTO api_keys (id, org_id, scope, name, prefix, key_sha256, role) \
         SELECT $1, o.id, 'org', $3, $4, $5, $6 FROM organisations o WHERE o.id = $2 \
         RETURNING id, org_id, name, prefix, role, created_at, revoked_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(name.as_str())
    .bind(&new.prefix)
    .bind(&new.sha256[..])
    .bind(role.as_str())
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?
    .into();
    tracing::info!(%org_id, key_id = %info.id, prefix = %info.prefix, role = %info.role, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey { info, key: new.key }),
    ))
}

async fn list_keys(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: ListQuery,
) -> ApiResult<Json<Vec<ApiKeyInfo>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_limit(q)?;
    list_rows::<KeyRow, _>(
        &pool,
        "SELECT id, org_id, name, prefix, role, created_at, revoked_at FROM api_keys \
         WHERE org_id = $1 ORDER BY created_at, id LIMIT $2",
        Some(org_id),
        limit,
    )
    .await
}

/// Revokes a key; revoking an already revoked key keeps the first revocation time.
async fn revoke_key(
    State(pool): State<PgPool>,
    State(cache): State<Arc<KeyCache>>,
    p: Principal,
    ApiPath((org_id, key_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ApiKeyInfo>> {
    let org_id = p.org_scope(org_id)?;
    let info: ApiKeyInfo = sqlx::query_as::<_, KeyRow>(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) \
         WHERE id = $1 AND org_id = $2 \
         RETURNING id, org_id, name, prefix, role, created_at, revoked_at",
    )
    .bind(key_id)
    .bind(org_id)
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("api key"))?
    .into();
    cache.forget_key(key_id);
    tracing::info!(%org_id, %key_id, "api key revoked");
    Ok(Json(info))
}

// ---------- devices ----------

/// Largest label set of a device, as compact JSON.
const MAX_LABELS_BYTES: usize = 16 * 1024;

async fn register_device(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<RegisterDevice>,
) -> ApiResult<(StatusCode, Json<Device>)> {
    let org_id = p.org_scope(org_id)?;
    let name = parse_name("name", &body.name)?;
    if body.labels.len() > 64 || body.labels.values().any(|v| !v.is_string()) {
        return Err(ApiError::validation(
            "labels",
            "must be at most 64 entries whose values are strings",
        ));
    }
    pg_json(
        "labels",
        &serde_json::Value::Object(body.labels.clone()),
        MAX_LABELS_BYTES,
    )?;
    let dev: Device = sqlx::query_as::<_, DeviceRow>(
        "INSERT INTO devices (id, org_id, name, labels) \
         SELECT $1, o.id, $3, $4 FROM organisations o WHERE o.id = $2 \
         RETURNING id, org_id, name, labels, created_at, last_seen_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(name.as_str())
    .bind(sqlx::types::Json(&body.labels))
    .fetch_optional(&pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?
    .into();
    tracing::info!(%org_id, device_id = %dev.id, name = %dev.name, "device registered");
    Ok((StatusCode::CREATED, Json(dev)))
}

async fn list_devices(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: ListQuery,
) -> ApiResult<Json<Vec<Device>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_limit(q)?;
    list_rows::<DeviceRow, _>(
        &pool,
        "SELECT id, org_id, name, labels, created_at, last_seen_at FROM devices \
         WHERE org_id = $1 ORDER BY name LIMIT $2",
        Some(org_id),
        limit,
    )
    .await
}

async fn get_device(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Device>> {
    let org_id = p.org_scope(org_id)?;
    get_row::<DeviceRow, _>(
        &pool,
        "SELECT id, org_id, name, labels, created_at, last_seen_at FROM devices \
         WHERE org_id = $1 AND id = $2",
        org_id,
        device_id,
        "device",
    )
    .await
}

async fn delete_device(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let org_id = p.org_scope(org_id)?;
    let res = sqlx::query("DELETE FROM devices WHERE org_id = $1 AND id = $2")
        .bind(org_id)
        .bind(device_id)
        .execute(&pool)
        .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::NotFound("device"));
    }
    tracing::info!(%org_id, %device_id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---------- audit log ----------

/// `?limit=&cursor=` of the audit log.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    #[serde(default = "default_audit_limit")]
    limit: i64,
    cursor: Option<String>,
}

fn default_audit_limit() -> i64 {
    100
}

/// The organisation's audit log, newest first, by keyset on the row id (a page costs the
/// same however deep it is). Rows are written by [`crate::http::authorize`].
async fn list_audit(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<AuditParams>, QueryRejection>,
) -> ApiResult<Json<AuditPage>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            // Only the decimal ids this API hands out (no sign, no leading zero).
            Some(c)
                .filter(|c| !c.starts_with('0') && c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::validation("cursor", "is not a cursor returned by this API")
                })
        })
        .transpose()?;
    let mut rows = audit_rows(&pool, org_id, before, q.limit + 1).await?;
    let more = rows.len() > usize::try_from(q.limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(q.limit).unwrap_or(usize::MAX));
    let next_cursor = more
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(AuditPage {
        items: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

async fn audit_rows(
    pool: &PgPool,
    org_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, org_id, key_id, key_name, role, action, method, target, \
                host(client_ip) AS client_ip, status, outcome, created_at \
         FROM audit_log WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(org_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The newest `limit` audit entries of an organisation older than entry `before` (keyset
/// pagination, for the console; the caller checked the organisation against its principal).
pub async fn recent_audit(
    pool: &PgPool,
    org_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditEntry>, sqlx::Error> {
    Ok(audit_rows(pool, org_id, before, limit)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    org_id: Option<Uuid>,
    key_id: Uuid,
    key_name: String,
    role: String,
    action: String,
    method: String,
    target: String,
    client_ip: Option<String>,
    status: i16,
    outcome: String,
    created_at: DateTime<Utc>,
}

impl From<AuditRow> for AuditEntry {
    fn from(r: AuditRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            key_id: r.key_id,
            key_name: r.key_name,
            role: r.role,
            action: r.action,
            method: r.method,
            target: r.target,
            client_ip: r.client_ip,
            status: u16::try_from(r.status).unwrap_or(0),
            outcome: r.outcome,
            created_at: r.created_at,
        }
    }
}

// ---------- rows ----------

/// `organisations` row; the API shape is [`Organisation`].
#[derive(sqlx::FromRow)]
struct OrgRow {
    id: Uuid,
    name: String,
    display_name: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<OrgRow> for Organisation {
    fn from(r: OrgRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            display_name: r.display_name,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// `api_keys` row without the hash; the API shape is [`ApiKeyInfo`].
#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    org_id: Option<Uuid>,
    name: String,
    prefix: String,
    role: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<KeyRow> for ApiKeyInfo {
    fn from(r: KeyRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            name: r.name,
            prefix: r.prefix,
            role: r.role,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// `devices` row; the API shape is [`Device`].
#[derive(sqlx::FromRow)]
struct DeviceRow {
    id: Uuid,
    org_id: Uuid,
    name: String,
    labels: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    created_at: DateTime<Utc>,
    last_seen_at: Option<DateTime<Utc>>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            name: r.name,
            labels: r.labels.0,
            created_at: r.created_at,
            last_seen_at: r.last_seen_at,
        }
    }
}
