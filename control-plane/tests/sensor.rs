//! The sensor-data query API: raw pages, filters, time buckets, tenant isolation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, TimeZone as _, Utc};
use kip_control_plane::telemetry::{DeviceIdentity, ingest};
use kip_shared::{Quality, Reading, Record, Sequenced, sync::SyncBatch};
use serde_json::{Value, json};
use sqlx::PgPool;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
}

/// 12 readings per (machine, metric), one every 10 s, value = index.
async fn seed(app: &common::App, org: &str, key: &str) -> String {
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            key,
            json!({ "name": "gw-1" }),
        )
        .await;
    let device = r.body["id"].as_str().unwrap().to_owned();
    let mut records = Vec::new();
    let mut seq = 0;
    for i in 0..12i64 {
        for machine in ["m1", "m2"] {
            for metric in ["temp", "speed"] {
                seq += 1;
                records.push(Sequenced {
                    epoch: 1,
                    seq,
                    record: Record::Reading(Reading {
                        source: "plc".into(),
                        machine: machine.into(),
                        metric: metric.into(),
                        ts: t0() + chrono::Duration::seconds(i * 10),
                        value: i as f64,
                        quality: Quality::Good,
                    }),
                });
            }
        }
    }
    let batch = SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch: 1,
        first_seq: 1,
        last_seq: seq,
        records,
        running_model: None,
        health: None,
    };
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: device.parse().unwrap(),
    };
    ingest::store(&app.pool, id, &batch).await.unwrap();
    device
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn raw_readings_page_by_cursor_and_filter(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let dev = seed(&app, &org, &key).await;
    let base = format!("/v1/organisations/{org}/devices/{dev}/sensor-data");

    // Every row of m1/temp, 5 per page, in time order, exactly once.
    let mut seen: Vec<f64> = Vec::new();
    let mut uri = format!("{base}?machine=m1&metric=temp&limit=5");
    loop {
        let r = app.get(&uri, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for p in r.body["points"].as_array().unwrap() {
            assert_eq!(
                (p["machine"].as_str(), p["metric"].as_str()),
                (Some("m1"), Some("temp"))
            );
            seen.push(p["value"].as_f64().unwrap());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?machine=m1&metric=temp&limit=5&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, (0..12).map(f64::from).collect::<Vec<_>>());

    // A time range: [t0+30s, t0+60s) holds indexes 3, 4, 5 for each of the 4 series.
    let from = (t0() + chrono::Duration::seconds(30)).to_rfc3339();
    let to = (t0() + chrono::Duration::seconds(60)).to_rfc3339();
    let r = app
        .get(
            &format!("{base}?from={}&to={}", urlencode(&from), urlencode(&to)),
            &key,
        )
        .await;
    assert_eq!(r.body["points"].as_array().unwrap().len(), 12, "{}", r.text);
    assert!(r.body["next_cursor"].is_null());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn buckets_aggregate_per_machine_and_metric(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let dev = seed(&app, &org, &key).await;
    let base = format!("/v1/organisations/{org}/devices/{dev}/sensor-data");
    // 60 s buckets: indexes 0..=5 and 6..=11.
    let r = app
        .get(&format!("{base}?bucket_s=60&machine=m2&metric=speed"), &key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let pts = r.body["points"].as_array().unwrap();
    assert_eq!(pts.len(), 2, "{}", r.text);
    assert_eq!(pts[0]["count"], 6);
    assert_eq!(pts[0]["avg"].as_f64().unwrap(), 2.5);
    assert_eq!(
        (pts[1]["min"].as_f64(), pts[1]["max"].as_f64()),
        (Some(6.0), Some(11.0))
    );

    // All four series, paged 3 buckets at a time: 8 buckets in all, none twice.
    let mut all: Vec<Value> = Vec::new();
    let mut uri = format!("{base}?bucket_s=60&limit=3");
    loop {
        let r = app.get(&uri, &key).await;
        all.extend(r.body["points"].as_array().unwrap().iter().cloned());
        match r.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?bucket_s=60&limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(all.len(), 8);
    let mut keys: Vec<String> = all
        .iter()
        .map(|p| format!("{}{}{}", p["bucket"], p["machine"], p["metric"]))
        .collect();
    keys.dedup();
    assert_eq!(keys.len(), 8);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn another_organisation_and_bad_parameters_are_refused(pool: PgPool) {
    let app = common::app(pool).await;
    let (org_a, key_a) = app.org_with_key("a").await;
    let (org_b, key_b) = app.org_with_key("b").await;
    let dev_b = seed(&app, &org_b, &key_b).await;
    for uri in [
        format!("/v1/organisations/{org_b}/devices/{dev_b}/sensor-data"),
        format!("/v1/organisations/{org_a}/devices/{dev_b}/sensor-data"),
    ] {
        assert_eq!(
            app.get(&uri, &key_a).await.status,
            StatusCode::NOT_FOUND,
            "{uri}"
        );
    }
    let base = format!("/v1/organisations/{org_b}/devices/{dev_b}/sensor-data");
    for (q, field) in [
        ("limit=0", "limit"),
        ("bucket_s=0", "bucket_s"),
        ("cursor=zzz", "cursor"),
    ] {
        let r = app.get(&format!("{base}?{q}"), &key_b).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{q}: {}",
            r.text
        );
        assert!(r.message().starts_with(field), "{q}: {}", r.text);
    }
    let r = app.get(&format!("{base}?colour=red"), &key_b).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// Bucket pages aggregate a bounded window: readings far apart still page through, every
/// bucket exactly once, and no page is empty while readings follow.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn bucket_pages_cross_gaps_in_the_data(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let dev = seed(&app, &org, &key).await;
    // One more reading 30 days later.
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: dev.parse().unwrap(),
    };
    let late = Sequenced {
        epoch: 2,
        seq: 1,
        record: Record::Reading(Reading {
            source: "plc".into(),
            machine: "m1".into(),
            metric: "temp".into(),
            ts: t0() + chrono::Duration::days(30),
            value: 99.0,
            quality: Quality::Good,
        }),
    };
    let batch = SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch: 2,
        first_seq: 1,
        last_seq: 1,
        records: vec![late],
        running_model: None,
        health: None,
    };
    ingest::store(&app.pool, id, &batch).await.unwrap();
    let base = format!("/v1/organisations/{org}/devices/{dev}/sensor-data");
    let mut pages = Vec::new();
    let mut uri = format!("{base}?bucket_s=60&limit=3&machine=m1&metric=temp");
    loop {
        let r = app.get(&uri, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let pts = r.body["points"].as_array().unwrap().clone();
        assert!(!pts.is_empty(), "an empty page: {}", r.text);
        pages.push(pts);
        match r.body["next_cursor"].as_str() {
            Some(c) => {
                uri = format!("{base}?bucket_s=60&limit=3&machine=m1&metric=temp&cursor={c}")
            }
            None => break,
        }
        assert!(pages.len() < 10, "too many pages");
    }
    let counts: Vec<i64> = pages
        .iter()
        .flatten()
        .map(|p| p["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, vec![6, 6, 1], "{pages:?}");
}

/// A sensor query stops after its statement timeout (504) instead of holding a connection:
/// here it waits on a lock held by another transaction.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_slow_sensor_query_ends_at_its_statement_timeout(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("a").await;
    let dev = seed(&app, &org, &key).await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE sensor_data IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let base = format!("/v1/organisations/{org}/devices/{dev}/sensor-data");
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(40),
        // Raw readings (a 60 s bucket would otherwise be read from the 1-minute rollup).
        app.get(&format!("{base}?bucket_s=60&resolution=raw"), &key),
    )
    .await
    .expect("the query must end at its statement timeout, not wait for the lock");
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "timeout");
    let limit =
        std::time::Duration::from_millis(kip_control_plane::telemetry::SENSOR_QUERY_TIMEOUT_MS);
    // The statement's own timeout answered, not the HTTP request timeout (30 s).
    assert!(
        t.elapsed() >= limit && t.elapsed() < limit * 3,
        "{:?}",
        t.elapsed()
    );
    // And the database stopped the statement: no backend still waits for the lock.
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND query LIKE '%FROM sensor_data%' \
           AND datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(waiting, 0);
    lock.rollback().await.unwrap();
}
