//! Agent pieces for sync tests, wired as `kip-agent run` wires them: a sled buffer, synthetic
//! readings, a sync loop ([`start_sync`]) and a renewer plus sync loop ([`start_agent`]).
//! Both run on their own tracker; `stop()` cancels and waits for them.

use std::{path::Path, sync::Arc, time::Duration};

use kip_agent::{
    buffer::{Buffer, BufferOptions},
    config::SyncConfig,
    identity::{self, Identity},
    sync::{SyncStatus, Syncer},
};
use kip_shared::{Reading, Record};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Reading number `i` of machine `press1` (metric `m{i % 7}`, value `i`, timestamped now).
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

/// A buffer in `dir` with room for 256 MiB.
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
        heartbeat_interval: Duration::from_secs(60),
        probe_interval: None,
        // The production default: the end-to-end tests exercise the pipelined drain.
        max_in_flight_batches: 4,
    }
}

/// A running sync loop.
#[derive(Debug)]
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

/// Starts a sync loop over `buffer` presenting `id`'s certificate.
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
#[derive(Debug)]
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
