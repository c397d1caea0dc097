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

use std::{io::Write, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

use kip_api::{
    AiModel, ApiKeyInfo, ArtifactInfo, AuditPage, CaStatus, CreatedApiKey, Device,
    DeviceModelStatus, EnrollToken, MaintenanceEvent, MaintenanceEventPage, Me, ModelSigningStatus,
    Organisation, PredictionPage, PredictionRecord, Revocation,
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
    emit(
        out,
        json,
        &rows,
        &[
            "DEVICE",
            "NAME",
            "DESIRED",
            "RUNNING",
            "IN SYNC",
            "LAST ERROR",
        ],
        |rs| {
            rs.iter()
                .map(|r| {
                    vec![
                        r.device_id.to_string(),
                        r.device_name.clone(),
                        r.desired_model.clone().unwrap_or_else(|| "-".into()),
                        r.running_model.clone().unwrap_or_else(|| "-".into()),
                        if r.in_sync { "yes" } else { "no" }.into(),
                        r.last_error.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect()
        },
    )
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

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.send(reqwest::Method::GET, path, None)
            .await?
            .ok_or_else(|| CliError::Decode("empty body".into()))
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, CliError> {
        self.send(reqwest::Method::POST, path, Some(body))
            .await?
            .ok_or_else(|| CliError::Decode("empty body".into()))
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
                    if json {
                        return write_json(out, &k);
                    }
                    writeln!(out, "{}", k.key)?;
                    writeln!(
                        out,
                        "# key {} ({}, role {}) created; it is shown only once",
                        k.info.id, k.info.name, k.info.role
                    )?;
                    Ok(())
                }
                KeyCmd::List => {
                    let keys: Vec<ApiKeyInfo> = client
                        .get(&format!("/v1/organisations/{org}/api-keys"))
                        .await?;
                    emit(
                        out,
                        json,
                        &keys,
                        &["ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED"],
                        |ks| key_rows(ks),
                    )
                }
                KeyCmd::Revoke { key_id } => {
                    let k: ApiKeyInfo = client
                        .send(
                            reqwest::Method::DELETE,
                            &format!("/v1/organisations/{org}/api-keys/{key_id}"),
                            None,
                        )
                        .await?
                        .ok_or_else(|| CliError::Decode("empty body".into()))?;
                    emit(
                        out,
                        json,
                        &vec![k],
                        &["ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED"],
                        |ks| key_rows(ks),
                    )
                }
            }
        }
        Command::Ca(cmd) => ca_server_cmd(&client, cmd, json, out).await,
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
                DeviceCmd::EnrollToken { ttl, device_name } => {
                    let t: EnrollToken = client
                        .post(
                            &format!("/v1/organisations/{org}/enroll-tokens"),
                            serde_json::json!({ "ttl_s": ttl, "device_name": device_name }),
                        )
                        .await?;
                    if json {
                        return write_json(out, &t);
                    }
                    writeln!(out, "{}", t.token)?;
                    writeln!(
                        out,
                        "# one-time enrollment token for organisation {}, expires {}; shown only once",
                        t.org_id,
                        t.expires_at.to_rfc3339()
                    )?;
                    return Ok(());
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
                DeviceCmd::List => client.get(&base).await?,
                DeviceCmd::Get { device_id } => {
                    vec![client.get(&format!("{base}/{device_id}")).await?]
                }
                DeviceCmd::Delete { device_id } => {
                    client
                        .send::<serde_json::Value>(
                            reqwest::Method::DELETE,
                            &format!("{base}/{device_id}"),
                            None,
                        )
                        .await?;
                    writeln!(out, "device {device_id} deleted")?;
                    return Ok(());
                }
            };
            emit(
                out,
                json,
                &devices,
                &["ID", "NAME", "LABELS", "LAST SEEN"],
                |ds| {
                    ds.iter()
                        .map(|d| {
                            vec![
                                d.id.to_string(),
                                d.name.clone(),
                                d.labels
                                    .iter()
                                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                d.last_seen_at
                                    .map(|t| t.to_rfc3339())
                                    .unwrap_or_else(|| "never".into()),
                            ]
                        })
                        .collect()
                },
            )
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
                    let mut q = vec![format!("limit={limit}")];
                    q.extend(device.map(|d| format!("device_id={d}")));
                    q.extend(
                        machine
                            .as_deref()
                            .map(|m| format!("machine={}", query_escape(m))),
                    );
                    q.extend(
                        cursor
                            .as_deref()
                            .map(|c| format!("cursor={}", query_escape(c))),
                    );
                    let page: MaintenanceEventPage =
                        client.get(&format!("{base}?{}", q.join("&"))).await?;
                    (page.events, page.next_cursor)
                }
            };
            emit(
                out,
                json,
                &events,
                &["ID", "WHEN", "DEVICE", "MACHINE", "KIND", "NOTE"],
                |es| {
                    es.iter()
                        .map(|e| {
                            vec![
                                e.id.to_string(),
                                e.ts.to_rfc3339(),
                                e.device_id.to_string(),
                                e.machine.clone(),
                                e.kind.clone(),
                                e.note.clone(),
                            ]
                        })
                        .collect()
                },
            )?;
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
                    let mut q = vec![format!("limit={limit}")];
                    q.extend(device.map(|d| format!("device_id={d}")));
                    q.extend(
                        machine
                            .as_deref()
                            .map(|m| format!("machine={}", query_escape(m))),
                    );
                    q.extend(
                        cursor
                            .as_deref()
                            .map(|c| format!("cursor={}", query_escape(c))),
                    );
                    let page: PredictionPage =
                        client.get(&format!("{base}?{}", q.join("&"))).await?;
                    (page.predictions, page.next_cursor)
                }
            };
            emit(
                out,
                json,
                &preds,
                &["WHEN", "DEVICE", "MACHINE", "MODEL", "RUL", "ANOMALY"],
                |ps| {
                    ps.iter()
                        .map(|p| {
                            vec![
                                p.ts.to_rfc3339(),
                                p.device_id.to_string(),
                                p.machine.clone(),
                                p.model_version.clone(),
                                format!("{:.1}", p.rul_cycles),
                                p.anomaly_score
                                    .map(|a| format!("{a:.3}"))
                                    .unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect()
                },
            )?;
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
                        .send(
                            reqwest::Method::PUT,
                            &format!("/v1/organisations/{org}/devices/{device}/desired-model"),
                            Some(serde_json::json!({ "model_id": model_id })),
                        )
                        .await?
                        .ok_or_else(|| CliError::Decode("empty body".into()))?;
                    return status_table(out, json, &[s]);
                }
                ModelCmd::Status => {
                    let s: Vec<DeviceModelStatus> = client
                        .get(&format!("/v1/organisations/{org}/model-status"))
                        .await?;
                    return status_table(out, json, &s);
                }
            };
            emit(
                out,
                json,
                &models,
                &["ID", "NAME", "VERSION", "KIND", "STAGE", "SHA256"],
                |ms| {
                    ms.iter()
                        .map(|m| {
                            vec![
                                m.id.to_string(),
                                m.name.clone(),
                                m.version.clone(),
                                m.kind.clone(),
                                m.stage.clone(),
                                m.artifact_sha256
                                    .as_deref()
                                    .map(|h| h.get(..12).unwrap_or(h).to_owned())
                                    .unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect()
                },
            )
        }
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

fn key_rows(keys: &[ApiKeyInfo]) -> Vec<Vec<String>> {
    keys.iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                k.name.clone(),
                k.role.clone(),
                k.prefix.clone(),
                k.created_at.to_rfc3339(),
                k.revoked_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
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
                    .send(
                        reqwest::Method::PATCH,
                        &format!("/v1/organisations/{id}"),
                        Some(serde_json::json!({ "display_name": display_name })),
                    )
                    .await?
                    .ok_or_else(|| CliError::Decode("empty body".into()))?,
            ]
        }
        OrgCmd::Delete { org } => {
            let id = resolve_org(client, Some(org)).await?;
            client
                .send::<serde_json::Value>(
                    reqwest::Method::DELETE,
                    &format!("/v1/organisations/{id}"),
                    None,
                )
                .await?;
            writeln!(out, "organisation {id} deleted")?;
            return Ok(());
        }
    };
    emit(
        out,
        json,
        &orgs,
        &["ID", "NAME", "DISPLAY NAME", "CREATED"],
        |os| {
            os.iter()
                .map(|o| {
                    vec![
                        o.id.to_string(),
                        o.name.clone(),
                        o.display_name.clone(),
                        o.created_at.to_rfc3339(),
                    ]
                })
                .collect()
        },
    )
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
    fn labels_must_have_an_equals_sign() {
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("ab").unwrap_err().contains("key=value"));
    }
}
