import os

# Simulated devices for sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the test workers share one GPU (pytest -m gpu): allocate on demand, not 75% each
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import pytest


@pytest.fixture
def x64():
    """Float64 inside the test: exactness checks against the references."""
    with jax.enable_x64(True):
        yield
