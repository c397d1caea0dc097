#!/usr/bin/env bash
# Brings up the kip platform on this machine: PostgreSQL (started or found), the control plane
# (database and schema created on first start). Ctrl-C stops it cleanly.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

ensure_postgres
STATE="$KIP_ROOT/.kip"
mkdir -p "$STATE"
say "building kip (release)"
cargo build --release --locked -p kip-control-plane

export KIP_DATABASE_URL="${KIP_DATABASE_URL:-$KIP_PG_URL/kip}"
export KIP_ADMIN_KEY_FILE="${KIP_ADMIN_KEY_FILE:-$STATE/admin.key}"
export KIP_LISTEN_ADDR="${KIP_LISTEN_ADDR:-127.0.0.1:8080}"
export KIP_LOG_FORMAT="${KIP_LOG_FORMAT:-text}"

cat >&2 <<MSG

  kip control plane  http://$KIP_LISTEN_ADDR   (health: /healthz, metrics: /metrics, API: /openapi.json)
  admin key          $KIP_ADMIN_KEY_FILE (written at first start, mode 0600)
  try                KIP_API_KEY_FILE=$KIP_ADMIN_KEY_FILE target/release/kipctl org create acme
                     KIP_API_KEY_FILE=$KIP_ADMIN_KEY_FILE target/release/kipctl org list
  stop               Ctrl-C

MSG
exec target/release/kip-control-plane --config "$KIP_ROOT/deploy/quickstart.toml"
