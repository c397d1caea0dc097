-- kip control plane: which intermediate CA issued each device certificate.
-- issuer_sha256 is the lowercase hex sha256 of the issuing intermediate's certificate (DER);
-- NULL for certificates issued before this column existed. It tells an operator how many
-- active certificates still chain to the previous intermediate during a CA rollover, i.e.
-- when `kipctl ca finish-rotation` is safe.
ALTER TABLE certificates ADD COLUMN issuer_sha256 text
    CHECK (issuer_sha256 ~ '^[0-9a-f]{64}$');
