//! The agent runtime, enrolled against a real control plane, syncs over mTLS and exports the
//! seconds left on its device certificate as `kip_agent_certificate_expiry_seconds`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::Duration;

use kip_agent::{config::Config, runtime};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_enrolled_agent_exports_its_certificate_expiry(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    cp.enroll(org, "gw-1", &state.join("identity")).await;
    let cfg_path = dir.path().join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[agent]\ndevice = \"gw-1\"\nstate_dir = {:?}\n\n[http]\nlisten_addr = \"127.0.0.1:0\"\n\n\
             [sync]\nendpoints = [{:?}]\ninterval_ms = 50\n",
            state.display().to_string(),
            cp.agent_url
        ),
    )
    .unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let cancel = CancellationToken::new();
    let agent = runtime::start(cfg, cancel.clone()).await.unwrap();
    let url = format!("http://{}/metrics", agent.http_addr);
    let metrics = cp
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("kip_agent_certificate_expiry_seconds "))
        .unwrap_or_else(|| panic!("gauge missing:\n{metrics}"));
    let left: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    // 24 h certificates, just issued (less the clock-skew allowance, never more).
    assert!((23 * 3600..=24 * 3600).contains(&left), "{line}");
    // The sync loop of the runtime reaches the agent listener with that identity.
    kip_tests::wait_until(Duration::from_secs(20), "the runtime's first sync", || {
        let (http, url) = (cp.http.clone(), url.clone());
        async move {
            let m = http.get(&url).send().await.unwrap().text().await.unwrap();
            m.contains("kip_agent_sync_online 1")
        }
    })
    .await;
    cancel.cancel();
    agent.wait().await;
}
