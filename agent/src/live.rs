//! Live query responder: answers the control plane's "what are your current values?" requests
//! over MQTT (wire format and topics in [`kip_shared::live`]).
//!
//! The buffer writer offers every reading (OPC UA and MQTT alike) to [`LiveValues`], which
//! keeps the newest value per (machine, metric); predictions come from the inference task's
//! latest-per-machine map. The responder subscribes (QoS 1) to
//! `{prefix}/{org_id}/{device}/live/req` and publishes each answer (QoS 1) to the request's
//! `reply_to`.
//!
//! Invariants:
//! - Outside bytes never panic or stop the responder: an oversized, non-JSON, wrong-version or
//!   otherwise invalid request is counted (`kip_agent_live_requests_total{outcome="malformed"}`)
//!   and logged with the problem, then skipped.
//! - The agent answers only requests addressed to its own organisation and device, and only to
//!   a reply topic under `{prefix}/{its org_id}/`; anything else is counted as `foreign` and
//!   dropped, so a request can never make an agent publish into another organisation's topics.
//! - Memory is bounded: at most `max_tracked_values` (machine, metric) pairs; readings of new
//!   pairs beyond that are counted (`kip_agent_live_values_dropped_total`) and not remembered.
//!   Answers are bounded by [`kip_shared::live::MAX_RESPONSE_BYTES`].
//! - The responder never blocks the event loop it drives: answers are queued with
//!   `try_publish`; when rumqttc's bounded request queue is full the answer is dropped and
//!   counted (`outcome="publish_failed"`) and the control plane falls back to synced data.
//! - The map is a plain mutex never held across an `.await`; the writer's cost per reading is
//!   one lock and one map update.
//! - Runs on the agent's tracker and ends when the shared cancellation token fires.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use chrono::Utc;
use kip_shared::backoff::Backoff;
use kip_shared::{
    Reading,
    live::{
        LIVE_PROTOCOL_VERSION, LiveError, LivePrediction, LiveRequest, LiveResponse, LiveValue,
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::LiveQueryConfig,
    edge_inference::Inference,
    mqtt::{broker_options, sleep_or_cancel},
};

/// Outcome label of `kip_agent_live_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Live-query metrics (`kip_agent_live_*`).
#[derive(Clone, Debug, Default)]
pub struct LiveMetrics {
    pub requests: Family<OutcomeLabels, Counter>,
    pub values_dropped: Counter,
    pub connected: Gauge,
}

impl LiveMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "live_requests",
            "Live-value requests received, by outcome (answered, malformed, foreign, publish_failed)",
            m.requests.clone(),
        );
        registry.register(
            "live_values_dropped",
            "Readings not remembered for live queries because max_tracked_values was reached",
            m.values_dropped.clone(),
        );
        registry.register(
            "live_connected",
            "1 while the live-query responder is subscribed to its request topic",
            m.connected.clone(),
        );
        m
    }

    fn count(&self, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// The newest value of every (machine, metric) seen by this agent.
#[derive(Debug)]
pub struct LiveValues {
    map: Mutex<HashMap<(String, String), LiveValue>>,
    max_entries: usize,
    dropped: Counter,
}

impl LiveValues {
    /// An empty map that remembers at most `max_entries` pairs.
    pub fn new(max_entries: usize, dropped: Counter) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max_entries,
            dropped,
        }
    }

    /// Remembers `r` unless a value with a newer source timestamp is already known (an
    /// OPC UA republish or an MQTT redelivery after a reconnect must not roll a value back).
    pub fn observe(&self, r: &Reading) {
        if !r.value.is_finite() {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let full = map.len() >= self.max_entries;
        let key = (r.machine.clone(), r.metric.clone());
        match map.get_mut(&key) {
            Some(v) if v.ts > r.ts => {}
            Some(v) => {
                v.source.clone_from(&r.source);
                v.value = r.value;
                v.ts = r.ts;
                v.quality = r.quality;
            }
            None if full => {
                self.dropped.inc();
            }
            None => {
                map.insert(
                    key,
                    LiveValue {
                        source: r.source.clone(),
                        machine: r.machine.clone(),
                        metric: r.metric.clone(),
                        value: r.value,
                        ts: r.ts,
                        quality: r.quality,
                    },
                );
            }
        }
    }

    /// The values `req` asks for, sorted by machine and metric.
    pub fn snapshot(&self, req: &LiveRequest) -> Vec<LiveValue> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<LiveValue> = map
            .values()
            .filter(|v| req.wants(&v.machine, &v.metric))
            .cloned()
            .collect();
        drop(map);
        out.sort_by(|a, b| (&a.machine, &a.metric).cmp(&(&b.machine, &b.metric)));
        out
    }

    /// Number of remembered pairs.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing was remembered yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The bytes are not a valid request.
    #[error("malformed live request: {0}")]
    Malformed(#[from] LiveError),
    /// A valid request that is not for this agent, or whose reply topic leaves its organisation.
    #[error("foreign live request: {0}")]
    Foreign(String),
}

impl Refusal {
    fn outcome(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Foreign(_) => "foreign",
        }
    }
}

/// Answers live-value requests for one device.
#[derive(Debug)]
pub struct LiveResponder {
    cfg: LiveQueryConfig,
    org_id: Uuid,
    device: String,
    values: Arc<LiveValues>,
    inference: Option<Arc<Inference>>,
    metrics: LiveMetrics,
}

impl LiveResponder {
    /// A responder for `device` of `org_id` answering from `values` (and `inference`'s latest
    /// predictions when inference runs).
    pub fn new(
        cfg: LiveQueryConfig,
        org_id: Uuid,
        device: &str,
        values: Arc<LiveValues>,
        inference: Option<Arc<Inference>>,
        metrics: LiveMetrics,
    ) -> Self {
        Self {
            cfg,
            org_id,
            device: device.to_owned(),
            values,
            inference,
            metrics,
        }
    }

    /// The topic this agent listens on.
    pub fn request_topic(&self) -> String {
        kip_shared::live::request_topic(&self.cfg.topic_prefix, self.org_id, &self.device)
    }

    /// Decodes and checks a request and builds its answer: `(reply topic, payload)`.
    pub fn answer(&self, payload: &[u8]) -> Result<(String, Vec<u8>), Refusal> {
        let req = LiveRequest::decode(payload)?;
        if req.org_id != self.org_id || req.device != self.device {
            return Err(Refusal::Foreign(format!(
                "addressed to device {:?} of organisation {}, this is {:?} of {}",
                req.device, req.org_id, self.device, self.org_id
            )));
        }
        if !req.reply_within_org(&self.cfg.topic_prefix) {
            return Err(Refusal::Foreign(format!(
                "reply topic {:?} is outside {}/{}/",
                req.reply_to, self.cfg.topic_prefix, self.org_id
            )));
        }
        let predictions = self
            .inference
            .as_ref()
            .map(|i| {
                i.latest()
                    .into_values()
                    .filter(|p| req.machines.is_empty() || req.machines.contains(&p.machine))
                    .map(|p| LivePrediction {
                        machine: p.machine,
                        model_version: p.model_version,
                        ts: p.ts,
                        rul_cycles: p.rul_cycles,
                        anomaly_score: p.anomaly_score,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let resp = LiveResponse {
            v: LIVE_PROTOCOL_VERSION,
            request_id: req.request_id,
            org_id: self.org_id,
            device: self.device.clone(),
            agent_time: Utc::now(),
            values: self.values.snapshot(&req),
            predictions,
            truncated: false,
        };
        Ok((req.reply_to, resp.encode()))
    }

    /// Handles one received request: answers it or counts and logs why not.
    fn handle(&self, client: &AsyncClient, payload: &[u8]) {
        match self.answer(payload) {
            Ok((topic, bytes)) => match client.try_publish(topic, QoS::AtLeastOnce, false, bytes) {
                Ok(()) => self.metrics.count("answered"),
                Err(e) => {
                    self.metrics.count("publish_failed");
                    tracing::warn!(error = %e, "live answer not sent: MQTT request queue full");
                }
            },
            Err(r) => {
                self.metrics.count(r.outcome());
                tracing::warn!(problem = %r, "live request refused");
            }
        }
    }

    /// Runs until `cancel` fires; connection errors are retried with backoff forever.
    pub async fn run(self, cancel: CancellationToken) {
        let topic = self.request_topic();
        let b = &self.cfg.broker;
        let mut backoff = Backoff::new(b.reconnect_min_backoff, b.reconnect_max_backoff);
        // A clean session: requests queued while the agent was away are stale by now (the
        // control plane waits only `request_timeout_ms`).
        let opts = loop {
            match broker_options(b, true) {
                Ok(mut o) => {
                    // Answers can be larger than rumqttc's 10 KiB default, in both directions.
                    o.set_max_packet_size(b.max_packet_size_bytes, b.max_packet_size_bytes);
                    break o;
                }
                Err(e) => {
                    tracing::error!(error = %e, "live-query responder cannot start");
                    if sleep_or_cancel(b.reconnect_max_backoff, &cancel).await {
                        return;
                    }
                }
            }
        };
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        tracing::info!(%topic, broker = %b.endpoint, "live-query responder starting");
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => {
                    let _ = client.try_disconnect();
                    break;
                }
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    if let Err(e) = client.try_subscribe(&topic, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "live-query subscribe request failed");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(%topic, "broker refused the live-query subscription (ACL?)");
                    } else {
                        self.metrics.connected.set(1);
                        tracing::info!(%topic, "live-query responder subscribed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.handle(&client, &p.payload),
                Ok(_) => {}
                Err(e) => {
                    self.metrics.connected.set(0);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "live-query connection error");
                    if sleep_or_cancel(delay, &cancel).await {
                        break;
                    }
                }
            }
        }
        self.metrics.connected.set(0);
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration as ChronoDuration};
    use kip_shared::{Quality, live::reply_topic};

    use super::*;
    use crate::config::RawConfig;

    fn cfg() -> LiveQueryConfig {
        let text = "[agent]\ndevice = \"gw-1\"\nstate_dir = \"/tmp/x\"\n\
                    [live_query]\nurl = \"mqtt://127.0.0.1:1883\"\n";
        RawConfig::from_toml(text, std::path::Path::new("t.toml"))
            .unwrap()
            .validate()
            .unwrap()
            .live_query
            .unwrap()
    }

    fn reading(machine: &str, metric: &str, value: f64, ts: DateTime<Utc>) -> Reading {
        Reading {
            source: "site".into(),
            machine: machine.into(),
            metric: metric.into(),
            ts,
            value,
            quality: Quality::Good,
        }
    }

    fn responder(org: Uuid, values: Arc<LiveValues>) -> (LiveResponder, LiveMetrics) {
        let metrics = LiveMetrics::default();
        (
            LiveResponder::new(cfg(), org, "gw-1", values, None, metrics.clone()),
            metrics,
        )
    }

    fn request(org: Uuid, device: &str, reply_org: Uuid) -> LiveRequest {
        LiveRequest {
            v: LIVE_PROTOCOL_VERSION,
            request_id: Uuid::new_v4(),
            org_id: org,
            device: device.into(),
            reply_to: reply_topic("kip/v1", reply_org, "cp-1"),
            sent_at: Utc::now(),
            machines: vec![],
            metrics: vec![],
        }
    }

    #[test]
    fn the_newest_source_timestamp_wins_and_the_map_stays_bounded() {
        let dropped = Counter::default();
        let v = LiveValues::new(2, dropped.clone());
        let now = Utc::now();
        v.observe(&reading("m1", "temp", 20.0, now));
        v.observe(&reading(
            "m1",
            "temp",
            10.0,
            now - ChronoDuration::seconds(5),
        ));
        v.observe(&reading("m1", "rpm", 1500.0, now));
        v.observe(&reading("m2", "temp", 30.0, now));
        v.observe(&reading("m1", "temp", f64::NAN, now));
        let all = v.snapshot(&request(Uuid::nil(), "gw-1", Uuid::nil()));
        let temps: Vec<f64> = all.iter().map(|x| x.value).collect();
        assert_eq!(temps, vec![1500.0, 20.0]);
        assert_eq!(dropped.get(), 1);
    }

    #[test]
    fn answers_carry_the_latest_values_and_go_to_the_reply_topic() {
        let org = Uuid::new_v4();
        let values = Arc::new(LiveValues::new(100, Counter::default()));
        values.observe(&reading("press-1", "temperature", 77.25, Utc::now()));
        values.observe(&reading("press-2", "temperature", 12.0, Utc::now()));
        let (r, _) = responder(org, values);
        let mut req = request(org, "gw-1", org);
        req.machines = vec!["press-1".into()];
        let (topic, bytes) = r.answer(&req.encode()).unwrap();
        assert_eq!(topic, req.reply_to);
        let resp = LiveResponse::decode(&bytes).unwrap();
        assert_eq!(resp.request_id, req.request_id);
        assert_eq!((resp.org_id, resp.device.as_str()), (org, "gw-1"));
        assert_eq!(resp.values.len(), 1);
        assert_eq!(resp.values[0].value, 77.25);
    }

    #[test]
    fn requests_for_others_or_replies_outside_the_org_are_refused() {
        let org = Uuid::new_v4();
        let (r, _) = responder(org, Arc::new(LiveValues::new(10, Counter::default())));
        for req in [
            request(Uuid::new_v4(), "gw-1", org),
            request(org, "gw-2", org),
            request(org, "gw-1", Uuid::new_v4()),
        ] {
            let e = r.answer(&req.encode()).unwrap_err();
            assert!(matches!(e, Refusal::Foreign(_)), "{e}");
        }
        let e = r.answer(b"{\"v\": 1}").unwrap_err();
        assert!(matches!(e, Refusal::Malformed(_)), "{e}");
        assert!(e.to_string().contains("malformed"), "{e}");
    }
}
