//! Agent self-update end to end (issue #18) with the real `kip-agent` binary under the real
//! launcher (`deploy/agent-release/kip-agent-launcher`), supervised by the kit's
//! [`Supervisor`] as systemd's `Restart=always` would, against the in-process control plane,
//! with readings from the kit's Mosquitto the whole time.
//!
//! A -> B: uploaded and signed, rolled out, downloaded over mTLS, verified, unpacked beside A,
//! switched to, restarted into (exit code 75), killed with `kill -9` while on trial, confirmed.
//! B -> C (a "binary" that exits 1 at every start): rolled back to B by the launcher after
//! three starts, the reason recorded and shown in the rollout status. Every numbered reading
//! published during the sequence is stored exactly once.
//!
//! The launcher's own power-loss cases (a crash between the steps of a switch or a rollback)
//! are run directly against it with stand-in binaries.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kip_tests::{
    Mosquitto,
    agent_release::{Binary, install_root, tarball},
    control_plane::ControlPlane,
    free_port, kipctl,
    supervisor::Supervisor,
    wait_until,
};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

pub(crate) async fn get(cp: &ControlPlane, path: &str) -> (u16, Value) {
    let resp = cp
        .http
        .get(format!("{}{path}", cp.admin_url))
        .bearer_auth(&cp.admin_key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `kipctl --org ORG ARGS` with the platform-admin key; fails the test when kipctl fails.
pub(crate) async fn kipctl(cp: &ControlPlane, org: Uuid, args: &[&str]) -> String {
    let org = org.to_string();
    let mut all = vec!["--org", org.as_str()];
    all.extend_from_slice(args);
    let out = kipctl::run(&cp.admin_url, &cp.dir.path().join("admin.key"), &all).await;
    assert!(out.ok, "kipctl {args:?}: {}", out.stderr);
    out.stdout
}

/// The device's state in the rollout (`pending`, `trial`, ...) and its reason.
pub(crate) async fn device_state(
    cp: &ControlPlane,
    org: Uuid,
    rollout: &str,
) -> (String, String, String) {
    let (status, v) = get(
        cp,
        &format!("/v1/organisations/{org}/release-rollouts/{rollout}"),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let d = &v["devices"][0];
    (
        d["state"].as_str().unwrap_or("").to_owned(),
        d["reason"].as_str().unwrap_or("").to_owned(),
        d["agent_version"].as_str().unwrap_or("").to_owned(),
    )
}

/// The id in `kipctl --json release rollout start` output (a one-row list).
pub(crate) fn rollout_id(json: &str) -> String {
    let v: Value = serde_json::from_str(json).unwrap();
    v[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{json}"))
        .to_owned()
}

pub(crate) async fn agent_version(pool: &PgPool, device: Uuid) -> Option<String> {
    sqlx::query_scalar(
        "SELECT agent_version FROM device_sync_state WHERE device_id = $1 \
         ORDER BY updated_at DESC LIMIT 1",
    )
    .bind(device)
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// (rows, distinct values) of the numbered readings.
pub(crate) async fn stored(pool: &PgPool, device: Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT value) FROM sensor_data \
         WHERE device_id = $1 AND metric = 'seq' AND machine = 'press1'",
    )
    .bind(device)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The agent's config file in `work`: readings `plant/<machine>/seq` from `broker`, syncing to
/// `endpoint` (the control plane, or a proxy in front of it) every 100 ms.
pub(crate) fn agent_config(
    work: &Path,
    endpoint: &str,
    broker: &Mosquitto,
    http_port: u16,
) -> PathBuf {
    let config = work.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice = \"gw-1\"\nstate_dir = \"{}\"\n\
             [buffer]\nflush_interval_ms = 20\n\
             [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
             [log]\nfilter = \"info\"\n\
             [sync]\nendpoints = [\"{}\"]\ninterval_ms = 100\nbackoff_min_ms = 50\n\
             backoff_max_ms = 500\nrequest_timeout_ms = 20000\n\
             [[mqtt]]\nname = \"line\"\nurl = \"{}\"\nclient_id = \"kip-gw-1\"\n\
             [[mqtt.subscriptions]]\ntopic = \"plant/+/seq\"\nmachine_topic_level = 1\n\
             metric = \"seq\"\nvalue = {{ kind = \"number\" }}\n",
            work.join("state").display(),
            endpoint,
            broker.url(false),
        ),
    )
    .unwrap();
    config
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_agent_updates_itself_and_a_broken_release_is_rolled_back_without_losing_a_reading(
    pool: PgPool,
) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let other_org = cp.create_org("other").await;
    let work = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(work.path());
    let id = cp
        .enroll(org, "gw-1", &work.path().join("state/identity"))
        .await;
    let device = id.device_id();

    let dist = work.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    let a = tarball(&dist, "7.0.0", Binary::Agent);
    let b = tarball(&dist, "7.1.0", Binary::Agent);
    let c = tarball(&dist, "7.2.0", Binary::Broken);
    let root = work.path().join("opt/kip-agent");
    let launcher = install_root(&root, "7.0.0", &a);

    let http_port = free_port();
    let config = agent_config(work.path(), &cp.agent_url, &broker, http_port);
    let log = work.path().join("agent.log");
    let supervisor = {
        let (launcher, config, log) = (launcher.clone(), config.clone(), log.clone());
        Supervisor::start(move || {
            let mut cmd = Command::new(&launcher);
            cmd.args(["run", "--config"])
                .arg(&config)
                .env("KIP_AGENT_TRIAL_SECONDS", "60")
                .env("KIP_AGENT_MAX_TRIAL_BOOTS", "3")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap(),
                );
            cmd
        })
    };
    let log_tail = || {
        let s = std::fs::read_to_string(&log).unwrap_or_default();
        s.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_until(Duration::from_secs(60), "version A reported", || async {
        agent_version(&pool, device).await.as_deref() == Some("kip-agent 7.0.0") || {
            // A heartbeat is enough to report; readings start below.
            kip_tests::mosquitto::publish(broker.port, "plant/warmup/seq", b"-1", None);
            false
        }
    })
    .await;

    // Numbered readings for the whole sequence.
    let published = Arc::new(AtomicU64::new(0));
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (port, cancel, published) = (broker.port, cancel.clone(), published.clone());
        tokio::task::spawn_blocking(move || {
            while !cancel.is_cancelled() {
                let i = published.load(Ordering::SeqCst);
                kip_tests::mosquitto::publish(
                    port,
                    "plant/press1/seq",
                    i.to_string().as_bytes(),
                    None,
                );
                published.store(i + 1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Releases are uploaded through kipctl and signed by the control plane.
    let up = kipctl(&cp, org, &["release", "upload", b.to_str().unwrap()]).await;
    assert!(up.contains("7.1.0") && up.contains("yes"), "{up}");
    kipctl(&cp, org, &["release", "upload", c.to_str().unwrap()]).await;
    // The same version with other bytes is refused: releases are immutable.
    let again = kipctl::run(
        &cp.admin_url,
        &cp.dir.path().join("admin.key"),
        &[
            "--org",
            &org.to_string(),
            "release",
            "upload",
            c.to_str().unwrap(),
            "--version",
            "7.1.0",
        ],
    )
    .await;
    assert!(!again.ok && again.stderr.contains("immutable"), "{again:?}");
    let list = kipctl(&cp, org, &["release", "list"]).await;
    assert!(list.contains("7.1.0") && list.contains("7.2.0"), "{list}");

    // A -> B.
    let started = kipctl(
        &cp,
        org,
        &[
            "--json",
            "release",
            "rollout",
            "start",
            "7.1.0",
            "--percent",
            "100",
        ],
    )
    .await;
    let rollout_b = rollout_id(&started);
    // A second open rollout is refused.
    let second = kipctl::run(
        &cp.admin_url,
        &cp.dir.path().join("admin.key"),
        &[
            "--org",
            &org.to_string(),
            "release",
            "rollout",
            "start",
            "7.2.0",
        ],
    )
    .await;
    assert!(
        !second.ok && second.stderr.contains("abort it first"),
        "{second:?}"
    );
    // Power loss while B is on trial (its first start, before it confirmed): the launcher
    // starts B again as a second trial boot. Watched on disk, every 5 ms, as B starts.
    let on_trial = |root: &Path| {
        std::fs::read_to_string(root.join("update/trial")).is_ok_and(|t| t.trim() == "7.1.0")
            && std::fs::read_to_string(root.join("update/trial-boots"))
                .is_ok_and(|t| t.trim() == "1")
    };
    let killed_on_trial = tokio::time::timeout(Duration::from_secs(120), async {
        while !on_trial(&root) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        supervisor.kill9();
    })
    .await;
    assert!(
        killed_on_trial.is_ok(),
        "B never went on trial\n{}",
        log_tail()
    );
    wait_until(Duration::from_secs(120), "B confirmed", || async {
        let (state, _, version) = device_state(&cp, org, &rollout_b).await;
        state == "confirmed" && version == "kip-agent 7.1.0"
    })
    .await;
    assert!(
        supervisor.exits().contains(&Some(75)),
        "A exits with 75 to be restarted into B: {:?}\n{}",
        supervisor.exits(),
        log_tail()
    );
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        Path::new("versions/7.1.0")
    );
    assert_eq!(
        std::fs::read_link(root.join("previous")).unwrap(),
        Path::new("versions/7.0.0")
    );
    assert!(!root.join("update/trial").exists());
    // The identity and the buffer stayed outside the slots.
    assert!(work.path().join("state/identity").is_dir());

    // Pause and resume change the state; abort ends it.
    let paused = kipctl(&cp, org, &["release", "rollout", "pause", &rollout_b]).await;
    assert!(paused.contains("paused"), "{paused}");
    let resumed = kipctl(&cp, org, &["release", "rollout", "resume", &rollout_b]).await;
    assert!(resumed.contains("active"), "{resumed}");
    kipctl(&cp, org, &["release", "rollout", "abort", &rollout_b]).await;

    // B -> C (broken): the launcher rolls back to B and says why.
    let started = kipctl(
        &cp,
        org,
        &["--json", "release", "rollout", "start", "7.2.0"],
    )
    .await;
    let rollout_c = rollout_id(&started);
    wait_until(Duration::from_secs(120), "C rolled back", || async {
        let (state, reason, version) = device_state(&cp, org, &rollout_c).await;
        state == "rolled_back"
            && reason.contains("not confirmed after 3 starts")
            && version == "kip-agent 7.1.0"
    })
    .await;
    let status = kipctl(&cp, org, &["release", "rollout", "status", &rollout_c]).await;
    assert!(
        status.contains("rolled_back") && status.contains("kip-agent 7.1.0"),
        "{status}"
    );
    assert_eq!(
        std::fs::read_link(root.join("current")).unwrap(),
        Path::new("versions/7.1.0")
    );
    let exits = supervisor.exits();
    assert!(
        exits.iter().filter(|e| **e == Some(1)).count() >= 3,
        "C crashed at each of its starts: {exits:?}"
    );

    // Every reading published during the whole sequence arrived exactly once.
    cancel.cancel();
    publisher.await.unwrap();
    let total = published.load(Ordering::SeqCst);
    assert!(total > 0);
    wait_until(Duration::from_secs(60), "every reading stored", || async {
        stored(&pool, device).await.1 >= i64::try_from(total).unwrap()
    })
    .await;
    let (rows, distinct) = stored(&pool, device).await;
    assert_eq!(
        (rows, distinct),
        (i64::try_from(total).unwrap(), i64::try_from(total).unwrap()),
        "each of {total} readings exactly once"
    );

    // Another organisation sees none of it.
    let (status, v) = get(&cp, &format!("/v1/organisations/{other_org}/releases")).await;
    assert_eq!((status, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");
    let (status, _) = get(
        &cp,
        &format!("/v1/organisations/{other_org}/release-rollouts/{rollout_c}"),
    )
    .await;
    assert_eq!(status, 404);

    drop(supervisor);
    drop(broker);
}

/// An install root with stand-in slots whose `bin/kip-agent` prints the slot's version.
fn fake_root(dir: &Path, versions: &[&str]) -> PathBuf {
    for v in versions {
        let bin = dir.join(format!("versions/{v}/bin"));
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("kip-agent");
        std::fs::write(&exe, format!("#!/bin/sh\necho {v}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::create_dir_all(dir.join("update")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let launcher = dir.join("bin/kip-agent-launcher");
    std::fs::copy(
        kip_tests::workspace_root().join("deploy/agent-release/kip-agent-launcher"),
        &launcher,
    )
    .unwrap();
    launcher
}

fn link(dir: &Path, name: &str, version: &str) {
    let _ = std::fs::remove_file(dir.join(name));
    std::os::unix::fs::symlink(format!("versions/{version}"), dir.join(name)).unwrap();
}

/// Runs the launcher once; what the started "agent" printed (its version).
fn launch(launcher: &Path) -> String {
    let out = Command::new(launcher)
        .env_remove("KIP_AGENT_INSTALL_ROOT")
        .env("KIP_AGENT_MAX_TRIAL_BOOTS", "2")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn the_launcher_starts_a_bootable_version_after_a_crash_at_any_step_of_a_switch_or_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let launcher = fake_root(root, &["1", "2"]);
    let trial = |v: &str| std::fs::write(root.join("update/trial"), format!("{v}\n")).unwrap();
    let read = |f: &str| std::fs::read_to_string(root.join("update").join(f)).ok();

    // Crash after the trial was written but before `current` moved: the stale trial is
    // dropped and the running version starts (it is not rolled back).
    link(root, "current", "1");
    link(root, "previous", "1");
    trial("2");
    assert_eq!(launch(&launcher), "1");
    assert_eq!(read("trial"), None);

    // Switched: the new version gets its trial starts, counted.
    trial("2");
    link(root, "current", "2");
    assert_eq!(launch(&launcher), "2");
    assert_eq!(launch(&launcher), "2");
    assert_eq!(read("trial-boots").as_deref(), Some("2\n"));
    // It never confirmed: the next start rolls back and records why.
    assert_eq!(launch(&launcher), "1");
    assert!(
        read("rolled-back")
            .unwrap()
            .starts_with("2 not confirmed after 2 starts"),
        "{:?}",
        read("rolled-back")
    );
    assert_eq!(read("trial"), None);

    // Crash after the rollback was recorded but before `current` moved back: it is repeated.
    trial("2");
    link(root, "current", "2");
    std::fs::write(
        root.join("update/trial-failed"),
        "sources not connected: plc\n",
    )
    .unwrap();
    assert_eq!(launch(&launcher), "1");
    assert_eq!(
        read("rolled-back").as_deref(),
        Some("2 sources not connected: plc\n")
    );

    // No usable previous version: the trial version keeps starting (nothing better exists).
    trial("2");
    link(root, "current", "2");
    std::fs::remove_file(root.join("previous")).unwrap();
    std::fs::write(root.join("update/trial-failed"), "gave up\n").unwrap();
    assert_eq!(launch(&launcher), "2");
}
