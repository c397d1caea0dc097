//! Records produced on the agent, buffered durably, and synced to the control plane.
//!
//! Invariants:
//! - Every record is self-describing (`kind` tag) so a newer agent's unknown kind can be
//!   rejected by name instead of mis-parsed.
//! - Timestamps are UTC; `ts` of a reading is the *source* timestamp (OPC UA SourceTimestamp
//!   or the payload's timestamp field), falling back to the receive time when absent.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// OPC UA style quality of a value, collapsed to its three classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    #[default]
    Good,
    Uncertain,
    Bad,
}

impl Quality {
    /// Stable numeric code used in storage (`sensor_data.quality`).
    pub fn code(self) -> i16 {
        match self {
            Self::Good => 0,
            Self::Uncertain => 1,
            Self::Bad => 2,
        }
    }
}

/// One measured value of one metric of one machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// Name of the configured source (an OPC UA endpoint or MQTT broker) that produced it.
    pub source: String,
    /// Machine the value belongs to (a gateway may watch several machines).
    pub machine: String,
    pub metric: String,
    pub ts: DateTime<Utc>,
    pub value: f64,
    #[serde(default)]
    pub quality: Quality,
}

/// Data is known to be missing for `source` between `from` and `to` (e.g. a reconnect).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub source: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub reason: String,
}

/// A payload that could not be turned into a reading; kept so nothing disappears silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    pub source: String,
    /// MQTT topic or OPC UA node id.
    pub origin: String,
    pub reason: String,
    /// Payload bytes: for a message a source could not decode, its first bytes (at most
    /// [`DEAD_LETTER_PREFIX_BYTES`]); for a record the control plane refused (source `sync`),
    /// the record's whole JSON, since the dead letter is then its only copy.
    pub payload_prefix: Vec<u8>,
    pub ts: DateTime<Utc>,
}

/// How many payload bytes a dead letter keeps.
pub const DEAD_LETTER_PREFIX_BYTES: usize = 256;

/// Records were evicted from the agent's buffer before they could be synced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loss {
    /// Number of records evicted.
    pub records: u64,
    /// Sequence range (inclusive) of the evicted records.
    pub first_seq: u64,
    pub last_seq: u64,
    pub reason: String,
    pub ts: DateTime<Utc>,
}

/// Output of a predictive-maintenance model on the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    pub machine: String,
    pub model_version: String,
    pub ts: DateTime<Utc>,
    pub rul_cycles: f64,
    #[serde(default)]
    pub anomaly_score: Option<f64>,
    /// Registry name of the model; sent with shadow predictions only (a champion prediction
    /// keeps the shape control planes before shadows accept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `shadow` for the prediction of a model run beside the champion on the same features
    /// (never "the" prediction); absent for the champion's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<ModelRole>,
}

/// The part a model plays on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelRole {
    /// Serves "the" prediction.
    Champion,
    /// Runs beside the champion on the same features; its predictions are only compared.
    Shadow,
}

impl ModelRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Champion => "champion",
            Self::Shadow => "shadow",
        }
    }
}

/// Inference statistics of one model on one agent over an interval (since the previous record
/// of the same model and role): how many inferences ran, how many failed, and their latency
/// (feature building excluded: the features are computed once for every model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStats {
    pub model: String,
    pub model_version: String,
    pub role: ModelRole,
    /// End of the interval.
    pub ts: DateTime<Utc>,
    pub predictions: u64,
    pub failures: u64,
    /// Latency quantiles of the interval's successful inferences, microseconds; absent when
    /// none succeeded.
    #[serde(default)]
    pub latency_p50_us: Option<f64>,
    #[serde(default)]
    pub latency_p99_us: Option<f64>,
    #[serde(default)]
    pub latency_max_us: Option<f64>,
}

/// Drift of one input (or the output, feature `output`) of a serving model over one full
/// window of the agent's drift monitor (`kip_shared::drift`): an agent emits one per feature
/// each time the window has been refilled, so consecutive records of a feature cover disjoint
/// windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDrift {
    /// Registry name of the model (`rul-fd001`).
    pub model: String,
    pub model_version: String,
    /// Input name from the model's feature set (a signal or setting), or `output`.
    pub feature: String,
    /// When the window was evaluated.
    pub ts: DateTime<Utc>,
    pub psi: f64,
    pub ks: f64,
    /// Thresholds calibrated to the window (see `kip_shared::drift::Thresholds`).
    pub psi_threshold: f64,
    pub ks_threshold: f64,
    /// Either statistic above its threshold.
    pub alarm: bool,
    /// Values in the window.
    pub window: u32,
    /// Distinct machines in the window: the sample size the thresholds assume.
    pub effective_window: u32,
}

/// Anything the agent buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    Reading(Reading),
    Gap(Gap),
    DeadLetter(DeadLetter),
    Loss(Loss),
    Prediction(Prediction),
    /// Added after protocol 1 went out; a control plane that predates it refuses the record
    /// as undecodable, and the agent dead-letters it alone (the rest of the batch syncs).
    ModelDrift(ModelDrift),
    /// Added with shadow models; older control planes refuse it like `model_drift` (above).
    ModelStats(ModelStats),
}

impl Record {
    /// Raw readings may be evicted when the buffer is full; everything else is kept.
    pub fn is_evictable(&self) -> bool {
        matches!(self, Self::Reading(_))
    }

    /// Which variant this is, without its data.
    pub fn kind(&self) -> RecordKind {
        match self {
            Self::Reading(_) => RecordKind::Reading,
            Self::Gap(_) => RecordKind::Gap,
            Self::DeadLetter(_) => RecordKind::DeadLetter,
            Self::Loss(_) => RecordKind::Loss,
            Self::Prediction(_) => RecordKind::Prediction,
            Self::ModelDrift(_) => RecordKind::ModelDrift,
            Self::ModelStats(_) => RecordKind::ModelStats,
        }
    }

    /// The record's own timestamp (a gap is dated by its end).
    pub fn ts(&self) -> DateTime<Utc> {
        match self {
            Self::Reading(r) => r.ts,
            Self::Gap(g) => g.to,
            Self::DeadLetter(d) => d.ts,
            Self::Loss(l) => l.ts,
            Self::Prediction(p) => p.ts,
            Self::ModelDrift(d) => d.ts,
            Self::ModelStats(s) => s.ts,
        }
    }
}

/// The variant of a [`Record`], e.g. for per-kind counters and storage tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Reading,
    Gap,
    DeadLetter,
    Loss,
    Prediction,
    ModelDrift,
    ModelStats,
}

impl RecordKind {
    /// Every kind, in [`RecordKind::code`] order.
    pub const ALL: [RecordKind; 7] = [
        Self::Reading,
        Self::Gap,
        Self::DeadLetter,
        Self::Loss,
        Self::Prediction,
        Self::ModelDrift,
        Self::ModelStats,
    ];

    /// The `kind` tag used in the JSON encoding of [`Record`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reading => "reading",
            Self::Gap => "gap",
            Self::DeadLetter => "dead_letter",
            Self::Loss => "loss",
            Self::Prediction => "prediction",
            Self::ModelDrift => "model_drift",
            Self::ModelStats => "model_stats",
        }
    }

    /// Stable small code used in storage; never reuse a retired code.
    pub fn code(self) -> u8 {
        match self {
            Self::Reading => 0,
            Self::Gap => 1,
            Self::DeadLetter => 2,
            Self::Loss => 3,
            Self::Prediction => 4,
            Self::ModelDrift => 5,
            Self::ModelStats => 6,
        }
    }

    /// Inverse of [`RecordKind::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record with its durable position in one agent's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sequenced {
    /// Incremented when an agent's buffer is recreated from scratch, so sequence numbers
    /// never repeat for one device.
    pub epoch: u64,
    /// Strictly increasing within an epoch.
    pub seq: u64,
    pub record: Record,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_a_kind_tag() {
        let r = Record::Reading(Reading {
            source: "plc1".into(),
            machine: "m1".into(),
            metric: "temp".into(),
            ts: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            value: 21.5,
            quality: Quality::Good,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"kind\":\"reading\""), "{s}");
        assert_eq!(serde_json::from_str::<Record>(&s).unwrap(), r);
    }

    #[test]
    fn unknown_kind_is_named_in_the_error() {
        let err = serde_json::from_str::<Record>(r#"{"kind":"alarm"}"#).unwrap_err();
        assert!(err.to_string().contains("alarm"), "{err}");
    }

    #[test]
    fn only_readings_are_evictable() {
        let p = Record::Prediction(Prediction {
            machine: "m".into(),
            model_version: "1".into(),
            ts: Utc::now(),
            rul_cycles: 10.0,
            anomaly_score: None,
            model: None,
            role: None,
        });
        assert!(!p.is_evictable());
    }

    #[test]
    fn kind_codes_round_trip_and_match_the_json_tag() {
        for k in RecordKind::ALL {
            assert_eq!(RecordKind::from_code(k.code()), Some(k));
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert_eq!(RecordKind::from_code(200), None);
    }
}
