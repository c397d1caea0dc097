//! ML data of an organisation (issue 14): feature-set documents, maintenance events, training
//! data, model performance and the prediction query API, each with tenant isolation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use axum::http::{Method, StatusCode};
use chrono::{DateTime, TimeZone as _, Utc};
use kip_control_plane::telemetry::{DeviceIdentity, ingest};
use kip_shared::{Prediction, Record, Sequenced, sync::SyncBatch};
use serde_json::{Value, json};
use sqlx::PgPool;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 12, 0, 0).unwrap()
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

fn w30() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ml/feature-sets/cmapss-w30-v1.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Actions in the organisation's audit log, newest first.
async fn audit_actions(app: &common::App, org: &str, key: &str) -> Vec<String> {
    let r = app
        .get(&format!("/v1/organisations/{org}/audit"), key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn maintenance_events_are_recorded_paged_and_isolated(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (other, other_key) = app.org_with_key("b").await;
    let dev = device(&app, &org, &key, "gw-1").await;
    let other_dev = device(&app, &other, &other_key, "gw-x").await;
    let base = format!("/v1/organisations/{org}/maintenance-events");

    for (i, kind) in ["failure", "repair", "replacement", "failure", "repair"]
        .iter()
        .enumerate()
    {
        let r = app
            .post(
                &base,
                &key,
                json!({
                    "device_id": dev, "machine": if i % 2 == 0 { "unit-1" } else { "unit-2" },
                    "kind": kind, "ts": (t0() + chrono::Duration::hours(i as i64)).to_rfc3339(),
                    "note": format!("event {i}"),
                }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        assert_eq!(r.body["kind"], *kind);
    }
    // Pages of 2, oldest first, each event exactly once.
    let mut notes = Vec::new();
    let mut uri = format!("{base}?limit=2");
    loop {
        let r = app.get(&uri, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for e in r.body["events"].as_array().unwrap() {
            notes.push(e["note"].as_str().unwrap().to_owned());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        notes,
        (0..5).map(|i| format!("event {i}")).collect::<Vec<_>>()
    );
    let r = app.get(&format!("{base}?machine=unit-2"), &key).await;
    assert_eq!(r.body["events"].as_array().unwrap().len(), 2, "{}", r.text);

    // The write is audited.
    assert!(
        audit_actions(&app, &org, &key)
            .await
            .contains(&"maintenance.record".to_owned())
    );

    // Bad input: 4xx naming the problem.
    let r = app
        .post(
            &base,
            &key,
            json!({ "device_id": dev, "machine": "", "kind": "failure", "ts": t0() }),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.text.contains("machine"), "{}", r.text);
    let r = app
        .post(
            &base,
            &key,
            json!({ "device_id": dev, "machine": "m", "kind": "explosion", "ts": t0() }),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = app.get(&format!("{base}?cursor=garbage"), &key).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.text.contains("cursor"), "{}", r.text);

    // Tenant isolation: another organisation's device is not found, its list is not readable,
    // and its own list holds none of these events.
    let r = app
        .post(
            &base,
            &key,
            json!({ "device_id": other_dev, "machine": "m", "kind": "failure", "ts": t0() }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = app
        .post(
            &format!("/v1/organisations/{other}/maintenance-events"),
            &key,
            json!({ "device_id": other_dev, "machine": "m", "kind": "failure", "ts": t0() }),
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{other}/maintenance-events"),
            &key,
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{other}/maintenance-events"),
            &other_key,
        )
        .await;
    assert_eq!(r.body["events"], json!([]), "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn feature_sets_are_validated_immutable_and_isolated(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (other, other_key) = app.org_with_key("b").await;
    let base = format!("/v1/organisations/{org}/feature-sets");

    let r = app.post(&base, &key, w30()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["id"], "cmapss-w30-v1");
    let sha = r.body["sha256"].as_str().unwrap().to_owned();
    // The same document again: idempotent.
    let r = app.post(&base, &key, w30()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["sha256"], sha.as_str());
    // Other content under the same id: refused, the id keeps its meaning.
    let mut changed = w30();
    changed["window_cycles"] = json!(20);
    let r = app.post(&base, &key, changed).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    // A document the interpreter refuses: 422 naming it; unknown fields: 400.
    let mut bad = w30();
    bad["id"] = json!("bad-window");
    bad["window_cycles"] = json!(0);
    let r = app.post(&base, &key, bad).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let mut unknown = w30();
    unknown["surprise"] = json!(1);
    let r = app.post(&base, &key, unknown).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);

    let r = app.get(&format!("{base}/cmapss-w30-v1"), &key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["document"]["signals"], w30()["signals"]);
    assert_eq!(app.get(&base, &key).await.body.as_array().unwrap().len(), 1);

    // Isolation: the other organisation sees nothing and may store its own under the same id.
    let obase = format!("/v1/organisations/{other}/feature-sets");
    let r = app.get(&format!("{obase}/cmapss-w30-v1"), &other_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert!(
        app.get(&format!("{base}/cmapss-w30-v1"), &other_key)
            .await
            .status
            .is_client_error()
    );
    let r = app.post(&obase, &other_key, w30()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn training_data_and_performance_belong_to_a_model_of_the_organisation(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (_, other_key) = app.org_with_key("b").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/feature-sets"),
            &key,
            w30(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models"),
            &key,
            json!({ "name": "rul-fd001", "version": "1.0.0", "kind": "rul" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let model = r.body["id"].as_str().unwrap().to_owned();
    let mbase = format!("/v1/organisations/{org}/models/{model}");

    let td = json!({
        "feature_set_id": "cmapss-w30-v1",
        "source": { "kind": "file", "name": "train_FD001.txt", "sha256": "ab" },
        "split": { "holdout_units": [1, 2, 3] },
        "seed": 42, "examples": 17000,
    });
    let r = app
        .call(
            Method::PUT,
            &format!("{mbase}/training-data"),
            Some(&key),
            Some(td.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.get(&format!("{mbase}/training-data"), &key).await;
    assert_eq!(r.body["seed"], 42, "{}", r.text);
    assert_eq!(r.body["split"]["holdout_units"], json!([1, 2, 3]));
    // An unknown feature set is refused by name.
    let mut unknown = td.clone();
    unknown["feature_set_id"] = json!("nope-v1");
    let r = app
        .call(
            Method::PUT,
            &format!("{mbase}/training-data"),
            Some(&key),
            Some(unknown),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.text.contains("feature_set_id"), "{}", r.text);

    for (set, rmse) in [("fd001-holdout", 8.95), ("fd001-test", 12.1)] {
        let r = app
            .post(
                &format!("{mbase}/performance"),
                &key,
                json!({ "evaluation_set": set, "source": "training", "rmse": rmse,
                        "phm08_score": 300.0, "examples": 20 }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    // Re-measuring replaces.
    let r = app
        .post(
            &format!("{mbase}/performance"),
            &key,
            json!({ "evaluation_set": "fd001-test", "source": "training", "rmse": 11.5, "examples": 20 }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app.get(&format!("{mbase}/performance"), &key).await;
    let rows = r.body.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{}", r.text);
    assert_eq!(rows[1]["rmse"], 11.5);
    let r = app
        .post(
            &format!("{mbase}/performance"),
            &key,
            json!({ "evaluation_set": "x", "source": "training", "rmse": -1.0, "examples": 1 }),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);

    // Isolation: the other organisation's key reaches none of it.
    for uri in [
        format!("{mbase}/training-data"),
        format!("{mbase}/performance"),
    ] {
        assert!(app.get(&uri, &other_key).await.status.is_client_error());
    }
    let r = app
        .post(
            &format!("{mbase}/performance"),
            &other_key,
            json!({ "evaluation_set": "y", "source": "agent", "examples": 1 }),
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM model_performance")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
}

async fn store_predictions(app: &common::App, org: &str, dev: &str, n: u64, anomaly: bool) {
    let records = (1..=n)
        .map(|seq| Sequenced {
            epoch: 1,
            seq,
            record: Record::Prediction(Prediction {
                machine: format!("unit-{}", seq % 2),
                model_version: "1.0.0".into(),
                ts: t0() + chrono::Duration::seconds(seq as i64),
                rul_cycles: 200.0 - seq as f64,
                anomaly_score: anomaly.then_some(seq as f64 / 100.0),
                model: None,
                role: None,
            }),
        })
        .collect();
    let batch = SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch: 1,
        first_seq: 1,
        last_seq: n,
        records,
        running_model: None,
        health: None,
    };
    let id = DeviceIdentity {
        org_id: org.parse().unwrap(),
        device_id: dev.parse().unwrap(),
    };
    ingest::store(&app.pool, id, &batch).await.unwrap();
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn predictions_latest_per_machine_and_history_by_keyset(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (other, other_key) = app.org_with_key("b").await;
    let d1 = device(&app, &org, &key, "gw-1").await;
    let d2 = device(&app, &org, &key, "gw-2").await;
    let dx = device(&app, &other, &other_key, "gw-x").await;
    store_predictions(&app, &org, &d1, 7, true).await;
    store_predictions(&app, &org, &d2, 4, true).await;
    store_predictions(&app, &other, &dx, 9, false).await;

    // Latest: one per (device, machine), the newest one.
    let r = app
        .get(&format!("/v1/organisations/{org}/predictions/latest"), &key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let latest = r.body.as_array().unwrap();
    assert_eq!(latest.len(), 4, "{}", r.text);
    let of = |dev: &str, machine: &str| {
        latest
            .iter()
            .find(|p| p["device_id"] == dev && p["machine"] == machine)
            .unwrap()
            .clone()
    };
    assert_eq!(of(&d1, "unit-1")["rul_cycles"], 193.0); // seq 7
    assert_eq!(of(&d1, "unit-0")["rul_cycles"], 194.0); // seq 6
    assert_eq!(of(&d2, "unit-0")["rul_cycles"], 196.0); // seq 4
    assert_eq!(of(&d1, "unit-1")["anomaly_score"], 0.07);
    let r = app
        .get(
            &format!("/v1/organisations/{org}/predictions/latest?device_id={d2}"),
            &key,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2, "{}", r.text);

    // History: pages of 3 across both devices, in time order, each row exactly once.
    let base = format!("/v1/organisations/{org}/predictions");
    let mut seen = Vec::new();
    let mut uri = format!("{base}?limit=3");
    loop {
        let r = app.get(&uri, &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for p in r.body["predictions"].as_array().unwrap() {
            seen.push((
                p["ts"].as_str().unwrap().to_owned(),
                p["device_id"].as_str().unwrap().to_owned(),
            ));
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => uri = format!("{base}?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 11);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 11);
    let r = app
        .get(&format!("{base}?device_id={d1}&machine=unit-1"), &key)
        .await;
    assert_eq!(
        r.body["predictions"].as_array().unwrap().len(),
        4,
        "{}",
        r.text
    );

    // Bad input and isolation.
    assert_eq!(
        app.get(&format!("{base}?limit=0"), &key).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        app.get(&format!("{base}?cursor=bm90LWEtY3Vyc29y"), &key)
            .await
            .status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let r = app.get(&format!("{base}?device_id={dx}"), &key).await;
    assert_eq!(r.body["predictions"], json!([]), "{}", r.text);
    assert!(
        app.get(&format!("/v1/organisations/{other}/predictions"), &key)
            .await
            .status
            .is_client_error()
    );
    let r = app
        .get(
            &format!("/v1/organisations/{other}/predictions/latest"),
            &other_key,
        )
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 2, "{}", r.text);
    assert!(r.body[0]["anomaly_score"].is_null());
}

/// Runs `kipctl` (the kit's in-process runner) with `key` against `server`.
async fn kipctl(server: &str, key: &str, org: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, key).unwrap();
    let mut argv = vec!["--org", org];
    argv.extend(args);
    let o = kip_tests::kipctl::run(server, &key_file, &argv).await;
    assert!(o.ok, "kipctl {argv:?}: {}", o.stderr);
    o.stdout
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn kipctl_records_and_lists_maintenance_events_and_shows_predictions(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let dev = device(&app, &org, &key, "gw-1").await;
    store_predictions(&app, &org, &dev, 3, true).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let service = app
        .router
        .clone()
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = app.tracker.spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, service)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        }
    });

    let out = kipctl(
        &server,
        &key,
        &org,
        &[
            "maintenance",
            "record",
            "--device",
            &dev,
            "--machine",
            "unit-1",
            "--kind",
            "failure",
            "--at",
            "2026-11-02T08:00:00Z",
            "--note",
            "bearing",
        ],
    )
    .await;
    assert!(out.contains("failure") && out.contains("unit-1"), "{out}");
    let out = kipctl(&server, &key, &org, &["--json", "maintenance", "list"]).await;
    let events: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(events[0]["note"], "bearing", "{out}");
    assert_eq!(events[0]["ts"], "2026-11-02T08:00:00Z");
    let out = kipctl(&server, &key, &org, &["predictions", "latest"]).await;
    assert!(out.contains("unit-1") && out.contains("197.0"), "{out}");
    let out = kipctl(
        &server,
        &key,
        &org,
        &["predictions", "history", "--limit", "2"],
    )
    .await;
    assert!(out.contains("# more: --cursor"), "{out}");

    stop.cancel();
    served.await.unwrap();
}
