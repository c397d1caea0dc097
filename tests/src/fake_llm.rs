//! A fake LLM provider on 127.0.0.1:0 speaking the OpenAI and DeepSeek wire formats
//! (`POST /v1/chat/completions`, JSON and SSE), scriptable per test: each request takes the
//! next [`Reply`] from the script (the default reply when the script is empty).

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

/// What the fake answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this JSON body (a `chat.completion`).
    Json(Value),
    /// A status with an error body and optional `retry-after` / `retry-after-ms` headers.
    Status {
        status: u16,
        retry_after: Option<&'static str>,
        retry_after_ms: Option<&'static str>,
    },
    /// Waits, then answers with the inner reply.
    Slow(Duration, Box<Reply>),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 headers, some bytes, then the connection is cut.
    Dropped,
    /// SSE: each value as a `data:` event, then `data: [DONE]`. When `gate` is set, the fake
    /// sends the first event and waits for `gate.notify_one()` before sending the rest.
    Stream {
        events: Vec<Value>,
        gate: Option<Arc<Notify>>,
    },
    /// SSE that sends `n` events and then cuts the connection.
    StreamCut { events: Vec<Value>, n: usize },
}

struct FakeState {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    requests: Mutex<Vec<Value>>,
    auth: Mutex<Vec<Option<String>>>,
    hits: AtomicUsize,
    /// Off for long benchmark runs, where keeping every body would grow without bound.
    recording: std::sync::atomic::AtomicBool,
}

/// A running fake provider.
#[derive(Clone)]
pub struct FakeLlm {
    pub addr: std::net::SocketAddr,
    state: Arc<FakeState>,
    _tracker: TaskTracker,
}

impl std::fmt::Debug for FakeLlm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeLlm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeLlm {
    /// Starts a fake that answers `default` to every request not scripted.
    pub async fn start(default: Reply) -> Self {
        let state = Arc::new(FakeState {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
            auth: Mutex::new(Vec::new()),
            hits: AtomicUsize::new(0),
            recording: std::sync::atomic::AtomicBool::new(true),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tracker = TaskTracker::new();
        tracker.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            _tracker: tracker,
        }
    }

    /// `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues replies for the next requests.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn set_default(&self, r: Reply) {
        *self.state.default.lock().unwrap() = r;
    }

    /// Stops keeping request bodies and headers (counting continues).
    pub fn stop_recording(&self) {
        self.state.recording.store(false, Ordering::SeqCst);
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Bodies received so far.
    pub fn requests(&self) -> Vec<Value> {
        self.state.requests.lock().unwrap().clone()
    }

    /// `Authorization` headers received so far.
    pub fn auth_headers(&self) -> Vec<Option<String>> {
        self.state.auth.lock().unwrap().clone()
    }
}

async fn handle(
    State(st): State<Arc<FakeState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    st.hits.fetch_add(1, Ordering::SeqCst);
    if st.recording.load(Ordering::Relaxed) {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        st.requests.lock().unwrap().push(v);
        st.auth.lock().unwrap().push(
            headers
                .get("authorization")
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
        );
    }
    let reply = {
        let next = st.script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| st.default.lock().unwrap().clone())
    };
    respond(reply).await
}

fn sse_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn respond(reply: Reply) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>> {
    Box::pin(async move {
        match reply {
            Reply::Json(v) => axum::Json(v).into_response(),
            Reply::Status {
                status,
                retry_after,
                retry_after_ms,
            } => {
                let mut r = (
                    StatusCode::from_u16(status).unwrap(),
                    axum::Json(json!({"error": {"message": format!("fake error {status}"), "type": "fake"}})),
                )
                    .into_response();
                if let Some(s) = retry_after {
                    r.headers_mut()
                        .insert("retry-after", HeaderValue::from_static(s));
                }
                if let Some(s) = retry_after_ms {
                    r.headers_mut()
                        .insert("retry-after-ms", HeaderValue::from_static(s));
                }
                r
            }
            Reply::Slow(d, inner) => {
                tokio::time::sleep(d).await;
                respond(*inner).await
            }
            Reply::Malformed => (
                [("content-type", "application/json")],
                "{\"id\": \"x\", \"choices\": [",
            )
                .into_response(),
            Reply::Dropped => {
                let s = futures_util::stream::iter(vec![
                    Ok::<_, std::io::Error>(Bytes::from_static(b"{\"id\": \"chatcmpl-1\", ")),
                    Err(std::io::Error::other("cut")),
                ]);
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
            Reply::Stream { events, gate } => {
                let s = futures_util::stream::unfold(
                    (events.into_iter(), 0usize, gate, false),
                    |(mut it, i, gate, done)| async move {
                        if done {
                            return None;
                        }
                        if i == 1
                            && let Some(g) = &gate
                        {
                            g.notified().await;
                        }
                        match it.next() {
                            Some(v) => {
                                Some((Ok::<_, Infallible>(sse_event(&v)), (it, i + 1, gate, false)))
                            }
                            None => Some((
                                Ok(Bytes::from_static(b"data: [DONE]\n\n")),
                                (it, i + 1, gate, true),
                            )),
                        }
                    },
                );
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
            Reply::StreamCut { events, n } => {
                // The events go out, then (after a pause so they are flushed) the connection
                // is cut without [DONE].
                let items: Vec<Value> = events.into_iter().take(n).collect();
                let s = futures_util::stream::unfold(items.into_iter(), |mut it| async move {
                    match it.next() {
                        Some(v) => Some((Ok::<_, std::io::Error>(sse_event(&v)), it)),
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((Err(std::io::Error::other("cut")), it))
                        }
                    }
                });
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(s))
                    .unwrap()
            }
        }
    })
}

// ---------- wire-format builders ----------

/// An OpenAI `chat.completion` with text content.
pub fn completion(model: &str, content: &str) -> Value {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                  "prompt_tokens_details": {"cached_tokens": 0}}
    })
}

/// A DeepSeek completion with `reasoning_content` and cache-hit usage fields.
pub fn deepseek_completion(content: &str, reasoning: &str) -> Value {
    json!({
        "id": "ds-fake", "object": "chat.completion", "created": 1_700_000_000, "model": "deepseek-reasoner",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                  "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
    })
}

/// A completion calling the tool `get_temperature`.
pub fn tool_call_completion(model: &str) -> Value {
    json!({
        "id": "chatcmpl-tool", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_temperature", "arguments": "{\"machine\":\"press-1\"}"}}]},
            "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}
    })
}

fn chunk(model: &str, delta: Value, finish: Value) -> Value {
    json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
           "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
}

/// Text streamed in `parts`, then a finish chunk and a usage-only chunk.
pub fn text_chunks(model: &str, parts: &[&str]) -> Vec<Value> {
    let mut v = vec![chunk(
        model,
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for p in parts {
        v.push(chunk(model, json!({"content": p}), Value::Null));
    }
    v.push(chunk(model, json!({}), json!("stop")));
    v.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": model, "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": parts.len(), "total_tokens": 12 + parts.len()}}));
    v
}

/// DeepSeek reasoning stream: `reasoning_content` deltas, then content, then usage with
/// cache-hit fields.
pub fn deepseek_chunks() -> Vec<Value> {
    let m = "deepseek-reasoner";
    vec![
        chunk(
            m,
            json!({"role": "assistant", "content": null, "reasoning_content": ""}),
            Value::Null,
        ),
        chunk(
            m,
            json!({"content": null, "reasoning_content": "Think"}),
            Value::Null,
        ),
        chunk(
            m,
            json!({"content": null, "reasoning_content": "ing."}),
            Value::Null,
        ),
        chunk(
            m,
            json!({"content": "Answer", "reasoning_content": null}),
            Value::Null,
        ),
        chunk(m, json!({"content": ""}), json!("stop")),
        json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": m, "choices": [],
               "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                         "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}}),
    ]
}

/// Two parallel tool calls whose arguments arrive in pieces, interleaved by index.
pub fn tool_call_chunks(model: &str) -> Vec<Value> {
    let tc = |index: u32, id: Option<&str>, name: Option<&str>, args: &str| {
        let mut f = json!({"arguments": args});
        if let Some(n) = name {
            f["name"] = json!(n);
        }
        let mut c = json!({"index": index, "function": f});
        if let Some(id) = id {
            c["id"] = json!(id);
            c["type"] = json!("function");
        }
        c
    };
    vec![
        chunk(
            model,
            json!({"role": "assistant", "content": null,
            "tool_calls": [tc(0, Some("call_a"), Some("get_temperature"), "")]}),
            Value::Null,
        ),
        chunk(
            model,
            json!({"tool_calls": [tc(0, None, None, "{\"mach")]}),
            Value::Null,
        ),
        chunk(
            model,
            json!({"tool_calls": [tc(1, Some("call_b"), Some("get_pressure"), "{\"machine\":")]}),
            Value::Null,
        ),
        chunk(
            model,
            json!({"tool_calls": [tc(0, None, None, "ine\":\"press-1\"}")]}),
            Value::Null,
        ),
        chunk(
            model,
            json!({"tool_calls": [tc(1, None, None, "\"press-2\"}")]}),
            Value::Null,
        ),
        chunk(model, json!({}), json!("tool_calls")),
    ]
}

/// A completion calling tools, OpenAI's shape: `calls` are `(id, name, arguments JSON)`.
pub fn tool_calls_completion(model: &str, calls: &[(&str, &str, &str)]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function",
                   "function": {"name": name, "arguments": args}})
        })
        .collect();
    json!({
        "id": "chatcmpl-tools", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
            "tool_calls": calls}, "logprobs": null, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}
    })
}
