//! MQTT soak test (issue #19): the real `kip-agent` and `kip-control-plane` binaries as child
//! processes (the kit's `binaries`), a private Mosquitto on a free port, the kit's TCP proxy
//! between agent and control plane, and a publisher (written here) that counts the broker's
//! PUBACKs.
//!
//! The scenario a factory gateway meets after every outage: the broker already holds a
//! backlog for the agent's persistent session when the agent starts, more messages arrive at
//! full publisher speed, the agent is killed with `kill -9` once and restarted, and its link
//! to the control plane is cut for a while. It passes only when PostgreSQL holds every
//! numbered message exactly once (distinct count AND total count) and an oversized message
//! became exactly one dead letter.
//!
//! Every process started here runs in its own process group and is killed (the whole group)
//! on drop, whatever the outcome.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kip_tests::{
    ChildGroup, NewDatabase, Proxy,
    binaries::{ControlPlaneProcess, spawn_agent},
    eventually::within as wait_for,
    free_port,
    mosquitto::publish_all,
    wait_for_port,
};
use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

const TOPIC_PREFIX: &str = "soak";
const CLIENT_ID: &str = "kip-soak-agent";

fn wait_port(port: u16, what: &str) {
    assert!(
        wait_for_port(port, Duration::from_secs(60)),
        "{what}: nothing listens on {port}"
    );
}

/// A private Mosquitto: queues without limit for offline persistent sessions (so a backlog
/// builds up), default in-flight settings otherwise.
fn start_mosquitto(dir: &Path) -> (ChildGroup, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let p = ChildGroup::spawn(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap_or_else(|e| panic!("cannot start mosquitto ({e}): apt-get install mosquitto"));
    wait_port(port, "mosquitto");
    (p, port)
}

/// Message `i` of the numbered stream: its number as the payload (a reading with value `i`),
/// padded with spaces to `pad_to` bytes when given (still a number after trimming).
fn numbered(i: u64, pad_to: Option<usize>) -> (String, Vec<u8>) {
    let mut payload = i.to_string().into_bytes();
    if let Some(n) = pad_to {
        payload.resize(n.max(payload.len()), b' ');
    }
    (format!("{TOPIC_PREFIX}/seq"), payload)
}

/// One soak scenario.
#[derive(Debug, Clone)]
struct Scenario {
    /// Messages queued at the broker for the agent's session before the agent starts.
    backlog: u64,
    /// Messages published at full speed once the agent runs again.
    live: u64,
    /// `[buffer]` lines added to the otherwise default agent configuration.
    buffer_toml: &'static str,
    /// How long the agent's link to the control plane is cut.
    cut: Duration,
    /// Put an 11 KiB numbered message and a 1 MiB (over the limit) message mid-stream.
    large_messages: bool,
    /// Overall limit for everything to land in PostgreSQL after the last event.
    drain_limit: Duration,
}

/// The test's work directory (logs, agent state), kept for inspection when the test fails.
struct WorkDir(Option<tempfile::TempDir>);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("work directory kept: {}", dir.keep().display());
        }
    }
}

struct Env {
    _work: WorkDir,
    work: PathBuf,
    _db: NewDatabase,
    pool: PgPool,
    cp: ChildGroup,
    proxy: Proxy,
    mqtt_port: u16,
    _mosquitto: ChildGroup,
    device: Uuid,
    config: PathBuf,
    http_port: u16,
    agent_runs: u32,
}

impl Env {
    async fn start(s: &Scenario) -> Self {
        kip_tests::install_crypto_provider();
        let work_dir = tempfile::tempdir().unwrap();
        let work = work_dir.path().to_owned();
        let db = NewDatabase::new();
        let cp_process =
            ControlPlaneProcess::new(&db.url, &work).with_log(work.join("control-plane.log"));
        let cp = cp_process.spawn();
        let pool = PgPool::connect(&db.url).await.unwrap();
        let admin = cp_process.admin_api();
        let org = admin.create_org("acme").await;
        let state = work.join("agent");
        let id = admin.enroll(org, "gw-soak", &state.join("identity")).await;
        let agent_port = cp_process.agent_port;
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], agent_port))).await;
        let (mosquitto, mqtt_port) = start_mosquitto(&work);
        let http_port = free_port();
        let config = work.join("agent.toml");
        // The default configuration but for what a test must set: where things are.
        std::fs::write(
            &config,
            format!(
                "[agent]\ndevice = \"gw-soak\"\nstate_dir = \"{state}\"\n\
                 [buffer]\n{buffer}\n\
                 [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
                 [log]\nformat = \"text\"\nfilter = \"{log_filter}\"\n\
                 [sync]\nendpoints = [\"https://127.0.0.1:{proxy}\"]\n\
                 [[mqtt]]\nname = \"plant\"\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\n\
                 client_id = \"{CLIENT_ID}\"\n\
                 [[mqtt.subscriptions]]\ntopic = \"{TOPIC_PREFIX}/+\"\nmachine = \"m1\"\n\
                 metric_topic_level = 1\nvalue = {{ kind = \"number\" }}\n",
                state = state.display(),
                buffer = s.buffer_toml,
                proxy = proxy.addr.port(),
                // KIP_SOAK_AGENT_LOG=info,kip_agent::mqtt=trace logs every message's packet id.
                log_filter = std::env::var("KIP_SOAK_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            ),
        )
        .unwrap();
        Self {
            _work: WorkDir(Some(work_dir)),
            work,
            _db: db,
            pool,
            cp,
            proxy,
            mqtt_port,
            _mosquitto: mosquitto,
            device: id.device_id(),
            config,
            http_port,
            agent_runs: 0,
        }
    }

    /// Starts `kip-agent run` and waits for its HTTP port; a clean stop may take 20 s.
    fn spawn_agent(&mut self) -> ChildGroup {
        self.agent_runs += 1;
        spawn_agent(
            &self.config,
            self.http_port,
            Some(&self.work.join("agent.log")),
        )
        .with_grace(Duration::from_secs(20))
    }

    async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = kip_agent::runtime::local_get(
            SocketAddr::from(([127, 0, 0, 1], self.http_port)),
            "/v1/status",
        )
        .await
        .ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// (rows, distinct values) of numbered readings in PostgreSQL.
    async fn stored(&self) -> (i64, i64) {
        sqlx::query_as(
            "SELECT count(*), count(DISTINCT value) FROM sensor_data \
             WHERE device_id = $1 AND metric = 'seq'",
        )
        .bind(self.device)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// A summary of the numbers stored more than once (for a failure message).
    async fn duplicates(&self) -> String {
        let rows: Vec<(f64, Vec<i64>)> = sqlx::query_as(
            "SELECT value, array_agg(seq ORDER BY seq) FROM sensor_data \
             WHERE device_id = $1 AND metric = 'seq' GROUP BY value HAVING count(*) > 1 \
             ORDER BY value",
        )
        .bind(self.device)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let sample: Vec<_> = rows.iter().step_by((rows.len() / 20).max(1)).collect();
        format!("{} numbers; sample (value, seqs): {sample:?}", rows.len())
    }

    /// The numbers below `total` that are not stored, as ranges (for a failure message).
    async fn missing(&self, total: u64) -> String {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "WITH m AS (SELECT n FROM generate_series(0::bigint, $2 - 1) n \
               EXCEPT SELECT value::bigint FROM sensor_data WHERE device_id = $1 AND metric = 'seq') \
             SELECT min(n), max(n) FROM (SELECT n, n - row_number() OVER (ORDER BY n) g FROM m) r \
             GROUP BY g ORDER BY min(n)",
        )
        .bind(self.device)
        .bind(total as i64)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let count: i64 = rows.iter().map(|(a, b)| b - a + 1).sum();
        format!(
            "{count} numbers in {} ranges; first ranges: {:?}",
            rows.len(),
            &rows[..rows.len().min(40)]
        )
    }

    /// The agent's MQTT and buffer metrics.
    async fn agent_metrics(&self) -> String {
        let body = kip_agent::runtime::local_get(
            SocketAddr::from(([127, 0, 0, 1], self.http_port)),
            "/metrics",
        )
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with("kip_agent_mqtt") || l.starts_with("kip_agent_records"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn dead_letters(&self) -> Vec<serde_json::Value> {
        sqlx::query_scalar(
            "SELECT body FROM agent_events WHERE device_id = $1 AND kind = 'dead_letter'",
        )
        .bind(self.device)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    fn tail(&self, file: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.work.join(file)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn cleanup(self) {
        self.pool.close().await;
        drop(self.cp);
        // The database goes with `_db`.
    }
}

fn readings_of(status: &serde_json::Value) -> u64 {
    status["sources"][0]["readings"].as_u64().unwrap_or(0)
}

async fn run(s: Scenario) {
    let started = Instant::now();
    let mut env = Env::start(&s).await;
    let total = s.backlog + s.live;
    // Message numbers of the 11 KiB reading and the position of the oversized message.
    let (big_reading, oversized_after) = (s.backlog + s.live / 3, s.backlog + s.live / 2);

    // 1. The agent's persistent session exists at the broker (subscribed), then it stops.
    let mut agent = env.spawn_agent();
    assert!(
        wait_for(Duration::from_secs(30), || async {
            env.status()
                .await
                .is_some_and(|st| st["sources"][0]["connected"] == true)
        })
        .await,
        "agent never subscribed\n{}",
        env.tail("agent.log", 30)
    );
    agent.terminate();

    // 2. The broker queues a backlog for the offline session.
    let backlog: Vec<_> = (0..s.backlog).map(|i| numbered(i, None)).collect();
    let pubacks = publish_all(env.mqtt_port, backlog).await;
    assert_eq!(pubacks, s.backlog);
    eprintln!(
        "[{:?}] backlog of {} queued at the broker",
        started.elapsed(),
        s.backlog
    );

    // 3. The agent starts with that backlog waiting; the rest arrives at full speed.
    let mut agent = env.spawn_agent();
    let mut live: Vec<_> = Vec::with_capacity(s.live as usize + 1);
    for i in s.backlog..total {
        let big = s.large_messages && i == big_reading;
        live.push(numbered(i, big.then_some(11 * 1024)));
        if s.large_messages && i == oversized_after {
            live.push((format!("{TOPIC_PREFIX}/oversized"), vec![b'x'; 1024 * 1024]));
        }
    }
    let mqtt_port = env.mqtt_port;
    let tracker = TaskTracker::new();
    let publisher = tracker.spawn(publish_all(mqtt_port, live));

    // 4. kill -9 mid-stream, once the agent took in part of the backlog.
    let took_some = wait_for(Duration::from_secs(30), || async {
        env.status()
            .await
            .is_some_and(|st| readings_of(&st) >= s.backlog / 3)
    })
    .await;
    eprintln!(
        "[{:?}] kill -9 of the agent (it took in a third of the backlog: {took_some}); stored {:?}",
        started.elapsed(),
        env.stored().await
    );
    agent.kill9();
    let mut agent = env.spawn_agent();

    // 5. The link to the control plane is cut while the agent drains the broker.
    let (rows, _) = env.stored().await;
    let _ = wait_for(Duration::from_secs(20), || async {
        env.stored().await.0 >= rows + (total as i64 / 10)
    })
    .await;
    eprintln!(
        "[{:?}] link cut for {:?}; stored {:?}",
        started.elapsed(),
        s.cut,
        env.stored().await
    );
    env.proxy.cut();
    tokio::time::sleep(s.cut).await;
    env.proxy.restore();
    eprintln!(
        "[{:?}] link restored; stored {:?}",
        started.elapsed(),
        env.stored().await
    );

    let published = tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publisher did not finish")
        .unwrap();
    assert_eq!(
        published,
        s.live + u64::from(s.large_messages),
        "the broker did not acknowledge every published message"
    );

    // 6. Everything lands: every number present, and the agent's buffer empty (synced).
    let want = total as i64;
    let drained = wait_for(s.drain_limit, || async {
        env.stored().await.1 >= want
            && env.status().await.is_some_and(|st| {
                st["buffer"]["counts"]
                    .as_object()
                    .is_some_and(|c| c.values().all(|v| v.as_u64() == Some(0)))
            })
    })
    .await;
    let (rows, distinct) = env.stored().await;
    let status = env.status().await;
    eprintln!(
        "[{:?}] stored rows {rows}, distinct {distinct} of {want}; agent runs {}; status {}",
        started.elapsed(),
        env.agent_runs,
        status.map(|s| s.to_string()).unwrap_or_default()
    );
    let diagnostics = format!(
        "missing: {}\nduplicates: {}\nagent metrics:\n{}\nagent log:\n{}\nmosquitto log:\n{}",
        env.missing(total).await,
        env.duplicates().await,
        env.agent_metrics().await,
        env.tail("agent.log", 40),
        env.tail("mosquitto.log", 10)
    );
    assert!(
        drained,
        "not drained in {:?}: {distinct} of {want} distinct, {rows} rows\n{diagnostics}",
        s.drain_limit
    );
    assert_eq!(distinct, want, "messages lost\n{diagnostics}");
    assert_eq!(rows, want, "messages stored more than once\n{diagnostics}");
    if s.large_messages {
        let dl = env.dead_letters().await;
        let oversized: Vec<_> = dl
            .iter()
            .filter(|b| b.to_string().contains("oversized"))
            .collect();
        assert_eq!(
            oversized.len(),
            1,
            "one dead letter for the oversized message: {dl:?}"
        );
        let (rows_big,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM sensor_data WHERE device_id = $1 AND value = $2")
                .bind(env.device)
                .bind(big_reading as f64)
                .fetch_one(&env.pool)
                .await
                .unwrap();
        assert_eq!(rows_big, 1, "the 11 KiB message is one reading");
    }
    agent.terminate();
    env.cleanup().await;
}

/// The scenario with the default configuration: 200,000 messages, 100,000 of them
/// queued before the agent starts, one `kill -9`, a 30 s cut of the control-plane link.
///
/// It also covers packet-id reuse: 100,000 queued messages are more than 65,535, so Mosquitto
/// 2.0.11 has several in flight with the same id (the 3,083 lost in one run before the agent
/// deferred every later message with the id of a deferred one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_200k_with_backlog_kill_and_link_cut_stores_every_message_once() {
    run(Scenario {
        backlog: 100_000,
        live: 100_000,
        buffer_toml: "",
        cut: Duration::from_secs(30),
        large_messages: false,
        drain_limit: Duration::from_secs(150),
    })
    .await;
}

/// Small channel and acknowledgement batches, with an 11 KiB and an oversized message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_queue_and_ack_threshold_with_large_messages_store_every_message_once() {
    run(Scenario {
        backlog: 15_000,
        live: 15_000,
        buffer_toml: "queue_capacity_records = 100\nack_flush_threshold_records = 1\n",
        cut: Duration::from_secs(5),
        large_messages: true,
        drain_limit: Duration::from_secs(90),
    })
    .await;
}

/// Large channel and acknowledgement batches, with an 11 KiB and an oversized message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_queue_and_ack_threshold_with_large_messages_store_every_message_once() {
    run(Scenario {
        backlog: 15_000,
        live: 15_000,
        buffer_toml: "queue_capacity_records = 100000\nack_flush_threshold_records = 1000\n",
        cut: Duration::from_secs(5),
        large_messages: true,
        drain_limit: Duration::from_secs(90),
    })
    .await;
}
