//! Control-plane configuration: a TOML file plus `KIP_*` environment overrides.
//!
//! Invariants:
//! - Unknown keys are rejected (`deny_unknown_fields`), so a typo never silently becomes a
//!   default.
//! - Every duration and size carries its unit in its name (`request_timeout_ms`).
//! - [`Config`] is only ever built by [`RawConfig::validate`]; holding one means it was checked.

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use kip_shared::validate::in_range;
use serde::Deserialize;

pub use crate::config_error::ConfigError;

/// The file as written by the operator, before validation.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub pki: RawPki,
    #[serde(default)]
    pub ingest: RawIngest,
    #[serde(default)]
    pub llm: crate::llm::config::RawLlm,
    /// `[mlflow]`: mirror the model registry into MLflow.
    #[serde(default)]
    pub mlflow: crate::models::mlflow::RawMlflow,
    /// `[health]`: device state windows and fleet metrics.
    #[serde(default)]
    pub health: crate::health::RawHealth,
    /// `[documents]`: document upload and retrieval (embedding model, limits).
    #[serde(default)]
    pub documents: crate::documents::RawDocuments,
    /// `[telemetry]`: time partitioning, retention and rollup maintenance.
    #[serde(default)]
    pub telemetry: crate::telemetry::storage::RawTelemetry,
    /// `[agent_load_shedding]`: refuse agent syncs early when the replica is saturated.
    #[serde(default)]
    pub agent_load_shedding: RawShedding,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen_addr")]
    pub listen_addr: String,
    #[serde(default = "default_request_body_limit_bytes")]
    pub request_body_limit_bytes: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    #[serde(default = "default_database_url")]
    pub url: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Create the database named in `url` when it does not exist yet.
    #[serde(default = "default_true")]
    pub create_if_missing: bool,
    /// PostgreSQL `statement_timeout` of every connection: no query runs longer.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// Connections of the agent listener's own pool (sync, renewal, whoami), separate from
    /// `max_connections`, so admin or unauthenticated load cannot starve ingest. 0: the agent
    /// listener shares the main pool.
    #[serde(default = "default_agent_max_connections")]
    pub agent_max_connections: u32,
    /// With several hosts in `url` (or `target_session_attrs=read-write`): how often the
    /// current server is checked, and a new primary chosen when it is gone or in recovery.
    #[serde(default = "default_failover_check_interval_ms")]
    pub failover_check_interval_ms: u64,
}

fn default_failover_check_interval_ms() -> u64 {
    1_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Where the platform-admin key is written (mode 0600) when none exists yet.
    #[serde(default = "default_admin_key_file")]
    pub admin_key_file: PathBuf,
    /// How long an authenticated API key is trusted without asking PostgreSQL again. Bounds
    /// how long a key revoked through another replica keeps working here; 0 = no cache.
    #[serde(default = "default_key_cache_ttl_ms")]
    pub key_cache_ttl_ms: u64,
    /// How long an unknown API key is refused without asking PostgreSQL again (0: off).
    #[serde(default = "default_negative_cache_ttl_ms")]
    pub negative_cache_ttl_ms: u64,
    /// Bound on remembered unknown keys and on addresses tracked for failed authentication.
    #[serde(default = "default_negative_cache_max_entries")]
    pub negative_cache_max_entries: u64,
    /// Failed authentications per client address per minute before the address is answered
    /// 429 without asking PostgreSQL (0: off).
    #[serde(default = "default_failed_auth_per_ip_per_minute")]
    pub failed_auth_per_ip_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default = "default_log_format")]
    pub format: String,
    #[serde(default = "default_log_filter")]
    pub filter: String,
}

/// `[pki]`: fleet CA, device certificates and the agent mTLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPki {
    /// CA directory made by `kipctl ca init`. Without it, enrollment answers 503 and the
    /// agent mTLS listener does not start.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of device certificates; agents renew at about 2/3 of it.
    #[serde(default = "default_device_cert_lifetime_s")]
    pub device_cert_lifetime_s: u64,
    /// Address of the agent mTLS listener (TLS 1.3, client certificate required).
    #[serde(default = "default_agent_listen_addr")]
    pub agent_listen_addr: String,
    /// DNS names or IP addresses agents use to reach the agent listener (its certificate's SANs).
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Lifetime of the agent listener's own certificate, re-issued at half of it.
    #[serde(default = "default_server_cert_lifetime_s")]
    pub server_cert_lifetime_s: u64,
    /// How often CRLs (and, when due, the server certificate) are rebuilt even without a
    /// revocation, so replicas converge and nothing the listener presents expires.
    #[serde(default = "default_crl_refresh_interval_s")]
    pub crl_refresh_interval_s: u64,
    /// How long after expiry a device may still exchange its certificate for a new one by
    /// proving possession of its key (`POST /renew-expired`); 0 disables. Covers gateways
    /// offline for longer than the certificate lifetime.
    #[serde(default = "default_expired_renewal_grace_s")]
    pub expired_renewal_grace_s: u64,
    /// How often the CA files in `ca_dir` are checked for changes (content hash). A change
    /// (e.g. `kipctl ca rotate-intermediate`) is loaded without restart; SIGHUP checks at once.
    #[serde(default = "default_ca_reload_interval_s")]
    pub ca_reload_interval_s: u64,
    /// How long a certificate keeps working after a renewal or re-enrollment issued its
    /// successor (so requests in flight and an agent that missed the answer are not cut off);
    /// older certificates of the device stop at once.
    #[serde(default = "default_renewal_overlap_s")]
    pub renewal_overlap_s: u64,
    /// Most certificates issued to one device (renewals, recoveries) within
    /// `renewal_window_s`; beyond it renewal answers 429 with `Retry-After`.
    #[serde(default = "default_renewals_per_window")]
    pub renewals_per_window: u32,
    #[serde(default = "default_renewal_window_s")]
    pub renewal_window_s: u64,
    /// Longest a request on the agent mTLS listener may take, body upload included; slower
    /// ones answer 504.
    #[serde(default = "default_agent_request_timeout_ms")]
    pub agent_request_timeout_ms: u64,
    /// Enrollment attempts (`POST /enroll`) per client address per minute, counted before
    /// any database work; beyond it 429 with `Retry-After` (0: off).
    #[serde(default = "default_enrollments_per_ip_per_minute")]
    pub enrollments_per_ip_per_minute: u32,
}

/// `[ingest]`: limits on agent sync batches (`POST /v1/agent/sync` on the agent listener).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    /// Largest batch, in bytes of JSON after decompression; also the limit on the (gzip)
    /// request body. Agents size their batches below it and shrink on 413.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: u64,
    /// Most records in one batch.
    #[serde(default = "default_max_batch_records")]
    pub max_batch_records: u64,
    /// Syncs of one device served at once by this replica (an agent draining a backlog keeps
    /// up to its `sync.max_in_flight_batches` in flight); one more is answered 429
    /// `sync_in_flight` before its body is read. 1 restores the one-at-a-time behaviour.
    #[serde(default = "default_max_in_flight_syncs_per_device")]
    pub max_in_flight_syncs_per_device: u64,
}

fn default_max_batch_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_max_batch_records() -> u64 {
    10_000
}
fn default_max_in_flight_syncs_per_device() -> u64 {
    4
}

impl Default for RawIngest {
    fn default() -> Self {
        Self {
            max_batch_bytes: default_max_batch_bytes(),
            max_batch_records: default_max_batch_records(),
            max_in_flight_syncs_per_device: default_max_in_flight_syncs_per_device(),
        }
    }
}

impl RawIngest {
    fn validate(self) -> Result<crate::telemetry::IngestLimits, ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        in_range(self.max_batch_bytes, 64 * 1024, 256 * 1024 * 1024, "")
            .map_err(|m| invalid("ingest.max_batch_bytes", m))?;
        in_range(self.max_batch_records, 1, 100_000, "")
            .map_err(|m| invalid("ingest.max_batch_records", m))?;
        in_range(self.max_in_flight_syncs_per_device, 1, 64, "")
            .map_err(|m| invalid("ingest.max_in_flight_syncs_per_device", m))?;
        Ok(crate::telemetry::IngestLimits {
            max_in_flight_syncs_per_device: usize::try_from(self.max_in_flight_syncs_per_device)
                .unwrap_or(1),
            max_records: usize::try_from(self.max_batch_records).unwrap_or(usize::MAX),
            max_decoded_bytes: usize::try_from(self.max_batch_bytes).unwrap_or(usize::MAX),
        })
    }
}

/// `[agent_load_shedding]` as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShedding {
    /// Syncs and heartbeats served at once on this replica; 0: no shedding.
    #[serde(default = "default_max_in_flight_requests")]
    pub max_in_flight_requests: u64,
    /// Requests that may wait for a place beyond those; more are refused at once.
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: u64,
    /// Longest a request waits for a place before it is refused.
    #[serde(default = "default_max_queue_wait_ms")]
    pub max_queue_wait_ms: u64,
    /// `Retry-After` of a refusal is drawn uniformly from `retry_after_min_s..=retry_after_max_s`.
    #[serde(default = "default_retry_after_min_s")]
    pub retry_after_min_s: u64,
    #[serde(default = "default_retry_after_max_s")]
    pub retry_after_max_s: u64,
}

fn default_max_in_flight_requests() -> u64 {
    16
}
fn default_max_queued_requests() -> u64 {
    64
}
fn default_max_queue_wait_ms() -> u64 {
    1_000
}
fn default_retry_after_min_s() -> u64 {
    5
}
fn default_retry_after_max_s() -> u64 {
    30
}

impl Default for RawShedding {
    fn default() -> Self {
        Self {
            max_in_flight_requests: default_max_in_flight_requests(),
            max_queued_requests: default_max_queued_requests(),
            max_queue_wait_ms: default_max_queue_wait_ms(),
            retry_after_min_s: default_retry_after_min_s(),
            retry_after_max_s: default_retry_after_max_s(),
        }
    }
}

/// Validated `[agent_load_shedding]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SheddingConfig {
    /// `None`: shedding is off.
    pub max_in_flight_requests: Option<usize>,
    pub max_queued_requests: usize,
    pub max_queue_wait: Duration,
    pub retry_after_min_s: u64,
    pub retry_after_max_s: u64,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        Self {
            max_in_flight_requests: Some(16),
            max_queued_requests: 64,
            max_queue_wait: Duration::from_millis(1_000),
            retry_after_min_s: 5,
            retry_after_max_s: 30,
        }
    }
}

impl RawShedding {
    /// Checks every field; `pool_acquire_timeout` is `database.connect_timeout_ms`, which the
    /// queue wait must stay below (see `agent_api::shed`).
    pub fn validate(self, pool_acquire_timeout: Duration) -> Result<SheddingConfig, ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let in_flight = in_range(self.max_in_flight_requests, 0, 100_000, "")
            .map_err(|m| invalid("agent_load_shedding.max_in_flight_requests", m))?;
        let queued = in_range(self.max_queued_requests, 0, 1_000_000, "")
            .map_err(|m| invalid("agent_load_shedding.max_queued_requests", m))?;
        let wait = in_range(self.max_queue_wait_ms, 1, 600_000, " ms")
            .map(Duration::from_millis)
            .map_err(|m| invalid("agent_load_shedding.max_queue_wait_ms", m))?;
        if in_flight > 0 && wait >= pool_acquire_timeout {
            return Err(invalid(
                "agent_load_shedding.max_queue_wait_ms",
                format!(
                    "must be below database.connect_timeout_ms ({} ms), got {} ms: a \
                     saturated replica must refuse before its pool times out",
                    pool_acquire_timeout.as_millis(),
                    wait.as_millis()
                ),
            ));
        }
        let min = in_range(self.retry_after_min_s, 1, 3_600, " s")
            .map_err(|m| invalid("agent_load_shedding.retry_after_min_s", m))?;
        let max = in_range(self.retry_after_max_s, min, 3_600, " s")
            .map_err(|m| invalid("agent_load_shedding.retry_after_max_s", m))?;
        Ok(SheddingConfig {
            max_in_flight_requests: (in_flight > 0).then(|| to_usize(in_flight)),
            max_queued_requests: to_usize(queued),
            max_queue_wait: wait,
            retry_after_min_s: min,
            retry_after_max_s: max,
        })
    }
}

fn default_device_cert_lifetime_s() -> u64 {
    86_400
}
fn default_agent_listen_addr() -> String {
    "127.0.0.1:8443".into()
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_server_cert_lifetime_s() -> u64 {
    7 * 86_400
}
fn default_crl_refresh_interval_s() -> u64 {
    3_600
}
fn default_expired_renewal_grace_s() -> u64 {
    30 * 86_400
}
fn default_ca_reload_interval_s() -> u64 {
    10
}
fn default_renewal_overlap_s() -> u64 {
    300
}
fn default_renewals_per_window() -> u32 {
    6
}
fn default_renewal_window_s() -> u64 {
    3_600
}
fn default_agent_request_timeout_ms() -> u64 {
    120_000
}
fn default_enrollments_per_ip_per_minute() -> u32 {
    30
}

impl Default for RawPki {
    fn default() -> Self {
        Self {
            ca_dir: None,
            device_cert_lifetime_s: default_device_cert_lifetime_s(),
            agent_listen_addr: default_agent_listen_addr(),
            server_names: default_server_names(),
            server_cert_lifetime_s: default_server_cert_lifetime_s(),
            crl_refresh_interval_s: default_crl_refresh_interval_s(),
            expired_renewal_grace_s: default_expired_renewal_grace_s(),
            ca_reload_interval_s: default_ca_reload_interval_s(),
            renewal_overlap_s: default_renewal_overlap_s(),
            renewals_per_window: default_renewals_per_window(),
            renewal_window_s: default_renewal_window_s(),
            agent_request_timeout_ms: default_agent_request_timeout_ms(),
            enrollments_per_ip_per_minute: default_enrollments_per_ip_per_minute(),
        }
    }
}

/// Validated `[pki]` section.
#[derive(Debug, Clone)]
pub struct PkiConfig {
    pub ca_dir: Option<PathBuf>,
    pub device_cert_lifetime: Duration,
    pub agent_listen_addr: SocketAddr,
    pub server_names: Vec<String>,
    pub server_cert_lifetime: Duration,
    pub crl_refresh_interval: Duration,
    pub expired_renewal_grace: Duration,
    pub ca_reload_interval: Duration,
    /// `pki.renewal_overlap_s`.
    pub renewal_overlap: Duration,
    /// `pki.renewals_per_window` certificates per device within `renewal_window`.
    pub renewals_per_window: u32,
    pub renewal_window: Duration,
    /// `pki.agent_request_timeout_ms`.
    pub agent_request_timeout: Duration,
    /// `pki.enrollments_per_ip_per_minute` (0: off).
    pub enrollments_per_ip_per_minute: u32,
}

impl RawPki {
    fn validate(self) -> Result<PkiConfig, ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let s_in = |field: &'static str, v: u64, min: u64, max: u64| {
            in_range(v, min, max, " s")
                .map(Duration::from_secs)
                .map_err(|m| invalid(field, m))
        };
        let device_cert_lifetime = s_in(
            "pki.device_cert_lifetime_s",
            self.device_cert_lifetime_s,
            300,
            31 * 86_400,
        )?;
        let server_cert_lifetime = s_in(
            "pki.server_cert_lifetime_s",
            self.server_cert_lifetime_s,
            3_600,
            90 * 86_400,
        )?;
        let crl_refresh_interval = s_in(
            "pki.crl_refresh_interval_s",
            self.crl_refresh_interval_s,
            10,
            86_400,
        )?;
        if crl_refresh_interval * 2 >= server_cert_lifetime {
            return Err(invalid(
                "pki.crl_refresh_interval_s",
                "must be less than half of pki.server_cert_lifetime_s, or the listener's \
                 certificate could expire between two refreshes"
                    .into(),
            ));
        }
        let expired_renewal_grace = s_in(
            "pki.expired_renewal_grace_s",
            self.expired_renewal_grace_s,
            0,
            365 * 86_400,
        )?;
        let ca_reload_interval = s_in(
            "pki.ca_reload_interval_s",
            self.ca_reload_interval_s,
            1,
            3_600,
        )?;
        let renewal_overlap = s_in("pki.renewal_overlap_s", self.renewal_overlap_s, 0, 86_400)?;
        let renewal_window = s_in("pki.renewal_window_s", self.renewal_window_s, 1, 7 * 86_400)?;
        in_range(u64::from(self.renewals_per_window), 1, 1_000, "")
            .map_err(|m| invalid("pki.renewals_per_window", m))?;
        let agent_request_timeout = in_range(self.agent_request_timeout_ms, 100, 3_600_000, " ms")
            .map(Duration::from_millis)
            .map_err(|m| invalid("pki.agent_request_timeout_ms", m))?;
        in_range(
            u64::from(self.enrollments_per_ip_per_minute),
            0,
            1_000_000,
            "",
        )
        .map_err(|m| invalid("pki.enrollments_per_ip_per_minute", m))?;
        let agent_listen_addr = self.agent_listen_addr.parse().map_err(|e| {
            invalid(
                "pki.agent_listen_addr",
                format!(
                    "{:?} is not an address like 127.0.0.1:8443 ({e})",
                    self.agent_listen_addr
                ),
            )
        })?;
        if self.server_names.is_empty() || self.server_names.iter().any(|n| n.trim().is_empty()) {
            return Err(invalid(
                "pki.server_names",
                "must list at least one non-empty DNS name or IP address".into(),
            ));
        }
        if self
            .ca_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(invalid("pki.ca_dir", "must not be empty".into()));
        }
        Ok(PkiConfig {
            ca_dir: self.ca_dir,
            device_cert_lifetime,
            agent_listen_addr,
            server_names: self.server_names,
            server_cert_lifetime,
            crl_refresh_interval,
            expired_renewal_grace,
            ca_reload_interval,
            renewal_overlap,
            renewals_per_window: self.renewals_per_window,
            renewal_window,
            agent_request_timeout,
            enrollments_per_ip_per_minute: self.enrollments_per_ip_per_minute,
        })
    }
}

fn default_listen_addr() -> String {
    "127.0.0.1:8080".into()
}
fn default_request_body_limit_bytes() -> u64 {
    1024 * 1024
}
fn default_key_cache_ttl_ms() -> u64 {
    5_000
}
fn default_negative_cache_ttl_ms() -> u64 {
    60_000
}
fn default_negative_cache_max_entries() -> u64 {
    65_536
}
fn default_failed_auth_per_ip_per_minute() -> u32 {
    30
}
fn default_statement_timeout_ms() -> u64 {
    30_000
}
fn default_agent_max_connections() -> u32 {
    4
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_max_connections_per_ip() -> u64 {
    256
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_database_url() -> String {
    "postgres://postgres@127.0.0.1:5432/kip".into()
}
fn default_max_connections() -> u32 {
    16
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_true() -> bool {
    true
}
fn default_admin_key_file() -> PathBuf {
    PathBuf::from(".kip/admin.key")
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_filter() -> String {
    "info".into()
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen_addr: default_listen_addr(),
            request_body_limit_bytes: default_request_body_limit_bytes(),
            request_timeout_ms: default_request_timeout_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}
impl Default for RawDatabase {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            max_connections: default_max_connections(),
            connect_timeout_ms: default_connect_timeout_ms(),
            create_if_missing: true,
            statement_timeout_ms: default_statement_timeout_ms(),
            agent_max_connections: default_agent_max_connections(),
            failover_check_interval_ms: default_failover_check_interval_ms(),
        }
    }
}
impl Default for RawAuth {
    fn default() -> Self {
        Self {
            admin_key_file: default_admin_key_file(),
            key_cache_ttl_ms: default_key_cache_ttl_ms(),
            negative_cache_ttl_ms: default_negative_cache_ttl_ms(),
            negative_cache_max_entries: default_negative_cache_max_entries(),
            failed_auth_per_ip_per_minute: default_failed_auth_per_ip_per_minute(),
        }
    }
}
impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            filter: default_log_filter(),
        }
    }
}

/// Log output format (`text`, `json` or `ecs`), shared with the other binary.
pub use kip_shared::logging::LogFormat;

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_addr: SocketAddr,
    pub request_body_limit_bytes: usize,
    pub request_timeout: Duration,
    /// Slow-client limits of the admin listener (`server.header_read_timeout_ms`,
    /// `server.idle_timeout_ms`, `server.max_connections_per_ip`).
    pub admin_connections: crate::http::ConnLimits,
    pub shutdown_grace: Duration,
    pub database_url: String,
    pub database_max_connections: NonZeroU32,
    pub database_connect_timeout: Duration,
    pub database_create_if_missing: bool,
    /// `database.statement_timeout_ms`, set on every connection.
    pub database_statement_timeout: Duration,
    /// `database.agent_max_connections`; 0 shares the main pool.
    pub database_agent_max_connections: u32,
    /// `database.failover_check_interval_ms`.
    pub database_failover_check_interval: Duration,
    /// Negative cache and per-IP failed-authentication limit (`[auth]`).
    pub auth_guard: crate::http::AuthGuardConfig,
    pub admin_key_file: PathBuf,
    /// `auth.key_cache_ttl_ms`; zero disables the API-key cache.
    pub key_cache_ttl: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub pki: PkiConfig,
    /// Limits on agent sync batches.
    pub ingest: crate::telemetry::IngestLimits,
    /// The LLM gateway (`[llm]`).
    pub llm: crate::llm::config::LlmConfig,
    /// Set by `kip-control-plane --reset-admin-key`, never from the file.
    pub reset_admin_key: bool,
    /// MLflow mirror (`[mlflow]`); `None` when `tracking_uri` is unset.
    pub mlflow: Option<crate::models::mlflow::MlflowConfig>,
    /// Device state windows and fleet metrics (`[health]`).
    pub health: crate::health::HealthConfig,
    /// Documents and retrieval (`[documents]`).
    pub documents: crate::documents::DocumentsConfig,
    /// Time-series maintenance (`[telemetry]`).
    pub telemetry: crate::telemetry::storage::TelemetryConfig,
    /// Load shedding of agent syncs (`[agent_load_shedding]`).
    pub agent_load_shedding: SheddingConfig,
}

/// Environment variables that override file settings, in the order they are applied.
pub const ENV_OVERRIDES: &[&str] = &[
    "KIP_LISTEN_ADDR",
    "KIP_DATABASE_URL",
    "KIP_ADMIN_KEY_FILE",
    "KIP_LOG_FORMAT",
    "KIP_LOG_FILTER",
    "KIP_PKI_CA_DIR",
    "KIP_AGENT_LISTEN_ADDR",
    "KIP_MLFLOW_TRACKING_URI",
    "KIP_EMBEDDING_MODEL_DIR",
];

impl RawConfig {
    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &std::path::Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    /// Applies `KIP_*` overrides read through `env` (injected so tests need no global state).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("KIP_LISTEN_ADDR") {
            self.server.listen_addr = v;
        }
        if let Some(v) = env("KIP_DATABASE_URL") {
            self.database.url = v;
        }
        if let Some(v) = env("KIP_ADMIN_KEY_FILE") {
            self.auth.admin_key_file = v.into();
        }
        if let Some(v) = env("KIP_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = env("KIP_LOG_FILTER") {
            if v.trim().is_empty() {
                return Err(ConfigError::Env {
                    var: "KIP_LOG_FILTER",
                    message: "must not be empty".into(),
                });
            }
            self.log.filter = v;
        }
        if let Some(v) = env("KIP_PKI_CA_DIR") {
            self.pki.ca_dir = Some(v.into());
        }
        if let Some(v) = env("KIP_AGENT_LISTEN_ADDR") {
            self.pki.agent_listen_addr = v;
        }
        self.llm.apply_env(&env);
        if let Some(v) = env("KIP_MLFLOW_TRACKING_URI") {
            self.mlflow.tracking_uri = Some(v);
        }
        self.documents.apply_env(&env);
        Ok(())
    }

    /// Checks every field and builds the typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        let listen_addr = self.server.listen_addr.parse().map_err(|e| {
            invalid(
                "server.listen_addr",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080 ({e})",
                    self.server.listen_addr
                ),
            )
        })?;
        let body = in_range(
            self.server.request_body_limit_bytes,
            1024,
            64 * 1024 * 1024,
            "",
        )
        .map_err(|m| invalid("server.request_body_limit_bytes", m))?;
        let ms_in = |field: &'static str, v: u64, min: u64, max: u64| {
            in_range(v, min, max, " ms")
                .map(Duration::from_millis)
                .map_err(|m| invalid(field, m))
        };
        let request_timeout = ms_in(
            "server.request_timeout_ms",
            self.server.request_timeout_ms,
            100,
            600_000,
        )?;
        let header_read_timeout = ms_in(
            "server.header_read_timeout_ms",
            self.server.header_read_timeout_ms,
            100,
            600_000,
        )?;
        let idle_timeout = ms_in(
            "server.idle_timeout_ms",
            self.server.idle_timeout_ms,
            1_000,
            3_600_000,
        )?;
        // A request the server still works on must end (504) before its connection counts
        // as idle.
        if idle_timeout <= request_timeout {
            return Err(invalid(
                "server.idle_timeout_ms",
                format!(
                    "must be above server.request_timeout_ms ({} ms), got {} ms",
                    request_timeout.as_millis(),
                    idle_timeout.as_millis()
                ),
            ));
        }
        let max_connections_per_ip = in_range(self.server.max_connections_per_ip, 1, 100_000, "")
            .map_err(|m| invalid("server.max_connections_per_ip", m))?;
        let admin_connections = crate::http::ConnLimits {
            header_read_timeout,
            idle_timeout,
            max_connections_per_ip: usize::try_from(max_connections_per_ip).unwrap_or(usize::MAX),
        };
        let shutdown_grace = ms_in(
            "server.shutdown_grace_ms",
            self.server.shutdown_grace_ms,
            0,
            600_000,
        )?;
        let key_cache_ttl = ms_in(
            "auth.key_cache_ttl_ms",
            self.auth.key_cache_ttl_ms,
            0,
            60_000,
        )?;
        let database_connect_timeout = ms_in(
            "database.connect_timeout_ms",
            self.database.connect_timeout_ms,
            100,
            600_000,
        )?;
        let database_statement_timeout = ms_in(
            "database.statement_timeout_ms",
            self.database.statement_timeout_ms,
            100,
            3_600_000,
        )?;
        in_range(self.database.agent_max_connections, 0, 1000, "")
            .map_err(|m| invalid("database.agent_max_connections", m))?;
        let database_failover_check_interval = ms_in(
            "database.failover_check_interval_ms",
            self.database.failover_check_interval_ms,
            100,
            60_000,
        )?;
        crate::db_hosts::Hosts::parse(&self.database.url)
            .map_err(|e| invalid("database.url", e.to_string()))?;
        let auth_guard = crate::http::AuthGuardConfig {
            negative_ttl: ms_in(
                "auth.negative_cache_ttl_ms",
                self.auth.negative_cache_ttl_ms,
                0,
                3_600_000,
            )?,
            max_entries: in_range(self.auth.negative_cache_max_entries, 1, 10_000_000, "")
                .map_err(|m| invalid("auth.negative_cache_max_entries", m))
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX))?,
            failures_per_ip_per_minute: in_range(
                self.auth.failed_auth_per_ip_per_minute,
                0,
                1_000_000,
                "",
            )
            .map_err(|m| invalid("auth.failed_auth_per_ip_per_minute", m))?,
        };
        if !(self.database.url.starts_with("postgres://")
            || self.database.url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                "must start with postgres:// or postgresql://".into(),
            ));
        }
        let database_max_connections = NonZeroU32::new(self.database.max_connections)
            .filter(|n| n.get() <= 1000)
            .ok_or_else(|| {
                invalid(
                    "database.max_connections",
                    format!(
                        "must be between 1 and 1000, got {}",
                        self.database.max_connections
                    ),
                )
            })?;
        if self.auth.admin_key_file.as_os_str().is_empty() {
            return Err(invalid("auth.admin_key_file", "must not be empty".into()));
        }
        let log_format =
            LogFormat::parse(&self.log.format).map_err(|e| invalid("log.format", e))?;
        let pki = self.pki.validate()?;
        let ingest = self.ingest.validate()?;
        let llm = self.llm.validate()?;
        // A question waits for the agents inside the HTTP request: the request must outlast it.
        for (name, p) in &llm.providers {
            if let Some(m) = &p.mqtt
                && m.request_timeout >= request_timeout
            {
                return Err(invalid(
                    "llm",
                    format!(
                        "llm.providers.{name}.mqtt.request_timeout_ms ({} ms) must be below \
                         server.request_timeout_ms ({} ms)",
                        m.request_timeout.as_millis(),
                        request_timeout.as_millis()
                    ),
                ));
            }
        }
        // An orchestrated request runs inside the HTTP request: its own limit must end first,
        // so it answers (or falls back) instead of being cut with a 504.
        if llm.orchestrator.limits.max_wall_time >= request_timeout {
            return Err(invalid(
                "llm",
                format!(
                    "llm.orchestrator.max_wall_time_ms ({} ms) must be below \
                     server.request_timeout_ms ({} ms)",
                    llm.orchestrator.limits.max_wall_time.as_millis(),
                    request_timeout.as_millis()
                ),
            ));
        }
        let mlflow = self.mlflow.validate(&self.server.listen_addr)?;
        let health = self.health.validate()?;
        let documents = self.documents.validate()?;
        let telemetry = self
            .telemetry
            .validate()
            .map_err(|(field, message)| invalid(field, message))?;
        let agent_load_shedding = self
            .agent_load_shedding
            .validate(database_connect_timeout)?;
        Ok(Config {
            agent_load_shedding,
            telemetry,
            health,
            documents,
            llm,
            mlflow,
            listen_addr,
            request_body_limit_bytes: usize::try_from(body).unwrap_or(usize::MAX),
            request_timeout,
            admin_connections,
            shutdown_grace,
            database_url: self.database.url,
            database_max_connections,
            database_connect_timeout,
            database_create_if_missing: self.database.create_if_missing,
            database_statement_timeout,
            database_agent_max_connections: self.database.agent_max_connections,
            database_failover_check_interval,
            auth_guard,
            admin_key_file: self.auth.admin_key_file,
            key_cache_ttl,
            log_format,
            log_filter: self.log.filter,
            pki,
            reset_admin_key: false,
            ingest,
        })
    }
}

impl Config {
    /// Loads `path` (or defaults when `None`), applies environment overrides, validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                RawConfig::from_toml(&text, p)?
            }
            None => RawConfig::default(),
        };
        raw.apply_env(env)?;
        raw.validate()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/control-plane.toml");
        let cfg = Config::load(Some(&path), no_env).unwrap();
        assert_eq!(cfg.listen_addr.port(), 8080);
        assert_eq!(cfg.request_body_limit_bytes, 1024 * 1024);
        assert_eq!(cfg.log_format, LogFormat::Ecs);
        assert_eq!(cfg.pki.device_cert_lifetime, Duration::from_secs(86_400));
        assert_eq!(cfg.pki.agent_listen_addr.port(), 8443);
        assert!(cfg.pki.ca_dir.is_some());
        assert!(cfg.llm.providers.contains_key("deepseek"));
        assert_eq!(cfg.llm.aliases["smart"].len(), 2);
    }

    #[test]
    fn live_queries_must_time_out_before_the_http_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp.toml");
        std::fs::write(
            &path,
            "[server]\nrequest_timeout_ms = 1000\n[llm.providers.aleph]\nkind = \"aleph\"\n\
             models = [\"aleph\"]\n[llm.providers.aleph.mqtt]\nurl = \"mqtt://x\"\n",
        )
        .unwrap();
        let err = Config::load(Some(&path), no_env).unwrap_err().to_string();
        assert!(
            err.contains("mqtt.request_timeout_ms") && err.contains("server.request_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn quickstart_config_loads_with_aleph_asking_agents_over_mqtt() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart.toml");
        let cfg = Config::load(Some(&path), no_env).unwrap();
        let mqtt = cfg.llm.providers["aleph"].mqtt.as_ref().unwrap();
        assert_eq!(
            (mqtt.endpoint.host(), mqtt.endpoint.port()),
            ("127.0.0.1", 1883)
        );
        assert_eq!(mqtt.client_id, "kip-cp-quickstart");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = RawConfig::from_toml("[server]\nlisten_adr = \"x\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_adr"), "{err}");
        assert!(err.contains("c.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("[server]\nlisten_addr = \"nope\"", "server.listen_addr"),
            (
                "[server]\nrequest_timeout_ms = 5",
                "server.request_timeout_ms",
            ),
            ("[auth]\nkey_cache_ttl_ms = 600000", "auth.key_cache_ttl_ms"),
            (
                "[server]\nrequest_timeout_ms = 10000\n[llm.orchestrator]\nmax_wall_time_ms = 10000",
                "llm.orchestrator.max_wall_time_ms",
            ),
            (
                "[server]\nrequest_body_limit_bytes = 10",
                "server.request_body_limit_bytes",
            ),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            (
                "[database]\nmax_connections = 0",
                "database.max_connections",
            ),
            ("[log]\nformat = \"xml\"", "log.format"),
            (
                "[pki]\ndevice_cert_lifetime_s = 10",
                "pki.device_cert_lifetime_s",
            ),
            ("[pki]\nagent_listen_addr = \"x\"", "pki.agent_listen_addr"),
            ("[pki]\nserver_names = []", "pki.server_names"),
            ("[pki]\nrenewals_per_window = 0", "pki.renewals_per_window"),
            ("[pki]\nrenewal_overlap_s = 90000", "pki.renewal_overlap_s"),
            (
                "[pki]\nagent_request_timeout_ms = 5",
                "pki.agent_request_timeout_ms",
            ),
            (
                "[database]\nstatement_timeout_ms = 0",
                "database.statement_timeout_ms",
            ),
            (
                "[database]\nagent_max_connections = 5000",
                "database.agent_max_connections",
            ),
            (
                "[auth]\nnegative_cache_max_entries = 0",
                "auth.negative_cache_max_entries",
            ),
            (
                "[pki]\nserver_cert_lifetime_s = 7200\ncrl_refresh_interval_s = 3600",
                "pki.crl_refresh_interval_s",
            ),
            (
                "[agent_load_shedding]\nmax_queue_wait_ms = 0",
                "agent_load_shedding.max_queue_wait_ms",
            ),
            (
                "[database]\nconnect_timeout_ms = 1000\n[agent_load_shedding]\nmax_queue_wait_ms = 1000",
                "agent_load_shedding.max_queue_wait_ms",
            ),
            (
                "[agent_load_shedding]\nretry_after_min_s = 0",
                "agent_load_shedding.retry_after_min_s",
            ),
            (
                "[ingest]\nmax_in_flight_syncs_per_device = 0",
                "ingest.max_in_flight_syncs_per_device",
            ),
        ];
        for (toml, field) in cases {
            let err = RawConfig::from_toml(toml, Path::new("c.toml"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "KIP_LISTEN_ADDR" => Some("0.0.0.0:9999".to_owned()),
            "KIP_DATABASE_URL" => Some("postgres://u@db/kip2".to_owned()),
            _ => None,
        };
        let cfg = Config::load(None, env).unwrap();
        assert_eq!(cfg.listen_addr.to_string(), "0.0.0.0:9999");
        assert_eq!(cfg.database_url, "postgres://u@db/kip2");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load(Some(Path::new("/nonexistent/kip.toml")), no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/kip.toml"), "{err}");
    }
}
