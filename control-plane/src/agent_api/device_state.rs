//! The device state a sync exchanges after its batch is stored, in two statements whatever
//! the batch: [`record`] writes what the device reported (health report, applied
//! configuration, update status, running model) and [`desired`] reads what it should run
//! (model, shadow model, configuration, agent release).
//!
//! Before, the sync handler ran one statement per table (four writes, four to six reads): at
//! a fleet's rate of small requests the round trips, not the rows, were the cost (issue #17,
//! docs/performance.md). The SQL of each part stays in its domain (`upsert_*!` and
//! `*_of_device!` macros in [`crate::health`], [`crate::device_config`],
//! [`crate::releases`], [`crate::models`]), so the single-purpose paths (the artifact
//! downloads, the admin API) and this one resolve the same way.
//!
//! Invariants:
//! - Every statement is scoped by the organisation of the client certificate: the reads start
//!   from the `devices` row `(org_id, id)` and every subquery joins on `d.org_id`; the upserts
//!   never touch a row of another organisation.
//! - No cache: the desired state is read on every sync, so a change (rollout, configuration
//!   version, release rollout, pause, alias) reaches a device at its next sync.
//! - [`record`] runs before [`desired`]: a paused release rollout keeps offering its release
//!   to a device that reported installing it in this very sync.
//! - Unchanged status rows (configuration, update, model) are not rewritten; the health report
//!   is (it carries the device's current figures).

use kip_shared::{
    health::HealthReport,
    sync::{DesiredModel, DesiredRelease},
};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    device_config::{self, upsert_config_status},
    health::upsert_health,
    models::{self, upsert_model_status},
    releases::{self, upsert_update_status},
    telemetry::DeviceIdentity,
};

/// What a device reported with one sync (the batch's health report and model, the request
/// headers).
#[derive(Debug, Default, Clone, Copy)]
pub struct Reported<'a> {
    pub health: Option<&'a HealthReport>,
    pub running_model: Option<&'a str>,
    /// `kip-model-error`.
    pub model_error: Option<&'a str>,
    /// `kip-config-version`.
    pub config_applied: Option<&'a str>,
    /// `kip-config-error`.
    pub config_error: Option<&'a str>,
    /// `kip-update-status`.
    pub update_status: Option<&'a str>,
}

/// Every report of a sync in one statement.
const RECORD: &str = concat!(
    "WITH h AS (",
    upsert_health!("$2", "$1", "$3"),
    "), c AS (",
    upsert_config_status!("$2", "$1", "$4", "$5"),
    "), u AS (",
    upsert_update_status!("$2", "$1", "$6", "$7", "$8"),
    "), m AS (",
    upsert_model_status!("$2", "$1", "$9", "$10"),
    ") SELECT 1"
);

/// Stores what `id` reported (one statement, [`RECORD`]).
pub async fn record(
    pool: &PgPool,
    id: DeviceIdentity,
    r: &Reported<'_>,
) -> Result<(), sqlx::Error> {
    let health = r
        .health
        .map(|h| serde_json::to_value(h).unwrap_or_default());
    let update = r
        .update_status
        .and_then(|h| releases::parse_reported(id.device_id, h));
    sqlx::query(RECORD)
        .bind(id.org_id)
        .bind(id.device_id)
        .bind(health)
        .bind(r.config_applied.map(device_config::clean_reported))
        .bind(r.config_error.map(device_config::clean_reported))
        .bind(update.as_ref().map(|u| u.state))
        .bind(update.as_ref().map(|u| u.version))
        .bind(update.as_ref().and_then(|u| u.reason.as_deref()))
        .bind(r.running_model)
        .bind(r.model_error.map(models::clean_model_error))
        .execute(pool)
        .await?;
    Ok(())
}

/// What `id` should run, for `SyncAck.desired` (the trust bundle and signing keys come from
/// memory, not from here).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub model: Option<DesiredModel>,
    pub shadow_model: Option<DesiredModel>,
    /// The desired configuration version, and its document unless the device reported
    /// running that version already.
    pub config: Option<(String, Option<String>)>,
    pub agent_release: Option<DesiredRelease>,
}

/// The whole desired state of device `$2` of organisation `$1` in one statement (`$3`: the
/// configuration version the device reported, whose document is then not sent again).
const DESIRED: &str = concat!(
    "SELECT dm.id AS model_id, dm.name AS model_name, dm.version AS model_version, \
            dm.sha256 AS model_sha256, dm.signature AS model_signature, \
            sm.id AS shadow_id, sm.name AS shadow_name, sm.version AS shadow_version, \
            sm.sha256 AS shadow_sha256, sm.signature AS shadow_signature, \
            cfg.version AS config_version, \
            CASE WHEN cfg.version::text IS DISTINCT FROM $3 THEN cfg.toml END AS config_toml, \
            rel.id AS release_id, rel.version AS release_version, rel.sha256 AS release_sha256, \
            rel.signature AS release_signature \
     FROM devices d \
     LEFT JOIN LATERAL (",
    models::desired_of_device!(),
    ") w ON true LEFT JOIN LATERAL (",
    models::model_for_device!("w.model_id"),
    ") dm ON true LEFT JOIN LATERAL (",
    models::shadow_of_device!(),
    ") sw ON true LEFT JOIN LATERAL (",
    models::model_for_device!("sw.model_id"),
    ") sm ON true LEFT JOIN LATERAL (",
    device_config::desired_of_device!(),
    ") cfg ON true LEFT JOIN LATERAL (",
    releases::release_of_device!(),
    ") rel ON true \
     WHERE d.org_id = $1 AND d.id = $2"
);

#[derive(sqlx::FromRow)]
struct DesiredRow {
    model_id: Option<Uuid>,
    model_name: Option<String>,
    model_version: Option<String>,
    model_sha256: Option<String>,
    model_signature: Option<String>,
    shadow_id: Option<Uuid>,
    shadow_name: Option<String>,
    shadow_version: Option<String>,
    shadow_sha256: Option<String>,
    shadow_signature: Option<String>,
    config_version: Option<i64>,
    config_toml: Option<String>,
    release_id: Option<Uuid>,
    release_version: Option<String>,
    release_sha256: Option<String>,
    release_signature: Option<String>,
}

fn model(
    id: Option<Uuid>,
    name: Option<String>,
    version: Option<String>,
    sha256: Option<String>,
    signature: Option<String>,
) -> Option<DesiredModel> {
    let (id, name, version, sha256) = (id?, name?, version?, sha256?);
    Some(DesiredModel {
        name,
        version,
        sha256,
        download_path: models::agent_download_path(id),
        signature,
    })
}

/// Reads what `id` should run (one statement, [`DESIRED`]); `config_applied` is the version
/// the device reported running (`kip-config-version`). A device that is not (or no longer)
/// in the organisation gets nothing.
pub async fn desired(
    pool: &PgPool,
    id: DeviceIdentity,
    config_applied: Option<&str>,
) -> Result<Desired, sqlx::Error> {
    let row: Option<DesiredRow> = sqlx::query_as(DESIRED)
        .bind(id.org_id)
        .bind(id.device_id)
        .bind(config_applied)
        .fetch_optional(pool)
        .await?;
    let Some(r) = row else {
        return Ok(Desired::default());
    };
    let agent_release = match (r.release_id, r.release_version, r.release_sha256) {
        (Some(rid), Some(version), Some(sha256)) => Some(DesiredRelease {
            version,
            sha256,
            download_path: releases::agent_download_path(rid),
            signature: r.release_signature,
        }),
        _ => None,
    };
    Ok(Desired {
        model: model(
            r.model_id,
            r.model_name,
            r.model_version,
            r.model_sha256,
            r.model_signature,
        ),
        shadow_model: model(
            r.shadow_id,
            r.shadow_name,
            r.shadow_version,
            r.shadow_sha256,
            r.shadow_signature,
        ),
        config: r.config_version.map(|v| (v.to_string(), r.config_toml)),
        agent_release,
    })
}
