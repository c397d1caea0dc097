#!/usr/bin/env bash
# Checks everything under deploy/ and .github/ without a cluster or a Docker engine:
# yamllint, Kustomize rendering of every overlay (kubectl kustomize, else the fallback
# scripts/kustomize-lite.py; both must agree where kubectl exists), kubernetes-validate
# --strict on every rendered manifest, policy checks on the rendered manifests (non-root,
# read-only root, no capabilities, probes, TCP passthrough for agents), hadolint on every
# Dockerfile, the control-plane config in the ConfigMap (--check-config, when the binary is
# built), the systemd unit (systemd-analyze) and the CloudNativePG database manifests
# (deploy/k8s/database: native resources through kubernetes-validate, the operator's CRDs
# through a vendored subset schema). Called by scripts/test.sh.
# KIP_NO_KUBECTL=1 forces the fallback renderer (to test it where kubectl exists).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"
ensure_deploy_tools
ensure_monitoring_tools

PASS=0 FAIL=0
LOG="$(mktemp)"
OUT="$(mktemp -d)"
trap 'rm -rf "$LOG" "$OUT"' EXIT
check() { # check "sentence" command...
    local what="$1"; shift
    if "$@" >"$LOG" 2>&1; then PASS=$((PASS + 1)); say "ok: $what"
    else FAIL=$((FAIL + 1)); say "FAILED: $what"; sed 's/^/    /' "$LOG" >&2; fi
}

check "yamllint accepts deploy/ and .github/" yamllint -s -c .yamllint.yaml deploy .github

for overlay in deploy/k8s/overlays/*/; do
    name="$(basename "$overlay")"
    if [ -z "${KIP_NO_KUBECTL:-}" ] && command -v kubectl >/dev/null; then
        check "kubectl kustomize renders the $name overlay" \
            bash -c "kubectl kustomize '$overlay' > '$OUT/$name.yaml'"
        check "the fallback renderer agrees with kustomize on $name" python3 - "$overlay" "$OUT/$name.yaml" <<'PY'
import subprocess, sys, yaml
lite = subprocess.run([sys.executable, "scripts/kustomize-lite.py", sys.argv[1]], check=True,
                      capture_output=True, text=True).stdout
key = lambda d: (d["kind"], d["metadata"]["name"])
a = {key(d): d for d in yaml.safe_load_all(open(sys.argv[2])) if d}
b = {key(d): d for d in yaml.safe_load_all(lite) if d}
diff = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
sys.exit(f"differ: {sorted(diff)}" if diff else 0)
PY
    else
        check "kustomize-lite renders the $name overlay (no kubectl here)" \
            bash -c "python3 scripts/kustomize-lite.py '$overlay' > '$OUT/$name.yaml'"
    fi
    check "kubernetes-validate --strict accepts the $name overlay" \
        kubernetes-validate --strict --quiet "$OUT/$name.yaml"
    check "the $name overlay follows kip's deployment rules" python3 - "$OUT/$name.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
errors = []
kinds = {}
for d in docs:
    kinds.setdefault(d["kind"], []).append(d)
    spec = d.get("spec", {})
    pod = spec.get("template", {}).get("spec") if d["kind"] in ("Deployment", "Job") else None
    if pod is None:
        continue
    n = f'{d["kind"]}/{d["metadata"]["name"]}'
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        errors.append(f"{n}: pod securityContext.runAsNonRoot must be true")
    if pod.get("automountServiceAccountToken") is not False:
        errors.append(f"{n}: automountServiceAccountToken must be false")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        if not sc.get("readOnlyRootFilesystem"):
            errors.append(f'{n}/{c["name"]}: readOnlyRootFilesystem must be true')
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f'{n}/{c["name"]}: allowPrivilegeEscalation must be false')
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            errors.append(f'{n}/{c["name"]}: capabilities must drop ALL')
        if "memory" not in c.get("resources", {}).get("limits", {}):
            errors.append(f'{n}/{c["name"]}: needs a memory limit')
        if d["kind"] == "Deployment":
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                errors.append(f'{n}/{c["name"]}: liveness probe must be /healthz')
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                errors.append(f'{n}/{c["name"]}: readiness probe must be /readyz')
        if d["kind"] == "Job" and "--migrate-only" not in c.get("args", []):
            errors.append(f"{n}: the migration Job must run --migrate-only")
        if c["image"].endswith(":latest"):
            errors.append(f'{n}/{c["name"]}: overlays must pin the image tag')
for want in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "Job",
             "NetworkPolicy", "Secret", "ConfigMap"):
    if want not in kinds:
        errors.append(f"missing a {want}")
agents = [s for s in kinds.get("Service", []) if any(p["port"] == 8443 for p in s["spec"]["ports"])]
if len(agents) != 1 or agents[0]["spec"]["type"] != "LoadBalancer" or \
        any(p.get("protocol", "TCP") != "TCP" for p in agents[0]["spec"]["ports"]):
    errors.append("the agents need one LoadBalancer Service with TCP 8443")
elif any("ssl" in k or "tls" in k or "cert" in k for k in agents[0]["metadata"].get("annotations", {})):
    errors.append("the agents' Service must not terminate TLS (mTLS is end to end)")
nps = {p["metadata"]["name"]: p["spec"] for p in kinds.get("NetworkPolicy", [])}
deny = nps.get("default-deny-all", {})
if deny.get("podSelector") != {} or sorted(deny.get("policyTypes", [])) != ["Egress", "Ingress"]:
    errors.append("a default-deny-all NetworkPolicy for ingress and egress is required")
scrape = nps.get("monitoring-scrape", {})
if [p["port"] for r in scrape.get("ingress", []) for p in r.get("ports", [])] != [8080] or \
        not any(f.get("namespaceSelector", {}).get("matchLabels", {}).get("kip.io/network") == "monitoring"
                for r in scrape.get("ingress", []) for f in r.get("from", [])):
    errors.append("the monitoring namespace (kip.io/network=monitoring) must reach 8080 (/metrics) and nothing else")
site = nps.get("site-operations-agents", {})
if [p["port"] for r in site.get("ingress", []) for p in r.get("ports", [])] != [8443]:
    errors.append("agents (ISA-95 level 3) may reach port 8443 only")
sys.exit("\n".join(errors) if errors else 0)
PY
    # Logs (issue #16): the Fluent Bit DaemonSet ships the control plane's ECS lines.
    check "the $name overlay ships ECS logs to Elasticsearch (Fluent Bit DaemonSet)" python3 - "$OUT/$name.yaml" <<'PY'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errors = []
ds = by.get(("DaemonSet", "kip-fluent-bit"))
cm = by.get(("ConfigMap", "kip-fluent-bit"), {}).get("data", {})
cp = by.get(("ConfigMap", "kip-control-plane-config"), {}) or next(
    (d for d in docs if d["kind"] == "ConfigMap" and "control-plane.toml" in d.get("data", {})), {})
if ds is None:
    sys.exit("no DaemonSet kip-fluent-bit")
pod = ds["spec"]["template"]["spec"]
if pod.get("automountServiceAccountToken") is not False:
    errors.append("fluent-bit: automountServiceAccountToken must be false")
for c in pod["containers"]:
    sc = c.get("securityContext", {})
    if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False \
            or sc.get("capabilities", {}).get("drop") != ["ALL"]:
        errors.append("fluent-bit: read-only root, no privilege escalation, drop ALL capabilities")
    if "memory" not in c.get("resources", {}).get("limits", {}):
        errors.append("fluent-bit: needs a memory limit")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/api/v1/health":
        errors.append("fluent-bit: liveness probe must be /api/v1/health")
    if c["image"].endswith(":latest") or ":" not in c["image"]:
        errors.append("fluent-bit: pin the image tag")
    for m in c.get("volumeMounts", []):
        if m["mountPath"] == "/var/log" and not m.get("readOnly"):
            errors.append("fluent-bit: /var/log must be mounted read-only")
conf = cm.get("fluent-bit.conf", "")
for want in (r"Name\s+tail", r"Name\s+es\b", r"Logstash_Prefix\s+kip-logs", r"Parser\s+ecs_json",
             r"tls\.verify\s+On", r"HTTP_Passwd\s+\$\{ES_PASSWORD\}"):
    if not re.search(want, conf):
        errors.append(f"fluent-bit.conf lacks {want}")
toml = cp.get("data", {}).get("control-plane.toml", "")
if not re.search(r'^\s*format\s*=\s*"ecs"', toml, re.M):
    errors.append('the control plane must log with [log] format = "ecs" for the shipper')
if "log-shipping-egress" not in {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"}:
    errors.append("no log-shipping-egress NetworkPolicy (default-deny blocks Elasticsearch)")
sys.exit("\n".join(errors) if errors else 0)
PY
done
# The database (issue #17): CloudNativePG Cluster + Pooler. kubernetes-validate has no schema
# for the operator's CRDs: native resources go through it, the Cluster and Pooler through
# the vendored subset schema (deploy/k8s/database/schema/, unknown fields refused) and kip's
# rules for the database.
DB=deploy/k8s/database
if [ -z "${KIP_NO_KUBECTL:-}" ] && command -v kubectl >/dev/null; then
    check "kubectl kustomize renders $DB" bash -c "kubectl kustomize '$DB' > '$OUT/database.yaml'"
else
    check "kustomize-lite renders $DB (no kubectl here)" \
        bash -c "python3 scripts/kustomize-lite.py '$DB' > '$OUT/database.yaml'"
fi
check "kubernetes-validate --strict accepts the database's native resources" bash -c "
    python3 -c 'import sys, yaml; docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and not d[\"apiVersion\"].startswith(\"postgresql.cnpg.io/\")]; yaml.safe_dump_all(docs, open(sys.argv[2], \"w\"))' \
        '$OUT/database.yaml' '$OUT/database-native.yaml' &&
    kubernetes-validate --strict --quiet '$OUT/database-native.yaml'"
check "the CloudNativePG resources match the CRD subset schema and kip's database rules" \
    python3 - "$OUT/database.yaml" "$DB/schema/cnpg-subset.schema.json" <<'PY'
import json, sys, yaml
import jsonschema
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
schema = json.load(open(sys.argv[2]))
errors = []
by = {}
for d in docs:
    by.setdefault(d["kind"], []).append(d)
    if d["apiVersion"].startswith("postgresql.cnpg.io/"):
        sub = dict(schema["$defs"].get(d["kind"], {"not": {}}), **{"$defs": schema["$defs"]})
        for e in jsonschema.Draft202012Validator(sub).iter_errors(d):
            errors.append(f'{d["kind"]}/{d["metadata"]["name"]}: {"/".join(map(str, e.path))}: {e.message}')
clusters, poolers = by.get("Cluster", []), by.get("Pooler", [])
if len(clusters) != 1:
    errors.append("exactly one CloudNativePG Cluster expected")
else:
    c = clusters[0]; spec = c["spec"]
    if spec.get("instances", 0) < 3:
        errors.append("the Cluster needs 3 instances (primary + 2 standbys)")
    if spec.get("minSyncReplicas", 0) < 1:
        errors.append("minSyncReplicas >= 1: an acknowledged batch must be on two nodes")
    if "timescaledb" not in spec.get("postgresql", {}).get("shared_preload_libraries", []):
        errors.append("timescaledb must be in shared_preload_libraries")
    img = spec.get("imageName", "")
    if ":" not in img or img.endswith(":latest"):
        errors.append("pin the PostgreSQL image tag")
    if spec.get("inheritedMetadata", {}).get("labels", {}).get("app.kubernetes.io/name") != "postgresql":
        errors.append("instance pods need app.kubernetes.io/name=postgresql (the control plane's egress policy)")
    if spec.get("affinity", {}).get("podAntiAffinityType") != "required":
        errors.append("instances must be on different nodes (podAntiAffinityType: required)")
    ns = {n["metadata"]["name"]: n for n in by.get("Namespace", [])}.get(c["metadata"]["namespace"])
    if not ns or ns["metadata"].get("labels", {}).get("kip.io/zone") != "data":
        errors.append("the Cluster's namespace must exist here with label kip.io/zone=data")
    for p in poolers:
        if p["spec"]["cluster"]["name"] != c["metadata"]["name"]:
            errors.append(f'Pooler/{p["metadata"]["name"]} points at another cluster')
        if p["spec"].get("template", {}).get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name") != "postgresql":
            errors.append(f'Pooler/{p["metadata"]["name"]}: pods need app.kubernetes.io/name=postgresql')
if not any(p["spec"].get("type") == "rw" for p in poolers):
    errors.append("a Pooler of type rw (the control plane's endpoint) is required")
sys.exit("\n".join(errors) if errors else 0)
PY

check "the Elasticsearch ILM policy and index template for kip logs agree" python3 - <<'PY'
import json, sys
ilm = json.load(open("deploy/logging/ilm-policy.json"))["policy"]["phases"]
tpl = json.load(open("deploy/logging/index-template.json"))
errors = []
if tpl["template"]["settings"].get("index.lifecycle.name") != "kip-logs":
    errors.append("the index template must attach the ILM policy kip-logs")
if tpl["index_patterns"] != ["kip-logs-*"]:
    errors.append("the index template must match Fluent Bit's kip-logs-* indices")
if "delete" not in ilm.get("delete", {}).get("actions", {}):
    errors.append("the ILM policy must delete old indices (retention)")
sys.exit("\n".join(errors) if errors else 0)
PY

# Monitoring (issue #16): alert rules and their unit tests, the Prometheus config.
MON=deploy/monitoring/prometheus
check "promtool check rules accepts the alert rules" promtool check rules "$MON/kip-alerts.yml"
check "promtool test rules: every alert fires and stays quiet where it should" \
    bash -c "cd '$MON/tests' && promtool test rules kip-alerts.test.yml"
check "every alert of kip-alerts.yml has a firing and a quiet unit test" python3 - "$MON" <<'PY'
import sys, yaml
d = sys.argv[1]
alerts = {r["alert"] for g in yaml.safe_load(open(f"{d}/kip-alerts.yml"))["groups"] for r in g["rules"] if "alert" in r}
fired, quiet = set(), set()
for t in yaml.safe_load(open(f"{d}/tests/kip-alerts.test.yml"))["tests"]:
    for a in t.get("alert_rule_test", []):
        (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
missing = [f"{a}: no firing test" for a in sorted(alerts - fired)] + [f"{a}: no quiet test" for a in sorted(alerts - quiet)]
sys.exit("\n".join(missing) if missing else 0)
PY
check "promtool check config accepts the Prometheus config" promtool check config "$MON/prometheus.yml"
check "Grafana dashboards are valid JSON and every panel's PromQL parses (promtool)" python3 - <<'PY'
import glob, json, re, subprocess, sys, tempfile, yaml
errors, rules = [], []
for path in sorted(glob.glob("deploy/monitoring/grafana/dashboards/*.json")):
    try:
        d = json.load(open(path))
    except ValueError as e:
        errors.append(f"{path}: not JSON: {e}"); continue
    for k in ("uid", "title", "panels"):
        if k not in d: errors.append(f"{path}: no {k}")
    for p in d.get("panels", []):
        if not p.get("targets"): errors.append(f"{path}: panel {p.get('title')!r} has no query")
        for t in p.get("targets", []):
            # Grafana's variables, as Prometheus would see them after substitution.
            expr = re.sub(r"\$__rate_interval|\$__interval|\$__range", "5m", t["expr"])
            expr = re.sub(r"\$\{?(\w+)\}?", "x", expr)
            rules.append({"record": f"kip:dashboard:{len(rules)}", "expr": expr})
            rules[-1]["labels"] = {"panel": f"{path}: {p.get('title')}"}
if not rules: errors.append("no dashboard queries found")
with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
    yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, f); f.flush()
    r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    if r.returncode: errors.append(r.stdout + r.stderr)
sys.exit("\n".join(errors) if errors else 0)
PY

while IFS= read -r dockerfile; do
    check "hadolint accepts $dockerfile" hadolint "$dockerfile"
done < <(find . -path ./target -prune -o \( -name Dockerfile -o -name '*.Dockerfile' \) -print | sort)

CP="${CARGO_TARGET_DIR:-$KIP_ROOT/target}"
CPBIN=""
for p in "$CP/debug/kip-control-plane" "$CP/release/kip-control-plane"; do [ -x "$p" ] && CPBIN="$p" && break; done
if [ -n "$CPBIN" ]; then
    python3 -c 'import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); open(sys.argv[2], "w").write(d["data"]["control-plane.toml"])' \
        deploy/k8s/base/configmap.yaml "$OUT/control-plane.toml"
    check "the control plane accepts the ConfigMap's config" \
        env -u KIP_DATABASE_URL "$CPBIN" --config "$OUT/control-plane.toml" --check-config
else
    say "skipped: ConfigMap config check (no kip-control-plane binary built yet)"
fi

if command -v systemd-analyze >/dev/null; then
    # Parse problems are reported as FILE:LINE: ...; the missing /opt/kip-agent launcher on a
    # build machine is expected and reported differently.
    check "systemd-analyze finds no problem in the agent unit" bash -c '
        out="$(systemd-analyze verify deploy/systemd/kip-agent.service 2>&1 || true)"
        ! echo "$out" | grep -E "kip-agent\.service:[0-9]+:"'
fi

echo "deploy checks: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
