//! Polling until a positive signal: the way tests wait, instead of fixed sleeps.
//!
//! Both helpers sleep with `tokio::time`, so under a paused clock
//! (`#[tokio::test]`) they advance virtual time instead of waiting.
//! A check that asserts "nothing happened" should first wait for evidence that the thing had
//! its chance (a retry counter moved, a log line appeared), then assert.

use std::{fmt::Debug, future::Future, time::Duration};

/// How often the helpers poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Runs `check` every [`POLL_INTERVAL`] until it returns `Ok`, and returns that value. After
/// `timeout`, returns the last error (the check runs at least once).
pub async fn eventually<T, E, F, Fut>(timeout: Duration, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Runs `check` until it returns `true` (then `true`); `false` after `timeout`. For a caller
/// that reports more on failure than [`wait_until`] can (diagnostics of a soak run).
pub async fn within<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(timeout, || {
        let f = check();
        async move { if f.await { Ok(()) } else { Err(()) } }
    })
    .await
    .is_ok()
}

/// Runs `check` until it returns `true`; panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until<'a, F, Fut>(
    timeout: Duration,
    what: &'a str,
    check: F,
) -> impl Future<Output = ()> + 'a
where
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = bool> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        if !within(timeout, check).await {
            panic!("{caller}: timed out after {timeout:?} waiting for: {what}");
        }
    }
}

/// [`eventually`] for checks whose error is worth printing: panics with the last error.
#[track_caller]
pub fn eventually_ok<'a, T, E, F, Fut>(timeout: Duration, check: F) -> impl Future<Output = T> + 'a
where
    T: 'a,
    E: Debug + 'a,
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = Result<T, E>> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        match eventually(timeout, check).await {
            Ok(v) => v,
            Err(e) => panic!("{caller}: timed out after {timeout:?}; last error: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_success() {
        let mut n = 0;
        let got: Result<u32, String> = eventually(Duration::from_secs(5), || {
            n += 1;
            let n = n;
            async move {
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(format!("try {n}"))
                }
            }
        })
        .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn returns_the_last_error_on_timeout() {
        let mut n = 0u32;
        let start = tokio::time::Instant::now();
        let got: Result<(), String> = eventually(Duration::from_millis(200), || {
            n += 1;
            let n = n;
            async move { Err(format!("try {n}")) }
        })
        .await;
        let last = got.unwrap_err();
        assert_eq!(last, format!("try {n}"));
        assert!(n > 1 && start.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for: the impossible")]
    async fn wait_until_names_what_it_waited_for() {
        wait_until(Duration::from_millis(100), "the impossible", || async {
            false
        })
        .await;
    }
}
