//! Agent self-update: installing the release the control plane wants, proving it works, and
//! leaving the going-back to something that is not the new binary.
//!
//! Layout of an install root (`KIP_AGENT_INSTALL_ROOT`, exported by the launcher
//! `deploy/agent-release/kip-agent-launcher`):
//!
//! ```text
//! bin/kip-agent-launcher     outside every slot; systemd (Restart=always) runs it
//! versions/<version>/        one unpacked release tarball each (bin/kip-agent, VERSION, lib/...)
//! current -> versions/<v>    what the launcher starts
//! previous -> versions/<u>   where the launcher goes back to
//! update/trial               "<version>": the version on trial (written before the switch)
//! update/trial-boots         starts of the trial version counted by the launcher
//! update/trial-failed        why the running trial version gave up (written by it)
//! update/rolled-back         "<version> <reason>": written by the launcher when it went back
//! update/confirmed           "<version>": the last version that proved itself
//! ```
//!
//! The buffer and the identity live in the agent's `state_dir`, never in a slot: every step
//! below leaves them alone.
//!
//! Steps, each safe against power loss (kill -9) at any point:
//! 1. download over the agent's mTLS channel, verify the signature (model signing key, name
//!    [`RELEASE_SIGNING_NAME`], the device's organisation) and the sha256 in memory
//!    ([`crate::model_trust::ModelTrust::fetch_verified`]); nothing is written before that;
//! 2. unpack into `versions/<v>.partial`, check its `VERSION` names `<v>` and `bin/kip-agent`
//!    exists, rename to `versions/<v>` (a crash leaves a `.partial` that the next try removes);
//! 3. write `update/trial`, then point `previous` at the running slot, then `current` at the
//!    new one (each a symlink made beside and renamed over: atomic). A crash before the last
//!    rename leaves `current` at the old slot; the launcher drops a trial that does not name
//!    `current`'s slot;
//! 4. exit with [`RESTART_EXIT_CODE`]; the supervisor (systemd, or the test kit) starts the
//!    launcher again, which starts the new slot;
//! 5. the new version is on trial until a sync is acknowledged with every source connected;
//!    then it removes `update/trial` ([`SelfUpdate::on_ack`]). If that does not happen within
//!    `KIP_AGENT_TRIAL_SECONDS` it writes the reason to `update/trial-failed` and exits with
//!    [`TRIAL_FAILED_EXIT_CODE`]; a binary that cannot even run our code crashes at start and
//!    the launcher counts its boots. Either way the launcher points `current` back at
//!    `previous` and records why in `update/rolled-back`: the revert never depends on the new
//!    binary.
//!
//! Invariants:
//! - Self-update acts only when the agent was started by the launcher (`KIP_AGENT_INSTALL_ROOT`
//!   set): without a launcher nothing could revert a broken version.
//! - A refused or rolled-back release is not tried again by this process (refused) or ever
//!   (rolled back, the launcher's record) until the control plane offers another version.
//! - The state is reported on every sync in [`UPDATE_STATUS_HEADER`].

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use kip_shared::sync::{DesiredRelease, RELEASE_SIGNING_NAME};
use tokio_util::sync::CancellationToken;

/// Exit code after switching to a new version: "start me again" (systemd `Restart=always`).
pub const RESTART_EXIT_CODE: u8 = 75;
/// Exit code of a version on trial that did not prove itself in time; the launcher rolls back.
pub const TRIAL_FAILED_EXIT_CODE: u8 = 76;
/// Environment variable naming the install root; set by the launcher.
pub const INSTALL_ROOT_ENV: &str = "KIP_AGENT_INSTALL_ROOT";
/// Environment variable with the trial deadline in seconds (default [`DEFAULT_TRIAL_SECONDS`]).
pub const TRIAL_SECONDS_ENV: &str = "KIP_AGENT_TRIAL_SECONDS";
/// How long a new version has to prove itself by default.
pub const DEFAULT_TRIAL_SECONDS: u64 = 300;

/// Why a release could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the tarball is not a release: {0}")]
    NotARelease(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The version this binary runs as: the `VERSION` file of its slot (`<slot>/bin/kip-agent`
/// next to `<slot>/VERSION`), else the crate version (a build run from the target directory).
/// Two tarballs of one binary with different `VERSION` files are two versions.
pub fn agent_version() -> &'static str {
    static V: OnceLock<String> = OnceLock::new();
    V.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("VERSION")))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    })
}

/// The install root on disk (see the module docs).
#[derive(Debug, Clone)]
pub struct Install {
    root: PathBuf,
}

impl Install {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// From [`INSTALL_ROOT_ENV`]; `None` when the agent was not started by the launcher.
    pub fn from_env() -> Option<Self> {
        std::env::var_os(INSTALL_ROOT_ENV)
            .filter(|v| !v.is_empty())
            .map(Self::new)
    }

    fn update_dir(&self) -> PathBuf {
        self.root.join("update")
    }

    fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.update_dir().join(name))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// Writes `update/<name>` whole: temporary file, fsync, rename, fsync of the directory.
    fn write(&self, name: &str, text: &str) -> Result<(), UpdateError> {
        let dir = self.update_dir();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let tmp = dir.join(format!("{name}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(text.as_bytes()).map_err(io(&tmp))?;
            f.write_all(b"\n").map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&dir)
    }

    fn remove(&self, name: &str) -> Result<(), UpdateError> {
        let path = self.update_dir().join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The version on trial, if any.
    pub fn trial(&self) -> Option<String> {
        self.read("trial")
    }

    /// The launcher's last rollback: (version, reason).
    pub fn rolled_back(&self) -> Option<(String, String)> {
        let s = self.read("rolled-back")?;
        let (v, reason) = s.split_once(' ').unwrap_or((&s, "rolled back"));
        Some((v.to_owned(), reason.to_owned()))
    }

    /// Unpacks the release tarball `bytes` as `versions/<version>` (see step 2 of the module
    /// docs). The tarball has one top directory (as `scripts/package-agent.sh` makes it),
    /// which is stripped.
    pub fn stage(&self, version: &str, bytes: &[u8]) -> Result<PathBuf, UpdateError> {
        // The version names a directory: never a path (the control plane checks it too).
        let plain = version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
        if version.is_empty() || version.len() > 64 || version.starts_with('.') || !plain {
            return Err(UpdateError::NotARelease(format!(
                "version {version:?} is not a plain version name"
            )));
        }
        let versions = self.root.join("versions");
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let slot = versions.join(version);
        let partial = versions.join(format!("{version}.partial"));
        for old in [&partial, &slot] {
            if old.exists() {
                std::fs::remove_dir_all(old).map_err(io(old))?;
            }
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
        let entries = archive
            .entries()
            .map_err(|e| UpdateError::NotARelease(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| UpdateError::NotARelease(e.to_string()))?;
            let path = entry
                .path()
                .map_err(|e| UpdateError::NotARelease(e.to_string()))?
                .into_owned();
            // Strip the top directory; refuse anything that could leave the slot.
            let rel: PathBuf = path.components().skip(1).collect();
            if rel.as_os_str().is_empty() {
                continue;
            }
            if rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(UpdateError::NotARelease(format!(
                    "entry {} leaves the release directory",
                    path.display()
                )));
            }
            let dest = partial.join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            entry.unpack(&dest).map_err(io(&dest))?;
        }
        let named = std::fs::read_to_string(partial.join("VERSION"))
            .map(|s| s.trim().to_owned())
            .map_err(|_| UpdateError::NotARelease("no VERSION file".into()))?;
        if named != version {
            return Err(UpdateError::NotARelease(format!(
                "its VERSION file says {named:?}, the release is {version:?}"
            )));
        }
        if !partial.join("bin/kip-agent").is_file() {
            return Err(UpdateError::NotARelease("no bin/kip-agent".into()));
        }
        sync_tree(&partial)?;
        std::fs::rename(&partial, &slot).map_err(io(&slot))?;
        sync_dir(&versions)?;
        Ok(slot)
    }

    /// Puts `version` (staged) on trial and makes it `current`; the running slot becomes
    /// `previous` (step 3 of the module docs).
    pub fn switch(&self, version: &str) -> Result<(), UpdateError> {
        let current = self.root.join("current");
        let running = std::fs::read_link(&current).map_err(io(&current))?;
        self.remove("trial-boots")?;
        self.remove("trial-failed")?;
        self.write("trial", version)?;
        self.remove("rolled-back")?;
        replace_symlink(&self.root, "previous", &running)?;
        replace_symlink(&self.root, "current", &Path::new("versions").join(version))?;
        sync_dir(&self.root)
    }

    /// The version on trial proved itself: it stays.
    pub fn confirm(&self, version: &str) -> Result<(), UpdateError> {
        self.write("confirmed", version)?;
        self.remove("trial")?;
        self.remove("trial-boots")
    }

    /// The version on trial gives up; the launcher rolls back at the next start.
    pub fn fail_trial(&self, reason: &str) -> Result<(), UpdateError> {
        self.write("trial-failed", &one_line(reason))
    }
}

/// `name` in `dir` now points at `target`: a new link beside it renamed over it.
fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<(), UpdateError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn sync_dir(dir: &Path) -> Result<(), UpdateError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// fsyncs every file and directory under `dir`, so a rename after it publishes whole files.
fn sync_tree(dir: &Path) -> Result<(), UpdateError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        if meta.is_dir() {
            sync_tree(&path)?;
        } else if meta.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(&path))?;
        }
    }
    sync_dir(dir)
}

/// Printable ASCII on one line, at most the header limit.
fn one_line(s: &str) -> String {
    crate::model_trust::header_value(s)
}

/// What the agent reports in [`UPDATE_STATUS_HEADER`](kip_shared::sync::UPDATE_STATUS_HEADER).
#[derive(Debug, Default)]
struct Report {
    /// `<state> <version>[ <reason>]`.
    status: Option<String>,
    /// (version, sha256) refused by this process: not tried again.
    refused: Option<(String, String)>,
    /// Why the running version is not confirmed yet (for the trial deadline's reason).
    unconfirmed: Option<String>,
}

/// The self-update state of this process (one per process: the pipeline may be restarted by
/// a remote configuration, the update state must not be).
#[derive(Debug)]
pub struct SelfUpdate {
    install: Install,
    version: String,
    trial: Option<String>,
    report: Mutex<Report>,
    /// Cancelled to stop the whole agent for a restart.
    shutdown: CancellationToken,
    exit_code: AtomicU8,
}

static PROCESS: OnceLock<Arc<SelfUpdate>> = OnceLock::new();

/// The process's self-update state, when [`SelfUpdate::init`] ran (the agent was started by
/// the launcher).
pub fn handle() -> Option<Arc<SelfUpdate>> {
    PROCESS.get().cloned()
}

/// The exit code the process should end with (0 unless a restart was asked for).
pub fn exit_code() -> u8 {
    PROCESS
        .get()
        .map_or(0, |s| s.exit_code.load(Ordering::Relaxed))
}

impl SelfUpdate {
    /// Reads the install root's state and registers it for the process; `shutdown` is the
    /// agent's root token. `None` without a launcher ([`Install::from_env`]).
    pub fn init(shutdown: CancellationToken) -> Option<Arc<Self>> {
        let install = Install::from_env()?;
        let version = agent_version().to_owned();
        let trial = install.trial().filter(|t| *t == version);
        let status = if trial.is_some() {
            Some(format!("trial {version}"))
        } else if let Some((v, reason)) = install.rolled_back() {
            Some(format!("rolled_back {v} {reason}"))
        } else {
            Some(format!("confirmed {version}"))
        };
        tracing::info!(install_root = %install.root.display(), %version, on_trial = trial.is_some(),
            status = ?status, "self-update ready");
        let s = Arc::new(Self {
            install,
            version,
            trial,
            report: Mutex::new(Report {
                status: status.map(|s| one_line(&s)),
                ..Report::default()
            }),
            shutdown,
            exit_code: AtomicU8::new(0),
        });
        Some(PROCESS.get_or_init(|| s).clone())
    }

    fn set(&self, f: impl FnOnce(&mut Report)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// The [`UPDATE_STATUS_HEADER`](kip_shared::sync::UPDATE_STATUS_HEADER) value.
    pub fn header(&self) -> Option<String> {
        self.report.lock().ok().and_then(|r| r.status.clone())
    }

    /// Whether `r` should be installed now: another version than this one, not refused or
    /// rolled back already, not while this version is on trial or a restart is pending.
    pub fn wants(&self, r: &DesiredRelease) -> bool {
        if r.version == self.version || self.on_trial() || self.shutdown.is_cancelled() {
            return false;
        }
        if self
            .install
            .rolled_back()
            .is_some_and(|(v, _)| v == r.version)
        {
            return false;
        }
        let Ok(rep) = self.report.lock() else {
            return false;
        };
        rep.refused.as_ref() != Some(&(r.version.clone(), r.sha256.clone()))
    }

    /// Whether this process runs a version on trial that has not confirmed yet.
    fn on_trial(&self) -> bool {
        self.trial
            .as_ref()
            .is_some_and(|v| self.install.trial().as_deref() == Some(v.as_str()))
    }

    /// The release as the signature check sees it: a "model" named
    /// [`RELEASE_SIGNING_NAME`].
    pub fn as_signed_artifact(r: &DesiredRelease) -> kip_shared::sync::DesiredModel {
        kip_shared::sync::DesiredModel {
            name: RELEASE_SIGNING_NAME.to_owned(),
            version: r.version.clone(),
            sha256: r.sha256.clone(),
            download_path: r.download_path.clone(),
            signature: r.signature.clone(),
        }
    }

    pub fn downloading(&self, r: &DesiredRelease) {
        tracing::info!(version = %r.version, "downloading agent release");
        self.set(|x| x.status = Some(one_line(&format!("downloading {}", r.version))));
    }

    /// The release was refused (download, signature, digest, unpacking); the running version
    /// stays and this release is not tried again by this process.
    pub fn refused(&self, r: &DesiredRelease, why: &str) {
        tracing::error!(version = %r.version, reason = %why, "agent release refused; this version keeps running");
        self.set(|x| {
            x.status = Some(one_line(&format!("refused {} {why}", r.version)));
            x.refused = Some((r.version.clone(), r.sha256.clone()));
        });
    }

    /// Unpacks, switches and asks for a restart (blocking file work: call on a blocking
    /// thread).
    pub fn install(&self, r: &DesiredRelease, bytes: &[u8]) -> Result<(), UpdateError> {
        self.install.stage(&r.version, bytes)?;
        self.install.switch(&r.version)?;
        tracing::info!(from = %self.version, to = %r.version,
            exit_code = RESTART_EXIT_CODE, "agent release installed; restarting into it");
        self.restart(RESTART_EXIT_CODE);
        Ok(())
    }

    fn restart(&self, code: u8) {
        self.exit_code.store(code, Ordering::Relaxed);
        self.shutdown.cancel();
    }

    /// After every acknowledged sync: confirms a version on trial once `unconfirmed` (why
    /// the agent does not work yet, e.g. sources down) is `None`.
    pub fn on_ack(&self, unconfirmed: Option<String>) {
        let Some(v) = &self.trial else { return };
        if !self.on_trial() {
            return;
        }
        match unconfirmed {
            Some(why) => self.set(|x| x.unconfirmed = Some(why)),
            None => match self.install.confirm(v) {
                Ok(()) => {
                    tracing::info!(version = %v, "agent version confirmed");
                    self.set(|x| x.status = Some(format!("confirmed {v}")));
                }
                Err(e) => tracing::error!(error = %e, "cannot record the confirmation; retrying"),
            },
        }
    }

    /// For a version on trial: waits for the deadline ([`TRIAL_SECONDS_ENV`]); if the
    /// version is still not confirmed then, records why and stops the agent with
    /// [`TRIAL_FAILED_EXIT_CODE`] so the launcher rolls back. Returns at once otherwise.
    pub async fn watch_trial(self: Arc<Self>, cancel: CancellationToken) {
        let Some(v) = self.trial.clone() else { return };
        let secs = std::env::var(TRIAL_SECONDS_ENV)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(DEFAULT_TRIAL_SECONDS);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            if self.install.trial().is_none_or(|t| t != v) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        let why = self
            .report
            .lock()
            .ok()
            .and_then(|r| r.unconfirmed.clone())
            .unwrap_or_else(|| "control plane not reached".into());
        let reason = format!("not confirmed within {secs} s: {why}");
        tracing::error!(version = %v, %reason, exit_code = TRIAL_FAILED_EXIT_CODE,
            "agent version on trial failed; stopping so the launcher rolls back");
        if let Err(e) = self.install.fail_trial(&reason) {
            tracing::error!(error = %e, "cannot record why the trial failed");
        }
        self.restart(TRIAL_FAILED_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release tarball as `scripts/package-agent.sh` lays it out (the kit's).
    fn tarball(version: &str) -> Vec<u8> {
        kip_tests::agent_release::tarball_bytes(version, b"#!/bin/sh\nexit 0\n")
    }

    fn installed(root: &Path, version: &str) -> Install {
        let i = Install::new(root);
        i.stage(version, &tarball(version)).unwrap();
        std::os::unix::fs::symlink(Path::new("versions").join(version), root.join("current"))
            .unwrap();
        i
    }

    #[test]
    fn a_release_is_unpacked_beside_the_running_one_and_switched_to_on_trial() {
        let dir = tempfile::tempdir().unwrap();
        let i = installed(dir.path(), "1.0.0");
        i.stage("1.1.0", &tarball("1.1.0")).unwrap();
        i.switch("1.1.0").unwrap();
        assert_eq!(
            std::fs::read_link(dir.path().join("current")).unwrap(),
            Path::new("versions/1.1.0")
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("previous")).unwrap(),
            Path::new("versions/1.0.0")
        );
        assert_eq!(i.trial().as_deref(), Some("1.1.0"));
        assert!(dir.path().join("versions/1.1.0/bin/kip-agent").is_file());
        i.confirm("1.1.0").unwrap();
        assert_eq!(i.trial(), None);
    }

    #[test]
    fn a_tarball_whose_version_file_disagrees_or_escapes_is_refused_and_leaves_current() {
        let dir = tempfile::tempdir().unwrap();
        let i = installed(dir.path(), "1.0.0");
        let e = i.stage("2.0.0", &tarball("1.9.0")).unwrap_err();
        assert!(e.to_string().contains("VERSION file says"), "{e}");
        assert!(!dir.path().join("versions/2.0.0").exists());
        // tar::Builder refuses to write `..`, so the escaping entry is forged in the header.
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..17].copy_from_slice(b"top/../../evil.sh");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let evil = b.into_inner().unwrap().finish().unwrap();
        let e = i.stage("2.0.0", &evil).unwrap_err();
        assert!(
            e.to_string().contains("leaves the release directory"),
            "{e}"
        );
        assert!(!dir.path().join("evil.sh").exists());
        assert_eq!(
            std::fs::read_link(dir.path().join("current")).unwrap(),
            Path::new("versions/1.0.0")
        );
        assert!(i.stage("not-gzip", b"plain bytes").is_err());
        assert!(i.stage("../../etc", b"x").is_err());
    }

    #[test]
    fn a_crash_during_unpacking_leaves_a_partial_slot_that_the_next_try_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let i = installed(dir.path(), "1.0.0");
        let partial = dir.path().join("versions/1.1.0.partial");
        std::fs::create_dir_all(partial.join("bin")).unwrap();
        std::fs::write(partial.join("bin/kip-agent"), b"half").unwrap();
        i.stage("1.1.0", &tarball("1.1.0")).unwrap();
        assert!(!partial.exists());
        assert_eq!(
            std::fs::read(dir.path().join("versions/1.1.0/bin/kip-agent")).unwrap(),
            b"#!/bin/sh\nexit 0\n"
        );
    }

    #[test]
    fn the_launcher_record_of_a_rollback_is_read_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let i = Install::new(dir.path());
        assert_eq!(i.rolled_back(), None);
        i.write("rolled-back", "1.2.0 crashed 3 times at start")
            .unwrap();
        assert_eq!(
            i.rolled_back(),
            Some(("1.2.0".into(), "crashed 3 times at start".into()))
        );
    }
}
