//! OPC UA ingest: one [`OpcUaSource`] per configured server endpoint subscribes to the
//! configured nodes and turns data-change notifications into [`Record`]s.
//!
//! Invariants:
//! - [`OpcUaSource::run`] never gives up: every failure (refused connection, session or
//!   subscription loss, server restart, silent subscription death) ends the current session
//!   and a completely new client session, subscription and monitored items are created after
//!   an exponential backoff with jitter. We do not rely on the library's own session
//!   reactivation or subscription transfer, because a restarted server knows neither.
//! - While waiting to reconnect, the server's port is probed with a TCP connect every
//!   `reconnect_probe_interval_ms` ([`crate::sync_probe`]); a server seen down during the wait
//!   and then accepting connections ends the wait, so a restarted server is back within about
//!   that interval instead of after the grown backoff. A server that accepts TCP but refuses
//!   the session does not shorten the wait (no transition), so it is not hammered.
//! - Redundant servers (`failover_urls`): after a lost session or a failed connect, the next
//!   attempt goes to the next server of `url`, `failover_urls...` (wrapping). The gap record
//!   of the outage spans the failover, and the initial values of the new server's
//!   subscription that repeat the last stored value of a node (same source timestamp and
//!   value) are not stored again (see [`LastValues`]); values the servers stamp differently
//!   are distinct readings.
//! - After any outage that follows an established session, a [`Record::Gap`] from the last
//!   moment the subscription was known alive (its last publish response) to the moment the new
//!   session is connected is sent before any record of the new session, so downstream knows
//!   data is missing.
//! - Nothing disappears silently: values that cannot become a reading (non-numeric, non-finite,
//!   a bad status without value) and nodes the server rejects become [`Record::DeadLetter`]s,
//!   and the remaining nodes keep flowing.
//! - Monitored items are created at most [`MAX_ITEMS_PER_SUBSCRIPTION`] per call and per
//!   subscription, and the client's `max_array_length` is raised, because larger requests fail
//!   with a decoding error and a closed transport on common servers.
//! - Backpressure never stops the session: the OPC UA event loop (publish requests, keep-alives,
//!   session renewal) is polled first, whatever the writer's state, and records move to the
//!   writer's channel in batches as room appears, without blocking that loop. Notifications go into a bounded
//!   queue ([`INTERNAL_QUEUE`]); while the writer applies backpressure long enough for it to
//!   fill, further notifications are dropped (OPC UA subscriptions cannot redeliver), counted
//!   (`kip_opcua_notifications_dropped`), and once the queue has room again a [`Record::Gap`]
//!   states what is lost: how many value changes, of which nodes, between which times.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use kip_shared::record::DEAD_LETTER_PREFIX_BYTES;
use kip_shared::{DeadLetter, Gap, Quality, Reading, Record};

use crate::source::{Envelope, Sink, Source, SourceKind, SourceTask};
use kip_shared::backoff::Backoff;
use opcua::client::{
    ClientBuilder, IdentityToken, Session, SessionPollResult, SubscriptionActivity,
    SubscriptionCallbacks,
};
use opcua::crypto::{CertificateStore, SecurityPolicy, X509Data};
use opcua::types::{
    AttributeId, DataValue, Identifier, MessageSecurityMode, MonitoredItemCreateRequest,
    MonitoringMode, MonitoringParameters, NodeId, QualifiedName, ReadValueId, StatusCode,
    TimestampsToReturn, UserTokenPolicy, Variant,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Most monitored items created in one call and held by one subscription.
pub const MAX_ITEMS_PER_SUBSCRIPTION: usize = 1000;

/// Set-up requests (attribute reads, subscription with its monitored items) in flight at once.
const SETUP_CONCURRENCY: usize = 4;
/// Raised client decoding limit for arrays (the default makes 1000-item responses fail).
const MAX_ARRAY_LENGTH: usize = 100_000;
/// Notifications the server may put into one publish response; the internal queue keeps
/// room for at least this many before the event loop is polled again.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 1000;
/// Capacity of the queue between the OPC UA callbacks and `run`.
const INTERNAL_QUEUE: usize = 4 * MAX_NOTIFICATIONS_PER_PUBLISH as usize;
/// Most records moved from that queue to the writer's channel in one pass of the session loop
/// (the outbox holds at most this many plus gaps and the session's dead letters).
const HANDOVER_BATCH: usize = MAX_NOTIFICATIONS_PER_PUBLISH as usize;
/// Server-side queue per monitored item, so changes between two publishes are not lost.
const ITEM_QUEUE_SIZE: u32 = 10;
/// Publishing intervals without data after which the server sends a keep-alive.
const KEEP_ALIVE_COUNT: u32 = 10;
/// Lifetime in publishing intervals after which the server deletes an unattended subscription.
const LIFETIME_COUNT: u32 = 3 * KEEP_ALIVE_COUNT;
/// Upper bound for one connect / session setup attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean session close may take before the connection is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest silence on a subscription after which it is considered dead.
const MIN_WATCHDOG: Duration = Duration::from_secs(10);
/// Validity of a generated client certificate.
const OWN_CERT_DAYS: u32 = 5 * 365;

pub use kip_agent_config::opcua::{
    OpcUaConfigError, OpcUaEndpointConfig, OpcUaNodeConfig, OpcUaSecurityPolicy, OpcUaUserIdentity,
};

/// The library's policy and mode for a configured [`OpcUaSecurityPolicy`].
trait SecurityPolicyExt {
    fn policy(self) -> SecurityPolicy;
    fn mode(self) -> MessageSecurityMode;
}

impl SecurityPolicyExt for OpcUaSecurityPolicy {
    fn policy(self) -> SecurityPolicy {
        match self {
            Self::None => SecurityPolicy::None,
            Self::Basic256Sha256 => SecurityPolicy::Basic256Sha256,
        }
    }

    fn mode(self) -> MessageSecurityMode {
        match self {
            Self::None => MessageSecurityMode::None,
            Self::Basic256Sha256 => MessageSecurityMode::SignAndEncrypt,
        }
    }
}

/// The token for `ActivateSession` of `identity`, reading the secret files now (so a rotated
/// file takes effect on reconnect).
fn user_token(identity: &OpcUaUserIdentity) -> Result<IdentityToken, String> {
    Ok(match identity {
        OpcUaUserIdentity::Anonymous => IdentityToken::Anonymous,
        OpcUaUserIdentity::Username {
            username,
            password_file,
        } => {
            let pw = std::fs::read_to_string(password_file).map_err(|e| {
                format!(
                    "user_identity.password_file {}: {e}",
                    password_file.display()
                )
            })?;
            IdentityToken::new_user_name(
                username.clone(),
                pw.trim_end_matches(['\r', '\n']).to_owned(),
            )
        }
        OpcUaUserIdentity::X509 {
            cert_file,
            key_file,
        } => {
            let bytes = std::fs::read(cert_file)
                .map_err(|e| format!("user_identity.cert_file {}: {e}", cert_file.display()))?;
            let cert = opcua::crypto::X509::from_pem(&bytes)
                .or_else(|_| opcua::crypto::X509::from_der(&bytes))
                .map_err(|e| format!("user_identity.cert_file {}: {e}", cert_file.display()))?;
            let key = opcua::crypto::PrivateKey::read_pem_file(key_file)
                .map_err(|e| format!("user_identity.key_file {}: {e}", key_file.display()))?;
            IdentityToken::new_x509(cert, key)
        }
    })
}

/// Creating the agent's own OPC UA certificate (needs the OPC UA crypto library, so it lives
/// with the source, not with the configuration types).
pub trait OwnCertificate {
    /// Makes sure the agent's own certificate and private key exist in `pki_dir` (see the
    /// implementation on [`OpcUaEndpointConfig`]).
    fn ensure_own_certificate(&self) -> Result<PathBuf, String>;
}

impl OwnCertificate for OpcUaEndpointConfig {
    /// Makes sure the agent's own certificate and private key exist in `pki_dir`, creating an
    /// RSA 2048 self-signed pair (first SAN = ApplicationUri, then localhost and this host's
    /// name) when both are missing. Returns the certificate path, the file an operator adds
    /// to the server's trust list.
    fn ensure_own_certificate(&self) -> Result<PathBuf, String> {
        let store = CertificateStore::new(&self.pki_dir);
        store
            .ensure_pki_path()
            .map_err(|e| format!("pki_dir {}: {e}", self.pki_dir.display()))?;
        let cert = store.own_certificate_path();
        let key = store.own_private_key_path();
        match (cert.exists(), key.exists()) {
            (true, true) => return Ok(cert),
            (true, false) | (false, true) => {
                return Err(format!(
                    "pki_dir {}: only one of own/cert.der and private/private.pem exists",
                    self.pki_dir.display()
                ));
            }
            (false, false) => {}
        }
        let uri = self.application_uri();
        let data = X509Data {
            key_size: 2048,
            common_name: format!("kip-agent {}", self.name),
            organization: "kip".into(),
            organizational_unit: "agent".into(),
            country: "DE".into(),
            state: String::new(),
            alt_host_names: X509Data::alt_host_names(uri, None, true, true, false),
            certificate_duration_days: OWN_CERT_DAYS,
        };
        store
            .create_and_store_application_instance_cert(&data, false)
            .map_err(|e| {
                format!(
                    "creating own certificate in {}: {e}",
                    self.pki_dir.display()
                )
            })?;
        restrict_permissions(&key)?;
        info!(source = %self.name, cert = %cert.display(), "created OPC UA client certificate; add it to the server's trusted certificates");
        Ok(cert)
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 600 {}: {e}", path.display()))
}

#[cfg(not(unix))]
fn restrict_permissions(_path: &Path) -> Result<(), String> {
    Ok(())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MetricLabels {
    source: String,
    metric: String,
}

/// Prometheus metrics of OPC UA sources, labelled by source (and metric).
///
/// Register once per registry and share between sources ([`OpcUaSource::with_metrics`]) when
/// an agent has several endpoints, so each metric family appears only once.
#[derive(Debug, Clone, Default)]
pub struct OpcUaMetrics {
    notifications: Family<MetricLabels, Counter>,
    readings: Family<MetricLabels, Counter>,
    dead_letters: Family<SourceLabels, Counter>,
    bad_nodes: Family<SourceLabels, Gauge>,
    reconnects: Family<SourceLabels, Counter>,
    gaps: Family<SourceLabels, Counter>,
    connected: Family<SourceLabels, Gauge>,
    duplicates: Family<SourceLabels, Counter>,
    dropped: Family<SourceLabels, Counter>,
    probe_recoveries: Family<SourceLabels, Counter>,
}

/// Host and port of an `opc.tcp://host[:port]/path` URL (port 4840 when absent).
fn server_address(url: &str) -> Option<(String, u16)> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), u.port().unwrap_or(4840)))
}

impl OpcUaMetrics {
    /// Whether source `name` holds a session with a live subscription now.
    pub fn is_connected(&self, name: &str) -> bool {
        self.connected
            .get_or_create(&SourceLabels {
                source: name.to_owned(),
            })
            .get()
            == 1
    }

    /// Creates the metric families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kip_opcua_reconnect_probe_recoveries",
            "Reconnect waits ended early because the server, seen down, accepted connections again",
            m.probe_recoveries.clone(),
        );
        registry.register(
            "kip_opcua_notifications",
            "OPC UA data-change notifications received",
            m.notifications.clone(),
        );
        registry.register(
            "kip_opcua_duplicates_skipped",
            "OPC UA values not stored again: same node, source timestamp and value as the last \
             one stored (initial values after a reconnect re-created the subscriptions)",
            m.duplicates.clone(),
        );
        registry.register(
            "kip_opcua_readings",
            "OPC UA notifications turned into readings",
            m.readings.clone(),
        );
        registry.register(
            "kip_opcua_dead_letters",
            "OPC UA values or nodes turned into dead letters",
            m.dead_letters.clone(),
        );
        registry.register(
            "kip_opcua_bad_nodes",
            "Configured OPC UA nodes the server rejected in the current session",
            m.bad_nodes.clone(),
        );
        registry.register(
            "kip_opcua_reconnects",
            "OPC UA sessions re-established after a loss",
            m.reconnects.clone(),
        );
        registry.register(
            "kip_opcua_gaps",
            "Gap records emitted by OPC UA sources",
            m.gaps.clone(),
        );
        registry.register(
            "kip_opcua_notifications_dropped",
            "OPC UA notifications dropped while the agent's buffer applied backpressure (the \
             ingest queue was full); each span is written as a gap record",
            m.dropped.clone(),
        );
        registry.register(
            "kip_opcua_connected",
            "1 while the OPC UA source has a live session with its subscriptions",
            m.connected.clone(),
        );
        m
    }
}

/// What the callbacks need to know about one monitored item (indexed by client handle - 1).
/// The per-metric counters are looked up once at set-up, not per value.
#[derive(Debug, Clone)]
struct Item {
    node_id: String,
    machine: String,
    metric: String,
    notifications: Counter,
    readings: Counter,
}

impl Source for OpcUaSource {
    fn name(&self) -> &str {
        &self.cfg.name
    }
    fn kind(&self) -> SourceKind {
        SourceKind::OpcUa
    }
    fn run(self: Box<Self>, sink: Sink, cancel: CancellationToken) -> SourceTask {
        Box::pin(OpcUaSource::run(*self, sink, cancel))
    }
}

/// What a reconnect gap may have lost: subscriptions cannot redeliver, so only the current
/// value at reconnect comes back (and is stored only if it differs from the last stored one).
const GAP_LOSS: &str = "value changes between from and to that were not the current value at \
                        reconnect are lost; the current values were re-read (repeats of the \
                        last stored value skipped)";

/// Subscribes to one OPC UA server and emits readings, gaps and dead letters.
#[derive(Debug)]
pub struct OpcUaSource {
    cfg: OpcUaEndpointConfig,
    metrics: OpcUaMetrics,
    /// Last value stored per (machine, metric), i.e. per configured node: bounded by the
    /// node list. Never held across an await.
    last: std::sync::Mutex<LastValues>,
}

/// The last (source timestamp, value, quality) stored per node, so that the initial values a
/// server sends for re-created monitored items are not stored a second time.
///
/// Keyed machine, then metric, so that the check of every value looks up by `&str` without
/// allocating; names are copied only when a node is seen first.
#[derive(Debug, Default)]
pub struct LastValues {
    map: std::collections::HashMap<String, std::collections::HashMap<String, LastValue>>,
    nodes: usize,
    limit: usize,
}

type LastValue = (DateTime<Utc>, u64, Quality);

impl LastValues {
    /// Remembers at most `limit` nodes (the configured node count).
    pub fn new(limit: usize) -> Self {
        Self {
            map: std::collections::HashMap::new(),
            nodes: 0,
            limit,
        }
    }

    /// True when `r` repeats the last value stored for its node; otherwise remembers it.
    pub fn is_repeat(&mut self, r: &Reading) -> bool {
        let value = (r.ts, r.value.to_bits(), r.quality);
        if let Some(last) = self
            .map
            .get_mut(r.machine.as_str())
            .and_then(|m| m.get_mut(r.metric.as_str()))
        {
            if *last == value {
                return true;
            }
            *last = value;
            return false;
        }
        if self.nodes < self.limit {
            self.map
                .entry(r.machine.clone())
                .or_default()
                .insert(r.metric.clone(), value);
            self.nodes += 1;
        }
        false
    }
}

/// Why one session ended.
enum SessionEnd {
    /// Cancelled, or nobody listens any more: stop.
    Stop,
    /// The session ended. `established`: since when data is missing, if a gap is owed;
    /// `healthy`: the session was fully set up (resets the backoff).
    Lost {
        reason: String,
        established: Option<DateTime<Utc>>,
        healthy: bool,
    },
}

/// The span of missing data that the next successful session closes with a gap.
struct Outage {
    from: DateTime<Utc>,
    reason: String,
    failed_attempts: u32,
}

impl OpcUaSource {
    /// Creates the source and registers its metrics in `registry`.
    pub fn new(cfg: OpcUaEndpointConfig, registry: &mut Registry) -> Self {
        Self::with_metrics(cfg, OpcUaMetrics::register(registry))
    }

    /// Creates the source with already registered (shared) metrics.
    pub fn with_metrics(cfg: OpcUaEndpointConfig, metrics: OpcUaMetrics) -> Self {
        let last = std::sync::Mutex::new(LastValues::new(cfg.nodes.len()));
        Self { cfg, metrics, last }
    }

    /// False when `record` repeats the node's last stored value (counted, not stored again).
    fn fresh(&self, record: &Record) -> bool {
        if let Record::Reading(r) = record {
            let repeat = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_repeat(r);
            if repeat {
                self.metrics.duplicates.get_or_create(&self.labels()).inc();
                return false;
            }
        }
        true
    }

    /// Hands `record` to the writer unless it repeats the node's last stored value, waiting
    /// for room; false when the writer is gone. Only for a session being given up: a live
    /// session queues in its outbox instead, so its event loop keeps being polled.
    async fn forward(&self, tx: &Sink, record: Record) -> bool {
        if !self.fresh(&record) {
            return true;
        }
        tx.send(Envelope::plain(record)).await.is_ok()
    }

    fn labels(&self) -> SourceLabels {
        SourceLabels {
            source: self.cfg.name.clone(),
        }
    }

    /// Runs until `cancel` fires, reconnecting forever. Records go to `tx`.
    pub async fn run(self, tx: Sink, cancel: CancellationToken) {
        let mut outage: Option<Outage> = None;
        let mut attempt: u32 = 0;
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        let connected = self.metrics.connected.get_or_create(&self.labels()).clone();
        let servers: Vec<&str> = std::iter::once(self.cfg.url.as_str())
            .chain(self.cfg.failover_urls.iter().map(String::as_str))
            .collect();
        let mut server = 0usize;
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let url = servers
                .get(server)
                .copied()
                .unwrap_or(self.cfg.url.as_str());
            let end = self.session(url, &tx, &cancel, &mut outage).await;
            connected.set(0);
            match end {
                SessionEnd::Stop => break,
                SessionEnd::Lost {
                    reason,
                    established,
                    healthy,
                } => {
                    if healthy {
                        attempt = 0;
                        backoff.reset();
                    }
                    if servers.len() > 1 {
                        server = (server + 1) % servers.len();
                        warn!(source = %self.cfg.name, from = url,
                            to = servers.get(server).copied().unwrap_or_default(),
                            "OPC UA failover: the next attempt goes to the next server");
                    }
                    if let Some(last_alive) = established {
                        warn!(source = %self.cfg.name, %reason, "OPC UA session lost, reconnecting");
                        outage = Some(Outage {
                            from: last_alive,
                            reason,
                            failed_attempts: 0,
                        });
                    } else {
                        warn!(source = %self.cfg.name, %reason, attempt, "OPC UA connect failed");
                        if let Some(o) = outage.as_mut() {
                            o.failed_attempts = o.failed_attempts.saturating_add(1);
                        }
                    }
                }
            }
            let delay = backoff.next_delay();
            attempt = attempt.saturating_add(1);
            let probe = Duration::from_millis(self.cfg.reconnect_probe_interval_ms);
            let target = server_address(servers.get(server).copied().unwrap_or_default());
            match target {
                Some((host, port)) if !probe.is_zero() && delay > probe => {
                    let end = tokio::select! {
                        () = cancel.cancelled() => break,
                        end = crate::sync_probe::wait_with(delay, 1, probe, |_, t| {
                            let host = host.clone();
                            async move { crate::sync_probe::tcp_connect(&host, port, t).await }
                        }) => end,
                    };
                    if let crate::sync_probe::WaitEnd::Reachable(_) = end {
                        info!(source = %self.cfg.name, "OPC UA server accepts connections again; reconnecting now");
                        self.metrics
                            .probe_recoveries
                            .get_or_create(&self.labels())
                            .inc();
                    }
                }
                _ => {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        info!(source = %self.cfg.name, "OPC UA source stopped");
    }

    /// One client session from connect to loss. Closes `outage` with a gap once the new
    /// monitored items exist.
    async fn session(
        &self,
        url: &str,
        tx: &Sink,
        cancel: &CancellationToken,
        outage: &mut Option<Outage>,
    ) -> SessionEnd {
        let lost = |reason: String| SessionEnd::Lost {
            reason,
            established: None,
            healthy: false,
        };
        if let Err(e) = self.prepare_pki() {
            return lost(e);
        }
        let mut client = match self.client_builder().client() {
            Ok(c) => c,
            Err(errors) => return lost(format!("invalid client config: {}", errors.join("; "))),
        };
        let sec = self.cfg.security_policy;
        let endpoint = (
            url,
            sec.policy().to_str(),
            sec.mode(),
            UserTokenPolicy::anonymous(),
        );
        let identity = match user_token(&self.cfg.user_identity) {
            Ok(t) => t,
            Err(e) => return lost(e),
        };
        let connect = client.connect_to_matching_endpoint(endpoint, identity);
        let (session, event_loop) = tokio::select! {
            () = cancel.cancelled() => return SessionEnd::Stop,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return lost(format!("connect: {e}")),
                Err(_) => return lost("connect: timed out".into()),
            },
        };
        let mut events = pin!(event_loop.enter());

        // Every request needs the event loop polled concurrently: it carries the messages.
        let mut connected = pin!(session.wait_for_connection());
        let ok = loop {
            tokio::select! {
                () = cancel.cancelled() => return SessionEnd::Stop,
                ok = &mut connected => break ok,
                ev = events.next() => {
                    if let Some(reason) = fatal_event(ev) {
                        return lost(reason);
                    }
                }
            }
        };
        if !ok {
            return lost("session did not connect".into());
        }
        let connected_at = Utc::now();
        let labels = self.labels();

        // Records waiting for room in the writer's channel, handed over as room appears without
        // blocking the event loop; at most one batch taken from the queue ([`HANDOVER_BATCH`])
        // plus gaps and the session's dead letters.
        let mut out: VecDeque<Record> = VecDeque::new();
        // The gap goes out before anything of the new session, so it precedes its readings.
        let gap_sent = outage.is_some();
        if let Some(o) = outage.take() {
            self.metrics.reconnects.get_or_create(&labels).inc();
            self.metrics.gaps.get_or_create(&labels).inc();
            let reason = if o.failed_attempts > 0 {
                format!(
                    "{}; reconnected after {} failed attempts; {GAP_LOSS}",
                    o.reason, o.failed_attempts
                )
            } else {
                format!("{}; reconnected; {GAP_LOSS}", o.reason)
            };
            out.push_back(Record::Gap(Gap {
                source: self.cfg.name.clone(),
                from: o.from.min(connected_at),
                to: connected_at,
                reason,
            }));
        }
        // Once a gap was sent, a failure from here on starts a new outage at `connected_at`.
        let lost_after_connect = |reason: String| SessionEnd::Lost {
            reason,
            established: gap_sent.then_some(connected_at),
            healthy: false,
        };

        let (item_tx, mut item_rx) = mpsc::channel::<Record>(INTERNAL_QUEUE);
        let (status_tx, mut status_rx) = mpsc::channel::<StatusCode>(4);
        let overflow = Arc::new(Overflow::default());
        let headroom = MAX_NOTIFICATIONS_PER_PUBLISH as usize;

        // Initial values arrive while later chunks are still being created: forward them.
        let setup = self.setup(&session, &item_tx, &status_tx, &overflow);
        let mut setup = pin!(tokio::time::timeout(
            setup_timeout(self.cfg.nodes.len()),
            setup
        ));
        let setup_result = loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    close_session(&session, &mut events).await;
                    return SessionEnd::Stop;
                }
                // First the event loop: it carries the set-up requests and the publish
                // responses; records wait in `item_rx` meanwhile.
                ev = events.next() => {
                    if let Some(reason) = fatal_event(ev) {
                        return lost_after_connect(reason);
                    }
                }
                permit = tx.reserve(), if !out.is_empty() => match permit {
                    Ok(p) => hand_over(p, tx, &mut out),
                    Err(_) => return self.downstream_closed(cancel, &session, &mut events).await,
                },
                Some(rec) = item_rx.recv(), if out.is_empty() => self.take_batch(rec, &mut item_rx, &mut out),
                r = &mut setup => break r,
            }
        };
        let bad = match setup_result {
            Ok(Ok(bad)) => bad,
            Ok(Err(reason)) => {
                close_session(&session, &mut events).await;
                return lost_after_connect(reason);
            }
            Err(_) => {
                close_session(&session, &mut events).await;
                return lost_after_connect("session set-up timed out".into());
            }
        };
        let now = Utc::now();
        self.metrics
            .bad_nodes
            .get_or_create(&labels)
            .set(i64::try_from(bad.len()).unwrap_or(i64::MAX));
        self.metrics.connected.get_or_create(&labels).set(1);
        info!(
            source = %self.cfg.name,
            nodes = self.cfg.nodes.len().saturating_sub(bad.len()),
            bad_nodes = bad.len(),
            "OPC UA session established"
        );
        for (node_id, reason) in bad {
            warn!(source = %self.cfg.name, node_id, %reason, "OPC UA node skipped");
            self.metrics.dead_letters.get_or_create(&labels).inc();
            out.push_back(dead_letter(&self.cfg.name, &node_id, reason, &[], now));
        }

        let watchdog = watchdog_period(self.cfg.publishing_interval_ms);
        let mut silence = pin!(tokio::time::sleep(watchdog));
        let mut last_alive_utc = now;
        loop {
            let end = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    close_session(&session, &mut events).await;
                    return SessionEnd::Stop;
                }
                // Polled first and whatever the writer's state: publish requests go out as
                // soon as responses come in (the server can only send as many notifications
                // as it holds requests for), and keep-alives keep the session alive under
                // backpressure. Polling it only when no record waits starved it.
                ev = events.next() => match ev {
                    Some(Ok(SessionPollResult::Subscription(SubscriptionActivity::Publish))) => {
                        silence.as_mut().reset(tokio::time::Instant::now() + watchdog);
                        last_alive_utc = Utc::now();
                        None
                    }
                    Some(Ok(SessionPollResult::Subscription(
                        SubscriptionActivity::PublishFailed(code),
                    ))) if subscription_gone(code) => Some(format!("publish failed: {code}")),
                    other => fatal_event(other),
                },
                permit = tx.reserve(), if !out.is_empty() => match permit {
                    Ok(p) => {
                        hand_over(p, tx, &mut out);
                        None
                    }
                    Err(_) => return self.downstream_closed(cancel, &session, &mut events).await,
                },
                Some(rec) = item_rx.recv(), if out.is_empty() => {
                    self.take_batch(rec, &mut item_rx, &mut out);
                    None
                }
                Some(code) = status_rx.recv() => Some(format!("subscription status changed: {code}")),
                () = &mut silence => Some(format!(
                    "no publish response for {} ms", watchdog.as_millis()
                )),
            };
            // An overflow is over once the queue has room for a whole publish response again.
            if item_tx.capacity() >= headroom
                && let Some(gap) = overflow.take_gap(&self.cfg.name)
            {
                self.metrics.gaps.get_or_create(&labels).inc();
                out.push_back(gap);
            }
            if let Some(reason) = end {
                // Deliver what was already received before giving up the session.
                for rec in std::mem::take(&mut out) {
                    if tx.send(Envelope::plain(rec)).await.is_err() {
                        break;
                    }
                }
                while let Ok(rec) = item_rx.try_recv() {
                    if !self.forward(tx, rec).await {
                        break;
                    }
                }
                // An overflow not reported yet is reported now, not folded into the next gap.
                if let Some(gap) = overflow.take_gap(&self.cfg.name) {
                    self.metrics.gaps.get_or_create(&labels).inc();
                    let _ = self.forward(tx, gap).await;
                }
                close_session(&session, &mut events).await;
                return SessionEnd::Lost {
                    reason,
                    established: Some(last_alive_utc),
                    healthy: true,
                };
            }
        }
    }

    /// Nobody consumes records any more: there is nothing useful left to do but wait to be
    /// cancelled, as `run` promises not to return before that.
    async fn downstream_closed<S>(
        &self,
        cancel: &CancellationToken,
        session: &Session,
        events: &mut S,
    ) -> SessionEnd
    where
        S: futures_util::Stream + Unpin,
    {
        error!(source = %self.cfg.name, "record channel closed; OPC UA source idles until cancelled");
        close_session(session, events).await;
        cancel.cancelled().await;
        SessionEnd::Stop
    }

    /// Moves `first` and what else waits in `item_rx` (at most [`HANDOVER_BATCH`] records)
    /// into `out`, skipping repeats of a node's last stored value: one pass of the session
    /// loop per batch, not per record.
    fn take_batch(
        &self,
        first: Record,
        item_rx: &mut mpsc::Receiver<Record>,
        out: &mut VecDeque<Record>,
    ) {
        let mut next = Some(first);
        let mut taken = 0usize;
        while let Some(rec) = next.take() {
            if self.fresh(&rec) {
                out.push_back(rec);
            }
            taken += 1;
            if taken < HANDOVER_BATCH {
                next = item_rx.try_recv().ok();
            }
        }
    }

    fn client_builder(&self) -> ClientBuilder {
        ClientBuilder::new()
            .application_name(format!("kip-agent {}", self.cfg.name))
            .application_uri(self.cfg.application_uri())
            .product_uri("urn:kip:agent")
            .pki_dir(&self.cfg.pki_dir)
            // The own certificate is made by `ensure_own_certificate`, with our SANs.
            .create_sample_keypair(false)
            .trust_server_certs(false)
            .verify_server_certs(true)
            // Reconnects are done here, with a fresh session each time.
            .session_retry_limit(0)
            .keep_alive_interval(Duration::from_secs(5))
            .max_failed_keep_alive_count(3)
            .request_timeout(Duration::from_secs(10))
            .max_array_length(MAX_ARRAY_LENGTH)
            .session_name(format!("kip-agent {}", self.cfg.name))
    }

    /// Creates the PKI layout and copies the configured server certificates into `trusted/`.
    fn prepare_pki(&self) -> Result<(), String> {
        let store = CertificateStore::new(&self.cfg.pki_dir);
        store
            .ensure_pki_path()
            .map_err(|e| format!("pki_dir {}: {e}", self.cfg.pki_dir.display()))?;
        for path in &self.cfg.trust_server_certs {
            trust_cert(&store, path)?;
        }
        // Only an encrypted endpoint needs the agent's own certificate.
        if self.cfg.security_policy != OpcUaSecurityPolicy::None {
            self.cfg.ensure_own_certificate()?;
        }
        Ok(())
    }

    /// Creates subscriptions and monitored items; returns the rejected nodes with reasons.
    async fn setup(
        &self,
        session: &Arc<Session>,
        item_tx: &mpsc::Sender<Record>,
        status_tx: &mpsc::Sender<StatusCode>,
        overflow: &Arc<Overflow>,
    ) -> Result<Vec<(String, String)>, String> {
        let mut bad = Vec::new();
        let mut parsed = Vec::new();
        for node in &self.cfg.nodes {
            match NodeId::from_str(node.node_id.trim()) {
                Ok(id) => parsed.push((node, id)),
                Err(e) => bad.push((node.node_id.clone(), format!("invalid node id: {e}"))),
            }
        }
        // Nonexistent nodes and nodes of a non-numeric type are skipped up front: many
        // servers accept a monitored item for any node id and only report the problem later.
        let verdicts = check_nodes(session, parsed.iter().map(|(_, id)| id)).await?;
        let mut requests = Vec::new();
        let mut items = Vec::new();
        for ((node, node_id), verdict) in parsed.into_iter().zip(verdicts) {
            if let Err(reason) = verdict {
                bad.push((node.node_id.clone(), reason));
                continue;
            }
            let Ok(handle) = u32::try_from(items.len() + 1) else {
                bad.push((node.node_id.clone(), "too many nodes".into()));
                continue;
            };
            let sampling = node.sampling_interval_ms.map_or(-1.0, |ms| ms as f64);
            requests.push(MonitoredItemCreateRequest::new(
                node_id.into(),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    client_handle: handle,
                    sampling_interval: sampling,
                    queue_size: ITEM_QUEUE_SIZE,
                    discard_oldest: true,
                    ..Default::default()
                },
            ));
            let labels = MetricLabels {
                source: self.cfg.name.clone(),
                metric: node.metric.clone(),
            };
            items.push(Item {
                node_id: node.node_id.clone(),
                machine: node.machine.clone(),
                metric: node.metric.clone(),
                notifications: self.metrics.notifications.get_or_create(&labels).clone(),
                readings: self.metrics.readings.get_or_create(&labels).clone(),
            });
        }
        let items = Arc::new(items);

        let mut chunks = Vec::new();
        while !requests.is_empty() {
            let rest = requests.split_off(requests.len().min(MAX_ITEMS_PER_SUBSCRIPTION));
            chunks.push(std::mem::replace(&mut requests, rest));
        }
        // Chunks are created SETUP_CONCURRENCY at a time: one request after the other left the
        // connection idle for a round trip per chunk.
        // The futures are made up front (they do nothing until polled): a lazy `map` closure
        // over borrowed state makes the future not `Send` (rust-lang/rust#102211).
        let mut pending = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            pending.push(self.create_chunk(session, chunk, &items, item_tx, status_tx, overflow));
        }
        let created: Vec<Result<Vec<(String, String)>, String>> =
            futures_util::stream::iter(pending)
                .buffer_unordered(SETUP_CONCURRENCY)
                .collect()
                .await;
        for rejected in created {
            bad.extend(rejected?);
        }
        Ok(bad)
    }

    /// Creates one subscription with the monitored items of `chunk`; returns the nodes the
    /// server rejected.
    async fn create_chunk(
        &self,
        session: &Session,
        chunk: Vec<MonitoredItemCreateRequest>,
        items: &Arc<Vec<Item>>,
        item_tx: &mpsc::Sender<Record>,
        status_tx: &mpsc::Sender<StatusCode>,
        overflow: &Arc<Overflow>,
    ) -> Result<Vec<(String, String)>, String> {
        let callbacks = self.callbacks(
            items.clone(),
            item_tx.clone(),
            status_tx.clone(),
            overflow.clone(),
        );
        let sub_id = session
            .create_subscription(
                Duration::from_millis(self.cfg.publishing_interval_ms),
                LIFETIME_COUNT,
                KEEP_ALIVE_COUNT,
                MAX_NOTIFICATIONS_PER_PUBLISH,
                0,
                true,
                callbacks,
            )
            .await
            .map_err(|e| format!("create subscription: {e}"))?;
        let handles: Vec<u32> = chunk
            .iter()
            .map(|r| r.requested_parameters.client_handle)
            .collect();
        let results = session
            .create_monitored_items(sub_id, TimestampsToReturn::Both, chunk)
            .await
            .map_err(|e| format!("create monitored items: {e}"))?;
        if results.len() != handles.len() {
            return Err(format!(
                "create monitored items: {} results for {} items",
                results.len(),
                handles.len()
            ));
        }
        let mut bad = Vec::new();
        for (handle, created) in handles.iter().zip(results.iter()) {
            let code = created.result.status_code;
            if !code.is_good() {
                let node_id = item_for(items, *handle)
                    .map(|i| i.node_id.clone())
                    .unwrap_or_default();
                bad.push((
                    node_id,
                    format!("monitored item rejected by server: {code}"),
                ));
            }
        }
        Ok(bad)
    }

    fn callbacks(
        &self,
        items: Arc<Vec<Item>>,
        item_tx: mpsc::Sender<Record>,
        status_tx: mpsc::Sender<StatusCode>,
        overflow: Arc<Overflow>,
    ) -> SubscriptionCallbacks {
        let source = self.cfg.name.clone();
        let labels = self.labels();
        let dead_letters = self.metrics.dead_letters.get_or_create(&labels).clone();
        let dropped = self.metrics.dropped.get_or_create(&labels).clone();
        SubscriptionCallbacks::new(
            move |notification| {
                if !notification.status.is_good() {
                    // A bad status (e.g. BadTimeout) means the server dropped the subscription.
                    let _ = status_tx.try_send(notification.status);
                }
            },
            move |value, item| {
                let now = Utc::now();
                let Some(it) = item_for(&items, item.client_handle()) else {
                    return;
                };
                it.notifications.inc();
                let record =
                    data_value_to_record(&source, &it.node_id, &it.machine, &it.metric, value, now);
                if matches!(record, Record::Reading(_)) {
                    it.readings.inc();
                } else {
                    dead_letters.inc();
                }
                if item_tx.try_send(record).is_err() {
                    dropped.inc();
                    overflow.record(now, &it.metric);
                }
            },
            |_, _| {},
        )
    }
}

/// Reads DataType and ValueRank of every node (at most [`MAX_ITEMS_PER_SUBSCRIPTION`]
/// attributes per request) and says for each whether it can deliver numeric readings.
async fn check_nodes<'a>(
    session: &Session,
    ids: impl Iterator<Item = &'a NodeId>,
) -> Result<Vec<Result<(), String>>, String> {
    let reads: Vec<ReadValueId> = ids
        .flat_map(|id| {
            [AttributeId::DataType, AttributeId::ValueRank].map(|attr| ReadValueId {
                node_id: id.clone(),
                attribute_id: attr as u32,
                index_range: Default::default(),
                data_encoding: QualifiedName::null(),
            })
        })
        .collect();
    let mut values = Vec::with_capacity(reads.len());
    // SETUP_CONCURRENCY reads in flight, results in request order.
    let mut pending = Vec::new();
    for chunk in reads.chunks(MAX_ITEMS_PER_SUBSCRIPTION) {
        pending.push(read_chunk(session, chunk));
    }
    let mut answers = futures_util::stream::iter(pending).buffered(SETUP_CONCURRENCY);
    while let Some(got) = answers.next().await {
        values.extend(got?);
    }
    let mut values = values.into_iter();
    let mut verdicts = Vec::with_capacity(reads.len() / 2);
    while let (Some(data_type), Some(value_rank)) = (values.next(), values.next()) {
        verdicts.push(classify_node(&data_type, &value_rank));
    }
    Ok(verdicts)
}

/// Reads one chunk of attributes; fails unless every attribute has a result.
async fn read_chunk(session: &Session, chunk: &[ReadValueId]) -> Result<Vec<DataValue>, String> {
    let got = session
        .read(chunk, TimestampsToReturn::Neither, 0.0)
        .await
        .map_err(|e| format!("read node attributes: {e}"))?;
    if got.len() == chunk.len() {
        Ok(got)
    } else {
        Err(format!(
            "read node attributes: {} results for {} attributes",
            got.len(),
            chunk.len()
        ))
    }
}

/// Built-in data types (namespace 0 numeric ids) whose values can never be a number.
const NON_NUMERIC_TYPES: &[(u32, &str)] = &[
    (12, "String"),
    (13, "DateTime"),
    (14, "Guid"),
    (15, "ByteString"),
    (16, "XmlElement"),
    (17, "NodeId"),
    (18, "ExpandedNodeId"),
    (19, "StatusCode"),
    (20, "QualifiedName"),
    (21, "LocalizedText"),
    (22, "Structure"),
    (23, "DataValue"),
    (25, "DiagnosticInfo"),
];

/// Whether a node with these DataType and ValueRank attribute values can be monitored for
/// numeric readings. Unknown or custom types pass; their values are checked one by one.
pub fn classify_node(data_type: &DataValue, value_rank: &DataValue) -> Result<(), String> {
    let status = data_type.status.unwrap_or(StatusCode::Good);
    if status == StatusCode::BadNodeIdUnknown || status == StatusCode::BadNodeIdInvalid {
        return Err(format!("node rejected by server: {status}"));
    }
    if status == StatusCode::BadAttributeIdInvalid {
        return Err(format!("not a variable: {status}"));
    }
    if let Some(Variant::NodeId(dt)) = &data_type.value
        && dt.namespace == 0
        && let Identifier::Numeric(n) = dt.identifier
        && let Some((_, name)) = NON_NUMERIC_TYPES.iter().find(|(id, _)| *id == n)
    {
        return Err(format!("wrong type: data type {name} is not numeric"));
    }
    if let Some(Variant::Int32(rank)) = &value_rank.value
        && *rank >= 0
    {
        return Err(format!("wrong type: value rank {rank} is an array"));
    }
    Ok(())
}

fn item_for(items: &[Item], handle: u32) -> Option<&Item> {
    let idx = usize::try_from(handle).ok()?.checked_sub(1)?;
    items.get(idx)
}

/// Notifications dropped because the internal queue was full.
#[derive(Debug, Default)]
struct Overflow {
    dropped: AtomicU64,
    /// Milliseconds since the epoch of the first dropped notification; 0 when none.
    first_ms: AtomicI64,
    /// Metrics (one per configured node) with a dropped notification: bounded by the config.
    metrics: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// Metric names listed in an overflow gap's reason; the rest are counted.
const GAP_LISTED_METRICS: usize = 10;

impl Overflow {
    fn record(&self, now: DateTime<Utc>, metric: &str) {
        {
            let mut m = self
                .metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !m.contains(metric) {
                m.insert(metric.to_owned());
            }
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let _ = self.first_ms.compare_exchange(
            0,
            now.timestamp_millis().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn take_gap(&self, source: &str) -> Option<Record> {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped == 0 {
            return None;
        }
        let now = Utc::now();
        let first = self.first_ms.swap(0, Ordering::Relaxed);
        let from = DateTime::from_timestamp_millis(first)
            .unwrap_or(now)
            .min(now);
        let metrics = std::mem::take(
            &mut *self
                .metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let listed: Vec<&str> = metrics
            .iter()
            .take(GAP_LISTED_METRICS)
            .map(String::as_str)
            .collect();
        let more = metrics.len().saturating_sub(listed.len());
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Some(Record::Gap(Gap {
            source: source.to_owned(),
            from,
            to: now,
            reason: format!(
                "{dropped} notifications dropped: ingest queue full while the agent's buffer \
                 applied backpressure; value changes of {} metric(s) ({}{more}) between from \
                 and to may be lost (OPC UA subscriptions cannot redeliver); the session stayed \
                 up and later values flow",
                metrics.len(),
                listed.join(", ")
            ),
        }))
    }
}

/// Copies one certificate into `trusted/` under the store's file name for it; removes an
/// earlier rejection of the same certificate, since the operator now trusts it explicitly.
fn trust_cert(store: &CertificateStore, path: &Path) -> Result<(), String> {
    let cert = CertificateStore::read_cert(path)
        .map_err(|e| format!("trust_server_certs {}: {e}", path.display()))?;
    let der = cert
        .to_der()
        .map_err(|e| format!("trust_server_certs {}: {e}", path.display()))?;
    let name = CertificateStore::cert_file_name(&cert);
    let target = store.trusted_certs_dir().join(&name);
    if std::fs::read(&target).ok().as_deref() != Some(der.as_slice()) {
        std::fs::write(&target, &der).map_err(|e| format!("writing {}: {e}", target.display()))?;
        debug!(cert = %target.display(), "trusted OPC UA server certificate");
    }
    let rejected = store.rejected_certs_dir().join(&name);
    if rejected.exists() {
        std::fs::remove_file(&rejected)
            .map_err(|e| format!("removing {}: {e}", rejected.display()))?;
    }
    Ok(())
}

/// Sends the first record of `out` with `permit`, then as many more as the writer's channel
/// has room for right now, without waiting.
fn hand_over(permit: mpsc::Permit<'_, Envelope>, tx: &Sink, out: &mut VecDeque<Record>) {
    let Some(rec) = out.pop_front() else {
        return;
    };
    permit.send(Envelope::plain(rec));
    while !out.is_empty() {
        let Ok(p) = tx.try_reserve() else {
            return;
        };
        if let Some(rec) = out.pop_front() {
            p.send(Envelope::plain(rec));
        }
    }
}

/// Upper bound for session set-up (node check, subscriptions, monitored items) with `nodes`
/// configured nodes: [`CONNECT_TIMEOUT`] per started [`MAX_ITEMS_PER_SUBSCRIPTION`] nodes and
/// one more. Every request has its own timeout too; this only bounds a server that answers,
/// but slowly. A fixed 30 s cut off a 20,000-node set-up on a busy server, which then started
/// over from the beginning (issue #17).
fn setup_timeout(nodes: usize) -> Duration {
    let chunks = nodes.div_ceil(MAX_ITEMS_PER_SUBSCRIPTION).max(1);
    CONNECT_TIMEOUT.saturating_mul(u32::try_from(chunks).unwrap_or(u32::MAX).saturating_add(1))
}

/// Event-loop results that end a session; `None` for routine activity.
fn fatal_event(ev: Option<Result<SessionPollResult, StatusCode>>) -> Option<String> {
    match ev {
        None => Some("session event loop ended".into()),
        Some(Err(code)) => Some(format!("session failed: {code}")),
        Some(Ok(SessionPollResult::ConnectionLost(code))) => {
            Some(format!("connection lost: {code}"))
        }
        Some(Ok(SessionPollResult::ReconnectFailed(code))) => {
            Some(format!("reconnect failed: {code}"))
        }
        Some(Ok(SessionPollResult::Subscription(SubscriptionActivity::FatalFailure(code)))) => {
            Some(format!("subscription failed: {code}"))
        }
        Some(Ok(_)) => None,
    }
}

/// Publish failures meaning the server no longer has our session or subscription.
fn subscription_gone(code: StatusCode) -> bool {
    [
        StatusCode::BadNoSubscription,
        StatusCode::BadSubscriptionIdInvalid,
        StatusCode::BadSessionIdInvalid,
        StatusCode::BadSessionClosed,
        StatusCode::BadSessionNotActivated,
    ]
    .contains(&code)
}

/// Best-effort clean close (deletes the server-side session) while still driving the
/// event loop that carries the request; gives up after [`CLOSE_TIMEOUT`].
async fn close_session<S>(session: &Session, events: &mut S)
where
    S: futures_util::Stream + Unpin,
{
    let disconnect = session.disconnect();
    let mut disconnect = pin!(tokio::time::timeout(CLOSE_TIMEOUT, disconnect));
    loop {
        tokio::select! {
            _ = &mut disconnect => return,
            ev = events.next() => if ev.is_none() { return },
        }
    }
}

/// How long a subscription may stay silent (no data, no keep-alive) before it is declared dead.
fn watchdog_period(publishing_interval_ms: u64) -> Duration {
    let keep_alive = Duration::from_millis(publishing_interval_ms)
        .saturating_mul(KEEP_ALIVE_COUNT)
        .saturating_mul(3);
    keep_alive.max(MIN_WATCHDOG)
}

/// Turns one data-change notification into a reading, or a dead letter saying why not.
///
/// `ts` is the SourceTimestamp, else the ServerTimestamp, else `received`.
pub fn data_value_to_record(
    source: &str,
    node_id: &str,
    machine: &str,
    metric: &str,
    dv: DataValue,
    received: DateTime<Utc>,
) -> Record {
    let status = dv.status.unwrap_or(StatusCode::Good);
    let quality = if status.is_good() {
        Quality::Good
    } else if status.is_uncertain() {
        Quality::Uncertain
    } else {
        Quality::Bad
    };
    let ts = [dv.source_timestamp, dv.server_timestamp]
        .into_iter()
        .flatten()
        .find(|t| !t.is_null())
        .map(DateTime::<Utc>::from)
        .unwrap_or(received);
    let value = dv.value.unwrap_or(Variant::Empty);
    match numeric(&value) {
        Ok(v) => Record::Reading(Reading {
            source: source.to_owned(),
            machine: machine.to_owned(),
            metric: metric.to_owned(),
            ts,
            value: v,
            quality,
        }),
        Err(problem) => {
            let reason = if status.is_good() {
                problem
            } else {
                format!("{problem} (status {status})")
            };
            let payload = format!("{value:?}");
            dead_letter(source, node_id, reason, payload.as_bytes(), ts)
        }
    }
}

fn numeric(value: &Variant) -> Result<f64, String> {
    let v = match value {
        Variant::Boolean(b) => f64::from(u8::from(*b)),
        Variant::SByte(v) => f64::from(*v),
        Variant::Byte(v) => f64::from(*v),
        Variant::Int16(v) => f64::from(*v),
        Variant::UInt16(v) => f64::from(*v),
        Variant::Int32(v) => f64::from(*v),
        Variant::UInt32(v) => f64::from(*v),
        #[expect(
            clippy::cast_precision_loss,
            reason = "readings are f64; 64-bit counters above 2^53 lose low bits by design"
        )]
        Variant::Int64(v) => *v as f64,
        #[expect(
            clippy::cast_precision_loss,
            reason = "readings are f64; 64-bit counters above 2^53 lose low bits by design"
        )]
        Variant::UInt64(v) => *v as f64,
        Variant::Float(v) => f64::from(*v),
        Variant::Double(v) => *v,
        Variant::Variant(inner) => return numeric(inner),
        Variant::Empty => return Err("no value".into()),
        other => {
            return Err(format!("non-numeric value of type {:?}", other.type_id()));
        }
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("non-finite value {v}"))
    }
}

fn dead_letter(
    source: &str,
    origin: &str,
    reason: String,
    payload: &[u8],
    ts: DateTime<Utc>,
) -> Record {
    let keep = payload.len().min(DEAD_LETTER_PREFIX_BYTES);
    Record::DeadLetter(DeadLetter {
        source: source.to_owned(),
        origin: origin.to_owned(),
        reason,
        payload_prefix: payload.get(..keep).unwrap_or_default().to_vec(),
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::UAString;

    fn cfg() -> OpcUaEndpointConfig {
        OpcUaEndpointConfig {
            name: "plc1".into(),
            url: "opc.tcp://127.0.0.1:4840/".into(),
            security_policy: OpcUaSecurityPolicy::None,
            pki_dir: "/tmp/pki".into(),
            application_uri: None,
            trust_server_certs: vec![],
            publishing_interval_ms: 100,
            reconnect_min_ms: 100,
            reconnect_max_ms: 1000,
            reconnect_probe_interval_ms: 0,
            failover_urls: Vec::new(),
            nodes: vec![OpcUaNodeConfig {
                node_id: "ns=2;s=Machine1.Temp".into(),
                machine: "m1".into(),
                metric: "temp".into(),
                sampling_interval_ms: None,
            }],
            user_identity: OpcUaUserIdentity::Anonymous,
        }
    }

    fn convert(v: Variant, status: Option<StatusCode>) -> Record {
        let dv = DataValue {
            value: Some(v),
            status,
            ..Default::default()
        };
        data_value_to_record("s", "ns=2;s=x", "m", "x", dv, Utc::now())
    }

    fn value(r: &Record) -> f64 {
        match r {
            Record::Reading(r) => r.value,
            other => panic!("expected a reading, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_config_passes() {
        cfg().validate().unwrap();
    }

    #[test]
    fn validation_errors_name_the_field() {
        let mut c = cfg();
        c.url = "http://x".into();
        assert_eq!(c.validate().unwrap_err().field, "url");

        let mut c = cfg();
        c.nodes[0].node_id = "Machine1.Temp;;".into();
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "nodes[0].node_id", "{e}");
        assert!(e.to_string().contains("nodes[0].node_id"), "{e}");

        let mut c = cfg();
        c.reconnect_max_ms = 10;
        assert_eq!(c.validate().unwrap_err().field, "reconnect_max_ms");

        let mut c = cfg();
        c.nodes.push(c.nodes[0].clone());
        assert_eq!(c.validate().unwrap_err().field, "nodes[1].metric");

        let mut c = cfg();
        c.trust_server_certs = vec!["/nonexistent/server.der".into()];
        // Files are the device's: checked apart from `validate`, which the control plane runs.
        assert!(c.validate().is_ok());
        assert_eq!(
            c.check_local_files().unwrap_err().field,
            "trust_server_certs[0]"
        );
    }

    #[test]
    fn numbers_of_every_width_and_booleans_become_readings() {
        assert_eq!(value(&convert(Variant::Boolean(true), None)), 1.0);
        assert_eq!(value(&convert(Variant::Boolean(false), None)), 0.0);
        assert_eq!(value(&convert(Variant::SByte(-3), None)), -3.0);
        assert_eq!(value(&convert(Variant::Byte(200), None)), 200.0);
        assert_eq!(value(&convert(Variant::Int16(-300), None)), -300.0);
        assert_eq!(value(&convert(Variant::UInt16(60000), None)), 60000.0);
        assert_eq!(value(&convert(Variant::Int32(-70000), None)), -70000.0);
        assert_eq!(value(&convert(Variant::UInt32(4_000_000_000), None)), 4e9);
        assert_eq!(value(&convert(Variant::Int64(-5_000_000_000), None)), -5e9);
        assert_eq!(
            value(&convert(Variant::UInt64(1 << 40), None)),
            1_099_511_627_776.0
        );
        assert_eq!(value(&convert(Variant::Float(1.5), None)), 1.5);
        assert_eq!(value(&convert(Variant::Double(-2.25), None)), -2.25);
    }

    #[test]
    fn status_maps_to_quality() {
        let q = |s| match convert(Variant::Double(1.0), s) {
            Record::Reading(r) => r.quality,
            other => panic!("{other:?}"),
        };
        assert_eq!(q(None), Quality::Good);
        assert_eq!(q(Some(StatusCode::Good)), Quality::Good);
        assert_eq!(
            q(Some(StatusCode::UncertainLastUsableValue)),
            Quality::Uncertain
        );
        assert_eq!(q(Some(StatusCode::BadSensorFailure)), Quality::Bad);
    }

    #[test]
    fn strings_and_missing_values_become_dead_letters_with_a_reason() {
        match convert(Variant::String(UAString::from("hello")), None) {
            Record::DeadLetter(d) => {
                assert!(d.reason.contains("non-numeric"), "{}", d.reason);
                assert_eq!(d.origin, "ns=2;s=x");
                assert!(String::from_utf8_lossy(&d.payload_prefix).contains("hello"));
            }
            other => panic!("{other:?}"),
        }
        let dv = DataValue {
            value: None,
            status: Some(StatusCode::BadNodeIdUnknown),
            ..Default::default()
        };
        match data_value_to_record("s", "n", "m", "x", dv, Utc::now()) {
            Record::DeadLetter(d) => assert!(d.reason.contains("BadNodeIdUnknown"), "{}", d.reason),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            convert(Variant::Double(f64::NAN), None),
            Record::DeadLetter(_)
        ));
    }

    #[test]
    fn a_repeat_of_the_last_stored_value_of_a_node_is_recognised_within_the_node_bound() {
        let at = |s: i64, v: f64, metric: &str| Reading {
            source: "plc".into(),
            machine: "m".into(),
            metric: metric.into(),
            ts: DateTime::from_timestamp(s, 0).unwrap(),
            value: v,
            quality: Quality::Good,
        };
        let mut last = LastValues::new(2);
        assert!(!last.is_repeat(&at(1, 1.0, "a")));
        // The initial value after a reconnect: same source timestamp and value.
        assert!(last.is_repeat(&at(1, 1.0, "a")));
        assert!(!last.is_repeat(&at(1, 2.0, "a")), "other value");
        assert!(!last.is_repeat(&at(2, 2.0, "a")), "other timestamp");
        assert!(!last.is_repeat(&at(1, 1.0, "b")));
        // A third node is beyond the bound: never remembered, never skipped.
        assert!(!last.is_repeat(&at(1, 1.0, "c")));
        assert!(!last.is_repeat(&at(1, 1.0, "c")));
    }

    #[tokio::test]
    async fn a_batch_goes_to_the_writer_as_far_as_it_has_room_in_order_and_the_rest_waits() {
        let (tx, mut rx) = mpsc::channel(3);
        let reading = |v: f64| {
            Record::Reading(Reading {
                source: "plc".into(),
                machine: "m".into(),
                metric: "x".into(),
                ts: DateTime::from_timestamp(1, 0).unwrap(),
                value: v,
                quality: Quality::Good,
            })
        };
        let mut out: VecDeque<Record> = (0..5).map(|i| reading(f64::from(i))).collect();
        let permit = tx.reserve().await.unwrap();
        hand_over(permit, &tx, &mut out);
        assert_eq!(out.len(), 2, "room for 3: two wait");
        for want in 0..3 {
            assert_eq!(value(&rx.recv().await.unwrap().record), f64::from(want));
        }
        let permit = tx.reserve().await.unwrap();
        hand_over(permit, &tx, &mut out);
        assert!(out.is_empty());
        for want in 3..5 {
            assert_eq!(value(&rx.recv().await.unwrap().record), f64::from(want));
        }
    }

    #[test]
    fn the_set_up_timeout_grows_with_the_node_count() {
        assert_eq!(setup_timeout(0), 2 * CONNECT_TIMEOUT);
        assert_eq!(setup_timeout(1000), 2 * CONNECT_TIMEOUT);
        assert_eq!(setup_timeout(1001), 3 * CONNECT_TIMEOUT);
        assert_eq!(setup_timeout(20_000), 21 * CONNECT_TIMEOUT);
    }

    #[test]
    fn source_timestamp_wins_then_server_then_receive_time() {
        let src = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let srv = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        let rcv = DateTime::from_timestamp(1_700_000_200, 0).unwrap();
        let ts = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| {
            let dv = DataValue {
                value: Some(Variant::Double(1.0)),
                source_timestamp: a.map(Into::into),
                server_timestamp: b.map(Into::into),
                ..Default::default()
            };
            match data_value_to_record("s", "n", "m", "x", dv, rcv) {
                Record::Reading(r) => r.ts,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(ts(Some(src), Some(srv)), src);
        assert_eq!(ts(None, Some(srv)), srv);
        assert_eq!(ts(None, None), rcv);
    }
}

/// Property test of the OPC UA value conversion (issue #13, hostile input): any variant,
/// status and timestamps become a reading with a finite value or a dead letter with a reason.
#[cfg(test)]
mod value_proptests {
    use opcua::types::{ByteString, UAString};
    use proptest::prelude::*;

    use super::*;

    fn variant() -> impl Strategy<Value = Variant> {
        prop_oneof![
            any::<bool>().prop_map(Variant::Boolean),
            any::<i8>().prop_map(Variant::SByte),
            any::<u8>().prop_map(Variant::Byte),
            any::<i16>().prop_map(Variant::Int16),
            any::<u16>().prop_map(Variant::UInt16),
            any::<i32>().prop_map(Variant::Int32),
            any::<u32>().prop_map(Variant::UInt32),
            any::<i64>().prop_map(Variant::Int64),
            any::<u64>().prop_map(Variant::UInt64),
            any::<f32>().prop_map(Variant::Float),
            any::<f64>().prop_map(Variant::Double),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)]
                .prop_map(Variant::Double),
            "\\PC{0,40}".prop_map(|s| Variant::String(UAString::from(s))),
            proptest::collection::vec(any::<u8>(), 0..600)
                .prop_map(|b| Variant::ByteString(ByteString::from(b))),
            Just(Variant::Empty),
            any::<f64>().prop_map(|v| Variant::Variant(Box::new(Variant::Double(v)))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_value_becomes_a_finite_reading_or_a_bounded_dead_letter(
            v in variant(),
            status in any::<u32>(),
            with_status in any::<bool>(),
        ) {
            let dv = DataValue {
                value: Some(v),
                status: with_status.then(|| StatusCode::from(status)),
                ..Default::default()
            };
            match data_value_to_record("s", "ns=2;s=x", "m", "x", dv, Utc::now()) {
                Record::Reading(r) => prop_assert!(r.value.is_finite()),
                Record::DeadLetter(d) => {
                    prop_assert!(!d.reason.is_empty());
                    prop_assert!(d.payload_prefix.len() <= DEAD_LETTER_PREFIX_BYTES);
                }
                other => prop_assert!(false, "unexpected record {other:?}"),
            }
        }
    }
}
