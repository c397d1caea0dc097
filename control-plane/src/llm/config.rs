//! The `[llm]` section of the control-plane config: providers, prices, aliases (fallback
//! chains), routing, cache, per-organisation limits and the inference log writer.
//!
//! Invariants:
//! - Unknown keys are rejected; every duration carries `_ms`, every price `_per_1m_usd`.
//! - Provider API keys come from the file (`api_key`) or from the environment variable named
//!   by `api_key_env`, resolved once at load; they are held in [`Secret`], whose `Debug` and
//!   `Display` print `...`, so a key never reaches a log line.
//! - Every target named in an alias or fallback chain refers to a configured provider.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use kip_shared::{
    mqtt::{MqttEndpoint, TlsFiles},
    validate::in_range,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::config_error::ConfigError;

/// A provider API key. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("...")
    }
}

/// How a provider is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI's API (GPT-5) or any OpenAI-compatible server (self-hosted models).
    OpenaiCompatible,
    /// DeepSeek: OpenAI-compatible plus `reasoning_content` and cache-hit usage fields.
    Deepseek,
    /// AIX Aleph: answers about the organisation's machines from live sensor data.
    Aleph,
}

/// One price row, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_1m_usd: f64,
    pub output_per_1m_usd: f64,
    /// Price of prompt tokens served from the provider's cache; defaults to the input price.
    #[serde(default)]
    pub cached_input_per_1m_usd: Option<f64>,
}

impl Price {
    /// Cost of one call.
    pub fn cost(&self, tokens_in: u64, tokens_out: u64, tokens_cached: u64) -> f64 {
        let cached = tokens_cached.min(tokens_in);
        let uncached = tokens_in - cached;
        let cached_price = self
            .cached_input_per_1m_usd
            .unwrap_or(self.input_per_1m_usd);
        (uncached as f64 * self.input_per_1m_usd
            + cached as f64 * cached_price
            + tokens_out as f64 * self.output_per_1m_usd)
            / 1_000_000.0
    }
}

/// A provider as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub kind: ProviderKind,
    #[serde(default)]
    pub base_url: String,
    /// The key itself (prefer `api_key_env`).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Name of the environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model used when a request names only this provider.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Models served (bare model names in requests are looked up here).
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Whole non-streaming call.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Streaming: until the first event arrives.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Streaming: longest silence between two events.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// Ask for usage in streams (`stream_options.include_usage`); turn off for servers that
    /// reject the field.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
    /// Prices per model. A model of a provider that is not `free` is accepted only when it
    /// has a row here (zero prices are allowed: an explicitly free model).
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Every model of this provider costs nothing (a self-hosted server): requests may name any
    /// model and are charged 0. Off by default, so an unpriced model cannot bypass a budget.
    #[serde(default)]
    pub free: bool,
    /// Aleph only: ask the agents for live values over MQTT.
    #[serde(default)]
    pub mqtt: Option<RawAlephMqtt>,
    #[serde(skip)]
    resolved_env_key: Option<String>,
}

/// `[llm.providers.<aleph>.mqtt]` as written: the broker through which the Aleph provider asks
/// agents for their current values (see `kip_shared::live`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlephMqtt {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// PEM CA file for `mqtts://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and key for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// MQTT client id, also this instance's level in its reply topics; must be unique per
    /// control-plane instance on the broker. Default: `kip-cp-` and 8 random hex digits.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Must equal the agents' `live_query.topic_prefix`.
    #[serde(default = "default_live_topic_prefix")]
    pub topic_prefix: String,
    /// How long a question waits for the agents' answers.
    #[serde(default = "default_live_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Devices asked per question (named in it, else those with the most recent data).
    #[serde(default = "default_max_devices_per_question")]
    pub max_devices_per_question: usize,
    /// Requests waiting for an answer across all questions; beyond it devices are answered
    /// from synced data at once.
    #[serde(default = "default_max_pending_requests")]
    pub max_pending_requests: usize,
    #[serde(default = "default_live_keep_alive_ms")]
    pub keep_alive_ms: u64,
}

fn default_live_topic_prefix() -> String {
    "kip/v1".into()
}
fn default_live_request_timeout_ms() -> u64 {
    2_000
}
fn default_max_devices_per_question() -> usize {
    8
}
fn default_max_pending_requests() -> usize {
    1_024
}
fn default_live_keep_alive_ms() -> u64 {
    30_000
}

/// The checked `[llm.providers.<aleph>.mqtt]`.
#[derive(Debug, Clone)]
pub struct AlephMqttConfig {
    /// Host, port and TLS files (`url`, `ca_file`, `client_cert_file`, `client_key_file`),
    /// checked like the agent's brokers (one type: `kip_shared::mqtt`).
    pub endpoint: MqttEndpoint,
    pub client_id: String,
    pub topic_prefix: String,
    pub request_timeout: Duration,
    pub max_devices_per_question: usize,
    pub max_pending_requests: usize,
    pub keep_alive: Duration,
}

impl RawAlephMqtt {
    fn validate(self, field: &str) -> Result<AlephMqttConfig, ConfigError> {
        let endpoint = MqttEndpoint::parse(
            &self.url,
            TlsFiles {
                ca_file: self.ca_file,
                client_cert_file: self.client_cert_file,
                client_key_file: self.client_key_file,
            },
        )
        .and_then(|e| e.check_rumqttc().map(|()| e))
        .map_err(|e| invalid(format!("{field}.{}: {}", e.field, e.message)))?;
        let client_id = self
            .client_id
            .unwrap_or_else(|| format!("kip-cp-{:08x}", rand::random::<u32>()));
        kip_shared::live::check_instance(&client_id)
            .map_err(|m| invalid(format!("{field}.client_id: {m}")))?;
        kip_shared::live::check_prefix(&self.topic_prefix)
            .map_err(|m| invalid(format!("{field}.topic_prefix: {m}")))?;
        let ms = |name: &str, v: u64, min: u64, max: u64| {
            in_range(v, min, max, " ms")
                .map(Duration::from_millis)
                .map_err(|m| invalid(format!("{field}.{name}: {m}")))
        };
        in_range(self.max_devices_per_question, 1, 100, "")
            .map_err(|m| invalid(format!("{field}.max_devices_per_question: {m}")))?;
        in_range(self.max_pending_requests, 1, 100_000, "")
            .map_err(|m| invalid(format!("{field}.max_pending_requests: {m}")))?;
        Ok(AlephMqttConfig {
            endpoint,
            client_id,
            topic_prefix: self.topic_prefix,
            request_timeout: ms("request_timeout_ms", self.request_timeout_ms, 10, 60_000)?,
            max_devices_per_question: self.max_devices_per_question,
            max_pending_requests: self.max_pending_requests,
            keep_alive: ms("keep_alive_ms", self.keep_alive_ms, 5_000, 3_600_000)?,
        })
    }
}

/// Limits of one organisation, overriding the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrgLimits {
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
    /// LLM calls this organisation may have in flight at once.
    #[serde(default)]
    pub max_in_flight_requests: Option<usize>,
}

/// The `[llm]` section as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLlm {
    /// Target used when a request names no model: `provider/model` or an alias.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Answer from the built-in local fallback when every provider failed.
    #[serde(default = "default_true")]
    pub local_fallback: bool,
    /// Defaults to the Aleph provider alone; when given, list every provider (Aleph too).
    #[serde(default = "default_providers")]
    pub providers: BTreeMap<String, RawProvider>,
    /// Alias -> ordered targets (`provider/model`): the first is tried first, the rest are
    /// its fallback chain.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Target -> targets tried after it fails (LiteLLM-style fallbacks).
    #[serde(default)]
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// `/v1/query` task -> target or alias.
    #[serde(default = "default_tasks")]
    pub tasks: BTreeMap<String, String>,
    /// Retries per target on 429, 5xx, timeouts and dropped connections.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest wait before a retry; a longer `retry-after` moves on to the next target.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Consecutive failures that open a provider's circuit breaker.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failure_threshold: u32,
    #[serde(default = "default_breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// 0 turns the response cache off.
    #[serde(default = "default_cache_max_entries")]
    pub cache_max_entries: usize,
    #[serde(default = "default_rate_limit_per_minute")]
    pub rate_limit_per_minute: u32,
    #[serde(default = "default_rate_limit_burst")]
    pub rate_limit_burst: u32,
    /// Spend limit per organisation and calendar month (UTC); absent means none.
    #[serde(default)]
    pub monthly_budget_usd: Option<f64>,
    /// How long the month's spend read from `llm_spend` is trusted.
    #[serde(default = "default_budget_refresh_ms")]
    pub budget_refresh_ms: u64,
    #[serde(default)]
    pub orgs: BTreeMap<Uuid, RawOrgLimits>,
    /// Capacity of the queue in front of the log writer; when full, records are dropped and
    /// counted (the request never waits).
    #[serde(default = "default_log_queue_capacity")]
    pub log_queue_capacity: usize,
    #[serde(default = "default_log_batch_max_rows")]
    pub log_batch_max_rows: usize,
    #[serde(default = "default_log_flush_interval_ms")]
    pub log_flush_interval_ms: u64,
    /// LLM calls (`/v1/query`, `/v1/chat/completions`, streams until their last chunk) this
    /// process serves at once; more are refused at once with 503 `overloaded`, so an overload
    /// cannot pile up connections and memory.
    #[serde(default = "default_max_in_flight_requests")]
    pub max_in_flight_requests: usize,
    /// LLM calls one organisation may have in flight at once (503 `overloaded` beyond), so one
    /// tenant cannot take every place of `max_in_flight_requests`. Per organisation under
    /// `[llm.orgs."<uuid>"]`. Default: 256, or `max_in_flight_requests` when smaller.
    #[serde(default)]
    pub max_in_flight_requests_per_org: Option<usize>,
    /// Longest fallback list a request may give (`options.fallback`, `x-kip-fallback`);
    /// longer lists answer 400.
    #[serde(default = "default_max_fallbacks_per_request")]
    pub max_fallbacks_per_request: usize,
    /// Upstream calls (first tries, retries and fallbacks together) one request may cause.
    #[serde(default = "default_max_upstream_attempts_per_request")]
    pub max_upstream_attempts_per_request: u32,
    /// The hybrid orchestrator and its tool loop (`[llm.orchestrator]`).
    #[serde(default)]
    pub orchestrator: crate::llm::orchestrator::config::RawOrchestrator,
}

fn default_true() -> bool {
    true
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    120_000
}
fn default_first_byte_timeout_ms() -> u64 {
    60_000
}
fn default_stream_idle_timeout_ms() -> u64 {
    60_000
}
fn default_tasks() -> BTreeMap<String, String> {
    BTreeMap::from([("machine_status".to_owned(), "aleph/aleph".to_owned())])
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_base_ms() -> u64 {
    200
}
fn default_retry_max_ms() -> u64 {
    5_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown_ms() -> u64 {
    30_000
}
fn default_cache_ttl_ms() -> u64 {
    300_000
}
fn default_cache_max_entries() -> usize {
    10_000
}
fn default_rate_limit_per_minute() -> u32 {
    600
}
fn default_rate_limit_burst() -> u32 {
    60
}
fn default_budget_refresh_ms() -> u64 {
    10_000
}
fn default_max_in_flight_requests() -> usize {
    1_024
}
fn default_max_in_flight_requests_per_org() -> usize {
    256
}
fn default_max_fallbacks_per_request() -> usize {
    3
}
fn default_max_upstream_attempts_per_request() -> u32 {
    8
}
fn default_log_queue_capacity() -> usize {
    10_000
}
fn default_log_batch_max_rows() -> usize {
    500
}
fn default_log_flush_interval_ms() -> u64 {
    200
}

fn default_providers() -> BTreeMap<String, RawProvider> {
    BTreeMap::from([(
        "aleph".to_owned(),
        RawProvider {
            kind: ProviderKind::Aleph,
            base_url: String::new(),
            api_key: None,
            api_key_env: None,
            default_model: Some("aleph".into()),
            models: vec!["aleph".into()],
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            first_byte_timeout_ms: default_first_byte_timeout_ms(),
            stream_idle_timeout_ms: default_stream_idle_timeout_ms(),
            stream_usage: true,
            prices: BTreeMap::new(),
            free: false,
            mqtt: None,
            resolved_env_key: None,
        },
    )])
}

impl Default for RawLlm {
    fn default() -> Self {
        Self {
            default_model: None,
            local_fallback: true,
            providers: default_providers(),
            aliases: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            tasks: default_tasks(),
            max_retries: default_max_retries(),
            retry_base_ms: default_retry_base_ms(),
            retry_max_ms: default_retry_max_ms(),
            breaker_failure_threshold: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown_ms(),
            cache_ttl_ms: default_cache_ttl_ms(),
            cache_max_entries: default_cache_max_entries(),
            rate_limit_per_minute: default_rate_limit_per_minute(),
            rate_limit_burst: default_rate_limit_burst(),
            monthly_budget_usd: None,
            budget_refresh_ms: default_budget_refresh_ms(),
            orgs: BTreeMap::new(),
            log_queue_capacity: default_log_queue_capacity(),
            log_batch_max_rows: default_log_batch_max_rows(),
            log_flush_interval_ms: default_log_flush_interval_ms(),
            max_in_flight_requests: default_max_in_flight_requests(),
            max_in_flight_requests_per_org: None,
            max_fallbacks_per_request: default_max_fallbacks_per_request(),
            max_upstream_attempts_per_request: default_max_upstream_attempts_per_request(),
            orchestrator: Default::default(),
        }
    }
}

/// A checked provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing `/`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub default_model: Option<String>,
    pub models: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub stream_usage: bool,
    pub prices: BTreeMap<String, Price>,
    /// Every model is free (`free = true`); otherwise only priced models are accepted.
    pub free: bool,
    /// Aleph only: the live-query MQTT connection; `None` answers from synced data only.
    pub mqtt: Option<AlephMqttConfig>,
}

impl ProviderConfig {
    /// Whether requests may name `model`: priced, or the provider is free (Aleph always is:
    /// it answers from kip's own data and bills no tokens).
    pub fn accepts(&self, model: &str) -> bool {
        self.kind == ProviderKind::Aleph || self.free || self.prices.contains_key(model)
    }
}

/// Per-organisation limits after defaults were applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrgLimits {
    pub rate_limit_per_minute: u32,
    pub rate_limit_burst: u32,
    pub monthly_budget_usd: Option<f64>,
    pub max_in_flight_requests: usize,
}

/// The checked `[llm]` section.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    pub default_model: Option<String>,
    pub local_fallback: bool,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub aliases: BTreeMap<String, Vec<String>>,
    pub fallbacks: BTreeMap<String, Vec<String>>,
    pub tasks: BTreeMap<String, String>,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub breaker_failure_threshold: u32,
    pub breaker_cooldown: Duration,
    pub cache_ttl: Duration,
    pub cache_max_entries: usize,
    pub default_limits: OrgLimits,
    pub orgs: BTreeMap<Uuid, OrgLimits>,
    pub budget_refresh: Duration,
    pub log_queue_capacity: usize,
    pub log_batch_max_rows: usize,
    pub log_flush_interval: Duration,
    pub max_in_flight_requests: usize,
    pub max_fallbacks_per_request: usize,
    pub max_upstream_attempts_per_request: u32,
    pub orchestrator: crate::llm::orchestrator::config::OrchestratorConfig,
}

impl Default for LlmConfig {
    fn default() -> Self {
        match RawLlm::default().validate() {
            Ok(c) => c,
            // The defaults are checked by a unit test; this arm is unreachable in practice.
            Err(_) => Self {
                default_model: None,
                local_fallback: true,
                providers: BTreeMap::new(),
                aliases: BTreeMap::new(),
                fallbacks: BTreeMap::new(),
                tasks: BTreeMap::new(),
                max_retries: 0,
                retry_base: Duration::from_millis(200),
                retry_max: Duration::from_secs(5),
                breaker_failure_threshold: 5,
                breaker_cooldown: Duration::from_secs(30),
                cache_ttl: Duration::from_secs(300),
                cache_max_entries: 0,
                default_limits: OrgLimits {
                    rate_limit_per_minute: 600,
                    rate_limit_burst: 60,
                    monthly_budget_usd: None,
                    max_in_flight_requests: 256,
                },
                orgs: BTreeMap::new(),
                budget_refresh: Duration::from_secs(10),
                log_queue_capacity: 10_000,
                log_batch_max_rows: 500,
                log_flush_interval: Duration::from_millis(200),
                max_in_flight_requests: 1_024,
                max_fallbacks_per_request: 3,
                max_upstream_attempts_per_request: 8,
                orchestrator: Default::default(),
            },
        }
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid {
        field: "llm",
        message,
    }
}

impl RawLlm {
    /// Resolves `api_key_env` through `env` (injected so tests need no global state).
    pub fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) {
        for p in self.providers.values_mut() {
            if let Some(var) = &p.api_key_env {
                p.resolved_env_key = env(var);
            }
        }
    }

    /// Checks every field; messages name the field as `llm.<path>`.
    pub fn validate(self) -> Result<LlmConfig, ConfigError> {
        let ms = |field: &str, v: u64, min: u64, max: u64| {
            in_range(v, min, max, " ms")
                .map(Duration::from_millis)
                .map_err(|m| invalid(format!("{field}: {m}")))
        };
        let mut providers = BTreeMap::new();
        for (name, p) in self.providers {
            let field = format!("llm.providers.{name}");
            if name.is_empty() || name.contains('/') {
                return Err(invalid(format!(
                    "{field}: a provider name must not contain '/'"
                )));
            }
            if name == super::LOCAL_PROVIDER {
                return Err(invalid(format!(
                    "{field}: {name:?} is reserved for the built-in fallback"
                )));
            }
            let base_url = p.base_url.trim_end_matches('/').to_owned();
            if p.kind != ProviderKind::Aleph
                && !(base_url.starts_with("http://") || base_url.starts_with("https://"))
            {
                return Err(invalid(format!(
                    "{field}.base_url: must start with http:// or https://, got {:?}",
                    p.base_url
                )));
            }
            let api_key = match (&p.api_key, &p.api_key_env) {
                (Some(_), Some(_)) => {
                    return Err(invalid(format!(
                        "{field}: set either api_key or api_key_env, not both"
                    )));
                }
                (Some(k), None) => Some(Secret::new(k.clone())),
                (None, Some(var)) => match p.resolved_env_key {
                    Some(k) if !k.is_empty() => Some(Secret::new(k)),
                    _ => {
                        // Not fatal: the provider stays configured and answers 401 until the
                        // variable is set, and the gateway falls back meanwhile.
                        tracing::warn!(
                            provider = %name,
                            variable = %var,
                            "provider API key variable is not set"
                        );
                        None
                    }
                },
                (None, None) => None,
            };
            for (model, price) in &p.prices {
                let values = [
                    price.input_per_1m_usd,
                    price.output_per_1m_usd,
                    price.cached_input_per_1m_usd.unwrap_or(0.0),
                ];
                if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
                    return Err(invalid(format!(
                        "{field}.prices.{model}: prices must be finite and >= 0"
                    )));
                }
            }
            let mqtt = match (p.kind, p.mqtt) {
                (_, None) => None,
                (ProviderKind::Aleph, Some(m)) => Some(m.validate(&format!("{field}.mqtt"))?),
                (_, Some(_)) => {
                    return Err(invalid(format!(
                        "{field}.mqtt: only an aleph provider asks agents over MQTT"
                    )));
                }
            };
            let cfg = ProviderConfig {
                mqtt,
                name: name.clone(),
                kind: p.kind,
                base_url,
                api_key,
                default_model: p.default_model.or_else(|| p.models.first().cloned()),
                models: p.models,
                connect_timeout: ms(
                    &format!("{field}.connect_timeout_ms"),
                    p.connect_timeout_ms,
                    1,
                    600_000,
                )?,
                request_timeout: ms(
                    &format!("{field}.request_timeout_ms"),
                    p.request_timeout_ms,
                    1,
                    3_600_000,
                )?,
                first_byte_timeout: ms(
                    &format!("{field}.first_byte_timeout_ms"),
                    p.first_byte_timeout_ms,
                    1,
                    3_600_000,
                )?,
                stream_idle_timeout: ms(
                    &format!("{field}.stream_idle_timeout_ms"),
                    p.stream_idle_timeout_ms,
                    1,
                    3_600_000,
                )?,
                stream_usage: p.stream_usage,
                prices: p.prices,
                free: p.free,
            };
            for m in cfg.models.iter().chain(cfg.default_model.as_ref()) {
                if !cfg.accepts(m) {
                    return Err(invalid(format!(
                        "{field}.prices: model {m:?} has no price; add it under \
                         [{field}.prices] (zero prices mark it free) or set free = true"
                    )));
                }
            }
            providers.insert(name, cfg);
        }
        let check_target = |field: &str, t: &str, aliases: &BTreeMap<String, Vec<String>>| {
            if let Some((prov, model)) = t.split_once('/') {
                if !providers.contains_key(prov) && prov != super::LOCAL_PROVIDER {
                    return Err(invalid(format!(
                        "{field}: {t:?} names provider {prov:?}, which is not configured"
                    )));
                }
                if model.is_empty() {
                    return Err(invalid(format!("{field}: {t:?} has an empty model")));
                }
                if let Some(p) = providers.get(prov)
                    && !p.accepts(model)
                {
                    return Err(invalid(format!(
                        "{field}: {t:?} has no price under [llm.providers.{prov}.prices] \
                         (and the provider is not free = true)"
                    )));
                }
                Ok(())
            } else if aliases.contains_key(t) {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{field}: {t:?} is neither provider/model nor a configured alias"
                )))
            }
        };
        let no_aliases = BTreeMap::new();
        for (alias, targets) in &self.aliases {
            if alias.contains('/') {
                return Err(invalid(format!(
                    "llm.aliases.{alias}: an alias must not contain '/'"
                )));
            }
            if targets.is_empty() {
                return Err(invalid(format!("llm.aliases.{alias}: must not be empty")));
            }
            for t in targets {
                check_target(&format!("llm.aliases.{alias}"), t, &no_aliases)?;
            }
        }
        for (from, targets) in &self.fallbacks {
            check_target(&format!("llm.fallbacks.{from}"), from, &self.aliases)?;
            for t in targets {
                check_target(&format!("llm.fallbacks.{from}"), t, &no_aliases)?;
            }
        }
        // Tasks may name the default Aleph provider even when the operator removed it: such a
        // task then answers 422, which is checked at request time.
        if let Some(d) = &self.default_model {
            check_target("llm.default_model", d, &self.aliases)?;
        }
        if self.max_retries > 10 {
            return Err(invalid(format!(
                "llm.max_retries: must be at most 10, got {}",
                self.max_retries
            )));
        }
        if self.breaker_failure_threshold == 0 {
            return Err(invalid(
                "llm.breaker_failure_threshold: must be at least 1".into(),
            ));
        }
        let limits =
            |field: &str, per_min: u32, burst: u32, budget: Option<f64>, in_flight: usize| {
                in_range(in_flight, 1, self.max_in_flight_requests.max(1), "").map_err(|m| {
                    invalid(format!(
                        "{field}: max_in_flight_requests (per organisation): {m} \
                     (at most llm.max_in_flight_requests)"
                    ))
                })?;
                if per_min == 0 || burst == 0 {
                    return Err(invalid(format!(
                        "{field}: rate_limit_per_minute and rate_limit_burst must be at least 1"
                    )));
                }
                if budget.is_some_and(|b| !b.is_finite() || b < 0.0) {
                    return Err(invalid(format!(
                        "{field}.monthly_budget_usd: must be finite and >= 0"
                    )));
                }
                Ok(OrgLimits {
                    rate_limit_per_minute: per_min,
                    rate_limit_burst: burst,
                    monthly_budget_usd: budget,
                    max_in_flight_requests: in_flight,
                })
            };
        let default_limits = limits(
            "llm",
            self.rate_limit_per_minute,
            self.rate_limit_burst,
            self.monthly_budget_usd,
            self.max_in_flight_requests_per_org.unwrap_or(
                default_max_in_flight_requests_per_org().min(self.max_in_flight_requests),
            ),
        )?;
        let mut orgs = BTreeMap::new();
        for (id, o) in self.orgs {
            orgs.insert(
                id,
                limits(
                    &format!("llm.orgs.{id}"),
                    o.rate_limit_per_minute
                        .unwrap_or(default_limits.rate_limit_per_minute),
                    o.rate_limit_burst
                        .unwrap_or(default_limits.rate_limit_burst),
                    o.monthly_budget_usd.or(default_limits.monthly_budget_usd),
                    o.max_in_flight_requests
                        .unwrap_or(default_limits.max_in_flight_requests),
                )?,
            );
        }
        in_range(self.log_queue_capacity, 1, 1_000_000, "")
            .map_err(|m| invalid(format!("llm.log_queue_capacity: {m}")))?;
        in_range(self.log_batch_max_rows, 1, 10_000, "")
            .map_err(|m| invalid(format!("llm.log_batch_max_rows: {m}")))?;
        in_range(self.max_in_flight_requests, 1, 100_000, "")
            .map_err(|m| invalid(format!("llm.max_in_flight_requests: {m}")))?;
        in_range(self.max_fallbacks_per_request, 0, 32, "")
            .map_err(|m| invalid(format!("llm.max_fallbacks_per_request: {m}")))?;
        in_range(self.max_upstream_attempts_per_request, 1, 64, "")
            .map_err(|m| invalid(format!("llm.max_upstream_attempts_per_request: {m}")))?;
        if self.cache_max_entries > 10_000_000 {
            return Err(invalid(
                "llm.cache_max_entries: must be at most 10000000".into(),
            ));
        }
        let orchestrator = self.orchestrator.validate(&providers, &self.aliases)?;
        Ok(LlmConfig {
            orchestrator,
            default_model: self.default_model,
            local_fallback: self.local_fallback,
            providers,
            aliases: self.aliases,
            fallbacks: self.fallbacks,
            tasks: self.tasks,
            max_retries: self.max_retries,
            retry_base: ms("llm.retry_base_ms", self.retry_base_ms, 0, 600_000)?,
            retry_max: ms("llm.retry_max_ms", self.retry_max_ms, 0, 600_000)?,
            breaker_failure_threshold: self.breaker_failure_threshold,
            breaker_cooldown: ms(
                "llm.breaker_cooldown_ms",
                self.breaker_cooldown_ms,
                1,
                3_600_000,
            )?,
            cache_ttl: ms("llm.cache_ttl_ms", self.cache_ttl_ms, 1, 86_400_000)?,
            cache_max_entries: self.cache_max_entries,
            default_limits,
            orgs,
            budget_refresh: ms(
                "llm.budget_refresh_ms",
                self.budget_refresh_ms,
                0,
                3_600_000,
            )?,
            log_queue_capacity: self.log_queue_capacity,
            log_batch_max_rows: self.log_batch_max_rows,
            log_flush_interval: ms(
                "llm.log_flush_interval_ms",
                self.log_flush_interval_ms,
                1,
                60_000,
            )?,
            max_in_flight_requests: self.max_in_flight_requests,
            max_fallbacks_per_request: self.max_fallbacks_per_request,
            max_upstream_attempts_per_request: self.max_upstream_attempts_per_request,
        })
    }
}

impl LlmConfig {
    /// Parses and checks an `[llm]` section given as TOML (without the `[llm]` header);
    /// `env` resolves `api_key_env`. Handy for tests and tools.
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw: RawLlm = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "[llm]".into(),
            message: e.message().to_owned(),
        })?;
        raw.apply_env(&env);
        raw.validate()
    }

    /// The limits of `org`.
    pub fn limits(&self, org: Uuid) -> OrgLimits {
        self.orgs.get(&org).copied().unwrap_or(self.default_limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = RawLlm::default().validate().unwrap();
        assert!(c.providers.contains_key("aleph"));
        assert!(c.local_fallback);
    }

    #[test]
    fn api_key_comes_from_the_named_variable_and_is_never_printed() {
        let c = LlmConfig::from_toml(
            "[providers.openai]\nkind = \"openai_compatible\"\nbase_url = \"https://x/v1/\"\napi_key_env = \"OPENAI_KEY\"\n",
            |v| (v == "OPENAI_KEY").then(|| "sk-secret-123".to_owned()),
        )
        .unwrap();
        let p = &c.providers["openai"];
        assert_eq!(p.api_key.as_ref().unwrap().expose(), "sk-secret-123");
        assert_eq!(p.base_url, "https://x/v1");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-secret-123"), "{dbg}");
        assert!(dbg.contains("..."));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (
                "[providers.a]\nkind = \"deepseek\"\nbase_url = \"ftp://x\"",
                "llm.providers.a.base_url",
            ),
            ("[aliases]\nfast = [\"nope/m\"]", "llm.aliases.fast"),
            ("rate_limit_per_minute = 0", "rate_limit_per_minute"),
            ("monthly_budget_usd = -1.0", "monthly_budget_usd"),
            (
                "[providers.a]\nkind = \"deepseek\"\nbase_url = \"http://x\"\nrequest_timeout_ms = 0",
                "llm.providers.a.request_timeout_ms",
            ),
            ("default_model = \"missing\"", "llm.default_model"),
        ];
        for (toml, field) in cases {
            let err = LlmConfig::from_toml(toml, |_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }

    #[test]
    fn aleph_mqtt_gets_defaults_and_checks_its_fields() {
        let base =
            "[providers.aleph]\nkind = \"aleph\"\nmodels = [\"aleph\"]\n[providers.aleph.mqtt]\n";
        let c =
            LlmConfig::from_toml(&format!("{base}url = \"mqtt://127.0.0.1\"\n"), |_| None).unwrap();
        let m = c.providers["aleph"].mqtt.as_ref().unwrap();
        assert_eq!((m.endpoint.host(), m.endpoint.port()), ("127.0.0.1", 1883));
        assert_eq!(m.request_timeout, Duration::from_millis(2000));
        assert_eq!(m.topic_prefix, "kip/v1");
        assert!(m.client_id.starts_with("kip-cp-"), "{}", m.client_id);
        assert!(m.endpoint.tls().is_none());
        let c = LlmConfig::from_toml(
            &format!(
                "{base}url = \"mqtts://broker\"\nca_file = \"/ca\"\nclient_cert_file = \"/c\"\n\
                 client_key_file = \"/k\"\nclient_id = \"cp-1\"\n"
            ),
            |_| None,
        )
        .unwrap();
        let m = c.providers["aleph"].mqtt.as_ref().unwrap();
        assert_eq!(m.endpoint.port(), 8883);
        assert!(m.endpoint.tls().unwrap().client_auth.is_some());
        let cases = [
            ("url = \"http://x\"", "mqtt.url"),
            ("url = \"mqtts://x\"", "mqtt.ca_file"),
            ("url = \"mqtt://x\"\nca_file = \"/ca\"", "mqtt.url"),
            ("url = \"mqtt://x\"\nclient_id = \"a/b\"", "mqtt.client_id"),
            (
                "url = \"mqtt://x\"\ntopic_prefix = \"a/+\"",
                "mqtt.topic_prefix",
            ),
            (
                "url = \"mqtt://x\"\nrequest_timeout_ms = 0",
                "mqtt.request_timeout_ms",
            ),
            (
                "url = \"mqtt://x\"\nmax_devices_per_question = 0",
                "max_devices_per_question",
            ),
            ("url = \"mqtt://x\"\nbogus = 1", "bogus"),
        ];
        for (extra, field) in cases {
            let err = LlmConfig::from_toml(&format!("{base}{extra}\n"), |_| None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
        let err = LlmConfig::from_toml(
            "[providers.a]\nkind = \"deepseek\"\nbase_url = \"http://x\"\n[providers.a.mqtt]\nurl = \"mqtt://x\"\n",
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only an aleph provider"), "{err}");
    }

    #[test]
    fn per_organisation_limits_override_the_defaults() {
        let org = Uuid::new_v4();
        let c = LlmConfig::from_toml(
            &format!(
                "rate_limit_per_minute = 1000\nmonthly_budget_usd = 50.0\n\
                 [orgs.\"{org}\"]\nrate_limit_per_minute = 1\n"
            ),
            |_| None,
        )
        .unwrap();
        let own = c.limits(org);
        assert_eq!(own.rate_limit_per_minute, 1);
        assert_eq!(own.rate_limit_burst, 60);
        assert_eq!(own.monthly_budget_usd, Some(50.0));
        assert_eq!(c.limits(Uuid::new_v4()).rate_limit_per_minute, 1000);
    }

    #[test]
    fn price_counts_cached_tokens_at_the_cached_rate() {
        let p = Price {
            input_per_1m_usd: 1.0,
            output_per_1m_usd: 10.0,
            cached_input_per_1m_usd: Some(0.1),
        };
        let c = p.cost(1_000_000, 100_000, 500_000);
        assert!((c - (0.5 + 0.05 + 1.0)).abs() < 1e-9, "{c}");
    }
}
