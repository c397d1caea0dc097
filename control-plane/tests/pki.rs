//! Fleet PKI end to end: enrollment over the admin router, then real TLS 1.3 mTLS handshakes
//! against the agent listener on loopback. Each test gets a fresh database (`sqlx::test`).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use futures_util::StreamExt as _;
use kip_api::{AgentWhoami, CertificateResponse, EnrollToken, Revocation};
use kip_certs::{DeviceKey, FleetCa, certs_from_pem, rustls};
use kip_control_plane::{ControlPlane, config::Config};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;
use uuid::Uuid;

struct Env {
    router: axum::Router,
    /// The running system; dropping it stops it.
    _cp: ControlPlane,
    admin_key: String,
    org_id: Uuid,
    agent_url: String,
    bundle_pem: String,
    token: CancellationToken,
    tracker: TaskTracker,
    _dir: tempfile::TempDir,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.token.cancel();
        self.tracker.close();
    }
}

async fn setup(pool: PgPool) -> Env {
    setup_with(pool, |_| {}).await
}

/// [`setup`] with the config adjusted by `tweak` (short lifetimes, small limits).
async fn setup_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // Created in the past so that tests can issue certificates that expired days ago.
    FleetCa::init(
        &ca_dir,
        std::time::SystemTime::now() - Duration::from_secs(60 * 86_400),
    )
    .unwrap();
    let ca_dir_s = ca_dir.to_str().unwrap().to_owned();
    let cfg = Config::load(None, |k| match k {
        "KIP_PKI_CA_DIR" => Some(ca_dir_s.clone()),
        _ => None,
    })
    .unwrap();
    let key_file = dir.path().join("admin.key");
    let mut cfg = cfg;
    cfg.admin_key_file = key_file.clone();
    cfg.pki.crl_refresh_interval = Duration::from_secs(3600);
    cfg.shutdown_grace = Duration::from_secs(1);
    tweak(&mut cfg);
    let token = CancellationToken::new();
    let cp = ControlPlane::builder(cfg)
        .pool(pool)
        .without_admin_listener()
        .agent_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .cancellation_token(token.clone())
        .start()
        .await
        .unwrap();
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let port = cp.agent_addr().unwrap().port();
    let pki = cp.state().pki.clone().unwrap();
    let tracker: TaskTracker = cp.tracker().clone();
    let mut env = Env {
        router: cp.router(),
        _cp: cp,
        admin_key,
        org_id: Uuid::nil(),
        agent_url: format!("https://127.0.0.1:{port}"),
        bundle_pem: pki.bundle_pem(),
        token,
        tracker,
        _dir: dir,
    };
    env.org_id = env.create_org("acme").await;
    env
}

impl Env {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        auth: bool,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if auth {
            req = req.header("authorization", format!("Bearer {}", self.admin_key));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    async fn create_org(&self, name: &str) -> Uuid {
        let (s, v) = self
            .call(
                "POST",
                "/v1/organisations",
                Some(json!({ "name": name })),
                true,
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().parse().unwrap()
    }

    async fn enroll_token(&self, org: Uuid, body: Value) -> EnrollToken {
        let (s, v) = self
            .call(
                "POST",
                &format!("/v1/organisations/{org}/enroll-tokens"),
                Some(body),
                true,
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        serde_json::from_value(v).unwrap()
    }

    async fn enroll(&self, token: &str, key: &DeviceKey, name: &str) -> (StatusCode, Value) {
        let body =
            json!({ "token": token, "csr_pem": key.csr_pem(name).unwrap(), "device_name": name });
        self.call("POST", "/enroll", Some(body), false).await
    }

    /// Enrolls a new device; returns its key and certificate.
    async fn enrolled_device(&self, name: &str) -> (DeviceKey, CertificateResponse) {
        let t = self.enroll_token(self.org_id, json!({})).await;
        let key = DeviceKey::generate().unwrap();
        let (s, v) = self.enroll(&t.token, &key, name).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (key, serde_json::from_value(v).unwrap())
    }
}

fn tls_config(bundle_pem: &str, chain_pem: &str, key: &DeviceKey) -> rustls::ClientConfig {
    let bundle = kip_certs::TrustBundle::from_pem(bundle_pem).unwrap();
    let chain = certs_from_pem(chain_pem, "chain").unwrap();
    (*kip_certs::client_config(&bundle, chain, key.private_key_der()).unwrap()).clone()
}

/// A fresh HTTP client (so a fresh TLS handshake) presenting `cfg`.
fn agent_client(cfg: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn whoami(
    client: &reqwest::Client,
    env: &Env,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let r = client
        .get(format!("{}/v1/agent/whoami", env.agent_url))
        .send()
        .await?;
    let s = StatusCode::from_u16(r.status().as_u16()).unwrap();
    Ok((s, r.json().await?))
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn enrollment_gives_a_certificate_that_opens_the_agent_listener_and_renews(pool: PgPool) {
    let env = setup(pool.clone()).await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    assert_eq!(cert.org_id, env.org_id);
    assert_eq!(cert.trust_bundle_pem, env.bundle_pem);
    assert_eq!(
        certs_from_pem(&cert.certificate_chain_pem, "c")
            .unwrap()
            .len(),
        2
    );
    let lifetime = cert.not_after - chrono::Utc::now();
    assert!(lifetime > chrono::Duration::hours(23) && lifetime <= chrono::Duration::hours(24));

    // Recorded: device registered, certificate stored, token consumed.
    let (name,): (String,) = sqlx::query_as("SELECT name FROM devices WHERE id = $1")
        .bind(cert.device_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(name, "gw-1");
    let (serial,): (String,) =
        sqlx::query_as("SELECT serial FROM certificates WHERE device_id = $1")
            .bind(cert.device_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(serial, cert.serial);
    let used: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM bootstrap_tokens WHERE used_at IS NOT NULL AND device_id = $1",
    )
    .bind(cert.device_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(used, 1);

    // The agent listener knows the device from the certificate alone.
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &cert.certificate_chain_pem,
        &key,
    ));
    let (s, v) = whoami(&client, &env).await.unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    let me: AgentWhoami = serde_json::from_value(v).unwrap();
    assert_eq!(
        (me.org_id, me.device_id, me.serial.as_str()),
        (env.org_id, cert.device_id, cert.serial.as_str())
    );

    // Renewal with a new key, authenticated by the current certificate.
    let new_key = DeviceKey::generate().unwrap();
    let r = client
        .post(format!("{}/v1/agent/renew", env.agent_url))
        .json(&json!({ "csr_pem": new_key.csr_pem("gw-1").unwrap() }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let renewed: CertificateResponse = r.json().await.unwrap();
    assert_eq!(renewed.device_id, cert.device_id);
    assert_ne!(renewed.serial, cert.serial);
    let client2 = agent_client(tls_config(
        &renewed.trust_bundle_pem,
        &renewed.certificate_chain_pem,
        &new_key,
    ));
    let (s, v) = whoami(&client2, &env).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["serial"], renewed.serial.as_str());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_used_token_is_refused(pool: PgPool) {
    let env = setup(pool).await;
    let t = env.enroll_token(env.org_id, json!({ "ttl_s": 600 })).await;
    let key = DeviceKey::generate().unwrap();
    assert_eq!(
        env.enroll(&t.token, &key, "gw-1").await.0,
        StatusCode::CREATED
    );
    let (s, v) = env.enroll(&t.token, &key, "gw-2").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["error"]["code"], "forbidden");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_expired_token_is_refused(pool: PgPool) {
    let env = setup(pool.clone()).await;
    let t = env.enroll_token(env.org_id, json!({})).await;
    sqlx::query(
        "UPDATE bootstrap_tokens SET created_at = now() - interval '2 hours', \
         expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(t.id)
    .execute(&pool)
    .await
    .unwrap();
    let (s, _) = env
        .enroll(&t.token, &DeviceKey::generate().unwrap(), "gw-1")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = env
        .enroll("kipenroll_made-up", &DeviceKey::generate().unwrap(), "gw-1")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_token_of_another_organisation_is_refused_and_stays_unused(pool: PgPool) {
    let env = setup(pool).await;
    let other = env.create_org("globex").await;
    let t = env.enroll_token(other, json!({})).await;
    let key = DeviceKey::generate().unwrap();
    let body = json!({
        "token": t.token, "csr_pem": key.csr_pem("gw").unwrap(),
        "device_name": "gw", "org_id": env.org_id,
    });
    let (s, _) = env.call("POST", "/enroll", Some(body), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // A refused attempt does not consume the token: the right organisation can still use it.
    let (s, v) = env.enroll(&t.token, &key, "gw").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["org_id"], other.to_string());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_bad_csr_is_a_422_and_leaves_the_token_usable(pool: PgPool) {
    let env = setup(pool).await;
    let t = env.enroll_token(env.org_id, json!({})).await;
    let body = json!({ "token": t.token, "csr_pem": "not a csr", "device_name": "gw" });
    let (s, v) = env.call("POST", "/enroll", Some(body), false).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("csr_pem"));
    let (s, _) = env
        .enroll(&t.token, &DeviceKey::generate().unwrap(), "gw")
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_org_wide_token_cannot_take_over_an_existing_device(pool: PgPool) {
    let env = setup(pool).await;
    let (_, first) = env.enrolled_device("gw-1").await;
    let t = env.enroll_token(env.org_id, json!({})).await;
    let (s, _) = env
        .enroll(&t.token, &DeviceKey::generate().unwrap(), "gw-1")
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A token naming the device re-enrolls it (same device id, new certificate).
    let t = env
        .enroll_token(env.org_id, json!({ "device_name": "gw-1" }))
        .await;
    let (s, v) = env
        .enroll(&t.token, &DeviceKey::generate().unwrap(), "gw-1")
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["device_id"], first.device_id.to_string());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_certificate_from_another_ca_is_refused(pool: PgPool) {
    let env = setup(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let rogue = FleetCa::init(dir.path(), std::time::SystemTime::now()).unwrap();
    let key = DeviceKey::generate().unwrap();
    let (_, real) = env.enrolled_device("gw-1").await;
    // Same identity as a real device, signed by a CA the control plane does not trust.
    let issued = rogue
        .current()
        .sign_device_csr(
            &key.csr_pem("gw-1").unwrap(),
            kip_certs::DeviceIdentity {
                org_id: env.org_id,
                device_id: real.device_id,
            },
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let client = agent_client(tls_config(&env.bundle_pem, &issued.chain_pem, &key));
    assert!(whoami(&client, &env).await.is_err());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_revoked_certificate_is_refused_on_the_next_connection(pool: PgPool) {
    let env = setup(pool).await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let (other_key, other) = env.enrolled_device("gw-2").await;
    let cfg = tls_config(&env.bundle_pem, &cert.certificate_chain_pem, &key);
    let open = agent_client(cfg.clone());
    assert_eq!(whoami(&open, &env).await.unwrap().0, StatusCode::OK);

    let (s, v) = env
        .call(
            "POST",
            &format!(
                "/v1/organisations/{}/devices/{}/revoke",
                env.org_id, cert.device_id
            ),
            None,
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r: Revocation = serde_json::from_value(v).unwrap();
    assert_eq!(r.revoked_serials, vec![cert.serial.clone()]);

    // Next handshake: refused by the CRL.
    let fresh = agent_client(cfg);
    assert!(whoami(&fresh, &env).await.is_err());
    // A connection opened before the revocation (kept alive in the pool): refused per request,
    // renewal included.
    let (s, v) = whoami(&open, &env).await.unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );
    let renew = open
        .post(format!("{}/v1/agent/renew", env.agent_url))
        .json(&json!({ "csr_pem": key.csr_pem("gw-1").unwrap() }))
        .send()
        .await
        .unwrap();
    assert_eq!(renew.status().as_u16(), 403);
    // Other devices are unaffected.
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &other.certificate_chain_pem,
        &other_key,
    ));
    assert_eq!(whoami(&client, &env).await.unwrap().0, StatusCode::OK);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_tls12_client_is_refused(pool: PgPool) {
    let env = setup(pool).await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let bundle = kip_certs::TrustBundle::from_pem(&env.bundle_pem).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(bundle.root_store().unwrap())
    .with_client_auth_cert(
        certs_from_pem(&cert.certificate_chain_pem, "c").unwrap(),
        key.private_key_der(),
    )
    .unwrap();
    let err = whoami(&agent_client(cfg), &env).await.unwrap_err();
    let chain = format!("{:?}", err);
    assert!(
        chain.to_lowercase().contains("protocol") || chain.contains("Tls"),
        "{chain}"
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_agent_listener_has_no_api_key_routes(pool: PgPool) {
    let env = setup(pool).await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &cert.certificate_chain_pem,
        &key,
    ));
    let r = client
        .get(format!("{}/v1/organisations", env.agent_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn pki_routes_are_in_the_openapi_documents() {
    let admin: Value = serde_json::from_str(kip_control_plane::server::OPENAPI_JSON).unwrap();
    for p in [
        "/enroll",
        "/v1/organisations/{org_id}/enroll-tokens",
        "/v1/organisations/{org_id}/devices/{device_id}/revoke",
    ] {
        assert!(admin["paths"].get(p).is_some(), "{p}");
    }
    let agent: Value = serde_json::from_str(include_str!("../../docs/openapi-agent.json")).unwrap();
    for p in ["/v1/agent/renew", "/v1/agent/whoami"] {
        assert!(agent["paths"].get(p).is_some(), "{p}");
    }
}

/// A certificate for the device of `cert`, signed by the real CA as if issued `ago` and valid
/// one hour, recorded in `certificates` like a real one. Returns (key, chain PEM).
async fn expired_cert_for(
    env: &Env,
    pool: &PgPool,
    device_id: Uuid,
    ago: Duration,
) -> (DeviceKey, String, String) {
    let ca = FleetCa::load(&env._dir.path().join("ca")).unwrap();
    let key = DeviceKey::generate().unwrap();
    let issued = ca
        .current()
        .sign_device_csr(
            &key.csr_pem("gw").unwrap(),
            kip_certs::DeviceIdentity {
                org_id: env.org_id,
                device_id,
            },
            std::time::SystemTime::now() - ago,
            Duration::from_secs(3600),
        )
        .unwrap();
    let not_after: chrono::DateTime<chrono::Utc> = issued.not_after.into();
    sqlx::query(
        "INSERT INTO certificates (serial, org_id, device_id, not_after) VALUES ($1, $2, $3, $4)",
    )
    .bind(&issued.serial_hex)
    .bind(env.org_id)
    .bind(device_id)
    .bind(not_after)
    .execute(pool)
    .await
    .unwrap();
    (key, issued.chain_pem, issued.serial_hex)
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_expired_certificate_is_renewed_by_key_possession_within_grace(pool: PgPool) {
    let env = setup(pool.clone()).await;
    let (_, dev) = env.enrolled_device("gw-1").await;
    let (key, chain, _) =
        expired_cert_for(&env, &pool, dev.device_id, Duration::from_secs(3 * 86_400)).await;
    // The agent listener refuses it: it expired.
    let client = agent_client(tls_config(&env.bundle_pem, &chain, &key));
    assert!(whoami(&client, &env).await.is_err());
    // A CSR from another key is refused.
    let other = DeviceKey::generate().unwrap();
    let body = json!({ "certificate_chain_pem": chain, "csr_pem": other.csr_pem("gw").unwrap() });
    let (s, _) = env.call("POST", "/renew-expired", Some(body), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The same key gets a fresh certificate for the same device.
    let body = json!({ "certificate_chain_pem": chain, "csr_pem": key.csr_pem("gw").unwrap() });
    let (s, v) = env.call("POST", "/renew-expired", Some(body), false).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let renewed: CertificateResponse = serde_json::from_value(v).unwrap();
    assert_eq!(renewed.device_id, dev.device_id);
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &renewed.certificate_chain_pem,
        &key,
    ));
    assert_eq!(whoami(&client, &env).await.unwrap().0, StatusCode::OK);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_expired_certificate_is_not_renewed_when_revoked_or_past_grace(pool: PgPool) {
    let env = setup(pool.clone()).await;
    let (_, dev) = env.enrolled_device("gw-1").await;
    // Past the 30-day default grace.
    let (key, chain, _) =
        expired_cert_for(&env, &pool, dev.device_id, Duration::from_secs(40 * 86_400)).await;
    let body = json!({ "certificate_chain_pem": chain, "csr_pem": key.csr_pem("gw").unwrap() });
    let (s, _) = env.call("POST", "/renew-expired", Some(body), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Within grace but revoked.
    let (key, chain, serial) =
        expired_cert_for(&env, &pool, dev.device_id, Duration::from_secs(2 * 86_400)).await;
    sqlx::query("UPDATE certificates SET revoked_at = now() WHERE serial = $1")
        .bind(&serial)
        .execute(&pool)
        .await
        .unwrap();
    let body = json!({ "certificate_chain_pem": chain, "csr_pem": key.csr_pem("gw").unwrap() });
    let (s, _) = env.call("POST", "/renew-expired", Some(body), false).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

// ---------- issue #13, hole 1: a revoked device stays out ----------

/// Waits (polling, bounded) until `t` has passed.
async fn wait_past(t: chrono::DateTime<chrono::Utc>) {
    kip_tests::wait_until(
        Duration::from_secs(90),
        "the time has passed",
        || async move { chrono::Utc::now() > t },
    )
    .await;
}

impl Env {
    async fn revoke(&self, org: Uuid, device: Uuid) -> (StatusCode, Value) {
        self.call(
            "POST",
            &format!("/v1/organisations/{org}/devices/{device}/revoke"),
            None,
            true,
        )
        .await
    }

    async fn renew_expired(&self, chain_pem: &str, key: &DeviceKey) -> (StatusCode, Value) {
        let body = json!({
            "certificate_chain_pem": chain_pem,
            "csr_pem": key.csr_pem("gw").unwrap(),
        });
        self.call("POST", "/renew-expired", Some(body), false).await
    }

    /// `POST /v1/agent/renew` on a fresh connection presenting `cert`; returns the status, the
    /// `Retry-After` header and the body.
    async fn renew_with(
        &self,
        cert: &CertificateResponse,
        key: &DeviceKey,
        new_key: &DeviceKey,
    ) -> (u16, Option<String>, Value) {
        let client = agent_client(tls_config(
            &self.bundle_pem,
            &cert.certificate_chain_pem,
            key,
        ));
        let r = client
            .post(format!("{}/v1/agent/renew", self.agent_url))
            .json(&json!({ "csr_pem": new_key.csr_pem("gw").unwrap() }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, retry, r.json().await.unwrap())
    }

    /// The status of `whoami` on a fresh connection presenting `cert` (`None`: the
    /// handshake itself was refused).
    async fn whoami_status(&self, cert: &CertificateResponse, key: &DeviceKey) -> Option<u16> {
        let client = agent_client(tls_config(
            &self.bundle_pem,
            &cert.certificate_chain_pem,
            key,
        ));
        whoami(&client, self).await.ok().map(|(s, _)| s.as_u16())
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_revoked_device_whose_certificate_expired_cannot_renew_itself(pool: PgPool) {
    // The shortest lifetime the CA signs (60 s): the test waits for it to pass.
    let env = setup_with(pool, |cfg| {
        cfg.pki.device_cert_lifetime = Duration::from_secs(60);
    })
    .await;
    let (key, cert) = env.enrolled_device("stolen").await;
    let (other_key, other) = env.enrolled_device("kept").await;
    wait_past(cert.not_after.max(other.not_after)).await;

    // Revocation covers the certificate although it expired, and says so.
    let (s, v) = env.revoke(env.org_id, cert.device_id).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r: Revocation = serde_json::from_value(v).unwrap();
    assert_eq!(r.revoked_serials, vec![cert.serial.clone()]);

    // The old certificate and key no longer buy a new certificate.
    let (s, v) = env.renew_expired(&cert.certificate_chain_pem, &key).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // A device that was not revoked recovers its expired certificate the same way.
    let (s, v) = env
        .renew_expired(&other.certificate_chain_pem, &other_key)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let renewed: CertificateResponse = serde_json::from_value(v).unwrap();
    assert_eq!(env.whoami_status(&renewed, &other_key).await, Some(200));

    // Revoking again revokes nothing new and still refuses.
    let (_, v) = env.revoke(env.org_id, cert.device_id).await;
    assert_eq!(v["revoked_serials"], json!([]));
    let (s, _) = env.renew_expired(&cert.certificate_chain_pem, &key).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Only a token created after the revocation re-admits the device.
    let t = env
        .enroll_token(env.org_id, json!({ "device_name": "stolen" }))
        .await;
    let new_key = DeviceKey::generate().unwrap();
    let (s, v) = env.enroll(&t.token, &new_key, "stolen").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let back: CertificateResponse = serde_json::from_value(v).unwrap();
    assert_eq!(back.device_id, cert.device_id);
    assert_eq!(env.whoami_status(&back, &new_key).await, Some(200));
    // The revoked certificate stays revoked.
    let (s, _) = env.renew_expired(&cert.certificate_chain_pem, &key).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_token_created_before_the_revocation_does_not_readmit_the_device(pool: PgPool) {
    let env = setup(pool).await;
    let (_, cert) = env.enrolled_device("gw-1").await;
    let early = env
        .enroll_token(env.org_id, json!({ "device_name": "gw-1" }))
        .await;
    let (s, _) = env.revoke(env.org_id, cert.device_id).await;
    assert_eq!(s, StatusCode::OK);
    let key = DeviceKey::generate().unwrap();
    let (s, v) = env.enroll(&early.token, &key, "gw-1").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("revoked"));
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn another_organisation_cannot_revoke_a_device(pool: PgPool) {
    let env = setup(pool).await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let other_org = env.create_org("evil").await;
    let (s, v) = env
        .call(
            "POST",
            &format!("/v1/organisations/{other_org}/api-keys"),
            Some(json!({ "name": "k" })),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let evil_key = v["key"].as_str().unwrap().to_owned();
    for org in [env.org_id, other_org] {
        let req = Request::builder()
            .method("POST")
            .uri(format!(
                "/v1/organisations/{org}/devices/{}/revoke",
                cert.device_id
            ))
            .header("authorization", format!("Bearer {evil_key}"))
            .body(Body::empty())
            .unwrap();
        let resp = env.router.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "org {org}");
    }
    assert_eq!(env.whoami_status(&cert, &key).await, Some(200));
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn renewal_retires_the_previous_certificate_after_the_overlap(pool: PgPool) {
    let env = setup_with(pool, |cfg| {
        cfg.pki.renewal_overlap = Duration::from_secs(3);
    })
    .await;
    let (key, first) = env.enrolled_device("gw-1").await;
    let mut held = vec![(key, first)];
    for _ in 0..3 {
        let (cert, key) = held.last().map(|(k, c)| (c.clone(), k)).unwrap();
        let new_key = DeviceKey::generate().unwrap();
        let (s, _, v) = env.renew_with(&cert, key, &new_key).await;
        assert_eq!(s, 200, "{v}");
        held.push((new_key, serde_json::from_value(v).unwrap()));
    }
    let mut working = Vec::new();
    for (key, cert) in &held {
        working.push(env.whoami_status(cert, key).await == Some(200));
    }
    // During the overlap: the newest and its direct predecessor only.
    assert_eq!(working, vec![false, false, true, true]);
    let (k, superseded) = &held[0];
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &superseded.certificate_chain_pem,
        k,
    ));
    let (s, v) = whoami(&client, &env).await.unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("superseded"),
        "{v}"
    );
    // After the overlap: the newest only.
    let (k, predecessor) = &held[2];
    kip_tests::wait_until(Duration::from_secs(30), "the overlap ends", || async {
        env.whoami_status(predecessor, k).await != Some(200)
    })
    .await;
    let (newest_key, newest) = &held[3];
    assert_eq!(env.whoami_status(newest, newest_key).await, Some(200));
    // A superseded certificate cannot renew either.
    let (s, _, _) = env
        .renew_with(predecessor, k, &DeviceKey::generate().unwrap())
        .await;
    assert_eq!(s, 403);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn renewals_are_rate_limited_per_device(pool: PgPool) {
    let env = setup_with(pool, |cfg| {
        cfg.pki.renewals_per_window = 3;
    })
    .await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let (other_key, other) = env.enrolled_device("gw-2").await;
    let (mut key, mut cert) = (key, cert);
    // The enrollment counts: two renewals fill the window of three.
    for _ in 0..2 {
        let new_key = DeviceKey::generate().unwrap();
        let (s, _, v) = env.renew_with(&cert, &key, &new_key).await;
        assert_eq!(s, 200, "{v}");
        (key, cert) = (new_key, serde_json::from_value(v).unwrap());
    }
    // A burst beyond it is refused, with a Retry-After, and issues nothing.
    for _ in 0..3 {
        let (s, retry, v) = env
            .renew_with(&cert, &key, &DeviceKey::generate().unwrap())
            .await;
        assert_eq!(s, 429, "{v}");
        assert_eq!(v["error"]["code"], "rate_limited");
        let retry: u64 = retry.expect("Retry-After").parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
    }
    assert_eq!(env.whoami_status(&cert, &key).await, Some(200));
    // Per device: another device still renews.
    let (s, _, v) = env
        .renew_with(&other, &other_key, &DeviceKey::generate().unwrap())
        .await;
    assert_eq!(s, 200, "{v}");
}

// ---------- issue #13, hole 10: per-request expiry and the agent request timeout ----------

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_certificate_that_expires_on_an_open_connection_is_refused(pool: PgPool) {
    // The shortest lifetime the CA signs (60 s): the test waits for it to pass.
    let env = setup_with(pool, |cfg| {
        cfg.pki.device_cert_lifetime = Duration::from_secs(60);
    })
    .await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let open = agent_client(tls_config(
        &env.bundle_pem,
        &cert.certificate_chain_pem,
        &key,
    ));
    assert_eq!(whoami(&open, &env).await.unwrap().0, StatusCode::OK);
    wait_past(cert.not_after).await;
    // Same pooled connection (the handshake happened while the certificate was valid).
    let (s, v) = whoami(&open, &env).await.unwrap();
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_stalled_agent_request_times_out(pool: PgPool) {
    let env = setup_with(pool, |cfg| {
        cfg.pki.agent_request_timeout = Duration::from_millis(500);
    })
    .await;
    let (key, cert) = env.enrolled_device("gw-1").await;
    let client = agent_client(tls_config(
        &env.bundle_pem,
        &cert.certificate_chain_pem,
        &key,
    ));
    // One byte of the body, then nothing: the handler waits for the rest.
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from("{"))])
        .chain(futures_util::stream::pending());
    let started = std::time::Instant::now();
    let r = client
        .post(format!("{}/v1/agent/sync", env.agent_url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------- issue #13, hole 5: cheap checks before the database ----------

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn forged_recovery_and_malformed_tokens_are_refused_without_the_database(pool: PgPool) {
    let env = setup(pool.clone()).await;
    let (_, real) = env.enrolled_device("gw-1").await;
    let dir = tempfile::tempdir().unwrap();
    let rogue = FleetCa::init(dir.path(), std::time::SystemTime::now()).unwrap();
    let key = DeviceKey::generate().unwrap();
    let forged = rogue
        .current()
        .sign_device_csr(
            &key.csr_pem("gw-1").unwrap(),
            kip_certs::DeviceIdentity {
                org_id: env.org_id,
                device_id: real.device_id,
            },
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        )
        .unwrap();
    // Without a database, anything that reached it would answer 500 or 503.
    pool.close().await;
    let (s, v) = env.renew_expired(&forged.chain_pem, &key).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    for token in [
        "kipenroll_short",
        "kipenroll_%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%",
    ] {
        let (s, v) = env.enroll(token, &key, "gw-9").await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{token}: {v}");
    }
}

/// `POST /enroll` from `ip` (as the admin listener records the peer address).
async fn enroll_from(env: &Env, ip: &str, token: &str) -> (StatusCode, Option<String>, Value) {
    let key = DeviceKey::generate().unwrap();
    let body =
        json!({ "token": token, "csr_pem": key.csr_pem("gw-x").unwrap(), "device_name": "gw-x" });
    let peer: std::net::SocketAddr = format!("{ip}:40000").parse().unwrap();
    let req = Request::builder()
        .method("POST")
        .uri("/enroll")
        .header("content-type", "application/json")
        .extension(axum::extract::ConnectInfo(peer))
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = env.router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Hole 5 / #13 item 6: enrollment attempts are limited per address before PostgreSQL is
/// asked: with the database gone, a limited address still gets its 429 (not a 5xx), while
/// another address is unaffected by the first one's flood.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn enrollment_is_rate_limited_per_address_before_the_database(pool: PgPool) {
    let db = pool.clone();
    let env = setup_with(pool, |cfg| {
        cfg.pki.enrollments_per_ip_per_minute = 3;
    })
    .await;
    let bogus = "kipenroll_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for _ in 0..3 {
        let (s, _, v) = enroll_from(&env, "203.0.113.7", bogus).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    }
    // A valid token does not help once the address is over its limit.
    let t = env.enroll_token(env.org_id, json!({})).await;
    let (s, retry, v) = enroll_from(&env, "203.0.113.7", &t.token).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("enrollments_per_ip_per_minute"),
        "{v}"
    );
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another address enrolls with that token.
    let (s, _, v) = enroll_from(&env, "198.51.100.9", &t.token).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // Refused before the database: with PostgreSQL gone the answer is still 429.
    db.close().await;
    let (s, _, v) = enroll_from(&env, "203.0.113.7", bogus).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
}

/// Runs `openssl verify -CAfile ca -untrusted chain leaf`; (success, output).
fn openssl_verify(
    dir: &std::path::Path,
    ca_pem: &str,
    chain_pem: &str,
    leaf_pem: &str,
) -> (bool, String) {
    let (ca, chain, leaf) = (
        dir.join("ca.pem"),
        dir.join("chain.pem"),
        dir.join("leaf.pem"),
    );
    std::fs::write(&ca, ca_pem).unwrap();
    std::fs::write(&chain, chain_pem).unwrap();
    std::fs::write(&leaf, leaf_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca)
        .arg("-untrusted")
        .arg(&chain)
        .arg(&leaf)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `kipctl ot issue` end to end through the API (#13, certificates for OT devices): a broker
/// certificate and an OPC UA certificate verify with openssl against the fleet bundle, a
/// rotation replaces the old one in the expiry reminders, calls are audited, org keys are
/// refused, and bad fields get a 422 naming them.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn ot_certificates_are_issued_rotated_listed_by_expiry_and_verify_with_openssl(pool: PgPool) {
    let db = pool.clone();
    let env = setup(pool).await;
    let tmp = tempfile::tempdir().unwrap();
    let (s, v) = env
        .call(
            "POST",
            "/v1/pki/ot-certificates",
            Some(json!({
                "profile": "tls-server", "common_name": "broker",
                "dns_names": ["broker.plant.local"], "ip_addresses": ["10.0.0.5"],
                "validity_days": 10
            })),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let broker: kip_api::IssuedOtCertificate = serde_json::from_value(v).unwrap();
    assert!(
        broker
            .private_key_pem
            .as_deref()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let (ok, out) = openssl_verify(
        tmp.path(),
        &broker.ca_bundle_pem,
        &broker.chain_pem,
        &broker.certificate_pem,
    );
    assert!(ok, "{out}");
    // And it is a server certificate for the names asked for.
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(tmp.path().join("leaf.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("DNS:broker.plant.local") && text.contains("IP Address:10.0.0.5"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");

    let (s, v) = env
        .call(
            "POST",
            "/v1/pki/ot-certificates",
            Some(json!({
                "profile": "opcua", "common_name": "plc-1",
                "application_uri": "urn:plant:plc-1", "dns_names": ["plc-1"],
                "validity_days": 400
            })),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let plc: kip_api::IssuedOtCertificate = serde_json::from_value(v).unwrap();
    let (ok, out) = openssl_verify(
        tmp.path(),
        &plc.ca_bundle_pem,
        &plc.chain_pem,
        &plc.certificate_pem,
    );
    assert!(ok, "{out}");

    // Expiry reminders: only the broker certificate (10 days) is within 30 days.
    let (s, v) = env
        .call(
            "GET",
            "/v1/pki/ot-certificates?expiring_within_days=30",
            None,
            true,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let expiring: Vec<kip_api::OtCertificateInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(expiring.len(), 1);
    assert_eq!(expiring[0].serial_hex, broker.info.serial_hex);

    // Rotation: the new broker certificate replaces the old one, which leaves the reminders.
    let (s, v) = env
        .call(
            "POST",
            "/v1/pki/ot-certificates",
            Some(json!({
                "profile": "tls-server", "common_name": "broker",
                "dns_names": ["broker.plant.local"], "validity_days": 365,
                "replaces_serial": broker.info.serial_hex
            })),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, v) = env
        .call(
            "GET",
            "/v1/pki/ot-certificates?expiring_within_days=30",
            None,
            true,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 0, "{v}");
    let (_, v) = env.call("GET", "/v1/pki/ot-certificates", None, true).await;
    let all: Vec<kip_api::OtCertificateInfo> = serde_json::from_value(v).unwrap();
    assert_eq!(all.len(), 3);
    assert!(
        all.iter()
            .any(|c| c.serial_hex == broker.info.serial_hex && c.replaced_at.is_some())
    );
    // Replacing it again is refused: it is no longer current.
    let (s, v) = env
        .call(
            "POST",
            "/v1/pki/ot-certificates",
            Some(json!({
                "profile": "tls-server", "common_name": "broker", "dns_names": ["b"],
                "validity_days": 1, "replaces_serial": broker.info.serial_hex
            })),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");

    // Bad fields: 422 naming them, nothing recorded.
    for (body, field) in [
        (
            json!({"profile": "tls-server", "common_name": "b", "validity_days": 10}),
            "dns_names",
        ),
        (
            json!({"profile": "opcua", "common_name": "b", "validity_days": 10}),
            "application_uri",
        ),
        (
            json!({"profile": "x", "common_name": "b", "validity_days": 10}),
            "profile",
        ),
        (
            json!({"profile": "tls-client", "common_name": "b", "validity_days": 9999}),
            "validity_days",
        ),
        (
            json!({"profile": "tls-client", "common_name": "b\u{0}", "validity_days": 1}),
            "common_name",
        ),
        (
            json!({"profile": "tls-server", "common_name": "b", "dns_names": ["b"], "ip_addresses": ["x"], "validity_days": 1}),
            "ip_addresses",
        ),
    ] {
        let (s, v) = env
            .call("POST", "/v1/pki/ot-certificates", Some(body), true)
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{field}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{field}: {v}"
        );
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM ot_certificates")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // Audited: every issue (and refusal) has a row naming the action.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'pki.ot_issue' AND outcome = 'ok'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(audited, 3);

    // An organisation key (even org-admin) may not issue.
    let (s, v) = env
        .call(
            "POST",
            &format!("/v1/organisations/{}/api-keys", env.org_id),
            Some(json!({"name": "admin", "role": "org-admin"})),
            true,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let org_key = v["key"].as_str().unwrap().to_owned();
    let req = Request::builder()
        .method("POST")
        .uri("/v1/pki/ot-certificates")
        .header("authorization", format!("Bearer {org_key}"))
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"profile": "tls-client", "common_name": "x", "validity_days": 1}).to_string(),
        ))
        .unwrap();
    let resp = env.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

// ---------- issue #17: load shedding on the agent listener ----------

/// A sync of one reading (plain JSON, sequence 1 of epoch 1: a resend is idempotent).
fn sync_body() -> String {
    let batch = kip_shared::sync::SyncBatch {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        agent_version: "kip-agent test".into(),
        epoch: 1,
        first_seq: 1,
        last_seq: 1,
        records: vec![kip_shared::Sequenced {
            epoch: 1,
            seq: 1,
            record: kip_shared::Record::Reading(kip_shared::Reading {
                source: "plc1".into(),
                machine: "press1".into(),
                metric: "temp".into(),
                ts: chrono::Utc::now(),
                value: 1.0,
                quality: Default::default(),
            }),
        }],
        running_model: None,
        health: None,
    };
    serde_json::to_string(&batch).unwrap()
}

async fn sync_one(client: &reqwest::Client, env: &Env) -> reqwest::Response {
    client
        .post(format!("{}/v1/agent/sync", env.agent_url))
        .header("content-type", "application/json")
        .body(sync_body())
        .send()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_saturated_agent_listener_sheds_syncs_with_retry_after_and_serves_again_below_the_bound(
    pool: PgPool,
) {
    let env = setup_with(pool, |cfg| {
        cfg.agent_load_shedding = kip_control_plane::agent_api::SheddingConfig {
            max_in_flight_requests: Some(1),
            max_queued_requests: 0,
            max_queue_wait: Duration::from_millis(100),
            retry_after_min_s: 5,
            retry_after_max_s: 30,
        };
    })
    .await;
    let (k1, c1) = env.enrolled_device("gw-1").await;
    let (k2, c2) = env.enrolled_device("gw-2").await;
    let gw1 = agent_client(tls_config(&env.bundle_pem, &c1.certificate_chain_pem, &k1));
    let gw2 = agent_client(tls_config(&env.bundle_pem, &c2.certificate_chain_pem, &k2));
    let admission = env._cp.state().agent_admission.clone();

    // Under the bound: served.
    let r = sync_one(&gw2, &env).await;
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);

    // gw-1 takes the only place with a sync whose body never ends.
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from("{"))])
        .chain(futures_util::stream::pending());
    let stalled = TaskTracker::new().spawn({
        let url = format!("{}/v1/agent/sync", env.agent_url);
        async move {
            gw1.post(url)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
        }
    });
    kip_tests::wait_until(
        Duration::from_secs(10),
        "the stalled sync holds the place",
        || {
            let a = admission.clone();
            async move { a.in_flight() == 1 }
        },
    )
    .await;

    // Beyond the bound: refused at once, with the reason, a jittered Retry-After and counted.
    let started = std::time::Instant::now();
    let r = sync_one(&gw2, &env).await;
    assert_eq!(r.status().as_u16(), 503);
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..=30).contains(&retry_after), "{retry_after}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    assert_eq!(v["error"]["reason"], "queue_full", "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused without waiting for the pool: {:?}",
        started.elapsed()
    );
    let metrics = env._cp.state().metrics.render();
    assert!(
        metrics.contains("kip_agent_requests_shed_total{reason=\"queue_full\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kip_agent_requests_in_flight 1"),
        "{metrics}"
    );

    // The admin API is not held up by the agent listener's bound (its own listener and pool).
    let (s, v) = env.call("GET", "/readyz", None, false).await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // The stalled client goes away: its place frees, and the next sync is served.
    stalled.abort();
    let _ = stalled.await;
    kip_tests::wait_until(Duration::from_secs(10), "the place is free", || {
        let a = admission.clone();
        async move { a.in_flight() == 0 }
    })
    .await;
    let r = sync_one(&gw2, &env).await;
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    let metrics = env._cp.state().metrics.render();
    assert!(
        metrics.contains("kip_agent_requests_shed_total{reason=\"queue_full\"} 1"),
        "one refusal only: {metrics}"
    );
}

/// A queued request waits for a place up to `max_queue_wait_ms`, then is refused with reason
/// `queue_wait` (instead of waiting for the pool until `database.connect_timeout_ms`).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_request_queued_past_the_wait_budget_is_shed(pool: PgPool) {
    let env = setup_with(pool, |cfg| {
        cfg.agent_load_shedding = kip_control_plane::agent_api::SheddingConfig {
            max_in_flight_requests: Some(1),
            max_queued_requests: 8,
            max_queue_wait: Duration::from_millis(200),
            retry_after_min_s: 1,
            retry_after_max_s: 2,
        };
    })
    .await;
    let (k1, c1) = env.enrolled_device("gw-1").await;
    let (k2, c2) = env.enrolled_device("gw-2").await;
    let gw1 = agent_client(tls_config(&env.bundle_pem, &c1.certificate_chain_pem, &k1));
    let gw2 = agent_client(tls_config(&env.bundle_pem, &c2.certificate_chain_pem, &k2));
    let admission = env._cp.state().agent_admission.clone();
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from("{"))])
        .chain(futures_util::stream::pending());
    let stalled = TaskTracker::new().spawn({
        let url = format!("{}/v1/agent/sync", env.agent_url);
        async move {
            gw1.post(url)
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await
        }
    });
    kip_tests::wait_until(
        Duration::from_secs(10),
        "the stalled sync holds the place",
        || {
            let a = admission.clone();
            async move { a.in_flight() == 1 }
        },
    )
    .await;
    let r = sync_one(&gw2, &env).await;
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["reason"], "queue_wait", "{v}");
    assert!(
        env._cp
            .state()
            .metrics
            .render()
            .contains("kip_agent_requests_shed_total{reason=\"queue_wait\"} 1")
    );
    stalled.abort();
}

// ---------- issue #17: pipelined sync, several batches of one device at once ----------

/// A batch of readings `seqs` (epoch 1) spread over two minutes from 10:00 on a fixed day, on
/// two machines, valued by their sequence (whole numbers: sums compare exactly).
fn readings_body(seqs: std::ops::RangeInclusive<u64>) -> String {
    let base = chrono::DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let records = seqs
        .clone()
        .map(|seq| kip_shared::Sequenced {
            epoch: 1,
            seq,
            record: kip_shared::Record::Reading(kip_shared::Reading {
                source: "plc1".into(),
                machine: format!("press{}", seq % 2),
                metric: "temp".into(),
                ts: base + chrono::Duration::seconds((seq * 7 % 120) as i64),
                value: seq as f64,
                quality: Default::default(),
            }),
        })
        .collect();
    serde_json::to_string(&kip_shared::sync::SyncBatch {
        protocol_version: kip_shared::PROTOCOL_VERSION,
        agent_version: "kip-agent test".into(),
        epoch: 1,
        first_seq: *seqs.start(),
        last_seq: *seqs.end(),
        records,
        running_model: None,
        health: None,
    })
    .unwrap()
}

/// Posts `body` in the background; the answer's status.
fn post_sync(
    tracker: &TaskTracker,
    client: &reqwest::Client,
    env: &Env,
    body: String,
) -> tokio::task::JoinHandle<u16> {
    let (client, url) = (client.clone(), format!("{}/v1/agent/sync", env.agent_url));
    tracker.spawn(async move {
        let r = client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            eprintln!(
                "sync answered {status}: {}",
                r.text().await.unwrap_or_default()
            );
        }
        status
    })
}

/// The sync backends of this database waiting for a lock held by `holder` alone.
async fn waiting_only_for(pool: &PgPool, holder: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND pid <> pg_backend_pid() \
            AND wait_event_type = 'Lock' AND pg_blocking_pids(pid) = ARRAY[$1]::int[]",
    )
    .bind(holder)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The sync backends of this database inside the readings' insert-select (which upserts the
/// rollups), waiting for a lock.
async fn waiting_in_the_insert(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
          WHERE datname = current_database() AND pid <> pg_backend_pid() \
            AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO sensor_rollup_1m%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Raw rows of the device against both rollups: rows that differ (count, min, max, sum).
async fn rollup_mismatches(pool: &PgPool, device: Uuid) -> i64 {
    let mut bad = 0;
    for (table, width) in [
        ("sensor_rollup_1m", "1 minute"),
        ("sensor_rollup_1h", "1 hour"),
    ] {
        // Two static statements (SQL is never built with format!).
        let sql = if table == "sensor_rollup_1m" {
            "SELECT count(*) FROM \
               (SELECT machine, metric, date_bin($2::interval, ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b, \
                       count(*) AS c, min(value) AS mn, max(value) AS mx, sum(value) AS s \
                  FROM sensor_data WHERE device_id = $1 GROUP BY 1, 2, 3) raw \
               FULL JOIN (SELECT * FROM sensor_rollup_1m WHERE device_id = $1) r \
                 ON r.machine = raw.machine AND r.metric = raw.metric AND r.bucket = raw.b \
              WHERE r.count IS DISTINCT FROM raw.c OR r.min IS DISTINCT FROM raw.mn \
                 OR r.max IS DISTINCT FROM raw.mx OR r.sum IS DISTINCT FROM raw.s"
        } else {
            "SELECT count(*) FROM \
               (SELECT machine, metric, date_bin($2::interval, ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS b, \
                       count(*) AS c, min(value) AS mn, max(value) AS mx, sum(value) AS s \
                  FROM sensor_data WHERE device_id = $1 GROUP BY 1, 2, 3) raw \
               FULL JOIN (SELECT * FROM sensor_rollup_1h WHERE device_id = $1) r \
                 ON r.machine = raw.machine AND r.metric = raw.metric AND r.bucket = raw.b \
              WHERE r.count IS DISTINCT FROM raw.c OR r.min IS DISTINCT FROM raw.mn \
                 OR r.max IS DISTINCT FROM raw.mx OR r.sum IS DISTINCT FROM raw.s"
        };
        let n: i64 = sqlx::query_scalar(sql)
            .bind(device)
            .bind(width)
            .fetch_one(pool)
            .await
            .unwrap();
        bad += n;
    }
    bad
}

/// gw-1 enrolled with its first reading stored (so a 1-minute rollup row exists), and an open
/// transaction holding every rollup row: batches posted next wait inside the insert-select.
async fn gw1_with_its_rollup_rows_held(
    pool: &PgPool,
) -> (
    Env,
    Uuid,
    reqwest::Client,
    sqlx::Transaction<'static, sqlx::Postgres>,
) {
    let env = setup(pool.clone()).await;
    let (k, c) = env.enrolled_device("gw-1").await;
    let gw = agent_client(tls_config(&env.bundle_pem, &c.certificate_chain_pem, &k));
    let r = gw
        .post(format!("{}/v1/agent/sync", env.agent_url))
        .header("content-type", "application/json")
        .body(readings_body(1..=1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM sensor_rollup_1m FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    (env, c.device_id, gw, holder)
}

/// Two concurrent syncs of one device (disjoint sequences, the same rollup buckets) are in
/// PostgreSQL at the same time: before, the device row lock (`FOR UPDATE`) made the second
/// wait for the first's whole transaction. Both are stored, every reading once, with
/// rollups equal to the raw rows and the ack at the highest sequence.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn concurrent_syncs_of_one_device_overlap_and_store_every_reading_once(pool: PgPool) {
    // The rollup rows so far are held: both batches update one of them.
    let (env, device, gw, holder) = gw1_with_its_rollup_rows_held(&pool).await;
    let tracker = TaskTracker::new();
    // 1,200 readings each: the COPY path.
    let a = post_sync(&tracker, &gw, &env, readings_body(2..=1201));
    let b = post_sync(&tracker, &gw, &env, readings_body(1202..=2401));
    // Both are past the device lock and their COPY, inside the insert-select at once (before,
    // the second waited at the device row for the first's whole transaction).
    kip_tests::wait_until(
        Duration::from_secs(20),
        "both batches inside the insert-select at once",
        || {
            let pool = pool.clone();
            async move { waiting_in_the_insert(&pool).await == 2 }
        },
    )
    .await;
    holder.rollback().await.unwrap();
    assert_eq!(a.await.unwrap(), 200);
    assert_eq!(b.await.unwrap(), 200);

    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT seq) FROM sensor_data WHERE device_id = $1 AND epoch = 1",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, distinct), (2401, 2401));
    assert_eq!(rollup_mismatches(&pool, device).await, 0);
    let acked: i64 = sqlx::query_scalar(
        "SELECT acked_seq FROM device_sync_state WHERE device_id = $1 AND epoch = 1",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        acked, 2401,
        "the ack is the highest sequence, whichever committed last"
    );
}

/// A replay running beside its original (an agent that resent after a timeout) waits for the
/// original's rows and stores nothing twice; rollups count every reading once.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_replay_concurrent_with_its_original_stores_once(pool: PgPool) {
    let (env, device, gw, mut holder) = gw1_with_its_rollup_rows_held(&pool).await;
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let tracker = TaskTracker::new();
    let original = post_sync(&tracker, &gw, &env, readings_body(2..=1201));
    // The original holds its new keys (uncommitted) and waits for the rollup row.
    kip_tests::wait_until(
        Duration::from_secs(20),
        "the original waits for the rollup row",
        || {
            let pool = pool.clone();
            async move { waiting_only_for(&pool, holder_pid).await == 1 }
        },
    )
    .await;
    let replay = post_sync(&tracker, &gw, &env, readings_body(2..=1201));
    // The replay waits for the original's keys (a transaction lock, not the holder's).
    kip_tests::wait_until(Duration::from_secs(20), "the replay waits", || {
        let pool = pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                  WHERE datname = current_database() AND pid <> pg_backend_pid() \
                    AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            n == 2
        }
    })
    .await;
    holder.rollback().await.unwrap();
    assert_eq!(original.await.unwrap(), 200);
    assert_eq!(replay.await.unwrap(), 200);
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT seq) FROM sensor_data WHERE device_id = $1",
    )
    .bind(device)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, distinct), (1201, 1201));
    assert_eq!(rollup_mismatches(&pool, device).await, 0);
    let counted: i64 =
        sqlx::query_scalar("SELECT sum(count)::bigint FROM sensor_rollup_1m WHERE device_id = $1")
            .bind(device)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(counted, 1201);
}

/// `ingest.max_in_flight_syncs_per_device` syncs of one device are admitted at once; one
/// more is refused 429 `sync_in_flight` with `Retry-After` before its body is read, and
/// counted; another device is not held up.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn one_sync_beyond_max_in_flight_syncs_per_device_gets_429(pool: PgPool) {
    let env = setup_with(pool, |cfg| {
        cfg.ingest.max_in_flight_syncs_per_device = 2;
    })
    .await;
    let (k1, c1) = env.enrolled_device("gw-1").await;
    let (k2, c2) = env.enrolled_device("gw-2").await;
    let gw1 = agent_client(tls_config(&env.bundle_pem, &c1.certificate_chain_pem, &k1));
    let gw2 = agent_client(tls_config(&env.bundle_pem, &c2.certificate_chain_pem, &k2));
    let gate = env._cp.state().sync_gate.clone();
    let tracker = TaskTracker::new();
    // Two syncs whose bodies never end hold both places of gw-1.
    let stalled: Vec<_> = (0..2)
        .map(|_| {
            let body =
                futures_util::stream::iter([Ok::<_, std::io::Error>(axum::body::Bytes::from("{"))])
                    .chain(futures_util::stream::pending());
            let (gw1, url) = (gw1.clone(), format!("{}/v1/agent/sync", env.agent_url));
            tracker.spawn(async move {
                gw1.post(url)
                    .header("content-type", "application/json")
                    .body(reqwest::Body::wrap_stream(body))
                    .send()
                    .await
            })
        })
        .collect();
    kip_tests::wait_until(
        Duration::from_secs(10),
        "two syncs of gw-1 in flight",
        || {
            let (g, d) = (gate.clone(), c1.device_id);
            async move { g.in_flight(d) == 2 }
        },
    )
    .await;
    let r = sync_one(&gw1, &env).await;
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(
        r.headers().get("retry-after").unwrap().to_str().unwrap(),
        "1"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "sync_in_flight", "{v}");
    assert_eq!(gate.in_flight(c1.device_id), 2, "the refusal took no place");
    let r = sync_one(&gw2, &env).await;
    assert_eq!(r.status().as_u16(), 200, "another device is not held up");
    let metrics = env._cp.state().metrics.render();
    assert!(
        metrics.contains("kip_ingest_rejected_total{reason=\"in_flight\"} 1"),
        "{metrics}"
    );
    for s in stalled {
        s.abort();
    }
    kip_tests::wait_until(Duration::from_secs(10), "the places are free", || {
        let (g, d) = (gate.clone(), c1.device_id);
        async move { g.in_flight(d) == 0 }
    })
    .await;
    let r = sync_one(&gw1, &env).await;
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
}

/// A deadlock or serialization failure in PostgreSQL is a retryable 503 `sync_conflict` with
/// `Retry-After`, never a 500 (nothing was stored: the agent resends).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_deadlock_is_a_retryable_503_not_a_500(pool: PgPool) {
    sqlx::query("CREATE TABLE t (id int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1), (2)")
        .execute(&pool)
        .await
        .unwrap();
    let mut a = pool.begin().await.unwrap();
    let mut b = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")
        .execute(&mut *a)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
        .execute(&mut *b)
        .await
        .unwrap();
    // Each side rolls back as soon as its statement ends, so the survivor goes on.
    let other = TaskTracker::new().spawn(async move {
        let r = sqlx::query("SELECT 1 FROM t WHERE id = 1 FOR UPDATE")
            .execute(&mut *b)
            .await;
        b.rollback().await.unwrap();
        r.err()
    });
    let ra = sqlx::query("SELECT 1 FROM t WHERE id = 2 FOR UPDATE")
        .execute(&mut *a)
        .await;
    a.rollback().await.unwrap();
    let rb = other.await.unwrap();
    let err = ra.err().or(rb).expect("PostgreSQL detects the deadlock");
    assert_eq!(
        kip_control_plane::telemetry::ingest::conflict_code(&err),
        Some("deadlock detected")
    );
    let e = kip_control_plane::telemetry::IngestError::from(err);
    assert_eq!(e.reason(), "conflict");
    let api = kip_control_plane::http::ApiError::from(e);
    assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.code(), "sync_conflict");
    let resp = axum::response::IntoResponse::into_response(api);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
}
