//! The composition root's HTTP part: composes the domain routers and the middleware into the
//! admin API and the agent API, serves them, and listens for shutdown signals.
//!
//! Invariants:
//! - One shutdown path: a [`CancellationToken`] cancelled by SIGTERM/SIGINT (or by a test);
//!   listeners stop accepting, in-flight requests get `shutdown_grace` to finish, then
//!   tracked tasks are awaited (see [`crate::ControlPlane::wait`]).
//! - Every response produced by kip itself, including 404 for unknown routes, 405, 413 and
//!   timeouts, has the JSON error body of [`ApiError`].
//! - No domain module imports this one: each domain exposes a `router()` generic over the
//!   state, and only this module names [`AppState`] together with the routes.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, State},
    http::header,
    middleware,
    response::{IntoResponse, Response},
    routing::get,
};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    agent_api, console, fleet, health,
    http::{self, ApiError},
    llm,
    metrics::Metrics,
    ml, models, pki,
    state::AppState,
    telemetry,
};

/// The OpenAPI document, kept in `docs/openapi.json` and served verbatim.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// The admin API: health, metrics, OpenAPI, enrollment and every domain's `/v1` routes.
pub fn router(state: AppState) -> Router {
    let (pki_v1, pki_root) = pki::router();
    let v1 = Router::new()
        .merge(fleet::router())
        .merge(health::router())
        .merge(telemetry::router())
        .merge(models::router())
        .merge(ml::router())
        .merge(pki_v1)
        .merge(llm::api::router())
        .merge(crate::device_config::router())
        .merge(crate::releases::router())
        .merge(crate::documents::router())
        .merge(llm::compat::router());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(pki_root)
        .merge(console::router())
        .nest("/v1", v1)
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            http::AuthState {
                pool: state.pool.clone(),
                keys: state.keys.clone(),
            },
            http::authorize,
        ))
        .layer(middleware::from_fn_with_state(state.http, http::timeout))
        .layer(DefaultBodyLimit::max(state.http.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            state.metrics.http.clone(),
            http::track,
        ))
        .layer(middleware::from_fn(http::head_limits))
        .with_state(state)
}

/// The agent API served on the mTLS listener.
pub fn agent_router(state: AppState) -> Router {
    // Without PKI there is no agent listener; the admin timeout is only a placeholder then.
    let timeout = state
        .pki
        .as_ref()
        .map_or(state.http.request_timeout, |p| p.agent_request_timeout());
    agent_api::router(
        state.http,
        state.ingest,
        timeout,
        state.agent_admission.clone(),
        state.sync_gate.clone(),
    )
    .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(pool): State<PgPool>) -> Result<Json<serde_json::Value>, ApiError> {
    sqlx::query("SELECT 1").execute(&pool).await.map_err(|e| {
        tracing::warn!(error = %e, "readiness check: database unreachable");
        ApiError::Unavailable("database")
    })?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

/// Resolves when SIGTERM or SIGINT arrives, or when `token` is cancelled elsewhere.
pub async fn shutdown_signal(token: CancellationToken) {
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = term => tracing::info!("SIGTERM received, shutting down"),
        r = tokio::signal::ctrl_c() => {
            if r.is_ok() { tracing::info!("SIGINT received, shutting down"); }
        }
        () = token.cancelled() => {}
    }
    token.cancel();
}

/// Serves the admin API on `listener` (on `tracker`) until `token` is cancelled; in-flight
/// requests then finish (bounded by the caller's wait on `tracker`). Slow and greedy clients
/// are bounded by `limits` (see [`http::listener`]).
pub fn spawn_admin(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: http::ConnLimits,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    http::listener::spawn_serve(listener, router, limits, token, tracker);
}
