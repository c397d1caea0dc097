//! Request authentication by API key.
//!
//! Invariants:
//! - Every `/v1` handler takes a [`Principal`]; there is no unauthenticated `/v1` route.
//! - An organisation key can only reach its own organisation: [`Principal::org_scope`] answers
//!   404 (not 403) for another organisation, so a key cannot even learn that it exists.
//! - Revoked keys stop working on the next request (no cache).

use axum::{extract::FromRequestParts, http::request::Parts};
use uuid::Uuid;

use crate::{error::ApiError, keys, server::AppState};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Operator key: manages organisations, may act within any organisation.
    Platform,
    /// Tenant key: acts only within this organisation.
    Org(Uuid),
}

/// The authenticated caller.
#[derive(Debug, Clone, Copy)]
pub struct Principal {
    pub key_id: Uuid,
    pub scope: Scope,
}

impl Principal {
    /// Checks that the caller may act within `org_id`; otherwise the organisation "does not
    /// exist" for this caller.
    pub fn org_scope(&self, org_id: Uuid) -> Result<Uuid, ApiError> {
        match self.scope {
            Scope::Platform => Ok(org_id),
            Scope::Org(own) if own == org_id => Ok(org_id),
            Scope::Org(_) => Err(ApiError::NotFound("organisation")),
        }
    }

    pub fn require_platform(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Platform => Ok(()),
            Scope::Org(_) => Err(ApiError::Forbidden(
                "this operation needs a platform-admin key",
            )),
        }
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    org_id: Option<Uuid>,
    key_sha256: Vec<u8>,
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let key = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        let prefix = keys::prefix_of(key).ok_or(ApiError::Unauthorized)?;
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT id, org_id, key_sha256 FROM api_keys WHERE prefix = $1 AND revoked_at IS NULL",
        )
        .bind(prefix)
        .fetch_optional(&state.pool)
        .await?;
        let row = row.ok_or(ApiError::Unauthorized)?;
        if !keys::digest_eq(&row.key_sha256, &keys::hash(key)) {
            return Err(ApiError::Unauthorized);
        }
        Ok(Principal {
            key_id: row.id,
            scope: row.org_id.map_or(Scope::Platform, Scope::Org),
        })
    }
}
