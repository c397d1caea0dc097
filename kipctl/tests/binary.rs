//! The `kipctl` binary itself: exit status and error output. The commands against a running
//! server are tested in the control plane's `tests/process.rs` through the same library.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failure should abort the test"
)]

use std::process::Command;

fn kipctl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kipctl"));
    c.env_remove("KIP_API_KEY")
        .env_remove("KIP_API_KEY_FILE")
        .env_remove("KIP_ORG")
        .env_remove("KIP_SERVER");
    c
}

#[test]
fn a_command_without_a_key_fails_with_the_fix_on_stderr() {
    let out = kipctl().args(["org", "list"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kipctl: error: no API key: pass --api-key, --api-key-file"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn ca_init_works_on_local_files_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = kipctl()
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ca.join("intermediate.crt").exists());
    assert!(ca.join("root.key").exists());
}

/// `kipctl ... | head -n1`: the reader closes the pipe before kipctl has written everything;
/// kipctl ends quietly with success (the quickstart pipes it under `set -o pipefail`).
#[test]
fn a_closed_stdout_ends_the_command_quietly_with_success() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let mut child = kipctl()
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before kipctl writes its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}, stderr {err}",
        out.status
    );
    assert!(err.is_empty(), "{err}");
    assert!(
        ca.join("intermediate.crt").exists(),
        "the work itself was done"
    );
}
