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
//!   persistent session.
//! - Redeliveries are recognised, not stored twice: every QoS 1 record carries a
//!   [`Delivery`] (client id, packet id, sha256 of topic and payload, DUP flag); the writer
//!   keeps a durable note of it next to the record, and a copy with DUP set matching a note is
//!   acknowledged without being stored again (see `docs/operations.md` for the windows that
//!   remain). Mosquitto 2.0.11 does send stored, acknowledged messages again after a
//!   reconnect (in one run 2,567 of the 10,138 stored on a connection, every PubAck written
//!   before the DISCONNECT), so the notes must reach back as far as such a copy can. The
//!   broker resends its in-flight list in its original order, so a copy of a message stored on
//!   connection N arrives behind everything older than it: between its note and its copy lie
//!   at most the notes taken after it on N and the notes of older messages that were deferred
//!   and stored since. The buffer therefore keeps the last `max_delivery_notes` notes plus,
//!   per source, its deferred backlog's peak plus the most messages it stored on one
//!   connection of the backlog episode, counted from the episode's start
//!   ([`IngestMetrics`]' `mqtt_delivery_notes_pinned`; nothing outside an episode, where a
//!   copy comes first on the next connection and `max_delivery_notes` covers it: pinning
//!   whole connections there kept every note of a long-lived connection). With a window of
//!   `max_delivery_notes` alone the 1M drain benchmark stored 12,982 messages twice; with
//!   `max_delivery_notes` plus the backlog peak alone a 60,000-message flood with connections
//!   longer than the window still stored 2,807 twice. The bound is per source: copies of one
//!   source interleaved with a flood of another's share `max_delivery_notes`.
//! - A reconnect for deferred messages leaves cleanly: DISCONNECT goes out behind every queued
//!   PubAck (rumqttc writes one request per turn of its poll loop, and under an incoming flood
//!   a turn mostly reads, so this can take seconds; the source waits while something happens)
//!   and the source keeps reading, deferring what arrives, until the broker closes the
//!   connection. Closing the socket first, with the flood unread in it, sends a TCP RST, and
//!   Mosquitto then drops the connection without reading the PubAcks it had not read yet.
//! - Lost acknowledgements are remembered (the [`crate::ack`] ledger, in memory, at most
//!   [`crate::ack::MAX_OWED_KEYS`]): a PubAck fired for a durable record but not written
//!   before its connection ended, stale, or given up, and after a connection error the last
//!   ones written too. A DUP copy of such a message is acknowledged without being stored even
//!   when its note is gone (`kip_agent_mqtt_redeliveries_owed_total`).
//! - The connection is polled continuously whatever the buffer's state, so keep-alive pings
//!   and acknowledgements always flow. Backpressure does not rely on the broker's in-flight
//!   limit (Mosquitto 2.0.11 sends far more than `max_inflight_messages` unacknowledged
//!   messages, all of a queued backlog at once on session resume): messages read off the
//!   socket wait in a staging queue of at most `staging_capacity_messages` until the writer's
//!   channel has room. A message read while the staging is full is deferred: neither stored
//!   nor acknowledged, so the broker keeps it; once the staging drained and every
//!   acknowledgement went out, the source reconnects (clean DISCONNECT, same persistent
//!   session), and the broker sends the deferred messages again. Their DUP flag is ignored
//!   for redelivery detection (they were never stored).
//! - Packet ids are acknowledged in the order the broker can match them: a broker with more
//!   than 65,535 messages in flight for the session (Mosquitto 2.0.11 after a backlog) reuses
//!   packet ids among them, and a PUBACK removes the *first* in-flight message with that id
//!   (Mosquitto's `db__message_delete_outgoing`). So once a message with id X is deferred on
//!   a connection, every later message with id X on that connection is deferred too
//!   ([`HeldIds`]): acknowledging one of them would make the broker drop the deferred one,
//!   which was never stored (the loss of #19's 3,083 messages). The broker resends its
//!   in-flight messages in order on the next connection, where the ids start free again.
//! - rumqttc's request queue holds 65,536 entries, more than the packet ids a broker can have
//!   in flight, so firing an acknowledgement never blocks and never finds it full.
//! - A message whose PUBLISH packet exceeds `max_packet_size_bytes` (default 1 MiB) is
//!   acknowledged and kept as a dead letter naming its size and topic
//!   (`kip_agent_mqtt_oversized_messages_total`); the source carries on. rumqttc reads
//!   packets up to twice the limit on the same connection; a larger one makes it drop the
//!   connection once (it refuses to read it), and the next connection reads with a limit that
//!   fits that packet (memory for one such packet), so it too becomes a dead letter instead
//!   of a reconnect loop.
//! - Tokens belong to one connection: after a connection loss they are stale (rumqttc drops
//!   queued PubAcks then too) and the redelivered copy carries a fresh token. Every connection
//!   has its own rumqttc client and event loop (also after an error), so a PubAck queued by a
//!   token that fired just as the connection failed can never be written on the next
//!   connection, where the broker would match it to whatever is first in flight with its id.
//! - After `cancel` the source drops its staging (unacknowledged: the broker keeps it), reads
//!   no more messages but keeps the connection polled until the writer fired or dropped every
//!   token it issued (at most [`SHUTDOWN_ACK_WAIT`]), then sends DISCONNECT: a clean shutdown
//!   acknowledges everything it stored.
//!
//! - Broker failover (`failover_urls`): after a connection error (and its backoff) the next
//!   connection goes to the next broker of the list `url`, `failover_urls...` (wrapping). The
//!   persistent session is per broker: a broker the agent never connected to has no session
//!   for it, and what a dead broker queued for the agent is delivered only when the agent
//!   connects to that broker again (after the next failure of the one it moved to). The Gap
//!   record of the reconnect spans the failover. What is stored from each broker keeps the
//!   guarantees above (acknowledged after the flush, redeliveries recognised).
//!
//! When a received topic matches several subscriptions, the first one in config order maps it.

use std::{
    collections::{HashSet, VecDeque},
    path::Path,
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use kip_shared::backoff::Backoff;
use kip_shared::{DeadLetter, Gap, Quality, Reading, Record, record::DEAD_LETTER_PREFIX_BYTES};
use prometheus_client::metrics::gauge::Gauge;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    ack::{AckToken, Connection},
    config::{MQTT_MAX_PACKET_BYTES, MqttBrokerConfig, Subscription, ValueFormat},
    metrics::{IngestMetrics, ReadingLabels},
    source::{AckHandle, Delivery, Envelope, Sink, Source, SourceKind, SourceTask},
};

/// Capacity of rumqttc's request queue (subscriptions and PubAcks): more than the packet ids
/// a broker can have in flight, so an acknowledgement never finds it full. Under an incoming
/// flood rumqttc writes one request per turn of its poll loop, so the queue can hold many.
const REQUEST_QUEUE_CAPACITY: usize = 65_536;

/// How often a source with deferred messages checks whether its staging drained.
const DEFERRED_CHECK: Duration = Duration::from_millis(20);

/// How long [`disconnect`] waits for the next event (a queued acknowledgement or the DISCONNECT
/// written, a message read, the broker closing the connection) before it gives up on a clean
/// leave.
const DISCONNECT_STALL: Duration = Duration::from_secs(1);

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
    /// This source's per-message counters, looked up once (a lookup in a labelled family
    /// allocates its labels and hashes them: measurable at tens of thousands of messages/s).
    counters: SourceCounters,
}

/// Handles into [`IngestMetrics`] for one source.
#[derive(Debug)]
struct SourceCounters {
    readings_per_source: prometheus_client::metrics::counter::Counter,
    dead_letters: prometheus_client::metrics::counter::Counter,
    /// `kip_agent_readings` per metric name, filled as metrics appear. Bounded by the
    /// metric names the subscriptions produce; past [`MAX_CACHED_METRICS`] names a lookup
    /// goes to the family each time.
    readings: std::sync::Mutex<
        std::collections::HashMap<String, prometheus_client::metrics::counter::Counter>,
    >,
}

/// Metric names whose reading counter a source keeps at hand.
const MAX_CACHED_METRICS: usize = 1024;

/// rumqttc options for `cfg`'s connection (TLS files are read here, so a fixed file is picked
/// up at the next reconnect).
pub(crate) fn broker_options(
    cfg: &MqttBrokerConfig,
    clean_session: bool,
) -> Result<MqttOptions, MqttError> {
    broker_options_at(cfg, &cfg.endpoint, clean_session)
}

/// [`broker_options`] for broker `ep` of the source (its `url` or one of `failover_urls`).
fn broker_options_at(
    cfg: &MqttBrokerConfig,
    ep: &kip_shared::mqtt::MqttEndpoint,
    clean_session: bool,
) -> Result<MqttOptions, MqttError> {
    // rumqttc formats "{host}:{port}" before resolving: an IPv6 literal needs its brackets.
    let mut opts = MqttOptions::new(&cfg.client_id, ep.socket_host(), ep.port());
    opts.set_keep_alive(cfg.keep_alive);
    opts.set_clean_session(clean_session);
    if let Some(tls) = ep.tls() {
        let tls = tls_client_config(
            &tls.ca_file,
            tls.client_auth
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    Ok(opts)
}

/// The read limit handed to rumqttc for `max_packet_size_bytes`: a packet up to twice the
/// limit is read and dead-lettered on the same connection; a larger one makes rumqttc drop
/// the connection once, and the next connection reads with a limit that fits it.
pub fn read_limit(max_packet_size_bytes: usize) -> usize {
    max_packet_size_bytes
        .saturating_mul(2)
        .min(MQTT_MAX_PACKET_BYTES)
}

/// sha256 over a message's topic and payload (the topic length first, so that the split
/// between the two is part of the digest).
pub fn message_digest(topic: &str, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((topic.len() as u64).to_be_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    h.finalize().into()
}

/// The packet size rumqttc refused to read, when that is why the connection failed.
fn oversized_packet(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// Why [`MqttSource::drive`] returned.
enum End {
    /// Cancelled (`linger`: still connected, worth waiting for the last acknowledgements) or
    /// the writer is gone.
    Stop { linger: bool },
    /// Open a new connection (new options): deferred messages to fetch again, or a larger
    /// read limit.
    Reopen,
    /// The connection failed and the source has further brokers: connect to the next one.
    NextBroker,
}

/// What a source carries across its connections.
struct State {
    /// Read off the connection, waiting for room in the writer's channel (bounded by
    /// `staging_capacity_messages`; gaps are not counted against it).
    staged: VecDeque<Envelope>,
    /// First transmissions of QoS 1 messages read but not handed over (staging full, or read
    /// while leaving), by [`deferred_key`]: the broker redelivers them with DUP set, and that
    /// copy must not be matched against a delivery note of an earlier identical message with
    /// the same packet id. At most [`MAX_DEFERRED_KEYS`] (8 bytes each).
    deferred: HashSet<u64>,
    /// Messages deferred on the current connection: once the staging drained and every
    /// acknowledgement went out, the source reconnects so the broker sends them again.
    deferred_now: u64,
    /// Packet ids with a message deferred on the current connection (cleared at ConnAck).
    held: HeldIds,
    /// Since when and why the source is disconnected (closed with a gap at the next ConnAck).
    disconnected_since: Option<(DateTime<Utc>, String)>,
    /// rumqttc's incoming packet limit.
    read_limit: usize,
    /// This source's share of [`IngestMetrics::mqtt_deferred_backlog`]: the peak of
    /// `deferred.len()` since it was last empty.
    backlog_peak: usize,
    /// Messages handed over with a delivery note on the current connection since the
    /// current backlog episode began (0 outside one).
    noted_now: usize,
    /// The most messages handed over on one connection of the current backlog episode
    /// (connections ended since `backlog_peak` was last 0).
    noted_longest: usize,
    /// This source's share of [`IngestMetrics::mqtt_delivery_notes_pinned`].
    pinned: usize,
}

impl State {
    /// Updates the backlog peak (reset once nothing deferred is outstanding) and the shared
    /// gauge the buffer sizes its delivery-note window by.
    ///
    /// Also updates the notes this source needs kept (`pinned`), see the module docs: a
    /// message stored on connection N whose PubAck the broker did not take comes back behind
    /// everything older in the broker's in-flight list, on connection N+1 or, if that one ended
    /// first, a later one. Between its note and its copy lie at most the notes taken after it
    /// on N (at most N's length) and those of older messages that were deferred (at most the
    /// backlog peak); messages of later connections come behind the copy.
    fn track_backlog(&mut self, backlog: &Gauge, pinned: &Gauge) {
        let outstanding = self.deferred.len();
        let peak = if outstanding == 0 && self.deferred_now == 0 {
            0
        } else {
            self.backlog_peak.max(outstanding)
        };
        move_share(backlog, &mut self.backlog_peak, peak);
        let want = if peak == 0 {
            // No episode: nothing is pinned beyond `max_delivery_notes`, so a connection that
            // stays up for days does not keep every note it took (the 1M benchmark pinned a
            // million notes, 73 MiB of RSS, before this). The episode's count starts here.
            self.noted_now = 0;
            self.noted_longest = 0;
            0
        } else {
            peak.saturating_add(self.noted_longest.max(self.noted_now))
        };
        move_share(pinned, &mut self.pinned, want);
    }

    /// A connection ended: its length counts for the notes kept until the backlog episode
    /// it belongs to is over.
    fn connection_ended(&mut self) {
        self.noted_longest = self.noted_longest.max(self.noted_now);
        self.noted_now = 0;
    }
}

/// Moves this source's share of a summed gauge from `*share` to `want`.
fn move_share(gauge: &Gauge, share: &mut usize, want: usize) {
    if want != *share {
        let delta =
            i64::try_from(want).unwrap_or(i64::MAX) - i64::try_from(*share).unwrap_or(i64::MAX);
        gauge.inc_by(delta);
        *share = want;
    }
}

/// The packet ids that have a message deferred (left unacknowledged) on the current
/// connection, as a bitset over all 65,536 ids (8 KiB).
///
/// A broker matches a PUBACK to the first in-flight message with that packet id; while an
/// earlier message with id X waits unacknowledged, a later one with id X must not be
/// acknowledged either, or the broker would drop the earlier one. [`admit`] keeps that rule.
#[derive(Debug)]
pub struct HeldIds(Vec<u64>);

impl Default for HeldIds {
    fn default() -> Self {
        Self(vec![0; (usize::from(u16::MAX) + 1) / 64])
    }
}

impl HeldIds {
    fn slot(id: u16) -> (usize, u64) {
        (usize::from(id) / 64, 1 << (id % 64))
    }

    /// Is a message with `id` deferred on this connection?
    pub fn contains(&self, id: u16) -> bool {
        let (i, bit) = Self::slot(id);
        self.0.get(i).is_some_and(|w| w & bit != 0)
    }

    fn insert(&mut self, id: u16) {
        let (i, bit) = Self::slot(id);
        if let Some(w) = self.0.get_mut(i) {
            *w |= bit;
        }
    }

    /// A new connection: the broker resends its in-flight messages in order, every id is free.
    pub fn clear(&mut self) {
        self.0.fill(0);
    }
}

/// Whether a QoS 1 message with packet id `id`, received now, may be handed over (stored and
/// later acknowledged) on this connection: not when the staging is full, and not when an
/// earlier message with the same id was deferred on it (its PUBACK would remove that one at
/// the broker). A message not admitted is deferred and holds its id until the next
/// connection.
pub fn admit(held: &mut HeldIds, id: u16, staging_full: bool) -> bool {
    if staging_full || held.contains(id) {
        held.insert(id);
        false
    } else {
        true
    }
}

/// Deferred messages remembered by [`State::deferred`]; beyond it (a broker pushing more than
/// this at once) the guard is skipped for further ones: see `docs/operations.md`.
const MAX_DEFERRED_KEYS: usize = 1 << 20;

/// Identifies a deferred message: packet id and content (packet ids repeat among the
/// messages in flight when a broker has more than 65,535 of them out).
fn deferred_key(pkid: u16, digest: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b) ^ u64::from(pkid)
}

/// Remembers a first transmission (DUP clear) that was read but not handed over, so that its
/// redelivery is stored rather than matched against an older note. A redelivery that is
/// deferred again changes nothing: it was stored before (and has a note) or it was not.
fn defer(deferred: &mut HashSet<u64>, p: &rumqttc::Publish) {
    if p.qos != QoS::AtMostOnce && !p.dup && deferred.len() < MAX_DEFERRED_KEYS {
        deferred.insert(deferred_key(p.pkid, &message_digest(&p.topic, &p.payload)));
    }
}

/// Hands staged envelopes to the writer while its channel has room, without waiting.
/// `Err` when the writer is gone.
fn pump(tx: &Sink, staged: &mut VecDeque<Envelope>) -> Result<(), ()> {
    while !staged.is_empty() {
        match tx.try_reserve() {
            Ok(permit) => {
                if let Some(e) = staged.pop_front() {
                    permit.send(e);
                }
            }
            Err(mpsc::error::TrySendError::Full(())) => break,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(()),
        }
    }
    Ok(())
}

impl Source for MqttSource {
    fn name(&self) -> &str {
        self.cfg.name.as_str()
    }
    fn kind(&self) -> SourceKind {
        SourceKind::Mqtt
    }
    fn run(self: Box<Self>, sink: Sink, cancel: CancellationToken) -> SourceTask {
        Box::pin(MqttSource::run(*self, sink, cancel))
    }
}

impl MqttSource {
    /// A source for `cfg`, counting into `metrics`.
    pub fn new(cfg: MqttBrokerConfig, metrics: IngestMetrics) -> Self {
        let labels = IngestMetrics::source(cfg.name.as_str());
        let counters = SourceCounters {
            readings_per_source: metrics.readings_per_source.get_or_create(&labels).clone(),
            dead_letters: metrics.dead_letters.get_or_create(&labels).clone(),
            readings: std::sync::Mutex::default(),
        };
        Self {
            cfg,
            metrics,
            counters,
        }
    }

    /// Counts one reading of `metric`.
    fn count_reading(&self, metric: &str) {
        self.counters.readings_per_source.inc();
        let mut cache = self
            .counters
            .readings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = cache.get(metric) {
            c.inc();
            return;
        }
        let c = self
            .metrics
            .readings
            .get_or_create(&ReadingLabels {
                source: self.cfg.name.as_str().to_owned(),
                metric: metric.to_owned(),
            })
            .clone();
        c.inc();
        if cache.len() < MAX_CACHED_METRICS {
            cache.insert(metric.to_owned(), c);
        }
    }

    /// The configured source name.
    pub fn name(&self) -> &str {
        self.cfg.name.as_str()
    }

    /// Broker `i` of `url`, `failover_urls...` (wrapping).
    fn broker(&self, i: usize) -> &kip_shared::mqtt::MqttEndpoint {
        let n = 1 + self.cfg.failover_endpoints.len();
        match i % n {
            0 => &self.cfg.endpoint,
            j => self
                .cfg
                .failover_endpoints
                .get(j - 1)
                .unwrap_or(&self.cfg.endpoint),
        }
    }

    fn options(&self, broker: usize, read_limit: usize) -> Result<MqttOptions, MqttError> {
        let mut opts = broker_options_at(&self.cfg, self.broker(broker), false)?;
        // PubAck only once the record is durable (the receiver fires the AckToken).
        opts.set_manual_acks(true);
        // Outgoing packets are subscriptions and acknowledgements: small.
        opts.set_max_packet_size(read_limit, 64 * 1024);
        Ok(opts)
    }

    /// Runs until `cancel` fires or `tx` closes. Configuration errors (unreadable
    /// certificates) are logged and retried at the maximum backoff, so fixing the files
    /// brings the source up without a restart.
    ///
    /// Each message goes out with an [`AckToken`]; the broker gets its PubAck only when the
    /// receiver fires the token. After `cancel` the source drops what it staged (not
    /// acknowledged: the broker keeps it) and keeps the connection polled until every token it
    /// issued was fired or dropped (bounded by [`SHUTDOWN_ACK_WAIT`]), so the final flush's
    /// acknowledgements reach the broker, then disconnects.
    pub async fn run(self, tx: Sink, cancel: CancellationToken) {
        let labels = IngestMetrics::source(self.name());
        let mut backoff = Backoff::new(
            self.cfg.reconnect_min_backoff,
            self.cfg.reconnect_max_backoff,
        );
        let connection = Connection::default();
        let mut st = State {
            staged: VecDeque::new(),
            deferred: HashSet::new(),
            deferred_now: 0,
            held: HeldIds::default(),
            disconnected_since: None,
            read_limit: read_limit(self.cfg.max_packet_size_bytes),
            backlog_peak: 0,
            noted_now: 0,
            noted_longest: 0,
            pinned: 0,
        };
        let mut broker = 0usize;
        loop {
            let opts = match self.options(broker, st.read_limit) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(source = self.name(), error = %e, "mqtt source cannot start");
                    if self
                        .pause(self.cfg.reconnect_max_backoff, &tx, &mut st, &cancel)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
            };
            let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_QUEUE_CAPACITY);
            let end = self
                .drive(
                    &client,
                    &mut eventloop,
                    &tx,
                    &connection,
                    &cancel,
                    &mut backoff,
                    &mut st,
                    &labels,
                )
                .await;
            st.connection_ended();
            // Tokens of this connection are stale from here on, except while a stop lingers
            // on it to send the acknowledgements the writer still fires (the connection is
            // alive until then; making them stale first left every one of them unsent).
            if !matches!(end, End::Stop { linger: true }) {
                connection.lost();
            }
            match end {
                End::Reopen => continue,
                End::NextBroker => {
                    broker = (broker + 1) % (1 + self.cfg.failover_endpoints.len());
                    let ep = self.broker(broker);
                    tracing::warn!(source = self.name(), broker = %format!("{}:{}", ep.socket_host(), ep.port()),
                        "mqtt broker failover: connecting to the next broker of the source");
                    continue;
                }
                End::Stop { linger } => {
                    // Not acknowledged: the broker keeps these for the next session.
                    st.staged.clear();
                    self.metrics.mqtt_staged.get_or_create(&labels).set(0);
                    if linger {
                        self.linger(&client, &mut eventloop, &connection).await;
                    }
                    break;
                }
            }
        }
        connection.close();
        // A stopped source holds no backlog (the next run starts counting again).
        st.deferred.clear();
        st.deferred_now = 0;
        st.noted_longest = 0;
        st.track_backlog(
            &self.metrics.mqtt_deferred_backlog,
            &self.metrics.mqtt_delivery_notes_pinned,
        );
        self.metrics.connected.get_or_create(&labels).set(0);
    }

    /// Sleeps for `d` while handing staged envelopes over. `Err` when cancelled or the writer
    /// is gone.
    async fn pause(
        &self,
        d: Duration,
        tx: &Sink,
        st: &mut State,
        cancel: &CancellationToken,
    ) -> Result<(), End> {
        let until = tokio::time::Instant::now() + d;
        loop {
            pump(tx, &mut st.staged).map_err(|()| End::Stop { linger: false })?;
            tokio::select! {
                () = cancel.cancelled() => return Err(End::Stop { linger: false }),
                () = tokio::time::sleep_until(until) => return Ok(()),
                permit = tx.reserve(), if !st.staged.is_empty() => match permit {
                    Ok(p) => if let Some(e) = st.staged.pop_front() { p.send(e) },
                    Err(_) => return Err(End::Stop { linger: false }),
                },
            }
        }
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
                    return;
                },
            }
        }
        disconnect(client, eventloop, conn, &mut HashSet::new()).await;
    }

    /// Drives one client until `cancel`, the writer closing, or a reason to reopen. The
    /// connection is polled whatever the writer's state: incoming messages go to the staging
    /// (or, when it is full, are deferred), so pings and acknowledgements always flow.
    #[expect(clippy::too_many_arguments, reason = "one private call site")]
    async fn drive(
        &self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        tx: &Sink,
        connection: &Connection,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
        st: &mut State,
        labels: &crate::metrics::SourceLabels,
    ) -> End {
        let name = self.cfg.name.as_str();
        let staged_gauge = self.metrics.mqtt_staged.get_or_create(labels).clone();
        let mut connected = false;
        let mut check = tokio::time::interval(DEFERRED_CHECK);
        loop {
            if pump(tx, &mut st.staged).is_err() {
                return End::Stop { linger: false };
            }
            staged_gauge.set(i64::try_from(st.staged.len()).unwrap_or(i64::MAX));
            st.track_backlog(
                &self.metrics.mqtt_deferred_backlog,
                &self.metrics.mqtt_delivery_notes_pinned,
            );
            if connected
                && st.deferred_now > 0
                && st.staged.is_empty()
                && connection.tokens_alive() == 0
            {
                // Everything read was stored and acknowledged: reconnect so the broker sends
                // the deferred messages again (MQTT 3.1.1 redelivers only on a new connection).
                tracing::info!(
                    source = name,
                    deferred = st.deferred_now,
                    "mqtt backlog stored; reconnecting to fetch the deferred messages"
                );
                let unwritten_before = connection.acks_unwritten();
                let clean = disconnect(client, eventloop, connection, &mut st.deferred).await;
                let unwritten = connection.acks_unwritten();
                // Unwritten PubAcks: their messages are stored and come back; the ledger
                // recognises them. Written ones count as delivered even when the broker's
                // close was not seen (`clean` false: in the 1M benchmark it never was):
                // owing them would keep up to 65,536 keys of settled messages per reconnect,
                // which only widen the identical-message window; a copy the broker sends
                // anyway is recognised by its note (the window covers the backlog).
                connection.ended(true);
                tracing::info!(
                    source = name,
                    acks_queued_at_disconnect = unwritten_before,
                    acks_unwritten = unwritten,
                    disconnect_written = clean,
                    deferred_keys = st.deferred.len(),
                    owed = connection.owed(),
                    "mqtt disconnected to fetch the deferred messages"
                );
                self.metrics
                    .mqtt_acks_unwritten
                    .get_or_create(labels)
                    .inc_by(unwritten as u64);
                st.deferred_now = 0;
                return End::Reopen;
            }
            let event = tokio::select! {
                () = cancel.cancelled() => return End::Stop { linger: connected },
                permit = tx.reserve(), if !st.staged.is_empty() => {
                    match permit {
                        Ok(p) => if let Some(e) = st.staged.pop_front() { p.send(e) },
                        Err(_) => return End::Stop { linger: false },
                    }
                    continue;
                }
                _ = check.tick(), if st.deferred_now > 0 => continue,
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
                    // The broker resends its in-flight messages in order from here: no id is
                    // held by a message deferred on this connection yet.
                    st.held.clear();
                    for sub in &self.cfg.subscriptions {
                        if let Err(e) = client.try_subscribe(&sub.topic, QoS::AtLeastOnce) {
                            tracing::error!(source = name, topic = %sub.topic, error = %e, "mqtt subscribe request failed");
                        }
                    }
                    if let Some((from, reason)) = st.disconnected_since.take() {
                        st.staged.push_back(Envelope::plain(Record::Gap(Gap {
                            source: name.to_owned(),
                            from,
                            to: Utc::now(),
                            reason,
                        })));
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
                    self.take(client, connection, st, labels, p);
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(_))) => connection.ack_written(),
                Ok(_) => {}
                Err(e) => {
                    // rumqttc dropped the PubAcks it had not written; the last ones it wrote
                    // may not have reached the broker either. Their messages are stored and
                    // come back: the ledger keeps them as owed.
                    let unwritten = connection.acks_unwritten();
                    connection.ended(false);
                    if unwritten > 0 {
                        tracing::warn!(
                            source = name,
                            acks_unwritten = unwritten,
                            "mqtt connection lost with acknowledgements not written; the broker redelivers those messages"
                        );
                    }
                    self.metrics
                        .mqtt_acks_unwritten
                        .get_or_create(labels)
                        .inc_by(unwritten as u64);
                    // rumqttc dropped the PubAcks still queued; tokens of this connection
                    // are stale from now on (the broker redelivers their messages).
                    connection.lost();
                    // The broker sends the deferred messages again on the next connection.
                    st.deferred_now = 0;
                    self.metrics.connected.get_or_create(labels).set(0);
                    self.metrics.reconnects.get_or_create(labels).inc();
                    if st.disconnected_since.is_none() {
                        st.disconnected_since =
                            Some((Utc::now(), format!("mqtt connection lost: {e}")));
                    }
                    if let Some(n) = oversized_packet(&e) {
                        let wanted = n.saturating_add(5).min(MQTT_MAX_PACKET_BYTES);
                        if wanted > st.read_limit {
                            tracing::warn!(
                                source = name,
                                packet_bytes = n,
                                max_packet_size_bytes = self.cfg.max_packet_size_bytes,
                                "mqtt message above the read limit: reconnecting to read it \
                                 once and keep it as a dead letter"
                            );
                            st.read_limit = wanted;
                            return End::Reopen;
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(source = name, error = %e, retry_in_ms = delay.as_millis() as u64, "mqtt connection error");
                    if let Err(end) = self.pause(delay, tx, st, cancel).await {
                        return end;
                    }
                    if !self.cfg.failover_endpoints.is_empty() {
                        return End::NextBroker;
                    }
                    // A fresh client: a token that fired between rumqttc dropping its queued
                    // PubAcks and `connection.lost()` above queued its PubAck in the old
                    // client's request queue, which rumqttc would write on the next connection
                    // of the same event loop (matched there to the first message in flight
                    // with that packet id, whatever it is).
                    return End::Reopen;
                }
            }
        }
    }

    /// One received PUBLISH: staged as a record (with its acknowledgement and delivery note)
    /// or, when the staging is full, deferred (left unacknowledged for a later redelivery).
    fn take(
        &self,
        client: &AsyncClient,
        connection: &Connection,
        st: &mut State,
        labels: &crate::metrics::SourceLabels,
        p: rumqttc::Publish,
    ) {
        let qos1 = p.qos != QoS::AtMostOnce;
        let staging_full = st.staged.len() >= self.cfg.staging_capacity_messages;
        let admitted = if qos1 {
            admit(&mut st.held, p.pkid, staging_full)
        } else {
            !staging_full
        };
        if !admitted {
            if qos1 {
                if !staging_full {
                    // Room, but an earlier message with this id waits unacknowledged.
                    self.metrics
                        .mqtt_deferred_same_id
                        .get_or_create(labels)
                        .inc();
                }
                defer(&mut st.deferred, &p);
                tracing::trace!(pkid = p.pkid, dup = p.dup, payload = %String::from_utf8_lossy(&p.payload[..p.payload.len().min(16)]), "mqtt message deferred");
                st.deferred_now += 1;
                self.metrics.mqtt_deferred.get_or_create(labels).inc();
            } else {
                // QoS 0 has no redelivery: the broker already forgot it.
                self.metrics.records_dropped.inc();
            }
            return;
        }
        let record = self.to_record(&p.topic, &p.payload, p.size());
        let mut stored_before = false;
        let (ack, delivery) = if qos1 {
            let digest = message_digest(&p.topic, &p.payload);
            let key = deferred_key(p.pkid, &digest);
            // This copy is the redelivery of one read earlier but never handed over.
            let was_deferred = !st.deferred.is_empty() && st.deferred.remove(&key);
            // This copy is the redelivery of one stored earlier whose PubAck was lost.
            stored_before = p.dup && connection.take_owed(key);
            st.noted_now += 1;
            tracing::trace!(pkid = p.pkid, dup = p.dup, was_deferred, payload = %String::from_utf8_lossy(&p.payload[..p.payload.len().min(16)]), "mqtt message staged");
            (
                Some(AckHandle::new(AckToken::new(client, &p, connection, key))),
                Some(Delivery {
                    session: self.cfg.client_id.clone(),
                    id: p.pkid,
                    digest,
                    redelivered: p.dup && !was_deferred,
                }),
            )
        } else {
            (None, None)
        };
        st.staged.push_back(Envelope {
            record,
            ack,
            delivery,
            stored_before,
        });
    }

    fn to_record(&self, topic: &str, payload: &[u8], packet_bytes: usize) -> Record {
        let name = self.cfg.name.as_str();
        let now = Utc::now();
        if packet_bytes > self.cfg.max_packet_size_bytes {
            self.metrics
                .mqtt_oversized
                .get_or_create(&IngestMetrics::source(name))
                .inc();
            self.metrics
                .dead_letters
                .get_or_create(&IngestMetrics::source(name))
                .inc();
            tracing::warn!(
                source = name,
                topic,
                packet_bytes,
                max_packet_size_bytes = self.cfg.max_packet_size_bytes,
                "mqtt message too large: kept as a dead letter"
            );
            let reason = format!(
                "message of {packet_bytes} bytes exceeds max_packet_size_bytes ({})",
                self.cfg.max_packet_size_bytes
            );
            return Record::DeadLetter(dead_letter(name, topic, reason, payload, now));
        }
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
                self.count_reading(&r.metric);
                Record::Reading(r)
            }
            Err(reason) => {
                self.counters.dead_letters.inc();
                tracing::debug!(source = name, topic, %reason, "mqtt message dead-lettered");
                Record::DeadLetter(dead_letter(name, topic, reason, payload, now))
            }
        }
    }
}

/// Sends DISCONNECT and keeps polling until the broker closed the connection, so that the
/// broker read every acknowledgement queued before it. Two things lost acknowledgements here:
/// rumqttc writes its requests in order, one per turn of its poll loop, and under an incoming
/// flood a turn mostly reads, so tens of thousands of queued PubAcks take seconds to write;
/// and closing the socket ourselves with the flood unread in our receive buffer sends a TCP
/// RST, on which Mosquitto drops the connection without reading what it had not read yet
/// (the last PubAcks and the DISCONNECT): those messages stay in flight at the broker although
/// they are stored, and come back behind the deferred backlog. It gives up only when nothing
/// happened for [`DISCONNECT_STALL`]. Messages read meanwhile are not handed over, so their
/// ids go to `deferred`. True when the broker closed the connection (end of stream) after our
/// DISCONNECT.
async fn disconnect(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    connection: &Connection,
    deferred: &mut HashSet<u64>,
) -> bool {
    if client.try_disconnect().is_err() {
        return false;
    }
    let mut until = tokio::time::Instant::now() + DISCONNECT_STALL;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return false,
            ev = eventloop.poll() => {
                until = tokio::time::Instant::now() + DISCONNECT_STALL;
                match ev {
                    // The broker closes the connection (end of stream) once it processed our
                    // DISCONNECT, and with it every PubAck before it.
                    Err(e) => {
                        return matches!(
                            e,
                            rumqttc::ConnectionError::MqttState(
                                rumqttc::StateError::ConnectionAborted
                            )
                        );
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(_))) => connection.ack_written(),
                    Ok(Event::Incoming(Packet::Publish(p))) => defer(deferred, &p),
                    Ok(_) => {}
                }
            },
        }
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

    fn state() -> State {
        State {
            staged: VecDeque::new(),
            deferred: HashSet::new(),
            deferred_now: 0,
            held: HeldIds::default(),
            disconnected_since: None,
            read_limit: 0,
            backlog_peak: 0,
            noted_now: 0,
            noted_longest: 0,
            pinned: 0,
        }
    }

    #[test]
    fn the_pinned_notes_reach_back_over_the_longest_connection_of_a_backlog_episode() {
        let (backlog, pinned) = (Gauge::default(), Gauge::default());
        let mut st = state();
        // No backlog: nothing pinned, however long the connection.
        st.noted_now = 1_000_000;
        st.track_backlog(&backlog, &pinned);
        assert_eq!((backlog.get(), pinned.get()), (0, 0));
        assert_eq!(st.noted_now, 0, "an episode counts from its start");

        // A backlog episode: 3,000 deferred, then connections of 10,000 and 2,000 stored.
        st.deferred.extend(0..3_000);
        st.deferred_now = 3_000;
        st.track_backlog(&backlog, &pinned);
        st.noted_now = 10_000;
        st.track_backlog(&backlog, &pinned);
        assert_eq!((backlog.get(), pinned.get()), (3_000, 13_000));
        st.connection_ended();
        st.deferred_now = 0;
        st.noted_now = 2_000;
        st.deferred.retain(|k| *k >= 2_000);
        st.track_backlog(&backlog, &pinned);
        assert_eq!(
            (backlog.get(), pinned.get()),
            (3_000, 13_000),
            "the 10,000-message connection stays pinned while its episode lasts"
        );
        st.connection_ended();
        st.noted_now = 500;
        st.deferred.clear();
        st.track_backlog(&backlog, &pinned);
        assert_eq!(
            (backlog.get(), pinned.get()),
            (0, 0),
            "once nothing is deferred, max_delivery_notes alone (the window shrinks gradually)"
        );
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
    fn a_packet_id_deferred_on_a_connection_holds_later_messages_with_that_id() {
        let mut held = HeldIds::default();
        // Room: admitted.
        assert!(admit(&mut held, 7, false));
        // Staging full: deferred, id 7 held from now on.
        assert!(!admit(&mut held, 7, true));
        // Room again, but an earlier message with id 7 waits unacknowledged at the broker: a
        // PUBACK for this one would remove that one. Other ids (even the extremes) are free.
        assert!(!admit(&mut held, 7, false));
        assert!(admit(&mut held, 8, false));
        assert!(admit(&mut held, 0, false));
        assert!(admit(&mut held, u16::MAX, false));
        assert!(!admit(&mut held, u16::MAX, true));
        assert!(held.contains(u16::MAX) && held.contains(7) && !held.contains(8));
        // The next connection: the broker resends in order, every id starts free.
        held.clear();
        assert!(admit(&mut held, 7, false));
        assert!(admit(&mut held, u16::MAX, false));
    }

    #[test]
    fn dead_letters_keep_only_the_first_bytes() {
        let payload = vec![b'x'; 1000];
        let d = dead_letter("b", "t", "r".into(), &payload, now());
        assert_eq!(d.payload_prefix.len(), DEAD_LETTER_PREFIX_BYTES);
    }
}
