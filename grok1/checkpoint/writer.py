"""Writing the official checkpoint format: each tensor pickled as the release's files are (numpy
arrays, `__main__.QuantizedWeight8bit` for int8 weights), the whole folder written under a
temporary name and renamed into place; and quantising float parameters as the release stores
them."""

from __future__ import annotations

import os
import pickle
import shutil
from typing import Any

import numpy as np

from grok1.checkpoint.errors import CheckpointError
from grok1.checkpoint.files import CKPT_DIR, CONFIG_FILE, check_tensor, tensor_specs
from grok1.config import ModelConfig
from grok1.weights.quant import QuantizedWeight8bit, quantize


def numpy_reconstruct():
    """numpy's own `_reconstruct`, the global an array's pickle names."""
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


class _OfficialQuantizedWeight8bit:
    """Pickled as `__main__.QuantizedWeight8bit` with `weight` and `scales`, like the release."""

    def __init__(self, weight: np.ndarray, scales: np.ndarray):
        self.weight = weight
        self.scales = scales


# Names as numpy 1.x and the official code resolve them, whatever numpy writes today.
_WRITE_ALIASES = {
    numpy_reconstruct(): ("numpy.core.multiarray", "_reconstruct"),
    _OfficialQuantizedWeight8bit: ("__main__", "QuantizedWeight8bit"),
}


class _OfficialPickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        alias = _WRITE_ALIASES.get(obj)
        if alias is None:
            return super().save_global(obj, name)
        self.save(alias[0])
        self.save(alias[1])
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def write_tensor(path: str | os.PathLike, value: Any) -> None:
    """Pickle one tensor (numpy array or QuantizedWeight8bit) in the official layout."""
    if isinstance(value, QuantizedWeight8bit):
        obj = _OfficialQuantizedWeight8bit(np.asarray(value.weight), np.asarray(value.scales))
    else:
        obj = np.asarray(value)
    with open(path, "wb") as f:
        _OfficialPickler(f, protocol=4).dump(obj)


def save(params: dict, path: str | os.PathLike, config: ModelConfig) -> None:
    """Write `params` as `path/ckpt-0/` plus `path/config.json`, atomically.

    Everything goes to a temporary folder beside `path` first and is renamed into place at the
    end, so an interrupted save never leaves a half-written checkpoint behind.
    """
    path = os.fspath(path)
    specs = tensor_specs(config)
    for spec in specs:
        value = params.get(spec.module, {}).get(spec.param)
        if value is None:
            raise CheckpointError(f"params lack parameter {spec.name} that config expects")
        check_tensor(_as_numpy(value), spec, "params")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(os.path.join(tmp, CKPT_DIR))
        for spec in specs:
            write_tensor(os.path.join(tmp, CKPT_DIR, spec.filename),
                         _as_numpy(params[spec.module][spec.param]))
        config.to_json(os.path.join(tmp, CONFIG_FILE))
        if os.path.isdir(path):  # keep anything else the folder holds (e.g. tokenizer.model)
            for name in (CKPT_DIR, CONFIG_FILE):
                _replace(os.path.join(tmp, name), os.path.join(path, name))
            os.rmdir(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: str, target: str) -> None:
    """Move `new` over `target` (file or folder); the old one is removed only once `new` is in."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(new, target)
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)


def _as_numpy(value: Any) -> np.ndarray | QuantizedWeight8bit:
    if isinstance(value, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=np.asarray(value.weight), scales=np.asarray(value.scales))
    return np.asarray(value)


def quantize_params(params: dict, config: ModelConfig, num_blocks: int = 1,
                    scale_dtype: Any = np.float32) -> dict:
    """A copy of `params` whose float linear weights (the tensors the release stores as int8) are
    int8 with `num_blocks` scale blocks along their input axis; everything else is kept as is,
    as are weights that are already quantized. The result can be `save`d in the official format."""
    out = {module: dict(values) for module, values in params.items()}
    for spec in tensor_specs(config):
        value = params.get(spec.module, {}).get(spec.param)
        if value is None:
            raise CheckpointError(f"params lack parameter {spec.name} that config expects")
        if not spec.quantized or isinstance(value, QuantizedWeight8bit):
            continue
        n_in = spec.shape[-2]
        if num_blocks < 1 or n_in % num_blocks:
            raise CheckpointError(f"parameter {spec.name}: num_blocks={num_blocks} does not divide its "
                                  f"input axis of size {n_in} (shape {spec.shape})")
        out[spec.module][spec.param] = quantize(np.asarray(value), num_blocks, scale_dtype=scale_dtype)
    return out
