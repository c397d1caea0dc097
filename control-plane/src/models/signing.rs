//! Model signing on the control plane: the Ed25519 key that signs every uploaded artifact
//! ([`kip_certs::signing::SigningKeyStore`], files beside the CA key in `pki.ca_dir`), its hot
//! reload, and re-signing after a key rotation.
//!
//! Invariants:
//! - Only the upload path signs a new artifact ([`ModelSigning::sign`] is called by
//!   `registry::upload_artifact` after the bytes were hashed). A row written any other way
//!   (e.g. straight into the database) has no signature, and agents refuse it.
//! - Re-signing after a rotation ([`resign_stale`]) re-signs only artifacts whose current
//!   signature verifies under a key trusted now (the previous key during a rotation): it
//!   carries trust over to the new key and never creates trust for an unsigned row.
//! - The key files are reloaded when their content changes (checked every
//!   `pki.ca_reload_interval`), so `kipctl ca rotate-signing-key` on the files is picked up
//!   without a restart. A key set that does not load is not used: the last good one stays.
//! - Agents receive [`ModelSigning::trusted_pem`] with every sync ack over their mTLS channel.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use kip_api::ModelSigningStatus;
use kip_certs::signing::{
    ModelMetadata, Signature, SigningError, SigningKeyPaths, SigningKeyStore, sign_artifact,
    verify_artifact,
};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

/// Artifacts re-signed per database round trip after a rotation.
const RESIGN_BATCH: i64 = 200;

/// The model signing key set as the control plane uses it.
#[derive(Debug)]
pub struct ModelSigning {
    dir: PathBuf,
    store: ArcSwap<SigningKeyStore>,
    /// Content hash of the key files last loaded successfully.
    files_sha256: tokio::sync::Mutex<[u8; 32]>,
}

/// sha256 over the key files (missing files hash as empty), to notice a change cheaply.
fn files_sha256(dir: &Path) -> [u8; 32] {
    let p = SigningKeyPaths::new(dir);
    let mut h = Sha256::new();
    for f in [&p.key, &p.public, &p.previous_public] {
        let bytes = std::fs::read(f).unwrap_or_default();
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    h.finalize().into()
}

impl ModelSigning {
    /// Loads the signing key from `dir` (the CA directory), creating it on first start.
    pub fn open(dir: &Path) -> Result<Arc<Self>, SigningError> {
        let p = SigningKeyPaths::new(dir);
        let store = if p.key.exists() {
            SigningKeyStore::load(dir)?
        } else {
            let s = SigningKeyStore::init(dir)?;
            tracing::info!(key_id = %s.signer().key_id(), dir = %dir.display(),
                "model signing key created");
            s
        };
        tracing::info!(key_id = %store.signer().key_id(),
            rotation_in_progress = store.rotation_in_progress(), "model signing key loaded");
        Ok(Arc::new(Self {
            dir: dir.to_owned(),
            files_sha256: tokio::sync::Mutex::new(files_sha256(dir)),
            store: ArcSwap::from_pointee(store),
        }))
    }

    /// The key set as loaded now (one snapshot per operation).
    pub fn store(&self) -> Arc<SigningKeyStore> {
        self.store.load_full()
    }

    /// Signs the artifact with digest `sha256_hex` of model `name@version` of `org_id`.
    pub fn sign(
        &self,
        org_id: Uuid,
        name: &str,
        version: &str,
        sha256_hex: &str,
    ) -> Result<Signature, SigningError> {
        sign_artifact(
            self.store().signer(),
            sha256_hex,
            &ModelMetadata {
                org_id,
                name,
                version,
            },
        )
    }

    /// Whether `signature` (text form) verifies under a key trusted now for this artifact.
    pub fn verifies(
        &self,
        org_id: Uuid,
        name: &str,
        version: &str,
        sha256_hex: &str,
        signature: &str,
    ) -> bool {
        let meta = ModelMetadata {
            org_id,
            name,
            version,
        };
        signature
            .parse::<Signature>()
            .and_then(|s| verify_artifact(&self.store().trusted(), &s, sha256_hex, &meta))
            .is_ok()
    }

    /// The public keys agents must trust (PEM blocks).
    pub fn trusted_pem(&self) -> String {
        self.store().trusted_pem()
    }

    /// Loads the key files again when their content changed. `Ok(false)`: unchanged.
    pub async fn reload(&self) -> Result<bool, SigningError> {
        let mut last = self.files_sha256.lock().await;
        let dir = self.dir.clone();
        let hash = tokio::task::spawn_blocking(move || files_sha256(&dir))
            .await
            .map_err(|e| SigningError::Store {
                path: self.dir.clone(),
                message: e.to_string(),
            })?;
        if *last == hash {
            return Ok(false);
        }
        let store = SigningKeyStore::load(&self.dir)?;
        tracing::info!(key_id = %store.signer().key_id(),
            rotation_in_progress = store.rotation_in_progress(), "model signing keys reloaded");
        self.store.store(Arc::new(store));
        *last = hash;
        Ok(true)
    }
}

/// Why re-signing failed.
#[derive(Debug, thiserror::Error)]
pub enum ResignError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("signing: {0}")]
    Signing(#[from] SigningError),
}

/// Re-signs with the current key every artifact whose signature is by another key that is
/// still trusted (a rotation in progress). Signatures that do not verify, or are by a retired
/// key, are left alone (and counted as unsigned by [`status`]). Returns how many were
/// re-signed.
pub async fn resign_stale(pool: &PgPool, signing: &ModelSigning) -> Result<u64, ResignError> {
    let store = signing.store();
    let current = store.signer().key_id().to_string();
    let trusted = store.trusted();
    let mut done = 0u64;
    // Rows that fail verification are skipped by id so the loop always ends.
    let mut after = Uuid::nil();
    loop {
        let rows: Vec<(Uuid, Uuid, String, String, String, String)> = sqlx::query_as(
            "SELECT a.model_id, a.org_id, m.name, m.version, a.sha256, a.signature \
             FROM model_artifacts a JOIN ai_models m ON m.org_id = a.org_id AND m.id = a.model_id \
             WHERE a.signature IS NOT NULL AND split_part(a.signature, ':', 2) <> $1 \
               AND a.model_id > $2 \
             ORDER BY a.model_id LIMIT $3",
        )
        .bind(&current)
        .bind(after)
        .bind(RESIGN_BATCH)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else {
            return Ok(done);
        };
        after = last.0;
        for (model_id, org_id, name, version, sha, old) in rows {
            let meta = ModelMetadata {
                org_id,
                name: &name,
                version: &version,
            };
            let valid = old
                .parse::<Signature>()
                .and_then(|s| verify_artifact(&trusted, &s, &sha, &meta));
            if let Err(e) = valid {
                tracing::warn!(%org_id, %model_id, error = %e,
                    "artifact signature does not verify under a trusted key; not re-signed");
                continue;
            }
            let new = sign_artifact(store.signer(), &sha, &meta)?;
            // Only if unchanged meanwhile (another replica may have re-signed it).
            let r = sqlx::query(
                "UPDATE model_artifacts SET signature = $4, signed_at = now() \
                 WHERE org_id = $1 AND model_id = $2 AND signature = $3",
            )
            .bind(org_id)
            .bind(model_id)
            .bind(&old)
            .bind(new.to_string())
            .execute(pool)
            .await?;
            done += r.rows_affected();
        }
    }
}

/// How many artifacts each trusted key signs (every organisation; platform view).
pub async fn status(
    pool: &PgPool,
    signing: &ModelSigning,
) -> Result<ModelSigningStatus, sqlx::Error> {
    let store = signing.store();
    let key_id = store.signer().key_id().to_string();
    let previous_key_id = store
        .trusted()
        .iter()
        .map(|k| k.key_id().to_string())
        .find(|k| *k != key_id);
    let (signed_by_current, signed_by_previous, total): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE split_part(signature, ':', 2) = $1), \
                count(*) FILTER (WHERE split_part(signature, ':', 2) = $2), \
                count(*) \
         FROM model_artifacts",
    )
    .bind(&key_id)
    .bind(previous_key_id.as_deref().unwrap_or(""))
    .fetch_one(pool)
    .await?;
    Ok(ModelSigningStatus {
        trusted_keys_pem: store.trusted_pem(),
        key_id,
        previous_key_id,
        signed_by_current,
        signed_by_previous,
        unsigned: total - signed_by_current - signed_by_previous,
    })
}

/// Reloads changed key files every `interval` and, after a change, re-signs artifacts signed
/// by the previous key; on `tracker` until `token` is cancelled.
pub fn spawn_maintenance(
    signing: Arc<ModelSigning>,
    pool: PgPool,
    interval: Duration,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A rotation made while the control plane was down is re-signed at start; a failed
        // re-sign is retried on the next tick.
        let mut pending = true;
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            match signing.reload().await {
                Ok(true) => pending = true,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e,
                    "the model signing key files changed but cannot be loaded; keeping the \
                     current keys and retrying at the next check"),
            }
            if pending {
                match resign_stale(&pool, &signing).await {
                    Ok(n) => {
                        pending = false;
                        if n > 0 {
                            tracing::info!(
                                resigned = n,
                                "artifacts re-signed with the new model signing key"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "re-signing artifacts failed; retrying"),
                }
            }
        }
    });
}
