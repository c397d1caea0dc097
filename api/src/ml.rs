//! Machine-learning data of an organisation: feature-set documents
//! (`/v1/organisations/{org_id}/feature-sets`), maintenance events
//! (`.../maintenance-events`), what a model was trained on and how well it performs
//! (`.../models/{model_id}/training-data`, `.../performance`), and the predictions the agents
//! synced (`.../predictions`, `.../predictions/latest`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A stored feature-set document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureSetInfo {
    /// The document's versioned id (`cmapss-w30-v1`).
    pub id: String,
    /// sha256 of the document's canonical JSON.
    pub sha256: String,
    pub document: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// What happened to a machine.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceKind {
    Failure,
    Repair,
    Replacement,
}

impl MaintenanceKind {
    /// The kind as stored and shown (`failure`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failure => "failure",
            Self::Repair => "repair",
            Self::Replacement => "replacement",
        }
    }
}

/// Body of `POST .../maintenance-events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordMaintenanceEvent {
    pub device_id: Uuid,
    /// The machine behind the device, as in its readings.
    pub machine: String,
    pub kind: MaintenanceKind,
    /// When it happened (RFC 3339).
    pub ts: DateTime<Utc>,
    #[serde(default)]
    pub note: String,
}

/// A recorded maintenance event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceEvent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub device_id: Uuid,
    pub machine: String,
    /// [`MaintenanceKind`] as text.
    pub kind: String,
    pub ts: DateTime<Utc>,
    pub note: String,
    pub created_at: DateTime<Utc>,
}

/// A page of maintenance events, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaintenanceEventPage {
    pub events: Vec<MaintenanceEvent>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Body of `PUT .../models/{model_id}/training-data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordTrainingData {
    pub feature_set_id: Option<String>,
    /// Where the examples came from, e.g. `{"kind": "file", "sha256": "..."}` or
    /// `{"kind": "sensor_data", "devices": [...], "from": ..., "to": ...}`.
    pub source: serde_json::Map<String, serde_json::Value>,
    /// How examples were split, e.g. `{"holdout_units": [..]}`.
    pub split: serde_json::Map<String, serde_json::Value>,
    pub seed: i64,
    pub examples: i64,
}

/// What a model version was trained on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingData {
    pub model_id: Uuid,
    pub feature_set_id: Option<String>,
    pub source: serde_json::Map<String, serde_json::Value>,
    pub split: serde_json::Map<String, serde_json::Value>,
    pub seed: i64,
    pub examples: i64,
    pub created_at: DateTime<Utc>,
}

/// Where a performance figure was measured.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PerformanceSource {
    /// Held-out data at training time.
    Training,
    /// Predictions of deployed agents against ground truth that arrived later.
    Agent,
}

impl PerformanceSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Agent => "agent",
        }
    }
}

/// Body of `POST .../models/{model_id}/performance`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordPerformance {
    pub evaluation_set: String,
    pub source: PerformanceSource,
    pub rmse: Option<f64>,
    pub phm08_score: Option<f64>,
    pub examples: i64,
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

/// Quality of a model version on one evaluation set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelPerformance {
    pub model_id: Uuid,
    pub evaluation_set: String,
    /// [`PerformanceSource`] as text.
    pub source: String,
    pub rmse: Option<f64>,
    pub phm08_score: Option<f64>,
    pub examples: i64,
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub measured_at: DateTime<Utc>,
}

/// One prediction an agent synced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PredictionRecord {
    pub device_id: Uuid,
    pub machine: String,
    pub model_version: String,
    pub ts: DateTime<Utc>,
    pub rul_cycles: f64,
    pub anomaly_score: Option<f64>,
    /// `champion` ("the" prediction) or `shadow` (a model run beside it, for comparison).
    #[serde(default = "champion")]
    pub role: String,
    /// Registry name of the model, when the agent sent it (shadow predictions).
    #[serde(default)]
    pub model: Option<String>,
}

fn champion() -> String {
    "champion".to_owned()
}

/// A page of predictions, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionPage {
    pub predictions: Vec<PredictionRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Drift of one feature of a deployed model over one window, as an agent measured it
/// (`GET .../model-monitoring`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelMonitoringRecord {
    pub device_id: Uuid,
    pub model: String,
    pub model_version: String,
    /// An input of the model's feature set, or `output`.
    pub feature: String,
    pub ts: DateTime<Utc>,
    pub psi: f64,
    pub ks: f64,
    pub psi_threshold: f64,
    pub ks_threshold: f64,
    /// Either statistic above its threshold.
    pub alarm: bool,
    /// Values in the window.
    pub window: i32,
    /// Distinct machines in the window (the sample size the thresholds assume).
    pub effective_window: i32,
}

/// A page of drift records, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMonitoringPage {
    pub records: Vec<ModelMonitoringRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}
