//! The kip agent's configuration file: its types and their validation, in a crate of its own
//! so the control plane validates remote configurations with exactly the code the agent runs,
//! without depending on the agent (ONNX Runtime, sled, the OPC UA client).
//!
//! - [`config`]: the whole file (`RawConfig` -> validated `Config`).
//! - [`opcua`], [`edge_inference`]: the `[[opcua]]` and `[inference]` sections.
//! - [`remote`]: the part of the file the control plane may set, and how it merges with the
//!   local file (local-only settings stay local).

pub mod config;
pub mod edge_inference;
pub mod opcua;
pub mod remote;
