//! The real `kip-control-plane` binary logging in the `ecs` format at `debug`: every line of
//! its stdout is one JSON object with the Elastic Common Schema fields, and none of the
//! secrets it issued or received (the platform-admin key, an organisation API key, an
//! enrollment token, the device's private key) appears in it, through the main flows: create
//! an organisation and a key, use the key, issue a token, enroll, reuse the spent token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::time::Duration;

use kip_agent::identity;
use kip_tests::{TestDb, binaries::ControlPlaneProcess, control_plane::AdminApi, wait_until};
use serde_json::{Value, json};

const ECS_FIELDS: [&str; 7] = [
    "@timestamp",
    "log.level",
    "message",
    "service.name",
    "service.version",
    "ecs.version",
    "event.dataset",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_logs_are_json_lines_with_ecs_fields_and_never_carry_issued_secrets() {
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("control-plane.log");
    let cp = ControlPlaneProcess::new(&db.url, work.path()).with_ecs_log(log.clone(), "debug");
    let proc = cp.spawn();
    let admin = cp.admin_api();
    let org = admin.create_org("acme").await;

    let created = admin
        .admin(
            &format!("/v1/organisations/{org}/api-keys"),
            json!({ "name": "ops", "role": "org-admin" }),
        )
        .await;
    let api_key = created["key"].as_str().unwrap().to_owned();
    let ops = AdminApi::new(cp.admin_url(), api_key.clone());
    let token = ops
        .admin(
            &format!("/v1/organisations/{org}/enroll-tokens"),
            json!({ "ttl_s": 600 }),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let id_dir = work.path().join("identity");
    identity::enroll(&ops.http, &cp.admin_url(), &token, "gw-1", None, &id_dir)
        .await
        .unwrap();
    // A spent token and a wrong key are refused, and refusals are logged too.
    let again = identity::enroll(
        &ops.http,
        &cp.admin_url(),
        &token,
        "gw-2",
        None,
        &work.path().join("identity-2"),
    )
    .await;
    assert!(again.is_err(), "a spent enrollment token was accepted");
    let wrong = format!("{api_key}x");
    let r = ops
        .http
        .get(format!("{}/v1/organisations/{org}/devices", cp.admin_url()))
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    ops.request(
        reqwest::Method::GET,
        &format!("/v1/organisations/{org}/devices"),
        None,
    )
    .await;

    // Positive signal that the process logged the flows: its log grew past start-up.
    wait_until(
        Duration::from_secs(30),
        "the control plane logged",
        || async { std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() >= 5) },
    )
    .await;
    drop(proc);
    let text = std::fs::read_to_string(&log).unwrap();

    let device_pem = std::fs::read_to_string(id_dir.join("device.pem")).unwrap();
    let key_pem = device_pem
        .split("-----END PRIVATE KEY-----")
        .next()
        .unwrap();
    // The key's base64 body, line by line: no fragment of it may leak either.
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .collect();
    assert!(!key_lines.is_empty(), "no private key in {device_pem}");
    let mut secrets = vec![
        ("the platform-admin key", admin.key.clone()),
        ("the organisation API key", api_key.clone()),
        ("the wrong key sent", wrong.clone()),
        ("the enrollment token", token.clone()),
        ("a PEM private key marker", "PRIVATE KEY".to_owned()),
    ];
    secrets.extend(
        key_lines
            .iter()
            .map(|l| ("a line of the device's private key", (*l).to_owned())),
    );
    for (what, secret) in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} appears in the control plane's log"
        );
    }

    let mut lines = 0;
    let mut in_request_span = false;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        for field in ECS_FIELDS {
            assert!(
                v.get(field).is_some_and(|f| !f.is_null()),
                "{field} missing in {line}"
            );
        }
        assert_eq!(v["service.name"], "kip-control-plane", "{line}");
        assert_eq!(v["event.dataset"], "kip-control-plane.log", "{line}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(v["@timestamp"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        // Requests run in a span: their lines carry trace and span ids and the route.
        if v["span.name"] == "request" {
            assert!(
                v["trace.id"].is_string() && v["span.id"].is_string(),
                "{line}"
            );
            in_request_span |= v["kip"]["route"] == "/v1/organisations/{org_id}/api-keys";
        }
        lines += 1;
    }
    assert!(lines >= 5, "only {lines} log lines:\n{text}");
    assert!(
        in_request_span,
        "no line of the api-keys request carries its span:\n{text}"
    );
    drop(db);
}
