//! Console domain: the web console under `/console`, server-rendered HTML (no JavaScript, no
//! external assets: it works offline on a plant network).
//!
//! Pages: sign in (`GET /console`, `POST /console/login`), fleet with health state and search
//! (`GET /console/fleet`), model rollout status (`GET /console/models`, desired vs running per
//! device, needs `models.read`), the audit log (`GET /console/audit`, needs `audit.read`), one device (`GET /console/devices/{org_id}/{device_id}`), sign out
//! (`POST /console/logout`).
//!
//! Invariants:
//! - Signing in takes an API key; the console keeps it server-side in a session (random
//!   256-bit id, bounded table, `SESSION_TTL`) and hands the browser only the session id as an
//!   `HttpOnly; SameSite=Lax; Path=/console` cookie. Every request re-authenticates the stored
//!   key through [`crate::http::authenticate`], so a revoked key ends its sessions at once and
//!   the key's scope and role apply exactly as on the API (`devices.read` for these pages).
//! - Everything written into a page is HTML-escaped ([`esc`]).
//! - Reads go through the health domain's functions ([`crate::health::fleet`],
//!   [`crate::health::device`]) with the organisation checked by [`Principal::org_scope`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Form, Router,
    extract::{FromRef, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    health::{self, DeviceState, HealthConfig},
    http::{ApiError, KeyCache, Permission, Principal, Scope},
};

/// Cookie carrying the session id.
pub const COOKIE: &str = "kip_console";
/// A session ends this long after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions kept; beyond it the oldest is dropped.
const MAX_SESSIONS: usize = 10_000;

/// Signed-in sessions: id -> (API key, expiry).
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, (String, Instant)>>);

impl Sessions {
    fn create(&self, key: String) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, (_, exp)| *exp > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, exp))| *exp)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), (key, now + SESSION_TTL));
        id
    }

    fn key(&self, id: &str) -> Option<String> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(id)
            .filter(|(_, exp)| *exp > Instant::now())
            .map(|(k, _)| k.clone())
    }

    fn remove(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }
}

/// The console routes (at the root, not under `/v1`).
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    Arc<Sessions>: FromRef<S>,
    HealthConfig: FromRef<S>,
{
    Router::new()
        .route("/console", get(index))
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route("/console/fleet", get(fleet))
        .route("/console/devices/{org_id}/{device_id}", get(device))
        .route("/console/audit", get(audit))
        .route("/console/models", get(models))
}

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0;color:#1c2430;background:#f4f6f8}\
header{background:#1c2430;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}\
header a{color:#cfe3ff;text-decoration:none}main{padding:20px}\
table{border-collapse:collapse;background:#fff;width:100%}th,td{padding:6px 10px;border-bottom:1px solid #dde3ea;text-align:left}\
.ONLINE{color:#137333;font-weight:600}.STALE{color:#b06000;font-weight:600}.OFFLINE{color:#c5221f;font-weight:600}\
.cards{display:flex;gap:12px;margin-bottom:16px}.card{background:#fff;padding:12px 18px;border-radius:6px}\
.card b{font-size:22px;display:block}form.inline{display:inline}input,select,button{font:inherit;padding:4px 8px}\
.err{color:#c5221f}dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;padding:12px}";

fn page(title: &str, signed_in: bool, body: &str) -> Html<String> {
    let nav = if signed_in {
        "<a href=\"/console/fleet\">Fleet</a><a href=\"/console/models\">Models</a><a href=\"/console/audit\">Audit log</a><span style=\"flex:1\"></span>\
         <form class=\"inline\" method=\"post\" action=\"/console/logout\"><button>Sign out</button></form>"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\"><title>{} - kip console</title><style>{STYLE}</style></head>\
         <body><header><strong>kip</strong>{nav}</header><main>{body}</main></body></html>",
        esc(title)
    ))
}

fn sign_in_page(error: Option<&str>) -> Html<String> {
    let err = error
        .map(|e| format!("<p class=\"err\">{}</p>", esc(e)))
        .unwrap_or_default();
    page(
        "Sign in",
        false,
        &format!(
            "<h1>Sign in</h1>{err}<form method=\"post\" action=\"/console/login\">\
             <label>API key <input type=\"password\" name=\"api_key\" autocomplete=\"off\" size=\"60\" required></label> \
             <button>Sign in</button></form>\
             <p>The key's organisation and role apply; the browser keeps only a session cookie.</p>"
        ),
    )
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The principal of the session in `headers`, re-authenticated; `None`: not signed in.
async fn principal(
    headers: &HeaderMap,
    sessions: &Sessions,
    pool: &PgPool,
    keys: &KeyCache,
) -> Result<Option<Principal>, ApiError> {
    let Some(key) = cookie_value(headers).and_then(|id| sessions.key(&id)) else {
        return Ok(None);
    };
    Ok(authenticate_key(&key, pool, keys).await.ok())
}

async fn authenticate_key(
    key: &str,
    pool: &PgPool,
    keys: &KeyCache,
) -> Result<Principal, ApiError> {
    let value =
        HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| ApiError::Unauthorized)?;
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    parts.headers.insert(header::AUTHORIZATION, value);
    let auth = crate::http::authenticate(&parts, pool, keys).await?;
    if !auth.principal.role.allows(Permission::DevicesRead) {
        return Err(ApiError::Forbidden("the key's role cannot read devices"));
    }
    Ok(auth.principal)
}

async fn index(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    Ok(match principal(&headers, &sessions, &pool, &keys).await? {
        Some(_) => Redirect::to("/console/fleet").into_response(),
        None => sign_in_page(None).into_response(),
    })
}

#[derive(Deserialize)]
struct LoginForm {
    api_key: String,
}

async fn login(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let key = form.api_key.trim().to_owned();
    match authenticate_key(&key, &pool, &keys).await {
        Ok(_) => {
            let id = sessions.create(key);
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Lax; Path=/console; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, cookie),
                    (header::LOCATION, "/console/fleet".into()),
                ],
            )
                .into_response()
        }
        Err(e) => {
            tracing::info!(error = %e, "console sign-in refused");
            (
                StatusCode::UNAUTHORIZED,
                sign_in_page(Some("That key was not accepted (unknown, revoked, or its role cannot read devices).")),
            )
                .into_response()
        }
    }
}

async fn logout(State(sessions): State<Arc<Sessions>>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_value(&headers) {
        sessions.remove(&id);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; HttpOnly; SameSite=Lax; Path=/console; Max-Age=0"),
            ),
            (header::LOCATION, "/console".into()),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct FleetParams {
    #[serde(default)]
    org: Option<Uuid>,
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    state: Option<String>,
}

fn ago(s: Option<f64>) -> String {
    match s {
        None => "never".into(),
        Some(s) if s < 120.0 => format!("{s:.0} s ago"),
        Some(s) if s < 7200.0 => format!("{:.0} min ago", s / 60.0),
        Some(s) => format!("{:.1} h ago", s / 3600.0),
    }
}

async fn fleet(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    State(cfg): State<HealthConfig>,
    headers: HeaderMap,
    Query(params): Query<FleetParams>,
) -> Result<Response, ApiError> {
    let Some(p) = principal(&headers, &sessions, &pool, &keys).await? else {
        return Ok(Redirect::to("/console").into_response());
    };
    let orgs: Vec<(Uuid, String)> = match p.scope {
        Scope::Org(o) => {
            sqlx::query_as("SELECT id, name FROM organisations WHERE id = $1")
                .bind(o)
                .fetch_all(&pool)
                .await?
        }
        Scope::Platform => {
            sqlx::query_as("SELECT id, name FROM organisations ORDER BY name LIMIT 1000")
                .fetch_all(&pool)
                .await?
        }
    };
    let Some(org) = params.org.or_else(|| orgs.first().map(|o| o.0)) else {
        return Ok(
            page("Fleet", true, "<h1>Fleet</h1><p>No organisation yet.</p>").into_response(),
        );
    };
    let org = p.org_scope(org)?;
    let state = params
        .state
        .as_deref()
        .filter(|s| !s.is_empty())
        .and_then(DeviceState::parse);
    let q = params.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let f = health::fleet(&pool, &cfg, org, state, q, 500).await?;
    let mut body = String::from("<h1>Fleet</h1>");
    body.push_str(&format!(
        "<div class=\"cards\"><div class=\"card\"><b class=\"ONLINE\">{}</b>online</div>\
         <div class=\"card\"><b class=\"STALE\">{}</b>stale</div>\
         <div class=\"card\"><b class=\"OFFLINE\">{}</b>offline</div></div>",
        f.counts.online, f.counts.stale, f.counts.offline
    ));
    body.push_str("<form method=\"get\" action=\"/console/fleet\">");
    if orgs.len() > 1 {
        body.push_str("<select name=\"org\">");
        for (id, name) in &orgs {
            let sel = if *id == org { " selected" } else { "" };
            body.push_str(&format!(
                "<option value=\"{id}\"{sel}>{}</option>",
                esc(name)
            ));
        }
        body.push_str("</select> ");
    } else {
        body.push_str(&format!(
            "<input type=\"hidden\" name=\"org\" value=\"{org}\">"
        ));
    }
    body.push_str(&format!(
        "<input type=\"search\" name=\"q\" placeholder=\"device name\" value=\"{}\"> \
         <select name=\"state\"><option value=\"\">any state</option>",
        esc(q.unwrap_or(""))
    ));
    for s in ["ONLINE", "STALE", "OFFLINE"] {
        let sel = if state.map(DeviceState::as_str) == Some(s) {
            " selected"
        } else {
            ""
        };
        body.push_str(&format!("<option{sel}>{s}</option>"));
    }
    body.push_str("</select> <button>Search</button></form><br><table><thead><tr><th>Device</th><th>State</th>\
        <th>Last contact</th><th>Buffer</th><th>Oldest unsynced</th><th>Disk free</th><th>Model</th></tr></thead><tbody>");
    for d in &f.devices {
        let r = d.report.as_ref();
        let num = |k: &str| r.and_then(|r| r[k].as_f64());
        body.push_str(&format!(
            "<tr><td><a href=\"/console/devices/{org}/{}\">{}</a></td><td class=\"{}\">{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            d.device_id,
            esc(&d.name),
            esc(&d.state),
            esc(&d.state),
            ago(d.seconds_since_contact),
            num("buffer_records").map_or("-".into(), |n| format!("{n} records")),
            num("oldest_unsynced_age_s").map_or("-".into(), |s| format!("{s:.0} s")),
            match (num("disk_free_bytes"), num("disk_total_bytes")) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.0} %", a / b * 100.0),
                _ => "-".into(),
            },
            esc(r.and_then(|r| r["running_model"].as_str()).unwrap_or("-")),
        ));
    }
    if f.devices.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No device matches.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("Fleet", true, &body).into_response())
}

#[derive(Deserialize)]
struct OrgParam {
    #[serde(default)]
    org: Option<Uuid>,
}

async fn audit(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    headers: HeaderMap,
    Query(params): Query<OrgParam>,
) -> Result<Response, ApiError> {
    let Some(p) = principal(&headers, &sessions, &pool, &keys).await? else {
        return Ok(Redirect::to("/console").into_response());
    };
    if !p.role.allows(Permission::AuditRead) {
        return Err(ApiError::Forbidden(
            "the key's role cannot read the audit log",
        ));
    }
    let org = match (params.org, p.scope) {
        (Some(o), _) | (None, Scope::Org(o)) => p.org_scope(o)?,
        (None, Scope::Platform) => {
            return Ok(page(
                "Audit log",
                true,
                "<h1>Audit log</h1><p>Choose an organisation: <code>/console/audit?org=ID</code>.</p>",
            )
            .into_response());
        }
    };
    let rows = crate::fleet::recent_audit(&pool, org, 200).await?;
    let mut body = String::from(
        "<h1>Audit log</h1><table><thead><tr><th>When</th><th>Key</th><th>Role</th><th>Action</th>\
         <th>Target</th><th>From</th><th>Status</th></tr></thead><tbody>",
    );
    for r in &rows {
        body.push_str(&format!(
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
        ));
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No entries.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("Audit log", true, &body).into_response())
}

async fn models(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    headers: HeaderMap,
    Query(params): Query<OrgParam>,
) -> Result<Response, ApiError> {
    let Some(p) = principal(&headers, &sessions, &pool, &keys).await? else {
        return Ok(Redirect::to("/console").into_response());
    };
    if !p.role.allows(Permission::ModelsRead) {
        return Err(ApiError::Forbidden("the key's role cannot read models"));
    }
    let org = match (params.org, p.scope) {
        (Some(o), _) | (None, Scope::Org(o)) => p.org_scope(o)?,
        (None, Scope::Platform) => {
            return Ok(page(
                "Models",
                true,
                "<h1>Models</h1><p>Choose an organisation: <code>/console/models?org=ID</code>.</p>",
            )
            .into_response());
        }
    };
    let rows = crate::models::rollout_status(&pool, org).await?;
    let mut body = String::from(
        "<h1>Model rollout</h1><p>Roll out or back with <code>kipctl model rollout</code> \
         (the API's desired-model); agents pick it up with their next sync or heartbeat.</p>\
         <table><thead><tr><th>Device</th><th>Desired</th><th>Running</th><th>In sync</th>\
         <th>Last error</th></tr></thead><tbody>",
    );
    for r in &rows {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.device_name),
            esc(r.desired_model.as_deref().unwrap_or("-")),
            esc(r.running_model.as_deref().unwrap_or("-")),
            if r.in_sync { "yes" } else { "no" },
            esc(r.last_error.as_deref().unwrap_or("")),
        ));
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No devices.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("Models", true, &body).into_response())
}

async fn device(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    State(cfg): State<HealthConfig>,
    headers: HeaderMap,
    axum::extract::Path((org_id, device_id)): axum::extract::Path<(Uuid, Uuid)>,
) -> Result<Response, ApiError> {
    let Some(p) = principal(&headers, &sessions, &pool, &keys).await? else {
        return Ok(Redirect::to("/console").into_response());
    };
    let org = p.org_scope(org_id)?;
    let d = health::device(&pool, &cfg, org, device_id)
        .await?
        .ok_or(ApiError::NotFound("device"))?;
    let mut body = format!(
        "<h1>{}</h1><p class=\"{}\">{}</p><dl><dt>Last contact</dt><dd>{}</dd>",
        esc(&d.name),
        esc(&d.state),
        esc(&d.state),
        ago(d.seconds_since_contact)
    );
    if let Some(serde_json::Value::Object(r)) = &d.report {
        for (k, v) in r {
            if k == "sources" {
                continue;
            }
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            body.push_str(&format!("<dt>{}</dt><dd>{}</dd>", esc(k), esc(&text)));
        }
        body.push_str(
            "</dl><h2>Sources</h2><table><thead><tr><th>Name</th><th>Kind</th><th>Connected</th>\
            <th>Last value</th><th>Reconnects</th></tr></thead><tbody>",
        );
        for s in r
            .get("sources")
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
        {
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(s["name"].as_str().unwrap_or("")),
                esc(s["kind"].as_str().unwrap_or("")),
                if s["connected"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                },
                ago(s["last_value_age_s"].as_f64()),
                s["reconnects"].as_u64().unwrap_or(0),
            ));
        }
        body.push_str("</tbody></table>");
    } else {
        body.push_str("</dl><p>No health report yet.</p>");
    }
    Ok(page(&d.name, true, &body).into_response())
}
