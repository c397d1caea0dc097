//! PKI domain: the loaded fleet CA and the agent listener's live TLS configuration, CA reload
//! and rollover, enrollment, renewal, revocation and CRLs.
//!
//! Interface for other domains: [`Pki`] (the TLS configuration the agent listener serves
//! with), [`authenticate_device`] (who is behind a client certificate), [`renew_device`],
//! [`desired_trust`] (CA rollover hints for a sync ack) and [`spawn_maintenance`] (the
//! periodic CRL refresh, CA reload and recount, started by the composition root).
//!
//! Invariants:
//! - The agent listener speaks TLS 1.3 only and requires a client certificate from the fleet
//!   CA (see `kip_certs::server_config`). Handlers learn the device from that certificate
//!   ([`DeviceCert`], checked by [`authenticate_device`]), never from a header or the body.
//! - CRLs list every revoked certificate (and every certificate of a revoked or deleted
//!   device) not expired for longer than `pki.expired_renewal_grace_s`; superseded
//!   certificates are refused per request instead (see `api`).
//! - Revocation takes effect on the next handshake: [`Pki::refresh`] rebuilds the server
//!   configuration with fresh CRLs from the `certificates` table and swaps it in through
//!   `RustlsConfig::reload_from_config`; open connections finish on the old configuration,
//!   and every request on them is still checked against the database by `DeviceCert`.
//! - Nothing the listener presents expires unnoticed: the server certificate is re-issued when
//!   half of its lifetime has passed, on the periodic refresh (`crl_refresh_interval`, which the
//!   config keeps below half the server lifetime). A failed refresh keeps the last good
//!   configuration and is logged as an error.
//! - Hot CA reload: the CA files are checked every `ca_reload_interval` (and at once on
//!   SIGHUP) by content hash. A changed CA is loaded, checked (every key matches its
//!   certificate) and swapped in atomically ([`ArcSwap`]); then the TLS configuration is
//!   rebuilt with the new bundle and one CRL per kept intermediate, so during a rollover the
//!   listener accepts devices of the old and the new intermediate, and new certificates are
//!   signed by the new one. A CA that does not load (e.g. read between two writes of a
//!   rotation) is not used: the last good CA stays, and the next check tries again.
//! - The listener's own certificate comes from [`FleetCa::server_issuer`] and is re-issued as
//!   soon as that issuer changes (rotation, finished rotation).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use axum_server::tls_rustls::RustlsConfig;
use chrono::{DateTime, Utc};
use kip_certs::{CaPaths, FleetCa, RevokedSerial, ServerIdentity};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use self::metrics::{CaLabels, IssuerLabels, ReloadLabels};
pub use self::{
    api::{DeviceCert, authenticate_device, desired_trust, renew_device},
    metrics::PkiMetrics,
};
use crate::config::PkiConfig;

mod api;
pub mod enroll_limit;
mod metrics;
mod ot_api;

pub use self::api::{ca_status_of, router};

/// The newest certificate of each device of an organisation that is not revoked, soonest
/// expiry first (for the console).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceCertExpiry {
    pub device_id: Uuid,
    pub device_name: Option<String>,
    pub serial: String,
    pub issued_at: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// Each device's newest unrevoked certificate in `org_id`, soonest `not_after` first, at most
/// `limit` (the caller checked the organisation against its principal).
pub async fn device_cert_expiries(
    pool: &PgPool,
    org_id: Uuid,
    limit: i64,
) -> Result<Vec<DeviceCertExpiry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT * FROM (SELECT DISTINCT ON (c.device_id) c.device_id, d.name AS device_name, \
                c.serial, c.issued_at, c.not_after \
         FROM certificates c LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
         WHERE c.org_id = $1 AND c.revoked_at IS NULL \
         ORDER BY c.device_id, c.not_after DESC) x ORDER BY not_after LIMIT $2",
    )
    .bind(org_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Why the PKI could not be set up or refreshed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("fleet CA: {0}")]
    Ca(#[from] kip_certs::CertError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Validity of a CRL. CRL expiry is not enforced by the verifier; this is what a third party
/// reading the CRL would see. Refreshes happen far more often.
const CRL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);
/// Below this much time left on the intermediate or the root, every CA check logs a warning.
pub const CA_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// The listener's certificate and the fingerprint of the intermediate that issued it.
struct ServerCert {
    id: ServerIdentity,
    issuer: String,
}

/// What happens to a device's certificates when it gets a new one, and how often it may.
#[derive(Debug, Clone, Copy)]
pub struct RenewalPolicy {
    /// The direct predecessor keeps working this long (`pki.renewal_overlap_s`).
    pub overlap: Duration,
    /// At most this many certificates per device within `window`.
    pub per_window: u32,
    pub window: Duration,
}

/// The loaded fleet CA plus the agent listener's live TLS configuration.
pub struct Pki {
    ca: ArcSwap<FleetCa>,
    /// Where the CA was loaded from; `None` for a CA built in memory (never reloaded).
    ca_dir: Option<std::path::PathBuf>,
    ca_reload_interval: Duration,
    /// Content hash of the CA files last loaded successfully.
    ca_hash: tokio::sync::Mutex<Option<[u8; 32]>>,
    device_cert_lifetime: Duration,
    server_names: Vec<String>,
    server_cert_lifetime: Duration,
    expired_renewal_grace: Duration,
    agent_request_timeout: Duration,
    /// Renewal policy: predecessor overlap and the per-device rate limit.
    renewal: RenewalPolicy,
    tls: RustlsConfig,
    /// Current server identity; replaced when half of its lifetime has passed or when
    /// [`FleetCa::server_issuer`] changes.
    server: tokio::sync::Mutex<ServerCert>,
    /// Per-address limit on `POST /enroll`, checked before the database.
    enroll_limit: enroll_limit::IpRateLimit,
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
        Self::build(ca, cfg, pool, None).await
    }

    /// `source`: the CA directory and the content hash it was loaded with (hot reload).
    async fn build(
        ca: FleetCa,
        cfg: &PkiConfig,
        pool: &PgPool,
        source: Option<(std::path::PathBuf, [u8; 32])>,
    ) -> Result<Arc<Self>, PkiError> {
        let now = SystemTime::now();
        let issuer = ca.server_issuer(now);
        let server = ServerCert {
            id: issuer.issue_server_cert(&cfg.server_names, now, cfg.server_cert_lifetime)?,
            issuer: issuer.fingerprint(),
        };
        let revoked = revoked_serials(pool, cfg.expired_renewal_grace).await?;
        let tls_cfg = kip_certs::server_config(
            ca.bundle(),
            server.id.chain.clone(),
            server.id.key.clone_key(),
            ca.crls(&revoked, now, CRL_VALIDITY)?,
        )?;
        warn_if_expiring(&ca, now);
        Ok(Arc::new(Self {
            ca: ArcSwap::from_pointee(ca),
            ca_hash: tokio::sync::Mutex::new(source.as_ref().map(|(_, h)| *h)),
            ca_dir: source.map(|(d, _)| d),
            ca_reload_interval: cfg.ca_reload_interval,
            device_cert_lifetime: cfg.device_cert_lifetime,
            server_names: cfg.server_names.clone(),
            server_cert_lifetime: cfg.server_cert_lifetime,
            expired_renewal_grace: cfg.expired_renewal_grace,
            agent_request_timeout: cfg.agent_request_timeout,
            renewal: RenewalPolicy {
                overlap: cfg.renewal_overlap,
                per_window: cfg.renewals_per_window,
                window: cfg.renewal_window,
            },
            tls: RustlsConfig::from_config(tls_cfg),
            server: tokio::sync::Mutex::new(server),
            enroll_limit: enroll_limit::IpRateLimit::new(cfg.enrollments_per_ip_per_minute),
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
        // Hashed before loading: a change racing the load is seen (and loaded) on the next
        // check, never missed.
        let hash = CaPaths::new(dir).content_sha256()?;
        let ca = FleetCa::load(dir)?;
        Ok(Some(
            Self::build(ca, cfg, pool, Some((dir.clone(), hash))).await?,
        ))
    }

    /// The CA as loaded now. Take one snapshot per operation, so that signing, bundle and
    /// CRLs of one request come from the same CA even if a reload happens meanwhile.
    pub fn ca(&self) -> Arc<FleetCa> {
        self.ca.load_full()
    }

    /// The per-address limit of `POST /enroll`.
    pub fn enroll_limit(&self) -> &enroll_limit::IpRateLimit {
        &self.enroll_limit
    }

    /// How often [`Pki::reload_ca`] runs.
    pub fn ca_reload_interval(&self) -> Duration {
        self.ca_reload_interval
    }

    /// Loads the CA files again when their content changed, swaps the new CA in and rebuilds
    /// the TLS configuration. `Ok(false)`: nothing changed (or the CA is not file-based).
    /// On error the current CA stays in use.
    pub async fn reload_ca(&self, pool: &PgPool) -> Result<bool, PkiError> {
        let Some(dir) = &self.ca_dir else {
            return Ok(false);
        };
        let mut last = self.ca_hash.lock().await;
        let hash = CaPaths::new(dir).content_sha256()?;
        if *last == Some(hash) {
            return Ok(false);
        }
        let new = Arc::new(FleetCa::load(dir)?);
        // The TLS configuration for the new CA is built first and the signer swapped under
        // the same lock: if building fails (e.g. the database is down for the CRLs), nothing
        // changes and the next check tries again, so no device certificate is ever signed by
        // an intermediate the listener does not accept yet.
        let old = self
            .rebuild(pool, Some(new))
            .await?
            .unwrap_or_else(|| self.ca());
        *last = Some(hash);
        drop(last);
        let ca = self.ca();
        tracing::info!(
            old_intermediate = %old.current().fingerprint(),
            intermediate = %ca.current().fingerprint(),
            previous_intermediate = ca.previous().map(|p| p.fingerprint()).unwrap_or_default(),
            bundle_sha256 = %ca.bundle().sha256_hex(),
            bundle_roots = ca.bundle().certs().len(),
            "fleet CA reloaded"
        );
        warn_if_expiring(&ca, SystemTime::now());
        Ok(true)
    }

    pub fn device_cert_lifetime(&self) -> Duration {
        self.device_cert_lifetime
    }

    /// How long after expiry a device certificate may still be renewed (0: never).
    pub fn expired_renewal_grace(&self) -> Duration {
        self.expired_renewal_grace
    }

    /// Longest a request on the agent listener may take (`pki.agent_request_timeout_ms`).
    pub fn agent_request_timeout(&self) -> Duration {
        self.agent_request_timeout
    }

    /// Overlap of a superseded certificate and the per-device renewal rate limit.
    pub fn renewal_policy(&self) -> RenewalPolicy {
        self.renewal
    }

    /// The trust bundle agents must use (PEM).
    pub fn bundle_pem(&self) -> String {
        self.ca().bundle().to_pem()
    }

    /// The live TLS configuration of the agent listener.
    pub fn tls(&self) -> &RustlsConfig {
        &self.tls
    }

    /// Rebuilds CRLs (and the server certificate when due) and swaps the configuration in.
    /// New handshakes use it at once.
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), PkiError> {
        self.rebuild(pool, None).await.map(|_| ())
    }

    /// [`Pki::refresh`] for the current CA, or for `replace`, which is swapped in (and the
    /// CA it replaces returned) only once its TLS configuration is live.
    async fn rebuild(
        &self,
        pool: &PgPool,
        replace: Option<Arc<FleetCa>>,
    ) -> Result<Option<Arc<FleetCa>>, PkiError> {
        let now = SystemTime::now();
        let revoked = revoked_serials(pool, self.expired_renewal_grace).await?;
        // Held across the rebuild so two refreshes cannot swap in out of order, and a
        // refresh cannot rebuild for the old CA after a reload swapped the new one in.
        let mut server = self.server.lock().await;
        let ca = replace.clone().unwrap_or_else(|| self.ca());
        let issuer = ca.server_issuer(now);
        let half_left = server
            .id
            .not_after
            .duration_since(now)
            .is_ok_and(|left| left > self.server_cert_lifetime / 2);
        if !half_left || server.issuer != issuer.fingerprint() {
            *server = ServerCert {
                id: issuer.issue_server_cert(&self.server_names, now, self.server_cert_lifetime)?,
                issuer: issuer.fingerprint(),
            };
            tracing::info!(issuer = %server.issuer, "agent listener certificate re-issued");
        }
        let id = server_identity_clone(&server.id);
        let cfg = kip_certs::server_config(
            ca.bundle(),
            id.chain,
            id.key,
            ca.crls(&revoked, now, CRL_VALIDITY)?,
        )?;
        self.tls.reload_from_config(cfg);
        let old = replace.map(|new| self.ca.swap(new));
        tracing::debug!(revoked = revoked.len(), "agent TLS configuration refreshed");
        Ok(old)
    }
}

/// Seconds from `now` to `t`, negative once passed.
fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Logs a warning when the signing intermediate or its root expires within
/// [`CA_EXPIRY_WARNING`].
fn warn_if_expiring(ca: &FleetCa, now: SystemTime) {
    for (what, not_after, fix) in [
        (
            "intermediate",
            Some(ca.current().not_after()),
            "kipctl ca rotate-intermediate",
        ),
        ("root", ca.root_not_after(), "kipctl ca rotate-root"),
    ] {
        let Some(not_after) = not_after else { continue };
        let left = seconds_until(not_after, now);
        if left < i64::try_from(CA_EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) {
            tracing::warn!(
                ca = what,
                days_left = left / 86_400,
                "the fleet {what} CA expires soon: run `{fix}` (see docs/operations.md)"
            );
        }
    }
}

/// Sets the `kip_pki_ca_expiry_seconds` gauges from the current CA.
pub fn update_expiry_metrics(pki: &Pki, m: &PkiMetrics, now: SystemTime) {
    let ca = pki.ca();
    m.ca_expiry_seconds
        .get_or_create(&CaLabels { ca: "intermediate" })
        .set(seconds_until(ca.current().not_after(), now));
    if let Some(root) = ca.root_not_after() {
        m.ca_expiry_seconds
            .get_or_create(&CaLabels { ca: "root" })
            .set(seconds_until(root, now));
    }
}

/// How often `kip_pki_devices_by_issuer` and the expiry gauges are recomputed.
const DEVICE_COUNT_INTERVAL: Duration = Duration::from_secs(60);

/// Counts devices by the intermediate that issued their newest unexpired, unrevoked
/// certificate into `kip_pki_devices_by_issuer`, and returns (current, previous, other).
/// `previous` is the number of devices that have not renewed since a rotation: until it is
/// 0, finishing the rotation would cut them off.
pub async fn count_devices_by_issuer(
    pki: &Pki,
    pool: &PgPool,
    m: &PkiMetrics,
) -> Result<(i64, i64, i64), sqlx::Error> {
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT issuer_sha256, count(*) FROM ( \
             SELECT DISTINCT ON (org_id, device_id) issuer_sha256 FROM certificates \
             WHERE revoked_at IS NULL AND not_after > now() \
             ORDER BY org_id, device_id, issued_at DESC \
         ) newest GROUP BY issuer_sha256",
    )
    .fetch_all(pool)
    .await?;
    let ca = pki.ca();
    let current = ca.current().fingerprint();
    let previous = ca.previous().map(|p| p.fingerprint());
    let (mut c, mut p, mut o) = (0, 0, 0);
    for (issuer, n) in rows {
        match issuer {
            Some(i) if i == current => c += n,
            Some(i) if Some(&i) == previous.as_ref() => p += n,
            _ => o += n,
        }
    }
    for (issuer, n) in [("current", c), ("previous", p), ("other", o)] {
        m.devices_by_issuer
            .get_or_create(&IssuerLabels { issuer })
            .set(n);
    }
    Ok((c, p, o))
}

/// Certificates to list in CRLs: revoked, of a revoked device or of a deleted device, and
/// not expired for longer than `grace` (`pki.expired_renewal_grace_s`), so a revoked
/// certificate stays listed for as long as anything would still accept it, expired or not.
/// Superseded (retired) certificates are not listed: there is one per renewal, and every
/// request checks them against the database ([`authenticate_device`]).
pub async fn revoked_serials(
    pool: &PgPool,
    grace: Duration,
) -> Result<Vec<RevokedSerial>, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT c.serial, coalesce(c.revoked_at, r.revoked_at, now()) FROM certificates c \
         LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
         LEFT JOIN device_revocations r ON r.org_id = c.org_id AND r.device_id = c.device_id \
         WHERE c.not_after > now() - make_interval(secs => $1::float8) \
           AND (c.revoked_at IS NOT NULL OR r.device_id IS NOT NULL OR d.id IS NULL)",
    )
    .bind(grace.as_secs_f64())
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

async fn count_certificates_logged(pki: &Pki, pool: &PgPool, m: &PkiMetrics) {
    if let Err(e) = count_devices_by_issuer(pki, pool, m).await {
        tracing::warn!(error = %e, "cannot count devices by certificate issuer");
    }
    ot_api::update_expiry_metrics(pool, m).await;
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; CA changes are found by polling only");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Resolves on SIGHUP; never when there is no handler.
async fn recv_hangup(h: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = h {
        return s.recv().await;
    }
    let _ = h;
    std::future::pending().await
}

/// Keeps the agent listener's TLS configuration and the PKI metrics current, on `tracker`
/// until `token` is cancelled: rebuilds CRLs (and the server certificate when due) every
/// `refresh_every`, reloads changed CA files every `ca_reload_interval` and on SIGHUP, and
/// recounts devices by issuer every minute.
pub fn spawn_maintenance(
    pki: Arc<Pki>,
    pool: PgPool,
    metrics: PkiMetrics,
    refresh_every: Duration,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(refresh_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut reload = tokio::time::interval(pki.ca_reload_interval());
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reload.tick().await;
        let mut hangup = hangup_signal();
        // Enrollments and renewals change the per-issuer device counts at any time; a minute
        // is fresh enough for a rotation dashboard and cheap for the database.
        let mut recount = tokio::time::interval(DEVICE_COUNT_INTERVAL);
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recount.tick().await;
        update_expiry_metrics(&pki, &metrics, SystemTime::now());
        count_certificates_logged(&pki, &pool, &metrics).await;
        loop {
            let reason = tokio::select! {
                () = token.cancelled() => return,
                _ = recount.tick() => {
                    count_certificates_logged(&pki, &pool, &metrics).await;
                    update_expiry_metrics(&pki, &metrics, SystemTime::now());
                    continue;
                }
                _ = tick.tick() => {
                    if let Err(e) = pki.refresh(&pool).await {
                        tracing::error!(error = %e, "agent TLS refresh failed; keeping the last configuration");
                    }
                    // Repeated (every crl_refresh_interval) so a long-running process keeps
                    // reminding, not only at start.
                    warn_if_expiring(&pki.ca(), SystemTime::now());
                    continue;
                }
                _ = reload.tick() => "poll",
                Some(()) = recv_hangup(&mut hangup) => "SIGHUP",
            };
            match pki.reload_ca(&pool).await {
                Ok(true) => {
                    metrics.ca_reloads.get_or_create(&ReloadLabels { result: "ok" }).inc();
                    count_certificates_logged(&pki, &pool, &metrics).await;
                }
                Ok(false) => {
                    if reason == "SIGHUP" {
                        tracing::info!("SIGHUP: the CA files are unchanged");
                    }
                }
                Err(e) => {
                    metrics.ca_reloads.get_or_create(&ReloadLabels { result: "error" }).inc();
                    tracing::warn!(error = %e, trigger = reason,
                        "the CA files changed but cannot be loaded (rotation still writing?); \
                         keeping the current CA and retrying at the next check");
                }
            }
            update_expiry_metrics(&pki, &metrics, SystemTime::now());
        }
    });
}
