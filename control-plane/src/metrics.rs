//! The process's Prometheus registry: every domain's metrics, registered once under the
//! `kip_` prefix and rendered at `GET /metrics`.
//!
//! Each domain defines its own metric families (`http::HttpMetrics`, `llm::metrics`,
//! `pki::PkiMetrics`, `telemetry::IngestMetrics`); only the composition root (this module,
//! the `state` and `server` modules) sees them all. Handlers receive their domain's
//! families as a substate, never this struct.

use prometheus_client::{metrics::counter::Counter, registry::Registry};

use crate::{
    health::FleetMetrics, http::HttpMetrics, llm::metrics::LlmMetrics, pki::PkiMetrics,
    telemetry::IngestMetrics,
};

/// All metrics of the process, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `kip_http_*`.
    pub http: HttpMetrics,
    /// The LLM gateway's metrics (`kip_llm_*`).
    pub llm: LlmMetrics,
    /// MLflow mirror calls that failed (`kip_mlflow_sync_failures_total`).
    pub mlflow_sync_failures: Counter,
    /// MLflow alias poller (`kip_mlflow_sync_errors_total`, last successful poll).
    pub mlflow_poll: crate::models::mlflow::PollMetrics,
    /// Agent sync ingest (`kip_ingest_*`).
    pub ingest: IngestMetrics,
    /// Fleet PKI (`kip_pki_*`).
    pub pki: PkiMetrics,
    /// Fleet health (`kip_fleet_*`, `kip_device_*`).
    pub fleet: FleetMetrics,
    /// Drift of deployed models over the fleet (`kip_model_drift*`).
    pub model_drift: crate::ml::monitoring::DriftMetrics,
    /// Model rollouts (`kip_model_rollout_auto_halts_total{reason}`).
    pub model_rollouts: crate::ml::compare::RolloutMetrics,
    /// Load shedding on the agent listener (`kip_agent_requests_*`).
    pub agent_shedding: crate::agent_api::SheddingMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kip");
        let http = HttpMetrics::register(&mut registry);
        let llm = LlmMetrics::register(&mut registry);
        let mlflow_sync_failures = Counter::default();
        registry.register(
            "mlflow_sync_failures",
            "Model registry changes that could not be mirrored to MLflow",
            mlflow_sync_failures.clone(),
        );
        let mlflow_poll = crate::models::mlflow::PollMetrics::register(&mut registry);
        let ingest = IngestMetrics::register(&mut registry);
        let pki = PkiMetrics::register(&mut registry);
        let fleet = FleetMetrics::register(&mut registry);
        let model_drift = crate::ml::monitoring::DriftMetrics::register(&mut registry);
        let model_rollouts = crate::ml::compare::RolloutMetrics::register(&mut registry);
        let agent_shedding = crate::agent_api::SheddingMetrics::register(&mut registry);
        Self {
            agent_shedding,
            model_rollouts,
            model_drift,
            fleet,
            registry,
            http,
            llm,
            mlflow_sync_failures,
            mlflow_poll,
            ingest,
            pki,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
