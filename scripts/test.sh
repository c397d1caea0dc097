#!/usr/bin/env bash
# The one command that runs every check and test of kip on a fresh Debian machine:
# installs what is missing, starts PostgreSQL, then fmt, clippy, the whole test suite, the
# deployment checks (deploy/, .github/) and the agent release tarball (built and installed into
# a temporary root).
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
say "deployment checks (scripts/check-deploy.sh)"
bash scripts/check-deploy.sh
say "agent release tarball (scripts/test-agent-package.sh)"
bash scripts/test-agent-package.sh --profile debug
