//! kip control plane: fleet management, sensor data, admin API and the unified LLM API.
//!
//! The binaries `kip-control-plane` (server) and `kipctl` (admin CLI) are thin wrappers
//! around this library so that tests drive the same code.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod llm;
pub mod metrics;
pub mod pki;
pub mod pki_api;
pub mod registry;
pub mod sensor;
pub mod server;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Connects, migrates, bootstraps the admin key and serves until `token` is cancelled.
pub async fn run(cfg: config::Config, token: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let pool = db::connect(&cfg).await?;
    db::migrate(&pool).await?;
    tracing::info!("database schema up to date");
    // sensor_data stays a plain table either way: a hypertable needs the time column in every
    // unique index, and the idempotency key is (device_id, epoch, seq). Say which one we have.
    match sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'",
    )
    .fetch_one(&pool)
    .await
    {
        Ok(0) => tracing::info!("TimescaleDB not installed: sensor_data is a plain indexed table"),
        Ok(_) => tracing::info!(
            "TimescaleDB is installed; sensor_data stays a plain table keyed by (device_id, epoch, seq)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot check for TimescaleDB"),
    }
    if cfg.reset_admin_key {
        db::reset_admin_key(&pool, &cfg.admin_key_file).await?;
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "revoked the platform-admin keys and wrote a new one to this file (mode 0600)"
        );
    } else if db::ensure_admin_key(&pool, &cfg.admin_key_file).await? {
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "created the platform-admin API key; read it from this file (mode 0600)"
        );
    } else if !cfg.admin_key_file.exists() {
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "a platform-admin key exists but this file does not: if the key is lost, restart \
             once with --reset-admin-key to revoke it and write a new one here"
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "control plane listening");
    let mut state = server::AppState::new(pool.clone(), &cfg);
    let tracker = TaskTracker::new();
    // Ends after the router (and with it every log sender) is dropped at shutdown, so
    // `serve` draining the tracker also flushes queued inference logs.
    state.llm.start_log_writer(&tracker);
    state.llm.start_providers(&tracker, &token);
    let signals = tracker.spawn(server::shutdown_signal(token.clone()));
    match pki::Pki::from_config(&cfg.pki, &pool).await? {
        Some(p) => {
            state.pki = Some(p.clone());
            let addr = cfg.pki.agent_listen_addr;
            let agent = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (pki.agent_listen_addr)"))?;
            pki::spawn_agent_listener(
                agent,
                &state,
                p,
                cfg.pki.crl_refresh_interval,
                token.clone(),
                &tracker,
                cfg.shutdown_grace,
            )?;
        }
        None => tracing::warn!(
            "pki.ca_dir is not set: device enrollment and the agent mTLS listener are off \
             (create a CA with `kipctl ca init --dir DIR`)"
        ),
    }
    server::serve(
        listener,
        server::router(state),
        token.clone(),
        tracker,
        cfg.shutdown_grace,
    )
    .await?;
    signals.abort();
    pool.close().await;
    tracing::info!("control plane stopped");
    Ok(())
}

/// Installs the global tracing subscriber according to the config.
pub fn init_tracing(format: config::LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
