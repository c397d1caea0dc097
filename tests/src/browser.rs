//! A headless browser for UI tests: Debian's `chromium` (scripts/lib.sh `ensure_browser`)
//! driven over the Chrome DevTools protocol on a loopback WebSocket.
//!
//! One [`Browser`] is one chromium process (its own process group and throwaway profile,
//! stopped on drop) with one page. Tests navigate, fill and submit real forms with
//! [`Browser::run`] (JavaScript in the page), read the DOM, take screenshots, and check
//! [`Browser::take_console_errors`]: console errors, uncaught exceptions and failed loads the
//! page reported since the last call.
//!
//! Waiting is by signal, never by sleeping: a navigation is complete when the page's document
//! is a new one (a marker set on the old one is gone) and `readyState` is `complete`.

use std::{path::Path, process::Command, time::Duration};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use crate::process::ChildGroup;

/// Longest wait for one DevTools answer or one navigation.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Headless chromium with one page.
pub struct Browser {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    errors: Vec<String>,
    // Dropped after the socket: the process group, then its profile directory.
    _child: ChildGroup,
    _profile: tempfile::TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("session", &self.session)
            .finish()
    }
}

fn chromium() -> &'static str {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new("which")
                .arg(c)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| panic!("chromium is required (scripts/lib.sh ensure_browser)"))
}

impl Browser {
    /// Starts chromium (1280x900 viewport) and opens a blank page.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let port = crate::ports::free_port();
        let child = ChildGroup::spawn(
            Command::new(chromium())
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-extensions",
                    "--disable-background-networking",
                    "--window-size=1280,900",
                ])
                .arg(format!("--remote-debugging-port={port}"))
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
        .unwrap_or_else(|e| panic!("cannot start chromium: {e}"));
        let http = reqwest::Client::new();
        let version: Value = crate::eventually::eventually(TIMEOUT, || {
            let http = http.clone();
            async move {
                let r = http
                    .get(format!("http://127.0.0.1:{port}/json/version"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                r.json::<Value>().await.map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("chromium's DevTools endpoint did not come up: {e}"));
        let url = version["webSocketDebuggerUrl"]
            .as_str()
            .unwrap_or_else(|| panic!("no webSocketDebuggerUrl in {version}"))
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to chromium's DevTools socket: {e}"));
        let mut b = Browser {
            ws,
            session: String::new(),
            next_id: 0,
            errors: Vec::new(),
            _child: child,
            _profile: profile,
        };
        let target = b
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(domain, json!({})).await;
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        b
    }

    /// Sends one command (to the page once attached) and returns its result; events that
    /// arrive meanwhile are scanned for errors. Panics on a protocol error.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params).await {
            Ok(v) => v,
            Err(e) => panic!("DevTools {method} failed: {e}"),
        }
    }

    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let next = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .map_err(|_| format!("no answer to {method} within {TIMEOUT:?}"))?;
            let Some(Ok(Message::Text(text))) = next else {
                match next {
                    Some(Ok(_)) => continue,
                    other => return Err(format!("DevTools socket ended: {other:?}")),
                }
            };
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if v["id"].as_u64() == Some(id) {
                if let Some(err) = v.get("error") {
                    return Err(err.to_string());
                }
                return Ok(v["result"].clone());
            }
            self.note_event(&v);
        }
    }

    fn note_event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]));
            }
            Some("Runtime.exceptionThrown") => {
                self.errors
                    .push(format!("exception: {}", p["exceptionDetails"]));
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                self.errors.push(format!(
                    "{}: {} ({})",
                    p["entry"]["source"], p["entry"]["text"], p["entry"]["url"]
                ));
            }
            _ => {}
        }
    }

    /// Evaluates `js` in the page and returns its value (`null` for undefined).
    pub async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("script failed: {js}: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Runs `js`, which makes the page navigate (a link click, a form submit), and waits for
    /// the new document to finish loading.
    pub async fn run(&mut self, js: &str) {
        self.eval("window.__kipOldDocument = true").await;
        self.eval(&format!("setTimeout(() => {{ {js} }}, 0); true"))
            .await;
        self.wait_for_new_document().await;
    }

    /// Opens `url` and waits until it loaded.
    pub async fn goto(&mut self, url: &str) {
        self.eval("window.__kipOldDocument = true").await;
        self.call("Page.navigate", json!({ "url": url })).await;
        self.wait_for_new_document().await;
    }

    async fn wait_for_new_document(&mut self) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            poll.tick().await;
            // Fails while the old document is being replaced; that is "not yet".
            let r = self
                .try_call(
                    "Runtime.evaluate",
                    json!({
                        "expression": "!window.__kipOldDocument && document.readyState === 'complete'",
                        "returnByValue": true
                    }),
                )
                .await;
            if r.is_ok_and(|r| r["result"]["value"] == json!(true)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page did not finish loading within {TIMEOUT:?}"
            );
        }
    }

    /// The current address.
    pub async fn url(&mut self) -> String {
        self.eval("location.href")
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// The current page's HTML.
    pub async fn html(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    /// Saves a PNG of the whole page (up to 3000 px tall) to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let height = self
            .eval("Math.min(3000, document.documentElement.scrollHeight)")
            .await
            .as_f64()
            .unwrap_or(900.0);
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": { "x": 0, "y": 0, "width": 1280, "height": height, "scale": 1 }
                }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap_or(""))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Console errors, uncaught exceptions and failed loads reported since the last call.
    pub async fn take_console_errors(&mut self) -> Vec<String> {
        // A round trip delivers the events queued before it.
        self.eval("1").await;
        std::mem::take(&mut self.errors)
    }
}
