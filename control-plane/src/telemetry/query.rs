//! Query API for an organisation's sensor data (`GET .../devices/{device_id}/sensor-data`): raw readings or time buckets, paginated.
//!
//! Resolution: a page is read from raw readings or from the 1-minute / 1-hour rollups
//! ([`plan`] chooses from the bucket width or, with `resolution=auto`, from the range) and
//! says which (`resolution`, `bucket_s`). A rollup is used only when the bucket width is a
//! multiple of its width and `from`/`to` are aligned to it, so its answer equals the raw one.
//!
//! Invariants:
//! - Every query filters by the `org_id` checked against the caller's key and by a device of
//!   that organisation (404 otherwise), like every other tenant route.
//! - Pagination is by keyset, not offset: the cursor names the last row returned
//!   (`(ts, epoch, seq)` for raw rows, `(bucket, machine, metric)` for buckets), so pages stay
//!   consistent while agents keep inserting, and deep pages cost the same as the first.
//! - Every query runs in a read-only transaction with `SET LOCAL statement_timeout`
//!   ([`SENSOR_QUERY_TIMEOUT_MS`]); one slow query answers 504 `timeout` instead of holding a
//!   pooled connection (and other tenants' requests) for minutes.
//! - A bucket page aggregates a bounded window only: from its start (the cursor's bucket, else
//!   `from`, else the device's first reading) to at most `limit` buckets later. Rows before the
//!   cursor are filtered before aggregation, so no page re-aggregates the history behind it. A
//!   page whose window holds fewer than `limit` buckets still carries a `next_cursor` when
//!   readings follow (pointing at the next reading's bucket, so no page is empty).

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::http::{ApiError, ApiPath, ApiResult, Principal, decode_cursor, encode_cursor, pg_text};

/// Query string of `GET .../devices/{device_id}/sensor-data`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorQuery {
    pub metric: Option<String>,
    pub machine: Option<String>,
    /// Inclusive start (RFC 3339).
    pub from: Option<DateTime<Utc>>,
    /// Exclusive end (RFC 3339).
    pub to: Option<DateTime<Utc>>,
    /// Downsample into buckets of this many seconds (avg, min, max, count, last per bucket).
    pub bucket_s: Option<i64>,
    /// Which stored resolution answers: `raw`, `1m`, `1h` or `auto` (see [`plan`]).
    pub resolution: Option<Resolution>,
    #[serde(default = "default_limit")]
    pub limit: i64,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// The stored resolution a page is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Resolution {
    /// Choose from the requested range (no `bucket_s`) or bucket width (with `bucket_s`).
    #[serde(rename = "auto")]
    Auto,
    /// Raw readings (`sensor_data`).
    #[serde(rename = "raw")]
    Raw,
    /// The 1-minute rollup (`sensor_rollup_1m`).
    #[serde(rename = "1m")]
    Minute,
    /// The 1-hour rollup (`sensor_rollup_1h`).
    #[serde(rename = "1h")]
    Hour,
}

impl Resolution {
    fn width_s(self) -> i64 {
        match self {
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Auto | Self::Raw => 1,
        }
    }
}

/// `resolution=auto` without `bucket_s`: ranges up to this many seconds are answered with raw
/// readings ...
pub const AUTO_RAW_MAX_RANGE_S: i64 = 6 * 3600;
/// ... up to this many with 1-minute buckets, longer ones with 1-hour buckets.
pub const AUTO_MINUTE_MAX_RANGE_S: i64 = 7 * 86_400;

/// Chooses the source and the bucket width of a query: `(bucket_s, source)`; `bucket_s` is
/// `None` for raw rows. With `bucket_s`, the coarsest rollup whose width divides it and to
/// whose width `from` and `to` are aligned answers (else raw readings), so a rollup answer
/// always equals the raw aggregate.
pub fn plan(q: &SensorQuery) -> ApiResult<(Option<i64>, Resolution)> {
    let aligned = |r: Resolution| {
        let w = r.width_s();
        [q.from, q.to]
            .iter()
            .flatten()
            .all(|t| t.timestamp().rem_euclid(w) == 0 && t.timestamp_subsec_nanos() == 0)
    };
    match (q.bucket_s, q.resolution) {
        (None, None | Some(Resolution::Raw)) => Ok((None, Resolution::Raw)),
        (None, Some(Resolution::Auto)) => {
            let (Some(f), Some(t)) = (q.from, q.to) else {
                return Err(ApiError::validation(
                    "resolution",
                    "`auto` without `bucket_s` needs `from` and `to`",
                ));
            };
            let span = (t - f).num_seconds();
            Ok(if span <= AUTO_RAW_MAX_RANGE_S {
                (None, Resolution::Raw)
            } else if span <= AUTO_MINUTE_MAX_RANGE_S {
                (Some(60), Resolution::Minute)
            } else {
                (Some(3600), Resolution::Hour)
            })
        }
        (None, Some(r)) => Ok((Some(r.width_s()), r)),
        (Some(b), None | Some(Resolution::Auto)) => Ok((
            Some(b),
            [Resolution::Hour, Resolution::Minute]
                .into_iter()
                .find(|r| b % r.width_s() == 0 && aligned(*r))
                .unwrap_or(Resolution::Raw),
        )),
        (Some(b), Some(r)) => {
            if b % r.width_s() != 0 {
                return Err(ApiError::validation(
                    "bucket_s",
                    format!(
                        "must be a multiple of {} s for this resolution",
                        r.width_s()
                    ),
                ));
            }
            if !aligned(r) {
                return Err(ApiError::validation(
                    "from",
                    format!(
                        "`from` and `to` must be multiples of {} s for this resolution",
                        r.width_s()
                    ),
                ));
            }
            Ok((Some(b), r))
        }
    }
}

fn default_limit() -> i64 {
    1000
}

/// Longest a sensor-data query may run (`statement_timeout`, per statement).
pub const SENSOR_QUERY_TIMEOUT_MS: u64 = 5_000;

/// Maps a statement timeout (SQLSTATE 57014) to 504 `timeout`, anything else as usual.
pub(super) fn query_error(e: sqlx::Error) -> ApiError {
    if let sqlx::Error::Database(db) = &e
        && db.code().as_deref() == Some("57014")
    {
        return ApiError::Timeout(u128::from(SENSOR_QUERY_TIMEOUT_MS));
    }
    e.into()
}

/// A read-only transaction whose statements each stop after [`SENSOR_QUERY_TIMEOUT_MS`].
pub async fn bounded_tx(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // `set_config(..., true)` is `SET LOCAL` with a bind parameter: this transaction only.
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(SENSOR_QUERY_TIMEOUT_MS.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One stored reading.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct RawPoint {
    pub epoch: i64,
    pub seq: i64,
    pub machine: String,
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
    pub quality: i16,
}

/// One time bucket of one machine's metric.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct BucketPoint {
    pub bucket: DateTime<Utc>,
    pub machine: String,
    pub metric: String,
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub count: i64,
    /// The value of the bucket's latest reading.
    pub last: f64,
}

/// A page of results.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Points {
    Raw(Vec<RawPoint>),
    Buckets(Vec<BucketPoint>),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SensorPage {
    /// Which stored data answered: `raw`, `1m` or `1h`.
    pub resolution: Resolution,
    /// The bucket width of `points` (absent for raw readings).
    pub bucket_s: Option<i64>,
    pub points: Points,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Longest `machine` / `metric` filter; longer ones can match nothing.
const MAX_FILTER_BYTES: usize = 1024;

/// Start of the `bucket_s` bucket holding `t` (buckets are aligned to 2000-01-01 UTC, like
/// the query's `date_bin`).
fn bucket_start(t: DateTime<Utc>, bucket_s: i64) -> DateTime<Utc> {
    let origin = DateTime::<Utc>::from_timestamp(946_684_800, 0).unwrap_or(DateTime::UNIX_EPOCH);
    let d = (t - origin).num_seconds();
    let b = d.div_euclid(bucket_s.max(1)) * bucket_s.max(1);
    origin + chrono::TimeDelta::seconds(b)
}

/// The first reading (or rollup bucket, per `source`) at or after `after` (else the first at
/// all) within the query's filters.
async fn first_reading(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    org_id: Uuid,
    device_id: Uuid,
    q: &SensorQuery,
    source: Resolution,
    from: Option<DateTime<Utc>>,
    after: Option<DateTime<Utc>>,
) -> ApiResult<Option<DateTime<Utc>>> {
    let sql = match source {
        Resolution::Minute => {
            "SELECT min(bucket) FROM sensor_rollup_1m WHERE org_id = $1 AND device_id = $2 \
               AND ($3::text IS NULL OR metric = $3) AND ($4::text IS NULL OR machine = $4) \
               AND ($5::timestamptz IS NULL OR bucket >= $5) AND ($6::timestamptz IS NULL OR bucket < $6)"
        }
        Resolution::Hour => {
            "SELECT min(bucket) FROM sensor_rollup_1h WHERE org_id = $1 AND device_id = $2 \
               AND ($3::text IS NULL OR metric = $3) AND ($4::text IS NULL OR machine = $4) \
               AND ($5::timestamptz IS NULL OR bucket >= $5) AND ($6::timestamptz IS NULL OR bucket < $6)"
        }
        Resolution::Raw | Resolution::Auto => {
            "SELECT min(ts) FROM sensor_data WHERE org_id = $1 AND device_id = $2 \
               AND ($3::text IS NULL OR metric = $3) AND ($4::text IS NULL OR machine = $4) \
               AND ($5::timestamptz IS NULL OR ts >= $5) AND ($6::timestamptz IS NULL OR ts < $6)"
        }
    };
    sqlx::query_scalar(sql)
        .bind(org_id)
        .bind(device_id)
        .bind(&q.metric)
        .bind(&q.machine)
        .bind(after.or(from))
        .bind(q.to)
        .fetch_one(&mut **tx)
        .await
        .map_err(query_error)
}

/// Buckets of raw readings.
const BUCKETS_RAW: &str = "\
SELECT date_bin(make_interval(secs => $3), ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, \
       machine, metric, avg(value) AS avg, min(value) AS min, max(value) AS max, \
       count(*) AS count, (array_agg(value ORDER BY ts DESC))[1] AS last \
  FROM sensor_data \
 WHERE org_id = $1 AND device_id = $2 \
   AND ($4::text IS NULL OR metric = $4) AND ($5::text IS NULL OR machine = $5) \
   AND ts >= $6 AND ts < $7 \
 GROUP BY 1, 2, 3 \
HAVING ($8::timestamptz IS NULL OR \
        (date_bin(make_interval(secs => $3), ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), machine, metric) \
        > ($8, $9, $10)) \
 ORDER BY 1, 2, 3 LIMIT $11";

/// Buckets re-aggregated from a rollup table (same parameters as [`BUCKETS_RAW`]); a macro so
/// that each query stays one static string.
macro_rules! buckets_from_rollup {
    ($table:literal) => {
        concat!(
            "SELECT date_bin(make_interval(secs => $3), bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, \
                    machine, metric, sum(sum) / sum(count) AS avg, min(min) AS min, max(max) AS max, \
                    sum(count)::bigint AS count, (array_agg(last ORDER BY last_ts DESC))[1] AS last \
               FROM ",
            $table,
            " WHERE org_id = $1 AND device_id = $2 \
                AND ($4::text IS NULL OR metric = $4) AND ($5::text IS NULL OR machine = $5) \
                AND bucket >= $6 AND bucket < $7 \
              GROUP BY 1, 2, 3 \
             HAVING ($8::timestamptz IS NULL OR \
                     (date_bin(make_interval(secs => $3), bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), machine, metric) \
                     > ($8, $9, $10)) \
              ORDER BY 1, 2, 3 LIMIT $11"
        )
    };
}

/// Buckets re-aggregated from the 1-minute rollup.
const BUCKETS_1M: &str = buckets_from_rollup!("sensor_rollup_1m");

/// Buckets re-aggregated from the 1-hour rollup.
const BUCKETS_1H: &str = buckets_from_rollup!("sensor_rollup_1h");

/// Start of the organisation's visible raw data (its retention), if it has one. Partitions
/// are shared, so rows past an organisation's retention may still be stored until every
/// organisation's retention allows the drop: the API hides them meanwhile.
async fn retention_start(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    org_id: Uuid,
) -> ApiResult<Option<DateTime<Utc>>> {
    sqlx::query_scalar(
        "SELECT now() - make_interval(days => raw_retention_days) FROM telemetry_retention \
          WHERE org_id = $1",
    )
    .bind(org_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(query_error)
}

/// `GET /v1/organisations/{org_id}/devices/{device_id}/sensor-data`
pub async fn query(
    State(pool): State<sqlx::PgPool>,
    p: Principal,
    ApiPath((org_id, device_id)): ApiPath<(Uuid, Uuid)>,
    q: Result<Query<SensorQuery>, QueryRejection>,
) -> ApiResult<Json<SensorPage>> {
    let org_id = p.org_scope(org_id)?;
    let Query(q) =
        q.map_err(|e| ApiError::BadRequest(format!("invalid query string: {}", e.body_text())))?;
    if let Some(m) = &q.metric {
        pg_text("metric", m, MAX_FILTER_BYTES)?;
    }
    if let Some(m) = &q.machine {
        pg_text("machine", m, MAX_FILTER_BYTES)?;
    }
    if !(1..=10_000).contains(&q.limit) {
        return Err(ApiError::validation("limit", "must be between 1 and 10000"));
    }
    if let (Some(f), Some(t)) = (q.from, q.to)
        && f >= t
    {
        return Err(ApiError::validation("from", "must be before `to`"));
    }
    if let Some(b) = q.bucket_s
        && !(1..=31 * 86_400).contains(&b)
    {
        return Err(ApiError::validation(
            "bucket_s",
            "must be between 1 and 2678400 seconds",
        ));
    }
    let (bucket_s, source) = plan(&q)?;
    let exists: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM devices WHERE org_id = $1 AND id = $2")
            .bind(org_id)
            .bind(device_id)
            .fetch_optional(&pool)
            .await?;
    if exists.is_none() {
        return Err(ApiError::NotFound("device"));
    }
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let mut tx = bounded_tx(&pool).await.map_err(query_error)?;
    // Raw readings past the organisation's retention are hidden; rollups outlive them.
    let from = match source {
        Resolution::Raw | Resolution::Auto => {
            match (q.from, retention_start(&mut tx, org_id).await?) {
                (Some(f), Some(r)) => Some(f.max(r)),
                (f, r) => f.or(r),
            }
        }
        Resolution::Minute | Resolution::Hour => q.from,
    };
    match bucket_s {
        None => {
            let (cts, cep, cseq) = match &cursor {
                Some((ts, a, b)) => (
                    Some(*ts),
                    a.parse::<i64>()
                        .map_err(|_| ApiError::validation("cursor", "is not a raw-data cursor"))?,
                    b.parse::<i64>()
                        .map_err(|_| ApiError::validation("cursor", "is not a raw-data cursor"))?,
                ),
                None => (None, 0, 0),
            };
            let rows: Vec<RawPoint> = sqlx::query_as(
                "SELECT epoch, seq, machine, metric, ts, value, quality FROM sensor_data \
                 WHERE org_id = $1 AND device_id = $2 \
                   AND ($3::text IS NULL OR metric = $3) AND ($4::text IS NULL OR machine = $4) \
                   AND ($5::timestamptz IS NULL OR ts >= $5) AND ($6::timestamptz IS NULL OR ts < $6) \
                   AND ($7::timestamptz IS NULL OR (ts, epoch, seq) > ($7, $8, $9)) \
                 ORDER BY ts, epoch, seq LIMIT $10",
            )
            .bind(org_id)
            .bind(device_id)
            .bind(&q.metric)
            .bind(&q.machine)
            .bind(from)
            .bind(q.to)
            .bind(cts)
            .bind(cep)
            .bind(cseq)
            .bind(q.limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error)?;
            let next_cursor = (rows.len() as i64 == q.limit)
                .then(|| rows.last())
                .flatten()
                .map(|r| encode_cursor(r.ts, &r.epoch.to_string(), &r.seq.to_string()));
            Ok(Json(SensorPage {
                resolution: Resolution::Raw,
                bucket_s: None,
                points: Points::Raw(rows),
                next_cursor,
            }))
        }
        Some(bucket_s) => {
            let (cts, cmachine, cmetric) = match cursor {
                Some((ts, a, b)) => (Some(ts), a, b),
                None => (None, String::new(), String::new()),
            };
            // The window of this page: its start, then at most `limit` buckets.
            let start = match cts.or(from) {
                Some(t) => Some(t),
                None => first_reading(&mut tx, org_id, device_id, &q, source, from, None).await?,
            };
            let Some(start) = start else {
                return Ok(Json(SensorPage {
                    resolution: source,
                    bucket_s: Some(bucket_s),
                    points: Points::Buckets(Vec::new()),
                    next_cursor: None,
                }));
            };
            let window_end = start
                .checked_add_signed(chrono::TimeDelta::seconds(
                    bucket_s.saturating_mul(q.limit).saturating_add(bucket_s),
                ))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let end = q.to.map_or(window_end, |t| t.min(window_end));
            let sql = match source {
                Resolution::Minute => BUCKETS_1M,
                Resolution::Hour => BUCKETS_1H,
                Resolution::Raw | Resolution::Auto => BUCKETS_RAW,
            };
            let rows: Vec<BucketPoint> = sqlx::query_as(sql)
                .bind(org_id)
                .bind(device_id)
                .bind(bucket_s as f64)
                .bind(&q.metric)
                .bind(&q.machine)
                // Rows before the cursor's bucket cannot be in this page: filtered before
                // aggregation (the cursor is a bucket start, so `ts >= cursor` keeps its bucket).
                .bind(from.map_or(start, |f| f.max(start)))
                .bind(end)
                .bind(cts)
                .bind(&cmachine)
                .bind(&cmetric)
                .bind(q.limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(query_error)?;
            let next_cursor = if rows.len() as i64 == q.limit {
                rows.last()
                    .map(|r| encode_cursor(r.bucket, &r.machine, &r.metric))
            } else if end < q.to.unwrap_or(DateTime::<Utc>::MAX_UTC) {
                // The window ended before `to`: continue at the next reading's bucket.
                first_reading(&mut tx, org_id, device_id, &q, source, from, Some(end))
                    .await?
                    .map(|t| {
                        let b = bucket_start(t, bucket_s);
                        // Machine "" sorts first: the whole bucket is in the next page.
                        encode_cursor(b, "", "")
                    })
            } else {
                None
            };
            Ok(Json(SensorPage {
                resolution: source,
                bucket_s: Some(bucket_s),
                points: Points::Buckets(rows),
                next_cursor,
            }))
        }
    }
}
