//! `kip-control-plane`: the server binary. Parses flags, loads config, starts the system
//! through [`kip_control_plane::ControlPlane::builder`] and waits for SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "kip control plane")]
struct Args {
    /// Config file (TOML). Without it, defaults plus KIP_* environment overrides apply.
    #[arg(long, short, env = "KIP_CONFIG")]
    config: Option<PathBuf>,
    /// Only check the config file and exit.
    #[arg(long)]
    check_config: bool,
    /// Apply pending database migrations and exit (for a migration Job before a rollout).
    #[arg(long)]
    migrate_only: bool,
    /// Revoke every platform-admin key and write a new one to `auth.admin_key_file`
    /// (recovery when the key file was lost).
    #[arg(long)]
    reset_admin_key: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg =
        kip_control_plane::config::Config::load(args.config.as_deref(), |k| std::env::var(k).ok())?;
    cfg.reset_admin_key = args.reset_admin_key;
    if args.check_config {
        eprintln!("config OK");
        return Ok(());
    }
    kip_control_plane::init_tracing(cfg.log_format, &cfg.log_filter);
    if args.migrate_only {
        let pool = kip_control_plane::db::connect(&cfg).await?;
        kip_control_plane::db::migrate(&pool).await?;
        pool.close().await;
        tracing::info!("database schema up to date (--migrate-only)");
        return Ok(());
    }
    kip_control_plane::ControlPlane::builder(cfg)
        .handle_signals(true)
        .start()
        .await?
        .wait()
        .await;
    Ok(())
}
