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

mod common;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{eventually, reading, start, start_sync, stored, sync_config};
use kip_certs::FleetCa;
use sqlx::PgPool;
use uuid::Uuid;

const PG: &str = "postgres://postgres@127.0.0.1:5432";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The workspace's binaries next to this test executable (`target/debug`), built if missing.
fn binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--bin", "kip-agent", "--bin", "kip-control-plane"])
            .status()
            .unwrap();
        assert!(ok.success(), "building the binaries failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Proc(Child);

impl Proc {
    /// SIGKILL: no cleanup, no flush, open transactions abandoned.
    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct CpProc {
    db_url: String,
    admin_port: u16,
    agent_port: u16,
    dir: PathBuf,
}

impl CpProc {
    fn spawn(&self) -> Proc {
        let child = Command::new(binary("kip-control-plane"))
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
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(self.admin_port);
        wait_port(self.agent_port);
        Proc(child)
    }
}

fn spawn_agent(config: &Path, http_port: u16) -> Proc {
    // sled may still hold the buffer's lock for a moment after the previous owner died.
    for _ in 0..100 {
        let mut child = Command::new(binary("kip-agent"))
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok() {
                return Proc(child);
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent could not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agent_and_control_plane_mid_stream_loses_and_duplicates_nothing() {
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    let db = format!("kip_sync_crash_{}", Uuid::new_v4().simple());
    let work = tempfile::tempdir().unwrap();
    FleetCa::init(&work.path().join("ca"), std::time::SystemTime::now()).unwrap();
    let cp = CpProc {
        db_url: format!("{PG}/{db}"),
        admin_port: free_port(),
        agent_port: free_port(),
        dir: work.path().to_owned(),
    };
    let mut cp_proc = cp.spawn();
    let pool = PgPool::connect(&cp.db_url).await.unwrap();
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
        let buffer = common::open_buffer(&state.join("buffer"));
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

    let agent = spawn_agent(&config, http_port);
    eventually(Duration::from_secs(60), "agent synced some", || async {
        count().await >= 2_000
    })
    .await;
    agent.kill9();
    let at_kill = count().await;
    assert!(at_kill < N, "the agent finished before it was killed");
    let agent = spawn_agent(&config, http_port);
    eventually(Duration::from_secs(60), "agent resumed", || async {
        count().await >= at_kill + 3_000
    })
    .await;

    // Now the control plane dies mid-stream (batches flow back to back, so mid-transaction).
    std::mem::replace(&mut cp_proc, Proc(Command::new("true").spawn().unwrap())).kill9();
    let at_cp_kill = count().await;
    assert!(
        at_cp_kill < N,
        "everything synced before the control plane was killed"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cp_proc = cp.spawn();

    eventually(Duration::from_secs(120), "every record synced", || async {
        count().await >= N
    })
    .await;
    let got = stored(&pool, device).await;
    assert_eq!(got, want, "stored set differs from appended set");
    agent.kill9();
    cp_proc.kill9();
    pool.close().await;
    let admin = PgPool::connect(&format!("{PG}/postgres")).await.unwrap();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn terminated_database_connections_mid_sync_lose_and_duplicate_nothing(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
    let buffer = common::open_buffer(&dir.path().join("buffer"));
    let mut want = BTreeSet::new();
    for i in 0..10_000u64 {
        let seq = buffer.append(&reading(i)).unwrap();
        want.insert((buffer.epoch(), seq));
    }
    let mut cfg = sync_config(vec![cp.agent_url.clone()]);
    cfg.batch_max_records = 100;
    let sync = start_sync(buffer.clone(), &id, cfg);
    let killer = PgPool::connect_with(pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    let mut kills = 0u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    while buffer.stats().unwrap().counts.total() > 0 {
        assert!(Instant::now() < deadline, "sync did not finish");
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

/// A private PostgreSQL (initdb + pg_ctl as user `postgres`) so a test may restart it.
struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePg {
    /// `None` (with the reason) when this process cannot run a private server.
    fn create() -> Result<Self, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| e.to_string())?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root (needed to run PostgreSQL as user postgres)".into());
        }
        let bin = PathBuf::from("/usr/lib/postgresql/15/bin");
        if !bin.join("initdb").exists() {
            return Err(format!("{} has no initdb", bin.display()));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let sh = |cmd: String| {
            Command::new("sh")
                .args(["-c", &cmd])
                .status()
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    s.success()
                        .then_some(())
                        .ok_or_else(|| format!("failed: {cmd}"))
                })
        };
        sh(format!(
            "chmod 755 {d} && mkdir {data} && chown postgres {data}",
            d = dir.path().display(),
            data = data.display()
        ))?;
        sh(format!(
            "su postgres -c '{}/initdb -D {} -A trust -U postgres' >/dev/null",
            bin.display(),
            data.display()
        ))?;
        let pg = Self {
            bin,
            data,
            port: free_port(),
            _dir: dir,
        };
        pg.start();
        Ok(pg)
    }

    fn ctl(&self, args: &str) {
        let cmd = format!(
            "su postgres -c \"{}/pg_ctl -D {} {args}\" >/dev/null",
            self.bin.display(),
            self.data.display()
        );
        let ok = Command::new("sh").args(["-c", &cmd]).status().unwrap();
        assert!(ok.success(), "{cmd}");
    }

    fn start(&self) {
        self.ctl(&format!(
            "-w -l {}/log -o '-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}' start",
            self.data.display(),
            self.port,
            self.data.display()
        ));
    }

    /// Like a crash: no shutdown checkpoint, every connection cut.
    fn stop_immediate(&self) {
        self.ctl("-w -m immediate stop");
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "su postgres -c \"{}/pg_ctl -D {} -m immediate stop\" >/dev/null 2>&1",
                    self.bin.display(),
                    self.data.display()
                ),
            ])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_and_restart_mid_sync_loses_and_duplicates_nothing() {
    let pg = match PrivatePg::create() {
        Ok(pg) => pg,
        Err(why) => {
            eprintln!("SKIPPED: cannot run a private PostgreSQL: {why}");
            return;
        }
    };
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    kip_control_plane::db::MIGRATOR.run(&pool).await.unwrap();
    let cp = start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", &dir.path().join("identity")).await;
    let buffer = common::open_buffer(&dir.path().join("buffer"));
    let mut want = BTreeSet::new();
    for i in 0..10_000u64 {
        let seq = buffer.append(&reading(i)).unwrap();
        want.insert((buffer.epoch(), seq));
    }
    let mut cfg = sync_config(vec![cp.agent_url.clone()]);
    cfg.batch_max_records = 100;
    let sync = start_sync(buffer.clone(), &id, cfg);
    let left = || buffer.stats().unwrap().counts.total();
    eventually(Duration::from_secs(30), "some records synced", || async {
        left() < 9_000
    })
    .await;
    pg.stop_immediate();
    eventually(
        Duration::from_secs(20),
        "agent notices the outage",
        || async { !sync.status.report().online },
    )
    .await;
    // An ack already on its way when the database died may still arrive; after that, none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_crash = left();
    assert!(at_crash > 0, "everything synced before the crash");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        left(),
        at_crash,
        "records were acked while the database was down"
    );
    pg.start();
    eventually(Duration::from_secs(60), "backlog drained", || async {
        left() == 0
    })
    .await;
    let got = stored(&pool, id.device_id()).await;
    assert_eq!(got, want);
    sync.stop().await;
}
