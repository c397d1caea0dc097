//! Signed models end to end (issue 13): the control plane signs each artifact at upload, the
//! agent receives the signing keys with its sync acks over mTLS and verifies the signature
//! over (its organisation, name, version, sha256 of the downloaded bytes) before loading.
//! A model written straight into the database never runs, a tampered artifact is refused, and
//! the last good model keeps serving; a correctly uploaded model runs.
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
    eventually, ort_library, reference_model, wait_until,
};
use serde_json::json;
use sha2::Digest as _;
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

/// Writes an artifact row as an attacker with database access would: bypassing the API, so
/// without a signature.
async fn insert_unsigned_artifact(pool: &PgPool, org: Uuid, model: &str, bytes: &[u8]) {
    let model: Uuid = model.parse().unwrap();
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    kip_tests::model_artifacts::insert_raw(pool, org, model, bytes, &sha, None).await;
}

/// The reference model with another version in its metadata: a valid, loadable model that is
/// observably different when it serves (same-length string, so the protobuf stays valid).
fn variant(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .expect("version string in the ONNX metadata");
    let mut out = bytes.to_vec();
    out[at..at + to.len()].copy_from_slice(to.as_bytes());
    out
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn unsigned_and_tampered_models_never_run_and_a_signed_one_does(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let agent_dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", agent_dir.path()).await;
    let device = id.device_id();

    let reference = reference_model();
    let good = reference.onnx_bytes();
    let version = reference.card()["version"].as_str().unwrap().to_owned();
    let rogue_version = format!("6.6.6{}", &version[5..]);
    let rogue = variant(&good, &version, &rogue_version);

    // The agent: inference with no model yet, and its sync loop.
    let mut registry = kip_agent::metrics::new_registry();
    let inference: Arc<Inference> = Inference::start(
        &InferenceConfig {
            ort_library: Some(ort_library()),
            model_path: None,
            model_sha256: None,
            queue_capacity_readings: 16,
        },
        &mut registry,
    )
    .unwrap();
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
    let registry = Arc::new(registry);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));
    {
        let (buffer, cancel) = (buffer.clone(), cancel.clone());
        tracker.spawn(async move {
            let mut i = 0;
            while !cancel.is_cancelled() {
                buffer.append(&reading(i)).unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let desired = |model: String| {
        let cp = &cp;
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
    let refused = |reason: &'static str, n: u32| {
        let registry = registry.clone();
        async move {
            let r = eventually(Duration::from_secs(30), || {
                let registry = registry.clone();
                async move {
                    let m = kip_agent::metrics::render(&registry);
                    let line = format!("kip_agent_model_refusals_total{{reason=\"{reason}\"}} {n}");
                    if m.contains(&line) {
                        Ok(())
                    } else {
                        Err(format!("no `{line}`:\n{m}"))
                    }
                }
            })
            .await;
            assert_eq!(r, Ok(()));
        }
    };
    let last_error = || async {
        let v = cp
            .api()
            .request(
                reqwest::Method::GET,
                &format!("/v1/organisations/{org}/model-status"),
                None,
            )
            .await;
        v.as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == json!(device))
            .and_then(|d| d["last_error"].as_str().map(str::to_owned))
    };

    // 1. Uploaded through the API: signed, verified, runs.
    let good_id = cp.api().register_model(org, &version, &good).await;
    let info = cp.api().upload_artifact(org, &good_id, &good).await;
    assert!(
        info["signature"].as_str().unwrap().starts_with("ed25519:"),
        "{info}"
    );
    desired(good_id.clone()).await;
    let good_running = format!("rul-fd001@{version}");
    wait_until(Duration::from_secs(30), "the signed model runs", || {
        let (inference, want) = (inference.clone(), good_running.clone());
        async move { inference.running_model().as_deref() == Some(want.as_str()) }
    })
    .await;

    // 2. Written straight into the database (a loadable model, but no signature): refused,
    //    reported to the control plane, and the good model keeps serving.
    let rogue_id = cp.api().register_model(org, &rogue_version, &rogue).await;
    insert_unsigned_artifact(&pool, org, &rogue_id, &rogue).await;
    desired(rogue_id.clone()).await;
    refused("unsigned", 1).await;
    assert_eq!(
        inference.running_model().as_deref(),
        Some(good_running.as_str())
    );
    let reported = eventually(Duration::from_secs(30), || async {
        match last_error().await {
            Some(e) if e.contains("unsigned") => Ok(e),
            other => Err(format!("last_error is {other:?}")),
        }
    })
    .await
    .unwrap();
    assert!(reported.contains(&rogue_version), "{reported}");

    // 3. A signature copied from the good model onto the rogue bytes (digest updated too, as
    //    an attacker with database access would): the signature does not cover these bytes.
    let good_sig: String =
        sqlx::query_scalar("SELECT signature FROM model_artifacts WHERE model_id = $1::uuid")
            .bind(&good_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("UPDATE model_artifacts SET signature = $2 WHERE model_id = $1::uuid")
        .bind(&rogue_id)
        .bind(&good_sig)
        .execute(&pool)
        .await
        .unwrap();
    refused("bad_signature", 1).await;
    assert_eq!(
        inference.running_model().as_deref(),
        Some(good_running.as_str())
    );

    // 4. A signed artifact whose stored bytes were swapped afterwards (digest column updated
    //    to match): the signature is over the original digest, so it is refused.
    let signed_id = cp.api().register_model(org, "7.7.7", &good).await;
    cp.api().upload_artifact(org, &signed_id, &good).await;
    kip_tests::model_artifacts::replace_bytes(&pool, org, signed_id.parse().unwrap(), &rogue).await;
    desired(signed_id.clone()).await;
    refused("bad_signature", 2).await;
    assert_eq!(
        inference.running_model().as_deref(),
        Some(good_running.as_str())
    );

    // 5. Re-uploading the rogue bytes through the API signs them (the caller holds the admin
    //    key and the bytes): now they verify and run.
    cp.api().upload_artifact(org, &rogue_id, &rogue).await;
    desired(rogue_id.clone()).await;
    let rogue_running = format!("rul-fd001@{rogue_version}");
    wait_until(
        Duration::from_secs(30),
        "the re-uploaded (signed) model runs",
        || {
            let (inference, want) = (inference.clone(), rogue_running.clone());
            async move { inference.running_model().as_deref() == Some(want.as_str()) }
        },
    )
    .await;
    let cleared = eventually(Duration::from_secs(30), || async {
        match last_error().await {
            None => Ok(()),
            Some(e) => Err(e),
        }
    })
    .await;
    assert_eq!(cleared, Ok(()));

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}

/// The signing status endpoint counts artifacts per key, and only a platform key sees it.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn signing_status_counts_signed_and_unsigned_artifacts(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let bytes = b"model bytes".to_vec();
    let a = cp.api().register_model(org, "1.0.0", &bytes).await;
    cp.api().upload_artifact(org, &a, &bytes).await;
    let b = cp.api().register_model(org, "2.0.0", &bytes).await;
    insert_unsigned_artifact(&pool, org, &b, &bytes).await;
    let s = cp
        .api()
        .request(reqwest::Method::GET, "/v1/model-signing", None)
        .await;
    assert_eq!(s["signed_by_current"], json!(1), "{s}");
    assert_eq!(s["unsigned"], json!(1), "{s}");
    assert!(
        s["trusted_keys_pem"]
            .as_str()
            .unwrap()
            .contains("PUBLIC KEY")
    );
}

/// Rotation: after `rotate` the control plane loads the new key, re-signs the artifacts that
/// the previous key signed (but not an unsigned one), and agents get both keys until
/// `finish_rotation`.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_signing_key_rotation_re_signs_only_valid_artifacts(pool: PgPool) {
    use kip_certs::signing::SigningKeyStore;

    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let bytes = b"model bytes".to_vec();
    let a = cp.api().register_model(org, "1.0.0", &bytes).await;
    let old_sig = cp.api().upload_artifact(org, &a, &bytes).await["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = cp.api().register_model(org, "2.0.0", &bytes).await;
    insert_unsigned_artifact(&pool, org, &b, &bytes).await;
    let ca_dir = cp.dir.path().join("ca");
    let before = cp
        .api()
        .request(reqwest::Method::GET, "/v1/model-signing", None)
        .await;
    let rotated = SigningKeyStore::rotate(&ca_dir).unwrap();
    let new_key = rotated.signer().key_id().to_string();
    let status = eventually(Duration::from_secs(30), || async {
        let s = cp
            .api()
            .request(reqwest::Method::GET, "/v1/model-signing", None)
            .await;
        if s["key_id"] == json!(new_key) && s["signed_by_current"] == json!(1) {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(status["previous_key_id"], before["key_id"], "{status}");
    assert_eq!(status["signed_by_previous"], json!(0), "{status}");
    assert_eq!(
        status["unsigned"],
        json!(1),
        "the unsigned row stays unsigned: {status}"
    );
    let new_sig: String =
        sqlx::query_scalar("SELECT signature FROM model_artifacts WHERE model_id = $1::uuid")
            .bind(&a)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(new_sig, old_sig);
    assert!(new_sig.contains(&new_key));
    let pem = status["trusted_keys_pem"].as_str().unwrap();
    assert_eq!(pem.matches("BEGIN PUBLIC KEY").count(), 2);

    SigningKeyStore::finish_rotation(&ca_dir, std::time::SystemTime::now()).unwrap();
    let finished = eventually(Duration::from_secs(30), || async {
        let s = cp
            .api()
            .request(reqwest::Method::GET, "/v1/model-signing", None)
            .await;
        if s["previous_key_id"].is_null() {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(finished["signed_by_current"], json!(1), "{finished}");
}
