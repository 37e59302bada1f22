"""The official checkpoint's folder: `ckpt-0/tensor{i:05d}_000` files in the tensor order of
grok1/params.py, `config.json` beside them, and what each file must hold.

The order and shapes are derived from the model code (`model.param_shapes`), never from an index
file (real checkpoints carry none).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from grok1.checkpoint.errors import CheckpointError
from grok1.config import ConfigError, ModelConfig
from grok1.model import param_shapes
from grok1.params import is_quantized_linear, repeat_layer, tensor_order
from grok1.weights.quant import QuantizedWeight8bit, check_block_layout

CKPT_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
FLOAT_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


def tensor_filename(index: int, host: int = 0) -> str:
    return f"tensor{index:05d}_{host:03d}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint file: which parameter it holds and the shape the model expects."""

    index: int
    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def filename(self) -> str:
        return tensor_filename(self.index)

    @property
    def name(self) -> str:
        return f"{self.module}/{self.param}"

    @property
    def quantized(self) -> bool:
        """Linear weights are int8 in the release; embeddings, norms and the router are not."""
        return is_quantized_linear(self.module, self.param)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in file order (sorted module paths, then param names)."""
    return list(_tensor_specs(config))


@functools.lru_cache(maxsize=8)
def _tensor_specs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    # Layers are identical: trace a one-layer model and repeat its layer (tracing all 64 of
    # Grok-1 would take seconds).
    one = param_shapes(dataclasses.replace(config, num_layers=1))
    shapes = repeat_layer({module: {name: tuple(value.shape) for name, value in group.items()}
                           for module, group in one.items()}, config.num_layers)
    return tuple(TensorSpec(index, module, param, shapes[module][param])
                 for index, (module, param) in enumerate(tensor_order(shapes)))


def check_tensor(value: Any, spec: TensorSpec, path: str) -> None:
    """Raise CheckpointError naming the parameter and file when `value` (a tensor read, or only
    located: numpy arrays or ArrayRefs, a QuantizedWeight8bit of them) does not fit `spec`."""
    where = f"parameter {spec.name} ({path})"
    if tuple(value.shape) != spec.shape:
        raise CheckpointError(f"{where}: expected shape {spec.shape}, found {tuple(value.shape)}")
    if isinstance(value, QuantizedWeight8bit):
        if value.weight.dtype != np.int8:
            raise CheckpointError(f"{where}: expected int8 quantized weight, found {value.weight.dtype}")
        if value.scales.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{where}: expected float scales (bfloat16, float16, float32), "
                                  f"found {value.scales.dtype}")
        problem = check_block_layout(value.shape, tuple(value.scales.shape))
        if problem:
            raise CheckpointError(f"{where}: {problem}")
    elif value.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: expected dtype bfloat16, float16 or float32, found {value.dtype}")


def _check_folder(path: str) -> None:
    """CheckpointError saying what `path` is when it is not a folder: missing, or a file."""
    if os.path.isdir(path):
        return
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(parent) == CKPT_DIR:  # one of the tensor files
        folder = os.path.dirname(os.path.dirname(os.path.normpath(path))) or "."
        raise CheckpointError(f"{path} is a file of a checkpoint; pass the folder that holds "
                              f"{CKPT_DIR}/: {folder}")
    raise CheckpointError(f"{path} is a file, not a checkpoint folder; pass the folder that holds "
                          f"{CKPT_DIR}/ and {CONFIG_FILE}")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """`path/ckpt-0` (or `path` itself when it is the ckpt-0 folder), with clear errors."""
    path = os.fspath(path)
    _check_folder(path)
    ckpt = os.path.join(path, CKPT_DIR)
    if os.path.isdir(ckpt):
        return ckpt
    if os.path.isfile(os.path.join(path, tensor_filename(0))):
        return path
    raise CheckpointError(f"{path} holds no {CKPT_DIR}/ folder with {tensor_filename(0)}")


def is_ckpt_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a `ckpt-0` folder itself (tensor files, no ckpt-0/ inside) rather than
    the checkpoint folder that holds it with config.json and tokenizer.model."""
    path = os.fspath(path)
    return (not os.path.isdir(os.path.join(path, CKPT_DIR))
            and os.path.isfile(os.path.join(path, tensor_filename(0))))


def read_config(path: str | os.PathLike) -> ModelConfig:
    """`config.json` beside `ckpt-0/`; errors name the file once and say what to pass instead."""
    path = os.fspath(path)
    _check_folder(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        if is_ckpt_folder(path):
            parent = os.path.dirname(os.path.normpath(path)) or "."
            raise CheckpointError(f"{path} is the {CKPT_DIR} folder itself; pass the folder that "
                                  f"holds it and {CONFIG_FILE}: {parent}")
        raise CheckpointError(f"{path} holds no {CONFIG_FILE} (the model config beside {CKPT_DIR}/); "
                              f"for a checkpoint that ships none, pass config= a ModelConfig or a "
                              f"preset name (the release: config='grok-1')")
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a valid JSON config ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{file}: a config must be a JSON object, got {type(values).__name__}")
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
    except TypeError as e:  # e.g. a key JSON allows but a dataclass does not
        raise ConfigError(f"{file}: {e}") from None
