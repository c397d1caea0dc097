//! kip's end-to-end tests across the agent and the control plane, as one test binary (one
//! link instead of one per file). Each module is one scenario family; fixtures come from the
//! `kip_tests` kit. Real PostgreSQL (`DATABASE_URL`), Mosquitto and ONNX Runtime; a missing
//! service fails the test.
//!
//! `sync_crash` runs the real `kip-agent` and `kip-control-plane` binaries
//! ([`kip_tests::workspace_binary`]): `cargo test --workspace` builds them in the same run; to
//! run this binary alone, build them first:
//! `cargo build -p kip-agent -p kip-control-plane --bins && cargo test -p kip-tests --test e2e`.
//! `fleet_sim` runs the fleet load generator `kip-fleet-sim` (`cargo build -p kip-fleet-sim`).

mod agent_identity;
mod agent_runtime_identity;
mod aleph_live;
mod ca_rollover;
mod clock;
mod disk_full;
mod failover;
mod fleet_health;
mod fleet_sim;
mod health_alerts;
mod logs;
mod model_compare;
mod model_drift;
mod model_signing;
mod mqtt_soak;
mod opcua_backpressure;
mod orchestrator;
mod ot_certificates;
mod power_loss;
mod remote_config;
mod renewal_during_sync;
mod rollout;
mod self_update;
mod sync_core;
mod sync_crash;
