//! The one decoder of certificate signing requests (device enrollment, recovery, OT devices).
//!
//! Invariants: only the public key of a CSR is used; its self-signature must verify (proof of
//! possession); everything else it asks for (names, extensions, key usages, CA flags) is
//! ignored, so unusual but harmless extensions from other tools do not make a CSR fail. Input
//! is bounded ([`MAX_CSR_PEM_BYTES`]) before it is decoded, exactly one DER structure with no
//! trailing bytes is accepted, and every failure is a [`CertError::Csr`].

use rcgen::SubjectPublicKeyInfo;
use rustls::pki_types::{CertificateSigningRequestDer, pem::PemObject as _};
use x509_parser::{
    certification_request::X509CertificationRequest, prelude::FromDer as _, public_key,
};

use crate::CertError;

/// Largest CSR PEM accepted (an RSA 8192 CSR is about 3 KiB).
pub const MAX_CSR_PEM_BYTES: usize = 64 * 1024;

/// Algorithm and size of a requested public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: usize },
    EcP256,
    EcP384,
    Ed25519,
    Other,
}

/// The public key of a checked CSR.
#[derive(Debug)]
pub(crate) struct CsrKey {
    pub(crate) spki: SubjectPublicKeyInfo,
    pub(crate) kind: KeyKind,
}

fn csr_err(msg: impl Into<String>) -> CertError {
    CertError::Csr(msg.into())
}

/// Decodes a CSR (one `CERTIFICATE REQUEST` PEM block), verifies its self-signature and
/// returns its public key.
pub(crate) fn parse_csr_pem(pem: &str) -> Result<CsrKey, CertError> {
    if pem.len() > MAX_CSR_PEM_BYTES {
        return Err(csr_err(format!(
            "{} bytes, the limit is {MAX_CSR_PEM_BYTES}",
            pem.len()
        )));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| csr_err(format!("not a CERTIFICATE REQUEST PEM block: {e}")))?;
    parse_csr_der(der.as_ref())
}

/// As [`parse_csr_pem`], from DER.
pub(crate) fn parse_csr_der(der: &[u8]) -> Result<CsrKey, CertError> {
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| csr_err(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(csr_err(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    csr.verify_signature().map_err(|e| {
        csr_err(format!(
            "the request's signature does not verify with its own key: {e}"
        ))
    })?;
    let spki = &csr.certification_request_info.subject_pki;
    let kind = match spki.parsed() {
        Ok(public_key::PublicKey::RSA(rsa)) => KeyKind::Rsa {
            bits: unsigned_bits(rsa.modulus),
        },
        Ok(public_key::PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve.map(|o| o.to_id_string()).as_deref() {
                Some("1.2.840.10045.3.1.7") => KeyKind::EcP256,
                Some("1.3.132.0.34") => KeyKind::EcP384,
                _ => KeyKind::Other,
            }
        }
        Ok(public_key::PublicKey::Unknown(_))
            if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" =>
        {
            KeyKind::Ed25519
        }
        _ => KeyKind::Other,
    };
    let spki = SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| csr_err(format!("unsupported public key: {e}")))?;
    Ok(CsrKey { spki, kind })
}

/// Bit length of a big-endian unsigned integer (leading zero bytes and bits not counted).
fn unsigned_bits(be: &[u8]) -> usize {
    let be = match be.iter().position(|&b| b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    be.first()
        .map_or(0, |&b| 8 * be.len() - b.leading_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_length_ignores_leading_zeros() {
        assert_eq!(unsigned_bits(&[]), 0);
        assert_eq!(unsigned_bits(&[0, 0]), 0);
        assert_eq!(unsigned_bits(&[0, 0x80, 0]), 16);
        assert_eq!(unsigned_bits(&[0x01, 0]), 9);
    }

    #[test]
    fn a_device_csr_yields_its_p256_key() {
        let key = crate::DeviceKey::generate().unwrap();
        let csr = parse_csr_pem(&key.csr_pem("gw").unwrap()).unwrap();
        assert_eq!(csr.kind, KeyKind::EcP256);
    }

    #[test]
    fn oversized_or_trailing_input_is_refused_with_a_csr_error() {
        let big = "A".repeat(MAX_CSR_PEM_BYTES + 1);
        assert!(matches!(parse_csr_pem(&big), Err(CertError::Csr(_))));
        let key = crate::DeviceKey::generate().unwrap();
        let pem = key.csr_pem("gw").unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        der.push(0);
        let err = parse_csr_der(&der).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    /// Regression: rcgen's CSR parser refuses any extension it does not model, so a CSR from
    /// `openssl req -addext subjectKeyIdentifier=hash` (common in OT tooling) failed. Only
    /// the key matters here, so such a CSR is accepted.
    #[test]
    fn an_openssl_csr_with_extensions_rcgen_refuses_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "k.pem",
                "-out",
                "r.csr",
                "-subj",
                "/CN=plc",
                "-addext",
                "subjectKeyIdentifier=hash",
            ])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = std::fs::read_to_string(dir.path().join("r.csr")).unwrap();
        assert!(rcgen::CertificateSigningRequestParams::from_pem(&pem).is_err());
        assert_eq!(parse_csr_pem(&pem).unwrap().kind, KeyKind::EcP256);
    }
}
