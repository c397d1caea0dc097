//! PKI HTTP handlers and the functions the agent API calls: enrollment tokens, revocation and
//! the CA status (admin API), enrollment and renewal of expired certificates (token or key
//! possession), and for the agent mTLS listener [`authenticate_device`], [`renew_device`] and
//! [`desired_trust`].
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
//! - Revocation is per device (`device_revocations`) and per certificate, and covers every
//!   certificate the device ever had, expired ones included. A revoked device gets no new
//!   certificate (renewal, `/renew-expired`) and is re-admitted only by an enrollment token
//!   created after its revocation.
//! - Every new certificate of a device retires the others ([`issue`]): the predecessor works
//!   for `pki.renewal_overlap_s`, older ones stop at once, so at most two work at a time.
//!   Renewals and recoveries are rate limited per device (`pki.renewals_per_window`), counted
//!   under the device row lock.
//! - Cheap checks first: `/enroll` checks the token's shape and `/renew-expired` verifies the
//!   chain and the proof of possession in memory before any database work or signing.
//! - Errors never reveal which check a token failed (unknown, used, expired, other
//!   organisation): all answer the same 403.
//! - CA rollover: each request takes one snapshot of the CA ([`Pki::ca`]), so a certificate,
//!   the issuer recorded for it and the bundle returned come from the same CA even while it is
//!   reloaded. A certificate whose intermediate is neither the current nor the previous one
//!   (retired by `finish-rotation`) is refused on every request, like a revoked one.
//! - Sync acks carry the bundle fingerprint, the bundle itself only when the agent reported
//!   another one, and a renewal hint naming the certificate to replace while it comes from
//!   the previous intermediate.

use std::{sync::Arc, time::SystemTime};

use axum::{
    Json, Router,
    extract::{FromRef, State},
    http::StatusCode,
    routing::{get, post},
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use kip_api::{
    CaCertInfo, CaStatus, CertificateResponse, CreateEnrollToken, DevicesByIssuer, EnrollRequest,
    EnrollToken, RenewExpiredRequest, Revocation,
};
use kip_certs::{CertError, DeviceIdentity, IssuedCert};
use kip_shared::Name;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Pki, PkiMetrics};
use crate::http::{ApiError, ApiJson, ApiPath, ApiResult, HttpLimits, KeyCache, Principal};

/// The PKI state as held in the application state; `None` when `pki.ca_dir` is not set.
type MaybePki = Option<Arc<Pki>>;

/// The admin PKI routes, to be nested under `/v1`, and the token- or key-authenticated
/// enrollment routes at the root (`/enroll`, `/renew-expired`): `(v1, root)`.
pub fn router<S>() -> (Router<S>, Router<S>)
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    HttpLimits: FromRef<S>,
    MaybePki: FromRef<S>,
    PkiMetrics: FromRef<S>,
{
    let v1 = Router::new()
        .route(
            "/organisations/{org_id}/enroll-tokens",
            post(create_enroll_token),
        )
        .route(
            "/organisations/{org_id}/devices/{device_id}/revoke",
            post(revoke_device),
        )
        .route("/pki/ca", get(ca_status))
        .route("/pki/ca/reload", post(ca_reload))
        .route(
            "/pki/ot-certificates",
            post(super::ot_api::issue_ot).get(super::ot_api::list_ot),
        );
    let root = Router::new()
        .route("/enroll", post(enroll))
        .route("/renew-expired", post(renew_expired));
    (v1, root)
}

/// Largest accepted CSR (PEM). A P-256 CSR is under 1 KiB.
const MAX_CSR_BYTES: usize = 16 * 1024;
/// Default and bounds of an enrollment token's lifetime.
const DEFAULT_TOKEN_TTL_S: u64 = 3_600;
const MAX_TOKEN_TTL_S: u64 = 30 * 86_400;
const TOKEN_PREFIX: &str = "kipenroll_";

const BAD_TOKEN: &str =
    "enrollment token is invalid, expired, already used or for another organisation";

fn pki(p: &MaybePki) -> ApiResult<&Arc<Pki>> {
    p.as_ref().ok_or(ApiError::Unavailable(
        "fleet PKI (pki.ca_dir is not configured)",
    ))
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

// ---------- enrollment tokens (admin) ----------

async fn create_enroll_token(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
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
    .fetch_optional(&pool)
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

/// Revokes the device and every certificate it ever had, expired ones included, and answers
/// every serial this call revoked. Takes effect on the next handshake (the agent listener's
/// CRLs are rebuilt before this returns) and on the next request of an already open
/// connection; the device-level revocation also refuses renewal and recovery
/// (`/renew-expired`) and any certificate issued concurrently with this call.
async fn revoke_device(
    State(pool): State<PgPool>,
    State(maybe_pki): State<MaybePki>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Revocation>> {
    let org_id = p.org_scope(org_id)?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM devices WHERE org_id = $1 AND id = $2) \
             OR EXISTS (SELECT 1 FROM certificates WHERE org_id = $1 AND device_id = $2)",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_one(&pool)
    .await?;
    if !known {
        return Err(ApiError::NotFound("device"));
    }
    let mut tx = pool.begin().await?;
    // The device row first: a revocation racing a renewal must leave the device out even if
    // the new certificate commits after the UPDATE below ran (authenticate_device checks it).
    sqlx::query(
        "INSERT INTO device_revocations (org_id, device_id) VALUES ($1, $2) \
         ON CONFLICT (org_id, device_id) DO NOTHING",
    )
    .bind(org_id)
    .bind(device_id)
    .execute(&mut *tx)
    .await?;
    let mut revoked_serials: Vec<String> = sqlx::query_scalar(
        "UPDATE certificates SET revoked_at = now() \
         WHERE org_id = $1 AND device_id = $2 AND revoked_at IS NULL \
         RETURNING serial",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    revoked_serials.sort();
    if let Some(pki) = &maybe_pki {
        pki.refresh(&pool).await.map_err(ApiError::internal)?;
    }
    tracing::info!(%org_id, %device_id, count = revoked_serials.len(), "device certificates revoked");
    Ok(Json(Revocation {
        org_id,
        device_id,
        revoked_serials,
    }))
}

// ---------- CA status and reload (platform admin) ----------

/// The CA in use and how many devices each intermediate serves (`GET /v1/pki/ca` and the
/// console; the caller checked the key is a platform admin).
pub async fn ca_status_of(pool: &PgPool, metrics: &PkiMetrics, pki: &Pki) -> ApiResult<CaStatus> {
    let (current, previous, other) = super::count_devices_by_issuer(pki, pool, metrics).await?;
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
async fn ca_status(
    State(pool): State<PgPool>,
    State(maybe_pki): State<MaybePki>,
    State(metrics): State<PkiMetrics>,
    p: Principal,
) -> ApiResult<Json<CaStatus>> {
    p.require_platform()?;
    let pki = pki(&maybe_pki)?;
    Ok(Json(ca_status_of(&pool, &metrics, pki).await?))
}

/// `POST /v1/pki/ca/reload` (platform key): checks the CA files now instead of at the next
/// poll (same as SIGHUP). 422 when the files do not form a usable CA; the old one stays.
async fn ca_reload(
    State(pool): State<PgPool>,
    State(maybe_pki): State<MaybePki>,
    State(metrics): State<PkiMetrics>,
    p: Principal,
) -> ApiResult<Json<CaStatus>> {
    p.require_platform()?;
    let pki = pki(&maybe_pki)?;
    let reloaded = pki.reload_ca(&pool).await.map_err(|e| match e {
        super::PkiError::Ca(e) => ApiError::validation("ca_dir", e.to_string()),
        other => ApiError::internal(other),
    })?;
    let mut status = ca_status_of(&pool, &metrics, pki).await?;
    status.reloaded = Some(reloaded);
    Ok(Json(status))
}

// ---------- enrollment (token) ----------

fn check_csr(csr_pem: &str) -> ApiResult<()> {
    if csr_pem.is_empty() || csr_pem.len() > MAX_CSR_BYTES {
        return Err(ApiError::validation(
            "csr_pem",
            format!("must be 1 to {MAX_CSR_BYTES} bytes of PEM"),
        ));
    }
    Ok(())
}

/// Signs `csr_pem` for `id`, records the certificate inside `tx` and retires the device's
/// other certificates: `predecessor` (or, when `None`, the newest other working one) keeps
/// working for `pki.renewal_overlap_s`, every other one stops now. So a device holds at most
/// two working certificates, and only during the overlap.
async fn issue(
    tx: &mut sqlx::PgConnection,
    pki: &Pki,
    csr_pem: &str,
    id: DeviceIdentity,
    device_name: String,
    predecessor: Option<&str>,
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
    sqlx::query(
        "UPDATE certificates c SET retire_at = CASE WHEN c.serial = k.serial \
             THEN least(coalesce(c.retire_at, 'infinity'::timestamptz), \
                        now() + make_interval(secs => $5::float8)) \
             ELSE now() END \
         FROM (SELECT coalesce($4::text, ( \
                 SELECT serial FROM certificates \
                 WHERE org_id = $1 AND device_id = $2 AND serial <> $3 AND revoked_at IS NULL \
                   AND (retire_at IS NULL OR retire_at > now()) \
                 ORDER BY issued_at DESC LIMIT 1)) AS serial) k \
         WHERE c.org_id = $1 AND c.device_id = $2 AND c.serial <> $3 AND c.revoked_at IS NULL \
           AND (c.retire_at IS NULL OR c.retire_at > now())",
    )
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(&issued.serial_hex)
    .bind(predecessor)
    .bind(pki.renewal_policy().overlap.as_secs_f64())
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
    created_at: DateTime<Utc>,
    expired: bool,
    used: bool,
}

/// Whether `token` has the shape [`create_enroll_token`] gives every token (prefix and 32
/// random bytes in URL-safe base64), checked before any database work.
fn token_well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|t| {
        t.len() == 43
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// `POST /enroll`: the bootstrap token authenticates the request.
async fn enroll(
    State(pool): State<PgPool>,
    State(maybe_pki): State<MaybePki>,
    State(metrics): State<PkiMetrics>,
    extensions: axum::http::Extensions,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> ApiResult<(StatusCode, Json<CertificateResponse>)> {
    let pki = pki(&maybe_pki)?;
    // Before anything else: a flood of attempts from one address never reaches PostgreSQL.
    if let Some(axum::extract::ConnectInfo(peer)) =
        extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        && let Err(retry) = pki
            .enroll_limit()
            .check(peer.ip(), std::time::Instant::now())
    {
        metrics.enroll_rate_limited.inc();
        return Err(ApiError::TooManyRequests {
            message: "too many enrollment attempts from this address \
                      (pki.enrollments_per_ip_per_minute); retry later"
                .into(),
            retry_after_s: retry.as_secs().max(1),
        });
    }
    let name = Name::parse(&body.device_name)
        .map_err(|e| ApiError::validation("device_name", e.to_string()))?;
    check_csr(&body.csr_pem)?;
    // Cheap checks first: a malformed token never reaches the row lock below.
    if !token_well_formed(&body.token) {
        return Err(ApiError::Forbidden(BAD_TOKEN));
    }
    let mut tx = pool.begin().await?;
    let tok: Option<TokenRow> = sqlx::query_as(
        "SELECT id, org_id, device_name, created_at, expires_at <= now() AS expired, \
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
    // A revoked device is re-admitted only by a token created after its revocation: a token
    // handed out before (perhaps to whoever stole the device) stays useless.
    let revoked_at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT revoked_at FROM device_revocations WHERE org_id = $1 AND device_id = $2 \
         FOR UPDATE",
    )
    .bind(tok.org_id)
    .bind(device_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(at) = revoked_at {
        if tok.created_at <= at {
            tracing::warn!(token_id = %tok.id, %device_id, "enrollment of a revoked device refused");
            return Err(ApiError::Forbidden(
                "this device is revoked: create a new enrollment token for it to re-enroll",
            ));
        }
        sqlx::query("DELETE FROM device_revocations WHERE org_id = $1 AND device_id = $2")
            .bind(tok.org_id)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        tracing::info!(%device_id, "revoked device re-enrolled with a newer token");
    }
    let id = DeviceIdentity {
        org_id: tok.org_id,
        device_id,
    };
    let resp = issue(&mut tx, pki, &body.csr_pem, id, name.to_string(), None).await?;
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

/// `POST /renew-expired`: a device whose certificate expired (offline too long) gets a new
/// one without a bootstrap token, by proving it holds the certificate's key. Allowed for
/// `pki.expired_renewal_grace_s` after expiry, for the device's current certificate only (not
/// one a renewal superseded); revoked or deleted devices are refused.
///
/// Order (cheapest first, nothing signed or locked for a request that proves nothing): the
/// chain and the proof of possession are verified in memory, then one transaction checks the
/// device and the certificate (revocation, supersession, rate limit) and only then signs.
async fn renew_expired(
    State(pool): State<PgPool>,
    State(maybe_pki): State<MaybePki>,
    ApiJson(body): ApiJson<RenewExpiredRequest>,
) -> ApiResult<Json<CertificateResponse>> {
    let pki = pki(&maybe_pki)?;
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
    let ca = pki.ca();
    // No CRLs here: revocation is checked in the database below (device and certificate),
    // which also covers certificates expired long ago, without signing CRLs per request.
    let peer = kip_certs::verify_for_recovery(
        ca.bundle(),
        Vec::new(),
        &chain,
        &body.csr_pem,
        pki.expired_renewal_grace(),
        SystemTime::now(),
    )
    .map_err(|e| {
        tracing::warn!(error = %e, "renewal of an expired certificate refused");
        ApiError::Forbidden(RECOVERY_REFUSED)
    })?;
    let mut tx = pool.begin().await?;
    let device_name = lock_renewable(&mut tx, pki, &peer.serial_hex, peer.identity, false).await?;
    let resp = issue(
        &mut tx,
        pki,
        &body.csr_pem,
        peer.identity,
        device_name,
        Some(&peer.serial_hex),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(
        org_id = %peer.identity.org_id, device_id = %peer.identity.device_id,
        old_serial = %peer.serial_hex, serial = %resp.serial,
        "expired device certificate renewed by key possession"
    );
    Ok(Json(resp))
}

const RECOVERY_REFUSED: &str = "this certificate cannot be renewed: enroll again with a new token";

/// Locks the device of `serial` for issuing it a new certificate inside `tx` and checks that
/// it may have one: the device exists and is not revoked, the certificate is known, not
/// revoked and not retired (`in_overlap`: a certificate superseded less than
/// `pki.renewal_overlap_s` ago still counts, for an agent that missed the answer to its
/// renewal; recovery of an expired certificate passes `false`), and the device is under its
/// renewal rate limit. Returns the device name.
async fn lock_renewable(
    tx: &mut sqlx::PgConnection,
    pki: &Pki,
    serial: &str,
    id: DeviceIdentity,
    in_overlap: bool,
) -> ApiResult<String> {
    let refused = if in_overlap {
        "the client certificate is revoked or superseded"
    } else {
        RECOVERY_REFUSED
    };
    // The device row lock serialises renewals of one device, so the rate limit count below
    // cannot be raced.
    let name: Option<String> =
        sqlx::query_scalar("SELECT name FROM devices WHERE org_id = $1 AND id = $2 FOR UPDATE")
            .bind(id.org_id)
            .bind(id.device_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(name) = name else {
        return Err(ApiError::Forbidden(refused));
    };
    let row: Option<(bool, bool)> = sqlx::query_as(
        "SELECT c.revoked_at IS NOT NULL OR EXISTS ( \
                    SELECT 1 FROM device_revocations r \
                    WHERE r.org_id = c.org_id AND r.device_id = c.device_id), \
                c.retire_at IS NOT NULL AND (NOT $4 OR c.retire_at <= now()) \
         FROM certificates c WHERE c.serial = $1 AND c.org_id = $2 AND c.device_id = $3",
    )
    .bind(serial)
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(in_overlap)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        Some((false, false)) => {}
        Some((revoked, retired)) => {
            tracing::warn!(
                org_id = %id.org_id, device_id = %id.device_id, %serial, revoked, retired,
                "certificate renewal refused"
            );
            return Err(ApiError::Forbidden(refused));
        }
        None => return Err(ApiError::Forbidden(refused)),
    }
    let policy = pki.renewal_policy();
    let (issued, retry_after_s): (i64, f64) = sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM \
                    min(issued_at) + make_interval(secs => $3::float8) - now()), 0)::float8 \
         FROM certificates WHERE org_id = $1 AND device_id = $2 \
           AND issued_at > now() - make_interval(secs => $3::float8)",
    )
    .bind(id.org_id)
    .bind(id.device_id)
    .bind(policy.window.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    if issued >= i64::from(policy.per_window) {
        tracing::warn!(
            org_id = %id.org_id, device_id = %id.device_id, issued,
            "certificate renewal rate limited"
        );
        return Err(ApiError::TooManyRequests {
            message: format!(
                "this device was issued {issued} certificates within {} s \
                 (pki.renewals_per_window = {}); retry later",
                policy.window.as_secs(),
                policy.per_window
            ),
            // Whole seconds, at least 1: the oldest certificate of the window leaves it then.
            retry_after_s: retry_after_s.ceil().max(1.0) as u64,
        });
    }
    Ok(name)
}

// ---------- agent listener (mTLS): functions the agent API calls ----------

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

/// Who is behind `leaf` (DER), the client certificate the TLS verifier accepted at the
/// handshake: it must not have expired since, its certificate must be known, unrevoked, of an existing device, and issued by
/// the current or the previous intermediate (a rotation finished since the handshake ends
/// requests on old connections too, as revocation does). 403 otherwise.
pub async fn authenticate_device(
    pool: &PgPool,
    pki: Option<&Pki>,
    leaf: &[u8],
) -> ApiResult<DeviceCert> {
    let peer = kip_certs::parse_peer_cert(leaf)
        .map_err(|_| ApiError::Forbidden("the client certificate does not name a device"))?;
    // The handshake checked validity once; a connection may outlive the certificate, so
    // every request checks it again (cheap, before the database).
    if peer.not_after <= SystemTime::now() {
        return Err(ApiError::Forbidden(
            "the client certificate has expired: renew it with POST /renew-expired",
        ));
    }
    let ca = pki.map(Pki::ca);
    if let Some(ca) = &ca
        && !ca.current().is_issuer_of(leaf)
        && !ca.previous().is_some_and(|p| p.is_issuer_of(leaf))
    {
        return Err(ApiError::Forbidden(
            "the client certificate was issued by a retired intermediate CA: enroll again with a new token",
        ));
    }
    let row: Option<(bool, bool, Option<String>)> = sqlx::query_as(
        "SELECT c.revoked_at IS NOT NULL OR EXISTS ( \
                    SELECT 1 FROM device_revocations r \
                    WHERE r.org_id = c.org_id AND r.device_id = c.device_id), \
                c.retire_at IS NOT NULL AND c.retire_at <= now(), d.name \
         FROM certificates c \
         LEFT JOIN devices d ON d.org_id = c.org_id AND d.id = c.device_id \
         WHERE c.serial = $1 AND c.org_id = $2 AND c.device_id = $3",
    )
    .bind(&peer.serial_hex)
    .bind(peer.identity.org_id)
    .bind(peer.identity.device_id)
    .fetch_optional(pool)
    .await?;
    match row {
        Some((false, false, Some(device_name))) => Ok(DeviceCert {
            identity: peer.identity,
            device_name,
            serial: peer.serial_hex,
            not_after: peer.not_after.into(),
            issued_by_current: ca.is_some_and(|c| c.current().is_issuer_of(leaf)),
        }),
        Some((true, _, _)) => Err(ApiError::Forbidden("the client certificate is revoked")),
        Some((_, true, _)) => Err(ApiError::Forbidden(
            "the client certificate was superseded by a newer one: use the newest certificate",
        )),
        _ => Err(ApiError::Forbidden(
            "the client certificate is unknown or its device was deleted",
        )),
    }
}

/// A new certificate for the device named by its current one (`POST /v1/agent/renew`).
pub async fn renew_device(
    pool: &PgPool,
    maybe_pki: Option<&Pki>,
    dev: DeviceCert,
    csr_pem: &str,
) -> ApiResult<CertificateResponse> {
    let pki = maybe_pki.ok_or(ApiError::Unavailable(
        "fleet PKI (pki.ca_dir is not configured)",
    ))?;
    check_csr(csr_pem)?;
    let mut tx = pool.begin().await?;
    // Re-check under lock: a revocation or renewal committed since the extractor ran must win.
    lock_renewable(&mut tx, pki, &dev.serial, dev.identity, true).await?;
    let resp = issue(
        &mut tx,
        pki,
        csr_pem,
        dev.identity,
        dev.device_name,
        Some(&dev.serial),
    )
    .await?;
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
    Ok(resp)
}

/// CA rollover through the sync ack: always the current bundle's fingerprint; the bundle
/// itself when the agent reported another one (`reported_sha256`; agents that report nothing
/// predate bundle updates and would ignore it); a renewal hint when the device certificate
/// was issued by an intermediate that no longer signs.
pub fn desired_trust(
    pki: Option<&Pki>,
    dev: &DeviceCert,
    reported_sha256: Option<&str>,
    desired: &mut kip_shared::sync::DesiredState,
) {
    let Some(pki) = pki else { return };
    let ca = pki.ca();
    let sha = ca.bundle().sha256_hex();
    if reported_sha256.is_some_and(|r| !r.eq_ignore_ascii_case(&sha)) {
        desired.trust_bundle_pem = Some(ca.bundle().to_pem());
    }
    desired.trust_bundle_sha256 = Some(sha);
    if !dev.issued_by_current {
        desired.renew_certificate = true;
        desired.renew_serial = Some(dev.serial.clone());
    }
}
