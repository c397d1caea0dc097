//! The agent's integration tests as one test binary (one link instead of one per file). Each
//! module is one area; fixtures (Mosquitto, OPC UA server, broker PKI, ONNX Runtime library,
//! reference model, `eventually`) come from the `kip_tests` kit. Real Mosquitto, ONNX Runtime
//! and OPC UA peers; a missing service fails the test.
//!
//! `mqtt_durable_ack`, `mqtt_exactly_once` and `runtime` also run this crate's `kip-agent` binary
//! (`CARGO_BIN_EXE_kip-agent`, built by cargo for this test).

mod hostile_decoders;
mod inference;
mod inference_runtime;
mod live_query;
mod mqtt;
mod mqtt_durable_ack;
mod mqtt_exactly_once;
mod mqtt_tls_version;
mod opcua;
mod opcua_asyncua;
mod runtime;
