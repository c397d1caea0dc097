//! OpenAI SDK compatibility beyond chat: `GET /v1/models` (what an organisation may call,
//! aliases included, plus the local embedding model) and `POST /v1/embeddings` (the local
//! sentence-embedding model of [`crate::documents`]).
//!
//! Invariants:
//! - Errors have OpenAI's shape and status: 400 with `error.type = "invalid_request_error"`,
//!   `error.param` naming the field and `error.code`, so the SDKs raise `BadRequestError`.
//! - Embedding inputs are bounded ([`MAX_INPUTS`] texts of at most [`MAX_INPUT_BYTES`]);
//!   `encoding_format` `float` or `base64` (little-endian f32, the Python SDK's default).

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{FromRef, State, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::Gateway;
use crate::{
    documents::{Documents, embed},
    http::{ApiError, KeyCache, Principal, Scope},
};

/// Texts per embeddings request.
pub const MAX_INPUTS: usize = 256;
/// Bytes per embedded text.
pub const MAX_INPUT_BYTES: usize = 16 * 1024;
/// Model names `/v1/embeddings` accepts (all the same local model).
pub const EMBEDDING_MODELS: &[&str] = &[
    "kip-embedding",
    embed::MODEL_ID,
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
];

/// The routes, to be nested under `/v1`.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    PgPool: FromRef<S>,
    Arc<KeyCache>: FromRef<S>,
    Arc<Gateway>: FromRef<S>,
    Arc<Documents>: FromRef<S>,
{
    Router::new()
        .route("/models", get(models))
        .route("/embeddings", post(embeddings))
}

/// A 400 in OpenAI's error shape.
fn invalid(param: &str, code: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {
            "message": message.into(),
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }})),
    )
        .into_response()
}

fn org_key(p: &Principal) -> Result<(), ApiError> {
    match p.scope {
        Scope::Org(_) => Ok(()),
        Scope::Platform => Err(ApiError::Forbidden(
            "the LLM API needs an organisation API key; a platform key belongs to no organisation",
        )),
    }
}

/// `GET /v1/models`: configured provider models (`provider/model`), aliases and the local
/// embedding model, as OpenAI's model list.
async fn models(State(gw): State<Arc<Gateway>>, p: Principal) -> Result<Json<Value>, ApiError> {
    org_key(&p)?;
    let cfg = gw.config();
    let mut data = Vec::new();
    let entry = |id: String, owner: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": owner});
    for (name, prov) in &cfg.providers {
        for m in &prov.models {
            data.push(entry(format!("{name}/{m}"), name));
        }
    }
    for alias in cfg.aliases.keys() {
        data.push(entry(alias.clone(), "kip-alias"));
    }
    // The hybrid orchestrator (crate::llm::orchestrator), selected by this model name.
    data.push(entry(cfg.orchestrator.alias.clone(), "kip-orchestrator"));
    data.push(entry("kip-embedding".into(), "kip"));
    Ok(Json(json!({"object": "list", "data": data})))
}

/// `POST /v1/embeddings`: OpenAI's embeddings API on the local model.
async fn embeddings(
    State(docs): State<Arc<Documents>>,
    p: Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    org_key(&p)?;
    let body = match body {
        Ok(b) => b,
        Err(r) => return Ok(invalid("body", "invalid_body", r.body_text())),
    };
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(invalid(
                "body",
                "invalid_json",
                format!("malformed JSON: {e}"),
            ));
        }
    };
    let Some(obj) = v.as_object() else {
        return Ok(invalid(
            "body",
            "invalid_type",
            "the body must be a JSON object",
        ));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Ok(invalid("model", "invalid_type", "model must be a string")),
        None => {
            return Ok(invalid(
                "model",
                "missing_required_parameter",
                "model is required",
            ));
        }
    };
    if !EMBEDDING_MODELS.contains(&model.as_str()) {
        return Ok(invalid(
            "model",
            "model_not_found",
            format!(
                "the embedding model {model:?} does not exist; use one of {}",
                EMBEDDING_MODELS.join(", ")
            ),
        ));
    }
    let inputs: Vec<String> = match obj.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Ok(invalid(
                "input",
                "invalid_type",
                "input must be a string or a non-empty array of strings (token arrays are not \
                 supported)",
            ));
        }
        None => {
            return Ok(invalid(
                "input",
                "missing_required_parameter",
                "input is required",
            ));
        }
    };
    if inputs.len() > MAX_INPUTS {
        return Ok(invalid(
            "input",
            "too_many_inputs",
            format!("at most {MAX_INPUTS} inputs per request"),
        ));
    }
    if let Some(i) = inputs
        .iter()
        .position(|s| s.is_empty() || s.len() > MAX_INPUT_BYTES)
    {
        return Ok(invalid(
            "input",
            "invalid_value",
            format!("input[{i}] must be 1 to {MAX_INPUT_BYTES} bytes"),
        ));
    }
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Ok(invalid(
                "encoding_format",
                "invalid_value",
                "encoding_format must be \"float\" or \"base64\"",
            ));
        }
    };
    if let Some(d) = obj.get("dimensions").filter(|d| !d.is_null())
        && d.as_u64() != Some(embed::DIMS as u64)
    {
        return Ok(invalid(
            "dimensions",
            "invalid_value",
            format!("this model has {} dimensions", embed::DIMS),
        ));
    }
    // Rough token count for usage (4 characters per token, like the chat estimate).
    let tokens: usize = inputs.iter().map(|s| s.len().div_ceil(4)).sum();
    let vectors = docs.embed(inputs).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}
