//! Training configurations: one TOML file per machine type (`ml/configs/*.toml`) naming the
//! data, the feature-set document, the model and the hyper-parameters, so a new fleet is
//! trained by configuration only.
//!
//! Invariants: unknown keys are refused; every number is range-checked at load
//! ([`TrainingConfig::load`]); relative paths are resolved against the config file's directory,
//! so a config works from any working directory.

use std::path::{Path, PathBuf};

use kip_shared::feature_set::FeatureSet;
use serde::Deserialize;

use crate::{mlp::TrainConfig, pipeline::Options};

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {field} {reason}")]
    Invalid {
        path: String,
        field: &'static str,
        reason: String,
    },
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    model_name: String,
    /// Semantic version; `+seed<N>` is appended per run.
    model_version: String,
    /// C-MAPSS-layout training file.
    data: PathBuf,
    /// Feature-set document (JSON).
    feature_set: PathBuf,
    #[serde(default = "default_holdout_engines")]
    holdout_engines: usize,
    #[serde(default = "default_cuts_per_engine")]
    cuts_per_engine: usize,
    train: RawTrain,
    /// Experiment tracking (optional): `--mlflow` and `MLFLOW_TRACKING_URI` take precedence.
    #[serde(default)]
    mlflow: Option<RawMlflow>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMlflow {
    /// `http(s)://` URL of the MLflow tracking server.
    #[serde(default)]
    tracking_uri: Option<String>,
    /// Experiment name; default: the model name.
    #[serde(default)]
    experiment: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    hidden: Vec<usize>,
    epochs: usize,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    learning_rate: f32,
    weight_decay: f32,
    /// Networks trained from different seeds and averaged (in the ONNX graph).
    #[serde(default = "default_ensemble_members")]
    ensemble_members: usize,
}

fn default_holdout_engines() -> usize {
    20
}
fn default_cuts_per_engine() -> usize {
    5
}
fn default_batch_size() -> usize {
    128
}
fn default_ensemble_members() -> usize {
    1
}

/// A checked training configuration.
#[derive(Debug, Clone)]
pub struct TrainingConfig {
    pub model_name: String,
    pub model_version: String,
    pub data: PathBuf,
    pub feature_set: FeatureSet,
    pub holdout_engines: usize,
    pub cuts_per_engine: usize,
    pub hidden: Vec<usize>,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub ensemble_members: usize,
    /// `[mlflow] tracking_uri` (checked to be an http(s) URL).
    pub mlflow_tracking_uri: Option<String>,
    /// `[mlflow] experiment` (1..=256 characters).
    pub mlflow_experiment: Option<String>,
}

impl TrainingConfig {
    /// Reads, parses and checks a config file and the feature-set document it names.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let raw: RawConfig = toml::from_str(&read(path)?).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fs_path = base.join(&raw.feature_set);
        let feature_set =
            FeatureSet::from_json(&read(&fs_path)?).map_err(|e| ConfigError::Parse {
                path: fs_path.display().to_string(),
                message: e.to_string(),
            })?;
        let bad = |field: &'static str, reason: String| ConfigError::Invalid {
            path: shown.clone(),
            field,
            reason,
        };
        kip_shared::Name::parse(&raw.model_name).map_err(|e| bad("model_name", e.to_string()))?;
        if raw.model_version.is_empty()
            || raw.model_version.contains('+')
            || raw.model_version.len() > 40
        {
            return Err(bad(
                "model_version",
                "must be 1..=40 characters without '+' (the seed is appended)".into(),
            ));
        }
        let range = |field: &'static str, v: usize, min: usize, max: usize| {
            kip_shared::validate::in_range(v, min, max, "").map_err(|r| bad(field, r))
        };
        range("holdout_engines", raw.holdout_engines, 1, 10_000)?;
        range("cuts_per_engine", raw.cuts_per_engine, 1, 1000)?;
        range("train.epochs", raw.train.epochs, 1, 10_000)?;
        range("train.batch_size", raw.train.batch_size, 1, 65_536)?;
        range("train.ensemble_members", raw.train.ensemble_members, 1, 16)?;
        range("train.hidden (layers)", raw.train.hidden.len(), 1, 8)?;
        for h in &raw.train.hidden {
            range("train.hidden", *h, 1, 4096)?;
        }
        if !(raw.train.learning_rate > 0.0 && raw.train.learning_rate < 1.0) {
            return Err(bad(
                "train.learning_rate",
                format!("must be in (0, 1), got {}", raw.train.learning_rate),
            ));
        }
        if !(0.0..1.0).contains(&raw.train.weight_decay) {
            return Err(bad(
                "train.weight_decay",
                format!("must be in [0, 1), got {}", raw.train.weight_decay),
            ));
        }
        let mlflow = raw.mlflow.unwrap_or(RawMlflow {
            tracking_uri: None,
            experiment: None,
        });
        if let Some(uri) = &mlflow.tracking_uri
            && !(uri.starts_with("http://") || uri.starts_with("https://"))
        {
            return Err(bad(
                "mlflow.tracking_uri",
                format!("must be an http:// or https:// URL, got {uri:?}"),
            ));
        }
        if let Some(e) = &mlflow.experiment
            && (e.trim().is_empty() || e.len() > 256)
        {
            return Err(bad(
                "mlflow.experiment",
                "must be 1..=256 characters".into(),
            ));
        }
        Ok(Self {
            mlflow_tracking_uri: mlflow.tracking_uri,
            mlflow_experiment: mlflow.experiment,
            model_name: raw.model_name,
            model_version: raw.model_version,
            data: base.join(raw.data),
            feature_set,
            holdout_engines: raw.holdout_engines,
            cuts_per_engine: raw.cuts_per_engine,
            hidden: raw.train.hidden,
            epochs: raw.train.epochs,
            batch_size: raw.train.batch_size,
            learning_rate: raw.train.learning_rate,
            weight_decay: raw.train.weight_decay,
            ensemble_members: raw.train.ensemble_members,
        })
    }

    /// Pipeline options of one run with `seed`.
    pub fn options(&self, seed: u64) -> Options {
        Options {
            model_name: self.model_name.clone(),
            model_version: format!("{}+seed{seed}", self.model_version),
            holdout_engines: self.holdout_engines,
            cuts_per_engine: self.cuts_per_engine,
            feature_set: self.feature_set.clone(),
            ensemble_members: self.ensemble_members,
            train: TrainConfig {
                hidden: self.hidden.clone(),
                epochs: self.epochs,
                batch_size: self.batch_size,
                learning_rate: self.learning_rate,
                weight_decay: self.weight_decay,
                seed,
                target_scale: self.feature_set.label().max_output(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
    }

    #[test]
    fn every_shipped_config_loads_and_names_existing_data() {
        let mut n = 0;
        for entry in std::fs::read_dir(configs()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = TrainingConfig::load(&path).unwrap();
                assert!(c.data.is_file(), "{}: {}", path.display(), c.data.display());
                assert!(!c.feature_set.is_empty());
                n += 1;
            }
        }
        assert!(n >= 2, "expected the FD001 and FD003 configs");
    }

    #[test]
    fn the_cmapss_w30_v1_file_is_the_built_in_document() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("feature-sets/cmapss-w30-v1.json");
        let file = FeatureSet::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(Some(file), FeatureSet::builtin("cmapss-w30-v1"));
        let c = TrainingConfig::load(&configs().join("fd001-v1.toml")).unwrap();
        let (a, b) = (c.options(42), Options::reference(42));
        assert_eq!(a.feature_set, b.feature_set);
        assert_eq!(a.model_version, b.model_version);
        assert_eq!(
            (
                a.train.hidden,
                a.train.epochs,
                a.train.learning_rate,
                a.train.weight_decay
            ),
            (
                b.train.hidden,
                b.train.epochs,
                b.train.learning_rate,
                b.train.weight_decay
            )
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fs.json"),
            kip_shared::feature_set::FeatureSet::builtin("cmapss-w30-v1")
                .unwrap()
                .to_json(),
        )
        .unwrap();
        let good = "model_name = \"m\"\nmodel_version = \"1.0.0\"\ndata = \"d.txt\"\n\
                    feature_set = \"fs.json\"\n[train]\nhidden = [8]\nepochs = 2\n\
                    learning_rate = 0.01\nweight_decay = 0.0\n";
        let load = |text: &str| {
            let p = dir.path().join("c.toml");
            std::fs::write(&p, text).unwrap();
            TrainingConfig::load(&p)
        };
        let c = load(good).unwrap();
        assert_eq!(c.data, dir.path().join("d.txt"));
        assert_eq!(c.options(7).model_version, "1.0.0+seed7");
        assert_eq!(c.ensemble_members, 1);
        let err = load(&format!("{good}colour = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = load(&good.replace("epochs = 2", "epochs = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.epochs"), "{err}");
        let err = load(&good.replace("1.0.0", "1.0.0+x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_version"), "{err}");
        let c = load(&format!(
            "{good}[mlflow]\ntracking_uri = \"http://mlflow:5000\"\nexperiment = \"fd\"\n"
        ))
        .unwrap();
        assert_eq!(c.mlflow_tracking_uri.as_deref(), Some("http://mlflow:5000"));
        assert_eq!(c.mlflow_experiment.as_deref(), Some("fd"));
        let err = load(&format!("{good}[mlflow]\ntracking_uri = \"mlruns\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("mlflow.tracking_uri"), "{err}");
    }
}
