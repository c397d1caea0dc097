import json, sys
# Generates deploy/monitoring/grafana/dashboards/*.json (run from deploy/monitoring/grafana;
# edit here, regenerate, commit both). Checked by scripts/check-deploy.sh and
# control-plane/tests/dashboards.rs.
DS = {"type": "prometheus", "uid": "kip-prometheus"}
def panel(pid, title, exprs, x, y, w=12, h=8, kind="timeseries", unit=None, legend=None, desc=None):
    p = {"id": pid, "type": kind, "title": title, "datasource": DS,
         "gridPos": {"x": x, "y": y, "w": w, "h": h},
         "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": (legend[i] if legend else "__auto"), "datasource": DS}
                     for i, e in enumerate(exprs)],
         "fieldConfig": {"defaults": {}, "overrides": []}, "options": {}}
    if unit: p["fieldConfig"]["defaults"]["unit"] = unit
    if desc: p["description"] = desc
    if kind == "table":
        for t in p["targets"]:
            t["format"] = "table"; t["instant"] = True
    return p
def var(name, query, label=None, multi=False):
    return {"name": name, "label": label or name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": "v"}, "definition": query, "refresh": 2,
            "includeAll": multi, "multi": multi, "current": {}, "options": [], "sort": 1}
def dash(uid, title, panels, variables=(), desc=""):
    return {"uid": uid, "title": title, "description": desc, "tags": ["kip"], "timezone": "utc",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "panels": panels,
            "templating": {"list": list(variables)}, "annotations": {"list": []}, "links": []}
out = {}
org = var("org", "label_values(kip_fleet_devices, org)", "organisation", multi=True)
out["kip-fleet"] = dash("kip-fleet", "kip / Fleet overview", [
    panel(1, "Devices online", ['sum(kip_fleet_devices{org=~"$org",state="online"})'], 0, 0, 6, 4, "stat"),
    panel(2, "Devices stale", ['sum(kip_fleet_devices{org=~"$org",state="stale"})'], 6, 0, 6, 4, "stat"),
    panel(3, "Devices offline", ['sum(kip_fleet_devices{org=~"$org",state="offline"})'], 12, 0, 6, 4, "stat"),
    panel(4, "Firing kip alerts", ['count(ALERTS{alertstate="firing",alertname=~"Kip.*"}) or vector(0)'], 18, 0, 6, 4, "stat"),
    panel(5, "Devices by state", ['sum by (state) (kip_fleet_devices{org=~"$org"})'], 0, 4, 12, 8, legend=["{{state}}"]),
    panel(6, "Longest silence (worst devices)", ['kip_fleet_worst_seconds_since_contact{org=~"$org"}'], 12, 4, 12, 8, unit="s", legend=["{{org}}/{{device}}"]),
    panel(7, "Oldest unsynced record (worst devices)", ['kip_fleet_worst_oldest_unsynced_seconds{org=~"$org"}'], 0, 12, 12, 8, unit="s", legend=["{{org}}/{{device}}"]),
    panel(8, "Buffer fill (worst devices)", ['kip_fleet_worst_buffer_fill_ratio{org=~"$org"}'], 12, 12, 12, 8, unit="percentunit", legend=["{{org}}/{{device}}"]),
    panel(9, "Disk free on the state volume (worst devices)", ['kip_fleet_worst_disk_free_ratio{org=~"$org"}'], 0, 20, 8, 8, unit="percentunit", legend=["{{org}}/{{device}}"]),
    panel(10, "Certificate expiry (worst devices)", ['kip_fleet_worst_cert_expiry_seconds{org=~"$org"}'], 8, 20, 8, 8, unit="s", legend=["{{org}}/{{device}}"]),
    panel(11, "Clock offset (worst devices)", ['kip_fleet_worst_clock_offset_seconds{org=~"$org"}'], 16, 20, 8, 8, unit="s", legend=["{{org}}/{{device}}"]),
    panel(12, "CA expiry", ['kip_pki_ca_expiry_seconds'], 0, 28, 12, 8, unit="s", legend=["{{ca}}"]),
    panel(13, "Devices by issuing intermediate", ['sum by (issuer) (kip_pki_devices_by_issuer)'], 12, 28, 12, 8, legend=["{{issuer}}"]),
], [org], "Fleet health from the agents' reports: states, worst-N devices per signal, PKI.")
dev_org = var("org", "label_values(kip_device_online, org)", "organisation")
dev = var("device", 'label_values(kip_device_online{org="$org"}, device)', "device")
sel = 'org="$org",device="$device"'
out["kip-device"] = dash("kip-device", "kip / Device", [
    panel(1, "Online", [f'kip_device_online{{{sel}}}'], 0, 0, 6, 4, "stat"),
    panel(2, "Since last contact", [f'kip_device_seconds_since_contact{{{sel}}}'], 6, 0, 6, 4, "stat", unit="s"),
    panel(3, "Certificate expires in", [f'kip_device_cert_expiry_seconds{{{sel}}}'], 12, 0, 6, 4, "stat", unit="s"),
    panel(4, "Clock offset", [f'kip_device_clock_offset_seconds{{{sel}}}'], 18, 0, 6, 4, "stat", unit="s"),
    panel(5, "Oldest unsynced record (sync lag)", [f'kip_device_oldest_unsynced_seconds{{{sel}}}'], 0, 4, 12, 8, unit="s"),
    panel(6, "Buffer fill", [f'kip_device_buffer_fill_ratio{{{sel}}}'], 12, 4, 12, 8, unit="percentunit"),
    panel(7, "Disk free on the state volume", [f'kip_device_disk_free_ratio{{{sel}}}'], 0, 12, 12, 8, unit="percentunit"),
    panel(8, "Model drift and inference errors", [f'kip_device_model_drift{{{sel}}}', f'kip_device_inference_errors{{{sel}}}'], 12, 12, 12, 8, legend=["drift", "inference errors"]),
], [dev_org, dev], "One device (needs health.per_device_metrics = true on the control plane).")
out["kip-data-path"] = dash("kip-data-path", "kip / Data path", [
    panel(1, "Records stored /s", ['sum(rate(kip_ingest_records_total[$__rate_interval]))'], 0, 0, 8, 8, unit="ops"),
    panel(2, "Duplicate records /s (replays)", ['sum(rate(kip_ingest_duplicate_records_total[$__rate_interval]))'], 8, 0, 8, 8, unit="ops"),
    panel(3, "Sync batches by result", ['sum by (result) (rate(kip_ingest_batches_total[$__rate_interval]))'], 16, 0, 8, 8, unit="ops", legend=["{{result}}"]),
    panel(4, "Refused batches by reason", ['sum by (reason) (rate(kip_ingest_rejected_total[$__rate_interval]))'], 0, 8, 12, 8, unit="ops", legend=["{{reason}}"]),
    panel(5, "Ingest lag: oldest unsynced record in the fleet", ['max(kip_fleet_worst_oldest_unsynced_seconds)'], 12, 8, 12, 8, unit="s"),
    panel(6, "Admin API p99 latency by route", ['histogram_quantile(0.99, sum by (route, le) (rate(kip_http_request_duration_seconds_bucket[$__rate_interval])))'], 0, 16, 12, 8, unit="s", legend=["{{route}}"]),
    panel(7, "Admin API requests by status", ['sum by (status) (rate(kip_http_requests_total[$__rate_interval]))'], 12, 16, 12, 8, unit="reqps", legend=["{{status}}"]),
    panel(8, "Buffer fill (worst devices)", ['kip_fleet_worst_buffer_fill_ratio'], 0, 24, 12, 8, unit="percentunit", legend=["{{org}}/{{device}}"]),
    panel(9, "Fleet metrics refreshed", ['time() - kip_fleet_health_refreshed_unix_seconds'], 12, 24, 12, 8, unit="s", legend=["{{instance}}"]),
], [], "Ingest, sync and storage: what arrives, what is refused, how far behind the edge is.")
out["kip-pdm"] = dash("kip-pdm", "kip / Predictive maintenance", [
    panel(1, "Model drift (worst devices)", ['kip_fleet_worst_model_drift'], 0, 0, 12, 8, legend=["{{org}}/{{device}}"], desc="Agents that compute a drift score report it with their health."),
    panel(2, "Inference errors in the last hour (worst devices)", ['delta(kip_fleet_worst_inference_errors[1h])'], 12, 0, 12, 8, legend=["{{org}}/{{device}}"]),
    panel(3, "Records stored /s (readings and predictions)", ['sum(rate(kip_ingest_records_total[$__rate_interval]))'], 0, 8, 12, 8, unit="ops"),
    panel(4, "Model registry mirror failures", ['increase(kip_mlflow_sync_failures_total[1h])'], 12, 8, 12, 8),
    panel(5, "Rollout calls (desired model, stage changes)", ['sum by (route, status) (rate(kip_http_requests_total{route=~".*/(desired-model|stage|model-status)"}[$__rate_interval]))'], 0, 16, 24, 8, unit="reqps", legend=["{{route}} {{status}}"]),
], [], "Predictions, drift and rollouts.")
prov = var("provider", "label_values(kip_llm_provider_requests_total, provider)", "provider", multi=True)
out["kip-llm"] = dash("kip-llm", "kip / LLM gateway", [
    panel(1, "Requests by provider and status", ['sum by (provider, status) (rate(kip_llm_provider_requests_total{provider=~"$provider"}[$__rate_interval]))'], 0, 0, 12, 8, unit="reqps", legend=["{{provider}} {{status}}"]),
    panel(2, "Error ratio by provider", ['sum by (provider) (rate(kip_llm_provider_requests_total{provider=~"$provider",status!~"ok|fallback|client_closed"}[$__rate_interval])) / sum by (provider) (rate(kip_llm_provider_requests_total{provider=~"$provider"}[$__rate_interval]))'], 12, 0, 12, 8, unit="percentunit", legend=["{{provider}}"]),
    panel(3, "Latency p50 / p99 (gen_ai.client.operation.duration)", ['histogram_quantile(0.5, sum by (provider, le) (rate(kip_llm_provider_latency_seconds_bucket{provider=~"$provider"}[$__rate_interval])))', 'histogram_quantile(0.99, sum by (provider, le) (rate(kip_llm_provider_latency_seconds_bucket{provider=~"$provider"}[$__rate_interval])))'], 0, 8, 12, 8, unit="s", legend=["p50 {{provider}}", "p99 {{provider}}"]),
    panel(4, "Time to first token p99 (gen_ai.server.time_to_first_token)", ['histogram_quantile(0.99, sum by (provider, le) (rate(kip_llm_provider_ttft_seconds_bucket{provider=~"$provider"}[$__rate_interval])))'], 12, 8, 12, 8, unit="s", legend=["{{provider}}"]),
    panel(5, "Tokens /s by type (gen_ai.client.token.usage)", ['sum by (provider, kind) (rate(kip_llm_tokens_total{provider=~"$provider"}[$__rate_interval]))'], 0, 16, 12, 8, legend=["{{provider}} {{kind}}"]),
    panel(6, "Spend (USD per hour)", ['sum by (provider) (rate(kip_llm_cost_usd_total{provider=~"$provider"}[1h])) * 3600'], 12, 16, 12, 8, unit="currencyUSD", legend=["{{provider}}"]),
    panel(7, "Cache hit ratio", ['sum(rate(kip_llm_cache_hits_total[$__rate_interval])) / (sum(rate(kip_llm_cache_hits_total[$__rate_interval])) + sum(rate(kip_llm_cache_misses_total[$__rate_interval])))'], 0, 24, 8, 8, unit="percentunit"),
    panel(8, "Refused before any provider call", ['sum by (status) (rate(kip_llm_refused_total[$__rate_interval]))'], 8, 24, 8, 8, unit="reqps", legend=["{{status}}"]),
    panel(9, "Circuit breakers (0 closed, 2 open)", ['kip_llm_breaker_state{provider=~"$provider"}'], 16, 24, 8, 8, legend=["{{provider}}"]),
    panel(10, "Log rows dropped /s", ['rate(kip_llm_log_rows_dropped_total[$__rate_interval])'], 0, 32, 12, 8, unit="ops"),
    panel(11, "Monthly budget used, per organisation", ['kip_llm_budget_used_ratio'], 12, 32, 12, 8, unit="percentunit", legend=["{{org}}"], desc="Month-to-date spend / monthly budget (organisations with a budget); alert KipLlmBudgetNearlySpent above 90%."),
], [prov], "Per provider: latency, errors, tokens, cost, cache; budget used per organisation. Panel titles name the OpenTelemetry GenAI metric each corresponds to. Per-organisation usage and spend in detail are in the console (inference_logs).")
for name, d in out.items():
    with open(f"dashboards/{name}.json", "w") as f:
        json.dump(d, f, indent=2); f.write("\n")
