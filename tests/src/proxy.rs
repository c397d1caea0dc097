//! A TCP proxy in front of a server whose link a test can cut ([`Link`]): forward, refuse
//! (close every connection), or blackhole (hold connections, forward nothing). It counts the
//! connections it accepted, the positive signal that a client tried again while the link was
//! down. Stopped on drop.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::TcpStream, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Forward both ways.
    Up,
    /// Close every connection at once (connection refused/reset).
    Drop,
    /// Accept and keep connections but forward nothing (a silent network).
    Blackhole,
}

/// A TCP proxy in front of `upstream` whose link can be cut.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    tracker: TaskTracker,
    stop: CancellationToken,
    accepted: Arc<AtomicU64>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn hold_until_up(mut link: watch::Receiver<Link>, stop: CancellationToken) {
    tokio::select! {
        _ = link.wait_for(|l| *l != Link::Blackhole) => {}
        () = stop.cancelled() => {}
    }
}

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
    stop: CancellationToken,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        _ = link.wait_for(|l| *l != Link::Up) => {}
        () = stop.cancelled() => return,
    }
    if *link.borrow() == Link::Blackhole {
        // Keep both sockets open, forwarding nothing, until the link changes.
        hold_until_up(link, stop).await;
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, rx) = watch::channel(Link::Up);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let t = tracker.clone();
        let s = stop.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tracker.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = s.cancelled() => return,
                };
                let Ok((sock, _)) = accepted else { continue };
                counter.fetch_add(1, Ordering::Relaxed);
                let mode = *rx.borrow();
                match mode {
                    Link::Drop => drop(sock),
                    Link::Blackhole => {
                        let (rx, s) = (rx.clone(), s.clone());
                        t.spawn(async move {
                            let _sock = sock;
                            hold_until_up(rx, s).await;
                        });
                    }
                    Link::Up => {
                        t.spawn(pipe(sock, upstream, rx.clone(), s.clone()));
                    }
                }
            }
        });
        Self {
            addr,
            link,
            tracker,
            stop,
            accepted,
        }
    }

    /// Stops the proxy and waits until every connection it held is closed.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Connections accepted so far, whatever the link did with them.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Changes what the proxy does; open connections follow at once.
    pub fn set(&self, l: Link) {
        self.link.send_replace(l);
    }

    /// Cuts the link: [`Link::Drop`].
    pub fn cut(&self) {
        self.set(Link::Drop);
    }

    /// Restores the link: [`Link::Up`].
    pub fn restore(&self) {
        self.set(Link::Up);
    }

    /// `https://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}
