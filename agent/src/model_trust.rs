//! Model trust: the agent loads a model from the control plane only if the control plane's
//! model signing key signed exactly these bytes for this organisation, name and version.
//!
//! The trusted public keys arrive with every sync ack over the agent's mTLS channel
//! (`DesiredState::model_signing_keys_pem`, during a rotation the new and the previous key);
//! the signature comes with the desired model. [`ModelTrust::fetch_verified`] downloads the
//! artifact with a size cap, hashes it while it streams in, and checks the signature over
//! (organisation from the device's own certificate, name, version, sha256 of the downloaded
//! bytes) with [`kip_certs::signing::verify_artifact`].
//!
//! Invariants:
//! - Nothing is loaded before the signature verified over the sha256 of the bytes that will
//!   be loaded; an unsigned, tampered, re-targeted (other organisation, name or version) or
//!   oversized artifact is refused, counted in `kip_agent_model_refusals_total{reason}` and
//!   reported (the `kip-model-error` sync header); the caller keeps the last good model.
//! - No keys, no models: until an ack brought keys (or when the device's organisation is not
//!   known) every model is refused. A key set that does not parse keeps the previous one.
//! - Models from local configuration (`[inference] model_path`) are the operator's and are
//!   not checked here (only their optional pinned sha256 is).

use kip_certs::signing::{ModelMetadata, PublicKey, Signature, SigningError, verify_artifact};
use kip_shared::sync::{DesiredModel, MODEL_ERROR_MAX_BYTES};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// Largest model artifact the agent downloads (the control plane's upload limit).
pub const MAX_MODEL_BYTES: u64 = 64 * 1024 * 1024;

/// Why a desired model was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "model is unsigned: the control plane has no signature for it (upload it through the API)"
    )]
    Unsigned,
    #[error("the device's organisation is unknown, so no model signature can be checked")]
    NoOrg,
    #[error("no model signing keys received from the control plane yet")]
    NoTrustedKeys,
    #[error("model signature refused: {0}")]
    Signature(#[source] SigningError),
    #[error("download failed: {0}")]
    Download(String),
    #[error("artifact is larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: u64 },
    #[error("downloaded artifact has sha256 {got}, the control plane announced {want}")]
    ShaMismatch { want: String, got: String },
}

impl Refusal {
    /// Whether the refusal is a verdict on the artifact itself (unsigned, bad or foreign
    /// signature, too large, another digest): the same bytes and signature would be refused
    /// again. The others are failures of the moment (a download that failed or was answered
    /// 404 because the desired state moved on between the ack and the download, keys or
    /// organisation not known yet): the same artifact may well succeed later.
    pub fn is_lasting(&self) -> bool {
        match self {
            Self::Unsigned | Self::TooLarge { .. } | Self::ShaMismatch { .. } => true,
            Self::Signature(SigningError::NoTrustedKeys) => false,
            Self::Signature(_) => true,
            Self::Download(_) | Self::NoOrg | Self::NoTrustedKeys => false,
        }
    }

    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::NoOrg => "no_org",
            Self::NoTrustedKeys | Self::Signature(SigningError::NoTrustedKeys) => "no_trusted_keys",
            Self::Signature(SigningError::UnknownKey(_)) => "untrusted_key",
            Self::Signature(SigningError::BadSignature(_)) => "bad_signature",
            Self::Signature(_) => "malformed_signature",
            Self::Download(_) => "download",
            Self::TooLarge { .. } => "too_large",
            Self::ShaMismatch { .. } => "sha256_mismatch",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The trusted model signing keys and the device's organisation.
#[derive(Debug)]
pub struct ModelTrust {
    org_id: Option<Uuid>,
    keys: Vec<PublicKey>,
    /// The PEM the keys were parsed from, to skip re-parsing an unchanged set.
    keys_pem: String,
    refusals: Family<ReasonLabels, Counter>,
}

impl ModelTrust {
    /// Registers `kip_agent_model_refusals_total`.
    pub fn new(registry: &mut Registry) -> Self {
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "model_refusals",
            "Desired models refused before loading (unsigned, bad signature, wrong digest, ...); \
             the previous model kept serving",
            refusals.clone(),
        );
        Self {
            org_id: None,
            keys: Vec::new(),
            keys_pem: String::new(),
            refusals,
        }
    }

    /// The organisation of the device's own certificate.
    pub fn set_org(&mut self, org_id: Uuid) {
        self.org_id = Some(org_id);
    }

    /// Takes the key set of a sync ack. `None` (an older control plane) keeps the keys.
    pub fn update_keys(&mut self, pem: Option<&str>) {
        let Some(pem) = pem else { return };
        if pem == self.keys_pem {
            return;
        }
        match PublicKey::all_from_pem(pem) {
            Ok(keys) => {
                tracing::info!(keys = ?keys.iter().map(PublicKey::key_id).collect::<Vec<_>>(),
                    "model signing keys updated");
                self.keys = keys;
                self.keys_pem = pem.to_owned();
            }
            Err(e) => {
                tracing::warn!(error = %e, "the control plane sent model signing keys that do not parse; keeping the previous ones");
            }
        }
    }

    /// Checks `m`'s signature over `sha256_hex` (the digest of the bytes to load).
    pub fn check(&self, m: &DesiredModel, sha256_hex: &str) -> Result<(), Refusal> {
        let sig = m.signature.as_deref().ok_or(Refusal::Unsigned)?;
        let org_id = self.org_id.ok_or(Refusal::NoOrg)?;
        if self.keys.is_empty() {
            return Err(Refusal::NoTrustedKeys);
        }
        let sig: Signature = sig.parse().map_err(Refusal::Signature)?;
        let meta = ModelMetadata {
            org_id,
            name: &m.name,
            version: &m.version,
        };
        verify_artifact(&self.keys, &sig, sha256_hex, &meta).map_err(Refusal::Signature)?;
        Ok(())
    }

    /// Downloads `url` (at most [`MAX_MODEL_BYTES`], hashed as it streams in) and returns the
    /// bytes and their sha256 only when `m`'s signature verifies over them. Counts a refusal.
    pub async fn fetch_verified(
        &self,
        client: &reqwest::Client,
        url: &str,
        m: &DesiredModel,
    ) -> Result<(Vec<u8>, String), Refusal> {
        let r = self.fetch_verified_uncounted(client, url, m).await;
        if let Err(e) = &r {
            self.count(e);
        }
        r
    }

    /// Counts a refusal found elsewhere.
    pub fn count(&self, r: &Refusal) {
        self.refusals
            .get_or_create(&ReasonLabels { reason: r.reason() })
            .inc();
    }

    async fn fetch_verified_uncounted(
        &self,
        client: &reqwest::Client,
        url: &str,
        m: &DesiredModel,
    ) -> Result<(Vec<u8>, String), Refusal> {
        // Cheap refusals first: no download for a model that can never verify.
        if m.signature.is_none() {
            return Err(Refusal::Unsigned);
        }
        if self.org_id.is_none() {
            return Err(Refusal::NoOrg);
        }
        if self.keys.is_empty() {
            return Err(Refusal::NoTrustedKeys);
        }
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| Refusal::Download(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(Refusal::Download(format!("HTTP {}", resp.status())));
        }
        let too_large = Refusal::TooLarge {
            limit_bytes: MAX_MODEL_BYTES,
        };
        if resp.content_length().is_some_and(|n| n > MAX_MODEL_BYTES) {
            return Err(too_large);
        }
        let mut bytes = Vec::new();
        let mut hash = Sha256::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Refusal::Download(e.to_string()))?
        {
            if (bytes.len() + chunk.len()) as u64 > MAX_MODEL_BYTES {
                return Err(too_large);
            }
            hash.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        let sha = hex::encode(hash.finalize());
        self.check(m, &sha)?;
        if sha != m.sha256 {
            // Signed but not what the ack announced: refuse rather than guess which is right.
            return Err(Refusal::ShaMismatch {
                want: m.sha256.clone(),
                got: sha,
            });
        }
        Ok((bytes, sha))
    }
}

/// `message` as a `kip-model-error` header value: printable ASCII, at most
/// [`MODEL_ERROR_MAX_BYTES`].
pub fn header_value(message: &str) -> String {
    message
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(MODEL_ERROR_MAX_BYTES)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use kip_certs::signing::{SigningKey, sign_artifact};

    use super::*;

    fn desired(sig: Option<String>) -> DesiredModel {
        DesiredModel {
            name: "rul".into(),
            version: "1.0.0".into(),
            sha256: "ab".repeat(32),
            download_path: "/x".into(),
            signature: sig,
        }
    }

    #[test]
    fn only_a_signature_for_this_org_name_version_and_digest_verifies() {
        let key = SigningKey::generate().unwrap();
        let org = Uuid::new_v4();
        let sha = "ab".repeat(32);
        let sig = |org_id, name: &str, version: &str, sha: &str| {
            sign_artifact(
                &key,
                sha,
                &ModelMetadata {
                    org_id,
                    name,
                    version,
                },
            )
            .unwrap()
            .to_string()
        };
        let mut t = ModelTrust::new(&mut Registry::default());
        let good = desired(Some(sig(org, "rul", "1.0.0", &sha)));
        assert_eq!(t.check(&good, &sha).unwrap_err().reason(), "no_org");
        t.set_org(org);
        assert_eq!(
            t.check(&good, &sha).unwrap_err().reason(),
            "no_trusted_keys"
        );
        t.update_keys(Some(&key.public_key().to_pem()));
        t.check(&good, &sha).unwrap();
        // Tampered bytes (another digest), another version, another org, no signature.
        let other = "cd".repeat(32);
        assert_eq!(
            t.check(&good, &other).unwrap_err().reason(),
            "bad_signature"
        );
        let wrong_version = desired(Some(sig(org, "rul", "2.0.0", &sha)));
        assert_eq!(
            t.check(&wrong_version, &sha).unwrap_err().reason(),
            "bad_signature"
        );
        let wrong_org = desired(Some(sig(Uuid::new_v4(), "rul", "1.0.0", &sha)));
        assert_eq!(
            t.check(&wrong_org, &sha).unwrap_err().reason(),
            "bad_signature"
        );
        assert_eq!(
            t.check(&desired(None), &sha).unwrap_err().reason(),
            "unsigned"
        );
        // A key the control plane does not list.
        let stranger = SigningKey::generate().unwrap();
        let foreign = sign_artifact(
            &stranger,
            &sha,
            &ModelMetadata {
                org_id: org,
                name: "rul",
                version: "1.0.0",
            },
        )
        .unwrap();
        assert_eq!(
            t.check(&desired(Some(foreign.to_string())), &sha)
                .unwrap_err()
                .reason(),
            "untrusted_key"
        );
        // Keys that do not parse keep the previous set.
        t.update_keys(Some("garbage"));
        t.check(&good, &sha).unwrap();
    }

    #[test]
    fn header_values_are_printable_and_bounded() {
        let v = header_value(&format!("bad\nthing\u{e9}{}", "x".repeat(1000)));
        assert!(v.starts_with("bad?thing?x"));
        assert_eq!(v.len(), MODEL_ERROR_MAX_BYTES);
    }
}
