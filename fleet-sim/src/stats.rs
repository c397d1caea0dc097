//! Counters and latencies of a run, per report window and in total, plus what `/proc` says
//! about the generator itself and (optionally) the control plane.
//!
//! Invariants: counters only grow; a latency is recorded once, into the current window, and
//! moved into the run's total when the window is reported, so the summary's percentiles cover
//! every request of the run.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;

/// What the agents count.
#[derive(Debug, Default)]
pub struct Stats {
    pub handshakes: AtomicU64,
    pub syncs: AtomicU64,
    pub heartbeats: AtomicU64,
    pub readings_acked: AtomicU64,
    pub inserted: AtomicU64,
    pub duplicates: AtomicU64,
    /// Requests held back by a `Retry-After`.
    pub retry_after_waits: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    window: Mutex<Latencies>,
    total: Mutex<Latencies>,
}

/// Latencies in microseconds.
#[derive(Debug, Default)]
struct Latencies {
    handshake: Vec<u32>,
    sync: Vec<u32>,
    heartbeat: Vec<u32>,
}

impl Latencies {
    fn append(&mut self, other: &mut Latencies) {
        self.handshake.append(&mut other.handshake);
        self.sync.append(&mut other.sync);
        self.heartbeat.append(&mut other.heartbeat);
    }
}

/// Which request a latency belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Handshake,
    Sync,
    Heartbeat,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Stats {
    pub fn latency(&self, kind: Kind, d: Duration) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        match kind {
            Kind::Handshake => w.handshake.push(micros(d)),
            Kind::Sync => w.sync.push(micros(d)),
            Kind::Heartbeat => w.heartbeat.push(micros(d)),
        }
    }

    pub fn error(&self, kind: &'static str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(kind)
            .or_default() += 1;
    }

    pub fn errors(&self) -> BTreeMap<&'static str, u64> {
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn counters(&self) -> Counters {
        let errors = self.errors();
        Counters {
            shed: errors.get("shed_503").copied().unwrap_or(0),
            retry_after_waits: self.retry_after_waits.load(Relaxed),
            handshakes: self.handshakes.load(Relaxed),
            syncs: self.syncs.load(Relaxed),
            heartbeats: self.heartbeats.load(Relaxed),
            readings_acked: self.readings_acked.load(Relaxed),
            errors: errors.values().sum(),
        }
    }

    /// The current window's percentiles; the window's latencies move into the total.
    pub fn close_window(&self) -> WindowLatency {
        let mut w =
            std::mem::take(&mut *self.window.lock().unwrap_or_else(PoisonError::into_inner));
        let out = WindowLatency {
            handshake: Percentiles::of(&mut w.handshake),
            sync: Percentiles::of(&mut w.sync),
            heartbeat: Percentiles::of(&mut w.heartbeat),
        };
        self.total
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&mut w);
        out
    }

    /// Percentiles over every request of the run (call after the last window closed).
    pub fn total_latency(&self) -> WindowLatency {
        let mut t = self.total.lock().unwrap_or_else(PoisonError::into_inner);
        WindowLatency {
            handshake: Percentiles::of(&mut t.handshake),
            sync: Percentiles::of(&mut t.sync),
            heartbeat: Percentiles::of(&mut t.heartbeat),
        }
    }
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    pub handshakes: u64,
    pub syncs: u64,
    pub heartbeats: u64,
    pub readings_acked: u64,
    /// Every failed request, refusals included.
    pub errors: u64,
    /// Of `errors`: `503` with code `overloaded` (load shed before any work).
    pub shed: u64,
    pub retry_after_waits: u64,
}

/// p50 / p99 / max in milliseconds of `n` requests.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub n: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(v: &mut [u32]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            f64::from(v[i]) / 1000.0
        };
        Self {
            n: v.len() as u64,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WindowLatency {
    pub handshake: Percentiles,
    pub sync: Percentiles,
    pub heartbeat: Percentiles,
}

/// CPU time (seconds) and resident memory (bytes) of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_bytes: u64,
}

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which is 100 on every architecture
/// the kernel exports to user space (`sysconf(_SC_CLK_TCK)`).
const USER_HZ: f64 = 100.0;

/// `pid` = `None`: this process.
pub fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let base = pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"));
    let stat = std::fs::read_to_string(format!("{base}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("{base}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(ProcSample {
        cpu_s: (utime + stime) / USER_HZ,
        rss_bytes: rss_kib * 1024,
    })
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(
            (p.n, p.p50_ms, p.p99_ms, p.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(&mut []).n, 0);
    }

    #[test]
    fn this_process_is_visible_in_proc() {
        let s = proc_sample(None).unwrap();
        assert!(s.rss_bytes > 0);
    }
}
