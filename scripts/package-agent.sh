#!/usr/bin/env bash
# Builds the agent release tarball for gateways:
#   target/dist/kip-agent-<version>-x86_64-linux.tar.gz
# with bin/kip-agent, lib/kip-agent/libonnxruntime.so.<ver> (found by the agent at
# ../lib/kip-agent/ next to its binary), the reference model, an example config, the hardened
# systemd unit, install.sh and uninstall.sh. Prints the tarball's path on stdout.
#
#   scripts/package-agent.sh [--profile release|debug] [--no-build]
# --no-build packages the binary already in the target directory.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KIP_ROOT"

PROFILE=release
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) PROFILE="${2:?}"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        *) die "package-agent.sh: unknown argument $1" ;;
    esac
done
case "$PROFILE" in release|debug) ;; *) die "--profile must be release or debug" ;; esac

ensure_ort
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)"
[ -n "$VERSION" ] || die "cannot read the workspace version from Cargo.toml"
NAME="kip-agent-$VERSION-x86_64-linux"
TARGET="${CARGO_TARGET_DIR:-$KIP_ROOT/target}"
DIST="$KIP_ROOT/target/dist"

if [ "$BUILD" = 0 ]; then
    [ -x "$TARGET/$PROFILE/kip-agent" ] || die "--no-build: no $TARGET/$PROFILE/kip-agent"
elif [ "$PROFILE" = release ]; then
    say "building kip-agent ($PROFILE)"
    cargo build --release --locked -p kip-agent
else
    say "building kip-agent ($PROFILE)"
    cargo build --locked -p kip-agent
fi

STAGE="$DIST/$NAME"
rm -rf "$STAGE"
install -d "$STAGE/bin" "$STAGE/lib/kip-agent" "$STAGE/share/kip-agent/models" \
    "$STAGE/share/doc/kip-agent" "$STAGE/etc/kip-agent" "$STAGE/systemd"
install -m 0755 "$TARGET/$PROFILE/kip-agent" "$STAGE/bin/kip-agent"
install -m 0644 "$ORT_DYLIB_PATH" "$STAGE/lib/kip-agent/"
# Every fleet's model: ml/models/ (the default) and ml/models/<fleet>/, flat in the package.
install -m 0644 ml/models/*.onnx ml/models/*.json ml/models/*/*.onnx ml/models/*/*.json \
    "$STAGE/share/kip-agent/models/"
install -m 0644 deploy/agent.toml "$STAGE/etc/kip-agent/agent.toml.example"
install -m 0644 deploy/systemd/kip-agent.service "$STAGE/systemd/kip-agent.service"
install -m 0644 docs/install-agent.md "$STAGE/share/doc/kip-agent/install-agent.md"
install -m 0755 deploy/agent-release/install.sh deploy/agent-release/uninstall.sh "$STAGE/"
# The self-update launcher (docs/operations.md "Agent self-update"); installed outside the
# version slots, at <install root>/bin/.
install -m 0755 deploy/agent-release/kip-agent-launcher "$STAGE/bin/kip-agent-launcher"
echo "$VERSION" > "$STAGE/VERSION"
(cd "$STAGE" && find . -type f ! -name SHA256SUMS -printf '%P\n' | LC_ALL=C sort | xargs sha256sum > SHA256SUMS)

# Reproducible archive: fixed owner, order and mtime.
TARBALL="$DIST/$NAME.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
    -C "$DIST" -czf "$TARBALL" "$NAME"
rm -rf "$STAGE"
say "wrote $TARBALL ($(du -h "$TARBALL" | cut -f1))"
echo "$TARBALL"
