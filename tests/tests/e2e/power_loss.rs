//! Power loss (SIGKILL, nothing flushed) at each step of an agent self-update and of a remote
//! configuration change, with the real `kip-agent` under the real launcher, supervised as
//! systemd's `Restart=always` would (issue #18, "the previous state is intact after restart").
//!
//! Where a step lasts long enough to be seen on disk (a download in progress, a slot being
//! unpacked, a version on trial) the test watches for it and kills the process group. Where a
//! step is a single system call (the rename that publishes a slot, the symlink switch, the
//! write of the trial or of the confirmed configuration) the run is started under `strace`,
//! which delivers SIGKILL on entry to exactly that call (`-P <path> -e inject=...:signal=KILL`):
//! a kill -9 at a point no poll could hit reliably, with no hook in the agent's code.
//!
//! Each run's starting state (what a power loss left) is recorded before it starts and
//! checked against what that step must leave; at the end the update (or configuration) has
//! completed, the identity is byte for byte the one enrolled and every numbered reading
//! published during the whole sequence is stored exactly once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kip_tests::{
    Mosquitto,
    agent_release::{Binary, install_root, tarball},
    control_plane::ControlPlane,
    free_port,
    proxy::{Link, Proxy},
    supervisor::Supervisor,
    wait_until, workspace_binary,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::self_update::{agent_config, agent_version, device_state, kipctl, rollout_id, stored};

/// How one supervised run is started.
#[derive(Debug, Clone)]
enum Run {
    /// As systemd would.
    Plain,
    /// Under `strace -f`, SIGKILLed on entry to the first of `syscalls` that names `path`
    /// (for `rename` strace matches the source only: name the temporary file).
    KillAt {
        syscalls: &'static str,
        path: PathBuf,
    },
    /// Under `strace` (main thread only), SIGKILLed on entry to `exit_group`: the process did
    /// everything but exit.
    KillAtExit,
}

const RENAME: &str = "rename,renameat,renameat2";
const OPEN: &str = "open,openat,creat";
const MKDIR: &str = "mkdir,mkdirat";

/// `program args` started as `run` says.
fn command(run: &Run, program: &Path) -> Command {
    let strace = |args: Vec<String>| {
        let mut c = Command::new("strace");
        c.args(["-qq", "-o", "/dev/null"])
            .args(args)
            .arg("--")
            .arg(program);
        c
    };
    match run {
        Run::Plain => Command::new(program),
        Run::KillAt { syscalls, path } => strace(vec![
            "-f".into(),
            "-P".into(),
            path.display().to_string(),
            "-e".into(),
            format!("trace={syscalls}"),
            "-e".into(),
            format!("inject={syscalls}:signal=KILL"),
        ]),
        Run::KillAtExit => strace(vec![
            "-e".into(),
            "trace=exit_group".into(),
            "-e".into(),
            "inject=exit_group:signal=KILL".into(),
        ]),
    }
}

/// A supervised agent whose runs follow a plan, recording what each run found on disk.
struct Runs<S> {
    supervisor: Supervisor,
    seen: Arc<Mutex<Vec<S>>>,
    log: PathBuf,
}

impl<S: Clone + Send + 'static> Runs<S> {
    fn start(
        program: PathBuf,
        config: PathBuf,
        log: PathBuf,
        plan: Vec<Run>,
        snapshot: impl Fn() -> S + Send + 'static,
    ) -> Self {
        // strace is part of the test: a missing one fails here, never skips.
        let v = Command::new("strace").arg("-V").output();
        assert!(
            v.is_ok_and(|o| o.status.success()),
            "strace is needed for the power-loss tests (apt-get install strace)"
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut plan = VecDeque::from(plan);
        let (s, l) = (seen.clone(), log.clone());
        let supervisor = Supervisor::start(move || {
            s.lock().unwrap().push(snapshot());
            let run = plan.pop_front().unwrap_or(Run::Plain);
            let mut cmd = command(&run, &program);
            cmd.args(["run", "--config"])
                .arg(&config)
                .env("KIP_AGENT_TRIAL_SECONDS", "120")
                .env("KIP_AGENT_MAX_TRIAL_BOOTS", "5")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&l)
                        .unwrap(),
                );
            cmd
        });
        Self {
            supervisor,
            seen,
            log,
        }
    }

    /// What run `n` (0-based) found on disk when it started.
    fn found(&self, n: usize) -> S {
        self.seen.lock().unwrap()[n].clone()
    }

    async fn wait_started(&self, n: usize) {
        wait_until(Duration::from_secs(120), "next run started", || async {
            self.seen.lock().unwrap().len() > n
        })
        .await;
    }

    /// Lines of the log (all runs) containing `needle`.
    fn count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Whether the last line with `first` is followed by a line with `then`.
    fn last_followed_by(&self, first: &str, then: &str) -> bool {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = s.lines().collect();
        lines
            .iter()
            .rposition(|l| l.contains(first))
            .is_some_and(|i| lines[i..].iter().any(|l| l.contains(then)))
    }

    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = s.lines().collect();
        lines[lines.len().saturating_sub(150)..].join("\n")
    }

    /// Polls `cond` every 2 ms (a step that lasts milliseconds), then kills the current run.
    async fn kill_when(&self, what: &str, cond: impl Fn() -> bool) {
        let hit = tokio::time::timeout(Duration::from_secs(180), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            self.supervisor.kill9();
        })
        .await;
        assert!(hit.is_ok(), "never saw {what}\n{}", self.tail());
    }
}

/// The install root as a run finds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Disk {
    current: String,
    previous: String,
    trial: String,
    trial_boots: String,
    /// Entries of `versions/`.
    versions: Vec<String>,
}

fn disk(root: &Path) -> Disk {
    let link = |n: &str| {
        std::fs::read_link(root.join(n))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let file = |n: &str| {
        std::fs::read_to_string(root.join("update").join(n))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let mut versions: Vec<String> = std::fs::read_dir(root.join("versions"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    Disk {
        current: link("current"),
        previous: link("previous"),
        trial: file("trial"),
        trial_boots: file("trial-boots"),
        versions,
    }
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}

/// Every file enrollment wrote is still there, byte for byte (the agent may add its own, e.g.
/// the buffer's epoch floor).
fn assert_identity_kept(identity: &Path, enrolled: &BTreeMap<PathBuf, Vec<u8>>) {
    let now = files(identity);
    assert!(!enrolled.is_empty());
    for (path, bytes) in enrolled {
        assert_eq!(now.get(path), Some(bytes), "{} changed", path.display());
    }
}

/// Numbered readings `plant/press1/seq` every 50 ms until `cancel`; the count published.
fn publish_numbered(
    port: u16,
    cancel: CancellationToken,
) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let published = Arc::new(AtomicU64::new(0));
    let p = published.clone();
    let task = tokio::task::spawn_blocking(move || {
        while !cancel.is_cancelled() {
            let i = p.load(Ordering::SeqCst);
            kip_tests::mosquitto::publish(port, "plant/press1/seq", i.to_string().as_bytes(), None);
            p.store(i + 1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    (published, task)
}

async fn every_reading_once(pool: &PgPool, device: Uuid, published: u64) {
    let total = i64::try_from(published).unwrap();
    assert!(total > 0);
    wait_until(Duration::from_secs(60), "every reading stored", || async {
        stored(pool, device).await.1 >= total
    })
    .await;
    assert_eq!(
        stored(pool, device).await,
        (total, total),
        "each of {total} readings exactly once"
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_power_loss_at_any_step_of_a_self_update_leaves_a_version_that_runs_and_the_update_completes(
    pool: PgPool,
) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let work = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(work.path());
    let identity = work.path().join("state/identity");
    let device = cp.enroll(org, "gw-1", &identity).await.device_id();
    let enrolled = files(&identity);
    // The agent reaches the control plane through a proxy whose link the test can hold.
    let proxy = Proxy::start(kip_tests::control_plane::agent_addr(&cp)).await;

    let dist = work.path().join("dist");
    std::fs::create_dir_all(&dist).unwrap();
    let a = tarball(&dist, "7.0.0", Binary::Agent);
    let b = tarball(&dist, "7.1.0", Binary::Agent);
    let root = work.path().join("opt/kip-agent");
    let launcher = install_root(&root, "7.0.0", &a);
    let config = agent_config(work.path(), &proxy.url(), &broker, free_port());

    let at = |syscalls, rel: &str| Run::KillAt {
        syscalls,
        path: root.join(rel),
    };
    let runs = Runs::start(
        launcher,
        config,
        work.path().join("agent.log"),
        vec![
            Run::Plain,                           // 0: killed while downloading
            at(MKDIR, "versions/7.1.0.partial"),  // 1: verified, unpacking starts
            Run::Plain,                           // 2: killed while unpacking
            at(RENAME, "versions/7.1.0.partial"), // 3: unpacked, slot not published
            at(OPEN, "update/trial.tmp"),         // 4: slot published, no switch yet
            at(RENAME, "previous.tmp"),           // 5: trial written, links not moved
            at(RENAME, "current.tmp"),            // 6: previous moved, current not
            Run::KillAtExit,                      // 7: switched, not yet exited (75)
            Run::Plain,                           // 8: B on trial, killed at start
            at(OPEN, "update/confirmed.tmp"),     // 9: B proved itself, confirming
        ],
        {
            let root = root.clone();
            move || disk(&root)
        },
    );
    wait_until(Duration::from_secs(60), "version A reported", || async {
        agent_version(&pool, device).await.as_deref() == Some("kip-agent 7.0.0")
    })
    .await;
    let cancel = CancellationToken::new();
    let (published, publisher) = publish_numbered(broker.port, cancel.clone());

    kipctl(&cp, org, &["release", "upload", b.to_str().unwrap()]).await;
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
    let rollout = rollout_id(&started);

    // 0: the download in progress (held by the proxy so it cannot finish), then the power.
    let downloads = runs.count("downloading agent release");
    runs.kill_when("the download start", || {
        let hit = runs.count("downloading agent release") > downloads;
        if hit {
            proxy.set(Link::Blackhole);
        }
        hit
    })
    .await;
    proxy.set(Link::Up);
    runs.wait_started(1).await;
    let a_only = Disk {
        current: "versions/7.0.0".into(),
        versions: vec!["7.0.0".into()],
        ..Disk::default()
    };
    assert_eq!(
        runs.found(1),
        a_only,
        "download: nothing written\n{}",
        runs.tail()
    );

    // 1: killed by strace at the mkdir of the partial slot: downloaded and verified (in
    // memory), nothing on disk yet.
    runs.wait_started(2).await;
    assert_eq!(
        runs.found(2),
        a_only,
        "verified: nothing written\n{}",
        runs.tail()
    );

    // 2: killed with the binary half written into the partial slot.
    let partial_bin = root.join("versions/7.1.0.partial/bin/kip-agent");
    runs.kill_when("the unpacking", || {
        std::fs::metadata(&partial_bin).is_ok_and(|m| m.len() > 0)
    })
    .await;
    runs.wait_started(3).await;
    let partial = Disk {
        versions: vec!["7.0.0".into(), "7.1.0.partial".into()],
        ..a_only.clone()
    };
    assert_eq!(runs.found(3), partial, "unpacking\n{}", runs.tail());

    // 3: unpacked and synced, killed at the rename that publishes the slot.
    runs.wait_started(4).await;
    assert_eq!(
        runs.found(4),
        partial,
        "unpacked, not published\n{}",
        runs.tail()
    );

    // 4: slot published, killed before the trial is written.
    runs.wait_started(5).await;
    let staged = Disk {
        versions: vec!["7.0.0".into(), "7.1.0".into()],
        ..a_only.clone()
    };
    assert_eq!(runs.found(5), staged, "staged\n{}", runs.tail());

    // 5: trial written, killed at the rename of `previous`.
    runs.wait_started(6).await;
    let trial_written = Disk {
        trial: "7.1.0".into(),
        ..staged.clone()
    };
    assert_eq!(
        runs.found(6),
        trial_written,
        "trial written\n{}",
        runs.tail()
    );

    // 6: `previous` moved, killed at the rename of `current` (the launcher drops the stale
    // trial: A runs and tries again).
    runs.wait_started(7).await;
    let previous_moved = Disk {
        previous: "versions/7.0.0".into(),
        ..trial_written.clone()
    };
    assert_eq!(
        runs.found(7),
        previous_moved,
        "previous moved\n{}",
        runs.tail()
    );

    // 7: switched, killed instead of exiting with 75: the next start is B's first trial.
    runs.wait_started(8).await;
    let switched = Disk {
        current: "versions/7.1.0".into(),
        ..previous_moved.clone()
    };
    assert_eq!(runs.found(8), switched, "switched\n{}", runs.tail());

    // 8: B on trial, killed as it starts.
    let boots = root.join("update/trial-boots");
    runs.kill_when("B's first trial start", || {
        std::fs::read_to_string(&boots).is_ok_and(|b| b.trim() == "1")
    })
    .await;
    runs.wait_started(9).await;
    assert_eq!(
        runs.found(9),
        Disk {
            trial_boots: "1".into(),
            ..switched.clone()
        },
        "on trial\n{}",
        runs.tail()
    );

    // 9: B synced with every source up, killed as it writes the confirmation.
    runs.wait_started(10).await;
    assert_eq!(
        runs.found(10),
        Disk {
            trial_boots: "2".into(),
            ..switched.clone()
        },
        "confirming\n{}",
        runs.tail()
    );

    // 10: B confirms.
    wait_until(Duration::from_secs(120), "B confirmed", || async {
        let (state, _, version) = device_state(&cp, org, &rollout).await;
        state == "confirmed" && version == "kip-agent 7.1.0"
    })
    .await;
    let end = disk(&root);
    assert_eq!(
        (
            end.trial.as_str(),
            end.current.as_str(),
            end.previous.as_str()
        ),
        ("", "versions/7.1.0", "versions/7.0.0"),
        "{end:?}"
    );
    let exits = runs.supervisor.exits();
    assert!(
        exits.len() >= 10 && exits[..10].iter().all(Option::is_none),
        "runs 0-9 ended by SIGKILL: {exits:?}"
    );
    assert_identity_kept(&identity, &enrolled);

    cancel.cancel();
    publisher.await.unwrap();
    every_reading_once(&pool, device, published.load(Ordering::SeqCst)).await;
    drop(runs);
    drop(broker);
}

/// `GET .../devices/{device}/config`: applied version, in_sync, last_error.
async fn config_status(cp: &ControlPlane, org: Uuid, device: Uuid) -> Value {
    crate::self_update::get(
        cp,
        &format!("/v1/organisations/{org}/devices/{device}/config"),
    )
    .await
    .1
}

/// The remote-configuration store as a run finds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Store {
    current: String,
    rejected: String,
    tmp: bool,
}

fn store(state: &Path) -> Store {
    let dir = state.join("remote-config");
    let version = |n: &str| {
        std::fs::read_to_string(dir.join(n))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["version"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    Store {
        current: version("current.json"),
        rejected: version("rejected.json"),
        tmp: dir.join("current.json.tmp").exists(),
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_power_loss_at_any_step_of_a_config_change_leaves_one_consistent_config(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let work = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(work.path());
    let state = work.path().join("state");
    let identity = state.join("identity");
    let device = cp.enroll(org, "gw-1", &identity).await.device_id();
    let enrolled = files(&identity);
    let proxy = Proxy::start(kip_tests::control_plane::agent_addr(&cp)).await;
    let config = agent_config(work.path(), &proxy.url(), &broker, free_port());
    let runs = Runs::start(
        workspace_binary("kip-agent"),
        config,
        work.path().join("agent.log"),
        vec![
            Run::Plain, // 0: killed as it starts applying v1 (sources stopping)
            Run::Plain, // 1: SIGTERM while v1 is on trial (a normal stop, not a refusal)
            Run::Plain, // 2: killed while v1 is on trial
            Run::KillAt {
                // 3: v1 confirmed, killed at the rename that makes it the last good one
                syscalls: RENAME,
                path: state.join("remote-config/current.json.tmp"),
            },
            Run::Plain, // 4: killed right after v1 was written
        ],
        {
            let state = state.clone();
            move || store(&state)
        },
    );
    wait_until(Duration::from_secs(60), "agent syncing", || async {
        agent_version(&pool, device).await.is_some()
    })
    .await;
    let cancel = CancellationToken::new();
    let (published, publisher) = publish_numbered(broker.port, cancel.clone());

    // v1: the same source, another sync interval: every apply restarts the pipeline.
    let v1_toml = format!(
        "[sync]\nendpoints = [\"{}\"]\ninterval_ms = 120\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\
         request_timeout_ms = 20000\n\
         [[mqtt]]\nname = \"line\"\nurl = \"{}\"\nclient_id = \"kip-gw-1\"\n\
         [[mqtt.subscriptions]]\ntopic = \"plant/+/seq\"\nmachine_topic_level = 1\n\
         metric = \"seq\"\nvalue = {{ kind = \"number\" }}\n",
        proxy.url(),
        broker.url(false),
    );
    let resp = cp
        .http
        .put(format!(
            "{}/v1/organisations/{org}/devices/{device}/config",
            cp.admin_url
        ))
        .bearer_auth(&cp.admin_key)
        .json(&json!({ "toml": v1_toml }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let v1 = resp.json::<Value>().await.unwrap()["version"]
        .as_i64()
        .unwrap()
        .to_string();
    let none = Store::default();

    // 0: killed the moment it starts applying v1.
    const APPLYING: &str = "applying remote configuration";
    const RUNNING: &str = "agent running";
    let n = runs.count(APPLYING);
    runs.kill_when("v1 being applied", || runs.count(APPLYING) > n)
        .await;
    runs.wait_started(1).await;
    assert_eq!(runs.found(1), none, "applying\n{}", runs.tail());

    // 1 and 2: v1 on trial (its pipeline running, the control plane held away so it cannot
    // confirm), then a normal stop (SIGTERM), then a power loss.
    for (run, graceful) in [(1, true), (2, false)] {
        let applying = runs.count(APPLYING);
        let held = tokio::time::timeout(Duration::from_secs(120), async {
            while runs.count(APPLYING) == applying {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            proxy.set(Link::Blackhole);
        })
        .await;
        assert!(held.is_ok(), "v1 not applied again\n{}", runs.tail());
        wait_until(Duration::from_secs(60), "v1's pipeline running", || async {
            runs.last_followed_by(APPLYING, RUNNING)
        })
        .await;
        if graceful {
            runs.supervisor.terminate();
        } else {
            runs.supervisor.kill9();
        }
        proxy.set(Link::Up);
        runs.wait_started(run + 1).await;
        assert_eq!(
            runs.found(run + 1),
            none,
            "v1 on trial (run {run})\n{}",
            runs.tail()
        );
    }

    // 3: v1 confirmed, killed at the rename of its record: the old configuration stays.
    runs.wait_started(4).await;
    assert_eq!(
        runs.found(4),
        Store {
            tmp: true,
            ..none.clone()
        },
        "confirmed, not recorded\n{}",
        runs.tail()
    );

    // 4: killed right after v1 was recorded: v1 is what runs next.
    runs.kill_when("v1 recorded", || store(&state).current == v1)
        .await;
    runs.wait_started(5).await;
    assert_eq!(runs.found(5).current, v1, "recorded\n{}", runs.tail());

    // 5: runs v1 and reports it; nothing was refused.
    wait_until(
        Duration::from_secs(60),
        "v1 applied and reported",
        || async {
            let s = config_status(&cp, org, device).await;
            s["in_sync"] == true && s["applied_version"] == v1.as_str()
        },
    )
    .await;
    let s = config_status(&cp, org, device).await;
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(store(&state).rejected, "", "v1 was never refused");
    let exits = runs.supervisor.exits();
    assert!(
        exits.len() >= 5
            && exits[0].is_none()
            && exits[1] == Some(0)
            && exits[2..5].iter().all(Option::is_none),
        "runs 0, 2-4 killed, 1 stopped normally: {exits:?}"
    );
    assert_identity_kept(&identity, &enrolled);

    cancel.cancel();
    publisher.await.unwrap();
    every_reading_once(&pool, device, published.load(Ordering::SeqCst)).await;
    drop(runs);
    drop(broker);
}
