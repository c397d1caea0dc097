//! CA rollover with old and new agents connected, end to end over real mTLS on loopback:
//! the CA files are rotated (intermediate, then root) while the control plane runs; it loads
//! them without restart, agents of the old and the new intermediate keep syncing with zero
//! failed requests, old agents receive the new trust bundle and a renewal hint through their
//! sync acks, and once a rotation is finished a certificate of the retired intermediate is
//! refused with an error that says what to do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use kip_agent::{
    buffer::Buffer,
    identity::{self, Identity, IdentityError, RenewalPolicy},
};
use kip_certs::{FleetCa, TrustBundle};
use kip_tests::{
    agent::{RunningAgent, open_buffer, reading, start_agent, sync_config},
    control_plane::{ControlPlane, stored},
    eventually_ok, wait_until,
};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// sha256 of the intermediate in the device's stored chain (as the control plane names it).
fn issuer_of(identity_dir: &Path) -> String {
    let pem = std::fs::read_to_string(identity_dir.join("device.pem")).unwrap();
    let chain = kip_certs::certs_from_pem(&pem, "chain").unwrap();
    assert_eq!(chain.len(), 2, "leaf then intermediate");
    hex::encode(Sha256::digest(chain[1].as_ref()))
}

fn stored_bundle(identity_dir: &Path) -> TrustBundle {
    Identity::load(identity_dir)
        .unwrap()
        .unwrap()
        .bundle()
        .clone()
}

/// Runs `kipctl` with the platform-admin key against `cp`; returns its output.
async fn kipctl(cp: &ControlPlane, args: &[&str]) -> Result<String, kipctl::CliError> {
    use clap::Parser as _;
    let mut all = vec![
        "kipctl",
        "--server",
        &cp.admin_url,
        "--api-key",
        &cp.admin_key,
    ];
    all.extend_from_slice(args);
    let cli = kipctl::Cli::try_parse_from(all).unwrap();
    let mut out = Vec::new();
    kipctl::run(cli, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

/// An independent client: `openssl s_client` (TLS 1.3) presents the device credentials in
/// `device_pem` (key, leaf, intermediate) to the agent listener and asks `whoami`.
/// Returns whether an HTTP 200 came back, and everything openssl printed.
async fn openssl_whoami(
    cp: &ControlPlane,
    device_pem: &str,
    bundle: &TrustBundle,
) -> (bool, String) {
    // Blocking: off the test's (single) runtime thread, which also serves the control plane.
    let (addr, device_pem, bundle) = (
        cp.agent_url.trim_start_matches("https://").to_owned(),
        device_pem.to_owned(),
        bundle.clone(),
    );
    tokio::task::spawn_blocking(move || openssl_whoami_blocking(&addr, &device_pem, &bundle))
        .await
        .unwrap()
}

fn openssl_whoami_blocking(addr: &str, device_pem: &str, bundle: &TrustBundle) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let chain = kip_certs::certs_from_pem(device_pem, "chain").unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let key = write("key.pem", device_pem);
    let leaf = write("leaf.pem", &kip_certs::cert_to_pem(&chain[0]));
    let inter = write("inter.pem", &kip_certs::cert_to_pem(&chain[1]));
    let ca = write("bundle.pem", &bundle.to_pem());
    // `timeout` bounds a hung session instead of hanging the test.
    let mut child = std::process::Command::new("timeout")
        .args(["20", "openssl", "s_client", "-connect"])
        .arg(addr)
        .args(["-tls1_3", "-quiet", "-verify_return_error", "-cert"])
        .arg(&leaf)
        .arg("-cert_chain")
        .arg(&inter)
        .arg("-key")
        .arg(&key)
        .arg("-CAfile")
        .arg(&ca)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("timeout/openssl");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"GET /v1/agent/whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        // -quiet implies -ign_eof: closing stdin does not end the session; the server's
        // close after the answer (or its alert) does.
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("HTTP/1.1 200"), text)
}

async fn ca_status(cp: &ControlPlane) -> Value {
    let r = cp
        .http
        .get(format!("{}/v1/pki/ca", cp.admin_url))
        .bearer_auth(&cp.admin_key)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

/// Waits until the running control plane has loaded CA files satisfying `check`.
async fn wait_for_ca(cp: &ControlPlane, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let loaded = kip_tests::eventually(Duration::from_secs(20), || async {
        let s = ca_status(cp).await;
        if check(&s) { Ok(s) } else { Err(s) }
    })
    .await;
    loaded.unwrap_or_else(|s| panic!("control plane did not load {what}: {s}"))
}

struct Member {
    device: Uuid,
    identity_dir: PathBuf,
    buffer: Arc<Buffer>,
    appended: BTreeSet<(u64, u64)>,
    agent: Option<RunningAgent>,
}

/// Agents that keep producing readings while the CA changes under them.
struct Fleet {
    pool: PgPool,
    members: Vec<Member>,
    next: u64,
    _dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    async fn join(&mut self, cp: &ControlPlane, org: Uuid, name: &str) -> (usize, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let identity_dir = dir.path().join("identity");
        let id = cp.enroll(org, name, &identity_dir).await;
        let buffer = open_buffer(&dir.path().join("buffer"));
        let agent = start_agent(
            buffer.clone(),
            Identity::load(&identity_dir).unwrap().unwrap(),
            &identity_dir,
            &cp.agent_url,
            RenewalPolicy {
                // Rollover hints renew quickly here; the normal renewal (2/3 of 24 h) never
                // comes during the test.
                hint_delay_max: Duration::from_millis(300),
                ..RenewalPolicy::default()
            },
            sync_config(vec![cp.agent_url.clone()]),
        );
        self.members.push(Member {
            device: id.device_id(),
            identity_dir,
            buffer,
            appended: BTreeSet::new(),
            agent: Some(agent),
        });
        self._dirs.push(dir);
        (self.members.len() - 1, id)
    }

    fn feed(&mut self, n: u64) {
        for m in &mut self.members {
            for _ in 0..n {
                let seq = m.buffer.append(&reading(self.next)).unwrap();
                m.appended.insert((m.buffer.epoch(), seq));
                self.next += 1;
            }
        }
    }

    /// Feeds more readings and waits until every agent has synced all of its readings.
    async fn settle(&mut self) {
        self.feed(20);
        let pool = &self.pool;
        for m in &self.members {
            eventually_ok(Duration::from_secs(30), || async move {
                let got = stored(pool, m.device).await;
                assert!(
                    got.is_subset(&m.appended),
                    "a record that was never appended"
                );
                if got == m.appended {
                    Ok(())
                } else {
                    Err(format!("{} of {} synced", got.len(), m.appended.len()))
                }
            })
            .await;
        }
    }

    /// Keeps feeding until `check` holds for every member, then settles.
    async fn until(&mut self, what: &str, check: impl Fn(&Member) -> bool) {
        let this = std::cell::RefCell::new(&mut *self);
        wait_until(Duration::from_secs(30), what, || {
            let mut this = this.borrow_mut();
            let done = this.members.iter().all(&check);
            if !done {
                this.feed(2);
            }
            async move { done }
        })
        .await;
        self.settle().await;
    }

    /// Stops every agent and checks: each reading stored exactly once, no request failed.
    async fn finish(mut self) {
        self.settle().await;
        for m in &mut self.members {
            let agent = m.agent.take().unwrap();
            let metrics = agent.metrics();
            assert!(
                !metrics.contains("kip_agent_sync_failures_total{"),
                "a sync request of {} failed:\n{metrics}",
                m.device
            );
            assert_eq!(agent.status.report().consecutive_failures, 0);
            agent.stop().await;
            assert_eq!(stored(&self.pool, m.device).await, m.appended);
        }
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn ca_rollover_with_old_and_new_agents_connected(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let ca_dir = cp.dir.path().join("ca");
    let org = cp.create_org("acme").await;
    let mut fleet = Fleet {
        pool: pool.clone(),
        members: Vec::new(),
        next: 0,
        _dirs: Vec::new(),
    };

    // Agent A enrolls under intermediate 1.
    let (a, a_enrolled) = fleet.join(&cp, org, "gw-a").await;
    let i1 = issuer_of(&fleet.members[a].identity_dir);
    assert_eq!(
        ca_status(&cp).await["intermediate"]["fingerprint"],
        i1.as_str()
    );
    let root1 = stored_bundle(&fleet.members[a].identity_dir);
    let a_pem = std::fs::read_to_string(fleet.members[a].identity_dir.join("device.pem")).unwrap();
    fleet.settle().await;

    // --- Intermediate rollover, without restarting the control plane. ---
    let rotated = FleetCa::rotate_intermediate(&ca_dir, SystemTime::now()).unwrap();
    let i2 = rotated.current().fingerprint();
    let s = wait_for_ca(&cp, "the new intermediate", |s| {
        s["intermediate"]["fingerprint"] == i2.as_str()
    })
    .await;
    assert_eq!(s["previous_intermediate"]["fingerprint"], i1.as_str());

    // Agent B enrolls now and gets a certificate of intermediate 2; A (intermediate 1) keeps
    // syncing through the overlap and is asked to renew on its next sync.
    let (b, _) = fleet.join(&cp, org, "gw-b").await;
    assert_eq!(issuer_of(&fleet.members[b].identity_dir), i2);
    // An independent TLS client agrees: both intermediates are accepted during the overlap.
    let b_pem = std::fs::read_to_string(fleet.members[b].identity_dir.join("device.pem")).unwrap();
    for (who, pem) in [
        ("A (intermediate 1)", &a_pem),
        ("B (intermediate 2)", &b_pem),
    ] {
        let (ok, out) = openssl_whoami(&cp, pem, &root1).await;
        assert!(ok, "openssl as {who} during the overlap:\n{out}");
    }
    fleet
        .until("A renewed onto intermediate 2", |m| {
            issuer_of(&m.identity_dir) == i2
        })
        .await;
    assert_eq!(
        stored_bundle(&fleet.members[a].identity_dir),
        root1,
        "same root: the bundle did not change"
    );
    let s = ca_status(&cp).await;
    assert_eq!(s["devices_by_issuer"]["previous"], 0, "{s}");
    assert_eq!(s["devices_by_issuer"]["current"], 2, "{s}");

    // Finish the rotation: intermediate 1 is retired. A and B carry on without a failure.
    FleetCa::finish_rotation(&ca_dir, SystemTime::now()).unwrap();
    wait_for_ca(&cp, "the finished rotation", |s| {
        s["previous_intermediate"].is_null()
    })
    .await;
    fleet.settle().await;

    // A device still holding only its intermediate-1 certificate is refused, clearly.
    let err = identity::renew_once(&a_enrolled, &cp.agent_url, Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::UnknownCa { .. }), "{err:?}");
    assert!(err.to_string().contains("enroll again"), "{err}");
    let (ok, out) = openssl_whoami(&cp, &a_pem, &root1).await;
    assert!(
        !ok && out.contains("unknown ca"),
        "openssl with the retired certificate:\n{out}"
    );
    let (ok, out) = openssl_whoami(&cp, &b_pem, &root1).await;
    assert!(ok, "openssl as B after the finish:\n{out}");
    let stale_dir = tempfile::tempdir().unwrap();
    let stale_buffer = open_buffer(stale_dir.path());
    stale_buffer.append(&reading(0)).unwrap();
    let stale = kip_tests::agent::start_sync(
        stale_buffer,
        &a_enrolled,
        sync_config(vec![cp.agent_url.clone()]),
    );
    kip_tests::wait_until(
        Duration::from_secs(20),
        "the stale agent's sync error",
        || {
            let report = stale.status.report();
            async move {
                report
                    .last_error
                    .is_some_and(|e| e.contains("does not accept the CA"))
            }
        },
    )
    .await;
    assert!(stale.metrics().contains("reason=\"unknown_ca\""));
    stale.stop().await;

    // --- Root rollover. ---
    // Device C enrolls under intermediate 2 and never syncs: it holds up the finish below.
    let c_dir = tempfile::tempdir().unwrap();
    let c = cp.enroll(org, "gw-c", c_dir.path()).await;
    let rotated = FleetCa::rotate_root(&ca_dir, SystemTime::now()).unwrap();
    let i3 = rotated.current().fingerprint();
    let overlap = rotated.bundle().clone();
    assert_eq!(overlap.certs().len(), 2);
    wait_for_ca(&cp, "the new root", |s| {
        s["intermediate"]["fingerprint"] == i3.as_str() && s["bundle_roots"] == 2
    })
    .await;
    // Both agents receive the old+new bundle through their sync acks, and renew onto the
    // intermediate under the new root.
    let overlap_sha = overlap.sha256_hex();
    fleet
        .until("old+new roots and intermediate 3 on every agent", |m| {
            stored_bundle(&m.identity_dir) == overlap
                && issuer_of(&m.identity_dir) == i3
                && m.agent.as_ref().unwrap().handle.hints.bundle_sha256() == overlap_sha
        })
        .await;
    assert_eq!(
        ca_status(&cp).await["devices_by_issuer"]["previous"],
        1,
        "C"
    );

    // kipctl refuses to finish while C has not renewed; once C is gone, it finishes.
    let err = kipctl(
        &cp,
        &["ca", "finish-rotation", "--dir", ca_dir.to_str().unwrap()],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("1 devices still use"), "{err}");
    assert!(ca_dir.join("intermediate-previous.crt").exists());
    cp.revoke(org, c.device_id()).await;

    // Finish: the old root leaves the bundle, the listener now presents a chain to the new
    // root, and agents get the one-root bundle on their next sync. Their certificates are
    // current, so they do not renew: the bundle can only come through the sync ack.
    let serials: Vec<String> = fleet
        .members
        .iter()
        .map(|m| {
            Identity::load(&m.identity_dir)
                .unwrap()
                .unwrap()
                .cert()
                .serial_hex
                .clone()
        })
        .collect();
    let out = kipctl(
        &cp,
        &["ca", "finish-rotation", "--dir", ca_dir.to_str().unwrap()],
    )
    .await
    .unwrap();
    assert!(out.contains("retired:"), "{out}");
    let new_root = TrustBundle::new(vec![overlap.certs()[1].clone()]).unwrap();
    wait_for_ca(&cp, "the finished root rotation", |s| {
        s["bundle_roots"] == 1 && s["previous_intermediate"].is_null()
    })
    .await;
    fleet
        .until("only the new root on every agent", |m| {
            stored_bundle(&m.identity_dir) == new_root
        })
        .await;
    for (m, serial) in fleet.members.iter().zip(&serials) {
        let id = Identity::load(&m.identity_dir).unwrap().unwrap();
        assert_eq!(&id.cert().serial_hex, serial, "no renewal in this step");
        assert_eq!(
            m.agent.as_ref().unwrap().handle.hints.bundle_sha256(),
            new_root.sha256_hex()
        );
    }

    let metrics = cp.metrics().await;
    assert!(
        metrics.contains("kip_pki_ca_expiry_seconds{ca=\"intermediate\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("kip_pki_ca_expiry_seconds{ca=\"root\"}"));
    assert!(metrics.contains("kip_pki_ca_reloads_total{result=\"ok\"}"));
    fleet.finish().await;
}
