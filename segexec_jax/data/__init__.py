"""Tokenizers, the synthetic long-context tasks, and the input pipeline that packs documents
into rows by the segment rule."""


def __getattr__(name: str):
    # `segexec_jax.data` was one module before the package had subpackages: its names now
    # live in `data.pipeline`, and still resolve here
    import importlib

    try:
        return getattr(importlib.import_module(f"{__name__}.pipeline"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
