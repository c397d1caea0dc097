//! Unauthenticated load against legitimate traffic (issue #13, hole 5). For each mode, an
//! in-process control plane (admin API and mTLS agent listener on loopback, its own scratch
//! database, default pool of 16 connections) gets `AUTH_FLOOD_SECONDS` (default 30) of
//! requests with garbage bearer keys from `AUTH_FLOOD_CONCURRENCY` (default 64) concurrent
//! clients, while one admin client (a valid, cached key) lists organisations in a closed loop
//! and one enrolled device syncs 100-reading batches in a closed loop. Printed per mode:
//! admin p50/p99/max latency, agent batches/s and readings/s, and how the flood was answered.
//!
//! Modes:
//! - `before`: the guard off (`auth.negative_cache_ttl_ms = 0`,
//!   `auth.failed_auth_per_ip_per_minute = 0`) and the agent listener on the main pool
//!   (`database.agent_max_connections = 0`): the behaviour of the code before the fix;
//! - `after`: the defaults.
//!
//! Run: `cargo bench -p kip-control-plane --bench auth_flood` (PostgreSQL from `DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`); `AUTH_FLOOD_MODES=after` runs one
//! mode. Client, control plane and PostgreSQL share this machine's cores.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::{
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use chrono::Utc;
use kip_certs::{DeviceKey, FleetCa, TrustBundle, certs_from_pem};
use kip_control_plane::{ControlPlane, config::Config, http::AuthGuardConfig};
use kip_shared::{
    record::{Quality, Reading, Record, Sequenced},
    sync::SyncBatch,
};
use serde_json::{Value, json};
use sqlx::{ConnectOptions as _, Executor as _, postgres::PgConnectOptions};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let modes = std::env::var("AUTH_FLOOD_MODES").unwrap_or_else(|_| "before,after".into());
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for mode in modes.split(',') {
            run(mode.trim()).await;
        }
    });
}

async fn run(mode: &str) {
    let flood_s = env_num("AUTH_FLOOD_SECONDS", 30);
    let concurrency = env_num("AUTH_FLOOD_CONCURRENCY", 64);
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let db_name = format!("kip_bench_{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}/{db_name}", base.rsplit_once('/').unwrap().0);

    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    FleetCa::init(&ca_dir, SystemTime::now() - Duration::from_secs(86_400)).unwrap();
    let ca_s = ca_dir.to_str().unwrap().to_owned();
    let mut cfg = Config::load(None, |k| match k {
        "KIP_PKI_CA_DIR" => Some(ca_s.clone()),
        "KIP_DATABASE_URL" => Some(url.clone()),
        "KIP_LOG_FILTER" => Some("error".into()),
        _ => None,
    })
    .unwrap();
    cfg.admin_key_file = dir.path().join("admin.key");
    cfg.shutdown_grace = Duration::from_secs(1);
    if mode == "before" {
        cfg.auth_guard = AuthGuardConfig::OFF;
        cfg.database_agent_max_connections = 0;
    }
    let token = CancellationToken::new();
    let cp = ControlPlane::builder(cfg)
        .admin_listener(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        .agent_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .cancellation_token(token.clone())
        .start()
        .await
        .unwrap();
    let admin_url = format!("http://{}", cp.admin_addr().unwrap());
    let agent_url = format!("https://127.0.0.1:{}", cp.agent_addr().unwrap().port());
    let admin_key = std::fs::read_to_string(dir.path().join("admin.key"))
        .unwrap()
        .trim()
        .to_owned();
    let http = reqwest::Client::new();

    // One organisation and one enrolled device.
    let post = |path: &str, body: Value| {
        http.post(format!("{admin_url}{path}"))
            .bearer_auth(&admin_key)
            .json(&body)
            .send()
    };
    let org: Value = post("/v1/organisations", json!({ "name": "bench" }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let org_id = org["id"].as_str().unwrap().to_owned();
    let tok: Value = post(
        &format!("/v1/organisations/{org_id}/enroll-tokens"),
        json!({}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert: Value = http
        .post(format!("{admin_url}/enroll"))
        .json(&json!({
            "token": tok["token"], "device_name": "gw-bench",
            "csr_pem": key.csr_pem("gw-bench").unwrap(),
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bundle = TrustBundle::from_pem(cert["trust_bundle_pem"].as_str().unwrap()).unwrap();
    let chain = certs_from_pem(cert["certificate_chain_pem"].as_str().unwrap(), "c").unwrap();
    let tls = (*kip_certs::client_config(&bundle, chain, key.private_key_der()).unwrap()).clone();
    let agent = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap();

    let tracker = TaskTracker::new();
    let deadline = Instant::now() + Duration::from_secs(flood_s);
    // The flood: garbage keys of the valid shape, each a new one.
    let answers: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // 401, 429, other, error
    let mut flood = Vec::new();
    for c in 0..concurrency {
        let (http, url, answers) = (http.clone(), admin_url.clone(), answers.clone());
        flood.push(tracker.spawn(async move {
            let mut i: u64 = 0;
            while Instant::now() < deadline {
                i += 1;
                let key = format!("kip_{:06x}{:06x}_{}", c, i & 0xff_ffff, "B".repeat(43));
                let slot = match http
                    .get(format!("{url}/v1/organisations"))
                    .bearer_auth(key)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 401 => 0,
                    Ok(r) if r.status() == 429 => 1,
                    Ok(_) => 2,
                    Err(_) => 3,
                };
                answers[slot].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Legitimate admin traffic, closed loop.
    let admin = {
        let (http, url, key) = (http.clone(), admin_url.clone(), admin_key.clone());
        tracker.spawn(async move {
            let (mut lat, mut failed) = (Vec::new(), 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match http
                    .get(format!("{url}/v1/organisations"))
                    .bearer_auth(&key)
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => lat.push(t.elapsed()),
                    _ => failed += 1,
                }
            }
            (lat, failed)
        })
    };
    // Agent ingest, closed loop.
    let sync = tracker.spawn(async move {
        let (mut batches, mut failed, mut seq) = (0u64, 0u64, 0u64);
        while Instant::now() < deadline {
            let first = seq + 1;
            let records: Vec<Sequenced> = (0..100)
                .map(|i| {
                    seq += 1;
                    Sequenced {
                        epoch: 1,
                        seq,
                        record: Record::Reading(Reading {
                            source: "plc".into(),
                            machine: "press-1".into(),
                            metric: "temp".into(),
                            ts: Utc::now(),
                            value: f64::from(i),
                            quality: Quality::Good,
                        }),
                    }
                })
                .collect();
            let batch = SyncBatch {
                protocol_version: kip_shared::PROTOCOL_VERSION,
                agent_version: "bench".into(),
                epoch: 1,
                first_seq: first,
                last_seq: seq,
                records,
                running_model: None,
                health: None,
            };
            match agent
                .post(format!("{agent_url}/v1/agent/sync"))
                .json(&batch)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => batches += 1,
                _ => failed += 1,
            }
        }
        (batches, failed)
    });
    let (mut lat, admin_failed) = admin.await.unwrap();
    let (batches, sync_failed) = sync.await.unwrap();
    for f in flood {
        f.await.unwrap();
    }
    tracker.close();
    tracker.wait().await;
    lat.sort();
    let n = |i: usize| answers[i].load(Ordering::Relaxed);
    println!(
        "{mode:>6}: flood {flood_s} s x {concurrency} clients: {} requests ({} x 401, {} x 429, \
         {} other, {} errors)",
        n(0) + n(1) + n(2) + n(3),
        n(0),
        n(1),
        n(2),
        n(3)
    );
    println!(
        "{mode:>6}: admin GET /v1/organisations: {} ok, {admin_failed} failed, p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "{mode:>6}: agent sync: {batches} batches ({:.1}/s, {:.0} readings/s), {sync_failed} failed",
        batches as f64 / flood_s as f64,
        batches as f64 * 100.0 / flood_s as f64
    );

    token.cancel();
    cp.wait().await;
    let mut conn = PgConnectOptions::from_str(&base)
        .unwrap()
        .connect()
        .await
        .unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    )))
    .await
    .unwrap();
}
