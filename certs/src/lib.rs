//! Fleet PKI for kip: CA creation, CSR signing, certificate parsing, trust bundles, CRLs and
//! the rustls configurations of the agent mTLS channel.
//!
//! Invariants:
//! - Pure: no network, no global state, no clock reads. Every function that depends on time
//!   takes `now` explicitly, so tests issue expired or future certificates without sleeping.
//!   The only I/O is the PEM file load/save helpers in [`files`] (private keys: mode 0600).
//! - One crypto provider: ring (`rustls::crypto::ring`), passed explicitly to every builder,
//!   so nothing here depends on a process-wide default provider.
//! - A device certificate names its device in exactly one URI SAN,
//!   `kip://org/{org_id}/device/{device_id}`. The signer takes only the public key from a CSR;
//!   names, key usages and CA flags requested in the CSR are ignored, so a device cannot ask
//!   for a certificate naming another device or acting as a CA.
//! - Trust anchors are the *root* certificates of the [`TrustBundle`]; intermediates travel in
//!   the presented chain. Rolling the intermediate is therefore invisible to agents; rolling
//!   the root is done by shipping a bundle with the old and the new root during the overlap.
//! - An expired device certificate can be exchanged for a new one within a grace period by
//!   proving possession of its key ([`verify_for_recovery`]), so a gateway that was offline
//!   longer than its certificate lifetime does not need a new bootstrap token.
//! - mTLS is TLS 1.3 only; client certificates are checked against the CRLs of their issuing
//!   intermediate (end-entity revocation). A certificate whose issuer has no CRL is refused
//!   rather than accepted with unknown status.

mod ca;
mod csr;
mod error;
pub mod files;
mod identity;
pub mod ot;
mod recovery;
pub mod signing;
mod tls;

pub use ca::{
    CaPaths, DeviceKey, FleetCa, Intermediate, IssuedCert, RevokedSerial, RootCa, ServerIdentity,
    crl_for,
};
pub use csr::{KeyKind, MAX_CSR_PEM_BYTES};
pub use error::CertError;
pub use identity::{DeviceIdentity, PeerCert, device_uri, parse_device_uri, parse_peer_cert};
pub use recovery::verify_for_recovery;
pub use rustls;
pub use tls::{
    TrustBundle, cert_to_pem, certs_from_pem, client_config, client_config_from_files,
    key_from_pem, server_config,
};

/// Scheme of the URI SAN that names a device in its client certificate:
/// `kip://org/{org_id}/device/{device_id}`.
pub const DEVICE_URI_PREFIX: &str = "kip://org/";
