//! Fleet PKI: enrollment tokens, enrollment, renewal, revocation and the CA status
//! (`/enroll`, `/renew-expired`, `/v1/.../enroll-tokens`, `/v1/pki/ca`, and the agent
//! listener's `/v1/agent/renew` and `/v1/agent/whoami`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Body of `POST /v1/organisations/{org_id}/enroll-tokens`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    /// Lifetime in seconds (default 3600, at most 30 days).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Binds the token to this device name; needed to re-enroll an existing device.
    #[serde(default)]
    pub device_name: Option<String>,
}

/// A one-time enrollment (bootstrap) token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollToken {
    pub id: Uuid,
    pub org_id: Uuid,
    /// The token itself. Shown only in this response; only its hash is stored.
    pub token: String,
    pub device_name: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// Answer of `POST .../devices/{device_id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub org_id: Uuid,
    pub device_id: Uuid,
    /// Serials revoked by this call (already revoked or expired ones are not repeated).
    pub revoked_serials: Vec<String>,
}

/// One intermediate CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaCertInfo {
    /// sha256 of the certificate (DER), as recorded per device certificate.
    pub fingerprint: String,
    pub not_after: DateTime<Utc>,
}

/// Devices by the intermediate that issued their newest unexpired, unrevoked certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesByIssuer {
    pub current: i64,
    /// Not renewed since the rotation: `kipctl ca finish-rotation` would cut these devices
    /// off (they would need a new enrollment token).
    pub previous: i64,
    /// Issued by a retired intermediate, or before issuers were recorded.
    pub other: i64,
}

/// The fleet CA as this control plane uses it (`GET /v1/pki/ca`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaStatus {
    /// The intermediate that signs new certificates.
    pub intermediate: CaCertInfo,
    /// The intermediate kept from an unfinished rotation.
    pub previous_intermediate: Option<CaCertInfo>,
    /// Expiry of the root above the signing intermediate.
    pub root_not_after: Option<DateTime<Utc>>,
    pub bundle_sha256: String,
    pub bundle_roots: usize,
    pub devices_by_issuer: DevicesByIssuer,
    /// Set by `POST /v1/pki/ca/reload`: whether the CA files had changed and were loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reloaded: Option<bool>,
}

/// Body of `POST /enroll` (the bootstrap token authenticates it).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// PKCS#10 CSR, PEM. Only its public key is used.
    pub csr_pem: String,
    pub device_name: String,
    /// When given, the token must belong to this organisation.
    #[serde(default)]
    pub org_id: Option<Uuid>,
}

/// A freshly issued device certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateResponse {
    pub org_id: Uuid,
    pub device_id: Uuid,
    pub device_name: String,
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// Device certificate followed by the issuing intermediate (PEM).
    pub certificate_chain_pem: String,
    /// Roots the agent must trust for the agent listener (PEM; old and new during rollover).
    pub trust_bundle_pem: String,
}

/// Body of `POST /renew-expired` (proof of possession of the expired certificate's key).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewExpiredRequest {
    /// The device's (expired) certificate followed by its intermediate (PEM).
    pub certificate_chain_pem: String,
    /// CSR signed with the certificate's own key (proof of possession).
    pub csr_pem: String,
}

/// Body of `POST /v1/agent/renew` on the agent listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR, PEM, for the device's new (or same) key.
    pub csr_pem: String,
}

/// `GET /v1/agent/whoami`: the identity the control plane sees in the client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentWhoami {
    pub org_id: Uuid,
    pub device_id: Uuid,
    pub device_name: String,
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

/// Body of `POST /v1/pki/ot-certificates`: a certificate for an OT device (MQTT broker, PLC,
/// OPC UA server or client) from the fleet CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueOtCertificate {
    /// `tls-server` (brokers, PLC TLS endpoints), `tls-client` (devices connecting to a
    /// broker) or `opcua` (an OPC UA application instance certificate).
    pub profile: String,
    /// Subject common name (1 to 64 bytes).
    pub common_name: String,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    /// The ApplicationUri; required for `opcua`, refused otherwise.
    #[serde(default)]
    pub application_uri: Option<String>,
    /// Lifetime in days (1 to 825; never beyond the intermediate's expiry).
    pub validity_days: u32,
    /// PEM CSR whose public key to certify (the key never leaves the device); without it a
    /// key is generated and returned once.
    #[serde(default)]
    pub csr_pem: Option<String>,
    /// Serial (hex) of a certificate this one replaces (rotation): recorded, and the old
    /// one leaves the expiry reminders.
    #[serde(default)]
    pub replaces_serial: Option<String>,
}

/// An issued OT certificate (`POST /v1/pki/ot-certificates`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedOtCertificate {
    pub info: OtCertificateInfo,
    /// The certificate alone (PEM).
    pub certificate_pem: String,
    /// Certificate then intermediate: what a TLS server presents.
    pub chain_pem: String,
    /// The fleet trust bundle (roots): the CA file of whoever verifies this certificate.
    pub ca_bundle_pem: String,
    /// The generated private key (PKCS#8 PEM), only when no CSR was sent; shown once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
}

/// A recorded OT certificate (`GET /v1/pki/ot-certificates`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OtCertificateInfo {
    pub id: Uuid,
    pub serial_hex: String,
    pub profile: String,
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub application_uri: Option<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    /// Serial of the certificate this one replaced.
    pub replaces_serial: Option<String>,
    /// Set when a newer certificate replaced this one.
    pub replaced_at: Option<DateTime<Utc>>,
}
