//! The buffer's disk footprint and memory (issue #17), the segment-log buffer next to the sled
//! buffer it replaced (`buffer::sled_v1`, the code as it was) in the same run.
//!
//! Each implementation runs in its own child process (this binary with `--child`), so that
//! its resident memory is its own:
//!
//! 1. **Backlog**: `BUFFER_BENCH_RECORDS` MQTT-like readings (default 1,000,000) appended with
//!    delivery notes (`append_delivered`, what the MQTT writer does), `max_bytes` 512 MiB, a
//!    flush every 10,000: appends/s, RSS with everything buffered, disk footprint. Then the
//!    drain the sync loop does (`read_range` of 10,000 records / 1 MiB, `ack`): RSS peak while
//!    draining, RSS and disk once drained.
//! 2. **Cap**: the same number of readings into a buffer with `max_bytes` = 20 MiB (evicting):
//!    peak and final disk footprint next to `max_bytes`, then after acknowledging everything.
//!
//! Disk figures are allocated blocks (`du`), RSS is `VmRSS` / `VmHWM` of the child.
//!
//! Run: `cargo bench --profile perf -p kip-agent --features bench-reference --bench
//! buffer_footprint` (about 5 minutes optimised, most of it the sled run; the dev profile works
//! too, its rates are not representative).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "bench binary"
)]

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kip_agent::{buffer, source::Delivery};
use kip_shared::{Quality, Reading, Record, Sequenced};

const MIB: f64 = 1024.0 * 1024.0;

fn records() -> u64 {
    std::env::var("BUFFER_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The two implementations behind one interface.
#[allow(clippy::large_enum_variant, reason = "two values in a bench")]
enum Buf {
    New(buffer::Buffer),
    Old(buffer::sled_v1::Buffer),
}

impl Buf {
    fn open(which: &str, dir: &Path, max_bytes: u64) -> Self {
        match which {
            "new" => Self::New(
                buffer::Buffer::open(dir, buffer::BufferOptions::with_max_bytes(max_bytes))
                    .unwrap(),
            ),
            _ => {
                // What the agent configured for sled (`buffer.cache_capacity_bytes`, 8 MiB).
                let mut o = buffer::sled_v1::BufferOptions::with_max_bytes(max_bytes);
                o.cache_capacity_bytes = 8 << 20;
                Self::Old(buffer::sled_v1::Buffer::open(dir, o).unwrap())
            }
        }
    }

    fn append_delivered(&self, r: &Record, d: &Delivery) {
        match self {
            Self::New(b) => b.append_delivered(r, d).map(drop).unwrap(),
            Self::Old(b) => b.append_delivered(r, d).map(drop).unwrap(),
        }
    }

    fn flush(&self) {
        match self {
            Self::New(b) => b.flush_blocking().map(drop).unwrap(),
            Self::Old(b) => b.flush_blocking().map(drop).unwrap(),
        }
    }

    fn read(&self, from: u64) -> Vec<Sequenced> {
        match self {
            Self::New(b) => b.read_range(from, 10_000, 1 << 20).unwrap(),
            Self::Old(b) => b.read_range(from, 10_000, 1 << 20).unwrap(),
        }
    }

    fn ack(&self, seq: u64) {
        match self {
            Self::New(b) => b.ack(seq).map(drop).unwrap(),
            Self::Old(b) => b.ack(seq).map(drop).unwrap(),
        }
    }

    fn stored_bytes(&self) -> u64 {
        match self {
            Self::New(b) => b.stats().unwrap().bytes,
            Self::Old(b) => b.stats().unwrap().bytes,
        }
    }
}

fn reading(i: u64) -> Record {
    Record::Reading(Reading {
        source: "line".into(),
        machine: format!("press{}", i % 8),
        metric: "temp".into(),
        ts: chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + i as i64).unwrap(),
        value: i as f64,
        quality: Quality::Good,
    })
}

fn delivery(i: u64) -> Delivery {
    Delivery {
        session: "kip-gw-1".into(),
        id: (i % 65_535) as u16 + 1,
        digest: kip_agent::mqtt::message_digest("plant/press1/temp", i.to_string().as_bytes()),
        redelivered: false,
    }
}

/// Allocated bytes under `dir`.
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            du(&e.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn rss_mib() -> f64 {
    status_kib("VmRSS:") as f64 / 1024.0
}

fn reset_peak() {
    // "5" resets VmHWM to the current RSS (Linux 4.0+).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_mib() -> f64 {
    status_kib("VmHWM:") as f64 / 1024.0
}

/// One implementation, in this (child) process; prints `key value` lines.
fn child(which: &str, work: &Path) {
    let n = records();
    let dir = work.join("backlog");
    let buf = Buf::open(which, &dir, 512 << 20);
    let idle = rss_mib();
    let start = Instant::now();
    for i in 0..n {
        buf.append_delivered(&reading(i), &delivery(i));
        if i % 10_000 == 9_999 {
            buf.flush();
        }
    }
    buf.flush();
    let secs = start.elapsed().as_secs_f64();
    println!("idle_rss_mib {idle:.1}");
    println!("append_per_s {:.0}", n as f64 / secs);
    println!("buffered_rss_mib {:.1}", rss_mib());
    println!("stored_mib {:.1}", buf.stored_bytes() as f64 / MIB);
    println!("buffered_disk_mib {:.1}", du(&dir) as f64 / MIB);
    reset_peak();
    let start = Instant::now();
    let mut from = 0;
    loop {
        let batch = buf.read(from);
        let Some(last) = batch.last().map(|s| s.seq) else {
            break;
        };
        buf.ack(last);
        from = last + 1;
    }
    buf.flush();
    println!("drain_s {:.1}", start.elapsed().as_secs_f64());
    println!("drain_peak_rss_mib {:.1}", peak_mib());
    std::thread::sleep(Duration::from_secs(5));
    println!("drained_rss_mib {:.1}", rss_mib());
    println!("drained_disk_mib {:.1}", du(&dir) as f64 / MIB);
    drop(buf);

    let dir = work.join("cap");
    let max_bytes = 20u64 << 20;
    let buf = Buf::open(which, &dir, max_bytes);
    let mut peak = 0;
    for i in 0..n {
        buf.append_delivered(&reading(i), &delivery(i));
        if i % 10_000 == 9_999 {
            buf.flush();
            peak = peak.max(du(&dir));
        }
    }
    buf.flush();
    println!("cap_mib {:.1}", max_bytes as f64 / MIB);
    println!("cap_stored_mib {:.1}", buf.stored_bytes() as f64 / MIB);
    println!("cap_peak_disk_mib {:.1}", peak as f64 / MIB);
    println!("cap_disk_mib {:.1}", du(&dir) as f64 / MIB);
    let mut from = 0;
    loop {
        let batch = buf.read(from);
        let Some(last) = batch.last().map(|s| s.seq) else {
            break;
        };
        buf.ack(last);
        from = last + 1;
    }
    buf.flush();
    println!("cap_drained_disk_mib {:.1}", du(&dir) as f64 / MIB);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], Path::new(&args[i + 2]));
        return;
    }
    let n = records();
    println!("buffer_footprint: {n} readings with delivery notes");
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    for which in ["new", "old"] {
        let work = tempfile::tempdir().unwrap();
        let out = Command::new(&exe)
            .args(["--child", which])
            .arg(work.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{which}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        // As soon as it is known: the sled run is the long one.
        println!("{which}:\n{text}");
        let map: std::collections::BTreeMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        results.push(map);
    }
    let keys: Vec<String> = results[0].keys().cloned().collect();
    println!(
        "{:<22} {:>14} {:>14}",
        "figure", "segment log", "sled (before)"
    );
    for k in keys {
        println!(
            "{:<22} {:>14} {:>14}",
            k,
            results[0][&k],
            results[1].get(&k).map_or("-", String::as_str)
        );
    }
}
