"""docs/writing-a-backend.md, as written: its code and commands are extracted from the file
(each block follows a `<!-- test: NAME -->` marker) and run: the device through vvu's own
front-end, as a `vvu.backends` plugin, and in a Linux guest on QEMU 11."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType

import pytest

import vvu.backends
from daemons import stop_process, wait_for_socket
from guest import guest_image, qemu11, start_guest
from vvu.backends import Backend, available_backends
from vvu.engine import BackendEngine
from vvu.frontend.core import Frontend
from vvu.transport.unix import socketpair_channels

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-a-backend.md"
TIMEOUT = 5.0


def block(name: str) -> str:
    """The fenced block right after `<!-- test: name -->` in the tutorial."""
    found = re.search(
        rf"<!-- test: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", DOC.read_text(), re.DOTALL
    )
    assert found, f"no block {name!r} in {DOC}"
    return found.group(1)


@pytest.fixture
def shout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The tutorial's shout.py, written to a file and imported from there."""
    path = tmp_path / "shout.py"
    path.write_text(block("shout.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("shout", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "shout", module)
    spec.loader.exec_module(module)
    yield module


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_the_tutorial_device_answers_in_capitals(shout: ModuleType) -> None:
    ours, theirs = socketpair_channels()
    task = asyncio.ensure_future(BackendEngine(shout.ShoutBackend()).serve(theirs))
    frontend = Frontend(ours, memory_size=1 << 20)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        rx = await frontend.start_queue(0, 16)
        tx = await frontend.start_queue(1, 16)
        # Two 8-byte buffers to fill, then 13 bytes written: the reply spans both.
        buffers = [frontend.allocator.alloc(8) for _ in range(2)]
        filled = [rx.completion(rx.submit([], [(b, 8)])) for b in buffers]
        rx.notify()
        src = frontend.allocator.alloc(13)
        frontend.memory.write(src, b"hello, device")
        assert await asyncio.wait_for(tx.request([(src, 13)], []), TIMEOUT) == 0
        lengths = await asyncio.wait_for(asyncio.gather(*filled), TIMEOUT)
        assert lengths == [8, 5]
        reply = b"".join(frontend.memory.read(b, n) for b, n in zip(buffers, lengths, strict=True))
        assert reply == b"HELLO, DEVICE"
    finally:
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


def test_a_package_listing_it_as_an_entry_point_makes_it_a_vvu_serve_device(
    shout: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = EntryPoint("shout", "shout:ShoutBackend", "vvu.backends")
    monkeypatch.setattr(vvu.backends, "entry_points", lambda group: [plugin])
    found: type[Backend] = available_backends()["shout"]
    assert found is shout.ShoutBackend


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_the_tutorial_device_in_a_linux_guest(shout: ModuleType, tmp_path: Path) -> None:
    qemu = qemu11()
    image = guest_image()
    sock = tmp_path / "shout.sock"
    # Section 3: python shout.py /tmp/shout.sock (here in the test's directory).
    server = subprocess.Popen(
        [sys.executable, str(tmp_path / "shout.py"), str(sock)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for_socket(sock, server)
        # Section 4's options; the memory backend is the test harness's own (same options).
        args = block("qemu-args").replace("/tmp/shout.sock", str(sock)).split()
        assert args[:2] == ["-object", "memory-backend-memfd,id=mem,size=512M,share=on"]
        devices = args[4:]
        wait = "for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done\n"
        with start_guest(wait + block("guest"), qemu=qemu, image=image, qemu_args=devices) as g:
            result = g.wait()
        assert result.exit_status == 0, result.serial
        assert result.output == "HELLO, DEVICE\n", result.serial
    finally:
        stop_process(server)
