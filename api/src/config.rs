//! Remote agent configuration (`/v1/organisations/{org_id}/devices/{device_id}/config`,
//! `/v1/organisations/{org_id}/group-config`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Body of `PUT /v1/organisations/{org_id}/devices/{device_id}/config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetDeviceConfig {
    /// TOML holding only remotely settable sections (`buffer` without `max_bytes`, `mqtt`,
    /// `opcua`, `inference`, `sync`, `live_query`).
    pub toml: String,
}

/// Body of `PUT /v1/organisations/{org_id}/group-config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetGroupConfig {
    /// Label selector: every device whose labels contain all of these.
    pub selector: serde_json::Map<String, serde_json::Value>,
    pub toml: String,
}

/// One stored configuration version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigVersion {
    /// Per organisation, increasing; the agent reports it as its applied version.
    pub version: i64,
    /// Set for a device's own configuration.
    pub device_id: Option<Uuid>,
    /// Set for a group configuration.
    pub selector: Option<serde_json::Map<String, serde_json::Value>>,
    pub toml: String,
    pub created_at: DateTime<Utc>,
}

/// Answer of a group `PUT`: the version and the devices it currently targets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupConfigResult {
    pub config: ConfigVersion,
    pub devices: Vec<Uuid>,
}

/// What a device should run and what it reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceConfigStatus {
    pub device_id: Uuid,
    pub device_name: String,
    pub desired: Option<ConfigVersion>,
    /// The version the agent last reported running (`None`: only its local file).
    pub applied_version: Option<String>,
    /// `<version>: <reason>` of the last configuration the agent refused or rolled back.
    pub last_error: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The agent runs exactly the desired version.
    pub in_sync: bool,
}
