"""segexec_jax: training–inference consistent segmented execution for long-context LLMs."""

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError, load_config
from .forward import forward
from .generate import GenerateResult, generate
from .model import init_params
from .objective import loss

__all__ = ["Config", "ConfigError", "CheckpointError", "GenerateResult", "load_config", "init_params",
           "forward", "loss", "generate", "load_checkpoint"]
__version__ = "0.1.0"
