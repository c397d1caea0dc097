//! The HTTP API's single error type.
//!
//! Invariant: a client only ever sees `{"error": {"code": ..., "message": ...}}` with a stable
//! `code`; internal details (SQL text, file paths, driver errors) are logged, never returned.

use axum::{
    Json,
    extract::rejection::JsonRejection,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON or does not match the schema (field named in the message).
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(&'static str),
    /// The key's role lacks a permission; the body names it in `permission`.
    #[error(
        "a key with role {role} may not do this: it lacks the permission {permission} \
         (roles that hold it: {holders})"
    )]
    MissingPermission {
        permission: &'static str,
        role: &'static str,
        /// The roles that hold `permission`, comma-separated.
        holders: String,
    },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("request body larger than {limit_bytes} bytes")]
    PayloadTooLarge { limit_bytes: usize },
    /// Well-formed JSON whose values break a rule.
    #[error("{field}: {message}")]
    Validation { field: String, message: String },
    #[error("request took longer than {0} ms")]
    Timeout(u128),
    #[error("service unavailable: {0}")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
    /// A per-organisation rate limit was hit; `Retry-After` tells when to come back.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_s: u64 },
    /// A spending budget is used up.
    #[error("{0}")]
    PaymentRequired(String),
    /// Every upstream (LLM provider) failed.
    #[error("{0}")]
    BadGateway(String),
    /// This process is at its configured concurrency limit; retry shortly (`Retry-After: 1`).
    #[error("{0}")]
    Overloaded(String),
    /// The agent listener is saturated (issue #17, load shedding): `503`, code `overloaded`,
    /// the body's `reason` (`queue_full`, `queue_wait`) and `Retry-After` seconds, chosen
    /// with jitter by the caller so a refused fleet does not come back in lockstep.
    #[error(
        "this control-plane replica is serving its maximum of agent requests ({reason}); \
         nothing was stored: retry after {retry_after_s} s"
    )]
    Shed {
        reason: &'static str,
        retry_after_s: u64,
    },
    /// A refusal whose `code` a machine acts on and that the client is to resend after
    /// `Retry-After` seconds (nothing was stored): e.g. 429 `sync_in_flight`, 503
    /// `sync_conflict`. Status, code and wording are chosen by the caller.
    #[error("{message}")]
    RetryLater {
        status: StatusCode,
        code: &'static str,
        message: String,
        retry_after_s: u64,
    },
    /// A refusal whose `code` a machine acts on (e.g. the agent's sync loop, see
    /// [`kip_shared::sync::error_code`]): status and code are chosen by the caller.
    #[error("{message}")]
    Coded {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}
#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: String,
    /// The missing permission of a 403 from the role check.
    #[serde(skip_serializing_if = "Option::is_none")]
    permission: Option<&'a str>,
    /// Why a saturated replica refused (`Shed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Wraps an unexpected error; it is logged and the client sees a generic message.
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Self::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::MissingPermission { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::Overloaded(_) | Self::Shed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Coded { status, .. } | Self::RetryLater { status, .. } => *status,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) | Self::MissingPermission { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::Validation { .. } => "validation_failed",
            Self::Timeout(_) => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::PaymentRequired(_) => "budget_exceeded",
            Self::BadGateway(_) => "bad_gateway",
            Self::Overloaded(_) | Self::Shed { .. } => kip_shared::sync::error_code::OVERLOADED,
            Self::Coded { code, .. } | Self::RetryLater { code, .. } => code,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let status = self.status();
        let body = Body {
            error: Inner {
                code: self.code(),
                message: self.to_string(),
                permission: match &self {
                    Self::MissingPermission { permission, .. } => Some(permission),
                    _ => None,
                },
                reason: match &self {
                    Self::Shed { reason, .. } => Some(reason),
                    _ => None,
                },
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_s() {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

impl ApiError {
    /// The `Retry-After` (seconds) of a refusal the client is to resend later.
    fn retry_after_s(&self) -> Option<u64> {
        match self {
            Self::TooManyRequests { retry_after_s, .. }
            | Self::Shed { retry_after_s, .. }
            | Self::RetryLater { retry_after_s, .. } => Some(*retry_after_s),
            Self::Overloaded(_) => Some(1),
            _ => None,
        }
    }

    /// Maps axum's JSON rejection to a client error; `limit_bytes` is the configured body limit.
    pub fn from_json_rejection(r: JsonRejection, limit_bytes: usize) -> Self {
        match r {
            JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                // The limit itself is reported by the body-limit layer; the rejection text
                // would only repeat hyper's wording.
                Self::PayloadTooLarge { limit_bytes }
            }
            JsonRejection::MissingJsonContentType(_) => {
                Self::BadRequest("expected Content-Type: application/json".into())
            }
            // serde's message names the field and position, e.g.
            // "unknown field `colour`, expected one of `name`, `labels` at line 1 column 9".
            JsonRejection::JsonDataError(e) => Self::BadRequest(format!(
                "invalid request body: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.body_text())
            )),
            JsonRejection::JsonSyntaxError(e) => Self::BadRequest(format!(
                "malformed JSON: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| e.body_text())
            )),
            other => Self::BadRequest(other.body_text()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            match db.code().as_deref() {
                // unique_violation: name the constraint's field rather than the SQL.
                Some("23505") => {
                    let what = match db.constraint() {
                        Some("organisations_name_key") => {
                            "an organisation with this name already exists"
                        }
                        Some("devices_org_name") => {
                            "a device with this name already exists in the organisation"
                        }
                        Some("ai_models_org_name_version") => {
                            "this model name and version already exist in the organisation"
                        }
                        Some("ai_models_one_champion" | "ai_models_one_challenger") => {
                            "another version of this model already holds this stage; \
                             move it with POST .../models/{model_id}/stage"
                        }
                        _ => "a record with these values already exists",
                    };
                    return Self::Conflict(what.into());
                }
                // foreign_key_violation / check_violation: the input referenced or broke a rule.
                Some("23503") => {
                    return Self::validation("reference", "refers to a record that does not exist");
                }
                Some("23514") => {
                    return Self::validation(
                        db.constraint().unwrap_or("value"),
                        "violates a constraint",
                    );
                }
                _ => {}
            }
        }
        if matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) {
            tracing::warn!(error = %e, "database unavailable");
            return Self::Unavailable("database");
        }
        Self::internal(e)
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
