//! MQTT source: subscribes to configured topic filters on one broker and turns each message
//! into a [`Reading`] through the subscription's mapping.
//!
//! Invariants:
//! - A message that does not map (payload not a number, not JSON, nothing at the pointer, a
//!   bad timestamp, a topic without the configured level) becomes a [`DeadLetter`] record
//!   (topic, reason, first bytes of the payload) and increments `kip_agent_dead_letters`; the
//!   source never stops or stalls for it.
//! - Subscriptions are QoS 1 with a persistent session (`clean_session = false`), so a broker
//!   that kept the session redelivers what arrived while the agent was away.
//! - The connection counts as established only at ConnAck (under TLS 1.3 a refused client
//!   certificate shows up at the first poll after the handshake). Every ConnAck resubscribes,
//!   whatever the broker says about its session.
//! - Connection errors are retried forever with exponential backoff between
//!   `reconnect_min_backoff_ms` and `reconnect_max_backoff_ms` (with jitter), reset by a
//!   ConnAck; each disconnect increments `kip_agent_source_reconnects` and, once connected
//!   again, writes a [`Gap`] record spanning the time without a connection.
//! - A message is acknowledged (PubAck, rumqttc manual acks) only once its record is durable
//!   in the buffer: each record goes out with an [`AckToken`] that the buffer writer fires
//!   when the durable sequence covers it ([`crate::ack`]). A crash (`kill -9`, power loss)
//!   before that leaves the message unacknowledged, and the broker redelivers it to the
//!   persistent session. At least once: a message whose record became durable but whose
//!   PubAck did not reach the broker is stored again when redelivered.
//! - Tokens belong to one connection: after a connection loss they are stale (rumqttc drops
//!   queued PubAcks then too) and the redelivered copy carries a fresh token. A PubAck fired
//!   in the instant between rumqttc noticing the loss and the source marking the tokens stale
//!   goes out on the next connection, where it acknowledges the same message (the session
//!   keeps the packet id); only its redelivered copy's PubAck is then redundant.
//! - After `cancel` the source reads no more messages but keeps the connection polled until
//!   the writer fired or dropped every token it issued (at most [`SHUTDOWN_ACK_WAIT`]), then
//!   sends DISCONNECT: a clean shutdown acknowledges everything it stored.
//! - Backpressure: records go into a bounded channel; a full channel stops polling the
//!   broker connection, and thus stops reading from the socket. Unacknowledged messages count
//!   against the broker's in-flight limit, so a buffer that cannot flush stops the flow at the
//!   broker, which keeps the messages.
//!
//! When a received topic matches several subscriptions, the first one in config order maps it.

use std::{path::Path, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use kip_shared::{DeadLetter, Gap, Quality, Reading, Record, record::DEAD_LETTER_PREFIX_BYTES};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    ack::{AckToken, AckedRecord, Connection},
    config::{MqttBrokerConfig, MqttTls, Subscription, ValueFormat},
    metrics::{IngestMetrics, ReadingLabels},
};

/// Capacity of rumqttc's request queue (subscriptions and PubAcks). The queue drains
/// whenever the source polls its connection; the PubAcks released by one flush are bounded by
/// the broker's in-flight limit, typically well below this.
const REQUEST_QUEUE_CAPACITY: usize = 1024;

/// How long a stopping source keeps its connection polled for the last acknowledgements.
pub const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);

/// Why the MQTT source could not be set up (its TLS files).
pub type MqttError = kip_certs::CertError;

/// Builds the rustls client config (ring provider) for a TLS broker connection; errors name
/// the file that is missing, empty or malformed.
pub fn tls_client_config(
    ca_file: &Path,
    client_auth: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, MqttError> {
    kip_certs::client_config_from_files(ca_file, client_auth)
}

/// Does topic `topic` match the MQTT filter `filter`?
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    // Topics starting with '$' are not matched by a leading wildcard (MQTT 3.1.1 §4.7.2).
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn parse_number(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{:?} is not a number", truncate(s, 40)))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("{v} is not a finite number"))
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_timestamp(v: &serde_json::Value, pointer: &str) -> Result<DateTime<Utc>, String> {
    let bad = || {
        format!(
            "timestamp at {pointer:?} is neither RFC 3339 nor epoch milliseconds: {}",
            truncate(&v.to_string(), 40)
        )
    };
    match v {
        serde_json::Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(bad),
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .or_else(|_| {
                s.parse::<i64>()
                    .ok()
                    .and_then(DateTime::from_timestamp_millis)
                    .ok_or(())
            })
            .map_err(|()| bad()),
        _ => Err(bad()),
    }
}

/// Maps one message to a reading, or says why it cannot.
pub fn map_message(
    sub: &Subscription,
    source: &str,
    topic: &str,
    payload: &[u8],
    received: DateTime<Utc>,
) -> Result<Reading, String> {
    let machine = sub
        .machine
        .resolve(topic)
        .ok_or_else(|| format!("topic {topic:?} has no level for the machine name"))?;
    let metric = sub
        .metric
        .resolve(topic)
        .ok_or_else(|| format!("topic {topic:?} has no level for the metric name"))?;
    let (value, ts) = match &sub.value {
        ValueFormat::Number {} => {
            let text = std::str::from_utf8(payload).map_err(|_| "payload is not UTF-8")?;
            (parse_number(text)?, received)
        }
        ValueFormat::Json {
            pointer,
            timestamp_pointer,
        } => {
            let doc: serde_json::Value =
                serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
            let v = doc
                .pointer(pointer)
                .ok_or_else(|| format!("no value at JSON pointer {pointer:?}"))?;
            let value = match v {
                serde_json::Value::Number(n) => n
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .ok_or_else(|| format!("value at {pointer:?} is not a finite number"))?,
                serde_json::Value::String(s) => {
                    parse_number(s).map_err(|e| format!("value at {pointer:?}: {e}"))?
                }
                other => {
                    return Err(format!(
                        "value at {pointer:?} is {}, not a number",
                        json_type(other)
                    ));
                }
            };
            // An absent timestamp falls back to the receive time; a malformed one is an error.
            let ts = match timestamp_pointer
                .as_deref()
                .and_then(|p| doc.pointer(p).map(|v| (p, v)))
            {
                Some((p, v)) => parse_timestamp(v, p)?,
                None => received,
            };
            (value, ts)
        }
    };
    Ok(Reading {
        source: source.to_owned(),
        machine: machine.to_owned(),
        metric: metric.to_owned(),
        ts,
        value,
        quality: Quality::Good,
    })
}

/// Builds a dead-letter record for a message that did not map.
pub fn dead_letter(
    source: &str,
    topic: &str,
    reason: String,
    payload: &[u8],
    ts: DateTime<Utc>,
) -> DeadLetter {
    DeadLetter {
        source: source.to_owned(),
        origin: topic.to_owned(),
        reason,
        payload_prefix: payload[..payload.len().min(DEAD_LETTER_PREFIX_BYTES)].to_vec(),
        ts,
    }
}

/// One MQTT broker connection with its subscriptions.
#[derive(Debug)]
pub struct MqttSource {
    cfg: MqttBrokerConfig,
    metrics: IngestMetrics,
}

/// rumqttc options for `cfg`'s connection (TLS files are read here, so a fixed file is picked
/// up at the next reconnect).
pub(crate) fn broker_options(
    cfg: &MqttBrokerConfig,
    clean_session: bool,
) -> Result<MqttOptions, MqttError> {
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_session(clean_session);
    if let MqttTls::Tls {
        ca_file,
        client_auth,
    } = &cfg.tls
    {
        let tls = tls_client_config(
            ca_file,
            client_auth
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    Ok(opts)
}

/// Exponential backoff with jitter, reset after a successful connection.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 20% jitter so a fleet does not reconnect in lockstep after a broker restart.
        let jitter_ms = rand::random_range(0..=base.as_millis() as u64 / 5);
        (base + Duration::from_millis(jitter_ms)).min(self.max)
    }
}

impl MqttSource {
    /// A source for `cfg`, counting into `metrics`.
    pub fn new(cfg: MqttBrokerConfig, metrics: IngestMetrics) -> Self {
        Self { cfg, metrics }
    }

    /// The configured source name.
    pub fn name(&self) -> &str {
        self.cfg.name.as_str()
    }

    fn options(&self) -> Result<MqttOptions, MqttError> {
        let mut opts = broker_options(&self.cfg, false)?;
        // PubAck only once the record is durable (the receiver fires the AckToken).
        opts.set_manual_acks(true);
        Ok(opts)
    }

    /// Runs until `cancel` fires or `tx` closes. Configuration errors (unreadable
    /// certificates) are logged and retried at the maximum backoff, so fixing the files
    /// brings the source up without a restart.
    ///
    /// Each message goes out with an [`AckToken`]; the broker gets its PubAck only when the
    /// receiver fires the token. After `cancel` the source stops reading messages but keeps
    /// the connection polled until every token it issued was fired or dropped (bounded by
    /// [`SHUTDOWN_ACK_WAIT`]), so the final flush's acknowledgements reach the broker, then
    /// disconnects.
    pub async fn run(self, tx: mpsc::Sender<AckedRecord>, cancel: CancellationToken) {
        let name = self.cfg.name.to_string();
        let labels = IngestMetrics::source(&name);
        let mut backoff = Backoff::new(
            self.cfg.reconnect_min_backoff,
            self.cfg.reconnect_max_backoff,
        );
        let connection = Connection::default();
        loop {
            let opts = match self.options() {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(source = %name, error = %e, "mqtt source cannot start");
                    if sleep_or_cancel(self.cfg.reconnect_max_backoff, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_QUEUE_CAPACITY);
            let drained = self
                .drive(
                    &client,
                    &mut eventloop,
                    tx,
                    &connection,
                    &cancel,
                    &mut backoff,
                    &labels,
                )
                .await;
            if drained {
                self.linger(&client, &mut eventloop, &connection).await;
            }
            break;
        }
        connection.close();
        self.metrics.connected.get_or_create(&labels).set(0);
    }

    /// After `cancel`: polls the connection (ignoring new messages, which stay unacknowledged
    /// and are redelivered next session) until no token of this source is alive, then
    /// disconnects cleanly.
    async fn linger(&self, client: &AsyncClient, eventloop: &mut EventLoop, conn: &Connection) {
        let name = self.cfg.name.as_str();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_ACK_WAIT;
        let mut check = tokio::time::interval(Duration::from_millis(5));
        while conn.tokens_alive() > 0 {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(source = name, tokens = conn.tokens_alive(), "mqtt acknowledgements still pending at shutdown; the broker redelivers those messages");
                    break;
                }
                _ = check.tick() => {}
                ev = eventloop.poll() => if ev.is_err() {
                    // Queued acknowledgements are gone with the connection.
                    conn.lost();
                    return;
                },
            }
        }
        if client.try_disconnect().is_err() {
            return;
        }
        // Poll until the DISCONNECT is written, so the broker sees a clean leave.
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                },
            }
        }
    }

    /// Drives the connection until `cancel` or `tx` closed; true when it is still connected
    /// (worth lingering for the last acknowledgements).
    #[expect(clippy::too_many_arguments, reason = "one private call site")]
    async fn drive(
        &self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        tx: mpsc::Sender<AckedRecord>,
        connection: &Connection,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        labels: &crate::metrics::SourceLabels,
    ) -> bool {
        let name = self.cfg.name.as_str();
        let mut disconnected_since: Option<(DateTime<Utc>, String)> = None;
        let mut connected = false;
        loop {
            let event = tokio::select! {
                () = cancel.cancelled() => return connected,
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(
                        source = name,
                        session_present = ack.session_present,
                        "mqtt connected"
                    );
                    backoff.reset();
                    connected = true;
                    for sub in &self.cfg.subscriptions {
                        if let Err(e) = client.try_subscribe(&sub.topic, QoS::AtLeastOnce) {
                            tracing::error!(source = name, topic = %sub.topic, error = %e, "mqtt subscribe request failed");
                        }
                    }
                    if let Some((from, reason)) = disconnected_since.take() {
                        let gap = Record::Gap(Gap {
                            source: name.to_owned(),
                            from,
                            to: Utc::now(),
                            reason,
                        });
                        match send(&tx, gap, None, cancel).await {
                            Sent::Yes => {}
                            Sent::Cancelled => return true,
                            Sent::Closed => return false,
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(source = name, "mqtt broker refused a subscription");
                    } else {
                        self.metrics.connected.get_or_create(labels).set(1);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let record = self.to_record(&p.topic, &p.payload);
                    // QoS 0 needs no acknowledgement (only reachable if a broker downgrades).
                    let token =
                        (p.qos != QoS::AtMostOnce).then(|| AckToken::new(client, &p, connection));
                    match send(&tx, record, token, cancel).await {
                        Sent::Yes => {}
                        Sent::Cancelled => return true,
                        Sent::Closed => return false,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // rumqttc dropped the PubAcks still queued; tokens of this connection
                    // are stale from now on (the broker redelivers their messages).
                    connection.lost();
                    connected = false;
                    self.metrics.connected.get_or_create(labels).set(0);
                    self.metrics.reconnects.get_or_create(labels).inc();
                    if disconnected_since.is_none() {
                        disconnected_since =
                            Some((Utc::now(), format!("mqtt connection lost: {e}")));
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(source = name, error = %e, retry_in_ms = delay.as_millis() as u64, "mqtt connection error");
                    if sleep_or_cancel(delay, cancel).await {
                        return false;
                    }
                    // The event loop reconnects on the next poll.
                }
            }
        }
    }

    fn to_record(&self, topic: &str, payload: &[u8]) -> Record {
        let name = self.cfg.name.as_str();
        let now = Utc::now();
        let mapped = match self
            .cfg
            .subscriptions
            .iter()
            .find(|s| topic_matches(&s.topic, topic))
        {
            Some(sub) => map_message(sub, name, topic, payload, now),
            None => Err("no configured subscription matches the topic".to_owned()),
        };
        match mapped {
            Ok(r) => {
                self.metrics
                    .readings
                    .get_or_create(&ReadingLabels {
                        source: name.to_owned(),
                        metric: r.metric.clone(),
                    })
                    .inc();
                self.metrics
                    .readings_per_source
                    .get_or_create(&IngestMetrics::source(name))
                    .inc();
                Record::Reading(r)
            }
            Err(reason) => {
                self.metrics
                    .dead_letters
                    .get_or_create(&IngestMetrics::source(name))
                    .inc();
                tracing::debug!(source = name, topic, %reason, "mqtt message dead-lettered");
                Record::DeadLetter(dead_letter(name, topic, reason, payload, now))
            }
        }
    }
}

enum Sent {
    Yes,
    Cancelled,
    Closed,
}

/// Sends unless cancelled.
async fn send(
    tx: &mpsc::Sender<AckedRecord>,
    record: Record,
    ack: Option<AckToken>,
    cancel: &CancellationToken,
) -> Sent {
    tokio::select! {
        () = cancel.cancelled() => Sent::Cancelled,
        r = tx.send(AckedRecord { record, ack }) => if r.is_ok() { Sent::Yes } else { Sent::Closed },
    }
}

/// Sleeps for `d`; true when cancelled meanwhile.
pub(crate) async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NameSource;

    fn sub(topic: &str, value: ValueFormat) -> Subscription {
        Subscription {
            topic: topic.into(),
            machine: NameSource::Fixed("m1".into()),
            metric: NameSource::TopicLevel(2),
            value,
        }
    }

    fn json(ts: Option<&str>) -> ValueFormat {
        ValueFormat::Json {
            pointer: "/v".into(),
            timestamp_pointer: ts.map(str::to_owned),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn topic_filters_match_like_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/#", "a"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches("#", "x/y"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }

    #[test]
    fn plain_number_payloads_become_readings_with_the_metric_from_the_topic() {
        let r = map_message(
            &sub("p/m1/+", ValueFormat::Number {}),
            "b",
            "p/m1/temp",
            b" 21.5\n",
            now(),
        )
        .unwrap();
        assert_eq!(
            (r.machine.as_str(), r.metric.as_str(), r.value),
            ("m1", "temp", 21.5)
        );
        assert_eq!(r.ts, now());
        assert_eq!(r.source, "b");
    }

    #[test]
    fn json_payloads_read_the_pointer_and_the_optional_timestamp() {
        let s = sub("p/m1/+", json(Some("/ts")));
        let r = map_message(
            &s,
            "b",
            "p/m1/t",
            br#"{"v": 3, "ts": "2026-01-02T03:04:05Z"}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.value, 3.0);
        assert_eq!(r.ts.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let r = map_message(
            &s,
            "b",
            "p/m1/t",
            br#"{"v": "4.5", "ts": 1700000000123}"#,
            now(),
        )
        .unwrap();
        assert_eq!(r.value, 4.5);
        assert_eq!(r.ts.timestamp_millis(), 1_700_000_000_123);
        let r = map_message(&s, "b", "p/m1/t", br#"{"v": 1}"#, now()).unwrap();
        assert_eq!(r.ts, now(), "absent timestamp falls back to receive time");
    }

    #[test]
    fn unmappable_payloads_say_why() {
        let s = sub("p/m1/+", json(Some("/ts")));
        let cases: [(&[u8], &str); 6] = [
            (b"not json", "not JSON"),
            (br#"{"x": 1}"#, "no value at JSON pointer \"/v\""),
            (br#"{"v": true}"#, "is a boolean"),
            (br#"{"v": "abc"}"#, "is not a number"),
            (br#"{"v": 1, "ts": "yesterday"}"#, "timestamp"),
            (br#"{"v": 1, "ts": [1]}"#, "timestamp"),
        ];
        for (payload, want) in cases {
            let err = map_message(&s, "b", "p/m1/t", payload, now()).unwrap_err();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(payload)
            );
        }
        let n = sub("p/m1/+", ValueFormat::Number {});
        for (payload, want) in [
            (&b"abc"[..], "not a number"),
            (b"NaN", "finite"),
            (b"\xff", "UTF-8"),
        ] {
            let err = map_message(&n, "b", "p/m1/t", payload, now()).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
        let err = map_message(&n, "b", "p/m1", b"1", now()).unwrap_err();
        assert!(err.contains("metric"), "{err}");
    }

    proptest::proptest! {
        /// Outside bytes never panic the mapping: every message is a reading or a reason.
        #[test]
        fn any_payload_and_topic_maps_or_explains_why(
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            topic in "[a-z/+#$]{0,20}",
            json_doc in proptest::bool::ANY,
        ) {
            let value = if json_doc { json(Some("/ts")) } else { ValueFormat::Number {} };
            let s = sub("p/m1/+", value);
            match map_message(&s, "b", &topic, &payload, now()) {
                Ok(r) => proptest::prop_assert!(r.value.is_finite()),
                Err(reason) => proptest::prop_assert!(!reason.is_empty()),
            }
        }
    }

    #[test]
    fn dead_letters_keep_only_the_first_bytes() {
        let payload = vec![b'x'; 1000];
        let d = dead_letter("b", "t", "r".into(), &payload, now());
        assert_eq!(d.payload_prefix.len(), DEAD_LETTER_PREFIX_BYTES);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(120));
        assert!(d[1] >= Duration::from_millis(200));
        assert!(d.iter().all(|x| *x <= Duration::from_millis(1000)));
        assert_eq!(d[5], Duration::from_millis(1000));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
