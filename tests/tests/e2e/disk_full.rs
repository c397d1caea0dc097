//! A full state volume (a 4 MiB tmpfs; mounting needs root, which the test command has): the
//! real `kip-agent` stays up, turns `/healthz` red and counts failed flushes, leaves the MQTT
//! messages it cannot store with the broker, and recovers by itself once space is back (the
//! supervisor reopens the buffer); afterwards the buffer opens cleanly and holds every message
//! exactly once per value.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kip_shared::Record;
use kip_tests::{
    ChildGroup, Mosquitto, free_port,
    volume::{Tmpfs, fill},
    wait_for_port, wait_until, workspace_binary,
};

/// Publishes values `range` as QoS 1 messages, one `mosquitto_pub -l` client.
fn publish_values(port: u16, range: std::ops::Range<u64>) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", "plant/press1/temp", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in range {
        writeln!(stdin, "{i}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    kip_agent::runtime::local_get(addr, path)
        .await
        .unwrap_or((0, String::new()))
}

async fn readings(port: u16) -> u64 {
    let (_, body) = get(port, "/v1/status").await;
    serde_json::from_str::<serde_json::Value>(&body).map_or(0, |v| {
        v["buffer"]["counts"]["reading"].as_u64().unwrap_or(0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_volume_keeps_the_agent_up_and_it_recovers_without_restart() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let _mount = Tmpfs::mount(&state, 4);
    // Mosquitto queues at most 1000 messages per client by default and drops the rest; the
    // messages held back during the outage must all stay with the broker.
    let broker = Mosquitto::start(
        work.path(),
        "allow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 100\n",
    );
    let http_port = free_port();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice = \"gw-1\"\nstate_dir = \"{}\"\n\
             [buffer]\nflush_interval_ms = 20\n\
             [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
             [log]\nfilter = \"warn\"\n\
             [[mqtt]]\nname = \"line\"\nurl = \"{}\"\nclient_id = \"kip-gw-1\"\n\
             [[mqtt.subscriptions]]\ntopic = \"plant/+/temp\"\nmachine_topic_level = 1\n\
             metric = \"temp\"\nvalue = {{ kind = \"number\" }}\n",
            state.display(),
            broker.url(false),
        ),
    )
    .unwrap();
    let mut agent = ChildGroup::spawn(
        Command::new(workspace_binary("kip-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    assert!(wait_for_port(http_port, Duration::from_secs(30)));
    // Connected is not yet subscribed: probe until a message arrives.
    const PROBE: u64 = 999_999;
    wait_until(Duration::from_secs(30), "subscribed", || async {
        publish_values(broker.port, PROBE..PROBE + 1);
        readings(http_port).await > 0
    })
    .await;
    let probes = readings(http_port).await;

    const BEFORE: u64 = 1_000;
    const DURING: u64 = 500;
    publish_values(broker.port, 0..BEFORE);
    wait_until(Duration::from_secs(60), "first readings stored", || async {
        readings(http_port).await >= probes + BEFORE
    })
    .await;

    // The volume fills up: the agent stays up, says so, and stores nothing more for now.
    let filler = state.join("filler");
    fill(&filler);
    publish_values(broker.port, BEFORE..BEFORE + DURING);
    wait_until(
        Duration::from_secs(30),
        "health flag and metric",
        || async {
            let (code, _) = get(http_port, "/healthz").await;
            let (_, metrics) = get(http_port, "/metrics").await;
            code == 503
                && metrics.lines().any(|l| {
                    l.starts_with("kip_agent_buffer_flush_failures_total ") && !l.ends_with(" 0")
                })
        },
    )
    .await;
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent exited on a full disk"
    );

    // Space comes back: the agent recovers on its own, and every message arrives.
    let freed = Instant::now();
    std::fs::remove_file(&filler).unwrap();
    wait_until(Duration::from_secs(90), "recovered", || async {
        get(http_port, "/healthz").await.0 == 200
            && readings(http_port).await >= probes + BEFORE + DURING
    })
    .await;
    eprintln!(
        "disk_full: recovered {:?} after space came back",
        freed.elapsed()
    );
    assert!(agent.try_wait().unwrap().is_none(), "the agent restarted");
    agent.terminate();
    drop(agent);

    // The buffer opens cleanly and holds every value (at least once: MQTT redelivers what
    // was not durable when the disk filled).
    let buffer = kip_tests::agent::open_buffer(&state.join("buffer"));
    let records = buffer.read_range(0, 1_000_000, u64::MAX).unwrap();
    let values: BTreeSet<u64> = records
        .iter()
        .filter_map(|s| match &s.record {
            Record::Reading(r) => Some(r.value as u64),
            _ => None,
        })
        .collect();
    let want: BTreeSet<u64> = (0..BEFORE + DURING).chain([PROBE]).collect();
    assert_eq!(
        values,
        want,
        "missing values: {:?}",
        want.difference(&values).take(10).collect::<Vec<_>>()
    );
    drop(buffer);
    drop(broker);
}
