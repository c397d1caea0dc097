//! Test certificates: a broker PKI for Mosquitto (CA, server and client certificates, and a
//! client certificate from a foreign CA), and fleet device identities signed by any CA.
//!
//! Keys are ECDSA P-256 (rcgen's default), fast to generate; OPC UA needs RSA and makes its
//! own (see [`crate::opcua`]).

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use kip_agent::identity::Identity;
use kip_certs::{DeviceIdentity, DeviceKey, FleetCa, TrustBundle};
use uuid::Uuid;

/// Installs ring as the process-wide rustls crypto provider (the workspace's one provider) if
/// none is installed yet. reqwest clients (built with `rustls-no-provider`) need one.
pub fn install_crypto_provider() {
    let _ = kip_certs::rustls::crypto::ring::default_provider().install_default();
}

/// Files of a test PKI in one folder: a CA, a server certificate for 127.0.0.1/localhost, a
/// client certificate (CN `gw-1`), and a client certificate of the same name from another CA.
#[derive(Debug, Clone)]
pub struct BrokerPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

/// A self-signed CA that may sign certificates and CRLs.
pub fn test_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate signed by `issuer`: `(cert PEM, key PEM)`.
pub fn leaf_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    cn: &str,
    sans: Vec<String>,
    usage: rcgen::ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl BrokerPki {
    /// Writes the PKI's files into `dir`, readable by a `mosquitto` that dropped privileges.
    pub fn generate(dir: &Path) -> Self {
        let ca = test_ca("kip test ca");
        let rogue_ca = test_ca("rogue ca");
        let (server_cert, server_key) = leaf_cert(
            &ca,
            "broker",
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf_cert(
            &ca,
            "gw-1",
            vec![],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (rogue_cert, rogue_key) = leaf_cert(
            &rogue_ca,
            "gw-1",
            vec![],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            make_readable(&p);
            p
        };
        make_readable(dir);
        Self {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            rogue_cert: write("rogue.pem", &rogue_cert),
            rogue_key: write("rogue.key", &rogue_key),
        }
    }

    /// Mosquitto listener lines for TLS that requires a client certificate of this CA (the
    /// certificate's CN becomes the username; anonymous clients are refused).
    pub fn listener_conf(&self) -> String {
        format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\nallow_anonymous false\n",
            self.ca.display(),
            self.server_cert.display(),
            self.server_key.display()
        )
    }
}

/// Makes a file (0644) or folder (0755) readable by everyone: `mosquitto` started as root
/// drops to its own user and must still read the test's files.
pub fn make_readable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = if p.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A device identity (fresh key, `name` as CN) whose certificate `ca`'s current intermediate
/// signs for `(org_id, device_id)`, valid from `issued_at` for `lifetime`, trusting `bundle`.
/// With a foreign CA this is a forged identity for negative tests.
pub fn device_identity(
    ca: &FleetCa,
    name: &str,
    org_id: Uuid,
    device_id: Uuid,
    issued_at: SystemTime,
    lifetime: Duration,
    bundle: TrustBundle,
) -> Identity {
    let key = DeviceKey::generate().unwrap();
    let issued = ca
        .current()
        .sign_device_csr(
            &key.csr_pem(name).unwrap(),
            DeviceIdentity { org_id, device_id },
            issued_at,
            lifetime,
        )
        .unwrap();
    Identity::new(key, issued.chain_pem, bundle).unwrap()
}
