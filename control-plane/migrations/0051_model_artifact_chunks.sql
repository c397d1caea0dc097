-- Hole 6 (issue 13): model artifacts are streamed to and from PostgreSQL in chunks of 1 MiB
-- instead of one bytea value read and written whole, so the control plane's memory per
-- transfer is one chunk, not the artifact (up to 64 MiB).
--
-- The chunks of an artifact are written in the upload's transaction before its
-- model_artifacts row (whose sha256 is known only at the end of the stream): the foreign key
-- is checked at commit (DEFERRABLE INITIALLY DEFERRED).
ALTER TABLE model_artifacts ADD CONSTRAINT model_artifacts_org_model UNIQUE (org_id, model_id);

CREATE TABLE model_artifact_chunks (
    org_id   uuid NOT NULL,
    model_id uuid NOT NULL,
    idx      integer NOT NULL CHECK (idx >= 0),
    bytes    bytea NOT NULL CHECK (length(bytes) > 0),
    PRIMARY KEY (model_id, idx),
    FOREIGN KEY (org_id, model_id) REFERENCES model_artifacts (org_id, model_id)
        ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED
);

INSERT INTO model_artifact_chunks (org_id, model_id, idx, bytes)
SELECT a.org_id, a.model_id, g.i, substring(a.bytes FROM g.i * 1048576 + 1 FOR 1048576)
FROM model_artifacts a, generate_series(0, (length(a.bytes) - 1) / 1048576) AS g(i);

ALTER TABLE model_artifacts DROP COLUMN bytes;
