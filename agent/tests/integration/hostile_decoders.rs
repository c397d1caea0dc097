//! Property tests (issue #13, "hostile input, systematically") for the decoders of the agent
//! that take file or network input and had none: the configuration file, the feature-set
//! document a model carries (the agent-side model card), and the model card JSON `kip-train`
//! writes. Each starts from a valid document and damages it (byte flips, truncation,
//! insertions of hostile text, replaced values): never a panic, an error that says something.
//! Thousands of cases in total, a few seconds in a debug build.
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failure should abort the test"
)]

use std::path::Path;

use kip_agent::config::RawConfig;
use kip_shared::feature_set::FeatureSet;
use proptest::prelude::*;

/// One damage to a document: (kind, position seed, payload).
fn damage() -> impl Strategy<Value = (u8, u64, String)> {
    (
        0u8..6,
        any::<u64>(),
        prop_oneof![
            Just(String::new()),
            Just("\0".to_owned()),
            Just("\"".to_owned()),
            Just("]]\n[[".to_owned()),
            Just("= 99999999999999999999999".to_owned()),
            Just("-1".to_owned()),
            Just("1e308".to_owned()),
            Just("{\"a\":".repeat(64)),
            "[ -~]{0,24}",
            "\\PC{0,8}",
        ],
    )
}

fn apply(text: &str, (kind, seed, payload): &(u8, u64, String)) -> String {
    let mut bytes = text.as_bytes().to_vec();
    if bytes.is_empty() {
        return payload.clone();
    }
    let at = (*seed as usize) % bytes.len();
    match kind {
        0 => bytes.truncate(at),
        1 => {
            bytes[at] ^= (seed >> 32) as u8 | 1;
        }
        2 => {
            bytes.splice(at..at, payload.bytes());
        }
        3 => {
            let end = (at + 1 + (seed >> 40) as usize % 16).min(bytes.len());
            bytes.splice(at..end, payload.bytes());
        }
        4 => {
            // Replace one whole line (a key, a value, a section header).
            let start = bytes[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let end = bytes[at..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(bytes.len(), |i| at + i);
            bytes.splice(start..end, payload.bytes());
        }
        _ => bytes.extend_from_slice(payload.as_bytes()),
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn example_config() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml"))
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// A damaged configuration file loads or is refused with an error naming a place.
    #[test]
    fn a_damaged_config_file_is_refused_with_a_reason_never_a_panic(
        damages in proptest::collection::vec(damage(), 1..4),
    ) {
        let mut text = example_config();
        for d in &damages {
            text = apply(&text, d);
        }
        match RawConfig::from_toml(&text, Path::new("agent.toml")).and_then(RawConfig::validate) {
            Ok(cfg) => prop_assert!(!cfg.device.as_str().is_empty()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// The feature-set document inside a model (what the agent reads from the ONNX metadata):
    /// damaged, it is refused, and a huge window or signal count does not allocate first.
    #[test]
    fn a_damaged_feature_set_document_is_refused_never_a_panic(
        damages in proptest::collection::vec(damage(), 1..3),
    ) {
        let fs = FeatureSet::cmapss_w30_v1();
        let mut text = fs.to_json();
        for d in &damages {
            text = apply(&text, d);
        }
        match FeatureSet::for_model(fs.id(), Some(&text)) {
            Ok(parsed) => prop_assert_eq!(parsed.id(), fs.id()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// The model card `kip-train` writes and `--register` reads back.
    #[test]
    fn a_damaged_model_card_is_refused_never_a_panic(
        damages in proptest::collection::vec(damage(), 1..3),
    ) {
        let card = serde_json::json!({
            "name": "fd001", "version": "1", "kind": "mlp", "feature_set": "cmapss-w30-v1",
            "input": "features", "output": "rul", "n_features": 421, "parameters": 10,
            "hidden": [32, 16], "epochs": 3, "seed": 42, "holdout_units": [1, 2],
            "artifact_sha256": "00", "ensemble_members": 1,
            "metrics": { "rmse": 1.0, "mae": 1.0, "nasa_score": 1.0,
                "nasa_score_per_point": 1.0, "eval_points": 1, "train_windows": 1,
                "final_train_loss": 1.0 }
        });
        let mut text = card.to_string();
        for d in &damages {
            text = apply(&text, d);
        }
        let _ = serde_json::from_str::<kip_ml::pipeline::ModelCard>(&text);
    }
}

/// The undamaged documents parse (so the properties above start from valid input).
#[test]
fn the_starting_documents_are_valid() {
    RawConfig::from_toml(&example_config(), Path::new("agent.toml"))
        .and_then(RawConfig::validate)
        .unwrap();
    let fs = FeatureSet::cmapss_w30_v1();
    FeatureSet::for_model(fs.id(), Some(&fs.to_json())).unwrap();
}
