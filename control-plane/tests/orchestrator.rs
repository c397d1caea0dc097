//! The LLM orchestrator: the tool loop over the organisation's data, its limits, the hybrid
//! mode's best-of-n with a judge and its deterministic fallback, and the organisation's limits
//! on grounded and hybrid calls. Real PostgreSQL with pgvector, the real embedding model on
//! ONNX Runtime, fake OpenAI providers (`kip_tests::fake_llm`).
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
use kip_control_plane::{config::Config, documents::DocumentsConfig, llm::config::LlmConfig};
use kip_tests::{
    fake_llm::{self, FakeLlm, Reply},
    plant::{PROCEDURE_MD, QUESTION, german_manual, plant_data},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// The config of a test: the documents' embedding model and the `[llm]` section.
fn orch_config(llm_toml: &str) -> impl FnOnce(&mut Config) {
    let llm = LlmConfig::from_toml(llm_toml, |v| (v == "FAKE_KEY").then(|| "sk-test".into()))
        .unwrap_or_else(|e| panic!("{e}\n{llm_toml}"));
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/embedding"));
    assert!(
        dir.join("model.onnx").is_file(),
        "embedding model missing: run `source scripts/lib.sh && ensure_embedding_model`"
    );
    move |c: &mut Config| {
        c.documents = DocumentsConfig {
            model_dir: dir,
            ..DocumentsConfig::default()
        };
        c.llm = llm;
    }
}

async fn orch_app(pool: PgPool, llm_toml: &str) -> App {
    app_with(pool, orch_config(llm_toml)).await
}

fn provider(name: &str, url: &str, models: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"openai_compatible\"\nbase_url = \"{url}\"\nfree = true\n\
         api_key_env = \"FAKE_KEY\"\nmodels = [{models}]\n"
    )
}

async fn upload(app: &App, key: &str, org: &str, title: &str, ctype: &str, body: Vec<u8>) {
    let r = app
        .raw(
            Request::builder()
                .method(Method::POST)
                .uri(format!(
                    "/v1/organisations/{org}/documents?title={}",
                    title.replace(' ', "%20")
                ))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", ctype)
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

/// An organisation with the plant's readings, the German manual and the English procedure.
async fn plant_org(app: &App, pool: &PgPool, name: &str) -> (String, String) {
    let (org, key) = app.org_with_key(name).await;
    plant_data(pool, org.parse().unwrap()).await;
    upload(
        app,
        &key,
        &org,
        "Betriebsanleitung P1",
        "application/pdf",
        german_manual(),
    )
    .await;
    upload(
        app,
        &key,
        &org,
        "Spindle procedure",
        "text/markdown",
        PROCEDURE_MD.into(),
    )
    .await;
    (org, key)
}

async fn hybrid(app: &App, key: &str, model: Option<&str>) -> common::Resp {
    let mut body = json!({"mode": "hybrid", "messages": [{"role": "user", "content": QUESTION}]});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    app.post("/v1/query", key, body).await
}

/// The tool messages of a request the fake received.
fn tool_messages(req: &Value) -> Vec<String> {
    req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_model_calls_tools_over_its_own_organisation_and_cites_their_results(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", "unused"))).await;
    let app = orch_app(
        pool.clone(),
        &provider("openai", &fake.base_url(), "\"gpt-5\""),
    )
    .await;
    let (org_a, key_a) = plant_org(&app, &pool, "acme").await;
    let (_org_b, key_b) = app.org_with_key("globex").await;

    fake.script([
        Reply::Json(fake_llm::tool_calls_completion(
            "gpt-5",
            &[
                ("c1", "get_metric_history", r#"{"machine":"press-1","metric":"spindle_temp","hours":2,"bucket_minutes":10}"#),
                ("c2", "search_documents", r#"{"query":"Spindeltemperatur Kühlmittelfilter"}"#),
                // Bad arguments and an unknown tool come back to the model as tool errors.
                ("c3", "get_fleet_status", r#"{"state":"BROKEN"}"#),
                ("c4", "drop_tables", "{}"),
                ("c5", "get_latest_readings", "{not json"),
            ],
        )),
        Reply::Json(fake_llm::completion(
            "gpt-5",
            "The spindle of press-1 heated from 70.5 to 81.5 °C in half an hour [R1]; the \
             manual says to check the coolant flow and clean the coolant filter [D1].",
        )),
    ]);
    let r = hybrid(&app, &key_a, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let sent = fake.requests();
    assert_eq!(sent.len(), 2, "one step with tools, one answer");
    assert_eq!(sent[0]["tools"].as_array().unwrap().len(), 6);
    let results = tool_messages(&sent[1]);
    assert_eq!(results.len(), 5, "{results:?}");
    assert!(
        results[0].contains("\"buckets\"") && results[0].contains("\"max\":81.5"),
        "{}",
        results[0]
    );
    assert!(
        results[1].contains("\"marker\":\"D") && results[1].contains("hlmittel"),
        "{}",
        results[1]
    );
    assert!(
        results[2].contains("state must be ONLINE, STALE or OFFLINE"),
        "{}",
        results[2]
    );
    assert!(
        results[3].contains("unknown tool \\\"drop_tables\\\""),
        "{}",
        results[3]
    );
    assert!(
        results[4].contains("bad arguments for get_latest_readings"),
        "{}",
        results[4]
    );

    let g = &r.body["grounding"];
    assert_eq!(
        (g["mode"].as_str(), g["grounded"].as_bool()),
        (Some("hybrid"), Some(true)),
        "{}",
        r.text
    );
    let cites = g["citations"].as_array().unwrap();
    let reading = cites.iter().find(|c| c["kind"] == "reading").unwrap();
    assert_eq!(
        (&reading["machine"], &reading["metric"]),
        (&json!("press-1"), &json!("spindle_temp"))
    );
    assert!(
        cites
            .iter()
            .any(|c| c["kind"] == "document" && c["chunk_id"].is_string())
    );
    let statuses: Vec<&str> = g["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["caller"] == "model")
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["ok", "ok", "bad_arguments", "unknown_tool", "bad_arguments"]
    );

    // Stored beside the request's inference logs: sizes, never contents.
    let request_id: Uuid = r.body["request_id"].as_str().unwrap().parse().unwrap();
    let rows: Vec<(String, i32, i32, String)> = sqlx::query_as(
        "SELECT tool, arguments_bytes, result_bytes, status FROM llm_tool_calls \
         WHERE request_id = $1 AND org_id = $2 ORDER BY id",
    )
    .bind(request_id)
    .bind(org_a.parse::<Uuid>().unwrap())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].0, "get_metric_history");
    assert!(rows.iter().all(|r| r.1 > 0 && r.2 > 0), "{rows:?}");
    kip_tests::wait_until(
        std::time::Duration::from_secs(10),
        "two inference_logs rows of the request",
        || {
            let pool = pool.clone();
            async move {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM inference_logs WHERE request_id = $1")
                        .bind(request_id)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                n == 2
            }
        },
    )
    .await;

    // Organisation B's model asks the same tools: it gets none of A's data.
    let before = fake.requests().len();
    fake.script([
        Reply::Json(fake_llm::tool_calls_completion(
            "gpt-5",
            &[
                ("c1", "get_latest_readings", r#"{"machine":"press-1"}"#),
                (
                    "c2",
                    "search_documents",
                    r#"{"query":"Spindeltemperatur coolant filter"}"#,
                ),
                ("c3", "get_predictions", "{}"),
            ],
        )),
        Reply::Json(fake_llm::completion("gpt-5", "I found nothing [R1].")),
    ]);
    let r = hybrid(&app, &key_b, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let results = tool_messages(&fake.requests()[before + 1]);
    assert_eq!(
        results,
        [
            r#"{"readings":[]}"#,
            r#"{"passages":[]}"#,
            r#"{"predictions":[]}"#
        ]
    );
    assert_eq!(r.body["grounding"]["grounded"], false, "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_tool_loop_stops_at_its_step_and_tool_call_limits(pool: PgPool) {
    // A model that never stops calling tools.
    let fake = FakeLlm::start(Reply::Json(fake_llm::tool_calls_completion(
        "gpt-5",
        &[
            ("a", "get_fleet_status", "{}"),
            ("b", "get_fleet_status", "{}"),
        ],
    )))
    .await;
    let toml = format!(
        "{}[orchestrator]\nmax_steps = 3\nmax_tool_calls = 3\n",
        provider("openai", &fake.base_url(), "\"gpt-5\"")
    );
    let app = orch_app(pool.clone(), &toml).await;
    let (_org, key) = app.org_with_key("acme").await;
    let r = hybrid(&app, &key, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let sent = fake.requests();
    assert_eq!(sent.len(), 3, "max_steps model calls");
    assert!(
        sent[2].get("tools").is_none(),
        "the last step offers no tools"
    );
    let c = &r.body["orchestration"]["candidates"][0];
    assert_eq!(
        (c["stop"].as_str(), c["steps"].as_u64()),
        (Some("max_steps"), Some(3))
    );
    let statuses: Vec<&str> = r.body["grounding"]["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["caller"] == "model")
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ok", "ok", "ok", "limit"]);
    assert!(tool_messages(&sent[2])[3].contains("tool call limit of 3"));

    // The token limit: each step uses 40 tokens, so the loop stops after the third (120 > 100).
    let before = fake.requests().len();
    let toml = format!(
        "{}[orchestrator]\nmax_steps = 10\nmax_total_tokens = 100\n",
        provider("openai", &fake.base_url(), "\"gpt-5\"")
    );
    let app = app.replica(orch_config(&toml)).await;
    let (_org, key) = app.org_with_key("globex").await;
    let r = hybrid(&app, &key, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let c = &r.body["orchestration"]["candidates"][0];
    assert_eq!(
        (c["stop"].as_str(), c["steps"].as_u64()),
        (Some("max_tokens"), Some(3))
    );
    assert_eq!(fake.requests().len() - before, 3);
    assert_eq!(r.body["usage"]["input_tokens"], 90, "{}", r.text);

    // Limits are validated at load, naming the field.
    let e = LlmConfig::from_toml("[orchestrator]\nmax_steps = 0\n", |_| None).unwrap_err();
    assert!(e.to_string().contains("llm.orchestrator.max_steps"), "{e}");
    let e =
        LlmConfig::from_toml("[orchestrator]\ncandidates = [\"nope/x\"]\n", |_| None).unwrap_err();
    assert!(e.to_string().contains("llm.orchestrator.candidates"), "{e}");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn best_of_n_lets_the_judge_pick_and_without_models_the_answer_is_assembled(pool: PgPool) {
    let a = FakeLlm::start(Reply::Json(fake_llm::completion(
        "m",
        "Rising [R1]; check coolant [D1]; RUL is low [P1].",
    )))
    .await;
    let b = FakeLlm::start(Reply::Json(fake_llm::completion(
        "m",
        "Press-1 spindle is at 81.5 °C and rising [R1].",
    )))
    .await;
    let judge = FakeLlm::start(Reply::Json(fake_llm::completion(
        "j",
        "{\"thinking\": \"B is precise\", \"answer_choice\": 1}",
    )))
    .await;
    let toml = format!(
        "{}{}{}[orchestrator]\ncandidates = [\"a/m\", \"b/m\"]\njudge_model = \"judge/j\"\n",
        provider("a", &a.base_url(), "\"m\""),
        provider("b", &b.base_url(), "\"m\""),
        provider("judge", &judge.base_url(), "\"j\""),
    );
    let app = orch_app(pool.clone(), &toml).await;
    let (_org, key) = plant_org(&app, &pool, "acme").await;
    let r = hybrid(&app, &key, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Without the judge the heuristic would take A (three citations); the judge chose B.
    assert_eq!(
        r.body["content"],
        "Press-1 spindle is at 81.5 °C and rising [R1]."
    );
    assert_eq!(
        (r.body["provider"].as_str(), r.body["model"].as_str()),
        (Some("b"), Some("m"))
    );
    let o = &r.body["orchestration"];
    assert_eq!(
        (o["judge"]["status"].as_str(), o["judge"]["choice"].as_u64()),
        (Some("ok"), Some(1))
    );
    assert_eq!(o["candidates"][0]["citations"], 3);
    let prompt = judge.requests()[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        prompt.contains("Candidate 0:") && prompt.contains("Candidate 1:"),
        "{prompt}"
    );
    assert_eq!(r.body["grounding"]["citations"][0]["kind"], "reading");

    // The chat alias needs a user message with text: an OpenAI-shaped 400 otherwise.
    let r = app
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "kip-hybrid", "messages": [{"role": "system", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(
        (
            r.body["error"]["type"].as_str(),
            r.body["error"]["param"].as_str()
        ),
        (Some("invalid_request_error"), Some("messages"))
    );
    // The alias is listed by /v1/models.
    let m = app.get("/v1/models", &key).await;
    assert!(
        m.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == "kip-hybrid"),
        "{}",
        m.text
    );

    // No model reachable: the answer is assembled from the sources, labelled, and logged.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let toml = format!(
        "local_fallback = false\nmax_retries = 0\n{}[orchestrator]\ncandidates = [\"a/m\"]\n",
        provider("a", &dead, "\"m\"")
    );
    let app = app.replica(orch_config(&toml)).await;
    let (org, key) = plant_org(&app, &pool, "initech").await;
    let r = hybrid(&app, &key, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let content = r.body["content"].as_str().unwrap();
    assert!(
        content.contains("deterministic fallback")
            && content.contains("press-1 / spindle_temp = 81.5"),
        "{content}"
    );
    let g = &r.body["grounding"];
    assert_eq!(
        (g["mode"].as_str(), g["grounded"].as_bool()),
        (Some("fallback"), Some(true))
    );
    assert_eq!(
        r.body["orchestration"]["candidates"][0]["status"],
        "all_failed"
    );
    let request_id: Uuid = r.body["request_id"].as_str().unwrap().parse().unwrap();
    let org: Uuid = org.parse().unwrap();
    kip_tests::wait_until(std::time::Duration::from_secs(10), "the fallback answer is logged", || {
        let pool = pool.clone();
        async move {
            let s: Vec<String> = sqlx::query_scalar(
                "SELECT status FROM inference_logs WHERE request_id = $1 AND org_id = $2 ORDER BY id",
            )
            .bind(request_id)
            .bind(org)
            .fetch_all(&pool)
            .await
            .unwrap();
            s.last().map(String::as_str) == Some("fallback")
        }
    })
    .await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn grounded_and_hybrid_answers_count_against_the_organisations_rate_limit(pool: PgPool) {
    // No model is configured: grounded and hybrid modes answer from the sources. Before the
    // fix, grounded mode answered this way without admission (no rate limit, nothing logged).
    let app = orch_app(
        pool.clone(),
        "rate_limit_per_minute = 1\nrate_limit_burst = 1\n",
    )
    .await;
    for mode in ["grounded", "hybrid"] {
        let (org, key) = app.org_with_key(&format!("org-{mode}")).await;
        let body = json!({"mode": mode, "messages": [{"role": "user", "content": QUESTION}]});
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{mode}: {}", r.text);
        assert_eq!(r.body["grounding"]["mode"], "fallback", "{}", r.text);
        let r = app.post("/v1/query", &key, body).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{mode}: {}",
            r.text
        );
        let org: Uuid = org.parse().unwrap();
        kip_tests::wait_until(
            std::time::Duration::from_secs(10),
            "the answer and the refusal are logged",
            || {
                let pool = pool.clone();
                async move {
                    let s: Vec<String> = sqlx::query_scalar(
                        "SELECT status FROM inference_logs WHERE org_id = $1 ORDER BY id",
                    )
                    .bind(org)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    s == ["fallback", "rate_limited"]
                }
            },
        )
        .await;
    }
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn hybrid_calls_are_metered_and_stop_at_the_monthly_budget(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", "Hot [R1]."))).await;
    // 12 prompt tokens at 250000 USD per million: 3 USD per model call, budget 5 USD.
    let toml = format!(
        "monthly_budget_usd = 5.0\nbudget_refresh_ms = 0\n\
         [providers.openai]\nkind = \"openai_compatible\"\nbase_url = \"{}\"\n\
         api_key_env = \"FAKE_KEY\"\nmodels = [\"gpt-5\"]\n\
         [providers.openai.prices]\n\"gpt-5\" = {{ input_per_1m_usd = 250000.0, output_per_1m_usd = 0.0 }}\n",
        fake.base_url()
    );
    let app = orch_app(pool.clone(), &toml).await;
    let (org, key) = plant_org(&app, &pool, "acme").await;
    let r = hybrid(&app, &key, Some("openai/gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["cost_usd"], 3.0, "{}", r.text);
    let r = hybrid(&app, &key, Some("openai/gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // 6 USD spent: the third call is refused (402) before any model call.
    let hits = fake.hits();
    let r = hybrid(&app, &key, Some("openai/gpt-5")).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text);
    assert_eq!(fake.hits(), hits);
    let org: Uuid = org.parse().unwrap();
    kip_tests::wait_until(
        std::time::Duration::from_secs(10),
        "the spend of both calls in llm_spend",
        || {
            let pool = pool.clone();
            async move {
                let spent: Option<f64> =
                    sqlx::query_scalar("SELECT sum(usd) FROM llm_spend WHERE org_id = $1")
                        .bind(org)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                spent == Some(6.0)
            }
        },
    )
    .await;
}

/// A fake agent of `org`'s device `device` on `port`: answers live requests with `values`
/// while `answering` is set; every request it receives is recorded.
#[expect(
    clippy::too_many_arguments,
    reason = "the fake agent's inputs are independent; a struct would only rename them"
)]
fn fake_agent(
    port: u16,
    org: Uuid,
    device: &str,
    values: Vec<kip_shared::live::LiveValue>,
    answering: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: std::sync::Arc<std::sync::Mutex<Vec<kip_shared::live::LiveRequest>>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: &tokio_util::task::TaskTracker,
) -> tokio::sync::oneshot::Receiver<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new(format!("fake-agent-{}", Uuid::new_v4()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (agent, mut events) = AsyncClient::new(opts, 16);
    let topic = kip_shared::live::request_topic("kip/v1", org, device);
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tasks.spawn(async move {
        agent.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            let ev = tokio::select! {
                () = stop.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let req = kip_shared::live::LiveRequest::decode(&p.payload).unwrap();
                    seen.lock().unwrap().push(req.clone());
                    if !answering.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    let answer = kip_shared::live::LiveResponse {
                        v: kip_shared::live::LIVE_PROTOCOL_VERSION,
                        request_id: req.request_id,
                        org_id: req.org_id,
                        device: req.device.clone(),
                        agent_time: chrono::Utc::now(),
                        values: values.clone(),
                        predictions: vec![],
                        truncated: false,
                    };
                    agent
                        .publish(&req.reply_to, QoS::AtLeastOnce, false, answer.encode())
                        .await
                        .unwrap();
                }
                Ok(_) => {}
                Err(e) => panic!("fake agent: {e}"),
            }
        }
    });
    subscribed
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn hybrid_asks_the_named_machines_agent_live_and_falls_back_to_stored_readings(pool: PgPool) {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = kip_tests::Mosquitto::start_plain(dir.path());
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion(
        "gpt-5",
        "Live the spindle of press-1 is at 83.25 °C [L1] (stored 81.5 °C [R1]); clean the \
         coolant filter [D1].",
    )))
    .await;
    let toml = format!(
        "{}[providers.aleph]\nkind = \"aleph\"\nmodels = [\"aleph\"]\n\
         [providers.aleph.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"cp-hybrid-{}\"\n\
         request_timeout_ms = 800\n[orchestrator]\nsources_timeout_ms = 2000\n",
        provider("openai", &fake.base_url(), "\"gpt-5\""),
        broker.port,
        Uuid::new_v4().simple()
    );
    let app = orch_app(pool.clone(), &toml).await;
    let (org_a, key_a) = plant_org(&app, &pool, "acme").await;
    let (org_b, key_b) = plant_org(&app, &pool, "globex").await;
    let org_a: Uuid = org_a.parse().unwrap();
    let live = app.state.llm.live_client().expect("aleph has mqtt");
    kip_tests::wait_until(
        std::time::Duration::from_secs(20),
        "the live client subscribed",
        || {
            let l = live.clone();
            async move { l.connected() }
        },
    )
    .await;
    let measured = chrono::Utc::now() - chrono::Duration::seconds(2);
    let value = |machine: &str, metric: &str, v: f64| kip_shared::live::LiveValue {
        source: "plc".into(),
        machine: machine.into(),
        metric: metric.into(),
        value: v,
        ts: measured,
        quality: kip_shared::Quality::Good,
    };
    let answering = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    let subscribed = fake_agent(
        broker.port,
        org_a,
        "press-gw",
        vec![
            value("press-1", "spindle_temp", 83.25),
            // A machine the question does not name: not handed to the model.
            value("oven-7", "zone_temp", 212.0),
        ],
        answering.clone(),
        seen.clone(),
        stop.clone(),
        &tasks,
    );
    tokio::time::timeout(std::time::Duration::from_secs(20), subscribed)
        .await
        .unwrap()
        .unwrap();

    let r = hybrid(&app, &key_a, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g = &r.body["grounding"];
    let live_cite = g["citations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == "live")
        .unwrap_or_else(|| panic!("no live citation: {}", r.text));
    assert_eq!(
        (
            live_cite["kind"].as_str(),
            live_cite["device"].as_str(),
            live_cite["machine"].as_str(),
            live_cite["metric"].as_str(),
            live_cite["value"].as_f64()
        ),
        (
            Some("reading"),
            Some("press-gw"),
            Some("press-1"),
            Some("spindle_temp"),
            Some(83.25)
        )
    );
    let ts: chrono::DateTime<chrono::Utc> = live_cite["ts"].as_str().unwrap().parse().unwrap();
    assert_eq!(ts, measured);
    assert!(
        g["citations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["source"] == "stored" && c["metric"] == "spindle_temp"),
        "{}",
        r.text
    );
    let live_call = g["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["tool"] == "live_values")
        .unwrap();
    assert_eq!(
        (live_call["status"].as_str(), live_call["results"].as_u64()),
        (Some("ok"), Some(1))
    );
    let prompt = fake.requests().last().unwrap()["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        prompt.contains("[L1] press-gw / press-1 / spindle_temp = 83.25"),
        "{prompt}"
    );
    assert!(!prompt.contains("oven-7"), "{prompt}");
    assert_eq!(seen.lock().unwrap().len(), 1, "one device asked once");

    // The agent goes silent: the answer comes by the deadline, from stored readings, with a
    // note; the model's [L1] names no source any more and is removed.
    answering.store(false, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let r = hybrid(&app, &key_a, Some("gpt-5")).await;
    let took = t.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    let g = &r.body["grounding"];
    assert!(
        g["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with(
                "press-gw did not answer within 800 ms over MQTT; its stored readings"
            )),
        "{}",
        r.text
    );
    assert!(
        !g["citations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["source"] == "live")
    );
    assert!(
        g["citations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["source"] == "stored" && c["value"] == 81.5),
        "{}",
        r.text
    );
    let content = r.body["content"].as_str().unwrap();
    assert!(!content.contains("[L1]"), "{content}");
    let prompt = fake.requests().last().unwrap()["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(prompt.contains("press-gw did not answer"), "{prompt}");
    assert!(
        g["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["tool"] == "live_values" && c["status"] == "timeout"),
        "{}",
        r.text
    );

    // Organisation B asks the same question: its request goes to its own topics only (the
    // agent of A hears nothing) and none of A's live values reach its answer.
    answering.store(true, Ordering::SeqCst);
    let before = seen.lock().unwrap().len();
    let r = hybrid(&app, &key_b, Some("gpt-5")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let prompt = fake.requests().last().unwrap()["messages"][0]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!prompt.contains("83.25"), "{prompt}");
    assert!(
        !r.body["grounding"]["citations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["source"] == "live")
    );
    assert_eq!(seen.lock().unwrap().len(), before);
    assert!(
        r.body["grounding"]["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("press-gw did not answer")),
        "{}",
        r.text
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|q| q.org_id == org_a && q.reply_to.contains(&org_a.to_string()))
    );
    let _ = org_b;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn mixture_of_n_fuses_the_candidates_and_keeps_only_citations_of_given_sources(pool: PgPool) {
    let a = FakeLlm::start(Reply::Json(fake_llm::completion(
        "m",
        "The spindle is rising [R1]; check the coolant [D1].",
    )))
    .await;
    let b = FakeLlm::start(Reply::Json(fake_llm::completion(
        "m",
        "Press-1 is at 81.5 °C [R1], its remaining life is short [P1], see the manual [D1].",
    )))
    .await;
    let fuser = FakeLlm::start(Reply::Json(fake_llm::completion(
        "f",
        "The spindle of press-1 is at 81.5 °C and rising [R1]; clean the coolant filter [D1]; \
         remaining life 42 cycles [P1] [D9]. Made up [R7, P1].",
    )))
    .await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let toml = |fuser_url: &str, cand_url: &str| {
        format!(
            "local_fallback = false\nmax_retries = 0\n{}{}{}\
             [orchestrator]\ncandidates = [\"a/m\", \"b/m\"]\nfuser_model = \"fuser/f\"\n",
            provider("a", cand_url, "\"m\""),
            provider("b", &b.base_url(), "\"m\""),
            provider("fuser", fuser_url, "\"f\""),
        )
    };
    let app = orch_app(pool.clone(), &toml(&fuser.base_url(), &a.base_url())).await;
    let (_org, key) = plant_org(&app, &pool, "acme").await;

    // The configured strategy is best_of_n; the request asks for mixture_of_n.
    let body = json!({"mode": "hybrid", "hybrid_strategy": "mixture_of_n",
                      "messages": [{"role": "user", "content": QUESTION}]});
    let r = app.post("/v1/query", &key, body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["content"],
        "The spindle of press-1 is at 81.5 °C and rising [R1]; clean the coolant filter [D1]; \
         remaining life 42 cycles [P1]. Made up [P1]."
    );
    assert_eq!(
        (r.body["provider"].as_str(), r.body["model"].as_str()),
        (Some("fuser"), Some("f"))
    );
    let o = &r.body["orchestration"];
    assert_eq!(o["strategy"], "mixture_of_n");
    assert_eq!(o["fuser"]["status"], "ok", "{}", r.text);
    assert_eq!(o["fuser"]["rejected_markers"], json!(["D9", "R7"]));
    let kinds: Vec<&str> = r.body["grounding"]["citations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["document", "reading", "prediction"], "{}", r.text);
    let prompt = fuser.requests()[0]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        prompt.contains("Candidate answer 0:\nThe spindle is rising [R1]")
            && prompt.contains("Candidate answer 1:\nPress-1 is at 81.5")
            && prompt.contains("[P1] press-gw / press-1"),
        "{prompt}"
    );

    // Through the chat alias with the header.
    let r = app
        .raw(
            Request::builder()
                .method(Method::POST)
                .uri("/v1/chat/completions")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .header("x-kip-hybrid-strategy", "mixture_of_n")
                .body(Body::from(
                    json!({"model": "kip-hybrid",
                           "messages": [{"role": "user", "content": QUESTION}]})
                    .to_string(),
                ))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["kip_grounding"]["strategy"], "mixture_of_n");
    assert!(
        !r.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("D9")
    );

    // The fuser fails: the candidate citing the most sources (B) is the answer.
    let app = app
        .replica(orch_config(&format!(
            "{}strategy = \"mixture_of_n\"\n",
            toml(&dead, &a.base_url())
        )))
        .await;
    let (_org, key) = plant_org(&app, &pool, "initech").await;
    let r = hybrid(&app, &key, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["orchestration"]["fuser"]["status"], "all_failed");
    assert_eq!(
        (
            r.body["provider"].as_str(),
            r.body["grounding"]["mode"].as_str()
        ),
        (Some("b"), Some("hybrid"))
    );
    assert!(
        r.body["content"]
            .as_str()
            .unwrap()
            .starts_with("Press-1 is at 81.5")
    );

    // No candidate and no fuser reachable: the deterministic answer, labelled.
    let app = app
        .replica(orch_config(&format!(
            "local_fallback = false\nmax_retries = 0\n{}{}{}\
             [orchestrator]\ncandidates = [\"a/m\", \"b/m\"]\nfuser_model = \"fuser/f\"\n\
             strategy = \"mixture_of_n\"\n",
            provider("a", &dead, "\"m\""),
            provider("b", &dead, "\"m\""),
            provider("fuser", &dead, "\"f\""),
        )))
        .await;
    let (_org, key) = plant_org(&app, &pool, "umbrella").await;
    let r = hybrid(&app, &key, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["grounding"]["mode"], "fallback", "{}", r.text);
    assert!(
        r.body["content"]
            .as_str()
            .unwrap()
            .contains("deterministic fallback")
    );

    // The strategy is validated: config at load, the request by its enum.
    let e = LlmConfig::from_toml("[orchestrator]\nstrategy = \"vote\"\n", |_| None).unwrap_err();
    assert!(e.to_string().contains("best_of_n"), "{e}");
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"mode": "hybrid", "hybrid_strategy": "vote",
                   "messages": [{"role": "user", "content": QUESTION}]}),
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
}
