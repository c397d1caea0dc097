//! Model monitoring: the drift records agents sync ([`kip_shared::ModelDrift`], one per
//! monitored feature and drift window), stored in `model_monitoring`, listed per organisation
//! (`GET /v1/organisations/{org_id}/model-monitoring`) and summarised as fleet metrics.
//!
//! Invariants:
//! - Rows are written only by sync ingest ([`DriftColumns::insert`], inside the batch's
//!   transaction), under the device and organisation of the caller's certificate, keyed by
//!   `(device_id, epoch, seq)` with `ON CONFLICT DO NOTHING`: a replayed batch stores each
//!   record once.
//! - Every listing filters by the `org_id` checked by [`Principal::org_scope`]; a `device_id`
//!   of another organisation matches nothing. Pages are keyset on `(ts, device_id, epoch,
//!   seq)` with the crate's one cursor helper.
//! - Fleet metrics (`kip_model_drift{org,model,version,feature,statistic}`: the largest PSI or
//!   KS over the devices' latest windows; `kip_model_drift_alarm_devices{org,model,version,
//!   feature}`: devices whose latest window alarms) consider only records of the last
//!   [`METRIC_MAX_AGE_S`] and keep at most [`MAX_METRIC_FEATURES`] (org, model, version,
//!   feature) groups, the ones with the most alarming devices first: at most 3 x
//!   [`MAX_METRIC_FEATURES`] series however large the fleet; `kip_model_drift_series_dropped`
//!   says how many groups the bound left out.

use std::{sync::atomic::AtomicU64, time::Duration};

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
};
use chrono::{DateTime, Utc};
use kip_api::{ModelMonitoringPage, ModelMonitoringRecord};
use kip_shared::ModelDrift;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Deserialize;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::http::{ApiError, ApiPath, ApiResult, Principal, pg_text};
use crate::http::{decode_record_cursor, encode_record_cursor};

/// Only records this recent feed the fleet metrics (a model no device reported on for a day
/// leaves the metrics).
pub const METRIC_MAX_AGE_S: i64 = 24 * 3600;
/// Most (org, model, version, feature) groups exported as metrics.
pub const MAX_METRIC_FEATURES: i64 = 1000;
/// Longest `model`, `version` filter accepted.
const MAX_FILTER_BYTES: usize = 256;

/// The drift records of one batch, as columns for one `UNNEST` insert.
#[derive(Debug, Default)]
pub struct DriftColumns {
    seq: Vec<i64>,
    model: Vec<String>,
    version: Vec<String>,
    feature: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    psi: Vec<f64>,
    ks: Vec<f64>,
    psi_threshold: Vec<f64>,
    ks_threshold: Vec<f64>,
    alarm: Vec<bool>,
    window: Vec<i32>,
    effective_window: Vec<i32>,
}

impl DriftColumns {
    /// Adds the record at `seq` (already checked by the batch decoder).
    pub fn push(&mut self, seq: i64, d: &ModelDrift) {
        self.seq.push(seq);
        self.model.push(d.model.clone());
        self.version.push(d.model_version.clone());
        self.feature.push(d.feature.clone());
        self.ts.push(d.ts);
        self.psi.push(d.psi);
        self.ks.push(d.ks);
        self.psi_threshold.push(d.psi_threshold);
        self.ks_threshold.push(d.ks_threshold);
        self.alarm.push(d.alarm);
        self.window
            .push(i32::try_from(d.window).unwrap_or(i32::MAX));
        self.effective_window
            .push(i32::try_from(d.effective_window).unwrap_or(i32::MAX));
    }

    /// Stores the records of `device_id` (of `org_id`) in the batch's transaction; returns how
    /// many were new. Takes plain ids, not the ingest's identity type, so that telemetry may
    /// call ml without ml naming telemetry (the domains form a DAG).
    pub async fn insert(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        org_id: Uuid,
        device_id: Uuid,
        epoch: i64,
    ) -> Result<u64, sqlx::Error> {
        if self.seq.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(
            "INSERT INTO model_monitoring (org_id, device_id, epoch, seq, model, model_version, \
               feature, ts, psi, ks, psi_threshold, ks_threshold, alarm, window_size, effective_window) \
             SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::text[], \
               $8::timestamptz[], $9::float8[], $10::float8[], $11::float8[], $12::float8[], \
               $13::bool[], $14::int4[], $15::int4[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(org_id)
        .bind(device_id)
        .bind(epoch)
        .bind(&self.seq)
        .bind(&self.model)
        .bind(&self.version)
        .bind(&self.feature)
        .bind(&self.ts)
        .bind(&self.psi)
        .bind(&self.ks)
        .bind(&self.psi_threshold)
        .bind(&self.ks_threshold)
        .bind(&self.alarm)
        .bind(&self.window)
        .bind(&self.effective_window)
        .execute(&mut **tx)
        .await?
        .rows_affected())
    }
}

/// Query string of `GET .../model-monitoring`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MonitoringQuery {
    device_id: Option<Uuid>,
    model: Option<String>,
    version: Option<String>,
    feature: Option<String>,
    /// Only windows above a threshold (`true`) or below (`false`).
    alarm: Option<bool>,
    /// Inclusive start (RFC 3339).
    from: Option<DateTime<Utc>>,
    #[serde(default = "default_limit")]
    limit: i64,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

fn default_limit() -> i64 {
    1000
}

#[derive(sqlx::FromRow)]
struct Row {
    device_id: Uuid,
    epoch: i64,
    seq: i64,
    model: String,
    model_version: String,
    feature: String,
    ts: DateTime<Utc>,
    psi: f64,
    ks: f64,
    psi_threshold: f64,
    ks_threshold: f64,
    alarm: bool,
    window_size: i32,
    effective_window: i32,
}

impl From<Row> for ModelMonitoringRecord {
    fn from(r: Row) -> Self {
        Self {
            device_id: r.device_id,
            model: r.model,
            model_version: r.model_version,
            feature: r.feature,
            ts: r.ts,
            psi: r.psi,
            ks: r.ks,
            psi_threshold: r.psi_threshold,
            ks_threshold: r.ks_threshold,
            alarm: r.alarm,
            window: r.window_size,
            effective_window: r.effective_window,
        }
    }
}

/// `GET /v1/organisations/{org_id}/model-monitoring`: drift records, oldest first.
pub(super) async fn list(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<MonitoringQuery>, QueryRejection>,
) -> ApiResult<Json<ModelMonitoringPage>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if !(1..=10_000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 10000"));
    }
    for (field, v) in [
        ("model", &q.model),
        ("version", &q.version),
        ("feature", &q.feature),
    ] {
        if let Some(v) = v {
            pg_text(field, v, MAX_FILTER_BYTES)?;
        }
    }
    let (cts, cdev, cep, cseq) =
        match decode_record_cursor(q.cursor.as_deref(), "model-monitoring")? {
            Some((ts, dev, epoch, seq)) => (Some(ts), dev, epoch, seq),
            None => (None, Uuid::nil(), 0, 0),
        };
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT device_id, epoch, seq, model, model_version, feature, ts, psi, ks, \
                psi_threshold, ks_threshold, alarm, window_size, effective_window \
         FROM model_monitoring WHERE org_id = $1 \
           AND ($2::uuid IS NULL OR device_id = $2) AND ($3::text IS NULL OR model = $3) \
           AND ($4::text IS NULL OR model_version = $4) AND ($5::text IS NULL OR feature = $5) \
           AND ($6::bool IS NULL OR alarm = $6) AND ($7::timestamptz IS NULL OR ts >= $7) \
           AND ($8::timestamptz IS NULL OR (ts, device_id, epoch, seq) > ($8, $9, $10, $11)) \
         ORDER BY ts, device_id, epoch, seq LIMIT $12",
    )
    .bind(org_id)
    .bind(q.device_id)
    .bind(&q.model)
    .bind(&q.version)
    .bind(&q.feature)
    .bind(q.alarm)
    .bind(q.from)
    .bind(cts)
    .bind(cdev)
    .bind(cep)
    .bind(cseq)
    .bind(q.limit)
    .fetch_all(&pool)
    .await?;
    let next_cursor = (rows.len() as i64 == q.limit)
        .then(|| rows.last())
        .flatten()
        .map(|r| encode_record_cursor(r.ts, r.device_id, r.epoch, r.seq));
    Ok(Json(ModelMonitoringPage {
        records: rows.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

// ---------- fleet metrics ----------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftSeries {
    org: String,
    model: String,
    version: String,
    feature: String,
    /// `psi` or `ks`.
    statistic: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DriftFeature {
    org: String,
    model: String,
    version: String,
    feature: String,
}

/// `kip_model_drift*` (see the module invariants for their meaning and bound).
#[derive(Debug, Clone, Default)]
pub struct DriftMetrics {
    drift: Family<DriftSeries, Gauge<f64, AtomicU64>>,
    alarm_devices: Family<DriftFeature, Gauge>,
    dropped: Gauge,
}

impl DriftMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "model_drift",
            "Largest PSI or KS of a model feature over the devices' latest drift windows (last 24 h)",
            m.drift.clone(),
        );
        registry.register(
            "model_drift_alarm_devices",
            "Devices whose latest drift window of the feature is above its threshold",
            m.alarm_devices.clone(),
        );
        registry.register(
            "model_drift_series_dropped",
            "Model features left out of kip_model_drift by its cardinality bound",
            m.dropped.clone(),
        );
        m
    }
}

#[derive(sqlx::FromRow)]
struct Summary {
    org: String,
    model: String,
    version: String,
    feature: String,
    psi: f64,
    ks: f64,
    alarms: i64,
    total: i64,
}

/// Recomputes the drift metrics from the latest window of every (device, model feature).
pub async fn refresh(pool: &PgPool, m: &DriftMetrics) -> Result<(), sqlx::Error> {
    let rows: Vec<Summary> = sqlx::query_as(
        "WITH latest AS ( \
           SELECT DISTINCT ON (org_id, model, model_version, feature, device_id) \
                  org_id, model, model_version, feature, psi, ks, alarm \
           FROM model_monitoring WHERE ts > now() - make_interval(secs => $1) \
           ORDER BY org_id, model, model_version, feature, device_id, ts DESC, epoch DESC, seq DESC), \
         grouped AS ( \
           SELECT o.name AS org, l.model, l.model_version AS version, l.feature, \
                  max(l.psi) AS psi, max(l.ks) AS ks, count(*) FILTER (WHERE l.alarm) AS alarms \
           FROM latest l JOIN organisations o ON o.id = l.org_id \
           GROUP BY o.name, l.model, l.model_version, l.feature) \
         SELECT *, count(*) OVER () AS total FROM grouped \
         ORDER BY alarms DESC, psi DESC, org, model, version, feature LIMIT $2",
    )
    .bind(METRIC_MAX_AGE_S as f64)
    .bind(MAX_METRIC_FEATURES)
    .fetch_all(pool)
    .await?;
    m.drift.clear();
    m.alarm_devices.clear();
    let total = rows.first().map_or(0, |r| r.total);
    m.dropped.set(total.saturating_sub(rows.len() as i64));
    for r in rows {
        for (statistic, v) in [("psi", r.psi), ("ks", r.ks)] {
            m.drift
                .get_or_create(&DriftSeries {
                    org: r.org.clone(),
                    model: r.model.clone(),
                    version: r.version.clone(),
                    feature: r.feature.clone(),
                    statistic,
                })
                .set(v);
        }
        m.alarm_devices
            .get_or_create(&DriftFeature {
                org: r.org,
                model: r.model,
                version: r.version,
                feature: r.feature,
            })
            .set(r.alarms);
    }
    Ok(())
}

/// Refreshes the drift metrics every `interval` until `token` is cancelled.
pub fn spawn_refresh(
    pool: PgPool,
    interval: Duration,
    metrics: DriftMetrics,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = refresh(&pool, &metrics).await {
                tracing::warn!(error = %e, "model drift metrics refresh failed");
            }
        }
    });
}
