//! [`Supervisor`]: restarts a command whenever it exits, as systemd's `Restart=always` would,
//! for tests of the agent's self-update (the agent exits to be restarted into a new version,
//! a broken version crashes until the launcher rolls it back). Each run is a [`ChildGroup`];
//! [`Supervisor::kill9`] kills the current run like a power loss, and the supervisor starts
//! the next one. Dropping it stops the loop and the current run.

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::ChildGroup;

/// Pause between an exit and the next start (systemd's `RestartSec`).
pub const RESTART_PAUSE: Duration = Duration::from_millis(200);

/// How one run ended: its exit code, or `None` when a signal ended it.
pub type Exit = Option<i32>;

#[derive(Debug)]
struct Shared {
    current: Mutex<Option<ChildGroup>>,
    exits: Mutex<Vec<Exit>>,
    stop: AtomicBool,
}

/// A command restarted after every exit, on a thread of its own.
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts `command()` now and again after every exit.
    pub fn start(mut command: impl FnMut() -> Command + Send + 'static) -> Self {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            exits: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                let child = ChildGroup::spawn(&mut command())
                    .unwrap_or_else(|e| panic!("supervisor cannot start its command: {e}"));
                *s.current.lock().unwrap() = Some(child);
                loop {
                    if s.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let status = s
                        .current
                        .lock()
                        .unwrap()
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten());
                    if let Some(status) = status {
                        s.exits.lock().unwrap().push(status.code());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(RESTART_PAUSE);
            }
        });
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// SIGKILL to the current run (a power loss for it); the supervisor starts the next.
    pub fn kill9(&self) {
        if let Some(c) = self.shared.current.lock().unwrap().as_mut() {
            c.kill9();
        }
    }

    /// SIGTERM to the current run (a normal stop, as `systemctl restart` sends), SIGKILL
    /// after the group's grace; returns once it exited. The supervisor starts the next.
    pub fn terminate(&self) {
        if let Some(c) = self.shared.current.lock().unwrap().as_mut() {
            c.terminate();
        }
    }

    /// How every run so far ended, oldest first.
    pub fn exits(&self) -> Vec<Exit> {
        self.shared.exits.lock().unwrap().clone()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Dropping the last run's group stops it (SIGTERM, then SIGKILL).
        if let Ok(mut c) = self.shared.current.lock() {
            c.take();
        }
    }
}
