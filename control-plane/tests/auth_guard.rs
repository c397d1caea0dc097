//! Unauthenticated load stays away from PostgreSQL (issue #13, hole 5): unknown API keys are
//! remembered (negative cache), an address with too many failed authentications is refused
//! before the database, and every connection has a `statement_timeout`. Runs the real admin
//! listener on loopback, so the per-IP limit sees a real peer address.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::time::Duration;

use kip_control_plane::{ControlPlane, config::Config, db};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A syntactically valid API key that does not exist (so it costs a database lookup).
fn garbage_key(i: u32) -> String {
    format!("kip_{:012x}_{}", i, "A".repeat(43))
}

async fn get(client: &reqwest::Client, url: &str, key: &str) -> u16 {
    client
        .get(format!("{url}/v1/organisations"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn unknown_keys_are_refused_before_the_database_once_seen_or_once_an_address_fails_too_often(
    pool: PgPool,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::load(None, |_| None).unwrap();
    cfg.admin_key_file = dir.path().join("admin.key");
    cfg.shutdown_grace = Duration::from_secs(1);
    cfg.auth_guard.failures_per_ip_per_minute = 5;
    let token = CancellationToken::new();
    let cp = ControlPlane::builder(cfg)
        .pool(pool.clone())
        .admin_listener(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        .without_agent_listener()
        .cancellation_token(token.clone())
        .start()
        .await
        .unwrap();
    let url = format!("http://{}", cp.admin_addr().unwrap());
    let admin = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    // A legitimate key authenticates (and is cached) first.
    assert_eq!(get(&client, &url, admin.trim()).await, 200);
    // Five failures from this address are answered by PostgreSQL...
    for i in 0..5 {
        assert_eq!(get(&client, &url, &garbage_key(i)).await, 401);
    }
    // ...then the address is refused with 429, for any key not already authenticated.
    let r = client
        .get(format!("{url}/v1/organisations"))
        .bearer_auth(garbage_key(100))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    // Neither answer needs the database any more: with the pool closed, a key seen before is
    // still 401 (negative cache) and a new one still 429 (per-IP limit); the cached
    // legitimate key still authenticates (its handler then fails on the closed pool).
    pool.close().await;
    assert_eq!(get(&client, &url, &garbage_key(0)).await, 401);
    assert_eq!(get(&client, &url, &garbage_key(101)).await, 429);
    assert_ne!(get(&client, &url, admin.trim()).await, 401);
    token.cancel();
    cp.wait().await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn every_connection_has_a_statement_timeout(pool: PgPool) {
    let name = pool.connect_options().get_database().unwrap().to_owned();
    let base = std::env::var("DATABASE_URL").unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let mut cfg = Config::load(None, |k| (k == "KIP_DATABASE_URL").then(|| url.clone())).unwrap();
    cfg.database_statement_timeout = Duration::from_millis(250);
    let main = db::connect(&cfg).await.unwrap();
    let agent = db::agent_pool(&cfg, &main).unwrap();
    for p in [&main, &agent] {
        let t: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(p)
            .await
            .unwrap();
        assert_eq!(t, "250ms");
        let err = sqlx::query("SELECT pg_sleep(2)")
            .execute(p)
            .await
            .unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code()).unwrap();
        assert_eq!(code, "57014", "query_canceled: {err}");
    }
    main.close().await;
    agent.close().await;
}
