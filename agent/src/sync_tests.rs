//! The poison-record splitter against a control plane that refuses with a given status and
//! `error.code`: systemic refusals keep every record, record refusals dead-letter one record
//! with its whole bytes.

use std::sync::atomic::{AtomicBool, AtomicUsize};

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use kip_shared::{Reading, sync::DesiredModel};

use super::*;

/// What the fake control plane answers: `(status, code, message)`, or `None` for an ack.
type Answer = Arc<dyn Fn(&SyncBatch) -> Option<(u16, &'static str, String)> + Send + Sync>;

struct Fake {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: CancellationToken,
}

async fn fake_control_plane(answer: Answer) -> Fake {
    let requests = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/v1/agent/sync",
            post(
                |State((answer, n)): State<(Answer, Arc<AtomicUsize>)>, body: axum::body::Bytes| async move {
                    n.fetch_add(1, Ordering::Relaxed);
                    let json = kip_shared::batch::gunzip_bounded(&body, 64 << 20).unwrap();
                    let batch: SyncBatch = serde_json::from_slice(&json).unwrap();
                    match answer(&batch) {
                        None => (
                            StatusCode::OK,
                            Json(serde_json::to_value(SyncAck {
                                protocol_version: kip_shared::PROTOCOL_VERSION,
                                epoch: batch.epoch,
                                acked_seq: batch.last_seq,
                                inserted: batch.records.len() as u64,
                                duplicates: 0,
                                desired: Default::default(),
                                server_time: Some(chrono::Utc::now()),
                            }).unwrap()),
                        ),
                        Some((status, code, message)) => (
                            StatusCode::from_u16(status).unwrap(),
                            Json(serde_json::json!({"error": {"code": code, "message": message}})),
                        ),
                    }
                },
            ),
        )
        .with_state((answer, requests.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio_util::task::TaskTracker::new().spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
    });
    Fake {
        url,
        requests,
        stop,
    }
}

fn reading(i: u64, metric: String) -> Record {
    Record::Reading(Reading {
        source: "plc1".into(),
        machine: "press1".into(),
        metric,
        ts: Utc::now(),
        value: i as f64,
        quality: Default::default(),
    })
}

fn syncer(buffer: Arc<Buffer>, url: &str) -> Syncer {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let (_tx, rx) = watch::channel(Arc::new(tls));
    let cfg = SyncConfig {
        endpoints: vec![url.to_owned()],
        batch_max_records: 64,
        batch_max_bytes: 1 << 20,
        interval: Duration::from_millis(10),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        request_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(3600),
        probe_interval: None,
        max_in_flight_batches: 4,
    };
    Syncer::new(buffer, cfg, rx, &mut Registry::default()).unwrap()
}

fn buffer(dir: &std::path::Path, n: u64) -> Arc<Buffer> {
    let b = Buffer::open(dir, crate::buffer::BufferOptions::with_max_bytes(64 << 20)).unwrap();
    for i in 0..n {
        b.append(&reading(i, format!("m{i}"))).unwrap();
    }
    Arc::new(b)
}

/// Drives the loop `steps` times; every step must be a failure with a backoff.
async fn assert_systemic(s: &mut Syncer, steps: usize) {
    for i in 0..steps {
        let next = s.step().await.unwrap();
        assert!(
            next.is_some(),
            "step {i} went on at once (split) instead of backing off"
        );
    }
}

/// Hole 8: the old loop looked for `protocol_version` in the message; this control plane
/// says "protocol version" and the loop split the batch and dead-lettered good records.
#[tokio::test]
async fn a_protocol_version_refusal_keeps_every_record_whatever_the_message() {
    let fake = fake_control_plane(Arc::new(|_| {
        Some((
            400,
            error_code::PROTOCOL_VERSION_UNSUPPORTED,
            "this control plane speaks protocol version 7 only".into(),
        ))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 50);
    let mut s = syncer(buffer.clone(), &fake.url);
    assert_systemic(&mut s, 12).await;
    assert_eq!(buffer.stats().unwrap().counts.total(), 50);
    assert_eq!(s.status().report().dead_letters, 0);
    assert!(s.status().report().consecutive_failures >= 12);
    // Every attempt sent the whole batch: no split.
    assert_eq!(fake.requests.load(Ordering::Relaxed), 12);
    fake.stop.cancel();
}

/// A 400/422 without a code, or with a code that does not blame a record (whatever its
/// message says), is systemic too; so is a 413 for one record.
#[tokio::test]
async fn refusals_that_blame_no_record_keep_every_record() {
    for (status, code) in [
        (422, "validation_failed"),
        (400, ""),
        (422, error_code::BATCH_INVALID),
        (400, error_code::BODY_UNDECODABLE),
        (413, error_code::PAYLOAD_TOO_LARGE),
    ] {
        let fake = fake_control_plane(Arc::new(move |_| {
            Some((status, code, "record 0: metric must not be empty".into()))
        }))
        .await;
        let dir = tempfile::tempdir().unwrap();
        let buffer = buffer(dir.path(), 1);
        let mut s = syncer(buffer.clone(), &fake.url);
        assert_systemic(&mut s, 4).await;
        assert_eq!(buffer.stats().unwrap().counts.total(), 1, "{status} {code}");
        assert_eq!(s.status().report().dead_letters, 0, "{status} {code}");
        fake.stop.cancel();
    }
}

/// A control plane that refuses every batch holding a reading of metric `bad` with
/// `record_invalid`, naming that record's index (as kip's control plane does).
async fn refusing_the_metric(bad: String) -> Fake {
    fake_control_plane(Arc::new(move |b: &SyncBatch| {
        let i = b
            .records
            .iter()
            .position(|r| matches!(&r.record, Record::Reading(x) if x.metric == bad))?;
        Some((
            422,
            error_code::RECORD_INVALID,
            format!("record {i}: metric refused"),
        ))
    }))
    .await
}

/// A record refused with `record_invalid` is isolated, dead-lettered with its whole JSON (far
/// longer than the 256-byte prefix), and the rest of the stream lands.
#[tokio::test]
async fn a_record_refused_alone_is_dead_lettered_with_its_whole_bytes() {
    let long_metric = "x".repeat(2000);
    let fake = refusing_the_metric(long_metric.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 20);
    let poison = reading(20, long_metric.clone());
    let poison_seq = buffer.append(&poison).unwrap();
    for i in 21..40 {
        buffer.append(&reading(i, format!("m{i}"))).unwrap();
    }
    let mut s = syncer(buffer.clone(), &fake.url);
    let mut letters = Vec::new();
    for _ in 0..200 {
        // Look at what is about to be sent before it is acked away.
        let pending = buffer.read_range(0, 1000, u64::MAX).unwrap();
        letters.extend(pending.into_iter().filter_map(|r| match r.record {
            Record::DeadLetter(d) => Some(d),
            _ => None,
        }));
        s.step().await.unwrap();
        if buffer.stats().unwrap().counts.total() == 0 {
            break;
        }
    }
    assert_eq!(buffer.stats().unwrap().counts.total(), 0);
    assert_eq!(s.status().report().dead_letters, 1);
    let d = letters.first().expect("a dead letter was written");
    assert_eq!(d.source, DEAD_LETTER_SOURCE);
    assert!(
        d.origin.contains(&format!("seq {poison_seq}")),
        "{}",
        d.origin
    );
    assert!(
        d.reason.contains(error_code::RECORD_INVALID),
        "{}",
        d.reason
    );
    assert_eq!(d.payload_prefix, serde_json::to_vec(&poison).unwrap());
    assert!(d.payload_prefix.len() > 2000);
    fake.stop.cancel();
}

/// A fake artifact server for the desired-model tests: `GET /artifact` answers 404 until
/// `serve` is set, then the bytes; `downloads` counts the requests.
struct ArtifactServer {
    url: String,
    serve: Arc<AtomicBool>,
    downloads: Arc<AtomicUsize>,
    stop: CancellationToken,
}

async fn artifact_server(bytes: Vec<u8>) -> ArtifactServer {
    let serve = Arc::new(AtomicBool::new(false));
    let downloads = Arc::new(AtomicUsize::new(0));
    type S = (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<Vec<u8>>);
    let app = Router::new()
        .route(
            "/artifact",
            axum::routing::get(|State((serve, n, bytes)): State<S>| async move {
                n.fetch_add(1, Ordering::Relaxed);
                if serve.load(Ordering::Relaxed) {
                    (StatusCode::OK, bytes.to_vec())
                } else {
                    (StatusCode::NOT_FOUND, Vec::new())
                }
            }),
        )
        .with_state((serve.clone(), downloads.clone(), Arc::new(bytes)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio_util::task::TaskTracker::new().spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
    });
    ArtifactServer {
        url,
        serve,
        downloads,
        stop,
    }
}

/// A syncer with local inference (no champion) pointed at `server`, trusting `key` for `org`;
/// the ack naming `shadow` as the desired shadow model (`None`: no shadow).
fn model_syncer(
    dir: &std::path::Path,
    server: &ArtifactServer,
    org: uuid::Uuid,
) -> (Syncer, Arc<crate::edge_inference::Inference>) {
    let mut registry = Registry::default();
    let inference = crate::edge_inference::Inference::start(
        &crate::edge_inference::InferenceConfig {
            ort_library: Some(kip_tests::ort_library()),
            model_path: None,
            model_sha256: None,
            queue_capacity_readings: 16,
        },
        &mut registry,
    )
    .unwrap();
    let s = syncer(buffer(dir, 0), &server.url)
        .with_inference(Some(inference.clone()))
        .with_device_org(org);
    (s, inference)
}

fn ack_with(keys_pem: &str, model: Option<DesiredModel>, shadow: Option<DesiredModel>) -> SyncAck {
    let mut desired = kip_shared::sync::DesiredState {
        model_signing_keys_pem: Some(keys_pem.to_owned()),
        ..Default::default()
    };
    desired.model = model;
    desired.shadow_model = shadow;
    SyncAck {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        epoch: 1,
        acked_seq: 0,
        inserted: 0,
        duplicates: 0,
        desired,
        server_time: Some(Utc::now()),
    }
}

/// The reference model as the desired state names it, signed by `key` for `org` (`version`:
/// the version the signature covers; the model's own makes a valid signature).
fn signed_reference(
    key: &kip_certs::signing::SigningKey,
    org: uuid::Uuid,
    version: Option<&str>,
) -> (Vec<u8>, DesiredModel) {
    use sha2::Digest as _;
    let reference = kip_tests::reference_model();
    let bytes = reference.onnx_bytes();
    let card = reference.card();
    let name = card["name"].as_str().unwrap().to_owned();
    let own = card["version"].as_str().unwrap().to_owned();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let signature = kip_certs::signing::sign_artifact(
        key,
        &sha,
        &kip_certs::signing::ModelMetadata {
            org_id: org,
            name: &name,
            version: version.unwrap_or(&own),
        },
    )
    .unwrap()
    .to_string();
    let m = DesiredModel {
        name,
        version: own,
        sha256: sha,
        download_path: "/artifact".into(),
        signature: Some(signature),
    };
    (bytes, m)
}

/// Issue 14: the shadow's download raced the end of the rollout that named it (404: no
/// longer desired for the device); the old loop remembered that as a refusal of the artifact
/// and never fetched it again, so the MLflow `challenger` rollout that named the same
/// artifact a second later never ran on the agent. A failure of the moment is retried.
#[tokio::test]
async fn a_shadow_whose_download_failed_is_installed_when_the_desired_state_names_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = kip_certs::signing::SigningKey::generate().unwrap();
    let pem = key.public_key().to_pem();
    let org = uuid::Uuid::new_v4();
    let (bytes, shadow) = signed_reference(&key, org, None);
    let server = artifact_server(bytes).await;
    let (mut s, inference) = model_syncer(dir.path(), &server, org);
    let downloads = || server.downloads.load(Ordering::Relaxed);

    // A rollout names the shadow; by the time the agent asks, it no longer does: 404.
    s.apply_desired(&ack_with(&pem, None, Some(shadow.clone())), None)
        .await;
    assert_eq!(downloads(), 1);
    assert!(inference.shadow_model().is_none());
    // The next ack names no shadow; then another rollout names the same artifact again.
    s.apply_desired(&ack_with(&pem, None, None), None).await;
    server.serve.store(true, Ordering::Relaxed);
    s.apply_desired(&ack_with(&pem, None, Some(shadow.clone())), None)
        .await;
    assert_eq!(downloads(), 2, "the shadow was not fetched again");
    let (running, sha) = inference.shadow_model().unwrap();
    assert_eq!(running, format!("{}@{}", shadow.name, shadow.version));
    assert_eq!(sha, shadow.sha256);
    server.stop.cancel();
}

/// The same artifact named by every ack: a download that failed is retried after the sync
/// backoff (not at every ack, not never), and the champion alike.
#[tokio::test]
async fn a_failed_download_is_retried_after_the_backoff_for_the_champion_and_the_shadow() {
    let dir = tempfile::tempdir().unwrap();
    let key = kip_certs::signing::SigningKey::generate().unwrap();
    let pem = key.public_key().to_pem();
    let org = uuid::Uuid::new_v4();
    let (bytes, m) = signed_reference(&key, org, None);
    let server = artifact_server(bytes).await;
    let (mut s, inference) = model_syncer(dir.path(), &server, org);
    // Long enough that the second ack below comes within it even on a loaded machine.
    s.cfg.backoff_min = Duration::from_secs(2);
    s.cfg.backoff_max = Duration::from_secs(2);
    let downloads = || server.downloads.load(Ordering::Relaxed);
    let ack = ack_with(&pem, Some(m.clone()), Some(m.clone()));

    s.apply_desired(&ack, None).await;
    assert_eq!(downloads(), 2, "champion and shadow tried once each");
    assert!(s.model_error.as_deref().unwrap().contains("404"));
    // Within the backoff (at least half of it): not fetched again.
    s.apply_desired(&ack, None).await;
    assert_eq!(downloads(), 2);
    server.serve.store(true, Ordering::Relaxed);
    let want = format!("{}@{}", m.name, m.version);
    // Polled for the positive signal: both installed once the backoff has passed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        s.apply_desired(&ack, None).await;
        if inference.running_model().as_deref() == Some(want.as_str())
            && inference.shadow_model().is_some_and(|(r, _)| r == want)
        {
            break;
        }
        assert!(Instant::now() < deadline, "not installed after the backoff");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(downloads(), 4);
    assert_eq!(s.model_error, None);
    server.stop.cancel();
}

/// A verdict on the artifact itself (here a signature over another version) stands while
/// the desired state names that artifact: no download at each ack.
#[tokio::test]
async fn a_refused_signature_is_not_fetched_again_while_the_same_artifact_is_desired() {
    let dir = tempfile::tempdir().unwrap();
    let key = kip_certs::signing::SigningKey::generate().unwrap();
    let pem = key.public_key().to_pem();
    let org = uuid::Uuid::new_v4();
    let (bytes, forged) = signed_reference(&key, org, Some("9.9.9"));
    let server = artifact_server(bytes).await;
    server.serve.store(true, Ordering::Relaxed);
    let (mut s, inference) = model_syncer(dir.path(), &server, org);
    s.cfg.backoff_min = Duration::from_millis(1);
    s.cfg.backoff_max = Duration::from_millis(1);
    let ack = ack_with(&pem, None, Some(forged));
    for _ in 0..3 {
        s.apply_desired(&ack, None).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(server.downloads.load(Ordering::Relaxed), 1);
    assert!(inference.shadow_model().is_none());
    server.stop.cancel();
}

// ---------- issue #17: a saturated control plane sheds load with Retry-After ----------

/// What the shedding fake saw: the time of every request and the sequences of every batch it
/// acknowledged.
#[derive(Default)]
struct Seen {
    at: Vec<std::time::Instant>,
    acked: Vec<u64>,
}

/// A control plane that answers the first `refusals` requests `503` (code `overloaded`,
/// `Retry-After: retry_after_s`, as a saturated replica does) and acknowledges the rest.
async fn shedding_control_plane(refusals: usize, retry_after_s: u64) -> (Fake, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let requests = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/v1/agent/sync",
            post(
                move |State((seen, n)): State<(Arc<Mutex<Seen>>, Arc<AtomicUsize>)>,
                      body: axum::body::Bytes| async move {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    let json = kip_shared::batch::gunzip_bounded(&body, 64 << 20).unwrap();
                    let batch: SyncBatch = serde_json::from_slice(&json).unwrap();
                    let mut s = seen.lock().unwrap();
                    s.at.push(std::time::Instant::now());
                    if i < refusals {
                        return axum::response::IntoResponse::into_response((
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(axum::http::header::RETRY_AFTER, retry_after_s.to_string())],
                            Json(serde_json::json!({"error": {
                                "code": error_code::OVERLOADED,
                                "reason": "queue_full",
                                "message": "this control-plane replica is serving its maximum of agent requests",
                            }})),
                        ));
                    }
                    s.acked.extend(batch.records.iter().map(|r| r.seq));
                    axum::response::IntoResponse::into_response(Json(SyncAck {
                        protocol_version: kip_shared::PROTOCOL_VERSION,
                        epoch: batch.epoch,
                        acked_seq: batch.last_seq,
                        inserted: batch.records.len() as u64,
                        duplicates: 0,
                        desired: Default::default(),
                        server_time: Some(chrono::Utc::now()),
                    }))
                },
            ),
        )
        .with_state((seen.clone(), requests.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio_util::task::TaskTracker::new().spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
    });
    (
        Fake {
            url,
            requests,
            stop,
        },
        seen,
    )
}

/// [`syncer`] with a backoff from 10 ms up to `backoff_max`.
fn syncer_with_backoff_max(buffer: Arc<Buffer>, url: &str, backoff_max: Duration) -> Syncer {
    let mut s = syncer(buffer, url);
    s.cfg.backoff_max = backoff_max;
    s
}

#[tokio::test]
async fn a_503_with_retry_after_delays_the_next_attempt_at_least_that_long_and_loses_nothing() {
    let (fake, seen) = shedding_control_plane(1, 7).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 10);
    let mut s = syncer_with_backoff_max(buffer.clone(), &fake.url, Duration::from_secs(60));
    let pause = s.step().await.unwrap().expect("a refusal backs off");
    assert!(
        (Duration::from_secs(7)..=Duration::from_secs(60)).contains(&pause),
        "the plain backoff would be 10 ms; the control plane asked for 7 s: {pause:?}"
    );
    assert_eq!(s.metrics.retry_after_waits.get(), 1);
    assert_eq!(
        s.metrics
            .failures
            .get_or_create(&ReasonLabels {
                reason: "overloaded"
            })
            .get(),
        1
    );
    assert!(
        s.server_asked_wait,
        "the probe must not cut this wait short"
    );
    assert_eq!(buffer.stats().unwrap().counts.total(), 10, "still buffered");
    // The next attempt (after the wait, which `run` sleeps) sends the same batch.
    s.step().await.unwrap();
    s.join_ack().await.unwrap();
    assert_eq!(buffer.stats().unwrap().counts.total(), 0);
    let acked = seen.lock().unwrap().acked.clone();
    assert_eq!(acked, (1..=10).collect::<Vec<u64>>(), "every record once");
    fake.stop.cancel();
}

#[tokio::test]
async fn retry_after_is_capped_at_the_max_backoff() {
    let (fake, _seen) = shedding_control_plane(1, 3_600).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 3);
    let mut s = syncer_with_backoff_max(buffer.clone(), &fake.url, Duration::from_secs(2));
    let pause = s.step().await.unwrap().expect("a refusal backs off");
    assert!(
        (Duration::from_millis(1_000)..=Duration::from_secs(2)).contains(&pause),
        "{pause:?}"
    );
    assert_eq!(buffer.stats().unwrap().counts.total(), 3);
    fake.stop.cancel();
}

/// The loop itself (`run`, with the probe on): the attempt after a refusal with
/// `Retry-After: 1` comes no sooner than 1 s later, although the plain backoff is 10-20 ms and
/// the endpoint is reachable all along.
#[tokio::test]
async fn the_loop_waits_for_retry_after_before_resending() {
    let (fake, seen) = shedding_control_plane(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 5);
    let mut s = syncer_with_backoff_max(buffer.clone(), &fake.url, Duration::from_secs(30));
    s.cfg.probe_interval = Some(Duration::from_millis(50));
    let cancel = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(s.run(cancel.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().acked.len() < 5 {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let seen = seen.lock().unwrap();
    assert!(seen.at.len() >= 3, "two refusals, then the ack");
    for pair in seen.at.windows(2).take(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_secs(1), "resent after {gap:?}");
    }
    assert_eq!(seen.acked, (1..=5).collect::<Vec<u64>>());
    assert_eq!(buffer.stats().unwrap().counts.total(), 0);
    fake.stop.cancel();
}

// ---------- issue #17: pipelined drain, several batches of one device in flight ----------

/// How the pipelining fake behaves.
#[derive(Default)]
struct PipeCfg {
    /// The first this-many requests are held until this many are in flight at once (at most
    /// 10 s: a loop that never gets there fails its assertion instead of hanging).
    hold_first_until_concurrent: usize,
    /// The first request for the batch starting at this sequence waits for `release`.
    hold_seq: Option<u64>,
    /// The first request for the batch starting at this sequence fails with a 500, once the
    /// other held requests (`hold_first_until_concurrent` - 1) have been answered.
    fail_seq_once: Option<u64>,
    /// Admits this many requests at once; beyond, 429 `rate_limited` with `Retry-After: 1`,
    /// as a control plane before issue #17 answers a second concurrent sync of a device. Until
    /// the first refusal, an admitted request is held until another one arrives (at most 5 s),
    /// so that a pipelining agent does meet the refusal however slow the machine.
    admit: Option<usize>,
}

/// What the pipelining fake saw.
#[derive(Default)]
struct PipeState {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicUsize,
    answered: AtomicUsize,
    refused_429: AtomicUsize,
    failed_once: AtomicBool,
    held_once: AtomicBool,
    release: tokio::sync::Notify,
    /// Every sequence stored, with how many times a stored batch carried it (the real
    /// control plane stores it once: `ON CONFLICT DO NOTHING`).
    stored: Mutex<std::collections::BTreeMap<u64, u32>>,
    /// The highest acknowledged sequence (`GREATEST`, as the control plane's ack).
    acked: AtomicU64,
}

struct Leave(Arc<PipeState>);
impl Drop for Leave {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn wait_for(what: impl Fn() -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    while !what() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn pipeline_control_plane(cfg: PipeCfg) -> (Fake, Arc<PipeState>) {
    let st = Arc::new(PipeState::default());
    let cfg = Arc::new(cfg);
    type S = (Arc<PipeState>, Arc<PipeCfg>);
    let app = Router::new()
        .route(
            "/v1/agent/sync",
            post(|State((st, cfg)): State<S>, body: axum::body::Bytes| async move {
                use axum::response::IntoResponse as _;
                let index = st.requests.fetch_add(1, Ordering::SeqCst);
                let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                st.max_in_flight.fetch_max(now, Ordering::SeqCst);
                let _leave = Leave(st.clone());
                let json = kip_shared::batch::gunzip_bounded(&body, 64 << 20).unwrap();
                let batch: SyncBatch = serde_json::from_slice(&json).unwrap();
                if let Some(admit) = cfg.admit {
                    if now > admit {
                        st.refused_429.fetch_add(1, Ordering::SeqCst);
                        return (
                            StatusCode::TOO_MANY_REQUESTS,
                            [(axum::http::header::RETRY_AFTER, "1")],
                            Json(serde_json::json!({"error": {"code": "rate_limited",
                                "message": "a sync from this device is already in flight"}})),
                        )
                            .into_response();
                    }
                    if st.refused_429.load(Ordering::SeqCst) == 0 {
                        let seen = st.requests.load(Ordering::SeqCst);
                        wait_for(
                            || st.requests.load(Ordering::SeqCst) > seen,
                            Duration::from_secs(5),
                        )
                        .await;
                    }
                }
                if index < cfg.hold_first_until_concurrent {
                    wait_for(
                        || st.max_in_flight.load(Ordering::SeqCst) >= cfg.hold_first_until_concurrent,
                        Duration::from_secs(10),
                    )
                    .await;
                }
                if cfg.fail_seq_once == Some(batch.first_seq)
                    && !st.failed_once.swap(true, Ordering::SeqCst)
                {
                    // The failure is answered only once the held later batches are stored:
                    // the agent drops their requests when it sees it, and a handler still
                    // polling the hold above would be cancelled before it stores anything.
                    let others = cfg.hold_first_until_concurrent.saturating_sub(1);
                    wait_for(
                        || st.answered.load(Ordering::SeqCst) >= others,
                        Duration::from_secs(10),
                    )
                    .await;
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        Json(serde_json::json!({"error": {"code": "internal", "message": "internal error"}})),
                    )
                        .into_response();
                }
                if cfg.hold_seq == Some(batch.first_seq) && !st.held_once.swap(true, Ordering::SeqCst) {
                    st.release.notified().await;
                }
                {
                    let mut stored = st.stored.lock().unwrap();
                    for r in &batch.records {
                        *stored.entry(r.seq).or_insert(0) += 1;
                    }
                }
                let acked = st.acked.fetch_max(batch.last_seq, Ordering::SeqCst).max(batch.last_seq);
                st.answered.fetch_add(1, Ordering::SeqCst);
                Json(SyncAck {
                    protocol_version: kip_shared::PROTOCOL_VERSION,
                    epoch: batch.epoch,
                    acked_seq: acked,
                    inserted: batch.records.len() as u64,
                    duplicates: 0,
                    desired: Default::default(),
                    server_time: Some(chrono::Utc::now()),
                })
                .into_response()
            }),
        )
        .with_state((st.clone(), cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio_util::task::TaskTracker::new().spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
    });
    let requests = Arc::new(AtomicUsize::new(0));
    (
        Fake {
            url,
            requests,
            stop,
        },
        st,
    )
}

/// Steps the loop (ignoring its pauses: the fakes do not care) until the buffer is empty.
async fn drain(s: &mut Syncer, buffer: &Buffer) {
    for _ in 0..200 {
        s.step().await.unwrap();
        if buffer.stats().unwrap().counts.total() == 0 {
            s.join_ack().await.unwrap();
            return;
        }
    }
    panic!(
        "not drained: {} records left",
        buffer.stats().unwrap().counts.total()
    );
}

/// Every sequence in `1..=n` was stored, none beyond.
fn assert_all_stored(st: &PipeState, n: u64) {
    let stored = st.stored.lock().unwrap();
    assert_eq!(
        stored.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_drain_keeps_max_in_flight_batches_requests_in_flight_at_once() {
    let (fake, st) = pipeline_control_plane(PipeCfg {
        hold_first_until_concurrent: 4,
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // 8 full batches of 64.
    let buffer = buffer(dir.path(), 512);
    let mut s = syncer(buffer.clone(), &fake.url);
    drain(&mut s, &buffer).await;
    assert_eq!(
        st.max_in_flight.load(Ordering::SeqCst),
        4,
        "four batches in flight at once, never more"
    );
    assert_all_stored(&st, 512);
    assert_eq!(st.requests.load(Ordering::SeqCst), 8, "no batch sent twice");
    assert_eq!(s.status().report().records_acked, 512);
    assert_eq!(buffer.stats().unwrap().acked_up_to, 512);
    fake.stop.cancel();
}

#[tokio::test]
async fn max_in_flight_batches_of_one_sends_one_batch_at_a_time() {
    let (fake, st) = pipeline_control_plane(PipeCfg::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 256);
    let mut s = syncer(buffer.clone(), &fake.url);
    s.cfg.max_in_flight_batches = 1;
    s.set_in_flight_cap(1);
    drain(&mut s, &buffer).await;
    assert_eq!(st.max_in_flight.load(Ordering::SeqCst), 1);
    assert_all_stored(&st, 256);
    fake.stop.cancel();
}

#[tokio::test]
async fn acks_are_applied_in_sequence_order_when_later_batches_are_answered_first() {
    let (fake, st) = pipeline_control_plane(PipeCfg {
        hold_seq: Some(1),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 256);
    let s = syncer(buffer.clone(), &fake.url);
    let tracker = tokio_util::task::TaskTracker::new();
    let first = tracker.spawn(async move {
        let mut s = s;
        let pause = s.step().await.unwrap();
        (s, pause)
    });
    // The three later batches are answered (acks) while the first is held.
    wait_for(
        || st.answered.load(Ordering::SeqCst) == 3,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(st.answered.load(Ordering::SeqCst), 3);
    let stats = buffer.stats().unwrap();
    assert_eq!(
        stats.acked_up_to, 0,
        "no later ack applied before the first"
    );
    assert_eq!(stats.counts.total(), 256);
    st.release.notify_one();
    let (mut s, pause) = first.await.unwrap();
    assert_eq!(
        pause, None,
        "the others are still to be taken: go on at once"
    );
    s.join_ack().await.unwrap();
    assert_eq!(
        buffer.stats().unwrap().acked_up_to,
        64,
        "the first batch only"
    );
    drain(&mut s, &buffer).await;
    assert_eq!(buffer.stats().unwrap().acked_up_to, 256);
    assert_eq!(st.requests.load(Ordering::SeqCst), 4, "nothing resent");
    assert_all_stored(&st, 256);
    fake.stop.cancel();
}

#[tokio::test]
async fn a_failed_first_batch_discards_the_later_answers_and_nothing_is_lost_or_counted_twice() {
    let (fake, st) = pipeline_control_plane(PipeCfg {
        hold_first_until_concurrent: 4,
        fail_seq_once: Some(1),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 256);
    let mut s = syncer(buffer.clone(), &fake.url);
    let pause = s.step().await.unwrap();
    assert!(pause.is_some(), "a failure backs off");
    assert!(s.in_flight.is_empty(), "the later batches are discarded");
    assert_eq!(
        s.next_seq, 1,
        "resumes from the first unacknowledged record"
    );
    let stats = buffer.stats().unwrap();
    assert_eq!(stats.acked_up_to, 0);
    assert_eq!(stats.counts.total(), 256, "nothing deleted");
    assert_eq!(
        st.max_in_flight.load(Ordering::SeqCst),
        4,
        "the later ones were sent (and stored) beside the first"
    );
    drain(&mut s, &buffer).await;
    assert_all_stored(&st, 256);
    let stored = st.stored.lock().unwrap();
    assert_eq!(stored[&1], 1, "the failed batch stored once, on its resend");
    assert_eq!(
        stored[&65], 2,
        "a discarded batch is resent (the control plane keeps it once)"
    );
    drop(stored);
    assert_eq!(
        s.status().report().records_acked,
        256,
        "each record acknowledged once by the agent"
    );
    assert_eq!(buffer.stats().unwrap().acked_up_to, 256);
    assert_eq!(
        s.metrics
            .failures
            .get_or_create(&ReasonLabels { reason: "server" })
            .get(),
        1
    );
    fake.stop.cancel();
}

/// Compatibility: a control plane before issue #17 admits one sync per device and answers a
/// second concurrent one 429 (`rate_limited`); the agent falls back to one batch in flight,
/// without a backoff, and loses nothing.
#[tokio::test]
async fn a_control_plane_that_admits_one_sync_per_device_gets_one_batch_at_a_time() {
    let (fake, st) = pipeline_control_plane(PipeCfg {
        admit: Some(1),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 512);
    let mut s = syncer(buffer.clone(), &fake.url);
    drain(&mut s, &buffer).await;
    assert_all_stored(&st, 512);
    assert_eq!(s.in_flight_cap, 1, "fell back to one in flight");
    assert_eq!(s.metrics.in_flight_fallbacks.get(), 1);
    assert_eq!(s.metrics.max_in_flight_batches.get(), 1);
    let refused = st.refused_429.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&refused),
        "only the first round met the limit: {refused}"
    );
    assert_eq!(
        s.metrics
            .failures
            .get_or_create(&ReasonLabels {
                reason: "throttled"
            })
            .get(),
        0,
        "not a failure: no backoff"
    );
    assert_eq!(s.status().report().records_acked, 512);
    fake.stop.cancel();
}

/// A poison record in the middle of a pipelined drain: the batches after it are discarded,
/// the split isolates it, the record is dead-lettered and everything else lands.
#[tokio::test]
async fn a_poison_record_in_a_pipelined_drain_is_isolated_and_the_rest_lands() {
    let fake = refusing_the_metric("poison".to_owned()).await;
    let dir = tempfile::tempdir().unwrap();
    let buffer = buffer(dir.path(), 100);
    let poison_seq = buffer.append(&reading(100, "poison".into())).unwrap();
    for i in 101..400 {
        buffer.append(&reading(i, format!("m{i}"))).unwrap();
    }
    let mut s = syncer(buffer.clone(), &fake.url);
    drain(&mut s, &buffer).await;
    assert_eq!(s.status().report().dead_letters, 1);
    // 399 good readings and the dead letter (the poison record is acknowledged locally).
    assert_eq!(s.status().report().records_acked, 400);
    assert!(buffer.stats().unwrap().acked_up_to > poison_seq);
    fake.stop.cancel();
}
