//! The model registry and rollout (`/v1/organisations/{org_id}/models/...`,
//! `.../desired-model`, `.../model-status`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A registered model version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AiModel {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub version: String,
    /// [`ModelKind`] as text.
    pub kind: String,
    /// [`ModelStage`] as text.
    pub stage: String,
    pub artifact_sha256: Option<String>,
    pub uri: Option<String>,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// Body of `POST .../models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterModel {
    pub name: String,
    pub version: String,
    pub kind: ModelKind,
    #[serde(default)]
    pub stage: Option<ModelStage>,
    pub artifact_sha256: Option<String>,
    pub uri: Option<String>,
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// What a model predicts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Rul,
    Anomaly,
    Llm,
    Other,
}

impl ModelKind {
    /// The kind as stored and shown (`rul`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rul => "rul",
            Self::Anomaly => "anomaly",
            Self::Llm => "llm",
            Self::Other => "other",
        }
    }
}

/// Lifecycle stage (alias) of a model version.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModelStage {
    None,
    Staging,
    Challenger,
    Champion,
    Archived,
}

impl ModelStage {
    /// The stage as stored and shown (`champion`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Staging => "staging",
            Self::Challenger => "challenger",
            Self::Champion => "champion",
            Self::Archived => "archived",
        }
    }
}

/// Answer of `PUT .../models/{model_id}/artifact`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactInfo {
    pub model_id: Uuid,
    pub sha256: String,
    pub size_bytes: i64,
    pub uploaded_at: DateTime<Utc>,
    /// The control plane's signature over the artifact (`ed25519:<key id>:<signature>`, see
    /// docs/pki.md "Model signing"); agents refuse a model without a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Answer of `GET /v1/model-signing` (platform-admin): the model signing keys and how many
/// artifacts each signs. A rotation may be finished once `signed_by_previous` is 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSigningStatus {
    /// Key id (sha256 of the public key's SubjectPublicKeyInfo DER) of the key that signs now.
    pub key_id: String,
    /// The key before a rotation, still trusted until the rotation is finished.
    pub previous_key_id: Option<String>,
    /// The trusted public keys (PEM), as agents receive them.
    pub trusted_keys_pem: String,
    pub signed_by_current: i64,
    pub signed_by_previous: i64,
    /// Artifacts with no signature or one by a retired key: agents refuse them. Upload the
    /// same bytes again (`kipctl model upload`) to sign one.
    pub unsigned: i64,
}

/// Answer of `GET /v1/mlflow/status`: whether the control plane reaches its MLflow tracking
/// server. While it does not, kip serves desired models from its own tables (rollouts through
/// kip's API keep working) and alias changes made in MLflow are not followed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MlflowStatus {
    /// `[mlflow] tracking_uri` is set.
    pub configured: bool,
    /// The tracking server (user and password removed); `None` when not configured.
    pub tracking_uri: Option<String>,
    /// `reachable`, `unreachable`, `unknown` (no poll yet) or `not_configured`.
    pub state: String,
    /// The last poll reached MLflow; `None` before the first poll.
    pub reachable: Option<bool>,
    /// Since when the current state holds.
    pub since: Option<DateTime<Utc>>,
    /// Last poll that read every mirrored model's `champion` alias.
    pub last_successful_poll_at: Option<DateTime<Utc>>,
    /// The cause of the last failed poll, and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// Polls that failed since the control plane started (`kip_mlflow_sync_errors_total`).
    pub sync_errors_total: u64,
    /// Mirror calls (kip -> MLflow) that failed since start (`kip_mlflow_sync_failures_total`).
    pub mirror_failures_total: u64,
    pub alias_poll_interval_ms: Option<u64>,
}

/// Body of `POST .../models/{model_id}/stage`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetStage {
    pub stage: ModelStage,
}

/// Body of `PUT /v1/organisations/{org_id}/devices/{device_id}/desired-model`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetDesiredModel {
    /// The model version the device should run; `null` stops the rollout for this device.
    pub model_id: Option<Uuid>,
}

/// What a device should run and what it reports running.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceModelStatus {
    pub device_id: Uuid,
    pub device_name: String,
    pub desired_model_id: Option<Uuid>,
    /// `name@version` of the desired model.
    pub desired_model: Option<String>,
    /// `name@version` the agent last reported running.
    pub running_model: Option<String>,
    pub last_error: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The device reports running exactly the desired model.
    pub in_sync: bool,
}

/// Limits a model rollout must stay within; crossing one halts the rollout and rolls its
/// devices back to the baseline (`docs/ml.md`, "Canary, shadow and automatic rollback").
/// Every limit is optional; an absent limit is not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutThresholds {
    /// Largest RMSE (cycles) of the candidate against ground truth (RUL = cycles to the
    /// machine's next failure event, capped at `rul_cap_cycles`).
    #[serde(default)]
    pub max_rmse_cycles: Option<f64>,
    /// Fewest (prediction, truth) pairs before `max_rmse_cycles` is judged.
    #[serde(default = "default_min_truth_samples")]
    pub min_truth_samples: u32,
    /// Most (device, feature) drift windows of the candidate above their threshold (latest
    /// window per device and feature).
    #[serde(default)]
    pub max_drift_alarms: Option<u32>,
    /// Most failed inferences of the candidate over the rollout.
    #[serde(default)]
    pub max_inference_failures: Option<u64>,
    /// Largest p99 inference latency (milliseconds) an agent reported for the candidate.
    #[serde(default)]
    pub max_latency_p99_ms: Option<f64>,
    /// Two predictions of the same cycle agree when they differ by at most this (cycles).
    #[serde(default = "default_agreement_tolerance_cycles")]
    pub agreement_tolerance_cycles: f64,
    /// Ground-truth RUL cap (the models' label cap), cycles.
    #[serde(default = "default_rul_cap_cycles")]
    pub rul_cap_cycles: f64,
}

fn default_min_truth_samples() -> u32 {
    10
}
fn default_agreement_tolerance_cycles() -> f64 {
    10.0
}
fn default_rul_cap_cycles() -> f64 {
    125.0
}

impl Default for RolloutThresholds {
    fn default() -> Self {
        Self {
            max_rmse_cycles: None,
            min_truth_samples: default_min_truth_samples(),
            max_drift_alarms: None,
            max_inference_failures: None,
            max_latency_p99_ms: None,
            agreement_tolerance_cycles: default_agreement_tolerance_cycles(),
            rul_cap_cycles: default_rul_cap_cycles(),
        }
    }
}

/// Body of `POST .../model-rollouts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartModelRollout {
    /// The candidate version (with an uploaded artifact).
    pub model_id: Uuid,
    /// The device group: every device whose labels contain this (non-empty).
    pub selector: serde_json::Map<String, serde_json::Value>,
    /// Share of the group (1..=100) selected by the deterministic bucket of (model, device).
    pub percent: u8,
    /// `canary` (selected devices serve the candidate, the baseline runs as their shadow) or
    /// `shadow` (selected devices keep serving the baseline and run the candidate as shadow).
    pub mode: String,
    /// The version to compare with and to roll back to; default: the version the group's
    /// rollout names, else the newest earlier version of the same name with an artifact.
    #[serde(default)]
    pub baseline_model_id: Option<Uuid>,
    #[serde(default)]
    pub thresholds: RolloutThresholds,
}

/// Body of `POST .../model-rollouts/{id}/percent`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetRolloutPercent {
    pub percent: u8,
}

/// A canary or shadow rollout of a model version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRollout {
    pub id: Uuid,
    pub org_id: Uuid,
    pub model_id: Uuid,
    /// `name@version` of the candidate.
    pub model: String,
    pub baseline_model_id: Uuid,
    /// `name@version` of the baseline.
    pub baseline_model: String,
    pub selector: serde_json::Map<String, serde_json::Value>,
    pub percent: u8,
    pub mode: String,
    /// Who started it: `api` (the API or kipctl) or `mlflow` (the MLflow `challenger` alias,
    /// see `docs/ml.md`, "Rollout and rollback from MLflow").
    #[serde(default = "default_origin")]
    pub origin: String,
    /// `active`, `promoted`, `halted` (by a person, or by the MLflow alias poller when the
    /// alias moved) or `rolled_back` (a threshold crossed).
    pub state: String,
    pub thresholds: RolloutThresholds,
    pub halt_reason: Option<String>,
    pub last_evaluated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Devices the rollout selects (at its percentage), by name.
    #[serde(default)]
    pub devices: Vec<RolloutDevice>,
    /// Oldest first.
    #[serde(default)]
    pub events: Vec<ModelRolloutEvent>,
}

fn default_origin() -> String {
    "api".into()
}

/// A device a rollout selects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutDevice {
    pub device_id: Uuid,
    pub device_name: String,
    /// The deterministic bucket (0..=99); selected while below the percentage.
    pub bucket: i32,
}

/// Something that happened to a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRolloutEvent {
    pub ts: DateTime<Utc>,
    /// `started`, `percent`, `promoted`, `halted` or `auto_halted`.
    pub kind: String,
    /// For `auto_halted`: `error`, `drift`, `inference_failures` or `latency`.
    pub reason: Option<String>,
    pub detail: String,
    pub observed: Option<f64>,
    pub threshold: Option<f64>,
    pub devices: Option<i32>,
}

/// How one version did during a rollout (on the devices the rollout selects, since it
/// started).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionReport {
    /// `name@version`.
    pub model: String,
    pub predictions_champion: i64,
    pub predictions_shadow: i64,
    /// Predictions with ground truth (a failure event of the machine after them).
    pub truth_samples: i64,
    pub rmse_cycles: Option<f64>,
    /// Mean of prediction minus truth (positive: late, the costly side).
    pub mean_error_cycles: Option<f64>,
    pub inference_failures: i64,
    pub latency_p50_us: Option<f64>,
    /// Largest p99 any device reported.
    pub latency_p99_us: Option<f64>,
    /// (device, feature) latest drift windows above threshold.
    pub drift_alarms: i64,
    pub drift_max_psi: Option<f64>,
}

/// Agreement of candidate and baseline on the same cycles (one champion and one shadow
/// prediction of the same device, machine and timestamp).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agreement {
    pub pairs: i64,
    pub mean_abs_diff_cycles: Option<f64>,
    pub within_tolerance_share: Option<f64>,
    pub tolerance_cycles: f64,
}

/// `GET .../model-rollouts/{id}/report`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutReport {
    pub rollout: ModelRollout,
    pub candidate: VersionReport,
    pub baseline: VersionReport,
    pub agreement: Agreement,
    /// Thresholds the candidate crosses now (`reason: detail`).
    pub crossed: Vec<String>,
}
