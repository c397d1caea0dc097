//! The fleet load generator (`kip-fleet-sim`) against the real control plane (in-process, real
//! mTLS agent listener, real PostgreSQL): a brief run of 50 agents enrolls them through
//! `/enroll`, their readings land exactly once, and the figures it prints are non-zero; a
//! second run from the same state directory enrolls nobody and still stores new rows. A
//! behaviour test, not a timed one: the figures themselves are measured by hand
//! (docs/performance.md, "Fleet load").
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{path::Path, process::Command, time::Duration};

use kip_tests::{ChildGroup, TestDb, control_plane::start_with, eventually_ok, workspace_binary};
use serde_json::Value;
use sqlx::PgPool;

const AGENTS: i64 = 50;

/// Runs the generator for `duration_s` and returns its summary.
async fn run_sim(
    cp: &kip_tests::control_plane::ControlPlane,
    work: &Path,
    run: &str,
    duration_s: u64,
) -> Value {
    let key_file = work.join("admin.key");
    std::fs::write(&key_file, &cp.admin_key).unwrap();
    let summary = work.join(format!("{run}.json"));
    let mut child = ChildGroup::spawn(
        Command::new(workspace_binary("kip-fleet-sim"))
            .args(["--admin-url", &cp.admin_url, "--agent-url", &cp.agent_url])
            .arg("--admin-key-file")
            .arg(&key_file)
            .arg("--state-dir")
            .arg(work.join("state"))
            .args(["--agents", &AGENTS.to_string()])
            .args(["--duration-s", &duration_s.to_string()])
            // Several syncs and heartbeats per agent in a few seconds, at a rate a loaded
            // 2-core machine serves without refusals piling up.
            .args([
                "--sync-interval-ms",
                "1000",
                "--heartbeat-interval-ms",
                "1500",
            ])
            .args([
                "--readings-per-sync-min",
                "10",
                "--readings-per-sync-max",
                "50",
            ])
            .args(["--report-interval-s", "1", "--max-in-flight", "64"])
            .arg("--summary-json")
            .arg(&summary)
            .stdout(std::process::Stdio::null()),
    )
    .unwrap();
    let status = eventually_ok(Duration::from_secs(180), || {
        let s = child.try_wait();
        async move {
            match s {
                Ok(Some(s)) => Ok(s),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(status.success(), "kip-fleet-sim {run} exited with {status}");
    serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap()
}

/// (rows, distinct (device, epoch, seq), devices) stored for `epoch`.
async fn stored(pool: &PgPool, epoch: i64) -> (i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT (device_id, epoch, seq)), count(DISTINCT device_id) \
         FROM sensor_data WHERE epoch = $1",
    )
    .bind(epoch)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Errors other than a refusal (`503`: the control plane was too busy or shed the request,
/// the batch is resent unchanged) fail the test: a TLS, HTTP or decoding error is a bug.
fn only_refusals(summary: &Value) {
    let errors = summary["errors"].as_object().unwrap();
    assert!(
        errors.keys().all(|k| k == "status_503" || k == "shed_503"),
        "unexpected errors: {summary}"
    );
}

fn num(v: &Value, path: &str) -> i64 {
    v.pointer(path)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("summary has no integer {path}: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_fleet_enrolls_once_and_lands_every_reading_exactly_once() {
    let db = TestDb::create().await;
    // 50 enrollments from one address within a minute: lift the per-address limit.
    let cp = start_with(db.pool.clone(), None, |cfg| {
        cfg.pki.enrollments_per_ip_per_minute = 0;
    })
    .await;
    let work = tempfile::tempdir().unwrap();

    let first = run_sim(&cp, work.path(), "first", 5).await;
    assert_eq!(num(&first, "/agents"), AGENTS);
    assert_eq!(num(&first, "/enrolled_now"), AGENTS, "{first}");
    only_refusals(&first);
    let acked = num(&first, "/counters/readings_acked");
    assert!(num(&first, "/counters/syncs") > 0, "{first}");
    assert!(num(&first, "/counters/heartbeats") > 0, "{first}");
    // One connection per agent, kept alive.
    assert_eq!(num(&first, "/counters/handshakes"), AGENTS, "{first}");
    assert!(first["syncs_per_s"].as_f64().unwrap() > 0.0);
    assert!(first["handshakes_per_s"].as_f64().unwrap() > 0.0);
    assert!(first["latency"]["sync"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(first["latency"]["sync"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(first["generator_cpu_s"].as_f64().unwrap() > 0.0);
    // Every acknowledged reading was counted once, as new or as a replay of a batch whose
    // answer was lost; nothing else.
    assert_eq!(
        num(&first, "/inserted") + num(&first, "/duplicates"),
        acked,
        "{first}"
    );
    let (rows, distinct, devices) = stored(&db.pool, num(&first, "/epoch")).await;
    assert_eq!((rows, distinct, devices), (acked, acked, AGENTS), "{first}");
    let enrolled: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(enrolled, AGENTS);

    // Same state directory: the cached certificates are used, nobody enrolls again.
    let second = run_sim(&cp, work.path(), "second", 2).await;
    assert_eq!(num(&second, "/enrolled_now"), 0, "{second}");
    only_refusals(&second);
    assert_ne!(num(&second, "/epoch"), num(&first, "/epoch"));
    let acked2 = num(&second, "/counters/readings_acked");
    assert!(acked2 > 0, "{second}");
    let (rows2, distinct2, _) = stored(&db.pool, num(&second, "/epoch")).await;
    assert_eq!((rows2, distinct2), (acked2, acked2), "{second}");
    let enrolled: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(enrolled, AGENTS, "the second run enrolled devices again");
}
