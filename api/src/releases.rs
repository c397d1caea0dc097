//! Agent releases and their rollouts (agent self-update).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An uploaded agent release (`GET /v1/organisations/{org_id}/releases`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRelease {
    pub id: Uuid,
    pub org_id: Uuid,
    pub version: String,
    pub sha256: String,
    pub size_bytes: i64,
    /// `ed25519:<key id>:<signature>` by the control plane's signing key.
    pub signature: Option<String>,
    pub uploaded_at: DateTime<Utc>,
}

/// `POST /v1/organisations/{org_id}/release-rollouts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartReleaseRollout {
    /// The release version (as uploaded).
    pub version: String,
    /// Label selector: every device whose labels contain it (`{}`: every device).
    #[serde(default)]
    pub selector: serde_json::Map<String, serde_json::Value>,
    /// Share of the selected devices, 1..=100; a device's bucket is a hash of release and
    /// device, so the same devices are chosen every time.
    pub percent: u8,
}

/// A rollout and the update state of each device it selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRollout {
    pub id: Uuid,
    pub org_id: Uuid,
    pub release_id: Uuid,
    pub version: String,
    pub selector: serde_json::Map<String, serde_json::Value>,
    pub percent: u8,
    /// `active`, `paused` or `aborted`.
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Filled by the status call (`GET .../release-rollouts/{id}`), empty otherwise.
    #[serde(default)]
    pub devices: Vec<DeviceUpdateStatus>,
}

/// One device of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceUpdateStatus {
    pub device_id: Uuid,
    pub device_name: String,
    /// `pending` (nothing reported for this release yet), `downloading`, `trial`,
    /// `confirmed`, `refused` or `rolled_back`.
    pub state: String,
    /// Why a device refused or rolled back the release.
    pub reason: Option<String>,
    /// The agent version the device last reported (`kip-agent 1.2.3`).
    pub agent_version: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}
