//! Outbound HTTPS clients (LLM providers, MLflow) with the workspace's one rustls crypto
//! provider (ring), passed to reqwest explicitly.
//!
//! Invariant: nothing in the control plane installs a process-wide default crypto provider;
//! a library that did so would decide for every other TLS user in its caller's process.
//! Server certificates are checked against the system's roots (rustls-platform-verifier).

use std::sync::Arc;

/// Why an outbound client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up TLS for outbound HTTPS: {0}")]
    Tls(String),
    #[error("cannot build the HTTP client: {0}")]
    Build(#[from] reqwest::Error),
}

/// A reqwest client builder whose TLS uses ring and the platform verifier.
pub fn client_builder() -> Result<reqwest::ClientBuilder, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(reqwest::Client::builder().tls_backend_preconfigured(tls))
}
