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
