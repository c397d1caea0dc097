//! OPC UA source against real in-process async-opcua servers (no mocks): readings, bad nodes,
//! recovery after a server restart, and Basic256Sha256 SignAndEncrypt with mutual trust.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test loudly"
)]

use std::path::Path;
use std::time::Duration;

use kip_agent::opcua::{
    OpcUaEndpointConfig, OpcUaNodeConfig, OpcUaSecurityPolicy, OpcUaSource, OwnCertificate,
};
use kip_shared::{Quality, Record};
use kip_tests::{OpcUaServer, eventually_ok, wait_until};
use opcua::crypto::CertificateStore;
use opcua::types::{DataValue, DateTime, StatusCode, UAString, Variant};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WAIT: Duration = Duration::from_secs(30);

fn node(name: &str, metric: &str) -> OpcUaNodeConfig {
    OpcUaNodeConfig {
        node_id: format!("ns=2;s=Machine1.{name}"),
        machine: "press1".into(),
        metric: metric.into(),
        sampling_interval_ms: Some(50),
    }
}

fn config(port: u16, pki_dir: &Path, nodes: Vec<OpcUaNodeConfig>) -> OpcUaEndpointConfig {
    OpcUaEndpointConfig {
        name: "plc1".into(),
        url: format!("opc.tcp://127.0.0.1:{port}/"),
        security_policy: OpcUaSecurityPolicy::None,
        pki_dir: pki_dir.to_path_buf(),
        application_uri: Some("urn:kip:test:agent".into()),
        trust_server_certs: vec![],
        publishing_interval_ms: 100,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        reconnect_probe_interval_ms: 0,
        failover_urls: Vec::new(),
        nodes,
        user_identity: Default::default(),
    }
}

/// The source running on a tracker, with its record stream and metrics.
struct Running {
    rx: mpsc::Receiver<kip_agent::source::Envelope>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    registry: Registry,
}

impl Running {
    fn start(cfg: OpcUaEndpointConfig) -> Self {
        cfg.validate().unwrap();
        let mut registry = Registry::default();
        let source = OpcUaSource::new(cfg, &mut registry);
        let (tx, rx) = mpsc::channel(1024);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(source.run(tx, cancel.clone()));
        tracker.close();
        Self {
            rx,
            cancel,
            tracker,
            registry,
        }
    }

    /// Receives records until `done` holds for everything received so far; returns it.
    async fn until(&mut self, what: &str, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        let mut seen = Vec::new();
        let res = tokio::time::timeout(WAIT, async {
            loop {
                let r = self.rx.recv().await.expect("source stopped").record;
                seen.push(r);
                if done(&seen) {
                    return;
                }
            }
        })
        .await;
        assert!(res.is_ok(), "timed out waiting for {what}; got {seen:#?}");
        seen
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("source did not stop on cancel");
    }
}

fn has_reading(seen: &[Record], metric: &str, value: f64) -> bool {
    seen.iter()
        .any(|r| matches!(r, Record::Reading(x) if x.metric == metric && x.value == value))
}

fn reading<'a>(seen: &'a [Record], metric: &str, value: f64) -> &'a kip_shared::Reading {
    seen.iter()
        .find_map(|r| match r {
            Record::Reading(x) if x.metric == metric && x.value == value => Some(x),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no reading {metric}={value} in {seen:#?}"))
}

async fn free_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_arrive_with_machine_metric_value_quality_and_source_time() {
    let scratch = tempfile::tempdir().unwrap();
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 21.5).await;
    let mut src = Running::start(config(
        port,
        &scratch.path().join("agent"),
        vec![
            node("Temp", "temp"),
            node("Speed", "speed"),
            node("Running", "running"),
            node("Count", "count"),
        ],
    ));

    // Initial values of every type arrive once the monitored items exist.
    let seen = src
        .until("initial values", |s| {
            has_reading(s, "temp", 21.5)
                && has_reading(s, "speed", 1500.0)
                && has_reading(s, "running", 1.0)
                && has_reading(s, "count", 7.0)
        })
        .await;
    let temp = reading(&seen, "temp", 21.5);
    assert_eq!(temp.source, "plc1");
    assert_eq!(temp.machine, "press1");
    assert_eq!(temp.quality, Quality::Good);
    assert!(
        !seen
            .iter()
            .any(|r| matches!(r, Record::Gap(_) | Record::DeadLetter(_))),
        "{seen:#?}"
    );

    // Changes flow, with the server's SourceTimestamp and status mapped to quality.
    // (The test server drops source timestamps older than its last sample, so use "now".)
    let source_ts =
        chrono::DateTime::from_timestamp_millis(chrono::Utc::now().timestamp_millis()).unwrap();
    let mut dv = DataValue::new_at(Variant::Double(23.25), DateTime::from(source_ts));
    dv.server_timestamp = Some(DateTime::from(source_ts + chrono::Duration::seconds(5)));
    dv.status = Some(StatusCode::UncertainLastUsableValue);
    server.set_dv("Temp", dv);
    server.set("Running", Variant::Boolean(false));
    server.set("Speed", Variant::Int32(-3));
    let seen = src
        .until("changed values", |s| {
            has_reading(s, "temp", 23.25)
                && has_reading(s, "running", 0.0)
                && has_reading(s, "speed", -3.0)
        })
        .await;
    let temp = reading(&seen, "temp", 23.25);
    assert_eq!(temp.ts, source_ts);
    assert_eq!(temp.quality, Quality::Uncertain);

    let m = src.metrics();
    assert!(m.contains("kip_opcua_connected{source=\"plc1\"} 1"), "{m}");
    assert!(
        m.contains("kip_opcua_readings_total{source=\"plc1\",metric=\"temp\"} 2"),
        "{m}"
    );
    src.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_node_ids_become_dead_letters_and_the_good_nodes_keep_flowing() {
    let scratch = tempfile::tempdir().unwrap();
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 1.0).await;
    let mut nodes = vec![node("Temp", "temp"), node("DoesNotExist", "ghost")];
    // An object, not a variable: it has no Value attribute.
    nodes.push(OpcUaNodeConfig {
        node_id: "ns=2;s=Machine1".into(),
        machine: "press1".into(),
        metric: "folder".into(),
        sampling_interval_ms: None,
    });
    // A variable of the wrong type: its values cannot be readings.
    nodes.push(node("Name", "name"));
    nodes.push(node("Speed", "speed"));
    let mut src = Running::start(config(port, &scratch.path().join("agent"), nodes));

    let dead = |s: &[Record], origin: &str, needle: &str| {
        s.iter().any(|r| {
            matches!(r, Record::DeadLetter(d) if d.origin == origin && d.reason.contains(needle))
        })
    };
    let seen = src
        .until("dead letters and good readings", |s| {
            dead(s, "ns=2;s=Machine1.DoesNotExist", "BadNodeIdUnknown")
                && dead(s, "ns=2;s=Machine1", "not a variable")
                && dead(s, "ns=2;s=Machine1.Name", "wrong type")
                && has_reading(s, "temp", 1.0)
                && has_reading(s, "speed", 1500.0)
        })
        .await;
    assert!(
        !seen
            .iter()
            .any(|r| matches!(r, Record::Reading(x) if x.metric == "ghost" || x.metric == "name"))
    );

    let dead_letters = |s: &[Record]| {
        s.iter()
            .filter(|r| matches!(r, Record::DeadLetter(_)))
            .count()
    };
    assert_eq!(
        dead_letters(&seen),
        3,
        "one dead letter per bad node: {seen:#?}"
    );

    server.set("Temp", Variant::Double(2.0));
    server.set("Name", Variant::String(UAString::from("press 2")));
    let seen = src
        .until("good node still flowing", |s| has_reading(s, "temp", 2.0))
        .await;
    assert_eq!(
        dead_letters(&seen),
        0,
        "skipped nodes are not monitored: {seen:#?}"
    );

    let m = src.metrics();
    assert!(m.contains("kip_opcua_bad_nodes{source=\"plc1\"} 3"), "{m}");
    src.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_source_reconnects_reports_a_gap_and_readings_resume() {
    let scratch = tempfile::tempdir().unwrap();
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 10.0).await;
    let mut src = Running::start(config(
        port,
        &scratch.path().join("agent"),
        vec![node("Temp", "temp"), node("Speed", "speed")],
    ));
    src.until("first server's value", |s| has_reading(s, "temp", 10.0))
        .await;
    server.set("Temp", Variant::Double(11.0));
    src.until("first server's change", |s| has_reading(s, "temp", 11.0))
        .await;

    let stopped_at = chrono::Utc::now();
    server.stop().await;
    // A brand-new server (no sessions, no subscriptions) on the same port.
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let restarted_at = chrono::Utc::now();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 20.0).await;

    let seen = src
        .until("gap then the new server's value", |s| {
            has_reading(s, "temp", 20.0)
        })
        .await;
    let gap_pos = seen
        .iter()
        .position(|r| matches!(r, Record::Gap(_)))
        .unwrap_or_else(|| panic!("no gap in {seen:#?}"));
    let Record::Gap(gap) = &seen[gap_pos] else {
        unreachable!()
    };
    assert_eq!(gap.source, "plc1");
    assert!(gap.from <= stopped_at, "{gap:?} vs stop at {stopped_at}");
    assert!(
        gap.to >= restarted_at,
        "{gap:?} vs restart at {restarted_at}"
    );
    assert!(gap.reason.contains("reconnected"), "{gap:?}");
    let new_value = seen.iter().position(|r| is_value(r, "temp", 20.0)).unwrap();
    assert!(
        gap_pos < new_value,
        "gap must precede the new session's data: {seen:#?}"
    );

    // The new subscription delivers changes, not just the initial value.
    server.set("Temp", Variant::Double(21.0));
    src.until("second server's change", |s| has_reading(s, "temp", 21.0))
        .await;
    let m = src.metrics();
    assert!(
        m.contains("kip_opcua_reconnects_total{source=\"plc1\"} 1"),
        "{m}"
    );
    src.stop().await;
    server.stop().await;
}

fn is_value(r: &Record, metric: &str, value: f64) -> bool {
    matches!(r, Record::Reading(x) if x.metric == metric && x.value == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic256sha256_sign_and_encrypt_works_when_each_side_trusts_the_other() {
    let scratch = tempfile::tempdir().unwrap();
    let server_pki = scratch.path().join("server");
    let agent_pki = scratch.path().join("agent");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &server_pki, 5.0).await;

    let mut cfg = config(port, &agent_pki, vec![node("Temp", "temp")]);
    cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
    // The server's certificate, handed to the agent as a file to trust.
    let server_cert = scratch.path().join("server-cert.der");
    std::fs::copy(server_pki.join("own/cert.der"), &server_cert).unwrap();
    cfg.trust_server_certs = vec![server_cert];
    // The agent's certificate, created up front and put into the server's trust list.
    let agent_cert = kip_agent::opcua::OwnCertificate::ensure_own_certificate(&cfg).unwrap();
    let cert = CertificateStore::read_cert(&agent_cert).unwrap();
    std::fs::create_dir_all(server_pki.join("trusted")).unwrap();
    std::fs::copy(
        &agent_cert,
        server_pki
            .join("trusted")
            .join(CertificateStore::cert_file_name(&cert)),
    )
    .unwrap();

    let mut src = Running::start(cfg);
    src.until("value over an encrypted session", |s| {
        has_reading(s, "temp", 5.0)
    })
    .await;
    server.set("Temp", Variant::Double(6.0));
    src.until("change over an encrypted session", |s| {
        has_reading(s, "temp", 6.0)
    })
    .await;
    for rejected in [server_pki.join("rejected"), agent_pki.join("rejected")] {
        let n = std::fs::read_dir(&rejected).unwrap().count();
        assert_eq!(n, 0, "{} is not empty", rejected.display());
    }
    src.stop().await;
    server.stop().await;
}

/// The server's user with a password (on the basic256sha256 endpoint only).
use kip_tests::opcua::{TEST_PASSWORD as PASSWORD, TEST_USER as USER};

/// OPC UA user identity (issue #13): the agent activates its session as a user whose password
/// comes from a file; a wrong password gets no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_username_and_password_from_a_file_activate_the_session_and_a_wrong_one_does_not() {
    let scratch = tempfile::tempdir().unwrap();
    let server_pki = scratch.path().join("server");
    let agent_pki = scratch.path().join("agent");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &server_pki, 8.0).await;

    let secure = |password: &str, pki: &Path| {
        let mut cfg = config(port, pki, vec![node("Temp", "temp")]);
        cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
        let server_cert = scratch.path().join("server-cert.der");
        std::fs::copy(server_pki.join("own/cert.der"), &server_cert).unwrap();
        cfg.trust_server_certs = vec![server_cert];
        let agent_cert = cfg.ensure_own_certificate().unwrap();
        let cert = CertificateStore::read_cert(&agent_cert).unwrap();
        std::fs::create_dir_all(server_pki.join("trusted")).unwrap();
        std::fs::copy(
            &agent_cert,
            server_pki
                .join("trusted")
                .join(CertificateStore::cert_file_name(&cert)),
        )
        .unwrap();
        let pw_file = pki.join("password");
        std::fs::write(&pw_file, format!("{password}\n")).unwrap();
        cfg.user_identity = kip_agent::opcua::OpcUaUserIdentity::Username {
            username: USER.into(),
            password_file: pw_file,
        };
        cfg
    };

    // A wrong password, started first: when the right one has data, the wrong one has none
    // (the channel opens, the session is not activated).
    let mut wrong = Running::start(secure(
        "not-the-password",
        &scratch.path().join("agent-wrong"),
    ));
    let mut src = Running::start(secure(PASSWORD, &agent_pki));
    src.until("value as the configured user", |s| {
        has_reading(s, "temp", 8.0)
    })
    .await;
    while let Ok(e) = wrong.rx.try_recv() {
        assert!(
            !matches!(e.record, Record::Reading(_)),
            "a wrong password produced a reading: {:?}",
            e.record
        );
    }
    let m = wrong.metrics();
    assert!(!m.contains("kip_opcua_connected{source=\"plc1\"} 1"), "{m}");
    wrong.stop().await;
    src.stop().await;

    // A password over security policy none is refused at load.
    let mut plain = secure(PASSWORD, &agent_pki);
    plain.security_policy = OpcUaSecurityPolicy::None;
    let e = plain.validate().unwrap_err();
    assert_eq!(e.field, "user_identity", "{e}");
    server.stop().await;
}

/// Trusts each side's certificate on the other: a basic256sha256 config for `port`.
fn trusted_secure_config(
    scratch: &Path,
    server_pki: &Path,
    agent_pki: &Path,
    port: u16,
) -> OpcUaEndpointConfig {
    let mut cfg = config(port, agent_pki, vec![node("Temp", "temp")]);
    cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
    let server_cert = scratch.join("server-cert.der");
    std::fs::copy(server_pki.join("own/cert.der"), &server_cert).unwrap();
    cfg.trust_server_certs = vec![server_cert];
    let agent_cert = cfg.ensure_own_certificate().unwrap();
    let cert = CertificateStore::read_cert(&agent_cert).unwrap();
    std::fs::create_dir_all(server_pki.join("trusted")).unwrap();
    std::fs::copy(
        &agent_cert,
        server_pki
            .join("trusted")
            .join(CertificateStore::cert_file_name(&cert)),
    )
    .unwrap();
    cfg
}

/// OPC UA X.509 user identity: a user certificate made by the fleet CA (`kip_certs::ot`, RSA)
/// activates the session on a server that maps that certificate to a user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_user_certificate_activates_the_session() {
    let scratch = tempfile::tempdir().unwrap();
    let ca =
        kip_certs::FleetCa::init(&scratch.path().join("ca"), std::time::SystemTime::now()).unwrap();
    let issued = kip_certs::ot::issue(
        ca.current(),
        &kip_certs::ot::OtCertSpec {
            profile: kip_certs::ot::OtProfile::OpcUa {
                application_uri: "urn:kip:user:agent".into(),
            },
            common_name: "kip-agent-user".into(),
            dns_names: vec!["agent".into()],
            ip_addresses: vec![],
            validity_days: 2,
        },
        kip_certs::ot::OtKeySource::Generate,
        std::time::SystemTime::now(),
    )
    .unwrap();
    let (user_pem, user_der, user_key) = (
        scratch.path().join("user.pem"),
        scratch.path().join("user.der"),
        scratch.path().join("user.key"),
    );
    std::fs::write(&user_pem, &issued.cert.cert_pem).unwrap();
    std::fs::write(&user_der, issued.cert_der.as_ref()).unwrap();
    std::fs::write(&user_key, issued.private_key.unwrap().pem()).unwrap();

    let server_pki = scratch.path().join("server");
    let agent_pki = scratch.path().join("agent");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server =
        OpcUaServer::start_with_x509_user(listener, &server_pki, 9.0, Some(&user_der)).await;
    let mut cfg = trusted_secure_config(scratch.path(), &server_pki, &agent_pki, port);
    cfg.user_identity = kip_agent::opcua::OpcUaUserIdentity::X509 {
        cert_file: user_pem,
        key_file: user_key,
    };
    let mut src = Running::start(cfg);
    src.until("value as the X.509 user", |s| has_reading(s, "temp", 9.0))
        .await;
    src.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_server_does_not_trust_gets_no_data_and_lands_in_rejected() {
    let scratch = tempfile::tempdir().unwrap();
    let server_pki = scratch.path().join("server");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &server_pki, 5.0).await;

    let mut cfg = config(
        port,
        &scratch.path().join("agent"),
        vec![node("Temp", "temp")],
    );
    cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
    let server_cert = scratch.path().join("server-cert.der");
    std::fs::copy(server_pki.join("own/cert.der"), &server_cert).unwrap();
    cfg.trust_server_certs = vec![server_cert];
    let mut src = Running::start(cfg);

    let rejected = server_pki.join("rejected");
    wait_until(
        WAIT,
        "the agent certificate lands in the server's rejected folder",
        || {
            let n = std::fs::read_dir(&rejected).map_or(0, |d| d.count());
            async move { n > 0 }
        },
    )
    .await;
    assert!(
        src.rx.try_recv().is_err(),
        "no record may come from an untrusted session"
    );
    assert!(
        src.metrics()
            .contains("kip_opcua_connected{source=\"plc1\"} 0")
    );
    src.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_nodes_than_one_subscription_holds_are_split_into_chunks_and_all_flow() {
    let scratch = tempfile::tempdir().unwrap();
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 1.0).await;
    // The test server allows 1000 monitored items per subscription, like many PLCs.
    const N: usize = 2500;
    server.add_bulk(N);
    let nodes = (0..N)
        .map(|i| node(&format!("Bulk{i}"), &format!("bulk{i}")))
        .collect();
    let mut src = Running::start(config(port, &scratch.path().join("agent"), nodes));
    let seen = src
        .until("all initial values", |s| {
            s.iter().filter(|r| matches!(r, Record::Reading(_))).count() >= N
        })
        .await;
    assert!(
        !seen.iter().any(|r| matches!(r, Record::DeadLetter(_))),
        "no node may fail"
    );
    for i in [0, 999, 1000, 2499] {
        assert!(
            has_reading(&seen, &format!("bulk{i}"), i as f64),
            "bulk{i} missing"
        );
    }
    server.set("Bulk2499", Variant::Double(-1.0));
    src.until("a change in the last chunk", |s| {
        has_reading(s, "bulk2499", -1.0)
    })
    .await;
    src.stop().await;
    server.stop().await;
}

/// The whole agent, configured from TOML with an `[[opcua]]` endpoint, buffers the readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runtime_buffers_readings_of_a_configured_opcua_endpoint() {
    let scratch = tempfile::tempdir().unwrap();
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = OpcUaServer::start(listener, &scratch.path().join("server"), 33.25).await;
    let toml = format!(
        "[agent]\ndevice = \"gw-1\"\nstate_dir = \"{state}\"\n\
         [http]\nlisten_addr = \"127.0.0.1:0\"\n\
         [[opcua]]\nname = \"plc1\"\nurl = \"opc.tcp://127.0.0.1:{port}/\"\npki_dir = \"{pki}\"\n\
         publishing_interval_ms = 100\n\
         [[opcua.nodes]]\nnode_id = \"ns=2;s=Machine1.Temp\"\nmachine = \"press1\"\nmetric = \"temp\"\n\
         sampling_interval_ms = 50\n",
        state = scratch.path().join("state").display(),
        pki = scratch.path().join("agent-pki").display(),
    );
    let cfg = kip_agent::config::RawConfig::from_toml(&toml, Path::new("agent.toml"))
        .unwrap()
        .validate()
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let agent = kip_agent::runtime::start(cfg, cancel.clone())
        .await
        .unwrap();
    eventually_ok(WAIT, || {
        let recs = agent.buffer.read_range(0, 1000, 1 << 20).unwrap();
        let found = recs.iter().any(|s| {
            matches!(&s.record, Record::Reading(r)
                if r.source == "plc1" && r.machine == "press1" && r.metric == "temp" && r.value == 33.25)
        });
        async move {
            if found {
                Ok(())
            } else {
                Err(format!("no OPC UA reading buffered: {recs:?}"))
            }
        }
    })
    .await;
    let (code, body) = kip_agent::runtime::local_get(agent.http_addr, "/v1/status")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"opcua\""), "{body}");
    cancel.cancel();
    agent.wait().await;
    drop(server);
}
