//! AIX Aleph asks a real agent for live values over MQTT: a private Mosquitto with TLS client
//! certificates, the real agent runtime (enrolled; its MQTT source feeds the latest-value map;
//! `[live_query]` responder; sync through a proxy whose link the test cuts), and the real
//! control plane (router, gateway, Aleph MQTT client) on real PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kip_agent::{config::RawConfig, runtime};
use kip_control_plane::llm::config::LlmConfig;
use kip_shared::live::LiveRequest;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TIMEOUT_MS: u64 = 1000;

fn llm_toml(port: u16, pki: &kip_tests::BrokerPki) -> String {
    format!(
        r#"
[providers.aleph]
kind = "aleph"
models = ["aleph"]
[providers.aleph.mqtt]
url = "mqtts://127.0.0.1:{port}"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
client_id = "cp-test"
request_timeout_ms = {TIMEOUT_MS}
"#,
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    )
}

fn agent_config(
    state_dir: &std::path::Path,
    port: u16,
    pki: &kip_tests::BrokerPki,
    sync_url: &str,
) -> kip_agent::config::Config {
    let text = format!(
        r#"
[agent]
device = "gw-1"
state_dir = "{state}"
[http]
listen_addr = "127.0.0.1:0"
[[mqtt]]
name = "site"
url = "mqtts://127.0.0.1:{port}"
client_id = "agent-gw-1"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200
[[mqtt.subscriptions]]
topic = "plant/+/temperature"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}
[sync]
endpoints = ["{sync_url}"]
interval_ms = 50
backoff_min_ms = 20
backoff_max_ms = 200
request_timeout_ms = 2000
[live_query]
broker = "site"
"#,
        state = state_dir.display(),
        ca = pki.ca.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
    );
    RawConfig::from_toml(&text, std::path::Path::new("agent.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

/// (topic, payload) of every message seen.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Records every message published under `kip/v1/#`, as a third client of the broker.
struct Spy {
    seen: Seen,
    subscribed: Arc<std::sync::atomic::AtomicBool>,
}

fn spy(
    port: u16,
    pki: &kip_tests::BrokerPki,
    tracker: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> Spy {
    let mut opts = MqttOptions::new("spy", "127.0.0.1", port);
    let tls = kip_agent::mqtt::tls_client_config(
        &pki.ca,
        Some((pki.client_cert.as_path(), pki.client_key.as_path())),
    )
    .unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut ev) = AsyncClient::new(opts, 16);
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, sub) = (seen.clone(), subscribed.clone());
    tracker.spawn(async move {
        loop {
            let e = tokio::select! {
                () = stop.cancelled() => return,
                e = ev.poll() => e,
            };
            match e {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe("kip/v1/#", QoS::AtLeastOnce).unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    sub.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    Spy { seen, subscribed }
}

async fn org_key(cp: &kip_tests::control_plane::ControlPlane, org: Uuid) -> String {
    let v = cp
        .admin(
            &format!("/v1/organisations/{org}/api-keys"),
            json!({ "name": "ops" }),
        )
        .await;
    v["key"].as_str().unwrap().to_owned()
}

async fn register(
    cp: &kip_tests::control_plane::ControlPlane,
    org: Uuid,
    key: &str,
    name: &str,
) -> Uuid {
    let r = cp
        .http
        .post(format!("{}/v1/organisations/{org}/devices", cp.admin_url))
        .bearer_auth(key)
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().parse().unwrap()
}

/// A reading the control plane received by sync a minute ago.
async fn synced(pool: &PgPool, org: Uuid, device: Uuid, value: f64) {
    sqlx::query(
        "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
         VALUES ($1, $2, 0, 1, 'press-1', 'temperature', now() - interval '60 seconds', $3)",
    )
    .bind(org)
    .bind(device)
    .bind(value)
    .execute(pool)
    .await
    .unwrap();
}

async fn ask(
    cp: &kip_tests::control_plane::ControlPlane,
    key: &str,
    question: &str,
) -> (String, Duration) {
    let t0 = Instant::now();
    let r = cp
        .http
        .post(format!("{}/v1/query", cp.admin_url))
        .bearer_auth(key)
        .json(&json!({
            "task": "machine_status",
            "messages": [{"role": "user", "content": question}]
        }))
        .send()
        .await
        .unwrap();
    let elapsed = t0.elapsed();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["provider"], "aleph", "{v}");
    (v["content"].as_str().unwrap().to_owned(), elapsed)
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn agent_metrics(addr: std::net::SocketAddr) -> String {
    runtime::local_get(addr, "/metrics").await.unwrap().1
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn aleph_answers_from_the_agents_live_values_and_falls_back_with_a_note(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let pki = kip_tests::BrokerPki::generate(dir.path());
    let mosquitto = kip_tests::Mosquitto::start(dir.path(), &pki.listener_conf());
    let port = mosquitto.port;
    let llm = LlmConfig::from_toml(&llm_toml(port, &pki), |_| None).unwrap();
    let cp = kip_tests::control_plane::start_with(pool.clone(), None, |c| c.llm = llm).await;

    // Organisation A: gw-1 is enrolled and runs the agent; gw-2 exists but no agent runs.
    let org_a = cp.create_org("acme").await;
    let key_a = org_key(&cp, org_a).await;
    let state_dir = dir.path().join("agent");
    let identity = cp.enroll(org_a, "gw-1", &state_dir.join("identity")).await;
    let gw1 = identity.device_id();
    let gw2 = register(&cp, org_a, &key_a, "gw-2").await;
    synced(&pool, org_a, gw2, 55.5).await;
    // Organisation B has a device with the same name, and no agent.
    let org_b = cp.create_org("beta").await;
    let key_b = org_key(&cp, org_b).await;
    let b_gw1 = register(&cp, org_b, &key_b, "gw-1").await;
    synced(&pool, org_b, b_gw1, 12.5).await;

    let stop = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let spy = spy(port, &pki, &tracker, stop.clone());
    // The agent takes its organisation from the enrolled certificate (no org_id in its config).
    // The agent syncs through a proxy whose link the test cuts.
    let proxy = kip_tests::proxy::Proxy::start(kip_tests::control_plane::agent_addr(&cp)).await;
    let agent_cfg = agent_config(&state_dir, port, &pki, &proxy.url());
    let agent = runtime::start(agent_cfg, stop.clone()).await.unwrap();
    let agent_addr = agent.http_addr;
    kip_tests::wait_until(
        Duration::from_secs(10),
        "all MQTT clients subscribed",
        || {
            let cp = &cp;
            let spy = &spy;
            async move {
                let a = agent_metrics(agent_addr).await;
                spy.subscribed.load(std::sync::atomic::Ordering::SeqCst)
                    && metric(&a, "kip_agent_live_connected") == 1
                    && metric(&a, "kip_agent_source_connected{source=\"site\"}") == 1
                    && metric(&cp.metrics().await, "kip_llm_live_connected") == 1
            }
        },
    )
    .await;

    // 40.0 arrives and is synced to the control plane.
    let count = |value: f64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM sensor_data WHERE device_id = $1 AND value = $2",
            )
            .bind(gw1)
            .bind(value)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    kip_tests::mosquitto::publish(port, "plant/press-1/temperature", b"40", Some(&pki));
    kip_tests::wait_until(Duration::from_secs(15), "40.0 synced", || async {
        count(40.0).await == 1
    })
    .await;
    // Then the link to the control plane goes down, and the agent ingests 77.25 after the
    // last sync: only the agent knows it.
    proxy.set(kip_tests::proxy::Link::Drop);
    kip_tests::mosquitto::publish(port, "plant/press-1/temperature", b"77.25", Some(&pki));
    kip_tests::wait_until(
        Duration::from_secs(10),
        "the agent ingested 77.25",
        || async {
            let a = agent_metrics(agent_addr).await;
            metric(&a, "kip_agent_records_buffered_total") >= 2
                && metric(
                    &a,
                    "kip_agent_readings_total{source=\"site\",metric=\"temperature\"}",
                ) == 2
        },
    )
    .await;
    assert_eq!(count(77.25).await, 0, "77.25 must not have been synced");

    // 1. Live: gw-1 answers with the new value; gw-2 does not answer and is covered by the
    //    synced data with a note; the question waits one timeout, not one per device.
    let (text, elapsed) = ask(&cp, &key_a, "What is the temperature of press-1?").await;
    assert!(text.contains("live from gw-1 at "), "{text}");
    assert!(text.contains("press-1: temperature = 77.25"), "{text}");
    assert!(
        !text.contains("= 40"),
        "gw-1 answered live, not from synced data: {text}"
    );
    assert!(
        text.contains(&format!(
            "gw-2 did not answer within {TIMEOUT_MS} ms over MQTT; values below are from synced data as of "
        )),
        "{text}"
    );
    assert!(text.contains("temperature = 55.5"), "{text}");
    assert!(
        elapsed < Duration::from_millis(TIMEOUT_MS + 1500),
        "{elapsed:?}"
    );

    // 2. Timeout only: a question naming gw-2 asks only gw-2 and comes back after the timeout.
    let (text, elapsed) = ask(&cp, &key_a, "Status of gw-2?").await;
    assert!(!text.contains("gw-1"), "{text}");
    assert!(
        text.contains("gw-2 did not answer within 1000 ms over MQTT"),
        "{text}"
    );
    assert!(text.contains("55.5"), "{text}");
    assert!(
        elapsed >= Duration::from_millis(TIMEOUT_MS)
            && elapsed < Duration::from_millis(TIMEOUT_MS + 1500),
        "{elapsed:?}"
    );

    // 3. A malformed response and one for an unknown request are counted and dropped; the next
    //    question is answered live as before.
    let reply = kip_shared::live::reply_topic("kip/v1", org_a, "cp-test");
    kip_tests::mosquitto::publish(port, &reply, b"{not json", Some(&pki));
    let stale = json!({"v": 1, "request_id": Uuid::new_v4(), "org_id": org_a, "device": "gw-1",
                       "agent_time": "2026-01-01T00:00:00Z", "values": []});
    kip_tests::mosquitto::publish(port, &reply, stale.to_string().as_bytes(), Some(&pki));
    kip_tests::wait_until(Duration::from_secs(10), "bad responses counted", || async {
        let m = cp.metrics().await;
        metric(
            &m,
            "kip_llm_live_responses_dropped_total{outcome=\"malformed\"}",
        ) == 1
            && metric(
                &m,
                "kip_llm_live_responses_dropped_total{outcome=\"unknown\"}",
            ) == 1
    })
    .await;
    // The agent side: a malformed request, and one whose reply topic lies in another
    // organisation, are counted and not answered; the agent keeps answering.
    let req_topic = kip_shared::live::request_topic("kip/v1", org_a, "gw-1");
    kip_tests::mosquitto::publish(port, &req_topic, b"\xff garbage", Some(&pki));
    let foreign_id = Uuid::new_v4();
    let foreign = LiveRequest {
        v: 1,
        request_id: foreign_id,
        org_id: org_a,
        device: "gw-1".into(),
        reply_to: kip_shared::live::reply_topic("kip/v1", org_b, "cp-test"),
        sent_at: chrono::Utc::now(),
        machines: vec![],
        metrics: vec![],
    };
    kip_tests::mosquitto::publish(port, &req_topic, &foreign.encode(), Some(&pki));
    kip_tests::wait_until(
        Duration::from_secs(10),
        "agent refusals counted",
        || async {
            let a = agent_metrics(agent_addr).await;
            metric(&a, "kip_agent_live_requests_total{outcome=\"malformed\"}") == 1
                && metric(&a, "kip_agent_live_requests_total{outcome=\"foreign\"}") == 1
        },
    )
    .await;
    let (text, _) = ask(&cp, &key_a, "How is gw-1?").await;
    assert!(
        text.contains("live from gw-1 at ") && text.contains("77.25"),
        "{text}"
    );

    // 4. Organisation B's gw-1 is another device: its question never reaches A's agent.
    let (text, _) = ask(&cp, &key_b, "What is the temperature of gw-1?").await;
    assert!(!text.contains("77.25") && !text.contains("55.5"), "{text}");
    assert!(
        text.contains("gw-1 did not answer within 1000 ms over MQTT"),
        "{text}"
    );
    assert!(text.contains("temperature = 12.5"), "{text}");

    let seen = spy.seen.lock().unwrap().clone();
    // Nothing was ever published into organisation B's reply topics (only B's own request).
    let into_b: Vec<&String> = seen
        .iter()
        .map(|(t, _)| t)
        .filter(|t| t.starts_with(&format!("kip/v1/{org_b}/")) && !t.ends_with("/live/req"))
        .collect();
    assert!(into_b.is_empty(), "{into_b:?}");
    let requests: Vec<(String, LiveRequest)> = seen
        .iter()
        .filter(|(t, _)| t.ends_with("/live/req"))
        .filter_map(|(t, p)| LiveRequest::decode(p).ok().map(|r| (t.clone(), r)))
        .filter(|(_, r)| r.request_id != foreign_id)
        .collect();
    let topics: BTreeSet<&str> = requests.iter().map(|(t, _)| t.as_str()).collect();
    let want: BTreeSet<String> = [
        format!("kip/v1/{org_a}/gw-1/live/req"),
        format!("kip/v1/{org_a}/gw-2/live/req"),
        format!("kip/v1/{org_b}/gw-1/live/req"),
    ]
    .into();
    assert_eq!(
        topics,
        want.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for (topic, r) in &requests {
        assert!(
            topic.starts_with(&format!("kip/v1/{}/", r.org_id)),
            "{topic}"
        );
        assert!(
            r.reply_to.starts_with(&format!("kip/v1/{}/_cp/", r.org_id)),
            "{r:?}"
        );
    }
    let a = agent_metrics(agent_addr).await;
    assert_eq!(
        metric(&a, "kip_agent_live_requests_total{outcome=\"answered\"}"),
        2,
        "{a}"
    );
    assert_eq!(
        metric(&a, "kip_agent_live_requests_total{outcome=\"foreign\"}"),
        1,
        "{a}"
    );
    let m = cp.metrics().await;
    assert_eq!(
        metric(&m, "kip_llm_live_requests_total{outcome=\"answered\"}"),
        2,
        "{m}"
    );
    assert_eq!(
        metric(&m, "kip_llm_live_requests_total{outcome=\"timed_out\"}"),
        3,
        "{m}"
    );

    stop.cancel();
    agent.wait().await;
    tracker.close();
    tracker.wait().await;
}
