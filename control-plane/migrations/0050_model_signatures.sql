-- Model signatures (issue 13): the control plane signs every artifact at upload with its
-- model signing key (kip_certs::signing, kept beside the CA key). Agents refuse a model whose
-- signature is missing or does not verify, so a row written into this table by anything but
-- the upload path (NULL signature) never runs on a device.
-- Text form: `ed25519:<key id hex>:<signature hex>` (kip_certs::signing::Signature).
ALTER TABLE model_artifacts ADD COLUMN signature text
    CHECK (signature IS NULL OR signature ~ '^ed25519:[0-9a-f]{64}:[0-9a-f]{128}$');
ALTER TABLE model_artifacts ADD COLUMN signed_at timestamptz;
