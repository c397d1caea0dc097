//! Batch scoring (`kip-train predict`): a shipped ONNX model and a C-MAPSS-layout file of partial
//! trajectories (the official test layout: each unit's cycles 1..k, stopping before failure)
//! give one predicted RUL per unit, computed as the agent would at the unit's last cycle.
//!
//! Invariants:
//! - The model runs in ONNX Runtime (the library the agent loads), never in a re-implementation,
//!   so these figures are the gateway's figures.
//! - The feature set comes from the model itself (`kip.feature_set_doc`, or the built-in set of
//!   its `kip.feature_set` id for models that predate documents), through
//!   `FeatureSet::for_model`, the function the agent uses.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use kip_shared::{feature_set::FeatureSet, features::FeatureError};

use crate::{
    cmapss::{DataError, Engine},
    pipeline::{META_FEATURE_SET, META_FEATURE_SET_DOC},
};

/// Units scored per ONNX Runtime call (bounds the input tensor).
const BATCH_UNITS: usize = 256;

/// Why scoring failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(
        "ONNX Runtime library not found (tried: {0}); set ORT_DYLIB_PATH or --ort-library to \
         libonnxruntime.so.1.32.0 (scripts/lib.sh ensure_ort fetches it)"
    )]
    LibraryMissing(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("true RUL file {path}, line {line}: {value:?} is not a number of cycles")]
    Truth {
        path: String,
        line: usize,
        value: String,
    },
    #[error("{units} units to score but {truths} true RUL values")]
    TruthCount { units: usize, truths: usize },
    #[error("writing predictions: {0}")]
    Write(#[from] std::io::Error),
}

/// One unit's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitPrediction {
    pub unit: u32,
    /// Cycles observed (the cycle the prediction is made at).
    pub cycles: usize,
    pub rul_cycles: f32,
}

fn runtime(configured: Option<&Path>) -> Result<ort::environment::Environment, PredictError> {
    // ONNX Runtime allows one environment per process: keep the first.
    static ENV: std::sync::Mutex<Option<ort::environment::Environment>> =
        std::sync::Mutex::new(None);
    let mut env = ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let candidates: Vec<PathBuf> = match configured {
        Some(p) => vec![p.to_owned()],
        None => std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("target/ort/lib/libonnxruntime.so.1.32.0")])
            .collect(),
    };
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Err(PredictError::LibraryMissing(
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    };
    let e = ort::init_from(path)
        .map_err(|e| PredictError::Runtime(e.to_string()))?
        .with_name("kip-train")
        .build()
        .map_err(|e| PredictError::Runtime(e.to_string()))?;
    *env = Some(e.clone());
    Ok(e)
}

/// A model loaded for batch scoring.
#[derive(Debug)]
pub struct Scorer {
    session: ort::session::Session,
    pub name: String,
    pub version: String,
    pub feature_set: FeatureSet,
    input: String,
    output: String,
}

impl Scorer {
    /// Loads ONNX Runtime (`ort_library`, else `ORT_DYLIB_PATH`, else
    /// `target/ort/lib/`) and the model, and resolves its feature set.
    pub fn load(ort_library: Option<&Path>, model: &[u8]) -> Result<Self, PredictError> {
        let env = runtime(ort_library)?;
        let rt = |e: &dyn std::fmt::Display| PredictError::Runtime(e.to_string());
        let session = ort::session::Session::builder(&env)
            .map_err(|e| rt(&e))?
            .with_intra_threads(1)
            .map_err(|e| rt(&e))?
            .commit_from_memory(model)
            .map_err(|e| rt(&e))?;
        let meta = session
            .metadata()
            .map_err(|e| PredictError::Metadata(e.to_string()))?;
        let need = |k: &str| {
            meta.custom(k)
                .ok_or_else(|| PredictError::Metadata(format!("missing {k}")))
        };
        let id = need(META_FEATURE_SET)?;
        let name = need("kip.model_name")?;
        let version = need("kip.model_version")?;
        let doc = meta.custom(META_FEATURE_SET_DOC);
        drop(meta);
        let feature_set = FeatureSet::for_model(&id, doc.as_deref())?;
        let input = session
            .inputs()
            .first()
            .map(|o| o.name().to_owned())
            .ok_or_else(|| PredictError::Metadata("model has no input".into()))?;
        let output = session
            .outputs()
            .first()
            .map(|o| o.name().to_owned())
            .ok_or_else(|| PredictError::Metadata("model has no output".into()))?;
        Ok(Self {
            session,
            name,
            version,
            feature_set,
            input,
            output,
        })
    }

    /// Runs the model on `rows` feature rows laid out one after the other.
    pub fn run(&mut self, features: Vec<f32>, rows: usize) -> Result<Vec<f32>, PredictError> {
        let rt = |e: ort::Error| PredictError::Runtime(e.to_string());
        let width = self.feature_set.len();
        let tensor = ort::value::Tensor::from_array(([rows, width], features)).map_err(rt)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(rt)?;
        let value = outputs
            .get(self.output.as_str())
            .ok_or_else(|| PredictError::Runtime(format!("no output {}", self.output)))?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(rt)?;
        Ok(data.to_vec())
    }

    /// Predicts the RUL of every unit at its last observed cycle.
    pub fn score(&mut self, units: &[Engine]) -> Result<Vec<UnitPrediction>, PredictError> {
        let mut out = Vec::with_capacity(units.len());
        for chunk in units.chunks(BATCH_UNITS) {
            let mut x = Vec::with_capacity(chunk.len() * self.feature_set.len());
            for u in chunk {
                let series = u.select(self.feature_set.inputs())?;
                self.feature_set
                    .compute_into(&series, series.len() as f32, &mut x)?;
            }
            let y = self.run(x, chunk.len())?;
            out.extend(chunk.iter().zip(y).map(|(u, rul)| UnitPrediction {
                unit: u.unit,
                cycles: u.rows.len(),
                rul_cycles: rul,
            }));
        }
        Ok(out)
    }
}

/// Batch-1 latency of one model on this machine, as a gateway runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub runs: usize,
    pub features_p50_us: f64,
    pub features_p99_us: f64,
    pub inference_p50_us: f64,
    pub inference_p99_us: f64,
    pub inference_max_us: f64,
}

impl Scorer {
    /// Times `runs` feature computations from `unit`'s latest full window and `runs` batch-1
    /// ONNX runs on their result (one intra-op thread, like the agent), after a warm-up.
    pub fn latency(&mut self, unit: &Engine, runs: usize) -> Result<Latency, PredictError> {
        let series = unit.select(self.feature_set.inputs())?;
        let cycle = series.len() as f32;
        let x = self.feature_set.compute(&series, cycle)?;
        for _ in 0..runs.min(1000) {
            self.run(x.clone(), 1)?;
        }
        let mut feat = Vec::with_capacity(runs);
        let mut inf = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            let t = std::time::Instant::now();
            let f = self.feature_set.compute(&series, cycle)?;
            feat.push(t.elapsed().as_secs_f64() * 1e6);
            let t = std::time::Instant::now();
            std::hint::black_box(self.run(f, 1)?);
            inf.push(t.elapsed().as_secs_f64() * 1e6);
        }
        feat.sort_by(f64::total_cmp);
        inf.sort_by(f64::total_cmp);
        let q = |v: &[f64], p: f64| {
            v.get(((v.len() - 1) as f64 * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        Ok(Latency {
            runs: inf.len(),
            features_p50_us: q(&feat, 0.5),
            features_p99_us: q(&feat, 0.99),
            inference_p50_us: q(&inf, 0.5),
            inference_p99_us: q(&inf, 0.99),
            inference_max_us: inf.last().copied().unwrap_or(f64::NAN),
        })
    }
}

/// Writes `unit,rul` CSV (header line, RUL with two decimals).
pub fn write_csv(preds: &[UnitPrediction], mut w: impl Write) -> Result<(), PredictError> {
    writeln!(w, "unit,rul")?;
    for p in preds {
        writeln!(w, "{},{:.2}", p.unit, p.rul_cycles)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads a C-MAPSS `RUL_FDxxx.txt` file: one true RUL per line, in unit order.
pub fn read_truth(path: &Path) -> Result<Vec<f32>, PredictError> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            l.trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| PredictError::Truth {
                    path: path.display().to_string(),
                    line: i + 1,
                    value: l.to_owned(),
                })
        })
        .collect()
}

/// RMSE and PHM08 score of `preds` against the official true RUL (uncapped, as the official
/// test set is scored) and against the truth capped at `cap`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruthScore {
    pub rmse: f64,
    pub nasa_score: f64,
    pub rmse_capped: f64,
}

/// Scores predictions against true RUL values (one per unit, same order).
pub fn score_against(
    preds: &[UnitPrediction],
    truth: &[f32],
    cap: f32,
) -> Result<TruthScore, PredictError> {
    if preds.len() != truth.len() {
        return Err(PredictError::TruthCount {
            units: preds.len(),
            truths: truth.len(),
        });
    }
    let p: Vec<f32> = preds.iter().map(|p| p.rul_cycles).collect();
    let capped: Vec<f32> = truth.iter().map(|t| t.min(cap)).collect();
    Ok(TruthScore {
        rmse: crate::eval::rmse(&p, truth),
        nasa_score: crate::eval::nasa_score(&p, truth),
        rmse_capped: crate::eval::rmse(&p, &capped),
    })
}
