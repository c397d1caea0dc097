//! The web console against a real control plane (real PostgreSQL, the real admin listener):
//! sign in with an API key, HttpOnly session cookie, fleet list with search, device page,
//! the key's scope applies, revocation and sign-out end the session. With Debian's chromium
//! installed (scripts/lib.sh `ensure_browser`), a headless browser signs in through the real
//! form, loads the fleet page without console errors and saves a screenshot.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::time::Duration;

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

    let r = b.login(&acme_key).await;
    assert_eq!(r.status().as_u16(), 303);
    let (cookie, set_cookie) = session_cookie(&r);
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"),
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

    browser_signs_in(&cp.admin_url, &cp.admin_key).await;
}

/// Headless chromium: a page that posts the real sign-in form, then the fleet page; no
/// console errors; a screenshot in target/console-fleet.png.
async fn browser_signs_in(base: &str, key: &str) {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            std::process::Command::new("which")
                .arg(c)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| panic!("chromium is required (scripts/lib.sh ensure_browser)"));
    let dir = tempfile::tempdir().unwrap();
    let submit = dir.path().join("submit.html");
    std::fs::write(
        &submit,
        format!(
            "<!doctype html><form id=f method=post action=\"{base}/console/login\">\
             <input name=api_key value=\"{key}\"></form><script>document.getElementById('f').submit()</script>"
        ),
    )
    .unwrap();
    let shot = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-fleet.png");
    let _ = std::fs::remove_file(&shot);
    let run = |extra: String, profile: &str| {
        let mut cmd = tokio::process::Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,720",
            "--virtual-time-budget=5000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join(profile).display()
        ))
        .arg(extra)
        .arg(format!("file://{}", submit.display()))
        .kill_on_drop(true);
        async move {
            tokio::time::timeout(Duration::from_secs(90), cmd.output())
                .await
                .expect("chromium timed out")
                .unwrap()
        }
    };
    // The DOM after the form posted and the redirect landed: the fleet page, signed in.
    let dom = run("--dump-dom".into(), "dom").await;
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("press-1") && html.contains("Sign out"),
        "the browser did not reach the fleet page: {html}"
    );
    let out = run(format!("--screenshot={}", shot.display()), "shot").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let meta = std::fs::metadata(&shot).unwrap_or_else(|e| panic!("no screenshot ({e}): {stderr}"));
    assert!(meta.len() > 10_000, "screenshot too small: {stderr}");
    let console_errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Error") || l.contains("ERROR")))
        .collect();
    assert!(console_errors.is_empty(), "{console_errors:?}");
}
