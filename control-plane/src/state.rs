//! The application state: one [`AppState`] made of substates, each handed to a handler on its
//! own through [`FromRef`] (`State<PgPool>`, `State<Arc<Gateway>>`, ...).
//!
//! Invariants:
//! - No domain imports this module: domain routers are generic over any state that yields the
//!   substates they need, so this struct is only named by the composition root
//!   ([`crate::ControlPlane`] and the `server` module).
//! - Built only by [`crate::ControlPlane::builder`], so a test's state is production's.

use std::sync::Arc;

use axum::extract::FromRef;
use sqlx::PgPool;

use crate::{
    http::{HttpLimits, HttpMetrics, KeyCache},
    llm::Gateway,
    metrics::Metrics,
    models::{mlflow::MlflowSync, signing::ModelSigning},
    pki::{Pki, PkiMetrics},
    telemetry::{IngestLimits, IngestMetrics},
};

/// Shared state of every handler.
#[derive(Clone, Debug, FromRef)]
pub struct AppState {
    pub pool: PgPool,
    /// Every metric of the process; handlers get their domain's families (see the `FromRef`
    /// impls below).
    #[from_ref(skip)]
    pub metrics: Arc<Metrics>,
    /// Recently authenticated API keys (see [`crate::http::KeyCache`] for the revocation
    /// bound).
    pub keys: Arc<KeyCache>,
    /// Body limit and request timeout of the admin API.
    pub http: HttpLimits,
    /// The fleet PKI; `None` when `pki.ca_dir` is not configured.
    pub pki: Option<Arc<Pki>>,
    /// The LLM gateway (`/v1/query`, `/v1/chat/completions`).
    pub llm: Arc<Gateway>,
    /// The MLflow registry mirror; `None` unless `[mlflow] tracking_uri` is set.
    pub mlflow: Option<Arc<MlflowSync>>,
    /// Limits on agent sync batches (`[ingest]`).
    pub ingest: IngestLimits,
    /// The model signing keys; `None` when `pki.ca_dir` is not configured.
    pub model_signing: Option<Arc<ModelSigning>>,
    /// Device state windows (`[health]`).
    pub health: crate::health::HealthConfig,
    /// Signed-in web console sessions.
    pub console: Arc<crate::console::Sessions>,
    /// Documents and retrieval (`[documents]`; the embedding model).
    pub documents: Arc<crate::documents::Documents>,
    /// Load shedding of agent syncs (`[agent_load_shedding]`), one per process.
    pub agent_admission: Arc<crate::agent_api::Admission>,
    /// Syncs in flight per device (`ingest.max_in_flight_syncs_per_device`), one per process.
    pub sync_gate: crate::agent_api::SyncGate,
}

impl FromRef<AppState> for HttpMetrics {
    fn from_ref(s: &AppState) -> Self {
        s.metrics.http.clone()
    }
}

impl FromRef<AppState> for PkiMetrics {
    fn from_ref(s: &AppState) -> Self {
        s.metrics.pki.clone()
    }
}

impl FromRef<AppState> for IngestMetrics {
    fn from_ref(s: &AppState) -> Self {
        s.metrics.ingest.clone()
    }
}

impl FromRef<AppState> for Arc<Metrics> {
    fn from_ref(s: &AppState) -> Self {
        s.metrics.clone()
    }
}
