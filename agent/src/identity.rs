//! Device identity: enrollment, on-disk credentials and certificate renewal.
//!
//! On disk, in the identity directory (e.g. `{state_dir}/identity/`):
//! - `device.pem` (mode 0600): the device's private key followed by its certificate chain.
//!   Key and chain live in ONE file replaced atomically (write temp, fsync, rename), so after a
//!   crash at any point the file holds either the old pair or the new pair, never a key with
//!   another key's certificate.
//! - `bundle.pem`: the roots that the agent trusts for the control plane's agent listener.
//!
//! Invariants:
//! - The private key is generated here and never leaves the device; only CSRs are sent.
//! - Renewal starts at [`RenewalPolicy::fraction`] (2/3 by default, as step-ca) of the
//!   certificate's lifetime, with jitter so a fleet enrolled at once does not renew at once.
//!   A failed attempt is retried with capped exponential backoff, never later than
//!   [`RenewalPolicy::deadline_margin`] before expiry (then at the minimum retry interval).
//! - The old key and certificate stay in use (and on disk) until the new pair has been
//!   checked (key matches, same device) and stored; only then is the new rustls
//!   `ClientConfig` published through the `watch` channel. Open connections keep the old one.
//! - The trust bundle returned on renewal replaces the stored one: that is how agents pick
//!   up a CA rollover.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use kip_certs::{DeviceKey, PeerCert, TrustBundle, certs_from_pem, files, rustls};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("credentials: {0}")]
    Cert(#[from] kip_certs::CertError),
    #[error("cannot reach the control plane at {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("control plane refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("control plane answered an unusable certificate: {0}")]
    BadAnswer(String),
}

/// File names inside the identity directory.
const DEVICE_FILE: &str = "device.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// A device's credentials: key, certificate chain, trust bundle.
pub struct Identity {
    key: DeviceKey,
    chain_pem: String,
    bundle: TrustBundle,
    cert: PeerCert,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert", &self.cert)
            .field("key", &"...")
            .finish()
    }
}

impl Identity {
    /// Builds and checks an identity: the chain parses, names a device, and matches the key.
    pub fn new(
        key: DeviceKey,
        chain_pem: String,
        bundle: TrustBundle,
    ) -> Result<Self, IdentityError> {
        let chain = certs_from_pem(&chain_pem, "device certificate chain")?;
        let leaf = chain
            .first()
            .ok_or_else(|| IdentityError::BadAnswer("empty certificate chain".into()))?;
        let cert = kip_certs::parse_peer_cert(leaf)?;
        let id = Self {
            key,
            chain_pem,
            bundle,
            cert,
        };
        // rustls refuses a key that does not match the certificate.
        id.client_config()?;
        Ok(id)
    }

    /// Loads the identity from `dir`; `None` when the device has not enrolled yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let device = dir.join(DEVICE_FILE);
        if !device.exists() {
            return Ok(None);
        }
        let pem = files::read(&device)?;
        let key = DeviceKey::from_pem(&pem)?;
        let chain_pem: String = certs_from_pem(&pem, "device certificate chain")?
            .iter()
            .map(kip_certs::cert_to_pem)
            .collect();
        let bundle = TrustBundle::from_pem(&files::read(&dir.join(BUNDLE_FILE))?)?;
        Self::new(key, chain_pem, bundle).map(Some)
    }

    /// Stores the identity in `dir`: the bundle first (harmless alone), then key+chain in one
    /// atomic replace.
    pub fn store(&self, dir: &Path) -> Result<(), IdentityError> {
        files::write_public(&dir.join(BUNDLE_FILE), &self.bundle.to_pem())?;
        files::write_private(
            &dir.join(DEVICE_FILE),
            &format!("{}{}", self.key.to_pem(), self.chain_pem),
        )?;
        Ok(())
    }

    /// The certificate's parsed contents (organisation, device, serial, validity).
    pub fn cert(&self) -> &PeerCert {
        &self.cert
    }

    pub fn org_id(&self) -> Uuid {
        self.cert.identity.org_id
    }

    pub fn device_id(&self) -> Uuid {
        self.cert.identity.device_id
    }

    /// Seconds until the certificate expires (negative once expired).
    pub fn seconds_to_expiry(&self, now: SystemTime) -> i64 {
        seconds_until(self.cert.not_after, now)
    }

    /// The TLS 1.3 client configuration presenting this identity.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        let chain = certs_from_pem(&self.chain_pem, "device certificate chain")?;
        Ok(kip_certs::client_config(
            &self.bundle,
            chain,
            self.key.private_key_der(),
        )?)
    }
}

fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// What the control plane returns from `/enroll` and `/v1/agent/renew` (fields used here).
#[derive(Debug, Deserialize)]
struct CertificateAnswer {
    certificate_chain_pem: String,
    trust_bundle_pem: String,
}

async fn post_csr(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> Result<CertificateAnswer, IdentityError> {
    let http_err = |source| IdentityError::Http {
        url: url.to_owned(),
        source,
    };
    let resp = http.post(url).json(&body).send().await.map_err(http_err)?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(http_err)?;
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(IdentityError::Refused {
            status: status.as_u16(),
            message: v["error"]["message"]
                .as_str()
                .map(ToOwned::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| IdentityError::BadAnswer(e.to_string()))
}

/// Enrolls this device: generates a key, sends a CSR with the one-time `token` to
/// `{control_plane_url}/enroll`, stores the result in `dir` and returns it.
///
/// `http` is a plain client for the admin listener (the token authenticates the request;
/// use HTTPS there in production). Building it needs the process-wide rustls provider
/// (ring) installed; [`mtls_client`] does not, its configuration carries the provider.
pub async fn enroll(
    http: &reqwest::Client,
    control_plane_url: &str,
    token: &str,
    device_name: &str,
    org_id: Option<Uuid>,
    dir: &Path,
) -> Result<Identity, IdentityError> {
    let key = DeviceKey::generate()?;
    let url = format!("{}/enroll", control_plane_url.trim_end_matches('/'));
    let answer = post_csr(
        http,
        &url,
        serde_json::json!({
            "token": token,
            "csr_pem": key.csr_pem(device_name)?,
            "device_name": device_name,
            "org_id": org_id,
        }),
    )
    .await?;
    let id = Identity::new(
        key,
        answer.certificate_chain_pem,
        TrustBundle::from_pem(&answer.trust_bundle_pem)?,
    )?;
    id.store(dir)?;
    tracing::info!(
        org_id = %id.org_id(), device_id = %id.device_id(), serial = %id.cert().serial_hex,
        "device enrolled"
    );
    Ok(id)
}

/// An HTTP client presenting `identity` (a fresh client, so fresh TLS handshakes).
pub fn mtls_client(
    identity: &Identity,
    timeout: Duration,
) -> Result<reqwest::Client, IdentityError> {
    let cfg = (*identity.client_config()?).clone();
    reqwest::Client::builder()
        .tls_backend_preconfigured(cfg)
        .timeout(timeout)
        .build()
        .map_err(|source| IdentityError::Http {
            url: String::new(),
            source,
        })
}

/// One renewal: new key, CSR over mTLS with the current certificate, checks the answer.
/// Nothing is stored and the current identity stays valid whatever happens.
pub async fn renew_once(
    current: &Identity,
    agent_api_url: &str,
    timeout: Duration,
) -> Result<Identity, IdentityError> {
    let http = mtls_client(current, timeout)?;
    let key = DeviceKey::generate()?;
    let url = format!("{}/v1/agent/renew", agent_api_url.trim_end_matches('/'));
    let answer = post_csr(
        &http,
        &url,
        serde_json::json!({ "csr_pem": key.csr_pem(&current.device_id().to_string())? }),
    )
    .await?;
    let new = Identity::new(
        key,
        answer.certificate_chain_pem,
        TrustBundle::from_pem(&answer.trust_bundle_pem)?,
    )?;
    if new.cert.identity != current.cert.identity {
        return Err(IdentityError::BadAnswer(
            "renewed certificate names another device".into(),
        ));
    }
    Ok(new)
}

/// Renews an EXPIRED certificate through `{control_plane_url}/renew-expired`, proving
/// possession of the current key (the CSR is signed with it; the key is kept). Used when the
/// device was offline longer than its certificate lifetime; the control plane allows it for
/// a grace period after expiry. Nothing is stored.
pub async fn renew_expired(
    http: &reqwest::Client,
    control_plane_url: &str,
    current: &Identity,
) -> Result<Identity, IdentityError> {
    let url = format!("{}/renew-expired", control_plane_url.trim_end_matches('/'));
    let answer = post_csr(
        http,
        &url,
        serde_json::json!({
            "certificate_chain_pem": current.chain_pem,
            "csr_pem": current.key.csr_pem(&current.device_id().to_string())?,
        }),
    )
    .await?;
    let new = Identity::new(
        DeviceKey::from_pem(&current.key.to_pem())?,
        answer.certificate_chain_pem,
        TrustBundle::from_pem(&answer.trust_bundle_pem)?,
    )?;
    if new.cert.identity != current.cert.identity {
        return Err(IdentityError::BadAnswer(
            "renewed certificate names another device".into(),
        ));
    }
    Ok(new)
}

/// When and how to renew.
#[derive(Debug, Clone)]
pub struct RenewalPolicy {
    /// Fraction of the lifetime after which renewal starts (2/3 by default).
    pub fraction: f64,
    /// Jitter as a fraction of the lifetime, applied ± around the renewal time (5 %).
    pub jitter_fraction: f64,
    /// First retry delay after a failed attempt; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Retries never wait past `not_after - deadline_margin`.
    pub deadline_margin: Duration,
    /// Timeout of one renewal request.
    pub request_timeout: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            fraction: 2.0 / 3.0,
            jitter_fraction: 0.05,
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            deadline_margin: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl RenewalPolicy {
    /// When to renew a certificate valid from `not_before` to `not_after`; `jitter` is a
    /// random value in [-1, 1]. Never later than `not_after - deadline_margin`.
    pub fn renew_at(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        jitter: f64,
    ) -> SystemTime {
        let lifetime = not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO);
        let offset = lifetime.as_secs_f64()
            * (self.fraction + self.jitter_fraction * jitter.clamp(-1.0, 1.0)).clamp(0.0, 1.0);
        let at = not_before + Duration::from_secs_f64(offset);
        let latest = not_after
            .checked_sub(self.deadline_margin)
            .unwrap_or(not_before)
            .max(not_before);
        at.min(latest)
    }

    /// Delay before retry number `attempt` (1-based), capped so it ends before the deadline.
    pub fn retry_delay(&self, attempt: u32, now: SystemTime, not_after: SystemTime) -> Duration {
        let exp = self
            .retry_min
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.retry_max);
        let until_deadline = not_after
            .checked_sub(self.deadline_margin)
            .and_then(|d| d.duration_since(now).ok())
            .unwrap_or(Duration::ZERO);
        exp.min(until_deadline).max(self.retry_min)
    }
}

/// The live credentials other agent modules use: the current TLS client configuration (new
/// connections should take the latest) and the seconds left on the certificate (a metric).
#[derive(Debug, Clone)]
pub struct IdentityHandle {
    pub client_config: watch::Receiver<Arc<rustls::ClientConfig>>,
    not_after_unix: Arc<AtomicI64>,
}

impl IdentityHandle {
    /// Seconds until the current certificate expires (negative once expired).
    pub fn seconds_to_expiry(&self, now: SystemTime) -> i64 {
        let now_unix = seconds_until(now, SystemTime::UNIX_EPOCH);
        self.not_after_unix.load(Ordering::Relaxed) - now_unix
    }
}

/// The renewal loop's state; run it with [`Renewer::run`] on the agent's task tracker.
#[derive(Debug)]
pub struct Renewer {
    identity: Identity,
    dir: PathBuf,
    agent_api_url: String,
    policy: RenewalPolicy,
    tx: watch::Sender<Arc<rustls::ClientConfig>>,
    not_after_unix: Arc<AtomicI64>,
    /// Plain client and admin URL for `/renew-expired`, used once the certificate expired.
    recovery: Option<(reqwest::Client, String)>,
}

impl Renewer {
    /// Enables renewal of an expired certificate through the control plane's admin URL.
    pub fn with_recovery(mut self, http: reqwest::Client, control_plane_url: String) -> Self {
        self.recovery = Some((http, control_plane_url));
        self
    }

    /// Prepares renewal of `identity` (stored in `dir`) against the agent listener at
    /// `agent_api_url`, and returns the handle other modules read credentials from.
    pub fn new(
        identity: Identity,
        dir: PathBuf,
        agent_api_url: String,
        policy: RenewalPolicy,
    ) -> Result<(Self, IdentityHandle), IdentityError> {
        let (tx, rx) = watch::channel(identity.client_config()?);
        let not_after_unix = Arc::new(AtomicI64::new(seconds_until(
            identity.cert.not_after,
            SystemTime::UNIX_EPOCH,
        )));
        let handle = IdentityHandle {
            client_config: rx,
            not_after_unix: not_after_unix.clone(),
        };
        Ok((
            Self {
                identity,
                dir,
                agent_api_url,
                policy,
                tx,
                not_after_unix,
                recovery: None,
            },
            handle,
        ))
    }

    /// Renews, stores and publishes, then swaps the current identity. On error nothing changes.
    pub async fn renew_now(&mut self) -> Result<(), IdentityError> {
        let expired = self.identity.seconds_to_expiry(SystemTime::now()) <= 0;
        let new = match (&self.recovery, expired) {
            // The agent listener refuses an expired certificate: prove key possession instead.
            (Some((http, url)), true) => renew_expired(http, url, &self.identity).await?,
            _ => {
                renew_once(
                    &self.identity,
                    &self.agent_api_url,
                    self.policy.request_timeout,
                )
                .await?
            }
        };
        // Stored before it is used: a crash now restarts with the new pair.
        new.store(&self.dir)?;
        let cfg = new.client_config()?;
        self.not_after_unix.store(
            seconds_until(new.cert.not_after, SystemTime::UNIX_EPOCH),
            Ordering::Relaxed,
        );
        tracing::info!(
            old_serial = %self.identity.cert.serial_hex, serial = %new.cert.serial_hex,
            seconds_to_expiry = new.seconds_to_expiry(SystemTime::now()),
            "device certificate renewed"
        );
        self.identity = new;
        self.tx.send_replace(cfg);
        Ok(())
    }

    /// Renews at the policy's time, retrying on failure, until `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken) {
        let mut attempt: u32 = 0;
        loop {
            let now = SystemTime::now();
            let wait = if attempt == 0 {
                let jitter = rand::random::<f64>() * 2.0 - 1.0;
                let at = self.policy.renew_at(
                    self.identity.cert.not_before,
                    self.identity.cert.not_after,
                    jitter,
                );
                at.duration_since(now).unwrap_or(Duration::ZERO)
            } else {
                self.policy
                    .retry_delay(attempt, now, self.identity.cert.not_after)
            };
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew_now().await {
                Ok(()) => attempt = 0,
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let left = self.identity.seconds_to_expiry(SystemTime::now());
                    if left <= 0 {
                        tracing::error!(error = %e, attempt, "certificate EXPIRED and renewal failed; re-enrollment may be needed");
                    } else {
                        tracing::warn!(error = %e, attempt, seconds_to_expiry = left, "certificate renewal failed; retrying");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn renewal_starts_at_two_thirds_of_the_lifetime_within_the_jitter() {
        let p = RenewalPolicy::default();
        let nb = SystemTime::UNIX_EPOCH + 1000 * H;
        let na = nb + 24 * H;
        assert_eq!(p.renew_at(nb, na, 0.0), nb + 16 * H);
        let early = p.renew_at(nb, na, -1.0);
        let late = p.renew_at(nb, na, 1.0);
        assert!(early < nb + 16 * H && early >= nb + 16 * H - Duration::from_secs(4320 + 1));
        assert!(late > nb + 16 * H && late <= nb + 16 * H + Duration::from_secs(4320 + 1));
        assert!(late < na);
    }

    #[test]
    fn renewal_never_waits_past_the_deadline() {
        let p = RenewalPolicy {
            fraction: 1.0,
            ..RenewalPolicy::default()
        };
        let nb = SystemTime::UNIX_EPOCH + 1000 * H;
        let na = nb + H;
        assert_eq!(p.renew_at(nb, na, 1.0), na - p.deadline_margin);
    }

    #[test]
    fn retries_back_off_and_are_capped_by_the_deadline() {
        let p = RenewalPolicy::default();
        let now = SystemTime::UNIX_EPOCH + 1000 * H;
        let far = now + 24 * H;
        assert_eq!(p.retry_delay(1, now, far), Duration::from_secs(5));
        assert_eq!(p.retry_delay(2, now, far), Duration::from_secs(10));
        assert_eq!(p.retry_delay(30, now, far), Duration::from_secs(300));
        // Close to expiry the delay shrinks to the minimum, so attempts continue.
        let near = now + p.deadline_margin + Duration::from_secs(7);
        assert_eq!(p.retry_delay(10, now, near), Duration::from_secs(7));
        assert_eq!(p.retry_delay(10, now, now), p.retry_min);
    }

    #[test]
    fn seconds_until_is_signed() {
        let t = SystemTime::UNIX_EPOCH + H;
        assert_eq!(seconds_until(t + H, t), 3600);
        assert_eq!(seconds_until(t, t + H), -3600);
    }
}
