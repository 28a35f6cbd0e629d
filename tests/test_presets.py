"""The YAML presets ship as package data: `load_config("tiny")` works from a wheel, not only
from a source checkout."""

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest

from segexec_jax import config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"tiny", "small", "1b", "llama2_7b", "llama2_7b_segexec"}


def test_presets_are_found_through_the_package():
    folder = resources.files("segexec_jax") / "configs"
    shipped = {f.name for f in folder.iterdir() if f.name.endswith(".yaml")}
    assert {f"{name}.yaml" for name in PRESETS} <= shipped
    assert config.PRESET_DIR == Path(str(folder))
    assert config.resolve_preset("tiny") == config.PRESET_DIR / "tiny.yaml"
    # ...and pyproject.toml names them as package data, so a wheel carries them
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"configs/{name}", g) for g in package_data["segexec_jax"]), name
    # the top-level configs/ the docs and scripts name is the same folder
    assert (ROOT / "configs").resolve() == config.PRESET_DIR.resolve()


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="building a wheel needs setuptools")
def test_presets_load_from_an_installed_wheel(tmp_path):
    """Build the wheel, install it into a bare folder and load every preset from outside the repo."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and egg-info next to the sources
    shutil.copytree(ROOT / "segexec_jax", src / "segexec_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")],
                   check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, cwd=tmp_path, capture_output=True)
    script = ("import segexec_jax.config as c; "
              "[c.load_config(n) for n in ('tiny', 'small', '1b', 'llama2_7b')]; print(c.PRESET_DIR)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == tmp_path / "site" / "segexec_jax" / "configs"
