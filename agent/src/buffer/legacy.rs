//! Upgrade of a sled 0.34 buffer (the layout agents before the segment log wrote; see
//! docs/architecture.md) into the segment layout, on the first open by a newer agent.
//!
//! Invariants:
//! - The sled files (`conf`, `db`, `blobs/`, `snap.*`) are read, never changed. The new
//!   layout is built next to them and committed by writing the `meta` file (atomic rename);
//!   only then are the sled files removed. A crash before the commit leaves the sled buffer as
//!   it was (a partial new layout is discarded at the next attempt); a crash after it leaves
//!   sled files that the next open removes.
//! - Every stored record keeps its sequence number, value bytes (format 1 or 2) and the
//!   buffer keeps its epoch and acknowledged position; the delivery notes keep their order.

use std::path::Path;

use super::{
    BufferError, Meta,
    notes::Notes,
    segments::{Log, sync_all, sync_dir},
};

/// Whether `dir` holds sled files.
pub fn has_sled_files(dir: &Path) -> bool {
    dir.join("conf").exists() || dir.join("db").exists()
}

/// Removes the sled files from `dir` (after a committed migration).
pub fn remove_sled_files(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let p = e.path();
        if name == "blobs" {
            std::fs::remove_dir_all(&p)?;
        } else if name == "conf" || name == "db" || name.starts_with("snap.") {
            std::fs::remove_file(&p)?;
        }
    }
    sync_dir(dir)
}

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, sled::Error> {
    Ok(tree.get(key)?.map(|v| super::key_seq(&v)))
}

/// Copies the sled buffer in `dir` into the segment layout (not yet committed); returns the
/// meta to commit, or `None` when the sled buffer never got an epoch (nothing in it is
/// durable: start fresh).
pub fn migrate(
    dir: &Path,
    cache_capacity_bytes: u64,
    segment_bytes: u64,
    max_notes: usize,
) -> Result<Option<Meta>, BufferError> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity_bytes)
        .flush_every_ms(None)
        .open()
        .map_err(|source| match &source {
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                BufferError::Locked {
                    path: dir.to_owned(),
                }
            }
            _ => BufferError::Open {
                path: dir.to_owned(),
                source,
            },
        })?;
    let meta = db.open_tree("meta")?;
    let Some(epoch) = read_u64(&meta, b"epoch")? else {
        return Ok(None);
    };
    let format = read_u64(&meta, b"format")?;
    if format != Some(1) {
        return Err(BufferError::Format {
            path: dir.to_owned(),
            found: format.map_or_else(|| "none".into(), |f| format!("sled {f}")),
        });
    }
    let acked_up_to = read_u64(&meta, b"acked_up_to")?.unwrap_or(0);
    // A partial layout from an attempt a crash interrupted.
    for sub in [super::READINGS_DIR, super::RECORDS_DIR] {
        match std::fs::remove_dir_all(dir.join(sub)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    let notes_path = dir.join(super::NOTES_FILE);
    match std::fs::remove_file(&notes_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut records = 0u64;
    for (tree, sub) in [
        ("readings", super::READINGS_DIR),
        ("records", super::RECORDS_DIR),
    ] {
        let tree = db.open_tree(tree)?;
        let (mut log, _) = Log::open(&dir.join(sub), segment_bytes, acked_up_to, |_, _| {})?;
        for item in tree.iter() {
            let (k, v) = item?;
            let seq = super::key_seq(&k);
            if seq > acked_up_to {
                log.append(seq, &v)?;
                records += 1;
            }
        }
        let (files, d) = log.sync_handles()?;
        sync_all(&files, d.as_deref())?;
    }
    let mut notes = Notes::open(&notes_path, max_notes)?;
    for item in db.open_tree("delivery_order")?.iter() {
        let (k, key) = item?;
        notes.note(super::key_seq(&k), &key, 0);
    }
    notes.write_pending(u64::MAX)?;
    std::fs::File::open(&notes_path)?.sync_all()?;
    sync_dir(dir)?;
    tracing::info!(path = %dir.display(), records, notes = notes.len(), epoch,
        "sled buffer copied into the segment layout");
    Ok(Some(Meta {
        epoch,
        acked_up_to,
        evicted_up_to: 0,
    }))
}
