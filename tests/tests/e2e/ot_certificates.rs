//! `kipctl ot issue` end to end (issue #13, certificates for OT devices): a real Mosquitto
//! runs with the broker certificate kipctl wrote, requires client certificates from the
//! fleet CA, and `mosquitto_pub` connects with the client certificate kipctl wrote; the
//! files verify with `openssl verify`; `kipctl ot list --expiring-within-days` is the
//! renewal reminder.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failure should abort the test"
)]

use std::{path::Path, process::Command};

use kip_tests::{certs::make_readable, control_plane::start, mosquitto::Mosquitto};
use sqlx::PgPool;

async fn kipctl(cp: &kip_tests::control_plane::ControlPlane, args: &[&str]) -> String {
    use clap::Parser as _;
    let mut all = vec![
        "kipctl",
        "--server",
        &cp.admin_url,
        "--api-key",
        &cp.admin_key,
    ];
    all.extend_from_slice(args);
    let cli = kipctl::Cli::try_parse_from(all).unwrap();
    let mut out = Vec::new();
    kipctl::run(cli, &mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

fn openssl_verify(dir: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(dir.join("ca.pem"))
        .arg("-untrusted")
        .arg(dir.join("chain.pem"))
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[sqlx::test(migrator = "kip_control_plane::db::MIGRATOR")]
async fn kipctl_ot_issue_secures_a_real_broker_and_its_clients(pool: PgPool) {
    let cp = start(pool, None).await;
    let dir = tempfile::tempdir().unwrap();
    let (broker_dir, client_dir) = (dir.path().join("broker"), dir.path().join("client"));
    let out = kipctl(
        &cp,
        &[
            "ot",
            "issue",
            "--profile",
            "tls-server",
            "--cn",
            "broker",
            "--ip",
            "127.0.0.1",
            "--dns",
            "localhost",
            "--days",
            "20",
            "--out",
            broker_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.contains("issued tls-server certificate"), "{out}");
    kipctl(
        &cp,
        &[
            "ot",
            "issue",
            "--profile",
            "tls-client",
            "--cn",
            "plc-7",
            "--days",
            "200",
            "--out",
            client_dir.to_str().unwrap(),
        ],
    )
    .await;
    for d in [&broker_dir, &client_dir] {
        let (ok, text) = openssl_verify(d);
        assert!(ok, "{text}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    // mosquitto may drop privileges when started as root: let it read the test files.
    for p in [dir.path(), &broker_dir, &broker_dir.join("key.pem")] {
        make_readable(p);
    }
    let broker = Mosquitto::start(
        dir.path(),
        &format!(
            "cafile {ca}\ncertfile {chain}\nkeyfile {key}\nrequire_certificate true\n\
             use_identity_as_username true\nallow_anonymous false\n",
            ca = broker_dir.join("ca.pem").display(),
            chain = broker_dir.join("chain.pem").display(),
            key = broker_dir.join("key.pem").display(),
        ),
    );
    let publish = |cert: &Path, key: &Path| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-q", "1"])
            .args(["-t", "plant/plc-7/temp", "-m", "21.5", "-i", "plc-7"])
            .arg("--cafile")
            .arg(client_dir.join("ca.pem"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .output()
            .unwrap()
    };
    let ok = publish(&client_dir.join("chain.pem"), &client_dir.join("key.pem"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A self-made client certificate is refused by the broker.
    let rogue = rcgen::generate_simple_self_signed(vec!["plc-7".into()]).unwrap();
    std::fs::write(dir.path().join("rogue.pem"), rogue.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("rogue.key"),
        rogue.signing_key.serialize_pem(),
    )
    .unwrap();
    let refused = publish(&dir.path().join("rogue.pem"), &dir.path().join("rogue.key"));
    assert!(!refused.status.success());

    // The renewal reminder lists the 20-day broker certificate, not the 200-day one.
    let list = kipctl(&cp, &["ot", "list", "--expiring-within-days", "30"]).await;
    assert!(list.contains("broker") && !list.contains("plc-7"), "{list}");
    drop(broker);
}
