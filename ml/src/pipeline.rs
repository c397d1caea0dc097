//! The training pipeline: engines -> split -> features -> training -> evaluation -> ONNX + card.
//!
//! Features come from the run's feature-set document through
//! `kip_shared::feature_set::FeatureSet::compute`, the interpreter the agent runs; when the
//! document asks for regime normalisation, the regimes are fitted on the training engines only
//! ([`crate::regimes`]) and the fitted document is what the model ships with (inside the ONNX
//! metadata as `kip.feature_set_doc`, and in the model card).
//!
//! Evaluation protocol (like the C-MAPSS test set): `holdout_engines` engines never seen in
//! training, each cut at `cuts_per_engine` random cycles; the model predicts the RUL at the cut
//! and is compared with the true RUL (capped at the label cap for `rmse`, as in the literature,
//! and uncapped for `rmse_uncapped`). The split and the cuts are drawn from the seed and do not
//! depend on the feature set or the model, so runs with the same seed are scored on the same
//! points.

use kip_shared::{
    drift::Reference,
    feature_set::{FeatureSet, FeatureSetDoc, Normalisation},
};
use ndarray::Array2;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::SliceRandom as _};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{
    cmapss::{DataError, Engine},
    eval,
    mlp::{Mlp, Normalizer, TrainConfig},
    onnx, regimes,
};

/// ONNX metadata key of the feature-set id.
pub const META_FEATURE_SET: &str = "kip.feature_set";
/// ONNX metadata key of the (fitted) feature-set document, JSON.
pub const META_FEATURE_SET_DOC: &str = "kip.feature_set_doc";
/// ONNX metadata key of the drift references (`Vec<kip_shared::drift::Reference>`, JSON): one
/// per input of the feature set (its per-cycle values in training), then `output`.
pub const META_DRIFT_REFERENCE: &str = "kip.drift_reference";

/// Options of one training run.
#[derive(Debug, Clone)]
pub struct Options {
    pub model_name: String,
    pub model_version: String,
    pub holdout_engines: usize,
    pub cuts_per_engine: usize,
    /// The document the features come from (regimes unfitted or fitted; refitted here).
    pub feature_set: FeatureSet,
    /// Networks trained (member `i` from seed `seed + i`) and averaged.
    pub ensemble_members: usize,
    pub train: TrainConfig,
}

impl Options {
    /// The configuration of the first shipped model (`rul-fd001-1.0.0+seed42`): feature set
    /// `cmapss-w30-v1`, one MLP 64-32. `ml/configs/fd001-v1.toml` says the same in a file.
    pub fn reference(seed: u64) -> Self {
        let feature_set = FeatureSet::cmapss_w30_v1();
        Self {
            model_name: "rul-fd001".into(),
            model_version: format!("1.0.0+seed{seed}"),
            holdout_engines: 20,
            cuts_per_engine: 5,
            ensemble_members: 1,
            train: TrainConfig {
                hidden: vec![64, 32],
                epochs: 60,
                batch_size: 128,
                learning_rate: 0.002,
                weight_decay: 3e-3,
                seed,
                target_scale: feature_set.label().max_output(),
            },
            feature_set,
        }
    }
}

/// Metrics of a run, stored in the model card and the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub rmse: f64,
    pub rmse_uncapped: f64,
    pub nasa_score: f64,
    /// NASA score divided by the number of evaluation points (comparable across set sizes).
    pub nasa_score_per_point: f64,
    pub eval_points: usize,
    pub train_windows: usize,
    pub final_train_loss: f64,
}

/// Everything needed to register and deploy a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    pub version: String,
    pub kind: String,
    /// Id of the feature set (also in the ONNX metadata as `kip.feature_set`).
    pub feature_set: String,
    pub input: String,
    pub output: String,
    pub n_features: usize,
    pub parameters: usize,
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub seed: u64,
    pub holdout_units: Vec<u32>,
    pub artifact_sha256: String,
    pub metrics: Metrics,
    /// Number of averaged networks (cards written before ensembles existed: 1).
    #[serde(default = "one")]
    pub ensemble_members: usize,
    /// The fitted feature-set document the model was trained with (also inside the ONNX file
    /// as `kip.feature_set_doc`). Absent in cards of models that predate documents; their set
    /// is the built-in `cmapss-w30-v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_set_doc: Option<FeatureSetDoc>,
    /// Reference statistics for drift ([`META_DRIFT_REFERENCE`]); empty in cards written
    /// before drift existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift_reference: Vec<kip_shared::drift::Reference>,
}

fn one() -> usize {
    1
}

/// Result of [`run`].
#[derive(Debug)]
pub struct Trained {
    pub onnx: Vec<u8>,
    pub card: ModelCard,
    pub nets: Vec<Mlp>,
    pub norm: Normalizer,
    /// The fitted feature set the model reads.
    pub feature_set: FeatureSet,
    /// Evaluation inputs and the model's outputs, for cross-checking runtimes.
    pub eval_features: Array2<f32>,
    pub eval_predictions: Vec<f32>,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Features(#[from] kip_shared::features::FeatureError),
    #[error(transparent)]
    FeatureSet(#[from] kip_shared::feature_set::FeatureSetError),
    #[error("need more than {holdout} engines to hold {holdout} out, got {got}")]
    TooFewEngines { holdout: usize, got: usize },
    #[error("feature matrix of {rows} x {width} could not be built")]
    Shape { rows: usize, width: usize },
    #[error(transparent)]
    Drift(#[from] kip_shared::drift::DriftError),
}

/// Fits what the feature set needs from the training engines (operating regimes).
pub fn fit_feature_set(
    fs: &FeatureSet,
    engines: &[&Engine],
    seed: u64,
) -> Result<FeatureSet, PipelineError> {
    let Normalisation::RegimeZscore { regimes, .. } = &fs.doc().normalisation else {
        return Ok(fs.clone());
    };
    let mut rows = Vec::new();
    for e in engines {
        rows.extend(e.select(fs.inputs())?);
    }
    let fitted = regimes::fit(&rows, fs.signals().len(), *regimes as usize, seed);
    Ok(fs.with_fitted(fitted)?)
}

/// Features of `engine` observed up to cycle `cut` (1-based, inclusive).
pub fn features_at(
    fs: &FeatureSet,
    engine: &Engine,
    cut: usize,
) -> Result<Vec<f32>, PipelineError> {
    let series = engine.select(fs.inputs())?;
    let upto = series.get(..cut).unwrap_or(&series);
    Ok(fs.compute(upto, cut as f32)?)
}

/// One epoch of one network, as [`run_observed`] reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    /// Ensemble member (0 for a single network).
    pub member: usize,
    /// 0-based.
    pub epoch: usize,
    /// Mean training loss of the epoch (squared error in units of the label cap).
    pub train_loss: f64,
    /// RMSE of this network alone on the held-out evaluation points (truth capped at the
    /// label cap, output clipped like the exported graph): the last epoch of a single
    /// network gives the card's `rmse` (to float rounding).
    pub val_rmse: f64,
}

/// Runs the whole pipeline on `engines`.
pub fn run(engines: &[Engine], opts: &Options) -> Result<Trained, PipelineError> {
    run_observed(engines, opts, &mut |_| {})
}

/// [`run`], calling `on_epoch` after every epoch of every network (for experiment tracking).
/// The observer does not change the result: the same seed gives the same bytes.
pub fn run_observed(
    engines: &[Engine],
    opts: &Options,
    on_epoch: &mut dyn FnMut(EpochStats),
) -> Result<Trained, PipelineError> {
    if engines.len() <= opts.holdout_engines {
        return Err(PipelineError::TooFewEngines {
            holdout: opts.holdout_engines,
            got: engines.len(),
        });
    }
    let mut rng = StdRng::seed_from_u64(opts.train.seed ^ 0x5eed_c0de);
    let mut order: Vec<usize> = (0..engines.len()).collect();
    order.shuffle(&mut rng);
    let (held, trained) = order.split_at(opts.holdout_engines);
    let mut holdout_units: Vec<u32> = held.iter().map(|&i| engines[i].unit).collect();
    holdout_units.sort_unstable();
    let train_engines: Vec<&Engine> = trained.iter().map(|&i| &engines[i]).collect();
    let fs = fit_feature_set(&opts.feature_set, &train_engines, opts.train.seed)?;
    let label = fs.label();

    // Training set: every cycle of every training engine.
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    // Per-cycle values of each input, for the drift references.
    let mut input_values: Vec<Vec<f64>> = vec![Vec::new(); fs.inputs().len()];
    for e in &train_engines {
        let series = e.select(fs.inputs())?;
        for row in &series {
            for (col, v) in input_values.iter_mut().zip(row) {
                col.push(f64::from(*v));
            }
        }
        let n = series.len();
        for cut in 1..=n {
            fs.compute_into(&series[..cut], cut as f32, &mut xs)?;
            ys.push(label.target((n - cut) as f32));
        }
    }
    let width = fs.len();
    let x = Array2::from_shape_vec((ys.len(), width), xs).map_err(|_| PipelineError::Shape {
        rows: ys.len(),
        width,
    })?;
    // Evaluation points: random cuts of held-out engines (drawn before training so every
    // epoch can be scored on them; training does not use `rng`, so the points are the same).
    let mut ex = Vec::new();
    let mut truth = Vec::new();
    for &i in held {
        let e = &engines[i];
        let n = e.rows.len();
        let lo = 20.min(n.saturating_sub(1)).max(1);
        for _ in 0..opts.cuts_per_engine {
            let cut = rng.random_range(lo..n.max(lo + 1));
            ex.extend(features_at(&fs, e, cut)?);
            truth.push((n - cut) as f32);
        }
    }
    let eval_features =
        Array2::from_shape_vec((truth.len(), width), ex).map_err(|_| PipelineError::Shape {
            rows: truth.len(),
            width,
        })?;
    let norm = Normalizer::fit(x.view());
    let xn = norm.apply(x.view());
    let cap = label.max_output();
    let capped: Vec<f32> = truth.iter().map(|t| label.target(*t)).collect();
    let eval_xn = norm.apply(eval_features.view());
    let mut nets = Vec::with_capacity(opts.ensemble_members.max(1));
    let mut final_loss = 0f64;
    for m in 0..opts.ensemble_members.max(1) {
        let mut cfg = opts.train.clone();
        cfg.seed = opts.train.seed.wrapping_add(m as u64);
        let scale = cfg.target_scale.max(1e-6);
        let (net, losses) = Mlp::train_observed(xn.view(), &ys, &cfg, &mut |epoch, net, loss| {
            let out: Vec<f32> = net
                .forward(eval_xn.view())
                .column(0)
                .iter()
                .map(|v| (v * scale).clamp(0.0, cap))
                .collect();
            on_epoch(EpochStats {
                member: m,
                epoch,
                train_loss: f64::from(loss),
                val_rmse: eval::rmse(&out, &capped),
            });
        });
        final_loss += f64::from(losses.last().copied().unwrap_or(f32::NAN));
        nets.push(net);
    }
    final_loss /= nets.len() as f64;

    let eval_predictions = predict(&nets, &norm, &eval_features, cap);
    let metrics = Metrics {
        rmse: eval::rmse(&eval_predictions, &capped),
        rmse_uncapped: eval::rmse(&eval_predictions, &truth),
        nasa_score: eval::nasa_score(&eval_predictions, &capped),
        nasa_score_per_point: eval::nasa_score(&eval_predictions, &capped)
            / truth.len().max(1) as f64,
        eval_points: truth.len(),
        train_windows: ys.len(),
        final_train_loss: final_loss,
    };
    // Drift references: the inputs as read per cycle, and the model's output on the training
    // windows (what the agent compares live windows against).
    let train_out = predict(&nets, &norm, &x, cap);
    let mut drift_reference = Vec::with_capacity(input_values.len() + 1);
    for (name, values) in fs.inputs().iter().zip(&input_values) {
        drift_reference.push(Reference::fit(name, values)?);
    }
    let out_values: Vec<f64> = train_out.iter().map(|v| f64::from(*v)).collect();
    drift_reference.push(Reference::fit("output", &out_values)?);
    let doc_json = serde_json::to_string(fs.doc()).unwrap_or_default();
    let drift_json = serde_json::to_string(&drift_reference).unwrap_or_default();
    let bytes = onnx::export(
        &nets,
        &norm,
        cap,
        &[
            ("kip.model_name", opts.model_name.clone()),
            ("kip.model_version", opts.model_version.clone()),
            (META_FEATURE_SET, fs.id().to_owned()),
            (META_FEATURE_SET_DOC, doc_json),
            (META_DRIFT_REFERENCE, drift_json),
        ],
    );
    let card = ModelCard {
        name: opts.model_name.clone(),
        version: opts.model_version.clone(),
        kind: "rul".into(),
        feature_set: fs.id().to_owned(),
        input: onnx::INPUT.into(),
        output: onnx::OUTPUT.into(),
        n_features: width,
        parameters: nets.iter().map(Mlp::parameter_count).sum(),
        hidden: opts.train.hidden.clone(),
        epochs: opts.train.epochs,
        seed: opts.train.seed,
        holdout_units,
        artifact_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        metrics,
        ensemble_members: nets.len(),
        feature_set_doc: Some(fs.doc().clone()),
        drift_reference,
    };
    Ok(Trained {
        onnx: bytes,
        card,
        nets,
        norm,
        feature_set: fs,
        eval_features,
        eval_predictions,
    })
}

/// The model's prediction in Rust (same arithmetic as the ONNX graph: mean of the members,
/// clipped to `[0, cap]`).
pub fn predict(nets: &[Mlp], norm: &Normalizer, x: &Array2<f32>, cap: f32) -> Vec<f32> {
    let xn = norm.apply(x.view());
    let mut sum = vec![0f32; x.nrows()];
    for net in nets {
        for (s, v) in sum.iter_mut().zip(net.forward(xn.view()).column(0)) {
            *s += v;
        }
    }
    let k = nets.len().max(1) as f32;
    sum.into_iter().map(|v| (v / k).clamp(0.0, cap)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Synthetic engines whose sensor s2 drifts linearly towards failure: learnable quickly.
    fn synthetic(n_engines: u32) -> Vec<Engine> {
        (1..=n_engines)
            .map(|unit| {
                let len = 60 + (unit as usize * 7) % 50;
                let rows = (0..len)
                    .map(|c| {
                        let mut r = [1.0f32; 24];
                        let rul = (len - 1 - c) as f32;
                        for (k, v) in r.iter_mut().enumerate() {
                            *v = k as f32 + ((c * (k + 3)) % 5) as f32 * 0.01;
                        }
                        r[3 + 2] = 600.0 - rul.min(125.0) * 0.5; // s2 (index 4 + 2 - 1)
                        r
                    })
                    .collect();
                Engine { unit, rows }
            })
            .collect()
    }

    #[test]
    fn pipeline_learns_a_drifting_sensor_and_is_reproducible() {
        let engines = synthetic(30);
        let mut opts = Options::reference(3);
        opts.holdout_engines = 6;
        opts.train.epochs = 15;
        opts.train.hidden = vec![16];
        let a = run(&engines, &opts).unwrap();
        assert!(a.card.metrics.rmse < 15.0, "{:?}", a.card.metrics);
        assert_eq!(a.card.metrics.eval_points, 30);
        assert_eq!(a.card.holdout_units.len(), 6);
        assert_eq!(a.card.n_features, 421);
        let b = run(&engines, &opts).unwrap();
        assert_eq!(a.card.artifact_sha256, b.card.artifact_sha256);
        assert!(run(&engines[..5], &opts).is_err());
    }

    /// The feature code every shipped `cmapss-w30-v1` model was trained with, as it was before
    /// feature sets became documents (kept here as the reference).
    fn hard_wired_v1(cycles: &[Vec<f32>], cycle: f32) -> Vec<f32> {
        let start = cycles.len().saturating_sub(30);
        let recent = &cycles[start..];
        let mut out = Vec::new();
        for _ in recent.len()..30 {
            out.extend_from_slice(&cycles[0]);
        }
        for row in recent {
            out.extend_from_slice(row);
        }
        out.push(cycle);
        out
    }

    #[test]
    fn the_cmapss_w30_v1_document_reproduces_the_hard_wired_features_bit_for_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/train_FD001.txt");
        let engines = crate::cmapss::load(&path).unwrap();
        let fs = FeatureSet::builtin("cmapss-w30-v1").unwrap();
        let spec = kip_shared::features::FeatureSpec::cmapss_v1();
        for e in engines.iter().step_by(7) {
            let series = e.select(fs.inputs()).unwrap();
            for cut in 1..=series.len() {
                let want = hard_wired_v1(&series[..cut], cut as f32);
                assert_eq!(fs.compute(&series[..cut], cut as f32).unwrap(), want);
                if cut % 50 == 1 {
                    assert_eq!(spec.features(&series[..cut], cut as f32).unwrap(), want);
                }
            }
        }
    }

    #[test]
    fn an_ensemble_with_aggregations_and_regimes_trains_and_ships_its_fitted_document() {
        let engines = synthetic(30);
        let mut doc = kip_shared::feature_set::cmapss_w30_v1();
        doc.id = "synthetic-agg-v1".into();
        doc.signals = vec!["s2".into(), "s3".into()];
        doc.window_cycles = 20;
        doc.outputs.raw_window = false;
        doc.outputs.aggregations = ["last", "mean", "slope", "std"]
            .iter()
            .map(|op| serde_json::from_value(serde_json::json!({ "op": op })).unwrap())
            .collect();
        doc.normalisation = Normalisation::RegimeZscore {
            settings: vec!["setting1".into()],
            regimes: 1,
            fitted: None,
        };
        let mut opts = Options::reference(5);
        opts.feature_set = FeatureSet::new(doc).unwrap();
        opts.holdout_engines = 6;
        opts.train.epochs = 15;
        opts.train.hidden = vec![16];
        opts.ensemble_members = 3;
        let t = run(&engines, &opts).unwrap();
        assert!(t.card.metrics.rmse < 20.0, "{:?}", t.card.metrics);
        assert_eq!(t.card.n_features, 2 * 4 + 1);
        assert_eq!(t.card.ensemble_members, 3);
        assert_eq!(t.nets.len(), 3);
        let doc = t.card.feature_set_doc.as_ref().unwrap();
        assert!(FeatureSet::new(doc.clone()).unwrap().is_fitted());
        // Drift references: one per input, then the output, also inside the ONNX file.
        let names: Vec<&str> = t
            .card
            .drift_reference
            .iter()
            .map(|r| r.feature.as_str())
            .collect();
        let mut want: Vec<&str> = t.feature_set.inputs().iter().map(String::as_str).collect();
        want.push("output");
        assert_eq!(names, want);
        assert!(t.card.drift_reference.iter().all(|r| r.samples > 0));
        // The ONNX file carries the same fitted document, so the agent needs nothing else.
        let m = <onnx::ModelProto as prost::Message>::decode(t.onnx.as_slice()).unwrap();
        let embedded = m
            .metadata_props
            .iter()
            .find(|p| p.key == META_FEATURE_SET_DOC)
            .unwrap();
        let fs = FeatureSet::for_model("synthetic-agg-v1", Some(&embedded.value)).unwrap();
        assert_eq!(fs.doc(), doc);
    }
}
