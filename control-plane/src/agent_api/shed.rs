//! Load shedding on the agent listener (issue #17, "Thousands of gateways"): when a replica
//! is saturated, agent syncs and heartbeats (`POST /v1/agent/sync`) are refused at once and
//! cheaply, with `503`, a jittered `Retry-After` and the reason, instead of queueing until the
//! agent pool's acquire timeout (`database.connect_timeout_ms`) fails them after seconds of
//! work (measured before: docs/performance.md, "Fleet load").
//!
//! Invariants:
//! - At most `max_in_flight_requests` syncs run at once on this replica ([`Admission`]); at
//!   most `max_queued_requests` more wait for a place, each for at most `max_queue_wait_ms`.
//!   A request beyond either bound is answered before its certificate is checked against the
//!   database, before its body is read and before it takes a pool connection: `503`, code
//!   `overloaded`, `reason` `queue_full` or `queue_wait`, `Retry-After` drawn uniformly from
//!   `retry_after_min_s..=retry_after_max_s` (so a refused fleet does not come back in
//!   lockstep), counted in `kip_agent_requests_shed_total{reason}`.
//! - The queue wait is the pool wait: an admitted sync runs its statements one after the
//!   other, so it holds at most one agent-pool connection at a time, and with
//!   `max_in_flight_requests` near `database.agent_max_connections` the pool's own queue stays
//!   short. `max_queue_wait_ms` is checked at load to be below `database.connect_timeout_ms`,
//!   so a saturated replica sheds here before the pool times out.
//! - Nothing is lost by shedding: the batch was not read, the agent keeps it buffered and
//!   resends it (unchanged, idempotent) after `Retry-After`.
//! - The admin and LLM APIs never wait here: they are served on another listener with the
//!   main pool (`database.max_connections`) and their own limits (`llm.max_in_flight_requests`).
//!   Renewal, whoami and artifact downloads on the agent listener are not shed either (rare,
//!   and a refused renewal could strand a device).
//! - `max_in_flight_requests = 0` turns shedding off (every request admitted, as before).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::{RawShedding, SheddingConfig};
use crate::http::ApiError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `queue_full` or `queue_wait`.
    pub reason: &'static str,
}

/// `kip_agent_requests_*`.
#[derive(Debug, Clone, Default)]
pub struct SheddingMetrics {
    pub shed: Family<ShedLabels, Counter>,
    pub in_flight: Gauge,
    pub queued: Gauge,
}

impl SheddingMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "agent_requests_shed",
            "Agent syncs and heartbeats refused with 503 and Retry-After because the replica \
             was saturated, by reason (queue_full, queue_wait)",
            m.shed.clone(),
        );
        registry.register(
            "agent_requests_in_flight",
            "Agent syncs and heartbeats being served (agent_load_shedding.max_in_flight_requests)",
            m.in_flight.clone(),
        );
        registry.register(
            "agent_requests_queued",
            "Agent syncs and heartbeats waiting for a place (agent_load_shedding.max_queued_requests)",
            m.queued.clone(),
        );
        m
    }
}

/// Admission of agent syncs; one per process, shared by the agent listener's connections.
#[derive(Debug)]
pub struct Admission {
    cfg: SheddingConfig,
    places: Arc<Semaphore>,
    queued: AtomicUsize,
    metrics: SheddingMetrics,
}

/// A place among the requests in flight; freed on drop (also when the request is cancelled).
#[derive(Debug)]
pub struct Admitted {
    place: Option<OwnedSemaphorePermit>,
    in_flight: Gauge,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.place.is_some() {
            self.in_flight.dec();
        }
    }
}

/// Counts a request in the queue while it waits.
struct Queued<'a>(&'a Admission);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.queued.dec();
    }
}

impl Admission {
    pub fn new(cfg: SheddingConfig, metrics: SheddingMetrics) -> Self {
        Self {
            places: Arc::new(Semaphore::new(cfg.max_in_flight_requests.unwrap_or(0))),
            cfg,
            queued: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> SheddingConfig {
        self.cfg
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// A place, at once or after a wait of at most `max_queue_wait`; otherwise the refusal
    /// (already counted).
    pub async fn admit(&self) -> Result<Admitted, ApiError> {
        if self.cfg.max_in_flight_requests.is_none() {
            return Ok(Admitted {
                place: None,
                in_flight: self.metrics.in_flight.clone(),
            });
        }
        let place = match self.places.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.queued.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_queued_requests {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    return Err(self.shed("queue_full"));
                }
                self.metrics.queued.inc();
                let _queued = Queued(self);
                match tokio::time::timeout(
                    self.cfg.max_queue_wait,
                    self.places.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed; a closed one admits nobody.
                    Ok(Err(_)) => return Err(self.shed("queue_full")),
                    Err(_) => return Err(self.shed("queue_wait")),
                }
            }
        };
        self.metrics.in_flight.inc();
        Ok(Admitted {
            place: Some(place),
            in_flight: self.metrics.in_flight.clone(),
        })
    }

    fn shed(&self, reason: &'static str) -> ApiError {
        self.metrics
            .shed
            .get_or_create(&ShedLabels { reason })
            .inc();
        let retry_after_s = retry_after(
            self.cfg.retry_after_min_s,
            self.cfg.retry_after_max_s,
            rand::random::<f64>(),
        );
        ApiError::Shed {
            reason,
            retry_after_s,
        }
    }
}

/// `min..=max` seconds placed by the random `unit` in `[0, 1)`.
fn retry_after(min: u64, max: u64, unit: f64) -> u64 {
    let span = max.saturating_sub(min);
    // Truncation spreads `unit` over span + 1 whole seconds.
    let add = ((span as f64 + 1.0) * unit.clamp(0.0, 1.0)) as u64;
    min + add.min(span)
}

/// Middleware of the sync route: admits the request or answers the refusal (see the module
/// docs). The place is held until the response is produced.
pub async fn admit(State(admission): State<Arc<Admission>>, req: Request, next: Next) -> Response {
    match admission.admit().await {
        Ok(_place) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(in_flight: usize, queued: usize, wait_ms: u64) -> Admission {
        Admission::new(
            SheddingConfig {
                max_in_flight_requests: Some(in_flight),
                max_queued_requests: queued,
                max_queue_wait: Duration::from_millis(wait_ms),
                retry_after_min_s: 5,
                retry_after_max_s: 30,
            },
            SheddingMetrics::default(),
        )
    }

    fn reason(e: ApiError) -> (&'static str, u64) {
        match e {
            ApiError::Shed {
                reason,
                retry_after_s,
            } => (reason, retry_after_s),
            other => panic!("not a shed refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_places_and_the_queue_are_refused_at_once() {
        let a = admission(2, 0, 60_000);
        let first = a.admit().await.unwrap();
        let _second = a.admit().await.unwrap();
        assert_eq!(a.in_flight(), 2);
        let (why, after) = reason(a.admit().await.unwrap_err());
        assert_eq!(why, "queue_full");
        assert!((5..=30).contains(&after), "{after}");
        assert_eq!(
            a.metrics
                .shed
                .get_or_create(&ShedLabels {
                    reason: "queue_full"
                })
                .get(),
            1
        );
        drop(first);
        assert_eq!(a.in_flight(), 1);
        assert!(a.admit().await.is_ok(), "a freed place admits again");
    }

    #[tokio::test]
    async fn a_queued_request_is_refused_after_the_wait_budget_or_admitted_when_a_place_frees() {
        let a = Arc::new(admission(1, 1, 50));
        let held = a.admit().await.unwrap();
        let (why, _) = reason(a.admit().await.unwrap_err());
        assert_eq!(why, "queue_wait");
        assert_eq!(a.metrics.queued.get(), 0, "left the queue");
        drop(held);
        // A budget no loaded machine exhausts: the waiter is admitted when the place frees.
        let a = Arc::new(admission(1, 1, 600_000));
        let held = a.admit().await.unwrap();
        let waiter = tokio_util::task::TaskTracker::new().spawn({
            let a = a.clone();
            async move { a.admit().await.map(|_| ()) }
        });
        // The waiter is queued once the gauge says so; then the place frees.
        while a.metrics.queued.get() == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[test]
    fn off_admits_everything() {
        let a = Admission::new(
            SheddingConfig {
                max_in_flight_requests: None,
                ..SheddingConfig::default()
            },
            SheddingMetrics::default(),
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let places: Vec<_> = (0..1000).map(|_| rt.block_on(a.admit()).unwrap()).collect();
        assert_eq!(places.len(), 1000);
    }

    #[test]
    fn retry_after_covers_the_whole_range() {
        assert_eq!(retry_after(5, 30, 0.0), 5);
        assert_eq!(retry_after(5, 30, 0.999_999), 30);
        assert_eq!(retry_after(5, 30, 1.0), 30);
        assert_eq!(retry_after(7, 7, 0.5), 7);
        let seen: std::collections::BTreeSet<u64> = (0..1000)
            .map(|i| retry_after(5, 30, f64::from(i) / 1000.0))
            .collect();
        assert_eq!(seen.len(), 26, "every second of 5..=30 is drawn");
    }

    #[test]
    fn the_queue_wait_must_end_before_the_pool_times_out() {
        let raw = RawShedding {
            max_queue_wait_ms: 5_000,
            ..RawShedding::default()
        };
        let err = raw
            .validate(Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent_load_shedding.max_queue_wait_ms")
                && err.contains("database.connect_timeout_ms"),
            "{err}"
        );
        let raw = RawShedding {
            retry_after_min_s: 10,
            retry_after_max_s: 5,
            ..RawShedding::default()
        };
        let err = raw
            .validate(Duration::from_secs(5))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("agent_load_shedding.retry_after_max_s"),
            "{err}"
        );
        assert_eq!(
            RawShedding::default()
                .validate(Duration::from_secs(5))
                .unwrap(),
            SheddingConfig::default()
        );
    }
}
