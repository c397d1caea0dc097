//! OPC UA at scale (issue #17): one endpoint with `OPCUA_BENCH_ITEMS` (default 20,000)
//! monitored items. A Python `asyncua` (PyPI 2.1.0) server holds that many Double variables
//! and rewrites all of them in a loop as fast as it can, counting its own writes (every write
//! is one data change it has to send: the reference); the real `kip-agent` binary (bench
//! profile, its own process, default buffer, no sync endpoint) subscribes to every variable.
//! Figures, no assertions:
//! - time from the agent's start to every item's initial value in its buffer (session, node
//!   check, subscriptions and monitored items created in chunks), while the server is idle
//!   (it starts rewriting only once the agent and the peer have every item: a one-threaded
//!   Python server busy rewriting 20,000 variables answered set-up so slowly that the peer's
//!   CreateMonitoredItems timed out);
//! - over `OPCUA_BENCH_SECONDS` (default 20) after that: value changes/s the server wrote, values/s
//!   that reached the agent's buffer (`kip_agent_buffer_records`), notifications the agent
//!   dropped (`kip_opcua_notifications_dropped`), and the agent's RSS (start, peak, end).
//!
//! Run: `cargo bench -p kip-agent --bench opcua_scale` (needs `python3` with `asyncua`, which
//! `scripts/test.sh` installs). The server, the agent and this process share the machine's
//! cores; the server's write rate is measured in the same run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "bench binary"
)]

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kip_tests::{ChildGroup, free_port};

/// The server: `argv[1]` port, `argv[2]` variables `ns=2;s=v{i}` (Double). Prints `ready`
/// when it listens, then rewrites every variable in a loop. Every 0.25 s it prints
/// `stats <monotonic s> <writes>` and, per session, a tab, `<session name>=<queued>,<discarded>,<published>`
/// (cumulative): data changes queued for the session's monitored items, queued changes the
/// server discarded because an item's queue (size 10) was full before a publish took them, and
/// data changes the server put into publish responses to that session. Counted inside asyncua
/// (patched `InternalSubscription._enqueue_event` and `UaProcessor.forward_publish_response`).
const SERVER_PY: &str = r#"
import asyncio, sys, time
from asyncua import Server, ua
from asyncua.server.internal_subscription import InternalSubscription
from asyncua.server.uaprocessor import UaProcessor

# session id -> [queued, discarded, published]; session id -> name
stats = {}
names = {}

_enqueue = InternalSubscription._enqueue_event
async def enqueue(self, mid, eventdata, size, queue):
    s = stats.setdefault(str(self.session_id), [0, 0, 0])
    s[0] += 1
    if size != 0 and mid in queue and len(queue[mid]) >= size:
        s[1] += 1
    await _enqueue(self, mid, eventdata, size, queue)
InternalSubscription._enqueue_event = enqueue

# The client's SessionName per session id (asyncua names an InternalSession after the peer's
# address, so `session.name` cannot tell the agent from the peer).
from asyncua.server.internal_session import InternalSession
_create = InternalSession.create_session
async def create_session(self, params, sockname=None):
    names[str(self.session_id)] = params.SessionName or "?"
    return await _create(self, params, sockname)
InternalSession.create_session = create_session

_forward = UaProcessor.forward_publish_response
async def forward(self, result, requestdata):
    if self.session is not None:
        n = sum(len(d.MonitoredItems) for d in result.NotificationMessage.NotificationData
                if isinstance(d, ua.DataChangeNotification))
        key = str(self.session.session_id)
        stats.setdefault(key, [0, 0, 0])[2] += n
    await _forward(self, result, requestdata)
UaProcessor.forward_publish_response = forward

writes = 0

async def report():
    while True:
        await asyncio.sleep(0.25)
        by_name = {}
        for key, (q, d, p) in stats.items():
            t = by_name.setdefault(names.get(key, "?"), [0, 0, 0])
            t[0] += q; t[1] += d; t[2] += p
        parts = "".join(f"\t{n}={q},{d},{p}" for n, (q, d, p) in by_name.items())
        print(f"stats {time.monotonic()} {writes}{parts}", flush=True)

async def main(port, n):
    global writes
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:kip:bench:asyncua")
    assert idx == 2, idx
    ids = []
    # 100 variables per object: adding a child costs time proportional to the parent's
    # children, so 20,000 under one object take many minutes.
    for i in range(n):
        if i % 100 == 0:
            obj = await server.nodes.objects.add_object(ua.NodeId(f"m{i // 100}", idx), ua.QualifiedName(f"m{i // 100}", idx))
        v = await obj.add_variable(ua.NodeId(f"v{i}", idx), ua.QualifiedName(f"v{i}", idx), ua.Variant(0.0, ua.VariantType.Double))
        ids.append(v.nodeid)
    async with server:
        print("ready", flush=True)
        reporter = asyncio.create_task(report())
        # No writes until the bench says `go` (once the agent and the peer have every item):
        # with 20,000 variables rewritten in a loop this one-threaded server answers set-up
        # requests so slowly that the Python client's CreateMonitoredItems timed out.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        k = 0
        while True:
            k += 1
            for j, nid in enumerate(ids):
                await server.write_attribute_value(nid, ua.DataValue(ua.Variant(float(k), ua.VariantType.Double)))
                writes += 1
                if j % 500 == 499:
                    # Let the server publish while it writes.
                    await asyncio.sleep(0)
            await asyncio.sleep(0)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"#;

/// The independent peer: a Python `asyncua` client in its own process subscribing to the same
/// variables (`argv[1]` port, `argv[2]` count; one subscription, 100 ms, items created 1,000
/// per call, queue size 10 like the agent's). Python's client keeps one publish request in
/// flight, so it takes one subscription (the asyncua server puts every queued change of a
/// subscription into one response). Prints `subscribed` once the items exist, then
/// `peer <monotonic s> <received>` every 0.25 s: data changes decoded from publish responses.
const PEER_PY: &str = r#"
import asyncio, sys, time
from asyncua import Client, ua
from asyncua.common.subscription import Subscription

received = 0

async def count(self, publish_result):
    global received
    for d in publish_result.NotificationMessage.NotificationData or []:
        if isinstance(d, ua.DataChangeNotification):
            received += len(d.MonitoredItems)
Subscription.publish_callback = count

async def main(port, n):
    # The watchdog (a server-state read every second by default) timed out while the server
    # created the agent's 20,000 monitored items and disconnected the client mid set-up.
    client = Client(f"opc.tcp://127.0.0.1:{port}/", timeout=120, watchdog_intervall=600)
    client.description = "bench-peer"
    async with client:
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=100, RequestedLifetimeCount=300,
            RequestedMaxKeepAliveCount=10, MaxNotificationsPerPublish=0,
            PublishingEnabled=True, Priority=0)
        sub = await client.create_subscription(params, None)
        for start in range(0, n, 1000):
            nodes = [client.get_node(ua.NodeId(f"v{i}", 2)) for i in range(start, min(n, start + 1000))]
            await sub.subscribe_data_change(nodes, queuesize=10, sampling_interval=0.0)
        print("subscribed", flush=True)
        while True:
            await asyncio.sleep(0.25)
            print(f"peer {time.monotonic()} {received}", flush=True)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"#;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The sum of all samples of `name` (or `name_total`; any labels) on the agent's `/metrics`.
/// Only outside the measured window: with 20,000 items the page has over 40,000 series.
fn metric_sum(port: u16, name: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout);
    let total = format!("{name}_total");
    let mut found = None;
    for l in body.lines() {
        let Some(token) = l.split(['{', ' ']).next() else {
            continue;
        };
        if l.starts_with('#') || !(token == name || token == total) {
            continue;
        }
        if let Some(v) = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Readings in the agent's buffer, from its small `/v1/status` report.
fn buffered_readings(port: u16) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/v1/status")])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["buffer"]["counts"]["reading"].as_u64()
}

/// Server-side counts for one kind of session (cumulative).
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    queued: u64,
    discarded: u64,
    published: u64,
}

/// The server's latest `stats` line.
#[derive(Debug, Default, Clone, Copy)]
struct ServerStats {
    /// The server's monotonic clock, seconds.
    at: f64,
    writes: u64,
    /// Sessions named `kip-agent ...`.
    agent: Counts,
    /// The other sessions (the peer).
    peer: Counts,
}

fn parse_stats(line: &str) -> Option<ServerStats> {
    let mut fields = line.strip_prefix("stats ")?.split('\t');
    let mut head = fields.next()?.split_whitespace();
    let mut s = ServerStats {
        at: head.next()?.parse().ok()?,
        writes: head.next()?.parse().ok()?,
        ..ServerStats::default()
    };
    for f in fields {
        let (name, counts) = f.rsplit_once('=')?;
        let mut n = counts.split(',').map(|v| v.parse::<u64>().ok());
        let (q, d, p) = (n.next()??, n.next()??, n.next()??);
        let c = if name.starts_with("kip-agent") {
            &mut s.agent
        } else {
            &mut s.peer
        };
        c.queued += q;
        c.discarded += d;
        c.published += p;
    }
    Some(s)
}

/// Rate per second of `b - a` over `secs`.
fn rate(a: u64, b: u64, secs: f64) -> f64 {
    b.saturating_sub(a) as f64 / secs.max(1e-9)
}

fn main() {
    let items = env_num("OPCUA_BENCH_ITEMS", 20_000);
    let secs = env_num("OPCUA_BENCH_SECONDS", 20);
    let mut with_peer = env_num("OPCUA_BENCH_PEER", 1) != 0;
    let dir = tempfile::tempdir().unwrap();
    let opc_port = free_port();
    let mut py = ChildGroup::spawn(
        Command::new("python3")
            .args(["-c", SERVER_PY, &opc_port.to_string(), &items.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .unwrap();
    let server_pid = py.id();
    let mut server_go = py.child_mut().stdin.take().unwrap();
    let mut lines = BufReader::new(py.child_mut().stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    println!(
        "asyncua server: {items} variables created in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let server = Arc::new(Mutex::new(ServerStats::default()));
    let s = server.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if let Some(st) = parse_stats(&l) {
                *s.lock().unwrap() = st;
            }
        }
    });

    // The peer and the agent start together.
    let peer_started = Instant::now();
    let peer_received = Arc::new(Mutex::new((0.0f64, 0u64)));
    let peer_subscribed = Arc::new(Mutex::new(None::<Duration>));
    let mut peer = None;
    if with_peer {
        let mut child = ChildGroup::spawn(
            Command::new("python3")
                .args(["-c", PEER_PY, &opc_port.to_string(), &items.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )
        .unwrap();
        let out = BufReader::new(child.child_mut().stdout.take().unwrap()).lines();
        let (r, sub) = (peer_received.clone(), peer_subscribed.clone());
        std::thread::spawn(move || {
            for l in out.map_while(Result::ok) {
                if l == "subscribed" {
                    *sub.lock().unwrap() = Some(peer_started.elapsed());
                } else if let Some(rest) = l.strip_prefix("peer ") {
                    let mut f = rest.split_whitespace();
                    if let (Some(Ok(at)), Some(Ok(n))) = (
                        f.next().map(str::parse::<f64>),
                        f.next().map(str::parse::<u64>),
                    ) {
                        *r.lock().unwrap() = (at, n);
                    }
                }
            }
        });
        peer = Some(child);
    }

    let http_port = free_port();
    let mut cfg = format!(
        "[agent]\ndevice = \"gw-bench\"\nstate_dir = \"{}\"\n\
         [buffer]\nmax_bytes = {}\n\
         [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
         [log]\nfilter = \"warn\"\n\
         [[opcua]]\nname = \"py\"\nurl = \"opc.tcp://127.0.0.1:{opc_port}/\"\n\
         security_policy = \"none\"\npki_dir = \"{}\"\npublishing_interval_ms = 100\n",
        dir.path().join("state").display(),
        4u64 << 30,
        dir.path().join("pki").display(),
    );
    for i in 0..items {
        write!(
            cfg,
            "[[opcua.nodes]]\nnode_id = \"ns=2;s=v{i}\"\nmachine = \"m{}\"\nmetric = \"v{i}\"\n",
            i / 100
        )
        .unwrap();
    }
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, cfg).unwrap();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let agent = ChildGroup::spawn(
        Command::new(env!("CARGO_BIN_EXE_kip-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap();
    let pid = agent.id();
    let records = || buffered_readings(http_port).unwrap_or(0);
    let rss_start = loop {
        let r = rss_kib(pid);
        if r > 0 {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut peak = rss_start;
    // Every item's initial value (or more) is in the agent's buffer, and the peer has them.
    let mut agent_ready = None;
    let mut peer_ready = None;
    loop {
        peak = peak.max(rss_kib(pid));
        if agent_ready.is_none() && records() >= items {
            agent_ready = Some(started.elapsed());
        }
        if peer_ready.is_none() && (!with_peer || peer_received.lock().unwrap().1 >= items) {
            peer_ready = Some(peer_started.elapsed());
        }
        // A peer that died (e.g. its CreateMonitoredItems timed out) must not hold up the run.
        if peer_ready.is_none()
            && let Some(p) = peer.as_mut()
            && let Ok(Some(status)) = p.try_wait()
        {
            println!("peer (Python asyncua client) exited ({status}); no peer figures this run");
            peer_ready = Some(peer_started.elapsed());
            with_peer = false;
        }
        if agent_ready.is_some() && peer_ready.is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "after 600 s: agent {} of {items} initial values, peer {}; agent log: {}",
            records(),
            peer_received.lock().unwrap().1,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let agent_ready = agent_ready.unwrap_or_default();
    println!(
        "kip-agent: {items} monitored items, every initial value in its buffer {:.2} s after \
         start (RSS at start {:.1} MiB)",
        agent_ready.as_secs_f64(),
        rss_start as f64 / 1024.0
    );
    if with_peer {
        println!(
            "peer (Python asyncua client): items created {:.2} s, every initial value received \
             {:.2} s after start",
            peer_subscribed
                .lock()
                .unwrap()
                .unwrap_or_default()
                .as_secs_f64(),
            peer_ready.unwrap_or_default().as_secs_f64()
        );
    }
    // Now the server rewrites; the window starts once it has written every variable once.
    {
        use std::io::Write as _;
        writeln!(server_go, "go").unwrap();
        server_go.flush().unwrap();
    }
    let go = Instant::now();
    while server.lock().unwrap().writes < items {
        assert!(
            go.elapsed() < Duration::from_secs(120),
            "the server does not write"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dropped0 = metric_sum(http_port, "kip_opcua_notifications_dropped").unwrap_or(0.0) as u64;
    let (r0, s0, p0, t0) = (
        records(),
        *server.lock().unwrap(),
        *peer_received.lock().unwrap(),
        Instant::now(),
    );
    let mut rss_sum = 0u64;
    let mut samples = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        let r = rss_kib(pid);
        peak = peak.max(r);
        rss_sum += r;
        samples += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    let (r1, s1, p1, el) = (
        records(),
        *server.lock().unwrap(),
        *peer_received.lock().unwrap(),
        t0.elapsed().as_secs_f64(),
    );
    let rss_end = rss_kib(pid);
    let dropped1 = metric_sum(http_port, "kip_opcua_notifications_dropped").unwrap_or(0.0) as u64;
    let sel = s1.at - s0.at;
    let agent_rate = rate(r0, r1, el);
    let published = rate(s0.agent.published, s1.agent.published, sel);
    println!(
        "over {el:.1} s: server wrote {:.0} value changes/s; for the agent's session it queued \
         {:.0}/s, discarded {:.0}/s from full item queues and published {published:.0}/s \
         (reference); agent buffered {agent_rate:.0} readings/s = {:.2}x of what the server \
         published to it; notifications dropped by the agent: {}",
        rate(s0.writes, s1.writes, sel),
        rate(s0.agent.queued, s1.agent.queued, sel),
        rate(s0.agent.discarded, s1.agent.discarded, sel),
        agent_rate / published.max(1.0),
        dropped1.saturating_sub(dropped0),
    );
    if with_peer {
        let peer_rate = rate(p0.1, p1.1, p1.0 - p0.0);
        println!(
            "independent peer (Python asyncua client, same run): server queued {:.0}/s, \
             discarded {:.0}/s and published {:.0}/s for it; it received {peer_rate:.0} values/s; \
             agent/peer {:.2}x",
            rate(s0.peer.queued, s1.peer.queued, sel),
            rate(s0.peer.discarded, s1.peer.discarded, sel),
            rate(s0.peer.published, s1.peer.published, sel),
            agent_rate / peer_rate.max(1.0),
        );
    }
    println!(
        "kip-agent RSS: mean {:.1} MiB, peak {:.1} MiB, end {:.1} MiB ({} readings buffered); \
         server RSS {:.1} MiB",
        rss_sum as f64 / samples.max(1) as f64 / 1024.0,
        peak as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        r1,
        rss_kib(server_pid) as f64 / 1024.0
    );
    drop(agent);
    drop(peer);
    drop(py);
}
