//! OPC UA source against real in-process async-opcua servers (no mocks): readings, bad nodes,
//! recovery after a server restart, and Basic256Sha256 SignAndEncrypt with mutual trust.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test loudly"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kip_agent::opcua::{OpcUaEndpointConfig, OpcUaNodeConfig, OpcUaSecurityPolicy, OpcUaSource};
use kip_shared::{Quality, Record};
use opcua::crypto::{CertificateStore, SecurityPolicy};
use opcua::server::address_space::Variable;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerHandle};
use opcua::types::{
    DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode, UAString, Variant,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const NS_URI: &str = "urn:kip:test:machines";
const WAIT: Duration = Duration::from_secs(30);

/// A unique scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kip-opcua-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process OPC UA server with a few variables in namespace 2.
struct TestServer {
    handle: ServerHandle,
    nm: Arc<SimpleNodeManager>,
    ns: u16,
    tracker: TaskTracker,
}

impl TestServer {
    /// `temp` is the initial value of Machine1.Temp, so a restarted server is recognisable.
    async fn start(listener: TcpListener, pki_dir: &Path, temp: f64) -> Self {
        let port = listener.local_addr().unwrap().port();
        let tokens: &[&str] = &[ANONYMOUS_USER_TOKEN_ID];
        let (server, handle) = ServerBuilder::new()
            .application_name("kip test server")
            .application_uri("urn:kip:test:server")
            .product_uri("urn:kip:test:server")
            .create_sample_keypair(true)
            .pki_dir(pki_dir)
            .host("127.0.0.1")
            .port(port)
            .discovery_urls(vec![format!("opc.tcp://127.0.0.1:{port}/")])
            .trust_client_certs(false)
            .add_endpoint(
                "none",
                ("/", SecurityPolicy::None, MessageSecurityMode::None, tokens),
            )
            .add_endpoint(
                "basic256sha256",
                (
                    "/",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                    tokens,
                ),
            )
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: NS_URI.into(),
                    ..Default::default()
                },
                "kip-test",
            ))
            .build()
            .unwrap();
        let nm = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .unwrap();
        let ns = handle.get_namespace_index(NS_URI).unwrap();
        {
            let mut space = nm.address_space().write();
            let folder = NodeId::new(ns, "Machine1");
            space.add_folder(
                &folder,
                "Machine1",
                "Machine1",
                &NodeId::objects_folder_id(),
            );
            let var = |name: &str, v: Variant| {
                Variable::new(&NodeId::new(ns, format!("Machine1.{name}")), name, name, v)
            };
            space.add_variables(
                vec![
                    var("Temp", Variant::Double(temp)),
                    var("Speed", Variant::Int32(1500)),
                    var("Running", Variant::Boolean(true)),
                    var("Count", Variant::UInt64(7)),
                    var("Name", Variant::String(UAString::from("press 1"))),
                ],
                &folder,
            );
        }
        let tracker = TaskTracker::new();
        tracker.spawn(server.run_with(listener));
        tracker.close();
        Self {
            handle,
            nm,
            ns,
            tracker,
        }
    }

    /// Adds `n` Double variables `Machine1.Bulk{i}` with value `i`.
    fn add_bulk(&self, n: usize) {
        let mut space = self.nm.address_space().write();
        let vars = (0..n)
            .map(|i| {
                let name = format!("Bulk{i}");
                let id = NodeId::new(self.ns, format!("Machine1.{name}"));
                Variable::new(&id, name.as_str(), name.as_str(), Variant::Double(i as f64))
            })
            .collect();
        space.add_variables(vars, &NodeId::new(self.ns, "Machine1"));
    }

    fn set(&self, name: &str, value: Variant) {
        self.set_dv(name, DataValue::new_now(value));
    }

    fn set_dv(&self, name: &str, dv: DataValue) {
        self.nm
            .set_value(
                self.handle.subscriptions(),
                &NodeId::new(self.ns, format!("Machine1.{name}")),
                None,
                dv,
            )
            .unwrap();
    }

    /// Stops the server and waits until its listener is closed.
    async fn stop(self) {
        self.handle.cancel();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("server did not stop");
    }
}

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
        nodes,
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
    let scratch = Scratch::new("readings");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &scratch.0.join("server"), 21.5).await;
    let mut src = Running::start(config(
        port,
        &scratch.0.join("agent"),
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
    let scratch = Scratch::new("badnodes");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &scratch.0.join("server"), 1.0).await;
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
    let mut src = Running::start(config(port, &scratch.0.join("agent"), nodes));

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
    let scratch = Scratch::new("restart");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &scratch.0.join("server"), 10.0).await;
    let mut src = Running::start(config(
        port,
        &scratch.0.join("agent"),
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
    let server = TestServer::start(listener, &scratch.0.join("server"), 20.0).await;

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
    let scratch = Scratch::new("secure");
    let server_pki = scratch.0.join("server");
    let agent_pki = scratch.0.join("agent");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &server_pki, 5.0).await;

    let mut cfg = config(port, &agent_pki, vec![node("Temp", "temp")]);
    cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
    // The server's certificate, handed to the agent as a file to trust.
    let server_cert = scratch.0.join("server-cert.der");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_the_server_does_not_trust_gets_no_data_and_lands_in_rejected() {
    let scratch = Scratch::new("untrusted");
    let server_pki = scratch.0.join("server");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &server_pki, 5.0).await;

    let mut cfg = config(port, &scratch.0.join("agent"), vec![node("Temp", "temp")]);
    cfg.security_policy = OpcUaSecurityPolicy::Basic256Sha256;
    let server_cert = scratch.0.join("server-cert.der");
    std::fs::copy(server_pki.join("own/cert.der"), &server_cert).unwrap();
    cfg.trust_server_certs = vec![server_cert];
    let mut src = Running::start(cfg);

    let rejected = server_pki.join("rejected");
    let waited = tokio::time::timeout(WAIT, async {
        while std::fs::read_dir(&rejected).map_or(0, |d| d.count()) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "agent certificate never landed in {}",
        rejected.display()
    );
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
    let scratch = Scratch::new("chunks");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &scratch.0.join("server"), 1.0).await;
    // The test server allows 1000 monitored items per subscription, like many PLCs.
    const N: usize = 2500;
    server.add_bulk(N);
    let nodes = (0..N)
        .map(|i| node(&format!("Bulk{i}"), &format!("bulk{i}")))
        .collect();
    let mut src = Running::start(config(port, &scratch.0.join("agent"), nodes));
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
    let scratch = Scratch::new("runtime");
    let listener = free_listener().await;
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start(listener, &scratch.0.join("server"), 33.25).await;
    let toml = format!(
        "[agent]\ndevice = \"gw-1\"\nstate_dir = \"{state}\"\n\
         [http]\nlisten_addr = \"127.0.0.1:0\"\n\
         [[opcua]]\nname = \"plc1\"\nurl = \"opc.tcp://127.0.0.1:{port}/\"\npki_dir = \"{pki}\"\n\
         publishing_interval_ms = 100\n\
         [[opcua.nodes]]\nnode_id = \"ns=2;s=Machine1.Temp\"\nmachine = \"press1\"\nmetric = \"temp\"\n\
         sampling_interval_ms = 50\n",
        state = scratch.0.join("state").display(),
        pki = scratch.0.join("agent-pki").display(),
    );
    let cfg = kip_agent::config::RawConfig::from_toml(&toml, Path::new("agent.toml"))
        .unwrap()
        .validate()
        .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let agent = kip_agent::runtime::start(cfg, cancel.clone())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let recs = agent.buffer.read_range(0, 1000, 1 << 20).unwrap();
        let found = recs.iter().any(|s| {
            matches!(&s.record, Record::Reading(r)
                if r.source == "plc1" && r.machine == "press1" && r.metric == "temp" && r.value == 33.25)
        });
        if found {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no OPC UA reading buffered: {recs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = kip_agent::runtime::local_get(agent.http_addr, "/v1/status")
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"opcua\""), "{body}");
    cancel.cancel();
    agent.wait().await;
    drop(server);
}
