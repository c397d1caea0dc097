//! The HTTP edge shared by every domain: the one error type ([`ApiError`]), the extractors
//! ([`ApiJson`], [`ApiPath`], [`Principal`]) and the middleware.
//!
//! Nothing here knows the application state: every extractor is generic over any state `S`
//! that yields what it needs through `FromRef` (`PgPool` and `Arc<KeyCache>` for
//! [`Principal`], [`HttpLimits`] for [`ApiJson`]), so a domain router stays generic too and
//! no domain imports the composition root.

mod auth;
mod auth_guard;
mod error;
mod extract;
pub mod listener;
mod middleware;
pub mod policy;
mod rows;

pub use auth::{Authenticated, KeyCache, Principal, Scope, authenticate};
pub use auth_guard::{AuthGuard, AuthGuardConfig};
pub use error::{ApiError, ApiResult};
pub use extract::{
    ApiJson, ApiPath, HttpLimits, ListParams, list_limit, parse_name, pg_json, pg_text,
};
pub use listener::{ConnLimits, head_limits};
pub use middleware::{HttpMetrics, method_not_allowed, not_found, timeout, track};
pub use policy::{AuthState, Permission, Role, authorize};
pub use rows::{
    RecordCursor, chunked_download, decode_cursor, decode_record_cursor, encode_cursor,
    encode_record_cursor, get_row, list_rows,
};
