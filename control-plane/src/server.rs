//! The HTTP server: router, middleware, health endpoints and the shutdown path.
//!
//! Invariants:
//! - One shutdown path: a [`CancellationToken`] cancelled by SIGTERM/SIGINT (or by a test);
//!   the listener stops accepting, in-flight requests get `shutdown_grace` to finish, then
//!   tracked tasks are awaited and the pool is closed.
//! - Every response produced by kip itself, including 404 for unknown routes, 405, 413 and
//!   timeouts, has the JSON error body of [`ApiError`].

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{api, config::Config, error::ApiError, metrics::Metrics, pki_api, registry};

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    /// Recently authenticated API keys (see [`crate::auth`] for the revocation bound).
    pub keys: Arc<crate::auth::KeyCache>,
    pub body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// The fleet PKI; `None` when `pki.ca_dir` is not configured.
    pub pki: Option<Arc<crate::pki::Pki>>,
    /// The LLM gateway (`/v1/query`, `/v1/chat/completions`).
    pub llm: Arc<crate::llm::Gateway>,
    /// The MLflow registry mirror; `None` unless `[mlflow] tracking_uri` is set.
    pub mlflow: Option<Arc<crate::registry::mlflow::MlflowSync>>,
    /// Limits on agent sync batches (`[ingest]`).
    pub ingest: crate::ingest::IngestLimits,
}

impl AppState {
    pub fn new(pool: PgPool, cfg: &Config) -> Self {
        let metrics = Arc::new(Metrics::new());
        let llm = Arc::new(crate::llm::Gateway::new(
            cfg.llm.clone(),
            pool.clone(),
            metrics.llm.clone(),
        ));
        let mlflow = cfg.mlflow.clone().and_then(|m| {
            crate::registry::mlflow::MlflowSync::new(
                m,
                pool.clone(),
                metrics.mlflow_sync_failures.clone(),
            )
            .map_err(|e| tracing::error!(error = %e, "cannot build the MLflow client; MLflow mirroring is off"))
            .ok()
            .map(Arc::new)
        });
        Self {
            mlflow,
            pool,
            metrics,
            keys: Arc::new(crate::auth::KeyCache::new(
                cfg.key_cache_ttl,
                KEY_CACHE_MAX_ENTRIES,
            )),
            body_limit_bytes: cfg.request_body_limit_bytes,
            request_timeout: cfg.request_timeout,
            pki: None,
            llm,
            ingest: cfg.ingest,
        }
    }
}

/// Bound on cached API keys: far above any real number of active keys, small in memory
/// (~100 bytes each).
const KEY_CACHE_MAX_ENTRIES: usize = 100_000;

/// The OpenAPI document, kept in `docs/openapi.json` and served verbatim.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// Builds the full router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/me", get(api::me))
        .route("/organisations", get(api::list_orgs).post(api::create_org))
        .route(
            "/organisations/{org_id}",
            get(api::get_org)
                .patch(api::update_org)
                .delete(api::delete_org),
        )
        .route(
            "/organisations/{org_id}/api-keys",
            get(api::list_keys).post(api::create_key),
        )
        .route(
            "/organisations/{org_id}/api-keys/{key_id}",
            axum::routing::delete(api::revoke_key),
        )
        .route(
            "/organisations/{org_id}/devices",
            get(api::list_devices).post(api::register_device),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}",
            get(api::get_device).delete(api::delete_device),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/sensor-data",
            get(crate::sensor::query),
        )
        .route(
            "/organisations/{org_id}/models",
            get(api::list_models).post(api::register_model),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}",
            get(api::get_model),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}/artifact",
            get(registry::download_artifact)
                .put(registry::upload_artifact)
                .layer(DefaultBodyLimit::max(registry::MAX_ARTIFACT_BYTES)),
        )
        .route(
            "/organisations/{org_id}/models/{model_id}/stage",
            post(registry::set_stage),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/desired-model",
            axum::routing::put(registry::put_desired_model),
        )
        .route(
            "/organisations/{org_id}/model-status",
            get(registry::list_device_model_status),
        )
        .route(
            "/organisations/{org_id}/enroll-tokens",
            post(pki_api::create_enroll_token),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/revoke",
            post(pki_api::revoke_device),
        )
        .route("/pki/ca", get(pki_api::ca_status))
        .route("/pki/ca/reload", post(pki_api::ca_reload))
        .route("/query", post(crate::llm::api::query))
        .route("/chat/completions", post(crate::llm::api::chat_completions));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/enroll", post(pki_api::enroll))
        .route("/renew-expired", post(pki_api::renew_expired))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), timeout))
        .layer(DefaultBodyLimit::max(state.body_limit_bytes))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    sqlx::query("SELECT 1")
        .execute(&st.pool)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "readiness check: database unreachable");
            ApiError::Unavailable("database")
        })?;
    Ok(Json(serde_json::json!({ "status": "ready" })))
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({
            "error": { "code": "method_not_allowed", "message": "method not allowed on this route" }
        })),
    )
        .into_response()
}

/// Ends requests that run longer than the configured timeout with a JSON 504.
async fn timeout(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(st.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Timeout(st.request_timeout.as_millis()).into_response(),
    }
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

/// Serves `router` on `listener` until `token` is cancelled, then drains.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    token: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let shutdown = token.clone();
    // Small JSON answers must leave at once: without TCP_NODELAY, Nagle's algorithm can hold a
    // response segment until the client's delayed ACK (up to 40 ms on Linux).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    let server = tracker.spawn(async move { server.await });
    token.cancelled().await;
    tracker.close();
    match tokio::time::timeout(grace, tracker.wait()).await {
        Ok(()) => {}
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis(),
            "in-flight requests did not finish within the shutdown grace period"
        ),
    }
    if server.is_finished() {
        match server.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    } else {
        Ok(())
    }
}
