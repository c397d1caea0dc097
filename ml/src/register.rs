//! Registers a trained model with kip's control plane: the model version with its card's
//! metrics, then the ONNX artifact (`kip-train --register`).
//!
//! Invariant: re-running is safe. A version already registered (409) is looked up and its
//! artifact upload is repeated; the control plane accepts the same bytes again and refuses
//! other bytes under the same version, so a version can never silently change.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::pipeline::ModelCard;

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot reach the control plane at {server}: {source}")]
    Connect {
        server: String,
        source: reqwest::Error,
    },
    #[error("{what}: the control plane answered {status}: {body}")]
    Api {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("{0}")]
    Other(String),
}

/// Where and as whom to register.
#[derive(Debug, Clone)]
pub struct Target {
    /// Control-plane URL (`KIP_SERVER`).
    pub server: String,
    /// API key (`KIP_API_KEY`).
    pub api_key: String,
    /// Organisation id or name (`KIP_ORG`); default: the organisation of the key.
    pub org: Option<String>,
}

/// The registered version.
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    pub id: String,
    pub org_id: String,
    pub name: String,
    pub version: String,
    pub artifact_sha256: Option<String>,
}

struct Client<'a> {
    http: reqwest::Client,
    t: &'a Target,
}

impl Client<'_> {
    async fn send(
        &self,
        what: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), RegisterError> {
        let connect = |source| RegisterError::Connect {
            server: self.t.server.clone(),
            source,
        };
        let resp = req
            .bearer_auth(&self.t.api_key)
            .send()
            .await
            .map_err(connect)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(connect)?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !(200..300).contains(&status) && status != 409 {
            return Err(RegisterError::Api {
                what,
                status,
                body: text.chars().take(500).collect(),
            });
        }
        Ok((status, v))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.t.server.trim_end_matches('/'))
    }

    async fn org_id(&self) -> Result<String, RegisterError> {
        if let Some(o) = &self.t.org {
            if uuid_like(o) {
                return Ok(o.clone());
            }
            let (_, orgs) = self
                .send(
                    "listing organisations",
                    self.http.get(self.url("/v1/organisations")),
                )
                .await?;
            return orgs
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == o.as_str()))
                .and_then(|x| x["id"].as_str())
                .map(str::to_owned)
                .ok_or_else(|| RegisterError::Other(format!("no organisation named {o:?}")));
        }
        let (_, me) = self
            .send("who am I", self.http.get(self.url("/v1/me")))
            .await?;
        me["org_id"].as_str().map(str::to_owned).ok_or_else(|| {
            RegisterError::Other("a platform key needs KIP_ORG (organisation id or name)".into())
        })
    }
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Registers `card` and uploads `onnx`; returns the registered version.
pub async fn register(
    t: &Target,
    card: &ModelCard,
    onnx: &[u8],
) -> Result<Registered, RegisterError> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .map_err(|source| RegisterError::Connect {
            server: t.server.clone(),
            source,
        })?;
    let c = Client { http, t };
    let org = c.org_id().await?;
    let base = format!("/v1/organisations/{org}/models");
    let metrics =
        serde_json::to_value(&card.metrics).map_err(|e| RegisterError::Other(e.to_string()))?;
    let body = json!({
        "name": card.name, "version": card.version, "kind": card.kind,
        "artifact_sha256": card.artifact_sha256, "metrics": metrics,
    });
    let (status, v) = c
        .send(
            "registering the model",
            c.http.post(c.url(&base)).json(&body),
        )
        .await?;
    let model: Value = if status == 409 {
        let (_, all) = c
            .send(
                "listing models",
                c.http.get(c.url(&format!("{base}?limit=1000"))),
            )
            .await?;
        all.as_array()
            .and_then(|a| {
                a.iter().find(|m| {
                    m["name"] == card.name.as_str() && m["version"] == card.version.as_str()
                })
            })
            .cloned()
            .ok_or_else(|| RegisterError::Other("409 but the version is not listed".into()))?
    } else {
        v
    };
    let registered: Registered =
        serde_json::from_value(model).map_err(|e| RegisterError::Other(e.to_string()))?;
    let (status, v) = c
        .send(
            "uploading the artifact",
            c.http
                .put(c.url(&format!("{base}/{}/artifact", registered.id)))
                .header("content-type", "application/octet-stream")
                .body(onnx.to_vec()),
        )
        .await?;
    if status == 409 {
        return Err(RegisterError::Other(format!(
            "artifact upload refused: {v}"
        )));
    }
    Ok(registered)
}
