//! Inference inside the running agent: readings from a test Mosquitto pass through the buffer
//! writer to the inference task, and predictions land in the buffer and at
//! `/predictions/latest`. No control plane exists anywhere in these tests: inference must work
//! during a network cut.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers of tests fail the test loudly"
)]

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kip_agent::{
    config::Config,
    runtime::{self, local_get},
};
use kip_shared::{Record, features::CMAPSS_INFORMATIVE_SENSORS};
use kip_tests::{Mosquitto, eventually_ok, mosquitto::publish, ort_library, reference_model};
use tokio_util::sync::CancellationToken;

fn write_config(dir: &Path, broker_port: u16, ort: &Path) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
device = "gw-test"
state_dir = "{state}"

[buffer]
max_bytes = 10485760
flush_interval_ms = 50

[http]
listen_addr = "127.0.0.1:0"

[inference]
enabled = true
ort_library = "{ort}"
model_path = "{model}"

[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "kip-inference-{broker_port}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200

[[mqtt.subscriptions]]
topic = "engines/+/+"
machine_topic_level = 1
metric_topic_level = 2
value = {{ kind = "number" }}
"#,
            state = dir.join("state").display(),
            ort = ort.display(),
            model = reference_model().onnx_path.display(),
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn readings_become_predictions_in_the_buffer_and_on_the_local_api_without_a_network() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(dir.path());
    let cfg = Config::load(&write_config(dir.path(), broker.port, &ort_library())).unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg, cancel.clone()).await.unwrap();
    let addr = agent.http_addr;

    // One cycle = one value of every channel of the feature set; repeat until the
    // subscription is up and a prediction is served.
    let latest = eventually_ok(Duration::from_secs(60), || {
        for (i, ch) in CMAPSS_INFORMATIVE_SENSORS.iter().enumerate() {
            let v = format!("{}", 500.0 + i as f64);
            publish(broker.port, &format!("engines/e7/{ch}"), v.as_bytes(), None);
        }
        async move {
            let (code, body) = local_get(addr, "/predictions/latest").await.unwrap();
            assert_eq!(code, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v.get("e7").is_some() {
                Ok(v)
            } else {
                Err(format!("no prediction arrived: {body}"))
            }
        }
    })
    .await;
    let p = &latest["e7"];
    assert!(p["rul_cycles"].as_f64().unwrap().is_finite(), "{p}");
    assert_eq!(p["model_version"], "1.0.0+seed42");

    let (_, metrics) = local_get(addr, "/metrics").await.unwrap();
    assert!(metrics.contains("kip_agent_predictions_total"), "{metrics}");
    assert!(
        metrics.contains("kip_agent_inference_latency_seconds_count"),
        "{metrics}"
    );
    assert!(metrics.contains("kip_agent_model_info{"), "{metrics}");
    assert!(
        metrics.contains("kip_agent_model_swap_failures_total 0"),
        "{metrics}"
    );

    // The prediction is a buffered record, so it syncs (and survives) like a reading.
    let buffered = agent.buffer.read_range(0, 100_000, u64::MAX).unwrap();
    assert!(
        buffered
            .iter()
            .any(|r| matches!(&r.record, Record::Prediction(p) if p.machine == "e7")),
        "no prediction in the buffer"
    );
    cancel.cancel();
    agent.wait().await;
}

#[tokio::test]
async fn a_missing_onnx_runtime_is_a_start_up_error_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::load(&write_config(
        dir.path(),
        1,
        Path::new("/nonexistent/libonnxruntime.so"),
    ))
    .unwrap();
    let err = runtime::start(cfg, CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("[inference] is enabled"), "{err}");
    assert!(err.contains("ORT_DYLIB_PATH"), "{err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
}

/// Publishes one cycle of `machine` at a time until the agent at `addr` serves a prediction
/// for it.
/// Returns how many cycles were published.
async fn cycle_until_predicted(port: u16, addr: std::net::SocketAddr, machine: &str) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut published = 0;
    loop {
        publish_cycle(port, machine);
        published += 1;
        let (_, body) = local_get(addr, "/predictions/latest").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v.get(machine).is_some() {
            return published;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no prediction arrived: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn publish_cycle(port: u16, machine: &str) {
    for (i, ch) in CMAPSS_INFORMATIVE_SENSORS.iter().enumerate() {
        let v = format!("{}", 500.0 + i as f64);
        publish(port, &format!("engines/{machine}/{ch}"), v.as_bytes(), None);
    }
}

/// Timestamp of the latest prediction of `machine` served by the agent at `addr`.
async fn latest_ts(addr: std::net::SocketAddr, machine: &str) -> Option<String> {
    let (_, body) = local_get(addr, "/predictions/latest").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v[machine]["ts"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn a_machines_cycle_count_survives_an_agent_restart() {
    use kip_agent::inference::Predictor;
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let config = write_config(dir.path(), broker.port, &ort_library());
    let state = dir.path().join("state/predictor.json");

    let cancel = CancellationToken::new();
    let agent = runtime::start(Config::load(&config).unwrap(), cancel.clone())
        .await
        .unwrap();
    cycle_until_predicted(broker.port, agent.http_addr, "e9").await;
    // 30 more cycles, each waited for (its prediction replaces the latest one).
    for _ in 0..30 {
        let prev = latest_ts(agent.http_addr, "e9").await;
        publish_cycle(broker.port, "e9");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while latest_ts(agent.http_addr, "e9").await == prev {
            assert!(
                tokio::time::Instant::now() < deadline,
                "cycle not predicted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    cancel.cancel();
    agent.wait().await;
    // Saved on the shutdown path.
    let before = Predictor::load(&state).unwrap().cycles("e9");
    assert!(before >= 31, "{before} cycles saved");

    let cancel = CancellationToken::new();
    let agent = runtime::start(Config::load(&config).unwrap(), cancel.clone())
        .await
        .unwrap();
    let published = cycle_until_predicted(broker.port, agent.http_addr, "e9").await;
    cancel.cancel();
    agent.wait().await;
    // Restored, the machine continued from its age; restarted from zero it would hold at
    // most the cycles published since.
    let after = Predictor::load(&state).unwrap().cycles("e9");
    assert!(
        after > before && after > published,
        "cycle count restarted: {before} saved, {published} published since, {after} now"
    );
}
