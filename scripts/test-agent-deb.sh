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

VERSION="$(tar -xzOf "$TARBALL" --wildcards '*/VERSION')"
SLOT="opt/kip-agent/versions/$VERSION"
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
for f in ./$SLOT/bin/kip-agent ./$SLOT/VERSION ./$SLOT/lib/kip-agent/libonnxruntime.so.$ORT_VERSION \
         ./opt/kip-agent/bin/kip-agent-launcher \
         ./lib/systemd/system/kip-agent.service ./etc/kip-agent/agent.toml \
         ./usr/share/doc/kip-agent/copyright ./usr/share/doc/kip-agent/install-agent.md; do
    check "dpkg-deb --contents lists $f" grep -q " $f\$" "$WORK/contents"
done
check "dpkg-deb --contents has /usr/bin/kip-agent as a relative link through current" \
    grep -q ' ./usr/bin/kip-agent -> ../../opt/kip-agent/current/bin/kip-agent$' "$WORK/contents"
check "the package ships no current/previous link and no update records (postinst makes them)" \
    bash -c "! grep -E ' ./opt/kip-agent/(current|previous|update)' '$WORK/contents'"
check "every file in the package is root:root" bash -c "! awk '\$2 != \"root/root\"' '$WORK/contents' | grep ."
check "the package ships no state (dpkg must never delete the buffer)" bash -c "! grep -q ' ./var/' '$WORK/contents'"
check "the package has the reference model in its slot" grep -qE " \./$SLOT/share/kip-agent/models/.*\.onnx\$" "$WORK/contents"

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
OPT="$ROOT/opt/kip-agent"
check "the slot's binary is root 0755" stat_is 755 0:0 "$ROOT/$SLOT/bin/kip-agent"
check "the launcher is root 0755" stat_is 755 0:0 "$OPT/bin/kip-agent-launcher"
check "the ONNX Runtime library is root 0644" stat_is 644 0:0 "$ROOT/$SLOT/lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
check "/opt/kip-agent is root:kip-agent 1775 (sticky: the agent cannot replace bin/)" stat_is 1775 "0:$KGID" "$OPT"
check "versions/ and update/ are kip-agent 0755 (self-update writes there)" \
    bash -c "[ \"\$(stat -c '%a %u:%g' '$OPT/versions' '$OPT/update' | sort -u)\" = '755 $KUID:$KGID' ]"
check "postinst pointed current at the package's slot, owned by kip-agent" \
    bash -c "[ \"\$(readlink '$OPT/current')\" = versions/$VERSION ] && [ \"\$(stat -c %u:%g '$OPT/current')\" = $KUID:$KGID ]"
check "a first install has no previous version" test ! -e "$OPT/previous"
check "the unit is root 0644" stat_is 644 0:0 "$ROOT/lib/systemd/system/kip-agent.service"
check "/etc/kip-agent is root:kip-agent 0750" stat_is 750 "0:$KGID" "$ROOT/etc/kip-agent"
check "agent.toml is root:kip-agent 0640" stat_is 640 "0:$KGID" "$ROOT/etc/kip-agent/agent.toml"
check "/var/lib/kip-agent is kip-agent 0700" stat_is 700 "$KUID:$KGID" "$ROOT/var/lib/kip-agent"
UNIT="$ROOT/lib/systemd/system/kip-agent.service"
check "the unit runs the launcher as kip-agent" bash -c "grep -q '^ExecStart=/opt/kip-agent/bin/kip-agent-launcher run --config /etc/kip-agent/agent.toml$' '$UNIT' && grep -q '^User=kip-agent$' '$UNIT'"
check "the unit restarts the agent on exit code 75 (new version) and 76 (trial failed)" \
    bash -c "grep -q '^RestartForceExitStatus=75 76$' '$UNIT' && grep -q '^SuccessExitStatus=75$' '$UNIT'"
check "the unit lets the agent write its install root" grep -q '^ReadWritePaths=/var/lib/kip-agent /opt/kip-agent$' "$UNIT"
check "the launcher starts the package's slot" \
    bash -c "[ \"\$(env -u KIP_AGENT_INSTALL_ROOT '$OPT/bin/kip-agent-launcher' --version)\" = 'kip-agent $VERSION' ]"
check "the installed kip-agent --version runs and prints $VERSION" \
    bash -c "[ \"\$('$ROOT/usr/bin/kip-agent' --version)\" = 'kip-agent $VERSION' ]"
check "the slot's binary finds ONNX Runtime at ../lib/kip-agent" \
    test -f "$ROOT/$SLOT/bin/../lib/kip-agent/libonnxruntime.so.$ORT_VERSION"
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

# The agent updated itself to 9.9.9 (a slot of its own, current -> it, previous -> the
# package's; a stale trial record), then the operator upgrades to revision 2: the operator's
# config, the state (buffer, identity) and the self-updated slot stay; current is the package.
sed -i 's/^device = .*/device = "press-line-9"/' "$ROOT/etc/kip-agent/agent.toml"
mkdir -p "$ROOT/var/lib/kip-agent/buffer" "$ROOT/var/lib/kip-agent/identity"
echo data > "$ROOT/var/lib/kip-agent/buffer/db"; echo key > "$ROOT/var/lib/kip-agent/identity/device.key"
cp -a "$ROOT/$SLOT" "$OPT/versions/9.9.9" && echo 9.9.9 > "$OPT/versions/9.9.9/VERSION"
chown -R "$KUID:$KGID" "$OPT/versions/9.9.9"
ln -sfn "versions/$VERSION" "$OPT/previous" && ln -sfn versions/9.9.9 "$OPT/current"
chown -h "$KUID:$KGID" "$OPT/previous" "$OPT/current"
echo 9.9.9 > "$OPT/update/trial"
check "dpkg -i of revision 2 upgrades the package" "${DPKG[@]}" --force-confold -i "$DEB2"
check "the upgrade points current at the package's slot" test "$(readlink "$OPT/current")" = "versions/$VERSION"
check "the upgrade keeps the self-updated slot as previous" \
    bash -c "[ \"\$(readlink '$OPT/previous')\" = versions/9.9.9 ] && [ -x '$OPT/versions/9.9.9/bin/kip-agent' ] && [ \"\$(cat '$OPT/versions/9.9.9/VERSION')\" = 9.9.9 ]"
check "the upgrade leaves nothing on trial" test ! -e "$OPT/update/trial"
check "the launcher starts the upgraded slot" \
    bash -c "[ \"\$(env -u KIP_AGENT_INSTALL_ROOT '$OPT/bin/kip-agent-launcher' --version)\" = 'kip-agent $VERSION' ]"
check "dpkg records revision 2" bash -c "[[ \"\$(dpkg-query --admindir='$ROOT/var/lib/dpkg' -W -f='\${db:Status-Abbrev} \${Version}' kip-agent)\" == ii*-2 ]]"
check "the upgrade kept the operator's agent.toml" grep -q '^device = "press-line-9"' "$ROOT/etc/kip-agent/agent.toml"
check "the upgrade kept the buffer and identity" \
    bash -c "[ \"\$(cat '$ROOT/var/lib/kip-agent/buffer/db' '$ROOT/var/lib/kip-agent/identity/device.key')\" = \"\$(printf 'data\nkey')\" ]"
check "the upgrade kept the agent.toml modes" stat_is 640 "0:$KGID" "$ROOT/etc/kip-agent/agent.toml"
check "the upgrade kept the state dir modes" stat_is 700 "$KUID:$KGID" "$ROOT/var/lib/kip-agent"
check "the upgrade kept the user (same uid)" bash -c "[ \"\$(grep -c '^kip-agent:' '$ROOT/etc/passwd')\" = 1 ] && grep -q '^kip-agent:x:$KUID:' '$ROOT/etc/passwd'"
check "the upgraded config is valid" "$ROOT/usr/bin/kip-agent" check-config --config "$ROOT/etc/kip-agent/agent.toml"

check "dpkg -r removes the package" "${DPKG[@]}" -r kip-agent
check "remove deleted the install root (every slot, also the self-updated one), links and unit" bash -c "[ ! -e '$OPT' ] && [ ! -L '$ROOT/usr/bin/kip-agent' ] && [ ! -e '$ROOT/usr/share/kip-agent' ] && [ ! -e '$ROOT/lib/systemd/system/kip-agent.service' ]"
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
