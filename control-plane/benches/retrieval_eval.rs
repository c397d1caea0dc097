//! Retrieval quality (issue #15), rerunnable: the labelled question set of
//! `benches/eval/questions.json` (German and English questions, each with its relevant
//! sections named by document file and Markdown heading) over the manuals, procedures and
//! reports of `benches/eval/corpus/`, loaded through the upload path
//! ([`kip_control_plane::documents::ingest`]: extraction, chunking, local embeddings,
//! pgvector) into a real PostgreSQL for one organisation, beside a second organisation whose
//! copy of the corpus must never be returned.
//!
//! Reports recall@5 (a relevant chunk among the first five), MRR (over the first five) and,
//! for the grounded mode's deterministic answer (no model reachable), citation precision
//! (share of cited passages that are relevant) and citation recall (a relevant passage cited),
//! overall and per language pair.
//!
//! Run: `cargo bench -p kip-control-plane --bench retrieval_eval` (PostgreSQL with pgvector
//! from `DATABASE_URL`; the model from `target/embedding`, see `scripts/lib.sh`
//! `ensure_embedding_model`).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::{collections::HashMap, path::PathBuf, time::Instant};

use axum::body::Bytes;
use kip_control_plane::documents::{
    Documents, RawDocuments, extract::MediaType, grounded, grounded::Citation, ingest,
};
use serde::Deserialize;
use uuid::Uuid;

const K: usize = 5;

#[derive(Deserialize)]
struct Relevant {
    document: String,
    heading: String,
}

#[derive(Deserialize)]
struct Question {
    id: String,
    language: String,
    question: String,
    relevant: Vec<Relevant>,
}

#[derive(Default)]
struct Tally {
    n: usize,
    hits: usize,
    rr: f64,
    cited: usize,
    cited_relevant: usize,
    cite_recall: usize,
}

impl Tally {
    fn line(&self, label: &str) -> String {
        let n = self.n.max(1) as f64;
        format!(
            "{label:<14} n={:>3}  recall@{K} {:.3}  MRR {:.3}  citation precision {:.3}  \
             citation recall {:.3}",
            self.n,
            self.hits as f64 / n,
            self.rr / n,
            self.cited_relevant as f64 / self.cited.max(1) as f64,
            self.cite_recall as f64 / n,
        )
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/eval"));
    let questions: Vec<Question> =
        serde_json::from_slice(&std::fs::read(root.join("questions.json")).unwrap()).unwrap();
    let docs = Documents::new(
        RawDocuments {
            model_dir: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/embedding"
            ))),
            ..RawDocuments::default()
        }
        .validate()
        .unwrap(),
    );
    let db = kip_tests::TestDb::create().await;
    let pool = db.pool.clone();
    let (org, other) = (Uuid::new_v4(), Uuid::new_v4());
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("corpus"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    // document id -> corpus file name, for the organisation under test.
    let mut names: HashMap<Uuid, String> = HashMap::new();
    let t = Instant::now();
    let mut chunks = 0;
    for o in [org, other] {
        sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $2)")
            .bind(o)
            .bind(o.simple().to_string())
            .execute(&pool)
            .await
            .unwrap();
        for f in &files {
            let text = std::fs::read(f).unwrap();
            let file = f.file_name().unwrap().to_string_lossy().into_owned();
            let doc = ingest(
                &pool,
                &docs,
                o,
                &file,
                MediaType::Markdown,
                None,
                Bytes::from(text),
            )
            .await
            .unwrap();
            if o == org {
                names.insert(doc.id, file);
                chunks += doc.chunk_count;
            }
        }
    }
    println!(
        "corpus: {} documents, {chunks} chunks per organisation, 2 organisations, loaded in {:.1} s",
        files.len(),
        t.elapsed().as_secs_f64()
    );

    let mut tallies: HashMap<String, Tally> = HashMap::new();
    let mut misses = Vec::new();
    let mut lat = Vec::new();
    for q in &questions {
        let is_relevant = |doc: &Uuid, heading: Option<&str>| {
            names.get(doc).is_some_and(|file| {
                q.relevant
                    .iter()
                    .any(|r| r.document == *file && heading == Some(r.heading.as_str()))
            })
        };
        let t = Instant::now();
        let hits = docs.search(&pool, org, &q.question, K).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(
            hits.iter().all(|h| names.contains_key(&h.document_id)),
            "{}: a passage of the other organisation was returned",
            q.id
        );
        let rank = hits
            .iter()
            .position(|h| is_relevant(&h.document_id, h.heading.as_deref()));
        // The grounded mode's answer without a model: which passages does it cite?
        let ctx = grounded::gather(&docs, &pool, org, &q.question)
            .await
            .unwrap();
        let g = ctx.grounding(&ctx.fallback_answer(), "fallback");
        let cited: Vec<bool> = g
            .citations
            .iter()
            .filter_map(|c| match c {
                Citation::Document {
                    document_id,
                    heading,
                    ..
                } => Some(is_relevant(document_id, heading.as_deref())),
                _ => None,
            })
            .collect();
        let src = if q.relevant[0].document.ends_with("-de.md") {
            "de"
        } else {
            "en"
        };
        for key in ["all".to_owned(), format!("{} -> {src} doc", q.language)] {
            let t = tallies.entry(key).or_default();
            t.n += 1;
            if let Some(r) = rank {
                t.hits += 1;
                t.rr += 1.0 / (r as f64 + 1.0);
            }
            t.cited += cited.len();
            t.cited_relevant += cited.iter().filter(|c| **c).count();
            t.cite_recall += usize::from(cited.iter().any(|c| *c));
        }
        if rank.is_none() {
            misses.push(format!(
                "  {} ({}): {:?} -> top: {:?}",
                q.id,
                q.language,
                q.question,
                hits.first().map(|h| h.heading.clone().unwrap_or_default())
            ));
        }
    }
    println!("questions: {} (k = {K})", questions.len());
    let mut keys: Vec<&String> = tallies.keys().collect();
    keys.sort();
    for k in keys {
        println!("{}", tallies[k].line(k));
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "retrieval latency incl. question embedding: p50 {:.1} ms, p99 {:.1} ms",
        lat[lat.len() / 2],
        lat[((lat.len() - 1) as f64 * 0.99).round() as usize]
    );
    if !misses.is_empty() {
        println!("not in the top {K}:");
        for m in misses {
            println!("{m}");
        }
    }
}
