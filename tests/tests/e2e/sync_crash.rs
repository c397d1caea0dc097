//! Crash tests of sync with the real binaries: `kip-agent run` and `kip-control-plane` as child
//! processes, killed with SIGKILL mid-stream and restarted; and the control plane's database
//! connections terminated while it stores batches. Every record must land exactly once,
//! compared per `(epoch, seq)`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use kip_agent::{buffer::Buffer, identity::Identity};
use kip_certs::FleetCa;
use kip_tests::{
    ChildGroup, PrivatePostgres, TestDb,
    agent::{RunningSync, open_buffer, reading, start_sync, sync_config},
    control_plane::{ControlPlane, start, stored},
    free_port, wait_for_port, wait_until, workspace_binary,
};
use sqlx::PgPool;

/// How long a child process may take to listen on its port.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `kip-control-plane` binary on a fixed database, ports and folder, so a restarted
/// process takes over where the killed one stopped.
struct CpProc {
    db_url: String,
    admin_port: u16,
    agent_port: u16,
    dir: PathBuf,
}

impl CpProc {
    /// Starts the process and waits until both ports listen; starts it again when it exited
    /// at start-up (a port of the process killed a moment ago may not be free yet).
    fn spawn(&self) -> ChildGroup {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut child = self.spawn_once();
            let up = loop {
                if [self.admin_port, self.agent_port]
                    .iter()
                    .all(|p| wait_for_port(*p, Duration::ZERO))
                {
                    break true;
                }
                if child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if up {
                return child;
            }
            assert!(
                Instant::now() < deadline,
                "kip-control-plane did not listen on {} and {} within {START_TIMEOUT:?}",
                self.admin_port,
                self.agent_port
            );
        }
    }

    fn spawn_once(&self) -> ChildGroup {
        ChildGroup::spawn(
            Command::new(workspace_binary("kip-control-plane"))
                .env("KIP_DATABASE_URL", &self.db_url)
                .env("KIP_LISTEN_ADDR", format!("127.0.0.1:{}", self.admin_port))
                .env(
                    "KIP_AGENT_LISTEN_ADDR",
                    format!("127.0.0.1:{}", self.agent_port),
                )
                .env("KIP_ADMIN_KEY_FILE", self.dir.join("admin.key"))
                .env("KIP_PKI_CA_DIR", self.dir.join("ca"))
                .env("KIP_LOG_FORMAT", "text")
                .env("KIP_LOG_FILTER", "warn")
                .stdout(Stdio::null()),
        )
        .unwrap()
    }
}

fn spawn_agent(config: &Path, http_port: u16) -> ChildGroup {
    // sled may still hold the buffer's lock for a moment after the previous owner died: the
    // new agent then exits at start-up, and is started again.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut child = ChildGroup::spawn(
            Command::new(workspace_binary("kip-agent"))
                .args(["run", "--config"])
                .arg(config)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap();
        loop {
            if wait_for_port(http_port, Duration::ZERO) {
                return child;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(Instant::now() < deadline, "agent could not start");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agent_and_control_plane_mid_stream_loses_and_duplicates_nothing() {
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    // The control plane process migrates the database itself.
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    FleetCa::init(&work.path().join("ca"), std::time::SystemTime::now()).unwrap();
    let cp = CpProc {
        db_url: db.url.clone(),
        admin_port: free_port(),
        agent_port: free_port(),
        dir: work.path().to_owned(),
    };
    let mut cp_proc = cp.spawn();
    let pool = db.pool.clone();
    let admin_url = format!("http://127.0.0.1:{}", cp.admin_port);
    let admin_key = std::fs::read_to_string(work.path().join("admin.key"))
        .unwrap()
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let org: serde_json::Value = http
        .post(format!("{admin_url}/v1/organisations"))
        .bearer_auth(&admin_key)
        .json(&serde_json::json!({ "name": "acme" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org_id = org["id"].as_str().unwrap();
    let tok: serde_json::Value = http
        .post(format!(
            "{admin_url}/v1/organisations/{org_id}/enroll-tokens"
        ))
        .bearer_auth(&admin_key)
        .json(&serde_json::json!({ "ttl_s": 600 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let state = work.path().join("agent");
    let id = kip_agent::identity::enroll(
        &http,
        &admin_url,
        tok["token"].as_str().unwrap(),
        "gw-1",
        None,
        &state.join("identity"),
    )
    .await
    .unwrap();

    // A backlog of readings, durable before the agent starts.
    const N: u64 = 20_000;
    let mut want = BTreeSet::new();
    {
        let buffer = open_buffer(&state.join("buffer"));
        for i in 0..N {
            let seq = buffer.append(&reading(i)).unwrap();
            want.insert((buffer.epoch(), seq));
        }
        buffer.flush().await.unwrap();
    }
    let http_port = free_port();
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndevice = \"gw-1\"\nstate_dir = \"{}\"\n\
             [buffer]\nflush_interval_ms = 20\n\
             [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
             [log]\nformat = \"text\"\nfilter = \"warn\"\n\
             [sync]\nendpoints = [\"https://127.0.0.1:{}\"]\nbatch_max_records = 100\n\
             interval_ms = 20\nbackoff_min_ms = 20\nbackoff_max_ms = 300\nrequest_timeout_ms = 3000\n",
            state.display(),
            cp.agent_port
        ),
    )
    .unwrap();
    let device = id.device_id();
    let count = || async { stored(&pool, device).await.len() as u64 };

    let mut agent = spawn_agent(&config, http_port);
    wait_until(Duration::from_secs(60), "agent synced some", || async {
        count().await >= 2_000
    })
    .await;
    agent.kill9();
    let at_kill = count().await;
    assert!(at_kill < N, "the agent finished before it was killed");
    let agent = spawn_agent(&config, http_port);
    wait_until(Duration::from_secs(60), "agent resumed", || async {
        count().await >= at_kill + 3_000
    })
    .await;

    // Now the control plane dies mid-stream (batches flow back to back, so mid-transaction).
    cp_proc.kill9();
    let at_cp_kill = count().await;
    assert!(
        at_cp_kill < N,
        "everything synced before the control plane was killed"
    );
    // The restarted process binds the same ports (the killed one's sockets are closed).
    cp_proc = cp.spawn();

    wait_until(Duration::from_secs(120), "every record synced", || async {
        count().await >= N
    })
    .await;
    let got = stored(&pool, device).await;
    assert_eq!(got, want, "stored set differs from appended set");
    // Drop order: agent and control plane stop before the database is dropped.
    drop(agent);
    drop(cp_proc);
    drop(pool);
    drop(db);
}

/// An enrolled device with 10,000 readings in its buffer, syncing in batches of 100 to an
/// in-process control plane on `pool`.
struct Backlog {
    cp: ControlPlane,
    _dir: tempfile::TempDir,
    id: Identity,
    buffer: Arc<Buffer>,
    want: BTreeSet<(u64, u64)>,
    sync: RunningSync,
}

impl Backlog {
    async fn start(pool: &PgPool) -> Self {
        let cp = start(pool.clone(), None).await;
        let org = cp.create_org("acme").await;
        let dir = tempfile::tempdir().unwrap();
        let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
        let buffer = open_buffer(&dir.path().join("buffer"));
        let mut want = BTreeSet::new();
        for i in 0..10_000u64 {
            let seq = buffer.append(&reading(i)).unwrap();
            want.insert((buffer.epoch(), seq));
        }
        let mut cfg = sync_config(vec![cp.agent_url.clone()]);
        cfg.batch_max_records = 100;
        let sync = start_sync(buffer.clone(), &id, cfg);
        Self {
            cp,
            _dir: dir,
            id,
            buffer,
            want,
            sync,
        }
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn terminated_database_connections_mid_sync_lose_and_duplicate_nothing(pool: PgPool) {
    let Backlog {
        cp: _cp,
        _dir,
        id,
        buffer,
        want,
        sync,
    } = Backlog::start(&pool).await;
    let killer = PgPool::connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let mut kills = 0u64;
    // The drain's pace depends on the machine's load (a batch must commit between two kills):
    // fail when it stalls, not after a fixed total time.
    const STALL: Duration = Duration::from_secs(30);
    let (mut left, mut progressed_at) = (u64::MAX, Instant::now());
    loop {
        let now_left = buffer.stats().unwrap().counts.total();
        if now_left == 0 {
            break;
        }
        if now_left < left {
            (left, progressed_at) = (now_left, Instant::now());
        }
        assert!(
            progressed_at.elapsed() < STALL,
            "sync stalled for {STALL:?} with {left} records left"
        );
        // Every backend of the control plane's pool, idle or mid-transaction.
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&killer)
        .await
        .unwrap();
        kills += n as u64;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(kills > 0);
    let got = stored(&pool, id.device_id()).await;
    assert_eq!(got, want);
    let m = sync.metrics();
    sync.stop().await;
    assert!(m.contains("kip_agent_sync_records_total"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_and_restart_mid_sync_loses_and_duplicates_nothing() {
    let pg = PrivatePostgres::create();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    kip_control_plane::db::MIGRATOR.run(&pool).await.unwrap();
    let Backlog {
        cp: _cp,
        _dir,
        id,
        buffer,
        want,
        sync,
    } = Backlog::start(&pool).await;
    let left = || buffer.stats().unwrap().counts.total();
    wait_until(Duration::from_secs(30), "some records synced", || async {
        left() < 9_000
    })
    .await;
    pg.stop_immediate();
    wait_until(
        Duration::from_secs(20),
        "agent notices the outage",
        || async { !sync.status.report().online },
    )
    .await;
    // An ack already on its way when the database died may still arrive; once a later attempt
    // failed too, none can. Then two more failed attempts must leave the backlog as it was.
    let failures = || sync.status.report().consecutive_failures;
    let f = failures();
    wait_until(
        Duration::from_secs(20),
        "another failed attempt",
        || async { failures() > f },
    )
    .await;
    let at_crash = left();
    assert!(at_crash > 0, "everything synced before the crash");
    let f = failures();
    wait_until(
        Duration::from_secs(20),
        "two more failed attempts",
        || async { failures() >= f + 2 },
    )
    .await;
    assert_eq!(
        left(),
        at_crash,
        "records were acked while the database was down"
    );
    pg.start();
    wait_until(Duration::from_secs(60), "backlog drained", || async {
        left() == 0
    })
    .await;
    let got = stored(&pool, id.device_id()).await;
    assert_eq!(got, want);
    sync.stop().await;
}
