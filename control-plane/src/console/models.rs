//! Console page of model versions and rollouts, and its actions: start a rollout to a device
//! or a device group (label selector), halt it, roll a device back to the previous version.
//!
//! Invariants: an action needs the permission of the API route it mirrors
//! (`PUT /v1/organisations/{org_id}/devices/{device_id}/desired-model`, `models:write`), runs
//! through the models domain's functions ([`crate::models::set_desired_model`],
//! [`crate::models::set_desired_model_for_group`], [`crate::models::roll_back`]) and writes one
//! audit row whatever its outcome (denied, refused input, done), like an API call. A form
//! without the session's CSRF token changes nothing.

use std::net::SocketAddr;

use axum::{
    Form,
    extract::{ConnectInfo, Query, State, rejection::FormRejection, rejection::QueryRejection},
    http::{Extensions, HeaderMap, StatusCode},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::{ConsoleError, Signed, bad_query, esc, org_of, org_picker, page as render};
use crate::http::{ApiError, Permission, policy};

/// The API route whose permission the actions need.
const DESIRED_MODEL_ROUTE: &str = "/v1/organisations/{org_id}/devices/{device_id}/desired-model";

#[derive(Deserialize)]
pub(super) struct PageParams {
    #[serde(default)]
    org: Option<Uuid>,
    /// What the last action did (one of a fixed set, never echoed text).
    #[serde(default)]
    done: Option<String>,
}

/// `GET /console/models`.
pub(super) async fn page(
    State(pool): State<PgPool>,
    signed: Signed,
    params: Result<Query<PageParams>, QueryRejection>,
) -> Result<Response, ConsoleError> {
    let Query(params) = params.map_err(|e| bad_query(&e))?;
    signed.require(Permission::ModelsRead)?;
    let (orgs, org) = org_of(&pool, signed.principal(), params.org).await?;
    let Some(org) = org else {
        return Ok(
            render("Models", true, "<h1>Models</h1><p>No organisation yet.</p>").into_response(),
        );
    };
    let devices = crate::models::rollout_status(&pool, org).await?;
    let versions = crate::models::model_versions(&pool, org, 500).await?;
    let groups = crate::models::group_rollouts(&pool, org).await?;
    let canaries = crate::models::model_rollouts(&pool, org).await?;
    let csrf = signed.csrf_field();
    let mut body = String::from("<h1>Models and rollouts</h1>");
    body.push_str(&org_picker(&orgs, org, "/console/models"));
    let notice = match params.done.as_deref() {
        Some("rollout") => {
            Some("Rollout started: devices pick it up with their next sync or heartbeat.")
        }
        Some("halt") => Some("Rollout halted."),
        Some("rollback") => Some("Rolled back to the previous version."),
        _ => None,
    };
    if let Some(n) = notice {
        body.push_str(&format!("<p class=\"notice\" id=\"notice\">{n}</p>"));
    }
    let permission = policy::permission_for("PUT", DESIRED_MODEL_ROUTE);
    if let Err(e) = policy::check(signed.principal().role, permission) {
        body.push_str(&format!(
            "<p class=\"note\">You can view rollouts but not change them: {}</p>",
            esc(&e.to_string())
        ));
    }
    let rollable: Vec<_> = versions.iter().filter(|v| v.has_artifact).collect();
    let model_select = |name: &str| {
        let mut s = format!("<select name=\"{name}\" aria-label=\"model version\">");
        for v in &rollable {
            s.push_str(&format!(
                "<option value=\"{}\">{}@{}</option>",
                v.id,
                esc(&v.name),
                esc(&v.version)
            ));
        }
        s.push_str("</select>");
        s
    };
    body.push_str(
        "<h2>Devices</h2><table><thead><tr><th>Device</th><th>Desired</th><th>Running</th>\
         <th>In sync</th><th>Last error</th><th>Roll out</th><th></th></tr></thead><tbody>",
    );
    for d in &devices {
        let actions = if d.desired_model.is_some() {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/console/models/halt\">{csrf}\
                 <input type=\"hidden\" name=\"org\" value=\"{org}\"><input type=\"hidden\" name=\"device\" value=\"{id}\">\
                 <button>Halt</button></form> \
                 <form class=\"inline\" method=\"post\" action=\"/console/models/rollback\">{csrf}\
                 <input type=\"hidden\" name=\"org\" value=\"{org}\"><input type=\"hidden\" name=\"device\" value=\"{id}\">\
                 <button>Roll back</button></form>",
                id = d.device_id
            )
        } else {
            String::new()
        };
        let rollout = if rollable.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/console/models/rollout\">{csrf}\
                 <input type=\"hidden\" name=\"org\" value=\"{org}\"><input type=\"hidden\" name=\"device\" value=\"{}\">\
                 {} <button>Roll out</button></form>",
                d.device_id,
                model_select("model")
            )
        };
        body.push_str(&format!(
            "<tr data-device=\"{}\"><td><a href=\"/console/devices/{org}/{}\">{}</a></td><td class=\"desired\">{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{rollout}</td><td>{actions}</td></tr>",
            esc(&d.device_name),
            d.device_id,
            esc(&d.device_name),
            esc(d.desired_model.as_deref().unwrap_or("-")),
            esc(d.running_model.as_deref().unwrap_or("-")),
            if d.in_sync { "<span class=\"ok\">yes</span>" } else { "no" },
            esc(d.last_error.as_deref().unwrap_or("")),
        ));
    }
    if devices.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No devices.</td></tr>");
    }
    body.push_str("</tbody></table>");

    body.push_str(
        "<h2>Device groups</h2><p>A group is every device whose labels contain the selector \
         (<code>key=value</code>, several joined by commas); a device's own rollout wins over its group's.</p>\
         <table><thead><tr><th>Selector</th><th>Model</th><th>Devices</th><th>Since</th><th></th></tr></thead><tbody>",
    );
    for g in &groups {
        let sel = selector_text(&g.selector.0);
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>\
             <form class=\"inline\" method=\"post\" action=\"/console/models/halt\">{csrf}\
             <input type=\"hidden\" name=\"org\" value=\"{org}\"><input type=\"hidden\" name=\"group\" value=\"{}\">\
             <button>Halt</button></form></td></tr>",
            esc(&sel),
            esc(&g.model),
            g.devices,
            g.updated_at.format("%Y-%m-%d %H:%M UTC"),
            esc(&sel),
        ));
    }
    if groups.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No group rollouts.</td></tr>");
    }
    body.push_str("</tbody></table>");
    if !rollable.is_empty() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"/console/models/rollout\">{csrf}\
             <input type=\"hidden\" name=\"org\" value=\"{org}\">\
             <label>Selector <input name=\"group\" placeholder=\"line=a\" required></label> {} \
             <button>Roll out to group</button></form>",
            model_select("model")
        ));
    }

    body.push_str(
        "<h2>Canary and shadow rollouts</h2><p>Started with <code>kipctl model rollouts start</code>; \
         halted automatically when the candidate crosses a threshold (the reason is shown).</p>\
         <table><thead><tr><th>Candidate</th><th>Baseline</th><th>Mode</th><th>Share</th>\
         <th>Selector</th><th>State</th><th>Halt reason</th></tr></thead><tbody>",
    );
    for r in &canaries {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}%</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.model),
            esc(&r.baseline_model),
            esc(&r.mode),
            r.percent,
            esc(&selector_text(&r.selector)),
            esc(&r.state),
            esc(r.halt_reason.as_deref().unwrap_or("")),
        ));
    }
    if canaries.is_empty() {
        body.push_str("<tr><td colspan=\"7\">No canary or shadow rollouts.</td></tr>");
    }
    body.push_str("</tbody></table>");

    body.push_str(
        "<h2>Model versions</h2><table><thead><tr><th>Name</th><th>Version</th><th>Stage</th>\
         <th>Artifact</th><th>Registered</th></tr></thead><tbody>",
    );
    for v in &versions {
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&v.name),
            esc(&v.version),
            esc(&v.stage),
            if v.has_artifact {
                "yes"
            } else {
                "no (cannot be rolled out)"
            },
            v.created_at.format("%Y-%m-%d %H:%M UTC"),
        ));
    }
    if versions.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No model versions.</td></tr>");
    }
    body.push_str("</tbody></table>");
    Ok(render("Models", true, &body).into_response())
}

/// `key=value,key=value` of a selector (values that are not strings as JSON).
fn selector_text(sel: &serde_json::Map<String, serde_json::Value>) -> String {
    sel.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `key=value[,key=value]` into a selector of string label values.
fn parse_selector(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let mut sel = serde_json::Map::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty() && k.len() <= 128)
            .ok_or_else(|| {
                ApiError::validation("group", "must be key=value pairs joined by commas")
            })?;
        if v.len() > 256 || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::validation("group", "label too long or not text"));
        }
        sel.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    if sel.is_empty() {
        return Err(ApiError::validation(
            "group",
            "must name at least one label",
        ));
    }
    Ok(sel)
}

/// The fields of every action form; each action reads the ones it needs. Ids arrive as text
/// so a malformed one is named in the answer rather than a generic form error.
#[derive(Deserialize)]
pub(super) struct ActionForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    org: Option<String>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

fn parse_id(field: &'static str, v: Option<&str>) -> Result<Uuid, ApiError> {
    let v = v
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::validation(field, "is required"))?;
    v.parse()
        .map_err(|_| ApiError::validation(field, "is not an id (a UUID)"))
}

#[derive(Clone, Copy)]
enum Action {
    Rollout,
    Halt,
    Rollback,
}

impl Action {
    fn path(self) -> &'static str {
        match self {
            Action::Rollout => "/console/models/rollout",
            Action::Halt => "/console/models/halt",
            Action::Rollback => "/console/models/rollback",
        }
    }

    fn audit_action(self, group: bool) -> &'static str {
        match (self, group) {
            (Action::Rollout, false) => "model.rollout",
            (Action::Rollout, true) => "model.rollout.group",
            (Action::Halt, _) => "model.rollout.halt",
            (Action::Rollback, _) => "model.rollback",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Rollout => "rollout",
            Action::Halt => "halt",
            Action::Rollback => "rollback",
        }
    }
}

/// `POST /console/models/rollout`: `device` or `group`, and `model`.
pub(super) async fn rollout(
    State(pool): State<PgPool>,
    signed: Signed,
    headers: HeaderMap,
    ext: Extensions,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    act(Action::Rollout, &pool, &signed, &headers, &ext, form).await
}

/// `POST /console/models/halt`: `device` or `group`.
pub(super) async fn halt(
    State(pool): State<PgPool>,
    signed: Signed,
    headers: HeaderMap,
    ext: Extensions,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    act(Action::Halt, &pool, &signed, &headers, &ext, form).await
}

/// `POST /console/models/rollback`: `device`.
pub(super) async fn rollback(
    State(pool): State<PgPool>,
    signed: Signed,
    headers: HeaderMap,
    ext: Extensions,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    act(Action::Rollback, &pool, &signed, &headers, &ext, form).await
}

async fn act(
    action: Action,
    pool: &PgPool,
    signed: &Signed,
    headers: &HeaderMap,
    ext: &Extensions,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return ConsoleError::bad_request(format!("Invalid form: {}", e.body_text()))
                .into_response();
        }
    };
    // Nothing is done, nor audited, for a form that is not this session's.
    if let Err(e) = signed.check_form(headers, form.csrf.as_deref()) {
        return e.into_response();
    }
    let org =
        match parse_id("org", form.org.as_deref()).and_then(|o| signed.principal().org_scope(o)) {
            Ok(o) => o,
            Err(e) => return ConsoleError::from(e).into_response(),
        };
    let group = form.group.as_deref().is_some_and(|g| !g.trim().is_empty());
    let outcome = run(action, pool, signed, org, &form, group).await;
    let status = match &outcome {
        Ok(()) => StatusCode::SEE_OTHER,
        Err(e) => e.status(),
    };
    let client_ip = ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if let Err(e) = policy::audit(
        pool,
        &signed.auth,
        action.audit_action(group),
        "POST",
        action.path(),
        client_ip,
        Some(org),
        status.as_u16(),
    )
    .await
    {
        tracing::error!(error = %e, "cannot write audit row of a console action");
    }
    match outcome {
        Ok(()) => Redirect::to(&format!("/console/models?org={org}&done={}", action.done()))
            .into_response(),
        Err(e) => ConsoleError::from(e).into_response(),
    }
}

async fn run(
    action: Action,
    pool: &PgPool,
    signed: &Signed,
    org: Uuid,
    form: &ActionForm,
    group: bool,
) -> Result<(), ApiError> {
    policy::check(
        signed.principal().role,
        policy::permission_for("PUT", DESIRED_MODEL_ROUTE),
    )?;
    match (action, group) {
        (Action::Rollout, false) => {
            let device = parse_id("device", form.device.as_deref())?;
            let model = parse_id("model", form.model.as_deref())?;
            crate::models::set_desired_model(pool, org, device, Some(model)).await?;
        }
        (Action::Rollout, true) => {
            let sel = parse_selector(form.group.as_deref().unwrap_or(""))?;
            let model = parse_id("model", form.model.as_deref())?;
            crate::models::set_desired_model_for_group(pool, org, &sel, Some(model)).await?;
        }
        (Action::Halt, false) => {
            let device = parse_id("device", form.device.as_deref())?;
            crate::models::set_desired_model(pool, org, device, None).await?;
        }
        (Action::Halt, true) => {
            let sel = parse_selector(form.group.as_deref().unwrap_or(""))?;
            crate::models::set_desired_model_for_group(pool, org, &sel, None).await?;
        }
        (Action::Rollback, _) => {
            let device = parse_id("device", form.device.as_deref())?;
            crate::models::roll_back(pool, org, device).await?;
        }
    }
    Ok(())
}
