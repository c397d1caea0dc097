//! `kipctl release`: agent releases and their rollouts (agent self-update, see
//! docs/operations.md "Agent self-update").

use std::{io::Write, path::PathBuf};

use clap::Subcommand;
use kip_api::{AgentRelease, DeviceUpdateStatus, ReleaseRollout};
use uuid::Uuid;

use super::{CliError, Client, TableRow, emit_rows, or_dash, parse_label, resolve_org, write_json};

#[derive(Subcommand, Debug, Clone)]
pub enum ReleaseCmd {
    /// Upload an agent release tarball (scripts/package-agent.sh); the control plane signs
    /// it. The version defaults to the one in the file name (kip-agent-<version>-...).
    Upload {
        file: PathBuf,
        #[arg(long)]
        version: Option<String>,
    },
    /// List the organisation's releases.
    List,
    /// Rollouts of a release to the devices.
    #[command(subcommand)]
    Rollout(RolloutCmd),
}

#[derive(Subcommand, Debug, Clone)]
pub enum RolloutCmd {
    /// Offer a release to a share of the devices whose labels match.
    Start {
        /// The release version.
        version: String,
        /// Share of the matching devices, 1..100 (stable: a hash of release and device).
        #[arg(long, default_value_t = 100)]
        percent: u8,
        /// Label the devices must have (key=value, repeatable; none: every device).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Stop offering the release to devices that have not started it.
    Pause { rollout_id: Uuid },
    /// Offer it again.
    Resume { rollout_id: Uuid },
    /// Stop offering it to anyone (installed devices keep it).
    Abort { rollout_id: Uuid },
    /// The rollout and every selected device's update state; without an id, every rollout.
    Status { rollout_id: Option<Uuid> },
}

/// The version in a `kip-agent-<version>-<arch>-linux.tar.gz` file name.
fn version_from_name(file: &std::path::Path) -> Option<String> {
    let name = file.file_name()?.to_str()?;
    let rest = name.strip_prefix("kip-agent-")?.strip_suffix(".tar.gz")?;
    let (version, _arch) = rest.split_once('-')?;
    Some(version.to_owned())
}

impl TableRow for AgentRelease {
    const HEADERS: &'static [&'static str] = &["VERSION", "SHA256", "BYTES", "SIGNED", "UPLOADED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.version.clone(),
            self.sha256.clone(),
            self.size_bytes.to_string(),
            if self.signature.is_some() {
                "yes"
            } else {
                "no"
            }
            .into(),
            self.uploaded_at.to_rfc3339(),
        ]
    }
}

impl TableRow for ReleaseRollout {
    const HEADERS: &'static [&'static str] = &["ID", "VERSION", "PERCENT", "STATE", "SELECTOR"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.version.clone(),
            self.percent.to_string(),
            self.state.clone(),
            serde_json::Value::Object(self.selector.clone()).to_string(),
        ]
    }
}

impl TableRow for DeviceUpdateStatus {
    const HEADERS: &'static [&'static str] = &["DEVICE", "NAME", "STATE", "AGENT", "REASON"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.device_id.to_string(),
            self.device_name.clone(),
            self.state.clone(),
            or_dash(self.agent_version.clone()),
            or_dash(self.reason.clone()),
        ]
    }
}

pub(super) async fn run(
    client: &Client,
    org: Option<&str>,
    cmd: ReleaseCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let org = resolve_org(client, org).await?;
    let releases = format!("/v1/organisations/{org}/releases");
    let rollouts = format!("/v1/organisations/{org}/release-rollouts");
    match cmd {
        ReleaseCmd::Upload { file, version } => {
            let version = version
                .or_else(|| version_from_name(&file))
                .ok_or_else(|| {
                    CliError::Decode(format!(
                        "cannot tell the version from {}: pass --version",
                        file.display()
                    ))
                })?;
            let bytes = std::fs::read(&file)
                .map_err(|e| CliError::Decode(format!("cannot read {}: {e}", file.display())))?;
            let r: AgentRelease = client
                .put_bytes(&format!("{releases}/{version}"), bytes)
                .await?;
            emit_rows(out, json, &[r])
        }
        ReleaseCmd::List => {
            let r: Vec<AgentRelease> = client.get(&releases).await?;
            emit_rows(out, json, &r)
        }
        ReleaseCmd::Rollout(RolloutCmd::Start {
            version,
            percent,
            labels,
        }) => {
            let selector: serde_json::Map<String, serde_json::Value> = labels
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            let r: ReleaseRollout = client
                .post(
                    &rollouts,
                    serde_json::json!({ "version": version, "percent": percent, "selector": selector }),
                )
                .await?;
            emit_rows(out, json, &[r])
        }
        ReleaseCmd::Rollout(RolloutCmd::Pause { rollout_id }) => {
            change(client, &rollouts, rollout_id, "pause", json, out).await
        }
        ReleaseCmd::Rollout(RolloutCmd::Resume { rollout_id }) => {
            change(client, &rollouts, rollout_id, "resume", json, out).await
        }
        ReleaseCmd::Rollout(RolloutCmd::Abort { rollout_id }) => {
            change(client, &rollouts, rollout_id, "abort", json, out).await
        }
        ReleaseCmd::Rollout(RolloutCmd::Status { rollout_id: None }) => {
            let r: Vec<ReleaseRollout> = client.get(&rollouts).await?;
            emit_rows(out, json, &r)
        }
        ReleaseCmd::Rollout(RolloutCmd::Status {
            rollout_id: Some(id),
        }) => {
            let r: ReleaseRollout = client.get(&format!("{rollouts}/{id}")).await?;
            if json {
                return write_json(out, &r);
            }
            emit_rows(out, false, std::slice::from_ref(&r))?;
            writeln!(out)?;
            emit_rows(out, false, &r.devices)
        }
    }
}

async fn change(
    client: &Client,
    rollouts: &str,
    id: Uuid,
    action: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r: ReleaseRollout = client
        .post(&format!("{rollouts}/{id}/{action}"), serde_json::json!({}))
        .await?;
    emit_rows(out, json, &[r])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_a_package_file_name() {
        assert_eq!(
            version_from_name(std::path::Path::new(
                "/x/kip-agent-1.4.0-x86_64-linux.tar.gz"
            ))
            .as_deref(),
            Some("1.4.0")
        );
        assert_eq!(version_from_name(std::path::Path::new("agent.tgz")), None);
    }
}
