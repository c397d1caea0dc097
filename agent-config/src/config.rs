//! Agent configuration: one TOML file, validated at load.
//!
//! Invariants:
//! - Unknown keys are rejected (`deny_unknown_fields`), so a typo never silently becomes a
//!   default.
//! - Every duration and size carries its unit in its name (`flush_interval_ms`, `max_bytes`).
//! - [`Config`] is only built by [`RawConfig::validate`]; holding one means every field was
//!   checked, and every error names the field (`mqtt[0].subscriptions[1].topic`).
//!
//! Where a reading's metric (and machine) comes from, per MQTT subscription: either a fixed
//! `metric = "temperature"`, or `metric_topic_level = N`, the N-th level (0-based) of the topic
//! the message arrived on; e.g. filter `plant/press1/+` with `metric_topic_level = 2` turns a
//! message on `plant/press1/temperature` into metric `temperature`. Exactly one of the two is
//! required; `machine` / `machine_topic_level` work the same way.
//!
//! OPC UA endpoints (`[[opcua]]`) join this file with the OPC UA source; until then the key is
//! rejected like any unknown key.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use kip_shared::{
    Name,
    mqtt::{MqttEndpoint, TlsFiles},
};
use serde::Deserialize;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The file as written by the operator, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub agent: RawAgent,
    #[serde(default)]
    pub buffer: RawBuffer,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub mqtt: Vec<RawMqttBroker>,
    /// OPC UA endpoints; validated by [`crate::opcua::OpcUaEndpointConfig::validate`].
    #[serde(default)]
    pub opcua: Vec<crate::opcua::OpcUaEndpointConfig>,
    /// `[inference]`: predictive maintenance on readings as they arrive.
    #[serde(default)]
    pub inference: RawInference,
    #[serde(default)]
    pub sync: RawSync,
    /// `[live_query]`: answer the control plane's live-value requests over MQTT.
    #[serde(default)]
    pub live_query: Option<RawLiveQuery>,
    /// `[security]`: what the agent refuses on the OT side.
    #[serde(default)]
    pub security: RawSecurity,
    /// `[remote_config]` (local-only): applying configurations sent by the control plane.
    #[serde(default)]
    pub remote_config: RawRemoteConfig,
}

/// `[security]` as written.
///
/// `require_secure_ot` defaults to `false` when the section is absent, so a configuration
/// written before it existed keeps working after an upgrade; the example configuration and
/// the installer write `true`, and an operator turns it off only for an isolated machine
/// network (the quickstart's local broker does so explicitly).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecurity {
    /// Refuse plain `mqtt://`, `mqtts://` without a client certificate and OPC UA security
    /// policy `none` (sources and the live-query connection).
    #[serde(default)]
    pub require_secure_ot: bool,
}

/// Validated `[security]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecurityConfig {
    pub require_secure_ot: bool,
}

/// How to opt out, appended to every refusal of `security.require_secure_ot`.
const SECURE_OT_OPT_OUT: &str = "security.require_secure_ot is true; on an isolated machine \
    network you may opt out with `[security]` `require_secure_ot = false`";

/// Refuses an MQTT connection without TLS and a client certificate.
fn require_secure_mqtt(endpoint: &MqttEndpoint, field: String) -> Result<(), ConfigError> {
    match endpoint.tls() {
        None => Err(invalid(
            field,
            format!(
                "plain mqtt:// is refused: use mqtts:// with ca_file, client_cert_file and \
                 client_key_file ({SECURE_OT_OPT_OUT})"
            ),
        )),
        Some(t) if t.client_auth.is_none() => Err(invalid(
            field,
            format!(
                "mqtts:// without a client certificate is refused: set client_cert_file and \
                 client_key_file ({SECURE_OT_OPT_OUT})"
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// `[remote_config]` as written; local-only (see [`crate::remote`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemoteConfig {
    /// Apply configurations from the control plane (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A new configuration must have every source connected and a batch acknowledged by the
    /// control plane within this time, otherwise the agent goes back to the last good one.
    #[serde(default = "default_confirm_within_ms")]
    pub confirm_within_ms: u64,
}

fn default_true() -> bool {
    true
}
fn default_confirm_within_ms() -> u64 {
    60_000
}

impl Default for RawRemoteConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            confirm_within_ms: default_confirm_within_ms(),
        }
    }
}

/// Validated `[remote_config]`.
#[derive(Debug, Clone)]
pub struct RemoteConfigSettings {
    pub enabled: bool,
    pub confirm_within: Duration,
}

/// `[live_query]` as written: the connection is either borrowed from a `[[mqtt]]` source
/// (`broker = "name"`: its url and TLS files, with its own client id) or given here (`url`
/// and, for `mqtts://`, `ca_file` / `client_cert_file` / `client_key_file`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLiveQuery {
    /// Name of the `[[mqtt]]` source whose broker and TLS settings to reuse.
    #[serde(default)]
    pub broker: Option<String>,
    /// `mqtt://host:port` or `mqtts://host:port` when not reusing a source's broker.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Default: `kip-live-{agent.device}`; must differ from every source's client id (a
    /// broker disconnects the older of two sessions with one id).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Must equal the control plane's `llm.providers.<aleph>.mqtt.topic_prefix`.
    #[serde(default = "default_live_topic_prefix")]
    pub topic_prefix: String,
    /// The organisation this device belongs to; by default read from the enrolled identity.
    /// When both exist they must agree.
    #[serde(default)]
    pub org_id: Option<uuid::Uuid>,
    /// Distinct (machine, metric) pairs remembered; readings of further pairs are counted
    /// (`kip_agent_live_values_dropped_total`) and not answered.
    #[serde(default = "default_live_max_tracked_values")]
    pub max_tracked_values: usize,
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    #[serde(default = "default_reconnect_min_backoff_ms")]
    pub reconnect_min_backoff_ms: u64,
    #[serde(default = "default_reconnect_max_backoff_ms")]
    pub reconnect_max_backoff_ms: u64,
}

fn default_live_topic_prefix() -> String {
    "kip/v1".into()
}
fn default_live_max_tracked_values() -> usize {
    10_000
}

/// Validated `[live_query]`.
#[derive(Debug, Clone)]
pub struct LiveQueryConfig {
    /// The connection (its `subscriptions` are empty: the topic comes from the identity).
    pub broker: MqttBrokerConfig,
    pub topic_prefix: String,
    /// `None`: taken from the enrolled identity at start.
    pub org_id: Option<uuid::Uuid>,
    pub max_tracked_values: usize,
}

/// `[inference]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    #[serde(default)]
    pub enabled: bool,
    /// Path of libonnxruntime; unset: ORT_DYLIB_PATH, then the packaged locations.
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// Model loaded at start-up (the package ships ml/models' reference model).
    #[serde(default)]
    pub model_path: Option<PathBuf>,
    /// Expected sha256 of `model_path` (64 hex characters).
    #[serde(default)]
    pub model_sha256: Option<String>,
    /// Capacity of the queue between the buffer writer and inference (default 10000).
    #[serde(default)]
    pub queue_capacity_readings: Option<usize>,
}

/// `[sync]`: shipping the buffer to the control plane's agent listener (mTLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    /// Agent-listener base URLs (`https://cp.example:8443`), tried in order: after a failure
    /// the next one, and a working one is kept. Empty disables sync (records stay buffered).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Largest batch in records (the control plane's `ingest.max_batch_records` must allow it).
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    /// Largest batch in stored bytes (about the JSON size before gzip).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: u64,
    /// How often to look for new records once caught up.
    #[serde(default = "default_sync_interval_ms")]
    pub interval_ms: u64,
    /// Backoff after a failed batch: full jitter between 0 and min(max, min * 2^failures).
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Timeout of one batch request (connect + upload + store + ack).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// An idle agent (nothing to send) still contacts the control plane this often: an empty
    /// sync with its health report, which also picks up desired state and trust bundles.
    /// The control plane's `health.stale_after_s` should be a few of these.
    #[serde(default = "default_heartbeat_interval_s")]
    pub heartbeat_interval_s: u64,
    /// While backing off after a failure, the endpoints are probed this often with a TLS
    /// handshake (bounded by the same time); an endpoint seen unreachable and then reachable
    /// ends the wait at once. 0 turns probing off (the full backoff is waited).
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// While draining a backlog (full batches, no failure, no poison record being isolated),
    /// up to this many batches are in flight at once; their acks are applied strictly in
    /// sequence order. 1 sends one batch at a time. A control plane that admits fewer
    /// concurrent syncs per device (429) makes the agent use fewer.
    #[serde(default = "default_max_in_flight_batches")]
    pub max_in_flight_batches: usize,
}

fn default_max_in_flight_batches() -> usize {
    4
}

fn default_heartbeat_interval_s() -> u64 {
    60
}

fn default_probe_interval_ms() -> u64 {
    250
}

/// The control plane's default `ingest.max_batch_records`: a drain sends as few, large
/// batches as it takes (docs/performance.md).
fn default_batch_max_records() -> usize {
    10_000
}
fn default_batch_max_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_sync_interval_ms() -> u64 {
    1_000
}
fn default_backoff_min_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}

impl Default for RawSync {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            batch_max_records: default_batch_max_records(),
            batch_max_bytes: default_batch_max_bytes(),
            interval_ms: default_sync_interval_ms(),
            backoff_min_ms: default_backoff_min_ms(),
            backoff_max_ms: default_backoff_max_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            heartbeat_interval_s: default_heartbeat_interval_s(),
            probe_interval_ms: default_probe_interval_ms(),
            max_in_flight_batches: default_max_in_flight_batches(),
        }
    }
}

/// Validated `[sync]`.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Base URLs without a trailing slash, in failover order.
    pub endpoints: Vec<String>,
    pub batch_max_records: usize,
    pub batch_max_bytes: u64,
    pub interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    /// `sync.heartbeat_interval_s`.
    pub heartbeat_interval: Duration,
    /// `sync.probe_interval_ms`; `None`: no probing while backing off.
    pub probe_interval: Option<Duration>,
    /// `sync.max_in_flight_batches` (1..=64).
    pub max_in_flight_batches: usize,
}

impl RawSync {
    fn validate(self) -> Result<SyncConfig, ConfigError> {
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for (i, e) in self.endpoints.iter().enumerate() {
            let e = e.trim().trim_end_matches('/');
            let rest = e.strip_prefix("https://").ok_or_else(|| {
                invalid(
                    format!("sync.endpoints[{i}]"),
                    format!("{e:?} must be an https:// URL of the agent listener (mTLS)"),
                )
            })?;
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(invalid(
                    format!("sync.endpoints[{i}]"),
                    format!("{e:?} has no host"),
                ));
            }
            endpoints.push(e.to_owned());
        }
        check_range("sync.batch_max_records", self.batch_max_records, 1, 100_000)?;
        check_range(
            "sync.batch_max_bytes",
            self.batch_max_bytes,
            4096,
            256 * 1024 * 1024,
        )?;
        let interval = ms_in("sync.interval_ms".into(), self.interval_ms, 1, 3_600_000)?;
        let backoff_min = ms_in(
            "sync.backoff_min_ms".into(),
            self.backoff_min_ms,
            1,
            3_600_000,
        )?;
        let backoff_max = ms_in(
            "sync.backoff_max_ms".into(),
            self.backoff_max_ms,
            1,
            3_600_000,
        )?;
        if backoff_max < backoff_min {
            return Err(invalid(
                "sync.backoff_max_ms",
                format!(
                    "must be at least sync.backoff_min_ms ({}), got {}",
                    self.backoff_min_ms, self.backoff_max_ms
                ),
            ));
        }
        let request_timeout = ms_in(
            "sync.request_timeout_ms".into(),
            self.request_timeout_ms,
            100,
            600_000,
        )?;
        check_range(
            "sync.heartbeat_interval_s",
            self.heartbeat_interval_s,
            1,
            86_400,
        )?;
        let heartbeat_interval = Duration::from_secs(self.heartbeat_interval_s);
        let probe_interval = match self.probe_interval_ms {
            0 => None,
            ms => Some(ms_in("sync.probe_interval_ms".into(), ms, 10, 60_000)?),
        };
        check_range(
            "sync.max_in_flight_batches",
            self.max_in_flight_batches,
            1,
            64,
        )?;
        Ok(SyncConfig {
            endpoints,
            batch_max_records: self.batch_max_records,
            batch_max_bytes: self.batch_max_bytes,
            interval,
            backoff_min,
            backoff_max,
            request_timeout,
            heartbeat_interval,
            probe_interval,
            max_in_flight_batches: self.max_in_flight_batches,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Device name, as enrolled with the control plane.
    pub device: String,
    /// Directory for the buffer and other local state; created if missing.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Capacity of the channel between the sources and the buffer writer.
    #[serde(default = "default_queue_capacity_records")]
    pub queue_capacity_records: usize,
    /// Flush early once this many MQTT messages wait for their acknowledgement (which is sent
    /// only after the flush): a broker that keeps to its in-flight limit per client sends no
    /// more until acknowledgements come back.
    #[serde(default = "default_ack_flush_threshold_records")]
    pub ack_flush_threshold_records: usize,
    /// sled's page cache. Records are appended once and read once in sequence order, so a
    /// large cache buys little and costs resident memory (see docs/performance.md).
    #[serde(default = "default_cache_capacity_bytes")]
    pub cache_capacity_bytes: u64,
    /// Stored MQTT deliveries remembered (durable delivery notes) to recognise redeliveries,
    /// e.g. after a crash (see docs/operations.md, "Delivery guarantees per source").
    #[serde(default = "default_max_delivery_notes")]
    pub max_delivery_notes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default = "default_http_listen_addr")]
    pub listen_addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default = "default_log_format")]
    pub format: String,
    #[serde(default = "default_log_filter")]
    pub filter: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttBroker {
    pub name: String,
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    /// Further brokers of the same source (same TLS files), tried in order after `url`: after
    /// a connection error the next attempt goes to the next broker of the list (wrapping).
    #[serde(default)]
    pub failover_urls: Vec<String>,
    pub client_id: String,
    /// PEM file of the CA(s) that signed the broker's certificate; required for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    #[serde(default = "default_reconnect_min_backoff_ms")]
    pub reconnect_min_backoff_ms: u64,
    #[serde(default = "default_reconnect_max_backoff_ms")]
    pub reconnect_max_backoff_ms: u64,
    /// A message whose PUBLISH packet is larger than this is acknowledged and kept as a dead
    /// letter (size and topic) instead of a reading.
    #[serde(default = "default_max_packet_size_bytes")]
    pub max_packet_size_bytes: usize,
    /// Messages read off the connection and held in memory while the buffer writer is busy;
    /// beyond it further messages are left unacknowledged (the broker keeps them) and fetched
    /// again by a reconnect once the backlog is stored. The connection is polled regardless.
    #[serde(default = "default_staging_capacity_messages")]
    pub staging_capacity_messages: usize,
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    /// MQTT topic filter (`+` and `#` wildcards allowed).
    pub topic: String,
    pub machine: Option<String>,
    pub machine_topic_level: Option<usize>,
    pub metric: Option<String>,
    pub metric_topic_level: Option<usize>,
    pub value: ValueFormat,
}

/// How to read the value out of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ValueFormat {
    /// The payload is a number in text (`21.5`), surrounding whitespace allowed.
    /// (A struct variant so that `deny_unknown_fields` applies to it.)
    Number {},
    /// The payload is JSON; the value is the number (or numeric string) at `pointer`
    /// (RFC 6901). `timestamp_pointer`, when set, names the source timestamp: an RFC 3339
    /// string or a number of milliseconds since the Unix epoch.
    Json {
        pointer: String,
        #[serde(default)]
        timestamp_pointer: Option<String>,
    },
}

fn default_max_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_flush_interval_ms() -> u64 {
    200
}
fn default_queue_capacity_records() -> usize {
    10_000
}
fn default_cache_capacity_bytes() -> u64 {
    8 * 1024 * 1024
}
/// The buffer's default (`kip_agent::buffer::MAX_DELIVERY_NOTES`).
fn default_max_delivery_notes() -> usize {
    1 << 18
}
fn default_ack_flush_threshold_records() -> usize {
    // Half of Mosquitto's default max_inflight_messages (20): with a broker that keeps to it,
    // the next half arrives while the flush runs.
    10
}
fn default_http_listen_addr() -> String {
    "127.0.0.1:9464".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_log_filter() -> String {
    "info".into()
}
fn default_keep_alive_ms() -> u64 {
    30_000
}
fn default_reconnect_min_backoff_ms() -> u64 {
    500
}
fn default_reconnect_max_backoff_ms() -> u64 {
    30_000
}
/// The largest packet MQTT can express (remaining length of 268,435,455 bytes).
pub const MQTT_MAX_PACKET_BYTES: usize = 268_435_455 + 5;

fn default_max_packet_size_bytes() -> usize {
    1024 * 1024
}
fn default_staging_capacity_messages() -> usize {
    50_000
}

impl Default for RawBuffer {
    fn default() -> Self {
        Self {
            max_bytes: default_max_bytes(),
            flush_interval_ms: default_flush_interval_ms(),
            queue_capacity_records: default_queue_capacity_records(),
            ack_flush_threshold_records: default_ack_flush_threshold_records(),
            cache_capacity_bytes: default_cache_capacity_bytes(),
            max_delivery_notes: default_max_delivery_notes(),
        }
    }
}
impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen_addr: default_http_listen_addr(),
        }
    }
}
impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            filter: default_log_filter(),
        }
    }
}

/// Log output format (`text`, `json` or `ecs`), shared with the other binary.
pub use kip_shared::logging::LogFormat;

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub device: Name,
    pub state_dir: PathBuf,
    pub buffer: BufferConfig,
    pub http_listen_addr: SocketAddr,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub mqtt: Vec<MqttBrokerConfig>,
    pub sync: SyncConfig,
    pub opcua: Vec<crate::opcua::OpcUaEndpointConfig>,
    /// `None` when `[inference] enabled` is false.
    pub inference: Option<crate::edge_inference::InferenceConfig>,
    /// `None` when there is no `[live_query]` section.
    pub live_query: Option<LiveQueryConfig>,
    pub security: SecurityConfig,
    /// `[remote_config]`.
    pub remote_config: RemoteConfigSettings,
}

/// Validated `[buffer]`.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub max_bytes: u64,
    pub flush_interval: Duration,
    pub queue_capacity_records: usize,
    pub ack_flush_threshold_records: usize,
    pub cache_capacity_bytes: u64,
    pub max_delivery_notes: usize,
}

/// Validated `[[mqtt]]` broker.
#[derive(Debug, Clone)]
pub struct MqttBrokerConfig {
    pub name: Name,
    /// Host, port and TLS files (`url`, `ca_file`, `client_cert_file`, `client_key_file`).
    pub endpoint: MqttEndpoint,
    /// `failover_urls` with the same TLS files, in order.
    pub failover_endpoints: Vec<MqttEndpoint>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub reconnect_min_backoff: Duration,
    pub reconnect_max_backoff: Duration,
    /// Messages above this PUBLISH packet size become dead letters.
    pub max_packet_size_bytes: usize,
    /// Messages held in memory between the connection and the buffer writer.
    pub staging_capacity_messages: usize,
    pub subscriptions: Vec<Subscription>,
}

/// Where a reading's machine or metric name comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameSource {
    Fixed(String),
    /// The level with this 0-based index of the message's topic.
    TopicLevel(usize),
}

impl NameSource {
    /// The name for a message on `topic`; `None` when the topic has no such level or it is
    /// empty.
    pub fn resolve<'a>(&'a self, topic: &'a str) -> Option<&'a str> {
        match self {
            Self::Fixed(s) => Some(s),
            Self::TopicLevel(i) => topic.split('/').nth(*i).filter(|s| !s.is_empty()),
        }
    }
}

/// Validated `[[mqtt.subscriptions]]` entry.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub topic: String,
    pub machine: NameSource,
    pub metric: NameSource,
    pub value: ValueFormat,
}

impl RawConfig {
    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &std::path::Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    /// Checks every field and builds the typed [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let device = Name::parse(&self.agent.device)
            .map_err(|e| invalid("agent.device", format!("{:?} {e}", self.agent.device)))?;
        if self.agent.state_dir.as_os_str().is_empty() {
            return Err(invalid("agent.state_dir", "must not be empty"));
        }
        let b = &self.buffer;
        check_range(
            "buffer.max_bytes",
            b.max_bytes,
            64 * 1024,
            1024 * 1024 * 1024 * 1024,
        )?;
        if !(1..=60_000).contains(&b.flush_interval_ms) {
            return Err(invalid(
                "buffer.flush_interval_ms",
                format!(
                    "must be between 1 and 60000 ms (it bounds the loss window), got {}",
                    b.flush_interval_ms
                ),
            ));
        }
        check_range(
            "buffer.queue_capacity_records",
            b.queue_capacity_records,
            1,
            1_000_000,
        )?;
        check_range(
            "buffer.ack_flush_threshold_records",
            b.ack_flush_threshold_records,
            1,
            10_000,
        )?;
        check_range(
            "buffer.cache_capacity_bytes",
            b.cache_capacity_bytes,
            1024 * 1024,
            4 * 1024 * 1024 * 1024,
        )?;
        check_range(
            "buffer.max_delivery_notes",
            b.max_delivery_notes,
            1,
            16 * 1024 * 1024,
        )?;
        let http_listen_addr = self.http.listen_addr.parse().map_err(|e| {
            invalid(
                "http.listen_addr",
                format!(
                    "{:?} is not an address like 127.0.0.1:9464 ({e})",
                    self.http.listen_addr
                ),
            )
        })?;
        let log_format =
            LogFormat::parse(&self.log.format).map_err(|e| invalid("log.format", e))?;
        if self.log.filter.trim().is_empty() {
            return Err(invalid("log.filter", "must not be empty"));
        }
        let mut names = BTreeSet::new();
        let mut mqtt = Vec::with_capacity(self.mqtt.len());
        for (i, raw) in self.mqtt.into_iter().enumerate() {
            let broker = validate_broker(raw, &format!("mqtt[{i}]"))?;
            if !names.insert(broker.name.clone()) {
                return Err(invalid(
                    format!("mqtt[{i}].name"),
                    format!("source name {:?} is used twice", broker.name.as_str()),
                ));
            }
            mqtt.push(broker);
        }
        let sync = self.sync.validate()?;
        for (i, ep) in self.opcua.iter().enumerate() {
            ep.validate()
                .map_err(|e| invalid(format!("opcua[{i}].{}", e.field), e.problem.clone()))?;
            if !names.insert(
                Name::parse(&ep.name)
                    .map_err(|e| invalid(format!("opcua[{i}].name"), e.to_string()))?,
            ) {
                return Err(invalid(
                    format!("opcua[{i}].name"),
                    format!("source name {:?} is used twice", ep.name),
                ));
            }
        }
        let remote_config = RemoteConfigSettings {
            enabled: self.remote_config.enabled,
            confirm_within: ms_in(
                "remote_config.confirm_within_ms".into(),
                self.remote_config.confirm_within_ms,
                1_000,
                3_600_000,
            )?,
        };
        let inference = validate_inference(self.inference)?;
        let live_query = match self.live_query {
            Some(raw) => Some(validate_live_query(raw, &device, &mqtt)?),
            None => None,
        };
        let security = SecurityConfig {
            require_secure_ot: self.security.require_secure_ot,
        };
        if security.require_secure_ot {
            for (i, b) in mqtt.iter().enumerate() {
                require_secure_mqtt(&b.endpoint, format!("mqtt[{i}].url"))?;
                for (j, e) in b.failover_endpoints.iter().enumerate() {
                    require_secure_mqtt(e, format!("mqtt[{i}].failover_urls[{j}]"))?;
                }
            }
            if let Some(l) = &live_query {
                require_secure_mqtt(&l.broker.endpoint, "live_query.url".into())?;
            }
            for (i, ep) in self.opcua.iter().enumerate() {
                if ep.security_policy == crate::opcua::OpcUaSecurityPolicy::None {
                    return Err(invalid(
                        format!("opcua[{i}].security_policy"),
                        format!(
                            "security policy none is refused: use basic256sha256 \
                             ({SECURE_OT_OPT_OUT})"
                        ),
                    ));
                }
            }
        }
        Ok(Config {
            security,
            remote_config,
            live_query,
            inference,
            sync,
            device,
            state_dir: self.agent.state_dir,
            buffer: BufferConfig {
                max_bytes: b.max_bytes,
                flush_interval: Duration::from_millis(b.flush_interval_ms),
                queue_capacity_records: b.queue_capacity_records,
                ack_flush_threshold_records: b.ack_flush_threshold_records,
                cache_capacity_bytes: b.cache_capacity_bytes,
                max_delivery_notes: b.max_delivery_notes,
            },
            http_listen_addr,
            log_format,
            log_filter: self.log.filter,
            mqtt,
            opcua: self.opcua,
        })
    }
}

fn validate_live_query(
    raw: RawLiveQuery,
    device: &Name,
    sources: &[MqttBrokerConfig],
) -> Result<LiveQueryConfig, ConfigError> {
    let client_id = raw
        .client_id
        .unwrap_or_else(|| format!("kip-live-{device}"));
    let broker = match (&raw.broker, &raw.url) {
        (Some(name), None) => {
            if raw.ca_file.is_some()
                || raw.client_cert_file.is_some()
                || raw.client_key_file.is_some()
            {
                return Err(invalid(
                    "live_query.broker",
                    "reuses the TLS files of that source: remove ca_file/client_cert_file/client_key_file",
                ));
            }
            let src = sources
                .iter()
                .find(|b| b.name.as_str() == name)
                .ok_or_else(|| {
                    invalid(
                        "live_query.broker",
                        format!("{name:?} is not the name of an [[mqtt]] source"),
                    )
                })?;
            if client_id.is_empty() || client_id.len() > 128 {
                return Err(invalid(
                    "live_query.client_id",
                    "must be 1 to 128 characters",
                ));
            }
            MqttBrokerConfig {
                name: src.name.clone(),
                endpoint: src.endpoint.clone(),
                // Live queries use the source's first broker.
                failover_endpoints: Vec::new(),
                client_id,
                keep_alive: ms_in(
                    "live_query.keep_alive_ms".into(),
                    raw.keep_alive_ms,
                    5_000,
                    3_600_000,
                )?,
                reconnect_min_backoff: src.reconnect_min_backoff,
                reconnect_max_backoff: src.reconnect_max_backoff,
                max_packet_size_bytes: src.max_packet_size_bytes,
                staging_capacity_messages: src.staging_capacity_messages,
                subscriptions: Vec::new(),
            }
        }
        (None, Some(url)) => validate_connection(
            RawMqttBroker {
                name: "live-query".into(),
                url: url.clone(),
                failover_urls: Vec::new(),
                client_id,
                ca_file: raw.ca_file,
                client_cert_file: raw.client_cert_file,
                client_key_file: raw.client_key_file,
                keep_alive_ms: raw.keep_alive_ms,
                reconnect_min_backoff_ms: raw.reconnect_min_backoff_ms,
                reconnect_max_backoff_ms: raw.reconnect_max_backoff_ms,
                max_packet_size_bytes: default_max_packet_size_bytes(),
                staging_capacity_messages: default_staging_capacity_messages(),
                subscriptions: Vec::new(),
            },
            "live_query",
            false,
        )?,
        (Some(_), Some(_)) => {
            return Err(invalid("live_query", "set either broker or url, not both"));
        }
        (None, None) => {
            return Err(invalid(
                "live_query",
                "one of broker (an [[mqtt]] source name) or url is required",
            ));
        }
    };
    if let Some(src) = sources.iter().find(|b| b.client_id == broker.client_id) {
        return Err(invalid(
            "live_query.client_id",
            format!(
                "{:?} is the client id of source {:?}; the broker would disconnect one of them",
                broker.client_id,
                src.name.as_str()
            ),
        ));
    }
    kip_shared::live::check_prefix(&raw.topic_prefix)
        .map_err(|m| invalid("live_query.topic_prefix", m))?;
    check_range(
        "live_query.max_tracked_values",
        raw.max_tracked_values,
        1,
        1_000_000,
    )?;
    Ok(LiveQueryConfig {
        broker,
        topic_prefix: raw.topic_prefix,
        org_id: raw.org_id,
        max_tracked_values: raw.max_tracked_values,
    })
}

fn validate_inference(
    raw: RawInference,
) -> Result<Option<crate::edge_inference::InferenceConfig>, ConfigError> {
    if !raw.enabled {
        return Ok(None);
    }
    if let Some(h) = &raw.model_sha256
        && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(invalid(
            "inference.model_sha256",
            "must be 64 hex characters",
        ));
    }
    if raw.model_sha256.is_some() && raw.model_path.is_none() {
        return Err(invalid(
            "inference.model_sha256",
            "needs inference.model_path",
        ));
    }
    let queue = check_range(
        "inference.queue_capacity_readings",
        raw.queue_capacity_readings.unwrap_or(10_000),
        1,
        1_000_000,
    )?;
    Ok(Some(crate::edge_inference::InferenceConfig {
        ort_library: raw.ort_library,
        model_path: raw.model_path,
        model_sha256: raw.model_sha256,
        queue_capacity_readings: queue,
    }))
}

fn ms_in(field: String, v: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
    kip_shared::validate::in_range(v, min, max, " ms")
        .map(Duration::from_millis)
        .map_err(|m| invalid(field, m))
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    v: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    kip_shared::validate::in_range(v, min, max, "").map_err(|m| invalid(field, m))
}

fn validate_broker(raw: RawMqttBroker, at: &str) -> Result<MqttBrokerConfig, ConfigError> {
    validate_connection(raw, at, true)
}

/// Checks a broker connection; `needs_subscriptions` is false for `[live_query]`, whose one
/// subscription comes from the device identity.
fn validate_connection(
    raw: RawMqttBroker,
    at: &str,
    needs_subscriptions: bool,
) -> Result<MqttBrokerConfig, ConfigError> {
    let name = Name::parse(&raw.name)
        .map_err(|e| invalid(format!("{at}.name"), format!("{:?} {e}", raw.name)))?;
    let endpoint = MqttEndpoint::parse(
        &raw.url,
        TlsFiles {
            ca_file: raw.ca_file,
            client_cert_file: raw.client_cert_file,
            client_key_file: raw.client_key_file,
        },
    )
    .map_err(|e| invalid(format!("{at}.{}", e.field), e.message))?;
    endpoint
        .check_rumqttc()
        .map_err(|e| invalid(format!("{at}.{}", e.field), e.message))?;
    let failover_endpoints = raw
        .failover_urls
        .iter()
        .enumerate()
        .map(|(j, url)| {
            let at = format!("{at}.failover_urls[{j}]");
            let files = TlsFiles {
                ca_file: endpoint.tls().map(|t| t.ca_file.clone()),
                client_cert_file: endpoint
                    .tls()
                    .and_then(|t| t.client_auth.as_ref().map(|(c, _)| c.clone())),
                client_key_file: endpoint
                    .tls()
                    .and_then(|t| t.client_auth.as_ref().map(|(_, k)| k.clone())),
            };
            let ep = MqttEndpoint::parse(url, files).map_err(|e| invalid(at.clone(), e.to_string()))?;
            if ep.tls().is_some() != endpoint.tls().is_some() {
                return Err(invalid(
                    at,
                    "must use the same scheme as url (mqtt:// or mqtts://): the TLS files are shared",
                ));
            }
            ep.check_rumqttc()
                .map_err(|e| invalid(at.clone(), e.to_string()))?;
            Ok(ep)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if raw.client_id.is_empty() || raw.client_id.len() > 128 {
        return Err(invalid(
            format!("{at}.client_id"),
            "must be 1 to 128 characters",
        ));
    }
    let keep_alive = ms_in(
        format!("{at}.keep_alive_ms"),
        raw.keep_alive_ms,
        5_000,
        3_600_000,
    )?;
    let reconnect_min_backoff = ms_in(
        format!("{at}.reconnect_min_backoff_ms"),
        raw.reconnect_min_backoff_ms,
        10,
        600_000,
    )?;
    let reconnect_max_backoff = ms_in(
        format!("{at}.reconnect_max_backoff_ms"),
        raw.reconnect_max_backoff_ms,
        raw.reconnect_min_backoff_ms.max(10),
        3_600_000,
    )?;
    let max_packet_size_bytes = check_range(
        &format!("{at}.max_packet_size_bytes"),
        raw.max_packet_size_bytes,
        1024,
        MQTT_MAX_PACKET_BYTES,
    )?;
    let staging_capacity_messages = check_range(
        &format!("{at}.staging_capacity_messages"),
        raw.staging_capacity_messages,
        100,
        1_000_000,
    )?;
    if needs_subscriptions && raw.subscriptions.is_empty() {
        return Err(invalid(
            format!("{at}.subscriptions"),
            "at least one [[mqtt.subscriptions]] entry is required",
        ));
    }
    let subscriptions = raw
        .subscriptions
        .into_iter()
        .enumerate()
        .map(|(j, s)| validate_subscription(s, &format!("{at}.subscriptions[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MqttBrokerConfig {
        name,
        endpoint,
        failover_endpoints,
        client_id: raw.client_id,
        keep_alive,
        reconnect_min_backoff,
        reconnect_max_backoff,
        max_packet_size_bytes,
        staging_capacity_messages,
        subscriptions,
    })
}

/// Checks an MQTT topic filter: `+` fills a whole level, `#` only as the whole last level.
fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("must not be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must fill a whole level"));
        }
    }
    Ok(())
}

fn name_source(
    fixed: Option<String>,
    level: Option<usize>,
    topic: &str,
    at: &str,
    what: &str,
) -> Result<NameSource, ConfigError> {
    match (fixed, level) {
        (Some(s), None) if !s.trim().is_empty() => Ok(NameSource::Fixed(s)),
        (Some(_), None) => Err(invalid(format!("{at}.{what}"), "must not be empty")),
        (None, Some(i)) => {
            let levels: Vec<&str> = topic.split('/').collect();
            let reachable = i < levels.len() && levels[i] != "#" || levels.last() == Some(&"#");
            if reachable {
                Ok(NameSource::TopicLevel(i))
            } else {
                Err(invalid(
                    format!("{at}.{what}_topic_level"),
                    format!("topic filter {topic:?} has no level {i} (levels count from 0)"),
                ))
            }
        }
        (Some(_), Some(_)) => Err(invalid(
            format!("{at}.{what}"),
            format!("set either {what} or {what}_topic_level, not both"),
        )),
        (None, None) => Err(invalid(
            format!("{at}.{what}"),
            format!("one of {what} or {what}_topic_level is required"),
        )),
    }
}

fn check_pointer(p: &str, field: String) -> Result<(), ConfigError> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{p:?} is not a JSON pointer: it must be empty or start with '/'"),
        ))
    }
}

fn validate_subscription(raw: RawSubscription, at: &str) -> Result<Subscription, ConfigError> {
    check_topic_filter(&raw.topic).map_err(|m| invalid(format!("{at}.topic"), m))?;
    let machine = name_source(
        raw.machine,
        raw.machine_topic_level,
        &raw.topic,
        at,
        "machine",
    )?;
    let metric = name_source(raw.metric, raw.metric_topic_level, &raw.topic, at, "metric")?;
    if let ValueFormat::Json {
        pointer,
        timestamp_pointer,
    } = &raw.value
    {
        check_pointer(pointer, format!("{at}.value.pointer"))?;
        if let Some(tp) = timestamp_pointer {
            check_pointer(tp, format!("{at}.value.timestamp_pointer"))?;
        }
    }
    Ok(Subscription {
        topic: raw.topic,
        machine,
        metric,
        value: raw.value,
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg = RawConfig::from_toml(&text, path)?.validate()?;
        cfg.check_local_files()?;
        Ok(cfg)
    }

    /// Checks what only the device can see (files named by the config exist); not part of
    /// [`RawConfig::validate`], which the control plane also runs.
    pub fn check_local_files(&self) -> Result<(), ConfigError> {
        for (i, ep) in self.opcua.iter().enumerate() {
            ep.check_local_files()
                .map_err(|e| invalid(format!("opcua[{i}].{}", e.field), e.problem.clone()))?;
        }
        Ok(())
    }

    /// Where the buffer database lives.
    pub fn buffer_dir(&self) -> PathBuf {
        self.state_dir.join("buffer")
    }

    /// Where inference keeps each machine's window and cycle count across restarts.
    pub fn predictor_state_file(&self) -> PathBuf {
        self.state_dir.join("predictor.json")
    }

    /// Where the device identity (key, certificate, trust bundle) lives.
    pub fn identity_dir(&self) -> PathBuf {
        self.state_dir.join("identity")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MINIMAL: &str = "[agent]\ndevice = \"gw-1\"\nstate_dir = \"/tmp/kip\"\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        RawConfig::from_toml(&format!("{MINIMAL}{extra}"), Path::new("a.toml"))?.validate()
    }

    const BROKER: &str = "[[mqtt]]\nname = \"b1\"\nurl = \"mqtt://127.0.0.1:1884\"\n\
                          client_id = \"kip\"\n";

    #[test]
    fn opcua_errors_name_the_endpoint_field_and_names_stay_unique() {
        let ep = |name: &str, url: &str| {
            format!(
                "[[opcua]]\nname = \"{name}\"\nurl = \"{url}\"\npki_dir = \"/tmp/p\"\n\
                 [[opcua.nodes]]\nnode_id = \"ns=2;s=a\"\nmachine = \"m\"\nmetric = \"t\"\n"
            )
        };
        let err = parse(&ep("plc", "http://x")).unwrap_err().to_string();
        assert!(err.contains("opcua[0].url"), "{err}");
        let twice = format!(
            "{}{}",
            ep("plc", "opc.tcp://a:4840"),
            ep("plc", "opc.tcp://b:4840")
        );
        let err = parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains("opcua[1].name") && err.contains("used twice"),
            "{err}"
        );
    }

    #[test]
    fn require_secure_ot_refuses_plain_mqtt_one_way_tls_and_opcua_without_security() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"a/+\"\nmachine = \"m\"\nmetric = \"x\"\n\
                   value = { kind = \"number\" }\n";
        let on = "[security]\nrequire_secure_ot = true\n";
        let one_way = BROKER.replace("mqtt://", "mqtts://") + "ca_file = \"/ca.pem\"\n";
        let mutual =
            one_way.clone() + "client_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\"\n";
        let opcua = |policy: &str| {
            format!(
                "[[opcua]]\nname = \"o1\"\nurl = \"opc.tcp://plc:4840\"\npki_dir = \"/tmp/p\"\n\
                 security_policy = \"{policy}\"\n\
                 [[opcua.nodes]]\nnode_id = \"ns=2;s=a\"\nmachine = \"m\"\nmetric = \"t\"\n"
            )
        };
        for (cfg, field, says) in [
            (format!("{on}{BROKER}{sub}"), "mqtt[0].url", "plain mqtt://"),
            (
                format!("{on}{one_way}{sub}"),
                "mqtt[0].url",
                "client certificate",
            ),
            (
                format!("{on}{mutual}{sub}[live_query]\nurl = \"mqtt://broker:1885\"\n"),
                "live_query.url",
                "plain mqtt://",
            ),
            (
                format!("{on}{}", opcua("none")),
                "opcua[0].security_policy",
                "none",
            ),
        ] {
            let err = parse(&cfg).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(says), "{err}");
            // The error tells how to opt out on an isolated network.
            assert!(err.contains("require_secure_ot = false"), "{err}");
            assert!(err.contains("isolated machine network"), "{err}");
        }
        let c = parse(&format!("{on}{mutual}{sub}{}", opcua("basic256sha256"))).unwrap();
        assert!(c.security.require_secure_ot);
        // Opting out (or an older file without the section) accepts plain brokers.
        let off = "[security]\nrequire_secure_ot = false\n";
        assert!(
            !parse(&format!("{off}{BROKER}{sub}"))
                .unwrap()
                .security
                .require_secure_ot
        );
        assert!(
            !parse(&format!("{BROKER}{sub}"))
                .unwrap()
                .security
                .require_secure_ot
        );
        let err = parse("[security]\nrequire_secure_of = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("require_secure_of"), "{err}");
    }

    #[test]
    fn live_query_reuses_a_source_broker_or_names_its_own() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"a/+\"\nmachine = \"m\"\nmetric = \"x\"\n\
                   value = { kind = \"number\" }\n";
        let tls = BROKER.replace("mqtt://", "mqtts://")
            + "ca_file = \"/ca.pem\"\nclient_cert_file = \"/c.pem\"\nclient_key_file = \"/k.pem\"\n";
        let org = uuid::Uuid::new_v4();
        let c = parse(&format!(
            "{tls}{sub}[live_query]\nbroker = \"b1\"\norg_id = \"{org}\"\n"
        ))
        .unwrap();
        let lq = c.live_query.unwrap();
        assert_eq!(lq.broker.endpoint.port(), 1884);
        assert!(lq.broker.endpoint.tls().unwrap().client_auth.is_some());
        assert_eq!(lq.broker.client_id, "kip-live-gw-1");
        assert_eq!(lq.topic_prefix, "kip/v1");
        assert_eq!(lq.org_id, Some(org));
        let own =
            parse("[live_query]\nurl = \"mqtt://broker:1885\"\ntopic_prefix = \"site/kip\"\n")
                .unwrap()
                .live_query
                .unwrap();
        assert_eq!(
            (own.broker.endpoint.host(), own.broker.endpoint.port()),
            ("broker", 1885)
        );
        assert!(own.broker.subscriptions.is_empty());
        assert!(parse("").unwrap().live_query.is_none());
    }

    #[test]
    fn live_query_errors_name_the_field() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"a/+\"\nmachine = \"m\"\nmetric = \"x\"\n\
                   value = { kind = \"number\" }\n";
        let cases = [
            ("[live_query]\n".to_owned(), "live_query"),
            (
                "[live_query]\nbroker = \"nope\"\n".to_owned(),
                "live_query.broker",
            ),
            (
                "[live_query]\nurl = \"mqtt://x\"\ntopic_prefix = \"kip/#\"\n".to_owned(),
                "live_query.topic_prefix",
            ),
            (
                "[live_query]\nurl = \"mqtt://x\"\nmax_tracked_values = 0\n".to_owned(),
                "live_query.max_tracked_values",
            ),
            (
                "[live_query]\nurl = \"mqtt://x\"\nca_file = \"/ca.pem\"\n".to_owned(),
                "live_query.url",
            ),
            (
                format!("{BROKER}{sub}[live_query]\nbroker = \"b1\"\nclient_id = \"kip\"\n"),
                "live_query.client_id",
            ),
            (
                "[live_query]\nurl = \"mqtt://x\"\ntypo = 1\n".to_owned(),
                "typo",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn example_config_in_deploy_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.device.as_str(), "press-line-1");
        assert!(
            cfg.security.require_secure_ot,
            "installs start with OT TLS enforced"
        );
        assert_eq!(cfg.buffer.flush_interval, Duration::from_millis(200));
        assert_eq!(cfg.http_listen_addr.port(), 9464);
        assert_eq!(cfg.mqtt.len(), 1);
        assert_eq!(cfg.opcua.len(), 1);
        assert_eq!(cfg.opcua[0].nodes.len(), 2);
        assert_eq!(
            cfg.opcua[0].security_policy,
            crate::opcua::OpcUaSecurityPolicy::Basic256Sha256
        );
        let b = &cfg.mqtt[0];
        assert_eq!(
            (b.endpoint.host(), b.endpoint.port()),
            ("broker.plant.local", 8883)
        );
        assert!(b.endpoint.tls().unwrap().client_auth.is_some());
        assert_eq!(b.max_packet_size_bytes, 1024 * 1024);
        assert_eq!(b.subscriptions.len(), 3);
        assert_eq!(
            cfg.sync.endpoints,
            [
                "https://cp.example.com:8443",
                "https://cp-2.example.com:8443"
            ]
        );
        assert_eq!(cfg.sync.batch_max_records, 10_000);
        assert_eq!(cfg.sync.request_timeout, Duration::from_secs(30));
        assert_eq!(b.subscriptions[0].value, ValueFormat::Number {});
        assert_eq!(b.subscriptions[1].metric, NameSource::TopicLevel(3));
        assert!(matches!(
            &b.subscriptions[2].value,
            ValueFormat::Json {
                timestamp_pointer: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn sync_settings_are_checked_by_name() {
        for (extra, field) in [
            (
                "[sync]\nendpoints = [\"http://cp:8443\"]",
                "sync.endpoints[0]",
            ),
            ("[sync]\nbatch_max_records = 0", "sync.batch_max_records"),
            ("[sync]\nbatch_max_bytes = 10", "sync.batch_max_bytes"),
            (
                "[sync]\nbackoff_min_ms = 5000\nbackoff_max_ms = 10",
                "sync.backoff_max_ms",
            ),
            ("[sync]\nrequest_timeout_ms = 1", "sync.request_timeout_ms"),
            ("[sync]\ninterval = 1", "interval"),
            (
                "[sync]\nmax_in_flight_batches = 0",
                "sync.max_in_flight_batches",
            ),
        ] {
            let err = parse(extra).unwrap_err().to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = parse("").unwrap();
        assert!(cfg.sync.endpoints.is_empty());
        assert_eq!(cfg.buffer.max_bytes, 512 * 1024 * 1024);
        assert_eq!(cfg.http_listen_addr.to_string(), "127.0.0.1:9464");
        assert!(cfg.mqtt.is_empty());
        assert_eq!(cfg.buffer_dir(), Path::new("/tmp/kip/buffer"));
    }

    #[test]
    fn unknown_keys_are_named_even_inside_the_value_mapping() {
        for (toml, key) in [
            ("[buffer]\nflush_interval = 5\n", "flush_interval"),
            (
                &format!(
                    "{BROKER}[[mqtt.subscriptions]]\ntopic = \"a\"\nmachine = \"m\"\n\
                     metric = \"x\"\nvalue = {{ kind = \"number\", pointr = \"/v\" }}\n"
                ) as &str,
                "pointr",
            ),
            (
                "[[opcua]]\nname = \"p\"\nurl = \"opc.tcp://x\"\nsampling_ms = 1\n",
                "sampling_ms",
            ),
        ] {
            let err = parse(toml).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("a.toml"), "{toml}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"a/+\"\nmachine = \"m\"\nmetric = \"x\"\n\
                   value = { kind = \"number\" }\n";
        let cases: Vec<(String, &str)> = vec![
            (
                "[buffer]\nflush_interval_ms = 0".into(),
                "buffer.flush_interval_ms",
            ),
            ("[buffer]\nmax_bytes = 10".into(), "buffer.max_bytes"),
            (
                "[buffer]\nack_flush_threshold_records = 0".into(),
                "buffer.ack_flush_threshold_records",
            ),
            ("[http]\nlisten_addr = \"x\"".into(), "http.listen_addr"),
            ("[log]\nformat = \"xml\"".into(), "log.format"),
            (
                format!("{}{sub}", BROKER.replace("mqtt://", "http://")),
                "mqtt[0].url",
            ),
            (
                format!("{}{sub}", BROKER.replace("1884", "0")),
                "mqtt[0].url",
            ),
            (
                format!("{}{sub}", BROKER.replace("b1", "B 1")),
                "mqtt[0].name",
            ),
            (
                format!("{}{sub}", BROKER.replace("mqtt://", "mqtts://")),
                "mqtt[0].ca_file",
            ),
            (
                format!("{BROKER}client_cert_file = \"c.pem\"\n{sub}"),
                "mqtt[0].client_key_file",
            ),
            (
                format!("{BROKER}ca_file = \"ca.pem\"\n{sub}"),
                "mqtt[0].url",
            ),
            (BROKER.to_owned(), "mqtt[0].subscriptions"),
            (
                format!("{BROKER}{}", sub.replace("a/+", "a/#/b")),
                "subscriptions[0].topic",
            ),
            (
                format!(
                    "{BROKER}{}",
                    sub.replace("metric = \"x\"", "metric_topic_level = 5")
                ),
                "mqtt[0].subscriptions[0].metric_topic_level",
            ),
            (
                format!("{BROKER}{}", sub.replace("machine = \"m\"\n", "")),
                "mqtt[0].subscriptions[0].machine",
            ),
            (
                format!(
                    "{BROKER}{}",
                    sub.replace(
                        "{ kind = \"number\" }",
                        "{ kind = \"json\", pointer = \"v\" }"
                    )
                ),
                "mqtt[0].subscriptions[0].value.pointer",
            ),
            (format!("{BROKER}{sub}{BROKER}{sub}"), "mqtt[1].name"),
        ];
        for (toml, field) in cases {
            let err = parse(&toml).unwrap_err().to_string();
            assert!(err.contains(field), "{toml}\n=> {err}");
        }
    }

    #[test]
    fn topic_level_names_resolve_against_the_received_topic() {
        let s = NameSource::TopicLevel(2);
        assert_eq!(s.resolve("plant/press1/temp"), Some("temp"));
        assert_eq!(s.resolve("plant/press1"), None);
        assert_eq!(s.resolve("plant/press1/"), None);
        assert_eq!(NameSource::Fixed("x".into()).resolve("a"), Some("x"));
    }

    #[test]
    fn ipv6_brokers_packet_and_staging_limits_are_checked() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"#\"\nmachine = \"m\"\n\
                   metric_topic_level = 4\nvalue = { kind = \"number\" }\n";
        let with = |url: &str, extra: &str| {
            parse(&format!(
                "{}{extra}{sub}",
                BROKER.replace("mqtt://127.0.0.1:1884", url)
            ))
        };
        let cfg = with("mqtt://[::1]:1884", "").unwrap();
        let b = &cfg.mqtt[0];
        assert_eq!((b.endpoint.host(), b.endpoint.port()), ("::1", 1884));
        assert_eq!(b.endpoint.socket_host(), "[::1]");
        assert_eq!(b.staging_capacity_messages, 50_000);
        let field = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(with("mqtt://::1", "")), "mqtt[0].url");
        assert_eq!(
            field(with("mqtts://[::1]:8883", "ca_file = \"/ca\"\n")),
            "mqtt[0].url"
        );
        assert_eq!(
            field(with("mqtt://b", "max_packet_size_bytes = 10\n")),
            "mqtt[0].max_packet_size_bytes"
        );
        assert_eq!(
            field(with("mqtt://b", "staging_capacity_messages = 0\n")),
            "mqtt[0].staging_capacity_messages"
        );
        let cfg = with("mqtt://b", "max_packet_size_bytes = 2048\n").unwrap();
        assert_eq!(cfg.mqtt[0].max_packet_size_bytes, 2048);
    }

    #[test]
    fn urls_without_a_port_get_the_mqtt_default() {
        let sub = "[[mqtt.subscriptions]]\ntopic = \"#\"\nmachine = \"m\"\n\
                   metric_topic_level = 4\nvalue = { kind = \"number\" }\n";
        let cfg = parse(&format!("{}{sub}", BROKER.replace(":1884", ""))).unwrap();
        assert_eq!(
            (cfg.mqtt[0].endpoint.host(), cfg.mqtt[0].endpoint.port()),
            ("127.0.0.1", 1883)
        );
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = Config::load(Path::new("/nonexistent/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/agent.toml"), "{err}");
    }
}
