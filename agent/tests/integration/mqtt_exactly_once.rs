//! Exactly once under a broker-side backlog: the real agent binary takes a flood of numbered
//! QoS 1 messages from a real Mosquitto (2.0.11 sends a resumed session's whole backlog at
//! once), far faster than it stores them, so it defers messages and reconnects to fetch them
//! many times; afterwards its buffer on disk must hold every number exactly once.
//!
//! The 1M drain benchmark stored 12,982 messages twice this way (issue: MQTT readings stored
//! twice under a large backlog). The mechanism: at a reconnect for deferred messages the source
//! gave rumqttc one second to write the DISCONNECT behind the PubAcks it had queued, and under
//! the incoming flood rumqttc writes about one request per ten packets read, so queued PubAcks
//! were dropped with the connection. Their messages were stored but stayed in flight at the
//! broker, behind the deferred backlog; by the time they came back (DUP set) more than
//! `max_delivery_notes` deliveries had been stored and their notes had left the FIFO, so they
//! were stored again. A window of `max_delivery_notes` plus the deferred backlog's peak still
//! stored up to 12,100 of these 60,000 twice (1 run in 3 at load 12): a copy of a message
//! stored early on a connection longer than the window came back after the rest of that
//! connection had been noted too. The window now also pins the longest connection of the
//! backlog episode ([`kip_agent::mqtt`]). Here the same boundaries are crossed with 60,000
//! messages:
//! `staging_capacity_messages` and `max_delivery_notes` are small, and the writer flushes
//! rarely so that each flush releases a large batch of acknowledgements at once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use kip_agent::{
    buffer::{Buffer, BufferOptions},
    runtime::{StatusReport, local_get},
};
use kip_shared::Record;
use kip_tests::{ChildGroup, Mosquitto, free_port, mosquitto::publish_all, wait_until};

const MESSAGES: u64 = 60_000;
const TOPIC: &str = "plant/m1/temp";

fn write_config(dir: &Path, broker_port: u16, http_port: u16) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
device = "gw-once"
state_dir = "{state}"

[buffer]
max_bytes = 268435456
queue_capacity_records = 2000
ack_flush_threshold_records = 2000
max_delivery_notes = 4000

[http]
listen_addr = "127.0.0.1:{http_port}"

[log]
filter = "{log_filter}"

[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "kip-once-{broker_port}"
staging_capacity_messages = 2000

[[mqtt.subscriptions]]
topic = "plant/+/temp"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}
"#,
            state = dir.join("state").display(),
            // KIP_ONCE_AGENT_LOG=info,kip_agent::mqtt=trace logs every message's packet id.
            log_filter = std::env::var("KIP_ONCE_AGENT_LOG")
                .unwrap_or_else(|_| "info,kip_agent::runtime=debug".into()),
        ),
    )
    .unwrap();
    path
}

fn start_agent(cfg: &Path, log: &Path) -> ChildGroup {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    ChildGroup::spawn(
        Command::new(env!("CARGO_BIN_EXE_kip-agent"))
            .args(["run", "--config"])
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap()
    .with_grace(Duration::from_secs(30))
}

async fn status(addr: std::net::SocketAddr) -> Option<StatusReport> {
    let (code, body) = local_get(addr, "/v1/status").await.ok()?;
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

/// The agent's MQTT counters (for a failure message).
async fn mqtt_metrics(addr: std::net::SocketAddr) -> String {
    let body = local_get(addr, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("kip_agent_mqtt") || l.starts_with("kip_agent_source_reconnects"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How often each number is in the buffer on disk.
fn counts(dir: &Path) -> BTreeMap<u64, u32> {
    let buffer = Buffer::open(dir, BufferOptions::with_max_bytes(1 << 30)).unwrap();
    let mut counts = BTreeMap::new();
    for s in buffer.read_range(0, usize::MAX, u64::MAX).unwrap() {
        if let Record::Reading(r) = s.record {
            *counts.entry(r.value as u64).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_deferred_and_fetched_again_many_times_is_stored_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // No limit on what the broker queues for the session: the whole flood stays available.
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let http_port = free_port();
    let cfg = write_config(dir.path(), broker.port, http_port);
    let log = dir.path().join("agent.log");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();

    let mut agent = start_agent(&cfg, &log);
    wait_until(
        Duration::from_secs(30),
        "the agent subscribes",
        || async move { status(addr).await.is_some_and(|s| s.sources[0].connected) },
    )
    .await;

    // The flood, at full publisher speed, while the agent is connected.
    let messages = (0..MESSAGES)
        .map(|i| (TOPIC.to_owned(), i.to_string().into_bytes()))
        .collect();
    assert_eq!(publish_all(broker.port, messages).await, MESSAGES);

    // Every number reached the buffer (duplicates count here too; the disk check below tells
    // them apart), and the source has nothing deferred left to fetch.
    wait_until(
        Duration::from_secs(120),
        "every message stored",
        || async move {
            let report = local_get(addr, "/metrics").await.map(|(_, b)| b);
            let value = |body: &str, name: &str| {
                body.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                    .unwrap_or(-1.0)
            };
            // The backlog gauge is 0 once nothing deferred is outstanding (every deferred
            // message fetched again and stored).
            report.is_ok_and(|b| {
                value(&b, "kip_agent_buffer_records") >= MESSAGES as f64
                    && value(&b, "kip_agent_mqtt_staged_messages{source=\"b1\"}") == 0.0
                    && value(&b, "kip_agent_mqtt_deferred_backlog_messages") <= 0.0
            })
        },
    )
    .await;
    let metrics = mqtt_metrics(addr).await;
    let code = tokio::task::spawn_blocking(move || {
        agent.terminate();
        agent.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(code.is_some_and(|c| c.success()), "{code:?}");

    let counts = counts(&dir.path().join("state/buffer"));
    let missing: Vec<u64> = (0..MESSAGES).filter(|i| !counts.contains_key(i)).collect();
    let twice: Vec<(u64, u32)> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(v, n)| (*v, *n))
        .collect();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("agent metrics:\n{metrics}");
    // KIP_ONCE_KEEP=1 keeps the agent's log and state for inspection.
    if !(missing.is_empty() && twice.is_empty()) || std::env::var_os("KIP_ONCE_KEEP").is_some() {
        eprintln!("work directory kept: {}", dir.keep().display());
    }
    let reconnects: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("disconnected to fetch") || l.contains("connection lost"))
        .take(20)
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "of {MESSAGES} messages {} missing (first {:?}), {} stored more than once (first \
         {:?})\nagent metrics:\n{metrics}\nfirst reconnects:\n{}",
        missing.len(),
        &missing[..missing.len().min(20)],
        twice.len(),
        &twice[..twice.len().min(20)],
        reconnects.join("\n")
    );
}
