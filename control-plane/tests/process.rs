//! The real `kip-control-plane` binary against a real PostgreSQL: first start creates the
//! database, schema and admin key; `kipctl` (its library, run in-process exactly as its thin
//! binary runs it; the binary itself is tested in the kipctl crate) drives the admin API;
//! SIGTERM stops the server cleanly; a restart keeps every row.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{path::Path, process::Command, time::Duration};

use kip_tests::{ChildGroup, NewDatabase, eventually_ok, free_port, wait_for_port, wait_until};

/// How long the server may take to listen, and to exit after SIGTERM.
const WAIT: Duration = Duration::from_secs(30);

struct Server {
    child: ChildGroup,
    url: String,
}

impl Server {
    fn start(db: &NewDatabase, port: u16, key_file: &Path) -> Self {
        Self::start_with(db, port, key_file, &[])
    }

    fn start_with(db: &NewDatabase, port: u16, key_file: &Path, env: &[(&str, &str)]) -> Self {
        let child = ChildGroup::spawn(
            Command::new(env!("CARGO_BIN_EXE_kip-control-plane"))
                .envs(env.iter().copied())
                .env("KIP_DATABASE_URL", &db.url)
                .env("KIP_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("KIP_ADMIN_KEY_FILE", key_file)
                .env("KIP_LOG_FORMAT", "text")
                .stdout(std::process::Stdio::null()),
        )
        .unwrap()
        .with_grace(WAIT);
        assert!(wait_for_port(port, WAIT), "server did not start listening");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// SIGTERM; the server's exit status once it stopped by itself (SIGKILL after [`WAIT`]
    /// shows as a signal exit).
    fn sigterm_and_wait(mut self) -> std::process::ExitStatus {
        self.child.terminate();
        self.child.try_wait().unwrap().expect("server exited")
    }
}

/// Waits until the server wrote its admin key file.
async fn key_written(key_file: &Path) {
    wait_until(WAIT, "the admin key file is written", || {
        let exists = key_file.exists();
        async move { exists }
    })
    .await;
}

/// Runs `kipctl ARGS` against `server` with the key in `key_file`: (success, stdout, stderr),
/// where stderr is what the binary prints for an error.
fn kipctl(server: &str, key_file: &Path, args: &[&str]) -> (bool, String, String) {
    let o = kip_tests::kipctl::run_blocking(server, key_file, args);
    (o.ok, o.stdout, o.stderr)
}

#[tokio::test]
async fn first_start_bootstraps_kipctl_works_and_restart_keeps_data() {
    let db = NewDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    let port = free_port();

    let server = Server::start(&db, port, &key_file);
    key_written(&key_file).await;
    let admin_key = std::fs::read_to_string(&key_file).unwrap();

    let (ok, out, err) = kipctl(
        &server.url,
        &key_file,
        &["org", "create", "acme", "--display-name", "ACME"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("acme") && out.contains("ACME"), "{out}");
    let (ok, out, err) = kipctl(&server.url, &key_file, &["--json", "org", "list"]);
    assert!(ok, "{err}");
    let orgs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(orgs[0]["name"], "acme");

    // An org key, then device and model commands with it (org implied by the key).
    let (ok, out, err) = kipctl(
        &server.url,
        &key_file,
        &["--org", "acme", "key", "create", "ops"],
    );
    assert!(ok, "{err}");
    let org_key = out.lines().next().unwrap().trim().to_owned();
    let org_key_file = dir.path().join("org.key");
    std::fs::write(&org_key_file, &org_key).unwrap();
    let (ok, out, err) = kipctl(
        &server.url,
        &org_key_file,
        &["device", "register", "gw-01", "--label", "site=berlin"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("gw-01") && out.contains("site=berlin"),
        "{out}"
    );
    let (ok, _, err) = kipctl(
        &server.url,
        &org_key_file,
        &[
            "model",
            "register",
            "--name",
            "rul",
            "--version",
            "1",
            "--kind",
            "rul",
        ],
    );
    assert!(ok, "{err}");

    // Errors are the server's own words.
    let (ok, _, err) = kipctl(&server.url, &org_key_file, &["device", "register", "gw-01"]);
    assert!(!ok);
    assert!(
        err.contains("conflict") && err.contains("HTTP 409"),
        "{err}"
    );
    let (ok, _, err) = kipctl(&server.url, &org_key_file, &["org", "create", "evil"]);
    assert!(!ok);
    assert!(err.contains("platform-admin"), "{err}");

    let status = server.sigterm_and_wait();
    assert!(status.success(), "exit status after SIGTERM: {status}");

    // Restart: same data, same admin key (not regenerated).
    let server = Server::start(&db, port, &key_file);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), admin_key);
    let (ok, out, err) = kipctl(&server.url, &org_key_file, &["--json", "device", "list"]);
    assert!(ok, "{err}");
    let devs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(devs.as_array().unwrap().len(), 1);
    assert_eq!(devs[0]["labels"]["site"], "berlin");
    let (ok, out, _) = kipctl(&server.url, &org_key_file, &["model", "list"]);
    assert!(ok && out.contains("rul"), "{out}");
    assert!(server.sigterm_and_wait().success());
}

/// `kipctl --json ca status`, parsed.
fn ca_status(server: &str, key_file: &Path) -> serde_json::Value {
    let (ok, out, err) = kipctl(server, key_file, &["--json", "ca", "status"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test]
async fn sighup_and_kipctl_ca_reload_load_a_rotated_ca_without_restart() {
    let db = NewDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    let ca_dir = dir.path().join("ca");
    let ca = ca_dir.to_str().unwrap();
    let (ok, _, err) = kipctl(
        "http://127.0.0.1:1",
        &key_file,
        &["ca", "init", "--dir", ca],
    );
    assert!(ok, "{err}");
    // Polling is effectively off (1 h): only SIGHUP or `kipctl ca reload` load a change.
    let config = dir.path().join("cp.toml");
    std::fs::write(
        &config,
        format!(
            "[pki]\nca_dir = {ca:?}\nagent_listen_addr = \"127.0.0.1:{}\"\nca_reload_interval_s = 3600\n",
            free_port()
        ),
    )
    .unwrap();
    let port = free_port();
    let server = Server::start_with(
        &db,
        port,
        &key_file,
        &[("KIP_CONFIG", config.to_str().unwrap())],
    );
    key_written(&key_file).await;
    let first = ca_status(&server.url, &key_file)["intermediate"]["fingerprint"].clone();

    let (ok, out, err) = kipctl(
        &server.url,
        &key_file,
        &["ca", "rotate-intermediate", "--dir", ca],
    );
    assert!(ok, "{err}");
    assert!(out.contains("finish-rotation"), "{out}");
    assert_eq!(
        ca_status(&server.url, &key_file)["intermediate"]["fingerprint"],
        first,
        "not loaded before the signal"
    );
    let ok = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let rotated = eventually_ok(Duration::from_secs(20), || {
        let s = ca_status(&server.url, &key_file);
        let reloaded = s["intermediate"]["fingerprint"] != first;
        async move {
            if reloaded {
                Ok(s)
            } else {
                Err(format!("SIGHUP did not reload the CA: {s}"))
            }
        }
    })
    .await;
    assert_eq!(rotated["previous_intermediate"]["fingerprint"], first);

    // A broken CA directory is refused and the running CA stays.
    let good = std::fs::read(ca_dir.join("intermediate.crt")).unwrap();
    std::fs::write(ca_dir.join("intermediate.crt"), "garbage").unwrap();
    let (ok, _, err) = kipctl(&server.url, &key_file, &["ca", "reload"]);
    assert!(!ok);
    assert!(
        err.contains("HTTP 422") && err.contains("CA certificate"),
        "{err}"
    );
    assert_eq!(
        ca_status(&server.url, &key_file)["intermediate"],
        rotated["intermediate"]
    );
    std::fs::write(ca_dir.join("intermediate.crt"), good).unwrap();
    let (ok, out, err) = kipctl(&server.url, &key_file, &["ca", "reload"]);
    assert!(ok, "{err}");
    assert!(out.contains("CA files unchanged"), "{out}");

    // finish-rotation asks the server first (no device holds an old certificate here).
    let (ok, out, err) = kipctl(
        &server.url,
        &key_file,
        &["ca", "finish-rotation", "--dir", ca],
    );
    assert!(ok, "{err}");
    assert!(out.contains("retired:"), "{out}");
    assert!(ca_status(&server.url, &key_file)["previous_intermediate"].is_null());
    assert!(server.sigterm_and_wait().success());
}

#[test]
fn unreachable_database_is_reported_with_the_fix() {
    let port = free_port();
    let out = Command::new(env!("CARGO_BIN_EXE_kip-control-plane"))
        .env("KIP_DATABASE_URL", "postgres://postgres@127.0.0.1:1/kip")
        .env("KIP_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to PostgreSQL at 127.0.0.1:1/kip"),
        "{err}"
    );
    assert!(err.contains("Is PostgreSQL running?"), "{err}");
}

#[test]
fn bad_config_file_is_reported_with_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cp.toml");
    std::fs::write(&f, "[server]\nrequest_timeout_ms = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kip-control-plane"))
        .args(["--config", f.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.request_timeout_ms"), "{err}");
}
