//! The Grafana dashboards (`deploy/monitoring/grafana/dashboards/*.json`) and the alert rules
//! (`deploy/monitoring/prometheus/kip-alerts.yml`) name only metrics the control plane
//! really exports: every `kip_*` name in a query must appear in a real `/metrics` scrape of a
//! running control plane. (That the PromQL parses is checked with promtool by
//! `scripts/check-deploy.sh`.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

mod common;

use std::{collections::BTreeSet, path::Path, time::Duration};

use kip_control_plane::llm::config::LlmConfig;
use kip_tests::fake_llm::{self, FakeLlm, Reply};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Metric names a scrape exposes, with the sample suffixes of counters and histograms.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let mut parts = line.split_whitespace();
        if parts.next() != Some("#") || parts.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        names.insert(name.to_owned());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            _ => &[],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

/// `kip_*` identifiers in `text` (comments after `#` ignored).
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split(" #").next().unwrap_or("");
        if code.trim_start().starts_with('#') {
            continue;
        }
        let bytes = code.as_bytes();
        let mut i = 0;
        while let Some(pos) = code[i..].find("kip_") {
            let start = i + pos;
            // Part of a longer identifier (e.g. `a_kip_x`)?
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                i = start + 4;
                continue;
            }
            let end = code[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(code.len(), |e| start + e);
            out.insert(code[start..end].to_owned());
            i = end;
        }
    }
    out
}

fn queries(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dir = root.join("deploy/monitoring/grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "fleet, device, data path, PdM, LLM dashboards"
    );
    for f in files {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push((
                    format!("{} / {}", f.display(), p["title"]),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }
    let rules = root.join("deploy/monitoring/prometheus/kip-alerts.yml");
    out.push((
        rules.display().to_string(),
        std::fs::read_to_string(&rules).unwrap(),
    ));
    out
}

async fn post(
    cp: &kip_tests::control_plane::ControlPlane,
    key: &str,
    path: &str,
    body: Value,
) -> u16 {
    cp.http
        .post(format!("{}{path}", cp.admin_url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A control plane (PKI, per-device metrics, a priced LLM provider with a budget of two
/// calls) with real traffic: a device with a health report, LLM calls and a refusal, so
/// that every metric family has a series in the scrape (empty families are not exported).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn dashboards_and_alerts_name_only_exported_metrics(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    let toml = format!(
        "monthly_budget_usd = 5.0\nbudget_refresh_ms = 0\n[providers.p]\nkind = \"openai_compatible\"\n\
         base_url = \"{}\"\n[providers.p.prices]\nm = {{ input_per_1m_usd = 250000.0, output_per_1m_usd = 0.0 }}\n",
        fake.base_url()
    );
    let llm = LlmConfig::from_toml(&toml, |_| None).unwrap();
    let cp = kip_tests::control_plane::start_with(pool.clone(), None, |c| {
        c.llm = llm;
        c.health.per_device_metrics = true;
        c.health.metrics_refresh = Duration::from_millis(100);
    })
    .await;
    let org = cp.create_org("acme").await;
    let dev = cp
        .admin(
            &format!("/v1/organisations/{org}/devices"),
            json!({"name": "gw-1"}),
        )
        .await;
    let device: uuid::Uuid = dev["id"].as_str().unwrap().parse().unwrap();
    // The report as an agent's sync would store it (that path: tests/tests/e2e/fleet_health.rs).
    let report = kip_shared::health::HealthReport {
        buffer_bytes: 10,
        buffer_max_bytes: 100,
        oldest_unsynced_age_s: Some(1.0),
        disk_free_bytes: Some(1),
        disk_total_bytes: Some(2),
        cert_not_after: Some(chrono::Utc::now()),
        clock_offset_ms: Some(5),
        model_drift: Some(0.1),
        ..Default::default()
    };
    kip_control_plane::health::record(&pool, org, device, &report)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET last_seen_at = now() WHERE id = $1")
        .bind(device)
        .execute(&pool)
        .await
        .unwrap();
    let key = cp
        .admin(
            &format!("/v1/organisations/{org}/api-keys"),
            json!({"name": "k"}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let body = json!({"model": "p/m", "messages": [{"role": "user", "content": "hi"}]});
    // A stream (time to first token, tokens, cost), then calls until the budget refuses.
    fake.script([Reply::Stream {
        events: fake_llm::text_chunks("m", &["o", "k"]),
        gate: None,
    }]);
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    assert_eq!(post(&cp, &key, "/v1/chat/completions", stream).await, 200);
    // 3 USD of prompt a call against a 5 USD budget: refused once the spend is known.
    kip_tests::wait_until(Duration::from_secs(10), "the budget refuses", || async {
        post(&cp, &key, "/v1/chat/completions", body.clone()).await == 402
    })
    .await;
    // An enrolled device's sync that the control plane refuses (ingest batches and refusals).
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-2", &dir.path().join("identity")).await;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured((*id.client_config().unwrap()).clone())
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/v1/agent/sync", cp.agent_url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let scrape = kip_tests::eventually(Duration::from_secs(10), || async {
        let m = cp.metrics().await;
        if m.contains("kip_device_model_drift{") {
            Ok(m)
        } else {
            Err(m)
        }
    })
    .await
    .unwrap();
    // The budget gauge names the organisation (KipLlmBudgetNearlySpent's `org` label) and
    // says the budget is used up once the gateway refused for it.
    let used: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("kip_llm_budget_used_ratio{org=\"acme\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no budget gauge for acme in:\n{scrape}"));
    assert!(
        used >= 1.0,
        "acme was refused for its budget, yet used {used}"
    );
    let have = exported(&scrape);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut missing = Vec::new();
    let mut checked = 0;
    for (origin, text) in queries(&root) {
        for name in named(&text) {
            checked += 1;
            if !have.contains(&name) {
                missing.push(format!("{origin}: {name}"));
            }
        }
    }
    assert!(checked > 40, "only {checked} metric references found");
    assert!(
        missing.is_empty(),
        "metrics not in the control plane's /metrics:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_name_scanner_finds_metrics_and_skips_comments() {
    let n = named("rate(kip_a_total[5m]) / kip_b # kip_comment\n  # kip_c\nx_kip_d kip_e{x=\"1\"}");
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["kip_a_total", "kip_b", "kip_e"]
    );
}
