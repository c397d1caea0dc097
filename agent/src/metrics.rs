//! Prometheus metrics of the agent's ingest path.
//!
//! Invariants:
//! - Every metric lives in one [`Registry`] with the `kip_agent` prefix; sources and the
//!   buffer register their own metrics into it (the OPC UA source takes `&mut Registry`).
//! - Label values are configured names (source names, configured metrics or topic levels
//!   selected by a configured mapping), never raw payload content.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Labels of per-source metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// Labels of per-source, per-metric metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadingLabels {
    pub source: String,
    pub metric: String,
}

/// Counters shared by the sources (cheap to clone: every field is an `Arc` inside).
#[derive(Clone, Debug, Default)]
pub struct IngestMetrics {
    pub readings: Family<ReadingLabels, Counter>,
    pub dead_letters: Family<SourceLabels, Counter>,
    pub reconnects: Family<SourceLabels, Counter>,
    pub connected: Family<SourceLabels, Gauge>,
    /// Records the buffer writer stored / could not store.
    pub records_buffered: Counter,
    pub records_dropped: Counter,
    /// MQTT messages acknowledged to the broker once their records were durable / whose
    /// acknowledgement could not be sent (the broker redelivers those).
    pub mqtt_acks_sent: Counter,
    pub mqtt_acks_failed: Counter,
    /// MQTT redeliveries recognised by their delivery note and acknowledged without being
    /// stored again.
    pub mqtt_redeliveries_skipped: Counter,
    /// Of the skipped redeliveries, those recognised by the source's ledger of lost
    /// acknowledgements rather than by a delivery note (the note had left the window).
    pub mqtt_redeliveries_owed: Counter,
    /// MQTT messages marked as redeliveries (DUP) without a delivery note: never stored
    /// before (read but not stored when the connection or the agent went), stored now.
    pub mqtt_redeliveries_stored: Counter,
    /// MQTT messages above `max_packet_size_bytes`, kept as dead letters, by source.
    pub mqtt_oversized: Family<SourceLabels, Counter>,
    /// MQTT messages read while the source's staging was full: left unacknowledged (the
    /// broker keeps them) and fetched again by a reconnect, by source.
    pub mqtt_deferred: Family<SourceLabels, Counter>,
    /// Of those, messages deferred with room in the staging, because an earlier message with
    /// the same packet id is unacknowledged on the connection (see [`crate::mqtt::admit`]).
    pub mqtt_deferred_same_id: Family<SourceLabels, Counter>,
    /// MQTT acknowledgements queued for the broker but not written when their connection
    /// ended (the broker redelivers those messages), by source.
    pub mqtt_acks_unwritten: Family<SourceLabels, Counter>,
    /// The MQTT sources' deferred backlog, summed: the peak of each source's outstanding
    /// deferred messages since its backlog was last empty. The buffer keeps this many delivery
    /// notes beyond `max_delivery_notes` (a stored message the broker sends again comes back
    /// behind that backlog).
    pub mqtt_deferred_backlog: Gauge,
    /// Delivery notes the MQTT sources need kept beyond `max_delivery_notes`, summed: per
    /// source its deferred backlog peak plus the most messages it stored on one connection
    /// of the current backlog episode, counted from the episode's start (0 outside one: a
    /// copy of a message stored without a backlog is covered by `max_delivery_notes`).
    /// See [`crate::mqtt`] for why this bounds how far back a re-sent copy can reach.
    pub mqtt_delivery_notes_pinned: Gauge,
    /// Messages held in a source's staging (read off the connection, not yet handed to the
    /// writer), by source.
    pub mqtt_staged: Family<SourceLabels, Gauge>,
    /// Readings per source, for `kip-agent status` (not exported: `readings` has it).
    pub readings_per_source: Family<SourceLabels, Counter>,
}

impl IngestMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "readings",
            "Readings received, by source and metric",
            m.readings.clone(),
        );
        registry.register(
            "dead_letters",
            "Payloads that did not map to a reading (kept as dead-letter records), by source",
            m.dead_letters.clone(),
        );
        registry.register(
            "source_reconnects",
            "Connection losses followed by a reconnect attempt, by source",
            m.reconnects.clone(),
        );
        registry.register(
            "source_connected",
            "1 while the source holds an authenticated, subscribed connection",
            m.connected.clone(),
        );
        registry.register(
            "records_buffered",
            "Records written to the buffer",
            m.records_buffered.clone(),
        );
        registry.register(
            "records_dropped",
            "Records the buffer rejected (full with nothing evictable, or a storage error)",
            m.records_dropped.clone(),
        );
        registry.register(
            "mqtt_acks_sent",
            "MQTT messages acknowledged to the broker after their records became durable",
            m.mqtt_acks_sent.clone(),
        );
        registry.register(
            "mqtt_acks_failed",
            "MQTT acknowledgements not sent (connection lost or source stopped); the broker \
             redelivers those messages on the next connection",
            m.mqtt_acks_failed.clone(),
        );
        registry.register(
            "mqtt_redeliveries_skipped",
            "MQTT redeliveries (DUP, same packet id, topic and payload as a stored message) \
             acknowledged without storing them again",
            m.mqtt_redeliveries_skipped.clone(),
        );
        registry.register(
            "mqtt_redeliveries_owed",
            "Of the skipped MQTT redeliveries, those of stored messages whose acknowledgement was \
             lost, recognised by the source after their delivery note had left the window",
            m.mqtt_redeliveries_owed.clone(),
        );
        registry.register(
            "mqtt_redeliveries_stored",
            "MQTT messages with DUP set but no delivery note (never stored before), stored",
            m.mqtt_redeliveries_stored.clone(),
        );
        registry.register(
            "mqtt_oversized_messages",
            "MQTT messages larger than max_packet_size_bytes, kept as dead letters, by source",
            m.mqtt_oversized.clone(),
        );
        registry.register(
            "mqtt_deferred_messages",
            "MQTT messages left unacknowledged because the source's staging was full; the \
             broker redelivers them after a reconnect, by source",
            m.mqtt_deferred.clone(),
        );
        registry.register(
            "mqtt_deferred_same_id_messages",
            "MQTT messages deferred because an earlier message with the same packet id is \
             unacknowledged on the connection (a broker with more than 65,535 in flight \
             reuses ids and matches a PUBACK to the first), by source",
            m.mqtt_deferred_same_id.clone(),
        );
        registry.register(
            "mqtt_deferred_backlog_messages",
            "Peak of the MQTT sources' outstanding deferred messages since their backlog was \
             last empty; the buffer keeps this many delivery notes beyond max_delivery_notes",
            m.mqtt_deferred_backlog.clone(),
        );
        registry.register(
            "mqtt_delivery_notes_pinned",
            "Delivery notes the MQTT sources need kept beyond max_delivery_notes: per source \
             its deferred backlog peak plus the most messages stored on one connection of the \
             backlog episode (0 outside one)",
            m.mqtt_delivery_notes_pinned.clone(),
        );
        registry.register(
            "mqtt_acks_unwritten",
            "MQTT acknowledgements queued for the broker but not written when their connection \
             ended (the broker redelivers those messages), by source",
            m.mqtt_acks_unwritten.clone(),
        );
        registry.register(
            "mqtt_staged_messages",
            "MQTT messages read off the connection and waiting for the buffer writer, by source",
            m.mqtt_staged.clone(),
        );
        m
    }

    pub(crate) fn source(source: &str) -> SourceLabels {
        SourceLabels {
            source: source.to_owned(),
        }
    }
}

/// A registry with the agent's prefix.
pub fn new_registry() -> Registry {
    Registry::with_prefix("kip_agent")
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}
