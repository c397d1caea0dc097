//! OT certificates against independent implementations: `openssl verify` accepts every
//! profile for its purpose, and a real Mosquitto TLS listener runs on an issued broker
//! certificate, admitting a client with an issued client certificate (MQTT CONNACK) and
//! refusing one without.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code fails loudly"
)]

use std::{
    net::TcpStream as StdTcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use kip_certs::{
    CaPaths, FleetCa, client_config_from_files,
    files::{write_private, write_public},
    ot::{self, OtCertSpec, OtIssued, OtKeySource, OtProfile},
    rustls,
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn spec(profile: OtProfile, cn: &str) -> OtCertSpec {
    OtCertSpec {
        profile,
        common_name: cn.into(),
        dns_names: vec!["localhost".into()],
        ip_addresses: vec!["127.0.0.1".parse().unwrap()],
        validity_days: 7,
    }
}

/// Writes the chain and (generated) key of `issued` as `{name}.crt` / `{name}.key`.
fn write(dir: &Path, name: &str, issued: &OtIssued) -> (PathBuf, PathBuf) {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write_public(&crt, &issued.cert.chain_pem).unwrap();
    if let Some(k) = &issued.private_key {
        write_private(&key, k.pem()).unwrap();
    }
    (crt, key)
}

fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `openssl verify` of `leaf` for `purpose` against the fleet root, the intermediate untrusted.
fn verify(dir: &Path, ca: &CaPaths, leaf: &Path, purpose: &str) -> (bool, String) {
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            ca.root_cert.to_str().unwrap(),
            "-untrusted",
            ca.intermediate_cert.to_str().unwrap(),
            "-purpose",
            purpose,
            "-x509_strict",
            leaf.to_str().unwrap(),
        ],
    )
}

/// The leaf alone (first block of the chain file), for `openssl verify`.
fn leaf_file(dir: &Path, name: &str, issued: &OtIssued) -> PathBuf {
    let p = dir.join(format!("{name}-leaf.pem"));
    std::fs::write(&p, &issued.cert.cert_pem).unwrap();
    p
}

#[test]
fn openssl_verifies_every_profile_for_its_purpose_only() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let ca_dir = dir.path().join("ca");
    let fleet = FleetCa::init(&ca_dir, now).unwrap();
    let paths = CaPaths::new(&ca_dir);
    let d = dir.path();

    let server = ot::issue(
        fleet.current(),
        &spec(OtProfile::TlsServer, "broker"),
        OtKeySource::Generate,
        now,
    )
    .unwrap();
    let client = ot::issue(
        fleet.current(),
        &spec(OtProfile::TlsClient, "plc-1"),
        OtKeySource::Generate,
        now,
    )
    .unwrap();
    let opcua = ot::issue(
        fleet.current(),
        &spec(
            OtProfile::OpcUa {
                application_uri: "urn:site:plc-1".into(),
            },
            "plc-1 opcua",
        ),
        OtKeySource::Generate,
        now,
    )
    .unwrap();
    // A CSR made by openssl (RSA 2048, with an extension rcgen's own CSR parser refuses).
    let (ok, out) = openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "plc2.key",
            "-out",
            "plc2.csr",
            "-subj",
            "/CN=ignored",
            "-addext",
            "subjectKeyIdentifier=hash",
        ],
    );
    assert!(ok, "{out}");
    let csr = std::fs::read_to_string(d.join("plc2.csr")).unwrap();
    let from_csr = ot::issue(
        fleet.current(),
        &spec(
            OtProfile::OpcUa {
                application_uri: "urn:site:plc-2".into(),
            },
            "plc-2",
        ),
        OtKeySource::Csr(&csr),
        now,
    )
    .unwrap();
    assert!(from_csr.private_key.is_none());

    let server_leaf = leaf_file(d, "server", &server);
    let client_leaf = leaf_file(d, "client", &client);
    let opcua_leaf = leaf_file(d, "opcua", &opcua);
    let csr_leaf = leaf_file(d, "plc2", &from_csr);
    for (leaf, purpose) in [
        (&server_leaf, "sslserver"),
        (&client_leaf, "sslclient"),
        (&opcua_leaf, "sslserver"),
        (&opcua_leaf, "sslclient"),
        (&csr_leaf, "sslserver"),
    ] {
        let (ok, out) = verify(d, &paths, leaf, purpose);
        assert!(
            ok && out.contains("OK"),
            "{} {purpose}: {out}",
            leaf.display()
        );
    }
    // Usages are not interchangeable.
    let (ok, out) = verify(d, &paths, &server_leaf, "sslclient");
    assert!(!ok, "a server certificate must not pass as a client: {out}");
    let (ok, out) = verify(d, &paths, &client_leaf, "sslserver");
    assert!(!ok, "a client certificate must not pass as a server: {out}");

    // The openssl key matches the certificate issued from its CSR.
    let (_, cert_pub) = openssl(
        d,
        &[
            "x509",
            "-in",
            csr_leaf.to_str().unwrap(),
            "-noout",
            "-pubkey",
        ],
    );
    let (_, key_pub) = openssl(d, &["pkey", "-in", "plc2.key", "-pubout"]);
    assert_eq!(cert_pub, key_pub);

    // What openssl reads from the OPC UA certificate: the ApplicationUri first, RSA 2048,
    // the OPC UA key usages.
    let (_, text) = openssl(
        d,
        &[
            "x509",
            "-in",
            opcua_leaf.to_str().unwrap(),
            "-noout",
            "-text",
        ],
    );
    assert!(text.contains("Public-Key: (2048 bit)"), "{text}");
    assert!(
        text.contains("URI:urn:site:plc-1, DNS:localhost, IP Address:127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("Digital Signature, Non Repudiation, Key Encipherment, Data Encipherment"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    // The generated key files are private.
    let (_, key) = write(d, "server", &server);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// async-opcua (the OPC UA stack the agent uses) reads an issued OPC UA certificate: the
/// ApplicationUri as the first SAN, the host name, RSA 2048, validity; and the generated key
/// loads as its private key and signs and decrypts under Basic256Sha256 in a way the
/// certificate's public key verifies and encrypts.
#[test]
fn async_opcua_accepts_an_issued_opcua_certificate_and_key() {
    use opcua_crypto::{PrivateKey, SecurityPolicy, X509};

    let now = SystemTime::now();
    let dir = tempfile::tempdir().unwrap();
    let fleet = FleetCa::init(dir.path(), now).unwrap();
    let issued = ot::issue(
        fleet.current(),
        &spec(
            OtProfile::OpcUa {
                application_uri: "urn:site:plc-1".into(),
            },
            "plc-1",
        ),
        OtKeySource::Generate,
        now,
    )
    .unwrap();
    let cert = X509::from_der(&issued.cert_der).unwrap();
    cert.is_application_uri_valid("urn:site:plc-1").unwrap();
    assert!(cert.is_application_uri_valid("urn:site:plc-2").is_err());
    cert.is_hostname_valid("localhost").unwrap();
    cert.is_time_valid(&chrono::Utc::now()).unwrap();
    assert_eq!(cert.key_length().unwrap(), 2048);
    // async-opcua returns the attribute with its type (`CN=plc-1`).
    assert!(cert.common_name().unwrap().ends_with("plc-1"));

    let key = PrivateKey::from_pem(issued.private_key.unwrap().pem().as_bytes()).unwrap();
    let public = cert.public_key().unwrap();
    let policy = SecurityPolicy::Basic256Sha256;
    let data = b"OpenSecureChannel";
    let mut sig = vec![0u8; 256];
    let n = policy.asymmetric_sign(&key, data, &mut sig).unwrap();
    policy
        .asymmetric_verify_signature(&public, data, &sig[..n])
        .unwrap();
    let mut secret = vec![0u8; 256];
    let n = policy
        .asymmetric_encrypt(&public, b"nonce", &mut secret)
        .unwrap();
    let mut plain = vec![0u8; 256];
    let m = policy
        .asymmetric_decrypt(&key, &secret[..n], &mut plain)
        .unwrap();
    assert_eq!(&plain[..m], b"nonce");
}

/// A Mosquitto process on its own port; killed and reaped on drop.
struct Mosquitto {
    port: u16,
    child: Child,
}

impl Mosquitto {
    fn start(dir: &Path, listener_conf: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\npersistence false\nlog_dest stderr\n\
                 listener {port} 127.0.0.1\n{listener_conf}\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto must be installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdTcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
                panic!("mosquitto exited: {status}\n{log}");
            }
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, child }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MQTT 3.1.1 CONNECT, clean session, client id "t".
const CONNECT: [u8; 15] = [
    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b't',
];
/// CONNACK, session not present, accepted.
const CONNACK_OK: [u8; 4] = [0x20, 2, 0, 0];

/// Connects over TLS, sends CONNECT and returns the first 4 bytes of the answer, or the error
/// (a refused client certificate surfaces on the first read under TLS 1.3).
async fn mqtt_connect(port: u16, cfg: rustls::ClientConfig) -> Result<[u8; 4], std::io::Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    tls.write_all(&CONNECT).await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn mosquitto_serves_an_issued_broker_certificate_and_admits_only_issued_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let now = SystemTime::now();
    let ca_dir = d.join("ca");
    let fleet = FleetCa::init(&ca_dir, now).unwrap();
    let paths = CaPaths::new(&ca_dir);
    let issue = |profile, cn: &str| {
        ot::issue(
            fleet.current(),
            &spec(profile, cn),
            OtKeySource::Generate,
            now,
        )
        .unwrap()
    };
    let (broker_crt, broker_key) = write(d, "broker", &issue(OtProfile::TlsServer, "broker"));
    let (plc_crt, plc_key) = write(d, "plc", &issue(OtProfile::TlsClient, "plc-1"));
    // Mosquitto drops root privileges to its own user unless told otherwise; the test files
    // are private to the test's user.
    let user = if nix_is_root() { "user root\n" } else { "" };
    let broker = Mosquitto::start(
        d,
        &format!(
            "{user}cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\nallow_anonymous false\n",
            paths.root_cert.display(),
            broker_crt.display(),
            broker_key.display()
        ),
    );

    // The agent's own MQTT TLS configuration (CA file plus client certificate files).
    let with_cert = client_config_from_files(&paths.root_cert, Some((&plc_crt, &plc_key))).unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        mqtt_connect(broker.port, with_cert),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answer, CONNACK_OK);

    let without_cert = client_config_from_files(&paths.root_cert, None).unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        mqtt_connect(broker.port, without_cert),
    )
    .await
    .unwrap();
    assert!(
        refused.is_err(),
        "a client without certificate got {refused:?}"
    );

    // A client certificate from another CA is refused too.
    let other_dir = d.join("other-ca");
    let other = FleetCa::init(&other_dir, now).unwrap();
    let foreign = ot::issue(
        other.current(),
        &spec(OtProfile::TlsClient, "intruder"),
        OtKeySource::Generate,
        now,
    )
    .unwrap();
    let (f_crt, f_key) = write(d, "foreign", &foreign);
    let foreign_cfg = client_config_from_files(&paths.root_cert, Some((&f_crt, &f_key))).unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        mqtt_connect(broker.port, foreign_cfg),
    )
    .await
    .unwrap();
    assert!(refused.is_err(), "a foreign client got {refused:?}");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
