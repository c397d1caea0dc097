//! Free loopback ports, and waiting for a port to accept connections.
//!
//! A port from [`free_port`] is free when returned; another process may take it before the
//! caller binds it. Fixtures that start a server on it wait for it with [`wait_for_port`] and
//! check that their own child is still alive (see [`crate::Mosquitto`]). In-process servers
//! should bind `127.0.0.1:0` themselves instead.

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

/// Blocks until something accepts TCP connections on `127.0.0.1:port`; `false` after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
