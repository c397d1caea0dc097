//! Remote configuration end to end with two real `kip-agent` processes, Mosquitto and the
//! kit's OPC UA server: a group configuration (adding an OPC UA source) applies to both
//! agents; a bad one is refused by the control plane before any agent sees it; one that
//! validates but cannot connect its source is rolled back by the agent itself, which keeps
//! running its last good configuration and reports the refusal.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use kip_tests::{
    ChildGroup, Mosquitto, OpcUaServer, control_plane::ControlPlane, free_port, wait_for_port,
    wait_until, workspace_binary,
};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn call(
    cp: &ControlPlane,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = cp
        .http
        .request(method, format!("{}{path}", cp.admin_url))
        .bearer_auth(&cp.admin_key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs `kipctl` with the platform-admin key against `cp` for organisation `org`.
async fn kipctl(cp: &ControlPlane, org: uuid::Uuid, args: &[&str]) -> String {
    use clap::Parser as _;
    let org = org.to_string();
    let mut all = vec![
        "kipctl",
        "--server",
        &cp.admin_url,
        "--api-key",
        &cp.admin_key,
        "--org",
        &org,
    ];
    all.extend_from_slice(args);
    let cli = kipctl::Cli::try_parse_from(all).unwrap();
    let mut out = Vec::new();
    kipctl::run(cli, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

struct Agent {
    name: String,
    device: uuid::Uuid,
    http_port: u16,
    _proc: ChildGroup,
}

impl Agent {
    async fn start(
        cp: &ControlPlane,
        org: uuid::Uuid,
        name: &str,
        work: &Path,
        broker: &Mosquitto,
    ) -> Self {
        let state = work.join(name);
        let id = cp.enroll(org, name, &state.join("identity")).await;
        let http_port = free_port();
        let config = work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[agent]\ndevice = \"{name}\"\nstate_dir = \"{}\"\n\
                 [buffer]\nflush_interval_ms = 20\n\
                 [http]\nlisten_addr = \"127.0.0.1:{http_port}\"\n\
                 [log]\nfilter = \"info\"\n\
                 [remote_config]\nconfirm_within_ms = 5000\n\
                 [sync]\nendpoints = [\"{}\"]\ninterval_ms = 100\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n\
                 [[mqtt]]\nname = \"line\"\nurl = \"{}\"\nclient_id = \"kip-{name}\"\n\
                 [[mqtt.subscriptions]]\ntopic = \"plant/+/temp\"\nmachine_topic_level = 1\n\
                 metric = \"temp\"\nvalue = {{ kind = \"number\" }}\n",
                state.display(),
                cp.agent_url,
                broker.url(false),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
        let proc = ChildGroup::spawn(
            Command::new(workspace_binary("kip-agent"))
                .args(["run", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap();
        assert!(
            wait_for_port(http_port, Duration::from_secs(30)),
            "{name} did not start"
        );
        Self {
            name: name.to_owned(),
            device: id.device_id(),
            http_port,
            _proc: proc,
        }
    }

    async fn status(&self) -> Value {
        let addr = format!("127.0.0.1:{}", self.http_port).parse().unwrap();
        match kip_agent::runtime::local_get(addr, "/v1/status").await {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    async fn source_connected(&self, source: &str) -> bool {
        self.status().await["sources"].as_array().is_some_and(|s| {
            s.iter()
                .any(|x| x["name"] == source && x["connected"] == true)
        })
    }
}

async fn config_status(cp: &ControlPlane, org: uuid::Uuid, device: uuid::Uuid) -> Value {
    call(
        cp,
        reqwest::Method::GET,
        &format!("/v1/organisations/{org}/devices/{device}/config"),
        None,
    )
    .await
    .1
}

async fn rows_of(pool: &PgPool, device: uuid::Uuid, metric: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sensor_data WHERE device_id = $1 AND metric = $2")
        .bind(device)
        .bind(metric)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn a_group_config_applies_to_two_agents_a_bad_one_is_refused_and_a_dead_one_rolled_back(
    pool: PgPool,
) {
    let cp = kip_tests::control_plane::start(pool.clone(), None).await;
    let org = cp.create_org("acme").await;
    let work = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_plain(work.path());
    let plc_pki: PathBuf = work.path().join("plc-pki");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plc_url = format!(
        "opc.tcp://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    let plc = OpcUaServer::start(listener, &plc_pki, 21.5).await;
    let a = Agent::start(&cp, org, "gw-a", work.path(), &broker).await;
    let b = Agent::start(&cp, org, "gw-b", work.path(), &broker).await;
    sqlx::query("UPDATE devices SET labels = '{\"site\": \"north\"}' WHERE org_id = $1")
        .bind(org)
        .execute(&pool)
        .await
        .unwrap();

    // Readings keep flowing, so batches (and acks with the desired state) keep coming.
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (port, cancel) = (broker.port, cancel.clone());
        tokio::task::spawn_blocking(move || {
            let mut i = 0u64;
            while !cancel.is_cancelled() {
                kip_tests::mosquitto::publish(
                    port,
                    "plant/press1/temp",
                    format!("{i}").as_bytes(),
                    None,
                );
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for ag in [&a, &b] {
        wait_until(Duration::from_secs(30), "mqtt readings stored", || async {
            rows_of(&pool, ag.device, "temp").await > 0
        })
        .await;
    }

    // 1. A group configuration adding the PLC applies to both agents.
    let sync = format!(
        "[sync]\nendpoints = [\"{}\"]\ninterval_ms = 100\nbackoff_min_ms = 50\nbackoff_max_ms = 500\n",
        cp.agent_url
    );
    let opcua = |url: &str| {
        format!(
            "[[opcua]]\nname = \"plc\"\nurl = \"{url}\"\npki_dir = \"{}\"\n\
             reconnect_min_ms = 100\nreconnect_max_ms = 500\n\
             [[opcua.nodes]]\nnode_id = \"ns=2;s=Machine1.Temp\"\nmachine = \"press1\"\nmetric = \"plc_temp\"\n",
            work.path().join("agent-opcua-pki").display()
        )
    };
    let good = format!("{sync}{}", opcua(&plc_url));
    let (status, v) = call(
        &cp,
        reqwest::Method::PUT,
        &format!("/v1/organisations/{org}/group-config"),
        Some(json!({ "selector": { "site": "north" }, "toml": good })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["devices"].as_array().unwrap().len(), 2, "{v}");
    let group_version = v["config"]["version"].as_i64().unwrap().to_string();
    for ag in [&a, &b] {
        wait_until(Duration::from_secs(60), "group config applied", || async {
            let s = config_status(&cp, org, ag.device).await;
            s["in_sync"] == true && s["applied_version"] == group_version.as_str()
        })
        .await;
        assert!(
            ag.source_connected("plc").await,
            "{}: plc not connected",
            ag.name
        );
        wait_until(Duration::from_secs(30), "plc readings stored", || async {
            rows_of(&pool, ag.device, "plc_temp").await > 0
        })
        .await;
    }
    assert!(
        std::fs::read_to_string(work.path().join("gw-a/remote-config/current.json"))
            .unwrap()
            .contains(&group_version)
    );

    // 2. A bad configuration is refused by the control plane, naming the field; nothing is stored.
    let bad = format!("{sync}{}", opcua("http://not-opc-ua"));
    let (status, v) = call(
        &cp,
        reqwest::Method::PUT,
        &format!("/v1/organisations/{org}/group-config"),
        Some(json!({ "selector": { "site": "north" }, "toml": bad })),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("opcua[0].url"),
        "{v}"
    );
    // Local-only settings cannot be set remotely.
    let (status, v) = call(
        &cp,
        reqwest::Method::PUT,
        &format!("/v1/organisations/{org}/devices/{}/config", a.device),
        Some(json!({ "toml": "[agent]\nstate_dir = \"/elsewhere\"\n" })),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("local-only"),
        "{v}"
    );
    let (_, history) = call(
        &cp,
        reqwest::Method::GET,
        &format!(
            "/v1/organisations/{org}/devices/{}/config/history",
            a.device
        ),
        None,
    )
    .await;
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");

    // 3. A configuration that validates but whose PLC cannot be reached: agent a rolls back.
    let dead_port = free_port();
    let dead = format!(
        "{sync}{}",
        opcua(&format!("opc.tcp://127.0.0.1:{dead_port}/"))
    );
    let (status, v) = call(
        &cp,
        reqwest::Method::PUT,
        &format!("/v1/organisations/{org}/devices/{}/config", a.device),
        Some(json!({ "toml": dead })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let dead_version = v["version"].as_i64().unwrap().to_string();
    wait_until(
        Duration::from_secs(60),
        "dead config rolled back and reported",
        || async {
            let s = config_status(&cp, org, a.device).await;
            s["applied_version"] == group_version.as_str()
                && s["last_error"].as_str().is_some_and(|e| {
                    e.starts_with(&format!("{dead_version}: rolled back")) && e.contains("plc")
                })
        },
    )
    .await;
    // Back on the last good configuration: the PLC is connected and its readings flow again.
    wait_until(
        Duration::from_secs(30),
        "plc connected after rollback",
        || async { a.source_connected("plc").await },
    )
    .await;
    let before = rows_of(&pool, a.device, "temp").await;
    wait_until(
        Duration::from_secs(30),
        "readings flow after rollback",
        || async { rows_of(&pool, a.device, "temp").await > before },
    )
    .await;
    // The operator's view through kipctl.
    let dev_a = a.device.to_string();
    let got = kipctl(&cp, org, &["device", "config", "get", &dev_a]).await;
    assert!(
        got.contains(&format!("applied {group_version}"))
            && got.contains(&format!("last refusal: {dead_version}: rolled back")),
        "{got}"
    );
    let history = kipctl(&cp, org, &["device", "config", "history", &dev_a]).await;
    assert!(
        history.contains("group site=north") && history.contains("device "),
        "{history}"
    );
    let diff = kipctl(&cp, org, &["device", "config", "diff", &dev_a]).await;
    assert!(
        diff.contains(&format!("- url = \"{plc_url}\""))
            && diff.contains(&format!("+ url = \"opc.tcp://127.0.0.1:{dead_port}/\"")),
        "{diff}"
    );

    // The other agent was never touched.
    let s = config_status(&cp, org, b.device).await;
    assert_eq!(s["applied_version"], group_version.as_str(), "{s}");
    assert!(s["last_error"].is_null(), "{s}");

    cancel.cancel();
    publisher.await.unwrap();
    drop(a);
    drop(b);
    plc.stop().await;
    drop(broker);
}
