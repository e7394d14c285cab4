"""The memory table of one session: the guest memory the front-end shares (SET_MEM_TABLE,
ADD_MEM_REG, REM_MEM_REG) as one mapping the rings attach to, and the regions it is made of.

Each change is prepared here and returned as a callable that the engine applies while the rings
are stopped (`BackendEngine._restart_rings`): rings re-attach to the memory the change leaves,
and a refused change leaves them the memory they had.
"""

from __future__ import annotations

from collections.abc import Callable

from vvu._core import GuestMemory
from vvu.engine.common import RequestFailed
from vvu.protocol import MemoryRegion

MAX_MEM_SLOTS = 256
# How long REM_MEM_REG waits for buffers still held by Python code before failing.
REGION_RELEASE_TIMEOUT = 1.0


def _map_regions(
    memory: GuestMemory, regions: tuple[MemoryRegion, ...], fds: tuple[int, ...]
) -> None:
    for region, fd in zip(regions, fds, strict=True):
        memory.add_region(
            fd,
            region.guest_phys_addr,
            region.memory_size,
            userspace_addr=region.userspace_addr,
            mmap_offset=region.mmap_offset,
        )


class MemoryTable:
    """The session's guest memory (`memory`, None before the first table) and its regions."""

    def __init__(self) -> None:
        self.memory: GuestMemory | None = None
        self.regions: list[MemoryRegion] = []

    def replacing(
        self, regions: tuple[MemoryRegion, ...], fds: tuple[int, ...]
    ) -> Callable[[], None]:
        """SET_MEM_TABLE: map the new table now (RequestFailed-free errors such as overlaps
        are raised here, before any ring stops); the change swaps it in."""
        memory = GuestMemory()
        _map_regions(memory, regions, fds)  # refuses overlaps

        def swap() -> None:
            self.memory = memory
            self.regions = list(regions)

        return swap

    def adding(self, region: MemoryRegion, fds: tuple[int, ...]) -> Callable[[], None]:
        """ADD_MEM_REG: the change maps `region` into the current memory (a new one if none);
        the rings re-attach to a snapshot that has it."""
        if len(self.regions) >= MAX_MEM_SLOTS:
            raise RequestFailed(f"all {MAX_MEM_SLOTS} memory slots are in use")
        memory = self.memory if self.memory is not None else GuestMemory()

        def add() -> None:
            _map_regions(memory, (region,), fds)
            self.memory = memory
            self.regions.append(region)

        return add

    def removing(self, target: MemoryRegion) -> Callable[[], None]:
        """REM_MEM_REG: the region matching `target` (guest and user address and size), which
        the change unmaps once no buffer still uses it."""
        match = next(
            (
                r
                for r in self.regions
                if (r.guest_phys_addr, r.userspace_addr, r.memory_size)
                == (target.guest_phys_addr, target.userspace_addr, target.memory_size)
            ),
            None,
        )
        if match is None or self.memory is None:
            raise RequestFailed(f"no region at gpa {target.guest_phys_addr:#x} to remove")
        memory = self.memory

        def remove() -> None:
            memory.remove_region(match.guest_phys_addr, REGION_RELEASE_TIMEOUT)
            self.regions.remove(match)

        return remove

    def release(self) -> None:
        """The session ends: let go of the mapping (rings hold their own snapshots)."""
        self.memory = None
