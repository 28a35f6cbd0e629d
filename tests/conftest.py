import glob
import importlib.util
import os

# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the test workers share one GPU (pytest -m gpu): allocate on demand, not 75% each
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# libtpu (the dev extra has it, for the ahead-of-time TPU compiles of tests/test_aot.py) makes
# every JAX process off a TPU VM probe for chips and take libtpu's lock file; on a host without
# TPU chips the tests and the processes they start use the CPU (the compiles for a TPU slice
# need no TPU backend)
if importlib.util.find_spec("libtpu") is not None and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/*"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a host without an accelerator the default run's time goes mostly into XLA's CPU compiles of
# tiny programs: skip LLVM's optimization passes there (jax_disable_most_optimizations: backend
# optimization level 0, no expensive LLVM passes; the HLO passes, and so sharding, memory and
# HLO text, are unchanged). The processes the tests start inherit it.
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the tests on optimized code.
if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/*") and not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax
import pytest


@pytest.fixture
def x64():
    """Float64 inside the test: exactness checks against the references."""
    with jax.enable_x64(True):
        yield
