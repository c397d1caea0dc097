//! Comparing model versions during a canary or shadow rollout: the per-model inference
//! statistics agents sync (`model_stats` records -> `model_inference_stats`), the comparison
//! report per rollout (`GET /v1/organisations/{org_id}/model-rollouts/{rollout_id}/report`),
//! and the evaluator that halts a rollout whose candidate crosses a threshold.
//!
//! Invariants:
//! - The report covers the devices the rollout selects, from the rollout's start on; every
//!   query filters by the `org_id` checked by [`Principal::org_scope`] (a rollout of another
//!   organisation is a 404).
//! - Ground truth is the machine's next `failure` maintenance event at or after a prediction:
//!   its RUL is the number of later predictions of the same device, machine, version and role
//!   up to the failure (one prediction per completed cycle), capped at `rul_cap_cycles`.
//!   Predictions with no later failure have no truth yet and are not scored.
//! - Agreement pairs a champion and a shadow prediction of the same device, machine and
//!   timestamp (the agent runs both on one feature computation of one cycle).
//! - The evaluator ([`spawn_evaluator`]) runs on the one tracker and token; a crossing halts
//!   the rollout through [`crate::models::auto_halt`] (state and event in one transaction)
//!   and counts `kip_model_rollout_auto_halts_total{reason}` (reason is one of four values).

use std::time::Duration;

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use kip_api::{Agreement, ModelRollout, RolloutReport, VersionReport};
use kip_shared::ModelStats;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::http::{ApiPath, ApiResult, Principal};
use crate::models::Crossing;

/// The `model_stats` records of one batch, as columns for one `UNNEST` insert.
#[derive(Debug, Default)]
pub struct StatsColumns {
    seq: Vec<i64>,
    model: Vec<String>,
    version: Vec<String>,
    role: Vec<&'static str>,
    ts: Vec<DateTime<Utc>>,
    predictions: Vec<i64>,
    failures: Vec<i64>,
    p50: Vec<Option<f64>>,
    p99: Vec<Option<f64>>,
    max: Vec<Option<f64>>,
}

impl StatsColumns {
    /// Adds the record at `seq` (already checked by the batch decoder).
    pub fn push(&mut self, seq: i64, s: &ModelStats) {
        self.seq.push(seq);
        self.model.push(s.model.clone());
        self.version.push(s.model_version.clone());
        self.role.push(s.role.as_str());
        self.ts.push(s.ts);
        self.predictions
            .push(i64::try_from(s.predictions).unwrap_or(i64::MAX));
        self.failures
            .push(i64::try_from(s.failures).unwrap_or(i64::MAX));
        self.p50.push(s.latency_p50_us);
        self.p99.push(s.latency_p99_us);
        self.max.push(s.latency_max_us);
    }

    /// Stores the records of `device_id` (of `org_id`) in the batch's transaction, keyed by
    /// `(device_id, epoch, seq)` (a replay stores nothing); returns how many were new.
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
            "INSERT INTO model_inference_stats (org_id, device_id, epoch, seq, model, model_version, \
               role, ts, predictions, failures, latency_p50_us, latency_p99_us, latency_max_us) \
             SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::text[], \
               $8::timestamptz[], $9::int8[], $10::int8[], $11::float8[], $12::float8[], $13::float8[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(org_id)
        .bind(device_id)
        .bind(epoch)
        .bind(&self.seq)
        .bind(&self.model)
        .bind(&self.version)
        .bind(&self.role)
        .bind(&self.ts)
        .bind(&self.predictions)
        .bind(&self.failures)
        .bind(&self.p50)
        .bind(&self.p99)
        .bind(&self.max)
        .execute(&mut **tx)
        .await?
        .rows_affected())
    }
}

/// `reason` label of `kip_model_rollout_auto_halts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HaltLabels {
    pub reason: &'static str,
}

/// Rollout metrics.
#[derive(Debug, Clone, Default)]
pub struct RolloutMetrics {
    /// Rollouts halted (and rolled back) by the evaluator, by the threshold crossed.
    pub auto_halts: Family<HaltLabels, Counter>,
}

impl RolloutMetrics {
    /// Creates and registers the metrics (the registry adds the `kip_` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "model_rollout_auto_halts",
            "Model rollouts halted and rolled back automatically, by the threshold crossed \
             (reason: error, drift, inference_failures, latency)",
            m.auto_halts.clone(),
        );
        m
    }
}

/// `name@version` split in two.
fn split_model(m: &str) -> (&str, &str) {
    m.split_once('@').unwrap_or((m, ""))
}

/// How `version` of `name` did on `devices` since `since`.
async fn version_report(
    conn: &mut sqlx::PgConnection,
    org_id: Uuid,
    devices: &[Uuid],
    since: DateTime<Utc>,
    model: &str,
    rul_cap: f64,
) -> Result<VersionReport, sqlx::Error> {
    let (name, version) = split_model(model);
    let (champion, shadow): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE role = 'champion'), count(*) FILTER (WHERE role = 'shadow') \
         FROM predictions WHERE org_id = $1 AND device_id = ANY($2) AND ts >= $3 \
           AND model_version = $4 AND (model IS NULL OR model = $5)",
    )
    .bind(org_id)
    .bind(devices)
    .bind(since)
    .bind(version)
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    // Each prediction's next failure; truth = later predictions of the same series up to it.
    let (truth_samples, rmse, mean_error): (i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "WITH p AS ( \
           SELECT p.device_id, p.machine, p.role, p.ts, p.epoch, p.seq, p.rul_cycles, f.fail_ts \
           FROM predictions p \
           CROSS JOIN LATERAL (SELECT min(e.ts) AS fail_ts FROM maintenance_events e \
                                WHERE e.org_id = p.org_id AND e.device_id = p.device_id \
                                  AND e.machine = p.machine AND e.kind = 'failure' \
                                  AND e.ts >= p.ts) f \
           WHERE p.org_id = $1 AND p.device_id = ANY($2) AND p.ts >= $3 \
             AND p.model_version = $4 AND (p.model IS NULL OR p.model = $5) \
             AND f.fail_ts IS NOT NULL), \
         t AS ( \
           SELECT rul_cycles, \
                  count(*) OVER w - row_number() OVER (w ORDER BY ts, epoch, seq) AS truth \
           FROM p WINDOW w AS (PARTITION BY device_id, machine, role, fail_ts)) \
         SELECT count(*), sqrt(avg(power(rul_cycles - least(truth, $6), 2))), \
                avg(rul_cycles - least(truth, $6)) FROM t",
    )
    .bind(org_id)
    .bind(devices)
    .bind(since)
    .bind(version)
    .bind(name)
    .bind(rul_cap)
    .fetch_one(&mut *conn)
    .await?;
    let (failures, p50, p99): (Option<i64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT sum(failures)::int8, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_p50_us), max(latency_p99_us) \
         FROM model_inference_stats WHERE org_id = $1 AND device_id = ANY($2) AND ts >= $3 \
           AND model_version = $4 AND model = $5",
    )
    .bind(org_id)
    .bind(devices)
    .bind(since)
    .bind(version)
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    let (alarms, max_psi): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE alarm), max(psi) FROM ( \
           SELECT DISTINCT ON (device_id, feature) alarm, psi FROM model_monitoring \
           WHERE org_id = $1 AND device_id = ANY($2) AND ts >= $3 \
             AND model_version = $4 AND model = $5 \
           ORDER BY device_id, feature, ts DESC, epoch DESC, seq DESC) latest",
    )
    .bind(org_id)
    .bind(devices)
    .bind(since)
    .bind(version)
    .bind(name)
    .fetch_one(&mut *conn)
    .await?;
    Ok(VersionReport {
        model: model.to_owned(),
        predictions_champion: champion,
        predictions_shadow: shadow,
        truth_samples,
        rmse_cycles: rmse,
        mean_error_cycles: mean_error,
        inference_failures: failures.unwrap_or(0),
        latency_p50_us: p50,
        latency_p99_us: p99,
        drift_alarms: alarms,
        drift_max_psi: max_psi,
    })
}

/// The comparison report of `rollout` (already scoped to its organisation).
///
/// Its queries read one snapshot (a read-only repeatable-read transaction): predictions keep
/// arriving while it runs, and counts taken at different moments contradicted each other (more
/// agreement pairs than shadow predictions).
pub async fn report(pool: &PgPool, rollout: ModelRollout) -> Result<RolloutReport, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let org_id = rollout.org_id;
    let devices: Vec<Uuid> = rollout.devices.iter().map(|d| d.device_id).collect();
    let since = rollout.created_at;
    let t = &rollout.thresholds;
    let candidate = version_report(
        &mut tx,
        org_id,
        &devices,
        since,
        &rollout.model,
        t.rul_cap_cycles,
    )
    .await?;
    let baseline = version_report(
        &mut tx,
        org_id,
        &devices,
        since,
        &rollout.baseline_model,
        t.rul_cap_cycles,
    )
    .await?;
    let (_, cand_version) = split_model(&rollout.model);
    let (_, base_version) = split_model(&rollout.baseline_model);
    let (pairs, mad, within): (i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*), avg(abs(c.rul_cycles - b.rul_cycles)), \
                avg((abs(c.rul_cycles - b.rul_cycles) <= $6)::int::float8) \
         FROM predictions c JOIN predictions b \
           ON b.org_id = c.org_id AND b.device_id = c.device_id AND b.machine = c.machine \
          AND b.ts = c.ts AND b.role <> c.role \
         WHERE c.org_id = $1 AND c.device_id = ANY($2) AND c.ts >= $3 AND b.ts >= $3 \
           AND c.model_version = $4 AND b.model_version = $5",
    )
    .bind(org_id)
    .bind(&devices)
    .bind(since)
    .bind(cand_version)
    .bind(base_version)
    .bind(t.agreement_tolerance_cycles)
    .fetch_one(&mut *tx)
    .await?;
    let agreement = Agreement {
        pairs,
        mean_abs_diff_cycles: mad,
        within_tolerance_share: within,
        tolerance_cycles: t.agreement_tolerance_cycles,
    };
    tx.commit().await?;
    let crossed = crossings(&rollout, &candidate)
        .into_iter()
        .map(|c| format!("{}: {}", c.reason, c.detail))
        .collect();
    Ok(RolloutReport {
        rollout,
        candidate,
        baseline,
        agreement,
        crossed,
    })
}

/// The thresholds of `rollout` that `candidate` crosses, in a fixed order (error, drift,
/// inference failures, latency).
pub fn crossings(rollout: &ModelRollout, candidate: &VersionReport) -> Vec<Crossing> {
    let t = &rollout.thresholds;
    let mut out = Vec::new();
    if let (Some(max), Some(rmse)) = (t.max_rmse_cycles, candidate.rmse_cycles)
        && candidate.truth_samples >= i64::from(t.min_truth_samples)
        && rmse > max
    {
        out.push(Crossing {
            reason: "error",
            detail: format!(
                "RMSE {rmse:.2} cycles over {} predictions with ground truth > {max}",
                candidate.truth_samples
            ),
            observed: rmse,
            threshold: max,
        });
    }
    if let Some(max) = t.max_drift_alarms
        && candidate.drift_alarms > i64::from(max)
    {
        out.push(Crossing {
            reason: "drift",
            detail: format!(
                "{} drift windows above threshold > {max}",
                candidate.drift_alarms
            ),
            observed: candidate.drift_alarms as f64,
            threshold: f64::from(max),
        });
    }
    if let Some(max) = t.max_inference_failures
        && candidate.inference_failures > i64::try_from(max).unwrap_or(i64::MAX)
    {
        out.push(Crossing {
            reason: "inference_failures",
            detail: format!("{} failed inferences > {max}", candidate.inference_failures),
            observed: candidate.inference_failures as f64,
            threshold: max as f64,
        });
    }
    if let (Some(max_ms), Some(p99_us)) = (t.max_latency_p99_ms, candidate.latency_p99_us)
        && p99_us / 1000.0 > max_ms
    {
        out.push(Crossing {
            reason: "latency",
            detail: format!("p99 latency {:.3} ms > {max_ms} ms", p99_us / 1000.0),
            observed: p99_us / 1000.0,
            threshold: max_ms,
        });
    }
    out
}

/// `GET /v1/organisations/{org_id}/model-rollouts/{rollout_id}/report`.
pub(super) async fn get_report(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<RolloutReport>> {
    let org_id = p.org_scope(org_id)?;
    let rollout = crate::models::model_rollout(&pool, org_id, rollout_id).await?;
    Ok(Json(report(&pool, rollout).await?))
}

/// Judges every active rollout once: halts (and rolls back) those whose candidate crosses a
/// threshold, the first crossing in [`crossings`] order being the recorded reason.
pub async fn evaluate_once(pool: &PgPool, metrics: &RolloutMetrics) -> Result<(), sqlx::Error> {
    for (org_id, rollout_id) in crate::models::active_rollouts(pool).await? {
        let rollout = match crate::models::model_rollout(pool, org_id, rollout_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%org_id, %rollout_id, error = %e, "rollout not readable");
                continue;
            }
        };
        let report = report(pool, rollout).await?;
        match crossings(&report.rollout, &report.candidate).first() {
            Some(c) => {
                if crate::models::auto_halt(pool, org_id, rollout_id, c).await? {
                    metrics
                        .auto_halts
                        .get_or_create(&HaltLabels { reason: c.reason })
                        .inc();
                }
            }
            None => crate::models::mark_evaluated(pool, org_id, rollout_id).await?,
        }
    }
    Ok(())
}

/// Evaluates the active rollouts every `interval` until `token` is cancelled.
pub fn spawn_evaluator(
    pool: PgPool,
    interval: Duration,
    metrics: RolloutMetrics,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = evaluate_once(&pool, &metrics).await {
                tracing::warn!(error = %e, "model rollout evaluation failed; retried next interval");
            }
        }
    });
}
