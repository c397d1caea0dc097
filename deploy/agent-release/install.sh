#!/usr/bin/env bash
# Installs (or upgrades) the kip edge agent from this release directory.
#
#   sudo ./install.sh                 install into /, create the kip-agent user, reload systemd
#   ./install.sh --root /tmp/r        install into a staging root (no user, no systemd; tests)
#
# Layout: /usr/bin/kip-agent, /usr/lib/kip-agent/libonnxruntime.so.*, /usr/share/kip-agent/
# models/, /etc/kip-agent/agent.toml (root:kip-agent 0640, never overwritten), /etc/systemd/
# system/kip-agent.service, /var/lib/kip-agent (kip-agent 0700: buffer and identity, kept on
# upgrade). The service is not started: enroll first (docs/install-agent.md).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT=/
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
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
install -d -m 0755 "$ROOT/usr/bin" "$ROOT/usr/lib/kip-agent" "$ROOT/usr/share/kip-agent/models" \
    "$ROOT/usr/share/doc/kip-agent" "$ROOT/etc/systemd/system"
install -m 0755 "$HERE/bin/kip-agent" "$ROOT/usr/bin/kip-agent"
install -m 0644 "$HERE"/lib/kip-agent/libonnxruntime.so.* "$ROOT/usr/lib/kip-agent/"
install -m 0644 "$HERE"/share/kip-agent/models/* "$ROOT/usr/share/kip-agent/models/"
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
