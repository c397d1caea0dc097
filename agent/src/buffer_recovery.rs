//! Opening the buffer at start-up without crash-looping, and without reusing an epoch.
//!
//! Invariants:
//! - A buffer that cannot be opened for any reason other than another process holding it
//!   (its lock: the agent is already running) is moved aside to
//!   `<state_dir>/buffer.quarantined-<unix ms>` and a fresh buffer is created. Nothing is
//!   deleted: the operator can inspect or recover the quarantined directory. Every
//!   quarantined directory still present is reported (`kip_agent_buffer_quarantined_dirs`,
//!   `/v1/status`, an error log line at each start) until the operator removes it.
//! - Epochs are never reused, even on a device without a real-time clock whose buffer was
//!   lost: the epoch of every buffer opened is recorded in a floor file outside the buffer
//!   (`<identity dir>/buffer-epoch-floor`, written atomically before any record is appended),
//!   and a fresh buffer's epoch is above it. The clock (unix ms) stays a second guard when
//!   the whole state directory is gone.

use std::path::{Path, PathBuf};

use crate::buffer::{Buffer, BufferError, BufferOptions};

/// File (in the identity directory) holding the highest buffer epoch this device has used.
pub const EPOCH_FLOOR_FILE: &str = "buffer-epoch-floor";
/// Prefix of a quarantined buffer directory's name, in the state directory.
pub const QUARANTINE_PREFIX: &str = "buffer.quarantined-";

/// Why the buffer could not be opened even after quarantining it.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("cannot move the unreadable buffer {from} aside to {to}: {source}")]
    Quarantine {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot record the buffer epoch floor in {path}: {source}")]
    Floor {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The opened buffer and what happened on the way.
#[derive(Debug)]
pub struct Opened {
    pub buffer: Buffer,
    /// Where the unreadable buffer was moved on this start, if it was.
    pub quarantined_now: Option<PathBuf>,
}

/// The epoch floor recorded in `floor_file`; 0 when absent or unreadable (logged).
pub fn read_epoch_floor(floor_file: &Path) -> u64 {
    match std::fs::read_to_string(floor_file) {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| {
            tracing::error!(path = %floor_file.display(), error = %e,
                "buffer epoch floor is unreadable; only the clock guards against epoch reuse");
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::error!(path = %floor_file.display(), error = %e,
                "cannot read the buffer epoch floor; only the clock guards against epoch reuse");
            0
        }
    }
}

/// Raises the floor in `floor_file` to `epoch` (atomic replace, synced; never lowers it).
pub fn record_epoch_floor(floor_file: &Path, epoch: u64) -> Result<(), RecoveryError> {
    if read_epoch_floor(floor_file) >= epoch {
        return Ok(());
    }
    kip_certs::files::write_private(floor_file, &format!("{epoch}\n")).map_err(|e| {
        RecoveryError::Floor {
            path: floor_file.to_owned(),
            source: std::io::Error::other(e.to_string()),
        }
    })
}

/// Quarantined buffer directories in `state_dir`, oldest first.
pub fn quarantined_buffers(state_dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(QUARANTINE_PREFIX)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Opens the buffer in `dir` (see the module invariants): a fresh one gets an epoch above
/// the floor in `floor_file`; one that cannot be opened is quarantined and replaced.
pub fn open(dir: &Path, floor_file: &Path, opts: BufferOptions) -> Result<Opened, RecoveryError> {
    let mut opts = opts;
    opts.min_epoch = opts
        .min_epoch
        .max(read_epoch_floor(floor_file).saturating_add(1));
    let (buffer, quarantined_now) = match Buffer::open(dir, opts.clone()) {
        Ok(b) => (b, None),
        // Another process holds it: moving it away would split one buffer in two.
        Err(e @ BufferError::Locked { .. }) => return Err(e.into()),
        Err(e) => {
            let to = quarantine_path(dir);
            tracing::error!(path = %dir.display(), quarantine = %to.display(), error = %e,
                "buffer cannot be opened; moving it aside and starting with a fresh one \
                 (records in it are not synced; inspect or remove the quarantined directory)");
            std::fs::rename(dir, &to).map_err(|source| RecoveryError::Quarantine {
                from: dir.to_owned(),
                to: to.clone(),
                source,
            })?;
            (Buffer::open(dir, opts)?, Some(to))
        }
    };
    record_epoch_floor(floor_file, buffer.epoch())?;
    Ok(Opened {
        buffer,
        quarantined_now,
    })
}

fn quarantine_path(dir: &Path) -> PathBuf {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let ms = chrono::Utc::now().timestamp_millis();
    let mut n = 0u32;
    loop {
        let name = if n == 0 {
            format!("{QUARANTINE_PREFIX}{ms}")
        } else {
            format!("{QUARANTINE_PREFIX}{ms}-{n}")
        };
        let p = parent.join(name);
        if !p.exists() {
            return p;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use kip_shared::{Reading, Record};

    use super::*;

    fn reading() -> Record {
        Record::Reading(Reading {
            source: "s".into(),
            machine: "m".into(),
            metric: "x".into(),
            ts: chrono::Utc::now(),
            value: 1.0,
            quality: Default::default(),
        })
    }

    fn opts() -> BufferOptions {
        BufferOptions::with_max_bytes(1 << 20)
    }

    /// Makes the buffer unreadable: its meta file no longer parses.
    fn corrupt(dir: &Path) {
        std::fs::write(dir.join("meta"), b"garbage that is not a buffer meta file").unwrap();
    }

    #[test]
    fn an_unreadable_buffer_is_quarantined_and_a_fresh_one_opens() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("buffer");
        let floor = state.path().join("identity").join(EPOCH_FLOOR_FILE);
        let first = open(&dir, &floor, opts()).unwrap();
        assert!(first.quarantined_now.is_none());
        first.buffer.append(&reading()).unwrap();
        first.buffer.flush_blocking().unwrap();
        let old_epoch = first.buffer.epoch();
        drop(first);
        corrupt(&dir);
        assert!(
            Buffer::open(&dir, opts()).is_err(),
            "the corruption must make a plain open fail"
        );

        let second = open(&dir, &floor, opts()).unwrap();
        let q = second.quarantined_now.clone().unwrap();
        assert!(q.exists() && q.join("meta").exists());
        assert_eq!(quarantined_buffers(state.path()), vec![q]);
        assert_eq!(second.buffer.stats().unwrap().counts.total(), 0);
        assert!(second.buffer.epoch() > old_epoch);
        second.buffer.append(&reading()).unwrap();
    }

    #[test]
    fn a_locked_buffer_is_not_quarantined() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("buffer");
        let floor = state.path().join(EPOCH_FLOOR_FILE);
        let _held = open(&dir, &floor, opts()).unwrap();
        let err = open(&dir, &floor, opts()).unwrap_err();
        assert!(
            matches!(err, RecoveryError::Buffer(BufferError::Locked { .. })),
            "{err}"
        );
        assert!(quarantined_buffers(state.path()).is_empty());
    }

    /// A device whose clock restarts at 1970 on every boot (no RTC): without the floor a
    /// lost buffer would come back with an epoch already used.
    #[test]
    fn the_epoch_is_never_reused_after_buffer_loss_even_with_a_clock_behind() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("buffer");
        let floor = state.path().join("identity").join(EPOCH_FLOOR_FILE);
        // The clock said far in the future when the first buffer was created.
        let mut future = opts();
        future.min_epoch = 4_000_000_000_000;
        let first = open(&dir, &floor, future).unwrap();
        let used = first.buffer.epoch();
        assert_eq!(used, 4_000_000_000_000);
        drop(first);
        assert_eq!(read_epoch_floor(&floor), used);
        // Buffer lost (disk replaced, directory wiped); the clock is now "behind".
        std::fs::remove_dir_all(&dir).unwrap();
        let second = open(&dir, &floor, opts()).unwrap();
        assert!(
            second.buffer.epoch() > used,
            "{} <= {used}",
            second.buffer.epoch()
        );
        assert_eq!(read_epoch_floor(&floor), second.buffer.epoch());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&floor).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
