//! MQTT messages are acknowledged only once durable: `kill -9` of the real agent binary while
//! messages flow, with a flush interval long enough that acknowledging on receipt would lose
//! them, then a restart with the same state and client id: every published message is in the
//! buffer at least once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kip_agent::{
    buffer::{Buffer, BufferOptions},
    runtime::{BufferReport, StatusReport, local_get},
};
use kip_shared::Record;
use kip_tests::{ChildGroup, Mosquitto, free_port, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::task::TaskTracker;

const MESSAGES: u64 = 800;
const TOPIC: &str = "plant/m1/temp";

fn write_config(dir: &Path, broker_port: u16, http_port: u16) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
device = "gw-ack"
state_dir = "{state}"

[buffer]
max_bytes = 10485760
# Long: a record is durable within this interval only if someone flushes early.
flush_interval_ms = 5000

[http]
listen_addr = "127.0.0.1:{http_port}"

[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "kip-ack-{broker_port}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200

[[mqtt.subscriptions]]
topic = "plant/+/temp"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}
"#,
            state = dir.join("state").display()
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
    // A clean stop flushes the buffer: give it time before SIGKILL.
    .with_grace(Duration::from_secs(30))
}

async fn status(addr: std::net::SocketAddr) -> Option<StatusReport> {
    let (code, body) = local_get(addr, "/v1/status").await.ok()?;
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

async fn wait_connected(addr: std::net::SocketAddr) {
    wait_until(
        Duration::from_secs(30),
        "the agent subscribes",
        || async move { status(addr).await.is_some_and(|s| s.sources[0].connected) },
    )
    .await;
}

fn values(records: impl IntoIterator<Item = Record>) -> Vec<u64> {
    records
        .into_iter()
        .filter_map(|r| match r {
            Record::Reading(r) => Some(r.value as u64),
            _ => None,
        })
        .collect()
}

fn missing(seen: &[u64]) -> Vec<u64> {
    let seen: BTreeSet<u64> = seen.iter().copied().collect();
    (0..MESSAGES).filter(|i| !seen.contains(i)).collect()
}

/// An independent QoS 1 publisher: message i (0..n) carries the number i, 2 ms apart. Returns
/// the count of PubAcks from the broker and the tracker of its tasks.
fn publish(port: u16, client_id: &str, n: u64) -> (Arc<AtomicU64>, TaskTracker) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let broker_acked = Arc::new(AtomicU64::new(0));
    let tracker = TaskTracker::new();
    {
        let broker_acked = broker_acked.clone();
        tracker.spawn(async move {
            while broker_acked.load(Ordering::Relaxed) < n {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        broker_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("publisher connection failed: {e}"),
                }
            }
        });
    }
    tracker.spawn(async move {
        for i in 0..n {
            client
                .publish(TOPIC, QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    (broker_acked, tracker)
}

fn stored_values(state: &Path) -> Vec<u64> {
    let buffer = Buffer::open(
        &state.join("buffer"),
        BufferOptions::with_max_bytes(1 << 30),
    )
    .unwrap();
    values(
        buffer
            .read_range(0, usize::MAX, u64::MAX)
            .unwrap()
            .into_iter()
            .map(|s| s.record),
    )
}

#[tokio::test]
async fn kill_9_while_messages_flow_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    // The broker keeps the agent's session (and queues for it) while the agent is dead.
    let broker = Mosquitto::start(
        dir.path(),
        "allow_anonymous true\nmax_queued_messages 100000",
    );
    let http_port = free_port();
    let cfg = write_config(dir.path(), broker.port, http_port);
    let log = dir.path().join("agent.log");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();

    let mut agent = start_agent(&cfg, &log);
    wait_connected(addr).await;

    let (broker_acked, tracker) = publish(broker.port, "kip-ack-publisher", MESSAGES);

    // Kill while messages flow, well inside the first 5 s flush interval.
    wait_until(Duration::from_secs(30), "200 readings", || async move {
        status(addr)
            .await
            .is_some_and(|s| s.sources[0].readings >= 200)
    })
    .await;
    agent.kill9();
    let at_kill = broker_acked.load(Ordering::Relaxed);
    assert!(at_kill < MESSAGES, "publishing must outlast the kill");

    // Same state directory, same client id: the broker resumes the session.
    let mut agent = start_agent(&cfg, &log);
    wait_until(
        Duration::from_secs(60),
        "the broker takes every message",
        || {
            let acked = broker_acked.load(Ordering::Relaxed);
            async move { acked >= MESSAGES }
        },
    )
    .await;
    tracker.close();
    tracker.wait().await;
    // Redelivered messages arrive quickly; lost ones never do (the disk check below says
    // which).
    let _ = kip_tests::eventually(Duration::from_secs(20), || async move {
        let Ok((200, body)) = local_get(addr, "/v1/buffer?records=1000").await else {
            return Err(());
        };
        let report: BufferReport = serde_json::from_str(&body).unwrap();
        if missing(&values(report.oldest.into_iter().map(|s| s.record))).is_empty() {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    // A clean stop: SIGTERM, and the agent exits by itself within the grace period.
    let code = tokio::task::spawn_blocking(move || {
        agent.terminate();
        agent.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(code.is_some_and(|c| c.success()), "{code:?}");

    // The assertion that counts: what is on disk after the crash and the clean stop.
    let stored = stored_values(&dir.path().join("state"));
    let lost = missing(&stored);
    assert!(
        lost.is_empty(),
        "{} of {MESSAGES} messages lost after kill -9 (killed after {at_kill} were published): \
         {lost:?}\nagent log:\n{}",
        lost.len(),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // At-least-once: duplicates are allowed, but only of messages in flight at the kill.
    let duplicates = stored.len() as u64 - MESSAGES;
    eprintln!(
        "{MESSAGES} messages, {} records, {duplicates} duplicates",
        stored.len()
    );
}

/// A clean stop (SIGTERM) while messages flow acknowledges every message it stored before it
/// disconnects, without waiting out `mqtt::SHUTDOWN_ACK_WAIT`: the flusher keeps serving the
/// writer until the writer is done. (It used to stop at the signal, so the acknowledgements of
/// the last messages never became due, the source gave up after 5 s and the broker
/// redelivered them: every stop of a busy agent, and every remote configuration change,
/// took 5 s more.)
#[tokio::test]
async fn a_stop_while_messages_flow_acknowledges_what_it_stored_before_it_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(
        dir.path(),
        "allow_anonymous true\nmax_queued_messages 100000",
    );
    let http_port = free_port();
    let cfg = write_config(dir.path(), broker.port, http_port);
    let log = dir.path().join("agent.log");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let agent = start_agent(&cfg, &log);
    wait_connected(addr).await;
    let (broker_acked, tracker) = publish(broker.port, "kip-stop-publisher", MESSAGES);
    wait_until(Duration::from_secs(30), "200 readings", || async move {
        status(addr)
            .await
            .is_some_and(|s| s.sources[0].readings >= 200)
    })
    .await;
    let code = tokio::task::spawn_blocking(move || {
        let mut agent = agent;
        agent.terminate();
        agent.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(
        broker_acked.load(Ordering::Relaxed) < MESSAGES,
        "publishing must outlast the stop"
    );
    assert!(code.is_some_and(|c| c.success()), "{code:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    for unsent in [
        "mqtt acknowledgements still pending at shutdown",
        "mqtt acknowledgements not sent",
        "mqtt messages left unacknowledged at shutdown",
    ] {
        assert!(!text.contains(unsent), "{unsent}:\n{text}");
    }

    // The rest arrives in the next run; every message is stored exactly once.
    let mut agent = start_agent(&cfg, &log);
    wait_until(
        Duration::from_secs(60),
        "the broker takes every message",
        || {
            let acked = broker_acked.load(Ordering::Relaxed);
            async move { acked >= MESSAGES }
        },
    )
    .await;
    tracker.close();
    tracker.wait().await;
    kip_tests::eventually(Duration::from_secs(30), || async move {
        let Ok((200, body)) = local_get(addr, "/v1/buffer?records=2000").await else {
            return Err(());
        };
        let report: BufferReport = serde_json::from_str(&body).unwrap();
        let seen = values(report.oldest.into_iter().map(|s| s.record));
        if missing(&seen).is_empty() {
            Ok(())
        } else {
            Err(())
        }
    })
    .await
    .unwrap();
    let code = tokio::task::spawn_blocking(move || {
        agent.terminate();
        agent.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(code.is_some_and(|c| c.success()), "{code:?}");
    let mut stored = stored_values(&dir.path().join("state"));
    stored.sort_unstable();
    assert_eq!(
        stored,
        (0..MESSAGES).collect::<Vec<_>>(),
        "each message once"
    );
}
