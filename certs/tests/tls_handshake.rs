//! Real TLS handshakes on loopback between the configurations built by kip-certs.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use kip_certs::{
    DeviceIdentity, DeviceKey, FleetCa, Intermediate, RevokedSerial, RootCa, TrustBundle,
    client_config, parse_peer_cert, rustls,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);

struct Pki {
    root: RootCa,
    inter: Intermediate,
}

impl Pki {
    fn new(now: SystemTime) -> Self {
        // Distinct names per CA, as in real deployments: webpki matches issuers and CRLs by name.
        let tag = Uuid::new_v4();
        let root = RootCa::generate(&format!("root {tag}"), now - 10 * DAY, 100 * DAY).unwrap();
        let inter = root
            .issue_intermediate(&format!("inter {tag}"), now - 10 * DAY, 50 * DAY)
            .unwrap();
        Self { root, inter }
    }
    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(vec![self.root.cert_der().clone()]).unwrap()
    }
    /// A client config for a fresh device, certificate issued at `issued_at`.
    fn device(
        &self,
        issued_at: SystemTime,
        lifetime: Duration,
    ) -> (Arc<rustls::ClientConfig>, String) {
        let key = DeviceKey::generate().unwrap();
        let id = DeviceIdentity {
            org_id: Uuid::new_v4(),
            device_id: Uuid::new_v4(),
        };
        let issued = self
            .inter
            .sign_device_csr(&key.csr_pem("gw").unwrap(), id, issued_at, lifetime)
            .unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        (
            client_config(&self.bundle(), chain, key.private_key_der()).unwrap(),
            issued.serial_hex,
        )
    }
    fn server(&self, revoked: &[RevokedSerial]) -> Arc<rustls::ServerConfig> {
        let now = SystemTime::now();
        let ca = FleetCa::new(
            Intermediate::from_pem(&self.inter.cert_pem(), &self.inter.key_pem()).unwrap(),
            None,
            self.bundle(),
        );
        let sid = ca
            .current()
            .issue_server_cert(&["localhost".into(), "127.0.0.1".into()], now, DAY)
            .unwrap();
        let crls = ca.crls(revoked, now, DAY).unwrap();
        kip_certs::server_config(ca.bundle(), sid.chain, sid.key, crls).unwrap()
    }
}

/// Runs one handshake plus a one-byte echo; returns the server's view (Ok(peer serial)).
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
) -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let connector = tokio_rustls::TlsConnector::from(client);
    let srv = async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| parse_peer_cert(c).unwrap().serial_hex)
            .ok_or("no peer certificate")?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    };
    let cli = async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let (s, c) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(srv, cli) })
        .await
        .expect("handshake hung");
    match (s, c) {
        (Ok(serial), Ok(())) => Ok(serial),
        (s, c) => Err(format!("server: {s:?}, client: {c:?}")),
    }
}

#[tokio::test]
async fn a_valid_device_certificate_is_accepted_and_identified() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let (client, serial) = pki.device(now, DAY);
    let got = handshake(pki.server(&[]), client).await.unwrap();
    assert_eq!(got, serial);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let other = Pki::new(now);
    // The rogue device trusts our server (so only the server's check is tested).
    let (rogue, _) = other.device(now, DAY);
    let key = DeviceKey::generate().unwrap();
    let id = DeviceIdentity {
        org_id: Uuid::new_v4(),
        device_id: Uuid::new_v4(),
    };
    let issued = other
        .inter
        .sign_device_csr(&key.csr_pem("gw").unwrap(), id, now, DAY)
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let rogue_trusting_us = client_config(&pki.bundle(), chain, key.private_key_der()).unwrap();
    let err = handshake(pki.server(&[]), rogue_trusting_us)
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("issuer"),
        "{err}"
    );
    // And a device of another fleet does not trust our server either.
    assert!(handshake(pki.server(&[]), rogue).await.is_err());
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let (client, _) = pki.device(now - 3 * DAY, DAY);
    let err = handshake(pki.server(&[]), client).await.unwrap_err();
    assert!(err.contains("Expired"), "{err}");
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_and_others_still_pass() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let (revoked_client, serial) = pki.device(now, DAY);
    let (good_client, _) = pki.device(now, DAY);
    let revoked = [RevokedSerial {
        serial_hex: serial,
        revoked_at: now,
    }];
    let err = handshake(pki.server(&revoked), revoked_client)
        .await
        .unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
    handshake(pki.server(&revoked), good_client).await.unwrap();
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let key = DeviceKey::generate().unwrap();
    let id = DeviceIdentity {
        org_id: Uuid::new_v4(),
        device_id: Uuid::new_v4(),
    };
    let issued = pki
        .inter
        .sign_device_csr(&key.csr_pem("gw").unwrap(), id, now, DAY)
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(pki.bundle().root_store().unwrap())
    .with_client_auth_cert(chain, key.private_key_der())
    .unwrap();
    let err = handshake(pki.server(&[]), Arc::new(cfg)).await.unwrap_err();
    assert!(err.to_lowercase().contains("protocol"), "{err}");
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let now = SystemTime::now();
    let pki = Pki::new(now);
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(pki.bundle().root_store().unwrap())
    .with_no_client_auth();
    assert!(handshake(pki.server(&[]), Arc::new(cfg)).await.is_err());
}

#[tokio::test]
async fn a_bundle_with_old_and_new_roots_accepts_devices_of_both() {
    let now = SystemTime::now();
    let old = Pki::new(now);
    let new = Pki::new(now);
    let mut bundle = old.bundle();
    bundle.merge(&new.bundle());
    assert_eq!(bundle.certs().len(), 2);
    let round_trip = TrustBundle::from_pem(&bundle.to_pem()).unwrap();
    assert_eq!(round_trip, bundle);
    // Server signed by the new intermediate, with CRLs of both intermediates.
    let ca = FleetCa::new(
        Intermediate::from_pem(&new.inter.cert_pem(), &new.inter.key_pem()).unwrap(),
        Some(Intermediate::from_pem(&old.inter.cert_pem(), &old.inter.key_pem()).unwrap()),
        bundle.clone(),
    );
    let sid = ca
        .current()
        .issue_server_cert(&["localhost".into()], now, DAY)
        .unwrap();
    let server = kip_certs::server_config(
        ca.bundle(),
        sid.chain,
        sid.key,
        ca.crls(&[], now, DAY).unwrap(),
    )
    .unwrap();
    for pki in [&old, &new] {
        let key = DeviceKey::generate().unwrap();
        let id = DeviceIdentity {
            org_id: Uuid::new_v4(),
            device_id: Uuid::new_v4(),
        };
        let issued = pki
            .inter
            .sign_device_csr(&key.csr_pem("gw").unwrap(), id, now, DAY)
            .unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let client = client_config(&bundle, chain, key.private_key_der()).unwrap();
        handshake(server.clone(), client).await.unwrap();
    }
}
