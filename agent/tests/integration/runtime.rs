//! The whole agent: MQTT broker -> sources -> buffer, the HTTP surface, the CLI summaries and
//! clean shutdown, in-process and as the real binary.
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "helpers of tests fail the test loudly"
)]

use std::{path::Path, process::Command, time::Duration};

use kip_agent::{
    buffer::{Buffer, BufferOptions},
    cli,
    config::Config,
    runtime::{self, StatusReport, local_get},
};
use kip_shared::Record;
use kip_tests::{
    ChildGroup, Mosquitto, eventually, eventually_ok, free_port, mosquitto::publish, wait_until,
};
use tokio_util::sync::CancellationToken;

fn write_config(dir: &Path, broker_port: u16, http_port: u16) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
device = "gw-test"
state_dir = "{state}"

[buffer]
max_bytes = 10485760
flush_interval_ms = 50

[http]
listen_addr = "127.0.0.1:{http_port}"

[log]
format = "text"

[[mqtt]]
name = "b1"
url = "mqtt://127.0.0.1:{broker_port}"
client_id = "kip-runtime-{broker_port}"
reconnect_min_backoff_ms = 50
reconnect_max_backoff_ms = 200

[[mqtt.subscriptions]]
topic = "plant/+/temp"
machine_topic_level = 1
metric = "temperature"
value = {{ kind = "number" }}
"#,
            state = dir.join("state").display()
        ),
    )
    .unwrap();
    path
}

/// How long sled may keep its file lock after the last handle is dropped.
const LOCK_RELEASE: Duration = Duration::from_secs(5);

/// Opens the buffer once the in-process agent let go of it (sled may finish background log
/// writes just after the last handle is dropped, holding the file lock for a moment).
async fn open_when_released(dir: &Path) -> Buffer {
    eventually_ok(LOCK_RELEASE, || async {
        match Buffer::open(dir, BufferOptions::with_max_bytes(1 << 30)) {
            Err(e @ kip_agent::buffer::BufferError::Locked { .. }) => Err(e),
            other => Ok(other.unwrap()),
        }
    })
    .await
}

async fn retry_while_locked<F, Fut>(f: F) -> String
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, cli::CliError>>,
{
    eventually_ok(LOCK_RELEASE, || async {
        match f().await {
            Err(e @ cli::CliError::RunningButSilent { .. }) => Err(e),
            other => Ok(other.unwrap()),
        }
    })
    .await
}

async fn status(addr: std::net::SocketAddr) -> Option<StatusReport> {
    let (code, body) = local_get(addr, "/v1/status").await.ok()?;
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

/// Publishes until the agent reports `n` readings.
async fn publish_until_readings(addr: std::net::SocketAddr, port: u16, n: u64) {
    let _: () = eventually(Duration::from_secs(30), || async move {
        if let Some(s) = status(addr).await
            && s.sources.iter().map(|s| s.readings).sum::<u64>() >= n
        {
            return Ok(());
        }
        publish(port, "plant/press1/temp", b"20.5", None);
        Err(())
    })
    .await
    .unwrap_or_else(|()| panic!("readings never arrived"));
}

#[tokio::test]
async fn the_agent_buffers_readings_serves_metrics_and_flushes_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let cfg_path = write_config(dir.path(), broker.port, 0);
    let cfg = Config::load(&cfg_path).unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg.clone(), cancel.clone()).await.unwrap();
    let addr = agent.http_addr;

    publish_until_readings(addr, broker.port, 1).await;
    publish(broker.port, "plant/press1/temp", b"{oops", None);
    wait_until(
        Duration::from_secs(10),
        "the dead letter is counted",
        || async { status(addr).await.unwrap().sources[0].dead_letters >= 1 },
    )
    .await;

    let (code, body) = local_get(addr, "/healthz").await.unwrap();
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, metrics) = local_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for needle in [
        "kip_agent_readings_total{source=\"b1\",metric=\"temperature\"}",
        "kip_agent_dead_letters_total{source=\"b1\"} 1",
        "kip_agent_source_reconnects_total",
        "kip_agent_buffer_bytes ",
        "kip_agent_buffer_oldest_unacked_age_seconds ",
        "kip_agent_buffer_evicted_records_total 0",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // While the agent holds the buffer, the CLI goes through its HTTP surface (the config
    // said port 0: point the CLI at the bound port).
    let mut cfg = cfg;
    cfg.http_listen_addr = addr;
    let text = cli::status(&cfg).await.unwrap();
    assert!(
        text.contains("gw-test") && text.contains("running, healthy"),
        "{text}"
    );
    assert!(text.contains("b1") && text.contains("connected"), "{text}");
    let text = cli::inspect(&cfg, 3).await.unwrap();
    assert!(text.contains("read through the running agent"), "{text}");
    assert!(text.contains("\"kind\":\"reading\""), "{text}");

    let readings = status(addr).await.unwrap().sources[0].readings;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .unwrap();
    // Clean shutdown: everything handed to the writer is in the buffer.
    let buffer = open_when_released(&cfg.buffer_dir()).await;
    let all = buffer.read_range(0, usize::MAX, u64::MAX).unwrap();
    let n_readings = all
        .iter()
        .filter(|s| matches!(s.record, Record::Reading(_)))
        .count() as u64;
    assert!(n_readings >= readings, "{n_readings} < {readings}");
    assert!(
        all.iter()
            .any(|s| matches!(&s.record, Record::DeadLetter(d) if d.payload_prefix == b"{oops"))
    );
    drop(buffer);

    // Stopped: the CLI reads the buffer itself (retrying while this process's dropped
    // handles still hold sled's lock for a moment).
    let text = retry_while_locked(|| cli::status(&cfg)).await;
    assert!(text.contains("not running"), "{text}");
    let text = retry_while_locked(|| cli::inspect(&cfg, 2)).await;
    assert!(
        text.contains("agent not running") && text.contains("newest 2"),
        "{text}"
    );
}

/// A pipeline stopped and started again in the same process (what every remote configuration
/// change does) gets its buffer back at once, even while blocking work of the stopped one (a
/// batch read ahead by the sync loop, the deletion of an acknowledged batch) still held it when
/// its tasks ended: `wait` returns only once the last handle is gone. The restart used to fail
/// with "in use by another process", which rolled back a good configuration.
#[tokio::test]
async fn a_restart_in_the_same_process_gets_the_buffer_while_blocking_work_still_held_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let cfg = Config::load(&write_config(dir.path(), broker.port, 0)).unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg.clone(), cancel.clone()).await.unwrap();
    let (held, release) = std::sync::mpsc::channel::<()>();
    let blocking = {
        let buffer = agent.buffer.clone();
        tokio::task::spawn_blocking(move || {
            // Like a read ahead: holds the buffer until it is done.
            let _ = release.recv_timeout(Duration::from_millis(300));
            buffer.stats().unwrap()
        })
    };
    let handle = std::sync::Arc::downgrade(&agent.buffer);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(15), agent.wait())
        .await
        .unwrap();
    drop(held);
    assert!(
        handle.upgrade().is_none(),
        "wait returned with the buffer open"
    );
    blocking.await.unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg, cancel.clone()).await.unwrap();
    cancel.cancel();
    agent.wait().await;
}

/// Hole 10: a buffer sled cannot open used to stop the agent at every start (crash loop).
/// Now it is moved aside, counted and reported, and the agent runs on a fresh buffer whose
/// epoch is above the lost one's.
#[tokio::test]
async fn an_unreadable_buffer_is_quarantined_and_the_agent_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(dir.path(), 1, 0);
    let cfg = Config::load(&cfg_path).unwrap();
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let old_epoch = {
        let b = Buffer::open(&cfg.buffer_dir(), BufferOptions::with_max_bytes(1 << 20)).unwrap();
        b.append(&Record::Gap(kip_shared::Gap {
            source: "b1".into(),
            from: chrono::Utc::now(),
            to: chrono::Utc::now(),
            reason: "test".into(),
        }))
        .unwrap();
        b.flush_blocking().unwrap();
        b.epoch()
    };
    let buffer_dir = cfg.buffer_dir();
    drop(open_when_released(&buffer_dir).await);
    std::fs::write(cfg.buffer_dir().join("meta"), b"not a buffer meta file").unwrap();

    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg.clone(), cancel.clone()).await.unwrap();
    let s = status(agent.http_addr).await.unwrap();
    assert_eq!(s.quarantined_buffers.len(), 1, "{s:?}");
    assert!(s.quarantined_buffers[0].contains("buffer.quarantined-"));
    assert!(s.buffer.epoch > old_epoch);
    let (_, metrics) = local_get(agent.http_addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("kip_agent_buffer_quarantined_dirs 1"),
        "{metrics}"
    );
    cancel.cancel();
    agent.wait().await;
    let text = retry_while_locked(|| cli::status(&cfg)).await;
    assert!(text.contains("QUARANTINED buffer"), "{text}");
}

#[tokio::test]
async fn a_locked_buffer_with_a_silent_surface_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write_config(dir.path(), 1, free_port());
    let cfg = Config::load(&cfg_path).unwrap();
    let err = cli::inspect(&cfg, 1).await.unwrap_err().to_string();
    assert!(err.contains("no buffer"), "{err}");
    std::fs::create_dir_all(&cfg.state_dir).unwrap();
    let _held = Buffer::open(&cfg.buffer_dir(), BufferOptions::with_max_bytes(1 << 20)).unwrap();
    for err in [
        cli::status(&cfg).await.unwrap_err().to_string(),
        cli::inspect(&cfg, 1).await.unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("seems to be running") && err.contains("locked"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn the_binary_runs_answers_status_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let http_port = free_port();
    let cfg_path = write_config(dir.path(), broker.port, http_port);
    let bin = env!("CARGO_BIN_EXE_kip-agent");
    let mut child = ChildGroup::spawn(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .stderr(std::process::Stdio::null()),
    )
    .unwrap()
    // A clean stop flushes the buffer: give it time before SIGKILL.
    .with_grace(Duration::from_secs(30));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    wait_until(Duration::from_secs(30), "the agent comes up", || async {
        status(addr).await.is_some()
    })
    .await;
    publish_until_readings(addr, broker.port, 3).await;

    let out = Command::new(bin)
        .args(["status", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("running, healthy"), "{text}");

    let readings = status(addr).await.unwrap().sources[0].readings;
    // SIGTERM; the agent must exit by itself, successfully, within the grace period.
    let code = tokio::task::spawn_blocking(move || {
        child.terminate();
        child.try_wait().unwrap()
    })
    .await
    .unwrap();
    assert!(code.is_some_and(|c| c.success()), "{code:?}");

    let out = Command::new(bin)
        .args(["buffer", "inspect", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("agent not running"), "{text}");
    let buffer = Buffer::open(
        &dir.path().join("state/buffer"),
        BufferOptions::with_max_bytes(1 << 30),
    )
    .unwrap();
    assert!(buffer.stats().unwrap().counts.reading >= readings);
}
