"""grok1: the Grok-1 mixture-of-experts transformer in JAX and Haiku."""

from grok1.config import PRESETS, ConfigError, ModelConfig
from grok1.checkpoint import CheckpointError
from grok1.inference import Model, load
from grok1.inspect import Trace, describe
from grok1.mesh import make_mesh
from grok1.weights.quant import QuantizedWeight8bit

__all__ = ["ModelConfig", "PRESETS", "ConfigError", "CheckpointError", "Model", "load",
           "QuantizedWeight8bit", "make_mesh", "describe", "Trace"]
