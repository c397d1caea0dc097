//! `kip-train`: trains the remaining-useful-life model on C-MAPSS data, writes
//! `<out>/<name>-<version>.onnx` and its model card (JSON), and prints the metrics.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "Train kip's RUL model and export it to ONNX")]
struct Args {
    /// C-MAPSS training file (26 columns).
    #[arg(long, default_value = "ml/data/train_FD001.txt")]
    data: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "target/models")]
    out: PathBuf,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Override the number of epochs of the reference configuration.
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
    /// Register the trained version (with its metrics) in kip's model registry and upload the
    /// artifact. Server and key come from KIP_SERVER / KIP_API_KEY (or KIP_API_KEY_FILE), the
    /// organisation from KIP_ORG (default: the key's), like kipctl.
    #[arg(long)]
    register: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let engines = kip_ml::cmapss::load(&args.data)?;
    let mut opts = kip_ml::pipeline::Options::reference(args.seed);
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
        "trained {} on {} windows in {:.1}s ({} parameters)\n\
         held-out engines: {} points: RMSE {:.2} (uncapped truth {:.2}), NASA score {:.1} ({:.2}/point)\n\
         model: {} (sha256 {})\ncard:  {}",
        stem,
        m.train_windows,
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
