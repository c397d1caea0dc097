//! The unified LLM gateway: one API in front of several providers, per organisation.
//!
//! A request is resolved to an ordered chain of targets (`provider/model`): the explicit model
//! or alias, then configured fallbacks, then the request's own fallbacks, optionally reordered
//! by estimated cost or by measured latency (EWMA); the built-in local fallback answers last
//! when enabled. Each target is retried with exponential backoff (honouring `retry-after`) on
//! 429, 5xx, timeouts and dropped connections, and skipped while its provider's circuit breaker
//! is open.
//!
//! Invariants:
//! - Per-organisation state (rate limit bucket, spend, cache entries) is keyed by the org id
//!   taken from the caller's API key, never from the request body.
//! - Every provider attempt, cache hit and fallback answer is queued as one `inference_logs`
//!   row (refusals only while more than half the queue is free); the request never waits for
//!   the database. A call's cost goes to the spend ledger ([`spend`]), never dropped.
//! - Only configured models go upstream: priced, or of a `free` (or Aleph) provider; anything
//!   else is `LlmError::UnknownModel` before any call.
//! - One request causes at most `max_upstream_attempts_per_request` provider calls and names
//!   at most `max_fallbacks_per_request` fallbacks; budgets are checked at admission and before
//!   each attempt; breakers are per (provider, organisation).
//! - Provider API keys stay inside [`config::Secret`] and the HTTP clients.

pub mod aleph;
pub mod api;
pub mod cache;
/// OpenAI compatibility: `/v1/models`, `/v1/embeddings` (rag).
pub mod compat;
pub mod config;
pub mod live;
pub mod logs;
pub mod metrics;
pub mod orchestrator;
pub mod provider;
pub mod routing;
pub mod spend;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::body::Bytes;
use futures_util::StreamExt as _;
use kip_shared::backoff::Backoff;
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use self::{
    cache::{CachedAnswer, ResponseCache},
    config::LlmConfig,
    logs::{LogRecord, LogSink},
    metrics::{LlmMetrics, OrgLabel, ProviderLabel, ProviderStatus, TokenLabels},
    provider::{AnyProvider, CallCtx, Chunk, ChunkStream, Completion, ProviderError, Usage},
    routing::{Breaker, Ewma, RateLimiter},
    spend::Spending,
};

/// A configured provider whose HTTP client could not be built (a start-up error).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the client of LLM provider {provider:?}: {source}")]
pub struct ProviderBuildError {
    pub provider: String,
    #[source]
    pub source: crate::outbound::ClientError,
}

/// Provider name of the built-in local fallback in logs and responses.
pub const LOCAL_PROVIDER: &str = "kip-local";

/// One place a request can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub provider: String,
    pub model: String,
}

impl Target {
    fn new(provider: &str, model: &str) -> Self {
        Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
        }
    }
    /// `provider/model`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

/// How to order the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Cheapest estimated cost first (price tables; models of a `free` provider cost 0).
    Cost,
    /// Lowest moving-average latency first (unmeasured targets first, to measure them).
    Latency,
}

/// One attempt, as reported to `/v1/query` clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attempt {
    pub provider: String,
    pub model: String,
    pub status: String,
}

/// A resolved call.
#[derive(Debug, Clone)]
pub struct Call {
    pub org_id: Uuid,
    pub request_id: Uuid,
    pub targets: Vec<Target>,
    /// The OpenAI chat body; `model` is set per target.
    pub body: Map<String, Value>,
    /// Set when the request may be answered from (and stored in) the cache.
    pub cache_key: Option<cache::Key>,
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub target: Target,
    pub completion: Completion,
    pub attempts: Vec<Attempt>,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub cache_hit: bool,
    /// Answered by the built-in fallback.
    pub local: bool,
}

/// A provider and its circuit breakers, one per organisation: timeouts and 5xx answers that
/// one organisation's requests cause (a huge prompt, a model only it uses) open the breaker
/// for that organisation only, never for the others. The cost: a real provider outage is
/// detected per organisation (each sees `breaker_failure_threshold` failures first). The map
/// is bounded by the number of organisations (ids come from API keys, not from requests).
#[derive(Debug)]
struct Slot {
    provider: AnyProvider,
    breakers: Mutex<std::collections::HashMap<Uuid, Arc<Breaker>>>,
    threshold: u32,
    cooldown: Duration,
}

impl Slot {
    fn breaker(&self, org: Uuid) -> Arc<Breaker> {
        self.breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(org)
            .or_insert_with(|| Arc::new(Breaker::new(self.threshold, self.cooldown)))
            .clone()
    }

    /// The most open state among the organisations' breakers (the gauge value).
    fn worst(&self) -> i64 {
        self.breakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|b| b.view() as i64)
            .max()
            .unwrap_or(0)
    }
}

/// The gateway; one per process, shared by the handlers.
#[derive(Debug)]
pub struct Gateway {
    cfg: LlmConfig,
    slots: BTreeMap<String, Slot>,
    cache: ResponseCache,
    rate: RateLimiter,
    ewma: Ewma,
    logs: LogSink,
    log_rx: Mutex<Option<mpsc::Receiver<LogRecord>>>,
    metrics: LlmMetrics,
    pool: PgPool,
    /// Permits for LLM calls in flight (`llm.max_in_flight_requests`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Calls in flight per organisation (`llm.max_in_flight_requests_per_org`).
    org_in_flight: Arc<Mutex<std::collections::HashMap<Uuid, usize>>>,
    /// Month-to-date spend and the ledger that writes it (never dropped).
    spend: Arc<Spending>,
    /// Wakes the spend flusher; dropped with the gateway, which ends the flusher.
    spend_wake: mpsc::Sender<()>,
    spend_rx: Mutex<Option<mpsc::Receiver<()>>>,
}

/// Held while an LLM call is served (for a stream: until its body is dropped): a place of the
/// global limit and one of the organisation's.
#[derive(Debug)]
pub struct InFlight {
    _global: tokio::sync::OwnedSemaphorePermit,
    org: Uuid,
    counts: Arc<Mutex<std::collections::HashMap<Uuid, usize>>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.org) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.org);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sleep_capped(d: Duration) -> tokio::time::Sleep {
    tokio::time::sleep(d)
}

impl Gateway {
    /// Builds providers and state; the log writer starts with [`Gateway::start_log_writer`].
    /// A provider whose client cannot be built is an error: the gateway never starts with a
    /// configured provider silently missing.
    pub fn new(
        cfg: LlmConfig,
        pool: PgPool,
        metrics: LlmMetrics,
    ) -> Result<Self, ProviderBuildError> {
        let mut slots = BTreeMap::new();
        for (name, p) in &cfg.providers {
            let provider =
                AnyProvider::build(p, &metrics).map_err(|source| ProviderBuildError {
                    provider: name.clone(),
                    source,
                })?;
            slots.insert(
                name.clone(),
                Slot {
                    provider,
                    breakers: Mutex::new(std::collections::HashMap::new()),
                    threshold: cfg.breaker_failure_threshold,
                    cooldown: cfg.breaker_cooldown,
                },
            );
            metrics
                .breaker_state
                .get_or_create(&ProviderLabel {
                    provider: name.clone(),
                })
                .set(0);
        }
        let (logs, rx) = LogSink::new(cfg.log_queue_capacity, metrics.clone());
        let (spend_wake, spend_rx) = mpsc::channel(1);
        Ok(Self {
            cache: ResponseCache::new(cfg.cache_ttl, cfg.cache_max_entries),
            rate: RateLimiter::default(),
            spend: Arc::new(Spending::default()),
            spend_wake,
            spend_rx: Mutex::new(Some(spend_rx)),
            org_in_flight: Arc::new(Mutex::new(std::collections::HashMap::new())),
            ewma: Ewma::default(),
            logs,
            log_rx: Mutex::new(Some(rx)),
            metrics,
            pool,
            slots,
            in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_in_flight_requests)),
            cfg,
        })
    }

    /// Starts the `inference_logs` writer and the spend ledger's flusher on `tracker` (once;
    /// later calls return false). Both end after writing what is queued when the gateway is
    /// dropped.
    pub fn start_log_writer(&self, tracker: &TaskTracker) -> bool {
        let rx = self.log_rx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(rx) = rx else {
            return false;
        };
        if let Some(wake) = self
            .spend_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            tracker.spawn(spend::run_flusher(
                self.spend.clone(),
                wake,
                self.pool.clone(),
                self.cfg.log_flush_interval,
            ));
        }
        tracker.spawn(logs::run_writer(
            rx,
            self.pool.clone(),
            self.cfg.log_batch_max_rows,
            self.cfg.log_flush_interval,
            self.metrics.clone(),
        ));
        true
    }

    /// Starts the providers' background connections (Aleph's MQTT client) on `tracker`;
    /// they end when `token` fires.
    pub fn start_providers(
        &self,
        tracker: &TaskTracker,
        token: &tokio_util::sync::CancellationToken,
    ) {
        for slot in self.slots.values() {
            if let AnyProvider::Aleph(a) = &slot.provider {
                a.start(tracker, token);
            }
        }
    }

    /// The live-query client of the (first) Aleph provider with `[mqtt]`: the hybrid
    /// orchestrator's live machine adapter.
    pub fn live_client(&self) -> Option<Arc<live::LiveClient>> {
        self.slots.values().find_map(|slot| match &slot.provider {
            AnyProvider::Aleph(a) => a.live().cloned(),
            _ => None,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &LlmConfig {
        &self.cfg
    }

    fn expand(&self, field: &str, name: &str, out: &mut Vec<Target>) -> Result<(), LlmError> {
        if let Some((p, m)) = name.split_once('/') {
            if !self.cfg.providers.contains_key(p) && p != LOCAL_PROVIDER {
                return Err(LlmError::invalid(
                    field,
                    format!("unknown provider {p:?} in {name:?}"),
                ));
            }
            if m.is_empty() {
                return Err(LlmError::invalid(field, format!("{name:?} has no model")));
            }
            out.push(Target::new(p, m));
            return Ok(());
        }
        if let Some(ts) = self.cfg.aliases.get(name) {
            for t in ts {
                self.expand(field, t, out)?;
            }
            return Ok(());
        }
        if let Some(p) = self
            .cfg
            .providers
            .values()
            .find(|p| p.models.iter().any(|m| m == name))
        {
            out.push(Target::new(&p.name, name));
            return Ok(());
        }
        Err(LlmError::invalid(
            field,
            format!(
                "unknown model {name:?}: use provider/model, a configured alias, or a model \
                 listed by a provider"
            ),
        ))
    }

    /// Resolves the chain of targets of a request. `est` is (input, output) tokens for the
    /// cost estimate.
    pub fn resolve(
        &self,
        model: Option<&str>,
        provider: Option<&str>,
        fallback: &[String],
        strategy: Option<Strategy>,
        est: (u64, u64),
    ) -> Result<Vec<Target>, LlmError> {
        if fallback.len() > self.cfg.max_fallbacks_per_request {
            return Err(LlmError::TooManyFallbacks(format!(
                "the fallback list has {} entries; at most {} are allowed \
                 (llm.max_fallbacks_per_request)",
                fallback.len(),
                self.cfg.max_fallbacks_per_request
            )));
        }
        let mut chain = Vec::new();
        match (model, provider) {
            (Some(m), Some(p)) if !m.contains('/') && !self.cfg.aliases.contains_key(m) => {
                if !self.cfg.providers.contains_key(p) {
                    return Err(LlmError::invalid(
                        "options.provider",
                        format!("unknown provider {p:?}"),
                    ));
                }
                chain.push(Target::new(p, m));
            }
            (Some(m), p) => {
                self.expand("model", m, &mut chain)?;
                if let Some(p) = p {
                    chain.retain(|t| t.provider == p);
                    if chain.is_empty() {
                        return Err(LlmError::invalid(
                            "options.provider",
                            format!("model {m:?} is not served by provider {p:?}"),
                        ));
                    }
                }
            }
            (None, Some(p)) => {
                let cfg = self.cfg.providers.get(p).ok_or_else(|| {
                    LlmError::invalid("options.provider", format!("unknown provider {p:?}"))
                })?;
                let m = cfg.default_model.as_deref().ok_or_else(|| {
                    LlmError::invalid(
                        "model",
                        format!("provider {p:?} has no default_model; name a model"),
                    )
                })?;
                chain.push(Target::new(p, m));
            }
            (None, None) => {
                let d = self.cfg.default_model.as_deref().ok_or_else(|| {
                    LlmError::invalid("model", "required (no llm.default_model configured)")
                })?;
                self.expand("model", d, &mut chain)?;
            }
        }
        let mut i = 0;
        while i < chain.len() {
            if let Some(fb) = self.cfg.fallbacks.get(&chain[i].label()) {
                for f in fb {
                    self.expand("llm.fallbacks", f, &mut chain)?;
                }
            }
            i += 1;
            if i > 64 {
                break;
            }
        }
        if let Some(fb) = model.and_then(|m| self.cfg.fallbacks.get(m)) {
            for f in fb {
                self.expand("llm.fallbacks", f, &mut chain)?;
            }
        }
        for f in fallback {
            self.expand("options.fallback", f, &mut chain)?;
        }
        let mut seen = std::collections::HashSet::new();
        chain.retain(|t| seen.insert(t.label()));
        // A model without a price would be forwarded and cost 0: a budget bypass. Only
        // configured (priced or explicitly free) models go out.
        if let Some(t) = chain.iter().find(|t| {
            t.provider != LOCAL_PROVIDER
                && self
                    .cfg
                    .providers
                    .get(&t.provider)
                    .is_none_or(|p| !p.accepts(&t.model))
        }) {
            return Err(LlmError::UnknownModel(t.label()));
        }
        match strategy {
            Some(Strategy::Cost) => {
                let cost = |t: &Target| self.price(t).map_or(0.0, |p| p.cost(est.0, est.1, 0));
                chain.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
            }
            Some(Strategy::Latency) => {
                let lat = |t: &Target| self.ewma.get(&t.label()).unwrap_or(0.0);
                chain.sort_by(|a, b| lat(a).total_cmp(&lat(b)));
            }
            None => {}
        }
        Ok(chain)
    }

    fn price(&self, t: &Target) -> Option<config::Price> {
        self.cfg
            .providers
            .get(&t.provider)
            .and_then(|p| p.prices.get(&t.model))
            .copied()
    }

    fn cost(&self, t: &Target, u: Usage) -> f64 {
        self.price(t)
            .map_or(0.0, |p| p.cost(u.input, u.output, u.cached))
    }

    /// Books a call's cost: into the ledger at once (budgets see it on the next check), to
    /// `llm_spend` by the flusher.
    fn charge(&self, org: Uuid, cost: f64) {
        if cost > 0.0 && cost.is_finite() {
            self.spend.add(org, cost);
            // Full: a wake-up is already pending.
            let _ = self.spend_wake.try_send(());
            if let Some(budget) = self.cfg.limits(org).monthly_budget_usd {
                self.note_budget(org, budget, self.spend.known(org));
            }
        }
    }

    /// Sets `kip_llm_budget_used_ratio{org}` (the organisation named by the last spend read;
    /// nothing before one). A zero budget counts as spent.
    fn note_budget(&self, org: Uuid, budget: f64, spent: f64) {
        let Some(name) = self.spend.org_name(org) else {
            return;
        };
        let ratio = if budget > 0.0 { spent / budget } else { 1.0 };
        self.metrics
            .budget_used_ratio
            .get_or_create(&OrgLabel { org: name })
            .set(ratio);
    }

    /// Spend already known to have reached the budget (no database read): checked before each
    /// upstream attempt, so a chain stops once a call of it used the budget up.
    fn over_budget(&self, org: Uuid) -> Option<(f64, f64)> {
        let budget = self.cfg.limits(org).monthly_budget_usd?;
        let spent = self.spend.known(org);
        (spent >= budget).then_some((budget, spent))
    }

    fn log(&self, org_id: Uuid, request_id: Uuid, t: &Target, status: &str, l: LogFields) {
        self.logs.record(LogRecord {
            org_id,
            request_id,
            provider: t.provider.clone(),
            model: t.model.clone(),
            tokens_in: l.usage.input,
            tokens_out: l.usage.output,
            tokens_cached: l.usage.cached,
            cost_usd: l.cost_usd,
            latency_ms: l.latency_ms,
            ttft_ms: l.ttft_ms,
            status: status.to_owned(),
            cache_hit: l.cache_hit,
        });
    }

    fn observe(&self, t: &Target, status: &str, latency: Duration, usage: Usage, cost: f64) {
        let provider = t.provider.clone();
        self.metrics
            .requests
            .get_or_create(&ProviderStatus {
                provider: provider.clone(),
                status: status.to_owned(),
            })
            .inc();
        let label = ProviderLabel {
            provider: provider.clone(),
        };
        self.metrics
            .latency
            .get_or_create(&label)
            .observe(latency.as_secs_f64());
        for (kind, n) in [
            ("input", usage.input),
            ("output", usage.output),
            ("cached", usage.cached),
        ] {
            if n > 0 {
                self.metrics
                    .tokens
                    .get_or_create(&TokenLabels {
                        provider: provider.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(n);
            }
        }
        if cost > 0.0 {
            self.metrics.cost_usd.get_or_create(&label).inc_by(cost);
        }
    }

    fn set_breaker_gauge(&self, provider: &str) {
        if let Some(s) = self.slots.get(provider) {
            self.metrics
                .breaker_state
                .get_or_create(&ProviderLabel {
                    provider: provider.to_owned(),
                })
                .set(s.worst());
        }
    }

    fn refuse(&self, org_id: Uuid, request_id: Uuid, status: &str) {
        self.metrics
            .refused
            .get_or_create(&ProviderStatus {
                provider: "-".into(),
                status: status.into(),
            })
            .inc();
        self.logs.record_refusal(LogRecord {
            org_id,
            request_id,
            provider: "-".into(),
            model: "-".into(),
            tokens_in: 0,
            tokens_out: 0,
            tokens_cached: 0,
            cost_usd: 0.0,
            latency_ms: 0.0,
            ttft_ms: None,
            status: status.to_owned(),
            cache_hit: false,
        });
    }

    /// In-flight limits (global and per organisation: 503), rate limit (429) and monthly
    /// budget (402) of the organisation.
    pub async fn admit(&self, org_id: Uuid, request_id: Uuid) -> Result<InFlight, LlmError> {
        let limits = self.cfg.limits(org_id);
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.refuse(org_id, request_id, "overloaded");
            return Err(LlmError::Overloaded(format!(
                "the gateway is serving its maximum of {} LLM calls at once \
                 (llm.max_in_flight_requests); retry in a moment",
                self.cfg.max_in_flight_requests
            )));
        };
        {
            let mut c = self.org_in_flight.lock().unwrap_or_else(|p| p.into_inner());
            let n = c.entry(org_id).or_insert(0);
            if *n >= limits.max_in_flight_requests {
                if *n == 0 {
                    c.remove(&org_id);
                }
                drop(c);
                self.refuse(org_id, request_id, "overloaded");
                return Err(LlmError::Overloaded(format!(
                    "this organisation has its maximum of {} LLM calls in flight \
                     (llm.max_in_flight_requests_per_org); retry in a moment",
                    limits.max_in_flight_requests
                )));
            }
            *n += 1;
        }
        let permit = InFlight {
            _global: permit,
            org: org_id,
            counts: self.org_in_flight.clone(),
        };
        if let Err(wait) = self.rate.take(
            org_id,
            limits.rate_limit_per_minute,
            limits.rate_limit_burst,
        ) {
            self.refuse(org_id, request_id, "rate_limited");
            return Err(LlmError::RateLimited {
                message: format!(
                    "rate limit of {} requests per minute (burst {}) exceeded for this \
                     organisation",
                    limits.rate_limit_per_minute, limits.rate_limit_burst
                ),
                retry_after_s: wait.as_secs().max(1),
            });
        }
        if let Some(budget) = limits.monthly_budget_usd {
            match self
                .spend
                .month_to_date(&self.pool, org_id, self.cfg.budget_refresh)
                .await
            {
                Ok(spent) => {
                    self.note_budget(org_id, budget, spent);
                    if spent >= budget {
                        self.refuse(org_id, request_id, "budget_exceeded");
                        return Err(LlmError::BudgetExceeded(format!(
                            "monthly LLM budget of {budget:.2} USD is used up for this \
                             organisation (spent {spent:.4} USD this month)"
                        )));
                    }
                }
                // Availability over strictness: a database hiccup must not stop every LLM
                // call; the spend is checked again on the next request.
                Err(e) => tracing::warn!(error = %e, "cannot read month-to-date LLM spend"),
            }
        }
        Ok(permit)
    }

    fn cache_lookup(&self, call: &Call) -> Option<Answer> {
        let key = call.cache_key.as_ref()?;
        let Some(hit) = self.cache.get(call.org_id, key) else {
            self.metrics.cache_misses.inc();
            return None;
        };
        self.metrics.cache_hits.inc();
        let target = Target::new(&hit.provider, &hit.model);
        self.log(
            call.org_id,
            call.request_id,
            &target,
            "ok",
            LogFields {
                usage: hit.usage,
                cache_hit: true,
                ..LogFields::default()
            },
        );
        Some(Answer {
            target,
            completion: Completion {
                body: hit.body.clone(),
                usage: hit.usage,
            },
            attempts: Vec::new(),
            cost_usd: 0.0,
            latency_ms: 0.0,
            cache_hit: true,
            local: false,
        })
    }

    fn note(attempts: &[Attempt]) -> String {
        if attempts.is_empty() {
            return "no provider configured for this request".into();
        }
        let parts: Vec<String> = attempts
            .iter()
            .map(|a| format!("{}/{}: {}", a.provider, a.model, a.status))
            .collect();
        format!("tried {}", parts.join(", "))
    }

    /// Backoff before retry `n` (0-based): `retry_after` when given, else the workspace's one
    /// backoff (`kip_shared::backoff`: base * 2^n capped at `retry_max`, equal jitter); `None`
    /// when the provider asks for a wait beyond `retry_max` (move on to the next target).
    fn backoff(&self, n: u32, e: &ProviderError) -> Option<Duration> {
        let d = match e {
            ProviderError::RateLimited {
                retry_after: Some(d),
            } => *d,
            _ => Backoff::new(
                self.cfg.retry_base.min(self.cfg.retry_max),
                self.cfg.retry_max,
            )
            .delay_for(n.saturating_add(1), rand::random()),
        };
        (d <= self.cfg.retry_max).then_some(d)
    }

    fn record_failure(&self, call: &Call, t: &Target, e: &ProviderError, started: Instant) {
        let latency = started.elapsed();
        if let Some(s) = self.slots.get(&t.provider) {
            match e {
                // 401/403/404: the key or the model is wrong on the provider's side, a
                // configuration error, not a healthy answer: it counts toward the breaker.
                ProviderError::Rejected {
                    status: 401 | 403 | 404,
                    ..
                } => s.breaker(call.org_id).failure(),
                // A request refused for its content says nothing about the provider's health
                // either way (and must not reset the failure count).
                ProviderError::Rejected { .. } => {}
                _ => s.breaker(call.org_id).failure(),
            }
        }
        self.set_breaker_gauge(&t.provider);
        self.observe(t, e.kind(), latency, Usage::default(), 0.0);
        self.log(
            call.org_id,
            call.request_id,
            t,
            e.kind(),
            LogFields {
                latency_ms: ms(latency),
                ..LogFields::default()
            },
        );
        tracing::info!(
            request_id = %call.request_id,
            target = %t.label(),
            error = %e,
            "LLM provider attempt failed"
        );
    }

    fn record_success(&self, call: &Call, t: &Target, usage: Usage, l: LogFields) -> f64 {
        let cost = self.cost(t, usage);
        if let Some(s) = self.slots.get(&t.provider) {
            s.breaker(call.org_id).success();
        }
        self.set_breaker_gauge(&t.provider);
        self.ewma
            .observe(&t.label(), l.ttft_ms.unwrap_or(l.latency_ms));
        self.observe(
            t,
            "ok",
            Duration::from_secs_f64(l.latency_ms / 1000.0),
            usage,
            cost,
        );
        self.charge(call.org_id, cost);
        self.log(
            call.org_id,
            call.request_id,
            t,
            "ok",
            LogFields {
                usage,
                cost_usd: cost,
                ..l
            },
        );
        cost
    }

    /// Client errors that another provider would reject as well: passed to the client.
    fn client_fault(e: &ProviderError) -> Option<LlmError> {
        match e {
            ProviderError::Rejected { status, message } if matches!(status, 400 | 413 | 422) => {
                Some(LlmError::ProviderRejected(format!(
                    "the provider rejected the request ({status}): {message}"
                )))
            }
            _ => None,
        }
    }

    fn local_answer(&self, call: &Call, attempts: Vec<Attempt>, started: Instant) -> Answer {
        let target = Target::new(LOCAL_PROVIDER, provider::LOCAL_MODEL);
        let completion = provider::local_fallback(&Self::note(&attempts));
        let latency = started.elapsed();
        self.observe(&target, "fallback", latency, Usage::default(), 0.0);
        self.log(
            call.org_id,
            call.request_id,
            &target,
            "fallback",
            LogFields {
                latency_ms: ms(latency),
                ..LogFields::default()
            },
        );
        Answer {
            target,
            completion,
            attempts,
            cost_usd: 0.0,
            latency_ms: ms(latency),
            cache_hit: false,
            local: true,
        }
    }

    /// Records an answer kip assembled without a model (grounded and hybrid modes' fallback)
    /// like the built-in fallback's: metrics and one `fallback` row in `inference_logs`, so
    /// such answers are metered like any other call.
    pub fn record_fallback(&self, org_id: Uuid, request_id: Uuid, model: &str, latency: Duration) {
        let target = Target::new(LOCAL_PROVIDER, model);
        self.observe(&target, "fallback", latency, Usage::default(), 0.0);
        self.log(
            org_id,
            request_id,
            &target,
            "fallback",
            LogFields {
                latency_ms: ms(latency),
                ..LogFields::default()
            },
        );
    }

    fn all_failed(&self, attempts: &[Attempt]) -> LlmError {
        LlmError::AllFailed(format!(
            "no provider could answer ({})",
            Self::note(attempts)
        ))
    }

    /// The attempt loop shared by [`Gateway::complete`] and [`Gateway::stream`]: walks the
    /// target chain, skips providers that are not configured or whose breaker is open, and
    /// retries each target with backoff on retryable errors. Every failed attempt is recorded
    /// (breaker, metrics, `inference_logs`) and appended to `attempts`; a client fault (the
    /// request itself was refused) ends the loop with an error. The winning attempt is
    /// returned unrecorded: success bookkeeping differs between the two modes.
    async fn run_chain(
        &self,
        call: &Call,
        mode: Mode,
        attempts: &mut Vec<Attempt>,
    ) -> Result<ChainEnd, LlmError> {
        let ctx = CallCtx {
            org_id: call.org_id,
            pool: &self.pool,
        };
        let mut upstream = 0u32;
        for t in &call.targets {
            if t.provider == LOCAL_PROVIDER {
                return Ok(ChainEnd::Local);
            }
            let Some(slot) = self.slots.get(&t.provider) else {
                attempts.push(attempt(t, "unavailable"));
                continue;
            };
            let breaker = slot.breaker(call.org_id);
            let mut n = 0;
            loop {
                if upstream >= self.cfg.max_upstream_attempts_per_request {
                    attempts.push(attempt(t, "attempt_limit"));
                    return Ok(ChainEnd::Exhausted);
                }
                if let Some((budget, spent)) = self.over_budget(call.org_id) {
                    return Err(LlmError::BudgetExceeded(format!(
                        "monthly LLM budget of {budget:.2} USD is used up for this organisation \
                         (spent {spent:.4} USD this month)"
                    )));
                }
                if !breaker.allow() {
                    self.observe(t, "breaker_open", Duration::ZERO, Usage::default(), 0.0);
                    attempts.push(attempt(t, "breaker_open"));
                    break;
                }
                let t0 = Instant::now();
                upstream += 1;
                match Self::try_once(slot, ctx, t, &call.body, mode).await {
                    Ok(outcome) => {
                        return Ok(ChainEnd::Won {
                            target: t.clone(),
                            outcome,
                            started: t0,
                        });
                    }
                    Err(e) => {
                        self.record_failure(call, t, &e, t0);
                        attempts.push(attempt(t, e.kind()));
                        if let Some(err) = Self::client_fault(&e) {
                            return Err(err);
                        }
                        if !e.retryable() || n >= self.cfg.max_retries {
                            break;
                        }
                        let Some(wait) = self.backoff(n, &e) else {
                            break;
                        };
                        sleep_capped(wait).await;
                        n += 1;
                    }
                }
            }
        }
        Ok(ChainEnd::Exhausted)
    }

    /// One attempt at one target: the whole completion, or a stream up to its first event
    /// (bounded by the provider's first-byte timeout).
    async fn try_once(
        slot: &Slot,
        ctx: CallCtx<'_>,
        t: &Target,
        body: &Map<String, Value>,
        mode: Mode,
    ) -> Result<Outcome, ProviderError> {
        match mode {
            Mode::Complete => slot
                .provider
                .complete(ctx, &t.model, body)
                .await
                .map(Outcome::Completion),
            Mode::Stream => {
                let mut s = slot.provider.stream(ctx, &t.model, body).await?;
                match tokio::time::timeout(slot.provider.first_byte_timeout(), s.next()).await {
                    Err(_) => Err(ProviderError::Timeout),
                    Ok(None) => Err(ProviderError::Connection(
                        "stream ended before the first event".into(),
                    )),
                    Ok(Some(Err(e))) => Err(e),
                    Ok(Some(Ok(c))) => Ok(Outcome::Stream(c, s)),
                }
            }
        }
    }

    /// Runs a non-streaming call through cache, chain, retries and fallback.
    pub async fn complete(&self, call: &Call) -> Result<Answer, LlmError> {
        if let Some(a) = self.cache_lookup(call) {
            return Ok(a);
        }
        let started = Instant::now();
        let mut attempts = Vec::new();
        let end = self.run_chain(call, Mode::Complete, &mut attempts).await?;
        let (t, c, t0) = match end {
            ChainEnd::Won {
                target,
                outcome: Outcome::Completion(c),
                started: t0,
            } => (target, c, t0),
            // `run_chain` in complete mode only yields completions.
            ChainEnd::Won { target, .. } => {
                attempts.push(attempt(&target, "internal"));
                return Err(self.all_failed(&attempts));
            }
            ChainEnd::Local => return Ok(self.local_answer(call, attempts, started)),
            ChainEnd::Exhausted if self.cfg.local_fallback => {
                return Ok(self.local_answer(call, attempts, started));
            }
            ChainEnd::Exhausted => return Err(self.all_failed(&attempts)),
        };
        let latency_ms = ms(t0.elapsed());
        let cost = self.record_success(
            call,
            &t,
            c.usage,
            LogFields {
                latency_ms,
                ..LogFields::default()
            },
        );
        attempts.push(attempt(&t, "ok"));
        if let Some(key) = call.cache_key
            && self
                .slots
                .get(&t.provider)
                .is_some_and(|s| s.provider.cacheable())
        {
            self.cache.put(
                call.org_id,
                key,
                CachedAnswer {
                    provider: t.provider.clone(),
                    model: t.model.clone(),
                    body: c.body.clone(),
                    usage: c.usage,
                },
            );
        }
        Ok(Answer {
            target: t,
            completion: c,
            attempts,
            cost_usd: cost,
            latency_ms: ms(started.elapsed()),
            cache_hit: false,
            local: false,
        })
    }

    /// Runs a streaming call: tries the chain until a target produced its first chunk, then
    /// commits to it. Returns the SSE body (`data: ...` events as produced, then
    /// `data: [DONE]`) and the chosen target.
    pub async fn stream(
        self: &Arc<Self>,
        call: Call,
        include_usage: bool,
    ) -> Result<(Target, SseBody), LlmError> {
        let started = Instant::now();
        let mut attempts = Vec::new();
        let end = self.run_chain(&call, Mode::Stream, &mut attempts).await?;
        let (target, first, rest, ttft_ms, local) = match end {
            ChainEnd::Won {
                target,
                outcome: Outcome::Stream(c, s),
                started: t0,
            } => {
                if let Some(slot) = self.slots.get(&target.provider) {
                    slot.breaker(call.org_id).success();
                }
                self.set_breaker_gauge(&target.provider);
                let ttft = t0.elapsed();
                self.metrics
                    .ttft
                    .get_or_create(&ProviderLabel {
                        provider: target.provider.clone(),
                    })
                    .observe(ttft.as_secs_f64());
                (target, c, s, ms(ttft), false)
            }
            // `run_chain` in stream mode only yields streams.
            ChainEnd::Won { target, .. } => {
                attempts.push(attempt(&target, "internal"));
                return Err(self.all_failed(&attempts));
            }
            ChainEnd::Local | ChainEnd::Exhausted if self.cfg.local_fallback => {
                let mut s = provider::local_fallback_stream(&Self::note(&attempts));
                let Some(Ok(first)) = s.next().await else {
                    return Err(self.all_failed(&attempts));
                };
                (
                    Target::new(LOCAL_PROVIDER, provider::LOCAL_MODEL),
                    first,
                    s,
                    ms(started.elapsed()),
                    true,
                )
            }
            ChainEnd::Local | ChainEnd::Exhausted => return Err(self.all_failed(&attempts)),
        };
        let fin = StreamFinish {
            gw: self.clone(),
            call_org: call.org_id,
            request_id: call.request_id,
            target: target.clone(),
            started: Instant::now(),
            ttft_ms,
            usage: None,
            status: None,
            local,
            est_input: estimate_tokens_of_chars(Value::Object(call.body).to_string().len() as u64),
            streamed_chars: 0,
        };
        Ok((
            target,
            SseBody {
                first: Some(first),
                rest,
                fin,
                include_usage,
                in_flight: None,
            },
        ))
    }
}

/// Which kind of answer an attempt waits for.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The whole completion.
    Complete,
    /// A stream's first event.
    Stream,
}

/// What a successful attempt produced.
enum Outcome {
    Completion(Completion),
    /// The first chunk and the rest of the stream.
    Stream(Chunk, ChunkStream),
}

/// How the attempt loop ended.
enum ChainEnd {
    /// A target answered; `started` is when its winning attempt began.
    Won {
        target: Target,
        outcome: Outcome,
        started: Instant,
    },
    /// The chain reached the built-in local fallback target.
    Local,
    /// Every target failed or was skipped.
    Exhausted,
}

/// Why the gateway refused or could not answer a call. The HTTP edge (`llm::api`) maps each
/// kind to its status code; the messages are the client-facing text.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// A request field or routing option does not resolve (422 naming the field).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A target names a model that is not configured with a price (400 `model_not_found`).
    #[error(
        "the model {0:?} is not configured on this gateway (it has no price under \
         [llm.providers.<provider>.prices] and its provider is not marked free)"
    )]
    UnknownModel(String),
    /// The request's fallback list is longer than `llm.max_fallbacks_per_request` (400).
    #[error("{0}")]
    TooManyFallbacks(String),
    /// A provider refused the request itself (400); another provider would too.
    #[error("{0}")]
    ProviderRejected(String),
    /// At the in-flight limit (`llm.max_in_flight_requests`, 503 with `Retry-After: 1`).
    #[error("{0}")]
    Overloaded(String),
    /// The organisation's rate limit (429 with `Retry-After`).
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    /// The organisation's monthly budget is used up (402).
    #[error("{0}")]
    BudgetExceeded(String),
    /// No target could answer (502).
    #[error("{0}")]
    AllFailed(String),
}

impl LlmError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn attempt(t: &Target, status: &str) -> Attempt {
    Attempt {
        provider: t.provider.clone(),
        model: t.model.clone(),
        status: status.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LogFields {
    usage: Usage,
    cost_usd: f64,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    cache_hit: bool,
}

/// Records the outcome of a stream when it ends, whether completed, failed or abandoned by
/// the client (dropped body).
struct StreamFinish {
    gw: Arc<Gateway>,
    call_org: Uuid,
    request_id: Uuid,
    target: Target,
    started: Instant,
    ttft_ms: f64,
    usage: Option<Usage>,
    /// `None` until the stream ended; still `None` at drop means the client went away.
    status: Option<&'static str>,
    local: bool,
    /// Prompt tokens estimated from the request body, for a stream without usage.
    est_input: u64,
    /// Characters of generated text (content, reasoning, tool calls) streamed so far.
    streamed_chars: u64,
}

/// Tokens estimated from characters: 4 characters per token, rounded up (the usual figure for
/// English text with GPT and DeepSeek tokenizers; code and other languages use more tokens per
/// character, so this estimate errs low there; it applies only when the provider sent no
/// usage).
fn estimate_tokens_of_chars(chars: u64) -> u64 {
    chars.div_ceil(4)
}

/// Characters of generated text in one chunk: every choice's `delta.content`,
/// `delta.reasoning_content`, `delta.refusal` and tool-call names and arguments.
fn delta_chars(c: &Chunk) -> u64 {
    let Some(choices) = c.value.get("choices").and_then(Value::as_array) else {
        return 0;
    };
    let len = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map_or(0, |s| s.chars().count() as u64)
    };
    let mut n = 0;
    for ch in choices {
        let Some(d) = ch.get("delta") else {
            continue;
        };
        n += len(d.get("content")) + len(d.get("reasoning_content")) + len(d.get("refusal"));
        for tc in d
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            n += len(tc.pointer("/function/name")) + len(tc.pointer("/function/arguments"));
        }
    }
    n
}

impl StreamFinish {
    /// The provider's usage when it sent one; otherwise (a client that went away before the
    /// usage chunk, or a provider that never sends usage) an estimate from the request and the
    /// text streamed so far, so a cut stream is never free.
    fn usage(&self) -> Usage {
        self.usage.unwrap_or(Usage {
            input: self.est_input,
            output: estimate_tokens_of_chars(self.streamed_chars),
            cached: 0,
        })
    }
}

impl Drop for StreamFinish {
    fn drop(&mut self) {
        let status = self.status.unwrap_or("client_closed");
        let usage = self.usage();
        let latency = self.started.elapsed();
        let latency_ms = self.ttft_ms + ms(latency);
        let call = Call {
            org_id: self.call_org,
            request_id: self.request_id,
            targets: Vec::new(),
            body: Map::new(),
            cache_key: None,
        };
        let fields = LogFields {
            usage,
            latency_ms,
            ttft_ms: Some(self.ttft_ms),
            ..LogFields::default()
        };
        if self.local {
            self.gw
                .observe(&self.target, "fallback", latency, usage, 0.0);
            self.gw.log(
                self.call_org,
                self.request_id,
                &self.target,
                "fallback",
                fields,
            );
            return;
        }
        if status == "ok" || status == "client_closed" {
            if status == "ok" {
                self.gw.record_success(&call, &self.target, usage, fields);
            } else {
                let cost = self.gw.cost(&self.target, usage);
                self.gw.charge(self.call_org, cost);
                self.gw.observe(&self.target, status, latency, usage, cost);
                self.gw.log(
                    self.call_org,
                    self.request_id,
                    &self.target,
                    status,
                    LogFields {
                        cost_usd: cost,
                        ..fields
                    },
                );
            }
        } else {
            if let Some(s) = self.gw.slots.get(&self.target.provider) {
                s.breaker(self.call_org).failure();
            }
            self.gw.set_breaker_gauge(&self.target.provider);
            // The tokens streamed before the failure were produced and are billed.
            let cost = self.gw.cost(&self.target, usage);
            self.gw.charge(self.call_org, cost);
            self.gw.observe(&self.target, status, latency, usage, cost);
            self.gw.log(
                self.call_org,
                self.request_id,
                &self.target,
                status,
                LogFields {
                    cost_usd: cost,
                    ..fields
                },
            );
        }
    }
}

/// The body of a streaming answer.
pub struct SseBody {
    first: Option<Chunk>,
    rest: ChunkStream,
    fin: StreamFinish,
    include_usage: bool,
    /// The call's in-flight permit: a stream counts until the client got its last byte.
    in_flight: Option<InFlight>,
}

impl std::fmt::Debug for SseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseBody")
            .field("target", &self.fin.target)
            .finish_non_exhaustive()
    }
}

fn frame(data: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(data.len() + 8);
    v.extend_from_slice(b"data: ");
    v.extend_from_slice(data);
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

/// A chunk that carries only usage (`choices: []`), sent because kip asked for usage.
fn usage_only(c: &Chunk) -> bool {
    c.value.get("usage").is_some_and(|u| !u.is_null())
        && c.value
            .get("choices")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
}

impl SseBody {
    /// Keeps `permit` until the stream is finished or dropped.
    pub fn hold(mut self, permit: InFlight) -> Self {
        self.in_flight = Some(permit);
        self
    }

    /// The SSE byte stream: each provider event is forwarded as soon as it was parsed.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold(Some(self), |st| async move {
            let mut st = st?;
            loop {
                let next = match st.first.take() {
                    Some(c) => Some(Ok(c)),
                    None => st.rest.next().await,
                };
                match next {
                    Some(Ok(c)) => {
                        if let Some(u) = c.usage() {
                            st.fin.usage = Some(u);
                        }
                        st.fin.streamed_chars += delta_chars(&c);
                        if !st.include_usage && usage_only(&c) {
                            continue;
                        }
                        let b = frame(&c.data);
                        return Some((Ok(b), Some(st)));
                    }
                    Some(Err(e)) => {
                        st.fin.status = Some(e.kind());
                        let body = json!({ "error": {
                            "code": e.kind(),
                            "message": format!("the provider stream failed: {e}"),
                            "type": "provider_error"
                        }});
                        return Some((Ok(frame(body.to_string().as_bytes())), None));
                    }
                    None => {
                        st.fin.status = Some("ok");
                        return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), None));
                    }
                }
            }
        })
    }
}
