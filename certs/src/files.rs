//! PEM file load/save helpers: the only I/O in this crate.
//!
//! Invariants: files are written to a temporary sibling, synced, then renamed over the target,
//! so a crash leaves either the old or the new file, never half of one. Private keys are
//! created with mode 0600 from the start (never widened then narrowed); their directory is
//! created with mode 0700.

use std::{
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::Path,
};

use crate::CertError;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_with_mode(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    // A leftover temporary file from a crash may have another mode: start afresh.
    let _ = std::fs::remove_file(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(io_err(tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(tmp))?;
    f.sync_all().map_err(io_err(tmp))?;
    std::fs::rename(tmp, path).map_err(io_err(path))
}

/// Writes a private key (or any secret) with mode 0600, atomically.
pub fn write_private(path: &Path, contents: &str) -> Result<(), CertError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a certificate, CRL or bundle with mode 0644, atomically.
pub fn write_public(path: &Path, contents: &str) -> Result<(), CertError> {
    write_with_mode(path, contents, 0o644)
}

/// Reads a PEM file as text.
pub fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_files_are_0600_and_public_files_0644() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("sub/key.pem");
        write_private(&key, "secret").unwrap();
        assert_eq!(read(&key).unwrap(), "secret");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        let crt = dir.path().join("c.pem");
        write_public(&crt, "cert").unwrap();
        let mode = std::fs::metadata(&crt).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Overwriting keeps the mode and replaces the content.
        write_private(&key, "secret2").unwrap();
        assert_eq!(read(&key).unwrap(), "secret2");
    }

    #[test]
    fn reading_a_missing_file_names_it() {
        let err = read(Path::new("/nonexistent/x.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.pem"), "{err}");
    }
}
