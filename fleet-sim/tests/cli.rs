//! The binary's command line as an operator meets it. Being an integration test, this also
//! makes `cargo test --workspace` build `kip-fleet-sim`, which the e2e `fleet_sim` test runs.
#![allow(clippy::unwrap_used)] // a test: a failed spawn is the failure

use std::process::Command;

fn fleet_sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kip-fleet-sim"))
        .args(args)
        .env_remove("KIP_ADMIN_KEY")
        .output()
        .unwrap()
}

#[test]
fn every_rate_and_duration_flag_names_its_unit() {
    let out = fleet_sim(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--sync-interval-ms",
        "--heartbeat-interval-ms",
        "--request-timeout-ms",
        "--duration-s",
        "--report-interval-s",
        "--agents",
        "--max-in-flight",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}

#[test]
fn a_missing_state_dir_or_a_bad_number_is_refused_naming_the_flag() {
    let out = fleet_sim(&["--agents", "3"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--state-dir"), "{err}");

    let out = fleet_sim(&["--state-dir", "/tmp/x", "--sync-interval-ms", "fast"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("--sync-interval-ms") && err.contains("fast"),
        "{err}"
    );
}
