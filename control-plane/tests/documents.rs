//! Documents, retrieval and grounded answers against a real PostgreSQL with pgvector, the
//! real embedding model on ONNX Runtime, and the fake OpenAI provider.
//!
//! Needs `scripts/lib.sh` `ensure_pgvector` and `ensure_embedding_model` (run by
//! scripts/test.sh): without them these tests fail, they are not skipped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

mod common;

use std::path::PathBuf;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use common::{App, app_with};
use kip_control_plane::{
    documents::{DocumentsConfig, search},
    llm::config::LlmConfig,
};
use kip_tests::{
    fake_llm::{self, FakeLlm, Reply},
    plant::{PROCEDURE_MD, QUESTION, german_manual},
};

async fn plant_data(pool: &PgPool, org: &str) {
    kip_tests::plant::plant_data(pool, org.parse().unwrap()).await;
}
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/embedding"));
    assert!(
        dir.join("model.onnx").is_file(),
        "embedding model missing in {}: run `source scripts/lib.sh && ensure_embedding_model`",
        dir.display()
    );
    dir
}

fn docs_config() -> DocumentsConfig {
    DocumentsConfig {
        model_dir: model_dir(),
        ..DocumentsConfig::default()
    }
}

async fn docs_app(pool: PgPool, llm_toml: Option<&str>) -> App {
    let llm = llm_toml.map(|t| {
        LlmConfig::from_toml(t, |v| (v == "FAKE_KEY").then(|| "sk-test".into()))
            .unwrap_or_else(|e| panic!("{e}\n{t}"))
    });
    app_with(pool, |c| {
        c.documents = docs_config();
        if let Some(l) = llm {
            c.llm = l;
        }
    })
    .await
}

async fn upload(
    app: &App,
    key: &str,
    org: &str,
    title: &str,
    ctype: &str,
    body: Vec<u8>,
) -> common::Resp {
    let uri = format!(
        "/v1/organisations/{org}/documents?title={}",
        title.replace(' ', "%20")
    );
    app.raw(
        Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", ctype)
            .body(Body::from(body))
            .unwrap(),
    )
    .await
}

async fn search_hits(app: &App, key: &str, org: &str, q: &str) -> Vec<Value> {
    let r = app
        .get(
            &format!(
                "/v1/organisations/{org}/documents/search?q={}&k=5",
                q.replace(' ', "%20").replace('?', "%3F")
            ),
            key,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.body.as_array().unwrap().clone()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn upload_search_delete_and_isolation_through_the_api(pool: PgPool) {
    let app = docs_app(pool.clone(), None).await;
    let (org_a, key_a) = app.org_with_key("acme").await;
    let (org_b, key_b) = app.org_with_key("globex").await;

    let r = upload(
        &app,
        &key_a,
        &org_a,
        "Betriebsanleitung P1",
        "application/pdf",
        german_manual(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["language"], "german");
    assert_eq!(r.body["media_type"], "application/pdf");
    let pdf_id = r.body["id"].as_str().unwrap().to_owned();
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "Spindle procedure",
        "text/markdown; charset=utf-8",
        PROCEDURE_MD.into(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["language"], "english");
    assert_eq!(
        r.body["chunk_count"], 3,
        "one chunk per section: {}",
        r.text
    );
    let md_id = r.body["id"].as_str().unwrap().to_owned();
    let r = upload(
        &app,
        &key_b,
        &org_b,
        "Globex recipe",
        "text/plain",
        b"Secret globex spindle coolant recipe: mix water with oil.".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    // The best passages are the spindle ones, with positions; German and English both found.
    let hits = search_hits(&app, &key_a, &org_a, QUESTION).await;
    assert!(!hits.is_empty());
    let text = |h: &Value| h["content"].as_str().unwrap().to_owned();
    assert!(
        text(&hits[0]).contains("spindle") || text(&hits[0]).contains("Spindel"),
        "{hits:#?}"
    );
    assert!(
        hits[..2]
            .iter()
            .any(|h| text(h).contains("coolant") || text(h).contains("Kühlmittel")),
        "{hits:#?}"
    );
    assert!(!text(&hits[0]).contains("hydraulic oil"), "{hits:#?}");
    let docs: std::collections::HashSet<&str> = hits
        .iter()
        .map(|h| h["document_id"].as_str().unwrap())
        .collect();
    assert!(
        docs.contains(pdf_id.as_str()) && docs.contains(md_id.as_str()),
        "{hits:#?}"
    );
    let german = hits
        .iter()
        .find(|h| h["document_id"] == pdf_id.as_str())
        .unwrap();
    assert!(german["page"].as_i64().is_some(), "{german}");
    assert!(
        hits.iter()
            .all(|h| h["content"].as_str().unwrap().find("globex").is_none())
    );
    // A German question finds the German passage (stemmed full text + embedding).
    let hits = search_hits(
        &app,
        &key_a,
        &org_a,
        "Was tun bei zu hoher Spindeltemperatur?",
    )
    .await;
    assert_eq!(hits[0]["document_id"], pdf_id.as_str(), "{hits:#?}");
    assert_eq!(hits[0]["page"], 2, "{hits:#?}");

    // Organisation B sees only its own document, and none of A's by any route.
    let hits = search_hits(&app, &key_b, &org_b, QUESTION).await;
    assert!(
        hits.iter().all(|h| h["title"] == "Globex recipe"),
        "{hits:#?}"
    );
    let r = app
        .get(&format!("/v1/organisations/{org_b}/documents"), &key_b)
        .await;
    assert_eq!(r.body.as_array().unwrap().len(), 1);
    for uri in [
        format!("/v1/organisations/{org_a}/documents"),
        format!("/v1/organisations/{org_a}/documents/{pdf_id}"),
        format!("/v1/organisations/{org_b}/documents/{pdf_id}"),
    ] {
        let r = app.get(&uri, &key_b).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}: {}", r.text);
    }
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org_b}/documents/{pdf_id}"),
            Some(&key_b),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Bad input: 4xx naming the problem.
    let r = upload(&app, &key_a, &org_a, "x", "image/png", vec![1, 2, 3]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.message().contains("content-type"), "{}", r.text);
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "x",
        "application/pdf",
        b"%PDF-1.4 garbage".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.message().contains("PDF"), "{}", r.text);
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "x",
        "text/plain",
        b"   \n\n ".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{org_a}/documents/search?q=&k=5"),
            &key_a,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let r = app
        .get(
            &format!("/v1/organisations/{org_a}/documents/search?q=x&k=0"),
            &key_a,
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);

    // Upload and delete are audited.
    let actions: Vec<String> =
        sqlx::query_scalar("SELECT action FROM audit_log WHERE org_id = $1::uuid ORDER BY id")
            .bind(&org_a)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        actions.iter().filter(|a| *a == "document.upload").count() >= 2,
        "{actions:?}"
    );

    // Delete: gone from retrieval at once.
    let r = app
        .call(
            Method::DELETE,
            &format!("/v1/organisations/{org_a}/documents/{md_id}"),
            Some(&key_a),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let hits = search_hits(&app, &key_a, &org_a, QUESTION).await;
    assert!(
        hits.iter().all(|h| h["document_id"] == pdf_id.as_str()),
        "{hits:#?}"
    );
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE org_id = $1::uuid ORDER BY id DESC LIMIT 1",
    )
    .bind(&org_a)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(actions, ["document.delete"]);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn row_level_security_isolates_organisations_in_the_database(pool: PgPool) {
    let app = docs_app(pool.clone(), None).await;
    let (org_a, key_a) = app.org_with_key("acme").await;
    let (org_b, key_b) = app.org_with_key("globex").await;
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "A",
        "text/markdown",
        PROCEDURE_MD.into(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = upload(
        &app,
        &key_b,
        &org_b,
        "B",
        "text/plain",
        b"Globex coolant recipe.".to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (a, b): (Uuid, Uuid) = (org_a.parse().unwrap(), org_b.parse().unwrap());

    let count = |org: Option<Uuid>| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("SET LOCAL ROLE kip_tenant")
                .execute(&mut *tx)
                .await
                .unwrap();
            if let Some(o) = org {
                sqlx::query("SELECT set_config('kip.org_id', $1, true)")
                    .bind(o.to_string())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            let n: (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM document_chunks)",
            )
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            n
        }
    };
    assert_eq!(count(Some(a)).await, (1, 3));
    assert_eq!(count(Some(b)).await, (1, 1));
    // Without an organisation set, nothing is visible.
    assert_eq!(count(None).await, (0, 0));
    // Nothing at all for a query that names the other organisation explicitly.
    let mut tx = search::tenant_tx(&pool, b).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM document_chunks WHERE org_id = $1")
        .bind(a)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 0);
    // Writing into another organisation is refused by the policy (WITH CHECK).
    let e = sqlx::query(
        "INSERT INTO documents (id, org_id, title, media_type, language, size_bytes, sha256, \
         chunk_count, embedding_model) VALUES ($1, $2, 't', 'text/plain', 'simple', 1, $3, 0, 'm')",
    )
    .bind(Uuid::new_v4())
    .bind(a)
    .bind("0".repeat(64))
    .execute(&mut *tx)
    .await
    .unwrap_err();
    assert!(e.to_string().contains("row-level security"), "{e}");
    drop(tx);
    // A pooled connection does not keep the organisation (SET LOCAL ends with the transaction).
    for _ in 0..3 {
        let setting: Option<String> =
            sqlx::query_scalar("SELECT NULLIF(current_setting('kip.org_id', true), '')")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(setting, None);
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_tiny_organisation_beside_a_large_one_gets_k_rows(pool: PgPool) {
    let app = docs_app(pool.clone(), None).await;
    let (org_a, _) = app.org_with_key("large").await;
    let (org_b, _) = app.org_with_key("tiny").await;
    let (a, b): (Uuid, Uuid) = (org_a.parse().unwrap(), org_b.parse().unwrap());
    // 3000 random chunks for the large organisation, 3 for the tiny one.
    for (org, n) in [(a, 3000), (b, 3)] {
        let doc = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO documents (id, org_id, title, media_type, language, size_bytes, sha256, \
             chunk_count, embedding_model) \
             VALUES ($1, $2, 'd', 'text/plain', 'simple', 1, repeat('0', 64), $3, 'random')",
        )
        .bind(doc)
        .bind(org)
        .bind(n)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO document_chunks (id, org_id, document_id, ordinal, char_start, char_end, \
             content, language, embedding) \
             SELECT gen_random_uuid(), $1, $2, i, 0, 1, 'chunk ' || i, 'simple', \
                    (SELECT array_agg(random() - 0.5) FROM generate_series(1, 384) WHERE i > 0)::vector \
             FROM generate_series(1, $3) i",
        )
        .bind(org)
        .bind(doc)
        .bind(n)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Only the HNSW index may serve the query (as it does for a large organisation).
    sqlx::query("DROP INDEX document_chunks_org")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("ANALYZE document_chunks")
        .execute(&pool)
        .await
        .unwrap();
    let q: Vec<f32> = (0..384)
        .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5)
        .collect();
    let run = |iterative: bool| {
        let pool = pool.clone();
        let q = q.clone();
        async move {
            let mut tx = search::tenant_tx(&pool, b).await.unwrap();
            sqlx::query("SET LOCAL enable_seqscan = off")
                .execute(&mut *tx)
                .await
                .unwrap();
            let plan: Vec<String> = sqlx::query_scalar(
                "EXPLAIN SELECT id FROM document_chunks ORDER BY embedding <=> $1::vector LIMIT 5",
            )
            .bind(kip_control_plane::documents::embed::to_pgvector(&q))
            .fetch_all(&mut *tx)
            .await
            .unwrap();
            assert!(
                plan.join("\n").contains("document_chunks_embedding"),
                "{plan:?}"
            );
            search::nearest(&mut tx, &q, 5, 40, iterative)
                .await
                .unwrap()
        }
    };
    // Without the iterative scan the filter after the index scan leaves too few rows ...
    let plain = run(false).await;
    assert!(
        plain.len() < 3,
        "expected the known HNSW filter problem, got {}",
        plain.len()
    );
    // ... with it, the tiny organisation gets all of its 3 chunks.
    let iterative = run(true).await;
    assert_eq!(iterative.len(), 3, "{iterative:?}");
}

fn fake_openai(url: String) -> String {
    format!(
        "[providers.openai]\nkind = \"openai_compatible\"\nbase_url = \"{url}\"\nfree = true\n\
         api_key_env = \"FAKE_KEY\"\nmodels = [\"gpt-5\"]\n"
    )
}

async fn grounded(app: &App, key: &str, model: Option<&str>) -> common::Resp {
    let mut body = json!({
        "mode": "grounded",
        "messages": [{"role": "user", "content": QUESTION}],
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    app.post("/v1/query", key, body).await
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn grounded_answers_cite_readings_and_passages_and_never_mix_tenants(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion(
        "gpt-5",
        "Press-1's spindle is at 81.5 °C and rising [R1]. The procedure says to check the \
         coolant flow and replace the filter [D1].",
    )))
    .await;
    let app = docs_app(pool.clone(), Some(&fake_openai(fake.base_url()))).await;
    let (org_a, key_a) = app.org_with_key("acme").await;
    let (org_b, key_b) = app.org_with_key("globex").await;
    plant_data(&pool, &org_a).await;
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "Betriebsanleitung P1",
        "application/pdf",
        german_manual(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "Spindle procedure",
        "text/markdown",
        PROCEDURE_MD.into(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);

    let r = grounded(&app, &key_a, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g = &r.body["grounding"];
    assert_eq!(g["mode"], "llm");
    assert_eq!(g["grounded"], true, "{}", r.text);
    let cites = g["citations"].as_array().unwrap();
    let reading = cites.iter().find(|c| c["kind"] == "reading").unwrap();
    assert_eq!(
        (&reading["machine"], &reading["metric"], &reading["value"]),
        (&json!("press-1"), &json!("spindle_temp"), &json!(81.5))
    );
    assert!(reading["ts"].is_string());
    let doc = cites.iter().find(|c| c["kind"] == "document").unwrap();
    assert!(
        doc["chunk_id"].is_string()
            && doc["title"].is_string()
            && doc["char_end"].as_i64() > Some(0)
    );
    assert_eq!(g["tool_calls"].as_array().unwrap().len(), 3);
    // The model saw the sources with markers: the rising reading, the prediction, passages.
    let sent = &fake.requests()[0];
    let system = sent["messages"][0]["content"].as_str().unwrap();
    assert_eq!(sent["messages"][0]["role"], "system");
    assert!(
        system.contains("[R1] press-gw / press-1 / spindle_temp = 81.5"),
        "{system}"
    );
    assert!(system.contains("rising, from 70.5"), "{system}");
    assert!(
        system.contains("[P1]") && system.contains("42.0 cycles"),
        "{system}"
    );
    assert!(
        system.contains("[D1]") && system.contains("coolant"),
        "{system}"
    );

    // An answer that cites nothing is marked ungrounded.
    fake.set_default(Reply::Json(fake_llm::completion(
        "gpt-5",
        "It is probably fine.",
    )));
    let r = grounded(&app, &key_a, Some("gpt-5")).await;
    assert_eq!(r.body["grounding"]["grounded"], false, "{}", r.text);
    assert!(
        r.body["grounding"]["citations"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Organisation B asks the same: none of A's documents or readings reach its prompt.
    let before = fake.requests().len();
    let r = grounded(&app, &key_b, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let sent = &fake.requests()[before];
    let system = sent["messages"][0]["content"].as_str().unwrap();
    assert!(
        !system.contains("press-1")
            && !system.contains("coolant")
            && !system.contains("Kühlmittel"),
        "{system}"
    );
    assert!(system.contains("No sources were found"), "{system}");
    assert_eq!(r.body["grounding"]["grounded"], false);
    let _ = org_b;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn without_a_reachable_model_the_answer_is_assembled_from_the_sources(pool: PgPool) {
    // The provider's port is closed: every attempt fails.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let app = docs_app(
        pool.clone(),
        Some(&fake_openai(format!("http://{dead}/v1"))),
    )
    .await;
    let (org_a, key_a) = app.org_with_key("acme").await;
    plant_data(&pool, &org_a).await;
    let r = upload(
        &app,
        &key_a,
        &org_a,
        "Spindle procedure",
        "text/markdown",
        PROCEDURE_MD.into(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    for model in [Some("gpt-5"), None] {
        let r = grounded(&app, &key_a, model).await;
        assert_eq!(r.status, StatusCode::OK, "{model:?}: {}", r.text);
        let content = r.body["content"].as_str().unwrap();
        assert!(content.contains("deterministic fallback"), "{content}");
        assert!(
            content.contains("press-1 / spindle_temp = 81.5"),
            "{content}"
        );
        assert!(content.contains("Spindle procedure"), "{content}");
        let g = &r.body["grounding"];
        assert_eq!(
            (g["mode"].as_str(), g["grounded"].as_bool()),
            (Some("fallback"), Some(true))
        );
        let kinds: Vec<&str> = g["citations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"reading")
                && kinds.contains(&"document")
                && kinds.contains(&"prediction"),
            "{kinds:?}"
        );
        assert_eq!(r.body["provider"], "kip-local");
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn models_and_embeddings_answer_the_openai_python_sdk(pool: PgPool) {
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    assert!(
        check.is_ok_and(|o| o.status.success()),
        "the OpenAI Python SDK is required: pip install openai"
    );
    let app = docs_app(pool, Some(&fake_openai("http://127.0.0.1:9/v1".into()))).await;
    let (_, key) = app.org_with_key("acme").await;
    // Direct calls: shapes, semantics and the OpenAI error shape.
    let r = app
        .post(
            "/v1/embeddings",
            &key,
            json!({"model": "kip-embedding", "input": [
                "The spindle is overheating.", "Die Spindel ist zu heiß.", "Invoice due on Monday."]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v: Vec<Vec<f64>> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect();
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|e| e.len() == 384));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!((dot(&v[0], &v[0]) - 1.0).abs() < 1e-3);
    assert!(
        dot(&v[0], &v[1]) > dot(&v[0], &v[2]),
        "{} {}",
        dot(&v[0], &v[1]),
        dot(&v[0], &v[2])
    );
    for (body, param) in [
        (
            json!({"model": "text-embedding-3-small", "input": "x"}),
            "model",
        ),
        (json!({"model": "kip-embedding", "input": 5}), "input"),
        (json!({"model": "kip-embedding", "input": []}), "input"),
        (
            json!({"model": "kip-embedding", "input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": "x"}), "model"),
    ] {
        let r = app.post("/v1/embeddings", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(
            r.body["error"]["type"], "invalid_request_error",
            "{}",
            r.text
        );
        assert_eq!(r.body["error"]["param"], param, "{}", r.text);
    }
    let r = app
        .post(
            "/v1/embeddings",
            &app.admin_key,
            json!({"model": "kip-embedding", "input": "x"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router.clone();
    app.tracker
        .spawn(async move { axum::serve(listener, router).await });
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=20)
out = {"models": sorted(m.id for m in c.models.list())}
e = c.embeddings.create(model="kip-embedding", input=["spindle temperature", "coolant filter"])
out["dims"] = [len(d.embedding) for d in e.data]
f = c.embeddings.create(model="kip-embedding", input="spindle temperature", encoding_format="float")
out["same"] = max(abs(a - b) for a, b in zip(e.data[0].embedding, f.data[0].embedding))
try:
    c.embeddings.create(model="nope", input="x")
except openai.BadRequestError as err:
    out["error"] = [err.status_code, err.body.get("param"), err.body.get("type")]
print(json.dumps(out))
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &format!("http://{addr}/v1"), &key])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        v["models"],
        json!(["kip-embedding", "kip-hybrid", "openai/gpt-5"])
    );
    assert_eq!(v["dims"], json!([384, 384]));
    // The SDK's default (base64) decodes to the same vector as float.
    assert!(v["same"].as_f64().unwrap() < 1e-6, "{v}");
    assert_eq!(v["error"], json!([400, "model", "invalid_request_error"]));
}

/// Runs kipctl (the kit's in-process runner) with `key` written to a key file.
async fn kipctl(server: String, key: String, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, key).unwrap();
    let o = kip_tests::kipctl::run(&server, &key_file, args).await;
    (o.ok, o.stdout + &o.stderr)
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn kipctl_adds_lists_searches_and_removes_documents(pool: PgPool) {
    let app = docs_app(pool, None).await;
    let (_, key) = app.org_with_key("acme").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    app.tracker
        .spawn(async move { axum::serve(listener, router).await });
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("spindle procedure.md");
    std::fs::write(&md, PROCEDURE_MD).unwrap();
    let pdf_file = dir.path().join("manual.pdf");
    std::fs::write(&pdf_file, german_manual()).unwrap();
    let (ok, out) = kipctl(
        server.clone(),
        key.clone(),
        &["doc", "add", md.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("spindle procedure.md") && out.contains("text/markdown"),
        "{out}"
    );
    let (ok, out) = kipctl(
        server.clone(),
        key.clone(),
        &[
            "--json",
            "doc",
            "add",
            pdf_file.to_str().unwrap(),
            "--title",
            "Betriebsanleitung P1",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let added: Vec<Value> = serde_json::from_str(&out).unwrap();
    let pdf_id = added[0]["id"].as_str().unwrap().to_owned();
    let (ok, out) = kipctl(server.clone(), key.clone(), &["doc", "list"]).await;
    assert!(
        ok && out.contains("Betriebsanleitung P1") && out.contains("german"),
        "{out}"
    );
    let (ok, out) = kipctl(
        server.clone(),
        key.clone(),
        &["doc", "search", "Kühlmittelfilter reinigen"],
    )
    .await;
    assert!(
        ok && out
            .lines()
            .nth(1)
            .unwrap_or_default()
            .contains("Betriebsanleitung P1"),
        "{out}"
    );
    let (ok, out) = kipctl(server.clone(), key.clone(), &["doc", "rm", &pdf_id]).await;
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, out) = kipctl(server.clone(), key.clone(), &["doc", "list"]).await;
    assert!(ok && !out.contains("Betriebsanleitung"), "{out}");
    let (ok, out) = kipctl(server, key, &["doc", "add", "/nonexistent/file.docx"]).await;
    assert!(!ok && out.contains("unknown file type"), "{out}");
}
