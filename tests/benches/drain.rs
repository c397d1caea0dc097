//! The drain path of issue #17 with the real binaries (`kip-agent run`, `kip-control-plane`,
//! PostgreSQL of `KIP_PG_URL`, a private Mosquitto), every figure next to a reference measured
//! in the same run:
//!
//! 1. **Sync endpoint throughput** (one control-plane replica): `DRAIN_BENCH_DEVICES` enrolled
//!    devices post pre-encoded gzip JSON batches of `DRAIN_BENCH_BATCH` readings over mTLS to
//!    `POST /v1/agent/sync`, each device in order, one request at a time per device (the agent
//!    pipelines up to `sync.max_in_flight_batches`; this phase measures devices side by side).
//!    Reference: a raw binary COPY of the same rows into `sensor_data`.
//! 2. **Agent ingest, live**: an agent with an MQTT source and its control-plane link cut (kit
//!    proxy) takes `DRAIN_BENCH_RECORDS` QoS 1 messages into its buffer while
//!    `DRAIN_BENCH_PUBLISHERS` `mosquitto_pub` processes publish them; messages/s, agent RSS
//!    (peak while ingesting, with everything buffered) and the buffer's disk footprint.
//!    Reference: a plain subscriber (`mosquitto_sub`, QoS 1, clean session) on the same topics
//!    at the same time.
//! 3. **Backlog drain**: the link returns; time until every reading is in PostgreSQL
//!    (rollup counts, written in the same transaction), agent RSS peak while draining and 5 s
//!    after, disk footprint after. Checked: every number stored exactly once.
//!    Reference: the same number of rows by raw COPY (figure 1's reference rate).
//! 4. **Buffer footprint under a byte cap**: a buffer with `max_bytes` = 20 MiB takes
//!    `DRAIN_BENCH_RECORDS` readings (evicting); its disk usage next to `max_bytes`.
//! 5. **MQTT backlog** (`backlog`, needs no control plane): `DRAIN_BENCH_RECORDS` messages are
//!    queued at the broker for two persistent sessions (QoS 1), a plain subscriber's and the
//!    agent's. Reference: `mosquitto_sub` resuming its session, acknowledging each message on
//!    receipt, until it has all of them. Then `kip-agent run` resumes its session: time from
//!    its start until `kip_agent_buffer_records` reaches the count (every record durable, every
//!    message acknowledged after the flush), its RSS peak, and every number exactly once in its
//!    buffer. Both with the same broker settings ([`BROKER_CONF`]).
//!
//! Run (optimised binaries; `perf` is the release profile without LTO):
//! ```sh
//! cargo build --profile perf -p kip-agent -p kip-control-plane --bins
//! cargo bench --profile perf -p kip-tests --bench drain
//! ```
//! The MQTT phases measure the agent process against C clients (`mosquitto_pub`,
//! `mosquitto_sub` of mosquitto-clients), so the bench binary itself may be a debug build
//! driving optimised agent binaries: `KIP_TEST_BIN_DIR` names the directory of the binaries,
//! e.g. `cargo build --profile perf -p kip-agent --bins && KIP_TEST_BIN_DIR=target/perf
//! DRAIN_BENCH_PHASES=backlog cargo test -p kip-tests --bench drain` (phases with the control
//! plane want it in that directory too).
//! Env: `DRAIN_BENCH_RECORDS` (default 1,000,000), `DRAIN_BENCH_BATCH` (10,000),
//! `DRAIN_BENCH_DEVICES` (4), `DRAIN_BENCH_PUBLISHERS` (4),
//! `DRAIN_BENCH_PHASES` (`sync,agent,footprint,backlog`);
//! `DRAIN_BENCH_MQTT_TOML`: lines added to the agent's `[[mqtt]]` source (e.g.
//! `staging_capacity_messages = 200000`);
//! `DRAIN_BENCH_SYNC_TOML` / `DRAIN_BENCH_BUFFER_TOML`: lines added to the agent's `[sync]` /
//! `[buffer]` (e.g. `max_in_flight_batches = 1` for the drain before pipelining, or the
//! previous defaults `batch_max_records = 2000`,
//! `batch_max_bytes = 1048576`, `cache_capacity_bytes = 67108864`);
//! `DRAIN_BENCH_FK=1` puts back the foreign key from `sensor_data` to `devices` that migration
//! 0230 replaced, to measure what it costs.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::{
    io::Write as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use kip_agent::buffer::{Buffer, BufferOptions};
use kip_control_plane::telemetry::copy::StagingRows;
use kip_shared::{Quality, Reading, Record, Sequenced, sync::SyncBatch};
use kip_tests::{
    Mosquitto, Proxy, TestDb,
    binaries::{ControlPlaneProcess, spawn_agent},
    free_port,
    mosquitto::mosquitto_sub,
    wait_until,
};
use sqlx::PgPool;
use uuid::Uuid;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(" "))
        })
        .unwrap_or_default()
}

/// Resident set size of process `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Allocated disk bytes of everything under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Samples `pid`'s RSS every 50 ms while `running`; the peak in MiB.
fn rss_sampler(pid: u32, running: Arc<AtomicBool>) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let mut peak = 0.0f64;
        while running.load(Ordering::Relaxed) {
            peak = peak.max(rss_mib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak.max(rss_mib(pid))
    })
}

/// Reading `i` as the agent stores one from the MQTT subscription below.
fn reading(i: u64, t0: DateTime<Utc>) -> Record {
    Record::Reading(Reading {
        source: "plc".into(),
        machine: format!("press{}", i % 4),
        metric: "count".into(),
        ts: t0 + chrono::Duration::milliseconds(i as i64),
        value: i as f64,
        quality: Quality::Good,
    })
}

/// Device `d`'s share as sync batches of `batch` readings (sequences from 1).
fn batches(n: u64, batch: u64, t0: DateTime<Utc>) -> Vec<SyncBatch> {
    let mut out = Vec::new();
    let mut seq = 0;
    while seq < n {
        let first = seq + 1;
        let mut records = Vec::with_capacity(batch as usize);
        while (records.len() as u64) < batch && seq < n {
            seq += 1;
            records.push(Sequenced {
                epoch: 1,
                seq,
                record: reading(seq, t0),
            });
        }
        out.push(SyncBatch {
            protocol_version: kip_shared::PROTOCOL_VERSION,
            agent_version: "drain-bench".into(),
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

fn gzip_json(b: &SyncBatch) -> Vec<u8> {
    let json = serde_json::to_vec(b).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&json).unwrap();
    gz.finish().unwrap()
}

async fn rolled_up(pool: &PgPool, device: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(count), 0)::bigint FROM sensor_rollup_1m WHERE device_id = $1",
    )
    .bind(device)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn device_row(pool: &PgPool, org: Uuid, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(org)
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
    id
}

/// Raw binary COPY of `work`'s readings into `sensor_data` for a fresh device per share,
/// shares in parallel; records/s.
async fn copy_reference(pool: &PgPool, org: Uuid, work: &[Vec<SyncBatch>]) -> (f64, f64) {
    let mut devices = Vec::new();
    for d in 0..work.len() {
        devices.push(device_row(pool, org, &format!("copy-{d}-{}", Uuid::new_v4())).await);
    }
    let total: usize = work.iter().flatten().map(|b| b.records.len()).sum();
    let start = Instant::now();
    let tracker = tokio_util::task::TaskTracker::new();
    for (device, batches) in devices.into_iter().zip(work.iter().cloned()) {
        let pool = pool.clone();
        tracker.spawn(async move {
            for b in batches {
                let mut rows = StagingRows::with_capacity(b.records.len());
                for r in &b.records {
                    if let Record::Reading(x) = &r.record {
                        rows.push(
                            org,
                            device,
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
                let mut conn = pool.acquire().await.unwrap();
                let mut copy = conn
                    .copy_in_raw(
                        "COPY sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, \
                         value, quality) FROM STDIN (FORMAT binary)",
                    )
                    .await
                    .unwrap();
                copy.send(rows.finish()).await.unwrap();
                copy.finish().await.unwrap();
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let secs = start.elapsed().as_secs_f64();
    (total as f64 / secs, secs)
}

struct Setup {
    pool: PgPool,
    cp: ControlPlaneProcess,
    org: Uuid,
    work: tempfile::TempDir,
    t0: DateTime<Utc>,
}

/// Phase 1: the sync endpoint with several devices at once, next to raw COPY.
async fn sync_endpoint(s: &Setup, n: u64, batch: u64, devices: u64) {
    let admin = s.cp.admin_api();
    let per = n / devices;
    let work: Vec<Vec<SyncBatch>> = (0..devices).map(|_| batches(per, batch, s.t0)).collect();
    let bodies: Vec<Vec<Vec<u8>>> = work
        .iter()
        .map(|bs| bs.iter().map(gzip_json).collect())
        .collect();
    let mut clients = Vec::new();
    for d in 0..devices {
        let id = admin
            .enroll(
                s.org,
                &format!("load-{d}"),
                &s.work.path().join(format!("load-{d}")),
            )
            .await;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*id.client_config().unwrap()).clone())
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        clients.push((id.device_id(), client));
    }
    println!(
        "[1] sync endpoint: {} readings, {devices} devices in parallel, batches of {batch} \
         (gzip JSON {:.1} MiB in all) [{}]",
        per * devices,
        mib(bodies.iter().flatten().map(|b| b.len() as u64).sum()),
        uptime()
    );
    let url = format!("{}/v1/agent/sync", s.cp.agent_url());
    let start = Instant::now();
    let tracker = tokio_util::task::TaskTracker::new();
    for ((_, client), bodies) in clients.iter().cloned().zip(bodies) {
        let url = url.clone();
        tracker.spawn(async move {
            for body in bodies {
                let resp = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("content-encoding", "gzip")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let text = resp.text().await.unwrap();
                assert!(status.is_success(), "sync answered {status}: {text}");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    let secs = start.elapsed().as_secs_f64();
    for (device, _) in &clients {
        assert_eq!(rolled_up(&s.pool, *device).await as u64, per);
    }
    let rate = (per * devices) as f64 / secs;
    let (copy_rate, copy_secs) = copy_reference(&s.pool, s.org, &work).await;
    println!(
        "    POST /v1/agent/sync (mTLS, gzip JSON, COPY + insert-select + rollups): \
         {rate:>9.0} records/s ({secs:.2} s)"
    );
    println!(
        "    reference: raw binary COPY of the same rows into sensor_data:          \
         {copy_rate:>9.0} records/s ({copy_secs:.2} s)  ratio {:.2} [{}]",
        rate / copy_rate,
        uptime()
    );
}

/// The counter or gauge `name` (no labels) on the agent's `/metrics`.
async fn agent_metric(port: u16, name: &str) -> f64 {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = kip_agent::runtime::local_get(addr, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The broker settings of the MQTT phases, for the reference subscriber and the agent alike:
/// Mosquitto's default in-flight window (`max_inflight_messages` 20, written out) and no limit
/// on the queue of a disconnected persistent session, so that a whole backlog is kept.
const BROKER_CONF: &str = "allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 20";

/// `publishers` `mosquitto_pub -l` processes (QoS 1, 1,000 in flight each) publishing the
/// numbers `0..n`: publisher k the numbers `i` with `i % publishers == k`, on topic
/// `plant/press{k}/count`. `mosquitto_pub -l` disconnects at the end of its input without
/// waiting for its last messages in flight, so the input stays open until [`Publishers::finish`],
/// which the caller calls once something downstream has received everything.
struct Publishers {
    running: Vec<(
        std::process::Child,
        std::thread::JoinHandle<std::process::ChildStdin>,
    )>,
}

impl Publishers {
    fn start(port: u16, n: u64, publishers: u64) -> Self {
        use std::process::{Command, Stdio};
        let mut running = Vec::new();
        for k in 0..publishers {
            let mut child = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-q",
                    "1",
                    "-M",
                    "1000",
                ])
                .args(["-i", &format!("drain-bench-pub-{k}")])
                .args(["-t", &format!("plant/press{k}/count"), "-l"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("mosquitto_pub (mosquitto-clients) on the PATH");
            let stdin = child.stdin.take().unwrap();
            let writer = std::thread::spawn(move || {
                let mut w = std::io::BufWriter::new(stdin);
                let mut i = k;
                while i < n {
                    writeln!(w, "{i}").unwrap();
                    i += publishers;
                }
                w.flush().unwrap();
                w.into_inner().unwrap()
            });
            running.push((child, writer));
        }
        Self { running }
    }

    /// Closes the publishers' input and waits for them to exit.
    fn finish(self) {
        for (mut child, writer) in self.running {
            drop(writer.join().unwrap());
            child.wait().unwrap();
        }
    }
}

/// Publishes the numbers `0..n` with [`Publishers`] and returns the seconds until a counting
/// subscriber (clean session, QoS 1, subscribed first) received all of them: by then every
/// persistent session subscribed to `plant/+/count` has them queued.
fn fill_sessions(port: u16, n: u64, publishers: u64) -> f64 {
    use std::process::Stdio;
    let start = Instant::now();
    let mut counter = mosquitto_sub(port, "plant/+/count", None)
        .args(["-C", &n.to_string(), "-W", "900"])
        .stdout(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (mosquitto-clients) on the PATH");
    // The counter's subscription first, or it misses the first messages.
    std::thread::sleep(Duration::from_millis(300));
    let pubs = Publishers::start(port, n, publishers);
    let status = counter.wait().unwrap();
    assert!(
        status.success(),
        "the counting subscriber did not get {n} messages"
    );
    let secs = start.elapsed().as_secs_f64();
    pubs.finish();
    secs
}

/// Creates the persistent session `id` (QoS 1 subscription to `plant/+/count`) and leaves.
fn mosquitto_session(port: u16, id: &str) {
    let ok = mosquitto_sub(port, "plant/+/count", Some(id))
        .arg("-E")
        .status()
        .expect("mosquitto_sub (mosquitto-clients) on the PATH");
    assert!(ok.success());
}

/// Missing and duplicated numbers among `values` (want each of `0..n` once).
fn exactly_once(values: impl Iterator<Item = u64>, n: u64) -> (u64, u64) {
    let mut seen = vec![false; n as usize];
    let mut dups = 0u64;
    for v in values {
        match seen.get_mut(v as usize) {
            Some(s) if !*s => *s = true,
            _ => dups += 1,
        }
    }
    (seen.iter().filter(|s| !**s).count() as u64, dups)
}

/// Seconds `mosquitto_sub` (persistent session `id`, QoS 1, acknowledging each message on
/// receipt) takes from its start to `n` messages; checks that it got every number once.
fn mosquitto_sub_drain(port: u16, id: &str, n: u64) -> (f64, u64, u64) {
    use std::process::Stdio;
    let start = Instant::now();
    let out = mosquitto_sub(port, "plant/+/count", Some(id))
        .args(["-C", &n.to_string(), "-W", "900"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "mosquitto_sub did not get {n} messages"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (missing, dups) = exactly_once(text.lines().map(|l| l.trim().parse().unwrap()), n);
    (secs, missing, dups)
}

/// The agent's configuration for the MQTT phases: one source on `broker_url` with the
/// persistent session `kip-drain-bench`, `plant/+/count` mapped to machine `press{k}`,
/// metric `count`; `extra` adds sections (e.g. `[sync]`).
fn agent_toml(dir: &Path, http_port: u16, broker_url: &str, buffer: &str, extra: &str) -> String {
    format!(
        "[agent]\ndevice = \"gw-drain\"\nstate_dir = \"{}\"\n\
         [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
         [log]\nformat = \"text\"\nfilter = \"{}\"\n\
         [buffer]\n{buffer}\n{extra}\n\
         [[mqtt]]\nname = \"plc\"\nurl = \"{broker_url}\"\nclient_id = \"kip-drain-bench\"\n{}\n\
         [[mqtt.subscriptions]]\ntopic = \"plant/+/count\"\nmachine_topic_level = 1\n\
         metric = \"count\"\nvalue = {{ kind = \"number\" }}\n",
        dir.display(),
        std::env::var("DRAIN_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        std::env::var("DRAIN_BENCH_MQTT_TOML").unwrap_or_default(),
    )
}

/// Prints the agent's MQTT counters (deferrals, reconnects, redeliveries).
async fn print_mqtt_metrics(http_port: u16) {
    let body = kip_agent::runtime::local_get(
        format!("127.0.0.1:{http_port}").parse().unwrap(),
        "/metrics",
    )
    .await
    .map(|(_, b)| b)
    .unwrap_or_default();
    for l in body
        .lines()
        .filter(|l| l.starts_with("kip_agent_mqtt") || l.starts_with("kip_agent_source_reconnects"))
    {
        println!("    {l}");
    }
}

/// Phase 5 (`backlog`): `n` messages queued at the broker for two persistent sessions, a
/// plain subscriber's (the reference) and the agent's; each drains its session, one after
/// the other.
async fn mqtt_backlog(work: &Path, n: u64, publishers: u64) {
    let broker = Mosquitto::start(work, BROKER_CONF);
    let port = broker.port;
    let dir = work.join("backlog-agent");
    let http_port = free_port();
    let config = work.join("backlog-agent.toml");
    std::fs::write(
        &config,
        agent_toml(
            &dir,
            http_port,
            &broker.url(false),
            &std::env::var("DRAIN_BENCH_BUFFER_TOML").unwrap_or_default(),
            "",
        ),
    )
    .unwrap();
    let log = work.join("backlog-agent.log");
    // Both persistent sessions exist (subscribed) before the messages arrive.
    mosquitto_session(port, "plain-subscriber");
    let mut agent = spawn_agent(&config, http_port, Some(&log));
    wait_until(
        Duration::from_secs(30),
        "MQTT source subscribed",
        || async {
            agent_metric(http_port, "kip_agent_source_connected{source=\"plc\"}").await >= 1.0
        },
    )
    .await;
    agent.terminate();
    println!(
        "[5] MQTT backlog: {n} QoS 1 messages queued at a private Mosquitto for two persistent \
         sessions (broker: {}) [{}]",
        BROKER_CONF.replace('\n', ", "),
        uptime()
    );
    let fill = fill_sessions(port, n, publishers);
    println!(
        "    queued by {publishers} mosquitto_pub in parallel in {fill:.2} s ({:.0} messages/s)",
        n as f64 / fill
    );
    let (plain, missing, dups) = mosquitto_sub_drain(port, "plain-subscriber", n);
    println!(
        "    reference: mosquitto_sub (QoS 1, acknowledges on receipt): {n} in {plain:.2} s = \
         {:>9.0} messages/s ({missing} missing, {dups} duplicates) [{}]",
        n as f64 / plain,
        uptime()
    );

    let start = Instant::now();
    let mut agent = spawn_agent(&config, http_port, Some(&log));
    let pid = agent.id();
    let running = Arc::new(AtomicBool::new(true));
    let sampler = rss_sampler(pid, running.clone());
    loop {
        if agent_metric(http_port, "kip_agent_buffer_records").await >= n as f64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "the agent's backlog drain is stuck"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let buffered_rss = rss_mib(pid);
    println!(
        "    kip-agent run (durable, acknowledged after the flush): {n} in {secs:.2} s = \
         {:>9.0} messages/s ({:.2}x the reference; from process start) [{}]",
        n as f64 / secs,
        plain / secs,
        uptime()
    );
    println!(
        "    agent RSS: peak while draining the session {peak:.1} MiB, with {n} buffered \
         {buffered_rss:.1} MiB"
    );
    print_mqtt_metrics(http_port).await;
    agent.terminate();
    drop(broker);
    // Exactly once: every number once among the buffered readings.
    let buffer = Buffer::open(
        &dir.join("buffer"),
        BufferOptions::with_max_bytes(512 << 20),
    )
    .unwrap();
    let mut values = Vec::with_capacity(n as usize);
    let mut from = 1;
    loop {
        let batch = buffer.read_range(from, 10_000, 16 << 20).unwrap();
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        values.extend(batch.iter().filter_map(|s| match &s.record {
            Record::Reading(r) => Some(r.value as u64),
            _ => None,
        }));
    }
    let (missing, dups) = exactly_once(values.iter().copied(), n);
    println!(
        "    check: {} readings in the agent's buffer, {missing} missing, {dups} duplicates",
        values.len()
    );
    assert_eq!((missing, dups), (0, 0), "lost or duplicated");
}

/// Phases 2 and 3: an agent buffers `n` MQTT messages with its link cut, then drains them.
async fn agent_drain(s: &Setup, n: u64, batch: u64, publishers: u64) {
    // Reference first: the same number of rows by raw COPY from one writer in order.
    let (copy_rate, copy_secs) = copy_reference(&s.pool, s.org, &[batches(n, batch, s.t0)]).await;
    let dir = s.work.path().join("agent");
    let id =
        s.cp.admin_api()
            .enroll(s.org, "gw-drain", &dir.join("identity"))
            .await;
    let device = id.device_id();
    let broker = Mosquitto::start(s.work.path(), BROKER_CONF);
    let proxy = Proxy::start(format!("127.0.0.1:{}", s.cp.agent_port).parse().unwrap()).await;
    proxy.cut();
    let http_port = free_port();
    let config = s.work.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_toml(
            &dir,
            http_port,
            &broker.url(false),
            &std::env::var("DRAIN_BENCH_BUFFER_TOML").unwrap_or_default(),
            &format!(
                "[sync]\nendpoints = [\"{}\"]\n{}\n",
                proxy.url(),
                std::env::var("DRAIN_BENCH_SYNC_TOML").unwrap_or_default()
            ),
        ),
    )
    .unwrap();
    let log = s.work.path().join("agent.log");
    let mut agent = spawn_agent(&config, http_port, Some(&log));
    let pid = agent.id();
    wait_until(
        Duration::from_secs(30),
        "MQTT source subscribed",
        || async {
            agent_metric(http_port, "kip_agent_source_connected{source=\"plc\"}").await >= 1.0
        },
    )
    .await;
    let idle = rss_mib(pid);
    let buffer_dir = dir.join("buffer");
    let disk_idle = disk_bytes(&buffer_dir);
    println!(
        "[2] agent ingest: {n} QoS 1 messages through a private Mosquitto, link to the control \
         plane cut [{}]",
        uptime()
    );
    println!(
        "    agent idle: RSS {idle:.1} MiB, buffer on disk {:.1} MiB",
        mib(disk_idle)
    );

    let running = Arc::new(AtomicBool::new(true));
    let sampler = rss_sampler(pid, running.clone());
    let start = Instant::now();
    // The reference: a plain subscriber on the same topics at the same time.
    let mut plain = mosquitto_sub(broker.port, "plant/+/count", None)
        .args(["-C", &n.to_string(), "-W", "900"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_sub (mosquitto-clients) on the PATH");
    std::thread::sleep(Duration::from_millis(300));
    let publishing = Publishers::start(broker.port, n, publishers);
    let plain_done = std::thread::spawn(move || {
        let ok = plain.wait().unwrap().success();
        (ok, Instant::now())
    });
    wait_until(
        Duration::from_secs(600),
        "every message buffered",
        || async { agent_metric(http_port, "kip_agent_buffer_records").await >= n as f64 },
    )
    .await;
    let ingest_secs = start.elapsed().as_secs_f64();
    let (plain_ok, plain_at) = plain_done.join().unwrap();
    assert!(plain_ok, "the plain subscriber did not get {n} messages");
    let plain_secs = plain_at.duration_since(start).as_secs_f64();
    publishing.finish();
    running.store(false, Ordering::Relaxed);
    let ingest_peak = sampler.join().unwrap();
    let buffered_rss = rss_mib(pid);
    let stored_bytes = agent_metric(http_port, "kip_agent_buffer_bytes").await;
    let disk_full = disk_bytes(&buffer_dir);
    println!(
        "    into the buffer: {:>9.0} messages/s ({ingest_secs:.2} s, {publishers} mosquitto_pub \
         in parallel)",
        n as f64 / ingest_secs,
    );
    println!(
        "    reference: mosquitto_sub (QoS 1, clean session) on the same topics at the same \
         time: {:>9.0} messages/s ({plain_secs:.2} s) [{}]",
        n as f64 / plain_secs,
        uptime()
    );
    println!(
        "    agent RSS: peak while ingesting {ingest_peak:.1} MiB, with {n} buffered \
         {buffered_rss:.1} MiB"
    );
    println!(
        "    buffer: {:.1} MiB stored (record frames), {:.1} MiB on disk ({:.2}x)",
        mib(stored_bytes as u64),
        mib(disk_full),
        disk_full as f64 / stored_bytes.max(1.0)
    );

    // 3. The link returns.
    println!("[3] backlog drain [{}]", uptime());
    let running = Arc::new(AtomicBool::new(true));
    let sampler = rss_sampler(pid, running.clone());
    proxy.restore();
    let restored = Instant::now();
    let mut first_at = None;
    loop {
        let got = rolled_up(&s.pool, device).await;
        if got > 0 && first_at.is_none() {
            first_at = Some(restored.elapsed());
        }
        if got as u64 >= n {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(900),
            "drain stuck at {got} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = restored.elapsed();
    running.store(false, Ordering::Relaxed);
    let drain_peak = sampler.join().unwrap();
    let first_at = first_at.unwrap_or_default();
    println!(
        "    {n} readings in PostgreSQL {:.2} s after the link returned ({:.0} records/s; \
         first rows after {} ms)",
        drain.as_secs_f64(),
        n as f64 / drain.as_secs_f64(),
        first_at.as_millis()
    );
    println!(
        "    reference: raw binary COPY of {n} such rows from one writer: {copy_secs:.2} s \
         ({copy_rate:.0} records/s, measured before [2]) [{}]",
        uptime()
    );
    wait_until(
        Duration::from_secs(60),
        "the agent's backlog is 0",
        || async { agent_metric(http_port, "kip_agent_buffer_records").await == 0.0 },
    )
    .await;
    let after_drain = rss_mib(pid);
    // Memory and disk a little later (the old sled buffer reclaimed segments in the background).
    let mut later = after_drain;
    let mut disk_later = disk_bytes(&buffer_dir);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        later = rss_mib(pid);
        disk_later = disk_bytes(&buffer_dir);
    }
    println!(
        "    agent RSS: peak while draining {drain_peak:.1} MiB, right after {after_drain:.1} \
         MiB, 5 s later {later:.1} MiB (idle before: {idle:.1} MiB)"
    );
    println!(
        "    buffer on disk 5 s after the drain: {:.1} MiB (idle before: {:.1} MiB)",
        mib(disk_later),
        mib(disk_idle)
    );
    // Exactly once: every number once.
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT value) FROM sensor_data WHERE device_id = $1",
    )
    .bind(device)
    .fetch_one(&s.pool)
    .await
    .unwrap();
    println!("    check: {rows} rows, {distinct} distinct numbers (want {n} and {n})");
    let body = kip_agent::runtime::local_get(
        format!("127.0.0.1:{http_port}").parse().unwrap(),
        "/metrics",
    )
    .await
    .map(|(_, b)| b)
    .unwrap_or_default();
    for l in body.lines().filter(|l| {
        l.starts_with("kip_agent_mqtt")
            || l.starts_with("kip_agent_source_reconnects")
            || l.starts_with("kip_agent_sync_max_in_flight_batches")
            || l.starts_with("kip_agent_sync_in_flight_fallbacks")
            || l.starts_with("kip_agent_sync_batches_total")
            || l.starts_with("kip_agent_sync_failures_total")
            || l.starts_with("kip_agent_sync_batch_records")
    }) {
        println!("    {l}");
    }
    if let Ok(keep) = std::env::var("DRAIN_BENCH_KEEP_DIR") {
        let keep = Path::new(&keep);
        std::fs::create_dir_all(keep).unwrap();
        std::fs::copy(&log, keep.join("agent.log")).unwrap();
        let dups: Vec<(f64, Vec<i64>)> = sqlx::query_as(
            "SELECT value, array_agg(seq ORDER BY seq) FROM sensor_data WHERE device_id = $1 \
             GROUP BY value HAVING count(*) > 1 ORDER BY value",
        )
        .bind(device)
        .fetch_all(&s.pool)
        .await
        .unwrap();
        let text: String = dups
            .iter()
            .map(|(v, seqs)| format!("{v} {seqs:?}\n"))
            .collect();
        std::fs::write(keep.join("duplicates.txt"), text).unwrap();
        println!("    agent log and duplicates kept in {}", keep.display());
    }
    assert_eq!((rows as u64, distinct as u64), (n, n), "lost or duplicated");
    agent.terminate();
    drop(proxy);
    drop(broker);
}

/// Phase 4: a buffer capped at 20 MiB takes `n` readings.
async fn footprint(n: u64, t0: DateTime<Utc>) {
    let dir = tempfile::tempdir().unwrap();
    let max_bytes: u64 = 20 << 20;
    let mut opts = BufferOptions::with_max_bytes(max_bytes);
    // As the agent sizes it (runtime.rs).
    opts.cache_capacity_bytes = (max_bytes / 8).clamp(8 << 20, 256 << 20);
    let buffer = Buffer::open(dir.path(), opts).unwrap();
    let start = Instant::now();
    let mut peak = 0u64;
    for i in 0..n {
        buffer.append(&reading(i, t0)).unwrap();
        if i % 10_000 == 9_999 {
            buffer.flush().await.unwrap();
            peak = peak.max(disk_bytes(dir.path()));
        }
    }
    buffer.flush().await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    let stats = buffer.stats().unwrap();
    let end = disk_bytes(dir.path());
    println!(
        "[4] buffer with max_bytes = {:.0} MiB, {n} readings appended ({:.0}/s, flush every \
         10,000) [{}]",
        mib(max_bytes),
        n as f64 / secs,
        uptime()
    );
    println!(
        "    stored {:.1} MiB in {} records ({} evicted); on disk {:.1} MiB at the end, peak \
         {:.1} MiB ({:.2}x max_bytes)",
        mib(stats.bytes),
        stats.counts.total(),
        stats.evicted_records_total,
        mib(end),
        mib(peak),
        peak as f64 / max_bytes as f64
    );
    buffer.ack(stats.next_seq - 1).unwrap();
    buffer.flush().await.unwrap();
    let mut after = disk_bytes(dir.path());
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = disk_bytes(dir.path());
    }
    println!(
        "    after acknowledging everything: {:.1} MiB on disk",
        mib(after)
    );
}

#[tokio::main]
async fn main() {
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    let n = env_num("DRAIN_BENCH_RECORDS", 1_000_000);
    let batch = env_num("DRAIN_BENCH_BATCH", 10_000);
    let devices = env_num("DRAIN_BENCH_DEVICES", 4).max(1);
    let publishers = env_num("DRAIN_BENCH_PUBLISHERS", 4).max(1);
    let phases = std::env::var("DRAIN_BENCH_PHASES")
        .unwrap_or_else(|_| "sync,agent,footprint,backlog".into());
    let t0 = Utc::now() - chrono::Duration::hours(1);
    println!("drain bench [{}]", uptime());
    if phases.contains("footprint") {
        footprint(n, t0).await;
    }
    if phases.contains("backlog") {
        let work = tempfile::tempdir().unwrap();
        mqtt_backlog(work.path(), n, publishers).await;
    }
    if !phases.contains("sync") && !phases.contains("agent") {
        return;
    }
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::new(&db.url, work.path());
    let mut cp_proc = cp.spawn();
    let pool = PgPool::connect(&db.url).await.unwrap();
    let org = cp.admin_api().create_org("drain").await;
    if std::env::var("DRAIN_BENCH_FK").is_ok_and(|v| v == "1") {
        sqlx::query(
            "ALTER TABLE sensor_data ADD FOREIGN KEY (org_id, device_id) \
             REFERENCES devices (org_id, id) ON DELETE CASCADE",
        )
        .execute(&pool)
        .await
        .unwrap();
        println!("with the foreign key sensor_data -> devices (as before migration 0230)");
    }
    let s = Setup {
        pool,
        cp,
        org,
        work,
        t0,
    };
    if phases.contains("sync") {
        sync_endpoint(&s, n, batch, devices).await;
    }
    if phases.contains("agent") {
        agent_drain(&s, n, batch, publishers).await;
    }
    cp_proc.terminate();
    s.pool.close().await;
    drop(db);
}
