//! Memory bound of the sync batch decoder, measured with a counting global allocator (its own
//! test binary, one test, so no other test's allocations are counted).
//!
//! - A gzip bomb (64 MiB of JSON whitespace in ~64 KiB) decoded under a 1 MiB limit allocates
//!   at most a few times the limit, never the inflated size.
//! - A valid batch at the limit costs a bounded multiple of its size (printed for the docs).
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "test")]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::Write as _,
    sync::atomic::{AtomicUsize, Ordering},
};

use kip_shared::{
    Quality, Reading, Record, Sequenced,
    batch::{BodyEncoding, DecodeError, DecodeLimits, decode_batch},
    sync::SyncBatch,
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(
    unsafe_code,
    reason = "a global allocator wrapper is unsafe by definition"
)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated above the current level while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

fn gzip_spaces(total: usize) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..total / chunk.len() {
        gz.write_all(&chunk).unwrap();
    }
    gz.finish().unwrap()
}

#[test]
fn decoding_costs_a_bounded_multiple_of_the_limit() {
    const MIB: usize = 1 << 20;
    let limits = DecodeLimits {
        max_records: 100_000,
        max_decoded_bytes: MIB,
    };
    let bomb = gzip_spaces(64 * MIB);
    let (res, peak) = peak_during(|| decode_batch(&bomb, BodyEncoding::Gzip, limits));
    assert_eq!(res, Err(DecodeError::TooLarge(MIB)));
    println!(
        "gzip bomb: {} KiB compressed, 64 MiB inflated, limit 1 MiB: peak {} KiB allocated",
        bomb.len() / 1024,
        peak / 1024
    );
    assert!(peak < 4 * MIB, "peak {peak} bytes");

    // A valid batch just under the limit: what a legitimate maximum costs.
    let ts = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
    let mut records = Vec::new();
    let mut batch = SyncBatch {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        agent_version: "kip-agent".into(),
        epoch: 1,
        first_seq: 1,
        last_seq: 1,
        records: vec![],
        running_model: None,
        health: None,
    };
    let mut seq = 0;
    loop {
        seq += 1;
        records.push(Sequenced {
            epoch: 1,
            seq,
            record: Record::Reading(Reading {
                source: "plc".into(),
                machine: "press-1".into(),
                metric: format!("temperature_{}", seq % 50),
                ts,
                value: seq as f64 * 0.5,
                quality: Quality::Good,
            }),
        });
        if seq % 256 == 0 {
            batch.records.clone_from(&records);
            batch.last_seq = seq;
            if serde_json::to_vec(&batch).unwrap().len() > MIB - 64 * 1024 {
                break;
            }
        }
    }
    let json = serde_json::to_vec(&batch).unwrap();
    assert!(json.len() <= MIB);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&json).unwrap();
        e.finish().unwrap()
    };
    drop(records);
    let (res, peak) = peak_during(|| decode_batch(&gz, BodyEncoding::Gzip, limits));
    let decoded = res.unwrap();
    println!(
        "valid batch: {} records, {} KiB JSON: peak {} KiB allocated ({:.1}x the JSON)",
        decoded.records.len(),
        json.len() / 1024,
        peak / 1024,
        peak as f64 / json.len() as f64
    );
    assert!(
        peak < 8 * json.len(),
        "peak {peak} bytes for {} bytes",
        json.len()
    );
}
