//! Request and response types of the kip control plane's HTTP API.
//!
//! The server (`kip-control-plane`) serialises exactly these types and `kipctl` deserialises
//! them, so the two cannot drift apart. This crate depends on serde, uuid and chrono only: no
//! axum, no sqlx, so a client links none of the server's stack.
//!
//! Invariants:
//! - Request bodies are `deny_unknown_fields`: a misspelt field is a 400 naming it.
//! - Wire names are the field names; changing one is a breaking API change (see
//!   `docs/openapi.json`, which documents the same shapes).

pub mod config;
pub mod fleet;
pub mod health;
pub mod ml;
pub mod models;
pub mod pki;
pub mod releases;

pub use config::{
    ConfigVersion, DeviceConfigStatus, GroupConfigResult, SetDeviceConfig, SetGroupConfig,
};
pub use fleet::{
    ApiKeyInfo, AuditEntry, AuditPage, CreateApiKey, CreateOrganisation, CreatedApiKey, Device, Me,
    Organisation, RegisterDevice, UpdateOrganisation,
};
pub use health::{DeviceHealth, FleetHealth, HealthCounts};
pub use ml::{
    FeatureSetInfo, MaintenanceEvent, MaintenanceEventPage, MaintenanceKind, ModelMonitoringPage,
    ModelMonitoringRecord, ModelPerformance, PerformanceSource, PredictionPage, PredictionRecord,
    RecordMaintenanceEvent, RecordPerformance, RecordTrainingData, TrainingData,
};
pub use models::{
    Agreement, AiModel, ArtifactInfo, DeviceModelStatus, MlflowStatus, ModelKind, ModelRollout,
    ModelRolloutEvent, ModelSigningStatus, ModelStage, RegisterModel, RolloutDevice, RolloutReport,
    RolloutThresholds, SetDesiredModel, SetRolloutPercent, SetStage, StartModelRollout,
    VersionReport,
};
pub use pki::{
    AgentWhoami, CaCertInfo, CaStatus, CertificateResponse, CreateEnrollToken, DevicesByIssuer,
    EnrollRequest, EnrollToken, RenewExpiredRequest, RenewRequest, Revocation,
};
pub use pki::{IssueOtCertificate, IssuedOtCertificate, OtCertificateInfo};
pub use releases::{AgentRelease, DeviceUpdateStatus, ReleaseRollout, StartReleaseRollout};
