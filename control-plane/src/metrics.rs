//! Prometheus metrics of the control plane and the middleware that records them.
//!
//! Invariant: the `route` label is the matched route template (`/v1/organisations/{org_id}`),
//! never the raw path, so label cardinality stays bounded whatever clients send; requests that
//! match no route are counted under `route="unmatched"`.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `rejected` (a client error) or `error` (ours, the agent retries).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// [`crate::ingest::IngestError::reason`], or `too_large` for an oversized body.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    /// `intermediate` (the one that signs) or `root` (the root above it).
    pub ca: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    /// `current` or `previous` intermediate, or `other` (retired or unrecorded issuer).
    pub issuer: &'static str,
}

/// Fleet PKI (`kip_pki_*`). Families stay empty when PKI is not configured, so no
/// misleading zero appears.
#[derive(Debug, Clone, Default)]
pub struct PkiMetrics {
    pub ca_expiry_seconds: Family<CaLabels, Gauge>,
    pub devices_by_issuer: Family<IssuerLabels, Gauge>,
    pub ca_reloads: Family<ResultLabels, Counter>,
}

impl PkiMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pki_ca_expiry_seconds",
            "Seconds until the signing intermediate CA (ca=intermediate) or its root (ca=root) expires",
            m.ca_expiry_seconds.clone(),
        );
        registry.register(
            "pki_devices_by_issuer",
            "Devices by the intermediate (current, previous, other) that issued their newest unexpired, unrevoked certificate; recomputed every minute",
            m.devices_by_issuer.clone(),
        );
        registry.register(
            "pki_ca_reloads",
            "CA reloads after the CA files changed, by result (ok, error)",
            m.ca_reloads.clone(),
        );
        m
    }
}

/// Agent sync ingest (`kip_ingest_*`).
#[derive(Debug, Clone, Default)]
pub struct IngestMetrics {
    pub batches: Family<ResultLabels, Counter>,
    /// Records newly stored (replayed duplicates are not counted).
    pub records: Counter,
    pub duplicates: Counter,
    pub rejected: Family<ReasonLabels, Counter>,
}

impl IngestMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ingest_batches",
            "Agent sync batches, by result (ok, rejected, error)",
            m.batches.clone(),
        );
        registry.register(
            "ingest_records",
            "Agent records newly stored",
            m.records.clone(),
        );
        registry.register(
            "ingest_duplicate_records",
            "Agent records received again (replays) and not stored twice",
            m.duplicates.clone(),
        );
        registry.register(
            "ingest_rejected",
            "Agent sync batches refused or failed, by reason",
            m.rejected.clone(),
        );
        m
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// All metrics of the process, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<HttpLabels, Histogram>,
    /// The LLM gateway's metrics (`kip_llm_*`).
    pub llm: crate::llm::metrics::LlmMetrics,
    /// MLflow mirror calls that failed (`kip_mlflow_sync_failures_total`).
    pub mlflow_sync_failures: Counter,
    /// Agent sync ingest (`kip_ingest_*`).
    pub ingest: IngestMetrics,
    /// Fleet PKI (`kip_pki_*`).
    pub pki: PkiMetrics,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kip");
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_duration =
            Family::<HttpLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register(
            "http_requests",
            "HTTP requests handled, by route and status",
            http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, by route and status",
            http_duration.clone(),
        );
        let llm = crate::llm::metrics::LlmMetrics::register(&mut registry);
        let mlflow_sync_failures = Counter::default();
        registry.register(
            "mlflow_sync_failures",
            "Model registry changes that could not be mirrored to MLflow",
            mlflow_sync_failures.clone(),
        );
        let ingest = IngestMetrics::register(&mut registry);
        let pki = PkiMetrics::register(&mut registry);
        Self {
            pki,
            mlflow_sync_failures,
            ingest,
            registry,
            http_requests,
            http_duration,
            llm,
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

/// Middleware: counts every request and observes its latency.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let labels = HttpLabels {
        method,
        route,
        status: resp.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_duration
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    resp
}
