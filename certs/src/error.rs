//! The crate's error type.

use std::path::PathBuf;

/// Everything the PKI functions can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Key generation, certificate or CRL signing failed inside rcgen.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CSR is not valid PEM/DER, too large, its signature does not verify, or its key is
    /// not acceptable for the certificate asked for.
    #[error("invalid certificate signing request: {0}")]
    Csr(String),
    /// A field of a certificate request (names, URIs, lifetime) is not acceptable.
    #[error("invalid {field}: {message}")]
    InvalidRequest {
        field: &'static str,
        message: String,
    },
    /// A certificate could not be parsed or does not have the expected shape.
    #[error("invalid certificate: {0}")]
    BadCert(String),
    /// PEM text holds no item of the expected kind, or a malformed one.
    #[error("invalid PEM ({what}): {message}")]
    Pem { what: &'static str, message: String },
    /// rustls refused the configuration (e.g. key does not match the certificate).
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. empty trust bundle, bad CRL).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A PEM file (CA bundle, certificate chain, key) is unreadable, empty or malformed.
    #[error("cannot read {what} {path}: {message}")]
    PemFile {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `ca init` would overwrite an existing CA.
    #[error("{0} already exists; refusing to overwrite a CA")]
    Exists(PathBuf),
    /// The operation needs the root key, which is kept offline.
    #[error("the root CA key is not available (kept offline?): {0}")]
    NoRootKey(PathBuf),
    /// A rotation was started and not finished (`kipctl ca finish-rotation`).
    #[error(
        "a CA rotation is still in progress ({0} exists): run `kipctl ca finish-rotation` once every agent has renewed"
    )]
    RotationInProgress(PathBuf),
    /// A requested lifetime or time window is not possible.
    #[error("invalid validity: {0}")]
    Validity(String),
}
