#!/usr/bin/env bash
# Every check the project has: Rust tests, lints and formatting, Python tests, typing and stubs.
# Assumes scripts/setup.sh has run (`make test` does that).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo tests (vvu-core: unit, property, differential, hostile)"
# Tests that need root (a TAP device in a network namespace) are #[ignore]d; run them as root,
# as CI does. CI must run them: there, not being root is a failure.
ignored=()
if [ "$(id -u)" -eq 0 ]; then
    ignored=(--run-ignored all)
elif [ "${CI:-}" = true ]; then
    echo "CI must run as root (the TAP test needs CAP_NET_ADMIN)" >&2
    exit 1
fi
if command -v cargo-nextest >/dev/null; then
    cargo nextest run -p vvu-core --no-fail-fast "${ignored[@]}"
else
    cargo test -p vvu-core -- ${ignored:+--include-ignored}
fi
step "ruff"
ruff check python tests benches
ruff format --check python tests benches
step "mypy --strict"
mypy
step "stubtest (vvu._core against python/vvu/_core.pyi)"
python -m mypy.stubtest vvu._core --allowlist .stubtest-allowlist
step "pytest"
pytest
step "end-to-end benchmarks, run once each as smoke tests (timings: make bench)"
pytest benches/e2e -q -p no:cacheprovider
step "soak, short variant (the long one: scripts/soak.sh; docs/reliability.md)"
scripts/soak.sh --short
step "dist: the manylinux wheel (zig), auditwheel, smoke tests on the installed wheel, the sdist"
./scripts/dist.sh
