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
    /// Log this run to an MLflow tracking server (`http(s)://host:port`): params, metrics per
    /// epoch, held-out metrics, the ONNX file, model card and feature-set document, and the
    /// version as an MLflow model version. Default: MLFLOW_TRACKING_URI, then the config's
    /// `[mlflow] tracking_uri`; none of them: no tracking.
    #[arg(long, value_name = "URI")]
    mlflow: Option<String>,
    /// MLflow experiment; default MLFLOW_EXPERIMENT_NAME, then the config's
    /// `[mlflow] experiment`, then the model name.
    #[arg(long, value_name = "NAME")]
    mlflow_experiment: Option<String>,
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
    let (mut opts, default_data, cfg_mlflow) = match &args.config {
        Some(path) => {
            let c = kip_ml::config::TrainingConfig::load(path)?;
            (
                c.options(args.seed),
                c.data.clone(),
                (c.mlflow_tracking_uri, c.mlflow_experiment),
            )
        }
        None => (
            kip_ml::pipeline::Options::reference(args.seed),
            PathBuf::from("ml/data/train_FD001.txt"),
            (None, None),
        ),
    };
    let data = args.data.clone().unwrap_or(default_data);
    let data_bytes = std::fs::read(&data).with_context(|| format!("reading {}", data.display()))?;
    let data_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data_bytes));
    drop(data_bytes);
    let engines = kip_ml::cmapss::load(&data)?;
    if let Some(e) = args.epochs {
        opts.train.epochs = e;
    }
    if let Some(h) = args.hidden.clone() {
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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let tracking = args
        .mlflow
        .clone()
        .or_else(|| env("MLFLOW_TRACKING_URI"))
        .or(cfg_mlflow.0)
        .map(|uri| kip_ml::mlflow::Tracking {
            uri,
            experiment: args
                .mlflow_experiment
                .clone()
                .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
                .or(cfg_mlflow.1.clone())
                .unwrap_or_else(|| opts.model_name.clone()),
        });
    let mut tracker = match &tracking {
        Some(t) => Some(rt.block_on(Tracker::start(t, &opts))?),
        None => {
            eprintln!(
                "MLflow: not tracking this run (no --mlflow, MLFLOW_TRACKING_URI or [mlflow] tracking_uri)"
            );
            None
        }
    };
    let started = std::time::Instant::now();
    let members = opts.ensemble_members.max(1);
    let trained = kip_ml::pipeline::run_observed(&engines, &opts, &mut |e| {
        if let Some(t) = tracker.as_mut() {
            t.pending.extend(kip_ml::mlflow::epoch_metrics(&e, members));
            // Metrics appear while training runs; a failed call keeps them for the next epoch
            // (the run ends FAILED if they still cannot be sent at the end).
            if let Err(err) = rt.block_on(t.flush()) {
                eprintln!("MLflow: epoch {} metrics not sent yet: {err}", e.epoch);
            }
        }
    });
    let t = match trained {
        Ok(t) => t,
        Err(e) => {
            if let Some(tr) = &tracker {
                let _ = rt.block_on(tr.client.end_run(&tr.run, "FAILED"));
            }
            return Err(e.into());
        }
    };
    let duration_s = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stem = format!("{}-{}", t.card.name, t.card.version);
    let model_path = args.out.join(format!("{stem}.onnx"));
    let card_path = args.out.join(format!("{stem}.json"));
    let card_json = serde_json::to_string_pretty(&t.card)? + "\n";
    std::fs::write(&model_path, &t.onnx)
        .with_context(|| format!("writing {}", model_path.display()))?;
    std::fs::write(&card_path, &card_json)
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
        duration_s,
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
    if let Some(mut tr) = tracker.take() {
        let run = Finished {
            card: &t.card,
            opts: &opts,
            onnx: &t.onnx,
            card_json: &card_json,
            feature_set_json: t.feature_set.to_json(),
            config: args.config.as_deref(),
            data: &data,
            data_sha256: &data_sha256,
            duration_s,
        };
        let outcome = rt.block_on(tr.finish(&run));
        match outcome {
            Ok(version) => eprintln!(
                "MLflow: run {} in experiment {:?} at {} (model version {} {version})",
                tr.run.run_id,
                tr.experiment,
                tr.client.uri(),
                t.card.name
            ),
            Err(e) => {
                let _ = rt.block_on(tr.client.end_run(&tr.run, "FAILED"));
                return Err(anyhow::Error::new(e).context(format!(
                    "MLflow run {} not completed (the model files are written)",
                    tr.run.run_id
                )));
            }
        }
    }
    if args.register {
        register(&rt, &t.card, &t.onnx)?;
    }
    Ok(())
}

/// An MLflow run being written by this process.
struct Tracker {
    client: kip_ml::mlflow::Client,
    run: kip_ml::mlflow::Run,
    experiment: String,
    /// Metric points not yet accepted by the server.
    pending: Vec<kip_ml::mlflow::Metric>,
}

/// What a finished training run logs.
struct Finished<'a> {
    card: &'a kip_ml::pipeline::ModelCard,
    opts: &'a kip_ml::pipeline::Options,
    onnx: &'a [u8],
    card_json: &'a str,
    feature_set_json: String,
    config: Option<&'a std::path::Path>,
    data: &'a std::path::Path,
    data_sha256: &'a str,
    duration_s: f64,
}

impl Tracker {
    async fn start(
        t: &kip_ml::mlflow::Tracking,
        opts: &kip_ml::pipeline::Options,
    ) -> Result<Self, kip_ml::mlflow::MlflowError> {
        let client = kip_ml::mlflow::Client::new(&t.uri)?;
        let experiment_id = client.experiment_id(&t.experiment).await?;
        let run_name = format!("{}-{}", opts.model_name, opts.model_version);
        let run = client
            .create_run(
                &experiment_id,
                &run_name,
                &[
                    ("mlflow.source.name", "kip-train".into()),
                    ("mlflow.source.type", "LOCAL".into()),
                    ("kip.model_name", opts.model_name.clone()),
                    ("kip.model_version", opts.model_version.clone()),
                    ("kip.feature_set", opts.feature_set.id().to_owned()),
                ],
            )
            .await?;
        eprintln!(
            "MLflow: tracking run {} ({run_name}) in experiment {:?} at {}",
            run.run_id,
            t.experiment,
            client.uri()
        );
        Ok(Self {
            client,
            run,
            experiment: t.experiment.clone(),
            pending: Vec::new(),
        })
    }

    async fn flush(&mut self) -> Result<(), kip_ml::mlflow::MlflowError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.client.log_metrics(&self.run, &self.pending).await?;
        self.pending.clear();
        Ok(())
    }

    /// Logs params, the remaining and final metrics and the artifacts, creates the MLflow
    /// model version from the run and ends the run `FINISHED`; returns the version number.
    async fn finish(&mut self, f: &Finished<'_>) -> Result<String, kip_ml::mlflow::MlflowError> {
        let c = self.client.clone();
        let params = kip_ml::mlflow::params(f.card, f.opts, f.config, f.data, f.data_sha256);
        c.log_params(&self.run, &params).await?;
        self.flush().await?;
        let last_step = i64::try_from(f.opts.train.epochs).unwrap_or(i64::MAX);
        c.log_metrics(
            &self.run,
            &kip_ml::mlflow::final_metrics(f.card, f.duration_s, last_step),
        )
        .await?;
        let stem = format!("{}-{}", f.card.name, f.card.version);
        c.upload_artifact(&self.run, &format!("model/{stem}.onnx"), f.onnx.to_vec())
            .await?;
        c.upload_artifact(
            &self.run,
            &format!("model/{stem}.json"),
            f.card_json.as_bytes().to_vec(),
        )
        .await?;
        c.upload_artifact(
            &self.run,
            &format!("feature_set/{}.json", f.card.feature_set),
            f.feature_set_json.clone().into_bytes(),
        )
        .await?;
        if let Some(path) = f.config
            && let Ok(bytes) = std::fs::read(path)
        {
            let name = path.file_name().map_or_else(
                || "config.toml".into(),
                |n| n.to_string_lossy().into_owned(),
            );
            c.upload_artifact(&self.run, &format!("config/{name}"), bytes)
                .await?;
        }
        c.set_tag(&self.run, "kip.artifact_sha256", &f.card.artifact_sha256)
            .await?;
        let version = c
            .create_model_version(
                &f.card.name,
                &self.run,
                "model",
                &format!("kip-train {} {}", f.card.name, f.card.version),
                &[
                    ("kip.version", f.card.version.clone()),
                    ("kip.artifact_sha256", f.card.artifact_sha256.clone()),
                    ("kip.feature_set", f.card.feature_set.clone()),
                    ("kip.rmse", format!("{:.4}", f.card.metrics.rmse)),
                    (
                        "kip.phm08_score",
                        format!("{:.2}", f.card.metrics.nasa_score),
                    ),
                ],
            )
            .await?;
        c.end_run(&self.run, "FINISHED").await?;
        Ok(version)
    }
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

fn register(
    rt: &tokio::runtime::Runtime,
    card: &kip_ml::pipeline::ModelCard,
    onnx: &[u8],
) -> anyhow::Result<()> {
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
    let r = rt.block_on(kip_ml::register::register(&target, card, onnx))?;
    eprintln!(
        "registered {}@{} as model {} in organisation {} (artifact uploaded)",
        r.name, r.version, r.id, r.org_id
    );
    Ok(())
}
