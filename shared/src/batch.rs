//! Decoding of a sync batch body as the control plane receives it (`POST /v1/agent/sync`):
//! bounded gunzip, JSON, the structural checks of [`SyncBatch::check`], then per-record checks
//! of everything that is stored.
//!
//! Invariants (property-tested in this module with arbitrary and structure-aware input):
//! - Never panics, whatever the bytes.
//! - Memory is bounded by the limit, not by the input: the body is inflated through a reader
//!   that stops one byte past [`DecodeLimits::max_decoded_bytes`], so a gzip bomb costs at most
//!   the limit before it is refused as [`DecodeError::TooLarge`].
//! - A batch that decodes is storable: every string that reaches PostgreSQL (as `text` or
//!   inside `jsonb`) is free of NUL and within its byte bound, every number stored is finite,
//!   every timestamp lies in years 1 to 9999. PostgreSQL refuses NUL in text, `\u0000` in
//!   jsonb and years before 4713 BC; before these checks such a batch failed inside the
//!   transaction (a 500 the agent retried forever) instead of being refused as a bad request.
//! - Every failure is a [`DecodeError`] whose message names the problem (and the record index
//!   and field for a bad record), with a stable [`DecodeError::reason`] for metrics.

use std::io::Read as _;

use chrono::{DateTime, Datelike as _, Utc};

use crate::{
    Record,
    record::Sequenced,
    sync::{BatchError, SyncBatch},
    validate::{TextError, pg_text},
};

/// Longest machine name stored.
pub const MAX_MACHINE_BYTES: usize = 128;
/// Longest metric name stored.
pub const MAX_METRIC_BYTES: usize = 256;
/// Longest source name, model version, agent version or running model stored.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest free text (a gap's or loss's reason, a dead letter's origin or reason).
pub const MAX_TEXT_BYTES: usize = 4096;

/// Limits applied to every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_records: usize,
    /// Limit on the JSON after decompression.
    pub max_decoded_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            max_decoded_bytes: 16 * 1024 * 1024,
        }
    }
}

/// `Content-Encoding` of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoding {
    Identity,
    Gzip,
}

/// Why a record cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} is not a finite number")]
    NotFinite(&'static str),
    #[error("{field} is outside the years 1 to 9999: {ts}")]
    Timestamp { field: &'static str, ts: String },
}

impl RecordError {
    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            Self::Text(t) => &t.field,
            Self::Empty(f) | Self::NotFinite(f) | Self::Timestamp { field: f, .. } => f,
        }
    }
}

/// Why a batch body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("batch body is not valid gzip: {0}")]
    Gzip(String),
    #[error("batch inflates to more than {0} bytes")]
    TooLarge(usize),
    #[error("batch is not valid JSON for protocol version {version}: {message}")]
    Json { version: u32, message: String },
    #[error("invalid batch: {0}")]
    Batch(#[from] BatchError),
    #[error("invalid batch: {0}")]
    Field(RecordError),
    #[error("record {index}: {error}")]
    Record { index: usize, error: RecordError },
    #[error("invalid health report: {0}")]
    Health(String),
}

impl DecodeError {
    /// Short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Gzip(_) => "gzip",
            Self::TooLarge(_) => "too_large",
            Self::Json { .. } => "json",
            Self::Batch(_) | Self::Field(_) => "batch",
            Self::Health(_) => "health",
            Self::Record { .. } => "record",
        }
    }
}

/// Inflates a gzip body, refusing it as soon as it passes `max_bytes`.
pub fn gunzip_bounded(body: &[u8], max_bytes: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(max_bytes as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Gzip(e.to_string()))?;
    if out.len() > max_bytes {
        return Err(DecodeError::TooLarge(max_bytes));
    }
    Ok(out)
}

/// Decodes and checks a sync batch body; see the module invariants.
pub fn decode_batch(
    body: &[u8],
    encoding: BodyEncoding,
    limits: DecodeLimits,
) -> Result<SyncBatch, DecodeError> {
    let inflated;
    let json = match encoding {
        BodyEncoding::Gzip => {
            inflated = gunzip_bounded(body, limits.max_decoded_bytes)?;
            &inflated[..]
        }
        BodyEncoding::Identity if body.len() > limits.max_decoded_bytes => {
            return Err(DecodeError::TooLarge(limits.max_decoded_bytes));
        }
        BodyEncoding::Identity => body,
    };
    let batch: SyncBatch = serde_json::from_slice(json).map_err(|e| DecodeError::Json {
        version: crate::PROTOCOL_VERSION,
        message: e.to_string(),
    })?;
    batch.check(limits.max_records)?;
    pg_text("agent_version", &batch.agent_version, MAX_NAME_BYTES)
        .map_err(|e| DecodeError::Field(e.into()))?;
    if let Some(m) = &batch.running_model {
        pg_text("running_model", m, MAX_NAME_BYTES).map_err(|e| DecodeError::Field(e.into()))?;
    }
    if let Some(h) = &batch.health {
        h.check().map_err(|e| DecodeError::Health(e.to_string()))?;
    }
    for (index, r) in batch.records.iter().enumerate() {
        check_record(r).map_err(|error| DecodeError::Record { index, error })?;
    }
    Ok(batch)
}

fn finite(field: &'static str, v: f64) -> Result<(), RecordError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(RecordError::NotFinite(field))
    }
}

fn in_years(field: &'static str, ts: &DateTime<Utc>) -> Result<(), RecordError> {
    if (1..=9999).contains(&ts.year()) {
        Ok(())
    } else {
        Err(RecordError::Timestamp {
            field,
            ts: ts.to_rfc3339(),
        })
    }
}

/// Checks that a record can be stored (see the module invariants).
pub fn check_record(r: &Sequenced) -> Result<(), RecordError> {
    match &r.record {
        Record::Reading(x) => {
            pg_text("source", &x.source, MAX_NAME_BYTES)?;
            pg_text("machine", &x.machine, MAX_MACHINE_BYTES)?;
            pg_text("metric", &x.metric, MAX_METRIC_BYTES)?;
            if x.metric.is_empty() {
                return Err(RecordError::Empty("metric"));
            }
            finite("value", x.value)?;
            in_years("ts", &x.ts)?;
        }
        Record::Prediction(p) => {
            pg_text("machine", &p.machine, MAX_MACHINE_BYTES)?;
            pg_text("model_version", &p.model_version, MAX_NAME_BYTES)?;
            finite("rul_cycles", p.rul_cycles)?;
            if let Some(a) = p.anomaly_score {
                finite("anomaly_score", a)?;
            }
            if let Some(m) = &p.model {
                pg_text("model", m, MAX_NAME_BYTES)?;
            }
            in_years("ts", &p.ts)?;
        }
        Record::ModelStats(s) => {
            pg_text("model", &s.model, MAX_NAME_BYTES)?;
            if s.model.is_empty() {
                return Err(RecordError::Empty("model"));
            }
            pg_text("model_version", &s.model_version, MAX_NAME_BYTES)?;
            for (field, v) in [
                ("latency_p50_us", s.latency_p50_us),
                ("latency_p99_us", s.latency_p99_us),
                ("latency_max_us", s.latency_max_us),
            ] {
                if let Some(v) = v {
                    finite(field, v)?;
                }
            }
            if i64::try_from(s.predictions).is_err() || i64::try_from(s.failures).is_err() {
                return Err(RecordError::NotFinite("predictions"));
            }
            in_years("ts", &s.ts)?;
        }
        Record::ModelDrift(d) => {
            pg_text("model", &d.model, MAX_NAME_BYTES)?;
            if d.model.is_empty() {
                return Err(RecordError::Empty("model"));
            }
            pg_text("model_version", &d.model_version, MAX_NAME_BYTES)?;
            pg_text("feature", &d.feature, MAX_METRIC_BYTES)?;
            if d.feature.is_empty() {
                return Err(RecordError::Empty("feature"));
            }
            finite("psi", d.psi)?;
            finite("ks", d.ks)?;
            finite("psi_threshold", d.psi_threshold)?;
            finite("ks_threshold", d.ks_threshold)?;
            in_years("ts", &d.ts)?;
        }
        Record::Gap(g) => {
            pg_text("source", &g.source, MAX_NAME_BYTES)?;
            pg_text("reason", &g.reason, MAX_TEXT_BYTES)?;
            in_years("from", &g.from)?;
            in_years("to", &g.to)?;
        }
        Record::DeadLetter(d) => {
            pg_text("source", &d.source, MAX_NAME_BYTES)?;
            pg_text("origin", &d.origin, MAX_TEXT_BYTES)?;
            pg_text("reason", &d.reason, MAX_TEXT_BYTES)?;
            in_years("ts", &d.ts)?;
        }
        Record::Loss(l) => {
            pg_text("reason", &l.reason, MAX_TEXT_BYTES)?;
            in_years("ts", &l.ts)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        DeadLetter, Gap, Loss, ModelDrift, Prediction, Quality, Reading,
        test_support::{damage, hostile_text, proptest_config},
    };

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    fn ts() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn reading(machine: &str, metric: &str) -> Record {
        Record::Reading(Reading {
            source: "plc".into(),
            machine: machine.into(),
            metric: metric.into(),
            ts: ts(),
            value: 1.5,
            quality: Quality::Good,
        })
    }

    fn batch(records: Vec<Record>) -> SyncBatch {
        let n = records.len() as u64;
        SyncBatch {
            protocol_version: crate::PROTOCOL_VERSION,
            agent_version: "kip-agent 0.1.0".into(),
            epoch: 1,
            first_seq: 1,
            last_seq: n.max(1),
            records: records
                .into_iter()
                .zip(1..)
                .map(|(record, seq)| Sequenced {
                    epoch: 1,
                    seq,
                    record,
                })
                .collect(),
            running_model: None,
            health: None,
        }
    }

    fn limits() -> DecodeLimits {
        DecodeLimits {
            max_records: 100,
            max_decoded_bytes: 64 * 1024,
        }
    }

    #[test]
    fn a_valid_batch_decodes_plain_and_gzipped() {
        let b = batch(vec![reading("m1", "temp")]);
        let json = serde_json::to_vec(&b).unwrap();
        assert_eq!(
            decode_batch(&json, BodyEncoding::Identity, limits()).unwrap(),
            b
        );
        assert_eq!(
            decode_batch(&gzip(&json), BodyEncoding::Gzip, limits()).unwrap(),
            b
        );
    }

    /// Regression: NUL in any stored string used to reach PostgreSQL (500 `internal`, the
    /// agent retrying the batch forever); `\u0000` inside a jsonb event likewise.
    #[test]
    fn nul_bytes_in_any_stored_string_are_refused_naming_the_field() {
        let nul_records: Vec<(Record, &str)> = vec![
            (reading("m\0", "temp"), "machine"),
            (reading("m", "te\0mp"), "metric"),
            (
                Record::Gap(Gap {
                    source: "s".into(),
                    from: ts(),
                    to: ts(),
                    reason: "re\0connect".into(),
                }),
                "reason",
            ),
            (
                Record::DeadLetter(DeadLetter {
                    source: "s".into(),
                    origin: "topic/\0".into(),
                    reason: "r".into(),
                    payload_prefix: vec![0, 1, 2],
                    ts: ts(),
                }),
                "origin",
            ),
            (
                Record::Loss(Loss {
                    records: 1,
                    first_seq: 1,
                    last_seq: 1,
                    reason: "\0".into(),
                    ts: ts(),
                }),
                "reason",
            ),
            (
                Record::Prediction(Prediction {
                    machine: "m".into(),
                    model_version: "v\0".into(),
                    ts: ts(),
                    rul_cycles: 3.0,
                    anomaly_score: None,
                    model: None,
                    role: None,
                }),
                "model_version",
            ),
            (
                Record::ModelDrift(ModelDrift {
                    model: "rul".into(),
                    model_version: "1".into(),
                    feature: "s\0".into(),
                    ts: ts(),
                    psi: 0.1,
                    ks: 0.1,
                    psi_threshold: 0.2,
                    ks_threshold: 0.2,
                    alarm: false,
                    window: 200,
                    effective_window: 10,
                }),
                "feature",
            ),
        ];
        for (record, field) in nul_records {
            let json = serde_json::to_vec(&batch(vec![reading("ok", "ok"), record])).unwrap();
            let err = decode_batch(&json, BodyEncoding::Identity, limits()).unwrap_err();
            let DecodeError::Record { index, error } = &err else {
                panic!("{err}");
            };
            assert_eq!((*index, error.field()), (1, field), "{err}");
            assert!(err.to_string().contains("NUL"), "{err}");
        }
        let mut b = batch(vec![reading("m", "t")]);
        b.agent_version = "kip\0".into();
        let err = decode_batch(
            &serde_json::to_vec(&b).unwrap(),
            BodyEncoding::Identity,
            limits(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("agent_version"), "{err}");
        b.agent_version.clear();
        b.running_model = Some("x".repeat(MAX_NAME_BYTES + 1));
        let err = decode_batch(
            &serde_json::to_vec(&b).unwrap(),
            BodyEncoding::Identity,
            limits(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("running_model"), "{err}");
    }

    /// Regression: chrono reads years from -262143 to 262143; PostgreSQL's timestamptz
    /// refuses years before 4713 BC, so such a record used to fail inside the insert (500).
    /// Years beyond 9999 are refused too: no reading is dated there, and they need a sign.
    #[test]
    fn timestamps_outside_years_1_to_9999_are_refused() {
        let json = serde_json::to_string(&batch(vec![reading("m", "t")])).unwrap();
        for far in ["-005000-01-01T00:00:00Z", "+20000-01-01T00:00:00Z"] {
            let bad = json.replace("2023-11-14T22:13:20Z", far);
            assert_ne!(bad, json);
            let err = decode_batch(bad.as_bytes(), BodyEncoding::Identity, limits()).unwrap_err();
            assert!(
                matches!(
                    &err,
                    DecodeError::Record {
                        error: RecordError::Timestamp { .. },
                        ..
                    }
                ),
                "{far}: {err}"
            );
        }
    }

    #[test]
    fn gzip_bombs_stop_at_the_limit() {
        let bomb = gzip(&vec![b' '; 8 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert_eq!(
            decode_batch(&bomb, BodyEncoding::Gzip, limits()),
            Err(DecodeError::TooLarge(64 * 1024))
        );
        assert_eq!(
            decode_batch(&vec![b' '; 64 * 1024 + 1], BodyEncoding::Identity, limits()),
            Err(DecodeError::TooLarge(64 * 1024))
        );
        let err = decode_batch(b"not gzip", BodyEncoding::Gzip, limits()).unwrap_err();
        assert_eq!(err.reason(), "gzip");
    }

    fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
        prop_oneof![
            4 => (0i64..4_102_444_800).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap_or_default()),
            // Anywhere in chrono's range (about years -262000 to 262000).
            1 => (-8_200_000_000_000i64..8_200_000_000_000)
                .prop_filter_map("chrono range", |s| DateTime::from_timestamp(s, 0)),
        ]
    }

    fn number() -> impl Strategy<Value = f64> {
        prop_oneof![4 => -1e6f64..1e6, 1 => any::<f64>()]
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                hostile_text(),
                hostile_text(),
                hostile_text(),
                timestamp(),
                number()
            )
                .prop_map(|(source, machine, metric, ts, value)| Record::Reading(
                    Reading {
                        source,
                        machine,
                        metric,
                        ts,
                        value,
                        quality: Quality::Uncertain,
                    }
                )),
            (hostile_text(), timestamp(), timestamp(), hostile_text()).prop_map(
                |(source, from, to, reason)| Record::Gap(Gap {
                    source,
                    from,
                    to,
                    reason
                })
            ),
            (
                hostile_text(),
                hostile_text(),
                hostile_text(),
                proptest::collection::vec(any::<u8>(), 0..300),
                timestamp()
            )
                .prop_map(|(source, origin, reason, payload_prefix, ts)| {
                    Record::DeadLetter(DeadLetter {
                        source,
                        origin,
                        reason,
                        payload_prefix,
                        ts,
                    })
                }),
            (any::<u64>(), hostile_text(), timestamp()).prop_map(|(n, reason, ts)| {
                Record::Loss(Loss {
                    records: n,
                    first_seq: n / 2,
                    last_seq: n,
                    reason,
                    ts,
                })
            }),
            (
                hostile_text(),
                hostile_text(),
                number(),
                proptest::option::of(number()),
                timestamp()
            )
                .prop_map(|(machine, model_version, rul_cycles, anomaly_score, ts)| {
                    Record::Prediction(Prediction {
                        machine,
                        model_version,
                        ts,
                        rul_cycles,
                        anomaly_score,
                        model: None,
                        role: None,
                    })
                }),
            (
                (hostile_text(), hostile_text(), hostile_text()),
                (number(), number(), any::<bool>()),
                timestamp()
            )
                .prop_map(|((model, model_version, feature), (psi, ks, alarm), ts)| {
                    Record::ModelDrift(ModelDrift {
                        model,
                        model_version,
                        feature,
                        ts,
                        psi,
                        ks,
                        psi_threshold: 0.28,
                        ks_threshold: 0.195,
                        alarm,
                        window: 200,
                        effective_window: 15,
                    })
                }),
        ]
    }

    /// A batch as JSON, then damaged in one of the ways a hostile or broken peer would.
    fn hostile_json() -> impl Strategy<Value = Vec<u8>> {
        let valid = proptest::collection::vec(record(), 0..6).prop_map(batch);
        (valid, damage()).prop_map(|(b, d)| {
            d.apply(
                serde_json::to_vec(&b).unwrap_or_default(),
                "\"plc\"",
                "\"epoch\":1",
            )
        })
    }

    /// What every successfully decoded batch must satisfy.
    fn assert_storable(b: &SyncBatch, limits: DecodeLimits) {
        b.check(limits.max_records).unwrap();
        for r in &b.records {
            check_record(r).unwrap();
        }
        // Independent of check_record: PostgreSQL refuses `\u0000` in jsonb (and NUL in text);
        // chrono writes years beyond 9999 with a sign, which timestamptz refuses.
        let text = serde_json::to_string(b).unwrap();
        assert!(!text.contains("\\u0000"), "{text}");
        for r in &b.records {
            let ts = r.record.ts().to_rfc3339();
            assert!(!ts.starts_with(['+', '-']), "{ts}");
        }
        // What was accepted encodes again and is accepted again (the agent's own path).
        let again = serde_json::to_vec(b).unwrap();
        decode_batch(&again, BodyEncoding::Identity, limits).unwrap();
    }

    proptest! {
        #![proptest_config(proptest_config(2000))]

        #[test]
        fn arbitrary_bytes_never_panic_and_fail_with_a_message(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            gz in any::<bool>(),
        ) {
            let enc = if gz { BodyEncoding::Gzip } else { BodyEncoding::Identity };
            match decode_batch(&bytes, enc, limits()) {
                Ok(b) => assert_storable(&b, limits()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            // The same bytes, validly gzipped, decode exactly as the plain bytes do.
            let plain = decode_batch(&bytes, BodyEncoding::Identity, limits());
            prop_assert_eq!(decode_batch(&gzip(&bytes), BodyEncoding::Gzip, limits()), plain);
        }

        #[test]
        fn hostile_batches_are_storable_or_refused_with_a_reason(json in hostile_json()) {
            for body in [json.clone(), gzip(&json)] {
                let enc = if body == json { BodyEncoding::Identity } else { BodyEncoding::Gzip };
                match decode_batch(&body, enc, limits()) {
                    Ok(b) => assert_storable(&b, limits()),
                    Err(e) => {
                        prop_assert!(!e.to_string().is_empty());
                        prop_assert!(!e.reason().is_empty());
                    }
                }
            }
        }

        #[test]
        fn damaged_gzip_never_panics_nor_exceeds_the_limit(
            json in hostile_json(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut gz = gzip(&json);
            for (pos, byte) in flips {
                let n = gz.len();
                gz[pos % n] ^= byte | 1;
            }
            gz.truncate(gz.len() - cut % 4);
            match gunzip_bounded(&gz, 4096) {
                Ok(out) => prop_assert!(out.len() <= 4096),
                Err(e) => prop_assert!(matches!(e, DecodeError::Gzip(_) | DecodeError::TooLarge(_))),
            }
            let _ = decode_batch(&gz, BodyEncoding::Gzip, limits());
        }
    }
}
