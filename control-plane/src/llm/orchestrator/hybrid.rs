//! The hybrid orchestrator: the plant's data gathered concurrently (retrieval, latest
//! readings and trends, predictions), then one or more models asked concurrently, each in its
//! own tool loop over the same context, then one answer chosen (best-of-n: a judge model picks,
//! as TensorZero's best-of-n sampling does; without a judge, the candidate citing the most
//! sources), and a deterministic answer assembled from the sources when no model answered.
//!
//! Invariants:
//! - Every model call (candidates and judge) goes through the gateway: routed, budget-checked,
//!   metered and logged; the caller admitted the request once before anything ran, and the
//!   fallback answer is logged as a `fallback` call.
//! - The whole request is bounded by `llm.orchestrator.max_wall_time_ms`; each tool loop by
//!   the loop limits; at most [`MAX_CANDIDATES`](super::config::MAX_CANDIDATES) candidates.
//! - Citations come from the winner's context and name only sources its answer marks; an
//!   answer marking none is `grounded: false`. The fallback is labelled `mode: "fallback"`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::{
    config::Strategy,
    tool_loop::{self, LoopOutcome, Stop},
    tools::Toolbox,
};
use crate::{
    documents::grounded::{self, Context, Grounding},
    http::ApiError,
    llm::{Call, Gateway, LlmError, provider::Usage},
};

/// One question for the orchestrator.
#[derive(Debug, Clone)]
pub struct HybridRequest {
    /// The last user message (what retrieval and the judge look at).
    pub question: String,
    /// The conversation as OpenAI messages (the context system message goes first).
    pub messages: Vec<Value>,
    /// The request's model; used when `llm.orchestrator.candidates` is empty.
    pub model: Option<String>,
    /// Other body fields for every candidate (temperature, token limit).
    pub base: Map<String, Value>,
    /// How the candidates become one answer; None: `llm.orchestrator.strategy`.
    pub strategy: Option<Strategy>,
}

/// How one candidate fared.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    /// The candidate as configured (`provider/model` or alias).
    pub candidate: String,
    /// `provider/model` that answered, when one did.
    pub target: Option<String>,
    /// `ok`, `local` (only the built-in fallback answered) or the error kind.
    pub status: String,
    pub stop: Option<Stop>,
    pub steps: u32,
    pub citations: usize,
}

/// How the answer was chosen among several.
#[derive(Debug, Clone, Serialize)]
pub struct JudgeReport {
    pub model: String,
    /// `ok`, `unparsable` (the heuristic chose), or the error kind.
    pub status: String,
    /// 0-based index into `candidates` of the chosen answer.
    pub choice: usize,
}

/// How the fuser merged the candidates (`mixture_of_n`).
#[derive(Debug, Clone, Serialize)]
pub struct FuserReport {
    pub model: String,
    /// `ok` (the answer is the fuser's), `single_candidate` (one candidate answered: it is
    /// the answer, no fuser call), `empty`, `local`, `timeout` or the error kind (the best
    /// candidate is the answer).
    pub status: String,
    /// Markers in the fuser's answer that named no source, removed from the answer.
    pub rejected_markers: Vec<String>,
}

/// The orchestrator's answer.
#[derive(Debug, Clone)]
pub struct HybridAnswer {
    pub request_id: Uuid,
    pub content: String,
    pub grounding: Grounding,
    pub provider: String,
    pub model: String,
    pub usage: Usage,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub candidates: Vec<CandidateReport>,
    pub judge: Option<JudgeReport>,
    pub strategy: Strategy,
    pub fuser: Option<FuserReport>,
}

const TOOL_HINT: &str = "\nYou may call the tools to look up more readings, metric history, \
    predictions, maintenance events, fleet status or document passages; their results carry \
    markers you can cite the same way.\n";

/// Answers `req` for the toolbox's organisation (already admitted by the caller).
pub async fn answer(
    gw: &Arc<Gateway>,
    toolbox: &Toolbox,
    request_id: Uuid,
    req: HybridRequest,
) -> Result<HybridAnswer, ApiError> {
    let started = Instant::now();
    let cfg = gw.config().orchestrator.clone();
    let deadline = started + cfg.limits.max_wall_time;
    let org = toolbox.org;
    let strategy = req.strategy.unwrap_or(cfg.strategy);
    let live = gw.live_client();
    let ctx =
        super::sources::gather(toolbox, live.as_deref(), &req.question, cfg.sources_timeout).await;
    let mut messages = vec![json!({"role": "system",
        "content": format!("{}{TOOL_HINT}", ctx.system_prompt())})];
    messages.extend(req.messages.iter().cloned());

    let names: Vec<String> = if cfg.candidates.is_empty() {
        req.model
            .clone()
            .or_else(|| gw.config().default_model.clone())
            .into_iter()
            .collect()
    } else {
        cfg.candidates.clone()
    };
    let est = (
        (messages.iter().map(|m| m.to_string().len()).sum::<usize>() as u64 / 4).max(1),
        512,
    );
    let mut reports = Vec::new();
    let mut runs = Vec::new();
    for name in &names {
        let targets = gw.resolve(Some(name), None, &[], None, est)?;
        reports.push(CandidateReport {
            candidate: name.clone(),
            target: None,
            status: "pending".into(),
            stop: None,
            steps: 0,
            citations: 0,
        });
        let mut own = ctx.clone();
        let messages = messages.clone();
        let base = req.base.clone();
        runs.push(async move {
            let r = tool_loop::run(
                gw, org, request_id, targets, &base, messages, toolbox, &mut own, cfg.limits,
                deadline,
            )
            .await;
            (r, own)
        });
    }
    let results = futures_util::future::join_all(runs).await;

    let mut usage = Usage::default();
    let mut cost = 0.0;
    let mut ok: Vec<(usize, LoopOutcome, Context, Grounding)> = Vec::new();
    let mut all_calls = Vec::new();
    for (i, (r, own)) in results.into_iter().enumerate() {
        all_calls.extend(own.tool_calls.iter().cloned());
        let rep = &mut reports[i];
        match r {
            Ok(o) => {
                usage.input += o.usage.input;
                usage.output += o.usage.output;
                usage.cached += o.usage.cached;
                cost += o.cost_usd;
                rep.target = Some(o.answer.target.label());
                rep.stop = Some(o.stop);
                rep.steps = o.steps;
                let text = o.content.clone().unwrap_or_default();
                if o.stop == Stop::Local || text.trim().is_empty() {
                    rep.status = if o.stop == Stop::Local {
                        "local"
                    } else {
                        "empty"
                    }
                    .into();
                    continue;
                }
                let g = own.grounding(&text, "hybrid");
                rep.citations = g.citations.len();
                rep.status = "ok".into();
                ok.push((i, o, own, g));
            }
            Err(e) => {
                rep.status = error_kind(&e).into();
                // Budget and rate refusals are the caller's answer, not a reason to fall back.
                if matches!(
                    e,
                    LlmError::BudgetExceeded(_) | LlmError::ProviderRejected(_)
                ) {
                    return Err(e.into());
                }
            }
        }
    }
    tool_loop::store(&toolbox.pool, org, request_id, &all_calls).await;

    if ok.is_empty() {
        // No model answered: the answer assembled from the sources, labelled.
        let content = ctx.fallback_answer();
        let mut grounding = ctx.grounding(&content, "fallback");
        grounding.tool_calls = all_calls;
        gw.record_fallback(org, request_id, "hybrid-fallback", started.elapsed());
        return Ok(HybridAnswer {
            request_id,
            content,
            grounding,
            provider: crate::llm::LOCAL_PROVIDER.into(),
            model: "hybrid-fallback".into(),
            usage,
            cost_usd: cost,
            latency_ms: ms(started),
            candidates: reports,
            judge: None,
            strategy,
            fuser: None,
        });
    }

    // The heuristic choice: most citations, the earlier candidate on a tie.
    let mut best = 0;
    for (j, c) in ok.iter().enumerate() {
        if c.3.citations.len() > ok[best].3.citations.len() {
            best = j;
        }
    }
    let mut fuser = None;
    if strategy == Strategy::MixtureOfN {
        let model = cfg
            .fuser_model
            .clone()
            .or_else(|| cfg.judge_model.clone())
            .unwrap_or_else(|| names.first().cloned().unwrap_or_default());
        if ok.len() == 1 {
            fuser = Some(FuserReport {
                model,
                status: "single_candidate".into(),
                rejected_markers: Vec::new(),
            });
        } else {
            // One marker space for all candidates: each tool loop may have added sources.
            let mut merged = ctx.clone();
            let texts: Vec<String> = ok
                .iter()
                .map(|(_, o, own, _)| {
                    let map = merged.merge(own);
                    grounded::rewrite_markers(o.content.as_deref().unwrap_or_default(), |m| {
                        map.get(m).cloned()
                    })
                })
                .collect();
            let remaining = deadline.saturating_duration_since(Instant::now());
            let f = run_fuser(
                gw,
                org,
                request_id,
                &model,
                &req.question,
                &merged,
                &texts,
                remaining,
            )
            .await;
            usage.input += f.usage.input;
            usage.output += f.usage.output;
            cost += f.cost_usd;
            if let Some((content, target)) = f.answer {
                let (content, rejected) = merged.validate(&content);
                if !rejected.is_empty() {
                    tracing::info!(%org, %request_id, ?rejected, "fuser cited sources it was not given; removed");
                }
                let mut grounding = merged.grounding(&content, "hybrid");
                grounding.tool_calls = all_calls;
                return Ok(HybridAnswer {
                    request_id,
                    content,
                    grounding,
                    provider: target.provider,
                    model: target.model,
                    usage,
                    cost_usd: cost,
                    latency_ms: ms(started),
                    candidates: reports,
                    judge: None,
                    strategy,
                    fuser: Some(FuserReport {
                        model,
                        status: f.status,
                        rejected_markers: rejected,
                    }),
                });
            }
            // The fuser failed: the best candidate by citations (below) is the answer.
            fuser = Some(FuserReport {
                model,
                status: f.status,
                rejected_markers: Vec::new(),
            });
        }
    }
    let mut judge = None;
    if strategy == Strategy::BestOfN
        && ok.len() > 1
        && let Some(jm) = &cfg.judge_model
    {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (status, choice, jusage, jcost) =
            run_judge(gw, org, request_id, jm, &req.question, &ctx, &ok, remaining).await;
        usage.input += jusage.input;
        usage.output += jusage.output;
        cost += jcost;
        if let Some(c) = choice {
            best = c;
        }
        judge = Some(JudgeReport {
            model: jm.clone(),
            status,
            choice: ok[best].0,
        });
    }
    let (_, outcome, own, _) = ok.swap_remove(best);
    // Markers naming no source the candidate was given are removed, never cited.
    let (content, rejected) = own.validate(outcome.content.as_deref().unwrap_or_default());
    let mut grounding = own.grounding(&content, "hybrid");
    grounding.tool_calls = all_calls;
    if !rejected.is_empty() {
        tracing::info!(%org, %request_id, ?rejected, "answer cited sources it was not given; removed");
    }
    Ok(HybridAnswer {
        request_id,
        content,
        grounding,
        provider: outcome.answer.target.provider.clone(),
        model: outcome.answer.target.model.clone(),
        usage,
        cost_usd: cost,
        latency_ms: ms(started),
        candidates: reports,
        judge,
        strategy,
        fuser,
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn error_kind(e: &LlmError) -> &'static str {
    match e {
        LlmError::Invalid { .. } => "invalid",
        LlmError::UnknownModel(_) => "unknown_model",
        LlmError::TooManyFallbacks(_) => "too_many_fallbacks",
        LlmError::ProviderRejected(_) => "rejected",
        LlmError::Overloaded(_) => "overloaded",
        LlmError::RateLimited { .. } => "rate_limited",
        LlmError::BudgetExceeded(_) => "budget_exceeded",
        LlmError::AllFailed(_) => "all_failed",
    }
}

/// The judge's prompt: the question, the sources and the numbered candidate answers; it
/// answers `{"thinking": ..., "answer_choice": N}` (TensorZero's best-of-n evaluator shape).
fn judge_messages(question: &str, ctx: &Context, answers: &[&str]) -> Vec<Value> {
    let mut user = format!(
        "Question:\n{question}\n\nSources:\n{}\n",
        ctx.system_prompt()
    );
    for (i, a) in answers.iter().enumerate() {
        user.push_str(&format!("\nCandidate {i}:\n{}\n", grounded::clip(a, 4000)));
    }
    vec![
        json!({"role": "system", "content":
            "You judge answers to a question about an industrial plant. Pick the candidate that \
             is best supported by the sources, cites them with their markers ([R1], [D1], [P1]) \
             and answers the whole question. Reply with JSON only: \
             {\"thinking\": \"<short reasoning>\", \"answer_choice\": <candidate number>}"}),
        json!({"role": "user", "content": user}),
    ]
}

/// The judge's choice among `ok` (an index into `ok`), or `None` when it failed or answered
/// something else; with the status, usage and cost of its call.
#[expect(
    clippy::too_many_arguments,
    reason = "the loop's inputs are independent; a struct would only rename them"
)]
async fn run_judge(
    gw: &Gateway,
    org: Uuid,
    request_id: Uuid,
    model: &str,
    question: &str,
    ctx: &Context,
    ok: &[(usize, LoopOutcome, Context, Grounding)],
    remaining: Duration,
) -> (String, Option<usize>, Usage, f64) {
    let answers: Vec<&str> = ok
        .iter()
        .map(|c| c.1.content.as_deref().unwrap_or_default())
        .collect();
    let targets = match gw.resolve(Some(model), None, &[], None, (2000, 200)) {
        Ok(t) => t,
        Err(e) => return (error_kind(&e).into(), None, Usage::default(), 0.0),
    };
    let mut body = Map::new();
    body.insert(
        "messages".into(),
        Value::Array(judge_messages(question, ctx, &answers)),
    );
    body.insert("temperature".into(), json!(0));
    let call = Call {
        org_id: org,
        request_id,
        targets,
        body,
        cache_key: None,
    };
    let a = match tokio::time::timeout(remaining, gw.complete(&call)).await {
        Ok(Ok(a)) if !a.local => a,
        Ok(Ok(_)) => return ("local".into(), None, Usage::default(), 0.0),
        Ok(Err(e)) => return (error_kind(&e).into(), None, Usage::default(), 0.0),
        Err(_) => return ("timeout".into(), None, Usage::default(), 0.0),
    };
    let text = a
        .completion
        .body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let choice = parse_choice(text).filter(|c| *c < ok.len());
    let status = if choice.is_some() { "ok" } else { "unparsable" };
    (status.into(), choice, a.completion.usage, a.cost_usd)
}

/// The fuser's prompt (after TensorZero's mixture-of-n fuser): the question, the sources
/// with their markers, and the candidates' answers in the same marker space.
fn fuser_messages(question: &str, ctx: &Context, answers: &[String]) -> Vec<Value> {
    let mut user = format!(
        "Question:\n{question}\n\nSources:\n{}\n",
        ctx.system_prompt()
    );
    for (i, a) in answers.iter().enumerate() {
        user.push_str(&format!(
            "\nCandidate answer {i}:\n{}\n",
            grounded::clip(a, 4000)
        ));
    }
    vec![
        json!({"role": "system", "content":
            "You are given several candidate answers, written by different models, to a question \
             about an industrial plant, and the sources they were written from. Write one answer \
             that keeps what the candidates agree on and what the sources support, corrects or \
             drops what the sources contradict, and is complete and concise. Mark every fact \
             with the marker of its source in square brackets ([R1], [L1], [D1], [P1]) exactly as \
             the sources list them; never invent a marker. Answer in the language of the \
             question, with the answer text only."}),
        json!({"role": "user", "content": user}),
    ]
}

/// What the fuser call gave.
struct Fused {
    /// `ok`, `empty`, `local`, `timeout` or the error kind.
    status: String,
    /// The fused text and who wrote it, when the call succeeded.
    answer: Option<(String, crate::llm::Target)>,
    usage: Usage,
    cost_usd: f64,
}

#[expect(
    clippy::too_many_arguments,
    reason = "the call's inputs are independent; a struct would only rename them"
)]
async fn run_fuser(
    gw: &Gateway,
    org: Uuid,
    request_id: Uuid,
    model: &str,
    question: &str,
    ctx: &Context,
    answers: &[String],
    remaining: Duration,
) -> Fused {
    let failed = |status: &str| Fused {
        status: status.into(),
        answer: None,
        usage: Usage::default(),
        cost_usd: 0.0,
    };
    let targets = match gw.resolve(Some(model), None, &[], None, (4000, 800)) {
        Ok(t) => t,
        Err(e) => return failed(error_kind(&e)),
    };
    let mut body = Map::new();
    body.insert(
        "messages".into(),
        Value::Array(fuser_messages(question, ctx, answers)),
    );
    body.insert("temperature".into(), json!(0));
    let call = Call {
        org_id: org,
        request_id,
        targets,
        body,
        cache_key: None,
    };
    let a = match tokio::time::timeout(remaining, gw.complete(&call)).await {
        Ok(Ok(a)) if !a.local => a,
        Ok(Ok(_)) => return failed("local"),
        Ok(Err(e)) => return failed(error_kind(&e)),
        Err(_) => return failed("timeout"),
    };
    let text = a
        .completion
        .body
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .to_owned();
    if text.is_empty() {
        return Fused {
            status: "empty".into(),
            answer: None,
            usage: a.completion.usage,
            cost_usd: a.cost_usd,
        };
    }
    Fused {
        status: "ok".into(),
        answer: Some((text, a.target.clone())),
        usage: a.completion.usage,
        cost_usd: a.cost_usd,
    }
}

/// `answer_choice` of the judge's JSON (also inside prose or a code fence).
fn parse_choice(text: &str) -> Option<usize> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    let v: Value = serde_json::from_str(text.get(start..=end)?).ok()?;
    v.get("answer_choice")?.as_u64().map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_judge_choice_is_read_from_json_inside_prose() {
        assert_eq!(
            parse_choice(
                "Sure.\n```json\n{\"thinking\": \"b cites R1\", \"answer_choice\": 1}\n```"
            ),
            Some(1)
        );
        assert_eq!(parse_choice("candidate 1"), None);
        assert_eq!(parse_choice("{\"answer_choice\": \"one\"}"), None);
    }
}
