//! Predictive-maintenance inference on the agent with ONNX Runtime (`ort`, `load-dynamic`).
//!
//! Invariants:
//! - The ONNX Runtime library is located and loaded once at start-up ([`OrtRuntime::load`]); a
//!   missing or unloadable library is a start-up error that names the path tried and the fix,
//!   never a panic at the first inference.
//! - A model is only ever swapped in after it passed every check ([`RulModel::load`]): sha256
//!   equal to the expected one, a session that builds, metadata naming a feature set this agent
//!   implements with the right input width, and a smoke inference with a finite result. Until
//!   then the previous model keeps serving ([`ModelSlot::try_swap`]).
//! - Features come from `kip_shared::feature_set::FeatureSet::compute`, the interpreter the
//!   training pipeline used, reading the feature-set document the model carries in its ONNX
//!   metadata (`kip.feature_set_doc`); a model without one (shipped before documents existed)
//!   names a built-in set (`cmapss-w30-v1`). A new machine type is a new model, not a new agent.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use kip_shared::{
    Prediction, Reading,
    drift::{DriftMonitor, FeatureDrift, Reference},
    feature_set::FeatureSet,
};
use sha2::Digest as _;

/// Library file name inside the onnxruntime wheel and kip's packages.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.32.0";

/// Why inference is not possible.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(
        "ONNX Runtime library not found (tried: {tried}). Install the kip-agent package (it ships \
         the library), or set ORT_DYLIB_PATH / [inference] ort_library to {ORT_LIBRARY} \
         (from the onnxruntime 1.32 wheel: scripts/lib.sh ensure_ort)"
    )]
    LibraryMissing { tried: String },
    #[error("cannot load ONNX Runtime from {path}: {message}")]
    LibraryLoad { path: PathBuf, message: String },
    #[error("model sha256 is {actual}, expected {expected}: refusing a corrupted or wrong file")]
    Checksum { expected: String, actual: String },
    #[error("model is not a valid ONNX model: {0}")]
    Invalid(String),
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error("smoke inference failed: {0}")]
    Smoke(String),
    #[error("inference failed: {0}")]
    Run(String),
    #[error(transparent)]
    Features(#[from] kip_shared::features::FeatureError),
}

/// A loaded ONNX Runtime.
#[derive(Debug, Clone)]
pub struct OrtRuntime {
    env: ort::environment::Environment,
    pub library: PathBuf,
}

impl OrtRuntime {
    /// Loads the library: `configured` if given, else `ORT_DYLIB_PATH`, else beside the
    /// executable (`lib/` and `../lib/kip-agent/`), else `/usr/lib/kip-agent/`.
    ///
    /// ONNX Runtime allows one environment per process, so the first successful load is kept
    /// and returned by later calls once their path is found to exist.
    pub fn load(configured: Option<&Path>) -> Result<Self, InferenceError> {
        static LOADED: std::sync::Mutex<Option<OrtRuntime>> = std::sync::Mutex::new(None);
        let path = Self::locate(configured)?;
        let mut loaded = LOADED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(rt) = loaded.as_ref() {
            return Ok(rt.clone());
        }
        let load_err = |message: String| InferenceError::LibraryLoad {
            path: path.clone(),
            message,
        };
        let env = ort::init_from(&path)
            .map_err(|e| load_err(e.to_string()))?
            .with_name("kip-agent")
            .build()
            .map_err(|e| load_err(e.to_string()))?;
        let rt = Self { env, library: path };
        *loaded = Some(rt.clone());
        Ok(rt)
    }

    fn locate(configured: Option<&Path>) -> Result<PathBuf, InferenceError> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = configured {
            candidates.push(p.to_owned());
        } else {
            if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
                candidates.push(PathBuf::from(p));
            }
            if let Some(dir) = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(Path::to_owned))
            {
                candidates.push(dir.join("lib").join(ORT_LIBRARY));
                candidates.push(dir.join("../lib/kip-agent").join(ORT_LIBRARY));
            }
            candidates.push(Path::new("/usr/lib/kip-agent").join(ORT_LIBRARY));
        }
        let Some(path) = candidates.iter().find(|p| p.is_file()).cloned() else {
            return Err(InferenceError::LibraryMissing {
                tried: candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        Ok(path)
    }
}

/// A remaining-useful-life model ready to run.
#[derive(Debug)]
pub struct RulModel {
    session: ort::session::Session,
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The feature set the model reads (its embedded document, or a built-in set).
    pub spec: FeatureSet,
    /// Drift references from training (`kip.drift_reference`): one per input, then `output`;
    /// empty for models trained before drift existed.
    pub drift_reference: Vec<Reference>,
    input: String,
    output: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

impl RulModel {
    /// Verifies and loads a model; see the module invariants for the checks.
    pub fn load(
        rt: &OrtRuntime,
        bytes: &[u8],
        expected_sha256: Option<&str>,
    ) -> Result<Self, InferenceError> {
        let sha256 = sha256_hex(bytes);
        if let Some(expected) = expected_sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(InferenceError::Checksum {
                expected: expected.to_owned(),
                actual: sha256,
            });
        }
        let invalid = |e: &dyn std::fmt::Display| InferenceError::Invalid(e.to_string());
        let session = ort::session::Session::builder(&rt.env)
            .map_err(|e| invalid(&e))?
            // One thread: a gateway runs many small inferences; parallelism inside one would
            // only add synchronisation cost.
            .with_intra_threads(1)
            .map_err(|e| invalid(&e))?
            .commit_from_memory(bytes)
            .map_err(|e| invalid(&e))?;
        let meta = session
            .metadata()
            .map_err(|e| InferenceError::Metadata(e.to_string()))?;
        let custom = |k: &str| {
            meta.custom(k)
                .ok_or_else(|| InferenceError::Metadata(format!("missing {k}")))
        };
        let feature_set = custom("kip.feature_set")?;
        let name = custom("kip.model_name")?;
        let version = custom("kip.model_version")?;
        let document = meta.custom("kip.feature_set_doc");
        let drift = meta.custom("kip.drift_reference");
        drop(meta);
        let drift_reference: Vec<Reference> = match drift {
            Some(json) => serde_json::from_str(&json).map_err(|e| {
                InferenceError::Metadata(format!("kip.drift_reference is not readable: {e}"))
            })?,
            None => Vec::new(),
        };
        let spec = FeatureSet::for_model(&feature_set, document.as_deref())?;
        let input = session
            .inputs()
            .first()
            .map(|o| o.name().to_owned())
            .ok_or_else(|| InferenceError::Metadata("model has no input".into()))?;
        let output = session
            .outputs()
            .first()
            .map(|o| o.name().to_owned())
            .ok_or_else(|| InferenceError::Metadata("model has no output".into()))?;
        let mut model = Self {
            session,
            name,
            version,
            sha256,
            spec,
            drift_reference,
            input,
            output,
        };
        // Smoke inference: a model that loads but cannot run (wrong width, broken graph) is
        // refused here rather than at the first real window.
        let width = model.spec.len();
        let probe = vec![0.0f32; width];
        let out = model
            .predict_rows(&probe, 1)
            .map_err(|e| InferenceError::Smoke(e.to_string()))?;
        if out.len() != 1 || !out.iter().all(|v| v.is_finite()) {
            return Err(InferenceError::Smoke(format!(
                "expected one finite value, got {out:?}"
            )));
        }
        Ok(model)
    }

    /// Runs the model on `rows` rows of features laid out row after row.
    pub fn predict_rows(
        &mut self,
        features: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, InferenceError> {
        let width = self.spec.len();
        if features.len() != rows * width {
            return Err(InferenceError::Run(format!(
                "expected {rows} x {width} features, got {}",
                features.len()
            )));
        }
        let run = |e: ort::Error| InferenceError::Run(e.to_string());
        let tensor =
            ort::value::Tensor::from_array(([rows, width], features.to_vec())).map_err(run)?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(run)?;
        let value = outputs
            .get(self.output.as_str())
            .ok_or_else(|| InferenceError::Run(format!("no output {}", self.output)))?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(run)?;
        Ok(data.to_vec())
    }
}

/// The model currently serving, swapped only for a model that passed [`RulModel::load`].
#[derive(Debug, Default)]
pub struct ModelSlot {
    current: Option<RulModel>,
    /// Why the last swap was refused, for status reporting.
    pub last_error: Option<String>,
}

impl ModelSlot {
    /// Tries to replace the serving model; on failure the old one keeps serving and the reason
    /// is kept in `last_error` and returned.
    pub fn try_swap(
        &mut self,
        rt: &OrtRuntime,
        bytes: &[u8],
        expected_sha256: Option<&str>,
    ) -> Result<(), InferenceError> {
        match RulModel::load(rt, bytes, expected_sha256) {
            Ok(m) => {
                self.current = Some(m);
                self.last_error = None;
                Ok(())
            }
            Err(e) => {
                self.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    pub fn current(&self) -> Option<&RulModel> {
        self.current.as_ref()
    }

    pub fn current_mut(&mut self) -> Option<&mut RulModel> {
        self.current.as_mut()
    }
}

/// Turns a stream of readings into per-machine cycles and predictions.
///
/// A machine's cycle is complete when every input of the feature set (its signals, then its
/// operating settings when it normalises by regime) has a new value since the previous cycle;
/// the row then holds the latest value of each input. Readings of other metrics are ignored. At
/// most `window_cycles` rows are kept per machine (bounded memory). When the serving model reads
/// a different feature set than the rows were collected for, every machine starts over (rows of
/// another layout would be meaningless to it).
///
/// The per-machine state (window rows and cycle count, i.e. the machine's age) can be saved
/// and restored ([`Predictor::save`], [`Predictor::load`]) so an agent restart does not reset
/// every machine to cycle 1 (the cycle number is a feature: a reset would predict a new
/// machine).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Predictor {
    machines: HashMap<String, MachineState>,
    /// Id of the feature set the rows were collected for.
    feature_set: Option<String>,
    /// Drift of the serving model's inputs and output over all machines: (model sha256,
    /// monitor). Started over for every new model; not persisted (a restart refills it).
    #[serde(skip)]
    drift: Option<(String, DriftMonitor)>,
    /// The same for the shadow model (a shadow candidate's drift is what its rollout is
    /// judged on): fed the same inputs and the shadow's output; started over for every new
    /// shadow, dropped while none runs.
    #[serde(skip)]
    shadow_drift: Option<ShadowDrift>,
}

/// Drift monitor of the shadow model, with the model it describes.
#[derive(Debug)]
struct ShadowDrift {
    sha256: String,
    name: String,
    version: String,
    monitor: DriftMonitor,
}

/// Values per input (and output) in the drift windows, over all machines of the agent.
pub const DRIFT_WINDOW: usize = 200;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct MachineState {
    pending: BTreeMap<String, f32>,
    rows: std::collections::VecDeque<Vec<f32>>,
    cycles: u64,
}

/// Fewest earlier cycles in a machine's window before an anomaly score is computed.
pub const ANOMALY_MIN_CYCLES: usize = 3;

/// Anomaly score of the newest row of `rows` against the earlier rows of the window: the mean
/// over inputs of the squared z-score (`(x - mean)^2 / var`, variance floored at 1e-6 of the
/// squared mean so constant signals do not divide by zero). For ordinary cycles of a
/// stationary machine it is about 1 (a chi-square over its degrees of freedom); a cycle far
/// outside the machine's recent behaviour scores well above (e.g. 25 for a 5-sigma jump in
/// every signal). `None` until [`ANOMALY_MIN_CYCLES`] earlier cycles exist.
pub fn anomaly_score(rows: &std::collections::VecDeque<Vec<f32>>) -> Option<f64> {
    let last = rows.back()?;
    let earlier: Vec<&Vec<f32>> = rows.iter().take(rows.len() - 1).collect();
    if earlier.len() < ANOMALY_MIN_CYCLES || last.is_empty() {
        return None;
    }
    let n = earlier.len() as f64;
    let mut sum = 0.0;
    for (i, x) in last.iter().enumerate() {
        let vals = earlier
            .iter()
            .filter_map(|r| r.get(i))
            .map(|v| f64::from(*v));
        let mean = vals.clone().sum::<f64>() / n;
        let var = vals.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        let floor = (1e-6 * mean * mean).max(1e-12);
        let d = f64::from(*x) - mean;
        sum += d * d / var.max(floor);
    }
    let score = sum / last.len() as f64;
    score.is_finite().then_some(score)
}

/// Why the predictor state could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("predictor state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("predictor state {path} is not readable JSON: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// What one completed cycle produced: the champion's prediction and, with a shadow model, the
/// shadow's outcome on the same features.
#[derive(Debug)]
pub struct Observation {
    pub prediction: Prediction,
    /// Time of the champion's ONNX run alone (features excluded: computed once for both).
    pub latency: std::time::Duration,
    /// `None` without a shadow model.
    pub shadow: Option<Result<(Prediction, std::time::Duration), InferenceError>>,
}

impl Predictor {
    /// Feeds one reading; returns a prediction when it completed a cycle and a model is loaded.
    pub fn observe(
        &mut self,
        slot: &mut ModelSlot,
        reading: &Reading,
    ) -> Result<Option<Prediction>, InferenceError> {
        Ok(self
            .observe_with_shadow(slot, None, reading)?
            .map(|o| o.prediction))
    }

    /// [`Predictor::observe`] with a shadow model: when the reading completes a cycle, the
    /// features are computed once (with the champion's feature set) and both models run on
    /// them. The shadow's prediction is tagged (`model`, `role = shadow`) and never replaces
    /// the champion's; a shadow whose feature set differs from the champion's cannot read
    /// these features and its outcome is an error (counted as its failure). A shadow with
    /// drift references feeds its own monitor ([`Predictor::shadow_drift`]).
    pub fn observe_with_shadow(
        &mut self,
        slot: &mut ModelSlot,
        shadow: Option<&mut RulModel>,
        reading: &Reading,
    ) -> Result<Option<Observation>, InferenceError> {
        let Some(model) = slot.current_mut() else {
            return Ok(None);
        };
        let spec = &model.spec;
        if self.feature_set.as_deref() != Some(spec.id()) {
            self.machines.clear();
            self.feature_set = Some(spec.id().to_owned());
        }
        let inputs = spec.inputs();
        if !inputs.contains(&reading.metric) || !reading.value.is_finite() {
            return Ok(None);
        }
        let st = self.machines.entry(reading.machine.clone()).or_default();
        st.pending
            .insert(reading.metric.clone(), reading.value as f32);
        if st.pending.len() < inputs.len() {
            return Ok(None);
        }
        let row: Vec<f32> = inputs
            .iter()
            .map(|c| st.pending.get(c).copied().unwrap_or(f32::NAN))
            .collect();
        st.pending.clear();
        st.rows.push_back(row);
        while st.rows.len() > spec.window_cycles() {
            st.rows.pop_front();
        }
        st.cycles += 1;
        let rows: Vec<Vec<f32>> = st.rows.iter().cloned().collect();
        let features = spec.compute(&rows, st.cycles as f32)?;
        let anomaly = anomaly_score(&st.rows);
        let newest: Vec<f64> = st
            .rows
            .back()
            .map(|r| r.iter().map(|v| f64::from(*v)).collect())
            .unwrap_or_default();
        let started = std::time::Instant::now();
        let out = model.predict_rows(&features, 1)?;
        let latency = started.elapsed();
        let rul = out.first().copied().unwrap_or(f32::NAN);
        let run_shadow = |sh: &mut RulModel| {
            if sh.spec.id() != model.spec.id() {
                return Err(InferenceError::Run(format!(
                    "shadow {}@{} reads feature set {}, the champion {}",
                    sh.name,
                    sh.version,
                    sh.spec.id(),
                    model.spec.id()
                )));
            }
            let started = std::time::Instant::now();
            let out = sh.predict_rows(&features, 1)?;
            let latency = started.elapsed();
            let v = out.first().copied().unwrap_or(f32::NAN);
            if !v.is_finite() {
                return Err(InferenceError::Run(format!(
                    "shadow output {v} is not finite"
                )));
            }
            Ok((
                Prediction {
                    machine: reading.machine.clone(),
                    model_version: sh.version.clone(),
                    ts: reading.ts,
                    rul_cycles: f64::from(v),
                    anomaly_score: anomaly,
                    model: Some(sh.name.clone()),
                    role: Some(kip_shared::ModelRole::Shadow),
                },
                latency,
            ))
        };
        let shadow = shadow.map(|sh| {
            let outcome = run_shadow(sh);
            match (&outcome, sh.drift_reference.is_empty()) {
                (Ok((p, _)), false) => {
                    if self
                        .shadow_drift
                        .as_ref()
                        .is_none_or(|d| d.sha256 != sh.sha256)
                    {
                        self.shadow_drift = Some(ShadowDrift {
                            sha256: sh.sha256.clone(),
                            name: sh.name.clone(),
                            version: sh.version.clone(),
                            monitor: DriftMonitor::new(sh.drift_reference.clone(), DRIFT_WINDOW),
                        });
                    }
                    if let Some(d) = &mut self.shadow_drift {
                        // Same feature set as the champion (else `outcome` is an error): the
                        // same inputs, then the shadow's own output.
                        let mut values = newest.clone();
                        values.resize(sh.drift_reference.len() - 1, f64::NAN);
                        values.push(p.rul_cycles);
                        d.monitor.observe(&reading.machine, &values);
                    }
                }
                (Ok(_), true) => self.shadow_drift = None,
                (Err(_), _) => {}
            }
            outcome
        });
        if shadow.is_none() {
            self.shadow_drift = None;
        }
        if !model.drift_reference.is_empty() {
            if self
                .drift
                .as_ref()
                .is_none_or(|(sha, _)| *sha != model.sha256)
            {
                self.drift = Some((
                    model.sha256.clone(),
                    DriftMonitor::new(model.drift_reference.clone(), DRIFT_WINDOW),
                ));
            }
            if let Some((_, monitor)) = &mut self.drift {
                let mut values = newest;
                // References: one per input, then the output.
                values.resize(model.drift_reference.len() - 1, f64::NAN);
                values.push(f64::from(rul));
                monitor.observe(&reading.machine, &values);
            }
        } else {
            self.drift = None;
        }
        Ok(Some(Observation {
            prediction: Prediction {
                machine: reading.machine.clone(),
                model_version: model.version.clone(),
                ts: reading.ts,
                rul_cycles: f64::from(rul),
                anomaly_score: anomaly,
                model: None,
                role: None,
            },
            latency,
            shadow,
        }))
    }

    /// Writes the per-machine state to `path` atomically (a temporary file renamed over it),
    /// so a crash mid-write leaves the previous state, never a truncated one.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: path.to_owned(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|source| StateError::Decode {
            path: path.to_owned(),
            source,
        })?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a state written by [`Predictor::save`]; a missing file is a fresh predictor.
    pub fn load(path: &Path) -> Result<Self, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Decode {
                path: path.to_owned(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Drift of the serving model's inputs and output over the latest [`DRIFT_WINDOW`] values
    /// (only features whose window is full; empty for a model without references).
    pub fn drift(&self) -> Vec<FeatureDrift> {
        self.drift
            .as_ref()
            .map(|(_, m)| m.evaluate())
            .unwrap_or_default()
    }

    /// Drift of the shadow model's inputs and output (its own references, the champion's
    /// features, its own predictions) with its name and version; `None` without a shadow
    /// that has references and has run.
    pub fn shadow_drift(&self) -> Option<(String, String, Vec<FeatureDrift>)> {
        self.shadow_drift
            .as_ref()
            .map(|d| (d.name.clone(), d.version.clone(), d.monitor.evaluate()))
    }

    /// Number of machines with state.
    pub fn machines(&self) -> usize {
        self.machines.len()
    }

    /// Latest cycle count per machine.
    pub fn cycles(&self, machine: &str) -> u64 {
        self.machines.get(machine).map_or(0, |m| m.cycles)
    }
}
