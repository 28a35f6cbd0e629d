"""The platform the package builds programs for: where `attention.backend: auto` and the
kernels' checks look. It is JAX's default backend, unless `compiling_for(platform)` says that
programs are being lowered for other devices (a TPU slice's, from a CPU machine:
`python -m segexec_jax.aot`)."""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("segexec_target_platform", default=None)


def target() -> str:
    """"cpu", "gpu" or "tpu": the platform the programs being built will run on."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Build programs as for `platform` inside the block (the devices they are lowered for
    decide where they run; this makes the package choose what it would choose there)."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)
