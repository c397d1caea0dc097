//! Hybrid retrieval at scale (issue #15): p50/p99 of `search::hybrid` (vector + full text +
//! RRF, in a row-level-security transaction) for one organisation holding
//! `RETRIEVAL_CHUNKS` (default 100000) chunks beside a tiny organisation (50 chunks), with the
//! time of each leg (HNSW vector list, full-text list) and `EXPLAIN ANALYZE` of both legs for
//! one question, so a slow p99 can be attributed.
//!
//! What is synthetic, and how (so the figures can be read honestly):
//! - Text: maintenance reports, procedures and manual sections generated from 256 topics
//!   (component x symptom x action, English and German), each chunk its topic's sentences plus
//!   varying machine names, dates, values and ticket numbers: ~400-700 characters, the
//!   vocabulary overlap of a real plant's documents (many chunks share the common words of a
//!   question, as real ones do).
//! - Embeddings: the 256 topic texts are embedded once by the real model (all-MiniLM-L6-v2 on
//!   ONNX Runtime); each chunk's vector is its topic's embedding plus seeded Gaussian noise
//!   (sigma 0.02 per dimension), normalised. So the vectors cluster as real ones do, and a real
//!   question embedding lands in the right cluster; 100k real embeddings would take hours on
//!   this machine (about 10 chunks/s).
//! - Questions: 100 generated questions over the same topics, embedded by the real model
//!   (embedding time is not part of the retrieval figure).
//!
//! The load is done once: with `RETRIEVAL_DB=<name>` the database is created on the first run,
//! kept, and reused by later runs (so before/after figures come from the same rows); without
//! it a fresh database is dropped at the end. Indexes are built after the bulk insert.
//!
//! Run: `RETRIEVAL_DB=kip_bench_scale cargo bench --profile dev -p kip-control-plane --bench
//! retrieval_scale` (PostgreSQL with pgvector from `DATABASE_URL`; the model from
//! `target/embedding`).
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
use sqlx::{Executor as _, PgPool};
use uuid::Uuid;

const TOPICS: usize = 256;
const TINY_CHUNKS: usize = 50;
const QUESTIONS: usize = 100;
const K: usize = 5;

/// A small deterministic generator (xorshift64*), so every run loads the same rows.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Standard normal (Box-Muller).
    fn gauss(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

const COMPONENTS_EN: [&str; 8] = [
    "spindle bearing",
    "coolant filter",
    "hydraulic valve",
    "main drive belt",
    "heating element",
    "vacuum pump",
    "servo motor",
    "lubrication pump",
];
const COMPONENTS_DE: [&str; 8] = [
    "Spindellager",
    "Kühlmittelfilter",
    "Hydraulikventil",
    "Hauptantriebsriemen",
    "Heizelement",
    "Vakuumpumpe",
    "Servomotor",
    "Schmierpumpe",
];
const SYMPTOMS_EN: [&str; 8] = [
    "the temperature rises above the limit",
    "the pressure drops during the second shift",
    "vibration increases at high speed",
    "a grinding noise appears on start-up",
    "the current draw exceeds the rated value",
    "leakage is visible at the connection",
    "the cycle time grows by several seconds",
    "the sensor reports intermittent faults",
];
const SYMPTOMS_DE: [&str; 8] = [
    "die Temperatur steigt über den Grenzwert",
    "der Druck fällt in der zweiten Schicht ab",
    "die Schwingung nimmt bei hoher Drehzahl zu",
    "beim Anlauf tritt ein Schleifgeräusch auf",
    "die Stromaufnahme überschreitet den Nennwert",
    "an der Verbindung ist eine Leckage sichtbar",
    "die Taktzeit wächst um mehrere Sekunden",
    "der Sensor meldet sporadische Störungen",
];
const ACTIONS_EN: [&str; 4] = [
    "Stop the machine, check the coolant flow and clean or replace the filter.",
    "Inspect the part, tighten the fittings and record the values in the maintenance log.",
    "Replace the worn part, then run the machine at reduced speed for thirty minutes.",
    "Lock out the machine, measure the clearance and call the service technician.",
];
const ACTIONS_DE: [&str; 4] = [
    "Maschine stoppen, den Kühlmittelfluss prüfen und den Filter reinigen oder tauschen.",
    "Bauteil prüfen, Verschraubungen nachziehen und die Werte im Wartungsbuch eintragen.",
    "Das verschlissene Teil ersetzen und die Maschine dreißig Minuten mit reduzierter Drehzahl fahren.",
    "Maschine sichern, das Spiel messen und den Servicetechniker rufen.",
];
const MACHINES: [&str; 6] = [
    "press",
    "oven",
    "lathe",
    "milling centre",
    "conveyor",
    "robot cell",
];
const SHIFTS_EN: [&str; 3] = ["early shift", "late shift", "night shift"];
const SHIFTS_DE: [&str; 3] = ["Frühschicht", "Spätschicht", "Nachtschicht"];

/// Topic `t`: (language German?, component, symptom, action).
fn topic(t: usize) -> (bool, usize, usize, usize) {
    (t % 2 == 1, (t / 2) % 8, (t / 16) % 8, (t / 128 + t) % 4)
}

fn topic_text(t: usize) -> String {
    let (de, c, s, a) = topic(t);
    if de {
        format!(
            "{}: Wenn {}, {}",
            COMPONENTS_DE[c], SYMPTOMS_DE[s], ACTIONS_DE[a]
        )
    } else {
        format!(
            "{}: When {}, {}",
            COMPONENTS_EN[c], SYMPTOMS_EN[s], ACTIONS_EN[a]
        )
    }
}

fn chunk_text(t: usize, i: usize, rng: &mut Rng) -> String {
    let (de, c, s, a) = topic(t);
    let machine = format!("{} {}", rng.pick(&MACHINES), 1 + rng.below(40));
    let day = format!("2026-{:02}-{:02}", 1 + rng.below(12), 1 + rng.below(28));
    let value = 20 + rng.below(180);
    let hours = 100 * (1 + rng.below(20));
    if de {
        format!(
            "Wartungsbericht {i}, {machine}, {day}, {shift}. Befund am {comp}: {sym}. Gemessen \
             wurden {value} Einheiten, der Sollwert liegt deutlich darunter. Maßnahme: {act} Der \
             Bediener hat die Anlage danach freigegeben. Nächste Prüfung des {comp} nach {hours} \
             Betriebsstunden; Ersatzteile sind im Lager vorrätig. Siehe Betriebsanleitung, \
             Abschnitt Instandhaltung.",
            shift = rng.pick(&SHIFTS_DE),
            comp = COMPONENTS_DE[c],
            sym = SYMPTOMS_DE[s],
            act = ACTIONS_DE[a],
        )
    } else {
        format!(
            "Maintenance report {i}, {machine}, {day}, {shift}. Finding on the {comp}: {sym}. \
             The reading was {value} units, well above the set point. Action taken: {act} The \
             operator released the machine afterwards. Next inspection of the {comp} after \
             {hours} operating hours; spare parts are in stock. See the operating manual, \
             section maintenance.",
            shift = rng.pick(&SHIFTS_EN),
            comp = COMPONENTS_EN[c],
            sym = SYMPTOMS_EN[s],
            act = ACTIONS_EN[a],
        )
    }
}

fn question(t: usize, rng: &mut Rng) -> String {
    let (de, c, s, _) = topic(t);
    let machine = format!("{} {}", rng.pick(&MACHINES), 1 + rng.below(40));
    if de {
        format!(
            "Was tun, wenn am {} der {machine} {}?",
            COMPONENTS_DE[c], SYMPTOMS_DE[s]
        )
    } else {
        format!(
            "What should I do when on the {} of the {machine} {}?",
            COMPONENTS_EN[c], SYMPTOMS_EN[s]
        )
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Connects to (creating and migrating if needed) the kept database `name`.
async fn kept_db(name: &str) -> PgPool {
    assert!(
        name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "RETRIEVAL_DB must be [A-Za-z0-9_]"
    );
    let admin_url = kip_tests::postgres::server_url();
    let admin = PgPool::connect(&admin_url).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await
            .unwrap();
    if !exists {
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
    }
    admin.close().await;
    let (base, _) = admin_url.rsplit_once('/').unwrap();
    let pool = PgPool::connect(&format!("{base}/{name}")).await.unwrap();
    kip_control_plane::db::MIGRATOR.run(&pool).await.unwrap();
    pool
}

/// Inserts `n` chunks for `org` (one document), vectors = topic vector + noise.
async fn load(pool: &PgPool, org: Uuid, n: usize, topics: &[Vec<f32>], rng: &mut Rng) {
    sqlx::query("INSERT INTO organisations (id, name, display_name) VALUES ($1, $2, $2)")
        .bind(org)
        .bind(format!("bench-{}", org.simple()))
        .execute(pool)
        .await
        .unwrap();
    let doc = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO documents (id, org_id, title, media_type, language, size_bytes, sha256, \
         chunk_count, embedding_model) \
         VALUES ($1, $2, 'maintenance reports', 'text/plain', 'english', 1, repeat('0', 64), $3, \
         'topic+noise')",
    )
    .bind(doc)
    .bind(org)
    .bind(i32::try_from(n).unwrap())
    .execute(pool)
    .await
    .unwrap();
    let batch = 2000;
    let mut i = 0;
    while i < n {
        let m = batch.min(n - i);
        let mut ordinals = Vec::with_capacity(m);
        let mut contents = Vec::with_capacity(m);
        let mut langs = Vec::with_capacity(m);
        let mut vectors = Vec::with_capacity(m);
        for j in i..i + m {
            let t = rng.below(TOPICS as u64) as usize;
            let v: Vec<f32> = topics[t].iter().map(|x| x + 0.02 * rng.gauss()).collect();
            ordinals.push(i32::try_from(j).unwrap());
            contents.push(chunk_text(t, j, rng));
            langs.push(if topic(t).0 { "german" } else { "english" });
            vectors.push(to_pgvector(&unit(v)));
        }
        sqlx::query(
            "INSERT INTO document_chunks (id, org_id, document_id, ordinal, char_start, \
             char_end, content, language, embedding) \
             SELECT gen_random_uuid(), $1, $2, o, 0, length(c), c, l::regconfig, v::vector \
             FROM UNNEST($3::int[], $4::text[], $5::text[], $6::text[]) AS u(o, c, l, v)",
        )
        .bind(org)
        .bind(doc)
        .bind(&ordinals)
        .bind(&contents)
        .bind(&langs)
        .bind(&vectors)
        .execute(pool)
        .await
        .unwrap();
        i += m;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/embedding"));
    let e = Embedder::load(&dir, None).unwrap();
    let n: usize = std::env::var("RETRIEVAL_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let kept = std::env::var("RETRIEVAL_DB").ok();
    let fresh;
    let pool = match &kept {
        Some(name) => kept_db(name).await,
        None => {
            fresh = kip_tests::TestDb::create().await;
            fresh.pool.clone()
        }
    };

    // The two organisations of this database (a kept one was loaded by an earlier run).
    let orgs: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT org_id, count(*) FROM document_chunks GROUP BY org_id ORDER BY count(*) DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let (big, tiny) = if orgs.len() == 2 && orgs[0].1 == n as i64 {
        println!(
            "reusing {} ({} + {} chunks)",
            kept.as_deref().unwrap_or("?"),
            orgs[0].1,
            orgs[1].1
        );
        (orgs[0].0, orgs[1].0)
    } else {
        assert!(
            orgs.is_empty(),
            "database holds other chunks ({orgs:?}); use another RETRIEVAL_DB"
        );
        let t = Instant::now();
        let texts: Vec<String> = (0..TOPICS).map(topic_text).collect();
        let mut topics = Vec::new();
        for c in texts.chunks(16) {
            topics.extend(e.embed(c).unwrap());
        }
        println!(
            "embedded {TOPICS} topic texts with the real model in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Bulk insert first, indexes after: maintaining HNSW row by row took 2075 s for 100k.
        for ix in ["document_chunks_embedding", "document_chunks_tsv"] {
            pool.execute(sqlx::AssertSqlSafe(format!("DROP INDEX IF EXISTS {ix}")))
                .await
                .unwrap();
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (big, tiny) = (Uuid::new_v4(), Uuid::new_v4());
        let t = Instant::now();
        load(&pool, big, n, &topics, &mut rng).await;
        load(&pool, tiny, TINY_CHUNKS, &topics, &mut rng).await;
        println!(
            "inserted {n} + {TINY_CHUNKS} chunks (no indexes) in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut c = pool.acquire().await.unwrap();
        c.execute("SET maintenance_work_mem = '1GB'").await.unwrap();
        c.execute("CREATE INDEX document_chunks_tsv ON document_chunks USING gin (tsv)")
            .await
            .unwrap();
        println!("GIN index built in {:.1} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        c.execute(
            "CREATE INDEX document_chunks_embedding ON document_chunks \
             USING hnsw (embedding vector_cosine_ops)",
        )
        .await
        .unwrap();
        println!("HNSW index built in {:.1} s", t.elapsed().as_secs_f64());
        drop(c);
        (big, tiny)
    };
    pool.execute("ANALYZE document_chunks").await.unwrap();

    let mut rng = Rng(0x51_7CC1_B727_220A);
    let questions: Vec<(String, Vec<f32>)> = (0..QUESTIONS)
        .map(|i| {
            let q = question((i * 37) % TOPICS, &mut rng);
            let v = e.embed(std::slice::from_ref(&q)).unwrap().pop().unwrap();
            (q, v)
        })
        .collect();
    let params = SearchParams::for_k(K);

    // EXPLAIN ANALYZE of both legs for the first question, as the tenant sees them.
    for (org, label) in [(big, "large"), (tiny, "tiny")] {
        let (q, v) = &questions[0];
        let mut tx = search::tenant_tx(&pool, org).await.unwrap();
        for (leg, plan) in search::explain(&mut tx, q, v, params).await.unwrap() {
            println!("--- EXPLAIN ANALYZE, {label} org, {leg} leg ({q:?}):\n{plan}");
        }
        tx.rollback().await.unwrap();
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at start: {}",
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    for (label, org, count) in [("large org", big, n), ("tiny org", tiny, TINY_CHUNKS)] {
        let (mut lat, mut vec_lat, mut text_lat) = (Vec::new(), Vec::new(), Vec::new());
        let mut short = 0;
        let mut rows = 0;
        for (q, v) in &questions {
            let t = Instant::now();
            let hits = search::hybrid(&pool, org, q, v, params).await.unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            rows += hits.len();
            short += usize::from(hits.len() < K);
            // The legs alone, for attribution.
            let mut tx = search::tenant_tx(&pool, org).await.unwrap();
            let t = Instant::now();
            search::vector_list(&mut tx, v, params).await.unwrap();
            vec_lat.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            search::full_text(&mut tx, q, params.candidates, params.text_scan_rows)
                .await
                .unwrap();
            text_lat.push(t.elapsed().as_secs_f64() * 1000.0);
            tx.rollback().await.unwrap();
        }
        println!(
            "hybrid retrieval, {label} ({count} chunks, k = {K}): p50 {:.1} ms, p99 {:.1} ms; \
             vector leg p50 {:.1} / p99 {:.1} ms; full-text leg p50 {:.1} / p99 {:.1} ms; \
             {:.2} rows/query, {short} of {QUESTIONS} queries with fewer than k",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            pct(&mut vec_lat, 0.5),
            pct(&mut vec_lat, 0.99),
            pct(&mut text_lat, 0.5),
            pct(&mut text_lat, 0.99),
            rows as f64 / QUESTIONS as f64
        );
    }
    // Reference measured in the same run: a primary-key lookup on the same server.
    let mut refl = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM organisations")
            .fetch_one(&pool)
            .await
            .unwrap();
        refl.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "reference, same run: SELECT count(*) FROM organisations: p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut refl, 0.5),
        pct(&mut refl, 0.99)
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at end: {}",
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
}
