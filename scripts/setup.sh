#!/usr/bin/env bash
# Set up everything vvu needs on a fresh Debian 12 machine, idempotently:
# Debian packages, a virtualenv in .venv with the dev tools, and vvu itself built in release mode.
# With --tests, also the real peers the test suite runs against (QEMU and its Linux guest, ...).
set -euo pipefail
# --tests: also the real peers of the test suite (and the dist tools: `make test` checks the wheel).
# --dist: the tools scripts/dist.sh builds and checks the wheel with (maturin, ziglang, auditwheel).
FOR_TESTS=0
FOR_DIST=0
if [ "${1:-}" = "--tests" ]; then FOR_TESTS=1 FOR_DIST=1; fi
if [ "${1:-}" = "--dist" ]; then FOR_DIST=1; fi
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

# Debian packages the test suite uses. Install only what is missing so a second run is fast.
# qemu-system-x86 and the rest run the integration tests' Linux guest (scripts/guest-image.sh):
# busybox-static for its userland, cpio/xz-utils/zstd to build the initramfs and unpack modules.
# qemu-system-common has qemu-storage-daemon, the vhost-user-blk peer of tests/test_qsd.py.
# dpdk-dev has dpdk-testpmd and the virtio-user PMD, the vhost-user-net peer of tests/test_net.py;
# for the back-end VM test its memory is a hugetlbfs file the test makes itself (surplus 2 MiB
# hugepages, a mount in a private namespace: util-linux's unshare/nsenter, root), nothing to set up.
APT_PACKAGES=(build-essential pkg-config python3-venv)
# debootstrap builds the Debian trixie root that QEMU 11 (vfio-user-pci, the back-end VM's VMM)
# comes from (scripts/qemu11.sh); fio runs in the front-end VM, from the host over virtio-9p.
# qemu-utils (qemu-nbd, qemu-img) and nbdkit are the NBD servers of tests/test_blk_nbd.py.
# strace kills a back-end at an exact system call (tests/test_inflight.py).
TEST_PACKAGES=(qemu-system-x86 qemu-system-common busybox-static cpio xz-utils zstd dpdk-dev
    debootstrap fio qemu-utils nbdkit strace)
if ((FOR_TESTS)); then APT_PACKAGES+=("${TEST_PACKAGES[@]}"); fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating virtualenv .venv"
    "$PYTHON" -m venv .venv
fi
log "installing vvu (release build) and dev tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip
# Editable install through the maturin build backend: the same path `pip install .` takes.
EXTRAS=dev
if ((FOR_DIST)); then EXTRAS=dev,dist; fi
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
# The QEMU guest for the integration tests (cached in .cache/guest: instant when already built).
# The "vm" flavour (generic kernel, 9p, VFIO) and QEMU 11 are for the back-end VM tests.
if ((FOR_TESTS)); then
    ./scripts/guest-image.sh
    ./scripts/guest-image.sh --flavour vm
    ./scripts/qemu11.sh
fi
log "setup done"
