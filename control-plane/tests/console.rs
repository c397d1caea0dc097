//! The web console against a real control plane (real PostgreSQL, the real admin listener):
//! sign in with an API key, HttpOnly session cookie, fleet list with search, device page,
//! the key's scope applies, revocation and sign-out end the session; rollouts started, halted
//! and rolled back through the console change the desired model the API reports, are audited,
//! need `models:write` and the session's CSRF token; bad input is a 4xx page; another
//! organisation sees none of it. A real headless chromium (Debian's, scripts/lib.sh
//! `ensure_browser`, driven by `kip_tests::browser`) signs in through the real form, finds a
//! device, opens its chart, rolls a model out and back, without console errors, and saves
//! screenshots (target/console-*.png; docs/console.png and docs/console-device.png are copies).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use serde_json::json;
use sqlx::PgPool;

struct Browserless {
    http: reqwest::Client,
    base: String,
}

impl Browserless {
    fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_owned(),
        }
    }

    async fn login(&self, key: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/console/login", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("api_key={key}"))
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, cookie: &str, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn session_cookie(r: &reqwest::Response) -> (String, String) {
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let pair = set.split(';').next().unwrap().to_owned();
    (pair, set)
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn sign_in_find_a_device_and_the_key_scope_applies(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let other = cp.create_org("other").await;
    let mut devices = Vec::new();
    for name in ["press-1", "press-2", "oven-1"] {
        let d = cp
            .admin(
                &format!("/v1/organisations/{org}/devices"),
                json!({ "name": name }),
            )
            .await;
        devices.push(d["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    let report = kip_shared::health::HealthReport {
        agent_version: "kip-agent <script>".into(),
        buffer_records: 42,
        ..Default::default()
    };
    kip_control_plane::health::record(&pool, org, devices[0], &report)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET last_seen_at = now() WHERE id = $1")
        .bind(devices[0])
        .execute(&pool)
        .await
        .unwrap();
    let key = |org: uuid::Uuid, role: &'static str| {
        let cp = &cp;
        async move {
            let v = cp
                .admin(
                    &format!("/v1/organisations/{org}/api-keys"),
                    json!({ "name": format!("console-{role}"), "role": role }),
                )
                .await;
            (
                v["key"].as_str().unwrap().to_owned(),
                v["id"].as_str().unwrap().to_owned(),
            )
        }
    };
    let (acme_key, acme_key_id) = key(org, "read-only").await;
    let (other_key, _) = key(other, "org-admin").await;
    let (llm_key, _) = key(org, "llm").await;
    let b = Browserless::new(&cp.admin_url);

    let (status, page) = b.get("", "/console").await;
    assert_eq!(status, 200);
    assert!(page.contains("name=\"api_key\""), "{page}");
    assert_eq!(b.login("kip_nonsense").await.status().as_u16(), 401);
    assert_eq!(
        b.login(&llm_key).await.status().as_u16(),
        401,
        "a key whose role cannot read devices cannot sign in"
    );

    let r = b
        .http
        .post(format!("{}/console/login", b.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("sec-fetch-site", "cross-site")
        .body(format!("api_key={acme_key}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "a sign-in form posted from another site"
    );
    assert!(r.headers().get("set-cookie").is_none());

    let r = b.login(&acme_key).await;
    assert_eq!(r.status().as_u16(), 303);
    let (cookie, set_cookie) = session_cookie(&r);
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    assert!(
        !set_cookie.contains(&acme_key),
        "the key never goes to the browser"
    );

    let (status, fleet) = b.get(&cookie, "/console/fleet").await;
    assert_eq!(status, 200);
    assert!(
        fleet.contains("press-1") && fleet.contains("oven-1"),
        "{fleet}"
    );
    assert!(fleet.contains("<b class=\"ONLINE\">1</b>"), "{fleet}");
    let (_, found) = b.get(&cookie, "/console/fleet?q=PRESS").await;
    assert!(
        found.contains("press-2") && !found.contains("oven-1"),
        "{found}"
    );
    let (_, offline) = b.get(&cookie, "/console/fleet?state=OFFLINE").await;
    assert!(
        !offline.contains(">press-1<") && offline.contains("press-2"),
        "{offline}"
    );

    let (status, dev) = b
        .get(&cookie, &format!("/console/devices/{org}/{}", devices[0]))
        .await;
    assert_eq!(status, 200);
    assert!(dev.contains("press-1") && dev.contains("42"), "{dev}");
    assert!(
        dev.contains("kip-agent &lt;script&gt;") && !dev.contains("<script>"),
        "escaped: {dev}"
    );

    // Bad input is a 4xx page naming the problem, never a 500.
    for (path, status, says) in [
        (
            format!("/console/devices/{org}/not-a-uuid"),
            400,
            "device id",
        ),
        (
            format!("/console/devices/{org}/{}", uuid::Uuid::new_v4()),
            404,
            "No such device",
        ),
        (
            "/console/fleet?state=BOGUS".into(),
            400,
            "ONLINE, STALE, OFFLINE",
        ),
        (
            "/console/fleet?org=nope".into(),
            400,
            "Invalid query string",
        ),
    ] {
        let (s, body) = b.get(&cookie, &path).await;
        assert_eq!(s, status, "{path}: {body}");
        assert!(
            body.contains(says) && body.contains("<html"),
            "{path}: {body}"
        );
    }

    // Another organisation's session sees nothing of acme.
    let (other_cookie, _) = session_cookie(&b.login(&other_key).await);
    let (status, _) = b
        .get(
            &other_cookie,
            &format!("/console/devices/{org}/{}", devices[0]),
        )
        .await;
    assert_eq!(status, 404);
    let (status, page) = b
        .get(&other_cookie, &format!("/console/fleet?org={org}"))
        .await;
    assert_eq!(status, 404, "{page}");
    let (_, theirs) = b.get(&other_cookie, "/console/fleet").await;
    assert!(!theirs.contains("press-1"), "{theirs}");

    // Model rollout status: every device with its desired and running model.
    let (status, models) = b.get(&cookie, "/console/models").await;
    assert_eq!(status, 200, "{models}");
    assert!(
        models.contains("press-1") && models.contains("oven-1"),
        "{models}"
    );

    // The audit log needs audit.read: the org admin sees its organisation's entries only.
    let (status, _) = b.get(&cookie, "/console/audit").await;
    assert_eq!(status, 403, "a read-only key cannot read the audit log");
    let (status, log) = b.get(&other_cookie, "/console/audit").await;
    assert_eq!(status, 200, "{log}");
    assert!(
        log.contains("key.create") && !log.contains("device.register"),
        "{log}"
    );
    let (status, _) = b
        .get(&other_cookie, &format!("/console/audit?org={org}"))
        .await;
    assert_eq!(status, 404);

    // Revoking the key ends its sessions.
    let r = cp
        .http
        .delete(format!(
            "{}/v1/organisations/{org}/api-keys/{acme_key_id}",
            cp.admin_url
        ))
        .bearer_auth(&cp.admin_key)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = b
        .http
        .get(format!("{}/console/fleet", cp.admin_url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        303,
        "a revoked key's session is signed out"
    );

    // Sign-out clears the cookie and the session.
    let r = b
        .http
        .post(format!("{}/console/logout", cp.admin_url))
        .header("cookie", &other_cookie)
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let r = b
        .http
        .get(format!("{}/console/fleet", cp.admin_url))
        .header("cookie", &other_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
}

/// The session's CSRF token, read from a page's hidden field.
fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF field in {page}"))
        .to_owned()
}

impl Browserless {
    async fn post(&self, cookie: &str, path: &str, form: &str, site: &str) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", cookie)
            .header("sec-fetch-site", site)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

/// The desired model id of `device` as the API reports it.
async fn desired(
    cp: &kip_tests::control_plane::ControlPlane,
    org: uuid::Uuid,
    device: uuid::Uuid,
) -> Option<String> {
    let all = cp
        .api()
        .request(
            reqwest::Method::GET,
            &format!("/v1/organisations/{org}/model-status"),
            None,
        )
        .await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device.to_string())
        .and_then(|d| d["desired_model_id"].as_str().map(str::to_owned))
}

async fn audit_actions(pool: &PgPool, org: uuid::Uuid) -> Vec<(String, String, i16)> {
    sqlx::query_as(
        "SELECT action, outcome, status FROM audit_log WHERE org_id = $1 AND action LIKE 'model.roll%' ORDER BY id",
    )
    .bind(org)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_operator_rolls_a_model_out_and_back_in_the_browser_and_a_viewer_cannot(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let other = cp.create_org("globex").await;
    let mut devices = Vec::new();
    for (name, line) in [("press-1", "a"), ("press-2", "b"), ("oven-1", "a")] {
        let d = cp
            .admin(
                &format!("/v1/organisations/{org}/devices"),
                json!({ "name": name, "labels": { "line": line } }),
            )
            .await;
        devices.push(d["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap());
    }
    let press = devices[0];
    let enrolled = tempfile::tempdir().unwrap();
    cp.enroll(org, "gateway-7", enrolled.path()).await;
    let api = cp.api();
    let v1 = api.register_model(org, "1.0", b"model one").await;
    api.upload_artifact(org, &v1, b"model one").await;
    let v2 = api.register_model(org, "2.0", b"model two").await;
    api.upload_artifact(org, &v2, b"model two").await;
    let theirs = api.register_model(other, "9.9", b"their model").await;
    api.upload_artifact(other, &theirs, b"their model").await;
    let their_device = cp
        .admin(
            &format!("/v1/organisations/{other}/devices"),
            json!({ "name": "globex-secret-press" }),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Health, readings and predictions of press-1 for its page.
    let report = kip_shared::health::HealthReport {
        agent_version: "kip-agent 0.1.0".into(),
        buffer_bytes: 5 << 20,
        buffer_max_bytes: 100 << 20,
        buffer_records: 1234,
        oldest_unsynced_age_s: Some(42.0),
        cert_not_after: Some(
            chrono::Utc::now() + chrono::Duration::days(12) + chrono::Duration::hours(2),
        ),
        running_model: Some("rul-fd001@1.0".into()),
        model_drift: Some(0.125),
        disk_free_bytes: Some(30 << 30),
        disk_total_bytes: Some(64 << 30),
        sources: vec![
            kip_shared::health::SourceHealth {
                name: "press-plc".into(),
                kind: "opcua".into(),
                connected: true,
                last_value_age_s: Some(1.0),
                reconnects: 2,
            },
            kip_shared::health::SourceHealth {
                name: "energy-meter".into(),
                kind: "mqtt".into(),
                connected: false,
                last_value_age_s: Some(900.0),
                reconnects: 17,
            },
        ],
        ..Default::default()
    };
    // press-1 and oven-1 report now, press-2 went quiet four minutes ago (stale).
    for (device, age_s) in [(press, 0), (devices[2], 5), (devices[1], 240)] {
        kip_control_plane::health::record(&pool, org, device, &report)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE devices SET last_seen_at = now() - $2 * interval '1 second' WHERE id = $1",
        )
        .bind(device)
        .bind(f64::from(age_s))
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
         SELECT $1, $2, 1, g, 'm1', CASE WHEN g % 2 = 0 THEN 'spindle_temp' ELSE 'vibration' END, \
                now() - (200 - g) * interval '1 minute', 50 + 10 * sin(g / 10.0) \
         FROM generate_series(1, 200) g",
    )
    .bind(org)
    .bind(press)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO predictions (org_id, device_id, epoch, seq, machine, model_version, ts, rul_cycles, anomaly_score) \
         SELECT $1, $2, 1, g, 'm1', 'rul-fd001@1.0', now() - (50 - g) * interval '4 minutes', 180 - g * 2, 0.1 \
         FROM generate_series(1, 50) g",
    )
    .bind(org)
    .bind(press)
    .execute(&pool)
    .await
    .unwrap();
    // LLM calls and spend of both organisations.
    for (o, provider, usd) in [(org, "deepseek", 1.25), (other, "globex-provider", 7.5)] {
        sqlx::query(
            "INSERT INTO inference_logs (org_id, request_id, provider, model, tokens_in, tokens_out, cost_usd, latency_ms, status) \
             VALUES ($1, gen_random_uuid(), $2, 'chat', 100, 50, $3, 250, 'ok')",
        )
        .bind(o)
        .bind(provider)
        .bind(usd)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO llm_spend (org_id, month, usd) VALUES ($1, date_trunc('month', now() AT TIME ZONE 'UTC')::date, $2)")
            .bind(o)
            .bind(usd)
            .execute(&pool)
            .await
            .unwrap();
    }

    let key = |org: uuid::Uuid, role: &'static str| {
        let cp = &cp;
        async move {
            cp.admin(
                &format!("/v1/organisations/{org}/api-keys"),
                json!({ "name": format!("console-{role}"), "role": role }),
            )
            .await["key"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let operator = key(org, "operator").await;
    let viewer = key(org, "read-only").await;
    let globex = key(other, "org-admin").await;

    // --- In the browser: sign in, find the device, open its chart, roll out, roll back. ---
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let mut br = kip_tests::browser::Browser::launch().await;
    br.goto(&format!("{}/console", cp.admin_url)).await;
    br.run(&format!(
        "document.querySelector('input[name=api_key]').value = '{operator}'; \
         document.querySelector('form[action=\"/console/login\"]').submit()"
    ))
    .await;
    assert!(
        br.url().await.ends_with("/console/fleet"),
        "{}",
        br.url().await
    );
    let fleet = br.html().await;
    assert!(
        fleet.contains("press-2") && fleet.contains("Sign out"),
        "{fleet}"
    );
    assert!(!fleet.contains("globex-secret-press"), "{fleet}");
    br.screenshot(&shots.join("console-fleet.png")).await;
    // Search by label.
    br.run("const f = document.querySelector('form[action=\"/console/fleet\"]'); f.q.value = 'line=a'; f.submit()")
        .await;
    let found = br.html().await;
    assert!(
        found.contains("press-1") && found.contains("oven-1") && !found.contains("press-2"),
        "{found}"
    );
    br.run(&format!(
        "document.querySelector('a[href$=\"{press}\"]').click()"
    ))
    .await;
    let page = br.html().await;
    assert!(br.url().await.ends_with(&press.to_string()));
    for want in [
        "press-plc",
        "energy-meter",
        "spindle_temp",
        "vibration",
        "RUL",
        "<polyline",
        "1234 records",
        "42 s",
        "12 days",
        "rul-fd001@1.0",
        "0.125",
    ] {
        assert!(page.contains(want), "device page lacks {want}: {page}");
    }
    let lines = br
        .eval("document.querySelectorAll('svg polyline').length")
        .await;
    assert_eq!(
        lines,
        json!(3),
        "one chart per series and one of predictions"
    );
    assert!(
        page.len() < 64 * 1024,
        "the device page with its charts stays small: {} bytes",
        page.len()
    );
    br.screenshot(&shots.join("console-device.png")).await;

    br.goto(&format!("{}/console/models", cp.admin_url)).await;
    br.run(&format!(
        "const f = document.querySelector('tr[data-device=\"press-1\"] form[action$=\"/rollout\"]'); \
         f.model.value = '{v2}'; f.submit()"
    ))
    .await;
    assert!(
        br.html().await.contains("Rollout started"),
        "{}",
        br.html().await
    );
    assert_eq!(desired(&cp, org, press).await.as_deref(), Some(v2.as_str()));
    br.run("document.querySelector('tr[data-device=\"press-1\"] form[action$=\"/rollback\"]').submit()")
        .await;
    let models = br.html().await;
    assert!(models.contains("Rolled back"), "{models}");
    assert_eq!(
        desired(&cp, org, press).await.as_deref(),
        Some(v1.as_str()),
        "rolled back to the previous version"
    );
    br.screenshot(&shots.join("console-models.png")).await;
    let errors = br.take_console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert_eq!(
        audit_actions(&pool, org).await,
        vec![
            ("model.rollout".to_owned(), "ok".to_owned(), 303),
            ("model.rollback".to_owned(), "ok".to_owned(), 303)
        ]
    );

    // A viewer sees the page, but its actions are refused and change nothing.
    br.run("document.querySelector('form[action=\"/console/logout\"]').submit()")
        .await;
    br.run(&format!(
        "document.querySelector('input[name=api_key]').value = '{viewer}'; \
         document.querySelector('form[action=\"/console/login\"]').submit()"
    ))
    .await;
    br.goto(&format!("{}/console/models", cp.admin_url)).await;
    let page = br.html().await;
    assert!(
        page.contains("can view rollouts but not change them") && page.contains("models:write"),
        "{page}"
    );
    br.run("document.querySelector('tr[data-device=\"press-1\"] form[action$=\"/rollback\"]').submit()")
        .await;
    let refused = br.html().await;
    assert!(
        refused.contains("403") && refused.contains("lacks the permission models:write"),
        "{refused}"
    );
    assert_eq!(desired(&cp, org, press).await.as_deref(), Some(v1.as_str()));
    assert_eq!(
        audit_actions(&pool, org).await.last().unwrap(),
        &("model.rollback".to_owned(), "denied".to_owned(), 403)
    );
    let errors = br.take_console_errors().await;
    assert!(
        errors.iter().all(|e| e.contains("403")),
        "only the refused action's 403: {errors:?}"
    );
    drop(br);

    // --- Without a browser: CSRF, bad input, groups, the other pages, tenant isolation. ---
    let b = Browserless::new(&cp.admin_url);
    let (cookie, _) = session_cookie(&b.login(&operator).await);
    let (_, models) = b.get(&cookie, "/console/models").await;
    let csrf = csrf_of(&models);
    let form = |extra: &str| format!("csrf={csrf}&org={org}&{extra}");
    let (s, body) = b
        .post(
            &cookie,
            "/console/models/rollback",
            &format!("org={org}&device={press}"),
            "same-origin",
        )
        .await;
    assert_eq!(s, 403, "no CSRF token: {body}");
    assert!(body.contains("security token"), "{body}");
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/rollback",
            // One character changed (to another one: a token starting with `0` made this the
            // right token once in 16 runs, and the rollback went through).
            &format!(
                "csrf={}{}&org={org}&device={press}",
                if csrf.starts_with('0') { '1' } else { '0' },
                &csrf[1..]
            ),
            "same-origin",
        )
        .await;
    assert_eq!(s, 403, "a wrong token");
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/rollback",
            &form(&format!("device={press}")),
            "cross-site",
        )
        .await;
    assert_eq!(s, 403, "a form sent from another site");
    assert_eq!(
        desired(&cp, org, press).await.as_deref(),
        Some(v1.as_str()),
        "none of them changed anything"
    );
    for (extra, status, says) in [
        ("device=nope".to_owned(), 422, "device: is not an id"),
        (format!("device={press}"), 422, "model: is required"),
        (
            format!("device={}&model={v2}", uuid::Uuid::new_v4()),
            404,
            "device not found",
        ),
        (
            format!("device={press}&model={theirs}"),
            422,
            "no such model",
        ),
        (
            format!("device={their_device}&model={v2}"),
            404,
            "device not found",
        ),
        (format!("group=nonsense&model={v2}"), 422, "key=value"),
    ] {
        let (s, body) = b
            .post(
                &cookie,
                "/console/models/rollout",
                &form(&extra),
                "same-origin",
            )
            .await;
        assert_eq!(s, status, "{extra}: {body}");
        assert!(body.contains(says), "{extra}: {body}");
    }
    let (s, body) = b
        .post(
            &cookie,
            "/console/models/rollback",
            &form(&format!("device={}", devices[1])),
            "same-origin",
        )
        .await;
    assert_eq!(s, 409, "nothing rolled out to press-2: {body}");
    let (s, body) = b
        .post(
            &cookie,
            "/console/models/rollback",
            &form(&format!("device={press}")),
            "same-origin",
        )
        .await;
    assert_eq!(s, 409, "1.0 is the first version: {body}");
    assert!(body.contains("no earlier version"), "{body}");
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/rollout",
            &format!("csrf={csrf}&org={other}&device={their_device}&model={theirs}"),
            "same-origin",
        )
        .await;
    assert_eq!(s, 404, "another organisation's rollout");
    // A group rollout reaches the devices of line b, then is halted.
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/rollout",
            &form(&format!("group=line%3Db&model={v2}")),
            "same-origin",
        )
        .await;
    assert_eq!(s, 303);
    assert_eq!(
        desired(&cp, org, devices[1]).await.as_deref(),
        Some(v2.as_str())
    );
    assert_eq!(
        desired(&cp, org, press).await.as_deref(),
        Some(v1.as_str()),
        "line a untouched"
    );
    let (_, models) = b.get(&cookie, "/console/models").await;
    assert!(models.contains("line=b"), "{models}");
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/halt",
            &form("group=line%3Db"),
            "same-origin",
        )
        .await;
    assert_eq!(s, 303);
    assert_eq!(desired(&cp, org, devices[1]).await, None);
    let (s, _) = b
        .post(
            &cookie,
            "/console/models/halt",
            &form(&format!("device={press}")),
            "same-origin",
        )
        .await;
    assert_eq!(s, 303);
    assert_eq!(desired(&cp, org, press).await, None, "halted");

    // Certificates: the enrolled device's certificate; the CA only for a platform key.
    let (s, certs) = b.get(&cookie, "/console/certificates").await;
    assert_eq!(s, 200, "{certs}");
    assert!(
        certs.contains("gateway-7") && certs.contains("pki:admin"),
        "{certs}"
    );
    let (admin_cookie, _) = session_cookie(&b.login(&cp.admin_key).await);
    let (_, ca) = b
        .get(&admin_cookie, &format!("/console/certificates?org={org}"))
        .await;
    assert!(
        ca.contains("Signing intermediate") && ca.contains("gateway-7"),
        "{ca}"
    );
    // LLM usage and spend.
    let (s, llm) = b.get(&cookie, "/console/llm").await;
    assert_eq!(s, 200, "{llm}");
    assert!(
        llm.contains("deepseek") && llm.contains("1.2500") && !llm.contains("globex"),
        "{llm}"
    );
    let (_, all) = b.get(&admin_cookie, "/console/llm").await;
    assert!(
        all.contains("acme") && all.contains("globex"),
        "a platform key sees every organisation: {all}"
    );

    // Another organisation's admin sees none of acme's devices, models, spend, certificates.
    let (gcookie, _) = session_cookie(&b.login(&globex).await);
    for path in [
        "/console/fleet",
        "/console/models",
        "/console/llm",
        "/console/certificates",
        "/console/audit",
    ] {
        let (s, page) = b.get(&gcookie, path).await;
        assert_eq!(s, 200, "{path}: {page}");
        for secret in [
            "press-1",
            "gateway-7",
            "rul-fd001@1.0",
            "deepseek",
            "1.2500",
            "acme",
        ] {
            assert!(
                !page.contains(secret),
                "{path} shows acme's {secret}: {page}"
            );
        }
    }
    for path in [
        format!("/console/models?org={org}"),
        format!("/console/llm?org={org}"),
        format!("/console/certificates?org={org}"),
        format!("/console/devices/{org}/{press}"),
    ] {
        assert_eq!(b.get(&gcookie, &path).await.0, 404, "{path}");
    }

    // The audit log pages by keyset: newest first, an "older" link to the rest.
    sqlx::query(
        "INSERT INTO audit_log (org_id, key_id, key_name, role, action, method, target, status, outcome) \
         SELECT $1, gen_random_uuid(), 'filler-' || g, 'operator', 'device.register', 'POST', '/v1/x', 201, 'ok' \
         FROM generate_series(1, 150) g",
    )
    .bind(org)
    .execute(&pool)
    .await
    .unwrap();
    let (acookie, _) = session_cookie(&b.login(&key(org, "org-admin").await).await);
    let (_, first) = b.get(&acookie, "/console/audit").await;
    assert!(
        first.contains("filler-150") && !first.contains("filler-50<"),
        "{first}"
    );
    let older = first
        .split("id=\"older\" href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let (_, second) = b.get(&acookie, &older).await;
    assert!(
        second.contains("filler-50<") && !second.contains("filler-150<"),
        "{second}"
    );
    assert!(
        second.contains("model.rollout"),
        "console actions are in the log: {second}"
    );
    let (s, _) = b.get(&acookie, "/console/audit?before=abc").await;
    assert_eq!(s, 400);
}
