//! ONNX inference on the agent with the real ONNX Runtime library and the model trained by
//! `kip-train` (ml/models), checked against Python onnxruntime as an independent reference.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use kip_agent::inference::{InferenceError, ModelSlot, OrtRuntime, Predictor, RulModel};
use kip_shared::{Quality, Reading, feature_set::FeatureSet};
use kip_tests::{ort_library, reference_model, workspace_root as root};
use std::path::Path;

/// Feature rows from the first engines of FD001, cut at several cycles.
fn fd001_rows(spec: &FeatureSet) -> (Vec<f32>, usize) {
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD001.txt")).unwrap();
    let mut out = Vec::new();
    let mut n = 0;
    for e in engines.iter().take(8) {
        let series = e.select(spec.inputs()).unwrap();
        for cut in [1, 10, 31, 80, series.len()] {
            out.extend(spec.compute(&series[..cut], cut as f32).unwrap());
            n += 1;
        }
    }
    (out, n)
}

fn python_reference(model: &[u8], features: &[f32], rows: usize, width: usize) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let (m, x, y) = (
        dir.path().join("m.onnx"),
        dir.path().join("x.bin"),
        dir.path().join("y.bin"),
    );
    std::fs::write(&m, model).unwrap();
    std::fs::write(
        &x,
        features
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let script = format!(
        "import numpy as np, onnxruntime as ort\n\
         s = ort.InferenceSession('{m}', providers=['CPUExecutionProvider'])\n\
         x = np.fromfile('{x}', dtype='<f4').reshape({rows}, {width})\n\
         y = s.run(None, {{s.get_inputs()[0].name: x}})[0]\n\
         y.astype('<f4').tofile('{y}')\n",
        m = m.display(),
        x = x.display(),
        y = y.display()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python onnxruntime reference failed (pip install onnxruntime==1.32.0 numpy; scripts/test.sh does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&y)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn rust_predictions_equal_python_onnxruntime_to_1e_5() {
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let m = reference_model();
    let (bytes, card) = (m.onnx_bytes(), m.card());
    let mut model = RulModel::load(&rt, &bytes, card["artifact_sha256"].as_str()).unwrap();
    assert_eq!(model.version, card["version"].as_str().unwrap());
    assert_eq!(model.spec.id(), card["feature_set"].as_str().unwrap());
    let (x, rows) = fd001_rows(&model.spec);
    let ours = model.predict_rows(&x, rows).unwrap();
    let theirs = python_reference(&bytes, &x, rows, model.spec.len());
    assert_eq!(ours.len(), rows);
    assert_eq!(theirs.len(), rows);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!((a - b).abs() <= 1e-5, "row {i}: rust {a} python {b}");
        assert!(
            (0.0..=125.0).contains(a),
            "row {i}: {a} outside the RUL range"
        );
    }
    // Batch and single-row inference agree.
    let width = model.spec.len();
    let single = model.predict_rows(&x[..width], 1).unwrap();
    assert!((single[0] - ours[0]).abs() <= 1e-5);
    // A worn engine (its last cycle) is predicted closer to failure than a new one (cycle 31).
    assert!(
        ours[4] < ours[2],
        "last cycle {} vs cycle 31 {}",
        ours[4],
        ours[2]
    );
}

#[test]
fn a_corrupted_model_is_refused_and_the_old_one_keeps_serving() {
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let m = reference_model();
    let (bytes, card) = (m.onnx_bytes(), m.card());
    let sha = card["artifact_sha256"].as_str().unwrap();
    let mut slot = ModelSlot::default();
    slot.try_swap(&rt, &bytes, Some(sha)).unwrap();

    let mut corrupted = bytes.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0xff;
    let err = slot.try_swap(&rt, &corrupted, Some(sha)).unwrap_err();
    assert!(matches!(err, InferenceError::Checksum { .. }), "{err}");
    assert!(slot.last_error.as_deref().unwrap().contains("sha256"));

    // Even when the checksum matches what the server announced (a bad build), a file that
    // is not a model never replaces the serving one.
    let garbage = b"not an onnx model".to_vec();
    let err = slot.try_swap(&rt, &garbage, None).unwrap_err();
    assert!(matches!(err, InferenceError::Invalid(_)), "{err}");
    let truncated = &bytes[..bytes.len() / 3];
    assert!(slot.try_swap(&rt, truncated, None).is_err());

    let m = slot.current_mut().unwrap();
    assert_eq!(m.sha256, sha);
    let width = m.spec.len();
    assert!(m.predict_rows(&vec![0.0; width], 1).unwrap()[0].is_finite());
}

#[test]
fn a_missing_runtime_library_is_a_clear_error() {
    let err =
        OrtRuntime::load(Some(Path::new("/nonexistent/libonnxruntime.so.1.32.0"))).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/libonnxruntime.so.1.32.0"),
        "{msg}"
    );
    assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
}

#[test]
fn readings_become_cycles_and_predictions_per_machine() {
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let bytes = reference_model().onnx_bytes();
    let mut slot = ModelSlot::default();
    let mut predictor = Predictor::default();
    let reading = |machine: &str, metric: &str, value: f64| Reading {
        source: "sim".into(),
        machine: machine.into(),
        metric: metric.into(),
        ts: chrono::Utc::now(),
        value,
        quality: Quality::Good,
    };
    // Without a model nothing is predicted (and nothing fails).
    assert!(
        predictor
            .observe(&mut slot, &reading("u1", "s2", 1.0))
            .unwrap()
            .is_none()
    );
    slot.try_swap(&rt, &bytes, None).unwrap();

    let spec = slot.current().unwrap().spec.clone();
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD001.txt")).unwrap();
    let series = engines[0].select(spec.inputs()).unwrap();
    let mut last = None;
    for (cycle, row) in series.iter().enumerate().take(50) {
        // An unrelated metric and another machine's data do not disturb the window.
        predictor
            .observe(&mut slot, &reading("u1", "vibration", 9.9))
            .unwrap();
        for (metric, v) in spec.inputs().iter().zip(row) {
            let p = predictor
                .observe(&mut slot, &reading("u1", metric, f64::from(*v)))
                .unwrap();
            if let Some(p) = p {
                assert_eq!(p.machine, "u1");
                last = Some((cycle, p));
            }
        }
        predictor
            .observe(&mut slot, &reading("u2", "s2", 0.0))
            .unwrap();
    }
    let (cycle, p) = last.unwrap();
    assert_eq!(cycle, 49);
    assert_eq!(predictor.cycles("u1"), 50);
    let direct = slot
        .current_mut()
        .unwrap()
        .predict_rows(&spec.compute(&series[..50], 50.0).unwrap(), 1)
        .unwrap()[0];
    assert!(
        (p.rul_cycles - f64::from(direct)).abs() < 1e-5,
        "{} vs {direct}",
        p.rul_cycles
    );
}

#[test]
fn a_new_machine_type_is_a_document_inside_the_model_not_an_agent_change() {
    // A feature set this agent has no code for: other signals, window statistics, smoothing
    // and regime normalisation by operating settings. Train a tiny model on a few FD003 engines.
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD003.txt")).unwrap();
    let doc = serde_json::json!({
        "format_version": 1,
        "id": "test-fd003-regimes-v1",
        "signals": ["s2", "s3", "s4", "s7", "s11", "s12"],
        "window_cycles": 25,
        "smoothing": { "kind": "exponential", "alpha": 0.4 },
        "normalisation": { "kind": "regime_zscore", "settings": ["setting1", "setting2"], "regimes": 2 },
        "outputs": {
            "aggregations": [{ "op": "last" }, { "op": "mean" }, { "op": "slope" },
                             { "op": "slope", "last_cycles": 10 }, { "op": "std" }],
            "cycle": true
        },
        "label": { "kind": "rul", "cap_cycles": 125 }
    });
    let mut opts = kip_ml::pipeline::Options::reference(1);
    opts.model_name = "rul-test-fd003".into();
    opts.model_version = "0.1.0".into();
    opts.feature_set = FeatureSet::from_json(&doc.to_string()).unwrap();
    opts.holdout_engines = 2;
    opts.ensemble_members = 2;
    opts.train.epochs = 3;
    opts.train.hidden = vec![16];
    let trained = kip_ml::pipeline::run(&engines[..12], &opts).unwrap();

    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let mut slot = ModelSlot::default();
    slot.try_swap(&rt, &trained.onnx, Some(&trained.card.artifact_sha256))
        .unwrap();
    let spec = slot.current().unwrap().spec.clone();
    assert_eq!(spec.id(), "test-fd003-regimes-v1");
    assert_eq!(
        &spec, &trained.feature_set,
        "the fitted document travelled inside the model"
    );
    assert_eq!(spec.inputs().last().map(String::as_str), Some("setting2"));

    // Replay an engine the model never saw as live readings, settings included.
    let engine = &engines[40];
    let series = engine.select(spec.inputs()).unwrap();
    let mut predictor = Predictor::default();
    let mut last = None;
    for row in series.iter().take(40) {
        for (metric, v) in spec.inputs().iter().zip(row) {
            let r = Reading {
                source: "sim".into(),
                machine: "fd003-41".into(),
                metric: metric.clone(),
                ts: chrono::Utc::now(),
                value: f64::from(*v),
                quality: Quality::Good,
            };
            if let Some(p) = predictor.observe(&mut slot, &r).unwrap() {
                last = Some(p);
            }
        }
    }
    assert_eq!(predictor.cycles("fd003-41"), 40);
    let agent = last.unwrap().rul_cycles;
    // Training's own arithmetic on the same cycles gives the same RUL.
    let x = kip_ml::pipeline::features_at(&trained.feature_set, engine, 40).unwrap();
    let x = ndarray::Array2::from_shape_vec((1, x.len()), x).unwrap();
    let training = kip_ml::pipeline::predict(&trained.nets, &trained.norm, &x, 125.0)[0];
    assert!(
        (agent - f64::from(training)).abs() < 1e-3,
        "agent {agent} vs training {training}"
    );

    // Swapping back to the first shipped model (another feature set) starts the windows over.
    let bytes = reference_model().onnx_bytes();
    slot.try_swap(&rt, &bytes, None).unwrap();
    let r = Reading {
        source: "sim".into(),
        machine: "fd003-41".into(),
        metric: "s2".into(),
        ts: chrono::Utc::now(),
        value: 642.0,
        quality: Quality::Good,
    };
    assert!(predictor.observe(&mut slot, &r).unwrap().is_none());
    assert_eq!(predictor.cycles("fd003-41"), 0);
}

#[test]
fn the_shipped_fd003_model_predicts_from_replayed_readings_with_its_own_document() {
    let dir = root().join("ml/models/fd003");
    let onnx = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "onnx"))
        .expect("the FD003 model in ml/models/fd003");
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(onnx.with_extension("json")).unwrap()).unwrap();
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let mut slot = ModelSlot::default();
    slot.try_swap(
        &rt,
        &std::fs::read(&onnx).unwrap(),
        card["artifact_sha256"].as_str(),
    )
    .unwrap();
    let spec = slot.current().unwrap().spec.clone();
    assert_eq!(spec.id(), card["feature_set"].as_str().unwrap());
    let card_doc: kip_shared::feature_set::FeatureSetDoc =
        serde_json::from_value(card["feature_set_doc"].clone()).unwrap();
    assert_eq!(
        spec.doc(),
        &card_doc,
        "the document inside the model is the card's"
    );
    // A held-out engine, replayed as readings for 150 cycles (more than the 100-cycle window).
    let held = card["holdout_units"][0].as_u64().unwrap();
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD003.txt")).unwrap();
    let engine = engines.iter().find(|e| u64::from(e.unit) == held).unwrap();
    let series = engine.select(spec.inputs()).unwrap();
    let cycles = 150.min(series.len());
    let mut predictor = Predictor::default();
    let mut predictions = Vec::new();
    for row in &series[..cycles] {
        for (metric, v) in spec.inputs().iter().zip(row) {
            let r = Reading {
                source: "sim".into(),
                machine: "fd003".into(),
                metric: metric.clone(),
                ts: chrono::Utc::now(),
                value: f64::from(*v),
                quality: Quality::Good,
            };
            predictions.extend(predictor.observe(&mut slot, &r).unwrap());
        }
    }
    assert_eq!(predictions.len(), cycles);
    let last = predictions.last().unwrap();
    assert_eq!(last.model_version, card["version"].as_str().unwrap());
    let direct = slot
        .current_mut()
        .unwrap()
        .predict_rows(&spec.compute(&series[..cycles], cycles as f32).unwrap(), 1)
        .unwrap()[0];
    assert!((last.rul_cycles - f64::from(direct)).abs() < 1e-5);
    assert!((0.0..=125.0).contains(&last.rul_cycles));
}

/// Feeds `rows` (one cycle each) of machine `m` to `predictor`; returns the last prediction.
fn feed(
    predictor: &mut Predictor,
    slot: &mut ModelSlot,
    spec: &FeatureSet,
    m: &str,
    rows: &[Vec<f32>],
) -> Option<kip_shared::Prediction> {
    let mut last = None;
    for row in rows {
        for (metric, v) in spec.inputs().iter().zip(row) {
            let r = Reading {
                source: "sim".into(),
                machine: m.into(),
                metric: metric.clone(),
                ts: chrono::Utc::now(),
                value: f64::from(*v),
                quality: Quality::Good,
            };
            if let Some(p) = predictor.observe(slot, &r).unwrap() {
                last = Some(p);
            }
        }
    }
    last
}

#[test]
fn a_machine_keeps_its_age_and_window_across_a_restart_of_the_predictor() {
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let bytes = reference_model().onnx_bytes();
    let mut slot = ModelSlot::default();
    slot.try_swap(&rt, &bytes, None).unwrap();
    let spec = slot.current().unwrap().spec.clone();
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD001.txt")).unwrap();
    let series = engines[0].select(spec.inputs()).unwrap();

    // One predictor runs through; another is saved after 40 cycles and restored from disk.
    let mut through = Predictor::default();
    let want = feed(&mut through, &mut slot, &spec, "u1", &series[..60]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("predictor.json");
    let mut before = Predictor::default();
    feed(&mut before, &mut slot, &spec, "u1", &series[..40]);
    before.save(&file).unwrap();
    drop(before);
    let mut after = Predictor::load(&file).unwrap();
    assert_eq!(after.cycles("u1"), 40);
    let got = feed(&mut after, &mut slot, &spec, "u1", &series[40..60]).unwrap();
    assert_eq!(after.cycles("u1"), 60);
    assert!(
        (got.rul_cycles - want.rul_cycles).abs() < 1e-6,
        "{} vs {}",
        got.rul_cycles,
        want.rul_cycles
    );
    // Without the saved state the machine would start over as a new one.
    let mut fresh = Predictor::default();
    let reset = feed(&mut fresh, &mut slot, &spec, "u1", &series[40..60]).unwrap();
    assert!((reset.rul_cycles - want.rul_cycles).abs() > 1.0);
    // A missing file is a fresh predictor, not an error.
    assert_eq!(
        Predictor::load(&dir.path().join("none.json"))
            .unwrap()
            .machines(),
        0
    );
}

#[test]
fn the_anomaly_score_is_computed_and_rises_for_an_unusual_cycle() {
    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let bytes = reference_model().onnx_bytes();
    let mut slot = ModelSlot::default();
    slot.try_swap(&rt, &bytes, None).unwrap();
    let spec = slot.current().unwrap().spec.clone();
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD001.txt")).unwrap();
    let series = engines[1].select(spec.inputs()).unwrap();
    let mut predictor = Predictor::default();
    let mut scores = Vec::new();
    for row in &series[..40] {
        let p = feed(
            &mut predictor,
            &mut slot,
            &spec,
            "u2",
            std::slice::from_ref(row),
        )
        .unwrap();
        scores.push(p.anomaly_score);
    }
    // None until enough earlier cycles, then computed for every cycle.
    assert!(scores[..3].iter().all(Option::is_none), "{scores:?}");
    let ordinary: Vec<f64> = scores[10..].iter().map(|s| s.unwrap()).collect();
    let mean = ordinary.iter().sum::<f64>() / ordinary.len() as f64;
    assert!((0.2..3.0).contains(&mean), "ordinary cycles score {mean}");
    // Every signal 10% off its value: far outside the window's spread.
    let odd: Vec<f32> = series[40].iter().map(|v| v * 1.1).collect();
    let p = feed(&mut predictor, &mut slot, &spec, "u2", &[odd]).unwrap();
    let score = p.anomaly_score.unwrap();
    assert!(
        score > 20.0 * mean,
        "unusual cycle scores {score}, ordinary {mean}"
    );
}

/// Trains a tiny FD001 model (the pipeline fits drift references) and replays engines it never
/// saw, unchanged and with sensor s11 shifted; returns the drift of each replay.
#[test]
fn a_shifted_sensor_drifts_above_its_threshold_and_unchanged_data_stays_below() {
    // Also for the shadow model beside the champion (issue 14: a shadow candidate's drift).
    use kip_agent::inference::DRIFT_WINDOW;
    let engines = kip_ml::cmapss::load(&root().join("ml/data/train_FD001.txt")).unwrap();
    let doc = serde_json::json!({
        "format_version": 1,
        "id": "test-fd001-drift-v1",
        "signals": ["s2", "s3", "s4", "s7", "s11", "s12"],
        "window_cycles": 20,
        "outputs": { "aggregations": [{ "op": "last" }, { "op": "mean" }], "cycle": true },
        "label": { "kind": "rul", "cap_cycles": 125 }
    });
    let mut opts = kip_ml::pipeline::Options::reference(1);
    opts.model_name = "rul-test-drift".into();
    opts.model_version = "0.1.0".into();
    opts.feature_set = FeatureSet::from_json(&doc.to_string()).unwrap();
    opts.holdout_engines = 2;
    opts.ensemble_members = 1;
    opts.train.epochs = 3;
    opts.train.hidden = vec![8];
    let trained = kip_ml::pipeline::run(&engines[..60], &opts).unwrap();
    assert_eq!(trained.card.drift_reference.len(), 7);

    // A second version (another seed) runs as the shadow: its drift is monitored too, against
    // its own references, and reported under its own name and version.
    opts.model_version = "0.2.0".into();
    opts.train.seed = 2;
    let candidate = kip_ml::pipeline::run(&engines[..60], &opts).unwrap();

    let rt = OrtRuntime::load(Some(&ort_library())).unwrap();
    let mut slot = ModelSlot::default();
    slot.try_swap(&rt, &trained.onnx, None).unwrap();
    let spec = slot.current().unwrap().spec.clone();
    assert_eq!(slot.current().unwrap().drift_reference.len(), 7);
    let mut shadow = RulModel::load(&rt, &candidate.onnx, None).unwrap();

    // A fleet at staggered ages, as deployed: unseen engines, each a machine, machine k
    // already k/15 into its life, then one cycle of every machine per round. (A window of one
    // engine's consecutive cycles is not a sample of the training distribution: its values are
    // autocorrelated and of one life stage.)
    let mut replay = |shift: f32| {
        let mut predictor = Predictor::default();
        let lives: Vec<Vec<Vec<f32>>> = engines[60..75]
            .iter()
            .map(|e| {
                let mut rows = e.select(spec.inputs()).unwrap();
                for r in &mut rows {
                    r[4] += shift; // s11
                }
                rows
            })
            .collect();
        let shortest = lives.iter().map(Vec::len).min().unwrap();
        let offsets: Vec<usize> = (0..lives.len())
            .map(|k| k * shortest / lives.len())
            .collect();
        let mut feed = |predictor: &mut Predictor, m: &str, rows: &[Vec<f32>]| {
            for row in rows {
                for (metric, v) in spec.inputs().iter().zip(row) {
                    let r = Reading {
                        source: "sim".into(),
                        machine: m.into(),
                        metric: metric.clone(),
                        ts: chrono::Utc::now(),
                        value: f64::from(*v),
                        quality: Quality::Good,
                    };
                    if let Some(o) = predictor
                        .observe_with_shadow(&mut slot, Some(&mut shadow), &r)
                        .unwrap()
                    {
                        assert!(o.shadow.unwrap().is_ok());
                    }
                }
            }
        };
        for (k, rows) in lives.iter().enumerate() {
            feed(&mut predictor, &format!("u{k}"), &rows[..offsets[k]]);
        }
        let rounds = shortest - offsets.last().unwrap();
        for t in 0..rounds {
            for (k, rows) in lives.iter().enumerate() {
                let i = offsets[k] + t;
                feed(&mut predictor, &format!("u{k}"), &rows[i..=i]);
            }
        }
        let (name, version, shadow_drift) = predictor.shadow_drift().unwrap();
        assert_eq!(
            (name.as_str(), version.as_str()),
            ("rul-test-drift", "0.2.0")
        );
        (predictor.drift(), shadow_drift)
    };
    let (unchanged, unchanged_shadow) = replay(0.0);
    let (shifted, shifted_shadow) = replay(1.0);
    // The shadow's windows: every input and its own output, full, same effective size.
    assert_eq!(unchanged_shadow.len(), 7);
    for d in unchanged_shadow.iter().chain(&shifted_shadow) {
        assert_eq!((d.window, d.effective_window), (DRIFT_WINDOW, 15));
    }
    assert!(
        shifted_shadow
            .iter()
            .any(|d| d.feature == "s11" && d.drifted),
        "{shifted_shadow:?}"
    );
    assert!(
        unchanged_shadow.iter().all(|d| !d.drifted),
        "unchanged replay drifted for the shadow: {unchanged_shadow:?}"
    );
    for d in unchanged.iter().chain(&shifted) {
        assert_eq!(d.window, DRIFT_WINDOW);
        assert_eq!(d.effective_window, 15, "15 machines in the window");
    }
    let of = |ds: &[kip_shared::drift::FeatureDrift], f: &str| {
        ds.iter().find(|d| d.feature == f).unwrap().clone()
    };
    eprintln!(
        "unchanged: {unchanged:#?}\nshifted: {:#?}",
        of(&shifted, "s11")
    );
    assert!(of(&shifted, "s11").drifted, "{:?}", of(&shifted, "s11"));
    assert!(
        !of(&unchanged, "s11").drifted,
        "{:?}",
        of(&unchanged, "s11")
    );
    let quiet = unchanged.iter().filter(|d| !d.drifted).count();
    assert_eq!(
        quiet,
        unchanged.len(),
        "unchanged replay drifted: {unchanged:?}"
    );
}
