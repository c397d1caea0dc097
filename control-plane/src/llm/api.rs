//! HTTP handlers of the LLM gateway: kip's `POST /v1/query` and the OpenAI-compatible
//! `POST /v1/chat/completions`.
//!
//! Invariants:
//! - The organisation is the one of the API key (Bearer token); a platform key has none and
//!   gets 403.
//! - `/v1/query` is strict (unknown fields are a 400 naming them); `/v1/chat/completions` is
//!   lenient, because the OpenAI SDKs send fields kip does not know: they are passed on to
//!   the provider untouched. The fields kip knows are checked before anything is forwarded
//!   (message roles, `temperature`, `top_p`, penalties, token limits, `n`, `stream`).
//! - Every client error of `/v1/chat/completions` is a 400 in OpenAI's shape
//!   (`error.type = "invalid_request_error"`, `error.param`, `error.code`), so the SDKs raise
//!   `BadRequestError`; it never answers 422.
//! - Streams are never buffered: each provider event is written to the client as it arrives.

use std::sync::Arc;

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{FromRef, State, rejection::BytesRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Answer, Call, Gateway, LlmError, Strategy, Target, cache};
use crate::http::{ApiError, ApiJson, ApiResult, HttpLimits, KeyCache, Principal, Scope};
use crate::llm::orchestrator::{
    config::Strategy as HybridStrategy,
    hybrid::{self, HybridAnswer, HybridRequest},
    tools::Toolbox,
};
use std::time::Duration;

/// The LLM routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
    Arc<Gateway>: FromRef<S>,
    Arc<crate::documents::Documents>: FromRef<S>,
    crate::health::HealthConfig: FromRef<S>,
{
    Router::new()
        .route("/query", post(query))
        .route("/chat/completions", post(chat_completions))
}

/// An error of the LLM routes: the shared [`ApiError`], or an OpenAI-style error for the cases
/// OpenAI clients recognise (`model_not_found` carries `type` and `param` like OpenAI's).
#[derive(Debug)]
pub enum LlmApiError {
    Api(ApiError),
    /// 400 `model_not_found` naming the model.
    UnknownModel(String),
    /// 400 `invalid_request_error` naming the parameter (`param` is null for the whole body).
    Invalid {
        param: Option<String>,
        code: &'static str,
        message: String,
    },
}

impl LlmApiError {
    fn invalid(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: Some(param.into()),
            code,
            message: message.into(),
        }
    }

    /// The OpenAI-compatible form: kip's 400/422 become OpenAI's 400 `invalid_request_error`.
    fn openai(self) -> Self {
        match self {
            Self::Api(ApiError::Validation { field, message }) => Self::Invalid {
                message: format!("{field}: {message}"),
                param: Some(field),
                code: "invalid_value",
            },
            Self::Api(ApiError::BadRequest(message)) => Self::Invalid {
                param: None,
                code: "invalid_request",
                message,
            },
            other => other,
        }
    }
}

impl From<ApiError> for LlmApiError {
    fn from(e: ApiError) -> Self {
        Self::Api(e)
    }
}

impl From<LlmError> for LlmApiError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::UnknownModel(_) => Self::UnknownModel(e.to_string()),
            other => Self::Api(other.into()),
        }
    }
}

impl IntoResponse for LlmApiError {
    fn into_response(self) -> Response {
        match self {
            Self::Api(e) => e.into_response(),
            Self::UnknownModel(message) => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {
                    "code": "model_not_found",
                    "message": message,
                    "type": "invalid_request_error",
                    "param": "model",
                }})),
            )
                .into_response(),
            Self::Invalid {
                param,
                code,
                message,
            } => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": param,
                    "code": code,
                }})),
            )
                .into_response(),
        }
    }
}

/// The HTTP edge of the gateway's errors.
impl From<LlmError> for ApiError {
    fn from(e: LlmError) -> Self {
        match e {
            LlmError::UnknownModel(_) => ApiError::BadRequest(e.to_string()),
            LlmError::Invalid { field, message } => ApiError::Validation { field, message },
            LlmError::ProviderRejected(m) => ApiError::BadRequest(m),
            LlmError::Overloaded(m) => ApiError::Overloaded(m),
            LlmError::RateLimited {
                message,
                retry_after_s,
            } => ApiError::TooManyRequests {
                message,
                retry_after_s,
            },
            LlmError::BudgetExceeded(m) => ApiError::PaymentRequired(m),
            LlmError::AllFailed(m) => ApiError::BadGateway(m),
            LlmError::TooManyFallbacks(m) => ApiError::BadRequest(m),
        }
    }
}

fn org_of(p: &Principal) -> ApiResult<Uuid> {
    match p.scope {
        Scope::Org(o) => Ok(o),
        Scope::Platform => Err(ApiError::Forbidden(
            "the LLM API needs an organisation API key; a platform key belongs to no organisation",
        )),
    }
}

/// Rough token estimate (4 characters per token) for cost-based ordering.
fn estimate_tokens(messages: &Value) -> u64 {
    (messages.to_string().len() as u64 / 4).max(1)
}

fn headers(resp: &mut Response, request_id: Uuid, t: &Target, cache_hit: bool) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id.to_string()) {
        h.insert("x-kip-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&t.label()) {
        h.insert("x-kip-target", v);
    }
    h.insert(
        "x-kip-cache",
        HeaderValue::from_static(if cache_hit { "hit" } else { "miss" }),
    );
}

/// Whether an answer may come from the cache: deterministic requests (temperature 0) unless
/// the client said otherwise, or any request whose client asked for caching explicitly.
fn cacheable(temperature: Option<f64>, opt_in: Option<bool>) -> bool {
    match opt_in {
        Some(v) => v,
        None => temperature == Some(0.0),
    }
}

// ---------- /v1/chat/completions ----------

/// `POST /v1/chat/completions`: OpenAI's chat API, routed through the gateway.
///
/// kip extensions, all optional: header `x-kip-cache: true|false` forces caching on or off;
/// header `x-kip-fallback: provider/model,...` appends fallbacks; header
/// `x-kip-strategy: cost|latency` reorders the chain.
#[expect(
    clippy::too_many_arguments,
    reason = "axum extractors: each substate is asked for on its own (FromRef)"
)]
pub async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    State(limits): State<HttpLimits>,
    State(docs): State<Arc<crate::documents::Documents>>,
    State(pool): State<PgPool>,
    State(health): State<crate::health::HealthConfig>,
    p: Principal,
    hdrs: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, LlmApiError> {
    let tools = |org| Toolbox {
        pool,
        docs,
        health,
        org,
    };
    chat_completions_inner(gw, limits, p, hdrs, body, tools)
        .await
        .map_err(LlmApiError::openai)
}

/// Roles OpenAI's chat API accepts (`function` is its deprecated predecessor of `tool`).
const CHAT_ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A number in `range`, or absent/null; otherwise the OpenAI error naming `param`.
fn check_number(
    obj: &Map<String, Value>,
    param: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<f64>, LlmApiError> {
    match obj.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if v < *range.start() {
                Err(LlmApiError::invalid(
                    param,
                    "decimal_below_min_value",
                    format!("{param} must be at least {}, got {v}", range.start()),
                ))
            } else if v > *range.end() {
                Err(LlmApiError::invalid(
                    param,
                    "decimal_above_max_value",
                    format!("{param} must be at most {}, got {v}", range.end()),
                ))
            } else {
                Ok(Some(v))
            }
        }
        Some(other) => Err(LlmApiError::invalid(
            param,
            "invalid_type",
            format!("{param} must be a number, got {other}"),
        )),
    }
}

/// A positive integer, or absent/null; otherwise the OpenAI error naming `param`.
fn check_count(obj: &Map<String, Value>, param: &str) -> Result<Option<u64>, LlmApiError> {
    match obj.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(LlmApiError::invalid(
                param,
                "invalid_value",
                format!("{param} must be a positive integer, got {v}"),
            )),
        },
    }
}

/// Checks what kip forwards of an OpenAI chat request: the messages (objects with a known
/// role and string/array/null content) and the sampling parameters.
fn validate_chat(obj: &Map<String, Value>) -> Result<(), LlmApiError> {
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => {
            return Err(LlmApiError::invalid(
                "messages",
                "empty_array",
                "messages must be a non-empty array",
            ));
        }
        Some(_) => {
            return Err(LlmApiError::invalid(
                "messages",
                "invalid_type",
                "messages must be an array of message objects",
            ));
        }
        None => {
            return Err(LlmApiError::invalid(
                "messages",
                "missing_required_parameter",
                "messages is required",
            ));
        }
    };
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(LlmApiError::invalid(
                format!("messages[{i}]"),
                "invalid_type",
                format!("messages[{i}] must be an object"),
            ));
        };
        match m.get("role") {
            Some(Value::String(r)) if CHAT_ROLES.contains(&r.as_str()) => {}
            Some(r) => {
                return Err(LlmApiError::invalid(
                    format!("messages[{i}].role"),
                    "invalid_value",
                    format!(
                        "messages[{i}].role is {r}; expected one of {}",
                        CHAT_ROLES.join(", ")
                    ),
                ));
            }
            None => {
                return Err(LlmApiError::invalid(
                    format!("messages[{i}].role"),
                    "missing_required_parameter",
                    format!("messages[{i}].role is required"),
                ));
            }
        }
        if let Some(c) = m.get("content")
            && !matches!(c, Value::String(_) | Value::Array(_) | Value::Null)
        {
            return Err(LlmApiError::invalid(
                format!("messages[{i}].content"),
                "invalid_type",
                format!("messages[{i}].content must be a string or an array of content parts"),
            ));
        }
    }
    check_number(obj, "temperature", 0.0..=2.0)?;
    check_number(obj, "top_p", 0.0..=1.0)?;
    check_number(obj, "presence_penalty", -2.0..=2.0)?;
    check_number(obj, "frequency_penalty", -2.0..=2.0)?;
    check_count(obj, "max_tokens")?;
    check_count(obj, "max_completion_tokens")?;
    check_count(obj, "n")?;
    match obj.get("stream") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(_) => {
            return Err(LlmApiError::invalid(
                "stream",
                "invalid_type",
                "stream must be a boolean",
            ));
        }
    }
    match obj.get("model") {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(_) => Err(LlmApiError::invalid(
            "model",
            "invalid_type",
            "model must be a string",
        )),
    }
}

async fn chat_completions_inner(
    gw: Arc<Gateway>,
    limits: HttpLimits,
    p: Principal,
    hdrs: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    tools: impl FnOnce(Uuid) -> Toolbox,
) -> Result<Response, LlmApiError> {
    let org_id = org_of(&p)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit_bytes: limits.body_limit_bytes,
            }
        } else {
            ApiError::BadRequest(r.body_text())
        }
    })?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| LlmApiError::Invalid {
        param: None,
        code: "invalid_json",
        message: format!("malformed JSON: {e}"),
    })?;
    let Value::Object(mut obj) = v else {
        return Err(LlmApiError::Invalid {
            param: None,
            code: "invalid_type",
            message: "the body must be a JSON object".into(),
        });
    };
    validate_chat(&obj)?;
    let messages = obj.get("messages").cloned().unwrap_or(Value::Null);
    let model = match obj.remove("model") {
        Some(Value::String(m)) => Some(m),
        _ => None,
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => false, // rejected by validate_chat
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let hdr = |n: &str| hdrs.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if model.as_deref() == Some(gw.config().orchestrator.alias.as_str()) {
        // `x-kip-hybrid-strategy`: the chat body is OpenAI's; kip's choices go in headers.
        let strategy = match hdr("x-kip-hybrid-strategy") {
            None => None,
            Some(v) => Some(HybridStrategy::parse(v).ok_or_else(|| {
                LlmApiError::invalid(
                    "x-kip-hybrid-strategy",
                    "invalid_value",
                    "x-kip-hybrid-strategy must be \"best_of_n\" or \"mixture_of_n\"",
                )
            })?),
        };
        return hybrid_chat(&gw, tools(org_id), obj, stream, include_usage, strategy).await;
    }
    let temperature = obj.get("temperature").and_then(Value::as_f64);
    let opt_in = match hdr("x-kip-cache") {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    };
    let fallback: Vec<String> = hdr("x-kip-fallback")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let strategy = match hdr("x-kip-strategy") {
        None => None,
        Some("cost") => Some(Strategy::Cost),
        Some("latency") => Some(Strategy::Latency),
        Some(_) => {
            return Err(LlmApiError::invalid(
                "x-kip-strategy",
                "invalid_value",
                "x-kip-strategy must be \"cost\" or \"latency\"",
            ));
        }
    };
    let max_out = obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(512);
    let targets = match gw.resolve(
        model.as_deref(),
        None,
        &fallback,
        strategy,
        (estimate_tokens(&messages), max_out),
    ) {
        Ok(t) => t,
        Err(e) => return Err(LlmApiError::from(e)),
    };
    let request_id = Uuid::new_v4();
    let in_flight = gw.admit(org_id, request_id).await?;
    if stream {
        let call = Call {
            org_id,
            request_id,
            targets,
            body: obj,
            cache_key: None,
        };
        let (target, sse) = gw.stream(call, include_usage).await?;
        let mut resp = Response::new(Body::from_stream(sse.hold(in_flight).into_stream()));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        headers(&mut resp, request_id, &target, false);
        return Ok(resp);
    }
    let cache_key = (gw.cache.enabled() && cacheable(temperature, opt_in)).then(|| {
        let mut keyed = obj.clone();
        keyed.insert(
            "kip_targets".into(),
            Value::Array(targets.iter().map(|t| Value::String(t.label())).collect()),
        );
        cache::key(org_id, &Value::Object(keyed))
    });
    let call = Call {
        org_id,
        request_id,
        targets,
        body: obj,
        cache_key,
    };
    let a = gw.complete(&call).await?;
    let mut resp = axum::Json(a.completion.body).into_response();
    headers(&mut resp, request_id, &a.target, a.cache_hit);
    Ok(resp)
}

// ---------- /v1/query ----------

/// Message roles of `/v1/query`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
}

/// One message of `/v1/query`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMessage {
    pub role: Role,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
}

/// Routing and generation options of `/v1/query`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryOptions {
    /// Restrict the first choice to this provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// Targets (`provider/model` or aliases) tried after the configured chain.
    #[serde(default)]
    pub fallback: Vec<String>,
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Force the response cache on or off (default: on for temperature 0).
    #[serde(default)]
    pub cache: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// OpenAI-format tool definitions, passed through.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
}

/// Body of `POST /v1/query`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// A task configured under `[llm.tasks]` (e.g. `machine_status`); excludes `model`.
    #[serde(default)]
    pub task: Option<String>,
    /// `provider/model`, an alias, or a model name listed by one provider.
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<QueryMessage>,
    #[serde(default)]
    pub options: QueryOptions,
    /// `grounded`: answer from the organisation's documents, readings and predictions, with
    /// citations (see [`crate::documents::grounded`]). Default `direct`.
    #[serde(default)]
    pub mode: QueryMode,
    /// `hybrid` mode: `best_of_n` or `mixture_of_n` (default `llm.orchestrator.strategy`).
    #[serde(default)]
    pub hybrid_strategy: Option<crate::llm::orchestrator::config::Strategy>,
}

/// How `/v1/query` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// The messages go to the model as they are.
    #[default]
    Direct,
    /// The tools run first; the model answers from their results, citing them; without a
    /// reachable model the answer is assembled from the results (labelled fallback).
    Grounded,
    /// The hybrid orchestrator ([`crate::llm::orchestrator::hybrid`]): context gathered
    /// concurrently, the candidate models in tool loops, best-of-n with a judge, and the
    /// deterministic fallback.
    Hybrid,
}

#[derive(Debug, Serialize)]
pub struct QueryUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_tokens: u64,
}

/// Answer of `POST /v1/query`.
#[derive(Debug, Serialize)]
pub struct QueryResponse {
    pub request_id: Uuid,
    pub provider: String,
    pub model: String,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    pub finish_reason: Option<String>,
    pub usage: QueryUsage,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub cache_hit: bool,
    /// True when the answer did not come from the first target of the chain.
    pub fallback_used: bool,
    pub attempts: Vec<super::Attempt>,
    /// Sources and citations of a `grounded` or `hybrid` answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grounding: Option<crate::documents::grounded::Grounding>,
    /// How a `hybrid` answer was made: the candidates and the judge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub orchestration: Option<Orchestration>,
}

/// The candidates and the judge of a `hybrid` answer.
#[derive(Debug, Serialize)]
pub struct Orchestration {
    pub strategy: crate::llm::orchestrator::config::Strategy,
    pub candidates: Vec<crate::llm::orchestrator::hybrid::CandidateReport>,
    pub judge: Option<crate::llm::orchestrator::hybrid::JudgeReport>,
    pub fuser: Option<crate::llm::orchestrator::hybrid::FuserReport>,
}

/// `POST /v1/query`: kip's own LLM API.
pub async fn query(
    State(gw): State<Arc<Gateway>>,
    State(docs): State<Arc<crate::documents::Documents>>,
    State(pool): State<PgPool>,
    State(health): State<crate::health::HealthConfig>,
    p: Principal,
    ApiJson(mut req): ApiJson<QueryRequest>,
) -> Result<Response, ApiError> {
    let org_id = org_of(&p)?;
    if req.messages.is_empty() {
        return Err(ApiError::validation("messages", "must not be empty"));
    }
    if let Some(t) = req.options.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::validation(
            "options.temperature",
            "must be between 0 and 2",
        ));
    }
    let model =
        match (&req.task, &req.model) {
            (Some(_), Some(_)) => {
                return Err(ApiError::validation(
                    "task",
                    "give either task or model, not both",
                ));
            }
            (Some(task), None) => {
                Some(gw.config().tasks.get(task).cloned().ok_or_else(|| {
                    ApiError::validation("task", format!("unknown task {task:?}"))
                })?)
            }
            (None, m) => m.clone(),
        };
    let request_id = Uuid::new_v4();
    // Grounded and hybrid modes do work before any model is called (embedding, retrieval,
    // queries), so the organisation's limits apply first: admitted here, like any LLM call.
    let mut in_flight = None;
    if req.mode == QueryMode::Hybrid {
        let question = question_of(&req.messages, "hybrid")?;
        let _in_flight = gw.admit(org_id, request_id).await?;
        let toolbox = Toolbox {
            pool,
            docs,
            health,
            org: org_id,
        };
        return hybrid_query(&gw, &toolbox, request_id, req, model, question).await;
    }
    // Grounded mode: the tools run before the model is called; their results go in as a
    // system message with markers, so the cache key covers them (a deleted passage changes
    // the key) and the answer can cite them.
    let grounding_ctx = match req.mode {
        QueryMode::Direct | QueryMode::Hybrid => None,
        QueryMode::Grounded => {
            let question = question_of(&req.messages, "grounded")?;
            in_flight = Some(gw.admit(org_id, request_id).await?);
            let ctx = crate::documents::grounded::gather(&docs, &pool, org_id, &question).await?;
            req.messages.insert(
                0,
                QueryMessage {
                    role: Role::System,
                    content: Some(ctx.system_prompt()),
                    name: None,
                    tool_call_id: None,
                    tool_calls: None,
                },
            );
            // No model configured at all: nothing to call, answer from the sources.
            if model.is_none()
                && req.options.provider.is_none()
                && gw.config().default_model.is_none()
            {
                gw.record_fallback(org_id, request_id, "grounded-fallback", Duration::ZERO);
                return Ok(grounded_fallback(&ctx, Vec::new(), request_id));
            }
            Some(ctx)
        }
    };
    let messages = serde_json::to_value(&req.messages).map_err(ApiError::internal)?;
    let est = (
        estimate_tokens(&messages),
        u64::from(req.options.max_tokens.unwrap_or(512)),
    );
    let targets = match gw.resolve(
        model.as_deref(),
        req.options.provider.as_deref(),
        &req.options.fallback,
        req.options.strategy,
        est,
    ) {
        Ok(t) => t,
        Err(e) => return Ok(LlmApiError::from(e).into_response()),
    };
    let _in_flight = match in_flight {
        Some(p) => p,
        None => gw.admit(org_id, request_id).await?,
    };
    let mut body = Map::new();
    body.insert("messages".into(), messages);
    if let Some(m) = req.options.max_tokens {
        body.insert("max_completion_tokens".into(), json!(m));
    }
    if let Some(t) = req.options.temperature {
        body.insert("temperature".into(), json!(t));
    }
    if let Some(tools) = &req.options.tools {
        body.insert("tools".into(), Value::Array(tools.clone()));
    }
    let cache_key = (gw.cache.enabled() && cacheable(req.options.temperature, req.options.cache))
        .then(|| {
            let mut keyed = body.clone();
            keyed.insert(
                "kip_targets".into(),
                Value::Array(targets.iter().map(|t| Value::String(t.label())).collect()),
            );
            cache::key(org_id, &Value::Object(keyed))
        });
    let first = targets.first().cloned();
    let call = Call {
        org_id,
        request_id,
        targets,
        body,
        cache_key,
    };
    let a: Answer = match (gw.complete(&call).await, &grounding_ctx) {
        (Ok(a), Some(ctx)) if a.local => {
            return Ok(grounded_fallback(ctx, a.attempts, request_id));
        }
        (Err(super::LlmError::AllFailed(m)), Some(ctx)) => {
            tracing::warn!(%org_id, error = %m, "no model reachable: grounded fallback answer");
            gw.record_fallback(org_id, request_id, "grounded-fallback", Duration::ZERO);
            return Ok(grounded_fallback(ctx, Vec::new(), request_id));
        }
        (r, _) => r?,
    };
    let msg = a
        .completion
        .body
        .pointer("/choices/0/message")
        .cloned()
        .unwrap_or(Value::Null);
    let text = |k: &str| msg.get(k).and_then(Value::as_str).map(str::to_owned);
    let out = QueryResponse {
        request_id,
        fallback_used: !a.cache_hit && first.as_ref() != Some(&a.target),
        provider: a.target.provider.clone(),
        model: a.target.model.clone(),
        content: text("content"),
        reasoning_content: text("reasoning_content"),
        tool_calls: msg.get("tool_calls").filter(|v| !v.is_null()).cloned(),
        finish_reason: a
            .completion
            .body
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        usage: QueryUsage {
            input_tokens: a.completion.usage.input,
            output_tokens: a.completion.usage.output,
            cached_tokens: a.completion.usage.cached,
        },
        cost_usd: a.cost_usd,
        latency_ms: a.latency_ms,
        cache_hit: a.cache_hit,
        attempts: a.attempts,
        grounding: grounding_ctx
            .as_ref()
            .map(|ctx| ctx.grounding(text("content").as_deref().unwrap_or_default(), "llm")),
        orchestration: None,
    };
    let mut resp = axum::Json(out).into_response();
    headers(&mut resp, request_id, &a.target, a.cache_hit);
    Ok(resp)
}

/// The answer of grounded mode when no model is reachable: assembled from the tools' results,
/// labelled `fallback`, citing every source it uses.
fn grounded_fallback(
    ctx: &crate::documents::grounded::Context,
    attempts: Vec<super::Attempt>,
    request_id: Uuid,
) -> Response {
    let content = ctx.fallback_answer();
    let out = QueryResponse {
        request_id,
        provider: super::LOCAL_PROVIDER.to_owned(),
        model: "grounded-fallback".to_owned(),
        grounding: Some(ctx.grounding(&content, "fallback")),
        content: Some(content),
        reasoning_content: None,
        tool_calls: None,
        finish_reason: Some("stop".to_owned()),
        usage: QueryUsage {
            input_tokens: 0,
            output_tokens: 0,
            cached_tokens: 0,
        },
        cost_usd: 0.0,
        latency_ms: 0.0,
        cache_hit: false,
        fallback_used: true,
        attempts,
        orchestration: None,
    };
    let mut resp = axum::Json(out).into_response();
    headers(
        &mut resp,
        request_id,
        &Target::new(super::LOCAL_PROVIDER, "grounded-fallback"),
        false,
    );
    resp
}

/// The last user message with content: the question of grounded and hybrid modes.
fn question_of(messages: &[QueryMessage], mode: &str) -> ApiResult<String> {
    let question = messages
        .iter()
        .rev()
        .find(|m| matches!(m.role, Role::User))
        .and_then(|m| m.content.clone())
        .ok_or_else(|| {
            ApiError::validation(
                "messages",
                format!("{mode} mode needs a user message with content"),
            )
        })?;
    if question.len() > 8000 || question.contains('\0') {
        return Err(ApiError::validation(
            "messages",
            "the question must be at most 8000 bytes, without NUL",
        ));
    }
    Ok(question)
}

/// `/v1/query` in `hybrid` mode (admitted by the caller).
async fn hybrid_query(
    gw: &Arc<Gateway>,
    toolbox: &Toolbox,
    request_id: Uuid,
    req: QueryRequest,
    model: Option<String>,
    question: String,
) -> Result<Response, ApiError> {
    let mut base = Map::new();
    if let Some(m) = req.options.max_tokens {
        base.insert("max_completion_tokens".into(), json!(m));
    }
    if let Some(t) = req.options.temperature {
        base.insert("temperature".into(), json!(t));
    }
    let messages = req
        .messages
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    let a = hybrid::answer(
        gw,
        toolbox,
        request_id,
        HybridRequest {
            question,
            messages,
            model,
            base,
            strategy: req.hybrid_strategy,
        },
    )
    .await?;
    let target = Target {
        provider: a.provider.clone(),
        model: a.model.clone(),
    };
    let out = QueryResponse {
        request_id,
        provider: a.provider,
        model: a.model,
        content: Some(a.content),
        reasoning_content: None,
        tool_calls: None,
        finish_reason: Some("stop".into()),
        usage: QueryUsage {
            input_tokens: a.usage.input,
            output_tokens: a.usage.output,
            cached_tokens: a.usage.cached,
        },
        cost_usd: a.cost_usd,
        latency_ms: a.latency_ms,
        cache_hit: false,
        fallback_used: a.grounding.mode == "fallback",
        attempts: Vec::new(),
        grounding: Some(a.grounding),
        orchestration: Some(Orchestration {
            strategy: a.strategy,
            candidates: a.candidates,
            judge: a.judge,
            fuser: a.fuser,
        }),
    };
    let mut resp = axum::Json(out).into_response();
    headers(&mut resp, request_id, &target, false);
    Ok(resp)
}

/// `/v1/chat/completions` with the orchestrator's alias: the hybrid answer as an OpenAI
/// `chat.completion` (or its stream), with kip's citations under `kip_grounding`.
async fn hybrid_chat(
    gw: &Arc<Gateway>,
    toolbox: Toolbox,
    obj: Map<String, Value>,
    stream: bool,
    include_usage: bool,
    strategy: Option<HybridStrategy>,
) -> Result<Response, LlmApiError> {
    let alias = gw.config().orchestrator.alias.clone();
    let messages: Vec<Value> = obj
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let question = messages
        .iter()
        .rev()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .find_map(|m| match m.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            // Content parts: the text parts joined.
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            _ => None,
        })
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| {
            LlmApiError::invalid(
                "messages",
                "invalid_value",
                format!("the model {alias} needs a user message with text content"),
            )
        })?;
    if question.len() > 8000 || question.contains('\0') {
        return Err(LlmApiError::invalid(
            "messages",
            "invalid_value",
            "the question must be at most 8000 bytes, without NUL",
        ));
    }
    let mut base = Map::new();
    for k in [
        "temperature",
        "max_tokens",
        "max_completion_tokens",
        "top_p",
    ] {
        if let Some(v) = obj.get(k) {
            base.insert(k.into(), v.clone());
        }
    }
    let request_id = Uuid::new_v4();
    let _in_flight = gw.admit(toolbox.org, request_id).await?;
    let a = hybrid::answer(
        gw,
        &toolbox,
        request_id,
        HybridRequest {
            question,
            messages,
            model: None,
            base,
            strategy,
        },
    )
    .await?;
    let target = Target {
        provider: a.provider.clone(),
        model: a.model.clone(),
    };
    let body = chat_completion_of(&alias, &a);
    let mut resp = if stream {
        let events = chat_chunks_of(&alias, &a, include_usage);
        let mut r = Response::new(Body::from(events));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    } else {
        axum::Json(body).into_response()
    };
    headers(&mut resp, request_id, &target, false);
    Ok(resp)
}

fn usage_json(a: &HybridAnswer) -> Value {
    json!({"prompt_tokens": a.usage.input, "completion_tokens": a.usage.output,
           "total_tokens": a.usage.input + a.usage.output,
           "prompt_tokens_details": {"cached_tokens": a.usage.cached}})
}

fn kip_grounding(a: &HybridAnswer) -> Value {
    json!({"mode": a.grounding.mode, "grounded": a.grounding.grounded,
           "citations": a.grounding.citations, "tool_calls": a.grounding.tool_calls,
           "answered_by": format!("{}/{}", a.provider, a.model),
           "candidates": a.candidates, "judge": a.judge, "strategy": a.strategy,
           "fuser": a.fuser})
}

/// The hybrid answer as an OpenAI `chat.completion`.
fn chat_completion_of(alias: &str, a: &HybridAnswer) -> Value {
    json!({
        "id": format!("chatcmpl-{}", a.request_id.simple()), "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(), "model": alias,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": a.content,
                     "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage_json(a),
        "kip_grounding": kip_grounding(a),
    })
}

/// The hybrid answer as OpenAI `chat.completion.chunk` events (the answer is complete before
/// the first byte: the judge needs every candidate), then `data: [DONE]`.
fn chat_chunks_of(alias: &str, a: &HybridAnswer, include_usage: bool) -> String {
    let id = format!("chatcmpl-{}", a.request_id.simple());
    let created = chrono::Utc::now().timestamp();
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": alias,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let mut events = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": a.content}), Value::Null),
    ];
    let mut last = chunk(json!({}), json!("stop"));
    last["kip_grounding"] = kip_grounding(a);
    events.push(last);
    if include_usage {
        events.push(
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                           "model": alias, "choices": [], "usage": usage_json(a)}),
        );
    }
    let mut out = String::new();
    for e in events {
        out.push_str(&format!("data: {e}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}
