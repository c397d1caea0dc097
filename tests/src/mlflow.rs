//! [`MlflowServer`]: a private MLflow tracking server (SQLite backend, served artifacts) on a
//! free port, for the model registry's MLflow mirror.
//!
//! `mlflow server` forks workers (uvicorn/gunicorn and helpers): the server runs as a
//! [`ChildGroup`] so drop stops all of them, not only the Python process that started them.
//! The Python interpreter is `python3`, or `KIP_TEST_PYTHON` when set.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use crate::{ChildGroup, free_port};

/// How long MLflow may take to answer `/health` (about 5 s on an idle machine; over 2 min seen
/// with four servers starting at once on the loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// A running MLflow server; stopped (the whole process group) and its folder removed on drop.
#[derive(Debug)]
pub struct MlflowServer {
    url: String,
    port: u16,
    // Field order: the server stops before its folder is removed.
    _child: ChildGroup,
    _dir: tempfile::TempDir,
}

impl MlflowServer {
    /// Starts `python3 -m mlflow server` and waits until `/health` answers. Panics with what to
    /// install when MLflow is missing, and when it does not come up in time.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = spawn(dir.path(), port);
        let server = Self {
            url: format!("http://127.0.0.1:{port}"),
            port,
            _child: child,
            _dir: dir,
        };
        server.wait_healthy().await;
        server
    }

    async fn wait_healthy(&self) {
        crate::certs::install_crypto_provider();
        let client = reqwest::Client::new();
        let health = format!("{}/health", self.url);
        let up = crate::eventually(START_TIMEOUT, || async {
            match client.get(&health).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        if let Err(last) = up {
            panic!("MLflow did not answer {health} within {START_TIMEOUT:?}: {last}");
        }
    }

    /// Stops the server (every process of its group), keeping its data: MLflow down.
    pub fn stop(&mut self) {
        self._child.terminate();
    }

    /// Starts the server again on the same port with the same data (after [`Self::stop`]) and
    /// waits until it answers.
    pub async fn restart(&mut self) {
        self._child.terminate();
        self._child = spawn(self._dir.path(), self.port);
        self.wait_healthy().await;
    }

    /// The tracking URI, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process group id (its processes: [`crate::process::live_members`]).
    pub fn process_group(&self) -> u32 {
        self._child.id()
    }
}

/// `python3 -m mlflow server` on `port` with its store and artifacts in `dir`. Panics with
/// what to install when MLflow is missing.
fn spawn(dir: &std::path::Path, port: u16) -> ChildGroup {
    let python = std::env::var("KIP_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import mlflow"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "MLflow is not installed for {python}: run `python3 -m pip install mlflow` \
         (scripts/test.sh does), or point KIP_TEST_PYTHON at a Python that has it: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    ChildGroup::spawn(
        Command::new(&python)
            .args(["-m", "mlflow", "server", "--backend-store-uri"])
            .arg(format!("sqlite:///{}/db", dir.display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .args(["--serve-artifacts", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--workers", "1"])
            // uvicorn's supervisor kills a worker that misses a 5 s health ping; on a loaded
            // 2-core machine that restarted the server mid-test (closed connections, 10+ s
            // of startup), so give it a minute.
            .args(["--uvicorn-opts", "--timeout-worker-healthcheck 60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap_or_else(|e| panic!("cannot start mlflow server: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::live_members;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_server_and_every_worker_it_forked_stop_on_drop() {
        let server = MlflowServer::start().await;
        let pgid = server.process_group();
        let members = live_members(pgid);
        // python -m mlflow server forks a web server and its worker(s).
        assert!(members.len() > 1, "{members:?}");
        let health = reqwest::get(format!("{}/health", server.url()))
            .await
            .unwrap();
        assert!(health.status().is_success());
        drop(server);
        assert_eq!(live_members(pgid), Vec::<i32>::new());
    }
}
