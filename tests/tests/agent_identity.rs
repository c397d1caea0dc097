//! Agent identity against a real control plane: enrollment over the admin listener, renewal
//! over the mTLS agent listener, credential swap, revocation. Real PostgreSQL (`sqlx::test`),
//! real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{os::unix::fs::PermissionsExt as _, time::Duration, time::SystemTime};

use kip_agent::identity::{self, Identity, RenewalPolicy, Renewer};
use kip_certs::FleetCa;
use kip_control_plane::{
    config::Config,
    pki::{Pki, spawn_agent_listener},
    server::{AppState, router},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

struct ControlPlane {
    admin_url: String,
    agent_url: String,
    admin_key: String,
    org_id: String,
    http: reqwest::Client,
    token: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn start(pool: PgPool) -> (ControlPlane, TaskTracker) {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // Created in the past so that tests can issue certificates that expired days ago.
    FleetCa::init(
        &ca_dir,
        SystemTime::now() - Duration::from_secs(60 * 86_400),
    )
    .unwrap();
    let ca_dir_s = ca_dir.to_str().unwrap().to_owned();
    let cfg = Config::load(None, |k| (k == "KIP_PKI_CA_DIR").then(|| ca_dir_s.clone())).unwrap();
    let key_file = dir.path().join("admin.key");
    kip_control_plane::db::ensure_admin_key(&pool, &key_file)
        .await
        .unwrap();
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let pki = Pki::from_config(&cfg.pki, &pool).await.unwrap().unwrap();
    let mut state = AppState::new(pool, &cfg);
    state.pki = Some(pki.clone());
    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    let agent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent_url = format!("https://127.0.0.1:{}", agent.local_addr().unwrap().port());
    spawn_agent_listener(
        agent,
        &state,
        pki,
        Duration::from_secs(3600),
        token.clone(),
        &tracker,
        Duration::from_secs(1),
    )
    .unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let stop = token.clone();
    let app = router(state);
    tracker.spawn(async move {
        axum::serve(admin, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });
    // The workspace's one provider; already installed is fine.
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let mut cp = ControlPlane {
        admin_url,
        agent_url,
        admin_key,
        org_id: String::new(),
        http,
        token,
        _dir: dir,
    };
    let org = cp
        .admin("/v1/organisations", json!({ "name": "acme" }))
        .await;
    cp.org_id = org["id"].as_str().unwrap().to_owned();
    (cp, tracker)
}

impl ControlPlane {
    async fn admin(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.admin_url))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

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
    let ca = FleetCa::load(&cp._dir.path().join("ca")).unwrap();
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
