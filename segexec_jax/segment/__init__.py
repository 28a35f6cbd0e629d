"""The segment operator: head roles and retrieval policies (registered objects), the scan
over segments (`operator`), the forward of every mode, the objective with its gradient
horizon, and the slow per-token references they are tested against."""


def __getattr__(name: str):
    # `segexec_jax.segment` was one module before the package had subpackages: its names now
    # live in `segment.operator`, and still resolve here
    import importlib

    try:
        return getattr(importlib.import_module(f"{__name__}.operator"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
