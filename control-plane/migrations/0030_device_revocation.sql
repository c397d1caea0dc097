-- kip control plane: device-level revocation and certificate retirement (issue #13, hole 1).

-- A revoked device: every certificate it ever had is refused, expired ones included, and no
-- new certificate is issued to it by renewal or key possession (`/renew-expired`). Only an
-- enrollment token created after revoked_at re-admits the device (the row is then deleted).
-- No foreign key to devices: the revocation must outlive a deleted device row, like its
-- certificates do.
CREATE TABLE device_revocations (
    org_id     uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    device_id  uuid NOT NULL,
    revoked_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, device_id)
);

-- When a certificate was superseded by a newer one of the same device (renewal,
-- re-enrollment, recovery), it stops working at retire_at: the direct predecessor after
-- pki.renewal_overlap_s, every older one at once. NULL: the device's current certificate.
ALTER TABLE certificates ADD COLUMN retire_at timestamptz;

-- Renewal rate limit: certificates issued to a device within a window.
CREATE INDEX certificates_device_issued ON certificates (org_id, device_id, issued_at);
