//! Fleet PKI glue: the loaded CA, the agent mTLS listener and its live TLS configuration.
//!
//! Invariants:
//! - The agent listener speaks TLS 1.3 only and requires a client certificate from the fleet
//!   CA (see `kip_certs::server_config`). Handlers learn the device from that certificate
//!   ([`crate::pki_api::DeviceCert`]), never from a header or the body.
//! - Revocation takes effect on the next handshake: [`Pki::refresh`] rebuilds the server
//!   configuration with fresh CRLs from the `certificates` table and swaps it in through
//!   `RustlsConfig::reload_from_config`; open connections finish on the old configuration,
//!   and every request on them is still checked against the database by `DeviceCert`.
//! - Nothing the listener presents expires unnoticed: the server certificate is re-issued when
//!   half of its lifetime has passed, on the periodic refresh (`crl_refresh_interval`, which the
//!   config keeps below half the server lifetime). A failed refresh keeps the last good
//!   configuration and is logged as an error.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum_server::tls_rustls::RustlsConfig;
use chrono::{DateTime, Utc};
use kip_certs::{FleetCa, RevokedSerial, ServerIdentity};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::PkiConfig;

/// Why the PKI could not be set up or refreshed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("fleet CA: {0}")]
    Ca(#[from] kip_certs::CertError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Validity of a CRL. CRL expiry is not enforced by the verifier; this is what a third party
/// reading the CRL would see. Refreshes happen far more often.
const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

/// The loaded fleet CA plus the agent listener's live TLS configuration.
pub struct Pki {
    ca: FleetCa,
    device_cert_lifetime: Duration,
    server_names: Vec<String>,
    server_cert_lifetime: Duration,
    expired_renewal_grace: Duration,
    tls: RustlsConfig,
    /// Current server identity; replaced when half of its lifetime has passed.
    server: tokio::sync::Mutex<ServerIdentity>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("device_cert_lifetime", &self.device_cert_lifetime)
            .field("server_names", &self.server_names)
            .finish_non_exhaustive()
    }
}

fn server_identity_clone(s: &ServerIdentity) -> ServerIdentity {
    ServerIdentity {
        chain: s.chain.clone(),
        key: s.key.clone_key(),
        not_after: s.not_after,
    }
}

impl Pki {
    /// Builds the PKI state from a loaded CA and the current revocations in `pool`.
    pub async fn new(ca: FleetCa, cfg: &PkiConfig, pool: &PgPool) -> Result<Arc<Self>, PkiError> {
        let now = SystemTime::now();
        let server =
            ca.current()
                .issue_server_cert(&cfg.server_names, now, cfg.server_cert_lifetime)?;
        let revoked = revoked_serials(pool).await?;
        let tls_cfg = kip_certs::server_config(
            ca.bundle(),
            server.chain.clone(),
            server.key.clone_key(),
            ca.crls(&revoked, now, CRL_VALIDITY)?,
        )?;
        if let Ok(left) = ca.current().not_after().duration_since(now)
            && left < Duration::from_secs(90 * 86_400)
        {
            tracing::warn!(
                days_left = left.as_secs() / 86_400,
                "the fleet intermediate CA expires soon: run `kipctl ca rotate-intermediate`"
            );
        }
        Ok(Arc::new(Self {
            ca,
            device_cert_lifetime: cfg.device_cert_lifetime,
            server_names: cfg.server_names.clone(),
            server_cert_lifetime: cfg.server_cert_lifetime,
            expired_renewal_grace: cfg.expired_renewal_grace,
            tls: RustlsConfig::from_config(tls_cfg),
            server: tokio::sync::Mutex::new(server),
        }))
    }

    /// Loads the CA named in the config, or `None` when PKI is not configured.
    pub async fn from_config(
        cfg: &PkiConfig,
        pool: &PgPool,
    ) -> Result<Option<Arc<Self>>, PkiError> {
        let Some(dir) = &cfg.ca_dir else {
            return Ok(None);
        };
        let ca = FleetCa::load(dir)?;
        Ok(Some(Self::new(ca, cfg, pool).await?))
    }

    pub fn ca(&self) -> &FleetCa {
        &self.ca
    }

    pub fn device_cert_lifetime(&self) -> Duration {
        self.device_cert_lifetime
    }

    /// How long after expiry a device certificate may still be renewed (0: never).
    pub fn expired_renewal_grace(&self) -> Duration {
        self.expired_renewal_grace
    }

    /// The trust bundle agents must use (PEM).
    pub fn bundle_pem(&self) -> String {
        self.ca.bundle().to_pem()
    }

    /// The live TLS configuration of the agent listener.
    pub fn tls(&self) -> &RustlsConfig {
        &self.tls
    }

    /// Rebuilds CRLs (and the server certificate when due) and swaps the configuration in.
    /// New handshakes use it at once.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), PkiError> {
        let now = SystemTime::now();
        let revoked = revoked_serials(pool).await?;
        // Held across the rebuild so two refreshes cannot swap in out of order.
        let mut server = self.server.lock().await;
        let half_left = server
            .not_after
            .duration_since(now)
            .is_ok_and(|left| left > self.server_cert_lifetime / 2);
        if !half_left {
            *server = self.ca.current().issue_server_cert(
                &self.server_names,
                now,
                self.server_cert_lifetime,
            )?;
            tracing::info!("agent listener certificate re-issued");
        }
        let id = server_identity_clone(&server);
        let cfg = kip_certs::server_config(
            self.ca.bundle(),
            id.chain,
            id.key,
            self.ca.crls(&revoked, now, CRL_VALIDITY)?,
        )?;
        self.tls.reload_from_config(cfg);
        tracing::debug!(revoked = revoked.len(), "agent TLS configuration refreshed");
        Ok(())
    }
}

/// Certificates to list in CRLs: revoked or belonging to a deleted device, not yet expired.
pub async fn revoked_serials(pool: &PgPool) -> Result<Vec<RevokedSerial>, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT c.serial, coalesce(c.revoked_at, now()) FROM certificates c \
         LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
         WHERE c.not_after > now() AND (c.revoked_at IS NOT NULL OR d.id IS NULL)",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(serial_hex, at)| RevokedSerial {
            serial_hex,
            revoked_at: at.into(),
        })
        .collect())
}

/// Serves the agent API with mTLS on `listener` until `token` is cancelled, and refreshes the
/// TLS configuration every `refresh_every`. Both tasks run on `tracker`. `state.pki` must be
/// set (the caller checked it).
pub fn spawn_agent_listener(
    listener: std::net::TcpListener,
    state: &crate::server::AppState,
    pki: Arc<Pki>,
    refresh_every: Duration,
    token: CancellationToken,
    tracker: &TaskTracker,
    grace: Duration,
) -> Result<(), PkiError> {
    let router = crate::pki_api::agent_router(state.clone());
    let pool = state.pool.clone();
    let addr = listener.local_addr().map_err(|source| PkiError::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| PkiError::Listen { addr, source })?;
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, pki.tls().clone())
        .map_err(|source| PkiError::Listen { addr, source })?
        .handle(handle.clone());
    let stop = token.clone();
    tracker.spawn(async move {
        let serve = server.serve(router.into_make_service());
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "agent listener failed");
                }
                return;
            }
            () = stop.cancelled() => handle.graceful_shutdown(Some(grace)),
        }
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "agent listener failed during shutdown");
        }
    });
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(refresh_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = pki.refresh(&pool).await {
                        tracing::error!(error = %e, "agent TLS refresh failed; keeping the last configuration");
                    }
                }
            }
        }
    });
    tracing::info!(%addr, "agent mTLS listener listening");
    Ok(())
}
