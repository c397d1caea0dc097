//! Helpers for the control plane's router tests: an app on a fresh database, keys, requests.
//!
//! The app is started by [`ControlPlane::builder`], the same path as the binary, so the
//! `inference_logs` writer, the LLM providers and (when configured) the PKI run here as in
//! production; only the admin listener is left out (requests go through `oneshot`).
#![allow(dead_code)]

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode},
};
use http_body_util::BodyExt as _;
use kip_control_plane::{ControlPlane, config::Config, state::AppState};
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt as _;

pub struct App {
    pub router: Router,
    pub pool: PgPool,
    pub admin_key: String,
    pub state: AppState,
    pub tracker: tokio_util::task::TaskTracker,
    /// The running system; dropping it stops its background services.
    pub cp: ControlPlane,
    _dir: tempfile::TempDir,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub text: String,
}

impl Resp {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

pub async fn app(pool: PgPool) -> App {
    app_with(pool, |_| {}).await
}

pub async fn app_with(pool: PgPool, tweak: impl FnOnce(&mut Config)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("admin.key");
    let mut cfg = Config::load(None, |_| None).unwrap();
    cfg.admin_key_file = key_file.clone();
    tweak(&mut cfg);
    let cp = start(pool.clone(), cfg).await;
    let admin_key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    App::new(cp, pool, admin_key, dir)
}

/// Starts the system on `pool` the way the binary does, without the admin listener.
pub async fn start(pool: PgPool, cfg: Config) -> ControlPlane {
    ControlPlane::builder(cfg)
        .pool(pool)
        .without_admin_listener()
        .agent_listener(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .start()
        .await
        .unwrap()
}

impl App {
    /// A second control-plane replica on the same database (its own in-process state).
    pub async fn replica(&self, tweak: impl FnOnce(&mut Config)) -> App {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::load(None, |_| None).unwrap();
        // The admin key exists already: the replica only notes that this file is missing.
        cfg.admin_key_file = dir.path().join("admin.key");
        tweak(&mut cfg);
        let cp = start(self.pool.clone(), cfg).await;
        App::new(cp, self.pool.clone(), self.admin_key.clone(), dir)
    }

    fn new(cp: ControlPlane, pool: PgPool, admin_key: String, dir: tempfile::TempDir) -> App {
        App {
            router: cp.router(),
            state: cp.state().clone(),
            tracker: cp.tracker().clone(),
            pool,
            admin_key,
            cp,
            _dir: dir,
        }
    }

    pub async fn raw(&self, req: Request<Body>) -> Resp {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, body, text }
    }

    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string()))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        self.raw(req).await
    }

    pub async fn get(&self, uri: &str, key: &str) -> Resp {
        self.call(Method::GET, uri, Some(key), None).await
    }

    pub async fn post(&self, uri: &str, key: &str, body: Value) -> Resp {
        self.call(Method::POST, uri, Some(key), Some(body)).await
    }

    /// Creates an organisation with the admin key and an org key for it; returns (org_id, key).
    pub async fn org_with_key(&self, name: &str) -> (String, String) {
        let r = self
            .post(
                "/v1/organisations",
                &self.admin_key,
                serde_json::json!({ "name": name }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let org_id = r.body["id"].as_str().unwrap().to_owned();
        let r = self
            .post(
                &format!("/v1/organisations/{org_id}/api-keys"),
                &self.admin_key,
                serde_json::json!({ "name": "ops" }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        (org_id, r.body["key"].as_str().unwrap().to_owned())
    }
}
