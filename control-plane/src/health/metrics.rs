//! Fleet health metrics, recomputed from the database every `health.metrics_refresh_ms` by
//! one task ([`spawn_refresh`]) rather than at scrape time (a scrape never waits on
//! PostgreSQL, and replicas export the same values).
//!
//! Series and their cardinality (O = organisations, N = `health.worst_n`, D = devices):
//! - `kip_fleet_devices{org,state}`: devices by state: at most 3 x O series.
//! - `kip_fleet_worst_<signal>{org,device}`: the N worst devices of the whole fleet per
//!   signal (8 signals, below): at most 8 x N series, whatever the fleet size.
//! - `kip_fleet_health_refresh_failures_total`, `kip_fleet_health_refreshed_unix_seconds`.
//! - With `health.per_device_metrics = true` only: `kip_device_<signal>{org,device}` for every
//!   device and signal, and `kip_device_online{org,device}`: 9 x D series. Meant for fleets of
//!   up to a few hundred devices.
//!
//! Signals (the report's values, only from devices not OFFLINE, whose report would be stale;
//! `seconds_since_contact` covers every device): `seconds_since_contact`,
//! `oldest_unsynced_seconds`, `buffer_fill_ratio`, `disk_free_ratio` (worst = lowest),
//! `cert_expiry_seconds` (worst = lowest), `clock_offset_seconds` (worst = largest absolute
//! value, sign kept: positive means the control plane is ahead), `model_drift`,
//! `inference_errors` (a counter since the agent started).

use std::{sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{DeviceState, HealthConfig};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgState {
    pub org: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgDevice {
    pub org: String,
    pub device: String,
}

type F64Family = Family<OrgDevice, Gauge<f64, AtomicU64>>;

/// How a signal ranks devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Worst {
    Highest,
    Lowest,
    LargestAbs,
}

/// The signals, in the order [`Sample::values`] returns them: (name, help, ranking).
const SIGNALS: [(&str, &str, Worst); 8] = [
    (
        "seconds_since_contact",
        "Seconds since the device's last sync or heartbeat",
        Worst::Highest,
    ),
    (
        "oldest_unsynced_seconds",
        "Age of the oldest record buffered on the device and not yet acknowledged",
        Worst::Highest,
    ),
    (
        "buffer_fill_ratio",
        "Buffer bytes over buffer.max_bytes on the device",
        Worst::Highest,
    ),
    (
        "disk_free_ratio",
        "Free over total bytes of the device's state volume",
        Worst::Lowest,
    ),
    (
        "cert_expiry_seconds",
        "Seconds until the device certificate expires (negative once expired)",
        Worst::Lowest,
    ),
    (
        "clock_offset_seconds",
        "Control-plane clock minus device clock, as the agent measured it",
        Worst::LargestAbs,
    ),
    (
        "model_drift",
        "Drift score of the model running on the device, as the agent reports it",
        Worst::Highest,
    ),
    (
        "inference_errors",
        "Inferences that failed on the device since its agent started",
        Worst::Highest,
    ),
];

/// The fleet families (`kip_fleet_*`, `kip_device_*`).
#[derive(Debug, Clone, Default)]
pub struct FleetMetrics {
    devices: Family<OrgState, Gauge>,
    worst: Vec<F64Family>,
    per_device: Vec<F64Family>,
    device_online: Family<OrgDevice, Gauge>,
    refresh_failures: Counter,
    refreshed: Gauge,
}

impl FleetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let mut m = Self::default();
        registry.register(
            "fleet_devices",
            "Devices by organisation and state (online, stale, offline), derived from the last contact",
            m.devices.clone(),
        );
        for (name, help, _) in SIGNALS {
            let w = F64Family::default();
            registry.register(
                format!("fleet_worst_{name}"),
                format!("{help}: the health.worst_n worst devices of the fleet"),
                w.clone(),
            );
            m.worst.push(w);
            let d = F64Family::default();
            registry.register(
                format!("device_{name}"),
                format!("{help} (health.per_device_metrics)"),
                d.clone(),
            );
            m.per_device.push(d);
        }
        registry.register(
            "device_online",
            "1 while the device is ONLINE (health.per_device_metrics)",
            m.device_online.clone(),
        );
        registry.register(
            "fleet_health_refresh_failures",
            "Fleet health metric refreshes that failed (database)",
            m.refresh_failures.clone(),
        );
        registry.register(
            "fleet_health_refreshed_unix_seconds",
            "Time of the last successful fleet health metric refresh",
            m.refreshed.clone(),
        );
        m
    }
}

#[derive(sqlx::FromRow)]
struct Sample {
    org: String,
    device: String,
    age_s: Option<f64>,
    oldest_unsynced_s: Option<f64>,
    buffer_bytes: Option<f64>,
    buffer_max_bytes: Option<f64>,
    disk_free: Option<f64>,
    disk_total: Option<f64>,
    cert_expiry_s: Option<f64>,
    clock_offset_ms: Option<f64>,
    model_drift: Option<f64>,
    inference_errors: Option<f64>,
}

impl Sample {
    /// The signal values, in [`SIGNALS`] order; report values only when not OFFLINE.
    fn values(&self, state: DeviceState) -> [Option<f64>; 8] {
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let live = state != DeviceState::Offline;
        let r = |v: Option<f64>| v.filter(|_| live);
        [
            self.age_s.map(|s| s.max(0.0)),
            r(self.oldest_unsynced_s),
            r(ratio(self.buffer_bytes, self.buffer_max_bytes)),
            r(ratio(self.disk_free, self.disk_total)),
            r(self.cert_expiry_s),
            r(self.clock_offset_ms.map(|ms| ms / 1000.0)),
            r(self.model_drift),
            r(self.inference_errors),
        ]
    }
}

const SAMPLE_SQL: &str = "SELECT o.name AS org, d.name AS device, \
       EXTRACT(EPOCH FROM now() - d.last_seen_at)::float8 AS age_s, \
       (h.report->>'oldest_unsynced_age_s')::float8 AS oldest_unsynced_s, \
       (h.report->>'buffer_bytes')::float8 AS buffer_bytes, \
       (h.report->>'buffer_max_bytes')::float8 AS buffer_max_bytes, \
       (h.report->>'disk_free_bytes')::float8 AS disk_free, \
       (h.report->>'disk_total_bytes')::float8 AS disk_total, \
       EXTRACT(EPOCH FROM (h.report->>'cert_not_after')::timestamptz - now())::float8 AS cert_expiry_s, \
       (h.report->>'clock_offset_ms')::float8 AS clock_offset_ms, \
       (h.report->>'model_drift')::float8 AS model_drift, \
       (h.report->>'inference_errors')::float8 AS inference_errors \
     FROM devices d JOIN organisations o ON o.id = d.org_id \
     LEFT JOIN device_health h ON h.device_id = d.id AND h.org_id = d.org_id";

/// Recomputes every family from the database.
pub async fn refresh(
    pool: &PgPool,
    cfg: &HealthConfig,
    m: &FleetMetrics,
) -> Result<(), sqlx::Error> {
    let samples: Vec<Sample> = sqlx::query_as(SAMPLE_SQL).fetch_all(pool).await?;
    let mut counts: std::collections::HashMap<OrgState, i64> = Default::default();
    let mut ranked: Vec<Vec<(f64, OrgDevice)>> = vec![Vec::new(); SIGNALS.len()];
    for family in &m.per_device {
        family.clear();
    }
    m.device_online.clear();
    for s in &samples {
        let state = DeviceState::of(cfg, s.age_s);
        *counts
            .entry(OrgState {
                org: s.org.clone(),
                state: state.label(),
            })
            .or_default() += 1;
        let key = OrgDevice {
            org: s.org.clone(),
            device: s.device.clone(),
        };
        if cfg.per_device_metrics {
            m.device_online
                .get_or_create(&key)
                .set(i64::from(state == DeviceState::Online));
        }
        for (i, v) in s.values(state).into_iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                continue;
            };
            if cfg.per_device_metrics {
                m.per_device[i].get_or_create(&key).set(v);
            }
            ranked[i].push((v, key.clone()));
        }
    }
    // Organisations whose devices all left keep a 0 rather than a stale count.
    m.devices.clear();
    for state in [
        DeviceState::Online,
        DeviceState::Stale,
        DeviceState::Offline,
    ] {
        for s in &samples {
            m.devices
                .get_or_create(&OrgState {
                    org: s.org.clone(),
                    state: state.label(),
                })
                .set(0);
        }
    }
    for (k, n) in counts {
        m.devices.get_or_create(&k).set(n);
    }
    for (i, mut values) in ranked.into_iter().enumerate() {
        let worst = SIGNALS[i].2;
        values.sort_by(|a, b| {
            let (x, y) = match worst {
                Worst::Highest => (b.0, a.0),
                Worst::Lowest => (a.0, b.0),
                Worst::LargestAbs => (b.0.abs(), a.0.abs()),
            };
            x.total_cmp(&y)
        });
        values.truncate(cfg.worst_n);
        m.worst[i].clear();
        for (v, key) in values {
            m.worst[i].get_or_create(&key).set(v);
        }
    }
    m.refreshed.set(chrono::Utc::now().timestamp());
    Ok(())
}

/// Refreshes the fleet metrics every `cfg.metrics_refresh` on `tracker` until `token` fires.
pub fn spawn_refresh(
    pool: PgPool,
    cfg: HealthConfig,
    metrics: FleetMetrics,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(cfg.metrics_refresh.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = refresh(&pool, &cfg, &metrics).await {
                metrics.refresh_failures.inc();
                tracing::warn!(error = %e, "fleet health metrics refresh failed");
            }
        }
    });
}
