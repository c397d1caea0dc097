//! kip edge agent library. The binary `kip-agent` is a thin wrapper around it.
//!
//! Data path: sources ([`source::Source`]: [`mqtt`], [`opcua`]) -> one bounded channel of
//! envelopes -> buffer writer ->
//! [`buffer`] (segment log, durable `(epoch, seq)`) -> [`sync`] (mTLS batches to the control plane, effectively once). [`runtime`] wires it
//! together with one shutdown path and serves `/metrics` and `/healthz`; [`cli`] implements
//! `kip-agent status` and `kip-agent buffer inspect`. MQTT messages are acknowledged to the
//! broker only once their records are durable ([`ack`]).

pub mod ack;
pub mod buffer;
pub mod buffer_recovery;
pub mod cli;
pub use kip_agent_config::config;
pub mod edge_inference;
pub mod health;
pub mod identity;
pub mod inference;
pub mod live;
pub mod metrics;
pub mod model_trust;
pub mod mqtt;
pub mod opcua;
pub mod remote_config;
pub mod runtime;
pub mod self_update;
pub mod source;
pub mod sync;
mod sync_probe;

/// Protocol version the agent speaks.
pub const PROTOCOL_VERSION: u32 = kip_shared::PROTOCOL_VERSION;
