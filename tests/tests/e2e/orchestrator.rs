//! The orchestrator's "done when" scenario with the real `kip-control-plane` binary: a new
//! organisation uploads a German PDF manual and an English Markdown procedure, has readings of
//! press 1's spindle temperature, asks why it is rising and what the manual says, and gets an
//! answer citing the readings and the manual, through `/v1/query` (hybrid mode) and through the
//! official OpenAI Python SDK (model `kip-hybrid`, plain and streamed). A second organisation
//! asking the same sees none of the first one's documents, readings or cache entries, checked
//! through the API, in what reached the model, and in the database under row-level security.
//!
//! Needs the embedding model (`KIP_EMBEDDING_MODEL_DIR`), ONNX Runtime (`ORT_DYLIB_PATH`),
//! pgvector and the `openai` Python package (scripts/lib.sh `ensure_python_peers`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use kip_tests::{
    TestDb,
    binaries::ControlPlaneProcess,
    control_plane::AdminApi,
    fake_llm::{self, FakeLlm, Reply},
    plant::{PROCEDURE_MD, QUESTION, german_manual, plant_data},
};
use serde_json::{Value, json};
use uuid::Uuid;

const ANSWER: &str = "The spindle temperature of press-1 rose from 70.5 to 81.5 °C within \
    half an hour [R1]. The manual says to check the coolant flow and clean the coolant filter \
    [D1][D2][D3][D4][D5].";

async fn upload(api: &AdminApi, org: Uuid, title: &str, ctype: &str, body: Vec<u8>) {
    let r = api
        .http
        .post(format!(
            "{}/v1/organisations/{org}/documents?title={}",
            api.url,
            title.replace(' ', "%20")
        ))
        .bearer_auth(&api.key)
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
}

async fn org_key(admin: &AdminApi, org: Uuid) -> AdminApi {
    let created = admin
        .admin(
            &format!("/v1/organisations/{org}/api-keys"),
            json!({ "name": "ops", "role": "org-admin" }),
        )
        .await;
    AdminApi::new(
        admin.url.clone(),
        created["key"].as_str().unwrap().to_owned(),
    )
}

async fn query(api: &AdminApi, body: Value) -> (Value, Option<String>) {
    let r = api
        .http
        .post(format!("{}/v1/query", api.url))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let cache = r
        .headers()
        .get("x-kip-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = r.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{text}");
    (serde_json::from_str(&text).unwrap(), cache)
}

fn cited<'a>(g: &'a Value, kind: &str) -> Vec<&'a Value> {
    g["citations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .collect()
}

/// What the OpenAI Python SDK gets from `kip-hybrid`: the model list, the answer and its
/// citations, and the streamed text.
const SDK_SCRIPT: &str = r#"
import json, os, sys
from openai import OpenAI
c = OpenAI(base_url=os.environ["KIP_URL"] + "/v1", api_key=os.environ["KIP_KEY"])
q = sys.argv[1]
models = [m.id for m in c.models.list()]
r = c.chat.completions.create(model="kip-hybrid", messages=[{"role": "user", "content": q}])
g = r.to_dict()["kip_grounding"]
s = c.chat.completions.create(model="kip-hybrid", messages=[{"role": "user", "content": q}],
                              stream=True)
streamed = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
print(json.dumps({"models": models, "content": r.choices[0].message.content,
                  "model": r.model, "grounding": g, "streamed": streamed}))
"#;

async fn python_sdk(url: &str, key: &str) -> Value {
    let out = tokio::process::Command::new("python3")
        .args(["-c", SDK_SCRIPT, QUESTION])
        .env("KIP_URL", url)
        .env("KIP_KEY", key)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the OpenAI Python SDK (pip install openai) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_organisation_gets_a_cited_answer_from_its_manual_and_readings_and_a_second_sees_none_of_it()
 {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", ANSWER))).await;
    let db = TestDb::create_empty().await;
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("control-plane.toml");
    std::fs::write(
        &config,
        format!(
            "[llm]\ndefault_model = \"openai/gpt-5\"\nlocal_fallback = false\n\
             [llm.providers.openai]\nkind = \"openai_compatible\"\nbase_url = \"{}\"\n\
             api_key = \"sk-test\"\nfree = true\nmodels = [\"gpt-5\"]\n\
             [llm.orchestrator]\ncandidates = [\"openai/gpt-5\"]\n",
            fake.base_url()
        ),
    )
    .unwrap();
    let cp = ControlPlaneProcess::new(&db.url, work.path()).with_config(config);
    let _proc = cp.spawn();
    let admin = cp.admin_api();

    // Organisation 1: documents, readings, prediction.
    let org1 = admin.create_org("acme").await;
    let api1 = org_key(&admin, org1).await;
    upload(
        &api1,
        org1,
        "Betriebsanleitung P1",
        "application/pdf",
        german_manual(),
    )
    .await;
    upload(
        &api1,
        org1,
        "Spindle procedure",
        "text/markdown",
        PROCEDURE_MD.into(),
    )
    .await;
    plant_data(&db.pool, org1).await;

    // /v1/query, hybrid mode.
    let hybrid = json!({"mode": "hybrid", "messages": [{"role": "user", "content": QUESTION}]});
    let (r, _) = query(&api1, hybrid.clone()).await;
    let g = &r["grounding"];
    assert_eq!(
        (g["mode"].as_str(), g["grounded"].as_bool()),
        (Some("hybrid"), Some(true)),
        "{r}"
    );
    let readings = cited(g, "reading");
    assert!(
        readings.iter().any(|c| c["machine"] == "press-1"
            && c["metric"] == "spindle_temp"
            && c["value"] == 81.5
            && c["ts"].is_string()),
        "{g}"
    );
    let docs = cited(g, "document");
    let manual = docs
        .iter()
        .find(|c| c["title"] == "Betriebsanleitung P1")
        .unwrap_or_else(|| panic!("the manual is not cited: {g}"));
    assert!(
        manual["chunk_id"].is_string() && manual["page"].as_i64() >= Some(1),
        "{manual}"
    );
    assert!(
        manual["char_end"].as_i64() > manual["char_start"].as_i64(),
        "{manual}"
    );
    // The model was handed the manual's German passage and the rising readings.
    let prompt = fake.requests()[0]["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        prompt.contains("Kühlmittel") && prompt.contains("rising, from 70.5"),
        "{prompt}"
    );

    // The official OpenAI Python SDK, model kip-hybrid.
    let sdk = python_sdk(&cp.admin_url(), &api1.key).await;
    assert!(
        sdk["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "kip-hybrid"),
        "{sdk}"
    );
    assert_eq!(
        (sdk["content"].as_str(), sdk["model"].as_str()),
        (Some(ANSWER), Some("kip-hybrid"))
    );
    assert_eq!(sdk["streamed"], ANSWER);
    let g = &sdk["grounding"];
    assert_eq!(g["grounded"], true, "{sdk}");
    assert!(
        cited(g, "reading")
            .iter()
            .any(|c| c["machine"] == "press-1"),
        "{g}"
    );
    assert!(
        cited(g, "document")
            .iter()
            .any(|c| c["title"] == "Betriebsanleitung P1"),
        "{g}"
    );

    // A cacheable grounded answer of organisation 1: the second ask is a cache hit.
    let grounded = json!({"mode": "grounded", "options": {"temperature": 0},
                          "messages": [{"role": "user", "content": QUESTION}]});
    let (_, cache) = query(&api1, grounded.clone()).await;
    assert_eq!(cache.as_deref(), Some("miss"));
    let (_, cache) = query(&api1, grounded.clone()).await;
    assert_eq!(cache.as_deref(), Some("hit"));

    // Organisation 2 asks the same: none of organisation 1's sources, no cache entry of it.
    let org2 = admin.create_org("globex").await;
    let api2 = org_key(&admin, org2).await;
    let before = fake.requests().len();
    let (r, cache) = query(&api2, grounded).await;
    assert_eq!(
        cache.as_deref(),
        Some("miss"),
        "organisation 2 got organisation 1's cache entry"
    );
    assert!(
        r["grounding"]["citations"].as_array().unwrap().is_empty(),
        "{r}"
    );
    let (r, _) = query(&api2, hybrid).await;
    assert_eq!(r["grounding"]["grounded"], false, "{r}");
    assert!(
        r["grounding"]["citations"].as_array().unwrap().is_empty(),
        "{r}"
    );
    let sdk = python_sdk(&cp.admin_url(), &api2.key).await;
    assert!(
        sdk["grounding"]["citations"].as_array().unwrap().is_empty(),
        "{sdk}"
    );
    for req in &fake.requests()[before..] {
        let text = req["messages"].to_string();
        assert!(
            !text.contains("press-1") && !text.contains("Kühlmittel") && !text.contains("coolant"),
            "organisation 1's data reached organisation 2's prompt: {text}"
        );
    }
    // In the database: under row-level security organisation 2 sees no chunk, and no reading
    // or prediction carries its id.
    let mut tx = kip_control_plane::documents::search::tenant_tx(&db.pool, org2)
        .await
        .unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM document_chunks")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let docs: i64 = sqlx::query_scalar("SELECT count(*) FROM documents")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!((chunks, docs), (0, 0));
    let mut tx = kip_control_plane::documents::search::tenant_tx(&db.pool, org1)
        .await
        .unwrap();
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM document_chunks")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(chunks >= 2, "organisation 1 has its chunks");
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM sensor_data WHERE org_id = $1) \
              + (SELECT count(*) FROM predictions WHERE org_id = $1)",
    )
    .bind(org2)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows, 0);
}
