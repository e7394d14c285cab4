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
if command -v cargo-nextest >/dev/null; then
    cargo nextest run -p vvu-core --no-fail-fast
else
    cargo test -p vvu-core
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
step "dist: the manylinux wheel (zig), auditwheel, smoke tests on the installed wheel, the sdist"
./scripts/dist.sh
