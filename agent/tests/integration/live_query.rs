//! The agent's live-query responder inside the running agent, against a test Mosquitto: a test
//! client plays the control plane, asks over `kip/v1/{org}/{device}/live/req` and reads the
//! answer (latest values and the model's latest prediction) from its reply topic.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{path::Path, time::Duration};

use kip_agent::{
    config::{Config, RawConfig},
    runtime::{self, local_get},
};
use kip_shared::{
    features::CMAPSS_INFORMATIVE_SENSORS,
    live::{LIVE_PROTOCOL_VERSION, LiveRequest, LiveResponse, reply_topic, request_topic},
};
use kip_tests::{Mosquitto, eventually_ok, mosquitto::publish, ort_library, reference_model};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn config(dir: &Path, port: u16, org: Option<Uuid>, inference: bool) -> Config {
    let org_line = org.map(|o| format!("org_id = \"{o}\"")).unwrap_or_default();
    let inference = if inference {
        format!(
            "[inference]\nenabled = true\nort_library = \"{}\"\nmodel_path = \"{}\"\n",
            ort_library().display(),
            reference_model().onnx_path.display()
        )
    } else {
        String::new()
    };
    let text = format!(
        r#"
[agent]
device = "gw-live"
state_dir = "{state}"
[http]
listen_addr = "127.0.0.1:0"
{inference}
[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{port}"
client_id = "kip-src-{port}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200
[[mqtt.subscriptions]]
topic = "engines/+/+"
machine_topic_level = 1
metric_topic_level = 2
value = {{ kind = "number" }}
[live_query]
broker = "b1"
{org_line}
"#,
        state = dir.join("state").display(),
    );
    RawConfig::from_toml(&text, Path::new("agent.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

/// A stand-in for the control plane: subscribed to its reply topic, forwards answers.
async fn control_plane(
    port: u16,
    org: Uuid,
    stop: CancellationToken,
) -> (AsyncClient, mpsc::Receiver<Vec<u8>>) {
    let (client, mut ev) = AsyncClient::new(MqttOptions::new("cp-stand-in", "127.0.0.1", port), 16);
    let (tx, rx) = mpsc::channel(16);
    let (sub_tx, mut sub_rx) = mpsc::channel(1);
    let c = client.clone();
    let reply = reply_topic("kip/v1", org, "cp-t");
    tokio_util::task::TaskTracker::new().spawn(async move {
        loop {
            let e = tokio::select! {
                () = stop.cancelled() => return,
                e = ev.poll() => e,
            };
            match e {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    c.try_subscribe(&reply, QoS::AtLeastOnce).unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.try_send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec()).await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
        .await
        .expect("stand-in subscribed");
    (client, rx)
}

fn request(org: Uuid) -> LiveRequest {
    LiveRequest {
        v: LIVE_PROTOCOL_VERSION,
        request_id: Uuid::new_v4(),
        org_id: org,
        device: "gw-live".into(),
        reply_to: reply_topic("kip/v1", org, "cp-t"),
        sent_at: chrono::Utc::now(),
        machines: vec!["e7".into()],
        metrics: vec![],
    }
}

#[tokio::test]
async fn the_agent_answers_with_its_latest_values_and_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(dir.path());
    let org = Uuid::new_v4();
    let cancel = CancellationToken::new();
    let agent = runtime::start(
        config(dir.path(), broker.port, Some(org), true),
        cancel.clone(),
    )
    .await
    .unwrap();
    let (cp, mut answers) = control_plane(broker.port, org, cancel.clone()).await;

    // Cycles of every channel of the feature set until the model made a prediction.
    let addr = agent.http_addr;
    eventually_ok(Duration::from_secs(60), || {
        for (i, ch) in CMAPSS_INFORMATIVE_SENSORS.iter().enumerate() {
            let v = format!("{}", 500.0 + i as f64);
            publish(broker.port, &format!("engines/e7/{ch}"), v.as_bytes(), None);
        }
        publish(broker.port, "engines/e8/other", b"1", None);
        async move {
            let (_, body) = local_get(addr, "/predictions/latest").await.unwrap();
            if body.contains("\"e7\"") {
                Ok(())
            } else {
                Err(format!("no prediction: {body}"))
            }
        }
    })
    .await;

    // A malformed request first: counted, and the responder keeps going.
    let topic = request_topic("kip/v1", org, "gw-live");
    cp.publish(&topic, QoS::AtLeastOnce, false, b"[1,2".to_vec())
        .await
        .unwrap();
    let req = request(org);
    cp.publish(&topic, QoS::AtLeastOnce, false, req.encode())
        .await
        .unwrap();
    let bytes = tokio::time::timeout(Duration::from_secs(10), answers.recv())
        .await
        .expect("an answer")
        .unwrap();
    let resp = LiveResponse::decode(&bytes).unwrap();
    assert_eq!(resp.request_id, req.request_id);
    assert_eq!((resp.org_id, resp.device.as_str()), (org, "gw-live"));
    // Only machine e7 was asked for: every channel of it, nothing of e8.
    assert_eq!(
        resp.values.len(),
        CMAPSS_INFORMATIVE_SENSORS.len(),
        "{resp:?}"
    );
    assert!(
        resp.values
            .iter()
            .all(|v| v.machine == "e7" && v.source == "b1")
    );
    let first = CMAPSS_INFORMATIVE_SENSORS[0];
    assert!(
        resp.values
            .iter()
            .any(|v| v.metric == first && v.value == 500.0),
        "{resp:?}"
    );
    assert_eq!(resp.predictions.len(), 1, "{resp:?}");
    assert_eq!(resp.predictions[0].model_version, "1.0.0+seed42");
    assert!(resp.predictions[0].rul_cycles.is_finite());
    let age = chrono::Utc::now() - resp.agent_time;
    assert!(
        age.num_seconds().abs() < 5,
        "agent clock {}",
        resp.agent_time
    );

    let (_, metrics) = local_get(agent.http_addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("kip_agent_live_requests_total{outcome=\"malformed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kip_agent_live_requests_total{outcome=\"answered\"} 1"),
        "{metrics}"
    );
    cancel.cancel();
    agent.wait().await;
}

#[tokio::test]
async fn live_query_without_enrollment_or_org_id_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = runtime::start(config(dir.path(), 1, None, false), CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("live_query") && err.contains("enroll"),
        "{err}"
    );
}
