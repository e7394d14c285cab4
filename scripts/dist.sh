#!/usr/bin/env bash
# Build what vvu publishes and check it as a user gets it (`make dist`; `make test` runs it):
#
# 1. The sdist (`maturin sdist`).
# 2. The wheel, built from the unpacked sdist by pip through the PEP 517 backend, as `python -m
#    build` and `pip install vvu-*.tar.gz` do: so the sdist is proven to build. It is
#    manylinux2014 (glibc 2.17) abi3, made without a container: MATURIN_PEP517_ARGS asks maturin
#    for `--zig --compatibility manylinux2014`, which links through zig (`ziglang` from PyPI)
#    whose glibc stubs carry 2.17's symbol versions, so nothing newer can be referenced whatever
#    glibc this machine has. (A plain `pip wheel .` here gives linux_x86_64 needing glibc 2.34:
#    no index takes it, older systems cannot load it. That host-linked PEP 517 build is what
#    `pip install -e .` in scripts/setup.sh makes, and the whole test suite runs on it.)
# 3. `auditwheel show` must say the wheel is manylinux_2_17_x86_64 (it reads the symbol versions).
# 4. A fresh venv with only the wheel (and its `test` extra): the smoke tests run against the
#    installed package, not the tree; tests/test_descriptors.py checks which one it imported,
#    what the wheel and the sdist carry, and the installed programs and descriptors.
#
# dist/ (DIST_DIR) gets the sdist and the wheel. Cargo builds in target/ (CARGO_TARGET_DIR if
# set). Each step says how long it took.
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

step "wheel: pip wheel of the sdist, maturin --zig --compatibility manylinux2014"
# maturin finds zig as `python -m ziglang` with the python first on PATH: the venv's.
time (cd "$WORK"/vvu-*/ && PATH="$VENV/bin:$PATH" \
    MATURIN_PEP517_ARGS="--zig --compatibility manylinux2014" "$VENV/bin/python" -m pip wheel \
    -q --disable-pip-version-check --no-deps --no-build-isolation --no-cache-dir -w "$OUT" .)
WHEEL=$(echo "$OUT"/vvu-*-abi3-*.whl)

step "auditwheel show $(basename "$WHEEL")"
"$VENV/bin/auditwheel" show "$WHEEL" | tee "$WORK/auditwheel.txt"
tr -s ' \n' ' ' <"$WORK/auditwheel.txt" | grep -q "consistent with the following platform tag: \"$PLATFORM_TAG\"" || {
    echo "dist.sh: auditwheel does not find the wheel $PLATFORM_TAG" >&2
    exit 1
}

# A venv with nothing but the wheel and what the tests need (its `test` extra). The package is
# under python/, so the tree is not importable from here: tests/test_descriptors.py checks that
# `vvu` and `vvu._core` come from this venv's site-packages and from VVU_WHEEL.
step "smoke tests against the installed wheel ($SMOKE)"
time {
    "${PYTHON:-python3}" -m venv "$WORK/venv"
    "$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[test]"
    # shellcheck disable=SC2086 # SMOKE is a list of test files
    env -u PYTHONPATH VVU_WHEEL="$WHEEL" VVU_SDIST="$SDIST" "$WORK/venv/bin/python" -m pytest \
        -q -p no:cacheprovider $SMOKE
}

step "dist done"
ls -l "$OUT"
