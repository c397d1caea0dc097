//! Batch scoring with the real ONNX Runtime: `kip-train predict` on a small file of partial
//! trajectories in the official C-MAPSS test layout, made from held-out engines (so the true
//! RUL is known), for the first shipped model (no embedded document: built-in `cmapss-w30-v1`)
//! and for every model that carries its feature-set document.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::{Path, PathBuf};

use kip_ml::{cmapss, predict};
use kip_tests::{ort_library, workspace_root as root};

/// Every shipped model with its card: `ml/models/*.onnx` and `ml/models/*/*.onnx`.
fn shipped_models() -> Vec<(PathBuf, serde_json::Value)> {
    let mut dirs = vec![root().join("ml/models")];
    let mut out = Vec::new();
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "onnx") {
                let card =
                    serde_json::from_slice(&std::fs::read(p.with_extension("json")).unwrap())
                        .unwrap();
                out.push((p, card));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes the held-out units of `card` cut at a few cycles, renumbered 1.., in the 26-column
/// layout; returns the file and the true RUL per written unit.
fn partial_trajectories(card: &serde_json::Value, dir: &Path) -> (PathBuf, Vec<f32>) {
    let data = match card["name"].as_str().unwrap() {
        "rul-fd003" => "ml/data/train_FD003.txt",
        _ => "ml/data/train_FD001.txt",
    };
    let engines = cmapss::load(&root().join(data)).unwrap();
    let held: Vec<u64> = card["holdout_units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_u64().unwrap())
        .collect();
    let mut text = String::new();
    let mut truth = Vec::new();
    let mut unit = 0;
    for e in engines.iter().filter(|e| held.contains(&u64::from(e.unit))) {
        let n = e.rows.len();
        // Early, middle and late cuts, like the official test set's spread.
        for cut in [n / 3, n / 2, n - 15] {
            unit += 1;
            for (c, row) in e.rows[..cut].iter().enumerate() {
                let vals: Vec<String> = row.iter().map(|v| format!("{v}")).collect();
                text.push_str(&format!("{unit} {} {}\n", c + 1, vals.join(" ")));
            }
            truth.push((n - cut) as f32);
        }
    }
    let path = dir.join("test_small.txt");
    std::fs::write(&path, text).unwrap();
    (path, truth)
}

#[test]
fn predict_writes_one_rul_per_unit_for_every_shipped_model() {
    let lib = ort_library();
    let models = shipped_models();
    assert!(
        models
            .iter()
            .any(|(_, c)| c["feature_set"] == "cmapss-w30-v1")
    );
    assert!(models.iter().any(|(_, c)| c["name"] == "rul-fd003"));
    for (model, card) in models {
        let dir = tempfile::tempdir().unwrap();
        let (data, truth) = partial_trajectories(&card, dir.path());
        let out = dir.path().join("preds.csv");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_kip-train"))
            .args(["predict", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .arg("--ort-library")
            .arg(&lib)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let csv = std::fs::read_to_string(&out).unwrap();
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("unit,rul"));
        let preds: Vec<(u32, f32)> = lines
            .map(|l| {
                let (u, r) = l.split_once(',').unwrap();
                (u.parse().unwrap(), r.parse().unwrap())
            })
            .collect();
        assert_eq!(preds.len(), truth.len(), "{}", model.display());
        assert!(
            preds
                .iter()
                .enumerate()
                .all(|(i, (u, _))| *u as usize == i + 1)
        );
        // The library gives the same numbers (the CSV rounds to 2 decimals).
        let mut scorer =
            predict::Scorer::load(Some(&lib), &std::fs::read(&model).unwrap()).unwrap();
        assert_eq!(
            scorer.feature_set.id(),
            card["feature_set"].as_str().unwrap()
        );
        let lib_preds = scorer.score(&cmapss::load(&data).unwrap()).unwrap();
        for ((_, csv_rul), p) in preds.iter().zip(&lib_preds) {
            assert!(
                (csv_rul - p.rul_cycles).abs() <= 0.006,
                "{csv_rul} vs {p:?}"
            );
            assert!((0.0..=125.0).contains(csv_rul));
        }
        // Held-out engines: a useful model, not a constant (capped truth, like training).
        let s = predict::score_against(&lib_preds, &truth, 125.0).unwrap();
        assert!(s.rmse_capped < 25.0, "{}: {s:?}", model.display());
        let late = lib_preds.iter().skip(2).step_by(3).map(|p| p.rul_cycles);
        let early = lib_preds.iter().step_by(3).map(|p| p.rul_cycles);
        assert!(
            late.sum::<f32>() < early.sum::<f32>(),
            "late cuts are predicted closer to failure"
        );
        // --truth prints the figures.
        std::fs::write(
            dir.path().join("rul.txt"),
            truth.iter().map(|t| format!("{t}\n")).collect::<String>(),
        )
        .unwrap();
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_kip-train"))
            .args(["predict", "--out", "-", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .arg("--truth")
            .arg(dir.path().join("rul.txt"))
            .arg("--ort-library")
            .arg(&lib)
            .output()
            .unwrap();
        assert!(run.status.success());
        assert!(String::from_utf8_lossy(&run.stdout).starts_with("unit,rul\n1,"));
        assert!(
            String::from_utf8_lossy(&run.stderr).contains("PHM08 score"),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

#[test]
fn a_truth_file_of_the_wrong_length_or_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rul.txt");
    std::fs::write(&p, "112\nabc\n").unwrap();
    let err = predict::read_truth(&p).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
    let one = [predict::UnitPrediction {
        unit: 1,
        cycles: 3,
        rul_cycles: 10.0,
    }];
    assert!(predict::score_against(&one, &[1.0, 2.0], 125.0).is_err());
}

/// The versions trained since references exist carry them (14 sensors and the output), so an
/// agent serving them monitors drift; the older files stay without.
#[test]
fn the_current_fd001_and_fd003_versions_carry_drift_references() {
    for (path, card) in shipped_models() {
        let refs = card["drift_reference"].as_array().map_or(0, Vec::len);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let current = name.starts_with("rul-fd001-2.1.0") || name.starts_with("rul-fd003-1.1.0");
        if current {
            assert_eq!(refs, 15, "{name}");
            assert_eq!(card["drift_reference"][14]["feature"], "output", "{name}");
        }
    }
    let names: Vec<String> = shipped_models()
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in ["rul-fd001-2.1.0+seed42.onnx", "rul-fd003-1.1.0+seed42.onnx"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}
