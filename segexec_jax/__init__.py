"""segexec_jax: training–inference consistent segmented execution for long-context LLMs."""

from .config import Config, ConfigError, load_config
from .forward import forward
from .model import init_params
from .objective import loss

__all__ = ["Config", "ConfigError", "load_config", "init_params", "forward", "loss"]
__version__ = "0.1.0"
