//! Organisations, API keys and devices (`/v1/me`, `/v1/organisations/...`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `GET /v1/me`: the key in use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Me {
    pub key_id: Uuid,
    /// `platform` or `org`.
    pub scope: String,
    pub org_id: Option<Uuid>,
    /// `platform-admin`, `org-admin`, `operator`, `llm` or `read-only`.
    #[serde(default)]
    pub role: String,
}

/// An organisation (tenant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Organisation {
    pub id: Uuid,
    pub name: String,
    pub display_name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Body of `POST /v1/organisations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganisation {
    pub name: String,
    pub display_name: Option<String>,
}

/// Body of `PATCH /v1/organisations/{org_id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganisation {
    pub display_name: String,
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub org_id: Option<Uuid>,
    pub name: String,
    pub prefix: String,
    /// What the key may do (see [`CreateApiKey::role`]).
    #[serde(default)]
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Answer of `POST .../api-keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub info: ApiKeyInfo,
    /// The key itself. Shown only in this response; only its hash is stored.
    pub key: String,
}

/// Body of `POST .../api-keys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    /// `org-admin` (the default, everything in the organisation), `operator` (devices,
    /// models, rollouts), `llm` (the LLM API only) or `read-only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// A device (edge gateway) of an organisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    /// String values only.
    pub labels: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Body of `POST .../devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    pub name: String,
    #[serde(default)]
    pub labels: serde_json::Map<String, serde_json::Value>,
}

/// One audited state-changing call (`GET /v1/organisations/{org_id}/audit`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increases with time; the page cursor.
    pub id: i64,
    pub org_id: Option<Uuid>,
    /// Who: the API key's id, name and role at the time of the call.
    pub key_id: Uuid,
    pub key_name: String,
    pub role: String,
    /// What: the action (`device.register`), method and request path (the target).
    pub action: String,
    pub method: String,
    pub target: String,
    /// From where: the client's IP address as the control plane saw it.
    pub client_ip: Option<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// `ok`, `denied` (401/403) or `failed`.
    pub outcome: String,
    pub created_at: DateTime<Utc>,
}

/// A page of the audit log, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    /// Pass as `cursor` to get the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}
