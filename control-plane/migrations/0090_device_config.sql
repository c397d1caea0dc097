-- Remote agent configuration (issue #18). Every change is a new row: the history is the
-- table. A row targets one device or a label selector (a device group: every device whose
-- labels contain the selector). What a device should run: its newest device row, else the
-- newest selector row its labels contain (a device row wins over any group, as for models).
CREATE TABLE device_configs (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    -- Per organisation, increasing; sent to agents as the text config_version.
    version     bigint NOT NULL,
    device_id   uuid,
    selector    jsonb CHECK (selector IS NULL OR jsonb_typeof(selector) = 'object'),
    -- The remote document (TOML of the remotely settable sections), validated before insert.
    toml        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT device_configs_target CHECK ((device_id IS NULL) <> (selector IS NULL)),
    UNIQUE (org_id, version),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
CREATE INDEX device_configs_device ON device_configs (org_id, device_id, version DESC)
    WHERE device_id IS NOT NULL;

-- What each device reports (filled from agent sync headers).
CREATE TABLE device_config_status (
    device_id       uuid PRIMARY KEY,
    org_id          uuid NOT NULL,
    applied_version text,
    last_error      text,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);
