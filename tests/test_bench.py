"""`vvu bench blk` against real back-ends: `vvu serve blk`, qemu-storage-daemon, a back-end that
loses writes, one killed or frozen mid-run, Ctrl-C, and bad options."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from daemons import Daemon, stop_process
from test_qsd import qsd_export
from vvu import bench
from vvu._core import DescriptorChain
from vvu.backends import Backend
from vvu.blocking import serve
from vvu.cli import main

pytestmark = pytest.mark.timeout(60)

BENCH = [sys.executable, "-m", "vvu", "bench", "blk"]
T_IN, T_OUT = 0, 1


def _bench(socket: Path, *args: str, timeout: float = 30) -> tuple[int, dict[str, Any], str]:
    """Run `vvu bench blk --json`; exit status, the JSON it printed ({} if none), stderr."""
    out = subprocess.run(
        [*BENCH, "--socket-path", str(socket), "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}, out.stderr


def _assert_clean(result: dict[str, Any], *directions: str) -> None:
    assert result["ok"], result
    assert result["faults"] == [] and result["total"]["errors"] == 0
    for name in directions:
        d = result[name]
        assert d["ios"] > 0 and d["iops"] > 0 and d["mib_s"] > 0
        lat = d["lat_us"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"]
        assert lat["p99.9"] <= lat["max"] and lat["min"] <= lat["mean"] <= lat["max"]


@pytest.fixture
def vvu_blk(tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(
        ["blk", "--socket-path", str(tmp_path / "blk.sock"), "--size", "16", "--num-queues", "2"],
        tmp_path / "blk.sock",
        tmp_path / "serve.log",
    )
    try:
        yield daemon
    finally:
        daemon.stop()


def test_vvu_serve_blk_two_queues_verified(vvu_blk: Daemon) -> None:
    pid = str(vvu_blk.proc.pid)
    code, result, err = _bench(
        vvu_blk.socket_path,
        *("--rw", "randrw", "--queues", "2", "--iodepth", "16", "--runtime", "0.5"),
        *("--verify", "--backend-pid", pid),
    )
    assert code == 0, err
    _assert_clean(result, "read", "write")
    verify = result["verify"]
    # Reads during the run of blocks written before, and the read-back of every block written.
    assert verify["verified"] > 0 and verify["errors"] == 0
    assert result["job"]["queues"] == 2 and result["backend"]["queues_offered"] == 2
    assert result["cpu"]["backend_s"] >= 0 and "backend_us_per_io" in result["cpu"]


def test_packed_rings_verified(vvu_blk: Daemon) -> None:
    code, result, err = _bench(
        vvu_blk.socket_path, "--packed", "--rw", "randrw", "--runtime", "0.3", "--verify"
    )
    assert code == 0, err
    _assert_clean(result, "read", "write")
    assert result["verify"]["verified"] > 0 and result["verify"]["errors"] == 0
    assert int(result["backend"]["features"], 16) & 1 << 34  # VIRTIO_F_RING_PACKED acked


def test_verified_sequential_read_fills_first(vvu_blk: Daemon) -> None:
    code, result, err = _bench(
        vvu_blk.socket_path, "--rw", "read", "--size", "1m", "--runtime", "0.3", "--verify"
    )
    assert code == 0, err
    _assert_clean(result, "read")
    assert result["verify"]["prefill_ios"] == (1 << 20) // 4096
    # Every read was checked, and every block once more in the read-back at the end.
    assert result["verify"]["verified"] == result["read"]["ios"] + 256
    assert result["write"]["ios"] == 0


def test_qemu_storage_daemon_verified(tmp_path: Path) -> None:
    with qsd_export(tmp_path, num_queues=2) as qsd:
        code, result, err = _bench(
            qsd.socket,
            *("--rw", "randrw", "--queues", "2", "--bs", "8k", "--runtime", "0.5"),
            *("--verify", "--backend-pid", str(qsd.proc.pid)),
        )
        assert code == 0, err + qsd.stderr()
        _assert_clean(result, "read", "write")
        assert result["verify"]["verified"] > 0 and result["verify"]["errors"] == 0
        assert "backend_us_per_io" in result["cpu"]
        code, result, err = _bench(
            qsd.socket, "--rw", "randread", "--size", "2m", "--runtime", "0.3", "--verify"
        )
        assert code == 0, err + qsd.stderr()
        _assert_clean(result, "read")
        assert result["verify"]["prefill_ios"] == 512
    # The verified pattern is really on the disk: sector 0 names itself.
    head = qsd.image.read_bytes()[:32]
    assert head[:8] == b"vvubench" and struct.unpack_from("<Q", head, 8)[0] == 0


class LossyBlk(Backend):
    """A 1 MiB virtio-blk disk in a bytearray that acknowledges every write and drops those to
    odd 4 KiB blocks (Python path, so the test controls every byte)."""

    name: ClassVar[str] = "lossy-blk"
    device_id: ClassVar[int] = 2

    def __init__(self) -> None:
        super().__init__()
        self.disk = bytearray(1 << 20)

    def config_space(self) -> bytes:
        return struct.pack("<Q", len(self.disk) // 512)  # capacity, in sectors

    def handle(self, queue_index: int, chains: Sequence[DescriptorChain]) -> Sequence[int]:
        for chain in chains:
            raw = chain.read()
            kind, _, sector = struct.unpack_from("<IIQ", raw)
            at = sector * 512
            if kind == T_OUT:
                if (sector // 8) % 2 == 0:
                    self.disk[at : at + len(raw) - 16] = raw[16:]
                chain.write(b"\0")
            elif kind == T_IN:
                chain.write(bytes(self.disk[at : at + chain.writable_len - 1]) + b"\0")
            else:
                chain.write(b"\2", chain.writable_len - 1)  # UNSUPP
        return [chain.writable_len for chain in chains]


def test_verify_catches_lost_writes(tmp_path: Path) -> None:
    server = serve(LossyBlk(), str(tmp_path / "lossy.sock"))
    try:
        code, result, _ = _bench(
            tmp_path / "lossy.sock", "--rw", "randwrite", "--runtime", "0.3", "--verify"
        )
    finally:
        server.stop()
    assert code == 1
    assert not result["ok"] and result["total"]["errors"] == 0  # the device said OK every time
    verify = result["verify"]
    assert verify["errors"] > 0 and verify["verified"] > 0  # even blocks kept their data
    for m in verify["mismatches"]:
        assert (m["sector"] // 8) % 2 == 1
        assert m["found_generation"] != m["expected_generation"]


def _start_bench(socket: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """A long `vvu bench blk --json` in the background; returns once its load is running."""
    with log.open("wb") as err:
        # A shell without job control starts background jobs with SIGINT ignored, and Python
        # then installs no Ctrl-C handler: `env --default-signal` (it execs, same pid) gives the
        # bench the default disposition, as a terminal's foreground job has.
        proc = subprocess.Popen(
            ["env", "--default-signal=INT", *BENCH, "--socket-path", str(socket), "--json",
             "--runtime", "60", *args],
            stdout=subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while "running" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc


def _finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, dict[str, Any]]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    return proc.returncode, json.loads(out)


def test_backend_killed_mid_run(vvu_blk: Daemon, tmp_path: Path) -> None:
    bench = _start_bench(vvu_blk.socket_path, tmp_path / "bench.log", "--iodepth", "8")
    vvu_blk.proc.send_signal(signal.SIGKILL)
    vvu_blk.proc.wait()
    start = time.monotonic()
    code, result = _finish(bench)
    assert code == 1
    assert time.monotonic() - start < 5  # not the 10 s --timeout: the hang-up was seen
    assert not result["ok"]
    assert any("closed the connection" in f for f in result["faults"]), result["faults"]
    assert result["read"]["errors"] > 0  # the requests in flight failed


def test_backend_frozen_mid_run(vvu_blk: Daemon, tmp_path: Path) -> None:
    bench = _start_bench(vvu_blk.socket_path, tmp_path / "bench.log", "--timeout", "1")
    vvu_blk.proc.send_signal(signal.SIGSTOP)
    try:
        code, result = _finish(bench)
    finally:
        vvu_blk.proc.send_signal(signal.SIGCONT)
    assert code == 1
    assert any("no completion for" in f for f in result["faults"]), result["faults"]
    assert result["read"]["errors"] > 0  # the requests in flight failed


def test_ctrl_c_stops_and_reports(vvu_blk: Daemon, tmp_path: Path) -> None:
    bench = _start_bench(vvu_blk.socket_path, tmp_path / "bench.log", "--rw", "randwrite")
    bench.send_signal(signal.SIGINT)
    code, result = _finish(bench)
    assert code == 130
    assert result["interrupted"] and result["faults"] == []
    assert result["write"]["ios"] > 0 and result["write"]["errors"] == 0
    assert vvu_blk.running()  # and the back-end is fine


def test_handshake_latency(vvu_blk: Daemon) -> None:
    code, result, err = _bench(vvu_blk.socket_path, "--handshake-runs", "3")
    assert code == 0, err
    assert result["runs"] == 3
    total = result["total"]
    assert 0 < total["min_ms"] <= total["median_ms"] <= total["p90_ms"] <= total["max_ms"]
    steps = result["steps"]
    assert list(steps) == ["connect", "negotiate", "mem_table", "config", "inflight", "queue",
                           "read"]  # fmt: skip
    assert sum(s["min_ms"] for s in steps.values()) <= total["max_ms"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rw", "sideways"], "--rw 'sideways': expected one of read, write"),
        (["--bs", "1000"], "--bs 1000: must be a positive multiple of 512"),
        (["--bs", "4q"], "size '4q'"),
        (["--iodepth", "0"], "--iodepth 0"),
        (["--runtime", "0"], "--runtime 0.0: must be positive"),
        (["--rwmixread", "101"], "--rwmixread 101"),
        (["--queue-size", "64"], "--queue-size 64: must hold 3 descriptors"),
        (["--backend-pid", "999999999"], "--backend-pid 999999999"),
        (["--handshake-runs", "0"], "--handshake-runs 0"),
    ],
)
def test_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "blk", "--socket-path", str(tmp_path / "none.sock"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_options_for_this_backend(
    vvu_blk: Daemon, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = str(vvu_blk.socket_path)
    assert main(["bench", "blk", "--socket-path", socket, "--queues", "3"]) == 2
    assert "--queues 3: the back-end offers 2 queue(s)" in capsys.readouterr().err
    assert main(["bench", "blk", "--socket-path", socket, "--size", "1g"]) == 2
    assert f"--size {1 << 30}: the disk has {16 << 20} bytes" in capsys.readouterr().err
    monkeypatch.setattr(bench, "MAX_VERIFY_BLOCKS", 100)
    assert main(["bench", "blk", "--socket-path", socket, "--size", "1m", "--verify"]) == 2
    assert "--verify keeps 9 bytes per block: 256 blocks" in capsys.readouterr().err


def test_no_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    socket = str(tmp_path / "none.sock")
    assert main(["bench", "blk", "--socket-path", socket, "--connect-timeout", "0.1"]) == 1
    assert socket in capsys.readouterr().err


def test_help() -> None:
    top = subprocess.run([*BENCH[:3], "--help"], capture_output=True, text=True, check=True)
    assert "bench" in top.stdout
    out = subprocess.run([*BENCH, "--help"], capture_output=True, text=True, check=True).stdout
    options = "--socket-path --rw --bs --iodepth --queues --runtime --size --verify --backend-pid"
    for option in [*options.split(), "--json", "--handshake-runs"]:
        assert option in out
    text = " ".join(out.split())
    assert "p99.9" in text and "utime+stime" in text and "exits 130" in text
