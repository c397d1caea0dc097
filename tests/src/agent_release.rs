//! Agent release tarballs for self-update tests, laid out as `scripts/package-agent.sh` lays
//! them out (`kip-agent-<version>-x86_64-linux/{VERSION,bin/kip-agent}`), and an install root
//! with the launcher (`deploy/agent-release/kip-agent-launcher`) outside the version slots.
//!
//! Two "builds" that report different versions are the same `kip-agent` binary in two
//! tarballs whose `VERSION` files differ: the agent reports the version of its slot. A broken
//! build is a tarball whose `bin/kip-agent` is a script that exits 1.

use std::path::{Path, PathBuf};

use crate::{workspace_binary, workspace_root};

/// What `bin/kip-agent` of a tarball is.
#[derive(Debug, Clone, Copy)]
pub enum Binary {
    /// The workspace's real `kip-agent`.
    Agent,
    /// `#!/bin/sh` + `exit 1`: crashes at every start.
    Broken,
}

/// Writes `dir/kip-agent-<version>-x86_64-linux.tar.gz` and returns its path.
pub fn tarball(dir: &Path, version: &str, binary: Binary) -> PathBuf {
    let bin = match binary {
        Binary::Agent => std::fs::read(workspace_binary("kip-agent")).unwrap(),
        Binary::Broken => b"#!/bin/sh\nexit 1\n".to_vec(),
    };
    let path = dir.join(format!("kip-agent-{version}-x86_64-linux.tar.gz"));
    std::fs::write(&path, tarball_bytes(version, &bin)).unwrap();
    path
}

/// A release tarball (gzip) whose `VERSION` says `version` and whose `bin/kip-agent` is
/// `bin`.
pub fn tarball_bytes(version: &str, bin: &[u8]) -> Vec<u8> {
    let top = format!("kip-agent-{version}-x86_64-linux");
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data, mode) in [
        ("VERSION", format!("{version}\n").into_bytes(), 0o644),
        ("bin/kip-agent", bin.to_vec(), 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, format!("{top}/{name}"), &data[..])
            .unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// An install root at `root` running `version` from `tarball`: the slot unpacked by the
/// agent's own code, `current` pointing at it, the launcher in `root/bin/`.
pub fn install_root(root: &Path, version: &str, tarball: &Path) -> PathBuf {
    let install = kip_agent::self_update::Install::new(root);
    install
        .stage(version, &std::fs::read(tarball).unwrap())
        .unwrap();
    std::os::unix::fs::symlink(Path::new("versions").join(version), root.join("current")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let launcher = root.join("bin/kip-agent-launcher");
    std::fs::copy(
        workspace_root().join("deploy/agent-release/kip-agent-launcher"),
        &launcher,
    )
    .unwrap();
    launcher
}
