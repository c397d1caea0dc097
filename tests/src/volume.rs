//! A small volume a test can fill: [`Tmpfs`] mounts a size-limited tmpfs on a directory (the
//! agent's state volume in disk-full tests) and unmounts it on drop; [`fill`] writes zeros
//! until the volume is full.
//!
//! Mounting needs root (CAP_SYS_ADMIN), which the test command has; without it the
//! constructor fails the test with a message saying so (nothing is skipped).

use std::{io::Write as _, path::Path, path::PathBuf, process::Command};

/// A tmpfs mounted on a directory; unmounted (lazily, so open files do not block it) on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Creates `path` and mounts a tmpfs of `size_mib` MiB on it.
    pub fn mount(path: &Path, size_mib: u32) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs on {} failed ({status}): this test needs root (CAP_SYS_ADMIN)",
            path.display()
        );
        Self {
            path: path.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes zeros into `path` until its volume is full.
pub fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}
