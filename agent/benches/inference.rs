//! Inference latency of a shipped RUL model on this machine (batch 1, one thread): the feature
//! computation from a full window (the document interpreter) and the ONNX run, measured apart.
//! Run: `ORT_DYLIB_PATH=... cargo bench -p kip-agent --bench inference`; `KIP_BENCH_MODEL=path`
//! picks another model than the default one in ml/models.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "bench binary"
)]

use std::{path::Path, time::Instant};

use kip_agent::inference::{OrtRuntime, RulModel};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/ort/lib/libonnxruntime.so.1.32.0"));
    let rt = OrtRuntime::load(Some(&lib)).unwrap();
    let model_path = std::env::var_os("KIP_BENCH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::fs::read_dir(root.join("ml/models"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|e| e == "onnx"))
                .unwrap()
        });
    let bytes = std::fs::read(&model_path).unwrap();
    let t = Instant::now();
    let mut model = RulModel::load(&rt, &bytes, None).unwrap();
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let width = model.spec.len();
    let x: Vec<f32> = (0..width).map(|i| (i % 17) as f32 * 0.1).collect();
    for _ in 0..1000 {
        model.predict_rows(&x, 1).unwrap();
    }
    let n = 20_000;
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(model.predict_rows(&x, 1).unwrap());
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((n as f64 - 1.0) * p) as usize];
    // Features from a full window of plausible rows (one value per input of the set).
    let inputs = model.spec.inputs().len();
    let rows: Vec<Vec<f32>> = (0..model.spec.window_cycles())
        .map(|c| {
            (0..inputs)
                .map(|i| 500.0 + (c * 7 + i) as f32 * 0.01)
                .collect()
        })
        .collect();
    let mut feat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(model.spec.compute(&rows, 150.0).unwrap());
        feat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    feat.sort_by(f64::total_cmp);
    let f = |p: f64| feat[((n as f64 - 1.0) * p) as usize];
    println!(
        "model {}@{} (feature set {}, {} features, window {} cycles): session load {load_ms:.1} ms; \
         over {n} runs: batch-1 inference p50 {:.1} us, p99 {:.1} us, max {:.1} us; \
         features from a full window p50 {:.1} us, p99 {:.1} us",
        model.name,
        model.version,
        model.spec.id(),
        width,
        model.spec.window_cycles(),
        q(0.5),
        q(0.99),
        lat[n - 1],
        f(0.5),
        f(0.99)
    );
}
