//! The Aleph provider's MQTT side: asks agents for their current values (wire format and
//! topics in [`kip_shared::live`]).
//!
//! One long-lived rumqttc connection per control-plane process, driven by [`LiveClient::run`]
//! on the server's `TaskTracker` until the shutdown token fires. It subscribes (QoS 1) to
//! `{prefix}/+/_cp/{client_id}/live/resp`; [`LiveClient::ask`] publishes a request (QoS 1) to
//! `{prefix}/{org_id}/{device}/live/req` and waits for the matching answer.
//!
//! Invariants:
//! - The pending map (request id -> waiting question) is bounded by `max_pending_requests`;
//!   when full a device is not asked (`busy`) and is answered from synced data. An entry leaves
//!   the map when its answer arrives or when its waiter gives up (timeout or the client went
//!   away), through a drop guard, so the map cannot leak.
//! - An answer is used only for the request that asked it: same request id, and the
//!   organisation in the reply topic, in the answer and in the request agree, as do the
//!   device names. Anything else is dropped and counted (`malformed`, `unknown`, `mismatched`),
//!   with a log line naming the problem; outside bytes never panic the event loop.
//! - Requests go to the organisation given by the caller's API key only (the provider passes
//!   `CallCtx::org_id`), so one organisation's question never reaches another's topics.
//! - The event loop is never blocked by a question: requests are queued with `try_publish`.
//!   While the connection is down no request is queued (it would be stale by the time it is
//!   sent); questions are answered from synced data with a note.
//! - A hostile or broken message cannot make the connection flap (issue 13 hole 7, issue 19).
//!   The client speaks MQTT 5 and announces a Maximum Packet Size ([`MAX_INCOMING_PACKET_BYTES`]:
//!   the largest valid answer plus topic and header room), so the broker discards larger
//!   messages instead of sending them (MQTT 5, 3.1.2.11.4), and the reply subscription asks
//!   for no retained messages (Retain Handling 2), so a retained message, whatever its size, is
//!   never delivered. What does arrive and cannot be accepted (oversized payload, malformed
//!   JSON, topic not UTF-8 or of another shape, wrong organisation or device) is dropped and
//!   counted in `kip_llm_live_responses_dropped_total{outcome}`; the connection stays up.
//!   Connections are counted in `kip_llm_live_connections_total` (one per ConnAck).
//! - Outgoing requests are bounded too: a request larger than
//!   [`kip_shared::live::MAX_REQUEST_BYTES`] is not sent (`busy`), and rumqttc also keeps to
//!   the broker's announced maximum.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use kip_shared::backoff::Backoff;
use kip_shared::live::{
    LIVE_PROTOCOL_VERSION, LiveRequest, LiveResponse, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
    MAX_TOPIC_BYTES, reply_filter, reply_topic, reply_topic_org, request_topic,
};
use rumqttc::{
    TlsConfiguration, Transport,
    v5::{
        AsyncClient, Event, EventLoop, MqttOptions,
        mqttbytes::{
            QoS,
            v5::{Filter, Packet, RetainForwardRule, SubscribeReasonCode},
        },
    },
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    config::AlephMqttConfig,
    metrics::{LiveOutcome, LlmMetrics},
};

/// Reconnect delays of the connection (`kip_shared::backoff`, with jitter); also how long a
/// TLS file that cannot be read waits before the next try (the maximum).
const RECONNECT_MIN_BACKOFF: Duration = Duration::from_millis(200);
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Largest MQTT packet the client accepts (announced to the broker in CONNECT): a maximal
/// answer plus room for the fixed header, the topic and properties.
pub const MAX_INCOMING_PACKET_BYTES: u32 = (MAX_RESPONSE_BYTES + MAX_TOPIC_BYTES + 4096) as u32;

/// Why a device could not be asked or did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LiveFailure {
    #[error("did not answer within {0} ms over MQTT")]
    Timeout(u64),
    #[error("could not be asked: the control plane is not connected to the MQTT broker")]
    NotConnected,
    #[error("could not be asked: too many live requests are waiting for answers")]
    Busy,
}

impl LiveFailure {
    fn outcome(self) -> &'static str {
        match self {
            Self::Timeout(_) => "timed_out",
            Self::NotConnected => "not_connected",
            Self::Busy => "busy",
        }
    }
}

/// Why the TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LiveSetupError {
    #[error(transparent)]
    Tls(#[from] kip_certs::CertError),
}

#[derive(Debug)]
struct Pending {
    org_id: Uuid,
    device: String,
    tx: oneshot::Sender<LiveResponse>,
}

/// The live-query MQTT client of the Aleph provider.
pub struct LiveClient {
    cfg: AlephMqttConfig,
    client: AsyncClient,
    eventloop: Mutex<Option<EventLoop>>,
    pending: Mutex<HashMap<Uuid, Pending>>,
    connected: AtomicBool,
    metrics: LlmMetrics,
}

impl std::fmt::Debug for LiveClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveClient")
            .field("cfg", &self.cfg)
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

/// Removes a pending entry when its waiter is done, whatever the outcome.
struct PendingGuard<'a> {
    client: &'a LiveClient,
    id: Uuid,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.client.lock_pending().remove(&self.id);
    }
}

impl LiveClient {
    /// Builds the client; nothing is sent until [`LiveClient::run`] drives the connection.
    pub fn new(cfg: AlephMqttConfig, metrics: LlmMetrics) -> Arc<Self> {
        let ep = &cfg.endpoint;
        // `socket_host`: rumqttc formats `{host}:{port}` before resolving (IPv6 bracketed).
        let mut opts = MqttOptions::new(&cfg.client_id, ep.socket_host(), ep.port());
        opts.set_keep_alive(cfg.keep_alive);
        // Answers to requests of a previous run are of no use.
        opts.set_clean_start(true);
        // The broker must not send larger packets (it drops them), and rumqttc reads none.
        opts.set_max_packet_size(Some(MAX_INCOMING_PACKET_BYTES));
        // Bounded: at most this many requests queue in front of the connection.
        let (client, eventloop) = AsyncClient::new(opts, 256);
        Arc::new(Self {
            cfg,
            client,
            eventloop: Mutex::new(Some(eventloop)),
            pending: Mutex::new(HashMap::new()),
            connected: AtomicBool::new(false),
            metrics,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &AlephMqttConfig {
        &self.cfg
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .live_requests
            .get_or_create(&LiveOutcome { outcome })
            .inc();
    }

    fn drop_response(&self, outcome: &'static str, problem: &str) {
        self.metrics
            .live_responses_dropped
            .get_or_create(&LiveOutcome { outcome })
            .inc();
        tracing::warn!(outcome, problem, "live response dropped");
    }

    /// Whether the connection is up and subscribed.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Asks `device` of `org_id` for its current values and waits up to `request_timeout_ms`.
    pub async fn ask(&self, org_id: Uuid, device: &str) -> Result<LiveResponse, LiveFailure> {
        let result = self.ask_inner(org_id, device).await;
        match &result {
            Ok(_) => self.count("answered"),
            Err(f) => self.count(f.outcome()),
        }
        result
    }

    async fn ask_inner(&self, org_id: Uuid, device: &str) -> Result<LiveResponse, LiveFailure> {
        if !self.connected() {
            return Err(LiveFailure::NotConnected);
        }
        let id = Uuid::new_v4();
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.lock_pending();
            if pending.len() >= self.cfg.max_pending_requests {
                return Err(LiveFailure::Busy);
            }
            pending.insert(
                id,
                Pending {
                    org_id,
                    device: device.to_owned(),
                    tx,
                },
            );
        }
        let _guard = PendingGuard { client: self, id };
        let prefix = &self.cfg.topic_prefix;
        let req = LiveRequest {
            v: LIVE_PROTOCOL_VERSION,
            request_id: id,
            org_id,
            device: device.to_owned(),
            reply_to: reply_topic(prefix, org_id, &self.cfg.client_id),
            sent_at: Utc::now(),
            machines: Vec::new(),
            metrics: Vec::new(),
        };
        let topic = request_topic(prefix, org_id, device);
        let payload = req.encode();
        if payload.len() > MAX_REQUEST_BYTES {
            tracing::warn!(
                bytes = payload.len(),
                "live request larger than MAX_REQUEST_BYTES not sent"
            );
            return Err(LiveFailure::Busy);
        }
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            tracing::warn!(error = %e, "live request not queued");
            return Err(LiveFailure::Busy);
        }
        self.count("sent");
        let ms = self.cfg.request_timeout.as_millis() as u64;
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            // The sender is dropped only with the entry, i.e. never before the timeout: treat
            // it as no answer.
            Ok(Err(_)) | Err(_) => Err(LiveFailure::Timeout(ms)),
        }
    }

    /// Checks a received message's topic and size, then matches it with its waiting request.
    fn handle_publish(&self, topic: &[u8], payload: &[u8]) {
        let Ok(topic) = std::str::from_utf8(topic) else {
            self.drop_response("malformed", "a topic that is not UTF-8");
            return;
        };
        if payload.len() > MAX_RESPONSE_BYTES {
            self.drop_response(
                "oversized",
                &format!(
                    "{} bytes on {topic:?}, more than the {MAX_RESPONSE_BYTES} an answer may have",
                    payload.len()
                ),
            );
            return;
        }
        self.handle_response(topic, payload);
    }

    /// Matches a received answer with its waiting request.
    fn handle_response(&self, topic: &str, payload: &[u8]) {
        let Some(topic_org) = reply_topic_org(&self.cfg.topic_prefix, topic) else {
            self.drop_response("malformed", &format!("unexpected topic {topic:?}"));
            return;
        };
        let resp = match LiveResponse::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.drop_response("malformed", &format!("on {topic}: {e}"));
                return;
            }
        };
        let mut pending = self.lock_pending();
        let Some(p) = pending.get(&resp.request_id) else {
            drop(pending);
            self.drop_response(
                "unknown",
                &format!("request id {} is unknown or expired", resp.request_id),
            );
            return;
        };
        if p.org_id != resp.org_id || p.org_id != topic_org || p.device != resp.device {
            drop(pending);
            // The real answer may still come: leave the request waiting.
            self.drop_response(
                "mismatched",
                &format!(
                    "answer for request {} claims device {:?} of {} on a topic of {topic_org}",
                    resp.request_id, resp.device, resp.org_id
                ),
            );
            return;
        }
        if let Some(p) = pending.remove(&resp.request_id) {
            drop(pending);
            // Err: the waiter gave up between the lookup and now; nothing to do.
            let _ = p.tx.send(resp);
        }
    }

    /// Drives the connection until `cancel` fires; reconnects with backoff forever. Runs once
    /// (a second call returns at once).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let taken = self
            .eventloop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut eventloop) = taken else {
            return;
        };
        let filter = reply_filter(&self.cfg.topic_prefix, &self.cfg.client_id);
        let subscription = Filter {
            path: filter.clone(),
            qos: QoS::AtLeastOnce,
            nolocal: true,
            preserve_retain: false,
            // Answers are never retained: a retained message is junk (or an attack) and would
            // come back at every reconnect.
            retain_forward_rule: RetainForwardRule::Never,
        };
        let mut backoff = Backoff::new(RECONNECT_MIN_BACKOFF, RECONNECT_MAX_BACKOFF);
        // TLS files are read here, retried after a failure, so fixing them needs no restart.
        if let Some(t) = self.cfg.endpoint.tls() {
            loop {
                let auth = t
                    .client_auth
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path()));
                match kip_certs::client_config_from_files(&t.ca_file, auth) {
                    Ok(c) => {
                        eventloop.options.set_transport(Transport::tls_with_config(
                            TlsConfiguration::Rustls(Arc::new(c)),
                        ));
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Aleph MQTT client cannot start; retrying");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(RECONNECT_MAX_BACKOFF) => {}
                        }
                    }
                }
            }
        }
        tracing::info!(broker = %self.cfg.endpoint, %filter, "Aleph MQTT client starting");
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => {
                    let _ = self.client.try_disconnect();
                    break;
                }
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    self.metrics.live_connections.inc();
                    if let Err(e) = self
                        .client
                        .try_subscribe_many(std::iter::once(subscription.clone()))
                    {
                        tracing::error!(error = %e, "Aleph MQTT subscribe request failed");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        tracing::error!(%filter, "broker refused the Aleph reply subscription (ACL?)");
                    } else {
                        self.connected.store(true, Ordering::Relaxed);
                        self.metrics.live_connected.set(1);
                        tracing::info!(%filter, "Aleph MQTT client subscribed");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.handle_publish(&p.topic, &p.payload);
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected.store(false, Ordering::Relaxed);
                    self.metrics.live_connected.set(0);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Aleph MQTT connection error");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.connected.store(false, Ordering::Relaxed);
        self.metrics.live_connected.set(0);
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::llm::config::LlmConfig;

    fn client() -> (Arc<LiveClient>, LlmMetrics) {
        let c = LlmConfig::from_toml(
            "[providers.aleph]\nkind = \"aleph\"\nmodels = [\"aleph\"]\n\
             [providers.aleph.mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nclient_id = \"cp-t\"\n\
             request_timeout_ms = 50\nmax_pending_requests = 1\n",
            |_| None,
        )
        .unwrap();
        let metrics = LlmMetrics::register(&mut Registry::default());
        let cfg = c.providers["aleph"].mqtt.clone().unwrap();
        (LiveClient::new(cfg, metrics.clone()), metrics)
    }

    fn dropped(m: &LlmMetrics, outcome: &'static str) -> u64 {
        m.live_responses_dropped
            .get_or_create(&LiveOutcome { outcome })
            .get()
    }

    fn response(id: Uuid, org: Uuid, device: &str) -> Vec<u8> {
        LiveResponse {
            v: LIVE_PROTOCOL_VERSION,
            request_id: id,
            org_id: org,
            device: device.into(),
            agent_time: Utc::now(),
            values: vec![],
            predictions: vec![],
            truncated: false,
        }
        .encode()
    }

    #[tokio::test]
    async fn without_a_connection_nothing_is_asked() {
        let (c, m) = client();
        let e = c.ask(Uuid::new_v4(), "gw-1").await.unwrap_err();
        assert_eq!(e, LiveFailure::NotConnected);
        assert_eq!(
            m.live_requests
                .get_or_create(&LiveOutcome {
                    outcome: "not_connected"
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn the_pending_map_is_bounded_and_emptied_after_a_timeout() {
        let (c, m) = client();
        // As if subscribed; nothing drives the event loop, so no answer can come.
        c.connected.store(true, Ordering::Relaxed);
        let t0 = std::time::Instant::now();
        let e = c.ask(Uuid::new_v4(), "gw-1").await.unwrap_err();
        assert_eq!(e, LiveFailure::Timeout(50));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(c.lock_pending().is_empty(), "the guard removed the entry");
        // max_pending_requests = 1: with one question waiting, the next device is not asked.
        let (tx, _rx) = oneshot::channel();
        c.lock_pending().insert(
            Uuid::new_v4(),
            Pending {
                org_id: Uuid::new_v4(),
                device: "gw-9".into(),
                tx,
            },
        );
        assert_eq!(
            c.ask(Uuid::new_v4(), "gw-1").await.unwrap_err(),
            LiveFailure::Busy
        );
        let count = |outcome| {
            m.live_requests
                .get_or_create(&LiveOutcome { outcome })
                .get()
        };
        assert_eq!(
            (count("sent"), count("timed_out"), count("busy")),
            (1, 1, 1)
        );
    }

    #[test]
    fn answers_reach_only_the_request_that_asked() {
        let (c, m) = client();
        let org = Uuid::new_v4();
        let id = Uuid::new_v4();
        let (tx, mut rx) = oneshot::channel();
        c.lock_pending().insert(
            id,
            Pending {
                org_id: org,
                device: "gw-1".into(),
                tx,
            },
        );
        let topic = reply_topic("kip/v1", org, "cp-t");
        c.handle_response(&topic, b"not json");
        assert_eq!(dropped(&m, "malformed"), 1);
        c.handle_response(&topic, &response(Uuid::new_v4(), org, "gw-1"));
        assert_eq!(dropped(&m, "unknown"), 1);
        // Right id, but another organisation's topic or another device: not accepted.
        let other = reply_topic("kip/v1", Uuid::new_v4(), "cp-t");
        c.handle_response(&other, &response(id, org, "gw-1"));
        c.handle_response(&topic, &response(id, org, "gw-2"));
        assert_eq!(dropped(&m, "mismatched"), 2);
        assert!(rx.try_recv().is_err());
        c.handle_response(&topic, &response(id, org, "gw-1"));
        assert_eq!(rx.try_recv().unwrap().request_id, id);
        assert!(c.lock_pending().is_empty());
    }
}
