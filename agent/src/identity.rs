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
//! - The trust bundle returned on renewal replaces the stored one, and so does a bundle the
//!   control plane sends in a sync ack ([`IdentityHint::TrustBundle`]): that is how agents
//!   pick up a CA rollover on their next sync. A new bundle is written atomically (temp,
//!   fsync, rename) before the rebuilt `ClientConfig` is published; requests in flight finish
//!   on the connections (and configuration) they started with.
//! - A renewal hint ([`IdentityHint::RenewSoon`], sent while the certificate comes from an
//!   intermediate that no longer signs) brings the renewal forward to a random moment within
//!   [`RenewalPolicy::hint_delay_max`], so a fleet does not renew at once after a rollover.

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
use tokio::sync::{mpsc, watch};
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
    #[error(
        "the control plane at {url} does not accept the CA that issued this device certificate \
         (its intermediate was retired after a CA rollover, or the certificate belongs to another \
         deployment): enroll again with a new token (`kip-agent enroll`)"
    )]
    UnknownCa { url: String },
    #[error(
        "refusing to enroll over {url}: the one-time token and the trust bundle would cross the \
         network in clear; use https:// (plain http:// is accepted only for a loopback address)"
    )]
    InsecureEnrollUrl { url: String },
    #[error("enrollment URL {url:?} is not a valid http(s) URL: {reason}")]
    BadEnrollUrl { url: String, reason: String },
    #[error(
        "this device's clock is wrong: it reads {local} but the control plane at {url} says \
         {server} ({offset_s} s apart, more than the {max_s} s certificates tolerate); set the \
         time (NTP, or the RTC battery) and try again"
    )]
    ClockWrong {
        url: String,
        local: String,
        server: String,
        offset_s: i64,
        max_s: u64,
    },
    #[error(
        "the control plane's certificate at {url} is {what} at this device's time ({local}): \
         this device's clock is probably wrong; set the time (NTP, or the RTC battery) and try \
         again"
    )]
    ClockWrongTls {
        url: String,
        local: String,
        what: &'static str,
    },
}

/// Largest difference between this device's clock and the control plane's (from its `Date`
/// header) at which enrollment still goes ahead: the CA backdates certificates by this much
/// (5 minutes, `CLOCK_SKEW` in `certs/src/ca.rs`), so a device further off could not use
/// what it gets.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The control plane's clock minus `local`, from a response's `Date` header (1 s resolution).
pub fn clock_offset(date_header: Option<&str>, local: SystemTime) -> Option<i64> {
    let server = chrono::DateTime::parse_from_rfc2822(date_header?.trim()).ok()?;
    let local = chrono::DateTime::<chrono::Utc>::from(local);
    Some(server.timestamp() - local.timestamp())
}

/// Which time check of the server certificate failed, if a TLS error (anywhere in `e`'s source
/// chain) is one: the device's clock is then the likely culprit.
pub fn tls_time_error(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::InvalidCertificate(c)) = tls {
            match c {
                C::Expired | C::ExpiredContext { .. } => return Some("expired"),
                C::NotValidYet | C::NotValidYetContext { .. } => return Some("not valid yet"),
                _ => {}
            }
        }
        cur = err.source();
    }
    None
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Checks the control-plane URL of `kip-agent enroll`: `https://`, or `http://` to a loopback
/// address (`127.0.0.0/8`, `::1`, `localhost`), which never leaves the machine.
pub fn check_enroll_url(url: &str) -> Result<(), IdentityError> {
    let bad = |reason: String| IdentityError::BadEnrollUrl {
        url: url.to_owned(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(IdentityError::InsecureEnrollUrl {
                    url: url.to_owned(),
                })
            }
        }
        other => Err(bad(format!("scheme {other:?}: use https://"))),
    }
}

/// Narrows a leftover temporary file of an interrupted atomic write (`*.tmp`, may hold a
/// private key) to mode 0600 and removes it: the renamed file is the only valid copy.
pub fn clean_leftover_temp_files(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "tmp") {
            continue;
        }
        // Narrow first: if removing fails, the key material is at least not readable by others.
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(path = %path.display(),
                "removed a temporary file left by an interrupted write"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e,
                "cannot remove a leftover temporary file (narrowed to mode 0600)"),
        }
    }
}

/// Narrows `path` to mode 0600 if it is readable by group or others (a key file copied or
/// restored with a wide mode).
fn narrow_to_owner(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777),
            "private key file was readable by others; narrowing it to 0600");
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

/// Whether `e` (anywhere in its source chain) is a TLS alert `unknown_ca` sent by the
/// server: the control plane refused our client certificate's issuer.
pub fn is_unknown_ca(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            // io::Error hides its inner error from `source()`.
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            tls,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
            ))
        ) {
            return true;
        }
        cur = err.source();
    }
    false
}

fn http_error(url: &str, source: reqwest::Error) -> IdentityError {
    if let Some(what) = tls_time_error(&source) {
        IdentityError::ClockWrongTls {
            url: url.to_owned(),
            local: rfc3339(SystemTime::now()),
            what,
        }
    } else if is_unknown_ca(&source) {
        IdentityError::UnknownCa {
            url: url.to_owned(),
        }
    } else {
        IdentityError::Http {
            url: url.to_owned(),
            source,
        }
    }
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
        clean_leftover_temp_files(dir);
        let device = dir.join(DEVICE_FILE);
        if !device.exists() {
            return Ok(None);
        }
        narrow_to_owner(&device);
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

    /// The trust bundle in use.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The same key and certificate, trusting `bundle` instead.
    pub fn with_bundle(&self, bundle: TrustBundle) -> Result<Self, IdentityError> {
        Self::new(
            DeviceKey::from_pem(&self.key.to_pem())?,
            self.chain_pem.clone(),
            bundle,
        )
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

/// Compares this device's clock (`now`) with the control plane's (`Date` of
/// `GET {base}/healthz`) before a token or an expired certificate is spent on a request whose
/// answer the device could not use. An unreachable or dateless server passes: the request
/// itself then fails with its own error.
async fn check_clock(
    http: &reqwest::Client,
    base: &str,
    now: SystemTime,
) -> Result<(), IdentityError> {
    let url = format!("{}/healthz", base.trim_end_matches('/'));
    let Ok(resp) = http.get(&url).send().await else {
        return Ok(());
    };
    let date = resp
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|v| v.to_str().ok());
    match clock_offset(date, now) {
        Some(offset_s) if offset_s.unsigned_abs() > MAX_CLOCK_SKEW.as_secs() => {
            Err(IdentityError::ClockWrong {
                url: base.to_owned(),
                local: rfc3339(now),
                server: date.unwrap_or_default().to_owned(),
                offset_s,
                max_s: MAX_CLOCK_SKEW.as_secs(),
            })
        }
        _ => Ok(()),
    }
}

async fn post_csr(
    http: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> Result<CertificateAnswer, IdentityError> {
    let http_err = |source| http_error(url, source);
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
    enroll_at(
        http,
        control_plane_url,
        token,
        device_name,
        org_id,
        dir,
        SystemTime::now(),
    )
    .await
}

/// [`enroll`] with this device's time given (`now`): refuses with
/// [`IdentityError::ClockWrong`] before spending the token when the control plane's clock is
/// more than [`MAX_CLOCK_SKEW`] away from it.
pub async fn enroll_at(
    http: &reqwest::Client,
    control_plane_url: &str,
    token: &str,
    device_name: &str,
    org_id: Option<Uuid>,
    dir: &Path,
    now: SystemTime,
) -> Result<Identity, IdentityError> {
    check_enroll_url(control_plane_url)?;
    check_clock(http, control_plane_url, now).await?;
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
    // An agent whose clock runs far ahead believes its certificate expired: say so instead.
    check_clock(http, control_plane_url, SystemTime::now()).await?;
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
    /// After a renewal hint from the control plane (CA rollover), renew after a random delay
    /// of at most this much (never later than the normal renewal time).
    pub hint_delay_max: Duration,
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
            hint_delay_max: Duration::from_secs(600),
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
        // No jitter: the renewal time itself is jittered; retries only need to back off.
        let exp =
            kip_shared::backoff::Backoff::new(self.retry_min, self.retry_max).ceiling(attempt);
        let until_deadline = not_after
            .checked_sub(self.deadline_margin)
            .and_then(|d| d.duration_since(now).ok())
            .unwrap_or(Duration::ZERO);
        exp.min(until_deadline).max(self.retry_min)
    }
}

/// What the sync loop passes on to the renewer from the control plane's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityHint {
    /// A trust bundle (PEM) other than the one in use, with the fingerprint the control
    /// plane announced for it (checked before use) and the fingerprint the agent reported in
    /// the request (a hint answering an older bundle is stale and ignored).
    TrustBundle {
        pem: String,
        sha256: Option<String>,
        reported_sha256: String,
    },
    /// The certificate with this serial comes from an intermediate that no longer signs:
    /// renew soon. Ignored when the agent has renewed since (another serial).
    RenewSoon { serial: Option<String> },
}

/// The sync loop's side of the identity: the fingerprint of the bundle in use (reported to
/// the control plane) and a way to pass [`IdentityHint`]s to the renewer.
#[derive(Debug, Clone)]
pub struct IdentityHints {
    bundle_sha256: watch::Receiver<String>,
    tx: mpsc::Sender<IdentityHint>,
    /// The organisation in the device certificate (fixed for a device's life: renewal keeps
    /// it); model signatures are checked against it.
    org_id: Uuid,
}

impl IdentityHints {
    /// The organisation named by the device's own certificate.
    pub fn org_id(&self) -> Uuid {
        self.org_id
    }

    /// sha256 of the trust bundle in use ([`TrustBundle::sha256_hex`]).
    pub fn bundle_sha256(&self) -> String {
        self.bundle_sha256.borrow().clone()
    }

    /// Passes a hint on without waiting. A hint that does not fit is dropped: the control
    /// plane repeats it in every ack until it is acted on.
    pub fn offer(&self, hint: IdentityHint) {
        let _ = self.tx.try_send(hint);
    }
}

/// The live credentials other agent modules use: the current TLS client configuration (new
/// connections should take the latest) and the seconds left on the certificate (a metric).
#[derive(Debug, Clone)]
pub struct IdentityHandle {
    pub client_config: watch::Receiver<Arc<rustls::ClientConfig>>,
    /// For the sync loop: bundle fingerprint and hints from the desired state.
    pub hints: IdentityHints,
    not_after_unix: Arc<AtomicI64>,
}

impl IdentityHandle {
    /// Seconds until the current certificate expires (negative once expired).
    pub fn seconds_to_expiry(&self, now: SystemTime) -> i64 {
        let now_unix = seconds_until(now, SystemTime::UNIX_EPOCH);
        self.not_after_unix.load(Ordering::Relaxed) - now_unix
    }

    /// `not_after` of the current certificate, seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix.load(Ordering::Relaxed)
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
    hints: mpsc::Receiver<IdentityHint>,
    bundle_sha256: watch::Sender<String>,
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
        let (bundle_sha256, bundle_rx) = watch::channel(identity.bundle.sha256_hex());
        // Hints repeat with every ack; a few slots are plenty.
        let (hint_tx, hints) = mpsc::channel(4);
        let handle = IdentityHandle {
            client_config: rx,
            hints: IdentityHints {
                bundle_sha256: bundle_rx,
                tx: hint_tx,
                org_id: identity.org_id(),
            },
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
                hints,
                bundle_sha256,
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
        self.bundle_sha256.send_replace(new.bundle.sha256_hex());
        self.identity = new;
        self.tx.send_replace(cfg);
        Ok(())
    }

    /// The identity in use.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Switches to the trust bundle `pem` (CA rollover): checks it against `sha256` when
    /// given, probes the agent listener with it (a TLS handshake must verify the listener's
    /// certificate with the new bundle: a bundle that would lock the agent out is never
    /// stored), stores it atomically, then publishes the rebuilt client configuration.
    /// Returns false when it is the bundle already in use. On error nothing changes.
    pub async fn apply_bundle(
        &mut self,
        pem: &str,
        sha256: Option<&str>,
    ) -> Result<bool, IdentityError> {
        let bundle = TrustBundle::from_pem(pem)?;
        let sha = bundle.sha256_hex();
        if sha256.is_some_and(|want| !want.eq_ignore_ascii_case(&sha)) {
            return Err(IdentityError::BadAnswer(format!(
                "trust bundle has sha256 {sha}, the control plane announced {}",
                sha256.unwrap_or_default()
            )));
        }
        if bundle == self.identity.bundle {
            return Ok(false);
        }
        let new = self.identity.with_bundle(bundle)?;
        let cfg = new.client_config()?;
        // Any HTTP answer proves the handshake, i.e. that the new bundle verifies the listener.
        let url = format!(
            "{}/v1/agent/whoami",
            self.agent_api_url.trim_end_matches('/')
        );
        mtls_client(&new, self.policy.request_timeout)?
            .get(&url)
            .send()
            .await
            .map_err(|e| http_error(&url, e))?;
        // Stored before it is used, as on renewal: a restart comes back with the new bundle.
        files::write_public(&self.dir.join(BUNDLE_FILE), &new.bundle.to_pem())?;
        tracing::info!(
            old_bundle_sha256 = %self.identity.bundle.sha256_hex(), bundle_sha256 = %sha,
            roots = new.bundle.certs().len(),
            "trust bundle updated from the control plane (CA rollover)"
        );
        self.identity = new;
        self.bundle_sha256.send_replace(sha);
        self.tx.send_replace(cfg);
        Ok(true)
    }

    /// When the next renewal is due by the policy (with fresh jitter).
    fn scheduled(&self) -> SystemTime {
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        self.policy.renew_at(
            self.identity.cert.not_before,
            self.identity.cert.not_after,
            jitter,
        )
    }

    /// Renews at the policy's time, retrying on failure, and acts on hints from the sync
    /// loop, until `token` is cancelled.
    pub async fn run(mut self, token: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut due = self.scheduled();
        // Whether `due` was already brought forward by a renewal hint (hints repeat).
        let mut hinted = false;
        loop {
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                Some(hint) = self.hints.recv() => {
                    match hint {
                        // Hints queue up; one answering an older bundle or certificate is
                        // stale (a renewal already brought newer ones).
                        IdentityHint::TrustBundle { reported_sha256, .. }
                            if reported_sha256 != self.identity.bundle.sha256_hex() => {}
                        IdentityHint::TrustBundle { pem, sha256, .. } => {
                            if let Err(e) = self.apply_bundle(&pem, sha256.as_deref()).await {
                                tracing::warn!(error = %e, "trust bundle from the control plane not applied; keeping the current one");
                            }
                        }
                        IdentityHint::RenewSoon { serial: Some(serial) }
                            if serial != self.identity.cert.serial_hex => {}
                        IdentityHint::RenewSoon { .. } if !hinted && attempt == 0 => {
                            hinted = true;
                            let delay = self.policy.hint_delay_max.mul_f64(rand::random::<f64>());
                            let at = SystemTime::now() + delay;
                            if at < due {
                                due = at;
                                tracing::info!(delay_s = delay.as_secs(), "the control plane asks for an early renewal (CA rollover)");
                            }
                        }
                        IdentityHint::RenewSoon { .. } => {}
                    }
                    continue;
                }
            }
            match self.renew_now().await {
                Ok(()) => {
                    attempt = 0;
                    hinted = false;
                    due = self.scheduled();
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let now = SystemTime::now();
                    let left = self.identity.seconds_to_expiry(now);
                    if left <= 0 {
                        tracing::error!(error = %e, attempt, "certificate EXPIRED and renewal failed; re-enrollment may be needed");
                    } else {
                        tracing::warn!(error = %e, attempt, seconds_to_expiry = left, "certificate renewal failed; retrying");
                    }
                    due = now
                        + self
                            .policy
                            .retry_delay(attempt, now, self.identity.cert.not_after);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kip_certs::{DeviceIdentity, FleetCa, RootCa};

    use super::*;

    #[test]
    fn the_clock_offset_comes_from_the_date_header_and_tls_time_errors_are_recognised() {
        let local = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let server = chrono::DateTime::<chrono::Utc>::from(local + Duration::from_secs(7200))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        assert_eq!(clock_offset(Some(&server), local), Some(7200));
        assert_eq!(clock_offset(Some("yesterday"), local), None);
        assert_eq!(clock_offset(None, local), None);
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet);
        assert_eq!(tls_time_error(&e), Some("not valid yet"));
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired,
        ));
        assert_eq!(tls_time_error(&io), Some("expired"));
        let other = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(tls_time_error(&other), None);
    }

    const H: Duration = Duration::from_secs(3600);

    /// An identity signed by a fresh CA, stored in `dir`, and a second root for a rollover.
    #[test]
    fn enrollment_over_plain_http_is_refused_unless_loopback() {
        for ok in [
            "https://kip.example.com",
            "https://10.0.0.5:8443/",
            "http://127.0.0.1:8080",
            "http://127.8.9.10",
            "http://[::1]:8080",
            "http://localhost:8080",
            "http://LOCALHOST",
        ] {
            check_enroll_url(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://10.0.0.5:8080",
            "http://kip.example.com",
            "http://localhost.evil.example",
            "http://[::ffff:10.0.0.1]",
            "http://0.0.0.0:8080",
        ] {
            let e = check_enroll_url(bad).unwrap_err();
            assert!(
                matches!(e, IdentityError::InsecureEnrollUrl { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("https://"), "{e}");
        }
        for bad in ["ftp://x", "not a url", "kip.example.com:8443"] {
            assert!(check_enroll_url(bad).is_err(), "{bad}");
        }
    }

    /// `enroll` itself refuses before sending anything: the token never leaves.
    #[tokio::test]
    async fn enroll_refuses_a_remote_http_server_before_any_request() {
        let dir = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            )
            .connect_timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        // TEST-NET-1: without the check this would be a connection attempt (an `Http` error
        // after the connect timeout), not an immediate refusal.
        let e = enroll(
            &http,
            "http://192.0.2.1:9",
            "secret-token",
            "gw",
            None,
            dir.path(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, IdentityError::InsecureEnrollUrl { .. }), "{e}");
        assert!(!dir.path().join(DEVICE_FILE).exists());
    }

    #[test]
    fn leftover_temp_key_files_are_removed_and_a_wide_key_file_is_narrowed() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let (id, _) = enrolled(tmp.path());
        let dir = tmp.path().join("identity");
        id.store(&dir).unwrap();
        let leftover = dir.join(format!("{DEVICE_FILE}.tmp"));
        std::fs::write(&leftover, id.key.to_pem()).unwrap();
        std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(
            dir.join(DEVICE_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let loaded = Identity::load(&dir).unwrap().unwrap();
        assert_eq!(loaded.device_id(), id.device_id());
        assert!(!leftover.exists(), "leftover temp key file removed");
        let mode = std::fs::metadata(dir.join(DEVICE_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    fn enrolled(dir: &Path) -> (Identity, TrustBundle) {
        let now = SystemTime::now();
        let ca = FleetCa::init(&dir.join("ca"), now).unwrap();
        let key = DeviceKey::generate().unwrap();
        let issued = ca
            .current()
            .sign_device_csr(
                &key.csr_pem("gw").unwrap(),
                DeviceIdentity {
                    org_id: Uuid::new_v4(),
                    device_id: Uuid::new_v4(),
                },
                now,
                H,
            )
            .unwrap();
        let id = Identity::new(key, issued.chain_pem, ca.bundle().clone()).unwrap();
        id.store(&dir.join("identity")).unwrap();
        let new_root = RootCa::generate("next root", now, 10 * H).unwrap();
        let mut both = ca.bundle().clone();
        both.merge(&TrustBundle::new(vec![new_root.cert_der().clone()]).unwrap());
        (id, both)
    }

    /// A minimal agent listener: mTLS with the CA in `dir/ca`, answers every request with
    /// 200 `{}`. Returns its URL.
    async fn listener(dir: &Path, tracker: &tokio_util::task::TaskTracker) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let now = SystemTime::now();
        let ca = FleetCa::load(&dir.join("ca")).unwrap();
        let server = ca
            .current()
            .issue_server_cert(&["127.0.0.1".to_owned()], now, H)
            .unwrap();
        let cfg = kip_certs::server_config(
            ca.bundle(),
            server.chain,
            server.key,
            ca.crls(&[], now, H).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", tcp.local_addr().unwrap());
        tracker.spawn(async move {
            while let Ok((sock, _)) = tcp.accept().await {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    continue;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                    )
                    .await;
                let _ = tls.shutdown().await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_new_bundle_is_probed_stored_then_published_and_a_bad_one_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (id, both) = enrolled(tmp.path());
        let dir = tmp.path().join("identity");
        let old_sha = id.bundle().sha256_hex();
        let serial = id.cert().serial_hex.clone();
        let tracker = tokio_util::task::TaskTracker::new();
        let url = listener(tmp.path(), &tracker).await;
        let (mut renewer, mut handle) =
            Renewer::new(id, dir.clone(), url, RenewalPolicy::default()).unwrap();
        assert_eq!(handle.hints.bundle_sha256(), old_sha);
        handle.client_config.mark_unchanged();
        let stored_roots = || {
            Identity::load(&dir)
                .unwrap()
                .unwrap()
                .bundle()
                .certs()
                .len()
        };

        // A bundle whose fingerprint does not match the announced one is refused.
        let err = renewer
            .apply_bundle(&both.to_pem(), Some(&"0".repeat(64)))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("announced"), "{err}");
        assert!(renewer.apply_bundle("not pem", None).await.is_err());
        // A bundle that does not verify the listener would lock the agent out: refused.
        let foreign = RootCa::generate("foreign", SystemTime::now(), H).unwrap();
        let foreign = TrustBundle::new(vec![foreign.cert_der().clone()]).unwrap();
        let err = renewer
            .apply_bundle(&foreign.to_pem(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, IdentityError::Http { .. }), "{err:?}");
        assert!(!handle.client_config.has_changed().unwrap());
        assert_eq!(stored_roots(), 1);
        assert_eq!(handle.hints.bundle_sha256(), old_sha);

        // The overlap bundle: on disk first, then published; key and certificate unchanged.
        assert!(
            renewer
                .apply_bundle(&both.to_pem(), Some(&both.sha256_hex()))
                .await
                .unwrap()
        );
        assert!(handle.client_config.has_changed().unwrap());
        assert_eq!(handle.hints.bundle_sha256(), both.sha256_hex());
        let stored = Identity::load(&dir).unwrap().unwrap();
        assert_eq!(stored.bundle(), &both);
        assert_eq!(stored.cert().serial_hex, serial);
        assert!(
            !dir.join("bundle.pem.tmp").exists(),
            "no temporary file left"
        );
        // Applying it again is a no-op.
        handle.client_config.mark_unchanged();
        assert!(!renewer.apply_bundle(&both.to_pem(), None).await.unwrap());
        assert!(!handle.client_config.has_changed().unwrap());
        tracker.close();
    }

    #[tokio::test]
    async fn the_running_renewer_applies_a_fresh_bundle_hint_and_ignores_stale_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let (id, both) = enrolled(tmp.path());
        let dir = tmp.path().join("identity");
        let tracker = tokio_util::task::TaskTracker::new();
        let url = listener(tmp.path(), &tracker).await;
        let (renewer, mut handle) =
            Renewer::new(id, dir.clone(), url, RenewalPolicy::default()).unwrap();
        handle.client_config.mark_unchanged();
        let stop = CancellationToken::new();
        let renewer_tracker = tokio_util::task::TaskTracker::new();
        renewer_tracker.spawn(renewer.run(stop.clone()));
        let reported_sha256 = handle.hints.bundle_sha256();
        // Answers to requests made with another bundle are stale: ignored.
        handle.hints.offer(IdentityHint::TrustBundle {
            pem: "stale".into(),
            sha256: None,
            reported_sha256: "0".repeat(64),
        });
        handle.hints.offer(IdentityHint::TrustBundle {
            pem: both.to_pem(),
            sha256: Some(both.sha256_hex()),
            reported_sha256,
        });
        tokio::time::timeout(Duration::from_secs(10), handle.client_config.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(handle.hints.bundle_sha256(), both.sha256_hex());
        assert_eq!(Identity::load(&dir).unwrap().unwrap().bundle(), &both);
        stop.cancel();
        renewer_tracker.close();
        renewer_tracker.wait().await;
        tracker.close();
    }

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
