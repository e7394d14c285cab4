#!/usr/bin/env python3
"""Mutation check: small, plausible bugs that the test suite must catch.

Each mutation replaces one exact piece of text in one file, in a temporary copy of the tracked
tree (the real tree is never touched), and runs a named, fast subset of the tests there: that
subset must FAIL. A mutation that survives (its subset passes) is a hole in the suite; a
mutation whose text is no longer found means the code moved: update the list below. Before
the mutations, each subset runs once unmutated and must pass (else the check proves nothing).

    scripts/mutation-check.py              # all of them (docs/reliability.md lists them)
    scripts/mutation-check.py --python     # the Python ones only (about a minute)
    scripts/mutation-check.py --rust       # the Rust ones only
    scripts/mutation-check.py --list       # what it would run

Exit status 0 when every mutation was caught. Rust mutations rebuild vvu-core's tests once per
mutation, in a target directory of their own ($CARGO_TARGET_DIR/mutation, or target/mutation).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    #: The command that must fail on the mutant, run at the copy's root.
    check: tuple[str, ...]

    @property
    def rust(self) -> bool:
        return self.path.endswith(".rs")


def pytest(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args)


def nextest(*args: str) -> tuple[str, ...]:
    return ("cargo", "nextest", "run", "-p", "vvu-core", "--no-fail-fast", *args)


ENGINE = "python/vvu/engine/__init__.py"
ENGINE_MEMORY = "python/vvu/engine/memory.py"
BAD_INPUT = pytest("tests/test_engine.py", "-k", "test_bad_input and unix")

MUTATIONS = [
    # -- the engine (issue 11: each of these once passed the whole non-guest suite) --
    Mutation(
        "SET_VRING_NUM without its upper bound",
        ENGINE,
        "if not 0 < num <= self.backend.max_queue_size:",
        "if not 0 < num:",
        BAD_INPUT,
    ),
    Mutation(
        "SET_VRING_BASE without the 16-bit check",
        ENGINE,
        "if not packed and msg.payload.num > 0xFFFF:",
        "if False:",
        BAD_INPUT,
    ),
    Mutation(
        "ADD_MEM_REG accepts one slot too many",
        ENGINE_MEMORY,
        "if len(self.regions) >= MAX_MEM_SLOTS:",
        "if len(self.regions) > MAX_MEM_SLOTS:",
        BAD_INPUT,
    ),
    Mutation(
        "REM_MEM_REG matches on the guest address alone",
        ENGINE_MEMORY,
        "if (r.guest_phys_addr, r.userspace_addr, r.memory_size)\n"
        "                == (target.guest_phys_addr, target.userspace_addr, target.memory_size)",
        "if r.guest_phys_addr == target.guest_phys_addr",
        BAD_INPUT,
    ),
    Mutation(
        "SET_VRING_BASE accepted while the ring runs",
        ENGINE,
        'raise RequestFailed(f"vring {vring.index} is running; SET_VRING_BASE needs it stopped")',
        "pass",
        BAD_INPUT,
    ),
    # -- the e2e benchmarks' smoke run must notice a back-end that does no work --
    Mutation(
        "the rng handler writes nothing",
        "python/vvu/backends/rng.py",
        "got += os.readv(self._urandom, views[start : start + _IOV_MAX])",
        "got += sum(len(v) for v in views[start : start + _IOV_MAX])",
        pytest("benches/e2e/test_handler.py"),
    ),
    # -- Rust: bounds the hostile tests exist for (bounded by tests/common: RLIMIT_AS, CPU) --
    Mutation(
        "a region contains the byte after its end",
        "rust/core/src/memory.rs",
        "gpa >= self.spec.guest_phys_addr && gpa < self.spec.gpa_end()",
        "gpa >= self.spec.guest_phys_addr && gpa <= self.spec.gpa_end()",
        nextest("--test", "queue_hostile", "--test", "queue_oracle", "--lib"),
    ),
    Mutation(
        "an indirect table length that is not a multiple of 16",
        "rust/core/src/queue/split.rs",
        "if len == 0 || len % 16 != 0 || entries > MAX_INDIRECT_DESCRIPTORS {",
        "if len == 0 || entries > MAX_INDIRECT_DESCRIPTORS {",
        nextest("--test", "queue_hostile"),
    ),
    Mutation(
        "descriptors reused across the chains of one pop go uncharged",
        "rust/core/src/queue/split.rs",
        # The second of two identical runs (the one for new heads): anchored on what follows.
        ".checked_sub(cost.ring)\n                    .ok_or(ChainFault::DescriptorsReused)?;\n"
        "                Ok((chain, cost))\n            }) {\n                Ok((chain, cost)) => {\n"
        "                    // Spec order",
        ".checked_sub(0)\n                    .ok_or(ChainFault::DescriptorsReused)?;\n"
        "                Ok((chain, cost))\n            }) {\n                Ok((chain, cost)) => {\n"
        "                    // Spec order",
        nextest("--test", "queue_hostile", "--test", "queue_props"),
    ),
]


def copy_tree(dest: Path) -> None:
    """The tracked files, plus the prebuilt native module (untracked)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = ROOT / name.decode(), dest / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            # shutil.copy, not copy2: fresh mtimes, so that cargo rebuilds what an earlier run
            # left mutated in the mutation target directory (it compares mtimes, not content).
            shutil.copy(src, dst)
    native = ROOT / "python/vvu/_core.abi3.so"
    shutil.copy2(native, dest / "python/vvu/_core.abi3.so")


def run(check: tuple[str, ...], where: Path, log: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(where / "python"))
    # A target directory of its own: cargo names a workspace member's artifacts by a hash of
    # its path relative to the workspace, so the copy's mutant vvu-core would overwrite the
    # real tree's artifacts in a shared one (and the next ordinary build would test a mutant).
    target = Path(os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))) / "mutation"
    env["CARGO_TARGET_DIR"] = str(target)
    with log.open("w") as out:
        return subprocess.run(
            check, cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="store_true", help="the Python mutations only")
    parser.add_argument("--rust", action="store_true", help="the Rust mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", metavar="TEXT", help="the mutations whose name contains TEXT")
    args = parser.parse_args()
    mutations = [
        m
        for m in MUTATIONS
        if not (args.python and m.rust)
        and not (args.rust and not m.rust)
        and (args.only is None or args.only in m.name)
    ]
    if args.list:
        for m in mutations:
            command = " ".join(m.check[1:] if not m.rust else m.check)
            print(f"{m.path}: {m.name}\n    must fail: {command}")
        return 0
    start = time.monotonic()
    problems = []
    with tempfile.TemporaryDirectory(prefix="vvu-mutation-") as tmp:
        work = Path(tmp) / "tree"
        copy_tree(work)
        for check in dict.fromkeys(m.check for m in mutations):  # each subset once, unmutated
            code = run(check, work, Path(tmp) / "baseline.log")
            if code != 0:
                print(f"BASELINE FAILS ({code}): {' '.join(check)}")
                print((Path(tmp) / "baseline.log").read_text()[-3000:])
                return 2
        for m in mutations:
            target = work / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                problems.append(f"{m.name}: its text is not in {m.path} exactly once (update it)")
                print(f"STALE     {m.name}")
                continue
            target.write_text(original.replace(m.old, m.new))
            t0 = time.monotonic()
            log = Path(tmp) / "mutant.log"
            try:
                code = run(m.check, work, log)
            finally:
                target.write_text(original)
            took = time.monotonic() - t0
            # pytest: 1 = tests failed; nextest: 100 = tests failed. Anything else is no proof.
            if code in (1, 100):
                print(f"caught    {m.name} ({took:.0f} s)")
            elif code == 0:
                problems.append(f"{m.name}: SURVIVED ({' '.join(m.check)} passed)")
                print(f"SURVIVED  {m.name} ({took:.0f} s)")
            else:
                problems.append(f"{m.name}: the check did not run cleanly (exit {code})")
                print(f"ERROR     {m.name}: exit {code}\n{log.read_text()[-3000:]}")
    total = time.monotonic() - start
    print(f"{len(mutations) - len(problems)} of {len(mutations)} mutations caught in {total:.0f} s")
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
