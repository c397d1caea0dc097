//! Automatic halt of model rollouts on every threshold (issue 14): the evaluator reads what
//! agents synced (predictions, `model_stats` and `model_drift` records, stored by the same
//! ingest function the sync endpoint calls) and the failure events recorded through the API;
//! a rollout whose candidate crosses `max_inference_failures`, `max_latency_p99_ms` or
//! `max_drift_alarms` is rolled back with an `auto_halted` event naming that reason, and one
//! at (not over) every threshold, error included, keeps running.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use chrono::{DateTime, Utc};
use kip_control_plane::telemetry::ingest::{self, DeviceIdentity};
use kip_shared::{
    ModelDrift, ModelRole, ModelStats, Prediction, Record, Sequenced, sync::SyncBatch,
};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Registers `name@version` in `org` with an uploaded artifact; the model id.
async fn model_with_artifact(app: &common::App, org: &str, key: &str, version: &str) -> String {
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models"),
            key,
            json!({ "name": "rul-fd001", "version": version, "kind": "rul" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v1/organisations/{org}/models/{id}/artifact"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/octet-stream")
        .body(Body::from(format!("model-{version}")))
        .unwrap();
    let r = app.raw(req).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    id
}

/// Stores `records` as one batch of `dev` through the sync's ingest function.
async fn sync(app: &common::App, org: &str, dev: &str, records: Vec<Record>) {
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
    let stored = ingest::store(&app.pool, id, &batch).await.unwrap();
    assert_eq!(stored.inserted, n);
}

/// What the candidate (`rul-fd001@2.0.0`, the shadow of a shadow rollout) reported.
fn stats(ts: DateTime<Utc>, failures: u64, p99_us: f64) -> Record {
    Record::ModelStats(ModelStats {
        model: "rul-fd001".into(),
        model_version: "2.0.0".into(),
        role: ModelRole::Shadow,
        ts,
        predictions: 50,
        failures,
        latency_p50_us: Some(p99_us / 4.0),
        latency_p99_us: Some(p99_us),
        latency_max_us: Some(p99_us),
    })
}

fn drift(ts: DateTime<Utc>, feature: &str, alarm: bool) -> Record {
    Record::ModelDrift(ModelDrift {
        model: "rul-fd001".into(),
        model_version: "2.0.0".into(),
        feature: feature.into(),
        ts,
        psi: if alarm { 5.3 } else { 0.5 },
        ks: if alarm { 0.95 } else { 0.16 },
        psi_threshold: 1.87,
        ks_threshold: 0.5,
        alarm,
        window: 200,
        effective_window: 15,
    })
}

/// 20 shadow predictions of machine `m`, one a cycle, each `rul + off` where `rul` is the
/// true RUL once the failure after the last one is recorded (RMSE = |off|).
fn predictions(t0: DateTime<Utc>, m: &str, off: f64) -> Vec<Record> {
    (0..20)
        .map(|i| {
            Record::Prediction(Prediction {
                machine: m.into(),
                model_version: "2.0.0".into(),
                ts: t0 + chrono::Duration::milliseconds(i),
                rul_cycles: (19 - i) as f64 + off,
                anomaly_score: None,
                model: Some("rul-fd001".into()),
                role: Some(ModelRole::Shadow),
            })
        })
        .collect()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn each_threshold_crossed_halts_its_rollout_with_that_reason_and_one_at_every_threshold_runs_on(
    pool: PgPool,
) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("acme").await;
    let baseline = model_with_artifact(&app, &org, &key, "1.0.0").await;
    let candidate = model_with_artifact(&app, &org, &key, "2.0.0").await;
    let thresholds = json!({
        "max_rmse_cycles": 3.0, "min_truth_samples": 10, "max_drift_alarms": 1,
        "max_inference_failures": 10, "max_latency_p99_ms": 5.0
    });
    // One device group per case (one active rollout per group), each a 100 % shadow rollout
    // of 2.0.0 beside 1.0.0 with every threshold set.
    let mut cases: Vec<(&str, String, String)> = Vec::new();
    for line in ["failures", "latency", "drift", "below"] {
        let r = app
            .post(
                &format!("/v1/organisations/{org}/devices"),
                &key,
                json!({ "name": format!("gw-{line}"), "labels": { "line": line } }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let dev = r.body["id"].as_str().unwrap().to_owned();
        let r = app
            .post(
                &format!("/v1/organisations/{org}/model-rollouts"),
                &key,
                json!({ "model_id": candidate, "baseline_model_id": baseline,
                        "selector": { "line": line }, "percent": 100, "mode": "shadow",
                        "thresholds": thresholds }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["origin"], "api");
        assert_eq!(r.body["devices"].as_array().unwrap().len(), 1, "{}", r.text);
        cases.push((line, dev, r.body["id"].as_str().unwrap().to_owned()));
    }
    // After every rollout's start (the report counts records from then on).
    let t = Utc::now();
    let dev = |line: &str| cases.iter().find(|c| c.0 == line).unwrap().1.clone();
    // 11 failed inferences over two intervals > 10.
    sync(
        &app,
        &org,
        &dev("failures"),
        vec![stats(t, 6, 900.0), stats(t, 5, 900.0)],
    )
    .await;
    // One interval's p99 of 5.2 ms > 5 ms.
    sync(
        &app,
        &org,
        &dev("latency"),
        vec![stats(t, 0, 800.0), stats(t, 0, 5_200.0)],
    )
    .await;
    // Two features' latest windows alarm (> 1); s3's older alarm was superseded by a quiet one.
    sync(
        &app,
        &org,
        &dev("drift"),
        vec![
            drift(t, "s3", true),
            drift(t + chrono::Duration::milliseconds(1), "s3", false),
            drift(t, "s11", true),
            drift(t, "output", true),
        ],
    )
    .await;
    // At every threshold, none over: 10 failures, p99 5 ms, one drift alarm, RMSE 3 cycles
    // over 20 predictions with ground truth.
    let mut below = vec![
        stats(t, 10, 5_000.0),
        drift(t, "s11", true),
        drift(t, "output", false),
    ];
    below.extend(predictions(t, "engine-1", 3.0));
    sync(&app, &org, &dev("below"), below).await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/maintenance-events"),
            &key,
            json!({ "device_id": dev("below"), "machine": "engine-1", "kind": "failure",
                    "ts": (t + chrono::Duration::milliseconds(19)).to_rfc3339() }),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);

    kip_control_plane::ml::compare::evaluate_once(&pool, &app.state.metrics.model_rollouts)
        .await
        .unwrap();

    let rollout = async |id: &str| -> Value {
        let r = app
            .get(
                &format!("/v1/organisations/{org}/model-rollouts/{id}"),
                &key,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body
    };
    for (line, reason, observed, threshold) in [
        ("failures", "inference_failures", 11.0, 10.0),
        ("latency", "latency", 5.2, 5.0),
        ("drift", "drift", 2.0, 1.0),
    ] {
        let id = &cases.iter().find(|c| c.0 == line).unwrap().2;
        let r = rollout(id).await;
        assert_eq!(r["state"], "rolled_back", "{line}: {r}");
        assert!(
            r["halt_reason"].as_str().unwrap().starts_with(reason),
            "{line}: {r}"
        );
        let events = r["events"].as_array().unwrap();
        let halt = events
            .iter()
            .find(|e| e["kind"] == "auto_halted")
            .unwrap_or_else(|| panic!("{line}: no auto_halted event in {r}"));
        assert_eq!(halt["reason"], reason, "{line}: {halt}");
        assert!(
            (halt["observed"].as_f64().unwrap() - observed).abs() < 1e-9,
            "{line}: {halt}"
        );
        assert_eq!(halt["threshold"].as_f64().unwrap(), threshold, "{line}");
        assert_eq!(halt["devices"], 1, "{line}: {halt}");
        // Rolled back: the device gets the baseline, and no shadow.
        let dev_id = dev(line).parse().unwrap();
        let org_id = org.parse().unwrap();
        let d = kip_control_plane::models::desired_for(&pool, org_id, dev_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.version, "1.0.0", "{line}");
        assert!(
            kip_control_plane::models::desired_shadow_for(&pool, org_id, dev_id)
                .await
                .unwrap()
                .is_none(),
            "{line}"
        );
    }

    // At every threshold: judged (RMSE measured on 20 samples), not halted, the shadow runs.
    let id = &cases.iter().find(|c| c.0 == "below").unwrap().2;
    let r = rollout(id).await;
    assert_eq!(r["state"], "active", "{r}");
    assert!(r["last_evaluated_at"].is_string(), "{r}");
    assert!(
        r["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "auto_halted"),
        "{r}"
    );
    let report = app
        .get(
            &format!("/v1/organisations/{org}/model-rollouts/{id}/report"),
            &key,
        )
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.text);
    let c = &report.body["candidate"];
    assert_eq!(c["truth_samples"], 20, "{c}");
    assert!(
        (c["rmse_cycles"].as_f64().unwrap() - 3.0).abs() < 1e-9,
        "{c}"
    );
    assert_eq!(c["inference_failures"], 10, "{c}");
    assert_eq!(c["latency_p99_us"].as_f64().unwrap(), 5_000.0, "{c}");
    assert_eq!(c["drift_alarms"], 1, "{c}");
    assert_eq!(report.body["crossed"], json!([]), "{}", report.text);
    let shadow = kip_control_plane::models::desired_shadow_for(
        &pool,
        org.parse().unwrap(),
        dev("below").parse().unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(shadow.version, "2.0.0");

    // One halt per reason, counted once however often the evaluator runs.
    kip_control_plane::ml::compare::evaluate_once(&pool, &app.state.metrics.model_rollouts)
        .await
        .unwrap();
    let metrics = app.state.metrics.render();
    for reason in ["inference_failures", "latency", "drift"] {
        let line = format!("kip_model_rollout_auto_halts_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    assert!(!metrics.contains("kip_model_rollout_auto_halts_total{reason=\"error\"}"));
}
