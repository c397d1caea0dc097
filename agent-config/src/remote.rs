//! Remote configuration: the part of `agent.toml` the control plane may set.
//!
//! A remote configuration is a TOML document holding only [`REMOTE_SECTIONS`]. The agent's
//! effective configuration is its local file with every section present in the remote
//! document replaced as a whole ([`merge`]); sections absent from it stay as the local file
//! has them.
//!
//! Invariants:
//! - Local-only settings can never be set remotely: `[agent]` (device name, state directory),
//!   `[http]`, `[log]` and `buffer.max_bytes` (shrinking a full buffer would drop records)
//!   are refused by [`parse`], which both the control plane and the agent run.
//! - The control plane validates with [`validate_for_device`], i.e. the agent's own
//!   [`RawConfig::validate`] on the document merged into a stand-in local file; the agent
//!   validates again against its real local file before applying.

use toml::Table;

use crate::config::{Config, ConfigError, RawConfig};

/// Top-level sections a remote configuration may hold.
pub const REMOTE_SECTIONS: &[&str] =
    &["buffer", "inference", "live_query", "mqtt", "opcua", "sync"];

/// Largest remote configuration document accepted (bytes of TOML).
pub const MAX_REMOTE_BYTES: usize = 256 * 1024;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Parses a remote document and refuses local-only settings; does not validate values.
pub fn parse(text: &str) -> Result<Table, ConfigError> {
    if text.len() > MAX_REMOTE_BYTES {
        return Err(invalid(
            "config",
            format!("is {} bytes, the limit is {MAX_REMOTE_BYTES}", text.len()),
        ));
    }
    let table: Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: "remote configuration".into(),
        message: e.message().to_owned()
            + &e.span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default(),
    })?;
    for key in table.keys() {
        if !REMOTE_SECTIONS.contains(&key.as_str()) {
            let why = match key.as_str() {
                "agent" | "http" | "log" => {
                    "is local-only: it can only be changed in the device's own file"
                }
                _ => "is not a section of the agent configuration",
            };
            return Err(invalid(
                key.clone(),
                format!("{why} (remote sections: {})", REMOTE_SECTIONS.join(", ")),
            ));
        }
    }
    if let Some(b) = table.get("buffer").and_then(toml::Value::as_table)
        && b.contains_key("max_bytes")
    {
        return Err(invalid(
            "buffer.max_bytes",
            "is local-only: shrinking the buffer under its content would drop records",
        ));
    }
    Ok(table)
}

/// The local file with each section of `remote` replacing the local one.
pub fn merge(local: &Table, remote: &Table) -> Table {
    let mut out = local.clone();
    for (k, v) in remote {
        let v = match (k.as_str(), v, local.get(k)) {
            // `buffer.max_bytes` stays the device's even though the section is replaced.
            ("buffer", toml::Value::Table(r), Some(toml::Value::Table(l))) => {
                let mut b = r.clone();
                if let Some(m) = l.get("max_bytes") {
                    b.insert("max_bytes".into(), m.clone());
                }
                toml::Value::Table(b)
            }
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    out
}

/// Validates `merged` with the agent's own code.
pub fn validate_table(merged: Table) -> Result<Config, ConfigError> {
    let raw: RawConfig = merged
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: "merged configuration".into(),
            message: e.message().to_owned(),
        })?;
    raw.validate()
}

/// What the control plane runs before it stores a remote configuration: [`parse`], then the
/// agent's validation of the document merged into a stand-in local file for `device`.
pub fn validate_for_device(text: &str, device: &str) -> Result<(), ConfigError> {
    let remote = parse(text)?;
    let mut local = Table::new();
    let mut agent = Table::new();
    agent.insert("device".into(), device.into());
    agent.insert("state_dir".into(), "/var/lib/kip-agent".into());
    local.insert("agent".into(), toml::Value::Table(agent));
    validate_table(merge(&local, &remote)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_only_sections_and_unknown_ones_are_refused() {
        for (text, field) in [
            ("[agent]\nstate_dir = \"/x\"\n", "agent"),
            ("[log]\nfilter = \"debug\"\n", "log"),
            ("[typo]\n", "typo"),
            ("[buffer]\nmax_bytes = 1000000\n", "buffer.max_bytes"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn remote_sections_replace_local_ones_and_keep_the_buffer_size() {
        let local: Table = toml::from_str(
            "[agent]\ndevice = \"gw\"\nstate_dir = \"/s\"\n[buffer]\nmax_bytes = 1048576\n\
             [sync]\nendpoints = [\"https://old:1\"]\n",
        )
        .unwrap();
        let remote =
            parse("[sync]\nendpoints = [\"https://new:2\"]\n[buffer]\nflush_interval_ms = 50\n")
                .unwrap();
        let cfg = validate_table(merge(&local, &remote)).unwrap();
        assert_eq!(cfg.sync.endpoints, vec!["https://new:2".to_owned()]);
        assert_eq!(cfg.buffer.max_bytes, 1_048_576);
        assert_eq!(cfg.buffer.flush_interval.as_millis(), 50);
        assert_eq!(cfg.state_dir, std::path::Path::new("/s"));
    }

    #[test]
    fn the_control_plane_check_names_the_bad_field() {
        let err = validate_for_device(
            "[[mqtt]]\nname = \"b\"\nurl = \"http://x\"\nclient_id = \"c\"\n",
            "gw-1",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mqtt[0].url"), "{err}");
        validate_for_device("[sync]\ninterval_ms = 500\n", "gw-1").unwrap();
    }
}
