//! Load generator for the LLM gateway. The real `kip-control-plane` binary runs as its own
//! process (so its RSS is measured alone) in front of a fake OpenAI-compatible provider on
//! loopback; the same request is sent directly to the fake and through the gateway (API-key
//! auth, routing, breaker, rate limit, budget, metrics, batched `inference_logs`).
//!
//! Phases, figures only (no assertions):
//! 1. one client, closed loop: per-request overhead without queueing;
//! 2. open loop at fixed rates (`LLM_BENCH_RATES`, default `500,1000,2000` requests/s, each for
//!    `LLM_BENCH_SECONDS`, default 10): p50/p99/p99.9 direct and via the gateway, and the
//!    difference, which is the gateway's overhead at that rate;
//!    with `LLM_BENCH_REPEAT=n` the rates run n times in a row and the spread of the p99
//!    overhead per rate is printed (the target is held in every run, not in the best one);
//! 3. closed loop with `LLM_BENCH_CONCURRENCY` clients (default 32): maximum sustained rate;
//! 4. optional soak (`LLM_BENCH_SOAK_S`, e.g. 600) at `LLM_BENCH_SOAK_RPS` (default 2000):
//!    gateway RSS and p99 every 30 s, to show whether memory grows.
//!
//! Each open-loop run also prints CPU time per request of the gateway process and of the
//! PostgreSQL server (postmaster and its children, found through `data_directory`), and the
//! gateway's involuntary context switches per request (its threads preempted while runnable):
//! figures that depend much less on the machine's other load than latency does, for
//! before/after comparisons on a shared machine. Clock-tick resolution (10 ms) over a run of
//! thousands of requests.
//!
//! `LLM_BENCH_GATEWAY_BIN`: measure another `kip-control-plane` binary (a saved copy of an
//! earlier build) with this load generator, for before/after runs in one session.
//!
//! Run: `cargo bench -p kip-control-plane --bench llm_gateway` (PostgreSQL from `DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`). Client, gateway, fake provider and
//! PostgreSQL share this machine's cores, so the figures are an upper bound on the overhead.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::{
    process::{Command, Stdio},
    str::FromStr as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use kip_tests::{
    ChildGroup,
    fake_llm::{self, FakeLlm, Reply},
    free_port, wait_until,
};
use serde_json::{Value, json};
use sqlx::{ConnectOptions as _, Executor as _, postgres::PgConnectOptions};
use tokio_util::task::TaskTracker;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU ticks of the PostgreSQL server: the postmaster and every process it started.
fn pg_ticks(postmaster: Option<u32>) -> u64 {
    let Some(pm) = postmaster else {
        return 0;
    };
    let mut total = cpu_ticks(pm);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && parent_of(pid) == Some(pm)
        {
            total += cpu_ticks(pid);
        }
    }
    total
}

/// Involuntary context switches of all threads of a process.
fn preemptions(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("nonvoluntary_ctxt_switches:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum()
}

/// CPU figures of the gateway and PostgreSQL at one moment.
#[derive(Clone, Copy)]
struct Cpu {
    gateway: u64,
    postgres: u64,
    preempted: u64,
}

impl Cpu {
    fn now(gateway: u32, postmaster: Option<u32>) -> Self {
        Self {
            gateway: cpu_ticks(gateway),
            postgres: pg_ticks(postmaster),
            preempted: preemptions(gateway),
        }
    }

    /// `gateway CPU x us/req, PostgreSQL CPU y us/req, z preemptions/1000 req` since `self`.
    fn per_request(&self, later: &Self, requests: usize) -> String {
        let n = requests.max(1) as f64;
        // Clock ticks are 10 ms on Linux (USER_HZ = 100).
        let us = |ticks: u64| ticks as f64 * 10_000.0 / n;
        format!(
            "gateway CPU {:.0} us/req, PostgreSQL CPU {:.0} us/req, gateway preempted {:.1} times/1000 req",
            us(later.gateway.saturating_sub(self.gateway)),
            us(later.postgres.saturating_sub(self.postgres)),
            later.preempted.saturating_sub(self.preempted) as f64 * 1000.0 / n
        )
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `kip-control-plane` binary to measure: `LLM_BENCH_GATEWAY_BIN` (a copy of an earlier
/// build, for before/after runs alternating in one session), else this build's.
fn gateway_binary() -> std::path::PathBuf {
    std::env::var_os("LLM_BENCH_GATEWAY_BIN").map_or_else(
        || env!("CARGO_BIN_EXE_kip-control-plane").into(),
        std::path::PathBuf::from,
    )
}

/// The gateway under test, stopped (as a process group) on drop.
struct Gateway {
    child: ChildGroup,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_gateway(db_url: &str, fake: &FakeLlm) -> (Gateway, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let key_file = dir.path().join("admin.key");
    let config = dir.path().join("control-plane.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten_addr = \"127.0.0.1:{port}\"\n\
             [database]\nurl = \"{db_url}\"\n\
             [auth]\nadmin_key_file = \"{}\"\n\
             [log]\nformat = \"text\"\nfilter = \"warn\"\n\
             [llm]\nrate_limit_per_minute = 1000000000\nrate_limit_burst = 1000000\n\
             monthly_budget_usd = 1000000.0\ncache_max_entries = 0\n\
             {}\n\
             [llm.providers.fake]\nkind = \"openai_compatible\"\nbase_url = \"{}\"\n\
             [llm.providers.fake.prices]\nm = {{ input_per_1m_usd = 1.0, output_per_1m_usd = 2.0 }}\n",
            key_file.display(),
            // Extra `[llm]` settings for experiments, e.g. "log_flush_interval_ms = 1000".
            std::env::var("LLM_BENCH_LLM_TOML").unwrap_or_default(),
            fake.base_url()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let child = ChildGroup::spawn(
        Command::new(gateway_binary())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let gw = Gateway {
        child,
        url: url.clone(),
        _dir: dir,
    };
    let client = reqwest::Client::new();
    wait_until(Duration::from_secs(60), "the gateway is ready", || {
        let (client, url, key_file) = (&client, &url, &key_file);
        async move {
            client
                .get(format!("{url}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
                && key_file.exists()
        }
    })
    .await;
    let admin = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    (gw, admin)
}

#[derive(Clone)]
struct Target {
    url: String,
    key: Option<String>,
}

async fn one(client: &reqwest::Client, t: &Target, body: &Value) -> bool {
    let mut req = client.post(&t.url).json(body);
    if let Some(k) = &t.key {
        req = req.bearer_auth(k);
    }
    match req.send().await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            resp.bytes().await.is_ok() && ok
        }
        Err(_) => false,
    }
}

struct Run {
    lat: Vec<Duration>,
    wall: Duration,
    errors: usize,
}

impl Run {
    fn report(&self, name: &str) {
        println!(
            "{name:<36} n={:<7} p50={:>7.3} ms  p99={:>7.3} ms  p99.9={:>7.3} ms  rps={:>6.0}  errors={}",
            self.lat.len(),
            ms(pct(&self.lat, 0.50)),
            ms(pct(&self.lat, 0.99)),
            ms(pct(&self.lat, 0.999)),
            self.lat.len() as f64 / self.wall.as_secs_f64(),
            self.errors
        );
    }
}

/// Closed loop: `concurrency` workers send `total` requests back to back.
async fn closed(
    client: &reqwest::Client,
    t: &Target,
    body: &Value,
    total: usize,
    concurrency: usize,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let (client, t, body, next, errors) = (
            client.clone(),
            t.clone(),
            body.clone(),
            next.clone(),
            errors.clone(),
        );
        handles.push(tracker.spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                if one(&client, &t, &body).await {
                    lat.push(t0.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let wall = started.elapsed();
    lat.sort();
    Run {
        lat,
        wall,
        errors: errors.load(Ordering::Relaxed),
    }
}

/// Open loop: requests start on a fixed schedule of `rate` per second for `dur`, whatever the
/// latency of earlier ones (so a slow gateway cannot slow the load down and hide its queueing).
/// Latency is measured from the moment each request task runs: tokio's timer has 1 ms
/// granularity, and counting its lateness would add the same noise to both paths.
async fn open(
    client: &reqwest::Client,
    t: &Target,
    body: &Value,
    rate: usize,
    dur: Duration,
) -> Run {
    let lat = Arc::new(Mutex::new(Vec::with_capacity(
        rate * dur.as_secs() as usize,
    )));
    let errors = Arc::new(AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut i: u32 = 0;
    loop {
        let due = started + period * i;
        if due.duration_since(started) >= dur {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let (client, t, body, lat, errors) = (
            client.clone(),
            t.clone(),
            body.clone(),
            lat.clone(),
            errors.clone(),
        );
        tracker.spawn(async move {
            let t0 = Instant::now();
            if one(&client, &t, &body).await {
                lat.lock().unwrap().push(t0.elapsed());
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
        i += 1;
    }
    tracker.close();
    tracker.wait().await;
    let wall = started.elapsed();
    let mut lat = std::mem::take(&mut *lat.lock().unwrap());
    lat.sort();
    Run {
        lat,
        wall,
        errors: errors.load(Ordering::Relaxed),
    }
}

async fn metric(client: &reqwest::Client, gw: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let total = env_num("LLM_BENCH_REQUESTS", 5000);
    let concurrency = env_num("LLM_BENCH_CONCURRENCY", 32);
    let seconds = env_num("LLM_BENCH_SECONDS", 10) as u64;
    let soak_s = env_num("LLM_BENCH_SOAK_S", 0) as u64;
    let soak_rps = env_num("LLM_BENCH_SOAK_RPS", 2000);
    let repeat = env_num("LLM_BENCH_REPEAT", 1).max(1);
    let rates: Vec<usize> = std::env::var("LLM_BENCH_RATES")
        .unwrap_or_else(|_| "500,1000,2000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("kip_llm_bench_{}", std::process::id());
    let admin_opts = PgConnectOptions::from_str(&base)?;
    let mut admin = admin_opts.connect().await?;
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    let db_url = {
        let mut u = reqwest::Url::parse(&base)?;
        u.set_path(&name);
        u.to_string()
    };

    // The server's postmaster, for its CPU time (None when this user cannot see it).
    let postmaster: Option<u32> = match sqlx::query_scalar::<_, String>("SHOW data_directory")
        .fetch_one(&mut admin)
        .await
    {
        Ok(dir) => std::fs::read_to_string(std::path::Path::new(&dir).join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok()),
        Err(_) => None,
    };
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "hello"))).await;
    fake.stop_recording();
    let (gateway, admin_key) = start_gateway(&db_url, &fake).await;
    let pid = gateway.child.id();
    let gw = gateway.url.clone();

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()?;
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
    let direct = Target {
        url: format!("{}/chat/completions", fake.base_url()),
        key: None,
    };
    let via = Target {
        url: format!("{gw}/v1/chat/completions"),
        key: Some(key),
    };
    println!(
        "LLM gateway benchmark: loopback, {} cores shared by client, gateway (own process), \
         fake provider and PostgreSQL",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut calls = 0usize;
    // Warm-up: connection pools, allocator, the gateway's key cache and latency estimates.
    closed(&client, &direct, &body, 1000, 4).await;
    calls += closed(&client, &via, &body, 1000, 4).await.lat.len();
    let rss_start = rss_kib(pid);
    println!(
        "gateway RSS after warm-up: {:.1} MiB",
        rss_start as f64 / 1024.0
    );

    let d1 = closed(&client, &direct, &body, total, 1).await;
    d1.report("direct, 1 client");
    let g1 = closed(&client, &via, &body, total, 1).await;
    g1.report("via gateway, 1 client");
    calls += g1.lat.len();
    println!(
        "  overhead, 1 client: p50={:.3} ms  p99={:.3} ms",
        ms(pct(&g1.lat, 0.5)) - ms(pct(&d1.lat, 0.5)),
        ms(pct(&g1.lat, 0.99)) - ms(pct(&d1.lat, 0.99))
    );

    // (rate, direct p99, p99 overhead) of every open-loop run.
    let mut p99s: Vec<(usize, f64, f64)> = Vec::new();
    for run in 1..=repeat {
        if repeat > 1 {
            println!("open-loop run {run} of {repeat}");
        }
        for &rate in &rates {
            let dur = Duration::from_secs(seconds);
            let d = open(&client, &direct, &body, rate, dur).await;
            d.report(&format!("direct, open loop {rate}/s"));
            let before = Cpu::now(pid, postmaster);
            let g = open(&client, &via, &body, rate, dur).await;
            let after = Cpu::now(pid, postmaster);
            g.report(&format!("via gateway, open loop {rate}/s"));
            println!("  {}", before.per_request(&after, g.lat.len() + g.errors));
            calls += g.lat.len();
            let p99 = ms(pct(&g.lat, 0.99)) - ms(pct(&d.lat, 0.99));
            p99s.push((rate, ms(pct(&d.lat, 0.99)), p99));
            println!(
                "  overhead at {rate}/s: p50={:.3} ms  p99={:.3} ms  p99.9={:.3} ms  (gateway RSS {:.1} MiB)",
                ms(pct(&g.lat, 0.5)) - ms(pct(&d.lat, 0.5)),
                p99,
                ms(pct(&g.lat, 0.999)) - ms(pct(&d.lat, 0.999)),
                rss_kib(pid) as f64 / 1024.0
            );
        }
    }
    if repeat > 1 {
        for &rate in &rates {
            let of_rate: Vec<(f64, f64)> = p99s
                .iter()
                .filter(|(r, _, _)| *r == rate)
                .map(|&(_, d, o)| (d, o))
                .collect();
            let lo = of_rate.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            let hi = of_rate
                .iter()
                .map(|x| x.1)
                .fold(f64::NEG_INFINITY, f64::max);
            let dlo = of_rate.iter().map(|x| x.0).fold(f64::INFINITY, f64::min);
            let dhi = of_rate
                .iter()
                .map(|x| x.0)
                .fold(f64::NEG_INFINITY, f64::max);
            let held = of_rate.iter().filter(|x| x.1 < 1.0).count();
            println!(
                "p99 overhead at {rate}/s over {repeat} consecutive runs: {lo:.3}-{hi:.3} ms \
                 (direct p99 {dlo:.3}-{dhi:.3} ms); below 1 ms in {held} of {repeat}"
            );
        }
    }

    let dn = closed(&client, &direct, &body, total, concurrency).await;
    dn.report(&format!("direct, {concurrency} clients"));
    let gn = closed(&client, &via, &body, total, concurrency).await;
    gn.report(&format!("via gateway, {concurrency} clients"));
    calls += gn.lat.len();
    println!(
        "gateway RSS: {:.1} MiB after warm-up, {:.1} MiB after the runs",
        rss_start as f64 / 1024.0,
        rss_kib(pid) as f64 / 1024.0
    );

    if soak_s > 0 {
        println!("soak: {soak_rps}/s for {soak_s} s through the gateway");
        let window = Duration::from_secs(30.min(soak_s));
        let t0 = Instant::now();
        let mut first: Option<u64> = None;
        while t0.elapsed() < Duration::from_secs(soak_s) {
            let w = open(&client, &via, &body, soak_rps, window).await;
            calls += w.lat.len();
            let rss = rss_kib(pid);
            first.get_or_insert(rss);
            println!(
                "  t={:>4} s  rps={:>6.0}  p50={:.3} ms  p99={:.3} ms  errors={}  gateway RSS {:.1} MiB",
                t0.elapsed().as_secs(),
                w.lat.len() as f64 / w.wall.as_secs_f64(),
                ms(pct(&w.lat, 0.5)),
                ms(pct(&w.lat, 0.99)),
                w.errors,
                rss as f64 / 1024.0
            );
        }
        let last = rss_kib(pid);
        println!(
            "soak: gateway RSS {:.1} MiB after the first window, {:.1} MiB at the end",
            first.unwrap_or(last) as f64 / 1024.0,
            last as f64 / 1024.0
        );
    }

    // Let the log writer catch up, then count what it wrote.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db_url)
        .await?;
    let t0 = Instant::now();
    let mut rows: i64 = 0;
    while t0.elapsed() < Duration::from_secs(60) {
        rows = sqlx::query_scalar("SELECT count(*) FROM inference_logs")
            .fetch_one(&pool)
            .await?;
        if rows >= calls as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dropped = metric(&client, &gw, "kip_llm_log_rows_dropped_total").await;
    println!(
        "inference_logs rows written: {rows} of {calls} gateway calls; rows dropped: {dropped}"
    );
    pool.close().await;
    drop(gateway);
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await?;
    Ok(())
}
