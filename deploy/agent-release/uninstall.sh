#!/usr/bin/env bash
# Removes the kip edge agent: the unit, the links in /usr and the install root /opt/kip-agent
# (every version slot, also those installed by self-update: code, not state). Keeps
# /var/lib/kip-agent (unsent buffer, device identity) and /etc/kip-agent unless --purge is
# given; --purge also removes the kip-agent user.
#
#   sudo ./uninstall.sh [--purge]
#   ./uninstall.sh --root /tmp/r [--purge]     staging root (tests)
set -euo pipefail

ROOT=/
PURGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift 2 ;;
        --root=*) ROOT="${1#--root=}"; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
ROOT="${ROOT%/}"
say() { printf '[kip-agent uninstall] %s\n' "$*" >&2; }
LIVE=0
if [ -z "$ROOT" ]; then
    LIVE=1
    [ "$(id -u)" -eq 0 ] || { say "error: run as root"; exit 1; }
    if [ -d /run/systemd/system ]; then
        systemctl disable --now kip-agent.service 2>/dev/null || true
    fi
fi
rm -f "$ROOT/usr/bin/kip-agent" "$ROOT/etc/systemd/system/kip-agent.service"
rm -rf "$ROOT/usr/lib/kip-agent" "$ROOT/usr/share/kip-agent" "$ROOT/usr/share/doc/kip-agent" \
    "$ROOT/opt/kip-agent"
if [ "$LIVE" = 1 ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
if [ "$PURGE" = 1 ]; then
    say "--purge: removing /etc/kip-agent and /var/lib/kip-agent (buffer and identity)"
    rm -rf "$ROOT/etc/kip-agent" "$ROOT/var/lib/kip-agent"
    if [ "$LIVE" = 1 ] && getent passwd kip-agent >/dev/null; then
        userdel kip-agent || true
        getent group kip-agent >/dev/null && groupdel kip-agent || true
    fi
else
    say "kept /etc/kip-agent and /var/lib/kip-agent (unsent buffer, identity); --purge removes them"
fi
say "removed kip-agent"
