-- kip control plane: server-side tool calls of the LLM orchestrator (control-plane/src/llm/orchestrator),
-- one row per call, stored beside the request's inference_logs rows (same request_id).
--
-- Only sizes are kept, never the arguments or results themselves: a tool result can carry
-- document text and readings, which stay in their own tables under their own access rules.
CREATE TABLE llm_tool_calls (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id          uuid NOT NULL REFERENCES organisations (id) ON DELETE CASCADE,
    request_id      uuid NOT NULL,
    -- 0-based step of the tool loop (one model call per step).
    step            integer NOT NULL CHECK (step >= 0),
    tool            text NOT NULL CHECK (length(tool) BETWEEN 1 AND 64),
    arguments_bytes integer NOT NULL CHECK (arguments_bytes >= 0),
    result_bytes    integer NOT NULL CHECK (result_bytes >= 0),
    duration_ms     double precision NOT NULL CHECK (duration_ms >= 0),
    -- ok, bad_arguments, unknown_tool, failed, timeout, limit
    status          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_tool_calls_org_request ON llm_tool_calls (org_id, request_id);
CREATE INDEX llm_tool_calls_org_time ON llm_tool_calls (org_id, created_at);
