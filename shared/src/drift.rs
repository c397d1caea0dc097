//! Drift of a deployed model's inputs and output: reference statistics fitted on training data
//! ([`Reference`], carried by the model card), and the per-feature comparison of a window of
//! live values against them (PSI and the Kolmogorov-Smirnov distance) with thresholds
//! calibrated to the window size ([`Thresholds`]).
//!
//! Training and the agent share this module like they share the feature interpreter: the
//! reference is computed from the exact features the model was trained on, and the agent
//! compares the exact features it feeds the model.
//!
//! Invariants:
//! - A [`Reference`] holds `BINS - 1` interior cut points at the training quantiles (equal-mass
//!   bins) and [`QUANTILES`] + 1 quantiles for the reference CDF; a reference with no samples
//!   or non-finite values is refused at fit time.
//! - Thresholds depend on the window size `n` and the reference size `m`: with no drift,
//!   `PSI * n_eff` is approximately chi-square with `BINS - 1` degrees of freedom and
//!   `KS * sqrt(n_eff)` follows the Kolmogorov distribution (`n_eff = n m / (n + m)`), so the
//!   thresholds are their 99.9 % quantiles scaled by `1 / n_eff`, never below the practical
//!   floors ([`PSI_FLOOR`], [`KS_FLOOR`]). Small windows get wide thresholds: unchanged data
//!   does not alarm because a window is small.
//! - [`DriftMonitor`] keeps at most `window` values per feature (bounded memory) and reports
//!   only over a full window; its thresholds use the number of distinct sources (machines) in
//!   the window as sample size, since one machine's consecutive cycles are not independent.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Equal-mass bins of the PSI histogram.
pub const BINS: usize = 10;
/// Quantile resolution of the reference CDF (percentiles).
pub const QUANTILES: usize = 100;
/// Smallest PSI that counts as drift however large the window (the usual "moderate shift").
pub const PSI_FLOOR: f64 = 0.1;
/// Smallest KS distance that counts as drift however large the window.
pub const KS_FLOOR: f64 = 0.05;
/// 99.9 % quantile of the standard normal (for the chi-square approximation).
const Z_999: f64 = 3.090_232;
/// 99.9 % quantile of the Kolmogorov distribution.
const KOLMOGOROV_999: f64 = 1.949_6;

/// Why a reference could not be fitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DriftError {
    #[error("reference of {0}: no values")]
    Empty(String),
    #[error("reference of {0}: non-finite value")]
    NonFinite(String),
}

/// Reference statistics of one feature (or the output), from training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub feature: String,
    /// `BINS - 1` cut points (training quantiles at 10 %, 20 %, ...).
    pub cuts: Vec<f64>,
    /// `QUANTILES + 1` quantiles (0 %, 1 %, ..., 100 %): the reference CDF.
    pub quantiles: Vec<f64>,
    /// Number of training values the reference was fitted on.
    pub samples: u64,
    /// Fraction of the training values in each of the `BINS` bins. Not exactly 1/BINS when
    /// values repeat (sensors are quantised: a cut point can fall on a run of equal values).
    pub fractions: Vec<f64>,
}

/// Quantile `q` (0..=1) of sorted `v`, linear between order statistics.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let w = pos - lo as f64;
    sorted[lo] * (1.0 - w) + sorted[hi.min(sorted.len() - 1)] * w
}

impl Reference {
    /// Fits the reference of `feature` on training `values`.
    pub fn fit(feature: &str, values: &[f64]) -> Result<Self, DriftError> {
        if values.is_empty() {
            return Err(DriftError::Empty(feature.to_owned()));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(DriftError::NonFinite(feature.to_owned()));
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mut r = Self {
            feature: feature.to_owned(),
            cuts: (1..BINS)
                .map(|i| quantile(&sorted, i as f64 / BINS as f64))
                .collect(),
            quantiles: (0..=QUANTILES)
                .map(|i| quantile(&sorted, i as f64 / QUANTILES as f64))
                .collect(),
            samples: values.len() as u64,
            fractions: Vec::new(),
        };
        let mut counts = [0usize; BINS];
        for v in values {
            counts[r.bin(*v).min(BINS - 1)] += 1;
        }
        r.fractions = counts
            .iter()
            .map(|c| *c as f64 / values.len() as f64)
            .collect();
        Ok(r)
    }

    /// Reference CDF at `x`, piecewise linear between the stored quantiles.
    fn cdf(&self, x: f64) -> f64 {
        let q = &self.quantiles;
        let (Some(first), Some(last)) = (q.first(), q.last()) else {
            return 0.0;
        };
        if x < *first {
            return 0.0;
        }
        if x >= *last {
            return 1.0;
        }
        let step = 1.0 / (q.len() - 1) as f64;
        // Last quantile <= x: ties (constant stretches) take the highest level.
        let i = q.partition_point(|v| *v <= x).saturating_sub(1);
        let (a, b) = (q[i], q[(i + 1).min(q.len() - 1)]);
        let w = if b > a { (x - a) / (b - a) } else { 0.0 };
        (i as f64 + w) * step
    }

    /// Bin of `x` among the cut points (`0..BINS`).
    fn bin(&self, x: f64) -> usize {
        self.cuts.partition_point(|c| *c < x)
    }

    /// Population stability index of `window` against this reference (equal-mass bins; the
    /// window's bin fractions are smoothed with half a count per bin, so an empty bin of a
    /// small window is finite and does not dominate the index).
    pub fn psi(&self, window: &[f64]) -> f64 {
        if window.is_empty() {
            return 0.0;
        }
        let bins = self.cuts.len() + 1;
        let mut counts = vec![0usize; bins];
        for x in window {
            counts[self.bin(*x).min(bins - 1)] += 1;
        }
        let total = window.len() as f64 + 0.5 * bins as f64;
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Empty reference bins (all mass on a tie) are floored like the window's.
                let expected = self.fractions.get(i).copied().unwrap_or(0.0).max(1e-4);
                let p = (*c as f64 + 0.5) / total;
                (p - expected) * (p / expected).ln()
            })
            .sum()
    }

    /// Kolmogorov-Smirnov distance between `window`'s empirical CDF and the reference CDF.
    pub fn ks(&self, window: &[f64]) -> f64 {
        let mut sorted = window.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        sorted
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let f = self.cdf(*x);
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max)
    }
}

/// Drift thresholds for a window of `n` values against a reference of `m` samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub psi: f64,
    pub ks: f64,
}

impl Thresholds {
    /// See the module invariants for how these are calibrated.
    pub fn for_window(n: usize, m: u64) -> Self {
        let (n, m) = (n.max(1) as f64, m.max(1) as f64);
        let n_eff = n * m / (n + m);
        // Wilson-Hilferty: chi-square quantile with k degrees of freedom.
        let k = (BINS - 1) as f64;
        let c = 2.0 / (9.0 * k);
        let chi2 = k * (1.0 - c + Z_999 * c.sqrt()).powi(3);
        Self {
            psi: (chi2 / n_eff).max(PSI_FLOOR),
            ks: (KOLMOGOROV_999 / n_eff.sqrt()).max(KS_FLOOR),
        }
    }
}

/// Drift of one feature over one full window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    pub feature: String,
    pub psi: f64,
    pub ks: f64,
    pub thresholds: Thresholds,
    /// Either statistic above its threshold.
    pub drifted: bool,
    pub window: usize,
    /// Distinct sources in the window: the sample size the thresholds were calibrated for.
    pub effective_window: usize,
}

/// Sliding windows of a model's features (and output) compared against their references.
///
/// Each row comes from a source (a machine). Consecutive cycles of one machine are strongly
/// autocorrelated (one machine, one life stage), so they are not independent draws: the
/// thresholds use as effective window size the number of distinct sources in the window
/// (at most the window size). A window of 200 cycles from 15 machines is judged like 15
/// independent values, which keeps an unchanged fleet quiet and still flags a shifted sensor.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    references: Vec<Reference>,
    windows: Vec<VecDeque<f64>>,
    /// Source of each of the latest `window` rows.
    sources: VecDeque<String>,
    window: usize,
}

impl DriftMonitor {
    /// A monitor over `references` (one per monitored value, in the order of
    /// [`DriftMonitor::observe`]'s slice) with windows of `window` values.
    pub fn new(references: Vec<Reference>, window: usize) -> Self {
        let window = window.max(1);
        let windows = references
            .iter()
            .map(|_| VecDeque::with_capacity(window))
            .collect();
        Self {
            references,
            windows,
            sources: VecDeque::with_capacity(window),
            window,
        }
    }

    /// Adds one row of values from `source` (extra values are ignored, non-finite ones
    /// skipped).
    pub fn observe(&mut self, source: &str, values: &[f64]) {
        if self.sources.len() == self.window {
            self.sources.pop_front();
        }
        self.sources.push_back(source.to_owned());
        for (w, v) in self.windows.iter_mut().zip(values) {
            if !v.is_finite() {
                continue;
            }
            if w.len() == self.window {
                w.pop_front();
            }
            w.push_back(*v);
        }
    }

    /// Drift of every feature whose window is full.
    pub fn evaluate(&self) -> Vec<FeatureDrift> {
        let distinct = self
            .sources
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        self.references
            .iter()
            .zip(&self.windows)
            .filter(|(_, w)| w.len() == self.window)
            .map(|(r, w)| {
                let values: Vec<f64> = w.iter().copied().collect();
                let psi = r.psi(&values);
                let ks = r.ks(&values);
                let thresholds = Thresholds::for_window(distinct.min(values.len()), r.samples);
                FeatureDrift {
                    feature: r.feature.clone(),
                    psi,
                    ks,
                    thresholds,
                    drifted: psi > thresholds.psi || ks > thresholds.ks,
                    window: values.len(),
                    effective_window: distinct.min(values.len()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    /// Standard-normal draws (Box-Muller), reproducible from `seed`.
    fn normal(seed: u64, n: usize, mean: f64, sd: f64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u1: f64 = rng.random_range(1e-12..1.0);
                let u2: f64 = rng.random();
                mean + sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    }

    #[test]
    fn unchanged_data_stays_below_the_threshold_for_every_window_size() {
        let reference = Reference::fit("s2", &normal(1, 20_000, 642.0, 0.5)).unwrap();
        for window in [30, 100, 300, 1000] {
            let mut alarms = 0;
            for trial in 0..200 {
                let live = normal(1000 + trial, window, 642.0, 0.5);
                let t = Thresholds::for_window(window, reference.samples);
                let (psi, ks) = (reference.psi(&live), reference.ks(&live));
                if psi > t.psi || ks > t.ks {
                    eprintln!(
                        "window {window}: psi {psi} > {} or ks {ks} > {}",
                        t.psi, t.ks
                    );
                    alarms += 1;
                }
            }
            // 99.9 % quantiles: at most a handful of 200 unchanged windows may alarm.
            assert!(alarms <= 2, "window {window}: {alarms} false alarms of 200");
        }
    }

    #[test]
    fn a_shifted_sensor_is_above_the_threshold() {
        let reference = Reference::fit("s2", &normal(1, 20_000, 642.0, 0.5)).unwrap();
        // Half a standard deviation, seen in a window of 100 cycles.
        let mut monitor = DriftMonitor::new(vec![reference.clone()], 100);
        for (i, v) in normal(7, 100, 642.25, 0.5).into_iter().enumerate() {
            monitor.observe(&format!("m{i}"), &[v]);
        }
        let d = &monitor.evaluate()[0];
        assert!(d.drifted, "{d:?}");
        assert!(d.psi > d.thresholds.psi && d.ks > d.thresholds.ks, "{d:?}");
        // The same window size on unchanged data: no drift.
        let mut monitor = DriftMonitor::new(vec![reference], 100);
        for (i, v) in normal(8, 100, 642.0, 0.5).into_iter().enumerate() {
            monitor.observe(&format!("m{i}"), &[v]);
        }
        assert!(!monitor.evaluate()[0].drifted);
    }

    #[test]
    fn thresholds_narrow_with_the_window_and_stop_at_the_floors() {
        let small = Thresholds::for_window(30, 20_000);
        let large = Thresholds::for_window(1000, 20_000);
        assert!(small.psi > large.psi && small.ks > large.ks);
        let huge = Thresholds::for_window(10_000_000, 10_000_000);
        assert_eq!((huge.psi, huge.ks), (PSI_FLOOR, KS_FLOOR));
    }

    #[test]
    fn a_window_reports_only_when_full_and_a_bad_reference_is_refused() {
        let reference = Reference::fit("x", &[1.0, 2.0, 3.0]).unwrap();
        let mut m = DriftMonitor::new(vec![reference], 3);
        m.observe("a", &[1.0]);
        m.observe("a", &[f64::NAN]);
        assert!(m.evaluate().is_empty());
        assert_eq!(Reference::fit("x", &[]), Err(DriftError::Empty("x".into())));
        assert!(Reference::fit("x", &[f64::INFINITY]).is_err());
    }
}
