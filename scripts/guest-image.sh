#!/usr/bin/env bash
# Build the tiny Linux guest that the integration tests boot under QEMU (tests/guest.py):
#
#   .cache/guest/vmlinuz            Debian's cloud kernel (downloaded and unpacked, never installed)
#   .cache/guest/initramfs.cpio.gz  static busybox, the virtio modules (uncompressed) and /init
#   .cache/guest/image.env          what was built: kernel version, modules in load order, hash
#
# Idempotent and cached: when the outputs exist and were built by this very script, it exits at
# once. Editing this script (e.g. /init below) rebuilds the image; so does --force.
#
# How a test's script reaches the guest: the host passes it as a QEMU fw_cfg file,
#     -fw_cfg name=opt/vvu/script,file=HOST_FILE
# and /init reads /sys/firmware/qemu_fw_cfg/by_name/opt/vvu/script/raw (qemu_fw_cfg is a module in
# this kernel, loaded by /init). No size limit and no quoting. For quick manual runs /init also
# accepts the script base64-encoded in a `vvu.script=` kernel parameter (the whole command line is
# limited to 2048 bytes on x86). /init prints on the serial console (ttyS0):
#     VVU-RESULT-BEGIN
#     <the script's stdout and stderr>
#     VVU-RESULT-END          (preceded by one extra newline, which the parser removes)
#     VVU-EXIT <status>
# and powers off (`poweroff -f`; run QEMU with -no-reboot, and panic=-1 turns a panic into an exit).
#
# Two flavours (--flavour NAME):
#   small (default)  Debian's cloud kernel; the front-end guests of the peer tests.
#   vm               Debian's generic kernel plus virtio-9p and VFIO, for guests that run vvu
#                    itself: the back-end VM (tests/test_backend_vm.py) mounts the host's file
#                    system read-only over virtio-9p, chroots into it and runs the host's vvu
#                    with its VFIO driver (the cloud kernel has no 9p). Output: .cache/guest-vm.
#
# Environment: VVU_GUEST_CACHE (output directory, default .cache/guest or .cache/guest-vm),
# VVU_GUEST_KERNEL (a linux-image-* package name, default: what the flavour's meta package
# (linux-image-cloud-amd64, linux-image-amd64) depends on).
set -euo pipefail
cd "$(dirname "$0")/.."

FORCE=0
FLAVOUR=small
while (($#)); do
    case "$1" in
        --force) FORCE=1 ;;
        --flavour) FLAVOUR=${2:?--flavour needs a name}; shift ;;
        *) echo "usage: $0 [--force] [--flavour small|vm]" >&2; exit 2 ;;
    esac
    shift
done

# Modules the guest needs, by module name; their dependencies are added from modules.dep.
# virtio_pci: the transport; virtio_blk, virtio_net, virtio_rng, virtio_console (hvc0),
# virtio_input and evdev (/dev/input/event*), vmw_vsock_virtio_transport (AF_VSOCK): the
# devices under test; qemu_fw_cfg: how the script reaches the guest. rng_core (HW_RANDOM) is
# built into this kernel.
WANTED_MODULES=(virtio_pci virtio_blk virtio_net virtio_rng virtio_console virtio_input evdev
    vmw_vsock_virtio_transport qemu_fw_cfg)
case "$FLAVOUR" in
    small)
        KERNEL_META=linux-image-cloud-amd64
        CACHE=${VVU_GUEST_CACHE:-$PWD/.cache/guest}
        ;;
    vm)
        # 9p over virtio: the host's file system; vfio_pci and vfio_iommu_type1: the VVU driver's
        # way to the device (intel_iommu is built into this kernel).
        KERNEL_META=linux-image-amd64
        CACHE=${VVU_GUEST_CACHE:-$PWD/.cache/guest-vm}
        WANTED_MODULES+=(9p 9pnet_virtio vfio_pci vfio_iommu_type1)
        ;;
    *) echo "guest-image: unknown flavour $FLAVOUR (small, vm)" >&2; exit 2 ;;
esac
SELF_HASH=$( (sha256sum "$0" | cut -d' ' -f1; echo "$FLAVOUR") | sha256sum | cut -d' ' -f1)

log() { printf '==> guest-image: %s\n' "$*" >&2; }
die() { printf 'guest-image: %s\n' "$*" >&2; exit 1; }

up_to_date() {
    [ "$FORCE" = 0 ] && [ -s "$CACHE/vmlinuz" ] && [ -s "$CACHE/initramfs.cpio.gz" ] &&
        [ -f "$CACHE/image.env" ] && grep -qx "SCRIPT_HASH=$SELF_HASH" "$CACHE/image.env"
}
up_to_date && exit 0

mkdir -p "$CACHE"
# One builder at a time (setup.sh and a test session may both ask).
exec 9>"$CACHE/.lock"
flock 9
up_to_date && exit 0

for tool in apt-get apt-cache dpkg-deb cpio gzip; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup.sh)"
done

WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

APT_OPTS=(-qq)
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)

apt_update_once_done=0
apt_update_once() {
    [ "$apt_update_once_done" = 1 ] && return 0
    apt_update_once_done=1
    [ "$(id -u)" -eq 0 ] || return 0
    log "apt-get update"
    apt-get update -qq >/dev/null
}

# Download one Debian package into $WORK/debs (updating the package lists once if need be).
fetch_deb() {
    local pkg=$1
    mkdir -p "$WORK/debs"
    (cd "$WORK/debs" && apt-get download "${APT_OPTS[@]}" "$pkg" >/dev/null 2>&1) || {
        apt_update_once
        (cd "$WORK/debs" && apt-get download "${APT_OPTS[@]}" "$pkg" >/dev/null)
    } || die "cannot download $pkg"
    ls "$WORK/debs/${pkg}_"*.deb
}

kernel_package() {
    if [ -n "${VVU_GUEST_KERNEL:-}" ]; then
        echo "$VVU_GUEST_KERNEL"
        return
    fi
    local pkg
    pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    if [ -z "$pkg" ]; then
        apt_update_once
        pkg=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    fi
    [ -n "$pkg" ] || die "cannot resolve $KERNEL_META to a kernel package"
    echo "$pkg"
}

# --- the kernel --------------------------------------------------------------------------------
KPKG=$(kernel_package)
log "fetching $KPKG"
KDEB=$(fetch_deb "$KPKG")
dpkg-deb -x "$KDEB" "$WORK/kernel"
KVER=$(ls "$WORK/kernel/lib/modules")
[ "$(wc -w <<<"$KVER")" = 1 ] || die "expected one kernel version in $KPKG, found: $KVER"
MODROOT=$WORK/kernel/lib/modules/$KVER
[ -f "$WORK/kernel/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KPKG"

# --- busybox (static) --------------------------------------------------------------------------
if dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
    BUSYBOX=/bin/busybox
else
    log "fetching busybox-static"
    dpkg-deb -x "$(fetch_deb busybox-static)" "$WORK/busybox"
    BUSYBOX=$WORK/busybox/bin/busybox
fi
[ -x "$BUSYBOX" ] || die "no busybox binary"

# --- modules: decompress, compute the dependency closure from modules.dep, order it -------------
# busybox insmod wants plain .ko files, and busybox depmod may not read every compression.
find "$MODROOT" -name '*.ko.xz' -exec xz -d {} +
find "$MODROOT" -name '*.ko.zst' -exec zstd -q -d --rm {} +
find "$MODROOT" -name '*.ko.gz' -exec gzip -d {} +
if [ ! -f "$MODROOT/modules.dep" ]; then
    # Debian ships no modules.dep (it is made at install time): make it the same way.
    if command -v depmod >/dev/null; then
        depmod -b "$WORK/kernel" "$KVER"
    else
        "$BUSYBOX" depmod -b "$WORK/kernel" "$KVER"
    fi
fi
declare -A DEP_PATH=() DEPS=()
while IFS= read -r line; do
    path=${line%%:*}
    name=$(basename "$path" .ko)
    name=${name//-/_}
    DEP_PATH[$name]=$path
    DEPS[$name]=${line#*:}
done <"$MODROOT/modules.dep"
ORDER=()
declare -A SEEN=()
visit() { # depth-first: every dependency before the module itself
    local name=${1//-/_} dep
    [ -n "${SEEN[$name]:-}" ] && return
    SEEN[$name]=1
    [ -n "${DEP_PATH[$name]:-}" ] || {
        grep -q "/${name}.ko" "$MODROOT/modules.builtin" 2>/dev/null && return
        die "module $name is neither in modules.dep nor built in"
    }
    for dep in ${DEPS[$name]}; do visit "$(basename "$dep" .ko)"; done
    ORDER+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do visit "$m"; done

# --- the initramfs -----------------------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,mnt,etc/vvu,lib/modules/vvu}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
ln -s bin "$ROOT/sbin"
for m in "${ORDER[@]}"; do
    cp "$MODROOT/${DEP_PATH[$m]}" "$ROOT/lib/modules/vvu/$m.ko"
    echo "$m" >>"$ROOT/etc/vvu/modules"
done
echo "$KVER" >"$ROOT/etc/vvu/kernel"

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# vvu test guest: mount, load the virtio modules, run the host's script, report, power off.
export PATH=/bin HOME=/tmp
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts

while read -r m; do
    insmod "/lib/modules/vvu/$m.ko" || echo "vvu-init: insmod $m failed"
done </etc/vvu/modules
# From here on kernel messages go to dmesg only, so the result block stays clean.
echo 1 >/proc/sys/kernel/printk

script=/run/vvu-script.sh
fwcfg=/sys/firmware/qemu_fw_cfg/by_name/opt/vvu/script/raw
if [ -r "$fwcfg" ]; then
    cat "$fwcfg" >"$script"
else
    for arg in $(cat /proc/cmdline); do
        case "$arg" in vvu.script=*) echo "${arg#vvu.script=}" | base64 -d >"$script" ;; esac
    done
fi

echo "VVU-RESULT-BEGIN"
if [ -f "$script" ]; then
    (cd /tmp && exec sh "$script") 2>&1
    status=$?
else
    echo "vvu-init: no script (neither fw_cfg opt/vvu/script nor vvu.script=)"
    status=127
fi
printf '\nVVU-RESULT-END\n'
echo "VVU-EXIT $status"
sync
poweroff -f
# Not reached unless the power-off failed; with panic=-1 and -no-reboot the exit ends QEMU too.
echo o >/proc/sysrq-trigger
sleep 5
exit "$status"
EOF
chmod +x "$ROOT/init"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) |
    gzip -6 >"$WORK/initramfs.cpio.gz"

cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cat >"$WORK/image.env" <<EOF
KERNEL_PACKAGE=$KPKG
KERNEL_VERSION=$KVER
MODULES="${ORDER[*]}"
SCRIPT_HASH=$SELF_HASH
EOF
# Outputs appear together: image.env (the "done" mark) last.
rm -f "$CACHE/image.env"
mv -f "$WORK/vmlinuz" "$CACHE/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz"
mv -f "$WORK/image.env" "$CACHE/image.env"
log "built $CACHE ($KVER; modules: ${ORDER[*]})"
