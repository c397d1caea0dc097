//! Certificates for OT devices from the fleet CA (`kipctl ot issue`): MQTT brokers, PLCs,
//! OPC UA servers and clients. Issuing is [`kip_certs::ot`]; this module is the admin API,
//! the record (`ot_certificates`, migration 0060) and the expiry reminders.
//!
//! Invariants:
//! - Platform-admin only (`pki:admin` in the policy table), audited like every state change.
//! - Every field is checked before anything is signed ([`kip_certs::ot::OtCertSpec::validate`]);
//!   a refusal is a 422 naming the field. From a CSR only the public key is used.
//! - A generated private key is returned once and never stored; the record keeps the
//!   certificate (public) for the expiry reminders and rotation.
//! - Rotation (`replaces_serial`): the replaced certificate is marked `replaced_at` in the same
//!   transaction that records its successor, and leaves the reminders; it is not revoked (OT
//!   devices verify chains without a CRL): its expiry bounds it.
//! - Expiry reminders: `GET /v1/pki/ot-certificates?expiring_within_days=N` lists current
//!   certificates expiring within N days, soonest first; `kip_pki_ot_certificates_expiring`
//!   (within [`REMINDER_DAYS`]) and `kip_pki_ot_certificate_next_expiry_seconds` are set at
//!   every issue and list, and every minute with the device counts.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use kip_api::{IssueOtCertificate, IssuedOtCertificate, OtCertificateInfo};
use kip_certs::{
    CertError,
    ot::{OtCertSpec, OtKeySource, OtProfile},
};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Pki, PkiMetrics};
use crate::http::{ApiError, ApiJson, ApiResult, Principal};

/// Days before expiry from which a certificate counts in `kip_pki_ot_certificates_expiring`.
pub const REMINDER_DAYS: i64 = 30;
/// Most certificates one list answers.
const MAX_LIST: i64 = 1000;

fn cert_error(e: CertError) -> ApiError {
    match e {
        CertError::InvalidRequest { field, message } => ApiError::validation(field, message),
        CertError::Validity(m) => ApiError::validation("validity_days", m),
        CertError::Csr(m) => ApiError::validation("csr_pem", m),
        other => ApiError::internal(other),
    }
}

fn profile(body: &IssueOtCertificate) -> ApiResult<OtProfile> {
    match (body.profile.as_str(), &body.application_uri) {
        ("tls-server", None) => Ok(OtProfile::TlsServer),
        ("tls-client", None) => Ok(OtProfile::TlsClient),
        ("opcua", Some(uri)) => Ok(OtProfile::OpcUa {
            application_uri: uri.clone(),
        }),
        ("opcua", None) => Err(ApiError::validation(
            "application_uri",
            "is required for the opcua profile",
        )),
        ("tls-server" | "tls-client", Some(_)) => Err(ApiError::validation(
            "application_uri",
            "is only for the opcua profile",
        )),
        (other, _) => Err(ApiError::validation(
            "profile",
            format!("{other:?} is not one of tls-server, tls-client, opcua"),
        )),
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    serial_hex: String,
    profile: String,
    common_name: String,
    dns_names: Vec<String>,
    ip_addresses: Vec<String>,
    application_uri: Option<String>,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    issued_at: DateTime<Utc>,
    replaces_serial: Option<String>,
    replaced_at: Option<DateTime<Utc>>,
}

impl From<Row> for OtCertificateInfo {
    fn from(r: Row) -> Self {
        Self {
            id: r.id,
            serial_hex: r.serial_hex,
            profile: r.profile,
            common_name: r.common_name,
            dns_names: r.dns_names,
            ip_addresses: r.ip_addresses,
            application_uri: r.application_uri,
            not_before: r.not_before,
            not_after: r.not_after,
            issued_at: r.issued_at,
            replaces_serial: r.replaces_serial,
            replaced_at: r.replaced_at,
        }
    }
}

/// The columns of [`Row`] (a macro so queries stay `&'static str` literals).
macro_rules! columns {
    () => {
        "id, serial_hex, profile, common_name, dns_names, ip_addresses, application_uri, \
         not_before, not_after, issued_at, replaces_serial, replaced_at"
    };
}

/// `POST /v1/pki/ot-certificates`: issues (or rotates) an OT device certificate.
pub(super) async fn issue_ot(
    State(pool): State<PgPool>,
    State(maybe_pki): State<Option<Arc<Pki>>>,
    State(metrics): State<PkiMetrics>,
    p: Principal,
    ApiJson(body): ApiJson<IssueOtCertificate>,
) -> ApiResult<(StatusCode, Json<IssuedOtCertificate>)> {
    p.require_platform()?;
    let pki = maybe_pki.as_ref().ok_or(ApiError::Unavailable(
        "fleet PKI (pki.ca_dir is not configured)",
    ))?;
    let ip_addresses = body
        .ip_addresses
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|e| ApiError::validation("ip_addresses", format!("{s:?}: {e}")))
        })
        .collect::<ApiResult<Vec<_>>>()?;
    if let Some(csr) = &body.csr_pem
        && csr.len() > kip_certs::MAX_CSR_PEM_BYTES
    {
        return Err(ApiError::validation(
            "csr_pem",
            format!("longer than {} bytes", kip_certs::MAX_CSR_PEM_BYTES),
        ));
    }
    if let Some(s) = &body.replaces_serial
        && (s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::validation(
            "replaces_serial",
            "must be a certificate serial in hex",
        ));
    }
    let spec = OtCertSpec {
        profile: profile(&body)?,
        common_name: body.common_name.clone(),
        dns_names: body.dns_names.clone(),
        ip_addresses,
        validity_days: body.validity_days,
    };
    spec.validate().map_err(cert_error)?;
    let ca = pki.ca();
    // RSA key generation (OPC UA) takes a while: off the async threads.
    let issued = {
        let ca = ca.clone();
        let spec = spec.clone();
        let csr = body.csr_pem.clone();
        tokio::task::spawn_blocking(move || {
            let key = match &csr {
                Some(pem) => OtKeySource::Csr(pem),
                None => OtKeySource::Generate,
            };
            kip_certs::ot::issue(ca.current(), &spec, key, SystemTime::now())
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(cert_error)?
    };
    let mut tx = pool.begin().await?;
    if let Some(old) = &body.replaces_serial {
        let n = sqlx::query(
            "UPDATE ot_certificates SET replaced_at = now() \
             WHERE serial_hex = $1 AND replaced_at IS NULL",
        )
        .bind(old.to_ascii_lowercase())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(ApiError::validation(
                "replaces_serial",
                "no current OT certificate has this serial",
            ));
        }
    }
    let row: Row = sqlx::query_as(concat!(
        "INSERT INTO ot_certificates (id, serial_hex, profile, common_name, dns_names, \
         ip_addresses, application_uri, not_before, not_after, certificate_pem, \
         replaces_serial) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         RETURNING ",
        columns!()
    ))
    .bind(Uuid::new_v4())
    .bind(&issued.cert.serial_hex)
    .bind(&body.profile)
    .bind(&body.common_name)
    .bind(&body.dns_names)
    .bind(
        spec.ip_addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
    )
    .bind(&body.application_uri)
    .bind(DateTime::<Utc>::from(issued.cert.not_before))
    .bind(DateTime::<Utc>::from(issued.cert.not_after))
    .bind(&issued.cert.cert_pem)
    .bind(body.replaces_serial.as_deref().map(str::to_ascii_lowercase))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(serial = %row.serial_hex, profile = %row.profile, cn = %row.common_name,
        not_after = %row.not_after, "OT certificate issued");
    update_expiry_metrics(&pool, &metrics).await;
    Ok((
        StatusCode::CREATED,
        Json(IssuedOtCertificate {
            info: row.into(),
            certificate_pem: issued.cert.cert_pem,
            chain_pem: issued.cert.chain_pem,
            ca_bundle_pem: ca.bundle().to_pem(),
            private_key_pem: issued.private_key.map(|k| k.pem().to_owned()),
        }),
    ))
}

/// Query of `GET /v1/pki/ot-certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListOt {
    /// Only current certificates expiring within this many days (0..=3650), soonest first.
    expiring_within_days: Option<u32>,
}

/// `GET /v1/pki/ot-certificates`: the recorded OT certificates, newest first, or the expiry
/// reminder list with `expiring_within_days`.
pub(super) async fn list_ot(
    State(pool): State<PgPool>,
    State(metrics): State<PkiMetrics>,
    p: Principal,
    q: Result<Query<ListOt>, QueryRejection>,
) -> ApiResult<Json<Vec<OtCertificateInfo>>> {
    p.require_platform()?;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let rows: Vec<Row> = match q.expiring_within_days {
        Some(d) if d > 3650 => {
            return Err(ApiError::validation(
                "expiring_within_days",
                "must be between 0 and 3650",
            ));
        }
        Some(d) => {
            sqlx::query_as(concat!(
                "SELECT ",
                columns!(),
                " FROM ot_certificates WHERE replaced_at IS NULL \
                 AND not_after <= now() + make_interval(days => $1) \
                 ORDER BY not_after LIMIT $2"
            ))
            .bind(i32::try_from(d).unwrap_or(i32::MAX))
            .bind(MAX_LIST)
            .fetch_all(&pool)
            .await?
        }
        None => {
            sqlx::query_as(concat!(
                "SELECT ",
                columns!(),
                " FROM ot_certificates ORDER BY issued_at DESC LIMIT $1"
            ))
            .bind(MAX_LIST)
            .fetch_all(&pool)
            .await?
        }
    };
    update_expiry_metrics(&pool, &metrics).await;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// Sets the OT expiry gauges from the record (logged, never fails the caller).
pub async fn update_expiry_metrics(pool: &PgPool, m: &PkiMetrics) {
    let r: Result<(i64, Option<f64>), sqlx::Error> = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE not_after <= now() + make_interval(days => $1)), \
                EXTRACT(EPOCH FROM min(not_after) - now())::float8 \
         FROM ot_certificates WHERE replaced_at IS NULL",
    )
    .bind(REMINDER_DAYS as i32)
    .fetch_one(pool)
    .await;
    match r {
        Ok((expiring, next)) => {
            m.ot_expiring.set(expiring);
            if let Some(s) = next {
                m.ot_next_expiry_seconds.set(s as i64);
            }
            if expiring > 0 {
                tracing::warn!(
                    expiring,
                    within_days = REMINDER_DAYS,
                    "OT certificates expire soon: `kipctl ot list --expiring-within-days 30`, then `kipctl ot issue --replaces SERIAL`"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot count expiring OT certificates"),
    }
}
