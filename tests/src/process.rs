//! [`ChildGroup`]: a child process started in its own process group and stopped as a group.
//!
//! Servers such as MLflow fork workers; killing only the direct child leaves them running
//! (orphans that hold ports and memory after the test). A [`ChildGroup`] starts the child with
//! `process_group(0)`, so the child and everything it forks share one process group, and on
//! drop it signals the whole group: SIGTERM, a grace period, then SIGKILL.
//!
//! Limits: a grandchild that calls `setsid`/`setpgid` leaves the group and is not reached;
//! a test process killed with SIGKILL runs no `Drop` (the survivor check at the end of
//! `scripts/test.sh` catches both).

use std::{
    io,
    os::unix::process::CommandExt as _,
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use rustix::process::{Pid, Signal, kill_process_group};

/// How long [`ChildGroup`]'s drop waits after SIGTERM before SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A child process that leads its own process group; the group is stopped on drop.
#[derive(Debug)]
pub struct ChildGroup {
    child: Child,
    pgid: Pid,
    name: String,
    grace: Duration,
    stopped: bool,
}

impl ChildGroup {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let name = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.process_group(0).spawn()?;
        let pgid = Pid::from_child(&child);
        Ok(Self {
            child,
            pgid,
            name,
            grace: DEFAULT_GRACE,
            stopped: false,
        })
    }

    /// Sets how long [`terminate`](Self::terminate) and drop wait after SIGTERM.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The leader's pid (= the process group id).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child itself, e.g. to take its stdin or stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The leader's exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// SIGKILL to the whole group, like a crash: no cleanup, no flush. Waits for the leader.
    pub fn kill9(&mut self) {
        let _ = kill_process_group(self.pgid, Signal::KILL);
        let _ = self.child.wait();
        self.stopped = true;
    }

    /// SIGTERM to the whole group; after the grace period SIGKILL. Returns once the leader
    /// has exited and no member of the group is left (or the grace after SIGKILL passed).
    pub fn terminate(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = kill_process_group(self.pgid, Signal::TERM);
        if self.wait_group(self.grace) {
            return;
        }
        tracing_free_warn(&self.name, self.pgid, self.grace);
        let _ = kill_process_group(self.pgid, Signal::KILL);
        let _ = self.child.wait();
        self.wait_group(Duration::from_secs(2));
    }

    /// Waits until the leader is reaped and the group is empty; `false` on timeout.
    fn wait_group(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let leader_gone = !matches!(self.child.try_wait(), Ok(None));
            if leader_gone && live_members(self.child.id()).is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Pids of the processes in group `pgid` that are not zombies (from `/proc`). Zombies are
/// dead already; whether they are reaped depends on their parent (or on PID 1 in a container).
pub fn live_members(pgid: u32) -> Vec<i32> {
    let Ok(pgid) = i32::try_from(pgid) else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // Fields after the command name (which may contain spaces): state ppid pgrp ...
            let mut rest = stat
                .rsplit_once(')')
                .map(|(_, r)| r)
                .unwrap_or("")
                .split_whitespace();
            let state = rest.next();
            let pgrp = rest.nth(1).and_then(|g| g.parse::<i32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

/// Says on stderr that a group needed SIGKILL (the test output shows it; not an error).
fn tracing_free_warn(name: &str, pgid: Pid, grace: Duration) {
    eprintln!(
        "kip-tests: {name} (process group {}) still running {grace:?} after SIGTERM: SIGKILL",
        pgid.as_raw_nonzero()
    );
}

impl Drop for ChildGroup {
    fn drop(&mut self) {
        self.terminate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_stops_the_children_the_child_forked() {
        // The shell forks a sleeper that would outlive a plain `kill` of the shell.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(std::process::Stdio::piped());
        let mut group = ChildGroup::spawn(&mut cmd).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(group.child_mut().stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let sleeper: i32 = line.trim().parse().unwrap();
        let pgid = group.id();
        assert!(
            live_members(pgid).contains(&sleeper),
            "{:?}",
            live_members(pgid)
        );
        drop(group);
        // Drop returns only once no live member is left, the forked sleeper included.
        assert_eq!(live_members(pgid), Vec::<i32>::new());
    }
}
