//! Wire types shared by the kip edge agent and the control plane.
//!
//! Invariants:
//! - No I/O lives here: only data types, their validation and their encoding.
//! - Every type that crosses the network is versioned through [`PROTOCOL_VERSION`];
//!   a field added later is optional so that older peers keep decoding newer messages.

pub mod backoff;
pub mod ids;
pub mod mqtt;

pub use ids::{Name, NameError};

/// Version of the agent <-> control-plane protocol spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
pub mod record;

pub use record::{
    DeadLetter, Gap, Loss, Prediction, Quality, Reading, Record, RecordKind, Sequenced,
};
pub mod features;
pub mod live;
pub mod sync;
pub mod validate;
