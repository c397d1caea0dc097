#!/usr/bin/env bash
# Builds the agent's .deb twice (revisions 1 and 2 of one release tarball) and runs its whole
# life in a temporary root with the real dpkg and maintainer scripts: install, upgrade, remove,
# purge. dpkg --root ... --force-script-chrootless runs the scripts with DPKG_ROOT set, so the
# user, /var/lib/kip-agent and /etc/kip-agent are made inside the temporary root; the system's
# /etc, /var and dpkg database are not touched. Called by scripts/test.sh (runs as root, like
# CI); arguments go to scripts/package-agent.sh (e.g. --profile debug).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"
[ "$(id -u)" -eq 0 ] || die "test-agent-deb.sh runs dpkg on a temporary root: run it as root"

PASS=0 FAIL=0
check() { # check "sentence" command...
    local what="$1"; shift
    if "$@" >/tmp/kip-deb-check.$$ 2>&1; then PASS=$((PASS + 1)); say "ok: $what"
    else FAIL=$((FAIL + 1)); say "FAILED: $what"; sed 's/^/    /' /tmp/kip-deb-check.$$ >&2; fi
}
stat_is() { # stat_is MODE UID:GID PATH
    local got; got="$(stat -c '%a %u:%g' "$3")"
    [ "$got" = "$1 $2" ] || { echo "$3 is $got, want $1 $2"; return 1; }
}

WORK="$(mktemp -d)"
# The host's user database and paths, to show the test changed none of them.
host_state() { sha256sum /etc/passwd /etc/group; ls -d /etc/kip-agent /var/lib/kip-agent 2>&1 || true; dpkg-query -W kip-agent 2>&1 || true; }
HOST_BEFORE="$(host_state)"
host_unchanged() { diff <(echo "$HOST_BEFORE") <(host_state); }
trap 'rm -rf "$WORK" /tmp/kip-deb-check.$$' EXIT
TARBALL="$(scripts/package-agent.sh "$@" | tail -n1)"
DEB1="$(scripts/package-agent-deb.sh --fast --tarball "$TARBALL" --revision 1 | tail -n1)"
DEB2="$(scripts/package-agent-deb.sh --fast --tarball "$TARBALL" --revision 2 | tail -n1)"

check "the package is named kip-agent_<version>-1_amd64.deb" \
    bash -c "[[ \$(basename '$DEB1') =~ ^kip-agent_[0-9]+\.[0-9]+\.[0-9]+.*-1_amd64\.deb$ ]]"
dpkg-deb --info "$DEB1" > "$WORK/info"
dpkg-deb --contents "$DEB1" > "$WORK/contents"
for field in 'Package: kip-agent' 'Architecture: amd64' 'Depends: libc6' 'Installed-Size: '; do
    check "dpkg-deb --info shows $field" grep -q "^ $field" "$WORK/info"
done
for script in postinst prerm postrm conffiles; do
    check "the control archive has $script" grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +[*]? *$script" "$WORK/info"
done
check "agent.toml is the only conffile" \
    bash -c "[ \"\$(dpkg-deb --ctrl-tarfile '$DEB1' | tar -xO ./conffiles)\" = /etc/kip-agent/agent.toml ]"
for f in ./usr/bin/kip-agent ./usr/lib/kip-agent/libonnxruntime.so.$ORT_VERSION \
         ./lib/systemd/system/kip-agent.service ./etc/kip-agent/agent.toml \
         ./usr/share/doc/kip-agent/copyright ./usr/share/doc/kip-agent/install-agent.md; do
    check "dpkg-deb --contents lists $f" grep -q " $f\$" "$WORK/contents"
done
check "every file in the package is root:root" bash -c "! awk '\$2 != \"root/root\"' '$WORK/contents' | grep ."
check "the package ships no state (dpkg must never delete the buffer)" bash -c "! grep -q ' ./var/' '$WORK/contents'"
check "the package has the reference model" grep -qE ' \./usr/share/kip-agent/models/.*\.onnx$' "$WORK/contents"

# A temporary root: an empty dpkg database and user/group files for useradd --prefix.
ROOT="$WORK/root"
mkdir -p "$ROOT/etc" "$ROOT/var/lib/dpkg/info" "$ROOT/var/lib/dpkg/updates" "$ROOT/var/lib/dpkg/triggers"
: > "$ROOT/var/lib/dpkg/status"; : > "$ROOT/var/lib/dpkg/available"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\n' > "$ROOT/etc/group"
printf 'root:*:19000:0:99999:7:::\n' > "$ROOT/etc/shadow"
printf 'root:*::\n' > "$ROOT/etc/gshadow"
# --force-depends: the temporary root's database has no libc6; the host has it.
DPKG=(dpkg --root="$ROOT" --log="$WORK/dpkg.log" --force-script-chrootless --force-depends)

check "dpkg -i installs the package into the temporary root" "${DPKG[@]}" -i "$DEB1"
check "dpkg records it as installed" bash -c "[[ \"\$(dpkg-query --admindir='$ROOT/var/lib/dpkg' -W -f='\${db:Status-Abbrev}' kip-agent)\" == ii* ]]"
check "postinst created the kip-agent system user in the root" grep -q '^kip-agent:x:[0-9]*:[0-9]*:kip edge agent:/var/lib/kip-agent:/usr/sbin/nologin$' "$ROOT/etc/passwd"
KUID="$(awk -F: '$1 == "kip-agent" { print $3 }' "$ROOT/etc/passwd")"
KGID="$(awk -F: '$1 == "kip-agent" { print $3 }' "$ROOT/etc/group")"
check "the user is a system user (uid < 1000)" test "${KUID:-1000}" -lt 1000
check "the binary is root 0755" stat_is 755 0:0 "$ROOT/usr/bin/kip-agent"
check "the ONNX Runtime library is root 0644" stat_is 644 0:0 "$ROOT/usr/lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
check "the unit is root 0644" stat_is 644 0:0 "$ROOT/lib/systemd/system/kip-agent.service"
check "/etc/kip-agent is root:kip-agent 0750" stat_is 750 "0:$KGID" "$ROOT/etc/kip-agent"
check "agent.toml is root:kip-agent 0640" stat_is 640 "0:$KGID" "$ROOT/etc/kip-agent/agent.toml"
check "/var/lib/kip-agent is kip-agent 0700" stat_is 700 "$KUID:$KGID" "$ROOT/var/lib/kip-agent"
check "the unit runs the installed binary as kip-agent" bash -c "grep -q '^ExecStart=/usr/bin/kip-agent run --config /etc/kip-agent/agent.toml$' '$ROOT/lib/systemd/system/kip-agent.service' && grep -q '^User=kip-agent$' '$ROOT/lib/systemd/system/kip-agent.service'"
VERSION="$(tar -xzOf "$TARBALL" --wildcards '*/VERSION')"
check "the installed kip-agent --version runs and prints $VERSION" \
    bash -c "[ \"\$('$ROOT/usr/bin/kip-agent' --version)\" = 'kip-agent $VERSION' ]"
check "the installed binary finds ONNX Runtime at ../lib/kip-agent" \
    test -f "$ROOT/usr/bin/../lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
check "the installed kip-agent check-config accepts the installed agent.toml" \
    "$ROOT/usr/bin/kip-agent" check-config --config "$ROOT/etc/kip-agent/agent.toml"
cp "$ROOT/etc/kip-agent/agent.toml" "$WORK/bad.toml"; echo 'unknown_key = 1' >> "$WORK/bad.toml"
check "check-config rejects an unknown key, naming it" \
    bash -c "! '$ROOT/usr/bin/kip-agent' check-config --config '$WORK/bad.toml' 2>'$WORK/err' && grep -q unknown_key '$WORK/err'"
if command -v systemd-analyze >/dev/null; then
    check "systemd-analyze verify finds no problem in the installed unit" bash -c "
        ! systemd-analyze verify --root='$ROOT' /lib/systemd/system/kip-agent.service 2>&1 \
            | grep -E 'kip-agent\.service:[0-9]+:'"
fi

# Upgrade to revision 2: the operator's config and the state (buffer, identity) stay.
sed -i 's/^device = .*/device = "press-line-9"/' "$ROOT/etc/kip-agent/agent.toml"
mkdir -p "$ROOT/var/lib/kip-agent/buffer" "$ROOT/var/lib/kip-agent/identity"
echo data > "$ROOT/var/lib/kip-agent/buffer/db"; echo key > "$ROOT/var/lib/kip-agent/identity/device.key"
check "dpkg -i of revision 2 upgrades the package" "${DPKG[@]}" --force-confold -i "$DEB2"
check "dpkg records revision 2" bash -c "[[ \"\$(dpkg-query --admindir='$ROOT/var/lib/dpkg' -W -f='\${db:Status-Abbrev} \${Version}' kip-agent)\" == ii*-2 ]]"
check "the upgrade kept the operator's agent.toml" grep -q '^device = "press-line-9"' "$ROOT/etc/kip-agent/agent.toml"
check "the upgrade kept the buffer and identity" \
    bash -c "[ \"\$(cat '$ROOT/var/lib/kip-agent/buffer/db' '$ROOT/var/lib/kip-agent/identity/device.key')\" = \"\$(printf 'data\nkey')\" ]"
check "the upgrade kept the agent.toml modes" stat_is 640 "0:$KGID" "$ROOT/etc/kip-agent/agent.toml"
check "the upgrade kept the state dir modes" stat_is 700 "$KUID:$KGID" "$ROOT/var/lib/kip-agent"
check "the upgrade kept the user (same uid)" bash -c "[ \"\$(grep -c '^kip-agent:' '$ROOT/etc/passwd')\" = 1 ] && grep -q '^kip-agent:x:$KUID:' '$ROOT/etc/passwd'"
check "the upgraded config is valid" "$ROOT/usr/bin/kip-agent" check-config --config "$ROOT/etc/kip-agent/agent.toml"

check "dpkg -r removes the package" "${DPKG[@]}" -r kip-agent
check "remove deleted binary, library, models and unit" bash -c "[ ! -e '$ROOT/usr/bin/kip-agent' ] && [ ! -e '$ROOT/usr/lib/kip-agent' ] && [ ! -e '$ROOT/usr/share/kip-agent' ] && [ ! -e '$ROOT/lib/systemd/system/kip-agent.service' ]"
check "remove kept the state (buffer and identity)" test -f "$ROOT/var/lib/kip-agent/buffer/db" -a -f "$ROOT/var/lib/kip-agent/identity/device.key"
check "remove kept the config" grep -q '^device = "press-line-9"' "$ROOT/etc/kip-agent/agent.toml"
check "dpkg records config-files only" bash -c "[[ \"\$(dpkg-query --admindir='$ROOT/var/lib/dpkg' -W -f='\${db:Status-Abbrev}' kip-agent)\" == rc* ]]"

check "dpkg --purge purges the package" "${DPKG[@]}" --purge kip-agent
check "purge deleted /var/lib/kip-agent and /etc/kip-agent" bash -c "[ ! -e '$ROOT/var/lib/kip-agent' ] && [ ! -e '$ROOT/etc/kip-agent' ]"
check "dpkg no longer knows the package" bash -c "! dpkg-query --admindir='$ROOT/var/lib/dpkg' -W kip-agent 2>/dev/null | grep -q ."

check "the host's passwd, group, /etc/kip-agent, /var/lib/kip-agent and dpkg database are unchanged" \
    host_unchanged
echo "agent .deb: $PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
