//! Trust bundles and the rustls configurations of the agent mTLS channel.
//!
//! Invariants: both sides speak TLS 1.3 only, with the ring provider passed explicitly; the
//! server requires a client certificate chaining to a bundle root and checks the leaf against
//! the CRLs given (unknown revocation status is an error, see the crate docs).

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};

use crate::CertError;

/// The root certificates a peer trusts. During a root rollover it holds the old and the new
/// root, so certificates chaining to either verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle of the given DER certificates; refuses an empty bundle (it would trust nothing
    /// and every handshake would fail with a confusing error).
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        if certs.is_empty() {
            return Err(CertError::Pem {
                what: "trust bundle",
                message: "contains no certificate".into(),
            });
        }
        Ok(Self { certs })
    }

    /// Parses one or more concatenated `CERTIFICATE` PEM blocks.
    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        Self::new(certs_from_pem(pem, "trust bundle")?)
    }

    /// The bundle as concatenated PEM blocks.
    pub fn to_pem(&self) -> String {
        self.certs.iter().map(|c| cert_to_pem(c)).collect()
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// Lowercase hex sha256 over the DER certificates in bundle order: what an agent reports
    /// and the control plane compares to decide whether to send its bundle.
    pub fn sha256_hex(&self) -> String {
        let all: Vec<u8> = self
            .certs
            .iter()
            .flat_map(|c| c.as_ref().to_vec())
            .collect();
        crate::ca::sha256_hex(&all)
    }

    /// Adds `other`'s certificates that are not already present (rollover overlap).
    pub fn merge(&mut self, other: &TrustBundle) {
        for c in &other.certs {
            if !self.certs.contains(c) {
                self.certs.push(c.clone());
            }
        }
    }

    /// The bundle as a rustls root store.
    pub fn root_store(&self) -> Result<RootCertStore, CertError> {
        let mut roots = RootCertStore::empty();
        for c in &self.certs {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }
}

/// PEM-encodes one DER certificate.
pub fn cert_to_pem(der: &CertificateDer<'_>) -> String {
    pem_block("CERTIFICATE", der.as_ref())
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64_lite::encode;
    let b64 = encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Minimal standard base64 (with padding) for PEM output; decoding goes through pki-types.
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let idx = |shift: u32| ALPHABET[((n >> shift) & 63) as usize] as char;
            out.push(idx(18));
            out.push(idx(12));
            out.push(if chunk.len() > 1 { idx(6) } else { '=' });
            out.push(if chunk.len() > 2 { idx(0) } else { '=' });
        }
        out
    }
}

/// Parses every `CERTIFICATE` block of `pem`; at least one must be present.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what,
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            what,
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Parses a private key (PKCS#8, SEC1 or PKCS#1) from PEM.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem {
        what: "private key",
        message: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration of the agent mTLS listener.
///
/// `chain` is the server's certificate followed by its intermediate; `crls` must hold a CRL
/// of every intermediate that issues device certificates (a device certificate from an
/// intermediate without CRL is refused).
pub fn server_config(
    bundle: &TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<ServerConfig>, CertError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store()?),
        provider.clone(),
    )
    .with_crls(crls)
    // Intermediates are revoked by rolling them and shipping a new bundle; checking
    // them against root CRLs would need the offline root key for every CRL refresh.
    .only_check_end_entity_revocation()
    .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client configuration of an agent: presents `chain` (device certificate then intermediate)
/// with `key`, trusts servers chaining to `bundle`.
pub fn client_config(
    bundle: &TrustBundle,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, CertError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(bundle.root_store()?)
        .with_client_auth_cert(chain, key)?;
    Ok(Arc::new(cfg))
}

fn pem_file_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> CertError {
    CertError::PemFile {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Client configuration for a TLS connection outside the agent channel (an MQTT broker):
/// trusts the certificates in the PEM file `ca_file` and, when `client_auth` names a
/// (certificate chain, key) pair of PEM files, presents them. rustls' safe default protocol
/// versions (brokers may not speak TLS 1.3 only). Errors name the file and what it should hold.
pub fn client_config_from_files(
    ca_file: &Path,
    client_auth: Option<(&Path, &Path)>,
) -> Result<ClientConfig, CertError> {
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| pem_file_err("CA file", ca_file, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_file_err("CA file", ca_file, e))?;
    if cas.is_empty() {
        return Err(pem_file_err("CA file", ca_file, "no certificate in it"));
    }
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| pem_file_err("CA file", ca_file, e))?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert_file, key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .map_err(|e| pem_file_err("client certificate", cert_file, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_file_err("client certificate", cert_file, e))?;
            if chain.is_empty() {
                return Err(pem_file_err(
                    "client certificate",
                    cert_file,
                    "no certificate in it",
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| pem_file_err("client key", key_file, e))?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_file_errors_name_the_file_and_its_role() {
        let dir = std::env::temp_dir().join(format!("kip-certs-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = client_config_from_files(&empty, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CA file") && err.contains("empty.pem") && err.contains("no certificate"),
            "{err}"
        );
        let missing = dir.join("missing.pem");
        let err = client_config_from_files(&missing, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn base64_matches_known_vectors() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_lite::encode(input), want);
        }
    }

    #[test]
    fn empty_bundle_is_refused() {
        assert!(TrustBundle::new(vec![]).is_err());
        assert!(TrustBundle::from_pem("").is_err());
    }
}
