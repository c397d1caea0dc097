//! Mirror of kip's model registry into an MLflow tracking server (`[mlflow] tracking_uri`).
//!
//! kip's registry is the source of truth; MLflow is a view for data scientists. Each kip model
//! name is an MLflow registered model, each kip version an MLflow model version whose `source`
//! is the kip artifact URI (`kip://HOST/PATH`) and whose tags carry the kip id and version; `champion` and
//! `challenger` are MLflow aliases.
//!
//! Invariants:
//! - Calls are made after kip committed and are bounded by `request_timeout_ms`; a failure is
//!   logged, counted in `kip_mlflow_sync_failures_total` and never fails the kip request.
//! - The MLflow version number of a kip model is remembered in `ai_models.mlflow_version`; a
//!   version that could not be mirrored at registration is created when its alias is set.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;

use kip_api::AiModel;

use crate::{config_error::ConfigError, outbound};

/// `[mlflow]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMlflow {
    /// Base URL of the MLflow tracking server, e.g. `http://mlflow:5000`. Unset: no mirroring.
    #[serde(default)]
    pub tracking_uri: Option<String>,
    /// Base URL under which MLflow users reach kip's API; artifact URLs given to MLflow as the
    /// model version `source` start with it. Defaults to `http://` + `server.listen_addr`.
    #[serde(default)]
    pub kip_public_url: Option<String>,
    /// Time limit of one MLflow call.
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
}

/// Validated `[mlflow]`.
#[derive(Debug, Clone)]
pub struct MlflowConfig {
    pub tracking_uri: String,
    pub kip_public_url: String,
    pub request_timeout: Duration,
}

impl RawMlflow {
    /// Checks the section; `None` when MLflow mirroring is off.
    pub fn validate(self, listen_addr: &str) -> Result<Option<MlflowConfig>, ConfigError> {
        let Some(uri) = self.tracking_uri.filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let http = |s: &str| s.starts_with("http://") || s.starts_with("https://");
        if !http(&uri) {
            return Err(ConfigError::Invalid {
                field: "mlflow.tracking_uri",
                message: format!("must be an http:// or https:// URL, got {uri:?}"),
            });
        }
        let public = self
            .kip_public_url
            .unwrap_or_else(|| format!("http://{listen_addr}"));
        if !http(&public) {
            return Err(ConfigError::Invalid {
                field: "mlflow.kip_public_url",
                message: format!("must be an http:// or https:// URL, got {public:?}"),
            });
        }
        let ms = self.request_timeout_ms.unwrap_or(5_000);
        if !(100..=120_000).contains(&ms) {
            return Err(ConfigError::Invalid {
                field: "mlflow.request_timeout_ms",
                message: format!("must be between 100 and 120000, got {ms}"),
            });
        }
        Ok(Some(MlflowConfig {
            tracking_uri: uri.trim_end_matches('/').to_owned(),
            kip_public_url: public.trim_end_matches('/').to_owned(),
            request_timeout: Duration::from_millis(ms),
        }))
    }
}

/// Why one MLflow call failed (logged, never returned to a kip client).
#[derive(Debug, thiserror::Error)]
enum MlflowError {
    #[error("request to {path} failed: {source}")]
    Http {
        path: &'static str,
        source: reqwest::Error,
    },
    #[error("{path} answered {status}: {body}")]
    Status {
        path: &'static str,
        status: u16,
        body: String,
    },
    #[error("{path}: unexpected answer: {body}")]
    Shape { path: &'static str, body: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// The MLflow mirror; held in `AppState` when configured.
#[derive(Debug)]
pub struct MlflowSync {
    cfg: MlflowConfig,
    client: reqwest::Client,
    pool: PgPool,
    failures: Counter,
}

const ALIASES: [&str; 2] = ["champion", "challenger"];

impl MlflowSync {
    /// Builds the client; `failures` is the registered `kip_mlflow_sync_failures` counter.
    pub fn new(
        cfg: MlflowConfig,
        pool: PgPool,
        failures: Counter,
    ) -> Result<Self, outbound::ClientError> {
        let client = outbound::client_builder()?
            .timeout(cfg.request_timeout)
            .build()?;
        Ok(Self {
            cfg,
            client,
            pool,
            failures,
        })
    }

    fn fail(&self, what: &str, model: &AiModel, e: &MlflowError) {
        self.failures.inc();
        tracing::warn!(
            error = %e, model_id = %model.id, name = %model.name, version = %model.version,
            "MLflow mirror: {what} failed (kip is unaffected)"
        );
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &'static str,
        body: Value,
    ) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.cfg.tracking_uri);
        let resp = self
            .client
            .request(method, &url)
            .json(&body)
            .send()
            .await
            .map_err(|source| MlflowError::Http { path, source })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|source| MlflowError::Http { path, source })?;
        if !(200..300).contains(&status) {
            return Err(MlflowError::Status {
                path,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The kip artifact URI given to MLflow as the version's `source`: `kip://HOST/PATH`.
    /// MLflow refuses `http(s)` sources that point away from its own artifact store (it would
    /// fetch them server-side), so the scheme names kip; the `kip.artifact_url` tag carries
    /// the plain HTTP URL.
    pub fn source_uri(&self, model: &AiModel) -> String {
        let host = self
            .cfg
            .kip_public_url
            .split_once("://")
            .map_or(self.cfg.kip_public_url.as_str(), |(_, h)| h);
        format!(
            "kip://{host}{}",
            super::admin_artifact_path(model.org_id, model.id)
        )
    }

    /// Creates the registered model (if new) and the model version; returns and stores the
    /// MLflow version number.
    async fn ensure_version(&self, model: &AiModel) -> Result<String, MlflowError> {
        let known: Option<String> =
            sqlx::query_scalar("SELECT mlflow_version FROM ai_models WHERE id = $1")
                .bind(model.id)
                .fetch_optional(&self.pool)
                .await?
                .flatten();
        if let Some(v) = known {
            return Ok(v);
        }
        match self
            .call(
                reqwest::Method::POST,
                "registered-models/create",
                json!({ "name": model.name, "description": "mirrored from kip" }),
            )
            .await
        {
            Ok(_) => {}
            Err(MlflowError::Status { body, .. }) if body.contains("RESOURCE_ALREADY_EXISTS") => {}
            Err(e) => return Err(e),
        }
        let mut tags = vec![
            json!({ "key": "kip.model_id", "value": model.id.to_string() }),
            json!({ "key": "kip.org_id", "value": model.org_id.to_string() }),
            json!({ "key": "kip.version", "value": model.version }),
            json!({ "key": "kip.kind", "value": model.kind }),
            json!({ "key": "kip.artifact_url", "value": format!(
                "{}{}",
                self.cfg.kip_public_url,
                super::admin_artifact_path(model.org_id, model.id)
            ) }),
        ];
        if let Some(sha) = &model.artifact_sha256 {
            tags.push(json!({ "key": "kip.artifact_sha256", "value": sha }));
        }
        for (k, v) in model.metrics.iter() {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            tags.push(json!({ "key": format!("kip.metric.{k}"), "value": v }));
        }
        let path = "model-versions/create";
        let answer = self
            .call(
                reqwest::Method::POST,
                path,
                json!({
                    "name": model.name,
                    "source": self.source_uri(model),
                    "description": format!("kip {} {}", model.name, model.version),
                    "tags": tags,
                }),
            )
            .await?;
        let version = answer["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| MlflowError::Shape {
                path,
                body: answer.to_string(),
            })?;
        sqlx::query("UPDATE ai_models SET mlflow_version = $2 WHERE id = $1")
            .bind(model.id)
            .bind(&version)
            .execute(&self.pool)
            .await?;
        Ok(version)
    }

    async fn set_alias(&self, model: &AiModel, alias: &str) -> Result<(), MlflowError> {
        let version = self.ensure_version(model).await?;
        self.call(
            reqwest::Method::POST,
            "registered-models/alias",
            json!({ "name": model.name, "alias": alias, "version": version }),
        )
        .await?;
        Ok(())
    }

    async fn delete_alias(&self, name: &str, alias: &str) -> Result<(), MlflowError> {
        self.call(
            reqwest::Method::DELETE,
            "registered-models/alias",
            json!({ "name": name, "alias": alias }),
        )
        .await?;
        Ok(())
    }

    /// After a kip registration: mirror the version (and its alias, if registered with one).
    pub async fn model_registered(&self, model: &AiModel) {
        if let Err(e) = self.ensure_version(model).await {
            self.fail("mirroring a new model version", model, &e);
            return;
        }
        if ALIASES.contains(&model.stage.as_str())
            && let Err(e) = self.set_alias(model, &model.stage).await
        {
            self.fail("setting an alias", model, &e);
        }
        tracing::info!(model_id = %model.id, name = %model.name, "model version mirrored to MLflow");
    }

    /// After a kip stage change: move or remove the MLflow aliases.
    pub async fn stage_changed(&self, model: &AiModel, previous: &str, demoted: &[AiModel]) {
        // The alias is leaving its previous holders: remove it, then give it to `model`.
        for d in demoted {
            if let Err(e) = self.delete_alias(&d.name, &model.stage).await {
                self.fail("removing an alias from a demoted version", d, &e);
            }
        }
        if previous != model.stage
            && ALIASES.contains(&previous)
            && let Err(e) = self.delete_alias(&model.name, previous).await
        {
            self.fail("removing an alias", model, &e);
        }
        if ALIASES.contains(&model.stage.as_str())
            && let Err(e) = self.set_alias(model, &model.stage).await
        {
            self.fail("setting an alias", model, &e);
        }
    }
}
