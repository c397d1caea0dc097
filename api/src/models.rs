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
