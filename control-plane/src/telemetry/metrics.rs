//! Agent sync ingest metrics (`kip_ingest_*`).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `rejected` (a client error) or `error` (ours, the agent retries).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// [`super::IngestError::reason`], or `too_large` for an oversized body.
    pub reason: &'static str,
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
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
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
