//! Canary and shadow rollouts of a model version to a share of a device group
//! (`/v1/organisations/{org_id}/model-rollouts`), their events, and the halt that rolls the
//! selected devices back.
//!
//! Invariants:
//! - Selection is the agent releases' deterministic bucket, `release_bucket(model id, device
//!   id) < percent` (SQL, migration 0130; one function for both kinds of rollout): the set
//!   never changes while a rollout runs, and grows (never shrinks) with the percentage.
//! - A selected device runs both versions on the same features: `canary` serves the candidate
//!   and shadows the baseline, `shadow` serves the baseline and shadows the candidate
//!   (`registry::desired_for` / `desired_shadow_for`). A device with its own desired-model row
//!   is pinned and runs no rollout.
//! - Starting a rollout sets the group's own desired model (`desired_models` row for the
//!   selector) to the baseline, so devices not selected, and every selected device once the
//!   rollout is no longer active (halted, rolled back), run the baseline: rollback is one
//!   state change, effective at each device's next sync.
//! - At most one active rollout per (organisation, selector) (a partial unique index).
//! - Every state change writes a `model_rollout_events` row in the same transaction; an
//!   automatic halt names the threshold crossed ([`auto_halt`]).
//! - Rollouts of `origin = 'mlflow'` are the MLflow `challenger` alias's ([`follow_challenger`]):
//!   a shadow rollout of the challenger on each device group whose desired model is another
//!   version of the same name. The poller starts and ends only those; it ends them with a
//!   `halt_reason` starting with `mlflow`, and never restarts one that kip ended (automatic
//!   halt, halt or promotion by hand) for the same group, candidate and baseline.

use axum::{Json, http::StatusCode};
use chrono::{DateTime, Utc};
use kip_api::{
    ModelRollout, ModelRolloutEvent, RolloutDevice, RolloutThresholds, SetRolloutPercent,
    StartModelRollout,
};
use sqlx::PgPool;
use uuid::Uuid;

use super::registry::{check_rollable, set_desired_model_for_group};
use crate::http::{ApiError, ApiJson, ApiPath, ApiResult, Principal, pg_json};

#[derive(sqlx::FromRow)]
struct RolloutRow {
    id: Uuid,
    org_id: Uuid,
    model_id: Uuid,
    model: String,
    baseline_model_id: Uuid,
    baseline_model: String,
    selector: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
    percent: i32,
    mode: String,
    origin: String,
    state: String,
    thresholds: sqlx::types::Json<RolloutThresholds>,
    halt_reason: Option<String>,
    last_evaluated_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<RolloutRow> for ModelRollout {
    fn from(r: RolloutRow) -> Self {
        Self {
            id: r.id,
            org_id: r.org_id,
            model_id: r.model_id,
            model: r.model,
            baseline_model_id: r.baseline_model_id,
            baseline_model: r.baseline_model,
            selector: r.selector.0,
            percent: u8::try_from(r.percent).unwrap_or(100),
            mode: r.mode,
            origin: r.origin,
            state: r.state,
            thresholds: r.thresholds.0,
            halt_reason: r.halt_reason,
            last_evaluated_at: r.last_evaluated_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            devices: Vec::new(),
            events: Vec::new(),
        }
    }
}

const ROLLOUT_SELECT: &str = "\
    SELECT r.id, r.org_id, r.model_id, m.name || '@' || m.version AS model, r.baseline_model_id, \
           b.name || '@' || b.version AS baseline_model, r.selector, r.percent, r.mode, r.origin, r.state, \
           r.thresholds, r.halt_reason, r.last_evaluated_at, r.created_at, r.updated_at \
    FROM model_rollouts r \
    JOIN ai_models m ON m.org_id = r.org_id AND m.id = r.model_id \
    JOIN ai_models b ON b.org_id = r.org_id AND b.id = r.baseline_model_id \
    WHERE r.org_id = $1 AND ($2::uuid IS NULL OR r.id = $2) \
    ORDER BY r.created_at DESC LIMIT 200";

#[derive(sqlx::FromRow)]
struct EventRow {
    ts: DateTime<Utc>,
    kind: String,
    reason: Option<String>,
    detail: String,
    observed: Option<f64>,
    threshold: Option<f64>,
    devices: Option<i32>,
}

/// The rollout `rollout_id` of `org_id` (the caller checked the organisation) with the
/// devices it selects and its events; 404 when it is not this organisation's.
pub async fn rollout(pool: &PgPool, org_id: Uuid, rollout_id: Uuid) -> ApiResult<ModelRollout> {
    let row: RolloutRow = sqlx::query_as(ROLLOUT_SELECT)
        .bind(org_id)
        .bind(Some(rollout_id))
        .fetch_optional(pool)
        .await?
        .ok_or(ApiError::NotFound("model rollout"))?;
    let mut r = ModelRollout::from(row);
    r.devices = selected_devices(pool, org_id, rollout_id).await?;
    let events: Vec<EventRow> = sqlx::query_as(
        "SELECT ts, kind, reason, detail, observed, threshold, devices FROM model_rollout_events \
         WHERE org_id = $1 AND rollout_id = $2 ORDER BY ts, id LIMIT 1000",
    )
    .bind(org_id)
    .bind(rollout_id)
    .fetch_all(pool)
    .await?;
    r.events = events
        .into_iter()
        .map(|e| ModelRolloutEvent {
            ts: e.ts,
            kind: e.kind,
            reason: e.reason,
            detail: e.detail,
            observed: e.observed,
            threshold: e.threshold,
            devices: e.devices,
        })
        .collect();
    Ok(r)
}

/// The newest rollouts of `org_id` (without devices and events).
pub async fn rollouts(pool: &PgPool, org_id: Uuid) -> Result<Vec<ModelRollout>, sqlx::Error> {
    let rows: Vec<RolloutRow> = sqlx::query_as(ROLLOUT_SELECT)
        .bind(org_id)
        .bind(None::<Uuid>)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The devices the rollout selects now (group members below its percentage, not pinned).
async fn selected_devices(
    pool: &PgPool,
    org_id: Uuid,
    rollout_id: Uuid,
) -> Result<Vec<RolloutDevice>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT d.id, d.name, release_bucket(r.model_id, d.id) FROM model_rollouts r \
         JOIN devices d ON d.org_id = r.org_id AND d.labels @> r.selector \
         WHERE r.org_id = $1 AND r.id = $2 AND release_bucket(r.model_id, d.id) < r.percent \
           AND NOT EXISTS (SELECT 1 FROM desired_models dm \
                            WHERE dm.org_id = d.org_id AND dm.device_id = d.id) \
         ORDER BY d.name LIMIT 10000",
    )
    .bind(org_id)
    .bind(rollout_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(device_id, device_name, bucket)| RolloutDevice {
            device_id,
            device_name,
            bucket,
        })
        .collect())
}

/// Every active rollout of every organisation, as (org, rollout), for the evaluator.
pub async fn active_rollouts(pool: &PgPool) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT org_id, id FROM model_rollouts WHERE state = 'active' ORDER BY created_at LIMIT 1000",
    )
    .fetch_all(pool)
    .await
}

/// Notes that the evaluator judged the rollout and found no threshold crossed.
pub async fn mark_evaluated(
    pool: &PgPool,
    org_id: Uuid,
    rollout_id: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE model_rollouts SET last_evaluated_at = now() WHERE org_id = $1 AND id = $2",
    )
    .bind(org_id)
    .bind(rollout_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// A threshold the candidate crossed.
#[derive(Debug, Clone)]
pub struct Crossing {
    /// `error`, `drift`, `inference_failures` or `latency` (the metric's `reason` label).
    pub reason: &'static str,
    pub detail: String,
    pub observed: f64,
    pub threshold: f64,
}

/// Halts an active rollout because `crossing` happened: state `rolled_back`, the selected
/// devices go back to the baseline at their next sync, and an `auto_halted` event records the
/// reason. Returns false when the rollout was no longer active (nothing changed).
pub async fn auto_halt(
    pool: &PgPool,
    org_id: Uuid,
    rollout_id: Uuid,
    crossing: &Crossing,
) -> Result<bool, sqlx::Error> {
    let devices = selected_devices(pool, org_id, rollout_id).await?.len();
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE model_rollouts SET state = 'rolled_back', halt_reason = $3, \
                last_evaluated_at = now(), updated_at = now() \
         WHERE org_id = $1 AND id = $2 AND state = 'active'",
    )
    .bind(org_id)
    .bind(rollout_id)
    .bind(format!("{}: {}", crossing.reason, crossing.detail))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Ok(false);
    }
    insert_event(
        &mut tx,
        org_id,
        rollout_id,
        "auto_halted",
        Some(crossing.reason),
        &crossing.detail,
        Some((crossing.observed, crossing.threshold)),
        Some(devices),
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(%org_id, %rollout_id, reason = crossing.reason, detail = %crossing.detail, devices, "model rollout halted automatically; devices roll back to the baseline");
    Ok(true)
}

#[expect(clippy::too_many_arguments, reason = "one column each")]
async fn insert_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    org_id: Uuid,
    rollout_id: Uuid,
    kind: &str,
    reason: Option<&str>,
    detail: &str,
    values: Option<(f64, f64)>,
    devices: Option<usize>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO model_rollout_events (id, org_id, rollout_id, kind, reason, detail, observed, threshold, devices) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(rollout_id)
    .bind(kind)
    .bind(reason)
    .bind(detail)
    .bind(values.map(|v| v.0))
    .bind(values.map(|v| v.1))
    .bind(devices.map(|d| i32::try_from(d).unwrap_or(i32::MAX)))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(super) fn check_thresholds(t: &RolloutThresholds) -> ApiResult<()> {
    let finite_non_negative = |field: &str, v: Option<f64>| match v {
        Some(x) if !x.is_finite() || x < 0.0 => {
            Err(ApiError::validation(field, "must be a finite number >= 0"))
        }
        _ => Ok(()),
    };
    finite_non_negative("thresholds.max_rmse_cycles", t.max_rmse_cycles)?;
    finite_non_negative("thresholds.max_latency_p99_ms", t.max_latency_p99_ms)?;
    finite_non_negative(
        "thresholds.agreement_tolerance_cycles",
        Some(t.agreement_tolerance_cycles),
    )?;
    if !t.rul_cap_cycles.is_finite() || t.rul_cap_cycles <= 0.0 {
        return Err(ApiError::validation(
            "thresholds.rul_cap_cycles",
            "must be a finite number > 0",
        ));
    }
    if t.max_inference_failures
        .is_some_and(|f| i64::try_from(f).is_err())
    {
        return Err(ApiError::validation(
            "thresholds.max_inference_failures",
            "is too large",
        ));
    }
    Ok(())
}

/// `POST /v1/organisations/{org_id}/model-rollouts`: starts a canary or shadow rollout.
pub async fn start(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<StartModelRollout>,
) -> ApiResult<(StatusCode, Json<ModelRollout>)> {
    let org_id = p.org_scope(org_id)?;
    if body.mode != "canary" && body.mode != "shadow" {
        return Err(ApiError::validation("mode", "must be canary or shadow"));
    }
    if !(1..=100).contains(&body.percent) {
        return Err(ApiError::validation("percent", "must be 1 to 100"));
    }
    if body.selector.is_empty() {
        return Err(ApiError::validation(
            "selector",
            "must name at least one label",
        ));
    }
    let selector = serde_json::Value::Object(body.selector.clone());
    pg_json("selector", &selector, 4096)?;
    check_thresholds(&body.thresholds)?;
    check_rollable(&pool, org_id, body.model_id).await?;
    let baseline = match body.baseline_model_id {
        Some(b) => b,
        None => default_baseline(&pool, org_id, body.model_id, &selector)
            .await?
            .ok_or_else(|| {
                ApiError::validation(
                    "baseline_model_id",
                    "no earlier version of this model with an artifact; name the baseline",
                )
            })?,
    };
    if baseline == body.model_id {
        return Err(ApiError::validation(
            "baseline_model_id",
            "must differ from the candidate",
        ));
    }
    check_rollable(&pool, org_id, baseline)
        .await
        .map_err(|_| ApiError::validation("baseline_model_id", "no such model with an artifact"))?;
    // The group's own desired model becomes the baseline: what unselected devices run, and
    // what every selected device falls back to when the rollout stops.
    set_desired_model_for_group(&pool, org_id, &body.selector, Some(baseline)).await?;
    let id = Uuid::new_v4();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO model_rollouts (id, org_id, model_id, baseline_model_id, selector, percent, mode, state, thresholds) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8)",
    )
    .bind(id)
    .bind(org_id)
    .bind(body.model_id)
    .bind(baseline)
    .bind(&selector)
    .bind(i32::from(body.percent))
    .bind(&body.mode)
    .bind(sqlx::types::Json(&body.thresholds))
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(ApiError::Conflict(
                "another model rollout to this device group is active; promote or halt it first"
                    .into(),
            ));
        }
        r => {
            r?;
        }
    }
    let detail = format!("{} {}%", body.mode, body.percent);
    insert_event(&mut tx, org_id, id, "started", None, &detail, None, None).await?;
    tx.commit().await?;
    tracing::info!(%org_id, rollout_id = %id, model_id = %body.model_id, baseline = %baseline, mode = %body.mode, percent = body.percent, "model rollout started");
    Ok((StatusCode::CREATED, Json(rollout(&pool, org_id, id).await?)))
}

/// The group's current desired model when it is another version, else the newest earlier
/// version of the candidate's name with an artifact.
async fn default_baseline(
    pool: &PgPool,
    org_id: Uuid,
    model_id: Uuid,
    selector: &serde_json::Value,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce( \
           (SELECT dm.model_id FROM desired_models dm \
             WHERE dm.org_id = $1 AND dm.selector = $3 AND dm.model_id <> $2), \
           (SELECT p.id FROM ai_models c \
              JOIN ai_models p ON p.org_id = c.org_id AND p.name = c.name \
                   AND (p.created_at, p.id) < (c.created_at, c.id) \
             WHERE c.org_id = $1 AND c.id = $2 \
               AND EXISTS (SELECT 1 FROM model_artifacts a WHERE a.org_id = p.org_id AND a.model_id = p.id) \
             ORDER BY p.created_at DESC, p.id DESC LIMIT 1))",
    )
    .bind(org_id)
    .bind(model_id)
    .bind(selector)
    .fetch_one(pool)
    .await
}

/// `GET /v1/organisations/{org_id}/model-rollouts`: newest first.
pub async fn list(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<ModelRollout>>> {
    let org_id = p.org_scope(org_id)?;
    Ok(Json(rollouts(&pool, org_id).await?))
}

/// `GET /v1/organisations/{org_id}/model-rollouts/{rollout_id}`.
pub async fn get(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ModelRollout>> {
    let org_id = p.org_scope(org_id)?;
    Ok(Json(rollout(&pool, org_id, rollout_id).await?))
}

/// The state of an existing rollout of `org_id`; 404 otherwise.
async fn state_of(pool: &PgPool, org_id: Uuid, rollout_id: Uuid) -> ApiResult<String> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT state FROM model_rollouts WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(rollout_id)
            .fetch_optional(pool)
            .await?;
    s.ok_or(ApiError::NotFound("model rollout"))
}

/// `POST .../model-rollouts/{rollout_id}/percent`: changes the selected share of an active
/// rollout (the devices a smaller share selected stay selected when it grows).
pub async fn set_percent(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<SetRolloutPercent>,
) -> ApiResult<Json<ModelRollout>> {
    let org_id = p.org_scope(org_id)?;
    if !(1..=100).contains(&body.percent) {
        return Err(ApiError::validation("percent", "must be 1 to 100"));
    }
    let state = state_of(&pool, org_id, rollout_id).await?;
    if state != "active" {
        return Err(ApiError::Conflict(format!(
            "the rollout is {state}; only an active rollout changes its share"
        )));
    }
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE model_rollouts SET percent = $3, updated_at = now() \
         WHERE org_id = $1 AND id = $2 AND state = 'active'",
    )
    .bind(org_id)
    .bind(rollout_id)
    .bind(i32::from(body.percent))
    .execute(&mut *tx)
    .await?;
    let detail = format!("{}%", body.percent);
    insert_event(
        &mut tx, org_id, rollout_id, "percent", None, &detail, None, None,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%org_id, %rollout_id, percent = body.percent, "model rollout share changed");
    Ok(Json(rollout(&pool, org_id, rollout_id).await?))
}

/// `POST .../model-rollouts/{rollout_id}/promote`: the candidate becomes the group's model
/// (every device of the group, no shadow) and the rollout ends.
pub async fn promote(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ModelRollout>> {
    let org_id = p.org_scope(org_id)?;
    let r = rollout(&pool, org_id, rollout_id).await?;
    if r.state != "active" {
        return Err(ApiError::Conflict(format!(
            "the rollout is {}; only an active rollout can be promoted",
            r.state
        )));
    }
    set_desired_model_for_group(&pool, org_id, &r.selector, Some(r.model_id)).await?;
    finish(&pool, org_id, rollout_id, "promoted", "promoted", &r.model).await?;
    Ok(Json(rollout(&pool, org_id, rollout_id).await?))
}

/// `POST .../model-rollouts/{rollout_id}/halt`: stops an active rollout by hand; its devices
/// go back to the baseline.
pub async fn halt(
    axum::extract::State(pool): axum::extract::State<PgPool>,
    p: Principal,
    ApiPath((org_id, rollout_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<ModelRollout>> {
    let org_id = p.org_scope(org_id)?;
    let state = state_of(&pool, org_id, rollout_id).await?;
    if state != "active" {
        return Err(ApiError::Conflict(format!(
            "the rollout is {state}; it cannot halt"
        )));
    }
    finish(
        &pool,
        org_id,
        rollout_id,
        "halted",
        "halted",
        "halted by hand",
    )
    .await?;
    Ok(Json(rollout(&pool, org_id, rollout_id).await?))
}

/// Ends an active rollout in `state`, with an event of `kind`.
async fn finish(
    pool: &PgPool,
    org_id: Uuid,
    rollout_id: Uuid,
    state: &str,
    kind: &str,
    detail: &str,
) -> ApiResult<()> {
    let mut tx = pool.begin().await?;
    let changed = sqlx::query(
        "UPDATE model_rollouts SET state = $3, updated_at = now() \
         WHERE org_id = $1 AND id = $2 AND state = 'active'",
    )
    .bind(org_id)
    .bind(rollout_id)
    .bind(state)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(ApiError::Conflict("the rollout is no longer active".into()));
    }
    insert_event(&mut tx, org_id, rollout_id, kind, None, detail, None, None).await?;
    tx.commit().await?;
    tracing::info!(%org_id, %rollout_id, state, "model rollout ended");
    Ok(())
}

/// What the MLflow `challenger` alias of a model name names in one organisation.
#[derive(Debug, Clone)]
pub struct Challenger {
    /// The kip version the alias names (it has an uploaded artifact).
    pub model_id: Uuid,
    /// `name@version`, for events.
    pub model: String,
    /// The MLflow version number the alias names.
    pub mlflow_version: String,
    /// Share of each group that runs the shadow (the version's `kip.rollout.percent` tag,
    /// default 100).
    pub percent: u8,
    /// From the version's `kip.rollout.*` tags, checked like the API's.
    pub thresholds: RolloutThresholds,
}

/// An active MLflow rollout of the name, with the model its group wants now (`None`: the
/// group no longer has a desired model).
#[derive(sqlx::FromRow)]
struct MlflowRollout {
    id: Uuid,
    model_id: Uuid,
    baseline_model_id: Uuid,
    group_model_id: Option<Uuid>,
    group_model: Option<String>,
}

/// Makes the `origin = 'mlflow'` rollouts of `org_id` for model `name` match the MLflow
/// `challenger` alias, inside `tx` (the caller holds the row locks of the name's versions):
/// - each device group (a `desired_models` selector) whose model is another version of
///   `name` runs `challenger` as a 100 % (or `percent`) shadow rollout beside it, unless the
///   group has another active rollout (one started through the API keeps its group) or kip
///   ended this same (group, challenger, baseline) rollout itself (automatic halt, halt or
///   promotion by hand: moving the alias is what starts it again);
/// - an active MLflow rollout whose challenger or baseline is no longer what MLflow and the
///   group say is ended: `promoted` when the group now runs its candidate (the `champion`
///   alias moved to the challenger), else `halted`; its `halt_reason` starts with `mlflow`.
///
/// Returns one line per change (for the audit log and the log).
pub async fn follow_challenger(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    org_id: Uuid,
    name: &str,
    challenger: Option<&Challenger>,
) -> Result<Vec<String>, sqlx::Error> {
    let mut changes = Vec::new();
    let active: Vec<MlflowRollout> = sqlx::query_as(
        "SELECT r.id, r.model_id, r.baseline_model_id, dm.model_id AS group_model_id, \
                gm.name || '@' || gm.version AS group_model \
         FROM model_rollouts r \
         JOIN ai_models m ON m.org_id = r.org_id AND m.id = r.model_id \
         LEFT JOIN desired_models dm ON dm.org_id = r.org_id AND dm.selector = r.selector \
         LEFT JOIN ai_models gm ON gm.org_id = dm.org_id AND gm.id = dm.model_id \
         WHERE r.org_id = $1 AND r.state = 'active' AND r.origin = 'mlflow' AND m.name = $2 \
         ORDER BY r.created_at LIMIT 1000",
    )
    .bind(org_id)
    .bind(name)
    .fetch_all(&mut **tx)
    .await?;
    for r in active {
        let end = match (challenger, r.group_model_id) {
            (_, None) => Some((
                "halted",
                "the group has no desired model any more".to_owned(),
            )),
            (_, Some(g)) if g == r.model_id => Some((
                "promoted",
                format!(
                    "the group runs the challenger {} (alias champion moved to it)",
                    r.group_model.as_deref().unwrap_or_default()
                ),
            )),
            (None, _) => Some(("halted", "alias challenger removed".to_owned())),
            (Some(c), _) if c.model_id != r.model_id => Some((
                "halted",
                format!(
                    "alias challenger moved to v{} ({})",
                    c.mlflow_version, c.model
                ),
            )),
            (Some(_), Some(g)) if g != r.baseline_model_id => Some((
                "halted",
                format!(
                    "the group's champion is now {}",
                    r.group_model.as_deref().unwrap_or_default()
                ),
            )),
            _ => None,
        };
        let Some((state, why)) = end else {
            continue;
        };
        let detail = format!("mlflow: {why}");
        let changed = sqlx::query(
            "UPDATE model_rollouts SET state = $3, halt_reason = $4, updated_at = now() \
             WHERE org_id = $1 AND id = $2 AND state = 'active'",
        )
        .bind(org_id)
        .bind(r.id)
        .bind(state)
        .bind(&detail)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if changed > 0 {
            insert_event(tx, org_id, r.id, state, None, &detail, None, None).await?;
            changes.push(format!("rollout {} {state}: {detail}", r.id));
        }
    }
    let Some(c) = challenger else {
        return Ok(changes);
    };
    // Groups that run another version of the name, whether one of them is busy with another
    // rollout, and whether kip itself ended this group's rollout of this challenger against
    // this baseline.
    let groups: Vec<(serde_json::Value, Uuid, bool, Option<bool>)> = sqlx::query_as(
        "SELECT dm.selector, dm.model_id, \
           EXISTS (SELECT 1 FROM model_rollouts r \
                    WHERE r.org_id = dm.org_id AND r.selector = dm.selector AND r.state = 'active'), \
           (SELECT r.state <> 'active' AND coalesce(r.halt_reason, '') NOT LIKE 'mlflow%' \
              FROM model_rollouts r \
             WHERE r.org_id = dm.org_id AND r.selector = dm.selector AND r.origin = 'mlflow' \
               AND r.model_id = $3 AND r.baseline_model_id = dm.model_id \
             ORDER BY r.created_at DESC LIMIT 1) \
         FROM desired_models dm JOIN ai_models m ON m.org_id = dm.org_id AND m.id = dm.model_id \
         WHERE dm.org_id = $1 AND dm.selector IS NOT NULL AND m.name = $2 AND dm.model_id <> $3 \
         ORDER BY dm.created_at, dm.id LIMIT 1000",
    )
    .bind(org_id)
    .bind(name)
    .bind(c.model_id)
    .fetch_all(&mut **tx)
    .await?;
    for (selector, baseline, busy, ended_by_kip) in groups {
        if busy {
            tracing::debug!(%org_id, %selector, "group has an active rollout; the challenger waits");
            continue;
        }
        if ended_by_kip == Some(true) {
            continue;
        }
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO model_rollouts (id, org_id, model_id, baseline_model_id, selector, percent, \
                                         mode, origin, state, thresholds) \
             VALUES ($1, $2, $3, $4, $5, $6, 'shadow', 'mlflow', 'active', $7)",
        )
        .bind(id)
        .bind(org_id)
        .bind(c.model_id)
        .bind(baseline)
        .bind(&selector)
        .bind(i32::from(c.percent))
        .bind(sqlx::types::Json(&c.thresholds))
        .execute(&mut **tx)
        .await?;
        let detail = format!(
            "mlflow: alias challenger -> v{} ({}): shadow {}%",
            c.mlflow_version, c.model, c.percent
        );
        insert_event(tx, org_id, id, "started", None, &detail, None, None).await?;
        changes.push(format!("rollout {id} started for {selector}: {detail}"));
    }
    Ok(changes)
}
