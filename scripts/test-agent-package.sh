#!/usr/bin/env bash
# Builds the agent release tarball, installs it into a temporary root with install.sh
# --root, and checks the installed files, their modes, the systemd unit, that the installed
# binary runs, that an upgrade keeps config and buffer, and that uninstall keeps the buffer
# unless --purge. Called by scripts/test.sh; `--profile release` tests the release build.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

PASS=0 FAIL=0
check() { # check "sentence" command...
    local what="$1"; shift
    if "$@" >/tmp/kip-pkg-check.$$ 2>&1; then PASS=$((PASS + 1)); say "ok: $what"
    else FAIL=$((FAIL + 1)); say "FAILED: $what"; sed 's/^/    /' /tmp/kip-pkg-check.$$ >&2; fi
}
mode_is() { [ "$(stat -c %a "$2")" = "$1" ] || { echo "$2 has mode $(stat -c %a "$2"), want $1"; return 1; }; }

TARBALL="$(scripts/package-agent.sh "$@" | tail -n1)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK" /tmp/kip-pkg-check.$$' EXIT
ROOT="$WORK/root"

check "the tarball is named kip-agent-<version>-x86_64-linux.tar.gz" \
    bash -c "[[ \$(basename '$TARBALL') =~ ^kip-agent-[0-9]+\.[0-9]+\.[0-9]+.*-x86_64-linux\.tar\.gz$ ]]"
tar -C "$WORK" -xzf "$TARBALL"
REL="$(find "$WORK" -maxdepth 1 -type d -name 'kip-agent-*')"
check "the tarball's checksums match its files" bash -c "cd '$REL' && sha256sum -c --quiet SHA256SUMS"
check "the agent runs from the unpacked tarball" "$REL/bin/kip-agent" --version

check "install.sh --root installs into a staging root" "$REL/install.sh" --root "$ROOT"
for f in usr/bin/kip-agent usr/lib/kip-agent/libonnxruntime.so.$ORT_VERSION etc/kip-agent/agent.toml \
         etc/systemd/system/kip-agent.service usr/share/kip-agent/models; do
    check "the install has $f" test -e "$ROOT/$f"
done
check "the model is installed" bash -c "ls '$ROOT'/usr/share/kip-agent/models/*.onnx"
check "the binary is 0755" mode_is 755 "$ROOT/usr/bin/kip-agent"
check "the state dir is 0700" mode_is 700 "$ROOT/var/lib/kip-agent"
check "the config dir is 0750" mode_is 750 "$ROOT/etc/kip-agent"
check "the config is 0640" mode_is 640 "$ROOT/etc/kip-agent/agent.toml"
check "the ONNX Runtime library is 0644" mode_is 644 "$ROOT/usr/lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
check "kip-agent --version runs from the installed layout" "$ROOT/usr/bin/kip-agent" --version
check "the installed binary finds ONNX Runtime at ../lib/kip-agent" \
    test -f "$(dirname "$ROOT/usr/bin/kip-agent")/../lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
UNIT="$ROOT/etc/systemd/system/kip-agent.service"
for key in User=kip-agent StateDirectory=kip-agent StateDirectoryMode=0700 ProtectSystem=strict \
           ProtectHome=yes NoNewPrivileges=yes PrivateTmp=yes Restart=on-failure RestartSec= \
           LimitNOFILE= 'CapabilityBoundingSet=$' ReadWritePaths=/var/lib/kip-agent; do
    check "the unit sets ${key%\$}" grep -q "^$key" "$UNIT"
done
if command -v systemd-analyze >/dev/null; then
    # Parse problems are reported as FILE:LINE: ...; a staging root has no sysinit.target.
    check "systemd-analyze verify finds no problem in the installed unit" bash -c "
        ! systemd-analyze verify --root='$ROOT' /etc/systemd/system/kip-agent.service 2>&1 \
            | grep -E 'kip-agent\.service:[0-9]+:'"
else
    check "the unit has [Unit], [Service] and [Install] sections" \
        bash -c "grep -q '^\[Unit\]' '$UNIT' && grep -q '^\[Service\]' '$UNIT' && grep -q '^\[Install\]' '$UNIT'"
fi

# Upgrade: the operator's config and the buffer stay.
echo "# edited by the operator" >> "$ROOT/etc/kip-agent/agent.toml"
mkdir -p "$ROOT/var/lib/kip-agent/buffer" && echo data > "$ROOT/var/lib/kip-agent/buffer/db"
check "install.sh runs again as an upgrade" "$REL/install.sh" --root "$ROOT"
check "an upgrade keeps the operator's config" grep -q "edited by the operator" "$ROOT/etc/kip-agent/agent.toml"
check "an upgrade keeps the buffer" test -f "$ROOT/var/lib/kip-agent/buffer/db"

check "uninstall.sh removes the agent" "$REL/uninstall.sh" --root "$ROOT"
check "uninstall removes the binary and the unit" \
    bash -c "[ ! -e '$ROOT/usr/bin/kip-agent' ] && [ ! -e '$UNIT' ] && [ ! -e '$ROOT/usr/lib/kip-agent' ]"
check "uninstall keeps the buffer" test -f "$ROOT/var/lib/kip-agent/buffer/db"
check "uninstall --purge removes the buffer and config" \
    bash -c "'$REL/uninstall.sh' --root '$ROOT' --purge && [ ! -e '$ROOT/var/lib/kip-agent' ] && [ ! -e '$ROOT/etc/kip-agent' ]"

echo "agent package: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
