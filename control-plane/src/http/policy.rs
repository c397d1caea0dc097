//! Who may do what: key roles, permissions, the route table, and the one middleware that
//! authorises every `/v1` request and writes the audit log.
//!
//! Invariants:
//! - Authorisation is decided here, once per request, before any handler runs: each `/v1`
//!   route and method maps to one [`Permission`] in [`ROUTES`], and the key's [`Role`] either
//!   holds it or the request ends with 403 `forbidden` whose body names the missing
//!   permission (`"permission": "keys:manage"`). Handlers only check the organisation
//!   ([`super::Principal::org_scope`]), never the role.
//! - A `/v1` route missing from [`ROUTES`] needs an admin role (org-admin or platform-admin):
//!   a route added without an entry is never open to a weaker key (fail closed), and the
//!   `every_documented_operation_has_a_rule` test names it.
//! - Every state-changing call (the audited rules: all but GET, and not the LLM API, whose
//!   calls are logged with their cost in `inference_logs`) by an authenticated key writes one
//!   `audit_log` row after the handler answered and before the client sees the answer,
//!   refused calls included. Requests without a valid key write nothing, so unauthenticated
//!   traffic cannot fill the log.
//! - An audit row belongs to the caller's own organisation for an organisation key (a key
//!   probing another organisation's routes leaves its trace in its own log, never in the
//!   other's), to the organisation in the path for a platform key, and to none (`NULL`) for
//!   platform-level calls such as creating an organisation.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, FromRequestParts as _, MatchedPath, RawPathParams, Request, State},
    http::request::Parts,
    middleware::Next,
    response::{IntoResponse, Response},
};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    ApiError, KeyCache, Scope,
    auth::{Authenticated, authenticate},
};

/// What a key is for. Stored in `api_keys.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The operator of the whole installation (a platform key, no organisation).
    PlatformAdmin,
    /// Everything within one organisation, keys included.
    OrgAdmin,
    /// Devices, enrollment, models and rollouts of one organisation; no keys, no audit log.
    Operator,
    /// The LLM API only (`/v1/query`, `/v1/chat/completions`).
    Llm,
    /// Reads the organisation's fleet, models and telemetry; changes nothing.
    ReadOnly,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::PlatformAdmin,
        Role::OrgAdmin,
        Role::Operator,
        Role::Llm,
        Role::ReadOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform-admin",
            Role::OrgAdmin => "org-admin",
            Role::Operator => "operator",
            Role::Llm => "llm",
            Role::ReadOnly => "read-only",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this role holds `perm`.
    pub fn allows(self, perm: Permission) -> bool {
        use Permission as P;
        match self {
            Role::PlatformAdmin => true,
            Role::OrgAdmin => !matches!(perm, P::OrgsManage | P::PkiAdmin),
            Role::Operator => matches!(
                perm,
                P::OrgRead
                    | P::DevicesRead
                    | P::DevicesWrite
                    | P::ModelsRead
                    | P::ModelsWrite
                    | P::TelemetryRead
                    | P::DocumentsRead
                    | P::DocumentsWrite
            ),
            Role::Llm => matches!(perm, P::LlmQuery),
            Role::ReadOnly => matches!(
                perm,
                P::OrgRead | P::DevicesRead | P::ModelsRead | P::TelemetryRead | P::DocumentsRead
            ),
        }
    }
}

/// One thing a route needs. The wire names (`as_str`) appear in 403 answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Create and delete organisations (platform-admin only).
    OrgsManage,
    /// The fleet CA's status and reload (platform-admin only).
    PkiAdmin,
    OrgRead,
    /// Change the organisation's own settings (display name).
    OrgWrite,
    /// List, create and revoke API keys.
    KeysManage,
    DevicesRead,
    /// Register, delete, enroll and revoke devices.
    DevicesWrite,
    ModelsRead,
    /// Register models, upload artifacts, change stages, roll out.
    ModelsWrite,
    TelemetryRead,
    /// Call the LLM gateway (spends the organisation's budget).
    LlmQuery,
    AuditRead,
    /// List documents and search them (rag).
    DocumentsRead,
    /// Upload and delete documents (rag).
    DocumentsWrite,
    /// Routes without a rule: only the admin roles.
    Unmapped,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::OrgsManage => "orgs:manage",
            Permission::PkiAdmin => "pki:admin",
            Permission::OrgRead => "org:read",
            Permission::OrgWrite => "org:write",
            Permission::KeysManage => "keys:manage",
            Permission::DevicesRead => "devices:read",
            Permission::DevicesWrite => "devices:write",
            Permission::ModelsRead => "models:read",
            Permission::ModelsWrite => "models:write",
            Permission::TelemetryRead => "telemetry:read",
            Permission::LlmQuery => "llm:query",
            Permission::AuditRead => "audit:read",
            Permission::DocumentsRead => "documents:read",
            Permission::DocumentsWrite => "documents:write",
            Permission::Unmapped => "admin",
        }
    }
}

/// How one route and method is authorised.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub method: &'static str,
    /// The route template as matched (`/v1/organisations/{org_id}`).
    pub path: &'static str,
    /// `None`: any valid key (`/v1/me`).
    pub permission: Option<Permission>,
    /// Name of the action in the audit log.
    pub action: &'static str,
    pub audited: bool,
}

const fn rule(
    method: &'static str,
    path: &'static str,
    permission: Permission,
    action: &'static str,
) -> Rule {
    Rule {
        method,
        path,
        permission: Some(permission),
        action,
        // Reads change nothing; everything else is audited.
        audited: !matches!(method.as_bytes(), b"GET"),
    }
}

use Permission as P;

const ORG: &str = "/v1/organisations/{org_id}";

/// Every `/v1` route and method with the permission it needs.
pub const ROUTES: &[Rule] = &[
    Rule {
        method: "GET",
        path: "/v1/me",
        permission: None,
        action: "me",
        audited: false,
    },
    rule("GET", "/v1/organisations", P::OrgRead, "org.list"),
    rule("POST", "/v1/organisations", P::OrgsManage, "org.create"),
    rule("GET", ORG, P::OrgRead, "org.get"),
    rule("PATCH", ORG, P::OrgWrite, "org.update"),
    rule("DELETE", ORG, P::OrgsManage, "org.delete"),
    rule(
        "GET",
        "/v1/organisations/{org_id}/api-keys",
        P::KeysManage,
        "key.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/api-keys",
        P::KeysManage,
        "key.create",
    ),
    rule(
        "DELETE",
        "/v1/organisations/{org_id}/api-keys/{key_id}",
        P::KeysManage,
        "key.revoke",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices",
        P::DevicesRead,
        "device.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/devices",
        P::DevicesWrite,
        "device.register",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices/{device_id}",
        P::DevicesRead,
        "device.get",
    ),
    rule(
        "DELETE",
        "/v1/organisations/{org_id}/devices/{device_id}",
        P::DevicesWrite,
        "device.delete",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/devices/{device_id}/revoke",
        P::DevicesWrite,
        "device.revoke",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/enroll-tokens",
        P::DevicesWrite,
        "device.enroll_token",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices/{device_id}/sensor-data",
        P::TelemetryRead,
        "telemetry.query",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/models",
        P::ModelsRead,
        "model.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/models",
        P::ModelsWrite,
        "model.register",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/models/{model_id}",
        P::ModelsRead,
        "model.get",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/models/{model_id}/artifact",
        P::ModelsRead,
        "model.download",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/models/{model_id}/artifact",
        P::ModelsWrite,
        "model.upload",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/models/{model_id}/stage",
        P::ModelsWrite,
        "model.stage",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/devices/{device_id}/desired-model",
        P::ModelsWrite,
        "model.rollout",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/model-status",
        P::ModelsRead,
        "model.status",
    ),
    // Agent releases and their rollouts (releases).
    rule(
        "GET",
        "/v1/organisations/{org_id}/releases",
        P::DevicesRead,
        "release.list",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/releases/{version}",
        P::DevicesWrite,
        "release.upload",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/release-rollouts",
        P::DevicesRead,
        "release.rollout.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/release-rollouts",
        P::DevicesWrite,
        "release.rollout.start",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/release-rollouts/{rollout_id}",
        P::DevicesRead,
        "release.rollout.status",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/release-rollouts/{rollout_id}/pause",
        P::DevicesWrite,
        "release.rollout.pause",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/release-rollouts/{rollout_id}/resume",
        P::DevicesWrite,
        "release.rollout.resume",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/release-rollouts/{rollout_id}/abort",
        P::DevicesWrite,
        "release.rollout.abort",
    ),
    // Remote agent configuration (device_config).
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices/{device_id}/config",
        P::DevicesRead,
        "device.config.get",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/devices/{device_id}/config",
        P::DevicesWrite,
        "device.config.set",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices/{device_id}/config/history",
        P::DevicesRead,
        "device.config.history",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/group-config",
        P::DevicesWrite,
        "group.config.set",
    ),
    // ML data (issue 14): feature sets, maintenance events, training data, performance,
    // predictions.
    rule(
        "GET",
        "/v1/organisations/{org_id}/feature-sets",
        P::ModelsRead,
        "feature_set.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/feature-sets",
        P::ModelsWrite,
        "feature_set.store",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/feature-sets/{feature_set_id}",
        P::ModelsRead,
        "feature_set.get",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/maintenance-events",
        P::TelemetryRead,
        "maintenance.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/maintenance-events",
        P::DevicesWrite,
        "maintenance.record",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/models/{model_id}/training-data",
        P::ModelsRead,
        "model.training_data.get",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/models/{model_id}/training-data",
        P::ModelsWrite,
        "model.training_data.record",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/models/{model_id}/performance",
        P::ModelsRead,
        "model.performance.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/models/{model_id}/performance",
        P::ModelsWrite,
        "model.performance.record",
    ),
    // Time-series retention (issue 17).
    rule(
        "GET",
        "/v1/organisations/{org_id}/telemetry/retention",
        P::TelemetryRead,
        "telemetry.retention.get",
    ),
    rule(
        "PUT",
        "/v1/organisations/{org_id}/telemetry/retention",
        P::OrgWrite,
        "telemetry.retention.set",
    ),
    rule(
        "DELETE",
        "/v1/organisations/{org_id}/telemetry/retention",
        P::OrgWrite,
        "telemetry.retention.delete",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/predictions",
        P::TelemetryRead,
        "prediction.history",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/predictions/latest",
        P::TelemetryRead,
        "prediction.latest",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/model-monitoring",
        P::ModelsRead,
        "model.monitoring.list",
    ),
    // Canary and shadow rollouts of model versions (models), their report (ml).
    rule(
        "GET",
        "/v1/organisations/{org_id}/model-rollouts",
        P::ModelsRead,
        "model.rollout.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/model-rollouts",
        P::ModelsWrite,
        "model.rollout.start",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/model-rollouts/{rollout_id}",
        P::ModelsRead,
        "model.rollout.get",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/model-rollouts/{rollout_id}/percent",
        P::ModelsWrite,
        "model.rollout.percent",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/model-rollouts/{rollout_id}/promote",
        P::ModelsWrite,
        "model.rollout.promote",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/model-rollouts/{rollout_id}/halt",
        P::ModelsWrite,
        "model.rollout.halt",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/model-rollouts/{rollout_id}/report",
        P::ModelsRead,
        "model.rollout.report",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/audit",
        P::AuditRead,
        "audit.list",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/device-health",
        P::DevicesRead,
        "health.list",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/devices/{device_id}/health",
        P::DevicesRead,
        "health.get",
    ),
    rule("GET", "/v1/pki/ca", P::PkiAdmin, "pki.status"),
    rule("POST", "/v1/pki/ca/reload", P::PkiAdmin, "pki.reload"),
    rule(
        "POST",
        "/v1/pki/ot-certificates",
        P::PkiAdmin,
        "pki.ot_issue",
    ),
    rule("GET", "/v1/pki/ot-certificates", P::PkiAdmin, "pki.ot_list"),
    rule(
        "GET",
        "/v1/mlflow/status",
        P::ModelsRead,
        "models.mlflow_status",
    ),
    rule(
        "GET",
        "/v1/model-signing",
        P::PkiAdmin,
        "pki.model_signing_status",
    ),
    Rule {
        audited: false,
        ..rule("POST", "/v1/query", P::LlmQuery, "llm.query")
    },
    // rag: OpenAI compatibility (models list, local embeddings).
    Rule {
        audited: false,
        ..rule("GET", "/v1/models", P::LlmQuery, "llm.models")
    },
    Rule {
        audited: false,
        ..rule("POST", "/v1/embeddings", P::LlmQuery, "llm.embeddings")
    },
    // rag: documents and retrieval.
    rule(
        "GET",
        "/v1/organisations/{org_id}/documents",
        P::DocumentsRead,
        "document.list",
    ),
    rule(
        "POST",
        "/v1/organisations/{org_id}/documents",
        P::DocumentsWrite,
        "document.upload",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/documents/search",
        P::DocumentsRead,
        "document.search",
    ),
    rule(
        "GET",
        "/v1/organisations/{org_id}/documents/{document_id}",
        P::DocumentsRead,
        "document.get",
    ),
    rule(
        "DELETE",
        "/v1/organisations/{org_id}/documents/{document_id}",
        P::DocumentsWrite,
        "document.delete",
    ),
    Rule {
        audited: false,
        ..rule("POST", "/v1/chat/completions", P::LlmQuery, "llm.chat")
    },
];

/// What the table says about a route and method.
#[derive(Debug, Clone, Copy)]
pub enum Lookup {
    Rule(Rule),
    /// The route has rules, for other methods: the router answers 405.
    OtherMethod,
    /// No rule at all: admin roles only.
    Unmapped,
}

pub fn lookup(method: &str, path: &str) -> Lookup {
    // HEAD is served by the GET handler.
    let method = if method == "HEAD" { "GET" } else { method };
    let mut other = false;
    for r in ROUTES {
        if r.path == path {
            if r.method == method {
                return Lookup::Rule(*r);
            }
            other = true;
        }
    }
    if other {
        Lookup::OtherMethod
    } else {
        Lookup::Unmapped
    }
}

fn holds(role: Role, p: Permission) -> bool {
    match p {
        P::Unmapped => matches!(role, Role::PlatformAdmin | Role::OrgAdmin),
        p => role.allows(p),
    }
}

/// Checks `role` against `permission` (`None`: any key).
pub fn check(role: Role, permission: Option<Permission>) -> Result<(), ApiError> {
    match permission {
        None => Ok(()),
        Some(p) if holds(role, p) => Ok(()),
        Some(p) => Err(ApiError::MissingPermission {
            permission: p.as_str(),
            role: role.as_str(),
            holders: Role::ALL
                .into_iter()
                .filter(|r| holds(*r, p))
                .map(Role::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The substate of [`authorize`].
#[derive(Debug, Clone)]
pub struct AuthState {
    pub pool: PgPool,
    pub keys: Arc<KeyCache>,
}

/// Longest `target` stored in an audit row (the request path).
const MAX_TARGET_CHARS: usize = 512;

/// Authenticates every `/v1` request, checks the key's role against [`ROUTES`], hands the
/// [`super::Principal`] to the handler and writes the audit row of state-changing calls.
/// Routes outside `/v1` (health, enrollment with its own token) pass through.
pub async fn authorize(State(st): State<AuthState>, req: Request, next: Next) -> Response {
    let Some(route) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    if !route.starts_with("/v1/") {
        return next.run(req).await;
    }
    let rule = match lookup(req.method().as_str(), &route) {
        Lookup::Rule(r) => r,
        Lookup::OtherMethod => return next.run(req).await,
        Lookup::Unmapped => {
            tracing::warn!(%route, "route has no permission rule; admin roles only");
            Rule {
                method: "",
                path: "",
                permission: Some(P::Unmapped),
                action: "unmapped",
                audited: !matches!(*req.method(), axum::http::Method::GET),
            }
        }
    };
    let (mut parts, body) = req.into_parts();
    let auth = match authenticate(&parts, &st.pool, &st.keys).await {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    let record = rule
        .audited
        .then(|| AuditRecord::new(&parts, &auth, rule.action));
    let org_in_path = org_in_path(&mut parts).await;
    let resp = match check(auth.principal.role, rule.permission) {
        Ok(()) => {
            parts.extensions.insert(auth.principal);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => e.into_response(),
    };
    if let Some(rec) = record {
        let org_id = match auth.principal.scope {
            Scope::Org(own) => Some(own),
            Scope::Platform => org_in_path,
        };
        if let Err(e) = rec.write(&st.pool, org_id, resp.status().as_u16()).await {
            // The call already happened; losing its row is an operator-visible error.
            tracing::error!(error = %e, action = rec.action, "cannot write audit row");
        }
    }
    resp
}

/// The permission the `/v1` route `path` (template) needs for `method`, as [`authorize`]
/// checks it; a route without a rule needs an admin role. Other entry points that act like a
/// `/v1` call (the web console's actions) check this, so there is one authorisation table.
pub fn permission_for(method: &str, path: &str) -> Option<Permission> {
    match lookup(method, path) {
        Lookup::Rule(r) => r.permission,
        Lookup::OtherMethod | Lookup::Unmapped => Some(P::Unmapped),
    }
}

/// Writes the audit row of a state-changing call made with a key outside `/v1` (the web
/// console's actions): the same row [`authorize`] writes, with the same organisation rule
/// (the caller's own organisation for an organisation key, `org_in_path` for a platform key).
#[expect(clippy::too_many_arguments, reason = "one audit row's fields")]
pub async fn audit(
    pool: &PgPool,
    auth: &Authenticated,
    action: &'static str,
    method: &str,
    target: &str,
    client_ip: Option<std::net::IpAddr>,
    org_in_path: Option<Uuid>,
    status: u16,
) -> sqlx::Result<()> {
    let rec = AuditRecord {
        key_id: auth.principal.key_id,
        key_name: auth.key_name.clone(),
        role: auth.principal.role.as_str(),
        action,
        method: method.to_owned(),
        target: target.chars().take(MAX_TARGET_CHARS).collect(),
        client_ip,
    };
    let org_id = match auth.principal.scope {
        Scope::Org(own) => Some(own),
        Scope::Platform => org_in_path,
    };
    rec.write(pool, org_id, status).await
}

async fn org_in_path(parts: &mut Parts) -> Option<Uuid> {
    let params = RawPathParams::from_request_parts(parts, &()).await.ok()?;
    params
        .iter()
        .find(|(k, _)| *k == "org_id")
        .and_then(|(_, v)| v.parse().ok())
}

/// An audit row before the outcome is known.
#[derive(Debug)]
struct AuditRecord {
    key_id: Uuid,
    key_name: Arc<str>,
    role: &'static str,
    action: &'static str,
    method: String,
    target: String,
    client_ip: Option<std::net::IpAddr>,
}

impl AuditRecord {
    fn new(parts: &Parts, auth: &Authenticated, action: &'static str) -> Self {
        Self {
            key_id: auth.principal.key_id,
            key_name: auth.key_name.clone(),
            role: auth.principal.role.as_str(),
            action,
            method: parts.method.as_str().to_owned(),
            target: parts.uri.path().chars().take(MAX_TARGET_CHARS).collect(),
            client_ip: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        }
    }

    async fn write(&self, pool: &PgPool, org_id: Option<Uuid>, status: u16) -> sqlx::Result<()> {
        let outcome = match status {
            401 | 403 => "denied",
            s if s < 400 => "ok",
            _ => "failed",
        };
        sqlx::query(
            "INSERT INTO audit_log \
             (org_id, key_id, key_name, role, action, method, target, client_ip, status, outcome) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet, $9, $10)",
        )
        .bind(org_id)
        .bind(self.key_id)
        .bind(&*self.key_name)
        .bind(self.role)
        .bind(self.action)
        .bind(&self.method)
        .bind(&self.target)
        .bind(self.client_ip.map(|ip| ip.to_string()))
        .bind(i16::try_from(status).unwrap_or(i16::MAX))
        .bind(outcome)
        .execute(pool)
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_llm_role_can_only_query() {
        for r in ROUTES {
            let Some(p) = r.permission else { continue };
            assert_eq!(
                Role::Llm.allows(p),
                p == P::LlmQuery,
                "{} {}",
                r.method,
                r.path
            );
        }
    }

    #[test]
    fn read_only_and_llm_roles_hold_no_audited_write() {
        for r in ROUTES.iter().filter(|r| r.audited) {
            let p = r.permission.unwrap_or(P::Unmapped);
            assert!(check(Role::ReadOnly, Some(p)).is_err(), "{}", r.path);
            assert!(check(Role::Llm, Some(p)).is_err(), "{}", r.path);
        }
    }

    #[test]
    fn unmapped_routes_need_an_admin_role() {
        assert!(check(Role::OrgAdmin, Some(P::Unmapped)).is_ok());
        assert!(check(Role::PlatformAdmin, Some(P::Unmapped)).is_ok());
        for r in [Role::Operator, Role::Llm, Role::ReadOnly] {
            assert!(check(r, Some(P::Unmapped)).is_err());
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    /// Every operation of `docs/openapi.json` under `/v1` has a rule (a new route without one
    /// would fall back to admin-only, which is safe but surely not what its author meant).
    #[test]
    fn every_documented_operation_has_a_rule() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
        let mut missing = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            if !path.starts_with("/v1/") || path.starts_with("/v1/agent/") {
                continue;
            }
            for method in ops.as_object().unwrap().keys() {
                let m = method.to_uppercase();
                if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
                    continue;
                }
                if !matches!(lookup(&m, path), Lookup::Rule(_)) {
                    missing.push(format!("{m} {path}"));
                }
            }
        }
        assert!(missing.is_empty(), "routes without a rule: {missing:?}");
    }
}
