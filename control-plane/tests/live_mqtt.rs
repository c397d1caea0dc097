//! The control plane's live-query MQTT client against a real Mosquitto: hostile messages on
//! its answer topic (issue 13 hole 7, issue 19) are dropped and counted, never a reconnect.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::time::Duration;

use chrono::Utc;
use kip_control_plane::llm::{
    config::LlmConfig,
    live::LiveClient,
    metrics::{LiveOutcome, LlmMetrics},
};
use kip_shared::live::{
    LIVE_PROTOCOL_VERSION, LiveRequest, LiveResponse, MAX_RESPONSE_BYTES, reply_topic,
    request_topic,
};
use kip_tests::{Mosquitto, mosquitto::publish_retained, wait_until};
use prometheus_client::registry::Registry;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

fn dropped(m: &LlmMetrics, outcome: &'static str) -> u64 {
    m.live_responses_dropped
        .get_or_create(&LiveOutcome { outcome })
        .get()
}

#[tokio::test]
async fn hostile_messages_on_the_answer_topic_are_dropped_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(dir.path());
    let org = Uuid::new_v4();
    let instance = "cp-live-test";
    let answers = reply_topic("kip/v1", org, instance);

    // Retained junk on the answer topic before the client exists: one far above any limit,
    // one above rumqttc's old 10 KiB default. A retained message reaches every new
    // subscription, so a client that reconnects on it flaps for ever.
    publish_retained(broker.port, &answers, &vec![b'x'; 2 * 1024 * 1024]);
    publish_retained(
        broker.port,
        &reply_topic("kip/v1", Uuid::new_v4(), instance),
        &vec![b'{'; 20 * 1024],
    );

    let cfg = LlmConfig::from_toml(
        &format!(
            "[providers.aleph]\nkind = \"aleph\"\nmodels = [\"aleph\"]\n\
             [providers.aleph.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"{instance}\"\n\
             request_timeout_ms = 10000\n",
            broker.port
        ),
        |_| None,
    )
    .unwrap();
    let metrics = LlmMetrics::register(&mut Registry::default());
    let client = LiveClient::new(
        cfg.providers["aleph"].mqtt.clone().unwrap(),
        metrics.clone(),
    );
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(client.clone().run(cancel.clone()));
    wait_until(
        Duration::from_secs(20),
        "the live client subscribed",
        || {
            let c = client.clone();
            async move { c.connected() }
        },
    )
    .await;

    // An agent of `org`: before its real answer it (or a hostile site) sends junk on the
    // answer topic: a message too large for the client's maximum packet size (the broker
    // must drop it), one just above the largest valid answer (arrives, dropped as
    // oversized) and one that is not JSON (dropped as malformed).
    let mut opts = MqttOptions::new("fake-agent", "127.0.0.1", broker.port);
    opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    let (agent, mut events) = AsyncClient::new(opts, 16);
    agent
        .subscribe(request_topic("kip/v1", org, "gw-1"), QoS::AtLeastOnce)
        .await
        .unwrap();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    let stop = cancel.clone();
    tasks.spawn(async move {
        loop {
            let ev = tokio::select! {
                () = stop.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let req = LiveRequest::decode(&p.payload).unwrap();
                    let reply = req.reply_to.clone();
                    for junk in [
                        vec![b'x'; 1024 * 1024],
                        vec![b' '; MAX_RESPONSE_BYTES + 100],
                        b"not json".to_vec(),
                    ] {
                        agent
                            .publish(&reply, QoS::AtLeastOnce, false, junk)
                            .await
                            .unwrap();
                    }
                    let answer = LiveResponse {
                        v: LIVE_PROTOCOL_VERSION,
                        request_id: req.request_id,
                        org_id: req.org_id,
                        device: req.device.clone(),
                        agent_time: Utc::now(),
                        values: vec![],
                        predictions: vec![],
                        truncated: false,
                    };
                    agent
                        .publish(&reply, QoS::AtLeastOnce, false, answer.encode())
                        .await
                        .unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("fake agent: {e}"),
            }
        }
    });

    tokio::time::timeout(Duration::from_secs(20), subscribed)
        .await
        .expect("the fake agent subscribed")
        .unwrap();
    let resp = client.ask(org, "gw-1").await.unwrap_or_else(|e| {
        panic!(
            "the valid answer did not arrive ({e}); connections {}, malformed {}, \
                 oversized {}",
            metrics.live_connections.get(),
            dropped(&metrics, "malformed"),
            dropped(&metrics, "oversized")
        )
    });
    assert_eq!((resp.org_id, resp.device.as_str()), (org, "gw-1"));
    // Same publisher, same topic, QoS 1: the junk was handled before the answer.
    assert_eq!(dropped(&metrics, "malformed"), 1);
    assert_eq!(dropped(&metrics, "oversized"), 1);
    assert_eq!(
        metrics.live_connections.get(),
        1,
        "the client never reconnected"
    );
    assert!(client.connected());

    cancel.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .expect("the client and the fake agent stop on cancel");
}
