//! Fleet PKI metrics (`kip_pki_*`). Families stay empty when PKI is not configured, so no
//! misleading zero appears.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    /// `intermediate` (the one that signs) or `root` (the root above it).
    pub ca: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    /// `current` or `previous` intermediate, or `other` (retired or unrecorded issuer).
    pub issuer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Fleet PKI (`kip_pki_*`).
#[derive(Debug, Clone, Default)]
pub struct PkiMetrics {
    pub ca_expiry_seconds: Family<CaLabels, Gauge>,
    pub devices_by_issuer: Family<IssuerLabels, Gauge>,
    pub ca_reloads: Family<ReloadLabels, Counter>,
    /// `POST /enroll` attempts refused by the per-address limit.
    pub enroll_rate_limited: Counter,
    /// Current OT certificates expiring within 30 days (`kipctl ot list`).
    pub ot_expiring: Gauge,
    /// Seconds until the first current OT certificate expires.
    pub ot_next_expiry_seconds: Gauge,
}

impl PkiMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pki_ca_expiry_seconds",
            "Seconds until the signing intermediate CA (ca=intermediate) or its root (ca=root) expires",
            m.ca_expiry_seconds.clone(),
        );
        registry.register(
            "pki_devices_by_issuer",
            "Devices by the intermediate (current, previous, other) that issued their newest unexpired, unrevoked certificate; recomputed every minute",
            m.devices_by_issuer.clone(),
        );
        registry.register(
            "pki_ca_reloads",
            "CA reloads after the CA files changed, by result (ok, error)",
            m.ca_reloads.clone(),
        );
        registry.register(
            "pki_enroll_rate_limited",
            "POST /enroll attempts refused by pki.enrollments_per_ip_per_minute before any database work",
            m.enroll_rate_limited.clone(),
        );
        registry.register(
            "pki_ot_certificates_expiring",
            "OT device certificates (kipctl ot issue) not yet replaced that expire within 30 days",
            m.ot_expiring.clone(),
        );
        registry.register(
            "pki_ot_certificate_next_expiry_seconds",
            "Seconds until the first OT device certificate not yet replaced expires",
            m.ot_next_expiry_seconds.clone(),
        );
        m
    }
}
