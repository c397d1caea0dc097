#!/usr/bin/env bash
# Shared helpers for kip's scripts: install what is missing, start local services.
# Sourced by scripts/quickstart.sh, scripts/test.sh and .ci/run. Idempotent: a second run
# changes nothing. Every step says what it does, and every failure says what to do.

set -euo pipefail

KIP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KIP_ROOT

say() { printf '\033[1m[kip]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[kip] error:\033[0m %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $* (install sudo or run as root)"; fi
}

# ensure_packages PKG... : apt-get install the Debian packages that are not installed yet.
ensure_packages() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# ensure_postgres: PostgreSQL reachable on 127.0.0.1:5432; exports KIP_PG_URL (server URL, no db).
ensure_postgres() {
    ensure_packages postgresql postgresql-client
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        local ver
        ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)"
        [ -n "$ver" ] || die "PostgreSQL is installed but has no cluster; run: pg_createcluster 15 main"
        say "starting PostgreSQL $ver"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
        for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
        pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not start; see /var/log/postgresql/"
    fi
    KIP_PG_URL="postgres://postgres@127.0.0.1:5432"
    if ! psql "$KIP_PG_URL/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
        # A stock Debian cluster asks for a password on TCP: give the postgres role one
        # (local development only) instead of editing pg_hba.conf.
        say "setting a local password for the postgres role (Debian default needs one on TCP)"
        as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
        KIP_PG_URL="postgres://postgres:postgres@127.0.0.1:5432"
        psql "$KIP_PG_URL/postgres" -Atqc 'select 1' >/dev/null || die "cannot log in to PostgreSQL as postgres"
    fi
    export KIP_PG_URL
}

# ensure_mosquitto: the broker binary for tests (tests start their own instances).
ensure_mosquitto() {
    ensure_packages mosquitto mosquitto-clients
}
