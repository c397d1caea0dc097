//! LLM gateway behaviour against fake providers on loopback and a real PostgreSQL.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

mod common;

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use common::{App, app_with};
use http_body_util::BodyExt as _;
use kip_control_plane::llm::config::LlmConfig;
use kip_tests::{
    Mosquitto, eventually_ok,
    fake_llm::{self, FakeLlm, Reply},
    wait_until,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

/// `top` holds top-level `[llm]` keys; each provider is (name, kind, base_url, extra lines).
/// A provider without a price table is marked `free = true` (only configured models are
/// accepted).
fn llm_toml(top: &str, providers: &[(&str, &str, String, &str)]) -> String {
    let mut s = format!("{top}\n");
    for (name, kind, url, extra) in providers {
        let free = if extra.contains("prices") || extra.contains("free =") {
            ""
        } else {
            "free = true\n"
        };
        s.push_str(&format!(
            "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{url}\"\n{free}{extra}\n"
        ));
    }
    s
}

async fn gateway(pool: PgPool, toml: &str) -> App {
    let llm = LlmConfig::from_toml(toml, |v| (v == "FAKE_KEY").then(|| "sk-test-secret".into()))
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    app_with(pool, |c| c.llm = llm).await
}

fn user(text: &str) -> Value {
    json!([{ "role": "user", "content": text }])
}

async fn chat(app: &App, key: &str, body: Value) -> common::Resp {
    app.post("/v1/chat/completions", key, body).await
}

#[derive(Debug, sqlx::FromRow)]
struct LogRow {
    provider: String,
    model: String,
    status: String,
    cache_hit: bool,
    tokens_in: i32,
    tokens_out: i32,
    tokens_cached: i32,
    cost_usd: f64,
    ttft_ms: Option<f64>,
}

/// Waits (bounded) until the organisation has at least `n` log rows, then returns them all.
async fn log_rows(pool: &PgPool, org: &str, n: usize) -> Vec<LogRow> {
    let org: uuid::Uuid = org.parse().unwrap();
    eventually_ok(Duration::from_secs(10), || async move {
        let rows: Vec<LogRow> = sqlx::query_as(
            "SELECT provider, model, status, cache_hit, tokens_in, tokens_out, tokens_cached, \
             cost_usd, ttft_ms FROM inference_logs WHERE org_id = $1 ORDER BY id",
        )
        .bind(org)
        .fetch_all(pool)
        .await
        .unwrap();
        if rows.len() >= n {
            Ok(rows)
        } else {
            Err(format!(
                "{} of at least {n} inference_logs rows",
                rows.len()
            ))
        }
    })
    .await
}

async fn sse_request(app: &App, key: &str, body: Value) -> axum::response::Response {
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.router.clone().oneshot(req).await.unwrap()
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn chat_completion_is_passed_through_and_logged_with_its_cost(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", "hello"))).await;
    let toml = llm_toml(
        "",
        &[(
            "openai",
            "openai_compatible",
            fake.base_url(),
            "api_key_env = \"FAKE_KEY\"\nmodels = [\"gpt-5\"]\n[providers.openai.prices]\n\"gpt-5\" = { input_per_1m_usd = 1000000.0, output_per_1m_usd = 2000000.0 }",
        )],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let r = chat(
        &app,
        &key,
        json!({"model": "gpt-5", "messages": user("hi"), "some_future_sdk_field": {"x": 1}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, fake_llm::completion("gpt-5", "hello"));
    // Unknown fields reach the provider untouched; the key goes only to the provider.
    let sent = &fake.requests()[0];
    assert_eq!(sent["some_future_sdk_field"], json!({"x": 1}));
    assert_eq!(sent["model"], "gpt-5");
    assert_eq!(
        fake.auth_headers()[0].as_deref(),
        Some("Bearer sk-test-secret")
    );
    assert!(!format!("{:?}", app.state).contains("sk-test-secret"));

    let rows = log_rows(&pool, &org, 1).await;
    let row = &rows[0];
    assert_eq!(
        (
            row.provider.as_str(),
            row.model.as_str(),
            row.status.as_str()
        ),
        ("openai", "gpt-5", "ok")
    );
    assert_eq!((row.tokens_in, row.tokens_out), (12, 5));
    assert!(
        (row.cost_usd - (12.0 + 10.0)).abs() < 1e-9,
        "{}",
        row.cost_usd
    );
    assert!(!row.cache_hit);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn platform_key_is_refused_and_query_is_strict_while_chat_is_lenient(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    let toml = llm_toml(
        "default_model = \"p/m\"",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let admin = app.admin_key.clone();
    let r = chat(&app, &admin, json!({"messages": user("hi")})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app
        .post("/v1/query", &admin, json!({"messages": user("hi")}))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"messages": user("hi"), "temprature": 0}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.message().contains("temprature"), "{}", r.text);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"messages": user("hi"), "options": {"strategy": "fastest"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);

    let r = app
        .post("/v1/query", &key, json!({"messages": user("hi")}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["content"], "ok");
    assert_eq!(r.body["provider"], "p");
    assert_eq!(r.body["usage"]["input_tokens"], 12);

    let r = chat(
        &app,
        &key,
        json!({"model": "nope/x", "messages": user("hi")}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.message().contains("nope"), "{}", r.text);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(r.body["error"]["param"], "model");

    // What the gateway forwards is checked: OpenAI's 400 naming the parameter, nothing sent.
    let sent = fake.requests().len();
    for (body, param, code) in [
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
            "invalid_value",
        ),
        (
            json!({"messages": [{"content": "hi"}]}),
            "messages[0].role",
            "missing_required_parameter",
        ),
        (
            json!({"messages": [{"role": "user", "content": 7}]}),
            "messages[0].content",
            "invalid_type",
        ),
        (
            json!({"messages": user("hi"), "temperature": "hot"}),
            "temperature",
            "invalid_type",
        ),
        (
            json!({"messages": user("hi"), "temperature": 3}),
            "temperature",
            "decimal_above_max_value",
        ),
        (
            json!({"messages": user("hi"), "top_p": -0.5}),
            "top_p",
            "decimal_below_min_value",
        ),
        (
            json!({"messages": user("hi"), "max_tokens": "many"}),
            "max_tokens",
            "invalid_value",
        ),
        (
            json!({"messages": user("hi"), "n": 0}),
            "n",
            "invalid_value",
        ),
        (
            json!({"messages": user("hi"), "stream": "yes"}),
            "stream",
            "invalid_type",
        ),
        (json!({"messages": []}), "messages", "empty_array"),
        (
            json!({"model": 5, "messages": user("hi")}),
            "model",
            "invalid_type",
        ),
    ] {
        let r = chat(&app, &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        let e = &r.body["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}: {}", r.text);
        assert_eq!(e["param"], param, "{body}: {}", r.text);
        assert_eq!(e["code"], code, "{body}: {}", r.text);
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains(param.split('[').next().unwrap()),
            "{}",
            r.text
        );
    }
    let r = app
        .raw(
            axum::http::Request::post("/v1/chat/completions")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.body["error"]["type"], "invalid_request_error");
    assert_eq!(fake.requests().len(), sent, "nothing invalid was forwarded");

    // /v1/query is typed: the same mistakes are a 400 naming the field.
    for body in [
        json!({"messages": [{"role": "wizard", "content": "hi"}]}),
        json!({"messages": user("hi"), "options": {"temperature": "hot"}}),
    ] {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
    }
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"messages": user("hi"), "options": {"temperature": 3}}),
        )
        .await;
    assert!(r.status.is_client_error(), "{}", r.text);
    assert!(r.message().contains("temperature"), "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn deepseek_reasoning_and_cache_hit_tokens_reach_the_client(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::deepseek_completion(
        "42",
        "Let me think.",
    )))
    .await;
    let toml = llm_toml(
        "",
        &[(
            "deepseek",
            "deepseek",
            fake.base_url(),
            "models = [\"deepseek-reasoner\"]\n[providers.deepseek.prices]\n\"deepseek-reasoner\" = { input_per_1m_usd = 1000000.0, output_per_1m_usd = 0.0, cached_input_per_1m_usd = 0.0 }",
        )],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let r = chat(
        &app,
        &key,
        json!({"model": "deepseek/deepseek-reasoner", "messages": user("?")}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["choices"][0]["message"]["reasoning_content"],
        "Let me think."
    );
    assert_eq!(r.body["usage"]["prompt_cache_hit_tokens"], 64);
    assert_eq!(
        r.body["usage"]["prompt_tokens_details"]["cached_tokens"],
        64
    );

    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "deepseek-reasoner", "messages": user("?")}),
        )
        .await;
    assert_eq!(r.body["reasoning_content"], "Let me think.");
    assert_eq!(r.body["usage"]["cached_tokens"], 64);
    // 36 uncached prompt tokens at 1 USD each; cached ones free.
    assert!((r.body["cost_usd"].as_f64().unwrap() - 36.0).abs() < 1e-9);

    // Streaming: reasoning deltas and the usage chunk pass through.
    fake.set_default(Reply::Stream {
        events: fake_llm::deepseek_chunks(),
        gate: None,
    });
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "deepseek/deepseek-reasoner", "messages": user("?"), "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let reasoning: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, "Thinking.");
    let usage = events.last().unwrap();
    assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 64);

    let rows = log_rows(&pool, &org, 3).await;
    assert!(rows.iter().all(|r| r.tokens_cached == 64), "{rows:?}");
    assert!(rows[2].ttft_ms.is_some());
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn fallback_chain_survives_timeouts_malformed_json_and_dropped_connections(pool: PgPool) {
    let slow = FakeLlm::start(Reply::Slow(
        Duration::from_secs(5),
        Box::new(Reply::Json(fake_llm::completion("m", "late"))),
    ))
    .await;
    let malformed = FakeLlm::start(Reply::Malformed).await;
    let dropped = FakeLlm::start(Reply::Dropped).await;
    let good = FakeLlm::start(Reply::Json(fake_llm::completion("m", "from good"))).await;
    let toml = llm_toml(
        "max_retries = 0\n[aliases]\nchain = [\"slow/m\", \"malformed/m\", \"dropped/m\", \"good/m\"]",
        &[
            (
                "slow",
                "openai_compatible",
                slow.base_url(),
                "request_timeout_ms = 200",
            ),
            ("malformed", "openai_compatible", malformed.base_url(), ""),
            ("dropped", "openai_compatible", dropped.base_url(), ""),
            ("good", "openai_compatible", good.base_url(), ""),
        ],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "chain", "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["content"], "from good");
    assert_eq!(r.body["fallback_used"], true);
    let statuses: Vec<&str> = r.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["timeout", "malformed", "connection", "ok"]);
    let rows = log_rows(&pool, &org, 4).await;
    let logged: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(logged, ["timeout", "malformed", "connection", "ok"]);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn retries_back_off_and_honour_retry_after(pool: PgPool) {
    let a = FakeLlm::start(Reply::Json(fake_llm::completion("m", "third time"))).await;
    a.script([
        Reply::Status {
            status: 429,
            retry_after: Some("1"),
            retry_after_ms: Some("30"),
        },
        Reply::Status {
            status: 503,
            retry_after: None,
            retry_after_ms: None,
        },
    ]);
    let b = FakeLlm::start(Reply::Json(fake_llm::completion("m", "from b"))).await;
    let toml = llm_toml(
        "max_retries = 2\nretry_base_ms = 10\nretry_max_ms = 1000\n[fallbacks]\n\"a/m\" = [\"b/m\"]",
        &[
            ("a", "openai_compatible", a.base_url(), ""),
            ("b", "openai_compatible", b.base_url(), ""),
        ],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "a/m", "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["content"], "third time");
    assert_eq!(a.hits(), 3);
    let statuses: Vec<&str> = r.body["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["rate_limited", "server_error", "ok"]);

    // A retry-after longer than retry_max_ms is not waited for: the chain moves on at once.
    a.script([Reply::Status {
        status: 429,
        retry_after: Some("120"),
        retry_after_ms: None,
    }]);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "a/m", "messages": user("hi again")}),
        )
        .await;
    assert_eq!(r.body["content"], "from b", "{}", r.text);
    assert_eq!(a.hits(), 4);
    assert_eq!(b.hits(), 1);

    // A request the provider refuses for its content (400) is not retried elsewhere.
    a.script([Reply::Status {
        status: 400,
        retry_after: None,
        retry_after_ms: None,
    }]);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "a/m", "messages": user("bad")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.message().contains("fake error 400"), "{}", r.text);
    assert_eq!(b.hits(), 1);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn circuit_breaker_opens_after_consecutive_failures_and_probes_after_cooldown(pool: PgPool) {
    let bad = FakeLlm::start(Reply::Status {
        status: 500,
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    let toml = llm_toml(
        "max_retries = 0\nbreaker_failure_threshold = 2\nbreaker_cooldown_ms = 300",
        &[("bad", "openai_compatible", bad.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let ask = |text: &'static str| {
        let app = &app;
        let key = key.clone();
        async move {
            app.post(
                "/v1/query",
                &key,
                json!({"model": "bad/m", "messages": user(text)}),
            )
            .await
        }
    };
    for q in ["one", "two"] {
        let r = ask(q).await;
        assert_eq!(r.body["provider"], "kip-local", "{}", r.text);
    }
    assert_eq!(bad.hits(), 2);
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(
        metrics.contains("kip_llm_breaker_state{provider=\"bad\"} 2"),
        "{metrics}"
    );
    let r = ask("three").await;
    assert_eq!(bad.hits(), 2, "breaker open: the provider is not called");
    assert_eq!(r.body["attempts"][0]["status"], "breaker_open");
    let text = r.body["content"].as_str().unwrap();
    assert!(
        text.starts_with("[kip local fallback: no provider reachable]"),
        "{text}"
    );
    assert_eq!(r.body["model"], "kip-local-fallback");

    bad.set_default(Reply::Json(fake_llm::completion("m", "recovered")));
    // Positive signal instead of waiting out the cooldown: ask until the breaker lets a probe
    // through. Until then it is open: every answer is the fallback, the provider is not called.
    let r = eventually_ok(Duration::from_secs(10), || async {
        let r = ask("four").await;
        if r.body["content"] == "recovered" {
            return Ok(r);
        }
        assert_eq!(bad.hits(), 2, "breaker open: the provider is not called");
        assert_eq!(
            r.body["attempts"][0]["status"], "breaker_open",
            "{}",
            r.text
        );
        Err(r.text)
    })
    .await;
    assert_eq!(r.body["content"], "recovered", "{}", r.text);
    assert_eq!(bad.hits(), 3);
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains("kip_llm_breaker_state{provider=\"bad\"} 0"));
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn without_the_local_fallback_a_dead_chain_is_a_502(pool: PgPool) {
    // A port nobody listens on: connection refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let toml = llm_toml(
        "local_fallback = false\nmax_retries = 0",
        &[(
            "gone",
            "openai_compatible",
            format!("http://127.0.0.1:{port}/v1"),
            "",
        )],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let r = chat(
        &app,
        &key,
        json!({"model": "gone/m", "messages": user("hi")}),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(r.code(), "bad_gateway");
    assert!(r.message().contains("gone/m: connection"), "{}", r.text);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn monthly_budget_used_up_is_a_402(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    // 12 prompt tokens at 250,000 USD per million: 3 USD a call.
    let toml = llm_toml(
        "monthly_budget_usd = 5.0\nbudget_refresh_ms = 0",
        &[(
            "p",
            "openai_compatible",
            fake.base_url(),
            "[providers.p.prices]\nm = { input_per_1m_usd = 250000.0, output_per_1m_usd = 0.0 }",
        )],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let (other, other_key) = app.org_with_key("other").await;
    let body = json!({"model": "p/m", "messages": user("hi")});
    for n in 1..=2 {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            (r.body["cost_usd"].as_f64().unwrap() - 3.0).abs() < 1e-9,
            "{}",
            r.text
        );
        log_rows(&pool, &org, n).await;
    }
    // The spend ledger's flusher writes the month-to-date figure (in step with the log rows).
    spend_reaches(&pool, &org, 6.0).await;
    let org_id: uuid::Uuid = org.parse().unwrap();
    let (logged, spend): (f64, f64) = sqlx::query_as(
        "SELECT (SELECT sum(cost_usd) FROM inference_logs WHERE org_id = $1), \
                (SELECT usd FROM llm_spend WHERE org_id = $1)",
    )
    .bind(org_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        (logged - 6.0).abs() < 1e-9 && (spend - 6.0).abs() < 1e-9,
        "{logged} {spend}"
    );
    let r = app.post("/v1/query", &key, body.clone()).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text);
    assert_eq!(r.code(), "budget_exceeded");
    assert!(r.message().contains("5.00 USD"), "{}", r.text);
    assert!(r.message().contains("spent 6.0000 USD"), "{}", r.text);
    // Spend in an earlier month does not count; another organisation is unaffected.
    sqlx::query(
        "INSERT INTO llm_spend (org_id, month, usd) \
         VALUES ($1, (date_trunc('month', now() AT TIME ZONE 'UTC') - interval '1 month')::date, 100)",
    )
    .bind(other.parse::<uuid::Uuid>().unwrap())
    .execute(&pool)
    .await
    .unwrap();
    let r = app.post("/v1/query", &other_key, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = log_rows(&pool, &org, 3).await;
    assert!(
        rows.iter().any(|r| r.status == "budget_exceeded"),
        "{rows:?}"
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn rate_limit_per_organisation_is_a_429_with_retry_after(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    let toml = llm_toml(
        "rate_limit_per_minute = 1\nrate_limit_burst = 2",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let (_, other_key) = app.org_with_key("other").await;
    let body = json!({"model": "p/m", "messages": user("hi")});
    for _ in 0..2 {
        assert_eq!(chat(&app, &key, body.clone()).await.status, StatusCode::OK);
    }
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after), "{after}");
    let b: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(b["error"]["code"], "rate_limited");
    assert_eq!(fake.hits(), 2);
    assert_eq!(chat(&app, &other_key, body).await.status, StatusCode::OK);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn cache_answers_repeats_within_an_organisation_only(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "default"))).await;
    fake.script([
        Reply::Json(fake_llm::completion("m", "answer for acme")),
        Reply::Json(fake_llm::completion("m", "answer for other")),
    ]);
    let toml = llm_toml("", &[("p", "openai_compatible", fake.base_url(), "")]);
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let (_, other_key) = app.org_with_key("other").await;
    let body = json!({"model": "p/m", "messages": user("same question"), "temperature": 0});
    let first = chat(&app, &key, body.clone()).await;
    let second = chat(&app, &key, body.clone()).await;
    assert_eq!(fake.hits(), 1);
    assert_eq!(second.body, first.body);
    let other = chat(&app, &other_key, body.clone()).await;
    assert_eq!(
        fake.hits(),
        2,
        "another organisation never gets a cached answer"
    );
    assert_eq!(
        other.body["choices"][0]["message"]["content"],
        "answer for other"
    );

    // Field order does not matter; a non-deterministic request is not cached unless asked.
    let reordered = json!({"temperature": 0, "messages": user("same question"), "model": "p/m"});
    chat(&app, &key, reordered).await;
    assert_eq!(fake.hits(), 2);
    let hot = json!({"model": "p/m", "messages": user("same question"), "temperature": 0.9});
    chat(&app, &key, hot.clone()).await;
    chat(&app, &key, hot).await;
    assert_eq!(fake.hits(), 4);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("q"), "options": {"temperature": 0.9, "cache": true}}),
        )
        .await;
    assert_eq!(r.body["cache_hit"], false);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("q"), "options": {"temperature": 0.9, "cache": true}}),
        )
        .await;
    assert_eq!(r.body["cache_hit"], true, "{}", r.text);
    assert_eq!(fake.hits(), 5);
    let rows = log_rows(&pool, &org, 7).await;
    assert_eq!(rows.iter().filter(|r| r.cache_hit).count(), 3, "{rows:?}");
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains("kip_llm_cache_hits_total 3"), "{metrics}");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn stream_chunks_reach_the_client_before_the_provider_finished(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let fake = FakeLlm::start(Reply::Stream {
        events: fake_llm::text_chunks("m", &["Hel", "lo", "!"]),
        gate: Some(gate.clone()),
    })
    .await;
    let toml = llm_toml("", &[("p", "openai_compatible", fake.base_url(), "")]);
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The fake holds everything after its first event until the gate opens: receiving that
    // first event here proves the gateway forwards without buffering.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk did not arrive while the provider was still streaming")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("data: {"), "{first}");
    assert!(first.contains("\"role\":\"assistant\""), "{first}");
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    let text = first + std::str::from_utf8(&rest).unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(content, "Hello!");
    // The client did not ask for usage: kip asked for it (for the log) and kept it to itself.
    assert!(!text.contains("\"usage\""), "{text}");
    assert_eq!(fake.requests()[0]["stream_options"]["include_usage"], true);
    let rows = log_rows(&pool, &org, 1).await;
    assert_eq!(rows[0].status, "ok");
    assert_eq!(rows[0].tokens_out, 3);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn stream_falls_back_before_the_first_chunk_and_reports_a_cut_after_it(pool: PgPool) {
    let down = FakeLlm::start(Reply::Status {
        status: 502,
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    let up = FakeLlm::start(Reply::Stream {
        events: fake_llm::text_chunks("m", &["fine"]),
        gate: None,
    })
    .await;
    let toml = llm_toml(
        "max_retries = 0\n[aliases]\nc = [\"down/m\", \"up/m\"]",
        &[
            ("down", "openai_compatible", down.base_url(), ""),
            ("up", "openai_compatible", up.base_url(), ""),
        ],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "c", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.headers()["x-kip-target"], "up/m");
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("fine") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    up.set_default(Reply::StreamCut {
        events: fake_llm::text_chunks("m", &["par", "tial", "never"]),
        n: 3,
    });
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "up/m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    assert!(
        data[1].contains("par") && data[2].contains("tial"),
        "{text}"
    );
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "connection", "{text}");
    assert!(!text.contains("[DONE]"));
    let rows = log_rows(&pool, &org, 3).await;
    let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(statuses, ["server_error", "ok", "connection"]);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn tool_calls_pass_through_both_ways(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::tool_call_completion("m"))).await;
    let toml = llm_toml("", &[("p", "openai_compatible", fake.base_url(), "")]);
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let tools = json!([{"type": "function", "function": {"name": "get_temperature",
        "parameters": {"type": "object", "properties": {"machine": {"type": "string"}}}}}]);
    let r = chat(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("temp?"), "tools": tools, "tool_choice": "auto"}),
    )
    .await;
    assert_eq!(fake.requests()[0]["tools"], tools);
    assert_eq!(fake.requests()[0]["tool_choice"], "auto");
    assert_eq!(r.body, fake_llm::tool_call_completion("m"));

    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("temp?"), "options": {"tools": tools}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["tool_calls"][0]["function"]["name"],
        "get_temperature"
    );
    assert_eq!(r.body["finish_reason"], "tool_calls");

    // Streaming: deltas of two parallel calls, interleaved; joined by index they give both
    // calls with complete JSON arguments.
    fake.set_default(Reply::Stream {
        events: fake_llm::tool_call_chunks("m"),
        gate: None,
    });
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("temp?"), "tools": tools, "stream": true}),
    )
    .await;
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let mut calls: Vec<(String, String)> = Vec::new();
    for d in sse_data(&text) {
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        for tc in v["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, (String::new(), String::new()));
            }
            if let Some(n) = tc["function"]["name"].as_str() {
                calls[i].0.push_str(n);
            }
            calls[i]
                .1
                .push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(calls[0].0, "get_temperature");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].1).unwrap(),
        json!({"machine": "press-1"})
    );
    assert_eq!(calls[1].0, "get_pressure");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[1].1).unwrap(),
        json!({"machine": "press-2"})
    );
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn aleph_answers_from_the_callers_own_machines_only(pool: PgPool) {
    let app = gateway(pool.clone(), "").await;
    let (org, key) = app.org_with_key("acme").await;
    let (other_org, other_key) = app.org_with_key("other").await;
    for (o, k, dev, value) in [
        (&org, &key, "press-1", 71.5),
        (&other_org, &other_key, "press-9", 99.0),
    ] {
        let r = app
            .post(
                &format!("/v1/organisations/{o}/devices"),
                k,
                json!({"name": dev}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let dev_id: uuid::Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
        for (seq, v) in [(1_i64, value - 10.0), (2, value)] {
            sqlx::query(
                "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
                 VALUES ($1, $2, 0, $3, 'm1', 'temperature', now() - make_interval(secs => 10 - $3), $4)",
            )
            .bind(o.parse::<uuid::Uuid>().unwrap())
            .bind(dev_id)
            .bind(seq)
            .bind(v)
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"task": "machine_status", "messages": user("How hot is press-1?")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["provider"], "aleph");
    let text = r.body["content"].as_str().unwrap();
    assert!(
        text.contains("press-1") && text.contains("temperature = 71.5"),
        "{text}"
    );
    assert!(!text.contains("press-9") && !text.contains("99"), "{text}");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn cost_strategy_prefers_the_cheaper_target(pool: PgPool) {
    let pricey = FakeLlm::start(Reply::Json(fake_llm::completion("m", "pricey"))).await;
    let cheap = FakeLlm::start(Reply::Json(fake_llm::completion("m", "cheap"))).await;
    let toml = llm_toml(
        "[aliases]\nboth = [\"pricey/m\", \"cheap/m\"]",
        &[
            (
                "pricey",
                "openai_compatible",
                pricey.base_url(),
                "[providers.pricey.prices]\nm = { input_per_1m_usd = 10.0, output_per_1m_usd = 30.0 }",
            ),
            (
                "cheap",
                "openai_compatible",
                cheap.base_url(),
                "[providers.cheap.prices]\nm = { input_per_1m_usd = 0.1, output_per_1m_usd = 0.3 }",
            ),
        ],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "both", "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.body["content"], "pricey");
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "both", "messages": user("hi"), "options": {"strategy": "cost"}}),
        )
        .await;
    assert_eq!(r.body["content"], "cheap", "{}", r.text);
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "m", "messages": user("hi"), "options": {"provider": "cheap"}}),
        )
        .await;
    assert_eq!(r.body["content"], "cheap", "{}", r.text);
}

/// The official OpenAI Python SDK, an independent client, against the gateway over TCP.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn openai_python_sdk_works_against_chat_completions(pool: PgPool) {
    let check = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    match check {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "the OpenAI Python SDK is required for this test: run `pip install openai` \
             (python3 must be on PATH)"
        ),
    }
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", "unused"))).await;
    fake.script([
        Reply::Json(fake_llm::completion("gpt-5", "hello from kip")),
        Reply::Stream {
            events: fake_llm::text_chunks("gpt-5", &["str", "eam", "ed"]),
            gate: None,
        },
        Reply::Json(fake_llm::tool_call_completion("gpt-5")),
    ]);
    let toml = llm_toml(
        "",
        &[(
            "fake",
            "openai_compatible",
            fake.base_url(),
            "models = [\"gpt-5\"]",
        )],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router.clone();
    app.tracker
        .spawn(async move { axum::serve(listener, router).await });
    let script = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=20)
msgs = [{"role": "user", "content": "hi"}]
out = {}
r = c.chat.completions.create(model="fake/gpt-5", messages=msgs, temperature=0, user="u1")
out["content"] = r.choices[0].message.content
out["prompt_tokens"] = r.usage.prompt_tokens
s = c.chat.completions.create(model="gpt-5", messages=msgs, stream=True, stream_options={"include_usage": True})
parts, usage = [], None
for ch in s:
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
    if ch.usage:
        usage = ch.usage.completion_tokens
out["stream"] = "".join(parts)
out["stream_usage"] = usage
tools = [{"type": "function", "function": {"name": "get_temperature", "parameters": {"type": "object", "properties": {"machine": {"type": "string"}}}}}]
t = c.chat.completions.create(model="fake/gpt-5", messages=msgs, tools=tools)
tc = t.choices[0].message.tool_calls[0]
out["tool"] = [tc.function.name, json.loads(tc.function.arguments)]
try:
    c.chat.completions.create(model="nope/x", messages=msgs)
except openai.APIStatusError as e:
    out["error_status"] = e.status_code
bad = []
for kw in [dict(messages=[{"role": "wizard", "content": "hi"}]), dict(messages=msgs, temperature="hot"), dict(messages=msgs, temperature=3)]:
    try:
        c.chat.completions.create(model="fake/gpt-5", **kw)
        bad.append("accepted")
    except openai.BadRequestError as e:
        bad.append([e.status_code, e.body["type"], e.body["param"], e.code])
out["bad"] = bad
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
    assert_eq!(v["content"], "hello from kip");
    assert_eq!(v["prompt_tokens"], 12);
    assert_eq!(v["stream"], "streamed");
    assert_eq!(v["stream_usage"], 3);
    assert_eq!(
        v["tool"],
        json!(["get_temperature", {"machine": "press-1"}])
    );
    assert_eq!(v["error_status"], 400);
    assert_eq!(
        v["bad"],
        json!([
            [
                400,
                "invalid_request_error",
                "messages[0].role",
                "invalid_value"
            ],
            [400, "invalid_request_error", "temperature", "invalid_type"],
            [
                400,
                "invalid_request_error",
                "temperature",
                "decimal_above_max_value"
            ],
        ])
    );
    assert_eq!(fake.requests()[0]["user"], "u1");
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn log_writer_flushes_everything_queued_when_its_senders_are_dropped(pool: PgPool) {
    use kip_control_plane::llm::{logs, metrics::LlmMetrics};
    let app = gateway(pool.clone(), "").await;
    let (org, _) = app.org_with_key("acme").await;
    let org: uuid::Uuid = org.parse().unwrap();
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = LlmMetrics::register(&mut reg);
    let (sink, rx) = logs::LogSink::new(10_000, metrics.clone());
    let tracker = tokio_util::task::TaskTracker::new();
    // A long flush interval: only the closing of the queue can make the writer finish early.
    tracker.spawn(logs::run_writer(
        rx,
        pool.clone(),
        100,
        Duration::from_secs(3600),
        metrics.clone(),
    ));
    for i in 0..1234 {
        sink.record(logs::LogRecord {
            org_id: org,
            request_id: uuid::Uuid::new_v4(),
            provider: "p".into(),
            model: format!("m{i}"),
            tokens_in: i,
            tokens_out: 1,
            tokens_cached: 0,
            cost_usd: 0.001,
            latency_ms: 1.0,
            ttft_ms: None,
            status: "ok".into(),
            cache_hit: false,
        });
    }
    drop(sink);
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .expect("writer did not stop after its queue closed");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inference_logs WHERE org_id = $1")
        .bind(org)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1234);
    assert_eq!(metrics.log_rows_written.get(), 1234);
    assert_eq!(metrics.log_rows_dropped.get(), 0);
}

/// The writer inserts a batch unfiltered and lets the foreign key check organisations; a batch
/// with a row of an organisation deleted since its call is written again without such rows,
/// so the other organisations' rows are kept, in queue order.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn log_rows_of_a_deleted_organisation_are_skipped_and_the_batch_is_kept(pool: PgPool) {
    use kip_control_plane::llm::{logs, metrics::LlmMetrics};
    let app = gateway(pool.clone(), "").await;
    let (kept, _) = app.org_with_key("acme").await;
    let (gone, _) = app.org_with_key("gone").await;
    let kept: uuid::Uuid = kept.parse().unwrap();
    let gone: uuid::Uuid = gone.parse().unwrap();
    sqlx::query("DELETE FROM organisations WHERE id = $1")
        .bind(gone)
        .execute(&pool)
        .await
        .unwrap();
    let mut reg = prometheus_client::registry::Registry::default();
    let metrics = LlmMetrics::register(&mut reg);
    let (sink, rx) = logs::LogSink::new(1_000, metrics.clone());
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(logs::run_writer(
        rx,
        pool.clone(),
        1_000,
        Duration::from_secs(3600),
        metrics.clone(),
    ));
    for i in 0..300u64 {
        sink.record(logs::LogRecord {
            org_id: if i % 3 == 1 { gone } else { kept },
            request_id: uuid::Uuid::new_v4(),
            provider: "p".into(),
            model: format!("m{i}"),
            tokens_in: i,
            tokens_out: 1,
            tokens_cached: 0,
            cost_usd: 0.001,
            latency_ms: 1.0,
            ttft_ms: None,
            status: "ok".into(),
            cache_hit: false,
        });
    }
    drop(sink);
    tracker.close();
    tokio::time::timeout(Duration::from_secs(30), tracker.wait())
        .await
        .expect("writer did not stop after its queue closed");
    let rows: Vec<i32> =
        sqlx::query_scalar("SELECT tokens_in FROM inference_logs WHERE org_id = $1 ORDER BY id")
            .bind(kept)
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<i32> = (0..300).filter(|i| i % 3 != 1).collect();
    assert_eq!(
        rows, expected,
        "every row of the live organisation, in queue order"
    );
    let orphans: i64 = sqlx::query_scalar("SELECT count(*) FROM inference_logs WHERE org_id = $1")
        .bind(gone)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orphans, 0);
    assert_eq!(metrics.log_rows_written.get(), 200);
    assert_eq!(metrics.log_write_failures.get(), 0);
    assert_eq!(metrics.log_rows_dropped.get(), 0);
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn latency_strategy_learns_to_prefer_the_faster_target(pool: PgPool) {
    let slow = FakeLlm::start(Reply::Slow(
        Duration::from_millis(150),
        Box::new(Reply::Json(fake_llm::completion("m", "slow"))),
    ))
    .await;
    let fast = FakeLlm::start(Reply::Json(fake_llm::completion("m", "fast"))).await;
    let toml = llm_toml(
        "[aliases]\nboth = [\"slow/m\", \"fast/m\"]",
        &[
            ("slow", "openai_compatible", slow.base_url(), ""),
            ("fast", "openai_compatible", fast.base_url(), ""),
        ],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let body = json!({"model": "both", "messages": user("hi"), "options": {"strategy": "latency"}});
    // Unmeasured targets go first (in chain order), so both get measured.
    let first = app.post("/v1/query", &key, body.clone()).await;
    assert_eq!(first.body["content"], "slow", "{}", first.text);
    for _ in 0..3 {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.body["content"], "fast", "{}", r.text);
    }
    assert_eq!(slow.hits(), 1);
}

/// `llm.max_in_flight_requests` bounds concurrent LLM calls; a stream counts until its last
/// byte. Beyond the bound: 503 `overloaded` with `Retry-After`, counted, no provider call.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn calls_beyond_the_in_flight_limit_are_refused_with_503(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let fake = FakeLlm::start(Reply::Stream {
        events: fake_llm::text_chunks("m", &["a", "b"]),
        gate: Some(gate.clone()),
    })
    .await;
    let toml = llm_toml(
        "max_in_flight_requests = 1",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    // The stream is open: a second call is refused at once, before reaching the provider.
    let plain = json!({"model": "p/m", "messages": user("hi")});
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/query")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(plain.to_string()))
        .unwrap();
    let refused = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["retry-after"], "1");
    let b: Value =
        serde_json::from_slice(&refused.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(b["error"]["code"], "overloaded");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("llm.max_in_flight_requests"),
        "{b}"
    );
    assert_eq!(fake.hits(), 1);
    // The stream ends; its permit is returned and the next call goes through.
    gate.notify_one();
    body.collect().await.unwrap();
    fake.set_default(Reply::Json(fake_llm::completion("m", "ok")));
    let r = app.post("/v1/query", &key, plain).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(
        metrics.contains("kip_llm_refused_total{provider=\"-\",status=\"overloaded\"} 1"),
        "{metrics}"
    );
}

/// The test harness starts the system through `ControlPlane::builder`, like the binary: the
/// `inference_logs` writer stores a request's row, and the providers' background connections
/// run (the Aleph provider's MQTT client reaches its broker).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_harness_runs_the_log_writer_and_the_providers(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("gpt-5", "hello"))).await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(dir.path());
    let toml = llm_toml(
        "",
        &[(
            "fake",
            "openai_compatible",
            fake.base_url(),
            "models = [\"gpt-5\"]",
        )],
    ) + &format!(
        "[providers.aleph]\nkind = \"aleph\"\nmodels = [\"aleph\"]\n\
         [providers.aleph.mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n",
        broker.port
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let r = chat(
        &app,
        &key,
        json!({"model": "fake/gpt-5", "messages": user("hi")}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let rows = log_rows(&pool, &org, 1).await;
    assert_eq!(rows[0].provider, "fake");
    assert_eq!(rows[0].status, "ok");
    wait_until(
        Duration::from_secs(20),
        "the Aleph provider connects to its broker",
        || {
            let connected = app.state.metrics.llm.live_connected.get();
            async move { connected == 1 }
        },
    )
    .await;
}

// ---------- issue 13, holes 2-4: budgets, fallback amplification, tenant isolation ----------

/// Waits (bounded) until the organisation's month-to-date `llm_spend` reaches `usd`.
async fn spend_reaches(pool: &PgPool, org: &str, usd: f64) -> f64 {
    let org: uuid::Uuid = org.parse().unwrap();
    eventually_ok(Duration::from_secs(10), || async move {
        let spent = sqlx::query_scalar::<_, f64>(
            "SELECT COALESCE(sum(usd), 0)::float8 FROM llm_spend WHERE org_id = $1",
        )
        .bind(org)
        .fetch_one(pool)
        .await
        .unwrap();
        if spent >= usd - 1e-9 {
            Ok(spent)
        } else {
            Err(format!("llm_spend at {spent} USD, expected {usd} USD"))
        }
    })
    .await
}

/// Hole 2: a model without a price is not forwarded (it would cost 0 and bypass the budget);
/// the answer is OpenAI's `model_not_found` shape, naming the model.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn an_unpriced_model_is_refused_with_400_naming_it(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    let toml = llm_toml(
        "monthly_budget_usd = 0.05",
        &[(
            "openai",
            "openai_compatible",
            fake.base_url(),
            "[providers.openai.prices]\nm = { input_per_1m_usd = 1.0, output_per_1m_usd = 2.0 }",
        )],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    for uri in ["/v1/query", "/v1/chat/completions"] {
        let r = app
            .post(
                uri,
                &key,
                json!({"model": "openai/unlisted-x", "messages": user("hi")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text);
        assert_eq!(r.code(), "model_not_found", "{}", r.text);
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
        assert_eq!(r.body["error"]["param"], "model");
        assert!(r.message().contains("openai/unlisted-x"), "{}", r.text);
    }
    // As a fallback too.
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "openai/m", "messages": user("hi"),
                   "options": {"fallback": ["openai/unlisted-x"]}}),
        )
        .await;
    assert_eq!(r.code(), "model_not_found", "{}", r.text);
    assert_eq!(fake.hits(), 0, "nothing unpriced reached the provider");
    // The configured model works.
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "openai/m", "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // And a config listing a model without a price does not load.
    let err = LlmConfig::from_toml(
        "[providers.o]\nkind = \"openai_compatible\"\nbase_url = \"http://x\"\nmodels = [\"gpt-5\"]\n",
        |_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("llm.providers.o.prices") && err.contains("gpt-5"),
        "{err}"
    );
}

/// Hole 2: a client that drops a stream before the usage chunk is charged for the prompt
/// (estimated) and for the text it received (counted from the deltas).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_stream_dropped_before_its_usage_chunk_is_charged_from_the_tokens_seen(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let mut events = vec![
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant",
        "content": "x".repeat(400)}, "finish_reason": null}]}),
    ];
    events.extend(fake_llm::text_chunks("m", &["never", "sent"]));
    let fake = FakeLlm::start(Reply::Stream {
        events,
        gate: Some(gate.clone()),
    })
    .await;
    // 1 USD per output token, prompt tokens 0.01 USD each.
    let toml = llm_toml(
        "",
        &[(
            "p",
            "openai_compatible",
            fake.base_url(),
            "[providers.p.prices]\nm = { input_per_1m_usd = 10000.0, output_per_1m_usd = 1000000.0 }",
        )],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    assert!(first.into_data().unwrap().len() > 400);
    // The client goes away before the usage chunk.
    drop(body);
    let rows = log_rows(&pool, &org, 1).await;
    let row = &rows[0];
    assert_eq!(row.status, "client_closed", "{rows:?}");
    assert_eq!(row.tokens_out, 100, "400 characters streamed: {rows:?}");
    assert!(row.tokens_in > 0, "the prompt is estimated: {rows:?}");
    let expected = 100.0 + f64::from(row.tokens_in) * 0.01;
    assert!((row.cost_usd - expected).abs() < 1e-9, "{rows:?}");
    spend_reaches(&pool, &org, expected).await;
    gate.notify_one();
}

/// Hole 3: the fallback list is capped (400 naming the limit, no upstream call), and one
/// request's upstream calls are capped whatever its chain and retries.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn fallbacks_and_upstream_attempts_per_request_are_capped(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Status {
        status: 404,
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    let toml = llm_toml(
        "local_fallback = false\nmax_retries = 2\nretry_base_ms = 1\n\
         max_upstream_attempts_per_request = 4\nbreaker_failure_threshold = 1000",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let many: Vec<String> = (0..200).map(|i| format!("p/m{i}")).collect();
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("hi"), "options": {"fallback": many}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(
        r.message().contains("llm.max_fallbacks_per_request") && r.message().contains("3"),
        "{}",
        r.text
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("x-kip-fallback", many.join(","))
        .body(Body::from(
            json!({"model": "p/m", "messages": user("hi")}).to_string(),
        ))
        .unwrap();
    let resp = app.router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(fake.hits(), 0);
    // Within the cap: 404s move on once per target; 500s with retries stop at 4 calls.
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("hi"),
                   "options": {"fallback": ["p/a", "p/b", "p/c"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(fake.hits(), 4, "one call per target: {}", r.text);
    fake.set_default(Reply::Status {
        status: 500,
        retry_after: None,
        retry_after_ms: None,
    });
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"model": "p/m", "messages": user("hi"),
                   "options": {"fallback": ["p/a", "p/b", "p/c"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(fake.hits(), 8, "{}", r.text);
    assert!(r.message().contains("attempt_limit"), "{}", r.text);
}

/// Hole 3: a 404 (model unknown upstream) is a configuration error, not a success: it counts
/// toward the breaker.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn upstream_404s_open_the_breaker(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Status {
        status: 404,
        retry_after: None,
        retry_after_ms: None,
    })
    .await;
    let toml = llm_toml(
        "local_fallback = false\nmax_retries = 0\nbreaker_failure_threshold = 2\n\
         breaker_cooldown_ms = 3600000",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let body = json!({"model": "p/m", "messages": user("hi")});
    for _ in 0..2 {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    }
    let r = app.post("/v1/query", &key, body).await;
    assert!(r.message().contains("breaker_open"), "{}", r.text);
    assert_eq!(fake.hits(), 2);
}

/// Hole 4: one organisation's failures open its own breaker, not the others'.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn one_organisations_failures_do_not_open_the_breaker_for_another(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    let err = Reply::Status {
        status: 500,
        retry_after: None,
        retry_after_ms: None,
    };
    fake.script([err.clone(), err]);
    let toml = llm_toml(
        "local_fallback = false\nmax_retries = 0\nbreaker_failure_threshold = 2\n\
         breaker_cooldown_ms = 3600000",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("noisy").await;
    let (_, other_key) = app.org_with_key("quiet").await;
    let body = json!({"model": "p/m", "messages": user("hi")});
    for _ in 0..2 {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    }
    let r = app.post("/v1/query", &key, body.clone()).await;
    assert!(r.message().contains("breaker_open"), "{}", r.text);
    assert_eq!(fake.hits(), 2);
    let r = app.post("/v1/query", &other_key, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(fake.hits(), 3);
}

/// Hole 4: an organisation at its own in-flight limit is refused while another is served.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn the_in_flight_limit_per_organisation_leaves_room_for_others(pool: PgPool) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let fake = FakeLlm::start(Reply::Stream {
        events: fake_llm::text_chunks("m", &["a", "b"]),
        gate: Some(gate.clone()),
    })
    .await;
    let toml = llm_toml(
        "max_in_flight_requests = 10\nmax_in_flight_requests_per_org = 1",
        &[("p", "openai_compatible", fake.base_url(), "")],
    );
    let app = gateway(pool, &toml).await;
    let (_, key) = app.org_with_key("acme").await;
    let (_, other_key) = app.org_with_key("other").await;
    let resp = sse_request(
        &app,
        &key,
        json!({"model": "p/m", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first chunk")
        .unwrap()
        .unwrap();
    fake.set_default(Reply::Json(fake_llm::completion("m", "ok")));
    let plain = json!({"model": "p/m", "messages": user("hi")});
    let r = app.post("/v1/query", &key, plain.clone()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert!(
        r.message().contains("llm.max_in_flight_requests_per_org"),
        "{}",
        r.text
    );
    let r = app.post("/v1/query", &other_key, plain.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    gate.notify_one();
    body.collect().await.unwrap();
    let r = app.post("/v1/query", &key, plain).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// Hole 4: spend is never dropped with log rows. With the log writer stuck (its table locked)
/// and its queue full, every call's cost still reaches `llm_spend`, and the budget holds.
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_full_log_queue_still_records_spend_and_the_budget_holds(pool: PgPool) {
    let fake = FakeLlm::start(Reply::Json(fake_llm::completion("m", "ok"))).await;
    // 12 prompt tokens at 250,000 USD per million: 3 USD a call.
    let toml = llm_toml(
        "monthly_budget_usd = 10.0\nbudget_refresh_ms = 0\nlog_queue_capacity = 1\n\
         log_flush_interval_ms = 10",
        &[(
            "p",
            "openai_compatible",
            fake.base_url(),
            "[providers.p.prices]\nm = { input_per_1m_usd = 250000.0, output_per_1m_usd = 0.0 }",
        )],
    );
    let app = gateway(pool.clone(), &toml).await;
    let (org, key) = app.org_with_key("acme").await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE inference_logs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let body = json!({"model": "p/m", "messages": user("hi")});
    for i in 0..4 {
        let r = app.post("/v1/query", &key, body.clone()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        if i == 0 {
            // Positive signal: the log writer holds the first row and waits on the lock, so
            // the queue (capacity 1) takes the second row and must drop the third.
            wait_until(
                Duration::from_secs(20),
                "the log writer waits on the locked table",
                || async {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE wait_event_type = 'Lock' AND query ILIKE '%inference_logs%'",
                    )
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                    waiting > 0
                },
            )
            .await;
        }
    }
    // The fifth call: 12 USD spent of 10, refused although no log row was written.
    let r = app.post("/v1/query", &key, body).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text);
    assert_eq!(fake.hits(), 4);
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kip_llm_log_rows_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped >= 1.0, "the log queue overflowed: {metrics}");
    assert!((spend_reaches(&pool, &org, 12.0).await - 12.0).abs() < 1e-9);
    lock.rollback().await.unwrap();
}

/// Hole 4: Aleph reads a bounded window of synced data, not the organisation's whole history:
/// a series last seen two days ago is not read (nor shown).
#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn aleph_reads_a_bounded_window_of_synced_data(pool: PgPool) {
    let app = gateway(pool.clone(), "").await;
    let (org, key) = app.org_with_key("acme").await;
    let r = app
        .post(
            &format!("/v1/organisations/{org}/devices"),
            &key,
            json!({"name": "press-1"}),
        )
        .await;
    let dev_id: uuid::Uuid = r.body["id"].as_str().unwrap().parse().unwrap();
    for (seq, metric, age_h, v) in [
        (1_i64, "temperature", 0.01, 71.5),
        (2, "stale_pressure", 48.0, 3.25),
    ] {
        sqlx::query(
            "INSERT INTO sensor_data (org_id, device_id, epoch, seq, machine, metric, ts, value) \
             VALUES ($1, $2, 0, $3, 'm1', $4, now() - make_interval(secs => $5 * 3600), $6)",
        )
        .bind(org.parse::<uuid::Uuid>().unwrap())
        .bind(dev_id)
        .bind(seq)
        .bind(metric)
        .bind(age_h)
        .bind(v)
        .execute(&pool)
        .await
        .unwrap();
    }
    let r = app
        .post(
            "/v1/query",
            &key,
            json!({"task": "machine_status", "messages": user("How is press-1?")}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let text = r.body["content"].as_str().unwrap();
    assert!(text.contains("temperature = 71.5"), "{text}");
    assert!(!text.contains("stale_pressure"), "{text}");
}
