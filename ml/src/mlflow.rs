//! Experiment tracking: each `kip-train` run as an MLflow run, through the tracking server's
//! REST API (`/api/2.0/mlflow/...`; artifacts through the server's `mlflow-artifacts` proxy,
//! `mlflow server --serve-artifacts`, the default since MLflow 2.0).
//!
//! What a run holds (`kip-train`): params (training config, seed, feature set, data file and
//! its sha256), per-epoch metrics `train_loss` and `val_rmse` with `step` = epoch (members of
//! an ensemble as `train_loss.m<i>` / `val_rmse.m<i>`), the final held-out metrics (`rmse`,
//! `phm08_score`, ...), and artifacts: `model/<name>-<version>.onnx`, `model/<name>-<version>.json`
//! (the model card), `feature_set/<id>.json` (the fitted feature-set document) and, when a
//! config file was given, `config/<file>`. The trained version becomes a version of the MLflow
//! registered model named like the kip model, created from the run (`run_id`, `source` = the
//! run's `model` folder) and tagged `kip.version`, `kip.artifact_sha256`, `kip.feature_set`;
//! kip's control plane adopts that version (matched by `kip.artifact_sha256`) when the model is
//! registered with `--register` instead of creating a second one.
//!
//! Invariants:
//! - Tracking is opt-in: without a tracking URI nothing is sent and training is unchanged.
//! - A tracked run that fails is ended `FAILED`; one that ends `FINISHED` has every metric and
//!   artifact above (the model files on disk are written before any upload, so an MLflow
//!   failure never loses the trained model).
//! - Every call is bounded by [`REQUEST_TIMEOUT`]; errors are typed ([`MlflowError`]) and name
//!   the call and the server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// Time limit of one MLflow call (an artifact upload of a few hundred KB included); a call
/// that got no answer at all is tried 4 times (1 + 2 + 4 s apart).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// MLflow's limits per `runs/log-batch` call: 1,000 metrics, 100 params.
const MAX_METRICS_PER_BATCH: usize = 1000;
const MAX_PARAMS_PER_BATCH: usize = 100;
/// MLflow keeps param values up to 6,000 characters.
const MAX_PARAM_CHARS: usize = 6000;

/// Why an MLflow call failed.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("MLflow at {uri}: {what} failed: {source}")]
    Http {
        uri: String,
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("MLflow at {uri}: {what}: the server answered {status}: {body}")]
    Status {
        uri: String,
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("MLflow at {uri}: {what}: unexpected answer: {body}")]
    Shape {
        uri: String,
        what: &'static str,
        body: String,
    },
    #[error("MLflow tracking URI {0:?} is not an http:// or https:// URL")]
    Uri(String),
}

/// A tracking server and the experiment runs go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracking {
    /// `http(s)://host:port` of `mlflow server`.
    pub uri: String,
    /// Experiment name (created when missing).
    pub experiment: String,
}

/// A client of one tracking server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    uri: String,
}

/// One metric point.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    /// Unix milliseconds.
    pub timestamp_ms: i64,
    pub step: i64,
}

/// An MLflow run being written.
#[derive(Debug, Clone)]
pub struct Run {
    pub run_id: String,
    pub experiment_id: String,
    /// `mlflow-artifacts:/<experiment>/<run>/artifacts` (or another store's URI).
    pub artifact_uri: String,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Client {
    pub fn new(uri: &str) -> Result<Self, MlflowError> {
        let uri = uri.trim().trim_end_matches('/').to_owned();
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            return Err(MlflowError::Uri(uri));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|source| MlflowError::Http {
                uri: uri.clone(),
                what: "building the HTTP client",
                source,
            })?;
        Ok(Self { http, uri })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Sends `req`; a call that got no answer (connection refused or closed: a tracking server
    /// restarting its worker) is tried again after 1, 2 and 4 s.
    async fn send(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, String), MlflowError> {
        let http = |source| MlflowError::Http {
            uri: self.uri.clone(),
            what,
            source,
        };
        let mut delay = Duration::from_secs(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            // `Connection: close`: one connection per call. The runtime is not driven while an
            // epoch trains, so a kept-alive connection the server closed meanwhile (uvicorn:
            // after 5 s idle) would only be noticed when reused. A few dozen calls per run.
            let Some(this) = req.try_clone() else {
                let resp = req
                    .header(reqwest::header::CONNECTION, "close")
                    .send()
                    .await
                    .map_err(http)?;
                let status = resp.status().as_u16();
                return Ok((status, resp.text().await.map_err(http)?));
            };
            let sent = this
                .header(reqwest::header::CONNECTION, "close")
                .send()
                .await;
            match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    return Ok((status, resp.text().await.map_err(http)?));
                }
                Err(e) if attempt < 4 && !e.is_timeout() && !e.is_builder() => {
                    eprintln!("MLflow: {what}: {e}; trying again in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(http(e)),
            }
        }
    }

    fn status_error(&self, what: &'static str, status: u16, text: &str) -> MlflowError {
        MlflowError::Status {
            uri: self.uri.clone(),
            what,
            status,
            body: text.chars().take(500).collect(),
        }
    }

    /// `POST /api/2.0/mlflow/<path>` with a JSON body; the JSON answer.
    async fn post(
        &self,
        what: &'static str,
        path: &str,
        body: Value,
    ) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.uri);
        let (status, text) = self.send(what, self.http.post(url).json(&body)).await?;
        if !(200..300).contains(&status) {
            return Err(self.status_error(what, status, &text));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn shape(&self, what: &'static str, v: &Value) -> MlflowError {
        MlflowError::Shape {
            uri: self.uri.clone(),
            what,
            body: v.to_string().chars().take(500).collect(),
        }
    }

    /// The id of experiment `name`, created when missing.
    pub async fn experiment_id(&self, name: &str) -> Result<String, MlflowError> {
        let what = "looking up the experiment";
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/2.0/mlflow/experiments/get-by-name", self.uri),
            &[("experiment_name", name)],
        )
        .map_err(|_| MlflowError::Uri(self.uri.clone()))?;
        let (status, text) = self.send(what, self.http.get(url)).await?;
        if (200..300).contains(&status) {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            return v["experiment"]["experiment_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| self.shape(what, &v));
        }
        if !text.contains("RESOURCE_DOES_NOT_EXIST") {
            return Err(self.status_error(what, status, &text));
        }
        let what = "creating the experiment";
        let v = self
            .post(what, "experiments/create", json!({ "name": name }))
            .await?;
        v["experiment_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.shape(what, &v))
    }

    /// Starts a run (status `RUNNING`).
    pub async fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        tags: &[(&str, String)],
    ) -> Result<Run, MlflowError> {
        let what = "creating the run";
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let v = self
            .post(
                what,
                "runs/create",
                json!({
                    "experiment_id": experiment_id,
                    "run_name": run_name,
                    "start_time": now_ms(),
                    "tags": tags,
                }),
            )
            .await?;
        let info = &v["run"]["info"];
        match (info["run_id"].as_str(), info["artifact_uri"].as_str()) {
            (Some(id), Some(art)) => Ok(Run {
                run_id: id.to_owned(),
                experiment_id: experiment_id.to_owned(),
                artifact_uri: art.to_owned(),
            }),
            _ => Err(self.shape(what, &v)),
        }
    }

    /// Logs params (values cut at MLflow's 6,000 characters), in batches of 100.
    pub async fn log_params(
        &self,
        run: &Run,
        params: &[(String, String)],
    ) -> Result<(), MlflowError> {
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({ "key": k, "value": v.chars().take(MAX_PARAM_CHARS).collect::<String>() }))
                .collect();
            self.post(
                "logging params",
                "runs/log-batch",
                json!({ "run_id": run.run_id, "params": params }),
            )
            .await?;
        }
        Ok(())
    }

    /// Logs metric points, in batches of 1,000.
    pub async fn log_metrics(&self, run: &Run, metrics: &[Metric]) -> Result<(), MlflowError> {
        for chunk in metrics.chunks(MAX_METRICS_PER_BATCH) {
            let metrics: Vec<Value> = chunk
                .iter()
                .map(|m| {
                    json!({ "key": m.key, "value": m.value, "timestamp": m.timestamp_ms, "step": m.step })
                })
                .collect();
            self.post(
                "logging metrics",
                "runs/log-batch",
                json!({ "run_id": run.run_id, "metrics": metrics }),
            )
            .await?;
        }
        Ok(())
    }

    /// Sets a tag of the run.
    pub async fn set_tag(&self, run: &Run, key: &str, value: &str) -> Result<(), MlflowError> {
        self.post(
            "setting a run tag",
            "runs/set-tag",
            json!({ "run_id": run.run_id, "key": key, "value": value }),
        )
        .await?;
        Ok(())
    }

    /// Uploads `bytes` as the run artifact `path` (`model/x.onnx`) through the tracking
    /// server's artifact proxy: `PUT /api/2.0/mlflow-artifacts/artifacts/<exp>/<run>/artifacts/<path>`.
    /// Only runs whose artifact URI is `mlflow-artifacts:` (a server started with
    /// `--serve-artifacts`, MLflow's default) can be written this way.
    pub async fn upload_artifact(
        &self,
        run: &Run,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<(), MlflowError> {
        let what = "uploading an artifact";
        let Some(rest) = run.artifact_uri.strip_prefix("mlflow-artifacts:") else {
            return Err(MlflowError::Shape {
                uri: self.uri.clone(),
                what,
                body: format!(
                    "run artifact URI {} is not served by the tracking server (start it with \
                     --serve-artifacts)",
                    run.artifact_uri
                ),
            });
        };
        // `mlflow-artifacts:/1/abc/artifacts` or `mlflow-artifacts://host/1/abc/artifacts`.
        let rest = rest.trim_start_matches('/');
        let rest = if run.artifact_uri.starts_with("mlflow-artifacts://") {
            rest.split_once('/').map_or("", |(_, p)| p)
        } else {
            rest
        };
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
            self.uri,
            rest.trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        let (status, text) = self
            .send(
                what,
                self.http
                    .put(url)
                    .header("content-type", "application/octet-stream")
                    .body(bytes),
            )
            .await?;
        if !(200..300).contains(&status) {
            return Err(self.status_error(what, status, &text));
        }
        Ok(())
    }

    /// Ends the run: `FINISHED` or `FAILED`.
    pub async fn end_run(&self, run: &Run, status: &str) -> Result<(), MlflowError> {
        self.post(
            "ending the run",
            "runs/update",
            json!({ "run_id": run.run_id, "status": status, "end_time": now_ms() }),
        )
        .await?;
        Ok(())
    }

    /// Creates a version of registered model `name` (the registered model too, when new) from
    /// the run's artifact folder `subpath`; returns the MLflow version number.
    pub async fn create_model_version(
        &self,
        name: &str,
        run: &Run,
        subpath: &str,
        description: &str,
        tags: &[(&str, String)],
    ) -> Result<String, MlflowError> {
        match self
            .post(
                "creating the registered model",
                "registered-models/create",
                json!({ "name": name }),
            )
            .await
        {
            Ok(_) => {}
            Err(MlflowError::Status { body, .. }) if body.contains("RESOURCE_ALREADY_EXISTS") => {}
            Err(e) => return Err(e),
        }
        let what = "creating the model version";
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        let v = self
            .post(
                what,
                "model-versions/create",
                json!({
                    "name": name,
                    "source": format!("{}/{subpath}", run.artifact_uri.trim_end_matches('/')),
                    "run_id": run.run_id,
                    "description": description,
                    "tags": tags,
                }),
            )
            .await?;
        v["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.shape(what, &v))
    }
}

/// The params of a run.
pub fn params(
    card: &crate::pipeline::ModelCard,
    opts: &crate::pipeline::Options,
    config: Option<&std::path::Path>,
    data: &std::path::Path,
    data_sha256: &str,
) -> Vec<(String, String)> {
    let hidden = opts
        .train
        .hidden
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    [
        (
            "config",
            config.map_or_else(|| "(built-in fd001-v1)".into(), |p| p.display().to_string()),
        ),
        ("seed", opts.train.seed.to_string()),
        ("model_name", card.name.clone()),
        ("model_version", card.version.clone()),
        ("feature_set", card.feature_set.clone()),
        ("n_features", card.n_features.to_string()),
        ("data", data.display().to_string()),
        ("data_sha256", data_sha256.to_owned()),
        ("hidden", hidden),
        ("epochs", opts.train.epochs.to_string()),
        ("batch_size", opts.train.batch_size.to_string()),
        ("learning_rate", opts.train.learning_rate.to_string()),
        ("weight_decay", opts.train.weight_decay.to_string()),
        ("ensemble_members", opts.ensemble_members.to_string()),
        ("holdout_engines", opts.holdout_engines.to_string()),
        ("cuts_per_engine", opts.cuts_per_engine.to_string()),
        ("parameters", card.parameters.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The final metrics of a run, from its card.
pub fn final_metrics(card: &crate::pipeline::ModelCard, duration_s: f64, step: i64) -> Vec<Metric> {
    let m = &card.metrics;
    let ts = now_ms();
    [
        ("rmse", m.rmse),
        ("rmse_uncapped", m.rmse_uncapped),
        ("phm08_score", m.nasa_score),
        ("phm08_score_per_point", m.nasa_score_per_point),
        ("eval_points", m.eval_points as f64),
        ("train_windows", m.train_windows as f64),
        ("final_train_loss", m.final_train_loss),
        ("training_seconds", duration_s),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_finite())
    .map(|(k, value)| Metric {
        key: k.to_owned(),
        value,
        timestamp_ms: ts,
        step,
    })
    .collect()
}

/// The per-epoch metric points of one epoch.
pub fn epoch_metrics(e: &crate::pipeline::EpochStats, members: usize) -> Vec<Metric> {
    let suffix = if members > 1 {
        format!(".m{}", e.member)
    } else {
        String::new()
    };
    let ts = now_ms();
    let step = i64::try_from(e.epoch).unwrap_or(i64::MAX);
    [("train_loss", e.train_loss), ("val_rmse", e.val_rmse)]
        .into_iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(k, value)| Metric {
            key: format!("{k}{suffix}"),
            value,
            timestamp_ms: ts,
            step,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_tracking_uris_are_accepted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        assert!(Client::new("http://127.0.0.1:5000/").is_ok());
        assert_eq!(Client::new("https://m/").unwrap().uri(), "https://m");
        assert!(matches!(
            Client::new("file:///tmp/mlruns"),
            Err(MlflowError::Uri(_))
        ));
        assert!(matches!(
            Client::new("127.0.0.1:5000"),
            Err(MlflowError::Uri(_))
        ));
    }

    #[test]
    fn ensemble_members_get_their_own_metric_keys() {
        let e = crate::pipeline::EpochStats {
            member: 2,
            epoch: 7,
            train_loss: 0.5,
            val_rmse: f64::NAN,
        };
        let one = epoch_metrics(&e, 1);
        assert_eq!(one.len(), 1, "a NaN is not logged");
        assert_eq!((one[0].key.as_str(), one[0].step), ("train_loss", 7));
        assert_eq!(epoch_metrics(&e, 3)[0].key, "train_loss.m2");
    }
}
