//! The agent's health report ([`kip_shared::health::HealthReport`]), sent with every sync
//! batch and with the idle heartbeat (see [`crate::sync`]).
//!
//! [`HealthCollector::report`] reads everything fresh when a batch or heartbeat is built:
//! buffer statistics (a read of the oldest record, the same the status page does),
//! source state from the ingest metrics, the last-value clock the buffer writer stamps per
//! source ([`SourceClock`]), the certificate's `not_after`, the running model and its drift
//! (score and drifting features from the drift detector's latest windows), free space on
//! the state volume (`statvfs`), RSS (`/proc/self/status`). The clock offset is measured by
//! the sync loop, which owns the exchange, and passed in.
//!
//! Invariants:
//! - Collecting never fails: a value that cannot be read is `None` (logged once at debug).
//! - The report passes [`HealthReport::check`] or is not sent: a report the control plane
//!   would refuse must not turn a data batch into a refused (poison) batch.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use chrono::{DateTime, Utc};
use kip_shared::health::{HealthReport, SourceHealth};

use crate::{buffer::Buffer, edge_inference::Inference, metrics::IngestMetrics};

/// When each source last delivered a value (stamped by the buffer writer).
#[derive(Debug, Default)]
pub struct SourceClock(Mutex<HashMap<String, Instant>>);

impl SourceClock {
    /// `source` delivered a value now.
    pub fn observe(&self, source: &str) {
        let now = Instant::now();
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // get_mut first: no allocation on the hot path.
        match map.get_mut(source) {
            Some(t) => *t = now,
            None => {
                map.insert(source.to_owned(), now);
            }
        }
    }

    /// Seconds since `source`'s last value; `None` before the first.
    pub fn age_s(&self, source: &str) -> Option<f64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(source)
            .map(|t| t.elapsed().as_secs_f64())
    }
}

/// Everything a report is read from.
#[derive(Debug)]
pub struct HealthCollector {
    pub buffer: Arc<Buffer>,
    pub buffer_max_bytes: u64,
    pub metrics: IngestMetrics,
    /// (name, kind) of every source, in config order.
    pub sources: Vec<(String, &'static str)>,
    pub clock: Arc<SourceClock>,
    pub identity: Option<crate::identity::IdentityHandle>,
    pub inference: Option<Arc<Inference>>,
    pub state_dir: PathBuf,
    pub started: Instant,
}

impl HealthCollector {
    /// Names of the sources not connected now.
    pub fn sources_down(&self) -> Vec<String> {
        self.sources
            .iter()
            .filter(|(name, _)| {
                self.metrics
                    .connected
                    .get_or_create(&IngestMetrics::source(name))
                    .get()
                    != 1
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// A report as of now; `clock_offset_ms` and `sync_dead_letters` come from the sync loop.
    /// `None` when the report would not pass [`HealthReport::check`] (logged).
    pub fn report(
        &self,
        clock_offset_ms: Option<i64>,
        sync_dead_letters: u64,
    ) -> Option<HealthReport> {
        let stats = self.buffer.stats().ok();
        let mut dead_letters = sync_dead_letters;
        let sources = self
            .sources
            .iter()
            .map(|(name, kind)| {
                let l = IngestMetrics::source(name);
                dead_letters += self.metrics.dead_letters.get_or_create(&l).get();
                SourceHealth {
                    name: name.clone(),
                    kind: (*kind).into(),
                    connected: self.metrics.connected.get_or_create(&l).get() == 1,
                    last_value_age_s: self.clock.age_s(name),
                    reconnects: self.metrics.reconnects.get_or_create(&l).get(),
                }
            })
            .collect();
        let (disk_free_bytes, disk_total_bytes) = disk_space(&self.state_dir);
        // The drift detector's latest full windows (see edge_inference::DriftSummary).
        let drift = self.inference.as_ref().and_then(|i| i.drift_summary());
        let report = HealthReport {
            reported_at: Some(Utc::now()),
            agent_version: format!("kip-agent {}", crate::self_update::agent_version()),
            buffer_bytes: stats.as_ref().map_or(0, |s| s.bytes),
            buffer_max_bytes: self.buffer_max_bytes,
            buffer_records: stats.as_ref().map_or(0, |s| s.counts.total()),
            oldest_unsynced_age_s: stats
                .as_ref()
                .and_then(|s| s.oldest_unacked_age_ms)
                .map(|ms| ms as f64 / 1000.0),
            dead_letters,
            evicted_records: stats.as_ref().map_or(0, |s| s.evicted_records_total),
            sources,
            cert_not_after: self
                .identity
                .as_ref()
                .and_then(|i| DateTime::from_timestamp(i.not_after_unix(), 0)),
            running_model: self.inference.as_ref().and_then(|i| i.running_model()),
            model_drift: drift.as_ref().map(|d| d.score),
            model_drift_features: drift.map_or_else(Vec::new, |d| {
                d.drifted
                    .into_iter()
                    .take(kip_shared::health::MAX_DRIFT_FEATURES)
                    .collect()
            }),
            disk_free_bytes,
            disk_total_bytes,
            clock_offset_ms,
            rss_bytes: rss_bytes(),
            uptime_s: self.started.elapsed().as_secs(),
            inference_errors: self
                .inference
                .as_ref()
                .map_or(0, |i| i.metrics.errors.get()),
        };
        match report.check() {
            Ok(()) => Some(report),
            Err(e) => {
                tracing::warn!(error = %e, "health report not sent");
                None
            }
        }
    }
}

/// Free (available to this user) and total bytes of the file system holding `dir`.
pub fn disk_space(dir: &std::path::Path) -> (Option<u64>, Option<u64>) {
    match rustix::fs::statvfs(dir) {
        Ok(s) => (
            Some(s.f_bavail.saturating_mul(s.f_frsize)),
            Some(s.f_blocks.saturating_mul(s.f_frsize)),
        ),
        Err(e) => {
            tracing::debug!(error = %e, dir = %dir.display(), "statvfs failed");
            (None, None)
        }
    }
}

/// Resident set size of this process (Linux `/proc/self/status`, `VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_rss_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = disk_space(dir.path());
        let (free, total) = (free.unwrap(), total.unwrap());
        assert!(total > 0 && free <= total, "{free} of {total}");
        assert!(rss_bytes().unwrap() > 1024 * 1024);
    }

    #[test]
    fn the_source_clock_ages() {
        let c = SourceClock::default();
        assert_eq!(c.age_s("a"), None);
        c.observe("a");
        let age = c.age_s("a").unwrap();
        assert!((0.0..5.0).contains(&age), "{age}");
    }
}
