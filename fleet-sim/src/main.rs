//! `kip-fleet-sim`: a fleet load generator for one control plane (issue #17, "Thousands of
//! gateways"). It enrolls N agents through the real `POST /enroll` (cached in `--state-dir`,
//! so a second run enrolls nobody), opens one real mTLS connection per agent to the agent
//! listener and sends heartbeats and small sync batches (the shared sync protocol, gzip JSON,
//! as `kip-agent` sends them) at the configured per-agent rates for `--duration-s`.
//!
//! Every `--report-interval-s` it prints one line: TLS handshakes/s, syncs/s, heartbeats/s,
//! readings/s, sync p50/p99, errors, its own CPU and RSS, and with `--control-plane-pid` the
//! control plane's CPU and RSS, with `--pg-url` the PostgreSQL client connections. At the end
//! it prints (and with `--summary-json` writes) the run's totals, errors by kind and the
//! latency percentiles over the whole run.
//!
//! Invariants: one task per agent plus one per open connection, and at most
//! `--max-in-flight` requests outstanding; every task runs on one `TaskTracker` and stops on
//! the one `CancellationToken` (end of the run, SIGINT or SIGTERM).

mod agent;
mod enroll;
mod stats;

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::stats::{Counters, ProcSample, Stats, WindowLatency, load_average, proc_sample};

#[derive(Debug, Parser)]
#[command(
    name = "kip-fleet-sim",
    version,
    about = "simulated fleet of enrolled kip agents"
)]
struct Args {
    /// Admin API of the control plane (serves `/enroll` and the enrollment tokens).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    admin_url: String,
    /// File holding an API key allowed to create organisations and enrollment tokens (the
    /// platform-admin key). `KIP_ADMIN_KEY` wins when set.
    #[arg(long)]
    admin_key_file: Option<PathBuf>,
    #[arg(long, env = "KIP_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    /// Agent mTLS listener, `https://host:port`.
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    agent_url: String,
    /// Where identities are cached (one organisation per directory).
    #[arg(long)]
    state_dir: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Enrollments at once (first run only).
    #[arg(long, default_value_t = 8)]
    enroll_concurrency: usize,
    /// Only enroll (fill the cache), send nothing.
    #[arg(long)]
    enroll_only: bool,
    /// How long the agents send.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Time between two sync batches of one agent.
    #[arg(long, default_value_t = 7_500)]
    sync_interval_ms: u64,
    /// Time between two heartbeats of one agent (sent besides the syncs).
    #[arg(long, default_value_t = 30_000)]
    heartbeat_interval_ms: u64,
    /// Readings per sync batch, drawn uniformly from min..=max.
    #[arg(long, default_value_t = 10)]
    readings_per_sync_min: u32,
    #[arg(long, default_value_t = 50)]
    readings_per_sync_max: u32,
    /// Distinct metrics (series) per agent.
    #[arg(long, default_value_t = 10)]
    series_per_agent: u32,
    /// Requests outstanding at once across the fleet.
    #[arg(long, default_value_t = 1024)]
    max_in_flight: usize,
    /// A request without an answer after this long counts as a `timeout` error.
    #[arg(long, default_value_t = 30_000)]
    request_timeout_ms: u64,
    /// Close each agent's connection after every request (every request pays a handshake).
    #[arg(long)]
    new_connection_per_request: bool,
    /// Longest wait a `Retry-After` on 503/429 imposes on an agent (the agent's default
    /// `sync.backoff_max_ms`); 0: ignore `Retry-After` (resend at the next tick).
    #[arg(long, default_value_t = 60_000)]
    retry_after_cap_ms: u64,
    /// Seconds per report line.
    #[arg(long, default_value_t = 10)]
    report_interval_s: u64,
    /// Also sample this process's CPU and RSS (the control plane) each window.
    #[arg(long)]
    control_plane_pid: Option<u32>,
    /// Also count PostgreSQL client connections (`pg_stat_activity`) each window.
    #[arg(long)]
    pg_url: Option<String>,
    /// Write the run's summary as JSON here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

/// The run's totals (also written as JSON).
#[derive(Debug, Serialize)]
struct Summary {
    agents: usize,
    enrolled_now: usize,
    epoch: u64,
    duration_s: f64,
    counters: Counters,
    inserted: u64,
    duplicates: u64,
    errors: std::collections::BTreeMap<&'static str, u64>,
    handshakes_per_s: f64,
    syncs_per_s: f64,
    heartbeats_per_s: f64,
    readings_per_s: f64,
    latency: WindowLatency,
    generator_cpu_s: f64,
    generator_rss_bytes: u64,
    control_plane_cpu_s: Option<f64>,
    control_plane_rss_bytes: Option<u64>,
    pg_connections_max: Option<i64>,
    load_average_end: f64,
}

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    // A closed stdout (the reader went away) is not worth failing the run for.
    let _ = writeln!(o, "{line}");
}

async fn shutdown_signal(cancel: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
        () = cancel.cancelled() => {},
    }
    cancel.cancel();
}

fn agent_target(url: &str) -> anyhow::Result<(SocketAddr, ServerName<'static>)> {
    let hostport = url
        .strip_prefix("https://")
        .context("--agent-url must be https://host:port")?
        .trim_end_matches('/');
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("--agent-url {url}: give an IP address and port"))?;
    Ok((addr, ServerName::IpAddress(addr.ip().into())))
}

async fn pg_connections(pool: &sqlx::PgPool) -> Option<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .fetch_one(pool)
    .await
    .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(
        args.readings_per_sync_min >= 1 && args.readings_per_sync_min <= args.readings_per_sync_max,
        "--readings-per-sync-min must be 1..=--readings-per-sync-max"
    );
    anyhow::ensure!(
        args.sync_interval_ms > 0 && args.heartbeat_interval_ms > 0 && args.report_interval_s > 0,
        "intervals must be positive"
    );
    let key = match (&args.admin_key, &args.admin_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("give --admin-key-file or KIP_ADMIN_KEY"),
    };
    // reqwest (admin API, plain HTTP here) needs a process-wide provider; the agents'
    // configurations carry ring themselves. The workspace's one provider: ring.
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    let admin = enroll::Admin {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        url: args.admin_url.trim_end_matches('/').to_owned(),
        key,
    };
    let (agent_addr, server_name) = agent_target(&args.agent_url)?;

    let t_enroll = Instant::now();
    let (ids, enrolled) = enroll::identities(
        &admin,
        &args.state_dir,
        args.agents,
        args.enroll_concurrency,
    )
    .await?;
    out(&format!(
        "identities: {} agents, {enrolled} enrolled now in {:.1} s ({:.0} enrollments/s), {} from the cache",
        ids.len(),
        t_enroll.elapsed().as_secs_f64(),
        enrolled as f64 / t_enroll.elapsed().as_secs_f64().max(1e-9),
        ids.len() - enrolled
    ));
    if args.enroll_only {
        return Ok(());
    }

    let pg = match &args.pg_url {
        Some(u) => Some(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(u)
                .await
                .context("--pg-url")?,
        ),
        None => None,
    };
    let epoch = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(1);
    let plan = Arc::new(agent::Plan {
        agent_addr,
        server_name,
        sync_interval: Duration::from_millis(args.sync_interval_ms),
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
        readings_min: args.readings_per_sync_min,
        readings_max: args.readings_per_sync_max,
        series: args.series_per_agent,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        new_connection_per_request: args.new_connection_per_request,
        epoch,
        retry_after_cap: (args.retry_after_cap_ms > 0)
            .then(|| Duration::from_millis(args.retry_after_cap_ms)),
    });
    let stats = Arc::new(Stats::default());
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(shutdown_signal(cancel.clone()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight.max(1)));
    let agents = ids.len();
    for id in ids {
        let a = agent::Agent::new(
            id,
            plan.clone(),
            stats.clone(),
            in_flight.clone(),
            tracker.clone(),
        );
        tracker.spawn(a.run(cancel.clone()));
    }
    out(&format!(
        "sending: {agents} agents, sync every {} ms ({}-{} readings), heartbeat every {} ms, epoch {epoch}",
        args.sync_interval_ms,
        args.readings_per_sync_min,
        args.readings_per_sync_max,
        args.heartbeat_interval_ms
    ));
    out(
        "window_s  handshakes/s  syncs/s  heartbeats/s  readings/s  sync_p50_ms  sync_p99_ms  hs_p99_ms  errors  shed  gen_cpu%  gen_rss_MiB  cp_cpu%  cp_rss_MiB  pg_conn(active)  load",
    );

    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration_s);
    let window = Duration::from_secs(args.report_interval_s);
    let mut prev = (
        start,
        stats.counters(),
        proc_sample(None),
        args.control_plane_pid.and_then(|p| proc_sample(Some(p))),
    );
    let cp0 = prev.3;
    let gen0 = prev.2;
    let mut pg_max: Option<i64> = None;
    while !cancel.is_cancelled() && Instant::now() < end {
        let next = (prev.0 + window).min(end);
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep_until(next.into()) => {}
        }
        let now = Instant::now();
        let c = stats.counters();
        let lat = stats.close_window();
        let gen_s = proc_sample(None);
        let cp_s = args.control_plane_pid.and_then(|p| proc_sample(Some(p)));
        let dt = now.duration_since(prev.0).as_secs_f64().max(1e-9);
        let rate = |a: u64, b: u64| (a - b) as f64 / dt;
        let cpu_pct = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.0}", (a.cpu_s - b.cpu_s) / dt * 100.0),
            _ => "-".into(),
        };
        let rss = |a: Option<ProcSample>| {
            a.map_or_else(
                || "-".into(),
                |a| format!("{:.0}", a.rss_bytes as f64 / 1048576.0),
            )
        };
        let pgc = match &pg {
            Some(p) => match pg_connections(p).await {
                Some((all, active)) => {
                    pg_max = Some(pg_max.unwrap_or(0).max(all));
                    format!("{all}({active})")
                }
                None => "?".into(),
            },
            None => "-".into(),
        };
        out(&format!(
            "{:>8.0}  {:>12.1}  {:>7.1}  {:>12.1}  {:>10.0}  {:>11.2}  {:>11.2}  {:>9.2}  {:>6}  {:>4}  {:>8}  {:>11}  {:>7}  {:>10}  {:>15}  {:.2}",
            now.duration_since(start).as_secs_f64(),
            rate(c.handshakes, prev.1.handshakes),
            rate(c.syncs, prev.1.syncs),
            rate(c.heartbeats, prev.1.heartbeats),
            rate(c.readings_acked, prev.1.readings_acked),
            lat.sync.p50_ms,
            lat.sync.p99_ms,
            lat.handshake.p99_ms,
            c.errors - prev.1.errors,
            c.shed - prev.1.shed,
            cpu_pct(gen_s, prev.2),
            rss(gen_s),
            cpu_pct(cp_s, prev.3),
            rss(cp_s),
            pgc,
            load_average(),
        ));
        prev = (now, c, gen_s, cp_s);
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let _ = stats.close_window();
    let elapsed = start.elapsed().as_secs_f64();
    let c = stats.counters();
    let gen_end = proc_sample(None);
    let cp_end = args.control_plane_pid.and_then(|p| proc_sample(Some(p)));
    let summary = Summary {
        agents,
        enrolled_now: enrolled,
        epoch,
        duration_s: elapsed,
        counters: c,
        inserted: stats.inserted.load(std::sync::atomic::Ordering::Relaxed),
        duplicates: stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        errors: stats.errors(),
        handshakes_per_s: c.handshakes as f64 / elapsed,
        syncs_per_s: c.syncs as f64 / elapsed,
        heartbeats_per_s: c.heartbeats as f64 / elapsed,
        readings_per_s: c.readings_acked as f64 / elapsed,
        latency: stats.total_latency(),
        generator_cpu_s: match (gen_end, gen0) {
            (Some(a), Some(b)) => a.cpu_s - b.cpu_s,
            _ => f64::NAN,
        },
        generator_rss_bytes: gen_end.map_or(0, |s| s.rss_bytes),
        control_plane_cpu_s: match (cp_end, cp0) {
            (Some(a), Some(b)) => Some(a.cpu_s - b.cpu_s),
            _ => None,
        },
        control_plane_rss_bytes: cp_end.map(|s| s.rss_bytes),
        pg_connections_max: pg_max,
        load_average_end: load_average(),
    };
    let json = serde_json::to_string_pretty(&summary)?;
    out(&json);
    if let Some(p) = &args.summary_json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
