//! Fleet health end to end (issue #16): the real sync loop with its health collector against
//! the in-process control plane (real PostgreSQL, the mTLS agent listener): an idle agent's
//! heartbeat makes it ONLINE with a full report (buffer, disk, certificate, clock offset), a
//! stopped agent turns STALE then OFFLINE within the configured windows, the fleet metrics
//! follow, and another organisation sees none of it. The same with the real binaries, kipctl,
//! the console and a real Prometheus firing the alerts: `health_alerts`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{sync::Arc, time::Duration};

use kip_agent::{
    health::{HealthCollector, SourceClock},
    metrics::IngestMetrics,
    sync::Syncer,
};
use kip_tests::{
    agent::{open_buffer, reading, sync_config},
    control_plane::start_with,
    eventually,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// `kipctl --org ORG device health ARGS` in-process; its output.
async fn kipctl_health(
    cp: &kip_tests::control_plane::ControlPlane,
    org: uuid::Uuid,
    args: &[&str],
) -> String {
    let key_file = cp.dir.path().join("kipctl.key");
    std::fs::write(&key_file, &cp.admin_key).unwrap();
    let mut argv: Vec<String> = ["kipctl", "--server", &cp.admin_url, "--api-key-file"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    argv.push(key_file.to_str().unwrap().to_owned());
    argv.extend([
        "--org".to_owned(),
        org.to_string(),
        "device".into(),
        "health".into(),
    ]);
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let cli = <kipctl::Cli as clap::Parser>::try_parse_from(argv).unwrap();
    let mut out = Vec::new();
    kipctl::run(cli, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

async fn get(cp: &kip_tests::control_plane::ControlPlane, key: &str, path: &str) -> (u16, Value) {
    let r = cp
        .http
        .get(format!("{}{path}", cp.admin_url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn heartbeats_make_a_device_online_and_silence_makes_it_offline(pool: PgPool) {
    let cp = start_with(pool.clone(), None, |c| {
        c.health.stale_after = Duration::from_secs(2);
        c.health.offline_after = Duration::from_secs(4);
        c.health.metrics_refresh = Duration::from_millis(200);
    })
    .await;
    let org = cp.create_org("acme").await;
    let other = cp.create_org("other").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
    let device = id.device_id();
    let other_key = cp
        .admin(
            &format!("/v1/organisations/{other}/api-keys"),
            json!({ "name": "other-admin", "role": "org-admin" }),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();

    // Before any contact: OFFLINE, no report.
    let path = format!("/v1/organisations/{org}/devices/{device}/health");
    let (status, h) = get(&cp, &cp.admin_key, &path).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["state"], "OFFLINE");
    assert!(h["report"].is_null());

    // An idle agent (empty buffer): only heartbeats reach the control plane.
    let buffer = open_buffer(&dir.path().join("buffer"));
    let mut cfg = sync_config(vec![cp.agent_url.clone()]);
    cfg.heartbeat_interval = Duration::from_millis(300);
    let (_tx, rx) = watch::channel(id.client_config().unwrap());
    let mut registry = kip_agent::metrics::new_registry();
    let (handle_dir, metrics) = (dir.path().to_owned(), IngestMetrics::default());
    let syncer = Syncer::new(buffer.clone(), cfg, rx, &mut registry)
        .unwrap()
        .with_health(Arc::new(HealthCollector {
            buffer: buffer.clone(),
            buffer_max_bytes: 256 << 20,
            metrics,
            sources: vec![("line1".into(), "mqtt")],
            clock: Arc::new(SourceClock::default()),
            identity: None,
            inference: None,
            state_dir: handle_dir,
            started: std::time::Instant::now(),
        }));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));

    // The second heartbeat carries the clock offset measured on the first.
    let report = eventually(Duration::from_secs(20), || async {
        let (_, h) = get(&cp, &cp.admin_key, &path).await;
        if h["state"] != "ONLINE" || h["report"]["clock_offset_ms"].is_null() {
            return Err(format!("{h}"));
        }
        Ok(h["report"].clone())
    })
    .await
    .unwrap();
    // Same machine, same clock: the offset is within the round trip.
    assert!(
        report["clock_offset_ms"].as_i64().unwrap().abs() < 1000,
        "{report}"
    );
    assert!(report["disk_free_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["disk_total_bytes"].as_u64().unwrap() >= report["disk_free_bytes"].as_u64().unwrap()
    );
    assert!(report["rss_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["buffer_records"], 0);
    assert_eq!(report["sources"][0]["name"], "line1");
    assert_eq!(report["sources"][0]["connected"], false);
    assert!(
        report["agent_version"]
            .as_str()
            .unwrap()
            .starts_with("kip-agent ")
    );
    let table = kipctl_health(&cp, org, &[]).await;
    assert!(table.contains("online 1  stale 0  offline 0"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("gw-1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("ONLINE") && row.contains("(0 rec)"), "{table}");
    let registry_text = kip_agent::metrics::render(&registry);
    assert!(
        registry_text.contains("kip_agent_sync_heartbeats_total{result=\"acked\"}"),
        "{registry_text}"
    );

    // Data batches carry the report too: it shows the records sent with it.
    for i in 0..5 {
        buffer.append(&reading(i)).unwrap();
    }
    eventually(Duration::from_secs(20), || async {
        let n = kip_tests::control_plane::stored(&pool, device).await.len();
        if n == 5 {
            Ok(())
        } else {
            Err(format!("{n} stored"))
        }
    })
    .await
    .unwrap();

    // Fleet list and metrics agree; the other organisation sees nothing of it.
    let (_, fleet) = get(
        &cp,
        &cp.admin_key,
        &format!("/v1/organisations/{org}/device-health?q=GW"),
    )
    .await;
    assert_eq!(fleet["counts"]["online"], 1, "{fleet}");
    assert_eq!(fleet["devices"][0]["name"], "gw-1");
    eventually(Duration::from_secs(10), || async {
        let m = cp.metrics().await;
        if m.contains("kip_fleet_devices{org=\"acme\",state=\"online\"} 1") {
            Ok(())
        } else {
            Err(m
                .lines()
                .filter(|l| l.starts_with("kip_fleet"))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    })
    .await
    .unwrap();
    let m = cp.metrics().await;
    assert!(
        m.contains("kip_fleet_worst_disk_free_ratio{org=\"acme\",device=\"gw-1\"}"),
        "{m}"
    );
    assert!(
        !m.contains("kip_device_disk_free_ratio{"),
        "per-device series are off by default"
    );
    let (status, _) = get(&cp, &other_key, &path).await;
    assert_eq!(
        status, 404,
        "another organisation's key must not see the device"
    );
    let (status, _) = get(
        &cp,
        &other_key,
        &format!("/v1/organisations/{org}/device-health"),
    )
    .await;
    assert_eq!(status, 404);
    let (_, theirs) = get(
        &cp,
        &other_key,
        &format!("/v1/organisations/{other}/device-health"),
    )
    .await;
    assert_eq!(theirs["devices"].as_array().unwrap().len(), 0, "{theirs}");
    let (status, bad) = get(
        &cp,
        &cp.admin_key,
        &format!("/v1/organisations/{org}/device-health?state=sleepy"),
    )
    .await;
    assert_eq!(status, 422, "{bad}");
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("state"),
        "{bad}"
    );

    // The agent stops: STALE, then OFFLINE, in the API and the metrics.
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    eventually(Duration::from_secs(20), || async {
        let (_, h) = get(&cp, &cp.admin_key, &path).await;
        if h["state"] == "OFFLINE" {
            Ok(())
        } else {
            Err(format!("{h}"))
        }
    })
    .await
    .unwrap();
    let table = kipctl_health(&cp, org, &["--state", "offline"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("gw-1") && l.contains("OFFLINE")),
        "{table}"
    );
    eventually(Duration::from_secs(10), || async {
        let m = cp.metrics().await;
        if m.contains("kip_fleet_devices{org=\"acme\",state=\"offline\"} 1") {
            Ok(())
        } else {
            Err(m
                .lines()
                .filter(|l| l.starts_with("kip_fleet_devices"))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    })
    .await
    .unwrap();
}
