//! Prometheus metrics of the LLM gateway, registered in the process's one registry.
//!
//! Invariant: labels are provider names from config and fixed status words, never model names
//! sent by clients or organisation ids, so cardinality stays bounded. The one per-organisation
//! series, `kip_llm_budget_used_ratio{org}`, is labelled with the organisation's name (as the
//! fleet metrics are) and exists only for organisations with a monthly budget that called the
//! gateway: one series per organisation at most.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderStatus {
    pub provider: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    /// `input`, `output` or `cached`.
    pub kind: String,
}

/// An organisation, by name (`kip_llm_budget_used_ratio`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabel {
    pub org: String,
}

/// Outcome of a live-query request or response (fixed words).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LiveOutcome {
    pub outcome: &'static str,
}

/// The gateway's metrics.
#[derive(Debug, Clone)]
pub struct LlmMetrics {
    /// Provider calls by outcome (`ok`, `rate_limited`, `server_error`, `timeout`, ...).
    pub requests: Family<ProviderStatus, Counter>,
    pub latency: Family<ProviderLabel, Histogram>,
    pub ttft: Family<ProviderLabel, Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Family<ProviderLabel, Counter<f64, AtomicU64>>,
    /// 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<ProviderLabel, Gauge>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    /// Requests refused before any provider call (`rate_limited`, `budget_exceeded`).
    pub refused: Family<ProviderStatus, Counter>,
    /// Month-to-date spend / monthly budget per organisation (1 and above: spent), set at each
    /// budget check and after each charged call.
    pub budget_used_ratio: Family<OrgLabel, Gauge<f64, AtomicU64>>,
    pub log_rows_written: Counter,
    pub log_rows_dropped: Counter,
    pub log_write_failures: Counter,
    /// Aleph live queries to agents: `sent`, `answered`, `timed_out`, `not_connected`, `busy`.
    pub live_requests: Family<LiveOutcome, Counter>,
    /// Responses received from agents that were not used: `malformed`, `unknown` (unknown or
    /// expired request id), `mismatched` (another organisation or device than asked).
    pub live_responses_dropped: Family<LiveOutcome, Counter>,
    /// 1 while the Aleph MQTT client is connected and subscribed to its reply topics.
    pub live_connected: Gauge,
    /// Connections of the live-query client to its broker (ConnAcks); rising fast means flapping.
    pub live_connections: Counter,
}

fn buckets() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

impl LlmMetrics {
    /// Creates the metrics and registers them under `kip_llm_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(buckets as fn() -> _),
            ttft: Family::new_with_constructor(buckets as fn() -> _),
            tokens: Family::default(),
            cost_usd: Family::default(),
            breaker_state: Family::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            refused: Family::default(),
            budget_used_ratio: Family::default(),
            log_rows_written: Counter::default(),
            log_rows_dropped: Counter::default(),
            log_write_failures: Counter::default(),
            live_requests: Family::default(),
            live_responses_dropped: Family::default(),
            live_connected: Gauge::default(),
            live_connections: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("llm");
        r.register(
            "provider_requests",
            "LLM provider calls by provider and outcome",
            m.requests.clone(),
        );
        r.register(
            "provider_latency_seconds",
            "LLM provider call latency",
            m.latency.clone(),
        );
        r.register(
            "provider_ttft_seconds",
            "Time to the first streamed chunk",
            m.ttft.clone(),
        );
        r.register(
            "tokens",
            "Tokens by provider and kind (input, output, cached)",
            m.tokens.clone(),
        );
        r.register(
            "cost_usd",
            "Spend in US dollars by provider",
            m.cost_usd.clone(),
        );
        r.register(
            "breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        r.register(
            "cache_hits",
            "Responses served from the per-organisation cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Cacheable requests not found in the cache",
            m.cache_misses.clone(),
        );
        r.register(
            "refused",
            "Requests refused before any provider call, by reason",
            m.refused.clone(),
        );
        r.register(
            "log_rows_written",
            "inference_logs rows written",
            m.log_rows_written.clone(),
        );
        r.register(
            "log_rows_dropped",
            "inference_logs rows dropped because the queue was full",
            m.log_rows_dropped.clone(),
        );
        r.register(
            "log_write_failures",
            "Failed inference_logs batch inserts",
            m.log_write_failures.clone(),
        );
        r.register(
            "live_requests",
            "Aleph live-value requests to agents over MQTT, by outcome",
            m.live_requests.clone(),
        );
        r.register(
            "live_responses_dropped",
            "Live-value responses from agents that were dropped, by reason",
            m.live_responses_dropped.clone(),
        );
        r.register(
            "live_connected",
            "1 while the Aleph MQTT client is connected and subscribed to its reply topics",
            m.live_connected.clone(),
        );
        r.register(
            "budget_used_ratio",
            "Month-to-date LLM spend of an organisation divided by its monthly budget",
            m.budget_used_ratio.clone(),
        );
        r.register(
            "live_connections",
            "Connections of the Aleph MQTT client to its broker (ConnAcks received)",
            m.live_connections.clone(),
        );
        m
    }
}
