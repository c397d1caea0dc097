#!/usr/bin/env bash
# The one command that runs every check and test of kip on a fresh Debian machine:
# installs what is missing, starts PostgreSQL, then fmt, clippy and the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

ensure_postgres
ensure_mosquitto
ensure_ort
ensure_python_peers
export DATABASE_URL="${DATABASE_URL:-$KIP_PG_URL/postgres}"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked
