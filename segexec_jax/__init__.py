"""segexec_jax: training–inference consistent segmented execution for long-context LLMs."""

import logging as _logging
import sys as _sys
import warnings as _warnings

# `python -m segexec_jax.checkpoint` (or .config) runs a module this package has imported
# already: harmless here (its command line only runs under __main__), so runpy's warning goes
_warnings.filterwarnings("ignore", message=r"'segexec_jax\.\w+' found in sys\.modules", category=RuntimeWarning)

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError, load_config
from .forward import forward
from .generate import GenerateResult, generate
from .model import init_params
from .objective import loss
from .synthetic import TASKS as _TASKS  # (its config check: data.synthetic's task names)

__all__ = ["Config", "ConfigError", "CheckpointError", "GenerateResult", "load_config", "init_params",
           "forward", "loss", "generate", "load_checkpoint"]
__version__ = "0.1.0"


class _StderrHandler(_logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (pytest and notebooks swap it)."""

    def __init__(self):
        _logging.Handler.__init__(self)

    @property
    def stream(self):
        return _sys.stderr


def log_to_stderr(level: int = _logging.INFO) -> None:
    """Show this package's log records from `level` up on stderr; the command-line tools call it.

    A handler on the `segexec_jax` logger itself, not `logging.basicConfig`: importing Orbax
    has already given the root logger a handler (so basicConfig does nothing), and lowering
    the root level would let every library's INFO lines through. Calling it again only
    changes the level."""
    logger = _logging.getLogger(__name__)
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.propagate = False  # the root handler would print each record a second time


def use_compilation_cache() -> None:
    """Keep compiled programs in `$SEGEXEC_CACHE_DIR/jax` (~/.cache/segexec_jax/jax) unless
    JAX_COMPILATION_CACHE_DIR names another place: a rerun or a resume compiles in seconds.
    `train.py` calls it for single-process runs."""
    import jax

    from .data import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
