//! Month-to-date LLM spend per organisation: the figure budget checks read, and the ledger
//! that writes every call's cost to `llm_spend`.
//!
//! Invariants:
//! - Spend is never dropped. A call's cost goes into an in-memory ledger keyed by
//!   (organisation, month), not into the droppable `inference_logs` queue; one background task
//!   ([`run_flusher`]) adds the ledger to `llm_spend` and removes an amount only after the
//!   statement that added it committed. A failed write keeps the amounts and is retried. The
//!   ledger holds one number per (organisation, month), so it is bounded by the number of
//!   organisations, whatever the request rate.
//! - The month-to-date figure is the last `llm_spend` read (at most `refresh` old) plus what
//!   the ledger has not written yet, so a budget sees a call's cost as soon as the call ended,
//!   not when a log batch was written. Reads and flushes of the database are serialised (one
//!   async lock), so a read never misses an amount that is between ledger and table.
//! - A request never queues behind that lock once the organisation has a read of this month:
//!   while a flush or another request's read holds it, the last read (however old) plus the
//!   ledger answers, and a request that waited for the lock uses the read made meanwhile
//!   instead of making its own. So when the read expires under load, one request reads and
//!   the others go on (before: every request arriving during the read queued for its own).
//! - No `std::sync::Mutex` is held across an `.await`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chrono::{Datelike as _, NaiveDate};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// First day of the current month, UTC (the `llm_spend.month` key).
pub fn this_month() -> NaiveDate {
    let now = chrono::Utc::now().date_naive();
    now.with_day(1).unwrap_or(now)
}

#[derive(Debug, Clone)]
struct Read {
    month: NaiveDate,
    usd: f64,
    fetched: Instant,
    /// The organisation's name at the read (`None`: it no longer exists), for metric labels.
    name: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Last value read from `llm_spend` per organisation.
    read: HashMap<Uuid, Read>,
    /// Costs not yet in `llm_spend`.
    unflushed: HashMap<(Uuid, NaiveDate), f64>,
}

/// Spend per organisation: budget reads and the never-dropping ledger.
#[derive(Debug, Default)]
pub struct Spending {
    state: Mutex<State>,
    /// Serialises `llm_spend` reads with ledger flushes.
    db: tokio::sync::Mutex<()>,
}

impl Spending {
    /// Spend of `org` this calendar month (UTC), including costs not written yet.
    pub async fn month_to_date(
        &self,
        pool: &PgPool,
        org: Uuid,
        refresh: Duration,
    ) -> Result<f64, sqlx::Error> {
        if let Some(v) = self.cached(org, refresh) {
            return Ok(v);
        }
        let _db = match self.db.try_lock() {
            Ok(g) => g,
            // A flush or another request's read holds the database: this month's last read,
            // however old, plus the ledger is this replica's exact figure (only other replicas'
            // costs since that read are missing), so the request does not queue behind them.
            Err(_) => match self.stale(org) {
                Some(v) => return Ok(v),
                None => self.db.lock().await,
            },
        };
        // Read while this request waited for the lock.
        if let Some(v) = self.cached(org, refresh) {
            return Ok(v);
        }
        let month = this_month();
        // One row by primary key, whatever the log volume.
        let row: Option<(String, f64)> = sqlx::query_as(
            "SELECT o.name, COALESCE(s.usd, 0)::float8 FROM organisations o \
             LEFT JOIN llm_spend s ON s.org_id = o.id AND s.month = $2 WHERE o.id = $1",
        )
        .bind(org)
        .bind(month)
        .fetch_optional(pool)
        .await?;
        let (name, usd) = row.map_or((None, 0.0), |(n, u)| (Some(n), u));
        let mut s = lock(&self.state);
        s.read.insert(
            org,
            Read {
                month,
                usd,
                fetched: Instant::now(),
                name,
            },
        );
        Ok(usd + s.unflushed.get(&(org, month)).copied().unwrap_or(0.0))
    }

    /// The figure without a database read, when the last read is younger than `refresh`.
    pub fn cached(&self, org: Uuid, refresh: Duration) -> Option<f64> {
        let month = this_month();
        let s = lock(&self.state);
        let r = s.read.get(&org)?;
        (r.month == month && r.fetched.elapsed() < refresh)
            .then(|| r.usd + s.unflushed.get(&(org, month)).copied().unwrap_or(0.0))
    }

    /// This month's last read plus the ledger, however old the read; `None` before the first
    /// read of this month.
    fn stale(&self, org: Uuid) -> Option<f64> {
        let month = this_month();
        let s = lock(&self.state);
        let r = s.read.get(&org).filter(|r| r.month == month)?;
        Some(r.usd + s.unflushed.get(&(org, month)).copied().unwrap_or(0.0))
    }

    /// The best figure known without a database read (last read plus ledger), however old.
    pub fn known(&self, org: Uuid) -> f64 {
        let month = this_month();
        let s = lock(&self.state);
        let read = s
            .read
            .get(&org)
            .filter(|r| r.month == month)
            .map_or(0.0, |r| r.usd);
        read + s.unflushed.get(&(org, month)).copied().unwrap_or(0.0)
    }

    /// The organisation's name as of the last read (`None` before one, or when it is gone).
    pub fn org_name(&self, org: Uuid) -> Option<String> {
        lock(&self.state).read.get(&org)?.name.clone()
    }

    /// Adds a call's cost to the ledger (written by [`run_flusher`]).
    pub fn add(&self, org: Uuid, usd: f64) {
        if usd <= 0.0 || !usd.is_finite() {
            return;
        }
        *lock(&self.state)
            .unflushed
            .entry((org, this_month()))
            .or_insert(0.0) += usd;
    }

    /// Total not yet written (for tests and shutdown logs).
    pub fn unflushed_usd(&self) -> f64 {
        lock(&self.state).unflushed.values().sum()
    }

    /// Writes the ledger to `llm_spend`; amounts leave the ledger only after the commit.
    pub async fn flush(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let _db = self.db.lock().await;
        let taken: Vec<((Uuid, NaiveDate), f64)> = lock(&self.state)
            .unflushed
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        let org: Vec<Uuid> = taken.iter().map(|((o, _), _)| *o).collect();
        let month: Vec<NaiveDate> = taken.iter().map(|((_, m), _)| *m).collect();
        let usd: Vec<f64> = taken.iter().map(|(_, v)| *v).collect();
        // Rows of organisations deleted meanwhile are skipped (their spend went with them).
        sqlx::query(
            "INSERT INTO llm_spend (org_id, month, usd) \
             SELECT u.org_id, u.month, u.usd FROM UNNEST($1::uuid[], $2::date[], $3::float8[]) \
               AS u(org_id, month, usd) \
             WHERE EXISTS (SELECT 1 FROM organisations o WHERE o.id = u.org_id) \
             ON CONFLICT (org_id, month) DO UPDATE SET usd = llm_spend.usd + EXCLUDED.usd",
        )
        .bind(&org)
        .bind(&month)
        .bind(&usd)
        .execute(pool)
        .await?;
        let mut s = lock(&self.state);
        for ((o, m), v) in taken {
            // Costs added while the statement ran stay in the ledger.
            if let Some(left) = s.unflushed.get_mut(&(o, m)) {
                *left -= v;
                if *left <= 1e-12 {
                    s.unflushed.remove(&(o, m));
                }
            }
            if let Some(r) = s.read.get_mut(&o)
                && r.month == m
            {
                r.usd += v;
            }
        }
        Ok(())
    }
}

/// Writes the ledger after each wake-up (a call had a cost), batching what arrives within
/// `interval`; on a failed write it retries every `interval`. Returns after a final flush when
/// every waker is gone (the gateway was dropped at shutdown).
pub async fn run_flusher(
    spending: std::sync::Arc<Spending>,
    mut wake: mpsc::Receiver<()>,
    pool: PgPool,
    interval: Duration,
) {
    let mut open = true;
    while open {
        match wake.recv().await {
            Some(()) => {
                // Batch the costs of the next moments into one statement.
                tokio::time::sleep(interval).await;
            }
            None => open = false,
        }
        let mut tries = 0u32;
        while let Err(e) = spending.flush(&pool).await {
            tries += 1;
            tracing::warn!(error = %e, tries, "writing llm_spend failed; retrying");
            if !open && tries >= 5 {
                tracing::error!(
                    unflushed_usd = spending.unflushed_usd(),
                    "LLM spend could not be written at shutdown"
                );
                break;
            }
            tokio::time::sleep(interval.max(Duration::from_millis(100))).await;
        }
    }
    tracing::debug!("LLM spend flusher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_counts_until_written() {
        let s = Spending::default();
        let org = Uuid::new_v4();
        s.add(org, 1.5);
        s.add(org, 0.5);
        s.add(org, f64::NAN);
        assert!((s.known(org) - 2.0).abs() < 1e-12);
        assert_eq!(s.cached(org, Duration::from_secs(60)), None);
        assert!((s.unflushed_usd() - 2.0).abs() < 1e-12);
    }

    /// While the database lock is held (a flush committing), a request whose read expired
    /// answers from the old read plus the ledger instead of queueing; without a read of this
    /// month it has to wait.
    #[tokio::test]
    async fn an_expired_read_does_not_queue_behind_a_flush() {
        let s = Spending::default();
        let org = Uuid::new_v4();
        lock(&s.state).read.insert(
            org,
            Read {
                month: this_month(),
                usd: 3.0,
                fetched: Instant::now(),
                name: None,
            },
        );
        s.add(org, 0.25);
        // Never connected: a database read would not answer within the timeout below.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy("postgres://nobody@127.0.0.1:9/none")
            .unwrap();
        let flushing = s.db.lock().await;
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            s.month_to_date(&pool, org, Duration::ZERO),
        )
        .await
        .expect("queued behind the flush")
        .unwrap();
        assert!((got - 3.25).abs() < 1e-12);
        let other = Uuid::new_v4();
        let waits = tokio::time::timeout(
            Duration::from_millis(200),
            s.month_to_date(&pool, other, Duration::ZERO),
        )
        .await;
        assert!(waits.is_err(), "no read of this month, yet it did not wait");
        drop(flushing);
    }
}

/// Month-to-date spend of each organisation as written to `llm_spend` (the ledger's
/// unwritten rest is at most one flush interval behind), for the console. `org`: only that
/// organisation (the caller checked it against its principal); `None`: every organisation
/// (platform keys).
pub async fn spend_by_org(
    pool: &PgPool,
    org: Option<Uuid>,
    limit: i64,
) -> Result<Vec<(Uuid, String, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT o.id, o.name, COALESCE(s.usd, 0)::float8 FROM organisations o \
         LEFT JOIN llm_spend s ON s.org_id = o.id AND s.month = $1 \
         WHERE ($2::uuid IS NULL OR o.id = $2) ORDER BY 3 DESC, o.name LIMIT $3",
    )
    .bind(this_month())
    .bind(org)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// LLM calls of one organisation per provider and model over the last `days` days.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Usage {
    pub provider: String,
    pub model: String,
    pub calls: i64,
    pub errors: i64,
    pub cache_hits: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub cost_usd: f64,
    pub p50_latency_ms: Option<f64>,
    pub p99_latency_ms: Option<f64>,
}

/// Usage of `org` from `inference_logs` over the last `days` days (an index range scan of
/// `inference_logs_org_time`), most expensive first.
pub async fn usage(pool: &PgPool, org: Uuid, days: i32) -> Result<Vec<Usage>, sqlx::Error> {
    sqlx::query_as(
        "SELECT provider, model, count(*) AS calls, \
                count(*) FILTER (WHERE status <> 'ok') AS errors, \
                count(*) FILTER (WHERE cache_hit) AS cache_hits, \
                COALESCE(sum(tokens_in), 0)::int8 AS tokens_in, \
                COALESCE(sum(tokens_out), 0)::int8 AS tokens_out, \
                COALESCE(sum(cost_usd), 0)::float8 AS cost_usd, \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_latency_ms, \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_latency_ms \
         FROM inference_logs \
         WHERE org_id = $1 AND created_at > now() - make_interval(days => $2) \
         GROUP BY provider, model ORDER BY cost_usd DESC, calls DESC LIMIT 100",
    )
    .bind(org)
    .bind(days)
    .fetch_all(pool)
    .await
}
