//! Fleet PKI for kip (CA, CSR signing, trust bundles, rustls configuration builders).
//!
//! This crate is being built under the PKI issue; until then it only fixes the URI SAN
//! scheme that names a device, which both programs must agree on.

/// Scheme of the URI SAN that names a device in its client certificate:
/// `kip://org/{org_id}/device/{device_id}`.
pub const DEVICE_URI_PREFIX: &str = "kip://org/";
