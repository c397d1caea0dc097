//! Time-series storage (issue #17): the migration from the plain table without loss or
//! duplicates, rollups that equal the raw aggregates, the query API's resolution choice,
//! retention by whole partitions, tenant isolation. Runs against whichever layout the test
//! cluster gives (TimescaleDB hypertable when it preloads timescaledb, native partitions
//! otherwise); the layout-specific checks branch on it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use chrono::{DateTime, Duration, DurationRound as _, Utc};
use kip_control_plane::telemetry::{
    DeviceIdentity, ingest,
    storage::{self, Layout, TelemetryConfig},
};
use kip_shared::{Quality, Reading, Record, Sequenced, sync::SyncBatch};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn reading(seq: u64, ts: DateTime<Utc>, metric: &str, value: f64) -> Sequenced {
    Sequenced {
        epoch: 1,
        seq,
        record: Record::Reading(Reading {
            source: "plc".into(),
            machine: "m1".into(),
            metric: metric.into(),
            ts,
            value,
            quality: Quality::Good,
        }),
    }
}

fn batch(records: Vec<Sequenced>) -> SyncBatch {
    SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch: 1,
        first_seq: records.first().map_or(0, |r| r.seq),
        last_seq: records.last().map_or(0, |r| r.seq),
        records,
        running_model: None,
        health: None,
    }
}

/// An organisation and a device, straight in SQL (works on any schema version).
async fn org_and_device(pool: &PgPool, name: &str) -> DeviceIdentity {
    let org = Uuid::new_v4();
    let device = Uuid::new_v4();
    sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $2)")
        .bind(org)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, 'gw')")
        .bind(device)
        .bind(org)
        .execute(pool)
        .await
        .unwrap();
    DeviceIdentity {
        org_id: org,
        device_id: device,
    }
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

const LEGACY_READINGS: u64 = 6_000;

#[sqlx::test(migrations = false)]
async fn migrating_from_the_plain_table_loses_and_duplicates_nothing_while_ingest_goes_on(
    pool: PgPool,
) {
    // Today's schema (every migration before 0140) with readings and predictions in it.
    let before: Vec<_> = kip_control_plane::db::MIGRATOR
        .migrations
        .iter()
        .filter(|m| m.version < 140)
        .cloned()
        .collect();
    sqlx::migrate::Migrator::with_migrations(before)
        .run(&pool)
        .await
        .unwrap();
    let id = org_and_device(&pool, "a").await;
    let t0 = Utc::now().duration_trunc(Duration::days(1)).unwrap() - Duration::days(3);
    // Three days of readings, one every 40 s, value = seq.
    sqlx::query(
        "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
         SELECT $1, $2, 1, s, 'm1', 'temp', $3 + make_interval(secs => s * 40), s \
           FROM generate_series(1, $4::bigint) s",
    )
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(t0)
    .bind(LEGACY_READINGS as i64)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO predictions (org_id, device_id, epoch, seq, machine, model_version, ts, rul_cycles) \
         SELECT $1, $2, 1, 100000 + s, 'm1', 'rul@1', $3 + make_interval(secs => s * 3600), s \
           FROM generate_series(1, 50) s",
    )
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(t0)
    .execute(&pool)
    .await
    .unwrap();

    // The migration itself: catalog changes only.
    kip_control_plane::db::MIGRATOR.run(&pool).await.unwrap();
    let layout = storage::layout(&pool).await.unwrap();
    assert_ne!(layout, Layout::Plain);

    // A replay of legacy records before the backfill: all duplicates.
    let old: Vec<_> = (1..=500)
        .map(|s| reading(s, t0 + Duration::seconds(s as i64 * 40), "temp", s as f64))
        .collect();
    let ack = ingest::store(&pool, id, &batch(old.clone())).await.unwrap();
    assert_eq!((ack.inserted, ack.duplicates), (0, 500));

    // The backfill runs while the agent keeps sending new records and replaying old ones.
    let cfg = TelemetryConfig {
        backfill_batch_records: 1_000,
        ..TelemetryConfig::default()
    };
    let token = CancellationToken::new();
    let backfill = storage::maintain(&pool, &cfg, &token);
    let ingest_meanwhile = async {
        let mut inserted = 0;
        for chunk in 0..10u64 {
            let new: Vec<_> = (0..100)
                .map(|i| {
                    let s = LEGACY_READINGS + 1 + chunk * 100 + i;
                    reading(s, t0 + Duration::seconds(s as i64 * 40), "temp", s as f64)
                })
                .collect();
            inserted += ingest::store(&pool, id, &batch(new))
                .await
                .unwrap()
                .inserted;
            let replay = old[(chunk as usize * 50)..(chunk as usize * 50 + 50)].to_vec();
            let ack = ingest::store(&pool, id, &batch(replay)).await.unwrap();
            assert_eq!(ack.inserted, 0, "a replayed legacy record was stored twice");
        }
        inserted
    };
    let (report, inserted) = tokio::join!(backfill, ingest_meanwhile);
    let report = report.unwrap();
    assert_eq!(inserted, 1_000);
    // The control plane's own maintenance may not run here (no app), so this pass moved all.
    assert_eq!(report.legacy_rows_moved, LEGACY_READINGS + 50);

    let total = LEGACY_READINGS as i64 + 1_000;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sensor_data_legacy").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM predictions_legacy").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sensor_data").await,
        total
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(DISTINCT (device_id, epoch, seq)) FROM sensor_data"
        )
        .await,
        total
    );
    // Every seq exactly once, with its own value.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sensor_data WHERE value <> seq").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT max(seq) - min(seq) + 1 FROM sensor_data").await,
        total
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM predictions").await, 50);
    // The rollups count every row once, legacy rows included.
    assert_eq!(
        count(&pool, "SELECT sum(count)::bigint FROM sensor_rollup_1m").await,
        total
    );
    assert_eq!(
        count(&pool, "SELECT sum(count)::bigint FROM sensor_rollup_1h").await,
        total
    );
    if layout == Layout::Native {
        // History got day partitions, not the DEFAULT partition.
        assert_eq!(
            count(&pool, "SELECT count(*) FROM sensor_data_default").await,
            0
        );
    }

    // Replays after the backfill stay no-ops too.
    let ack = ingest::store(&pool, id, &batch(old)).await.unwrap();
    assert_eq!((ack.inserted, ack.duplicates), (0, 500));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM sensor_data").await,
        total
    );
    // A second pass has nothing left to move.
    let again = storage::maintain(&pool, &cfg, &token).await.unwrap();
    assert_eq!(again.legacy_rows_moved, 0);
}

/// Readings over two hours for metric `temp`: one every 7 s, value = f(i).
fn two_hours(t0: DateTime<Utc>, base: f64) -> Vec<Sequenced> {
    (0..1_030u64)
        .map(|i| {
            reading(
                i + 1,
                t0 + Duration::seconds(i as i64 * 7),
                "temp",
                base + ((i * 37) % 101) as f64,
            )
        })
        .collect()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn rollups_equal_the_raw_aggregates_and_the_api_says_which_it_read(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("a").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            &key,
            json!({ "name": "gw-1" }),
        )
        .await;
    let dev = r.body["id"].as_str().unwrap().to_owned();
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: dev.parse().unwrap(),
    };
    let t0 = Utc::now().duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(3);
    let records = two_hours(t0, 0.0);
    // In two batches, each replayed: rollups count every reading once.
    for part in records.chunks(600) {
        let b = batch(part.to_vec());
        ingest::store(&pool, id, &b).await.unwrap();
        let again = ingest::store(&pool, id, &b).await.unwrap();
        assert_eq!(again.inserted, 0);
    }
    let from = t0.to_rfc3339().replace('+', "%2B");
    let to = (t0 + Duration::hours(3)).to_rfc3339().replace('+', "%2B");
    let base = format!("/v1/organisations/{org}/devices/{dev}/sensor-data?from={from}&to={to}");

    // The same 10-minute buckets from raw readings (bucket 90 s -> raw is forced by an
    // explicit resolution) and from the 1-minute rollup.
    let raw = app
        .get(&format!("{base}&bucket_s=600&resolution=raw"), &key)
        .await;
    let rolled = app.get(&format!("{base}&bucket_s=600"), &key).await;
    assert_eq!(raw.status, 200, "{}", raw.text);
    assert_eq!(raw.body["resolution"], "raw");
    assert_eq!(rolled.body["resolution"], "1m");
    let (a, b) = (
        raw.body["points"].as_array().unwrap(),
        rolled.body["points"].as_array().unwrap(),
    );
    assert_eq!(a.len(), 13);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for f in ["bucket", "machine", "metric", "min", "max", "count", "last"] {
            assert_eq!(x[f], y[f], "{f} differs: {x} vs {y}");
        }
        let (ax, ay) = (x["avg"].as_f64().unwrap(), y["avg"].as_f64().unwrap());
        assert!((ax - ay).abs() < 1e-9, "avg {ax} vs {ay}");
    }
    // Hour buckets come from the 1-hour rollup and count every reading.
    let hours = app.get(&format!("{base}&bucket_s=3600"), &key).await;
    assert_eq!(hours.body["resolution"], "1h");
    let n: i64 = hours.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_i64().unwrap())
        .sum();
    assert_eq!(n, records.len() as i64);
    let last = hours.body["points"].as_array().unwrap().last().unwrap()["last"].clone();
    let Record::Reading(r) = &records.last().unwrap().record else {
        unreachable!()
    };
    assert_eq!(last, json!(r.value));
    // A width that no rollup divides, or an unaligned range, reads raw readings.
    let odd = app.get(&format!("{base}&bucket_s=90"), &key).await;
    assert_eq!(odd.body["resolution"], "raw");
    // auto: a 3-hour range is raw readings, a 3-day range 1-minute buckets.
    let auto = app.get(&format!("{base}&resolution=auto"), &key).await;
    assert_eq!(auto.body["resolution"], "raw");
    assert!(auto.body["bucket_s"].is_null());
    let wide_to = (t0 + Duration::days(3)).to_rfc3339().replace('+', "%2B");
    let wide = app
        .get(
            &format!(
                "/v1/organisations/{org}/devices/{dev}/sensor-data?from={from}&to={wide_to}&resolution=auto"
            ),
            &key,
        )
        .await;
    assert_eq!(wide.body["resolution"], "1m");
    assert_eq!(wide.body["bucket_s"], 60);
    // Bad combinations are named.
    let bad = app
        .get(&format!("{base}&bucket_s=90&resolution=1m"), &key)
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text);
    assert!(bad.text.contains("bucket_s"), "{}", bad.text);
    let bad = app
        .get(
            &format!("/v1/organisations/{org}/devices/{dev}/sensor-data?resolution=auto"),
            &key,
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text);
    assert!(bad.text.contains("resolution"), "{}", bad.text);

    // Organisation B: A's device is not found; its own device with the same machine and
    // metric names sees only its own rollups.
    let (org_b, key_b) = app.org_with_key("b").await;
    let r = app
        .get(
            &format!("/v1/organisations/{org_b}/devices/{dev}/sensor-data?bucket_s=3600"),
            &key_b,
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{org}/devices/{dev}/sensor-data?bucket_s=3600"),
            &key_b,
        )
        .await;
    assert!(r.status == 403 || r.status == 404, "{}", r.text);
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/devices"),
            &key_b,
            json!({ "name": "gw-b" }),
        )
        .await;
    let dev_b = r.body["id"].as_str().unwrap().to_owned();
    let id_b = DeviceIdentity {
        org_id: org_b.parse().unwrap(),
        device_id: dev_b.parse().unwrap(),
    };
    ingest::store(&pool, id_b, &batch(two_hours(t0, 1000.0)[..10].to_vec()))
        .await
        .unwrap();
    let r = app
        .get(
            &format!(
                "/v1/organisations/{org_b}/devices/{dev_b}/sensor-data?from={from}&to={to}&bucket_s=3600"
            ),
            &key_b,
        )
        .await;
    assert_eq!(r.body["resolution"], "1h");
    let pts = r.body["points"].as_array().unwrap();
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["count"], 10);
    assert!(pts[0]["min"].as_f64().unwrap() >= 1000.0);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn retention_drops_whole_partitions_once_every_organisation_allows_it(pool: PgPool) {
    let a = org_and_device(&pool, "a").await;
    let b = org_and_device(&pool, "b").await;
    let day = Utc::now().duration_trunc(Duration::days(1)).unwrap();
    let ages = [40i64, 20, 1];
    for id in [a, b] {
        let records = ages
            .iter()
            .enumerate()
            .map(|(i, d)| {
                reading(
                    i as u64 + 1,
                    day - Duration::days(*d) + Duration::hours(1),
                    "temp",
                    *d as f64,
                )
            })
            .collect();
        ingest::store(&pool, id, &batch(records)).await.unwrap();
    }
    let cfg = TelemetryConfig::default();
    let token = CancellationToken::new();
    let layout = storage::layout(&pool).await.unwrap();
    let per_age = |age: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sensor_data WHERE value = $1")
                .bind(age as f64)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Nobody has a retention: nothing is dropped (old days still get partitions).
    let r = storage::maintain(&pool, &cfg, &token).await.unwrap();
    assert_eq!(r.partitions_dropped, 0);
    if layout == Layout::Native {
        assert_eq!(
            count(&pool, "SELECT count(*) FROM sensor_data_default").await,
            0
        );
    }
    // Only A has one: B keeps everything, so still nothing is dropped.
    let set = |id: DeviceIdentity, days: i32| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO telemetry_retention (org_id, raw_retention_days) VALUES ($1, $2) \
                 ON CONFLICT (org_id) DO UPDATE SET raw_retention_days = EXCLUDED.raw_retention_days",
            )
            .bind(id.org_id)
            .bind(days)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    set(a, 10).await;
    let r = storage::maintain(&pool, &cfg, &token).await.unwrap();
    assert_eq!(r.partitions_dropped, 0);
    assert_eq!(per_age(40).await, 2);
    // B keeps 30 days: the day 40 days back goes for both, the one 20 days back stays.
    set(b, 30).await;
    let r = storage::maintain(&pool, &cfg, &token).await.unwrap();
    assert!(r.partitions_dropped >= 1, "{r:?}");
    assert_eq!(per_age(40).await, 0);
    assert_eq!(per_age(20).await, 2);
    assert_eq!(per_age(1).await, 2);
    // Rollups outlive raw data (a year-long chart reads them).
    assert_eq!(
        count(&pool, "SELECT sum(count)::bigint FROM sensor_rollup_1h").await,
        6
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_organisation_does_not_see_raw_readings_past_its_own_retention(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("a").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            &key,
            json!({ "name": "gw-1" }),
        )
        .await;
    let dev = r.body["id"].as_str().unwrap().to_owned();
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: dev.parse().unwrap(),
    };
    let now = Utc::now();
    let records = vec![
        reading(1, now - Duration::days(20), "temp", 20.0),
        reading(2, now - Duration::days(2), "temp", 2.0),
    ];
    ingest::store(&pool, id, &batch(records)).await.unwrap();
    let uri = format!("/v1/organisations/{org}/devices/{dev}/sensor-data");
    let all = app.get(&uri, &key).await;
    assert_eq!(all.body["points"].as_array().unwrap().len(), 2);
    let put = app
        .call(
            axum::http::Method::PUT,
            &format!("/v1/organisations/{org}/telemetry/retention"),
            Some(&key),
            Some(json!({ "raw_retention_days": 10 })),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(put.body["raw_retention_days"], 10);
    let seen = app.get(&uri, &key).await;
    let pts = seen.body["points"].as_array().unwrap();
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["value"], 2.0);
    // Another organisation cannot read or change it.
    let (_org_b, key_b) = app.org_with_key("b").await;
    let r = app
        .get(
            &format!("/v1/organisations/{org}/telemetry/retention"),
            &key_b,
        )
        .await;
    assert!(r.status == 403 || r.status == 404, "{}", r.text);
    let bad = app
        .call(
            axum::http::Method::PUT,
            &format!("/v1/organisations/{org}/telemetry/retention"),
            Some(&key),
            Some(json!({ "raw_retention_days": 0 })),
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.text);
    assert!(bad.text.contains("raw_retention_days"), "{}", bad.text);
}

/// sensor_data has no foreign key to devices (a per-row check that cost ingest a third of its
/// time, migration 0230); a trigger keeps the cascade: deleting a device, or its whole
/// organisation, deletes its readings and only its readings.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn deleting_a_device_or_its_organisation_deletes_its_readings_and_no_others(pool: PgPool) {
    let now = Utc::now();
    let a = org_and_device(&pool, "a").await;
    let b = org_and_device(&pool, "b").await;
    let a2 = DeviceIdentity {
        org_id: a.org_id,
        device_id: Uuid::new_v4(),
    };
    sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, 'gw-2')")
        .bind(a2.device_id)
        .bind(a2.org_id)
        .execute(&pool)
        .await
        .unwrap();
    for id in [a, a2, b] {
        let records = (1..=1_500)
            .map(|i| reading(i, now - Duration::seconds(i as i64), "temp", i as f64))
            .collect();
        ingest::store(&pool, id, &batch(records)).await.unwrap();
    }
    let fks: i64 = count(
        &pool,
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'sensor_data'::regclass AND contype = 'f'",
    )
    .await;
    assert_eq!(fks, 0, "sensor_data still has a foreign key");
    let rows = |device: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sensor_data WHERE device_id = $1")
                .bind(device)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(rows(a.device_id).await, 1_500);
    sqlx::query("DELETE FROM devices WHERE id = $1")
        .bind(a.device_id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(rows(a.device_id).await, 0);
    assert_eq!(rows(a2.device_id).await, 1_500);
    assert_eq!(rows(b.device_id).await, 1_500);
    // The organisation's other device goes with the organisation (devices cascade from it).
    sqlx::query("DELETE FROM organisations WHERE id = $1")
        .bind(a.org_id)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(rows(a2.device_id).await, 0);
    assert_eq!(rows(b.device_id).await, 1_500);
    // Ingest for a deleted device is refused, so no reading can outlive its device.
    let late = batch(vec![reading(2_000, now, "temp", 1.0)]);
    assert!(matches!(
        ingest::store(&pool, a, &late).await,
        Err(ingest::IngestError::UnknownDevice)
    ));
}
