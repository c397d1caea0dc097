//! Files the tests need from the workspace: the ONNX Runtime library, the reference model
//! trained by `kip-train` (ml/models), and the workspace's binaries.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde_json::Value;

/// The workspace root (the folder with the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The ONNX Runtime shared library: `ORT_DYLIB_PATH`, else the one `scripts/test.sh` fetches
/// into `target/ort/lib`. Panics with what to do when it is missing.
pub fn ort_library() -> PathBuf {
    let p = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/ort/lib/libonnxruntime.so.1.32.0"));
    assert!(
        p.is_file(),
        "ONNX Runtime library missing at {}: run scripts/test.sh (it fetches it) or set \
         ORT_DYLIB_PATH to libonnxruntime.so.1.32.0",
        p.display()
    );
    p
}

/// The model `kip-train` committed in ml/models: its `.onnx` file and its model card (`.json`).
#[derive(Debug, Clone)]
pub struct ReferenceModel {
    /// The ONNX file.
    pub onnx_path: PathBuf,
    /// The model card beside it (same stem, `.json`).
    pub card_path: PathBuf,
}

impl ReferenceModel {
    /// The ONNX file's bytes.
    pub fn onnx_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.onnx_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.onnx_path.display()))
    }

    /// The model card.
    pub fn card(&self) -> Value {
        let bytes = std::fs::read(&self.card_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.card_path.display()));
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", self.card_path.display()))
    }
}

/// The first `.onnx` file in ml/models (there is one) and its card.
pub fn reference_model() -> ReferenceModel {
    let dir = workspace_root().join("ml/models");
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    let mut onnx: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    onnx.sort();
    let onnx_path = onnx
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no trained model (.onnx) in {}", dir.display()));
    ReferenceModel {
        card_path: onnx_path.with_extension("json"),
        onnx_path,
    }
}

/// A binary of the workspace (`kip-agent`, `kip-control-plane`, `kipctl`) from the target
/// directory this test runs from. Tests never run `cargo build`: a crate's own binaries come
/// from `env!("CARGO_BIN_EXE_<name>")`; another crate's are built by the same `cargo test`
/// invocation when it covers that crate (`scripts/test.sh` runs `cargo test --workspace`), or
/// beforehand by `cargo build -p <crate> --bins`. Panics when the binary is missing or older
/// than its crate's sources, so a test never runs stale code.
///
/// `KIP_TEST_BIN_DIR` names another directory to take the binaries from, unchecked: for
/// benchmarks that compare saved binaries of an earlier commit with the current ones.
pub fn workspace_binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KIP_TEST_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        assert!(
            path.exists(),
            "KIP_TEST_BIN_DIR: {} is missing",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
    let path = dir.join(name);
    let crate_dir = match name {
        "kip-agent" => "agent",
        "kip-control-plane" => "control-plane",
        "kipctl" => "kipctl",
        "kip-fleet-sim" => "fleet-sim",
        other => panic!("workspace_binary: unknown binary {other}"),
    };
    let build = format!("cargo build -p {} --bins", package_of(crate_dir));
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: run `{build}` first", path.display()));
    let src = workspace_root().join(crate_dir);
    if let Some(newest) = newest_source(&src)
        && newest > built
    {
        panic!(
            "{} is older than the sources in {}: run `{build}` first",
            path.display(),
            src.display()
        );
    }
    path
}

fn package_of(crate_dir: &str) -> &'static str {
    match crate_dir {
        "agent" => "kip-agent",
        "kipctl" => "kipctl",
        "fleet-sim" => "kip-fleet-sim",
        _ => "kip-control-plane",
    }
}

/// Newest modification time of `Cargo.toml` and `src/**` of a crate (and of the crates it
/// depends on inside the workspace: shared and certs).
fn newest_source(crate_dir: &Path) -> Option<SystemTime> {
    fn walk(p: &Path, newest: &mut Option<SystemTime>) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), newest);
                }
            }
        } else if let Ok(m) = meta.modified() {
            *newest = Some(newest.map_or(m, |n| n.max(m)));
        }
    }
    let root = workspace_root();
    let mut newest = None;
    for dir in [
        crate_dir.to_path_buf(),
        root.join("shared"),
        root.join("certs"),
    ] {
        walk(&dir.join("src"), &mut newest);
        walk(&dir.join("Cargo.toml"), &mut newest);
    }
    walk(&crate_dir.join("migrations"), &mut newest);
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_model_has_a_card() {
        let m = reference_model();
        assert!(m.onnx_bytes().len() > 100);
        assert!(m.card().is_object());
    }
}
