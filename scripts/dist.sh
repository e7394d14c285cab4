#!/usr/bin/env bash
# Build what vvu publishes and check it as a user would get it (`make dist`; `make test` runs it):
#
# 1. The wheel: manylinux2014 (glibc 2.17) abi3, built without a container. `maturin build --zig`
#    links through zig (`ziglang` from PyPI), whose glibc stubs carry 2.17's symbol versions, so
#    nothing newer can be referenced whatever glibc this machine has. A plain `pip wheel .` here
#    gives linux_x86_64 (manylinux_2_34 at best): no index takes it, older systems cannot load it.
# 2. `auditwheel show` must say the wheel is manylinux_2_17_x86_64 (it reads the symbol versions).
# 3. A fresh venv with only the wheel (and its `test` extra): the smoke tests run against the
#    installed package, not the tree (tests/test_descriptors.py checks which one it imported).
# 4. The sdist, and a wheel built from it by pip (what `pip install vvu-*.tar.gz` does, with the
#    host's own linker), installed into a second fresh venv: the same descriptor and program
#    checks pass there.
#
# Everything lands in dist/ (DIST_DIR). Cargo's build directory is target/dist (CARGO_TARGET_DIR
# unless set), shared by both builds so that the sdist build recompiles only vvu itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
OUT=${DIST_DIR:-$ROOT/dist}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/dist}
# The smoke tests: the descriptors and programs, the engine against the native module, the CLI.
SMOKE=${SMOKE:-tests/test_descriptors.py tests/test_engine.py tests/test_cli.py}
PLATFORM_TAG=manylinux_2_17_x86_64

step() { printf '\n==> %s\n' "$*"; }
seconds() { date +%s; }

rm -rf "$OUT"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

t0=$(seconds)
step "wheel: maturin build --release --zig --compatibility manylinux2014"
# maturin finds zig as `python -m ziglang` with the python it runs under: the venv's.
PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" build --release --zig --compatibility manylinux2014 \
    --interpreter python3.11 --out "$OUT" --quiet
step "sdist: maturin sdist"
"$VENV/bin/maturin" sdist --out "$OUT"
WHEEL=$(echo "$OUT"/vvu-*-abi3-*manylinux*.whl)
SDIST=$(echo "$OUT"/vvu-*.tar.gz)
t1=$(seconds)

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
    unset PYTHONPATH
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel[test]"
    VVU_WHEEL=$wheel VVU_SDIST=$SDIST "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

step "smoke tests against the installed wheel ($SMOKE)"
# shellcheck disable=SC2086 # SMOKE is a list of test files
smoke "$WORK/venv-wheel" "$WHEEL" $SMOKE
t2=$(seconds)

step "a wheel built from the sdist by pip, installed and checked"
"$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$WORK/from-sdist" "$SDIST"
SDIST_WHEEL=$(echo "$WORK"/from-sdist/vvu-*.whl)
smoke "$WORK/venv-sdist" "$SDIST_WHEEL" tests/test_descriptors.py
t3=$(seconds)

step "dist done: build $((t1 - t0)) s, auditwheel and smoke $((t2 - t1)) s, sdist wheel $((t3 - t2)) s"
ls -l "$OUT"
