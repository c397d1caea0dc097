//! The fleet CA: root, intermediate(s), device and server certificates, CRLs.
//!
//! On disk (`kipctl ca init --dir DIR`):
//! - `root.crt`, `root.key` (0600): the root. Only `kipctl ca init` and intermediate rotation
//!   need `root.key`; it can be moved offline, the control plane runs without it.
//! - `intermediate.crt`, `intermediate.key` (0600): signs device and server certificates
//!   and CRLs.
//! - `intermediate-previous.crt`, `intermediate-previous.key` (optional): the intermediate
//!   before the last rotation. Kept so that its still-valid device certificates keep a CRL
//!   until they expire or renew.
//! - `bundle.crt` (optional): trust bundle given to agents; defaults to `root.crt`. During a
//!   root rollover it holds the old and the new root.
//! - `root-previous.crt`, `root-previous.key` (optional): the root before `ca rotate-root`,
//!   until `ca finish-rotation` moves it (and `intermediate-previous.*`) to `retired/`.
//!
//! Rollover (intermediate or root) is two-phase: *rotate* adds the new CA material and keeps
//! the old one (overlap: both verify, the new one signs), *finish* retires the old one. A
//! second rotation before the first is finished is refused, because overwriting
//! `intermediate-previous` would strand certificates that still chain to it.
//! Files are written so that every intermediate state a concurrent reader (the control plane
//! polls this directory) can see is either consistent or refused by [`FleetCa::load`] (a key
//! that does not match its certificate is an error, never a silently wrong signer).
//!
//! Invariants: every key is ECDSA P-256; a certificate never outlives its issuer (the leaf
//! lifetime is clamped to the intermediate's `not_after`); serial numbers are 128 random bits
//! (positive, 16 bytes exactly, so the stored hex equals what x509 parsing returns).

use std::{
    fmt,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer as _;

use crate::{
    CertError,
    csr::parse_csr_pem,
    files::{read, write_private, write_public},
    identity::{DeviceIdentity, device_uri, parse_hex, to_hex},
    tls::{TrustBundle, cert_to_pem, certs_from_pem},
};

/// Tolerated clock difference between the control plane and agents: certificates start
/// this much before `now`, so a device whose clock is a little behind accepts them.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a root made by [`FleetCa::init`].
pub const ROOT_LIFETIME: Duration = Duration::from_secs(20 * 365 * 86_400);
/// Lifetime of an intermediate made by [`FleetCa::init`] or [`FleetCa::rotate_intermediate`].
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(3 * 365 * 86_400);

fn alg() -> &'static rcgen::SignatureAlgorithm {
    &rcgen::PKCS_ECDSA_P256_SHA256
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

pub(crate) fn new_key() -> Result<KeyPair, CertError> {
    Ok(KeyPair::generate_for(alg())?)
}

/// 16 random bytes, first byte in 0x01..=0x7f: positive and minimal in DER, so the encoded
/// serial is exactly these bytes.
fn random_serial() -> [u8; 16] {
    let mut s: [u8; 16] = rand::random();
    s[0] = (s[0] & 0x7f).max(1);
    s
}

fn not_after_of(der: &[u8]) -> Result<SystemTime, CertError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::BadCert(format!("not an X.509 certificate: {e}")))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

fn subject_raw(der: &[u8]) -> Option<Vec<u8>> {
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(c.subject().as_raw().to_vec())
}

fn issuer_raw(der: &[u8]) -> Option<Vec<u8>> {
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(c.issuer().as_raw().to_vec())
}

/// A subject alternative name for a DNS name or, when it parses as one, an IP address.
pub(crate) fn name_san(name: &str) -> Result<SanType, rcgen::Error> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.to_owned().try_into()?),
    })
}

/// Lowercase hex sha256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    to_hex(&sha2::Sha256::digest(bytes))
}

fn ca_params(
    common_name: &str,
    now: SystemTime,
    lifetime: Duration,
    path_len: u8,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kip");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = odt(now - CLOCK_SKEW);
    params.not_after = odt(now + lifetime);
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.use_authority_key_identifier_extension = true;
    params
}

/// A CA certificate with its signing key (root or intermediate).
struct CaCert {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl CaCert {
    fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_der = certs_from_pem(cert_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::BadCert("empty CA certificate file".into()))?;
        let key = KeyPair::from_pem(key_pem)?;
        // A rotation writes key and certificate one after the other; a reader in between
        // must not sign with a key that does not belong to the certificate.
        let (_, x) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
            .map_err(|e| CertError::BadCert(format!("not an X.509 certificate: {e}")))?;
        if x.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::BadCert(
                "the CA key does not match the CA certificate (rotation in progress?)".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let not_after = not_after_of(&cert_der)?;
        Ok(Self {
            cert_der,
            issuer,
            not_after,
        })
    }

    fn cert_pem(&self) -> String {
        cert_to_pem(&self.cert_der)
    }

    fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }
}

impl fmt::Debug for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCert")
            .field("not_after", &self.not_after)
            .field("key", &"...")
            .finish()
    }
}

/// The fleet root CA (certificate and key).
#[derive(Debug)]
pub struct RootCa(CaCert);

impl RootCa {
    /// Creates a new self-signed root.
    pub fn generate(
        common_name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Self, CertError> {
        let params = ca_params(common_name, now, lifetime, 1);
        let key = new_key()?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        Ok(Self(CaCert {
            not_after: not_after_of(&cert_der)?,
            cert_der,
            issuer: Issuer::new(params, key),
        }))
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        CaCert::from_pem(cert_pem, key_pem).map(Self)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.0.cert_der
    }

    pub fn cert_pem(&self) -> String {
        self.0.cert_pem()
    }

    /// The private key as PKCS#8 PEM. Secret: write it only with [`crate::files::write_private`].
    pub fn key_pem(&self) -> String {
        self.0.key_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.0.not_after
    }

    /// Issues an intermediate CA (path length 0: it may sign only end-entity certificates).
    pub fn issue_intermediate(
        &self,
        common_name: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Intermediate, CertError> {
        let lifetime = clamp_lifetime(now, lifetime, self.0.not_after)?;
        let params = ca_params(common_name, now, lifetime, 0);
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.0.issuer)?;
        let cert_der = cert.der().clone();
        Ok(Intermediate(CaCert {
            not_after: not_after_of(&cert_der)?,
            cert_der,
            issuer: Issuer::new(params, key),
        }))
    }
}

/// Shortens `lifetime` so that `now + lifetime` does not pass `issuer_not_after`.
fn clamp_lifetime(
    now: SystemTime,
    lifetime: Duration,
    issuer_not_after: SystemTime,
) -> Result<Duration, CertError> {
    let left = issuer_not_after.duration_since(now).map_err(|_| {
        CertError::Validity("the issuing CA certificate has expired; rotate it".into())
    })?;
    Ok(lifetime.min(left))
}

/// A certificate issued to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The device certificate alone.
    pub cert_pem: String,
    /// Device certificate followed by the issuing intermediate: what the agent presents.
    pub chain_pem: String,
    /// Serial number, lowercase hex (as returned by [`crate::parse_peer_cert`]).
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// A revoked certificate, as listed in a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    pub revoked_at: SystemTime,
}

/// A server certificate chain and its key, for the agent mTLS listener.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after: SystemTime,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("key", &"...")
            .finish()
    }
}

/// An intermediate CA: signs device certificates, server certificates and CRLs.
#[derive(Debug)]
pub struct Intermediate(CaCert);

impl Intermediate {
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        CaCert::from_pem(cert_pem, key_pem).map(Self)
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.0.cert_der
    }

    pub fn cert_pem(&self) -> String {
        self.0.cert_pem()
    }

    /// The private key as PKCS#8 PEM. Secret: write it only with [`crate::files::write_private`].
    pub fn key_pem(&self) -> String {
        self.0.key_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.0.not_after
    }

    /// Lowercase hex sha256 of the certificate (DER): names this intermediate in the
    /// `certificates` table and in logs.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.0.cert_der)
    }

    /// Whether `leaf_der` names this intermediate as its issuer (by subject; intermediate
    /// subjects are unique, see `intermediate_name`). Not a signature check: use it only on
    /// certificates the TLS verifier accepted.
    pub fn is_issuer_of(&self, leaf_der: &[u8]) -> bool {
        match (issuer_raw(leaf_der), subject_raw(&self.0.cert_der)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    /// Parameters every end-entity certificate shares: lifetime checked (at least 60 s) and
    /// clamped to this intermediate, clock-skew backdating, random serial, not a CA,
    /// digitalSignature, authority key identifier. Callers add names and usages.
    pub(crate) fn leaf_params(
        &self,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(CertificateParams, [u8; 16]), CertError> {
        if lifetime < Duration::from_secs(60) {
            return Err(CertError::Validity(
                "certificate lifetime must be at least 60 s".into(),
            ));
        }
        let lifetime = clamp_lifetime(now, lifetime, self.0.not_after)?;
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.not_before = odt(now - CLOCK_SKEW);
        params.not_after = odt(now + lifetime);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok((params, serial))
    }

    /// Signs `params` (from [`Intermediate::leaf_params`]) for `key`; returns the certificate
    /// with its chain and its DER.
    pub(crate) fn sign_leaf(
        &self,
        params: &CertificateParams,
        serial: [u8; 16],
        now: SystemTime,
        key: &impl PublicKeyData,
    ) -> Result<(IssuedCert, CertificateDer<'static>), CertError> {
        let cert = params.signed_by(key, &self.0.issuer)?;
        let cert_pem = cert_to_pem(cert.der());
        let issued = IssuedCert {
            chain_pem: format!("{cert_pem}{}", self.cert_pem()),
            cert_pem,
            serial_hex: to_hex(&serial),
            not_before: now - CLOCK_SKEW,
            not_after: not_after_of(cert.der())?,
        };
        Ok((issued, cert.der().clone()))
    }

    /// Signs a device CSR (PEM) into a client certificate naming `id` in its URI SAN.
    ///
    /// Only the CSR's public key is used (see the crate docs). The CSR's self-signature is
    /// checked, which proves the requester holds the private key.
    pub fn sign_device_csr(
        &self,
        csr_pem: &str,
        id: DeviceIdentity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, CertError> {
        let csr = parse_csr_pem(csr_pem)?;
        let (mut params, serial) = self.leaf_params(now, lifetime)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, id.org_id.to_string());
        dn.push(DnType::CommonName, id.device_id.to_string());
        params.distinguished_name = dn;
        let uri = device_uri(id.org_id, id.device_id);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(CertError::Rcgen)?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(self.sign_leaf(&params, serial, now, &csr.spki)?.0)
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses) with a fresh key.
    pub fn issue_server_cert(
        &self,
        names: &[String],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<ServerIdentity, CertError> {
        let (mut params, serial) = self.leaf_params(now, lifetime)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "kip");
        dn.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("kip control plane"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| name_san(n))
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = new_key()?;
        let (issued, der) = self.sign_leaf(&params, serial, now, &key)?;
        Ok(ServerIdentity {
            not_after: issued.not_after,
            chain: vec![der, self.0.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// A CRL signed by this intermediate listing `revoked`, valid from `now` for `validity`.
    /// Serials that are not hex are skipped (they cannot have been issued here).
    pub fn crl(
        &self,
        revoked: &[RevokedSerial],
        now: SystemTime,
        validity: Duration,
    ) -> Result<CertificateRevocationListDer<'static>, CertError> {
        crl_for(self, revoked, now, validity)
    }
}

/// Builds the CRL of `issuer`; see [`Intermediate::crl`].
pub fn crl_for(
    issuer: &Intermediate,
    revoked: &[RevokedSerial],
    now: SystemTime,
    validity: Duration,
) -> Result<CertificateRevocationListDer<'static>, CertError> {
    let crl_number = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // CRL numbers must increase: nanoseconds since the epoch do, across restarts too.
    let crl_number = u64::try_from(crl_number).unwrap_or(u64::MAX);
    let params = CertificateRevocationListParams {
        this_update: odt(now - CLOCK_SKEW),
        next_update: odt(now + validity),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .filter_map(|r| {
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&parse_hex(&r.serial_hex)?),
                    revocation_time: odt(r.revoked_at),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer.0.issuer)?.der().clone())
}

/// File locations of a CA directory (see the module docs).
#[derive(Debug, Clone)]
pub struct CaPaths {
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub intermediate_cert: PathBuf,
    pub intermediate_key: PathBuf,
    pub previous_cert: PathBuf,
    pub previous_key: PathBuf,
    pub root_previous_cert: PathBuf,
    pub root_previous_key: PathBuf,
    pub bundle: PathBuf,
    /// Where `finish-rotation` moves retired CA files.
    pub retired_dir: PathBuf,
}

impl CaPaths {
    pub fn new(dir: &Path) -> Self {
        Self {
            root_cert: dir.join("root.crt"),
            root_key: dir.join("root.key"),
            intermediate_cert: dir.join("intermediate.crt"),
            intermediate_key: dir.join("intermediate.key"),
            previous_cert: dir.join("intermediate-previous.crt"),
            previous_key: dir.join("intermediate-previous.key"),
            root_previous_cert: dir.join("root-previous.crt"),
            root_previous_key: dir.join("root-previous.key"),
            bundle: dir.join("bundle.crt"),
            retired_dir: dir.join("retired"),
        }
    }

    /// The CA files a running control plane reads (not the root key, not `retired/`).
    fn loaded_files(&self) -> [&Path; 6] {
        [
            &self.root_cert,
            &self.intermediate_cert,
            &self.intermediate_key,
            &self.previous_cert,
            &self.previous_key,
            &self.bundle,
        ]
    }

    /// sha256 over the names, presence and contents of the files [`FleetCa::load`] reads:
    /// changes whenever a rotation (or an operator) changes what the CA would load.
    pub fn content_sha256(&self) -> Result<[u8; 32], CertError> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        for f in self.loaded_files() {
            h.update(f.as_os_str().as_encoded_bytes());
            match std::fs::read(f) {
                Ok(bytes) => {
                    h.update([1]);
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(&bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => h.update([0]),
                Err(source) => {
                    return Err(CertError::Io {
                        path: f.to_owned(),
                        source,
                    });
                }
            }
        }
        Ok(h.finalize().into())
    }

    /// Whether a rotation is in progress (an `intermediate-previous` is kept).
    pub fn rotation_in_progress(&self) -> bool {
        self.previous_cert.exists() || self.root_previous_cert.exists()
    }
}

/// The CA as the control plane uses it: current intermediate (signs), previous intermediate
/// (CRLs only), trust bundle.
#[derive(Debug)]
pub struct FleetCa {
    current: Intermediate,
    previous: Option<Intermediate>,
    bundle: TrustBundle,
}

impl FleetCa {
    /// Builds a CA from parts (tests, or callers that keep the CA elsewhere).
    pub fn new(current: Intermediate, previous: Option<Intermediate>, bundle: TrustBundle) -> Self {
        Self {
            current,
            previous,
            bundle,
        }
    }

    /// Creates a new root and intermediate in `dir` (keys 0600). Refuses to overwrite.
    pub fn init(dir: &Path, now: SystemTime) -> Result<Self, CertError> {
        let p = CaPaths::new(dir);
        for f in [
            &p.root_cert,
            &p.root_key,
            &p.intermediate_cert,
            &p.intermediate_key,
        ] {
            if f.exists() {
                return Err(CertError::Exists(f.clone()));
            }
        }
        let root = RootCa::generate(
            &format!("kip fleet root CA {}", unix_secs(now)),
            now,
            ROOT_LIFETIME,
        )?;
        let inter = root.issue_intermediate(&intermediate_name(now), now, INTERMEDIATE_LIFETIME)?;
        // Keys first: a crash leaves a key without certificate (harmless, init is rerun
        // after deleting), never a certificate whose key is lost.
        write_private(&p.root_key, &root.key_pem())?;
        write_private(&p.intermediate_key, &inter.key_pem())?;
        write_public(&p.root_cert, &root.cert_pem())?;
        write_public(&p.intermediate_cert, &inter.cert_pem())?;
        let bundle = TrustBundle::new(vec![root.cert_der().clone()])?;
        Ok(Self::new(inter, None, bundle))
    }

    /// Loads the CA from `dir`. `root.key` is not needed.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let p = CaPaths::new(dir);
        let current =
            Intermediate::from_pem(&read(&p.intermediate_cert)?, &read(&p.intermediate_key)?)?;
        let previous = if p.previous_cert.exists() {
            Some(Intermediate::from_pem(
                &read(&p.previous_cert)?,
                &read(&p.previous_key)?,
            )?)
        } else {
            None
        };
        let bundle = if p.bundle.exists() {
            TrustBundle::from_pem(&read(&p.bundle)?)?
        } else {
            TrustBundle::from_pem(&read(&p.root_cert)?)?
        };
        Ok(Self::new(current, previous, bundle))
    }

    /// Issues a new intermediate with the root key from `dir`; the current one becomes
    /// `intermediate-previous` (its certificates stay valid and revocable until they expire,
    /// or until [`FleetCa::finish_rotation`]). Refused while another rotation is unfinished.
    pub fn rotate_intermediate(dir: &Path, now: SystemTime) -> Result<Self, CertError> {
        let p = CaPaths::new(dir);
        if !p.root_key.exists() {
            return Err(CertError::NoRootKey(p.root_key));
        }
        if p.rotation_in_progress() {
            return Err(CertError::RotationInProgress(p.previous_cert));
        }
        let root = RootCa::from_pem(&read(&p.root_cert)?, &read(&p.root_key)?)?;
        let new = root.issue_intermediate(&intermediate_name(now), now, INTERMEDIATE_LIFETIME)?;
        let old_cert = read(&p.intermediate_cert)?;
        let old_key = read(&p.intermediate_key)?;
        write_private(&p.previous_key, &old_key)?;
        write_public(&p.previous_cert, &old_cert)?;
        write_private(&p.intermediate_key, &new.key_pem())?;
        write_public(&p.intermediate_cert, &new.cert_pem())?;
        Self::load(dir)
    }

    /// Creates a new root and a new intermediate under it (root key from `dir`, needed to
    /// make the old root's material `root-previous`). The trust bundle then holds the old and
    /// the new root; the old intermediate becomes `intermediate-previous` and keeps signing
    /// the agent listener's certificate (see [`FleetCa::server_issuer`]) until
    /// [`FleetCa::finish_rotation`], so agents that still trust only the old root can connect
    /// and receive the new bundle. Refused while another rotation is unfinished.
    pub fn rotate_root(dir: &Path, now: SystemTime) -> Result<Self, CertError> {
        let p = CaPaths::new(dir);
        if !p.root_key.exists() {
            return Err(CertError::NoRootKey(p.root_key));
        }
        if p.rotation_in_progress() {
            return Err(CertError::RotationInProgress(p.previous_cert));
        }
        let old_root_cert = read(&p.root_cert)?;
        let old_root_key = read(&p.root_key)?;
        // Checks that the old root's key matches before anything is written.
        RootCa::from_pem(&old_root_cert, &old_root_key)?;
        let mut bundle = if p.bundle.exists() {
            TrustBundle::from_pem(&read(&p.bundle)?)?
        } else {
            TrustBundle::from_pem(&old_root_cert)?
        };
        let root = RootCa::generate(
            &format!(
                "kip fleet root CA {} {:04x}",
                unix_secs(now),
                rand::random::<u16>()
            ),
            now,
            ROOT_LIFETIME,
        )?;
        let inter = root.issue_intermediate(&intermediate_name(now), now, INTERMEDIATE_LIFETIME)?;
        bundle.merge(&TrustBundle::new(vec![root.cert_der().clone()])?);
        // Order: first trust more (the bundle), then keep the old material, then switch the
        // signer, and the root last. A reader sees either a consistent CA or a key/certificate
        // mismatch, which `load` refuses.
        write_public(&p.bundle, &bundle.to_pem())?;
        write_private(&p.root_previous_key, &old_root_key)?;
        write_public(&p.root_previous_cert, &old_root_cert)?;
        write_private(&p.previous_key, &read(&p.intermediate_key)?)?;
        write_public(&p.previous_cert, &read(&p.intermediate_cert)?)?;
        write_private(&p.intermediate_key, &inter.key_pem())?;
        write_public(&p.intermediate_cert, &inter.cert_pem())?;
        write_private(&p.root_key, &root.key_pem())?;
        write_public(&p.root_cert, &root.cert_pem())?;
        Self::load(dir)
    }

    /// Ends a rotation: moves `intermediate-previous.*` and `root-previous.*` to
    /// `retired/{unix time}-{name}` and makes the bundle the current root only. From then on
    /// certificates of the old intermediate are refused (no CRL, unknown CA). Returns the
    /// moved files (empty when no rotation was in progress).
    pub fn finish_rotation(dir: &Path, now: SystemTime) -> Result<Vec<PathBuf>, CertError> {
        let p = CaPaths::new(dir);
        let mut moved = Vec::new();
        let stamp = unix_secs(now);
        for f in [
            &p.previous_cert,
            &p.previous_key,
            &p.root_previous_cert,
            &p.root_previous_key,
        ] {
            if !f.exists() {
                continue;
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p.retired_dir)
                .map_err(|source| CertError::Io {
                    path: p.retired_dir.clone(),
                    source,
                })?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let to = p.retired_dir.join(format!("{stamp}-{name}"));
            std::fs::rename(f, &to).map_err(|source| CertError::Io {
                path: f.clone(),
                source,
            })?;
            moved.push(to);
        }
        if p.bundle.exists() {
            let root = read(&p.root_cert)?;
            if TrustBundle::from_pem(&read(&p.bundle)?)? != TrustBundle::from_pem(&root)? {
                write_public(&p.bundle, &root)?;
                moved.push(p.bundle.clone());
            }
        }
        Ok(moved)
    }

    /// The intermediate that signs new certificates.
    pub fn current(&self) -> &Intermediate {
        &self.current
    }

    /// The intermediate kept from the last rotation, if it is not finished.
    pub fn previous(&self) -> Option<&Intermediate> {
        self.previous.as_ref()
    }

    /// The intermediate that signs the agent listener's own certificate: the current one,
    /// except during a root rollover, when it is the previous one (under the old root) so
    /// that agents which have not yet received the new bundle can still verify the listener.
    /// An expired previous intermediate is never used.
    pub fn server_issuer(&self, now: SystemTime) -> &Intermediate {
        match &self.previous {
            Some(prev)
                if prev.not_after() > now
                    && issuer_raw(prev.cert_der()) != issuer_raw(self.current.cert_der()) =>
            {
                prev
            }
            _ => &self.current,
        }
    }

    /// Expiry of the root that issued the current intermediate (from the bundle), if known.
    pub fn root_not_after(&self) -> Option<SystemTime> {
        let want = issuer_raw(self.current.cert_der())?;
        self.bundle
            .certs()
            .iter()
            .find(|c| subject_raw(c).as_ref() == Some(&want))
            .and_then(|c| not_after_of(c).ok())
    }

    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// One CRL per intermediate (current and previous), each listing `revoked`.
    pub fn crls(
        &self,
        revoked: &[RevokedSerial],
        now: SystemTime,
        validity: Duration,
    ) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .map(|i| i.crl(revoked, now, validity))
            .collect()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Distinct subject per CA: webpki matches issuers and CRLs by name, so two intermediates
/// (or two deployments' roots) with one name would make CRLs and chains ambiguous.
fn intermediate_name(now: SystemTime) -> String {
    format!(
        "kip fleet intermediate CA {} {:04x}",
        unix_secs(now),
        rand::random::<u16>()
    )
}

/// A device's private key, generated on the device; it never leaves it.
pub struct DeviceKey(KeyPair);

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(...)")
    }
}

impl DeviceKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, CertError> {
        new_key().map(Self)
    }

    pub fn from_pem(pem: &str) -> Result<Self, CertError> {
        Ok(Self(KeyPair::from_pem(pem)?))
    }

    /// PKCS#8 PEM. Secret: write it only with [`crate::files::write_private`].
    pub fn to_pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// The key for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.0.serialize_der()))
    }

    /// A CSR (PEM) for this key. The name is informative only: the CA decides the identity.
    pub fn csr_pem(&self, device_name: &str) -> Result<String, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_name);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.0)?.pem()?)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls::pki_types::pem::PemObject as _;
    use uuid::Uuid;

    use super::*;
    use crate::parse_peer_cert;

    const DAY: Duration = Duration::from_secs(86_400);

    fn id() -> DeviceIdentity {
        DeviceIdentity {
            org_id: Uuid::new_v4(),
            device_id: Uuid::new_v4(),
        }
    }

    #[test]
    fn signed_device_cert_names_the_device_and_records_serial_and_expiry() {
        let now = SystemTime::now();
        let root = RootCa::generate("r", now, 10 * DAY).unwrap();
        let inter = root.issue_intermediate("i", now, 5 * DAY).unwrap();
        let key = DeviceKey::generate().unwrap();
        let id = id();
        let issued = inter
            .sign_device_csr(&key.csr_pem("gw-1").unwrap(), id, now, DAY)
            .unwrap();
        let der = &certs_from_pem(&issued.chain_pem, "chain").unwrap();
        assert_eq!(der.len(), 2, "leaf then intermediate");
        let peer = parse_peer_cert(&der[0]).unwrap();
        assert_eq!(peer.identity, id);
        assert_eq!(peer.serial_hex, issued.serial_hex);
        assert_eq!(peer.not_after, issued.not_after);
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(peer.not_after), secs(now + DAY));
        assert!(peer.not_before < now);
    }

    #[test]
    fn csr_requests_for_other_names_or_ca_powers_are_ignored() {
        let now = SystemTime::now();
        let root = RootCa::generate("r", now, 10 * DAY).unwrap();
        let inter = root.issue_intermediate("i", now, 5 * DAY).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::URI(
            device_uri(Uuid::new_v4(), Uuid::new_v4())
                .try_into()
                .unwrap(),
        ));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let id = id();
        let issued = inter.sign_device_csr(&csr, id, now, DAY).unwrap();
        let der = &certs_from_pem(&issued.cert_pem, "leaf").unwrap()[0];
        assert_eq!(parse_peer_cert(der).unwrap().identity, id);
        let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
        assert!(!x.is_ca());
        let sans = x.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let key = DeviceKey::generate().unwrap();
        let csr = key.csr_pem("gw").unwrap();
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55;
        let now = SystemTime::now();
        let root = RootCa::generate("r", now, 10 * DAY).unwrap();
        let inter = root.issue_intermediate("i", now, 5 * DAY).unwrap();
        let tampered = crate::tls::pem_block("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            inter.sign_device_csr(&tampered, id(), now, DAY),
            Err(CertError::Csr(_))
        ));
        assert!(inter.sign_device_csr("garbage", id(), now, DAY).is_err());
    }

    #[test]
    fn leaf_lifetime_is_clamped_to_the_intermediate() {
        let now = SystemTime::now();
        let root = RootCa::generate("r", now, 10 * DAY).unwrap();
        let inter = root.issue_intermediate("i", now, DAY).unwrap();
        let key = DeviceKey::generate().unwrap();
        let issued = inter
            .sign_device_csr(&key.csr_pem("gw").unwrap(), id(), now, 30 * DAY)
            .unwrap();
        assert!(issued.not_after <= inter.not_after());
        let expired = root.issue_intermediate("i", now - 10 * DAY, DAY).unwrap();
        assert!(matches!(
            expired.sign_device_csr(&key.csr_pem("gw").unwrap(), id(), now, DAY),
            Err(CertError::Validity(_))
        ));
    }

    #[test]
    fn ca_init_writes_keys_0600_refuses_to_overwrite_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let ca = FleetCa::init(dir.path(), now).unwrap();
        let p = CaPaths::new(dir.path());
        for k in [&p.root_key, &p.intermediate_key] {
            let mode = std::fs::metadata(k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
        assert!(matches!(
            FleetCa::init(dir.path(), now),
            Err(CertError::Exists(_))
        ));
        // The control plane runs without the root key.
        std::fs::remove_file(&p.root_key).unwrap();
        let loaded = FleetCa::load(dir.path()).unwrap();
        assert_eq!(loaded.bundle(), ca.bundle());
        assert_eq!(loaded.current().cert_der(), ca.current().cert_der());
        assert!(matches!(
            FleetCa::rotate_intermediate(dir.path(), now),
            Err(CertError::NoRootKey(_))
        ));
    }

    #[test]
    fn rotation_keeps_the_previous_intermediate_for_crls() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = FleetCa::init(dir.path(), now).unwrap();
        let rotated = FleetCa::rotate_intermediate(dir.path(), now + DAY).unwrap();
        assert_ne!(rotated.current().cert_der(), first.current().cert_der());
        assert_eq!(rotated.bundle(), first.bundle(), "root unchanged");
        let crls = rotated.crls(&[], now, DAY).unwrap();
        assert_eq!(crls.len(), 2);
    }

    #[test]
    fn a_second_rotation_is_refused_until_the_first_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        FleetCa::init(dir.path(), now).unwrap();
        FleetCa::rotate_intermediate(dir.path(), now).unwrap();
        assert!(matches!(
            FleetCa::rotate_intermediate(dir.path(), now),
            Err(CertError::RotationInProgress(_))
        ));
        assert!(matches!(
            FleetCa::rotate_root(dir.path(), now),
            Err(CertError::RotationInProgress(_))
        ));
        let moved = FleetCa::finish_rotation(dir.path(), now).unwrap();
        assert_eq!(moved.len(), 2, "{moved:?}");
        let ca = FleetCa::load(dir.path()).unwrap();
        assert!(ca.previous().is_none());
        assert_eq!(ca.crls(&[], now, DAY).unwrap().len(), 1);
        FleetCa::rotate_intermediate(dir.path(), now).unwrap();
    }

    #[test]
    fn root_rotation_overlaps_both_roots_then_keeps_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = FleetCa::init(dir.path(), now).unwrap();
        let old_root = first.bundle().certs()[0].clone();
        let rotated = FleetCa::rotate_root(dir.path(), now).unwrap();
        assert_eq!(rotated.bundle().certs().len(), 2);
        assert_eq!(
            rotated.bundle().certs()[0],
            old_root,
            "old root first, then the new"
        );
        assert_eq!(
            rotated.previous().unwrap().cert_der(),
            first.current().cert_der()
        );
        // The listener keeps presenting a chain to the old root during the overlap.
        assert_eq!(
            rotated.server_issuer(now).cert_der(),
            first.current().cert_der()
        );
        let new_root = &rotated.bundle().certs()[1];
        let root_not_after = rotated.root_not_after().unwrap();
        assert_eq!(root_not_after, not_after_of(new_root).unwrap());

        FleetCa::finish_rotation(dir.path(), now).unwrap();
        let done = FleetCa::load(dir.path()).unwrap();
        assert_eq!(done.bundle().certs(), std::slice::from_ref(new_root));
        assert!(done.previous().is_none());
        assert_eq!(
            done.server_issuer(now).cert_der(),
            rotated.current().cert_der()
        );
        assert!(
            CaPaths::new(dir.path())
                .retired_dir
                .read_dir()
                .unwrap()
                .count()
                >= 4
        );
    }

    #[test]
    fn intermediate_rotation_serves_from_the_new_intermediate() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        FleetCa::init(dir.path(), now).unwrap();
        let ca = FleetCa::rotate_intermediate(dir.path(), now).unwrap();
        assert_eq!(ca.server_issuer(now).cert_der(), ca.current().cert_der());
        let key = DeviceKey::generate().unwrap();
        let issued = ca
            .current()
            .sign_device_csr(&key.csr_pem("gw").unwrap(), id(), now, DAY)
            .unwrap();
        let leaf = &certs_from_pem(&issued.cert_pem, "leaf").unwrap()[0];
        assert!(ca.current().is_issuer_of(leaf));
        assert!(!ca.previous().unwrap().is_issuer_of(leaf));
    }

    #[test]
    fn a_key_that_does_not_match_its_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        FleetCa::init(dir.path(), now).unwrap();
        let p = CaPaths::new(dir.path());
        let before = p.content_sha256().unwrap();
        // What a reader sees between the two writes of a rotation.
        write_private(
            &p.intermediate_key,
            &DeviceKey::generate().unwrap().to_pem(),
        )
        .unwrap();
        assert_ne!(p.content_sha256().unwrap(), before);
        let err = FleetCa::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn device_key_round_trips_through_pem_and_hides_in_debug() {
        let k = DeviceKey::generate().unwrap();
        let pem = k.to_pem();
        assert!(!format!("{k:?}").contains("PRIVATE"));
        let k2 = DeviceKey::from_pem(&pem).unwrap();
        assert_eq!(k2.to_pem(), pem);
    }

    #[test]
    fn hex_parser_rejects_odd_and_non_hex() {
        assert_eq!(parse_hex("01ff"), Some(vec![1, 255]));
        assert_eq!(parse_hex("1"), None);
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(""), None);
        // from_str_radix alone would read "+f" as 15.
        assert_eq!(parse_hex("+f"), None);
    }
}
