//! Scoped API keys and the audit log, against the real admin listener (so the audit log's
//! client address is the one the TCP connection had).
//!
//! - The role matrix: each role gets 403 naming the missing permission on what it may not do,
//!   and succeeds on what it may.
//! - Every state-changing call, refused ones included, leaves an audit row; the log pages by
//!   keyset; another organisation's log is invisible, and a key probing another organisation
//!   leaves its trace only in its own.
//! - Keys made before roles existed keep their power (the migration maps them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::collections::HashSet;

use kip_tests::control_plane::{ControlPlane, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

async fn call(
    cp: &ControlPlane,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = cp
        .http
        .request(method, format!("{}{path}", cp.admin_url))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn create_key(cp: &ControlPlane, by: &str, org: Uuid, name: &str, role: &str) -> String {
    let (s, v) = call(
        cp,
        by,
        Method::POST,
        &format!("/v1/organisations/{org}/api-keys"),
        Some(json!({ "name": name, "role": role })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["role"], role);
    v["key"].as_str().unwrap().to_owned()
}

const ROLES: [&str; 4] = ["org-admin", "operator", "llm", "read-only"];

/// One operation of the matrix: who may do it, and the permission named when refused.
struct Op {
    method: Method,
    path: String,
    body: Option<Value>,
    allowed: &'static [&'static str],
    permission: &'static str,
    /// Status of a successful call (`None`: anything but 403 and 5xx, for calls whose
    /// success depends on configuration this test does not set up, like LLM providers).
    ok: Option<StatusCode>,
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn each_role_may_do_exactly_what_it_is_for(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let admin = cp.admin_key.clone();
    let org = cp.create_org("acme").await;
    let mut keys = Vec::new();
    for role in ROLES {
        keys.push((
            role,
            create_key(&cp, &admin, org, &format!("k-{role}"), role).await,
        ));
    }
    let o = format!("/v1/organisations/{org}");
    for (role, key) in &keys {
        let tag = role.replace('-', "");
        let ops = [
            Op {
                method: Method::GET,
                path: "/v1/me".into(),
                body: None,
                allowed: &["org-admin", "operator", "llm", "read-only"],
                permission: "",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::GET,
                path: o.clone(),
                body: None,
                allowed: &["org-admin", "operator", "read-only"],
                permission: "org:read",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::PATCH,
                path: o.clone(),
                body: Some(json!({ "display_name": format!("Acme {tag}") })),
                allowed: &["org-admin"],
                permission: "org:write",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::DELETE,
                path: o.clone(),
                body: None,
                allowed: &[],
                permission: "orgs:manage",
                ok: None,
            },
            Op {
                method: Method::POST,
                path: "/v1/organisations".into(),
                body: Some(json!({ "name": format!("new-{tag}") })),
                allowed: &[],
                permission: "orgs:manage",
                ok: None,
            },
            Op {
                method: Method::GET,
                path: format!("{o}/api-keys"),
                body: None,
                allowed: &["org-admin"],
                permission: "keys:manage",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::POST,
                path: format!("{o}/api-keys"),
                body: Some(json!({ "name": format!("minted-by-{tag}") })),
                allowed: &["org-admin"],
                permission: "keys:manage",
                ok: Some(StatusCode::CREATED),
            },
            Op {
                method: Method::POST,
                path: format!("{o}/devices"),
                body: Some(json!({ "name": format!("dev-{tag}") })),
                allowed: &["org-admin", "operator"],
                permission: "devices:write",
                ok: Some(StatusCode::CREATED),
            },
            Op {
                method: Method::GET,
                path: format!("{o}/devices"),
                body: None,
                allowed: &["org-admin", "operator", "read-only"],
                permission: "devices:read",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::POST,
                path: format!("{o}/enroll-tokens"),
                body: Some(json!({ "ttl_s": 60 })),
                allowed: &["org-admin", "operator"],
                permission: "devices:write",
                ok: Some(StatusCode::CREATED),
            },
            Op {
                method: Method::POST,
                path: format!("{o}/models"),
                body: Some(json!({ "name": format!("m-{tag}"), "version": "1", "kind": "rul" })),
                allowed: &["org-admin", "operator"],
                permission: "models:write",
                ok: Some(StatusCode::CREATED),
            },
            Op {
                method: Method::GET,
                path: format!("{o}/models"),
                body: None,
                allowed: &["org-admin", "operator", "read-only"],
                permission: "models:read",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::GET,
                path: format!("{o}/audit"),
                body: None,
                allowed: &["org-admin"],
                permission: "audit:read",
                ok: Some(StatusCode::OK),
            },
            Op {
                method: Method::GET,
                path: "/v1/pki/ca".into(),
                body: None,
                allowed: &[],
                permission: "pki:admin",
                ok: None,
            },
            Op {
                method: Method::POST,
                path: "/v1/query".into(),
                body: Some(json!({ "model": "openai/gpt-4o-mini", "messages": [] })),
                allowed: &["org-admin", "llm"],
                permission: "llm:query",
                ok: None,
            },
        ];
        for op in ops {
            let (s, v) = call(&cp, key, op.method.clone(), &op.path, op.body.clone()).await;
            let what = format!("{role}: {} {} -> {s} {v}", op.method, op.path);
            if op.allowed.contains(role) {
                match op.ok {
                    Some(ok) => assert_eq!(s, ok, "{what}"),
                    None => assert!(s != StatusCode::FORBIDDEN && !s.is_server_error(), "{what}"),
                }
            } else {
                assert_eq!(s, StatusCode::FORBIDDEN, "{what}");
                assert_eq!(v["error"]["code"], "forbidden", "{what}");
                assert_eq!(v["error"]["permission"], op.permission, "{what}");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains(op.permission),
                    "{what}"
                );
            }
        }
    }
    // An org-admin cannot mint a key stronger than its own.
    let (s, v) = call(
        &cp,
        &keys[0].1,
        Method::POST,
        &format!("{o}/api-keys"),
        Some(json!({ "name": "up", "role": "platform-admin" })),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    // The platform key keeps its power, and /v1/me tells each key its role.
    let (s, v) = call(&cp, &admin, Method::GET, "/v1/me", None).await;
    assert_eq!(
        (s, v["role"].as_str()),
        (StatusCode::OK, Some("platform-admin"))
    );
    let (_, v) = call(&cp, &keys[2].1, Method::GET, "/v1/me", None).await;
    assert_eq!(v["role"], "llm");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn state_changes_are_audited_per_organisation_and_page_by_keyset(pool: PgPool) {
    let cp = start(pool.clone(), None).await;
    let admin = cp.admin_key.clone();
    let a = cp.create_org("org-a").await;
    let b = cp.create_org("org-b").await;
    let a_admin = create_key(&cp, &admin, a, "a-admin", "org-admin").await;
    let a_ops = create_key(&cp, &a_admin, a, "a-ops", "operator").await;
    let a_llm = create_key(&cp, &a_admin, a, "a-llm", "llm").await;
    let b_admin = create_key(&cp, &admin, b, "b-admin", "org-admin").await;

    let (s, dev) = call(
        &cp,
        &a_ops,
        Method::POST,
        &format!("/v1/organisations/{a}/devices"),
        Some(json!({ "name": "press-1" })),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    // Refused by role: audited as denied.
    let (s, _) = call(
        &cp,
        &a_llm,
        Method::POST,
        &format!("/v1/organisations/{a}/api-keys"),
        Some(json!({ "name": "sneaky" })),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Reads are not audited.
    call(
        &cp,
        &a_ops,
        Method::GET,
        &format!("/v1/organisations/{a}/devices"),
        None,
    )
    .await;
    // Organisation A's key probing organisation B: 404, and the trace stays in A's log.
    let (s, _) = call(
        &cp,
        &a_admin,
        Method::POST,
        &format!("/v1/organisations/{b}/devices"),
        Some(json!({ "name": "intruder" })),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Something in B, so B's log is not empty.
    let (s, _) = call(
        &cp,
        &b_admin,
        Method::PATCH,
        &format!("/v1/organisations/{b}"),
        Some(json!({ "display_name": "Bee" })),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    let log_a = all_pages(&cp, &a_admin, a, 2).await;
    let actions: Vec<(String, String, String)> = log_a
        .iter()
        .map(|e| {
            (
                e["key_name"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        // Newest first.
        ("a-admin", "device.register", "failed"),
        ("a-llm", "key.create", "denied"),
        ("a-ops", "device.register", "ok"),
        ("a-admin", "key.create", "ok"),
        ("a-admin", "key.create", "ok"),
        ("platform-admin", "key.create", "ok"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
        .collect();
    assert_eq!(actions, expected);
    let register = &log_a[2];
    assert_eq!(register["method"], "POST");
    assert_eq!(register["target"], format!("/v1/organisations/{a}/devices"));
    assert_eq!(register["role"], "operator");
    assert_eq!(register["status"], 201);
    assert_eq!(register["client_ip"], "127.0.0.1");
    assert!(dev["id"].is_string());
    let denied = &log_a[1];
    assert_eq!(
        (denied["status"].as_u64(), denied["role"].as_str()),
        (Some(403), Some("llm"))
    );

    // B sees only its own rows, and none of A's probe.
    let log_b = all_pages(&cp, &b_admin, b, 100).await;
    let names: HashSet<&str> = log_b
        .iter()
        .map(|e| e["key_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["platform-admin", "b-admin"]),
        "{log_b:?}"
    );
    assert!(log_b.iter().all(|e| e["org_id"] == b.to_string()));
    // Another organisation's log does not exist for this key.
    let (s, v) = call(
        &cp,
        &b_admin,
        Method::GET,
        &format!("/v1/organisations/{a}/audit"),
        None,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // A cursor that is not one answers 422 naming it.
    let (s, v) = call(
        &cp,
        &a_admin,
        Method::GET,
        &format!("/v1/organisations/{a}/audit?cursor=abc"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("cursor")
    );

    // kipctl shows the same log.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, &a_admin).unwrap();
    let (ok, out) = kipctl(&cp.admin_url, &key_file, &["audit", "list", "--limit", "3"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("a-ops (operator)") && out.contains("device.register"),
        "{out}"
    );
    assert!(out.contains("# more: --cursor"), "{out}");
    let (ok, out) = kipctl(
        &cp.admin_url,
        &key_file,
        &["key", "create", "reader", "--role", "read-only"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("role read-only"), "{out}");
}

/// Every row of `org`'s audit log, following `next_cursor` with pages of `limit`.
async fn all_pages(cp: &ControlPlane, key: &str, org: Uuid, limit: u32) -> Vec<Value> {
    let mut rows: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/organisations/{org}/audit?limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (s, v) = call(cp, key, Method::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        rows.extend(items.iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats: {ids:?}"
    );
    rows
}

/// Runs kipctl without blocking this test's runtime, which serves the control plane.
async fn kipctl(server: &str, key_file: &std::path::Path, args: &[&str]) -> (bool, String) {
    let o = kip_tests::kipctl::run(server, key_file, args).await;
    (o.ok, o.stdout + &o.stderr)
}

/// Keys created before roles existed keep the power they had: the migration makes platform
/// keys platform-admin and organisation keys org-admin.
#[sqlx::test(migrations = false)]
async fn keys_from_before_roles_keep_their_power(pool: PgPool) {
    let all = &kip_control_plane::db::MIGRATOR;
    let before = sqlx::migrate::Migrator::with_migrations(
        all.iter().filter(|m| m.version < 20).cloned().collect(),
    );
    before.run(&pool).await.unwrap();
    let org = Uuid::new_v4();
    sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, 'old', 'Old')")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();
    for (scope, org_id, prefix) in [
        ("platform", None, "000000000001"),
        ("org", Some(org), "000000000002"),
    ] {
        sqlx::query(
            "INSERT INTO api_keys (id, org_id, scope, name, prefix, key_sha256) \
             VALUES ($1, $2, $3, $3, $4, $5)",
        )
        .bind(Uuid::new_v4())
        .bind(org_id)
        .bind(scope)
        .bind(prefix)
        .bind(&[0u8; 32][..])
        .execute(&pool)
        .await
        .unwrap();
    }
    all.run(&pool).await.unwrap();
    let roles: Vec<(String, String)> =
        sqlx::query_as("SELECT scope, role FROM api_keys ORDER BY prefix")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        roles,
        [
            ("platform".to_owned(), "platform-admin".to_owned()),
            ("org".to_owned(), "org-admin".to_owned())
        ]
    );
    // An INSERT written before roles (naming none) still gets the old power.
    sqlx::query(
        "INSERT INTO api_keys (id, org_id, scope, name, prefix, key_sha256) \
         VALUES ($1, $2, 'org', 'late', '000000000003', $3)",
    )
    .bind(Uuid::new_v4())
    .bind(org)
    .bind(&[0u8; 32][..])
    .execute(&pool)
    .await
    .unwrap();
    let role: String = sqlx::query_scalar("SELECT role FROM api_keys WHERE name = 'late'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(role, "org-admin");
}
