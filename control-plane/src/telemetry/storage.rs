//! Time-series storage of `sensor_data` and `predictions`: the insert path shared by ingest and
//! the legacy backfill, partition maintenance, retention and rollups (migration
//! `0140_time_partitioned.sql` holds the layout and its SQL functions).
//!
//! Invariants:
//! - Both tables are time-partitioned by the record's own `ts` (TimescaleDB hypertable with
//!   1-day chunks when the extension was loadable at migration time, else native 1-day range
//!   partitions plus a DEFAULT partition) and keyed by `(device_id, epoch, seq, ts)`: a replay
//!   carries the same key, so `ON CONFLICT DO NOTHING` keeps it a no-op.
//! - Raw readings reach `sensor_data` only through [`INSERT_STAGED`]: rows are copied into the
//!   connection's temporary staging table, then one statement inserts them and folds exactly
//!   the rows it inserted (`RETURNING`, so never a duplicate) into `sensor_rollup_1m` and
//!   `sensor_rollup_1h` in the same transaction. A rollup therefore always equals the
//!   aggregate of the raw rows that were ever inserted, also across crashes and replays.
//! - Lock order inside that statement (issue #17: batches of one device are stored
//!   concurrently and upsert the same rollup rows): rows are inserted in key order
//!   (`device_id, epoch, seq`), then each rollup table's rows are upserted in key order (the
//!   `SELECT` feeding each upsert is `ORDER BY` the rollup key; the two unreferenced upsert
//!   CTEs run to completion after the main query in an order fixed by the statement's plan,
//!   the same for every batch). Two such statements therefore take their row locks in one
//!   global order and wait for each other instead of deadlocking.
//! - While `*_legacy` tables (the pre-0140 tables) still hold rows, a record whose
//!   `(device_id, epoch, seq)` is there counts as a duplicate, and [`maintain`] moves legacy
//!   rows over in batches, each in one transaction (moved, rolled up, or neither).
//! - Retention drops whole partitions/chunks only ([`RETENTION_CUTOFF`]): partitions are
//!   shared by all organisations, so one is dropped when every organisation's retention
//!   allows it; until then the query API hides an organisation's rows older than its own
//!   retention. An organisation without a retention keeps its data (and so every partition).
//! - Maintenance creates the native partitions ahead (and behind, for agents' backlogs) and
//!   moves rows that landed in the DEFAULT partition into their day's partition; a hypertable
//!   makes its chunks itself.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// `[telemetry]`: time partitioning and its maintenance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// How often partition maintenance, retention and the legacy backfill run.
    #[serde(default = "default_maintenance_interval_s")]
    pub maintenance_interval_s: u64,
    /// Native partitions are created this many days ahead of today (UTC).
    #[serde(default = "default_partition_ahead_days")]
    pub partition_ahead_days: u32,
    /// ... and this many days back (readings of agents that were offline).
    #[serde(default = "default_partition_lookback_days")]
    pub partition_lookback_days: u32,
    /// Legacy rows moved per transaction by the backfill.
    #[serde(default = "default_backfill_batch_records")]
    pub backfill_batch_records: u32,
}

fn default_maintenance_interval_s() -> u64 {
    300
}
fn default_partition_ahead_days() -> u32 {
    7
}
fn default_partition_lookback_days() -> u32 {
    7
}
fn default_backfill_batch_records() -> u32 {
    10_000
}

impl Default for RawTelemetry {
    fn default() -> Self {
        Self {
            maintenance_interval_s: default_maintenance_interval_s(),
            partition_ahead_days: default_partition_ahead_days(),
            partition_lookback_days: default_partition_lookback_days(),
            backfill_batch_records: default_backfill_batch_records(),
        }
    }
}

impl RawTelemetry {
    /// Checks the ranges; the error names the field.
    pub fn validate(self) -> Result<TelemetryConfig, (&'static str, String)> {
        let range = |v: u64, lo: u64, hi: u64, field: &'static str| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err((field, format!("must be between {lo} and {hi}, got {v}")))
            }
        };
        range(
            self.maintenance_interval_s,
            1,
            86_400,
            "telemetry.maintenance_interval_s",
        )?;
        range(
            self.partition_ahead_days.into(),
            1,
            366,
            "telemetry.partition_ahead_days",
        )?;
        range(
            self.partition_lookback_days.into(),
            0,
            366,
            "telemetry.partition_lookback_days",
        )?;
        range(
            self.backfill_batch_records.into(),
            100,
            1_000_000,
            "telemetry.backfill_batch_records",
        )?;
        Ok(TelemetryConfig {
            maintenance_interval: Duration::from_secs(self.maintenance_interval_s),
            partition_ahead_days: self.partition_ahead_days,
            partition_lookback_days: self.partition_lookback_days,
            backfill_batch_records: self.backfill_batch_records,
        })
    }
}

/// Checked `[telemetry]`.
#[derive(Debug, Clone, Copy)]
pub struct TelemetryConfig {
    pub maintenance_interval: Duration,
    pub partition_ahead_days: u32,
    pub partition_lookback_days: u32,
    pub backfill_batch_records: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        // The defaults are in range.
        RawTelemetry::default()
            .validate()
            .unwrap_or(TelemetryConfig {
                maintenance_interval: Duration::from_secs(300),
                partition_ahead_days: 7,
                partition_lookback_days: 7,
                backfill_batch_records: 10_000,
            })
    }
}

/// How a time-series table is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Hypertable,
    Native,
    Plain,
}

/// The layout of `sensor_data` (predictions was migrated the same way).
pub async fn layout(pool: &PgPool) -> Result<Layout, sqlx::Error> {
    let l: String = sqlx::query_scalar("SELECT kip_ts_layout('sensor_data')")
        .fetch_one(pool)
        .await?;
    Ok(match l.as_str() {
        "hypertable" => Layout::Hypertable,
        "native" => Layout::Native,
        _ => Layout::Plain,
    })
}

/// Logs which layout this database has (at start-up).
pub async fn report_layout(pool: &PgPool) {
    match layout(pool).await {
        Ok(Layout::Hypertable) => {
            tracing::info!("sensor_data and predictions are TimescaleDB hypertables (1-day chunks)")
        }
        Ok(Layout::Native) => tracing::info!(
            "TimescaleDB not loaded when the schema was migrated: sensor_data and predictions use \
             native 1-day range partitions maintained by the control plane"
        ),
        Ok(Layout::Plain) => tracing::warn!("sensor_data is neither partitioned nor a hypertable"),
        Err(e) => tracing::warn!(error = %e, "cannot read the sensor_data layout"),
    }
}

/// The connection's staging table of raw readings (temporary: not WAL-logged, private to the
/// session, emptied at every commit).
const CREATE_STAGING: &str = "CREATE TEMP TABLE kip_sensor_staging ( \
    org_id uuid NOT NULL, device_id uuid NOT NULL, epoch bigint NOT NULL, seq bigint NOT NULL, \
    machine text NOT NULL, metric text NOT NULL, ts timestamptz NOT NULL, \
    value float8 NOT NULL, quality int2 NOT NULL, received_at timestamptz) \
    ON COMMIT DELETE ROWS";

/// COPY target of [`ensure_staging`]'s table, binary format ([`super::copy`]).
pub(crate) const COPY_STAGING: &str = "COPY kip_sensor_staging (org_id, device_id, epoch, seq, \
    machine, metric, ts, value, quality) FROM STDIN (FORMAT binary)";

/// Creates the staging table on this connection unless it has it (pooled connections keep
/// it, so this is one cheap query per batch).
pub(crate) async fn ensure_staging(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('pg_temp.kip_sensor_staging') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
    if !exists {
        sqlx::query(CREATE_STAGING).execute(&mut *conn).await?;
    }
    Ok(())
}

/// The part of the insert statements after the `ins` CTE (the inserted rows: `org_id,
/// device_id, machine, metric, ts, value`): folds exactly those rows into the 1-minute and
/// 1-hour rollups and returns how many were inserted. A macro so that both statements stay
/// static string literals (`concat!`).
macro_rules! rollup_tail {
    () => {
        ", m AS ( \
            SELECT org_id, device_id, machine, metric, \
                   date_bin(interval '1 minute', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, \
                   min(value) AS min, max(value) AS max, sum(value) AS sum, count(*) AS count, \
                   max(ts) AS last_ts, (array_agg(value ORDER BY ts DESC))[1] AS last \
              FROM ins GROUP BY 1, 2, 3, 4, 5 \
        ), up_m AS ( \
            INSERT INTO sensor_rollup_1m AS r (org_id, device_id, machine, metric, bucket, min, max, sum, count, last, last_ts) \
            SELECT org_id, device_id, machine, metric, bucket, min, max, sum, count, last, last_ts FROM m \
             ORDER BY org_id, device_id, machine, metric, bucket \
            ON CONFLICT (org_id, device_id, machine, metric, bucket) DO UPDATE SET \
                min = LEAST(r.min, EXCLUDED.min), max = GREATEST(r.max, EXCLUDED.max), \
                sum = r.sum + EXCLUDED.sum, count = r.count + EXCLUDED.count, \
                last = CASE WHEN EXCLUDED.last_ts >= r.last_ts THEN EXCLUDED.last ELSE r.last END, \
                last_ts = GREATEST(r.last_ts, EXCLUDED.last_ts) \
        ), h AS ( \
            SELECT org_id, device_id, machine, metric, \
                   date_bin(interval '1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, \
                   min(min) AS min, max(max) AS max, sum(sum) AS sum, sum(count)::bigint AS count, \
                   max(last_ts) AS last_ts, (array_agg(last ORDER BY last_ts DESC))[1] AS last \
              FROM m GROUP BY 1, 2, 3, 4, 5 \
        ), up_h AS ( \
            INSERT INTO sensor_rollup_1h AS r (org_id, device_id, machine, metric, bucket, min, max, sum, count, last, last_ts) \
            SELECT org_id, device_id, machine, metric, bucket, min, max, sum, count, last, last_ts FROM h \
             ORDER BY org_id, device_id, machine, metric, bucket \
            ON CONFLICT (org_id, device_id, machine, metric, bucket) DO UPDATE SET \
                min = LEAST(r.min, EXCLUDED.min), max = GREATEST(r.max, EXCLUDED.max), \
                sum = r.sum + EXCLUDED.sum, count = r.count + EXCLUDED.count, \
                last = CASE WHEN EXCLUDED.last_ts >= r.last_ts THEN EXCLUDED.last ELSE r.last END, \
                last_ts = GREATEST(r.last_ts, EXCLUDED.last_ts) \
        ) \
        SELECT count(*) FROM ins"
    };
}

/// Inserts the staged rows into `sensor_data` (skipping keys already there or still in the
/// legacy table) and folds exactly the inserted rows into the 1-minute and 1-hour rollups.
/// Returns how many rows were inserted.
const INSERT_STAGED: &str = concat!(
    "WITH ins AS ( \
        INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value, quality, received_at) \
        SELECT s.org_id, s.device_id, s.epoch, s.seq, s.machine, s.metric, s.ts, s.value, s.quality, \
               COALESCE(s.received_at, now()) \
          FROM kip_sensor_staging s \
         WHERE NOT EXISTS (SELECT 1 FROM sensor_data_legacy l \
                            WHERE l.device_id = s.device_id AND l.epoch = s.epoch AND l.seq = s.seq) \
         ORDER BY s.device_id, s.epoch, s.seq \
        ON CONFLICT DO NOTHING \
        RETURNING org_id, device_id, machine, metric, ts, value \
    )",
    rollup_tail!()
);

/// The same for one device's batch given as arrays (`$1` org, `$2` device, `$3` epoch, then
/// seq, machine, metric, ts, value, quality): no staging table, so no temporary table per
/// connection and two round trips fewer. Used for small batches, where COPY's set-up costs
/// more than it saves.
const INSERT_ARRAYS: &str = concat!(
    "WITH ins AS ( \
        INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value, quality) \
        SELECT $1, $2, $3, u.* FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::timestamptz[], \
                                           $8::float8[], $9::int2[]) AS u(seq) \
         WHERE NOT EXISTS (SELECT 1 FROM sensor_data_legacy l \
                            WHERE l.device_id = $2 AND l.epoch = $3 AND l.seq = u.seq) \
         ORDER BY u.seq \
        ON CONFLICT DO NOTHING \
        RETURNING org_id, device_id, machine, metric, ts, value \
    )",
    rollup_tail!()
);

/// Runs [`INSERT_STAGED`] on the rows staged in this transaction.
pub(crate) async fn insert_staged(conn: &mut PgConnection) -> Result<u64, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(INSERT_STAGED)
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// One device's readings as columns.
#[derive(Debug, Default)]
pub(crate) struct ReadingColumns {
    pub seq: Vec<i64>,
    pub machine: Vec<String>,
    pub metric: Vec<String>,
    pub ts: Vec<DateTime<Utc>>,
    pub value: Vec<f64>,
    pub quality: Vec<i16>,
}

/// Batches of at least this many readings go through COPY; smaller ones through
/// [`INSERT_ARRAYS`].
pub const COPY_MIN_READINGS: usize = 1_000;

/// Stores one device's readings (same epoch) in this transaction, with their rollups; returns
/// how many were new.
pub(crate) async fn insert_readings(
    conn: &mut PgConnection,
    org_id: uuid::Uuid,
    device_id: uuid::Uuid,
    epoch: i64,
    r: &ReadingColumns,
) -> Result<u64, sqlx::Error> {
    if r.seq.len() < COPY_MIN_READINGS {
        let n: i64 = sqlx::query_scalar(INSERT_ARRAYS)
            .bind(org_id)
            .bind(device_id)
            .bind(epoch)
            .bind(&r.seq)
            .bind(&r.machine)
            .bind(&r.metric)
            .bind(&r.ts)
            .bind(&r.value)
            .bind(&r.quality)
            .fetch_one(&mut *conn)
            .await?;
        return Ok(u64::try_from(n).unwrap_or(0));
    }
    let mut rows = super::copy::StagingRows::with_capacity(r.seq.len());
    for i in 0..r.seq.len() {
        rows.push(
            org_id,
            device_id,
            epoch,
            r.seq[i],
            &r.machine[i],
            &r.metric[i],
            r.ts[i],
            r.value[i],
            r.quality[i],
        );
    }
    ensure_staging(&mut *conn).await?;
    let mut copy = conn.copy_in_raw(COPY_STAGING).await?;
    copy.send(rows.finish()).await?;
    copy.finish().await?;
    insert_staged(conn).await
}

/// What one [`maintain`] pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Native partitions created (ahead, behind, or for rows in the DEFAULT partition).
    pub partitions_created: u64,
    /// Partitions or chunks dropped by retention.
    pub partitions_dropped: u64,
    /// Legacy rows moved into the partitioned tables.
    pub legacy_rows_moved: u64,
}

/// Days around today that get a partition from rows found in a DEFAULT partition; rows
/// further out (clock errors) stay in the DEFAULT partition.
const DEFAULT_SWEEP_PAST_DAYS: i64 = 3_650;

/// The shared retention cutoff: `now - max(retention)` over every organisation, or none when
/// any organisation keeps its data (no `telemetry_retention` row) or there is none.
const RETENTION_CUTOFF: &str = "\
SELECT CASE WHEN count(*) = 0 OR bool_or(r.raw_retention_days IS NULL) THEN NULL \
            ELSE now() - make_interval(days => max(r.raw_retention_days)) END \
  FROM organisations o LEFT JOIN telemetry_retention r ON r.org_id = o.id";

/// One pass: partitions ahead and behind, rows out of the DEFAULT partitions, retention, then
/// the legacy backfill until it is done or `token` is cancelled.
pub async fn maintain(
    pool: &PgPool,
    cfg: &TelemetryConfig,
    token: &CancellationToken,
) -> Result<MaintenanceReport, sqlx::Error> {
    let mut report = MaintenanceReport::default();
    let today = Utc::now().date_naive();
    let from = today - chrono::Days::new(cfg.partition_lookback_days.into());
    let to = today + chrono::Days::new(cfg.partition_ahead_days.into());
    if layout(pool).await? == Layout::Native {
        for table in ["sensor_data", "predictions"] {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FILTER (WHERE kip_ts_ensure_day($1, 'ts', d::date)) \
                   FROM generate_series($2::date, $3::date, interval '1 day') d",
            )
            .bind(table)
            .bind(from)
            .bind(to)
            .fetch_one(pool)
            .await?;
            report.partitions_created += u64::try_from(n).unwrap_or(0);
        }
        report.partitions_created += sweep_defaults(pool, today, to).await?;
    }
    let cutoff: Option<DateTime<Utc>> =
        sqlx::query_scalar(RETENTION_CUTOFF).fetch_one(pool).await?;
    if let Some(cutoff) = cutoff {
        for table in ["sensor_data", "predictions"] {
            let n: i32 = sqlx::query_scalar("SELECT kip_ts_drop_before($1, $2)")
                .bind(table)
                .bind(cutoff)
                .fetch_one(pool)
                .await?;
            report.partitions_dropped += u64::try_from(n).unwrap_or(0);
        }
    }
    while !token.is_cancelled() {
        let moved = backfill_batch(pool, cfg.backfill_batch_records, today, to).await?;
        if moved == 0 {
            break;
        }
        report.legacy_rows_moved += moved;
    }
    Ok(report)
}

/// Gives each day found in a DEFAULT partition (within the sweep window) its own partition,
/// moving the rows.
async fn sweep_defaults(
    pool: &PgPool,
    today: NaiveDate,
    to: NaiveDate,
) -> Result<u64, sqlx::Error> {
    let lo = today - chrono::Days::new(DEFAULT_SWEEP_PAST_DAYS as u64);
    let a: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE kip_ts_ensure_day('sensor_data', 'ts', d)) FROM \
           (SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS d FROM sensor_data_default) x \
          WHERE d BETWEEN $1 AND $2",
    )
    .bind(lo)
    .bind(to)
    .fetch_one(pool)
    .await?;
    let b: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE kip_ts_ensure_day('predictions', 'ts', d)) FROM \
           (SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS d FROM predictions_default) x \
          WHERE d BETWEEN $1 AND $2",
    )
    .bind(lo)
    .bind(to)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(a + b).unwrap_or(0))
}

/// Moves up to `limit` legacy readings and up to `limit` legacy predictions into the
/// partitioned tables, one transaction; returns how many rows were moved.
pub async fn backfill_batch(
    pool: &PgPool,
    limit: u32,
    today: NaiveDate,
    to: NaiveDate,
) -> Result<u64, sqlx::Error> {
    let limit = i64::from(limit);
    let mut tx = pool.begin().await?;
    ensure_staging(&mut tx).await?;
    let readings = sqlx::query(
        "WITH moved AS ( \
            DELETE FROM sensor_data_legacy WHERE ctid = ANY (ARRAY( \
                SELECT ctid FROM sensor_data_legacy LIMIT $1 FOR UPDATE SKIP LOCKED)) \
            RETURNING org_id, device_id, epoch, seq, machine, metric, ts, value, quality, received_at) \
         INSERT INTO kip_sensor_staging \
         SELECT org_id, device_id, epoch, seq, machine, metric, ts, value, quality, received_at FROM moved",
    )
    .bind(limit)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if readings > 0 {
        // Ingest locks its device before it touches rollups; so does the backfill (in one
        // order), so the two never wait for each other in a cycle.
        sqlx::query(
            "SELECT id FROM devices WHERE id IN (SELECT DISTINCT device_id FROM kip_sensor_staging) \
             ORDER BY id FOR UPDATE",
        )
        .execute(&mut *tx)
        .await?;
        // The moved days get their partitions first: history must not pile up in DEFAULT.
        sqlx::query(
            "SELECT kip_ts_ensure_day('sensor_data', 'ts', d) FROM \
               (SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS d FROM kip_sensor_staging) x \
              WHERE d BETWEEN $1 AND $2 ORDER BY d",
        )
        .bind(today - chrono::Days::new(DEFAULT_SWEEP_PAST_DAYS as u64))
        .bind(to)
        .execute(&mut *tx)
        .await?;
        insert_staged(&mut tx).await?;
    }
    let predictions: i64 = sqlx::query_scalar(
        "WITH moved AS ( \
            DELETE FROM predictions_legacy WHERE ctid = ANY (ARRAY( \
                SELECT ctid FROM predictions_legacy LIMIT $1 FOR UPDATE SKIP LOCKED)) \
            RETURNING *), \
         ins AS ( \
            INSERT INTO predictions (org_id, device_id, epoch, seq, machine, model_version, ts, \
                                     rul_cycles, anomaly_score, received_at) \
            SELECT org_id, device_id, epoch, seq, machine, model_version, ts, rul_cycles, \
                   anomaly_score, received_at FROM moved \
            ON CONFLICT DO NOTHING RETURNING 1) \
         SELECT count(*) FROM moved",
    )
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(readings + u64::try_from(predictions).unwrap_or(0))
}

/// Runs [`maintain`] now and then every `maintenance_interval`, on `tracker`, until `token`
/// is cancelled. A failed pass is logged and retried at the next tick.
pub fn spawn_maintenance(
    pool: PgPool,
    cfg: TelemetryConfig,
    token: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(cfg.maintenance_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            match maintain(&pool, &cfg, &token).await {
                Ok(r) if r != MaintenanceReport::default() => tracing::info!(
                    partitions_created = r.partitions_created,
                    partitions_dropped = r.partitions_dropped,
                    legacy_rows_moved = r.legacy_rows_moved,
                    "time-series maintenance"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "time-series maintenance failed"),
            }
        }
    });
}
