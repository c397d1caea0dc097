//! Admin API handlers: organisations, API keys, devices, AI models.
//!
//! Invariants:
//! - Every query on tenant data filters by `org_id` taken from the path *after*
//!   [`Principal::org_scope`] checked it, so a key never touches another organisation's rows.
//! - Request bodies are parsed with `deny_unknown_fields`: a misspelt field is a 400 naming
//!   it, never silently ignored.

use axum::{
    Json,
    extract::{FromRequest, FromRequestParts, Path, Query, Request, State},
    http::StatusCode,
    http::request::Parts,
};
use chrono::{DateTime, Utc};
use kip_shared::Name;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::{
    auth::{Principal, Scope},
    error::{ApiError, ApiResult},
    keys,
    server::AppState,
};

/// JSON body extractor whose rejections are [`ApiError`]s (400 naming the field, 413).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|r| ApiError::from_json_rejection(r, state.body_limit_bytes))
    }
}

/// Path extractor whose rejections are [`ApiError`]s (400 naming the bad segment).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|r| ApiError::BadRequest(format!("invalid path: {}", r.body_text())))
    }
}

fn parse_name(field: &str, s: &str) -> ApiResult<Name> {
    Name::parse(s).map_err(|e| ApiError::validation(field, e.to_string()))
}

/// `?limit=` for list endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default = "default_limit")]
    pub limit: i64,
}
fn default_limit() -> i64 {
    100
}
impl ListParams {
    fn checked(&self) -> ApiResult<i64> {
        if (1..=1000).contains(&self.limit) {
            Ok(self.limit)
        } else {
            Err(ApiError::validation("limit", "must be between 1 and 1000"))
        }
    }
}

fn list_params(
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<i64> {
    let Query(p) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    p.checked()
}

// ---------- who am I ----------

#[derive(Debug, Serialize, Deserialize)]
pub struct Me {
    pub key_id: Uuid,
    pub scope: String,
    pub org_id: Option<Uuid>,
}

pub async fn me(p: Principal) -> Json<Me> {
    let (scope, org_id) = match p.scope {
        Scope::Platform => ("platform", None),
        Scope::Org(o) => ("org", Some(o)),
    };
    Json(Me {
        key_id: p.key_id,
        scope: scope.into(),
        org_id,
    })
}

// ---------- organisations ----------

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Organisation {
    pub id: Uuid,
    pub name: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganisation {
    pub name: String,
    pub display_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganisation {
    pub display_name: String,
}

fn check_display_name(s: &str) -> ApiResult<()> {
    if s.trim().is_empty() || s.chars().count() > 200 {
        return Err(ApiError::validation(
            "display_name",
            "must be 1 to 200 characters",
        ));
    }
    Ok(())
}

pub async fn create_org(
    State(st): State<AppState>,
    p: Principal,
    ApiJson(body): ApiJson<CreateOrganisation>,
) -> ApiResult<(StatusCode, Json<Organisation>)> {
    p.require_platform()?;
    let name = parse_name("name", &body.name)?;
    let display = body.display_name.unwrap_or_else(|| name.to_string());
    check_display_name(&display)?;
    let org: Organisation = sqlx::query_as(
        "INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $3) \
         RETURNING id, name, display_name, created_at, updated_at",
    )
    .bind(Uuid::new_v4())
    .bind(name.as_str())
    .bind(&display)
    .fetch_one(&st.pool)
    .await?;
    tracing::info!(org_id = %org.id, name = %org.name, "organisation created");
    Ok((StatusCode::CREATED, Json(org)))
}

pub async fn list_orgs(
    State(st): State<AppState>,
    p: Principal,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Organisation>>> {
    let limit = list_params(q)?;
    // A tenant key sees exactly its own organisation.
    let own = match p.scope {
        Scope::Platform => None,
        Scope::Org(o) => Some(o),
    };
    let orgs = sqlx::query_as(
        "SELECT id, name, display_name, created_at, updated_at FROM organisations \
         WHERE ($1::uuid IS NULL OR id = $1) ORDER BY name LIMIT $2",
    )
    .bind(own)
    .bind(limit)
    .fetch_all(&st.pool)
    .await?;
    Ok(Json(orgs))
}

pub async fn get_org(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Organisation>> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query_as(
        "SELECT id, name, display_name, created_at, updated_at FROM organisations WHERE id = $1",
    )
    .bind(org_id)
    .fetch_optional(&st.pool)
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("organisation"))
}

pub async fn update_org(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<UpdateOrganisation>,
) -> ApiResult<Json<Organisation>> {
    let org_id = p.org_scope(org_id)?;
    check_display_name(&body.display_name)?;
    sqlx::query_as(
        "UPDATE organisations SET display_name = $2, updated_at = now() WHERE id = $1 \
         RETURNING id, name, display_name, created_at, updated_at",
    )
    .bind(org_id)
    .bind(&body.display_name)
    .fetch_optional(&st.pool)
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("organisation"))
}

pub async fn delete_org(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<StatusCode> {
    p.require_platform()?;
    let res = sqlx::query("DELETE FROM organisations WHERE id = $1")
        .bind(org_id)
        .execute(&st.pool)
        .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::NotFound("organisation"));
    }
    st.keys.forget_org(org_id);
    tracing::info!(%org_id, "organisation deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---------- API keys ----------

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub org_id: Option<Uuid>,
    pub name: String,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The key itself. Shown only in this response; only its hash is stored.
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
}

pub async fn create_key(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CreateApiKey>,
) -> ApiResult<(StatusCode, Json<CreatedApiKey>)> {
    let org_id = p.org_scope(org_id)?;
    let name = parse_name("name", &body.name)?;
    let new = keys::generate();
    let info: ApiKeyInfo = sqlx::query_as(
        "INSERT INTO api_keys (id, org_id, scope, name, prefix, key_sha256) \
         SELECT $1, o.id, 'org', $3, $4, $5 FROM organisations o WHERE o.id = $2 \
         RETURNING id, org_id, name, prefix, created_at, revoked_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(name.as_str())
    .bind(&new.prefix)
    .bind(&new.sha256[..])
    .fetch_optional(&st.pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?;
    tracing::info!(%org_id, key_id = %info.id, prefix = %info.prefix, "api key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey { info, key: new.key }),
    ))
}

pub async fn list_keys(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<ApiKeyInfo>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_params(q)?;
    let keys = sqlx::query_as(
        "SELECT id, org_id, name, prefix, created_at, revoked_at FROM api_keys \
         WHERE org_id = $1 ORDER BY created_at, id LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(&st.pool)
    .await?;
    Ok(Json(keys))
}

/// Revokes a key; revoking an already revoked key keeps the first revocation time.
pub async fn revoke_key(
    State(st): State<AppState>,
    p: Principal,
    ApiPath((org_id, key_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ApiKeyInfo>> {
    let org_id = p.org_scope(org_id)?;
    let info: ApiKeyInfo = sqlx::query_as(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) \
         WHERE id = $1 AND org_id = $2 \
         RETURNING id, org_id, name, prefix, created_at, revoked_at",
    )
    .bind(key_id)
    .bind(org_id)
    .fetch_optional(&st.pool)
    .await?
    .ok_or(ApiError::NotFound("api key"))?;
    st.keys.forget_key(key_id);
    tracing::info!(%org_id, %key_id, "api key revoked");
    Ok(Json(info))
}

// ---------- devices ----------

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Device {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub labels: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    pub name: String,
    #[serde(default)]
    pub labels: serde_json::Map<String, serde_json::Value>,
}

pub async fn register_device(
    State(st): State<AppState>,
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
    let dev: Device = sqlx::query_as(
        "INSERT INTO devices (id, org_id, name, labels) \
         SELECT $1, o.id, $3, $4 FROM organisations o WHERE o.id = $2 \
         RETURNING id, org_id, name, labels, created_at, last_seen_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(name.as_str())
    .bind(sqlx::types::Json(&body.labels))
    .fetch_optional(&st.pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?;
    tracing::info!(%org_id, device_id = %dev.id, name = %dev.name, "device registered");
    Ok((StatusCode::CREATED, Json(dev)))
}

pub async fn list_devices(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Device>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_params(q)?;
    let devs = sqlx::query_as(
        "SELECT id, org_id, name, labels, created_at, last_seen_at FROM devices \
         WHERE org_id = $1 ORDER BY name LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(&st.pool)
    .await?;
    Ok(Json(devs))
}

pub async fn get_device(
    State(st): State<AppState>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Device>> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query_as(
        "SELECT id, org_id, name, labels, created_at, last_seen_at FROM devices \
         WHERE org_id = $1 AND id = $2",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(&st.pool)
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("device"))
}

pub async fn delete_device(
    State(st): State<AppState>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let org_id = p.org_scope(org_id)?;
    let res = sqlx::query("DELETE FROM devices WHERE org_id = $1 AND id = $2")
        .bind(org_id)
        .bind(device_id)
        .execute(&st.pool)
        .await?;
    if res.rows_affected() == 0 {
        return Err(ApiError::NotFound("device"));
    }
    tracing::info!(%org_id, %device_id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---------- AI models ----------

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct AiModel {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub version: String,
    pub kind: String,
    pub stage: String,
    pub artifact_sha256: Option<String>,
    pub uri: Option<String>,
    pub metrics: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterModel {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
    #[serde(default)]
    pub stage: Option<ModelStage>,
    pub artifact_sha256: Option<String>,
    pub uri: Option<String>,
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// What a model predicts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Rul,
    Anomaly,
    Llm,
    Other,
}
impl ModelKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Rul => "rul",
            Self::Anomaly => "anomaly",
            Self::Llm => "llm",
            Self::Other => "other",
        }
    }
}

/// Lifecycle stage (alias) of a model version.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelStage {
    None,
    Staging,
    Challenger,
    Champion,
    Archived,
}
impl ModelStage {
    /// The stage as stored and shown (`champion`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Staging => "staging",
            Self::Challenger => "challenger",
            Self::Champion => "champion",
            Self::Archived => "archived",
        }
    }
}

pub async fn register_model(
    State(st): State<AppState>,
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
    if let Some(u) = &body.uri
        && (u.is_empty() || u.len() > 2048)
    {
        return Err(ApiError::validation("uri", "must be 1 to 2048 characters"));
    }
    let model: AiModel = sqlx::query_as(
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
    .fetch_optional(&st.pool)
    .await?
    .ok_or(ApiError::NotFound("organisation"))?;
    tracing::info!(%org_id, model_id = %model.id, name = %model.name, version = %model.version, "model registered");
    if let Some(ml) = &st.mlflow {
        ml.model_registered(&model).await;
    }
    Ok((StatusCode::CREATED, Json(model)))
}

pub async fn list_models(
    State(st): State<AppState>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<AiModel>>> {
    let org_id = p.org_scope(org_id)?;
    let limit = list_params(q)?;
    let models = sqlx::query_as(
        "SELECT id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at \
         FROM ai_models WHERE org_id = $1 ORDER BY name, created_at LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(&st.pool)
    .await?;
    Ok(Json(models))
}

pub async fn get_model(
    State(st): State<AppState>,
    p: Principal,
    ApiPath((org_id, model_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<AiModel>> {
    let org_id = p.org_scope(org_id)?;
    sqlx::query_as(
        "SELECT id, org_id, name, version, kind, stage, artifact_sha256, uri, metrics, created_at \
         FROM ai_models WHERE org_id = $1 AND id = $2",
    )
    .bind(org_id)
    .bind(model_id)
    .fetch_optional(&st.pool)
    .await?
    .map(Json)
    .ok_or(ApiError::NotFound("model"))
}
