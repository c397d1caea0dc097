//! kip control plane: fleet management, PKI, agent sync, sensor data, model registry and the
//! unified LLM API.
//!
//! Layout (see `docs/architecture.md` for the diagram): a leaf [`state`] module, the shared
//! HTTP edge [`http`], one module per domain ([`fleet`], [`pki`], [`agent_api`],
//! [`telemetry`], [`models`], [`llm`]) each owning its handlers, SQL, types and a `router()`
//! generic over the state, and the composition root: this file's [`ControlPlane`] builder plus
//! [`server`] (routers, middleware, listeners). Domains call each other only through named
//! functions (`telemetry::store`, `models::desired_for`, `pki::authenticate_device`, ...).
//!
//! Invariant: there is one way to start the system, [`ControlPlane::builder`]. The binary and
//! every test harness use it, so a test runs the same wiring (log writer, LLM providers, PKI
//! maintenance, agent listener) as production.

pub mod agent_api;
pub mod config;
pub mod config_error;
pub mod console;
pub mod db;
pub mod db_hosts;
pub mod device_config;
pub mod documents;
pub mod fleet;
pub mod health;
pub mod http;
pub mod keys;
pub mod llm;
pub mod metrics;
pub mod ml;
pub mod models;
pub mod outbound;
pub mod pki;
pub mod releases;
pub mod server;
pub mod state;
pub mod telemetry;

#[cfg(test)]
mod layout_tests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use sqlx::PgPool;
use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{
    config::Config,
    http::{HttpLimits, KeyCache},
    metrics::Metrics,
    state::AppState,
};

/// Bound on cached API keys: far above any real number of active keys, small in memory
/// (~100 bytes each).
const KEY_CACHE_MAX_ENTRIES: usize = 100_000;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot listen on {addr} (server.listen_addr): {source}")]
    AdminListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    AgentListen(#[from] agent_api::ListenError),
    #[error("fleet PKI: {0}")]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    LlmProvider(#[from] llm::ProviderBuildError),
    #[error("cannot build the MLflow client: {0}")]
    Mlflow(#[source] outbound::ClientError),
    #[error("model signing key (in pki.ca_dir): {0}")]
    ModelSigning(#[source] kip_certs::signing::SigningError),
}

/// Where a listener comes from.
#[derive(Debug)]
enum Listen<L> {
    /// Bind the address in the config.
    FromConfig,
    /// Serve on this already bound socket (tests bind port 0).
    Given(L),
    /// No listener (router tests call [`ControlPlane::router`] directly).
    Off,
}

/// Configures and starts a [`ControlPlane`]; see [`ControlPlane::builder`].
#[derive(Debug)]
#[must_use = "call .start().await"]
pub struct ControlPlaneBuilder {
    cfg: Config,
    pool: Option<PgPool>,
    admin: Listen<tokio::net::TcpListener>,
    agent: Listen<std::net::TcpListener>,
    token: CancellationToken,
    signals: bool,
}

impl ControlPlaneBuilder {
    /// Uses `pool` instead of connecting to `cfg.database_url` (tests: `#[sqlx::test]`). The
    /// caller owns it: [`ControlPlane::wait`] does not close it.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves the admin API on `listener` instead of binding `server.listen_addr`.
    pub fn admin_listener(mut self, listener: tokio::net::TcpListener) -> Self {
        self.admin = Listen::Given(listener);
        self
    }

    /// Serves no admin API socket; use [`ControlPlane::router`] (e.g. with `oneshot`).
    pub fn without_admin_listener(mut self) -> Self {
        self.admin = Listen::Off;
        self
    }

    /// Serves the agent mTLS API on `listener` instead of binding `pki.agent_listen_addr`
    /// (only when PKI is configured).
    pub fn agent_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.agent = Listen::Given(listener);
        self
    }

    /// Serves no agent mTLS listener even when PKI is configured (enrollment on the admin API
    /// and the PKI maintenance still run).
    pub fn without_agent_listener(mut self) -> Self {
        self.agent = Listen::Off;
        self
    }

    /// Stops the system when `token` is cancelled (default: a fresh token, see
    /// [`ControlPlane::token`]).
    pub fn cancellation_token(mut self, token: CancellationToken) -> Self {
        self.token = token;
        self
    }

    /// Cancels the token on SIGTERM or SIGINT (the binary; default off, so tests never
    /// install signal handlers).
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// Connects (unless a pool was given) and migrates the database, bootstraps the
    /// platform-admin key into `auth.admin_key_file`, builds the state, and starts every
    /// background service on one [`TaskTracker`]: the `inference_logs` writer, the LLM
    /// providers' connections, the PKI maintenance (CRL refresh, CA reload, recount) and the
    /// listeners. Any failure is returned; nothing is left running after an error.
    pub async fn start(self) -> Result<ControlPlane, StartError> {
        let Self {
            cfg,
            pool,
            admin,
            agent,
            token,
            signals,
        } = self;
        let owns_pool = pool.is_none();
        let pool = match pool {
            Some(p) => p,
            None => db::connect(&cfg).await?,
        };
        let tracker = TaskTracker::new();
        // Cancels on every early return below, so nothing started so far keeps running.
        let guard = token.clone().drop_guard();
        db::migrate(&pool).await?;
        tracing::info!("database schema up to date");
        telemetry::storage::report_layout(&pool).await;
        bootstrap_admin_key(&cfg, &pool).await?;

        let metrics = Arc::new(Metrics::new());
        let llm = Arc::new(llm::Gateway::new(
            cfg.llm.clone(),
            pool.clone(),
            metrics.llm.clone(),
        )?);
        let mlflow = match cfg.mlflow.clone() {
            Some(m) => Some(Arc::new(
                models::mlflow::MlflowSync::new(
                    m,
                    pool.clone(),
                    metrics.mlflow_sync_failures.clone(),
                    metrics.mlflow_poll.clone(),
                )
                .map_err(StartError::Mlflow)?,
            )),
            None => None,
        };
        let pki = pki::Pki::from_config(&cfg.pki, &pool).await?;
        // Kept beside the CA key and created on first start, like the CA it belongs to.
        let model_signing = match &cfg.pki.ca_dir {
            Some(dir) => {
                Some(models::signing::ModelSigning::open(dir).map_err(StartError::ModelSigning)?)
            }
            None => None,
        };
        let agent_admission = Arc::new(agent_api::Admission::new(
            cfg.agent_load_shedding,
            metrics.agent_shedding.clone(),
        ));
        let state = AppState {
            pool: pool.clone(),
            metrics,
            keys: Arc::new(
                KeyCache::new(cfg.key_cache_ttl, KEY_CACHE_MAX_ENTRIES).with_guard(cfg.auth_guard),
            ),
            http: HttpLimits {
                body_limit_bytes: cfg.request_body_limit_bytes,
                request_timeout: cfg.request_timeout,
            },
            pki: pki.clone(),
            llm,
            mlflow,
            ingest: cfg.ingest,
            model_signing: model_signing.clone(),
            health: cfg.health,
            console: Arc::default(),
            // rag: per-organisation documents and retrieval (loads the embedding model).
            documents: Arc::new(documents::Documents::new(cfg.documents.clone())),
            agent_admission,
            sync_gate: agent_api::SyncGate::new(cfg.ingest.max_in_flight_syncs_per_device),
        };

        // Background services. The log writer ends after every log sender (the gateway in
        // the state and the routers) is dropped, so draining the tracker flushes queued
        // inference logs.
        state.llm.start_log_writer(&tracker);
        state.llm.start_providers(&tracker, &token);
        if signals {
            tracker.spawn(server::shutdown_signal(token.clone()));
        }
        if let Some(ml) = &state.mlflow {
            models::mlflow::spawn_alias_poller(ml.clone(), token.clone(), &tracker);
        }
        telemetry::storage::spawn_maintenance(pool.clone(), cfg.telemetry, token.clone(), &tracker);
        health::spawn_refresh(
            pool.clone(),
            cfg.health,
            state.metrics.fleet.clone(),
            token.clone(),
            &tracker,
        );
        let agent_pool = db::agent_pool(&cfg, &pool);
        if owns_pool {
            // Multi-host database URL: keep every pool on the primary.
            db_hosts::spawn_follower(
                db::hosts(&cfg)?,
                std::iter::once(pool.clone())
                    .chain(agent_pool.clone())
                    .collect(),
                cfg.database_failover_check_interval,
                cfg.database_connect_timeout,
                token.clone(),
                &tracker,
            );
        }
        // Same period as the fleet health metrics: both are read from the synced tables.
        ml::monitoring::spawn_refresh(
            pool.clone(),
            cfg.health.metrics_refresh,
            state.metrics.model_drift.clone(),
            token.clone(),
            &tracker,
        );
        // The same period again: the rollout evaluator reads the synced predictions, stats
        // and drift, and halts a rollout whose candidate crosses a threshold.
        ml::compare::spawn_evaluator(
            pool.clone(),
            cfg.health.metrics_refresh,
            state.metrics.model_rollouts.clone(),
            token.clone(),
            &tracker,
        );
        let mut agent_addr = None;
        match &pki {
            Some(p) => {
                pki::spawn_maintenance(
                    p.clone(),
                    pool.clone(),
                    state.metrics.pki.clone(),
                    cfg.pki.crl_refresh_interval,
                    token.clone(),
                    &tracker,
                );
                if let Some(sg) = &model_signing {
                    models::signing::spawn_maintenance(
                        sg.clone(),
                        pool.clone(),
                        cfg.pki.ca_reload_interval,
                        token.clone(),
                        &tracker,
                    );
                }
                let listener = match agent {
                    Listen::FromConfig => {
                        let addr = cfg.pki.agent_listen_addr;
                        Some(
                            std::net::TcpListener::bind(addr)
                                .map_err(|source| agent_api::ListenError { addr, source })?,
                        )
                    }
                    Listen::Given(l) => Some(l),
                    Listen::Off => None,
                };
                if let Some(l) = listener {
                    agent_addr = Some(agent_api::spawn_listener(
                        l,
                        server::agent_router(match agent_pool {
                            Some(pool) => AppState {
                                pool,
                                ..state.clone()
                            },
                            None => state.clone(),
                        }),
                        p.tls().clone(),
                        token.clone(),
                        &tracker,
                        cfg.shutdown_grace,
                    )?);
                }
            }
            None => tracing::warn!(
                "pki.ca_dir is not set: device enrollment and the agent mTLS listener are off \
                 (create a CA with `kipctl ca init --dir DIR`)"
            ),
        }
        let router = server::router(state.clone());
        let listener = match admin {
            Listen::FromConfig => Some(
                tokio::net::TcpListener::bind(cfg.listen_addr)
                    .await
                    .map_err(|source| StartError::AdminListen {
                        addr: cfg.listen_addr,
                        source,
                    })?,
            ),
            Listen::Given(l) => Some(l),
            Listen::Off => None,
        };
        let mut admin_addr = None;
        if let Some(l) = listener {
            let addr = l.local_addr().map_err(|source| StartError::AdminListen {
                addr: cfg.listen_addr,
                source,
            })?;
            tracing::info!(%addr, "control plane listening");
            admin_addr = Some(addr);
            server::spawn_admin(
                l,
                router.clone(),
                cfg.admin_connections,
                token.clone(),
                &tracker,
            );
        }
        Ok(ControlPlane {
            state,
            router,
            pool,
            owns_pool,
            token,
            tracker,
            grace: cfg.shutdown_grace,
            admin_addr,
            agent_addr,
            _guard: guard,
        })
    }
}

/// A running control plane: its state, its admin router and its background services.
///
/// Dropping it cancels its token (every service stops; nothing waits). [`ControlPlane::wait`]
/// is the orderly path: it waits for the token, then drains within `shutdown_grace`.
#[derive(Debug)]
pub struct ControlPlane {
    state: AppState,
    router: Router,
    pool: PgPool,
    owns_pool: bool,
    token: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
    admin_addr: Option<SocketAddr>,
    agent_addr: Option<SocketAddr>,
    _guard: DropGuard,
}

impl ControlPlane {
    /// The one way to start the system: `ControlPlane::builder(cfg).start().await`.
    pub fn builder(cfg: Config) -> ControlPlaneBuilder {
        ControlPlaneBuilder {
            cfg,
            pool: None,
            admin: Listen::FromConfig,
            agent: Listen::FromConfig,
            token: CancellationToken::new(),
            signals: false,
        }
    }

    /// The application state (shared by every handler).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The admin API router, as served on the admin listener.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Cancelling it stops the system.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The tracker every background service runs on (a test may spawn its own tasks on it).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Where the admin API listens, when it has a listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where the agent mTLS listener listens, when PKI is configured and it has a listener.
    pub fn agent_addr(&self) -> Option<SocketAddr> {
        self.agent_addr
    }

    /// Waits until the token is cancelled, then lets in-flight requests and background tasks
    /// finish within `shutdown_grace`, and closes the pool if the builder opened it.
    pub async fn wait(self) {
        let Self {
            state,
            router,
            pool,
            owns_pool,
            token,
            tracker,
            grace,
            _guard,
            ..
        } = self;
        token.cancelled().await;
        // The state and router hold the gateway's log senders: drop them so the log writer
        // can flush and end.
        drop(state);
        drop(router);
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                grace_ms = grace.as_millis(),
                "in-flight requests did not finish within the shutdown grace period"
            );
        }
        if owns_pool {
            pool.close().await;
        }
        tracing::info!("control plane stopped");
    }

    /// Cancels the token and [`waits`](Self::wait).
    pub async fn shutdown(self) {
        self.token.cancel();
        self.wait().await;
    }
}

/// Creates the platform-admin key when none is active (or replaces it with
/// `--reset-admin-key`) and says where it is.
async fn bootstrap_admin_key(cfg: &Config, pool: &PgPool) -> Result<(), db::DbError> {
    if cfg.reset_admin_key {
        db::reset_admin_key(pool, &cfg.admin_key_file).await?;
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "revoked the platform-admin keys and wrote a new one to this file (mode 0600)"
        );
    } else if db::ensure_admin_key(pool, &cfg.admin_key_file).await? {
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "created the platform-admin API key; read it from this file (mode 0600)"
        );
    } else if !cfg.admin_key_file.exists() {
        tracing::warn!(
            path = %cfg.admin_key_file.display(),
            "a platform-admin key exists but this file does not: if the key is lost, restart \
             once with --reset-admin-key to revoke it and write a new one here"
        );
    }
    Ok(())
}

/// Installs the global tracing subscriber according to the config (see
/// [`kip_shared::logging`]).
pub fn init_tracing(format: config::LogFormat, filter: &str) {
    kip_shared::logging::init(
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
        format,
        filter,
    );
}
