#!/usr/bin/env python3
"""Writes docs/openapi.json, the OpenAPI document of the control plane's HTTP API.

The document is the contract; a Rust test checks that every route the router serves is in it
and every path in it is served. Edit this script, run it, commit both files.
"""
import json, pathlib

def ref(name): return {"$ref": f"#/components/schemas/{name}"}
def err(desc): return {"description": desc, "content": {"application/json": {"schema": ref("Error")}}}
def ok(desc, schema, code="200"):
    return {code: {"description": desc, "content": {"application/json": {"schema": schema}}}}
def body(schema): return {"required": True, "content": {"application/json": {"schema": schema}}}
def arr(s): return {"type": "array", "items": s}
P = lambda name, desc: {"name": name, "in": "path", "required": True, "description": desc, "schema": {"type": "string", "format": "uuid"}}
LIMIT = {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}}
COMMON = {"400": err("Malformed JSON or unknown/missing field (named in the message)"),
          "401": err("Missing or invalid API key"), "413": err("Body larger than the configured limit"),
          "422": err("A value breaks a rule (field named)"), "504": err("Request timed out")}
def op(summary, responses, params=(), req=None, extra=()):
    o = {"summary": summary, "security": [{"apiKey": []}], "parameters": list(params), "responses": {**responses, **COMMON}}
    for code in extra: o["responses"][code] = {"403": err("Needs a platform-admin key"), "404": err("Not found, or not visible to this key"), "409": err("Duplicate")}[code]
    if req: o["requestBody"] = req
    return o

ORG = P("org_id", "Organisation id")
name = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"}
ts = {"type": "string", "format": "date-time"}
uuid = {"type": "string", "format": "uuid"}
schemas = {
  "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
  "Me": {"type": "object", "properties": {"key_id": uuid, "scope": {"enum": ["platform", "org"]}, "org_id": {"type": ["string", "null"], "format": "uuid"}}},
  "Organisation": {"type": "object", "properties": {"id": uuid, "name": name, "display_name": {"type": "string"}, "created_at": ts, "updated_at": ts}},
  "CreateOrganisation": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {"name": name, "display_name": {"type": ["string", "null"], "maxLength": 200}}},
  "UpdateOrganisation": {"type": "object", "additionalProperties": False, "required": ["display_name"], "properties": {"display_name": {"type": "string", "minLength": 1, "maxLength": 200}}},
  "ApiKeyInfo": {"type": "object", "properties": {"id": uuid, "org_id": uuid, "name": name, "prefix": {"type": "string"}, "created_at": ts, "revoked_at": {"type": ["string", "null"], "format": "date-time"}}},
  "CreatedApiKey": {"allOf": [ref("ApiKeyInfo"), {"type": "object", "properties": {"key": {"type": "string", "description": "Shown only in this response"}}}]},
  "CreateApiKey": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {"name": name}},
  "Device": {"type": "object", "properties": {"id": uuid, "org_id": uuid, "name": name, "labels": {"type": "object", "additionalProperties": {"type": "string"}}, "created_at": ts, "last_seen_at": {"type": ["string", "null"], "format": "date-time"}}},
  "RegisterDevice": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {"name": name, "labels": {"type": "object", "maxProperties": 64, "additionalProperties": {"type": "string"}}}},
  "AiModel": {"type": "object", "properties": {"id": uuid, "org_id": uuid, "name": name, "version": {"type": "string"}, "kind": {"enum": ["rul", "anomaly", "llm", "other"]}, "stage": {"enum": ["none", "staging", "challenger", "champion", "archived"]}, "artifact_sha256": {"type": ["string", "null"]}, "uri": {"type": ["string", "null"]}, "metrics": {"type": "object"}, "created_at": ts}},
  "RegisterModel": {"type": "object", "additionalProperties": False, "required": ["name", "version", "kind"], "properties": {"name": name, "version": {"type": "string", "pattern": "^[A-Za-z0-9._+-]{1,64}$"}, "kind": {"enum": ["rul", "anomaly", "llm", "other"]}, "stage": {"enum": ["none", "staging", "challenger", "champion", "archived"]}, "artifact_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "uri": {"type": "string", "maxLength": 2048}, "metrics": {"type": "object"}}},
  "ArtifactInfo": {"type": "object", "properties": {"model_id": uuid, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "size_bytes": {"type": "integer"}, "uploaded_at": ts, "signature": {"type": "string", "pattern": "^ed25519:[0-9a-f]{64}:[0-9a-f]{128}$", "description": "The control plane's signature over organisation, name, version and sha256 (docs/pki.md, Model signing)"}}},
  "ModelSigningStatus": {"type": "object", "properties": {"key_id": {"type": "string"}, "previous_key_id": {"type": ["string", "null"]}, "trusted_keys_pem": {"type": "string"}, "signed_by_current": {"type": "integer"}, "signed_by_previous": {"type": "integer"}, "unsigned": {"type": "integer"}}},
  "SetStage": {"type": "object", "additionalProperties": False, "required": ["stage"], "properties": {"stage": {"enum": ["none", "staging", "challenger", "champion", "archived"]}}},
  "SetDesiredModel": {"type": "object", "additionalProperties": False, "required": ["model_id"], "properties": {"model_id": {"type": ["string", "null"], "format": "uuid", "description": "null stops the rollout to this device"}}},
  "DeviceModelStatus": {"type": "object", "properties": {"device_id": uuid, "device_name": name, "desired_model_id": {"type": ["string", "null"], "format": "uuid"}, "desired_model": {"type": ["string", "null"], "description": "name@version"}, "running_model": {"type": ["string", "null"], "description": "name@version reported by the agent"}, "last_error": {"type": ["string", "null"]}, "updated_at": {"type": ["string", "null"], "format": "date-time"}, "in_sync": {"type": "boolean"}}},
  "CreateEnrollToken": {"type": "object", "additionalProperties": False, "properties": {"ttl_s": {"type": "integer", "minimum": 60, "maximum": 2592000, "default": 3600}, "device_name": {**name, "description": "Bind the token to this device name (required to re-enroll an existing device)"}}},
  "EnrollToken": {"type": "object", "properties": {"id": uuid, "org_id": uuid, "token": {"type": "string", "description": "One-time token; shown only in this response"}, "device_name": {"type": ["string", "null"]}, "expires_at": ts}},
  "Revocation": {"type": "object", "properties": {"org_id": uuid, "device_id": uuid, "revoked_serials": arr({"type": "string", "pattern": "^[0-9a-f]+$"})}},
  "EnrollRequest": {"type": "object", "additionalProperties": False, "required": ["token", "csr_pem", "device_name"], "properties": {"token": {"type": "string"}, "csr_pem": {"type": "string", "maxLength": 16384, "description": "PKCS#10 CSR (PEM); only its public key is used"}, "device_name": name, "org_id": {**uuid, "description": "When given, the token must belong to this organisation"}}},
  "CertificateResponse": {"type": "object", "properties": {"org_id": uuid, "device_id": uuid, "device_name": name, "serial": {"type": "string"}, "not_before": ts, "not_after": ts, "certificate_chain_pem": {"type": "string", "description": "Device certificate then intermediate"}, "trust_bundle_pem": {"type": "string", "description": "Roots to trust for the agent listener"}}},
  "RenewExpiredRequest": {"type": "object", "additionalProperties": False, "required": ["certificate_chain_pem", "csr_pem"], "properties": {"certificate_chain_pem": {"type": "string", "description": "The expired device certificate then its intermediate"}, "csr_pem": {"type": "string", "maxLength": 16384, "description": "CSR signed with the certificate's own key"}}},
  "RenewRequest": {"type": "object", "additionalProperties": False, "required": ["csr_pem"], "properties": {"csr_pem": {"type": "string", "maxLength": 16384}}},
  "SyncBatch": {"type": "object", "additionalProperties": False, "required": ["protocol_version", "epoch", "first_seq", "last_seq", "records"],
    "description": "Records of one epoch in strictly increasing seq order, first_seq <= seq <= last_seq. No device field: the device is the client certificate's.",
    "properties": {"protocol_version": {"type": "integer", "minimum": 1}, "agent_version": {"type": "string"}, "epoch": {"type": "integer", "minimum": 0},
                   "first_seq": {"type": "integer", "minimum": 0}, "last_seq": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807},
                   "records": arr({"type": "object", "additionalProperties": False, "required": ["epoch", "seq", "record"], "properties": {"epoch": {"type": "integer"}, "seq": {"type": "integer"},
                       "record": {"type": "object", "required": ["kind"], "description": "A reading, gap, dead_letter, loss or prediction (tagged by kind)", "properties": {"kind": {"enum": ["reading", "gap", "dead_letter", "loss", "prediction"]}}}}}),
                   "running_model": {"type": ["string", "null"]}}},
  "SyncAck": {"type": "object", "required": ["protocol_version", "epoch", "acked_seq", "inserted", "duplicates"], "properties": {
    "protocol_version": {"type": "integer"}, "epoch": {"type": "integer"}, "acked_seq": {"type": "integer", "description": "Every record of this epoch up to here is stored; the agent may delete them"},
    "inserted": {"type": "integer"}, "duplicates": {"type": "integer", "description": "Records already stored (a replay)"},
    "desired": {"type": "object", "properties": {"config_version": {"type": ["string", "null"]}, "model": {"type": ["object", "null"]}, "renew_certificate": {"type": "boolean", "description": "The client certificate comes from an intermediate that no longer signs (CA rollover): renew soon, with jitter"},
      "renew_serial": {"type": "string", "description": "With renew_certificate: serial of the client certificate to replace"},
      "trust_bundle_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "sha256 over the DER roots of the trust bundle, in order"},
      "trust_bundle_pem": {"type": "string", "description": "The trust bundle (PEM), only when the agent reported another fingerprint in kip-trust-bundle-sha256"}}}}},
  "CaStatus": {"type": "object", "properties": {
    "intermediate": {"type": "object", "properties": {"fingerprint": {"type": "string"}, "not_after": ts}},
    "previous_intermediate": {"type": ["object", "null"], "properties": {"fingerprint": {"type": "string"}, "not_after": ts}},
    "root_not_after": {"type": ["string", "null"], "format": "date-time"}, "bundle_sha256": {"type": "string"}, "bundle_roots": {"type": "integer"},
    "devices_by_issuer": {"type": "object", "description": "Devices by the intermediate that issued their newest unexpired, unrevoked certificate; previous > 0 means finish-rotation would cut devices off", "properties": {"current": {"type": "integer"}, "previous": {"type": "integer"}, "other": {"type": "integer"}}},
    "reloaded": {"type": "boolean", "description": "Only from POST /v1/pki/ca/reload: the CA files had changed and were loaded"}}},
  "AgentWhoami": {"type": "object", "properties": {"org_id": uuid, "device_id": uuid, "device_name": name, "serial": {"type": "string"}, "not_after": ts}},
}
msg = {"type": "object", "additionalProperties": False, "required": ["role"], "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]}, "content": {"type": ["string", "null"]}, "name": {"type": "string"}, "tool_call_id": {"type": "string"}, "tool_calls": {"type": "array", "items": {"type": "object"}}}}
schemas.update({
  "QueryRequest": {"type": "object", "additionalProperties": False, "required": ["messages"], "description": "Give task or model (or neither, for llm.default_model).", "properties": {
    "task": {"type": "string", "description": "A task from [llm.tasks], e.g. machine_status"},
    "model": {"type": "string", "description": "provider/model, an alias, or a model listed by one provider"},
    "messages": {"type": "array", "minItems": 1, "items": msg},
    "options": {"type": "object", "additionalProperties": False, "properties": {
      "provider": {"type": "string"}, "fallback": {"type": "array", "items": {"type": "string"}},
      "strategy": {"enum": ["cost", "latency"]}, "cache": {"type": "boolean"},
      "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0, "maximum": 2},
      "tools": {"type": "array", "items": {"type": "object"}}}}}},
  "QueryResponse": {"type": "object", "properties": {
    "request_id": uuid, "provider": {"type": "string"}, "model": {"type": "string"},
    "content": {"type": ["string", "null"]}, "reasoning_content": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object"}}, "finish_reason": {"type": ["string", "null"]},
    "usage": {"type": "object", "properties": {"input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"}, "cached_tokens": {"type": "integer"}}},
    "cost_usd": {"type": "number"}, "latency_ms": {"type": "number"}, "cache_hit": {"type": "boolean"}, "fallback_used": {"type": "boolean"},
    "attempts": {"type": "array", "items": {"type": "object", "properties": {"provider": {"type": "string"}, "model": {"type": "string"}, "status": {"type": "string"}}}}}},
  "ChatCompletionRequest": {"type": "object", "required": ["messages"], "additionalProperties": True, "description": "OpenAI chat completion request; unknown fields are passed to the provider.", "properties": {"model": {"type": "string"}, "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}}, "stream": {"type": "boolean"}, "temperature": {"type": "number"}, "tools": {"type": "array", "items": {"type": "object"}}}},
})
LLM_ERRORS = {"402": err("Monthly budget of the organisation used up"), "403": err("Needs an organisation key"),
              "429": err("Rate limit of the organisation exceeded (Retry-After header)"), "502": err("Every provider failed and the local fallback is off")}
plain = lambda d: {"200": {"description": d, "content": {"application/json": {"schema": {"type": "object"}}}}}
paths = {
  "/healthz": {"get": {"summary": "Liveness", "responses": plain("Process is alive")}},
  "/readyz": {"get": {"summary": "Readiness (database reachable)", "responses": {**plain("Ready"), "503": err("Database unreachable")}}},
  "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OpenMetrics text", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}}},
  "/openapi.json": {"get": {"summary": "This document", "responses": plain("OpenAPI 3.1")}},
  "/v1/me": {"get": op("The calling key", ok("Key", ref("Me")))},
  "/v1/organisations": {
    "get": op("List organisations (an organisation key sees its own)", ok("Organisations", arr(ref("Organisation"))), [LIMIT]),
    "post": op("Create an organisation (platform key)", ok("Created", ref("Organisation"), "201"), req=body(ref("CreateOrganisation")), extra=["403", "409"])},
  "/v1/organisations/{org_id}": {
    "get": op("Get an organisation", ok("Organisation", ref("Organisation")), [ORG], extra=["404"]),
    "patch": op("Update an organisation", ok("Updated", ref("Organisation")), [ORG], body(ref("UpdateOrganisation")), extra=["404"]),
    "delete": op("Delete an organisation and all its data (platform key)", {"204": {"description": "Deleted"}}, [ORG], extra=["403", "404"])},
  "/v1/organisations/{org_id}/api-keys": {
    "get": op("List API keys (never the keys themselves)", ok("Keys", arr(ref("ApiKeyInfo"))), [ORG, LIMIT], extra=["404"]),
    "post": op("Create an API key; the key is in this response only", ok("Created", ref("CreatedApiKey"), "201"), [ORG], body(ref("CreateApiKey")), extra=["404"])},
  "/v1/organisations/{org_id}/api-keys/{key_id}": {
    "delete": op("Revoke an API key (idempotent)", ok("Revoked", ref("ApiKeyInfo")), [ORG, P("key_id", "Key id")], extra=["404"])},
  "/v1/organisations/{org_id}/devices": {
    "get": op("List devices", ok("Devices", arr(ref("Device"))), [ORG, LIMIT], extra=["404"]),
    "post": op("Register a device", ok("Registered", ref("Device"), "201"), [ORG], body(ref("RegisterDevice")), extra=["404", "409"])},
  "/v1/organisations/{org_id}/devices/{device_id}": {
    "get": op("Get a device", ok("Device", ref("Device")), [ORG, P("device_id", "Device id")], extra=["404"]),
    "delete": op("Delete a device", {"204": {"description": "Deleted"}}, [ORG, P("device_id", "Device id")], extra=["404"])},
  "/v1/organisations/{org_id}/devices/{device_id}/sensor-data": {
    "get": op("Sensor data of a device: raw readings, or time buckets with bucket_s (avg/min/max/count); keyset pagination with next_cursor",
              ok("A page", {"type": "object", "properties": {"points": {"type": "array", "items": {"type": "object"}}, "next_cursor": {"type": ["string", "null"]}}}),
              [ORG, P("device_id", "Device id")] + [{"name": n, "in": "query", "required": False, "schema": sc} for n, sc in [
                  ("metric", {"type": "string"}), ("machine", {"type": "string"}),
                  ("from", {"type": "string", "format": "date-time"}), ("to", {"type": "string", "format": "date-time"}),
                  ("bucket_s", {"type": "integer", "minimum": 1, "maximum": 2678400}),
                  ("limit", {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}), ("cursor", {"type": "string"})]],
              extra=["404"])},
  "/v1/organisations/{org_id}/models": {
    "get": op("List AI models", ok("Models", arr(ref("AiModel"))), [ORG, LIMIT], extra=["404"]),
    "post": op("Register an AI model version", ok("Registered", ref("AiModel"), "201"), [ORG], body(ref("RegisterModel")), extra=["404", "409"])},
  "/v1/organisations/{org_id}/models/{model_id}": {
    "get": op("Get an AI model", ok("Model", ref("AiModel")), [ORG, P("model_id", "Model id")], extra=["404"])},
  "/v1/organisations/{org_id}/models/{model_id}/artifact": {
    "get": op("Download a model's artifact (sha256 in x-kip-sha256)", {"200": {"description": "Artifact bytes", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}, [ORG, P("model_id", "Model id")], extra=["404"]),
    "put": op("Upload a model's artifact (raw bytes, at most 64 MiB); must match artifact_sha256 when registered, else its sha256 is recorded; artifacts are immutable", {**ok("Same artifact already stored", ref("ArtifactInfo")), **ok("Stored", ref("ArtifactInfo"), "201")}, [ORG, P("model_id", "Model id")], {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, extra=["404"])},
  "/v1/organisations/{org_id}/models/{model_id}/stage": {
    "post": op("Set a model's stage; champion and challenger are unique per model name (the previous holder is demoted to none)", ok("Updated", ref("AiModel")), [ORG, P("model_id", "Model id")], body(ref("SetStage")), extra=["404"])},
  "/v1/organisations/{org_id}/devices/{device_id}/desired-model": {
    "put": op("Roll a model version (with an uploaded artifact) out to a device, or stop with null", ok("Device model status", ref("DeviceModelStatus")), [ORG, P("device_id", "Device id")], body(ref("SetDesiredModel")), extra=["404"])},
  "/v1/organisations/{org_id}/model-status": {
    "get": op("Desired and running model of every device", ok("Statuses", arr(ref("DeviceModelStatus"))), [ORG], extra=["404"])},
  "/v1/query": {"post": op("Ask a language model (kip API): routing, fallbacks, cache, budget", {**ok("Answer", ref("QueryResponse")), **LLM_ERRORS}, req=body(ref("QueryRequest")))},
  "/v1/chat/completions": {"post": op("OpenAI-compatible chat completions (JSON, or SSE with stream=true); headers x-kip-cache, x-kip-fallback, x-kip-strategy", {"200": {"description": "chat.completion object, or text/event-stream of chat.completion.chunk events ending with data: [DONE]", "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}}, **LLM_ERRORS}, req=body(ref("ChatCompletionRequest")))},
  "/v1/organisations/{org_id}/enroll-tokens": {
    "post": op("Create a one-time device enrollment token; the token is in this response only", ok("Created", ref("EnrollToken"), "201"), [ORG], body(ref("CreateEnrollToken")), extra=["404"])},
  "/v1/organisations/{org_id}/devices/{device_id}/revoke": {
    "post": op("Revoke every unexpired certificate of a device; effective on its next TLS handshake", ok("Revoked", ref("Revocation")), [ORG, P("device_id", "Device id")], extra=["404"])},
  "/v1/model-signing": {"get": op("The model signing keys (platform key) and how many artifacts each signs; a signing-key rotation may be finished once signed_by_previous is 0", {**ok("Signing status", ref("ModelSigningStatus")), "404": err("No model signing key (pki.ca_dir is not set)")}, extra=["403"])},
  "/v1/pki/ca": {"get": op("The fleet CA in use (platform key): intermediates, root expiry, bundle fingerprint, devices per intermediate", {**ok("CA", ref("CaStatus")), "503": err("No fleet CA configured")}, extra=["403"])},
  "/v1/pki/ca/reload": {"post": op("Load changed CA files now instead of at the next poll (as SIGHUP) (platform key)", {**ok("CA after the check", ref("CaStatus")), "503": err("No fleet CA configured")}, extra=["403"])},
  "/enroll": {"post": {"summary": "Enroll a device: a one-time token plus a CSR give a short-lived client certificate, its chain and the trust bundle", "security": [],
    "requestBody": body(ref("EnrollRequest")),
    "responses": {**ok("Enrolled", ref("CertificateResponse"), "201"), "400": COMMON["400"], "403": err("Token invalid, expired, used or for another organisation"),
                  "409": err("A device with this name exists and the token does not name it"), "413": COMMON["413"], "422": COMMON["422"], "503": err("No fleet CA configured")}}},
  "/renew-expired": {"post": {"summary": "Renew an expired device certificate (within pki.expired_renewal_grace_s) by proving possession of its key", "security": [],
    "requestBody": body(ref("RenewExpiredRequest")),
    "responses": {**ok("Renewed", ref("CertificateResponse")), "400": COMMON["400"], "403": err("Not renewable: unknown CA, revoked, deleted device, other key, or expired too long ago"),
                  "413": COMMON["413"], "422": COMMON["422"], "503": err("No fleet CA configured")}}},
}
# The agent mTLS listener (pki.agent_listen_addr) serves its own small API, documented apart
# because it is not on the admin listener.
TLS_ERR = {"403": err("Client certificate unknown, revoked, or its device deleted"), "404": err("Unknown route")}
agent_paths = {
  "/v1/agent/renew": {"post": {"summary": "Renew the device certificate; authenticated by the current client certificate", "security": [{"mtls": []}],
    "requestBody": body(ref("RenewRequest")), "responses": {**ok("Renewed", ref("CertificateResponse")), **TLS_ERR, "400": COMMON["400"], "422": COMMON["422"]}}},
  "/v1/agent/sync": {"post": {"summary": "Store a batch of buffered agent records idempotently (one transaction, keyed by device, epoch, seq) and acknowledge it. Body JSON, gzip with Content-Encoding: gzip; limits ingest.max_batch_bytes (after decompression) and ingest.max_batch_records", "security": [{"mtls": []}],
    "parameters": [{"name": "kip-trust-bundle-sha256", "in": "header", "required": False, "description": "sha256 of the agent's trust bundle; the ack carries the bundle when it differs", "schema": {"type": "string"}}],
    "requestBody": body(ref("SyncBatch")), "responses": {**ok("Stored (or already stored)", ref("SyncAck")), **TLS_ERR,
      "400": err("Not gzip, not JSON for this protocol version, or unsupported Content-Encoding (named in the message)"),
      "413": err("Body or decompressed batch larger than ingest.max_batch_bytes"),
      "422": err("Batch breaks a rule (protocol_version, empty, too many records, seq order or range, epoch) or a record is invalid (index named)"),
      "503": err("Database unavailable; retry")}}},
  "/v1/agent/whoami": {"get": {"summary": "The identity named by the client certificate", "security": [{"mtls": []}],
    "responses": {**ok("Identity", ref("AgentWhoami")), **TLS_ERR}}},
  "/v1/agent/models/{model_id}/artifact": {"get": {"summary": "Download the artifact of the model desired for this device (and only that one; 404 otherwise)", "security": [{"mtls": []}],
    "parameters": [P("model_id", "Model id from SyncAck.desired.model.download_path")],
    "responses": {"200": {"description": "Artifact bytes (sha256 in x-kip-sha256)", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}, **TLS_ERR}}},
}
# --- rag: documents, retrieval and grounded answers (control-plane/src/documents) ---
schemas.update({
  "Document": {"type": "object", "properties": {"id": uuid, "org_id": uuid, "title": {"type": "string"}, "media_type": {"enum": ["text/markdown", "text/plain", "application/pdf"]},
    "language": {"enum": ["german", "english", "simple"], "description": "Full-text configuration"}, "size_bytes": {"type": "integer"}, "sha256": {"type": "string"},
    "chunk_count": {"type": "integer"}, "embedding_model": {"type": "string"}, "created_at": ts}},
  "SearchHit": {"type": "object", "properties": {"chunk_id": uuid, "document_id": uuid, "title": {"type": "string"}, "ordinal": {"type": "integer"},
    "char_start": {"type": "integer"}, "char_end": {"type": "integer"}, "page": {"type": ["integer", "null"]}, "heading": {"type": ["string", "null"]},
    "content": {"type": "string"}, "score": {"type": "number", "description": "Reciprocal rank fusion score"},
    "vector_rank": {"type": ["integer", "null"]}, "text_rank": {"type": ["integer", "null"]}}},
  "Grounding": {"type": "object", "properties": {"mode": {"enum": ["llm", "fallback"]}, "grounded": {"type": "boolean", "description": "False when the answer cites no source"},
    "citations": {"type": "array", "items": {"type": "object", "required": ["kind", "marker"], "properties": {"kind": {"enum": ["document", "reading", "prediction"]}, "marker": {"type": "string"}}}},
    "tool_calls": {"type": "array", "items": {"type": "object", "properties": {"tool": {"type": "string"}, "results": {"type": "integer"}, "latency_ms": {"type": "number"}}}}}},
})
schemas["QueryRequest"]["properties"]["mode"] = {"enum": ["direct", "grounded"], "default": "direct", "description": "grounded: answer from the organisation's documents, readings and predictions, with citations"}
schemas["QueryResponse"]["properties"]["grounding"] = ref("Grounding")
DOC = P("document_id", "Document id")
OAI_400 = {"400": {"description": "OpenAI-style invalid_request_error naming error.param", "content": {"application/json": {"schema": {"type": "object"}}}}}
paths.update({
  "/v1/models": {"get": op("OpenAI-compatible model list: provider/model names, aliases and the local embedding model", {**plain("object: list of models"), "403": err("Needs an organisation key")})},
  "/v1/embeddings": {"post": op("OpenAI-compatible embeddings from the local model (kip-embedding, 384 dimensions; encoding_format float or base64)",
     {**plain("object: list of embeddings"), **OAI_400, "403": err("Needs an organisation key"), "503": err("Embedding model not loaded")},
     req=body({"type": "object", "required": ["model", "input"], "properties": {"model": {"type": "string"}, "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
       "encoding_format": {"enum": ["float", "base64"]}, "dimensions": {"type": "integer"}}}))},
  "/v1/organisations/{org_id}/documents": {
    "get": op("List the organisation's documents", ok("Documents", arr(ref("Document"))), [ORG], extra=["404"]),
    "post": op("Upload a document (raw body: text/markdown, text/plain or application/pdf; at most documents.max_document_bytes); it is chunked, embedded and searchable at once",
               {**ok("Stored", ref("Document"), "201"), "503": err("Embedding model not loaded")},
               [ORG, {"name": "title", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                {"name": "language", "in": "query", "required": False, "schema": {"enum": ["auto", "de", "en", "german", "english", "simple"]}}],
               {"required": True, "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in ["text/markdown", "text/plain", "application/pdf"]}}, extra=["404"])},
  "/v1/organisations/{org_id}/documents/search": {
    "get": op("Hybrid retrieval (vector + full text, reciprocal rank fusion) over the organisation's documents",
              {**ok("Best chunks first", arr(ref("SearchHit"))), "503": err("Embedding model not loaded")},
              [ORG, {"name": "q", "in": "query", "required": True, "schema": {"type": "string", "minLength": 1, "maxLength": 2000}},
               {"name": "k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 5}}], extra=["404"])},
  "/v1/organisations/{org_id}/documents/{document_id}": {
    "get": op("A document", ok("Document", ref("Document")), [ORG, DOC], extra=["404"]),
    "delete": op("Delete a document and its chunks; gone from retrieval at once", {"204": {"description": "Deleted"}}, [ORG, DOC], extra=["404"])},
})
doc = {"openapi": "3.1.0",
       "info": {"title": "kip control plane", "version": "0.1.0", "description": "Admin API of the kip industrial AI platform. Errors always have the body {\"error\": {\"code\", \"message\"}}."},
       "servers": [{"url": "http://127.0.0.1:8080"}],
       "components": {"securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer", "description": "kip API key: kip_<prefix>_<secret>"}}, "schemas": schemas},
       "paths": paths}
out = pathlib.Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
out.write_text(json.dumps(doc, indent=2) + "\n")
agent_doc = {"openapi": "3.1.0",
       "info": {"title": "kip agent API (mTLS)", "version": "0.1.0", "description": "Served on pki.agent_listen_addr: TLS 1.3 only, a client certificate from the fleet CA is required and names the device (URI SAN kip://org/{org_id}/device/{device_id})."},
       "servers": [{"url": "https://127.0.0.1:8443"}],
       "components": {"securitySchemes": {"mtls": {"type": "mutualTLS"}}, "schemas": schemas},
       "paths": agent_paths}
(out.parent / "openapi-agent.json").write_text(json.dumps(agent_doc, indent=2) + "\n")
