//! Agent API domain: the mTLS listener agents talk to (`/v1/agent/sync`, `/v1/agent/renew`,
//! `/v1/agent/whoami`, `/v1/agent/models/{model_id}/artifact`).
//!
//! The data path reads top to bottom: [`sync`] authenticates the device by its client
//! certificate ([`crate::pki::authenticate_device`]), hands the body to
//! [`crate::telemetry::store`] (PostgreSQL), records what the device reported and reads what
//! it should run ([`device_state`]: one statement each, composed from the SQL of the health,
//! configuration, release and model domains), and answers the ack with that desired state
//! and [`crate::pki::desired_trust`]. This module owns no table.
//!
//! Statements per request (issue #17): a sync of a small batch runs 8 (certificate check;
//! `BEGIN`, device key-share lock, readings, ack, `COMMIT`; reports; desired state), a heartbeat 4
//! (certificate check, ack, reports, desired state), whatever the device's rollouts and
//! configuration; before, 13 and more.
//!
//! Invariants:
//! - The device is known only from its verified client certificate ([`Device`]), checked
//!   against the `certificates` table on every request, so a revoked certificate is refused
//!   even on a connection opened before the revocation. The body has no device field.
//! - A certificate that expires while its connection stays open is refused on the next
//!   request ([`crate::pki::authenticate_device`] checks `not_after` every time).
//! - Every request has a deadline (`pki.agent_request_timeout_ms`, 504 after it).
//! - Sync batches have their own body limit (`ingest.max_decoded_bytes`); every other route
//!   has the admin API's (`server.request_body_limit_bytes`).
//! - At most `ingest.max_in_flight_syncs_per_device` syncs per device are in flight on a
//!   listener ([`SyncGate`], default 4, issue #17: an agent draining a backlog pipelines its
//!   batches): one more concurrent sync from the same device is answered 429 (code
//!   `sync_in_flight`, `Retry-After: 1`) before its body is read, so one device cannot make
//!   the listener buffer and decode more batches than that at once. Concurrent batches of one
//!   device are safe to store ([`crate::telemetry::ingest`]: keyed rows, an ack that only
//!   grows).
//! - A saturated replica refuses syncs and heartbeats before any of the above ([`shed`]:
//!   `503` with a jittered `Retry-After`, `agent_load_shedding.*`), instead of letting them
//!   queue for the agent pool until it times out.
//! - Desired state is advisory: a stored batch is acknowledged even when reading the desired
//!   model or recording the running one fails (logged).

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub mod device_state;
pub mod shed;

pub use shed::{Admission, RawShedding, SheddingConfig, SheddingMetrics};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, FromRef, FromRequestParts, State},
    http::{HeaderMap, header, request::Parts},
    response::Response,
    routing::{get, post},
};
use axum_server::tls_rustls::RustlsConfig;
use kip_api::{AgentWhoami, CertificateResponse, RenewRequest};
use kip_shared::sync::SyncAck;
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::{
    http::{ApiError, ApiJson, ApiPath, ApiResult, HttpLimits},
    models,
    pki::{self, DeviceCert, Pki},
    telemetry::{self, IngestLimits, IngestMetrics},
};

/// The device behind a request on the agent listener (extractor).
#[derive(Debug, Clone)]
pub struct Device(pub DeviceCert);

impl<S> FromRequestParts<S> for Device
where
    PgPool: FromRef<S>,
    Option<Arc<Pki>>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        // Present only on the TLS listener, after the verifier accepted the chain.
        let info = parts
            .extensions
            .get::<Arc<axum_server::tls::TlsInfo>>()
            .ok_or(ApiError::Forbidden(
                "a device client certificate is required",
            ))?;
        let leaf = info.peer_certificates.first().ok_or(ApiError::Forbidden(
            "a device client certificate is required",
        ))?;
        let pki = Option::<Arc<Pki>>::from_ref(state);
        pki::authenticate_device(&PgPool::from_ref(state), pki.as_deref(), leaf)
            .await
            .map(Self)
    }
}

/// Routes served on the agent mTLS listener, with their body limits: sync batches are larger
/// than ordinary requests and get `ingest.max_decoded_bytes`; every other route gets
/// `http.body_limit_bytes`. Every request, body upload included, is answered 504 after
/// `request_timeout` (`pki.agent_request_timeout_ms`), so a stalled client cannot hold a
/// handler (and its database work) open. Syncs (and heartbeats, which are empty syncs) pass
/// `admission` first ([`shed`]), then `gate` (per device, [`SyncGate`]).
pub fn router<S>(
    http: HttpLimits,
    ingest: IngestLimits,
    request_timeout: Duration,
    admission: Arc<Admission>,
    gate: SyncGate,
) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Option<Arc<Pki>>: FromRef<S>,
    HttpLimits: FromRef<S>,
    IngestLimits: FromRef<S>,
    IngestMetrics: FromRef<S>,
    models::Signing: FromRef<S>,
{
    Router::new()
        .route("/v1/agent/renew", post(renew))
        .route("/v1/agent/whoami", get(whoami))
        .route("/v1/agent/models/{model_id}/artifact", get(download_model))
        .route(
            "/v1/agent/releases/{release_id}/artifact",
            get(download_release),
        )
        .route(
            "/v1/agent/sync",
            // The handler reads the raw body itself (after the per-device gate) and enforces
            // ingest.max_decoded_bytes; the layer keeps the limit visible here.
            post(sync)
                .layer(DefaultBodyLimit::max(ingest.max_decoded_bytes))
                // Outermost on the route: a refused request costs no certificate check, no
                // body read and no pool connection.
                .layer(axum::middleware::from_fn_with_state(admission, shed::admit)),
        )
        .layer(Extension(gate))
        .fallback(crate::http::not_found)
        .layer(axum::middleware::from_fn_with_state(
            HttpLimits {
                request_timeout,
                ..http
            },
            crate::http::timeout,
        ))
        .layer(DefaultBodyLimit::max(http.body_limit_bytes))
}

/// `POST /v1/agent/renew`: a new certificate for the device named by the current one.
async fn renew(
    State(pool): State<PgPool>,
    State(maybe_pki): State<Option<Arc<Pki>>>,
    Device(dev): Device,
    ApiJson(body): ApiJson<RenewRequest>,
) -> ApiResult<Json<CertificateResponse>> {
    pki::renew_device(&pool, maybe_pki.as_deref(), dev, &body.csr_pem)
        .await
        .map(Json)
}

/// `GET /v1/agent/whoami`: the identity the control plane sees in the client certificate.
async fn whoami(Device(dev): Device) -> Json<AgentWhoami> {
    Json(AgentWhoami {
        org_id: dev.identity.org_id,
        device_id: dev.identity.device_id,
        device_name: dev.device_name,
        serial: dev.serial,
        not_after: dev.not_after,
    })
}

/// `GET /v1/agent/models/{model_id}/artifact`: the artifact of the model desired for the
/// calling device, and only that one.
async fn download_model(
    State(pool): State<PgPool>,
    Device(dev): Device,
    ApiPath(model_id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    models::artifact_for_device(&pool, dev.identity.org_id, dev.identity.device_id, model_id).await
}

/// `GET /v1/agent/releases/{release_id}/artifact`: the agent release tarball desired for the
/// calling device, and only that one.
async fn download_release(
    State(pool): State<PgPool>,
    Device(dev): Device,
    ApiPath(release_id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    crate::releases::artifact_for_device(
        &pool,
        dev.identity.org_id,
        dev.identity.device_id,
        release_id,
    )
    .await
}

/// `POST /v1/agent/sync`: stores a [`kip_shared::sync::SyncBatch`] (JSON, gzip when
/// `Content-Encoding: gzip`) for the device of the client certificate and answers the
/// [`SyncAck`].
#[expect(
    clippy::too_many_arguments,
    reason = "axum handler: each extractor is one substate"
)]
async fn sync(
    State(pool): State<PgPool>,
    State(maybe_pki): State<Option<Arc<Pki>>>,
    State(limits): State<IngestLimits>,
    State(metrics): State<IngestMetrics>,
    State(signing): State<models::Signing>,
    Extension(gate): Extension<SyncGate>,
    Device(dev): Device,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<SyncAck>> {
    // Before the body is read: a refused concurrent sync costs no buffering.
    let Some(_slot) = gate.try_enter(dev.identity.device_id) else {
        telemetry::count_refused(&metrics, "in_flight");
        return Err(ApiError::RetryLater {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            code: kip_shared::sync::error_code::SYNC_IN_FLIGHT,
            message: format!(
                "this device already has {} syncs in flight (ingest.max_in_flight_syncs_per_device): \
                 nothing was stored; send fewer batches at once",
                gate.per_device()
            ),
            retry_after_s: 1,
        });
    };
    let body = match read_limited(body, limits.max_decoded_bytes).await {
        Ok(Some(b)) => b,
        Ok(None) => {
            telemetry::count_refused(&metrics, "too_large");
            return Err(ApiError::PayloadTooLarge {
                limit_bytes: limits.max_decoded_bytes,
            });
        }
        Err(e) => {
            telemetry::count_refused(&metrics, "body");
            return Err(ApiError::Coded {
                status: axum::http::StatusCode::BAD_REQUEST,
                code: kip_shared::sync::error_code::BODY_UNDECODABLE,
                message: format!("cannot read the body: {e}"),
            });
        }
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "gzip" => true,
        Some(e) if e == "identity" => false,
        Some(e) => {
            telemetry::count_refused(&metrics, "encoding");
            return Err(ApiError::Coded {
                status: axum::http::StatusCode::BAD_REQUEST,
                code: kip_shared::sync::error_code::BODY_UNDECODABLE,
                message: format!("Content-Encoding {e:?} is not supported: send gzip or identity"),
            });
        }
    };
    let id = telemetry::DeviceIdentity {
        org_id: dev.identity.org_id,
        device_id: dev.identity.device_id,
    };
    let stored = telemetry::store(&pool, limits, &metrics, id, body, gzip).await?;
    let mut ack = stored.ack;
    // Also tells the agent that this control plane takes health reports and heartbeats.
    ack.server_time = Some(chrono::Utc::now());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let config_applied = header(kip_shared::sync::CONFIG_VERSION_HEADER);
    let reported = device_state::Reported {
        health: stored.health.as_ref(),
        running_model: stored.running_model.as_deref(),
        model_error: header(kip_shared::sync::MODEL_ERROR_HEADER),
        config_applied,
        config_error: header(kip_shared::sync::CONFIG_ERROR_HEADER),
        update_status: header(kip_shared::sync::UPDATE_STATUS_HEADER),
    };
    // Recorded first: a paused rollout still offers the release to a device that reported it.
    if let Err(e) = device_state::record(&pool, id, &reported).await {
        tracing::warn!(error = %e, "cannot record the device's reports (health, configuration, update, model)");
    }
    match device_state::desired(&pool, id, config_applied).await {
        Ok(d) => {
            ack.desired.model = d.model;
            ack.desired.shadow_model = d.shadow_model;
            if let Some((version, doc)) = d.config {
                ack.desired.config_version = Some(version);
                ack.desired.config_toml = doc;
            }
            ack.desired.agent_release = d.agent_release;
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the desired state"),
    }
    let trust_reported = header(kip_shared::sync::TRUST_BUNDLE_HEADER).map(str::trim);
    pki::desired_trust(maybe_pki.as_deref(), &dev, trust_reported, &mut ack.desired);
    ack.desired.model_signing_keys_pem = models::trusted_signing_keys(&signing);
    Ok(Json(ack))
}

/// The whole body, or `None` as soon as it exceeds `limit` bytes.
async fn read_limited(body: Body, limit: usize) -> Result<Option<axum::body::Bytes>, axum::Error> {
    use futures_util::StreamExt as _;
    let mut frames = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(frame) = frames.next().await {
        let frame = frame?;
        if out.len() + frame.len() > limit {
            return Ok(None);
        }
        out.extend_from_slice(&frame);
    }
    Ok(Some(out.into()))
}

/// The syncs in flight on this listener, per device (per process: replicas each keep their
/// own, which still bounds a device to `per_device` batches per replica).
#[derive(Debug, Clone)]
pub struct SyncGate {
    in_flight: Arc<std::sync::Mutex<std::collections::HashMap<Uuid, usize>>>,
    per_device: usize,
}

impl Default for SyncGate {
    fn default() -> Self {
        Self::new(crate::telemetry::IngestLimits::default().max_in_flight_syncs_per_device)
    }
}

/// A device's in-flight sync; leaving it (drop, also on error or a cancelled request) frees
/// its place.
#[derive(Debug)]
pub struct SyncSlot {
    gate: SyncGate,
    device: Uuid,
}

impl SyncGate {
    /// A gate that admits `per_device` concurrent syncs of one device (at least 1).
    pub fn new(per_device: usize) -> Self {
        Self {
            in_flight: Arc::default(),
            per_device: per_device.max(1),
        }
    }

    /// How many concurrent syncs of one device it admits.
    pub fn per_device(&self) -> usize {
        self.per_device
    }

    /// How many syncs of `device` are in flight now.
    pub fn in_flight(&self, device: Uuid) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&device)
            .copied()
            .unwrap_or(0)
    }

    /// A place for `device`, or `None` while `per_device` syncs of it are in flight.
    pub fn try_enter(&self, device: Uuid) -> Option<SyncSlot> {
        let mut map = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(device).or_insert(0);
        if *n >= self.per_device {
            return None;
        }
        *n += 1;
        Some(SyncSlot {
            gate: self.clone(),
            device,
        })
    }
}

impl Drop for SyncSlot {
    fn drop(&mut self) {
        let mut map = self
            .gate
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The entry goes with its last slot: the map holds only devices with a sync in flight.
        if let std::collections::hash_map::Entry::Occupied(mut e) = map.entry(self.device) {
            *e.get_mut() = e.get().saturating_sub(1);
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sync_per_device_is_in_flight_with_a_limit_of_one() {
        let gate = SyncGate::new(1);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let first = gate.try_enter(a);
        assert!(first.is_some());
        assert!(
            gate.try_enter(a).is_none(),
            "a second sync of the same device"
        );
        assert!(gate.try_enter(b).is_some(), "another device is not held up");
        drop(first);
        assert!(
            gate.try_enter(a).is_some(),
            "free again once the first ended"
        );
    }

    #[test]
    fn n_syncs_per_device_are_admitted_and_the_next_one_is_refused() {
        let gate = SyncGate::new(3);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut slots: Vec<_> = (0..3).map(|_| gate.try_enter(a).unwrap()).collect();
        assert!(gate.try_enter(a).is_none(), "the fourth of a limit of 3");
        assert!(gate.try_enter(b).is_some(), "another device is not held up");
        slots.pop();
        let again = gate.try_enter(a);
        assert!(again.is_some(), "a freed place is taken again");
        assert!(gate.try_enter(a).is_none());
        drop(slots);
        drop(again);
        assert!(
            gate.in_flight.lock().unwrap().is_empty(),
            "no entry is left behind for an idle device"
        );
    }
}

/// Why the agent listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} (pki.agent_listen_addr): {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Serves `router` with mTLS (`tls`, which the PKI keeps current) on `listener` until `token`
/// is cancelled, then drains open connections for at most `grace`. Runs on `tracker`;
/// returns the bound address.
pub fn spawn_listener(
    listener: std::net::TcpListener,
    router: Router,
    tls: RustlsConfig,
    token: CancellationToken,
    tracker: &TaskTracker,
    grace: Duration,
) -> Result<SocketAddr, ListenError> {
    let addr = listener.local_addr().map_err(|source| ListenError {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ListenError { addr, source })?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .map_err(|source| ListenError { addr, source })?
        .handle(handle.clone());
    tracker.spawn(async move {
        let serve = server.serve(router.into_make_service());
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "agent listener failed");
                }
                return;
            }
            () = token.cancelled() => handle.graceful_shutdown(Some(grace)),
        }
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "agent listener failed during shutdown");
        }
    });
    tracing::info!(%addr, "agent mTLS listener listening");
    Ok(addr)
}
