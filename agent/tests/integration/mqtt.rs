//! The MQTT source against real Mosquitto brokers started by the tests.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "helpers of tests fail the test loudly"
)]

use std::time::Duration;

use kip_agent::{
    ack::{AckOutcome, Acknowledge},
    config::{Config, RawConfig},
    metrics::{IngestMetrics, SourceLabels, new_registry},
    mqtt::MqttSource,
    source::Envelope,
};
use kip_shared::Record;
use kip_tests::{BrokerPki, Mosquitto, mosquitto::publish, wait_until};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

fn config(url: &str, tls_lines: &str) -> Config {
    config_with(url, tls_lines, "")
}

/// `extra` goes into the `[[mqtt]]` section (e.g. `max_packet_size_bytes = 2048`).
fn config_with(url: &str, tls_lines: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[agent]
device = "gw-1"
state_dir = "/tmp/unused"

[[mqtt]]
name = "b1"
url = "{url}"
client_id = "kip-test-{port}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200
{tls_lines}
{extra}

[[mqtt.subscriptions]]
topic = "plant/+/temp"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}

[[mqtt.subscriptions]]
topic = "plant/json/+"
machine = "m-json"
metric_topic_level = 2
value = {{ kind = "json", pointer = "/v", timestamp_pointer = "/ts" }}
"#,
        port = url.rsplit(':').next().unwrap()
    );
    RawConfig::from_toml(&text, std::path::Path::new("test.toml"))
        .unwrap()
        .validate()
        .unwrap()
}

struct Running {
    rx: mpsc::Receiver<Envelope>,
    metrics: IngestMetrics,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    fn start(cfg: Config) -> Self {
        let mut registry = new_registry();
        let metrics = IngestMetrics::register(&mut registry);
        let (tx, rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let source = MqttSource::new(cfg.mqtt[0].clone(), metrics.clone());
        tracker.spawn(source.run(tx, cancel.clone()));
        Self {
            rx,
            metrics,
            cancel,
            tracker,
        }
    }

    /// Publishes `payload` until a record arrives (the source may still be subscribing);
    /// returns that record.
    async fn publish_until_received(
        &mut self,
        port: u16,
        topic: &str,
        payload: &[u8],
        tls: Option<&BrokerPki>,
    ) -> Record {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            publish(port, topic, payload, tls);
            match tokio::time::timeout(Duration::from_millis(300), self.recv()).await {
                Ok(Some(Record::Gap(_))) | Err(_) => {}
                Ok(Some(r)) => return r,
                Ok(None) => panic!("source stopped"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no record arrived for {topic}"
            );
        }
    }

    /// The next record; its message is acknowledged at once (no buffer here).
    async fn recv(&mut self) -> Option<Record> {
        let Envelope { record, ack, .. } = self.rx.recv().await?;
        if let Some(token) = ack {
            assert_eq!(token.try_ack(), AckOutcome::Sent);
        }
        Some(record)
    }

    async fn next(&mut self) -> Record {
        tokio::time::timeout(Duration::from_secs(10), self.recv())
            .await
            .expect("a record within 10 s")
            .expect("source running")
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .expect("source stops on cancel");
    }

    fn count(&self, f: impl Fn(&IngestMetrics, &SourceLabels) -> u64) -> u64 {
        f(
            &self.metrics,
            &SourceLabels {
                source: "b1".into(),
            },
        )
    }
}

#[tokio::test]
async fn readings_and_dead_letters_flow_and_the_source_survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let port = broker.port;
    let mut run = Running::start(config(&format!("mqtt://127.0.0.1:{port}"), ""));

    let Record::Reading(r) = run
        .publish_until_received(port, "plant/press1/temp", b"21.5", None)
        .await
    else {
        panic!("expected a reading")
    };
    assert_eq!((r.source.as_str(), r.machine.as_str()), ("b1", "press1"));
    assert_eq!((r.metric.as_str(), r.value), ("temperature", 21.5));

    // A poison message becomes a dead letter, and the next message still flows.
    publish(port, "plant/press1/temp", b"twenty-one", None);
    let Record::DeadLetter(d) = run.next().await else {
        panic!("expected a dead letter")
    };
    assert_eq!(d.origin, "plant/press1/temp");
    assert_eq!(d.payload_prefix, b"twenty-one");
    assert!(d.reason.contains("not a number"), "{}", d.reason);
    publish(port, "plant/json/power", br#"{"x": 1}"#, None);
    let Record::DeadLetter(d) = run.next().await else {
        panic!("expected a dead letter")
    };
    assert!(
        d.reason.contains("no value at JSON pointer"),
        "{}",
        d.reason
    );
    publish(
        port,
        "plant/json/power",
        br#"{"v": 7.25, "ts": "2026-03-01T12:00:00Z"}"#,
        None,
    );
    let Record::Reading(r) = run.next().await else {
        panic!("expected a reading")
    };
    assert_eq!(
        (r.machine.as_str(), r.metric.as_str(), r.value),
        ("m-json", "power", 7.25)
    );
    assert_eq!(r.ts.to_rfc3339(), "2026-03-01T12:00:00+00:00");
    assert_eq!(run.count(|m, l| m.dead_letters.get_or_create(l).get()), 2);

    // Broker restart without persistence: the session is gone, so readings only come back
    // if the source reconnects and subscribes again.
    broker.restart();
    let Record::Reading(r) = run
        .publish_until_received(port, "plant/press2/temp", b"30", None)
        .await
    else {
        panic!("expected a reading")
    };
    assert_eq!((r.machine.as_str(), r.value), ("press2", 30.0));
    assert!(run.count(|m, l| m.reconnects.get_or_create(l).get()) >= 1);
    assert_eq!(
        run.count(|m, l| m.connected.get_or_create(l).get() as u64),
        1
    );
    run.stop().await;
}

#[tokio::test]
async fn a_disconnect_is_recorded_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let port = broker.port;
    let mut run = Running::start(config(&format!("mqtt://127.0.0.1:{port}"), ""));
    run.publish_until_received(port, "plant/a/temp", b"1", None)
        .await;
    broker.restart();
    let Record::Gap(gap) = run.next().await else {
        panic!("expected a gap after the reconnect")
    };
    assert_eq!(gap.source, "b1");
    assert!(gap.from <= gap.to);
    assert!(
        gap.reason.contains("mqtt connection lost"),
        "{}",
        gap.reason
    );
    run.stop().await;
}

#[tokio::test]
async fn tls_with_a_client_certificate_delivers_readings() {
    let dir = tempfile::tempdir().unwrap();
    let pki = BrokerPki::generate(dir.path());
    let broker = Mosquitto::start(dir.path(), &pki.listener_conf());
    let port = broker.port;
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let mut run = Running::start(config(&format!("mqtts://127.0.0.1:{port}"), &tls));
    let Record::Reading(r) = run
        .publish_until_received(port, "plant/press9/temp", b"42", Some(&pki))
        .await
    else {
        panic!("expected a reading")
    };
    assert_eq!((r.machine.as_str(), r.value), ("press9", 42.0));
    run.stop().await;
}

#[tokio::test]
async fn tls_with_a_certificate_from_another_ca_never_counts_as_connected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = BrokerPki::generate(dir.path());
    let broker = Mosquitto::start(dir.path(), &pki.listener_conf());
    let tls = format!(
        "ca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        pki.ca.display(),
        pki.rogue_cert.display(),
        pki.rogue_key.display()
    );
    let mut run = Running::start(config(&format!("mqtts://127.0.0.1:{}", broker.port), &tls));
    // The refused handshake is retried with backoff; wait for a few attempts.
    let reconnects = |run: &Running| run.count(|m, l| m.reconnects.get_or_create(l).get());
    wait_until(Duration::from_secs(20), "3 reconnect attempts", || {
        let n = reconnects(&run);
        async move { n >= 3 }
    })
    .await;
    assert_eq!(
        run.count(|m, l| m.connected.get_or_create(l).get() as u64),
        0
    );
    publish(broker.port, "plant/x/temp", b"1", Some(&pki));
    // The source had its chance to receive the message: it tried to connect twice more.
    let after_publish = reconnects(&run);
    wait_until(Duration::from_secs(20), "2 more reconnect attempts", || {
        let n = reconnects(&run);
        async move { n >= after_publish + 2 }
    })
    .await;
    assert!(
        run.rx.try_recv().is_err(),
        "nothing may arrive over a refused connection"
    );
    run.stop().await;
}

#[tokio::test]
async fn messages_whose_tokens_never_fired_are_redelivered_to_the_next_session() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let port = broker.port;
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut run = Running::start(config(&url, ""));
    run.publish_until_received(port, "plant/a/temp", b"0", None)
        .await;
    for i in 1..=8 {
        publish(port, "plant/a/temp", i.to_string().as_bytes(), None);
    }
    // Received but never acknowledged (as if the agent died before the flush).
    let mut values = Vec::new();
    for _ in 0..8 {
        let Envelope { record, ack, .. } =
            tokio::time::timeout(Duration::from_secs(10), run.rx.recv())
                .await
                .unwrap()
                .unwrap();
        assert!(ack.is_some(), "QoS 1 messages carry a token");
        let Record::Reading(r) = record else {
            panic!("expected a reading")
        };
        values.push(r.value);
    }
    assert_eq!(values, (1..=8).map(f64::from).collect::<Vec<_>>());
    run.stop().await;

    // Same client id, persistent session: the broker sends them again; now they are acked.
    let mut run = Running::start(config(&url, ""));
    let mut again = Vec::new();
    for _ in 0..8 {
        let Record::Reading(r) = run.next().await else {
            panic!("expected a reading")
        };
        again.push(r.value);
    }
    again.sort_by(f64::total_cmp);
    assert_eq!(again, values);
    run.stop().await;
}

#[tokio::test]
async fn oversized_messages_become_dead_letters_and_the_source_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let port = broker.port;
    let mut run = Running::start(config_with(
        &format!("mqtt://127.0.0.1:{port}"),
        "",
        "max_packet_size_bytes = 4096",
    ));
    run.publish_until_received(port, "plant/a/temp", b"1", None)
        .await;
    // Below the limit (padded number): a reading. Above it, within rumqttc's read limit
    // (twice the configured one): a dead letter on the same connection. Far above: one
    // reconnect with a larger read limit, then a dead letter. After each, the stream goes on.
    let mut padded = b"2".to_vec();
    padded.resize(3000, b' ');
    let cases: [(Vec<u8>, bool); 3] = [
        (padded, false),
        (vec![b'x'; 6000], true),
        (vec![b'y'; 100_000], true),
    ];
    for (i, (payload, oversized)) in cases.into_iter().enumerate() {
        publish(port, "plant/a/temp", &payload, None);
        let mut got = run.next().await;
        if let Record::Gap(_) = got {
            got = run.next().await;
        }
        match (got, oversized) {
            (Record::Reading(r), false) => assert_eq!(r.value, 2.0),
            (Record::DeadLetter(d), true) => {
                assert_eq!(d.origin, "plant/a/temp");
                assert!(
                    d.reason.contains("exceeds max_packet_size_bytes (4096)"),
                    "{}",
                    d.reason
                );
                let size: usize = d.reason.split(' ').nth(2).unwrap().parse().unwrap();
                assert!(size > payload.len(), "{}", d.reason);
            }
            (other, _) => panic!("case {i}: unexpected {other:?}"),
        }
        publish(port, "plant/a/temp", b"3", None);
        let mut next = run.next().await;
        if let Record::Gap(_) = next {
            next = run.next().await;
        }
        assert!(
            matches!(next, Record::Reading(r) if r.value == 3.0),
            "case {i}"
        );
    }
    assert_eq!(run.count(|m, l| m.mqtt_oversized.get_or_create(l).get()), 2);
    // Only the far larger message cost a reconnect.
    assert_eq!(run.count(|m, l| m.reconnects.get_or_create(l).get()), 1);
    run.stop().await;
}

#[tokio::test]
async fn a_full_staging_defers_messages_to_the_broker_and_fetches_them_after_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true\nmax_queued_messages 0");
    let port = broker.port;
    // Channel of 64 (Running) and staging of 100: a burst of 1,000 with nobody reading
    // overflows both, yet the source keeps its connection and every message arrives.
    let mut run = Running::start(config_with(
        &format!("mqtt://127.0.0.1:{port}"),
        "",
        "staging_capacity_messages = 100",
    ));
    run.publish_until_received(port, "plant/a/temp", b"0", None)
        .await;
    publish_many(port, "plant/a/temp", 1..=1000).await;
    // Each acknowledgement lets Mosquitto 2.0.11 send a window of 20 more: a few are enough
    // to overflow staging and channel.
    for _ in 0..20 {
        run.next().await;
    }
    // Let the source read what the broker pushes (nobody drains the channel meanwhile).
    wait_until(Duration::from_secs(20), "a deferred message", || {
        let n = run.count(|m, l| m.mqtt_deferred.get_or_create(l).get());
        async move { n > 0 }
    })
    .await;
    let mut seen: std::collections::BTreeSet<u64> = (1..=20).collect();
    while seen.len() < 1000 {
        match run.next().await {
            Record::Reading(r) => {
                seen.insert(r.value as u64);
            }
            Record::Gap(g) => panic!("a deferral reconnect is not a gap: {g:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen.iter().next(), Some(&1));
    assert_eq!(seen.iter().last(), Some(&1000));
    assert_eq!(run.count(|m, l| m.reconnects.get_or_create(l).get()), 0);
    run.stop().await;
}

/// Publishes `values` as QoS 1 messages from one rumqttc client; returns once the broker
/// acknowledged every one.
async fn publish_many(port: u16, topic: &str, values: std::ops::RangeInclusive<u64>) {
    let mut opts = rumqttc::MqttOptions::new("test-pub", "127.0.0.1", port);
    opts.set_inflight(100);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let n = values.clone().count();
    let tracker = TaskTracker::new();
    let poller = tracker.spawn(async move {
        let mut acks = 0;
        while acks < n {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                eventloop.poll().await.unwrap()
            {
                acks += 1;
            }
        }
    });
    for v in values {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, v.to_string())
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), poller)
        .await
        .unwrap()
        .unwrap();
}
