//! AIX Aleph: grounded answers about the organisation's machines.
//!
//! Without `[llm.providers.<aleph>.mqtt]` the answer lists the latest synced `sensor_data`
//! rows of the organisation. With it, Aleph picks the organisation's devices (those named in
//! the question, else the ones that synced most recently, at most `max_devices_per_question`),
//! asks them all at once over MQTT ([`super::live`]), waits up to `request_timeout_ms`, and
//! answers each device from its live values ("live from <device> at <agent time>") or, when it
//! did not answer, from synced data with a note saying so and how old that data is.
//!
//! Invariants:
//! - Every query filters by the caller's `org_id` (from the API key, through `CallCtx`), and
//!   live requests go only to that organisation's topics.
//! - A question takes at most `request_timeout_ms` of waiting for agents, whatever their number.
//! - The text says where each value comes from (live or synced) and when it was measured.
//! - Synced values are read from a bounded window only (the last [`ALEPH_WINDOW_HOURS`] hours,
//!   by the `(org, device, machine, metric, ts)` index), never by `DISTINCT ON` over an
//!   organisation's whole history, and each read stops after [`ALEPH_QUERY_TIMEOUT_MS`]
//!   (`SET LOCAL statement_timeout`): one organisation's long history cannot make every
//!   Aleph answer slow.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use kip_shared::live::LiveResponse;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::{
    config::ProviderConfig,
    live::{LiveClient, LiveFailure},
    metrics::LlmMetrics,
    provider::{
        CallCtx, ChunkStream, Completion, Provider, ProviderError, Usage, completion_json,
        single_stream,
    },
};

/// Readings summarised per answer, newest per (device, machine, metric).
const ALEPH_MAX_ROWS: i64 = 200;
/// How far back synced values are looked for; older series are not shown.
pub const ALEPH_WINDOW_HOURS: i64 = 24;
/// Longest a synced-data read may run.
pub const ALEPH_QUERY_TIMEOUT_MS: u64 = 3_000;
/// Devices considered when matching names in a question.
const ALEPH_MAX_DEVICES_SCANNED: i64 = 10_000;

/// AIX Aleph: grounded answers about the organisation's machines from live sensor data.
#[derive(Debug, Clone)]
pub struct AlephProvider {
    live: Option<Arc<LiveClient>>,
}

#[derive(sqlx::FromRow)]
struct Latest {
    device: String,
    machine: String,
    metric: String,
    value: f64,
    ts: DateTime<Utc>,
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn db_error(e: &sqlx::Error) -> ProviderError {
    tracing::warn!(error = %e, "aleph: reading sensor data failed");
    ProviderError::Server {
        status: 503,
        message: "machine data is unavailable".into(),
    }
}

/// The lowercased words of the last user message (names keep `-`, `_` and `.`).
fn question_words(body: &Map<String, Value>) -> Vec<String> {
    let question = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_lowercase();
    question
        .split(|c: char| !c.is_alphanumeric() && c != '-' && c != '_' && c != '.')
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| w.len() > 1)
        .map(str::to_owned)
        .collect()
}

fn named(words: &[String], name: &str) -> bool {
    let n = name.to_lowercase();
    words.contains(&n)
}

/// The items a question names (by machine or metric); all of them when it names none.
fn focus<'a, T>(items: &'a [T], words: &[String], key: impl Fn(&T) -> [&str; 2]) -> Vec<&'a T> {
    let hit: Vec<&T> = items
        .iter()
        .filter(|i| key(i).iter().any(|k| named(words, k)))
        .collect();
    if hit.is_empty() {
        items.iter().collect()
    } else {
        hit
    }
}

fn synced_line(r: &Latest) -> String {
    let machine = if r.machine.is_empty() {
        String::new()
    } else {
        format!(" machine {}", r.machine)
    };
    format!(
        "- device {}{machine}: {} = {} at {}\n",
        r.device,
        r.metric,
        r.value,
        time(r.ts)
    )
}

fn live_section(resp: &LiveResponse, words: &[String]) -> String {
    let mut s = format!("live from {} at {}:\n", resp.device, time(resp.agent_time));
    let values = focus(&resp.values, words, |v| [&v.machine, &v.metric]);
    if values.is_empty() {
        s.push_str("- the agent reports no current values\n");
    }
    for v in values {
        let quality = match v.quality {
            kip_shared::Quality::Good => "good",
            kip_shared::Quality::Uncertain => "uncertain",
            kip_shared::Quality::Bad => "bad",
        };
        s.push_str(&format!(
            "- machine {}: {} = {} (source time {}, quality {quality})\n",
            v.machine,
            v.metric,
            v.value,
            time(v.ts)
        ));
    }
    for p in focus(&resp.predictions, words, |p| [&p.machine, ""]) {
        let anomaly = p
            .anomaly_score
            .map(|a| format!(", anomaly score {a}"))
            .unwrap_or_default();
        s.push_str(&format!(
            "- machine {}: predicted remaining useful life {} cycles{anomaly} (model {}, at {})\n",
            p.machine,
            p.rul_cycles,
            p.model_version,
            time(p.ts)
        ));
    }
    if resp.truncated {
        s.push_str("- (the agent left some values out to keep its answer small)\n");
    }
    s
}

fn synced_section(device: &str, why: &LiveFailure, rows: &[&Latest], words: &[String]) -> String {
    let Some(newest) = rows.iter().map(|r| r.ts).max() else {
        return format!("{device} {why}; there is no synced data from it either.\n");
    };
    let mut s = format!(
        "{device} {why}; values below are from synced data as of {}:\n",
        time(newest)
    );
    let owned: Vec<&Latest> = rows.to_vec();
    for r in focus(&owned, words, |r| [&r.machine, &r.metric]) {
        s.push_str(&synced_line(r));
    }
    s
}

impl AlephProvider {
    /// Builds the provider; with an `mqtt` section its client is created here and started by
    /// [`AlephProvider::start`].
    pub fn new(cfg: &ProviderConfig, metrics: &LlmMetrics) -> Self {
        Self {
            live: cfg
                .mqtt
                .clone()
                .map(|m| LiveClient::new(m, metrics.clone())),
        }
    }

    /// Starts the MQTT connection (if configured) on `tracker`; it ends when `token` fires.
    pub fn start(
        &self,
        tracker: &tokio_util::task::TaskTracker,
        token: &tokio_util::sync::CancellationToken,
    ) {
        if let Some(l) = &self.live {
            tracker.spawn(l.clone().run(token.clone()));
        }
    }

    /// The live-query client, when configured.
    pub fn live(&self) -> Option<&Arc<LiveClient>> {
        self.live.as_ref()
    }

    async fn synced_rows(
        ctx: CallCtx<'_>,
        devices: Option<&[Uuid]>,
    ) -> Result<Vec<Latest>, ProviderError> {
        let mut tx = ctx.pool.begin().await.map_err(|e| db_error(&e))?;
        sqlx::query("SELECT set_config('statement_timeout', $1, true)")
            .bind(ALEPH_QUERY_TIMEOUT_MS.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error(&e))?;
        let q = match devices {
            None => sqlx::query_as(
                "SELECT d.name AS device, l.machine, l.metric, l.value, l.ts FROM ( \
                   SELECT DISTINCT ON (device_id, machine, metric) device_id, machine, metric, value, ts \
                   FROM sensor_data WHERE org_id = $1 AND ts >= now() - make_interval(hours => $3) \
                   ORDER BY device_id, machine, metric, ts DESC) l \
                 JOIN devices d ON d.id = l.device_id AND d.org_id = $1 \
                 ORDER BY d.name, l.machine, l.metric LIMIT $2",
            )
            .bind(ctx.org_id)
            .bind(ALEPH_MAX_ROWS)
            .bind(ALEPH_WINDOW_HOURS as i32),
            Some(ids) => sqlx::query_as(
                "SELECT d.name AS device, l.machine, l.metric, l.value, l.ts FROM ( \
                   SELECT DISTINCT ON (device_id, machine, metric) device_id, machine, metric, value, ts \
                   FROM sensor_data WHERE org_id = $1 AND device_id = ANY($3) \
                     AND ts >= now() - make_interval(hours => $4) \
                   ORDER BY device_id, machine, metric, ts DESC) l \
                 JOIN devices d ON d.id = l.device_id AND d.org_id = $1 \
                 ORDER BY d.name, l.machine, l.metric LIMIT $2",
            )
            .bind(ctx.org_id)
            .bind(ALEPH_MAX_ROWS)
            .bind(ids.to_vec())
            .bind(ALEPH_WINDOW_HOURS as i32),
        };
        q.fetch_all(&mut *tx).await.map_err(|e| db_error(&e))
    }

    /// Today's answer without MQTT: the latest synced rows the question names (all otherwise).
    async fn synced_answer(ctx: CallCtx<'_>, words: &[String]) -> Result<String, ProviderError> {
        let rows = Self::synced_rows(ctx, None).await?;
        let named: Vec<&Latest> = rows
            .iter()
            .filter(|r| {
                named(words, &r.device) || named(words, &r.machine) || named(words, &r.metric)
            })
            .collect();
        let shown: Vec<&Latest> = if named.is_empty() {
            rows.iter().collect()
        } else {
            named
        };
        if shown.is_empty() {
            return Ok(
                "AIX Aleph: no sensor data has been received from this organisation's devices yet."
                    .to_owned(),
            );
        }
        let mut s = format!(
            "AIX Aleph, from live machine data ({} latest readings):\n",
            shown.len()
        );
        for r in shown {
            s.push_str(&synced_line(r));
        }
        Ok(s)
    }

    /// The devices to ask: those the question names, else the most recently synced ones.
    async fn pick_devices(
        ctx: CallCtx<'_>,
        words: &[String],
        max: usize,
    ) -> Result<Vec<(Uuid, String)>, ProviderError> {
        let all: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, name FROM devices WHERE org_id = $1 \
             ORDER BY last_seen_at DESC NULLS LAST, name LIMIT $2",
        )
        .bind(ctx.org_id)
        .bind(ALEPH_MAX_DEVICES_SCANNED)
        .fetch_all(ctx.pool)
        .await
        .map_err(|e| db_error(&e))?;
        let mut picked: Vec<(Uuid, String)> = all
            .iter()
            .filter(|(_, n)| named(words, n))
            .cloned()
            .collect();
        if picked.is_empty() {
            picked = all;
        }
        picked.truncate(max);
        picked.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(picked)
    }

    async fn live_answer(
        &self,
        live: &LiveClient,
        ctx: CallCtx<'_>,
        words: &[String],
    ) -> Result<String, ProviderError> {
        let devices =
            Self::pick_devices(ctx, words, live.config().max_devices_per_question).await?;
        if devices.is_empty() {
            return Ok("AIX Aleph: this organisation has no devices yet.".to_owned());
        }
        let asks = devices.iter().map(|(_, name)| live.ask(ctx.org_id, name));
        // Synced rows are read while the agents answer.
        let ids: Vec<Uuid> = devices.iter().map(|(id, _)| *id).collect();
        let (answers, rows) = tokio::join!(
            futures_util::future::join_all(asks),
            Self::synced_rows(ctx, Some(&ids))
        );
        let rows = rows?;
        let mut by_device: BTreeMap<&str, Vec<&Latest>> = BTreeMap::new();
        for r in &rows {
            by_device.entry(r.device.as_str()).or_default().push(r);
        }
        let live_count = answers.iter().filter(|a| a.is_ok()).count();
        let mut s = format!(
            "AIX Aleph, from live machine data ({live_count} of {} devices answered over MQTT):\n",
            devices.len()
        );
        for ((_, name), answer) in devices.iter().zip(&answers) {
            match answer {
                Ok(resp) => s.push_str(&live_section(resp, words)),
                Err(why) => s.push_str(&synced_section(
                    name,
                    why,
                    by_device.get(name.as_str()).map_or(&[][..], Vec::as_slice),
                    words,
                )),
            }
        }
        Ok(s)
    }

    async fn answer(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<Completion, ProviderError> {
        let words = question_words(body);
        let content = match &self.live {
            Some(live) => self.live_answer(live, ctx, &words).await?,
            None => Self::synced_answer(ctx, &words).await?,
        };
        Ok(Completion {
            body: completion_json(model, &content, Usage::default()),
            usage: Usage::default(),
        })
    }
}

impl Provider for AlephProvider {
    async fn complete(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<Completion, ProviderError> {
        self.answer(ctx, model, body).await
    }

    async fn stream(
        &self,
        ctx: CallCtx<'_>,
        model: &str,
        body: &Map<String, Value>,
    ) -> Result<ChunkStream, ProviderError> {
        let c = self.answer(ctx, model, body).await?;
        Ok(single_stream(&c))
    }
}

#[cfg(test)]
mod tests {
    use kip_shared::{
        Quality,
        live::{LIVE_PROTOCOL_VERSION, LivePrediction, LiveValue},
    };

    use super::*;

    fn words(q: &str) -> Vec<String> {
        let mut body = Map::new();
        body.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": q}]),
        );
        question_words(&body)
    }

    #[test]
    fn question_words_keep_device_names_whole() {
        assert_eq!(
            words("How hot is press-1 on gw-1.plant?"),
            vec!["how", "hot", "is", "press-1", "on", "gw-1.plant"]
        );
        assert_eq!(words("Status of gw-2."), vec!["status", "of", "gw-2"]);
    }

    #[test]
    fn live_sections_are_labelled_with_device_and_agent_time() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let resp = LiveResponse {
            v: LIVE_PROTOCOL_VERSION,
            request_id: Uuid::nil(),
            org_id: Uuid::nil(),
            device: "gw-1".into(),
            agent_time: t,
            values: vec![LiveValue {
                source: "site".into(),
                machine: "press-1".into(),
                metric: "temperature".into(),
                value: 77.25,
                ts: t,
                quality: Quality::Good,
            }],
            predictions: vec![LivePrediction {
                machine: "press-1".into(),
                model_version: "3".into(),
                ts: t,
                rul_cycles: 120.5,
                anomaly_score: Some(0.25),
            }],
            truncated: false,
        };
        let s = live_section(&resp, &words("how is press-1"));
        assert!(
            s.starts_with("live from gw-1 at 2027-01-15T08:00:00Z:"),
            "{s}"
        );
        assert!(s.contains("temperature = 77.25"), "{s}");
        assert!(
            s.contains("remaining useful life 120.5 cycles, anomaly score 0.25"),
            "{s}"
        );
    }

    #[test]
    fn silent_devices_get_a_note_with_the_age_of_the_synced_data() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let row = Latest {
            device: "gw-2".into(),
            machine: "m1".into(),
            metric: "temperature".into(),
            value: 40.0,
            ts: t,
        };
        let s = synced_section("gw-2", &LiveFailure::Timeout(2000), &[&row], &[]);
        assert!(
            s.starts_with(
                "gw-2 did not answer within 2000 ms over MQTT; values below are from synced \
                 data as of 2027-01-15T08:00:00Z:"
            ),
            "{s}"
        );
        assert!(s.contains("temperature = 40"), "{s}");
        let s = synced_section("gw-3", &LiveFailure::NotConnected, &[], &[]);
        assert!(
            s.contains("not connected") && s.contains("no synced data"),
            "{s}"
        );
    }
}
