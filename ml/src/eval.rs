//! Evaluation metrics for remaining-useful-life predictions.

/// Root mean squared error.
pub fn rmse(pred: &[f32], truth: &[f32]) -> f64 {
    let n = pred.len().min(truth.len()).max(1) as f64;
    let sse: f64 = pred
        .iter()
        .zip(truth)
        .map(|(p, t)| (f64::from(*p) - f64::from(*t)).powi(2))
        .sum();
    (sse / n).sqrt()
}

/// The PHM08 / NASA scoring function: late predictions (`pred > truth`) cost more than early
/// ones. `d = pred - truth`; `s = e^(-d/13) - 1` for `d < 0`, `e^(d/10) - 1` otherwise. Summed.
pub fn nasa_score(pred: &[f32], truth: &[f32]) -> f64 {
    pred.iter()
        .zip(truth)
        .map(|(p, t)| {
            let d = f64::from(*p) - f64::from(*t);
            if d < 0.0 {
                (-d / 13.0).exp() - 1.0
            } else {
                (d / 10.0).exp() - 1.0
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmse_of_known_errors() {
        assert_eq!(rmse(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rmse(&[3.0, 0.0], &[0.0, 4.0]) - (12.5f64).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn nasa_score_punishes_late_more_than_early() {
        let late = nasa_score(&[20.0], &[10.0]);
        let early = nasa_score(&[0.0], &[10.0]);
        assert!((late - (1f64.exp() - 1.0)).abs() < 1e-12);
        assert!((early - ((10.0f64 / 13.0).exp() - 1.0)).abs() < 1e-12);
        assert!(late > early);
        assert_eq!(nasa_score(&[5.0], &[5.0]), 0.0);
    }
}
