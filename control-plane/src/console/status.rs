//! Console pages that only read: certificates and CA status, LLM usage and spend, the audit
//! log (keyset-paginated, newest first).
//!
//! Invariants: each page needs the permission of the API it mirrors (`devices:read` for
//! device certificates, `pki:admin` for the CA, `org:read` for spend, `audit:read` for the
//! log) and reads within the organisation checked by [`crate::http::Principal::org_scope`];
//! spend across organisations is shown to platform keys only.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    extract::{Query, State, rejection::QueryRejection},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ConsoleError, OrgParam, Signed, bad_query, esc, org_of, org_picker, page};
use crate::{
    http::{Permission, Scope},
    pki::{Pki, PkiMetrics},
};

/// A certificate expiring sooner than this is flagged.
const WARN_DAYS: i64 = 30;
/// Audit entries per page.
const AUDIT_PAGE: i64 = 100;
/// Days of LLM usage summarised.
const USAGE_DAYS: i32 = 30;

fn days_left(t: DateTime<Utc>) -> (i64, &'static str) {
    let days = (t - Utc::now()).num_days();
    let class = if t < Utc::now() {
        "err"
    } else if days < WARN_DAYS {
        "warn"
    } else {
        "ok"
    };
    (days, class)
}

fn expiry_cell(t: DateTime<Utc>) -> String {
    let (days, class) = days_left(t);
    format!(
        "<td>{}</td><td class=\"{class}\">{days} days</td>",
        t.format("%Y-%m-%d %H:%M UTC")
    )
}

/// `GET /console/certificates`.
pub(super) async fn certificates(
    State(pool): State<PgPool>,
    State(pki): State<Option<Arc<Pki>>>,
    State(metrics): State<PkiMetrics>,
    signed: Signed,
    params: Result<Query<OrgParam>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    signed.require(Permission::DevicesRead)?;
    let mut body = String::from("<h1>Certificates</h1><h2>Fleet CA</h2>");
    match (&pki, signed.holds(Permission::PkiAdmin)) {
        (_, false) => body.push_str(
            "<p class=\"note\">The CA's status needs a platform-admin key (permission pki:admin).</p>",
        ),
        (None, true) => body.push_str("<p>No PKI configured (<code>pki.ca_dir</code> is not set).</p>"),
        (Some(pki), true) => {
            let ca = crate::pki::ca_status_of(&pool, &metrics, pki).await?;
            body.push_str(
                "<table><thead><tr><th>Certificate</th><th>Fingerprint</th><th>Expires</th><th>Left</th>\
                 <th>Devices</th></tr></thead><tbody>",
            );
            let _ = write!(
                body,
                "<tr><td>Signing intermediate</td><td><code>{}</code></td>{}<td>{}</td></tr>",
                esc(&ca.intermediate.fingerprint),
                expiry_cell(ca.intermediate.not_after),
                ca.devices_by_issuer.current
            );
            if let Some(p) = &ca.previous_intermediate {
                let _ = write!(
                    body,
                    "<tr><td>Previous intermediate</td><td><code>{}</code></td>{}<td>{}</td></tr>",
                    esc(&p.fingerprint),
                    expiry_cell(p.not_after),
                    ca.devices_by_issuer.previous
                );
            }
            if let Some(root) = ca.root_not_after {
                let _ = write!(
                    body,
                    "<tr><td>Root</td><td>bundle of {} roots, sha256 <code>{}</code></td>{}<td></td></tr>",
                    ca.bundle_roots,
                    esc(&ca.bundle_sha256),
                    expiry_cell(root)
                );
            }
            body.push_str("</tbody></table>");
        }
    }
    let (orgs, org) = org_of(&pool, signed.principal(), params.org).await?;
    let Some(org) = org else {
        body.push_str("<p>No organisation yet.</p>");
        return Ok(page("Certificates", true, &body).into_response());
    };
    body.push_str("<h2>Device certificates</h2>");
    body.push_str(&org_picker(&orgs, org, "/console/certificates"));
    let certs = crate::pki::device_cert_expiries(&pool, org, 500).await?;
    body.push_str(
        "<p>Each device's newest certificate that is not revoked, soonest expiry first.</p>\
         <table><thead><tr><th>Device</th><th>Serial</th><th>Issued</th><th>Expires</th><th>Left</th>\
         </tr></thead><tbody>",
    );
    for c in &certs {
        let name = c.device_name.as_deref().unwrap_or("(deleted device)");
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/devices/{org}/{}\">{}</a></td><td><code>{}</code></td><td>{}</td>{}</tr>",
            c.device_id,
            esc(name),
            esc(&c.serial),
            c.issued_at.format("%Y-%m-%d"),
            expiry_cell(c.not_after)
        );
    }
    if certs.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No device certificates.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("Certificates", true, &body).into_response())
}

/// `GET /console/llm`.
pub(super) async fn llm(
    State(pool): State<PgPool>,
    signed: Signed,
    params: Result<Query<OrgParam>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    signed.require(Permission::OrgRead)?;
    let (orgs, org) = org_of(&pool, signed.principal(), params.org).await?;
    let Some(org) = org else {
        return Ok(page(
            "LLM usage",
            true,
            "<h1>LLM usage</h1><p>No organisation yet.</p>",
        )
        .into_response());
    };
    let mut body = String::from("<h1>LLM usage and spend</h1><h2>Spend this month (UTC)</h2>");
    let only = match signed.principal().scope {
        Scope::Platform => None,
        Scope::Org(own) => Some(own),
    };
    let spend = crate::llm::spend::spend_by_org(&pool, only, 1000).await?;
    body.push_str(
        "<table><thead><tr><th>Organisation</th><th>Spend (USD)</th></tr></thead><tbody>",
    );
    for (id, name, usd) in &spend {
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/llm?org={id}\">{}</a></td><td>{usd:.4}</td></tr>",
            esc(name)
        );
    }
    body.push_str("</tbody></table>");
    let _ = write!(body, "<h2>Calls in the last {USAGE_DAYS} days</h2>");
    body.push_str(&org_picker(&orgs, org, "/console/llm"));
    let usage = crate::llm::spend::usage(&pool, org, USAGE_DAYS).await?;
    body.push_str(
        "<table><thead><tr><th>Provider</th><th>Model</th><th>Calls</th><th>Errors</th><th>Cache hits</th>\
         <th>Tokens in</th><th>Tokens out</th><th>Cost (USD)</th><th>p50 ms</th><th>p99 ms</th></tr></thead><tbody>",
    );
    for u in &usage {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td>\
             <td>{}</td><td>{}</td></tr>",
            esc(&u.provider),
            esc(&u.model),
            u.calls,
            u.errors,
            u.cache_hits,
            u.tokens_in,
            u.tokens_out,
            u.cost_usd,
            u.p50_latency_ms.map_or("-".into(), |v| format!("{v:.0}")),
            u.p99_latency_ms.map_or("-".into(), |v| format!("{v:.0}")),
        );
    }
    if usage.is_empty() {
        body.push_str("<tr><td colspan=\"10\">No LLM calls.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("LLM usage", true, &body).into_response())
}

#[derive(Deserialize)]
pub(super) struct AuditParams {
    #[serde(default)]
    org: Option<Uuid>,
    /// Show entries older than this id (the "older" link's cursor).
    #[serde(default)]
    before: Option<i64>,
}

/// `GET /console/audit`.
pub(super) async fn audit(
    State(pool): State<PgPool>,
    signed: Signed,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    signed.require(Permission::AuditRead)?;
    let (orgs, org) = org_of(&pool, signed.principal(), params.org).await?;
    let Some(org) = org else {
        return Ok(page(
            "Audit log",
            true,
            "<h1>Audit log</h1><p>No organisation yet.</p>",
        )
        .into_response());
    };
    let mut rows = crate::fleet::recent_audit(&pool, org, params.before, AUDIT_PAGE + 1).await?;
    let more = rows.len() > usize::try_from(AUDIT_PAGE).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(AUDIT_PAGE).unwrap_or(usize::MAX));
    let mut body = String::from("<h1>Audit log</h1>");
    body.push_str(&org_picker(&orgs, org, "/console/audit"));
    body.push_str(
        "<table><thead><tr><th>When</th><th>Key</th><th>Role</th><th>Action</th>\
         <th>Target</th><th>From</th><th>Status</th></tr></thead><tbody>",
    );
    for r in &rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{} {}</td></tr>",
            r.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
            esc(&r.key_name),
            esc(&r.role),
            esc(&r.action),
            esc(&r.method),
            esc(&r.target),
            esc(r.client_ip.as_deref().unwrap_or("-")),
            r.status,
            esc(&r.outcome),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No entries.</td></tr>");
    }
    body.push_str("</tbody></table>");
    if more && let Some(last) = rows.last() {
        let _ = write!(
            body,
            "<p><a id=\"older\" href=\"/console/audit?org={org}&amp;before={}\">Older entries</a></p>",
            last.id
        );
    }
    Ok(page("Audit log", true, &body).into_response())
}
