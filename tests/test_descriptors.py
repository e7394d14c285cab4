"""The vhost-user.json descriptors (QEMU docs/interop/vhost-user.json) and the per-type programs
they name: what libvirt finds in PREFIX/share/qemu/vhost-user/ must start a conforming back-end.

The wheel and sdist checks run on built ones, installed into a venv of their own: that is what
scripts/dist.sh (`make dist`, and `make test`) does, with VVU_WHEEL and VVU_SDIST naming them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

import vvu
from vvu import _core
from vvu.backends import available_backends
from vvu.cli import capabilities

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTORS = ROOT / "vvu.data" / "data" / "share" / "qemu" / "vhost-user"
#: VHostUserBackendType in QEMU's vhost-user.json.
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}  # fmt: skip


def _scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


def _entry_point(target: str) -> Callable[[list[str]], int]:
    module, _, name = target.partition(":")
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module), name)
    return function


def test_one_descriptor_per_device_type_naming_its_own_program() -> None:
    scripts = _scripts()
    found = {}
    for path in sorted(DESCRIPTORS.glob("*.json")):
        assert path.name[:3].rstrip("-").isdigit(), "vhost-user.json: NN-name.json"
        descriptor = json.loads(path.read_text())
        assert set(descriptor) <= {"description", "type", "binary", "tags"}
        assert descriptor["type"] in BACKEND_TYPES
        assert descriptor["description"]
        binary = Path(descriptor["binary"])
        assert binary.is_absolute()
        found[binary.name] = descriptor["type"]
    for name, cls in available_backends().items():
        if cls.__module__.startswith("vvu."):  # ours; third-party back-ends ship their own
            program = f"vvu-{name}"
            assert program in scripts, f"no {program} entry point"
            assert found.get(program) == capabilities(cls)["type"], path


@pytest.mark.parametrize("name", ["blk", "console", "input", "net", "rng", "vsock"])
def test_per_type_programs_are_vvu_serve(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = _entry_point(_scripts()[f"vvu-{name}"])
    assert main(["--print-capabilities", "--socket-path", "/nonexistent/x"]) == 0
    assert json.loads(capsys.readouterr().out) == capabilities(available_backends()[name])
    with pytest.raises(SystemExit):
        main(["-v", "--help"])
    assert f"vvu serve {name}" in capsys.readouterr().out


@pytest.mark.skipif("VVU_WHEEL" not in os.environ, reason="VVU_WHEEL names no built wheel")
def test_the_wheel_installs_descriptors_and_programs() -> None:
    with zipfile.ZipFile(os.environ["VVU_WHEEL"]) as wheel:
        names = wheel.namelist()
        data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
        shipped = {f"share/qemu/vhost-user/{p.name}" for p in DESCRIPTORS.glob("*.json")}
        assert shipped and shipped <= data, data
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = wheel.read(entry_points).decode()
    for program, target in _scripts().items():
        assert f"{program} = {target}".replace(" ", "") in text.replace(" ", ""), text


@pytest.mark.skipif("VVU_WHEEL" not in os.environ, reason="VVU_WHEEL names no built wheel")
def test_what_runs_is_the_installed_wheel() -> None:
    """The package under test is VVU_WHEEL as installed into this interpreter's environment, not
    the tree: its files in site-packages, its native module byte for byte the wheel's, its tags
    the wheel's, its programs and descriptors under the environment's prefix."""
    wheel_path = Path(os.environ["VVU_WHEEL"])
    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    for module in (vvu, _core):
        origin = Path(str(module.__file__)).resolve()
        assert origin.is_relative_to(site), origin
        assert not origin.is_relative_to(ROOT), origin
    installed = Path(str(_core.__file__)).read_bytes()
    with zipfile.ZipFile(wheel_path) as wheel:
        assert wheel.read("vvu/_core.abi3.so") == installed
    metadata = importlib.metadata.distribution("vvu")
    lines = (metadata.read_text("WHEEL") or "").splitlines()
    tags = {line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")}
    python, abi, platforms = wheel_path.name.removesuffix(".whl").split("-")[2:5]
    assert tags == {f"{python}-{abi}-{platform}" for platform in platforms.split(".")}
    assert abi == "abi3"
    prefix = Path(sys.prefix)
    for name in available_backends():
        out = subprocess.run(
            [prefix / "bin" / f"vvu-{name}", "--print-capabilities"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert json.loads(out.stdout) == capabilities(available_backends()[name])
    for path in DESCRIPTORS.glob("*.json"):
        shipped = prefix / "share" / "qemu" / "vhost-user" / path.name
        assert shipped.read_bytes() == path.read_bytes(), shipped


@pytest.mark.skipif("VVU_SDIST" not in os.environ, reason="VVU_SDIST names no built sdist")
def test_the_sdist_carries_descriptors_and_units() -> None:
    with tarfile.open(os.environ["VVU_SDIST"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for path in [*DESCRIPTORS.glob("*.json"), *(ROOT / "contrib" / "systemd").iterdir()]:
        assert str(path.relative_to(ROOT)) in names, path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_example_units_verify(tmp_path: Path) -> None:
    """contrib/systemd's units parse without a complaint (`systemd-analyze verify`, templates as
    instance "data"; the ExecStart program is swapped for /bin/true, which exists everywhere)."""
    units = []
    for unit in (ROOT / "contrib" / "systemd").iterdir():
        text = re.sub(r"^ExecStart=/usr/bin/vvu .*$", "ExecStart=/bin/true", unit.read_text(),
                      flags=re.M)  # fmt: skip
        (tmp_path / unit.name).write_text(text)
        if "@." in unit.name:
            (tmp_path / unit.name.replace("@.", "@data.")).symlink_to(unit.name)
            units.append("./" + unit.name.replace("@.", "@data."))
        else:
            units.append("./" + unit.name)
    assert len(units) >= 5, units  # the vvu-blk@ pair and the daemon's three
    out = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(units)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
