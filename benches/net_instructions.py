"""Instructions per frame of the loop case, vvu vs DPDK `net_vhost`, counted exactly under
callgrind: a figure the load of the machine cannot move (issue 14; this VM has no hardware
counters, `perf stat -e cycles` says "not supported").

- vvu: `benches/net_loop.rs` with `NET_LOOP_BURSTS` bursts of 32 frames stepped inline
  (`worker::InlineWorker`: the TX batch, the switch queue, the RX step), counting only inside
  the two steps; `Collected / frames`.
- DPDK: `dpdk-testpmd` with a `net_vhost` port in `macswap` mode (the `loop` case's back-end of
  `benches/net_testpmd.py`) runs under callgrind, counting only inside
  `rte_vhost_dequeue_burst` and `rte_vhost_enqueue_burst` (the vhost library: descriptor walks,
  both copies, used ring updates; not testpmd's macswap nor the PMD wrapper), while a native
  `net_virtio_user` testpmd front-end circulates one burst (`io --tx-first`, as the `loop`
  case). A busy-polling back-end calls `rte_vhost_dequeue_burst` millions of times with
  nothing to take: a second run with a front-end that never transmits gives the cost of such
  an empty call, and every call beyond `frames / 32` is charged at that cost and subtracted
  (so the figure is, if anything, a little low for DPDK: partial bursts count as empty calls).

    python benches/net_instructions.py

builds the bench first (`cargo bench -p vvu-core --bench net_loop --no-run`) unless given
`--net-loop BINARY`. Needs valgrind, root and dpdk-testpmd (as `benches/net_testpmd.py`). About
70 s plus the build.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import net_testpmd as nt

BURST = 32
DPDK_FUNCTIONS = ("rte_vhost_dequeue_burst", "rte_vhost_enqueue_burst")


def collected(text: str) -> int:
    """callgrind's `Collected` count from its stderr."""
    return int(re.findall(r"Collected : (\d+)", text)[-1])


def vvu_per_frame(net_loop: str, frame_len: int, bursts: int) -> float:
    env = {**os.environ, "NET_LOOP_BURSTS": str(bursts), "NET_LOOP_LEN": str(frame_len)}
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         "--toggle-collect=*InlineWorker*step*", net_loop],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return collected(out.stderr) / (bursts * BURST)


def dequeue_calls(out_file: Path) -> int:
    """Calls of `rte_vhost_dequeue_burst` in a callgrind output file."""
    text = subprocess.run(
        ["callgrind_annotate", "--tree=caller", str(out_file)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    calls = re.findall(r"< \?\?\?:\S+ \(([\d,]+)x\) \[\S*librte_net_vhost", text)
    return sum(int(c.replace(",", "")) for c in calls)


def dpdk_run(
    frame_len: int, seconds: float, workdir: Path, circulate: bool
) -> tuple[int, int, int]:
    """(instructions inside the vhost library, frames the back-end moved, dequeue calls)."""
    sock = workdir / "net.sock"
    sock.unlink(missing_ok=True)
    out_file = workdir / "callgrind.out"
    runtime = Path(tempfile.mkdtemp(prefix="vvu-bench-dpdk-"))
    log = workdir / "back.log"
    with open(log, "wb") as out:
        back = subprocess.Popen(
            ["taskset", "-c", "0", "valgrind", "--tool=callgrind",
             f"--callgrind-out-file={out_file}",
             *(f"--toggle-collect={f}" for f in DPDK_FUNCTIONS),
             nt.TESTPMD, "--lcores", "0@0,1@0", "--no-huge", "-m", "512",
             "--single-file-segments", "--no-pci", "--no-shconf", "--file-prefix", "vvu-cg-back",
             "--log-level", "lib.eal:warning", "--vdev", f"net_vhost0,iface={sock},queues=1",
             "--", "--forward-mode=macswap", f"--burst={BURST}", f"--txpkts={frame_len}",
             "--no-flush-rx", "--total-num-mbufs=4096", "--stats-period", "1"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
        )  # fmt: skip
    try:
        nt.wait_for(sock.exists, "net_vhost socket (under valgrind)", timeout=300)
        vdev = f"net_virtio_user0,path={sock},queues=1"
        with nt.testpmd(
            "front", 1, [vdev], "io", workdir, tx_first=circulate, frame_len=frame_len
        ) as (_, front_log):
            # Forwarding (or, idle, the port up and polled) before the window starts.
            try:
                nt.wait_for(lambda: len(nt.rx_pps(front_log)) >= 2, "front-end", timeout=300)
            except TimeoutError:
                tail = front_log.read_text(errors="replace")[-1500:]
                tail += log.read_text(errors="replace")[-1500:]
                raise TimeoutError(f"front-end not running:\n{tail}") from None
            time.sleep(seconds)  # the measured window (a benchmark window, not synchronisation)
    finally:
        nt.stop(back)
        shutil.rmtree(runtime, ignore_errors=True)
    text = log.read_text(errors="replace")
    # testpmd's final "Forward statistics for port 0" of the back-end: what it dequeued.
    frames = int(re.findall(r"RX-packets: +(\d+)", text)[-1])
    return collected(text), frames, dequeue_calls(out_file)


def build_net_loop() -> str:
    """Build the bench binary; its path."""
    out = subprocess.run(
        ["cargo", "bench", "-p", "vvu-core", "--bench", "net_loop", "--no-run",
         "--message-format=json"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for line in out.splitlines():
        message = json.loads(line)
        if message.get("target", {}).get("name") == "net_loop" and message.get("executable"):
            return str(message["executable"])
    raise RuntimeError("cargo built no net_loop bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net-loop", help="the net_loop bench binary (default: build it)")
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--bursts", type=int, default=1000)
    parser.add_argument("--no-dpdk", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    net_loop = args.net_loop or build_net_loop()
    with tempfile.TemporaryDirectory(prefix="vvu-bench-cg-") as tmp:
        workdir = Path(tmp)
        empty_call = 0.0
        if not args.no_dpdk:
            total, _, calls = dpdk_run(64, args.seconds, workdir, circulate=False)
            empty_call = total / calls
            print(f"DPDK: an empty rte_vhost_dequeue_burst call: {empty_call:.0f} instructions")
        print("| frame | vvu instructions / frame | DPDK instructions / frame | vvu / DPDK |")
        print("|---|---:|---:|---:|")
        for size in sizes:
            vvu = vvu_per_frame(net_loop, size, args.bursts)
            if args.no_dpdk:
                print(f"| {size} B | {vvu:.0f} | | |", flush=True)
                continue
            total, frames, calls = dpdk_run(size, args.seconds, workdir, circulate=True)
            empty = max(calls - frames // BURST, 0)
            dpdk = (total - empty * empty_call) / frames
            print(f"| {size} B | {vvu:.0f} | {dpdk:.0f} | {vvu / dpdk:.2f} |", flush=True)


if __name__ == "__main__":
    main()
