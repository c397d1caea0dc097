//! Model monitoring in the control plane: drift records arriving in sync batches land in
//! `model_monitoring` once per record, are listed per organisation with filters and keyset
//! pages, summarised as `kip_model_drift*` metrics, and invisible to other organisations.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use kip_control_plane::telemetry::ingest::{self, DeviceIdentity};
use kip_shared::{ModelDrift, Record, Sequenced, sync::SyncBatch};
use serde_json::json;
use sqlx::PgPool;

fn t0() -> DateTime<Utc> {
    // Recent: the fleet metrics only consider the last 24 hours.
    Utc::now() - chrono::Duration::minutes(10)
}

async fn device(app: &common::App, org: &str, key: &str, name: &str) -> String {
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            key,
            json!({ "name": name }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

fn drift(version: &str, feature: &str, minute: i64, psi: f64, alarm: bool) -> Record {
    Record::ModelDrift(ModelDrift {
        model: "rul-fd001".into(),
        model_version: version.into(),
        feature: feature.into(),
        ts: t0() + chrono::Duration::minutes(minute),
        psi,
        ks: psi / 4.0,
        psi_threshold: 1.87,
        ks_threshold: 0.5,
        alarm,
        window: 200,
        effective_window: 15,
    })
}

/// Stores `records` as one batch of `dev` (epoch 1, seq from 1); returns the ack's inserted.
async fn sync(app: &common::App, org: &str, dev: &str, records: Vec<Record>) -> u64 {
    let n = records.len() as u64;
    let batch = SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch: 1,
        first_seq: 1,
        last_seq: n,
        records: records
            .into_iter()
            .enumerate()
            .map(|(i, record)| Sequenced {
                epoch: 1,
                seq: i as u64 + 1,
                record,
            })
            .collect(),
        running_model: None,
        health: None,
    };
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: dev.parse().unwrap(),
    };
    ingest::store(&app.pool, id, &batch).await.unwrap().inserted
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn drift_records_are_stored_once_listed_by_keyset_and_hidden_from_other_organisations(
    pool: PgPool,
) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (other, other_key) = app.org_with_key("b").await;
    let d1 = device(&app, &org, &key, "gw-1").await;
    let d2 = device(&app, &org, &key, "gw-2").await;
    let dx = device(&app, &other, &other_key, "gw-x").await;

    let one = vec![
        drift("2.1.0", "s11", 0, 0.5, false),
        drift("2.1.0", "output", 0, 0.2, false),
        drift("2.1.0", "s11", 1, 6.0, true),
        drift("2.1.0", "output", 1, 0.3, false),
    ];
    assert_eq!(sync(&app, &org, &d1, one.clone()).await, 4);
    // The same batch again (a lost ack): nothing new.
    assert_eq!(sync(&app, &org, &d1, one).await, 0);
    sync(
        &app,
        &org,
        &d2,
        vec![
            drift("2.1.0", "s11", 2, 0.4, false),
            drift("2.0.0", "s11", 3, 0.1, false),
        ],
    )
    .await;
    sync(&app, &other, &dx, vec![drift("2.1.0", "s11", 0, 9.0, true)]).await;

    // Pages of 2 over the organisation's 6 records, oldest first, each exactly once.
    let base = format!("/v1/organisations/{org}/model-monitoring");
    let mut seen = Vec::new();
    let mut uri = format!("{base}?limit=2");
    loop {
        let r = app.get(&uri, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for rec in r.body["records"].as_array().unwrap() {
            seen.push(rec.clone());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    let times: Vec<&str> = seen.iter().map(|r| r["ts"].as_str().unwrap()).collect();
    assert!(times.is_sorted(), "{times:?}");
    assert!(seen.iter().all(|r| r["device_id"] != dx.as_str()));
    let alarm = seen.iter().find(|r| r["alarm"] == true).unwrap();
    assert_eq!(
        (
            &alarm["feature"],
            &alarm["psi"],
            &alarm["window"],
            &alarm["effective_window"]
        ),
        (&json!("s11"), &json!(6.0), &json!(200), &json!(15))
    );

    // Filters: device, model version, feature, alarm.
    let count = |q: String| {
        let (app, key, base) = (&app, &key, &base);
        async move {
            let r = app.get(&format!("{base}?{q}"), key).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            r.body["records"].as_array().unwrap().len()
        }
    };
    assert_eq!(count(format!("device_id={d2}")).await, 2);
    assert_eq!(count("model=rul-fd001&version=2.0.0".into()).await, 1);
    assert_eq!(count("feature=output".into()).await, 2);
    assert_eq!(count("alarm=true".into()).await, 1);
    assert_eq!(count("model=rul-fd003".into()).await, 0);
    // Another organisation's device as a filter matches nothing.
    assert_eq!(count(format!("device_id={dx}")).await, 0);

    // Bad input is named, never a 500.
    let r = app.get(&format!("{base}?limit=0"), &key).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.message().contains("limit"), "{}", r.text);
    let r = app.get(&format!("{base}?cursor=bogus"), &key).await;
    assert!(r.status.is_client_error(), "{}", r.text);
    assert!(r.message().contains("cursor"), "{}", r.text);
    let r = app.get(&format!("{base}?colour=red"), &key).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);

    // Isolation: org b's key cannot read org a's records and sees only its own.
    let r = app.get(&base, &other_key).await;
    assert!(r.status.is_client_error(), "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{other}/model-monitoring"),
            &other_key,
        )
        .await;
    let theirs = r.body["records"].as_array().unwrap();
    assert_eq!(theirs.len(), 1, "{}", r.text);
    assert_eq!(theirs[0]["device_id"], dx.as_str());

    // Fleet metrics: the largest statistic over each device's latest window, and how many
    // devices' latest window alarms.
    kip_control_plane::ml::monitoring::refresh(&app.pool, &app.state.metrics.model_drift)
        .await
        .unwrap();
    let metrics = app.state.metrics.render();
    let line = |needle: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(needle) || (l.contains(needle) && !l.starts_with('#')))
            .unwrap_or_else(|| panic!("no {needle} in\n{metrics}"))
            .to_owned()
    };
    // d1's latest s11 window (psi 6.0, alarm) and d2's (0.4): max 6, one device alarming.
    let psi = line(
        r#"kip_model_drift{org="a",model="rul-fd001",version="2.1.0",feature="s11",statistic="psi"}"#,
    );
    assert!(psi.ends_with(" 6.0"), "{psi}");
    let alarms = line(
        r#"kip_model_drift_alarm_devices{org="a",model="rul-fd001",version="2.1.0",feature="s11"}"#,
    );
    assert!(alarms.ends_with(" 1"), "{alarms}");
    let quiet = line(
        r#"kip_model_drift_alarm_devices{org="a",model="rul-fd001",version="2.1.0",feature="output"}"#,
    );
    assert!(quiet.ends_with(" 0"), "{quiet}");
    assert!(line("kip_model_drift_series_dropped").ends_with(" 0"));
}
