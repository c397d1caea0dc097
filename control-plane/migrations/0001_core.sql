-- kip control plane: core schema.
-- Tenant isolation: every row that belongs to an organisation carries org_id, and child
-- tables reference (org_id, id) of their parent so a row can never point into another
-- organisation's data, whatever the application does.

CREATE TABLE organisations (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- API keys are stored as sha256 of the full key; the key itself is shown once at creation.
-- scope 'platform' keys have no organisation and may manage organisations;
-- scope 'org' keys belong to exactly one organisation.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    org_id       uuid REFERENCES organisations (id) ON DELETE CASCADE,
    scope        text NOT NULL CHECK (scope IN ('platform', 'org')),
    name         text NOT NULL,
    prefix       text NOT NULL UNIQUE,
    key_sha256   bytea NOT NULL CHECK (length(key_sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    CONSTRAINT api_keys_scope_org CHECK ((scope = 'platform') = (org_id IS NULL))
);
CREATE INDEX api_keys_org ON api_keys (org_id);

CREATE TABLE devices (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    name         text NOT NULL,
    labels       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz,
    CONSTRAINT devices_org_name UNIQUE (org_id, name),
    CONSTRAINT devices_org_id UNIQUE (org_id, id)
);

CREATE TABLE ai_models (
    id              uuid PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    name            text NOT NULL,
    version         text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('rul', 'anomaly', 'llm', 'other')),
    stage           text NOT NULL DEFAULT 'none'
                    CHECK (stage IN ('none', 'staging', 'challenger', 'champion', 'archived')),
    artifact_sha256 text CHECK (artifact_sha256 ~ '^[0-9a-f]{64}$'),
    uri             text,
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ai_models_org_name_version UNIQUE (org_id, name, version),
    CONSTRAINT ai_models_org_id UNIQUE (org_id, id)
);

-- One row per LLM call made through the gateway; written in batches off the request path.
CREATE TABLE inference_logs (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id         uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    request_id     uuid NOT NULL,
    provider       text NOT NULL,
    model          text NOT NULL,
    tokens_in      integer NOT NULL DEFAULT 0 CHECK (tokens_in >= 0),
    tokens_out     integer NOT NULL DEFAULT 0 CHECK (tokens_out >= 0),
    tokens_cached  integer NOT NULL DEFAULT 0 CHECK (tokens_cached >= 0),
    cost_usd       double precision NOT NULL DEFAULT 0,
    latency_ms     double precision NOT NULL,
    ttft_ms        double precision,
    status         text NOT NULL,
    cache_hit      boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inference_logs_org_time ON inference_logs (org_id, created_at);

-- Sensor readings synced from agents. The primary key (device_id, epoch, seq) is what makes
-- ingest idempotent: a batch sent twice inserts each record once (ON CONFLICT DO NOTHING).
-- The composite foreign key ties each row to a device of the same organisation.
CREATE TABLE sensor_data (
    org_id      uuid NOT NULL,
    device_id   uuid NOT NULL,
    epoch       bigint NOT NULL,
    seq         bigint NOT NULL,
    machine     text NOT NULL DEFAULT '',
    metric      text NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    quality     smallint NOT NULL DEFAULT 0,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, epoch, seq),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX sensor_data_org_device_metric_ts ON sensor_data (org_id, device_id, machine, metric, ts);
