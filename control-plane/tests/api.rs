//! Admin API behaviour against a real PostgreSQL (each test gets a fresh database).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

mod common;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use common::app;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_an_empty_database_and_rerun_as_no_ops(pool: PgPool) {
    kip_control_plane::db::migrate(&pool).await.unwrap();
    kip_control_plane::db::migrate(&pool).await.unwrap();
    for table in [
        "organisations",
        "api_keys",
        "devices",
        "ai_models",
        "inference_logs",
        "sensor_data",
    ] {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
        )
        .bind(table)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "table {table} missing");
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn admin_key_is_created_once(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sub/admin.key");
    assert!(
        kip_control_plane::db::ensure_admin_key(&pool, &f)
            .await
            .unwrap()
    );
    let first = std::fs::read_to_string(&f).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !kip_control_plane::db::ensure_admin_key(&pool, &f)
            .await
            .unwrap()
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), first);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_lost_admin_key_is_replaced_by_reset_and_the_old_one_stops_working(pool: PgPool) {
    let app = app(pool.clone()).await;
    let old = app.admin_key.clone();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("admin.key");
    kip_control_plane::db::reset_admin_key(&pool, &f)
        .await
        .unwrap();
    let new = std::fs::read_to_string(&f).unwrap().trim().to_owned();
    assert_ne!(new, old);
    assert_eq!(
        app.get("/v1/me", &old).await.status,
        StatusCode::UNAUTHORIZED
    );
    let r = app.get("/v1/me", &new).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["scope"], "platform");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn organisation_lifecycle_with_the_platform_key(pool: PgPool) {
    let app = app(pool).await;
    let k = app.admin_key.clone();
    let r = app
        .post(
            "/v1/organisations",
            &k,
            json!({ "name": "acme", "display_name": "ACME Corp" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["display_name"], "ACME Corp");
    let id = r.body["id"].as_str().unwrap().to_owned();

    let r = app.get("/v1/organisations", &k).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_array().unwrap().len(), 1);

    let r = app.get(&format!("/v1/organisations/{id}"), &k).await;
    assert_eq!(r.body["name"], "acme");

    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/organisations/{id}"),
            Some(&k),
            Some(json!({ "display_name": "Acme" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["display_name"], "Acme");

    let r = app
        .post("/v1/organisations", &k, json!({ "name": "acme" }))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "conflict");
    assert!(r.message().contains("already exists"), "{}", r.text);

    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{id}"),
            Some(&k),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get(&format!("/v1/organisations/{id}"), &k).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{id}"),
            Some(&k),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn organisation_keys_cannot_manage_organisations(pool: PgPool) {
    let app = app(pool).await;
    let (org_a, key_a) = app.org_with_key("a").await;
    let (org_b, _) = app.org_with_key("b").await;

    let r = app
        .post("/v1/organisations", &key_a, json!({ "name": "c" }))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.message().contains("platform-admin"), "{}", r.text);

    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org_a}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // An org key lists exactly its own organisation and cannot see the other.
    let r = app.get("/v1/organisations", &key_a).await;
    let names: Vec<_> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("a")]);
    let r = app.get(&format!("/v1/organisations/{org_b}"), &key_a).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::PATCH,
            &format!("/v1/organisations/{org_b}"),
            Some(&key_a),
            Some(json!({ "display_name": "pwned" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .get(&format!("/v1/organisations/{org_b}"), &app.admin_key)
        .await;
    assert_eq!(r.body["display_name"], "b");

    let r = app.get("/v1/me", &key_a).await;
    assert_eq!(r.body["scope"], "org");
    assert_eq!(r.body["org_id"], json!(org_a));
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn one_organisations_key_never_reaches_anothers_devices(pool: PgPool) {
    let app = app(pool).await;
    let (org_a, key_a) = app.org_with_key("a").await;
    let (org_b, key_b) = app.org_with_key("b").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/devices"),
            &key_b,
            json!({ "name": "gw-1", "labels": { "site": "berlin" } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let dev_b = r.body["id"].as_str().unwrap().to_owned();

    // Direct access through B's path with A's key.
    for (m, uri) in [
        (
            Method::GET,
            format!("/v1/organisations/{org_b}/devices/{dev_b}"),
        ),
        (
            Method::DELETE,
            format!("/v1/organisations/{org_b}/devices/{dev_b}"),
        ),
        (Method::GET, format!("/v1/organisations/{org_b}/devices")),
        (Method::GET, format!("/v1/organisations/{org_b}/api-keys")),
        (Method::GET, format!("/v1/organisations/{org_b}/models")),
    ] {
        let r = app.call(m.clone(), &uri, Some(&key_a), None).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{m} {uri}: {}", r.text);
    }
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/devices"),
            &key_a,
            json!({ "name": "evil" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &format!("/v1/organisations/{org_b}/api-keys"),
            &key_a,
            json!({ "name": "evil" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // B's device through A's own path does not exist either.
    let r = app
        .get(
            &format!("/v1/organisations/{org_a}/devices/{dev_b}"),
            &key_a,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org_a}/devices/{dev_b}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .get(&format!("/v1/organisations/{org_a}/devices"), &key_a)
        .await;
    assert_eq!(r.body, json!([]));

    // Nothing of B changed.
    let r = app
        .get(
            &format!("/v1/organisations/{org_b}/devices/{dev_b}"),
            &key_b,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["labels"]["site"], "berlin");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn device_registration_and_its_errors(pool: PgPool) {
    let app = app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let base = format!("/v1/organisations/{org}/devices");
    let r = app.post(&base, &key, json!({ "name": "gw-1" })).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert!(r.body["last_seen_at"].is_null());

    let r = app.post(&base, &key, json!({ "name": "gw-1" })).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.message().contains("device"), "{}", r.text);

    let r = app.post(&base, &key, json!({ "name": "GW 1" })).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.code(), "validation_failed");
    assert!(r.message().starts_with("name:"), "{}", r.text);

    let r = app
        .post(&base, &key, json!({ "name": "gw-2", "labels": { "n": 1 } }))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.message().starts_with("labels:"), "{}", r.text);

    let r = app.get(&base, &key).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    let r = app.get(&format!("{base}?limit=0"), &key).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.get(&format!("{base}?limit=x"), &key).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app.get(&format!("{base}/not-a-uuid"), &key).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "bad_request");

    let r = app
        .call(Method::DELETE, &format!("{base}/{id}"), Some(&key), None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get(&format!("{base}/{id}"), &key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.message(), "device not found");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn models_are_registered_per_organisation(pool: PgPool) {
    let app = app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let (org_b, key_b) = app.org_with_key("b").await;
    let base = format!("/v1/organisations/{org}/models");
    let sha = "a".repeat(64);
    let body = json!({ "name": "rul-fd001", "version": "1.0.0", "kind": "rul", "stage": "champion",
                       "artifact_sha256": sha, "uri": "s3://models/rul.onnx", "metrics": { "rmse": 14.2 } });
    let r = app.post(&base, &key, body.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["stage"], "champion");
    assert_eq!(r.body["metrics"]["rmse"], 14.2);
    let id = r.body["id"].as_str().unwrap().to_owned();

    let r = app.post(&base, &key, body.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // The same name and version in another organisation is fine.
    let r = app
        .post(&format!("/v1/organisations/{org_b}/models"), &key_b, body)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let r = app
        .post(
            &base,
            &key,
            json!({ "name": "m", "version": "1", "kind": "rul", "artifact_sha256": "xyz" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.message().starts_with("artifact_sha256:"), "{}", r.text);
    let r = app
        .post(
            &base,
            &key,
            json!({ "name": "m", "version": "1", "kind": "magic" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("magic"), "{}", r.text);

    let r = app.get(&base, &key).await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    let r = app.get(&format!("{base}/{id}"), &key).await;
    assert_eq!(r.body["version"], "1.0.0");
    let r = app
        .get(&format!("/v1/organisations/{org_b}/models/{id}"), &key_b)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn api_keys_are_shown_once_and_stop_working_when_revoked(pool: PgPool) {
    let app = app(pool).await;
    let (org, key) = app.org_with_key("a").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/api-keys"),
            &key,
            json!({ "name": "ci" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let new_key = r.body["key"].as_str().unwrap().to_owned();
    let new_id = r.body["id"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with("kip_"));

    let r = app
        .get(&format!("/v1/organisations/{org}/api-keys"), &new_key)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.text.contains(&new_key), "listing leaks the key");
    assert_eq!(r.body.as_array().unwrap().len(), 2);

    // Stored as a hash only.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_sha256 FROM api_keys WHERE id = $1::uuid")
        .bind(&new_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&new_key));

    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org}/api-keys/{new_id}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["revoked_at"].is_string());
    let r = app.get("/v1/me", &new_key).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "unauthorized");
    // The other key still works.
    assert_eq!(app.get("/v1/me", &key).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn requests_without_a_valid_key_are_refused(pool: PgPool) {
    let app = app(pool).await;
    let (_, key) = app.org_with_key("a").await;
    let r = app.call(Method::GET, "/v1/organisations", None, None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.message(), "missing or invalid API key");
    for bad in [
        "nonsense",
        "kip_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = app.get("/v1/organisations", bad).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
    // Right prefix, wrong secret.
    let forged = format!("{}{}", &key[..key.len() - 3], "AAA");
    assert_ne!(forged, key);
    assert_eq!(
        app.get("/v1/organisations", &forged).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn malformed_bodies_get_a_clear_client_error(pool: PgPool) {
    let app = app(pool).await;
    let k = app.admin_key.clone();
    let send = |body: &'static str, ct: Option<&'static str>| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri("/v1/organisations")
            .header("authorization", format!("Bearer {k}"));
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(Body::from(body)).unwrap()
    };
    let r = app.raw(send("{\"name\": ", Some("application/json"))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().starts_with("malformed JSON"), "{}", r.text);

    let r = app
        .raw(send(
            r#"{"name":"x","colour":"red"}"#,
            Some("application/json"),
        ))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("unknown field `colour`"), "{}", r.text);

    let r = app
        .raw(send(r#"{"display_name":"x"}"#, Some("application/json")))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("missing field `name`"), "{}", r.text);

    let r = app
        .raw(send(r#"{"name": 5}"#, Some("application/json")))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("invalid type"), "{}", r.text);

    let r = app.raw(send(r#"{"name":"x"}"#, None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("Content-Type"), "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn oversized_bodies_get_413_and_store_nothing(pool: PgPool) {
    let app = common::app_with(pool, |c| c.request_body_limit_bytes = 2048).await;
    let big = json!({ "name": "x", "display_name": "y".repeat(4096) });
    let r = app.post("/v1/organisations", &app.admin_key, big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_eq!(r.code(), "payload_too_large");
    assert!(r.message().contains("2048"), "{}", r.text);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM organisations")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn unknown_routes_and_methods_answer_in_json(pool: PgPool) {
    let app = app(pool).await;
    let r = app.get("/v2/nothing", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.code(), "not_found");
    let r = app
        .call(Method::PUT, "/v1/organisations", Some(&app.admin_key), None)
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.code(), "method_not_allowed");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn health_readiness_and_metrics(pool: PgPool) {
    let app = app(pool.clone()).await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    app.get("/v1/organisations", &app.admin_key).await;
    app.get("/v1/organisations", "bad").await;
    let r = app.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.text.contains(
            r#"kip_http_requests_total{method="GET",route="/v1/organisations",status="200"} 1"#
        ),
        "{}",
        r.text
    );
    assert!(
        r.text
            .contains(r#"route="/v1/organisations",status="401"} 1"#),
        "{}",
        r.text
    );
    assert!(
        r.text.contains("kip_http_request_duration_seconds_bucket"),
        "{}",
        r.text
    );

    // A closed pool is what an unreachable database looks like to the handler.
    pool.close().await;
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.code(), "unavailable");
    assert!(!r.text.contains("pool"), "leaks internals: {}", r.text);
    assert_eq!(
        app.call(Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
}

/// Every path and method in docs/openapi.json is served (no 404-route or 405), so the
/// document cannot describe routes that do not exist.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn every_documented_route_is_served(pool: PgPool) {
    let app = app(pool).await;
    let doc: serde_json::Value =
        serde_json::from_str(kip_control_plane::server::OPENAPI_JSON).unwrap();
    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.body, doc);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12);
    let fake = uuid::Uuid::new_v4().to_string();
    for (path, ops) in paths {
        let uri = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    fake.as_str()
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ops.as_object().unwrap().keys() {
            let m: Method = method.to_uppercase().parse().unwrap();
            let r = app.call(m.clone(), &uri, Some(&app.admin_key), None).await;
            assert_ne!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
            assert!(
                !(r.status == StatusCode::NOT_FOUND && r.message() == "route not found"),
                "{m} {path} not routed"
            );
        }
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn deleting_an_organisation_stops_its_cached_keys_at_once(pool: PgPool) {
    let app = app(pool).await;
    let (org, key) = app.org_with_key("gone").await;
    assert_eq!(app.get("/v1/me", &key).await.status, StatusCode::OK);
    assert!(!app.state.keys.is_empty(), "the key is cached after use");
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org}"),
            Some(&app.admin_key),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let r = app.get("/v1/me", &key).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
}

/// A revocation made by another replica (here: straight in PostgreSQL) reaches this one within
/// `auth.key_cache_ttl_ms`; with the cache off it applies on the next request.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn revocation_by_another_replica_is_bounded_by_the_key_cache_ttl(pool: PgPool) {
    let cached = app(pool.clone()).await;
    let uncached = cached
        .replica(|c| c.key_cache_ttl = std::time::Duration::ZERO)
        .await;
    let (_, key) = cached.org_with_key("r").await;
    assert_eq!(cached.get("/v1/me", &key).await.status, StatusCode::OK);
    assert_eq!(uncached.get("/v1/me", &key).await.status, StatusCode::OK);
    assert!(uncached.state.keys.is_empty(), "ttl 0 caches nothing");
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE org_id IS NOT NULL")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        uncached.get("/v1/me", &key).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Within the TTL (5 s by default) the other replica still trusts its cached entry.
    assert_eq!(cached.get("/v1/me", &key).await.status, StatusCode::OK);
}
