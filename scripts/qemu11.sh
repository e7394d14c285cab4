#!/usr/bin/env bash
# QEMU 11 for the back-end-VM tests: Debian 12 ships QEMU 7.2, which has no vfio-user client
# (`vfio-user-pci` arrived in QEMU 10.1). Build a Debian trixie root with debootstrap, install
# qemu-system-x86 from trixie-backports into it, and leave a launcher beside it:
#
#   .cache/qemu11/root/                 the trixie root (minbase + QEMU and its firmware)
#   .cache/qemu11/qemu-system-x86_64    runs the root's QEMU on this machine (see below)
#   .cache/qemu11/qemu.env              what was built: QEMU's version, this script's hash
#
# The launcher runs the root's QEMU through the root's own dynamic loader and libraries, with
# its firmware (-L) and modules (QEMU_MODULE_DIR) from the root: no chroot and no bind mounts,
# so QEMU sees the host's /dev, /tmp and work tree as they are (a test can share the host's
# filesystem with a guest over virtio-9p), nothing is left mounted when a test dies, and the
# launcher execs, so its PID is QEMU's.
#
# The mirror is the one this machine's own apt sources name (no host name lives in the repo).
# Idempotent and cached: when the outputs exist and were built by this very script, it exits at
# once; editing the script rebuilds; so does --force. Needs root (debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${VVU_QEMU11_CACHE:-$PWD/.cache/qemu11}
SELF_HASH=$(sha256sum "$0" | cut -d' ' -f1)
SUITE=trixie
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

log() { printf '==> qemu11: %s\n' "$*" >&2; }
die() { printf 'qemu11: %s\n' "$*" >&2; exit 1; }

up_to_date() {
    [ "$FORCE" = 0 ] && [ -x "$CACHE/qemu-system-x86_64" ] && [ -f "$CACHE/qemu.env" ] &&
        grep -qx "SCRIPT_HASH=$SELF_HASH" "$CACHE/qemu.env"
}
up_to_date && exit 0

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
up_to_date && exit 0

[ "$(id -u)" -eq 0 ] || die "building the QEMU 11 root needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap not found (scripts/setup.sh --tests installs it)"

# The Debian mirror of this machine's apt sources: deb822 (*.sources, URIs:) or one-line format.
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "${uri%/}"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && { echo "${uri%/}"; return; }
    done
}
MIRROR=$(debian_mirror)
[ -n "$MIRROR" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"

WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

log "debootstrap $SUITE from this machine's mirror"
debootstrap --variant=minbase "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -20 "$WORK/debootstrap.log" >&2
    die "debootstrap failed"
}
echo "deb $MIRROR $SUITE-backports main" >"$ROOT/etc/apt/sources.list.d/backports.list"
log "installing qemu-system-x86 from $SUITE-backports"
# apt and the packages' scripts want /proc; mount it in a private mount namespace, so it goes
# away with the namespace whatever happens.
unshare --mount --propagation private sh -c '
    set -e
    mount -t proc proc "$1/proc"
    chroot "$1" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get install -y -qq --no-install-recommends \
        -t "$2-backports" qemu-system-x86
    chroot "$1" apt-get clean
' sh "$ROOT" "$SUITE" >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; die "apt-get in the root failed"; }

cat >"$WORK/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU 11 from the trixie root beside this file (scripts/qemu11.sh): its loader, libraries,
# firmware and modules, the host's everything else.
root=$(dirname "$(readlink -f "$0")")/root
export QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
exec "$root/lib64/ld-linux-x86-64.so.2" \
    --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    "$root/usr/bin/qemu-system-x86_64" -L "$root/usr/share/qemu" -L "$root/usr/share/seabios" "$@"
EOF
chmod +x "$WORK/qemu-system-x86_64"

rm -rf "$CACHE/root" "$CACHE/qemu.env"
mv "$ROOT" "$CACHE/root"
mv -f "$WORK/qemu-system-x86_64" "$CACHE/qemu-system-x86_64"
VERSION=$("$CACHE/qemu-system-x86_64" --version | head -1)
case "$VERSION" in
    *"version 1"[1-9].*) ;;
    *) die "expected QEMU 11 or later, got: $VERSION" ;;
esac
"$CACHE/qemu-system-x86_64" -machine none -device vfio-user-pci,help >/dev/null ||
    die "this QEMU has no vfio-user-pci device"
cat >"$WORK/qemu.env" <<EOF
QEMU_VERSION="$VERSION"
SCRIPT_HASH=$SELF_HASH
EOF
mv -f "$WORK/qemu.env" "$CACHE/qemu.env"
log "built $CACHE ($VERSION)"
