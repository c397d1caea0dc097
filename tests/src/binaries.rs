//! The workspace's binaries as child processes, for tests that kill and restart them:
//! [`ControlPlaneProcess`] (`kip-control-plane` on a fixed database, ports and folder, so a
//! restarted process takes over where a killed one stopped) and [`spawn_agent`]
//! (`kip-agent run`).
//!
//! Both return once the process listens, and start it again when it exited at start-up (a
//! port, or the agent buffer's lock, of a process killed a moment ago may not be free yet).
//! The binaries come from [`workspace_binary`] (never stale); children are [`ChildGroup`]s,
//! stopped as a group on drop.

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use kip_certs::FleetCa;

use crate::{ChildGroup, control_plane::AdminApi, free_port, wait_for_port, workspace_binary};

/// How long a child process may take to listen on its ports (restarts included).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait before starting a process again that exited at start-up.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// The `kip-control-plane` binary on a fixed database, ports and folder.
#[derive(Debug, Clone)]
pub struct ControlPlaneProcess {
    /// The database (the process creates and migrates it at its first start).
    pub db_url: String,
    pub admin_port: u16,
    pub agent_port: u16,
    /// Holds `admin.key` and the fleet CA (`ca/`).
    pub dir: PathBuf,
    /// The file the process's stderr (`ecs`: stdout) is appended to; `None`: the test's
    /// stderr.
    pub log: Option<PathBuf>,
    /// `KIP_LOG_FORMAT` and `KIP_LOG_FILTER` (`text`, `warn` unless [`Self::with_ecs_log`]).
    pub log_format: &'static str,
    pub log_filter: &'static str,
    /// A config file (`--config`), e.g. with `[llm]` or short `[health]` windows; the `KIP_*`
    /// variables above override it. `None`: defaults and env.
    pub config: Option<PathBuf>,
}

impl ControlPlaneProcess {
    /// A control plane on `db_url` with free loopback ports and a fresh fleet CA in `dir/ca`.
    pub fn new(db_url: &str, dir: &Path) -> Self {
        FleetCa::init(&dir.join("ca"), SystemTime::now())
            .unwrap_or_else(|e| panic!("creating a fleet CA in {}: {e}", dir.display()));
        Self {
            db_url: db_url.to_owned(),
            admin_port: free_port(),
            agent_port: free_port(),
            dir: dir.to_owned(),
            log: None,
            log_format: "text",
            log_filter: "warn",
            config: None,
        }
    }

    /// Logs in the `ecs` format at `filter` and appends stdout (where `ecs` lines go) to
    /// `path`; stderr (only non-log output, like a panic) goes to the test's stderr.
    pub fn with_ecs_log(mut self, path: PathBuf, filter: &'static str) -> Self {
        self.log = Some(path);
        self.log_format = "ecs";
        self.log_filter = filter;
        self
    }

    /// Starts the process with `--config PATH` (e.g. short `[health]` windows).
    pub fn with_config(mut self, path: PathBuf) -> Self {
        self.config = Some(path);
        self
    }

    /// Appends the process's stderr to `path` instead of the test's stderr.
    pub fn with_log(mut self, path: PathBuf) -> Self {
        self.log = Some(path);
        self
    }

    /// `http://127.0.0.1:PORT` of the admin API.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// `https://127.0.0.1:PORT` of the mTLS agent listener.
    pub fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    /// The admin API with the platform-admin key the process wrote at its first start.
    pub fn admin_api(&self) -> AdminApi {
        let path = self.dir.join("admin.key");
        let key = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        AdminApi::new(self.admin_url(), key.trim().to_owned())
    }

    /// Starts the process and waits until both ports listen (see the module docs).
    pub fn spawn(&self) -> ChildGroup {
        spawn_until_listening(
            "kip-control-plane",
            &[self.admin_port, self.agent_port],
            || {
                let mut cmd = Command::new(workspace_binary("kip-control-plane"));
                if let Some(config) = &self.config {
                    cmd.arg("--config").arg(config);
                }
                cmd.env("KIP_DATABASE_URL", &self.db_url)
                    .env("KIP_LISTEN_ADDR", format!("127.0.0.1:{}", self.admin_port))
                    .env(
                        "KIP_AGENT_LISTEN_ADDR",
                        format!("127.0.0.1:{}", self.agent_port),
                    )
                    .env("KIP_ADMIN_KEY_FILE", self.dir.join("admin.key"))
                    .env("KIP_PKI_CA_DIR", self.dir.join("ca"))
                    .env("KIP_LOG_FORMAT", self.log_format)
                    .env("KIP_LOG_FILTER", self.log_filter)
                    .stdout(if self.log_format == "ecs" {
                        log_target(self.log.as_deref())
                    } else {
                        Stdio::null()
                    })
                    .stderr(if self.log_format == "ecs" {
                        Stdio::inherit()
                    } else {
                        log_target(self.log.as_deref())
                    });
                cmd
            },
        )
    }
}

/// Starts `kip-agent run --config CONFIG` and waits until its HTTP port listens (see the
/// module docs); its stdout (where `ecs` logs go) and stderr (`text` and `json` logs) are
/// appended to `log` (`None`: discarded).
pub fn spawn_agent(config: &Path, http_port: u16, log: Option<&Path>) -> ChildGroup {
    spawn_until_listening("kip-agent", &[http_port], || {
        let mut cmd = Command::new(workspace_binary("kip-agent"));
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(log.map_or_else(Stdio::null, |p| log_target(Some(p))))
            .stderr(log.map_or_else(Stdio::null, |p| log_target(Some(p))));
        cmd
    })
}

/// `Stdio` appending to `path`; `None`: inherited.
fn log_target(path: Option<&Path>) -> Stdio {
    match path {
        None => Stdio::inherit(),
        Some(p) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(Stdio::from)
            .unwrap_or_else(|e| panic!("opening {}: {e}", p.display())),
    }
}

/// Spawns `command()` until one run listens on every port of `ports` within
/// [`START_TIMEOUT`]; a run that exits first is started again.
fn spawn_until_listening(
    name: &str,
    ports: &[u16],
    mut command: impl FnMut() -> Command,
) -> ChildGroup {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut child = ChildGroup::spawn(&mut command())
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        loop {
            if ports.iter().all(|p| wait_for_port(*p, Duration::ZERO)) {
                return child;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not listen on {ports:?} within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            Instant::now() < deadline,
            "{name} kept exiting at start-up for {START_TIMEOUT:?}"
        );
        std::thread::sleep(RESTART_PAUSE);
    }
}
