//! Documents domain: per-organisation manuals, procedures and reports (Markdown, plain text,
//! PDF), chunked, embedded locally and stored in PostgreSQL with pgvector, and hybrid
//! retrieval over them ([`search`]) for grounded answers ([`grounded`]).
//!
//! Invariants:
//! - Tenant isolation is enforced by the database: every statement runs in a
//!   [`search::tenant_tx`] transaction (role `kip_tenant`, `kip.org_id` set locally), and the
//!   row-level security policies of migration 0100 admit only that organisation's rows. The
//!   handlers also check the organisation of the key ([`Principal::org_scope`]).
//! - A document is stored whole or not at all: the document row and all its chunks are
//!   inserted in one transaction, after extraction and embedding succeeded.
//! - Deleting a document deletes its chunks in the same statement (foreign key cascade), so the
//!   next retrieval cannot return them. Grounded answers are cached only under a key that
//!   includes the retrieved passages, so a cached answer never outlives a deleted passage.
//! - Embedding runs on the blocking pool, at most `documents.max_concurrent_embeddings` at a
//!   time; beyond that, uploads wait (bounded by the request timeout).
//! - Without the embedding model the control plane still starts; these routes and the
//!   grounded mode answer 503 naming what is missing.

pub mod embed;
pub mod extract;
pub mod grounded;
pub mod search;

use std::{path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRef, Query, State},
    http::{HeaderMap, StatusCode, header},
    routing::get,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use self::{
    embed::{EmbedError, Embedder},
    extract::{ExtractError, MediaType},
    search::{Hit, SearchParams},
};
use crate::{
    config_error::ConfigError,
    http::{ApiError, ApiPath, ApiResult, KeyCache, Principal},
};

/// `[documents]` as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocuments {
    /// Directory with `model.onnx` and `tokenizer.json` (default: `KIP_EMBEDDING_MODEL_DIR`,
    /// else `target/embedding`, where `scripts/lib.sh` installs them).
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// ONNX Runtime library (default: `ORT_DYLIB_PATH`, else `target/ort/lib/`).
    #[serde(default)]
    pub ort_library: Option<PathBuf>,
    /// Largest upload (default 16 MiB, at most 64 MiB).
    #[serde(default)]
    pub max_document_bytes: Option<u64>,
    /// Longest chunk in characters (default 800; 200..=4000).
    #[serde(default)]
    pub chunk_chars: Option<u64>,
    /// Most chunks of one document (default 5000).
    #[serde(default)]
    pub max_chunks_per_document: Option<u64>,
    /// Uploads embedding at the same time (default 1; 1..=16).
    #[serde(default)]
    pub max_concurrent_embeddings: Option<u64>,
    /// `hnsw.ef_search` of retrieval (default 100; 10..=1000).
    #[serde(default)]
    pub hnsw_ef_search: Option<u64>,
    /// Rows of one full-text match that are ranked (default 2000; 100..=100000): bounds the
    /// full-text list's cost when a question's words match most of a large organisation.
    #[serde(default)]
    pub text_scan_rows: Option<u64>,
    /// Organisations with fewer chunks are searched exactly (no HNSW) (default 10000;
    /// 0..=1000000): a small organisation beside a large one always gets its k nearest.
    #[serde(default)]
    pub exact_search_below_chunks: Option<u64>,
}

/// Validated `[documents]`.
#[derive(Debug, Clone)]
pub struct DocumentsConfig {
    pub model_dir: PathBuf,
    pub ort_library: Option<PathBuf>,
    pub max_document_bytes: usize,
    pub chunk_chars: usize,
    pub max_chunks_per_document: usize,
    pub max_concurrent_embeddings: usize,
    pub hnsw_ef_search: u32,
    pub text_scan_rows: usize,
    pub exact_search_below_chunks: usize,
}

impl Default for DocumentsConfig {
    fn default() -> Self {
        // The defaults pass validation by construction.
        Self {
            model_dir: PathBuf::from("target/embedding"),
            ort_library: None,
            max_document_bytes: 16 * 1024 * 1024,
            chunk_chars: 800,
            max_chunks_per_document: 5000,
            max_concurrent_embeddings: 1,
            hnsw_ef_search: 100,
            text_scan_rows: 2000,
            exact_search_below_chunks: 10_000,
        }
    }
}

impl RawDocuments {
    /// Applies `KIP_EMBEDDING_MODEL_DIR` (read through `env`) when no `model_dir` is set.
    pub fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("KIP_EMBEDDING_MODEL_DIR").filter(|v| !v.trim().is_empty()) {
            self.model_dir = Some(v.into());
        }
    }

    /// Checks the section.
    pub fn validate(self) -> Result<DocumentsConfig, ConfigError> {
        let d = DocumentsConfig::default();
        let range = |field: &'static str, v: Option<u64>, lo: u64, hi: u64, def: u64| {
            let v = v.unwrap_or(def);
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(ConfigError::Invalid {
                    field,
                    message: format!("must be between {lo} and {hi}, got {v}"),
                })
            }
        };
        let to = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(DocumentsConfig {
            model_dir: self.model_dir.unwrap_or(d.model_dir),
            ort_library: self.ort_library,
            max_document_bytes: to(range(
                "documents.max_document_bytes",
                self.max_document_bytes,
                1024,
                64 * 1024 * 1024,
                16 * 1024 * 1024,
            )?),
            chunk_chars: to(range(
                "documents.chunk_chars",
                self.chunk_chars,
                200,
                4000,
                800,
            )?),
            max_chunks_per_document: to(range(
                "documents.max_chunks_per_document",
                self.max_chunks_per_document,
                1,
                100_000,
                5000,
            )?),
            max_concurrent_embeddings: to(range(
                "documents.max_concurrent_embeddings",
                self.max_concurrent_embeddings,
                1,
                16,
                1,
            )?),
            hnsw_ef_search: u32::try_from(range(
                "documents.hnsw_ef_search",
                self.hnsw_ef_search,
                10,
                1000,
                100,
            )?)
            .unwrap_or(100),
            text_scan_rows: to(range(
                "documents.text_scan_rows",
                self.text_scan_rows,
                100,
                100_000,
                2000,
            )?),
            exact_search_below_chunks: to(range(
                "documents.exact_search_below_chunks",
                self.exact_search_below_chunks,
                0,
                1_000_000,
                10_000,
            )?),
        })
    }
}

/// What can go wrong in this domain.
#[derive(Debug, thiserror::Error)]
pub enum DocumentsError {
    #[error("document retrieval is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the embedding worker stopped: {0}")]
    Worker(String),
}

impl From<DocumentsError> for ApiError {
    fn from(e: DocumentsError) -> Self {
        match e {
            DocumentsError::Unavailable(_) => ApiError::Unavailable(
                "document retrieval (embedding model not loaded; see the control plane log)",
            ),
            DocumentsError::Extract(e) => ApiError::validation("body", e.to_string()),
            DocumentsError::Db(e) => e.into(),
            e @ (DocumentsError::Embed(_) | DocumentsError::Worker(_)) => ApiError::internal(e),
        }
    }
}

/// The domain's state: the configuration and the embedding model.
#[derive(Debug)]
pub struct Documents {
    cfg: DocumentsConfig,
    embedder: Result<Arc<Embedder>, String>,
    permits: tokio::sync::Semaphore,
}

impl Documents {
    /// Loads the embedding model; without it the domain is off (logged, 503 on use).
    pub fn new(mut cfg: DocumentsConfig) -> Self {
        // The default directory is relative to the working directory; a binary started from
        // elsewhere finds the model beside its own target/ directory.
        if cfg.model_dir.is_relative()
            && !cfg.model_dir.is_dir()
            && let Some(beside) = std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.join("embedding")))
                .filter(|d| d.is_dir())
        {
            cfg.model_dir = beside;
        }
        let embedder = match Embedder::load(&cfg.model_dir, cfg.ort_library.as_deref()) {
            Ok(e) => {
                tracing::info!(model = embed::MODEL_ID, dir = %cfg.model_dir.display(), "embedding model loaded");
                Ok(Arc::new(e))
            }
            Err(e) => {
                tracing::warn!(error = %e, "document upload and retrieval are off");
                Err(e.to_string())
            }
        };
        Self {
            permits: tokio::sync::Semaphore::new(cfg.max_concurrent_embeddings),
            cfg,
            embedder,
        }
    }

    pub fn config(&self) -> &DocumentsConfig {
        &self.cfg
    }

    fn embedder(&self) -> Result<Arc<Embedder>, DocumentsError> {
        self.embedder.clone().map_err(DocumentsError::Unavailable)
    }

    /// Embeds `texts` on the blocking pool.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, DocumentsError> {
        let e = self.embedder()?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| DocumentsError::Worker(e.to_string()))?;
        tokio::task::spawn_blocking(move || e.embed(&texts))
            .await
            .map_err(|e| DocumentsError::Worker(e.to_string()))?
            .map_err(DocumentsError::from)
    }

    /// The `k` best chunks of `org` for `question` (hybrid retrieval).
    pub async fn search(
        &self,
        pool: &PgPool,
        org: Uuid,
        question: &str,
        k: usize,
    ) -> Result<Vec<Hit>, DocumentsError> {
        let v = self
            .embed(vec![question.to_owned()])
            .await?
            .pop()
            .unwrap_or_default();
        Ok(search::hybrid(
            pool,
            org,
            question,
            &v,
            SearchParams {
                k,
                candidates: (k * 4).max(20),
                ef_search: self.cfg.hnsw_ef_search,
                text_scan_rows: self.cfg.text_scan_rows,
                exact_below_chunks: self.cfg.exact_search_below_chunks,
            },
        )
        .await?)
    }
}

/// The documents routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    Arc<Documents>: FromRef<S>,
{
    Router::new()
        .route(
            "/organisations/{org_id}/documents",
            get(list)
                .post(upload)
                // The configured document limit applies instead of the admin body limit.
                .layer(DefaultBodyLimit::max(64 * 1024 * 1024)),
        )
        .route(
            "/organisations/{org_id}/documents/search",
            get(search_route),
        )
        .route(
            "/organisations/{org_id}/documents/{document_id}",
            get(get_one).delete(delete),
        )
}

/// A stored document.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Document {
    pub id: Uuid,
    pub org_id: Uuid,
    pub title: String,
    pub media_type: String,
    pub language: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub chunk_count: i32,
    pub embedding_model: String,
    pub created_at: DateTime<Utc>,
}

const DOC_COLS: &str = "id, org_id, title, media_type, language::text AS language, size_bytes, \
                        sha256, chunk_count, embedding_model, created_at";

/// Query of `POST .../documents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    pub title: String,
    /// `de`/`german`, `en`/`english`, or `auto` (default: detected).
    #[serde(default)]
    pub language: Option<String>,
}

fn language_config(lang: Option<&str>, text: &str) -> ApiResult<&'static str> {
    match lang.map(str::to_ascii_lowercase).as_deref() {
        None | Some("auto") => Ok(extract::detect_language(text)),
        Some("de" | "german" | "deutsch") => Ok("german"),
        Some("en" | "english") => Ok("english"),
        Some("simple" | "other") => Ok("simple"),
        Some(other) => Err(ApiError::validation(
            "language",
            format!("unknown language {other:?}: use de, en, simple or auto"),
        )),
    }
}

/// 404 unless `org` exists (a platform key may name any organisation id).
async fn org_exists(pool: &PgPool, org: Uuid) -> ApiResult<()> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM organisations WHERE id = $1")
        .bind(org)
        .fetch_optional(pool)
        .await?;
    found.map(|_| ()).ok_or(ApiError::NotFound("organisation"))
}

/// A chunk id from (document id, ordinal): stable across re-chunking of the same document.
pub fn chunk_id(document_id: Uuid, ordinal: usize) -> Uuid {
    let mut h = Sha256::new();
    h.update(document_id.as_bytes());
    h.update((ordinal as u64).to_be_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid()
}

async fn upload(
    State(pool): State<PgPool>,
    State(docs): State<Arc<Documents>>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    params: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<Document>)> {
    let org_id = p.org_scope(org_id)?;
    org_exists(&pool, org_id).await?;
    let Query(params) =
        params.map_err(|r| ApiError::BadRequest(format!("invalid query: {}", r.body_text())))?;
    let limit = docs.cfg.max_document_bytes;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge { limit_bytes: limit }
        } else {
            ApiError::BadRequest(r.body_text())
        }
    })?;
    if body.len() > limit {
        return Err(ApiError::PayloadTooLarge { limit_bytes: limit });
    }
    let title = params.title.trim();
    if title.is_empty() || title.chars().count() > 200 || title.contains('\0') {
        return Err(ApiError::validation(
            "title",
            "must be 1 to 200 characters, without NUL",
        ));
    }
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(MediaType::parse)
        .ok_or_else(|| {
            ApiError::validation(
                "content-type",
                "must be text/markdown, text/plain or application/pdf",
            )
        })?;
    // Refuse before parsing anything when the model is not loaded.
    let doc = ingest(
        &pool,
        &docs,
        org_id,
        title,
        media,
        params.language.as_deref(),
        body,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(doc)))
}

/// Extracts, chunks, embeds and stores one document of `org_id` in a row-level-security
/// transaction: the path of `POST .../documents`, shared with the retrieval evaluation
/// (`benches/retrieval_eval.rs`) so it measures what uploads store.
pub async fn ingest(
    pool: &PgPool,
    docs: &Documents,
    org_id: Uuid,
    title: &str,
    media: MediaType,
    language: Option<&str>,
    body: Bytes,
) -> ApiResult<Document> {
    docs.embedder()?;
    let (chunk_chars, max_chunks) = (docs.cfg.chunk_chars, docs.cfg.max_chunks_per_document);
    let raw = body.clone();
    let chunks = tokio::task::spawn_blocking(move || {
        let text = extract::extract(media, &raw)?;
        extract::chunk(&text, media == MediaType::Markdown, chunk_chars, max_chunks)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::validation("body", e.to_string()))?;
    // NUL cannot be stored in text columns; PDFs sometimes carry it.
    let chunks: Vec<extract::Chunk> = chunks
        .into_iter()
        .map(|mut c| {
            c.content = c.content.replace('\0', "");
            c
        })
        .collect();
    let sample: String = chunks
        .iter()
        .flat_map(|c| c.content.chars().take(400))
        .take(20_000)
        .collect();
    let language = language_config(language, &sample)?;
    // The heading gives a passage its context in the embedding (not stored in content).
    let texts: Vec<String> = chunks
        .iter()
        .map(|c| match &c.heading {
            Some(h) => format!("{title} — {h}\n{}", c.content),
            None => format!("{title}\n{}", c.content),
        })
        .collect();
    let vectors = docs.embed(texts).await?;
    let id = Uuid::new_v4();
    let sha256 = hex::encode(Sha256::digest(&body));
    let mut tx = search::tenant_tx(pool, org_id).await?;
    let doc: Document = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO documents (id, org_id, title, media_type, language, size_bytes, sha256, \
         chunk_count, embedding_model) VALUES ($1, $2, $3, $4, $5::regconfig, $6, $7, $8, $9) \
         RETURNING {DOC_COLS}"
    )))
    .bind(id)
    .bind(org_id)
    .bind(title)
    .bind(media.as_str())
    .bind(language)
    .bind(i64::try_from(body.len()).unwrap_or(i64::MAX))
    .bind(&sha256)
    .bind(i32::try_from(chunks.len()).unwrap_or(i32::MAX))
    .bind(embed::MODEL_ID)
    .fetch_one(&mut *tx)
    .await?;
    let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    sqlx::query(
        "INSERT INTO document_chunks (id, org_id, document_id, ordinal, char_start, char_end, \
         page, heading, content, language, embedding) \
         SELECT t.id, $1, $2, t.ordinal, t.cs, t.ce, t.page, t.heading, t.content, $3::regconfig, \
                t.emb::vector \
         FROM unnest($4::uuid[], $5::int[], $6::int[], $7::int[], $8::int[], $9::text[], \
                     $10::text[], $11::text[]) AS t(id, ordinal, cs, ce, page, heading, content, emb)",
    )
    .bind(org_id)
    .bind(id)
    .bind(language)
    .bind(chunks.iter().map(|c| chunk_id(id, c.ordinal)).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| n(c.ordinal)).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| n(c.char_start)).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| n(c.char_end)).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| c.page.map(n)).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| c.heading.clone()).collect::<Vec<_>>())
    .bind(chunks.iter().map(|c| c.content.clone()).collect::<Vec<_>>())
    .bind(
        vectors
            .iter()
            .map(|v| embed::to_pgvector(v))
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(%org_id, document_id = %id, chunks = chunks.len(), "document stored");
    Ok(doc)
}

async fn list(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<Document>>> {
    let org_id = p.org_scope(org_id)?;
    org_exists(&pool, org_id).await?;
    let mut tx = search::tenant_tx(&pool, org_id).await?;
    let docs: Vec<Document> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DOC_COLS} FROM documents ORDER BY created_at, id LIMIT 10000"
    )))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(docs))
}

async fn get_one(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, document_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Document>> {
    let org_id = p.org_scope(org_id)?;
    let mut tx = search::tenant_tx(&pool, org_id).await?;
    let doc: Option<Document> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {DOC_COLS} FROM documents WHERE id = $1"
    )))
    .bind(document_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    doc.map(Json).ok_or(ApiError::NotFound("document"))
}

async fn delete(
    State(pool): State<PgPool>,
    p: Principal,
    ApiPath((org_id, document_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let org_id = p.org_scope(org_id)?;
    let mut tx = search::tenant_tx(&pool, org_id).await?;
    let n = sqlx::query("DELETE FROM documents WHERE id = $1")
        .bind(document_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    if n == 0 {
        return Err(ApiError::NotFound("document"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET .../documents/search`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    pub q: String,
    #[serde(default)]
    pub k: Option<u32>,
}

async fn search_route(
    State(pool): State<PgPool>,
    State(docs): State<Arc<Documents>>,
    p: Principal,
    ApiPath(org_id): ApiPath<Uuid>,
    q: Result<Query<SearchQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Hit>>> {
    let org_id = p.org_scope(org_id)?;
    org_exists(&pool, org_id).await?;
    let Query(q) =
        q.map_err(|r| ApiError::BadRequest(format!("invalid query: {}", r.body_text())))?;
    let k = q.k.unwrap_or(5);
    if !(1..=50).contains(&k) {
        return Err(ApiError::validation("k", "must be between 1 and 50"));
    }
    let text = q.q.trim();
    // 500 characters: even fully percent-encoded 4-byte characters (12 bytes each) stay under
    // the listener's 8 KiB request-target limit, so a valid query never meets a 414.
    if text.is_empty() || text.chars().count() > MAX_SEARCH_QUERY_CHARS || text.contains('\0') {
        return Err(ApiError::validation(
            "q",
            "must be 1 to 500 characters, without NUL",
        ));
    }
    Ok(Json(docs.search(&pool, org_id, text, k as usize).await?))
}

/// Longest search query, in characters (see [`search_route`]).
const MAX_SEARCH_QUERY_CHARS: usize = 500;
