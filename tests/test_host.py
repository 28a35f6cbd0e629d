"""On a host with libtpu but no TPU chips, importing the package keeps JAX on the CPU
(segexec_jax/_host.py): no probe, no lock file, no pages of warnings."""

import os
import subprocess
import sys

import pytest

from segexec_jax._host import has_absent_tpu

PROGRAM = "import segexec_jax, jax; print(jax.default_backend(), jax.config.jax_platforms)"


def _run(program: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return subprocess.run([sys.executable, "-c", program], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not has_absent_tpu(), reason="needs libtpu installed on a host without TPU chips or GPU")
@pytest.mark.parametrize("first", ["", "import jax; "], ids=["package first", "jax first"])
def test_absent_tpu_is_not_probed(first):
    r = _run(first + PROGRAM)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in r.stderr and "libtpu" not in r.stderr

