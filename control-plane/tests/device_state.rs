//! The device state of a sync in two statements (`agent_api::device_state`, issue #17): what
//! a device reports is recorded before what it should run is read, every part stays inside
//! the device's organisation, and unchanged status rows are not rewritten. Each test gets a
//! fresh database (`sqlx::test`); rows are inserted directly (the admin API has its own tests).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use kip_control_plane::{
    agent_api::device_state::{self, Reported},
    telemetry::DeviceIdentity,
};
use sqlx::PgPool;
use uuid::Uuid;

async fn org_with_device(pool: &PgPool, name: &str) -> DeviceIdentity {
    let (org_id, device_id) = (Uuid::new_v4(), Uuid::new_v4());
    sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $2)")
        .bind(org_id)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO devices (id, org_id, name, labels) VALUES ($1, $2, 'gw-1', '{\"line\": \"a\"}')")
        .bind(device_id)
        .bind(org_id)
        .execute(pool)
        .await
        .unwrap();
    DeviceIdentity { org_id, device_id }
}

/// A paused release rollout of every device of `org` and a group configuration (version 1).
async fn paused_release_and_config(pool: &PgPool, org_id: Uuid) {
    let release = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO agent_releases (id, org_id, version, sha256, size_bytes) \
         VALUES ($1, $2, '1.2.3', repeat('a', 64), 10)",
    )
    .bind(release)
    .bind(org_id)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO release_rollouts (id, org_id, release_id, selector, percent, state) \
         VALUES ($1, $2, $3, '{}', 100, 'paused')",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(release)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO device_configs (id, org_id, version, selector, toml) \
         VALUES ($1, $2, 1, '{}', '[sync]')",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_report_is_recorded_before_the_desired_state_is_read(pool: PgPool) {
    let dev = org_with_device(&pool, "a").await;
    paused_release_and_config(&pool, dev.org_id).await;

    let d = device_state::desired(&pool, dev, None).await.unwrap();
    assert_eq!(d.agent_release, None, "paused: not offered to a new device");
    assert_eq!(d.config, Some(("1".into(), Some("[sync]".into()))));

    // The sync that reports the trial of the paused release gets it back in its own ack.
    let reported = Reported {
        update_status: Some("trial 1.2.3"),
        config_applied: Some("1"),
        ..Reported::default()
    };
    device_state::record(&pool, dev, &reported).await.unwrap();
    let d = device_state::desired(&pool, dev, Some("1")).await.unwrap();
    assert_eq!(d.agent_release.map(|r| r.version).as_deref(), Some("1.2.3"));
    assert_eq!(
        d.config,
        Some(("1".into(), None)),
        "the document the device runs is not sent again"
    );
    let applied: Option<String> =
        sqlx::query_scalar("SELECT applied_version FROM device_config_status WHERE device_id = $1")
            .bind(dev.device_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(applied.as_deref(), Some("1"));
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn another_organisations_rollouts_and_configuration_do_not_reach_a_device(pool: PgPool) {
    let a = org_with_device(&pool, "a").await;
    let b = org_with_device(&pool, "b").await;
    paused_release_and_config(&pool, a.org_id).await;
    sqlx::query("UPDATE release_rollouts SET state = 'active'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        device_state::desired(&pool, a, None)
            .await
            .unwrap()
            .agent_release
            .is_some()
    );

    let d = device_state::desired(&pool, b, None).await.unwrap();
    assert_eq!(d, device_state::Desired::default());
    // Org A's device named with org B's identifier: nothing either.
    let crossed = DeviceIdentity {
        org_id: b.org_id,
        device_id: a.device_id,
    };
    assert_eq!(
        device_state::desired(&pool, crossed, None).await.unwrap(),
        device_state::Desired::default()
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_unchanged_status_is_not_rewritten(pool: PgPool) {
    let dev = org_with_device(&pool, "a").await;
    let reported = Reported {
        running_model: Some("rul@1.0.0"),
        config_applied: Some("3"),
        update_status: Some("confirmed 1.2.3"),
        ..Reported::default()
    };
    let versions = || async {
        sqlx::query_as::<_, (String, String, String)>(
            "SELECT (SELECT xmin::text FROM device_model_status WHERE device_id = $1), \
                    (SELECT xmin::text FROM device_config_status WHERE device_id = $1), \
                    (SELECT xmin::text FROM device_update_status WHERE device_id = $1)",
        )
        .bind(dev.device_id)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    device_state::record(&pool, dev, &reported).await.unwrap();
    let first = versions().await;
    device_state::record(&pool, dev, &reported).await.unwrap();
    assert_eq!(versions().await, first, "same report: no new row versions");

    let changed = Reported {
        running_model: Some("rul@1.1.0"),
        ..reported
    };
    device_state::record(&pool, dev, &changed).await.unwrap();
    let (model, config, update) = versions().await;
    assert_ne!(model, first.0, "a changed model is written");
    assert_eq!((config, update), (first.1, first.2));
}
