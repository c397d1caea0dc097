//! The hybrid orchestrator's fan-out: every source of the plant asked at once for one
//! question, under one deadline (`llm.orchestrator.sources_timeout_ms`):
//!
//! - document retrieval ([`grounded::find_passages`]),
//! - stored readings and their trend ([`grounded::find_readings`]), and, as soon as they name
//!   the question's machines, the **live machine adapter**: the agents of those machines asked
//!   for their current values over MQTT (Aleph's [`LiveClient`], when
//!   `[llm.providers.<aleph>.mqtt]` is configured),
//! - the custom model's latest predictions ([`grounded::find_predictions`]).
//!
//! Invariants:
//! - The whole fan-out ends by its deadline: a source still running then is dropped (its MQTT
//!   requests leave the pending map through their drop guard) and the answer says so in a
//!   note; a source that fails does not fail the request either (a note, status `failed`).
//! - Live requests go only to the caller's organisation's topics ([`LiveClient::ask`] with the
//!   toolbox's organisation) and only to devices whose stored series the question names (at
//!   most the Aleph provider's `max_devices_per_question`), so a question never broadcasts.
//! - An agent that does not answer in time leaves the stored readings of its machines in the
//!   context, with a note naming the device and why; live values are cited as readings with
//!   `source: "live"` (marker `L`), stored ones with `source: "stored"` (marker `R`).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use kip_shared::Quality;
use tokio::time::timeout_at;
use uuid::Uuid;

use super::tools::Toolbox;
use crate::{
    documents::grounded::{self, Context, LiveReading, MAX_SERIES, ToolCall, relevance, words},
    llm::live::LiveClient,
    telemetry::latest::LatestReading,
};

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A source that did not deliver: its summary with `status`, and the note for the answer.
fn missing(tool: &str, started: Instant, status: &'static str, note: String) -> (ToolCall, String) {
    let mut c = ToolCall::summary(tool, 0, ms(started));
    c.status = status;
    (c, note)
}

/// Gathers the context of `question` for the toolbox's organisation: all sources at once,
/// finished or dropped by `started + timeout`.
pub async fn gather(
    toolbox: &Toolbox,
    live: Option<&LiveClient>,
    question: &str,
    timeout: Duration,
) -> Context {
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + timeout);
    let (pool, org) = (&toolbox.pool, toolbox.org);
    let limit_ms = timeout.as_millis();
    let late = |what: &str| {
        format!(
            "{what} did not finish within the source deadline of {limit_ms} ms; answered without it"
        )
    };
    let failed = |what: &str| format!("{what} failed on the server; answered without it");

    let passages = timeout_at(
        deadline,
        grounded::find_passages(&toolbox.docs, pool, org, question),
    );
    let predictions = timeout_at(deadline, grounded::find_predictions(pool, org, question));
    // Stored readings first: they tell which devices carry the machines the question names;
    // those devices are then asked live, within the same deadline.
    let readings_then_live = async {
        let stored = timeout_at(deadline, grounded::find_readings(pool, org, question)).await;
        let live = match (&stored, live) {
            (Ok(Ok((readings, _))), Some(client)) => {
                Some(live_values(client, org, question, readings, deadline).await)
            }
            _ => None,
        };
        (stored, live)
    };
    let (passages, (stored, live), predictions) =
        tokio::join!(passages, readings_then_live, predictions);

    let mut ctx = Context::default();
    match passages {
        Ok(Ok((p, c))) => {
            ctx.passages = p;
            ctx.tool_calls.push(c);
        }
        Ok(Err(e)) => {
            tracing::warn!(%org, error = %e, "hybrid: document search failed");
            let (c, n) = missing(
                "search_documents",
                started,
                "failed",
                failed("document search"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
        Err(_) => {
            let (c, n) = missing(
                "search_documents",
                started,
                "timeout",
                late("document search"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
    }
    match stored {
        Ok(Ok((r, c))) => {
            ctx.readings = r;
            ctx.tool_calls.push(c);
        }
        Ok(Err(e)) => {
            tracing::warn!(%org, error = %e, "hybrid: reading the stored readings failed");
            let (c, n) = missing(
                "latest_readings",
                started,
                "failed",
                failed("the stored readings"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
        Err(_) => {
            let (c, n) = missing(
                "latest_readings",
                started,
                "timeout",
                late("the stored readings"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
    }
    if let Some(l) = live {
        ctx.live = l.values;
        ctx.notes.extend(l.notes);
        ctx.tool_calls.push(l.call);
    }
    match predictions {
        Ok(Ok((p, c))) => {
            ctx.predictions = p;
            ctx.tool_calls.push(c);
        }
        Ok(Err(e)) => {
            tracing::warn!(%org, error = %e, "hybrid: reading the predictions failed");
            let (c, n) = missing(
                "latest_predictions",
                started,
                "failed",
                failed("the predictions"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
        Err(_) => {
            let (c, n) = missing(
                "latest_predictions",
                started,
                "timeout",
                late("the predictions"),
            );
            ctx.tool_calls.push(c);
            ctx.notes.push(n);
        }
    }
    tracing::debug!(%org, tools = ?ctx.tool_calls, notes = ?ctx.notes, "hybrid sources ran");
    ctx
}

/// What the live machine adapter found.
struct Live {
    values: Vec<LiveReading>,
    notes: Vec<String>,
    call: ToolCall,
}

/// The devices to ask: those of the stored series whose device or machine the question
/// names, in the series' order, at most `max`.
fn devices_to_ask(q: &[String], stored: &[LatestReading], max: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in stored {
        if relevance(q, &[&r.device, &r.machine]) > 0 && !out.contains(&r.device) {
            out.push(r.device.clone());
        }
    }
    out.truncate(max);
    out
}

fn quality(q: Quality) -> &'static str {
    match q {
        Quality::Good => "good",
        Quality::Uncertain => "uncertain",
        Quality::Bad => "bad",
    }
}

/// Asks the devices of the machines `question` names for their current values, all at once,
/// until `deadline` (each ask is also bounded by the client's `request_timeout_ms`).
async fn live_values(
    client: &LiveClient,
    org: Uuid,
    question: &str,
    stored: &[LatestReading],
    deadline: tokio::time::Instant,
) -> Live {
    let started = Instant::now();
    let q = words(question);
    let devices = devices_to_ask(&q, stored, client.config().max_devices_per_question);
    let mut call = ToolCall::summary("live_values", 0, 0.0);
    if devices.is_empty() {
        call.latency_ms = ms(started);
        return Live {
            values: Vec::new(),
            notes: Vec::new(),
            call,
        };
    }
    // The machines the question names (of the stored series): live values of other machines
    // on the same device are not this question's.
    let machines: BTreeSet<&str> = stored
        .iter()
        .filter(|r| relevance(&q, &[&r.device, &r.machine]) > 0)
        .map(|r| r.machine.as_str())
        .collect();
    let asks = devices
        .iter()
        .map(|d| timeout_at(deadline, client.ask(org, d)));
    let answers = futures_util::future::join_all(asks).await;
    let mut values = Vec::new();
    let mut notes = Vec::new();
    let mut answered = 0;
    let mut timed_out = 0;
    for (device, a) in devices.iter().zip(answers) {
        match a {
            Ok(Ok(resp)) => {
                answered += 1;
                let mut mine: Vec<LiveReading> = resp
                    .values
                    .iter()
                    .filter(|v| machines.contains(v.machine.as_str()))
                    .map(|v| LiveReading {
                        device: resp.device.clone(),
                        machine: v.machine.clone(),
                        metric: v.metric.clone(),
                        value: v.value,
                        ts: v.ts,
                        agent_time: resp.agent_time,
                        quality: quality(v.quality),
                    })
                    .collect();
                if mine.is_empty() {
                    notes.push(format!(
                        "{device} answered live but reported no current value of {}",
                        machines.iter().copied().collect::<Vec<_>>().join(", ")
                    ));
                }
                values.append(&mut mine);
            }
            Ok(Err(why)) => {
                timed_out += usize::from(matches!(why, crate::llm::live::LiveFailure::Timeout(_)));
                notes.push(format!(
                    "{device} {why}; its stored readings are used instead"
                ));
            }
            Err(_) => {
                timed_out += 1;
                notes.push(format!(
                    "{device} did not answer live within the source deadline; its stored \
                     readings are used instead"
                ));
            }
        }
    }
    values.sort_by_key(|v| std::cmp::Reverse(relevance(&q, &[&v.machine, &v.metric])));
    values.truncate(MAX_SERIES);
    call.results = values.len();
    call.latency_ms = ms(started);
    call.status = if answered > 0 {
        "ok"
    } else if timed_out > 0 {
        "timeout"
    } else {
        "failed"
    };
    Live {
        values,
        notes,
        call,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, machine: &str, metric: &str) -> LatestReading {
        LatestReading {
            device: device.into(),
            machine: machine.into(),
            metric: metric.into(),
            ts: chrono::Utc::now(),
            value: 1.0,
            earlier_ts: None,
            earlier_value: None,
        }
    }

    #[test]
    fn only_devices_of_named_machines_are_asked_once_each() {
        let q = words("Why is spindle temperature on press 1 rising?");
        let stored = [
            reading("gw-a", "press-1", "spindle_temp"),
            reading("gw-a", "press-1", "load"),
            reading("gw-b", "oven-3", "temperature"),
            reading("gw-c", "press-1", "vibration"),
        ];
        assert_eq!(devices_to_ask(&q, &stored, 8), ["gw-a", "gw-c"]);
        assert_eq!(devices_to_ask(&q, &stored, 1), ["gw-a"]);
        let q = words("How warm is it?");
        assert!(devices_to_ask(&q, &stored, 8).is_empty());
    }
}
