-- Agent self-update (issue #18): agent releases (the tarball of scripts/package-agent.sh),
-- rollouts of a release to a device group by percentage, and what each device reports.
--
-- Releases are per organisation like models: the tarball is signed at upload with the model
-- signing key under the name 'agent-release:kip-agent' (no model can have that name), bound to
-- the organisation, the version and the sha256. Bytes are stored in 1 MiB chunks written in
-- the upload's transaction before the release row (deferred foreign key), as for models.
CREATE TABLE agent_releases (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    version     text NOT NULL CHECK (version ~ '^[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$'),
    sha256      text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes > 0),
    signature   text CHECK (signature IS NULL OR signature ~ '^ed25519:[0-9a-f]{64}:[0-9a-f]{128}$'),
    uploaded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, version),
    UNIQUE (org_id, id)
);

CREATE TABLE agent_release_chunks (
    org_id     uuid NOT NULL,
    release_id uuid NOT NULL,
    idx        integer NOT NULL CHECK (idx >= 0),
    bytes      bytea NOT NULL CHECK (length(bytes) > 0),
    PRIMARY KEY (release_id, idx),
    FOREIGN KEY (org_id, release_id) REFERENCES agent_releases (org_id, id)
        ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);

-- A rollout offers a release to the devices whose labels contain `selector` and whose bucket
-- (a hash of release id and device id, 0..99) is below `percent`. The bucket depends on the
-- release, not the rollout, so a later rollout of the same release at a higher percentage
-- reaches a superset of the devices.
CREATE TABLE release_rollouts (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    release_id  uuid NOT NULL,
    selector    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(selector) = 'object'),
    percent     integer NOT NULL CHECK (percent BETWEEN 1 AND 100),
    state       text NOT NULL CHECK (state IN ('active', 'paused', 'aborted')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, id),
    FOREIGN KEY (org_id, release_id) REFERENCES agent_releases (org_id, id) ON DELETE CASCADE
);
-- At most one rollout in progress per organisation: abort it before starting another.
CREATE UNIQUE INDEX release_rollouts_one_open ON release_rollouts (org_id)
    WHERE state IN ('active', 'paused');

-- What each device reports in the kip-update-status sync header.
CREATE TABLE device_update_status (
    device_id   uuid PRIMARY KEY,
    org_id      uuid NOT NULL,
    state       text NOT NULL,
    version     text NOT NULL,
    reason      text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (org_id, device_id) REFERENCES devices (org_id, id) ON DELETE CASCADE
);

-- A device's bucket (0..99) for a release: the first two bytes of md5(release id || device id)
-- modulo 100. Deterministic, so the devices a percentage selects never change.
CREATE FUNCTION release_bucket(release_id uuid, device_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (get_byte(decode(md5(release_id::text || device_id::text), 'hex'), 0) * 256
            + get_byte(decode(md5(release_id::text || device_id::text), 'hex'), 1)) % 100
$$;
