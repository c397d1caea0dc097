#!/usr/bin/env bash
# The one command that runs every check and test of kip on a fresh Debian machine:
# installs what is missing, starts PostgreSQL, then fmt, clippy, the whole test suite, the
# deployment checks (deploy/, .github/), the agent release tarball (built and installed into
# a temporary root) and the agent .deb (installed, upgraded, removed and purged with dpkg in a
# temporary root). Fails when a process started by the tests survives them.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

ensure_postgres
ensure_mosquitto
ensure_strace
ensure_ort
ensure_pgvector
ensure_timescaledb
ensure_timescaledb_preloaded
ensure_embedding_model
ensure_python_peers
ensure_monitoring_tools
ensure_browser
export DATABASE_URL="${DATABASE_URL:-$KIP_PG_URL/postgres}"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every process the tests start carries KIP_TEST_RUN; none may outlive the run.
run_id="$(new_test_run_id)"
test_status=0
if cargo nextest --version >/dev/null 2>&1; then
    # Tests of all binaries side by side (.config/nextest.toml says why), then the doc tests,
    # which nextest does not run.
    say "cargo nextest run (the workspace's tests) and cargo test --doc"
    KIP_TEST_RUN="$run_id" cargo nextest run --workspace --locked --no-fail-fast || test_status=$?
    KIP_TEST_RUN="$run_id" cargo test --workspace --locked --doc || test_status=$?
else
    say "cargo test (cargo-nextest is not installed: one test binary at a time)"
    KIP_TEST_RUN="$run_id" cargo test --workspace --locked --no-fail-fast || test_status=$?
fi
check_no_test_survivors "$run_id" || test_status=1
[ "$test_status" -eq 0 ] || die "the tests failed (exit $test_status; see above)"
say "deployment checks (scripts/check-deploy.sh)"
bash scripts/check-deploy.sh
say "agent release tarball (scripts/test-agent-package.sh)"
bash scripts/test-agent-package.sh --profile debug
say "agent Debian package (scripts/test-agent-deb.sh)"
bash scripts/test-agent-deb.sh --profile debug --no-build
