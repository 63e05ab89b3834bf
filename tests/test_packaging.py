"""The package's metadata: the Apache-2.0 licence expression and the LICENSE/NOTICE files, built by the setuptools
the lock installs, with a build-system floor that knows the SPDX form."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_metadata_carries_the_licence_and_its_files(tmp_path):
    for name in ("pyproject.toml", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "src" / "dmd2").mkdir(parents=True)
    (tmp_path / "src" / "dmd2" / "__init__.py").write_text("")
    out = tmp_path / "metadata"
    out.mkdir()
    build = "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metadata = (out / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata and "License-File: NOTICE" in metadata
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_the_build_floor_admits_only_setuptools_that_read_the_spdx_licence():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    floor = next(int(m.group(1)) for r in requires if (m := re.fullmatch(r"setuptools>=(\d+).*", r)))
    assert floor >= 77  # `license = "<SPDX>"` and `license-files` arrived in setuptools 77


def test_the_lock_asks_a_macos_laptop_for_no_cuda_wheels():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    lock = [Requirement(line) for line in (ROOT / "envs/requirements.lock").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    mac = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"}
    on_mac = {r.name.lower() for r in lock if r.marker is None or r.marker.evaluate(mac)}
    assert "torch" in on_mac and not [n for n in on_mac if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    # everything torch itself wants only on Linux is Linux-only in the lock too
    linux_only = {Requirement(r).name.lower() for r in requires("torch") if 'platform_system == "Linux"' in r}
    assert linux_only and linux_only.isdisjoint(on_mac)
