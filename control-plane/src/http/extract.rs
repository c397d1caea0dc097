//! Extractors whose rejections are [`ApiError`]s, generic over the application state.

use std::time::Duration;

use axum::{
    Json,
    extract::{FromRef, FromRequest, FromRequestParts, Path, Query, Request},
    http::request::Parts,
};
use kip_shared::Name;
use serde::{Deserialize, de::DeserializeOwned};

use super::{ApiError, ApiResult};

/// Request limits of the admin API (`[server]`), a substate of the application state.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body (`server.request_body_limit_bytes`).
    pub body_limit_bytes: usize,
    /// Longest a request may run before it is answered 504 (`server.request_timeout_ms`).
    pub request_timeout: Duration,
}

/// JSON body extractor whose rejections are [`ApiError`]s (400 naming the field, 413).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    HttpLimits: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = HttpLimits::from_ref(state).body_limit_bytes;
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|r| ApiError::from_json_rejection(r, limit))
    }
}

/// Path extractor whose rejections are [`ApiError`]s (400 naming the bad segment).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| Self(v))
            .map_err(|r| ApiError::BadRequest(format!("invalid path: {}", r.body_text())))
    }
}

/// A name (organisation, device, key, model) checked by [`Name::parse`]; 422 naming `field`.
pub fn parse_name(field: &str, s: &str) -> ApiResult<Name> {
    Name::parse(s).map_err(|e| ApiError::validation(field, e.to_string()))
}

/// A string from a client bound for a PostgreSQL `text` column or query parameter: no NUL
/// (PostgreSQL refuses it, which would surface as a 500) and at most `max_bytes`; otherwise
/// 400 naming `field`.
pub fn pg_text<'a>(field: &str, value: &'a str, max_bytes: usize) -> ApiResult<&'a str> {
    kip_shared::validate::pg_text(field, value, max_bytes).map_err(ApiError::from)
}

/// A JSON document from a client bound for a `jsonb` column: no NUL in any key or string, a
/// bounded depth and size; otherwise 400 naming the path (`labels.site`).
pub fn pg_json(field: &str, value: &serde_json::Value, max_bytes: usize) -> ApiResult<()> {
    kip_shared::validate::pg_json(field, value, max_bytes).map_err(ApiError::from)
}

impl From<kip_shared::validate::TextError> for ApiError {
    fn from(e: kip_shared::validate::TextError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
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

/// The checked `?limit=` of a list endpoint (1 to 1000, default 100).
pub fn list_limit(
    q: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<i64> {
    let Query(p) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if (1..=1000).contains(&p.limit) {
        Ok(p.limit)
    } else {
        Err(ApiError::validation("limit", "must be between 1 and 1000"))
    }
}
