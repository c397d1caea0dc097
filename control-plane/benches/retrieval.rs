//! Retrieval figures (issue #15): embedding throughput of the local model on ONNX Runtime
//! (one intra-op thread, batches of 16, chunk-sized texts), single-question embedding latency,
//! and hybrid retrieval latency (vector + full text + RRF, in a row-level-security
//! transaction) over `RETRIEVAL_CHUNKS` (default 20000) chunks of one organisation beside a
//! second, tiny organisation.
//!
//! Run: `cargo bench -p kip-control-plane --bench retrieval` (PostgreSQL with pgvector from
//! `DATABASE_URL`; the model from `target/embedding`, see `scripts/lib.sh`
//! `ensure_embedding_model`). The 100k figure, with realistic text and per-list timing:
//! the `retrieval_scale` bench.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark binary: prints its figures and aborts on setup failure"
)]

use std::{path::PathBuf, time::Instant};

use kip_control_plane::documents::{
    embed::{Embedder, to_pgvector},
    search::{self, SearchParams},
};
use uuid::Uuid;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/embedding"));
    let e = Embedder::load(&dir, None).unwrap();
    let chunk = "Steigt die Temperatur der Spindel über 80 °C, den Kühlmittelfluss prüfen und den \
                 Kühlmittelfilter reinigen. If the spindle temperature keeps rising, stop the press \
                 and inspect the bearings; replace the coolant filter when it is clogged. ";
    let texts: Vec<String> = (0..128).map(|i| format!("{i} {chunk}{chunk}")).collect();
    e.embed(&texts[..16]).unwrap(); // warm-up
    let t = Instant::now();
    e.embed(&texts).unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "embedding: {} chunks of {} chars in {s:.2} s = {:.1} chunks/s (1 thread)",
        texts.len(),
        texts[0].chars().count(),
        texts.len() as f64 / s
    );
    let mut lat = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        e.embed(&[format!("Why is spindle temperature on press {i} rising?")])
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "question embedding: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    let n: i64 = std::env::var("RETRIEVAL_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let db = kip_tests::TestDb::create().await;
    let pool = db.pool.clone();
    let (big, tiny) = (Uuid::new_v4(), Uuid::new_v4());
    for (org, count) in [(big, n), (tiny, 50)] {
        sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $2)")
            .bind(org)
            .bind(org.simple().to_string())
            .execute(&pool)
            .await
            .unwrap();
        let doc = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO documents (id, org_id, title, media_type, language, size_bytes, sha256, \
             chunk_count, embedding_model) \
             VALUES ($1, $2, 'bench', 'text/plain', 'english', 1, repeat('0', 64), $3, 'random')",
        )
        .bind(doc)
        .bind(org)
        .bind(i32::try_from(count).unwrap())
        .execute(&pool)
        .await
        .unwrap();
        let t = Instant::now();
        sqlx::query(
            "INSERT INTO document_chunks (id, org_id, document_id, ordinal, char_start, char_end, \
             content, language, embedding) \
             SELECT gen_random_uuid(), $1, $2, i, 0, 1, \
                    'machine ' || (i % 97) || ' spindle bearing coolant filter pump valve ' || i, \
                    'english', \
                    (SELECT array_agg(random() - 0.5) FROM generate_series(1, 384) WHERE i > 0)::vector \
             FROM generate_series(1, $3) i",
        )
        .bind(org)
        .bind(doc)
        .bind(count)
        .execute(&pool)
        .await
        .unwrap();
        println!(
            "inserted {count} chunks (HNSW maintained) in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    sqlx::query("ANALYZE document_chunks")
        .execute(&pool)
        .await
        .unwrap();
    for (label, org) in [("large org", big), ("tiny org", tiny)] {
        let mut lat = Vec::new();
        let mut rows = 0;
        for i in 0..100 {
            let q = format!("spindle coolant filter on machine {}", i % 97);
            let v = e.embed(std::slice::from_ref(&q)).unwrap().pop().unwrap();
            let t = Instant::now();
            let hits = search::hybrid(&pool, org, &q, &v, SearchParams::for_k(5))
                .await
                .unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            rows += hits.len();
        }
        println!(
            "hybrid retrieval, {label} ({n} + 50 chunks): p50 {:.2} ms, p99 {:.2} ms, {:.1} rows/query (k = 5)",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            rows as f64 / 100.0
        );
    }
    let _ = to_pgvector(&[0.0]);
}
