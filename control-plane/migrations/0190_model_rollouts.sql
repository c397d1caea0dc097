-- Comparing model versions safely (issue 14): canary and shadow rollouts of a model version to
-- a share of a device group, the shadow predictions and per-model inference statistics the
-- agents sync, and the rollout's events (started, percentage changed, promoted, halted with
-- the threshold that was crossed).

-- Which model produced a prediction and in which role. Existing rows (and agents that predate
-- shadows) are the champion; the record key stays (device_id, epoch, seq, ts): a shadow
-- prediction is its own record with its own sequence number, so a replay stores it once.
ALTER TABLE predictions ADD COLUMN role text NOT NULL DEFAULT 'champion'
    CHECK (role IN ('champion', 'shadow'));
ALTER TABLE predictions ADD COLUMN model text;

-- A rollout of `model_id` (the candidate) to the devices of `selector` whose
-- release_bucket(model_id, device_id) (migration 0130, the selection agent releases use) is
-- below `percent`. canary: selected devices serve the candidate and run the baseline as a
-- shadow; shadow: selected devices keep serving the baseline and run the candidate as a
-- shadow. Devices not selected, and every device once the rollout is no longer active, get
-- what desired_models says (the baseline: set for the selector when the rollout starts).
CREATE TABLE model_rollouts (
    id                uuid PRIMARY KEY,
    org_id            uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    model_id          uuid NOT NULL,
    baseline_model_id uuid NOT NULL,
    selector          jsonb NOT NULL CHECK (jsonb_typeof(selector) = 'object' AND selector <> '{}'),
    percent           integer NOT NULL CHECK (percent BETWEEN 1 AND 100),
    mode              text NOT NULL CHECK (mode IN ('canary', 'shadow')),
    state             text NOT NULL CHECK (state IN ('active', 'promoted', 'halted', 'rolled_back')),
    thresholds        jsonb NOT NULL CHECK (jsonb_typeof(thresholds) = 'object'),
    halt_reason       text,
    last_evaluated_at timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE,
    FOREIGN KEY (org_id, baseline_model_id) REFERENCES ai_models (org_id, id) ON DELETE CASCADE,
    CONSTRAINT model_rollouts_org_id UNIQUE (org_id, id)
);
-- One active rollout per device group.
CREATE UNIQUE INDEX model_rollouts_one_active ON model_rollouts (org_id, selector)
    WHERE state = 'active';

CREATE TABLE model_rollout_events (
    id         uuid PRIMARY KEY,
    org_id     uuid NOT NULL,
    rollout_id uuid NOT NULL,
    ts         timestamptz NOT NULL DEFAULT now(),
    -- started, percent, promoted, halted (by a person), auto_halted (a threshold crossed)
    kind       text NOT NULL CHECK (kind IN ('started', 'percent', 'promoted', 'halted', 'auto_halted')),
    -- auto_halted: error, drift, inference_failures or latency
    reason     text,
    detail     text NOT NULL DEFAULT '',
    observed   double precision,
    threshold  double precision,
    devices    integer,
    FOREIGN KEY (org_id, rollout_id) REFERENCES model_rollouts (org_id, id) ON DELETE CASCADE
);
CREATE INDEX model_rollout_events_rollout_ts ON model_rollout_events (org_id, rollout_id, ts);

-- Inference statistics an agent reports per model and role (`model_stats` sync records):
-- predictions made, inferences failed, latency over the interval since the previous record.
CREATE TABLE model_inference_stats (
    org_id         uuid NOT NULL,
    device_id      uuid NOT NULL,
    epoch          bigint NOT NULL,
    seq            bigint NOT NULL,
    model          text NOT NULL,
    model_version  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('champion', 'shadow')),
    ts             timestamptz NOT NULL,
    predictions    bigint NOT NULL CHECK (predictions >= 0),
    failures       bigint NOT NULL CHECK (failures >= 0),
    latency_p50_us double precision,
    latency_p99_us double precision,
    latency_max_us double precision,
    received_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch, seq),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX model_inference_stats_model_ts
    ON model_inference_stats (org_id, model, model_version, device_id, ts);
