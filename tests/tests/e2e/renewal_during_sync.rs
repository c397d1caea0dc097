//! Certificate renewal while the sync loop runs: the renewed certificate is swapped in through
//! the identity's watch channel and not one sync request fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{collections::BTreeSet, time::Duration};

use kip_agent::{identity, sync::Syncer};
use kip_tests::{
    agent::{open_buffer, reading, sync_config},
    control_plane::stored,
    eventually,
};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn renewal_keeps_a_running_sync_loop_going_with_zero_failed_requests(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let dir = tempfile::tempdir().unwrap();
    let id = cp.enroll(org, "gw-1", dir.path()).await;
    let device = id.device_id();

    let buffer = open_buffer(&dir.path().join("buffer"));
    let mut registry = kip_agent::metrics::new_registry();
    let (tls_tx, tls_rx) = tokio::sync::watch::channel(id.client_config().unwrap());
    let mut cfg = sync_config(vec![cp.agent_url.clone()]);
    cfg.interval = Duration::from_millis(20);
    let syncer = Syncer::new(buffer.clone(), cfg, tls_rx, &mut registry).unwrap();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(syncer.run(cancel.clone()));

    let mut appended = BTreeSet::new();
    let mut i = 0u64;
    let mut feed = |n: u64, appended: &mut BTreeSet<(u64, u64)>| {
        for _ in 0..n {
            let seq = buffer.append(&reading(i)).unwrap();
            appended.insert((buffer.epoch(), seq));
            i += 1;
        }
    };
    let wait_for = |want: usize| {
        let pool = pool.clone();
        async move {
            let synced = eventually(Duration::from_secs(30), || async {
                let got = stored(&pool, device).await.len();
                if got >= want {
                    Ok(())
                } else {
                    Err(format!("{got} of {want} synced"))
                }
            })
            .await;
            assert_eq!(synced, Ok(()));
        }
    };

    // Before the renewal.
    for _ in 0..10 {
        feed(20, &mut appended);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(200).await;

    // Renew with the current certificate and publish the new one, while readings keep coming.
    let renewed = identity::renew_once(&id, &cp.agent_url, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(renewed.cert().serial_hex, id.cert().serial_hex);
    feed(50, &mut appended);
    tls_tx.send(renewed.client_config().unwrap()).unwrap();
    for _ in 0..10 {
        feed(20, &mut appended);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(appended.len()).await;

    // Proof that the loop now presents the renewed certificate: retire the old one (the
    // listener checks the database on every request) and keep syncing without a failure.
    let retired = sqlx::query("UPDATE certificates SET revoked_at = now() WHERE serial = $1")
        .bind(id.cert().serial_hex.to_lowercase())
        .execute(&pool)
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(retired, 1, "the enrollment certificate is on record");
    for _ in 0..5 {
        feed(20, &mut appended);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for(appended.len()).await;

    // Every reading landed exactly once, and no request failed.
    assert_eq!(stored(&pool, device).await, appended);
    let m = kip_agent::metrics::render(&registry);
    assert!(
        !m.contains("kip_agent_sync_failures_total{"),
        "a sync request failed:\n{m}"
    );
    let certs: i64 = sqlx::query_scalar("SELECT count(*) FROM certificates WHERE device_id = $1")
        .bind(device)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(certs, 2, "enrollment and renewal certificates");

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
