//! The two row reads every org-scoped domain list/get endpoint makes, written once: a page of
//! rows (`$1` organisation, `$2` page size) and one row by id (`$1` organisation, `$2` id).
//!
//! Invariants: the organisation is always bound (`$1`), so a domain cannot forget the tenant
//! filter; the page size comes from [`super::list_limit`] (1 to 1000); a missing row is a 404
//! naming what was looked for, never a 500.

use axum::Json;
use sqlx::{FromRow, PgPool, postgres::PgRow};
use uuid::Uuid;

use super::{ApiError, ApiResult};

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
