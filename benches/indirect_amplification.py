"""Indirect amplification (issue 11): every head of a split ring points at the same
32768-entry indirect table. Pops the whole ring (or `max_pops` pops) and prints the chains per
pop and the peak RSS.

    python benches/indirect_amplification.py 256          # issue 11: 341 MiB in one pop before
    python benches/indirect_amplification.py 32768 200    # aborted on a 6 GiB allocation before

Run it under `ulimit -v` when trying a build without the pop budget.
"""

from __future__ import annotations

import resource
import struct
import sys
import time

from vvu._core import GuestMemory, SplitQueue, memfd

NEXT, INDIRECT = 1, 4
ENTRIES = 32768
DESC, AVAIL, USED, TABLE, BUF = 0, 0x10_0000, 0x20_0000, 0x40_0000, 0x80_0000
SIZE = 16 << 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(size: int, max_pops: int) -> None:
    memory = GuestMemory()
    memory.add_region(memfd(SIZE), 0, SIZE)
    table = b"".join(
        struct.pack("<QIHH", BUF, 1, NEXT, i + 1) for i in range(ENTRIES - 1)
    ) + struct.pack("<QIHH", BUF, 1, 0, 0)
    memory.write(TABLE, table)
    head = struct.pack("<QIHH", TABLE, 16 * ENTRIES, INDIRECT, 0)
    memory.write(DESC, head * size)
    memory.write(AVAIL + 4, b"".join(struct.pack("<H", h) for h in range(size)))
    memory.write(AVAIL, struct.pack("<HH", 0, size & 0xFFFF))
    queue = SplitQueue(size, DESC, AVAIL, USED, indirect=True)
    queue.attach(memory)
    before = peak_rss_mib()
    start = time.perf_counter()
    takes: list[int] = []
    while sum(takes) < size and len(takes) < max_pops:
        takes.append(len(queue.pop(size)))
    print(
        f"Q={size}: {sum(takes)} chains in {len(takes)} pops (first pop {takes[0]}), "
        f"{time.perf_counter() - start:.2f} s, peak RSS {peak_rss_mib():.0f} MiB "
        f"({before:.0f} MiB before popping)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30)
