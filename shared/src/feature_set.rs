//! Feature sets as data: a versioned JSON document ([`FeatureSetDoc`]) says which signals of a
//! machine a model reads, over how many cycles, with which aggregations, operating-condition
//! normalisation and label; one interpreter ([`FeatureSet::compute`]) turns a window of
//! per-cycle readings into the model's input row.
//!
//! Training (`kip-ml`) and the agent both call [`FeatureSet::compute`]: there is exactly one
//! implementation of the feature arithmetic, so a model never sees features computed differently
//! from the ones it was trained on, and a new machine type needs a new document, not a new agent.
//! The document schema is specified in docs/ml.md.
//!
//! Invariants:
//! - A [`FeatureSet`] exists only for a document that passed [`FeatureSet::new`]'s checks
//!   (unknown fields are refused at parse time, so a newer document never half-works on an older
//!   agent: the model carrying it is refused and the previous model keeps serving).
//! - [`FeatureSet::compute`] is a pure function of the window and the cycle number; the fitted
//!   regime constants are part of the document a model ships with, never hidden state.
//! - Row layout ([`FeatureSet::inputs`]): one value per signal in `signals` order, then (with
//!   regime normalisation) one value per operating setting in `settings` order.
//! - Output layout ([`FeatureSet::feature_names`]): the raw window block (oldest cycle first,
//!   signals in order within a cycle, edge-padded with the oldest available cycle when the
//!   machine is younger than the window), then one block per aggregation in document order
//!   (signals in order), then the cycle number. This is the layout `cmapss-w30-v1` always had.

use serde::{Deserialize, Serialize};

use crate::{Name, features::FeatureError};

/// The only document format this build interprets.
pub const FORMAT_VERSION: u32 = 1;

/// Upper bounds that keep a hostile or mistaken document from exhausting a gateway.
pub const MAX_SIGNALS: usize = 512;
pub const MAX_WINDOW_CYCLES: u32 = 1000;
pub const MAX_REGIMES: u32 = 64;
pub const MAX_AGGREGATIONS: usize = 32;

/// A feature-set document, as stored, referenced by models and shipped inside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSetDoc {
    /// Always [`FORMAT_VERSION`]; a document of another format is refused.
    pub format_version: u32,
    /// Versioned identifier models reference, e.g. `cmapss-w30-v1` (a [`Name`]). A changed
    /// definition gets a new id: an id never changes meaning.
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Free-form machine type this set was designed for (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Metric names read per cycle, in feature order.
    pub signals: Vec<String>,
    /// Number of most recent cycles kept and used (the agent keeps this many per machine).
    pub window_cycles: u32,
    /// Optional smoothing of each signal inside the window (after normalisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoothing: Option<Smoothing>,
    /// Operating-condition normalisation of the signals.
    #[serde(default)]
    pub normalisation: Normalisation,
    pub outputs: Outputs,
    pub label: Label,
}

/// Which feature blocks are produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outputs {
    /// The whole window, `window_cycles * signals` values.
    #[serde(default)]
    pub raw_window: bool,
    /// Per-signal statistics over the window (or its last `last_cycles`).
    #[serde(default)]
    pub aggregations: Vec<Aggregation>,
    /// The machine's cycle number (age) as the last feature.
    #[serde(default)]
    pub cycle: bool,
}

/// One aggregation block: `op` of every signal over the last `last_cycles` cycles of the window
/// (default: the whole window). Computed over the cycles actually observed (no padding).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregation {
    pub op: AggregationOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycles: Option<u32>,
}

/// Statistics over a window of one signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregationOp {
    /// Latest value.
    Last,
    Mean,
    /// Population standard deviation (0 for one cycle).
    Std,
    /// Least-squares trend in units per cycle (0 for one cycle).
    Slope,
    Min,
    Max,
}

impl AggregationOp {
    fn name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Mean => "mean",
            Self::Std => "std",
            Self::Slope => "slope",
            Self::Min => "min",
            Self::Max => "max",
        }
    }
}

/// Smoothing inside the window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Smoothing {
    /// `s[0] = x[0]; s[t] = alpha * x[t] + (1 - alpha) * s[t-1]`, oldest cycle of the window
    /// first. `0 < alpha <= 1`.
    Exponential { alpha: f32 },
}

/// Operating-condition normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Normalisation {
    /// Signals are used as read (the model graph still z-scores its inputs globally).
    #[default]
    None,
    /// C-MAPSS FD002/FD004 style: each cycle is assigned to the nearest of `regimes` operating
    /// regimes (clusters of the `settings` values, fitted in training), and each signal is
    /// z-scored with that regime's mean and standard deviation.
    RegimeZscore {
        /// Metric names of the operating settings (read per cycle, after the signals).
        settings: Vec<String>,
        /// Number of regimes to fit.
        regimes: u32,
        /// Filled in by training; a document without it defines the method, one with it can
        /// compute features.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fitted: Option<FittedRegimes>,
    },
}

/// Regime constants learnt from training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FittedRegimes {
    /// Each setting is divided by this before distances are taken (so settings of different
    /// units weigh alike).
    pub settings_scale: Vec<f32>,
    /// `regimes x settings`, in raw setting units.
    pub centroids: Vec<Vec<f32>>,
    /// `regimes x signals`.
    pub mean: Vec<Vec<f32>>,
    /// `regimes x signals`, all > 0.
    pub std: Vec<Vec<f32>>,
}

/// What a model trained on this feature set predicts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Label {
    /// Remaining useful life in cycles, capped at `cap_cycles` (piecewise-linear target: a
    /// healthy machine's RUL is not observable, so it is clamped).
    Rul { cap_cycles: f32 },
}

impl Label {
    /// The training target for a true remaining life of `rul_cycles`.
    pub fn target(&self, rul_cycles: f32) -> f32 {
        match self {
            Self::Rul { cap_cycles } => rul_cycles.min(*cap_cycles),
        }
    }

    /// Largest value the model may output.
    pub fn max_output(&self) -> f32 {
        match self {
            Self::Rul { cap_cycles } => *cap_cycles,
        }
    }
}

/// Why a document is not a usable feature set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureSetError {
    #[error("feature set document is not valid JSON for format {FORMAT_VERSION}: {0}")]
    Json(String),
    #[error("feature set {id:?}: {field} {reason}")]
    Invalid {
        id: String,
        field: &'static str,
        reason: String,
    },
}

/// A validated feature set: the interpreter of one [`FeatureSetDoc`].
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSet {
    doc: FeatureSetDoc,
    inputs: Vec<String>,
    len: usize,
}

impl FeatureSet {
    /// Checks `doc` (see docs/ml.md for the rules) and builds its interpreter. A regime
    /// normalisation without fitted constants is accepted (it is a definition) but cannot
    /// compute; see [`FeatureSet::is_fitted`].
    pub fn new(doc: FeatureSetDoc) -> Result<Self, FeatureSetError> {
        let bad = |field: &'static str, reason: String| FeatureSetError::Invalid {
            id: doc.id.clone(),
            field,
            reason,
        };
        if doc.format_version != FORMAT_VERSION {
            return Err(bad(
                "format_version",
                format!("must be {FORMAT_VERSION}, got {}", doc.format_version),
            ));
        }
        Name::parse(&doc.id).map_err(|e| bad("id", e.to_string()))?;
        check_names(&doc.signals).map_err(|r| bad("signals", r))?;
        if !(1..=MAX_WINDOW_CYCLES).contains(&doc.window_cycles) {
            return Err(bad(
                "window_cycles",
                format!(
                    "must be between 1 and {MAX_WINDOW_CYCLES}, got {}",
                    doc.window_cycles
                ),
            ));
        }
        if let Some(Smoothing::Exponential { alpha }) = doc.smoothing
            && !(alpha > 0.0 && alpha <= 1.0)
        {
            return Err(bad(
                "smoothing.alpha",
                format!("must be in (0, 1], got {alpha}"),
            ));
        }
        let n = doc.signals.len();
        let mut inputs = doc.signals.clone();
        if let Normalisation::RegimeZscore {
            settings,
            regimes,
            fitted,
        } = &doc.normalisation
        {
            check_names(settings).map_err(|r| bad("normalisation.settings", r))?;
            if let Some(s) = settings.iter().find(|s| doc.signals.contains(s)) {
                return Err(bad(
                    "normalisation.settings",
                    format!("{s:?} is also a signal"),
                ));
            }
            if !(1..=MAX_REGIMES).contains(regimes) {
                return Err(bad(
                    "normalisation.regimes",
                    format!("must be between 1 and {MAX_REGIMES}, got {regimes}"),
                ));
            }
            if let Some(f) = fitted {
                check_fitted(f, *regimes as usize, settings.len(), n)
                    .map_err(|r| bad("normalisation.fitted", r))?;
            }
            inputs.extend(settings.iter().cloned());
        }
        let o = &doc.outputs;
        if o.aggregations.len() > MAX_AGGREGATIONS {
            return Err(bad(
                "outputs.aggregations",
                format!("at most {MAX_AGGREGATIONS} allowed"),
            ));
        }
        for a in &o.aggregations {
            if let Some(k) = a.last_cycles
                && !(1..=doc.window_cycles).contains(&k)
            {
                return Err(bad(
                    "outputs.aggregations.last_cycles",
                    format!(
                        "must be between 1 and window_cycles ({}), got {k}",
                        doc.window_cycles
                    ),
                ));
            }
        }
        let len = if o.raw_window {
            doc.window_cycles as usize * n
        } else {
            0
        } + o.aggregations.len() * n
            + usize::from(o.cycle);
        if len == 0 {
            return Err(bad(
                "outputs",
                "produce no feature: enable raw_window, an aggregation or cycle".into(),
            ));
        }
        let Label::Rul { cap_cycles } = doc.label;
        if !(cap_cycles.is_finite() && cap_cycles > 0.0) {
            return Err(bad(
                "label.cap_cycles",
                format!("must be a positive number, got {cap_cycles}"),
            ));
        }
        Ok(Self { doc, inputs, len })
    }

    /// Parses and checks a JSON document.
    pub fn from_json(json: &str) -> Result<Self, FeatureSetError> {
        let doc: FeatureSetDoc =
            serde_json::from_str(json).map_err(|e| FeatureSetError::Json(e.to_string()))?;
        Self::new(doc)
    }

    /// The document as pretty JSON (what ships beside and inside a model).
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(&self.doc).unwrap_or_default()
    }

    /// Feature sets every agent knows without a document: only `cmapss-w30-v1`, for models
    /// shipped before documents travelled with them.
    pub fn builtin(id: &str) -> Option<Self> {
        (id == crate::features::CMAPSS_V1).then(Self::cmapss_w30_v1)
    }

    /// The interpreter of [`cmapss_w30_v1`] (a constant document; a unit test checks that it
    /// passes [`FeatureSet::new`]).
    pub fn cmapss_w30_v1() -> Self {
        let doc = cmapss_w30_v1();
        let n = doc.signals.len();
        Self {
            inputs: doc.signals.clone(),
            len: doc.window_cycles as usize * n + 1,
            doc,
        }
    }

    /// The feature set of a model: its embedded document when it has one (its id must equal
    /// `id`), else a built-in set of that id.
    pub fn for_model(id: &str, doc_json: Option<&str>) -> Result<Self, FeatureError> {
        match doc_json {
            Some(json) => {
                let fs =
                    Self::from_json(json).map_err(|e| FeatureError::Document(e.to_string()))?;
                if fs.id() != id {
                    return Err(FeatureError::Document(format!(
                        "the model names feature set {id:?} but carries the document of {:?}",
                        fs.id()
                    )));
                }
                if !fs.is_fitted() {
                    return Err(FeatureError::Document(format!(
                        "feature set {id:?} has regime normalisation without fitted constants"
                    )));
                }
                Ok(fs)
            }
            None => Self::builtin(id).ok_or_else(|| FeatureError::UnknownVersion(id.to_owned())),
        }
    }

    pub fn doc(&self) -> &FeatureSetDoc {
        &self.doc
    }

    pub fn into_doc(self) -> FeatureSetDoc {
        self.doc
    }

    /// The document's id (what models reference).
    pub fn id(&self) -> &str {
        &self.doc.id
    }

    /// Metric names of one cycle's row, in row order (signals, then settings).
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    pub fn signals(&self) -> &[String] {
        &self.doc.signals
    }

    /// Cycles kept per machine.
    pub fn window_cycles(&self) -> usize {
        self.doc.window_cycles as usize
    }

    pub fn label(&self) -> Label {
        self.doc.label
    }

    /// Number of features produced (the model's input width).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a valid set produces at least one feature.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when [`FeatureSet::compute`] can run (no regime constants are missing).
    pub fn is_fitted(&self) -> bool {
        !matches!(
            self.doc.normalisation,
            Normalisation::RegimeZscore { fitted: None, .. }
        )
    }

    /// Returns this set with fitted regime constants (training calls this).
    pub fn with_fitted(&self, fitted: FittedRegimes) -> Result<Self, FeatureSetError> {
        let mut doc = self.doc.clone();
        if let Normalisation::RegimeZscore { fitted: f, .. } = &mut doc.normalisation {
            *f = Some(fitted);
        }
        Self::new(doc)
    }

    /// One name per feature, in output order (`raw[-29].s2`, `mean.s2`, `slope@10.s2`,
    /// `cycle`).
    pub fn feature_names(&self) -> Vec<String> {
        let o = &self.doc.outputs;
        let w = self.window_cycles();
        let mut names = Vec::with_capacity(self.len);
        if o.raw_window {
            for t in 0..w {
                let age = w - 1 - t;
                for s in &self.doc.signals {
                    names.push(if age == 0 {
                        format!("raw[0].{s}")
                    } else {
                        format!("raw[-{age}].{s}")
                    });
                }
            }
        }
        for a in &o.aggregations {
            for s in &self.doc.signals {
                names.push(match a.last_cycles {
                    Some(k) => format!("{}@{k}.{s}", a.op.name()),
                    None => format!("{}.{s}", a.op.name()),
                });
            }
        }
        if o.cycle {
            names.push("cycle".into());
        }
        names
    }

    /// Computes the features of a machine from `rows` (oldest first, each laid out as
    /// [`FeatureSet::inputs`]; only the last `window_cycles` are used) observed up to cycle
    /// number `cycle`.
    pub fn compute(&self, rows: &[Vec<f32>], cycle: f32) -> Result<Vec<f32>, FeatureError> {
        let mut out = Vec::with_capacity(self.len);
        self.compute_into(rows, cycle, &mut out)?;
        Ok(out)
    }

    /// [`FeatureSet::compute`], appending to `out` (training builds one big matrix). On error
    /// `out` is left as it was.
    pub fn compute_into(
        &self,
        rows: &[Vec<f32>],
        cycle: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), FeatureError> {
        if rows.is_empty() {
            return Err(FeatureError::Empty);
        }
        let width = self.inputs.len();
        let n = self.doc.signals.len();
        let start = rows.len().saturating_sub(self.window_cycles());
        let recent = rows.get(start..).unwrap_or_default();
        // Signals of the window after normalisation, cycle-major.
        let mut win: Vec<f32> = Vec::with_capacity(recent.len() * n);
        for (i, row) in recent.iter().enumerate() {
            if row.len() != width {
                return Err(FeatureError::Width {
                    index: start + i,
                    got: row.len(),
                    expected: width,
                });
            }
            if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                return Err(FeatureError::NotFinite {
                    index: start + i,
                    channel: self.inputs.get(c).cloned().unwrap_or_default(),
                });
            }
            let (signals, settings) = row.split_at(n);
            match &self.doc.normalisation {
                Normalisation::None => win.extend_from_slice(signals),
                Normalisation::RegimeZscore { fitted: None, .. } => {
                    return Err(FeatureError::Document(format!(
                        "feature set {:?} has no fitted regimes",
                        self.doc.id
                    )));
                }
                Normalisation::RegimeZscore {
                    fitted: Some(f), ..
                } => {
                    let r = nearest_regime(f, settings);
                    let (mean, std) = (&f.mean[r], &f.std[r]);
                    win.extend(
                        signals
                            .iter()
                            .zip(mean.iter().zip(std))
                            .map(|(v, (m, s))| (v - m) / s),
                    );
                }
            }
        }
        if let Some(Smoothing::Exponential { alpha }) = self.doc.smoothing {
            for t in 1..recent.len() {
                for j in 0..n {
                    let prev = win[(t - 1) * n + j];
                    let x = &mut win[t * n + j];
                    *x = alpha * *x + (1.0 - alpha) * prev;
                }
            }
        }
        let before = out.len();
        out.reserve(self.len);
        let o = &self.doc.outputs;
        let k = recent.len();
        if o.raw_window {
            let oldest = win.get(..n).unwrap_or_default();
            for _ in k..self.window_cycles() {
                out.extend_from_slice(oldest);
            }
            out.extend_from_slice(&win);
        }
        for a in &o.aggregations {
            let m = a.last_cycles.map_or(k, |c| (c as usize).min(k));
            let part = win.get((k - m) * n..).unwrap_or_default();
            for j in 0..n {
                out.push(aggregate(a.op, part.iter().skip(j).step_by(n).copied(), m));
            }
        }
        if o.cycle {
            out.push(cycle);
        }
        debug_assert_eq!(out.len() - before, self.len);
        Ok(())
    }
}

fn check_names(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("must name at least one metric".into());
    }
    if names.len() > MAX_SIGNALS {
        return Err(format!(
            "at most {MAX_SIGNALS} allowed, got {}",
            names.len()
        ));
    }
    for (i, s) in names.iter().enumerate() {
        if s.trim().is_empty() || s.len() > 256 {
            return Err(format!("entry {i} must be 1..=256 non-blank characters"));
        }
        if names[..i].contains(s) {
            return Err(format!("{s:?} appears twice"));
        }
    }
    Ok(())
}

fn check_fitted(
    f: &FittedRegimes,
    k: usize,
    settings: usize,
    signals: usize,
) -> Result<(), String> {
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    if f.settings_scale.len() != settings
        || !f.settings_scale.iter().all(|s| s.is_finite() && *s > 0.0)
    {
        return Err(format!(
            "settings_scale must hold {settings} positive numbers"
        ));
    }
    for (what, m, width) in [
        ("centroids", &f.centroids, settings),
        ("mean", &f.mean, signals),
        ("std", &f.std, signals),
    ] {
        if m.len() != k || m.iter().any(|r| r.len() != width || !finite(r)) {
            return Err(format!("{what} must be {k} x {width} finite numbers"));
        }
    }
    if f.std.iter().flatten().any(|s| *s <= 0.0) {
        return Err("std must be positive".into());
    }
    Ok(())
}

/// Index of the regime whose centroid is nearest to `settings` (scaled distance; ties go to the
/// lower index, so the assignment is deterministic).
pub fn nearest_regime(f: &FittedRegimes, settings: &[f32]) -> usize {
    let mut best = (0, f32::INFINITY);
    for (r, c) in f.centroids.iter().enumerate() {
        let d: f32 = settings
            .iter()
            .zip(c)
            .zip(&f.settings_scale)
            .map(|((x, c), s)| ((x - c) / s).powi(2))
            .sum();
        if d < best.1 {
            best = (r, d);
        }
    }
    best.0
}

fn aggregate(op: AggregationOp, values: impl Iterator<Item = f32> + Clone, n: usize) -> f32 {
    let nf = n.max(1) as f64;
    let mean = || values.clone().map(f64::from).sum::<f64>() / nf;
    match op {
        AggregationOp::Last => values.last().unwrap_or(0.0),
        AggregationOp::Mean => mean() as f32,
        AggregationOp::Std => {
            let m = mean();
            (values.map(|v| (f64::from(v) - m).powi(2)).sum::<f64>() / nf).sqrt() as f32
        }
        AggregationOp::Slope => {
            if n < 2 {
                return 0.0;
            }
            // Least squares against t = 0..n-1: sum((t - tm)(v - vm)) / sum((t - tm)^2).
            let tm = (nf - 1.0) / 2.0;
            let vm = mean();
            let (mut num, mut den) = (0.0, 0.0);
            for (t, v) in values.enumerate() {
                let dt = t as f64 - tm;
                num += dt * (f64::from(v) - vm);
                den += dt * dt;
            }
            (num / den) as f32
        }
        AggregationOp::Min => values.fold(f32::INFINITY, f32::min),
        AggregationOp::Max => values.fold(f32::NEG_INFINITY, f32::max),
    }
}

/// The document of `cmapss-w30-v1`: the 30 latest cycles of the 14 informative FD001 sensors,
/// edge-padded, plus the cycle number; RUL capped at 125. Identical features to the hard-wired
/// set that shipped models were trained with.
pub fn cmapss_w30_v1() -> FeatureSetDoc {
    FeatureSetDoc {
        format_version: FORMAT_VERSION,
        id: crate::features::CMAPSS_V1.into(),
        description: "C-MAPSS FD001: 30 latest cycles of the 14 informative sensors, \
                      edge-padded, plus the cycle number"
            .into(),
        machine_type: Some("turbofan".into()),
        signals: crate::features::CMAPSS_INFORMATIVE_SENSORS
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        window_cycles: 30,
        smoothing: None,
        normalisation: Normalisation::None,
        outputs: Outputs {
            raw_window: true,
            aggregations: Vec::new(),
            cycle: true,
        },
        label: Label::Rul {
            cap_cycles: crate::features::RUL_CAP_CYCLES,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> FeatureSetDoc {
        FeatureSetDoc {
            format_version: 1,
            id: "t-v1".into(),
            description: String::new(),
            machine_type: None,
            signals: vec!["a".into(), "b".into()],
            window_cycles: 4,
            smoothing: None,
            normalisation: Normalisation::None,
            outputs: Outputs {
                raw_window: false,
                aggregations: [
                    AggregationOp::Last,
                    AggregationOp::Mean,
                    AggregationOp::Std,
                    AggregationOp::Slope,
                    AggregationOp::Min,
                    AggregationOp::Max,
                ]
                .into_iter()
                .map(|op| Aggregation {
                    op,
                    last_cycles: None,
                })
                .collect(),
                cycle: true,
            },
            label: Label::Rul { cap_cycles: 125.0 },
        }
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn aggregations_are_computed_over_the_observed_part_of_the_window() {
        let fs = FeatureSet::new(doc()).unwrap();
        // 5 cycles, window 4: a = 1,2,3,4 (slope 1), b = 8,6,4,2 (slope -2).
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|i| vec![i as f32, 10.0 - 2.0 * i as f32])
            .collect();
        let f = fs.compute(&rows, 5.0).unwrap();
        let sd_a = (1.25f32).sqrt();
        #[rustfmt::skip]
        let want = [4.0, 2.0, 2.5, 5.0, sd_a, 2.0 * sd_a, 1.0, -2.0, 1.0, 2.0, 4.0, 8.0, 5.0];
        assert!(close(&f, &want), "{f:?}");
        assert_eq!(fs.len(), want.len());
        assert_eq!(fs.feature_names()[0], "last.a");
        assert_eq!(fs.feature_names()[7], "slope.b");
        // One cycle: std and slope are 0, not NaN.
        let f = fs.compute(&rows[..1], 1.0).unwrap();
        assert!(
            close(
                &f,
                &[
                    0.0, 10.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 10.0, 1.0
                ]
            ),
            "{f:?}"
        );
    }

    #[test]
    fn last_cycles_and_smoothing_and_padding() {
        let mut d = doc();
        d.outputs.raw_window = true;
        d.outputs.aggregations = vec![Aggregation {
            op: AggregationOp::Mean,
            last_cycles: Some(2),
        }];
        d.smoothing = Some(Smoothing::Exponential { alpha: 0.5 });
        let fs = FeatureSet::new(d).unwrap();
        let rows = vec![vec![0.0, 4.0], vec![4.0, 4.0]];
        // Smoothed a: 0, 2. Raw window padded with the oldest (smoothed) cycle.
        let f = fs.compute(&rows, 2.0).unwrap();
        assert!(
            close(&f, &[0.0, 4.0, 0.0, 4.0, 0.0, 4.0, 2.0, 4.0, 1.0, 4.0, 2.0]),
            "{f:?}"
        );
        assert_eq!(fs.feature_names()[0], "raw[-3].a");
        assert_eq!(fs.feature_names()[7], "raw[0].b");
        assert_eq!(fs.feature_names()[8], "mean@2.a");
    }

    #[test]
    fn regimes_are_recognised_and_z_scored_per_regime() {
        let mut d = doc();
        d.outputs.aggregations.truncate(1); // last
        d.normalisation = Normalisation::RegimeZscore {
            settings: vec!["alt".into()],
            regimes: 2,
            fitted: None,
        };
        let unfitted = FeatureSet::new(d).unwrap();
        assert!(!unfitted.is_fitted());
        assert_eq!(unfitted.inputs(), ["a", "b", "alt"]);
        assert!(matches!(
            unfitted.compute(&[vec![1.0, 1.0, 0.0]], 1.0),
            Err(FeatureError::Document(_))
        ));
        let fs = unfitted
            .with_fitted(FittedRegimes {
                settings_scale: vec![10.0],
                centroids: vec![vec![0.0], vec![40.0]],
                mean: vec![vec![100.0, 0.0], vec![200.0, 10.0]],
                std: vec![vec![10.0, 1.0], vec![20.0, 2.0]],
            })
            .unwrap();
        // Altitude 1 -> regime 0; altitude 38 -> regime 1.
        let f = fs.compute(&[vec![110.0, 1.0, 1.0]], 1.0).unwrap();
        assert!(close(&f, &[1.0, 1.0, 1.0]), "{f:?}");
        let f = fs
            .compute(&[vec![110.0, 1.0, 1.0], vec![220.0, 14.0, 38.0]], 2.0)
            .unwrap();
        assert!(close(&f, &[1.0, 2.0, 2.0]), "{f:?}");
        // Fitted constants of the wrong shape are refused.
        let err = unfitted
            .with_fitted(FittedRegimes {
                settings_scale: vec![1.0],
                centroids: vec![vec![0.0]],
                mean: vec![vec![0.0, 0.0]],
                std: vec![vec![1.0, 1.0]],
            })
            .unwrap_err();
        assert!(err.to_string().contains("centroids must be 2 x 1"), "{err}");
    }

    #[test]
    fn documents_round_trip_and_unknown_fields_are_refused() {
        let fs = FeatureSet::builtin(crate::features::CMAPSS_V1).unwrap();
        assert_eq!(fs.len(), 30 * 14 + 1);
        assert_eq!(FeatureSet::new(cmapss_w30_v1()).unwrap(), fs);
        let again = FeatureSet::from_json(&fs.to_json()).unwrap();
        assert_eq!(again, fs);
        let mut v: serde_json::Value = serde_json::from_str(&fs.to_json()).unwrap();
        v["colour"] = "blue".into();
        let err = FeatureSet::from_json(&v.to_string()).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let mut v: serde_json::Value = serde_json::from_str(&fs.to_json()).unwrap();
        v["label"]["extra"] = 1.into();
        assert!(FeatureSet::from_json(&v.to_string()).is_err());
        let mut v: serde_json::Value = serde_json::from_str(&fs.to_json()).unwrap();
        v["outputs"]["aggregations"] = serde_json::json!([{ "op": "median" }]);
        assert!(FeatureSet::from_json(&v.to_string()).is_err());
    }

    #[test]
    fn invalid_documents_name_the_field() {
        let check = |f: fn(&mut FeatureSetDoc), field: &str| {
            let mut d = doc();
            f(&mut d);
            let err = FeatureSet::new(d).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        };
        check(|d| d.format_version = 2, "format_version");
        check(|d| d.id = "Bad Id".into(), "id");
        check(|d| d.signals.clear(), "signals");
        check(|d| d.signals.push("a".into()), "signals");
        check(|d| d.window_cycles = 0, "window_cycles");
        check(
            |d| d.smoothing = Some(Smoothing::Exponential { alpha: 0.0 }),
            "smoothing.alpha",
        );
        check(
            |d| d.outputs.aggregations[0].last_cycles = Some(5),
            "last_cycles",
        );
        check(
            |d| {
                d.outputs = Outputs {
                    raw_window: false,
                    aggregations: vec![],
                    cycle: false,
                }
            },
            "outputs",
        );
        check(
            |d| d.label = Label::Rul { cap_cycles: -1.0 },
            "label.cap_cycles",
        );
        check(
            |d| {
                d.normalisation = Normalisation::RegimeZscore {
                    settings: vec!["a".into()],
                    regimes: 1,
                    fitted: None,
                }
            },
            "also a signal",
        );
        check(
            |d| {
                d.normalisation = Normalisation::RegimeZscore {
                    settings: vec!["x".into()],
                    regimes: 0,
                    fitted: None,
                }
            },
            "normalisation.regimes",
        );
    }

    #[test]
    fn a_model_document_must_match_its_id_and_be_fitted() {
        let json = FeatureSet::builtin(crate::features::CMAPSS_V1)
            .unwrap()
            .to_json();
        assert!(FeatureSet::for_model("cmapss-w30-v1", Some(&json)).is_ok());
        assert!(FeatureSet::for_model("cmapss-w30-v1", None).is_ok());
        assert!(matches!(
            FeatureSet::for_model("other", Some(&json)),
            Err(FeatureError::Document(_))
        ));
        assert!(matches!(
            FeatureSet::for_model("other", None),
            Err(FeatureError::UnknownVersion(_))
        ));
    }
}
