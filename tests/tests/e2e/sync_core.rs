//! Agent -> control plane sync end to end: real PostgreSQL (`sqlx::test`), the real mTLS agent
//! listener on loopback, enrolled agents, the real sync loop over a sled buffer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{collections::BTreeSet, io::Write as _, time::Duration};

use kip_agent::identity::{self, Identity};
use kip_control_plane::telemetry::IngestLimits;
use kip_shared::{Reading, Record, Sequenced, sync::SyncAck, sync::SyncBatch};
use kip_tests::{
    agent::{reading, start_sync, sync_config},
    control_plane::{start, stored},
    proxy::{Link, Proxy},
    wait_until,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::task::TaskTracker;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn batch(epoch: u64, seqs: std::ops::RangeInclusive<u64>) -> SyncBatch {
    let records: Vec<Sequenced> = seqs
        .clone()
        .map(|seq| Sequenced {
            epoch,
            seq,
            record: reading(seq),
        })
        .collect();
    SyncBatch {
        protocol_version: 1,
        agent_version: "test".into(),
        epoch,
        first_seq: *seqs.start(),
        last_seq: *seqs.end(),
        records,
        running_model: None,
        health: None,
    }
}

/// Posts a raw body to `/v1/agent/sync` with `id`'s certificate; (status, JSON body).
async fn post(
    id: &Identity,
    url: &str,
    body: Vec<u8>,
    gzipped: bool,
) -> Result<(u16, Value), String> {
    let client = identity::mtls_client(id, Duration::from_secs(10)).unwrap();
    let mut req = client
        .post(format!("{url}/v1/agent/sync"))
        .header("content-type", "application/json");
    if gzipped {
        req = req.header("content-encoding", "gzip");
    }
    let r = req.body(body).send().await.map_err(|e| format!("{e:#}"))?;
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    Ok((status, v))
}

async fn post_batch(id: &Identity, url: &str, b: &SyncBatch) -> (u16, Value) {
    post(id, url, gzip(&serde_json::to_vec(b).unwrap()), true)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn every_reading_lands_exactly_once_across_network_cuts(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
    let device = id.device_id();
    let buffer = kip_tests::agent::open_buffer(&dir.path().join("buffer"));
    let proxy = Proxy::start(kip_tests::control_plane::agent_addr(&cp)).await;
    let sync = start_sync(buffer.clone(), &id, sync_config(vec![proxy.url()]));

    // Readings keep arriving on their own task, whatever the link does.
    let appended = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let writer = TaskTracker::new();
    let go_on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        let (buffer, appended, go_on) = (buffer.clone(), appended.clone(), go_on.clone());
        writer.spawn(async move {
            let mut i = 0u64;
            while go_on.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..20 {
                    let seq = buffer.append(&reading(i)).unwrap();
                    appended.lock().unwrap().insert((buffer.epoch(), seq));
                    i += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let epoch = buffer.epoch();
    let count = || async { stored(&pool, device).await.len() };
    wait_until(Duration::from_secs(20), "first readings synced", || async {
        count().await >= 200
    })
    .await;

    // Silent network: requests time out, nothing lands, readings pile up in the buffer.
    proxy.set(Link::Blackhole);
    wait_until(
        Duration::from_secs(20),
        "agent notices it is offline",
        || async { !sync.status.report().online },
    )
    .await;
    let during_cut = count().await;
    // Evidence that the agent tried through the blackhole: one more attempt timed out.
    let failed = sync.status.report().consecutive_failures;
    wait_until(
        Duration::from_secs(20),
        "another attempt through the blackhole",
        || async { sync.status.report().consecutive_failures > failed },
    )
    .await;
    assert_eq!(
        count().await,
        during_cut,
        "records landed through a blackhole"
    );
    let backlog = buffer.stats().unwrap().counts.total();
    assert!(backlog > 0, "readings should pile up while cut");

    // Hard cut: connections refused and reset. Evidence: two more connections refused.
    proxy.set(Link::Drop);
    let (failed, tried) = (
        sync.status.report().consecutive_failures,
        proxy.connections(),
    );
    wait_until(
        Duration::from_secs(20),
        "two attempts against the cut link",
        || async {
            sync.status.report().consecutive_failures >= failed + 2
                && proxy.connections() >= tried + 2
        },
    )
    .await;
    assert_eq!(count().await, during_cut);

    // Restore, keep ingesting until the agent is back online, then stop the writer and wait
    // for the drain.
    proxy.set(Link::Up);
    wait_until(Duration::from_secs(20), "agent back online", || async {
        sync.status.report().online
    })
    .await;
    go_on.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.close();
    writer.wait().await;
    let want = appended.lock().unwrap().clone();
    assert!(want.len() > 1000, "{}", want.len());
    wait_until(Duration::from_secs(60), "backlog drained", || async {
        buffer.stats().unwrap().counts.total() == 0
    })
    .await;
    let got = stored(&pool, device).await;
    let missing: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&want).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    assert!(got.iter().all(|(e, _)| *e == epoch));
    let report = sync.status.report();
    assert!(report.online && report.last_ack_at.is_some(), "{report:?}");
    let m = sync.metrics();
    assert!(
        m.contains("kip_agent_sync_failures_total{reason=\"timeout\"}"),
        "{m}"
    );
    // The gauge is refreshed by the sync loop after it processes the last ack, a moment after
    // the buffer itself is empty: wait for it rather than racing it.
    wait_until(Duration::from_secs(20), "backlog gauge at 0", || async {
        sync.metrics().contains("kip_agent_sync_backlog_records 0")
    })
    .await;
    sync.stop().await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_replayed_batch_stores_nothing_twice_and_the_ack_never_moves_back(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", dir.path()).await;

    let b = batch(7, 1..=10);
    let (status, v) = post_batch(&id, &cp.agent_url, &b).await;
    assert_eq!(status, 200, "{v}");
    let ack: SyncAck = serde_json::from_value(v).unwrap();
    assert_eq!(
        (ack.epoch, ack.acked_seq, ack.inserted, ack.duplicates),
        (7, 10, 10, 0)
    );

    let (status, v) = post_batch(&id, &cp.agent_url, &b).await;
    assert_eq!(status, 200, "{v}");
    let ack: SyncAck = serde_json::from_value(v).unwrap();
    assert_eq!((ack.acked_seq, ack.inserted, ack.duplicates), (10, 0, 10));

    // An older, overlapping batch (a retry after a lost ack: the same records, so the same
    // timestamps) does not move the ack back.
    let older = SyncBatch {
        first_seq: 3,
        last_seq: 5,
        records: b.records[2..5].to_vec(),
        ..b.clone()
    };
    let (_, v) = post_batch(&id, &cp.agent_url, &older).await;
    let ack: SyncAck = serde_json::from_value(v).unwrap();
    assert_eq!((ack.acked_seq, ack.inserted, ack.duplicates), (10, 0, 3));
    // Plain JSON (no gzip) is accepted too.
    let (status, v) = post(
        &id,
        &cp.agent_url,
        serde_json::to_vec(&batch(7, 11..=12)).unwrap(),
        false,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["acked_seq"], 12);

    let got = stored(&pool, id.device_id()).await;
    assert_eq!(got, (1..=12).map(|s| (7, s)).collect());
    let acked: i64 =
        sqlx::query_scalar("SELECT acked_seq FROM device_sync_state WHERE device_id = $1")
            .bind(id.device_id())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(acked, 12);
    let m = cp.metrics().await;
    assert!(
        m.contains("kip_ingest_batches_total{result=\"ok\"} 4"),
        "{m}"
    );
    assert!(m.contains("kip_ingest_records_total 12"), "{m}");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn malformed_and_oversized_batches_get_a_clear_4xx_and_store_nothing(pool: PgPool) {
    let limits = IngestLimits {
        max_records: 100,
        max_decoded_bytes: 64 * 1024,
        ..IngestLimits::default()
    };
    let cp = start(pool.clone(), Some(limits)).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", dir.path()).await;
    let url = &cp.agent_url;

    let msg = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Each refusal carries the machine-readable code the agent acts on (never the message).
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_owned();
    let (s, v) = post(&id, url, gzip(b"{not json"), true).await.unwrap();
    assert_eq!(s, 400);
    assert!(msg(&v).contains("not valid JSON"), "{v}");
    assert_eq!(code(&v), "batch_undecodable");

    let (s, v) = post(&id, url, b"this is not gzip".to_vec(), true)
        .await
        .unwrap();
    assert_eq!(s, 400);
    assert!(msg(&v).contains("gzip"), "{v}");
    assert_eq!(code(&v), "body_undecodable");

    let mut unordered = batch(1, 1..=3);
    unordered.records.swap(0, 2);
    let (s, v) = post_batch(&id, url, &unordered).await;
    assert_eq!(s, 422);
    assert!(msg(&v).contains("not greater than the previous"), "{v}");
    assert_eq!(code(&v), "batch_invalid");

    let mut version = batch(1, 1..=3);
    version.protocol_version = 99;
    let (s, v) = post_batch(&id, url, &version).await;
    assert_eq!(s, 400);
    assert!(msg(&v).contains("protocol_version 99"), "{v}");
    assert_eq!(code(&v), "protocol_version_unsupported");

    let (s, v) = post_batch(&id, url, &batch(1, 1..=101)).await;
    assert_eq!(s, 422);
    assert!(msg(&v).contains("the limit is 100"), "{v}");
    assert_eq!(code(&v), "batch_too_many_records");

    let mut bad_record = batch(1, 1..=3);
    if let Record::Reading(r) = &mut bad_record.records[1].record {
        r.metric = String::new();
    }
    let (s, v) = post_batch(&id, url, &bad_record).await;
    assert_eq!(s, 422);
    assert!(
        msg(&v).contains("record 1: metric must not be empty"),
        "{v}"
    );
    assert_eq!(code(&v), "record_invalid");

    // Oversized body, and a small gzip body that inflates beyond the limit.
    let (s, v) = post(&id, url, vec![b' '; 200 * 1024], false).await.unwrap();
    assert_eq!(s, 413, "{v}");
    assert!(msg(&v).contains("65536"), "{v}");
    assert_eq!(code(&v), "payload_too_large");
    let (s, v) = post(&id, url, gzip(&vec![b' '; 1 << 20]), true)
        .await
        .unwrap();
    assert_eq!(s, 413, "{v}");

    assert_eq!(kip_tests::control_plane::total_rows(&pool).await, 0);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM device_sync_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let m = cp.metrics().await;
    for reason in ["json", "gzip", "batch", "record", "too_large"] {
        assert!(
            m.contains(&format!("kip_ingest_rejected_total{{reason=\"{reason}\"}}")),
            "{reason}: {m}"
        );
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_agent_moves_a_poison_record_aside_and_the_stream_continues(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
    let buffer = kip_tests::agent::open_buffer(&dir.path().join("buffer"));
    let mut want = BTreeSet::new();
    let mut poison_seq = 0;
    for i in 0..500u64 {
        let record = if i == 137 {
            // The control plane refuses a reading without a metric, forever.
            Record::Reading(Reading {
                metric: String::new(),
                ..match reading(i) {
                    Record::Reading(r) => r,
                    _ => unreachable!(),
                }
            })
        } else {
            reading(i)
        };
        let seq = buffer.append(&record).unwrap();
        if i == 137 {
            poison_seq = seq;
        } else {
            want.insert((buffer.epoch(), seq));
        }
    }
    let sync = start_sync(buffer.clone(), &id, sync_config(vec![cp.agent_url.clone()]));
    wait_until(Duration::from_secs(30), "buffer drained", || async {
        buffer.stats().unwrap().counts.total() == 0
    })
    .await;
    let got = stored(&pool, id.device_id()).await;
    assert!(!got.contains(&(buffer.epoch(), poison_seq)));
    // Everything else landed, plus exactly one dead letter naming the refused record.
    let rest: BTreeSet<_> = got.difference(&want).collect();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert!(want.is_subset(&got));
    let body: Value = sqlx::query_scalar(
        "SELECT body FROM agent_events WHERE device_id = $1 AND kind = 'dead_letter'",
    )
    .bind(id.device_id())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(body["source"], "sync");
    assert_eq!(
        body["origin"],
        format!("epoch {} seq {poison_seq} kind reading", buffer.epoch())
    );
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("422 record_invalid") && reason.contains("metric must not be empty"),
        "{reason}"
    );
    assert!(
        sync.metrics()
            .contains("kip_agent_sync_dead_letters_total 1")
    );
    assert_eq!(sync.status.report().dead_letters, 1);
    sync.stop().await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_device_writes_only_into_its_own_organisation(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let org_a = cp.create_org("org-a").await;
    let org_b = cp.create_org("org-b").await;
    let dir = tempfile::tempdir().unwrap();
    let a = cp.enroll(org_a, "gw-a", &dir.path().join("a")).await;
    let b = cp.enroll(org_b, "gw-b", &dir.path().join("b")).await;

    // A body naming B everywhere it can: records' fields carry B's ids.
    let mut crafted = batch(1, 1..=5);
    for r in &mut crafted.records {
        if let Record::Reading(x) = &mut r.record {
            x.machine = b.device_id().to_string();
            x.source = org_b.to_string();
        }
    }
    let (s, v) = post_batch(&a, &cp.agent_url, &crafted).await;
    assert_eq!(s, 200, "{v}");
    // A device field in the body is not part of the protocol at all.
    let mut with_device = serde_json::to_value(batch(1, 6..=6)).unwrap();
    with_device["device_id"] = json!(b.device_id());
    with_device["org_id"] = json!(org_b);
    let (s, v) = post(
        &a,
        &cp.agent_url,
        gzip(&serde_json::to_vec(&with_device).unwrap()),
        true,
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{v}"
    );

    let rows: Vec<(uuid::Uuid, uuid::Uuid)> =
        sqlx::query_as("SELECT DISTINCT org_id, device_id FROM sensor_data")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![(org_a, a.device_id())]);
    assert!(stored(&pool, b.device_id()).await.is_empty());

    // A revoked certificate is refused (handshake or 403), and nothing more is stored.
    cp.revoke(org_a, a.device_id()).await;
    match post_batch_result(&a, &cp.agent_url, &batch(1, 7..=8)).await {
        Ok((s, v)) => assert_eq!(s, 403, "{v}"),
        Err(e) => assert!(!e.is_empty()),
    }
    // A certificate from another CA claiming to be B's device does not get through TLS.
    let rogue = kip_certs::FleetCa::init(
        &dir.path().join("rogue-ca"),
        std::time::SystemTime::now() - Duration::from_secs(3600),
    )
    .unwrap();
    let key = kip_certs::DeviceKey::generate().unwrap();
    let forged = rogue
        .current()
        .sign_device_csr(
            &key.csr_pem("gw-b").unwrap(),
            kip_certs::DeviceIdentity {
                org_id: org_b,
                device_id: b.device_id(),
            },
            std::time::SystemTime::now(),
            Duration::from_secs(86_400),
        )
        .unwrap();
    let bundle = kip_certs::TrustBundle::from_pem(
        &std::fs::read_to_string(dir.path().join("b").join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let stranger = Identity::new(key, forged.chain_pem, bundle).unwrap();
    let err = post_batch_result(&stranger, &cp.agent_url, &batch(1, 1..=2))
        .await
        .unwrap_err();
    assert!(!err.is_empty());
    assert_eq!(kip_tests::control_plane::total_rows(&pool).await, 5);
}

async fn post_batch_result(
    id: &Identity,
    url: &str,
    b: &SyncBatch,
) -> Result<(u16, Value), String> {
    post(id, url, gzip(&serde_json::to_vec(b).unwrap()), true).await
}
