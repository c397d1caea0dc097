#!/usr/bin/env bash
# Builds the agent's Debian package from the release tarball (same binary, ONNX Runtime library,
# models and unit, checked against its SHA256SUMS):
#   target/dist/kip-agent_<version>-<revision>_amd64.deb
# Layout: the versioned install root of self-update, /opt/kip-agent/bin/kip-agent-launcher and
# the slot /opt/kip-agent/versions/<version>/ (VERSION, bin/kip-agent, lib/kip-agent/
# libonnxruntime.so.*, share/kip-agent/models/); /usr/bin/kip-agent and /usr/share/kip-agent/
# models are links through /opt/kip-agent/current (made by postinst); /lib/systemd/system/
# kip-agent.service, /etc/kip-agent/agent.toml (conffile), and the maintainer scripts of
# deploy/debian/ (user, install root, /var/lib/kip-agent, remove vs purge). Only dpkg-deb is
# needed. Prints the package's path on stdout.
#
#   scripts/package-agent-deb.sh [--tarball PATH] [--revision N] [--fast] [package-agent.sh args]
# --tarball repackages an existing tarball instead of running scripts/package-agent.sh;
# --revision sets the Debian revision (default 1); --fast compresses with gzip -1 (tests).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

TARBALL=
REVISION=1
COMPRESS=(-Zxz)
PASS_ON=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tarball) TARBALL="${2:?}"; shift 2 ;;
        --revision) REVISION="${2:?}"; shift 2 ;;
        --fast) COMPRESS=(-Zgzip -z1); shift ;;
        *) PASS_ON+=("$1"); shift ;;
    esac
done
[[ "$REVISION" =~ ^[0-9]+$ ]] || die "--revision must be a number"
command -v dpkg-deb >/dev/null || die "dpkg-deb not found (Debian package dpkg)"
[ -n "$TARBALL" ] || TARBALL="$(scripts/package-agent.sh "${PASS_ON[@]}" | tail -n1)"
[ -f "$TARBALL" ] || die "no tarball $TARBALL"

ARCH="$(dpkg --print-architecture)"
[ "$ARCH" = amd64 ] || die "the release tarball is x86_64; building on $ARCH is not supported"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar -C "$WORK" -xzf "$TARBALL"
REL="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'kip-agent-*')"
(cd "$REL" && sha256sum -c --quiet SHA256SUMS) || die "$TARBALL: checksums do not match"
# Debian orders '~' before anything: 0.2.0-rc1 becomes 0.2.0~rc1 (older than 0.2.0).
VERSION="$(tr '-' '~' < "$REL/VERSION")-$REVISION"

PKG="$WORK/pkg"
SLOT_VERSION="$(cat "$REL/VERSION")"
SLOT="$PKG/opt/kip-agent/versions/$SLOT_VERSION"
install -d -m 0755 "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/share/kip-agent" "$PKG/opt/kip-agent/bin" \
    "$SLOT/bin" "$SLOT/lib/kip-agent" "$SLOT/share/kip-agent/models" \
    "$PKG/usr/share/doc/kip-agent" "$PKG/lib/systemd/system"
install -d -m 0750 "$PKG/etc/kip-agent"
# The slot is what self-update unpacks from a release tarball: the agent reports the version
# of its slot's VERSION file and finds ONNX Runtime at ../lib/kip-agent.
install -m 0644 "$REL/VERSION" "$SLOT/VERSION"
install -m 0755 "$REL/bin/kip-agent" "$SLOT/bin/kip-agent"
install -m 0644 "$REL"/lib/kip-agent/libonnxruntime.so.* "$SLOT/lib/kip-agent/"
install -m 0644 "$REL"/share/kip-agent/models/* "$SLOT/share/kip-agent/models/"
install -m 0755 "$REL/bin/kip-agent-launcher" "$PKG/opt/kip-agent/bin/kip-agent-launcher"
# Relative links, so they also resolve inside a dpkg --root.
ln -s ../../opt/kip-agent/current/bin/kip-agent "$PKG/usr/bin/kip-agent"
ln -s ../../../opt/kip-agent/current/share/kip-agent/models "$PKG/usr/share/kip-agent/models"
install -m 0644 "$REL"/share/doc/kip-agent/* deploy/debian/copyright "$PKG/usr/share/doc/kip-agent/"
install -m 0644 "$REL/systemd/kip-agent.service" "$PKG/lib/systemd/system/kip-agent.service"
install -m 0640 "$REL/etc/kip-agent/agent.toml.example" "$PKG/etc/kip-agent/agent.toml"
install -D -m 0644 deploy/debian/lintian-overrides "$PKG/usr/share/lintian/overrides/kip-agent"
printf 'kip-agent (%s) stable; urgency=medium\n\n  * Built from the kip release tarball %s.\n\n -- kip maintainers <kip@example.com>  Thu, 01 Jan 2026 00:00:00 +0000\n' \
    "$VERSION" "$(basename "$TARBALL")" | gzip -9n > "$PKG/usr/share/doc/kip-agent/changelog.Debian.gz"
chmod 0644 "$PKG/usr/share/doc/kip-agent/changelog.Debian.gz"
install -m 0755 deploy/debian/prerm deploy/debian/postrm "$PKG/DEBIAN/"
sed "s/@SLOT@/$SLOT_VERSION/" deploy/debian/postinst > "$PKG/DEBIAN/postinst"
chmod 0755 "$PKG/DEBIAN/postinst"
echo /etc/kip-agent/agent.toml > "$PKG/DEBIAN/conffiles"
# Binary and library need glibc >= 2.34 (GLIBC_2.34 symbols) and libstdc++/libgcc (ONNX Runtime).
cat > "$PKG/DEBIAN/control" <<CONTROL
Package: kip-agent
Version: $VERSION
Architecture: $ARCH
Maintainer: kip maintainers <kip@example.com>
Installed-Size: $(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
Depends: libc6 (>= 2.34), libgcc-s1, libstdc++6, passwd
Section: net
Priority: optional
Homepage: https://github.com/kip/kip
Description: kip edge agent (machine data ingest, buffer, inference, sync)
 Reads machine data from MQTT brokers and OPC UA servers, buffers it durably
 on the gateway, runs the RUL model on-device (ONNX Runtime included) and syncs
 to the kip control plane over mTLS. Runs as the kip-agent system user under a
 hardened systemd unit.
CONTROL

DEB="$KIP_ROOT/target/dist/kip-agent_${VERSION}_$ARCH.deb"
mkdir -p "$(dirname "$DEB")"
# --root-owner-group: every file root:root whoever builds; fixed mtimes for reproducibility.
find "$PKG" -exec touch -h -d '2026-01-01 00:00Z' {} +
SOURCE_DATE_EPOCH=1767225600 dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$PKG" "$DEB" >/dev/null
say "wrote $DEB ($(du -h "$DEB" | cut -f1))"
echo "$DEB"
