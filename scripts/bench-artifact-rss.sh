#!/usr/bin/env bash
# Peak memory (VmHWM) of the real control-plane binary while N clients upload a 64 MiB model
# artifact each in parallel, then download them all in parallel (issue 13, hole 6).
#
# Usage: scripts/bench-artifact-rss.sh [BINARY] [PARALLEL]
#   BINARY   default target/debug/kip-control-plane (build it first:
#            cargo build -p kip-control-plane --bin kip-control-plane)
#   PARALLEL default 20
# Needs PostgreSQL at $PGHOST/$PGUSER (default 127.0.0.1/postgres) and curl. Uses a scratch
# database kip_bench_rss_$$ that it drops again; bounded by `timeout` (120 s per transfer).
# Prints one line: `round_trips_ok=K/N uploads=N size_mib=64 upload_s=.. download_s=.. vmhwm_kib=.. vmrss_kib=..`.
set -euo pipefail

BIN=${1:-target/debug/kip-control-plane}
N=${2:-20}
SIZE_MIB=64
PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
DB=kip_bench_rss_$$
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
URL=http://127.0.0.1:$PORT
CP_PID=

cleanup() {
    if [[ -n $CP_PID ]]; then kill "$CP_PID" 2>/dev/null || true; wait "$CP_PID" 2>/dev/null || true; fi
    dropdb -h "$PGHOST" -U "$PGUSER" --if-exists "$DB" 2>/dev/null || true
    cp "$WORK/cp.log" "${KEEP_LOG:-/dev/null}" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 130" INT TERM

createdb -h "$PGHOST" -U "$PGUSER" "$DB"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$WORK/model.bin"
SHA=$(sha256sum "$WORK/model.bin" | cut -d' ' -f1)

# Long enough for 20 x 64 MiB through a debug build on 2 cores; enough connections that no
# upload waits for the pool.
cat > "$WORK/cp.toml" <<EOF
[server]
request_timeout_ms = 120000
[database]
max_connections = $((N + 4))
EOF
KIP_DATABASE_URL="postgres://$PGUSER@$PGHOST/$DB" KIP_LISTEN_ADDR="127.0.0.1:$PORT" \
    KIP_ADMIN_KEY_FILE="$WORK/admin.key" KIP_LOG_FILTER=warn \
    "$BIN" --config "$WORK/cp.toml" > "$WORK/cp.log" 2>&1 &
CP_PID=$!
for _ in $(seq 1 300); do
    curl -fsS "$URL/healthz" > /dev/null 2>&1 && break
    sleep 0.1
done
KEY=$(cat "$WORK/admin.key")
api() { curl -fsS -H "authorization: Bearer $KEY" -H 'content-type: application/json' "$@"; }
ORG=$(api -X POST "$URL/v1/organisations" -d '{"name":"bench"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
IDS=()
for i in $(seq 1 "$N"); do
    IDS+=("$(api -X POST "$URL/v1/organisations/$ORG/models" \
        -d "{\"name\":\"m$i\",\"version\":\"1\",\"kind\":\"other\",\"artifact_sha256\":\"$SHA\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')")
done
base_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$CP_PID/status")

t0=$(date +%s.%N)
PIDS=()
for id in "${IDS[@]}"; do
    timeout 120 curl -fsS -o /dev/null -X PUT -H "authorization: Bearer $KEY" \
        -H 'content-type: application/octet-stream' -T "$WORK/model.bin" \
        "$URL/v1/organisations/$ORG/models/$id/artifact" &
    PIDS+=($!)
done
# Only the transfers: a bare `wait` would also wait for the control plane.
wait "${PIDS[@]}" || true
t1=$(date +%s.%N)
PIDS=()
for id in "${IDS[@]}"; do
    timeout 120 curl -fsS -o "$WORK/out-$id" -H "authorization: Bearer $KEY" \
        "$URL/v1/organisations/$ORG/models/$id/artifact" &
    PIDS+=($!)
done
wait "${PIDS[@]}" || true
t2=$(date +%s.%N)
ok=0
for id in "${IDS[@]}"; do
    got=$(sha256sum "$WORK/out-$id" 2>/dev/null | cut -d' ' -f1 || true)
    if [[ $got == "$SHA" ]]; then ok=$((ok + 1)); else echo "download of $id: sha256 '$got', want $SHA" >&2; fi
    rm -f "$WORK/out-$id"
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$CP_PID/status")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$CP_PID/status")
printf 'round_trips_ok=%s/%s uploads=%s size_mib=%s upload_s=%.1f download_s=%.1f vmhwm_before_kib=%s vmhwm_kib=%s vmrss_kib=%s\n' \
    "$ok" "$N" "$N" "$SIZE_MIB" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" "$base_hwm" "$hwm" "$rss"
