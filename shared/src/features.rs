//! The first, hard-wired feature set (`cmapss-w30-v1`) and the errors of feature computation.
//!
//! Feature sets are documents now ([`crate::feature_set`]); [`FeatureSpec`] remains as a
//! compatibility view of `cmapss-w30-v1` for callers that name its channels statically. Its
//! [`FeatureSpec::features`] runs the document interpreter, so there is still one
//! implementation of the arithmetic.
//!
//! Invariants:
//! - A feature set is identified by its id (`FeatureSpec::version` here); a model records the id
//!   it was trained with and the agent refuses a model whose set it cannot interpret.
//! - Output layout: `window_len * channels.len()` values, oldest cycle first, channels in
//!   [`FeatureSpec::channels`] order, then the cycle number. Missing early cycles (an engine
//!   younger than the window) are filled with its first observed cycle (edge padding).

/// Version tag of [`FeatureSpec::cmapss_v1`].
pub const CMAPSS_V1: &str = "cmapss-w30-v1";

/// The 14 C-MAPSS FD001 sensors that vary; the others are constant for this fault mode and
/// carry no information (dropped in preprocessing).
pub const CMAPSS_INFORMATIVE_SENSORS: [&str; 14] = [
    "s2", "s3", "s4", "s7", "s8", "s9", "s11", "s12", "s13", "s14", "s15", "s17", "s20", "s21",
];

/// Remaining-useful-life cap used for labels, as in the literature on C-MAPSS.
pub const RUL_CAP_CYCLES: f32 = 125.0;

/// Why features could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    #[error("empty window: at least one cycle of data is needed")]
    Empty,
    #[error("cycle {index} has {got} values, expected {expected} (one per channel)")]
    Width {
        index: usize,
        got: usize,
        expected: usize,
    },
    #[error("value of channel {channel} at cycle {index} is not finite")]
    NotFinite { index: usize, channel: String },
    #[error("unknown feature set version {0:?}")]
    UnknownVersion(String),
    #[error("feature set document: {0}")]
    Document(String),
}

/// Definition of a feature set.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSpec {
    pub version: &'static str,
    /// Metric names of the channels, in feature order.
    pub channels: Vec<&'static str>,
    /// Number of most recent cycles used.
    pub window_len: usize,
}

impl FeatureSpec {
    /// Window of the 30 latest cycles of the 14 informative sensors, plus the cycle number.
    pub fn cmapss_v1() -> Self {
        Self {
            version: CMAPSS_V1,
            channels: CMAPSS_INFORMATIVE_SENSORS.to_vec(),
            window_len: 30,
        }
    }

    /// Looks a feature set up by its version tag.
    pub fn by_version(version: &str) -> Result<Self, FeatureError> {
        match version {
            CMAPSS_V1 => Ok(Self::cmapss_v1()),
            other => Err(FeatureError::UnknownVersion(other.to_owned())),
        }
    }

    /// Number of features produced.
    pub fn len(&self) -> usize {
        self.window_len * self.channels.len() + 1
    }

    /// Always false: a spec has at least the cycle feature.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The document equivalent to this spec (raw window plus cycle number, RUL capped at
    /// [`RUL_CAP_CYCLES`]).
    pub fn to_feature_set(&self) -> Result<crate::feature_set::FeatureSet, FeatureError> {
        let mut doc = crate::feature_set::cmapss_w30_v1();
        doc.id = self.version.to_owned();
        doc.signals = self.channels.iter().map(|c| (*c).to_owned()).collect();
        doc.window_cycles = u32::try_from(self.window_len).unwrap_or(u32::MAX);
        crate::feature_set::FeatureSet::new(doc).map_err(|e| FeatureError::Document(e.to_string()))
    }

    /// Computes features from `cycles` (oldest first, each with one value per channel; only the
    /// last `window_len` are used) observed up to cycle number `cycle`, with the document
    /// interpreter ([`crate::feature_set::FeatureSet::compute`]).
    pub fn features(&self, cycles: &[Vec<f32>], cycle: f32) -> Result<Vec<f32>, FeatureError> {
        self.to_feature_set()?.compute(cycles, cycle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(window_len: usize) -> FeatureSpec {
        FeatureSpec {
            version: "t",
            channels: vec!["a", "b"],
            window_len,
        }
    }

    #[test]
    fn full_window_keeps_the_latest_cycles_in_order() {
        let rows: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32, 10.0 + i as f32]).collect();
        let f = spec(3).features(&rows, 5.0).unwrap();
        assert_eq!(f, vec![2.0, 12.0, 3.0, 13.0, 4.0, 14.0, 5.0]);
    }

    #[test]
    fn short_history_is_edge_padded() {
        let rows = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        let f = spec(4).features(&rows, 2.0).unwrap();
        assert_eq!(f, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 2.0]);
        assert_eq!(f.len(), spec(4).len());
    }

    #[test]
    fn bad_windows_are_named() {
        assert_eq!(spec(2).features(&[], 0.0), Err(FeatureError::Empty));
        assert_eq!(
            spec(2).features(&[vec![1.0]], 1.0),
            Err(FeatureError::Width {
                index: 0,
                got: 1,
                expected: 2
            })
        );
        let err = spec(2).features(&[vec![1.0, f32::NAN]], 1.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value of channel b at cycle 0 is not finite"
        );
        assert!(FeatureSpec::by_version("nope").is_err());
        assert_eq!(
            FeatureSpec::by_version(CMAPSS_V1).unwrap().len(),
            30 * 14 + 1
        );
    }
}
