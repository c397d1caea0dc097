//! Agent identity against a real control plane: enrollment over the admin listener, renewal
//! over the mTLS agent listener, credential swap, revocation. Real PostgreSQL (`sqlx::test`),
//! real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{os::unix::fs::PermissionsExt as _, time::Duration, time::SystemTime};

use kip_agent::identity::{self, Identity, RenewalPolicy, Renewer};
use kip_certs::FleetCa;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The shared in-process control plane plus the organisation these tests enroll into.
struct ControlPlane {
    cp: kip_tests::control_plane::ControlPlane,
    org_id: String,
}

impl std::ops::Deref for ControlPlane {
    type Target = kip_tests::control_plane::ControlPlane;
    fn deref(&self) -> &kip_tests::control_plane::ControlPlane {
        &self.cp
    }
}

async fn start(pool: PgPool) -> (ControlPlane, TaskTracker) {
    // CA created in the past so that tests can issue certificates that expired days ago.
    let cp = kip_tests::control_plane::start_with_ca_age(
        pool,
        None,
        Duration::from_secs(60 * 86_400),
        |_| {},
    )
    .await;
    let tracker = cp.tracker.clone();
    let org_id = cp.create_org("acme").await.to_string();
    (ControlPlane { cp, org_id }, tracker)
}

impl ControlPlane {
    async fn enroll_token(&self) -> String {
        let v = self
            .admin(
                &format!("/v1/organisations/{}/enroll-tokens", self.org_id),
                json!({ "ttl_s": 600 }),
            )
            .await;
        v["token"].as_str().unwrap().to_owned()
    }
}

async fn whoami(id: &Identity, agent_url: &str) -> Result<Value, String> {
    let client = identity::mtls_client(id, Duration::from_secs(10)).unwrap();
    let r = client
        .get(format!("{agent_url}/v1/agent/whoami"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(r.status().to_string());
    }
    r.json().await.map_err(|e| e.to_string())
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_agent_enrolls_stores_its_key_0600_and_renews_with_a_swap(pool: PgPool) {
    let (cp, _tracker) = start(pool).await;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("identity");
    assert!(Identity::load(&dir).unwrap().is_none());

    let token = cp.enroll_token().await;
    let id = identity::enroll(&cp.http, &cp.admin_url, &token, "gw-1", None, &dir)
        .await
        .unwrap();
    let mode = std::fs::metadata(dir.join("device.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let left = id.seconds_to_expiry(SystemTime::now());
    assert!((23 * 3600..=24 * 3600).contains(&left), "{left}");
    let me = whoami(&id, &cp.agent_url).await.unwrap();
    assert_eq!(me["device_id"], id.device_id().to_string());

    // Restart: the stored identity loads back and still works.
    let loaded = Identity::load(&dir).unwrap().unwrap();
    assert_eq!(loaded.cert(), id.cert());
    whoami(&loaded, &cp.agent_url).await.unwrap();

    // Renewal swaps the published client config and the file, same device, new serial.
    let (mut renewer, mut handle) = Renewer::new(
        loaded,
        dir.clone(),
        cp.agent_url.clone(),
        RenewalPolicy::default(),
    )
    .unwrap();
    renewer.renew_now().await.unwrap();
    assert!(handle.client_config.has_changed().unwrap());
    handle.client_config.mark_unchanged();
    let renewed = Identity::load(&dir).unwrap().unwrap();
    assert_eq!(renewed.device_id(), id.device_id());
    assert_ne!(renewed.cert().serial_hex, id.cert().serial_hex);
    let me = whoami(&renewed, &cp.agent_url).await.unwrap();
    assert_eq!(me["serial"], renewed.cert().serial_hex.as_str());
    assert!(handle.seconds_to_expiry(SystemTime::now()) > 23 * 3600);

    // The loop renews by itself when the policy says it is time.
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (renewer, mut handle) = Renewer::new(
        renewed,
        dir.clone(),
        cp.agent_url.clone(),
        RenewalPolicy {
            fraction: 0.0,
            jitter_fraction: 0.0,
            ..RenewalPolicy::default()
        },
    )
    .unwrap();
    tracker.spawn(renewer.run(stop.clone()));
    tokio::time::timeout(Duration::from_secs(20), handle.client_config.changed())
        .await
        .expect("the renewal loop did not renew")
        .unwrap();
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_revoked_agent_cannot_renew_and_keeps_its_stored_identity(pool: PgPool) {
    let (cp, _tracker) = start(pool).await;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("identity");
    let token = cp.enroll_token().await;
    let id = identity::enroll(&cp.http, &cp.admin_url, &token, "gw-1", None, &dir)
        .await
        .unwrap();
    cp.admin(
        &format!(
            "/v1/organisations/{}/devices/{}/revoke",
            cp.org_id,
            id.device_id()
        ),
        json!({}),
    )
    .await;
    let before = std::fs::read(dir.join("device.pem")).unwrap();
    let (mut renewer, handle) = Renewer::new(
        id,
        dir.clone(),
        cp.agent_url.clone(),
        RenewalPolicy::default(),
    )
    .unwrap();
    assert!(renewer.renew_now().await.is_err());
    assert!(!handle.client_config.has_changed().unwrap());
    assert_eq!(std::fs::read(dir.join("device.pem")).unwrap(), before);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn enrollment_with_a_used_token_fails_and_writes_nothing(pool: PgPool) {
    let (cp, _tracker) = start(pool).await;
    let state = tempfile::tempdir().unwrap();
    let token = cp.enroll_token().await;
    identity::enroll(
        &cp.http,
        &cp.admin_url,
        &token,
        "gw-1",
        None,
        &state.path().join("a"),
    )
    .await
    .unwrap();
    let dir_b = state.path().join("b");
    let err = identity::enroll(&cp.http, &cp.admin_url, &token, "gw-2", None, &dir_b)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!dir_b.exists());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_agent_back_from_a_long_outage_renews_its_expired_certificate(pool: PgPool) {
    let (cp, _tracker) = start(pool.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().join("identity");
    let token = cp.enroll_token().await;
    let id = identity::enroll(&cp.http, &cp.admin_url, &token, "gw-1", None, &dir)
        .await
        .unwrap();
    // Simulate the outage: the same key, a certificate that expired two days ago.
    let ca = FleetCa::load(&cp.dir.path().join("ca")).unwrap();
    let key_pem = std::fs::read_to_string(dir.join("device.pem")).unwrap();
    let key = kip_certs::DeviceKey::from_pem(&key_pem).unwrap();
    let old = ca
        .current()
        .sign_device_csr(
            &key.csr_pem("gw-1").unwrap(),
            id.cert().identity,
            SystemTime::now() - Duration::from_secs(3 * 86_400),
            Duration::from_secs(86_400),
        )
        .unwrap();
    sqlx::query(
        "INSERT INTO certificates (serial, org_id, device_id, not_after) \
         VALUES ($1, $2, $3, now() - interval '2 days')",
    )
    .bind(&old.serial_hex)
    .bind(id.org_id())
    .bind(id.device_id())
    .execute(&pool)
    .await
    .unwrap();
    let bundle =
        kip_certs::TrustBundle::from_pem(&std::fs::read_to_string(dir.join("bundle.pem")).unwrap())
            .unwrap();
    let expired = Identity::new(key, old.chain_pem, bundle).unwrap();
    assert!(expired.seconds_to_expiry(SystemTime::now()) < 0);
    expired.store(&dir).unwrap();

    let (renewer, handle) = Renewer::new(
        expired,
        dir.clone(),
        cp.agent_url.clone(),
        RenewalPolicy::default(),
    )
    .unwrap();
    let mut renewer = renewer.with_recovery(cp.http.clone(), cp.admin_url.clone());
    renewer.renew_now().await.unwrap();
    assert!(handle.seconds_to_expiry(SystemTime::now()) > 23 * 3600);
    let back = Identity::load(&dir).unwrap().unwrap();
    assert_eq!(back.device_id(), id.device_id());
    whoami(&back, &cp.agent_url).await.unwrap();
}
