//! Remote configuration on the agent: applying what the control plane sends, confirming it
//! works, and going back to the last good configuration by itself when it does not.
//!
//! The sync loop hands each desired configuration it sees to [`Link::offer`]; [`supervise`]
//! owns the running pipeline ([`runtime::RunningAgent`]) and, for a new version:
//! 1. validates it with the same code as the control plane (`kip_agent_config::remote`), merged
//!    into the local file, plus the checks only the device can make (files exist);
//! 2. stops the running pipeline through its one shutdown path (sources stop, the writer
//!    flushes, MQTT messages not yet durable stay unacknowledged so the broker redelivers
//!    them) and starts one with the new configuration on the same buffer;
//! 3. waits up to `remote_config.confirm_within_ms` for every source to connect and the
//!    control plane to acknowledge a batch ([`runtime::RunningAgent::unconfirmed`]);
//! 4. on success writes it as the last good version (`<state_dir>/remote-config/current.json`,
//!    written to a temporary file, synced, then renamed: a power loss leaves the old or the new
//!    file, never half of one); otherwise stops it, restarts the last good configuration and
//!    remembers the refused version (`rejected.json`) so it is not tried again.
//!
//! Invariants:
//! - The local file's local-only settings (`[agent]`, `[http]`, `[log]`, `buffer.max_bytes`,
//!   `[remote_config]`) are never changed remotely: the remote document cannot hold them.
//! - The applied version and the last refusal are reported on every sync
//!   (`kip-config-version`, `kip-config-error`).
//! - The buffer is never touched by a configuration change: one pipeline is stopped (and its
//!   buffer flushed and closed) before the next opens it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use kip_agent_config::{config::Config, remote};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::runtime::{self, RunningAgent, RuntimeError};

/// How often a configuration on trial is checked.
const CONFIRM_POLL: Duration = Duration::from_millis(250);
/// How often the buffer's storage is checked, and the least time between two reopenings.
const STORAGE_CHECK: Duration = Duration::from_secs(5);

/// A configuration version from the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: String,
    /// The remote document (TOML).
    pub toml: String,
}

/// A refused version and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub version: String,
    pub error: String,
}

#[derive(Debug, Default)]
struct Report {
    applied: Option<String>,
    rejected: Option<Rejected>,
    /// Version being applied right now: not offered again meanwhile.
    trying: Option<String>,
}

/// Between the sync loop and [`supervise`]: offers go one way, the report the other.
#[derive(Debug, Clone)]
pub struct Link {
    offers: mpsc::Sender<Versioned>,
    report: Arc<Mutex<Report>>,
}

impl Link {
    /// Passes a desired version on unless it is the applied one, the one being tried or the
    /// refused one. Never blocks: when an offer is already pending, the next ack repeats it.
    pub fn offer(&self, version: &str, toml: Option<&str>) {
        let Ok(r) = self.report.lock() else { return };
        if r.applied.as_deref() == Some(version)
            || r.trying.as_deref() == Some(version)
            || r.rejected.as_ref().is_some_and(|x| x.version == version)
        {
            return;
        }
        drop(r);
        let Some(toml) = toml else {
            tracing::warn!(version, "desired configuration came without its document");
            return;
        };
        let _ = self.offers.try_send(Versioned {
            version: version.to_owned(),
            toml: toml.to_owned(),
        });
    }

    /// `(applied version, "<version>: <reason>" of the last refusal)` for the sync headers.
    pub fn headers(&self) -> (Option<String>, Option<String>) {
        let Ok(r) = self.report.lock() else {
            return (None, None);
        };
        (
            r.applied.as_deref().map(crate::model_trust::header_value),
            r.rejected
                .as_ref()
                .map(|x| crate::model_trust::header_value(&format!("{}: {}", x.version, x.error))),
        )
    }

    fn set(&self, f: impl FnOnce(&mut Report)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }
}

/// Why the supervisor stopped.
#[derive(Debug, thiserror::Error)]
pub enum RemoteConfigError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot read the local config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("local config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("remote configuration store {path}: {source}")]
    Store {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `<state_dir>/remote-config`: the last good version and the last refused one.
#[derive(Debug, Clone)]
struct Store {
    dir: PathBuf,
}

impl Store {
    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<T> {
        let path = self.dir.join(name);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "unreadable remote configuration state; ignored");
                None
            }
        }
    }

    /// Writes `name` atomically: temporary file, fsync, rename, fsync of the directory.
    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), RemoteConfigError> {
        let err = |source| RemoteConfigError::Store {
            path: self.dir.join(name),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!("{name}.tmp"));
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| err(e.into()))?;
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(err)?;
            f.write_all(&bytes).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, self.dir.join(name)).map_err(err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

/// The local file as a TOML table, kept to merge remote documents into.
fn read_local(path: &Path) -> Result<toml::Table, RemoteConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| RemoteConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e: toml::de::Error| RemoteConfigError::Parse {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })
}

/// The configuration for `remote_toml` merged into the local file, with every check the
/// device makes.
fn effective(local: &toml::Table, remote_toml: &str) -> Result<Config, String> {
    let remote = remote::parse(remote_toml).map_err(|e| e.to_string())?;
    let cfg = remote::validate_table(remote::merge(local, &remote)).map_err(|e| e.to_string())?;
    cfg.check_local_files().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Runs the agent from the local file at `path` (already validated as `local_cfg`) plus the
/// last good remote configuration, applying new ones as they come, until `cancel`.
pub async fn supervise(
    path: &Path,
    local_cfg: Config,
    cancel: CancellationToken,
) -> Result<(), RemoteConfigError> {
    let local = read_local(path)?;
    let store = Store {
        dir: local_cfg.state_dir.join("remote-config"),
    };
    let settings = local_cfg.remote_config.clone();
    let (tx, mut rx) = mpsc::channel::<Versioned>(1);
    let link = Link {
        offers: tx,
        report: Arc::default(),
    };
    let mut good: Option<Versioned> = store.read("current.json");
    link.set(|r| r.rejected = store.read("rejected.json"));
    let mut cfg = match &good {
        Some(v) => match effective(&local, &v.toml) {
            Ok(c) => {
                link.set(|r| r.applied = Some(v.version.clone()));
                c
            }
            Err(e) => {
                // The local file changed under it (e.g. a removed certificate file).
                tracing::error!(version = %v.version, error = %e, "last good remote configuration no longer valid here; running the local file");
                link.set(|r| {
                    r.rejected = Some(Rejected {
                        version: v.version.clone(),
                        error: e,
                    });
                });
                good = None;
                local_cfg.clone()
            }
        },
        None => local_cfg.clone(),
    };
    let remote_link = settings.enabled.then(|| link.clone());
    let mut child = cancel.child_token();
    let mut agent =
        runtime::start_with_remote(cfg.clone(), child.clone(), remote_link.clone()).await?;
    let mut storage_check = tokio::time::interval(STORAGE_CHECK);
    storage_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let offer = tokio::select! {
            () = cancel.cancelled() => break,
            o = rx.recv() => match o { Some(o) => o, None => break },
            _ = storage_check.tick() => {
                if !agent.storage_failing() {
                    continue;
                }
                // Reopen the buffer by restarting the pipeline once a flush failed (disk full):
                // open recovers from what is on disk (a torn tail frame is cut off). What was flushed is intact; MQTT
                // messages not yet durable were never acknowledged and come back.
                tracing::error!("buffer storage failing (disk full?): restarting the pipeline to reopen it");
                child.cancel();
                agent.wait().await;
                let Some((a, c)) = start_retrying(&cfg, &cancel, remote_link.as_ref()).await else {
                    return Ok(());
                };
                (agent, child) = (a, c);
                continue;
            }
        };
        let new_cfg = match effective(&local, &offer.toml) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(version = %offer.version, error = %e, "remote configuration refused");
                reject(&store, &link, &offer.version, e)?;
                continue;
            }
        };
        tracing::info!(version = %offer.version, "applying remote configuration");
        link.set(|r| r.trying = Some(offer.version.clone()));
        child.cancel();
        agent.wait().await;
        child = cancel.child_token();
        let trial =
            match runtime::start_with_remote(new_cfg.clone(), child.clone(), remote_link.clone())
                .await
            {
                Ok(a) => confirm(a, settings.confirm_within, &cancel).await,
                Err(e) => Err((None, format!("cannot start: {e}"))),
            };
        match trial {
            Ok(a) => {
                store.write("current.json", &offer)?;
                tracing::info!(version = %offer.version, "remote configuration confirmed");
                link.set(|r| {
                    r.applied = Some(offer.version.clone());
                    r.trying = None;
                    r.rejected = None;
                });
                good = Some(offer);
                cfg = new_cfg;
                agent = a;
            }
            Err((running, why)) => {
                if let Some(a) = running {
                    child.cancel();
                    a.wait().await;
                }
                if cancel.is_cancelled() {
                    // A stop (SIGTERM, `systemctl restart`) during the trial says nothing
                    // about the configuration: it is not refused, the last good one stays
                    // recorded, and the control plane offers it again after the restart.
                    tracing::info!(version = %offer.version, "stopped while the remote configuration was on trial; it is tried again after the restart");
                    return Ok(());
                }
                let why = format!("rolled back: {why}");
                tracing::error!(version = %offer.version, error = %why, last_good = ?good.as_ref().map(|g| &g.version), "remote configuration rolled back");
                reject(&store, &link, &offer.version, why)?;
                child = cancel.child_token();
                agent = runtime::start_with_remote(cfg.clone(), child.clone(), remote_link.clone())
                    .await?;
            }
        }
    }
    child.cancel();
    agent.wait().await;
    Ok(())
}

/// Starts the pipeline with `cfg`, retrying every [`STORAGE_CHECK`] while it cannot (e.g. the
/// buffer cannot be opened on a full disk); `None` once `cancel` fires.
async fn start_retrying(
    cfg: &Config,
    cancel: &CancellationToken,
    link: Option<&Link>,
) -> Option<(RunningAgent, CancellationToken)> {
    loop {
        let child = cancel.child_token();
        match runtime::start_with_remote(cfg.clone(), child.clone(), link.cloned()).await {
            Ok(a) => return Some((a, child)),
            Err(e) => tracing::error!(error = %e, "cannot restart the pipeline; retrying"),
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(STORAGE_CHECK) => {}
        }
    }
}

fn reject(
    store: &Store,
    link: &Link,
    version: &str,
    error: String,
) -> Result<(), RemoteConfigError> {
    let r = Rejected {
        version: version.to_owned(),
        error,
    };
    store.write("rejected.json", &r)?;
    link.set(|x| {
        x.rejected = Some(r);
        x.trying = None;
    });
    Ok(())
}

/// Waits until `agent` proves its configuration or `within` passes; on failure hands the
/// still-running agent back (to be stopped) with the reason.
async fn confirm(
    agent: RunningAgent,
    within: Duration,
    cancel: &CancellationToken,
) -> Result<RunningAgent, (Option<RunningAgent>, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let why = match agent.unconfirmed() {
            None => return Ok(agent),
            Some(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err((
                Some(agent),
                format!("{why} within {} ms", within.as_millis()),
            ));
        }
        tokio::select! {
            () = cancel.cancelled() => return Err((Some(agent), "agent shutting down".into())),
            () = tokio::time::sleep(CONFIRM_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_skip_the_applied_the_tried_and_the_refused_version() {
        let (tx, mut rx) = mpsc::channel(1);
        let link = Link {
            offers: tx,
            report: Arc::default(),
        };
        link.set(|r| {
            r.applied = Some("3".into());
            r.rejected = Some(Rejected {
                version: "4".into(),
                error: "rolled back: sources not connected: plc\nwithin 5000 ms".into(),
            });
        });
        link.offer("3", Some("[sync]\n"));
        link.offer("4", Some("[sync]\n"));
        assert!(rx.try_recv().is_err());
        link.offer("5", Some("[sync]\n"));
        assert_eq!(rx.try_recv().unwrap().version, "5");
        link.set(|r| r.trying = Some("5".into()));
        link.offer("5", Some("[sync]\n"));
        assert!(rx.try_recv().is_err());
        // Headers are printable ASCII whatever the reason holds.
        let (applied, error) = link.headers();
        assert_eq!(applied.as_deref(), Some("3"));
        assert_eq!(
            error.as_deref(),
            Some("4: rolled back: sources not connected: plc?within 5000 ms")
        );
    }

    #[test]
    fn the_store_replaces_its_files_whole_and_ignores_a_leftover_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store {
            dir: dir.path().join("remote-config"),
        };
        assert!(store.read::<Versioned>("current.json").is_none());
        let v1 = Versioned {
            version: "1".into(),
            toml: "[sync]\ninterval_ms = 500\n".into(),
        };
        store.write("current.json", &v1).unwrap();
        // A crash between writing the temporary file and the rename leaves the old version.
        std::fs::write(
            store.dir.join("current.json.tmp"),
            b"{\"version\": \"2\", \"to",
        )
        .unwrap();
        assert_eq!(store.read::<Versioned>("current.json"), Some(v1));
        let v2 = Versioned {
            version: "2".into(),
            toml: String::new(),
        };
        store.write("current.json", &v2).unwrap();
        assert_eq!(store.read::<Versioned>("current.json"), Some(v2));
    }
}
