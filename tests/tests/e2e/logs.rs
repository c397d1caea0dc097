//! The real `kip-control-plane` binary logging in the `ecs` format at `debug`: every line of
//! its stdout is one JSON object with the Elastic Common Schema fields, and none of the
//! secrets it issued or received (the platform-admin key, an organisation API key, an
//! enrollment token, the device's private key) appears in it, through the main flows: create
//! an organisation and a key, use the key, issue a token, enroll, reuse the spent token.
//! The same for the real `kip-agent` (`log.format = "ecs"` at `debug`): `kip-agent enroll`
//! with a one-time token, then `kip-agent run` syncing an MQTT reading over mTLS; none of the
//! token, the API keys or the device's private key appears in what it wrote.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::time::Duration;

use kip_agent::identity;
use kip_tests::{
    Mosquitto, TestDb,
    binaries::{ControlPlaneProcess, spawn_agent},
    control_plane::AdminApi,
    free_port, wait_until,
};
use serde_json::Value;

/// `what` and the secret text (see [`assert_no_secret`]).
type Secrets = Vec<(&'static str, String)>;

/// The `PRIVATE KEY` marker and every line of the private key in `identity/device.pem`: no
/// fragment of the key may leak either.
fn private_key_fragments(id_dir: &std::path::Path) -> Secrets {
    let device_pem = std::fs::read_to_string(id_dir.join("device.pem")).unwrap();
    let key_pem = device_pem
        .split("-----END PRIVATE KEY-----")
        .next()
        .unwrap();
    let key_lines: Vec<String> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect();
    assert!(!key_lines.is_empty(), "no private key in {device_pem}");
    let mut out: Secrets = vec![("a PEM private key marker", "PRIVATE KEY".to_owned())];
    out.extend(
        key_lines
            .into_iter()
            .map(|l| ("a line of the device's private key", l)),
    );
    out
}

fn assert_no_secret(text: &str, whose: &str, secrets: &Secrets) {
    for (what, secret) in secrets {
        assert!(!text.contains(secret.as_str()), "{what} appears in {whose}");
    }
}

/// Parses every line of `text` as one ECS JSON object of `service` (the fields of
/// [`ECS_FIELDS`], `service.name`, `event.dataset`, an RFC 3339 `@timestamp`).
fn ecs_lines(text: &str, service: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
            for field in ECS_FIELDS {
                assert!(
                    v.get(field).is_some_and(|f| !f.is_null()),
                    "{field} missing in {line}"
                );
            }
            assert_eq!(v["service.name"], service, "{line}");
            assert_eq!(v["event.dataset"], format!("{service}.log"), "{line}");
            assert!(
                chrono::DateTime::parse_from_rfc3339(v["@timestamp"].as_str().unwrap()).is_ok(),
                "{line}"
            );
            v
        })
        .collect()
}

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

    let api_key = admin.create_key(org, "ops", "org-admin").await;
    let ops = AdminApi::new(cp.admin_url(), api_key.clone());
    let token = ops.enroll_token(org).await;
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

    let mut secrets = vec![
        ("the platform-admin key", admin.key.clone()),
        ("the organisation API key", api_key.clone()),
        ("the wrong key sent", wrong.clone()),
        ("the enrollment token", token.clone()),
    ];
    secrets.extend(private_key_fragments(&id_dir));
    assert_no_secret(&text, "the control plane's log", &secrets);

    let mut lines = 0;
    let mut in_request_span = false;
    for v in ecs_lines(&text, "kip-control-plane") {
        // Requests run in a span: their lines carry trace and span ids and the route.
        if v["span.name"] == "request" {
            assert!(v["trace.id"].is_string() && v["span.id"].is_string(), "{v}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_ecs_logs_carry_ecs_fields_and_never_its_token_keys_or_private_key() {
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::new(&db.url, &work.path().join("cp"));
    let cp_proc = cp.spawn();
    let admin = cp.admin_api();
    let org = admin.create_org("acme").await;
    let api_key = admin.create_key(org, "ops", "org-admin").await;
    let token = AdminApi::new(cp.admin_url(), api_key.clone())
        .enroll_token(org)
        .await;
    let broker = Mosquitto::start_plain(work.path());
    // Retained: it reaches the agent's subscription whenever that is made.
    kip_tests::mosquitto::publish_retained(broker.port, "plant/press1/temp", b"21.5");
    let state = work.path().join("state");
    let http_port = free_port();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice = \"gw-1\"\nstate_dir = {:?}\n\n[http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\n\
             [log]\nformat = \"ecs\"\nfilter = \"debug\"\n\n[security]\nrequire_secure_ot = false\n\n\
             [[mqtt]]\nname = \"line\"\nurl = \"{}\"\nclient_id = \"kip-gw-1\"\n\
             [[mqtt.subscriptions]]\ntopic = \"plant/+/temp\"\nmachine_topic_level = 1\n\
             metric = \"temp\"\nvalue = {{ kind = \"number\" }}\n\n\
             [sync]\nendpoints = [{:?}]\ninterval_ms = 50\nheartbeat_interval_s = 1\n",
            state.display().to_string(),
            broker.url(false),
            cp.agent_url()
        ),
    )
    .unwrap();

    // Enrollment: the binary, with the token from the environment as an operator runs it.
    let enroll = std::process::Command::new(kip_tests::workspace_binary("kip-agent"))
        .args(["enroll", "--config"])
        .arg(&config)
        .args(["--server", &cp.admin_url()])
        .env("KIP_ENROLL_TOKEN", &token)
        .output()
        .unwrap();
    let enroll_log = String::from_utf8(enroll.stdout).unwrap();
    let enroll_stderr = String::from_utf8(enroll.stderr).unwrap();
    assert!(enroll.status.success(), "{enroll_stderr}");
    assert!(
        enroll_stderr.starts_with("enrolled gw-1"),
        "{enroll_stderr}"
    );

    // Sync: the reading reaches the control plane over mTLS.
    let log = work.path().join("agent.log");
    let mut agent = spawn_agent(&config, http_port, Some(&log));
    wait_until(Duration::from_secs(60), "the reading is stored", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sensor_data")
            .fetch_one(&db.pool)
            .await
            .is_ok_and(|n| n >= 1)
    })
    .await;
    agent.terminate();
    let run_log = std::fs::read_to_string(&log).unwrap();

    let mut secrets: Secrets = vec![
        ("the enrollment token", token.clone()),
        ("the organisation API key", api_key.clone()),
        ("the platform-admin key", admin.key.clone()),
    ];
    secrets.extend(private_key_fragments(&state.join("identity")));
    assert_no_secret(&enroll_log, "kip-agent enroll's log", &secrets);
    assert_no_secret(&enroll_stderr, "kip-agent enroll's stderr", &secrets);
    assert_no_secret(&run_log, "kip-agent run's log", &secrets);

    let enrolled = ecs_lines(&enroll_log, "kip-agent");
    assert!(
        enrolled
            .iter()
            .any(|v| v["message"] == "device enrolled" && v["kip"]["device_id"].is_string()),
        "no `device enrolled` line:\n{enroll_log}"
    );
    let run = ecs_lines(&run_log, "kip-agent");
    assert!(run.len() >= 5, "only {} lines:\n{run_log}", run.len());
    let loggers: std::collections::BTreeSet<&str> = run
        .iter()
        .filter_map(|v| v["log.logger"].as_str())
        .collect();
    assert!(
        loggers.contains("kip_agent::sync"),
        "no line of the agent's sync loop: {loggers:?}"
    );
    eprintln!("agent log: {} lines from {loggers:?}", run.len());
    drop(agent);
    drop(broker);
    drop(cp_proc);
    drop(db);
}
