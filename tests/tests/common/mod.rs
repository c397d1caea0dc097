//! Shared pieces of the sync end-to-end tests: an in-process control plane with its real mTLS
//! agent listener, enrollment, a TCP proxy that can cut the network, and queries of what the
//! control plane stored.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "test helpers; not every test file uses every helper"
)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use kip_agent::{
    buffer::{Buffer, BufferOptions},
    config::SyncConfig,
    identity::{self, Identity},
    sync::{SyncStatus, Syncer},
};
use kip_certs::FleetCa;
use kip_control_plane::{config::Config, telemetry::IngestLimits};
use kip_shared::{Reading, Record};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{net::TcpStream, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

pub struct ControlPlane {
    pub admin_url: String,
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
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
    ControlPlane {
        _cp: cp,
        admin_url,
        agent_url,
        admin_key,
        http: reqwest::Client::new(),
        pool,
        token,
        tracker,
        dir,
    }
}

impl ControlPlane {
    pub async fn admin(&self, path: &str, body: Value) -> Value {
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

    pub async fn create_org(&self, name: &str) -> Uuid {
        let org = self
            .admin("/v1/organisations", json!({ "name": name }))
            .await;
        org["id"].as_str().unwrap().parse().unwrap()
    }

    /// Enrolls device `name` in `org` and stores its identity in `dir`.
    pub async fn enroll(&self, org: Uuid, name: &str, dir: &Path) -> Identity {
        let v = self
            .admin(
                &format!("/v1/organisations/{org}/enroll-tokens"),
                json!({ "ttl_s": 600 }),
            )
            .await;
        let token = v["token"].as_str().unwrap();
        identity::enroll(&self.http, &self.admin_url, token, name, None, dir)
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

pub fn reading(i: u64) -> Record {
    Record::Reading(Reading {
        source: "plc1".into(),
        machine: "press1".into(),
        metric: format!("m{}", i % 7),
        ts: chrono::Utc::now(),
        value: i as f64,
        quality: Default::default(),
    })
}

pub fn open_buffer(dir: &Path) -> Arc<Buffer> {
    Arc::new(Buffer::open(dir, BufferOptions::with_max_bytes(256 << 20)).unwrap())
}

/// Sync settings for tests: small batches, short timeouts, quick backoff.
pub fn sync_config(endpoints: Vec<String>) -> SyncConfig {
    SyncConfig {
        endpoints,
        batch_max_records: 200,
        batch_max_bytes: 1 << 20,
        interval: Duration::from_millis(20),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        request_timeout: Duration::from_millis(1500),
    }
}

/// A running sync loop.
pub struct RunningSync {
    pub status: Arc<SyncStatus>,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// Keeps the identity channel open (as the renewer would).
    _tls: watch::Sender<Arc<kip_certs::rustls::ClientConfig>>,
}

impl RunningSync {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn metrics(&self) -> String {
        kip_agent::metrics::render(&self.registry.lock().unwrap())
    }
}

pub fn start_sync(buffer: Arc<Buffer>, id: &Identity, cfg: SyncConfig) -> RunningSync {
    let (tx, rx) = watch::channel(id.client_config().unwrap());
    let mut registry = kip_agent::metrics::new_registry();
    let syncer = Syncer::new(buffer, cfg, rx, &mut registry).unwrap();
    let status = syncer.status();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));
    RunningSync {
        status,
        registry: Arc::new(std::sync::Mutex::new(registry)),
        cancel,
        tracker,
        _tls: tx,
    }
}

/// A running agent: renewer and sync loop wired as in `kip-agent run` (bundle fingerprint
/// reported, CA-rollover hints from the ack passed to the renewer).
pub struct RunningAgent {
    pub status: Arc<SyncStatus>,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    pub handle: identity::IdentityHandle,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

impl RunningAgent {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn metrics(&self) -> String {
        kip_agent::metrics::render(&self.registry.lock().unwrap())
    }
}

pub fn start_agent(
    buffer: Arc<Buffer>,
    id: Identity,
    identity_dir: &Path,
    agent_url: &str,
    policy: identity::RenewalPolicy,
    cfg: SyncConfig,
) -> RunningAgent {
    let (renewer, handle) =
        identity::Renewer::new(id, identity_dir.to_owned(), agent_url.to_owned(), policy).unwrap();
    let mut registry = kip_agent::metrics::new_registry();
    let syncer = Syncer::new(buffer, cfg, handle.client_config.clone(), &mut registry)
        .unwrap()
        .with_identity_hints(handle.hints.clone());
    let status = syncer.status();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(renewer.run(cancel.clone()));
    tracker.spawn(syncer.run(cancel.clone()));
    RunningAgent {
        status,
        registry: Arc::new(std::sync::Mutex::new(registry)),
        handle,
        cancel,
        tracker,
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forward both ways.
    Up,
    /// Close every connection at once (connection refused/reset).
    Drop,
    /// Accept and keep connections but forward nothing (a silent network).
    Blackhole,
}

/// A TCP proxy in front of `upstream` whose link can be cut.
pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn hold_until_up(mut link: watch::Receiver<Link>, stop: CancellationToken) {
    tokio::select! {
        _ = link.wait_for(|l| *l != Link::Blackhole) => {}
        () = stop.cancelled() => {}
    }
}

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
    stop: CancellationToken,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = link.wait_for(|l| *l != Link::Up) => {}
        () = stop.cancelled() => return,
    }
    if *link.borrow() == Link::Blackhole {
        // Keep both sockets open, forwarding nothing, until the link changes.
        hold_until_up(link, stop).await;
    }
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, rx) = watch::channel(Link::Up);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let t = tracker.clone();
        let s = stop.clone();
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = s.cancelled() => return,
                };
                let Ok((sock, _)) = accepted else { continue };
                let mode = *rx.borrow();
                match mode {
                    Link::Drop => drop(sock),
                    Link::Blackhole => {
                        let (rx, s) = (rx.clone(), s.clone());
                        t.spawn(async move {
                            let _sock = sock;
                            hold_until_up(rx, s).await;
                        });
                    }
                    Link::Up => {
                        t.spawn(pipe(sock, upstream, rx.clone(), s.clone()));
                    }
                }
            }
        });
        Self {
            addr,
            link,
            tracker,
            stop,
        }
    }

    pub fn set(&self, l: Link) {
        self.link.send_replace(l);
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

pub fn agent_addr(cp: &ControlPlane) -> SocketAddr {
    cp.agent_url.trim_start_matches("https://").parse().unwrap()
}
