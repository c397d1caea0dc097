-- kip control plane: fleet PKI (enrollment tokens and issued device certificates).

-- One-time bootstrap tokens for device enrollment. Only sha256 of the token is stored; the
-- token is shown once at creation. A token is consumed (used_at set) in the same transaction
-- that issues the certificate, so it can never enroll twice. device_name, when set, binds the
-- token to that device name (and allows re-enrolling an existing device of that name).
CREATE TABLE bootstrap_tokens (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    token_sha256 bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    device_name  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    device_id    uuid,
    CONSTRAINT bootstrap_tokens_expiry CHECK (expires_at > created_at)
);
CREATE INDEX bootstrap_tokens_org ON bootstrap_tokens (org_id);

-- Every certificate issued to a device. serial is the lowercase hex of the DER serial number,
-- exactly as the TLS layer reports it. Revocation sets revoked_at; the CRLs list revoked
-- certificates that have not expired yet.
-- device_id deliberately has no foreign key: when a device is deleted its certificates must
-- stay on record, so they are listed as revoked until they expire (the CRL query treats a
-- certificate whose device is gone as revoked).
CREATE TABLE certificates (
    serial     text PRIMARY KEY CHECK (serial ~ '^[0-9a-f]{2,40}$'),
    org_id     uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    device_id  uuid NOT NULL,
    issued_at  timestamptz NOT NULL DEFAULT now(),
    not_after  timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX certificates_device ON certificates (org_id, device_id);
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE revoked_at IS NOT NULL;
