//! Live machine query: the control plane asks one agent for its current values over MQTT.
//!
//! Topics (`{prefix}` is configured on both sides, `kip/v1` by default):
//! - request, one per device: `{prefix}/{org_id}/{device}/live/req` (the agent subscribes);
//! - reply, one per control-plane instance and organisation:
//!   `{prefix}/{org_id}/_cp/{instance}/live/resp` (the control plane subscribes to
//!   `{prefix}/+/_cp/{instance}/live/resp`). `_cp` can never be a device name (a [`Name`]
//!   starts with a letter or digit), and both topics sit under `{prefix}/{org_id}/`, so a broker
//!   ACL can confine each organisation's agents to their own subtree.
//!
//! Invariants:
//! - Both messages carry `v` = [`LIVE_PROTOCOL_VERSION`]; another version is rejected by name.
//!   Unknown fields are ignored, so a field added later (always optional) does not break older
//!   peers.
//! - Decoding never panics on outside bytes: size first ([`MAX_REQUEST_BYTES`],
//!   [`MAX_RESPONSE_BYTES`]), then JSON, then the checks of [`LiveRequest::decode`] and
//!   [`LiveResponse::decode`], each failure a [`LiveError`] naming the problem.
//! - [`LiveResponse::encode`] always produces a message that [`LiveResponse::decode`] accepts:
//!   it drops values (setting `truncated`) until the size fits.
//!
//! [`Name`]: crate::Name

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Name, Quality};

/// Version of the live-query messages.
pub const LIVE_PROTOCOL_VERSION: u32 = 1;
/// Largest request accepted by an agent.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Largest response accepted by the control plane.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Most values in one response.
pub const MAX_VALUES: usize = 2_000;
/// Most predictions in one response.
pub const MAX_PREDICTIONS: usize = 500;
/// Most machine or metric names in a request's filters.
pub const MAX_FILTERS: usize = 64;
/// Longest topic prefix or reply topic.
pub const MAX_TOPIC_BYTES: usize = 256;
/// The topic level that separates control-plane reply topics from device topics.
pub const CP_LEVEL: &str = "_cp";

/// Why a live-query message or topic was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    #[error("message of {bytes} bytes exceeds the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a valid message: {0}")]
    Json(String),
    #[error("unsupported live-query version {0} (this build speaks {LIVE_PROTOCOL_VERSION})")]
    Version(u32),
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> LiveError {
    LiveError::Invalid(msg.into())
}

/// Checks a topic prefix: 1..=[`MAX_TOPIC_BYTES`] bytes, no wildcards, no empty level, no
/// leading `$` (reserved for broker topics).
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    check_topic(prefix)
}

fn check_topic(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > MAX_TOPIC_BYTES {
        return Err(format!("must be 1 to {MAX_TOPIC_BYTES} bytes"));
    }
    if t.contains(['+', '#', '\0']) {
        return Err(format!("{t:?} must not contain '+', '#' or NUL"));
    }
    if t.starts_with('$') {
        return Err(format!("{t:?} must not start with '$'"));
    }
    if t.split('/').any(str::is_empty) {
        return Err(format!("{t:?} must not have empty levels"));
    }
    Ok(())
}

/// Checks a control-plane instance name (a topic level): a valid [`Name`].
pub fn check_instance(instance: &str) -> Result<(), String> {
    Name::parse(instance)
        .map(|_| ())
        .map_err(|e| format!("{instance:?} {e}"))
}

/// `{prefix}/{org_id}/{device}/live/req`.
pub fn request_topic(prefix: &str, org_id: Uuid, device: &str) -> String {
    format!("{prefix}/{org_id}/{device}/live/req")
}

/// `{prefix}/{org_id}/_cp/{instance}/live/resp`.
pub fn reply_topic(prefix: &str, org_id: Uuid, instance: &str) -> String {
    format!("{prefix}/{org_id}/{CP_LEVEL}/{instance}/live/resp")
}

/// The filter a control-plane instance subscribes to: every organisation's reply topic.
pub fn reply_filter(prefix: &str, instance: &str) -> String {
    format!("{prefix}/+/{CP_LEVEL}/{instance}/live/resp")
}

/// The organisation level of a reply topic received on [`reply_filter`]; `None` when the
/// topic does not have that shape.
pub fn reply_topic_org(prefix: &str, topic: &str) -> Option<Uuid> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (org, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix(CP_LEVEL)?.strip_prefix('/')?;
    let (_instance, tail) = rest.split_once('/')?;
    (tail == "live/resp").then(|| org.parse().ok()).flatten()
}

/// A request for the current values of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveRequest {
    /// [`LIVE_PROTOCOL_VERSION`].
    pub v: u32,
    /// Chosen by the control plane; echoed in the response.
    pub request_id: Uuid,
    /// The organisation and device asked; an agent answers only requests for itself.
    pub org_id: Uuid,
    pub device: String,
    /// Where to publish the answer; must lie under `{prefix}/{org_id}/`.
    pub reply_to: String,
    pub sent_at: DateTime<Utc>,
    /// Only these machines (all when empty).
    #[serde(default)]
    pub machines: Vec<String>,
    /// Only these metrics (all when empty).
    #[serde(default)]
    pub metrics: Vec<String>,
}

/// The current value of one metric of one machine on the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveValue {
    /// The configured source (OPC UA endpoint or MQTT broker) that produced it.
    pub source: String,
    pub machine: String,
    pub metric: String,
    pub value: f64,
    /// Source timestamp of the value.
    pub ts: DateTime<Utc>,
    #[serde(default)]
    pub quality: Quality,
}

/// The latest prediction for one machine on the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivePrediction {
    pub machine: String,
    pub model_version: String,
    pub ts: DateTime<Utc>,
    pub rul_cycles: f64,
    #[serde(default)]
    pub anomaly_score: Option<f64>,
}

/// An agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveResponse {
    /// [`LIVE_PROTOCOL_VERSION`].
    pub v: u32,
    pub request_id: Uuid,
    pub org_id: Uuid,
    pub device: String,
    /// The agent's clock when it answered (compare with the control plane's to spot skew).
    pub agent_time: DateTime<Utc>,
    #[serde(default)]
    pub values: Vec<LiveValue>,
    #[serde(default)]
    pub predictions: Vec<LivePrediction>,
    /// Some values were left out to respect [`MAX_VALUES`] / [`MAX_RESPONSE_BYTES`].
    #[serde(default)]
    pub truncated: bool,
}

fn check_size(bytes: &[u8], max: usize) -> Result<(), LiveError> {
    if bytes.len() > max {
        return Err(LiveError::TooLarge {
            bytes: bytes.len(),
            max,
        });
    }
    Ok(())
}

fn check_version(v: u32) -> Result<(), LiveError> {
    if v == LIVE_PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(LiveError::Version(v))
    }
}

impl LiveRequest {
    /// Encodes to JSON.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, numbers and timestamps always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and checks a request received from the broker.
    pub fn decode(bytes: &[u8]) -> Result<Self, LiveError> {
        check_size(bytes, MAX_REQUEST_BYTES)?;
        let r: Self = serde_json::from_slice(bytes).map_err(|e| LiveError::Json(e.to_string()))?;
        check_version(r.v)?;
        Name::parse(&r.device).map_err(|e| invalid(format!("device {:?} {e}", r.device)))?;
        check_topic(&r.reply_to).map_err(|e| invalid(format!("reply_to: {e}")))?;
        if r.machines.len() > MAX_FILTERS || r.metrics.len() > MAX_FILTERS {
            return Err(invalid(format!(
                "at most {MAX_FILTERS} machines and {MAX_FILTERS} metrics may be named"
            )));
        }
        Ok(r)
    }

    /// Whether the reply topic lies under `{prefix}/{org_id}/` of this request's organisation,
    /// so an agent never publishes into another organisation's subtree.
    pub fn reply_within_org(&self, prefix: &str) -> bool {
        let own = format!("{prefix}/{}/", self.org_id);
        self.reply_to.starts_with(&own)
    }

    /// Whether a value passes the request's filters.
    pub fn wants(&self, machine: &str, metric: &str) -> bool {
        (self.machines.is_empty() || self.machines.iter().any(|m| m == machine))
            && (self.metrics.is_empty() || self.metrics.iter().any(|m| m == metric))
    }
}

impl LiveResponse {
    /// Encodes to JSON no larger than [`MAX_RESPONSE_BYTES`]: values beyond [`MAX_VALUES`]
    /// (and predictions beyond [`MAX_PREDICTIONS`]) are dropped first, then values are halved
    /// until the message fits; `truncated` tells the reader.
    pub fn encode(mut self) -> Vec<u8> {
        if self.values.len() > MAX_VALUES {
            self.values.truncate(MAX_VALUES);
            self.truncated = true;
        }
        if self.predictions.len() > MAX_PREDICTIONS {
            self.predictions.truncate(MAX_PREDICTIONS);
            self.truncated = true;
        }
        // Non-finite numbers have no JSON form: leave them out rather than send `null`.
        let before = self.values.len();
        self.values.retain(|v| v.value.is_finite());
        self.predictions
            .retain(|p| p.rul_cycles.is_finite() && p.anomaly_score.is_none_or(f64::is_finite));
        self.truncated |= self.values.len() != before;
        loop {
            let bytes = serde_json::to_vec(&self).unwrap_or_default();
            if bytes.len() <= MAX_RESPONSE_BYTES {
                return bytes;
            }
            self.truncated = true;
            if self.values.is_empty() {
                if self.predictions.is_empty() {
                    // Only names can be this large; they are bounded, so this is unreachable.
                    return bytes;
                }
                self.predictions.truncate(self.predictions.len() / 2);
            } else {
                self.values.truncate(self.values.len() / 2);
            }
        }
    }

    /// Decodes and checks a response received from the broker.
    pub fn decode(bytes: &[u8]) -> Result<Self, LiveError> {
        check_size(bytes, MAX_RESPONSE_BYTES)?;
        let r: Self = serde_json::from_slice(bytes).map_err(|e| LiveError::Json(e.to_string()))?;
        check_version(r.v)?;
        Name::parse(&r.device).map_err(|e| invalid(format!("device {:?} {e}", r.device)))?;
        if r.values.len() > MAX_VALUES {
            return Err(invalid(format!(
                "{} values, at most {MAX_VALUES} allowed",
                r.values.len()
            )));
        }
        if r.predictions.len() > MAX_PREDICTIONS {
            return Err(invalid(format!(
                "{} predictions, at most {MAX_PREDICTIONS} allowed",
                r.predictions.len()
            )));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LiveRequest {
        let org = Uuid::new_v4();
        LiveRequest {
            v: LIVE_PROTOCOL_VERSION,
            request_id: Uuid::new_v4(),
            org_id: org,
            device: "gw-1".into(),
            reply_to: reply_topic("kip/v1", org, "cp-1"),
            sent_at: Utc::now(),
            machines: vec![],
            metrics: vec!["temp".into()],
        }
    }

    fn value(i: usize) -> LiveValue {
        LiveValue {
            source: "site".into(),
            machine: format!("machine-{i:040}"),
            metric: format!("metric-{i:040}"),
            value: i as f64,
            ts: Utc::now(),
            quality: Quality::Good,
        }
    }

    fn response(values: Vec<LiveValue>) -> LiveResponse {
        LiveResponse {
            v: LIVE_PROTOCOL_VERSION,
            request_id: Uuid::new_v4(),
            org_id: Uuid::new_v4(),
            device: "gw-1".into(),
            agent_time: Utc::now(),
            values,
            predictions: vec![],
            truncated: false,
        }
    }

    #[test]
    fn topics_have_the_documented_shape() {
        let org = Uuid::nil();
        assert_eq!(
            request_topic("kip/v1", org, "gw-1"),
            format!("kip/v1/{org}/gw-1/live/req")
        );
        let reply = reply_topic("kip/v1", org, "cp-a");
        assert_eq!(reply, format!("kip/v1/{org}/_cp/cp-a/live/resp"));
        assert_eq!(
            reply_filter("kip/v1", "cp-a"),
            "kip/v1/+/_cp/cp-a/live/resp"
        );
        assert_eq!(reply_topic_org("kip/v1", &reply), Some(org));
        assert_eq!(
            reply_topic_org("kip/v1", &format!("kip/v1/{org}/gw/live/req")),
            None
        );
        assert_eq!(
            reply_topic_org("kip/v1", "kip/v1/not-a-uuid/_cp/a/live/resp"),
            None
        );
    }

    #[test]
    fn prefixes_with_wildcards_or_empty_levels_are_refused() {
        assert!(check_prefix("kip/v1").is_ok());
        for bad in ["", "kip/+", "kip/#", "/kip", "kip/", "kip//v1", "$SYS"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert!(check_instance("cp-1").is_ok());
        assert!(check_instance("cp/1").is_err());
    }

    #[test]
    fn requests_round_trip_and_stay_within_their_organisation() {
        let r = request();
        let back = LiveRequest::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert!(back.reply_within_org("kip/v1"));
        assert!(back.wants("any", "temp") && !back.wants("any", "pressure"));
        let mut foreign = r.clone();
        foreign.reply_to = reply_topic("kip/v1", Uuid::new_v4(), "cp-1");
        assert!(!foreign.reply_within_org("kip/v1"));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let mut r = request();
        r.v = 2;
        let e = LiveRequest::decode(&r.encode()).unwrap_err();
        assert_eq!(e, LiveError::Version(2));
        let mut r = request();
        r.reply_to = "kip/#".into();
        let e = LiveRequest::decode(&r.encode()).unwrap_err().to_string();
        assert!(e.contains("reply_to"), "{e}");
        let e = LiveRequest::decode(&vec![b' '; MAX_REQUEST_BYTES + 1]).unwrap_err();
        assert!(matches!(e, LiveError::TooLarge { .. }), "{e}");
        let e = LiveRequest::decode(b"{nope").unwrap_err();
        assert!(matches!(e, LiveError::Json(_)), "{e}");
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let mut v = serde_json::to_value(request()).unwrap();
        v["added_later"] = serde_json::json!(true);
        assert!(LiveRequest::decode(v.to_string().as_bytes()).is_ok());
    }

    #[test]
    fn large_responses_are_truncated_to_fit_and_still_decode() {
        let r = response((0..5_000).map(value).collect());
        let bytes = r.encode();
        assert!(bytes.len() <= MAX_RESPONSE_BYTES, "{}", bytes.len());
        let back = LiveResponse::decode(&bytes).unwrap();
        assert!(back.truncated);
        assert!(!back.values.is_empty() && back.values.len() <= MAX_VALUES);
    }

    #[test]
    fn non_finite_values_are_left_out() {
        let mut v = value(1);
        v.value = f64::NAN;
        let back = LiveResponse::decode(&response(vec![v, value(2)]).encode()).unwrap();
        assert_eq!(back.values.len(), 1);
        assert!(back.truncated);
    }

    #[test]
    fn responses_with_too_many_values_are_refused() {
        let mut r = response(vec![]);
        r.values = (0..MAX_VALUES + 1)
            .map(|i| LiveValue {
                source: "s".into(),
                machine: "m".into(),
                metric: "t".into(),
                value: i as f64,
                ts: Utc::now(),
                quality: Quality::Good,
            })
            .collect();
        let bytes = serde_json::to_vec(&r).unwrap();
        let e = LiveResponse::decode(&bytes).unwrap_err().to_string();
        assert!(e.contains("values"), "{e}");
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders() {
        let samples: [&[u8]; 6] = [
            b"",
            b"null",
            b"[]",
            b"{\"v\":1}",
            b"\xff\xfe",
            b"{\"v\":1,\"request_id\":\"x\"}",
        ];
        for s in samples {
            assert!(LiveRequest::decode(s).is_err());
            assert!(LiveResponse::decode(s).is_err());
        }
    }

    mod hostile {
        use proptest::prelude::*;

        use super::*;
        use crate::test_support::{damage, hostile_text as text, proptest_config};

        fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
            prop_oneof![
                3 => (0i64..4_102_444_800).prop_filter_map("range", |s| DateTime::from_timestamp(s, 0)),
                1 => (-8_200_000_000_000i64..8_200_000_000_000)
                    .prop_filter_map("chrono range", |s| DateTime::from_timestamp(s, 0)),
            ]
        }

        fn live_value() -> impl Strategy<Value = LiveValue> {
            (text(), text(), text(), any::<f64>(), timestamp()).prop_map(
                |(source, machine, metric, value, ts)| LiveValue {
                    source,
                    machine,
                    metric,
                    value,
                    ts,
                    quality: Quality::Bad,
                },
            )
        }

        fn live_prediction() -> impl Strategy<Value = LivePrediction> {
            (
                text(),
                text(),
                timestamp(),
                any::<f64>(),
                proptest::option::of(any::<f64>()),
            )
                .prop_map(|(machine, model_version, ts, rul_cycles, anomaly_score)| {
                    LivePrediction {
                        machine,
                        model_version,
                        ts,
                        rul_cycles,
                        anomaly_score,
                    }
                })
        }

        fn any_response() -> impl Strategy<Value = LiveResponse> {
            (
                proptest::collection::vec(live_value(), 0..40),
                proptest::collection::vec(live_prediction(), 0..10),
                timestamp(),
            )
                .prop_map(|(values, predictions, agent_time)| LiveResponse {
                    v: LIVE_PROTOCOL_VERSION,
                    request_id: Uuid::nil(),
                    org_id: Uuid::nil(),
                    device: "gw-1".into(),
                    agent_time,
                    values,
                    predictions,
                    truncated: false,
                })
        }

        fn any_request() -> impl Strategy<Value = LiveRequest> {
            (
                proptest::collection::vec(text(), 0..4),
                proptest::collection::vec(text(), 0..70),
                timestamp(),
            )
                .prop_map(|(machines, metrics, sent_at)| {
                    let mut r = request();
                    r.machines = machines;
                    r.metrics = metrics;
                    r.sent_at = sent_at;
                    r
                })
        }

        /// What a decoded request guarantees its reader.
        fn assert_request_invariants(r: &LiveRequest) {
            assert_eq!(r.v, LIVE_PROTOCOL_VERSION);
            Name::parse(&r.device).unwrap();
            check_topic(&r.reply_to).unwrap();
            assert!(r.machines.len() <= MAX_FILTERS && r.metrics.len() <= MAX_FILTERS);
            LiveRequest::decode(&r.encode()).unwrap();
        }

        fn assert_response_invariants(r: &LiveResponse) {
            assert_eq!(r.v, LIVE_PROTOCOL_VERSION);
            Name::parse(&r.device).unwrap();
            assert!(r.values.len() <= MAX_VALUES && r.predictions.len() <= MAX_PREDICTIONS);
        }

        proptest! {
            #![proptest_config(proptest_config(2000))]

            #[test]
            fn arbitrary_bytes_never_panic_the_decoders(
                bytes in proptest::collection::vec(any::<u8>(), 0..1024),
            ) {
                match LiveRequest::decode(&bytes) {
                    Ok(r) => assert_request_invariants(&r),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
                match LiveResponse::decode(&bytes) {
                    Ok(r) => assert_response_invariants(&r),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            #[test]
            fn damaged_requests_decode_to_valid_requests_or_fail_by_name(
                r in any_request(),
                d in damage(),
            ) {
                let bytes = d.apply(r.encode(), "\"gw-1\"", "\"v\":1");
                match LiveRequest::decode(&bytes) {
                    Ok(r) => assert_request_invariants(&r),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            #[test]
            fn damaged_responses_decode_to_valid_responses_or_fail_by_name(
                r in any_response(),
                d in damage(),
            ) {
                let json = serde_json::to_vec(&r).unwrap_or_default();
                let bytes = d.apply(json, "\"gw-1\"", "\"v\":1");
                match LiveResponse::decode(&bytes) {
                    Ok(r) => assert_response_invariants(&r),
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }

            /// The module invariant: whatever an agent has to report, what it sends is
            /// accepted by the control plane.
            #[test]
            fn every_encoded_response_fits_and_decodes(r in any_response()) {
                let bytes = r.encode();
                prop_assert!(bytes.len() <= MAX_RESPONSE_BYTES);
                let back = LiveResponse::decode(&bytes);
                prop_assert!(back.is_ok(), "{:?}", back);
            }
        }
    }
}
