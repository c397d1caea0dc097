//! MQTT ingest throughput with acknowledgements sent only after the buffer flushed: a private
//! Mosquitto (default `max_inflight_messages` 20), the agent runtime in-process, one QoS 1
//! publisher as fast as the broker takes it. Prints messages/s per
//! `buffer.ack_flush_threshold_records`.
//! Run: `cargo bench -p kip-agent --bench mqtt_ack` (needs `mosquitto` on the PATH).
//!
//! Observed with Mosquitto 2.0.11: the broker did not hold its deliveries to this (rumqttc)
//! client at `max_inflight_messages` (30 unacknowledged deliveries with the default 20, where a
//! stopped `mosquitto_sub` got 20), so these figures show the cost of the early flushes, not
//! the in-flight cap; `crate::ack`'s unit tests cover the flush policy the cap needs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "bench binary"
)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kip_agent::{config::RawConfig, runtime};
use kip_tests::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const MESSAGES: u64 = 20_000;

async fn run(broker_port: u16, threshold: usize, flush_interval_ms: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
[agent]
device = "gw-bench"
state_dir = "{state}"

[buffer]
flush_interval_ms = {flush_interval_ms}
ack_flush_threshold_records = {threshold}

[http]
listen_addr = "127.0.0.1:0"

[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "kip-bench-{threshold}-{flush_interval_ms}"

[[mqtt.subscriptions]]
topic = "plant/+/temp"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}
"#,
        state = dir.path().join("state").display()
    );
    let cfg = RawConfig::from_toml(&text, std::path::Path::new("bench.toml"))
        .unwrap()
        .validate()
        .unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg, cancel.clone()).await.unwrap();
    let buffer = agent.buffer.clone();
    // Subscribed once the first probe message is stored.
    let mut probe = MqttOptions::new(format!("probe-{threshold}"), "127.0.0.1", broker_port);
    probe.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(probe, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let tracker = TaskTracker::new();
    {
        let acked = acked.clone();
        tracker.spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    while buffer.stats().unwrap().counts.reading == 0 {
        client
            .publish("plant/probe/temp", QoS::AtLeastOnce, false, "0")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = buffer.stats().unwrap().counts.reading;
    let start = Instant::now();
    {
        let client = client.clone();
        tracker.spawn(async move {
            for i in 0..MESSAGES {
                client
                    .publish("plant/m1/temp", QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .unwrap();
            }
        });
    }
    // Done when every message is stored and durable (hence acknowledged).
    loop {
        let s = buffer.stats().unwrap();
        if s.counts.reading >= base + MESSAGES && s.durable_seq + 1 >= s.next_seq {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "bench stalled: {} of {MESSAGES} stored, durable {} of {}, broker acked {} publishes",
            s.counts.reading - base,
            s.durable_seq,
            s.next_seq - 1,
            acked.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = MESSAGES as f64 / start.elapsed().as_secs_f64();
    client.disconnect().await.unwrap();
    tracker.close();
    tracker.wait().await;
    cancel.cancel();
    agent.wait().await;
    rate
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Mosquitto's max_inflight_messages stays at its default (20); the queue behind it must hold
    // the whole run, or the broker drops what the publisher sends faster than the agent takes.
    let broker = Mosquitto::start(
        dir.path(),
        "allow_anonymous true\nmax_queued_messages 1000000",
    );
    rt.block_on(async {
        for (threshold, flush_ms) in [(1, 200), (10, 200), (20, 200), (10_000, 200), (10, 5000)] {
            let rate = run(broker.port, threshold, flush_ms).await;
            println!(
                "ack_flush_threshold_records = {threshold:>5}, flush_interval_ms = {flush_ms:>4}: \
                 {rate:>8.0} messages/s ({MESSAGES} QoS 1 messages, acked after flush)"
            );
        }
    });
}
