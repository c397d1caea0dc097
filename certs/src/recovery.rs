//! Recovery of a device whose certificate expired (e.g. a gateway offline longer than the
//! certificate lifetime), without a new bootstrap token.
//!
//! Invariants: the expired chain must have been valid (chain to a bundle root, not revoked per
//! the CRLs) at a moment inside its validity; it may have expired at most `grace` ago; and the
//! CSR must carry the *same public key* as the expired certificate and be signed by it. So only
//! the holder of the device's private key can recover, and only as the same device.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::PublicKeyData as _;
use rustls::{
    pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime},
    server::WebPkiClientVerifier,
};
use x509_parser::prelude::FromDer as _;

use crate::{CertError, PeerCert, TrustBundle, parse_peer_cert};

/// Checks an expired (or still valid) device chain plus a CSR for the same key; returns the
/// device named by the certificate. See the module docs for the rules.
pub fn verify_for_recovery(
    bundle: &TrustBundle,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: &[CertificateDer<'static>],
    csr_pem: &str,
    grace: Duration,
    now: SystemTime,
) -> Result<PeerCert, CertError> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| CertError::BadCert("empty certificate chain".into()))?;
    let peer = parse_peer_cert(leaf)?;
    if now > peer.not_after + grace {
        return Err(CertError::Validity(format!(
            "the certificate expired more than {} s ago; enroll again with a new token",
            grace.as_secs()
        )));
    }
    // Verify as of a moment when the certificate was valid: the last second of its life, or
    // now if it has not expired yet.
    let at = now.min(peer.not_after - Duration::from_secs(1));
    let at = UnixTime::since_unix_epoch(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| CertError::Validity("certificate predates 1970".into()))?,
    );
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(bundle.root_store()?),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .with_crls(crls)
    .only_check_end_entity_revocation()
    .build()?;
    verifier.verify_client_cert(leaf, intermediates, at)?;
    let csr = crate::csr::parse_csr_pem(csr_pem)?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| CertError::BadCert(format!("not an X.509 certificate: {e}")))?;
    let cert_key: &[u8] = &cert.public_key().subject_public_key.data;
    if csr.spki.der_bytes() != cert_key {
        return Err(CertError::BadCert(
            "the CSR's key is not the certificate's key".into(),
        ));
    }
    Ok(peer)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::{DeviceIdentity, DeviceKey, RevokedSerial, RootCa, certs_from_pem};

    const DAY: Duration = Duration::from_secs(86_400);

    struct Case {
        bundle: TrustBundle,
        inter: crate::Intermediate,
        key: DeviceKey,
        chain: Vec<CertificateDer<'static>>,
        serial: String,
        id: DeviceIdentity,
    }

    /// A device certificate issued at `issued`, valid one day.
    fn case(issued: SystemTime) -> Case {
        let tag = Uuid::new_v4();
        let root = RootCa::generate(&format!("r {tag}"), issued - 30 * DAY, 100 * DAY).unwrap();
        let inter = root
            .issue_intermediate(&format!("i {tag}"), issued - 30 * DAY, 90 * DAY)
            .unwrap();
        let key = DeviceKey::generate().unwrap();
        let id = DeviceIdentity {
            org_id: Uuid::new_v4(),
            device_id: Uuid::new_v4(),
        };
        let issued = inter
            .sign_device_csr(&key.csr_pem("gw").unwrap(), id, issued, DAY)
            .unwrap();
        Case {
            bundle: TrustBundle::new(vec![root.cert_der().clone()]).unwrap(),
            chain: certs_from_pem(&issued.chain_pem, "c").unwrap(),
            serial: issued.serial_hex,
            inter,
            key,
            id,
        }
    }

    fn crls(c: &Case, revoked: &[RevokedSerial]) -> Vec<CertificateRevocationListDer<'static>> {
        vec![c.inter.crl(revoked, SystemTime::now(), DAY).unwrap()]
    }

    #[test]
    fn an_expired_certificate_within_grace_recovers_with_the_same_key() {
        let now = SystemTime::now();
        let c = case(now - 3 * DAY);
        let csr = c.key.csr_pem("gw").unwrap();
        let peer =
            verify_for_recovery(&c.bundle, crls(&c, &[]), &c.chain, &csr, 30 * DAY, now).unwrap();
        assert_eq!(peer.identity, c.id);
    }

    #[test]
    fn recovery_is_refused_past_grace_for_another_key_revoked_or_foreign() {
        let now = SystemTime::now();
        let c = case(now - 3 * DAY);
        let csr = c.key.csr_pem("gw").unwrap();
        assert!(matches!(
            verify_for_recovery(&c.bundle, crls(&c, &[]), &c.chain, &csr, DAY, now),
            Err(CertError::Validity(_))
        ));
        let other_key = DeviceKey::generate().unwrap().csr_pem("gw").unwrap();
        assert!(
            verify_for_recovery(
                &c.bundle,
                crls(&c, &[]),
                &c.chain,
                &other_key,
                30 * DAY,
                now
            )
            .is_err()
        );
        let revoked = [RevokedSerial {
            serial_hex: c.serial.clone(),
            revoked_at: now - 2 * DAY,
        }];
        assert!(
            verify_for_recovery(&c.bundle, crls(&c, &revoked), &c.chain, &csr, 30 * DAY, now)
                .is_err()
        );
        let foreign = case(now - 3 * DAY);
        assert!(
            verify_for_recovery(
                &c.bundle,
                crls(&c, &[]),
                &foreign.chain,
                &foreign.key.csr_pem("gw").unwrap(),
                30 * DAY,
                now
            )
            .is_err()
        );
    }
}
