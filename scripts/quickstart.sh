#!/usr/bin/env bash
# Brings up the whole kip platform on this machine, with progress messages:
#   PostgreSQL (started or found), a fleet CA (.kip/ca), the control plane (database and
#   schema created on first start), an organisation "acme" with an organisation key, one
#   enrolled edge agent, Mosquitto (the local broker, or one started here), and a simulated
#   AIX Aleph machine replaying NASA C-MAPSS FD001 trajectories over MQTT to the agent.
# The LLM API answers without provider keys (labelled local fallback).
# Ctrl-C (or SIGTERM) stops every process this script started, and waits for them.
# Everything lives in .kip/ (keys 0600); a second run reuses it. Logs: .kip/logs/.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

STATE="$KIP_ROOT/.kip"
LOGS="$STATE/logs"
CP_ADDR="${KIP_LISTEN_ADDR:-127.0.0.1:8080}"
AGENT_MTLS_ADDR="${KIP_AGENT_LISTEN_ADDR:-127.0.0.1:8443}"
AGENT_HTTP_ADDR="${KIP_AGENT_HTTP_ADDR:-127.0.0.1:9464}"
PROM_ADDR="${KIP_PROMETHEUS_ADDR:-127.0.0.1:9090}"
MQTT_PORT="${KIP_MQTT_PORT:-1883}"
ORG=acme
DEVICE=aleph-gw-1
SIM_UNITS="${KIP_SIM_UNITS:-1,2}"
SIM_INTERVAL_MS="${KIP_SIM_INTERVAL_MS:-1000}"
mkdir -p "$STATE" "$LOGS"
chmod 0700 "$STATE"

PIDS=()      # started here, in start order; stopped in reverse
NAMES=()
stopping=0
stop_all() {
    [ "$stopping" = 1 ] && return
    stopping=1
    trap - INT TERM
    say "stopping (Ctrl-C)"
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        if kill -0 "${PIDS[$i]}" 2>/dev/null; then
            say "  stopping ${NAMES[$i]} (pid ${PIDS[$i]})"
            kill -TERM "${PIDS[$i]}" 2>/dev/null || true
            # Reverse order: each waits for the one before to finish (buffers flush, the
            # control plane drains in-flight requests).
            for _ in $(seq 1 150); do kill -0 "${PIDS[$i]}" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "${PIDS[$i]}" 2>/dev/null || true
            wait "${PIDS[$i]}" 2>/dev/null || true
        fi
    done
    say "all stopped"
    exit 0
}
trap stop_all INT TERM
trap 'status=$?; [ "$stopping" = 1 ] || { stopping=0; [ ${#PIDS[@]} -eq 0 ] || stop_all; }; exit $status' EXIT

start() { # start NAME LOGFILE COMMAND...
    local name="$1" log="$2"; shift 2
    "$@" >"$log" 2>&1 &
    PIDS+=("$!")
    NAMES+=("$name")
}

wait_http() { # wait_http NAME URL PID LOG
    for _ in $(seq 1 240); do
        curl -fsS -o /dev/null "$2" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { tail -n 30 "$4" >&2; die "$1 exited during start (log: $4)"; }
        sleep 0.25
    done
    tail -n 30 "$4" >&2
    die "$1 does not answer at $2 (log: $4)"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

say "1/9 PostgreSQL"
ensure_postgres
say "2/9 Mosquitto and ONNX Runtime"
ensure_mosquitto
ensure_ort
ensure_monitoring_tools
ensure_pgvector
# sensor_data becomes a TimescaleDB hypertable when the server loads TimescaleDB at the
# migration (a database migrated earlier without it keeps native partitions).
ensure_timescaledb
ensure_timescaledb_preloaded
ensure_embedding_model
export ORT_DYLIB_PATH
command -v curl >/dev/null || ensure_packages curl

say "3/9 building kip (release; the first build takes a while)"
cargo build --release --locked -p kip-control-plane -p kipctl -p kip-agent -p kip-sim
BIN="${CARGO_TARGET_DIR:-$KIP_ROOT/target}/release"
KIPCTL="$BIN/kipctl"

say "4/9 fleet CA ($STATE/ca)"
if [ ! -f "$STATE/ca/root.crt" ]; then
    "$KIPCTL" ca init --dir "$STATE/ca" >&2
else
    say "  reusing the existing CA"
fi

say "5/9 control plane on http://$CP_ADDR (agents: mTLS on $AGENT_MTLS_ADDR)"
export KIP_DATABASE_URL="${KIP_DATABASE_URL:-$KIP_PG_URL/kip}"
export KIP_ADMIN_KEY_FILE="${KIP_ADMIN_KEY_FILE:-$STATE/admin.key}"
export KIP_PKI_CA_DIR="$STATE/ca"
export KIP_LOG_FORMAT="${KIP_LOG_FORMAT:-text}"
port_open "${CP_ADDR%:*}" "${CP_ADDR##*:}" && die "something already listens on $CP_ADDR (another quickstart?); stop it or set KIP_LISTEN_ADDR"
RESET=()
if [ ! -f "$KIP_ADMIN_KEY_FILE" ] && psql "$KIP_DATABASE_URL" -Atqc \
        "SELECT 1 FROM api_keys WHERE scope = 'platform' AND revoked_at IS NULL LIMIT 1" 2>/dev/null | grep -q 1; then
    # The database outlived .kip/ (a fresh checkout, or .kip removed): issue a new admin key.
    say "  the database has a platform-admin key but $KIP_ADMIN_KEY_FILE is missing: issuing a new one"
    RESET=(--reset-admin-key)
fi
start control-plane "$LOGS/control-plane.log" env KIP_LISTEN_ADDR="$CP_ADDR" KIP_AGENT_LISTEN_ADDR="$AGENT_MTLS_ADDR" \
    "$BIN/kip-control-plane" --config "$KIP_ROOT/deploy/quickstart.toml" "${RESET[@]}"
wait_http "the control plane" "http://$CP_ADDR/readyz" "${PIDS[-1]}" "$LOGS/control-plane.log"
say "  sensor_data layout: $(psql "$KIP_DATABASE_URL" -Atqc "SELECT kip_ts_layout('sensor_data')")"
export KIP_URL="http://$CP_ADDR"

say "6/9 organisation '$ORG', its key ($STATE/org.key) and agent '$DEVICE'"
admin() { KIP_API_KEY_FILE="$KIP_ADMIN_KEY_FILE" "$KIPCTL" --server "$KIP_URL" "$@"; }
if ! admin org get "$ORG" >/dev/null 2>&1; then
    admin org create "$ORG" --display-name "ACME Manufacturing" >&2
fi
if [ -s "$STATE/org.key" ] && ! KIP_API_KEY_FILE="$STATE/org.key" "$KIPCTL" --server "$KIP_URL" whoami >/dev/null 2>&1; then
    say "  $STATE/org.key is not valid for this database: creating a new one"
    rm -f "$STATE/org.key"
fi
if [ ! -s "$STATE/org.key" ]; then
    (umask 077; admin --org "$ORG" key create quickstart | head -n1 > "$STATE/org.key")
fi
org() { KIP_API_KEY_FILE="$STATE/org.key" "$KIPCTL" --server "$KIP_URL" "$@"; }
AGENT_STATE="$STATE/agent"
MODEL_PATH="$(ls "$KIP_ROOT"/ml/models/*.onnx | head -n1)"
cat > "$STATE/agent.toml" <<TOML
# Written by scripts/quickstart.sh: the demo agent reading the simulated Aleph machines.
[agent]
device = "$DEVICE"
state_dir = "$AGENT_STATE"

[http]
listen_addr = "$AGENT_HTTP_ADDR"

[log]
format = "text"
filter = "info"

# The demo broker is plain MQTT on loopback (an isolated network of one machine): opt out of
# the TLS requirement explicitly.
[security]
require_secure_ot = false

[[mqtt]]
name = "local-broker"
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "kip-$DEVICE"

# aleph/<machine>/<metric>, JSON {"v": value, "ts": epoch_ms} (scripts: kip-sim).
[[mqtt.subscriptions]]
topic = "aleph/+/+"
machine_topic_level = 1
metric_topic_level = 2
value = { kind = "json", pointer = "/v", timestamp_pointer = "/ts" }

# Answer AIX Aleph's live-value questions on kip/v1/<org>/$DEVICE/live/req.
[live_query]
broker = "local-broker"

# Sync to the control plane's mTLS agent listener (certificate from the enrollment below).
[sync]
endpoints = ["https://$AGENT_MTLS_ADDR"]
# An idle agent still reports its health this often (the control plane's [health] windows).
heartbeat_interval_s = 10

# Remaining-useful-life predictions on the simulated engines with the shipped model.
[inference]
enabled = true
ort_library = "$ORT_DYLIB_PATH"
model_path = "$MODEL_PATH"
TOML
if [ ! -f "$AGENT_STATE/identity/device.pem" ]; then
    TOKEN="$(org device enroll-token --ttl 10m --device-name "$DEVICE" | head -n1)"
    KIP_ENROLL_TOKEN="$TOKEN" "$BIN/kip-agent" enroll --config "$STATE/agent.toml" --server "$KIP_URL" >&2
else
    say "  reusing the agent's identity in $AGENT_STATE/identity"
fi

say "7/9 MQTT broker on 127.0.0.1:$MQTT_PORT and the agent (http://$AGENT_HTTP_ADDR)"
if port_open 127.0.0.1 "$MQTT_PORT"; then
    say "  using the broker already listening on port $MQTT_PORT"
else
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$MQTT_PORT" > "$STATE/mosquitto.conf"
    start mosquitto "$LOGS/mosquitto.log" mosquitto -c "$STATE/mosquitto.conf"
    for _ in $(seq 1 40); do port_open 127.0.0.1 "$MQTT_PORT" && break; sleep 0.25; done
    port_open 127.0.0.1 "$MQTT_PORT" || die "mosquitto did not start (log: $LOGS/mosquitto.log)"
fi
start agent "$LOGS/agent.log" "$BIN/kip-agent" run --config "$STATE/agent.toml"
wait_http "the agent" "http://$AGENT_HTTP_ADDR/healthz" "${PIDS[-1]}" "$LOGS/agent.log"

say "8/9 simulated AIX Aleph machines (C-MAPSS FD001 units $SIM_UNITS, one cycle every ${SIM_INTERVAL_MS} ms)"
start kip-sim "$LOGS/kip-sim.log" "$BIN/kip-sim" --broker "mqtt://127.0.0.1:$MQTT_PORT" \
    --data "$KIP_ROOT/ml/data/train_FD001.txt" --units "$SIM_UNITS" --interval-ms "$SIM_INTERVAL_MS"

say "9/9 Prometheus on http://$PROM_ADDR with kip's alert rules (deploy/monitoring/prometheus)"
if port_open "${PROM_ADDR%:*}" "${PROM_ADDR##*:}"; then
    say "  something already listens on $PROM_ADDR: not starting Prometheus"
else
    MON="$KIP_ROOT/deploy/monitoring/prometheus"
    sed -e "s#\"127.0.0.1:8080\"#\"$CP_ADDR\"#" -e "s#- kip-alerts.yml#- $MON/kip-alerts.yml#" \
        -e "s#scrape_interval: 15s#scrape_interval: 5s#" -e "s#evaluation_interval: 15s#evaluation_interval: 5s#" \
        "$MON/prometheus.yml" > "$STATE/prometheus.yml"
    start prometheus "$LOGS/prometheus.log" prometheus --config.file="$STATE/prometheus.yml" \
        --storage.tsdb.path="$STATE/prometheus" --web.listen-address="$PROM_ADDR"
    wait_http prometheus "http://$PROM_ADDR/-/ready" "${PIDS[-1]}" "$LOGS/prometheus.log"
fi

cat >&2 <<MSG

  kip is running.
  control plane   http://$CP_ADDR   (health /healthz, metrics /metrics, API /openapi.json)
  admin key       $KIP_ADMIN_KEY_FILE        organisation key ($ORG)  $STATE/org.key
  fleet CA        $STATE/ca                 agents' mTLS listener     $AGENT_MTLS_ADDR
  agent           $DEVICE   http://$AGENT_HTTP_ADDR/healthz  /metrics   config $STATE/agent.toml
  machines        aleph-01.. on mqtt://127.0.0.1:$MQTT_PORT topics aleph/<machine>/<metric>
  console         http://$CP_ADDR/console   (sign in with the key in $STATE/org.key)
  alerts          http://$PROM_ADDR/alerts  (Prometheus with deploy/monitoring/prometheus/kip-alerts.yml)
  logs            $LOGS/

  try:
    KIP_API_KEY_FILE=$STATE/org.key $KIPCTL device list
    KIP_API_KEY_FILE=$STATE/org.key $KIPCTL device health
    $BIN/kip-agent status --config $STATE/agent.toml
    curl -s http://$AGENT_HTTP_ADDR/predictions/latest
    curl -s http://$CP_ADDR/v1/chat/completions -H "authorization: Bearer \$(cat $STATE/org.key)" \\
         -H 'content-type: application/json' \\
         -d '{"model":"smart","messages":[{"role":"user","content":"How is press line 1?"}]}'
    curl -s http://$CP_ADDR/v1/query -H "authorization: Bearer \$(cat $STATE/org.key)" \\
         -H 'content-type: application/json' \\
         -d '{"task":"machine_status","messages":[{"role":"user","content":"How is aleph-01?"}]}'
    (AIX Aleph: live values from the agent over MQTT, synced data when it does not answer)
    (no provider API keys are configured: answers come from the labelled local fallback;
     set OPENAI_API_KEY or DEEPSEEK_API_KEY and add providers in deploy/quickstart.toml)

  stop: Ctrl-C
MSG

# Wait until a child exits (then stop the rest) or a signal arrives.
while :; do
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
            say "${NAMES[$i]} exited; see $LOGS/${NAMES[$i]}.log"
            stop_all
        fi
    done
    sleep 1 &
    wait $! || true
done
