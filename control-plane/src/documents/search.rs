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
    // Custom plans only: the organisation filter (row-level security) is not a parameter, so
    // a cached generic plan made for a large organisation (GIN or sequential scan) would be
    // reused for a tiny one, which needs the organisation index.
    sqlx::query(
        "SELECT set_config('kip.org_id', $1, true), \
                set_config('plan_cache_mode', 'force_custom_plan', true)",
    )
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
    /// Rows of one full-text match that are ranked (the rest are not read).
    pub text_scan_rows: usize,
    /// Below this many chunks the organisation is searched exactly, without HNSW.
    pub exact_below_chunks: usize,
}

impl SearchParams {
    /// The parameters of the platform's defaults for `k` results (benchmarks, tests).
    pub fn for_k(k: usize) -> Self {
        Self {
            k,
            candidates: (k * 4).max(20),
            ef_search: 100,
            text_scan_rows: 2000,
            exact_below_chunks: 10_000,
        }
    }
}

/// The vector list: nearest by cosine distance through HNSW, re-sorted by exact distance.
const NEAREST_SQL: &str = "SELECT id FROM (SELECT id, embedding <=> $1::vector AS d \
     FROM document_chunks ORDER BY embedding <=> $1::vector LIMIT $2) s ORDER BY d";

/// The question's words that are stop words in neither English nor German (`$1`), joined by
/// `$2` (`&` for "all words", `|` for "any word"); NULL when none is left.
const TEXT_QUERY_SQL: &str = "SELECT string_agg(w, $2) FROM unnest($1::text[]) AS w \
     WHERE length(to_tsvector('english', w)) > 0 AND length(to_tsvector('german', w)) > 0";

/// The full-text list, one tier: the words `$1` matched in the German, English and unstemmed
/// forms; at most `$2` matching rows are read and ranked by `ts_rank_cd` (a question's common
/// words can match most of a large organisation, and ranking every match reads each row's
/// tsvector: 5 s at 100k chunks); the best `$3`. The tsquery is an expression of the
/// parameter (not a CTE), so the GIN index applies.
const FULL_TEXT_SQL: &str = "SELECT m.id FROM (SELECT c.id, c.tsv FROM document_chunks c \
     WHERE c.tsv @@ (to_tsquery('german', $1) || to_tsquery('english', $1) \
     || to_tsquery('simple', $1)) LIMIT $2) m \
     ORDER BY ts_rank_cd(m.tsv, to_tsquery('german', $1) || to_tsquery('english', $1) \
     || to_tsquery('simple', $1)) DESC, m.id LIMIT $3";

/// The vector list, exact: every chunk of the organisation by distance (the CTE keeps the
/// planner off HNSW), for organisations below `exact_below_chunks`.
const EXACT_SQL: &str = "WITH c AS MATERIALIZED (SELECT id, embedding <=> $1::vector AS d \
     FROM document_chunks) SELECT id FROM c ORDER BY d, id LIMIT $2";

/// Whether the tenant transaction's organisation has fewer than `n` chunks (reads at most
/// `n` index entries).
async fn fewer_chunks_than(
    tx: &mut Transaction<'static, Postgres>,
    n: usize,
) -> Result<bool, sqlx::Error> {
    if n == 0 {
        return Ok(false);
    }
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    sqlx::query_scalar("SELECT count(*) < $1 FROM (SELECT 1 FROM document_chunks LIMIT $1) s")
        .bind(n)
        .fetch_one(&mut **tx)
        .await
}

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
    let exact = fewer_chunks_than(tx, p.exact_below_chunks).await?;
    let (leg, sql) = if exact {
        ("vector (exact)", EXACT_SQL)
    } else {
        ("vector (HNSW)", NEAREST_SQL)
    };
    let vector: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, BUFFERS) {sql}"
    )))
    .bind(to_pgvector(embedding))
    .bind(i64::try_from(p.candidates).unwrap_or(i64::MAX))
    .fetch_all(&mut **tx)
    .await?;
    let mut out = vec![(leg, lines(vector))];
    let words = text_words(question);
    if !words.is_empty() {
        for (tier, op) in [
            ("full-text, all words", " & "),
            ("full-text, any word", " | "),
        ] {
            let q: Option<String> = sqlx::query_scalar(TEXT_QUERY_SQL)
                .bind(&words)
                .bind(op)
                .fetch_one(&mut **tx)
                .await?;
            let Some(q) = q else { break };
            let text: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "EXPLAIN (ANALYZE, BUFFERS) {FULL_TEXT_SQL}"
            )))
            .bind(q)
            .bind(i64::try_from(p.text_scan_rows).unwrap_or(i64::MAX))
            .bind(i64::try_from(p.candidates).unwrap_or(i64::MAX))
            .fetch_all(&mut **tx)
            .await?;
            out.push((tier, lines(text)));
        }
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

/// The question's distinct words for the full-text list (letters and digits, at most 32).
fn text_words(q: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    q.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
        .filter(|w| seen.insert(w.clone()))
        .take(32)
        .collect()
}

/// The full-text list alone (ids by `ts_rank_cd`), in an open tenant transaction: chunks
/// holding all the question's words first, then (if fewer than `limit`) those holding any;
/// each tier reads at most `scan_rows` matching rows.
pub async fn full_text(
    tx: &mut Transaction<'static, Postgres>,
    question: &str,
    limit: usize,
    scan_rows: usize,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let words = text_words(question);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    let lim = i64::try_from(limit).unwrap_or(i64::MAX);
    let scan = i64::try_from(scan_rows).unwrap_or(i64::MAX);
    let mut ids: Vec<Uuid> = Vec::new();
    for op in [" & ", " | "] {
        if ids.len() >= limit {
            break;
        }
        let q: Option<String> = sqlx::query_scalar(TEXT_QUERY_SQL)
            .bind(&words)
            .bind(op)
            .fetch_one(&mut **tx)
            .await?;
        let Some(q) = q else { break };
        let tier: Vec<Uuid> = sqlx::query_scalar(FULL_TEXT_SQL)
            .bind(q)
            .bind(scan)
            .bind(lim)
            .fetch_all(&mut **tx)
            .await?;
        for id in tier {
            if ids.len() >= limit {
                break;
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    Ok(ids)
}

/// The vector list as [`hybrid`] builds it: exact below `exact_below_chunks` chunks, else
/// HNSW with iterative scan.
pub async fn vector_list(
    tx: &mut Transaction<'static, Postgres>,
    embedding: &[f32],
    p: SearchParams,
) -> Result<Vec<Uuid>, sqlx::Error> {
    if fewer_chunks_than(tx, p.exact_below_chunks).await? {
        return sqlx::query_scalar(EXACT_SQL)
            .bind(to_pgvector(embedding))
            .bind(i64::try_from(p.candidates).unwrap_or(i64::MAX))
            .fetch_all(&mut **tx)
            .await;
    }
    nearest(tx, embedding, p.candidates, p.ef_search, true).await
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
    let vector = vector_list(&mut tx, embedding, p).await?;
    let text = full_text(&mut tx, question, p.candidates, p.text_scan_rows).await?;
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
    fn text_words_are_sanitised() {
        assert_eq!(
            text_words("Why is 'spindle' & temp! Spindle"),
            ["why", "is", "spindle", "temp"]
        );
        assert!(text_words("!! ' & |").is_empty());
    }
}
