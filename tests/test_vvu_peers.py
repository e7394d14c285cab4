"""Real vhost-user front-ends through the virtio-vhost-user device.

QEMU's vhost-user-rng-pci (a Linux guest reading /dev/hwrng) and DPDK testpmd's
net_virtio_user connect to `vvu device`; `vvu serve rng|net --vvu` behind it is the back-end.
All processes are stopped by PID; no socket is left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from guest import guest_image, qemu_escape, start_guest
from test_net import (
    BURST,
    PmdProcess,
    dpdk_hugepage_file,
    frame,
    hugepages_unavailable,
    needs_testpmd,
    run_testpmd,
)
from test_net import TIMEOUT as NET_TIMEOUT
from test_qemu_peers import vvu_rig
from vvu.backends.net import parse_mac
from vvu.frontend.net import NetDriver


@pytest.mark.guest
def test_rng_guest_reads_hwrng_through_the_vvu_device(tmp_path: Path) -> None:
    guest_image()  # skip before starting daemons when there is no guest
    with vvu_rig(tmp_path, "rng") as rig:
        script = """
set -e
cat /sys/class/misc/hw_random/rng_current
head -c 128 /dev/hwrng > /tmp/r
wc -c < /tmp/r
od -An -v -tx1 /tmp/r | tr -d ' \\n'; echo
"""
        chardev = f"socket,id=vu0,path={qemu_escape(str(rig.frontend_socket))}"
        devices = ["-chardev", chardev, "-device", "vhost-user-rng-pci,chardev=vu0"]
        with start_guest(script, qemu_args=devices, timeout=90) as guest:
            result = guest.wait()
        assert result.exit_status == 0, f"{result.serial}\n{rig.logs()}"
        lines = result.output.split("\n")
        assert lines[0].startswith("virtio_rng")
        assert int(lines[1]) == 128
        data = bytes.fromhex(lines[2])
        assert len(data) == 128 and len(set(data)) > 16
        assert rig.backend.stop() == 0, rig.logs()
        assert rig.device.stop() == 0, rig.logs()
        assert "device stopped after 1 front-end session(s)" in rig.device.log()


@needs_testpmd
def test_dpdk_testpmd_through_the_vvu_device_macswaps_our_frames(tmp_path: Path) -> None:
    """testpmd (net_virtio_user) on the `vvu device` socket, `vvu serve net --vvu` in peer
    mode behind it, our NetDriver on the peer socket: our frames cross the device into
    testpmd's RX ring and come back from its TX ring with the MACs swapped."""
    peer = tmp_path / "peer.sock"

    async def round_trip(pmd: PmdProcess) -> None:
        driver = await NetDriver.open(str(peer), timeout=10)
        try:
            await asyncio.to_thread(pmd.wait_forwarding)
            src, dst = parse_mac("02:00:00:00:00:02"), parse_mac("02:00:00:00:00:01")
            frames = [frame(i, 60 + 29 * i, dst=dst, src=src) for i in range(50)]
            await driver.send_all(frames)
            for f in frames:
                got = await driver.recv(NET_TIMEOUT)
                assert got[:6] == f[6:12] and got[6:12] == f[:6], "MACs swapped"
                assert got[12:] == f[12:], "payload intact"
        finally:
            await driver.close()

    with vvu_rig(tmp_path, "net", "--peer-socket-path", str(peer)) as rig:
        deadline = time.monotonic() + 10
        while not peer.exists():
            assert time.monotonic() < deadline, rig.logs()
            time.sleep(0.02)
        with run_testpmd(rig.frontend_socket, "macswap", tmp_path) as pmd:
            asyncio.run(round_trip(pmd))
        text = pmd.output()
        totals = re.findall(r"RX-packets: (\d+) +RX-dropped: (\d+).*?TX-packets: (\d+)", text, re.S)
        assert totals and totals[-1] == ("50", "0", "50"), text[-3000:] + rig.logs()
        assert rig.backend.stop() == 0, rig.logs()
        assert rig.device.stop() == 0, rig.logs()
        assert "device stopped after 1 front-end session(s)" in rig.device.log()
    assert not peer.exists()


@pytest.mark.skipif(hugepages_unavailable() is not None, reason=str(hugepages_unavailable()))
def test_dpdk_testpmd_memory_is_the_file_the_device_was_told(tmp_path: Path) -> None:
    """testpmd's memory is one hugetlbfs file made before `vvu device --frontend-memory FILE`
    starts, as a back-end VM's VMM needs (it maps BAR4 at realize): SET_MEM_TABLE carries one
    region, all of that file, and `vvu serve net --vvu --loopback` behind the device returns
    every frame testpmd sends (io forwarding of one --tx-first burst: TX = RX + BURST)."""
    size = 64 << 20
    prefix = f"vvu-test-{os.getpid()}-net"
    with (
        dpdk_hugepage_file(tmp_path, size, prefix) as (path, memory),
        vvu_rig(tmp_path, "net", "--loopback", device_args=["--frontend-memory", str(path)]) as rig,
    ):
        with run_testpmd(rig.frontend_socket, "io", tmp_path, memory=memory, tx_first=True) as pmd:
            pmd.wait_forwarding()
            pmd.wait_rx_packets(1000)
        rx, rx_dropped, tx, tx_dropped = pmd.totals()
        assert rx >= 1000 and (rx_dropped, tx_dropped) == (0, 0), pmd.output()[-3000:]
        assert tx == rx + BURST, pmd.output()[-3000:]
        tables = re.findall(r"SET_MEM_TABLE need_reply nregions=(\d+) \[(.*?)\]", rig.backend.log())
        assert tables, rig.logs()
        assert tables[0][0] == "1" and f"memory_size={size:#x}" in tables[0][1], tables
        assert "mmap_offset=0x0" in tables[0][1], tables
