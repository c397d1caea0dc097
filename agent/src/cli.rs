//! `kip-agent status` and `kip-agent buffer inspect`: human summaries of a running or stopped
//! agent.
//!
//! The buffer allows one process at a time (`flock`), so while the agent runs these commands ask its
//! loopback HTTP surface; when it does not answer they open the buffer directly, and when the
//! buffer is locked but the surface is silent they say exactly that instead of guessing.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use chrono::Utc;
use kip_shared::{Record, Sequenced};

use crate::{
    buffer::{Buffer, BufferError, BufferOptions, BufferStats},
    config::Config,
    runtime::{BufferReport, StatusReport, local_get},
};

/// Why a CLI command could not produce its summary.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "the agent seems to be running (its buffer {buffer} is locked) but its HTTP surface \
         at {addr} does not answer: {reason}"
    )]
    RunningButSilent {
        buffer: String,
        addr: SocketAddr,
        reason: String,
    },
    #[error("no buffer at {0}: the agent has never run with this config")]
    NoBuffer(String),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("unexpected answer from the agent at {addr}: {reason}")]
    BadAnswer { addr: SocketAddr, reason: String },
}

/// The address to reach the agent's HTTP surface (loopback when it listens on any address).
pub fn surface_addr(cfg: &Config) -> SocketAddr {
    let mut addr = cfg.http_listen_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

async fn fetch<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<Result<T, CliError>, std::io::Error> {
    let (code, body) = local_get(addr, path).await?;
    if code != 200 {
        return Ok(Err(CliError::BadAnswer {
            addr,
            reason: format!("HTTP {code}: {}", body.trim()),
        }));
    }
    Ok(
        serde_json::from_str(&body).map_err(|e| CliError::BadAnswer {
            addr,
            reason: e.to_string(),
        }),
    )
}

fn open_stopped(cfg: &Config) -> Result<Buffer, CliError> {
    let dir = cfg.buffer_dir();
    if !dir.exists() {
        return Err(CliError::NoBuffer(dir.display().to_string()));
    }
    Ok(Buffer::open(
        &dir,
        BufferOptions::with_max_bytes(cfg.buffer.max_bytes),
    )?)
}

/// `kip-agent status`: a human summary.
pub async fn status(cfg: &Config) -> Result<String, CliError> {
    let addr = surface_addr(cfg);
    let http_err = match fetch::<StatusReport>(addr, "/v1/status").await {
        Ok(report) => return Ok(format_status(&report?)),
        Err(e) => e,
    };
    match open_stopped(cfg) {
        Ok(buffer) => {
            let stats = buffer.stats()?;
            let mut out = format!(
                "kip-agent {}: not running (nothing answers at {addr})\n{}",
                cfg.device,
                format_buffer(&stats, 0)
            );
            for q in crate::buffer_recovery::quarantined_buffers(&cfg.state_dir) {
                let _ = writeln!(
                    out,
                    "QUARANTINED buffer (not synced, inspect then remove): {}",
                    q.display()
                );
            }
            Ok(out)
        }
        Err(CliError::Buffer(BufferError::Locked { path })) => Err(CliError::RunningButSilent {
            buffer: path.display().to_string(),
            addr,
            reason: http_err.to_string(),
        }),
        Err(e) => Err(e),
    }
}

/// `kip-agent buffer inspect`: counts and the oldest/newest `n` records.
pub async fn inspect(cfg: &Config, n: usize) -> Result<String, CliError> {
    let addr = surface_addr(cfg);
    match open_stopped(cfg) {
        Ok(buffer) => {
            let report = BufferReport::from_buffer(&buffer, n)?;
            Ok(format_report(
                &report,
                &format!("buffer {} (agent not running)", buffer.path().display()),
            ))
        }
        Err(CliError::Buffer(BufferError::Locked { path })) => {
            match fetch::<BufferReport>(addr, &format!("/v1/buffer?records={n}")).await {
                Ok(report) => Ok(format_report(
                    &report?,
                    &format!(
                        "buffer {} (read through the running agent at {addr})",
                        path.display()
                    ),
                )),
                Err(e) => Err(CliError::RunningButSilent {
                    buffer: path.display().to_string(),
                    addr,
                    reason: e.to_string(),
                }),
            }
        }
        Err(e) => Err(e),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// Formats buffer stats; `indent` spaces before each line.
pub fn format_buffer(s: &BufferStats, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let c = &s.counts;
    let mut out = format!(
        "{pad}buffer: epoch {}, {} records ({} readings, {} predictions, {} gaps, {} dead \
         letters, {} loss), {} of {}\n",
        s.epoch,
        c.total(),
        c.reading,
        c.prediction,
        c.gap,
        c.dead_letter,
        c.loss,
        human_bytes(s.bytes),
        human_bytes(s.max_bytes),
    );
    match (&s.oldest, &s.newest) {
        (Some(o), Some(n)) => {
            let _ = writeln!(
                out,
                "{pad}  oldest unacked: seq {} ({}, appended {} ago); newest: seq {} ({})",
                o.seq,
                o.kind,
                human_duration(s.oldest_unacked_age_ms.unwrap_or(0) / 1000),
                n.seq,
                n.kind
            );
        }
        _ => {
            let _ = writeln!(out, "{pad}  empty: everything acknowledged");
        }
    }
    let _ = writeln!(
        out,
        "{pad}  acknowledged up to seq {}, durable up to seq {}, next seq {}",
        s.acked_up_to, s.durable_seq, s.next_seq
    );
    if s.evicted_records_total + s.rejected_records_total > 0 {
        let _ = writeln!(
            out,
            "{pad}  LOSS since start: {} readings evicted, {} records rejected (buffer full)",
            s.evicted_records_total, s.rejected_records_total
        );
    }
    out
}

/// The sync lines of `kip-agent status`: online/offline, backlog, last ack.
pub fn format_sync(sync: Option<&crate::sync::SyncReport>, buffer: &BufferStats) -> String {
    let Some(s) = sync else {
        return "sync: not configured or device not enrolled (records stay buffered)\n".into();
    };
    let last_ack = s.last_ack_at.map_or_else(
        || "never since start".to_owned(),
        |t| {
            let ago = u64::try_from((chrono::Utc::now() - t).num_seconds()).unwrap_or(0);
            format!("{} ({} ago)", t.to_rfc3339(), human_duration(ago))
        },
    );
    let mut out = format!(
        "sync: {} via {}, last ack {last_ack}\n  backlog {} records{}, batch {} records, {} acked since start, {} dead letters\n",
        if s.online { "ONLINE" } else { "OFFLINE" },
        s.endpoint,
        buffer.counts.total(),
        buffer
            .oldest_unacked_age_ms
            .map(|ms| format!(" (oldest {} old)", human_duration(ms / 1000)))
            .unwrap_or_default(),
        s.batch_records,
        s.records_acked,
        s.dead_letters,
    );
    if let Some(e) = &s.last_error {
        let _ = writeln!(
            out,
            "  last error ({} in a row): {e}",
            s.consecutive_failures
        );
    }
    out
}

/// Formats a [`StatusReport`].
pub fn format_status(r: &StatusReport) -> String {
    let mut out = format!(
        "kip-agent {} (v{}): running, {}, up {}\n",
        r.device,
        r.version,
        if r.healthy { "healthy" } else { "UNHEALTHY" },
        human_duration(r.uptime_s)
    );
    if r.sources.is_empty() {
        out.push_str("sources: none configured\n");
    } else {
        out.push_str("sources:\n");
        for s in &r.sources {
            let _ = writeln!(
                out,
                "  {:<20} {:<6} {:<12} readings {:>10}  dead letters {:>6}  reconnects {:>4}",
                s.name,
                s.kind,
                if s.connected {
                    "connected"
                } else {
                    "DISCONNECTED"
                },
                s.readings,
                s.dead_letters,
                s.reconnects
            );
        }
    }
    out.push_str(&format_buffer(&r.buffer, 0));
    out.push_str(&format_sync(r.sync.as_ref(), &r.buffer));
    if r.records_dropped > 0 {
        let _ = writeln!(out, "records dropped by the writer: {}", r.records_dropped);
    }
    for q in &r.quarantined_buffers {
        let _ = writeln!(
            out,
            "QUARANTINED buffer (not synced, inspect then remove): {q}"
        );
    }
    out
}

fn format_record(s: &Sequenced) -> String {
    let text = match &s.record {
        // Payload bytes as text: a JSON byte array is unreadable for a human.
        Record::DeadLetter(d) => format!(
            "dead_letter source={} origin={:?} reason={:?} payload={:?} ts={}",
            d.source,
            d.origin,
            d.reason,
            String::from_utf8_lossy(&d.payload_prefix),
            d.ts.to_rfc3339()
        ),
        other => serde_json::to_string(other).unwrap_or_else(|e| format!("<{e}>")),
    };
    format!("  seq {:>10}  {}", s.seq, text)
}

/// Formats a [`BufferReport`] read from `origin`.
pub fn format_report(r: &BufferReport, origin: &str) -> String {
    let mut out = format!("{origin}\n{}", format_buffer(&r.stats, 0));
    let _ = writeln!(out, "oldest {}:", r.oldest.len());
    for s in &r.oldest {
        let _ = writeln!(out, "{}", format_record(s));
    }
    let _ = writeln!(out, "newest {}:", r.newest.len());
    for s in &r.newest {
        let _ = writeln!(out, "{}", format_record(s));
    }
    let _ = writeln!(out, "(as of {})", Utc::now().to_rfc3339());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3 * 3600 + 120), "3h 2m");
        assert_eq!(human_duration(2 * 86_400 + 3600), "2d 1h");
    }

    #[test]
    fn status_shows_sync_online_offline_backlog_and_last_ack() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = crate::buffer::Buffer::open(
            dir.path(),
            crate::buffer::BufferOptions::with_max_bytes(1 << 20),
        )
        .unwrap();
        buffer
            .append(&Record::Gap(kip_shared::Gap {
                source: "b1".into(),
                from: Utc::now(),
                to: Utc::now(),
                reason: "t".into(),
            }))
            .unwrap();
        let stats = buffer.stats().unwrap();
        let mut report = crate::sync::SyncReport {
            online: true,
            endpoint: "https://cp:8443".into(),
            last_ack_at: Some(Utc::now() - chrono::Duration::seconds(90)),
            ..Default::default()
        };
        let text = format_sync(Some(&report), &stats);
        assert!(text.contains("ONLINE via https://cp:8443"), "{text}");
        assert!(text.contains("(1m 30s ago)"), "{text}");
        assert!(text.contains("backlog 1 records"), "{text}");
        report.online = false;
        report.last_error = Some("https://cp:8443: connect refused".into());
        report.consecutive_failures = 3;
        let text = format_sync(Some(&report), &stats);
        assert!(text.contains("OFFLINE"), "{text}");
        assert!(text.contains("last error (3 in a row)"), "{text}");
        assert!(format_sync(None, &stats).contains("not configured"));
    }

    #[test]
    fn dead_letters_show_their_payload_as_text() {
        let s = Sequenced {
            epoch: 1,
            seq: 7,
            record: Record::DeadLetter(kip_shared::DeadLetter {
                source: "b1".into(),
                origin: "a/b".into(),
                reason: "not a number".into(),
                payload_prefix: b"twenty".to_vec(),
                ts: Utc::now(),
            }),
        };
        let line = format_record(&s);
        assert!(
            line.contains("payload=\"twenty\"") && line.contains("seq          7"),
            "{line}"
        );
    }
}
