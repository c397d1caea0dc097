//! kip's predictive-maintenance training pipeline.
//!
//! raw readings (C-MAPSS files, or `sensor_data` exported in the same layout) -> per-machine
//! series ([`cmapss`]) -> features from a feature-set document interpreted by
//! `kip_shared::feature_set` (the code the agent runs; regimes fitted by [`regimes`]) -> labels
//! from the document's label definition -> MLP training, one network or an ensemble ([`mlp`])
//! -> ONNX graph with the normalisation inside and the document in its metadata ([`onnx`]) ->
//! evaluation on held-out engines cut at random cycles ([`eval`]) -> a model card with metrics
//! and the artifact's sha256 ([`pipeline`]). A machine type is a training config
//! ([`config`], `ml/configs/*.toml`); [`predict`] scores partial trajectories with a shipped
//! model through ONNX Runtime, as the agent does.
//!
//! Invariant: everything is deterministic for a given seed and input file, so a training run
//! can be reproduced bit for bit.

pub mod cmapss;
pub mod config;
pub mod eval;
pub mod mlflow;
pub mod mlp;
pub mod onnx;
pub mod pipeline;
pub mod predict;
pub mod regimes;
pub mod register;
