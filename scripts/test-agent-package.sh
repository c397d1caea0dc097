#!/usr/bin/env bash
# Builds the agent release tarball, installs it into a temporary root with install.sh
# --root, and checks the installed files (the versioned install root of self-update), their
# modes, the systemd unit (through the launcher, restarted on exit code 75), that the
# installed binary and the launcher run, that an upgrade after a self-update keeps config,
# buffer, identity and the self-updated slot, and that uninstall keeps the buffer unless
# --purge. Called by scripts/test.sh; `--profile release` tests the release build.
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
V="$(cat "$REL/VERSION")"
OPT="$ROOT/opt/kip-agent"
for f in opt/kip-agent/bin/kip-agent-launcher opt/kip-agent/versions/$V/bin/kip-agent \
         opt/kip-agent/versions/$V/VERSION opt/kip-agent/versions/$V/lib/kip-agent/libonnxruntime.so.$ORT_VERSION \
         etc/kip-agent/agent.toml etc/systemd/system/kip-agent.service usr/bin/kip-agent \
         usr/share/kip-agent/models; do
    check "the install has $f" test -e "$ROOT/$f"
done
check "current points at the installed slot versions/$V" test "$(readlink "$OPT/current")" = "versions/$V"
check "a first install has no previous version" test ! -e "$OPT/previous"
check "/usr/bin/kip-agent is a relative link through current" \
    test "$(readlink "$ROOT/usr/bin/kip-agent")" = ../../opt/kip-agent/current/bin/kip-agent
check "the model is installed (through current)" bash -c "ls '$ROOT'/usr/share/kip-agent/models/*.onnx"
check "the binary is 0755" mode_is 755 "$OPT/versions/$V/bin/kip-agent"
check "the launcher is 0755" mode_is 755 "$OPT/bin/kip-agent-launcher"
check "the install root is sticky 1775 (the agent cannot replace bin/)" mode_is 1775 "$OPT"
check "the state dir is 0700" mode_is 700 "$ROOT/var/lib/kip-agent"
check "the config dir is 0750" mode_is 750 "$ROOT/etc/kip-agent"
check "the config is 0640" mode_is 640 "$ROOT/etc/kip-agent/agent.toml"
check "the ONNX Runtime library is 0644" mode_is 644 "$OPT/versions/$V/lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
check "kip-agent --version runs from the installed layout" "$ROOT/usr/bin/kip-agent" --version
check "the launcher starts the current slot" \
    bash -c "[ \"\$(env -u KIP_AGENT_INSTALL_ROOT '$OPT/bin/kip-agent-launcher' --version)\" = 'kip-agent $V' ]"
check "the slot's binary finds ONNX Runtime at ../lib/kip-agent" \
    test -f "$OPT/versions/$V/bin/../lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
UNIT="$ROOT/etc/systemd/system/kip-agent.service"
for key in User=kip-agent StateDirectory=kip-agent StateDirectoryMode=0700 ProtectSystem=strict \
           ProtectHome=yes NoNewPrivileges=yes PrivateTmp=yes Restart=on-failure RestartSec= \
           LimitNOFILE= 'CapabilityBoundingSet=$' 'ReadWritePaths=/var/lib/kip-agent /opt/kip-agent$' \
           'ExecStart=/opt/kip-agent/bin/kip-agent-launcher run --config /etc/kip-agent/agent.toml$' \
           'Environment=KIP_AGENT_INSTALL_ROOT=/opt/kip-agent$' 'SuccessExitStatus=75$' \
           'RestartForceExitStatus=75 76$'; do
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

# A self-update happened (slot 9.9.9 current, the installed one previous, a stale trial),
# then the operator upgrades with install.sh: config, buffer and the self-updated slot stay;
# `current` is the release installed, `previous` the self-updated version.
echo "# edited by the operator" >> "$ROOT/etc/kip-agent/agent.toml"
mkdir -p "$ROOT/var/lib/kip-agent/buffer" "$ROOT/var/lib/kip-agent/identity"
echo data > "$ROOT/var/lib/kip-agent/buffer/db"; echo key > "$ROOT/var/lib/kip-agent/identity/device.key"
cp -a "$OPT/versions/$V" "$OPT/versions/9.9.9" && echo 9.9.9 > "$OPT/versions/9.9.9/VERSION"
ln -sfn "versions/$V" "$OPT/previous" && ln -sfn versions/9.9.9 "$OPT/current"
echo 9.9.9 > "$OPT/update/trial"
check "install.sh runs again as an upgrade" "$REL/install.sh" --root "$ROOT"
check "an upgrade keeps the operator's config" grep -q "edited by the operator" "$ROOT/etc/kip-agent/agent.toml"
check "an upgrade keeps the buffer and identity" test -f "$ROOT/var/lib/kip-agent/buffer/db" -a -f "$ROOT/var/lib/kip-agent/identity/device.key"
check "an upgrade points current at the installed release" test "$(readlink "$OPT/current")" = "versions/$V"
check "an upgrade keeps the self-updated slot as previous" \
    bash -c "[ \"\$(readlink '$OPT/previous')\" = versions/9.9.9 ] && [ -x '$OPT/versions/9.9.9/bin/kip-agent' ]"
check "an upgrade leaves nothing on trial" test ! -e "$OPT/update/trial"
check "an upgrade leaves no partial slot" bash -c "! ls -d '$OPT'/versions/*.partial '$OPT'/versions/*.old 2>/dev/null | grep ."

check "uninstall.sh removes the agent" "$REL/uninstall.sh" --root "$ROOT"
check "uninstall removes the install root (every slot), the links and the unit" \
    bash -c "[ ! -e '$OPT' ] && [ ! -L '$ROOT/usr/bin/kip-agent' ] && [ ! -e '$UNIT' ] && [ ! -e '$ROOT/usr/share/kip-agent' ]"
check "uninstall keeps the buffer and identity" test -f "$ROOT/var/lib/kip-agent/buffer/db" -a -f "$ROOT/var/lib/kip-agent/identity/device.key"
check "uninstall --purge removes the buffer and config" \
    bash -c "'$REL/uninstall.sh' --root '$ROOT' --purge && [ ! -e '$ROOT/var/lib/kip-agent' ] && [ ! -e '$ROOT/etc/kip-agent' ]"

echo "agent package: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
