//! [`Prometheus`]: a real Prometheus server (Debian's `prometheus` package) that scrapes one
//! kip control plane every second and evaluates kip's shipped alert rules
//! (`deploy/monitoring/prometheus/kip-alerts.yml`) every second, for alert tests.
//!
//! The test copy of the rules has every `for:` set to `0s`: a rule's `for` is the operator's
//! patience (minutes), not what these tests check; the expressions and labels are the shipped
//! ones, unchanged. Ready when [`Prometheus::start`] returns (`/-/ready` answers); stopped (as a
//! process group) on drop.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{ChildGroup, free_port, wait_until, workspace_root};

/// A Prometheus with kip's alert rules, scraping one target.
#[derive(Debug)]
pub struct Prometheus {
    pub port: u16,
    http: reqwest::Client,
    _child: ChildGroup,
}

/// The shipped rules with every `for:` set to `0s` (see the module docs).
pub fn rules_without_for() -> String {
    let path = workspace_root().join("deploy/monitoring/prometheus/kip-alerts.yml");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| match l.split_once("for:") {
            Some((indent, _)) if l.trim_start().starts_with("for:") => format!("{indent}for: 0s"),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Prometheus {
    /// Starts Prometheus in `dir` (config, rules and TSDB live there) scraping `target`
    /// (`host:port` of a control plane's admin listener, path `/metrics`).
    pub async fn start(dir: &Path, target: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("rules.yml"), rules_without_for()).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
                 scrape_configs:\n  - job_name: kip\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = ChildGroup::spawn(
            Command::new("prometheus")
                .current_dir(dir)
                .arg("--config.file=prometheus.yml")
                .arg("--storage.tsdb.path=data")
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| {
            panic!(
                "cannot start prometheus ({e}): install the Debian package \
                 (scripts/lib.sh ensure_monitoring_tools)"
            )
        });
        let http = reqwest::Client::new();
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        wait_until(Duration::from_secs(60), "prometheus ready", || async {
            http.get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        Self {
            port,
            http,
            _child: child,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn api(&self, path: &str) -> Result<Value, String> {
        let v: Value = self
            .http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(v.to_string())
        }
    }

    /// The active alerts (`/api/v1/alerts`: pending and firing).
    pub async fn alerts(&self) -> Result<Vec<Value>, String> {
        Ok(self.api("/api/v1/alerts").await?["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The labels of every firing alert named `alertname`.
    pub async fn firing(&self, alertname: &str) -> Result<Vec<Value>, String> {
        Ok(self
            .alerts()
            .await?
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == alertname && a["state"] == "firing")
            .map(|a| a["labels"].clone())
            .collect())
    }

    /// The result vector of the instant query `promql`.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url()),
            [("query", promql)],
        )
        .map_err(|e| e.to_string())?;
        let data = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json::<Value>()
            .await
            .map_err(|e| e.to_string())?;
        data["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| data.to_string())
    }

    /// Waits until `alertname` fires with a `device` label of `device` (any device when the
    /// rule has no such label and `device` is `None`); returns the alert's labels.
    pub async fn wait_firing(
        &self,
        alertname: &str,
        device: Option<&str>,
        timeout: Duration,
    ) -> Value {
        crate::eventually(timeout, || async {
            let firing = self.firing(alertname).await?;
            match firing
                .iter()
                .find(|l| device.is_none_or(|d| l["device"] == d))
            {
                Some(labels) => Ok(labels.clone()),
                None => Err(format!(
                    "{alertname} not firing; active: {:?}",
                    self.alerts().await
                )),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until no `alertname` alert is active (pending or firing).
    pub async fn wait_resolved(&self, alertname: &str, timeout: Duration) {
        crate::eventually(timeout, || async {
            let active: Vec<Value> = self
                .alerts()
                .await?
                .into_iter()
                .filter(|a| a["labels"]["alertname"] == alertname)
                .collect();
            if active.is_empty() {
                Ok(())
            } else {
                Err(format!("{alertname} still active: {active:?}"))
            }
        })
        .await
        .unwrap_or_else(|e: String| panic!("{e}"));
    }
}
