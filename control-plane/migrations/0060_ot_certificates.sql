-- Certificates the fleet CA issued for OT devices (MQTT brokers, PLCs, OPC UA servers and
-- clients) through POST /v1/pki/ot-certificates: recorded for expiry reminders and rotation.
-- Platform-wide (like the CA itself), not per organisation.
CREATE TABLE ot_certificates (
    id UUID PRIMARY KEY,
    serial_hex TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL CHECK (profile IN ('tls-server', 'tls-client', 'opcua')),
    common_name TEXT NOT NULL,
    dns_names TEXT[] NOT NULL DEFAULT '{}',
    ip_addresses TEXT[] NOT NULL DEFAULT '{}',
    application_uri TEXT,
    not_before TIMESTAMPTZ NOT NULL,
    not_after TIMESTAMPTZ NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    certificate_pem TEXT NOT NULL,
    replaces_serial TEXT,
    replaced_at TIMESTAMPTZ
);

-- Expiry reminders: current (not replaced) certificates by expiry.
CREATE INDEX ot_certificates_current_expiry ON ot_certificates (not_after)
    WHERE replaced_at IS NULL;
