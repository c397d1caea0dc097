//! kip's predictive-maintenance training pipeline.
//!
//! raw readings (C-MAPSS files, or `sensor_data` exported in the same layout) -> per-machine
//! series ([`cmapss`]) -> windows and features from `kip_shared::features` (the code the agent
//! runs) -> labels capped at [`kip_shared::features::RUL_CAP_CYCLES`] -> MLP training ([`mlp`])
//! -> ONNX graph with the normalisation inside ([`onnx`]) -> evaluation on held-out engines cut
//! at random cycles ([`eval`]) -> a model card with metrics and the artifact's sha256
//! ([`pipeline`]).
//!
//! Invariant: everything is deterministic for a given seed and input file, so a training run
//! can be reproduced bit for bit.

pub mod cmapss;
pub mod eval;
pub mod mlp;
pub mod onnx;
pub mod pipeline;
pub mod register;
