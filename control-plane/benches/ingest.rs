//! Sync ingest into PostgreSQL (issue #17): records/s of the control plane's ingest path
//! (`telemetry::ingest::store`: binary COPY into the staging table, one insert-select with
//! `ON CONFLICT DO NOTHING` that also maintains the 1-minute and 1-hour rollups, the ack), next
//! to references measured in the same run on the same rows:
//! - a raw binary COPY straight into `sensor_data` (no key check, no rollups): the ceiling;
//! - the previous ingest SQL (one `INSERT ... SELECT FROM UNNEST ... ON CONFLICT DO NOTHING`).
//!
//! Also printed: the replay of every batch (all duplicates), and the table layout
//! (hypertable or native partitions). Batches are decoded already: JSON decoding and TLS are
//! not in these figures.
//!
//! Run: `cargo bench -p kip-control-plane --bench ingest` (PostgreSQL from `KIP_PG_URL` /
//! `DATABASE_URL` like the tests; a scratch database is created and dropped).
//! `INGEST_BENCH_RECORDS` (default 1,000,000), `INGEST_BENCH_BATCH` (10,000),
//! `INGEST_BENCH_DEVICES` (concurrent devices, each sending its share in order; default 2).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::time::Instant;

use chrono::{DateTime, Duration, DurationRound as _, Utc};
use kip_control_plane::telemetry::{DeviceIdentity, copy::StagingRows, ingest, storage};
use kip_shared::{Quality, Reading, Record, Sequenced, sync::SyncBatch};
use sqlx::PgPool;
use uuid::Uuid;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 50 metrics on 4 machines, one reading each per 100 ms step (a busy line).
fn batches(n: u64, batch: u64, t0: DateTime<Utc>) -> Vec<SyncBatch> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    while seq < n {
        let first = seq + 1;
        let mut records = Vec::with_capacity(batch as usize);
        while records.len() < batch as usize && seq < n {
            seq += 1;
            let step = (seq / 200) as i64;
            records.push(Sequenced {
                epoch: 1,
                seq,
                record: Record::Reading(Reading {
                    source: "plc".into(),
                    machine: format!("m{}", seq % 4),
                    metric: format!("metric_{}", seq % 50),
                    ts: t0 + Duration::milliseconds(step * 100),
                    value: (seq % 1000) as f64 * 0.5,
                    quality: Quality::Good,
                }),
            });
        }
        out.push(SyncBatch {
            protocol_version: 1,
            agent_version: "bench".into(),
            epoch: 1,
            first_seq: first,
            last_seq: seq,
            records,
            running_model: None,
            health: None,
        });
    }
    out
}

async fn device(pool: &PgPool, org: Uuid, name: &str) -> DeviceIdentity {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(org)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    DeviceIdentity {
        org_id: org,
        device_id: id,
    }
}

/// Runs `f` for every device's batches concurrently; returns seconds.
async fn timed<F, Fut>(ids: &[DeviceIdentity], work: &[Vec<SyncBatch>], f: F) -> f64
where
    F: Fn(DeviceIdentity, SyncBatch) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tracker = tokio_util::task::TaskTracker::new();
    let mut tasks = Vec::new();
    for (id, batches) in ids.iter().zip(work) {
        let (id, batches, f) = (*id, batches.clone(), f.clone());
        tasks.push(tracker.spawn(async move {
            for b in batches {
                f(id, b).await;
            }
        }));
    }
    tracker.close();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n = env_num("INGEST_BENCH_RECORDS", 1_000_000);
    let batch = env_num("INGEST_BENCH_BATCH", 10_000);
    let devices = env_num("INGEST_BENCH_DEVICES", 2).max(1);
    let db = kip_tests::TestDb::create().await;
    let pool = db.pool.clone();
    let layout = storage::layout(&pool).await.unwrap();
    let org = Uuid::new_v4();
    sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, 'bench', 'bench')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    // Partitions for the data's days exist before the timed runs (maintenance does this).
    let cfg = storage::TelemetryConfig::default();
    storage::maintain(&pool, &cfg, &tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let t0 = Utc::now().duration_trunc(Duration::hours(1)).unwrap() - Duration::hours(2);
    let per_device = n / devices;
    let work: Vec<Vec<SyncBatch>> = (0..devices)
        .map(|_| batches(per_device, batch, t0))
        .collect();
    let total = per_device * devices;
    println!(
        "ingest bench: {total} readings, {devices} concurrent devices, batches of {batch}, layout {layout:?}"
    );

    // 1. The ingest path.
    let mut ids = Vec::new();
    for d in 0..devices {
        ids.push(device(&pool, org, &format!("ingest-{d}")).await);
    }
    let p = pool.clone();
    let secs = timed(&ids, &work, move |id, b| {
        let p = p.clone();
        async move {
            let ack = ingest::store(&p, id, &b).await.unwrap();
            assert_eq!(ack.inserted, b.records.len() as u64);
        }
    })
    .await;
    println!(
        "ingest::store (COPY + insert-select + rollups): {:>9.0} records/s ({secs:.2} s)",
        total as f64 / secs
    );
    let rolled: i64 = sqlx::query_scalar("SELECT sum(count)::bigint FROM sensor_rollup_1m")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rolled as u64, total, "rollups count every reading once");

    // 2. Replay: every record a duplicate.
    let p = pool.clone();
    let secs = timed(&ids, &work, move |id, b| {
        let p = p.clone();
        async move {
            let ack = ingest::store(&p, id, &b).await.unwrap();
            assert_eq!(ack.inserted, 0);
        }
    })
    .await;
    println!(
        "ingest::store replay (all duplicates):         {:>9.0} records/s ({secs:.2} s)",
        total as f64 / secs
    );

    // 3. Reference: raw binary COPY of the same rows into sensor_data.
    let mut ids = Vec::new();
    for d in 0..devices {
        ids.push(device(&pool, org, &format!("copy-{d}")).await);
    }
    let p = pool.clone();
    let secs = timed(&ids, &work, move |id, b| {
        let p = p.clone();
        async move {
            let mut rows = StagingRows::with_capacity(b.records.len());
            for r in &b.records {
                if let Record::Reading(x) = &r.record {
                    rows.push(
                        id.org_id,
                        id.device_id,
                        b.epoch as i64,
                        r.seq as i64,
                        &x.machine,
                        &x.metric,
                        x.ts,
                        x.value,
                        x.quality.code(),
                    );
                }
            }
            let mut conn = p.acquire().await.unwrap();
            let mut copy = conn
                .copy_in_raw(
                    "COPY sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value, \
                     quality) FROM STDIN (FORMAT binary)",
                )
                .await
                .unwrap();
            copy.send(rows.finish()).await.unwrap();
            copy.finish().await.unwrap();
        }
    })
    .await;
    println!(
        "reference: raw binary COPY into sensor_data:  {:>9.0} records/s ({secs:.2} s)",
        total as f64 / secs
    );

    // 4. Reference: the previous ingest SQL (UNNEST insert-select, no rollups).
    let mut ids = Vec::new();
    for d in 0..devices {
        ids.push(device(&pool, org, &format!("unnest-{d}")).await);
    }
    let p = pool.clone();
    let secs = timed(&ids, &work, move |id, b| {
        let p = p.clone();
        async move {
            let (mut seq, mut machine, mut metric, mut ts, mut value, mut quality) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for r in &b.records {
                if let Record::Reading(x) = &r.record {
                    seq.push(r.seq as i64);
                    machine.push(x.machine.clone());
                    metric.push(x.metric.clone());
                    ts.push(x.ts);
                    value.push(x.value);
                    quality.push(x.quality.code());
                }
            }
            sqlx::query(
                "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value, quality) \
                 SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::timestamptz[], \
                                                  $8::float8[], $9::int2[]) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id.org_id)
            .bind(id.device_id)
            .bind(b.epoch as i64)
            .bind(&seq)
            .bind(&machine)
            .bind(&metric)
            .bind(&ts)
            .bind(&value)
            .bind(&quality)
            .execute(&p)
            .await
            .unwrap();
        }
    })
    .await;
    println!(
        "reference: previous UNNEST insert-select:     {:>9.0} records/s ({secs:.2} s)",
        total as f64 / secs
    );
    pool.close().await;
}
