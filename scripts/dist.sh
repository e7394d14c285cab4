#!/usr/bin/env bash
# Build what vvu publishes and check it as a user gets it (`make dist`; `make test` runs it):
#
# 1. The sdist, and the wheel built from it (as `python -m build` does): manylinux2014 (glibc
#    2.17) abi3, without a container. `maturin build --zig` links through zig (`ziglang` from
#    PyPI), whose glibc stubs carry 2.17's symbol versions, so nothing newer can be referenced
#    whatever glibc this machine has. (A plain `pip wheel .` here gives linux_x86_64, needing
#    glibc 2.34: no index takes it, older systems cannot load it.) Building it from the unpacked
#    sdist also proves the sdist has everything a build needs.
# 2. `auditwheel show` must say the wheel is manylinux_2_17_x86_64 (it reads the symbol versions).
# 3. A fresh venv with only the wheel (and its `test` extra): the smoke tests run against the
#    installed package, not the tree (tests/test_descriptors.py checks which one it imported).
# 4. pip's own build of the sdist (PEP 517, the host's linker: what `pip install vvu-*.tar.gz`
#    does), installed into a second fresh venv, passes tests/test_descriptors.py there. It reuses
#    the compiled crates of step 1 (same sources, same target directory), so it only relinks.
#
# dist/ (DIST_DIR) gets the sdist and the manylinux wheel. Cargo builds in target/ (CARGO_TARGET_DIR
# if set), shared with the editable install. Each step says how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
OUT=${DIST_DIR:-$ROOT/dist}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# The smoke tests: the descriptors and programs, the engine against the native module, the CLI.
SMOKE=${SMOKE:-tests/test_descriptors.py tests/test_engine.py tests/test_cli.py}
PLATFORM_TAG=manylinux_2_17_x86_64
TIMEFORMAT='    (%R s wall, %U s user, %S s sys)'

step() { printf '\n==> %s\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step "sdist: maturin sdist"
time "$VENV/bin/maturin" sdist --out "$OUT" >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(echo "$OUT"/vvu-*.tar.gz)
tar -xzf "$SDIST" -C "$WORK"
SRC=$(echo "$WORK"/vvu-*/)

step "wheel from the sdist: maturin build --release --zig --compatibility manylinux2014"
# maturin finds zig as `python -m ziglang` with the python first on PATH: the venv's.
time (cd "$SRC" && PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" build --release --zig \
    --compatibility manylinux2014 --interpreter python3.11 --out "$OUT" --quiet)
WHEEL=$(echo "$OUT"/vvu-*-abi3-*manylinux*.whl)

step "auditwheel show $(basename "$WHEEL")"
"$VENV/bin/auditwheel" show "$WHEEL" | tee "$WORK/auditwheel.txt"
tr -s ' \n' ' ' <"$WORK/auditwheel.txt" | grep -q "consistent with the following platform tag: \"$PLATFORM_TAG\"" || {
    echo "dist.sh: auditwheel does not find the wheel $PLATFORM_TAG" >&2
    exit 1
}

# A venv with nothing but the wheel and what the tests need (its `test` extra). The package is
# under python/, so the tree is not importable from here: tests/test_descriptors.py checks that
# `vvu` and `vvu._core` come from this venv's site-packages and from VVU_WHEEL.
smoke() { # smoke VENV WHEEL TESTS...
    local venv=$1 wheel=$2
    shift 2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel[test]"
    env -u PYTHONPATH VVU_WHEEL="$wheel" VVU_SDIST="$SDIST" "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider "$@"
}

step "smoke tests against the installed wheel ($SMOKE)"
# shellcheck disable=SC2086 # SMOKE is a list of test files
time smoke "$WORK/venv-wheel" "$WHEEL" $SMOKE

step "pip's wheel of the sdist (PEP 517), installed and checked"
time {
    "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
        --no-build-isolation -w "$WORK/from-sdist" "$SRC"
    smoke "$WORK/venv-sdist" "$(echo "$WORK"/from-sdist/vvu-*.whl)" tests/test_descriptors.py
}

step "dist done"
ls -l "$OUT"
