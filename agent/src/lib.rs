//! kip edge agent library. The binary `kip-agent` is a thin wrapper around it.
//!
//! Data path: sources (MQTT, later OPC UA) -> bounded channel -> buffer writer -> [`buffer`]
//! (sled, durable `(epoch, seq)`) -> sync (separate issue). [`runtime`] wires it together
//! with one shutdown path.

pub mod buffer;
pub mod config;
pub mod metrics;
pub mod mqtt;

/// Protocol version the agent speaks.
pub const PROTOCOL_VERSION: u32 = kip_shared::PROTOCOL_VERSION;
