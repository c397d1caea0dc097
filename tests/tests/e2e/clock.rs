//! A device with a wrong clock: enrollment fails with an error that says so (not a TLS or
//! certificate error), before the one-time token is spent, and works once the clock is right.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::time::{Duration, SystemTime};

use kip_agent::identity::{self, Identity, IdentityError};
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn enrollment_with_a_clock_far_off_says_the_clock_is_wrong_and_keeps_the_token(pool: PgPool) {
    let cp = kip_tests::control_plane::start(pool, None).await;
    let org = cp.create_org("acme").await;
    let v = cp
        .admin(
            &format!("/v1/organisations/{org}/enroll-tokens"),
            json!({ "ttl_s": 600 }),
        )
        .await;
    let token = v["token"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(24 * 3600);
    for wrong in [SystemTime::now() - 3 * day, SystemTime::now() + 400 * day] {
        let err = identity::enroll_at(
            &cp.http,
            &cp.admin_url,
            token,
            "gw-1",
            None,
            dir.path(),
            wrong,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, IdentityError::ClockWrong { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("this device's clock is wrong"), "{msg}");
        assert!(
            Identity::load(dir.path()).unwrap().is_none(),
            "nothing stored"
        );
    }
    // Within the tolerance (the CA backdates certificates by 5 minutes) and with the clock
    // set right, the same token still works.
    let id = identity::enroll_at(
        &cp.http,
        &cp.admin_url,
        token,
        "gw-1",
        None,
        dir.path(),
        SystemTime::now() - Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        Identity::load(dir.path()).unwrap().unwrap().device_id(),
        id.device_id()
    );
}
