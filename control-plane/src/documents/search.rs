//! Hybrid retrieval: nearest chunks by embedding (pgvector HNSW) and by full text (tsvector),
//! fused with reciprocal rank fusion (RRF).
//!
//! Invariants:
//! - Every statement on `documents`/`document_chunks` runs in a transaction opened by
//!   [`tenant_tx`]: the role is `kip_tenant` and `kip.org_id` is the caller's organisation for
//!   that transaction only (SET LOCAL), so row-level security, not the query text, decides
//!   which rows exist. A pooled connection never keeps another request's organisation.
//! - The vector query runs with `hnsw.iterative_scan = relaxed_order`: the HNSW scan continues
//!   past `ef_search` candidates until `k` rows of the organisation are found (bounded by
//!   `hnsw.max_scan_tuples`), so a small organisation beside a large one still gets k rows.
//!   Relaxed order is re-sorted by exact distance here.
//! - RRF score of a chunk: the sum over both lists of 1 / (60 + rank), rank 1-based.

use std::collections::HashMap;

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::embed::to_pgvector;

/// The RRF constant (Cormack et al.): damps the weight of the very first ranks.
const RRF_K: f64 = 60.0;

/// Opens a transaction in which row-level security shows only `org`'s documents.
pub async fn tenant_tx(
    pool: &PgPool,
    org: Uuid,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL ROLE kip_tenant")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('kip.org_id', $1, true)")
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One retrieved chunk.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Hit {
    pub chunk_id: Uuid,
    pub document_id: Uuid,
    pub title: String,
    pub ordinal: i32,
    pub char_start: i32,
    pub char_end: i32,
    pub page: Option<i32>,
    pub heading: Option<String>,
    pub content: String,
    /// RRF score (higher is better).
    #[sqlx(skip)]
    pub score: f64,
    /// 1-based rank in the vector list, if the chunk was in it.
    #[sqlx(skip)]
    pub vector_rank: Option<usize>,
    /// 1-based rank in the full-text list, if the chunk was in it.
    #[sqlx(skip)]
    pub text_rank: Option<usize>,
}

/// Search parameters.
#[derive(Debug, Clone, Copy)]
pub struct SearchParams {
    /// Chunks returned.
    pub k: usize,
    /// Candidates taken from each list before fusion.
    pub candidates: usize,
    /// `hnsw.ef_search` for the vector list.
    pub ef_search: u32,
}

/// The OR-query of a question's words for `to_tsquery`: letters and digits only (anything
/// else would be tsquery syntax), at most 32 distinct words.
pub fn tsquery_words(q: &str) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    let words: Vec<String> = q
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
        .filter(|w| seen.insert(w.clone()))
        .take(32)
        .collect();
    (!words.is_empty()).then(|| words.join(" | "))
}

/// The vector list: nearest by cosine distance through HNSW, re-sorted by exact distance.
const NEAREST_SQL: &str = "SELECT id FROM (SELECT id, embedding <=> $1::vector AS d \
     FROM document_chunks ORDER BY embedding <=> $1::vector LIMIT $2) s ORDER BY d";

/// The full-text list: chunks matching any word of the question, by `ts_rank_cd`.
const FULL_TEXT_SQL: &str = "WITH q AS (SELECT to_tsquery('german', $1) \
     || to_tsquery('english', $1) || to_tsquery('simple', $1) AS q) \
     SELECT c.id FROM document_chunks c, q WHERE c.tsv @@ q.q \
     ORDER BY ts_rank_cd(c.tsv, q.q) DESC, c.id LIMIT $2";

/// `EXPLAIN (ANALYZE, BUFFERS)` of both lists as [`hybrid`] runs them, in an open tenant
/// transaction (for benchmarks and operators: where the time of a slow search goes).
pub async fn explain(
    tx: &mut Transaction<'static, Postgres>,
    question: &str,
    embedding: &[f32],
    p: SearchParams,
) -> Result<Vec<(&'static str, String)>, sqlx::Error> {
    set_vector_params(tx, p.ef_search, true).await?;
    let lines = |rows: Vec<String>| rows.join("\n");
    let vector: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, BUFFERS) {NEAREST_SQL}")))
            .bind(to_pgvector(embedding))
            .bind(i64::try_from(p.candidates).unwrap_or(i64::MAX))
            .fetch_all(&mut **tx)
            .await?;
    let mut out = vec![("vector", lines(vector))];
    if let Some(words) = tsquery_words(question) {
        let text: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, BUFFERS) {FULL_TEXT_SQL}"
        )))
        .bind(words)
        .bind(i64::try_from(p.candidates).unwrap_or(i64::MAX))
        .fetch_all(&mut **tx)
        .await?;
        out.push(("full-text", lines(text)));
    }
    Ok(out)
}

async fn set_vector_params(
    tx: &mut Transaction<'static, Postgres>,
    ef_search: u32,
    iterative: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('hnsw.ef_search', $1, true), \
                set_config('hnsw.iterative_scan', $2, true)",
    )
    .bind(ef_search.to_string())
    .bind(if iterative { "relaxed_order" } else { "off" })
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The vector list alone (ids in distance order), in an open tenant transaction.
pub async fn nearest(
    tx: &mut Transaction<'static, Postgres>,
    embedding: &[f32],
    limit: usize,
    ef_search: u32,
    iterative: bool,
) -> Result<Vec<Uuid>, sqlx::Error> {
    set_vector_params(tx, ef_search, iterative).await?;
    sqlx::query_scalar(NEAREST_SQL)
    .bind(to_pgvector(embedding))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await
}

/// The full-text list alone (ids by `ts_rank_cd`), in an open tenant transaction.
pub async fn full_text(
    tx: &mut Transaction<'static, Postgres>,
    question: &str,
    limit: usize,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let Some(words) = tsquery_words(question) else {
        return Ok(Vec::new());
    };
    sqlx::query_scalar(FULL_TEXT_SQL)
    .bind(words)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await
}

/// Hybrid search over `org`'s chunks.
pub async fn hybrid(
    pool: &PgPool,
    org: Uuid,
    question: &str,
    embedding: &[f32],
    p: SearchParams,
) -> Result<Vec<Hit>, sqlx::Error> {
    let mut tx = tenant_tx(pool, org).await?;
    let vector = nearest(&mut tx, embedding, p.candidates, p.ef_search, true).await?;
    let text = full_text(&mut tx, question, p.candidates).await?;
    let fused = fuse(&vector, &text, p.k);
    let ids: Vec<Uuid> = fused.iter().map(|f| f.0).collect();
    let rows: Vec<Hit> = sqlx::query_as(
        "SELECT c.id AS chunk_id, c.document_id, d.title, c.ordinal, c.char_start, c.char_end, \
         c.page, c.heading, c.content \
         FROM document_chunks c JOIN documents d ON d.org_id = c.org_id AND d.id = c.document_id \
         WHERE c.id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut by_id: HashMap<Uuid, Hit> = rows.into_iter().map(|h| (h.chunk_id, h)).collect();
    Ok(fused
        .into_iter()
        .filter_map(|(id, score, vr, tr)| {
            by_id.remove(&id).map(|mut h| {
                h.score = score;
                h.vector_rank = vr;
                h.text_rank = tr;
                h
            })
        })
        .collect())
}

/// Reciprocal rank fusion of two ranked id lists: the top `k` as (id, score, vector rank,
/// text rank), best first; ties broken by id so the order is deterministic.
pub fn fuse(
    vector: &[Uuid],
    text: &[Uuid],
    k: usize,
) -> Vec<(Uuid, f64, Option<usize>, Option<usize>)> {
    let mut acc: HashMap<Uuid, (f64, Option<usize>, Option<usize>)> = HashMap::new();
    for (i, id) in vector.iter().enumerate() {
        let e = acc.entry(*id).or_default();
        e.0 += 1.0 / (RRF_K + (i + 1) as f64);
        e.1 = Some(i + 1);
    }
    for (i, id) in text.iter().enumerate() {
        let e = acc.entry(*id).or_default();
        e.0 += 1.0 / (RRF_K + (i + 1) as f64);
        e.2 = Some(i + 1);
    }
    let mut out: Vec<_> = acc
        .into_iter()
        .map(|(id, (s, v, t))| (id, s, v, t))
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out.truncate(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement_and_is_deterministic() {
        let [a, b, c, d] = [1u128, 2, 3, 4].map(Uuid::from_u128);
        let out = fuse(&[a, b, c], &[c, d], 3);
        // c is in both lists: first, although it is third by vector.
        assert_eq!(out[0].0, c);
        assert_eq!(out[0].2, Some(3));
        assert_eq!(out[0].3, Some(1));
        assert_eq!(out.len(), 3);
        assert_eq!(out, fuse(&[a, b, c], &[c, d], 3));
    }

    #[test]
    fn tsquery_words_are_sanitised() {
        assert_eq!(
            tsquery_words("Why is 'spindle' & temp!").as_deref(),
            Some("why | is | spindle | temp")
        );
        assert_eq!(tsquery_words("!! ' & |"), None);
    }
}
