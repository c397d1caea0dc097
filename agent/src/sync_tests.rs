//! The poison-record splitter against a control plane that refuses with a given status and
//! `error.code`: systemic refusals keep every record, record refusals dead-letter one record
//! with its whole bytes.

use std::sync::atomic::AtomicUsize;

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use kip_shared::Reading;

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

/// A record refused with `record_invalid` is isolated, dead-lettered with its whole JSON (far
/// longer than the 256-byte prefix), and the rest of the stream lands.
#[tokio::test]
async fn a_record_refused_alone_is_dead_lettered_with_its_whole_bytes() {
    let long_metric = "x".repeat(2000);
    let bad = long_metric.clone();
    let fake = fake_control_plane(Arc::new(move |b: &SyncBatch| {
        let i = b
            .records
            .iter()
            .position(|r| matches!(&r.record, Record::Reading(x) if x.metric == bad))?;
        Some((
            422,
            error_code::RECORD_INVALID,
            format!("record {i}: metric is too long"),
        ))
    }))
    .await;
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
