//! kip edge agent library. The binary `kip-agent` is a thin wrapper around it.
//!
//! Built under the ingest, sync and inference issues.

pub mod identity;

/// Protocol version the agent speaks.
pub const PROTOCOL_VERSION: u32 = kip_shared::PROTOCOL_VERSION;
pub mod inference;
pub mod opcua;
