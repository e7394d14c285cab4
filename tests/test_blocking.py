"""The blocking wrappers a plain-REPL user gets: start a back-end, read and write a block."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vvu.backends import BlkBackend, RngBackend
from vvu.blocking import BlockingBlk, BlockingRng, run, serve


def test_repl_style_blk_session(tmp_path: Path) -> None:
    path = str(tmp_path / "blk.sock")
    server = serve(BlkBackend(size=8 << 20, serial="repl"), path)
    try:
        blk = BlockingBlk.open(path)
        assert blk.capacity == 8 * 2048
        blk.write(0, b"hello".ljust(512, b"\0"))
        assert blk.read(0, 5) == b"hello"
        assert blk.get_id() == b"repl"
        blk.flush()
        blk.close()
        again = BlockingBlk.open(path)  # the same server serves the next front-end
        assert again.read(0, 5) == b"hello"
        again.close()
    finally:
        server.stop()
    assert not Path(path).exists()


def test_repl_style_resize(tmp_path: Path) -> None:
    path = str(tmp_path / "blk.sock")
    backend = BlkBackend(size=8 << 20)
    server = serve(backend, path)
    try:
        blk = BlockingBlk.open(path)
        backend.resize(16 << 20)
        assert server.config_changed() is True
        run(asyncio.wait_for(blk.driver.resized.wait(), 5.0))
        assert blk.capacity == 16 * 2048
        blk.write(16 * 2048 - 1, b"z" * 512)  # the last sector of the grown disk
        assert blk.read(16 * 2048 - 1, 512) == b"z" * 512
        blk.close()
    finally:
        server.stop()


def test_repl_style_rng(tmp_path: Path) -> None:
    path = str(tmp_path / "rng.sock")
    server = serve(RngBackend(), path)
    try:
        rng = BlockingRng.open(path)
        data = rng.read(32)
        assert len(data) == 32 and len(set(data)) > 4
        rng.close()
    finally:
        server.stop()


def test_errors_surface_in_the_caller(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot connect"):
        BlockingBlk.open(str(tmp_path / "nobody.sock"), timeout=0.05)
