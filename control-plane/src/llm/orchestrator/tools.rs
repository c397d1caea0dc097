//! The server-side tools a model may call in the tool loop: typed, bounded views of the
//! caller's plant data (latest readings, time-bucketed metric history, predictions and their
//! trend, maintenance events, fleet status) and document search.
//!
//! Invariants:
//! - A [`Toolbox`] is built for one organisation, the caller's (from its API key); no tool has
//!   an organisation argument, so a model cannot reach another organisation's data.
//! - Arguments are parsed into typed structs (`deny_unknown_fields`, bounded numbers and
//!   strings); bad arguments are a [`ToolError`] whose message goes back to the model as the
//!   tool's result, never an HTTP error.
//! - Every result is bounded (row limits here, bytes in the loop), and every item that can be
//!   cited is added to the request's [`Context`] and carries its marker (`R3`, `D2`, `P1`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    documents::{
        Documents,
        grounded::{Context, clip, passage_source, prediction_line, reading_line},
    },
    health::{self, DeviceState, HealthConfig},
    telemetry::latest,
};

/// Longest text argument (machine, metric, query).
const MAX_TEXT_BYTES: usize = 1000;

/// Why a tool call gave the model an error instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("unknown tool {0:?}; the tools are: {TOOL_NAMES}")]
    Unknown(String),
    #[error("bad arguments for {tool}: {message}")]
    BadArguments { tool: String, message: String },
    /// A database or embedding failure; the model gets a generic message, the log the cause.
    #[error("the tool failed on the server")]
    Failed(String),
}

impl ToolError {
    /// The status stored with the call.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Unknown(_) => "unknown_tool",
            Self::BadArguments { .. } => "bad_arguments",
            Self::Failed(_) => "failed",
        }
    }
}

const TOOL_NAMES: &str = "get_latest_readings, get_metric_history, get_predictions, \
                          get_maintenance_events, get_fleet_status, search_documents";

/// The tools of one organisation.
#[derive(Debug, Clone)]
pub struct Toolbox {
    pub pool: PgPool,
    pub docs: Arc<Documents>,
    pub health: HealthConfig,
    /// The caller's organisation; never taken from the model.
    pub org: Uuid,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadingsArgs {
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    metric: Option<String>,
    #[serde(default = "default_rows")]
    limit: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryArgs {
    machine: String,
    metric: String,
    #[serde(default = "default_hours")]
    hours: u32,
    #[serde(default = "default_bucket_minutes")]
    bucket_minutes: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineArgs {
    #[serde(default)]
    machine: Option<String>,
    #[serde(default = "default_rows")]
    limit: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetArgs {
    #[serde(default)]
    state: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    query: String,
    #[serde(default = "default_passages")]
    limit: u32,
}

fn default_rows() -> u32 {
    10
}
fn default_hours() -> u32 {
    24
}
fn default_bucket_minutes() -> u32 {
    60
}
fn default_passages() -> u32 {
    5
}

/// The OpenAI `tools` array describing every tool.
pub fn definitions() -> Value {
    let f = |name: &str, description: &str, parameters: Value| {
        json!({"type": "function", "function": {
            "name": name, "description": description, "parameters": parameters}})
    };
    let text = |d: &str| json!({"type": "string", "description": d, "maxLength": MAX_TEXT_BYTES});
    let int = |d: &str, min: u32, max: u32| json!({"type": "integer", "description": d, "minimum": min, "maximum": max});
    json!([
        f(
            "get_latest_readings",
            "Latest sensor reading of each series (device, machine, metric) with its trend over \
             the hour before. Filters match parts of names, case-insensitively.",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "machine": text("machine name or part of it, e.g. press-1"),
                "metric": text("metric name or part of it, e.g. spindle_temp"),
                "limit": int("series to return", 1, 50)}})
        ),
        f(
            "get_metric_history",
            "Time-bucketed history (avg, min, max, count per bucket) of one metric of one \
             machine, newest bucket last.",
            json!({"type": "object", "additionalProperties": false,
                "required": ["machine", "metric"], "properties": {
                "machine": text("exact machine name"),
                "metric": text("exact metric name"),
                "hours": int("how far back", 1, 720),
                "bucket_minutes": int("bucket width", 1, 1440)}})
        ),
        f(
            "get_predictions",
            "Latest remaining-useful-life / anomaly prediction of each machine, with the trend \
             of its last predictions.",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "machine": text("machine name or part of it"),
                "limit": int("machines to return", 1, 50)}})
        ),
        f(
            "get_maintenance_events",
            "Recorded maintenance events (failures, repairs, inspections), newest first.",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "machine": text("exact machine name"),
                "limit": int("events to return", 1, 50)}})
        ),
        f(
            "get_fleet_status",
            "Edge devices with their connection state (ONLINE, STALE, OFFLINE), worst first.",
            json!({"type": "object", "additionalProperties": false, "properties": {
                "state": {"type": "string", "enum": ["ONLINE", "STALE", "OFFLINE"]}}})
        ),
        f(
            "search_documents",
            "Searches the organisation's manuals and procedures (any language); returns passages \
             with their document, page and section.",
            json!({"type": "object", "additionalProperties": false, "required": ["query"],
                "properties": {
                "query": text("what to look for"),
                "limit": int("passages to return", 1, 8)}})
        ),
    ])
}

fn parse<T: DeserializeOwned>(tool: &str, args: &str) -> Result<T, ToolError> {
    let args = if args.trim().is_empty() { "{}" } else { args };
    serde_json::from_str(args).map_err(|e| ToolError::BadArguments {
        tool: tool.to_owned(),
        message: e.to_string(),
    })
}

fn bad(tool: &str, message: impl Into<String>) -> ToolError {
    ToolError::BadArguments {
        tool: tool.to_owned(),
        message: message.into(),
    }
}

fn check_text(tool: &str, field: &str, v: &str) -> Result<(), ToolError> {
    if v.is_empty() || v.len() > MAX_TEXT_BYTES || v.contains('\0') {
        return Err(bad(
            tool,
            format!("{field} must be 1 to {MAX_TEXT_BYTES} bytes, without NUL"),
        ));
    }
    Ok(())
}

fn check_range(tool: &str, field: &str, v: u32, min: u32, max: u32) -> Result<(), ToolError> {
    if (min..=max).contains(&v) {
        Ok(())
    } else {
        Err(bad(
            tool,
            format!("{field} must be between {min} and {max}, got {v}"),
        ))
    }
}

fn contains(hay: &str, needle: Option<&str>) -> bool {
    needle.is_none_or(|n| hay.to_lowercase().contains(&n.to_lowercase()))
}

fn failed(e: impl std::fmt::Display) -> ToolError {
    ToolError::Failed(e.to_string())
}

#[derive(sqlx::FromRow)]
struct Bucket {
    bucket: DateTime<Utc>,
    avg: f64,
    min: f64,
    max: f64,
    count: i64,
}

#[derive(sqlx::FromRow)]
struct Event {
    machine: String,
    kind: String,
    ts: DateTime<Utc>,
    note: Option<String>,
}

#[derive(sqlx::FromRow)]
struct PredictionPoint {
    machine: String,
    ts: DateTime<Utc>,
    rul_cycles: f64,
    anomaly_score: Option<f64>,
}

impl Toolbox {
    /// Runs tool `name` with the model's JSON `args`; citable items are added to `ctx`.
    pub async fn call(
        &self,
        name: &str,
        args: &str,
        ctx: &mut Context,
    ) -> Result<Value, ToolError> {
        match name {
            "get_latest_readings" => self.latest_readings(parse(name, args)?, ctx).await,
            "get_metric_history" => self.metric_history(parse(name, args)?).await,
            "get_predictions" => self.predictions(parse(name, args)?, ctx).await,
            "get_maintenance_events" => self.maintenance(parse(name, args)?).await,
            "get_fleet_status" => self.fleet(parse(name, args)?).await,
            "search_documents" => self.search(parse(name, args)?, ctx).await,
            other => Err(ToolError::Unknown(clip(other, 64))),
        }
    }

    async fn latest_readings(
        &self,
        a: ReadingsArgs,
        ctx: &mut Context,
    ) -> Result<Value, ToolError> {
        let t = "get_latest_readings";
        for (f, v) in [("machine", &a.machine), ("metric", &a.metric)] {
            if let Some(v) = v {
                check_text(t, f, v)?;
            }
        }
        check_range(t, "limit", a.limit, 1, 50)?;
        let rows = latest::latest_readings(&self.pool, self.org, 500)
            .await
            .map_err(failed)?;
        let mut out = Vec::new();
        for r in rows
            .into_iter()
            .filter(|r| contains(&r.machine, a.machine.as_deref()))
            .filter(|r| contains(&r.metric, a.metric.as_deref()))
            .take(a.limit as usize)
        {
            let line = reading_line(&r);
            let marker = ctx.add_reading(r);
            out.push(json!({"marker": marker, "reading": line}));
        }
        Ok(json!({"readings": out}))
    }

    async fn metric_history(&self, a: HistoryArgs) -> Result<Value, ToolError> {
        let t = "get_metric_history";
        check_text(t, "machine", &a.machine)?;
        check_text(t, "metric", &a.metric)?;
        check_range(t, "hours", a.hours, 1, 720)?;
        check_range(t, "bucket_minutes", a.bucket_minutes, 1, 1440)?;
        // At most 200 buckets: the newest ones.
        let rows: Vec<Bucket> = sqlx::query_as(
            "SELECT * FROM (SELECT date_bin(make_interval(mins => $4), ts, \
                    TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, \
                    avg(value) AS avg, min(value) AS min, max(value) AS max, count(*) AS count \
             FROM sensor_data WHERE org_id = $1 AND machine = $2 AND metric = $3 \
               AND ts > now() - make_interval(hours => $5) \
             GROUP BY 1 ORDER BY 1 DESC LIMIT 200) b ORDER BY bucket",
        )
        .bind(self.org)
        .bind(&a.machine)
        .bind(&a.metric)
        .bind(a.bucket_minutes as i32)
        .bind(a.hours as i32)
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        let buckets: Vec<Value> = rows
            .iter()
            .map(|b| {
                json!({"bucket_start": b.bucket.to_rfc3339(), "avg": b.avg, "min": b.min,
                       "max": b.max, "count": b.count})
            })
            .collect();
        Ok(json!({"machine": a.machine, "metric": a.metric,
                  "bucket_minutes": a.bucket_minutes, "buckets": buckets}))
    }

    async fn predictions(&self, a: MachineArgs, ctx: &mut Context) -> Result<Value, ToolError> {
        let t = "get_predictions";
        if let Some(m) = &a.machine {
            check_text(t, "machine", m)?;
        }
        check_range(t, "limit", a.limit, 1, 50)?;
        let latest = latest::latest_predictions(&self.pool, self.org, 100)
            .await
            .map_err(failed)?;
        let chosen: Vec<_> = latest
            .into_iter()
            .filter(|p| contains(&p.machine, a.machine.as_deref()))
            .take(a.limit as usize)
            .collect();
        let machines: Vec<String> = chosen.iter().map(|p| p.machine.clone()).collect();
        // The trend: the last 5 predictions of each chosen machine.
        let trend: Vec<PredictionPoint> = sqlx::query_as(
            "SELECT machine, ts, rul_cycles, anomaly_score FROM ( \
                SELECT machine, ts, rul_cycles, anomaly_score, \
                       row_number() OVER (PARTITION BY machine ORDER BY ts DESC) AS n \
                FROM predictions WHERE org_id = $1 AND machine = ANY($2) \
                  AND ts > now() - interval '30 days') x \
             WHERE n <= 5 ORDER BY machine, ts",
        )
        .bind(self.org)
        .bind(&machines)
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        let mut out = Vec::new();
        for p in chosen {
            let line = prediction_line(&p);
            let points: Vec<Value> = trend
                .iter()
                .filter(|x| x.machine == p.machine)
                .map(|x| {
                    json!({"ts": x.ts.to_rfc3339(), "rul_cycles": x.rul_cycles,
                                "anomaly_score": x.anomaly_score})
                })
                .collect();
            let id = p.prediction_id.clone();
            let marker = ctx.add_prediction(p);
            out.push(
                json!({"marker": marker, "prediction_id": id, "prediction": line,
                            "trend": points}),
            );
        }
        Ok(json!({"predictions": out}))
    }

    async fn maintenance(&self, a: MachineArgs) -> Result<Value, ToolError> {
        let t = "get_maintenance_events";
        if let Some(m) = &a.machine {
            check_text(t, "machine", m)?;
        }
        check_range(t, "limit", a.limit, 1, 50)?;
        let rows: Vec<Event> = sqlx::query_as(
            "SELECT machine, kind, ts, note FROM maintenance_events \
             WHERE org_id = $1 AND ($2::text IS NULL OR machine = $2) \
             ORDER BY ts DESC LIMIT $3",
        )
        .bind(self.org)
        .bind(&a.machine)
        .bind(i64::from(a.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(failed)?;
        let events: Vec<Value> = rows
            .iter()
            .map(|e| {
                json!({"machine": e.machine, "kind": e.kind, "ts": e.ts.to_rfc3339(),
                            "note": e.note.as_deref().map(|n| clip(n, 300))})
            })
            .collect();
        Ok(json!({"events": events}))
    }

    async fn fleet(&self, a: FleetArgs) -> Result<Value, ToolError> {
        let t = "get_fleet_status";
        let state = match a.state.as_deref() {
            None => None,
            Some(s) => Some(
                DeviceState::parse(s)
                    .ok_or_else(|| bad(t, "state must be ONLINE, STALE or OFFLINE"))?,
            ),
        };
        let f = health::fleet(&self.pool, &self.health, self.org, state, None, 50)
            .await
            .map_err(failed)?;
        let devices: Vec<Value> = f
            .devices
            .iter()
            .map(|d| {
                json!({"device": d.name, "state": d.state,
                            "seconds_since_contact": d.seconds_since_contact})
            })
            .collect();
        Ok(json!({"counts": f.counts, "devices": devices}))
    }

    async fn search(&self, a: SearchArgs, ctx: &mut Context) -> Result<Value, ToolError> {
        let t = "search_documents";
        check_text(t, "query", &a.query)?;
        check_range(t, "limit", a.limit, 1, 8)?;
        let hits = self
            .docs
            .search(&self.pool, self.org, &a.query, a.limit as usize)
            .await
            .map_err(failed)?;
        let mut out = Vec::new();
        for h in hits {
            let source = passage_source(&h);
            let text = clip(&h.content, 700);
            let marker = ctx.add_passage(h);
            out.push(json!({"marker": marker, "source": source, "text": text}));
        }
        Ok(json!({"passages": out}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defined_tool_is_dispatched_and_named_in_errors() {
        let defs = definitions();
        let names: Vec<&str> = defs
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.pointer("/function/name").and_then(Value::as_str))
            .collect();
        assert_eq!(names.join(", "), TOOL_NAMES);
    }

    #[test]
    fn bad_arguments_name_the_problem() {
        let e = parse::<HistoryArgs>("get_metric_history", "{\"machine\": 3}").unwrap_err();
        assert_eq!(e.status(), "bad_arguments");
        assert!(e.to_string().contains("get_metric_history"), "{e}");
        let e = parse::<FleetArgs>("get_fleet_status", "{\"org_id\": \"x\"}").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(check_range("t", "limit", 0, 1, 50).is_err());
    }
}
