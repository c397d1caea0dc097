//! Health domain: the latest health report per device, the ONLINE / STALE / OFFLINE state
//! derived from its last contact, the fleet-health API and the fleet Prometheus metrics.
//!
//! Interface for other domains: [`record`] (called by `agent_api::sync` with the report a
//! sync batch or heartbeat carried). Everything about the `device_health` table stays here.
//!
//! Invariants:
//! - The state is derived when read, never stored: `last contact` is `devices.last_seen_at`
//!   (every stored sync and heartbeat sets it), so a device that stops talking turns STALE
//!   after `health.stale_after_s` and OFFLINE after `health.offline_after_s` without any
//!   event having to arrive. A device never seen is OFFLINE.
//! - One row per device (`device_health`), replaced by each report; history is Prometheus's.
//! - Every query filters by `org_id` from the path after [`Principal::org_scope`] checked
//!   it; the metrics name organisations and devices only by name.
//! - Metric cardinality is bounded independently of the fleet size unless
//!   `health.per_device_metrics` is on (see [`metrics`]).

pub mod metrics;

use std::time::Duration;

use axum::{
    Json, Router,
    extract::{FromRef, Query, State, rejection::QueryRejection},
    routing::get,
};
use chrono::{DateTime, Utc};
use kip_api::{DeviceHealth, FleetHealth, HealthCounts};
use kip_shared::health::HealthReport;
use serde::Deserialize;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;

pub use self::metrics::{FleetMetrics, spawn_refresh};
use crate::{
    config_error::ConfigError,
    http::{ApiError, ApiPath, ApiResult, HttpLimits, KeyCache, Principal},
};

/// `[health]` as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// A device without contact for longer is STALE.
    #[serde(default = "default_stale_after_s")]
    pub stale_after_s: u64,
    /// A device without contact for longer is OFFLINE.
    #[serde(default = "default_offline_after_s")]
    pub offline_after_s: u64,
    /// How often the fleet metrics are recomputed from the database.
    #[serde(default = "default_metrics_refresh_ms")]
    pub metrics_refresh_ms: u64,
    /// Devices per worst-N gauge (`kip_fleet_worst_*`).
    #[serde(default = "default_worst_n")]
    pub worst_n: usize,
    /// Also export one series per device and signal (`kip_device_*`); for small fleets.
    #[serde(default)]
    pub per_device_metrics: bool,
}

fn default_stale_after_s() -> u64 {
    180
}
fn default_offline_after_s() -> u64 {
    600
}
fn default_metrics_refresh_ms() -> u64 {
    15_000
}
fn default_worst_n() -> usize {
    10
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            stale_after_s: default_stale_after_s(),
            offline_after_s: default_offline_after_s(),
            metrics_refresh_ms: default_metrics_refresh_ms(),
            worst_n: default_worst_n(),
            per_device_metrics: false,
        }
    }
}

/// Validated `[health]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    pub stale_after: Duration,
    pub offline_after: Duration,
    pub metrics_refresh: Duration,
    pub worst_n: usize,
    pub per_device_metrics: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        // The defaults are valid by construction.
        RawHealth::default().validate().unwrap_or(Self {
            stale_after: Duration::from_secs(180),
            offline_after: Duration::from_secs(600),
            metrics_refresh: Duration::from_secs(15),
            worst_n: 10,
            per_device_metrics: false,
        })
    }
}

impl RawHealth {
    pub fn validate(self) -> Result<HealthConfig, ConfigError> {
        let invalid =
            |field: &'static str, message: String| ConfigError::Invalid { field, message };
        if !(1..=86_400).contains(&self.stale_after_s) {
            return Err(invalid(
                "health.stale_after_s",
                format!("must be between 1 and 86400, got {}", self.stale_after_s),
            ));
        }
        if self.offline_after_s <= self.stale_after_s || self.offline_after_s > 30 * 86_400 {
            return Err(invalid(
                "health.offline_after_s",
                format!(
                    "must be greater than health.stale_after_s ({}) and at most 2592000, got {}",
                    self.stale_after_s, self.offline_after_s
                ),
            ));
        }
        if !(100..=3_600_000).contains(&self.metrics_refresh_ms) {
            return Err(invalid(
                "health.metrics_refresh_ms",
                format!(
                    "must be between 100 and 3600000, got {}",
                    self.metrics_refresh_ms
                ),
            ));
        }
        if !(1..=100).contains(&self.worst_n) {
            return Err(invalid(
                "health.worst_n",
                format!("must be between 1 and 100, got {}", self.worst_n),
            ));
        }
        Ok(HealthConfig {
            stale_after: Duration::from_secs(self.stale_after_s),
            offline_after: Duration::from_secs(self.offline_after_s),
            metrics_refresh: Duration::from_millis(self.metrics_refresh_ms),
            worst_n: self.worst_n,
            per_device_metrics: self.per_device_metrics,
        })
    }
}

/// A device's state from the seconds since its last contact (`None`: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceState {
    Offline,
    Stale,
    Online,
}

impl DeviceState {
    pub fn of(cfg: &HealthConfig, seconds_since_contact: Option<f64>) -> Self {
        match seconds_since_contact {
            Some(s) if s <= cfg.stale_after.as_secs_f64() => Self::Online,
            Some(s) if s <= cfg.offline_after.as_secs_f64() => Self::Stale,
            _ => Self::Offline,
        }
    }

    /// As the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "ONLINE",
            Self::Stale => "STALE",
            Self::Offline => "OFFLINE",
        }
    }

    /// As a Prometheus label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Stale => "stale",
            Self::Offline => "offline",
        }
    }

    /// `ONLINE`, `STALE`, `OFFLINE` in any case.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Online, Self::Stale, Self::Offline]
            .into_iter()
            .find(|x| x.as_str().eq_ignore_ascii_case(s))
    }
}

/// The upsert of a device's `device_health` row from SQL placeholders (device, org, report as
/// jsonb), written only when the report placeholder is not NULL; a row of another
/// organisation is never touched. The sync endpoint runs it with the device's other reports
/// in one statement ([`crate::agent_api`]).
macro_rules! upsert_health {
    ($device:literal, $org:literal, $report:literal) => {
        concat!(
            "INSERT INTO device_health (device_id, org_id, report, received_at) SELECT ",
            $device, ", ", $org, ", ", $report, ", now() WHERE ", $report, "::jsonb IS NOT NULL \
             ON CONFLICT (device_id) DO UPDATE SET report = EXCLUDED.report, received_at = now() \
             WHERE device_health.org_id = EXCLUDED.org_id"
        )
    };
}
pub(crate) use upsert_health;

/// Stores `report` as the latest of the device (a report already checked by the batch
/// decoder, [`HealthReport::check`]).
pub async fn record(
    pool: &PgPool,
    org_id: Uuid,
    device_id: Uuid,
    report: &HealthReport,
) -> Result<(), sqlx::Error> {
    let json = serde_json::to_value(report).unwrap_or_default();
    sqlx::query(upsert_health!("$1", "$2", "$3"))
        .bind(device_id)
        .bind(org_id)
        .bind(json)
        .execute(pool)
        .await?;
    Ok(())
}

/// The health routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
    HealthConfig: FromRef<S>,
{
    Router::new()
        .route("/organisations/{org_id}/device-health", get(list))
        .route(
            "/organisations/{org_id}/devices/{device_id}/health",
            get(get_one),
        )
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    org_id: Uuid,
    name: String,
    last_seen_at: Option<DateTime<Utc>>,
    age_s: Option<f64>,
    received_at: Option<DateTime<Utc>>,
    report: Option<serde_json::Value>,
    labels: serde_json::Value,
}

impl Row {
    /// Whether the name or a label (`key=value`) contains `needle` (lower case).
    fn matches(&self, needle: &str) -> bool {
        self.name.to_lowercase().contains(needle)
            || self.labels.as_object().is_some_and(|labels| {
                labels.iter().any(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    format!("{k}={v}").to_lowercase().contains(needle)
                })
            })
    }
}

impl Row {
    fn into_api(self, cfg: &HealthConfig) -> DeviceHealth {
        DeviceHealth {
            device_id: self.id,
            org_id: self.org_id,
            name: self.name,
            state: DeviceState::of(cfg, self.age_s).as_str().into(),
            last_contact_at: self.last_seen_at,
            seconds_since_contact: self.age_s.map(|s| s.max(0.0)),
            report_received_at: self.received_at,
            flags: self
                .report
                .as_ref()
                .map(|r| flags(r, Utc::now()))
                .unwrap_or_default(),
            report: self.report,
        }
    }
}

/// Free share of the state volume under which a device is flagged `disk_low`
/// (`KipGatewayDiskLow`).
pub const DISK_LOW_RATIO: f64 = 0.10;
/// Certificate lifetime left under which a device is flagged `cert_expiring`
/// (`KipDeviceCertificateExpiring`).
pub const CERT_EXPIRING_S: i64 = 6 * 3600;
/// Buffer fill over which a device is flagged `buffer_filling` (`KipBufferFilling`).
pub const BUFFER_FILLING_RATIO: f64 = 0.8;
/// Clock offset (either way) over which a device is flagged `clock_skew` (`KipClockSkew`).
pub const CLOCK_SKEW_MS: i64 = 30_000;
/// Drift score (largest statistic over its calibrated threshold) at or above which a device
/// is flagged `model_drift` (`KipModelDrift`).
pub const MODEL_DRIFT_SCORE: f64 = kip_shared::health::MODEL_DRIFT_SCORE_ALARM;

/// The flags of a stored report at `now`, with the thresholds of the alert rules in
/// `deploy/monitoring/prometheus/kip-alerts.yml` (kept equal by hand: the rules are what
/// operators tune per site; these are what `kipctl` and the console show). A field the
/// report lacks flags nothing.
pub fn flags(report: &serde_json::Value, now: DateTime<Utc>) -> Vec<String> {
    let num = |k: &str| report[k].as_f64();
    let mut out = Vec::new();
    if let (Some(free), Some(total)) = (num("disk_free_bytes"), num("disk_total_bytes"))
        && total > 0.0
        && free / total < DISK_LOW_RATIO
    {
        out.push("disk_low");
    }
    if let Some(not_after) = report["cert_not_after"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    {
        let left = (not_after.with_timezone(&Utc) - now).num_seconds();
        if left <= 0 {
            out.push("cert_expired");
        } else if left < CERT_EXPIRING_S {
            out.push("cert_expiring");
        }
    }
    if let (Some(bytes), Some(max)) = (num("buffer_bytes"), num("buffer_max_bytes"))
        && max > 0.0
        && bytes / max > BUFFER_FILLING_RATIO
    {
        out.push("buffer_filling");
    }
    if report["clock_offset_ms"]
        .as_i64()
        .is_some_and(|ms| ms.abs() > CLOCK_SKEW_MS)
    {
        out.push("clock_skew");
    }
    if num("model_drift").is_some_and(|d| d >= MODEL_DRIFT_SCORE) {
        out.push("model_drift");
    }
    out.into_iter().map(str::to_owned).collect()
}

const SELECT: &str = "SELECT d.id, d.org_id, d.name, d.last_seen_at, \
     EXTRACT(EPOCH FROM now() - d.last_seen_at)::float8 AS age_s, h.received_at, h.report, \
     d.labels FROM devices d LEFT JOIN device_health h ON h.device_id = d.id AND h.org_id = d.org_id ";

/// `?state=&q=&limit=` of the fleet list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetQuery {
    /// Only devices in this state (`ONLINE`, `STALE`, `OFFLINE`; any case).
    #[serde(default)]
    pub state: Option<String>,
    /// Only devices whose name or a label (`key=value`) contains this (case-insensitive).
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default = "default_limit")]
    pub limit: usize,
}

fn default_limit() -> usize {
    100
}

/// Reads an organisation's fleet: counts over all devices and the matching ones, worst
/// state first. Used by the API and the console.
pub async fn fleet(
    pool: &PgPool,
    cfg: &HealthConfig,
    org_id: Uuid,
    state: Option<DeviceState>,
    q: Option<&str>,
    limit: usize,
) -> Result<FleetHealth, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE d.org_id = $1 ORDER BY d.name"
    )))
    .bind(org_id)
    .fetch_all(pool)
    .await?;
    let mut counts = HealthCounts::default();
    let needle = q.map(str::to_lowercase);
    let mut devices: Vec<(DeviceState, DeviceHealth)> = Vec::new();
    for r in rows {
        let s = DeviceState::of(cfg, r.age_s);
        match s {
            DeviceState::Online => counts.online += 1,
            DeviceState::Stale => counts.stale += 1,
            DeviceState::Offline => counts.offline += 1,
        }
        if state.is_some_and(|want| want != s) || needle.as_deref().is_some_and(|n| !r.matches(n)) {
            continue;
        }
        devices.push((s, r.into_api(cfg)));
    }
    // Stable: by state (worst first), names stay sorted within a state.
    devices.sort_by_key(|(s, _)| *s);
    devices.truncate(limit);
    Ok(FleetHealth {
        counts,
        devices: devices.into_iter().map(|(_, d)| d).collect(),
    })
}

/// One device's health, `None` when the organisation has no such device.
pub async fn device(
    pool: &PgPool,
    cfg: &HealthConfig,
    org_id: Uuid,
    device_id: Uuid,
) -> Result<Option<DeviceHealth>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{SELECT} WHERE d.org_id = $1 AND d.id = $2"
    )))
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| r.into_api(cfg)))
}

/// `GET /v1/organisations/{org_id}/device-health`.
async fn list(
    State(pool): State<PgPool>,
    State(cfg): State<HealthConfig>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<FleetQuery>, QueryRejection>,
) -> ApiResult<Json<FleetHealth>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 1000"));
    }
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(DeviceState::parse(s).ok_or_else(|| {
            ApiError::validation("state", "must be one of ONLINE, STALE, OFFLINE")
        })?),
    };
    if let Some(n) = &q.q {
        crate::http::pg_text("q", n, 256)?;
    }
    let needle = q.q.as_deref().filter(|s| !s.is_empty());
    Ok(Json(
        fleet(&pool, &cfg, org_id, state, needle, q.limit).await?,
    ))
}

/// `GET /v1/organisations/{org_id}/devices/{device_id}/health`.
async fn get_one(
    State(pool): State<PgPool>,
    State(cfg): State<HealthConfig>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<DeviceHealth>> {
    let org_id = p.org_scope(org_id)?;
    device(&pool, &cfg, org_id, device_id)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("device"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_windows() {
        let cfg = HealthConfig::default();
        assert_eq!(DeviceState::of(&cfg, Some(0.0)), DeviceState::Online);
        assert_eq!(DeviceState::of(&cfg, Some(180.0)), DeviceState::Online);
        assert_eq!(DeviceState::of(&cfg, Some(181.0)), DeviceState::Stale);
        assert_eq!(DeviceState::of(&cfg, Some(601.0)), DeviceState::Offline);
        assert_eq!(DeviceState::of(&cfg, None), DeviceState::Offline);
        assert_eq!(DeviceState::parse("offline"), Some(DeviceState::Offline));
        assert_eq!(DeviceState::parse("gone"), None);
    }

    #[test]
    fn reports_are_flagged_with_the_alert_thresholds() {
        let now = Utc::now();
        let fine = serde_json::json!({
            "disk_free_bytes": 50, "disk_total_bytes": 100,
            "cert_not_after": (now + chrono::Duration::hours(24)).to_rfc3339(),
            "buffer_bytes": 10, "buffer_max_bytes": 100, "clock_offset_ms": -2000,
            "model_drift": 0.99,
        });
        assert_eq!(flags(&fine, now), Vec::<String>::new());
        assert_eq!(flags(&serde_json::json!({}), now), Vec::<String>::new());
        let bad = serde_json::json!({
            "disk_free_bytes": 9, "disk_total_bytes": 100,
            "cert_not_after": (now + chrono::Duration::hours(1)).to_rfc3339(),
            "buffer_bytes": 81, "buffer_max_bytes": 100, "clock_offset_ms": -31_000,
            "model_drift": 1.0, "model_drift_features": ["s11"],
        });
        assert_eq!(
            flags(&bad, now),
            [
                "disk_low",
                "cert_expiring",
                "buffer_filling",
                "clock_skew",
                "model_drift"
            ]
        );
        let expired = serde_json::json!({
            "cert_not_after": (now - chrono::Duration::seconds(1)).to_rfc3339(),
        });
        assert_eq!(flags(&expired, now), ["cert_expired"]);
    }

    #[test]
    fn windows_are_validated() {
        let raw = RawHealth {
            offline_after_s: 100,
            ..Default::default()
        };
        let e = raw.validate().unwrap_err().to_string();
        assert!(e.contains("health.offline_after_s"), "{e}");
        assert!(RawHealth::default().validate().is_ok());
    }
}
