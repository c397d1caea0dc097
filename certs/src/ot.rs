//! Certificates for OT devices: MQTT brokers, PLCs, OPC UA servers and clients, issued by the
//! fleet intermediate, so "certificate authentication for every OT device" needs the fleet CA
//! only (no openssl recipe).
//!
//! Profiles ([`OtProfile`]):
//! - [`OtProfile::TlsServer`] (a broker, a PLC's TLS endpoint): extendedKeyUsage serverAuth,
//!   at least one DNS or IP subject alternative name (clients verify the name they dial).
//! - [`OtProfile::TlsClient`] (a PLC or sensor that connects to a broker): clientAuth; the
//!   common name is the identity Mosquitto's `use_identity_as_username` sees.
//! - [`OtProfile::OpcUa`] (an OPC UA application instance certificate, server or client, per
//!   OPC 10000-6 6.2.2): an RSA key (generated: 2048 bits; from a CSR: 2048 to 4096 bits),
//!   the ApplicationUri as the *first* subject alternative name (URI), then the DNS names and
//!   IP addresses; keyUsage digitalSignature, nonRepudiation, keyEncipherment,
//!   dataEncipherment; extendedKeyUsage serverAuth and clientAuth.
//!
//! Invariants:
//! - Issued through the same path as device certificates ([`crate::Intermediate`]'s leaf
//!   parameters and signer): random 128-bit serial, not a CA, backdated by the clock skew,
//!   never outliving the intermediate (a longer request is shortened to the intermediate's
//!   `not_after`, visible in [`IssuedCert::not_after`]).
//! - Every field is checked before anything is signed, and each refusal names the field
//!   ([`CertError::InvalidRequest`], [`CertError::Validity`] for the lifetime,
//!   [`CertError::Csr`] for the request or its key).
//! - From a CSR only the public key is used (see [`crate::csr`]); names come from the spec.
//! - The chain returned is leaf then intermediate: what a TLS server presents (`certfile` in
//!   Mosquitto); verifiers need the fleet root (`bundle.crt`) as their CA file.
//! - A generated private key is returned once, as PKCS#8 PEM, and never printed by `Debug`.
//!
//! Known limit: the fleet intermediate is ECDSA P-256, so an OPC UA certificate's own key is
//! RSA but its issuer signature is ECDSA. OpenSSL, rustls and async-opcua accept such chains;
//! an OPC UA stack that insists on an RSA-signed chain for the `Basic256Sha256` policy needs
//! the certificate self-signed or issued by an RSA CA instead.

use std::{fmt, net::IpAddr, time::SystemTime};

use rcgen::{
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

use crate::{
    CertError, IssuedCert,
    ca::{Intermediate, name_san, new_key},
    csr::{KeyKind, parse_csr_pem},
};

/// Shortest lifetime an OT certificate may be issued for, in days.
pub const MIN_VALIDITY_DAYS: u32 = 1;
/// Longest lifetime an OT certificate may be issued for, in days (the CA/Browser Forum's
/// former limit; OT devices are renewed by hand more often than agents, so not shorter).
pub const MAX_VALIDITY_DAYS: u32 = 825;
/// Size of a generated OPC UA key.
pub const OPCUA_RSA_BITS: usize = 2048;
/// Smallest and largest RSA key accepted from an OPC UA CSR (Basic256Sha256 and
/// Aes128/Aes256 policies allow 2048 to 4096 bits).
pub const OPCUA_RSA_BITS_RANGE: std::ops::RangeInclusive<usize> = 2048..=4096;
/// Smallest RSA key accepted from a TLS CSR.
pub const MIN_TLS_RSA_BITS: usize = 2048;
/// Most DNS names plus IP addresses in one certificate.
pub const MAX_NAMES: usize = 64;
/// Longest common name (X.520 upper bound).
pub const MAX_COMMON_NAME_BYTES: usize = 64;
/// Longest ApplicationUri.
pub const MAX_APPLICATION_URI_BYTES: usize = 1024;

/// What the certificate is for; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtProfile {
    TlsServer,
    TlsClient,
    OpcUa { application_uri: String },
}

/// What to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtCertSpec {
    pub profile: OtProfile,
    /// Subject common name: 1 to 64 bytes, no control characters.
    pub common_name: String,
    /// DNS subject alternative names (a leading `*.` wildcard only for a TLS server).
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// Lifetime, [`MIN_VALIDITY_DAYS`] to [`MAX_VALIDITY_DAYS`].
    pub validity_days: u32,
}

/// Where the certificate's key comes from.
#[derive(Debug, Clone, Copy)]
pub enum OtKeySource<'a> {
    /// A fresh key made here (ECDSA P-256 for TLS, RSA 2048 for OPC UA), returned with the
    /// certificate. For devices that cannot make a CSR.
    Generate,
    /// The public key of this CSR (PEM); the private key never leaves the device.
    Csr(&'a str),
}

/// A private key generated for an OT device: PKCS#8 PEM. `Debug` prints `...`.
#[derive(Clone, PartialEq, Eq)]
pub struct OtPrivateKey(String);

impl OtPrivateKey {
    /// The key as PKCS#8 PEM. Secret: write it only with [`crate::files::write_private`].
    pub fn pem(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for OtPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtPrivateKey(...)")
    }
}

/// An issued OT certificate.
#[derive(Debug, Clone)]
pub struct OtIssued {
    /// Certificate and chain PEM, serial, validity.
    pub cert: IssuedCert,
    /// The certificate alone as DER (OPC UA stores `own/cert.der`).
    pub cert_der: CertificateDer<'static>,
    /// The generated key, for [`OtKeySource::Generate`]; `None` for a CSR.
    pub private_key: Option<OtPrivateKey>,
}

fn invalid(field: &'static str, message: impl Into<String>) -> CertError {
    CertError::InvalidRequest {
        field,
        message: message.into(),
    }
}

fn check_common_name(cn: &str) -> Result<(), CertError> {
    if cn.is_empty() || cn.len() > MAX_COMMON_NAME_BYTES {
        return Err(invalid(
            "common_name",
            format!(
                "must be 1 to {MAX_COMMON_NAME_BYTES} bytes, got {}",
                cn.len()
            ),
        ));
    }
    if cn.chars().any(char::is_control) {
        return Err(invalid(
            "common_name",
            "must not contain control characters (NUL, line breaks)",
        ));
    }
    Ok(())
}

/// A DNS host name (RFC 1123 labels), optionally with a leading `*.` label.
fn check_dns_name(name: &str, wildcard_ok: bool) -> Result<(), CertError> {
    let bad = |why: &str| invalid("dns_names", format!("{:?} {why}", shorten(name)));
    let host = match name.strip_prefix("*.") {
        Some(rest) if wildcard_ok => rest,
        Some(_) => return Err(bad("may not be a wildcard for this profile")),
        None => name,
    };
    if host.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 bytes"));
    }
    for label in host.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad(
                "is not a host name (labels of 1 to 63 letters, digits or '-', not starting or \
                 ending with '-')",
            ));
        }
    }
    if host.parse::<IpAddr>().is_ok() {
        return Err(bad("is an IP address: list it in ip_addresses"));
    }
    Ok(())
}

/// An absolute URI as OPC UA uses for ApplicationUri (`urn:...`, `http://...`): a scheme, then
/// printable ASCII without spaces.
fn check_application_uri(uri: &str) -> Result<(), CertError> {
    let bad = |why: String| invalid("application_uri", why);
    if uri.is_empty() || uri.len() > MAX_APPLICATION_URI_BYTES {
        return Err(bad(format!(
            "must be 1 to {MAX_APPLICATION_URI_BYTES} bytes, got {}",
            uri.len()
        )));
    }
    if !uri.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "must be printable ASCII without spaces or control characters".into(),
        ));
    }
    let scheme_ok = uri.split_once(':').is_some_and(|(scheme, rest)| {
        !rest.is_empty()
            && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    if !scheme_ok {
        return Err(bad(format!(
            "{:?} is not an absolute URI (e.g. urn:site:plc-1)",
            shorten(uri)
        )));
    }
    Ok(())
}

/// At most 64 characters of outside text for an error message.
fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

impl OtCertSpec {
    /// Checks every field (see the module docs); the error names the first bad one.
    pub fn validate(&self) -> Result<(), CertError> {
        if !(MIN_VALIDITY_DAYS..=MAX_VALIDITY_DAYS).contains(&self.validity_days) {
            return Err(CertError::Validity(format!(
                "validity_days must be between {MIN_VALIDITY_DAYS} and {MAX_VALIDITY_DAYS}, got {}",
                self.validity_days
            )));
        }
        check_common_name(&self.common_name)?;
        let names = self.dns_names.len() + self.ip_addresses.len();
        if names > MAX_NAMES {
            return Err(invalid(
                "dns_names",
                format!("at most {MAX_NAMES} DNS names and IP addresses, got {names}"),
            ));
        }
        let wildcard_ok = self.profile == OtProfile::TlsServer;
        for n in &self.dns_names {
            check_dns_name(n, wildcard_ok)?;
        }
        match &self.profile {
            OtProfile::TlsServer if names == 0 => Err(invalid(
                "dns_names",
                "a server certificate needs at least one DNS name or IP address (what clients \
                 connect to)",
            )),
            OtProfile::OpcUa { application_uri } => check_application_uri(application_uri),
            OtProfile::TlsServer | OtProfile::TlsClient => Ok(()),
        }
    }

    fn sans(&self) -> Result<Vec<SanType>, CertError> {
        let mut sans = Vec::with_capacity(self.dns_names.len() + self.ip_addresses.len() + 1);
        if let OtProfile::OpcUa { application_uri } = &self.profile {
            // OPC UA finds the ApplicationUri as the first URI SAN; keep it first of all.
            sans.push(SanType::URI(application_uri.clone().try_into()?));
        }
        for n in &self.dns_names {
            sans.push(name_san(n)?);
        }
        sans.extend(self.ip_addresses.iter().copied().map(SanType::IpAddress));
        Ok(sans)
    }
}

/// Whether a requested key suits the profile.
fn check_key(profile: &OtProfile, kind: KeyKind) -> Result<(), CertError> {
    let refuse = |why: String| Err(CertError::Csr(why));
    match (profile, kind) {
        (OtProfile::OpcUa { .. }, KeyKind::Rsa { bits })
            if OPCUA_RSA_BITS_RANGE.contains(&bits) =>
        {
            Ok(())
        }
        (OtProfile::OpcUa { .. }, other) => refuse(format!(
            "an OPC UA certificate needs an RSA key of {} to {} bits, the request has {other:?}",
            OPCUA_RSA_BITS_RANGE.start(),
            OPCUA_RSA_BITS_RANGE.end()
        )),
        (_, KeyKind::Rsa { bits }) if bits < MIN_TLS_RSA_BITS => refuse(format!(
            "RSA keys need at least {MIN_TLS_RSA_BITS} bits, the request has {bits}"
        )),
        (_, KeyKind::Other) => refuse(
            "unsupported key: use ECDSA P-256/P-384, Ed25519 or RSA of at least 2048 bits".into(),
        ),
        (_, KeyKind::Rsa { .. } | KeyKind::EcP256 | KeyKind::EcP384 | KeyKind::Ed25519) => Ok(()),
    }
}

fn rsa_key(bits: usize) -> Result<KeyPair, CertError> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let failed = |e: &dyn fmt::Display| CertError::BadCert(format!("RSA key generation: {e}"));
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| failed(&e))?;
    let der = key.to_pkcs8_der().map_err(|e| failed(&e))?;
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(der.as_bytes()),
        &rcgen::PKCS_RSA_SHA256,
    )?)
}

/// Issues an OT certificate from `ca` (the fleet's current intermediate).
pub fn issue(
    ca: &Intermediate,
    spec: &OtCertSpec,
    key: OtKeySource<'_>,
    now: SystemTime,
) -> Result<OtIssued, CertError> {
    spec.validate()?;
    let lifetime = std::time::Duration::from_secs(u64::from(spec.validity_days) * 86_400);
    let (mut params, serial) = ca.leaf_params(now, lifetime)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kip");
    dn.push(DnType::CommonName, spec.common_name.as_str());
    params.distinguished_name = dn;
    params.subject_alt_names = spec.sans()?;
    let (generated, csr_key) = match key {
        OtKeySource::Generate => {
            let pair = match spec.profile {
                OtProfile::OpcUa { .. } => rsa_key(OPCUA_RSA_BITS)?,
                OtProfile::TlsServer | OtProfile::TlsClient => new_key()?,
            };
            (Some(pair), None)
        }
        OtKeySource::Csr(pem) => {
            let csr = parse_csr_pem(pem)?;
            check_key(&spec.profile, csr.kind)?;
            (None, Some(csr))
        }
    };
    let rsa = match (&generated, &csr_key) {
        (Some(pair), _) => pair.algorithm() == &rcgen::PKCS_RSA_SHA256,
        (None, Some(csr)) => matches!(csr.kind, KeyKind::Rsa { .. }),
        (None, None) => false,
    };
    let (key_usages, ekus) = match spec.profile {
        OtProfile::TlsServer => (
            tls_key_usages(rsa),
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        ),
        OtProfile::TlsClient => (
            tls_key_usages(rsa),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
        OtProfile::OpcUa { .. } => (
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::ContentCommitment,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::DataEncipherment,
            ],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
    };
    params.key_usages = key_usages;
    params.extended_key_usages = ekus;
    let (cert, cert_der) = match (&generated, &csr_key) {
        (Some(pair), _) => ca.sign_leaf(&params, serial, now, pair)?,
        (None, Some(csr)) => ca.sign_leaf(&params, serial, now, &csr.spki)?,
        (None, None) => return Err(CertError::Csr("no key".into())),
    };
    Ok(OtIssued {
        cert,
        cert_der,
        private_key: generated.map(|k| OtPrivateKey(k.serialize_pem())),
    })
}

/// RSA TLS 1.2 key exchange needs keyEncipherment; ECDSA and Ed25519 keys only sign.
fn tls_key_usages(rsa: bool) -> Vec<KeyUsagePurpose> {
    if rsa {
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ]
    } else {
        vec![KeyUsagePurpose::DigitalSignature]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

    use super::*;
    use crate::{DeviceKey, RootCa, certs_from_pem};

    const DAY: Duration = Duration::from_secs(86_400);

    fn ca(now: SystemTime) -> Intermediate {
        let root = RootCa::generate("r", now, 100 * DAY).unwrap();
        root.issue_intermediate("i", now, 90 * DAY).unwrap()
    }

    fn spec(profile: OtProfile) -> OtCertSpec {
        OtCertSpec {
            profile,
            common_name: "broker-1".into(),
            dns_names: vec!["broker.site.example".into()],
            ip_addresses: vec!["10.0.0.5".parse().unwrap()],
            validity_days: 30,
        }
    }

    fn opcua() -> OtProfile {
        OtProfile::OpcUa {
            application_uri: "urn:site:plc-1".into(),
        }
    }

    #[test]
    fn a_broker_certificate_has_its_names_and_server_usage() {
        let now = SystemTime::now();
        let ca = ca(now);
        let issued = issue(&ca, &spec(OtProfile::TlsServer), OtKeySource::Generate, now).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        let sans = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            sans.value.general_names,
            vec![
                GeneralName::DNSName("broker.site.example"),
                GeneralName::IPAddress(&[10, 0, 0, 5]),
            ]
        );
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!x.is_ca());
        assert!(ca.is_issuer_of(&issued.cert_der));
        assert_eq!(
            certs_from_pem(&issued.cert.chain_pem, "c").unwrap().len(),
            2
        );
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(issued.cert.not_after), secs(now + 30 * DAY));
        let key = issued.private_key.unwrap();
        assert!(key.pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(format!("{key:?}"), "OtPrivateKey(...)");
    }

    #[test]
    fn an_opcua_certificate_has_an_rsa_2048_key_and_the_application_uri_first() {
        let now = SystemTime::now();
        let ca = ca(now);
        let issued = issue(&ca, &spec(opcua()), OtKeySource::Generate, now).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        let sans = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            sans.value.general_names[0],
            GeneralName::URI("urn:site:plc-1")
        );
        assert_eq!(x.public_key().parsed().unwrap().key_size(), 2048);
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.non_repudiation());
        assert!(ku.key_encipherment() && ku.data_encipherment());
        assert!(!ku.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // The generated key is the certificate's key, and loads as RSA.
        let pem = issued.private_key.unwrap();
        let pair = KeyPair::from_pem_and_sign_algo(pem.pem(), &rcgen::PKCS_RSA_SHA256).unwrap();
        assert_eq!(
            x.public_key().subject_public_key.data.as_ref(),
            rcgen::PublicKeyData::der_bytes(&pair)
        );
    }

    #[test]
    fn a_csr_key_is_used_and_its_requested_names_ignored() {
        let now = SystemTime::now();
        let ca = ca(now);
        let key = DeviceKey::generate().unwrap();
        let csr = key.csr_pem("evil.example").unwrap();
        let mut s = spec(OtProfile::TlsClient);
        s.dns_names.clear();
        s.ip_addresses.clear();
        let issued = issue(&ca, &s, OtKeySource::Csr(&csr), now).unwrap();
        assert!(issued.private_key.is_none());
        let (_, x) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();
        assert!(x.subject_alternative_name().unwrap().is_none());
        let cn = x.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "broker-1");
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let pair = KeyPair::from_pem(&key.to_pem()).unwrap();
        assert_eq!(
            x.public_key().subject_public_key.data.as_ref(),
            pair.public_key_raw()
        );
    }

    #[test]
    fn opcua_refuses_a_csr_without_an_rsa_key_of_2048_to_4096_bits() {
        let now = SystemTime::now();
        let ca = ca(now);
        let csr = DeviceKey::generate().unwrap().csr_pem("x").unwrap();
        let err = issue(&ca, &spec(opcua()), OtKeySource::Csr(&csr), now).unwrap_err();
        assert!(matches!(err, CertError::Csr(_)), "{err}");
        assert!(err.to_string().contains("RSA"), "{err}");
        assert!(check_key(&opcua(), KeyKind::Rsa { bits: 1024 }).is_err());
        assert!(check_key(&opcua(), KeyKind::Rsa { bits: 8192 }).is_err());
        assert!(check_key(&opcua(), KeyKind::Rsa { bits: 4096 }).is_ok());
        assert!(check_key(&OtProfile::TlsServer, KeyKind::Rsa { bits: 1024 }).is_err());
        assert!(check_key(&OtProfile::TlsServer, KeyKind::Other).is_err());
        assert!(check_key(&OtProfile::TlsClient, KeyKind::Ed25519).is_ok());
    }

    #[test]
    fn bad_fields_are_refused_by_name_before_signing() {
        let now = SystemTime::now();
        let ca = ca(now);
        let cases: Vec<(OtCertSpec, &str)> = vec![
            (
                OtCertSpec {
                    validity_days: 0,
                    ..spec(OtProfile::TlsServer)
                },
                "validity_days",
            ),
            (
                OtCertSpec {
                    validity_days: MAX_VALIDITY_DAYS + 1,
                    ..spec(OtProfile::TlsServer)
                },
                "validity_days",
            ),
            (
                OtCertSpec {
                    common_name: String::new(),
                    ..spec(OtProfile::TlsServer)
                },
                "common_name",
            ),
            (
                OtCertSpec {
                    common_name: "a\0b".into(),
                    ..spec(OtProfile::TlsServer)
                },
                "common_name",
            ),
            (
                OtCertSpec {
                    dns_names: vec!["bad_name.example".into()],
                    ..spec(OtProfile::TlsServer)
                },
                "dns_names",
            ),
            (
                OtCertSpec {
                    dns_names: vec!["-x.example".into()],
                    ..spec(OtProfile::TlsServer)
                },
                "dns_names",
            ),
            (
                OtCertSpec {
                    dns_names: vec!["10.0.0.1".into()],
                    ..spec(OtProfile::TlsServer)
                },
                "dns_names",
            ),
            (
                OtCertSpec {
                    dns_names: vec!["*.site.example".into()],
                    ..spec(OtProfile::TlsClient)
                },
                "dns_names",
            ),
            (
                OtCertSpec {
                    dns_names: vec![],
                    ip_addresses: vec![],
                    ..spec(OtProfile::TlsServer)
                },
                "dns_names",
            ),
            (
                OtCertSpec {
                    dns_names: (0..=MAX_NAMES).map(|i| format!("h{i}.example")).collect(),
                    ..spec(OtProfile::TlsServer)
                },
                "dns_names",
            ),
            (
                spec(OtProfile::OpcUa {
                    application_uri: "no scheme".into(),
                }),
                "application_uri",
            ),
            (
                spec(OtProfile::OpcUa {
                    application_uri: "plc-1".into(),
                }),
                "application_uri",
            ),
            (
                spec(OtProfile::OpcUa {
                    application_uri: "urn:é".into(),
                }),
                "application_uri",
            ),
        ];
        for (s, field) in cases {
            let err = issue(&ca, &s, OtKeySource::Generate, now).unwrap_err();
            assert!(err.to_string().contains(field), "{s:?}: {err}");
        }
        // A wildcard is fine for a server.
        let mut s = spec(OtProfile::TlsServer);
        s.dns_names = vec!["*.site.example".into()];
        s.validate().unwrap();
    }

    #[test]
    fn a_certificate_never_outlives_the_intermediate() {
        let now = SystemTime::now();
        let root = RootCa::generate("r", now, 100 * DAY).unwrap();
        let ca = root.issue_intermediate("i", now, 10 * DAY).unwrap();
        let mut s = spec(OtProfile::TlsServer);
        s.validity_days = 400;
        let issued = issue(&ca, &s, OtKeySource::Generate, now).unwrap();
        assert!(issued.cert.not_after <= ca.not_after());
        let (_, x) = x509_parser::certificate::X509Certificate::from_der(&issued.cert_der).unwrap();
        assert!(
            x.validity().not_after.timestamp()
                <= (now + 10 * DAY)
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
        );
    }
}
