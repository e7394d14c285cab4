#!/usr/bin/env bash
# The benchmarks behind benches/RESULTS.md: criterion (Rust core) and pytest-benchmark (end to end).
# Assumes scripts/setup.sh --tests has run (`make bench` does that). Numbers are only comparable
# within one run: every workload is measured beside its baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
cargo bench -p vvu-core --bench queue
cargo bench -p vvu-core --bench eventfd
if [ -d benches/e2e ]; then
    pytest benches/e2e --benchmark-enable --benchmark-only -p no:cacheprovider "$@"
fi
# vvu serve blk beside qemu-storage-daemon, measured by `vvu bench blk` (the disk half drops the
# page cache, which needs root). Extra `vvu serve blk` options: VVU_BLK_ARGS="--aio io_uring".
storage=tmpfs
[ "$(id -u)" = 0 ] && storage=tmpfs,disk
python benches/blk_vs_qsd.py --storage "$storage" --vvu-args "${VVU_BLK_ARGS:-}"
python benches/blk_vs_qsd.py --handshake 30 --vvu-args "${VVU_BLK_ARGS:-}"
