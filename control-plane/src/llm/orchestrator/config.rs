//! The `[llm.orchestrator]` section: the model alias of the hybrid orchestrator, its candidate
//! models and judge, and the limits of the tool loop.
//!
//! Invariants: unknown keys are rejected; every limit is bounded and carries its unit in its
//! name; every candidate and the judge name a configured provider (`provider/model`) or an
//! alias, checked at load.

use std::{collections::BTreeMap, time::Duration};

use kip_shared::validate::in_range;
use serde::Deserialize;

use crate::config_error::ConfigError;

/// `[llm.orchestrator]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrchestrator {
    /// The model name that selects the hybrid orchestrator on `/v1/chat/completions` (and is
    /// listed by `/v1/models`).
    #[serde(default = "default_alias")]
    pub alias: String,
    /// Models (`provider/model` or aliases) asked concurrently in hybrid mode (best-of-n).
    /// Empty: the request's model, else `llm.default_model`.
    #[serde(default)]
    pub candidates: Vec<String>,
    /// The model that picks the best candidate answer; absent: the candidate citing the most
    /// sources wins (ties: the first in `candidates`).
    #[serde(default)]
    pub judge_model: Option<String>,
    /// How several candidate answers become one: `best_of_n` (one is chosen, by the judge or
    /// the citation count) or `mixture_of_n` (the fuser model merges them). A request may
    /// choose per call (`/v1/query` `hybrid_strategy`, header `x-kip-hybrid-strategy`).
    #[serde(default)]
    pub strategy: Strategy,
    /// The model that merges the candidates under `mixture_of_n`; absent: the judge model,
    /// else the first candidate.
    #[serde(default)]
    pub fuser_model: Option<String>,
    /// Model calls of one tool loop (the last one is offered no tools, so it must answer).
    #[serde(default = "default_max_steps")]
    pub max_steps: u32,
    /// Tool calls of one tool loop; further calls get an error result.
    #[serde(default = "default_max_tool_calls")]
    pub max_tool_calls: u32,
    /// Tokens (prompt + completion, all steps) of one tool loop; beyond, it stops.
    #[serde(default = "default_max_total_tokens")]
    pub max_total_tokens: u64,
    /// Wall time of one orchestrated request (tools, loop and judge together); below
    /// `server.request_timeout_ms` (checked at load).
    #[serde(default = "default_max_wall_time_ms")]
    pub max_wall_time_ms: u64,
    /// Wall time of the hybrid fan-out (retrieval, stored readings, live values over MQTT,
    /// predictions, all at once); a source not done by then is left out with a note. At most
    /// `max_wall_time_ms`.
    #[serde(default = "default_sources_timeout_ms")]
    pub sources_timeout_ms: u64,
    /// Wall time of one tool call.
    #[serde(default = "default_tool_timeout_ms")]
    pub tool_timeout_ms: u64,
    /// Bytes of one tool result handed to the model (longer results are cut, and say so).
    #[serde(default = "default_max_tool_result_bytes")]
    pub max_tool_result_bytes: usize,
}

/// How the hybrid orchestrator combines its candidates (compare TensorZero's best-of-n and
/// mixture-of-n inference-time optimisations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One candidate is chosen (judge model, else the one citing the most sources).
    #[default]
    BestOfN,
    /// A fuser model writes one answer from all candidates; citations are checked against
    /// the sources the candidates were given.
    MixtureOfN,
}

impl Strategy {
    /// Parses `best_of_n` / `mixture_of_n`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "best_of_n" => Some(Self::BestOfN),
            "mixture_of_n" => Some(Self::MixtureOfN),
            _ => None,
        }
    }
}

fn default_alias() -> String {
    "kip-hybrid".into()
}
fn default_max_steps() -> u32 {
    4
}
fn default_max_tool_calls() -> u32 {
    8
}
fn default_max_total_tokens() -> u64 {
    32_000
}
fn default_max_wall_time_ms() -> u64 {
    25_000
}
fn default_sources_timeout_ms() -> u64 {
    3_000
}
fn default_tool_timeout_ms() -> u64 {
    5_000
}
fn default_max_tool_result_bytes() -> usize {
    16_384
}

impl Default for RawOrchestrator {
    fn default() -> Self {
        Self {
            alias: default_alias(),
            candidates: Vec::new(),
            judge_model: None,
            strategy: Strategy::default(),
            fuser_model: None,
            max_steps: default_max_steps(),
            max_tool_calls: default_max_tool_calls(),
            max_total_tokens: default_max_total_tokens(),
            max_wall_time_ms: default_max_wall_time_ms(),
            sources_timeout_ms: default_sources_timeout_ms(),
            tool_timeout_ms: default_tool_timeout_ms(),
            max_tool_result_bytes: default_max_tool_result_bytes(),
        }
    }
}

/// The checked `[llm.orchestrator]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct OrchestratorConfig {
    pub alias: String,
    pub candidates: Vec<String>,
    pub judge_model: Option<String>,
    pub strategy: Strategy,
    pub fuser_model: Option<String>,
    pub limits: LoopLimits,
    /// Deadline of the hybrid fan-out.
    pub sources_timeout: Duration,
}

/// Bounds of one orchestrated request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopLimits {
    pub max_steps: u32,
    pub max_tool_calls: u32,
    pub max_total_tokens: u64,
    pub max_wall_time: Duration,
    pub tool_timeout: Duration,
    pub max_tool_result_bytes: usize,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        let r = RawOrchestrator::default();
        Self {
            alias: r.alias,
            candidates: Vec::new(),
            judge_model: None,
            strategy: Strategy::default(),
            fuser_model: None,
            sources_timeout: Duration::from_millis(r.sources_timeout_ms),
            limits: LoopLimits {
                max_steps: r.max_steps,
                max_tool_calls: r.max_tool_calls,
                max_total_tokens: r.max_total_tokens,
                max_wall_time: Duration::from_millis(r.max_wall_time_ms),
                tool_timeout: Duration::from_millis(r.tool_timeout_ms),
                max_tool_result_bytes: r.max_tool_result_bytes,
            },
        }
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid {
        field: "llm.orchestrator",
        message,
    }
}

/// Most candidates asked at once.
pub const MAX_CANDIDATES: usize = 4;

impl RawOrchestrator {
    /// Checks every field; `providers` and `aliases` are the configured names.
    pub fn validate<P, A>(
        self,
        providers: &BTreeMap<String, P>,
        aliases: &BTreeMap<String, A>,
    ) -> Result<OrchestratorConfig, ConfigError> {
        let f = |field: &str, r: Result<u64, String>| {
            r.map_err(|m| invalid(format!("llm.orchestrator.{field}: {m}")))
        };
        if self.alias.is_empty() || self.alias.contains('/') || aliases.contains_key(&self.alias) {
            return Err(invalid(format!(
                "llm.orchestrator.alias: {:?} must be non-empty, without '/', and not an \
                 alias of llm.aliases",
                self.alias
            )));
        }
        if self.candidates.len() > MAX_CANDIDATES {
            return Err(invalid(format!(
                "llm.orchestrator.candidates: at most {MAX_CANDIDATES} candidates, got {}",
                self.candidates.len()
            )));
        }
        let known = |t: &str| match t.split_once('/') {
            Some((p, m)) => providers.contains_key(p) && !m.is_empty(),
            None => aliases.contains_key(t),
        };
        for (field, t) in self
            .candidates
            .iter()
            .map(|c| ("candidates", c))
            .chain(self.judge_model.iter().map(|j| ("judge_model", j)))
            .chain(self.fuser_model.iter().map(|j| ("fuser_model", j)))
        {
            if !known(t) {
                return Err(invalid(format!(
                    "llm.orchestrator.{field}: {t:?} is neither provider/model of a configured \
                     provider nor an alias"
                )));
            }
        }
        let steps = f("max_steps", in_range(u64::from(self.max_steps), 1, 16, ""))?;
        let calls = f(
            "max_tool_calls",
            in_range(u64::from(self.max_tool_calls), 0, 64, ""),
        )?;
        let tokens = f(
            "max_total_tokens",
            in_range(self.max_total_tokens, 100, 2_000_000, ""),
        )?;
        let wall = f(
            "max_wall_time_ms",
            in_range(self.max_wall_time_ms, 100, 600_000, " ms"),
        )?;
        let sources = f(
            "sources_timeout_ms",
            in_range(self.sources_timeout_ms, 10, wall, " ms"),
        )?;
        let tool = f(
            "tool_timeout_ms",
            in_range(self.tool_timeout_ms, 10, 60_000, " ms"),
        )?;
        let bytes = f(
            "max_tool_result_bytes",
            in_range(self.max_tool_result_bytes as u64, 256, 1_048_576, ""),
        )?;
        Ok(OrchestratorConfig {
            alias: self.alias,
            candidates: self.candidates,
            judge_model: self.judge_model,
            strategy: self.strategy,
            fuser_model: self.fuser_model,
            sources_timeout: Duration::from_millis(sources),
            limits: LoopLimits {
                max_steps: steps as u32,
                max_tool_calls: calls as u32,
                max_total_tokens: tokens,
                max_wall_time: Duration::from_millis(wall),
                tool_timeout: Duration::from_millis(tool),
                max_tool_result_bytes: bytes as usize,
            },
        })
    }
}
