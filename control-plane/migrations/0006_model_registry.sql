-- Model registry: artifacts, champion/challenger aliases, rollout and device model status.
-- Artifacts live in PostgreSQL (see control-plane/src/registry.rs for why).

CREATE TABLE model_artifacts (
    model_id    uuid PRIMARY KEY,
    org_id      uuid NOT NULL,
    bytes       bytea NOT NULL,
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes > 0),
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE
);

-- MLflow's version number of a kip model, when mirrored (see registry/mlflow.rs).
ALTER TABLE ai_models ADD COLUMN mlflow_version text;

-- At most one champion and one challenger per (organisation, model name). Moving an alias
-- demotes the previous holder in the same transaction; these indexes make a race that
-- slipped past the application's row locks fail instead of leaving two champions.
CREATE UNIQUE INDEX ai_models_one_champion ON ai_models (org_id, name) WHERE stage = 'champion';
CREATE UNIQUE INDEX ai_models_one_challenger ON ai_models (org_id, name) WHERE stage = 'challenger';

-- What devices should run. A row names either one device or a label selector (a device
-- group: every device whose labels contain the selector); a device-specific row wins over
-- any selector, and among selectors the most recently updated wins.
CREATE TABLE desired_models (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    device_id  uuid,
    selector   jsonb CHECK (selector IS NULL OR jsonb_typeof(selector) = 'object'),
    model_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT desired_models_target CHECK ((device_id IS NULL) <> (selector IS NULL)),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX desired_models_one_per_device ON desired_models (org_id, device_id)
    WHERE device_id IS NOT NULL;
CREATE UNIQUE INDEX desired_models_one_per_selector ON desired_models (org_id, selector)
    WHERE selector IS NOT NULL;

-- What each device reports it runs (filled from agent sync).
CREATE TABLE device_model_status (
    device_id     uuid PRIMARY KEY,
    org_id        uuid NOT NULL,
    running_model text,
    last_error    text,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
