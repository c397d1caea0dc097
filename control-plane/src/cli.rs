//! `kipctl`: the admin CLI. The binary only calls [`run`].
//!
//! Invariants: the server's error body is shown verbatim (code and message) so the operator
//! sees the same text the API gives; secrets (API keys) are only printed when they are the
//! result the operator asked for (a newly created key).

use std::{io::Write, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::api::{AiModel, ApiKeyInfo, CreatedApiKey, Device, Me, Organisation};

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
}

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    Register(RegisterModelArgs),
    List,
    Get { model_id: Uuid },
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
        let resp = req.send().await.map_err(|source| CliError::Connect {
            server: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| CliError::Connect {
            server: self.base.clone(),
            source,
        })?;
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
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CliError::Decode(e.to_string()))
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
    let key = read_key(&cli)?;
    // The workspace's one rustls provider; ignoring the error is right when it is already set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
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
            emit(out, json, &me, &["KEY ID", "SCOPE", "ORG"], |m| {
                vec![vec![m.key_id.to_string(), m.scope.clone(), org.clone()]]
            })
        }
        Command::Org(cmd) => org_cmd(&client, cmd, json, out).await,
        Command::Key(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            match cmd {
                KeyCmd::Create { name } => {
                    let k: CreatedApiKey = client
                        .post(
                            &format!("/v1/organisations/{org}/api-keys"),
                            serde_json::json!({ "name": name }),
                        )
                        .await?;
                    if json {
                        return write_json(out, &k);
                    }
                    writeln!(out, "{}", k.key)?;
                    writeln!(
                        out,
                        "# key {} ({}) created; it is shown only once",
                        k.info.id, k.info.name
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
                        &["ID", "NAME", "PREFIX", "CREATED", "REVOKED"],
                        key_rows,
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
                        &["ID", "NAME", "PREFIX", "CREATED", "REVOKED"],
                        key_rows,
                    )
                }
            }
        }
        Command::Device(cmd) => {
            let org = resolve_org(&client, cli.org.as_deref()).await?;
            let base = format!("/v1/organisations/{org}/devices");
            let devices: Vec<Device> = match cmd {
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

fn key_rows(keys: &Vec<ApiKeyInfo>) -> Vec<Vec<String>> {
    keys.iter()
        .map(|k| {
            vec![
                k.id.to_string(),
                k.name.clone(),
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
    fn labels_must_have_an_equals_sign() {
        assert_eq!(parse_label("a=b").unwrap(), ("a".into(), "b".into()));
        assert!(parse_label("ab").unwrap_err().contains("key=value"));
    }
}
