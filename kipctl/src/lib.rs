//! `kipctl`: the admin CLI of the kip control plane. The binary only parses the command line
//! and calls [`run`]; tests call [`run`] in-process.
//!
//! This crate is a thin HTTP client: it decodes the server's answers into the shared
//! [`kip_api`] types and links neither axum nor sqlx (`cargo tree -p kipctl -i axum` finds
//! nothing).
//!
//! Invariants: the server's error body is shown verbatim (code and message) so the operator
//! sees the same text the API gives; secrets (API keys) are only printed when they are the
//! result the operator asked for (a newly created key).

mod release;

use std::{io::Write, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

use kip_api::{
    AiModel, ApiKeyInfo, ArtifactInfo, AuditPage, CaStatus, ConfigVersion, CreatedApiKey, Device,
    DeviceConfigStatus, DeviceModelStatus, EnrollToken, MaintenanceEvent, MaintenanceEventPage, Me,
    ModelMonitoringPage, ModelMonitoringRecord, ModelRollout, ModelSigningStatus, Organisation,
    PredictionPage, PredictionRecord, Revocation, RolloutReport, RolloutThresholds,
    StartModelRollout,
};

#[derive(Parser, Debug)]
#[command(name = "kipctl", version, about = "Administer a kip control plane")]
pub struct Cli {
    /// Control-plane URL.
    #[arg(
        long,
        env = "KIP_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub server: String,
    /// API key (prefer KIP_API_KEY or --api-key-file so it stays out of shell history).
    #[arg(long, env = "KIP_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// File holding the API key, e.g. the admin key file written at first start.
    #[arg(long, env = "KIP_API_KEY_FILE", global = true)]
    pub api_key_file: Option<PathBuf>,
    /// Organisation (id or name). Defaults to the organisation of an organisation key.
    #[arg(long, env = "KIP_ORG", global = true)]
    pub org: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show which key is in use and what it may do.
    Whoami,
    /// Organisations (create/delete need the platform-admin key).
    #[command(subcommand)]
    Org(OrgCmd),
    /// API keys of an organisation.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Devices (edge gateways) of an organisation.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// AI models of an organisation.
    #[command(subcommand)]
    Model(ModelCmd),
    /// The fleet CA: init and rotations work on local files; status, reload and the safety
    /// check of finish-rotation ask the server (platform-admin key).
    #[command(subcommand)]
    Ca(CaCmd),
    /// The organisation's audit log: every state-changing call, newest first (org-admin).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Maintenance events (failure, repair, replacement) of machines: the ground truth that
    /// labels readings for training.
    #[command(subcommand)]
    Maintenance(MaintenanceCmd),
    /// Predictions the agents synced.
    #[command(subcommand)]
    Predictions(PredictionsCmd),
    /// Documents (manuals, procedures, reports) of an organisation, used by grounded answers.
    #[command(subcommand)]
    Doc(DocCmd),
    /// Certificates for OT devices (MQTT brokers, PLCs, OPC UA servers/clients) from the
    /// fleet CA (platform-admin key).
    #[command(subcommand)]
    Ot(OtCmd),
    /// Agent releases (self-update) and their staged rollouts.
    #[command(subcommand)]
    Release(release::ReleaseCmd),
}

#[derive(Subcommand, Debug)]
pub enum OtCmd {
    /// Issue (or, with --replaces, rotate) a certificate and write it to --out: cert.pem,
    /// chain.pem (what a TLS server presents), ca.pem (the fleet roots: the CA file of its
    /// peers), key.pem (mode 0600, only when no --csr) and, for opcua, cert.der.
    Issue {
        /// tls-server, tls-client or opcua.
        #[arg(long)]
        profile: String,
        /// Subject common name (Mosquitto's use_identity_as_username sees it).
        #[arg(long)]
        cn: String,
        /// DNS subject alternative name (repeatable).
        #[arg(long = "dns")]
        dns_names: Vec<String>,
        /// IP subject alternative name (repeatable).
        #[arg(long = "ip")]
        ip_addresses: Vec<String>,
        /// OPC UA ApplicationUri (opcua profile).
        #[arg(long)]
        application_uri: Option<String>,
        /// Lifetime in days (1 to 825).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// PEM CSR made on the device (its key never leaves it); without it a key is made.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Serial (hex) of the certificate this one replaces.
        #[arg(long)]
        replaces: Option<String>,
        /// Directory for the files (created with mode 0700).
        #[arg(long)]
        out: PathBuf,
    },
    /// Recorded OT certificates; with --expiring-within-days the renewal reminders.
    List {
        #[arg(long)]
        expiring_within_days: Option<u32>,
    },
}

/// `kipctl doc ...` (rag).
#[derive(Subcommand, Debug)]
pub enum DocCmd {
    /// Upload a Markdown (.md), plain text (.txt) or PDF (.pdf) file.
    Add {
        file: PathBuf,
        /// Title shown in citations (default: the file name).
        #[arg(long)]
        title: Option<String>,
        /// de, en, simple or auto (default: detected).
        #[arg(long)]
        language: Option<String>,
    },
    List,
    /// Delete a document; it is gone from retrieval at once.
    Rm {
        document_id: Uuid,
    },
    /// Hybrid search over the organisation's documents.
    Search {
        query: String,
        #[arg(long, default_value_t = 5)]
        k: u32,
    },
}

/// `url` with `params` as its (encoded) query string.
fn url_with(url: &str, params: &[(&str, String)]) -> Result<reqwest::Url, CliError> {
    reqwest::Url::parse_with_params(url, params)
        .map_err(|e| CliError::Decode(format!("invalid server URL {url:?}: {e}")))
}

/// A stored document, as the server returns it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct DocumentInfo {
    pub id: Uuid,
    pub title: String,
    pub media_type: String,
    pub language: String,
    pub size_bytes: i64,
    pub chunk_count: i32,
    pub created_at: String,
}

async fn doc_cmd(
    client: &Client,
    org: Uuid,
    cmd: &DocCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let base = format!("/v1/organisations/{org}/documents");
    let rows = |d: &Vec<DocumentInfo>| {
        d.iter()
            .map(|d| {
                vec![
                    d.id.to_string(),
                    d.title.clone(),
                    d.media_type.clone(),
                    d.language.clone(),
                    d.chunk_count.to_string(),
                    d.size_bytes.to_string(),
                ]
            })
            .collect()
    };
    let cols = &["ID", "TITLE", "TYPE", "LANGUAGE", "CHUNKS", "BYTES"];
    match cmd {
        DocCmd::Add {
            file,
            title,
            language,
        } => {
            let ext = file
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default();
            let media = match ext.as_str() {
                "md" | "markdown" => "text/markdown",
                "txt" | "text" => "text/plain",
                "pdf" => "application/pdf",
                other => {
                    return Err(CliError::Decode(format!(
                        "{}: unknown file type {other:?} (use .md, .txt or .pdf)",
                        file.display()
                    )));
                }
            };
            let bytes = std::fs::read(file.as_path())
                .map_err(|e| CliError::Decode(format!("cannot read {}: {e}", file.display())))?;
            let title = title.clone().unwrap_or_else(|| {
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "document".into())
            });
            let mut query = vec![("title", title)];
            if let Some(l) = language {
                query.push(("language", l.clone()));
            }
            let req = client
                .http
                .post(url_with(&format!("{}{base}", client.base), &query)?)
                .bearer_auth(&client.key)
                .header(reqwest::header::CONTENT_TYPE, media)
                .body(bytes);
            let body = client.answer(req).await?;
            let d: DocumentInfo =
                serde_json::from_slice(&body).map_err(|e| CliError::Decode(e.to_string()))?;
            emit(out, json, &vec![d], cols, rows)
        }
        DocCmd::List => {
            let d: Vec<DocumentInfo> = client.get(&base).await?;
            emit(out, json, &d, cols, rows)
        }
        DocCmd::Rm { document_id } => {
            client
                .send::<serde_json::Value>(
                    reqwest::Method::DELETE,
                    &format!("{base}/{document_id}"),
                    None,
                )
                .await?;
            writeln!(out, "document {document_id} deleted")?;
            Ok(())
        }
        DocCmd::Search { query, k } => {
            let req = client
                .http
                .get(url_with(
                    &format!("{}{base}/search", client.base),
                    &[("q", query.clone()), ("k", k.to_string())],
                )?)
                .bearer_auth(&client.key);
            let body = client.answer(req).await?;
            let hits: Vec<serde_json::Value> =
                serde_json::from_slice(&body).map_err(|e| CliError::Decode(e.to_string()))?;
            emit(
                out,
                json,
                &hits,
                &["CHUNK", "TITLE", "PAGE", "SCORE", "TEXT"],
                |h| {
                    h.iter()
                        .map(|h| {
                            vec![
                                h["chunk_id"].as_str().unwrap_or_default().to_owned(),
                                h["title"].as_str().unwrap_or_default().to_owned(),
                                h["page"]
                                    .as_i64()
                                    .map(|p| p.to_string())
                                    .unwrap_or_else(|| "-".into()),
                                format!("{:.4}", h["score"].as_f64().unwrap_or_default()),
                                h["content"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .chars()
                                    .take(60)
                                    .collect::<String>()
                                    .replace('\n', " "),
                            ]
                        })
                        .collect()
                },
            )
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum MaintenanceCmd {
    /// Record what happened to a machine behind a device.
    Record {
        #[arg(long)]
        device: Uuid,
        #[arg(long)]
        machine: String,
        /// failure, repair or replacement.
        #[arg(long)]
        kind: String,
        /// When it happened (RFC 3339); default now.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Events, oldest first.
    List {
        #[arg(long)]
        device: Option<Uuid>,
        #[arg(long)]
        machine: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PredictionsCmd {
    /// The latest prediction of every machine.
    Latest {
        #[arg(long)]
        device: Option<Uuid>,
    },
    /// Prediction history, oldest first.
    History {
        #[arg(long)]
        device: Option<Uuid>,
        #[arg(long)]
        machine: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// One page of the audit log, newest first; the next page's cursor is printed last.
    List {
        /// Rows per page (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Create a root and an intermediate CA in DIR (private keys written with mode 0600).
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a new intermediate (needs DIR/root.key); the old one stays trusted until
    /// `finish-rotation`. Running control planes load it within pki.ca_reload_interval_s.
    RotateIntermediate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create a new root and an intermediate under it (needs DIR/root.key). The trust bundle
    /// holds the old and the new root until `finish-rotation`; agents receive it on their
    /// next sync.
    RotateRoot {
        #[arg(long)]
        dir: PathBuf,
    },
    /// End a rotation: retire the previous intermediate (and root) into DIR/retired/. Refused
    /// while the server still counts active certificates of the previous intermediate,
    /// unless --force (then it needs no server).
    FinishRotation {
        #[arg(long)]
        dir: PathBuf,
        /// Skip the server check: agents still on the previous intermediate are cut off.
        #[arg(long)]
        force: bool,
    },
    /// Start a model signing key rotation: a new key signs from now on, the previous public
    /// key stays trusted; running control planes load it within pki.ca_reload_interval_s and
    /// re-sign every artifact with the new key. Then run `finish-signing-key-rotation`.
    RotateSigningKey {
        #[arg(long)]
        dir: PathBuf,
    },
    /// End a model signing key rotation: retire the previous public key into DIR/retired/.
    /// Refused while the server still counts artifacts signed only by the previous key,
    /// unless --force (then it needs no server).
    FinishSigningKeyRotation {
        #[arg(long)]
        dir: PathBuf,
        /// Skip the server check: models still signed by the previous key stop loading.
        #[arg(long)]
        force: bool,
    },
    /// The model signing keys the server uses and how many artifacts each signs.
    SigningStatus,
    /// The CA the server uses and its active certificates per intermediate.
    Status,
    /// Make the server load changed CA files now (as SIGHUP; it also polls by itself).
    Reload,
}

impl CaCmd {
    /// Commands that touch only local files.
    fn is_local(&self) -> bool {
        match self {
            Self::Init { .. }
            | Self::RotateIntermediate { .. }
            | Self::RotateRoot { .. }
            | Self::RotateSigningKey { .. } => true,
            Self::FinishRotation { force, .. } | Self::FinishSigningKeyRotation { force, .. } => {
                *force
            }
            Self::Status | Self::Reload | Self::SigningStatus => false,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum OrgCmd {
    Create {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    List,
    Get {
        org: String,
    },
    Update {
        org: String,
        #[arg(long)]
        display_name: String,
    },
    Delete {
        org: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a key; it is shown once.
    Create {
        name: String,
        /// org-admin (everything in the organisation), operator (devices, models,
        /// rollouts), llm (the LLM API only) or read-only.
        #[arg(long, default_value = "org-admin")]
        role: String,
    },
    List,
    Revoke {
        key_id: Uuid,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    Register {
        name: String,
        /// Label as key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    List,
    Get {
        device_id: Uuid,
    },
    Delete {
        device_id: Uuid,
    },
    /// Create a one-time enrollment token; it is shown once.
    EnrollToken {
        /// Lifetime such as 3600, 90s, 30m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: u64,
        /// Bind the token to this device name (required to re-enroll an existing device).
        #[arg(long)]
        device_name: Option<String>,
    },
    /// Revoke every certificate of a device (effective on its next connection).
    Revoke {
        device_id: Uuid,
    },
    /// Fleet health: state (ONLINE, STALE, OFFLINE) and the agents' latest reports, worst
    /// first; one device with DEVICE_ID.
    Health {
        device_id: Option<Uuid>,
        /// Only devices in this state (online, stale, offline).
        #[arg(long)]
        state: Option<String>,
        /// Only devices whose name contains this.
        #[arg(long)]
        search: Option<String>,
    },
    /// Remote agent configuration (sources, buffer, sync, inference), per device or group.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// The desired configuration of a device and what its agent reports.
    Get { device_id: Uuid },
    /// Set a new version from a TOML file, for one device or for a group (--group k=v).
    Set {
        /// The device; omit with --group.
        device_id: Option<Uuid>,
        /// TOML with the remotely settable sections only.
        #[arg(long)]
        file: PathBuf,
        /// Label selector of the group, key=value; repeatable.
        #[arg(long = "group", value_parser = parse_label)]
        group: Vec<(String, String)>,
    },
    /// Line diff from the device's desired configuration to a file (or, without --file,
    /// from its previous version to its current one).
    Diff {
        device_id: Uuid,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Every version that targeted the device, newest first.
    History { device_id: Uuid },
}

/// A line diff (`-` removed, `+` added, two spaces unchanged) by longest common subsequence.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut out = String::new();
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        // Too large for the quadratic table: show it as replaced.
        a.iter().for_each(|l| out.push_str(&format!("- {l}\n")));
        b.iter().for_each(|l| out.push_str(&format!("+ {l}\n")));
        return out;
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

/// Parses a lifetime like `3600`, `90s`, `30m`, `1h` or `7d` into seconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 3600, 30m, 1h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    Register(RegisterModelArgs),
    List,
    Get {
        model_id: Uuid,
    },
    /// Upload a model's artifact file (e.g. the .onnx); its sha256 must match the registered one.
    Upload {
        model_id: Uuid,
        file: PathBuf,
    },
    /// Set a model's stage: none, staging, challenger, champion or archived.
    Stage {
        model_id: Uuid,
        stage: String,
    },
    /// Roll a model version out to a device (`--model none` stops the rollout).
    Rollout {
        #[arg(long)]
        device: Uuid,
        #[arg(long)]
        model: String,
    },
    /// Desired and running model of every device.
    Status,
    /// Canary and shadow rollouts to a share of a device group, with automatic halt.
    #[command(subcommand)]
    Rollouts(RolloutCmd),
    /// Whether the control plane reaches its MLflow tracking server (GET /v1/mlflow/status):
    /// while it does not, kip serves desired models from its own tables.
    Mlflow,
    /// Drift records the agents synced (PSI, KS, thresholds, alarm per feature and window),
    /// oldest first.
    Drift {
        #[arg(long)]
        device: Option<Uuid>,
        /// Model name.
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        version: Option<String>,
        /// Only windows above their threshold.
        #[arg(long)]
        alarms: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Start a rollout: `--selector line=a --percent 20 --mode canary MODEL_ID`.
    Start {
        model_id: Uuid,
        /// Device group label `key=value` (repeatable; every one must match).
        #[arg(long = "selector", value_parser = parse_label, required = true)]
        selector: Vec<(String, String)>,
        #[arg(long)]
        percent: u8,
        /// canary (selected devices serve the candidate) or shadow (they only run it beside
        /// the baseline).
        #[arg(long, default_value = "canary")]
        mode: String,
        /// Version to compare with and roll back to (default: the group's current one, else
        /// the previous version).
        #[arg(long)]
        baseline: Option<Uuid>,
        /// Halt when the candidate's RMSE against ground truth exceeds this (cycles).
        #[arg(long)]
        max_rmse_cycles: Option<f64>,
        /// Fewest predictions with ground truth before the RMSE is judged.
        #[arg(long)]
        min_truth_samples: Option<u32>,
        /// Halt when more drift windows than this alarm.
        #[arg(long)]
        max_drift_alarms: Option<u32>,
        /// Halt when more inferences than this fail.
        #[arg(long)]
        max_inference_failures: Option<u64>,
        /// Halt when an agent reports a p99 latency above this (milliseconds).
        #[arg(long)]
        max_latency_p99_ms: Option<f64>,
    },
    /// Every rollout, newest first.
    List,
    /// One rollout with its selected devices and events.
    Show { rollout_id: Uuid },
    /// Change the selected share (devices selected at a smaller share stay selected).
    Percent { rollout_id: Uuid, percent: u8 },
    /// Make the candidate the group's model and end the rollout.
    Promote { rollout_id: Uuid },
    /// Stop the rollout; its devices go back to the baseline.
    Halt { rollout_id: Uuid },
    /// Comparison report: agreement, error against ground truth, latency, drift, failures.
    Report { rollout_id: Uuid },
}

#[derive(Args, Debug)]
pub struct RegisterModelArgs {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub version: String,
    /// rul, anomaly, llm or other.
    #[arg(long)]
    pub kind: String,
    /// none, staging, challenger, champion or archived.
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long)]
    pub sha256: Option<String>,
    #[arg(long)]
    pub uri: Option<String>,
}

fn status_table(
    out: &mut dyn Write,
    json: bool,
    rows: &[DeviceModelStatus],
) -> Result<(), CliError> {
    emit_rows(out, json, rows)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} must look like key=value"))
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no API key: pass --api-key, --api-key-file, or set KIP_API_KEY")]
    NoKey,
    #[error("cannot read API key file {0}: {1}")]
    KeyFile(PathBuf, std::io::Error),
    #[error("cannot reach {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{code}: {message} (HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response from server: {0}")]
    Decode(String),
    #[error("this key is a platform key: pass --org (id or name)")]
    NeedOrg,
    #[error("no organisation named {0:?}")]
    UnknownOrg(String),
    #[error("cannot build HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("output: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Ca(#[from] kip_certs::CertError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Usage(String),
}

/// TLS for `https://` servers with the workspace's one crypto provider (ring), passed to
/// reqwest explicitly so that [`run`] never installs a process-wide default provider behind
/// its caller's back; server certificates are checked against the system's roots.
fn tls_config() -> Result<rustls::ClientConfig, CliError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| CliError::Tls(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth())
}

struct Client {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Client {
    async fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let bytes = self.answer(req).await?;
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CliError::Decode(e.to_string()))
    }

    /// PUTs raw bytes (an artifact upload) and decodes the JSON answer.
    async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        bytes: Vec<u8>,
    ) -> Result<T, CliError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .http
            .put(&url)
            .bearer_auth(&self.key)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        let bytes = self.answer(req).await?;
        serde_json::from_slice(&bytes).map_err(|e| CliError::Decode(e.to_string()))
    }

    /// Sends `req` and returns the body of a 2xx answer; anything else becomes
    /// [`CliError::Api`] with the server's error code and message.
    async fn answer(&self, req: reqwest::RequestBuilder) -> Result<Vec<u8>, CliError> {
        let connect = |source| CliError::Connect {
            server: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(connect)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(connect)?;
        if !status.is_success() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            return Err(CliError::Api {
                status: status.as_u16(),
                code: v["error"]["code"]
                    .as_str()
                    .unwrap_or("http_error")
                    .to_owned(),
                message: v["error"]["message"]
                    .as_str()
                    .map(ToOwned::to_owned)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
            });
        }
        Ok(bytes.to_vec())
    }

    /// [`Client::send`] where the answer must have a body.
    async fn request<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CliError> {
        self.send(method, path, body)
            .await?
            .ok_or_else(|| CliError::Decode("empty body".into()))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.request(reqwest::Method::GET, path, None).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, CliError> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// DELETE whose answer (if any) is not needed.
    async fn delete(&self, path: &str) -> Result<(), CliError> {
        self.send::<serde_json::Value>(reqwest::Method::DELETE, path, None)
            .await
            .map(drop)
    }
}

fn read_key(cli: &Cli) -> Result<String, CliError> {
    if let Some(k) = &cli.api_key {
        return Ok(k.trim().to_owned());
    }
    if let Some(p) = &cli.api_key_file {
        return std::fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .map_err(|e| CliError::KeyFile(p.clone(), e));
    }
    Err(CliError::NoKey)
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    if let Command::Ca(cmd) = &cli.cmd
        && cmd.is_local()
    {
        return ca_cmd(cmd, out);
    }
    let key = read_key(&cli)?;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config()?)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(CliError::Client)?;
    let client = Client {
        http,
        base: cli.server.trim_end_matches('/').to_owned(),
        key,
    };
    let json = cli.json;
    match &cli.cmd {
        Command::Whoami => {
            let me: Me = client.get("/v1/me").await?;
            let org = me
                .org_id
                .map(|o| o.to_string())
                .unwrap_or_else(|| "-".into());
            emit(out, json, &me, &["KEY ID", "SCOPE", "ROLE", "ORG"], |m| {
                vec![vec![
                    m.key_id.to_string(),
                    m.scope.clone(),
                    m.role.clone(),
                    org.clone(),
                ]]
            })
        }
        Command::Org(cmd) => org_cmd(&client, cmd, json, out).await,
        Command::Key(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            match cmd {
                KeyCmd::Create { name, role } => {
                    let k: CreatedApiKey = client
                        .post(
                            &format!("/v1/organisations/{org}/api-keys"),
                            serde_json::json!({ "name": name, "role": role }),
                        )
                        .await?;
                    emit_secret(
                        out,
                        json,
                        &k,
                        &k.key,
                        &format!(
                            "key {} ({}, role {}) created; it is shown only once",
                            k.info.id, k.info.name, k.info.role
                        ),
                    )
                }
                KeyCmd::List => {
                    let keys: Vec<ApiKeyInfo> = client
                        .get(&format!("/v1/organisations/{org}/api-keys"))
                        .await?;
                    emit_rows(out, json, &keys)
                }
                KeyCmd::Revoke { key_id } => {
                    let k: ApiKeyInfo = client
                        .request(
                            reqwest::Method::DELETE,
                            &format!("/v1/organisations/{org}/api-keys/{key_id}"),
                            None,
                        )
                        .await?;
                    emit_rows(out, json, &[k])
                }
            }
        }
        Command::Ca(cmd) => ca_server_cmd(&client, cmd, json, out).await,
        Command::Ot(cmd) => ot_cmd(&client, cmd, json, out).await,
        Command::Release(cmd) => {
            release::run(&client, cli.org.as_deref(), cmd.clone(), json, out).await
        }
        Command::Audit(AuditCmd::List { limit, cursor }) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let mut path = format!("/v1/organisations/{org}/audit?limit={limit}");
            if let Some(c) = cursor {
                // Cursors are decimal ids; anything else is refused by the server anyway.
                path.push_str("&cursor=");
                path.push_str(
                    &c.chars()
                        .filter(char::is_ascii_alphanumeric)
                        .collect::<String>(),
                );
            }
            let page: AuditPage = client.get(&path).await?;
            if json {
                return write_json(out, &page);
            }
            let rows = page
                .items
                .iter()
                .map(|e| {
                    vec![
                        e.created_at.to_rfc3339(),
                        format!("{} ({})", e.key_name, e.role),
                        e.action.clone(),
                        format!("{} {}", e.method, e.target),
                        e.client_ip.clone().unwrap_or_else(|| "-".into()),
                        format!("{} {}", e.status, e.outcome),
                    ]
                })
                .collect::<Vec<_>>();
            write_table(
                out,
                &["WHEN", "WHO", "ACTION", "TARGET", "FROM", "OUTCOME"],
                &rows,
            )?;
            if let Some(c) = page.next_cursor {
                writeln!(out, "# more: --cursor {c}")?;
            }
            Ok(())
        }
        Command::Device(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let base = format!("/v1/organisations/{org}/devices");
            let devices: Vec<Device> = match cmd {
                DeviceCmd::Health {
                    device_id,
                    state,
                    search,
                } => {
                    let devices: Vec<kip_api::DeviceHealth> = match device_id {
                        Some(id) => vec![client.get(&format!("{base}/{id}/health")).await?],
                        None => {
                            let mut q = vec![];
                            if let Some(s) = state {
                                q.push(format!("state={}", query_escape(s)));
                            }
                            if let Some(s) = search {
                                q.push(format!("q={}", query_escape(s)));
                            }
                            let f: kip_api::FleetHealth = client
                                .get(&format!(
                                    "/v1/organisations/{org}/device-health?{}",
                                    q.join("&")
                                ))
                                .await?;
                            if json {
                                return write_json(out, &f);
                            }
                            writeln!(
                                out,
                                "online {}  stale {}  offline {}",
                                f.counts.online, f.counts.stale, f.counts.offline
                            )?;
                            f.devices
                        }
                    };
                    return emit(out, json, &devices, HEALTH_HEADER, |ds| {
                        ds.iter().map(health_row).collect()
                    });
                }
                DeviceCmd::EnrollToken { ttl, device_name } => {
                    let t: EnrollToken = client
                        .post(
                            &format!("/v1/organisations/{org}/enroll-tokens"),
                            serde_json::json!({ "ttl_s": ttl, "device_name": device_name }),
                        )
                        .await?;
                    return emit_secret(
                        out,
                        json,
                        &t,
                        &t.token,
                        &format!(
                            "one-time enrollment token for organisation {}, expires {}; shown only once",
                            t.org_id,
                            t.expires_at.to_rfc3339()
                        ),
                    );
                }
                DeviceCmd::Revoke { device_id } => {
                    let r: Revocation = client
                        .post(&format!("{base}/{device_id}/revoke"), serde_json::json!({}))
                        .await?;
                    if json {
                        return write_json(out, &r);
                    }
                    writeln!(
                        out,
                        "device {device_id}: {} certificate(s) revoked",
                        r.revoked_serials.len()
                    )?;
                    // Every serial, expired ones included: what an auditor checks against.
                    for serial in &r.revoked_serials {
                        writeln!(out, "  {serial}")?;
                    }
                    return Ok(());
                }
                DeviceCmd::Register { name, labels } => {
                    let labels: serde_json::Map<_, _> = labels
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect();
                    vec![
                        client
                            .post(&base, serde_json::json!({ "name": name, "labels": labels }))
                            .await?,
                    ]
                }
                DeviceCmd::Config(c) => return config_cmd(&client, &base, org, c, json, out).await,
                DeviceCmd::List => client.get(&base).await?,
                DeviceCmd::Get { device_id } => {
                    vec![client.get(&format!("{base}/{device_id}")).await?]
                }
                DeviceCmd::Delete { device_id } => {
                    client.delete(&format!("{base}/{device_id}")).await?;
                    writeln!(out, "device {device_id} deleted")?;
                    return Ok(());
                }
            };
            emit_rows(out, json, &devices)
        }
        Command::Doc(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            doc_cmd(&client, org, cmd, json, out).await
        }
        Command::Maintenance(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let base = format!("/v1/organisations/{org}/maintenance-events");
            let (events, next) = match cmd {
                MaintenanceCmd::Record {
                    device,
                    machine,
                    kind,
                    at,
                    note,
                } => {
                    let e: MaintenanceEvent = client
                        .post(
                            &base,
                            serde_json::json!({
                                "device_id": device, "machine": machine, "kind": kind,
                                "ts": at.unwrap_or_else(chrono::Utc::now), "note": note,
                            }),
                        )
                        .await?;
                    (vec![e], None)
                }
                MaintenanceCmd::List {
                    device,
                    machine,
                    limit,
                    cursor,
                } => {
                    let q = page_query(*limit, *device, machine.as_deref(), cursor.as_deref());
                    let page: MaintenanceEventPage = client.get(&format!("{base}?{q}")).await?;
                    (page.events, page.next_cursor)
                }
            };
            emit_rows(out, json, &events)?;
            if let (Some(c), false) = (next, json) {
                writeln!(out, "# more: --cursor {c}")?;
            }
            Ok(())
        }
        Command::Predictions(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let base = format!("/v1/organisations/{org}/predictions");
            let (preds, next): (Vec<PredictionRecord>, _) = match cmd {
                PredictionsCmd::Latest { device } => {
                    let uri = match device {
                        Some(d) => format!("{base}/latest?device_id={d}"),
                        None => format!("{base}/latest"),
                    };
                    (client.get(&uri).await?, None)
                }
                PredictionsCmd::History {
                    device,
                    machine,
                    limit,
                    cursor,
                } => {
                    let q = page_query(*limit, *device, machine.as_deref(), cursor.as_deref());
                    let page: PredictionPage = client.get(&format!("{base}?{q}")).await?;
                    (page.predictions, page.next_cursor)
                }
            };
            emit_rows(out, json, &preds)?;
            if let (Some(c), false) = (next, json) {
                writeln!(out, "# more: --cursor {c}")?;
            }
            Ok(())
        }
        Command::Model(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let base = format!("/v1/organisations/{org}/models");
            let models: Vec<AiModel> = match cmd {
                ModelCmd::Register(a) => vec![
                    client
                        .post(
                            &base,
                            serde_json::json!({
                                "name": a.name, "version": a.version, "kind": a.kind,
                                "stage": a.stage, "artifact_sha256": a.sha256, "uri": a.uri,
                            }),
                        )
                        .await?,
                ],
                ModelCmd::List => client.get(&base).await?,
                ModelCmd::Get { model_id } => {
                    vec![client.get(&format!("{base}/{model_id}")).await?]
                }
                ModelCmd::Stage { model_id, stage } => vec![
                    client
                        .post(
                            &format!("{base}/{model_id}/stage"),
                            serde_json::json!({ "stage": stage }),
                        )
                        .await?,
                ],
                ModelCmd::Upload { model_id, file } => {
                    let bytes = std::fs::read(file.as_path()).map_err(|e| {
                        CliError::Decode(format!("cannot read {}: {e}", file.display()))
                    })?;
                    let a: ArtifactInfo = client
                        .put_bytes(&format!("{base}/{model_id}/artifact"), bytes)
                        .await?;
                    if json {
                        return write_json(out, &a);
                    }
                    writeln!(
                        out,
                        "model {model_id}: artifact stored ({} bytes, sha256 {})",
                        a.size_bytes, a.sha256
                    )?;
                    return Ok(());
                }
                ModelCmd::Rollout { device, model } => {
                    let model_id = match model.as_str() {
                        "none" => None,
                        m => Some(m.parse::<Uuid>().map_err(|e| {
                            CliError::Decode(format!(
                                "--model {m:?} is not a model id or none: {e}"
                            ))
                        })?),
                    };
                    let s: DeviceModelStatus = client
                        .request(
                            reqwest::Method::PUT,
                            &format!("/v1/organisations/{org}/devices/{device}/desired-model"),
                            Some(serde_json::json!({ "model_id": model_id })),
                        )
                        .await?;
                    return status_table(out, json, &[s]);
                }
                ModelCmd::Rollouts(cmd) => {
                    return rollout_cmd(&client, out, json, org, cmd).await;
                }
                ModelCmd::Drift {
                    device,
                    model,
                    version,
                    alarms,
                    limit,
                    cursor,
                } => {
                    let mut q = page_query(*limit, *device, None, cursor.as_deref());
                    for (k, v) in [("model", model), ("version", version)] {
                        if let Some(v) = v {
                            q.push_str(&format!("&{k}={}", query_escape(v)));
                        }
                    }
                    if *alarms {
                        q.push_str("&alarm=true");
                    }
                    let page: ModelMonitoringPage = client
                        .get(&format!("/v1/organisations/{org}/model-monitoring?{q}"))
                        .await?;
                    emit_rows(out, json, &page.records)?;
                    if let (Some(c), false) = (page.next_cursor, json) {
                        writeln!(out, "# more: --cursor {c}")?;
                    }
                    return Ok(());
                }
                ModelCmd::Mlflow => {
                    let s: kip_api::MlflowStatus = client.get("/v1/mlflow/status").await?;
                    if json {
                        return write_json(out, &s);
                    }
                    let t = |t: Option<chrono::DateTime<chrono::Utc>>| {
                        t.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339())
                    };
                    writeln!(
                        out,
                        "state:          {}\ntracking uri:   {}\nsince:          {}\n\
                         last good poll: {}\nlast error:     {}{}\n\
                         poll errors:    {}\nmirror errors:  {}",
                        s.state,
                        s.tracking_uri.as_deref().unwrap_or("-"),
                        t(s.since),
                        t(s.last_successful_poll_at),
                        s.last_error.as_deref().unwrap_or("-"),
                        s.last_error_at
                            .map_or_else(String::new, |at| format!(" (at {})", at.to_rfc3339())),
                        s.sync_errors_total,
                        s.mirror_failures_total
                    )?;
                    return Ok(());
                }
                ModelCmd::Status => {
                    let s: Vec<DeviceModelStatus> = client
                        .get(&format!("/v1/organisations/{org}/model-status"))
                        .await?;
                    return status_table(out, json, &s);
                }
            };
            emit_rows(out, json, &models)
        }
    }
}

async fn rollout_cmd(
    client: &Client,
    out: &mut dyn Write,
    json: bool,
    org: Uuid,
    cmd: &RolloutCmd,
) -> Result<(), CliError> {
    let base = format!("/v1/organisations/{org}/model-rollouts");
    let post = |path: String, body: serde_json::Value| async move {
        client
            .request::<ModelRollout>(reqwest::Method::POST, &path, Some(body))
            .await
    };
    let r: ModelRollout = match cmd {
        RolloutCmd::Start {
            model_id,
            selector,
            percent,
            mode,
            baseline,
            max_rmse_cycles,
            min_truth_samples,
            max_drift_alarms,
            max_inference_failures,
            max_latency_p99_ms,
        } => {
            let mut thresholds = RolloutThresholds {
                max_rmse_cycles: *max_rmse_cycles,
                max_drift_alarms: *max_drift_alarms,
                max_inference_failures: *max_inference_failures,
                max_latency_p99_ms: *max_latency_p99_ms,
                ..RolloutThresholds::default()
            };
            if let Some(n) = min_truth_samples {
                thresholds.min_truth_samples = *n;
            }
            let body = StartModelRollout {
                model_id: *model_id,
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
                percent: *percent,
                mode: mode.clone(),
                baseline_model_id: *baseline,
                thresholds,
            };
            let body = serde_json::to_value(&body).map_err(|e| CliError::Decode(e.to_string()))?;
            post(base, body).await?
        }
        RolloutCmd::List => {
            let rows: Vec<ModelRollout> = client.get(&base).await?;
            return emit_rows(out, json, &rows);
        }
        RolloutCmd::Show { rollout_id } => client.get(&format!("{base}/{rollout_id}")).await?,
        RolloutCmd::Percent {
            rollout_id,
            percent,
        } => {
            post(
                format!("{base}/{rollout_id}/percent"),
                serde_json::json!({ "percent": percent }),
            )
            .await?
        }
        RolloutCmd::Promote { rollout_id } => {
            post(
                format!("{base}/{rollout_id}/promote"),
                serde_json::json!({}),
            )
            .await?
        }
        RolloutCmd::Halt { rollout_id } => {
            post(format!("{base}/{rollout_id}/halt"), serde_json::json!({})).await?
        }
        RolloutCmd::Report { rollout_id } => {
            let rep: RolloutReport = client.get(&format!("{base}/{rollout_id}/report")).await?;
            if json {
                return write_json(out, &rep);
            }
            return write_report(out, &rep);
        }
    };
    if json {
        return write_json(out, &r);
    }
    emit_rows(out, false, std::slice::from_ref(&r))?;
    for d in &r.devices {
        writeln!(
            out,
            "device {} {} (bucket {})",
            d.device_name, d.device_id, d.bucket
        )?;
    }
    for e in &r.events {
        writeln!(
            out,
            "event {} {}{} {}",
            e.ts.to_rfc3339(),
            e.kind,
            e.reason
                .as_deref()
                .map(|r| format!(" [{r}]"))
                .unwrap_or_default(),
            e.detail
        )?;
    }
    Ok(())
}

fn write_report(out: &mut dyn Write, rep: &RolloutReport) -> Result<(), CliError> {
    let r = &rep.rollout;
    writeln!(
        out,
        "rollout {} {} {}% of {}: {} (baseline {}) {}",
        r.id,
        r.mode,
        r.percent,
        serde_json::Value::Object(r.selector.clone()),
        r.model,
        r.baseline_model,
        r.state
    )?;
    let f = |v: Option<f64>, d: usize| or_dash(v.map(|x| format!("{x:.d$}")));
    writeln!(
        out,
        "{:<10} {:<28} {:>9} {:>9} {:>7} {:>9} {:>9} {:>10} {:>10} {:>8} {:>7}",
        "ROLE",
        "MODEL",
        "SERVED",
        "SHADOW",
        "TRUTH",
        "RMSE",
        "BIAS",
        "P50 US",
        "P99 US",
        "FAILED",
        "DRIFT"
    )?;
    for (role, v) in [("candidate", &rep.candidate), ("baseline", &rep.baseline)] {
        writeln!(
            out,
            "{:<10} {:<28} {:>9} {:>9} {:>7} {:>9} {:>9} {:>10} {:>10} {:>8} {:>7}",
            role,
            v.model,
            v.predictions_champion,
            v.predictions_shadow,
            v.truth_samples,
            f(v.rmse_cycles, 2),
            f(v.mean_error_cycles, 2),
            f(v.latency_p50_us, 1),
            f(v.latency_p99_us, 1),
            v.inference_failures,
            v.drift_alarms
        )?;
    }
    let a = &rep.agreement;
    writeln!(
        out,
        "agreement: {} pairs, mean abs diff {} cycles, {} within {} cycles",
        a.pairs,
        f(a.mean_abs_diff_cycles, 2),
        or_dash(
            a.within_tolerance_share
                .map(|s| format!("{:.1}%", s * 100.0))
        ),
        a.tolerance_cycles
    )?;
    for c in &rep.crossed {
        writeln!(out, "CROSSED {c}")?;
    }
    if let Some(h) = &r.halt_reason {
        writeln!(out, "halted: {h}")?;
    }
    Ok(())
}

impl TableRow for ModelRollout {
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "MODEL",
        "BASELINE",
        "MODE",
        "ORIGIN",
        "PERCENT",
        "SELECTOR",
        "STATE",
        "HALT REASON",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.model.clone(),
            self.baseline_model.clone(),
            self.mode.clone(),
            self.origin.clone(),
            format!("{}%", self.percent),
            serde_json::Value::Object(self.selector.clone()).to_string(),
            self.state.clone(),
            or_dash(self.halt_reason.clone()),
        ]
    }
}

fn ca_status_rows(s: &CaStatus) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "intermediate".to_owned(),
        s.intermediate.fingerprint.chars().take(16).collect(),
        s.intermediate.not_after.to_rfc3339(),
        s.devices_by_issuer.current.to_string(),
    ]];
    if let Some(p) = &s.previous_intermediate {
        rows.push(vec![
            "previous".to_owned(),
            p.fingerprint.chars().take(16).collect(),
            p.not_after.to_rfc3339(),
            s.devices_by_issuer.previous.to_string(),
        ]);
    }
    rows.push(vec![
        format!("root ({} in bundle)", s.bundle_roots),
        s.bundle_sha256.chars().take(16).collect(),
        s.root_not_after.map(|t| t.to_rfc3339()).unwrap_or_default(),
        format!("{} other", s.devices_by_issuer.other),
    ]);
    rows
}

const CA_HEADERS: &[&str] = &["CA", "FINGERPRINT", "NOT AFTER", "DEVICES"];

/// CA commands that ask the server.
async fn ca_server_cmd(
    client: &Client,
    cmd: &CaCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        CaCmd::Status => {
            let s: CaStatus = client.get("/v1/pki/ca").await?;
            emit(out, json, &s, CA_HEADERS, ca_status_rows)
        }
        CaCmd::Reload => {
            let s: CaStatus = client
                .post("/v1/pki/ca/reload", serde_json::json!({}))
                .await?;
            if !json {
                writeln!(
                    out,
                    "{}",
                    if s.reloaded == Some(true) {
                        "CA files changed: loaded"
                    } else {
                        "CA files unchanged"
                    }
                )?;
            }
            emit(out, json, &s, CA_HEADERS, ca_status_rows)
        }
        CaCmd::SigningStatus => {
            let s: ModelSigningStatus = client.get("/v1/model-signing").await?;
            emit(out, json, &s, SIGNING_HEADERS, signing_rows)
        }
        CaCmd::FinishSigningKeyRotation { .. } => {
            let s: ModelSigningStatus = client.get("/v1/model-signing").await?;
            if s.signed_by_previous > 0 {
                return Err(CliError::Refused(format!(
                    "{} model artifacts are still signed only by the previous key; the server \
                     re-signs them within pki.ca_reload_interval_s of the rotation (check \
                     `kipctl ca signing-status`), or pass --force to retire it anyway",
                    s.signed_by_previous
                )));
            }
            ca_cmd(cmd, out)
        }
        CaCmd::FinishRotation { .. } => {
            let s: CaStatus = client.get("/v1/pki/ca").await?;
            if s.devices_by_issuer.previous > 0 {
                return Err(CliError::Refused(format!(
                    "{} devices still use a certificate of the previous intermediate; \
                     wait until those agents renew (they are asked to on their next sync) or \
                     pass --force to cut them off",
                    s.devices_by_issuer.previous
                )));
            }
            ca_cmd(cmd, out)?;
            // Best effort: the server polls the files anyway.
            if let Err(e) = client
                .post::<CaStatus>("/v1/pki/ca/reload", serde_json::json!({}))
                .await
            {
                writeln!(
                    out,
                    "# the server will load the change at its next check ({e})"
                )?;
            }
            Ok(())
        }
        _ => ca_cmd(cmd, out),
    }
}

const SIGNING_HEADERS: &[&str] = &["KEY", "KEY ID", "ARTIFACTS"];

fn signing_rows(s: &ModelSigningStatus) -> Vec<Vec<String>> {
    let mut rows = vec![vec![
        "current".to_owned(),
        s.key_id.clone(),
        s.signed_by_current.to_string(),
    ]];
    if let Some(p) = &s.previous_key_id {
        rows.push(vec![
            "previous".to_owned(),
            p.clone(),
            s.signed_by_previous.to_string(),
        ]);
    }
    rows.push(vec![
        "unsigned".to_owned(),
        "-".to_owned(),
        s.unsigned.to_string(),
    ]);
    rows
}

/// Local model signing key commands: they touch only files in `--dir`.
fn signing_cmd(cmd: &CaCmd, out: &mut dyn Write) -> Result<bool, CliError> {
    use kip_certs::signing::SigningKeyStore;
    match cmd {
        CaCmd::RotateSigningKey { dir } => {
            let s = SigningKeyStore::rotate(dir).map_err(|e| CliError::Refused(e.to_string()))?;
            writeln!(
                out,
                "model signing key rotated in {}: new key {}; the previous key stays trusted",
                dir.display(),
                s.signer().key_id()
            )?;
            writeln!(
                out,
                "# running control planes load it within pki.ca_reload_interval_s and re-sign \
                 every artifact; agents get both keys on their next sync. Watch `kipctl ca \
                 signing-status`, then run `kipctl ca finish-signing-key-rotation`."
            )?;
            Ok(true)
        }
        CaCmd::FinishSigningKeyRotation { dir, .. } => {
            match SigningKeyStore::finish_rotation(dir, std::time::SystemTime::now())
                .map_err(|e| CliError::Refused(e.to_string()))?
            {
                Some(m) => writeln!(out, "retired: {}", m.display())?,
                None => writeln!(
                    out,
                    "no signing key rotation in progress in {}",
                    dir.display()
                )?,
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Local CA commands: they touch only files in `--dir`.
fn ca_cmd(cmd: &CaCmd, out: &mut dyn Write) -> Result<(), CliError> {
    if signing_cmd(cmd, out)? {
        return Ok(());
    }
    let now = std::time::SystemTime::now();
    let (dir, ca) = match cmd {
        CaCmd::Init { dir } => {
            let ca = kip_certs::FleetCa::init(dir, now)?;
            // The model signing key lives beside the CA key (the control plane would create
            // it on first start otherwise).
            kip_certs::signing::SigningKeyStore::init(dir)
                .map_err(|e| CliError::Refused(e.to_string()))?;
            (dir, ca)
        }
        CaCmd::RotateIntermediate { dir } => {
            (dir, kip_certs::FleetCa::rotate_intermediate(dir, now)?)
        }
        CaCmd::RotateRoot { dir } => (dir, kip_certs::FleetCa::rotate_root(dir, now)?),
        CaCmd::FinishRotation { dir, .. } => {
            let moved = kip_certs::FleetCa::finish_rotation(dir, now)?;
            if moved.is_empty() {
                writeln!(out, "no rotation in progress in {}", dir.display())?;
            }
            for m in &moved {
                writeln!(out, "retired: {}", m.display())?;
            }
            (dir, kip_certs::FleetCa::load(dir)?)
        }
        CaCmd::Status
        | CaCmd::Reload
        | CaCmd::SigningStatus
        | CaCmd::RotateSigningKey { .. }
        | CaCmd::FinishSigningKeyRotation { .. } => {
            return Err(CliError::Refused("this command needs the server".into()));
        }
    };
    if matches!(
        cmd,
        CaCmd::RotateIntermediate { .. } | CaCmd::RotateRoot { .. }
    ) {
        writeln!(
            out,
            "# running control planes load the new CA within pki.ca_reload_interval_s (or now: \
             `kipctl ca reload`, or SIGHUP); agents get a renewal hint and the new bundle on \
             their next sync. Watch `kipctl ca status`, then run `kipctl ca finish-rotation`."
        )?;
    }
    let not_after: chrono::DateTime<chrono::Utc> = ca.current().not_after().into();
    writeln!(
        out,
        "fleet CA ready in {}: intermediate valid until {}",
        dir.display(),
        not_after.to_rfc3339()
    )?;
    writeln!(
        out,
        "# set [pki] ca_dir = {:?} in the control-plane config; root.key is only needed \
         for `kipctl ca rotate-intermediate` and `rotate-root` and can be kept offline",
        dir.display().to_string()
    )?;
    Ok(())
}

async fn org_cmd(
    client: &Client,
    cmd: &OrgCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let orgs: Vec<Organisation> = match cmd {
        OrgCmd::Create { name, display_name } => vec![
            client
                .post(
                    "/v1/organisations",
                    serde_json::json!({ "name": name, "display_name": display_name }),
                )
                .await?,
        ],
        OrgCmd::List => client.get("/v1/organisations").await?,
        OrgCmd::Get { org } => {
            let id = resolve_org(client, Some(org)).await?;
            vec![client.get(&format!("/v1/organisations/{id}")).await?]
        }
        OrgCmd::Update { org, display_name } => {
            let id = resolve_org(client, Some(org)).await?;
            vec![
                client
                    .request(
                        reqwest::Method::PATCH,
                        &format!("/v1/organisations/{id}"),
                        Some(serde_json::json!({ "display_name": display_name })),
                    )
                    .await?,
            ]
        }
        OrgCmd::Delete { org } => {
            let id = resolve_org(client, Some(org)).await?;
            client.delete(&format!("/v1/organisations/{id}")).await?;
            writeln!(out, "organisation {id} deleted")?;
            return Ok(());
        }
    };
    emit_rows(out, json, &orgs)
}

/// Turns `--org` (id or name) into an id; without it, uses the key's own organisation.
async fn resolve_org(client: &Client, org: Option<&str>) -> Result<Uuid, CliError> {
    match org {
        Some(s) => {
            if let Ok(id) = s.parse::<Uuid>() {
                return Ok(id);
            }
            let orgs: Vec<Organisation> = client.get("/v1/organisations?limit=1000").await?;
            orgs.into_iter()
                .find(|o| o.name == s)
                .map(|o| o.id)
                .ok_or_else(|| CliError::UnknownOrg(s.to_owned()))
        }
        None => {
            let me: Me = client.get("/v1/me").await?;
            me.org_id.ok_or(CliError::NeedOrg)
        }
    }
}

async fn config_cmd(
    client: &Client,
    base: &str,
    org: Uuid,
    cmd: &ConfigCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
    };
    match cmd {
        ConfigCmd::Get { device_id } => {
            let s: DeviceConfigStatus = client.get(&format!("{base}/{device_id}/config")).await?;
            if json {
                return write_json(out, &s);
            }
            let desired = s.desired.as_ref().map(|d| d.version.to_string());
            writeln!(
                out,
                "device {} ({}): desired {}, applied {}{}",
                s.device_name,
                s.device_id,
                desired.as_deref().unwrap_or("none"),
                s.applied_version
                    .as_deref()
                    .unwrap_or("none (local file only)"),
                if s.in_sync { ", in sync" } else { "" }
            )?;
            if let Some(e) = &s.last_error {
                writeln!(out, "last refusal: {e}")?;
            }
            if let Some(d) = &s.desired {
                write!(out, "{}", d.toml)?;
            }
            Ok(())
        }
        ConfigCmd::Set {
            device_id,
            file,
            group,
        } => {
            let toml = read(file)?;
            let v: serde_json::Value = match (device_id, group.is_empty()) {
                (Some(id), true) => {
                    client
                        .send(
                            reqwest::Method::PUT,
                            &format!("{base}/{id}/config"),
                            Some(serde_json::json!({ "toml": toml })),
                        )
                        .await?
                }
                (None, false) => {
                    let selector: serde_json::Map<_, _> = group
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect();
                    client
                        .send(
                            reqwest::Method::PUT,
                            &format!("/v1/organisations/{org}/group-config"),
                            Some(serde_json::json!({ "selector": selector, "toml": toml })),
                        )
                        .await?
                }
                _ => {
                    return Err(CliError::Usage(
                        "give either a device id or --group key=value".into(),
                    ));
                }
            }
            .ok_or_else(|| CliError::Decode("empty body".into()))?;
            if json {
                return write_json(out, &v);
            }
            let version = v["version"]
                .as_i64()
                .or_else(|| v["config"]["version"].as_i64());
            writeln!(
                out,
                "configuration version {} stored",
                version.unwrap_or_default()
            )?;
            if let Some(ds) = v["devices"].as_array() {
                writeln!(out, "targets {} device(s) now", ds.len())?;
            }
            Ok(())
        }
        ConfigCmd::Diff { device_id, file } => {
            let history: Vec<ConfigVersion> = client
                .get(&format!("{base}/{device_id}/config/history"))
                .await?;
            let s: DeviceConfigStatus = client.get(&format!("{base}/{device_id}/config")).await?;
            let current = s.desired.map(|d| d.toml).unwrap_or_default();
            let (from, to) = match file {
                Some(f) => (current, read(f)?),
                None => (
                    history.get(1).map(|v| v.toml.clone()).unwrap_or_default(),
                    current,
                ),
            };
            write!(out, "{}", line_diff(&from, &to))?;
            Ok(())
        }
        ConfigCmd::History { device_id } => {
            let h: Vec<ConfigVersion> = client
                .get(&format!("{base}/{device_id}/config/history"))
                .await?;
            emit(
                out,
                json,
                &h,
                &["VERSION", "TARGET", "CREATED", "LINES"],
                |h| {
                    h.iter()
                        .map(|v| {
                            vec![
                                v.version.to_string(),
                                match (&v.device_id, &v.selector) {
                                    (Some(d), _) => format!("device {d}"),
                                    (None, Some(s)) => format!(
                                        "group {}",
                                        s.iter()
                                            .map(|(k, v)| format!(
                                                "{k}={}",
                                                v.as_str().unwrap_or_default()
                                            ))
                                            .collect::<Vec<_>>()
                                            .join(",")
                                    ),
                                    (None, None) => "?".into(),
                                },
                                v.created_at.to_rfc3339(),
                                v.toml.lines().count().to_string(),
                            ]
                        })
                        .collect()
                },
            )
        }
    }
}

/// The query of a filtered, keyset-paged list: `limit`, then the filters that are set.
fn page_query(
    limit: i64,
    device: Option<Uuid>,
    machine: Option<&str>,
    cursor: Option<&str>,
) -> String {
    let mut q = vec![format!("limit={limit}")];
    q.extend(device.map(|d| format!("device_id={d}")));
    q.extend(machine.map(|m| format!("machine={}", query_escape(m))));
    q.extend(cursor.map(|c| format!("cursor={}", query_escape(c))));
    q.join("&")
}

impl TableRow for MaintenanceEvent {
    const HEADERS: &'static [&'static str] = &["ID", "WHEN", "DEVICE", "MACHINE", "KIND", "NOTE"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.ts.to_rfc3339(),
            self.device_id.to_string(),
            self.machine.clone(),
            self.kind.clone(),
            self.note.clone(),
        ]
    }
}

impl TableRow for ModelMonitoringRecord {
    const HEADERS: &'static [&'static str] = &[
        "WHEN", "DEVICE", "MODEL", "FEATURE", "PSI", "PSI MAX", "KS", "KS MAX", "ALARM", "WINDOW",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.ts.to_rfc3339(),
            self.device_id.to_string(),
            format!("{}@{}", self.model, self.model_version),
            self.feature.clone(),
            format!("{:.3}", self.psi),
            format!("{:.3}", self.psi_threshold),
            format!("{:.3}", self.ks),
            format!("{:.3}", self.ks_threshold),
            if self.alarm { "DRIFT" } else { "ok" }.to_owned(),
            format!("{} ({} machines)", self.window, self.effective_window),
        ]
    }
}

impl TableRow for PredictionRecord {
    const HEADERS: &'static [&'static str] =
        &["WHEN", "DEVICE", "MACHINE", "MODEL", "RUL", "ANOMALY"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.ts.to_rfc3339(),
            self.device_id.to_string(),
            self.machine.clone(),
            self.model_version.clone(),
            format!("{:.1}", self.rul_cycles),
            or_dash(self.anomaly_score.map(|a| format!("{a:.3}"))),
        ]
    }
}

/// Percent-encodes a query-string value (everything but unreserved characters).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn write_json<T: Serialize>(out: &mut dyn Write, v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Decode(e.to_string()))?;
    writeln!(out, "{s}")?;
    Ok(())
}

/// How an API item prints as a table row (`--json` prints the items as they came).
trait TableRow {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

/// `-` for a missing value.
fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

impl TableRow for Organisation {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "DISPLAY NAME", "CREATED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.display_name.clone(),
            self.created_at.to_rfc3339(),
        ]
    }
}

impl TableRow for ApiKeyInfo {
    const HEADERS: &'static [&'static str] =
        &["ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.role.clone(),
            self.prefix.clone(),
            self.created_at.to_rfc3339(),
            or_dash(self.revoked_at.map(|t| t.to_rfc3339())),
        ]
    }
}

impl TableRow for Device {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "LABELS", "LAST SEEN"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
            self.last_seen_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "never".into()),
        ]
    }
}

impl TableRow for AiModel {
    const HEADERS: &'static [&'static str] = &["ID", "NAME", "VERSION", "KIND", "STAGE", "SHA256"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.name.clone(),
            self.version.clone(),
            self.kind.clone(),
            self.stage.clone(),
            or_dash(
                self.artifact_sha256
                    .as_deref()
                    .map(|h| h.get(..12).unwrap_or(h).to_owned()),
            ),
        ]
    }
}

impl TableRow for DeviceModelStatus {
    const HEADERS: &'static [&'static str] = &[
        "DEVICE",
        "NAME",
        "DESIRED",
        "RUNNING",
        "IN SYNC",
        "LAST ERROR",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.device_id.to_string(),
            self.device_name.clone(),
            or_dash(self.desired_model.clone()),
            or_dash(self.running_model.clone()),
            if self.in_sync { "yes" } else { "no" }.into(),
            or_dash(self.last_error.clone()),
        ]
    }
}

/// A secret the server shows once: with `--json` the whole answer, else the secret alone on
/// the first line (for scripts) and `# note` below it.
fn emit_secret<T: Serialize>(
    out: &mut dyn Write,
    json: bool,
    answer: &T,
    secret: &str,
    note: &str,
) -> Result<(), CliError> {
    if json {
        return write_json(out, answer);
    }
    writeln!(out, "{secret}")?;
    writeln!(out, "# {note}")?;
    Ok(())
}

/// Prints `items` as a JSON array or as a table of their [`TableRow`]s.
fn emit_rows<T: TableRow + Serialize>(
    out: &mut dyn Write,
    json: bool,
    items: &[T],
) -> Result<(), CliError> {
    emit(out, json, &items, T::HEADERS, |is| {
        is.iter().map(TableRow::cells).collect()
    })
}

impl TableRow for kip_api::OtCertificateInfo {
    const HEADERS: &'static [&'static str] = &["SERIAL", "PROFILE", "CN", "NOT AFTER", "REPLACED"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.serial_hex.clone(),
            self.profile.clone(),
            self.common_name.clone(),
            self.not_after.to_rfc3339(),
            or_dash(self.replaced_at.map(|t| t.to_rfc3339())),
        ]
    }
}

async fn ot_cmd(
    client: &Client,
    cmd: &OtCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        OtCmd::Issue {
            profile,
            cn,
            dns_names,
            ip_addresses,
            application_uri,
            days,
            csr,
            replaces,
            out: dir,
        } => {
            let csr_pem = match csr {
                Some(p) => Some(kip_certs::files::read(p)?),
                None => None,
            };
            let issued: kip_api::IssuedOtCertificate = client
                .post(
                    "/v1/pki/ot-certificates",
                    serde_json::json!({
                        "profile": profile,
                        "common_name": cn,
                        "dns_names": dns_names,
                        "ip_addresses": ip_addresses,
                        "application_uri": application_uri,
                        "validity_days": days,
                        "csr_pem": csr_pem,
                        "replaces_serial": replaces,
                    }),
                )
                .await?;
            kip_certs::files::write_public(&dir.join("cert.pem"), &issued.certificate_pem)?;
            kip_certs::files::write_public(&dir.join("chain.pem"), &issued.chain_pem)?;
            kip_certs::files::write_public(&dir.join("ca.pem"), &issued.ca_bundle_pem)?;
            if let Some(k) = &issued.private_key_pem {
                kip_certs::files::write_private(&dir.join("key.pem"), k)?;
            }
            if profile == "opcua"
                && let Some(der) =
                    kip_certs::certs_from_pem(&issued.certificate_pem, "certificate")?
                        .into_iter()
                        .next()
            {
                std::fs::write(dir.join("cert.der"), der.as_ref())?;
            }
            if json {
                return write_json(out, &issued.info);
            }
            writeln!(
                out,
                "issued {} certificate {} for {:?}, valid until {}; files in {}",
                issued.info.profile,
                issued.info.serial_hex,
                issued.info.common_name,
                issued.info.not_after.to_rfc3339(),
                dir.display()
            )?;
            Ok(())
        }
        OtCmd::List {
            expiring_within_days,
        } => {
            let path = match expiring_within_days {
                Some(d) => format!("/v1/pki/ot-certificates?expiring_within_days={d}"),
                None => "/v1/pki/ot-certificates".to_owned(),
            };
            let certs: Vec<kip_api::OtCertificateInfo> = client.get(&path).await?;
            emit_rows(out, json, &certs)
        }
    }
}

const HEALTH_HEADER: &[&str] = &[
    "NAME",
    "STATE",
    "FLAGS",
    "LAST CONTACT",
    "BUFFER",
    "OLDEST UNSYNCED",
    "DISK FREE",
    "CERT EXPIRES",
    "CLOCK OFFSET",
    "MODEL",
    "DRIFT",
    "ID",
];

/// One row of `kipctl device health`; `-` where the agent reported nothing.
fn health_row(d: &kip_api::DeviceHealth) -> Vec<String> {
    let r = d.report.as_ref();
    let num = |k: &str| r.and_then(|r| r[k].as_f64());
    let dash = || "-".to_owned();
    let secs = |s: f64| match s {
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s if s < 172_800.0 => format!("{:.1}h", s / 3600.0),
        s => format!("{:.1}d", s / 86_400.0),
    };
    let mib = |b: f64| format!("{:.1} MiB", b / 1_048_576.0);
    vec![
        d.name.clone(),
        d.state.clone(),
        if d.flags.is_empty() {
            dash()
        } else {
            d.flags.join(",")
        },
        d.seconds_since_contact
            .map_or_else(|| "never".into(), |s| format!("{} ago", secs(s))),
        match (num("buffer_bytes"), num("buffer_records")) {
            (Some(b), Some(n)) => format!("{} ({n} rec)", mib(b)),
            _ => dash(),
        },
        num("oldest_unsynced_age_s").map_or_else(dash, secs),
        match (num("disk_free_bytes"), num("disk_total_bytes")) {
            (Some(f), Some(t)) if t > 0.0 => format!("{} ({:.0}%)", mib(f), f / t * 100.0),
            _ => dash(),
        },
        r.and_then(|r| r["cert_not_after"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map_or_else(dash, |t| {
                let left = (t.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
                if left < 0 {
                    "expired".into()
                } else {
                    format!("in {}", secs(left as f64))
                }
            }),
        num("clock_offset_ms").map_or_else(dash, |ms| format!("{ms:+.0} ms")),
        r.and_then(|r| r["running_model"].as_str())
            .map_or_else(dash, ToOwned::to_owned),
        // Score (largest statistic over its threshold; >= 1 drifts) and the drifting features.
        num("model_drift").map_or_else(dash, |score| {
            let features: Vec<&str> = r
                .and_then(|r| r["model_drift_features"].as_array())
                .map(|a| a.iter().filter_map(|f| f.as_str()).collect())
                .unwrap_or_default();
            if features.is_empty() {
                format!("{score:.2}")
            } else {
                format!("{score:.2}({})", features.join(","))
            }
        }),
        d.device_id.to_string(),
    ]
}

fn emit<T: Serialize>(
    out: &mut dyn Write,
    json: bool,
    v: &T,
    header: &[&str],
    rows: impl FnOnce(&T) -> Vec<Vec<String>>,
) -> Result<(), CliError> {
    if json {
        return write_json(out, v);
    }
    write_table(out, header, &rows(v))
}

/// Writes an aligned table with a header row.
pub fn write_table(
    out: &mut dyn Write,
    header: &[&str],
    rows: &[Vec<String>],
) -> Result<(), CliError> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_align() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &["ID", "NAME"],
            &[
                vec!["1".into(), "alpha".into()],
                vec!["200".into(), "b".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID   NAME\n1    alpha\n200  b\n"
        );
    }

    #[test]
    fn ttl_accepts_units_and_rejects_garbage() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("1h"), Ok(3600));
        assert_eq!(parse_ttl("7d"), Ok(604_800));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("").is_err());
    }

    #[tokio::test]
    async fn ca_init_creates_the_ca_without_an_api_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let cli = Cli::try_parse_from(["kipctl", "ca", "init", "--dir", ca_dir.to_str().unwrap()])
            .unwrap();
        let mut out = Vec::new();
        run(cli, &mut out).await.unwrap();
        assert!(String::from_utf8(out).unwrap().contains("fleet CA ready"));
        for key in ["root.key", "intermediate.key"] {
            let mode = std::fs::metadata(ca_dir.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let again =
            Cli::try_parse_from(["kipctl", "ca", "init", "--dir", ca_dir.to_str().unwrap()])
                .unwrap();
        let err = run(again, &mut Vec::new()).await.unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[tokio::test]
    async fn ca_init_creates_the_model_signing_key_and_its_rotation_is_two_phase() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let d = ca_dir.to_str().unwrap();
        let kipctl = |args: &[&str]| {
            let mut all = vec!["kipctl", "ca"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap()
        };
        run(kipctl(&["init", "--dir", d]), &mut Vec::new())
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let key = ca_dir.join("model-signing.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read_to_string(ca_dir.join("model-signing.pub")).unwrap();
        let mut out = Vec::new();
        run(kipctl(&["rotate-signing-key", "--dir", d]), &mut out)
            .await
            .unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("finish-signing-key-rotation")
        );
        assert_eq!(
            std::fs::read_to_string(ca_dir.join("model-signing-previous.pub")).unwrap(),
            before
        );
        // A second rotation before the first is finished is refused.
        assert!(
            run(kipctl(&["rotate-signing-key", "--dir", d]), &mut Vec::new())
                .await
                .is_err()
        );
        run(
            kipctl(&["finish-signing-key-rotation", "--dir", d, "--force"]),
            &mut Vec::new(),
        )
        .await
        .unwrap();
        assert!(!ca_dir.join("model-signing-previous.pub").exists());
    }

    #[tokio::test]
    async fn ca_rotations_are_two_phase_and_local_with_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let d = ca_dir.to_str().unwrap();
        let kipctl = |args: &[&str]| {
            let mut all = vec!["kipctl", "ca"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap()
        };
        run(kipctl(&["init", "--dir", d]), &mut Vec::new())
            .await
            .unwrap();
        let mut out = Vec::new();
        run(kipctl(&["rotate-root", "--dir", d]), &mut out)
            .await
            .unwrap();
        assert!(String::from_utf8(out).unwrap().contains("finish-rotation"));
        let err = run(
            kipctl(&["rotate-intermediate", "--dir", d]),
            &mut Vec::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("still in progress"), "{err}");
        // Without --force the safety check needs a server (none here): refused, nothing moved.
        let no_server = Cli::try_parse_from([
            "kipctl",
            "--server",
            "http://127.0.0.1:1",
            "--api-key",
            "kip_x_y",
            "ca",
            "finish-rotation",
            "--dir",
            d,
        ])
        .unwrap();
        assert!(run(no_server, &mut Vec::new()).await.is_err());
        assert!(ca_dir.join("intermediate-previous.crt").exists());
        let mut out = Vec::new();
        run(
            kipctl(&["finish-rotation", "--dir", d, "--force"]),
            &mut out,
        )
        .await
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("retired:"), "{out}");
        assert!(!ca_dir.join("intermediate-previous.crt").exists());
        run(
            kipctl(&["rotate-intermediate", "--dir", d]),
            &mut Vec::new(),
        )
        .await
        .unwrap();
    }

    #[test]
    fn line_diff_marks_removed_and_added_lines() {
        let d = line_diff(
            "[sync]\ninterval_ms = 1000\n",
            "[sync]\ninterval_ms = 500\n",
        );
        assert_eq!(d, "  [sync]\n- interval_ms = 1000\n+ interval_ms = 500\n");
    }

    #[test]
    fn labels_must_have_an_equals_sign() {
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("ab").unwrap_err().contains("key=value"));
    }
}
