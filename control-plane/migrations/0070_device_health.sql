-- Latest health report per device (issue #16). One row per device, replaced by every sync
-- and heartbeat; the history lives in Prometheus, not here.
CREATE TABLE device_health (
    device_id   uuid PRIMARY KEY,
    org_id      uuid NOT NULL,
    report      jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT device_health_device FOREIGN KEY (org_id, device_id)
        REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX device_health_org ON device_health (org_id);
