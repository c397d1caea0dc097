//! Console domain: the web console under `/console`, server-rendered HTML (no JavaScript, no
//! external assets, charts as inline SVG: it works offline on a plant network).
//!
//! Pages: sign in (`GET /console`, `POST /console/login`), fleet with health state and search
//! by name, label or state (`GET /console/fleet`), one device with its health and a chart of
//! its recent readings and predictions (`GET /console/devices/{org_id}/{device_id}`, [`device`]),
//! model versions and rollouts with the actions start, halt and roll back
//! (`GET /console/models`, `POST /console/models/{rollout,halt,rollback}`, [`models`]),
//! certificates and CA status (`GET /console/certificates`), LLM usage and spend
//! (`GET /console/llm`), the audit log, keyset-paginated (`GET /console/audit`) ([`status`]),
//! sign out (`POST /console/logout`).
//!
//! Invariants:
//! - Signing in takes an API key; the console keeps it server-side in a session (random
//!   256-bit id, bounded table, `SESSION_TTL`) and hands the browser only the session id as an
//!   `HttpOnly; SameSite=Strict; Path=/console` cookie. Every request re-authenticates the
//!   stored key through [`crate::http::authenticate`], so a revoked key ends its sessions at
//!   once and the key's scope and role apply exactly as on the API.
//! - Authorisation is the API's: each page and action checks the [`Permission`] of the `/v1`
//!   route it mirrors ([`crate::http::policy::permission_for`], [`crate::http::policy::check`]);
//!   an action the role lacks is refused with the API's message and audited as denied.
//! - Every action (a form POST) carries the session's CSRF token (random, per session, compared
//!   in constant time) and is refused when the browser says it came from another site
//!   (`Sec-Fetch-Site`); actions change state only through the domain functions the API uses
//!   and write the same `audit_log` row an API call writes ([`crate::http::policy::audit`]).
//! - Everything written into a page is HTML-escaped ([`esc`]); bad input (an unknown or
//!   malformed id, a bad form value, a missing token) is a 4xx page naming the problem.
//! - Reads go through the owning domain's functions with the organisation checked by
//!   [`Principal::org_scope`].

mod device;
mod models;
mod status;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Form, Router,
    extract::{
        FromRef, FromRequestParts, Query, State,
        rejection::{FormRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    health::{self, DeviceState, HealthConfig},
    http::{ApiError, Authenticated, KeyCache, Permission, Principal, Scope, policy},
};

/// Cookie carrying the session id.
pub const COOKIE: &str = "kip_console";
/// A session ends this long after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions kept; beyond it the oldest is dropped.
const MAX_SESSIONS: usize = 10_000;

/// One signed-in session.
#[derive(Debug)]
struct Session {
    key: String,
    /// The token every form POST of this session must carry.
    csrf: String,
    expires: Instant,
}

/// Signed-in sessions by id.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    fn create(&self, key: String) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Session {
                key,
                csrf: hex::encode(rand::random::<[u8; 32]>()),
                expires: now + SESSION_TTL,
            },
        );
        id
    }

    /// The key and CSRF token of a live session.
    fn get(&self, id: &str) -> Option<(String, String)> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.key.clone(), s.csrf.clone()))
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
    Option<Arc<crate::pki::Pki>>: FromRef<S>,
    crate::pki::PkiMetrics: FromRef<S>,
{
    Router::new()
        .route("/console", get(index))
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route("/console/fleet", get(fleet))
        .route("/console/devices/{org_id}/{device_id}", get(device::page))
        .route("/console/models", get(models::page))
        .route("/console/models/rollout", post(models::rollout))
        .route("/console/models/halt", post(models::halt))
        .route("/console/models/rollback", post(models::rollback))
        .route("/console/certificates", get(status::certificates))
        .route("/console/llm", get(status::llm))
        .route("/console/audit", get(status::audit))
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
.err{color:#c5221f;font-weight:600}.warn{color:#b06000;font-weight:600}.ok{color:#137333}\
.notice{background:#e6f4ea;padding:8px 12px;border-radius:4px}.note{background:#fef7e0;padding:8px 12px;border-radius:4px}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;padding:8px;border-radius:6px}\
.chart svg{display:block}figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}.chart polyline{fill:none;stroke:#1a73e8;stroke-width:1.5}.chart .pred{stroke:#c5221f}\
.chart text{font-size:11px;fill:#5f6b7a}.chart line{stroke:#dde3ea}h2{margin-top:24px}td form{margin:0}dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px;background:#fff;padding:12px}";

fn page(title: &str, signed_in: bool, body: &str) -> Html<String> {
    let nav = if signed_in {
        "<a href=\"/console/fleet\">Fleet</a><a href=\"/console/models\">Models</a>\
         <a href=\"/console/certificates\">Certificates</a><a href=\"/console/llm\">LLM usage</a>\
         <a href=\"/console/audit\">Audit log</a><span style=\"flex:1\"></span>\
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

/// A signed-in request: the session's key, re-authenticated, and its CSRF token. Rejected
/// with a redirect to the sign-in page when there is no live session or the key no longer
/// authenticates (revoked, expired).
pub(crate) struct Signed {
    pub auth: Authenticated,
    pub csrf: String,
}

impl Signed {
    fn principal(&self) -> &Principal {
        &self.auth.principal
    }

    /// Checks that the key's role holds `permission` (the API's check and message).
    fn require(&self, permission: Permission) -> Result<(), ConsoleError> {
        policy::check(self.principal().role, Some(permission)).map_err(Into::into)
    }

    fn holds(&self, permission: Permission) -> bool {
        policy::check(self.principal().role, Some(permission)).is_ok()
    }

    /// The hidden form field every action form carries.
    fn csrf_field(&self) -> String {
        format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            esc(&self.csrf)
        )
    }

    /// Checks a form POST's CSRF token (constant time) and that the browser did not send it
    /// from another site.
    fn check_form(&self, headers: &HeaderMap, token: Option<&str>) -> Result<(), ConsoleError> {
        let cross_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "cross-site" || v == "same-site");
        let token_ok = token.is_some_and(|t| {
            t.len() == self.csrf.len()
                && t.bytes()
                    .zip(self.csrf.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if cross_site || !token_ok {
            return Err(ConsoleError::new(
                StatusCode::FORBIDDEN,
                "The form's security token is missing or does not match this session \
                 (or the form was sent from another site). Reload the page and submit it again.",
            ));
        }
        Ok(())
    }
}

impl<S> FromRequestParts<S> for Signed
where
    S: Send + Sync,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    Arc<Sessions>: FromRef<S>,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let sessions = Arc::<Sessions>::from_ref(state);
        let Some((key, csrf)) = cookie_value(&parts.headers).and_then(|id| sessions.get(&id))
        else {
            return Err(Redirect::to("/console").into_response());
        };
        let pool = PgPool::from_ref(state);
        let keys = Arc::<KeyCache>::from_ref(state);
        match authenticate_key(&key, &pool, &keys).await {
            Ok(auth) => Ok(Signed { auth, csrf }),
            Err(_) => Err(Redirect::to("/console").into_response()),
        }
    }
}

async fn authenticate_key(
    key: &str,
    pool: &PgPool,
    keys: &KeyCache,
) -> Result<Authenticated, ApiError> {
    let value =
        HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| ApiError::Unauthorized)?;
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    parts.headers.insert(header::AUTHORIZATION, value);
    let auth = crate::http::authenticate(&parts, pool, keys).await?;
    if !auth.principal.role.allows(Permission::DevicesRead) {
        return Err(ApiError::Forbidden("the key's role cannot read devices"));
    }
    Ok(auth)
}

/// A console page's error: a status and a message for a person, shown as a page. Internal
/// errors say only "internal error" (the detail goes to the log, as on the API).
#[derive(Debug)]
pub(crate) struct ConsoleError {
    status: StatusCode,
    message: String,
}

impl ConsoleError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> Self {
        if let ApiError::Internal(inner) = &e {
            tracing::error!(error = format!("{inner:#}"), "console: internal error");
        }
        Self {
            status: e.status(),
            message: e.to_string(),
        }
    }
}

impl From<sqlx::Error> for ConsoleError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        (
            self.status,
            page(
                title,
                true,
                &format!(
                    "<h1>{} {}</h1><p class=\"err\">{}</p><p><a href=\"/console/fleet\">Back to the fleet</a></p>",
                    self.status.as_u16(),
                    esc(title),
                    esc(&self.message)
                ),
            ),
        )
            .into_response()
    }
}

/// A query string the page could not read, as a 400 page naming the problem.
fn bad_query(e: &QueryRejection) -> ConsoleError {
    ConsoleError::bad_request(format!("Invalid query string: {}", e.body_text()))
}

/// The organisations the key may see (its own, or every one for a platform key, at most 1000)
/// and the one the page shows: `wanted` if the key may see it (else 404), else the first.
async fn org_of(
    pool: &PgPool,
    p: &Principal,
    wanted: Option<Uuid>,
) -> Result<(Vec<(Uuid, String)>, Option<Uuid>), ConsoleError> {
    let orgs: Vec<(Uuid, String)> = match p.scope {
        Scope::Org(o) => {
            sqlx::query_as("SELECT id, name FROM organisations WHERE id = $1")
                .bind(o)
                .fetch_all(pool)
                .await?
        }
        Scope::Platform => {
            sqlx::query_as("SELECT id, name FROM organisations ORDER BY name LIMIT 1000")
                .fetch_all(pool)
                .await?
        }
    };
    let current = match wanted {
        Some(o) => Some(p.org_scope(o)?),
        None => orgs.first().map(|o| o.0),
    };
    Ok((orgs, current))
}

/// A GET form choosing the organisation of `path` (only when there is a choice).
fn org_picker(orgs: &[(Uuid, String)], current: Uuid, path: &str) -> String {
    if orgs.len() < 2 {
        return String::new();
    }
    let mut out =
        format!("<form method=\"get\" action=\"{path}\">Organisation <select name=\"org\">");
    for (id, name) in orgs {
        let sel = if *id == current { " selected" } else { "" };
        out.push_str(&format!(
            "<option value=\"{id}\"{sel}>{}</option>",
            esc(name)
        ));
    }
    out.push_str("</select> <button>Show</button></form><br>");
    out
}

async fn index(signed: Result<Signed, Response>) -> Response {
    match signed {
        Ok(_) => Redirect::to("/console/fleet").into_response(),
        Err(_) => sign_in_page(None).into_response(),
    }
}

#[derive(Deserialize)]
struct LoginForm {
    api_key: String,
}

async fn login(
    State(pool): State<PgPool>,
    State(keys): State<Arc<KeyCache>>,
    State(sessions): State<Arc<Sessions>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return (
            StatusCode::BAD_REQUEST,
            sign_in_page(Some("The sign-in form needs an api_key field.")),
        )
            .into_response();
    };
    // A sign-in form posted from another site would sign the browser in with someone
    // else's key (login CSRF).
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return (
            StatusCode::FORBIDDEN,
            sign_in_page(Some("Sign in from the console's own page.")),
        )
            .into_response();
    }
    let key = form.api_key.trim().to_owned();
    match authenticate_key(&key, &pool, &keys).await {
        Ok(_) => {
            let id = sessions.create(key);
            let cookie = format!(
                "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/console; Max-Age={}",
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
                format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/console; Max-Age=0"),
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
    State(cfg): State<HealthConfig>,
    signed: Signed,
    params: Result<Query<FleetParams>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    let (orgs, org) = org_of(&pool, signed.principal(), params.org).await?;
    let Some(org) = org else {
        return Ok(
            page("Fleet", true, "<h1>Fleet</h1><p>No organisation yet.</p>").into_response(),
        );
    };
    let state = match params.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(DeviceState::parse(s).ok_or_else(|| {
            ConsoleError::bad_request("state must be one of ONLINE, STALE, OFFLINE")
        })?),
    };
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
        "<input type=\"search\" name=\"q\" size=\"30\" placeholder=\"name or label key=value\" value=\"{}\"> \
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
        <th>Last contact</th><th>Buffer</th><th>Oldest unsynced</th><th>Disk free</th><th>Model</th><th>Flags</th></tr></thead><tbody>");
    for d in &f.devices {
        let r = d.report.as_ref();
        let num = |k: &str| r.and_then(|r| r[k].as_f64());
        body.push_str(&format!(
            "<tr><td><a href=\"/console/devices/{org}/{}\">{}</a></td><td class=\"{}\">{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"warn\">{}</td></tr>",
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
            // The same flags as the API and `kipctl device health` (disk_low, cert_expiring, ...).
            esc(&d.flags.join(" ")),
        ));
    }
    if f.devices.is_empty() {
        body.push_str("<tr><td colspan=\"8\">No device matches.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(page("Fleet", true, &body).into_response())
}

/// `?org=` of a page: the organisation to show (platform keys choose; organisation keys
/// may name only their own).
#[derive(Deserialize)]
struct OrgParam {
    #[serde(default)]
    org: Option<Uuid>,
}
