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
//! End to end, every question is also answered by the hybrid orchestrator
//! ([`kip_control_plane::llm::orchestrator::hybrid`]) through the gateway against the fake OpenAI
//! provider of the test kit, which answers citing the first passage (`[D1]`) and the first
//! reading (`[R1]`): the figures are the share of grounded answers, the relevance of the
//! passage the answer cites (the whole path: prompt, markers, citations mapped back to chunks),
//! and the orchestration's own latency (the fake answers at once).
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
use std::sync::Arc;

use kip_control_plane::{
    documents::{
        Documents, RawDocuments, extract::MediaType, grounded, grounded::Citation, ingest,
    },
    llm::orchestrator::{
        hybrid::{self, HybridRequest},
        tools::Toolbox,
    },
    llm::{Gateway, config::LlmConfig, metrics::LlmMetrics},
};
use kip_tests::fake_llm::{self, FakeLlm, Reply};
use serde::Deserialize;
use serde_json::json;
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
    answers_end_to_end(docs, &pool, org, &names, &questions).await;
    if !misses.is_empty() {
        println!("not in the top {K}:");
        for m in misses {
            println!("{m}");
        }
    }
}

/// Every question through the hybrid orchestrator and the gateway, against the fake provider.
async fn answers_end_to_end(
    docs: Documents,
    pool: &sqlx::PgPool,
    org: Uuid,
    names: &HashMap<Uuid, String>,
    questions: &[Question],
) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion(
        "gpt-5",
        "According to the manual, do as described [D1].",
    )))
    .await;
    fake.stop_recording();
    let cfg = LlmConfig::from_toml(
        &format!(
            "default_model = \"openai/gpt-5\"\nrate_limit_per_minute = 100000\n\
             rate_limit_burst = 10000\n[providers.openai]\nkind = \"openai_compatible\"\n\
             base_url = \"{}\"\nfree = true\nmodels = [\"gpt-5\"]\n",
            fake.base_url()
        ),
        |_| None,
    )
    .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let gw =
        Arc::new(Gateway::new(cfg, pool.clone(), LlmMetrics::register(&mut registry)).unwrap());
    let toolbox = Toolbox {
        pool: pool.clone(),
        docs: Arc::new(docs),
        health: Default::default(),
        org,
    };
    let (mut grounded_n, mut relevant, mut lat) = (0, 0, Vec::new());
    for q in questions {
        let t = Instant::now();
        let a = hybrid::answer(
            &gw,
            &toolbox,
            Uuid::new_v4(),
            HybridRequest {
                question: q.question.clone(),
                messages: vec![json!({"role": "user", "content": q.question})],
                model: None,
                base: serde_json::Map::new(),
                strategy: None,
            },
        )
        .await
        .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(a.grounding.mode, "hybrid", "{}: {}", q.id, a.content);
        grounded_n += usize::from(a.grounding.grounded);
        let cited_relevant = a.grounding.citations.iter().any(|c| match c {
            Citation::Document {
                document_id,
                heading,
                ..
            } => names.get(document_id).is_some_and(|file| {
                q.relevant
                    .iter()
                    .any(|r| r.document == *file && heading.as_deref() == Some(r.heading.as_str()))
            }),
            _ => false,
        });
        relevant += usize::from(cited_relevant);
    }
    lat.sort_by(f64::total_cmp);
    let n = questions.len().max(1) as f64;
    println!(
        "hybrid answers via the gateway (fake provider citing [D1]): {} questions, grounded {:.3}, \
         cited passage relevant {:.3}, latency p50 {:.1} ms, p99 {:.1} ms, {} provider calls",
        questions.len(),
        grounded_n as f64 / n,
        relevant as f64 / n,
        lat[lat.len() / 2],
        lat[((lat.len() - 1) as f64 * 0.99).round() as usize],
        fake.hits()
    );
}
