//! OPC UA under backpressure (issue #19, "same discipline for OPC UA"): the kit's in-process
//! [`OpcUaServer`], the agent's [`OpcUaSource`] writing into a one-record channel that the test
//! stops reading (a writer stalled behind a full buffer).
//!
//! The source must keep its session and subscription alive while the writer applies
//! backpressure (its event loop polled, publish responses taken), drop what does not fit into its
//! bounded queue, and then write one gap record stating what was lost: how many notifications,
//! of which metrics, between which times. Before #19 it stopped polling the session while its
//! queue was full, so the subscription timed out and the source reconnected.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::time::{Duration, Instant};

use kip_agent::{
    opcua::{OpcUaEndpointConfig, OpcUaNodeConfig, OpcUaSecurityPolicy, OpcUaSource},
    source::Envelope,
};
use kip_shared::{Gap, Record};
use kip_tests::OpcUaServer;
use opcua::types::Variant;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Bulk nodes changed together: one round is 500 notifications, so a few rounds overflow the
/// source's queue (4,000 notifications).
const BULK: usize = 500;
/// How long the writer stalls: longer than the subscription's lifetime (30 publishing intervals
/// of 100 ms) and than the source's watchdog (10 s without a publish response).
const STALL: Duration = Duration::from_secs(12);
/// Limit for each phase that waits for records.
const WAIT: Duration = Duration::from_secs(60);

/// Receives envelopes until `done` holds for the records received so far; returns them.
async fn until(
    rx: &mut mpsc::Receiver<Envelope>,
    seen: &mut Vec<Record>,
    what: &str,
    done: impl Fn(&[Record]) -> bool,
) {
    let res = tokio::time::timeout(WAIT, async {
        while !done(seen) {
            seen.push(rx.recv().await.expect("source stopped").record);
        }
    })
    .await;
    assert!(
        res.is_ok(),
        "timed out waiting for {what}; {} records, gaps: {:?}",
        seen.len(),
        gaps(seen)
    );
}

fn gaps(seen: &[Record]) -> Vec<&Gap> {
    seen.iter()
        .filter_map(|r| match r {
            Record::Gap(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn readings(seen: &[Record]) -> usize {
    seen.iter()
        .filter(|r| matches!(r, Record::Reading(_)))
        .count()
}

/// `name{source="plc1"} <value>` from a Prometheus text exposition (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{source=\"plc1\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_keeps_the_session_alive_and_a_gap_states_what_was_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &dir.path().join("server"), 1.0).await;
    server.add_bulk(BULK);
    let ns = server.namespace();
    let node = |name: &str, metric: &str| OpcUaNodeConfig {
        node_id: format!("ns={ns};s=Machine1.{name}"),
        machine: "press1".into(),
        metric: metric.into(),
        sampling_interval_ms: Some(50),
    };
    let mut nodes: Vec<_> = (0..BULK)
        .map(|i| node(&format!("Bulk{i}"), &format!("bulk{i}")))
        .collect();
    nodes.push(node("Temp", "temp"));
    let cfg = OpcUaEndpointConfig {
        name: "plc1".into(),
        url: format!("opc.tcp://127.0.0.1:{port}/"),
        security_policy: OpcUaSecurityPolicy::None,
        pki_dir: dir.path().join("agent"),
        application_uri: Some("urn:kip:test:agent".into()),
        trust_server_certs: vec![],
        publishing_interval_ms: 100,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        reconnect_probe_interval_ms: 0,
        failover_urls: Vec::new(),
        nodes,
        user_identity: Default::default(),
    };
    cfg.validate().unwrap();
    let mut registry = Registry::default();
    let source = OpcUaSource::new(cfg, &mut registry);
    // The writer's channel holds one record: once the test stops reading, the source meets
    // backpressure at once.
    let (tx, mut rx) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(source.run(tx, cancel.clone()));
    tracker.close();
    let metrics = || {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    };

    // 1. Every node's initial value arrives.
    let mut seen = Vec::new();
    until(&mut rx, &mut seen, "the initial values", |s| {
        readings(s) > BULK
    })
    .await;

    // 2. The writer stalls (nothing read) while every bulk value changes five times a second:
    //    far more notifications than the source's queue holds.
    let stalled_at = chrono::Utc::now();
    let end = Instant::now() + STALL;
    let mut round = 0;
    while Instant::now() < end {
        round += 1;
        for i in 0..BULK {
            server.set(
                &format!("Bulk{i}"),
                Variant::Double((round * 10_000 + i) as f64),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resumed_at = chrono::Utc::now();

    // 3. The writer resumes: the queued values, then one gap stating what was dropped.
    until(
        &mut rx,
        &mut seen,
        "a gap for the dropped notifications",
        |s| {
            gaps(s)
                .iter()
                .any(|g| g.reason.contains("notifications dropped"))
        },
    )
    .await;
    // A value set now flows through the same session.
    server.set("Temp", Variant::Double(-42.0));
    until(&mut rx, &mut seen, "a value set after the stall", |s| {
        s.iter()
            .any(|r| matches!(r, Record::Reading(x) if x.metric == "temp" && x.value == -42.0))
    })
    .await;

    let m = metrics();
    let gaps = gaps(&seen);
    // The session stayed up: no reconnect, no gap for a lost session or subscription.
    assert_eq!(
        metric(&m, "kip_opcua_reconnects_total"),
        0,
        "{gaps:#?}\n{m}"
    );
    assert!(
        gaps.iter()
            .all(|g| g.reason.contains("notifications dropped")),
        "only backpressure gaps: {gaps:#?}"
    );
    assert_eq!(metric(&m, "kip_opcua_connected"), 1, "{m}");
    // The gaps account for every dropped notification, within the stall, naming the metrics.
    let dropped = metric(&m, "kip_opcua_notifications_dropped_total");
    assert!(dropped > 0, "the stall overflowed the queue: {m}");
    let stated: u64 = gaps
        .iter()
        .map(|g| {
            g.reason
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("gap reason starts with the count: {}", g.reason))
        })
        .sum();
    assert_eq!(stated, dropped, "{gaps:#?}");
    for g in &gaps {
        assert!(
            g.from >= stalled_at - chrono::Duration::seconds(1) && g.from <= resumed_at,
            "the gap starts during the stall: {g:?}"
        );
        assert!(g.to >= g.from, "{g:?}");
        assert!(
            g.reason.contains("may be lost") && g.reason.contains("bulk"),
            "the gap says what could be lost: {}",
            g.reason
        );
    }

    cancel.cancel();
    tokio::time::timeout(WAIT, tracker.wait())
        .await
        .expect("the source stops on cancel");
    server.stop().await;
}
