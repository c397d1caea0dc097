//! `[[opcua]]` endpoint configuration: the types and their validation, shared by the agent
//! (which runs the source, `kip_agent::opcua`) and the control plane (which validates remote
//! configurations before sending them).

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

use opcua_types::NodeId;
use serde::Deserialize;

/// Default application URI of the agent's OPC UA client certificate.
pub const DEFAULT_APPLICATION_URI: &str = "urn:kip:agent";

fn default_publishing_interval_ms() -> u64 {
    1000
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_reconnect_probe_interval_ms() -> u64 {
    250
}

/// Message security the agent uses towards one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OpcUaSecurityPolicy {
    /// No signing or encryption (isolated machine networks only).
    #[default]
    None,
    /// Basic256Sha256, always with SignAndEncrypt.
    Basic256Sha256,
}

/// One server node whose value is a metric of a machine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaNodeConfig {
    /// OPC UA node id in string form, e.g. `ns=2;s=Machine1.Temp`.
    pub node_id: String,
    /// Machine the value belongs to.
    pub machine: String,
    /// Metric name of the value.
    pub metric: String,
    /// Requested sampling interval; absent means "the subscription's publishing interval".
    #[serde(default)]
    pub sampling_interval_ms: Option<u64>,
}

/// The user the agent activates its session as (`[opcua.user_identity]`), on top of the
/// channel's security policy. Secrets stay out of the config file: the password and the key
/// are read from their files at each connect by the agent (so a rotated file takes effect on
/// reconnect).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OpcUaUserIdentity {
    /// No user (the default).
    #[default]
    Anonymous,
    /// User name and a password read from `password_file` (trailing newline ignored).
    Username {
        username: String,
        password_file: PathBuf,
    },
    /// An X.509 user certificate (PEM or DER) and its RSA private key (PEM).
    X509 {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// One OPC UA server endpoint the agent subscribes to (`[[opcua]]` in the agent config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcUaEndpointConfig {
    /// Source name written into every record.
    pub name: String,
    /// Endpoint URL, `opc.tcp://host:port/path`.
    pub url: String,
    /// Redundant servers of the same source (same nodes and security), tried in order after
    /// `url`: after a lost session or a failed connect the next attempt goes to the next server
    /// of the list (wrapping).
    #[serde(default)]
    pub failover_urls: Vec<String>,
    /// `none` or `basic256sha256` (always SignAndEncrypt).
    #[serde(default)]
    pub security_policy: OpcUaSecurityPolicy,
    /// PKI directory: `own/cert.der`, `private/private.pem`, `trusted/`, `rejected/`.
    /// A missing own certificate is generated (RSA 2048) on first use; a server is trusted
    /// when its exact certificate is in `trusted/`.
    pub pki_dir: PathBuf,
    /// ApplicationUri of the agent; must equal the URI in its certificate.
    #[serde(default)]
    pub application_uri: Option<String>,
    /// Server certificate files (DER or PEM) copied into `trusted/` at start-up.
    #[serde(default)]
    pub trust_server_certs: Vec<PathBuf>,
    /// Subscription publishing interval.
    #[serde(default = "default_publishing_interval_ms")]
    pub publishing_interval_ms: u64,
    /// First reconnect delay; doubles per failed attempt up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// While waiting to reconnect, the server's port is probed (TCP connect) this often; a
    /// server seen down and then accepting again ends the wait at once. 0: no probe.
    #[serde(default = "default_reconnect_probe_interval_ms")]
    pub reconnect_probe_interval_ms: u64,
    /// Nodes to subscribe to.
    pub nodes: Vec<OpcUaNodeConfig>,
    /// The user of the session (default anonymous).
    #[serde(default)]
    pub user_identity: OpcUaUserIdentity,
}

/// An invalid OPC UA endpoint configuration, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("opcua endpoint {endpoint:?}: `{field}` {problem}")]
pub struct OpcUaConfigError {
    /// `name` of the endpoint (may be empty when the name itself is the problem).
    pub endpoint: String,
    /// Field path, e.g. `nodes[2].node_id`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl OpcUaEndpointConfig {
    /// Checks the configuration; the error names the first offending field.
    pub fn validate(&self) -> Result<(), OpcUaConfigError> {
        let err = |field: &str, problem: String| OpcUaConfigError {
            endpoint: self.name.clone(),
            field: field.to_owned(),
            problem,
        };
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        validate_url(&self.url).map_err(|p| err("url", p))?;
        for (j, u) in self.failover_urls.iter().enumerate() {
            validate_url(u).map_err(|p| err(&format!("failover_urls[{j}]"), p))?;
        }
        if self.pki_dir.as_os_str().is_empty() {
            return Err(err("pki_dir", "must not be empty".into()));
        }
        if let Some(uri) = &self.application_uri
            && uri.trim().is_empty()
        {
            return Err(err("application_uri", "must not be empty when set".into()));
        }
        if self.publishing_interval_ms == 0 {
            return Err(err("publishing_interval_ms", "must be > 0".into()));
        }
        if self.reconnect_min_ms == 0 {
            return Err(err("reconnect_min_ms", "must be > 0".into()));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(err(
                "reconnect_max_ms",
                format!("must be >= reconnect_min_ms ({})", self.reconnect_min_ms),
            ));
        }
        if self.reconnect_probe_interval_ms != 0
            && !(10..=60_000).contains(&self.reconnect_probe_interval_ms)
        {
            return Err(err(
                "reconnect_probe_interval_ms",
                format!(
                    "must be 0 (off) or 10..=60000, got {}",
                    self.reconnect_probe_interval_ms
                ),
            ));
        }
        if self.nodes.is_empty() {
            return Err(err("nodes", "must list at least one node".into()));
        }
        let mut seen = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if let Err(e) = NodeId::from_str(node.node_id.trim()) {
                return Err(err(
                    &format!("nodes[{i}].node_id"),
                    format!("{:?} is not an OPC UA node id ({e})", node.node_id),
                ));
            }
            if node.machine.trim().is_empty() {
                return Err(err(
                    &format!("nodes[{i}].machine"),
                    "must not be empty".into(),
                ));
            }
            if node.metric.trim().is_empty() {
                return Err(err(
                    &format!("nodes[{i}].metric"),
                    "must not be empty".into(),
                ));
            }
            if !seen.insert((node.machine.as_str(), node.metric.as_str())) {
                return Err(err(
                    &format!("nodes[{i}].metric"),
                    format!(
                        "machine {:?} metric {:?} is configured twice",
                        node.machine, node.metric
                    ),
                ));
            }
        }
        match &self.user_identity {
            OpcUaUserIdentity::Anonymous | OpcUaUserIdentity::X509 { .. } => {}
            OpcUaUserIdentity::Username { username, .. } => {
                if username.trim().is_empty() {
                    return Err(err("user_identity.username", "must not be empty".into()));
                }
                if self.security_policy == OpcUaSecurityPolicy::None {
                    return Err(err(
                        "user_identity",
                        "a password is refused over security_policy \"none\": use \
                         basic256sha256 so it never crosses the network unencrypted"
                            .into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks what only the device can: that the `trust_server_certs` files exist. Kept out
    /// of [`Self::validate`] because the control plane validates remote configurations with
    /// the same code and cannot see the device's files.
    pub fn check_local_files(&self) -> Result<(), OpcUaConfigError> {
        for (i, path) in self.trust_server_certs.iter().enumerate() {
            if !path.is_file() {
                return Err(OpcUaConfigError {
                    endpoint: self.name.clone(),
                    field: format!("trust_server_certs[{i}]"),
                    problem: format!("{} is not a readable file", path.display()),
                });
            }
        }
        let files: Vec<(&str, &PathBuf)> = match &self.user_identity {
            OpcUaUserIdentity::Anonymous => vec![],
            OpcUaUserIdentity::Username { password_file, .. } => {
                vec![("user_identity.password_file", password_file)]
            }
            OpcUaUserIdentity::X509 {
                cert_file,
                key_file,
            } => vec![
                ("user_identity.cert_file", cert_file),
                ("user_identity.key_file", key_file),
            ],
        };
        for (field, path) in files {
            if !path.is_file() {
                return Err(OpcUaConfigError {
                    endpoint: self.name.clone(),
                    field: field.to_owned(),
                    problem: format!("{} is not a readable file", path.display()),
                });
            }
        }
        Ok(())
    }

    /// The ApplicationUri the agent presents (and puts into its own certificate).
    pub fn application_uri(&self) -> &str {
        self.application_uri
            .as_deref()
            .unwrap_or(DEFAULT_APPLICATION_URI)
    }
}

fn validate_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("opc.tcp://") else {
        return Err(format!("{url:?} must start with opc.tcp://"));
    };
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.is_empty() || host_port.starts_with(':') {
        return Err(format!("{url:?} has no host"));
    }
    Ok(())
}
