//! Model rollout end to end: the registry's desired state travels in the sync ack, the agent
//! downloads the model over mTLS, checks its sha256, loads it and reports what it runs; a bad
//! version is refused while the last good model keeps serving; rollback is pointing the
//! desired state back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{sync::Arc, time::Duration};

use kip_agent::{
    edge_inference::{Inference, InferenceConfig},
    sync::Syncer,
};
use kip_tests::{
    agent::{open_buffer, reading, sync_config},
    eventually, ort_library, reference_model, wait_until, workspace_root,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Registers and uploads an artifact; returns the model id.
async fn register(
    cp: &kip_tests::control_plane::ControlPlane,
    org: uuid::Uuid,
    version: &str,
    bytes: &[u8],
) -> String {
    let api = cp.api();
    let id = api.register_model(org, version, bytes).await;
    api.upload_artifact(org, &id, bytes).await;
    id
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_desired_model_is_rolled_out_a_bad_one_refused_and_rollback_works(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let agent_dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", agent_dir.path()).await;
    let device = id.device_id();

    let reference = reference_model();
    let (good, card) = (reference.onnx_bytes(), reference.card());
    let version = card["version"].as_str().unwrap().to_owned();
    let good_id = register(&cp, org, &version, &good).await;
    // A "model" that passes its checksum (the registry stored what was uploaded) but is no model.
    let bad_id = register(&cp, org, "2.0.0-broken", b"definitely not an onnx graph").await;

    let desired = |model: &str| {
        let (cp, model) = (&cp, model.to_owned());
        async move {
            cp.api()
                .request(
                    reqwest::Method::PUT,
                    &format!("/v1/organisations/{org}/devices/{device}/desired-model"),
                    Some(json!({ "model_id": model })),
                )
                .await
        }
    };
    desired(&good_id).await;

    // The agent: inference with no model yet, and its sync loop.
    let lib = ort_library();
    let mut registry = kip_agent::metrics::new_registry();
    let inference: Arc<Inference> = Inference::start(
        &InferenceConfig {
            ort_library: Some(lib),
            model_path: None,
            model_sha256: None,
            queue_capacity_readings: 16,
        },
        &mut registry,
    )
    .unwrap();
    assert_eq!(inference.running_model(), None);
    let buffer = open_buffer(&agent_dir.path().join("buffer"));
    let (_tls_tx, tls_rx) = tokio::sync::watch::channel(id.client_config().unwrap());
    let syncer = Syncer::new(
        buffer.clone(),
        sync_config(vec![cp.agent_url.clone()]),
        tls_rx,
        &mut registry,
    )
    .unwrap()
    .with_inference(Some(inference.clone()))
    .with_device_org(id.org_id());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));
    // Readings keep flowing, so batches (and acks carrying the desired state) keep coming.
    let feeder = {
        let (buffer, cancel) = (buffer.clone(), cancel.clone());
        tracker.spawn(async move {
            let mut i = 0;
            while !cancel.is_cancelled() {
                buffer.append(&reading(i)).unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let want = format!("rul-fd001@{version}");
    wait_until(
        Duration::from_secs(30),
        "the desired model is installed",
        || {
            let inference = inference.clone();
            let want = want.clone();
            async move { inference.running_model().as_deref() == Some(want.as_str()) }
        },
    )
    .await;
    let status_path = format!("/v1/organisations/{org}/model-status");
    let in_sync = || async {
        let s = cp
            .http
            .get(format!("{}{status_path}", cp.admin_url))
            .bearer_auth(&cp.admin_key)
            .send()
            .await
            .unwrap();
        let v: Value = s.json().await.unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .any(|d| d["device_id"] == json!(device) && d["in_sync"] == json!(true))
    };
    wait_until(
        Duration::from_secs(30),
        "the control plane sees the device in sync",
        in_sync,
    )
    .await;

    // A broken version: refused, the good model keeps serving, the device is reported out of sync.
    desired(&bad_id).await;
    let tried = eventually(Duration::from_secs(30), || async {
        let m = kip_agent::metrics::render(&registry);
        if m.contains("kip_agent_model_swap_failures_total 1") {
            Ok(())
        } else {
            Err(format!("the broken model was never tried:\n{m}"))
        }
    })
    .await;
    assert_eq!(tried, Ok(()));
    assert_eq!(inference.running_model().as_deref(), Some(want.as_str()));

    // Rollback: point the desired state back; the device is in sync again without a reload.
    desired(&good_id).await;
    wait_until(
        Duration::from_secs(30),
        "back in sync after rollback",
        in_sync,
    )
    .await;
    assert_eq!(inference.running_model().as_deref(), Some(want.as_str()));

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    drop(feeder);
}

/// Inference keeps predicting while the network is cut; the predictions sync once it is back,
/// each exactly once.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn predictions_made_during_a_network_cut_sync_later(pool: PgPool) {
    use kip_shared::{Quality, Reading, Record};

    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let agent_dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", agent_dir.path()).await;
    let device = id.device_id();
    let proxy = kip_tests::proxy::Proxy::start(kip_tests::control_plane::agent_addr(&cp)).await;
    proxy.set(kip_tests::proxy::Link::Drop);

    let model = reference_model().onnx_path;
    let lib = ort_library();
    let mut registry = kip_agent::metrics::new_registry();
    let inference = Inference::start(
        &InferenceConfig {
            ort_library: Some(lib),
            model_path: Some(model),
            model_sha256: None,
            queue_capacity_readings: 1024,
        },
        &mut registry,
    )
    .unwrap();
    let buffer = open_buffer(&agent_dir.path().join("buffer"));
    let (_tls_tx, tls_rx) = tokio::sync::watch::channel(id.client_config().unwrap());
    let syncer = Syncer::new(
        buffer.clone(),
        sync_config(vec![proxy.url()]),
        tls_rx,
        &mut registry,
    )
    .unwrap();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));
    let (itx, irx) = tokio::sync::mpsc::channel(1024);
    tracker.spawn(inference.clone().run(buffer.clone(), irx, None));

    // 40 cycles of engine 1, fed as the buffer writer would: buffered and handed to inference.
    let engines = kip_ml::cmapss::load(&workspace_root().join("ml/data/train_FD001.txt")).unwrap();
    let spec = kip_shared::features::FeatureSpec::cmapss_v1();
    let series = engines[0].select(&spec.channels).unwrap();
    for row in series.iter().take(40) {
        for (metric, v) in spec.channels.iter().zip(row) {
            let r = Reading {
                source: "sim".into(),
                machine: "engine-1".into(),
                metric: (*metric).into(),
                ts: chrono::Utc::now(),
                value: f64::from(*v),
                quality: Quality::Good,
            };
            buffer.append(&Record::Reading(r.clone())).unwrap();
            itx.send(r).await.unwrap();
        }
    }
    // Every cycle gave a prediction, all while offline.
    let predicted = || {
        buffer
            .read_range(0, 100_000, u64::MAX)
            .unwrap()
            .into_iter()
            .filter(|s| matches!(s.record, Record::Prediction(_)))
            .map(|s| (s.epoch, s.seq))
            .collect::<std::collections::BTreeSet<_>>()
    };
    wait_until(
        Duration::from_secs(30),
        "40 predictions buffered",
        || async { predicted().len() >= 40 },
    )
    .await;
    // The agent tried to sync through the cut link (the proxy refused its connections).
    wait_until(
        Duration::from_secs(30),
        "sync attempts while cut",
        || async { proxy.connections() >= 2 },
    )
    .await;
    let expected = predicted();
    let stored_predictions = |pool: PgPool| async move {
        sqlx::query_as::<_, (i64, i64)>("SELECT epoch, seq FROM predictions WHERE device_id = $1")
            .bind(device)
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(e, s)| (e as u64, s as u64))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(
        stored_predictions(pool.clone()).await.is_empty(),
        "nothing can arrive while cut"
    );

    proxy.set(kip_tests::proxy::Link::Up);
    let synced = eventually(Duration::from_secs(60), || async {
        let stored = stored_predictions(pool.clone()).await;
        if stored == expected {
            Ok(())
        } else {
            Err(format!(
                "{} of {} predictions synced",
                stored.len(),
                expected.len()
            ))
        }
    })
    .await;
    assert_eq!(synced, Ok(()));
    let rul: Vec<f64> =
        sqlx::query_scalar("SELECT rul_cycles FROM predictions WHERE device_id = $1 ORDER BY seq")
            .bind(device)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(rul.iter().all(|r| (0.0..=125.0).contains(r)), "{rul:?}");

    drop(itx);
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
