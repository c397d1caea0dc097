//! [`Mosquitto`]: a private broker per test, with its own config file on its own free port.
//!
//! The broker is ready (accepts TCP) when [`Mosquitto::start`] returns and is stopped (process
//! group, see [`crate::ChildGroup`]) on drop. With [`Mosquitto::start_tls`] its one listener
//! is TLS with `require_certificate true` against a [`BrokerPki`].

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{BrokerPki, ChildGroup, free_port, wait_for_port};

/// How long a broker may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A Mosquitto process with its own config on its own loopback port.
#[derive(Debug)]
pub struct Mosquitto {
    /// The listener's port on 127.0.0.1.
    pub port: u16,
    conf: PathBuf,
    child: Option<ChildGroup>,
}

impl Mosquitto {
    /// Starts `mosquitto -c` with the config file written to `dir`; `listener_conf` holds the
    /// lines after `listener PORT 127.0.0.1` (Mosquitto 2 refuses anonymous clients unless
    /// they include `allow_anonymous true`).
    pub fn start(dir: &Path, listener_conf: &str) -> Self {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings true\npersistence false\nlog_dest stderr\n\
                 listener {port} 127.0.0.1\n{listener_conf}\n"
            ),
        )
        .unwrap();
        crate::certs::make_readable(&conf);
        let mut m = Self {
            port,
            conf,
            child: None,
        };
        m.restart();
        m
    }

    /// A broker whose listener accepts anonymous clients without TLS.
    pub fn start_plain(dir: &Path) -> Self {
        Self::start(dir, "allow_anonymous true\n")
    }

    /// A broker whose listener requires TLS with a client certificate of `pki`'s CA.
    pub fn start_tls(dir: &Path, pki: &BrokerPki) -> Self {
        Self::start(dir, &pki.listener_conf())
    }

    /// `mqtt://` or `mqtts://` URL of the listener.
    pub fn url(&self, tls: bool) -> String {
        let scheme = if tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (its clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.terminate();
        }
    }

    /// (Re)starts the broker on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut child = ChildGroup::spawn(
                Command::new("mosquitto")
                    .arg("-c")
                    .arg(&self.conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto ({e}): install it (apt-get install mosquitto)")
            })
            .with_grace(Duration::from_secs(2));
            while Instant::now() < deadline {
                if wait_for_port(self.port, Duration::ZERO) {
                    self.child = Some(child);
                    return;
                }
                if child.try_wait().ok().flatten().is_some() {
                    // The port may still be held by the previous instance: try again.
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on port {} within {START_TIMEOUT:?} (config {})",
                self.port,
                self.conf.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Publishes one QoS 1 message with `mosquitto_pub` (an independent client); with `tls` it
/// connects with `pki`'s client certificate.
pub fn publish(port: u16, topic: &str, payload: &[u8], tls: Option<&BrokerPki>) {
    mosquitto_pub(port, topic, payload, tls, false, "-s");
}

/// [`publish`] without TLS, as a retained message (it reaches every later subscription).
pub fn publish_retained(port: u16, topic: &str, payload: &[u8]) {
    mosquitto_pub(port, topic, payload, None, true, "-s");
}

/// Publishes each of `payloads` as one QoS 1 message on `topic` (no TLS), in order, from one
/// `mosquitto_pub -l` connection; returns once it exited successfully.
pub fn publish_lines(port: u16, topic: &str, payloads: &[String]) {
    let mut lines = payloads.join("\n");
    lines.push('\n');
    mosquitto_pub(port, topic, lines.as_bytes(), None, false, "-l");
}

fn mosquitto_pub(
    port: u16,
    topic: &str,
    payload: &[u8],
    tls: Option<&BrokerPki>,
    retain: bool,
    input: &str,
) {
    use std::io::Write as _;
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        input,
    ]);
    if retain {
        cmd.arg("-r");
    }
    if let Some(p) = tls {
        cmd.arg("--cafile").arg(&p.ca);
        cmd.arg("--cert").arg(&p.client_cert);
        cmd.arg("--key").arg(&p.client_key);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run mosquitto_pub ({e}): apt-get install mosquitto-clients")
        });
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes `messages` (topic, payload) as QoS 1 at full speed from one connection, in order,
/// and returns the number of PUBACKs once the broker acknowledged every one (counted here,
/// not trusted from a tool's exit code). Panics after 120 s or on a connection error.
pub async fn publish_all(port: u16, messages: Vec<(String, Vec<u8>)>) -> u64 {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let mut opts = MqttOptions::new(
        format!("kip-test-pub-{}", uuid::Uuid::new_v4().simple()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(1000);
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let want = messages.len() as u64;
    let acks = Arc::new(AtomicU64::new(0));
    let counter = acks.clone();
    let tracker = tokio_util::task::TaskTracker::new();
    let poller = tracker.spawn(async move {
        while counter.load(Ordering::Relaxed) < want {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
        }
        eventloop
    });
    for (topic, payload) in messages {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let mut eventloop = tokio::time::timeout(Duration::from_secs(120), poller)
        .await
        .expect("the broker did not acknowledge every message in 120 s")
        .unwrap();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    acks.load(Ordering::Relaxed)
}

/// `mosquitto_sub` (mosquitto-clients) subscribed at QoS 1 to `topic` on the broker at `port`;
/// with `session`, as the persistent session of that client id (`-i ID -c`). The caller adds
/// when to stop (`-E`, or `-C N -W S`) and where the output goes.
pub fn mosquitto_sub(port: u16, topic: &str, session: Option<&str>) -> Command {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"]);
    if let Some(id) = session {
        cmd.args(["-i", id, "-c"]);
    }
    cmd.args(["-t", topic]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_broker_accepts_connections_and_stops_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let pki = BrokerPki::generate(dir.path());
        let broker = Mosquitto::start_tls(dir.path(), &pki);
        let port = broker.port;
        publish(port, "t/1", b"42", Some(&pki));
        drop(broker);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
