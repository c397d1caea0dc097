//! Simulated agents' identities: enrolled through the control plane's real `POST /enroll`
//! (one one-time enrollment token each, from the admin API), cached on disk so that a second
//! run against the same control plane enrolls nobody.
//!
//! Cache layout (`--state-dir`): `org` (the organisation id the agents belong to) and
//! `agents/<index>/device.pem` (key + certificate chain) and `bundle.pem` (trust bundle), the
//! same two files a real agent keeps in its identity directory.
//!
//! Invariants:
//! - An agent directory is complete or absent: its files are written to a temporary
//!   directory that is renamed into place, so an interrupted run never leaves half an identity.
//! - A cache for another control plane is refused (its organisation is not listed there)
//!   instead of producing thousands of TLS failures.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, bail};
use kip_certs::{DeviceKey, TrustBundle, rustls::ClientConfig};
use serde_json::{Value, json};
use uuid::Uuid;

/// One simulated agent's credentials, ready for mTLS.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub tls: Arc<ClientConfig>,
    /// sha256 of the trust bundle, reported like a real agent does.
    pub bundle_sha256: String,
}

/// The admin API the identities come from.
#[derive(Debug, Clone)]
pub struct Admin {
    pub http: reqwest::Client,
    /// `http://host:port` of the admin listener (which also serves `/enroll`).
    pub url: String,
    pub key: String,
}

impl Admin {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| path.to_owned())?;
        let status = resp.status();
        let text = resp.text().await.with_context(|| path.to_owned())?;
        if !status.is_success() {
            bail!("{path}: {status} {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn org_exists(&self, org: Uuid) -> anyhow::Result<bool> {
        let resp = self
            .http
            .get(format!("{}/v1/organisations/{org}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await
            .context("GET /v1/organisations/{org}")?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => bail!("GET /v1/organisations/{org}: {s}"),
        }
    }

    async fn create_org(&self, name: &str) -> anyhow::Result<Uuid> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/organisations",
                Some(json!({ "name": name })),
            )
            .await?;
        v["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("organisation answer without an id")
    }

    async fn enroll_token(&self, org: Uuid) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/organisations/{org}/enroll-tokens"),
                Some(json!({ "ttl_s": 600 })),
            )
            .await?;
        v["token"]
            .as_str()
            .map(ToOwned::to_owned)
            .context("enroll-token answer without a token")
    }

    /// Enrolls one device through `POST /enroll` and returns (device.pem, bundle.pem).
    async fn enroll(&self, org: Uuid, name: &str) -> anyhow::Result<(String, String)> {
        let token = self.enroll_token(org).await?;
        let key = DeviceKey::generate()?;
        let resp = self
            .http
            .post(format!("{}/enroll", self.url))
            .json(&json!({
                "token": token,
                "csr_pem": key.csr_pem(name)?,
                "device_name": name,
                "org_id": org,
            }))
            .send()
            .await
            .context("/enroll")?;
        let status = resp.status();
        let text = resp.text().await.context("/enroll")?;
        if !status.is_success() {
            bail!("/enroll: {status} {text}");
        }
        let v: Value = serde_json::from_str(&text).context("/enroll answer")?;
        let chain = v["certificate_chain_pem"]
            .as_str()
            .context("/enroll answer without certificate_chain_pem")?;
        let bundle = v["trust_bundle_pem"]
            .as_str()
            .context("/enroll answer without trust_bundle_pem")?;
        Ok((format!("{}{chain}", key.to_pem()), bundle.to_owned()))
    }
}

/// Loads the identity stored in `dir`.
fn load(dir: &Path) -> anyhow::Result<AgentIdentity> {
    let device = kip_certs::files::read(&dir.join("device.pem"))?;
    let bundle = TrustBundle::from_pem(&kip_certs::files::read(&dir.join("bundle.pem"))?)?;
    let key = DeviceKey::from_pem(&device)?;
    let chain = kip_certs::certs_from_pem(&device, "device certificate chain")?;
    let leaf = chain.first().context("empty certificate chain")?;
    // The listener would refuse a certificate that names no device: fail here instead.
    kip_certs::parse_peer_cert(leaf)?;
    let tls = kip_certs::client_config(&bundle, chain, key.private_key_der())?;
    Ok(AgentIdentity {
        tls,
        bundle_sha256: bundle.sha256_hex(),
    })
}

fn agent_dir(state: &Path, index: usize) -> PathBuf {
    state.join("agents").join(format!("{index:06}"))
}

/// Identities for agents `0..count`: loaded from `state` where cached, enrolled (at most
/// `concurrency` at once) otherwise. Returns them and how many were enrolled now.
pub async fn identities(
    admin: &Admin,
    state: &Path,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<AgentIdentity>, usize)> {
    std::fs::create_dir_all(state.join("agents"))
        .with_context(|| format!("creating {}", state.display()))?;
    let org_file = state.join("org");
    let org: Uuid = match std::fs::read_to_string(&org_file) {
        Ok(s) => {
            let org: Uuid = s.trim().parse().context("the cached org id")?;
            if !admin.org_exists(org).await? {
                bail!(
                    "{} holds organisation {org}, which {} does not know: the cache belongs to \
                     another control plane; use a new --state-dir",
                    org_file.display(),
                    admin.url
                );
            }
            org
        }
        Err(_) => {
            let org = admin
                .create_org(&format!(
                    "fleet-sim-{}",
                    chrono::Utc::now().timestamp_millis()
                ))
                .await?;
            std::fs::write(&org_file, org.to_string())?;
            org
        }
    };
    let missing: Vec<usize> = (0..count)
        .filter(|&i| !agent_dir(state, i).join("device.pem").exists())
        .collect();
    let enrolled = missing.len();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for index in missing {
        let admin = admin.clone();
        let state = state.to_owned();
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let (device, bundle) = admin.enroll(org, &format!("sim-{index:06}")).await?;
            let dir = agent_dir(&state, index);
            let tmp = state.join("agents").join(format!(".tmp-{index:06}"));
            std::fs::create_dir_all(&tmp)?;
            kip_certs::files::write_private(&tmp.join("device.pem"), &device)?;
            kip_certs::files::write_public(&tmp.join("bundle.pem"), &bundle)?;
            std::fs::rename(&tmp, &dir)?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let ids = (0..count)
        .map(|i| load(&agent_dir(state, i)).with_context(|| format!("agent {i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((ids, enrolled))
}
