"""Keep JAX off a TPU backend that cannot exist on this host.

libtpu (in the dev extra, for the ahead-of-time TPU compiles of `python -m segexec_jax.aot`)
makes every JAX process probe for TPU chips and take libtpu's lock file, also on a host
without any: the probe prints pages of warnings, and a second process (a training beside an
`aot` compile, a test beside a command) waits on the first one's lock. On a host with libtpu
but no TPU chips and no NVIDIA GPU, and where the user has not chosen (JAX_PLATFORMS unset),
JAX runs on the CPU; processes started from this one inherit the choice. Compiling for a TPU
slice needs no TPU backend, so `aot` works the same.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def has_absent_tpu() -> bool:
    """libtpu is installed, and this host has neither TPU chips nor an NVIDIA GPU."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/*")
    return importlib.util.find_spec("libtpu") is not None and not chips and not glob.glob("/dev/nvidia[0-9]*")


def keep_off_absent_tpu() -> None:
    if os.environ.get("JAX_PLATFORMS") or not has_absent_tpu():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported before us: its flag was read already; set it if still unset
        import jax

        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
