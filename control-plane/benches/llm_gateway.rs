//! Load generator for the LLM gateway: the same request sent directly to a fake provider on
//! loopback and through the gateway (auth, routing, breaker, rate limit, logging) to that
//! fake. Prints latency percentiles, the gateway's overhead, sustained throughput and RSS.
//! Figures only, no assertions: run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench -p kip-control-plane --bench llm_gateway`
//! (options: `LLM_BENCH_REQUESTS`, `LLM_BENCH_CONCURRENCY`).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

#[path = "../tests/common/fake_llm.rs"]
mod fake_llm;

use std::{
    str::FromStr as _,
    sync::Arc,
    time::{Duration, Instant},
};

use fake_llm::{FakeLlm, Reply};
use kip_control_plane::{config::Config, db, llm::config::LlmConfig, server};
use serde_json::{Value, json};
use sqlx::{ConnectOptions as _, Executor as _, postgres::PgConnectOptions};
use tokio_util::task::TaskTracker;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Sends `total` requests with `concurrency` workers; returns sorted latencies and wall time.
async fn load(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    total: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let (client, url, key, body, next) = (
            client.clone(),
            url.to_owned(),
            key.map(str::to_owned),
            body.clone(),
            next.clone(),
        );
        handles.push(tracker.spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t0 = Instant::now();
                let mut req = client.post(&url).json(&body);
                if let Some(k) = &key {
                    req = req.bearer_auth(k);
                }
                let resp = req.send().await.expect("request failed");
                assert!(resp.status().is_success(), "status {}", resp.status());
                let _ = resp.bytes().await.expect("body failed");
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(total);
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort();
    (all, wall)
}

/// Sequential GETs with the key; sorted latencies and wall time.
async fn load_get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    total: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut lat = Vec::with_capacity(total);
    for _ in 0..total {
        let t0 = Instant::now();
        let resp = client
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .expect("request failed");
        assert!(resp.status().is_success(), "status {}", resp.status());
        let _ = resp.bytes().await.expect("body failed");
        lat.push(t0.elapsed());
    }
    let wall = started.elapsed();
    lat.sort();
    (lat, wall)
}

fn report(name: &str, lat: &[Duration], wall: Duration) {
    println!(
        "{name:<34} n={:<6} p50={:>8.3} ms  p99={:>8.3} ms  rps={:>8.0}",
        lat.len(),
        pct(lat, 0.50).as_secs_f64() * 1000.0,
        pct(lat, 0.99).as_secs_f64() * 1000.0,
        lat.len() as f64 / wall.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let total = env_num("LLM_BENCH_REQUESTS", 5000);
    let concurrency = env_num("LLM_BENCH_CONCURRENCY", 32);
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("kip_llm_bench_{}", std::process::id());
    let admin_opts = PgConnectOptions::from_str(&base)?;
    let mut admin = admin_opts.connect().await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(admin_opts.clone().database(&name))
        .await?;
    db::migrate(&pool).await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("admin.key");
    db::ensure_admin_key(&pool, &key_file).await?;
    let admin_key = std::fs::read_to_string(&key_file)?.trim().to_owned();

    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "hello"))).await;
    let mut cfg = Config::load(None, |_| None)?;
    cfg.llm = LlmConfig::from_toml(
        &format!(
            "rate_limit_per_minute = 1000000000\nrate_limit_burst = 1000000\n\
             monthly_budget_usd = 1000000.0\ncache_max_entries = 0\n\
             [providers.fake]\nkind = \"openai_compatible\"\nbase_url = \"{}\"\n\
             [providers.fake.prices]\nm = {{ input_per_1m_usd = 1.0, output_per_1m_usd = 2.0 }}\n",
            fake.base_url()
        ),
        |_| None,
    )?;
    let state = server::AppState::new(pool.clone(), &cfg);
    let tracker = TaskTracker::new();
    state.llm.start_log_writer(&tracker);
    let metrics = state.metrics.clone();
    let router = server::router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tracker.spawn(async move { axum::serve(listener, router).await });

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let gw = format!("http://{addr}");
    let org: Value = client
        .post(format!("{gw}/v1/organisations"))
        .bearer_auth(&admin_key)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .json()
        .await?;
    let org_id = org["id"].as_str().expect("org id").to_owned();
    let k: Value = client
        .post(format!("{gw}/v1/organisations/{org_id}/api-keys"))
        .bearer_auth(&admin_key)
        .json(&json!({"name": "bench"}))
        .send()
        .await?
        .json()
        .await?;
    let key = k["key"].as_str().expect("key").to_owned();

    let body = json!({"model": "fake/m", "messages": [{"role": "user", "content": "hello"}]});
    let direct = format!("{}/chat/completions", fake.base_url());
    let via = format!("{gw}/v1/chat/completions");
    println!(
        "LLM gateway benchmark: {total} requests per run, loopback, 2-core machine shared by \
         client, gateway, fake provider and PostgreSQL"
    );
    // Warm-up: connections, caches, JIT-free but allocator and pool warm.
    load(&client, &direct, None, &body, 500, 4).await;
    load(&client, &via, Some(&key), &body, 500, 4).await;
    let rss_before = rss_kib();

    let (d1, w1) = load(&client, &direct, None, &body, total, 1).await;
    report("direct, 1 client", &d1, w1);
    let (g1, gw1) = load(&client, &via, Some(&key), &body, total, 1).await;
    report("via gateway, 1 client", &g1, gw1);
    println!(
        "gateway overhead, 1 client:        p50={:.3} ms  p99={:.3} ms",
        (pct(&g1, 0.5).as_secs_f64() - pct(&d1, 0.5).as_secs_f64()) * 1000.0,
        (pct(&g1, 0.99).as_secs_f64() - pct(&d1, 0.99).as_secs_f64()) * 1000.0
    );
    // The part of the overhead that is API-key authentication (one PostgreSQL lookup per
    // request, by design: revocation takes effect on the next request).
    let me = format!("{gw}/v1/me");
    let (a1, aw1) = load_get(&client, &me, &key, total).await;
    report("auth only (GET /v1/me), 1 client", &a1, aw1);
    let (dn, wn) = load(&client, &direct, None, &body, total, concurrency).await;
    report(&format!("direct, {concurrency} clients"), &dn, wn);
    let (gn, gwn) = load(&client, &via, Some(&key), &body, total, concurrency).await;
    report(&format!("via gateway, {concurrency} clients"), &gn, gwn);
    println!(
        "gateway overhead, {concurrency} clients:       p50={:.3} ms  p99={:.3} ms",
        (pct(&gn, 0.5).as_secs_f64() - pct(&dn, 0.5).as_secs_f64()) * 1000.0,
        (pct(&gn, 0.99).as_secs_f64() - pct(&dn, 0.99).as_secs_f64()) * 1000.0
    );
    let rss_after = rss_kib();
    println!(
        "process RSS (client + gateway + fake): {} MiB before load, {} MiB after",
        rss_before / 1024,
        rss_after / 1024
    );
    // Let the log writer catch up, then count what it wrote.
    let expected = (2 * total + 500) as i64;
    let t0 = Instant::now();
    let mut rows: i64 = 0;
    while t0.elapsed() < Duration::from_secs(30) {
        rows = sqlx::query_scalar("SELECT count(*) FROM inference_logs")
            .fetch_one(&pool)
            .await?;
        if rows >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = metrics.render();
    let dropped = m
        .lines()
        .find(|l| l.starts_with("kip_llm_log_rows_dropped_total"))
        .unwrap_or("")
        .to_owned();
    println!("inference_logs rows written: {rows} of {expected} gateway calls; {dropped}");
    pool.close().await;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    Ok(())
}
