//! Providers: the [`Provider`] contract and its implementations.
//!
//! - [`HttpProvider`]: any OpenAI-compatible `/chat/completions` server (OpenAI GPT-5,
//!   DeepSeek, self-hosted vLLM/llama.cpp/Ollama...). The request body is the client's own
//!   body with only `model`, `stream` and `stream_options` set, and responses are passed on
//!   as received, so fields kip does not know (tools, `reasoning_content`, logprobs...) survive
//!   both ways: there is no translation layer to get wrong.
//! - [`AlephProvider`] (in `aleph.rs`): answers about the organisation's machines from the
//!   agents' live values over MQTT and from the latest synced `sensor_data` rows.
//! - [`local_fallback`]: needs no network and labels its answer as such.
//!
//! Invariants: every failure is a typed [`ProviderError`] whose message never contains the API
//! key; usage is normalised (DeepSeek's `prompt_cache_hit_tokens` also appears as OpenAI's
//! `prompt_tokens_details.cached_tokens`).

use std::{collections::VecDeque, pin::Pin, time::Duration};

use axum::body::Bytes;
use futures_util::{Stream, StreamExt as _};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub use super::aleph::AlephProvider;
use super::{
    config::{ProviderConfig, ProviderKind, Secret},
    metrics::LlmMetrics,
};

/// The model name of the built-in fallback's answers.
pub const LOCAL_MODEL: &str = "kip-local-fallback";
/// The prefix of every answer of the built-in fallback.
pub const LOCAL_PREFIX: &str = "[kip local fallback: no provider reachable]";

/// Why a provider call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// 429: retry after the given delay if the provider said so.
    #[error("rate limited by the provider (429)")]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx or an error event in a stream.
    #[error("provider server error ({status}): {message}")]
    Server { status: u16, message: String },
    /// No answer (or no next stream event) within the provider's timeout.
    #[error("provider timed out")]
    Timeout,
    /// The answer is not the JSON the protocol promises.
    #[error("malformed provider response: {0}")]
    Malformed(String),
    /// Connection refused, reset, or dropped before the answer was complete.
    #[error("connection to provider failed: {0}")]
    Connection(String),
    /// 4xx other than 429: the request itself was refused; another provider would refuse too.
    #[error("provider rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
}

impl ProviderError {
    /// Short stable label for logs, metrics and `inference_logs.status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limited",
            Self::Server { .. } => "server_error",
            Self::Timeout => "timeout",
            Self::Malformed(_) => "malformed",
            Self::Connection(_) => "connection",
            Self::Rejected { .. } => "rejected",
        }
    }

    /// Whether the same provider may succeed when asked again.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Timeout | Self::Connection(_)
        )
    }
}

/// Token counts of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

impl Usage {
    /// Reads OpenAI's and DeepSeek's usage objects.
    pub fn from_json(u: &Value) -> Option<Self> {
        let o = u.as_object()?;
        let n = |v: Option<&Value>| v.and_then(Value::as_u64);
        Some(Self {
            input: n(o.get("prompt_tokens")).unwrap_or(0),
            output: n(o.get("completion_tokens")).unwrap_or(0),
            cached: n(u.pointer("/prompt_tokens_details/cached_tokens"))
                .or_else(|| n(o.get("prompt_cache_hit_tokens")))
                .unwrap_or(0),
        })
    }
}

/// Adds `prompt_tokens_details.cached_tokens` when only DeepSeek's field is present, so OpenAI
/// clients see cached tokens where they look for them.
fn normalise_usage(v: &mut Value) {
    let Some(u) = v.get_mut("usage").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(hit) = u.get("prompt_cache_hit_tokens").and_then(Value::as_u64) else {
        return;
    };
    let details = u
        .entry("prompt_tokens_details")
        .or_insert_with(|| json!({}));
    if let Some(d) = details.as_object_mut() {
        d.entry("cached_tokens").or_insert_with(|| json!(hit));
    }
}

/// A complete (non-streaming) answer: an OpenAI `chat.completion` object.
#[derive(Debug, Clone)]
pub struct Completion {
    pub body: Value,
    pub usage: Usage,
}

/// One event of a stream: an OpenAI `chat.completion.chunk` object and its JSON text.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The text sent on to the client (the provider's own bytes unless normalised).
    pub data: Bytes,
    pub value: Value,
}

impl Chunk {
    fn from_value(value: Value) -> Self {
        Self {
            data: Bytes::from(value.to_string()),
            value,
        }
    }
    /// Usage carried by this chunk (the last one, with `include_usage`).
    pub fn usage(&self) -> Option<Usage> {
        self.value.get("usage").and_then(Usage::from_json)
    }
}

/// A stream of chunks; ends after the provider's `[DONE]`.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, ProviderError>> + Send>>;

/// What a provider call may read besides the request.
#[derive(Debug, Clone, Copy)]
pub struct CallCtx<'a> {
    pub org_id: Uuid,
    pub pool: &'a PgPool,
}

/// The contract every provider keeps.
pub trait Provider: Send + Sync {
    /// A non-streaming call; `body` is an OpenAI chat request (its `model` is replaced).
    fn complete(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> impl Future<Output = Result<Completion, ProviderError>> + Send;

    /// A streaming call; resolves when the provider accepted the request (status known).
    fn stream(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> impl Future<Output = Result<ChunkStream, ProviderError>> + Send;
}

/// Enum dispatch over the provider implementations (no boxing per call).
#[derive(Debug)]
pub enum AnyProvider {
    Http(HttpProvider),
    Aleph(AlephProvider),
}

impl AnyProvider {
    /// Builds the provider described by `cfg`.
    pub fn build(
        cfg: &ProviderConfig,
        metrics: &LlmMetrics,
    ) -> Result<Self, crate::outbound::ClientError> {
        Ok(match cfg.kind {
            ProviderKind::Aleph => Self::Aleph(AlephProvider::new(cfg, metrics)),
            ProviderKind::OpenaiCompatible | ProviderKind::Deepseek => {
                Self::Http(HttpProvider::new(cfg)?)
            }
        })
    }

    /// Whether answers may be stored in the response cache: not Aleph's, which describe
    /// machines at one moment (a cached answer would present old values as live).
    pub fn cacheable(&self) -> bool {
        !matches!(self, Self::Aleph(_))
    }

    /// First-byte timeout for streams.
    pub fn first_byte_timeout(&self) -> Duration {
        match self {
            Self::Http(h) => h.first_byte_timeout,
            Self::Aleph(_) => Duration::from_secs(30),
        }
    }

    pub async fn complete(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<Completion, ProviderError> {
        match self {
            Self::Http(p) => p.complete(ctx, model, body).await,
            Self::Aleph(p) => p.complete(ctx, model, body).await,
        }
    }

    pub async fn stream(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<ChunkStream, ProviderError> {
        match self {
            Self::Http(p) => p.stream(ctx, model, body).await,
            Self::Aleph(p) => p.stream(ctx, model, body).await,
        }
    }
}

/// An OpenAI-compatible HTTP provider.
#[derive(Debug)]
pub struct HttpProvider {
    client: reqwest::Client,
    url: String,
    api_key: Option<Secret>,
    request_timeout: Duration,
    first_byte_timeout: Duration,
    stream_idle_timeout: Duration,
    stream_usage: bool,
}

impl HttpProvider {
    /// One HTTP client (connection pool) per provider, with the provider's own timeouts.
    pub fn new(cfg: &ProviderConfig) -> Result<Self, crate::outbound::ClientError> {
        let client = crate::outbound::client_builder()?
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            client,
            url: format!("{}/chat/completions", cfg.base_url),
            api_key: cfg.api_key.clone(),
            request_timeout: cfg.request_timeout,
            first_byte_timeout: cfg.first_byte_timeout,
            stream_idle_timeout: cfg.stream_idle_timeout,
            stream_usage: cfg.stream_usage,
        })
    }

    fn request(&self, body: &Map<String, Value>) -> reqwest::RequestBuilder {
        let req = self.client.post(&self.url).json(body);
        match &self.api_key {
            // reqwest marks the header sensitive, so it is redacted from its own Debug output.
            Some(k) => req.bearer_auth(k.expose()),
            None => req,
        }
    }
}

fn map_reqwest(e: &reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout
    } else if e.is_connect() {
        ProviderError::Connection("cannot connect".into())
    } else if e.is_body() || e.is_decode() {
        ProviderError::Connection("connection dropped while reading the answer".into())
    } else {
        // The full text (with the provider URL) goes to the log, not to clients.
        tracing::debug!(error = %e, "provider request failed");
        ProviderError::Connection("request failed".into())
    }
}

/// The provider's error message (`error.message`), truncated; the body otherwise.
fn error_message(body: &[u8]) -> String {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let mut msg = msg.trim().to_owned();
    if msg.len() > 500 {
        let mut end = 500;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    msg
}

/// `Retry-After` as seconds or an HTTP date; `retry-after-ms` (OpenAI) wins when present.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let d = at.signed_duration_since(chrono::Utc::now());
    Some(d.to_std().unwrap_or(Duration::ZERO))
}

async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, ProviderError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let after = retry_after(resp.headers());
    let body = resp.bytes().await.unwrap_or_default();
    let code = status.as_u16();
    Err(match code {
        429 => ProviderError::RateLimited { retry_after: after },
        500..=599 => ProviderError::Server {
            status: code,
            message: error_message(&body),
        },
        // 408 is a timeout on the provider's side: worth retrying.
        408 => ProviderError::Timeout,
        _ => ProviderError::Rejected {
            status: code,
            message: error_message(&body),
        },
    })
}

fn with_model(body: &Map<String, Value>, model: &str, stream: bool) -> Map<String, Value> {
    let mut b = body.clone();
    b.insert("model".into(), Value::String(model.to_owned()));
    if stream {
        b.insert("stream".into(), Value::Bool(true));
    } else {
        b.remove("stream");
        b.remove("stream_options");
    }
    b
}

/// Checks that a completion has the shape clients rely on.
fn check_completion(mut v: Value) -> Result<Completion, ProviderError> {
    if !v.get("choices").is_some_and(Value::is_array) {
        return Err(ProviderError::Malformed(
            "the answer has no \"choices\" array".into(),
        ));
    }
    normalise_usage(&mut v);
    let usage = v
        .get("usage")
        .and_then(Usage::from_json)
        .unwrap_or_default();
    Ok(Completion { body: v, usage })
}

impl Provider for HttpProvider {
    async fn complete(
        &self,
        _ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<Completion, ProviderError> {
        let b = with_model(body, model, false);
        let call = async {
            let resp = self.request(&b).send().await.map_err(|e| map_reqwest(&e))?;
            let resp = check_status(resp).await?;
            let bytes = resp.bytes().await.map_err(|e| map_reqwest(&e))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Malformed(format!("invalid JSON: {e}")))?;
            check_completion(v)
        };
        tokio::time::timeout(self.request_timeout, call)
            .await
            .unwrap_or(Err(ProviderError::Timeout))
    }

    async fn stream(
        &self,
        _ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<ChunkStream, ProviderError> {
        let mut b = with_model(body, model, true);
        if self.stream_usage {
            let opts = b.entry("stream_options").or_insert_with(|| json!({}));
            if let Some(o) = opts.as_object_mut() {
                o.insert("include_usage".into(), Value::Bool(true));
            }
        }
        let resp = tokio::time::timeout(self.first_byte_timeout, self.request(&b).send())
            .await
            .map_err(|_| ProviderError::Timeout)?
            .map_err(|e| map_reqwest(&e))?;
        let resp = check_status(resp).await?;
        Ok(sse_chunks(
            resp.bytes_stream().boxed(),
            self.stream_idle_timeout,
        ))
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

struct SseState {
    bytes: ByteStream,
    buf: Vec<u8>,
    ready: VecDeque<Result<Chunk, ProviderError>>,
    idle: Duration,
    saw_finish: bool,
    done: bool,
}

/// Finds the end of the next SSE event (`\n\n` or `\r\n\r\n`): (event end, separator length).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

impl SseState {
    /// Parses complete events from `buf`; returns false after `[DONE]`.
    fn parse_events(&mut self) {
        while let Some((end, sep)) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let mut data = String::new();
            for line in text.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if data.is_empty() {
                continue; // comments (": keep-alive") and other fields
            }
            if data.trim() == "[DONE]" {
                self.done = true;
                return;
            }
            let item = match serde_json::from_str::<Value>(&data) {
                Ok(v) if v.get("error").is_some() => {
                    self.done = true;
                    Err(ProviderError::Server {
                        status: 200,
                        message: error_message(data.as_bytes()),
                    })
                }
                Ok(mut v) => {
                    if v.pointer("/choices/0/finish_reason")
                        .is_some_and(|f| !f.is_null())
                    {
                        self.saw_finish = true;
                    }
                    if v.get("usage")
                        .is_some_and(|u| u.get("prompt_cache_hit_tokens").is_some())
                    {
                        normalise_usage(&mut v);
                        Ok(Chunk::from_value(v))
                    } else {
                        Ok(Chunk {
                            data: Bytes::from(data),
                            value: v,
                        })
                    }
                }
                Err(e) => {
                    self.done = true;
                    Err(ProviderError::Malformed(format!(
                        "invalid JSON in stream: {e}"
                    )))
                }
            };
            self.ready.push_back(item);
            if self.done {
                return;
            }
        }
    }
}

/// Turns an SSE byte stream into chunks, event by event as bytes arrive (nothing buffered
/// beyond one incomplete event).
fn sse_chunks(bytes: ByteStream, idle: Duration) -> ChunkStream {
    let st = SseState {
        bytes,
        buf: Vec::new(),
        ready: VecDeque::new(),
        idle,
        saw_finish: false,
        done: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(item) = st.ready.pop_front() {
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            match tokio::time::timeout(st.idle, st.bytes.next()).await {
                Err(_) => {
                    st.done = true;
                    return Some((Err(ProviderError::Timeout), st));
                }
                Ok(Some(Ok(b))) => {
                    st.buf.extend_from_slice(&b);
                    st.parse_events();
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    return Some((Err(map_reqwest(&e)), st));
                }
                Ok(None) => {
                    st.done = true;
                    // A stream that ends after its finish_reason without [DONE] is complete
                    // (some servers omit it); one that ends before was cut off.
                    if !st.saw_finish {
                        return Some((
                            Err(ProviderError::Connection(
                                "stream ended before the answer was complete".into(),
                            )),
                            st,
                        ));
                    }
                    return None;
                }
            }
        }
    })
    .boxed()
}

/// Builds a `chat.completion` object carrying `content`.
pub fn completion_json(model: &str, content: &str, usage: Usage) -> Value {
    json!({
        "id": format!("chatcmpl-kip-{}", Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": usage.input,
            "completion_tokens": usage.output,
            "total_tokens": usage.input + usage.output
        }
    })
}

/// Splits a complete answer into the chunks a streaming client expects.
pub fn completion_to_chunks(c: &Completion) -> Vec<Chunk> {
    let id = c.body.get("id").cloned().unwrap_or(Value::Null);
    let model = c.body.get("model").cloned().unwrap_or(Value::Null);
    let created = c.body.get("created").cloned().unwrap_or(Value::Null);
    let content = c
        .body
        .pointer("/choices/0/message/content")
        .cloned()
        .unwrap_or(Value::Null);
    let chunk = |delta: Value, finish: Value| {
        Chunk::from_value(json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }]
        }))
    };
    let mut usage = Chunk::from_value(json!({
        "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [], "usage": c.body.get("usage").cloned().unwrap_or(Value::Null)
    }));
    usage.value["usage"] = c.body.get("usage").cloned().unwrap_or(Value::Null);
    vec![
        chunk(
            json!({ "role": "assistant", "content": content }),
            Value::Null,
        ),
        chunk(json!({}), json!("stop")),
        usage,
    ]
}

pub(crate) fn single_stream(c: &Completion) -> ChunkStream {
    futures_util::stream::iter(completion_to_chunks(c).into_iter().map(Ok)).boxed()
}

/// The answer of the built-in fallback; `note` says what was tried.
pub fn local_fallback(note: &str) -> Completion {
    let content = format!(
        "{LOCAL_PREFIX} No configured language-model provider could answer this request \
         ({note}). Please retry later; this text was generated by kip itself, not by a model."
    );
    Completion {
        body: completion_json(LOCAL_MODEL, &content, Usage::default()),
        usage: Usage::default(),
    }
}

/// The built-in fallback as a stream.
pub fn local_fallback_stream(note: &str) -> ChunkStream {
    single_stream(&local_fallback(note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepseek_cache_hits_become_cached_tokens() {
        let mut v = json!({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_cache_hit_tokens": 80, "prompt_cache_miss_tokens": 20}});
        normalise_usage(&mut v);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 80);
        let u = Usage::from_json(&v["usage"]).unwrap();
        assert_eq!(
            u,
            Usage {
                input: 100,
                output: 5,
                cached: 80
            }
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }

    #[test]
    fn sse_events_split_on_blank_lines_and_skip_comments() {
        let mut st = SseState {
            bytes: futures_util::stream::empty().boxed(),
            buf: b": ping\n\ndata: {\"a\":1}\r\n\r\ndata: {\"b\"".to_vec(),
            ready: VecDeque::new(),
            idle: Duration::from_secs(1),
            saw_finish: false,
            done: false,
        };
        st.parse_events();
        assert_eq!(st.ready.len(), 1);
        st.buf.extend_from_slice(b":2}\n\ndata: [DONE]\n\n");
        st.parse_events();
        assert_eq!(st.ready.len(), 2);
        assert!(st.done);
    }

    #[test]
    fn local_fallback_is_labelled() {
        let c = local_fallback("tried openai/gpt-5: timeout");
        assert_eq!(c.body["model"], LOCAL_MODEL);
        let text = c.body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.starts_with(LOCAL_PREFIX));
    }
}
