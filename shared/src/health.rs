//! The agent's health report, carried by every [`crate::sync::SyncBatch`] (field `health`)
//! and by the idle heartbeat (an empty batch with only a report).
//!
//! Invariants:
//! - Every field is optional or defaulted and the struct accepts unknown fields, so agents
//!   and control planes of different builds keep decoding each other's reports.
//! - [`HealthReport::check`] bounds everything the control plane stores (number of sources,
//!   string lengths, no NUL, finite numbers): a report that passes is storable as `jsonb`.
//! - Ages are seconds as measured on the agent at `reported_at`; the clock offset is the
//!   agent's estimate of `control-plane time - agent time` from the previous exchange
//!   (NTP-style midpoint of request and answer, see [`clock_offset_ms`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::validate::{TextError, pg_text};

/// Most sources a report may list.
pub const MAX_SOURCES: usize = 256;
/// Most drifting feature names in a report (the rest are summarised by `model_drift`).
pub const MAX_DRIFT_FEATURES: usize = 64;
/// `model_drift` at or above which a feature of the model is above its drift threshold.
pub const MODEL_DRIFT_SCORE_ALARM: f64 = 1.0;
/// Longest string in a report (source names, kinds, versions, model names).
pub const MAX_HEALTH_TEXT_BYTES: usize = 256;

/// One agent's health at `reported_at`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// When the agent took the report (agent clock).
    #[serde(default)]
    pub reported_at: Option<DateTime<Utc>>,
    /// `kip-agent 0.1.0`.
    #[serde(default)]
    pub agent_version: String,
    /// Bytes stored in the buffer (the quantity capped by `buffer.max_bytes`).
    #[serde(default)]
    pub buffer_bytes: u64,
    /// The buffer's cap (`buffer.max_bytes`); 0 when unknown.
    #[serde(default)]
    pub buffer_max_bytes: u64,
    /// Records buffered and not yet acknowledged.
    #[serde(default)]
    pub buffer_records: u64,
    /// Age of the oldest unacknowledged record; `None` when the buffer is empty.
    #[serde(default)]
    pub oldest_unsynced_age_s: Option<f64>,
    /// Dead letters since start (unparseable payloads and records the control plane refused).
    #[serde(default)]
    pub dead_letters: u64,
    /// Records evicted because the buffer was full, since the buffer was created.
    #[serde(default)]
    pub evicted_records: u64,
    #[serde(default)]
    pub sources: Vec<SourceHealth>,
    /// `not_after` of the device certificate.
    #[serde(default)]
    pub cert_not_after: Option<DateTime<Utc>>,
    /// `name@version` of the model serving, if any.
    #[serde(default)]
    pub running_model: Option<String>,
    /// Drift score of the running model, when the agent computes one: the largest ratio of a
    /// drift statistic (PSI or KS) to its window-calibrated threshold over the model's inputs
    /// and output, so at or above 1 (`MODEL_DRIFT_SCORE_ALARM`) some feature drifts.
    #[serde(default)]
    pub model_drift: Option<f64>,
    /// The model's features (inputs, or `output`) whose drift statistic is above its
    /// threshold; at most [`MAX_DRIFT_FEATURES`] names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_drift_features: Vec<String>,
    /// Free and total bytes on the state volume (buffer, identity, models).
    #[serde(default)]
    pub disk_free_bytes: Option<u64>,
    #[serde(default)]
    pub disk_total_bytes: Option<u64>,
    /// Control-plane time minus agent time, from the previous exchange.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// Resident set size of the agent process.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Seconds since the agent started.
    #[serde(default)]
    pub uptime_s: u64,
    /// Inferences that failed since the agent started.
    #[serde(default)]
    pub inference_errors: u64,
}

/// One source's state in a [`HealthReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceHealth {
    pub name: String,
    /// `mqtt`, `opcua`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub connected: bool,
    /// Seconds since the source's last value; `None` before the first one.
    #[serde(default)]
    pub last_value_age_s: Option<f64>,
    #[serde(default)]
    pub reconnects: u64,
}

/// Why a report cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("health.sources has {got} entries, the limit is {max}")]
    TooManySources { got: usize, max: usize },
    #[error("health.model_drift_features has {got} entries, the limit is {max}")]
    TooManyDriftFeatures { got: usize, max: usize },
    #[error("{0} is not a finite, non-negative number")]
    Number(String),
}

fn non_negative(field: String, v: Option<f64>) -> Result<(), HealthError> {
    match v {
        Some(x) if !x.is_finite() || x < 0.0 => Err(HealthError::Number(field)),
        _ => Ok(()),
    }
}

impl HealthReport {
    /// Checks the bounds stated in the module invariants.
    pub fn check(&self) -> Result<(), HealthError> {
        pg_text(
            "health.agent_version",
            &self.agent_version,
            MAX_HEALTH_TEXT_BYTES,
        )?;
        if let Some(m) = &self.running_model {
            pg_text("health.running_model", m, MAX_HEALTH_TEXT_BYTES)?;
        }
        non_negative(
            "health.oldest_unsynced_age_s".into(),
            self.oldest_unsynced_age_s,
        )?;
        if let Some(d) = self.model_drift
            && !d.is_finite()
        {
            return Err(HealthError::Number("health.model_drift".into()));
        }
        if self.model_drift_features.len() > MAX_DRIFT_FEATURES {
            return Err(HealthError::TooManyDriftFeatures {
                got: self.model_drift_features.len(),
                max: MAX_DRIFT_FEATURES,
            });
        }
        for (i, f) in self.model_drift_features.iter().enumerate() {
            pg_text(
                &format!("health.model_drift_features[{i}]"),
                f,
                MAX_HEALTH_TEXT_BYTES,
            )?;
        }
        if self.sources.len() > MAX_SOURCES {
            return Err(HealthError::TooManySources {
                got: self.sources.len(),
                max: MAX_SOURCES,
            });
        }
        for (i, s) in self.sources.iter().enumerate() {
            pg_text(
                &format!("health.sources[{i}].name"),
                &s.name,
                MAX_HEALTH_TEXT_BYTES,
            )?;
            pg_text(
                &format!("health.sources[{i}].kind"),
                &s.kind,
                MAX_HEALTH_TEXT_BYTES,
            )?;
            non_negative(
                format!("health.sources[{i}].last_value_age_s"),
                s.last_value_age_s,
            )?;
        }
        Ok(())
    }
}

/// The offset of the control plane's clock against the agent's, in milliseconds
/// (positive: the control plane is ahead), from one exchange: the agent sent at `sent`,
/// received the answer at `received` (both agent clock) and the answer was stamped
/// `server_time`. Assumes symmetric network delay (the error is at most half the round trip).
pub fn clock_offset_ms(
    sent: DateTime<Utc>,
    received: DateTime<Utc>,
    server_time: DateTime<Utc>,
) -> i64 {
    let mid = sent + (received - sent) / 2;
    (server_time - mid).num_milliseconds()
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    #[test]
    fn an_empty_report_and_a_full_one_pass_and_round_trip() {
        HealthReport::default().check().unwrap();
        let r = HealthReport {
            agent_version: "kip-agent 0.1.0".into(),
            sources: vec![SourceHealth {
                name: "line1".into(),
                kind: "mqtt".into(),
                connected: true,
                last_value_age_s: Some(0.5),
                reconnects: 2,
            }],
            oldest_unsynced_age_s: Some(3.0),
            ..Default::default()
        };
        r.check().unwrap();
        let back: HealthReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_and_missing_fields_decode() {
        let r: HealthReport =
            serde_json::from_str(r#"{"buffer_bytes": 7, "from_the_future": 1}"#).unwrap();
        assert_eq!(r.buffer_bytes, 7);
    }

    #[test]
    fn unstorable_reports_are_named() {
        let mut r = HealthReport {
            agent_version: "a\0b".into(),
            ..Default::default()
        };
        assert!(r.check().unwrap_err().to_string().contains("agent_version"));
        r.agent_version.clear();
        r.sources = vec![SourceHealth::default(); MAX_SOURCES + 1];
        assert!(matches!(r.check(), Err(HealthError::TooManySources { .. })));
        r.sources = vec![SourceHealth {
            last_value_age_s: Some(f64::NAN),
            ..Default::default()
        }];
        assert_eq!(
            r.check().unwrap_err().to_string(),
            "health.sources[0].last_value_age_s is not a finite, non-negative number"
        );
        r.sources.clear();
        r.model_drift_features = vec!["s11".into(); MAX_DRIFT_FEATURES];
        r.check().unwrap();
        r.model_drift_features.push("s12".into());
        assert!(matches!(
            r.check(),
            Err(HealthError::TooManyDriftFeatures { .. })
        ));
        r.model_drift_features = vec!["s\0".into()];
        assert!(
            r.check()
                .unwrap_err()
                .to_string()
                .contains("model_drift_features[0]")
        );
    }

    #[test]
    fn the_offset_is_taken_at_the_midpoint() {
        let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let t1 = t0 + TimeDelta::milliseconds(200);
        // Server 5 s ahead, stamped at the midpoint of its own clock.
        let server = t0 + TimeDelta::milliseconds(100) + TimeDelta::seconds(5);
        assert_eq!(clock_offset_ms(t0, t1, server), 5000);
        assert_eq!(
            clock_offset_ms(t0, t1, t0 + TimeDelta::milliseconds(100)),
            0
        );
    }
}
