//! `[inference]` once validated (the runtime lives in `kip_agent::edge_inference`).

use std::path::PathBuf;

/// Validated `[inference]`.
#[derive(Debug, Clone)]
pub struct InferenceConfig {
    /// ONNX Runtime library; `None` searches `ORT_DYLIB_PATH` and the packaged locations.
    pub ort_library: Option<PathBuf>,
    /// Model loaded at start-up (the package ships the reference model).
    pub model_path: Option<PathBuf>,
    /// Expected sha256 of `model_path`, when pinned.
    pub model_sha256: Option<String>,
    /// Capacity of the reading channel between the writer and the inference task.
    pub queue_capacity_readings: usize,
}
