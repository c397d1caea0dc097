//! `kip-train` as an MLflow run, against a real MLflow tracking server (`kip_tests::MlflowServer`):
//! a small config trained for a few epochs with `--mlflow`, then everything read back through
//! MLflow's REST API: params, the per-epoch metric history, the final held-out metrics, the
//! artifact list (and the ONNX bytes), and the model version created from the run. The same
//! run without MLflow says it is not tracking and gives the same model bytes; an unreachable
//! server fails the run before training, naming the server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use kip_tests::{MlflowServer, free_port, workspace_root as root};
use serde_json::Value;

const EPOCHS: usize = 3;

/// The first 40 engines of FD001 (20 held out, 20 trained): a run of seconds in a debug build.
fn small_data(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(root().join("ml/data/train_FD001.txt")).unwrap();
    let keep: String = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|u| u.parse::<u32>().ok())
                .is_some_and(|u| u <= 40)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let p = dir.join("train_small.txt");
    std::fs::write(&p, keep).unwrap();
    p
}

fn kip_train(data: &Path, out: &Path, mlflow: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kip-train"));
    cmd.arg("--config")
        .arg(root().join("ml/configs/fd001-v1.toml"))
        .arg("--data")
        .arg(data)
        .args([
            "--seed",
            "7",
            "--epochs",
            &EPOCHS.to_string(),
            "--hidden",
            "8",
        ])
        .arg("--out")
        .arg(out)
        .env_remove("MLFLOW_TRACKING_URI")
        .env_remove("MLFLOW_EXPERIMENT_NAME");
    if let Some(uri) = mlflow {
        cmd.args(["--mlflow", uri, "--mlflow-experiment", "kip-test"]);
    }
    cmd.output().unwrap()
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    let r = http.get(&url).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {text}");
    serde_json::from_str(&text).unwrap()
}

fn kv(list: &Value, key: &str) -> Option<String> {
    list.as_array()?
        .iter()
        .find(|p| p["key"] == key)
        .and_then(|p| p["value"].as_str())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_run_is_an_mlflow_run_with_epoch_metrics_artifacts_and_a_model_version() {
    let server = MlflowServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let tracked = dir.path().join("tracked");
    let out = kip_train(&data, &tracked, Some(server.url()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("MLflow: tracking run"), "{stderr}");
    let stem = "rul-fd001-1.0.0+seed7";
    let onnx = std::fs::read(tracked.join(format!("{stem}.onnx"))).unwrap();
    let card: Value =
        serde_json::from_slice(&std::fs::read(tracked.join(format!("{stem}.json"))).unwrap())
            .unwrap();

    let api = format!("{}/api/2.0/mlflow", server.url());
    let http = reqwest::Client::new();
    let exp = get(
        &http,
        format!("{api}/experiments/get-by-name?experiment_name=kip-test"),
    )
    .await;
    let exp_id = exp["experiment"]["experiment_id"].as_str().unwrap();
    let runs: Value = http
        .post(format!("{api}/runs/search"))
        .json(&serde_json::json!({ "experiment_ids": [exp_id] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    let run_id = run["info"]["run_id"].as_str().unwrap().to_owned();
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(run["info"]["run_name"], stem);

    // Params: the config, seed and feature set (and the overrides actually used).
    let params = &run["data"]["params"];
    assert_eq!(kv(params, "seed").as_deref(), Some("7"));
    assert_eq!(kv(params, "feature_set").as_deref(), Some("cmapss-w30-v1"));
    assert!(
        kv(params, "config")
            .unwrap()
            .ends_with("ml/configs/fd001-v1.toml")
    );
    assert_eq!(kv(params, "epochs").as_deref(), Some("3"));
    assert_eq!(kv(params, "hidden").as_deref(), Some("8"));
    assert_eq!(kv(params, "data_sha256").unwrap().len(), 64);
    assert_eq!(
        kv(&run["data"]["tags"], "kip.artifact_sha256").as_deref(),
        card["artifact_sha256"].as_str()
    );

    // Per-epoch history: one point per epoch, step = epoch.
    for key in ["train_loss", "val_rmse"] {
        let h = get(
            &http,
            format!("{api}/metrics/get-history?run_id={run_id}&metric_key={key}"),
        )
        .await;
        let points = h["metrics"].as_array().unwrap();
        let steps: Vec<i64> = points.iter().map(|p| p["step"].as_i64().unwrap()).collect();
        assert_eq!(steps, (0..EPOCHS as i64).collect::<Vec<_>>(), "{key}: {h}");
        assert!(
            points
                .iter()
                .all(|p| p["value"].as_f64().unwrap().is_finite()),
            "{h}"
        );
    }
    // The last epoch's validation RMSE of a single network is the held-out RMSE of the card.
    let metrics = &run["data"]["metrics"];
    let last = |k: &str| {
        metrics
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == k)
            .and_then(|m| m["value"].as_f64())
            .unwrap_or_else(|| panic!("{k} missing in {metrics}"))
    };
    let rmse = card["metrics"]["rmse"].as_f64().unwrap();
    assert!((last("rmse") - rmse).abs() < 1e-9, "{metrics}");
    assert!((last("val_rmse") - rmse).abs() < 1e-3, "{metrics}");
    assert!((last("phm08_score") - card["metrics"]["nasa_score"].as_f64().unwrap()).abs() < 1e-6);

    // Artifacts: the ONNX file (same bytes), the card, the feature-set document, the config.
    let mut listed = Vec::new();
    for folder in ["model", "feature_set", "config"] {
        let l = get(
            &http,
            format!("{api}/artifacts/list?run_id={run_id}&path={folder}"),
        )
        .await;
        for f in l["files"].as_array().unwrap() {
            listed.push(f["path"].as_str().unwrap().to_owned());
        }
    }
    listed.sort();
    assert_eq!(
        listed,
        [
            "config/fd001-v1.toml".to_owned(),
            "feature_set/cmapss-w30-v1.json".into(),
            format!("model/{stem}.json"),
            format!("model/{stem}.onnx"),
        ]
    );
    let downloaded = http
        .get(format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/model/{stem}.onnx",
            server.url()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        downloaded.as_ref() == onnx.as_slice(),
        "uploaded ONNX differs"
    );

    // The model version comes from the run: run_id, source = the run's model folder.
    let versions = get(
        &http,
        format!("{api}/model-versions/search?filter=name%3D%27rul-fd001%27"),
    )
    .await;
    let versions = versions["model_versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let v = &versions[0];
    assert_eq!(v["run_id"], run_id.as_str());
    assert_eq!(
        v["source"],
        format!("mlflow-artifacts:/{exp_id}/{run_id}/artifacts/model")
    );
    assert_eq!(
        kv(&v["tags"], "kip.version").as_deref(),
        Some("1.0.0+seed7")
    );
    assert_eq!(
        kv(&v["tags"], "kip.artifact_sha256").as_deref(),
        card["artifact_sha256"].as_str()
    );

    // Without MLflow: says so, and tracking did not change the model (same bytes).
    let plain = dir.path().join("plain");
    let out = kip_train(&data, &plain, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("MLflow: not tracking"), "{stderr}");
    assert_eq!(
        std::fs::read(plain.join(format!("{stem}.onnx"))).unwrap(),
        onnx
    );

    // An unreachable server named explicitly fails the run before training, naming it.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let out = kip_train(&data, &dir.path().join("nowhere"), Some(&nowhere));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&nowhere), "{stderr}");
    assert!(!dir.path().join("nowhere").exists());
}
