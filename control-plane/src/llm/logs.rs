//! The `inference_logs` writer: a bounded queue and one background task that inserts batches.
//!
//! Invariants:
//! - The request path only calls [`LogSink::record`], which never waits: when the queue is full
//!   the record is dropped and `kip_llm_log_rows_dropped` rises. A slow database therefore
//!   slows nothing but the log, and memory stays bounded by the queue capacity.
//! - A dropped row never loses spend: costs are accounted separately ([`super::spend`]); the
//!   row's `cost_usd` is a record only.
//! - Refusals (rate limit, budget, overload) use [`LogSink::record_refusal`], which queues only
//!   while more than half the queue is free: a flood of refused requests from one organisation
//!   cannot take the places of other organisations' answered calls.
//! - One multi-row `INSERT ... SELECT FROM UNNEST(...)` per batch (one round trip, any size up
//!   to `log_batch_max_rows`), ids in queue order; rows of organisations deleted meanwhile are
//!   skipped, so one such row cannot fail a whole batch. The foreign key already checks each
//!   row's organisation, so the batch goes in unfiltered first (one organisation lookup per
//!   row, not two: PostgreSQL's CPU per logged call is part of the gateway's cost on a shared
//!   machine); only a batch the foreign key refused is written again with the filter.
//! - The writer runs on the server's `TaskTracker` and ends when every sender is gone (the
//!   router was dropped at shutdown) after writing what was queued.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::metrics::LlmMetrics;

/// One row of `inference_logs`.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub org_id: Uuid,
    pub request_id: Uuid,
    pub provider: String,
    pub model: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub tokens_cached: u64,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub status: String,
    pub cache_hit: bool,
}

/// The sending side, held by the gateway.
#[derive(Debug, Clone)]
pub struct LogSink {
    tx: mpsc::Sender<LogRecord>,
    metrics: LlmMetrics,
}

impl LogSink {
    /// Creates the queue.
    pub fn new(capacity: usize, metrics: LlmMetrics) -> (Self, mpsc::Receiver<LogRecord>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, metrics }, rx)
    }

    /// Queues a record without waiting; counts it as dropped when the queue is full or the
    /// writer is gone.
    pub fn record(&self, r: LogRecord) {
        if self.tx.try_send(r).is_err() {
            self.metrics.log_rows_dropped.inc();
        }
    }

    /// Queues the row of a refused request only while more than half the queue is free.
    pub fn record_refusal(&self, r: LogRecord) {
        if self.tx.capacity() * 2 <= self.tx.max_capacity() {
            self.metrics.log_rows_dropped.inc();
            return;
        }
        self.record(r);
    }
}

fn clamp_i32(v: u64) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

async fn write_batch(pool: &PgPool, batch: &[LogRecord]) -> Result<u64, sqlx::Error> {
    let mut org = Vec::with_capacity(batch.len());
    let mut req = Vec::with_capacity(batch.len());
    let mut provider = Vec::with_capacity(batch.len());
    let mut model = Vec::with_capacity(batch.len());
    let mut tin = Vec::with_capacity(batch.len());
    let mut tout = Vec::with_capacity(batch.len());
    let mut tcached = Vec::with_capacity(batch.len());
    let mut cost = Vec::with_capacity(batch.len());
    let mut latency = Vec::with_capacity(batch.len());
    let mut ttft: Vec<Option<f64>> = Vec::with_capacity(batch.len());
    let mut status = Vec::with_capacity(batch.len());
    let mut hit = Vec::with_capacity(batch.len());
    for r in batch {
        org.push(r.org_id);
        req.push(r.request_id);
        provider.push(r.provider.as_str());
        model.push(r.model.as_str());
        tin.push(clamp_i32(r.tokens_in));
        tout.push(clamp_i32(r.tokens_out));
        tcached.push(clamp_i32(r.tokens_cached));
        cost.push(if r.cost_usd.is_finite() {
            r.cost_usd
        } else {
            0.0
        });
        latency.push(r.latency_ms);
        ttft.push(r.ttft_ms);
        status.push(r.status.as_str());
        hit.push(r.cache_hit);
    }
    let columns = Columns {
        org: &org,
        req: &req,
        provider: &provider,
        model: &model,
        tin: &tin,
        tout: &tout,
        tcached: &tcached,
        cost: &cost,
        latency: &latency,
        ttft: &ttft,
        status: &status,
        hit: &hit,
    };
    match insert(pool, INSERT_ALL, &columns).await {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
            insert(pool, INSERT_EXISTING_ORGS, &columns).await
        }
        other => other,
    }
}

/// SQLSTATE `foreign_key_violation`: a row's organisation was deleted after its call.
const FOREIGN_KEY_VIOLATION: &str = "23503";

/// The statement both inserts share up to their filter: one column list, so a column added to
/// one cannot be missed in the other.
macro_rules! insert_logs_from_unnest {
    ($filter:literal) => {
        concat!(
            "INSERT INTO inference_logs (org_id, request_id, provider, model, \
               tokens_in, tokens_out, tokens_cached, cost_usd, latency_ms, ttft_ms, status, cache_hit) \
             SELECT u.org_id, u.request_id, u.provider, u.model, u.tokens_in, u.tokens_out, \
               u.tokens_cached, u.cost_usd, u.latency_ms, u.ttft_ms, u.status, u.cache_hit \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int4[], $6::int4[], \
               $7::int4[], $8::float8[], $9::float8[], $10::float8[], $11::text[], $12::bool[]) \
               WITH ORDINALITY AS u(org_id, request_id, provider, model, tokens_in, tokens_out, \
                    tokens_cached, cost_usd, latency_ms, ttft_ms, status, cache_hit, n) ",
            $filter,
            " ORDER BY u.n"
        )
    };
}

/// The batch as it is; the foreign key refuses it when an organisation is gone.
const INSERT_ALL: &str = insert_logs_from_unnest!("");

/// The batch without the rows of organisations that no longer exist.
const INSERT_EXISTING_ORGS: &str =
    insert_logs_from_unnest!("WHERE EXISTS (SELECT 1 FROM organisations o WHERE o.id = u.org_id)");

/// A batch as one array per column.
struct Columns<'a> {
    org: &'a [Uuid],
    req: &'a [Uuid],
    provider: &'a [&'a str],
    model: &'a [&'a str],
    tin: &'a [i32],
    tout: &'a [i32],
    tcached: &'a [i32],
    cost: &'a [f64],
    latency: &'a [f64],
    ttft: &'a [Option<f64>],
    status: &'a [&'a str],
    hit: &'a [bool],
}

async fn insert(pool: &PgPool, sql: &'static str, c: &Columns<'_>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(sql)
        .bind(c.org)
        .bind(c.req)
        .bind(c.provider)
        .bind(c.model)
        .bind(c.tin)
        .bind(c.tout)
        .bind(c.tcached)
        .bind(c.cost)
        .bind(c.latency)
        .bind(c.ttft)
        .bind(c.status)
        .bind(c.hit)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

/// The writer task: collects up to `max_rows` records or what arrived within `flush_interval`
/// of the first one, inserts them, repeats; returns when the queue is closed and empty.
pub async fn run_writer(
    mut rx: mpsc::Receiver<LogRecord>,
    pool: PgPool,
    max_rows: usize,
    flush_interval: Duration,
    metrics: LlmMetrics,
) {
    let mut batch = Vec::with_capacity(max_rows);
    loop {
        let Some(first) = rx.recv().await else {
            break;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + flush_interval;
        while batch.len() < max_rows {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        match write_batch(&pool, &batch).await {
            Ok(n) => {
                metrics.log_rows_written.inc_by(n);
            }
            Err(e) => {
                metrics.log_write_failures.inc();
                metrics.log_rows_dropped.inc_by(batch.len() as u64);
                tracing::warn!(error = %e, rows = batch.len(), "writing inference_logs failed");
            }
        }
        batch.clear();
    }
    tracing::debug!("inference log writer stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LogRecord {
        LogRecord {
            org_id: Uuid::new_v4(),
            request_id: Uuid::new_v4(),
            provider: "p".into(),
            model: "m".into(),
            tokens_in: 0,
            tokens_out: 0,
            tokens_cached: 0,
            cost_usd: 0.0,
            latency_ms: 1.0,
            ttft_ms: None,
            status: "ok".into(),
            cache_hit: false,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = LlmMetrics::register(&mut reg);
        let (sink, _rx) = LogSink::new(2, metrics.clone());
        for _ in 0..5 {
            sink.record(record());
        }
        assert_eq!(metrics.log_rows_dropped.get(), 3);
    }

    #[test]
    fn refusals_leave_half_the_queue_to_answered_calls() {
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = LlmMetrics::register(&mut reg);
        let (sink, _rx) = LogSink::new(4, metrics.clone());
        for _ in 0..4 {
            sink.record_refusal(record());
        }
        // Two refusals queued (the queue is then half full), two dropped.
        assert_eq!(metrics.log_rows_dropped.get(), 2);
        sink.record(record());
        sink.record(record());
        assert_eq!(
            metrics.log_rows_dropped.get(),
            2,
            "answered calls still fit"
        );
    }
}
