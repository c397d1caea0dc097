//! Console page of one device: state, buffer, sync lag, certificate expiry, model and drift
//! from the health report the device last sent, its sources, and charts (inline SVG, drawn on
//! the server) of its recent readings and predictions.
//!
//! Invariants: the device is read within the organisation checked by
//! [`crate::http::Principal::org_scope`]; an unknown or malformed id is a 4xx page. Charts need
//! `telemetry:read` (as the telemetry API does) and are bounded: at most [`MAX_SERIES`] series
//! of [`POINTS`] readings and [`POINTS`] predictions per page.

use std::fmt::Write as _;

use axum::{
    extract::{Path, State, rejection::PathRejection},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{ConsoleError, Signed, ago, esc, page as render};
use crate::{
    health::{self, HealthConfig},
    http::Permission,
    telemetry::recent,
};

/// Series drawn per device.
const MAX_SERIES: i64 = 6;
/// Newest points drawn per series (and predictions per page).
const POINTS: i64 = 240;
/// A certificate expiring sooner than this is flagged.
const CERT_WARN_DAYS: i64 = 30;

/// `GET /console/devices/{org_id}/{device_id}`.
pub(super) async fn page(
    State(pool): State<PgPool>,
    State(cfg): State<HealthConfig>,
    signed: Signed,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ConsoleError> {
    let Path((org_id, device_id)) = path.map_err(|e| ConsoleError::bad_request(e.body_text()))?;
    let org_id: Uuid = org_id.parse().map_err(|_| {
        ConsoleError::bad_request("The organisation id in the address is not a UUID.")
    })?;
    let device_id: Uuid = device_id
        .parse()
        .map_err(|_| ConsoleError::bad_request("The device id in the address is not a UUID."))?;
    let org = signed.principal().org_scope(org_id)?;
    let d = health::device(&pool, &cfg, org, device_id)
        .await?
        .ok_or_else(|| {
            ConsoleError::new(
                axum::http::StatusCode::NOT_FOUND,
                "No such device in this organisation.",
            )
        })?;
    let r = d.report.as_ref().and_then(|r| r.as_object());
    let num = |k: &str| r.and_then(|r| r.get(k)).and_then(serde_json::Value::as_f64);
    let text = |k: &str| {
        r.and_then(|r| r.get(k))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };

    let mut body = format!(
        "<h1>{}</h1><p><span class=\"{}\">{}</span> &middot; last contact {}</p>",
        esc(&d.name),
        esc(&d.state),
        esc(&d.state),
        ago(d.seconds_since_contact)
    );
    if !d.flags.is_empty() {
        let _ = write!(
            body,
            "<p class=\"warn\">Flags: {}</p>",
            esc(&d.flags.join(", "))
        );
    }
    // Summary cards: the questions an operator asks first.
    let buffer = match (num("buffer_bytes"), num("buffer_max_bytes")) {
        (Some(b), Some(m)) if m > 0.0 => format!("{:.0} %", b / m * 100.0),
        (Some(b), _) => format!("{:.1} MiB", b / 1_048_576.0),
        _ => "-".into(),
    };
    let lag = num("oldest_unsynced_age_s").map_or_else(
        || {
            if r.is_some() {
                "in sync".to_owned()
            } else {
                "-".to_owned()
            }
        },
        |s| format!("{s:.0} s"),
    );
    let (cert, cert_class) =
        match text("cert_not_after").and_then(|t| t.parse::<DateTime<Utc>>().ok()) {
            Some(t) => {
                let days = (t - Utc::now()).num_days();
                let class = if days < 0 {
                    "err"
                } else if days < CERT_WARN_DAYS {
                    "warn"
                } else {
                    "ok"
                };
                (format!("{days} days"), class)
            }
            None => ("-".into(), ""),
        };
    let model = text("running_model").unwrap_or_else(|| "-".into());
    // Drift score (>= 1: a feature is above its threshold) and the drifting features.
    let drifting: Vec<&str> = r
        .and_then(|r| r.get("model_drift_features"))
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    let drift = match num("model_drift") {
        None => "-".into(),
        Some(d) if drifting.is_empty() => format!("{d:.3}"),
        Some(d) => format!("{d:.3} ({})", drifting.join(", ")),
    };
    let disk = match (num("disk_free_bytes"), num("disk_total_bytes")) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.0} % free", a / b * 100.0),
        _ => "-".into(),
    };
    let _ = write!(
        body,
        "<div class=\"cards\"><div class=\"card\"><b>{buffer}</b>buffer ({} records)</div>\
         <div class=\"card\"><b>{}</b>sync lag (oldest unsynced)</div>\
         <div class=\"card\"><b class=\"{cert_class}\">{}</b>certificate expiry</div>\
         <div class=\"card\"><b>{}</b>model, drift {}</div>\
         <div class=\"card\"><b>{}</b>state volume</div></div>",
        num("buffer_records").unwrap_or(0.0),
        esc(&lag),
        esc(&cert),
        esc(&model),
        esc(&drift),
        esc(&disk),
    );

    if signed.holds(Permission::TelemetryRead) {
        body.push_str(&charts(&pool, org, device_id).await?);
    } else {
        body.push_str("<p class=\"note\">Charts need a key whose role reads telemetry.</p>");
    }

    body.push_str(
        "<h2>Sources</h2><table><thead><tr><th>Name</th><th>Kind</th><th>Connected</th>\
         <th>Last value</th><th>Reconnects</th></tr></thead><tbody>",
    );
    let sources: Vec<&serde_json::Value> = r
        .and_then(|r| r.get("sources"))
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    for s in &sources {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(s["name"].as_str().unwrap_or("")),
            esc(s["kind"].as_str().unwrap_or("")),
            if s["connected"].as_bool() == Some(true) {
                "<span class=\"ok\">yes</span>"
            } else {
                "<span class=\"err\">no</span>"
            },
            ago(s["last_value_age_s"].as_f64()),
            s["reconnects"].as_u64().unwrap_or(0),
        );
    }
    if sources.is_empty() {
        body.push_str("<tr><td colspan=\"5\">No sources reported.</td></tr>");
    }
    body.push_str("</tbody></table><h2>Health report</h2>");
    match r {
        Some(r) => {
            body.push_str("<dl>");
            for (k, v) in r {
                if k == "sources" {
                    continue;
                }
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                };
                let _ = write!(body, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&text));
            }
            body.push_str("</dl>");
        }
        None => body.push_str("<p>No health report yet.</p>"),
    }
    Ok(render(&d.name, true, &body).into_response())
}

/// The points of one chart.
type Series = Vec<(DateTime<Utc>, f64)>;

/// The charts of the device's recent readings (one per series) and predictions (remaining
/// useful life per machine).
async fn charts(pool: &PgPool, org: Uuid, device: Uuid) -> Result<String, ConsoleError> {
    let readings = recent::recent_readings(pool, org, device, MAX_SERIES, POINTS).await?;
    let predictions = recent::recent_predictions(pool, org, device, POINTS).await?;
    let mut out = String::from("<h2>Recent readings and predictions</h2><div class=\"charts\">");
    let mut series: Vec<(String, Series)> = Vec::new();
    for p in readings {
        let name = if p.machine.is_empty() {
            p.metric.clone()
        } else {
            format!("{} / {}", p.machine, p.metric)
        };
        match series.last_mut() {
            Some((n, pts)) if *n == name => pts.push((p.ts, p.value)),
            _ => series.push((name, vec![(p.ts, p.value)])),
        }
    }
    let mut by_machine: Vec<(String, Series)> = Vec::new();
    for p in predictions {
        let name = format!("{} RUL (cycles, {})", p.machine, p.model_version);
        match by_machine.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push((p.ts, p.rul_cycles)),
            None => by_machine.push((name, vec![(p.ts, p.rul_cycles)])),
        }
    }
    for (name, pts) in &series {
        out.push_str(&line_chart(name, pts, false));
    }
    for (name, pts) in by_machine.iter().take(4) {
        out.push_str(&line_chart(name, pts, true));
    }
    if series.is_empty() && by_machine.is_empty() {
        out.push_str("<p>No readings or predictions synced yet.</p>");
    }
    out.push_str("</div>");
    Ok(out)
}

const W: f64 = 420.0;
const H: f64 = 140.0;
const PAD_L: f64 = 52.0;
const PAD_R: f64 = 8.0;
const PAD_T: f64 = 8.0;
const PAD_B: f64 = 22.0;

/// One series as an SVG line chart: y from its min to max, x from its oldest to newest point.
/// `points` may come in any order.
fn line_chart(title: &str, points: &[(DateTime<Utc>, f64)], prediction: bool) -> String {
    let mut pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|(t, v)| (t.timestamp_millis() as f64, *v))
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (Some(first), Some(last)) = (pts.first().copied(), pts.last().copied()) else {
        return String::new();
    };
    let (lo, hi) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (_, v)| {
            (lo.min(*v), hi.max(*v))
        });
    let span_y = if hi > lo { hi - lo } else { 1.0 };
    let span_x = if last.0 > first.0 {
        last.0 - first.0
    } else {
        1.0
    };
    let x = |t: f64| PAD_L + (t - first.0) / span_x * (W - PAD_L - PAD_R);
    let y = |v: f64| PAD_T + (hi - v) / span_y * (H - PAD_T - PAD_B);
    let mut line = String::new();
    for (t, v) in &pts {
        let _ = write!(line, "{:.1},{:.1} ", x(*t), y(*v));
    }
    let time = |ms: f64| {
        DateTime::<Utc>::from_timestamp_millis(ms as i64)
            .map_or_else(String::new, |t| t.format("%m-%d %H:%M").to_string())
    };
    format!(
        "<figure class=\"chart\"><figcaption>{title}</figcaption>\
         <svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\">\
         <line x1=\"{PAD_L}\" y1=\"{PAD_T}\" x2=\"{PAD_L}\" y2=\"{yb}\"/><line x1=\"{PAD_L}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\"/>\
         <text x=\"{tx}\" y=\"{ty_hi}\" text-anchor=\"end\">{hi}</text><text x=\"{tx}\" y=\"{yb}\" text-anchor=\"end\">{lo}</text>\
         <text x=\"{PAD_L}\" y=\"{H}\" dy=\"-4\">{t0}</text><text x=\"{xr}\" y=\"{H}\" dy=\"-4\" text-anchor=\"end\">{t1}</text>\
         <polyline{class} points=\"{line}\"/></svg></figure>",
        title = esc(title),
        yb = H - PAD_B,
        xr = W - PAD_R,
        tx = PAD_L - 4.0,
        ty_hi = PAD_T + 10.0,
        hi = short(hi),
        lo = short(lo),
        t0 = time(first.0),
        t1 = time(last.0),
        class = if prediction { " class=\"pred\"" } else { "" },
        line = line.trim_end(),
    )
}

/// A number short enough for an axis label.
fn short(v: f64) -> String {
    if v.abs() >= 10_000.0 || (v != 0.0 && v.abs() < 0.01) {
        format!("{v:.2e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_every_point_in_time_order_inside_the_frame() {
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        let pts = [
            (t0 + chrono::Duration::seconds(20), 3.0),
            (t0, 1.0),
            (t0 + chrono::Duration::seconds(10), 2.0),
        ];
        let svg = line_chart("m <x>", &pts, false);
        assert!(svg.contains("m &lt;x&gt;"), "{svg}");
        let poly = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let xy: Vec<(f64, f64)> = poly
            .split(' ')
            .map(|p| {
                let (a, b) = p.split_once(',').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect();
        assert_eq!(xy.len(), 3);
        assert!(
            xy.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 > w[1].1),
            "{xy:?}"
        );
        assert!(
            xy.iter()
                .all(|(x, y)| (PAD_L..=W).contains(x) && (0.0..=H).contains(y))
        );
    }

    #[test]
    fn a_flat_or_single_point_series_still_draws() {
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        assert!(line_chart("one", &[(t0, 5.0)], false).contains("<polyline"));
        assert!(line_chart("none", &[(t0, f64::NAN)], false).is_empty());
    }
}
