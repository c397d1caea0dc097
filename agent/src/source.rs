//! The one interface between ingest sources and the buffer writer.
//!
//! Every source kind (MQTT broker, OPC UA endpoint, ...) implements [`Source`] and hands
//! [`Envelope`]s to one bounded channel ([`Sink`]) that the buffer writer
//! ([`crate::runtime`]) drains. Adding a source kind means one new module implementing
//! [`Source`] plus its config section; the writer, the buffer and the runtime stay as they
//! are.
//!
//! Invariants:
//! - The sink is bounded (`buffer.queue_capacity_records`): a source that cannot hand over
//!   waits (or, like MQTT, stages and keeps its protocol client polled); memory never grows
//!   without bound.
//! - An envelope's [`AckHandle`] fires only once the buffer's durable sequence covers the
//!   envelope's record (or, for a recognised redelivery, the record stored earlier); it is
//!   dropped unfired when that never happens (the upstream then redelivers).
//! - A [`Delivery`] names an upstream message that its sender may deliver again (an MQTT
//!   QoS 1 PUBLISH): the writer keeps a durable note of it next to the record and does not
//!   store a redelivery that matches the note (see [`crate::buffer`]).

use std::{future::Future, pin::Pin};

use kip_shared::Record;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::{AckOutcome, Acknowledge};

/// The channel every source writes to.
pub type Sink = mpsc::Sender<Envelope>;

/// What a source hands to the buffer writer.
#[derive(Debug)]
pub struct Envelope {
    pub record: Record,
    /// Acknowledges the record upstream once it is durable; `None` when nobody upstream
    /// waits for it (OPC UA, gaps).
    pub ack: Option<AckHandle>,
    /// The upstream message this record came from, when its sender may redeliver it.
    pub delivery: Option<Delivery>,
    /// The source knows that an earlier copy of this message was stored (its record durable,
    /// its acknowledgement lost with a connection or given up): the writer stores nothing and
    /// only acknowledges, even when the delivery note is gone.
    pub stored_before: bool,
}

impl Envelope {
    /// A record nobody acknowledges upstream.
    pub fn plain(record: Record) -> Self {
        Self {
            record,
            ack: None,
            delivery: None,
            stored_before: false,
        }
    }
}

/// Identifies one upstream message for redelivery detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The upstream session the id is unique in (MQTT: the client id at the broker).
    pub session: String,
    /// The message's id within the session (MQTT: the packet id).
    pub id: u16,
    /// sha256 over the message's origin and payload (MQTT: topic and payload).
    pub digest: [u8; 32],
    /// The sender marked it as a repeat of an earlier delivery (MQTT: the DUP flag).
    pub redelivered: bool,
}

/// A type-erased acknowledgement, fired by the writer once the record is durable.
pub struct AckHandle(Box<dyn Acknowledge + Send>);

impl AckHandle {
    pub fn new(ack: impl Acknowledge + Send + 'static) -> Self {
        Self(Box::new(ack))
    }
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckHandle")
    }
}

impl Acknowledge for AckHandle {
    fn try_ack(&self) -> AckOutcome {
        self.0.try_ack()
    }
    fn given_up(&self) {
        self.0.given_up();
    }
}

/// The kind of a source, as reported in `/v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Mqtt,
    OpcUa,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::OpcUa => "opcua",
        }
    }
}

/// The future a running source is.
pub type SourceTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An ingest source. `run` returns once `cancel` fired (after handing over what it read and
/// letting its acknowledgements out) or the sink closed.
pub trait Source: Send {
    /// The configured name (labels, records' `source` field).
    fn name(&self) -> &str;
    fn kind(&self) -> SourceKind;
    /// Runs the source on the runtime's tracker.
    fn run(self: Box<Self>, sink: Sink, cancel: CancellationToken) -> SourceTask;
}
