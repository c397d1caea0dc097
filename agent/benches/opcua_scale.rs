//! OPC UA at scale (issue #17): one endpoint with `OPCUA_BENCH_ITEMS` (default 20,000)
//! monitored items. A Python `asyncua` (PyPI 2.1.0) server holds that many Double variables
//! and rewrites all of them in a loop as fast as it can, counting its own writes (every write
//! is one data change it has to send: the reference); the real `kip-agent` binary (bench
//! profile, its own process, default buffer, no sync endpoint) subscribes to every variable.
//! Figures, no assertions:
//! - time from the agent's start to every item's initial value in its buffer (session, node
//!   check, subscriptions and monitored items created in chunks);
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
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kip_tests::{ChildGroup, free_port};

/// The server: `argv[1]` port, `argv[2]` variables `ns=2;s=v{i}` (Double). Prints `ready`
/// when it listens, then `writes N` after every round over all variables (cumulative).
const SERVER_PY: &str = r#"
import asyncio, sys, time
from asyncua import Server, ua

async def main(port, n):
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
        writes = 0
        k = 0
        while True:
            k += 1
            for j, nid in enumerate(ids):
                await server.write_attribute_value(nid, ua.DataValue(ua.Variant(float(k), ua.VariantType.Double)))
                writes += 1
                if j % 500 == 499:
                    # Let the server publish while it writes.
                    await asyncio.sleep(0)
            print(f"writes {writes} {time.monotonic()}", flush=True)
            await asyncio.sleep(0)

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

/// The value of the first sample of `name` (or `name_total`; any labels) on the agent's
/// `/metrics`.
fn metric(port: u16, name: &str) -> Option<f64> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&out.stdout);
    let total = format!("{name}_total");
    body.lines().find_map(|l| {
        let token = l.split(['{', ' ']).next()?;
        if l.starts_with('#') || !(token == name || token == total) {
            return None;
        }
        l.rsplit(' ').next()?.trim().parse().ok()
    })
}

fn main() {
    let items = env_num("OPCUA_BENCH_ITEMS", 20_000);
    let secs = env_num("OPCUA_BENCH_SECONDS", 20);
    let dir = tempfile::tempdir().unwrap();
    let opc_port = free_port();
    let mut py = Command::new("python3")
        .args(["-c", SERVER_PY, &opc_port.to_string(), &items.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server_pid = py.id();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let t0 = Instant::now();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    println!(
        "asyncua server: {items} variables created in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // The server's cumulative write count, from its stdout.
    let writes = Arc::new(AtomicU64::new(0));
    let w = writes.clone();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if let Some(n) = l
                .strip_prefix("writes ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
            {
                w.store(n, Ordering::Relaxed);
            }
        }
    });

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
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
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
    let records = || metric(http_port, "kip_agent_buffer_records").unwrap_or(0.0) as u64;
    let dropped = || metric(http_port, "kip_opcua_notifications_dropped").unwrap_or(0.0) as u64;
    let rss_start = loop {
        let r = rss_kib(pid);
        if r > 0 {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut peak = rss_start;
    // Every item's initial value (or more) is in the buffer.
    loop {
        peak = peak.max(rss_kib(pid));
        if records() >= items {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {} of {items} initial values after 300 s; agent log: {}",
            records(),
            std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let subscribed = started.elapsed();
    println!(
        "kip-agent: {items} monitored items subscribed, initial values in the buffer {:.2} s \
         after start (RSS at start {:.1} MiB)",
        subscribed.as_secs_f64(),
        rss_start as f64 / 1024.0
    );
    let (r0, w0, d0, t0) = (
        records(),
        writes.load(Ordering::Relaxed),
        dropped(),
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
    let (r1, w1, d1, el) = (
        records(),
        writes.load(Ordering::Relaxed),
        dropped(),
        t0.elapsed().as_secs_f64(),
    );
    let rss_end = rss_kib(pid);
    let server_rate = (w1 - w0) as f64 / el;
    let agent_rate = (r1 - r0) as f64 / el;
    println!(
        "over {el:.1} s: server wrote {server_rate:.0} value changes/s (reference); agent buffered \
         {agent_rate:.0} values/s ({:.2}x); notifications dropped by the agent: {}",
        agent_rate / server_rate.max(1.0),
        d1 - d0
    );
    println!(
        "kip-agent RSS: mean {:.1} MiB, peak {:.1} MiB, end {:.1} MiB ({} records buffered); \
         server RSS {:.1} MiB",
        rss_sum as f64 / samples.max(1) as f64 / 1024.0,
        peak as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        r1,
        rss_kib(server_pid) as f64 / 1024.0
    );
    drop(agent);
    let _ = py.kill();
    let _ = py.wait();
}
