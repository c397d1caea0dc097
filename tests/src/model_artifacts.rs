//! Direct writes to the model artifact tables, as an attacker with database access would make
//! them (tests of model signing): they bypass the API, so nothing is signed.

use sqlx::PgPool;
use uuid::Uuid;

/// Stores `bytes` as the artifact of `model` with the given digest and signature.
pub async fn insert_raw(
    pool: &PgPool,
    org: Uuid,
    model: Uuid,
    bytes: &[u8],
    sha256: &str,
    signature: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO model_artifacts (model_id, org_id, sha256, size_bytes, signature) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(model)
    .bind(org)
    .bind(sha256)
    .bind(bytes.len() as i64)
    .bind(signature)
    .execute(pool)
    .await
    .unwrap();
    write_chunks(pool, org, model, bytes).await;
}

/// Replaces the chunk rows of `model` with `bytes` (1 MiB per row).
async fn write_chunks(pool: &PgPool, org: Uuid, model: Uuid, bytes: &[u8]) {
    sqlx::query("DELETE FROM model_artifact_chunks WHERE org_id = $1 AND model_id = $2")
        .bind(org)
        .bind(model)
        .execute(pool)
        .await
        .unwrap();
    for (i, c) in bytes.chunks(1024 * 1024).enumerate() {
        sqlx::query(
            "INSERT INTO model_artifact_chunks (org_id, model_id, idx, bytes) VALUES ($1, $2, $3, $4)",
        )
        .bind(org)
        .bind(model)
        .bind(i as i32)
        .bind(c)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Swaps the stored bytes of `model`'s artifact for `bytes` and updates the digest columns
/// to match, keeping the signature.
pub async fn replace_bytes(pool: &PgPool, org: Uuid, model: Uuid, bytes: &[u8]) {
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    sqlx::query(
        "UPDATE model_artifacts SET sha256 = $3, size_bytes = $4 \
         WHERE org_id = $1 AND model_id = $2",
    )
    .bind(org)
    .bind(model)
    .bind(&sha)
    .bind(bytes.len() as i64)
    .execute(pool)
    .await
    .unwrap();
    write_chunks(pool, org, model, bytes).await;
    sqlx::query("UPDATE ai_models SET artifact_sha256 = $3 WHERE org_id = $1 AND id = $2")
        .bind(org)
        .bind(model)
        .bind(&sha)
        .execute(pool)
        .await
        .unwrap();
}
