//! The in-process control plane for end-to-end tests: the admin API and the real mTLS agent
//! listener on loopback ports, on the caller's database, with a fresh fleet CA; plus queries of
//! what the control plane stored.
//!
//! All start-up goes through [`start_with_ca_age`] (one function), so switching the harness to
//! the control plane's builder is one edit there. The control plane stops (its token is
//! cancelled) when the [`ControlPlane`] is dropped.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use kip_agent::identity::{self, Identity};
use kip_certs::FleetCa;
use kip_control_plane::{config::Config, telemetry::IngestLimits};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

/// A running in-process control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// `http://127.0.0.1:PORT` of the admin API.
    pub admin_url: String,
    /// `https://127.0.0.1:PORT` of the mTLS agent listener.
    pub agent_url: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub token: CancellationToken,
    pub tracker: TaskTracker,
    pub dir: tempfile::TempDir,
    /// The running system (`kip_control_plane::ControlPlane`); dropping it stops it.
    _cp: kip_control_plane::ControlPlane,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Starts the admin API and the mTLS agent listener on loopback ports.
pub async fn start(pool: PgPool, limits: Option<IngestLimits>) -> ControlPlane {
    start_with(pool, limits, |_| {}).await
}

/// [`start`] with the config adjusted by `tweak` (e.g. an `[llm]` section).
pub async fn start_with(
    pool: PgPool,
    limits: Option<IngestLimits>,
    tweak: impl FnOnce(&mut Config),
) -> ControlPlane {
    start_with_ca_age(pool, limits, Duration::from_secs(86_400), tweak).await
}

/// [`start_with`] with a CA created `ca_age` ago (tests that issue certificates which expired
/// days ago need an older CA).
pub async fn start_with_ca_age(
    pool: PgPool,
    limits: Option<IngestLimits>,
    ca_age: Duration,
    tweak: impl FnOnce(&mut Config),
) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    FleetCa::init(&ca_dir, SystemTime::now() - ca_age).unwrap();
    let ca_dir_s = ca_dir.to_str().unwrap().to_owned();
    let mut cfg =
        Config::load(None, |k| (k == "KIP_PKI_CA_DIR").then(|| ca_dir_s.clone())).unwrap();
    if let Some(l) = limits {
        cfg.ingest = l;
    }
    // CA rollover tests rotate the files while the control plane runs.
    cfg.pki.ca_reload_interval = Duration::from_millis(100);
    tweak(&mut cfg);
    let key_file = dir.path().join("admin.key");
    cfg.admin_key_file = key_file.clone();
    cfg.pki.crl_refresh_interval = Duration::from_secs(3600);
    cfg.shutdown_grace = Duration::from_secs(1);
    let token = CancellationToken::new();
    let cp = kip_control_plane::ControlPlane::builder(cfg)
        .pool(pool.clone())
        .admin_listener(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        .agent_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .cancellation_token(token.clone())
        .start()
        .await
        .unwrap();
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let agent_url = format!("https://127.0.0.1:{}", cp.agent_addr().unwrap().port());
    let admin_url = format!("http://{}", cp.admin_addr().unwrap());
    let tracker = cp.tracker().clone();
    crate::certs::install_crypto_provider();
    ControlPlane {
        admin_url,
        agent_url,
        admin_key,
        http: reqwest::Client::new(),
        pool,
        token,
        tracker,
        dir,
        _cp: cp,
    }
}

/// The admin API of a control plane (in-process or a child process) with the platform-admin
/// key: the calls tests make to set up a fleet.
#[derive(Debug, Clone)]
pub struct AdminApi {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub key: String,
}

impl AdminApi {
    pub fn new(url: String, key: String) -> Self {
        crate::certs::install_crypto_provider();
        Self {
            http: reqwest::Client::new(),
            url,
            key,
        }
    }

    /// POSTs `body` to `path`; panics unless the answer is 2xx.
    pub async fn admin(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn create_org(&self, name: &str) -> Uuid {
        let org = self
            .admin("/v1/organisations", json!({ "name": name }))
            .await;
        org["id"].as_str().unwrap().parse().unwrap()
    }

    /// Creates API key `name` with `role` (`org-admin`, ...) in `org`; returns the key.
    pub async fn create_key(&self, org: Uuid, name: &str, role: &str) -> String {
        self.admin(
            &format!("/v1/organisations/{org}/api-keys"),
            json!({ "name": name, "role": role }),
        )
        .await["key"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Issues a one-time enrollment token for `org`, valid for 10 minutes.
    pub async fn enroll_token(&self, org: Uuid) -> String {
        self.admin(
            &format!("/v1/organisations/{org}/enroll-tokens"),
            json!({ "ttl_s": 600 }),
        )
        .await["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Enrolls device `name` in `org` (a fresh enrollment token) and stores its identity in
    /// `dir`.
    pub async fn enroll(&self, org: Uuid, name: &str, dir: &Path) -> Identity {
        let token = self.enroll_token(org).await;
        identity::enroll(&self.http, &self.url, &token, name, None, dir)
            .await
            .unwrap()
    }

    pub async fn revoke(&self, org: Uuid, device: Uuid) {
        self.admin(
            &format!("/v1/organisations/{org}/devices/{device}/revoke"),
            json!({}),
        )
        .await;
    }

    /// `method path` with an optional JSON body; panics (with the answer) unless it is 2xx.
    /// An empty answer is `Value::Null`.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(path, req).await
    }

    /// Registers model `rul-fd001` (kind `rul`) at `version` for the artifact `bytes` (their
    /// sha256); returns the model id. The artifact is not uploaded.
    pub async fn register_model(&self, org: Uuid, version: &str, bytes: &[u8]) -> String {
        use sha2::Digest as _;
        let sha = hex::encode(sha2::Sha256::digest(bytes));
        let m = self
            .admin(
                &format!("/v1/organisations/{org}/models"),
                json!({ "name": "rul-fd001", "version": version, "kind": "rul", "artifact_sha256": sha }),
            )
            .await;
        m["id"].as_str().unwrap().to_owned()
    }

    /// Uploads the artifact of model `model` (the control plane signs it); returns the answer.
    pub async fn upload_artifact(&self, org: Uuid, model: &str, bytes: &[u8]) -> Value {
        let path = format!("/v1/organisations/{org}/models/{model}/artifact");
        let req = self
            .http
            .put(format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec());
        answer(&path, req).await
    }
}

/// Sends `req`; panics with the status and body unless it is 2xx; the JSON answer (`Null`
/// when empty).
async fn answer(path: &str, req: reqwest::RequestBuilder) -> Value {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

impl ControlPlane {
    /// Its admin API (the calls below go through it).
    pub fn api(&self) -> AdminApi {
        AdminApi {
            http: self.http.clone(),
            url: self.admin_url.clone(),
            key: self.admin_key.clone(),
        }
    }

    pub async fn admin(&self, path: &str, body: Value) -> Value {
        self.api().admin(path, body).await
    }

    pub async fn create_org(&self, name: &str) -> Uuid {
        self.api().create_org(name).await
    }

    /// Enrolls device `name` in `org` and stores its identity in `dir`.
    pub async fn enroll(&self, org: Uuid, name: &str, dir: &Path) -> Identity {
        self.api().enroll(org, name, dir).await
    }

    pub async fn revoke(&self, org: Uuid, device: Uuid) {
        self.api().revoke(org, device).await;
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Every `(epoch, seq)` the control plane stored for `device`, across the three record tables.
pub async fn stored(pool: &PgPool, device: Uuid) -> BTreeSet<(u64, u64)> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT epoch, seq FROM sensor_data WHERE device_id = $1 \
         UNION ALL SELECT epoch, seq FROM agent_events WHERE device_id = $1 \
         UNION ALL SELECT epoch, seq FROM predictions WHERE device_id = $1",
    )
    .bind(device)
    .fetch_all(pool)
    .await
    .unwrap();
    let set: BTreeSet<(u64, u64)> = rows.iter().map(|&(e, s)| (e as u64, s as u64)).collect();
    assert_eq!(set.len(), rows.len(), "a record was stored twice");
    set
}

/// Total rows of the record tables (all devices).
pub async fn total_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM sensor_data) + (SELECT count(*) FROM agent_events) \
                + (SELECT count(*) FROM predictions)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The agent listener's address.
pub fn agent_addr(cp: &ControlPlane) -> SocketAddr {
    cp.agent_url.trim_start_matches("https://").parse().unwrap()
}
