//! PKI HTTP handlers: enrollment tokens and revocation (admin API), enrollment (token
//! authenticated), renewal, whoami and sync (agent mTLS listener; sync stores batches through
//! [`crate::ingest`]).
//!
//! Invariants:
//! - A bootstrap token is one-time: it is locked (`FOR UPDATE`), checked (unused, unexpired,
//!   right organisation) and marked used in the same transaction that records the issued
//!   certificate; a failure anywhere rolls everything back, leaving the token usable.
//! - Tokens are stored as sha256; the token is returned once, at creation.
//! - On the agent listener the device is known only from its verified client certificate
//!   ([`DeviceCert`]), which is also checked against the `certificates` table on every
//!   request, so a revoked certificate is refused even on a connection opened before the
//!   revocation.
//! - Errors never reveal which check a token failed (unknown, used, expired, other
//!   organisation): all answer the same 403.
//! - CA rollover: each request takes one snapshot of the CA ([`Pki::ca`]), so a certificate,
//!   the issuer recorded for it and the bundle returned come from the same CA even while it is
//!   reloaded. A certificate whose intermediate is neither the current nor the previous one
//!   (retired by `finish-rotation`) is refused on every request, like a revoked one.
//! - Sync acks carry the bundle fingerprint, the bundle itself only when the agent reported
//!   another one, and a renewal hint naming the certificate to replace while it comes from
//!   the previous intermediate.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequestParts, Path, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header, request::Parts},
    routing::{get, post},
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use kip_certs::{CertError, DeviceIdentity, IssuedCert};
use kip_shared::{Name, sync::SyncAck};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{
    api::ApiJson,
    auth::Principal,
    error::{ApiError, ApiResult},
    ingest,
    metrics::{ReasonLabels, ResultLabels},
    pki::Pki,
    server::AppState,
};

/// Largest accepted CSR (PEM). A P-256 CSR is under 1 KiB.
const MAX_CSR_BYTES: usize = 16 * 1024;
/// Default and bounds of an enrollment token's lifetime.
const DEFAULT_TOKEN_TTL_S: u64 = 3_600;
const MAX_TOKEN_TTL_S: u64 = 30 * 86_400;
const TOKEN_PREFIX: &str = "kipenroll_";

const BAD_TOKEN: &str =
    "enrollment token is invalid, expired, already used or for another organisation";

fn pki(st: &AppState) -> ApiResult<&Arc<Pki>> {
    st.pki.as_ref().ok_or(ApiError::Unavailable(
        "fleet PKI (pki.ca_dir is not configured)",
    ))
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

// ---------- enrollment tokens (admin) ----------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    /// Lifetime in seconds (default 3600, at most 30 days).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Binds the token to this device name; needed to re-enroll an existing device.
    #[serde(default)]
    pub device_name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EnrollToken {
    pub id: Uuid,
    pub org_id: Uuid,
    /// The token itself. Shown only in this response; only its hash is stored.
    pub token: String,
    pub device_name: Option<String>,
    pub expires_at: DateTime<Utc>,
}

pub async fn create_enroll_token(
    State(st): State<AppState>,
    p: Principal,
    Path(org_id): Path<Uuid>,
    ApiJson(body): ApiJson<CreateEnrollToken>,
) -> ApiResult<(StatusCode, Json<EnrollToken>)> {
    let org_id = p.org_scope(org_id)?;
    let ttl = body.ttl_s.unwrap_or(DEFAULT_TOKEN_TTL_S);
    if !(60..=MAX_TOKEN_TTL_S).contains(&ttl) {
        return Err(ApiError::validation(
            "ttl_s",
            format!("must be between 60 and {MAX_TOKEN_TTL_S}"),
        ));
    }
    let device_name = body
        .device_name
        .as_deref()
        .map(|n| Name::parse(n).map_err(|e| ApiError::validation("device_name", e.to_string())))
        .transpose()?;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let row: Option<(Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO bootstrap_tokens (id, org_id, token_sha256, device_name, expires_at) \
         SELECT $1, o.id, $3, $4, now() + make_interval(secs => $5::float8) \
         FROM organisations o WHERE o.id = $2 RETURNING id, expires_at",
    )
    .bind(Uuid::new_v4())
    .bind(org_id)
    .bind(&token_hash(&token)[..])
    .bind(device_name.as_ref().map(Name::as_str))
    .bind(ttl as f64)
    .fetch_optional(&st.pool)
    .await?;
    let (id, expires_at) = row.ok_or(ApiError::NotFound("organisation"))?;
    tracing::info!(%org_id, token_id = %id, ttl_s = ttl, "enrollment token created");
    Ok((
        StatusCode::CREATED,
        Json(EnrollToken {
            id,
            org_id,
            token,
            device_name: device_name.map(|n| n.to_string()),
            expires_at,
        }),
    ))
}

// ---------- revocation (admin) ----------

#[derive(Debug, Serialize, Deserialize)]
pub struct Revocation {
    pub org_id: Uuid,
    pub device_id: Uuid,
    /// Serials revoked by this call (already revoked or expired ones are not repeated).
    pub revoked_serials: Vec<String>,
}

/// Revokes every unexpired certificate of a device. Takes effect on the next handshake (the
/// agent listener's CRLs are rebuilt before this returns) and on the next request of an
/// already open connection.
pub async fn revoke_device(
    State(st): State<AppState>,
    p: Principal,
    Path((org_id, device_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Json<Revocation>> {
    let org_id = p.org_scope(org_id)?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE org_id = $1 AND id = $2) \
             OR EXISTS (SELECT 1 FROM certificates WHERE org_id = $1 AND device_id = $2)",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_one(&st.pool)
    .await?;
    if !known {
        return Err(ApiError::NotFound("device"));
    }
    let revoked_serials: Vec<String> = sqlx::query_scalar(
        "UPDATE certificates SET revoked_at = now() \
         WHERE org_id = $1 AND device_id = $2 AND revoked_at IS NULL AND not_after > now() \
         RETURNING serial",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_all(&st.pool)
    .await?;
    if let Some(pki) = &st.pki {
        pki.refresh(&st.pool).await.map_err(ApiError::internal)?;
    }
    tracing::info!(%org_id, %device_id, count = revoked_serials.len(), "device certificates revoked");
    Ok(Json(Revocation {
        org_id,
        device_id,
        revoked_serials,
    }))
}

// ---------- CA status and reload (platform admin) ----------

/// One intermediate CA.
#[derive(Debug, Serialize, Deserialize)]
pub struct CaCertInfo {
    /// sha256 of the certificate (DER), as recorded per device certificate.
    pub fingerprint: String,
    pub not_after: DateTime<Utc>,
}

/// Devices by the intermediate that issued their newest unexpired, unrevoked certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesByIssuer {
    pub current: i64,
    /// Not renewed since the rotation: `kipctl ca finish-rotation` would cut these devices
    /// off (they would need a new enrollment token).
    pub previous: i64,
    /// Issued by a retired intermediate, or before issuers were recorded.
    pub other: i64,
}

/// The fleet CA as this control plane uses it.
#[derive(Debug, Serialize, Deserialize)]
pub struct CaStatus {
    /// The intermediate that signs new certificates.
    pub intermediate: CaCertInfo,
    /// The intermediate kept from an unfinished rotation.
    pub previous_intermediate: Option<CaCertInfo>,
    /// Expiry of the root above the signing intermediate.
    pub root_not_after: Option<DateTime<Utc>>,
    pub bundle_sha256: String,
    pub bundle_roots: usize,
    pub devices_by_issuer: DevicesByIssuer,
    /// Set by `POST /v1/pki/ca/reload`: whether the CA files had changed and were loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reloaded: Option<bool>,
}

async fn ca_status_of(st: &AppState, pki: &Pki) -> ApiResult<CaStatus> {
    let (current, previous, other) =
        crate::pki::count_devices_by_issuer(pki, &st.pool, &st.metrics.pki).await?;
    let ca = pki.ca();
    let info = |i: &kip_certs::Intermediate| CaCertInfo {
        fingerprint: i.fingerprint(),
        not_after: i.not_after().into(),
    };
    Ok(CaStatus {
        intermediate: info(ca.current()),
        previous_intermediate: ca.previous().map(info),
        root_not_after: ca.root_not_after().map(Into::into),
        bundle_sha256: ca.bundle().sha256_hex(),
        bundle_roots: ca.bundle().certs().len(),
        devices_by_issuer: DevicesByIssuer {
            current,
            previous,
            other,
        },
        reloaded: None,
    })
}

/// `GET /v1/pki/ca` (platform key): the CA in use and how many devices each intermediate
/// serves.
pub async fn ca_status(State(st): State<AppState>, p: Principal) -> ApiResult<Json<CaStatus>> {
    p.require_platform()?;
    let pki = pki(&st)?;
    Ok(Json(ca_status_of(&st, pki).await?))
}

/// `POST /v1/pki/ca/reload` (platform key): checks the CA files now instead of at the next
/// poll (same as SIGHUP). 422 when the files do not form a usable CA; the old one stays.
pub async fn ca_reload(State(st): State<AppState>, p: Principal) -> ApiResult<Json<CaStatus>> {
    p.require_platform()?;
    let pki = pki(&st)?;
    let reloaded = pki.reload_ca(&st.pool).await.map_err(|e| match e {
        crate::pki::PkiError::Ca(e) => ApiError::validation("ca_dir", e.to_string()),
        other => ApiError::internal(other),
    })?;
    let mut status = ca_status_of(&st, pki).await?;
    status.reloaded = Some(reloaded);
    Ok(Json(status))
}

// ---------- enrollment (token) ----------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    /// PKCS#10 CSR, PEM. Only its public key is used.
    pub csr_pem: String,
    pub device_name: String,
    /// When given, the token must belong to this organisation.
    #[serde(default)]
    pub org_id: Option<Uuid>,
}

/// A freshly issued device certificate.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateResponse {
    pub org_id: Uuid,
    pub device_id: Uuid,
    pub device_name: String,
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// Device certificate followed by the issuing intermediate (PEM).
    pub certificate_chain_pem: String,
    /// Roots the agent must trust for the agent listener (PEM; old and new during rollover).
    pub trust_bundle_pem: String,
}

fn check_csr(csr_pem: &str) -> ApiResult<()> {
    if csr_pem.is_empty() || csr_pem.len() > MAX_CSR_BYTES {
        return Err(ApiError::validation(
            "csr_pem",
            format!("must be 1 to {MAX_CSR_BYTES} bytes of PEM"),
        ));
    }
    Ok(())
}

/// Signs `csr_pem` for `id` and records the certificate inside `tx`.
async fn issue(
    tx: &mut sqlx::PgConnection,
    pki: &Pki,
    csr_pem: &str,
    id: DeviceIdentity,
    device_name: String,
) -> ApiResult<CertificateResponse> {
    // One snapshot: the certificate, its recorded issuer and the bundle agree even if the CA
    // is reloaded meanwhile.
    let ca = pki.ca();
    let issued: IssuedCert = ca
        .current()
        .sign_device_csr(csr_pem, id, SystemTime::now(), pki.device_cert_lifetime())
        .map_err(|e| match e {
            CertError::Csr(_) => ApiError::validation("csr_pem", e.to_string()),
            other => ApiError::internal(other),
        })?;
    let not_after: DateTime<Utc> = issued.not_after.into();
    sqlx::query(
        "INSERT INTO certificates (serial, org_id, device_id, not_after, issuer_sha256) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&issued.serial_hex)
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(not_after)
    .bind(ca.current().fingerprint())
    .execute(&mut *tx)
    .await?;
    Ok(CertificateResponse {
        org_id: id.org_id,
        device_id: id.device_id,
        device_name,
        serial: issued.serial_hex,
        not_before: issued.not_before.into(),
        not_after,
        certificate_chain_pem: issued.chain_pem,
        trust_bundle_pem: ca.bundle().to_pem(),
    })
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    org_id: Uuid,
    device_name: Option<String>,
    expired: bool,
    used: bool,
}

/// `POST /enroll`: the bootstrap token authenticates the request.
pub async fn enroll(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<CertificateResponse>)> {
    let pki = pki(&st)?;
    let name = Name::parse(&body.device_name)
        .map_err(|e| ApiError::validation("device_name", e.to_string()))?;
    check_csr(&body.csr_pem)?;
    if !body.token.starts_with(TOKEN_PREFIX) {
        return Err(ApiError::Forbidden(BAD_TOKEN));
    }
    let mut tx = st.pool.begin().await?;
    let tok: Option<TokenRow> = sqlx::query_as(
        "SELECT id, org_id, device_name, expires_at <= now() AS expired, \
                used_at IS NOT NULL AS used \
         FROM bootstrap_tokens WHERE token_sha256 = $1 FOR UPDATE",
    )
    .bind(&token_hash(&body.token)[..])
    .fetch_optional(&mut *tx)
    .await?;
    let Some(tok) = tok else {
        return Err(ApiError::Forbidden(BAD_TOKEN));
    };
    let wrong_org = body.org_id.is_some_and(|o| o != tok.org_id);
    if tok.expired || tok.used || wrong_org {
        tracing::warn!(
            token_id = %tok.id, expired = tok.expired, used = tok.used, wrong_org,
            "enrollment refused"
        );
        return Err(ApiError::Forbidden(BAD_TOKEN));
    }
    if tok
        .device_name
        .as_deref()
        .is_some_and(|n| n != name.as_str())
    {
        return Err(ApiError::validation(
            "device_name",
            "this token was issued for another device name",
        ));
    }
    let existing: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM devices WHERE org_id = $1 AND name = $2 FOR UPDATE")
            .bind(tok.org_id)
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let device_id = match existing {
        // Re-enrolling an existing device (e.g. after losing its key) needs a token that
        // names it, so an org-wide token cannot take over another device's identity.
        Some(id) if tok.device_name.is_some() => id,
        Some(_) => {
            return Err(ApiError::Conflict(
                "a device with this name already exists; create a token with its device_name to re-enroll it"
                    .into(),
            ));
        }
        None => {
            let id = Uuid::new_v4();
            sqlx::query("INSERT INTO devices (id, org_id, name) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(tok.org_id)
                .bind(name.as_str())
                .execute(&mut *tx)
                .await?;
            id
        }
    };
    let id = DeviceIdentity {
        org_id: tok.org_id,
        device_id,
    };
    let resp = issue(&mut tx, pki, &body.csr_pem, id, name.to_string()).await?;
    sqlx::query("UPDATE bootstrap_tokens SET used_at = now(), device_id = $2 WHERE id = $1")
        .bind(tok.id)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(org_id = %id.org_id, %device_id, serial = %resp.serial, "device enrolled");
    Ok((StatusCode::CREATED, Json(resp)))
}

// ---------- renewal of an expired certificate (key possession) ----------

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewExpiredRequest {
    /// The device's (expired) certificate followed by its intermediate (PEM).
    pub certificate_chain_pem: String,
    /// CSR signed with the certificate's own key (proof of possession).
    pub csr_pem: String,
}

/// `POST /renew-expired`: a device whose certificate expired (offline too long) gets a new
/// one without a bootstrap token, by proving it holds the certificate's key. Allowed for
/// `pki.expired_renewal_grace_s` after expiry; revoked or deleted devices are refused.
pub async fn renew_expired(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<RenewExpiredRequest>,
) -> ApiResult<Json<CertificateResponse>> {
    const REFUSED: &str = "this certificate cannot be renewed: enroll again with a new token";
    let pki = pki(&st)?;
    if pki.expired_renewal_grace().is_zero() {
        return Err(ApiError::Forbidden(
            "renewal of expired certificates is disabled (pki.expired_renewal_grace_s = 0)",
        ));
    }
    check_csr(&body.csr_pem)?;
    if body.certificate_chain_pem.len() > 4 * MAX_CSR_BYTES {
        return Err(ApiError::validation("certificate_chain_pem", "too large"));
    }
    let chain = kip_certs::certs_from_pem(&body.certificate_chain_pem, "certificate chain")
        .map_err(|e| ApiError::validation("certificate_chain_pem", e.to_string()))?;
    let now = SystemTime::now();
    let revoked = crate::pki::revoked_serials(&st.pool).await?;
    let ca = pki.ca();
    let crls = ca
        .crls(&revoked, now, Duration::from_secs(3600))
        .map_err(ApiError::internal)?;
    let peer = kip_certs::verify_for_recovery(
        ca.bundle(),
        crls,
        &chain,
        &body.csr_pem,
        pki.expired_renewal_grace(),
        now,
    )
    .map_err(|e| {
        tracing::warn!(error = %e, "renewal of an expired certificate refused");
        ApiError::Forbidden(REFUSED)
    })?;
    let mut tx = st.pool.begin().await?;
    let row: Option<(Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
        "SELECT c.revoked_at, d.name FROM certificates c \
         LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
         WHERE c.serial = $1 AND c.org_id = $2 AND c.device_id = $3 FOR UPDATE OF c",
    )
    .bind(&peer.serial_hex)
    .bind(peer.identity.org_id)
    .bind(peer.identity.device_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((None, Some(device_name))) = row else {
        return Err(ApiError::Forbidden(REFUSED));
    };
    let resp = issue(&mut tx, pki, &body.csr_pem, peer.identity, device_name).await?;
    tx.commit().await?;
    tracing::info!(
        org_id = %peer.identity.org_id, device_id = %peer.identity.device_id,
        old_serial = %peer.serial_hex, serial = %resp.serial,
        "expired device certificate renewed by key possession"
    );
    Ok(Json(resp))
}

// ---------- agent listener (mTLS) ----------

/// The device behind a request on the agent listener, from its verified client certificate.
#[derive(Debug, Clone)]
pub struct DeviceCert {
    pub identity: DeviceIdentity,
    pub device_name: String,
    pub serial: String,
    pub not_after: DateTime<Utc>,
    /// Issued by the intermediate that signs now (false during a rollover until renewal).
    pub issued_by_current: bool,
}

impl FromRequestParts<AppState> for DeviceCert {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        // Present only on the TLS listener, after the verifier accepted the chain.
        let info = parts
            .extensions
            .get::<Arc<axum_server::tls::TlsInfo>>()
            .ok_or(ApiError::Forbidden(
                "a device client certificate is required",
            ))?;
        let leaf = info.peer_certificates.first().ok_or(ApiError::Forbidden(
            "a device client certificate is required",
        ))?;
        let peer = kip_certs::parse_peer_cert(leaf)
            .map_err(|_| ApiError::Forbidden("the client certificate does not name a device"))?;
        let ca = st.pki.as_ref().map(|p| p.ca());
        // The verifier ran at the handshake; a rotation finished since then must also end
        // requests on connections opened before it, as revocation does.
        if let Some(ca) = &ca
            && !ca.current().is_issuer_of(leaf)
            && !ca.previous().is_some_and(|p| p.is_issuer_of(leaf))
        {
            return Err(ApiError::Forbidden(
                "the client certificate was issued by a retired intermediate CA: enroll again with a new token",
            ));
        }
        let row: Option<(Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
            "SELECT c.revoked_at, d.name FROM certificates c \
             LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
             WHERE c.serial = $1 AND c.org_id = $2 AND c.device_id = $3",
        )
        .bind(&peer.serial_hex)
        .bind(peer.identity.org_id)
        .bind(peer.identity.device_id)
        .fetch_optional(&st.pool)
        .await?;
        match row {
            Some((None, Some(device_name))) => Ok(Self {
                identity: peer.identity,
                device_name,
                serial: peer.serial_hex,
                not_after: peer.not_after.into(),
                issued_by_current: ca.is_some_and(|c| c.current().is_issuer_of(leaf)),
            }),
            Some((Some(_), _)) => Err(ApiError::Forbidden("the client certificate is revoked")),
            _ => Err(ApiError::Forbidden(
                "the client certificate is unknown or its device was deleted",
            )),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 CSR, PEM, for the device's new (or same) key.
    pub csr_pem: String,
}

/// `POST /v1/agent/renew`: a new certificate for the device named by the current one.
pub async fn renew(
    State(st): State<AppState>,
    dev: DeviceCert,
    ApiJson(body): ApiJson<RenewRequest>,
) -> ApiResult<Json<CertificateResponse>> {
    let pki = pki(&st)?;
    check_csr(&body.csr_pem)?;
    let mut tx = st.pool.begin().await?;
    // Re-check under lock: a revocation committed since the extractor ran must win.
    let revoked: Option<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT revoked_at FROM certificates WHERE serial = $1 FOR UPDATE")
            .bind(&dev.serial)
            .fetch_optional(&mut *tx)
            .await?;
    if !matches!(revoked, Some(None)) {
        return Err(ApiError::Forbidden("the client certificate is revoked"));
    }
    let resp = issue(&mut tx, pki, &body.csr_pem, dev.identity, dev.device_name).await?;
    sqlx::query("UPDATE devices SET last_seen_at = now() WHERE org_id = $1 AND id = $2")
        .bind(dev.identity.org_id)
        .bind(dev.identity.device_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!(
        org_id = %dev.identity.org_id, device_id = %dev.identity.device_id,
        old_serial = %dev.serial, serial = %resp.serial, "device certificate renewed"
    );
    Ok(Json(resp))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentWhoami {
    pub org_id: Uuid,
    pub device_id: Uuid,
    pub device_name: String,
    pub serial: String,
    pub not_after: DateTime<Utc>,
}

/// `GET /v1/agent/whoami`: the identity the control plane sees in the client certificate.
pub async fn whoami(dev: DeviceCert) -> Json<AgentWhoami> {
    Json(AgentWhoami {
        org_id: dev.identity.org_id,
        device_id: dev.identity.device_id,
        device_name: dev.device_name,
        serial: dev.serial,
        not_after: dev.not_after,
    })
}

/// `POST /v1/agent/sync`: stores a [`kip_shared::sync::SyncBatch`] (JSON, gzip when
/// `Content-Encoding: gzip`) for the device of the client certificate and answers the
/// [`SyncAck`]. The device comes only from the certificate: the body has no device field.
pub async fn sync(
    State(st): State<AppState>,
    dev: DeviceCert,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SyncAck>> {
    let m = &st.metrics.ingest;
    let fail = |reason: &'static str, result: &'static str| {
        m.rejected.get_or_create(&ReasonLabels { reason }).inc();
        m.batches.get_or_create(&ResultLabels { result }).inc();
    };
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            fail("too_large", "rejected");
            return Err(ApiError::PayloadTooLarge {
                limit_bytes: st.ingest.max_decoded_bytes,
            });
        }
        Err(r) => {
            fail("body", "rejected");
            return Err(ApiError::BadRequest(format!("cannot read the body: {r}")));
        }
    };
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "gzip" => true,
        Some(e) if e == "identity" => false,
        Some(e) => {
            fail("encoding", "rejected");
            return Err(ApiError::BadRequest(format!(
                "Content-Encoding {e:?} is not supported: send gzip or identity"
            )));
        }
    };
    let limits = st.ingest;
    let id = ingest::DeviceIdentity {
        org_id: dev.identity.org_id,
        device_id: dev.identity.device_id,
    };
    // Inflating and parsing up to max_batch_bytes is CPU work: keep it off the async threads.
    let decoded = tokio::task::spawn_blocking(move || ingest::decode(&body, gzip, limits))
        .await
        .map_err(ApiError::internal)?;
    let (outcome, running_model) = match decoded {
        Ok(batch) => {
            let running = batch.running_model.clone();
            (ingest::store(&st.pool, id, &batch).await, running)
        }
        Err(e) => (Err(e), None),
    };
    match outcome {
        Ok(mut ack) => {
            // Desired state is advisory: the batch is stored whatever happens here.
            match crate::registry::desired_model_for(&st.pool, id.org_id, id.device_id).await {
                Ok(model) => ack.desired.model = model,
                Err(e) => tracing::warn!(error = %e, "cannot read the desired model"),
            }
            desired_trust(&st, &dev, &headers, &mut ack.desired);
            if let Err(e) = crate::registry::record_device_model_status(
                &st.pool,
                id.org_id,
                id.device_id,
                running_model.as_deref(),
                None,
            )
            .await
            {
                tracing::warn!(error = %e, "cannot record the device's model status");
            }
            m.batches
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            m.records.inc_by(ack.inserted);
            m.duplicates.inc_by(ack.duplicates);
            tracing::debug!(
                org_id = %id.org_id, device_id = %id.device_id, epoch = ack.epoch,
                acked_seq = ack.acked_seq, inserted = ack.inserted, duplicates = ack.duplicates,
                "sync batch stored"
            );
            Ok(Json(ack))
        }
        Err(e) => {
            let result = if matches!(e, ingest::IngestError::Db(_)) {
                "error"
            } else {
                "rejected"
            };
            fail(e.reason(), result);
            tracing::warn!(
                org_id = %id.org_id, device_id = %id.device_id, error = %e,
                "sync batch not stored"
            );
            Err(e.into())
        }
    }
}

/// CA rollover through the sync ack: always the current bundle's fingerprint; the bundle
/// itself when the agent reported another one (agents that report nothing predate bundle
/// updates and would ignore it); a renewal hint when the device certificate was issued by an
/// intermediate that no longer signs.
fn desired_trust(
    st: &AppState,
    dev: &DeviceCert,
    headers: &HeaderMap,
    desired: &mut kip_shared::sync::DesiredState,
) {
    let Some(pki) = &st.pki else { return };
    let ca = pki.ca();
    let sha = ca.bundle().sha256_hex();
    let reported = headers
        .get(kip_shared::sync::TRUST_BUNDLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if reported.is_some_and(|r| !r.eq_ignore_ascii_case(&sha)) {
        desired.trust_bundle_pem = Some(ca.bundle().to_pem());
    }
    desired.trust_bundle_sha256 = Some(sha);
    if !dev.issued_by_current {
        desired.renew_certificate = true;
        desired.renew_serial = Some(dev.serial.clone());
    }
}

async fn agent_not_found() -> ApiError {
    ApiError::NotFound("route")
}

/// Routes served on the agent mTLS listener.
pub fn agent_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/agent/renew", post(renew))
        .route("/v1/agent/whoami", get(whoami))
        .route(
            "/v1/agent/models/{model_id}/artifact",
            get(crate::registry::download_artifact_for_device),
        )
        // Batches are larger than ordinary requests: their own limit (`ingest.max_batch_bytes`).
        .route(
            "/v1/agent/sync",
            post(sync).layer(DefaultBodyLimit::max(state.ingest.max_decoded_bytes)),
        )
        .fallback(agent_not_found)
        .layer(DefaultBodyLimit::max(state.body_limit_bytes))
        .with_state(state)
}
