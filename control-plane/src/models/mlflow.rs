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
//! - A version `kip-train --mlflow` created from its run (same name, tag
//!   `kip.artifact_sha256` = the registered sha256, not claimed by another kip model) is
//!   adopted instead of creating a second one, so the kip version's MLflow version has the
//!   run's artifacts as `source` and the run as `run_id`.
//! - Reachability ([`MlflowSync::status`], `kip_mlflow_up`, `GET /v1/mlflow/status`) is what
//!   the last poll found: each poll starts with one cheap API call.
//!
//! The other direction ([`spawn_alias_poller`]): every `alias_poll_interval_ms` the `champion`
//! alias of each mirrored model name is read from MLflow. When it names a version kip knows
//! (`ai_models.mlflow_version`, and the version's `kip.model_id` tag when present), that kip
//! model becomes the `champion` and every `desired_models` row (device or label group) of the
//! organisation that wants another version of the same name is switched to it, with an
//! `audit_log` row (`action = models.mlflow_rollout`, target = the reason). Moving the alias
//! back to an earlier version therefore rolls the fleet back. MLflow is the record for the
//! champion: a kip-side promotion whose mirroring failed is undone by the next poll.
//! - A poll that cannot reach MLflow changes nothing in kip (devices keep their desired model),
//!   is logged and counted in `kip_mlflow_sync_errors_total`;
//!   `kip_mlflow_last_successful_poll_timestamp_seconds` says when MLflow was last read.
//! - A version without an uploaded artifact is never rolled out (an agent could not fetch it).
//!
//! The `challenger` alias selects the shadow: when it names a kip version, every device group
//! (`desired_models` selector) of that organisation whose model is another version of the
//! name runs it as a shadow beside its champion, through a `shadow` rollout of
//! `origin = 'mlflow'` (`rollouts::follow_challenger`; share and thresholds from the version's
//! `kip.rollout.*` tags), so both predictions sync and the rollout's comparison report and
//! automatic halt cover it. Moving the alias ends that rollout and starts one of the new
//! version; removing it ends the rollout (the devices stop running the shadow at their next
//! sync); kip's `challenger` stage follows the alias. Audited as `models.mlflow_challenger`.
//! - Both aliases of a name are read before anything changes, so an unreachable MLflow
//!   changes neither the champion nor the shadows.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

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
    /// How often the `champion` alias of every mirrored model is read back from MLflow
    /// (default 30000).
    #[serde(default)]
    pub alias_poll_interval_ms: Option<u64>,
}

/// Validated `[mlflow]`.
#[derive(Debug, Clone)]
pub struct MlflowConfig {
    pub tracking_uri: String,
    pub kip_public_url: String,
    pub request_timeout: Duration,
    /// Period of the alias poller ([`spawn_alias_poller`]).
    pub alias_poll_interval: Duration,
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
        let poll_ms = self.alias_poll_interval_ms.unwrap_or(30_000);
        if !(200..=3_600_000).contains(&poll_ms) {
            return Err(ConfigError::Invalid {
                field: "mlflow.alias_poll_interval_ms",
                message: format!("must be between 200 and 3600000, got {poll_ms}"),
            });
        }
        Ok(Some(MlflowConfig {
            tracking_uri: uri.trim_end_matches('/').to_owned(),
            kip_public_url: public.trim_end_matches('/').to_owned(),
            request_timeout: Duration::from_millis(ms),
            alias_poll_interval: Duration::from_millis(poll_ms),
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

/// Metrics of the alias poller.
#[derive(Debug, Clone, Default)]
pub struct PollMetrics {
    /// `kip_mlflow_sync_errors_total`: alias polls (or applying their result) that failed.
    pub errors: Counter,
    /// `kip_mlflow_last_successful_poll_timestamp_seconds` (0: never).
    pub last_success: Gauge,
    /// `kip_mlflow_up`: 1 while the last poll reached MLflow, 0 after one that did not.
    pub up: Gauge,
}

impl PollMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "mlflow_sync_errors",
            "MLflow alias polls that could not read MLflow or apply what it said",
            m.errors.clone(),
        );
        registry.register(
            "mlflow_last_successful_poll_timestamp_seconds",
            "Unix time of the last alias poll that read every mirrored model from MLflow",
            m.last_success.clone(),
        );
        registry.register(
            "mlflow_up",
            "1 while the last alias poll reached MLflow, 0 after one that did not (absent without [mlflow])",
            m.up.clone(),
        );
        m
    }
}

/// The MLflow mirror; held in `AppState` when configured.
#[derive(Debug)]
pub struct MlflowSync {
    cfg: MlflowConfig,
    client: reqwest::Client,
    pool: PgPool,
    failures: Counter,
    poll: PollMetrics,
    /// What the poller last found, for `GET /v1/mlflow/status`.
    reach: std::sync::Mutex<Reach>,
}

/// Reachability of MLflow as the poller last found it.
#[derive(Debug, Clone, Default)]
struct Reach {
    /// `None` before the first poll.
    up: Option<bool>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    last_success: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    last_error_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// `uri` without `user:password@`, for the status answer and logs.
fn without_credentials(uri: &str) -> String {
    match reqwest::Url::parse(uri) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_owned()
        }
        Err(_) => uri.to_owned(),
    }
}

/// `GET /v1/mlflow/status` of a control plane without `[mlflow]`.
pub fn status_not_configured() -> kip_api::MlflowStatus {
    kip_api::MlflowStatus {
        configured: false,
        tracking_uri: None,
        state: "not_configured".into(),
        reachable: None,
        since: None,
        last_successful_poll_at: None,
        last_error: None,
        last_error_at: None,
        sync_errors_total: 0,
        mirror_failures_total: 0,
        alias_poll_interval_ms: None,
    }
}

/// The alias that drives rollouts.
const ROLLOUT_ALIAS: &str = "champion";
/// The alias whose version runs as a shadow beside the champion.
const SHADOW_ALIAS: &str = "challenger";

/// Both aliases, champion first (the poller reads them in this order).
const ALIASES: [&str; 2] = [ROLLOUT_ALIAS, SHADOW_ALIAS];

impl MlflowSync {
    /// Builds the client; `failures` is the registered `kip_mlflow_sync_failures` counter,
    /// `poll` the alias poller's metrics.
    pub fn new(
        cfg: MlflowConfig,
        pool: PgPool,
        failures: Counter,
        poll: PollMetrics,
    ) -> Result<Self, outbound::ClientError> {
        let client = outbound::client_builder()?
            .timeout(cfg.request_timeout)
            .build()?;
        Ok(Self {
            cfg,
            client,
            pool,
            failures,
            poll,
            reach: std::sync::Mutex::new(Reach::default()),
        })
    }

    /// What `GET /v1/mlflow/status` answers.
    pub fn status(&self) -> kip_api::MlflowStatus {
        let r = self
            .reach
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        kip_api::MlflowStatus {
            configured: true,
            tracking_uri: Some(without_credentials(&self.cfg.tracking_uri)),
            state: match r.up {
                None => "unknown",
                Some(true) => "reachable",
                Some(false) => "unreachable",
            }
            .into(),
            reachable: r.up,
            since: r.since,
            last_successful_poll_at: r.last_success,
            last_error: r.last_error,
            last_error_at: r.last_error_at,
            sync_errors_total: self.poll.errors.get(),
            mirror_failures_total: self.failures.get(),
            alias_poll_interval_ms: u64::try_from(self.cfg.alias_poll_interval.as_millis()).ok(),
        }
    }

    /// A poll reached MLflow and read every alias.
    fn mark_up(&self) {
        let now = chrono::Utc::now();
        self.poll.up.set(1);
        self.poll.last_success.set(now.timestamp());
        let mut r = self
            .reach
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.up != Some(true) {
            if r.up == Some(false) {
                tracing::info!(
                    tracking_uri = %without_credentials(&self.cfg.tracking_uri),
                    "MLflow is reachable again; following the {ROLLOUT_ALIAS} aliases"
                );
            }
            r.up = Some(true);
            r.since = Some(now);
        }
        r.last_success = Some(now);
    }

    /// A poll could not reach MLflow (or MLflow answered with an error): counted, logged with
    /// its cause, and shown in the status and `kip_mlflow_up`.
    fn mark_down(&self, e: &MlflowError) {
        let now = chrono::Utc::now();
        self.poll.errors.inc();
        self.poll.up.set(0);
        let mut r = self
            .reach
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if r.up != Some(false) {
            r.up = Some(false);
            r.since = Some(now);
        }
        r.last_error = Some(e.to_string());
        r.last_error_at = Some(now);
        tracing::warn!(
            error = %e, tracking_uri = %without_credentials(&self.cfg.tracking_uri),
            "MLflow unreachable: kip keeps serving the desired models from its own tables; \
             alias changes in MLflow are followed once it answers again"
        );
    }

    /// One cheap API call that shows MLflow's REST API answers (not only its web server).
    async fn probe(&self) -> Result<(), MlflowError> {
        let path = "registered-models/search";
        let (status, text) = self.get(path, &[("max_results", "1")]).await?;
        if !(200..300).contains(&status) {
            return Err(MlflowError::Status {
                path,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        Ok(())
    }

    /// GET `path` of MLflow's REST API with query `params`: the status and the body, whatever
    /// the status (each caller decides which statuses mean "absent").
    async fn get(
        &self,
        path: &'static str,
        params: &[(&str, &str)],
    ) -> Result<(u16, String), MlflowError> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/2.0/mlflow/{path}", self.cfg.tracking_uri),
            params,
        )
        .map_err(|e| MlflowError::Shape {
            path,
            body: e.to_string(),
        })?;
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|source| MlflowError::Http { path, source })?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|source| MlflowError::Http { path, source })?;
        Ok((status, text))
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
        if let Some(v) = self.adopt_run_version(model).await? {
            sqlx::query("UPDATE ai_models SET mlflow_version = $2 WHERE id = $1")
                .bind(model.id)
                .bind(&v)
                .execute(&self.pool)
                .await?;
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

    /// The MLflow version `kip-train --mlflow` created from its run for these bytes (same
    /// registered model name, tag `kip.artifact_sha256`, not yet claimed by another kip model
    /// through `kip.model_id`), now tagged with this model's kip ids; `None` when there is none.
    /// The newest such version wins (a re-run of the same seed gives the same bytes).
    async fn adopt_run_version(&self, model: &AiModel) -> Result<Option<String>, MlflowError> {
        let Some(sha) = model.artifact_sha256.as_deref() else {
            return Ok(None);
        };
        // Names are [a-z0-9-_.] and the sha256 hex (both checked at registration): no quoting.
        if !sha.bytes().all(|b| b.is_ascii_hexdigit())
            || model.name.contains(['\'', '"', '`', '\\'])
        {
            return Ok(None);
        }
        let path = "model-versions/search";
        let filter = format!(
            "name = '{}' and tags.`kip.artifact_sha256` = '{sha}'",
            model.name
        );
        let (status, text) = self
            .get(path, &[("filter", filter.as_str()), ("max_results", "100")])
            .await?;
        if !(200..300).contains(&status) {
            return Err(MlflowError::Status {
                path,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let mine = model.id.to_string();
        let best = answer["model_versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|mv| tag(mv, "kip.model_id").is_none_or(|id| id == mine))
            .filter_map(|mv| mv["version"].as_str()?.parse::<u64>().ok())
            .max();
        let Some(version) = best.map(|v| v.to_string()) else {
            return Ok(None);
        };
        for (key, value) in [
            ("kip.model_id", mine.clone()),
            ("kip.org_id", model.org_id.to_string()),
            (
                "kip.artifact_url",
                format!(
                    "{}{}",
                    self.cfg.kip_public_url,
                    super::admin_artifact_path(model.org_id, model.id)
                ),
            ),
        ] {
            self.call(
                reqwest::Method::POST,
                "model-versions/set-tag",
                json!({ "name": model.name, "version": version, "key": key, "value": value }),
            )
            .await?;
        }
        tracing::info!(
            model_id = %model.id, name = %model.name, mlflow_version = %version,
            "adopted the MLflow model version created by the training run"
        );
        Ok(Some(version))
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

/// A kip model version that an MLflow alias points at.
#[derive(sqlx::FromRow)]
struct AliasTarget {
    id: Uuid,
    org_id: Uuid,
    name: String,
    version: String,
    stage: String,
    has_artifact: bool,
}

impl MlflowSync {
    /// The MLflow model version (`version` number, its `kip.model_id` tag, the whole version
    /// object) the alias `alias` of `name` points at; `None` when the alias (or the registered
    /// model) does not exist.
    async fn alias(&self, name: &str, alias: &str) -> Result<Option<AliasVersion>, MlflowError> {
        let path = "registered-models/alias";
        let (status, text) = self.get(path, &[("name", name), ("alias", alias)]).await?;
        // MLflow answers a missing alias with 400 RESOURCE_DOES_NOT_EXIST / INVALID_PARAMETER
        // (not 404), a missing registered model with 404.
        if matches!(status, 400 | 404) {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(MlflowError::Status {
                path,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let mv = answer["model_version"].clone();
        let Some(version) = mv["version"].as_str().map(str::to_owned) else {
            return Err(MlflowError::Shape {
                path,
                body: text.chars().take(500).collect(),
            });
        };
        let kip_id = tag(&mv, "kip.model_id").and_then(|v| v.parse().ok());
        Ok(Some(AliasVersion {
            version,
            kip_id,
            mv,
        }))
    }

    /// The kip versions of `name` that MLflow version `a` is (one per organisation at most;
    /// exactly the tagged one when the version carries `kip.model_id`).
    async fn alias_targets(
        &self,
        name: &str,
        a: &AliasVersion,
    ) -> Result<Vec<AliasTarget>, sqlx::Error> {
        sqlx::query_as(
            "SELECT m.id, m.org_id, m.name, m.version, m.stage, \
                    EXISTS (SELECT 1 FROM model_artifacts a WHERE a.model_id = m.id) AS has_artifact \
             FROM ai_models m \
             WHERE m.name = $1 AND m.mlflow_version = $2 AND ($3::uuid IS NULL OR m.id = $3)",
        )
        .bind(name)
        .bind(&a.version)
        .bind(a.kip_id)
        .fetch_all(&self.pool)
        .await
    }

    /// Makes `target` the champion of its name and the desired model of every device or label
    /// group of its organisation that wants another version of that name; audited. Returns
    /// whether anything changed.
    async fn roll_out(
        &self,
        target: &AliasTarget,
        mlflow_version: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Same lock as a kip-side stage change: promotions of one name serialize.
        sqlx::query(
            "SELECT id FROM ai_models WHERE org_id = $1 AND name = $2 ORDER BY id FOR UPDATE",
        )
        .bind(target.org_id)
        .bind(&target.name)
        .execute(&mut *tx)
        .await?;
        let mut changed = false;
        if target.stage != ROLLOUT_ALIAS {
            sqlx::query(
                "UPDATE ai_models SET stage = 'none' \
                 WHERE org_id = $1 AND name = $2 AND stage = 'champion' AND id <> $3",
            )
            .bind(target.org_id)
            .bind(&target.name)
            .bind(target.id)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE ai_models SET stage = 'champion' WHERE org_id = $1 AND id = $2")
                .bind(target.org_id)
                .bind(target.id)
                .execute(&mut *tx)
                .await?;
            changed = true;
        }
        let switched = sqlx::query(
            "UPDATE desired_models SET model_id = $3, updated_at = now() \
             WHERE org_id = $1 AND model_id <> $3 AND model_id IN \
               (SELECT id FROM ai_models WHERE org_id = $1 AND name = $2)",
        )
        .bind(target.org_id)
        .bind(&target.name)
        .bind(target.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        changed |= switched > 0;
        if changed {
            let reason = format!(
                "mlflow alias {ROLLOUT_ALIAS} -> v{mlflow_version} ({} {}; {switched} rollout targets switched)",
                target.name, target.version
            );
            // No API key made this change: the nil key id and the `system` role mark it.
            sqlx::query(
                "INSERT INTO audit_log \
                 (org_id, key_id, key_name, role, action, method, target, status, outcome) \
                 VALUES ($1, $2, 'mlflow-alias-poller', 'system', 'models.mlflow_rollout', \
                         'POLL', $3, 200, 'ok')",
            )
            .bind(target.org_id)
            .bind(Uuid::nil())
            .bind(&reason)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                org_id = %target.org_id, model_id = %target.id, name = %target.name,
                version = %target.version, switched, "{reason}"
            );
        }
        Ok(changed)
    }

    /// One poll: follows the `champion` and `challenger` aliases of every mirrored model name.
    pub async fn poll_aliases(&self) {
        if let Err(e) = self.probe().await {
            self.mark_down(&e);
            return;
        }
        let names: Vec<String> = match sqlx::query_scalar(
            "SELECT DISTINCT name FROM ai_models WHERE mlflow_version IS NOT NULL ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(n) => n,
            Err(e) => {
                self.poll.errors.inc();
                tracing::warn!(error = %e, "MLflow alias poll: cannot list mirrored models");
                return;
            }
        };
        for name in &names {
            // Both aliases are read before anything changes: one unreachable server fails
            // every name alike, and kip then changes nothing until the next tick.
            let mut read = Vec::with_capacity(ALIASES.len());
            for alias in ALIASES {
                match self.alias(name, alias).await {
                    Ok(a) => read.push(a),
                    Err(e) => {
                        tracing::debug!(model = %name, "cannot read alias {alias}");
                        self.mark_down(&e);
                        return;
                    }
                }
            }
            let challenger = read.pop().flatten();
            let champion = read.pop().flatten();
            if let Some(champion) = champion
                && !self.follow_champion(name, &champion).await
            {
                return;
            }
            if !self.follow_challenger(name, challenger.as_ref()).await {
                return;
            }
        }
        self.mark_up();
    }

    /// Rolls the fleet to the version the `champion` alias names; false when kip's side
    /// failed (counted and logged: the poll stops there).
    async fn follow_champion(&self, name: &str, alias: &AliasVersion) -> bool {
        let version = &alias.version;
        let targets = match self.alias_targets(name, alias).await {
            Ok(t) => t,
            Err(e) => {
                self.poll.errors.inc();
                tracing::warn!(error = %e, model = %name, "MLflow alias poll: lookup failed");
                return false;
            }
        };
        if targets.is_empty() {
            tracing::debug!(model = %name, %version, "alias {ROLLOUT_ALIAS} names a version kip does not know");
        }
        for t in &targets {
            if !t.has_artifact {
                tracing::warn!(
                    model_id = %t.id, name = %t.name, version = %t.version,
                    "alias {ROLLOUT_ALIAS} names a version without an uploaded artifact; not rolled out"
                );
                continue;
            }
            if let Err(e) = self.roll_out(t, version).await {
                self.poll.errors.inc();
                tracing::warn!(error = %e, model_id = %t.id, "MLflow alias poll: rollout failed");
                return false;
            }
        }
        true
    }

    /// Makes every organisation's MLflow shadow rollouts of `name` match the `challenger`
    /// alias (`None`: absent) through [`super::rollouts::follow_challenger`], and kip's
    /// `challenger` stage with it; audited. False when kip's side failed (counted, logged).
    async fn follow_challenger(&self, name: &str, alias: Option<&AliasVersion>) -> bool {
        let orgs: Vec<Uuid> = match sqlx::query_scalar(
            "SELECT DISTINCT org_id FROM ai_models \
             WHERE name = $1 AND mlflow_version IS NOT NULL ORDER BY org_id",
        )
        .bind(name)
        .fetch_all(&self.pool)
        .await
        {
            Ok(o) => o,
            Err(e) => {
                self.poll.errors.inc();
                tracing::warn!(error = %e, model = %name, "MLflow alias poll: cannot list organisations");
                return false;
            }
        };
        let targets = match alias {
            Some(a) => match self.alias_targets(name, a).await {
                Ok(t) => t,
                Err(e) => {
                    self.poll.errors.inc();
                    tracing::warn!(error = %e, model = %name, "MLflow alias poll: lookup failed");
                    return false;
                }
            },
            None => Vec::new(),
        };
        for org_id in orgs {
            let challenger = match (alias, targets.iter().find(|t| t.org_id == org_id)) {
                (Some(a), Some(t)) => {
                    if !t.has_artifact {
                        tracing::warn!(
                            model_id = %t.id, name = %t.name, version = %t.version,
                            "alias {SHADOW_ALIAS} names a version without an uploaded artifact; no shadow"
                        );
                        continue;
                    }
                    match rollout_settings(&a.mv) {
                        Ok((percent, thresholds)) => Some((
                            t,
                            super::rollouts::Challenger {
                                model_id: t.id,
                                model: format!("{}@{}", t.name, t.version),
                                mlflow_version: a.version.clone(),
                                percent,
                                thresholds,
                            },
                        )),
                        Err(why) => {
                            // Nothing changes: a typo in a tag must not end a running shadow.
                            tracing::warn!(
                                model_id = %t.id, name = %t.name, version = %t.version,
                                "alias {SHADOW_ALIAS}: {why}; no change until the tags are fixed"
                            );
                            continue;
                        }
                    }
                }
                _ => None,
            };
            if let Err(e) = self
                .apply_challenger(org_id, name, challenger, alias.is_none())
                .await
            {
                self.poll.errors.inc();
                tracing::warn!(error = %e, %org_id, model = %name, "MLflow alias poll: challenger rollout failed");
                return false;
            }
        }
        true
    }

    /// One organisation's side of [`MlflowSync::follow_challenger`], in one transaction.
    async fn apply_challenger(
        &self,
        org_id: Uuid,
        name: &str,
        challenger: Option<(&AliasTarget, super::rollouts::Challenger)>,
        alias_removed: bool,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Same lock as a kip-side stage change and the champion's rollout.
        sqlx::query(
            "SELECT id FROM ai_models WHERE org_id = $1 AND name = $2 ORDER BY id FOR UPDATE",
        )
        .bind(org_id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let mut changes = Vec::new();
        match &challenger {
            // kip's stage follows the alias; a version that is kip's champion keeps that stage.
            Some((t, c)) if t.stage != SHADOW_ALIAS && t.stage != ROLLOUT_ALIAS => {
                sqlx::query(
                    "UPDATE ai_models SET stage = 'none' \
                     WHERE org_id = $1 AND name = $2 AND stage = 'challenger' AND id <> $3",
                )
                .bind(org_id)
                .bind(name)
                .bind(t.id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE ai_models SET stage = 'challenger' WHERE org_id = $1 AND id = $2",
                )
                .bind(org_id)
                .bind(t.id)
                .execute(&mut *tx)
                .await?;
                changes.push(format!(
                    "mlflow alias {SHADOW_ALIAS} -> v{} ({}): stage challenger",
                    c.mlflow_version, c.model
                ));
            }
            None if alias_removed => {
                let demoted = sqlx::query(
                    "UPDATE ai_models SET stage = 'none' \
                     WHERE org_id = $1 AND name = $2 AND stage = 'challenger' \
                       AND mlflow_version IS NOT NULL",
                )
                .bind(org_id)
                .bind(name)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if demoted > 0 {
                    changes.push(format!(
                        "mlflow alias {SHADOW_ALIAS} of {name} removed: stage none"
                    ));
                }
            }
            _ => {}
        }
        changes.extend(
            super::rollouts::follow_challenger(
                &mut tx,
                org_id,
                name,
                challenger.as_ref().map(|(_, c)| c),
            )
            .await?,
        );
        if changes.is_empty() {
            return Ok(());
        }
        for change in &changes {
            // No API key made this change: the nil key id and the `system` role mark it.
            sqlx::query(
                "INSERT INTO audit_log \
                 (org_id, key_id, key_name, role, action, method, target, status, outcome) \
                 VALUES ($1, $2, 'mlflow-alias-poller', 'system', 'models.mlflow_challenger', \
                         'POLL', $3, 200, 'ok')",
            )
            .bind(org_id)
            .bind(Uuid::nil())
            .bind(change)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        for change in &changes {
            tracing::info!(%org_id, model = %name, "{change}");
        }
        Ok(())
    }
}

/// What an MLflow alias points at.
struct AliasVersion {
    /// The MLflow version number.
    version: String,
    /// Its `kip.model_id` tag, when it has one.
    kip_id: Option<Uuid>,
    /// The model version object (tags included).
    mv: Value,
}

/// Share and thresholds of the shadow rollout the `challenger` alias starts, from the model
/// version's tags `kip.rollout.percent` (1..=100, default 100) and `kip.rollout.<threshold>`
/// (the fields of the API's `thresholds`, e.g. `kip.rollout.max_latency_p99_ms = 5`), checked
/// like the API checks them; an unknown `kip.rollout.*` tag is an error naming it.
fn rollout_settings(mv: &Value) -> Result<(u8, kip_api::RolloutThresholds), String> {
    let mut percent = 100;
    let mut fields = serde_json::Map::new();
    for t in mv["tags"].as_array().into_iter().flatten() {
        let (Some(key), Some(value)) = (t["key"].as_str(), t["value"].as_str()) else {
            continue;
        };
        let Some(field) = key.strip_prefix("kip.rollout.") else {
            continue;
        };
        let value = value.trim();
        if field == "percent" {
            percent = value
                .parse::<u8>()
                .ok()
                .filter(|p| (1..=100).contains(p))
                .ok_or_else(|| format!("tag {key} = {value:?} must be 1 to 100"))?;
            continue;
        }
        let number = if let Ok(n) = value.parse::<u64>() {
            json!(n)
        } else if let Some(x) = value.parse::<f64>().ok().filter(|x| x.is_finite()) {
            json!(x)
        } else {
            return Err(format!("tag {key} = {value:?} is not a number"));
        };
        fields.insert(field.to_owned(), number);
    }
    let thresholds: kip_api::RolloutThresholds = serde_json::from_value(Value::Object(fields))
        .map_err(|e| format!("tags kip.rollout.*: {e}"))?;
    super::rollouts::check_thresholds(&thresholds)
        .map_err(|e| format!("tags kip.rollout.*: {e}"))?;
    Ok((percent, thresholds))
}

/// Follows the MLflow `champion` aliases every `alias_poll_interval` on `tracker` until
/// `token` is cancelled (the first poll runs at start).
pub fn spawn_alias_poller(sync: Arc<MlflowSync>, token: CancellationToken, tracker: &TaskTracker) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(sync.cfg.alias_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A poll stuck on a slow MLflow must not hold up shutdown.
            tokio::select! {
                () = token.cancelled() => return,
                () = sync.poll_aliases() => {}
            }
        }
    });
}

/// The value of tag `key` of an MLflow model version (its `tags` list of key/value objects).
fn tag<'a>(mv: &'a Value, key: &str) -> Option<&'a str> {
    mv["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .and_then(|t| t["value"].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(poll: Option<u64>) -> RawMlflow {
        RawMlflow {
            tracking_uri: Some("http://mlflow:5000".into()),
            alias_poll_interval_ms: poll,
            ..RawMlflow::default()
        }
    }

    fn version_with(tags: &[(&str, &str)]) -> Value {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        json!({ "name": "rul-fd001", "version": "2", "tags": tags })
    }

    #[test]
    fn the_challengers_rollout_settings_come_from_its_tags_and_bad_ones_are_named() {
        // No kip.rollout.* tag: 100 %, the API's defaults; other tags are not ours.
        let (percent, t) = rollout_settings(&version_with(&[("kip.model_id", "x")])).unwrap();
        assert_eq!(percent, 100);
        assert_eq!(t, kip_api::RolloutThresholds::default());
        let (percent, t) = rollout_settings(&version_with(&[
            ("kip.rollout.percent", "20"),
            ("kip.rollout.max_rmse_cycles", "25.5"),
            ("kip.rollout.min_truth_samples", "50"),
            ("kip.rollout.max_drift_alarms", "0"),
            ("kip.rollout.max_inference_failures", " 10 "),
            ("kip.rollout.max_latency_p99_ms", "5"),
        ]))
        .unwrap();
        assert_eq!(percent, 20);
        assert_eq!(t.max_rmse_cycles, Some(25.5));
        assert_eq!(t.min_truth_samples, 50);
        assert_eq!(t.max_drift_alarms, Some(0));
        assert_eq!(t.max_inference_failures, Some(10));
        assert_eq!(t.max_latency_p99_ms, Some(5.0));
        for (key, value, named) in [
            ("kip.rollout.percent", "0", "kip.rollout.percent"),
            ("kip.rollout.percent", "101", "kip.rollout.percent"),
            (
                "kip.rollout.max_rmse_cycles",
                "much",
                "kip.rollout.max_rmse_cycles",
            ),
            ("kip.rollout.max_rmse_cycles", "-1", "max_rmse_cycles"),
            (
                "kip.rollout.max_rmse_cycles",
                "inf",
                "kip.rollout.max_rmse_cycles",
            ),
            ("kip.rollout.max_drift_alarms", "1.5", "kip.rollout"),
            ("kip.rollout.max_rmse", "3", "max_rmse"),
        ] {
            let e = rollout_settings(&version_with(&[(key, value)])).unwrap_err();
            assert!(e.contains(named), "{key}={value}: {e}");
        }
    }

    #[test]
    fn the_alias_poll_interval_is_validated() {
        let ok = raw(None).validate("127.0.0.1:8080").unwrap().unwrap();
        assert_eq!(ok.alias_poll_interval, Duration::from_secs(30));
        for bad in [0, 199, 3_600_001] {
            let e = raw(Some(bad)).validate("127.0.0.1:8080").unwrap_err();
            assert!(
                e.to_string().contains("mlflow.alias_poll_interval_ms"),
                "{e}"
            );
        }
    }
}
