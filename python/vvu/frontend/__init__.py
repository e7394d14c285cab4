"""A scriptable vhost-user front-end and small device drivers on top of it."""

from __future__ import annotations

from vvu.frontend.blk import BlkDriver, BlkIOError
from vvu.frontend.core import Frontend, FrontendError, FrontendQueue, Iommu
from vvu.frontend.net import NetDriver, NetDriverError
from vvu.frontend.rng import RngDriver

__all__ = [
    "BlkDriver",
    "BlkIOError",
    "Frontend",
    "FrontendError",
    "FrontendQueue",
    "Iommu",
    "NetDriver",
    "NetDriverError",
    "RngDriver",
]
