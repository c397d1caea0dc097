//! The kip test kit: one place for the fixtures and helpers that kip's tests share, so no test
//! file carries its own copy (no `#[path]` includes).
//!
//! Invariants every fixture keeps:
//! - It stops what it starts, whatever the outcome: servers and child processes are stopped on
//!   `Drop` (child processes as a whole process group, SIGTERM then SIGKILL), databases are
//!   dropped, temporary directories removed. `scripts/test.sh` checks that no test-started
//!   process survives the run.
//! - A missing service (PostgreSQL, `mosquitto`, MLflow, the ONNX Runtime library) is a test
//!   failure with a message that says what to install; nothing is skipped.
//! - Every server binds a free loopback port and is ready (accepts connections or answers its
//!   health check) when its constructor returns.
//!
//! Failing loudly is the point of a fixture: constructors panic with a clear message instead
//! of returning errors every test would unwrap anyway.
//!
//! | module | what |
//! | --- | --- |
//! | [`ports`] | free loopback ports, waiting for a port to accept |
//! | [`eventually`](mod@eventually) | polling until a positive signal ([`eventually()`], [`wait_until`]) |
//! | [`process`] | [`ChildGroup`]: a child in its own process group, killed as a group on drop |
//! | [`postgres`] | [`TestDb`] (fresh database, dropped at the end), [`PrivatePostgres`] (a server a test may crash; a streaming standby of it to promote) |
//! | [`mosquitto`] | [`Mosquitto`]: a private broker (optional TLS with client certificates); `mosquitto_pub` publishing |
//! | [`fake_llm`] | [`FakeLlm`](fake_llm::FakeLlm): a scriptable OpenAI/DeepSeek-compatible provider |
//! | [`kipctl`](mod@kipctl) | `kipctl` run in-process as its binary runs it |
//! | [`mlflow`] | [`MlflowServer`]: a private MLflow tracking server |
//! | [`opcua`] | [`OpcUaServer`]: an in-process OPC UA server with a few machine variables |
//! | [`certs`] | test CAs and certificates ([`BrokerPki`], [`device_identity`]) |
//! | [`model_artifacts`] | writes around the API into the model artifact tables (signing tests) |
//! | [`artifacts`] | the ONNX Runtime library, the reference model, workspace binaries |
//! | [`browser`] | [`Browser`](browser::Browser): headless Debian chromium driven over the DevTools protocol |
//! | [`binaries`] | the `kip-control-plane` and `kip-agent` binaries as child processes (crash tests) |
//! | [`control_plane`] | the in-process control plane (admin API + mTLS agent listener) |
//! | [`agent`] | agent pieces for sync tests: buffer, readings, sync loop, renewer |
//! | [`proxy`] | a TCP proxy whose link a test can cut |
//! | [`volume`] | [`Tmpfs`](volume::Tmpfs): a small tmpfs a test fills ([`volume::fill`]) |
//! | [`prometheus`] | [`Prometheus`]: a real Prometheus with kip's alert rules, scraping a control plane |
//! | [`supervisor`] | restarts a command after every exit (systemd `Restart=always`) |
//! | [`agent_release`] | agent release tarballs and an install root with the launcher |
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test fixtures fail the test at once, with a message saying what is missing"
)]

pub mod agent;
pub mod agent_release;
pub mod artifacts;
pub mod binaries;
pub mod browser;
pub mod certs;
pub mod control_plane;
pub mod eventually;
pub mod fake_llm;
pub mod kipctl;
pub mod mlflow;
pub mod model_artifacts;
pub mod mosquitto;
pub mod opcua;
pub mod plant;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod supervisor;
pub mod volume;

pub use artifacts::{
    ReferenceModel, ort_library, reference_model, workspace_binary, workspace_root,
};
pub use certs::{BrokerPki, device_identity, install_crypto_provider};
pub use control_plane::ControlPlane;
pub use eventually::{eventually, eventually_ok, wait_until, within};
pub use mlflow::MlflowServer;
pub use mosquitto::Mosquitto;
pub use opcua::OpcUaServer;
pub use ports::{free_port, wait_for_port};
pub use postgres::{NewDatabase, PrivatePostgres, TestDb};
pub use process::ChildGroup;
pub use prometheus::Prometheus;
pub use proxy::{Link, Proxy};
