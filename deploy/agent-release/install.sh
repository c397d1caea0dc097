#!/usr/bin/env bash
# Installs (or upgrades) the kip edge agent from this release directory.
#
#   sudo ./install.sh                 install into /, create the kip-agent user, reload systemd
#   ./install.sh --root /tmp/r        install into a staging root (no user, no systemd; tests)
#
# Layout: the versioned install root of self-update (docs/operations.md "Agent self-update"):
# /opt/kip-agent/bin/kip-agent-launcher (root 0755), /opt/kip-agent/versions/<version>/ (this
# release: VERSION, bin/kip-agent, lib/kip-agent/libonnxruntime.so.*, share/kip-agent/models/),
# current -> versions/<version>, previous -> the version that was current before, update/;
# /usr/bin/kip-agent and /usr/share/kip-agent/models link through `current`;
# /etc/kip-agent/agent.toml (root:kip-agent 0640, never overwritten), /etc/systemd/system/
# kip-agent.service (starts the launcher), /var/lib/kip-agent (kip-agent 0700: buffer and
# identity, kept on upgrade). The service is not started: enroll first (docs/install-agent.md).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=/
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
ROOT="${ROOT%/}"
say() { printf '[kip-agent install] %s\n' "$*" >&2; }
die() { printf '[kip-agent install] error: %s\n' "$*" >&2; exit 1; }

LIVE=0
if [ -z "$ROOT" ]; then
    LIVE=1
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo ./install.sh), or use --root DIR for a staging install"
fi
[ -x "$HERE/bin/kip-agent" ] || die "no bin/kip-agent next to install.sh: run it from the unpacked release"

if [ "$LIVE" = 1 ]; then
    if ! getent group kip-agent >/dev/null; then
        say "creating system group kip-agent"
        groupadd --system kip-agent
    fi
    if ! getent passwd kip-agent >/dev/null; then
        say "creating system user kip-agent (no login shell, home /var/lib/kip-agent)"
        useradd --system --gid kip-agent --home-dir /var/lib/kip-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "kip edge agent" kip-agent
    fi
    if [ -d /run/systemd/system ] && systemctl is-active --quiet kip-agent.service; then
        say "stopping the running agent for the upgrade (the buffer stays)"
        systemctl stop kip-agent.service
        RESTART=1
    fi
fi

say "installing into ${ROOT:-/}"
VERSION="$(cat "$HERE/VERSION")"
OPT="$ROOT/opt/kip-agent"
SLOT="$OPT/versions/$VERSION"
install -d -m 0755 "$ROOT/usr/bin" "$ROOT/usr/share/doc/kip-agent" "$ROOT/etc/systemd/system" \
    "$OPT/bin" "$OPT/versions" "$OPT/update"
# Root's, sticky: the agent (group kip-agent) adds slots and replaces its links, never bin/.
chmod 1775 "$OPT"
install -m 0755 "$HERE/bin/kip-agent-launcher" "$OPT/bin/kip-agent-launcher"
# The slot, unpacked beside and renamed into place (as the agent's self-update does).
rm -rf "$SLOT.partial" "$SLOT.old"
install -d -m 0755 "$SLOT.partial/bin" "$SLOT.partial/lib/kip-agent" "$SLOT.partial/share/kip-agent/models"
install -m 0644 "$HERE/VERSION" "$SLOT.partial/VERSION"
install -m 0755 "$HERE/bin/kip-agent" "$SLOT.partial/bin/kip-agent"
install -m 0644 "$HERE"/lib/kip-agent/libonnxruntime.so.* "$SLOT.partial/lib/kip-agent/"
install -m 0644 "$HERE"/share/kip-agent/models/* "$SLOT.partial/share/kip-agent/models/"
[ ! -e "$SLOT" ] || mv -T "$SLOT" "$SLOT.old"
mv -T "$SLOT.partial" "$SLOT"
rm -rf "$SLOT.old"
# `current` moves to this release (an install is the operator's choice, not a trial); the
# version it pointed at (installed before, or by self-update) stays as `previous`.
old="$(readlink "$OPT/current" 2>/dev/null || true)"
if [ "$old" != "versions/$VERSION" ]; then
    if [ -n "$old" ] && [ -x "$OPT/$old/bin/kip-agent" ]; then
        ln -sfn "$old" "$OPT/previous.tmp" && mv -Tf "$OPT/previous.tmp" "$OPT/previous"
    fi
    ln -sfn "versions/$VERSION" "$OPT/current.tmp" && mv -Tf "$OPT/current.tmp" "$OPT/current"
fi
rm -f "$OPT/update/trial" "$OPT/update/trial-boots" "$OPT/update/trial-failed"
# Commands and models through `current` (relative links: they resolve under --root too). The
# layout before self-update had a plain binary and library here.
rm -rf "$ROOT/usr/lib/kip-agent" "$ROOT/usr/share/kip-agent" "$ROOT/usr/bin/kip-agent"
install -d -m 0755 "$ROOT/usr/share/kip-agent"
ln -s ../../opt/kip-agent/current/bin/kip-agent "$ROOT/usr/bin/kip-agent"
ln -s ../../../opt/kip-agent/current/share/kip-agent/models "$ROOT/usr/share/kip-agent/models"
install -m 0644 "$HERE"/share/doc/kip-agent/* "$ROOT/usr/share/doc/kip-agent/"
install -m 0644 "$HERE/systemd/kip-agent.service" "$ROOT/etc/systemd/system/kip-agent.service"

# Config and state: created when missing, never replaced.
install -d -m 0750 "$ROOT/etc/kip-agent"
install -m 0640 "$HERE/etc/kip-agent/agent.toml.example" "$ROOT/etc/kip-agent/agent.toml.example"
if [ ! -e "$ROOT/etc/kip-agent/agent.toml" ]; then
    install -m 0640 "$HERE/etc/kip-agent/agent.toml.example" "$ROOT/etc/kip-agent/agent.toml"
    say "wrote /etc/kip-agent/agent.toml from the example: edit device name and sources"
else
    say "kept the existing /etc/kip-agent/agent.toml"
fi
if [ -d "$ROOT/var/lib/kip-agent" ]; then
    say "kept the existing state in /var/lib/kip-agent (buffer, identity)"
fi
install -d -m 0700 "$ROOT/var/lib/kip-agent"
chmod 0700 "$ROOT/var/lib/kip-agent"

if [ "$LIVE" = 1 ]; then
    chown root:kip-agent /etc/kip-agent /etc/kip-agent/agent.toml /etc/kip-agent/agent.toml.example
    chown -R kip-agent:kip-agent /var/lib/kip-agent
    chown root:kip-agent /opt/kip-agent
    chown -h kip-agent:kip-agent /opt/kip-agent/current /opt/kip-agent/versions /opt/kip-agent/update
    [ ! -L /opt/kip-agent/previous ] || chown -h kip-agent:kip-agent /opt/kip-agent/previous
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        if [ "${RESTART:-0}" = 1 ]; then
            say "starting the upgraded agent"
            systemctl start kip-agent.service
        fi
    fi
fi
say "installed $("$ROOT/usr/bin/kip-agent" --version)"
if [ "$LIVE" = 1 ] && [ "${RESTART:-0}" != 1 ]; then
    cat >&2 <<'MSG'
next steps (docs/install-agent.md):
  1. edit /etc/kip-agent/agent.toml (device name, MQTT/OPC UA sources)
  2. sudo -u kip-agent KIP_ENROLL_TOKEN=<token> kip-agent enroll --config /etc/kip-agent/agent.toml --server https://<control plane>
  3. sudo systemctl enable --now kip-agent
MSG
fi
