//! MQTT over TLS 1.3 where the broker allows it (issue #13, OT side): the client configuration
//! the MQTT sources use ([`kip_agent::mqtt::tls_client_config`]) negotiates TLS 1.3 with a
//! real Mosquitto that offers it, including one that refuses anything older. (TLS 1.2 stays
//! enabled for brokers without 1.3; Mosquitto's `tls_version` is a minimum, so a 1.2-only
//! broker is not built here.)
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failure should abort the test"
)]

use std::sync::Arc;

use kip_certs::rustls::{self, pki_types::ServerName};
use kip_tests::{BrokerPki as Pki, Mosquitto};

/// Handshakes with the broker presenting the test client certificate; the negotiated version.
async fn negotiated(port: u16, pki: &Pki) -> rustls::ProtocolVersion {
    let cfg = kip_agent::mqtt::tls_client_config(
        &pki.ca,
        Some((pki.client_cert.as_path(), pki.client_key.as_path())),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.protocol_version().unwrap()
}

#[tokio::test]
async fn tls_1_3_is_used_when_the_broker_offers_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let default = Mosquitto::start(dir.path(), &pki.listener_conf());
    assert_eq!(
        negotiated(default.port, &pki).await,
        rustls::ProtocolVersion::TLSv1_3
    );
    let strict = Mosquitto::start(
        dir.path(),
        &format!("{}tls_version tlsv1.3\n", pki.listener_conf()),
    );
    assert_eq!(
        negotiated(strict.port, &pki).await,
        rustls::ProtocolVersion::TLSv1_3
    );
}
