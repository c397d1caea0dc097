//! `kip-train`: trains a remaining-useful-life model from a training config (or the built-in
//! FD001 reference), writes `<out>/<name>-<version>.onnx` and its model card (JSON), and prints
//! the metrics. `kip-train predict` scores a file of partial trajectories with a model.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Train kip's RUL model and export it to ONNX; score partial trajectories",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Training config (ml/configs/*.toml: data, feature-set document, model, hyper-parameters).
    /// Without it: the FD001 reference configuration (feature set cmapss-w30-v1).
    #[arg(long)]
    config: Option<PathBuf>,
    /// C-MAPSS training file (26 columns); overrides the config's.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "target/models")]
    out: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Override the number of epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override the hidden layer widths, e.g. 64,32.
    #[arg(long, value_delimiter = ',')]
    hidden: Option<Vec<usize>>,
    /// Override the initial learning rate.
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Override the L2 weight decay.
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Override the number of averaged networks.
    #[arg(long)]
    ensemble_members: Option<usize>,
    /// Register the trained version (with its metrics) in kip's model registry and upload the
    /// artifact. Server and key come from KIP_SERVER / KIP_API_KEY (or KIP_API_KEY_FILE), the
    /// organisation from KIP_ORG (default: the key's), like kipctl.
    #[arg(long)]
    register: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Predict the RUL of every unit of a C-MAPSS-layout file of partial trajectories (the
    /// official test layout) at its last cycle; writes CSV `unit,rul`.
    Predict {
        /// ONNX model written by kip-train.
        #[arg(long)]
        model: PathBuf,
        /// C-MAPSS-layout file (26 columns), each unit's cycles from 1.
        #[arg(long)]
        data: PathBuf,
        /// CSV output (`-` for stdout).
        #[arg(long)]
        out: PathBuf,
        /// Optional true RUL per unit (RUL_FDxxx.txt): prints RMSE and PHM08 score.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// ONNX Runtime library; default ORT_DYLIB_PATH, then target/ort/lib/.
        #[arg(long)]
        ort_library: Option<PathBuf>,
    },
    /// Batch-1 latency of a model as a gateway runs it (one intra-op thread): feature
    /// computation from the first unit's latest window, then the ONNX run.
    Bench {
        #[arg(long)]
        model: PathBuf,
        /// C-MAPSS-layout file; its first unit gives the window.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 20_000)]
        runs: usize,
        #[arg(long)]
        ort_library: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::Predict {
        model,
        data,
        out,
        truth,
        ort_library,
    }) = &args.command
    {
        return predict(model, data, out, truth.as_deref(), ort_library.as_deref());
    }
    if let Some(Command::Bench {
        model,
        data,
        runs,
        ort_library,
    }) = &args.command
    {
        let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
        let t = std::time::Instant::now();
        let mut scorer = kip_ml::predict::Scorer::load(ort_library.as_deref(), &bytes)?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let units = kip_ml::cmapss::load(data)?;
        let unit = units.first().context("no unit in the data file")?;
        let l = scorer.latency(unit, *runs)?;
        eprintln!(
            "{}@{} (feature set {}, {} features, window {} cycles): session load {load_ms:.1} ms; \
             over {} runs: features p50 {:.1} us, p99 {:.1} us; batch-1 inference p50 {:.1} us, \
             p99 {:.1} us, max {:.1} us",
            scorer.name,
            scorer.version,
            scorer.feature_set.id(),
            scorer.feature_set.len(),
            scorer.feature_set.window_cycles(),
            l.runs,
            l.features_p50_us,
            l.features_p99_us,
            l.inference_p50_us,
            l.inference_p99_us,
            l.inference_max_us
        );
        return Ok(());
    }
    let (mut opts, default_data) = match &args.config {
        Some(path) => {
            let c = kip_ml::config::TrainingConfig::load(path)?;
            (c.options(args.seed), c.data)
        }
        None => (
            kip_ml::pipeline::Options::reference(args.seed),
            PathBuf::from("ml/data/train_FD001.txt"),
        ),
    };
    let data = args.data.clone().unwrap_or(default_data);
    let engines = kip_ml::cmapss::load(&data)?;
    if let Some(e) = args.epochs {
        opts.train.epochs = e;
    }
    if let Some(h) = args.hidden {
        opts.train.hidden = h;
    }
    if let Some(lr) = args.learning_rate {
        opts.train.learning_rate = lr;
    }
    if let Some(wd) = args.weight_decay {
        opts.train.weight_decay = wd;
    }
    if let Some(k) = args.ensemble_members {
        opts.ensemble_members = k;
    }
    let started = std::time::Instant::now();
    let t = kip_ml::pipeline::run(&engines, &opts)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stem = format!("{}-{}", t.card.name, t.card.version);
    let model_path = args.out.join(format!("{stem}.onnx"));
    let card_path = args.out.join(format!("{stem}.json"));
    std::fs::write(&model_path, &t.onnx)
        .with_context(|| format!("writing {}", model_path.display()))?;
    std::fs::write(&card_path, serde_json::to_string_pretty(&t.card)? + "\n")
        .with_context(|| format!("writing {}", card_path.display()))?;
    let m = &t.card.metrics;
    eprintln!(
        "trained {} ({} x {} networks, feature set {}, {} features) on {} windows of {} in {:.1}s ({} parameters)\n\
         held-out engines: {} points: RMSE {:.2} (uncapped truth {:.2}), NASA score {:.1} ({:.2}/point)\n\
         model: {} (sha256 {})\ncard:  {}",
        stem,
        t.card.ensemble_members,
        t.card
            .hidden
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("-"),
        t.card.feature_set,
        t.card.n_features,
        m.train_windows,
        data.display(),
        started.elapsed().as_secs_f64(),
        t.card.parameters,
        m.eval_points,
        m.rmse,
        m.rmse_uncapped,
        m.nasa_score,
        m.nasa_score_per_point,
        model_path.display(),
        t.card.artifact_sha256,
        card_path.display()
    );
    if args.register {
        register(&t.card, &t.onnx)?;
    }
    Ok(())
}

fn predict(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    truth: Option<&std::path::Path>,
    ort_library: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let mut scorer = kip_ml::predict::Scorer::load(ort_library, &bytes)?;
    let units = kip_ml::cmapss::load(data)?;
    let started = std::time::Instant::now();
    let preds = scorer.score(&units)?;
    let elapsed = started.elapsed();
    if out == std::path::Path::new("-") {
        kip_ml::predict::write_csv(&preds, std::io::stdout().lock())?;
    } else {
        let f =
            std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        kip_ml::predict::write_csv(&preds, std::io::BufWriter::new(f))?;
    }
    eprintln!(
        "{}@{} (feature set {}): {} units scored in {:.1} ms -> {}",
        scorer.name,
        scorer.version,
        scorer.feature_set.id(),
        preds.len(),
        elapsed.as_secs_f64() * 1e3,
        out.display()
    );
    if let Some(truth) = truth {
        let t = kip_ml::predict::read_truth(truth)?;
        let s =
            kip_ml::predict::score_against(&preds, &t, scorer.feature_set.label().max_output())?;
        eprintln!(
            "against {}: RMSE {:.2}, PHM08 score {:.1} ({} units); RMSE vs truth capped at {}: {:.2}",
            truth.display(),
            s.rmse,
            s.nasa_score,
            preds.len(),
            scorer.feature_set.label().max_output(),
            s.rmse_capped
        );
    }
    Ok(())
}

fn register(card: &kip_ml::pipeline::ModelCard, onnx: &[u8]) -> anyhow::Result<()> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let api_key = match (env("KIP_API_KEY"), env("KIP_API_KEY_FILE")) {
        (Some(k), _) => k,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("reading KIP_API_KEY_FILE {f}"))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("--register needs KIP_API_KEY or KIP_API_KEY_FILE"),
    };
    let target = kip_ml::register::Target {
        server: env("KIP_SERVER").unwrap_or_else(|| "http://127.0.0.1:8080".into()),
        api_key,
        org: env("KIP_ORG"),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(kip_ml::register::register(&target, card, onnx))?;
    eprintln!(
        "registered {}@{} as model {} in organisation {} (artifact uploaded)",
        r.name, r.version, r.id, r.org_id
    );
    Ok(())
}
