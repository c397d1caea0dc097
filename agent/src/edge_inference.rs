//! Inference wired into the running agent: readings on their way to the buffer are copied to
//! a separate task that runs the [`Predictor`] and appends each prediction to the same buffer
//! as `Record::Prediction`, so predictions sync and survive network outages like readings.
//!
//! Invariants:
//! - The buffer writer never waits for inference: it offers each reading with `try_send` on a
//!   bounded channel; when the channel is full the reading is skipped for inference only (it is
//!   still buffered) and `kip_agent_inference_dropped_readings_total` counts it.
//! - Inference needs no network: the model is a local file (or a verified hot swap), so
//!   predictions continue during a control-plane outage.
//! - The task ends when the writer drops its sender (the one shutdown path); the model lock is
//!   a plain mutex, never held across an `await`.
//! - Each machine's window and cycle count (its age, a model feature) survive a restart: they
//!   are kept in `<state_dir>/predictor.json` ([`Inference::run`]).
//! - For a model with drift references, every [`DRIFT_RECORD_EVERY_PREDICTIONS`] predictions
//!   one `Record::ModelDrift` per full drift window goes to the same buffer, so drift syncs
//!   (and survives outages) like predictions; consecutive records of a feature cover disjoint
//!   windows. A shadow model with references gets its own monitor and records (tagged with
//!   its name and version), so a rollout's candidate has measured drift in either mode.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use kip_shared::{
    ModelDrift, ModelRole, ModelStats, Prediction, Reading, Record, drift::FeatureDrift,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::mpsc;

use crate::{
    buffer::Buffer,
    inference::{DRIFT_WINDOW, InferenceError, ModelSlot, OrtRuntime, Predictor, RulModel},
};

pub use kip_agent_config::edge_inference::InferenceConfig;

/// Longest time between saves of the predictor state while predictions are made.
pub const STATE_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// Inference metrics (`kip_agent_inference_*`, `kip_agent_predictions_total`, `kip_agent_model_*`).
#[derive(Debug, Clone)]
pub struct InferenceMetrics {
    pub latency: Histogram,
    pub predictions: Counter,
    pub dropped_readings: Counter,
    pub errors: Counter,
    pub swap_failures: Counter,
    pub model_info: Family<ModelLabels, Gauge>,
    /// PSI / KS of each input and the output of the serving model (and of the shadow model,
    /// under its own name and version) over the drift window.
    pub drift: Family<DriftLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 when a feature's PSI or KS is above its window-calibrated threshold.
    pub drift_alarm: Family<DriftAlarmLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub model: String,
    pub version: String,
    pub feature: String,
    /// `psi` or `ks`.
    pub statistic: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftAlarmLabels {
    pub model: String,
    pub version: String,
    pub feature: String,
}

/// Predictions between two updates of the drift metrics.
const DRIFT_EVERY_PREDICTIONS: u64 = 20;

/// Predictions between two sets of drift records ([`Record::ModelDrift`], one per monitored
/// feature): one drift window, so consecutive records of a feature describe disjoint windows
/// (each prediction adds one value to every window) and the sync carries `features + 1`
/// records per [`DRIFT_WINDOW`] predictions, not per prediction.
pub const DRIFT_RECORD_EVERY_PREDICTIONS: u64 = DRIFT_WINDOW as u64;

impl InferenceMetrics {
    /// Creates and registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            latency: Histogram::new([
                0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005,
                0.025, 0.1,
            ]),
            predictions: Counter::default(),
            dropped_readings: Counter::default(),
            errors: Counter::default(),
            drift: Family::default(),
            drift_alarm: Family::default(),
            swap_failures: Counter::default(),
            model_info: Family::default(),
        };
        registry.register(
            "inference_latency_seconds",
            "Time of one model inference (feature building and the ONNX run)",
            m.latency.clone(),
        );
        registry.register(
            "predictions",
            "Predictions made and buffered",
            m.predictions.clone(),
        );
        registry.register(
            "inference_dropped_readings",
            "Readings not given to inference because its queue was full (still buffered)",
            m.dropped_readings.clone(),
        );
        registry.register(
            "inference_errors",
            "Inferences that failed or whose prediction could not be buffered",
            m.errors.clone(),
        );
        registry.register(
            "model_swap_failures",
            "Model installs refused by the checks; the previous model kept serving",
            m.swap_failures.clone(),
        );
        registry.register(
            "model_drift",
            "Drift of a model input or output over the drift window (statistic psi or ks)",
            m.drift.clone(),
        );
        registry.register(
            "model_drift_alarm",
            "1 when the feature's PSI or KS is above its window-calibrated threshold",
            m.drift_alarm.clone(),
        );
        registry.register(
            "model_info",
            "The model serving predictions (value 1)",
            m.model_info.clone(),
        );
        m
    }
}

/// Inference attempts of one model (and role) between two [`Record::ModelStats`].
pub const STATS_EVERY_ATTEMPTS: u64 = 50;

/// Inference statistics of one model in one role since the last [`Record::ModelStats`].
#[derive(Debug)]
struct StatsWindow {
    model: String,
    version: String,
    role: ModelRole,
    predictions: u64,
    failures: u64,
    /// Microseconds of the successful runs (at most [`STATS_EVERY_ATTEMPTS`]).
    latencies_us: Vec<f64>,
}

impl StatsWindow {
    fn new(model: &str, version: &str, role: ModelRole) -> Self {
        Self {
            model: model.to_owned(),
            version: version.to_owned(),
            role,
            predictions: 0,
            failures: 0,
            latencies_us: Vec::with_capacity(STATS_EVERY_ATTEMPTS as usize),
        }
    }

    fn attempts(&self) -> u64 {
        self.predictions + self.failures
    }

    fn record(&mut self, ts: chrono::DateTime<chrono::Utc>) -> Record {
        self.latencies_us.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let n = self.latencies_us.len();
            (n > 0).then(|| {
                let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
                self.latencies_us[i]
            })
        };
        let r = Record::ModelStats(ModelStats {
            model: self.model.clone(),
            model_version: self.version.clone(),
            role: self.role,
            ts,
            predictions: self.predictions,
            failures: self.failures,
            latency_p50_us: q(0.5),
            latency_p99_us: q(0.99),
            latency_max_us: self.latencies_us.last().copied(),
        });
        self.predictions = 0;
        self.failures = 0;
        self.latencies_us.clear();
        r
    }
}

/// Inference state shared by the task, the HTTP surface and model installs.
#[derive(Debug)]
pub struct Inference {
    rt: OrtRuntime,
    slot: Mutex<ModelSlot>,
    /// The model run beside the champion (a canary's baseline or a shadow candidate).
    shadow: Mutex<Option<RulModel>>,
    latest: Mutex<BTreeMap<String, Prediction>>,
    pub metrics: InferenceMetrics,
    /// The serving model's drift as of the last metrics update, for the health report.
    drift_summary: Mutex<Option<DriftSummary>>,
}

/// The serving model's drift in one number and a list, for the health report
/// (`model_drift`, `model_drift_features`).
#[derive(Debug, Clone, PartialEq)]
pub struct DriftSummary {
    /// Largest ratio of a statistic (PSI or KS) to its window-calibrated threshold over the
    /// model's inputs and output: above 1 means some feature drifts.
    pub score: f64,
    /// Features (inputs, or `output`) with a statistic above its threshold, in model order.
    pub drifted: Vec<String>,
}

impl DriftSummary {
    /// Summary of the full windows of `drift`; `None` while no window is full.
    pub fn of(drift: &[FeatureDrift]) -> Option<Self> {
        if drift.is_empty() {
            return None;
        }
        let ratio = |v: f64, t: f64| if t > 0.0 { v / t } else { 0.0 };
        let score = drift
            .iter()
            .map(|d| ratio(d.psi, d.thresholds.psi).max(ratio(d.ks, d.thresholds.ks)))
            .filter(|r| r.is_finite())
            .fold(0.0, f64::max);
        Some(Self {
            score,
            drifted: drift
                .iter()
                .filter(|d| d.drifted)
                .map(|d| d.feature.clone())
                .collect(),
        })
    }
}

/// Why inference could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("[inference] is enabled but {0}")]
    Runtime(#[source] InferenceError),
    #[error("cannot read [inference] model_path {path}: {source}")]
    ModelRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[inference] model_path {path} was refused: {source}")]
    Model {
        path: PathBuf,
        source: InferenceError,
    },
}

impl Inference {
    /// Loads ONNX Runtime (a missing library is an error naming the fix) and the initial model.
    pub fn start(cfg: &InferenceConfig, registry: &mut Registry) -> Result<Arc<Self>, StartError> {
        let rt = OrtRuntime::load(cfg.ort_library.as_deref()).map_err(StartError::Runtime)?;
        tracing::info!(library = %rt.library.display(), "ONNX Runtime loaded");
        let me = Arc::new(Self {
            rt,
            slot: Mutex::new(ModelSlot::default()),
            shadow: Mutex::new(None),
            latest: Mutex::new(BTreeMap::new()),
            metrics: InferenceMetrics::register(registry),
            drift_summary: Mutex::new(None),
        });
        if let Some(path) = &cfg.model_path {
            let bytes = std::fs::read(path).map_err(|source| StartError::ModelRead {
                path: path.clone(),
                source,
            })?;
            me.install(&bytes, cfg.model_sha256.as_deref())
                .map_err(|source| StartError::Model {
                    path: path.clone(),
                    source,
                })?;
        } else {
            tracing::warn!(
                "[inference] has no model_path: no predictions until a model is installed"
            );
        }
        Ok(me)
    }

    /// Verifies and hot-swaps a model; on failure the previous model keeps serving.
    pub fn install(
        &self,
        bytes: &[u8],
        expected_sha256: Option<&str>,
    ) -> Result<(), InferenceError> {
        // Loading takes milliseconds; inference waits for it rather than running a half-swapped slot.
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = slot.try_swap(&self.rt, bytes, expected_sha256) {
            self.metrics.swap_failures.inc();
            tracing::warn!(error = %e, "model refused; the previous model keeps serving");
            return Err(e);
        }
        let Some(model) = slot.current() else {
            return Ok(());
        };
        let labels = ModelLabels {
            name: model.name.clone(),
            version: model.version.clone(),
            sha256: model.sha256.clone(),
        };
        self.metrics.model_info.clear();
        self.metrics.model_info.get_or_create(&labels).set(1);
        // The previous model's drift says nothing about this one.
        *self
            .drift_summary
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        tracing::info!(name = %labels.name, version = %labels.version, sha256 = %labels.sha256, "model serving");
        Ok(())
    }

    /// Verifies and loads a shadow model (same checks as [`Inference::install`]); it replaces
    /// the previous shadow. On failure the previous shadow (if any) keeps running.
    pub fn install_shadow(
        &self,
        bytes: &[u8],
        expected_sha256: Option<&str>,
    ) -> Result<(), InferenceError> {
        let model = RulModel::load(&self.rt, bytes, expected_sha256).inspect_err(|e| {
            self.metrics.swap_failures.inc();
            tracing::warn!(error = %e, "shadow model refused");
        })?;
        tracing::info!(name = %model.name, version = %model.version, sha256 = %model.sha256, "shadow model running beside the champion");
        *self.shadow.lock().unwrap_or_else(PoisonError::into_inner) = Some(model);
        Ok(())
    }

    /// Stops running a shadow model.
    pub fn remove_shadow(&self) {
        if let Some(m) = self
            .shadow
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            tracing::info!(name = %m.name, version = %m.version, "shadow model removed");
        }
    }

    /// `name@version` and sha256 of the shadow model, if one runs.
    pub fn shadow_model(&self) -> Option<(String, String)> {
        let shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
        shadow
            .as_ref()
            .map(|m| (format!("{}@{}", m.name, m.version), m.sha256.clone()))
    }

    /// `predictor`'s drift over its full windows, with the serving model's name and version.
    fn current_drift(&self, predictor: &Predictor) -> Option<(String, String, Vec<FeatureDrift>)> {
        let drift = predictor.drift();
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.current()
            .map(|m| (m.name.clone(), m.version.clone(), drift))
    }

    /// Buffers one [`Record::ModelDrift`] per feature whose window is full, for the serving
    /// model and for the shadow (tagged with the shadow's name and version: its rollout's
    /// comparison report reads the candidate's drift from them).
    fn record_drift(
        &self,
        buffer: &Buffer,
        predictor: &Predictor,
        ts: chrono::DateTime<chrono::Utc>,
    ) {
        let models = self
            .current_drift(predictor)
            .into_iter()
            .chain(predictor.shadow_drift());
        for (model, version, drift) in models {
            for d in drift {
                let record = Record::ModelDrift(ModelDrift {
                    model: model.clone(),
                    model_version: version.clone(),
                    feature: d.feature,
                    ts,
                    psi: d.psi,
                    ks: d.ks,
                    psi_threshold: d.thresholds.psi,
                    ks_threshold: d.thresholds.ks,
                    alarm: d.drifted,
                    window: u32::try_from(d.window).unwrap_or(u32::MAX),
                    effective_window: u32::try_from(d.effective_window).unwrap_or(u32::MAX),
                });
                if let Err(e) = buffer.append(&record) {
                    self.metrics.errors.inc();
                    tracing::warn!(error = %e, "drift record could not be buffered");
                }
            }
        }
    }

    /// Sets the drift metrics from `predictor`'s windows (labelled by the serving model).
    fn export_drift(&self, predictor: &Predictor) {
        let Some((model, version, drift)) = self.current_drift(predictor) else {
            return;
        };
        self.metrics.drift.clear();
        self.metrics.drift_alarm.clear();
        *self
            .drift_summary
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = DriftSummary::of(&drift);
        // The health summary is the serving model's; the gauges carry the shadow's too.
        let models = std::iter::once((model, version, drift)).chain(predictor.shadow_drift());
        for (model, version, drift) in models {
            self.export_model_drift(&model, &version, drift);
        }
    }

    fn export_model_drift(&self, model: &str, version: &str, drift: Vec<FeatureDrift>) {
        for d in drift {
            for (statistic, v) in [("psi", d.psi), ("ks", d.ks)] {
                self.metrics
                    .drift
                    .get_or_create(&DriftLabels {
                        model: model.to_owned(),
                        version: version.to_owned(),
                        feature: d.feature.clone(),
                        statistic,
                    })
                    .set(v);
            }
            self.metrics
                .drift_alarm
                .get_or_create(&DriftAlarmLabels {
                    model: model.to_owned(),
                    version: version.to_owned(),
                    feature: d.feature.clone(),
                })
                .set(i64::from(d.drifted));
        }
    }

    /// The serving model's drift as of the last metrics update (every
    /// `DRIFT_EVERY_PREDICTIONS`); `None` before its first full window.
    pub fn drift_summary(&self) -> Option<DriftSummary> {
        self.drift_summary
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `name@version` of the serving model, for sync status.
    pub fn running_model(&self) -> Option<String> {
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.current().map(|m| format!("{}@{}", m.name, m.version))
    }

    /// The latest prediction of every machine.
    pub fn latest(&self) -> BTreeMap<String, Prediction> {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs until every sender of `rx` is gone.
    ///
    /// With `state_file`, the per-machine state (window and cycle count) is restored from it
    /// at start, saved at most every [`STATE_SAVE_INTERVAL`] while predictions are made, and
    /// saved once more when the task ends (the shutdown path), so machines keep their age
    /// across restarts; a crash loses at most one interval of cycles.
    pub async fn run(
        self: Arc<Self>,
        buffer: Arc<Buffer>,
        mut rx: mpsc::Receiver<Reading>,
        state_file: Option<PathBuf>,
    ) {
        let mut predictor = match state_file.as_deref().map(Predictor::load) {
            Some(Ok(p)) => {
                tracing::info!(machines = p.machines(), "predictor state restored");
                p
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "predictor state unreadable; machines start over");
                Predictor::default()
            }
            None => Predictor::default(),
        };
        let mut saved_at = Instant::now();
        let mut dirty = false;
        // Champion and shadow statistics windows.
        let mut stats: [Option<StatsWindow>; 2] = [None, None];
        let save = |p: &Predictor| {
            if let Some(path) = &state_file
                && let Err(e) = p.save(path)
            {
                tracing::warn!(error = %e, "predictor state not saved");
            }
        };
        while let Some(reading) = rx.recv().await {
            if dirty && saved_at.elapsed() >= STATE_SAVE_INTERVAL {
                save(&predictor);
                saved_at = Instant::now();
                dirty = false;
            }
            let started = Instant::now();
            let result = {
                let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
                let mut shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
                let champion = slot.current().map(|m| (m.name.clone(), m.version.clone()));
                let r = predictor.observe_with_shadow(&mut slot, shadow.as_mut(), &reading);
                (champion, r)
            };
            let observation = match result {
                (_, Ok(Some(o))) => {
                    dirty = true;
                    o
                }
                (_, Ok(None)) => continue,
                (champion, Err(e)) => {
                    self.metrics.errors.inc();
                    if let Some((name, version)) = champion {
                        let w = stats_window(&mut stats[0], &name, &version, ModelRole::Champion);
                        w.failures += 1;
                        self.flush_stats(&buffer, w, false);
                    }
                    tracing::warn!(error = %e, machine = %reading.machine, "inference failed");
                    continue;
                }
            };
            self.metrics
                .latency
                .observe(started.elapsed().as_secs_f64());
            let prediction = observation.prediction;
            if let Err(e) = buffer.append(&Record::Prediction(prediction.clone())) {
                self.metrics.errors.inc();
                tracing::warn!(error = %e, "prediction could not be buffered");
            }
            let champion = self.running_model_parts();
            if let Some((name, version)) = champion {
                let w = stats_window(&mut stats[0], &name, &version, ModelRole::Champion);
                w.predictions += 1;
                w.latencies_us.push(observation.latency.as_secs_f64() * 1e6);
                self.flush_stats(&buffer, w, false);
            }
            if let Some(shadow) = observation.shadow {
                let sh = self.shadow_parts();
                match shadow {
                    Ok((p, latency)) => {
                        if let Err(e) = buffer.append(&Record::Prediction(p)) {
                            self.metrics.errors.inc();
                            tracing::warn!(error = %e, "shadow prediction could not be buffered");
                        }
                        if let Some((name, version)) = sh {
                            let w = stats_window(&mut stats[1], &name, &version, ModelRole::Shadow);
                            w.predictions += 1;
                            w.latencies_us.push(latency.as_secs_f64() * 1e6);
                            self.flush_stats(&buffer, w, false);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, machine = %reading.machine, "shadow inference failed");
                        if let Some((name, version)) = sh {
                            let w = stats_window(&mut stats[1], &name, &version, ModelRole::Shadow);
                            w.failures += 1;
                            self.flush_stats(&buffer, w, false);
                        }
                    }
                }
            }
            self.metrics.predictions.inc();
            if self
                .metrics
                .predictions
                .get()
                .is_multiple_of(DRIFT_EVERY_PREDICTIONS)
            {
                self.export_drift(&predictor);
            }
            if self
                .metrics
                .predictions
                .get()
                .is_multiple_of(DRIFT_RECORD_EVERY_PREDICTIONS)
            {
                self.record_drift(&buffer, &predictor, chrono::Utc::now());
            }
            self.latest
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(prediction.machine.clone(), prediction);
        }
        if dirty {
            save(&predictor);
        }
        for w in stats.iter_mut().flatten() {
            self.flush_stats(&buffer, w, true);
        }
        tracing::info!("inference task stopped");
    }
}

/// The window of `slot` for `model@version` in `role`; a window of another model is dropped
/// (its partial interval is lost: at most [`STATS_EVERY_ATTEMPTS`] attempts of a model that
/// was just replaced).
fn stats_window<'a>(
    slot: &'a mut Option<StatsWindow>,
    model: &str,
    version: &str,
    role: ModelRole,
) -> &'a mut StatsWindow {
    if slot
        .as_ref()
        .is_none_or(|w| w.model != model || w.version != version || w.role != role)
    {
        *slot = Some(StatsWindow::new(model, version, role));
    }
    slot.get_or_insert_with(|| StatsWindow::new(model, version, role))
}

impl Inference {
    fn running_model_parts(&self) -> Option<(String, String)> {
        let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        slot.current().map(|m| (m.name.clone(), m.version.clone()))
    }

    fn shadow_parts(&self) -> Option<(String, String)> {
        let shadow = self.shadow.lock().unwrap_or_else(PoisonError::into_inner);
        shadow.as_ref().map(|m| (m.name.clone(), m.version.clone()))
    }

    /// Buffers the window's [`Record::ModelStats`] once it holds [`STATS_EVERY_ATTEMPTS`]
    /// attempts (or any, with `force`: at shutdown).
    fn flush_stats(&self, buffer: &Buffer, w: &mut StatsWindow, force: bool) {
        if w.attempts() >= STATS_EVERY_ATTEMPTS || (force && w.attempts() > 0) {
            let record = w.record(chrono::Utc::now());
            if let Err(e) = buffer.append(&record) {
                self.metrics.errors.inc();
                tracing::warn!(error = %e, "model statistics could not be buffered");
            }
        }
    }
}

/// The writer's handle on the inference queue.
#[derive(Debug, Clone)]
pub struct InferenceFeed {
    pub tx: mpsc::Sender<Reading>,
    pub dropped: Counter,
}

impl InferenceFeed {
    /// Offers a reading without waiting; counts it when the queue is full.
    pub fn offer(&self, reading: &Reading) {
        if self.tx.try_send(reading.clone()).is_err() {
            self.dropped.inc();
        }
    }
}
