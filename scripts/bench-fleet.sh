#!/usr/bin/env bash
# One control-plane replica under a simulated fleet (issue #17, "Thousands of gateways"):
# starts the real kip-control-plane binary on a bench database, then kip-fleet-sim with N
# enrolled agents for DURATION_S seconds, sampling the control plane's CPU and RSS (/proc)
# and PostgreSQL's client connections (pg_stat_activity) in every report line.
#
# Usage: scripts/bench-fleet.sh CONTROL_PLANE_BINARY AGENTS DURATION_S [kip-fleet-sim flags...]
#   e.g. scripts/bench-fleet.sh target/release/kip-control-plane 1000 120
# Environment:
#   FLEET_SIM        the generator binary (default target/release/kip-fleet-sim, else debug)
#   KIPCTL           for `kipctl ca init` (default target/debug/kipctl)
#   FLEET_BENCH_DIR  CA, certificate cache and admin key, kept between runs so a fleet enrolls
#                    once (default target/fleet-bench); remove it with the database to start over
#   FLEET_BENCH_DB   database name (default kip_fleet_bench; kept between runs)
#   FLEET_CP_DATABASE extra lines for the config's [database] section (e.g. pool sizes:
#                    "agent_max_connections = 16")
#   FLEET_CP_CONFIG  extra TOML appended to the control plane's config (other sections)
#   KIP_PG_URL       PostgreSQL server (default postgres://postgres@127.0.0.1:5432)
# Prints the generator's report lines and its JSON summary; the control plane's log goes to
# $FLEET_BENCH_DIR/cp.log.
set -euo pipefail

BIN=${1:?control-plane binary}
AGENTS=${2:?agents}
DURATION_S=${3:?duration in seconds}
shift 3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIM=${FLEET_SIM:-}
if [[ -z $SIM ]]; then
    SIM=$ROOT/target/release/kip-fleet-sim
    [[ -x $SIM ]] || SIM=$ROOT/target/debug/kip-fleet-sim
fi
KIPCTL=${KIPCTL:-$ROOT/target/debug/kipctl}
WORK=${FLEET_BENCH_DIR:-$ROOT/target/fleet-bench}
DB=${FLEET_BENCH_DB:-kip_fleet_bench}
PG=${KIP_PG_URL:-postgres://postgres@127.0.0.1:5432}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ADMIN_PORT=$(free_port)
AGENT_PORT=$(free_port)
CP_PID=

cleanup() {
    if [[ -n $CP_PID ]]; then kill "$CP_PID" 2>/dev/null || true; wait "$CP_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap "exit 130" INT TERM

mkdir -p "$WORK"
[[ -f $WORK/ca/root.crt ]] || "$KIPCTL" ca init --dir "$WORK/ca" > /dev/null
psql "$PG/postgres" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 ||
    psql "$PG/postgres" -qc "CREATE DATABASE $DB"

cat > "$WORK/cp.toml" <<TOML
[server]
listen_addr = "127.0.0.1:$ADMIN_PORT"
[database]
url = "$PG/$DB"
${FLEET_CP_DATABASE:-}
[auth]
admin_key_file = "$WORK/admin.key"
[log]
format = "text"
filter = "warn"
[pki]
ca_dir = "$WORK/ca"
agent_listen_addr = "127.0.0.1:$AGENT_PORT"
# Every simulated agent enrolls from this one address.
enrollments_per_ip_per_minute = 0
${FLEET_CP_CONFIG:-}
TOML
"$BIN" --config "$WORK/cp.toml" >> "$WORK/cp.log" 2>&1 &
CP_PID=$!
for _ in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/healthz" > /dev/null 2>&1 && break
    kill -0 "$CP_PID" 2>/dev/null || { tail -20 "$WORK/cp.log"; exit 1; }
    sleep 0.1
done
echo "control plane: $BIN (pid $CP_PID); generator: $SIM; $(uptime)"
"$SIM" --admin-url "http://127.0.0.1:$ADMIN_PORT" --admin-key-file "$WORK/admin.key" \
    --agent-url "https://127.0.0.1:$AGENT_PORT" --state-dir "$WORK/state" \
    --agents "$AGENTS" --duration-s "$DURATION_S" \
    --control-plane-pid "$CP_PID" --pg-url "$PG/$DB" "$@"
echo "end: $(uptime)"
