//! The MLflow mirror of the model registry, against a real MLflow server started here
//! (`pip install mlflow`), and its failure path against an unreachable one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers"
)]

mod common;

use std::time::Duration;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use kip_control_plane::models::mlflow::MlflowConfig;
use serde_json::{Value, json};
use sqlx::PgPool;

async fn alias(url: &str, name: &str, alias: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(format!(
            "{url}/api/2.0/mlflow/registered-models/alias?name={name}&alias={alias}"
        ))
        .send()
        .await
        .unwrap();
    // MLflow answers a missing alias with 400 (not 404).
    if r.status().is_success() {
        Some(r.json::<Value>().await.unwrap()["model_version"].clone())
    } else {
        None
    }
}

fn cfg(url: &str) -> MlflowConfig {
    MlflowConfig {
        tracking_uri: url.to_owned(),
        kip_public_url: "http://kip.example:8080".into(),
        request_timeout: Duration::from_secs(10),
        // These tests drive the aliases from kip: the poller (first poll at start, before any
        // model exists) stays out of their way.
        alias_poll_interval: Duration::from_secs(3600),
    }
}

fn rustls() {
    kip_control_plane::init_tracing(kip_control_plane::config::LogFormat::Text, "warn");
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn registrations_and_aliases_are_mirrored_to_a_real_mlflow(pool: PgPool) {
    rustls();
    // The kit's fixture kills MLflow's whole process group (uvicorn, job runner, huey workers)
    // on drop; killing only the direct child left nine processes behind.
    let ml = kip_tests::MlflowServer::start().await;
    let url = ml.url().to_owned();
    let app = common::app_with(pool, |c| c.mlflow = Some(cfg(&url))).await;
    let (org, key) = app.org_with_key("acme").await;
    let mut ids = Vec::new();
    for v in ["1.0.0", "1.1.0"] {
        let r = app
            .post(
                &format!("/v1/organisations/{org}/models"),
                &key,
                json!({ "name": "rul-fd001", "version": v, "kind": "rul", "metrics": { "rmse": 15.5 } }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        ids.push(r.body["id"].as_str().unwrap().to_owned());
    }
    let stage = async |id: &str, s: &str| {
        app.post(
            &format!("/v1/organisations/{org}/models/{id}/stage"),
            &key,
            json!({ "stage": s }),
        )
        .await
    };
    assert_eq!(stage(&ids[0], "champion").await.status, StatusCode::OK);
    let champ = alias(&url, "rul-fd001", "champion").await.unwrap();
    assert_eq!(champ["version"], "1");
    assert_eq!(
        champ["source"],
        format!(
            "kip://kip.example:8080/v1/organisations/{org}/models/{}/artifact",
            ids[0]
        )
    );
    let tags = champ["tags"].as_array().unwrap();
    assert!(
        tags.iter()
            .any(|t| t["key"] == "kip.version" && t["value"] == "1.0.0")
    );

    // Promoting 1.1.0 moves the alias; 1.0.0 (demoted in kip) no longer holds it.
    assert_eq!(stage(&ids[1], "champion").await.status, StatusCode::OK);
    assert_eq!(
        alias(&url, "rul-fd001", "champion").await.unwrap()["version"],
        "2"
    );
    assert_eq!(stage(&ids[0], "challenger").await.status, StatusCode::OK);
    assert_eq!(
        alias(&url, "rul-fd001", "challenger").await.unwrap()["version"],
        "1"
    );
    // Leaving champion removes the alias.
    assert_eq!(stage(&ids[1], "archived").await.status, StatusCode::OK);
    assert!(alias(&url, "rul-fd001", "champion").await.is_none());
    assert!(
        !app.state
            .metrics
            .render()
            .contains("kip_mlflow_sync_failures_total 1")
    );
    assert_eq!(app.state.metrics.mlflow_sync_failures.get(), 0);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_unreachable_mlflow_is_counted_and_never_fails_kip(pool: PgPool) {
    rustls();
    let url = format!("http://127.0.0.1:{}", kip_tests::free_port());
    let app = common::app_with(pool, |c| c.mlflow = Some(cfg(&url))).await;
    let (org, key) = app.org_with_key("acme").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models"),
            &key,
            json!({ "name": "rul-fd001", "version": "1.0.0", "kind": "rul" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap();
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models/{id}/stage"),
            &key,
            json!({ "stage": "champion" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["stage"], "champion");
    assert_eq!(app.state.metrics.mlflow_sync_failures.get(), 2);
    assert!(
        app.state
            .metrics
            .render()
            .contains("kip_mlflow_sync_failures_total 2")
    );
}

async fn set_alias(url: &str, name: &str, alias: &str, version: &str) {
    let r = reqwest::Client::new()
        .post(format!("{url}/api/2.0/mlflow/registered-models/alias"))
        .json(&json!({ "name": name, "alias": alias, "version": version }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_mlflow_champion_alias_rolls_the_fleet_out_and_back(pool: PgPool) {
    rustls();
    let ml = kip_tests::MlflowServer::start().await;
    let url = ml.url().to_owned();
    let app = common::app_with(pool.clone(), |c| {
        c.mlflow = Some(MlflowConfig {
            alias_poll_interval: Duration::from_millis(300),
            ..cfg(&url)
        });
    })
    .await;
    let (org, key) = app.org_with_key("acme").await;
    let org_id: uuid::Uuid = org.parse().unwrap();
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            &key,
            json!({ "name": "gw-1", "labels": { "line": "a" } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let dev = r.body["id"].as_str().unwrap().to_owned();
    let dev_id: uuid::Uuid = dev.parse().unwrap();
    // Another organisation's device on the same model name is not a rollout target.
    let (org_b, key_b) = app.org_with_key("other").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/devices"),
            &key_b,
            json!({ "name": "gw-b", "labels": {} }),
        )
        .await;
    let dev_b: uuid::Uuid = r.body["id"].as_str().unwrap().parse().unwrap();

    let mut ids = Vec::new();
    for v in ["1.0.0", "1.1.0"] {
        let r = app
            .post(
                &format!("/v1/organisations/{org}/models"),
                &key,
                json!({ "name": "rul-fd001", "version": v, "kind": "rul" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().unwrap().to_owned();
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("/v1/organisations/{org}/models/{id}/artifact"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/octet-stream")
            .body(Body::from(format!("model-{v}")))
            .unwrap();
        assert_eq!(app.raw(req).await.status, StatusCode::CREATED);
        ids.push(id);
    }
    // Org B registers its own model of the same name: it has no MLflow version of ours.
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/models"),
            &key_b,
            json!({ "name": "rul-fd001", "version": "9.9.9", "kind": "rul" }),
        )
        .await;
    let id_b = r.body["id"].as_str().unwrap().to_owned();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v1/organisations/{org_b}/models/{id_b}/artifact"))
        .header("authorization", format!("Bearer {key_b}"))
        .body(Body::from("model-b"))
        .unwrap();
    assert_eq!(app.raw(req).await.status, StatusCode::CREATED);
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/organisations/{org_b}/devices/{dev_b}/desired-model"),
            Some(&key_b),
            Some(json!({ "model_id": id_b })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The device runs 1.0.0 today.
    let r = app
        .call(
            Method::PUT,
            &format!("/v1/organisations/{org}/devices/{dev}/desired-model"),
            Some(&key),
            Some(json!({ "model_id": ids[0] })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    let desired = async |want: &'static str| {
        kip_tests::eventually(Duration::from_secs(30), || async {
            let d = kip_control_plane::models::desired_for(&pool, org_id, dev_id)
                .await
                .unwrap()
                .map(|d| d.version);
            if d.as_deref() == Some(want) {
                Ok(())
            } else {
                Err(format!("desired {d:?}, want {want}"))
            }
        })
        .await
        .unwrap();
    };
    // Through the audit API, as an operator reads it.
    let audited = async |reason: &str| -> bool {
        let r = app
            .get(&format!("/v1/organisations/{org}/audit"), &key)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body["items"].as_array().unwrap().iter().any(|e| {
            e["action"] == "models.mlflow_rollout"
                && e["key_name"] == "mlflow-alias-poller"
                && e["target"].as_str().unwrap().starts_with(reason)
        })
    };

    // Champion -> MLflow version 2 (kip 1.1.0): the device's desired model follows.
    set_alias(&url, "rul-fd001", "champion", "2").await;
    desired("1.1.0").await;
    assert!(audited("mlflow alias champion -> v2").await);
    let m = app
        .get(&format!("/v1/organisations/{org}/models/{}", ids[1]), &key)
        .await;
    assert_eq!(m.body["stage"], "champion");
    // Rolling back in MLflow rolls the device back.
    set_alias(&url, "rul-fd001", "champion", "1").await;
    desired("1.0.0").await;
    assert!(audited("mlflow alias champion -> v1").await);
    let m = app
        .get(&format!("/v1/organisations/{org}/models/{}", ids[1]), &key)
        .await;
    assert_eq!(m.body["stage"], "none");
    // The other organisation's rollout was never touched.
    let b = kip_control_plane::models::desired_for(&pool, org_b.parse().unwrap(), dev_b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.version, "9.9.9");
    assert!(app.state.metrics.mlflow_poll.last_success.get() > 0);
    assert_eq!(app.state.metrics.mlflow_poll.errors.get(), 0);

    // MLflow goes away: kip keeps answering from its own tables and counts the failed polls.
    drop(ml);
    kip_tests::eventually(Duration::from_secs(30), || async {
        let n = app.state.metrics.mlflow_poll.errors.get();
        if n >= 2 { Ok(()) } else { Err(n) }
    })
    .await
    .unwrap();
    assert!(
        app.state
            .metrics
            .render()
            .contains("kip_mlflow_sync_errors_total")
    );
    let r = app
        .get(&format!("/v1/organisations/{org}/models"), &key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let d = kip_control_plane::models::desired_for(&pool, org_id, dev_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.version, "1.0.0");
}

/// `kip_mlflow_up` as the control plane exports it (`None` when absent).
fn mlflow_up(app: &common::App) -> Option<String> {
    app.state
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with("kip_mlflow_up "))
        .map(|l| l["kip_mlflow_up ".len()..].to_owned())
}

/// Registers `name@version` in `org` with an artifact of `bytes`; the model id.
async fn register_with_artifact(
    app: &common::App,
    org: &str,
    key: &str,
    name: &str,
    version: &str,
    bytes: &[u8],
) -> String {
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models"),
            key,
            json!({ "name": name, "version": version, "kind": "rul", "artifact_sha256": sha }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/v1/organisations/{org}/models/{id}/artifact"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/octet-stream")
        .body(Body::from(bytes.to_vec()))
        .unwrap();
    let r = app.raw(req).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    id
}

/// MLflow stops mid-way: kip's own rollouts keep working, and the control plane says MLflow is
/// unreachable (status API, `kip_mlflow_up`, error counter); MLflow comes back: the status
/// says so and the champion alias is followed again.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn mlflow_down_kip_keeps_rolling_out_says_so_and_follows_the_alias_once_back(pool: PgPool) {
    rustls();
    let mut ml = kip_tests::MlflowServer::start().await;
    let url = ml.url().to_owned();
    let app = common::app_with(pool.clone(), |c| {
        c.mlflow = Some(MlflowConfig {
            alias_poll_interval: Duration::from_millis(300),
            ..cfg(&url)
        });
    })
    .await;
    let (org, key) = app.org_with_key("acme").await;
    let org_id: uuid::Uuid = org.parse().unwrap();
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            &key,
            json!({ "name": "gw-1", "labels": {} }),
        )
        .await;
    let dev = r.body["id"].as_str().unwrap().to_owned();
    let dev_id: uuid::Uuid = dev.parse().unwrap();
    let v1 = register_with_artifact(&app, &org, &key, "rul-fd001", "1.0.0", b"model-1").await;
    let v2 = register_with_artifact(&app, &org, &key, "rul-fd001", "1.1.0", b"model-2").await;
    let put_desired = async |id: &str| {
        let r = app
            .call(
                Method::PUT,
                &format!("/v1/organisations/{org}/devices/{dev}/desired-model"),
                Some(&key),
                Some(json!({ "model_id": id })),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    };
    put_desired(&v1).await;
    let status_is = async |want: &'static str| -> Value {
        kip_tests::eventually(Duration::from_secs(60), || async {
            let r = app.get("/v1/mlflow/status", &key).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            if r.body["state"] == want {
                Ok(r.body)
            } else {
                Err(r.body)
            }
        })
        .await
        .unwrap()
    };
    let desired = async |want: &'static str| {
        kip_tests::eventually(Duration::from_secs(30), || async {
            let d = kip_control_plane::models::desired_for(&pool, org_id, dev_id)
                .await
                .unwrap()
                .map(|d| d.version);
            if d.as_deref() == Some(want) {
                Ok(())
            } else {
                Err(format!("desired {d:?}, want {want}"))
            }
        })
        .await
        .unwrap();
    };

    let s = status_is("reachable").await;
    assert_eq!(s["configured"], true);
    assert_eq!(s["tracking_uri"], url.as_str());
    assert!(s["last_successful_poll_at"].is_string(), "{s}");
    assert_eq!(mlflow_up(&app).as_deref(), Some("1"));

    // MLflow stops.
    ml.stop();
    let s = status_is("unreachable").await;
    assert_eq!(s["reachable"], false);
    let cause = s["last_error"].as_str().unwrap();
    assert!(cause.contains("registered-models"), "{s}");
    assert!(s["sync_errors_total"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(mlflow_up(&app).as_deref(), Some("0"));
    // kip's own rollout still works: 1.1.0 becomes the champion and the device's model.
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models/{v2}/stage"),
            &key,
            json!({ "stage": "champion" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    put_desired(&v2).await;
    desired("1.1.0").await;
    let r = app
        .get(&format!("/v1/organisations/{org}/model-status"), &key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Polls keep failing and change nothing.
    let errors = app.state.metrics.mlflow_poll.errors.get();
    kip_tests::eventually(Duration::from_secs(30), || async {
        let n = app.state.metrics.mlflow_poll.errors.get();
        if n > errors { Ok(()) } else { Err(n) }
    })
    .await
    .unwrap();
    desired("1.1.0").await;

    // MLflow is back: reachable again, and moving the alias in MLflow rolls the device.
    ml.restart().await;
    let s = status_is("reachable").await;
    assert!(
        s["last_error"].is_string(),
        "the last cause stays visible: {s}"
    );
    assert_eq!(mlflow_up(&app).as_deref(), Some("1"));
    desired("1.1.0").await;
    set_alias(&url, "rul-fd001", "champion", "1").await;
    desired("1.0.0").await;
}

/// The MLflow version `kip-train --mlflow` created from its run (tag `kip.artifact_sha256`) is
/// adopted at registration instead of a second one; another organisation registering the same
/// bytes does not take it over.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_version_created_by_a_training_run_is_adopted_not_duplicated(pool: PgPool) {
    use sha2::Digest as _;
    rustls();
    let ml = kip_tests::MlflowServer::start().await;
    let url = ml.url().to_owned();
    let api = format!("{url}/api/2.0/mlflow");
    let http = reqwest::Client::new();
    let post = async |path: &str, body: Value| -> Value {
        let r = http
            .post(format!("{api}/{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}");
        r.json().await.unwrap()
    };
    // What kip-train does: a run, then a model version from it tagged with the sha256.
    let bytes = b"trained-model";
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    let run = post("runs/create", json!({ "experiment_id": "0" })).await;
    let run_id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
    let artifact_uri = run["run"]["info"]["artifact_uri"]
        .as_str()
        .unwrap()
        .to_owned();
    post("registered-models/create", json!({ "name": "rul-fd003" })).await;
    let mv = post(
        "model-versions/create",
        json!({ "name": "rul-fd003", "source": format!("{artifact_uri}/model"), "run_id": run_id,
                "tags": [{ "key": "kip.artifact_sha256", "value": sha }] }),
    )
    .await;
    assert_eq!(mv["model_version"]["version"], "1");

    let app = common::app_with(pool.clone(), |c| c.mlflow = Some(cfg(&url))).await;
    let (org, key) = app.org_with_key("acme").await;
    let id = register_with_artifact(&app, &org, &key, "rul-fd003", "1.1.0+seed1", bytes).await;
    let known: Option<String> =
        sqlx::query_scalar("SELECT mlflow_version FROM ai_models WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(known.as_deref(), Some("1"));
    let versions = |filter: &'static str| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let url = reqwest::Url::parse_with_params(
                &format!("{api}/model-versions/search"),
                [("filter", filter)],
            )
            .unwrap();
            let r: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            r["model_versions"].as_array().cloned().unwrap_or_default()
        }
    };
    let all = versions("name = 'rul-fd003'").await;
    assert_eq!(all.len(), 1, "no second version: {all:?}");
    assert_eq!(all[0]["run_id"], run_id.as_str());
    let tag = all[0]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "kip.model_id")
        .map(|t| t["value"].clone());
    assert_eq!(tag, Some(Value::String(id.clone())));

    // Another organisation, same name and bytes: its own version, ours untouched.
    let (org_b, key_b) = app.org_with_key("other").await;
    let id_b =
        register_with_artifact(&app, &org_b, &key_b, "rul-fd003", "1.1.0+seed1", bytes).await;
    let known_b: Option<String> =
        sqlx::query_scalar("SELECT mlflow_version FROM ai_models WHERE id = $1::uuid")
            .bind(&id_b)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(known_b.as_deref(), Some("2"));
    let all = versions("name = 'rul-fd003'").await;
    assert_eq!(all.len(), 2, "{all:?}");
}

/// Sets tag `key` of MLflow version `version` of `name`.
async fn set_version_tag(url: &str, name: &str, version: &str, key: &str, value: &str) {
    let r = reqwest::Client::new()
        .post(format!("{url}/api/2.0/mlflow/model-versions/set-tag"))
        .json(&json!({ "name": name, "version": version, "key": key, "value": value }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
}

/// Stores `records` as one batch of `dev` (epoch `epoch`) through the sync's ingest function.
async fn sync_records(
    pool: &PgPool,
    org: uuid::Uuid,
    dev: uuid::Uuid,
    epoch: u64,
    records: Vec<kip_shared::Record>,
) {
    let n = records.len() as u64;
    let batch = kip_shared::sync::SyncBatch {
        protocol_version: 1,
        agent_version: String::new(),
        epoch,
        first_seq: 1,
        last_seq: n,
        records: records
            .into_iter()
            .enumerate()
            .map(|(i, record)| kip_shared::Sequenced {
                epoch,
                seq: i as u64 + 1,
                record,
            })
            .collect(),
        running_model: None,
        health: None,
    };
    let id = kip_control_plane::telemetry::ingest::DeviceIdentity {
        org_id: org,
        device_id: dev,
    };
    let stored = kip_control_plane::telemetry::ingest::store(pool, id, &batch)
        .await
        .unwrap();
    assert_eq!(stored.inserted, n);
}

/// The MLflow `challenger` alias selects the shadow: the version it names runs beside the
/// group's champion on the group's devices through a shadow rollout (share and thresholds
/// from the version's `kip.rollout.*` tags) whose report and automatic halt cover it; moving
/// the alias moves the shadow (a rollout kip halted is not restarted), MLflow going away
/// changes nothing, and removing the alias removes the shadow.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_mlflow_challenger_alias_runs_the_shadow_beside_the_champion_and_removing_it_stops_it(
    pool: PgPool,
) {
    use kip_shared::{ModelRole, ModelStats, Prediction, Record};
    rustls();
    let mut ml = kip_tests::MlflowServer::start().await;
    let url = ml.url().to_owned();
    let app = common::app_with(pool.clone(), |c| {
        c.mlflow = Some(MlflowConfig {
            alias_poll_interval: Duration::from_millis(300),
            ..cfg(&url)
        });
    })
    .await;
    let (org, key) = app.org_with_key("acme").await;
    let org_id: uuid::Uuid = org.parse().unwrap();
    let mut devs = Vec::new();
    for name in ["gw-1", "gw-2"] {
        let r = app
            .post(
                &format!("/v1/organisations/{org}/devices"),
                &key,
                json!({ "name": name, "labels": { "line": "a" } }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        devs.push(
            r.body["id"]
                .as_str()
                .unwrap()
                .parse::<uuid::Uuid>()
                .unwrap(),
        );
    }
    let v1 = register_with_artifact(&app, &org, &key, "rul-fd001", "1.0.0", b"model-1").await;
    let v2 = register_with_artifact(&app, &org, &key, "rul-fd001", "1.1.0", b"model-2").await;
    let v3 = register_with_artifact(&app, &org, &key, "rul-fd001", "1.2.0", b"model-3").await;
    // The group runs 1.0.0 (MLflow version 1), the champion.
    let selector = json!({ "line": "a" }).as_object().unwrap().clone();
    kip_control_plane::models::set_desired_model_for_group(
        &pool,
        org_id,
        &selector,
        Some(v1.parse().unwrap()),
    )
    .await
    .unwrap();
    set_alias(&url, "rul-fd001", "champion", "1").await;

    let shadow_is = async |want: Option<&'static str>| {
        kip_tests::eventually(Duration::from_secs(30), || async {
            let mut seen = Vec::new();
            for d in &devs {
                let champion = kip_control_plane::models::desired_for(&pool, org_id, *d)
                    .await
                    .unwrap()
                    .map(|m| m.version);
                let shadow = kip_control_plane::models::desired_shadow_for(&pool, org_id, *d)
                    .await
                    .unwrap()
                    .map(|m| m.version);
                seen.push((champion, shadow));
            }
            let ok = seen
                .iter()
                .all(|(c, s)| c.as_deref() == Some("1.0.0") && s.as_deref() == want);
            if ok { Ok(()) } else { Err(seen) }
        })
        .await
        .unwrap();
    };
    let rollouts = async || -> Vec<Value> {
        let r = app
            .get(&format!("/v1/organisations/{org}/model-rollouts"), &key)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.body.as_array().unwrap().clone()
    };
    let stage = async |id: &str| -> Value {
        app.get(&format!("/v1/organisations/{org}/models/{id}"), &key)
            .await
            .body["stage"]
            .clone()
    };

    // Challenger -> MLflow version 2 (1.1.0), with a threshold in its tags: both devices of
    // the group run it as the shadow beside 1.0.0.
    set_version_tag(
        &url,
        "rul-fd001",
        "2",
        "kip.rollout.max_inference_failures",
        "5",
    )
    .await;
    set_alias(&url, "rul-fd001", "challenger", "2").await;
    shadow_is(Some("1.1.0")).await;
    let all = rollouts().await;
    assert_eq!(all.len(), 1, "{all:?}");
    let r2 = &all[0];
    assert_eq!(
        (&r2["origin"], &r2["mode"], &r2["state"], &r2["percent"]),
        (
            &json!("mlflow"),
            &json!("shadow"),
            &json!("active"),
            &json!(100)
        )
    );
    assert_eq!(r2["model"], "rul-fd001@1.1.0");
    assert_eq!(r2["baseline_model"], "rul-fd001@1.0.0");
    assert_eq!(r2["thresholds"]["max_inference_failures"], 5);
    let r2_id = r2["id"].as_str().unwrap().to_owned();
    assert_eq!(stage(&v2).await, "challenger");
    let audit = app
        .get(&format!("/v1/organisations/{org}/audit"), &key)
        .await;
    assert!(
        audit.body["items"].as_array().unwrap().iter().any(|e| {
            e["action"] == "models.mlflow_challenger"
                && e["target"]
                    .as_str()
                    .unwrap()
                    .contains("mlflow: alias challenger -> v2 (rul-fd001@1.1.0): shadow 100%")
        }),
        "{}",
        audit.text
    );

    // Both predictions sync (as the agent sends them: the champion's untagged, the shadow's
    // tagged) and the rollout's report compares them.
    let t = chrono::Utc::now();
    let mut records = Vec::new();
    for i in 0..5 {
        let ts = t + chrono::Duration::milliseconds(i);
        records.push(Record::Prediction(Prediction {
            machine: "engine-1".into(),
            model_version: "1.0.0".into(),
            ts,
            rul_cycles: 100.0 - i as f64,
            anomaly_score: None,
            model: None,
            role: None,
        }));
        records.push(Record::Prediction(Prediction {
            machine: "engine-1".into(),
            model_version: "1.1.0".into(),
            ts,
            rul_cycles: 104.0 - i as f64,
            anomaly_score: None,
            model: Some("rul-fd001".into()),
            role: Some(ModelRole::Shadow),
        }));
    }
    sync_records(&pool, org_id, devs[0], 1, records).await;
    let report = app
        .get(
            &format!("/v1/organisations/{org}/model-rollouts/{r2_id}/report"),
            &key,
        )
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.text);
    assert_eq!(
        report.body["candidate"]["predictions_shadow"], 5,
        "{}",
        report.text
    );
    assert_eq!(
        report.body["baseline"]["predictions_champion"], 5,
        "{}",
        report.text
    );
    assert_eq!(report.body["agreement"]["pairs"], 5, "{}", report.text);
    assert_eq!(
        report.body["agreement"]["mean_abs_diff_cycles"].as_f64(),
        Some(4.0)
    );

    // The candidate fails 6 inferences (> 5, its tag): halted and rolled back like any rollout.
    sync_records(
        &pool,
        org_id,
        devs[1],
        1,
        vec![Record::ModelStats(ModelStats {
            model: "rul-fd001".into(),
            model_version: "1.1.0".into(),
            role: ModelRole::Shadow,
            ts: chrono::Utc::now(),
            predictions: 44,
            failures: 6,
            latency_p50_us: Some(10.0),
            latency_p99_us: Some(40.0),
            latency_max_us: Some(50.0),
        })],
    )
    .await;
    kip_control_plane::ml::compare::evaluate_once(&pool, &app.state.metrics.model_rollouts)
        .await
        .unwrap();
    shadow_is(None).await;
    let r = app
        .get(
            &format!("/v1/organisations/{org}/model-rollouts/{r2_id}"),
            &key,
        )
        .await;
    assert_eq!(r.body["state"], "rolled_back", "{}", r.text);
    assert!(
        r.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| { e["kind"] == "auto_halted" && e["reason"] == "inference_failures" }),
        "{}",
        r.text
    );

    // The alias moves to version 3 (1.2.0): a new shadow; the halted 1.1.0 is not restarted.
    set_alias(&url, "rul-fd001", "challenger", "3").await;
    shadow_is(Some("1.2.0")).await;
    let all = rollouts().await;
    let of = |m: &str| {
        all.iter()
            .filter(|r| r["model"] == format!("rul-fd001@{m}"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("1.1.0").len(), 1, "{all:?}");
    assert_eq!(of("1.1.0")[0]["state"], "rolled_back");
    let r3 = of("1.2.0");
    assert_eq!(r3.len(), 1, "{all:?}");
    assert_eq!(r3[0]["state"], "active");
    assert_eq!(r3[0]["origin"], "mlflow");
    // No tags on version 3: the API's defaults (no limit set).
    assert_eq!(r3[0]["thresholds"]["max_inference_failures"], Value::Null);
    let r3_id = r3[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(stage(&v3).await, "challenger");
    assert_eq!(stage(&v2).await, "none");

    // MLflow goes away: kip keeps the shadow and the rollout from its own tables.
    ml.stop();
    kip_tests::eventually(Duration::from_secs(60), || async {
        let r = app.get("/v1/mlflow/status", &key).await;
        if r.body["state"] == "unreachable" {
            Ok(())
        } else {
            Err(r.body)
        }
    })
    .await
    .unwrap();
    shadow_is(Some("1.2.0")).await;
    let r = app
        .get(
            &format!("/v1/organisations/{org}/model-rollouts/{r3_id}"),
            &key,
        )
        .await;
    assert_eq!(r.body["state"], "active", "{}", r.text);

    // Back, and the alias removed: the shadow stops, the rollout ends naming why.
    ml.restart().await;
    let r = reqwest::Client::new()
        .delete(format!("{url}/api/2.0/mlflow/registered-models/alias"))
        .json(&json!({ "name": "rul-fd001", "alias": "challenger" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    shadow_is(None).await;
    let r = app
        .get(
            &format!("/v1/organisations/{org}/model-rollouts/{r3_id}"),
            &key,
        )
        .await;
    assert_eq!(r.body["state"], "halted", "{}", r.text);
    assert_eq!(r.body["halt_reason"], "mlflow: alias challenger removed");
    assert_eq!(stage(&v3).await, "none");
    // The champion never moved.
    assert_eq!(stage(&v1).await, "champion");

    // The alias set again (the poller, not kip, ended the last one): a shadow again; then
    // `champion` moves to it: the group runs 1.2.0 and the challenger's rollout is promoted.
    set_alias(&url, "rul-fd001", "challenger", "3").await;
    shadow_is(Some("1.2.0")).await;
    set_alias(&url, "rul-fd001", "champion", "3").await;
    let promoted = kip_tests::eventually(Duration::from_secs(30), || async {
        let all = rollouts().await;
        match all.iter().find(|r| r["state"] == "promoted") {
            Some(r) => Ok(r.clone()),
            None => Err(all),
        }
    })
    .await
    .unwrap();
    assert_eq!(promoted["model"], "rul-fd001@1.2.0");
    assert_eq!(promoted["origin"], "mlflow");
    for d in &devs {
        let m = kip_control_plane::models::desired_for(&pool, org_id, *d)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.version, "1.2.0");
        // Champion and challenger are one version now: no shadow.
        assert!(
            kip_control_plane::models::desired_shadow_for(&pool, org_id, *d)
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(stage(&v3).await, "champion");
}
