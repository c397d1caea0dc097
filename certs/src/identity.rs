//! Device identities: the URI SAN scheme and parsing a peer certificate back into it.
//!
//! Invariant: a certificate names a device only if it carries exactly one `kip://` URI SAN and
//! that URI parses completely (two UUIDs, nothing else). Anything else is refused, so a
//! handler never acts on a half-understood identity.

use std::time::{Duration, SystemTime};

use uuid::Uuid;
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use crate::{CertError, DEVICE_URI_PREFIX};

/// Organisation and device named by a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceIdentity {
    pub org_id: Uuid,
    pub device_id: Uuid,
}

/// What the control plane needs to know about a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub identity: DeviceIdentity,
    /// Serial number, lowercase hex of its DER content bytes (as stored in `certificates`).
    pub serial_hex: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The URI SAN for a device: `kip://org/{org_id}/device/{device_id}`.
pub fn device_uri(org_id: Uuid, device_id: Uuid) -> String {
    format!("{DEVICE_URI_PREFIX}{org_id}/device/{device_id}")
}

/// Parses a URI made by [`device_uri`]; `None` for anything else.
pub fn parse_device_uri(uri: &str) -> Option<DeviceIdentity> {
    let rest = uri.strip_prefix(DEVICE_URI_PREFIX)?;
    let (org, device) = rest.split_once("/device/")?;
    // Only the canonical hyphenated form, so one identity has exactly one spelling.
    let org_id = Uuid::try_parse(org).ok().filter(|u| u.to_string() == org)?;
    let device_id = Uuid::try_parse(device)
        .ok()
        .filter(|u| u.to_string() == device)?;
    Some(DeviceIdentity { org_id, device_id })
}

/// Lowercase hex of bytes.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Bytes of a hex string (either case); `None` for an empty, odd-length or non-hex string.
pub(crate) fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .filter(|b| b.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect()
}

fn unix_to_system(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// Parses a DER device certificate (e.g. the first of the TLS peer certificates).
///
/// This does not verify the chain: call it only on certificates that the TLS verifier
/// already accepted.
pub fn parse_peer_cert(der: &[u8]) -> Result<PeerCert, CertError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| CertError::BadCert(format!("not an X.509 certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::BadCert(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| CertError::BadCert("no subjectAltName".into()))?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("kip://") => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (ids.next(), ids.next()) else {
        return Err(CertError::BadCert(
            "expected exactly one kip:// URI SAN".into(),
        ));
    };
    let identity = parse_device_uri(uri)
        .ok_or_else(|| CertError::BadCert(format!("malformed device URI {uri:?}")))?;
    let validity = cert.validity();
    Ok(PeerCert {
        identity,
        serial_hex: to_hex(cert.raw_serial()),
        not_before: unix_to_system(validity.not_before.timestamp()),
        not_after: unix_to_system(validity.not_after.timestamp()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_uri_round_trips() {
        let (o, d) = (Uuid::new_v4(), Uuid::new_v4());
        let uri = device_uri(o, d);
        assert!(uri.starts_with("kip://org/"));
        assert_eq!(
            parse_device_uri(&uri),
            Some(DeviceIdentity {
                org_id: o,
                device_id: d
            })
        );
    }

    #[test]
    fn malformed_device_uris_are_refused() {
        let o = Uuid::new_v4();
        let d = Uuid::new_v4();
        for bad in [
            String::new(),
            format!("kip://org/{o}"),
            format!("kip://org/{o}/device/"),
            format!("kip://org/{o}/device/{d}/x"),
            format!("kip://org/{}/device/{d}", o.simple()),
            format!("kip://org/{}/device/{d}", o.to_string().to_uppercase()),
            format!("https://org/{o}/device/{d}"),
        ] {
            assert_eq!(parse_device_uri(&bad), None, "{bad}");
        }
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(to_hex(&[0x01, 0xab, 0x00]), "01ab00");
    }
}
