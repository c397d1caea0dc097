//! `kip-agent`: the edge agent binary. Parses flags, loads the config, hands over to the
//! library (`kip_agent::runtime`, `kip_agent::cli`).

use std::{io::Write, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use kip_agent::{cli, config::Config, remote_config, self_update};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "kip-agent", version, about = "kip edge agent")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        #[arg(long, env = "KIP_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Print a human summary of the agent (running or not).
    Status {
        #[arg(long, env = "KIP_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Enroll this device with the control plane using a one-time token (from
    /// `kipctl device enroll-token`); the identity is stored in `<state_dir>/identity`.
    Enroll {
        #[arg(long, env = "KIP_AGENT_CONFIG")]
        config: PathBuf,
        /// Control-plane admin URL, e.g. https://kip.example.com
        #[arg(long, env = "KIP_SERVER_URL")]
        server: String,
        /// One-time enrollment token (prefer KIP_ENROLL_TOKEN to keep it out of shell history).
        #[arg(long, env = "KIP_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Organisation id, when the token alone does not name it.
        #[arg(long)]
        org: Option<uuid::Uuid>,
    },
    /// Load and validate the configuration (as `run` would) without starting anything;
    /// exits non-zero naming the problem. Used after installing or editing `agent.toml`.
    CheckConfig {
        #[arg(long, env = "KIP_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Buffer tools.
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BufferCommand {
    /// Show counts and the oldest/newest records.
    Inspect {
        #[arg(long, env = "KIP_AGENT_CONFIG")]
        config: PathBuf,
        /// How many oldest and newest records to show.
        #[arg(long, default_value_t = 5)]
        records: usize,
    },
}

fn init_logging(cfg: &Config) {
    kip_shared::logging::init(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        cfg.log_format,
        &cfg.log_filter,
    );
}

async fn shutdown_signal(cancel: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
    cancel.cancel();
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn out(text: &str) -> anyhow::Result<()> {
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let done = match args.command {
        Command::Run { config } => {
            let cfg = load(&config)?;
            init_logging(&cfg);
            let cancel = CancellationToken::new();
            // Under the launcher: self-update may stop the agent (cancel) to restart it into
            // a new version, or to have a failed trial rolled back.
            let trial = self_update::SelfUpdate::init(cancel.clone())
                .map(|u| u.watch_trial(cancel.clone()));
            // The pipeline runs under the remote-configuration supervisor, which restarts it
            // when the control plane sends a new configuration (and rolls back by itself).
            let supervisor = remote_config::supervise(&config, cfg, cancel.clone());
            tokio::pin!(supervisor);
            // The trial watch ends the agent through `cancel` (then the supervisor returns),
            // never by finishing itself.
            let trial = async move {
                if let Some(t) = trial {
                    t.await;
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                r = &mut supervisor => r?,
                () = shutdown_signal(cancel.clone()) => supervisor.await?,
                () = trial => {}
            }
            let code = self_update::exit_code();
            tracing::info!(exit_code = code, "stopped");
            return Ok(std::process::ExitCode::from(code));
        }
        Command::Status { config } => out(&cli::status(&load(&config)?).await?),
        Command::Enroll {
            config,
            server,
            token,
            org,
        } => {
            let cfg = load(&config)?;
            // Enrollment logs like `run` does (`device enrolled` with its ids; never the token
            // or the key), so a log shipper sees it.
            init_logging(&cfg);
            // The plain enrollment client needs the process-wide provider (ring).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let http = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .context("building the HTTP client")?;
            let dir = cfg.state_dir.join("identity");
            let id =
                kip_agent::identity::enroll(&http, &server, &token, cfg.device.as_str(), org, &dir)
                    .await
                    .with_context(|| format!("enrolling {} at {server}", cfg.device))?;
            let summary = format!(
                "enrolled {} (device {}, organisation {}); identity in {}\n",
                cfg.device,
                id.device_id(),
                id.org_id(),
                dir.display()
            );
            // `ecs` logs own stdout (one JSON object per line): the summary goes to stderr.
            if cfg.log_format == kip_shared::logging::LogFormat::Ecs {
                std::io::stderr()
                    .write_all(summary.as_bytes())
                    .context("writing to stderr")
            } else {
                out(&summary)
            }
        }
        Command::CheckConfig { config } => {
            let cfg = load(&config)?;
            out(&format!(
                "{}: valid (device {}, state dir {}, {} MQTT broker(s), {} OPC UA endpoint(s))\n",
                config.display(),
                cfg.device,
                cfg.state_dir.display(),
                cfg.mqtt.len(),
                cfg.opcua.len()
            ))
        }
        Command::Buffer {
            command: BufferCommand::Inspect { config, records },
        } => out(&cli::inspect(&load(&config)?, records).await?),
    };
    done.map(|()| std::process::ExitCode::SUCCESS)
}
