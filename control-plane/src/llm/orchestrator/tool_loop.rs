//! The function-calling loop: the model is offered the [`tools`](super::tools), kip runs the
//! calls it makes and hands the results back, until it answers or a limit is reached.
//!
//! Invariants:
//! - Each model call goes through [`Gateway::complete`], so every step is routed, retried,
//!   budget-checked, metered and logged like any LLM call (the caller admitted the request
//!   once: in-flight and rate limits).
//! - Bounded by [`LoopLimits`]: steps (the last step offers no tools, so the model must
//!   answer), tool calls (calls beyond get an error result), tokens (the loop stops once the
//!   steps used more), wall time (the deadline covers model and tool calls), and the bytes of
//!   each tool result.
//! - A tool failure or bad arguments become an error result for the model; they never fail
//!   the request.
//! - Tools are offered only to providers that speak OpenAI function calling
//!   (`openai_compatible`, `deepseek`); others answer from the gathered context alone.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{config::LoopLimits, tools::Toolbox};
use crate::{
    documents::grounded::{Context, ToolCall},
    llm::{Answer, Call, Gateway, LlmError, Target, config::ProviderKind, provider::Usage},
};

/// Why the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The model answered.
    Answer,
    /// `max_steps` model calls were made.
    MaxSteps,
    /// The steps used more than `max_total_tokens`.
    MaxTokens,
    /// `max_wall_time_ms` passed.
    WallTime,
    /// No provider answered; the built-in local fallback did.
    Local,
}

/// The result of one loop.
#[derive(Debug, Clone)]
pub struct LoopOutcome {
    /// The last model answer.
    pub answer: Answer,
    pub content: Option<String>,
    pub stop: Stop,
    pub steps: u32,
    /// Tokens and cost summed over the steps.
    pub usage: Usage,
    pub cost_usd: f64,
}

/// Whether `t` speaks OpenAI function calling.
pub fn supports_tools(gw: &Gateway, t: &Target) -> bool {
    gw.config().providers.get(&t.provider).is_some_and(|p| {
        matches!(
            p.kind,
            ProviderKind::OpenaiCompatible | ProviderKind::Deepseek
        )
    })
}

/// Cuts `s` to at most `max` bytes on a character boundary, saying so.
fn cap(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let note = "... [cut: result longer than llm.orchestrator.max_tool_result_bytes]";
    let mut end = max.saturating_sub(note.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &s[..end])
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Runs the loop for one chain of `targets`. `messages` start the conversation (the context
/// system message, the user's messages); `base` holds the other body fields (temperature,
/// token limit). Tool calls are recorded in `ctx.tool_calls`.
#[expect(
    clippy::too_many_arguments,
    reason = "the loop's inputs are independent; a struct would only rename them"
)]
pub async fn run(
    gw: &Gateway,
    org_id: Uuid,
    request_id: Uuid,
    targets: Vec<Target>,
    base: &Map<String, Value>,
    mut messages: Vec<Value>,
    toolbox: &Toolbox,
    ctx: &mut Context,
    limits: LoopLimits,
    deadline: Instant,
) -> Result<LoopOutcome, LlmError> {
    let tools = targets.first().is_some_and(|t| supports_tools(gw, t));
    let mut usage = Usage::default();
    let mut cost = 0.0;
    let mut calls_made = 0u32;
    let mut step = 0u32;
    loop {
        let last = step + 1 >= limits.max_steps;
        let mut body = base.clone();
        body.insert("messages".into(), Value::Array(messages.clone()));
        if tools && !last {
            body.insert("tools".into(), super::tools::definitions());
            body.insert("tool_choice".into(), json!("auto"));
        }
        let call = Call {
            org_id,
            request_id,
            targets: targets.clone(),
            body,
            cache_key: None,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer = match tokio::time::timeout(remaining, gw.complete(&call)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(LlmError::AllFailed(format!(
                    "the orchestrated request ran out of time (llm.orchestrator.max_wall_time_ms \
                     = {})",
                    limits.max_wall_time.as_millis()
                )));
            }
        };
        step += 1;
        usage.input += answer.completion.usage.input;
        usage.output += answer.completion.usage.output;
        usage.cached += answer.completion.usage.cached;
        cost += answer.cost_usd;
        let msg = answer
            .completion
            .body
            .pointer("/choices/0/message")
            .cloned()
            .unwrap_or(Value::Null);
        let content = msg
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let tool_calls: Vec<Value> = msg
            .get("tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let stop = if answer.local {
            Some(Stop::Local)
        } else if tool_calls.is_empty() {
            Some(Stop::Answer)
        } else if last || step >= limits.max_steps {
            Some(Stop::MaxSteps)
        } else if usage.input + usage.output > limits.max_total_tokens {
            Some(Stop::MaxTokens)
        } else if Instant::now() >= deadline {
            Some(Stop::WallTime)
        } else {
            None
        };
        if let Some(stop) = stop {
            if stop != Stop::Answer {
                tracing::info!(%request_id, ?stop, step, "tool loop stopped at a limit");
            }
            return Ok(LoopOutcome {
                answer,
                content,
                stop,
                steps: step,
                usage,
                cost_usd: cost,
            });
        }
        // The assistant's message with its calls, then one tool message per call.
        messages.push(msg.clone());
        for tc in &tool_calls {
            let id = tc.get("id").and_then(Value::as_str).unwrap_or("call");
            let name = tc
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let args = tc
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("");
            let t0 = Instant::now();
            let (result, status) = if calls_made >= limits.max_tool_calls {
                (
                    json!({"error": format!(
                        "tool call limit of {} reached for this request; answer with what you have",
                        limits.max_tool_calls)}),
                    "limit",
                )
            } else {
                calls_made += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                let within = limits.tool_timeout.min(left).max(Duration::from_millis(1));
                match tokio::time::timeout(within, toolbox.call(name, args, ctx)).await {
                    Ok(Ok(v)) => (v, "ok"),
                    Ok(Err(e)) => {
                        if let super::tools::ToolError::Failed(cause) = &e {
                            tracing::warn!(%request_id, tool = name, %cause, "tool failed");
                        }
                        (json!({"error": e.to_string()}), e.status())
                    }
                    Err(_) => (
                        json!({"error": "the tool took too long (llm.orchestrator.tool_timeout_ms)"}),
                        "timeout",
                    ),
                }
            };
            let text = cap(result.to_string(), limits.max_tool_result_bytes);
            let results = result
                .as_object()
                .and_then(|o| o.values().find_map(Value::as_array))
                .map_or(0, Vec::len);
            let record = ToolCall {
                tool: crate::documents::grounded::clip(name, 64),
                results,
                latency_ms: ms(t0),
                caller: "model",
                status,
                arguments_bytes: args.len(),
                result_bytes: text.len(),
                step: step - 1,
            };
            tracing::info!(
                %request_id,
                tool = %record.tool,
                status,
                arguments_bytes = record.arguments_bytes,
                result_bytes = record.result_bytes,
                duration_ms = record.latency_ms,
                "tool call"
            );
            ctx.tool_calls.push(record);
            messages.push(json!({"role": "tool", "tool_call_id": id, "content": text}));
        }
    }
}

/// Stores the model's tool calls of a request beside its `inference_logs` rows. A failure is
/// logged, not returned: the answer was already produced and paid for.
pub async fn store(pool: &sqlx::PgPool, org_id: Uuid, request_id: Uuid, calls: &[ToolCall]) {
    let calls: Vec<&ToolCall> = calls.iter().filter(|c| c.caller == "model").collect();
    if calls.is_empty() {
        return;
    }
    let col = |f: fn(&ToolCall) -> i64| calls.iter().map(|c| f(c)).collect::<Vec<i64>>();
    let steps = col(|c| i64::from(c.step));
    let args = col(|c| c.arguments_bytes as i64);
    let results = col(|c| c.result_bytes as i64);
    let tools: Vec<&str> = calls.iter().map(|c| c.tool.as_str()).collect();
    let durations: Vec<f64> = calls.iter().map(|c| c.latency_ms).collect();
    let statuses: Vec<&str> = calls.iter().map(|c| c.status).collect();
    let r = sqlx::query(
        "INSERT INTO llm_tool_calls (org_id, request_id, step, tool, arguments_bytes, \
                                     result_bytes, duration_ms, status) \
         SELECT $1, $2, s, t, a::int, r::int, d, st \
         FROM UNNEST($3::bigint[], $4::text[], $5::bigint[], $6::bigint[], $7::float8[], \
                     $8::text[]) AS x(s, t, a, r, d, st)",
    )
    .bind(org_id)
    .bind(request_id)
    .bind(&steps)
    .bind(&tools)
    .bind(&args)
    .bind(&results)
    .bind(&durations)
    .bind(&statuses)
    .execute(pool)
    .await;
    if let Err(e) = r {
        tracing::warn!(%request_id, error = %e, "cannot store the request's tool calls");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_results_are_cut_on_a_character_boundary_and_say_so() {
        let s = "ä".repeat(400);
        let c = cap(s, 300);
        assert!(c.len() <= 300, "{}", c.len());
        assert!(c.ends_with("max_tool_result_bytes]"));
        assert_eq!(cap("short".into(), 300), "short");
    }
}
