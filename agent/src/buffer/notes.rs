//! Delivery notes: which redeliverable upstream message was stored under which sequence.
//!
//! Invariants:
//! - In memory: a map from the note's fingerprint (the first 8 bytes of sha256 over the
//!   delivery key: session, id, content digest) to the sequence, and the FIFO of the last
//!   `max` notes (16 bytes each; with the map, 40 to 65 bytes a note depending on how full
//!   the tables are). A false match needs
//!   two of at most `max` remembered keys to agree on 64 bits of sha256.
//! - On disk: `<buffer dir>/notes.log`, entries `[crc32c: u32 LE over the rest][seq: u64 LE]
//!   [fingerprint: u64 LE]` in the order they were noted, replayed at open (the FIFO bound
//!   applied as they are read); a torn tail entry is cut off. The file is rewritten (temporary
//!   file, fsync, rename) when it holds a quarter more entries than the FIFO.
//! - A note is written to the file only after its record was made durable (the buffer's flush
//!   hands [`Notes::write_pending`] the durable sequence), so a note is never durable without
//!   its record; the reverse (record durable, note not) is repaired by the buffer's open from
//!   the key the record carries.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::{BufReader, Read, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

const ENTRY_LEN: usize = 20;
/// Rewrite once the file holds this many entries more than the FIFO (or a quarter more).
const COMPACT_SLACK_ENTRIES: usize = 4096;

static CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Fingerprint of a delivery key.
pub fn fingerprint(key: &[u8]) -> u64 {
    let d = Sha256::digest(key);
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn entry(seq: u64, fp: u64) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[4..12].copy_from_slice(&seq.to_le_bytes());
    e[12..20].copy_from_slice(&fp.to_le_bytes());
    let crc = CRC.checksum(&e[4..]);
    e[..4].copy_from_slice(&crc.to_le_bytes());
    e
}

/// The delivery notes; see the module docs.
#[derive(Debug)]
pub struct Notes {
    path: PathBuf,
    map: HashMap<u64, u64>,
    fifo: VecDeque<(u64, u64)>,
    max: usize,
    /// Kept beyond `max` (see [`Notes::note`]).
    extra: usize,
    /// Noted but not yet written: `(seq, fingerprint)`.
    pending: Vec<(u64, u64)>,
    file: File,
    file_entries: usize,
}

impl Notes {
    /// Opens (creating) the notes file `path`.
    pub fn open(path: &Path, max: usize) -> std::io::Result<Self> {
        let mut notes = Self {
            path: path.to_owned(),
            map: HashMap::new(),
            fifo: VecDeque::new(),
            max: max.max(1),
            extra: 0,
            pending: Vec::new(),
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
            file_entries: 0,
        };
        let len = notes.file.metadata()?.len();
        let mut r = BufReader::new(File::open(path)?);
        let mut e = [0u8; ENTRY_LEN];
        let mut good = 0u64;
        while good + ENTRY_LEN as u64 <= len {
            r.read_exact(&mut e)?;
            if CRC.checksum(&e[4..]).to_le_bytes() != e[..4] {
                break;
            }
            let seq = u64::from_le_bytes(e[4..12].try_into().unwrap_or_default());
            let fp = u64::from_le_bytes(e[12..20].try_into().unwrap_or_default());
            // Kept whole: notes beyond `max` were kept for a deferred backlog the broker may
            // still hold; they leave gradually once the sources say the backlog is gone.
            notes.remember(seq, fp, 0);
            notes.file_entries += 1;
            good += ENTRY_LEN as u64;
        }
        notes.extra = notes.fifo.len().saturating_sub(notes.max);
        if good < len {
            tracing::warn!(path = %path.display(), cut = len - good,
                "delivery notes end in a torn entry; cutting it off");
            notes.file.set_len(good)?;
        }
        Ok(notes)
    }

    /// Adds a note, then drops at most `budget` of the oldest beyond `max + extra`.
    fn remember(&mut self, seq: u64, fp: u64, budget: usize) {
        self.map.insert(fp, seq);
        self.fifo.push_back((seq, fp));
        let window = self.max.saturating_add(self.extra);
        let mut budget = budget;
        while self.fifo.len() > window && budget > 0 {
            budget -= 1;
            let Some((old_seq, old_fp)) = self.fifo.pop_front() else {
                break;
            };
            // Only if no later delivery refreshed the note.
            if self.map.get(&old_fp) == Some(&old_seq) {
                self.map.remove(&old_fp);
            }
        }
    }

    /// Notes `key` as stored under `seq`; written to the file by the next flush. `extra` notes
    /// are kept beyond `max` (an MQTT source's deferred backlog); when it shrinks, at most two
    /// old notes leave per new one, so the window shrinks gradually and no append pays for it.
    pub fn note(&mut self, seq: u64, key: &[u8], extra: usize) {
        self.extra = extra;
        let fp = fingerprint(key);
        self.remember(seq, fp, 2);
        self.pending.push((seq, fp));
    }

    /// The sequence `key` was noted under, if remembered.
    pub fn get(&self, key: &[u8]) -> Option<u64> {
        self.map.get(&fingerprint(key)).copied()
    }

    /// Notes kept.
    pub fn len(&self) -> usize {
        self.fifo.len()
    }

    /// The highest noted sequence (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.fifo.back().map_or(0, |e| e.0)
    }

    /// Bytes of the notes file.
    pub fn disk_bytes(&self) -> u64 {
        (self.file_entries * ENTRY_LEN) as u64
    }

    /// Writes the pending notes of records up to `durable_seq` (no fsync: a lost note is
    /// restored from its record at open), rewriting the file when it grew too large.
    pub fn write_pending(&mut self, durable_seq: u64) -> std::io::Result<()> {
        let n = self.pending.partition_point(|(s, _)| *s <= durable_seq);
        if n == 0 {
            return Ok(());
        }
        let slack = COMPACT_SLACK_ENTRIES.max(self.fifo.len() / 4);
        if self.file_entries + n > self.fifo.len() + slack {
            self.compact(durable_seq)?;
            self.pending.drain(..n);
            return Ok(());
        }
        let mut buf = Vec::with_capacity(n * ENTRY_LEN);
        for (seq, fp) in &self.pending[..n] {
            buf.extend_from_slice(&entry(*seq, *fp));
        }
        self.file.write_all(&buf)?;
        self.file_entries += n;
        self.pending.drain(..n);
        Ok(())
    }

    /// Rewrites the file with the FIFO, leaving out the notes of records not yet durable
    /// (above `durable_seq`; they stay pending).
    fn compact(&mut self, durable_seq: u64) -> std::io::Result<()> {
        let unwritten: std::collections::HashSet<u64> = self
            .pending
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s > durable_seq)
            .collect();
        let tmp = self.path.with_extension("log.tmp");
        let mut buf = Vec::with_capacity(self.fifo.len() * ENTRY_LEN);
        let mut n = 0;
        for (seq, fp) in &self.fifo {
            if !unwritten.contains(seq) {
                buf.extend_from_slice(&entry(*seq, *fp));
                n += 1;
            }
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            super::segments::sync_dir(dir)?;
        }
        self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        self.file_entries = n;
        Ok(())
    }
}
