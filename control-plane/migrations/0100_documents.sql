-- kip control plane: documents per organisation, their chunks and embeddings (pgvector), for
-- retrieval (control-plane/src/documents).
--
-- Tenant isolation in the database itself: row-level security on both tables, keyed by the
-- organisation that the application sets per transaction (`SELECT set_config('kip.org_id',
-- ORG, true)`, i.e. SET LOCAL). Without that setting a query sees no rows and may write none.
-- Superusers and table owners bypass RLS (owners unless FORCE), so the application also
-- switches to the unprivileged role kip_tenant for the transaction (SET LOCAL ROLE); the
-- policies then hold whatever the connecting role is.
--
-- Needs the pgvector extension files on the server (scripts/lib.sh ensure_pgvector) and a
-- role that may CREATE EXTENSION and CREATE ROLE (the postgres superuser in development).
CREATE EXTENSION IF NOT EXISTS vector;

-- Roles are per cluster: several databases (and concurrent test databases) share one.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kip_tenant') THEN
        CREATE ROLE kip_tenant NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL; -- created by a concurrent migration of another database
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT kip_tenant TO %I', current_user);
EXCEPTION WHEN duplicate_object OR unique_violation OR invalid_grant_operation THEN
    NULL;
END
$$;
GRANT USAGE ON SCHEMA public TO kip_tenant;

CREATE TABLE documents (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    title        text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    media_type   text NOT NULL CHECK (media_type IN ('text/markdown', 'text/plain', 'application/pdf')),
    -- Full-text configuration of the document's language: 'german', 'english' or 'simple'.
    language     regconfig NOT NULL,
    size_bytes   bigint NOT NULL,
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    chunk_count  integer NOT NULL,
    -- Identifies the embedding model the chunks were embedded with (a new model means re-embed).
    embedding_model text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT documents_org_id UNIQUE (org_id, id)
);
CREATE INDEX documents_org_created ON documents (org_id, created_at);

-- Chunk ids are derived from (document id, ordinal), so re-chunking a document yields the same
-- ids; char_start/char_end are character offsets into the extracted text, page is the PDF page
-- (1-based) where the chunk starts.
CREATE TABLE document_chunks (
    id           uuid PRIMARY KEY,
    org_id       uuid NOT NULL,
    document_id  uuid NOT NULL,
    ordinal      integer NOT NULL,
    char_start   integer NOT NULL,
    char_end     integer NOT NULL,
    page         integer,
    heading      text,
    content      text NOT NULL,
    language     regconfig NOT NULL,
    embedding    vector(384) NOT NULL,
    -- Stemmed in the document's language plus unstemmed ('simple'), so part numbers, codes and
    -- words of the other language still match.
    tsv          tsvector GENERATED ALWAYS AS
                 (to_tsvector(language, content) || to_tsvector('simple'::regconfig, content)) STORED,
    CONSTRAINT document_chunks_doc_ordinal UNIQUE (document_id, ordinal),
    FOREIGN KEY (org_id, document_id) REFERENCES documents (org_id, id) ON DELETE CASCADE
);
CREATE INDEX document_chunks_org ON document_chunks (org_id);
CREATE INDEX document_chunks_tsv ON document_chunks USING gin (tsv);
-- Cosine distance (the embeddings are normalised). Queries filter by organisation after the
-- index scan; they run with hnsw.iterative_scan = relaxed_order so a small organisation beside a
-- large one still gets its k nearest rows.
CREATE INDEX document_chunks_embedding ON document_chunks USING hnsw (embedding vector_cosine_ops);

ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
ALTER TABLE documents FORCE ROW LEVEL SECURITY;
ALTER TABLE document_chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE document_chunks FORCE ROW LEVEL SECURITY;
CREATE POLICY documents_org ON documents
    USING (org_id = NULLIF(current_setting('kip.org_id', true), '')::uuid)
    WITH CHECK (org_id = NULLIF(current_setting('kip.org_id', true), '')::uuid);
CREATE POLICY document_chunks_org ON document_chunks
    USING (org_id = NULLIF(current_setting('kip.org_id', true), '')::uuid)
    WITH CHECK (org_id = NULLIF(current_setting('kip.org_id', true), '')::uuid);
GRANT SELECT, INSERT, DELETE ON documents, document_chunks TO kip_tenant;
