//! Drift end to end (issue 14): the real `kip-control-plane` and two real `kip-agent` binaries
//! serving a model with drift references, a private Mosquitto, and a fleet of unseen C-MAPSS
//! engines replayed over MQTT. One agent gets the engines unchanged, the other with sensor
//! `s11` shifted by +1.0 (about four standard deviations of its training spread). Their drift
//! records travel with the sync into `model_monitoring`: the shifted sensor is above its
//! threshold, the unchanged fleet below on every feature, the API, `kipctl model drift` and
//! `kip_model_drift*` say so, and another organisation sees none of it. The agents' health
//! reports carry their drift detector's score and drifting features: the shifted device is
//! flagged `model_drift` (device health API, `kipctl device health`, console device page) and
//! `KipModelDrift` fires for it in a real Prometheus running the shipped rules; the unchanged
//! device is not flagged and has no alert.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{path::Path, time::Duration};

use kip_agent::inference::DRIFT_WINDOW;
use kip_shared::feature_set::FeatureSet;
use kip_tests::{
    ChildGroup, Mosquitto, NewDatabase, Prometheus,
    binaries::{ControlPlaneProcess, spawn_agent},
    eventually_ok, free_port,
    mosquitto::publish_all,
    ort_library, workspace_root,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// Signals of the test model, in feature-set order (s11 is index 4).
const SIGNALS: [&str; 6] = ["s2", "s3", "s4", "s7", "s11", "s12"];

/// A small FD001 model with drift references (the pipeline fits them), trained on engines
/// 1-60 only, so engines 61-75 are unseen.
fn train_model(engines: &[kip_ml::cmapss::Engine]) -> Vec<u8> {
    let doc = json!({
        "format_version": 1,
        "id": "e2e-fd001-drift-v1",
        "signals": SIGNALS,
        "window_cycles": 20,
        "outputs": { "aggregations": [{ "op": "last" }, { "op": "mean" }], "cycle": true },
        "label": { "kind": "rul", "cap_cycles": 125 }
    });
    let mut opts = kip_ml::pipeline::Options::reference(1);
    opts.model_name = "rul-e2e-drift".into();
    opts.model_version = "0.1.0".into();
    opts.feature_set = FeatureSet::from_json(&doc.to_string()).unwrap();
    opts.holdout_engines = 2;
    opts.ensemble_members = 1;
    opts.train.epochs = 3;
    opts.train.hidden = vec![8];
    let trained = kip_ml::pipeline::run(&engines[..60], &opts).unwrap();
    assert_eq!(trained.card.drift_reference.len(), SIGNALS.len() + 1);
    trained.onnx
}

/// The MQTT messages of a fleet replay: 15 unseen engines as machines `u0..u14` at staggered
/// ages (machine k first lives k/30 of the shortest life alone, then every machine advances
/// one cycle per round), each cycle one message per signal on `{prefix}/u{k}/{signal}`, with
/// `shift` added to s11. Returns the messages and the number of cycles (= predictions).
fn replay(
    engines: &[kip_ml::cmapss::Engine],
    prefix: &str,
    shift: f32,
) -> (Vec<(String, Vec<u8>)>, usize) {
    let inputs: Vec<String> = SIGNALS.iter().map(|s| (*s).to_owned()).collect();
    let lives: Vec<Vec<Vec<f32>>> = engines[60..75]
        .iter()
        .map(|e| {
            let mut rows = e.select(&inputs).unwrap();
            for r in &mut rows {
                r[4] += shift;
            }
            rows
        })
        .collect();
    let shortest = lives.iter().map(Vec::len).min().unwrap();
    let offsets: Vec<usize> = (0..lives.len())
        .map(|k| k * (shortest / 2) / lives.len())
        .collect();
    let mut cycles = Vec::new();
    for (k, rows) in lives.iter().enumerate() {
        cycles.extend(rows[..offsets[k]].iter().map(|r| (k, r)));
    }
    for t in 0..shortest - offsets[lives.len() - 1] {
        for (k, rows) in lives.iter().enumerate() {
            cycles.push((k, &rows[offsets[k] + t]));
        }
    }
    let messages = cycles
        .iter()
        .flat_map(|(k, row)| {
            SIGNALS
                .iter()
                .zip(row.iter())
                .map(move |(s, v)| (format!("{prefix}/u{k}/{s}"), format!("{v}").into_bytes()))
        })
        .collect();
    (messages, cycles.len())
}

/// Writes the agent's configuration: inference with `model`, one MQTT subscription on
/// `{prefix}/+/+` (machine and metric from the topic), sync to `agent_url`.
fn agent_config(
    dir: &Path,
    prefix: &str,
    broker: u16,
    agent_url: &str,
    model: &Path,
) -> (std::path::PathBuf, u16) {
    let http_port = free_port();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[agent]
device = "{prefix}"
state_dir = "{state}"

[buffer]
flush_interval_ms = 50

[http]
listen_addr = "127.0.0.1:{http_port}"

[log]
format = "text"
filter = "info"

[sync]
endpoints = ["{agent_url}"]
heartbeat_interval_s = 1

[inference]
enabled = true
ort_library = "{ort}"
model_path = "{model}"
queue_capacity_readings = 100000

[[mqtt]]
name = "plant"
url = "mqtt://127.0.0.1:{broker}"
client_id = "kip-drift-{prefix}"

[[mqtt.subscriptions]]
topic = "{prefix}/+/+"
machine_topic_level = 1
metric_topic_level = 2
value = {{ kind = "number" }}
"#,
            state = dir.join("state").display(),
            ort = ort_library().display(),
            model = model.display(),
        ),
    )
    .unwrap();
    (path, http_port)
}

/// Rows of `model_monitoring` and `predictions` of a device.
async fn counts(pool: &PgPool, device: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM model_monitoring WHERE device_id = $1), \
                (SELECT count(*) FROM predictions WHERE device_id = $1)",
    )
    .bind(device)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The newest record of every feature of `device`, through the API.
async fn latest_per_feature(
    api: &kip_tests::control_plane::AdminApi,
    org: Uuid,
    device: Uuid,
) -> Vec<Value> {
    let page = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-monitoring?device_id={device}&limit=10000"),
            None,
        )
        .await;
    let mut latest: std::collections::BTreeMap<String, Value> = Default::default();
    for r in page["records"].as_array().unwrap() {
        // Oldest first: later records replace earlier ones.
        latest.insert(r["feature"].as_str().unwrap().to_owned(), r.clone());
    }
    latest.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shifted_sensor_replayed_over_mqtt_shows_drift_in_the_control_plane_and_unchanged_data_stays_below()
 {
    kip_tests::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let db = NewDatabase::new();
    // Fleet health metrics refreshed often, so Prometheus sees a new report within seconds.
    let cp_toml = work.path().join("control-plane.toml");
    std::fs::write(&cp_toml, "[health]\nmetrics_refresh_ms = 200\n").unwrap();
    let cp_process = ControlPlaneProcess::new(&db.url, work.path())
        .with_config(cp_toml)
        .with_log(work.path().join("control-plane.log"));
    let _cp: ChildGroup = cp_process.spawn();
    let prometheus = Prometheus::start(
        &work.path().join("prometheus"),
        &format!("127.0.0.1:{}", cp_process.admin_port),
    )
    .await;
    let pool = PgPool::connect(&db.url).await.unwrap();
    let api = cp_process.admin_api();
    let org = api.create_org("acme").await;
    let other = api.create_org("other").await;

    let engines = kip_ml::cmapss::load(&workspace_root().join("ml/data/train_FD001.txt")).unwrap();
    let model = work.path().join("rul-e2e-drift.onnx");
    std::fs::write(&model, train_model(&engines)).unwrap();
    // No limit on queued QoS 1 messages: the replay arrives faster than a debug agent on a
    // busy machine reads it, and the default (1000) would drop the rest.
    let broker = Mosquitto::start(work.path(), "allow_anonymous true\nmax_queued_messages 0\n");

    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for name in ["steady", "shifted"] {
        let dir = work.path().join(name);
        let id = api
            .enroll(org, name, &dir.join("state").join("identity"))
            .await;
        devices.push(id.device_id());
        let (config, port) = agent_config(&dir, name, broker.port, &cp_process.agent_url(), &model);
        agents.push(spawn_agent(&config, port, Some(&dir.join("agent.log"))));
    }
    let (steady, shifted) = (devices[0], devices[1]);

    // The agents subscribe once they run and messages published before are lost, so wait
    // for each subscription with a probe reading (a metric no model reads).
    let port = broker.port;
    for (name, device) in [("steady", steady), ("shifted", shifted)] {
        let probe = vec![(format!("{name}/probe/ping"), b"1".to_vec())];
        eventually_ok(Duration::from_secs(60), || {
            let (probe, pool) = (probe.clone(), pool.clone());
            async move {
                publish_all(port, probe).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM sensor_data WHERE device_id = $1 AND machine = 'probe'",
                )
                .bind(device)
                .fetch_one(&pool)
                .await
                .unwrap();
                if n > 0 {
                    Ok(())
                } else {
                    Err("no probe reading stored yet".to_owned())
                }
            }
        })
        .await;
    }

    let (steady_msgs, steady_cycles) = replay(&engines, "steady", 0.0);
    let (shifted_msgs, shifted_cycles) = replay(&engines, "shifted", 1.0);
    let sent = steady_msgs.len() + shifted_msgs.len();
    let (a, b) = tokio::join!(
        publish_all(broker.port, steady_msgs),
        publish_all(broker.port, shifted_msgs)
    );
    assert_eq!((a + b) as usize, sent);

    // Every replayed cycle is a prediction, and every full drift window a set of 7 records
    // (6 signals and the output). Under load the agent may take a QoS 1 message out of order
    // (it defers one whose packet id is still unacknowledged), which merges two cycles of a
    // machine into one: allow 1 % fewer predictions, never fewer drift windows.
    for (device, cycles) in [(steady, steady_cycles), (shifted, shifted_cycles)] {
        let windows = cycles / DRIFT_WINDOW;
        eventually_ok(Duration::from_secs(300), || {
            let pool = pool.clone();
            async move {
                let (records, predictions) = counts(&pool, device).await;
                if predictions as usize >= cycles * 99 / 100 && records as usize >= 7 * windows {
                    Ok(())
                } else {
                    Err(format!(
                        "{predictions} of {} predictions, {records} of {} drift records",
                        cycles,
                        7 * windows
                    ))
                }
            }
        })
        .await;
    }

    let steady_latest = latest_per_feature(&api, org, steady).await;
    let shifted_latest = latest_per_feature(&api, org, shifted).await;
    eprintln!("steady: {steady_latest:#?}\nshifted: {shifted_latest:#?}");
    assert_eq!(steady_latest.len(), 7);
    for r in &steady_latest {
        assert_eq!(r["alarm"], false, "unchanged data drifted: {r}");
        assert_eq!(r["model"], "rul-e2e-drift");
        assert_eq!(r["window"], DRIFT_WINDOW);
        assert_eq!(r["effective_window"], 15, "15 machines in the window: {r}");
    }
    let s11 = shifted_latest
        .iter()
        .find(|r| r["feature"] == "s11")
        .unwrap();
    assert_eq!(s11["alarm"], true, "{s11}");
    assert!(
        s11["psi"].as_f64().unwrap() > s11["psi_threshold"].as_f64().unwrap(),
        "{s11}"
    );

    // kipctl shows the alarm of the shifted device, and none for the steady one.
    let key_file = cp_process.dir.join("admin.key");
    let out = kip_tests::kipctl::run_blocking(
        &cp_process.admin_url(),
        &key_file,
        &[
            "--org",
            &org.to_string(),
            "model",
            "drift",
            "--device",
            &shifted.to_string(),
            "--alarms",
        ],
    );
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("s11") && l.contains("DRIFT")),
        "{}",
        out.stdout
    );
    let out = kip_tests::kipctl::run_blocking(
        &cp_process.admin_url(),
        &key_file,
        &[
            "--org",
            &org.to_string(),
            "model",
            "drift",
            "--device",
            &steady.to_string(),
            "--alarms",
        ],
    );
    assert!(out.ok, "{out:?}");
    assert!(!out.stdout.contains("DRIFT"), "{}", out.stdout);

    // The fleet metric: one device's latest s11 window alarms.
    let metrics_url = format!("{}/metrics", cp_process.admin_url());
    eventually_ok(Duration::from_secs(60), || {
        let url = metrics_url.clone();
        async move {
            let body = reqwest::get(&url).await.unwrap().text().await.unwrap();
            let alarm = |l: &str| {
                l.starts_with(r#"kip_model_drift_alarm_devices{org="acme",model="rul-e2e-drift","#)
                    && l.ends_with(r#"feature="s11"} 1"#)
            };
            if body.lines().any(alarm)
                && body.lines().any(|l| {
                    l.starts_with(r#"kip_model_drift{org="acme",model="rul-e2e-drift""#)
                        && l.contains(r#"feature="s11",statistic="psi""#)
                })
            {
                Ok(())
            } else {
                Err(body
                    .lines()
                    .filter(|l| l.starts_with("kip_model_drift"))
                    .collect::<Vec<_>>()
                    .join("\n"))
            }
        }
    })
    .await;

    // The health reports: the shifted device is flagged with s11 among its drifting features,
    // the steady one is not; KipModelDrift fires for the shifted device only.
    let health = |device: Uuid| {
        let api = &api;
        async move {
            api.request(
                reqwest::Method::GET,
                &format!("/v1/organisations/{org}/devices/{device}/health"),
                None,
            )
            .await
        }
    };
    let flagged = |h: &Value| {
        h["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f == "model_drift"))
    };
    let shifted_health = eventually_ok(Duration::from_secs(60), || async {
        let h = health(shifted).await;
        let features = &h["report"]["model_drift_features"];
        if flagged(&h)
            && features
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "s11"))
        {
            Ok(h)
        } else {
            Err(h.to_string())
        }
    })
    .await;
    let score = shifted_health["report"]["model_drift"].as_f64().unwrap();
    assert!(score >= 1.0, "{shifted_health}");
    let steady_health = eventually_ok(Duration::from_secs(60), || async {
        let h = health(steady).await;
        if h["report"]["model_drift"].is_number() {
            Ok(h)
        } else {
            Err(h.to_string())
        }
    })
    .await;
    let steady_score = steady_health["report"]["model_drift"].as_f64().unwrap();
    assert!(!flagged(&steady_health), "{steady_health}");
    assert!(steady_score < 1.0, "{steady_health}");
    assert_eq!(
        steady_health["report"].get("model_drift_features"),
        None,
        "{steady_health}"
    );
    eprintln!(
        "model_drift: health drift score shifted {score:.2} ({}), steady {steady_score:.2}",
        shifted_health["report"]["model_drift_features"]
    );
    let alert = prometheus
        .wait_firing("KipModelDrift", Some("shifted"), Duration::from_secs(90))
        .await;
    assert_eq!(alert["org"], "acme", "{alert}");
    let firing = prometheus.firing("KipModelDrift").await.unwrap();
    assert!(
        firing.iter().all(|l| l["device"] != "steady"),
        "unchanged data raised KipModelDrift: {firing:?}"
    );
    // kipctl device health: the flag and the drifting feature in the DRIFT column.
    let out = kip_tests::kipctl::run_blocking(
        &cp_process.admin_url(),
        &key_file,
        &["--org", &org.to_string(), "device", "health"],
    );
    assert!(out.ok, "{out:?}");
    let header = out
        .stdout
        .lines()
        .find(|l| l.starts_with("NAME"))
        .unwrap_or_default();
    assert!(header.contains("DRIFT"), "{}", out.stdout);
    let row = |name: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row: {}", out.stdout))
            .to_owned()
    };
    let shifted_row = row("shifted");
    assert!(
        shifted_row.contains("model_drift") && shifted_row.contains("s11"),
        "{}",
        out.stdout
    );
    assert!(!row("steady").contains("model_drift"), "{}", out.stdout);

    // Another organisation sees none of it.
    let page = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{other}/model-monitoring?device_id={shifted}"),
            None,
        )
        .await;
    assert_eq!(page["records"], json!([]), "{page}");

    for mut a in agents {
        a.terminate();
    }
}
