-- Drift of deployed models as agents measure it (`model_drift` sync records): one row per
-- monitored feature (an input of the model's feature set, or `output`) and drift window.
-- Keyed by (device_id, epoch, seq) like every synced record, so a replayed batch stores each
-- record once.
CREATE TABLE model_monitoring (
    org_id           uuid NOT NULL,
    device_id        uuid NOT NULL,
    epoch            bigint NOT NULL,
    seq              bigint NOT NULL,
    model            text NOT NULL,
    model_version    text NOT NULL,
    feature          text NOT NULL,
    ts               timestamptz NOT NULL,
    psi              double precision NOT NULL,
    ks               double precision NOT NULL,
    psi_threshold    double precision NOT NULL,
    ks_threshold     double precision NOT NULL,
    alarm            boolean NOT NULL,
    window_size      integer NOT NULL CHECK (window_size >= 0),
    effective_window integer NOT NULL CHECK (effective_window >= 0),
    received_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch, seq),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
-- The listing's keyset order, and the fleet metric's latest-per-device scan.
CREATE INDEX model_monitoring_org_ts ON model_monitoring (org_id, ts, device_id, epoch, seq);
CREATE INDEX model_monitoring_model_ts
    ON model_monitoring (org_id, model, model_version, feature, device_id, ts);
