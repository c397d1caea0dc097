//! Grounded answers: the tools that gather what the plant knows about a question (document
//! retrieval, the latest readings and their trend, the latest predictions), the prompt that
//! hands them to a language model with numbered markers, the citations read back from its
//! answer, and the deterministic answer assembled from the same material when no model is
//! reachable.
//!
//! Invariants:
//! - Every tool is scoped to the caller's organisation (documents through row-level security,
//!   readings and predictions by `org_id`) and bounded ([`MAX_PASSAGES`], [`MAX_SERIES`],
//!   [`MAX_PREDICTIONS`]).
//! - Citations name only sources that were handed to the model and that its answer marks
//!   (`[D1]`, `[R2]`, `[P1]`); an answer that marks none is `grounded: false`.
//! - The fallback answer is labelled as such (`mode: "fallback"`) and cites every source it
//!   uses; it never invents text beyond the sources.

use std::time::Instant;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Documents, DocumentsError, search::Hit};
use crate::telemetry::latest::{self, LatestPrediction, LatestReading};

/// Passages retrieved per question.
pub const MAX_PASSAGES: usize = 5;
/// Reading series handed to the model.
pub const MAX_SERIES: usize = 8;
/// Predictions handed to the model.
pub const MAX_PREDICTIONS: usize = 4;
/// Characters of a passage in the prompt and in the fallback answer.
const PASSAGE_CHARS: usize = 700;

/// One call of a server-side tool, reported with the answer.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    pub tool: String,
    pub results: usize,
    pub latency_ms: f64,
    /// Who called it: `kip` (gathered before the model is asked) or `model` (a tool call of
    /// the model in the tool loop).
    pub caller: &'static str,
    /// `ok`, or why the call gave the model an error (`bad_arguments`, `unknown_tool`,
    /// `failed`, `timeout`, `limit`).
    pub status: &'static str,
    /// Size of the arguments the model sent (0 for `kip`).
    pub arguments_bytes: usize,
    /// Size of the result handed to the model.
    pub result_bytes: usize,
    /// Step of the tool loop (model calls before this one); 0 for `kip`.
    pub step: u32,
}

impl ToolCall {
    /// A tool kip ran itself (before the model is asked).
    pub fn summary(tool: &str, results: usize, latency_ms: f64) -> Self {
        Self {
            tool: tool.to_owned(),
            results,
            latency_ms,
            caller: "kip",
            status: "ok",
            arguments_bytes: 0,
            result_bytes: 0,
            step: 0,
        }
    }
}

/// What the tools found.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub passages: Vec<Hit>,
    pub readings: Vec<LatestReading>,
    pub predictions: Vec<LatestPrediction>,
    /// Current values the machines' agents reported over MQTT for this question (marker `L`).
    pub live: Vec<LiveReading>,
    /// What the sources could not deliver (a silent agent, a source past the deadline),
    /// said in the prompt, the fallback answer and the grounding.
    pub notes: Vec<String>,
    pub tool_calls: Vec<ToolCall>,
}

/// A current value an agent reported for this question (the live machine adapter).
#[derive(Debug, Clone, Serialize)]
pub struct LiveReading {
    pub device: String,
    pub machine: String,
    pub metric: String,
    pub value: f64,
    /// When the value was measured (the source's timestamp).
    pub ts: chrono::DateTime<chrono::Utc>,
    /// When the agent answered.
    pub agent_time: chrono::DateTime<chrono::Utc>,
    /// `good`, `uncertain` or `bad`.
    pub quality: &'static str,
}

/// A source the answer cites.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Citation {
    Document {
        marker: String,
        chunk_id: Uuid,
        document_id: Uuid,
        title: String,
        page: Option<i32>,
        heading: Option<String>,
        char_start: i32,
        char_end: i32,
    },
    Reading {
        marker: String,
        device: String,
        machine: String,
        metric: String,
        ts: chrono::DateTime<chrono::Utc>,
        value: f64,
        /// `stored`: synced to the control plane (marker `R`); `live`: asked from the agent
        /// for this question over MQTT (marker `L`).
        source: &'static str,
    },
    Prediction {
        marker: String,
        prediction_id: String,
        device: String,
        machine: String,
        ts: chrono::DateTime<chrono::Utc>,
        rul_cycles: f64,
    },
}

impl Citation {
    pub fn marker(&self) -> &str {
        match self {
            Self::Document { marker, .. }
            | Self::Reading { marker, .. }
            | Self::Prediction { marker, .. } => marker,
        }
    }
}

/// How the answer was made, and from what.
#[derive(Debug, Clone, Serialize)]
pub struct Grounding {
    /// `llm`: a language model wrote it from the sources; `fallback`: no model was reachable,
    /// the answer is assembled from the sources.
    pub mode: &'static str,
    /// False when the answer cites no source.
    pub grounded: bool,
    pub citations: Vec<Citation>,
    pub tool_calls: Vec<ToolCall>,
    /// What the sources could not deliver (e.g. an agent that did not answer live).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

pub(crate) fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// How well a series' names match the question: shared words, where a word of 4+ letters
/// also matches its prefixes ("temperature" ~ "temp").
pub(crate) fn relevance(question: &[String], names: &[&str]) -> usize {
    let mut score = 0;
    for n in names.iter().flat_map(|n| words(n)) {
        if question.iter().any(|q| {
            *q == n
                || (n.len() >= 4 && q.starts_with(&n))
                || (q.len() >= 4 && n.starts_with(q.as_str()))
        }) {
            score += 1;
        }
    }
    score
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Document retrieval for `question` (at most [`MAX_PASSAGES`]), with its summary.
pub async fn find_passages(
    docs: &Documents,
    pool: &PgPool,
    org: Uuid,
    question: &str,
) -> Result<(Vec<Hit>, ToolCall), DocumentsError> {
    let t = Instant::now();
    let hits = docs.search(pool, org, question, MAX_PASSAGES).await?;
    let call = ToolCall::summary("search_documents", hits.len(), ms(t));
    Ok((hits, call))
}

/// The latest reading series for `question`: those it names first (at most
/// [`MAX_SERIES`]); if it names none, the three most recent.
pub async fn find_readings(
    pool: &PgPool,
    org: Uuid,
    question: &str,
) -> Result<(Vec<LatestReading>, ToolCall), DocumentsError> {
    let t = Instant::now();
    let q = words(question);
    let mut readings = latest::latest_readings(pool, org, 500).await?;
    readings.sort_by_key(|r| std::cmp::Reverse(relevance(&q, &[&r.device, &r.machine, &r.metric])));
    let named = readings
        .iter()
        .take_while(|r| relevance(&q, &[&r.device, &r.machine, &r.metric]) > 0)
        .count();
    readings.truncate(if named > 0 { named.min(MAX_SERIES) } else { 3 });
    let call = ToolCall::summary("latest_readings", readings.len(), ms(t));
    Ok((readings, call))
}

/// The latest predictions, those of machines `question` names first (at most
/// [`MAX_PREDICTIONS`]).
pub async fn find_predictions(
    pool: &PgPool,
    org: Uuid,
    question: &str,
) -> Result<(Vec<LatestPrediction>, ToolCall), DocumentsError> {
    let t = Instant::now();
    let q = words(question);
    let mut preds = latest::latest_predictions(pool, org, 100).await?;
    preds.sort_by_key(|p| std::cmp::Reverse(relevance(&q, &[&p.device, &p.machine])));
    preds.truncate(MAX_PREDICTIONS);
    let call = ToolCall::summary("latest_predictions", preds.len(), ms(t));
    Ok((preds, call))
}

/// Runs the tools for `question` within `org`, concurrently (retrieval, readings and
/// predictions do not depend on each other).
pub async fn gather(
    docs: &Documents,
    pool: &PgPool,
    org: Uuid,
    question: &str,
) -> Result<Context, DocumentsError> {
    let (passages, readings, predictions) = tokio::join!(
        find_passages(docs, pool, org, question),
        find_readings(pool, org, question),
        find_predictions(pool, org, question)
    );
    let mut ctx = Context::default();
    let (p, c) = passages?;
    ctx.passages = p;
    ctx.tool_calls.push(c);
    let (r, c) = readings?;
    ctx.readings = r;
    ctx.tool_calls.push(c);
    let (p, c) = predictions?;
    ctx.predictions = p;
    ctx.tool_calls.push(c);
    tracing::debug!(%org, tools = ?ctx.tool_calls, "grounding tools ran");
    Ok(ctx)
}

pub(crate) fn clip(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

fn trend(r: &LatestReading) -> String {
    match (r.earlier_value, r.earlier_ts) {
        (Some(v), Some(ts)) => {
            let dir = if r.value > v {
                "rising"
            } else if r.value < v {
                "falling"
            } else {
                "steady"
            };
            format!("{dir}, from {v} at {}", ts.to_rfc3339())
        }
        _ => "no earlier reading in the hour before".into(),
    }
}

pub(crate) fn reading_line(r: &LatestReading) -> String {
    format!(
        "{} / {} / {} = {} at {} ({})",
        r.device,
        r.machine,
        r.metric,
        r.value,
        r.ts.to_rfc3339(),
        trend(r)
    )
}

pub(crate) fn live_line(l: &LiveReading) -> String {
    format!(
        "{} / {} / {} = {} at {} (live from the agent at {}, quality {})",
        l.device,
        l.machine,
        l.metric,
        l.value,
        l.ts.to_rfc3339(),
        l.agent_time.to_rfc3339(),
        l.quality
    )
}

pub(crate) fn prediction_line(p: &LatestPrediction) -> String {
    format!(
        "{} / {}: remaining useful life {:.1} cycles{} at {} (model {})",
        p.device,
        p.machine,
        p.rul_cycles,
        p.anomaly_score
            .map(|a| format!(", anomaly score {a:.3}"))
            .unwrap_or_default(),
        p.ts.to_rfc3339(),
        p.model_version
    )
}

pub(crate) fn passage_source(h: &Hit) -> String {
    let mut s = format!("\"{}\"", h.title);
    if let Some(p) = h.page {
        s.push_str(&format!(", page {p}"));
    }
    if let Some(hd) = &h.heading {
        s.push_str(&format!(", section \"{hd}\""));
    }
    s
}

impl Context {
    /// Adds a passage (once per chunk) and returns its marker.
    pub fn add_passage(&mut self, h: Hit) -> String {
        let i = match self.passages.iter().position(|p| p.chunk_id == h.chunk_id) {
            Some(i) => i,
            None => {
                self.passages.push(h);
                self.passages.len() - 1
            }
        };
        format!("D{}", i + 1)
    }

    /// Adds a reading (once per series and time) and returns its marker.
    pub fn add_reading(&mut self, r: LatestReading) -> String {
        let same = |x: &LatestReading| {
            x.device == r.device && x.machine == r.machine && x.metric == r.metric && x.ts == r.ts
        };
        let i = match self.readings.iter().position(same) {
            Some(i) => i,
            None => {
                self.readings.push(r);
                self.readings.len() - 1
            }
        };
        format!("R{}", i + 1)
    }

    /// Adds a prediction (once per id) and returns its marker.
    pub fn add_prediction(&mut self, p: LatestPrediction) -> String {
        let i = match self
            .predictions
            .iter()
            .position(|x| x.prediction_id == p.prediction_id)
        {
            Some(i) => i,
            None => {
                self.predictions.push(p);
                self.predictions.len() - 1
            }
        };
        format!("P{}", i + 1)
    }

    /// Adds a live value (once per series and time) and returns its marker.
    pub fn add_live(&mut self, l: LiveReading) -> String {
        let same = |x: &LiveReading| {
            x.device == l.device && x.machine == l.machine && x.metric == l.metric && x.ts == l.ts
        };
        let i = match self.live.iter().position(same) {
            Some(i) => i,
            None => {
                self.live.push(l);
                self.live.len() - 1
            }
        };
        format!("L{}", i + 1)
    }

    /// Adds every source of `other` (another candidate's context) to this one and returns
    /// how `other`'s markers map to this context's: the candidates of one question share one
    /// marker space for the fuser, whatever their tool loops added.
    pub fn merge(&mut self, other: &Context) -> std::collections::HashMap<String, String> {
        let mut map = std::collections::HashMap::new();
        for (i, h) in other.passages.iter().enumerate() {
            map.insert(format!("D{}", i + 1), self.add_passage(h.clone()));
        }
        for (i, r) in other.readings.iter().enumerate() {
            map.insert(format!("R{}", i + 1), self.add_reading(r.clone()));
        }
        for (i, l) in other.live.iter().enumerate() {
            map.insert(format!("L{}", i + 1), self.add_live(l.clone()));
        }
        for (i, p) in other.predictions.iter().enumerate() {
            map.insert(format!("P{}", i + 1), self.add_prediction(p.clone()));
        }
        map
    }

    /// `content` with every marker that names no source of this context removed (a model
    /// cannot cite what it was not given), and the markers removed.
    pub fn validate(&self, content: &str) -> (String, Vec<String>) {
        let known: std::collections::HashSet<String> = self
            .citations()
            .iter()
            .map(|c| c.marker().to_owned())
            .collect();
        let mut rejected = Vec::new();
        let out = rewrite_markers(content, |m| {
            if known.contains(m) {
                Some(m.to_owned())
            } else {
                if !rejected.iter().any(|r| r == m) {
                    rejected.push(m.to_owned());
                }
                None
            }
        });
        (out, rejected)
    }

    /// Every source with its marker.
    pub fn citations(&self) -> Vec<Citation> {
        let mut out = Vec::new();
        for (i, h) in self.passages.iter().enumerate() {
            out.push(Citation::Document {
                marker: format!("D{}", i + 1),
                chunk_id: h.chunk_id,
                document_id: h.document_id,
                title: h.title.clone(),
                page: h.page,
                heading: h.heading.clone(),
                char_start: h.char_start,
                char_end: h.char_end,
            });
        }
        for (i, r) in self.readings.iter().enumerate() {
            out.push(Citation::Reading {
                marker: format!("R{}", i + 1),
                device: r.device.clone(),
                machine: r.machine.clone(),
                metric: r.metric.clone(),
                ts: r.ts,
                value: r.value,
                source: "stored",
            });
        }
        for (i, l) in self.live.iter().enumerate() {
            out.push(Citation::Reading {
                marker: format!("L{}", i + 1),
                device: l.device.clone(),
                machine: l.machine.clone(),
                metric: l.metric.clone(),
                ts: l.ts,
                value: l.value,
                source: "live",
            });
        }
        for (i, p) in self.predictions.iter().enumerate() {
            out.push(Citation::Prediction {
                marker: format!("P{}", i + 1),
                prediction_id: p.prediction_id.clone(),
                device: p.device.clone(),
                machine: p.machine.clone(),
                ts: p.ts,
                rul_cycles: p.rul_cycles,
            });
        }
        out
    }

    /// The system message handing the sources to the model.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You are kip's plant assistant. Answer only from the sources below; if they do not \
             answer the question, say so. Mark every fact with the marker of its source in \
             square brackets, e.g. [D1] for a document passage, [R1] for a stored sensor \
             reading, [L1] for a live value, [P1] for a prediction. Answer in the language of \
             the question.\n",
        );
        if !self.live.is_empty() {
            s.push_str("\nLive values (asked from the machines' agents just now):\n");
            for (i, l) in self.live.iter().enumerate() {
                s.push_str(&format!("[L{}] {}\n", i + 1, live_line(l)));
            }
        }
        if !self.readings.is_empty() {
            s.push_str("\nSensor readings (latest, with trend over the hour before):\n");
            for (i, r) in self.readings.iter().enumerate() {
                s.push_str(&format!("[R{}] {}\n", i + 1, reading_line(r)));
            }
        }
        if !self.predictions.is_empty() {
            s.push_str("\nPredictions:\n");
            for (i, p) in self.predictions.iter().enumerate() {
                s.push_str(&format!("[P{}] {}\n", i + 1, prediction_line(p)));
            }
        }
        if !self.passages.is_empty() {
            s.push_str("\nDocument passages:\n");
            for (i, h) in self.passages.iter().enumerate() {
                s.push_str(&format!(
                    "[D{}] {}:\n{}\n",
                    i + 1,
                    passage_source(h),
                    clip(&h.content, PASSAGE_CHARS)
                ));
            }
        }
        if !self.notes.is_empty() {
            s.push_str("\nNotes on the sources:\n");
            for n in &self.notes {
                s.push_str(&format!("- {n}\n"));
            }
        }
        if self.is_empty() {
            s.push_str("\n(No sources were found for this question.)\n");
        }
        s
    }

    /// No passage, reading, live value or prediction.
    pub fn is_empty(&self) -> bool {
        self.passages.is_empty()
            && self.readings.is_empty()
            && self.predictions.is_empty()
            && self.live.is_empty()
    }

    /// The answer assembled from the sources alone (no model reachable), labelled.
    pub fn fallback_answer(&self) -> String {
        let mut s = String::from(
            "No language model was reachable. This answer is assembled automatically from the \
             plant's data and documents (deterministic fallback), without interpretation.\n",
        );
        for n in &self.notes {
            s.push_str(&format!("\nNote: {n}"));
        }
        if !self.notes.is_empty() {
            s.push('\n');
        }
        if self.is_empty() {
            s.push_str("\nNo readings, predictions or document passages match the question.");
            return s;
        }
        if !self.live.is_empty() {
            s.push_str("\nLive values:\n");
            for (i, l) in self.live.iter().enumerate() {
                s.push_str(&format!("- {} [L{}]\n", live_line(l), i + 1));
            }
        }
        if !self.readings.is_empty() {
            s.push_str("\nLatest readings:\n");
            for (i, r) in self.readings.iter().enumerate() {
                s.push_str(&format!("- {} [R{}]\n", reading_line(r), i + 1));
            }
        }
        if !self.predictions.is_empty() {
            s.push_str("\nPredictions:\n");
            for (i, p) in self.predictions.iter().enumerate() {
                s.push_str(&format!("- {} [P{}]\n", prediction_line(p), i + 1));
            }
        }
        if !self.passages.is_empty() {
            s.push_str("\nWhat the documents say:\n");
            for (i, h) in self.passages.iter().enumerate() {
                s.push_str(&format!(
                    "- {}: {} [D{}]\n",
                    passage_source(h),
                    clip(&h.content.replace('\n', " "), 300),
                    i + 1
                ));
            }
        }
        s
    }

    /// The grounding of an answer with `content`: the sources it marks.
    pub fn grounding(&self, content: &str, mode: &'static str) -> Grounding {
        let marked = markers(content);
        let citations: Vec<Citation> = self
            .citations()
            .into_iter()
            .filter(|c| marked.iter().any(|m| m == c.marker()))
            .collect();
        Grounding {
            mode,
            grounded: !citations.is_empty(),
            citations,
            tool_calls: self.tool_calls.clone(),
            notes: self.notes.clone(),
        }
    }
}

fn is_marker(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some('D' | 'R' | 'P' | 'L'))
        && !chars.as_str().is_empty()
        && chars.as_str().chars().all(|c| c.is_ascii_digit())
}

/// `text` with each marker inside square brackets replaced by `f(marker)` (None: removed; a
/// bracket left empty goes, with the space before it). Brackets holding anything but markers
/// are kept as they are.
pub fn rewrite_markers(text: &str, mut f: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inner = &after[..close];
        let parts: Vec<&str> = inner
            .split([',', ';', ' '])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        out.push_str(&rest[..open]);
        if !parts.is_empty() && parts.iter().all(|p| is_marker(p)) {
            let kept: Vec<String> = parts.iter().filter_map(|p| f(p)).collect();
            if kept.is_empty() {
                let trimmed = out.trim_end_matches(' ').len();
                out.truncate(trimmed);
            } else {
                out.push('[');
                out.push_str(&kept.join(", "));
                out.push(']');
            }
        } else {
            out.push('[');
            out.push_str(inner);
            out.push(']');
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The `[D1]`, `[R2]`, `[P3]`, `[L1]` markers in a text (also inside `[D1, R2]`).
pub fn markers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        for part in after[..close].split([',', ';', ' ']) {
            let part = part.trim();
            if is_marker(part) && !out.iter().any(|m| m == part) {
                out.push(part.to_owned());
            }
        }
        rest = &after[close..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_read_from_brackets_only() {
        assert_eq!(
            markers("Hot [R1]. See manual [D2, P1] and [D2]; not D3 or [X1] or [D]."),
            vec!["R1", "D2", "P1"]
        );
        assert!(markers("no sources").is_empty());
    }

    #[test]
    fn markers_are_rewritten_and_unknown_ones_removed() {
        let out = rewrite_markers(
            "Hot [R1]. Manual [D2, D9]. Made up [D7]. Keep [see 3].",
            |m| (m != "D9" && m != "D7").then(|| m.replace('D', "X")),
        );
        assert_eq!(out, "Hot [R1]. Manual [X2]. Made up. Keep [see 3].");
        let ctx = Context {
            live: vec![LiveReading {
                device: "gw".into(),
                machine: "press-1".into(),
                metric: "t".into(),
                value: 1.0,
                ts: chrono::Utc::now(),
                agent_time: chrono::Utc::now(),
                quality: "good",
            }],
            ..Context::default()
        };
        let (text, rejected) = ctx.validate("Now 1 [L1], before [R1], see [D1; L1].");
        assert_eq!(text, "Now 1 [L1], before, see [L1].");
        assert_eq!(rejected, ["R1", "D1"]);
    }

    #[test]
    fn series_named_in_the_question_rank_first() {
        let q = words("Why is spindle temperature on press 1 rising?");
        assert!(
            relevance(&q, &["gw-1", "press-1", "spindle_temp"])
                > relevance(&q, &["gw-1", "press-2", "oil_pressure"])
        );
    }
}
