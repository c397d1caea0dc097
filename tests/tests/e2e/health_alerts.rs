//! Issue #16's "done when", with the real binaries: `kip-control-plane` (short `[health]`
//! windows from a config file), `kip-agent run`, `kipctl device health` and the console read
//! over HTTP, and a real Prometheus scraping the control plane with the shipped alert rules
//! (`kip_tests::Prometheus`, every rule's `for:` at 0 s). Three faults, each seen in the API
//! (the report and its `flags`), in `kipctl` (its columns and FLAGS), on the console and as
//! a firing alert, and each undone:
//! - the agent is killed (SIGKILL): OFFLINE and `KipDeviceOffline`; restarted: ONLINE again
//!   and the alert resolves;
//! - the agent's state volume (a small tmpfs) fills up: the report's free space drops and
//!   `KipGatewayDiskLow` fires for the device; space comes back and it resolves;
//! - the device certificate is short-lived (`pki.device_cert_lifetime_s` = 1 h, under the
//!   rule's 6 h): its expiry shows and `KipDeviceCertificateExpiring` fires for the device
//!   (with the default 24 h lifetime it does not, checked in the first test).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use kip_tests::{
    ChildGroup, Prometheus, TestDb,
    binaries::{ControlPlaneProcess, spawn_agent},
    eventually, free_port, kipctl,
    volume::{Tmpfs, fill},
};
use serde_json::{Value, json};
use uuid::Uuid;

/// The control plane's health windows in these tests (deploy/quickstart.toml uses 30/60 s):
/// four heartbeats (1 s) may be late before a running agent looks STALE on a loaded machine.
const HEALTH_TOML: &str =
    "[health]\nstale_after_s = 4\noffline_after_s = 6\nmetrics_refresh_ms = 200\n";
/// Long enough for a loaded CI machine; the waits end at the first positive signal.
const WAIT: Duration = Duration::from_secs(90);

/// Control plane, one organisation with its key, one enrolled agent running, Prometheus.
/// Fields drop in order: agent, Prometheus, control plane, then the database.
struct Stack {
    agent: Option<ChildGroup>,
    prometheus: Prometheus,
    _cp: ChildGroup,
    _db: TestDb,
    cp: ControlPlaneProcess,
    org_key: String,
    org_key_file: PathBuf,
    org: Uuid,
    device: Uuid,
    agent_config: PathBuf,
    agent_port: u16,
    http: reqwest::Client,
}

impl Stack {
    /// Everything in `work`; the agent's state in `state` (a directory, or a mounted tmpfs);
    /// `extra_toml` is appended to the control plane's config.
    async fn start(work: &Path, state: &Path, extra_toml: &str) -> Self {
        let db = TestDb::create_empty().await;
        let cp_toml = work.join("control-plane.toml");
        std::fs::write(&cp_toml, format!("{HEALTH_TOML}{extra_toml}")).unwrap();
        let cp = ControlPlaneProcess::new(&db.url, &work.join("cp")).with_config(cp_toml);
        let cp_proc = cp.spawn();
        let admin = cp.admin_api();
        let org = admin.create_org("acme").await;
        let org_key = admin.create_key(org, "ops", "org-admin").await;
        let org_key_file = work.join("org.key");
        std::fs::write(&org_key_file, &org_key).unwrap();
        let device = admin
            .enroll(org, "gw-1", &state.join("identity"))
            .await
            .device_id();
        let agent_port = free_port();
        let agent_config = work.join("agent.toml");
        std::fs::write(
            &agent_config,
            format!(
                "[agent]\ndevice = \"gw-1\"\nstate_dir = {:?}\n\n[http]\nlisten_addr = \"127.0.0.1:{agent_port}\"\n\n\
                 [log]\nfilter = \"warn\"\n\n\
                 [sync]\nendpoints = [{:?}]\ninterval_ms = 50\nheartbeat_interval_s = 1\n",
                state.display().to_string(),
                cp.agent_url()
            ),
        )
        .unwrap();
        let prometheus = Prometheus::start(
            &work.join("prometheus"),
            &format!("127.0.0.1:{}", cp.admin_port),
        )
        .await;
        let mut stack = Self {
            _db: db,
            cp,
            _cp: cp_proc,
            org_key,
            org_key_file,
            org,
            device,
            agent_config,
            agent_port,
            agent: None,
            prometheus,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        };
        stack.start_agent();
        stack
    }

    fn start_agent(&mut self) {
        self.agent = Some(spawn_agent(&self.agent_config, self.agent_port, None));
    }

    /// `GET /v1/organisations/{org}/devices/{device}/health` with the organisation's key.
    async fn health(&self) -> Value {
        self.http
            .get(format!(
                "{}/v1/organisations/{}/devices/{}/health",
                self.cp.admin_url(),
                self.org,
                self.device
            ))
            .bearer_auth(&self.org_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the API's health of the device satisfies `ok`; returns it.
    async fn wait_health(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        eventually(WAIT, || async {
            let h = self.health().await;
            if ok(&h) {
                Ok(h)
            } else {
                Err(format!("{what}: {h}"))
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The row of `gw-1` in `kipctl device health ARGS`, with the header (to find columns).
    async fn kipctl_row(&self, args: &[&str]) -> (String, String) {
        let mut argv = vec!["device", "health"];
        argv.extend(args);
        let out = kipctl::run(&self.cp.admin_url(), &self.org_key_file, &argv).await;
        assert!(out.ok, "{}", out.stderr);
        let header = out
            .stdout
            .lines()
            .find(|l| l.starts_with("NAME"))
            .map(str::to_owned);
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with("gw-1"))
            .map(str::to_owned);
        match (header, row) {
            (Some(h), Some(r)) => (h, r),
            _ => panic!("no gw-1 row in:\n{}", out.stdout),
        }
    }

    /// The console page at `path`, signed in with the organisation's key (as a browser
    /// does: the form post, then the session cookie).
    async fn console(&self, path: &str) -> String {
        let form = reqwest::Url::parse_with_params("http://x/", [("api_key", &self.org_key)])
            .unwrap()
            .query()
            .unwrap()
            .to_owned();
        let login = self
            .http
            .post(format!("{}/console/login", self.cp.admin_url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        assert_eq!(login.status().as_u16(), 303, "console sign-in refused");
        let cookie = login
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap()
            .to_owned();
        let page = self
            .http
            .get(format!("{}{path}", self.cp.admin_url()))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status().as_u16(), 200, "{path}");
        page.text().await.unwrap()
    }

    /// The `<tr>` of `gw-1` on the console's fleet page.
    async fn console_fleet_row(&self) -> String {
        let page = self.console("/console/fleet").await;
        page.split("<tr>")
            .find(|r| r.contains(">gw-1<"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no gw-1 row on the fleet page:\n{page}"))
    }
}

/// The value in `row` under column `name` of `header` (kipctl's aligned table).
fn column(header: &str, row: &str, name: &str) -> String {
    let start = header
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {header}"));
    let end = header[start + name.len()..]
        .find(|c: char| c != ' ')
        .map_or(row.len(), |i| start + name.len() + i)
        .min(row.len());
    row.get(start..end).unwrap_or("").trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_turns_offline_everywhere_fires_the_alert_and_recovers_after_restart() {
    let work = tempfile::tempdir().unwrap();
    let mut s = Stack::start(work.path(), &work.path().join("state"), "").await;

    // Running: ONLINE in the API, kipctl and the console; Prometheus sees it and no alert.
    let h = s
        .wait_health("ONLINE with a report", |h| {
            h["state"] == "ONLINE" && !h["report"]["cert_not_after"].is_null()
        })
        .await;
    assert_eq!(h["flags"], json!([]), "a healthy device has no flags: {h}");
    let (header, row) = s.kipctl_row(&[]).await;
    assert_eq!(column(&header, &row, "STATE"), "ONLINE", "{header}\n{row}");
    assert_eq!(column(&header, &row, "FLAGS"), "-", "{header}\n{row}");
    assert!(s.console_fleet_row().await.contains(">ONLINE<"));
    eventually(WAIT, || async {
        let online = s
            .prometheus
            .query("kip_fleet_devices{org=\"acme\",state=\"online\"} == 1")
            .await?;
        let offline = s.prometheus.firing("KipDeviceOffline").await?;
        if online.len() == 1 && offline.is_empty() {
            Ok(())
        } else {
            Err(format!("online {online:?}, offline alerts {offline:?}"))
        }
    })
    .await
    .unwrap();
    // The certificate (24 h, the default) and the disk are fine: those alerts stay quiet
    // (their gauges are in Prometheus, so the rules had their chance).
    eventually(WAIT, || async {
        let cert = s
            .prometheus
            .query("kip_fleet_worst_cert_expiry_seconds{device=\"gw-1\"} > 20 * 3600")
            .await?;
        let disk = s
            .prometheus
            .query("kip_fleet_worst_disk_free_ratio{device=\"gw-1\"}")
            .await?;
        if cert.len() == 1 && disk.len() == 1 {
            Ok(())
        } else {
            Err(format!("cert {cert:?} disk {disk:?}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(
        s.prometheus
            .firing("KipDeviceCertificateExpiring")
            .await
            .unwrap(),
        Vec::<Value>::new()
    );

    // Killed: OFFLINE everywhere and the alert fires, within the configured window.
    let killed = Instant::now();
    s.agent.as_mut().unwrap().kill9();
    let alert = s
        .prometheus
        .wait_firing("KipDeviceOffline", None, WAIT)
        .await;
    eprintln!(
        "health_alerts: KipDeviceOffline firing {:?} after SIGKILL (offline_after_s = 6, \
         scrape and evaluation every 1 s)",
        killed.elapsed()
    );
    assert_eq!(alert["org"], "acme", "{alert}");
    assert_eq!(alert["severity"], "critical", "{alert}");
    assert_eq!(s.health().await["state"], "OFFLINE");
    let (header, row) = s.kipctl_row(&["--state", "offline"]).await;
    assert_eq!(column(&header, &row, "STATE"), "OFFLINE", "{header}\n{row}");
    assert!(
        s.console_fleet_row().await.contains(">OFFLINE<"),
        "{}",
        s.console_fleet_row().await
    );

    // Restarted: ONLINE again, and the alert resolves.
    s.start_agent();
    s.wait_health("ONLINE after restart", |h| h["state"] == "ONLINE")
        .await;
    s.prometheus.wait_resolved("KipDeviceOffline", WAIT).await;
    let (header, row) = s.kipctl_row(&[]).await;
    assert_eq!(column(&header, &row, "STATE"), "ONLINE", "{header}\n{row}");
    assert!(s.console_fleet_row().await.contains(">ONLINE<"));
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_volume_fires_the_disk_alert_and_clears_when_space_returns() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let volume = Tmpfs::mount(&state, 16);
    let s = Stack::start(work.path(), &state, "").await;
    let ratio = |h: &Value| {
        let r = &h["report"];
        match (
            r["disk_free_bytes"].as_f64(),
            r["disk_total_bytes"].as_f64(),
        ) {
            (Some(f), Some(t)) if t > 0.0 => Some(f / t),
            _ => None,
        }
    };

    // Plenty of space: reported (the 16 MiB volume), and no disk alert once Prometheus has
    // the device's ratio.
    let h = s
        .wait_health("a report with disk space", |h| {
            h["state"] == "ONLINE" && ratio(h).is_some_and(|r| r > 0.5)
        })
        .await;
    assert_eq!(h["report"]["disk_total_bytes"], 16 << 20, "{h}");
    eventually(WAIT, || async {
        let v = s
            .prometheus
            .query("kip_fleet_worst_disk_free_ratio{device=\"gw-1\"} > 0.5")
            .await?;
        if v.len() == 1 {
            Ok(())
        } else {
            Err(format!("{v:?}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(
        s.prometheus.firing("KipGatewayDiskLow").await.unwrap(),
        Vec::<Value>::new()
    );

    // Full: the heartbeat reports it, the alert fires for gw-1, kipctl and the console show it.
    let filler = state.join("filler");
    fill(&filler);
    let h = s
        .wait_health("a report of a full disk", |h| {
            h["state"] == "ONLINE" && ratio(h).is_some_and(|r| r < 0.01)
        })
        .await;
    assert_eq!(h["flags"], json!(["disk_low"]), "{h}");
    let alert = s
        .prometheus
        .wait_firing("KipGatewayDiskLow", Some("gw-1"), WAIT)
        .await;
    assert_eq!(alert["org"], "acme", "{alert}");
    let (header, row) = s.kipctl_row(&[]).await;
    let disk = column(&header, &row, "DISK FREE");
    assert!(disk.ends_with("(0%)"), "{header}\n{row}");
    assert_eq!(
        column(&header, &row, "FLAGS"),
        "disk_low",
        "{header}\n{row}"
    );
    let console = s.console_fleet_row().await;
    assert!(console.contains(">0 %<"), "{console}");
    assert!(console.contains(">disk_low<"), "{console}");
    let device = s
        .console(&format!("/console/devices/{}/{}", s.org, s.device))
        .await;
    assert!(
        device.contains(&h["report"]["disk_total_bytes"].to_string()),
        "{device}"
    );

    // Space back: the next heartbeats say so and the alert resolves.
    std::fs::remove_file(&filler).unwrap();
    let h = s
        .wait_health("a report with space again", |h| {
            ratio(h).is_some_and(|r| r > 0.5)
        })
        .await;
    assert_eq!(h["flags"], json!([]), "{h}");
    s.prometheus.wait_resolved("KipGatewayDiskLow", WAIT).await;
    let (header, row) = s.kipctl_row(&[]).await;
    assert!(
        !column(&header, &row, "DISK FREE").ends_with("(0%)"),
        "{header}\n{row}"
    );
    assert_eq!(column(&header, &row, "FLAGS"), "-", "{header}\n{row}");
    drop(s);
    drop(volume);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_near_its_expiry_shows_everywhere_and_fires_the_expiry_alert() {
    let work = tempfile::tempdir().unwrap();
    let s = Stack::start(
        work.path(),
        &work.path().join("state"),
        "[pki]\ndevice_cert_lifetime_s = 3600\n",
    )
    .await;
    let h = s
        .wait_health("a report with the certificate", |h| {
            h["state"] == "ONLINE" && h["report"]["cert_not_after"].is_string()
        })
        .await;
    let not_after = h["report"]["cert_not_after"].as_str().unwrap().to_owned();
    assert_eq!(h["flags"], json!(["cert_expiring"]), "{h}");
    let left = chrono::DateTime::parse_from_rfc3339(&not_after).unwrap()
        - chrono::Utc::now().fixed_offset();
    assert!(
        (50..=60).contains(&left.num_minutes()),
        "the 1 h certificate expires in {left}"
    );

    let alert = s
        .prometheus
        .wait_firing("KipDeviceCertificateExpiring", Some("gw-1"), WAIT)
        .await;
    assert_eq!(alert["org"], "acme", "{alert}");
    assert_eq!(alert["severity"], "warning", "{alert}");
    let (header, row) = s.kipctl_row(&[]).await;
    assert_eq!(
        column(&header, &row, "FLAGS"),
        "cert_expiring",
        "{header}\n{row}"
    );
    let expires = column(&header, &row, "CERT EXPIRES");
    assert!(
        ["in 59m", "in 60m", "in 58m"].contains(&expires.as_str()),
        "{header}\n{row}"
    );
    let device = s
        .console(&format!("/console/devices/{}/{}", s.org, s.device))
        .await;
    assert!(device.contains(&not_after), "{device}");
    assert!(device.contains("Flags: cert_expiring"), "{device}");
    drop(s);
}
