//! Comparing model versions end to end (issue 14): the real `kip-control-plane` and three real
//! `kip-agent` binaries in one device group, a private Mosquitto, C-MAPSS engines replayed over
//! MQTT to failure, and failure events recorded afterwards as ground truth.
//!
//! 1. A canary of a good version selects a share of the group by the deterministic bucket
//!    (two of three agents); those serve it and run the baseline as a shadow on the same
//!    features; both predictions reach PostgreSQL (`role` champion / shadow); the third agent
//!    keeps the baseline. The comparison report (API and `kipctl`) gives agreement, error
//!    against ground truth, latency, failures and drift of both versions (the shadow's drift
//!    is monitored by the agent too); the evaluator judges it and does not halt. No MLflow:
//!    the rollouts are made through the API and kipctl only.
//!    Growing the share keeps the first devices and adds the third.
//! 2. The good version is promoted; a canary of a bad version (the same network with its
//!    output bias pushed far down: it always predicts 0 cycles) to the whole group crosses
//!    the error threshold once failures arrive: the evaluator halts it, records the reason,
//!    counts `kip_model_rollout_auto_halts_total{reason="error"}`, and the agents go back to
//!    the good version.
//! 3. Another organisation sees neither the rollout nor its report.
//!
//! A second test drives the shadow from a real MLflow server's `challenger` alias (one agent).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{path::Path, time::Duration};

use kip_shared::feature_set::FeatureSet;
use kip_tests::{
    ChildGroup, Mosquitto, NewDatabase,
    binaries::{ControlPlaneProcess, spawn_agent},
    eventually_ok, free_port,
    mosquitto::publish_all,
    ort_library, workspace_root,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const SIGNALS: [&str; 6] = ["s2", "s3", "s4", "s7", "s11", "s12"];
/// Engines replayed per agent and phase (unseen by training: engines 61..).
const ENGINES: usize = 4;
/// Error threshold of both rollouts (cycles).
const MAX_RMSE: f64 = 60.0;

fn options(version: &str, seed: u64) -> kip_ml::pipeline::Options {
    let doc = json!({
        "format_version": 1,
        "id": "e2e-compare-v1",
        "signals": SIGNALS,
        "window_cycles": 20,
        "outputs": { "aggregations": [{ "op": "last" }, { "op": "mean" }, { "op": "slope" }], "cycle": true },
        "label": { "kind": "rul", "cap_cycles": 125 }
    });
    let mut opts = kip_ml::pipeline::Options::reference(seed);
    // The name the kit's `register_model` registers.
    opts.model_name = "rul-fd001".into();
    opts.model_version = version.into();
    opts.feature_set = FeatureSet::from_json(&doc.to_string()).unwrap();
    opts.holdout_engines = 2;
    opts.ensemble_members = 1;
    opts.train.epochs = 8;
    opts.train.hidden = vec![16];
    opts
}

/// Baseline 0.1.0, good candidate 0.2.0, and the bad 0.3.0: 0.2.0's network with the output
/// bias lowered by 500, so the clipped output is always 0 (a model that says every machine is
/// about to fail).
fn models(engines: &[kip_ml::cmapss::Engine]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let base = kip_ml::pipeline::run(&engines[..60], &options("0.1.0", 1)).unwrap();
    let good = kip_ml::pipeline::run(&engines[..60], &options("0.2.0", 2)).unwrap();
    eprintln!(
        "trained: 0.1.0 holdout {:?}; 0.2.0 holdout {:?}",
        base.card.metrics, good.card.metrics
    );
    let mut nets = good.nets.clone();
    let last = nets[0].layers.last_mut().unwrap();
    last.b.mapv_inplace(|b| b - 500.0);
    let bad = kip_ml::onnx::export(
        &nets,
        &good.norm,
        125.0,
        &[
            ("kip.model_name", "rul-fd001".to_owned()),
            ("kip.model_version", "0.3.0".to_owned()),
            (
                kip_ml::pipeline::META_FEATURE_SET,
                good.feature_set.id().to_owned(),
            ),
            (
                kip_ml::pipeline::META_FEATURE_SET_DOC,
                serde_json::to_string(good.feature_set.doc()).unwrap(),
            ),
            (
                kip_ml::pipeline::META_DRIFT_REFERENCE,
                serde_json::to_string(&good.card.drift_reference).unwrap(),
            ),
        ],
    );
    (base.onnx, good.onnx, bad)
}

/// Whole lives of `ENGINES` unseen engines (from `first`) as machines `{tag}{k}`, round
/// robin (one cycle of every machine still alive per round), each cycle one message per
/// signal on `{prefix}/{tag}{k}/{signal}`. Returns the messages and the cycles per machine.
fn replay(
    engines: &[kip_ml::cmapss::Engine],
    first: usize,
    prefix: &str,
    tag: &str,
) -> (Vec<(String, Vec<u8>)>, Vec<usize>) {
    let inputs: Vec<String> = SIGNALS.iter().map(|s| (*s).to_owned()).collect();
    let lives: Vec<Vec<Vec<f32>>> = engines[first..first + ENGINES]
        .iter()
        .map(|e| e.select(&inputs).unwrap())
        .collect();
    let longest = lives.iter().map(Vec::len).max().unwrap();
    let mut messages = Vec::new();
    for t in 0..longest {
        for (k, rows) in lives.iter().enumerate() {
            if let Some(row) = rows.get(t) {
                for (s, v) in SIGNALS.iter().zip(row) {
                    messages.push((
                        format!("{prefix}/{tag}{k}/{s}"),
                        format!("{v}").into_bytes(),
                    ));
                }
            }
        }
    }
    (messages, lives.iter().map(Vec::len).collect())
}

fn agent_config(
    dir: &Path,
    name: &str,
    broker: u16,
    agent_url: &str,
    model: &Path,
) -> (std::path::PathBuf, u16) {
    let http_port = free_port();
    let path = dir.join("agent.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        &path,
        format!(
            r#"[agent]
device = "{name}"
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

[inference]
enabled = true
ort_library = "{ort}"
model_path = "{model}"
queue_capacity_readings = 100000

[[mqtt]]
name = "plant"
url = "mqtt://127.0.0.1:{broker}"
client_id = "kip-compare-{name}"

[[mqtt.subscriptions]]
topic = "{name}/+/+"
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

/// Predictions of `device` by version and role.
async fn predictions(pool: &PgPool, device: Uuid, version: &str, role: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM predictions WHERE device_id = $1 AND model_version = $2 AND role = $3",
    )
    .bind(device)
    .bind(version)
    .bind(role)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until every device of `want` (device, `name@version`) reports running it, sending
/// probe readings so the agents keep syncing (each ack carries the desired models).
async fn wait_running(
    api: &kip_tests::control_plane::AdminApi,
    broker: u16,
    org: Uuid,
    want: &[(Uuid, &str, String)],
) {
    let want = want.to_vec();
    eventually_ok(Duration::from_secs(120), || {
        let want = want.clone();
        async move {
            let probes = want
                .iter()
                .map(|(_, name, _)| (format!("{name}/probe/ping"), b"1".to_vec()))
                .collect();
            publish_all(broker, probes).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let status = api
                .request(
                    reqwest::Method::GET,
                    &format!("/v1/organisations/{org}/model-status"),
                    None,
                )
                .await;
            for (device, _, model) in &want {
                let s = status
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| s["device_id"] == device.to_string())
                    .unwrap();
                if s["desired_model"] != model.as_str() || s["in_sync"] != true {
                    return Err(format!("{device}: {s}"));
                }
            }
            Ok(())
        }
    })
    .await;
}

/// Records a failure of every replayed machine at its last champion prediction.
async fn record_failures(
    api: &kip_tests::control_plane::AdminApi,
    pool: &PgPool,
    org: Uuid,
    tag: &str,
) {
    let last: Vec<(Uuid, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT device_id, machine, max(ts) FROM predictions \
         WHERE org_id = $1 AND machine LIKE $2 AND role = 'champion' GROUP BY device_id, machine",
    )
    .bind(org)
    .bind(format!("{tag}%"))
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(!last.is_empty());
    for (device, machine, ts) in last {
        api.request(
            reqwest::Method::POST,
            &format!("/v1/organisations/{org}/maintenance-events"),
            Some(json!({ "device_id": device, "machine": machine, "kind": "failure", "ts": ts })),
        )
        .await;
    }
}

async fn wait_predictions(pool: &PgPool, want: &[(Uuid, &str, &str, usize)]) {
    for (device, version, role, n) in want {
        let n = *n;
        eventually_ok(Duration::from_secs(300), || {
            let pool = pool.clone();
            async move {
                let got = predictions(&pool, *device, version, role).await as usize;
                // A QoS 1 message taken out of order may merge two cycles of a machine (seen:
                // 10 of 800 on a loaded machine): allow 3 % fewer.
                if got >= n * 97 / 100 {
                    Ok(())
                } else {
                    Err(format!("{device} {version} {role}: {got} of {n}"))
                }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_compares_with_its_shadow_and_a_bad_version_is_halted_and_rolled_back() {
    kip_tests::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let db = NewDatabase::new();
    let cp_toml = work.path().join("cp.toml");
    // The rollout evaluator runs every metrics_refresh_ms.
    std::fs::write(&cp_toml, "[health]\nmetrics_refresh_ms = 500\n").unwrap();
    let cp_process = ControlPlaneProcess::new(&db.url, work.path())
        .with_config(cp_toml)
        .with_log(work.path().join("control-plane.log"));
    let _cp: ChildGroup = cp_process.spawn();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let api = cp_process.admin_api();
    let org = api.create_org("acme").await;
    let other = api.create_org("other").await;

    let engines = kip_ml::cmapss::load(&workspace_root().join("ml/data/train_FD001.txt")).unwrap();
    let (base, good, bad) = models(&engines);
    let base_file = work.path().join("base.onnx");
    std::fs::write(&base_file, &base).unwrap();
    let base_id: Uuid = api
        .register_model(org, "0.1.0", &base)
        .await
        .parse()
        .unwrap();
    api.upload_artifact(org, &base_id.to_string(), &base).await;
    let good_id: Uuid = api
        .register_model(org, "0.2.0", &good)
        .await
        .parse()
        .unwrap();
    api.upload_artifact(org, &good_id.to_string(), &good).await;
    let bad_id: Uuid = api
        .register_model(org, "0.3.0", &bad)
        .await
        .parse()
        .unwrap();
    api.upload_artifact(org, &bad_id.to_string(), &bad).await;

    let broker = Mosquitto::start(work.path(), "allow_anonymous true\nmax_queued_messages 0\n");
    let names = ["gw-a", "gw-b", "gw-c"];
    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for name in names {
        let dir = work.path().join(name);
        let id = api
            .enroll(org, name, &dir.join("state").join("identity"))
            .await;
        devices.push(id.device_id());
        let (config, port) =
            agent_config(&dir, name, broker.port, &cp_process.agent_url(), &base_file);
        agents.push(spawn_agent(&config, port, Some(&dir.join("agent.log"))));
    }
    sqlx::query("UPDATE devices SET labels = '{\"line\": \"a\"}' WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();

    // The share that selects exactly the two devices with the lowest buckets of 0.2.0.
    let mut buckets: Vec<(i32, Uuid)> = Vec::new();
    for d in &devices {
        let b: i32 = sqlx::query_scalar("SELECT release_bucket($1, $2)")
            .bind(good_id)
            .bind(d)
            .fetch_one(&pool)
            .await
            .unwrap();
        buckets.push((b, *d));
    }
    buckets.sort();
    let percent = buckets[1].0 + 1;
    let expected: Vec<Uuid> = buckets
        .iter()
        .filter(|(b, _)| *b < percent)
        .map(|(_, d)| *d)
        .collect();
    assert!(expected.len() >= 2, "{buckets:?}");
    let rollout = api
        .admin(
            &format!("/v1/organisations/{org}/model-rollouts"),
            json!({
                "model_id": good_id, "selector": { "line": "a" }, "percent": percent,
                "mode": "canary",
                "thresholds": { "max_rmse_cycles": MAX_RMSE, "min_truth_samples": 50 }
            }),
        )
        .await;
    eprintln!("canary: {rollout:#}");
    let rollout_id = rollout["id"].as_str().unwrap().to_owned();
    assert_eq!(rollout["baseline_model"], "rul-fd001@0.1.0");
    let mut selected: Vec<Uuid> = rollout["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().parse().unwrap())
        .collect();
    selected.sort();
    let mut exp_sorted = expected.clone();
    exp_sorted.sort();
    assert_eq!(selected, exp_sorted);

    let name_of = |d: &Uuid| names[devices.iter().position(|x| x == d).unwrap()];
    let want: Vec<(Uuid, &str, String)> = devices
        .iter()
        .map(|d| {
            let v = if expected.contains(d) {
                "0.2.0"
            } else {
                "0.1.0"
            };
            (*d, name_of(d), format!("rul-fd001@{v}"))
        })
        .collect();
    wait_running(&api, broker.port, org, &want).await;

    // Phase 1: engines 61.. to every agent.
    let mut all = Vec::new();
    let mut lens = Vec::new();
    for name in names {
        let (m, l) = replay(&engines, 60, name, "u");
        all.extend(m);
        lens = l;
    }
    let cycles: usize = lens.iter().sum();
    publish_all(broker.port, all).await;
    let mut waits = Vec::new();
    for d in &devices {
        if expected.contains(d) {
            waits.push((*d, "0.2.0", "champion", cycles));
            waits.push((*d, "0.1.0", "shadow", cycles));
        } else {
            waits.push((*d, "0.1.0", "champion", cycles));
        }
    }
    wait_predictions(&pool, &waits).await;
    let unselected: Vec<Uuid> = devices
        .iter()
        .filter(|d| !expected.contains(d))
        .copied()
        .collect();
    for d in &unselected {
        assert_eq!(predictions(&pool, *d, "0.1.0", "shadow").await, 0);
        assert_eq!(predictions(&pool, *d, "0.2.0", "champion").await, 0);
    }
    // The shadow prediction is tagged with its model through the API too.
    let page = api
        .request(
            reqwest::Method::GET,
            &format!(
                "/v1/organisations/{org}/predictions?device_id={}&role=shadow&limit=1",
                expected[0]
            ),
            None,
        )
        .await;
    assert_eq!(page["predictions"][0]["model"], "rul-fd001");
    assert_eq!(page["predictions"][0]["model_version"], "0.1.0");

    let truth_at = chrono::Utc::now();
    record_failures(&api, &pool, org, "u").await;
    let report_path = format!("/v1/organisations/{org}/model-rollouts/{rollout_id}/report");
    // Judged after the ground truth arrived, and not halted.
    eventually_ok(Duration::from_secs(60), || {
        let (api, path) = (&api, report_path.clone());
        async move {
            let r = api.request(reqwest::Method::GET, &path, None).await;
            let evaluated = r["rollout"]["last_evaluated_at"]
                .as_str()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
            if evaluated.is_some_and(|t| t > truth_at)
                && r["candidate"]["latency_p99_us"].is_number()
                && r["baseline"]["drift_max_psi"].is_number()
            {
                Ok(())
            } else {
                Err(format!("{r}"))
            }
        }
    })
    .await;
    let report = api.request(reqwest::Method::GET, &report_path, None).await;
    eprintln!("good canary report: {report:#}");
    assert_eq!(report["rollout"]["state"], "active");
    assert_eq!(report["crossed"], json!([]));
    let cand = &report["candidate"];
    let basev = &report["baseline"];
    let n_sel = expected.len() as i64;
    assert!(cand["predictions_champion"].as_i64().unwrap() >= n_sel * (cycles as i64) * 97 / 100);
    assert!(basev["predictions_shadow"].as_i64().unwrap() >= n_sel * (cycles as i64) * 97 / 100);
    assert!(cand["truth_samples"].as_i64().unwrap() >= n_sel * (cycles as i64) * 97 / 100);
    let rmse = cand["rmse_cycles"].as_f64().unwrap();
    assert!(rmse > 0.0 && rmse < MAX_RMSE, "{rmse}");
    assert!(basev["rmse_cycles"].as_f64().unwrap() > 0.0);
    assert_eq!(cand["inference_failures"], 0);
    assert!(cand["latency_p99_us"].as_f64().unwrap() > 0.0);
    // Drift is measured for both versions on these devices, the shadow (here the baseline)
    // included: the agent monitors the shadow against its own references.
    assert!(cand["drift_max_psi"].as_f64().unwrap() > 0.0, "{cand}");
    assert!(basev["drift_max_psi"].as_f64().unwrap() > 0.0, "{basev}");
    let agreement = &report["agreement"];
    assert!(agreement["pairs"].as_i64().unwrap() >= n_sel * (cycles as i64) * 97 / 100);
    let mad = agreement["mean_abs_diff_cycles"].as_f64().unwrap();
    assert!(
        mad > 0.0,
        "two different networks never agree exactly: {mad}"
    );
    let share = agreement["within_tolerance_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share));

    let key_file = cp_process.dir.join("admin.key");
    let out = kip_tests::kipctl::run_blocking(
        &cp_process.admin_url(),
        &key_file,
        &[
            "--org",
            &org.to_string(),
            "model",
            "rollouts",
            "report",
            &rollout_id,
        ],
    );
    assert!(out.ok, "{out:?}");
    eprintln!("{}", out.stdout);
    assert!(
        out.stdout.contains("agreement:") && out.stdout.contains("rul-fd001@0.2.0"),
        "{}",
        out.stdout
    );

    // A larger share keeps the devices selected and adds the third.
    let grown = api
        .admin(
            &format!("/v1/organisations/{org}/model-rollouts/{rollout_id}/percent"),
            json!({ "percent": 100 }),
        )
        .await;
    let grown_devices: Vec<String> = grown["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(grown_devices.len(), 3);
    for d in &expected {
        assert!(grown_devices.contains(&d.to_string()));
    }
    api.admin(
        &format!("/v1/organisations/{org}/model-rollouts/{rollout_id}/promote"),
        json!({}),
    )
    .await;

    // Phase 2: the bad version to the whole group.
    let bad_rollout = api
        .admin(
            &format!("/v1/organisations/{org}/model-rollouts"),
            json!({
                "model_id": bad_id, "selector": { "line": "a" }, "percent": 100, "mode": "canary",
                "thresholds": { "max_rmse_cycles": MAX_RMSE, "min_truth_samples": 50 }
            }),
        )
        .await;
    let bad_rollout_id = bad_rollout["id"].as_str().unwrap().to_owned();
    assert_eq!(bad_rollout["baseline_model"], "rul-fd001@0.2.0");
    let want: Vec<(Uuid, &str, String)> = devices
        .iter()
        .map(|d| (*d, name_of(d), "rul-fd001@0.3.0".to_owned()))
        .collect();
    wait_running(&api, broker.port, org, &want).await;
    let mut all = Vec::new();
    for name in names {
        let (m, l) = replay(&engines, 70, name, "w");
        all.extend(m);
        lens = l;
    }
    let cycles: usize = lens.iter().sum();
    publish_all(broker.port, all).await;
    let waits: Vec<(Uuid, &str, &str, usize)> = devices
        .iter()
        .map(|d| (*d, "0.3.0", "champion", cycles))
        .collect();
    wait_predictions(&pool, &waits).await;
    // No ground truth yet: nothing to judge the error by, the rollout runs on.
    let r = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-rollouts/{bad_rollout_id}"),
            None,
        )
        .await;
    assert_eq!(r["state"], "active", "{r}");
    record_failures(&api, &pool, org, "w").await;
    let bad_path = format!("/v1/organisations/{org}/model-rollouts/{bad_rollout_id}");
    eventually_ok(Duration::from_secs(60), || {
        let (api, path) = (&api, bad_path.clone());
        async move {
            let r = api.request(reqwest::Method::GET, &path, None).await;
            if r["state"] == "rolled_back" {
                Ok(())
            } else {
                Err(format!("{r}"))
            }
        }
    })
    .await;
    let r = api.request(reqwest::Method::GET, &bad_path, None).await;
    eprintln!("bad canary: {r:#}");
    let halt = r["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "auto_halted")
        .unwrap();
    assert_eq!(halt["reason"], "error");
    assert!(halt["observed"].as_f64().unwrap() > MAX_RMSE, "{halt}");
    assert_eq!(halt["threshold"].as_f64().unwrap(), MAX_RMSE);
    assert_eq!(halt["devices"], 3);
    assert!(
        r["halt_reason"]
            .as_str()
            .unwrap()
            .starts_with("error: RMSE")
    );
    let report = api
        .request(reqwest::Method::GET, &format!("{bad_path}/report"), None)
        .await;
    eprintln!("bad canary report: {report:#}");
    // The agents go back to the good version.
    let want: Vec<(Uuid, &str, String)> = devices
        .iter()
        .map(|d| (*d, name_of(d), "rul-fd001@0.2.0".to_owned()))
        .collect();
    wait_running(&api, broker.port, org, &want).await;
    let metrics = reqwest::get(format!("{}/metrics", cp_process.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"kip_model_rollout_auto_halts_total{reason="error"} 1"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("auto_halts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The good canary was judged with the same threshold and never halted.
    let first = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-rollouts/{rollout_id}"),
            None,
        )
        .await;
    assert_eq!(first["state"], "promoted");
    assert!(
        first["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "auto_halted")
    );
    let out = kip_tests::kipctl::run_blocking(
        &cp_process.admin_url(),
        &key_file,
        &[
            "--org",
            &org.to_string(),
            "model",
            "rollouts",
            "show",
            &bad_rollout_id,
        ],
    );
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("auto_halted [error]"), "{}", out.stdout);

    // Another organisation sees neither the rollout nor its report.
    let key = std::fs::read_to_string(&key_file).unwrap();
    let http = reqwest::Client::new();
    for path in [
        format!("/v1/organisations/{other}/model-rollouts/{bad_rollout_id}"),
        format!("/v1/organisations/{other}/model-rollouts/{bad_rollout_id}/report"),
    ] {
        let resp = http
            .get(format!("{}{path}", cp_process.admin_url()))
            .bearer_auth(key.trim())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
    }
    let list = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{other}/model-rollouts"),
            None,
        )
        .await;
    assert_eq!(list, json!([]));

    for mut a in agents {
        a.terminate();
    }
}

/// What the MLflow test prints when a wait fails: both process logs and the rows that decide
/// the device's desired state (the temporary folder is gone once the test panics).
struct Diagnostics<'a> {
    agent_log: &'a Path,
    cp_log: &'a Path,
    pool: &'a PgPool,
    org: Uuid,
}

impl Diagnostics<'_> {
    async fn dump(&self) -> String {
        let mut out = String::new();
        for (what, path) in [("agent", self.agent_log), ("control plane", self.cp_log)] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            out.push_str(&format!(
                "---- {what} log {} ----\n{text}\n",
                path.display()
            ));
        }
        for (what, sql) in [
            (
                "ai_models",
                "SELECT id::text, version, stage, coalesce(mlflow_version, '-'), created_at::text \
                 FROM ai_models WHERE org_id = $1 ORDER BY created_at",
            ),
            (
                "desired_models",
                "SELECT coalesce(device_id::text, '-'), coalesce(selector::text, '-'), \
                        model_id::text, '', updated_at::text FROM desired_models WHERE org_id = $1",
            ),
            (
                "model_rollouts",
                "SELECT id::text, model_id::text || ' base ' || baseline_model_id::text, \
                        mode || ' ' || origin || ' ' || state || ' ' || percent::text, \
                        coalesce(halt_reason, '-'), updated_at::text \
                 FROM model_rollouts WHERE org_id = $1 ORDER BY created_at",
            ),
            (
                "audit_log (mlflow)",
                "SELECT action, target, '', '', created_at::text FROM audit_log \
                 WHERE org_id = $1 AND action LIKE 'models.mlflow%' ORDER BY created_at",
            ),
            (
                "device_model_status",
                "SELECT device_id::text, coalesce(running_model, '-'), \
                        coalesce(last_error, '-'), '', updated_at::text \
                 FROM device_model_status WHERE org_id = $1",
            ),
        ] {
            out.push_str(&format!("---- {what} ----\n"));
            match sqlx::query_as::<_, (String, String, String, String, String)>(sql)
                .bind(self.org)
                .fetch_all(self.pool)
                .await
            {
                Ok(rows) => {
                    for r in rows {
                        out.push_str(&format!("{r:?}\n"));
                    }
                }
                Err(e) => out.push_str(&format!("query failed: {e}\n")),
            }
        }
        out
    }
}

/// The length of the agent's log now: [`wait_log`] looks only at what comes after it.
fn log_mark(log: &Path) -> usize {
    std::fs::read(log).map_or(0, |b| b.len())
}

/// Waits until the agent's log has a line containing `needle` after `mark` (the agent logs
/// each shadow change; a line from before the change waited for must not count); on timeout
/// panics with [`Diagnostics::dump`].
async fn wait_log(d: &Diagnostics<'_>, mark: usize, needle: &str, broker: u16, probe: &str) {
    let (log, needle, probe) = (d.agent_log.to_owned(), needle.to_owned(), probe.to_owned());
    let found = kip_tests::eventually(Duration::from_secs(120), || {
        let (log, needle, probe) = (log.clone(), needle.clone(), probe.clone());
        async move {
            // Probe readings keep the agent syncing (each ack carries the desired models).
            publish_all(broker, vec![(probe, b"1".to_vec())]).await;
            let bytes = std::fs::read(&log).unwrap_or_default();
            let text = String::from_utf8_lossy(bytes.get(mark..).unwrap_or_default());
            if text.contains(&needle) {
                Ok(())
            } else {
                Err(format!("no {needle:?} in {} yet", log.display()))
            }
        }
    })
    .await;
    if let Err(e) = found {
        panic!("{e}\n{}", d.dump().await);
    }
}

/// The MLflow `challenger` alias on a real agent: a real MLflow server and the control plane
/// binary polling it; setting `challenger` makes the agent run that version as a shadow
/// beside the group's champion (both predictions reach PostgreSQL, the `mlflow` rollout's
/// report pairs them); removing the alias ends the rollout and the agent drops the shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mlflow_challenger_alias_runs_a_shadow_on_a_real_agent_and_its_removal_stops_it() {
    kip_tests::install_crypto_provider();
    let work = tempfile::tempdir().unwrap();
    let ml = kip_tests::MlflowServer::start().await;
    let db = NewDatabase::new();
    let cp_toml = work.path().join("cp.toml");
    std::fs::write(
        &cp_toml,
        format!(
            "[health]\nmetrics_refresh_ms = 500\n\n[mlflow]\ntracking_uri = \"{}\"\nalias_poll_interval_ms = 300\n",
            ml.url()
        ),
    )
    .unwrap();
    let cp_process = ControlPlaneProcess::new(&db.url, work.path())
        .with_config(cp_toml)
        .with_log(work.path().join("control-plane.log"));
    let _cp: ChildGroup = cp_process.spawn();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let api = cp_process.admin_api();
    let org = api.create_org("acme").await;

    let engines = kip_ml::cmapss::load(&workspace_root().join("ml/data/train_FD001.txt")).unwrap();
    let (base, good, _) = models(&engines);
    let base_file = work.path().join("base.onnx");
    std::fs::write(&base_file, &base).unwrap();
    // MLflow versions 1 (0.1.0) and 2 (0.2.0), mirrored at registration.
    let mut ids = Vec::new();
    for (v, bytes) in [("0.1.0", &base), ("0.2.0", &good)] {
        let id = api.register_model(org, v, bytes).await;
        api.upload_artifact(org, &id, bytes).await;
        ids.push(id);
    }
    let broker = Mosquitto::start(work.path(), "allow_anonymous true\nmax_queued_messages 0\n");
    let name = "gw-a";
    let dir = work.path().join(name);
    let device = api
        .enroll(org, name, &dir.join("state").join("identity"))
        .await
        .device_id();
    let (config, port) = agent_config(&dir, name, broker.port, &cp_process.agent_url(), &base_file);
    let _agent = spawn_agent(&config, port, Some(&dir.join("agent.log")));
    // The group runs 0.1.0 (a rollout of it, promoted), and MLflow names it the champion.
    // The device joins the group after the promotion: while the rollout ran it would have
    // been a canary of 0.1.0 shadowing 0.2.0, and a shadow installed then (with its log line)
    // could still be there when `challenger` names 0.2.0, which logs nothing new. (That
    // window is how issue 14's lost shadow showed: a download answered 404 after the
    // promotion was remembered as a refusal; `kip-agent`'s sync tests cover it.)
    let r = api
        .admin(
            &format!("/v1/organisations/{org}/model-rollouts"),
            json!({ "model_id": ids[0], "baseline_model_id": ids[1], "selector": { "line": "a" },
                    "percent": 100, "mode": "canary" }),
        )
        .await;
    api.admin(
        &format!(
            "/v1/organisations/{org}/model-rollouts/{}/promote",
            r["id"].as_str().unwrap()
        ),
        json!({}),
    )
    .await;
    sqlx::query("UPDATE devices SET labels = '{\"line\": \"a\"}' WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    let mlflow = reqwest::Client::new();
    let alias = async |method: reqwest::Method, alias: &str, version: Option<&str>| {
        let mut body = json!({ "name": "rul-fd001", "alias": alias });
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        let r = mlflow
            .request(
                method,
                format!("{}/api/2.0/mlflow/registered-models/alias", ml.url()),
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    };
    alias(reqwest::Method::POST, "champion", Some("1")).await;
    wait_running(
        &api,
        broker.port,
        org,
        &[(device, name, "rul-fd001@0.1.0".into())],
    )
    .await;

    // Challenger -> version 2: the agent installs 0.2.0 as its shadow.
    let log = dir.join("agent.log");
    let mark = log_mark(&log);
    alias(reqwest::Method::POST, "challenger", Some("2")).await;
    let cp_log = work.path().join("control-plane.log");
    let diag = Diagnostics {
        agent_log: &log,
        cp_log: &cp_log,
        pool: &pool,
        org,
    };
    wait_log(
        &diag,
        mark,
        "desired shadow model installed",
        broker.port,
        "gw-a/probe/ping",
    )
    .await;
    let rollouts = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-rollouts"),
            None,
        )
        .await;
    let shadow = rollouts
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["origin"] == "mlflow")
        .unwrap_or_else(|| panic!("no mlflow rollout in {rollouts}"))
        .clone();
    assert_eq!(shadow["mode"], "shadow");
    assert_eq!(shadow["model"], "rul-fd001@0.2.0");
    assert_eq!(shadow["baseline_model"], "rul-fd001@0.1.0");
    let rollout_id = shadow["id"].as_str().unwrap().to_owned();

    // Engines replayed: both versions predict every cycle on the same features.
    let (messages, lens) = replay(&engines, 60, name, "u");
    let cycles: usize = lens.iter().sum();
    publish_all(broker.port, messages).await;
    wait_predictions(
        &pool,
        &[
            (device, "0.1.0", "champion", cycles),
            (device, "0.2.0", "shadow", cycles),
        ],
    )
    .await;
    let report = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-rollouts/{rollout_id}/report"),
            None,
        )
        .await;
    eprintln!("mlflow challenger report: {report:#}");
    let pairs = report["agreement"]["pairs"].as_i64().unwrap();
    assert!(pairs >= (cycles as i64) * 97 / 100, "{report}");
    assert!(report["candidate"]["predictions_shadow"].as_i64().unwrap() >= pairs);
    // The candidate runs only as the shadow here, and its drift is measured all the same.
    assert!(
        report["candidate"]["drift_max_psi"].as_f64().unwrap() > 0.0,
        "{report}"
    );

    // The alias removed: the rollout ends and the agent drops the shadow.
    let mark = log_mark(&log);
    alias(reqwest::Method::DELETE, "challenger", None).await;
    wait_log(
        &diag,
        mark,
        "shadow model removed",
        broker.port,
        "gw-a/probe/ping",
    )
    .await;
    let r = api
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-rollouts/{rollout_id}"),
            None,
        )
        .await;
    assert_eq!(r["state"], "halted", "{r}");
    assert_eq!(r["halt_reason"], "mlflow: alias challenger removed");
}
