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
