//! The training pipeline: engines -> split -> features -> training -> evaluation -> ONNX + card.
//!
//! Evaluation protocol (like the C-MAPSS test set): `holdout_engines` engines never seen in
//! training, each cut at `cuts_per_engine` random cycles; the model predicts the RUL at the cut
//! and is compared with the true RUL (capped at 125 for `rmse`, as in the literature, and
//! uncapped for `rmse_uncapped`). The split and the cuts are drawn from the seed.

use kip_shared::features::{FeatureSpec, RUL_CAP_CYCLES};
use ndarray::Array2;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::SliceRandom as _};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::{
    cmapss::{DataError, Engine},
    eval,
    mlp::{Mlp, Normalizer, TrainConfig},
    onnx,
};

/// Options of one training run.
#[derive(Debug, Clone)]
pub struct Options {
    pub model_name: String,
    pub model_version: String,
    pub holdout_engines: usize,
    pub cuts_per_engine: usize,
    pub train: TrainConfig,
}

impl Options {
    /// The configuration whose figures are reported in docs/ml.md.
    pub fn reference(seed: u64) -> Self {
        Self {
            model_name: "rul-fd001".into(),
            model_version: format!("1.0.0+seed{seed}"),
            holdout_engines: 20,
            cuts_per_engine: 5,
            train: TrainConfig {
                hidden: vec![64, 32],
                epochs: 60,
                batch_size: 128,
                learning_rate: 0.002,
                weight_decay: 3e-3,
                seed,
                target_scale: RUL_CAP_CYCLES,
            },
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
}

/// Result of [`run`].
#[derive(Debug)]
pub struct Trained {
    pub onnx: Vec<u8>,
    pub card: ModelCard,
    pub net: Mlp,
    pub norm: Normalizer,
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
    #[error("need more than {holdout} engines to hold {holdout} out, got {got}")]
    TooFewEngines { holdout: usize, got: usize },
}

fn windows(spec: &FeatureSpec, engine: &Engine, cut: usize) -> Result<Vec<f32>, PipelineError> {
    let series = engine.select(&spec.channels)?;
    let upto = series.get(..cut).unwrap_or(&series);
    Ok(spec.features(upto, cut as f32)?)
}

/// Runs the whole pipeline on `engines`.
pub fn run(engines: &[Engine], opts: &Options) -> Result<Trained, PipelineError> {
    let spec = FeatureSpec::cmapss_v1();
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

    // Training set: every cycle of every training engine.
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for &i in trained {
        let e = &engines[i];
        let series = e.select(&spec.channels)?;
        let n = series.len();
        for cut in 1..=n {
            xs.extend(spec.features(&series[..cut], cut as f32)?);
            ys.push(((n - cut) as f32).min(RUL_CAP_CYCLES));
        }
    }
    let width = spec.len();
    let x = Array2::from_shape_vec((ys.len(), width), xs)
        .map_err(|_| PipelineError::TooFewEngines { holdout: 0, got: 0 })?;
    let norm = Normalizer::fit(x.view());
    let xn = norm.apply(x.view());
    let (net, losses) = Mlp::train(xn.view(), &ys, &opts.train);

    // Evaluation: random cuts of held-out engines.
    let mut ex = Vec::new();
    let mut truth = Vec::new();
    for &i in held {
        let e = &engines[i];
        let n = e.rows.len();
        let lo = 20.min(n.saturating_sub(1)).max(1);
        for _ in 0..opts.cuts_per_engine {
            let cut = rng.random_range(lo..n.max(lo + 1));
            ex.extend(windows(&spec, e, cut)?);
            truth.push((n - cut) as f32);
        }
    }
    let eval_features = Array2::from_shape_vec((truth.len(), width), ex)
        .map_err(|_| PipelineError::TooFewEngines { holdout: 0, got: 0 })?;
    let eval_predictions = predict(&net, &norm, &eval_features);
    let capped: Vec<f32> = truth.iter().map(|t| t.min(RUL_CAP_CYCLES)).collect();
    let metrics = Metrics {
        rmse: eval::rmse(&eval_predictions, &capped),
        rmse_uncapped: eval::rmse(&eval_predictions, &truth),
        nasa_score: eval::nasa_score(&eval_predictions, &capped),
        nasa_score_per_point: eval::nasa_score(&eval_predictions, &capped)
            / truth.len().max(1) as f64,
        eval_points: truth.len(),
        train_windows: ys.len(),
        final_train_loss: f64::from(losses.last().copied().unwrap_or(f32::NAN)),
    };
    let bytes = onnx::export(
        &net,
        &norm,
        RUL_CAP_CYCLES,
        &[
            ("kip.model_name", opts.model_name.clone()),
            ("kip.model_version", opts.model_version.clone()),
            ("kip.feature_set", spec.version.to_owned()),
        ],
    );
    let card = ModelCard {
        name: opts.model_name.clone(),
        version: opts.model_version.clone(),
        kind: "rul".into(),
        feature_set: spec.version.to_owned(),
        input: onnx::INPUT.into(),
        output: onnx::OUTPUT.into(),
        n_features: width,
        parameters: net.parameter_count(),
        hidden: opts.train.hidden.clone(),
        epochs: opts.train.epochs,
        seed: opts.train.seed,
        holdout_units,
        artifact_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        metrics,
    };
    Ok(Trained {
        onnx: bytes,
        card,
        net,
        norm,
        eval_features,
        eval_predictions,
    })
}

/// The model's prediction in Rust (same arithmetic as the ONNX graph, clipped to the cap).
pub fn predict(net: &Mlp, norm: &Normalizer, x: &Array2<f32>) -> Vec<f32> {
    net.forward(norm.apply(x.view()).view())
        .column(0)
        .iter()
        .map(|v| v.clamp(0.0, RUL_CAP_CYCLES))
        .collect()
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
}
