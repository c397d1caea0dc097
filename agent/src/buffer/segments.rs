//! One append-only record log split into segment files (`<log dir>/<first seq>.log`).
//!
//! Invariants:
//! - A frame is `[value length: u32 LE][crc32c: u32 LE over seq + value][seq: u64 LE][value]`
//!   ([`FRAME_HEADER_LEN`] bytes of header). Sequences strictly increase within a log, across
//!   segments; a segment's file name is the sequence of its first frame.
//! - Deletion is a prefix: every record with `seq <= dead_up_to` is dead (acknowledged or
//!   evicted) and never read. A segment whose records are all dead is unlinked by
//!   [`Log::reclaim`] once the caller made the mark that killed it durable, so that a crash
//!   never sees a missing segment without the mark that explains it.
//! - On open every segment is scanned; the first frame that is cut short, fails its checksum
//!   or does not increase the sequence ends the segment: the file is truncated there. What a
//!   completed [`Log::sync_handles`] + `fdatasync` covered is a prefix of the frames, so it is
//!   kept.
//! - Memory: per segment a sparse index (one `(seq, offset)` every [`INDEX_INTERVAL_BYTES`]) and
//!   counters; frames not yet written to the file (at most [`PENDING_WRITE_BYTES`] in normal
//!   operation). Reads go to the file (the page cache), nothing else is cached.

use std::{
    collections::VecDeque,
    fs::File,
    io::{BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use kip_shared::RecordKind;

use super::KindCounts;

/// Bytes of a frame's header: length, checksum, sequence.
pub const FRAME_HEADER_LEN: u64 = 16;
/// One sparse index entry per this many bytes of a segment.
const INDEX_INTERVAL_BYTES: u64 = 64 * 1024;
/// Frames are gathered in memory and written to the file in chunks of about this size (and
/// before every read, flush and roll).
const PENDING_WRITE_BYTES: usize = 64 * 1024;
/// Past this many unwritten bytes (the file refuses writes: disk full) appends fail instead of
/// growing memory.
pub const PENDING_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A frame longer than this is corruption (a record is at most a few hundred kB).
const MAX_VALUE_BYTES: u32 = 64 * 1024 * 1024;
const EXT: &str = "log";

static CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn frame_crc(seq: u64, value: &[u8]) -> u32 {
    let mut d = CRC.digest();
    d.update(&seq.to_le_bytes());
    d.update(value);
    d.finalize()
}

/// Kind of a stored value (its second byte); unknown kinds count as dead letters.
pub fn value_kind(value: &[u8]) -> RecordKind {
    value
        .get(1)
        .and_then(|c| RecordKind::from_code(*c))
        .unwrap_or(RecordKind::DeadLetter)
}

/// Live bytes (frames) and counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Agg {
    pub bytes: u64,
    pub counts: KindCounts,
}

impl Agg {
    fn add(&mut self, value: &[u8]) {
        self.bytes += FRAME_HEADER_LEN + value.len() as u64;
        *self.counts.slot(value_kind(value)) += 1;
    }

    fn sub(&mut self, other: &Agg) {
        self.bytes -= other.bytes;
        for k in RecordKind::ALL {
            *self.counts.slot(k) -= other.counts.get(k);
        }
    }

    pub fn add_agg(&mut self, other: &Agg) {
        self.bytes += other.bytes;
        for k in RecordKind::ALL {
            *self.counts.slot(k) += other.counts.get(k);
        }
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Bytes of frames, written or pending.
    len: u64,
    last_seq: u64,
    last_offset: u64,
    /// Sparse `(seq, offset)` index; the first frame is always in it.
    index: Vec<(u64, u64)>,
    /// Offset of the first live frame (`len` when none is live).
    live_from: u64,
    live: Agg,
}

impl Segment {
    fn first_seq(&self) -> u64 {
        self.index.first().map_or(0, |e| e.0)
    }

    fn note_frame(&mut self, seq: u64, offset: u64, value: &[u8], live: bool) {
        let frame = FRAME_HEADER_LEN + value.len() as u64;
        if self.index.is_empty()
            || offset >= self.index.last().map_or(0, |e| e.1) + INDEX_INTERVAL_BYTES
        {
            self.index.push((seq, offset));
        }
        if live {
            if self.live.counts.total() == 0 {
                self.live_from = offset;
            }
            self.live.add(value);
        } else if self.live.counts.total() == 0 {
            self.live_from = offset + frame;
        }
        self.last_seq = seq;
        self.last_offset = offset;
        self.len = offset + frame;
    }

    /// Offset to start scanning at for `seq`.
    fn offset_for(&self, seq: u64) -> u64 {
        let i = self.index.partition_point(|e| e.0 <= seq);
        let at = if i == 0 { 0 } else { self.index[i - 1].1 };
        at.max(self.live_from)
    }
}

/// A frame read back.
#[derive(Debug)]
pub struct Frame {
    pub seq: u64,
    pub value: Vec<u8>,
}

/// Reads frames sequentially from `offset` up to `end`.
struct FrameReader {
    r: BufReader<File>,
    pos: u64,
    end: u64,
}

enum Next {
    Frame(Frame),
    End,
    /// Cut short, bad checksum or absurd length, at `pos`.
    Bad,
}

impl FrameReader {
    fn open(path: &Path, offset: u64, end: u64) -> std::io::Result<Self> {
        let mut f = File::open(path)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok(Self {
            r: BufReader::with_capacity(64 * 1024, f),
            pos: offset,
            end,
        })
    }

    /// The next header: `(seq, value length, crc)`.
    fn header(&mut self) -> std::io::Result<Option<(u64, u32, u32)>> {
        if self.pos + FRAME_HEADER_LEN > self.end {
            return Ok(None);
        }
        let mut h = [0u8; FRAME_HEADER_LEN as usize];
        self.r.read_exact(&mut h)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        Ok(Some((seq, len, crc)))
    }

    fn next(&mut self, verify: bool) -> std::io::Result<Next> {
        let Some((seq, len, crc)) = self.header()? else {
            return Ok(if self.pos == self.end {
                Next::End
            } else {
                Next::Bad
            });
        };
        if len > MAX_VALUE_BYTES || self.pos + FRAME_HEADER_LEN + u64::from(len) > self.end {
            return Ok(Next::Bad);
        }
        let mut value = vec![0u8; len as usize];
        self.r.read_exact(&mut value)?;
        if verify && frame_crc(seq, &value) != crc {
            return Ok(Next::Bad);
        }
        self.pos += FRAME_HEADER_LEN + u64::from(len);
        Ok(Next::Frame(Frame { seq, value }))
    }

    /// Skips the next frame's value, reading only its header and kind byte.
    fn next_summary(&mut self) -> std::io::Result<Option<(u64, u64, RecordKind)>> {
        let Some((seq, len, _)) = self.header()? else {
            return Ok(None);
        };
        let mut head = [0u8; 2];
        let n = (len as usize).min(2);
        self.r.read_exact(&mut head[..n])?;
        self.r.seek_relative(i64::from(len) - n as i64)?;
        self.pos += FRAME_HEADER_LEN + u64::from(len);
        Ok(Some((
            seq,
            FRAME_HEADER_LEN + u64::from(len),
            value_kind(&head[..n]),
        )))
    }
}

/// Outcome of opening a log.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Bytes cut off torn or corrupt segment tails.
    pub truncated_bytes: u64,
    pub max_seq: u64,
}

/// One segment log; see the module docs.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// The last segment's file, open for appending.
    active: Option<Arc<File>>,
    /// Frames of the last segment not yet written to its file.
    pending: Vec<u8>,
    /// Segments rolled over since the last sync; synced by the next flush.
    unsynced: Vec<Arc<File>>,
    /// A segment file was created or removed since the last sync of the directory.
    dir_dirty: bool,
    dead_up_to: u64,
    /// Fully dead segments waiting for [`Log::reclaim`]: `(last seq, path)`.
    doomed: Vec<(u64, PathBuf)>,
    live: Agg,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.{EXT}"))
}

impl Log {
    /// Opens (creating) the log in `dir`; `dead_up_to` is the durable deletion mark. Every
    /// live frame is passed to `on_live` in sequence order.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        dead_up_to: u64,
        mut on_live: impl FnMut(u64, &[u8]),
    ) -> std::io::Result<(Self, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let mut files: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some(EXT) {
                continue;
            }
            if let Some(seq) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
            {
                files.push((seq, p));
            }
        }
        files.sort();
        let mut rec = Recovered::default();
        let mut log = Self {
            dir: dir.to_owned(),
            segment_bytes,
            segments: VecDeque::new(),
            active: None,
            pending: Vec::new(),
            unsynced: Vec::new(),
            dir_dirty: false,
            dead_up_to,
            doomed: Vec::new(),
            live: Agg::default(),
        };
        let mut last_seq = 0;
        for (_, path) in files {
            let file_len = std::fs::metadata(&path)?.len();
            let mut seg = Segment {
                path: path.clone(),
                len: 0,
                last_seq: 0,
                last_offset: 0,
                index: Vec::new(),
                live_from: 0,
                live: Agg::default(),
            };
            let mut r = FrameReader::open(&path, 0, file_len)?;
            loop {
                let offset = r.pos;
                match r.next(true)? {
                    Next::Frame(f) if f.seq > last_seq => {
                        let live = f.seq > dead_up_to;
                        if live {
                            on_live(f.seq, &f.value);
                        }
                        seg.note_frame(f.seq, offset, &f.value, live);
                        last_seq = f.seq;
                    }
                    Next::End => break,
                    Next::Frame(_) | Next::Bad => {
                        tracing::warn!(path = %path.display(), offset, file_len,
                            "buffer segment ends in a torn or corrupt frame; truncating it there \
                             (records after it were never reported durable)");
                        rec.truncated_bytes += file_len - offset;
                        let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                        f.set_len(offset)?;
                        f.sync_all()?;
                        break;
                    }
                }
            }
            if seg.index.is_empty() || seg.live.counts.total() == 0 {
                // Empty or wholly dead: the mark that killed it is durable (it was read from
                // disk), so the file can go now.
                std::fs::remove_file(&path)?;
                log.dir_dirty = true;
                continue;
            }
            // A kill -9 leaves written but unsynced pages behind; everything recovered is
            // reported durable, so make it so (cheap for clean files).
            File::open(&path)?.sync_data()?;
            log.live.add_agg(&seg.live);
            log.segments.push_back(seg);
        }
        rec.max_seq = last_seq;
        if log.dir_dirty {
            sync_dir(dir)?;
            log.dir_dirty = false;
        }
        Ok((log, rec))
    }

    /// Live bytes and counts.
    pub fn live(&self) -> Agg {
        self.live
    }

    /// Bytes of segment files on disk (including the dead parts and doomed segments).
    pub fn disk_bytes(&self) -> u64 {
        let doomed: u64 = self
            .doomed
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        self.segments.iter().map(|s| s.len).sum::<u64>() + doomed
    }

    /// Appends a frame. The caller guarantees `seq` is above every sequence in the log.
    pub fn append(&mut self, seq: u64, value: &[u8]) -> std::io::Result<()> {
        if self.pending.len() >= PENDING_MAX_BYTES {
            // The file refused the last writes (disk full): fail rather than grow memory.
            self.write_pending()?;
        }
        let len = u32::try_from(value.len())
            .ok()
            .filter(|l| *l <= MAX_VALUE_BYTES)
            .ok_or_else(|| std::io::Error::other("record too large for a buffer frame"))?;
        let roll = match self.segments.back() {
            None => true,
            Some(s) => s.len >= self.segment_bytes || self.active.is_none(),
        };
        if roll {
            self.roll(seq)?;
        }
        let Some(seg) = self.segments.back_mut() else {
            return Err(std::io::Error::other("no active segment after roll"));
        };
        let offset = seg.len;
        self.pending.extend_from_slice(&len.to_le_bytes());
        self.pending
            .extend_from_slice(&frame_crc(seq, value).to_le_bytes());
        self.pending.extend_from_slice(&seq.to_le_bytes());
        self.pending.extend_from_slice(value);
        seg.note_frame(seq, offset, value, true);
        self.live.add(value);
        if self.pending.len() >= PENDING_WRITE_BYTES {
            // A failed write keeps the frames in `pending`; the flush reports the failure.
            let _ = self.write_pending();
        }
        Ok(())
    }

    fn roll(&mut self, first_seq: u64) -> std::io::Result<()> {
        self.write_pending()?;
        let path = segment_path(&self.dir, first_seq);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        if let Some(old) = self.active.replace(Arc::new(file)) {
            self.unsynced.push(old);
        }
        self.dir_dirty = true;
        self.segments.push_back(Segment {
            path,
            len: 0,
            last_seq: 0,
            last_offset: 0,
            index: Vec::new(),
            live_from: 0,
            live: Agg::default(),
        });
        Ok(())
    }

    /// Writes the pending frames to the active segment's file.
    pub fn write_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(file) = &self.active else {
            self.pending.clear();
            return Ok(());
        };
        let mut f: &File = file;
        let mut done = 0;
        let res = loop {
            if done == self.pending.len() {
                break Ok(());
            }
            match f.write(&self.pending[done..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.pending.drain(..done);
        res
    }

    /// Writes pending frames and returns the files a flush must `fdatasync` (and the log's
    /// directory when a segment was created or removed), in that order of need.
    pub fn sync_handles(&mut self) -> std::io::Result<(Vec<Arc<File>>, Option<PathBuf>)> {
        self.write_pending()?;
        let mut files = std::mem::take(&mut self.unsynced);
        files.extend(self.active.clone());
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone());
        Ok((files, dir))
    }

    /// Puts back what a failed sync did not cover.
    pub fn sync_failed(&mut self, files: Vec<Arc<File>>, dir: Option<PathBuf>) {
        for f in files {
            if !self.active.as_ref().is_some_and(|a| Arc::ptr_eq(a, &f)) {
                self.unsynced.push(f);
            }
        }
        self.dir_dirty |= dir.is_some();
    }

    /// Marks every record with `seq <= mark` dead; returns what died. Segments that are
    /// wholly dead are queued for [`Log::reclaim`].
    pub fn advance_dead(&mut self, mark: u64) -> std::io::Result<Agg> {
        let mut died = Agg::default();
        if mark <= self.dead_up_to {
            return Ok(died);
        }
        self.dead_up_to = mark;
        while let Some(seg) = self.segments.front_mut() {
            if seg.last_seq <= mark {
                died.add_agg(&seg.live);
                let is_active = self.segments.len() == 1;
                let Some(seg) = self.segments.pop_front() else {
                    break;
                };
                if is_active {
                    // Its unwritten frames are dead too; a new segment starts at the next append.
                    self.pending.clear();
                    if let Some(a) = self.active.take() {
                        self.unsynced.push(a);
                    }
                }
                self.doomed.push((seg.last_seq, seg.path));
                continue;
            }
            if seg.first_seq() > mark || seg.live_from >= seg.len {
                break;
            }
            // Partly dead: walk its frames from the first live one.
            let is_active = self.segments.len() == 1;
            if is_active {
                self.write_pending()?;
            }
            let Some(seg) = self.segments.front_mut() else {
                break;
            };
            let mut r = FrameReader::open(&seg.path, seg.live_from, seg.len)?;
            let mut gone = Agg::default();
            while r.pos < seg.len {
                let at = r.pos;
                let Some((seq, size, kind)) = r.next_summary()? else {
                    break;
                };
                if seq > mark {
                    seg.live_from = at;
                    break;
                }
                gone.bytes += size;
                *gone.counts.slot(kind) += 1;
                seg.live_from = r.pos;
            }
            seg.live.sub(&gone);
            died.add_agg(&gone);
            break;
        }
        self.live.sub(&died);
        Ok(died)
    }

    /// Unlinks the doomed segments whose records are all at or below `durable_mark` (a mark
    /// the caller made durable).
    pub fn reclaim(&mut self, durable_mark: u64) -> std::io::Result<()> {
        let mut removed = false;
        let mut keep = Vec::new();
        for (last, path) in std::mem::take(&mut self.doomed) {
            if last <= durable_mark {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        keep.push((last, path));
                        self.doomed.extend(keep);
                        return Err(e);
                    }
                }
            } else {
                keep.push((last, path));
            }
        }
        self.doomed = keep;
        if removed {
            self.dir_dirty = true;
        }
        Ok(())
    }

    /// Whether a segment waits for [`Log::reclaim`].
    pub fn has_doomed(&self) -> bool {
        !self.doomed.is_empty()
    }

    /// Up to `max_records` live frames with `seq >= from_seq`, stopping before `max_bytes`
    /// (frame bytes) would be exceeded, but at least one when there is one.
    pub fn read(
        &mut self,
        from_seq: u64,
        max_records: usize,
        max_bytes: u64,
    ) -> std::io::Result<Vec<Frame>> {
        self.write_pending()?;
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = self
            .segments
            .partition_point(|s| s.first_seq() <= from_seq)
            .saturating_sub(1);
        for seg in self.segments.iter().skip(start) {
            if seg.last_seq < from_seq || seg.live_from >= seg.len {
                continue;
            }
            let mut r = FrameReader::open(&seg.path, seg.offset_for(from_seq), seg.len)?;
            loop {
                if out.len() >= max_records {
                    return Ok(out);
                }
                let f = match r.next(false)? {
                    Next::Frame(f) => f,
                    Next::End | Next::Bad => break,
                };
                if f.seq < from_seq || f.seq <= self.dead_up_to {
                    continue;
                }
                let size = FRAME_HEADER_LEN + f.value.len() as u64;
                if !out.is_empty() && bytes + size > max_bytes {
                    return Ok(out);
                }
                bytes += size;
                out.push(f);
            }
        }
        Ok(out)
    }

    /// The oldest live frame.
    pub fn first(&mut self) -> std::io::Result<Option<Frame>> {
        Ok(self.read(0, 1, u64::MAX)?.pop())
    }

    /// The newest live frame.
    pub fn last(&mut self) -> std::io::Result<Option<Frame>> {
        self.write_pending()?;
        let Some(seg) = self.segments.back() else {
            return Ok(None);
        };
        if seg.last_seq <= self.dead_up_to {
            return Ok(None);
        }
        let mut r = FrameReader::open(&seg.path, seg.last_offset, seg.len)?;
        Ok(match r.next(false)? {
            Next::Frame(f) => Some(f),
            _ => None,
        })
    }

    /// The newest `n` live frames, in sequence order.
    pub fn newest(&mut self, n: usize) -> std::io::Result<Vec<Frame>> {
        self.write_pending()?;
        let mut out: VecDeque<Frame> = VecDeque::new();
        for seg in self.segments.iter().rev() {
            // Scan from later index entries first, widening until `n` frames are found.
            let mut starts: Vec<u64> = seg.index.iter().map(|e| e.1.max(seg.live_from)).collect();
            starts.dedup();
            let mut got: Vec<Frame> = Vec::new();
            let mut end = seg.len;
            for &start in starts.iter().rev() {
                if start >= end {
                    continue;
                }
                let mut r = FrameReader::open(&seg.path, start, end)?;
                let mut part = Vec::new();
                while let Next::Frame(f) = r.next(false)? {
                    if f.seq > self.dead_up_to {
                        part.push(f);
                    }
                }
                part.append(&mut got);
                got = part;
                end = start;
                if got.len() + out.len() >= n {
                    break;
                }
            }
            for f in got.into_iter().rev() {
                if out.len() >= n {
                    break;
                }
                out.push_front(f);
            }
            if out.len() >= n {
                break;
            }
        }
        Ok(out.into())
    }
}

/// `fsync` of a directory, so that created, renamed or removed entries are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `fdatasync` of every file, then `fsync` of the directory (if any).
pub fn sync_all(files: &[Arc<File>], dir: Option<&Path>) -> std::io::Result<()> {
    for f in files {
        f.sync_data()?;
    }
    if let Some(d) = dir {
        sync_dir(d)?;
    }
    Ok(())
}

/// The oldest live records of a log covering at least `want` frame bytes (or all of them).
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
}

impl Log {
    /// The oldest live frames adding up to at least `want` bytes; `None` when none is live.
    pub fn oldest_span(&mut self, want: u64) -> std::io::Result<Option<Span>> {
        self.write_pending()?;
        let mut span: Option<Span> = None;
        let mut freed = 0;
        for seg in &self.segments {
            if freed >= want {
                break;
            }
            if seg.live_from >= seg.len {
                continue;
            }
            let mut r = FrameReader::open(&seg.path, seg.live_from, seg.len)?;
            while freed < want {
                let Some((seq, size, _)) = r.next_summary()? else {
                    break;
                };
                freed += size;
                let s = span.get_or_insert(Span {
                    first_seq: seq,
                    last_seq: seq,
                    records: 0,
                });
                s.last_seq = seq;
                s.records += 1;
            }
        }
        Ok(span)
    }
}
