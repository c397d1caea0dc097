//! Draining a broker-side backlog (issue #19): a private Mosquitto holds `BACKLOG` queued QoS 1
//! messages for a persistent session; how fast does the agent (default configuration,
//! in-process runtime) get them into its buffer, next to Mosquitto's own delivery rate to a
//! plain subscriber (`mosquitto_sub`) in the same run?
//!
//! It also measures on the wire what the broker sends to a client that acknowledges only its
//! first k messages (k = 0, 1, 20, 200), for MQTT 3.1.1 (Mosquitto's `max_inflight_messages`
//! 20 applies) and MQTT 5 with Receive Maximum 20. Seen with Mosquitto 2.0.11: 20 + 20 k in
//! both cases, i.e. every PUBACK lets a whole window of 20 more out instead of one, so the
//! unacknowledged messages grow by 19 per acknowledgement up to everything queued. That is
//! why the agent does not rely on the in-flight limit (see `crate::mqtt`).
//!
//! Run: `cargo bench -p kip-agent --bench mqtt_backlog` (needs `mosquitto` and
//! `mosquitto-clients`); about a minute on a 2-core machine.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "bench binary"
)]

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kip_agent::{config::RawConfig, runtime};
use kip_tests::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const BACKLOG: u64 = 200_000;
const TOPIC: &str = "plant/m1/temp";

/// Publishes `n` QoS 1 messages and returns once the broker acknowledged every one.
async fn publish(port: u16, n: u64) {
    let mut opts = MqttOptions::new("bench-pub", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let acks = Arc::new(AtomicU64::new(0));
    let a = acks.clone();
    let tracker = tokio_util::task::TaskTracker::new();
    let poller = tracker.spawn(async move {
        while a.load(Ordering::Relaxed) < n {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("publisher: {e}"),
            }
        }
        eventloop
    });
    for i in 0..n {
        client
            .publish(TOPIC, QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut eventloop = poller.await.unwrap();
    client.try_disconnect().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// Creates the persistent session `id` (subscribed to the topic) and leaves.
fn mosquitto_session(port: u16, id: &str) {
    let ok = kip_tests::mosquitto::mosquitto_sub(port, TOPIC, Some(id))
        .arg("-E")
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Seconds `mosquitto_sub` (persistent session `id`) takes to receive `n` queued messages.
fn mosquitto_sub_drain(port: u16, id: &str, n: u64) -> f64 {
    let start = Instant::now();
    let ok = kip_tests::mosquitto::mosquitto_sub(port, TOPIC, Some(id))
        .args(["-C", &n.to_string(), "-W", "120"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "mosquitto_sub did not get {n} messages");
    start.elapsed().as_secs_f64()
}

/// PUBLISH packets an MQTT 3.1.1 client receives within `window` after resuming a session
/// with a backlog, when it acknowledges only the first `acks` of them.
async fn unacked_v4(port: u16, id: &str, window: Duration, acks: u64) -> u64 {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let mut n = 0;
    let until = tokio::time::Instant::now() + window;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return n,
            ev = eventloop.poll() => if let Event::Incoming(Packet::Publish(p)) = ev.unwrap() {
                n += 1;
                if n <= acks {
                    client.try_ack(&p).unwrap();
                }
            },
        }
    }
}

/// The same with MQTT 5 and Receive Maximum 20.
async fn unacked_v5(port: u16, id: &str, window: Duration, subscribe: bool, acks: u64) -> u64 {
    use rumqttc::v5::{self, mqttbytes::v5::Packet as P5};
    let mut opts = v5::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    opts.set_manual_acks(true);
    opts.set_receive_maximum(Some(20));
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = v5::AsyncClient::new(opts, 1000);
    let mut n = 0;
    let until = tokio::time::Instant::now() + window;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return n,
            ev = eventloop.poll() => match ev.unwrap() {
                v5::Event::Incoming(P5::ConnAck(_)) if subscribe => {
                    client.try_subscribe(TOPIC, v5::mqttbytes::QoS::AtLeastOnce).unwrap();
                }
                v5::Event::Incoming(P5::SubAck(_)) if subscribe => return 0,
                v5::Event::Incoming(P5::Publish(p)) => {
                    n += 1;
                    if n <= acks {
                        client.try_ack(&p).unwrap();
                    }
                }
                _ => {}
            },
        }
    }
}

/// Seconds the agent (default configuration) takes from start to `n` readings durable in its
/// buffer, with `n` messages queued for its session.
async fn agent_drain(port: u16, n: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[agent]\ndevice = \"gw-bench\"\nstate_dir = \"{}\"\n[http]\nlisten_addr = \"127.0.0.1:0\"\n\
         [log]\nfilter = \"warn\"\n\
         [[mqtt]]\nname = \"b1\"\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"kip-bench\"\n\
         [[mqtt.subscriptions]]\ntopic = \"{TOPIC}\"\nmachine = \"m1\"\nmetric = \"temp\"\n\
         value = {{ kind = \"number\" }}\n",
        dir.path().join("state").display()
    );
    let cfg = |t: &str| {
        RawConfig::from_toml(t, std::path::Path::new("bench.toml"))
            .unwrap()
            .validate()
            .unwrap()
    };
    // First run: the persistent session exists (subscribed), then the agent stops.
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg(&text), cancel.clone()).await.unwrap();
    let status = |addr| async move {
        let (_, body) = runtime::local_get(addr, "/v1/status").await.unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    while status(agent.http_addr).await["sources"][0]["connected"] != true {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    agent.wait().await;
    publish(port, n).await;

    let cancel = CancellationToken::new();
    let start = Instant::now();
    let agent = runtime::start(cfg(&text), cancel.clone()).await.unwrap();
    loop {
        let s = agent.buffer.stats().unwrap();
        if s.counts.reading >= n && s.durable_seq + 1 >= s.next_seq {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "stalled at {} of {n}",
            s.counts.reading
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    cancel.cancel();
    agent.wait().await;
    secs
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Default in-flight settings; no queue limit so the backlog is kept whole.
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let port = broker.port;
    rt.block_on(async {
        // On the wire: what arrives without a single PUBACK.
        for acks in [0, 1, 20, 200] {
            let (v4_id, v5_id) = (format!("wire-v4-{acks}"), format!("wire-v5-{acks}"));
            mosquitto_session(port, &v4_id);
            unacked_v5(port, &v5_id, Duration::from_secs(2), true, 0).await;
            publish(port, 10_000).await;
            let v4 = unacked_v4(port, &v4_id, Duration::from_secs(3), acks).await;
            let v5 = unacked_v5(port, &v5_id, Duration::from_secs(3), false, acks).await;
            println!(
                "PUBLISH received in 3 s, 10,000 queued, client acknowledges the first {acks}: \
                 MQTT 3.1.1 {v4} (max_inflight_messages 20), MQTT 5 Receive Maximum 20: {v5}"
            );
        }

        mosquitto_session(port, "plain");
        publish(port, BACKLOG).await;
        let plain = mosquitto_sub_drain(port, "plain", BACKLOG);
        println!(
            "mosquitto_sub (QoS 1, persistent session): {BACKLOG} queued messages in {plain:.2} s \
             = {:.0} messages/s",
            BACKLOG as f64 / plain
        );
        let agent = agent_drain(port, BACKLOG).await;
        println!(
            "kip-agent (default config, durable + acknowledged): {BACKLOG} queued messages in \
             {agent:.2} s = {:.0} messages/s",
            BACKLOG as f64 / agent
        );
    });
}
