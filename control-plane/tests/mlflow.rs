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

use axum::http::StatusCode;
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
