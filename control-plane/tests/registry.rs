//! Model registry: artifacts, champion/challenger, rollout to devices and the device-facing
//! artifact download. Each test gets a fresh database (`sqlx::test`).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

mod common;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
};
use common::{App, Resp};
use kip_certs::{DeviceKey, FleetCa, certs_from_pem};
use kip_control_plane::models;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tower::ServiceExt as _;
use uuid::Uuid;

async fn put_bytes(app: &App, uri: &str, key: &str, bytes: &[u8]) -> Resp {
    let req = Request::builder()
        .method(Method::PUT)
        .uri(uri)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/octet-stream")
        .body(Body::from(bytes.to_vec()))
        .unwrap();
    app.raw(req).await
}

async fn put_json(app: &App, uri: &str, key: &str, body: Value) -> Resp {
    app.call(Method::PUT, uri, Some(key), Some(body)).await
}

async fn register(app: &App, org: &str, key: &str, version: &str, sha: Option<&str>) -> String {
    let mut body = json!({ "name": "rul-fd001", "version": version, "kind": "rul",
                           "metrics": { "rmse": 15.1 } });
    if let Some(s) = sha {
        body["artifact_sha256"] = json!(s);
    }
    let r = app
        .post(&format!("/v1/organisations/{org}/models"), key, body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn device(app: &App, org: &str, key: &str, name: &str, labels: Value) -> String {
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            key,
            json!({ "name": name, "labels": labels }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_artifact_is_uploaded_once_downloaded_and_checked_against_its_hash(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("acme").await;
    let bytes = b"onnx model bytes".to_vec();
    let id = register(&app, &org, &key, "1.0.0", None).await;
    let uri = format!("/v1/organisations/{org}/models/{id}/artifact");

    let r = app.get(&uri, &key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);

    let r = put_bytes(&app, &uri, &key, &bytes).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["sha256"], sha(&bytes));
    // The hash was not registered: the upload recorded it.
    let r = app
        .get(&format!("/v1/organisations/{org}/models/{id}"), &key)
        .await;
    assert_eq!(r.body["artifact_sha256"], sha(&bytes));
    // Same bytes again: idempotent. Other bytes: refused, the artifact is immutable.
    let r = put_bytes(&app, &uri, &key, &bytes).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = put_bytes(&app, &uri, &key, b"other").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.message().contains("does not match"), "{}", r.text);

    let resp = app
        .router
        .clone()
        .oneshot(
            Request::get(&uri)
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-kip-sha256"], sha(&bytes).as_str());
    let got = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    assert_eq!(&got[..], &bytes[..]);

    // A registered hash must match the first upload too.
    let id2 = register(&app, &org, &key, "1.0.1", Some(&sha(b"expected"))).await;
    let uri2 = format!("/v1/organisations/{org}/models/{id2}/artifact");
    let r = put_bytes(&app, &uri2, &key, b"unexpected").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let r = put_bytes(&app, &uri2, &key, b"expected").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = put_bytes(&app, &uri2, &key, b"").await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
}

/// Artifacts are stored in 1 MiB chunk rows and streamed back whole; an upload over the limit
/// is refused with 413 and leaves nothing behind (hole 6 of issue 13).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_multi_chunk_artifact_round_trips_and_an_oversized_one_is_refused(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("acme").await;
    let bytes: Vec<u8> = (0..(2 * 1024 * 1024 + 12_345))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let id = register(&app, &org, &key, "1.0.0", None).await;
    let uri = format!("/v1/organisations/{org}/models/{id}/artifact");
    let r = put_bytes(&app, &uri, &key, &bytes).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["sha256"], sha(&bytes));
    assert_eq!(r.body["size_bytes"], json!(bytes.len()));
    let sizes: Vec<i32> = sqlx::query_scalar(
        "SELECT length(bytes) FROM model_artifact_chunks WHERE model_id = $1::uuid ORDER BY idx",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sizes, vec![1024 * 1024, 1024 * 1024, 12_345]);
    let resp = app
        .router
        .clone()
        .oneshot(
            Request::get(&uri)
                .header("authorization", format!("Bearer {key}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-length"],
        bytes.len().to_string().as_str()
    );
    let got = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    assert!(got[..] == bytes[..], "the downloaded artifact differs");

    // Over 64 MiB: refused without storing any chunk of it.
    let id2 = register(&app, &org, &key, "2.0.0", None).await;
    let big = vec![7u8; 64 * 1024 * 1024 + 1];
    let r = put_bytes(
        &app,
        &format!("/v1/organisations/{org}/models/{id2}/artifact"),
        &key,
        &big,
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM model_artifact_chunks WHERE model_id = $1::uuid")
            .bind(&id2)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn another_organisation_cannot_read_or_write_an_artifact(pool: PgPool) {
    let app = common::app(pool).await;
    let (org, key) = app.org_with_key("acme").await;
    let (org_b, key_b) = app.org_with_key("globex").await;
    let id = register(&app, &org, &key, "1.0.0", None).await;
    let uri = format!("/v1/organisations/{org}/models/{id}/artifact");
    assert_eq!(
        put_bytes(&app, &uri, &key, b"m").await.status,
        StatusCode::CREATED
    );
    // Another organisation's path is answered as if it did not exist.
    assert_eq!(app.get(&uri, &key_b).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        put_bytes(&app, &uri, &key_b, b"m").await.status,
        StatusCode::NOT_FOUND
    );
    // Through its own organisation path the model simply does not exist.
    let uri_b = format!("/v1/organisations/{org_b}/models/{id}/artifact");
    assert_eq!(app.get(&uri_b, &key_b).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        put_bytes(&app, &uri_b, &key_b, b"m").await.status,
        StatusCode::NOT_FOUND
    );
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/models/{id}/stage"),
            &key_b,
            json!({ "stage": "champion" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn promoting_a_champion_demotes_the_previous_one(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("acme").await;
    let a = register(&app, &org, &key, "1.0.0", None).await;
    let b = register(&app, &org, &key, "1.1.0", None).await;
    let stage = |id: String, s: &'static str| {
        let app = &app;
        let key = key.clone();
        let org = org.clone();
        async move {
            app.post(
                &format!("/v1/organisations/{org}/models/{id}/stage"),
                &key,
                json!({ "stage": s }),
            )
            .await
        }
    };
    assert_eq!(stage(a.clone(), "champion").await.body["stage"], "champion");
    assert_eq!(
        stage(b.clone(), "challenger").await.body["stage"],
        "challenger"
    );
    let r = stage(b.clone(), "champion").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let stages: Vec<(String, String)> =
        sqlx::query_as("SELECT version, stage FROM ai_models ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        stages,
        vec![
            ("1.0.0".into(), "none".into()),
            ("1.1.0".into(), "champion".into())
        ]
    );
    let r = stage(b.clone(), "retired").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // Registering a second champion directly is a conflict naming the fix.
    let r = app
        .post(
            &format!("/v1/organisations/{org}/models"),
            &key,
            json!({ "name": "rul-fd001", "version": "2.0.0", "kind": "rul", "stage": "champion" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert!(r.message().contains("/stage"), "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_rollout_names_the_desired_model_of_a_device_and_reports_its_status(pool: PgPool) {
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("acme").await;
    let org_id: Uuid = org.parse().unwrap();
    let dev = device(&app, &org, &key, "gw-1", json!({ "line": "a" })).await;
    let other = device(&app, &org, &key, "gw-2", json!({ "line": "b" })).await;
    let dev_id: Uuid = dev.parse().unwrap();
    let id = register(&app, &org, &key, "1.0.0", None).await;
    let desired_uri = format!("/v1/organisations/{org}/devices/{dev}/desired-model");

    // No artifact yet: the agent could not download it.
    let r = put_json(&app, &desired_uri, &key, json!({ "model_id": id })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let bytes = b"model-1";
    let art = format!("/v1/organisations/{org}/models/{id}/artifact");
    assert_eq!(
        put_bytes(&app, &art, &key, bytes).await.status,
        StatusCode::CREATED
    );
    assert!(
        models::desired_for(&pool, org_id, dev_id)
            .await
            .unwrap()
            .is_none()
    );
    let r = put_json(&app, &desired_uri, &key, json!({ "model_id": id })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["desired_model"], "rul-fd001@1.0.0");
    assert_eq!(r.body["in_sync"], false);

    let d = models::desired_for(&pool, org_id, dev_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.name, "rul-fd001");
    assert_eq!(d.version, "1.0.0");
    assert_eq!(d.sha256, sha(bytes));
    assert_eq!(d.download_path, format!("/v1/agent/models/{id}/artifact"));

    models::record_running(&pool, org_id, dev_id, Some("rul-fd001@1.0.0"), None)
        .await
        .unwrap();
    let r = app
        .get(&format!("/v1/organisations/{org}/model-status"), &key)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = r.body.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["device_name"], "gw-1");
    assert_eq!(rows[0]["running_model"], "rul-fd001@1.0.0");
    assert_eq!(rows[0]["in_sync"], true);
    assert_eq!(rows[1]["desired_model"], Value::Null);

    // A label selector (device group) applies to matching devices; a device row wins.
    let id2 = register(&app, &org, &key, "2.0.0", None).await;
    let art2 = format!("/v1/organisations/{org}/models/{id2}/artifact");
    put_bytes(&app, &art2, &key, b"model-2").await;
    sqlx::query(
        "INSERT INTO desired_models (id, org_id, selector, model_id) VALUES ($1, $2, $3, $4)",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(json!({ "line": "b" }))
    .bind(id2.parse::<Uuid>().unwrap())
    .execute(&pool)
    .await
    .unwrap();
    let got = models::desired_for(&pool, org_id, other.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.version, "2.0.0");
    let got = models::desired_for(&pool, org_id, dev_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.version, "1.0.0");

    // null stops the rollout; another organisation's key cannot touch it.
    let (_, key_b) = app.org_with_key("globex").await;
    let r = put_json(&app, &desired_uri, &key_b, json!({ "model_id": null })).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let r = put_json(&app, &desired_uri, &key, json!({ "model_id": null })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(
        models::desired_for(&pool, org_id, dev_id)
            .await
            .unwrap()
            .is_none()
    );
}

/// An enrolled device of `app`'s organisation `org`: (device id, leaf certificate DER).
async fn enrolled(app: &App, org: &str, name: &str) -> (Uuid, Vec<u8>) {
    let r = app
        .post(
            &format!("/v1/organisations/{org}/enroll-tokens"),
            &app.admin_key,
            json!({}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let token = r.body["token"].as_str().unwrap().to_owned();
    let key = DeviceKey::generate().unwrap();
    let r = app
        .call(
            Method::POST,
            "/enroll",
            None,
            Some(json!({ "token": token, "csr_pem": key.csr_pem(name).unwrap(), "device_name": name })),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let chain = certs_from_pem(r.body["certificate_chain_pem"].as_str().unwrap(), "chain").unwrap();
    (
        r.body["device_id"].as_str().unwrap().parse().unwrap(),
        chain[0].to_vec(),
    )
}

/// A request as the agent listener hands it over: the verified client certificate in
/// the `TlsInfo` extension.
async fn as_device(router: &Router, cert_der: &[u8], uri: &str) -> (StatusCode, Vec<u8>) {
    let mut info = axum_server::tls::TlsInfo::default();
    info.peer_certificates = vec![cert_der.to_vec()];
    let mut req = Request::get(uri).body(Body::empty()).unwrap();
    req.extensions_mut().insert(Arc::new(info));
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, body.to_vec())
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_device_downloads_only_the_model_desired_for_it(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    FleetCa::init(
        &ca_dir,
        std::time::SystemTime::now() - Duration::from_secs(60),
    )
    .unwrap();
    let app = common::app_with(pool.clone(), |c| c.pki.ca_dir = Some(ca_dir.clone())).await;
    let device_router = kip_control_plane::server::agent_router(app.state.clone());

    let (org, key) = app.org_with_key("acme").await;
    let (dev, cert) = enrolled(&app, &org, "gw-1").await;
    let (_other_dev, other_cert) = enrolled(&app, &org, "gw-2").await;
    let id = register(&app, &org, &key, "1.0.0", None).await;
    let id2 = register(&app, &org, &key, "2.0.0", None).await;
    for (m, b) in [(&id, &b"model-1"[..]), (&id2, &b"model-2"[..])] {
        let r = put_bytes(
            &app,
            &format!("/v1/organisations/{org}/models/{m}/artifact"),
            &key,
            b,
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    let path = |m: &str| format!("/v1/agent/models/{m}/artifact");

    // Nothing rolled out yet.
    assert_eq!(
        as_device(&device_router, &cert, &path(&id)).await.0,
        StatusCode::NOT_FOUND
    );
    let r = put_json(
        &app,
        &format!("/v1/organisations/{org}/devices/{dev}/desired-model"),
        &key,
        json!({ "model_id": id }),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (s, body) = as_device(&device_router, &cert, &path(&id)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, b"model-1");
    // Not the other version, and not for the other device.
    assert_eq!(
        as_device(&device_router, &cert, &path(&id2)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        as_device(&device_router, &other_cert, &path(&id)).await.0,
        StatusCode::NOT_FOUND
    );
    // Without a client certificate: refused.
    let resp = device_router
        .clone()
        .oneshot(Request::get(path(&id)).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[test]
fn registry_routes_are_in_the_openapi_documents() {
    let admin: Value = serde_json::from_str(kip_control_plane::server::OPENAPI_JSON).unwrap();
    for p in [
        "/v1/organisations/{org_id}/models/{model_id}/artifact",
        "/v1/organisations/{org_id}/models/{model_id}/stage",
        "/v1/organisations/{org_id}/devices/{device_id}/desired-model",
        "/v1/organisations/{org_id}/model-status",
    ] {
        assert!(admin["paths"].get(p).is_some(), "{p}");
    }
    let agent: Value = serde_json::from_str(include_str!("../../docs/openapi-agent.json")).unwrap();
    assert!(
        agent["paths"]
            .get("/v1/agent/models/{model_id}/artifact")
            .is_some()
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn kip_train_register_records_the_version_with_metrics_and_uploads_the_artifact(
    pool: PgPool,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = common::app(pool.clone()).await;
    let (org, key) = app.org_with_key("acme").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let until = stop.clone().cancelled_owned();
    tracker.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(until)
            .await
    });
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ml/models");
    let onnx_path = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "onnx"))
        .unwrap();
    let onnx = std::fs::read(&onnx_path).unwrap();
    let card: kip_ml::pipeline::ModelCard =
        serde_json::from_slice(&std::fs::read(onnx_path.with_extension("json")).unwrap()).unwrap();
    let target = kip_ml::register::Target {
        server: format!("http://{addr}"),
        api_key: key.clone(),
        org: None,
    };
    let r = kip_ml::register::register(&target, &card, &onnx)
        .await
        .unwrap();
    assert_eq!(r.org_id, org);
    assert_eq!(r.version, card.version);
    // Running it again is safe: same version, same bytes.
    let again = kip_ml::register::register(&target, &card, &onnx)
        .await
        .unwrap();
    assert_eq!(again.id, r.id);
    let m = app
        .get(&format!("/v1/organisations/{org}/models/{}", r.id), &key)
        .await;
    assert_eq!(m.body["artifact_sha256"], sha(&onnx));
    assert!(m.body["metrics"]["rmse"].as_f64().is_some(), "{}", m.text);
    let chunks: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT bytes FROM model_artifact_chunks ORDER BY idx")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(chunks.concat(), onnx);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}
