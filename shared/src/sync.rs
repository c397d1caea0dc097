//! The agent -> control-plane sync protocol (version [`crate::PROTOCOL_VERSION`]).
//!
//! Exchange: the agent POSTs a [`SyncBatch`] (JSON, gzip `Content-Encoding`) holding records of
//! one epoch in strictly increasing sequence order; the control plane stores them idempotently
//! in one transaction and answers a [`SyncAck`] with the acknowledged high-water mark; only then
//! may the agent delete records up to that mark.
//!
//! Invariants:
//! - A batch is self-checking: `first_seq`/`last_seq` bound its records, which are strictly
//!   increasing; [`SyncBatch::check`] enforces it on both sides.
//! - The ack is monotonic per (device, epoch): replaying an old batch never moves it back.
//! - New optional fields may be added with `#[serde(default)]`; a peer with a higher
//!   `protocol_version` than the receiver supports is refused with a message naming both.

use serde::{Deserialize, Serialize};

use crate::record::Sequenced;

/// Request header of `POST /v1/agent/sync` in which an agent reports the sha256 of the trust
/// bundle it uses (see [`DesiredState::trust_bundle_sha256`]).
pub const TRUST_BUNDLE_HEADER: &str = "kip-trust-bundle-sha256";

/// Machine-readable `error.code` values of a refused `POST /v1/agent/sync`.
///
/// Invariant: an agent decides what to do with a refusal by this code alone, never by the
/// message text (which is for humans and may change). Only a code in [`RECORD_CODES`] may
/// make an agent split a batch and dead-letter one record; every other code (and a missing
/// or unknown one) is systemic: the agent keeps every record and backs off.
pub mod error_code {
    /// The batch's `protocol_version` is outside what the control plane accepts (400).
    pub const PROTOCOL_VERSION_UNSUPPORTED: &str = "protocol_version_unsupported";
    /// One record cannot be stored (a field breaks a rule); the message names its index (422).
    pub const RECORD_INVALID: &str = "record_invalid";
    /// The JSON does not decode into a batch; a single record of an unknown shape can cause
    /// it, so splitting can isolate it (400).
    pub const BATCH_UNDECODABLE: &str = "batch_undecodable";
    /// The batch breaks a structural rule (sequence order, epoch, range): a bug of the
    /// sender, not of a record (422).
    pub const BATCH_INVALID: &str = "batch_invalid";
    /// More records than the control plane takes in one batch: send smaller batches (422).
    pub const BATCH_TOO_MANY_RECORDS: &str = "batch_too_many_records";
    /// The body is not valid gzip, or its `Content-Encoding` is unsupported (400).
    pub const BODY_UNDECODABLE: &str = "body_undecodable";
    /// The body (or its inflated JSON) is larger than the control plane takes (413).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";

    /// The control-plane replica is saturated and refused the request before reading it
    /// (503, with `Retry-After` and the body's `error.reason`): nothing was stored; resend the
    /// same batch after `Retry-After` (issue #17, load shedding).
    pub const OVERLOADED: &str = "overloaded";

    /// The device already has its maximum of syncs in flight on this replica
    /// (`ingest.max_in_flight_syncs_per_device`; 429 with `Retry-After`, refused before the
    /// body was read): nothing was stored; send fewer batches at once. A control plane from
    /// before issue #17's pipelining admits one sync per device and answers `rate_limited`.
    pub const SYNC_IN_FLIGHT: &str = "sync_in_flight";
    /// Concurrent syncs of one device met in PostgreSQL (deadlock or serialization failure,
    /// SQLSTATE 40P01/40001; 503 with `Retry-After`): the transaction was rolled back,
    /// nothing was stored; resend the same batch.
    pub const SYNC_CONFLICT: &str = "sync_conflict";

    /// The codes that blame one record: split the batch, dead-letter a record refused alone.
    pub const RECORD_CODES: &[&str] = &[RECORD_INVALID, BATCH_UNDECODABLE];

    /// Whether a refusal with `code` may be caused by one record of the batch.
    pub fn blames_a_record(code: Option<&str>) -> bool {
        code.is_some_and(|c| RECORD_CODES.contains(&c))
    }
}

/// Oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Records sent by an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncBatch {
    pub protocol_version: u32,
    /// Agent build, for fleet status (`kip-agent 0.1.0`).
    #[serde(default)]
    pub agent_version: String,
    pub epoch: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: Vec<Sequenced>,
    /// Model the agent is running, if any (`name@version`), for rollout status.
    #[serde(default)]
    pub running_model: Option<String>,
    /// The agent's health ([`crate::health`]). Agents send it only to a control plane whose
    /// acks carry `server_time` (one that knows the field: this struct refuses unknown
    /// fields). A batch with a report and no records is a heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::HealthReport>,
}

/// What the control plane wants the agent to run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Opaque config version; the agent reports what it applied.
    #[serde(default)]
    pub config_version: Option<String>,
    /// Model the agent should run.
    #[serde(default)]
    pub model: Option<DesiredModel>,
    /// A model to run beside `model` on the same features (a shadow or canary rollout,
    /// `docs/ml.md`): its predictions sync tagged `role = shadow` and never replace the
    /// champion's. Absent: the agent drops any shadow it runs. Older agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_model: Option<DesiredModel>,
    /// The agent should renew its certificate now (e.g. CA rollover or revocation of a sibling).
    /// Set while the agent's certificate comes from an intermediate that no longer signs;
    /// agents renew after a random delay so a fleet does not renew at once.
    #[serde(default)]
    pub renew_certificate: bool,
    /// With `renew_certificate`: serial (lowercase hex) of the certificate the request came
    /// with, so an agent that renewed meanwhile ignores a hint meant for its old certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_serial: Option<String>,
    /// sha256 (lowercase hex, over the DER certificates in order) of the trust bundle the
    /// agent should use for the agent listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_sha256: Option<String>,
    /// The trust bundle (PEM), sent only when the agent reported another fingerprint in the
    /// `kip-trust-bundle-sha256` request header (CA rollover: old and new roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle_pem: Option<String>,
    /// The public keys (concatenated `PUBLIC KEY` PEM blocks) that sign models; during a
    /// signing-key rotation the new and the previous key. Agents verify
    /// [`DesiredModel::signature`] against these before loading a model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_signing_keys_pem: Option<String>,
    /// With `config_version`: the remote configuration document (TOML holding only the
    /// remotely settable sections, see `kip_agent_config::remote`). Sent only while the
    /// agent reports another applied version in [`CONFIG_VERSION_HEADER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_toml: Option<String>,
    /// The agent release this device should run (self-update, see `docs/operations.md`
    /// "Agent self-update"); absent when no rollout selects the device. Older agents ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_release: Option<DesiredRelease>,
}

/// An agent release (the tarball of `scripts/package-agent.sh`) to install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredRelease {
    pub version: String,
    pub sha256: String,
    /// Path on the agent listener to download the tarball from.
    pub download_path: String,
    /// The control plane's signature over the organisation, [`RELEASE_SIGNING_NAME`], the
    /// version and the sha256, made with the model signing key (`kip_certs::signing`);
    /// `None` for an unsigned release, which agents refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// The `name` an agent release is signed under. It contains a `:`, which no model name may
/// (`kip_shared::Name`), so a model signature can never pass as a release signature.
pub const RELEASE_SIGNING_NAME: &str = "agent-release:kip-agent";

/// Request header of `POST /v1/agent/sync`: the agent's self-update state,
/// `<state> <version>[ <reason>]` with state one of `downloading`, `trial`, `confirmed`,
/// `refused`, `rolled_back` (printable ASCII, at most [`MODEL_ERROR_MAX_BYTES`]).
pub const UPDATE_STATUS_HEADER: &str = "kip-update-status";

/// Request header of `POST /v1/agent/sync`: the remote configuration version the agent runs
/// (absent: none, only its local file).
pub const CONFIG_VERSION_HEADER: &str = "kip-config-version";
/// Request header of `POST /v1/agent/sync`: `<version>: <reason>` of the last remote
/// configuration the agent refused or rolled back (printable ASCII, at most
/// [`MODEL_ERROR_MAX_BYTES`]).
pub const CONFIG_ERROR_HEADER: &str = "kip-config-error";

/// A model version to deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredModel {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// Path on the agent listener to download the artifact from.
    pub download_path: String,
    /// The control plane's signature (`ed25519:<key id>:<signature>`) over the organisation,
    /// name, version and sha256 (`kip_certs::signing`); `None` for an unsigned artifact,
    /// which agents refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// Request header of `POST /v1/agent/sync` in which an agent reports why it refused the
/// desired model (printable ASCII, at most [`MODEL_ERROR_MAX_BYTES`]); absent when the last
/// model install worked.
pub const MODEL_ERROR_HEADER: &str = "kip-model-error";
/// Longest [`MODEL_ERROR_HEADER`] value an agent sends.
pub const MODEL_ERROR_MAX_BYTES: usize = 512;

/// The control plane's answer to a [`SyncBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncAck {
    pub protocol_version: u32,
    pub epoch: u64,
    /// Every record of this epoch up to and including this sequence is stored.
    pub acked_seq: u64,
    /// Records of this batch newly stored.
    pub inserted: u64,
    /// Records of this batch that were already stored (a replay).
    pub duplicates: u64,
    #[serde(default)]
    pub desired: DesiredState,
    /// The control plane's clock when it answered, for the agent's clock-offset estimate;
    /// its presence also tells the agent that this control plane accepts health reports and
    /// heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// Why a batch is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("protocol_version {got} is not supported: this side speaks {min}..={max}")]
    Version { got: u32, min: u32, max: u32 },
    #[error("empty batch")]
    Empty,
    #[error("batch has {got} records, the limit is {max}")]
    TooMany { got: usize, max: usize },
    #[error("first_seq {first} is greater than last_seq {last}")]
    Range { first: u64, last: u64 },
    #[error("record {index} has epoch {got}, the batch is epoch {epoch}")]
    Epoch { index: usize, got: u64, epoch: u64 },
    #[error("record {index} has seq {seq} outside {first}..={last}")]
    OutOfRange {
        index: usize,
        seq: u64,
        first: u64,
        last: u64,
    },
    #[error("record {index} has seq {seq}, not greater than the previous {prev}")]
    Order { index: usize, seq: u64, prev: u64 },
    #[error("sequence numbers must be below 2^63, got {0}")]
    TooLarge(u64),
}

impl SyncBatch {
    /// Checks the structural rules of a batch (see the module invariants).
    pub fn check(&self, max_records: usize) -> Result<(), BatchError> {
        if !(MIN_PROTOCOL_VERSION..=crate::PROTOCOL_VERSION).contains(&self.protocol_version) {
            return Err(BatchError::Version {
                got: self.protocol_version,
                min: MIN_PROTOCOL_VERSION,
                max: crate::PROTOCOL_VERSION,
            });
        }
        if self.records.is_empty() {
            // A heartbeat: a health report and nothing to store.
            if self.health.is_some() && self.first_seq == self.last_seq {
                return Ok(());
            }
            return Err(BatchError::Empty);
        }
        if self.records.len() > max_records {
            return Err(BatchError::TooMany {
                got: self.records.len(),
                max: max_records,
            });
        }
        if self.first_seq > self.last_seq {
            return Err(BatchError::Range {
                first: self.first_seq,
                last: self.last_seq,
            });
        }
        for v in [self.epoch, self.last_seq] {
            if v > i64::MAX as u64 {
                return Err(BatchError::TooLarge(v));
            }
        }
        let mut prev: Option<u64> = None;
        for (index, r) in self.records.iter().enumerate() {
            if r.epoch != self.epoch {
                return Err(BatchError::Epoch {
                    index,
                    got: r.epoch,
                    epoch: self.epoch,
                });
            }
            if r.seq < self.first_seq || r.seq > self.last_seq {
                return Err(BatchError::OutOfRange {
                    index,
                    seq: r.seq,
                    first: self.first_seq,
                    last: self.last_seq,
                });
            }
            if let Some(p) = prev
                && r.seq <= p
            {
                return Err(BatchError::Order {
                    index,
                    seq: r.seq,
                    prev: p,
                });
            }
            prev = Some(r.seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::record::{Reading, Record};

    fn rec(epoch: u64, seq: u64) -> Sequenced {
        Sequenced {
            epoch,
            seq,
            record: Record::Reading(Reading {
                source: "s".into(),
                machine: "m".into(),
                metric: "t".into(),
                ts: Utc::now(),
                value: 1.0,
                quality: Default::default(),
            }),
        }
    }

    fn batch(records: Vec<Sequenced>, first: u64, last: u64) -> SyncBatch {
        SyncBatch {
            protocol_version: 1,
            agent_version: String::new(),
            epoch: 1,
            first_seq: first,
            last_seq: last,
            records,
            running_model: None,
            health: None,
        }
    }

    #[test]
    fn a_well_formed_batch_passes() {
        batch(vec![rec(1, 3), rec(1, 5)], 3, 6).check(10).unwrap();
    }

    #[test]
    fn malformed_batches_are_named() {
        let mut b = batch(vec![rec(1, 3)], 3, 3);
        b.protocol_version = 99;
        assert_eq!(
            b.check(10).unwrap_err().to_string(),
            "protocol_version 99 is not supported: this side speaks 1..=1"
        );
        assert_eq!(batch(vec![], 1, 1).check(10), Err(BatchError::Empty));
        let mut heartbeat = batch(vec![], 4, 4);
        heartbeat.health = Some(Default::default());
        heartbeat.check(10).unwrap();
        heartbeat.last_seq = 5;
        assert_eq!(heartbeat.check(10), Err(BatchError::Empty));
        assert!(matches!(
            batch(vec![rec(1, 1), rec(1, 2)], 1, 2).check(1),
            Err(BatchError::TooMany { .. })
        ));
        assert!(matches!(
            batch(vec![rec(2, 1)], 1, 1).check(10),
            Err(BatchError::Epoch { .. })
        ));
        assert!(matches!(
            batch(vec![rec(1, 9)], 1, 5).check(10),
            Err(BatchError::OutOfRange { .. })
        ));
        assert!(matches!(
            batch(vec![rec(1, 2), rec(1, 2)], 1, 5).check(10),
            Err(BatchError::Order { .. })
        ));
        assert!(matches!(
            batch(vec![rec(1, 2)], 5, 1).check(10),
            Err(BatchError::Range { .. })
        ));
    }
}
