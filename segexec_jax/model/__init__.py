"""The decoder: attention backends (one entry point, `attention.attend`), RoPE, numerics,
the Transformer and its logical axes, and the rules that map those axes to a device mesh."""


def __getattr__(name: str):
    # `segexec_jax.model` was one module before the package had subpackages: its names now
    # live in `model.transformer`, and still resolve here
    import importlib

    try:
        return getattr(importlib.import_module(f"{__name__}.transformer"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
