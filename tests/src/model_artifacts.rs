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
        "INSERT INTO model_artifacts (model_id, org_id, bytes, sha256, size_bytes, signature) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(model)
    .bind(org)
    .bind(bytes)
    .bind(sha256)
    .bind(bytes.len() as i64)
    .bind(signature)
    .execute(pool)
    .await
    .unwrap();
}

/// Swaps the stored bytes of `model`'s artifact for `bytes` and updates the digest columns
/// to match, keeping the signature.
pub async fn replace_bytes(pool: &PgPool, org: Uuid, model: Uuid, bytes: &[u8]) {
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    sqlx::query(
        "UPDATE model_artifacts SET bytes = $3, sha256 = $4, size_bytes = $5 \
         WHERE org_id = $1 AND model_id = $2",
    )
    .bind(org)
    .bind(model)
    .bind(bytes)
    .bind(&sha)
    .bind(bytes.len() as i64)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("UPDATE ai_models SET artifact_sha256 = $3 WHERE org_id = $1 AND id = $2")
        .bind(org)
        .bind(model)
        .bind(&sha)
        .execute(pool)
        .await
        .unwrap();
}
