//! `kip-sim`: replays C-MAPSS trajectories as simulated AIX Aleph machines over MQTT (see the
//! library docs). Runs until SIGINT/SIGTERM, or for `--cycles` ticks.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use kip_shared::mqtt::{MqttEndpoint, TlsFiles};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Debug, Parser)]
#[command(
    name = "kip-sim",
    version,
    about = "simulated AIX Aleph machines (C-MAPSS replay over MQTT)"
)]
struct Args {
    /// MQTT broker, mqtt://host:port (plain TCP; for a local broker).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// C-MAPSS training file to replay.
    #[arg(long, default_value = "ml/data/train_FD001.txt")]
    data: PathBuf,
    /// Engine units to replay, one simulated machine each (aleph-01, aleph-02, ...).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    units: Vec<u32>,
    /// Time between two cycles.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Topic prefix: messages go to <prefix>/<machine>/<channel>.
    #[arg(long, default_value = "aleph")]
    topic_prefix: String,
    /// Stop after this many cycles (default: run until Ctrl-C, wrapping around each run).
    #[arg(long)]
    cycles: Option<u64>,
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
    let engines = kip_ml::cmapss::load(&args.data)
        .with_context(|| format!("loading {}", args.data.display()))?;
    let mut machines = Vec::new();
    for (i, unit) in args.units.iter().enumerate() {
        let engine = engines
            .iter()
            .find(|e| e.unit == *unit)
            .with_context(|| format!("unit {unit} is not in {}", args.data.display()))?;
        machines.push((kip_sim::machine_name(i), engine));
    }
    // The workspace's one MQTT URL check (plain `mqtt://` only: the simulator has no TLS).
    let broker = MqttEndpoint::parse(&args.broker, TlsFiles::default())
        .map_err(|e| anyhow::anyhow!("--broker {:?}: {e}", args.broker))?;
    let mut opts = MqttOptions::new(
        format!("kip-sim-{}", std::process::id()),
        broker.socket_host(),
        broker.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(shutdown_signal(cancel.clone()));
    let (connected_tx, mut connected_rx) = tokio::sync::watch::channel(false);
    let ev_cancel = cancel.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = ev_cancel.cancelled() => break,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("connected to the broker");
                        let _ = connected_tx.send(true);
                    }
                    // Our own disconnect at the end: the broker closing is expected.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "broker connection lost; retrying in 1s");
                        tokio::select! {
                            () = ev_cancel.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
            }
        }
    });

    tokio::select! {
        () = cancel.cancelled() => {}
        r = connected_rx.wait_for(|c| *c) => { r.context("event loop ended")?; }
    }
    let names: Vec<&str> = machines.iter().map(|(m, _)| m.as_str()).collect();
    tracing::info!(machines = ?names, units = ?args.units, prefix = %args.topic_prefix, "replaying");
    let mut tick = tokio::time::interval(Duration::from_millis(args.interval_ms.max(1)));
    let mut cycle: u64 = 0;
    let mut published: u64 = 0;
    while !cancel.is_cancelled() && args.cycles.is_none_or(|n| cycle < n) {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ts = chrono::Utc::now().timestamp_millis();
        for (machine, engine) in &machines {
            let idx = usize::try_from(cycle).unwrap_or(0);
            for m in kip_sim::cycle_messages(&args.topic_prefix, machine, engine, idx, ts) {
                client
                    .publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                    .await
                    .context("publishing")?;
                published += 1;
            }
        }
        cycle += 1;
        if cycle.is_multiple_of(60) {
            tracing::info!(cycle, published, "still replaying");
        }
    }
    // Let queued publishes leave before disconnecting.
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    tracing::info!(cycles = cycle, published, "stopped");
    Ok(())
}
