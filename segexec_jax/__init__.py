"""segexec_jax: training–inference consistent segmented execution for long-context LLMs.

The package, from the bottom up (each layer imports only those below it):

    config, cli   typed configuration and presets; the command lines' shared parts
    model/        the decoder: attention backends, RoPE, numerics, sharding rules
    segment/      the segment operator: head roles, retrieval policies, the scan, the
                  objective and its gradient horizon, the full/streaming modes, slow references
    data/         tokenizers, synthetic long-context tasks, the packing input pipeline
    interop/      Hugging Face, safetensors and GGUF formats
    training/     the training loop, optimizer, checkpoints, metrics
    inference/    caches, prefill and decode, generation, the `infer.py` command line
    evaluation/   the long-context suite, scoring, head calibration, benchmarks

and the command lines `python -m segexec_jax.{eval,bench,convert,calibrate,config}`.
"""

import warnings as _warnings

# `python -m segexec_jax.config` (or .training.checkpoint) runs a module this package has
# imported already: harmless here (its command line only runs under __main__)
_warnings.filterwarnings("ignore", message=r"'segexec_jax\.[\w.]+' found in sys\.modules", category=RuntimeWarning)

from ._host import keep_off_absent_tpu as _keep_off_absent_tpu  # noqa: E402

_keep_off_absent_tpu()  # before anything initialises a JAX backend (see _host)

from . import _moved  # noqa: E402,F401  (the flat module names of earlier versions still import)
from .cli import log_to_stderr  # noqa: E402
from .config import Config, ConfigError, load_config  # noqa: E402
from .data.synthetic import TASKS as _TASKS  # noqa: E402,F401  (registers the synthetic task names' check)
from .inference.generate import GenerateResult, generate  # noqa: E402
from .model.transformer import init_params  # noqa: E402
from .segment.forward import forward  # noqa: E402
from .segment.objective import loss  # noqa: E402
from .training.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from .training.loop import use_compilation_cache  # noqa: E402

__all__ = ["Config", "ConfigError", "CheckpointError", "GenerateResult", "load_config", "init_params",
           "forward", "loss", "generate", "load_checkpoint", "log_to_stderr", "use_compilation_cache"]
__version__ = "0.1.0"
