//! Fleet health (`GET /v1/organisations/{org}/device-health`, `.../devices/{id}/health`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One device's latest health: the state derived from its last contact and the report its
/// agent sent with its last sync or heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceHealth {
    pub device_id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    /// `ONLINE` (contact within `health.stale_after_s`), `STALE` (within
    /// `health.offline_after_s`) or `OFFLINE` (later, or never).
    pub state: String,
    pub last_contact_at: Option<DateTime<Utc>>,
    pub seconds_since_contact: Option<f64>,
    /// When the report below arrived.
    pub report_received_at: Option<DateTime<Utc>>,
    /// The agent's report (`kip_shared::health::HealthReport` as JSON); `None` before the
    /// first one (or from an agent too old to send one).
    pub report: Option<serde_json::Value>,
    /// What the report shows wrong, with the thresholds of the shipped alert rules:
    /// `disk_low`, `cert_expired`, `cert_expiring`, `buffer_filling`, `clock_skew` (empty:
    /// nothing, or no report).
    #[serde(default)]
    pub flags: Vec<String>,
}

/// Devices by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCounts {
    pub online: u64,
    pub stale: u64,
    pub offline: u64,
}

/// The fleet of one organisation: counts over every device, and the devices that match
/// the query (worst first: offline, stale, online; then by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetHealth {
    pub counts: HealthCounts,
    pub devices: Vec<DeviceHealth>,
}
