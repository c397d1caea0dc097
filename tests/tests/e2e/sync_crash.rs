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
    sync::Arc,
    time::{Duration, Instant},
};

use kip_agent::{buffer::Buffer, identity::Identity};
use kip_tests::{
    PrivatePostgres, TestDb,
    agent::{RunningSync, open_buffer, reading, start_sync, sync_config},
    binaries::{ControlPlaneProcess, spawn_agent},
    control_plane::{ControlPlane, start, stored},
    free_port, wait_until,
};
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agent_and_control_plane_mid_stream_loses_and_duplicates_nothing() {
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    // The control plane process migrates the database itself.
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    let cp = ControlPlaneProcess::new(&db.url, work.path());
    let mut cp_proc = cp.spawn();
    let pool = db.pool.clone();
    let admin = cp.admin_api();
    let org = admin.create_org("acme").await;
    let state = work.path().join("agent");
    let id = admin.enroll(org, "gw-1", &state.join("identity")).await;

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

    let mut agent = spawn_agent(&config, http_port, None);
    wait_until(Duration::from_secs(60), "agent synced some", || async {
        count().await >= 2_000
    })
    .await;
    agent.kill9();
    let at_kill = count().await;
    assert!(at_kill < N, "the agent finished before it was killed");
    let agent = spawn_agent(&config, http_port, None);
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
    // Kills come every 30 ms; while no batch gets through, the gap doubles (up to 480 ms) so
    // that a batch on a fresh connection (cold caches: it plans the partitioned insert and
    // its rollups first) can commit on a loaded machine, and it drops back to 30 ms after
    // each batch.
    const KILL_EVERY: Duration = Duration::from_millis(30);
    let mut gap = KILL_EVERY;
    let (mut left, mut progressed_at) = (u64::MAX, Instant::now());
    loop {
        let now_left = buffer.stats().unwrap().counts.total();
        if now_left == 0 {
            break;
        }
        if now_left < left {
            (left, progressed_at) = (now_left, Instant::now());
            gap = KILL_EVERY;
        } else {
            gap = (gap * 2).min(KILL_EVERY * 16);
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
        tokio::time::sleep(gap).await;
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
