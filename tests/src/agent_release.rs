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
    let top = format!("kip-agent-{version}-x86_64-linux");
    let path = dir.join(format!("{top}.tar.gz"));
    let file = std::fs::File::create(&path).unwrap();
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        b.append_data(&mut h, format!("{top}/{name}"), data)
            .unwrap();
    };
    add("VERSION", format!("{version}\n").as_bytes(), 0o644);
    match binary {
        Binary::Agent => {
            let bytes = std::fs::read(workspace_binary("kip-agent")).unwrap();
            add("bin/kip-agent", &bytes, 0o755);
        }
        Binary::Broken => add("bin/kip-agent", b"#!/bin/sh\nexit 1\n", 0o755),
    }
    b.into_inner().unwrap().finish().unwrap();
    path
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
