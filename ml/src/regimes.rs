//! Fitting operating regimes (C-MAPSS FD002/FD004 style) for a feature set with
//! `regime_zscore` normalisation: k-means on the scaled operating settings, then each signal's
//! mean and standard deviation per regime. The result goes into the feature-set document the
//! model ships with; assigning a cycle to a regime at inference is
//! `kip_shared::feature_set::nearest_regime`, the same function used here after fitting.
//!
//! Deterministic for a given seed: k-means++ seeding from a seeded RNG, a fixed number of Lloyd
//! iterations at most, ties to the lower index.

use kip_shared::feature_set::{FittedRegimes, nearest_regime};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

/// Fits `k` regimes. `rows` are the training cycles laid out as the feature set's inputs:
/// `n_signals` signal values, then the settings.
pub fn fit(rows: &[Vec<f32>], n_signals: usize, k: usize, seed: u64) -> FittedRegimes {
    let settings: Vec<&[f32]> = rows
        .iter()
        .map(|r| r.get(n_signals..).unwrap_or_default())
        .collect();
    let dims = settings.first().map_or(0, |s| s.len());
    let n = settings.len().max(1) as f64;
    // Scale each setting by its spread so altitude (thousands of feet) does not drown Mach.
    let settings_scale: Vec<f32> = (0..dims)
        .map(|d| {
            let m = settings.iter().map(|s| f64::from(s[d])).sum::<f64>() / n;
            let v = settings
                .iter()
                .map(|s| (f64::from(s[d]) - m).powi(2))
                .sum::<f64>()
                / n;
            let sd = v.sqrt() as f32;
            if sd > 1e-6 { sd } else { 1.0 }
        })
        .collect();
    let dist = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .zip(&settings_scale)
            .map(|((x, y), s)| ((x - y) / s).powi(2))
            .sum()
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4e91_3e5a);
    let mut centroids: Vec<Vec<f32>> = Vec::with_capacity(k);
    if let Some(first) = settings.get(rng.random_range(0..settings.len().max(1))) {
        centroids.push(first.to_vec());
    }
    // k-means++: each next centre drawn with probability proportional to squared distance.
    while centroids.len() < k && !settings.is_empty() {
        let d2: Vec<f64> = settings
            .iter()
            .map(|s| {
                centroids
                    .iter()
                    .map(|c| f64::from(dist(s, c)))
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let total: f64 = d2.iter().sum();
        if total <= 0.0 {
            // Fewer distinct points than regimes: repeat the last centre.
            let last = centroids.last().cloned().unwrap_or_default();
            centroids.push(last);
            continue;
        }
        let mut pick = rng.random::<f64>() * total;
        let mut chosen = settings.len() - 1;
        for (i, d) in d2.iter().enumerate() {
            pick -= d;
            if pick <= 0.0 {
                chosen = i;
                break;
            }
        }
        centroids.push(settings[chosen].to_vec());
    }
    let mut fitted = FittedRegimes {
        settings_scale: settings_scale.clone(),
        centroids,
        mean: Vec::new(),
        std: Vec::new(),
    };
    for _ in 0..100 {
        let mut sum = vec![vec![0f64; dims]; k];
        let mut count = vec![0usize; k];
        for s in &settings {
            let r = nearest_regime(&fitted, s);
            count[r] += 1;
            for (acc, v) in sum[r].iter_mut().zip(s.iter()) {
                *acc += f64::from(*v);
            }
        }
        let mut moved = false;
        for r in 0..k {
            if count[r] == 0 {
                continue;
            }
            let c: Vec<f32> = sum[r]
                .iter()
                .map(|v| (v / count[r] as f64) as f32)
                .collect();
            if c != fitted.centroids[r] {
                moved = true;
                fitted.centroids[r] = c;
            }
        }
        if !moved {
            break;
        }
    }
    // Per-regime statistics of the signals.
    let mut sum = vec![vec![0f64; n_signals]; k];
    let mut sq = vec![vec![0f64; n_signals]; k];
    let mut count = vec![0usize; k];
    for (row, s) in rows.iter().zip(&settings) {
        let r = nearest_regime(&fitted, s);
        count[r] += 1;
        for j in 0..n_signals {
            let v = f64::from(row[j]);
            sum[r][j] += v;
            sq[r][j] += v * v;
        }
    }
    for r in 0..k {
        let c = count[r].max(1) as f64;
        let mean: Vec<f64> = sum[r].iter().map(|v| v / c).collect();
        let std: Vec<f32> = sq[r]
            .iter()
            .zip(&mean)
            .map(|(q, m)| {
                let sd = (q / c - m * m).max(0.0).sqrt() as f32;
                if sd > 1e-6 { sd } else { 1.0 }
            })
            .collect();
        fitted.mean.push(mean.iter().map(|m| *m as f32).collect());
        fitted.std.push(std);
    }
    fitted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_operating_conditions_are_found_and_normalised_away() {
        // Six FD002-like conditions (altitude, Mach, TRA); the signal depends on the condition
        // plus a small per-cycle drift.
        let conditions = [
            [0.0f32, 0.0, 100.0],
            [10.0, 0.25, 100.0],
            [20.0, 0.7, 100.0],
            [25.0, 0.62, 60.0],
            [35.0, 0.84, 100.0],
            [42.0, 0.84, 100.0],
        ];
        let mut rows = Vec::new();
        for i in 0..600 {
            let c = conditions[(i * 7) % 6];
            let noise = ((i * 13) % 11) as f32 * 1e-3;
            let signal = 500.0 + c[0] * 3.0 + c[2] + (i % 10) as f32 * 0.1;
            rows.push(vec![signal, c[0] + noise, c[1] + noise * 1e-2, c[2]]);
        }
        let f = fit(&rows, 1, 6, 1);
        let mut seen: Vec<usize> = conditions.iter().map(|c| nearest_regime(&f, c)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 6, "each condition is its own regime: {f:?}");
        // Within a regime the signal only varies by the drift: std about 0.29, not hundreds.
        assert!(f.std.iter().all(|s| s[0] < 0.5), "{:?}", f.std);
        assert_eq!(fit(&rows, 1, 6, 1), f, "same seed, same regimes");
    }
}
