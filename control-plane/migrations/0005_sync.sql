-- Agent sync: acknowledged high-water marks, predictions and agent events (gaps, dead letters,
-- losses). Every table is keyed by (device_id, epoch, seq) like sensor_data, so a batch sent
-- twice stores each record once.

CREATE TABLE device_sync_state (
    device_id     uuid NOT NULL,
    org_id        uuid NOT NULL,
    epoch         bigint NOT NULL,
    acked_seq     bigint NOT NULL,
    agent_version text NOT NULL DEFAULT '',
    running_model text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);

CREATE TABLE predictions (
    org_id        uuid NOT NULL,
    device_id     uuid NOT NULL,
    epoch         bigint NOT NULL,
    seq           bigint NOT NULL,
    machine       text NOT NULL,
    model_version text NOT NULL,
    ts            timestamptz NOT NULL,
    rul_cycles    double precision NOT NULL,
    anomaly_score double precision,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch, seq),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX predictions_org_device_machine_ts ON predictions (org_id, device_id, machine, ts);

CREATE TABLE agent_events (
    org_id      uuid NOT NULL,
    device_id   uuid NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('gap', 'dead_letter', 'loss')),
    ts          timestamptz NOT NULL,
    body        jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch, seq),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX agent_events_org_device_ts ON agent_events (org_id, device_id, ts);
