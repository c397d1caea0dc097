-- kip control plane: scoped API keys (roles) and the audit log.
--
-- Every key has a role. Keys that existed before roles keep the power they had: platform keys
-- become 'platform-admin', organisation keys 'org-admin'. An INSERT that names no role (code
-- written before roles) gets the same mapping from the trigger below, so no key is ever created
-- without one.
ALTER TABLE api_keys ADD COLUMN role text;
UPDATE api_keys SET role = CASE scope WHEN 'platform' THEN 'platform-admin' ELSE 'org-admin' END;
ALTER TABLE api_keys ALTER COLUMN role SET NOT NULL;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role
    CHECK (role IN ('platform-admin', 'org-admin', 'operator', 'llm', 'read-only'));
-- Only platform keys are platform-admin, and every platform key is.
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_scope
    CHECK ((role = 'platform-admin') = (scope = 'platform'));

CREATE FUNCTION api_keys_default_role() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.role IS NULL THEN
        NEW.role := CASE NEW.scope WHEN 'platform' THEN 'platform-admin' ELSE 'org-admin' END;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER api_keys_default_role BEFORE INSERT ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_default_role();

-- One row per state-changing admin API call by an authenticated key (including the ones its
-- role refused). Rows are never updated.
-- org_id is the caller's organisation for an organisation key (so a key that probes another
-- organisation's routes leaves its trace in its own log, never in the other's), and the
-- organisation in the path for a platform key; NULL for platform-level calls (organisation
-- create). No foreign key: the log outlives what it describes, including a deleted
-- organisation.
CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id     uuid,
    key_id     uuid NOT NULL,
    key_name   text NOT NULL,
    role       text NOT NULL,
    action     text NOT NULL,
    method     text NOT NULL,
    target     text NOT NULL,
    client_ip  inet,
    status     smallint NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('ok', 'denied', 'failed')),
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Keyset pagination per organisation, newest first.
CREATE INDEX audit_log_org_id ON audit_log (org_id, id);
