//! The OPC UA source against an independent peer: a Python `asyncua` (PyPI, 2.1.0) server.
//! A missing `asyncua` module fails the test (`scripts/test.sh` installs it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers fail the test loudly"
)]

use std::process::Stdio;
use std::time::Duration;

use kip_agent::opcua::{OpcUaEndpointConfig, OpcUaNodeConfig, OpcUaSecurityPolicy, OpcUaSource};
use kip_shared::{Quality, Record};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const WAIT: Duration = Duration::from_secs(30);

/// An asyncua server on `argv[1]` with Machine1.{Temp (Double), Count (Int16), Running
/// (Boolean)} in namespace 2; stdin lines `NAME VALUE` write new values.
const SERVER_PY: &str = r#"
import asyncio, sys
from asyncua import Server, ua

async def main(port):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:kip:test:asyncua")
    assert idx == 2, idx
    m = await server.nodes.objects.add_object(ua.NodeId("Machine1", idx), ua.QualifiedName("Machine1", idx))
    types = {"Temp": ua.VariantType.Double, "Count": ua.VariantType.Int16, "Running": ua.VariantType.Boolean}
    initial = {"Temp": 1.5, "Count": 3, "Running": True}
    nodes = {}
    for name, vt in types.items():
        nodes[name] = await m.add_variable(
            ua.NodeId(f"Machine1.{name}", idx), ua.QualifiedName(name, idx), ua.Variant(initial[name], vt))
    async with server:
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            name, raw = line.decode().split()
            vt = types[name]
            value = {ua.VariantType.Double: float, ua.VariantType.Int16: int}.get(vt, lambda s: s == "true")(raw)
            await nodes[name].write_value(ua.DataValue(ua.Variant(value, vt)))

asyncio.run(main(int(sys.argv[1])))
"#;

fn asyncua_available() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import asyncua"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn has_reading(seen: &[Record], metric: &str, value: f64) -> bool {
    seen.iter()
        .any(|r| matches!(r, Record::Reading(x) if x.metric == metric && x.value == value && x.quality == Quality::Good))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_flow_from_an_independent_python_asyncua_server() {
    // scripts/test.sh installs the peer; a missing peer is a failed check, not a pass.
    if !asyncua_available() {
        panic!("python3 module asyncua missing: pip install asyncua==2.1.0 (scripts/test.sh does)");
    }
    let port = kip_tests::free_port();
    let mut py = Command::new("python3")
        .args(["-c", SERVER_PY, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(py.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, stdout.next_line()).await;
    assert!(
        matches!(ready, Ok(Ok(Some(ref l))) if l == "ready"),
        "asyncua server did not start: {ready:?}"
    );
    let mut stdin = py.stdin.take().unwrap();

    let pki_dir = tempfile::tempdir().unwrap();
    let pki = pki_dir.path().to_path_buf();
    let node = |name: &str, metric: &str| OpcUaNodeConfig {
        node_id: format!("ns=2;s=Machine1.{name}"),
        machine: "m1".into(),
        metric: metric.into(),
        sampling_interval_ms: Some(50),
    };
    let cfg = OpcUaEndpointConfig {
        name: "py".into(),
        url: format!("opc.tcp://127.0.0.1:{port}/"),
        security_policy: OpcUaSecurityPolicy::None,
        pki_dir: pki.clone(),
        application_uri: None,
        trust_server_certs: vec![],
        publishing_interval_ms: 100,
        reconnect_min_ms: 100,
        reconnect_max_ms: 1000,
        reconnect_probe_interval_ms: 0,
        failover_urls: Vec::new(),
        nodes: vec![
            node("Temp", "temp"),
            node("Count", "count"),
            node("Running", "running"),
        ],
        user_identity: Default::default(),
    };
    cfg.validate().unwrap();
    let mut registry = Registry::default();
    let source = OpcUaSource::new(cfg, &mut registry);
    let (tx, mut rx) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(source.run(tx, cancel.clone()));
    tracker.close();

    let mut seen = Vec::new();
    let mut wait_for = async |what: &str, done: &dyn Fn(&[Record]) -> bool| {
        let r = tokio::time::timeout(WAIT, async {
            while !done(&seen) {
                seen.push(rx.recv().await.expect("source stopped").record);
            }
        })
        .await;
        assert!(r.is_ok(), "timed out waiting for {what}: {seen:#?}");
    };
    wait_for("initial values", &|s| {
        has_reading(s, "temp", 1.5)
            && has_reading(s, "count", 3.0)
            && has_reading(s, "running", 1.0)
    })
    .await;
    stdin
        .write_all(b"Temp 42.25\nCount -7\nRunning false\n")
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    wait_for("written values", &|s| {
        has_reading(s, "temp", 42.25)
            && has_reading(s, "count", -7.0)
            && has_reading(s, "running", 0.0)
    })
    .await;

    cancel.cancel();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
    drop(stdin);
    let _ = py.kill().await;
}
