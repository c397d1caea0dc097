-- Machine-learning data of an organisation (issue 14): feature-set documents, maintenance
-- events (the ground truth that labels readings), what a model was trained on, how well it
-- performs, and what the agents measure about a deployed model (drift).
-- Tenant isolation as everywhere: org_id on every row and composite foreign keys to
-- (org_id, id) of the parent, so no row can point into another organisation's data.

-- Versioned feature-set documents (kip_shared::feature_set::FeatureSetDoc). The document id
-- carries the version (`cmapss-w30-v1`) and never changes meaning: a row is immutable.
CREATE TABLE feature_sets (
    org_id         uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    feature_set_id text NOT NULL,
    document       jsonb NOT NULL CHECK (jsonb_typeof(document) = 'object'),
    sha256         text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, feature_set_id)
);

-- The feature set a model version reads (NULL for versions registered before documents).
ALTER TABLE ai_models ADD COLUMN feature_set_id text;
ALTER TABLE ai_models ADD CONSTRAINT ai_models_feature_set
    FOREIGN KEY (org_id, feature_set_id) REFERENCES feature_sets (org_id, feature_set_id);

-- Failures, repairs and replacements of one machine behind one device.
CREATE TABLE maintenance_events (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL,
    device_id  uuid NOT NULL,
    machine    text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('failure', 'repair', 'replacement')),
    ts         timestamptz NOT NULL,
    note       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX maintenance_events_org_ts ON maintenance_events (org_id, ts, id);
CREATE INDEX maintenance_events_org_device_machine_ts
    ON maintenance_events (org_id, device_id, machine, ts);

-- What a model version was trained on: source (a file's sha256, or an organisation's
-- sensor_data range and events), feature set, split and seed. One row per model version.
CREATE TABLE training_data (
    model_id       uuid PRIMARY KEY,
    org_id         uuid NOT NULL,
    feature_set_id text,
    source         jsonb NOT NULL CHECK (jsonb_typeof(source) = 'object'),
    split          jsonb NOT NULL CHECK (jsonb_typeof(split) = 'object'),
    seed           bigint NOT NULL,
    examples       bigint NOT NULL CHECK (examples >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, feature_set_id) REFERENCES feature_sets (org_id, feature_set_id)
);

-- Quality of a model version on one evaluation set, measured in training ('training') or on
-- the agents once ground truth arrived ('agent'). Re-measuring replaces the row.
CREATE TABLE model_performance (
    org_id         uuid NOT NULL,
    model_id       uuid NOT NULL,
    evaluation_set text NOT NULL,
    source         text NOT NULL CHECK (source IN ('training', 'agent')),
    rmse           double precision,
    phm08_score    double precision,
    examples       bigint NOT NULL CHECK (examples >= 0),
    metrics        jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metrics) = 'object'),
    measured_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, evaluation_set, source),
    FOREIGN KEY (org_id, model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE
);
CREATE INDEX model_performance_org ON model_performance (org_id, model_id);

-- Predictions across an organisation's devices in time order (history pages).
CREATE INDEX predictions_org_ts ON predictions (org_id, ts, device_id, epoch, seq);
