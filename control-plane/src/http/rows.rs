//! The two row reads every org-scoped domain list/get endpoint makes, written once: a page of
//! rows (`$1` organisation, `$2` page size) and one row by id (`$1` organisation, `$2` id).
//!
//! Invariants: the organisation is always bound (`$1`), so a domain cannot forget the tenant
//! filter; the page size comes from [`super::list_limit`] (1 to 1000); a missing row is a 404
//! naming what was looked for, never a 500.

use axum::{
    Json,
    body::{Body, Bytes},
    http::{HeaderValue, header},
    response::{IntoResponse as _, Response},
};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgPool, postgres::PgRow};
use uuid::Uuid;

use super::{ApiError, ApiResult, pg_text};

/// Longest part of a cursor (a filter value it carries), in bytes.
const MAX_CURSOR_PART_BYTES: usize = 1024;
/// Longest cursor, in bytes.
const MAX_CURSOR_BYTES: usize = 4 * MAX_CURSOR_PART_BYTES;

/// `sql` with `$1` = `org` (`NULL`: every organisation, where the query allows it) and
/// `$2` = `limit`, as a JSON list of `T` made from the rows `R`.
pub async fn list_rows<R, T>(
    pool: &PgPool,
    sql: &'static str,
    org: Option<Uuid>,
    limit: i64,
) -> ApiResult<Json<Vec<T>>>
where
    R: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    T: From<R>,
{
    let rows: Vec<R> = sqlx::query_as(sql)
        .bind(org)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(Json(rows.into_iter().map(Into::into).collect()))
}

/// `sql` with `$1` = `org` and `$2` = `id`, as JSON `T` made from the row `R`; no row is
/// [`ApiError::NotFound`]`(what)`.
pub async fn get_row<R, T>(
    pool: &PgPool,
    sql: &'static str,
    org: Uuid,
    id: Uuid,
    what: &'static str,
) -> ApiResult<Json<T>>
where
    R: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    T: From<R>,
{
    sqlx::query_as::<_, R>(sql)
        .bind(org)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(|r| Json(r.into()))
        .ok_or(ApiError::NotFound(what))
}

/// The keyset pagination cursor: a timestamp and two text parts (shared by every paginated
/// list of this crate).
pub fn encode_cursor(ts: DateTime<Utc>, a: &str, b: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}|{a}|{b}", ts.to_rfc3339()))
}

/// Reads a cursor of [`encode_cursor`]; 400 `cursor` for anything else.
pub fn decode_cursor(c: &str) -> ApiResult<(DateTime<Utc>, String, String)> {
    let bad = || ApiError::validation("cursor", "is not a cursor returned by this API");
    pg_text("cursor", c, MAX_CURSOR_BYTES)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let s = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = s.splitn(3, '|');
    let ts = parts
        .next()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .ok_or_else(bad)?
        .with_timezone(&Utc);
    let a = parts.next().ok_or_else(bad)?;
    let b = parts.next().ok_or_else(bad)?;
    // A forged cursor could carry NUL into the keyset comparison.
    pg_text("cursor", a, MAX_CURSOR_PART_BYTES)?;
    pg_text("cursor", b, MAX_CURSOR_PART_BYTES)?;
    Ok((ts, a.to_owned(), b.to_owned()))
}

/// Position of a synced record in a `(ts, device_id, epoch, seq)` keyset: the cursor of
/// [`encode_record_cursor`].
pub type RecordCursor = (DateTime<Utc>, Uuid, i64, i64);

/// The keyset cursor after a synced record (predictions, model monitoring, ...).
pub fn encode_record_cursor(ts: DateTime<Utc>, device_id: Uuid, epoch: i64, seq: i64) -> String {
    encode_cursor(ts, &device_id.to_string(), &format!("{epoch}.{seq}"))
}

/// Reads a cursor of [`encode_record_cursor`]; 400 `cursor` "is not a `what` cursor" for
/// anything else. `None` (first page) gives `None`.
pub fn decode_record_cursor(c: Option<&str>, what: &str) -> ApiResult<Option<RecordCursor>> {
    let Some(c) = c else { return Ok(None) };
    let not_ours = || ApiError::validation("cursor", format!("is not a {what} cursor"));
    let (ts, dev, es) = decode_cursor(c)?;
    let dev: Uuid = dev.parse().map_err(|_| not_ours())?;
    let (e, s) = es.split_once('.').ok_or_else(not_ours)?;
    Ok(Some((
        ts,
        dev,
        e.parse::<i64>().map_err(|_| not_ours())?,
        s.parse::<i64>().map_err(|_| not_ours())?,
    )))
}

/// An immutable object stored as numbered chunk rows (model artifacts, agent releases), as a
/// streamed response: `sql` reads one chunk (`$1` organisation, `$2` object id, `$3` index,
/// one `bytes` column), so memory is one chunk whatever the object's size. The object is
/// immutable, so chunks read in separate statements form one consistent object; a chunk that
/// cannot be read (database down, organisation deleted meanwhile) ends the body with an error,
/// which the client sees as a cut transfer (the length and `x-kip-sha256` headers let it
/// notice). `what` names the object in the log.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per stored object kind, all named"
)]
pub fn chunked_download(
    pool: &PgPool,
    sql: &'static str,
    what: &'static str,
    org_id: Uuid,
    object_id: Uuid,
    content_type: &'static str,
    size_bytes: i64,
    sha256: &str,
) -> Response {
    let pool = pool.clone();
    let chunks = futures_util::stream::unfold(Some(0i32), move |next| {
        let pool = pool.clone();
        async move {
            let idx = next?;
            let row: Result<Option<Vec<u8>>, sqlx::Error> = sqlx::query_scalar(sql)
                .bind(org_id)
                .bind(object_id)
                .bind(idx)
                .fetch_optional(&pool)
                .await;
            match row {
                Ok(Some(b)) => Some((Ok(Bytes::from(b)), Some(idx + 1))),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(%org_id, object = what, id = %object_id, chunk = idx, error = %e, "{what} download cut");
                    Some((Err(std::io::Error::other(e)), None))
                }
            }
        }
    });
    let mut resp = (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(chunks),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(size_bytes));
    if let Ok(v) = HeaderValue::from_str(sha256) {
        resp.headers_mut().insert("x-kip-sha256", v);
    }
    resp
}
